"""IR param -> Hugging Face tensor name, per HF model family. One rule per line (data, parsed below).

Columns:

* ``families``  comma-separated HF families the rule applies to (see ``families.py``),
* ``role``      the node role (:func:`mexc.ir.analysis.node_roles`),
* ``params``    the IR param, or ``a+b+c``: those params concatenated on dim 0 (GPT-2's fused ``c_attn``),
* ``hf name``   ``{L}`` = layer index, ``{E}`` = expert index,
* ``transform`` ``copy``; ``zc`` (a norm weight the HF module uses as ``1 + w``: the IR's zero-centered weight
  as is, or ``w - 1`` for a norm that is not zero-centered); ``conv1d`` (GPT-2 ``Conv1D`` stores ``[in, out]``: the transpose of ``nn.Linear``);
  ``expert`` (one tensor per expert: row ``{E}`` of the IR's ``[E, ...]`` stack),
* ``when``      ``always``: the HF class always has this tensor, zeros are written when the IR has none
  (e.g. a LayerNorm without bias); ``attn_bias`` / ``mlp_bias``: like ``always`` when the family's config
  turns that bias on, otherwise the tensor does not exist (and an IR param there is an error);
  ``untied``: written only when the output head is not tied to the embedding.

Every IR param must be written by exactly one active rule: ``check`` refuses a model with a param no rule
takes, so no weight is ever dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

TABLE = """
# families            role        params                 hf name                                                transform when
llama,qwen2,mixtral   embedding   word                   model.embed_tokens.weight                              copy      always
llama,qwen2,mixtral   input_norm  weight                 model.layers.{L}.input_layernorm.weight                copy      always
llama,qwen2,mixtral   attention   q                      model.layers.{L}.self_attn.q_proj.weight               copy      always
llama,qwen2,mixtral   attention   k                      model.layers.{L}.self_attn.k_proj.weight               copy      always
llama,qwen2,mixtral   attention   v                      model.layers.{L}.self_attn.v_proj.weight               copy      always
llama                 attention   q_bias                 model.layers.{L}.self_attn.q_proj.bias                 copy      attn_bias
llama                 attention   k_bias                 model.layers.{L}.self_attn.k_proj.bias                 copy      attn_bias
llama                 attention   v_bias                 model.layers.{L}.self_attn.v_proj.bias                 copy      attn_bias
qwen2                 attention   q_bias                 model.layers.{L}.self_attn.q_proj.bias                 copy      always
qwen2                 attention   k_bias                 model.layers.{L}.self_attn.k_proj.bias                 copy      always
qwen2                 attention   v_bias                 model.layers.{L}.self_attn.v_proj.bias                 copy      always
llama,qwen2,mixtral   attention   proj                   model.layers.{L}.self_attn.o_proj.weight               copy      always
llama                 attention   proj_bias              model.layers.{L}.self_attn.o_proj.bias                 copy      attn_bias
llama,qwen2,mixtral   post_norm   weight                 model.layers.{L}.post_attention_layernorm.weight       copy      always
llama,qwen2           mlp         gate                   model.layers.{L}.mlp.gate_proj.weight                  copy      always
llama,qwen2           mlp         up                     model.layers.{L}.mlp.up_proj.weight                    copy      always
llama,qwen2           mlp         fc2                    model.layers.{L}.mlp.down_proj.weight                  copy      always
llama                 mlp         gate_bias              model.layers.{L}.mlp.gate_proj.bias                    copy      mlp_bias
llama                 mlp         up_bias                model.layers.{L}.mlp.up_proj.bias                      copy      mlp_bias
llama                 mlp         fc2_bias               model.layers.{L}.mlp.down_proj.bias                    copy      mlp_bias
mixtral               moe         router                 model.layers.{L}.block_sparse_moe.gate.weight          copy      always
mixtral               moe         gate                   model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight expert   always
mixtral               moe         fc2                    model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight expert   always
mixtral               moe         up                     model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight expert   always
llama,qwen2,mixtral   final_norm  weight                 model.norm.weight                                      copy      always
llama,qwen2,mixtral   lm_head     weight                 lm_head.weight                                         copy      untied
gpt2,gpt_bigcode      embedding   word                   transformer.wte.weight                                 copy      always
gpt2,gpt_bigcode      embedding   position               transformer.wpe.weight                                 copy      always
gpt2,gpt_bigcode      input_norm  weight                 transformer.h.{L}.ln_1.weight                          copy      always
gpt2,gpt_bigcode      input_norm  bias                   transformer.h.{L}.ln_1.bias                            copy      always
gpt2                  attention   q+k+v                  transformer.h.{L}.attn.c_attn.weight                   conv1d    always
gpt_bigcode           attention   q+k+v                  transformer.h.{L}.attn.c_attn.weight                   copy      always
gpt2,gpt_bigcode      attention   q_bias+k_bias+v_bias   transformer.h.{L}.attn.c_attn.bias                     copy      always
gpt2                  attention   proj                   transformer.h.{L}.attn.c_proj.weight                   conv1d    always
gpt_bigcode           attention   proj                   transformer.h.{L}.attn.c_proj.weight                   copy      always
gpt2,gpt_bigcode      attention   proj_bias              transformer.h.{L}.attn.c_proj.bias                     copy      always
gpt2,gpt_bigcode      post_norm   weight                 transformer.h.{L}.ln_2.weight                          copy      always
gpt2,gpt_bigcode      post_norm   bias                   transformer.h.{L}.ln_2.bias                            copy      always
gpt2                  mlp         fc1                    transformer.h.{L}.mlp.c_fc.weight                      conv1d    always
gpt_bigcode           mlp         fc1                    transformer.h.{L}.mlp.c_fc.weight                      copy      always
gpt2,gpt_bigcode      mlp         fc1_bias               transformer.h.{L}.mlp.c_fc.bias                        copy      always
gpt2                  mlp         fc2                    transformer.h.{L}.mlp.c_proj.weight                    conv1d    always
gpt_bigcode           mlp         fc2                    transformer.h.{L}.mlp.c_proj.weight                    copy      always
gpt2,gpt_bigcode      mlp         fc2_bias               transformer.h.{L}.mlp.c_proj.bias                      copy      always
gpt2,gpt_bigcode      final_norm  weight                 transformer.ln_f.weight                                copy      always
gpt2,gpt_bigcode      final_norm  bias                   transformer.ln_f.bias                                  copy      always
gpt2,gpt_bigcode      lm_head     weight                 lm_head.weight                                         copy      untied
gemma,nemotron,stablelm embedding word                   model.embed_tokens.weight                              copy      always
gemma,nemotron        input_norm  weight                 model.layers.{L}.input_layernorm.weight                zc        always
stablelm              input_norm  weight                 model.layers.{L}.input_layernorm.weight                copy      always
nemotron,stablelm     input_norm  bias                   model.layers.{L}.input_layernorm.bias                  copy      always
gemma,nemotron,stablelm attention q                      model.layers.{L}.self_attn.q_proj.weight               copy      always
gemma,nemotron,stablelm attention k                      model.layers.{L}.self_attn.k_proj.weight               copy      always
gemma,nemotron,stablelm attention v                      model.layers.{L}.self_attn.v_proj.weight               copy      always
gemma,nemotron,stablelm attention q_bias                 model.layers.{L}.self_attn.q_proj.bias                 copy      attn_bias
gemma,nemotron,stablelm attention k_bias                 model.layers.{L}.self_attn.k_proj.bias                 copy      attn_bias
gemma,nemotron,stablelm attention v_bias                 model.layers.{L}.self_attn.v_proj.bias                 copy      attn_bias
gemma,nemotron,stablelm attention proj                   model.layers.{L}.self_attn.o_proj.weight               copy      always
gemma,nemotron        attention   proj_bias              model.layers.{L}.self_attn.o_proj.bias                 copy      attn_bias
gemma,nemotron        post_norm   weight                 model.layers.{L}.post_attention_layernorm.weight       zc        always
stablelm              post_norm   weight                 model.layers.{L}.post_attention_layernorm.weight       copy      always
nemotron,stablelm     post_norm   bias                   model.layers.{L}.post_attention_layernorm.bias         copy      always
gemma,stablelm        mlp         gate                   model.layers.{L}.mlp.gate_proj.weight                  copy      always
gemma,stablelm        mlp         up                     model.layers.{L}.mlp.up_proj.weight                    copy      always
nemotron              mlp         fc1                    model.layers.{L}.mlp.up_proj.weight                    copy      always
nemotron              mlp         fc1_bias               model.layers.{L}.mlp.up_proj.bias                      copy      mlp_bias
gemma,nemotron,stablelm mlp       fc2                    model.layers.{L}.mlp.down_proj.weight                  copy      always
nemotron              mlp         fc2_bias               model.layers.{L}.mlp.down_proj.bias                    copy      mlp_bias
gemma,nemotron        final_norm  weight                 model.norm.weight                                      zc        always
stablelm              final_norm  weight                 model.norm.weight                                      copy      always
nemotron,stablelm     final_norm  bias                   model.norm.bias                                        copy      always
gemma,nemotron,stablelm lm_head   weight                 lm_head.weight                                         copy      untied
falcon,falcon2        embedding   word                   transformer.word_embeddings.weight                     copy      always
falcon                input_norm  weight                 transformer.h.{L}.input_layernorm.weight               copy      always
falcon                input_norm  bias                   transformer.h.{L}.input_layernorm.bias                 copy      always
falcon2               input_norm  weight                 transformer.h.{L}.ln_attn.weight                       copy      always
falcon2               input_norm  bias                   transformer.h.{L}.ln_attn.bias                         copy      always
falcon2               post_norm   weight                 transformer.h.{L}.ln_mlp.weight                        copy      always
falcon2               post_norm   bias                   transformer.h.{L}.ln_mlp.bias                          copy      always
falcon,falcon2        attention   qkv                    transformer.h.{L}.self_attention.query_key_value.weight copy     always
falcon,falcon2        attention   qkv_bias               transformer.h.{L}.self_attention.query_key_value.bias  copy      attn_bias
falcon,falcon2        attention   proj                   transformer.h.{L}.self_attention.dense.weight          copy      always
falcon,falcon2        attention   proj_bias              transformer.h.{L}.self_attention.dense.bias            copy      attn_bias
falcon,falcon2        mlp         fc1                    transformer.h.{L}.mlp.dense_h_to_4h.weight             copy      always
falcon,falcon2        mlp         fc1_bias               transformer.h.{L}.mlp.dense_h_to_4h.bias               copy      mlp_bias
falcon,falcon2        mlp         fc2                    transformer.h.{L}.mlp.dense_4h_to_h.weight             copy      always
falcon,falcon2        mlp         fc2_bias               transformer.h.{L}.mlp.dense_4h_to_h.bias               copy      mlp_bias
falcon,falcon2        final_norm  weight                 transformer.ln_f.weight                                copy      always
falcon,falcon2        final_norm  bias                   transformer.ln_f.bias                                  copy      always
falcon,falcon2        lm_head     weight                 lm_head.weight                                         copy      untied
"""

TRANSFORMS = ("copy", "zc", "conv1d", "expert")
CONDITIONS = ("always", "attn_bias", "mlp_bias", "untied")


@dataclass(frozen=True)
class Rule:
    family: str
    role: str
    params: tuple[str, ...]
    name: str
    transform: str
    when: str
    line: int

    def __str__(self) -> str:
        return f"{self.role}.{'+'.join(self.params)} -> {self.name} ({self.transform}, {self.when})"


def parse_table(text: str = TABLE) -> list[Rule]:
    rules: list[Rule] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cols = line.split()
        if len(cols) != 6:
            raise ValueError(f"hf name table line {lineno}: expected 6 columns, got {len(cols)}: {raw!r}")
        fams, role, params, name, transform, when = cols
        if transform not in TRANSFORMS:
            raise ValueError(f"hf name table line {lineno}: unknown transform {transform!r}")
        if when not in CONDITIONS:
            raise ValueError(f"hf name table line {lineno}: unknown condition {when!r}")
        if (transform == "expert") != ("{E}" in name):
            raise ValueError(f"hf name table line {lineno}: '{{E}}' goes with the expert transform only")
        for fam in fams.split(","):
            rules.append(Rule(fam, role, tuple(params.split("+")), name, transform, when, lineno))
    return rules


RULES: list[Rule] = parse_table()
FAMILIES = tuple(dict.fromkeys(r.family for r in RULES))


def rules_for(family: str) -> list[Rule]:
    return [r for r in RULES if r.family == family]


def describe(family: str | None = None) -> str:
    """The name table as text: one line per rule (all families, or one)."""
    fams = [family] if family else list(FAMILIES)
    out = []
    for fam in fams:
        out.append(f"[{fam}]")
        for r in rules_for(fam):
            extra = "" if (r.transform, r.when) == ("copy", "always") else f"  ({r.transform}, {r.when})"
            out.append(f"  {r.role + '.' + '+'.join(r.params):34s} -> {r.name}{extra}")
    return "\n".join(out)

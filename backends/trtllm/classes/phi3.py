"""TensorRT-LLM Phi3ForCausalLM (tensorrt_llm/models/phi3, <= 1.2): the Phi-3 mini layout, which mexc writes for a
bias-free Llama-style model with partial rotary (Megatron's ``rotary_percent`` < 1), the one TensorRT-LLM class
of that shape whose attention honours ``rotary_pct``.

From TensorRT-LLM's sources (``models/phi3/model.py`` ``Phi3DecoderLayer`` for the architecture
``Phi3ForCausalLM``, neither the small nor the MoE variant):

* ``RmsNorm`` ``input_layernorm`` / ``post_layernorm`` / ``ln_f`` at ``norm_epsilon``; no biases anywhere
  (``Attention(bias=False)``, ``MLP(bias=False)``, ``lm_head`` ``ColumnLinear(bias=False)``);
* ``Attention(position_embedding_type=rope_gpt_neox, rotary_embedding_base=rotary_base,
  rotary_embedding_percentage=rotary_pct, q_scaling=1)`` built *without* ``attention_head_size`` (so
  ``hidden_size // num_attention_heads``, ``layers/attention.py``) and without ``rotary_embedding_scaling``
  (only ``long_rope``, from ``longrope_scaling_*`` fields mexc never writes); the attention rotates the first
  ``int(head_size * rotary_pct)`` channels of each head with rotate-half (GPT-NeoX), which is megatron-core's
  partial rotary (``RotaryEmbedding`` ``dim = int(kv_channels * rotary_percent)``);
* ``MLP(hidden_act=...)`` with ``swiglu``: ``fc`` has ``2 x intermediate_size`` outputs per model (column
  parallel: ``2 x intermediate_size / tp`` per rank) and ``functional.swiglu`` splits them into ``x, gate`` and
  computes ``silu(gate) * x``: each rank's ``mlp.fc.weight`` is ``[up_r; gate_r]`` (``models/phi3/convert.py``
  swaps Phi-3's ``gate_up_proj`` halves into that order); ``Phi3Config.from_hugging_face`` writes ``swiglu`` for
  ``silu``; (TensorRT-LLM's own HF converter, ``phi3/split_weights.py`` ``split_weights_tp``, cuts the fused
  ``[up; gate]`` into contiguous row blocks at tp > 1, which is not what the per-rank ``swiglu`` chunk reads: mexc
  follows the engine's ``MLP``, not that converter);
* ``attention.qkv.weight`` per rank ``[q_r; k_r; v_r]``, ``attention.dense``, ``mlp.proj`` row parallel.
"""

from __future__ import annotations

from .common import PLAIN_DECODER, UNREWRITTEN, read_rope, rule, trt_class

_BIASES = ("qkv_bias", "q_bias", "k_bias", "v_bias", "proj_bias")
_MLP_BIASES = ("gate_bias", "up_bias", "fc1_bias", "fc2_bias")


def _signature(f) -> bool:
    return (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and not f.moes and f.gated == {True}
            and f.a0["rope"].percent != 1.0 and not f.has(f.attns, _BIASES) and not f.has(f.mlps, _MLP_BIASES))


def _rules(f):
    a, p = f.a0, []
    rope = a["rope"]
    if f.acts != {"silu"}:
        p.append(f"activation {sorted(f.acts)} is not expressible with {f.name}: mexc writes its MLP as swiglu")
    if a["num_heads"] * a["head_dim"] != f.config.hidden_size:
        p.append(f"head_dim {a['head_dim']} x {a['num_heads']} heads != hidden {f.config.hidden_size}: "
                 f"{f.name}'s Phi3DecoderLayer builds its Attention without attention_head_size "
                 "(hidden_size // num_attention_heads)")
    rd = rope.rotary_dim(a["head_dim"])
    if rd % 2:
        p.append(f"an odd rotary dimension (int({a['head_dim']} x rotary_percent {rope.percent:g}) = {rd}; "
                 f"megatron-core rotates {rd + 1} channels, 2 x the {rd // 2 + 1} frequencies over {rd}) is not "
                 f"expressible with {f.name}: its attention rotates rotary_embedding_dim = int(head_size x "
                 f"rotary_pct) = {rd} channels; use --target hf or onnx")
    if rope.scaling != "none":
        p.append(f"rope scaling {rope.scaling!r} is not expressible with {f.name}: Phi3DecoderLayer passes no "
                 "rotary_embedding_scaling to its Attention")
    if a["qk_norm"] != "none":
        p.append(f"QK layernorm is not expressible with {f.name}")
    if a["softmax_scale"] is not None:
        p.append(f"a softmax scale other than 1/sqrt(head_dim) is not expressible with {f.name} (q_scaling 1)")
    if f.learned:
        p.append(f"learned position embeddings are not expressible with {f.name}")
    if len({m.params["fc2"].type.shape for m in f.mlps}) > 1:
        p.append(f"MLP sizes differ across layers; {f.name} has one intermediate_size")
    return p


def config(f, cfg: dict) -> dict:
    cfg.update(hidden_act="swiglu", rotary_scaling=None)
    return cfg


def read(cfg: dict) -> dict:
    if cfg.get("hidden_act") != "swiglu" or cfg.get("longrope_scaling_short_factors") is not None:
        return {"refuse": "a Phi3ForCausalLM checkpoint with hidden_act other than swiglu or with long_rope "
                          "factors is not one mexc writes"}
    return {"norm": "rmsnorm", "gated": True, "activation": "silu", "rope": read_rope(cfg),
            "fused_up_gate": True}


PHI3 = trt_class("Phi3ForCausalLM", signature=_signature,
                 rules=[PLAIN_DECODER, UNREWRITTEN,
                        rule("an activation other than SiLU, head_dim != hidden/heads, rope scaling, QK norm, a "
                             "softmax scale, learned positions, differing MLP sizes")(_rules)],
                 config=config, read=read, before=("LlamaForCausalLM",),
                 extra_rows="mlp  up+gate  transformer.layers.{L}.mlp.fc.weight  moe_fc  present")
# the fused fc replaces the common rows' separate gate (mlp.fc) and up (mlp.gate)
PHI3.rows[:] = [r for r in PHI3.rows if (r.role, r.params) not in {("mlp", ("gate",)), ("mlp", ("up",))}]

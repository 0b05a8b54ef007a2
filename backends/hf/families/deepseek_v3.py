"""DeepseekV3ForCausalLM: multi-latent attention (the IR's ``mla``), RMSNorm, dense SwiGLU MLPs.

transformers' ``models/deepseek_v3/modeling_deepseek_v3.py``: ``DeepseekV3Attention`` has ``q_proj`` (no
``q_lora_rank``) or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``, ``kv_a_proj_with_mqa`` (latent + shared
rope key) -> ``kv_a_layernorm`` -> ``kv_b_proj`` (k_nope | v per head), ``o_proj``; ``rope_interleave`` rotates
GPT-J pairs (Megatron's MLA convention); its softmax scale is ``qk_head_dim^-0.5 * get_mscale(factor,
mscale_all_dim)^2`` for a scaled rope (``yarn_apply_mscale``); its latent norms are ``DeepseekV3RMSNorm`` at the
default eps 1e-6. Layers below ``first_k_dense_replace`` have a dense MLP: mexc writes it = num_layers (every
layer dense; routed experts are not written yet).
"""

from __future__ import annotations

import math

from ....ir.semantics import yarn_softmax_mscale
from .common import HIDDEN_ACT, ONE_MLP_SIZE, family, mlp_form, rope_fields, rule

_L = "model.layers.{L}."
ROWS = f"""
embedding   word      model.embed_tokens.weight                  copy  always
input_norm  weight    {_L}input_layernorm.weight                 copy  always
mla         q         {_L}self_attn.q_proj.weight                copy  q_direct
mla         q_down    {_L}self_attn.q_a_proj.weight              copy  q_lora
mla         q_norm    {_L}self_attn.q_a_layernorm.weight         copy  q_lora
mla         q_up      {_L}self_attn.q_b_proj.weight              copy  q_lora
mla         kv_down   {_L}self_attn.kv_a_proj_with_mqa.weight    copy  always
mla         kv_norm   {_L}self_attn.kv_a_layernorm.weight        copy  always
mla         kv_up     {_L}self_attn.kv_b_proj.weight             copy  always
mla         proj      {_L}self_attn.o_proj.weight                copy  always
post_norm   weight    {_L}post_attention_layernorm.weight        copy  always
mlp         gate      {_L}mlp.gate_proj.weight                   copy  always
mlp         up        {_L}mlp.up_proj.weight                     copy  always
mlp         fc2       {_L}mlp.down_proj.weight                   copy  always
final_norm  weight    model.norm.weight                          copy  always
lm_head     weight    lm_head.weight                             copy  untied
"""

_SHAPE = ("num_heads", "kv_lora_rank", "qk_head_dim", "qk_rope_dim", "v_head_dim", "rope", "latent_norm",
          "latent_norm_eps", "softmax_scale")


def _hf_scale(a: dict) -> float:
    """The softmax scale DeepseekV3Attention computes from the config mexc writes."""
    s = (a["qk_head_dim"] + a["qk_rope_dim"]) ** -0.5
    r = a["rope"]
    return s * yarn_softmax_mscale(r) ** 2 if r.scaling == "yarn" and r.mscale_all_dim else s


def _mla(f):
    p, a = [], f.mlas[0].attrs
    if f.attns:
        p.append(f"layers mixing multi-latent and plain attention cannot be expressed by the {f.name}")
    if len({tuple(m.attrs[k] for k in _SHAPE) for m in f.mlas}) > 1 or \
            len({("q" in m.params) for m in f.mlas}) > 1:
        p.append(f"layers differ in multi-latent attention shape or rope; the {f.name} has one per model")
    if a["latent_norm"] != "rmsnorm" or a["latent_norm_eps"] != 1e-6:
        p.append(f"latent norms {a['latent_norm']} at eps {a['latent_norm_eps']:g} cannot be expressed by the "
                 f"{f.name}: its q_a / kv_a layernorms are RMSNorm at eps 1e-6 (Megatron: qk_layernorm with "
                 "RMSNorm, layernorm_epsilon 1e-6)")
    r = a["rope"]
    if r.percent != 1.0 or not r.interleaved or r.scaling not in ("none", "yarn"):
        p.append(f"a decoupled rope other than whole GPT-J-pair rotation with no or yarn scaling cannot be "
                 f"expressed by the {f.name} (rope {r})")
    scale = a["softmax_scale"] or (a["qk_head_dim"] + a["qk_rope_dim"]) ** -0.5
    if not math.isclose(scale, _hf_scale(a), rel_tol=1e-6):
        p.append(f"a softmax scale of {scale:.6g} cannot be expressed by the {f.name}, which computes "
                 f"{_hf_scale(a):.6g} from its rope (Megatron scales by rotary_scaling_factor / mscale_all_dim "
                 "even without yarn)")
    if f.has(f.mlas, ("proj_bias",)) or f.has(f.mlps, ("gate_bias", "up_bias", "fc2_bias")):
        p.append(f"linear biases cannot be expressed by the {f.name} (mexc writes attention_bias false)")
    return p


def _no_learned(f):
    if f.learned:
        return f"learned position embeddings cannot be expressed by the {f.name}"


def _flags(f, base: dict) -> dict:
    lora = any("q_down" in m.params for m in f.mlas)
    return dict(base, q_lora=lora, q_direct=not lora)


def config(f, flags) -> dict:
    c, a, m = f.config, f.mlas[0].attrs, f.mlps[0]
    ffn = m.params["fc2"].type.shape[-1]
    q = f.mlas[0].params.get("q_down")
    cfg = {"vocab_size": f.emb.params["word"].type.shape[0], "hidden_size": c.hidden_size,
           "intermediate_size": ffn, "moe_intermediate_size": ffn, "num_hidden_layers": c.num_layers,
           "first_k_dense_replace": c.num_layers, "num_attention_heads": a["num_heads"],
           "num_key_value_heads": a["num_heads"], "q_lora_rank": q.type.shape[0] if q is not None else None,
           "kv_lora_rank": a["kv_lora_rank"], "qk_nope_head_dim": a["qk_head_dim"],
           "qk_rope_head_dim": a["qk_rope_dim"], "v_head_dim": a["v_head_dim"], "head_dim": a["qk_rope_dim"],
           "hidden_act": HIDDEN_ACT[m.attrs["activation"]], "max_position_embeddings": c.max_position_embeddings,
           "rms_norm_eps": f.norms[0].attrs["eps"], "rope_interleave": True, "attention_bias": False,
           "attention_dropout": 0.0, "initializer_range": 0.02, "num_nextn_predict_layers": 0, "num_mtp_layers": 0}
    rope_fields(a["rope"], cfg)
    return cfg


family("deepseek_v3", "DeepseekV3ForCausalLM", rows=ROWS,
       signature=lambda f: bool(f.mlas) and f.kinds == {"rmsnorm"},
       rules=[rule("plain attention layers; MLA shapes differing by layer; latent norms other than RMSNorm at "
                   "1e-6; partial rope or scaling other than yarn; a softmax scale the config cannot give; "
                   "biases")(_mla), rule("learned positions")(_no_learned),
              rule("a MLP other than SwiGLU")(mlp_form(True, "silu", ": DeepseekV3MLP is SwiGLU")),
              ONE_MLP_SIZE],
       config=config, flags=_flags)

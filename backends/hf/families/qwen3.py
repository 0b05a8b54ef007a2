"""Qwen3ForCausalLM (dense): Llama with a per-head RMSNorm of q and k before rotary (Megatron's
``qk_layernorm``; transformers' ``Qwen3Attention.q_norm`` / ``k_norm`` at ``rms_norm_eps``), ``attention_bias``
for q/k/v/o all or none, no MLP bias, explicit ``head_dim``."""

from __future__ import annotations

from .common import LLAMA_LIKE, MLP_BIAS, ONE_MLP_SIZE, family, llama_config, rule

ROWS = """
embedding   word        model.embed_tokens.weight                          copy  always
input_norm  weight      model.layers.{L}.input_layernorm.weight            copy  always
attention   q           model.layers.{L}.self_attn.q_proj.weight           copy  always
attention   k           model.layers.{L}.self_attn.k_proj.weight           copy  always
attention   v           model.layers.{L}.self_attn.v_proj.weight           copy  always
attention   q_bias      model.layers.{L}.self_attn.q_proj.bias             copy  attn_bias
attention   k_bias      model.layers.{L}.self_attn.k_proj.bias             copy  attn_bias
attention   v_bias      model.layers.{L}.self_attn.v_proj.bias             copy  attn_bias
attention   proj        model.layers.{L}.self_attn.o_proj.weight           copy  always
attention   proj_bias   model.layers.{L}.self_attn.o_proj.bias             copy  attn_bias
attention   q_norm      model.layers.{L}.self_attn.q_norm.weight           copy  always
attention   k_norm      model.layers.{L}.self_attn.k_norm.weight           copy  always
post_norm   weight      model.layers.{L}.post_attention_layernorm.weight   copy  always
mlp         gate        model.layers.{L}.mlp.gate_proj.weight              copy  always
mlp         up          model.layers.{L}.mlp.up_proj.weight                copy  always
mlp         fc2         model.layers.{L}.mlp.down_proj.weight              copy  always
final_norm  weight      model.norm.weight                                  copy  always
lm_head     weight      lm_head.weight                                     copy  untied
"""


def _qk_norm(f):
    p = []
    if any(a.attrs["qk_norm"] != "rmsnorm" for a in f.attns):
        p.append(f"a LayerNorm q/k norm cannot be expressed by the {f.name}: its q_norm / k_norm are RMSNorm")
    eps = {a.attrs["qk_norm_eps"] for a in f.attns} | {n.attrs["eps"] for n in f.norms}
    if len(eps) > 1:
        p.append(f"q/k norm eps {sorted({a.attrs['qk_norm_eps'] for a in f.attns})} differ from the layer norms' "
                 f"eps: the {f.name} uses rms_norm_eps for both")
    return p


def _mlp_bias(f):
    if f.has(f.mlps, MLP_BIAS):
        return f"MLP biases cannot be expressed by the {f.name}"


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(attention_bias=flags["attn_bias"], use_sliding_window=False, sliding_window=None,
               max_window_layers=f.config.num_layers)
    return cfg


def _flags(f, base: dict) -> dict:
    # attention_bias is one switch for q/k/v/o: on when any is present (the absent ones are written as zeros)
    return base | {"attn_bias": f.has(f.attns, ("q_bias", "k_bias", "v_bias", "proj_bias")), "mlp_bias": False}


family("qwen3", "Qwen3ForCausalLM", rows=ROWS,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and not f.moes
                            and any(a.attrs["qk_norm"] != "none" for a in f.attns)),
       rules=[rule("a LayerNorm q/k norm; a q/k norm eps other than rms_norm_eps")(_qk_norm),
              rule("MLP biases")(_mlp_bias), *LLAMA_LIKE, ONE_MLP_SIZE],
       config=config, flags=_flags)

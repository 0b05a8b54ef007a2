"""StableLmForCausalLM (NeMo GPT-Next): LayerNorm, rotary (partial allowed), SwiGLU, q/k/v bias only."""

from __future__ import annotations

from .common import (HIDDEN_ACT, MLP_BIAS, ONE_MLP_SIZE, QKV_BIAS, ROTARY_ONLY, decoder_rows, family,
                     head_dim_from_hidden, mlp_form, no_qk_norm, odd_rotary, rotary_config, rule)

ROWS = decoder_rows(norm_bias=True, qkv_bias="attn_bias")


def _biases(f):
    p = []
    if f.has(f.mlps, MLP_BIAS):
        p.append(f"MLP biases cannot be expressed by the {f.name}")
    if f.has(f.attns, ("proj_bias",)):
        p.append(f"an attention output bias cannot be expressed by the {f.name} (use_qkv_bias covers q/k/v only)")
    return p


def config(f, flags) -> dict:
    cfg = rotary_config(f)
    cfg.update(intermediate_size=f.mlps[0].params["fc2"].type.shape[1], num_key_value_heads=f.a0["num_kv_heads"],
               hidden_act=HIDDEN_ACT[f.mlps[0].attrs["activation"]], layer_norm_eps=f.norms[0].attrs["eps"],
               use_qkv_bias=flags["attn_bias"], qk_layernorm=False, use_parallel_residual=False, hidden_dropout=0.0)
    return cfg


family("stablelm", "StableLmForCausalLM", rows=ROWS,
       signature=lambda f: f.kinds == {"layernorm"} and f.positions == {"rope"} and f.gated == {True},
       rules=[rule("q/k normalization")(no_qk_norm), ROTARY_ONLY, rule("an odd rotary dimension")(odd_rotary),
              rule("head_dim != hidden/heads")(head_dim_from_hidden),
              rule("an MLP other than SwiGLU")(mlp_form(True, "silu", " (SwiGLU only)")), ONE_MLP_SIZE,
              rule("MLP biases, an attention output bias")(_biases)],
       config=config, flags=lambda f, base: base | {"attn_bias": f.has(f.attns, QKV_BIAS)})

"""GemmaForCausalLM: RMSNorm computing with (1 + w) (the gamma stays zero-centered), embedding x sqrt(hidden),
GeGLU with the tanh GELU, full rotary."""

from __future__ import annotations

import math

from .common import (HIDDEN_ACT, MLP_BIAS, ONE_MLP_SIZE, ROTARY_ONLY, decoder_rows, family, full_rotary,
                     mlp_form, no_qk_norm, rotary_config, rule)

ROWS = decoder_rows(norm="zc", qkv_bias="attn_bias", proj_bias="attn_bias")


def _scale(f):
    H = f.config.hidden_size
    if not math.isclose(f.emb.attrs["scale"], math.sqrt(H), rel_tol=1e-6):
        return (f"embedding scale {f.emb.attrs['scale']:g} cannot be expressed by the {f.name}: it multiplies by "
                f"sqrt(hidden_size) = {math.sqrt(H):g}")


def config(f, flags) -> dict:
    cfg, a, act = rotary_config(f), f.a0, HIDDEN_ACT[f.mlps[0].attrs["activation"]]
    cfg.update(intermediate_size=f.mlps[0].params["fc2"].type.shape[1], num_key_value_heads=a["num_kv_heads"],
               head_dim=a["head_dim"], hidden_act=act, hidden_activation=act, rms_norm_eps=f.norms[0].attrs["eps"],
               attention_bias=flags["attn_bias"])
    return cfg


family("gemma", "GemmaForCausalLM", rows=ROWS, zero_centered=True,
       signature=lambda f: (f.emb.attrs["scale"] != 1.0 and f.kinds == {"rmsnorm"} and f.gated == {True}
                            and f.acts <= {"gelu", "gelu-tanh"}),
       rules=[rule("q/k normalization")(no_qk_norm), ROTARY_ONLY, rule("partial rotary")(full_rotary),
              rule("an MLP other than GeGLU with the tanh GELU")(mlp_form(
                  True, "gelu-tanh", ": transformers' Gemma always uses the tanh GELU (it rewrites "
                  "hidden_act='gelu' to gelu_pytorch_tanh); Megatron's Gemma uses openai_gelu (tanh)")),
              ONE_MLP_SIZE,
              rule("MLP biases")(lambda f: f"MLP biases cannot be expressed by the {f.name}"
                                 if f.has(f.mlps, MLP_BIAS) else None),
              rule("an embedding scale other than sqrt(hidden)")(_scale)], config=config,
       before=("qwen3", "qwen2", "llama"))

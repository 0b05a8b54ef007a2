"""GemmaForCausalLM: RMSNorm computing with (1 + w) (the gamma stays zero-centered), embedding x sqrt(hidden),
GeGLU with the tanh GELU, full rotary.

An exact (erf) GeGLU is written as ``hidden_act: gelu_python`` and ``hidden_activation: gelu``: transformers' Gemma
(4.42+, 5.x: ``GemmaMLP.act_fn = ACT2FN[config.hidden_act]``) rewrites ``hidden_act: gelu`` to the tanh GELU in
``GemmaConfig``, but ``gelu_python`` is ``GELUActivation(use_gelu_python=True)``, the erf formula, kept as is;
transformers 4.38-4.41 and vLLM's Gemma read ``hidden_activation``, where ``gelu`` is the exact GELU.
"""

from __future__ import annotations

import math

from .common import (MLP_BIAS, ONE_MLP_SIZE, ROTARY_ONLY, decoder_rows, family, full_rotary, no_qk_norm,
                     rotary_config, rule)

ROWS = decoder_rows(norm="zc", qkv_bias="attn_bias", proj_bias="attn_bias")


def _scale(f):
    H = f.config.hidden_size
    if not math.isclose(f.emb.attrs["scale"], math.sqrt(H), rel_tol=1e-6):
        return (f"embedding scale {f.emb.attrs['scale']:g} cannot be expressed by the {f.name}: it multiplies by "
                f"sqrt(hidden_size) = {math.sqrt(H):g}")


_EXACT = {"gelu-tanh": ("gelu_pytorch_tanh", "gelu_pytorch_tanh"), "gelu": ("gelu_python", "gelu")}


def _geglu(f):
    acts = {m.attrs["activation"] for m in f.mlps}
    if any(not m.attrs["gated"] for m in f.mlps) or not acts <= set(_EXACT):
        return (f"an MLP other than GeGLU cannot be expressed by the {f.name} (activations {sorted(acts)}, gated "
                f"{sorted({m.attrs['gated'] for m in f.mlps})})")
    if len(acts) > 1:
        return f"layers with tanh and erf GELU cannot be expressed by the {f.name}: hidden_act is one per model"


def config(f, flags) -> dict:
    cfg, a = rotary_config(f), f.a0
    act, activation = _EXACT[f.mlps[0].attrs["activation"]]
    cfg.update(intermediate_size=f.mlps[0].params["fc2"].type.shape[1], num_key_value_heads=a["num_kv_heads"],
               head_dim=a["head_dim"], hidden_act=act, hidden_activation=activation,
               rms_norm_eps=f.norms[0].attrs["eps"],
               attention_bias=flags["attn_bias"])
    return cfg


family("gemma", "GemmaForCausalLM", rows=ROWS, zero_centered=True,
       signature=lambda f: (f.emb.attrs["scale"] != 1.0 and f.kinds == {"rmsnorm"} and f.gated == {True}
                            and f.acts <= {"gelu", "gelu-tanh"}),
       rules=[rule("q/k normalization")(no_qk_norm), ROTARY_ONLY, rule("partial rotary")(full_rotary),
              rule("an MLP other than GeGLU (tanh or erf GELU, one per model)")(_geglu),
              ONE_MLP_SIZE,
              rule("MLP biases")(lambda f: f"MLP biases cannot be expressed by the {f.name}"
                                 if f.has(f.mlps, MLP_BIAS) else None),
              rule("an embedding scale other than sqrt(hidden)")(_scale)], config=config,
       before=("qwen3", "qwen2", "llama"))

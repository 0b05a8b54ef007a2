"""GraniteForCausalLM: Llama with a softmax scale of its own (``attention_multiplier``), the other multipliers
at 1.

transformers' ``models/granite/modular_granite.py`` derives every module from Llama's and changes four things:
``GraniteAttention.scaling = config.attention_multiplier`` (Llama: ``head_dim ** -0.5``), the decoder layer's
``residual_multiplier`` on both branches, ``embedding_multiplier`` on the input embeddings and logits divided by
``logits_scaling``. With the last three written as 1 the class is Llama with Megatron's ``softmax_scale``
(megatron-core ``DotProductAttention.softmax_scale``), which is what mexc emits it for.
"""

from __future__ import annotations

from .common import LLAMA_LIKE, ONE_MLP_SIZE, decoder_rows, family, llama_config, no_qk_norm, rule

ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", mlp_bias="mlp_bias")


def _scaled(f) -> bool:
    return any(a.attrs["softmax_scale"] is not None for a in f.attns)


def _one_scale(f):
    scales = {a.attrs["softmax_scale"] for a in f.attns}
    if len(scales) > 1:
        return (f"layers with different softmax scales {sorted(scales, key=str)} cannot be expressed by the "
                f"{f.name}: attention_multiplier is one per model")


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(attention_bias=flags["attn_bias"], mlp_bias=flags["mlp_bias"],
               attention_multiplier=float(f.a0["softmax_scale"]), embedding_multiplier=1.0,
               residual_multiplier=1.0, logits_scaling=1.0)
    return cfg


cls = family("granite", "GraniteForCausalLM", rows=ROWS,
             signature=lambda f: f.kinds == {"rmsnorm"} and f.positions == {"rope"} and _scaled(f),
             rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE,
                    rule("softmax scales that differ across layers")(_one_scale)],
             config=config, before=("llama",))
cls.extra["any_softmax_scale"] = True   # the shared softmax-scale rule (common._attention_forms) lets it through

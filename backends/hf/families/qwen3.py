"""Qwen3ForCausalLM (dense): Llama with a per-head RMSNorm of q and k before rotary (Megatron's
``qk_layernorm``; transformers' ``Qwen3Attention.q_norm`` / ``k_norm`` at ``rms_norm_eps``), ``attention_bias``
for q/k/v/o all or none, no MLP bias, explicit ``head_dim``."""

from __future__ import annotations

from .common import LLAMA_LIKE, MLP_BIAS, ONE_MLP_SIZE, decoder_rows, family, llama_config, rule

ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", qk_norm=True)


def _qk_norm(f):
    p = []
    if any(a.attrs["qk_norm"] not in ("rmsnorm", "l2") for a in f.attns):   # l2: the common rule's line
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
       config=config, flags=_flags, before=("qwen2", "llama"))

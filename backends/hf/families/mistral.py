"""MistralForCausalLM: Llama without biases, every layer attending through one sliding window.

Megatron's ``window_size=(L, 0)`` lets query i see keys i-L..i (megatron-core
``get_sliding_window_causal_mask``, the IR's ``attention.window = L``); transformers' ``sliding_window`` counts
the query itself (``sliding_window_overlay``: ``kv_idx > q_idx - sliding_window``, masking_utils.py), so the
config says ``sliding_window = L + 1``. ``MistralModel`` builds one sliding-window mask for every layer
(modeling_mistral.py); models whose layers alternate between windowed and full attention are
MinistralForCausalLM's (``layer_types``)."""

from __future__ import annotations

from .common import (ATTN_BIAS, LLAMA_LIKE, MLP_BIAS, ONE_MLP_SIZE, QKV_BIAS, decoder_rows, family, llama_config,
                     no_qk_norm, rule, windowed)

ROWS = decoder_rows()


def hf_window(f) -> int:
    """transformers' ``sliding_window`` (= the IR's window + 1: the query counts)."""
    return windowed(f)[0].attrs["window"] + 1


def one_window(f):
    """Rule body: one window size for every windowed layer, no biases (Mistral / Ministral have none)."""
    p = []
    sizes = sorted({a.attrs["window"] for a in windowed(f)})
    if len(sizes) > 1:
        p.append(f"layers with different sliding windows {sizes} cannot be expressed by the {f.name}: its config "
                 "has one sliding_window")
    if f.has(f.attns, ATTN_BIAS) or f.has(f.mlps, MLP_BIAS):
        p.append(f"attention or MLP biases cannot be expressed by the {f.name}: its linear layers have none")
    return p


def plain_attention(f) -> bool:
    """No q/k norm and no q/k/v bias: those windowed models stay with Qwen3 / Qwen2, whose refusal names the
    window (mexc does not write their sliding-window fields yet)."""
    return not f.has(f.attns, QKV_BIAS) and all(a.attrs["qk_norm"] == "none" for a in f.attns)


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(sliding_window=hf_window(f))
    return cfg


family("mistral", "MistralForCausalLM", rows=ROWS, windows=True,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and plain_attention(f)
                            and bool(f.attns) and len(windowed(f)) == len(f.attns)),
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE,
              rule("differing windows; biases")(one_window)],
       config=config, before=("llama",))

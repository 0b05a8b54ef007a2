"""Qwen2ForCausalLM: like Llama, with q/k/v biases only (no o_proj / MLP bias)."""

from __future__ import annotations

from .common import (LLAMA_LIKE, MLP_BIAS, ONE_MLP_SIZE, QKV_BIAS, decoder_rows, family, llama_config,
                     no_qk_norm, rule)

ROWS = decoder_rows(qkv_bias="always")


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=f.config.num_layers)
    return cfg


family("qwen2", "Qwen2ForCausalLM", rows=ROWS,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and f.has(f.attns, QKV_BIAS)
                            and not f.has(f.attns, ("proj_bias",)) and not f.has(f.mlps, MLP_BIAS)),
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE], config=config,
       before=("llama",))

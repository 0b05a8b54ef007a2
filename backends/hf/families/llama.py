"""LlamaForCausalLM: RMSNorm, rotary, gated MLP; ``attention_bias`` / ``mlp_bias`` when the model has them."""

from __future__ import annotations

from .common import LLAMA_LIKE, ONE_MLP_SIZE, decoder_rows, family, llama_config, no_qk_norm, rule

ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", mlp_bias="mlp_bias")


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(attention_bias=flags["attn_bias"], mlp_bias=flags["mlp_bias"], pretraining_tp=1)
    return cfg


family("llama", "LlamaForCausalLM", rows=ROWS,
       signature=lambda f: f.kinds == {"rmsnorm"} and f.positions == {"rope"},
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE], config=config)

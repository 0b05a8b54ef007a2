"""NemotronForCausalLM: LayerNorm1p (computes with 1 + w: the gamma stays zero-centered), rotary (partial
allowed), plain MLP (squared-relu)."""

from __future__ import annotations

from .common import (HIDDEN_ACT, ONE_MLP_SIZE, ROTARY_ONLY, decoder_rows, family, mlp_form, no_qk_norm,
                     rotary_config, rule)

ROWS = decoder_rows(norm="zc", norm_bias=True, qkv_bias="attn_bias", proj_bias="attn_bias", mlp="plain",
                    mlp_bias="mlp_bias")


def config(f, flags) -> dict:
    cfg, a = rotary_config(f), f.a0
    cfg.update(intermediate_size=f.mlps[0].params["fc2"].type.shape[1], num_key_value_heads=a["num_kv_heads"],
               head_dim=a["head_dim"], hidden_act=HIDDEN_ACT[f.mlps[0].attrs["activation"]],
               norm_eps=f.norms[0].attrs["eps"], attention_bias=flags["attn_bias"], mlp_bias=flags["mlp_bias"])
    return cfg


family("nemotron", "NemotronForCausalLM", rows=ROWS, zero_centered=True,
       signature=lambda f: f.kinds == {"layernorm"} and f.positions == {"rope"} and f.gated != {True},
       rules=[rule("q/k normalization")(no_qk_norm), ROTARY_ONLY, rule("a gated MLP")(mlp_form(False, None)),
              ONE_MLP_SIZE], config=config)

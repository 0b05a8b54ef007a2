"""FalconForCausalLM: parallel attention + MLP off one LayerNorm (``falcon``), or off two (``falcon2``: ln_attn +
ln_mlp, Falcon's new decoder architecture); rotary, the fused grouped QKV, biases all or none."""

from __future__ import annotations

from .common import (ATTN_BIAS, HIDDEN_ACT, MLP_BIAS, ONE_MLP_SIZE, ROTARY_ONLY, falcon_block, family,
                     full_rotary, head_dim_from_hidden, mlp_form, no_qk_norm, parallel_layers, rotary_config,
                     rule)

_SHARED = """
attention   qkv         transformer.h.{L}.self_attention.query_key_value.weight   copy  always
attention   qkv_bias    transformer.h.{L}.self_attention.query_key_value.bias     copy  attn_bias
attention   proj        transformer.h.{L}.self_attention.dense.weight             copy  always
attention   proj_bias   transformer.h.{L}.self_attention.dense.bias               copy  attn_bias
mlp         fc1         transformer.h.{L}.mlp.dense_h_to_4h.weight                copy  always
mlp         fc1_bias    transformer.h.{L}.mlp.dense_h_to_4h.bias                  copy  mlp_bias
mlp         fc2         transformer.h.{L}.mlp.dense_4h_to_h.weight                copy  always
mlp         fc2_bias    transformer.h.{L}.mlp.dense_4h_to_h.bias                  copy  mlp_bias
final_norm  weight      transformer.ln_f.weight                                   copy  always
final_norm  bias        transformer.ln_f.bias                                     copy  always
lm_head     weight      lm_head.weight                                            copy  untied
embedding   word        transformer.word_embeddings.weight                        copy  always
"""
ROWS_ONE = _SHARED + """
input_norm  weight      transformer.h.{L}.input_layernorm.weight                  copy  always
input_norm  bias        transformer.h.{L}.input_layernorm.bias                    copy  always
"""
ROWS_TWO = _SHARED + """
input_norm  weight      transformer.h.{L}.ln_attn.weight                          copy  always
input_norm  bias        transformer.h.{L}.ln_attn.bias                            copy  always
post_norm   weight      transformer.h.{L}.ln_mlp.weight                           copy  always
post_norm   bias        transformer.h.{L}.ln_mlp.bias                             copy  always
"""


def _blocks(f):
    layers = sorted({x.layer for x in f.attns})
    blocks = [falcon_block(f.model, layer) for layer in layers]
    if any(b is None for b in blocks):
        return (f"layer {layers[blocks.index(None)]} is not a parallel attention+MLP block; the {f.name} has one "
                "block kind per model")
    if len(set(blocks)) > 1:
        return f"layers mix one-norm and two-norm parallel blocks; the {f.name} has one per model"


def config(f, flags) -> dict:
    cfg, a = rotary_config(f), f.a0
    nh, nkv = a["num_heads"], a["num_kv_heads"]
    two = f.cls.name == "falcon2"
    new_arch = two or nkv not in (1, nh)
    cfg.update(ffn_hidden_size=f.mlps[0].params["fc2"].type.shape[1],
               activation=HIDDEN_ACT[f.mlps[0].attrs["activation"]], layer_norm_epsilon=f.norms[0].attrs["eps"],
               num_kv_heads=nkv, alibi=False, parallel_attn=True, bias=flags["attn_bias"],
               new_decoder_architecture=new_arch, multi_query=nkv == 1 and not new_arch,
               num_ln_in_parallel_attn=(2 if two else 1) if new_arch else None, hidden_dropout=0.0)
    if nh == 1:   # one head: MQA and MHA coincide
        cfg["multi_query"] = False
    return cfg


def _flags(f, base: dict) -> dict:
    on = f.has(f.attns, ATTN_BIAS) or f.has(f.mlps, MLP_BIAS)   # one `bias` switch for every linear
    return base | {"attn_bias": on, "mlp_bias": on}


RULES = [rule("q/k normalization")(no_qk_norm), ROTARY_ONLY, rule("partial rotary")(full_rotary),
         rule("head_dim != hidden/heads")(head_dim_from_hidden), rule("a gated MLP")(mlp_form(False, None)),
         ONE_MLP_SIZE, rule("sequential blocks; a mix of one-norm and two-norm blocks")(_blocks)]


def _parallel(f, norms: str) -> bool:
    return (bool(parallel_layers(f)) and f.kinds == {"layernorm"} and f.positions == {"rope"}
            and (falcon_block(f.model) == "two-norm") == (norms == "two-norm"))


family("falcon", "FalconForCausalLM", rows=ROWS_ONE, fused_qkv=True, signature=lambda f: _parallel(f, "one-norm"),
       rules=RULES, config=config, flags=_flags, before=("stablelm", "nemotron"))
family("falcon2", "FalconForCausalLM", model_type="falcon", rows=ROWS_TWO, fused_qkv=True,
       signature=lambda f: _parallel(f, "two-norm"), rules=RULES, config=config, flags=_flags,
       before=("stablelm", "nemotron"))

"""LlamaForCausalLM: RMSNorm, rotary, gated MLP; ``attention_bias`` / ``mlp_bias`` when the model has them."""

from __future__ import annotations

from .common import LLAMA_LIKE, ONE_MLP_SIZE, family, llama_config, no_qk_norm, rule

ROWS = """
embedding   word        model.embed_tokens.weight                          copy  always
input_norm  weight      model.layers.{L}.input_layernorm.weight            copy  always
attention   q           model.layers.{L}.self_attn.q_proj.weight           copy  always
attention   k           model.layers.{L}.self_attn.k_proj.weight           copy  always
attention   v           model.layers.{L}.self_attn.v_proj.weight           copy  always
attention   q_bias      model.layers.{L}.self_attn.q_proj.bias             copy  attn_bias
attention   k_bias      model.layers.{L}.self_attn.k_proj.bias             copy  attn_bias
attention   v_bias      model.layers.{L}.self_attn.v_proj.bias             copy  attn_bias
attention   proj        model.layers.{L}.self_attn.o_proj.weight           copy  always
attention   proj_bias   model.layers.{L}.self_attn.o_proj.bias             copy  attn_bias
post_norm   weight      model.layers.{L}.post_attention_layernorm.weight   copy  always
mlp         gate        model.layers.{L}.mlp.gate_proj.weight              copy  always
mlp         up          model.layers.{L}.mlp.up_proj.weight                copy  always
mlp         fc2         model.layers.{L}.mlp.down_proj.weight              copy  always
mlp         gate_bias   model.layers.{L}.mlp.gate_proj.bias                copy  mlp_bias
mlp         up_bias     model.layers.{L}.mlp.up_proj.bias                  copy  mlp_bias
mlp         fc2_bias    model.layers.{L}.mlp.down_proj.bias                copy  mlp_bias
final_norm  weight      model.norm.weight                                  copy  always
lm_head     weight      lm_head.weight                                     copy  untied
"""


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(attention_bias=flags["attn_bias"], mlp_bias=flags["mlp_bias"], pretraining_tp=1)
    return cfg


family("llama", "LlamaForCausalLM", rows=ROWS,
       signature=lambda f: f.kinds == {"rmsnorm"} and f.positions == {"rope"},
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE], config=config)

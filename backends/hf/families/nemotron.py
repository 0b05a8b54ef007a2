"""NemotronForCausalLM: LayerNorm1p (computes with 1 + w: the gamma stays zero-centered), rotary (partial
allowed), plain MLP (squared-relu)."""

from __future__ import annotations

from .common import HIDDEN_ACT, ONE_MLP_SIZE, ROTARY_ONLY, family, mlp_form, no_qk_norm, rotary_config, rule

ROWS = """
embedding   word        model.embed_tokens.weight                          copy  always
input_norm  weight      model.layers.{L}.input_layernorm.weight            zc    always
input_norm  bias        model.layers.{L}.input_layernorm.bias              copy  always
attention   q           model.layers.{L}.self_attn.q_proj.weight           copy  always
attention   k           model.layers.{L}.self_attn.k_proj.weight           copy  always
attention   v           model.layers.{L}.self_attn.v_proj.weight           copy  always
attention   q_bias      model.layers.{L}.self_attn.q_proj.bias             copy  attn_bias
attention   k_bias      model.layers.{L}.self_attn.k_proj.bias             copy  attn_bias
attention   v_bias      model.layers.{L}.self_attn.v_proj.bias             copy  attn_bias
attention   proj        model.layers.{L}.self_attn.o_proj.weight           copy  always
attention   proj_bias   model.layers.{L}.self_attn.o_proj.bias             copy  attn_bias
post_norm   weight      model.layers.{L}.post_attention_layernorm.weight   zc    always
post_norm   bias        model.layers.{L}.post_attention_layernorm.bias     copy  always
mlp         fc1         model.layers.{L}.mlp.up_proj.weight                copy  always
mlp         fc1_bias    model.layers.{L}.mlp.up_proj.bias                  copy  mlp_bias
mlp         fc2         model.layers.{L}.mlp.down_proj.weight              copy  always
mlp         fc2_bias    model.layers.{L}.mlp.down_proj.bias                copy  mlp_bias
final_norm  weight      model.norm.weight                                  zc    always
final_norm  bias        model.norm.bias                                    copy  always
lm_head     weight      lm_head.weight                                     copy  untied
"""


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

"""Qwen2ForCausalLM: like Llama, with q/k/v biases only (no o_proj / MLP bias)."""

from __future__ import annotations

from .common import LLAMA_LIKE, MLP_BIAS, ONE_MLP_SIZE, QKV_BIAS, family, llama_config, no_qk_norm, rule

ROWS = """
embedding   word        model.embed_tokens.weight                          copy  always
input_norm  weight      model.layers.{L}.input_layernorm.weight            copy  always
attention   q           model.layers.{L}.self_attn.q_proj.weight           copy  always
attention   k           model.layers.{L}.self_attn.k_proj.weight           copy  always
attention   v           model.layers.{L}.self_attn.v_proj.weight           copy  always
attention   q_bias      model.layers.{L}.self_attn.q_proj.bias             copy  always
attention   k_bias      model.layers.{L}.self_attn.k_proj.bias             copy  always
attention   v_bias      model.layers.{L}.self_attn.v_proj.bias             copy  always
attention   proj        model.layers.{L}.self_attn.o_proj.weight           copy  always
post_norm   weight      model.layers.{L}.post_attention_layernorm.weight   copy  always
mlp         gate        model.layers.{L}.mlp.gate_proj.weight              copy  always
mlp         up          model.layers.{L}.mlp.up_proj.weight                copy  always
mlp         fc2         model.layers.{L}.mlp.down_proj.weight              copy  always
final_norm  weight      model.norm.weight                                  copy  always
lm_head     weight      lm_head.weight                                     copy  untied
"""


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=f.config.num_layers)
    return cfg


family("qwen2", "Qwen2ForCausalLM", rows=ROWS,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and f.has(f.attns, QKV_BIAS)
                            and not f.has(f.attns, ("proj_bias",)) and not f.has(f.mlps, MLP_BIAS)),
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE], config=config)

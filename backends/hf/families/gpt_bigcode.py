"""GPTBigCodeForCausalLM: GPT-2 with multi-query attention (StarCoder) and ``nn.Linear`` weights."""

from __future__ import annotations

from .common import family
from .gpt2 import GPT_RULES, config as gpt2_config

ROWS = """
embedding   word                  transformer.wte.weight                 copy  always
embedding   position              transformer.wpe.weight                 copy  always
input_norm  weight                transformer.h.{L}.ln_1.weight          copy  always
input_norm  bias                  transformer.h.{L}.ln_1.bias            copy  always
attention   q+k+v                 transformer.h.{L}.attn.c_attn.weight   copy  always
attention   q_bias+k_bias+v_bias  transformer.h.{L}.attn.c_attn.bias     copy  always
attention   proj                  transformer.h.{L}.attn.c_proj.weight   copy  always
attention   proj_bias             transformer.h.{L}.attn.c_proj.bias     copy  always
post_norm   weight                transformer.h.{L}.ln_2.weight          copy  always
post_norm   bias                  transformer.h.{L}.ln_2.bias            copy  always
mlp         fc1                   transformer.h.{L}.mlp.c_fc.weight      copy  always
mlp         fc1_bias              transformer.h.{L}.mlp.c_fc.bias        copy  always
mlp         fc2                   transformer.h.{L}.mlp.c_proj.weight    copy  always
mlp         fc2_bias              transformer.h.{L}.mlp.c_proj.bias      copy  always
final_norm  weight                transformer.ln_f.weight                copy  always
final_norm  bias                  transformer.ln_f.bias                  copy  always
lm_head     weight                lm_head.weight                         copy  untied
"""


def config(f, flags) -> dict:
    return gpt2_config(f, flags) | {"multi_query": True}


family("gpt_bigcode", "GPTBigCodeForCausalLM", rows=ROWS,
       signature=lambda f: (f.kinds == {"layernorm"} and f.positions == {"none"}
                            and f.a0["num_kv_heads"] == 1 < f.a0["num_heads"]),
       rules=GPT_RULES, config=config)

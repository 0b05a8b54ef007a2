"""GPTBigCodeForCausalLM: GPT-2 with multi-query attention (StarCoder) and ``nn.Linear`` weights."""

from __future__ import annotations

from .common import family
from .gpt2 import GPT_RULES
from .gpt2 import ROWS as GPT2_ROWS
from .gpt2 import config as gpt2_config

ROWS = GPT2_ROWS.replace(" conv1d ", " copy   ")   # nn.Linear weights: no transpose


def config(f, flags) -> dict:
    return gpt2_config(f, flags) | {"multi_query": True}


family("gpt_bigcode", "GPTBigCodeForCausalLM", rows=ROWS,
       signature=lambda f: (f.kinds == {"layernorm"} and f.positions == {"none"}
                            and f.a0["num_kv_heads"] == 1 < f.a0["num_heads"]),
       rules=GPT_RULES, config=config)

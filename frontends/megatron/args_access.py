"""Reading one architecture field from a checkpoint's saved args under any of its Megatron names (newest first),
as the argument table (:mod:`.arguments`) declares them."""

from __future__ import annotations

from typing import Any

from .arguments import arg_aliases

# field -> arg names to try, in order (newest first): derived from the argument table, which also says how
# mexc treats every argument it does not read (docs/arguments.md)
ARG_ALIASES: dict[str, tuple[str, ...]] = arg_aliases()


def _get(args: Any, field: str, default=None):
    for name in ARG_ALIASES[field]:
        v = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
        if v is not None:
            return v
    return default


# saved arg names whose architecture field has another name (the rest keep theirs)
_FIELD_OF_ARG = {"num_attention_heads": "num_heads", "num_query_groups": "num_kv_heads", "kv_channels": "head_dim",
                 "seq_length": "max_position_embeddings", "moe_router_topk": "moe_topk",
                 "qk_pos_emb_head_dim": "qk_rope_dim", "params_dtype": "dtype"}

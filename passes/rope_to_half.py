"""rope-to-half: turn interleaved (GPT-J) rotary into rotate-half (NeoX / HF Llama) rotary by permuting rows.

Interleaved rope rotates channel pairs ``(2i, 2i+1)`` of each head by frequency ``i``; rotate-half rotates
``(i, i + r/2)`` (``r`` = rotary dims; Megatron's ``_rotate_half`` and ``RotaryEmbedding`` for both). Moving
channel ``2i`` to ``i`` and ``2i+1`` to ``i + r/2`` in every query and key head (the rows of the Q and K
projections, their biases and the q/k norm weights) turns one into the other, and attention scores are
unchanged because queries and keys are permuted alike (V rows and the output projection are untouched). It is
exact, and it is what TensorRT-LLM's converter does for interleaved checkpoints; afterwards the model needs
only the rotate-half rope every target has. Lazy: a ``rope_to_half`` row-permutation recipe; nothing is read here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import IRError
from ..ir import Model, derive
from ..ir.tensors import recipe_op
from .infra import Pass, PassResult, register_pass


def head_perm(head_dim: int, rotary_dim: int) -> list[int]:
    """New row i of a head takes old row perm[i]: evens, then odds of the rotary part; the rest stays."""
    return [*range(0, rotary_dim, 2), *range(1, rotary_dim, 2), *range(rotary_dim, head_dim)]


def row_perm(rows: int, head_dim: int, rotary_dim: int, kind: str = "", q: int = 0,
             kv: int = 0) -> torch.Tensor:
    """Row permutation of a Q/K(/V) tensor: ``head_perm`` on every Q and K head, identity on V heads.

    ``kind`` is the QKV layout of a fused tensor (grouped: per group its q heads, k, v; concat: Q, K, V, with
    ``q`` / ``kv`` heads); "" means whole heads of ``head_dim`` rows, all rotated (q, k, their biases,
    norms)."""
    hp = torch.tensor(head_perm(head_dim, rotary_dim))
    if kind == "grouped":
        kinds = (["qk"] * (q // kv + 1) + ["v"]) * kv
    elif kind == "concat":
        kinds = ["qk"] * (q + kv) + ["v"] * kv
    else:
        kinds = ["qk"] * (rows // head_dim)
    if len(kinds) * head_dim != rows:
        raise ValueError(f"rope_to_half: {rows} rows are not the {len(kinds)} heads of {head_dim} the "
                         "layout says")
    same = torch.arange(head_dim)
    return torch.cat([b * head_dim + (hp if k == "qk" else same) for b, k in enumerate(kinds)])


@recipe_op("rope_to_half", "per-head Q/K row permutation from interleaved to rotate-half rotary order")
def _rope_to_half():
    def infer(types, head_dim, rotary_dim, kind, q, kv):
        (t,) = types
        lay = t.layout
        if (kind or None) != (lay.kind if lay else None) or (lay and (lay.q_heads, lay.kv_heads) != (q, kv)):
            raise IRError(f"rope_to_half(kind={kind!r}, q={q}, kv={kv}) does not match the layout of {t}")
        row_perm(t.shape[0] if t.shape else 0, head_dim, rotary_dim, kind, q, kv)  # raises on a bad shape
        return t

    def compute(xs, head_dim, rotary_dim, kind, q, kv):
        return xs[0].index_select(0, row_perm(xs[0].shape[0], head_dim, rotary_dim, kind, q, kv))

    return infer, compute


_ROTATED = ("qkv", "qkv_bias", "q", "k", "q_bias", "k_bias", "q_norm", "k_norm")


@register_pass("rope-to-half")
@dataclass
class RopeToHalf(Pass):
    """Rewrite interleaved (GPT-J) rotary as rotate-half by permuting Q/K rows per head (exact; lazy)."""

    def run(self, model: Model) -> PassResult:
        n = 0
        for node in model.graph.find("attention"):
            rope = node.attrs["rope"]
            if node.attrs["position"] != "rope" or not rope.interleaved:
                continue
            d = node.attrs["head_dim"]
            rd = rope.rotary_dim(d)
            for name in _ROTATED:
                lay = node.params[name].type.layout if name in node.params else None
                for pname in (name, name + "_scale"):   # a quantized weight's row scales move with its rows
                    p = node.params.get(pname)
                    if p is not None:
                        p.source = derive("rope_to_half", p.source, head_dim=d, rotary_dim=rd,
                                          kind=lay.kind if lay else "", q=lay.q_heads if lay else 0,
                                          kv=lay.kv_heads if lay else 0)
            node.attrs["rope"] = dataclasses.replace(rope, interleaved=False)
            n += 1
        return PassResult(n > 0, {"rewritten": n})

    def ensures(self, model: Model) -> list[str]:
        return [f"{n.location}: rope is still interleaved" for n in model.graph.find("attention")
                if n.attrs["position"] == "rope" and n.attrs["rope"].interleaved]


def has_interleaved_rope(model: Model) -> bool:
    """True when some attention uses interleaved rotary (backends then add rope-to-half)."""
    return any(n.attrs["position"] == "rope" and n.attrs["rope"].interleaved
               for n in model.graph.find("attention"))


__all__ = ["RopeToHalf", "head_perm", "row_perm", "has_interleaved_rope"]

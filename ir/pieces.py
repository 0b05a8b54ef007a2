"""Pieces: a tensor as views stacked on dim 0 (and :class:`ColumnCat` side by side), so a writer copies
re-arranged rows (TP merges and splits, QKV re-layouts, slices) straight into its output buffer.

``_PART_RULES`` gives, per recipe op, the pieces of its result from its input's pieces (duck-typed on the
recipe: ``inputs``, ``attrs``, ``type``, ``materialize_parts``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .types import QKVLayout


class ColumnCat:
    """Tensors side by side along ``axis`` (> 0), not yet copied: row-parallel TP shards merged for a writer,
    which copies rows of it straight into its output buffer (:func:`copy_piece`). Quacks like the tensor it
    stands for where a writer needs it: ``shape``, ``dtype``, ``dim()``, ``numel()``, ``narrow``,
    ``contiguous``."""

    __slots__ = ("parts", "axis", "shape", "dtype")

    def __init__(self, parts, axis: int):
        self.parts = list(parts)
        self.axis = axis
        shape = list(self.parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in self.parts)
        self.shape = torch.Size(shape)
        self.dtype = self.parts[0].dtype

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def narrow(self, dim: int, start: int, length: int):
        if dim != self.axis:
            return ColumnCat([p.narrow(dim, start, length) for p in self.parts], self.axis)
        out, off = [], 0
        for p in self.parts:
            w = p.shape[dim]
            lo, hi = max(start, off), min(start + length, off + w)
            if lo < hi:
                out.append(p.narrow(dim, lo - off, hi - lo))
            off += w
        if not out:
            return self.parts[0].narrow(dim, 0, 0)
        return out[0] if len(out) == 1 else ColumnCat(out, self.axis)

    def select_row(self, i: int) -> list:
        """Row ``i`` (dim 0 dropped) as pieces stacked on the new dim 0."""
        rows = [p.select(0, i) if isinstance(p, torch.Tensor) else p.select_row(i) for p in self.parts]
        if self.axis == 1:  # side by side on dim 1 = one after another on the new dim 0
            return [q for r in rows for q in (r if isinstance(r, list) else [r])]
        return [ColumnCat([_one(r) if isinstance(r, list) else r for r in rows], self.axis - 1)]

    def copy_into(self, dst: torch.Tensor) -> torch.Tensor:
        off = 0
        for p in self.parts:
            w = p.shape[self.axis]
            copy_piece(dst.narrow(self.axis, off, w), p)
            off += w
        return dst

    def contiguous(self) -> torch.Tensor:
        return self.copy_into(torch.empty(self.shape, dtype=self.dtype))

    def __repr__(self) -> str:
        return f"ColumnCat({len(self.parts)} parts on dim {self.axis}, {self.dtype}{list(self.shape)})"


def copy_piece(dst: torch.Tensor, piece) -> None:
    """``dst[...] = piece`` for a tensor or a :class:`ColumnCat` of the same shape."""
    if isinstance(piece, ColumnCat):
        piece.copy_into(dst)
    else:
        dst.copy_(piece)


def take_rows(parts: list, ranges: list[tuple[int, int]]) -> list:
    """Views of rows ``[a, b)`` for each range, of a tensor given as pieces stacked on dim 0 (adjacent ranges
    are joined first, so a run of consecutive rows of one piece stays one view)."""
    runs: list[list[int]] = []
    for a, b in ranges:
        if a >= b:
            continue
        if runs and runs[-1][1] == a:
            runs[-1][1] = b
        else:
            runs.append([a, b])
    starts, off = [], 0
    for p in parts:
        starts.append(off)
        off += p.shape[0]
    out = []
    for a, b in runs:
        for p, s in zip(parts, starts):
            lo, hi = max(a, s), min(b, s + p.shape[0])
            if lo < hi:
                out.append(p.narrow(0, lo - s, hi - lo))
    return out


def _runs(rows) -> list[tuple[int, int]]:
    """Row indices -> ``[a, b)`` runs of consecutive rows, in order."""
    out: list[tuple[int, int]] = []
    for i in (int(x) for x in rows):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def _as_tensor(parts: list) -> torch.Tensor:
    """Pieces stacked on dim 0 as one tensor (a view when there is a single tensor piece)."""
    if len(parts) == 1 and isinstance(parts[0], torch.Tensor):
        return parts[0]
    return torch.cat([p.contiguous() for p in parts], 0)


def _one(parts: list):
    return parts[0] if len(parts) == 1 else torch.cat([p.contiguous() for p in parts], 0)


def _qkv_perm(layout: QKVLayout, to: str) -> torch.Tensor:
    """Row permutation (of head blocks) taking ``layout`` to ``to``: out[i] = in[perm[i]]."""
    q, kv, d = layout.q_heads, layout.kv_heads, layout.head_dim
    qpg = q // kv
    # block index of each role in the grouped layout
    grouped_q = [g * (qpg + 2) + j for g in range(kv) for j in range(qpg)]
    grouped_k = [g * (qpg + 2) + qpg for g in range(kv)]
    grouped_v = [g * (qpg + 2) + qpg + 1 for g in range(kv)]
    concat_blocks = grouped_q + grouped_k + grouped_v  # concat position -> grouped block
    if layout.kind == to:
        blocks = list(range(q + 2 * kv))
    elif layout.kind == "grouped" and to == "concat":
        blocks = concat_blocks
    else:  # concat -> grouped
        inv = [0] * len(concat_blocks)
        for pos, b in enumerate(concat_blocks):
            inv[b] = pos
        blocks = inv
    return torch.tensor([b * d + i for b in blocks for i in range(d)])


def _concat_parts(r, cache):
    d = r.attrs["dim"] % len(r.type.shape)
    if d == 0:
        return [part for i in r.inputs for part in i.materialize_parts(cache)]
    return [ColumnCat([_one(i.materialize_parts(cache)) for i in r.inputs], d)]


def _slice_parts(r, cache):
    x = r.inputs[0]
    d, start, stop = r.attrs["dim"] % len(x.type.shape), r.attrs["start"], r.attrs["stop"]
    parts = x.materialize_parts(cache)
    if d == 0:
        return take_rows(parts, [(start, stop)])
    return [p.narrow(d, start, stop - start) for p in parts]


def _regroup_parts(r, cache):
    perm = _qkv_perm(r.inputs[0].type.layout, r.attrs["to"])
    return take_rows(r.inputs[0].materialize_parts(cache), _runs(perm.tolist()))


def _shard_parts(r, cache):
    x = r.inputs[0]
    dim, parts_n, index = r.attrs["dim"], r.attrs["parts"], r.attrs["index"]
    parts = x.materialize_parts(cache)
    lay = x.type.layout
    d = dim % len(x.type.shape)
    if lay is not None and dim == 0 and lay.kind != "grouped":  # as the type rule: the raw dim decides
        hd, q, kv = lay.head_dim, lay.q_heads, lay.kv_heads
        qn = q // parts_n
        if kv >= parts_n:
            kn = kv // parts_n
            ks = q * hd + index * kn * hd
        else:  # fewer KV heads than ranks: rank r holds KV head r * kv // parts (replicated)
            kn, ks = 1, q * hd + (index * kv // parts_n) * hd
        return take_rows(parts, [(index * qn * hd, (index + 1) * qn * hd), (ks, ks + kn * hd),
                                 (ks + kv * hd, ks + kv * hd + kn * hd)])
    n = x.type.shape[d] // parts_n
    if d == 0:
        return take_rows(parts, [(index * n, (index + 1) * n)])
    return [p.narrow(d, index * n, n) for p in parts]


# ops whose result is a re-arrangement of their input's rows or columns: materialize_parts gives views
# (and materialize, for the ops whose kernel needs the input's QKV layout, one copy of those views)
_ROW_KERNELS = frozenset({"regroup_qkv", "shard"})
_PART_RULES: dict[str, Callable] = {
    "concat": _concat_parts,
    "slice": _slice_parts,
    "regroup_qkv": _regroup_parts,
    "shard": _shard_parts,
    "tag_qkv": lambda r, cache: r.inputs[0].materialize_parts(cache),
}

"""Lazy weights: recipes whose result type is known without reading data.

A frontend records where each weight lives (a :class:`~mexc.ir.stores.Store` and a key); passes compose recipes
on top (``concat``, ``slice``, ``regroup_qkv``, ``cast``, ``quantize``...); only a backend calls
:meth:`Recipe.materialize`. Every recipe op has a type rule (``infer``) and a kernel (``compute``), both
registered in :data:`RECIPE_OPS` (the op set: :mod:`mexc.ir.recipe_ops`), so a backend can write a file header
before reading one byte of weights.

Recipes are immutable and compare by structure (``key``), so identical sub-recipes can be shared and cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import IRError
from .pieces import _PART_RULES, _ROW_KERNELS, ColumnCat, _as_tensor
from .stores import Store
from .types import DType, TensorType


@dataclass(frozen=True)
class RecipeOp:
    """Type rule and kernel of one recipe op."""

    name: str
    infer: Callable[..., TensorType]      # (input types, **attrs) -> result type
    compute: Callable[..., torch.Tensor]  # (input tensors, **attrs) -> tensor
    doc: str = ""


RECIPE_OPS: dict[str, RecipeOp] = {}


def recipe_op(name: str, doc: str = ""):
    def deco(fns):
        infer, compute = fns()
        RECIPE_OPS[name] = RecipeOp(name, infer, compute, doc)
        return fns

    return deco


class Recipe:
    """One lazy tensor: ``op(inputs..., **attrs)`` with a known :class:`TensorType`.

    Leaves are ``load`` recipes bound to a :class:`Store`. Build non-leaves with :func:`derive`, which checks
    types and simplifies (a slice of a concat that falls inside one piece becomes a slice of that piece, so
    re-sharding a checkpoint already split the same way reads each source tensor once and copies nothing).
    """

    __slots__ = ("op", "inputs", "attrs", "type", "store", "_key")

    def __init__(self, op: str, inputs: tuple[Recipe, ...], attrs: dict[str, Any], type: TensorType,
                 store: Store | None = None):
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = dict(sorted(attrs.items()))
        self.type = type
        self.store = store
        self._key = None

    # structural identity -----------------------------------------------------------------------------
    @property
    def key(self) -> tuple:
        if self._key is None:
            self._key = (self.op, self.store.name if self.store else None, tuple(self.attrs.items()),
                         str(self.type) if self.op == "load" else None,
                         tuple(i.key for i in self.inputs))
        return self._key

    def __eq__(self, other):
        return isinstance(other, Recipe) and self.key == other.key

    def __hash__(self):
        return hash(self.key)

    # reading -------------------------------------------------------------------------------------------
    def leaves(self):
        if self.op == "load":
            yield self
        for i in self.inputs:
            yield from i.leaves()

    def materialize_parts(self, cache=None) -> list[torch.Tensor | ColumnCat]:
        """The tensor as pieces stacked on dim 0, each a view where the layout allows: a writer copies them
        one after another straight into its output, so re-arranging rows (TP merges and splits, QKV
        re-layouts, slices) and joining row-parallel shards side by side (:class:`ColumnCat`) copy nothing
        in between. Ops that compute (cast, quantize, ...) give one materialized piece."""
        rule = _PART_RULES.get(self.op)
        if rule is not None and self.type.shape:
            parts = rule(self, cache)
            if parts is not None:
                return parts
        return [self.materialize(cache)]

    def prefetch(self) -> None:
        """Ask the stores of this recipe's leaves to start reading them (see :meth:`Store.prefetch`)."""
        for leaf in self.leaves():
            leaf.store.prefetch(leaf.attrs["key"])

    def release(self) -> None:
        """Tell the stores of this recipe's leaves that their data was consumed (bounded RSS when streaming)."""
        for leaf in self.leaves():
            leaf.store.release(leaf.attrs["key"])

    def materialize(self, cache=None) -> torch.Tensor:
        """Compute the tensor. ``cache`` (a dict or :class:`TensorCache`) shares work between recipes."""
        hit = cache.get(self.key) if cache is not None else None
        if hit is not None:
            return hit
        if self.op == "load":
            t = self.store.read(self.attrs["key"], self.type)
            if tuple(t.shape) != self.type.shape or t.dtype != self.type.dtype.torch:
                raise IRError(
                    f"{self.store!r} key {self.attrs['key']!r}: found {t.dtype}{list(t.shape)}, "
                    f"the IR expects {self.type}",
                    hint="the checkpoint changed since it was lifted, or its metadata lies; lift it again",
                )
        elif self.op in _ROW_KERNELS:  # pure re-arrangements that need the input's type: one copy of the pieces
            t = _as_tensor(_PART_RULES[self.op](self, cache))
        else:
            args = [i.materialize(cache) for i in self.inputs]
            t = RECIPE_OPS[self.op].compute(args, **self.attrs)
        if cache is not None:
            cache[self.key] = t
        return t

    def __str__(self) -> str:
        from .text import format_recipe

        return format_recipe(self)

    __repr__ = __str__


# ops whose result is a fresh tensor worth sharing between recipes (views such as slice/index/shard are
# cheap to recompute from a cached parent and are not stored)
CACHEABLE_OPS = frozenset({"load", "concat", "stack", "regroup_qkv", "cast", "transpose", "pad", "add_scalar",
                           "quantize", "quant_scale", "dequantize"})


class TensorCache:
    """A bounded LRU of materialized tensors keyed by recipe structure, safe to share between writer threads.

    A backend passes one to ``Recipe.materialize`` so a source tensor that feeds several outputs (a fused QKV
    split into q/k/v, a tensor sharded over ranks) is read once while memory stays bounded by ``max_bytes``.
    """

    def __init__(self, max_bytes: int):
        import threading
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self._d: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key, default=None):
        """The cached tensor (marked recently used) or ``default``: one lookup under the lock (another writer
        thread could evict it between a membership test and a read)."""
        with self._lock:
            t = self._d.get(key)
            if t is None:
                self.misses += 1
                return default
            self._d.move_to_end(key)
            self.hits += 1
            return t

    def __setitem__(self, key, t: torch.Tensor):
        if key[0] not in CACHEABLE_OPS:
            return
        n = t.untyped_storage().nbytes()
        if n > self.max_bytes:
            return
        with self._lock:
            if key in self._d:
                return
            self._d[key] = t
            self._bytes += n
            while self._bytes > self.max_bytes and self._d:
                _, old = self._d.popitem(last=False)
                self._bytes -= old.untyped_storage().nbytes()

    def clear(self):
        with self._lock:
            self._d.clear()
            self._bytes = 0


def load(store: Store, key: str, type: TensorType) -> Recipe:
    """A leaf: tensor ``key`` of ``store``, which must have type ``type``."""
    return Recipe("load", (), {"key": key}, type, store)


def derive(op: str, *inputs: Recipe, **attrs) -> Recipe:
    """Build (and simplify) a recipe; raises :class:`IRError` when the type rule rejects the inputs."""
    if op not in RECIPE_OPS:
        raise IRError(f"unknown recipe op {op!r}", hint=f"known: {', '.join(sorted(RECIPE_OPS))}")
    simplified = _simplify(op, inputs, attrs)
    if simplified is not None:
        return simplified
    t = RECIPE_OPS[op].infer([i.type for i in inputs], **attrs)
    return Recipe(op, inputs, attrs, t)


def _simplify(op, inputs, attrs) -> Recipe | None:
    if op == "cast" and inputs[0].type.dtype == DType.parse(attrs["dtype"]):
        return inputs[0]
    if op == "cast" and inputs[0].op == "pad":
        # zero padding commutes with a cast: keep the pad outermost, where a backend or a later reshard
        # finds the rows before padding (vocab padded for TP), and cast fewer rows
        pad = inputs[0]
        return derive("pad", derive("cast", pad.inputs[0], **attrs), **pad.attrs)
    if op == "slice":
        (x,) = inputs
        dim, start, stop = attrs["dim"] % len(x.type.shape), attrs["start"], attrs["stop"]
        if start == 0 and stop == x.type.shape[dim] and x.type.layout is None:
            return x
        if x.op == "slice" and x.attrs["dim"] % len(x.type.shape) == dim:
            off = x.attrs["start"]
            return derive("slice", x.inputs[0], dim=dim, start=off + start, stop=off + stop)
        if x.op == "concat" and x.attrs["dim"] % len(x.type.shape) == dim:
            off = 0
            pieces = []
            for piece in x.inputs:
                n = piece.type.shape[dim]
                lo, hi = max(start, off), min(stop, off + n)
                if lo < hi:
                    pieces.append(derive("slice", piece, dim=dim, start=lo - off, stop=hi - off))
                off += n
            return pieces[0] if len(pieces) == 1 else derive("concat", *pieces, dim=dim)
    if op == "concat" and len(inputs) == 1:
        return inputs[0]
    if op == "concat":
        # adjacent slices of one tensor merge back into one slice
        dim = attrs["dim"]
        merged: list[Recipe] = []
        for p in inputs:
            q = merged[-1] if merged else None
            if (q is not None and p.op == "slice" and q.op == "slice" and p.inputs[0] == q.inputs[0]
                    and p.attrs["dim"] % len(p.type.shape) == dim % len(p.type.shape)
                    and q.attrs["stop"] == p.attrs["start"]):
                merged[-1] = derive("slice", q.inputs[0], dim=dim, start=q.attrs["start"], stop=p.attrs["stop"])
            else:
                merged.append(p)
        if len(merged) != len(inputs):
            return derive("concat", *merged, dim=dim)
    return None


from . import recipe_ops  # noqa: F401  (registers the op set; it needs recipe_op, defined above)

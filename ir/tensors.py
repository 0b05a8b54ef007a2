"""Lazy weights: recipes whose result type is known without reading data.

A frontend records where each weight lives (a :class:`Store` and a key); passes compose recipes on top
(``concat``, ``slice``, ``regroup_qkv``, ``cast``, ``quantize``...); only a backend calls
:meth:`Recipe.materialize`. Every recipe op has a type rule (``infer``) and a kernel (``compute``), both
registered in :data:`RECIPE_OPS`, so a backend can write a file header before reading one byte of weights.

Recipes are immutable and compare by structure (``key``), so identical sub-recipes can be shared and cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import IRError
from .types import DType, QKVLayout, TensorType

# --------------------------------------------------------------------------------------------- stores


class Store:
    """A source of named tensors (a checkpoint, a safetensors dir, a seeded generator).

    Subclasses set ``kind`` (the name in the text form) and implement ``read``; ``spec()`` returns the keyword
    arguments that rebuild the store with ``STORE_KINDS[kind](**spec)``.
    """

    kind = "abstract"

    def __init__(self, name: str):
        self.name = name

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def read(self, key: str, type: TensorType) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, key: str) -> None:
        """Called shortly before ``read(key)``: start reading it in the background (the kernel's readahead), so
        a writer busy with the previous tensor overlaps the disk's read of the next. Must not block on I/O."""

    def release(self, key: str) -> None:
        """Called when a backend has written everything made from ``key`` (memory-mapped stores drop pages)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


STORE_KINDS: dict[str, type[Store]] = {}


def register_store(cls: type[Store]) -> type[Store]:
    if cls.kind in STORE_KINDS and STORE_KINDS[cls.kind] is not cls:
        raise IRError(f"store kind {cls.kind!r} registered twice")
    STORE_KINDS[cls.kind] = cls
    return cls


@register_store
class RandomStore(Store):
    """Deterministic synthetic weights: each key seeds its own generator (for tests and benchmarks)."""

    kind = "random"

    def __init__(self, name: str, seed: int = 0, std: float = 0.02):
        super().__init__(name)
        self.seed, self.std = seed, std

    def spec(self):
        return {"seed": self.seed, "std": self.std}

    def read(self, key, type):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + _stable_hash(key))
        t = torch.randn(type.shape, generator=g, dtype=torch.float32) * self.std
        if key.endswith(("norm", "norm.weight", "ln.weight")):
            t = 1.0 + t
        return t.to(type.dtype.torch)


@register_store
class SafetensorsStore(Store):
    """Tensors in one or more safetensors files under a directory; key = ``file:tensor``."""

    kind = "safetensors"

    def __init__(self, name: str, root: str):
        super().__init__(name)
        self.root = root
        self._handles: dict[str, Any] = {}

    def spec(self):
        return {"root": self.root}

    def read(self, key, type):
        from safetensors import safe_open

        fname, tname = key.split(":", 1)
        path = f"{self.root}/{fname}"
        try:
            if fname not in self._handles:
                self._handles[fname] = safe_open(path, framework="pt")
            return self._handles[fname].get_tensor(tname)
        except Exception as e:  # safetensors raises its own error types
            raise IRError(f"{path}: cannot read tensor {tname!r} ({e})",
                          hint="the file is missing, truncated, or does not hold this tensor") from None


def _stable_hash(s: str) -> int:
    h = 1469598103934665603
    for b in s.encode():
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFF
    return h


# --------------------------------------------------------------------------------------------- recipe ops


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


# --------------------------------------------------------------------------------------------- op set


def _same_dtype(types):
    if len({t.dtype for t in types}) != 1:
        raise IRError(f"inputs disagree on dtype: {', '.join(str(t) for t in types)}")
    return types[0].dtype


@recipe_op("load", "a tensor of a store")
def _load():
    def infer(types, **a):  # pragma: no cover - leaves carry their type
        raise IRError("load recipes are built with ir.load()")

    return infer, None


@recipe_op("concat", "concatenate along dim")
def _concat():
    def infer(types, dim):
        dt = _same_dtype(types)
        shapes = [list(t.shape) for t in types]
        d = dim % len(shapes[0])
        for s in shapes[1:]:
            if len(s) != len(shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != d):
                raise IRError(f"concat(dim={dim}) of incompatible shapes {[tuple(x) for x in shapes]}")
        out = list(shapes[0])
        out[d] = sum(s[d] for s in shapes)
        return TensorType(dt, tuple(out))

    return infer, lambda xs, dim: torch.cat(xs, dim=dim)


@recipe_op("slice", "rows [start, stop) of dim")
def _slice():
    def infer(types, dim, start, stop):
        (t,) = types
        d = dim % len(t.shape)
        if not 0 <= start <= stop <= t.shape[d]:
            raise IRError(f"slice [{start}:{stop}] out of range for dim {d} of {t}")
        out = list(t.shape)
        out[d] = stop - start
        return TensorType(t.dtype, tuple(out))

    return infer, lambda xs, dim, start, stop: xs[0].narrow(dim, start, stop - start)


@recipe_op("index", "select one index of dim 0 (unstack)")
def _index():
    def infer(types, i):
        (t,) = types
        if not 0 <= i < t.shape[0]:
            raise IRError(f"index {i} out of range for {t}")
        return TensorType(t.dtype, t.shape[1:])

    return infer, lambda xs, i: xs[0][i]


@recipe_op("stack", "stack along a new dim 0")
def _stack():
    def infer(types):
        dt = _same_dtype(types)
        if len({t.shape for t in types}) != 1:
            raise IRError(f"stack of different shapes {[t.shape for t in types]}")
        return TensorType(dt, (len(types), *types[0].shape))

    return infer, lambda xs: torch.stack(xs)


@recipe_op("cast", "convert to another float dtype")
def _cast():
    def infer(types, dtype):
        (t,) = types
        d = DType.parse(dtype)
        if not (d.is_float and t.dtype.is_float):
            raise IRError(f"cast {t} -> {d.value}: only float casts are recipes; use quantize for integers")
        return t.with_(dtype=d)

    return infer, lambda xs, dtype: xs[0].to(DType.parse(dtype).torch)


@recipe_op("add_scalar", "add a constant (folds zero-centered gamma: w + 1)")
def _add_scalar():
    def infer(types, value):
        return types[0]

    def compute(xs, value):
        return (xs[0].float() + value).to(xs[0].dtype)

    return infer, compute


@recipe_op("pad", "zero-pad dim to size")
def _pad():
    def infer(types, dim, size):
        (t,) = types
        d = dim % len(t.shape)
        if size < t.shape[d]:
            raise IRError(f"pad to {size} is smaller than dim {d} of {t}")
        out = list(t.shape)
        out[d] = size
        return TensorType(t.dtype, tuple(out))

    def compute(xs, dim, size):
        x = xs[0]
        d = dim % x.dim()
        if x.shape[d] == size:
            return x
        shape = list(x.shape)
        shape[d] = size - x.shape[d]
        return torch.cat([x, torch.zeros(shape, dtype=x.dtype)], dim=d)

    return infer, compute


@recipe_op("transpose", "swap two dims")
def _transpose():
    def infer(types, d0, d1):
        (t,) = types
        s = list(t.shape)
        s[d0], s[d1] = s[d1], s[d0]
        return TensorType(t.dtype, tuple(s))

    return infer, lambda xs, d0, d1: xs[0].transpose(d0, d1).contiguous()


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


@recipe_op("regroup_qkv", "re-layout fused QKV rows between Megatron's grouped and [Q;K;V] concat")
def _regroup():
    def infer(types, to):
        (t,) = types
        if t.layout is None:
            raise IRError(f"regroup_qkv needs a QKV-typed input, got {t}")
        lay = QKVLayout(to, t.layout.q_heads, t.layout.kv_heads, t.layout.head_dim)
        return t.with_(layout=lay)

    return infer, None  # needs the input's layout: see _ROW_KERNELS


@recipe_op("zeros", "a zero tensor (e.g. the dense bias a target requires when the source has none)")
def _zeros():
    def infer(types, shape, dtype):
        return TensorType(DType.parse(dtype), tuple(shape))

    return infer, lambda xs, shape, dtype: torch.zeros(tuple(shape), dtype=DType.parse(dtype).torch)


@recipe_op("tag_qkv", "attach (or with kind=None remove) a QKV layout to a [rows, ...] tensor; no data change")
def _tag_qkv():
    def infer(types, kind, q, kv, d):
        (t,) = types
        return t.with_(layout=None if kind is None else QKVLayout(kind, q, kv, d))

    return infer, lambda xs, **a: xs[0]


@recipe_op("shard", "the part a rank holds (QKV-aware, KV heads replicated when parts > kv heads)")
def _shard():
    def infer(types, dim, parts, index):
        (t,) = types
        if t.layout is not None and dim == 0:
            lay = t.layout
            if lay.q_heads % parts:
                raise IRError(f"{lay.q_heads} query heads cannot be split {parts} ways")
            if lay.kind == "grouped" and lay.kv_heads % parts:
                raise IRError(
                    f"grouped QKV with {lay.kv_heads} groups cannot be split {parts} ways",
                    hint="relayout-qkv{to=concat} first (KV heads are then replicated as needed)",
                )
            if lay.kv_heads % parts and parts % lay.kv_heads:
                raise IRError(f"{lay.kv_heads} KV heads cannot be spread over {parts} ranks",
                              hint="the target TP must divide the KV heads or be a multiple of them")
            kv = max(1, lay.kv_heads // parts)
            return TensorType(t.dtype, ((lay.q_heads // parts + 2 * kv) * lay.head_dim, *t.shape[1:]))
        d = dim % len(t.shape)
        if t.shape[d] % parts:
            raise IRError(f"dim {d} of {t} does not split into {parts} equal parts")
        out = list(t.shape)
        out[d] //= parts
        return TensorType(t.dtype, tuple(out))

    return infer, None




# ------------------------------------------------------------------------------ pieces (writing without copies)


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


def _concat_parts(r: Recipe, cache):
    d = r.attrs["dim"] % len(r.type.shape)
    if d == 0:
        return [part for i in r.inputs for part in i.materialize_parts(cache)]
    return [ColumnCat([_one(i.materialize_parts(cache)) for i in r.inputs], d)]


def _slice_parts(r: Recipe, cache):
    x = r.inputs[0]
    d, start, stop = r.attrs["dim"] % len(x.type.shape), r.attrs["start"], r.attrs["stop"]
    parts = x.materialize_parts(cache)
    if d == 0:
        return take_rows(parts, [(start, stop)])
    return [p.narrow(d, start, stop - start) for p in parts]


def _regroup_parts(r: Recipe, cache):
    perm = _qkv_perm(r.inputs[0].type.layout, r.attrs["to"])
    return take_rows(r.inputs[0].materialize_parts(cache), _runs(perm.tolist()))


def _shard_parts(r: Recipe, cache):
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


# --------------------------------------------------------------------------------------------- quantization


def _quant_group(t: TensorType, scheme: str, group_size: int) -> int:
    k = t.shape[-1]
    if scheme == "fp8":
        return 0
    if scheme == "fp8-channel":
        return k
    if group_size <= 0:
        return k
    if k % group_size:
        raise IRError(f"in-features {k} of {t} is not a multiple of group size {group_size}")
    return group_size


QUANT_SCHEMES = ("int8-wo", "int4-wo", "fp8", "fp8-channel")


@recipe_op("quantize", "symmetric weight quantization of an [out, in] weight (int8/int4 per channel or "
                       "group; fp8-e4m3 per tensor); result is the quantized codes in [out, in]")
def _quantize():
    def infer(types, scheme, group_size):
        (t,) = types
        if scheme not in QUANT_SCHEMES:
            raise IRError(f"unknown quantization scheme {scheme!r}", hint=f"use one of {QUANT_SCHEMES}")
        if len(t.shape) < 2:
            raise IRError(f"quantize needs a matrix, got {t}")
        _quant_group(t, scheme, group_size)
        dt = {"int8-wo": DType.i8, "int4-wo": DType.i4, "fp8": DType.f8e4m3, "fp8-channel": DType.f8e4m3}[scheme]
        return TensorType(dt, t.shape, t.layout)

    def compute(xs, scheme, group_size):
        q, _ = quantize_tensor(xs[0], scheme, group_size)
        return q

    return infer, compute


@recipe_op("quant_scale", "the dequantization scales that go with quantize(x, scheme, group_size)")
def _quant_scale():
    def infer(types, scheme, group_size):
        (t,) = types
        g = _quant_group(t, scheme, group_size)
        if scheme == "fp8":
            return TensorType(DType.f32, ())
        return TensorType(DType.f32, (*t.shape[:-1], t.shape[-1] // g), t.layout)  # QKV rows keep their layout

    def compute(xs, scheme, group_size):
        return quant_scales(xs[0], scheme, group_size)

    return infer, compute


@recipe_op("dequantize", "codes * scales, back to float (used by the reference executor and tests)")
def _dequantize():
    def infer(types, dtype):
        return TensorType(DType.parse(dtype), types[0].shape, types[0].layout)

    def compute(xs, dtype):
        return dequantize_tensor(xs[0], xs[1]).to(DType.parse(dtype).torch)

    return infer, compute


_QMAX = {"int8-wo": 127, "int4-wo": 7}


def quant_scales(w: torch.Tensor, scheme: str, group_size: int) -> torch.Tensor:
    """The dequantization scales of :func:`quantize_tensor` alone (an amax per row, group or tensor), so the
    ``quant_scale`` recipe does not quantize the whole weight a second time."""
    w = w.float()
    if scheme == "fp8":
        return (w.abs().max().clamp(min=1e-12) / 448.0).reshape(())
    if scheme == "fp8-channel":
        return (w.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
    k = w.shape[-1]
    g = k if group_size <= 0 else group_size
    return (w.reshape(*w.shape[:-1], k // g, g).abs().amax(-1) / _QMAX[scheme]).clamp(min=1e-12)


def quantize_tensor(w: torch.Tensor, scheme: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of ``w`` ([..., out, in]) -> (codes [..., out, in], scales [..., out, in/g]).

    int8/int4: scale = amax / qmax per row (or per group of ``group_size`` inputs); fp8: e4m3 with
    scale = amax / 448 per tensor (``fp8``, scale shape ()) or per output row (``fp8-channel``, [..., out, 1]).
    """
    w = w.float()
    scale = quant_scales(w, scheme, group_size)
    if scheme in ("fp8", "fp8-channel"):
        return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale
    qmax = _QMAX[scheme]
    k = w.shape[-1]
    g = k if group_size <= 0 else group_size
    wg = w.reshape(*w.shape[:-1], k // g, g)
    q = torch.round(wg / scale.unsqueeze(-1)).clamp(-qmax - (1 if scheme == "int4-wo" else 0), qmax)
    return q.reshape(w.shape).to(torch.int8), scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if q.dtype == torch.float8_e4m3fn:
        return q.float() * scale
    ng = scale.shape[-1]
    k = q.shape[-1]
    return (q.float().reshape(*q.shape[:-1], ng, k // ng) * scale.unsqueeze(-1)).reshape(q.shape)


def nbytes_of(t: TensorType) -> int:
    return t.nbytes


__all__ = [
    "Store", "STORE_KINDS", "register_store", "TensorCache", "CACHEABLE_OPS", "RandomStore", "SafetensorsStore", "Recipe", "RecipeOp",
    "RECIPE_OPS", "load", "derive", "quantize_tensor", "dequantize_tensor", "QUANT_SCHEMES",
]  # fmt: skip

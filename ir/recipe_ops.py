"""The recipe op set: each op's type rule and kernel, registered with :func:`~mexc.ir.recipes.recipe_op`.

Pure re-arrangements (``regroup_qkv``, ``shard``) have no kernel here: :mod:`mexc.ir.pieces` gives their rows
as views. Quantization numerics live in :mod:`mexc.ir.quant`.
"""

from __future__ import annotations

import torch

from ..errors import IRError
from .quant import QUANT_SCHEMES, _quant_group, dequantize_tensor, quant_scales, quantize_tensor
from .recipes import recipe_op
from .types import DType, QKVLayout, TensorType


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


@recipe_op("reshape", "the same elements in another shape, row-major (a view: Megatron's legacy GroupedMLP keeps "
           "its experts' [E, H, X] in a [H, E*X] parameter)")
def _reshape():
    def infer(types, shape):
        (t,) = types
        shape = tuple(shape)
        if not shape or any(not isinstance(n, int) or n < 1 for n in shape) or \
                torch.Size(shape).numel() != torch.Size(t.shape).numel():
            raise IRError(f"reshape of {t} to {list(shape)}: the element counts differ")
        return TensorType(t.dtype, shape)

    return infer, lambda xs, shape: xs[0].reshape(tuple(shape))


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

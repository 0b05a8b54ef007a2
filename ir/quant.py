"""Quantization numerics: symmetric int8 / int4 weight-only (per channel or per group) and fp8-e4m3 (per tensor
or per channel). The ``quantize`` / ``quant_scale`` / ``dequantize`` recipe ops (:mod:`mexc.ir.recipe_ops`)
compute with these.
"""

from __future__ import annotations

import torch

from ..errors import IRError
from .types import TensorType


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

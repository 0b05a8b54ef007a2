"""Finding and reading Megatron checkpoints: legacy ``torch`` per-rank files and ``torch_dist`` (DCP).

Both are exposed as :class:`mexc.ir.Store`s, so lifting records keys and shapes and a backend reads tensor
bytes on demand: legacy files are opened with ``mmap=True`` (tensor pages are read only when touched), DCP
chunks are read from their byte range in the ``.distcp`` file. The pieces: :mod:`.layout` (where a checkpoint
is, its args and rank files), :mod:`.legacy_store`, :mod:`.dcp_store`; this module is their public face.
"""

from __future__ import annotations

import torch

from ...ir import TensorType
from ...ir.types import DType
from .dcp_store import DcpStore, validate_dcp  # noqa: F401
from .layout import CheckpointInfo, inside, locate, open_checkpoint  # noqa: F401
from .legacy_store import MegatronTorchStore  # noqa: F401

__all__ = ["CheckpointInfo", "DcpStore", "MegatronTorchStore", "dtype_of", "inside", "locate", "open_checkpoint",
           "tensor_type", "validate_dcp"]


def dtype_of(t: torch.dtype) -> DType:
    return DType.from_torch(t)


def tensor_type(t: torch.Tensor | tuple) -> TensorType:
    if isinstance(t, torch.Tensor):
        return TensorType(DType.from_torch(t.dtype), tuple(t.shape))
    dt, shape = t
    return TensorType(DType.from_torch(dt), tuple(shape))

"""Loading untrusted pickles: nothing in a checkpoint can import or run code.

* ``model_optim_rng.pt`` / ``common.pt`` / DCP common state: ``torch.load(..., weights_only=True)`` with an
  explicit allow-list: ``argparse.Namespace``, a few builtins, and *stand-in* classes for the Megatron enums
  and config objects a saved ``args`` holds (they record their name and value; no Megatron code is imported).
* DCP ``.metadata``: a restricted :class:`pickle.Unpickler` that resolves only the dataclasses of
  ``torch.distributed.checkpoint`` (and ``torch.Size`` / dtypes); anything else is refused.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, UnsafeCheckpointError


class MegatronStandIn:
    """Stand-in for a Megatron class found in saved args (an enum member or a config object)."""

    _qualname = "megatron.?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    @property
    def name(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __repr__(self) -> str:
        return f"<{self._qualname} {self.args!r}>"


# Megatron classes that saved args are known to carry (enums, configs). Each gets a stand-in.
MEGATRON_ARG_CLASSES = (
    "megatron.core.enums.ModelType",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.AttnMaskType",
    "megatron.core.transformer.enums.LayerType",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.model_parallel_config.ModelParallelConfig",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.transformer.transformer_config.TransformerConfig",
    "megatron.core.dist_checkpointing.mapping.ShardedObject",
    "megatron.training.arguments.ArgsNamespace",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
)


def _stand_in(qualname: str) -> type:
    cls = type(qualname.rsplit(".", 1)[1], (MegatronStandIn,), {"_qualname": qualname})
    # enums pickle as `Class(value)` -> a call; configs as `__reduce_ex__` object + state
    return cls


_STAND_INS = [(_stand_in(q), q) for q in MEGATRON_ARG_CLASSES]


def _numpy_array_globals() -> list[Any]:
    """What `np.random.get_state()` in Megatron's saved ``rng_state`` needs: array reconstruction only."""
    import numpy as np

    out: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64)),
                      type(np.dtype(np.int64))]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    out.append(_reconstruct)
    out.append((_reconstruct, "numpy.core.multiarray._reconstruct"))  # pickles written under numpy 1.x
    return out


ALLOWED_GLOBALS: list[Any] = [argparse.Namespace, *_STAND_INS, *_numpy_array_globals()]


def torch_load(path: Path, *, mmap: bool = True) -> Any:
    """``torch.load(weights_only=True)`` with mexc's allow-list; errors name the file and the fix."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "not an allowed global" in msg.lower() or "GLOBAL" in msg:
            lines = [l.strip() for l in msg.strip().splitlines() if "global" in l.lower()]
            first = (lines[0] if lines else msg.strip().splitlines()[0])[:300]
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle: it references code outside mexc's allow-list ({first})",
                hint="mexc never runs code from a checkpoint; if this file is trusted, re-save its state dict "
                     "with plain tensors and argparse args",
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({msg.splitlines()[0][:200]})",
                              hint="the file is corrupt or truncated; copy it again from the source") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                              hint="the file is corrupt or truncated; copy it again from the source") from None


def torch_load_file(f, what: str) -> Any:
    """``torch.load(weights_only=True)`` with the allow-list, from a seekable file-like object."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{what}: refused to unpickle: {str(e).splitlines()[0][:300]}",
                                    hint="mexc never runs code from a checkpoint") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{what}: cannot be read ({str(e).splitlines()[0][:200]})",
                              hint="the file is corrupt or truncated") from None


# ------------------------------------------------------------------------------------- DCP .metadata

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint._extension",
)
_DCP_BUILTINS = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"),
                 ("builtins", "frozenset"), ("builtins", "slice"), ("torch.serialization", "_get_layout"),
                 ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # plain torch's FileSystemWriter id


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module: str, name: str):
        if module in _DCP_MODULES or (module, name) in _DCP_BUILTINS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module.startswith("megatron."):
            return _stand_in(f"{module}.{name}")  # megatron's planner extras (e.g. all_local_plans)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to unpickle {module}.{name} (not a torch.distributed.checkpoint type)",
            hint="mexc never runs code from a checkpoint; this .metadata file is not a plain DCP index")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"{self.path}: unexpected persistent id in DCP metadata")


def load_dcp_metadata(path: Path):
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f, path).load()
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", hint="a torch_dist checkpoint needs its .metadata file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt DCP metadata ({type(e).__name__}: {e})",
                              hint="the file is truncated or damaged; copy the checkpoint again") from None

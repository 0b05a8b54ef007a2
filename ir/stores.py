"""Stores: where lifted weights live (a checkpoint, a safetensors dir, a seeded generator).

A :class:`Store` reads one named tensor on request; ``STORE_KINDS`` maps the kind named in the IR text form
to its class, so ``store ckpt = megatron-torch(root=...)`` parses back to the same store.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import IRError
from .types import TensorType


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

"""Legacy ``torch`` per-rank files as a :class:`mexc.ir.Store`: each ``model_optim_rng.pt`` is opened once,
memory-mapped (tensor pages are read only when a backend touches them), and checked unchanged before each read."""

from __future__ import annotations

import os
import re
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...ir import Store, register_store
from .safe_load import torch_load


@register_store
class MegatronTorchStore(Store):
    """Legacy per-rank files. Key: ``mp_rank_TT[_PPP][_EEE]:<model key>/<flat state key>``."""

    kind = "megatron-torch"

    def __init__(self, name: str, root: str):
        super().__init__(name)
        self.root = root
        self._open: dict[str, dict[str, torch.Tensor]] = {}
        self._mapped: dict[str, bool] = {}
        self._stat: dict[str, tuple] = {}  # rank dir -> (inode, size, mtime) when it was mapped
        self._lock = threading.Lock()  # writers, their producers and read-ahead threads share the store

    def spec(self):
        return {"root": self.root}

    def state(self, rank_dir: str) -> dict[str, Any]:
        """The flat state dict of one rank file (tensors memory-mapped, not read)."""
        if rank_dir in self._open:
            return self._open[rank_dir]
        with self._lock:
            return self._open_rank(rank_dir)

    def _open_rank(self, rank_dir: str) -> dict[str, Any]:
        if rank_dir not in self._open:
            path = Path(self.root) / rank_dir / "model_optim_rng.pt"
            mapped = zipfile.is_zipfile(path)  # torch < 1.6 files cannot be memory-mapped
            self._mapped[rank_dir] = mapped
            st = os.stat(path)
            sd = torch_load(path, mmap=mapped)
            flat: dict[str, Any] = {}
            for k, v in sd.items():
                if k == "model" or re.fullmatch(r"model\d+", k):
                    _flatten(v, k + "/", flat, path)
            self._stat[rank_dir] = (st.st_ino, st.st_size, st.st_mtime_ns)
            self._open[rank_dir] = flat
        return self._open[rank_dir]

    def read(self, key, type):
        rank_dir, k = key.split(":", 1)
        t = self.state(rank_dir).get(k)
        if t is None:
            raise CheckpointError(f"{self.root}/{rank_dir}/model_optim_rng.pt: no tensor {k!r}",
                                  hint="the checkpoint changed since it was lifted; lift it again")
        if self._mapped.get(rank_dir):
            self._check_unchanged(rank_dir)
            _advise_pages(t, _MADV_WILLNEED)  # start the kernel's readahead now, while the writer is busy
        return t  # a view of the memory map: nothing is copied; see release()

    def _check_unchanged(self, rank_dir: str) -> None:
        """A mapped file that shrank or was replaced would fault (SIGBUS) when its pages are touched: refuse it
        first. (A file truncated between this check and the copy still faults; see docs/security.md.)"""
        path = Path(self.root) / rank_dir / "model_optim_rng.pt"
        try:
            st = os.stat(path)
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            now = None
        if now != self._stat.get(rank_dir):
            raise CheckpointError(f"{path}: changed while mexc was reading it (replaced, truncated or removed)",
                                  hint="let the copy or training job that writes it finish, then run mexc again")

    def prefetch(self, key: str) -> None:
        """Have the kernel read the whole tensor now (returns once the reads are queued or done)."""
        rank_dir, k = key.split(":", 1)
        t = self.state(rank_dir).get(k)
        if isinstance(t, torch.Tensor) and self._mapped.get(rank_dir):
            _advise_pages(t, _MADV_WILLNEED, _PREFETCH_STEP)

    def release(self, key: str) -> None:
        """Drop the mapped pages of ``key`` once a backend has written what it made from them: otherwise every
        page ever touched stays in this process's RSS until the compile ends (14 GB for a 7B checkpoint)."""
        rank_dir, k = key.split(":", 1)
        t = self._open.get(rank_dir, {}).get(k)
        if isinstance(t, torch.Tensor) and self._mapped.get(rank_dir):  # never on heap memory: it would zero it
            _release_pages(t)


_PAGE = 4096
_LIBC = None


_MADV_WILLNEED, _MADV_DONTNEED = 3, 4


def _release_pages(t: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the pages of a memory-mapped tensor's storage (re-read from the file if touched
    again)."""
    _advise_pages(t, _MADV_DONTNEED)


# The kernel caps one WILLNEED hint at its readahead window (max(read_ahead_kb, max_sectors_kb), often 128 KiB
# to 8 MiB): prefetching a whole tensor takes one hint per step of at most the smallest common cap.
_PREFETCH_STEP = 512 << 10


def _advise_pages(t: torch.Tensor, advice: int, step: int | None = None) -> None:
    """madvise() the pages of a memory-mapped tensor's bytes (in ``step``-byte calls when given); a no-op
    where libc's madvise is missing."""
    global _LIBC
    import ctypes

    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
        if t.numel() == 0:
            return
        # the tensor's own bytes, not its storage's: a checkpoint whose params are views of one buffer (a
        # distributed-optimizer param buffer) would otherwise advise the whole buffer for every tensor
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
        start = t.data_ptr()
        end = start + span * t.element_size()
        lo = start & ~(_PAGE - 1)
        hi = (end + _PAGE - 1) & ~(_PAGE - 1)
        step = step or max(hi - lo, 1)
        for a in range(lo, hi, step):
            _LIBC.madvise(ctypes.c_void_p(a), ctypes.c_size_t(min(step, hi - a)), advice)
    except (OSError, AttributeError):
        pass


def _advise_file(path: Path, offset: int, length: int) -> None:
    """posix_fadvise(WILLNEED) a byte range of a file, in steps (see ``_PREFETCH_STEP``)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # read() reports it
    try:
        for a in range(offset, offset + length, _PREFETCH_STEP):
            os.posix_fadvise(fd, a, min(_PREFETCH_STEP, offset + length - a), os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flatten(obj, prefix, out, path):
    """Nested state dicts (pre-mcore ``language_model`` etc.) become dotted keys under ``prefix``. A state dict is
    a tree: a sub-dict reached twice (a memo-shared pickle that would expand exponentially) is refused."""
    seen: set[int] = set()
    todo = [(obj, prefix)]
    while todo:
        o, pre = todo.pop()
        if not isinstance(o, dict):
            out[pre.rstrip(".")] = o
            continue
        if id(o) in seen:
            raise CheckpointError(f"{path}: the state dict reuses one sub-dict under two keys ({pre.rstrip('.')})",
                                  hint="a real state dict is a tree; the file was tampered with")
        seen.add(id(o))
        todo.extend(reversed([(v, f"{pre}{k}.") for k, v in o.items()]))  # popped in the dict's order

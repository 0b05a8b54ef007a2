"""Finding and reading Megatron checkpoints: legacy ``torch`` per-rank files and ``torch_dist`` (DCP).

Both are exposed as :class:`mexc.ir.Store`s, so lifting records keys and shapes and a backend reads tensor
bytes on demand: legacy files are opened with ``mmap=True`` (tensor pages are read only when touched), DCP
chunks are read from their byte range in the ``.distcp`` file.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...ir import Store, TensorType, register_store
from ...ir.types import DType
from .safe_load import load_dcp_metadata, torch_load, torch_load_file

# optimizer state (also under a ChainedOptimizer's chained_N. prefix) and RNG state are not model weights
_NOT_MODEL = re.compile(r"^(chained_\d+\.)?(optimizer\.|rng_state)")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_ITER = re.compile(r"^iter_(\d{7,12})$")  # Megatron pads to 7 digits; longer runs write 8 or more
_MAX_PARALLEL = 1 << 16                    # tp, pp, ep, etp: larger values are not a real run's


@dataclass
class CheckpointInfo:
    """Where a checkpoint is and what it holds (no tensor data read)."""

    root: Path                      # the directory the user gave
    iter_dir: Path                  # iter_NNNNNNN or release
    format: str                     # torch | torch_dist
    iteration: int | None
    args: Any                       # argparse.Namespace (or a dict-like)
    checkpoint_version: float | None
    rank_files: dict[tuple[int, int, int], Path] = field(default_factory=dict)  # (tp, pp, ep) -> file (torch)
    expert_tp: int | None = None    # expert_tensor_parallel_size (legacy files; None: the same as tp)
    args_missing: bool = False      # no saved args (release/ or converted): the architecture must be given
    store: Store | None = None      # the torch_dist store to read (set by a wrapper: key prefix, tar member files)


def locate(path: str | Path, iteration: int | None = None) -> tuple[Path, Path, int | None]:
    """Resolve a user path to (root, iteration dir, iteration); the iteration dir lies inside the root (a symlink
    that leaves it is refused, like any file of the checkpoint)."""
    root, d, it = _locate(path, iteration)
    if d != root:
        real_root, real = os.path.realpath(root), os.path.realpath(d)
        if os.path.commonpath([real_root, real]) != real_root:
            raise CheckpointError(f"{d}: points outside the checkpoint ({real})",
                                  hint="a checkpoint's files must lie inside its directory; copy the iteration in")
    return root, d, it


def _locate(path: str | Path, iteration: int | None = None) -> tuple[Path, Path, int | None]:
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such directory", hint="give the Megatron save directory (--save)")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory", hint="give the Megatron save directory, not a file")
    if _is_iter_dir(root):
        m = re.match(r"iter_(\d+)$", root.name)
        return root, root, int(m.group(1)) if m else None
    iters = sorted(p for p in root.iterdir() if p.is_dir() and (_ITER.match(p.name) or p.name == "release"))
    by_number = {int(m.group(1)): p for p in iters if (m := _ITER.match(p.name))}
    tracker = root / "latest_checkpointed_iteration.txt"
    if iteration is not None:
        d = root / "release" if iteration == 0 and (root / "release").is_dir() else by_number.get(iteration)
        if d is None:
            have = ", ".join(p.name for p in iters) or "none"
            raise CheckpointError(f"{root}: no iteration {iteration} (found: {have})",
                                  hint="pick one of the iterations found with --iteration")
        return root, d, iteration
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            d, it = root / "release", 0
        elif text.isdigit() and len(text) < 20:
            it = int(text)
            d = by_number.get(it, root / f"iter_{it:07d}")
        else:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}",
                                  hint="fix the file, or pass --iteration N")
        if not d.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text} but {d} does not exist",
                                  hint="pass --iteration N for one of the saved iterations")
        return root, d, it
    if len(iters) == 1:
        m = _ITER.match(iters[0].name)
        return root, iters[0], int(m.group(1)) if m else 0
    if not iters:
        raise CheckpointError(f"{root}: no Megatron checkpoint here (no latest_checkpointed_iteration.txt, "
                              "no iter_* or release directory, no mp_rank_* or metadata.json)",
                              hint="give the directory Megatron saved to with --save")
    raise CheckpointError(f"{root}: {len(iters)} iterations ({', '.join(p.name for p in iters)}) and no "
                          "latest_checkpointed_iteration.txt", hint="choose one with --iteration N")


def _is_iter_dir(d: Path) -> bool:
    return (d / "metadata.json").is_file() or (d / ".metadata").is_file() or any(
        p.name.startswith("mp_rank_") for p in d.iterdir())


def open_checkpoint(path: str | Path, iteration: int | None = None) -> CheckpointInfo:
    """The checkpoint at ``path``: a Megatron-LM save, or one a NeMo / Megatron-Bridge layout wraps
    (:mod:`.wrappers`: the architecture then comes from the wrapper's saved config)."""
    from .wrappers import open_wrapped

    wrapped = open_wrapped(Path(path), iteration)
    if wrapped is not None:
        return wrapped
    root, d, it = locate(path, iteration)
    if (d / "metadata.json").is_file() or (d / ".metadata").is_file():
        return _open_dist(root, d, it)
    if any(p.name.startswith("mp_rank_") for p in d.iterdir()):
        return _open_legacy(root, d, it)
    raise CheckpointError(f"{d}: neither a legacy (mp_rank_*) nor a torch_dist (metadata.json) checkpoint",
                          hint="the directory is empty or incomplete; copy the checkpoint again")


def _open_legacy(root: Path, d: Path, it: int | None) -> CheckpointInfo:
    dirs = {}
    for p in sorted(d.iterdir()):
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            dirs[p.name] = (m, p)
    if not dirs:
        raise CheckpointError(f"{d}: no mp_rank_* directories", hint="copy the checkpoint again")
    first_name = sorted(dirs)[0]
    first = inside(d, dirs[first_name][1] / "model_optim_rng.pt")
    sd = torch_load(first, mmap=_is_zip(first))
    if not isinstance(sd, dict):
        raise CheckpointError(f"{first}: holds a {type(sd).__name__}, not a Megatron state dict",
                              hint="give the directory Megatron saved to")
    model = [k for k in sd if k == "model" or re.fullmatch(r"model\d+", str(k))]
    if not model or not all(isinstance(sd[k], dict) for k in model):
        raise CheckpointError(f"{first}: holds no 'model' state dict", hint="give the directory Megatron saved "
                              "to; this file is damaged or not a Megatron model checkpoint")
    args = _checked_args(sd.get("args"), first)
    tp = _size(args, first, "tensor_model_parallel_size", "model_parallel_size")
    pp = _size(args, first, "pipeline_model_parallel_size")
    ep = _size(args, first, "expert_model_parallel_size")
    etp = _size(args, first, "expert_tensor_parallel_size", default=tp)
    args_missing = args is None
    if args_missing:  # a release/ or converted checkpoint: the layout comes from the directory names
        import argparse

        tp = etp = 1 + max(int(m.group(1)) for m, _ in dirs.values())
        pp = 1 + max(int(m.group(2) or 0) for m, _ in dirs.values())
        ep = 1 + max(int(m.group(3) or 0) for m, _ in dirs.values())
        args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  expert_model_parallel_size=ep)
    files: dict[tuple[int, int, int], Path] = {}
    for name, (m, p) in dirs.items():
        t, a, b = int(m.group(1)), m.group(2), m.group(3)
        if b is not None:
            pr, er = int(a), int(b)
        elif a is not None:
            pr, er = (int(a), 0) if pp > 1 else (0, int(a))  # a 3-digit suffix is EP when pp == 1
        else:
            pr, er = 0, 0
        if (t, pr, er) in files:
            raise CheckpointError(f"{d}: {files[(t, pr, er)].parent.name} and {name} are both tp={t} pp={pr} ep={er}",
                                  hint="remove the stray directory (the iteration holds two layouts)")
        if t >= tp or pr >= pp or er >= ep:
            raise CheckpointError(f"{p}: rank outside tp={tp} pp={pp} ep={ep} from the args",
                                  hint="the args disagree with the files; pass the layout with --config")
        files[(t, pr, er)] = p / "model_optim_rng.pt"
    missing = _missing_ranks(files, tp, pp, ep, etp)
    if missing:
        names = ", ".join(_rank_dir_name(t, p_, e, pp, ep) for t, p_, e in missing[:6])
        raise CheckpointError(f"{d}: missing rank directories {names}{' ...' if len(missing) > 6 else ''} "
                              f"(args say tp={tp} pp={pp} ep={ep} expert tp={etp})",
                              hint="copy the whole iteration directory; every rank's file is needed")
    for key, f in files.items():
        files[key] = inside(d, f)
    info = CheckpointInfo(root, d, "torch", sd.get("iteration", it), args, sd.get("checkpoint_version"), files)
    info.expert_tp = etp
    info.args_missing = args_missing
    return info


def _checked_args(args, where: Path):
    """Saved args are an ``argparse.Namespace`` (or a namespace / dict stand-in); anything else is damage."""
    import argparse
    import types

    if args is None or isinstance(args, (argparse.Namespace, types.SimpleNamespace, dict)):
        return args
    raise CheckpointError(f"{where}: 'args' is a {type(args).__name__}, not Megatron-LM's argparse.Namespace",
                          hint="the file is damaged; pass the architecture with --config FILE.yaml")


def _size(args, where: Path, *names: str, default: int = 1) -> int:
    """A parallel size from the args (1 when absent), bounded so that no later loop is unbounded."""
    v = None
    for n in names:
        v = _arg(args, n) if args is not None else None
        if v is not None:
            break
    v = default if v is None else v
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _MAX_PARALLEL:
        raise CheckpointError(f"{where}: args.{names[0]} = {str(v)[:40]} is not a parallel size (1..{_MAX_PARALLEL})",
                              hint="the args are damaged; pass the layout with --config")
    return v


def _missing_ranks(files, tp: int, pp: int, ep: int, etp: int) -> list[tuple[int, int, int]]:
    """Rank files the layout needs and the directory lacks. Every (tp, pp) pair holds the dense weights and every
    (ep, pp) pair the experts; when the expert TP size equals TP every (tp, ep) pair is its own file, otherwise
    Megatron writes one file per rank of the world (e.g. TP2 EP2 ETP1: mp_rank_00_000 and mp_rank_01_001 only)."""
    if len(files) > _MAX_PARALLEL:
        return []
    need: set[tuple[int, int, int]] = set()
    if etp == tp or ep == 1:
        if tp * pp * ep > 4 * len(files) + 64:  # far more than present: report without listing them all
            return [(t, p, e) for t in range(min(tp, 2)) for p in range(min(pp, 2)) for e in range(min(ep, 2))
                    if (t, p, e) not in files]
        need = {(t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)}
        return sorted(need - set(files))
    have_tp = {(t, p) for t, p, _ in files}
    have_ep = {(e, p) for _, p, e in files}
    out = [(t, p, 0) for p in range(min(pp, len(files) + 1)) for t in range(min(tp, len(files) + 1)) if (t, p) not in have_tp]
    out += [(0, p, e) for p in range(min(pp, len(files) + 1)) for e in range(min(ep, len(files) + 1)) if (e, p) not in have_ep]
    return out


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root`` and is a regular file; else a clear error."""
    import stat

    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointError(f"{path}: points outside the checkpoint ({real})",
                              hint="a checkpoint's files must lie inside its directory; copy the real file in")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", hint="copy the whole checkpoint directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file", hint="a checkpoint holds only plain files")
    return path


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _rank_dir_name(t, p, e, pp, ep):
    s = f"mp_rank_{t:02d}"
    if pp > 1:
        s += f"_{p:03d}"
    if ep > 1:
        s += f"_{e:03d}"
    return s


def _open_dist(root: Path, d: Path, it: int | None) -> CheckpointInfo:
    import json

    mj = d / "metadata.json"
    if mj.is_file():
        try:
            meta = json.loads(mj.read_text()) if os.path.getsize(inside(d, mj)) < (1 << 20) else None
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mj}: not valid JSON ({str(e)[:80]})", hint="copy the checkpoint again") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{mj}: not a JSON object of a few fields", hint="copy the checkpoint again")
        backend = meta.get("sharded_backend")
        if backend != "torch_dist":
            raise CheckpointError(f"{mj}: sharded_backend {backend!r} is not supported",
                                  hint="convert it to torch_dist with Megatron-LM's checkpoint tools")
    common = d / "common.pt"
    store = DcpStore("ckpt", str(d))
    if common.is_file():
        state = torch_load(common, mmap=False)
    else:
        state = store.common_state()
    if not isinstance(state, dict):
        raise CheckpointError(f"{d}: the common state holds a {type(state).__name__}, not a dict",
                              hint="the checkpoint is damaged; copy it again")
    args = _checked_args(state.get("args"), common if common.is_file() else d / "common_state")
    info = CheckpointInfo(root, d, "torch_dist", state.get("iteration", it), args, state.get("checkpoint_version"))
    if args is None:
        import argparse

        info.args, info.args_missing = argparse.Namespace(), True
    return info


def _arg(args, name, default=None):
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)


# ------------------------------------------------------------------------------------------ stores


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


@register_store
class DcpStore(Store):
    """A torch_dist (PyTorch DCP) checkpoint. Key: ``<global key>`` or ``<global key>@<i>`` (index on dim 0).

    ``prefix``: a prefix every model key carries on disk and that keys here leave out (NeMo's ``module.`` /
    ``model.``). Subclasses may keep the files elsewhere (a ``.nemo`` tar: :mod:`.wrappers`) by overriding
    ``_file`` and ``_load_metadata``."""

    kind = "megatron-dist"

    def __init__(self, name: str, root: str, prefix: str = ""):
        super().__init__(name)
        self.root = root
        self.prefix = prefix
        self._meta = None
        self._lock = threading.Lock()

    def spec(self):
        return {"root": self.root, **({"prefix": self.prefix} if self.prefix else {})}

    @property
    def metadata(self):
        if self._meta is None:
            with self._lock:
                if self._meta is None:
                    self._meta = self._load_metadata()
        return self._meta

    def _load_metadata(self):
        meta = load_dcp_metadata(Path(self.root) / ".metadata")
        validate_dcp(meta, Path(self.root))
        return meta

    def _file(self, name: str) -> tuple[Path, int, int | None]:
        """(file on disk, byte offset where DCP file ``name`` starts in it, its size or None: the file's)."""
        return Path(self.root) / name, 0, None

    def _fqn(self, base: str) -> str:
        """The on-disk key of ``base`` (the prefix put back where the checkpoint has it)."""
        if self.prefix and self.prefix + base in self.metadata.state_dict_metadata:
            return self.prefix + base
        return base

    def tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Global key -> (dtype, global shape) for every tensor item (optimizer state excluded)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        out = {}
        for k, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and not _NOT_MODEL.match(k):
                out[k[len(self.prefix):] if self.prefix and k.startswith(self.prefix) else k] = (
                    md.properties.dtype, tuple(md.size))
        return out

    def _chunks(self, base: str) -> list[tuple[tuple, tuple, Any]]:
        """(global offsets, sizes, storage info) of every saved chunk of tensor ``base``."""
        by_key = getattr(self, "_by_key", None)
        if by_key is None:
            by_key = defaultdict(list)
            sizes: dict[tuple, tuple] = {}
            for k, md in self.metadata.state_dict_metadata.items():
                for c in getattr(md, "chunks", ()):
                    sizes[(k, tuple(c.offsets))] = tuple(c.sizes)
            for idx, info in self.metadata.storage_data.items():
                off = tuple(idx.offset or ())  # bytes items (common_state) have none
                by_key[idx.fqn].append((off, sizes.get((idx.fqn, off), ()), info))
            self._by_key = by_key  # built whole, then published: a concurrent caller builds the same
        return by_key.get(base, [])

    def _selected_chunks(self, key: str):
        """(offsets, sizes, storage info) of the chunks ``key`` (``base``, ``base@i``, ``...#offsets``) reads."""
        base, index, want = _parse_key(key)
        for off, sizes, info in self._chunks(self._fqn(base)):
            if want is not None and off != want:
                continue
            if index is not None and not (off[0] <= index < off[0] + sizes[0]):
                continue
            yield off, sizes, info

    def split(self, key: str) -> tuple[int, list[tuple[str, tuple[int, ...]]]] | None:
        """How ``key`` (``base`` or ``base@i``) is stored when its chunks tile it along one dim, in order (the
        TP shards of a Megatron save): ``(dim, [(chunk key, chunk shape), ...])``; None for a single chunk or
        any other tiling. Lifting a tensor as the concat of its chunks lets a writer read each chunk in place
        instead of assembling the tensor in memory first."""
        base, index, _ = _parse_key(key)
        md = self.metadata.state_dict_metadata.get(self._fqn(base))
        if md is None:
            return None
        chunks = []
        for off, sizes, _ in self._selected_chunks(key):
            if index is not None:
                if sizes[0] != 1:
                    return None
                chunks.append((off, off[1:], sizes[1:]))
            else:
                chunks.append((off, off, sizes))
        shape = tuple(md.size)[1:] if index is not None else tuple(md.size)
        if len(chunks) < 2 or not shape:
            return None
        split = [d for d in range(len(shape)) if len({c[1][d] for c in chunks}) > 1]
        if len(split) != 1:
            return None
        d = split[0]
        chunks.sort(key=lambda c: c[1][d])
        at = 0
        for _, off, sizes in chunks:
            if off[d] != at or any(off[i] != 0 or sizes[i] != shape[i] for i in range(len(shape)) if i != d):
                return None
            at += sizes[d]
        if at != shape[d]:
            return None
        return d, [(f"{key}#{','.join(str(o) for o in full)}", sizes) for full, _, sizes in chunks]

    def prefetch(self, key: str) -> None:
        """Have the kernel read the chunks ``key`` reads (returns once the reads are queued or done)."""
        for _, _, info in self._selected_chunks(key):
            path, start, _ = self._file(info.relative_path)
            _advise_file(path, start + info.offset, info.length)

    def _load_chunk(self, info, dtype: torch.dtype | None = None, sizes: tuple | None = None,
                    what: str | None = None):
        """One saved chunk. Fast path: the chunk's raw record is memory-mapped in place (no unpickling, no
        copy; the kernel reads ahead); otherwise it is ``torch.load``ed from its byte range."""
        path, start, size = self._file(info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: compressed/transformed DCP items are not supported",
                                  hint="re-save the checkpoint without DCP transforms")
        try:
            size = os.path.getsize(path) if size is None else size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing", hint="copy every __*.distcp file of the checkpoint") from None
        if size < info.offset + info.length:
            raise CheckpointError(f"{path}: truncated (needed bytes {info.offset}..{info.offset + info.length}, "
                                  f"file has {size})", hint="copy the checkpoint again")
        with open(path, "rb") as f:
            at = start + info.offset
            mapped = _map_saved_tensor(f, path, at, info.length, dtype, sizes) if dtype is not None else None
            if mapped is not None:
                return mapped
            obj = torch_load_file(_Window(f, at, info.length), what or str(path))
        if dtype is not None and not (isinstance(obj, torch.Tensor) and obj.dtype == dtype
                                      and obj.numel() == math.prod(sizes)):
            got = f"{obj.dtype} {list(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__
            raise CheckpointError(f"{path}: the chunk at bytes {info.offset}.. holds {got}, the .metadata declares "
                                  f"{dtype} {list(sizes)}", hint="the index and the data disagree; copy the "
                                  "checkpoint again")
        return obj

    def read(self, key, type):
        base, index, chunk = _parse_key(key)
        md = self.metadata.state_dict_metadata.get(self._fqn(base))
        found = list(self._selected_chunks(key)) if md is not None else []
        if md is None or (chunk is not None and not found):
            raise CheckpointError(f"{self.root}: no tensor {key!r} in .metadata", hint="lift the checkpoint again")
        out_shape = tuple(md.size)[1:] if index is not None else tuple(md.size)
        out = None
        filled = 0
        for off, sizes, info in found:
            t = self._load_chunk(info, md.properties.dtype, sizes).reshape(sizes)
            if index is not None:
                t = t[index - off[0]]
                off, sizes = off[1:], sizes[1:]
            if chunk is not None or sizes == out_shape:
                return t  # one chunk (a split tensor's piece, or the whole tensor): memory-mapped, no copy
            if out is None:
                out = torch.empty(out_shape, dtype=md.properties.dtype)
            dst = out
            for dim, (o, s) in enumerate(zip(off, sizes)):
                dst = dst.narrow(dim, o, s)
            dst.copy_(t)
            filled += t.numel()
        total = math.prod(out_shape)
        if out is None or filled != total:
            raise CheckpointError(f"{self.root}: tensor {key!r} is incomplete ({filled} of {total} values "
                                  "found in the .distcp files)", hint="a rank's .distcp file is missing; copy it again")
        return out

    def common_state(self) -> dict:
        """Megatron-core >= 0.17 keeps args etc. as a bytes item ``common_state`` inside the DCP files."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        keys = [k for k, md in self.metadata.state_dict_metadata.items()
                if isinstance(md, BytesStorageMetadata) and k.split("/")[0] == "common_state"]
        if not keys:
            if not (Path(self.root) / "metadata.json").is_file():
                raise CheckpointError(f"{self.root}: a plain PyTorch DCP checkpoint without Megatron's common state "
                                      "(Megatron-LM's --ckpt-format torch_dcp, or FSDP2); mexc reads the torch and "
                                      "torch_dist formats", hint="load it in Megatron-LM and save it again with "
                                      "--ckpt-format torch_dist")
            raise CheckpointError(f"{self.root}: no common.pt and no common_state item",
                                  hint="the checkpoint is incomplete; copy common.pt too")
        obj = self._load_chunk(self._chunks(keys[0])[0][2], what=f"{self.root} common_state")
        if isinstance(obj, list) and obj:
            obj = obj[0]
        return obj


def validate_dcp(meta, root: Path, file_size=None) -> None:
    """Check every size, offset, length and path a DCP ``.metadata`` declares before anything uses it.

    Tensor items: a shape of non-negative ints; chunks inside the shape that tile it exactly (no gap, no overlap);
    each chunk's storage record a plain file name in ``root`` (a regular file, symlinks only inside ``root``)
    whose byte range lies in the file and holds at least the chunk's bytes. ``file_size(name)``, when given, gives
    the size of each file instead (files inside an archive).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    where = root / ".metadata"

    def bad(msg):
        return CheckpointError(f"{where}: {msg}", hint="the index is damaged or was tampered with; copy the "
                               "checkpoint again")

    sdm, storage = getattr(meta, "state_dict_metadata", None), getattr(meta, "storage_data", None)
    if not isinstance(sdm, dict) or not isinstance(storage, dict):
        raise bad("no state_dict_metadata / storage_data")
    sizes: dict[str, int] = {}
    ranges: dict[str, list] = {}
    for idx, info in storage.items():
        name = getattr(info, "relative_path", None)
        off, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,200}", name) or name in (".", ".."):
            raise bad(f"item {getattr(idx, 'fqn', '?')} names file {str(name)[:80]!r} (only plain file names in "
                      "the checkpoint directory)")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (off, length)):
            raise bad(f"item {getattr(idx, 'fqn', '?')} has offset {off!r} and length {length!r}")
        if name not in sizes:
            sizes[name] = file_size(name) if file_size else os.stat(inside(root, root / name)).st_size
        if off + length > sizes[name]:
            raise CheckpointError(f"{root / name}: truncated (item {idx.fqn} needs bytes {off}..{off + length}, "
                                  f"the file has {sizes[name]})", hint="copy the checkpoint again")
        ranges.setdefault(name, []).append((off, length, getattr(idx, "fqn", "?")))
    for name, rs in ranges.items():  # DCP writes each item once: two items over the same bytes are a forgery
        rs.sort()
        for (o1, l1, a), (o2, _, b) in zip(rs, rs[1:]):
            if o2 < o1 + l1:
                raise bad(f"items {a} and {b} share bytes of {name} ({o2} < {o1 + l1})")
    for key, md in sdm.items():
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise bad(f"item {str(key)[:80]} is a {type(md).__name__}")
        shape = tuple(md.size) if isinstance(getattr(md, "size", None), (tuple, list)) else (None,)
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        if not all(isinstance(n, int) and n >= 0 for n in shape) or not isinstance(dtype, torch.dtype) or \
                not isinstance(getattr(md, "chunks", None), list):
            raise bad(f"tensor {key} has shape {str(shape)[:60]} / dtype {str(dtype)[:30]} / malformed chunks")
        itemsize = torch.empty((), dtype=dtype).element_size()
        boxes = []
        for c in md.chunks:
            o, z = tuple(c.offsets), tuple(c.sizes)
            if len(o) != len(shape) or len(z) != len(shape) or not all(
                    isinstance(a, int) and isinstance(b, int) and a >= 0 and b >= 0 and a + b <= n
                    for a, b, n in zip(o, z, shape)):
                raise bad(f"tensor {key}: chunk at {o} of size {z} lies outside its shape {shape}")
            if _NOT_MODEL.match(key):
                continue
            info = storage.get(_index(key, o))
            if info is None:
                raise bad(f"tensor {key}: chunk at {o} has no storage record")
            if info.length < math.prod(z) * itemsize:
                raise bad(f"tensor {key}: chunk at {o} declares {math.prod(z) * itemsize} bytes in a record of "
                          f"{info.length}")
            boxes.append((o, z))
        if not _NOT_MODEL.match(key):
            _check_tiling(key, shape, boxes, bad)


def _index(fqn: str, offsets: tuple):
    from torch.distributed.checkpoint.metadata import MetadataIndex

    return MetadataIndex(fqn, torch.Size(offsets))


def _check_tiling(key: str, shape: tuple, boxes: list, bad) -> None:
    """The chunks cover ``shape`` exactly: their volumes add up and no two overlap (a sweep on dim 0)."""
    if sum(math.prod(z) for _, z in boxes) != math.prod(shape):
        raise bad(f"tensor {key}: its chunks hold {sum(math.prod(z) for _, z in boxes)} values, its shape "
                  f"{list(shape)} needs {math.prod(shape)}")
    if not shape:
        if len(boxes) != 1:
            raise bad(f"tensor {key}: a scalar in {len(boxes)} chunks")
        return
    active: list = []
    for o, z in sorted(boxes):
        if not z[0] or not math.prod(z):
            continue
        active = [(ao, az) for ao, az in active if ao[0] + az[0] > o[0]]
        for ao, az in active:
            if all(a < b + bz and b < a + az_ for a, az_, b, bz in zip(o, z, ao, az)):
                raise bad(f"tensor {key}: chunks at {list(ao)} and {list(o)} overlap")
        active.append((o, z))


def _parse_key(key: str) -> tuple[str, int | None, tuple[int, ...] | None]:
    """``base[@layer][#o0,o1,...]`` -> (base, layer index or None, chunk offsets or None)."""
    rest, _, chunk = key.partition("#")
    base, _, sel = rest.partition("@")
    return base, (int(sel) if sel else None), (tuple(int(x) for x in chunk.split(",")) if chunk else None)


def _map_saved_tensor(f, path: Path, offset: int, length: int, dtype: torch.dtype, sizes: tuple) -> torch.Tensor | None:
    """Memory-map the data record of a ``torch.save``d contiguous tensor of ``length`` bytes at ``offset`` in ``f``.

    DCP writes each chunk as a torch.save zip whose ``*/data/0`` record is stored uncompressed. The record is
    used only when its size is exactly ``prod(sizes) * itemsize`` of the dtype the DCP metadata declares;
    anything else returns None and the caller falls back to ``torch.load``.
    """
    import numpy as np

    try:
        with zipfile.ZipFile(_Window(f, offset, length)) as z:
            names = [zi for zi in z.infolist() if zi.filename.endswith("/data/0")]
            if len(names) != 1 or len([zi for zi in z.infolist() if "/data/" in zi.filename]) != 1:
                return None
            zi = names[0]
            if zi.compress_type != zipfile.ZIP_STORED:
                return None
            f.seek(offset + zi.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = offset + zi.header_offset + 30 + name_len + extra_len
    except (zipfile.BadZipFile, OSError, ValueError):
        return None
    numel = 1
    for n in sizes:
        numel *= n
    itemsize = torch.empty((), dtype=dtype).element_size()
    if zi.file_size != numel * itemsize or start + zi.file_size > offset + length:
        return None
    if numel == 0:
        return torch.empty(sizes, dtype=dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=start, shape=(zi.file_size,))
    return torch.from_numpy(raw).view(dtype).reshape(sizes)


class _Window(io.RawIOBase):
    """A read-only view of ``length`` bytes of ``f`` at ``offset`` (a DCP item is a torch.save zip inside a
    .distcp file)."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def dtype_of(t: torch.dtype) -> DType:
    return DType.from_torch(t)


def tensor_type(t: torch.Tensor | tuple) -> TensorType:
    if isinstance(t, torch.Tensor):
        return TensorType(DType.from_torch(t.dtype), tuple(t.shape))
    dt, shape = t
    return TensorType(DType.from_torch(dt), tuple(shape))

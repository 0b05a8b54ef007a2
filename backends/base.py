"""What every backend shares: the Backend interface and registry, compile options, the streaming safetensors
writer and the manifest. Atomic output directories and safe file creation live in :mod:`.output`, the
block writer of one file in :mod:`.outfile` (both re-exported here).

The streaming writer computes a file's header from the IR types before it reads any weight, then
materializes, writes and frees one tensor at a time, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import contextlib

import json
import struct
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..errors import BackendError
from ..ir import Model, TensorType
from ..ir.types import DType
from .options import (CompileOptions, HFOptions, OnnxOptions, TensorRTOptions,  # noqa: F401 - re-exported
                      TrtllmOptions)  # (torch-free: the CLI checks flags with them)
from .outfile import OutputFile, direct_io_enabled, worker_thread_init  # noqa: F401 - re-exported
from .output import MANIFEST, atomic_directory, check_output, open_new, write_new  # noqa: F401 - re-exported


@dataclass
class EmitResult:
    out: Path
    files: dict[str, int] = field(default_factory=dict)   # relative path -> bytes
    tensors: int = 0
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, dict[str, str]] = field(default_factory=dict)  # file -> tensor -> checksum


class Backend:
    """Lowers a model to one target. Subclasses set ``name`` (and ``options``, the dataclass of what the target
    reads) and implement the four steps."""

    name = "abstract"
    description = ""
    options: type[CompileOptions] = CompileOptions   # what the target takes: a subclass of it (backends/options.py)

    def legalize_pipeline(self, opts: CompileOptions, model: Model) -> str:
        """The passes (pipeline text) that bring a lifted model into the form ``emit`` takes."""
        return ""

    def legalize(self, opts: CompileOptions, model: Model) -> list:
        """The passes (objects) that bring a lifted model into the form ``emit`` takes; by default parsed from
        :meth:`legalize_pipeline` (the hf and trtllm backends build them from their target class)."""
        from ..passes import parse_pipeline

        return parse_pipeline(self.legalize_pipeline(opts, model))

    def check(self, model: Model, opts: CompileOptions) -> list[str]:
        """What this target cannot lower (each with a hint); empty = fine."""
        return []

    def preflight(self, out: Path, opts: CompileOptions) -> None:
        """Fail before any work when the options cannot succeed here (``--build always`` without the tool)."""

    def emit(self, model: Model, out: Path, opts: CompileOptions, progress=None) -> EmitResult:
        raise NotImplementedError

    def build(self, out: Path, opts: CompileOptions, log: Callable[[str], None]) -> list[str]:
        """Make engines where the tool is installed; returns notes. Default: nothing to build."""
        return []

    def artifact_logits(self, out: Path, manifest: dict, tokens) -> tuple[torch.Tensor, str] | None:
        """For ``mexc verify`` on a plugin target: prefill logits ``[b, s, V]`` (float32) of the output in ``out``
        computed by the runtime that serves it, and one line naming that runtime; None: verify can only check
        the checksums. The built-in targets' runtimes live in :mod:`mexc.tools.verify`."""
        return None


BACKENDS: dict[str, Backend] = {}


def register_backend(b: Backend) -> Backend:
    if b.name in BACKENDS:
        raise BackendError(f"backend {b.name!r} registered twice")
    BACKENDS[b.name] = b
    return b


_ALLOCATOR_TUNED = False


def tune_allocator() -> None:
    """Make glibc return freed tensor memory to the OS at once.

    glibc raises its mmap threshold after large frees, after which freed weight buffers stay in the heap and
    RSS creeps up to several times the largest tensor. A fixed 1 MiB threshold keeps every weight-sized
    buffer in its own mapping, released when the tensor is freed (measured: peak 680 MB -> 390 MB writing a
    620 MB model whose largest tensor is 131 MB). A no-op where glibc's mallopt is unavailable.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)   # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def intra_op_threads(n: int = 1):
    """torch's intra-op thread count set to ``n`` for the duration (restored after).

    An emit runs its own threads (per output file: read-ahead, producer, writer, flusher; ``--jobs`` files at
    once), and the copies and casts it asks of torch are memory-bound. With torch's default of one OpenMP
    thread per core, each copy forked a team whose idle threads then spin-wait in libgomp: on 2 cores a
    perf profile of an hf compile spent 56 % of its samples there, and ``OMP_NUM_THREADS=1`` halved the CPU
    time of a 1.8 GB compile (4.8 -> 2.1 s user) and cut a 1.8 GB int4 ONNX compile from 24-34 s to
    16-21 s. Threads started during the emit take the count at their first parallel op
    (``at::internal::lazy_init_num_threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_bytes(model: Model) -> int:
    """Budget of the shared materialization cache: the largest weight (at least 64 MiB), so peak memory stays
    near two of the largest tensors: one cached, one being written."""
    largest = max((p.type.nbytes for _, _, p in model.graph.params()), default=0)
    return max(64 << 20, largest)


# ------------------------------------------------------------------------------------ safetensors

_ST_DTYPE = {DType.f32: "F32", DType.bf16: "BF16", DType.f16: "F16", DType.f8e4m3: "F8_E4M3", DType.i8: "I8",
             DType.i64: "I64"}
_ALIGN = 8


@dataclass
class TensorEntry:
    name: str
    type: TensorType
    produce: Callable[[], torch.Tensor | list]  # a list = pieces stacked on dim 0 (views, ColumnCats)
    release: Callable[[], None] | None = None  # called once the tensor is written (drops mapped source pages)
    prefetch: Callable[[], None] | None = None  # called while the previous tensor is produced (starts readahead)


def recipe_entry(name: str, r, cache=None) -> TensorEntry:
    """The entry that writes recipe ``r`` as tensor ``name`` (pieces from ``cache``-shared materialization)."""
    return TensorEntry(name, r.type, lambda: r.materialize_parts(cache), r.release, r.prefetch)


def safetensors_header(entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    off = 0
    for e in entries:
        if e.type.dtype not in _ST_DTYPE:
            raise BackendError(f"tensor {e.name}: dtype {e.type.dtype.value} cannot be stored in safetensors as is",
                               hint="pack int4 weights into int8 in the backend")
        n = e.type.numel * (e.type.dtype.bits // 8)
        header[e.name] = {"dtype": _ST_DTYPE[e.type.dtype], "shape": list(e.type.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    raw += b" " * ((-len(raw)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


CHECKSUM = "xxh3-128"


def checksum(data) -> str:
    """The manifest's per-tensor checksum of a buffer: xxh3-128 (20 GB/s; sha256 cost a fifth of a compile's
    time). Writers compute it as they stream, with :func:`new_checksum`."""
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def _tensor_pieces(path: Path, e: TensorEntry) -> list:
    """The entry's pieces (tensors of any strides, or ColumnCats), stacked on dim 0; checked against the header."""
    out = e.produce()
    parts = out if isinstance(out, list) else [out]
    rows = sum(p.shape[0] if p.dim() else 1 for p in parts)
    ok = all(p.dtype == e.type.dtype.torch and tuple(p.shape[1:]) == e.type.shape[1:] for p in parts)
    if not ok or (e.type.shape and rows != e.type.shape[0]) or (not e.type.shape and len(parts) != 1):
        got = ", ".join(f"{p.dtype}{list(p.shape)}" for p in parts)
        raise BackendError(f"{path.name}: tensor {e.name} materialized as {got}, the header says {e.type}",
                           hint="this is a bug in a recipe or a backend")
    return [p for p in parts if p.numel()]


def new_checksum():
    """An incremental manifest checksum (``update(buffer)``, ``hexdigest()``); see :func:`checksum`."""
    import xxhash

    return xxhash.xxh3_128()


READAHEAD_BYTES = 512 << 20   # how far the read-ahead thread runs in front of the writer

# Set by the CLI's SIGINT/SIGTERM/SIGHUP handler (and cleared when a command starts): every writer stops within one
# tensor, even where the KeyboardInterrupt itself reaches the main thread late.
INTERRUPTED = threading.Event()


class Cancelled(Exception):
    """Another writer failed or the user interrupted: stop writing (the output is discarded)."""


def write_safetensors(path: Path, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str, int], None] | None = None, cancel=None) -> dict[str, str]:
    """Stream ``entries`` into ``path``; returns name -> xxh3-128 checksum of each tensor's bytes.

    Four threads keep the disk and both cores busy, and no tensor is copied on its way unless an op computes:
    a read-ahead thread has the stores read the next entries (up to ``READAHEAD_BYTES`` past the writer), a
    producer materializes the next entry's pieces (mostly views of memory-mapped checkpoint pages), this
    thread copies the pieces into the output's staging buffer and checksums them, and the output's flusher
    writes full buffers to the device (:class:`OutputFile`). At most two entries are alive at once.
    ``cancel`` (a ``threading.Event``) stops it between tensors.
    """
    import queue

    entries = sorted(entries, key=lambda e: e.name)
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BackendError(f"{path.name}: duplicate tensor names {dup[:5]}", hint="this is a bug in a name table")
    sums: dict[str, str] = {}
    slots = threading.Semaphore(2)          # entries alive at once
    handoff: queue.Queue = queue.Queue()
    stop = threading.Event()
    written = [0]                           # entries written so far
    moved = threading.Condition()

    def cancelled() -> bool:
        return stop.is_set() or INTERRUPTED.is_set() or (cancel is not None and cancel.is_set())

    def readahead():
        worker_thread_init()
        for j, e in enumerate(entries):
            with moved:
                while not stop.is_set() and j > written[0] and \
                        sum(x.type.nbytes for x in entries[written[0]:j + 1]) > READAHEAD_BYTES:
                    moved.wait(0.5)
            if stop.is_set():
                return
            if e.prefetch and j >= written[0]:
                try:
                    e.prefetch()
                except Exception:  # noqa: BLE001 - only a hint: reading the entry reports the problem
                    pass

    def produce():
        worker_thread_init()
        try:
            for e in entries:
                slots.acquire()
                if cancelled():
                    handoff.put((None, None, Cancelled(path.name)))
                    return
                handoff.put((e, _tensor_pieces(path, e), None))
        except BaseException as exc:  # surfaced in the writer thread
            handoff.put((None, None, exc))

    with OutputFile(path) as f:
        f.write(safetensors_header(entries, metadata))
        threads = [threading.Thread(target=readahead, name="mexc-readahead", daemon=True),
                   threading.Thread(target=produce, name="mexc-produce", daemon=True)]
        for t in threads:
            t.start()
        try:
            for i in range(len(entries)):
                e, pieces, exc = handoff.get()
                if exc is not None:
                    raise exc
                if cancelled():
                    raise Cancelled(path.name)
                h = new_checksum()
                for piece in pieces:
                    f.write(piece, h)
                sums[e.name] = h.hexdigest()
                del pieces
                if e.release:
                    e.release()
                with moved:
                    written[0] = i + 1
                    moved.notify_all()
                if on_tensor:
                    on_tensor(e.name, e.type.nbytes)
                slots.release()
        finally:
            stop.set()
            slots.release()
            slots.release()
            with moved:
                moved.notify_all()
            for t in threads:
                t.join()
    return sums


# ------------------------------------------------------------------------------------ manifest


def write_manifest(out: Path, *, model: Model, opts: CompileOptions, pipeline: str,
                   checksums: dict[str, dict[str, str]], extra: dict | None = None) -> None:
    import mexc

    versions = {"mexc": mexc.__version__, "torch": torch.__version__.split("+")[0]}
    manifest = {
        "producer": "mexc",
        "versions": versions,
        "target": opts.target,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("force", "jobs", "pipeline")},
        "pipeline": pipeline,
        "source": {k: model.meta.get(k) for k in ("source", "format", "iteration", "checkpoint") if k in model.meta},
        "model": {"family": model.config.family, "parameters": model.param_count(),
                  "layers": model.config.num_layers, "vocab_size": model.config.vocab_size,
                  "dtype": model.config.dtype.long_name},
        "checksum": CHECKSUM,
        "files": checksums,
        **(extra or {}),
    }
    write_new(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

"""A ``torch_dist`` (PyTorch DCP) checkpoint as a :class:`mexc.ir.Store`: the ``.metadata`` index validated
before use (:func:`validate_dcp`), each chunk read from its byte range in a ``.distcp`` file (memory-mapped in
place when it is a plain record)."""

from __future__ import annotations

import io
import math
import os
import re
import threading
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError
from ...ir import Store, register_store
from .layout import inside
from .legacy_store import _advise_file
from .safe_load import load_dcp_metadata, torch_load_file

# optimizer state (also under a ChainedOptimizer's chained_N. prefix) and RNG state are not model weights
_NOT_MODEL = re.compile(r"^(chained_\d+\.)?(optimizer\.|rng_state)")


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

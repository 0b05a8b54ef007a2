"""Reading ``torch.save`` files and DCP ``.metadata`` from an untrusted checkpoint.

Every pickle goes through :mod:`.unpickle` (one policy: exact names, inert stand-ins, bounded results); the
tensor data of a ``torch.save`` file is validated before it is used:

* zip format (torch >= 1.6): every record is stored uncompressed, exactly once, and a storage's record holds
  exactly ``numel * itemsize`` bytes; tensors are memory-mapped views of their record (nothing read until a
  backend touches them) or, from a file-like object, copies of it;
* legacy format (torch < 1.6): each storage's length prefix must equal the size its pickle declares and the bytes
  must be in the file;
* every tensor's ``storage_offset``, sizes and strides are non-negative, do not overflow, stay inside their
  storage, and do not overlap (a stride-0 ``expand()`` view that declares gigabytes from a few bytes is refused).

Errors are :class:`~mexc.errors.CheckpointError` / :class:`~mexc.errors.UnsafeCheckpointError` naming the file.
Format reference: ``torch/serialization.py`` (``_save``, ``_load``, ``_legacy_load``).
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from ...errors import CheckpointError, UnsafeCheckpointError
from . import unpickle

MAX_PICKLE_BYTES = 256 << 20   # one data.pkl / .metadata; real ones are kilobytes to a few MB
_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER (legacy format)
_LEGACY_PROTOCOL = 1001


class _Storage:
    """A storage a pickle refers to: ``data`` is a flat uint8 tensor of its bytes (mapped or copied)."""

    __slots__ = ("data", "dtype", "numel")

    def __init__(self, data: torch.Tensor, dtype: torch.dtype, numel: int):
        self.data, self.dtype, self.numel = data, dtype, numel

    def typed(self) -> torch.Tensor:
        if self.numel == 0:
            return torch.empty(0, dtype=self.dtype)
        d = self.data
        if d.data_ptr() % torch.empty((), dtype=self.dtype).element_size():
            d = d.clone()
        return d.view(self.dtype)


def _storage_types() -> dict[tuple[str, str], torch.dtype]:
    m = torch.storage._dtype_to_storage_type_map()
    out = {("torch", name): dt for dt, name in m.items()}
    out[("torch", "UntypedStorage")] = torch.uint8
    return out


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


def _checked_view(storage, offset, size, stride) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise UnsafeCheckpointError("a tensor rebuilt from something that is not a saved storage")
    if not (isinstance(offset, int) and all(isinstance(x, int) for x in (*size, *stride))) or len(size) != len(stride):
        raise CheckpointError("a tensor with malformed offset, size or stride")
    if offset < 0 or any(x < 0 for x in (*size, *stride)):
        raise CheckpointError(f"a tensor with a negative offset, size or stride ({offset}, {tuple(size)}, {tuple(stride)})")
    if any(n == 0 for n in size):
        return torch.empty(tuple(size), dtype=storage.dtype)
    # non-overlapping: sorted by stride, each stride reaches past the span of the smaller dims
    span = 1
    for n, st in sorted(((n, st) for n, st in zip(size, stride) if n > 1), key=lambda x: x[1]):
        if st < span:
            raise CheckpointError(f"a tensor whose elements overlap (size {tuple(size)}, stride {tuple(stride)}; "
                                  "an expand() view)", hint="save the tensor with .contiguous() or .clone()")
        span = st * (n - 1) + span
    if offset + span > storage.numel:
        raise CheckpointError(f"a tensor reaches past its storage ({offset} + {span} > {storage.numel} elements)")
    base = storage.typed()  # may itself be a view of the whole mapped file: offsets add up
    return base.as_strided(tuple(size), tuple(stride), base.storage_offset() + offset)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _checked_view(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _checked_view(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise UnsafeCheckpointError("a Parameter of something that is not a tensor")
    return data


_TENSOR_TYPES = object(), object()


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type not in _TENSOR_TYPES:
        raise UnsafeCheckpointError("a tensor subclass outside the allow-list")
    return func(*args)


def _torch_rows() -> dict[tuple[str, str], Any]:
    rows: dict[tuple[str, str], Any] = {k: _StorageType(dt) for k, dt in _storage_types().items()}
    rows[("torch._utils", "_rebuild_tensor_v2")] = _rebuild_tensor_v2
    rows[("torch._utils", "_rebuild_tensor")] = _rebuild_tensor
    rows[("torch._utils", "_rebuild_parameter")] = _rebuild_parameter
    rows[("torch._utils", "_rebuild_parameter_with_state")] = _rebuild_parameter
    rows[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    rows[("torch", "Tensor")] = rows[("torch._tensor", "Tensor")] = _TENSOR_TYPES[0]
    rows[("torch.nn.parameter", "Parameter")] = _TENSOR_TYPES[1]
    return rows


unpickle.POLICY.update(_torch_rows())


# ------------------------------------------------------------------------------------------ zip format


def _record_start(f, base: int, zi: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored record's bytes (after its local header) in ``f``."""
    f.seek(base + zi.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError("a zip record without its local header")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return base + zi.header_offset + 30 + name_len + extra_len


def _load_zip(f, what: str, *, size: int, path: Path | None) -> Any:
    """A torch zip file from ``f`` (``size`` bytes from its current position 0); mapped when ``path`` is given."""
    # torch's writer starts with a local header and ends with the end-of-directory record (no comment): a
    # window shifted or cut by a lying offset/length is refused, although zipfile itself would tolerate it
    f.seek(0)
    head = f.read(4)
    f.seek(max(size - 22, 0))
    tail = f.read(4)
    f.seek(0)
    if head != b"PK\x03\x04" or tail != b"PK\x05\x06":
        raise CheckpointError(f"{what}: corrupt or truncated (not a whole torch.save zip: its bytes do not start "
                              "and end where a zip does)", hint="the file or the DCP index is damaged; copy the "
                              "checkpoint again")
    try:
        z = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{what}: not a readable torch file ({e})") from None
    infos = z.infolist()
    names = [zi.filename for zi in infos]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{what}: a zip record name appears twice", hint="the file was tampered with")
    pkl = [zi for zi in infos if zi.filename.endswith("/data.pkl") and zi.filename.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(f"{what}: not a torch.save file (no single */data.pkl record)")
    prefix = pkl[0].filename[: -len("data.pkl")]
    by_name = {zi.filename: zi for zi in infos}
    for zi in infos:
        if zi.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{what}: compressed record {zi.filename} (torch never compresses)",
                                  hint="the file was not written by torch.save")
        if zi.header_offset < 0 or zi.header_offset + zi.file_size > size:
            raise CheckpointError(f"{what}: record {zi.filename} lies outside the file (truncated?)",
                                  hint="copy the checkpoint again")
    bo = by_name.get(prefix + "byteorder")
    if bo is not None and z.read(bo) not in (b"little",):
        raise CheckpointError(f"{what}: big-endian torch file", hint="re-save it on a little-endian machine")
    if pkl[0].file_size > MAX_PICKLE_BYTES:
        raise UnsafeCheckpointError(f"{what}: data.pkl of {pkl[0].file_size} bytes is larger than any real one")
    whole = None
    if path is not None and size:
        whole = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage.from_file(str(path), False, size))
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise UnsafeCheckpointError(f"malformed storage reference {str(pid)[:80]}")
        if key in storages:
            st = storages[key]
            if st.dtype != stype.dtype or st.numel != numel:
                raise CheckpointError(f"{what}: storage {key} declared twice with different types")
            return st
        zi = by_name.get(f"{prefix}data/{key}")
        if zi is None:
            raise CheckpointError(f"{what}: storage record data/{key} is missing", hint="copy the checkpoint again")
        nbytes = numel * torch.empty((), dtype=stype.dtype).element_size()
        if zi.file_size != nbytes:
            raise CheckpointError(f"{what}: storage data/{key} holds {zi.file_size} bytes but declares {numel} "
                                  f"elements of {stype.dtype} ({nbytes} bytes)", hint="copy the checkpoint again")
        if whole is not None:
            start = _record_start(f, 0, zi)
            if start + nbytes > size:
                raise CheckpointError(f"{what}: storage data/{key} runs past the end of the file")
            data = whole[start:start + nbytes]
        else:
            data = torch.frombuffer(bytearray(z.read(zi)), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        storages[key] = st = _Storage(data, stype.dtype, numel)
        return st

    with z.open(pkl[0]) as pf:
        return unpickle.SafeUnpickler(io.BufferedReader(pf), persistent_load=persistent_load).load()


# --------------------------------------------------------------------------------------- legacy format


def _load_legacy(f, what: str, size: int) -> Any:
    """torch < 1.6 files: magic, protocol, sys info, the object pickle, the storage keys, then each storage as
    an int64 element count and its bytes. Storages are allocated when the pickle names them, only while the
    bytes they declare still fit in the rest of the file."""
    if unpickle.SafeUnpickler(f).load() != _MAGIC:
        raise CheckpointError(f"{what}: not a torch.save file (bad magic number)")
    if unpickle.SafeUnpickler(f).load() != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{what}: unknown legacy torch file protocol")
    unpickle.SafeUnpickler(f).load()  # sys info
    roots: dict[str, _Storage] = {}
    budget = [size - f.tell()]

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {str(pid)[:80]}")
        _, stype, key, _loc, numel, view = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise UnsafeCheckpointError(f"malformed storage reference {str(pid)[:80]}")
        root = roots.get(key)
        if root is None:
            nbytes = numel * _itemsize(stype.dtype)
            budget[0] -= nbytes + 8
            if budget[0] < 0:
                raise CheckpointError(f"{what}: storages declare more bytes than the file holds (truncated?)",
                                      hint="copy the checkpoint again")
            root = roots[key] = _Storage(torch.empty(nbytes, dtype=torch.uint8), stype.dtype, numel)
        elif root.dtype != stype.dtype or root.numel != numel:
            raise CheckpointError(f"{what}: storage {key} declared twice with different types")
        if view is None:
            return root
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(x, int) for x in view[1:])):
            raise UnsafeCheckpointError(f"malformed storage view {str(view)[:80]}")
        _vkey, voff, vsize = view
        if voff < 0 or vsize < 0 or voff + vsize > root.numel:
            raise CheckpointError(f"{what}: a storage view reaches past storage {key}")
        isz = _itemsize(root.dtype)
        return _Storage(root.data[voff * isz:(voff + vsize) * isz], root.dtype, vsize)

    result = unpickle.SafeUnpickler(f, persistent_load=persistent_load).load()
    keys = unpickle.SafeUnpickler(f).load()
    if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(roots):
        raise CheckpointError(f"{what}: the storage key list does not match the storages the pickle uses")
    for key in keys:
        root = roots[key]
        head = f.read(8)
        if len(head) != 8 or struct.unpack("<q", head)[0] != root.numel:
            raise CheckpointError(f"{what}: storage {key} declares {root.numel} elements but its record says "
                                  "otherwise (truncated?)", hint="copy the checkpoint again")
        if f.readinto(memoryview(root.data.numpy())) != root.data.numel():
            raise CheckpointError(f"{what}: storage {key} runs past the end of the file", hint="copy it again")
    return result


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------- entry points


def _wrap(what: str, fn):
    try:
        return fn()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{what}: {e.message}",
                                    hint=e.hint or "mexc never runs code from a checkpoint; re-save the state "
                                    "with plain tensors and argparse args if the file is yours") from None
    except CheckpointError as e:
        msg = e.message if e.message.startswith(what) else f"{what}: {e.message}"
        raise CheckpointError(msg, hint=e.hint or "the file is corrupt or truncated; copy it again") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, RuntimeError, OverflowError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        text = str(e).splitlines()[0][:160] if str(e) else ""
        raise CheckpointError(f"{what}: cannot be read ({type(e).__name__}{': ' + text if text else ''})",
                              hint="the file is corrupt or truncated; copy it again from the source") from None
    except RecursionError:
        raise UnsafeCheckpointError(f"{what}: nested too deeply to be a real checkpoint") from None
    except MemoryError:
        raise UnsafeCheckpointError(f"{what}: declares more memory than this machine has") from None


def open_regular(path: Path):
    """Open ``path`` for reading only if it is a regular file (a FIFO or device never blocks or streams)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", hint="copy the whole checkpoint directory") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror})", hint="check its permissions") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file", hint="a checkpoint holds only plain files")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def torch_load(path: Path, *, mmap: bool = True) -> Any:
    """A ``torch.save`` file under mexc's unpickling policy; tensors memory-mapped (zip format, ``mmap``)."""
    path = Path(path)
    f, size = open_regular(path)
    with f:
        if f.read(4) == b"PK\x03\x04":  # a zip (torch >= 1.6), whole or not: _load_zip says which
            f.seek(0)
            return _wrap(str(path), lambda: _load_zip(f, str(path), size=size, path=path if mmap else None))
        f.seek(0)
        return _wrap(str(path), lambda: _load_legacy(f, str(path), size))


def torch_load_file(f, what: str) -> Any:
    """A ``torch.save`` zip from a seekable file-like object (a DCP item); tensors are copied out of it."""
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    return _wrap(what, lambda: _load_zip(f, what, size=size, path=None))


def load_dcp_metadata(path: Path):
    """A DCP ``.metadata`` file (a pickled ``torch.distributed.checkpoint.metadata.Metadata``)."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    f, size = open_regular(path)
    with f:
        if size > MAX_PICKLE_BYTES:
            raise UnsafeCheckpointError(f"{path}: {size} bytes, larger than any real DCP index")
        meta = _wrap(str(path), lambda: unpickle.SafeUnpickler(f).load())
    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path}: not a DCP index (holds a {type(meta).__name__})",
                              hint="the file is damaged; copy the checkpoint again")
    return meta

""".nemo archives read in place: an uncompressed tar indexed once (every member validated), and a torch_dist
store whose files are byte ranges of the archive (NeMo's own exporter reads .nemo files the same way, through its
``TarPath``; nothing is extracted)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path, PurePosixPath

from ...errors import CheckpointError
from ...ir import register_store
from .reader import DcpStore, validate_dcp
from .safe_load import MAX_PICKLE_BYTES, _wrap
from .unpickle import SafeUnpickler

MAX_MEMBERS = 1 << 20            # members of a .nemo archive


class TarTree:
    """An uncompressed tar (a ``.nemo``) indexed once: member name -> (data offset, size). Every member is checked
    before any is used: a plain file or a directory, a relative name without ``..``, its data inside the archive,
    no name twice."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00":
            raise CheckpointError(f"{path}: a compressed archive; mexc reads .nemo tars in place, which needs an "
                                  "uncompressed tar", hint=f"unpack it (tar xf {path.name}) and give the directory")
        size = os.path.getsize(path)
        self.files: dict[str, tuple[int, int]] = {}
        self.dirs: set[str] = {""}
        try:
            with tarfile.open(path, "r:") as tar:
                for n, m in enumerate(tar):
                    if n >= MAX_MEMBERS:
                        raise self._bad(f"more than {MAX_MEMBERS} members")
                    self._add(m, size)
        except tarfile.TarError as e:
            raise CheckpointError(f"{path}: not a readable tar archive ({str(e)[:80]})",
                                  hint="copy the .nemo file again") from None

    def _bad(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}", hint="a .nemo archive holds plain files and directories only; "
                               "the archive is damaged or was tampered with")

    def _add(self, m: tarfile.TarInfo, size: int) -> None:
        p = PurePosixPath(m.name)
        parts = [x for x in p.parts if x != "."]
        if p.is_absolute() or ".." in parts or any("\\" in x or "\x00" in x for x in parts):
            raise self._bad(f"member {m.name[:80]!r} has an absolute or '..' name")
        name = "/".join(parts)
        if m.isdir():
            self.dirs.add(name)
            return
        if not m.isreg() or m.sparse is not None:
            raise self._bad(f"member {m.name[:80]!r} is not a plain file (a link, device or sparse file)")
        if name in self.files or name in self.dirs:
            raise self._bad(f"member {name[:80]!r} appears twice")
        if m.offset_data + m.size > size:
            raise self._bad(f"member {name[:80]!r} extends past the end of the archive (truncated?)")
        self.files[name] = (m.offset_data, m.size)
        for i in range(1, len(parts)):
            self.dirs.add("/".join(parts[:i]))

    def label(self, rel: str) -> str:
        return f"{self.path}:{rel}" if rel else str(self.path)

    def is_file(self, rel: str) -> bool:
        return rel in self.files

    def is_dir(self, rel: str) -> bool:
        return rel in self.dirs

    def read(self, rel: str, limit: int) -> bytes:
        off, n = self.files[rel]
        if n > limit:
            raise self._bad(f"member {rel} has {n} bytes; more than {limit}")
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)


@register_store
class TarDcpStore(DcpStore):
    """A torch_dist checkpoint stored as the ``inner`` directory of an uncompressed tar (a ``.nemo``), read in
    place: each DCP file is the byte range of its tar member."""

    kind = "megatron-dist-tar"

    def __init__(self, name: str, archive: str, inner: str, prefix: str = ""):
        super().__init__(name, f"{archive}:{inner}", prefix)
        self.archive, self.inner = archive, inner
        self._tree: TarTree | None = None

    def spec(self):
        return {"archive": self.archive, "inner": self.inner, **({"prefix": self.prefix} if self.prefix else {})}

    def _members(self) -> TarTree:
        if self._tree is None:
            self._tree = TarTree(Path(self.archive))
        return self._tree

    def _member(self, name: str) -> tuple[int, int]:
        got = self._members().files.get(f"{self.inner}/{name}")
        if got is None:
            raise CheckpointError(f"{self.archive}: no member {self.inner}/{name}",
                                  hint="the archive is incomplete; copy the .nemo file again")
        return got

    def _file(self, name: str) -> tuple[Path, int, int | None]:
        off, n = self._member(name)
        return Path(self.archive), off, n

    def _load_metadata(self):
        from torch.distributed.checkpoint.metadata import Metadata

        where = f"{self.archive}:{self.inner}/.metadata"
        data = self._members().read(f"{self.inner}/.metadata", MAX_PICKLE_BYTES) \
            if self._members().is_file(f"{self.inner}/.metadata") else None
        if data is None:
            raise CheckpointError(f"{where}: missing", hint="copy the .nemo file again")
        meta = _wrap(where, lambda: SafeUnpickler(io.BytesIO(data)).load())
        if not isinstance(meta, Metadata):
            raise CheckpointError(f"{where}: not a DCP index (holds a {type(meta).__name__})",
                                  hint="the archive is damaged; copy it again")
        validate_dcp(meta, Path(self.root), file_size=lambda n: self._member(n)[1])
        return meta

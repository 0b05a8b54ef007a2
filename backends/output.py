"""Output directories that appear whole or not at all, and files that are never written through a link.

:func:`atomic_directory` yields a private (mode 0700, whatever the umask) temporary directory beside ``OUT``;
on success it is given the umask's mode and takes ``OUT``'s place in one step, on failure it vanishes. Every
file mexc writes there is created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (:func:`open_new`, :func:`write_new`), so
a file or symbolic link planted in the directory is refused, never followed.

``--force`` replaces only an earlier mexc output (a directory holding a regular ``mexc-manifest.json`` whose
``producer`` is ``mexc``), never a symbolic link, the current directory or a directory containing it. The
swap is ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15; ext4, xfs, btrfs, tmpfs, ...): ``OUT`` is always
either the old or the new output. Where the kernel, libc or file system lacks it (``ENOSYS``/``EINVAL``/
``EOPNOTSUPP``, e.g. NFS), the old output is first moved into a marked box beside ``OUT``, then the new
one renamed in; a failure between the two moves the old output back, or names where it is. SIGINT,
SIGTERM and SIGHUP arriving during the swap are delivered after it (the CLI then says the output is
complete); after a ``kill -9`` between the two renames, the next run into the same parent puts the old
output back.

Temporary names are ``.{stem}.mexc-{tmp|old}-{host}-{pid}-{random}``: ``stem`` is ``OUT``'s name, cut and
hashed where the whole name would pass ``NAME_MAX``; ``host`` is 8 hex digits of a hash of the host name;
``pid`` is the writing process. The next run into the same parent removes such directories of this host and
user whose process is gone (a killed run's leftovers), and puts back an old output whose swap was cut short.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from ..errors import BackendError, MexcError, UsageError

MANIFEST = "mexc-manifest.json"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_NAME = re.compile(r"^\.(?P<stem>.*)\.mexc-(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-"
                   r"[a-z0-9_]{8}$", re.S)
_PREV, _TARGET = "prev", "target"   # inside an "old" box: the previous output and the name it had


class InterruptedAfterCommit(KeyboardInterrupt):
    """A signal arrived while ``out`` was being swapped in; it was delivered once the complete output was in
    place."""

    def __init__(self, out: Path):
        super().__init__(f"interrupted after {out} was written in full")
        self.out = out


COMMITTED: list[Path] = []
"""Outputs swapped in by this process, as the user named them (:func:`output_dir` appends): a signal that
arrives later, while the command finishes (a summary, an engine build), must not be reported as "nothing was
left behind"."""


# ------------------------------------------------------------------------------------ files


def open_new(path: Path) -> int:
    """Create ``path`` for writing (``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0666 & ~umask); returns the fd.

    Raises :class:`BackendError` when anything (a file, a symbolic link, dangling or not) is already there."""
    try:
        return os.open(path, _CREATE, 0o666)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ELOOP):
            raise
        raise BackendError(f"{path}: something is already there (a file or symbolic link planted in the "
                           "output?); mexc never writes through one",
                           hint="make sure nothing else writes into the output directory while mexc runs"
                           ) from None


def write_new(path: Path, data: bytes | str) -> int:
    """Write ``data`` (str as UTF-8) to a new file (see :func:`open_new`); returns the byte count."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    fd = open_new(path)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return len(raw)


# ------------------------------------------------------------------------------------ checks


def is_mexc_output(path: Path) -> bool:
    """``path`` holds a regular ``mexc-manifest.json`` (not a link, FIFO or device) written by mexc."""
    try:
        fd = os.open(Path(path) / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > (64 << 20):
            return False
        with os.fdopen(fd, "rb", closefd=False) as f:
            doc = json.loads(f.read())
        return isinstance(doc, dict) and doc.get("producer") == "mexc"
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)


def _within(inner: str, outer: str) -> bool:
    """Real path ``inner`` is ``outer`` or below it."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def check_output(out: Path, force: bool) -> None:
    """Refuse an ``-o`` that must not be written or replaced (a :class:`UsageError` naming it and the fix)."""
    path = Path(os.path.abspath(out))
    limit = name_max(path.parent)
    if len(os.fsencode(path.name)) > limit:
        raise UsageError(f"{out}: the name is longer than {limit} bytes, the file system's limit",
                         hint="choose a shorter -o")
    if not os.path.lexists(path):
        return
    if path.is_symlink():
        raise UsageError(f"{out}: is a symbolic link; mexc does not write or replace through links",
                         hint="give the real directory as -o, or another name")
    if _within(os.path.realpath(os.getcwd()), os.path.realpath(path)):
        raise UsageError(f"{out}: is the current directory (or contains it) and cannot be replaced",
                         hint="run mexc from outside it (e.g. cd .. and give -o by its name)")
    if not path.is_dir():
        raise UsageError(f"{out}: exists and is not a directory", hint="choose another -o")
    if not force:
        raise UsageError(f"{out}: output directory already exists",
                         hint="choose another -o, or pass --force to replace it")
    if not is_mexc_output(path):
        raise UsageError(f"{out}: is not a mexc output (it holds no {MANIFEST}); --force replaces only an "
                         "earlier mexc output", hint=f"choose another -o, or move {out} away yourself")


# ------------------------------------------------------------------------------------ names, leftovers


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def name_max(directory: Path) -> int:
    """``NAME_MAX`` of the file system holding ``directory`` (or its nearest existing ancestor); else 255."""
    d = Path(directory)
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return int(os.pathconf(d, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def temp_prefix(parent: Path, name: str, kind: str, pid: int | None = None) -> str:
    """The prefix of a temporary name (``mkdtemp`` adds 8 characters); at most ``NAME_MAX`` bytes in all."""
    limit = name_max(parent)
    tail = f".mexc-{kind}-{host_tag()}-{os.getpid() if pid is None else pid}-"
    budget = limit - 1 - len(tail) - 8
    raw = os.fsencode(name)
    if len(raw) > budget:
        raw = raw[:budget - 9] + b"~" + hashlib.sha1(raw).hexdigest()[:8].encode()
    return "." + os.fsdecode(raw) + tail


def _make_dir(parent: Path, name: str, kind: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=temp_prefix(parent, name, kind), dir=parent))
    os.chmod(d, 0o700)  # mkdtemp asks for 0700 but a umask can take bits from it
    return d


def _process_gone(pid: int) -> bool:
    if pid < 1 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):
        return False  # alive under another user, or not a pid at all: leave it
    return False


def clean_leftovers(parent: Path) -> list[str]:
    """Remove the temporary directories in ``parent`` of killed mexc runs of this host and user; an old output
    whose ``--force`` swap was cut short goes back to its name when nothing took it. Returns notes."""
    notes: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return notes
    for name in sorted(names):
        m = _NAME.match(name)
        if not m or m["host"] != host_tag() or not _process_gone(int(m["pid"])):
            continue
        d = Path(parent) / name
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            continue
        if m["kind"] == "old":
            with contextlib.suppress(OSError, ValueError):
                target = Path(parent) / os.fsdecode((d / _TARGET).read_bytes())
                if target.parent == Path(parent) and not os.path.lexists(target) and (d / _PREV).is_dir():
                    os.rename(d / _PREV, target)
                    notes.append(f"{target}: put back the previous output, whose replacement "
                                 f"(pid {m['pid']}) was cut short")
        shutil.rmtree(d, ignore_errors=True)
        if not os.path.lexists(d):
            notes.append(f"removed {d.name}, left by a killed mexc run (pid {m['pid']})")
    return notes


# ------------------------------------------------------------------------------------ renames

AT_FDCWD, RENAME_NOREPLACE, RENAME_EXCHANGE = -100, 1, 2
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276}


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)`` through libc (or the raw syscall where libc lacks it). True when done;
    False where this libc, kernel or file system does not offer it (ENOSYS, EINVAL, EOPNOTSUPP); other errors
    raise :class:`OSError`."""
    libc = _libc()
    if libc is None:
        return False
    s, d = os.fsencode(src), os.fsencode(dst)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        rc = fn(AT_FDCWD, s, AT_FDCWD, d, flags)
    elif platform.system() == "Linux" and platform.machine() in _RENAMEAT2_SYSCALL:
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(ctypes.c_long(_RENAMEAT2_SYSCALL[platform.machine()]), ctypes.c_int(AT_FDCWD),
                          ctypes.c_char_p(s), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(d),
                          ctypes.c_uint(flags))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fsdecode(d))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP that reach a Python handler wait until the block is done, then are delivered."""
    if threading.current_thread() is not threading.main_thread():
        yield   # Python runs its handlers in the main thread only: nothing can interrupt this one
        return
    got: list = []
    saved = {}
    for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if s is not None and callable(h := signal.getsignal(s)):
            saved[s] = h
            signal.signal(s, lambda n, f: got.append((n, f)))
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
        for n, f in got:
            saved[n](n, f)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def _swap_in(tmp: Path, out: Path, shown) -> None:
    """Put the complete ``tmp`` at ``out``, replacing an earlier output there (checked by the caller)."""
    if not os.path.lexists(out):
        if not renameat2(tmp, out, RENAME_NOREPLACE):
            os.rename(tmp, out)
        return
    if renameat2(tmp, out, RENAME_EXCHANGE):
        return   # tmp now holds the previous output; the caller removes it
    box = _make_dir(out.parent, out.name, "old")   # no exchange here: a recoverable order
    write_new(box / _TARGET, os.fsencode(out.name))
    os.rename(out, box / _PREV)
    try:
        os.rename(tmp, out)
    except BaseException as e:
        try:
            os.rename(box / _PREV, out)
        except OSError:
            raise BackendError(f"{shown}: replacing it failed ({e}); the previous output is at {box / _PREV}",
                               hint=f"move it back: mv '{box / _PREV}' '{out}'") from e
        shutil.rmtree(box, ignore_errors=True)
        raise
    shutil.rmtree(box, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False,
                     log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a private temporary directory beside ``out``; on success it becomes ``out`` (replacing an earlier
    mexc output with ``force``), on any failure it vanishes. ``log`` receives notes on cleaned leftovers."""
    shown = out
    check_output(out, force)
    out = Path(os.path.abspath(out))
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for note in clean_leftovers(parent):
            (log or (lambda s: None))(note)
        tmp = _make_dir(parent, out.name, "tmp")
    except PermissionError:
        raise BackendError(f"{parent}: no permission to write here",
                           hint="choose an -o you can write to") from None
    except OSError as e:
        raise BackendError(f"{parent}: cannot create the output ({e.strerror})",
                           hint="choose another -o") from None
    replacing = os.path.lexists(out)
    committed = False
    try:
        yield tmp
        with _signals_deferred():
            check_output(shown, force)   # again: the directory may have changed while we wrote
            os.chmod(tmp, 0o777 & ~_umask())   # outputs are shared with serving containers
            _swap_in(tmp, out, shown)
            committed = True
            COMMITTED.append(Path(shown))
        shutil.rmtree(tmp, ignore_errors=True)   # after an exchange: the previous output
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if committed:
            if isinstance(e, KeyboardInterrupt):
                raise InterruptedAfterCommit(Path(shown)) from None
            raise
        if isinstance(e, OSError) and not isinstance(e, MexcError):
            hint = "free some disk space and run again" if getattr(e, "errno", None) == errno.ENOSPC else \
                "check permissions and free space of the output directory"
            left = "the previous output is unchanged" if replacing else "nothing was left behind"
            raise BackendError(f"{shown}: writing failed ({e.strerror or e}); {left}", hint=hint) from e
        raise

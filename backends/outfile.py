"""The sequential writer of one output file: O_DIRECT staging buffers where the file system takes them.

Files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (:func:`~mexc.backends.output.open_new`): a file or
symbolic link already at the path is refused, never followed or truncated.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..ir.tensors import copy_piece
from .output import open_new


def worker_thread_init() -> None:
    """Run first in every thread mexc starts: SIGINT/SIGTERM/SIGHUP stay with the main thread, which waits
    interruptibly and turns them into a clean cancellation (a signal taken by a worker thread would reach
    Python only once the main thread wakes up, i.e. after the compile)."""
    import signal

    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    except (AttributeError, ValueError, OSError):
        pass


def _flat_bytes(piece) -> torch.Tensor:
    """A piece's bytes as a flat uint8 tensor (a copy only where the piece is not contiguous)."""
    t = piece.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def _row_of(piece, r: int) -> list:
    """Row ``r`` of a piece (dim 0 dropped), as pieces stacked on the new dim 0."""
    return [piece.select(0, r)] if isinstance(piece, torch.Tensor) else piece.select_row(r)


def direct_io_enabled() -> bool:
    """O_DIRECT output unless ``MEXC_DIRECT_IO=0`` (or the platform has no O_DIRECT)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("MEXC_DIRECT_IO", "1").strip().lower() not in ("0", "no",
                                                                                                     "false", "off")


class OutputFile:
    """A sequential writer of one output file, in large blocks.

    Where the file system takes ``O_DIRECT`` the bytes go through two page-aligned 16 MiB staging buffers
    straight to the device: one is filled while a flusher thread writes the other. Buffered writes cost about a
    second of kernel time per GB on a virtual disk (the copy into the page cache and its write-back; measured
    here: 12.8 GB in 14.3 s buffered, one core busy, against 6.0 s direct with the core free), a whole core of
    a two-core machine that the readers need. Elsewhere (tmpfs, a file system that refuses O_DIRECT,
    ``MEXC_DIRECT_IO=0``) the writes are plain buffered writes. The file's size is exactly the bytes written
    (the last direct block is padded, then truncated).
    """

    BLOCK = 16 << 20
    ALIGN = 4096

    def __init__(self, path: Path, direct: bool | None = None):
        import fcntl
        import mmap
        from concurrent.futures import ThreadPoolExecutor

        self.path = Path(path)
        self.size = 0
        self.staged = direct_io_enabled() if direct is None else direct
        self.fd = open_new(self.path)   # never through a file or link already there
        if self.staged:
            try:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:  # no O_DIRECT here; anything else is a real error
                    os.close(self.fd)
                    raise
                self.staged = False
        if not self.staged:
            return
        try:
            self._bufs = [mmap.mmap(-1, self.BLOCK) for _ in range(2)]
            self._stages = [torch.frombuffer(b, dtype=torch.uint8) for b in self._bufs]
        except BaseException:
            os.close(self.fd)
            raise
        self._pending: list = [None, None]
        self._cur = 0
        self._fill = 0
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="mexc-flush", initializer=worker_thread_init)

    def write(self, data, h=None) -> None:
        """Append ``data``: bytes, or a piece of a tensor (a tensor of any strides, or a
        :class:`~mexc.ir.tensors.ColumnCat`) as its row-major bytes. ``h`` (see :func:`new_checksum`) is
        updated with the same bytes."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else None
        if data is None or data.numel() == 0:
            return
        self.size += data.numel() * data.dtype.itemsize
        self._put(data.reshape(1) if data.dim() == 0 else data, h)

    def _put(self, data, h) -> None:
        if isinstance(data, torch.Tensor) and data.is_contiguous():  # its bytes as they are: no copy
            b = data.reshape(-1).view(torch.uint8)
            if self.staged:
                self._stage_bytes(b, h)
            else:
                self._write_buffered(b, h)
            return
        rows = data.shape[0]
        row_bytes = data.numel() // rows * data.dtype.itemsize
        if row_bytes > self.BLOCK and data.dim() > 1:  # rows larger than a buffer: row by row, recursively
            for r in range(rows):
                for sub in _row_of(data, r):
                    self._put(sub, h)
            return
        if not self.staged:  # one bounded copy at a time
            step = max(1, self.BLOCK // row_bytes)
            for r in range(0, rows, step):
                self._write_buffered(_flat_bytes(data.narrow(0, r, min(step, rows - r))), h)
            return
        r = 0
        while r < rows:
            k = min(rows - r, (self.BLOCK - self._fill) // row_bytes)
            if k == 0 or self._fill % data.dtype.itemsize:
                # a row across the block boundary, or elements that would sit misaligned in the buffer: through
                # a small contiguous copy, byte by byte
                k = max(1, min(k, (4 << 20) // row_bytes))
                self._stage_bytes(_flat_bytes(data.narrow(0, r, k)), h)
            else:
                n = k * row_bytes
                stage = self._stages[self._cur][self._fill:self._fill + n]
                copy_piece(stage.view(data.dtype).view(k, *data.shape[1:]), data.narrow(0, r, k))
                self._staged(n, h)  # torch copies release the GIL, unlike a memcpy in Python
            r += k

    def _write_buffered(self, b: torch.Tensor, h) -> None:
        mv = memoryview(b.numpy())
        if h is not None:
            h.update(mv)
        self._write_all(mv)

    def _stage_bytes(self, b: torch.Tensor, h) -> None:
        off, n = 0, b.numel()
        while off < n:
            k = min(n - off, self.BLOCK - self._fill)
            self._stages[self._cur][self._fill:self._fill + k].copy_(b[off:off + k])
            self._staged(k, h)
            off += k

    def _staged(self, n: int, h) -> None:
        if h is not None:
            h.update(memoryview(self._bufs[self._cur])[self._fill:self._fill + n])
        self._fill += n
        if self._fill == self.BLOCK:
            self._flush(self.BLOCK)

    def _flush(self, length: int) -> None:
        """Hand the current buffer to the flusher; wait until the other one is free."""
        i = self._cur
        self._pending[i] = self._flusher.submit(self._write_all, memoryview(self._bufs[i])[:length])
        self._cur = 1 - i
        self._fill = 0
        self._wait(self._cur)

    def _wait(self, i: int) -> None:
        fut, self._pending[i] = self._pending[i], None
        if fut is not None:
            fut.result()  # re-raises the flusher's OSError (ENOSPC ...) here

    def _write_all(self, mv: memoryview) -> None:
        while len(mv):
            try:
                w = os.write(self.fd, mv)
            except OSError as e:
                if e.errno != errno.EINVAL or not self._drop_direct():
                    raise
                continue  # the file system took O_DIRECT at open but not this write: buffered from here on
            mv = mv[w:]

    def _drop_direct(self) -> bool:
        import fcntl

        fl = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        if not fl & os.O_DIRECT:
            return False
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        return True

    def close(self, abort: bool = False) -> None:
        """Write what is staged and close. ``abort=True`` (an error is propagating, the output will be
        discarded): wait for the flusher, write nothing more, raise nothing of its own."""
        if self.fd < 0:
            return
        try:
            if self.staged:
                try:
                    if abort:
                        for fut in self._pending:
                            if fut is not None:
                                fut.exception()
                    else:
                        self._wait(1 - self._cur)
                        if self._fill:
                            tail = self._fill
                            padded = (tail + self.ALIGN - 1) // self.ALIGN * self.ALIGN
                            self._stages[self._cur][tail:padded].zero_()
                            self._write_all(memoryview(self._bufs[self._cur])[:padded])
                            os.ftruncate(self.fd, self.size)
                finally:
                    for fut in self._pending:
                        if fut is not None:
                            fut.exception()  # let a flush in flight finish before its buffer goes
                    self._flusher.shutdown()
                    del self._stages
                    for b in self._bufs:
                        try:
                            b.close()
                        except BufferError:  # a failed write's traceback still holds a view: freed with it
                            pass
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
            return
        try:
            self.close(abort=True)
        except OSError:
            pass  # the original error is the one to report

"""Writing files whole: positional vectored writes that survive short
writes, and durable atomic replacement of small files (metadata, reports,
markers): a crash leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def pwritev_all(fd: int, bufs: list, offset: int) -> int:
    """pwritev until every byte of *bufs* is written at *offset* (short
    writes happen); returns the number of syscalls."""
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    calls = 0
    while views:
        n = os.pwritev(fd, views, offset)
        calls += 1
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return calls


def atomic_write(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Replace *path* with *data*: write a temporary file beside it, fsync
    it, rename it over, fsync the directory (so the rename is durable).
    The temporary name is unique per call (mkstemp), so two threads or
    processes replacing one file never rename each other's half-written
    file; the last rename wins, whole."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp.", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException as e:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            # write/fsync errors carry no path: name the file being replaced
            # (a full disk must say which file it could not write).
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)

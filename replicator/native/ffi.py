"""The handle of the compiled C core (``ffi``, ``lib`` of replicator._core,
built by native/build_core.py) and what every wrapper in this package
shares: the error classes, the argument and error-buffer helpers, the base
of the file-backed objects, and buffers whose memory is not zeroed.

Importing this module raises ImportError until the core is built; that is
how replicator/crc32c.py and replicator/records.py know to fall back to
pure Python.

Errors:
- CoreError (BitmapError, ActivityLogError): a file, geometry or state
  problem; the message names the file and the reason.
- OSError(errno): an I/O error on the write path (device, fdatasync).
- ValueError / IndexError: a caller passed an impossible range or index.
"""
from __future__ import annotations

import os
import sys
import uuid as _uuid

from replicator._core import ffi, lib  # ImportError until built

__all__ = [
    "ffi", "lib", "CoreError", "BitmapError", "ActivityLogError", "uninit_buffer",
    "ERRLEN", "NONE", "U32", "errbuf", "errmsg", "path_arg", "uuid_arg", "oserror",
    "alloc_uninit", "FileHandle",
]

ERRLEN = 1024  # bytes of every C error-message buffer
NONE = 0xFFFFFFFFFFFFFFFF  # UINT64_MAX: "no such bit / seq" in the C API
U32 = 0xFFFFFFFF


class CoreError(Exception):
    """A problem in the C core's files or state (not a plain I/O error)."""


class BitmapError(CoreError):
    """A bitmap file is torn, foreign, damaged, busy or cannot be written."""


class ActivityLogError(CoreError):
    """An activity-log file is torn, foreign, damaged, busy or cannot be written."""


def errbuf():
    """A buffer for a C call's error message (``char err[ERRLEN]``)."""
    return ffi.new("char[]", ERRLEN)


def errmsg(buf, fallback: str) -> str:
    """The message a C call left in *buf*, or *fallback* when it left none."""
    msg = ffi.string(buf).decode("utf-8", "replace")
    return msg or fallback


def path_arg(path) -> bytes:
    """A path (str, bytes, PathLike) as the C API takes it."""
    return os.fsencode(os.fspath(path))


def uuid_arg(value) -> bytes:
    """A resource UUID (uuid.UUID or 16 bytes) as 16 bytes; ValueError otherwise."""
    if isinstance(value, _uuid.UUID):
        value = value.bytes
    if not isinstance(value, (bytes, bytearray)) or len(value) != 16:
        raise ValueError(f"resource UUID must be 16 bytes, got {value!r}")
    return bytes(value)


def oserror(rc: int, what: str) -> OSError:
    """The OSError for a C call's negative errno *rc*, naming *what* failed."""
    err = -rc
    return OSError(err, f"{os.strerror(err)}: {what}")


alloc_uninit = ffi.new_allocator(should_clear_after_alloc=False)


def uninit_buffer(n: int) -> memoryview:
    """A writable buffer of *n* bytes whose memory is not zeroed first (a
    received payload overwrites all of it; ``bytearray(n)`` would clear a
    megabyte per DATA frame for nothing). Freed with the last reference."""
    return memoryview(ffi.buffer(alloc_uninit("char[]", n)))


class FileHandle:
    """What Bitmap and ActivityLog share: a C object in ``_p`` that an open
    Core may use (``_users``), closed by close() or a with block. Dropped
    unclosed, it is released with ``_release`` (never a clean close behind
    the owner's back: a bitmap stays DIRTY); at interpreter exit not at
    all, as daemon threads may still be inside C calls."""

    __slots__ = ()
    _release = None  # the C function that frees _p without a clean close

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self._p is not None and not self._users and not sys.is_finalizing():
                type(self)._release(self._p)
                self._p = None
        except Exception:
            pass

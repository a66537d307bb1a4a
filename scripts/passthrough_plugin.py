"""Pass-through nbdkit Python plugin: peer (b) of ``scripts/bench replication``.

Every request goes straight to one file with os.preadv/os.pwrite/fdatasync,
and nothing else: it is the cost of serving NBD from nbdkit's embedded
Python, the floor under any Python plugin, Duplex's included.

    nbdkit python scripts/passthrough_plugin.py file=IMAGE [threads=MODEL]

MODEL is ``serialize_all_requests`` (default), ``serialize_requests`` or
``parallel``. Measured with ``scripts/bench replication --targets b
--passthrough-threads MODEL`` (2 shared cores, fio 4 KiB random writes,
iodepth 16, one connection, image on tmpfs): serialize_all_requests 35-40k
writes/s, serialize_requests 35-51k (the same thing with one connection),
parallel 14-16k with a p99 six times higher: every request then hands the
GIL between nbdkit's worker threads, which costs more than the pwrite. So the
default serialises; it also keeps the peer honest for multi-connection
clients, where serialize_requests would hand the GIL between connections.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys

import nbdkit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nbdplugin import threadstate  # noqa: E402  (the repository root, added above)

API_VERSION = 2

_MODELS = {
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = bytes(1 << 20)

_path: str | None = None
_model = "serialize_all_requests"
_pin = True
_fd = -1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def config(key: str, value: str) -> None:
    """Accept ``file=PATH``, ``threads=MODEL`` and ``pin=0|1``."""
    global _path, _model, _pin
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "pin":
        if value not in ("0", "1"):
            raise ValueError(f"passthrough: pin={value!r}: expected 0 or 1")
        _pin = value == "1"
    elif key == "threads":
        if value not in _MODELS:
            raise ValueError(f"passthrough: threads={value!r}: expected one of {', '.join(_MODELS)}")
        _model = value
    else:
        raise ValueError(f"passthrough: unknown parameter {key!r} (expected file=, threads= "
                         f"or pin=)")


def config_complete() -> None:
    """Open the file once; every connection shares the descriptor."""
    global _fd
    if _path is None:
        raise ValueError("passthrough: the file=PATH parameter is required")
    try:
        _fd = os.open(_path, os.O_RDWR)
    except OSError as e:
        raise ValueError(f"passthrough: cannot open file={_path}: {e.strerror}") from e


def thread_model() -> int:
    """The thread model chosen with ``threads=``."""
    return _MODELS[_model]


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's callback name
    """No per-connection state."""
    return 0


def close(h: int) -> None:
    """Drop the connection thread's pinned Python thread state."""
    threadstate.unpin()


def get_size(h: int) -> int:
    """The file's size."""
    return os.fstat(_fd).st_size


def can_write(h: int) -> bool:
    return True


def can_flush(h: int) -> bool:
    return True


def can_trim(h: int) -> bool:
    return True


def can_zero(h: int) -> bool:
    return True


def can_fua(h: int) -> int:
    return nbdkit.FUA_NATIVE


def can_multi_conn(h: int) -> bool:
    # One shared descriptor: a flush on any connection covers every write.
    return True


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    """Read straight into nbdkit's buffer."""
    if _pin:
        threadstate.pin()
    n = os.preadv(_fd, [buf], offset)
    if n < len(buf):
        memoryview(buf)[n:] = bytes(len(buf) - n)  # past EOF reads as zeros


def pwrite(h: int, buf: bytes, offset: int, flags: int) -> None:
    """Write, and fdatasync for FUA."""
    if _pin:
        threadstate.pin()
    view = memoryview(buf)
    while view:
        n = os.pwrite(_fd, view, offset)
        view, offset = view[n:], offset + n
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def flush(h: int, flags: int) -> None:
    """fdatasync the file."""
    os.fdatasync(_fd)


def trim(h: int, count: int, offset: int, flags: int) -> None:
    """Punch a hole (the file keeps its size)."""
    if _libc.fallocate(_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count) != 0:
        err = ctypes.get_errno()
        if err != errno.EOPNOTSUPP:  # trim is advisory
            nbdkit.set_error(err)
            raise OSError(err, os.strerror(err))
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def zero(h: int, count: int, offset: int, flags: int) -> None:
    """Write zeros (a punched hole also reads as zeros, but may not be allowed)."""
    if flags & nbdkit.FLAG_MAY_TRIM and _libc.fallocate(
            _fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count) == 0:
        pass
    else:
        end = offset + count
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            os.pwrite(_fd, memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)

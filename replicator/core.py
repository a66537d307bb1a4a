"""The C core, seen from Python: CRC32C, track bitmaps, the activity log and
the primary's write path with its send ring.

This is the only module that touches cffi objects; everything else uses the
classes here. Every call into C releases the GIL (cffi does that for API-mode
calls), so a request costs one C call during which other threads run.

Errors:
- CoreError (BitmapError, ActivityLogError): a file, geometry or state
  problem; the message names the file and the reason.
- OSError(errno): an I/O error on the write path (device, fdatasync).
- ValueError / IndexError: a caller passed an impossible range or index.

Do not import replicator.records or replicator.crc32c here: crc32c.py
imports this module for its fast path.
"""
from __future__ import annotations

import errno as _errno
import heapq
import os
import struct
import sys
import threading
import uuid as _uuid
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from replicator._core import ffi as _ffi, lib as _lib  # ImportError until built

__all__ = [
    "CoreError", "BitmapError", "ActivityLogError",
    "crc32c", "crc32c_sw", "crc32c_hw", "crc32c_hw_available",
    "Bitmap", "ActivityLog", "Core", "WriteResult", "tokens", "uninit_buffer",
    "BITMAP_HEADER_SIZE", "RECORD_HEADER_SIZE",
]

BITMAP_HEADER_SIZE = 4096
RECORD_HEADER_SIZE = 48
_ERRLEN = 1024
_NONE = 0xFFFFFFFFFFFFFFFF
_U32 = 0xFFFFFFFF


class CoreError(Exception):
    """A problem in the C core's files or state (not a plain I/O error)."""


class BitmapError(CoreError):
    """A bitmap file is torn, foreign, damaged, busy or cannot be written."""


class ActivityLogError(CoreError):
    """An activity-log file is torn, foreign, damaged, busy or cannot be written."""


def _errbuf():
    return _ffi.new("char[]", _ERRLEN)


def _errmsg(buf, fallback: str) -> str:
    msg = _ffi.string(buf).decode("utf-8", "replace")
    return msg or fallback


def _path_arg(path) -> bytes:
    return os.fsencode(os.fspath(path))


def _uuid_arg(value) -> bytes:
    if isinstance(value, _uuid.UUID):
        value = value.bytes
    if not isinstance(value, (bytes, bytearray)) or len(value) != 16:
        raise ValueError(f"resource UUID must be 16 bytes, got {value!r}")
    return bytes(value)


def _oserror(rc: int, what: str) -> OSError:
    err = -rc
    return OSError(err, f"{os.strerror(err)}: {what}")


# ---- CRC32C -------------------------------------------------------------

def crc32c(data, crc: int = 0) -> int:
    """CRC32C of *data* (bytes, bytearray, memoryview), continuing from *crc*;
    SSE4.2 when the CPU has it."""
    buf = _ffi.from_buffer(data)
    return _lib.crc32c(crc, buf, len(buf))


def crc32c_sw(data, crc: int = 0) -> int:
    """CRC32C through the portable table path."""
    buf = _ffi.from_buffer(data)
    return _lib.crc32c_sw(crc, buf, len(buf))


def crc32c_hw(data, crc: int = 0) -> int:
    """CRC32C through the SSE4.2 path (the table path if the CPU lacks it)."""
    buf = _ffi.from_buffer(data)
    return _lib.crc32c_hw(crc, buf, len(buf))


def crc32c_hw_available() -> bool:
    """True when this CPU runs the SSE4.2 path."""
    return bool(_lib.crc32c_hw_available())


def scan_records(buf, tokens_only: bool = False) -> tuple[int, int] | None:
    """Check every record packed in *buf* in one C call: structure and CRC
    (with *tokens_only*, 48-byte headers without data: structure only).
    Returns (count, highest seq), or None when one is bad (the caller then
    finds and words the problem record by record)."""
    src = _ffi.from_buffer(buf)
    bad = _ffi.new("uint64_t *")
    fault = _ffi.new("int *")
    top = _ffi.new("uint64_t *")
    check = _lib.records_check_tokens if tokens_only else _lib.records_check
    n = check(src, len(src), bad, fault, top)
    return None if n < 0 else (n, top[0])


_alloc_uninit = _ffi.new_allocator(should_clear_after_alloc=False)


def uninit_buffer(n: int) -> memoryview:
    """A writable buffer of *n* bytes whose memory is not zeroed first (a
    received payload overwrites all of it; ``bytearray(n)`` would clear a
    megabyte per DATA frame for nothing). Freed with the last reference."""
    return memoryview(_ffi.buffer(_alloc_uninit("char[]", n)))


def tokens(span) -> bytes:
    """The 48-byte headers of the records packed in *span* (a TOKENS payload)."""
    src = _ffi.from_buffer(span)
    n = len(src)
    if n == 0:
        return b""
    out = _ffi.new("char[]", n)  # char[]: ffi.unpack gives bytes
    w = _lib.ring_tokens(src, n, _ffi.cast("unsigned char *", out), n)
    if w < 0:
        raise ValueError(f"span of {n} bytes is not a sequence of whole records")
    return _ffi.unpack(out, w)


# ---- bitmaps ------------------------------------------------------------

class _FileHandle:
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


class Bitmap(_FileHandle):
    """A track bitmap, in memory or backed by a file (see native/bitmap.h).

    Set bits reach the file only at sync() or a clean close(); the activity
    log covers what changed since. Thread-safe, except close().
    """

    __slots__ = ("_p", "path", "track_size", "nbits", "was_dirty", "uuid", "_users")
    _release = _lib.bitmap_abandon

    def __init__(self, ptr, path: str | None):
        """Wrap a C bitmap; use create(), open() or copy() instead."""
        self._p = ptr
        self.path = path
        self.track_size: int = _lib.bitmap_track_size(ptr)
        self.nbits: int = _lib.bitmap_nbits(ptr)
        self.was_dirty: bool = bool(_lib.bitmap_was_dirty(ptr))
        u = _ffi.new("uint8_t[16]")
        _lib.bitmap_uuid(ptr, u)
        self.uuid: bytes = bytes(u)
        self._users = 0

    @classmethod
    def create(cls, path: str | None, uuid: bytes, track_size: int, nbits: int) -> "Bitmap":
        """A new all-clear bitmap; path None keeps it in memory only. A file is
        written beside *path* and renamed over it (atomic)."""
        if track_size <= 0 or track_size > _U32:
            raise ValueError(f"track size {track_size} out of range")
        if nbits <= 0:
            raise ValueError(f"bit count {nbits} must be positive")
        out = _ffi.new("struct bitmap **")
        err = _errbuf()
        p = _ffi.NULL if path is None else _path_arg(path)
        rc = _lib.bitmap_create(out, p, _uuid_arg(uuid), track_size, nbits, err, _ERRLEN)
        if rc < 0:
            raise BitmapError(_errmsg(err, f"bitmap {path}: {os.strerror(-rc)}"))
        return cls(out[0], None if path is None else os.fspath(path))

    @classmethod
    def open(cls, path: str, uuid: bytes, track_size: int) -> "Bitmap":
        """Open a bitmap file after checking it is whole and ours; marks it
        DIRTY durably. was_dirty tells whether the last run stopped cleanly
        (if not, OR in the activity log: ActivityLog.recover_into)."""
        if track_size <= 0 or track_size > _U32:
            raise ValueError(f"track size {track_size} out of range")
        out = _ffi.new("struct bitmap **")
        err = _errbuf()
        rc = _lib.bitmap_open(out, _path_arg(path), _uuid_arg(uuid), track_size, err, _ERRLEN)
        if rc < 0:
            raise BitmapError(_errmsg(err, f"bitmap {path}: {os.strerror(-rc)}"))
        return cls(out[0], os.fspath(path))

    def _ptr(self):
        if self._p is None:
            raise BitmapError(f"bitmap {self.path or '(memory)'} is closed")
        return self._p

    def __repr__(self) -> str:
        state = "closed" if self._p is None else f"{self.count()}/{self.nbits} set"
        return f"<Bitmap {self.path or '(memory)'} track_size={self.track_size} {state}>"

    @property
    def closed(self) -> bool:
        """True after close() or abandon()."""
        return self._p is None

    @property
    def sync_count(self) -> int:
        """Successful syncs since open (tests and metrics)."""
        return _lib.bitmap_sync_count(self._ptr())

    def _range_error(self, off: int, length: int) -> ValueError:
        return ValueError(f"byte range {off}+{length} is outside the bitmap "
                          f"({self.nbits} tracks of {self.track_size} bytes)")

    def set_range(self, off: int, length: int) -> int:
        """Set the tracks touching [off, off+length); returns bits newly set."""
        if off < 0 or length < 0:
            raise self._range_error(off, length)
        r = _lib.bitmap_set_range(self._ptr(), off, length)
        if r < 0:
            raise self._range_error(off, length)
        return r

    def clear_range(self, off: int, length: int) -> int:
        """Clear the tracks touching [off, off+length); returns bits cleared."""
        if off < 0 or length < 0:
            raise self._range_error(off, length)
        r = _lib.bitmap_clear_range(self._ptr(), off, length)
        if r < 0:
            raise self._range_error(off, length)
        return r

    def test_range(self, off: int, length: int) -> bool:
        """True when any track touching [off, off+length) is set."""
        if off < 0 or length < 0:
            raise self._range_error(off, length)
        r = _lib.bitmap_test_range(self._ptr(), off, length)
        if r < 0:
            raise self._range_error(off, length)
        return bool(r)

    def _check_bit(self, i: int) -> None:
        if not 0 <= i < self.nbits:
            raise IndexError(f"track {i} outside the bitmap of {self.nbits} tracks")

    def set_bit(self, i: int) -> bool:
        """Set track i; returns its previous value."""
        self._check_bit(i)
        return bool(_lib.bitmap_set_bit(self._ptr(), i))

    def clear_bit(self, i: int) -> bool:
        """Clear track i; returns its previous value."""
        self._check_bit(i)
        return bool(_lib.bitmap_clear_bit(self._ptr(), i))

    def test_bit(self, i: int) -> bool:
        """Whether track i is set."""
        self._check_bit(i)
        return bool(_lib.bitmap_test_bit(self._ptr(), i))

    def count(self) -> int:
        """Number of set tracks."""
        return _lib.bitmap_count(self._ptr())

    def find_next(self, i: int) -> int:
        """First set track >= i, or -1."""
        r = _lib.bitmap_find_next(self._ptr(), max(i, 0))
        return -1 if r == _NONE else r

    def find_next_zero(self, i: int) -> int:
        """First clear track >= i, or nbits."""
        return _lib.bitmap_find_next_zero(self._ptr(), max(i, 0))

    def runs(self, device_size: int | None = None) -> Iterator[tuple[int, int]]:
        """(byte_offset, byte_length) of each run of set tracks, in order; the
        last run is cut at device_size when given."""
        p = self._ptr()
        ts = self.track_size
        i = _lib.bitmap_find_next(p, 0)
        while i != _NONE:
            j = _lib.bitmap_find_next_zero(p, i)
            off, end = i * ts, j * ts
            if device_size is not None:
                end = min(end, device_size)
            if end > off:
                yield off, end - off
            if j >= self.nbits:
                return
            i = _lib.bitmap_find_next(p, j)

    def dirty_bytes(self, device_size: int | None = None) -> int:
        """count() * track_size; the partial last track counted only up to
        device_size when given."""
        n = self.count() * self.track_size
        if device_size is not None and self.nbits and _lib.bitmap_test_bit(self._ptr(), self.nbits - 1):
            n -= max(0, self.nbits * self.track_size - device_size)
        return n

    def _same_geometry(self, other: "Bitmap") -> None:
        if (other.nbits, other.track_size, other.uuid) != (self.nbits, self.track_size, self.uuid):
            raise ValueError(
                f"bitmaps differ: {self.path or '(memory)'} has {self.nbits} tracks of "
                f"{self.track_size} for {_uuid.UUID(bytes=self.uuid)}, "
                f"{other.path or '(memory)'} has {other.nbits} tracks of {other.track_size} "
                f"for {_uuid.UUID(bytes=other.uuid)}")

    def merge_from(self, other: "Bitmap") -> int:
        """self |= other (same geometry and UUID); returns bits newly set."""
        self._same_geometry(other)
        return _lib.bitmap_merge(self._ptr(), other._ptr())

    def subtract(self, other: "Bitmap") -> int:
        """self &= ~other (same geometry and UUID); returns bits cleared."""
        self._same_geometry(other)
        return _lib.bitmap_subtract(self._ptr(), other._ptr())

    def copy(self, path: str | None = None) -> "Bitmap":
        """A frozen copy: in memory, or a durable file at *path*."""
        out = _ffi.new("struct bitmap **")
        err = _errbuf()
        p = _ffi.NULL if path is None else _path_arg(path)
        rc = _lib.bitmap_copy(out, self._ptr(), p, err, _ERRLEN)
        if rc < 0:
            raise BitmapError(_errmsg(err, f"bitmap {path}: {os.strerror(-rc)}"))
        return Bitmap(out[0], None if path is None else os.fspath(path))

    def clear_all(self) -> None:
        """Clear every track."""
        _lib.bitmap_clear_all(self._ptr())

    def sync(self) -> None:
        """Write changed pages and fdatasync (no-op in memory)."""
        err = _errbuf()
        rc = _lib.bitmap_sync(self._ptr(), err, _ERRLEN)
        if rc < 0:
            raise BitmapError(_errmsg(err, f"bitmap {self.path}: {os.strerror(-rc)}"))

    def close(self) -> None:
        """Clean close: bits, their checksum and CLEAN reach the file. Idempotent."""
        if self._p is None:
            return
        if self._users:
            raise CoreError(f"bitmap {self.path or '(memory)'} is still used by an open Core")
        p, self._p = self._p, None
        err = _errbuf()
        rc = _lib.bitmap_close(p, err, _ERRLEN)
        if rc < 0:
            raise BitmapError(_errmsg(err, f"bitmap {self.path}: {os.strerror(-rc)}"))

    def abandon(self) -> None:
        """Drop without a clean close, as a crash would leave the file (DIRTY,
        bits as of the last sync). For tests and emergency stops."""
        if self._p is None:
            return
        if self._users:
            raise CoreError(f"bitmap {self.path or '(memory)'} is still used by an open Core")
        p, self._p = self._p, None
        _lib.bitmap_abandon(p)



# ---- activity log -------------------------------------------------------

class ActivityLog(_FileHandle):
    """The activity log (see native/actlog.h): write-ahead record of the
    extents that may hold writes not yet in the on-disk bitmap."""

    __slots__ = ("_p", "path", "extent_size", "slots", "_users")
    _release = _lib.actlog_close

    def __init__(self, ptr, path: str):
        """Wrap a C activity log; use create() or open() instead."""
        self._p = ptr
        self.path = path
        self.extent_size: int = _lib.actlog_extent_size(ptr)
        self.slots: int = _lib.actlog_slots(ptr)
        self._users = 0

    @classmethod
    def create(cls, path: str, uuid: bytes, extent_size: int, slots: int) -> "ActivityLog":
        """A new activity log with an empty active set (atomic replace)."""
        if not 0 < slots <= _U32:
            raise ValueError(f"slots {slots} out of range")
        out = _ffi.new("struct actlog **")
        err = _errbuf()
        rc = _lib.actlog_create(out, _path_arg(path), _uuid_arg(uuid), extent_size, slots,
                                err, _ERRLEN)
        if rc < 0:
            raise ActivityLogError(_errmsg(err, f"activity log {path}: {os.strerror(-rc)}"))
        return cls(out[0], os.fspath(path))

    @classmethod
    def open(cls, path: str, uuid: bytes) -> "ActivityLog":
        """Open and validate; the newest valid transaction is the recovery set."""
        out = _ffi.new("struct actlog **")
        err = _errbuf()
        rc = _lib.actlog_open(out, _path_arg(path), _uuid_arg(uuid), err, _ERRLEN)
        if rc < 0:
            raise ActivityLogError(_errmsg(err, f"activity log {path}: {os.strerror(-rc)}"))
        return cls(out[0], os.fspath(path))

    def _ptr(self):
        if self._p is None:
            raise ActivityLogError(f"activity log {self.path} is closed")
        return self._p

    def __repr__(self) -> str:
        return f"<ActivityLog {self.path} extent_size={self.extent_size} slots={self.slots}>"

    def recovered_extents(self) -> list[int]:
        """Extents of the durable set found at open (empty after create)."""
        p = self._ptr()
        n = _lib.actlog_recovered(p, _ffi.NULL, 0)
        buf = _ffi.new("uint64_t[]", max(n, 1))
        _lib.actlog_recovered(p, buf, n)
        return [buf[i] for i in range(n)]

    def active_extents(self) -> list[int]:
        """Extents active now (at open: the recovered set)."""
        p = self._ptr()
        while True:
            n = _lib.actlog_active(p, _ffi.NULL, 0)
            buf = _ffi.new("uint64_t[]", max(n, 1))
            m = _lib.actlog_active(p, buf, n)
            if m <= n:
                return sorted(buf[i] for i in range(m))

    def recover_into(self, bitmap: Bitmap) -> int:
        """OR every track of every recovered extent into *bitmap*; returns the
        number of tracks newly set."""
        err = _errbuf()
        r = _lib.actlog_recover_into(self._ptr(), bitmap._ptr(), err, _ERRLEN)
        if r < 0:
            raise ActivityLogError(_errmsg(err, f"activity log {self.path}: {os.strerror(-r)}"))
        return r

    def begin(self, offset: int, length: int, bitmap: Bitmap | None = None) -> None:
        """Make the extents of a byte range active (write-ahead); *bitmap* is
        synced before any eviction. Core does this itself; for tools and tests."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range {offset}+{length}")
        rc = _lib.actlog_begin(self._ptr(), offset, length,
                               _ffi.NULL if bitmap is None else bitmap._ptr())
        if rc == -_errno.E2BIG:
            raise ValueError(f"range {offset}+{length} needs more than {self.slots} extents")
        if rc < 0:
            raise _oserror(rc, f"activity log {self.path}")

    def end(self, offset: int, length: int) -> None:
        """Undo one begin() of the same range."""
        _lib.actlog_end(self._ptr(), offset, length)

    def quiesce(self, bitmap: Bitmap | None = None) -> None:
        """Wait for in-flight ranges, sync *bitmap*, write an empty transaction."""
        err = _errbuf()
        rc = _lib.actlog_quiesce(self._ptr(), _ffi.NULL if bitmap is None else bitmap._ptr(),
                                 err, _ERRLEN)
        if rc < 0:
            raise ActivityLogError(_errmsg(err, f"activity log {self.path}: {os.strerror(-rc)}"))

    @property
    def stats(self) -> dict:
        """transactions, evictions, waits, active, slots, extent_size, last_txn."""
        st = _ffi.new("struct actlog_stats *")
        _lib.actlog_stats(self._ptr(), st)
        return {"transactions": st.transactions, "evictions": st.evictions,
                "waits": st.waits, "active": st.active, "slots": st.slots,
                "extent_size": st.extent_size, "last_txn": st.last_txn}

    def close(self, bitmap: Bitmap | None = None) -> None:
        """Close. With *bitmap*: first sync it and write an empty transaction
        (Core.close() already does this). Without: the durable active set
        stays, and the next open recovers it. Idempotent."""
        if self._p is None:
            return
        if self._users:
            raise CoreError(f"activity log {self.path} is still used by an open Core")
        try:
            if bitmap is not None:
                self.quiesce(bitmap)
        finally:
            p, self._p = self._p, None
            _lib.actlog_close(p)



# ---- the write path -----------------------------------------------------

class WriteResult(NamedTuple):
    """seq: the request's sequence number. queued: its record is in the send
    ring (False: done locally and marked out of sync only)."""

    seq: int
    queued: bool


# The write path runs per request: bind the C functions once, and give each
# thread one reusable result struct instead of allocating per call.
_from_buffer = _ffi.from_buffer
_core_write = _lib.core_write
_tls = threading.local()


def _result():
    try:
        return _tls.result
    except AttributeError:
        _tls.result = r = _ffi.new("struct core_result *")
        return r


class ShipResult(NamedTuple):
    """What one Core.ship() call did and why it returned: stop is
    "timeout" (time to look around), "kicked" (wake() was called),
    "dropped" (the ring overflowed), "io" (socket *fd_index* failed with
    *errnum*; ECANCELED after abort_ship()) or "bad"."""

    stop: str
    errnum: int
    fd_index: int
    next_fd: int
    spans: int
    records: int
    bytes: int
    samples: list  # (last seq of a span, ts of its first record)
    last_send_ns: int  # pass to the next ship() call


_SHIP_SAMPLES = 1024
_SHIP_STOPS = {_lib.SHIP_TIMEOUT: "timeout", _lib.SHIP_DROPPED: "dropped", _lib.SHIP_IO: "io",
               _lib.SHIP_BAD: "bad", _lib.SHIP_KICKED: "kicked"}


class Core:
    """The primary's write path (native/core.h) and its send ring.

    Producers: write(), trim(), zero(), flush() from any number of threads.
    Consumer (one thread): wait(), peek(), advance(), tokens(), release(),
    rewind(), resume(). close() only when no other call is running.
    """

    def __init__(self, device_path: str, size: int, oos: Bitmap, al: ActivityLog,
                 ring_size: int, first_seq: int, history_path: str | None = None,
                 cr: Bitmap | None = None):
        """Open *device_path* (file or block device) for *size* bytes."""
        self._c = None
        if size <= 0:
            raise ValueError(f"device size {size} must be positive")
        if first_seq < 0:
            raise ValueError(f"first seq {first_seq} must be >= 0")
        out = _ffi.new("struct core **")
        err = _errbuf()
        hist = _ffi.NULL if history_path is None else _path_arg(history_path)
        rc = _lib.core_open(out, _path_arg(device_path), size, oos._ptr(), al._ptr(),
                            ring_size, first_seq, hist, err, _ERRLEN)
        if rc < 0:
            raise CoreError(_errmsg(err, f"device {device_path}: {os.strerror(-rc)}"))
        self._c = out[0]
        self._ship_abort = _ffi.new("int *")
        self._ship_inflight = _ffi.new("uint64_t[3]")
        self.device_path = os.fspath(device_path)
        self.size = size
        self.oos = oos
        self.al = al
        self.cr: Bitmap | None = None
        oos._users += 1
        al._users += 1
        if cr is not None:
            self.set_cr(cr)

    def _ptr(self):
        if self._c is None:
            raise CoreError(f"core for {getattr(self, 'device_path', '?')} is closed")
        return self._c

    def __repr__(self) -> str:
        return f"<Core {self.device_path} size={self.size}>"

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size or length > _U32:
            raise ValueError(f"range {offset}+{length} is outside the device "
                             f"{self.device_path} ({self.size} bytes) or empty")

    def write(self, data, offset: int, fua: bool = False, volume: int = 0) -> WriteResult:
        """Write *data* at *offset*: mark, write the device, sequence, queue."""
        buf = _from_buffer(data)
        n = len(buf)
        if offset < 0 or n == 0 or offset + n > self.size or n > _U32:
            self._check(offset, n)
        c = self._c
        if c is None:
            self._ptr()
        out = _result()
        rc = _core_write(c, buf, n, offset, 1 if fua else 0, volume, out)
        if rc < 0:
            raise _oserror(rc, f"write of {n} bytes at {offset} to {self.device_path}")
        return WriteResult(out.seq, out.queued)

    def _zeroing(self, fn, name: str, offset: int, length: int, volume: int,
                 fua: bool) -> WriteResult:
        self._check(offset, length)
        out = _result()
        rc = fn(self._ptr(), offset, length, 1 if fua else 0, volume, out)
        if rc < 0:
            raise _oserror(rc, f"{name} of {length} bytes at {offset} on {self.device_path}")
        return WriteResult(out.seq, out.queued)

    def trim(self, offset: int, length: int, volume: int = 0, fua: bool = False) -> WriteResult:
        """Discard a range; it reads as zeros afterwards (on both sides)."""
        return self._zeroing(_lib.core_trim, "trim", offset, length, volume, fua)

    def zero(self, offset: int, length: int, volume: int = 0, fua: bool = False) -> WriteResult:
        """Write zeros over a range (punching holes where that is cheaper)."""
        return self._zeroing(_lib.core_zero, "zero", offset, length, volume, fua)

    def flush(self, volume: int = 0) -> WriteResult:
        """fdatasync the device, sync the OOS bitmap, queue a FLUSH record."""
        out = _result()
        rc = _lib.core_flush(self._ptr(), volume, out)
        if rc < 0:
            raise _oserror(rc, f"flush of {self.device_path}")
        return WriteResult(out.seq, out.queued)

    def pread(self, length: int, offset: int, locked: bool = False) -> bytes:
        """Read the device. locked: hold the track locks (no write half-way)."""
        if length == 0:
            return b""
        self._check(offset, length)
        buf = _ffi.new("char[]", length)
        n = _lib.core_pread(self._ptr(), buf, length, offset, locked)
        if n < 0:
            raise _oserror(n, f"read of {length} bytes at {offset} from {self.device_path}")
        return _ffi.unpack(buf, n)

    def pread_into(self, buf, offset: int, locked: bool = False) -> int:
        """Read len(buf) bytes at *offset* into a writable buffer; bytes read."""
        dst = _ffi.from_buffer(buf, require_writable=True)
        n = len(dst)
        if n == 0:
            return 0
        self._check(offset, n)
        r = _lib.core_pread(self._ptr(), dst, n, offset, locked)
        if r < 0:
            raise _oserror(r, f"read of {n} bytes at {offset} from {self.device_path}")
        return r

    # -- consumer side ---------------------------------------------------

    def wait(self, timeout_s: float) -> bool:
        """Wait for records to send; False on timeout, drop or wake()."""
        return bool(_lib.core_wait(self._ptr(), int(max(timeout_s, 0.0) * 1e9)))

    def wake(self) -> None:
        """Make a wait() in progress return now (e.g. to shut down)."""
        _lib.core_kick(self._ptr())

    def peek(self, max_bytes: int) -> memoryview:
        """Whole records from the send cursor, up to *max_bytes* (at least one
        record when any), as a read-only view of the ring: no copy. Valid
        until those records are released or the ring is resumed."""
        pp = _ffi.new("unsigned char **")
        n = _lib.core_peek(self._ptr(), max(max_bytes, 0), pp)
        if n == 0:
            return memoryview(b"")
        return memoryview(_ffi.buffer(pp[0], n)).toreadonly()

    def advance(self, nbytes: int) -> None:
        """Move the send cursor past *nbytes* of whole records (as peeked)."""
        rc = _lib.core_advance(self._ptr(), nbytes)
        if rc == -_errno.EPIPE:
            raise CoreError("the send ring was dropped")
        if rc < 0:
            raise ValueError(f"advance by {nbytes} bytes does not end on a record boundary "
                             "within the records ready to send")

    tokens = staticmethod(tokens)

    def ship(self, fds: list[int], first_fd: int, interval_s: float, batch_bytes: int,
             return_after_s: float, last_send_ns: int = 0) -> "ShipResult":
        """Stream the ring to the sockets *fds* in C (native/ship.h) for up
        to *return_after_s*, the GIL released: TOKENS + DATA per span,
        spans spread over *fds* from index *first_fd* on; *last_send_ns*
        (from the previous call's result) carries the batching interval
        across calls. The caller holds the sockets' send locks."""
        fdarr = _ffi.new("int[]", list(fds))
        params = _ffi.new("struct ship_params *", {
            "interval_ns": int(interval_s * 1e9), "batch_bytes": batch_bytes,
            "return_after_ns": int(return_after_s * 1e9), "last_send_ns": last_send_ns,
            "abort": self._ship_abort, "inflight": self._ship_inflight})
        self._ship_inflight[0] = self._ship_inflight[1] = self._ship_inflight[2] = 0
        res = _ffi.new("struct ship_result *")
        samples = _ffi.new("uint64_t[]", 2 * _SHIP_SAMPLES)
        rc = _lib.ship_stream(self._ptr(), fdarr, len(fds), first_fd, params, res, samples,
                              _SHIP_SAMPLES)
        if rc < 0:
            raise ValueError("ship() needs at least one socket")
        pairs = list(_ffi.unpack(samples, 2 * res.nsamples))
        return ShipResult(_SHIP_STOPS.get(res.stop, "?"), res.errnum, res.fd_index, res.next_fd,
                          res.spans, res.records, res.bytes, list(zip(pairs[::2], pairs[1::2])),
                          res.last_send_ns)

    def ship_inflight(self) -> tuple[int, int] | None:
        """(last seq, ts of the first record) of what the ship() call in
        progress has sent so far, for any thread; None when nothing."""
        last, first_ts = self._ship_inflight[0], self._ship_inflight[1]
        return (last, first_ts) if last and first_ts else None

    def ship_waiting_ts(self) -> int | None:
        """ts of the oldest record the streaming loop holds back for its
        batch (seen when it last waited), None when nothing waits."""
        return self._ship_inflight[2] or None

    def abort_ship(self) -> None:
        """Make ship() give up, in any thread, even in the middle of a frame
        (a peer that stopped reading): for shutting down; the sockets it was
        writing are unusable afterwards. Sticky."""
        self._ship_abort[0] = 1
        _lib.core_kick(self._ptr())

    def release(self, seq: int) -> int:
        """Free every held record with seq <= *seq* (journaled by the peer);
        clears OOS bits whose tracks have nothing else pending. Returns the
        number of records released."""
        if seq < 0:
            return 0
        return _lib.core_release(self._ptr(), min(seq, _NONE - 1))

    def rewind(self, seq: int) -> bool:
        """Send again from the record after *seq*; False if that record is no
        longer held (released or dropped): a resync is needed."""
        if not 0 <= seq < _NONE:
            return False
        return _lib.core_rewind(self._ptr(), seq) == 0

    def drop(self) -> None:
        """Drop the ring on purpose (go Ahead): writes only mark OOS."""
        _lib.core_drop(self._ptr())

    def resume(self, first_seq: int | None = None) -> None:
        """Leave DROPPED with an empty ring; the next record gets *first_seq*
        (default: next_seq). Bit clearing stays off: see clear_on_release."""
        p = self._ptr()
        if first_seq is None:
            first_seq = _lib.core_next_seq(p)
        rc = _lib.core_resume(p, first_seq)
        if rc == -_errno.EALREADY:
            raise CoreError("the send ring is not dropped")
        if rc < 0:
            raise ValueError(f"first seq {first_seq} is below the next seq "
                             f"{_lib.core_next_seq(p)}: seqs are never reused")

    @property
    def clear_on_release(self) -> bool:
        """Whether release() clears OOS bits. A drop turns it off (the writes
        made while dropped exist only as bits); turn it on again only once a
        catch-up has shipped everything written while dropped."""
        return bool(_lib.core_clear_on_release(self._ptr()))

    @clear_on_release.setter
    def clear_on_release(self, on: bool) -> None:
        _lib.core_set_clear_on_release(self._ptr(), bool(on))

    @contextmanager
    def fence(self):
        """Hold off new requests and wait for those in flight, for the block."""
        p = self._ptr()
        _lib.core_fence(p)
        try:
            yield self
        finally:
            _lib.core_unfence(p)

    def set_cr(self, cr: Bitmap | None) -> None:
        """Requests from now on also mark *cr* (None: stop). For an exact cut
        (a freeze), call it inside ``with core.fence():``."""
        if cr is not None:
            if (cr.nbits, cr.track_size) != (self.oos.nbits, self.oos.track_size):
                raise ValueError(f"CR bitmap has {cr.nbits} tracks of {cr.track_size}, "
                                 f"OOS has {self.oos.nbits} of {self.oos.track_size}")
            ptr = cr._ptr()
        else:
            ptr = _ffi.NULL
        rc = _lib.core_set_cr(self._ptr(), ptr)
        if rc < 0:
            raise ValueError("CR bitmap geometry differs from the OOS bitmap")
        if self.cr is not None:
            self.cr._users -= 1
        self.cr = cr
        if cr is not None:
            cr._users += 1

    # -- catch-up increments (DESIGN §4) -------------------------------------

    def freeze(self, frozen: Bitmap, cr: Bitmap, collide_cap: int, stream: bool) -> int:
        """Under the write fence: frozen := OOS, writes start marking *cr*,
        the collision rule is armed, and with *stream* a dropped ring
        resumes at the next seq. Returns the base seq (last seq before)."""
        for b in (frozen, cr):
            if (b.nbits, b.track_size) != (self.oos.nbits, self.oos.track_size):
                raise ValueError(f"bitmap has {b.nbits} tracks of {b.track_size}, "
                                 f"OOS has {self.oos.nbits} of {self.oos.track_size}")
        base = _ffi.new("uint64_t *")
        rc = _lib.core_freeze(self._ptr(), frozen._ptr(), cr._ptr(), collide_cap, stream, base)
        if rc < 0:
            raise _oserror(rc, "freeze")
        if self.cr is not None:
            self.cr._users -= 1
        self.cr = cr
        cr._users += 1
        self._frozen = frozen  # the core points at it until thaw()
        frozen._users += 1
        return base[0]

    def drain_track(self, track: int) -> bytes | None:
        """Take *track* from the frozen map and read it (under its lock);
        None if a write already put it in the collision queue."""
        buf = _alloc_uninit("unsigned char[]", self.oos.track_size)  # read over: no memset
        n = _lib.core_drain_track(self._ptr(), track, buf, self.oos.track_size)
        if n < 0:
            raise _oserror(n, f"reading track {track}")
        return bytes(_ffi.buffer(buf, n)) if n else None

    def collisions(self, max_bytes: int = 8 << 20, drain: bool = True) -> list[tuple[int, bytes]]:
        """The collision copies queued so far: [(offset, data)], oldest first.
        With *drain* false, only the first *max_bytes* or so of them (at
        least one), so that a caller can send the queue in slices."""
        cap = max(max_bytes, self.oos.track_size + 16)
        buf = _ffi.new("unsigned char[]", cap)
        out: list[tuple[int, bytes]] = []
        while drain or not out:
            n = _lib.core_collisions(self._ptr(), buf, cap)
            if n < 0:
                raise _oserror(n, "collision queue")
            if n == 0:
                return out
            mv = _ffi.buffer(buf, n)
            pos = 0
            while pos < n:
                off, length = struct.unpack_from("<QI", mv, pos)
                out.append((off, bytes(mv[pos + 16:pos + 16 + length])))
                pos += 16 + ((length + 7) & ~7)
        return out

    @property
    def collision_overflowed(self) -> bool:
        """True when a collision copy did not fit: the increment is void."""
        return bool(_lib.core_collision_overflowed(self._ptr()))

    def thaw(self) -> None:
        """Disarm the collision rule (the frozen map is drained or abandoned)."""
        _lib.core_thaw(self._ptr())
        frozen = getattr(self, "_frozen", None)
        if frozen is not None:
            frozen._users -= 1
            self._frozen = None

    # -- state -------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The seq the next request will get."""
        return _lib.core_next_seq(self._ptr())

    @property
    def dropped(self) -> bool:
        """True while the ring is DROPPED (Ahead)."""
        return bool(_lib.core_dropped(self._ptr()))

    @property
    def ring_stats(self) -> dict:
        """capacity, bytes (held), unsent_bytes, records (held), oldest_seq and
        newest_seq (None when empty), drops, dropped."""
        st = _ffi.new("struct ring_stats *")
        _lib.core_ring_stats(self._ptr(), st)
        held = st.records_held
        return {"capacity": st.capacity, "bytes": st.bytes_used,
                "unsent_bytes": st.bytes_unsent, "records": held,
                "oldest_seq": st.oldest_seq if held else None,
                "newest_seq": st.newest_seq if held else None,
                "drops": st.drops, "dropped": bool(st.dropped)}

    @property
    def stats(self) -> dict:
        """Request counters: writes, trims, zeros, flushes, bytes_written,
        not_queued, large_ranges, history_errors."""
        st = _ffi.new("struct core_stats *")
        _lib.core_stats(self._ptr(), st)
        return {k: getattr(st, k) for k in ("writes", "trims", "zeros", "flushes",
                                             "bytes_written", "not_queued",
                                             "large_ranges", "history_errors")}

    def pending(self, track: int) -> int:
        """Requests in flight or queued and unreleased touching *track*."""
        return _lib.core_pending(self._ptr(), track)

    def close(self, clean: bool = True) -> None:
        """Close. clean: fdatasync the device, sync the OOS bitmap and empty
        the activity log, so the bitmaps can then be closed cleanly.
        Records still in the ring are lost (their OOS bits stay set)."""
        if self._c is None:
            return
        c, self._c = self._c, None
        err = _errbuf()
        rc = _lib.core_close(c, clean, err, _ERRLEN)
        self.oos._users -= 1
        self.al._users -= 1
        if self.cr is not None:
            self.cr._users -= 1
        if rc < 0:
            raise CoreError(_errmsg(err, f"device {self.device_path}: {os.strerror(-rc)}"))

    def __enter__(self) -> "Core":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Free the ring if the owner forgot close(); not at interpreter exit,
        # when a daemon thread (the shipper) may still wait inside the core.
        try:
            if self._c is not None and not sys.is_finalizing():
                self.close(clean=False)
        except Exception:
            pass


# ---- the secondary's pending queue ----------------------------------------

class RxFault(Exception):
    """A call into the pending queue found a broken rule; nothing changed.

    ``fault`` is an RXQ_* code of native/rxq.h; ``seq``, ``got``, ``had``
    (48-byte headers, or None), ``limit``, ``floor``, ``off`` and ``errnum``
    say what, for replicator/secondary/pending.py to word the message."""

    def __init__(self, err) -> None:
        self.fault = err.fault
        self.seq = err.seq
        self.limit = err.limit
        self.floor = err.floor
        self.off = err.off
        self.errnum = err.errnum
        self.got = bytes(_ffi.buffer(err.got, RECORD_HEADER_SIZE))
        self.had = bytes(_ffi.buffer(err.had, RECORD_HEADER_SIZE))
        super().__init__(f"rxq fault {self.fault} at seq {self.seq}")


RXQ_FAULTS = {name[4:].lower(): getattr(_lib, name) for name in dir(_lib)
              if name.startswith("RXQ_") and name not in ("RXQ_TOKEN", "RXQ_NONE",
                                                          "RXQ_ANNOUNCED", "RXQ_COMPLETE")}


class RxInfo(NamedTuple):
    """The queue's counters, read in one call (native/rxq.h struct rxq_info)."""

    applied: int
    received: int
    highest: int
    base_hint: int
    bytes: int
    entries: int
    run_end: int
    run_records: int
    run_bytes: int
    applied_token: bytes | None


class RxQueue:
    """native/rxq.h: the pending queue's entries, one C call per frame.

    Raw bytes in and out (48-byte headers, record buffers); the rules are
    worded by replicator/secondary/pending.py, which owns this object. Not
    thread-safe: the caller serialises calls, except that apply_run may run
    (GIL released) while other calls go on.
    """

    ANNOUNCED = _lib.RXQ_ANNOUNCED
    COMPLETE = _lib.RXQ_COMPLETE

    def __init__(self, applied: int, applied_token: bytes | None, window: int) -> None:
        out = _ffi.new("struct rxq **")
        rc = _lib.rxq_new(out, applied, applied_token if applied_token else _ffi.NULL, window)
        if rc < 0:
            raise _oserror(rc, "pending queue")
        self._q = _ffi.gc(out[0], _lib.rxq_free)
        self._err = _ffi.new("struct rxq_err *")
        self._info = _ffi.new("struct rxq_info *")
        self._tok = _ffi.new("unsigned char[]", RECORD_HEADER_SIZE)
        self._loc = _ffi.new("uint64_t *")
        self._written = _ffi.new("uint64_t *")
        self._hot: list = []     # heap of (highest seq, n, pinned frame buffer)
        self._hot_seq = 0
        self.hot_bytes = 0
        self.hot_limit = 32 << 20

    def info(self) -> RxInfo:
        i = self._info
        _lib.rxq_info(self._q, i)
        tok = bytes(_ffi.buffer(i.applied_token, RECORD_HEADER_SIZE)) if i.has_applied_token else None
        return RxInfo(i.applied, i.received, i.highest, i.base_hint, i.bytes, i.entries,
                      i.run_end, i.run_records, i.run_bytes, tok)

    def _fault(self) -> RxFault:
        return RxFault(self._err)

    def add_tokens(self, blob) -> int:
        """Announce the 48-byte tokens packed in *blob*; how many were new."""
        src = _ffi.from_buffer(blob)
        n = _lib.rxq_add_tokens(self._q, src, len(src) // RECORD_HEADER_SIZE, self._err)
        if n < 0:
            raise self._fault()
        return n

    def add_records(self, buf, loc_base: int, dry_run: bool = False,
                    hot_seq: int | None = None) -> int:
        """The checked records packed in *buf*, stored from *loc_base* on.

        With *hot_seq* (the frame's highest seq), *buf* is kept here until
        that seq is applied, while the total kept stays under ``hot_limit``:
        the applier writes from memory instead of reading the journal back.
        *buf* must not change meanwhile (bytes, or a view of them)."""
        src = _ffi.from_buffer(buf)
        hot = (hot_seq is not None and not dry_run
               and self.hot_bytes + len(src) <= self.hot_limit)
        n = _lib.rxq_add_records(self._q, src, len(src), loc_base, 1 if hot else 0,
                                 1 if dry_run else 0, self._err)
        if n < 0:
            raise self._fault()
        if hot and n:
            self._hot_seq += 1
            heapq.heappush(self._hot, (hot_seq, self._hot_seq, src))
            self.hot_bytes += len(src)
        return n

    def _release_hot(self, applied: int) -> None:
        # A frame is done with once its highest seq is applied (or rebased past).
        while self._hot and self._hot[0][0] <= applied:
            self.hot_bytes -= len(heapq.heappop(self._hot)[2])

    def add_record(self, token: bytes, loc: int, dry_run: bool = False) -> bool:
        """One record by its header, stored at *loc*: new (True) or a duplicate."""
        n = _lib.rxq_add_record(self._q, token, loc, 1 if dry_run else 0, self._err)
        if n < 0:
            raise self._fault()
        return bool(n)

    def live_seqs(self) -> list[int]:
        """The seqs of every entry after the applied seq, sorted."""
        cap = self.info().entries
        out = _ffi.new("uint64_t[]", max(cap, 1))
        n = _lib.rxq_live_seqs(self._q, out, cap)
        return sorted(_ffi.unpack(out, min(n, cap)))

    def oldest(self) -> bytes | None:
        """Token of the lowest seq with an entry after the applied seq."""
        if not _lib.rxq_oldest(self._q, self._tok):
            return None
        return bytes(_ffi.buffer(self._tok, RECORD_HEADER_SIZE))

    def get(self, seq: int) -> tuple[int, bytes | None, int]:
        """(state, token, location) of *seq*; state 0 when unknown."""
        st = _lib.rxq_get(self._q, seq, self._tok, self._loc)
        if not st:
            return 0, None, 0
        return st, bytes(_ffi.buffer(self._tok, RECORD_HEADER_SIZE)), self._loc[0]

    def take_run(self, max_records: int, max_bytes: int) -> int:
        """Hand out the next in-order run (0: no limit); its length."""
        n = _lib.rxq_take_run(self._q, max_records, max_bytes)
        if n < 0:
            raise MemoryError("pending queue: cannot hand out a run")
        return n

    def run_item(self, i: int) -> tuple[bytes, int]:
        if _lib.rxq_run_item(self._q, i, self._tok, self._loc) < 0:
            raise IndexError(i)
        return bytes(_ffi.buffer(self._tok, RECORD_HEADER_SIZE)), self._loc[0]

    def apply_run(self, journal_fd: int, image_fd: int, image_size: int) -> int:
        """Write the handed-out run to the image; data bytes written."""
        err = _ffi.new("struct rxq_err *")  # own buffer: runs beside the other calls
        if _lib.rxq_apply_run(self._q, journal_fd, image_fd, image_size, self._written, err) < 0:
            raise RxFault(err)
        return self._written[0]

    def mark_applied(self, seq: int) -> bool:
        if _lib.rxq_mark_applied(self._q, seq) != 0:
            return False
        self._release_hot(seq)
        return True

    def expect_base(self, seq: int) -> None:
        _lib.rxq_expect_base(self._q, seq)

    def rebase(self, seq: int, token: bytes | None) -> bool:
        if _lib.rxq_rebase(self._q, seq, token if token else _ffi.NULL) != 0:
            return False
        self._release_hot(seq)
        return True

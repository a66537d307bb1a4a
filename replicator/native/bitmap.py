"""native/bitmap.h: a track bitmap (one bit per track), in memory or backed
by a file with a magic, version, resource UUID and checksum. The OOS bitmap,
the CR bitmap of a catch-up and its frozen copy are all Bitmaps."""
from __future__ import annotations

import os
import uuid as _uuid
from typing import Iterator

from replicator.native.ffi import (ERRLEN as _ERRLEN, NONE as _NONE, U32 as _U32,
                                   BitmapError, CoreError, FileHandle as _FileHandle,
                                   errbuf as _errbuf, errmsg as _errmsg, ffi as _ffi,
                                   lib as _lib, path_arg as _path_arg, uuid_arg as _uuid_arg)

__all__ = ["Bitmap", "BitmapError", "BITMAP_HEADER_SIZE"]

BITMAP_HEADER_SIZE = 4096


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

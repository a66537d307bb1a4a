"""native/actlog.h: the activity log, the write-ahead record of the coarse
extents that may hold writes not yet in the on-disk bitmap (one small
synchronous write when an extent becomes active, none while it stays so);
after a crash, every recovered extent counts as dirty (recover_into)."""
from __future__ import annotations

import errno as _errno
import os

from replicator.native.bitmap import Bitmap
from replicator.native.ffi import (ERRLEN as _ERRLEN, U32 as _U32, ActivityLogError, CoreError,
                                   FileHandle as _FileHandle, errbuf as _errbuf,
                                   errmsg as _errmsg, ffi as _ffi, lib as _lib,
                                   oserror as _oserror, path_arg as _path_arg,
                                   uuid_arg as _uuid_arg)

__all__ = ["ActivityLog", "ActivityLogError"]


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


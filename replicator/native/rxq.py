"""native/rxq.h: the secondary's pending queue, one C call per frame.

Raw bytes in and out (48-byte headers, record buffers); the rules are
worded by replicator/secondary/pending.py, which owns the RxQueue."""
from __future__ import annotations

import heapq
from typing import NamedTuple

from replicator.native.ffi import ffi as _ffi, lib as _lib, oserror as _oserror
from replicator.native.records import RECORD_HEADER_SIZE

__all__ = ["RxFault", "RXQ_FAULTS", "RxInfo", "RxQueue"]


class RxFault(Exception):
    """A call into the pending queue found a broken rule; nothing changed.

    ``fault`` is an RXQ_* code of native/rxq.h; ``seq``, ``got``, ``had``
    (48-byte headers, or None), ``limit``, ``floor``, ``off``, ``errnum``
    and ``volume`` (apply: the image that failed, or None) say what, for
    replicator/secondary/pending.py to word the message."""

    def __init__(self, err) -> None:
        self.fault = err.fault
        self.seq = err.seq
        self.limit = err.limit
        self.floor = err.floor
        self.off = err.off
        self.errnum = err.errnum
        self.volume = err.volume if err.volume != 0xFFFFFFFF else None
        self.got = bytes(_ffi.buffer(err.got, RECORD_HEADER_SIZE))
        self.had = bytes(_ffi.buffer(err.had, RECORD_HEADER_SIZE))
        super().__init__(f"rxq fault {self.fault} at seq {self.seq}")


RXQ_FAULTS = {name[4:].lower(): getattr(_lib, name) for name in dir(_lib)
              if name.startswith("RXQ_") and name not in ("RXQ_TOKEN", "RXQ_NONE",
                                                          "RXQ_ANNOUNCED", "RXQ_COMPLETE",
                                                          "RXQ_MAX_VOLUMES")}


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

    def set_ts_bound(self, ts_ns: int) -> None:
        """Runs stop before the first non-MARK record stamped after
        *ts_ns* (0: no bound): a consistency group's release (DESIGN §13)."""
        _lib.rxq_set_ts_bound(self._q, ts_ns)

    def received_ts(self) -> int:
        """The stamp of the last record of the complete prefix (0: none)."""
        return _lib.rxq_received_ts(self._q)

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

    def apply_run_volumes(self, journal_fd: int, image_fds: list[int],
                          image_sizes: list[int]) -> int:
        """Write the handed-out run to the volumes' images (volume v:
        image_fds[v], image_sizes[v] bytes); data bytes written."""
        err = _ffi.new("struct rxq_err *")
        fds = _ffi.new("int[]", image_fds)
        sizes = _ffi.new("uint64_t[]", image_sizes)
        if _lib.rxq_apply_run_volumes(self._q, journal_fd, fds, sizes, len(image_fds),
                                      self._written, err) < 0:
            raise RxFault(err)
        return self._written[0]

    def mark_applied(self, seq: int) -> bool:
        if _lib.rxq_mark_applied(self._q, seq) != 0:
            return False
        self._release_hot(seq)
        return True

    def expect_base(self, seq: int) -> None:
        _lib.rxq_expect_base(self._q, seq)

    def cover(self, seq: int) -> None:
        """Seqs up to *seq* are in a committed increment not applied yet."""
        _lib.rxq_cover(self._q, seq)

    def rebase(self, seq: int, token: bytes | None) -> bool:
        if _lib.rxq_rebase(self._q, seq, token if token else _ffi.NULL) != 0:
            return False
        self._release_hot(seq)
        return True

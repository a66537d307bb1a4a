"""native/core.h: the primary's write path and its send ring.

One call per request, the GIL released (cffi does that for API-mode calls):
mark the tracks in the OOS bitmap (durable through the activity log), write
the device, assign the seq, queue the record in the send ring. The consumer
side (peek, advance, release, rewind, drop, resume) feeds the shipper; the
catch-up increments (freeze, drain_track, collisions, thaw: native/collide.h)
run against the same Core. ship() streams the ring in C (replicator.native.ship).

Volumes (replicator.layout, native/core.h): ``Core(device, size, ...)`` is one
volume at base 0, as before; ``Core.open_volumes(devices, layout, ...)`` opens
several, laid end to end in one logical space. write/trim/zero take
(volume-relative offset, ``volume``); pread, drain_track and collisions use
LOGICAL offsets (a read stops at the end of the volume holding its first byte).
"""
from __future__ import annotations

import errno as _errno
import os
import struct
import sys
import threading
from contextlib import contextmanager
from typing import NamedTuple, Sequence

from replicator.layout import Layout
from replicator.native import ship as _ship
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.ffi import (ERRLEN as _ERRLEN, NONE as _NONE, U32 as _U32, CoreError,
                                   alloc_uninit as _alloc_uninit, errbuf as _errbuf,
                                   errmsg as _errmsg, ffi as _ffi, lib as _lib,
                                   oserror as _oserror, path_arg as _path_arg)
from replicator.native.ring import tokens
from replicator.native.ship import ShipResult

__all__ = ["Core", "CoreError", "WriteResult", "ShipResult"]


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



class FlowPolicy(NamedTuple):
    """The write path's flow control (native/flow.h; which one is in force
    when is replicator/modes.py's table). ``fill`` 0 means the ring's size;
    ``block_timeout_s`` None: wait for room for ever."""

    wait_peer: bool = False
    block: bool = False
    fill: int = 0
    block_timeout_s: float | None = None
    rate_bps: int = 0  # max-lag: the pace writes' bytes may go at, 0 = none


class Core:
    """The primary's write path (native/core.h) and its send ring.

    Producers: write(), trim(), zero(), flush() from any number of threads.
    Consumer (one thread): wait(), peek(), advance(), tokens(), release(),
    rewind(), resume(). close() only when no other call is running.
    """

    def __init__(self, device_path: str, size: int, oos: Bitmap, al: ActivityLog,
                 ring_size: int, first_seq: int, history_path: str | None = None,
                 cr: Bitmap | None = None):
        """Open *device_path* (file or block device) for *size* bytes: one
        volume at logical base 0."""
        self._c = None
        if size <= 0:
            raise ValueError(f"device size {size} must be positive")
        self._open([device_path], Layout.single(size, oos.track_size), oos, al, ring_size,
                   first_seq, history_path, cr)

    @classmethod
    def open_volumes(cls, devices: Sequence[str], layout: Layout, oos: Bitmap,
                     al: ActivityLog, ring_size: int, first_seq: int,
                     history_path: str | None = None, cr: Bitmap | None = None) -> "Core":
        """Open the volumes of *layout*, volume i on ``devices[i]``, with one
        sequencer, OOS bitmap (covering ``layout.ntracks``) and activity log."""
        if len(devices) != len(layout):
            raise ValueError(f"{len(devices)} device(s) for {len(layout)} volume(s)")
        if layout.track_size != oos.track_size:
            raise ValueError(f"layout track size {layout.track_size} differs from the OOS "
                             f"bitmap's {oos.track_size}")
        self = cls.__new__(cls)
        self._c = None
        self._open(devices, layout, oos, al, ring_size, first_seq, history_path, cr)
        return self

    def _open(self, devices: Sequence[str], layout: Layout, oos: Bitmap, al: ActivityLog,
              ring_size: int, first_seq: int, history_path: str | None,
              cr: Bitmap | None) -> None:
        if first_seq < 0:
            raise ValueError(f"first seq {first_seq} must be >= 0")
        n = len(layout)
        # char[] copies, alive across the call (the struct holds pointers).
        paths = [_ffi.new("char[]", _path_arg(d)) for d in devices]
        vols = _ffi.new("struct core_volume[]", n)
        for i in range(n):
            vols[i].path = paths[i]
            vols[i].size = layout.sizes[i]
            vols[i].base = layout.bases[i]
        out = _ffi.new("struct core **")
        err = _errbuf()
        hist = _ffi.NULL if history_path is None else _path_arg(history_path)
        rc = _lib.core_open(out, vols, n, oos._ptr(), al._ptr(), ring_size, first_seq, hist,
                            err, _ERRLEN)
        if rc < 0:
            raise CoreError(_errmsg(err, f"device {os.fspath(devices[0])}: {os.strerror(-rc)}"))
        self._c = out[0]
        self._ship_abort = _ffi.new("int *")
        self._ship_inflight = _ffi.new("uint64_t[3]")
        self.devices: tuple[str, ...] = tuple(os.fspath(d) for d in devices)
        self.device_path = self.devices[0] if n == 1 else ", ".join(self.devices)
        self.layout = layout
        self._sizes = layout.sizes
        self._nvols = n
        self.size = layout.logical_size  # logical: the single device's size for one volume
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
        """A logical range (reads)."""
        if offset < 0 or length <= 0 or offset + length > self.size or length > _U32:
            raise ValueError(f"range {offset}+{length} is outside the device "
                             f"{self.device_path} ({self.size} bytes) or empty")

    def _check_volume(self, volume: int, offset: int, length: int) -> None:
        """A volume-relative range (writes)."""
        if not 0 <= volume < self._nvols:
            raise ValueError(f"volume {volume} does not exist: {self._nvols} volume(s) on "
                             f"{self.device_path}")
        size = self._sizes[volume]
        if offset < 0 or length <= 0 or offset + length > size or length > _U32:
            raise ValueError(f"range {offset}+{length} is outside the device "
                             f"{self.devices[volume]} ({size} bytes) or empty")

    def write(self, data, offset: int, fua: bool = False, volume: int = 0) -> WriteResult:
        """Write *data* at *offset* of *volume*: mark, write the device,
        sequence, queue."""
        buf = _from_buffer(data)
        n = len(buf)
        if (offset < 0 or n == 0 or n > _U32 or not 0 <= volume < self._nvols
                or offset + n > self._sizes[volume]):
            self._check_volume(volume, offset, n)
        c = self._c
        if c is None:
            self._ptr()
        out = _result()
        rc = _core_write(c, buf, n, offset, 1 if fua else 0, volume, out)
        if rc < 0:
            raise _oserror(rc, f"write of {n} bytes at {offset} to {self.devices[volume]}")
        return WriteResult(out.seq, out.queued)

    def _zeroing(self, fn, name: str, offset: int, length: int, volume: int,
                 fua: bool) -> WriteResult:
        self._check_volume(volume, offset, length)
        out = _result()
        rc = fn(self._ptr(), offset, length, 1 if fua else 0, volume, out)
        if rc < 0:
            raise _oserror(rc, f"{name} of {length} bytes at {offset} on {self.devices[volume]}")
        return WriteResult(out.seq, out.queued)

    def trim(self, offset: int, length: int, volume: int = 0, fua: bool = False) -> WriteResult:
        """Discard a range; it reads as zeros afterwards (on both sides)."""
        return self._zeroing(_lib.core_trim, "trim", offset, length, volume, fua)

    def zero(self, offset: int, length: int, volume: int = 0, fua: bool = False) -> WriteResult:
        """Write zeros over a range (punching holes where that is cheaper)."""
        return self._zeroing(_lib.core_zero, "zero", offset, length, volume, fua)

    def flush(self) -> WriteResult:
        """fdatasync every volume, sync the OOS bitmap, queue one FLUSH
        record (volume field 0: it covers every volume)."""
        out = _result()
        rc = _lib.core_flush(self._ptr(), out)
        if rc < 0:
            raise _oserror(rc, f"flush of {self.device_path}")
        return WriteResult(out.seq, out.queued)

    def mark(self, t_ns: int, number: int = 0, note: bytes = b"") -> WriteResult:
        """Sequence a group point marker (DESIGN §13): a MARK record with
        ts = *t_ns*, once no write can still be stamped at or before it
        (``t_ns`` 0: a heartbeat stamped now). *number*: the checkpoint
        number (0 for a heartbeat); *note*: its data (the group's JSON
        note, at most 4 KiB). OSError(ETIMEDOUT) when this clock is more
        than 10 s behind *t_ns*."""
        out = _result()
        rc = _lib.core_mark(self._ptr(), t_ns, number, note, len(note), out)
        if rc < 0:
            raise _oserror(rc, f"group marker {number} at {t_ns}")
        return WriteResult(out.seq, out.queued)

    def set_flow(self, policy: FlowPolicy) -> None:
        """Set the write path's flow control (native/flow.h): wait for the
        peer (protocol B/C), block for room under ``fill`` bytes
        (on-congestion block), the max-lag pace of the writes' bytes. Waiters see
        the change at once; turning wait_peer off lets them all go."""
        p = _ffi.new("struct flow_policy *")
        p.wait_peer, p.block, p.fill = policy.wait_peer, policy.block, policy.fill
        p.block_timeout_ns = (-1 if policy.block_timeout_s is None
                              else int(policy.block_timeout_s * 1e9))
        p.rate_bps = int(policy.rate_bps)
        _lib.core_set_flow(self._ptr(), p)

    def flow(self) -> FlowPolicy:
        """The flow policy in force."""
        p = _ffi.new("struct flow_policy *")
        _lib.core_get_flow(self._ptr(), p)
        return FlowPolicy(bool(p.wait_peer), bool(p.block), p.fill,
                          None if p.block_timeout_ns < 0 else p.block_timeout_ns / 1e9,
                          p.rate_bps)

    def set_durable(self, seq: int) -> None:
        """The peer holds every record through *seq* (B: received, C:
        journaled): writers waiting for it return."""
        _lib.core_set_durable(self._ptr(), seq)

    def flow_stats(self) -> dict:
        """Counters of the flow control: durable_seq, peer_waits,
        peer_wait_s, peer_waiting (now), room_waits, room_wait_s,
        room_waiting (now), room_timeouts, delays, delay_s, releases."""
        st = _ffi.new("struct flow_stats *")
        _lib.core_flow_stats(self._ptr(), st)
        out = {k: getattr(st, k) for k in ("durable_seq", "peer_waits", "peer_waiting",
                                           "room_waits", "room_waiting", "room_timeouts",
                                           "delays", "releases")}
        out.update(peer_wait_s=st.peer_wait_ns / 1e9, room_wait_s=st.room_wait_ns / 1e9,
                   delay_s=st.delay_ns / 1e9)
        return out

    def set_clock_offset(self, offset_ns: int) -> None:
        """Shift this core's clock by *offset_ns* (tests inject skew)."""
        _lib.core_set_clock_offset(self._ptr(), offset_ns)

    def now_ns(self) -> int:
        """This core's clock (CLOCK_REALTIME plus the offset), in ns."""
        return _lib.core_now(self._ptr())

    def pread(self, length: int, offset: int, locked: bool = False) -> bytes:
        """Read at a LOGICAL offset, cut at the end of the volume holding
        *offset* (b"" in an alignment gap). locked: hold the track locks (no
        write half-way)."""
        if length == 0:
            return b""
        self._check(offset, length)
        buf = _ffi.new("char[]", length)
        n = _lib.core_pread(self._ptr(), buf, length, offset, locked)
        if n < 0:
            raise _oserror(n, f"read of {length} bytes at {offset} from {self.device_path}")
        return _ffi.unpack(buf, n)

    def pread_into(self, buf, offset: int, locked: bool = False) -> int:
        """Read up to len(buf) bytes at LOGICAL *offset* into a writable
        buffer, cut as pread() is; bytes read."""
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
        return _ship.stream(self._ptr(), self._ship_abort, self._ship_inflight, fds, first_fd,
                            interval_s, batch_bytes, return_after_s, last_send_ns)

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
        """Take logical *track* from the frozen map and read it (under its
        lock, cut at its volume's end); None if a write already put it in
        the collision queue."""
        buf = _alloc_uninit("unsigned char[]", self.oos.track_size)  # read over: no memset
        n = _lib.core_drain_track(self._ptr(), track, buf, self.oos.track_size)
        if n < 0:
            raise _oserror(n, f"reading track {track}")
        return bytes(_ffi.buffer(buf, n)) if n else None

    def collisions(self, max_bytes: int = 8 << 20, drain: bool = True) -> list[tuple[int, bytes]]:
        """The collision copies queued so far: [(logical offset, data)], oldest first.
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
        """Close. clean: fdatasync every volume, sync the OOS bitmap and empty
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

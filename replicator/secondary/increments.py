"""The secondary's side of catch-up increments (DESIGN §4): receiving an
increment, staging it in the journal or writing it in place under a
reflink snapshot, and applying it atomically at COMMIT.

:class:`IncrementReceiver` is a part of :class:`replicator.secondary.daemon.Secondary`
(a mixin: it uses the daemon's lock, journal, pending queue, images and
metadata); it is kept here so that the stream's fast path and the
increments' rules each read on their own.

Volumes (DESIGN §8): INCR_DATA and INCR_ZERO (track contents and
collision copies alike) carry LOGICAL offsets, the volumes laid end to
end; their volume field is unused (0). A piece is split with the layout
into (volume, offset) parts, each written to its volume's image; a data
piece that touches an alignment gap or runs past the end is refused at
receipt (a protocol error), a zero range is cut to the volumes. One
increment is the whole group at one instant: staged pieces of every
volume are applied together after one COMMIT, redone together after a
crash, made durable by an fdatasync of every image before the one
checkpoint; written in place, it runs under a reflink snapshot of every
image (snapshot.py), all restored together if it never commits.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field

from replicator.secondary import snapshot
from replicator.secondary.applier import pwrite_all, zero_range
from replicator.metadata import DISK_INCONSISTENT, DISK_UPTODATE
from replicator.secondary.pending import StreamError
from replicator.protocol.errors import ProtocolError
from replicator.protocol.messages import IncrBegin, IncrCommit, IncrData, IncrZero

log = logging.getLogger("duplex.secondary")

# Tests only: seconds to pause after each piece of an increment is applied,
# so that a kill can land in the middle of an apply.
_SLOW_APPLY = float(os.environ.get("DUPLEX_TEST_SLOW_INCREMENT_APPLY", "0") or 0)


@dataclass
class Increment:
    """A catch-up increment being received or waiting to be applied."""

    id: int
    base: int
    staged: bool
    positions: list[int] = field(default_factory=list)
    bytes: int = 0
    snapshot: snapshot.Snapshot | None = None  # in place, with a reflink clone


class IncrementReceiver:
    """Increments, for the Secondary daemon (see the module docstring)."""

    def _hold_while_failed(self, link, ev: IncrBegin) -> None:
        """Reader thread, before an increment begins: while the disk is
        Failed, hold it. A failing image cannot take a catch-up: written in
        place it would tear the image with nothing to write it again from.
        Holding (not reading on) stops the primary through TCP, and it
        keeps its bitmap; the ACKs still carry the reason. Closing the link
        instead would only make the primary reconnect and offer it again
        at once. Ends when applying works again (the applier's retries
        clear the failure), or raises ProtocolError when the link or the node
        goes away first."""
        if not self.apply_error:
            return
        log.warning("%s: increment %d waits: the disk is Failed (%s)", self.resource.name,
                    ev.incr_id, self.apply_error)
        while self.apply_error:
            if not link.alive() or not self.receiving or self._stop.is_set():
                raise ProtocolError(f"increment {ev.incr_id} not taken: the disk is Failed: "
                                    f"{self.apply_error}")
            self._apply_wake.set()
            self._stop.wait(0.2)
        log.info("%s: increment %d goes on: applying works again", self.resource.name,
                 ev.incr_id)

    def _on_incr_begin(self, ev: IncrBegin) -> None:
        with self._lock:
            prev = self.incr
            if prev is not None and prev.id != ev.incr_id:
                log.warning("%s: increment %d abandoned by the primary (increment %d begins)",
                            self.resource.name, prev.id, ev.incr_id)
            if ev.base_seq < self.pending.applied_through:
                raise StreamError(f"increment {ev.incr_id} has base seq {ev.base_seq}, below "
                                  f"the applied seq {self.pending.applied_through}")
            # Stage it in the journal when it fits (the image stays a valid
            # past image until COMMIT); else write it straight to the image
            # and say Inconsistent until it commits (DESIGN §4). An abandoned
            # increment that was written in place left the image torn: the
            # next one goes in place too, under the same snapshot (the one
            # taken before the tearing), until one commits.
            torn = prev is not None and not prev.staged
            staged = not torn and (self.journal.area_size - self.journal.used_bytes
                                   > ev.nbytes + ev.nbytes // 16 + (1 << 20))
            self.incr = Increment(ev.incr_id, ev.base_seq, staged)
            self.pending.expect_base(ev.base_seq)
        how = "staged in the journal"
        if torn:
            self.incr.snapshot = prev.snapshot
            if prev.snapshot is not None:
                how = (f"written in place, still under the snapshot {prev.snapshot.path} "
                       f"(increment {prev.id} was abandoned half-way)")
            else:
                how = "written in place over an abandoned increment (Inconsistent)"
        elif not staged:
            # Nothing older may land on the image after the increment's data.
            self._pause_apply.set()
            self._wait_apply_idle()
            self.incr.snapshot = snapshot.take(
                [(fd, self.device_of(v)) for v, fd in sorted(self.images.items())],
                meta_dir=self.node.meta_dir, incr_id=ev.incr_id, base=ev.base_seq)
            if self.incr.snapshot is not None:
                how = f"written in place; the reflink snapshot {self.incr.snapshot.path} keeps " \
                      f"the previous image until it commits"
                self.inconsistent_reason = ""
            else:
                how = "written in place (Inconsistent until it commits)"
                self._set_disk_inconsistent(f"increment {ev.incr_id} ({ev.nbytes} bytes) is "
                                            f"larger than the journal can stage, and "
                                            f"{self._clone_names()} cannot be cloned "
                                            f"(no reflink)")
        log.info("%s: increment %d begins: %d tracks, %d bytes, base seq %d, %s",
                 self.resource.name, ev.incr_id, ev.tracks, ev.nbytes, ev.base_seq, how)

    def _on_incr_data(self, ev: IncrData) -> None:
        inc = self.incr
        if inc is None or inc.id != ev.incr_id:
            raise StreamError(f"INCR_DATA for increment {ev.incr_id}, which has not begun")
        if ev.offset + len(ev.data) > self.size:
            raise StreamError(f"INCR_DATA at {ev.offset}+{len(ev.data)} runs past the "
                              f"device end {self.size}")
        parts = self._data_parts("INCR_DATA", ev.offset, len(ev.data), ev.volume)
        if inc.staged:
            with self._lock:
                self._wait_room(len(ev.data) + 32)
                inc.positions.append(self.journal.append_incr_data(
                    inc.id, inc.base, ev.offset, ev.data, ev.volume))
        else:
            self._write_parts(parts, ev.data)
        inc.bytes += len(ev.data)

    def _on_incr_zero(self, ev: IncrZero) -> None:
        inc = self.incr
        if inc is None or inc.id != ev.incr_id:
            raise StreamError(f"INCR_ZERO for increment {ev.incr_id}, which has not begun")
        if ev.offset + ev.length > self.size:
            raise StreamError(f"INCR_ZERO at {ev.offset}+{ev.length} runs past the device "
                              f"end {self.size}")
        if self.multi and ev.volume:
            raise StreamError(f"INCR_ZERO at {ev.offset} names volume {ev.volume}: increment "
                              f"offsets are logical, the volume field must be 0")
        if inc.staged:
            with self._lock:
                self._wait_room(32)
                inc.positions.append(self.journal.append_incr_zero(
                    inc.id, inc.base, ev.offset, ev.length, ev.volume))
        else:
            self._zero_parts(ev.offset, ev.length)
        inc.bytes += ev.length

    def _on_incr_commit(self, ev: IncrCommit) -> None:
        inc = self.incr
        if inc is None or inc.id != ev.incr_id or ev.end_seq != inc.base:
            raise StreamError(f"INCR_COMMIT({ev.incr_id}, {ev.end_seq}) does not match the "
                              f"increment in progress")
        with self._lock:
            self.incr = None
            if inc.staged:
                self._wait_room(64)
                self.journal.append_incr_commit(inc.id, inc.base)
            self._committed.append(inc)
        with self._commit_lock:
            self.journal.commit()
        self._apply_wake.set()

    def _apply_increment(self, inc: "Increment") -> None:
        """Apply a committed increment and move the stream past its base.
        Staged: redo-logged, a crash re-applies it on restart. An OSError
        (the image is full or failing) leaves the increment committed and
        unapplied: applying it again writes the same bytes."""
        self.runs_started += 1
        try:
            log.info("%s: applying increment %d (%d pieces)", self.resource.name, inc.id,
                     len(inc.positions))
            if inc.staged:
                for pos in inc.positions:
                    off, _vol, data = self.journal.read_incr_data(pos)  # off: logical
                    if isinstance(data, int):
                        self._zero_parts(off, data)
                    else:
                        self._write_parts(self._data_parts("staged INCR_DATA", off, len(data)),
                                          data)
                    if _SLOW_APPLY:
                        time.sleep(_SLOW_APPLY)  # fault-injection tests: widen the window
            if self._sync_error:  # a failed fdatasync before: this one proves nothing
                raise OSError(errno.EIO, self._sync_error)
            try:
                self.sync_images()  # every volume durable before the one checkpoint
            except OSError as e:
                self._sync_failed(e)
                raise
            with self._lock:
                self.pending.rebase(inc.base)
                with self._commit_lock:
                    self.journal.commit()
                    self.journal.checkpoint(inc.base)
                    self.journaled = max(self.journaled, self.pending.received_through)
                if inc.snapshot is not None:
                    snapshot.drop(inc.snapshot, self.node.meta_dir)
                self._lock.notify_all()
        finally:
            self.runs_done += 1
        self.admin.increment_applied(inc.base)  # may end an invalidate's full sync
        if (self.md.needs_initial_sync or self.md.disk != DISK_UPTODATE) \
                and not self.md.invalidated:  # an invalidated image waits for its full sync
            with self.md.update():
                self.md.needs_initial_sync = False
                self.md.disk = DISK_UPTODATE
        self._pause_apply.clear()
        self.primary_needs_resync = False
        if self.own_oos is not None and self._clear_own_oos_at is not None \
                and inc.base >= self._clear_own_oos_at:
            # The primary merged our tracks before this increment froze.
            self.own_oos.clear_all()
            self.own_oos.sync()
            self._clear_own_oos_at = None
        log.info("%s: increment %d applied (%d bytes); consistent at seq %d",
                 self.resource.name, inc.id, inc.bytes, inc.base)

    # -- logical pieces -> (volume, offset) --------------------------------

    def _data_parts(self, what: str, off: int, length: int,
                    volume: int = 0) -> list[tuple[int, int, int]]:
        """(volume, offset, length) parts of a data piece at logical *off*
        (StreamError if a byte lies in no volume)."""
        if self.multi and volume:
            raise StreamError(f"{what} at {off} names volume {volume}: increment offsets "
                              f"are logical, the volume field must be 0")
        try:
            return self.layout.split(off, length)
        except ValueError as e:
            raise StreamError(f"{what} at {off}+{length}: {e}") from None

    def _write_parts(self, parts: list[tuple[int, int, int]], data) -> None:
        mv = memoryview(data).cast("B")
        pos = 0
        for vol, voff, n in parts:
            try:
                pwrite_all(self.images[vol], mv[pos:pos + n], voff)
            except OSError as e:
                raise OSError(e.errno, e.strerror, self.device_of(vol)) from None
            pos += n

    def _zero_parts(self, off: int, length: int) -> None:
        """Zero the logical range [off, +length) where it lies in a volume
        (an alignment gap holds nothing to zero)."""
        end = off + length
        for vol, (b, sz) in enumerate(zip(self.layout.bases, self.layout.sizes)):
            lo, hi = max(off, b), min(end, b + sz)
            if hi > lo:
                try:
                    zero_range(self.images[vol], lo - b, hi - lo)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, self.device_of(vol)) from None

    def _clone_names(self) -> str:
        if not self.multi:
            return self.node.device
        return "the images (" + ", ".join(self.device_of(v) for v in sorted(self.images)) + ")"

    def _set_disk_inconsistent(self, why: str) -> None:
        with self.md.update():
            self.md.disk = DISK_INCONSISTENT
        self.inconsistent_reason = why
        log.warning("%s: disk Inconsistent until the increment commits: %s",
                    self.resource.name, why)

    def _wait_apply_idle(self) -> None:
        while self.runs_started != self.runs_done:
            time.sleep(0.01)

    def _incr_note(self) -> str:
        inc = self.incr
        if inc is None or inc.staged:
            return ""
        if inc.snapshot is not None:
            return (f"increment {inc.id} is written in place; the reflink snapshot "
                    f"{inc.snapshot.path} is the consistent image until it commits")
        return self.inconsistent_reason


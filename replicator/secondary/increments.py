"""The secondary's side of catch-up increments (DESIGN §4): receiving an
increment, staging it in the journal or writing it in place under a
reflink snapshot, and applying it atomically at COMMIT.

:class:`IncrementReceiver` is a part of :class:`replicator.secondary.daemon.Secondary`
(a mixin: it uses the daemon's lock, journal, pending queue, image and
metadata); it is kept here so that the stream's fast path and the
increments' rules each read on their own.
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
            self.incr.snapshot = snapshot.take(self.fd, self.node.device, self.node.meta_dir,
                                               ev.incr_id, ev.base_seq)
            if self.incr.snapshot is not None:
                how = f"written in place; the reflink snapshot {self.incr.snapshot.path} keeps " \
                      f"the previous image until it commits"
                self.inconsistent_reason = ""
            else:
                how = "written in place (Inconsistent until it commits)"
                self._set_disk_inconsistent(f"increment {ev.incr_id} ({ev.nbytes} bytes) is "
                                            f"larger than the journal can stage, and "
                                            f"{self.node.device} cannot be cloned (no reflink)")
        log.info("%s: increment %d begins: %d tracks, %d bytes, base seq %d, %s",
                 self.resource.name, ev.incr_id, ev.tracks, ev.nbytes, ev.base_seq, how)

    def _on_incr_data(self, ev: IncrData) -> None:
        inc = self.incr
        if inc is None or inc.id != ev.incr_id:
            raise StreamError(f"INCR_DATA for increment {ev.incr_id}, which has not begun")
        if ev.offset + len(ev.data) > self.size:
            raise StreamError(f"INCR_DATA at {ev.offset}+{len(ev.data)} runs past the "
                              f"device end {self.size}")
        if inc.staged:
            with self._lock:
                self._wait_room(len(ev.data) + 32)
                inc.positions.append(self.journal.append_incr_data(
                    inc.id, inc.base, ev.offset, ev.data, ev.volume))
        else:
            pwrite_all(self.fd, ev.data, ev.offset)
        inc.bytes += len(ev.data)

    def _on_incr_zero(self, ev: IncrZero) -> None:
        inc = self.incr
        if inc is None or inc.id != ev.incr_id:
            raise StreamError(f"INCR_ZERO for increment {ev.incr_id}, which has not begun")
        if ev.offset + ev.length > self.size:
            raise StreamError(f"INCR_ZERO at {ev.offset}+{ev.length} runs past the device "
                              f"end {self.size}")
        if inc.staged:
            with self._lock:
                self._wait_room(32)
                inc.positions.append(self.journal.append_incr_zero(
                    inc.id, inc.base, ev.offset, ev.length, ev.volume))
        else:
            zero_range(self.fd, ev.offset, ev.length)
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
                    off, _vol, data = self.journal.read_incr_data(pos)
                    if isinstance(data, int):
                        zero_range(self.fd, off, data)
                    else:
                        pwrite_all(self.fd, data, off)
                    if _SLOW_APPLY:
                        time.sleep(_SLOW_APPLY)  # fault-injection tests: widen the window
            if self._sync_error:  # a failed fdatasync before: this one proves nothing
                raise OSError(errno.EIO, self._sync_error)
            try:
                os.fdatasync(self.fd)
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
        if self.md.needs_initial_sync or self.md.disk != DISK_UPTODATE:
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


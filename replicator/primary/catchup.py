"""Catching up in increments without ever losing consistency (DESIGN §4:
consistency groups cut from an out-of-sync and a change-recording bitmap).

The out-of-sync bitmap says which tracks the secondary may lack. Instead
of copying them in bitmap order (which leaves the secondary Inconsistent
until the end, as DRBD and HAST do), the primary ships *increments*:

1. ``freeze``: under an instant write fence the OOS bitmap is copied to a
   frozen map F and a fresh change-recording bitmap CR starts; the last seq
   before the fence is the increment's base seq.
2. drain: every track of F is read from the device and sent as INCR_DATA.
   The collision rule lives in the C core: a write to a track still in F
   first copies that track's current content into the increment (and
   clears it from F). So the increment is exactly the device at the freeze.
3. COMMIT(k, base): the secondary staged the increment in its journal and
   applies it atomically; it acks journaled >= base once it is durable.
4. OOS := (OOS - F) | CR, and repeat with what was written meanwhile.

When the remainder fits the send ring, the freeze also resumes streaming:
records after the base seq flow as usual and the secondary applies them
after COMMIT(k). That is how the pair returns to Established.

Collaborators: a catch-up gets the core, the OOS bitmap, the metadata, the
resource, the link and :class:`Hooks` (callbacks into its owner, the
shipper, which take the shipper's lock where they touch its fields). It
never sees the shipper or the engine.

Threads and locks: a catch-up runs on the shipper's sender thread and
takes no lock of its own; what it reads of the peer (``journaled``) and
what it reports (progress, byte counts, the commit) goes through the hooks.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from replicator.native.bitmap import Bitmap
from replicator.peerlink import LinkError, PeerLink
from replicator.protocol.messages import IncrBegin, IncrCommit, IncrData, IncrZero, VerifyReq
from replicator.status import volumes_out_of_sync
from replicator.tracks import is_zero, track_digest, track_runs, zero_digest

log = logging.getLogger("duplex.catchup")

COLLIDE_CAP = 32 << 20     # collision copies queued at most; beyond, the increment restarts
PIECE_BYTES = 1 << 20      # INCR_DATA frames carry at most this much
MATCH_BATCH = 256          # tracks whose digests are asked for at once
MATCH_AHEAD = 4            # batches whose digests are asked for in advance
COMMIT_TIMEOUT = 120.0


def _batches(frozen: Bitmap, size: int):
    """The set tracks of *frozen*, in batches of at most *size*."""
    t = frozen.find_next(0)
    while t >= 0:
        batch = []
        while t >= 0 and len(batch) < size:
            batch.append(t)
            t = frozen.find_next(t + 1)
        yield batch


class IncrementAborted(Exception):
    """The increment cannot be completed as a point-in-time image (the
    collision queue overflowed); a new one starts from the current OOS."""


@dataclass
class SyncProgress:
    """Resync progress, for status (done/total bytes, rate, ETA)."""

    total_bytes: int = 0
    done_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    increment: int = 0

    def as_dict(self) -> dict:
        elapsed = max(1e-3, time.monotonic() - self.started)
        rate = self.done_bytes / elapsed
        left = max(0, self.total_bytes - self.done_bytes)
        return {"done_bytes": self.done_bytes, "total_bytes": self.total_bytes,
                "rate": round(rate), "eta_seconds": round(left / rate, 1) if rate > 0 else None,
                "increment": self.increment}


@dataclass(frozen=True)
class Hooks:
    """What a catch-up asks of its owner (the shipper), as callbacks."""

    journaled: Callable[[], int]             # the seq the peer journaled through
    pump: Callable[[], None]                 # one round of streaming (final increment)
    wait_ack: Callable[[float], None]        # sleep until an ack (or the timeout)
    progress: Callable[["SyncProgress | None"], None]  # the progress status shows
    add_bytes: Callable[[int, int], None]    # (sent in increments, matched on the peer)
    committed: Callable[[int], None]         # the streaming increment committed at base seq
    next_increment: Callable[[], int]        # a new increment id
    next_verify_id: Callable[[], int]        # a new VERIFY_REQ id (shared with verify)
    peer_initial_sync: bool                  # the peer was never synced: match digests
    # The admin's word (DESIGN §7): hold(pausable) raises LinkError once the
    # node was disconnected, and with pausable=True waits while the sync is
    # paused; paused() says whether it is (an increment under way then stops).
    hold: Callable[[bool], None] = lambda pausable: None
    paused: Callable[[], bool] = lambda: False


class CatchUp:
    """Runs increments over *link* until the pair streams again."""

    def __init__(self, core, oos: Bitmap, md, resource, link: PeerLink, hooks: Hooks):
        self.core = core
        self.oos = oos
        self.md = md
        self.name = resource.name
        self.ring_size = resource.ring_size
        self.rate = resource.resync_rate
        self.link = link
        self.hooks = hooks
        self.track = md.track_size
        self.size = md.device_size
        # Several volumes: the bytes of a track past its volume's end (the
        # alignment gap) are never read or sent, so they are not counted.
        layout = getattr(core, "layout", None)
        self._layout = layout if layout is not None and len(layout) > 1 else None

    def _dirty(self, bm: Bitmap) -> int:
        """Bytes of the volumes that *bm* marks (what the increment reads)."""
        if self._layout is None:
            return bm.dirty_bytes(self.size)
        return sum(volumes_out_of_sync(bm.runs(self.size), self._layout.bases,
                                       self._layout.sizes))

    def _final(self, oos_bytes: int) -> bool:
        # Stream again when what is left fits comfortably in the ring.
        return oos_bytes <= self.ring_size // 4

    def run(self) -> None:
        """Increments until one of them resumed streaming and committed."""
        if not self.core.dropped:
            self.core.drop()  # writes only mark OOS while we catch up
        oos = self.oos
        prog = SyncProgress(total_bytes=self._dirty(oos))
        self.hooks.progress(prog)
        try:
            while True:
                # `duplex pause-sync`: no increment starts while paused.
                self.hooks.hold(True)
                final = self._final(self._dirty(oos))
                prog.increment = self.hooks.next_increment()
                try:
                    resumed = self._increment(prog.increment, final, prog)
                except IncrementAborted as e:
                    log.warning("%s: increment %d aborted: %s; starting another",
                                self.name, prog.increment, e)
                    continue
                if resumed:
                    # Streaming again (hooks.committed said so). A ring that
                    # overflows from here on is the shipper's: a new catch-up.
                    break
                prog.total_bytes = prog.done_bytes + self._dirty(oos)
        finally:
            self.hooks.progress(None)  # a lost link ends the progress shown too

    def _increment(self, k: int, final: bool, prog: SyncProgress) -> bool:
        """One increment; True if it committed and streaming resumed."""
        oos = self.oos
        uuid = bytes.fromhex(self.md.node_uuid)
        if self.core.next_seq - 1 <= self.hooks.journaled():
            # The base must be a seq the peer has not acked yet, or its ack
            # could not tell us that this increment committed.
            self.core.flush()
        cr = Bitmap.create(None, uuid, oos.track_size, oos.nbits)
        frozen = Bitmap.create(None, uuid, oos.track_size, oos.nbits)
        base = self.core.freeze(frozen, cr, COLLIDE_CAP, stream=final)
        original = frozen.copy()
        tracks = original.count()
        log.info("%s: increment %d: %d tracks (%d bytes) as of seq %d%s",
                 self.name, k, tracks, self._dirty(original), base,
                 ", then streaming" if final else "")
        self.link.send(IncrBegin(k, base, tracks, self._dirty(original)))
        committed = resumed = False
        try:
            self._drain(k, frozen, prog, final)
            self.core.thaw()
            self._send_collisions(k, prog)
            if self.core.collision_overflowed:
                raise IncrementAborted("too many writes hit frozen tracks at once")
            self.link.send(IncrCommit(k, base))
            self._await_commit(base, final)
            committed = True
        finally:
            self.core.thaw()
            if committed:
                # What the increment covered is in sync as of the base; what
                # was written since is in CR (and, streamed, in the ring).
                oos.subtract(original)
                oos.merge_from(cr)
                self.core.set_cr(None)
                if self.md.needs_initial_sync:
                    with self.md.update():
                        self.md.needs_initial_sync = False
                if final and not self.core.dropped:
                    self.core.clear_on_release = True
                    self.hooks.committed(base)
                    resumed = True
            else:
                self.core.set_cr(None)
                oos.merge_from(cr)  # nothing is lost: CR writes marked OOS anyway
                if final and not self.core.dropped:
                    self.core.drop()
            cr.close()
            frozen.close()
            original.close()
        return resumed

    def _drain(self, k: int, frozen: Bitmap, prog: SyncProgress, final: bool) -> None:
        pieces: list[tuple[int, bytes]] = []
        pending = 0
        match = self.hooks.peer_initial_sync
        batches = _batches(frozen, MATCH_BATCH)
        # An old copy being synced for the first time: tracks it already
        # holds are not sent (nothing is applied on it meanwhile, so its
        # digests stay true until the commit). Digests are asked for a few
        # batches ahead, so that hashing on both sides overlaps the sending.
        ahead: deque[tuple[list[int], list[VerifyReq]]] = deque()
        while True:
            while len(ahead) < (MATCH_AHEAD if match else 1):
                batch = next(batches, None)
                if batch is None:
                    break
                ahead.append((batch, self._ask_digests(batch) if match else []))
            if not ahead:
                break
            batch, reqs = ahead.popleft()
            theirs: dict[int, int] = {}
            for req in reqs:
                sums = self.link.await_sums(req, 60.0)
                theirs.update((req.first_track + i, v) for i, v in enumerate(sums.sums))
            for tr in batch:
                if not self.link.alive():
                    raise LinkError(self.link.error or "connection closed")
                if self.hooks.paused():
                    # Abandoned, not held open: a frozen map kept while
                    # paused would fill the collision queue. OOS still
                    # covers all of it; the next increment starts on resume.
                    raise IncrementAborted("the sync was paused by the admin")
                self.hooks.hold(False)
                data = self.core.drain_track(tr)
                if data is None:
                    continue  # a write took it into the collision queue
                if tr in theirs and self._same(theirs[tr], data):
                    prog.done_bytes += len(data)
                    self.hooks.add_bytes(0, len(data))
                    continue
                pieces.append((tr * self.track, data))
                pending += len(data)
                if pending >= PIECE_BYTES:
                    self._send_pieces(k, pieces, prog)
                    pieces, pending = [], 0
                    self._send_collisions(k, prog)
                    if final:
                        self.hooks.pump()
                    if self.core.collision_overflowed:
                        raise IncrementAborted("too many writes hit frozen tracks at once")
        self._send_pieces(k, pieces, prog)

    def _same(self, their_digest: int, data: bytes) -> bool:
        """Does the peer's track (by digest) hold *data*? When the peer's
        track is zero and ours is not, no hashing is needed."""
        if their_digest == zero_digest(len(data)) and not is_zero(data):
            return False
        return their_digest == track_digest(data)

    def _ask_digests(self, tracks: list[int]) -> list[VerifyReq]:
        reqs = []
        for first, count in track_runs(tracks):
            req = VerifyReq(self.hooks.next_verify_id(), first, count, 0)
            self.link.send(req)
            reqs.append(req)
        return reqs

    def _send_pieces(self, k: int, pieces: list[tuple[int, bytes]], prog: SyncProgress) -> None:
        # All-zero tracks travel as markers (an initial sync of a mostly
        # empty device moves almost nothing); adjacent ones as one marker.
        zero = [is_zero(d) for _, d in pieces]
        zeros = [(off, len(d)) for (off, d), z in zip(pieces, zero) if z]
        pieces = [p for p, z in zip(pieces, zero) if not z]
        zrun: list[int] | None = None
        for off, n in zeros + [(None, 0)]:
            if zrun and (off is None or off != zrun[0] + zrun[1] or zrun[1] + n > 1 << 30):
                self.link.send(IncrZero(k, zrun[0], zrun[1]))
                prog.done_bytes += zrun[1]
                zrun = None
            if off is not None:
                zrun = [off, n] if zrun is None else [zrun[0], zrun[1] + n]
        # Adjacent tracks with data travel as one piece, of PIECE_BYTES at
        # most (the frame is joined in memory).
        run_off, run, run_len = 0, [], 0
        for off, data in pieces + [(None, b"")]:
            if run and (off is None or off != run_off + run_len
                        or run_len + len(data) > PIECE_BYTES):
                self._send_piece(k, run_off, b"".join(run), prog)
                run, run_len = [], 0
            if off is not None:
                if not run:
                    run_off = off
                run.append(data)
                run_len += len(data)

    def _send_piece(self, k: int, off: int, data: bytes, prog: SyncProgress) -> None:
        self.link.send(IncrData(k, off, data))
        prog.done_bytes += len(data)
        self.hooks.add_bytes(len(data), 0)
        if self.rate:
            # Rate limit: never ahead of rate * elapsed.
            ahead = prog.done_bytes / self.rate - (time.monotonic() - prog.started)
            if ahead > 0:
                time.sleep(min(ahead, 1.0))

    def _send_collisions(self, k: int, prog: SyncProgress) -> None:
        # In slices: the queue may hold COLLIDE_CAP bytes, and a copy of all
        # of it would double the primary's memory for a moment.
        while pieces := self.core.collisions(PIECE_BYTES, drain=False):
            self._send_pieces(k, pieces, prog)

    def _await_commit(self, base: int, final: bool) -> None:
        deadline = time.monotonic() + COMMIT_TIMEOUT
        while self.hooks.journaled() < base:
            if not self.link.alive():
                raise LinkError(self.link.error or "connection closed")
            self.hooks.hold(False)  # a disconnect by the admin ends the wait
            if time.monotonic() > deadline:
                raise LinkError(f"the peer did not commit the increment (base seq {base}) "
                                f"within {COMMIT_TIMEOUT:.0f} s")
            if final:
                self.hooks.pump()
            self.hooks.wait_ack(0.05)

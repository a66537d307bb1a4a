"""Online verify (issue 4): compare per-track checksums of both sides while
replication runs.

The primary reads each track (under its track lock) and asks the secondary
for the same tracks once it has applied everything written before the read
began. A track that differs while a write to it is still in flight (its
out-of-sync bit set, or a record for it not yet acknowledged) proves
nothing: it is retried. What still differs with nothing in flight is
reported, and with ``--fix`` marked out of sync so that a catch-up
increment resends it.

Collaborators: a :class:`Verifier` gets the core, the OOS bitmap, the
metadata, a function giving the current link to the peer, one giving
VERIFY_REQ ids (:class:`VerifyIds`, shared with the catch-up, which uses the
same link), one marking tracks out of sync, and one starting its thread
(the engine's supervisor). It never sees the engine or the shipper.

Threads and locks: the pass runs on its own thread ("duplex-verify").
``Verifier._lock`` guards ``run`` (one pass at a time; ``status`` reads the
reference without it, the run's fields are written by the pass thread
only). ``VerifyIds._lock`` guards its counter; it is taken alone, never
with another lock held by this module.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from replicator.errors import DuplexError
from replicator.peerlink import PeerLink
from replicator.tracks import track_digest, track_ranges, track_runs
from replicator.protocol.messages import MAX_VERIFY_TRACKS, VerifyReq

log = logging.getLogger("duplex.verify")

BATCH = 256          # tracks per request
RETRY_ROUNDS = 6     # a differing track must differ this often, at rest
RETRY_PAUSE = 0.3    # seconds between rounds
SUMS_TIMEOUT = 60.0


class VerifyError(DuplexError):
    """Verify cannot run (no peer, one already running)."""


@dataclass
class VerifyRun:
    """One verify pass and its result (the status document of verify)."""

    fix: bool
    total_tracks: int
    done_tracks: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    differing: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    error: str | None = None

    def as_dict(self, track_size: int, size: int, layout=None) -> dict:
        """The verify status document. With a *layout* of several volumes
        (replicator.layout) each range names its ``volume`` and its offset
        is volume-relative; the alignment gaps belong to no range."""
        elapsed = (self.finished or time.time()) - self.started
        differing = by_volume(track_ranges(self.differing, track_size, size), layout)
        return {"running": self.finished is None, "fix": self.fix,
                "done_tracks": self.done_tracks, "total_tracks": self.total_tracks,
                "done_bytes": min(size, self.done_tracks * track_size), "total_bytes": size,
                "seconds": round(elapsed, 2),
                "differing": differing,
                "differing_bytes": sum(r["length"] for r in differing),
                "skipped": by_volume(track_ranges(self.skipped, track_size, size), layout),
                "marked_out_of_sync": self.fix and bool(self.differing),
                "failure": self.error}


def by_volume(ranges: list[dict], layout) -> list[dict]:
    """LOGICAL byte ranges ``{"offset", "length"}`` as ranges of the volumes
    of *layout*, ``{"volume", "offset", "length"}`` (offset relative to the
    volume), cut at volume ends; unchanged for one volume (or no layout)."""
    if layout is None or len(layout) < 2:
        return ranges
    out: list[dict] = []
    for r in ranges:
        start, end = r["offset"], r["offset"] + r["length"]
        for name, base, vsize in zip(layout.names, layout.bases, layout.sizes):
            lo, hi = max(start, base), min(end, base + vsize)
            if hi > lo:
                out.append({"volume": name, "offset": lo - base, "length": hi - lo})
    return out


class VerifyIds:
    """The ids of VERIFY_REQ messages: one counter for everything that asks
    the peer for digests over one link (verify and the catch-up)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        """A new id, never given before in this run."""
        with self._lock:
            self._last += 1
            return self._last


class Verifier:
    """Runs verify passes for one primary, one at a time."""

    def __init__(self, core, oos, md, *, name: str, peer_name: str,
                 current_link: Callable[[], PeerLink | None],
                 next_verify_id: Callable[[], int],
                 mark_out_of_sync: Callable[[list[int], str], None],
                 spawn: Callable[[str, Callable[[], None]], object]):
        self.core = core
        self.oos = oos
        self.md = md
        self.name = name
        self.peer_name = peer_name
        self.size = md.device_size
        self._current_link = current_link
        self._next_id = next_verify_id
        self._mark_out_of_sync = mark_out_of_sync
        self._spawn = spawn
        self.run: VerifyRun | None = None
        self._lock = threading.Lock()

    def start(self, fix: bool = False) -> dict:
        """Control request ``verify``: start a pass in the background."""
        with self._lock:
            if self.run is not None and self.run.finished is None:
                raise VerifyError(f"{self.name}: a verify is already running")
            if self._current_link() is None:
                raise VerifyError(f"{self.name}: not connected to {self.peer_name}: verify "
                                  f"needs the peer")
            run = self.run = VerifyRun(fix=bool(fix), total_tracks=self.oos.nbits)
            self._spawn("duplex-verify", lambda: self._main(run))
        return self.status()

    def status(self) -> dict:
        """Control request ``verify-status``."""
        run = self.run
        if run is None:
            return {"running": False, "never_run": True}
        return run.as_dict(self.md.track_size, self.size, getattr(self.core, "layout", None))

    # -- the pass ----------------------------------------------------------

    def _main(self, run: VerifyRun) -> None:
        try:
            suspects: set[int] = set()
            busy: set[int] = set()
            for first in range(0, run.total_tracks, BATCH):
                tracks = list(range(first, min(first + BATCH, run.total_tracks)))
                diff, inflight = self._compare(tracks)
                suspects |= diff
                busy |= inflight
                run.done_tracks = tracks[-1] + 1
            for _ in range(RETRY_ROUNDS):
                again = sorted(suspects | busy)
                if not again:
                    break
                time.sleep(RETRY_PAUSE)
                suspects, busy = set(), set()
                for i in range(0, len(again), BATCH):
                    diff, inflight = self._compare(again[i:i + BATCH])
                    suspects |= diff
                    busy |= inflight
            run.differing = sorted(suspects)
            run.skipped = sorted(busy)
            if run.fix and run.differing:
                self._mark_out_of_sync(run.differing, "verify found differing tracks")
            log.info("%s: verify done: %d tracks differ, %d skipped (busy)",
                     self.name, len(run.differing), len(run.skipped))
        except Exception as e:  # reported through verify-status
            log.exception("%s: verify failed", self.name)
            run.error = str(e)
        finally:
            run.finished = time.time()

    def _compare(self, tracks: list[int]) -> tuple[set[int], set[int]]:
        """(differing, in flight) among *tracks* (consecutive runs are asked
        for in one request each)."""
        core, oos, ts, size = self.core, self.oos, self.md.track_size, self.size
        link = self._current_link()
        if link is None:
            raise VerifyError("the connection to the peer was lost during verify")
        after = core.next_seq - 1
        local: dict[int, int | None] = {}
        for t in tracks:
            if oos.test_bit(t):
                local[t] = None  # the peer may lack it on purpose: in flight
                continue
            off = t * ts
            local[t] = track_digest(core.pread(min(ts, size - off), off, locked=True))
        remote: dict[int, int] = {}
        for first, count in track_runs(tracks):
            for i in range(0, count, MAX_VERIFY_TRACKS):
                n = min(MAX_VERIFY_TRACKS, count - i)
                sums = link.request_sums(VerifyReq(self._next_id(), first + i, n, after),
                                         SUMS_TIMEOUT)
                for j, v in enumerate(sums.sums):
                    remote[first + i + j] = v
        diff, inflight = set(), set()
        for t in tracks:
            if local[t] is None or oos.test_bit(t) or core.pending(t):
                if local[t] != remote[t]:
                    inflight.add(t)
            elif local[t] != remote[t]:
                diff.add(t)
        return diff, inflight

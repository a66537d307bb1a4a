"""Online verify (issue 4): compare per-track checksums of both sides while
replication runs.

The primary reads each track (under its track lock) and asks the secondary
for the same tracks once it has applied everything written before the read
began. A track that differs while a write to it is still in flight (its
out-of-sync bit set, or a record for it not yet acknowledged) proves
nothing: it is retried. What still differs with nothing in flight is
reported, and with ``--fix`` marked out of sync so that a catch-up
increment resends it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from replicator.errors import DuplexError
from replicator.tracks import track_digest, track_ranges, track_runs
from replicator.protocol.messages import MAX_VERIFY_TRACKS, VerifyReq

if TYPE_CHECKING:
    from replicator.primary.engine import Engine

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

    def as_dict(self, track_size: int, size: int) -> dict:
        elapsed = (self.finished or time.time()) - self.started
        return {"running": self.finished is None, "fix": self.fix,
                "done_tracks": self.done_tracks, "total_tracks": self.total_tracks,
                "done_bytes": min(size, self.done_tracks * track_size), "total_bytes": size,
                "seconds": round(elapsed, 2),
                "differing": track_ranges(self.differing, track_size, size),
                "differing_bytes": sum(r["length"] for r in
                                       track_ranges(self.differing, track_size, size)),
                "skipped": track_ranges(self.skipped, track_size, size),
                "marked_out_of_sync": self.fix and bool(self.differing),
                "failure": self.error}


class Verifier:
    """Runs verify passes for one primary engine, one at a time."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.run: VerifyRun | None = None
        self._lock = threading.Lock()

    def start(self, fix: bool = False) -> dict:
        """Control request ``verify``: start a pass in the background."""
        with self._lock:
            if self.run is not None and self.run.finished is None:
                raise VerifyError(f"{self.engine.resource.name}: a verify is already running")
            if self.engine.shipper.current_link() is None:
                raise VerifyError(f"{self.engine.resource.name}: not connected to "
                                  f"{self.engine.peer.name}: verify needs the peer")
            self.run = VerifyRun(fix=bool(fix), total_tracks=self.engine.oos.nbits)
            threading.Thread(target=self._main, args=(self.run,), name="duplex-verify",
                             daemon=True).start()
        return self.status()

    def status(self) -> dict:
        """Control request ``verify-status``."""
        run = self.run
        if run is None:
            return {"running": False, "never_run": True}
        return run.as_dict(self.engine.md.track_size, self.engine.size)

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
                self.engine.mark_out_of_sync(run.differing, "verify found differing tracks")
            log.info("%s: verify done: %d tracks differ, %d skipped (busy)",
                     self.engine.resource.name, len(run.differing), len(run.skipped))
        except Exception as e:  # reported through verify-status
            log.exception("%s: verify failed", self.engine.resource.name)
            run.error = str(e)
        finally:
            run.finished = time.time()

    def _compare(self, tracks: list[int]) -> tuple[set[int], set[int]]:
        """(differing, in flight) among *tracks* (consecutive runs are asked
        for in one request each)."""
        eng = self.engine
        core, oos, ts, size = eng.core, eng.oos, eng.md.track_size, eng.size
        link = eng.shipper.current_link()
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
                eng.shipper.verify_ids += 1
                n = min(MAX_VERIFY_TRACKS, count - i)
                sums = link.request_sums(VerifyReq(eng.shipper.verify_ids, first + i, n, after),
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

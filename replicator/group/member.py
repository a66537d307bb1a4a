"""A member secondary's side of its consistency group (DESIGN §13).

It keeps, durably in ``group.json`` in the meta-dir:

- ``released``: the last point (n, T) the rendezvous master released; the
  applier never applies a record stamped after T (the pending queue's
  bound), across restarts too;
- ``in_progress``: the release being applied (seed 000's update-in-progress:
  set before applying, cleared only by the master's reset, so a kill -9 in
  the middle is finished on restart, and while it is set the images are
  not promotable).

And, in memory, the markers (MARK records) received but not yet journaled
with everything before them; once they are, they are *held* and reported
to the master (``held`` in mode checkpoint, ``watermark`` in mode
limit-time, where the watermark is also advanced by the stamp of the last
journaled record).

Threads and locks: ``MemberGate._lock`` guards every field; the daemon's
reader (marks, journaled), its applier (apply_done) and the group agent
(release, reset) call in. File writes happen under it (rare, small).
"""
from __future__ import annotations

import heapq
import json
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import DuplexError
from replicator.fileio import atomic_write
from replicator.group.notes import MarkNote


class GroupStateError(DuplexError):
    """group.json is damaged: the node refuses to guess its group point."""


@dataclass(frozen=True)
class Mark:
    """A marker in this member's stream: its seq and its note."""

    seq: int
    t: int
    note: MarkNote


class MemberGate:
    """See the module doc."""

    def __init__(self, path: Path, group: str, mode: str, member: str) -> None:
        self.path = Path(path)
        self.group = group
        self.mode = mode
        self.member = member
        self._lock = threading.Lock()
        self.released_n = 0
        self.released_t = 0
        self.in_progress: int | None = None
        # Why this member is out of the group (catching up: its image is at
        # its own point, not the group's); persisted, so a restart says so.
        self.resigned: str | None = None
        self._rejoin_after = 0  # catching up: rejoin at a marker past this seq
        self._marks: list[tuple[int, Mark]] = []  # a heap by seq
        self._held_marks: deque[tuple[int, int]] = deque(maxlen=4096)  # (seq, t) held, by seq
        self.held: Mark | None = None
        self.watermark_t = 0
        self._load()

    # -- persistence --------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            d = json.loads(raw)
            if d.get("group") != self.group:
                raise ValueError(f"it belongs to group {d.get('group')!r}, not {self.group!r}")
            n, t, ip = d["released_n"], d["released_t"], d["in_progress"]
            resigned = d.get("resigned")
            if resigned is not None and not isinstance(resigned, str):
                raise ValueError("resigned must be a reason or null")
            def u64(v) -> bool:
                return type(v) is int and 0 <= v < 1 << 64

            if not (u64(n) and u64(t) and (ip is None or u64(ip))):
                raise ValueError("released_n, released_t and in_progress must be integers "
                                 "0..2^64-1 (in_progress may be null)")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise GroupStateError(f"{self.path}: damaged group state ({e}); the member cannot "
                                  f"know its group point: restore it, or remove it to start "
                                  f"the member with nothing released (its image then waits "
                                  f"for the group's next release)") from None
        self.released_n, self.released_t, self.in_progress = n, t, ip
        self.resigned = resigned

    def _save(self) -> None:
        body = {"group": self.group, "member": self.member, "released_n": self.released_n,
                "released_t": self.released_t, "in_progress": self.in_progress,
                "resigned": self.resigned}
        atomic_write(self.path, json.dumps(body, sort_keys=True).encode() + b"\n")

    # -- the apply bound ----------------------------------------------------

    def bound(self) -> int:
        """The stamp the applier may apply through (1 before any release:
        nothing, since every stamp is later)."""
        with self._lock:
            return self.released_t or 1

    # -- markers ------------------------------------------------------------

    def on_marks(self, marks: list[Mark]) -> None:
        """Markers seen in a DATA frame (not yet journaled). Frames of one
        stream may arrive on several connections out of order: kept by seq."""
        with self._lock:
            for m in marks:
                heapq.heappush(self._marks, (m.seq, m))

    def on_journaled(self, journaled: int, journaled_ts: int) -> list:
        """The stream is journaled and complete through seq *journaled*
        (stamp *journaled_ts*): the messages to send the master (held /
        watermark), maybe none."""
        with self._lock:
            newly = None
            while self._marks and self._marks[0][0] <= journaled:
                m = heapq.heappop(self._marks)[1]
                if self.held is None or m.seq > self.held.seq:
                    newly = m
                    self._held_marks.append((m.seq, m.t))
            out: list = []
            if newly is not None:
                self.held = newly
                if self.resigned is not None and newly.seq > self._rejoin_after:
                    # Streaming again after a catch-up: back in the group,
                    # which from now on holds this member's point too.
                    self.resigned = None
                    self._save()
                    out.append(("join", self._join_fields()))
            if self.held is None:
                return out
            note = self.held.note
            if self.resigned is not None:
                return out
            if self.mode == "checkpoint":
                if newly is None:
                    return out
                return out + [("held", {"member": self.member, "n": note.n, "t": self.held.t,
                                        "skew_us": note.skew_us,
                                        "members": list(note.members)})]
            wm = max(self.held.t, journaled_ts)
            if wm <= self.watermark_t:
                return out
            self.watermark_t = wm
            return out + [("watermark", {"member": self.member, "t": wm,
                                         "skew_us": note.skew_us,
                                         "members": list(note.members)})]

    def catching_up(self, base_seq: int) -> list:
        """A catch-up increment begins: its image will be at its primary's
        own point, which is not the group's. Leave the group until the
        stream is back (a marker after *base_seq*); returns the messages."""
        with self._lock:
            self._rejoin_after = max(self._rejoin_after, base_seq)
            self._marks.clear()
            if self.resigned is not None:
                return []
            self.resigned = ("catching up after falling behind: its image follows its own "
                             "primary's catch-up increments, not the group's point")
            self._save()
            return [("resign", {"member": self.member, "reason": self.resigned})]

    def report(self) -> list:
        """The held point (or watermark) as it is now: what a member says
        again after (re)connecting, since the master may have restarted."""
        with self._lock:
            if self.held is None or self.resigned is not None:
                return []
            note = self.held.note
            if self.mode == "checkpoint":
                return [("held", {"member": self.member, "n": note.n, "t": self.held.t,
                                  "skew_us": note.skew_us, "members": list(note.members)})]
            return [("watermark", {"member": self.member,
                                   "t": max(self.watermark_t, self.held.t),
                                   "skew_us": note.skew_us, "members": list(note.members)})]

    def increment_point(self, base_seq: int) -> int | None:
        """When a staged catch-up increment ending at *base_seq* may be
        applied: the T of the first held marker after it (its primary
        inserted it after the increment's instant, so every write in the
        increment is stamped before it); None while none is held. The
        increment waits until the group's bound reaches that T, and is then
        applied with the records up to the group's point, never ahead."""
        with self._lock:
            for seq, t in self._held_marks:
                if seq > base_seq:
                    return t
            return None

    def holds(self, t: int) -> bool:
        """Does this member hold everything stamped at or before *t*?"""
        with self._lock:
            if self.mode == "checkpoint":
                return self.held is not None and self.held.t >= t
            return max(self.watermark_t, self.held.t if self.held else 0) >= t

    # -- releases -----------------------------------------------------------

    def on_release(self, n: int, t: int) -> int | None:
        """The master released (n, t): persist update-in-progress and the
        point, then return the new bound (None: an old release, ignored)."""
        with self._lock:
            if n < self.released_n or (n == self.released_n and self.in_progress is None
                                       and t <= self.released_t):
                return None
            self.released_n, self.released_t = n, max(t, self.released_t)
            self.in_progress = n
            self._save()
            return self.released_t

    def on_reset(self, n: int) -> bool:
        """The master reset release n: update-in-progress is over."""
        with self._lock:
            if self.in_progress is None or n < self.in_progress:
                return False
            self.in_progress = None
            self._save()
            return True

    def join_fields(self) -> dict:
        """What this member tells the master when it (re)connects."""
        with self._lock:
            return self._join_fields()

    def _join_fields(self) -> dict:
        return {"member": self.member, "released_n": self.released_n,
                "released_t": self.released_t, "in_progress": self.in_progress}

    def hello(self) -> tuple[str, dict]:
        """The message a (re)connecting member sends: join, or resign (with
        its reason) while it is out of the group."""
        with self._lock:
            if self.resigned is not None:
                return "resign", {"member": self.member, "reason": self.resigned}
            return "join", self._join_fields()

    def promote_to(self, t: int) -> None:
        """A promotion fixes the point at *t*: persist it as released."""
        with self._lock:
            self.released_t = t
            self.in_progress = None
            self._save()

    def status(self) -> dict:
        """This member's group state, for status."""
        with self._lock:
            return {"group": self.group, "mode": self.mode,
                    "released": {"n": self.released_n, "t": self.released_t},
                    "update_in_progress": self.in_progress,
                    "held": ({"n": self.held.note.n, "t": self.held.t, "seq": self.held.seq}
                             if self.held else None),
                    "watermark_t": self.watermark_t or None, "resigned": self.resigned}

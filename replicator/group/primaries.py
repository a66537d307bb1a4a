"""A group member's primary side (DESIGN §13), in the nbdkit process.

The primary of the group's master resource is the clock and checkpoint
master (seed 000's primary master): every ``checkpoint-interval`` it issues
(n, T, members) to every connected member primary and to itself. ``members``
is its copy-active table: itself and every member primary connected now or
within ``RESIGN_GRACE`` (a member whose primary is gone longer is dropped,
and its secondary thereby resigns; a brief drop of the control link does
not resign anyone).

Each primary turns what it receives into MARK records in its own stream
(native core_mark: insertion atomic with stamping):

- mode checkpoint: a MARK at T for every checkpoint (n, T);
- mode limit-time: a heartbeat MARK stamped now, every interval, with the
  newest member list (the master's checkpoints only carry the list and pace
  the clock pings).

n starts, for each run of a master, at the master's clock in microseconds,
and goes up by one per checkpoint: numbers keep increasing across master
restarts and failovers without a file (the interval is at least 1 ms, and
the clocks agree to well within that).

Threads and locks: ``PrimaryGroup._lock`` guards ``_active`` (member ->
last seen), ``n``, ``members`` and ``last_*``. Threads: the master's ticker
and accept/readers (channel.py), or the member's client and pinger; one
marker thread per node takes (t, n) from ``_queue`` and calls the core
(which may sleep until its clock passes t).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from replicator.config import Group
from replicator.group.channel import GroupLink
from replicator.group.clock import SkewEstimator
from replicator.group.notes import MarkNote
from replicator.group.side import GroupSide
from replicator.protocol.group import GroupMessage

log = logging.getLogger("duplex.group")

PING_INTERVAL = 0.2
RESIGN_GRACE = 3.0


class PrimaryGroup(GroupSide):
    """See the module doc. *mark(t, n, note)* sequences a MARK (the core's
    ``mark``); *clock()* is the core's clock in ns; *master_nodes*: the
    master resource's node names, in config order."""

    SIDE = "primary"
    OTHER = "secondary"

    def __init__(self, group: Group, resource: str, node: str, master_nodes: list[str],
                 mark: Callable[[int, int, bytes], object], clock: Callable[[], int]) -> None:
        super().__init__(group, resource, node, master_nodes)
        self._mark = mark
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, float] = {}
        self.n = 0
        self.members: tuple[str, ...] = tuple(group.resources)
        self.last_checkpoint: tuple[int, int] | None = None
        self.last_mark_error: str | None = None
        self.marks = 0
        self.marks_dropped = 0  # not queued: the pair is Ahead
        self.skew = SkewEstimator()
        self._queue: queue.Queue = queue.Queue(maxsize=1024)

    # -- lifecycle ----------------------------------------------------------

    def _started(self) -> None:
        """The checkpoint master ticks; a member pings (and in limit-time
        heartbeats); both mark."""
        if self.is_master:
            self.sup.spawn("duplex-group-tick", self._master_loop, restart=True)
        else:
            self.sup.spawn("duplex-group-ping", self._ping_loop, restart=True)
            if self.group.mode == "limit-time":
                self.sup.spawn("duplex-group-heartbeat", self._heartbeat_loop, restart=True)
        self.sup.spawn("duplex-group-mark", self._mark_loop, restart=True)

    def stop(self) -> None:
        super().stop()
        self._queue.put(None)

    # -- the master ---------------------------------------------------------

    def _master_loop(self) -> None:
        interval = self.group.interval_s
        with self._lock:
            if self.n == 0:
                self.n = self._clock() // 1000
            # A master that (re)starts counts every member active until
            # RESIGN_GRACE passes without its primary: a restart must not
            # drop (and so resign) the members that have not reconnected yet.
            now = time.monotonic()
            for m in self.group.resources:
                if m != self.resource:
                    self._active.setdefault(m, now)
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # fell behind: do not burst
            self._issue()

    def _issue(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.n += 1
            n = self.n
            t = self._clock()
            for m, seen in list(self._active.items()):
                if seen is not None and now - seen > RESIGN_GRACE:
                    del self._active[m]
                    log.warning("group %s: primary of %s gone for %.0f s: it leaves the "
                                "group's member list (its secondary resigns)",
                                self.group.name, m, now - seen)
            members = tuple(r for r in self.group.resources
                            if r == self.resource or r in self._active)
            self.members = members
            self.last_checkpoint = (n, t)
        if self._server:
            self._server.broadcast("checkpoint", n=n, t=t, members=list(members))
        self._enqueue(t if self.group.mode == "checkpoint" else 0, n, members, 0)

    def _on_link(self, link: GroupLink) -> None:
        if self.is_master:
            with self._lock:
                self._active[link.peer_member] = None  # connected: never stale
            log.info("group %s: primary of %s (node %s) joined", self.group.name,
                     link.peer_member, link.peer_node)
        else:
            log.info("group %s: connected to the primary master %s", self.group.name,
                     link.peer_node)

    def _on_close(self, link: GroupLink, why: str) -> None:
        if self.is_master:
            with self._lock:
                if link.peer_member in self._active:
                    self._active[link.peer_member] = time.monotonic()
            log.warning("group %s: primary of %s (node %s) left: %s", self.group.name,
                        link.peer_member, link.peer_node, why)
        else:
            log.warning("group %s: lost the primary master: %s", self.group.name, why)

    def _on_message(self, link: GroupLink, msg: GroupMessage) -> None:
        if msg.type == "ping" and self.is_master:
            link.send("pong", nonce=msg["nonce"], t0=msg["t0"], t1=self._clock())
        elif msg.type == "pong" and not self.is_master:
            self.skew.sample(msg["t0"], msg["t1"], self._clock())
        elif msg.type == "checkpoint" and not self.is_master:
            members = tuple(msg["members"])
            with self._lock:
                self.n = msg["n"]
                self.members = members
                self.last_checkpoint = (msg["n"], msg["t"])
            if self.group.mode == "checkpoint":
                self._enqueue(msg["t"], msg["n"], members, self.skew.skew_us())

    # -- a member -----------------------------------------------------------

    def _ping_loop(self) -> None:
        nonce = 0
        while not self._stop.wait(PING_INTERVAL):
            nonce += 1
            if self._client is not None:
                self._client.send("ping", nonce=nonce, t0=self._clock())

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.group.interval_s):
            with self._lock:
                n, members = self.n, self.members
            self._enqueue(0, n, members, self.skew.skew_us())

    # -- marking ------------------------------------------------------------

    def _enqueue(self, t: int, n: int, members: tuple[str, ...], skew_us: int | None) -> None:
        note = MarkNote(self.group.name, n, members, skew_us).encode()
        try:
            self._queue.put_nowait((t, n, note))
        except queue.Full:
            self.marks_dropped += 1  # the marker is stuck (a clock far behind): say so

    def _mark_loop(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            t, n, note = item
            try:
                res = self._mark(t, n, note)
            except OSError as e:
                self.last_mark_error = (f"checkpoint {n}: this primary's clock is more than "
                                        f"10 s behind the primary master's ({e.strerror})")
                log.error("group %s: %s", self.group.name, self.last_mark_error)
                continue
            self.last_mark_error = None
            if getattr(res, "queued", True):
                self.marks += 1
            else:
                self.marks_dropped += 1

    # -- status -------------------------------------------------------------

    def status(self) -> dict:
        """This primary's view of its group."""
        with self._lock:
            last = self.last_checkpoint
            members = list(self.members)
        client = self._client
        connected = self.connected()
        off = self.skew.offset_ns()
        return {
            "group": self.group.name, "mode": self.group.mode,
            "role": "checkpoint master" if self.is_master else "member",
            "connected": connected,
            "last_error": None if connected else (client.last_error if client else None),
            "members": members,
            "last_checkpoint": {"n": last[0], "t": last[1]} if last else None,
            "clock_offset_seconds": 0.0 if self.is_master else
            (None if off is None else off / 1e9),
            "marks": self.marks, "marks_not_queued": self.marks_dropped,
            "mark_error": self.last_mark_error,
        }

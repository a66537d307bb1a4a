"""The primary's flow control: which waits the write path makes, and when.

The C core does the waiting (native/flow.c: a write waits for the peer's
acknowledgement under protocol B/C, for room under ``on-congestion =
block``, and paces the writes' bytes for max-lag). This module decides the policy:
:data:`POLICY` is the table of what is in force in each replication state,
and :class:`FlowControl` sets it on the core at every state change, feeds
it the peer's acknowledgements, runs the max-lag controller, and keeps the
pull-ahead hysteresis.

Hysteresis (a pair at the edge must not flap between Ahead and SyncSource,
LINBIT/drbd#46): a pull-ahead within ``FLAP_WINDOW_S`` of the last catch-up
ending holds the next catch-up back, for twice as long each time (from
``HOLD_MIN_S`` up to ``HOLD_MAX_S``); a pair that streams for
``FLAP_WINDOW_S`` without one starts again from nothing.

Threads and locks: the sender thread calls :meth:`FlowControl.apply` and
:meth:`catch_up_hold`; the controller's own thread ("duplex-flow",
supervised, only with max-lag or block) calls :meth:`tick` every
``TICK_S`` (the sender may sit in one C call for a whole span on a slow
link, too long to steer by); link reader threads call
:meth:`on_journaled` and :meth:`on_received`; nbdkit request threads (an
overflow) and the control thread (status) call :meth:`pulled_ahead` and
:meth:`snapshot`. ``FlowControl._lock`` guards every field; it is a leaf
(the core calls made under it take only the core's own internal locks).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from replicator.modes import Modes
from replicator.native.core import FlowPolicy
from replicator.primary import states as st

log = logging.getLogger("duplex.flow")

FLAP_WINDOW_S = 10.0
HOLD_MIN_S = 0.25
HOLD_MAX_S = 8.0

# max-lag: the controller's pace (bytes/s) never goes below MIN_RATE
# (writers are slowed, never stopped), grows by GROW a tick while the lag
# is low, and is dropped altogether once it is UNLIMITED times the drain.
MIN_RATE = 1 << 20
GROW = 1.25
UNLIMITED = 4.0
TICK_S = 0.01  # the controller's thread looks this often
THREAD_NAME = "duplex-flow"

#: the replication word -> the phase the flow policy depends on
PHASE_OF: dict[str, str] = {
    st.ESTABLISHED: "streaming",  # every write goes to the peer in order
    st.OFF: "away",               # no session; the ring still holds what the peer lacks
    st.AHEAD: "behind",           # the bitmap holds it: a catch-up will carry it
    st.SYNC_SOURCE: "behind",
    st.SPLIT_BRAIN: "behind",
}


def policy(modes: Modes, replication: str) -> tuple[FlowPolicy, str | None]:
    """The core's policy while the pair's replication state is *replication*,
    and why the protocol is not in force then (None: it is, or it is A).
    Only a pair that streams can keep B's and C's promise: during a
    catch-up new writes go into the next increment."""
    phase = PHASE_OF[replication]
    waits = modes.waits_for is not None
    if phase == "streaming":
        return FlowPolicy(wait_peer=waits, block=modes.on_congestion == "block",
                          fill=modes.congestion_fill,
                          block_timeout_s=modes.congestion_timeout_s), None
    if phase == "away" and waits and modes.on_disconnect == "suspend":
        # Writers wait for the peer's return, however long: nothing is
        # dropped, so the ring keeps what the peer will need.
        return FlowPolicy(wait_peer=True, block=True, fill=modes.congestion_fill,
                          block_timeout_s=None), "suspended: the peer is away"
    why = "degraded: the peer is away" if phase == "away" else "degraded: catching up"
    return FlowPolicy(fill=modes.congestion_fill), why if waits else None


def next_rate(rate: int, lag_s: float | None, max_lag_s: float, drain: float) -> int:
    """One step of the max-lag controller (every TICK_S): the pace the
    writes' bytes may go at (0: no limit), from the lag and the rate the
    peer drains the queue at (bytes/s). Over half the bound the pace drops
    below the drain (to 80%, or 50% over the bound), so the queue shrinks;
    under a quarter it grows back, and is lifted once well above the drain.
    None lag: nothing queued."""
    if lag_s is not None and lag_s > max_lag_s / 2:
        target = int(drain * (0.5 if lag_s > max_lag_s else 0.8))
        return max(MIN_RATE, min(target, rate) if rate else target)
    if rate and (lag_s is None or lag_s < max_lag_s / 4):
        rate = int(rate * GROW)
        return 0 if drain > 0 and rate > UNLIMITED * drain else rate
    return rate


def predicted_lag(queued: int, drain_rate: float) -> float | None:
    """How old the newest queued write will be when it is applied: the
    bytes queued for the peer over the rate the peer takes them (the age of
    the oldest one only shows a burst once it is already late)."""
    if queued <= 0:
        return None
    return queued / drain_rate if drain_rate > 0 else float("inf")


class FlowControl:
    """Sets the core's flow policy from the resource's modes and the
    pair's replication state (see the module docstring)."""

    def __init__(self, core, modes: Modes, name: str,
                 clock: Callable[[], float] = time.monotonic):
        self.core = core
        self.modes = modes
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._replication: str | None = None
        self._policy = FlowPolicy()
        self._why: str | None = None
        self._pace = 0  # max-lag: bytes/s the writes may go at (0: no limit)
        self._stopped = False
        self._pulled = False          # Ahead because the ring passed the fill
        self._pulls = 0               # pull-aheads since up
        self._flaps = 0               # pull-aheads in a row, each soon after a catch-up
        self._caught_up_at: float | None = None
        self._hold_until = 0.0
        self._timeouts_seen = 0
        # The controller thread's: the peer's drain rate (bytes/s, EWMA).
        self._rate = 0.0
        self._last: tuple[float, int, int] | None = None  # (t, bytes written, ring bytes)

    # -- policy -----------------------------------------------------------

    def apply(self, replication: str) -> None:
        """The replication state is now *replication*: set its policy."""
        with self._lock:
            if self._stopped or replication == self._replication:
                return
            self._replication = replication
            pol, why = policy(self.modes, replication)
            pol = pol._replace(rate_bps=self._pace if replication == st.ESTABLISHED else 0)
            if why != self._why:
                if why:
                    log.warning("%s: protocol %s %s: %s", self.name, self.modes.protocol, why,
                                "writes reply without waiting for the peer"
                                if pol.wait_peer is False else "writers wait for it")
                elif self._why:
                    log.info("%s: protocol %s in force again", self.name, self.modes.protocol)
            self._policy, self._why = pol, why
            self.core.set_flow(pol)

    def release(self) -> None:
        """Stopping: no write waits for anything any more."""
        with self._lock:
            self._stopped = True
            self._policy = FlowPolicy()
            self.core.set_flow(self._policy)

    # -- acknowledgements (reader threads) --------------------------------

    def on_journaled(self, seq: int) -> None:
        """The peer journaled through *seq* (counts for B too: journaled
        implies received)."""
        if self.modes.waits_for is not None:
            self.core.set_durable(seq)

    def on_received(self, seq: int) -> None:
        """The peer received through *seq* (RECEIVED, sent under B)."""
        if self.modes.waits_for == "received":
            self.core.set_durable(seq)

    # -- congestion -------------------------------------------------------

    def pulled_ahead(self, replication: str) -> None:
        """The ring overflowed (or passed the fill) while *replication*:
        a congestion pull-ahead only when the pair was streaming."""
        if replication != st.ESTABLISHED:
            return
        with self._lock:
            if self._pulled:
                return
            self._pulled = True
            self._pulls += 1
            now = self._clock()
            recent = (self._caught_up_at is not None
                      and now - self._caught_up_at < FLAP_WINDOW_S)
            self._flaps = self._flaps + 1 if recent else 0
            hold = 0.0 if not self._flaps else min(HOLD_MAX_S,
                                                    HOLD_MIN_S * 2 ** (self._flaps - 1))
            self._hold_until = now + hold
        if hold:
            log.warning("%s: pulled ahead again %.1f s after catching up: the next catch-up "
                        "waits %.2f s (hysteresis)", self.name, now - self._caught_up_at, hold)

    def caught_up(self) -> None:
        """A catch-up ended: streaming again."""
        with self._lock:
            self._pulled = False
            self._caught_up_at = self._clock()

    def catch_up_hold(self) -> float:
        """Seconds the next catch-up is still held back (0: go)."""
        with self._lock:
            return max(0.0, self._hold_until - self._clock())

    # -- max-lag (the controller's thread) --------------------------------

    def start(self, supervisor, lag_s: Callable[[], float | None],
              stopping: threading.Event) -> None:
        """Run :meth:`tick` every TICK_S in a supervised thread until
        *stopping*, when there is something to steer (max-lag, block)."""
        if self.modes.max_lag_s is None and self.modes.on_congestion != "block":
            return

        def loop() -> None:
            while not stopping.wait(TICK_S):
                self.tick(lag_s)
        supervisor.spawn(THREAD_NAME, loop, restart=True, backoff=(0.1, 5.0))

    def tick(self, lag_s: Callable[[], float | None]) -> None:
        """Every look of the sender: run the max-lag controller (while
        streaming), and say once when blocked writers gave up waiting."""
        stats = self.core.flow_stats()
        if stats["room_timeouts"] > self._timeouts_seen:
            self._timeouts_seen = stats["room_timeouts"]
            log.warning("%s: writes waited congestion-timeout (%g s) for room in the send "
                        "ring: pulling ahead", self.name, self.modes.congestion_timeout_s)
        with self._lock:
            if self._caught_up_at is not None and not self._pulled \
                    and self._clock() - self._caught_up_at > FLAP_WINDOW_S:
                self._flaps = 0
            if self.modes.max_lag_s is None or self._replication != st.ESTABLISHED \
                    or self._stopped:
                return
        pace = next_rate(self._pace, self._lag(lag_s), self.modes.max_lag_s, self._rate)
        with self._lock:
            if pace != self._pace and not self._stopped \
                    and self._replication == st.ESTABLISHED:
                self._pace = pace
                self._policy = self._policy._replace(rate_bps=pace)
                self.core.set_flow(self._policy)

    def _lag(self, lag_s: Callable[[], float | None]) -> float | None:
        """The larger of the oldest unapplied write's age and the lag the
        queue predicts at the peer's measured drain rate."""
        now = self._clock()
        written, queued = self.core.stats["bytes_written"], self.core.ring_stats.get("bytes", 0)
        if self._last is not None and now > self._last[0]:
            t0, w0, q0 = self._last
            drained = max(0, (written - w0) - (queued - q0))
            # What the peer can take, not what it was given: only a tick
            # that began with more queued than it drained kept the link busy
            # throughout (a paced writer must not see its own pace as the
            # link's, or the pace could never grow).
            if q0 > drained and drained > 0:
                rate = drained / (now - t0)
                self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        self._last = (now, written, queued)
        seen = lag_s()
        ahead = predicted_lag(queued, self._rate) if self._rate or queued else None
        if ahead is not None and self._rate == 0 and seen is not None and seen < self.modes.max_lag_s:
            ahead = None  # no rate measured yet: trust what is seen
        lags = [x for x in (seen, ahead) if x is not None]
        return max(lags) if lags else None

    # -- status -----------------------------------------------------------

    def snapshot(self) -> dict:
        """protocol, protocol_effective, protocol_note, congestion (none,
        blocked, pulled-ahead) and the counters behind them."""
        stats = self.core.flow_stats()
        with self._lock:
            effective = self.modes.protocol if self._policy.wait_peer else "A"
            if stats["room_waiting"]:
                congestion = "blocked"
            elif self._pulled:
                congestion = "pulled-ahead"
            else:
                congestion = "none"
            return {
                "protocol": self.modes.protocol,
                "protocol_effective": effective,
                "protocol_note": self._why,
                "on_congestion": self.modes.on_congestion,
                "congestion": congestion,
                "congestion_blocked_seconds": round(stats["room_wait_s"], 3),
                "flow": {
                    "peer_waits": stats["peer_waits"],
                    "peer_wait_seconds": round(stats["peer_wait_s"], 3),
                    "waiting_for_peer": stats["peer_waiting"],
                    "blocked_writes": stats["room_waits"],
                    "blocked_now": stats["room_waiting"],
                    "block_timeouts": stats["room_timeouts"],
                    "pull_aheads": self._pulls,
                    "catch_up_hold_seconds": round(max(0.0, self._hold_until - self._clock()), 3),
                    "max_lag_seconds": self.modes.max_lag_s,
                    "max_lag_rate_bytes": self._pace,
                    "drain_rate_bytes": int(self._rate),
                    "delayed_writes": stats["delays"],
                },
            }

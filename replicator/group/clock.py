"""Clock offset between a primary and the primary master (DESIGN §13).

Both group modes assume the primaries' clocks agree far better than the
time between dependent writes (seed 000 §2.3). Each member primary pings
the master over the group channel; a ping/pong gives NTP's estimate,
offset = t1 - (t0 + t3) / 2 with round trip t3 - t0, and the estimate with
the smallest round trip among the last few is the one trusted (its error is
at most half that round trip). The offset travels in every MARK's note, so
the rendezvous master refuses to release while a member's clock is off by
more than ``max-clock-skew``.
"""
from __future__ import annotations

import threading
from collections import deque

WINDOW = 8


class SkewEstimator:
    """The offset of our clock to the master's, from ping samples.

    Threads and locks: ``_lock`` guards ``_samples``; the pinger adds, the
    marker reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: deque[tuple[int, int]] = deque(maxlen=WINDOW)  # (rtt, offset)

    def sample(self, t0: int, t1: int, t3: int) -> None:
        """A pong: we sent at t0 (our clock), the master stamped t1 (its
        clock), we received at t3 (ours)."""
        if t3 < t0:
            return
        with self._lock:
            self._samples.append((t3 - t0, t1 - (t0 + t3) // 2))

    def offset_ns(self) -> int | None:
        """The master's clock minus ours, or None before any sample."""
        with self._lock:
            if not self._samples:
                return None
            return min(self._samples)[1]

    def rtt_ns(self) -> int | None:
        with self._lock:
            return min(self._samples)[0] if self._samples else None

    def skew_us(self) -> int | None:
        """|offset| in microseconds (rounded up), or None."""
        off = self.offset_ns()
        return None if off is None else (abs(off) + 999) // 1000

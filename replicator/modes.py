"""Replication modes: what a write waits for, and how that follows the link.

The settings of a resource (DESIGN §3, "Modes"), read by both sides: the
primary's flow control (:mod:`replicator.primary.flowctl`, which holds the
table of what is in force in which replication state) sets the C core's
policy from them, and the secondary reads :data:`WAITS_FOR` to know which
acknowledgement its primary waits for.

- ``protocol`` (DRBD's meaning): ``A`` a write returns when it is written
  locally and sequenced; ``B`` when the secondary has also received it;
  ``C`` when the secondary has journaled it (durable there).
- ``on-disconnect`` (B and C): ``degrade`` drops to A while the peer is
  away (and says so); ``suspend`` holds writers until the peer is back.
- ``on-congestion``: ``pull-ahead`` goes Ahead when the ring would pass
  ``congestion-fill``; ``block`` makes the write wait for room instead, for
  at most ``congestion-timeout``, then pulls ahead and says so.
- ``max-lag``: writers are slowed (never stopped) so the oldest unapplied
  write stays younger than the bound.
"""
from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("A", "B", "C")
ON_DISCONNECT = ("degrade", "suspend")
ON_CONGESTION = ("pull-ahead", "block")

#: protocol -> the secondary's acknowledgement a write waits for (None: none)
WAITS_FOR: dict[str, str | None] = {"A": None, "B": "received", "C": "journaled"}


@dataclass(frozen=True)
class Modes:
    """A resource's replication mode (its config keys, checked)."""

    protocol: str = "A"
    on_disconnect: str = "degrade"
    on_congestion: str = "pull-ahead"
    congestion_fill: int = 0          # bytes; 0 = ring-size
    congestion_timeout_s: float = 10.0
    max_lag_s: float | None = None

    @property
    def waits_for(self) -> str | None:
        """The acknowledgement a write waits for while streaming."""
        return WAITS_FOR[self.protocol]


def default_on_congestion(protocol: str) -> str:
    """B and C block by default (a write that waits for the peer anyway
    must not make the pair go Ahead and lose the promise); A pulls ahead,
    as before these modes existed."""
    return "pull-ahead" if protocol == "A" else "block"

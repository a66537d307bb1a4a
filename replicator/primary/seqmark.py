"""The persisted sequence high-water mark.

A seq is never reused (DESIGN §3). Writing the metadata on every write would
cost a sync per write, so the primary *reserves* a block of seqs ahead: the
metadata holds a mark at least as high as any seq handed out. A clean stop
records the exact last seq, so the stream continues without a gap; after a
crash the next run starts above the reserved mark (the ring was lost with
the crash anyway, so the gap costs nothing the catch-up does not cover).
"""
from __future__ import annotations

from replicator.metadata import Metadata

RESERVE = 1 << 20


class SeqMark:
    """Keeps ``metadata.seq_hwm`` ahead of the core's next seq. The field is
    the metadata's: changed and saved under its lock (``md.update()``)."""

    def __init__(self, md: Metadata, reserve: int = RESERVE):
        self.md = md
        self.reserve = reserve

    def first_seq(self) -> int:
        """Where this run starts; reserves the first block durably."""
        with self.md.update():
            first = self.md.seq_hwm + 1
            self.md.seq_hwm = first - 1 + self.reserve
            self.md.seq_reserved = True
            return first

    def advance(self, next_seq: int) -> None:
        """Extend the reservation when half of it is used up."""
        if next_seq + self.reserve // 2 > self.md.seq_hwm:
            with self.md.update():
                self.md.seq_hwm = max(self.md.seq_hwm, next_seq + self.reserve)

    def close(self, next_seq: int) -> None:
        """Clean stop: the exact last seq, so the next run has no gap."""
        with self.md.update():
            self.md.seq_hwm = next_seq - 1
            self.md.seq_reserved = False

"""The logical address space of a resource's volumes (DESIGN §8). Pure: no I/O.

A resource may hold several volumes (a database's data and its log). They
share one sequencer, and also one OOS bitmap, one CR bitmap, one activity
log, one set of track locks: everything that works on tracks works on one
LOGICAL address space in which the volumes are laid end to end, in
configuration order:

    b_0 = 0,  b_{i+1} = round_up(b_i + size_i, track_size)

so volume i holds logical bytes [b_i, b_i + size_i). Bases are
track-aligned, so a track never spans two volumes; a volume's last track
may be partial, and the rest of that track (the alignment gap, less than
one track) belongs to no volume. Ahead, catch-up increments (one freeze
fences every volume at one instant), verify and crash recovery then span
every volume with no change to their logic.

Two kinds of offsets follow, and each place uses one:
- records in the send ring, the wire and the journal carry (volume index,
  volume-relative offset);
- catch-up and verify pieces (INCR_DATA, collision copies, track reads)
  carry LOGICAL offsets. Both sides map logical <-> (volume, offset) with
  this one class, so they agree by construction.

A single-volume resource is ``Layout.single(size, track_size)``: base 0,
logical offsets equal device offsets, exactly today's behaviour.
"""
from __future__ import annotations

import bisect
from typing import Sequence

__all__ = ["Layout"]


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


class Layout:
    """Volumes (name, size) in order, laid end to end at track-aligned bases."""

    __slots__ = ("names", "sizes", "bases", "track_size", "logical_size", "_index")

    def __init__(self, volumes: Sequence[tuple[str, int]], track_size: int):
        """*volumes*: (name, size in bytes) in configuration order, at least
        one, names unique, sizes positive. *track_size*: a power of two."""
        if track_size <= 0 or track_size & (track_size - 1):
            raise ValueError(f"track size {track_size} is not a positive power of two")
        if not volumes:
            raise ValueError("a layout needs at least one volume")
        names: list[str] = []
        sizes: list[int] = []
        bases: list[int] = []
        base = 0
        for name, size in volumes:
            if name in names:
                raise ValueError(f"volume {name!r} is listed twice")
            if size <= 0:
                raise ValueError(f"volume {name!r}: size {size} must be positive")
            names.append(name)
            sizes.append(size)
            bases.append(base)
            base = _round_up(base + size, track_size)
        self.names: tuple[str, ...] = tuple(names)
        self.sizes: tuple[int, ...] = tuple(sizes)
        self.bases: tuple[int, ...] = tuple(bases)
        self.track_size = track_size
        # The end of the last volume: no padding after it (its last track
        # may be partial, as a single device's is today).
        self.logical_size = bases[-1] + sizes[-1]
        self._index = {n: i for i, n in enumerate(names)}

    @classmethod
    def single(cls, size: int, track_size: int, name: str = "") -> "Layout":
        """Today's one-volume resource: volume 0 at base 0."""
        return cls([(name, size)], track_size)

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layout):
            return NotImplemented
        return (self.names, self.sizes, self.track_size) == \
               (other.names, other.sizes, other.track_size)

    def __hash__(self) -> int:
        return hash((self.names, self.sizes, self.track_size))

    def __repr__(self) -> str:
        vols = ", ".join(f"{n or '#' + str(i)}@{b}+{s}" for i, (n, b, s)
                         in enumerate(zip(self.names, self.bases, self.sizes)))
        return f"<Layout track={self.track_size} [{vols}]>"

    @property
    def ntracks(self) -> int:
        """Tracks covering the logical space (the OOS bitmap's size)."""
        return (self.logical_size + self.track_size - 1) // self.track_size

    def volume_index(self, name: str) -> int:
        """The index of the volume called *name* (ValueError naming the known ones)."""
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(f"no volume {name!r}; the volumes are "
                             f"{', '.join(repr(n) for n in self.names)}") from None

    def _check_volume(self, vol: int) -> None:
        if not 0 <= vol < len(self.names):
            raise ValueError(f"volume index {vol} out of range: {len(self.names)} volume(s)")

    def to_logical(self, vol: int, off: int) -> int:
        """The logical offset of byte *off* of volume *vol* (off == size is
        allowed: the end of the volume)."""
        self._check_volume(vol)
        if not 0 <= off <= self.sizes[vol]:
            raise ValueError(f"offset {off} is outside volume {self._label(vol)} "
                             f"({self.sizes[vol]} bytes)")
        return self.bases[vol] + off

    def locate(self, logical_off: int) -> tuple[int, int]:
        """(volume, volume-relative offset) of a logical byte. ValueError for
        a byte in an alignment gap or at/after the logical end."""
        if logical_off < 0 or logical_off >= self.logical_size:
            raise ValueError(f"logical offset {logical_off} is outside the volumes "
                             f"({self.logical_size} logical bytes)")
        vol = bisect.bisect_right(self.bases, logical_off) - 1
        off = logical_off - self.bases[vol]
        if off >= self.sizes[vol]:
            raise ValueError(f"logical offset {logical_off} is in the alignment gap after "
                             f"volume {self._label(vol)} (it ends at "
                             f"{self.bases[vol] + self.sizes[vol]})")
        return vol, off

    def split(self, logical_off: int, length: int) -> list[tuple[int, int, int]]:
        """The logical range [logical_off, +length) as [(volume, offset, length)]
        pieces, in order. Every byte must belong to a volume: a range that
        touches an alignment gap or runs past the end is a ValueError."""
        if length <= 0:
            raise ValueError(f"range length {length} must be positive")
        end = logical_off + length
        if logical_off < 0 or end > self.logical_size:
            raise ValueError(f"logical range {logical_off}+{length} is outside the volumes "
                             f"({self.logical_size} logical bytes)")
        out: list[tuple[int, int, int]] = []
        pos = logical_off
        while pos < end:
            vol, off = self.locate(pos)
            n = min(end - pos, self.sizes[vol] - off)
            out.append((vol, off, n))
            pos += n
            if pos < end and vol + 1 < len(self.bases) and pos < self.bases[vol + 1]:
                raise ValueError(f"logical range {logical_off}+{length} crosses the alignment "
                                 f"gap [{pos}, {self.bases[vol + 1]}) after volume "
                                 f"{self._label(vol)}")
        return out

    def clip(self, logical_off: int, length: int) -> tuple[int, int, int]:
        """(volume, offset, length) of the part of a logical range that lies
        in the volume holding its first byte: what a track read returns
        (the last track of a volume is cut at the volume's end)."""
        vol, off = self.locate(logical_off)
        return vol, off, min(length, self.sizes[vol] - off)

    def track_range(self, vol: int) -> range:
        """The logical tracks of volume *vol*."""
        self._check_volume(vol)
        ts = self.track_size
        return range(self.bases[vol] // ts, (self.bases[vol] + self.sizes[vol] + ts - 1) // ts)

    def _label(self, vol: int) -> str:
        return repr(self.names[vol]) if self.names[vol] else f"#{vol}"

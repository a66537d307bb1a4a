"""Track helpers both sides use: the zero check, the digest two nodes
compare to decide that a track is equal without sending it, and runs and
byte ranges of track numbers (catch-up, verify, the secondary's answers)."""
from __future__ import annotations

import hashlib

_MAX_ZEROS = 4 << 20
_zeros: dict[int, bytes] = {}       # n -> bytes(n): tracks and pieces come in few sizes
_zero_digests: dict[int, int] = {}


def is_zero(data) -> bool:
    """Is *data* (bytes or bytearray) all zero bytes? One memcmp against a
    cached zero buffer of its length: no copy, no Python loop."""
    n = len(data)
    if n > _MAX_ZEROS:  # rare (huge tracks): in slices
        mv = memoryview(data)
        return all(is_zero(bytes(mv[i:i + _MAX_ZEROS])) for i in range(0, n, _MAX_ZEROS))
    zeros = _zeros.get(n)
    if zeros is None:
        if len(_zeros) >= 64:
            _zeros.clear()  # odd sizes (a device's last track) must not pile up
        zeros = _zeros[n] = bytes(n)
    return data == zeros


def track_digest(data) -> int:
    """The 64-bit digest both sides compare for a track (BLAKE2b: a CRC is
    too weak to decide that two tracks are equal without sending them).
    All-zero tracks (common: new and sparse devices) skip the hashing."""
    return zero_digest(len(data)) if is_zero(data) else _blake(data)


def zero_digest(n: int) -> int:
    """track_digest of *n* zero bytes (cached)."""
    d = _zero_digests.get(n)
    if d is None:
        d = _zero_digests[n] = _blake(bytes(n))
    return d


def _blake(data) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def track_ranges(tracks: list[int], track_size: int, size: int) -> list[dict]:
    """Runs of tracks as byte ranges ``{"offset", "length"}``."""
    out: list[dict] = []
    for t in sorted(tracks):
        off = t * track_size
        length = min(track_size, size - off)
        if out and out[-1]["offset"] + out[-1]["length"] == off:
            out[-1]["length"] += length
        else:
            out.append({"offset": off, "length": length})
    return out


def track_runs(tracks: list[int]) -> list[tuple[int, int]]:
    """Consecutive tracks as (first, count) runs."""
    out: list[list[int]] = []
    for t in tracks:
        if out and out[-1][0] + out[-1][1] == t:
            out[-1][1] += 1
        else:
            out.append([t, 1])
    return [(a, b) for a, b in out]

"""Child of test_native_crash: opens a resource's bitmap and activity log,
then writes, trims and zeroes random ranges through Core until it is
killed. Like real workloads it has locality: it stays in a small region
(fewer extents than the activity log has slots) for a while, then moves on,
so the bitmap file really lags behind memory. Nothing is ever released (nothing reaches a peer), so every changed
track must be recoverable from the bitmap file plus the activity log.

usage: crash_writer.py DIR SEED
DIR holds device.img, oos.bm, al and uuid (hex).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core

TRACK = 4096
REGION = 128 << 10  # two 64 KiB extents


def main(d: Path, seed: int) -> None:
    uuid = bytes.fromhex((d / "uuid").read_text())
    size = (d / "device.img").stat().st_size
    oos = Bitmap.open(str(d / "oos.bm"), uuid, TRACK)
    al = ActivityLog.open(str(d / "al"), uuid)
    core = Core(str(d / "device.img"), size, oos, al, 1 << 20, 1)
    rng = random.Random(seed)
    print("ready", flush=True)
    while True:
        base = rng.randrange(0, size - REGION)
        for _ in range(rng.randint(1, 60)):
            one(core, rng, base, size)


def one(core: Core, rng: random.Random, base: int, size: int) -> None:
    length = rng.randint(1, 3 * TRACK)
    if rng.random() < 0.1:
        off = rng.randrange(0, size - length)  # a stray write anywhere
    else:
        off = base + rng.randrange(0, REGION - length)
    roll = rng.random()
    if roll < 0.05:
        core.trim(off, length)
    elif roll < 0.10:
        core.zero(off, length)
    else:
        core.write(rng.randbytes(length), off, fua=roll > 0.99)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

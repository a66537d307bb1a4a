"""``scripts/bench native``: what the C core's write call costs.

For 4 KiB and 1 MiB writes to a file on tmpfs (/dev/shm), measured in this
run, one after the other, from one Python thread:

  os.pwrite            the floor: one syscall from Python
  Core.write           the Duplex hot path: track locks, activity log (all
                       extents already active), OOS bits, pwrite, sequencer,
                       copy + CRC32C into the send ring; GIL released
  Core.write, Ahead    the same with the ring dropped (no copy, no CRC)

The ring is drained and released between batches (untimed), as a shipper
that keeps up would. Each figure is the median of several rounds that
alternate between the calls, so background load hits all of them alike.

Run it through ``scripts/bench native [--seconds S] [--rounds N] [--dir D]``
or directly: ``.venv/bin/python scripts/bench_native.py``. Progress goes to
stderr; ``run`` returns the table.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_table import Table, fmt_count, fmt_ns, ratio  # noqa: E402

DEVICE_SIZE = 256 << 20
TRACK = 64 << 10
EXTENT = 4 << 20
RING = 64 << 20


def _progress(msg: str) -> None:
    print(f"bench native: {msg}", file=sys.stderr, flush=True)


def _measure(call: Callable[[int], None], offsets: list[int], seconds: float,
             between: Callable[[], None], batch_len: int) -> float:
    """Run call(offset) in batches for about *seconds*; ns per call, timing
    only the calls (``between`` runs untimed after each batch)."""
    spent = 0
    calls = 0
    deadline = time.monotonic() + seconds
    i = 0
    n = len(offsets)
    while time.monotonic() < deadline or calls == 0:
        batch = offsets[i:i + batch_len] if i + batch_len <= n else offsets[:batch_len]
        i = (i + batch_len) % n
        t0 = time.perf_counter_ns()
        for off in batch:
            call(off)
        spent += time.perf_counter_ns() - t0
        calls += len(batch)
        between()
    return spent / calls


def _bench_size(workdir: Path, size: int, seconds: float, rounds: int) -> dict[str, float]:
    """Median ns per call of each variant for writes of *size* bytes."""
    from replicator.native.actlog import ActivityLog
    from replicator.native.bitmap import Bitmap
    from replicator.native.core import Core

    dev = workdir / f"device-{size}"
    with open(dev, "wb") as f:
        f.truncate(DEVICE_SIZE)
    res = uuid.uuid4().bytes
    oos = Bitmap.create(str(workdir / f"oos-{size}"), res, TRACK, DEVICE_SIZE // TRACK)
    al = ActivityLog.create(str(workdir / f"al-{size}"), res, EXTENT, 1024)
    core = Core(str(dev), DEVICE_SIZE, oos, al, RING, 1)
    fd = os.open(dev, os.O_RDWR)
    data = os.urandom(size)
    rng = random.Random(size)
    offsets = [rng.randrange(0, DEVICE_SIZE // size) * size for _ in range(4096)]
    # A batch must fit the ring: the drain between batches keeps it from
    # overflowing, as a shipper that keeps up would.
    batch_len = max(1, min(256, RING // (4 * (size + 48))))

    def drain() -> None:
        while True:
            span = core.peek(1 << 30)
            if not span:
                break
            core.advance(len(span))
        core.release(core.next_seq - 1)

    def nothing() -> None:
        pass

    try:
        # Warm up: every extent active, every page of device and ring touched.
        for off in range(0, DEVICE_SIZE, max(size, EXTENT // 4)):
            core.write(data, off)
            drain()
        for off in range(0, DEVICE_SIZE, size):
            os.pwrite(fd, data, off)
        results: dict[str, list[float]] = {"pwrite": [], "core": [], "ahead": []}
        for r in range(rounds):
            _progress(f"{size // 1024} KiB writes, round {r + 1}/{rounds}")
            results["pwrite"].append(_measure(lambda off: os.pwrite(fd, data, off),
                                              offsets, seconds, nothing, batch_len))
            results["core"].append(_measure(lambda off: core.write(data, off),
                                            offsets, seconds, drain, batch_len))
            if core.dropped:
                raise RuntimeError("the ring overflowed while measuring Core.write")
            core.drop()
            results["ahead"].append(_measure(lambda off: core.write(data, off),
                                             offsets, seconds, nothing, batch_len))
            core.resume()
        return {k: statistics.median(v) for k, v in results.items()}
    finally:
        os.close(fd)
        core.close()
        oos.close()
        al.close()


def run(argv: list[str]) -> Table:
    """Measure and return the table (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="scripts/bench native", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="per call and round (default 0.5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per size (default 3)")
    ap.add_argument("--dir", default="/dev/shm", help="where the test file lives (default /dev/shm)")
    args = ap.parse_args(argv)

    from replicator.native.crc32c import crc32c_hw_available

    table = Table("native: Core.write vs os.pwrite (one thread, tmpfs)",
                  ["write size", "call", ("per call", ">"), ("calls/s", ">"),
                   ("vs os.pwrite", ">")])
    with tempfile.TemporaryDirectory(prefix="dpx-bench-", dir=args.dir) as d:
        for size in (4096, 1 << 20):
            m = _bench_size(Path(d), size, args.seconds, args.rounds)
            label = f"{size // 1024} KiB" if size < (1 << 20) else f"{size >> 20} MiB"
            table.add_section(f"{label} random writes, {DEVICE_SIZE >> 20} MiB file in {args.dir}")
            for key, name in (("pwrite", "os.pwrite"), ("core", "Core.write"),
                              ("ahead", "Core.write, ring dropped")):
                ns = m[key]
                table.add_row(label, name, fmt_ns(ns), fmt_count(1e9 / ns),
                              ratio(ns, m["pwrite"]))
    table.add_note("per call: median over rounds of wall time per call, Python call overhead included")
    table.add_note("vs os.pwrite: cost of the call relative to a plain os.pwrite of the same data")
    table.add_note(f"CRC32C path: {'SSE4.2' if crc32c_hw_available() else 'table'}; "
                   f"track {TRACK >> 10} KiB, extent {EXTENT >> 20} MiB, ring {RING >> 20} MiB")
    return table


def main(argv: list[str]) -> int:
    """Run standalone: print the table as scripts/bench would."""
    from bench_table import render_report
    print(render_report([run(argv)]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

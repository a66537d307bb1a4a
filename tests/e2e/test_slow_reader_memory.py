"""A peer that stops reading (SIGSTOP: its socket fills, nothing is acked)
must not make the primary's memory grow: the send ring is the bound
(ring-size), overflowing it makes the pair go Ahead, and the bitmap keeps
the writes. Measured as the nbdkit process's resident set (VmRSS) before
and after 12x the ring was written behind the stopped peer."""
from __future__ import annotations

import os
import signal

import nbd

RING = 4 << 20
WRITTEN = 48 << 20  # 12 rings


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_a_peer_that_stops_reading_does_not_grow_the_primarys_memory(make_lab):
    lab = make_lab(size=64 << 20, options={"ring-size": "4MiB", "ping-timeout": "30s",
                                           "ping-interval": "1s"})
    lab.create_md()
    sec = lab.start_secondary()
    lab.start_primary(history=False)
    nbdkit = int((lab.meta["alpha"] / "nbdkit.pid").read_text())
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    chunk = os.urandom(1 << 20)
    for i in range(8):  # warm up: every code path has run once
        h.pwrite(chunk, i << 20)
    lab.wait_drained()
    before = _rss(nbdkit)
    os.kill(sec.pid, signal.SIGSTOP)
    try:
        for i in range(WRITTEN >> 20):
            h.pwrite(chunk, (i % 64) << 20)
        st = lab.control("alpha")
        grown = _rss(nbdkit) - before
    finally:
        os.kill(sec.pid, signal.SIGCONT)
    # Ahead, or already catching up over the link that is still up (the
    # catch-up reads its increment in bounded pieces): never streaming.
    assert st["replication"] in ("Ahead", "SyncSource"), st["replication"]
    assert st["ring"]["bytes"] <= RING
    # The ring is allocated (and touched) at start: what is left to grow is
    # per-request garbage, far below one ring, let alone the 48 MiB written.
    assert grown < RING, f"nbdkit grew {grown >> 20} MiB behind a stopped peer"
    h.shutdown()
    lab.wait_drained(timeout=120)
    assert lab.digest("beta") == lab.digest("alpha")

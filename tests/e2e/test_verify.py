"""Online verify (issue 4): a corruption injected into the secondary's
image is found while replication runs, and --fix repairs it."""
from __future__ import annotations

import json
import os
import random
import threading
import time

import nbd

from fixtures.duplex_lab import RESOURCE
from fixtures.workload import Workload

TRACK = 64 << 10


def _write_upper_half(lab, stop: threading.Event) -> None:
    rnd = random.Random(7)
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        while not stop.is_set():
            off = rnd.randrange(lab.size // 2 // 4096, lab.size // 4096 - 16) * 4096
            h.pwrite(os.urandom(4096 * rnd.randint(1, 16)), off)
            time.sleep(0.002)
    finally:
        h.shutdown()


def test_verify_finds_injected_corruption_and_fix_repairs_it(make_lab):
    lab = make_lab(size=32 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=200, seed=41).run()
    lab.wait_drained()
    r = lab.duplex("alpha", "verify", RESOURCE, "--json", check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["differing"] == []
    # Corrupt two places of the secondary's image behind its back.
    bad = [(5 * TRACK + 100, b"\xde\xad" * 50), (20 * TRACK, b"\xbe\xef" * 2000)]
    with open(lab.image["beta"], "r+b") as f:
        for off, data in bad:
            f.seek(off)
            f.write(data)
    # Verify while writes go on elsewhere on the device (the upper half).
    stop = threading.Event()
    t = threading.Thread(target=_write_upper_half, args=(lab, stop))
    t.start()
    try:
        r = lab.duplex("alpha", "verify", RESOURCE, "--json", check=False, timeout=120)
    finally:
        stop.set()
        t.join()
    assert r.returncode == 1, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    found = {rg["offset"] // TRACK for rg in doc["differing"]}
    assert {5, 20} <= found, doc
    assert doc["total_bytes"] == lab.size and doc["done_bytes"] == lab.size
    human = lab.duplex("alpha", "verify", RESOURCE, "--fix", check=False, timeout=120)
    assert human.returncode == 1 and f"offset {5 * TRACK}" in human.stdout, human.stdout
    assert "marked out of sync" in human.stdout
    lab.wait(lambda: lab.control("alpha")["out_of_sync_bytes"] == 0
             and lab.control("alpha")["replication"] == "Established", "the fix to be resent")
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")
    r = lab.duplex("alpha", "verify", RESOURCE, check=False, timeout=120)
    assert r.returncode == 0 and "same data" in r.stdout, r.stdout + r.stderr

"""Replication connections reset again and again while writes flow: every
client write still succeeds (a reconnect must never fail the write path),
and once the storm ends the secondary converges to the primary's bytes."""
from __future__ import annotations

import subprocess
import threading
import time

from fixtures.workload import Workload

RESETS = 25


def _reset_replication(netns_pair, lab) -> int:
    """Kill the primary's replication TCP connections (ss -K); returns how many."""
    r = subprocess.run(["ip", "netns", "exec", netns_pair.ns_a, "ss", "-K", "-t", "-n",
                        "dst", netns_pair.addr_b, "dport", "=", f":{lab.port}"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return max(0, len(r.stdout.strip().splitlines()) - 1)


def test_client_writes_never_fail_while_the_link_is_reset_25_times(make_lab, netns_pair):
    lab = make_lab()
    lab.create_md()
    lab.start_secondary()
    prim = lab.start_primary()
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "first connection")
    work = Workload(lab.uri, lab.size, threads=4, ops_per_thread=600, pace=0.001)
    killed = []
    done = threading.Event()

    def storm() -> None:
        while len(killed) < RESETS and not done.is_set():
            n = _reset_replication(netns_pair, lab)
            if n:
                killed.append(n)
            time.sleep(0.1)

    t = threading.Thread(target=storm)
    t.start()
    try:
        work.run()  # raises with every failed request
    finally:
        done.set()
        t.join()
    assert len(killed) >= 5, f"the storm reset only {len(killed)} connections"
    assert prim.is_running()
    log = prim.log_text()
    assert "Traceback" not in log and "tmp." not in log, log[-3000:]
    lab.wait_drained(timeout=120)
    assert lab.digest("beta") == lab.digest("alpha")

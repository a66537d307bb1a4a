"""The primary tells the truth about its peer (issue 10, items 1 and 7): a
secondary killed during a resync shows as not connected within seconds,
with the error and the owed resync side by side; a secret file that goes
bad is named in status, and fixing it brings the pair back without a
restart; ``up`` refuses a bad secret before it says ready."""
from __future__ import annotations

import os
import signal
import subprocess
import time

from fixtures.workload import Workload

RESOURCE = "r0"


def _reset_replication(netns_pair, lab) -> None:
    """Kill the primary's replication TCP connections (ss -K)."""
    subprocess.run(["ip", "netns", "exec", netns_pair.ns_a, "ss", "-K", "-t", "-n",
                    "dst", netns_pair.addr_b, "dport", "=", f":{lab.port}"],
                   capture_output=True, text=True, timeout=10, check=True)


def test_a_killed_secondary_is_not_connected_within_seconds_while_a_resync_is_owed(make_lab):
    # A slow initial sync (1 MiB/s over 6 MiB of data) keeps a resync owed.
    lab = make_lab(size=16 << 20, options={"resync-rate": "1MiB"})
    with open(lab.image["alpha"], "r+b") as f:
        f.write(os.urandom(6 << 20))
    lab.create_md(assume_clean=False)
    sec = lab.start_secondary()
    lab.start_primary(history=False)
    lab.wait(lambda: lab.control("alpha")["replication"] == "SyncSource", "the initial sync")
    sec.send_signal(signal.SIGKILL)
    sec.wait(10)
    t0 = time.monotonic()
    st = lab.wait(lambda: (s := lab.control("alpha"))["connection"] != "Connected" and s,
                  "the primary to see its peer gone", timeout=10)
    assert time.monotonic() - t0 < 8, "a dead peer took too long to show"
    st = lab.wait(lambda: (s := lab.control("alpha"))["last_error"] and s, "the error", timeout=5)
    # Neither layer masks the other: not connected, and a resync still owed.
    assert st["connection"] == "Connecting", st
    assert st["replication"] == "Ahead", st
    assert st["sync"] is None, f"progress of a sync that is not running: {st['sync']}"
    assert st["peer"]["disk"] == "Unknown", st["peer"]
    assert st["last_error"] in st["reason"] and "resync needed" in st["reason"], st["reason"]
    line = lab.duplex("alpha", "status", RESOURCE).stdout
    assert line.startswith("r0 role:Primary disk:UpToDate peer beta: Connecting Ahead "), line
    human = lab.duplex("alpha", "status", RESOURCE, "--verbose").stdout
    assert human.splitlines()[0].startswith("r0 on alpha: Primary, Connecting, Ahead"), human
    assert "0us" not in human
    check = lab.duplex("alpha", "status", RESOURCE, "--check", check=False)
    assert check.returncode == 1, check
    assert "not healthy" in check.stderr and "connection Connecting" in check.stderr, check.stderr


def test_a_bad_secret_is_named_and_fixing_the_file_reconnects_without_a_restart(make_lab,
                                                                              netns_pair):
    lab = make_lab()
    lab.create_md()
    lab.start_secondary()
    prim = lab.start_primary(history=False)
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "the pair to connect")
    assert lab.duplex("alpha", "status", RESOURCE, "--check", check=False).returncode == 0
    lab.secret.chmod(0o644)
    _reset_replication(netns_pair, lab)
    st = lab.wait(lambda: (s := lab.control("alpha"))["connection"] == "StandAlone"
                  and str(lab.secret) in (s["last_error"] or "") and s,
                  "the primary to name the secret file", timeout=15)
    assert f"chmod 600 {lab.secret}" in st["reason"], st["reason"]
    # The application is never held up: writes go on, only marked.
    Workload(lab.uri, lab.size, threads=1, ops_per_thread=30, seed=3).run()
    hidden = lab.secret.with_suffix(".away")
    lab.secret.chmod(0o600)
    lab.secret.rename(hidden)
    lab.wait(lambda: "does not exist" in (lab.control("alpha")["last_error"] or ""),
             "a missing secret file to be named", timeout=10)
    hidden.rename(lab.secret)  # fixed: no restart
    lab.wait(lambda: (s := lab.control("alpha"))["replication"] == "Established"
             and s["connection"] == "Connected", "the pair to reconnect", timeout=15)
    lab.wait_drained(timeout=60)
    assert lab.digest("beta") == lab.digest("alpha")
    assert prim.is_running()
    assert "Traceback" not in prim.log_text()


def test_up_refuses_a_secret_file_open_to_others_before_it_is_ready(make_lab):
    lab = make_lab()
    lab.create_md()
    lab.secret.chmod(0o644)
    r = lab.duplex("alpha", "up", RESOURCE, check=False, timeout=30)
    assert r.returncode != 0, r
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors and str(lab.secret) in errors[-1] and "chmod 600" in errors[-1], r.stderr
    assert "ready" not in r.stderr and "Traceback" not in r.stderr, r.stderr

"""Handlers end to end: a pair in two namespaces, real nbdkit and TCP,
``[resource.r0.handlers]`` set. A link cut makes the primary run
fence-peer (a script that writes its environment to a file) and, past the
threshold, lag-exceeded; the catch-up makes the secondary run a
before-resync-target that hangs (killed at handler-timeout) and an
after-resync-target that fails. Both are logged with exit status and time,
and replication goes on: the pair ends Established with equal images."""
from __future__ import annotations

import json

from fixtures.duplex_lab import DUPLEX, RESOURCE
from fixtures.workload import Workload


def _env(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_handlers_run_with_the_state_and_a_failing_or_hanging_one_stops_nothing(
        make_lab, netns_pair, tmp_path):
    out = tmp_path / "handlers"
    out.mkdir()
    lab = make_lab(size=16 << 20, options={"ring-size": "1MiB", "ping-timeout": "2s",
                                           "ping-interval": "500ms"})
    dump = f"env | grep ^DUPLEX_ | sort > {out}/$DUPLEX_EVENT-$DUPLEX_NODE.env"
    handlers = {
        "fence-peer": dump,
        "lag-exceeded": dump,
        "lag-exceeded-threshold": "500ms",
        "before-resync-target": f"{dump}; exec sleep 60",     # hangs: killed at the timeout
        "after-resync-target": f"{dump}; echo boom; exit 3",  # fails
        "out-of-sync": dump,
        "handler-timeout": "1s",
    }
    lab.config.write_text(lab.config.read_text() + "\n[resource.r0.handlers]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in handlers.items()))
    lab.create_md()
    sec = lab.start_secondary()
    prim = lab.start_primary(history=False)
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=50, seed=1).run()
    lab.wait_drained()

    netns_pair.link_down()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=400, seed=2).run()  # > the ring
    lab.wait(lambda: (out / "fence-peer-alpha.env").exists(), "alpha's fence-peer handler",
             timeout=30, proc=prim)
    netns_pair.link_up()
    lab.wait(lambda: "handler after-resync-target: exit status 3" in sec.log_text(),
             "the failing after-resync-target to be logged", timeout=60, proc=sec)
    lab.wait(lambda: "handler before-resync-target: still running after handler-timeout 1 s: "
             "killed" in sec.log_text(), "the hanging handler to be killed", timeout=30, proc=sec)

    fence = _env(out / "fence-peer-alpha.env")
    assert fence["DUPLEX_RESOURCE"] == RESOURCE and fence["DUPLEX_EVENT"] == "fence-peer"
    assert (fence["DUPLEX_NODE"], fence["DUPLEX_PEER"], fence["DUPLEX_ROLE"]) == (
        "alpha", "beta", "Primary")
    assert fence["DUPLEX_CONNECTION"] != "Connected", fence
    assert fence["DUPLEX_EVENT_LINE"].startswith(
        "change connection name:r0 peer-node-id:beta connection:"), fence
    lag = _env(out / "lag-exceeded-alpha.env")
    assert float(lag["DUPLEX_LAG_SECONDS"]) > 0.5 and lag["DUPLEX_LAG_EXCEEDED"] == "yes", lag
    before = _env(out / "before-resync-target-beta.env")
    assert (before["DUPLEX_ROLE"], before["DUPLEX_PEER"], before["DUPLEX_REPLICATION"]) == (
        "Secondary", "alpha", "SyncTarget"), before
    assert "; output: boom" in sec.log_text()

    # Replication went on through all of it: more writes arrive, the images agree.
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=100, seed=3).run()
    st = lab.wait_drained(timeout=120)
    assert st["replication"] == "Established", st
    assert lab.digest("beta") == lab.digest("alpha")
    assert prim.is_running() and sec.is_running()

    # A corruption behind the secondary's back: verify finds it, out-of-sync runs.
    events = lab.procs.start([*DUPLEX, "--config", str(lab.config), "--node", "alpha", "events",
                              RESOURCE], name="events-alpha")
    lab.wait(lambda: "exists -" in events.log_text(), "alpha's event stream", proc=events)
    with open(lab.image["beta"], "r+b") as f:
        f.seek(5 * 65536 + 100)
        f.write(b"X" * 10)
    r = lab.duplex("alpha", "verify", RESOURCE, check=False, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    lab.wait(lambda: (out / "out-of-sync-alpha.env").exists(), "the out-of-sync handler",
             timeout=30, proc=prim)
    oos = _env(out / "out-of-sync-alpha.env")
    assert oos["DUPLEX_DIFFERING_BYTES"] == "65536" and oos["DUPLEX_RESULT"] == "differ", oos
    lines = events.log_text().splitlines()
    assert ("event verify name:r0 peer-node-id:beta result:differ differing-bytes:65536 "
            "skipped-ranges:0 fixed:no seconds:") in "\n".join(lines), lines
    lab.wait(lambda: any(l.startswith("response helper name:r0 helper:out-of-sync status:0 ")
                         for l in events.log_text().splitlines()),
             "the handler's response line", timeout=30, proc=events)
    assert "call helper name:r0 helper:out-of-sync" in events.log_text()

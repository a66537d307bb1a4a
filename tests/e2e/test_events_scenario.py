"""``duplex events`` end to end: a pair in two namespaces, real nbdkit and
TCP, followed through its event lines: the link is cut (the primary goes
Connecting, then Ahead once its ring overflows), comes back (a catch-up:
SyncSource on the primary, SyncTarget on the secondary, then Established),
the primary dies and the secondary is promoted (an ``event promote`` line,
then the stream ends)."""
from __future__ import annotations

import json
import re

from fixtures.duplex_lab import DUPLEX, RESOURCE
from fixtures.workload import Workload

ALPHA_CONN = "change connection name:r0 peer-node-id:beta connection:"
ALPHA_PD = "change peer-device name:r0 peer-node-id:beta "


def _events(lab, node: str, *args: str):
    """``duplex events r0 ARGS`` on *node*, running (its output in its log)."""
    return lab.procs.start([*DUPLEX, "--config", str(lab.config), "--node", node, "events",
                            RESOURCE, *args], name=f"events-{node}")


def _lines(proc) -> list[str]:
    return proc.log_text().splitlines()


def _index(lines: list[str], pred, start: int = 0) -> int | None:
    for i in range(start, len(lines)):
        if pred(lines[i]):
            return i
    return None


def test_a_cut_a_catch_up_and_a_promote_followed_through_the_event_lines(make_lab, netns_pair):
    lab = make_lab(size=16 << 20, options={"ring-size": "1MiB", "ping-timeout": "2s",
                                           "ping-interval": "500ms"})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)

    # --now: the state, the marker, nothing more; the command ends by itself.
    now = lab.duplex("alpha", "events", RESOURCE, "--now").stdout.splitlines()
    assert now[-1] == "exists -", now
    assert "exists resource name:r0 role:Primary" in now[0], now
    assert any(re.fullmatch(r"exists peer-device name:r0 peer-node-id:beta "
                            r"replication:Established .*", line) for line in now), now

    alpha = _events(lab, "alpha", "--timestamps")
    beta = _events(lab, "beta", "--json")
    lab.wait(lambda: "exists -" in alpha.log_text() and '"object":"-"' in beta.log_text(),
             "both event streams to list their state", proc=alpha)

    netns_pair.link_down()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=400, seed=3).run()  # > 1 MiB ring
    lab.wait(lambda: any(ALPHA_PD + "replication:Ahead" in line for line in _lines(alpha)),
             "the primary's Ahead line", timeout=30, proc=alpha)
    # The keepalive declares the silent peer gone (ping-timeout 2 s).
    lab.wait(lambda: any(ALPHA_CONN + "Connecting" in line for line in _lines(alpha)),
             "the primary's lost-connection line", timeout=30, proc=alpha)
    netns_pair.link_up()
    lab.wait_drained(timeout=120)
    lab.wait(lambda: (i := _index(_lines(alpha), lambda l: ALPHA_PD + "replication:SyncSource"
                                  in l)) is not None
             and _index(_lines(alpha), lambda l: ALPHA_PD + "replication:Established" in l,
                        i) is not None,
             "the catch-up lines (SyncSource, then Established)", timeout=60, proc=alpha)

    text = _lines(alpha)
    marker = text.index(next(l for l in text if l.endswith(" exists -")))
    # Timestamps first on every line; the exists part before the marker.
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d (exists|change|"
                        r"event|call|response) ", l) for l in text), text
    changes = [l.split(" ", 1)[1] for l in text[marker + 1:]]
    lost = _index(changes, lambda l: l.startswith(ALPHA_CONN) and "connection:Connected" not in l)
    ahead = _index(changes, lambda l: l.startswith(ALPHA_PD) and "replication:Ahead" in l)
    back = _index(changes, lambda l: l.startswith(ALPHA_CONN + "Connected"))
    sync = _index(changes, lambda l: l.startswith(ALPHA_PD) and "replication:SyncSource" in l)
    est = _index(changes, lambda l: l.startswith(ALPHA_PD) and "replication:Established" in l,
                 sync or 0)
    assert None not in (lost, ahead, back, sync, est), changes
    assert max(lost, ahead) < back <= sync < est, changes
    # Progress lines of the catch-up between its start and its end.
    assert any(" done:" in l for l in changes[sync:est + 1]), changes

    beta_events = [json.loads(l) for l in _lines(beta) if l.startswith("{")]
    repl = [e.get("replication") for e in beta_events if e["object"] == "peer-device"]
    assert "SyncTarget" in repl and repl[-1] == "Established", beta_events

    lab.kill_primary()
    lab.wait(lambda: lab.control("beta")["connection"] != "Connected",
             "the secondary to see its primary gone", timeout=30)
    r = lab.duplex("beta", "promote", RESOURCE, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    lab.wait(lambda: not beta.is_running(), "beta's event stream to end", timeout=30)
    beta_events = [json.loads(l) for l in _lines(beta) if l.startswith("{")]
    promote = [e for e in beta_events if e["type"] == "event" and e["object"] == "promote"]
    assert len(promote) == 1 and promote[0]["node"] == "beta", beta_events
    assert isinstance(promote[0]["lost-writes"], int) and "time" in promote[0], promote
    assert "the node stopped: its event stream ended" in beta.log_text()
    assert beta.returncode == 0


def test_events_without_a_running_node_says_so(make_lab):
    lab = make_lab(size=4 << 20)
    lab.create_md()
    r = lab.duplex("alpha", "events", RESOURCE, check=False)
    assert r.returncode == 1
    assert "resource r0 is not running on this node" in r.stderr, r.stderr
    assert "duplex up r0" in r.stderr and "Traceback" not in r.stderr
    r = lab.duplex("alpha", "events", check=False)
    assert r.returncode == 1 and "no resource runs on node alpha" in r.stderr, r.stderr

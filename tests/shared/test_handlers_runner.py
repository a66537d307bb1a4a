"""Handlers (replicator/handlers.py): which events call which handler (a
pure table), and the runner: real /bin/sh runs, a failing and a hanging
one logged, one at a time per handler, bounded, never blocking the source."""
from __future__ import annotations

import copy
import logging
import threading
import time

from replicator.config import Handlers
from replicator.events import EventSource, diff_events, explicit_event
from replicator.handlers import (MAX_WAITING, HandlerRunner, RunResult, handler_triggers,
                                 run_command)


def _snap(**over) -> dict:
    d = {"resource": "r0", "node": "alpha", "role": "Primary", "connection": "Connected",
         "replication": "Established", "disk": "UpToDate",
         "peer": {"name": "beta", "disk": "UpToDate"},
         "lag": {"writes": 0, "bytes": 0, "seconds": 0.0}, "out_of_sync_bytes": 0, "sync": None}
    d.update(over)
    return d


def _called(prev: dict, new: dict) -> list[str]:
    return [name for name, _ in handler_triggers(diff_events(prev, new, 0.0), prev, new)]


def test_which_handler_each_moment_calls():
    assert _called(_snap(), _snap()) == []
    assert _called(_snap(), _snap(connection="StandAlone", replication="SplitBrain")) == [
        "fence-peer", "split-brain"]
    # A primary that loses its peer fences it; a secondary does not.
    assert _called(_snap(), _snap(connection="Connecting")) == ["fence-peer"]
    assert _called(_snap(role="Secondary"), _snap(role="Secondary", connection="Connecting")) == []
    # Connecting -> StandAlone is not a second loss.
    assert _called(_snap(connection="Connecting"), _snap(connection="StandAlone")) == []
    sec = dict(role="Secondary")
    assert _called(_snap(**sec), _snap(**sec, replication="SyncTarget")) == [
        "before-resync-target"]
    assert _called(_snap(**sec, replication="SyncTarget"), _snap(**sec)) == [
        "after-resync-target"]
    assert _called(dict(_snap(), lag_exceeded=False), dict(_snap(), lag_exceeded=True)) == [
        "lag-exceeded"]
    assert _called(dict(_snap(), lag_exceeded=True), dict(_snap(), lag_exceeded=False)) == []
    verify = lambda b: {"running": False, "started": 1.0, "differing_bytes": b, "seconds": 1}
    assert _called(_snap(verify={"running": True}), _snap(verify=verify(4096))) == ["out-of-sync"]
    assert _called(_snap(verify={"running": True}), _snap(verify=verify(0))) == []
    promote = explicit_event("promote", _snap(), 0.0, node="beta")
    assert [n for n, _ in handler_triggers([promote], _snap(), _snap())] == ["fence-peer"]


def test_run_command_gives_the_exit_status_output_and_env(tmp_path):
    r = run_command("x", 'echo "$DUPLEX_RESOURCE"; exit 3', {"DUPLEX_RESOURCE": "r0"}, 5)
    assert (r.returncode, r.output, r.timed_out) == (3, "r0", False)


def test_a_hanging_command_is_killed_with_what_it_started(tmp_path):
    pidfile = tmp_path / "child"
    done: list = []
    # The child would outlive the test: only killing the whole group ends the run.
    t = threading.Thread(target=lambda: done.append(
        run_command("x", f"sleep 100000 & echo $! > {pidfile}; wait", {}, 0.3)), daemon=True)
    t.start()
    t.join(30)  # a liveness bound, not a speed check: it returns in ~0.3 s
    assert done, "run_command never returned: the handler's child still holds its output"
    r = done[0]
    assert r.timed_out and r.returncode is None
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # a zombie: killed, waiting for its reaper
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"the handler's child {child} survived the timeout")


class _Node:
    def __init__(self):
        self.snap = _snap()

    def __call__(self):
        return copy.deepcopy(self.snap)


def _wait(pred, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_runner_runs_handlers_with_the_state_and_logs_failures(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="duplex.handlers")
    out = tmp_path / "env"
    h = Handlers(commands=(("fence-peer", f"env | grep ^DUPLEX_ | sort > {out}; exit 4"),),
                 timeout_s=5)
    node = _Node()
    src = EventSource(node, clock=lambda: 0.0)
    runner = HandlerRunner(h, "alpha", "beta", src)
    src.tick()
    _, sub = src.subscribe()
    node.snap = _snap(connection="Connecting", last_error="peer timed out")
    src.tick()
    _wait(lambda: "exit status 4" in caplog.text, "the failure to be logged")
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env["DUPLEX_EVENT"] == "fence-peer" and env["DUPLEX_RESOURCE"] == "r0"
    assert (env["DUPLEX_NODE"], env["DUPLEX_PEER"], env["DUPLEX_ROLE"]) == ("alpha", "beta",
                                                                          "Primary")
    assert env["DUPLEX_CONNECTION"] == "Connecting"
    assert env["DUPLEX_LAST_ERROR"] == "peer timed out"  # the event's own words
    assert env["DUPLEX_EVENT_LINE"].startswith("change connection name:r0 peer-node-id:beta")
    runner.stop()
    lines = []
    _wait(lambda: lines.extend(e.text() for e in (sub.get(0) or [])) or
          any(l.startswith("response helper") for l in lines), "the response event")
    assert "call helper name:r0 helper:fence-peer" in lines
    assert any(l.startswith("response helper name:r0 helper:fence-peer status:4 seconds:")
               for l in lines), lines


def test_a_slow_handler_never_blocks_the_source_and_its_calls_are_bounded(caplog):
    caplog.set_level(logging.INFO, logger="duplex.handlers")
    release = threading.Event()
    runs = []

    def run(name, command, env, timeout):  # stands in for run_command: held until released
        runs.append(env["DUPLEX_EVENT_LINE"])
        release.wait(10)
        return RunResult(name, 0, 0.0, "")
    node = _Node()
    src = EventSource(node, clock=lambda: 0.0)
    runner = HandlerRunner(Handlers(commands=(("fence-peer", "true"),)), "alpha", "beta", src,
                           run=run)
    src.tick()
    def cut(i: int) -> None:
        node.snap = _snap(connection="Connecting", last_error=f"cut {i}")
        src.tick()
        node.snap = _snap()
        src.tick()
    cut(0)
    _wait(lambda: len(runs) == 1, "the first run")  # it runs, held
    for i in range(1, MAX_WAITING + 4):  # MAX_WAITING wait, the other 3 are skipped
        cut(i)  # returns at once: the source's thread never waits for a handler
    assert caplog.text.count("calls already wait") == 3, caplog.text
    release.set()
    _wait(lambda: len(runs) == 1 + MAX_WAITING, "the queued runs")
    time.sleep(0.2)
    assert len(runs) == 1 + MAX_WAITING  # one at a time, the skipped ones never run
    runner.stop()

"""``duplex events`` over a real control socket: an in-process EventSource
served by a ControlServer, read by the CLI (text, JSON, --now) and by a
subscriber too slow to keep up, which is dropped with a message."""
from __future__ import annotations

import copy
import json
import socket
import threading

import pytest

from replicator import cli
from replicator.control import ControlServer
from replicator.events import EventSource, EventStream, EventStreamError


def _snap(**over) -> dict:
    d = {"resource": "r0", "node": "alpha", "role": "Primary", "connection": "Connected",
         "replication": "Established", "disk": "UpToDate",
         "peer": {"name": "beta", "disk": "UpToDate"}, "lag": {"seconds": 0.0}}
    d.update(over)
    return d


class _Node:
    def __init__(self):
        self.snap = _snap()

    def __call__(self):
        return copy.deepcopy(self.snap)


@pytest.fixture
def served(setup_dir):
    """An event source on alpha's control socket (no watcher: the test ticks)."""
    meta = setup_dir / "alpha-meta"
    meta.mkdir()
    node = _Node()
    src = EventSource(node, max_queue=50, clock=lambda: 1700000000.0)
    src.tick()
    server = ControlServer(meta, {"status": node}).start()
    server.add_stream("events", src.serve)
    yield node, src, meta
    src.stop()
    server.stop()


def _run(capsys, config_file, *args):
    code = cli.main(["--config", str(config_file), "--node", "alpha", "events", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_now_prints_the_state_and_the_marker_in_text_and_json(capsys, config_file, served):
    code, out, err = _run(capsys, config_file, "r0", "--now")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "exists resource name:r0 role:Primary",
        "exists connection name:r0 peer-node-id:beta connection:Connected",
        "exists device name:r0 disk:UpToDate",
        "exists peer-device name:r0 peer-node-id:beta replication:Established "
        "peer-disk:UpToDate",
        "exists -"]
    code, out, _ = _run(capsys, config_file, "r0", "--now", "--json")
    lines = [json.loads(l) for l in out.splitlines()]
    assert lines[0] == {"type": "exists", "object": "resource", "time": 1700000000.0,
                        "name": "r0", "role": "Primary"}
    assert lines[-1]["object"] == "-"
    code, out, _ = _run(capsys, config_file, "--now", "--timestamps")  # every resource
    assert out.splitlines()[-1].endswith(" exists -") and out[:4].isdigit()


def test_the_stream_goes_on_with_changes_and_ends_when_the_node_stops(capsys, config_file,
                                                                       served):
    node, src, meta = served
    stream = EventStream(str(meta), "r0")
    got = [next(stream) for _ in range(5)]
    assert got[-1]["object"] == "-"
    node.snap = _snap(connection="Connecting", replication="Ahead")
    src.tick()
    assert [next(stream)["object"] for _ in range(2)] == ["connection", "peer-device"]
    src.emit("promote", node="beta")
    assert next(stream)["object"] == "promote"
    src.stop()
    assert list(stream) == []  # the end of the stream
    stream.close()


def test_a_reader_that_falls_behind_is_dropped_with_a_message_and_others_go_on(served):
    node, src, meta = served
    slow = EventStream(str(meta), "r0")
    slow._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    fast = EventStream(str(meta), "r0")
    for stream in (slow, fast):  # both subscribed (their exists part read) before any change
        assert [next(stream)["object"] for _ in range(5)][-1] == "-"
    seen_fast: list[dict] = []
    cond = threading.Condition()

    def read_fast() -> None:
        for e in fast:
            with cond:
                seen_fast.append(e)
                cond.notify_all()
    reader = threading.Thread(target=read_fast, daemon=True)
    reader.start()
    for i in range(3000):  # far more than the socket buffers and the queue of 50 hold
        node.snap = _snap(role="Primary" if i % 2 else "Secondary",
                          last_error=f"error number {i} " + "x" * 200)
        src.tick()
        with cond:  # the fast reader keeps up: it has read this tick's two lines
            assert cond.wait_for(lambda: len(seen_fast) == 2 * (i + 1), timeout=10), (i, len(seen_fast))
    src.stop()  # both streams end: the slow one with the error, if it was dropped
    with pytest.raises(EventStreamError, match="dropped: this subscriber fell 50 events behind"):
        for _ in slow:
            pass
    slow.close()
    reader.join(10)
    assert sum(1 for e in seen_fast if e["type"] == "change") == 2 * 3000  # none lost


def test_events_of_a_node_that_is_not_running_says_so(capsys, config_file):
    code, _, err = _run(capsys, config_file, "r0")
    assert code == 1
    assert "resource r0 is not running on this node (no control socket at" in err, err
    assert "`duplex up r0`" in err

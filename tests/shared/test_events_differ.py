"""The event differ (replicator/events.py), pure: snapshots in, event lines
out; and the event source's subscribers, bounded."""
from __future__ import annotations

import copy

from replicator.events import (FIELDS, EventSource, diff_events, exists_events, format_event,
                               with_lag_flag)


def _snap(**over) -> dict:
    d = {"resource": "r0", "node": "alpha", "running": True, "role": "Primary",
         "connection": "Connected", "replication": "Established", "last_error": None,
         "disk": "UpToDate", "peer": {"name": "beta", "address": "10.0.0.2:7789",
                                      "disk": "UpToDate"},
         "seq": {"written": 10, "journaled": 10, "applied": 10},
         "lag": {"writes": 0, "bytes": 0, "seconds": 0.0}, "sync": None}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def _lines(events) -> list[str]:
    return [e.text() for e in events]


def test_exists_lists_every_object_then_the_marker():
    assert _lines(exists_events(_snap(), 0.0)) == [
        "exists resource name:r0 role:Primary",
        "exists connection name:r0 peer-node-id:beta connection:Connected",
        "exists device name:r0 disk:UpToDate",
        "exists peer-device name:r0 peer-node-id:beta replication:Established "
        "peer-disk:UpToDate",
        "exists -",
    ]


def test_nothing_changed_gives_no_event():
    assert diff_events(_snap(), _snap(seq={"written": 99}, lag={"seconds": 0.2}), 0.0) == []


def test_a_link_cut_is_one_line_per_object_that_changed():
    prev = _snap()
    new = _snap(connection="Connecting", replication="Ahead", last_error="peer timed out",
                peer={"disk": "Unknown"})
    assert _lines(diff_events(prev, new, 0.0)) == [
        'change connection name:r0 peer-node-id:beta connection:Connecting '
        'last-error:"peer timed out"',
        "change peer-device name:r0 peer-node-id:beta replication:Ahead peer-disk:Unknown",
    ]
    # The error going away is said, not left out.
    back = _lines(diff_events(new, _snap(), 0.0))
    assert back[0] == 'change connection name:r0 peer-node-id:beta connection:Connected last-error:""'


def test_role_and_disk_changes():
    prev = _snap(role="Secondary", disk="Consistent")
    assert _lines(diff_events(prev, _snap(), 0.0)) == [
        "change resource name:r0 role:Primary", "change device name:r0 disk:UpToDate"]


def test_fields_a_snapshot_lacks_are_left_out_and_appear_when_it_has_them():
    # congestion and protocol: the primary's, when its status has them.
    assert "congestion" not in exists_events(_snap(), 0.0)[0].fields
    with_c = _snap(congestion="none", protocol="A")
    ex = _lines(exists_events(with_c, 0.0))
    assert ex[0] == "exists resource name:r0 role:Primary congestion:none"
    assert ex[1] == "exists connection name:r0 peer-node-id:beta connection:Connected protocol:A"
    assert _lines(diff_events(with_c, _snap(congestion="blocked", protocol="A"), 0.0)) == [
        "change resource name:r0 congestion:blocked"]
    c = _snap(protocol="C", protocol_effective="C")
    assert _lines(diff_events(c, _snap(protocol="C", protocol_effective="A"), 0.0)) == [
        "change connection name:r0 peer-node-id:beta protocol-in-force:A"]


def test_the_table_names_every_object_it_reports():
    keys = {(f.obj, f.key) for f in FIELDS}
    assert {("resource", "role"), ("connection", "connection"), ("device", "disk"),
            ("peer-device", "replication"), ("resource", "congestion"),
            ("peer-device", "done")} <= keys


def test_resync_progress_is_reported_in_whole_percent():
    sync = {"done_bytes": 0, "total_bytes": 1000, "rate": None, "eta_seconds": None,
            "increment": 1}
    a = _snap(replication="SyncSource", sync=sync)
    assert _lines(diff_events(_snap(), a, 0.0)) == [
        "change peer-device name:r0 peer-node-id:beta replication:SyncSource done:0 increment:1"]
    b = _snap(replication="SyncSource", sync=dict(sync, done_bytes=5))   # 0.5%: same line
    assert diff_events(a, b, 0.0) == []
    c = _snap(replication="SyncSource", sync=dict(sync, done_bytes=470, increment=2))
    assert _lines(diff_events(b, c, 0.0)) == [
        "change peer-device name:r0 peer-node-id:beta done:47 increment:2"]
    assert _lines(diff_events(c, _snap(), 0.0)) == [
        "change peer-device name:r0 peer-node-id:beta replication:Established"]


def test_a_finished_verify_pass_is_one_event():
    running = _snap(verify={"running": True, "started": 5.0, "differing_bytes": 0})
    done = _snap(verify={"running": False, "started": 5.0, "differing_bytes": 65536,
                         "skipped": [], "marked_out_of_sync": False, "seconds": 1.5,
                         "failure": None})
    assert _lines(diff_events(running, done, 0.0)) == [
        "event verify name:r0 peer-node-id:beta result:differ differing-bytes:65536 "
        "skipped-ranges:0 fixed:no seconds:1.5"]
    assert diff_events(done, copy.deepcopy(done), 0.0) == []  # the same pass again: nothing
    again = copy.deepcopy(done)
    again["verify"].update(started=9.0, differing_bytes=0)
    assert _lines(diff_events(done, again, 0.0))[0].startswith(
        "event verify name:r0 peer-node-id:beta result:same")
    assert diff_events(_snap(), _snap(verify={"running": False, "never_run": True}), 0.0) == []


def test_lag_exceeded_goes_yes_past_the_threshold_and_no_below():
    low = with_lag_flag(_snap(lag={"seconds": 0.1}), 1.0)
    high = with_lag_flag(_snap(lag={"seconds": 2.5}), 1.0)
    assert _lines(diff_events(low, high, 0.0)) == [
        "change peer-device name:r0 peer-node-id:beta lag-exceeded:yes"]
    assert _lines(diff_events(high, low, 0.0)) == [
        "change peer-device name:r0 peer-node-id:beta lag-exceeded:no"]
    assert "lag_exceeded" not in with_lag_flag(_snap(), None)


def test_text_and_json_forms():
    ev = exists_events(_snap(), 1700000000.25)[1]
    d = ev.to_dict()
    assert d == {"type": "exists", "object": "connection", "time": 1700000000.25, "name": "r0",
                 "peer-node-id": "beta", "connection": "Connected"}
    stamped = format_event(d, timestamps=True)
    assert stamped.endswith(" exists connection name:r0 peer-node-id:beta connection:Connected")
    assert stamped.split(" ")[0].startswith("2023-11-1")  # ISO date first
    assert format_event({"type": "event", "object": "promote", "name": "r0",
                         "forced": True, "note": 'a "b"'}) == \
        'event promote name:r0 forced:yes note:"a \\"b\\""'


class _Node:
    """A snapshot provider the test moves by hand."""

    def __init__(self):
        self.snap = _snap()

    def __call__(self) -> dict:
        return copy.deepcopy(self.snap)


def test_a_subscriber_gets_exists_then_every_change_in_order():
    node = _Node()
    src = EventSource(node, clock=lambda: 0.0)
    src.tick()
    exists, sub = src.subscribe()
    assert _lines(exists)[-1] == "exists -"
    node.snap = _snap(connection="Connecting")
    src.tick()
    src.emit("promote", node="beta", forced="no")
    node.snap = _snap()
    src.tick()
    got = sub.get(0)
    assert _lines(got) == [
        "change connection name:r0 peer-node-id:beta connection:Connecting",
        "event promote name:r0 node:beta forced:no",
        "change connection name:r0 peer-node-id:beta connection:Connected",
    ]
    src.stop()
    assert sub.get(0) is None  # the stream ends when the source stops


def test_now_gives_the_exists_part_alone():
    src = EventSource(_Node(), clock=lambda: 0.0)
    src.tick()
    exists, sub = src.subscribe(now=True)
    assert sub is None and len(exists) == 5


def test_a_slow_subscriber_is_dropped_with_a_message_and_the_others_go_on():
    node = _Node()
    src = EventSource(node, max_queue=3, clock=lambda: 0.0)
    src.tick()
    _, slow = src.subscribe()
    _, fast = src.subscribe()
    for i in range(6):
        node.snap = _snap(role="Secondary" if i % 2 == 0 else "Primary")
        src.tick()
        assert fast.get(0)  # reads as it goes
    assert slow.get(0) is None
    assert "fell 3 events behind" in slow.dropped
    assert slow not in src._subs and fast in src._subs
    node.snap = _snap(disk="Outdated")
    src.tick()
    assert _lines(fast.get(0)) == ["change device name:r0 disk:Outdated"]


def test_listeners_get_each_batch_with_its_snapshot_and_a_failing_one_is_contained():
    node = _Node()
    src = EventSource(node, clock=lambda: 0.0)
    seen = []
    src.add_listener(lambda evs, prev, snap: 1 / 0)
    src.add_listener(lambda evs, prev, snap: seen.append(
        (_lines(evs), prev["replication"], snap["replication"])))
    src.tick()
    node.snap = _snap(replication="Ahead")
    src.tick()
    assert seen == [(["change peer-device name:r0 peer-node-id:beta replication:Ahead"],
                     "Established", "Ahead")]


def test_a_snapshot_that_fails_skips_the_tick_and_is_logged_once(caplog):
    calls = []

    def snap():
        calls.append(1)
        if 2 <= len(calls) <= 4:
            raise OSError("control busy")
        return _snap(role="Secondary") if len(calls) > 4 else _snap()
    src = EventSource(snap, clock=lambda: 0.0)
    src.tick()
    assert [src.tick() for _ in range(3)] == [[], [], []]
    assert caplog.text.count("cannot read the status (OSError: control busy)") == 1
    assert _lines(src.tick()) == ["change resource name:r0 role:Secondary"]

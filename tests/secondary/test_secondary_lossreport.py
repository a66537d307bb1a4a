"""The loss report (seed 001 FIG. 5, acceptance 10)."""
from __future__ import annotations

import json

import pytest

from _secondary_helpers import BASE_TS, fill, rec
from replicator.lossreport import LossReport, build_loss_report, iso_utc
from replicator.pending import PendingQueue
from replicator.records import OP_TRIM


def fig5_queue() -> tuple[PendingQueue, dict]:
    """Complete 120-129, incomplete 130, complete 131, incomplete 132-134,
    complete 135, last token 136 (incomplete)."""
    recs = {}
    for s in range(120, 137):
        if s == 133:
            recs[s] = rec(s, 7 * 4096, op=OP_TRIM, length=8192, volume=1)
        else:
            recs[s] = rec(s, (s - 100) * 4096, fill(s, 64), volume=s % 2)
    q = PendingQueue(119, applied_token=rec(119, 0, b"x" * 8)[0])
    q.add_tokens(t for t, _ in recs.values())
    for s in list(range(120, 130)) + [131, 135]:
        q.add_record(*recs[s])
    while run := q.next_run():
        q.mark_applied(run[-1][0].seq)
    return q, recs


def test_fig5_report_names_the_consistent_point_and_every_known_loss():
    q, recs = fig5_queue()
    report = build_loss_report(q.loss_view(), resource="r0")
    assert report.consistent_through_seq == 129
    assert report.consistent_through_ts_ns == recs[129][0].ts_ns
    assert [w.seq for w in report.lost] == list(range(130, 137))
    assert [w.seq for w in report.lost if w.data_arrived] == [131, 135]
    assert all(w.announced for w in report.lost)
    w133 = report.lost[3]
    assert (w133.volume, w133.offset, w133.length, w133.op) == (1, 7 * 4096, 8192, "trim")
    w131 = report.lost[1]
    assert (w131.volume, w131.offset, w131.length, w131.op, w131.ts_ns) == (
        1, 31 * 4096, 64, "write", BASE_TS + 131_000)
    assert report.last_known_seq == 136
    assert "Nothing after seq 136 is known" in report.note


def test_fig5_report_json_round_trips_and_carries_times():
    q, recs = fig5_queue()
    report = build_loss_report(q.loss_view(), resource="r0", created_ns=BASE_TS + 10**9)
    d = json.loads(report.to_json())
    assert d["consistent_through_seq"] == 129
    assert d["consistent_through_time"] == iso_utc(recs[129][0].ts_ns)
    assert d["last_known_seq"] == 136
    assert [(e["seq"], e["data_arrived"]) for e in d["lost"]] == [
        (130, False), (131, True), (132, False), (133, False), (134, False), (135, True),
        (136, False)]
    assert d["lost"][1]["offset"] == 31 * 4096 and d["lost"][1]["time"].endswith("Z")
    assert LossReport.from_json(report.to_json()) == report


def test_fig5_report_text_has_one_line_per_lost_write():
    q, recs = fig5_queue()
    text = build_loss_report(q.loss_view(), resource="r0").to_text()
    lines = text.splitlines()
    assert lines[0] == "Duplex loss report for resource r0"
    assert lines[1].startswith("Consistent through seq 129 (written on the primary at "
                               "2023-11-14T22:13:20.123585789Z)")
    lost = [ln for ln in lines if ln.startswith("  seq ")]
    assert len(lost) == 7
    assert lost[1] == ("  seq 131  vol 1  write  offset 126976  length 64  "
                       "2023-11-14T22:13:20.123587789Z  data received, not applied")
    assert "trim   offset 28672  length 8192" in lost[3] and lost[3].endswith("record not received")
    assert lines[-1].startswith("Nothing after seq 136 is known")


def test_never_announced_seqs_are_reported_with_unknown_address():
    q = PendingQueue(0)
    toks = [rec(s, s * 512, fill(s, 8)) for s in (1, 2, 6, 9)]
    q.add_tokens(t for t, _ in toks)
    for r in toks:
        q.add_record(*r)
    while run := q.next_run():
        q.mark_applied(run[-1][0].seq)
    report = build_loss_report(q.loss_view())
    assert report.consistent_through_seq == 2
    assert [(w.seq, w.announced, w.data_arrived) for w in report.lost] == [
        (3, False, False), (4, False, False), (5, False, False), (6, True, True),
        (7, False, False), (8, False, False), (9, True, True)]
    assert report.lost[0].offset is None
    text = report.to_text()
    assert "  seq 3-5  never announced: address unknown" in text
    assert "  seq 7-8  never announced: address unknown" in text
    assert text.count("\n  seq ") == 4


def test_report_with_nothing_lost_says_so():
    q = PendingQueue(0)
    t, r = rec(1, 0, b"a" * 8)
    q.add_tokens([t])
    q.add_record(t, r)
    q.next_run()
    q.mark_applied(1)
    report = build_loss_report(q.loss_view())
    assert report.lost == [] and report.last_known_seq == 1
    assert "No write after that point is known to be lost." in report.to_text()


def test_unknown_timestamp_of_the_consistent_point_is_said_plainly():
    report = build_loss_report(PendingQueue(42).loss_view())
    assert report.consistent_through_ts_ns is None
    assert "Consistent through seq 42 (time unknown)" in report.to_text()


def test_iso_times_keep_nanoseconds_in_utc():
    assert iso_utc(0) == "1970-01-01T00:00:00.000000000Z"
    assert iso_utc(1_700_000_000_000_000_001) == "2023-11-14T22:13:20.000000001Z"


def test_malformed_report_json_names_the_problem():
    with pytest.raises(ValueError, match="not JSON"):
        LossReport.from_json("{")
    with pytest.raises(ValueError, match="lacks or mangles field 'lost'"):
        LossReport.from_json('{"format": 1, "consistent_through_seq": 1}')

"""The loss report (DESIGN §7): point A, the writes known lost, the unknown."""
from __future__ import annotations

import json

import pytest

from _secondary_helpers import BASE_TS, fill, rec
from replicator.secondary.lossreport import LossReport, build_loss_report, iso_utc
from replicator.secondary.pending import PendingQueue
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
    assert [(w.seq, w.announced, w.data_arrived, w.count) for w in report.lost] == [
        (3, False, False, 3), (6, True, True, 1), (7, False, False, 2), (9, True, True, 1)]
    assert report.lost_count == 7
    assert report.lost[0].offset is None
    text = report.to_text()
    assert "  seq 3-5  never announced: address unknown" in text
    assert "  seq 7-8  never announced: address unknown" in text
    assert text.count("\n  seq ") == 4
    assert "Writes known lost after seq 2: 7 " in text


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


def test_a_long_never_announced_run_is_one_entry_and_the_report_stays_small():
    """Promoted during the last increment of a long catch-up: the stream
    after the increment's base was announced, the millions of seqs before
    it never were. They are one entry, not millions (report size, time)."""
    q = PendingQueue(0, window=1 << 21)
    base = 5_000_000
    q.expect_base(base)
    toks = [rec(s, (s % 8) * 512, fill(s, 8)) for s in (base + 1, base + 2, base + 3)]
    q.add_tokens(t for t, _ in toks)
    q.add_record(*toks[1])
    assert q.oldest_pending().seq == base + 1  # status: no walk over the gap
    view = q.loss_view()
    assert [(e.seq, e.token is None, e.count) for e in view.entries] == [
        (1, True, base), (base + 1, False, 1), (base + 2, False, 1), (base + 3, False, 1)]
    report = build_loss_report(view)
    assert report.lost_count == base + 3
    assert [w.seq for w in report.lost_with_data] == [base + 2]
    text = report.to_json()
    assert len(text) < 4096
    back = LossReport.from_json(text)
    assert back.lost == report.lost and back.lost_count == base + 3
    assert f"  seq {'1-' + str(base):>{len(str(base + 3))}}  never announced" in report.to_text()


def test_a_format_1_report_reads_back_with_one_seq_per_entry():
    q = PendingQueue(0)
    toks = [rec(s, s * 512, fill(s, 8)) for s in (1, 4)]
    q.add_tokens(t for t, _ in toks)
    report = build_loss_report(q.loss_view())
    doc = json.loads(report.to_json())
    doc["format"] = 1
    doc["lost"] = ([doc["lost"][0]]
                   + [dict(doc["lost"][1], seq=s, count=None) for s in (2, 3)]
                   + [doc["lost"][2]])
    for e in doc["lost"]:
        e.pop("count")
    back = LossReport.from_json(json.dumps(doc))
    assert [(w.seq, w.count) for w in back.lost] == [(1, 1), (2, 1), (3, 1), (4, 1)]
    assert back.lost_count == 4
    assert "  seq 2-3  never announced: address unknown" in back.to_text()

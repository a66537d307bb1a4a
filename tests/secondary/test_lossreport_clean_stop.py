"""A loss report after a planned switchover (DESIGN §7): the primary's
clean-stop notice makes the report complete: 0 writes lost, said in the
text, kept in the JSON and read back."""
from __future__ import annotations

import json

from _secondary_helpers import fill, rec
from replicator.secondary.lossreport import LossReport, build_loss_report
from replicator.secondary.pending import PendingQueue


def _applied_through(n: int) -> PendingQueue:
    q = PendingQueue(0)
    recs = [rec(s, s * 4096, fill(s, 64)) for s in range(1, n + 1)]
    q.add_tokens(t for t, _ in recs)
    for r in recs:
        q.add_record(*r)
    while run := q.next_run():
        q.mark_applied(run[-1][0].seq)
    return q


def test_a_clean_stop_says_no_write_is_lost_and_survives_json():
    report = build_loss_report(_applied_through(12).loss_view(), resource="r0")
    assert report.lost == [] and report.consistent_through_seq == 12
    clean = report.with_clean_stop(12, "alpha")
    text = clean.to_text()
    assert "Lost writes: 0. The primary alpha stopped cleanly at seq 12" in text, text
    assert "stopped cleanly after seq 12" in clean.note
    d = json.loads(clean.to_json())
    assert d["clean_stop"] == {"seq": 12, "primary": "alpha"} and d["lost_writes"] == 0
    assert LossReport.from_json(clean.to_json()) == clean


def test_without_a_clean_stop_the_report_says_what_is_unknown():
    report = build_loss_report(_applied_through(3).loss_view(), resource="r0")
    d = json.loads(report.to_json())
    assert "clean_stop" not in d and d["lost_writes"] == 0
    assert "Lost writes: 0" not in report.to_text()
    assert "Nothing after seq 3 is known" in report.note

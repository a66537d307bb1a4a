"""The pending write queue (DESIGN §6): in-order runs, gaps, duplicates."""
from __future__ import annotations

import os

import pytest

from _secondary_helpers import BASE_TS, fill, prefix_images, read_file, rec
from replicator.secondary.applier import apply_run, record_data
from replicator.secondary.pending import PendingQueue, StreamError
from replicator.records import OP_TRIM, OP_ZERO

BLOCK = 512


def drain(q: PendingQueue) -> list[int]:
    """Hand out and mark applied every ready run; the seqs in apply order."""
    out = []
    while run := q.next_run():
        out.extend(t.seq for t, _ in run)
        q.mark_applied(run[-1][0].seq)
    return out


@pytest.fixture
def image(tmp_path):
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 16 * BLOCK)
        yield fd
    finally:
        os.close(fd)


def test_secondary_applies_only_in_order_runs_seed_001_example(image):
    """In-order runs: tokens 1..10, data 3,1,2,5,4,7,8,9,10, 6 withheld."""
    history = [rec(s, (s % 16) * BLOCK, fill(s, BLOCK)) for s in range(1, 11)]
    images = prefix_images(16 * BLOCK, history)
    q = PendingQueue(0)
    assert q.add_tokens(t for t, _ in history) == 10
    runs = []
    for s in (3, 1, 2, 5, 4, 7, 8, 9, 10, 6):
        tok, raw = history[s - 1]
        assert q.add_record(tok, raw)
        run = q.next_run()
        runs.append([t.seq for t, _ in run])
        if run:
            apply_run({0: image}, (record_data(raw) for _, raw in run))
            q.mark_applied(run[-1][0].seq)
        # At no time does the image hold a later write without an earlier one.
        assert read_file(image, 16 * BLOCK) == images[q.applied_through], f"after data {s}"
    assert runs == [[], [1], [2, 3], [], [4, 5], [], [], [], [], [6, 7, 8, 9, 10]]
    assert q.applied_through == 10 and len(q) == 0 and q.pending_bytes == 0


def test_later_write_to_same_block_is_never_overwritten_by_earlier_one(image):
    """Overwrite order: seq 5 writes X to block b, seq 9 writes Y; 9's data first."""
    b = 3 * BLOCK
    x, y = b"X" * BLOCK, b"Y" * BLOCK
    history = []
    for s in range(1, 10):
        if s == 5:
            history.append(rec(5, b, x))
        elif s == 9:
            history.append(rec(9, b, y))
        else:
            history.append(rec(s, (s + 4) * BLOCK, fill(s, BLOCK)))
    images = prefix_images(16 * BLOCK, history)
    q = PendingQueue(0)
    q.add_tokens(t for t, _ in history)
    order = [9, 1, 2, 3, 4, 6, 7, 8, 5]
    seen_y = False
    for s in order:
        tok, raw = history[s - 1]
        q.add_record(tok, raw)
        if run := q.next_run():
            apply_run({0: image}, (record_data(r) for _, r in run))
            q.mark_applied(run[-1][0].seq)
        block = os.pread(image, BLOCK, b)
        assert read_file(image, 16 * BLOCK) == images[q.applied_through]
        seen_y = seen_y or block == y
        if seen_y:
            assert block == y, "X overwrote Y"
    assert os.pread(image, BLOCK, b) == y


def test_secondary_never_applies_past_a_gap():
    """A gap: seq 5 never announced; 1-4 apply, 6-8 wait."""
    q = PendingQueue(0)
    recs = {s: rec(s, s * BLOCK, fill(s, 8)) for s in (1, 2, 3, 4, 6, 7, 8)}
    q.add_tokens(t for t, _ in recs.values())
    for tok, raw in recs.values():
        q.add_record(tok, raw)
    assert q.first_gap() == (5, False)
    assert drain(q) == [1, 2, 3, 4]
    assert q.first_gap() == (5, False)
    assert q.received_through == 4 and q.highest_token_seq == 8
    assert q.oldest_pending() == recs[6][0]
    assert q.next_run() == []
    view = q.loss_view()
    assert view.missing == [5]
    assert [(e.seq, e.data_arrived) for e in view.entries] == [
        (5, False), (6, True), (7, True), (8, True)]


def test_token_without_data_is_a_known_gap():
    q = PendingQueue(0)
    (t1, r1), (t2, _), (t3, r3) = rec(1, 0, b"a" * 8), rec(2, 8, b"b" * 8), rec(3, 16, b"c" * 8)
    q.add_tokens([t1, t2, t3])
    q.add_record(t3, r3)
    q.add_record(t1, r1)
    assert q.first_gap() == (2, True)
    assert drain(q) == [1]
    assert q.received_through == 1


def test_first_gap_is_none_when_nothing_announced_is_missing():
    q = PendingQueue(7)
    assert q.first_gap() is None
    tok, raw = rec(8, 0, b"z" * 8)
    q.add_tokens([tok])
    q.add_record(tok, raw)
    assert q.first_gap() is None
    assert q.received_through == 8


def test_data_before_its_token_is_a_stream_error():
    q = PendingQueue(0)
    tok, raw = rec(3, 0, b"d" * 8)
    with pytest.raises(StreamError, match="data for seq 3 arrived before its token"):
        q.add_record(tok, raw)
    assert len(q) == 0


def test_duplicates_after_a_resend_are_ignored():
    q = PendingQueue(0)
    recs = [rec(s, s * 8, fill(s, 8)) for s in (1, 2, 3)]
    q.add_tokens(t for t, _ in recs)
    assert q.add_tokens(t for t, _ in recs) == 0
    for tok, raw in recs[:2]:
        assert q.add_record(tok, raw)
    assert q.add_record(recs[0][0], "second location") is False
    assert q.next_run()[0] == (recs[0][0], recs[0][1])  # the first location stays
    q.mark_applied(2)
    # A resend of everything after a reconnect: applied seqs are ignored.
    assert q.add_tokens(t for t, _ in recs) == 0
    assert q.add_record(*recs[0]) is False
    assert q.add_record(*recs[2]) is True
    assert drain(q) == [3]
    assert q.pending_bytes == 0


def test_conflicting_token_for_a_known_seq_is_refused():
    q = PendingQueue(0)
    t1, _ = rec(4, 0, b"a" * 8)
    t2, _ = rec(4, 8, b"a" * 8)
    q.add_tokens([t1])
    with pytest.raises(StreamError, match="two different tokens for seq 4"):
        q.add_tokens([t2])
    assert q.loss_view().entries[-1].token == t1


def test_conflicting_batch_is_refused_whole():
    q = PendingQueue(0)
    t1, _ = rec(1, 0, b"a" * 8)
    t2a, _ = rec(2, 0, b"a" * 8)
    t2b, _ = rec(2, 8, b"a" * 8)
    with pytest.raises(StreamError, match="seq 2"):
        q.add_tokens([t1, t2a, t2b])
    assert len(q) == 0 and q.highest_token_seq == 0


def test_record_whose_header_differs_from_its_token_is_refused():
    q = PendingQueue(0)
    tok, _ = rec(1, 0, b"a" * 8)
    other, raw = rec(1, 0, b"b" * 8)
    q.add_tokens([tok])
    with pytest.raises(StreamError, match="differs from its token"):
        q.add_record(other, raw)
    assert q.first_gap() == (1, True)


def test_record_conflicting_with_the_applied_record_is_refused():
    tok, raw = rec(5, 0, b"a" * 8)
    q = PendingQueue(5, applied_token=tok)
    assert q.add_record(tok, raw) is False
    other, raw2 = rec(5, 0, b"b" * 8)
    with pytest.raises(StreamError, match="seq 5 differs from the record already applied"):
        q.add_record(other, raw2)


def test_check_record_classifies_without_changing_the_queue():
    q = PendingQueue(0)
    tok, raw = rec(1, 0, b"a" * 8)
    q.add_tokens([tok])
    assert q.check_record(tok) is True
    assert q.received_through == 0
    q.add_record(tok, raw)
    assert q.check_record(tok) is False
    with pytest.raises(StreamError):
        q.check_record(rec(2, 0, b"x" * 8)[0])


def test_runs_respect_record_and_byte_limits():
    q = PendingQueue(0)
    recs = [rec(s, 0, fill(s, 1000)) for s in range(1, 8)]
    q.add_tokens(t for t, _ in recs)
    for r in recs:
        q.add_record(*r)
    run = q.next_run(max_records=3)
    assert [t.seq for t, _ in run] == [1, 2, 3]
    q.mark_applied(3)
    run = q.next_run(max_bytes=2 * recs[0][0].size)
    assert [t.seq for t, _ in run] == [4, 5]
    q.mark_applied(5)
    run = q.next_run(max_bytes=10)  # one record is always let through
    assert [t.seq for t, _ in run] == [6]
    q.mark_applied(6)
    assert drain(q) == [7]


def test_mark_applied_must_end_the_run_handed_out():
    q = PendingQueue(0)
    recs = [rec(s, 0, b"a" * 8) for s in (1, 2, 3)]
    q.add_tokens(t for t, _ in recs)
    for r in recs:
        q.add_record(*r)
    with pytest.raises(ValueError, match="without a run"):
        q.mark_applied(3)
    q.next_run()
    with pytest.raises(ValueError, match="ends at seq 3"):
        q.mark_applied(2)
    q.mark_applied(3)
    assert q.applied_through == 3 and q.applied_token == recs[2][0]


def test_token_far_beyond_the_window_is_refused():
    q = PendingQueue(10, window=100)
    q.add_tokens([rec(110, 0, b"a" * 8)[0]])
    with pytest.raises(StreamError, match="more than 100 seqs past the applied seq 10"):
        q.add_tokens([rec(111, 0, b"a" * 8)[0]])


def test_rebuild_accepts_records_before_their_token_entries():
    recs = [rec(s, s * 8, fill(s, 8)) for s in (4, 5, 6, 7)]
    items = [(recs[1][0], "pos5"), (recs[0][0], None), (recs[0][0], "pos4"),
             (recs[3][0], None), (recs[1][0], None), (rec(3, 0, b"q" * 8)[0], "old")]
    q = PendingQueue.rebuild(3, items)
    assert q.received_through == 5
    assert q.first_gap() == (6, False)
    assert [loc for _, loc in q.next_run()] == ["pos4", "pos5"]
    assert q.highest_token_seq == 7


def test_trim_and_zero_records_carry_no_data_and_still_order():
    q = PendingQueue(0)
    recs = [rec(1, 0, b"a" * 16), rec(2, 0, op=OP_TRIM, length=8), rec(3, 8, op=OP_ZERO, length=8)]
    q.add_tokens(t for t, _ in recs)
    for r in reversed(recs):
        q.add_record(*r)
    assert drain(q) == [1, 2, 3]
    assert q.applied_token.ts_ns == BASE_TS + 3000

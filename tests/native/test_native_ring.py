"""The send ring behind Core: overflow is reported, never blocks and never
drops silently; records leave in seq order; rewind and release; pending
counts decide when OOS bits clear."""
from __future__ import annotations

import random
import threading
import time

import pytest

from replicator import records
from replicator.native.core import Core, CoreError
from replicator.native.ring import tokens


def read_all(core: Core) -> list[tuple[records.Token, bytes]]:
    out = []
    while True:
        span = core.peek(1 << 30)
        if not span:
            return out
        out += [(t, bytes(d)) for t, d in records.iter_records(span)]
        core.advance(len(span))


def test_overflow_is_reported_never_blocks_and_drops_nothing_silently(make_rig):
    rig = make_rig(ring_size=64 << 10)
    c = rig.core
    queued = []
    while True:
        t0 = time.monotonic()
        res = c.write(bytes([len(queued) % 251]) * 4096, len(queued) * 4096)
        assert time.monotonic() - t0 < 1.0, "a full ring must not block the writer"
        if not res.queued:
            break
        queued.append(res.seq)
        # Until the drop is reported, every record so far is retrievable.
        assert not c.dropped
    assert len(queued) == (64 << 10) // (48 + 4096)
    assert c.dropped, "the overflow must be visible"
    assert c.ring_stats["dropped"] and c.ring_stats["drops"] == 1
    assert res.seq == queued[-1] + 1, "the overflowing write still has its seq"
    # After the drop is reported, nothing is half-retrievable.
    assert not c.peek(1 << 20)
    assert c.ring_stats["records"] == 0
    assert not c.rewind(queued[0] - 1)
    assert c.release(res.seq) == 0
    assert not c.write(b"x", 0).queued, "every append while dropped reports not queued"
    # The device still got every write, and the OOS bitmap marks them all.
    assert rig.oos.count() == len(queued) + 1
    c.resume()
    after = c.write(b"y" * 10, 0)
    assert after.queued and after.seq == res.seq + 2
    assert [t.seq for t, _ in read_all(c)] == [after.seq]


def test_until_the_drop_is_reported_every_queued_record_is_retrievable(make_rig):
    rig = make_rig(ring_size=64 << 10)
    c = rig.core
    rng = random.Random(7)
    got: dict[int, bytes] = {}
    while True:
        data = rng.randbytes(rng.randint(1, 3000))
        res = c.write(data, rng.randrange(0, rig.size - 3000))
        if not res.queued:
            break
        got[res.seq] = data
        assert not c.dropped
        # Read everything held, from the oldest: all there, all intact (CRC).
        assert c.rewind(min(got) - 1)
        assert {t.seq: d for t, d in read_all(c)} == got
    assert c.dropped
    assert c.peek(1 << 20).nbytes == 0
    assert not c.rewind(min(got) - 1)


def test_records_leave_in_seq_order_with_concurrent_producers_and_consumer(make_rig):
    rig = make_rig(size=4 << 20, ring_size=256 << 10)
    c = rig.core
    written: dict[int, bytes] = {}
    wlock = threading.Lock()
    stop = threading.Event()
    received: list[tuple[int, bytes]] = []
    errors: list[str] = []

    def producer(k: int):
        rng = random.Random(k)
        for _ in range(400):
            while c.ring_stats["bytes"] > (128 << 10):  # stay clear of overflow
                time.sleep(0.0005)
            data = rng.randbytes(rng.randint(1, 6000))
            res = c.write(data, rng.randrange(0, rig.size - 6000))
            if not res.queued:
                errors.append(f"seq {res.seq} not queued")
            with wlock:
                written[res.seq] = data

    def consumer():
        try:
            consume()
        except Exception as e:  # report, and let the test end cleanly
            errors.append(f"consumer: {e!r}")

    def consume():
        while not (stop.is_set() and not c.ring_stats["unsent_bytes"]):
            if not c.wait(0.05):
                continue
            span = c.peek(32 << 10)
            if not span:
                continue
            for tok, data in records.iter_records(span):
                received.append((tok.seq, bytes(data)))
            toks = list(records.iter_tokens(tokens(span)))
            if [t.seq for t in toks] != [s for s, _ in received[-len(toks):]]:
                errors.append("tokens differ from records")
            c.advance(len(span))
            c.release(received[-1][0])

    cons = threading.Thread(target=consumer)
    cons.start()
    prods = [threading.Thread(target=producer, args=(k,)) for k in range(4)]
    for t in prods:
        t.start()
    for t in prods:
        t.join()
    stop.set()
    cons.join(30)
    assert not errors, errors[:5]
    assert [s for s, _ in received] == list(range(1, 1601)), "strict seq order, no gaps"
    assert all(written[s] == d for s, d in received), "record data differs from what was written"
    assert c.ring_stats["records"] == 0
    assert rig.oos.count() == 0, "everything released: no track stays out of sync"


def test_rewind_resends_held_records_and_fails_once_released(make_rig):
    c = make_rig().core
    seqs = [c.write(bytes([i]) * 100, i * 4096).seq for i in range(5)]
    assert [t.seq for t, _ in read_all(c)] == seqs
    assert c.rewind(seqs[1])
    assert [t.seq for t, _ in read_all(c)] == seqs[2:]
    assert c.release(seqs[2]) == 3
    assert not c.rewind(seqs[1]), "record seqs[2] is released: cannot resend from it"
    assert c.rewind(seqs[2])
    assert [t.seq for t, _ in read_all(c)] == seqs[3:]
    stats = c.ring_stats
    assert (stats["records"], stats["oldest_seq"], stats["newest_seq"]) == (2, seqs[3], seqs[4])


def test_records_wrap_around_the_ring_whole(make_rig):
    c = make_rig(ring_size=16 << 10).core
    rng = random.Random(3)
    seen, total, cut_at_end = [], 0, 0
    for i in range(200):
        n = rng.randint(1, 3000)
        total += n
        assert c.write(bytes([(i + 1) % 256]) * n, 0).seq == i + 1
        if rng.random() < 0.7 and c.ring_stats["bytes"] < (8 << 10):
            continue  # let records pile up so spans meet the end of the buffer
        spans = 0
        while span := c.peek(1 << 30):
            spans += 1
            for tok, data in records.iter_records(span):  # checks each CRC
                assert data == bytes([tok.seq % 256]) * tok.length
                seen.append(tok.seq)
            c.advance(len(span))
        cut_at_end += spans > 1  # a span stopped at the end of the buffer
        c.release(seen[-1])
    for tok, _ in read_all(c):
        seen.append(tok.seq)
    assert total > 10 * (16 << 10), "the test must wrap the ring many times"
    assert cut_at_end > 0, "the test must read records on both sides of the wrap"
    assert seen == list(range(1, 201))
    assert not c.dropped


def test_advance_must_end_on_a_record_boundary(make_rig):
    c = make_rig().core
    c.write(b"a" * 100, 0)
    c.write(b"b" * 100, 0)
    span = c.peek(1 << 20)
    with pytest.raises(ValueError, match="record boundary"):
        c.advance(len(span) - 8)
    c.advance(len(span))


def test_peek_returns_at_least_one_record(make_rig):
    c = make_rig().core
    c.write(b"a" * 5000, 0)
    c.write(b"b" * 10, 0)
    assert len(c.peek(100)) == 48 + 5000 + 0  # 5000 is a multiple of 8
    assert len(c.peek(10_000)) == 48 + 5000 + 48 + 16


def test_oos_bit_clears_only_when_no_later_record_for_its_track_is_pending(make_rig):
    rig = make_rig()
    c, oos = rig.core, rig.oos
    a = c.write(b"1", 5 * 4096).seq
    b = c.write(b"2", 5 * 4096 + 10).seq
    d = c.write(b"3", 6 * 4096).seq
    assert (c.pending(5), c.pending(6)) == (2, 1)
    c.release(a)
    assert oos.test_bit(5), "seq b for track 5 is still pending"
    assert c.pending(5) == 1
    c.release(b)
    assert not oos.test_bit(5)
    assert oos.test_bit(6)
    c.release(d)
    assert oos.count() == 0


def test_after_a_drop_bits_stay_set_until_clearing_is_allowed_again(make_rig):
    rig = make_rig()
    c, oos = rig.core, rig.oos
    first = c.write(b"1", 5 * 4096)
    c.drop()
    assert c.dropped and not c.clear_on_release
    ahead = c.write(b"2", 5 * 4096)
    assert not ahead.queued
    assert c.release(first.seq) == 0, "dropped records are gone, not released"
    assert c.pending(5) == 1, "the dropped record's count waits for resume"
    with pytest.raises(ValueError, match="never reused"):
        c.resume(ahead.seq)
    c.resume(ahead.seq + 10)
    assert c.pending(5) == 0
    assert oos.test_bit(5), "the write made while dropped was never shipped"
    again = c.write(b"3", 5 * 4096)
    assert again.seq == ahead.seq + 10
    c.release(again.seq)
    assert oos.test_bit(5), "clearing stays off until a catch-up has shipped the backlog"
    c.clear_on_release = True
    last = c.write(b"4", 7 * 4096)
    c.release(last.seq)
    assert not oos.test_bit(7)
    with pytest.raises(CoreError, match="not dropped"):
        c.resume()


def test_wait_returns_on_data_timeout_and_wake(make_rig):
    c = make_rig().core
    t0 = time.monotonic()
    assert not c.wait(0.1)
    assert 0.08 < time.monotonic() - t0 < 2
    threading.Timer(0.05, lambda: c.write(b"x", 0)).start()
    assert c.wait(5)
    c.advance(len(c.peek(1 << 20)))
    threading.Timer(0.05, c.wake).start()
    t0 = time.monotonic()
    assert not c.wait(5)
    assert time.monotonic() - t0 < 2

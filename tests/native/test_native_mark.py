"""Group point markers in the C core and the apply bound in the pending
queue (DESIGN §13): a MARK at T follows every record stamped at or before
T (insertion atomic with stamping, seed 000 §2.8 and behaviour 17), stamps
strictly increase with seq, and a bound T lets through exactly the prefix
of records stamped at or before T."""
from __future__ import annotations

import threading
import time

from replicator import records
from replicator.native.rxq import RxQueue
from replicator.records import OP_MARK, OP_WRITE, encode_record

from tests.native.test_native_core import drain


def test_stamps_strictly_increase_with_seq_under_concurrent_writes(make_rig):
    rig = make_rig(size=1 << 20)

    def worker(k: int) -> None:
        for i in range(400):
            rig.core.write(bytes([k]) * 512, (k * 400 + i) % 2000 * 512)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    toks = [t for t, _ in records.iter_records(drain(rig.core))]
    assert [t.seq for t in toks] == sorted(t.seq for t in toks)
    assert all(a.ts_ns < b.ts_ns for a, b in zip(toks, toks[1:]))


def test_a_mark_follows_every_record_stamped_at_or_before_its_time(make_rig):
    """Behaviour 17: writers hammer the core while marks at T = now are
    inserted; in the stream no record stamped <= T comes after mark T, and
    some stamped > T come before it (the W3 case), so the check has teeth."""
    rig = make_rig(size=1 << 20)
    stop = threading.Event()

    def writer(k: int) -> None:
        i = 0
        while not stop.is_set():
            rig.core.write(b"w" * 512, (k * 997 + i) % 2000 * 512)
            i += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    marks = []
    for n in range(1, 41):
        t_n = rig.core.now_ns() - 2_000_000  # a checkpoint arrives after its T
        res = rig.core.mark(t_n, n, b'{"n":%d}' % n)
        assert res.queued
        marks.append((n, t_n, res.seq))
        time.sleep(0.001)
    stop.set()
    for t in threads:
        t.join()
    toks = [(t, d) for t, d in records.iter_records(drain(rig.core))]
    by_seq = {t.seq: t for t, _ in toks}
    later_before = 0
    for n, t_n, mseq in marks:
        m = by_seq[mseq]
        assert m.op == OP_MARK and m.offset == n and m.ts_ns == t_n
        after = [t for t in by_seq.values() if t.seq > mseq and t.op == OP_WRITE]
        assert all(t.ts_ns > t_n for t in after), f"a write stamped <= T follows mark {n}"
        later_before += sum(1 for t in by_seq.values()
                            if t.seq < mseq and t.op == OP_WRITE and t.ts_ns > t_n)
    assert later_before > 0  # writes stamped after T but sent before mark T exist
    notes = [bytes(d) for t, d in toks if t.op == OP_MARK]
    assert notes[0] == b'{"n":1}'


def test_a_mark_waits_for_a_clock_that_is_behind(make_rig):
    rig = make_rig(size=1 << 20)
    t_future = rig.core.now_ns() + 30_000_000  # the master's clock is 30 ms ahead
    start = time.monotonic()
    res = rig.core.mark(t_future, 1)
    assert time.monotonic() - start >= 0.025
    rig.core.write(b"x" * 512, 0)
    toks = [t for t, _ in records.iter_records(drain(rig.core))]
    assert toks[0].seq == res.seq and toks[1].ts_ns > t_future


def test_clock_offset_shifts_stamps(make_rig):
    rig = make_rig(size=1 << 20)
    rig.core.set_clock_offset(5_000_000_000)
    assert rig.core.now_ns() - time.time_ns() > 4_000_000_000
    rig.core.write(b"y" * 512, 0)
    (tok, _), = records.iter_records(drain(rig.core))
    assert tok.ts_ns - time.time_ns() > 4_000_000_000


def test_the_bound_lets_through_exactly_the_prefix_stamped_at_or_before_it():
    q = RxQueue(0, None, 1 << 16)
    stream = [encode_record(1, 100, 0, 512, OP_WRITE, b"a" * 512),
              encode_record(2, 200, 512, 512, OP_WRITE, b"b" * 512),
              encode_record(3, 150, 150, 0, OP_MARK),  # mark n=150 at T=150
              encode_record(4, 300, 0, 512, OP_WRITE, b"c" * 512)]
    buf = b"".join(stream)
    q.add_tokens(b"".join(r[:48] for r in stream))
    q.add_records(buf, 0)
    q.set_ts_bound(150)
    assert q.take_run(0, 0) == 1  # seq 2 (ts 200) waits: the mark passes only after it
    assert q.mark_applied(1)
    assert q.take_run(0, 0) == 0
    q.set_ts_bound(250)
    assert q.take_run(0, 0) == 2  # seqs 2 and the mark 3; seq 4 (ts 300) waits
    assert q.mark_applied(3)
    assert q.received_ts() == 300
    q.set_ts_bound(0)
    assert q.take_run(0, 0) == 1

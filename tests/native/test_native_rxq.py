"""The secondary's C pending queue (native/rxq.h), through replicator.native.rxq.RxQueue
(raw bytes) and replicator.secondary.pending.PendingQueue (the rules and their words).

tests/secondary/test_secondary_pending.py covers the worked examples; this
file adds:

* a rule-based model test: random interleavings of token batches, DATA
  frames, runs, mark_applied, expect_base and rebase against a small pure
  Python model of pending.py's rules, including every refusal (and that a
  refused call changes nothing observable);
* the open-addressing table under growth, reuse, collisions and rollback;
* the C applier (apply_taken): cold records read back from a journal file,
  hot records written from memory, merging, TRIM/ZERO/FLUSH, and refusals;
* token and record header validation.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import struct
import tempfile
from functools import lru_cache
from typing import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from replicator.secondary.applier import ApplyError
from replicator.native.rxq import RXQ_FAULTS, RxFault, RxInfo, RxQueue
from replicator.secondary.pending import LostEntry, PendingQueue, StreamError
from replicator.records import (HEADER, HEADER_SIZE, OP_FLUSH, OP_NAMES, OP_TRIM, OP_WRITE,
                                OP_ZERO, Token, encode_record, padded, unpack_token)

BASE_TS = 1_700_000_000_000_000_000
SEQ = struct.Struct("<Q")


# ---- records and images ----------------------------------------------------

def fill(seq: int, n: int) -> bytes:
    """Data that differs between seqs and between positions."""
    return bytes((seq * 37 + i * 11 + 1) % 256 for i in range(n))


def rec(seq: int, offset: int = 0, data: bytes = b"", op: int = OP_WRITE,
        length: int | None = None, volume: int = 0, ts_ns: int | None = None) -> bytes:
    """One encoded record (header, data, padding) with its CRC."""
    if op == OP_WRITE:
        length = len(data)
    elif length is None:
        length = 0
    ts = BASE_TS + seq * 1000 if ts_ns is None else ts_ns
    return encode_record(seq, ts, offset, length, op, data if op == OP_WRITE else b"", volume)


def tok(raw: bytes) -> Token:
    """The token of an encoded record (or of a bare header)."""
    return unpack_token(raw)


def seq_of(raw: bytes, pos: int = 0) -> int:
    """The seq of the header at *pos*, read raw (works on malformed ones)."""
    return SEQ.unpack_from(raw, pos)[0]


def rec_size(header: bytes) -> int:
    """Encoded size of the record whose header this is (header + padded data)."""
    return HEADER_SIZE + padded(struct.unpack_from("<I", header, 28)[0])


def header_ok(h: bytes) -> bool:
    """records_header_ok in Python: known op, data_len matching it, reserved zero."""
    _, _, _, length, dlen, _, op, _, rsv16, _, rsv32 = HEADER.unpack_from(h)
    if op not in (OP_WRITE, OP_TRIM, OP_ZERO, OP_FLUSH) or rsv16 or rsv32:
        return False
    return dlen == length if op == OP_WRITE else dlen == 0


def replay(image: bytes, records: list[bytes]) -> bytes:
    """*image* after the records, in list order (what the primary wrote)."""
    buf = bytearray(image)
    for raw in records:
        t = tok(raw)
        if t.op == OP_WRITE:
            buf[t.offset:t.offset + t.length] = raw[HEADER_SIZE:HEADER_SIZE + t.length]
        elif t.op in (OP_TRIM, OP_ZERO):
            buf[t.offset:t.offset + t.length] = bytes(t.length)
    return bytes(buf)


def prefix_images(image: bytes, history: list[bytes]) -> dict[int, bytes]:
    """seq -> the image after every record with seq <= it (history in seq order)."""
    out = {seq_of(history[0]) - 1 if history else 0: image}
    cur = image
    for raw in history:
        cur = replay(cur, [raw])
        out[seq_of(raw)] = cur
    return out


def first_diff(a: bytes, b: bytes) -> str:
    """Where two images first differ, for assertion messages."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at byte {i}: {x:#04x} != {y:#04x}"
    return f"lengths {len(a)} != {len(b)}" if len(a) != len(b) else "identical"


def snapshot(q: PendingQueue) -> tuple:
    """Every counter and view a refused call must leave as it was."""
    return (q.info(), len(q), q.first_gap(), q.loss_view(), q.oldest_pending(),
            q.hot_bytes, q.run_end)


# ---- the model ---------------------------------------------------------------

class Refused(Exception):
    """What the model expects the queue to refuse, and with which words."""

    def __init__(self, pattern: str) -> None:
        super().__init__(pattern)
        self.pattern = pattern


class QueueModel:
    """pending.py's rules over plain dicts: the oracle of the stateful test."""

    def __init__(self, applied: int, applied_token: bytes | None, window: int) -> None:
        self.applied = applied
        self.applied_token = applied_token
        self.window = window
        self.base_hint = applied
        self.highest = applied
        self.entries: dict[int, list] = {}  # seq -> [token bytes, location or None]
        self.run: list[int] = []            # seqs handed out
        self.hot: list[tuple[int, int]] = []  # (max_seq, bytes) of frames kept
        self.hot_limit = 32 << 20

    @property
    def received(self) -> int:
        seq = self.applied
        while seq + 1 in self.entries and self.entries[seq + 1][1] is not None:
            seq += 1
        return seq

    @property
    def bytes(self) -> int:
        return sum(rec_size(t) for t, loc in self.entries.values() if loc is not None)

    @property
    def hot_bytes(self) -> int:
        return sum(n for _, n in self.hot)

    def info(self) -> RxInfo:
        return RxInfo(self.applied, self.received, self.highest, self.base_hint, self.bytes,
                      len(self.entries), self.run[-1] if self.run else 0, len(self.run),
                      sum(rec_size(self.entries[s][0]) for s in self.run), self.applied_token)

    def _check_token(self, t: bytes) -> bool:
        seq = seq_of(t)
        if seq <= self.applied:
            if seq == self.applied and self.applied_token is not None and t != self.applied_token:
                raise Refused(f"token for seq {seq} differs from the record already applied")
            return False
        floor = max(self.applied, self.base_hint)
        if seq - floor > self.window:
            raise Refused(f"token for seq {seq} is more than {self.window} seqs past "
                          f"the applied seq {floor}")
        if seq in self.entries and self.entries[seq][0] != t:
            raise Refused(f"two different tokens for seq {seq}: ")
        return seq not in self.entries

    def add_tokens(self, toks: list[bytes]) -> int:
        for i, t in enumerate(toks):
            if not header_ok(t):
                raise Refused(f"malformed record header at byte {i * HEADER_SIZE} of the frame")
            self._check_token(t)
        new: dict[int, bytes] = {}
        for t in toks:
            seq = seq_of(t)
            if seq <= self.applied or seq in self.entries:
                continue
            if seq in new and new[seq] != t:
                raise Refused(f"two different tokens for seq {seq} in one batch")
            new.setdefault(seq, t)
        for seq, t in new.items():
            self.entries[seq] = [t, None]
            self.highest = max(self.highest, seq)
        return len(new)

    def add_frame(self, payload: bytes, loc: int, dry_run: bool, max_seq: int | None) -> int:
        pos, found = 0, []
        while pos < len(payload):
            h = payload[pos:pos + HEADER_SIZE]
            if (len(h) < HEADER_SIZE or not header_ok(h)
                    or rec_size(h) > len(payload) - pos):
                raise Refused(f"malformed record header at byte {pos} of the frame")
            seq = seq_of(h)
            if seq <= self.applied:
                self._check_token(h)
            elif seq not in self.entries:
                raise Refused(f"data for seq {seq} arrived before its token")
            elif self.entries[seq][0] != h:
                raise Refused(f"data for seq {seq} carries a header that differs from its token")
            found.append((pos, seq))
            pos += rec_size(h)
        if dry_run:  # how many distinct seqs would become complete
            return len({s for _, s in found if s > self.applied
                        and self.entries[s][1] is None})
        new = 0
        for pos, seq in found:  # the first copy of a seq wins
            e = self.entries.get(seq) if seq > self.applied else None
            if e is not None and e[1] is None:
                e[1] = loc + pos
                new += 1
        if (max_seq is not None and new
                and self.hot_bytes + len(payload) <= self.hot_limit):
            self.hot.append((max_seq, len(payload)))
        return new

    def take_run(self, max_records: int, max_bytes: int) -> list[int]:
        run, size, seq = [], 0, self.applied + 1
        received = self.received
        while seq <= received:
            n = rec_size(self.entries[seq][0])
            if max_records and len(run) >= max_records:
                break
            if run and max_bytes and size + n > max_bytes:
                break
            run.append(seq)
            size += n
            seq += 1
        self.run = run
        return run

    def _drop_through(self, seq: int) -> None:
        for s in [s for s in self.entries if s <= seq]:
            del self.entries[s]
        self.run = []
        self.hot = [(m, n) for m, n in self.hot if m > self.applied]

    def mark_applied(self, seq: int) -> None:
        if not self.run:
            raise Refused(f"mark_applied\\({seq}\\) without a run")
        if seq != self.run[-1]:
            raise Refused(f"mark_applied\\({seq}\\): the run handed out ends at seq {self.run[-1]}")
        self.applied = seq
        self.applied_token = self.entries[seq][0]
        self._drop_through(seq)

    def expect_base(self, seq: int) -> None:
        self.base_hint = max(self.base_hint, seq)

    def rebase(self, seq: int, token: bytes | None) -> None:
        if token is not None and seq_of(token) != seq:
            raise Refused(f"rebase\\({seq}\\) given the token of seq {seq_of(token)}")
        if seq < self.applied:
            raise Refused(f"rebase\\({seq}\\) goes back from applied seq {self.applied}")
        self.applied = seq
        self.applied_token = token
        self.highest = max(self.highest, seq)
        self.base_hint = max(self.base_hint, seq)
        self._drop_through(seq)

    def loss_entries(self) -> tuple[LostEntry, ...]:
        """Known seqs one by one; each run of seqs never announced as one
        entry with its count."""
        out: list[LostEntry] = []
        for seq in range(self.applied + 1, self.highest + 1):
            e = self.entries.get(seq)
            if e is not None:
                out.append(LostEntry(seq, tok(e[0]), e[1] is not None))
            elif out and out[-1].token is None:
                out[-1] = LostEntry(out[-1].seq, None, False, out[-1].count + 1)
            else:
                out.append(LostEntry(seq, None, False))
        return tuple(out)


@lru_cache(maxsize=None)
def universe(seq: int, alt: bool = False) -> bytes:
    """The record the primary wrote under *seq* (alt: a conflicting one).

    Every op, data lengths that need padding and ones that do not; the
    conflicting record differs only in its timestamp (and so its CRC)."""
    ts = BASE_TS + seq * 1000 + (7 if alt else 0)
    kind = seq % 9
    off = (seq * 40) % 2048
    if kind == 2:
        return rec(seq, off, op=OP_TRIM, length=(seq % 4 + 1) * 8, ts_ns=ts)
    if kind == 5:
        return rec(seq, off, op=OP_ZERO, length=seq % 50 + 1, ts_ns=ts)
    if kind == 7:
        return rec(seq, 0, op=OP_FLUSH, ts_ns=ts)
    return rec(seq, off, fill(seq, 8 * (seq % 5) + seq % 3), ts_ns=ts)


def broken(header: bytes, how: int) -> bytes:
    """*header* made malformed in one of four ways."""
    h = bytearray(header)
    if how == 0:
        h[36] = 9                      # unknown op
    elif how == 1:
        h[38] = 1                      # reserved u16
    elif how == 2:
        h[44] = 1                      # reserved u32
    else:
        h[24:28] = struct.pack("<I", struct.unpack_from("<I", h, 24)[0] + 1)  # length != data_len
        if h[36] != OP_WRITE:
            h[28:32] = struct.pack("<I", 8)  # a trim/zero/flush carrying data
    return bytes(h)


class PendingQueueMachine(RuleBasedStateMachine):
    """PendingQueue (C entries) against QueueModel, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.q: PendingQueue | None = None
        self.m: QueueModel | None = None

    @initialize(applied=st.integers(0, 5), with_token=st.booleans(),
                window=st.integers(3, 20), hot_limit=st.sampled_from([0, 400, 32 << 20]))
    def start(self, applied: int, with_token: bool, window: int, hot_limit: int) -> None:
        t = universe(applied)[:HEADER_SIZE] if with_token and applied else None
        self.q = PendingQueue(applied, tok(t) if t else None, window=window)
        self.q.hot_limit = hot_limit
        self.m = QueueModel(applied, t, window)
        self.m.hot_limit = hot_limit

    # -- drawing --------------------------------------------------------

    def _seq(self, data) -> int:
        """A seq anywhere in the interesting range: applied ones, the window,
        just past it."""
        m = self.m
        lo = max(1, m.applied - 2)
        return data.draw(st.integers(lo, max(m.applied, m.base_hint) + m.window + 2))

    def _token_seqs(self, data) -> list[int]:
        """Mostly the stream as the primary sends it (a contiguous stretch
        near the front), sometimes scattered seqs."""
        m = self.m
        if data.draw(st.integers(0, 3)) == 0:
            return [self._seq(data) for _ in range(data.draw(st.integers(0, 6)))]
        first = data.draw(st.integers(max(1, m.applied - 1), m.highest + 2))
        return list(range(first, first + data.draw(st.integers(1, 6))))

    def _frame_seqs(self, data) -> list[int]:
        """Mostly data for announced seqs still waiting for it (in any
        order), sometimes anything (data before its token, resends)."""
        m = self.m
        waiting = sorted(s for s, e in m.entries.items() if e[1] is None)
        if not waiting or data.draw(st.integers(0, 3)) == 0:
            return [self._seq(data) for _ in range(data.draw(st.integers(1, 4)))]
        return data.draw(st.lists(st.sampled_from(waiting), min_size=1, max_size=4))

    def _alt(self, data) -> bool:
        return data.draw(st.integers(0, 15)) == 0

    def _expect(self, call, model_call):
        """Run the call and the model; compare outcomes, and on a refusal
        check that nothing observable changed."""
        before = snapshot(self.q)
        try:
            want = model_call()
        except Refused as r:
            event("refused: " + re.sub(r"\\\(?\d+\\\)?|\d+", "N", r.pattern)[:40])
            with pytest.raises((StreamError, ValueError), match=r.pattern):
                call()
            assert snapshot(self.q) == before, "a refused call changed the queue"
            return None
        got = call()
        assert got == want
        return got

    # -- rules ----------------------------------------------------------

    @rule(data=st.data(), as_objects=st.booleans())
    def add_tokens(self, data, as_objects: bool) -> None:
        seqs = self._token_seqs(data)
        toks = [universe(s, self._alt(data))[:HEADER_SIZE] for s in seqs]
        if toks and data.draw(st.integers(0, 5)) == 0:
            # The same seq twice in the batch: a resend, or a conflict.
            i = data.draw(st.integers(0, len(toks) - 1))
            toks.insert(data.draw(st.integers(i + 1, len(toks))),
                        universe(seqs[i], data.draw(st.booleans()))[:HEADER_SIZE])
        if toks and data.draw(st.integers(0, 15)) == 0:
            i = data.draw(st.integers(0, len(toks) - 1))
            toks[i] = broken(toks[i], data.draw(st.integers(0, 3)))
            as_objects = False  # a Token cannot carry every malformation
        self._tokens(toks, as_objects)

    def _tokens(self, toks: list[bytes], as_objects: bool) -> None:
        if as_objects:
            call = lambda: self.q.add_tokens([tok(t) for t in toks])  # noqa: E731
        else:
            call = lambda: self.q.add_token_bytes(b"".join(toks))  # noqa: E731
        if self._expect(call, lambda: self.m.add_tokens(toks)):
            event("tokens: some new")

    @rule(data=st.data(), dry_run=st.sampled_from([False, False, True]), hot=st.booleans(),
          loc=st.integers(0, 1 << 40))
    def add_frame(self, data, dry_run: bool, hot: bool, loc: int) -> None:
        recs = [universe(s, self._alt(data)) for s in self._frame_seqs(data)]
        if data.draw(st.integers(0, 5)) == 0:
            recs.append(recs[0])  # a duplicate within the frame
        if data.draw(st.integers(0, 20)) == 0:
            i = data.draw(st.integers(0, len(recs) - 1))
            recs[i] = broken(recs[i][:HEADER_SIZE], data.draw(st.integers(0, 2))) + recs[i][48:]
        payload = b"".join(recs)
        if data.draw(st.integers(0, 20)) == 0:
            payload = payload[:-8]  # truncated: the last record's header or data is cut
        self._frame(payload, recs, dry_run, hot, loc)

    def _frame(self, payload: bytes, recs: list[bytes], dry_run: bool, hot: bool,
               loc: int) -> None:
        max_seq = max(seq_of(r) for r in recs) if hot else None
        distinct = len({seq_of(r) for r in recs}) == len(recs)
        before = snapshot(self.q)
        try:
            want = self.m.add_frame(payload, loc, dry_run, max_seq)
        except Refused as r:
            event("frame refused: " + re.sub(r"\d+", "N", r.pattern)[:40])
            with pytest.raises(StreamError, match=r.pattern):
                self.q.add_frame(payload, loc, dry_run=dry_run, max_seq=max_seq)
            assert snapshot(self.q) == before, "a refused frame changed the queue"
            return
        got = self.q.add_frame(payload, loc, dry_run=dry_run, max_seq=max_seq)
        if dry_run:
            # Counted exactly only without duplicates inside the frame (see
            # test_dry_run_counts_a_seq_repeated_in_one_frame_once).
            assert got == want if distinct else bool(got) == bool(want)
            assert snapshot(self.q) == before, "a dry run changed the queue"
        else:
            assert got == want
            if got:
                event("frame: some new")

    @rule(data=st.data(), n=st.integers(0, 5), hot=st.booleans(), loc=st.integers(0, 1 << 40))
    def stream_on(self, data, n: int, hot: bool, loc: int) -> None:
        """What a healthy primary does: the next tokens, then the data of
        some of the seqs still waiting, in any order."""
        m = self.m
        seqs = list(range(m.highest + 1, m.highest + 1 + n))
        self._tokens([universe(s)[:HEADER_SIZE] for s in seqs], data.draw(st.booleans()))
        waiting = sorted(s for s, e in m.entries.items() if e[1] is None)[:6]
        if waiting:
            chosen = data.draw(st.lists(st.sampled_from(waiting), min_size=1, max_size=6,
                                        unique=True))
            recs = [universe(s) for s in chosen]
            self._frame(b"".join(recs), recs, False, hot, loc)

    @rule(max_records=st.integers(0, 4), max_bytes=st.sampled_from([0, 0, 1, 60, 150, 400]))
    def apply_next(self, max_records: int, max_bytes: int) -> None:
        """What the applier does: take the next run and mark it applied."""
        want = self.m.take_run(max_records, max_bytes)
        run = self.q.next_run(max_records or None, max_bytes or None)
        assert [(t.pack(), loc) for t, loc in run] == [tuple(self.m.entries[s]) for s in want]
        if want:
            event("applied a run")
            self.q.mark_applied(want[-1])
            self.m.mark_applied(want[-1])

    @rule(max_records=st.integers(0, 4), max_bytes=st.sampled_from([0, 1, 60, 150, 400]),
          as_list=st.booleans())
    def take_run(self, max_records: int, max_bytes: int, as_list: bool) -> None:
        want = self.m.take_run(max_records, max_bytes)
        event(f"run of {min(len(want), 3)}{'+' if len(want) > 3 else ''} records")
        if self.m.hot_bytes:
            event("frames kept hot")
        if as_list:
            run = self.q.next_run(max_records or None, max_bytes or None)
            assert [(t.pack(), loc) for t, loc in run] == [
                tuple(self.m.entries[s]) for s in want]
        else:
            assert self.q.take_run(max_records or None, max_bytes or None) == len(want)
        assert self.q.run_end == (want[-1] if want else None)
        if not want:
            seq = self.m.applied + 1
            self._expect(lambda: self.q.mark_applied(seq), lambda: self.m.mark_applied(seq))

    @precondition(lambda self: self.m is not None and self.m.run)
    @rule(delta=st.sampled_from([0, 0, 0, -1, 1]))
    def mark_applied(self, delta: int) -> None:
        seq = self.m.run[-1] + delta
        before = self.m.applied
        self._expect(lambda: self.q.mark_applied(seq), lambda: self.m.mark_applied(seq))
        if self.m.applied != before:
            event("marked applied")

    @rule(data=st.data())
    def expect_base(self, data) -> None:
        seq = self.m.applied + data.draw(st.integers(0, self.m.window))
        self.q.expect_base(seq)
        self.m.expect_base(seq)

    @rule(data=st.data(), with_token=st.sampled_from(["none", "own", "own", "other"]))
    def rebase(self, data, with_token: str) -> None:
        seq = max(0, self.m.applied + data.draw(st.integers(-1, self.m.window + 3)))
        t = None
        if with_token == "own" and seq:
            t = universe(seq)[:HEADER_SIZE]
        elif with_token == "other":
            t = universe(seq + 1)[:HEADER_SIZE]
        if self._expect(lambda: self.q.rebase(seq, tok(t) if t else None),
                        lambda: self.m.rebase(seq, t)) is None and self.m.applied == seq:
            event("rebased")

    # -- what must always agree ------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        if self.q is None:
            return
        m, q = self.m, self.q
        assert q.info() == m.info()
        assert len(q) == len(m.entries)
        assert q.applied_through == m.applied and q.received_through == m.received
        assert q.highest_token_seq == m.highest and q.pending_bytes == m.bytes
        assert q.applied_token == (tok(m.applied_token) if m.applied_token else None)
        gap = None
        if m.received < m.highest:
            gap = (m.received + 1, m.received + 1 in m.entries)
        assert q.first_gap() == gap
        oldest = min(m.entries) if m.entries else None
        assert q.oldest_pending() == (tok(m.entries[oldest][0]) if oldest else None)
        view = q.loss_view()
        assert (view.applied_through, view.last_token_seq) == (m.applied, m.highest)
        assert view.entries == m.loss_entries()
        assert q.hot_bytes == m.hot_bytes <= max(m.hot_limit, 0)


TestPendingQueueAgreesWithItsModel = PendingQueueMachine.TestCase
TestPendingQueueAgreesWithItsModel.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestPendingQueueAgreesWithItsModel.pytestmark = [pytest.mark.slow]  # 300 runs x 50 steps: 17 s


def test_dry_run_leaves_the_queue_unchanged_and_counts_new_records():
    q = PendingQueue(0)
    recs = [universe(s) for s in (1, 2, 3)]
    q.add_token_bytes(b"".join(r[:48] for r in recs))
    before = snapshot(q)
    assert q.add_frame(b"".join(recs[:2]), 100, dry_run=True) == 2
    assert snapshot(q) == before
    assert q.add_frame(recs[0], 100) == 1
    before = snapshot(q)
    assert q.add_frame(b"".join(recs), 500, dry_run=True) == 2
    assert snapshot(q) == before and q.received_through == 1


def test_dry_run_counts_a_seq_repeated_in_one_frame_once():
    q = PendingQueue(0)
    r1 = universe(1)
    q.add_token_bytes(r1[:48])
    assert q.add_frame(r1 + r1, 0, dry_run=True) == 1


def test_duplicate_inside_a_frame_keeps_the_first_location():
    q = PendingQueue(0)
    r1, r2 = universe(1), universe(3)
    q.add_token_bytes(r1[:48] + r2[:48])
    assert q.add_frame(r1 + r2 + r1, 1000) == 2
    assert [(t.seq, loc) for t, loc in q.next_run()] == [(1, 1000)]
    assert q.loss_view().entries[-1] == LostEntry(3, tok(r2), True)


def test_token_between_applied_and_the_staged_base_is_accepted():
    q = PendingQueue(0, window=3)
    q.expect_base(2)
    assert q.add_tokens([tok(universe(1))]) == 1
    assert q.highest_token_seq == 1 and len(q) == 1


def test_refused_batch_after_a_window_check_takes_none_of_its_tokens():
    q = PendingQueue(0, window=10)
    toks = [universe(s)[:48] for s in (5, 6, 11, 15)]
    with pytest.raises(StreamError, match="token for seq 11 is more than 10 seqs past "
                                          "the applied seq 0"):
        q.add_token_bytes(b"".join(toks))
    assert len(q) == 0 and q.highest_token_seq == 0
    q.expect_base(5)  # an increment to seq 5 is being staged: 15 is within reach now
    assert q.add_token_bytes(b"".join(toks)) == 4
    assert q.info().base_hint == 5 and q.highest_token_seq == 15
    with pytest.raises(StreamError, match="token for seq 16 is more than 10 seqs past "
                                          "the applied seq 5"):
        q.add_tokens([tok(universe(16))])
    q.rebase(5, tok(universe(5)))
    assert len(q) == 3 and q.first_gap() == (6, True)


# ---- the hash table ------------------------------------------------------------

def flush_headers(first: int, n: int, ts: int = BASE_TS) -> bytes:
    """n FLUSH tokens from seq *first* on: each is its whole record too."""
    return b"".join(HEADER.pack(s, ts + s, 0, 0, 0, 0, OP_FLUSH, 0, 0, s & 0xFFFFFFFF, 0)
                    for s in range(first, first + n))


def test_long_in_order_stream_reuses_slots_and_keeps_counters():
    """200k seqs in batches, data following tokens one batch behind, applied
    in uneven runs: the table's home slots are reused in place."""
    total, batch = 200_000, 1000
    q = PendingQueue(0)
    seen_locs = 0
    q.add_token_bytes(flush_headers(1, batch))
    for b in range(total // batch):
        first = b * batch + 1
        if first + batch <= total:
            assert q.add_token_bytes(flush_headers(first + batch, batch)) == batch
        frame = flush_headers(first, batch)
        assert q.add_frame(frame, 1 << 32 | b * len(frame)) == batch
        assert q.received_through == first + batch - 1
        pending = q.highest_token_seq - q.applied_through
        assert len(q) == pending
        assert q.pending_bytes == (q.received_through - q.applied_through) * HEADER_SIZE
        while True:
            if b % 20 == 0:
                run = q.next_run(max_records=337)
                if not run:
                    break
                for t, loc in run:
                    # seq s sits at offset (s-1)*48 of the frames laid end to end
                    assert loc == 1 << 32 | (t.seq - 1) * HEADER_SIZE
                    assert t.ts_ns == BASE_TS + t.seq
                seen_locs += len(run)
                q.mark_applied(run[-1][0].seq)
            else:
                if not q.take_run(max_records=337):
                    break
                q.mark_applied(q.run_end)
        assert q.applied_through == first + batch - 1
    assert q.applied_through == q.received_through == q.highest_token_seq == total
    assert len(q) == 0 and q.pending_bytes == 0 and q.first_gap() is None
    assert q.applied_token == tok(flush_headers(total, 1))
    assert seen_locs == 10 * batch


def test_sparse_catch_up_far_beyond_an_old_range_is_found_and_rebased():
    """An old range with gaps, then an increment base 10 * 2**20 further: the
    new seqs share home slots with the old ones (seq & mask)."""
    base = 10 << 20
    q = PendingQueue(0)
    rx = RxQueue(0, None, 1 << 21)
    old = flush_headers(1, 3000)
    for target in (q.add_token_bytes, lambda b: rx.add_tokens(b)):
        assert target(old) == 3000
    for lo, hi in ((1, 1000), (2001, 2500)):
        part = old[(lo - 1) * 48:hi * 48]
        assert q.add_frame(part, lo * 48) == hi - lo + 1
        assert rx.add_records(part, lo * 48) == hi - lo + 1
    assert q.received_through == 1000 and q.first_gap() == (1001, True)
    new = flush_headers(base + 1, 3000, ts=BASE_TS + 5)
    with pytest.raises(StreamError, match=f"token for seq {base + 1} is more than"):
        q.add_token_bytes(new)
    q.expect_base(base)
    rx.expect_base(base)
    assert q.add_token_bytes(new) == 3000 and rx.add_tokens(new) == 3000
    assert q.add_frame(new[:2000 * 48], 7 << 30) == 2000
    assert rx.add_records(new[:2000 * 48], 7 << 30) == 2000
    assert len(q) == 6000 and q.highest_token_seq == base + 3000
    assert q.pending_bytes == (1000 + 500 + 2000) * 48
    # Every entry, old and new, under its own seq.
    for s in range(1, 3001):
        state, raw, loc = rx.get(s)
        want = RxQueue.COMPLETE if s <= 1000 or 2001 <= s <= 2500 else RxQueue.ANNOUNCED
        assert (state, raw) == (want, old[(s - 1) * 48:s * 48]), s
        if state == RxQueue.COMPLETE:
            assert loc == s * 48  # each part was stored from lo * 48 on
        state, raw, loc = rx.get(base + s)
        want = RxQueue.COMPLETE if s <= 2000 else RxQueue.ANNOUNCED
        assert (state, raw) == (want, new[(s - 1) * 48:s * 48]), base + s
        if s <= 2000:
            assert loc == (7 << 30) + (s - 1) * 48
    for s in (3001, base, base + 3001):
        assert rx.get(s)[0] == 0
    base_tok = tok(flush_headers(base, 1))
    q.rebase(base, base_tok)
    rx.rebase(base, base_tok.pack())
    assert len(q) == 3000 and rx.info().entries == 3000
    assert q.received_through == base + 2000
    assert q.pending_bytes == 2000 * 48
    assert q.first_gap() == (base + 2001, True)
    assert rx.get(1)[0] == 0 and rx.get(2001)[0] == 0
    assert q.add_frame(new[2000 * 48:], 9 << 30) == 1000
    assert q.add_frame(old, 0) == 0  # a resend of the superseded range is ignored
    n = q.take_run()
    assert n == 3000 and q.run_end == base + 3000
    q.mark_applied(base + 3000)
    assert len(q) == 0 and q.pending_bytes == 0 and q.applied_through == base + 3000


def test_many_pending_entries_force_rehash_and_stay_found():
    """150k announced entries at once (the table grows from 1024 slots well
    past 2**17); data in reverse: nothing is received until seq 1 arrives."""
    total, batch = 150_000, 5000
    rx = RxQueue(0, None, 1 << 21)
    q = PendingQueue(0)
    toks = flush_headers(1, total)
    for i in range(0, total, batch):
        part = toks[i * 48:(i + batch) * 48]
        assert rx.add_tokens(part) == batch and q.add_token_bytes(part) == batch
    assert rx.info().entries == total and len(q) == total
    for s in range(1, total + 1, 7):
        assert rx.get(s) == (RxQueue.ANNOUNCED, toks[(s - 1) * 48:s * 48], 0)
    for i in reversed(range(0, total, batch)):
        part = toks[i * 48:(i + batch) * 48]
        frame = part if i else part[48:]  # seq 1 held back
        loc = i * 48 + (0 if i else 48)
        assert rx.add_records(frame, loc) == len(frame) // 48
        assert q.add_frame(frame, loc) == len(frame) // 48
        assert rx.info().received == 0 and q.received_through == 0
    assert q.first_gap() == (1, True)
    assert q.pending_bytes == (total - 1) * 48
    for s in range(2, total + 1, 5):
        assert rx.get(s) == (RxQueue.COMPLETE, toks[(s - 1) * 48:s * 48], (s - 1) * 48)
    assert rx.add_records(toks[:48], 0) == 1 and q.add_frame(toks[:48], 0) == 1
    assert rx.info().received == total and q.received_through == total
    n = rx.take_run(0, 0)
    assert n == total
    for i in range(0, total, 997):
        assert rx.run_item(i) == (toks[i * 48:(i + 1) * 48], i * 48)
    assert rx.mark_applied(total)
    assert rx.info().entries == 0 and rx.info().bytes == 0
    # The dead slots make room for the next stream.
    more = flush_headers(total + 1, 3000)
    assert rx.add_tokens(more) == 3000 and rx.add_records(more, 0) == 3000
    assert rx.info().received == total + 3000 and rx.info().entries == 3000
    assert q.take_run(max_records=50_000) == 50_000
    q.mark_applied(50_000)
    assert len(q) == total - 50_000 and q.received_through == total


def test_rolled_back_batch_leaves_colliding_probe_chains_intact():
    """Seqs 1, 1025, 2049 share home slot 1 of the first 1024-slot table; a
    refused batch inserts then removes two more in that chain."""
    rx = RxQueue(0, None, 1 << 21)
    chain = [1 + k * 1024 for k in range(6)]
    t = {s: universe(s)[:48] for s in chain}
    assert rx.add_tokens(t[chain[0]] + t[chain[1]] + t[chain[2]]) == 3
    conflicting = universe(chain[3], alt=True)[:48]
    with pytest.raises(RxFault) as exc:
        rx.add_tokens(t[chain[3]] + t[chain[4]] + conflicting)
    assert exc.value.fault == RXQ_FAULTS["batch_differs"]
    assert exc.value.seq == chain[3]
    assert rx.info().entries == 3 and rx.info().highest == chain[2]
    assert [rx.get(s)[0] for s in chain] == [1, 1, 1, 0, 0, 0]
    assert rx.add_tokens(t[chain[5]]) == 1           # past the removed slots
    assert rx.get(chain[5]) == (RxQueue.ANNOUNCED, t[chain[5]], 0)
    assert rx.add_tokens(t[chain[4]] + t[chain[3]]) == 2  # into the removed slots
    for s in chain:
        assert rx.get(s)[1] == t[s], s
    assert rx.info().entries == 6
    for s in chain:
        assert rx.add_records(universe(s), s * 8) == 1
    assert rx.info().received == 1  # seq 2 was never announced
    assert rx.get(chain[4]) == (RxQueue.COMPLETE, t[chain[4]], chain[4] * 8)


def test_refused_batch_that_grew_the_table_is_rolled_back_whole():
    """700 live entries, then a batch of 1000 new tokens ending in a
    conflict: the table rehashes mid-batch, and the rollback must still find
    and remove every one of the 1000."""
    q = PendingQueue(0)
    first = flush_headers(1, 700)
    q.add_token_bytes(first)
    q.add_frame(first[:300 * 48], 0)
    before = snapshot(q)
    batch = flush_headers(701, 1000)
    bad = HEADER.pack(701, 1, 0, 0, 0, 0, OP_FLUSH, 0, 0, 0, 0)
    with pytest.raises(StreamError, match="two different tokens for seq 701 in one batch"):
        q.add_token_bytes(batch + bad)
    assert snapshot(q) == before
    assert q.add_token_bytes(batch) == 1000
    assert len(q) == 1700 and q.highest_token_seq == 1700
    q.add_frame(first[300 * 48:] + batch, 300 * 48)
    assert q.received_through == 1700 and q.pending_bytes == 1700 * 48
    run = q.next_run()
    assert [t.seq for t, _ in run] == list(range(1, 1701))
    assert [loc for _, loc in run] == [i * 48 for i in range(1700)]


# ---- applying (apply_taken) ----------------------------------------------------

IMAGE = 64 << 10


class Files:
    """A journal file the test appends frames to, and an image file."""

    def __init__(self, directory: str, image_size: int = IMAGE, pattern: bool = True) -> None:
        self.jpath = os.path.join(directory, "journal")
        self.ipath = os.path.join(directory, "image")
        self.jfd = os.open(self.jpath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.ifd = os.open(self.ipath, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.size = image_size
        self.initial = (bytes((i * 7 + 3) % 251 + 1 for i in range(4096)) * (image_size // 4096)
                        if pattern else bytes(image_size))
        os.pwrite(self.ifd, self.initial, 0)
        self.jend = 0

    def append(self, payload: bytes, gap: int = 0) -> int:
        """Write a frame to the journal after *gap* junk bytes; its location."""
        if gap:
            os.pwrite(self.jfd, b"\xee" * gap, self.jend)
            self.jend += gap
        loc = self.jend
        os.pwrite(self.jfd, payload, loc)
        self.jend += len(payload)
        return loc

    def image(self) -> bytes:
        data = os.pread(self.ifd, self.size, 0)
        return data + bytes(self.size - len(data))

    def close(self) -> None:
        os.close(self.jfd)
        os.close(self.ifd)


@pytest.fixture
def files(tmp_path) -> Iterator[Files]:
    f = Files(str(tmp_path))
    try:
        yield f
    finally:
        f.close()


def deliver(q: PendingQueue, f: Files, recs: list[bytes], hot: bool = False, gap: int = 0,
            tokens: bool = True) -> int:
    """Announce the records (unless *tokens* is False), journal them as one
    DATA frame and queue it, hot or not; the frame's location."""
    payload = b"".join(recs)
    if tokens:
        q.add_token_bytes(b"".join(r[:48] for r in recs))
    loc = f.append(payload, gap)
    q.add_frame(payload, loc, max_seq=max(seq_of(r) for r in recs) if hot else None)
    return loc


def apply_ready(q: PendingQueue, f: Files, **limits) -> tuple[int, int]:
    """Take, apply and mark the next run: (its last seq or 0, bytes written)."""
    if not q.take_run(**limits):
        return 0, 0
    end = q.run_end
    written = q.apply_taken(f.jfd, f.ifd, f.size)
    q.mark_applied(end)
    return end, written


def writes(recs: list[bytes]) -> int:
    """Data bytes the applier writes for these records (WRITEs only)."""
    return sum(tok(r).length for r in recs if tok(r).op == OP_WRITE)


def test_apply_reads_cold_records_back_from_the_journal(files):
    history = [rec(1, 100, fill(1, 333)), rec(2, 4000, fill(2, 4096)),
               rec(3, 150, fill(3, 20)), rec(4, 60000, fill(4, 5536)),
               rec(5, 0, fill(5, 1))]
    q = PendingQueue(0)
    deliver(q, files, [history[2], history[0]], gap=24)
    deliver(q, files, [history[4], history[3], history[1]], gap=8)
    assert q.hot_bytes == 0
    assert apply_ready(q, files) == (5, writes(history))
    want = replay(files.initial, history)
    assert files.image() == want, first_diff(files.image(), want)
    assert q.applied_through == 5 and len(q) == 0 and q.pending_bytes == 0


def test_apply_writes_hot_records_from_memory_without_the_journal(files):
    history = [rec(s, s * 512 - 7, fill(s, 300 + s)) for s in range(1, 9)]
    q = PendingQueue(0)
    q.add_token_bytes(b"".join(r[:48] for r in history))
    frames = [history[4:], history[:4]]
    for fr in frames:
        q.add_frame(b"".join(fr), 1 << 30, max_seq=max(seq_of(r) for r in fr))
    assert q.hot_bytes == sum(len(r) for r in history)
    # The journal is empty: every byte must come from the kept frames.
    assert os.fstat(files.jfd).st_size == 0
    assert apply_ready(q, files, max_records=3) == (3, writes(history[:3]))
    assert files.image() == replay(files.initial, history[:3])
    assert q.hot_bytes == sum(len(r) for r in history)  # frame 1-4 not done yet
    assert apply_ready(q, files, max_records=1) == (4, writes(history[3:4]))
    assert q.hot_bytes == sum(len(r) for r in history[4:])
    assert apply_ready(q, files) == (8, writes(history[4:]))
    assert files.image() == replay(files.initial, history)
    assert q.hot_bytes == 0


def test_apply_mixes_hot_and_cold_records_in_one_run(files):
    # Each write continues where the previous one ended, so the merged
    # writes alternate between the journal read back and kept frames.
    history, off = [], 1000
    for s in range(1, 13):
        n = 100 + 13 * s
        history.append(rec(s, off, fill(s, n)))
        off += n
    history.append(rec(13, 1050, fill(13, 40)))  # overlaps seq 1: must land after it
    q = PendingQueue(0)
    deliver(q, files, history[0::2], hot=False, gap=16)
    deliver(q, files, history[1::2], hot=True)
    assert 0 < q.hot_bytes < sum(len(r) for r in history)
    # The hot frame's journal copy is garbled: it must not be read.
    hot_loc = files.jend - sum(len(r) for r in history[1::2])
    os.pwrite(files.jfd, b"\x55" * (files.jend - hot_loc), hot_loc)
    assert apply_ready(q, files) == (13, writes(history))
    want = replay(files.initial, history)
    assert files.image() == want, first_diff(files.image(), want)
    assert q.hot_bytes == 0


def test_adjacent_writes_beyond_one_pwritev_give_the_same_bytes(files):
    """1500 adjacent 8-byte writes (more than IOV_MAX in one merged write),
    cold then hot, plus overwrites of the same range later in the run."""
    history = [rec(s, 8 * (s - 1), fill(s, 8)) for s in range(1, 1501)]
    history += [rec(1501, 16, fill(1501, 8)), rec(1502, 0, fill(1502, 24)),
                rec(1503, 11990, op=OP_ZERO, length=20), rec(1504, 11992, fill(1504, 8))]
    q = PendingQueue(0)
    deliver(q, files, history[:700])
    deliver(q, files, history[700:], hot=True)
    assert apply_ready(q, files) == (1504, writes(history))
    want = replay(files.initial, history)
    assert files.image() == want, first_diff(files.image(), want)


@pytest.mark.parametrize("hot", [False, True], ids=["cold", "hot"])
def test_adjacent_writes_past_eight_mib_are_split_and_still_exact(tmp_path, hot):
    """Four adjacent 3 MiB writes: past the applier's 8 MiB merge and
    journal read-back limits."""
    f = Files(str(tmp_path), image_size=16 << 20, pattern=False)
    try:
        mib3 = 3 << 20
        rnd = random.Random(7)
        history, off = [], 1 << 20
        for s in range(1, 5):  # each continues where the previous one ended
            history.append(rec(s, off, rnd.randbytes(mib3 - 5 * s)))
            off += mib3 - 5 * s
        q = PendingQueue(0)
        deliver(q, f, history, hot=hot)
        assert q.hot_bytes == (sum(len(r) for r in history) if hot else 0)
        assert apply_ready(q, f) == (4, writes(history))
        assert f.image() == replay(f.initial, history)
        assert q.hot_bytes == 0
    finally:
        f.close()


def test_trim_and_zero_records_read_as_zeros_and_keep_the_size(files):
    history = [rec(1, 4096, op=OP_TRIM, length=8192),
               rec(2, 100, op=OP_ZERO, length=333),
               rec(3, 6000, fill(3, 50)),               # into the trimmed range
               rec(4, 20000, fill(4, 4096)),
               rec(5, 20480, op=OP_ZERO, length=1),
               rec(6, IMAGE - 4096, op=OP_TRIM, length=4096)]  # up to the very end
    q = PendingQueue(0)
    deliver(q, files, history)
    assert apply_ready(q, files) == (6, 50 + 4096)
    img = files.image()
    assert img == replay(files.initial, history), first_diff(img, replay(files.initial, history))
    assert img[4096:6000] == bytes(1904) and img[6050:12288] == bytes(12288 - 6050)
    assert img[100:433] == bytes(333) and img[99] != 0 and img[433] != 0
    assert img[20480] == 0 and img[20481] == fill(4, 4096)[481]
    assert img[-4096:] == bytes(4096)
    assert os.fstat(files.ifd).st_size == IMAGE


def test_flush_records_apply_in_place_and_write_no_data(files):
    history = [rec(1, 0, fill(1, 512)), rec(2, 0, op=OP_FLUSH),
               rec(3, 512, fill(3, 512)),
               rec(4, 1 << 50, op=OP_FLUSH),  # a flush's range is not checked
               rec(5, 256, fill(5, 512))]
    q = PendingQueue(0)
    deliver(q, files, history[:2], hot=True)
    deliver(q, files, history[2:])
    assert apply_ready(q, files) == (5, 3 * 512)
    assert files.image() == replay(files.initial, history)
    assert q.applied_token == tok(history[4])


@pytest.mark.parametrize("bad", [
    rec(2, IMAGE - 100, fill(2, 101)),
    rec(2, IMAGE + 8, op=OP_ZERO, length=8),
    rec(2, IMAGE - 4096, op=OP_TRIM, length=8192),
    rec(2, (1 << 64) - 8, op=OP_ZERO, length=16),
], ids=["write", "zero", "trim", "offset-wraps"])
def test_record_past_the_image_end_is_refused_and_nothing_is_marked(files, bad):
    t = tok(bad)
    history = [rec(1, 0, fill(1, 64)), bad, rec(3, 64, fill(3, 64))]
    q = PendingQueue(0)
    deliver(q, files, history)
    assert q.take_run() == 3
    before = q.info()
    with pytest.raises(ApplyError, match=re.escape(
            f"record seq 2: {OP_NAMES[t.op]} of {t.length} bytes at offset {t.offset} "
            f"runs past the end of the {IMAGE}-byte image")):
        q.apply_taken(files.jfd, files.ifd, IMAGE)
    assert q.info() == before
    assert q.applied_through == 0 and q.run_end == 3 and len(q) == 3


def test_journal_location_holding_another_record_is_refused(files):
    r1, r2 = rec(1, 0, fill(1, 64)), rec(2, 64, fill(2, 64))
    q = PendingQueue(0)
    q.add_token_bytes(r1[:48] + r2[:48])
    loc1 = files.append(r1)
    files.append(r2)
    q.add_frame(r1, loc1)
    q.add_frame(r2, loc1)  # wrong: seq 1's record lies there
    assert q.take_run() == 2
    with pytest.raises(ApplyError, match=f"journal offset {loc1} does not hold record seq 2"):
        q.apply_taken(files.jfd, files.ifd, IMAGE)
    assert q.applied_through == 0 and q.run_end == 2 and q.pending_bytes == len(r1) + len(r2)


def test_journal_overwritten_under_a_record_is_refused(files):
    r1 = rec(1, 0, fill(1, 64))
    q = PendingQueue(0)
    loc = deliver(q, files, [r1], gap=40)
    os.pwrite(files.jfd, bytes(len(r1)), loc)
    q.take_run()
    with pytest.raises(ApplyError, match=f"journal offset {loc} does not hold record seq 1: "
                                         "the journal is damaged or was overwritten"):
        q.apply_taken(files.jfd, files.ifd, IMAGE)
    assert q.applied_through == 0


def test_journal_shorter_than_a_record_is_an_io_error(files):
    r1 = rec(1, 0, fill(1, 64))
    q = PendingQueue(0)
    q.add_token_bytes(r1[:48])
    q.add_frame(r1, 4096)  # nothing was journaled there
    q.take_run()
    with pytest.raises(OSError, match="applying seq 1") as exc:
        q.apply_taken(files.jfd, files.ifd, IMAGE)
    assert exc.value.errno == errno.EIO
    assert q.applied_through == 0


def test_record_for_another_volume_is_refused(files):
    q = PendingQueue(0)
    deliver(q, files, [rec(1, 0, fill(1, 8), volume=3)])
    q.take_run()
    with pytest.raises(ApplyError, match="record seq 1: no image for volume 3"):
        q.apply_taken(files.jfd, files.ifd, IMAGE)


def test_hot_frames_are_released_as_their_last_seq_is_applied(files):
    history = [rec(s, s * 100, fill(s, 90)) for s in range(1, 11)]
    q = PendingQueue(0)
    q.hot_limit = len(history[0]) * 7  # room for the first two frames only
    deliver(q, files, history[:3], hot=True)
    deliver(q, files, history[3:7], hot=True)
    deliver(q, files, history[7:], hot=True)  # past the limit: read back from the journal
    sizes = [sum(len(r) for r in history[:3]), sum(len(r) for r in history[3:7])]
    assert q.hot_bytes == sum(sizes) <= q.hot_limit
    apply_ready(q, files, max_records=2)
    assert q.hot_bytes == sum(sizes)
    apply_ready(q, files, max_records=1)
    assert q.hot_bytes == sizes[1]
    apply_ready(q, files, max_records=4)
    assert q.hot_bytes == 0
    assert apply_ready(q, files) == (10, writes(history[7:]))
    assert files.image() == replay(files.initial, history)
    # A rebase past a kept frame releases it too.
    more = [rec(s, 0, fill(s, 8)) for s in (11, 12, 13)]
    deliver(q, files, more, hot=True)
    assert q.hot_bytes == sum(len(r) for r in more)
    q.rebase(13, tok(more[2]))
    assert q.hot_bytes == 0 and len(q) == 0


OPS = st.sampled_from([OP_WRITE] * 6 + [OP_TRIM, OP_ZERO, OP_FLUSH])
HSIZE = 8192


@st.composite
def histories(draw) -> list[bytes]:
    """Records 1..n over an 8 KiB image; many writes continue the previous one."""
    out, prev_end = [], 0
    for seq in range(1, draw(st.integers(1, 30)) + 1):
        op = draw(OPS)
        n = draw(st.integers(0 if op != OP_WRITE else 1, 700))
        if draw(st.booleans()) and prev_end + n <= HSIZE:
            off = prev_end
        else:
            off = draw(st.integers(0, HSIZE - n))
        if op == OP_WRITE:
            out.append(rec(seq, off, draw(st.binary(min_size=n, max_size=n))))
        else:
            out.append(rec(seq, off, op=op, length=n))
        prev_end = off + n
    return out


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(history=histories(), data=st.data())
def test_apply_taken_matches_the_replayed_history(history, data):
    """Frames in any order (cold or hot, with junk between them in the
    journal), runs of any size: after each run the image is exactly the
    primary's image at the run's last seq."""
    order = data.draw(st.permutations(history))
    frames, i = [], 0
    while i < len(order):
        n = data.draw(st.integers(1, 4))
        frames.append(order[i:i + n])
        i += n
    with tempfile.TemporaryDirectory() as d:
        f = Files(d, image_size=HSIZE)
        try:
            images = prefix_images(f.initial, history)
            q = PendingQueue(0)
            for fr in frames:
                deliver(q, f, fr, hot=data.draw(st.booleans()),
                        gap=8 * data.draw(st.integers(0, 3)))
                while True:
                    limits = dict(max_records=data.draw(st.integers(0, 5)) or None,
                                  max_bytes=data.draw(st.sampled_from([None, 100, 1000])))
                    ran = [tok(history[s - 1]) for s in
                           range(q.applied_through + 1, q.received_through + 1)]
                    end, written = apply_ready(q, f, **limits)
                    if not end:
                        break
                    ran = ran[:end - (ran[0].seq - 1)]
                    assert written == sum(t.length for t in ran if t.op == OP_WRITE)
                    got = f.image()
                    assert got == images[end], f"after run to {end}: " + first_diff(
                        got, images[end])
            assert q.applied_through == len(history)
            assert len(q) == 0 and q.pending_bytes == 0 and q.hot_bytes == 0
        finally:
            f.close()


# ---- header validation -----------------------------------------------------------

MALFORMED = {
    "op-0": lambda h: h[:36] + b"\x00" + h[37:],
    "op-6": lambda h: h[:36] + b"\x06" + h[37:],
    "mark-with-a-volume": lambda h: h[:32] + struct.pack("<I", 1) + b"\x05" + h[37:],
    "reserved-u16": lambda h: h[:38] + b"\x00\x01" + h[40:],
    "reserved-u32": lambda h: h[:44] + b"\x01\x00\x00\x00",
    "write-data-len": lambda h: h[:28] + struct.pack("<I", 4) + h[32:],
}


@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_malformed_token_is_refused_naming_its_byte_offset(how):
    q = PendingQueue(0)
    q.add_token_bytes(universe(1)[:48])
    before = snapshot(q)
    toks = [universe(s)[:48] for s in (2, 3, 4, 6)]
    toks[2] = MALFORMED[how](toks[2])
    with pytest.raises(StreamError, match="malformed record header at byte 96 of the frame"):
        q.add_token_bytes(b"".join(toks))
    assert snapshot(q) == before  # seqs 2 and 3 were not taken either


def test_trim_token_carrying_data_is_refused():
    q = PendingQueue(0)
    h = bytearray(rec(1, 0, op=OP_TRIM, length=8)[:48])
    h[28:32] = struct.pack("<I", 8)
    with pytest.raises(StreamError, match="malformed record header at byte 0 of the frame"):
        q.add_token_bytes(bytes(h))
    assert len(q) == 0


@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_malformed_record_in_a_frame_is_refused_naming_its_byte_offset(how):
    q = PendingQueue(0)
    recs = [rec(1, 0, fill(1, 13)), rec(2, 64, fill(2, 8)), rec(3, 8, op=OP_ZERO, length=8)]
    q.add_token_bytes(b"".join(r[:48] for r in recs))
    before = snapshot(q)
    bad = MALFORMED[how](recs[1][:48]) + recs[1][48:]
    off = len(recs[0])
    with pytest.raises(StreamError, match=f"malformed record header at byte {off} of the frame"):
        q.add_frame(recs[0] + bad + recs[2], 0)
    assert snapshot(q) == before  # seq 1, before the bad one, was not taken


def test_truncated_frame_is_refused_naming_the_cut_record():
    q = PendingQueue(0)
    recs = [rec(1, 0, fill(1, 16)), rec(2, 0, fill(2, 100))]
    q.add_token_bytes(b"".join(r[:48] for r in recs))
    frame = b"".join(recs)
    for cut in (1, 8, len(recs[1]) - 47):  # into the padding, the data, the header
        with pytest.raises(StreamError, match=f"malformed record header at byte {len(recs[0])}"):
            q.add_frame(frame[:-cut], 0)
    assert q.received_through == 0 and q.pending_bytes == 0


def test_token_payload_with_a_partial_token_is_refused():
    q = PendingQueue(0)
    with pytest.raises(StreamError):
        q.add_token_bytes(universe(1)[:48] + b"xx")


def test_malformed_single_record_names_byte_zero_not_a_stale_offset():
    q = PendingQueue(0)
    toks = [universe(s)[:48] for s in (1, 2, 3)]
    toks[2] = MALFORMED["op-6"](toks[2])
    with pytest.raises(StreamError, match="byte 96"):
        q.add_token_bytes(b"".join(toks))
    bad = dataclasses.replace(tok(universe(1)), op=9)
    with pytest.raises(StreamError, match="at byte 0 of"):
        q.add_record(bad, 0)

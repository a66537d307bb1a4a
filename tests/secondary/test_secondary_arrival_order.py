"""Property tests: whatever order frames arrive in, over however many
connections, with resends and secondary crashes, the image is always a
prefix of the primary's write history (DESIGN §6: the seq decides, not the
arrival order).

A tiny model replays the history to give the expected image after each seq;
the real queue, journal and applier run on real files.
"""
from __future__ import annotations

import os
import random
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _secondary_helpers import fill, first_diff, prefix_images, read_file, rec
from replicator.secondary.applier import apply_run, record_data
from replicator.secondary.journal import AREA_START, Journal
from replicator.secondary.pending import PendingQueue
from replicator.records import OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO

BLOCK = 512
NBLOCKS = 8
SIZE = BLOCK * NBLOCKS
UUID = bytes(range(16))


@st.composite
def histories(draw, max_len=24):
    """A primary write history: [(token, raw record)] for seqs 1..n."""
    n = draw(st.integers(1, max_len))
    out = []
    for seq in range(1, n + 1):
        op = draw(st.sampled_from([OP_WRITE, OP_WRITE, OP_WRITE, OP_TRIM, OP_ZERO, OP_FLUSH]))
        start = draw(st.integers(0, NBLOCKS - 1))
        nb = draw(st.integers(1, min(3, NBLOCKS - start)))
        if op == OP_WRITE:
            out.append(rec(seq, start * BLOCK, fill(seq, nb * BLOCK)))
        elif op == OP_FLUSH:
            out.append(rec(seq, op=OP_FLUSH))
        else:
            out.append(rec(seq, start * BLOCK, op=op, length=nb * BLOCK))
    return out


def connection_streams(data, seqs: list[int], label: str) -> list[list[tuple[str, int]]]:
    """Split *seqs* over 1-3 connections; each sends a seq's token before
    its data, otherwise in any order. Events are ("T"|"D", seq)."""
    nconn = data.draw(st.integers(1, 3), label=f"{label} connections")
    owner = {s: data.draw(st.integers(0, nconn - 1)) for s in seqs}
    streams = []
    for c in range(nconn):
        mine = [s for s in seqs if owner[s] == c]
        evs = data.draw(st.permutations([("T", s) for s in mine] + [("D", s) for s in mine]))
        evs = list(evs)
        where = {e: i for i, e in enumerate(evs)}
        for s in mine:  # token before data on this connection
            t, d = where[("T", s)], where[("D", s)]
            if d < t:
                evs[t], evs[d] = evs[d], evs[t]
        streams.append(evs)
    return streams


def interleave(data, streams) -> list[tuple[str, int]]:
    """One arrival order of several connections' frames."""
    streams = [list(s) for s in streams if s]
    out = []
    while streams:
        i = data.draw(st.integers(0, len(streams) - 1))
        out.append(streams[i].pop(0))
        if not streams[i]:
            streams.pop(i)
    return out


def check_image(fd: int, images: dict[int, bytes], applied: int) -> None:
    got = read_file(fd, SIZE)
    assert got == images[applied], (f"image after applying through seq {applied} is not "
                                    f"the primary's: {first_diff(got, images[applied])}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(), data=st.data())
def test_any_arrival_order_over_several_connections_applies_a_prefix(history, data):
    n = len(history)
    images = prefix_images(SIZE, history)
    seqs = list(range(1, n + 1))
    # Some writes never make it (the primary died): their token, or only their data.
    lost_data = set(data.draw(st.lists(st.sampled_from(seqs), max_size=2), label="lost data"))
    lost_token = {s for s in lost_data if data.draw(st.booleans())}
    streams = connection_streams(data, seqs, "first")
    # A reconnect re-sends some records (token, then data) on a new connection.
    resent = data.draw(st.lists(st.sampled_from(seqs), max_size=4, unique=True), label="resent")
    streams.append([e for s in resent for e in (("T", s), ("D", s))])
    arrivals = [e for e in interleave(data, streams)
                if not (e[1] in lost_token or (e[0] == "D" and e[1] in lost_data))]
    run_cap = data.draw(st.sampled_from([None, 1, 2, 5]), label="max_records")

    with tempfile.TemporaryDirectory() as tmp:
        fd = os.open(os.path.join(tmp, "image"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, SIZE)
            q = PendingQueue(0)
            applied = 0
            for kind, seq in arrivals:
                tok, raw = history[seq - 1]
                if kind == "T":
                    q.add_tokens([tok])
                else:
                    q.add_record(tok, raw)
                while run := q.next_run(max_records=run_cap):
                    seqs_run = [t.seq for t, _ in run]
                    assert seqs_run == list(range(applied + 1, applied + 1 + len(run)))
                    apply_run({0: fd}, (record_data(r) for _, r in run))
                    q.mark_applied(seqs_run[-1])
                    applied = q.applied_through
                    check_image(fd, images, applied)
                assert q.received_through == applied  # everything ready was applied
            missing = sorted(lost_data)
            expect = missing[0] - 1 if missing else n
            assert q.applied_through == expect
            check_image(fd, images, expect)
            if missing:
                assert q.first_gap() == (missing[0], missing[0] not in lost_token) or (
                    q.first_gap() is None and missing[0] > q.highest_token_seq)
                report_seqs = [s for e in q.loss_view().entries for s in range(e.seq, e.seq + e.count)]
                assert report_seqs == list(range(expect + 1, q.highest_token_seq + 1))
            else:
                assert q.first_gap() is None and len(q) == 0
        finally:
            os.close(fd)


class _Secondary:
    """The receiver + applier loop, as the daemon will run it, minus sockets."""

    def __init__(self, jpath: str, image_fd: int, images: dict[int, bytes], create: bool):
        self.jpath, self.fd, self.images = jpath, image_fd, images
        if create:
            self.j = Journal.create(jpath, UUID, AREA_START + 256 * 1024)
            self.q = PendingQueue(0)
        else:
            self.j = Journal.open(jpath, UUID)
            self.q = PendingQueue.rebuild(self.j.applied_seq, self.j.replay(),
                                          self.j.applied_token)
        self.uncommitted = []  # (token, pos) appended, not yet durable
        self.entry_offsets = []  # header offsets of uncommitted entries

    def receive(self, kind: str, tok, raw: bytes, journal_token: bool) -> None:
        if kind == "T":
            if journal_token:
                self._room(48)
                self.j.append_tokens(tok.pack())
            self.q.add_tokens([tok])
        elif self.q.check_record(tok):
            self._room(len(raw))
            (_, pos), = self.j.append(raw)
            self.uncommitted.append((tok, pos))
            self.entry_offsets.append(pos.offset - 40)

    def _room(self, n: int) -> None:
        if not self.j.has_room(n):  # backpressure: let the applier free space
            self.commit_and_apply(checkpoint=True)
        assert self.j.has_room(n), "journal deadlocked"

    def commit_and_apply(self, checkpoint: bool) -> None:
        self.j.commit()
        for tok, pos in self.uncommitted:  # only durable records are applied
            self.q.add_record(tok, pos)
        self.uncommitted.clear()
        self.entry_offsets.clear()
        self.apply()
        if checkpoint:
            os.fdatasync(self.fd)
            self.j.checkpoint(self.q.applied_through, self.q.applied_token)

    def apply(self) -> None:
        while run := self.q.next_run():
            apply_run({0: self.fd}, (record_data(self.j.read_record(p)) for _, p in run))
            self.q.mark_applied(run[-1][0].seq)
            check_image(self.fd, self.images, self.q.applied_through)

    def crash(self, torn: list[bool]) -> None:
        """Power loss: each uncommitted entry may or may not have reached the disk."""
        self.j.close()
        fd = os.open(self.jpath, os.O_WRONLY)
        try:
            for off, lost in zip(self.entry_offsets, torn):
                if lost:
                    os.pwrite(fd, b"\xff" * 40, off)
        finally:
            os.close(fd)


def mostly_in_order(rnd: random.Random, seqs: list[int]) -> list[tuple[str, int]]:
    """Arrivals as a live primary produces them: 1-3 connections, each
    sending tokens and then data roughly in seq order, with some data
    overtaking or lagging; connections interleave at random."""
    nconn = rnd.randint(1, 3)
    streams: list[list[tuple[str, int]]] = [[] for _ in range(nconn)]
    for s in seqs:
        streams[rnd.randrange(nconn)] += [("T", s), ("D", s)]
    for evs in streams:
        for _ in range(len(evs) // 2):
            i = rnd.randrange(max(1, len(evs) - 1))
            if i + 1 < len(evs) and evs[i] != ("T", evs[i + 1][1]):
                evs[i], evs[i + 1] = evs[i + 1], evs[i]
    out = []
    streams = [e for e in streams if e]
    while streams:
        i = rnd.randrange(len(streams))
        out.append(streams[i].pop(0))
        if not streams[i]:
            streams.pop(i)
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories(max_len=20), rnd=st.randoms(use_true_random=False))
def test_secondary_crash_and_journal_replay_keep_the_image_a_prefix(history, rnd):
    """Restart: kill the secondary with a non-empty queue; after
    restart nothing is skipped and re-applying changes nothing."""
    n = len(history)
    images = prefix_images(SIZE, history)
    arrivals = mostly_in_order(rnd, list(range(1, n + 1)))
    crash_at = rnd.randint(len(arrivals) // 3, len(arrivals))
    with tempfile.TemporaryDirectory() as tmp:
        fd = os.open(os.path.join(tmp, "image"), os.O_RDWR | os.O_CREAT, 0o600)
        jpath = os.path.join(tmp, "journal")
        try:
            os.ftruncate(fd, SIZE)
            sec = _Secondary(jpath, fd, images, create=True)
            for kind, seq in arrivals[:crash_at]:
                tok, raw = history[seq - 1]
                sec.receive(kind, tok, raw, rnd.random() < 0.3)
                if rnd.random() < 0.3:  # group commit now and then
                    sec.commit_and_apply(checkpoint=rnd.random() < 0.5)
            applied_before = sec.q.applied_through
            torn = [rnd.random() < 0.5 for _ in sec.entry_offsets]
            sec.crash(torn)

            sec = _Secondary(jpath, fd, images, create=False)
            # Replay: everything applied before the crash was journaled, so the
            # first run brings the image back to at least where it was.
            sec.apply()
            assert sec.q.applied_through >= applied_before
            check_image(fd, images, sec.q.applied_through)
            # The primary reconnects and re-sends all it has not seen journaled.
            rest = list(range(sec.q.received_through + 1, n + 1))
            for kind, seq in mostly_in_order(rnd, rest):
                tok, raw = history[seq - 1]
                sec.receive(kind, tok, raw, rnd.random() < 0.3)
                if rnd.random() < 0.3:
                    sec.commit_and_apply(checkpoint=rnd.random() < 0.5)
            sec.commit_and_apply(checkpoint=True)
            assert sec.q.applied_through == n and len(sec.q) == 0
            check_image(fd, images, n)
            sec.j.close()
            with Journal.open(jpath, UUID) as j:
                assert j.applied_seq == n and list(j.replay()) == []
        finally:
            os.close(fd)

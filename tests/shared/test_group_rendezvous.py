"""The rendezvous master's rule (replicator/group/rendezvous.py) with real
member secondaries around it: each member is a real pending queue fed real
records (records.encode_record; group markers are OP_MARK records carrying
their MarkNote), a journal file holding them at their locations, an image
file written by the C applier, and a MemberGate persisting group.json.
Every message between a member and the master goes through the group
protocol's schema (make, encode, decode) as on the wire.

Mode checkpoint (seed 000): the worked example of note §2.10 step by step,
with the timestamp filter (W3, stamped after checkpoint T, arrives before
the checkpoint and is not applied), the rendezvous gate (behaviour 6), the
zero-update member (11), reset only after all (12), resign via the member
list (13), numbering, one release in flight and coalescing, freeze, clock
skew, and a master restart. Mode limit-time (seed 002 §6 C, D): AT-15..20
and heartbeat advance (AT-37)."""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings, strategies as st

from replicator.group.clock import SkewEstimator
from replicator.group.member import Mark, MemberGate
from replicator.group.notes import MarkNote
from replicator.group.rendezvous import Release, Rendezvous
from replicator.protocol.group import decode, encode, make
from replicator.records import HEADER_SIZE, OP_MARK, OP_WRITE, encode_record, iter_records
from replicator.secondary.pending import PendingQueue

T0 = 1_800_000_000_000_000_000  # ns, like CLOCK_REALTIME
MS = 1_000_000
BLOCK = 512
IMAGE = 64 * BLOCK
MAX_SKEW_US = 5_000
ALL = ("r1", "r2", "r3", "r4")


# -- the pieces around the master ----------------------------------------------


class Primary:
    """A member's primary, as far as its stream goes: records with
    consecutive seqs, stamped with the times the test gives (the C core's
    stamping is tested in tests/native/test_native_mark.py)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0

    def write(self, ts: int, block: int, fill: bytes) -> bytes:
        self.seq += 1
        return encode_record(self.seq, ts, block * BLOCK, BLOCK, OP_WRITE, fill * BLOCK)

    def mark(self, n: int, t: int, members=ALL, skew_us: int | None = 0) -> bytes:
        """Checkpoint n (0: a heartbeat) at T = t, as the core inserts it."""
        self.seq += 1
        note = MarkNote("g0", n, tuple(members), skew_us).encode()
        return encode_record(self.seq, t, n, len(note), OP_MARK, note)


class Secondary:
    """A member's secondary: pending queue, journal file, image file, gate."""

    def __init__(self, name: str, root: Path, mode: str) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.gate = MemberGate(self.dir / "group.json", "g0", mode, name)
        self.q = PendingQueue(0)
        self.q.set_ts_bound(self.gate.bound())
        self.jfd = os.open(self.dir / "journal", os.O_RDWR | os.O_CREAT, 0o600)
        self.ifd = os.open(self.dir / "image", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.ifd, IMAGE)
        self.jlen = 0
        self.journaled = 0
        self.complete_sent: int | None = None

    def close(self) -> None:
        os.close(self.jfd)
        os.close(self.ifd)

    def receive(self, *recs: bytes) -> list:
        """A DATA frame of *recs* (their tokens first, as on the link):
        queued, journaled, committed; the messages for the master."""
        payload = b"".join(recs)
        self.q.add_token_bytes(b"".join(r[:HEADER_SIZE] for r in recs))
        os.pwrite(self.jfd, payload, self.jlen)
        self.q.add_frame(payload, self.jlen)
        self.jlen += len(payload)
        marks = [Mark(t.seq, t.ts_ns, MarkNote.decode(d)) for t, d in iter_records(payload)
                 if t.op == OP_MARK]
        self.gate.on_marks(marks)
        self.journaled = self.q.received_through  # the journal commit
        return self.gate.on_journaled(self.journaled, self.q.stamp_of(self.journaled))

    def on_release(self, n: int, t: int) -> list:
        """As SecondaryGroup._on_release: arm the bound, or answer an old
        release already finished with a complete (seq 0)."""
        bound = self.gate.on_release(n, t)
        if bound is not None:
            self.q.set_ts_bound(bound)
        elif self.gate.in_progress is None:
            return [("complete", {"member": self.name, "n": n, "seq": 0})]
        return []

    def apply(self) -> int:
        """The applier: every run the bound lets through, into the image;
        the applied seq persisted after each (the metadata's, in the daemon)."""
        done = 0
        while (n := self.q.take_run()) > 0:
            self.q.apply_taken(self.jfd, self.ifd, IMAGE)
            self.q.mark_applied(self.q.run_end)
            (self.dir / "applied").write_text(str(self.q.applied_through))
            done += n
        return done

    def restart(self) -> None:
        """kill -9 and start again: the gate from group.json, the queue
        rebuilt from the journal after the persisted applied seq, the
        journal's markers held again (behaviours 10 and 19)."""
        self.close()
        self.jfd = os.open(self.dir / "journal", os.O_RDWR)
        self.ifd = os.open(self.dir / "image", os.O_RDWR)
        self.gate = MemberGate(self.dir / "group.json", "g0", self.mode, self.name)
        f = self.dir / "applied"
        applied = int(f.read_text()) if f.exists() else 0
        items, marks, off = [], [], 0
        for tok, data in iter_records(os.pread(self.jfd, self.jlen, 0)):
            if tok.seq > applied:
                items.append((tok, off))
                if tok.op == OP_MARK:
                    marks.append(Mark(tok.seq, tok.ts_ns, MarkNote.decode(data)))
            off += tok.size
        self.q = PendingQueue.rebuild(applied, items)
        self.q.set_ts_bound(self.gate.bound())
        self.journaled = self.q.received_through
        self.gate.on_marks(sorted(marks, key=lambda m: m.seq))
        self.gate.on_journaled(self.journaled, self.q.stamp_of(self.journaled))
        self.complete_sent = None

    def applied_to_bound(self) -> bool:
        """No write journaled and stamped at or before the bound is left
        (markers, which carry no data, aside)."""
        bound = self.gate.bound()
        for e in self.q.loss_view().entries:
            if e.token is None or e.token.seq > self.journaled:
                return True
            if e.token.op != OP_MARK:
                return e.token.ts_ns > bound
        return True

    def poll(self) -> list:
        """The agent's poll: ``complete`` once nothing journaled at or
        before the bound is left to apply."""
        n = self.gate.in_progress
        if n is None or self.complete_sent == n:
            return []
        if not self.q.bound_reached(self.gate.bound(), self.journaled):
            return []
        self.complete_sent = n
        return [("complete", {"member": self.name, "n": n, "seq": self.q.applied_through})]

    def block(self, i: int) -> bytes:
        return os.pread(self.ifd, BLOCK, i * BLOCK)


def wire(mtype: str, fields: dict):
    """*fields* as the master receives them: checked, encoded, decoded."""
    msg = decode(encode(make(mtype, **fields))[16:])
    assert msg.type == mtype
    return msg


class Group:
    """Members and the rendezvous master, wired by direct calls."""

    def __init__(self, root: Path, mode: str = "checkpoint", names=ALL,
                 max_skew_us: int = MAX_SKEW_US) -> None:
        self.root = root
        self.mode = mode
        self.names = tuple(names)
        self.max_skew_us = max_skew_us
        self.p = {n: Primary(n) for n in self.names}
        self.s = {n: Secondary(n, root, mode) for n in self.names}
        self.sent: list[tuple[str, str, Release]] = []  # (kind, to member, point)
        self.connected: set[str] = set()
        self.rdv = self.new_master()

    def new_master(self, joining=None) -> Rendezvous:
        """A (re)started master; the members *joining* (all by default)
        (re)connect and say hello; the others have no link to it yet."""
        self.rdv = Rendezvous("g0", self.mode, self.names, self.max_skew_us)
        self.connected = set()
        for name in (self.names if joining is None else joining):
            self.connect(name)
        return self.rdv

    def connect(self, name: str) -> None:
        self.connected.add(name)
        self.s[name].complete_sent = None  # say it again to this master
        self.to_master(*self.s[name].gate.hello())
        for mtype, fields in self.s[name].gate.report():  # it may have restarted
            self.to_master(mtype, fields)

    def to_master(self, mtype: str, fields: dict) -> None:
        f = wire(mtype, fields).fields
        if mtype == "join":
            out = self.rdv.joined(f["member"], Release(f["released_n"], f["released_t"]),
                                  f["in_progress"])
        elif mtype == "held":
            out = self.rdv.held(f["member"], f["n"], f["t"], f["skew_us"],
                                tuple(f["members"]))
        elif mtype == "watermark":
            out = self.rdv.watermark(f["member"], f["t"], f["skew_us"], tuple(f["members"]))
        elif mtype == "complete":
            out = self.rdv.complete(f["member"], f["n"], f["seq"])
        elif mtype == "resign":
            out = self.rdv.resign(f["member"], f["reason"])
        else:
            raise AssertionError(mtype)
        self.route(out)

    def route(self, out: list) -> None:
        """The master's messages, to each member it has a link to (a
        broadcast reaches the connected ones only)."""
        for kind, member, rel in out:
            for name in ([member] if member is not None else self.names):
                self.sent.append((kind, name, rel))
                if name not in self.connected:
                    continue
                if kind == "release":
                    wire("release", {"n": rel.n, "t": rel.t})
                    for mtype, fields in self.s[name].on_release(rel.n, rel.t):
                        self.to_master(mtype, fields)
                else:
                    assert kind == "reset", kind
                    wire("reset", {"n": rel.n})
                    sec = self.s[name]
                    # Behaviour 12, everywhere: the fence of a member still
                    # applying its release is not lifted under it (unless
                    # it has resigned).
                    assert (sec.gate.in_progress != rel.n or sec.gate.resigned is not None
                            or sec.applied_to_bound()), \
                        f"reset of {rel.n} reached {name} before it completed it"
                    sec.gate.on_reset(rel.n)

    def deliver(self, name: str, *recs: bytes) -> None:
        for mtype, fields in self.s[name].receive(*recs):
            self.to_master(mtype, fields)

    def checkpoint(self, n: int, t: int, members=None, to=None, skew_us: int | None = 0) -> None:
        """The primary master's checkpoint (n, T): each primary in *to*
        inserts it into its stream and its secondary receives it."""
        members = self.names if members is None else members
        for name in (self.names if to is None else to):
            self.deliver(name, self.p[name].mark(n, t, members, skew_us))

    def apply_and_poll(self, name: str) -> int:
        applied = self.s[name].apply()
        for mtype, fields in self.s[name].poll():
            self.to_master(mtype, fields)
        return applied

    def settle(self, names=None) -> None:
        for name in (self.names if names is None else names):
            self.apply_and_poll(name)

    def kinds(self, since: int = 0) -> list[tuple[str, str, int]]:
        return [(k, m, r.n) for k, m, r in self.sent[since:]]

    def in_progress(self) -> dict[str, int | None]:
        return {n: self.s[n].gate.in_progress for n in self.names}


@pytest.fixture
def make_group(tmp_path):
    made: list[Group] = []

    def make_(**kw) -> Group:
        g = Group(tmp_path / f"g{len(made)}", **kw)
        made.append(g)
        return g

    yield make_
    for g in made:
        for s in g.s.values():
            s.close()


A, B, C, D = T0 + 100 * MS, T0 + 200 * MS, T0 + 300 * MS, T0 + 400 * MS
W1, W2, W3 = b"1", b"2", b"3"


def visible(g: Group) -> set[str]:
    """Which of W1 (r1 block 0), W2 (r2 block 0), W3 (r1 block 1) the
    secondary images show."""
    out = set()
    if g.s["r1"].block(0) == W1 * BLOCK:
        out.add("W1")
    if g.s["r2"].block(0) == W2 * BLOCK:
        out.add("W2")
    if g.s["r1"].block(1) == W3 * BLOCK:
        out.add("W3")
    return out


# -- checkpoint mode: seed 000's worked example (note §2.10) ---------------------


def test_the_worked_example_step_by_step_with_the_timestamp_filter(make_group):
    """P3 is the checkpoint master, S4 the rendezvous master (roles the
    sans-IO rule does not see: it runs wherever its caller runs it). Times
    a < b < c; checkpoint n=1 at T=b; W3 (c) reaches S1 before it."""
    g = make_group()
    allowed_unfenced = [set(), {"W1", "W2"}]

    def check(step: str) -> None:
        # Whenever no member is mid-apply, the secondary set is {} or {W1, W2}
        # (L230); mid-apply the images are fenced (update-in-progress).
        if all(v is None for v in g.in_progress().values()):
            assert visible(g) in allowed_unfenced, f"step {step}: {visible(g)}"

    # 2-4: W1 completes on P1 at a; P1 sends it; S1 buffers, applies nothing.
    w1 = g.p["r1"].write(A, 0, W1)
    g.deliver("r1", w1)
    assert g.apply_and_poll("r1") == 0
    assert g.s["r1"].block(0) == bytes(BLOCK) and len(g.s["r1"].q) == 1
    # 3: W2 completes on P2 at b (sent at step 10).
    w2 = g.p["r2"].write(B, 0, W2)
    # 5: checkpoint (1, b) to the primaries. 6-7: W3 at c on P1, sent ahead
    # of the checkpoint (stamped after T, queued before P1 inserted it).
    w3 = g.p["r1"].write(C, 1, W3)
    g.deliver("r1", w3)
    check("7")
    # 8-9: P1 sends checkpoint 1; S1 holds it and forwards it to the master.
    g.deliver("r1", g.p["r1"].mark(1, B))
    assert g.rdv.members["r1"].held_n == 1
    assert g.kinds() == [] and g.rdv.blocked == "waiting for the first marker from r2, r3, r4"
    # 10-12: P2 sends W2 then checkpoint 1.
    g.deliver("r2", w2)
    g.deliver("r2", g.p["r2"].mark(1, B))
    assert g.kinds() == []
    check("12")
    # 13: P3 and P4 send checkpoint 1 (they have no writes): rendezvous done.
    g.deliver("r3", g.p["r3"].mark(1, B))
    assert g.kinds() == []  # S4's copy is still missing: behaviour 6
    g.deliver("r4", g.p["r4"].mark(1, B))
    # 14: release (1, b) to every member; each persists update-in-progress.
    assert g.kinds() == [("release", m, 1) for m in ALL]
    assert all(r.t == B for _, _, r in g.sent)
    assert g.in_progress() == {m: 1 for m in ALL}
    assert all(MemberGate(g.s[m].dir / "group.json", "g0", "checkpoint", m).in_progress == 1
               for m in ALL)
    # 15: S3 has nothing to apply and completes at once (behaviour 11).
    g.apply_and_poll("r3")
    assert g.rdv.waiting == {"r1", "r2", "r4"}
    assert g.kinds(4) == []  # no reset yet (behaviour 12)
    # 16: S1 applies W1 (a <= b) and not W3 (c > b), then completes.
    assert g.apply_and_poll("r1") == 1
    assert g.s["r1"].block(0) == W1 * BLOCK
    assert g.s["r1"].block(1) == bytes(BLOCK)  # W3 stays buffered
    assert g.s["r1"].q.applied_through == 1 and len(g.s["r1"].q) == 2
    assert g.rdv.members["r1"].applied_seq == 1
    assert g.kinds(4) == [] and g.in_progress()["r1"] == 1
    # 17: S2 applies W2 and completes.
    g.apply_and_poll("r2")
    assert g.s["r2"].block(0) == W2 * BLOCK
    assert g.kinds(4) == []  # S4 has not completed: still fenced
    # 18: S4 completes; the master resets update-in-progress everywhere.
    g.apply_and_poll("r4")
    assert g.kinds(4) == [("reset", m, 1) for m in ALL]
    assert g.in_progress() == {m: None for m in ALL}
    assert visible(g) == {"W1", "W2"}
    check("18")
    # The next checkpoint n=2 at T' = d >= c releases W3.
    g.checkpoint(2, D)
    assert g.kinds(8) == [("release", m, 2) for m in ALL]
    g.settle()
    assert visible(g) == {"W1", "W2", "W3"}
    assert g.in_progress() == {m: None for m in ALL}
    assert all(len(g.s[m].q) == 0 for m in ALL)  # every marker applied too


def test_without_the_rendezvous_the_example_shows_a_forbidden_state(make_group):
    """The control that gives the example its teeth: each secondary
    applying what it has at step 9 (no bound, no rendezvous) shows W3
    without W2 -- what the group exists to prevent."""
    g = make_group()
    g.deliver("r1", g.p["r1"].write(A, 0, W1), g.p["r1"].write(C, 1, W3),
              g.p["r1"].mark(1, B))
    g.s["r1"].q.set_ts_bound(0)  # no group
    g.s["r1"].apply()
    assert visible(g) == {"W1", "W3"}


def test_rendezvous_gate_nothing_is_released_while_one_member_lacks_n(make_group):
    """Behaviour 6: checkpoint 1 is held back from S2 (its link is slow);
    S1, S3 and S4 hold it, and no member applies anything until S2's copy
    reaches the master; then all of them do."""
    g = make_group()
    g.deliver("r1", g.p["r1"].write(A, 0, W1))
    g.deliver("r2", g.p["r2"].write(B, 0, W2))
    g.checkpoint(1, B, to=("r1", "r3", "r4"))
    for _ in range(3):
        g.settle()
        g.deliver("r1", g.p["r1"].write(C + _ * MS, 2 + _, b"x"))
    assert g.kinds() == [] and visible(g) == set()
    assert g.rdv.blocked == "waiting for the first marker from r2"
    assert all(g.s[m].gate.bound() == 1 for m in ALL)
    g.checkpoint(1, B, to=("r2",))
    assert [k for k, _, _ in g.sent] == ["release"] * 4
    g.settle()
    assert visible(g) == {"W1", "W2"}


def test_checkpoints_are_numbered_and_each_member_sees_every_one(make_group):
    """Behaviour 3: k intervals, released in order n0..n0+k-1 with T
    strictly increasing; each release is reset before the next one."""
    g = make_group()
    releases = []
    for n in range(1, 8):
        g.deliver("r1", g.p["r1"].write(T0 + n * 10 * MS - 5 * MS, n, bytes([n])))
        g.checkpoint(n, T0 + n * 10 * MS)
        rel = [r for k, m, r in g.sent if k == "release" and m == "r1"]
        assert rel[-1].n == n
        releases.append((rel[-1].n, rel[-1].t))
        g.settle()
        assert g.rdv.in_progress is None
    assert [n for n, _ in releases] == list(range(1, 8))
    assert all(a[1] < b[1] for a, b in itertools.pairwise(releases))
    assert g.kinds().count(("reset", "r3", 7)) == 1
    assert all(g.s["r1"].block(n) == bytes([n]) * BLOCK for n in range(1, 8))


def test_one_release_is_in_flight_at_a_time_and_the_next_coalesces(make_group):
    g = make_group()
    g.checkpoint(1, A)
    assert g.rdv.in_progress == Release(1, A)
    mark = len(g.sent)
    # Checkpoints 2 and 3 are held everywhere while 1 is being applied.
    g.deliver("r2", g.p["r2"].write(B - MS, 0, W2))
    g.checkpoint(2, B)
    g.deliver("r1", g.p["r1"].write(C - MS, 0, W1))
    g.checkpoint(3, C)
    assert g.kinds(mark) == []  # nothing new while 1 is in progress
    g.settle(("r1", "r2", "r3"))
    assert g.kinds(mark) == []
    g.apply_and_poll("r4")  # the last complete of 1: its reset, then 3
    assert g.kinds(mark) == ([("reset", m, 1) for m in ALL]
                             + [("release", m, 3) for m in ALL])
    assert g.rdv.released == Release(3, C)
    g.settle()
    assert visible(g) == {"W1", "W2"}


def test_a_frozen_master_releases_nothing(make_group):
    g = make_group()
    g.deliver("r1", g.p["r1"].write(A, 0, W1))
    g.rdv.freeze()
    g.checkpoint(1, B)
    assert g.kinds() == [] and g.rdv.blocked == "frozen: a promotion is under way"
    assert visible(g) == set()
    assert g.rdv.view()["frozen"] is True


def test_a_release_in_progress_finishes_when_the_master_freezes(make_group):
    g = make_group()
    g.checkpoint(1, A)
    g.rdv.freeze()
    g.settle()
    assert [k for k, _, _ in g.sent].count("reset") == 4
    g.checkpoint(2, B)
    assert g.rdv.released.n == 1 and g.rdv.in_progress is None


def test_resign_a_member_missing_from_the_newest_markers_member_list_is_not_waited_for(
        make_group):
    """Behaviour 13: P2 is lost; the primary master's table drops r2 from
    checkpoint 2 on. The others go on without S2, which stays frozen at its
    last applied checkpoint."""
    g = make_group()
    g.deliver("r2", g.p["r2"].write(A, 0, W2))
    g.checkpoint(1, B)
    g.settle()
    assert visible(g) == {"W2"}
    # P2 is gone; r2 holds nothing newer. While the newest marker still
    # lists r2, nobody advances.
    g.deliver("r1", g.p["r1"].write(B + MS, 0, W1))
    g.checkpoint(2, C, to=("r1", "r3", "r4"))
    assert g.rdv.in_progress is None and "r2" in g.rdv.blocked
    assert g.rdv.blocked == "waiting for r2 to hold checkpoint 2"
    # Checkpoint 3 lists r1, r3, r4 only: r2 has resigned, and from the
    # first marker that says so nothing waits for it: the highest point the
    # others all hold (2, held by r3 and r4 so far) goes out at once.
    g.checkpoint(3, D, members=("r1", "r3", "r4"), to=("r1", "r3", "r4"))
    assert g.kinds(8) == [("release", m, 2) for m in ("r1", "r3", "r4")]
    assert g.rdv.waiting == {"r1", "r3", "r4"}
    g.settle(("r1", "r3", "r4"))
    assert g.kinds(11) == ([("reset", m, 2) for m in ALL]
                           + [("release", m, 3) for m in ("r1", "r3", "r4")])
    g.settle(("r1", "r3", "r4"))
    assert g.kinds(18) == [("reset", m, 3) for m in ALL]
    assert visible(g) == {"W1", "W2"}
    assert g.rdv.view()["members"]["r2"]["state"] == "resigned"
    assert g.s["r2"].gate.released_n == 1  # frozen at its last checkpoint


def test_a_resign_message_releases_the_others_and_finishes_a_release_in_progress(make_group):
    """A member catching up resigns by message (gate.catching_up): the
    rendezvous stops waiting for it, including for the release in
    progress, and its join brings it back."""
    g = make_group()
    g.checkpoint(1, A)
    g.settle(("r1", "r3", "r4"))
    assert g.rdv.waiting == {"r2"}
    for mtype, fields in g.s["r2"].gate.catching_up(base_seq=50):
        g.to_master(mtype, fields)
    assert g.kinds(4) == [("reset", m, 1) for m in ALL]
    g.checkpoint(2, B, to=("r1", "r3", "r4"))
    assert g.kinds(8) == [("release", m, 2) for m in ("r1", "r3", "r4")]
    g.settle()
    # The increment brings r2's image to seq 60; it streams again from 61,
    # and a marker past the increment's base rejoins it.
    g.s["r2"].q.rebase(60)
    g.p["r2"].seq = 60
    g.checkpoint(3, C)
    assert g.rdv.members["r2"].resigned is None
    # It missed release 2: it gets it first, alone, then 3 with the others.
    assert ("release", "r2", 2) in g.kinds()
    g.settle()
    assert ("release", "r2", 3) in g.kinds()
    g.settle()
    assert g.in_progress() == {m: None for m in ALL} and g.rdv.released.n == 3


def test_skew_above_the_bound_blocks_with_a_reason(make_group):
    g = make_group()
    g.checkpoint(1, A, to=("r1", "r2", "r4"))
    g.deliver("r3", g.p["r3"].mark(1, A, skew_us=MAX_SKEW_US + 1500))
    assert g.kinds() == []
    assert g.rdv.blocked == ("the clock of r3's primary is 6.5 ms off the primary master's "
                             "(max-clock-skew 5 ms): no release until the clocks agree "
                             "(check NTP on the primaries)")
    assert g.rdv.view()["members"]["r3"]["skew_us"] == MAX_SKEW_US + 1500
    # Its next marker, with the clocks agreeing again, lets through what
    # everybody holds by then (1: r4 has not got 2 yet), then 2.
    g.checkpoint(2, B, skew_us=MAX_SKEW_US)
    assert g.kinds() == [("release", m, 1) for m in ALL]
    g.settle()
    assert g.kinds(4) == [("reset", m, 1) for m in ALL] + [("release", m, 2) for m in ALL]
    assert g.rdv.blocked is None


def test_an_unmeasured_skew_blocks(make_group):
    g = make_group()
    g.checkpoint(1, A, to=("r1", "r2", "r3"))
    g.deliver("r4", g.p["r4"].mark(1, A, skew_us=None))
    assert g.kinds() == []
    assert g.rdv.blocked == "the clock skew of r4's primary is not measured yet"


def test_an_injected_clock_offset_measured_by_pings_blocks_releases():
    """The estimator's offset (NTP's, the sample of least round trip) is
    what a note carries; 8 ms off with a 5 ms bound: no release."""
    est = SkewEstimator()
    assert est.skew_us() is None
    offset = 8 * MS
    for k, rtt in enumerate((900_000, 300_000, 2_000_000)):
        t0 = T0 + k * 10 * MS
        # The master stamps at the middle of the round trip, +offset.
        est.sample(t0, t0 + rtt // 2 + offset + (50_000 if rtt != 300_000 else 0), t0 + rtt)
    est.sample(T0 + 5, T0, T0)  # t3 < t0: ignored
    assert est.offset_ns() == offset and est.rtt_ns() == 300_000
    assert est.skew_us() == 8000
    rdv = Rendezvous("g0", "checkpoint", ("r1", "r2"), MAX_SKEW_US)
    assert rdv.held("r1", 1, A, 0, ("r1", "r2")) == []
    assert rdv.held("r2", 1, A, est.skew_us(), ("r1", "r2")) == []
    assert "8.0 ms off" in rdv.blocked
    est2 = SkewEstimator()
    est2.sample(T0, T0 + 1_000 - 4 * MS, T0 + 2_000)  # 4 ms behind
    assert est2.offset_ns() == -4 * MS and est2.skew_us() == 4000
    out = rdv.held("r2", 2, B, est2.skew_us(), ("r1", "r2"))  # 4 ms: within the bound
    assert [(k, m, r.n) for k, m, r in out] == [("release", "r1", 1), ("release", "r2", 1)]


def test_a_restarted_master_adopts_the_released_point_and_resends_the_release_in_progress(
        make_group):
    g = make_group()
    g.deliver("r1", g.p["r1"].write(A, 0, W1))
    g.checkpoint(1, B)
    g.settle()
    g.deliver("r1", g.p["r1"].write(C, 1, W3))
    g.checkpoint(2, D)
    assert g.rdv.in_progress == Release(2, D)
    # Every member is told release 2; none has applied it when the master
    # dies. A new master knows nothing until the members join.
    mark = len(g.sent)
    rdv = g.new_master()
    assert rdv.released == Release(2, D)
    assert rdv.in_progress == Release(2, D)
    assert g.kinds(mark) == [("release", m, 2) for m in ALL]  # re-sent on each join
    assert rdv.waiting == set(ALL)
    g.settle()
    assert g.kinds(mark + 4) == [("reset", m, 2) for m in ALL]
    assert visible(g) == {"W1", "W3"}
    # It goes on from there: checkpoint 3 releases once all hold it (the new
    # master heard of no marker yet: it waits for each member's next one).
    g.checkpoint(3, D + MS)
    assert ("release", "r4", 3) in g.kinds()



@pytest.mark.parametrize("order", [
    ("r1", "r2", "r3", "r4"),
    ("r4", "r1", "r2", "r3"),
], ids=["behind-joins-last", "behind-joins-first"])
def test_a_restarted_master_catches_up_a_member_that_missed_a_release(make_group, order):
    """r4's link is down when release 2 goes out; the master dies waiting
    for r4's complete. Whatever order the members join the new master in,
    r4 gets release 2 and the reset of 2 waits for its complete."""
    g = make_group()
    g.checkpoint(1, A)
    g.settle()
    g.deliver("r4", g.p["r4"].write(A + MS, 0, b"4"))
    g.checkpoint(2, B, to=("r4", "r1", "r2"))
    g.connected.discard("r4")  # r4's group link drops
    g.checkpoint(2, B, to=("r3",))
    assert g.rdv.in_progress == Release(2, B) and g.in_progress()["r4"] is None
    g.settle(("r1", "r2", "r3"))
    assert g.rdv.waiting == {"r4"}
    mark = len(g.sent)
    rdv = g.new_master(joining=order)
    assert rdv.released == Release(2, B)
    assert ("release", "r4", 2) in g.kinds(mark)
    assert g.in_progress()["r4"] == 2
    g.settle()
    assert g.s["r4"].block(0) == b"4" * BLOCK
    resets = [m for k, m, _ in g.sent[mark:] if k == "reset"]
    assert "r4" in resets and g.in_progress() == {m: None for m in ALL}


def test_a_restarted_master_resets_only_after_every_member_completed(make_group):
    """(group_bugs.md, fixed in 3de3b7a: the reset went out on the first
    joiner's complete.)"""
    g = make_group()
    g.deliver("r2", g.p["r2"].write(A, 0, W2))
    g.checkpoint(1, B)
    assert g.in_progress() == {m: 1 for m in ALL}
    g.apply_and_poll("r1")  # r1 is done; r2..r4 have not applied yet
    # The master restarts; only r1 has reconnected so far.
    mark = len(g.sent)
    g.new_master(joining=("r1",))
    g.apply_and_poll("r1")  # its complete, again, to the new master
    # r2 still has update-in-progress 1 (W2 not applied) and has not told
    # the new master yet: a reset now would end the group's fence early.
    assert g.in_progress()["r2"] == 1 and visible(g) == set()
    assert [k for k, _, _ in g.sent[mark:]].count("reset") == 0, g.kinds(mark)
    for m in ("r2", "r3", "r4"):
        g.connect(m)
    g.settle()
    assert g.kinds(mark).count(("reset", "r2", 1)) == 1
    assert visible(g) == {"W2"}


def test_a_late_complete_for_an_old_release_keeps_the_members_applied_seq():
    rdv = Rendezvous("g0", "checkpoint", ("r1", "r2"), MAX_SKEW_US)
    for m in ("r1", "r2"):
        rdv.joined(m, Release(0, 0), None)
        rdv.held(m, 1, A, 0, ("r1", "r2"))
    rdv.complete("r1", 1, 57)
    rdv.complete("r2", 1, 12)
    assert rdv.in_progress is None
    assert rdv.complete("r1", 1, 0) == [("reset", "r1", Release(1, 0))]  # a stale one
    assert rdv.view()["members"]["r1"]["applied_seq"] == 57


def test_view_names_the_state_for_status(make_group):
    g = make_group()
    g.checkpoint(1, A)
    v = g.rdv.view()
    assert v["all_joined"] is True
    assert v["mode"] == "checkpoint" and v["released"] == {"n": 1, "t": A}
    assert v["update_in_progress"] == 1 and v["waiting"] == list(ALL)
    assert v["members"]["r3"]["held_n"] == 1 and v["members"]["r3"]["state"] == "active"
    make("view", view=v)  # it fits its message


# -- limit-time mode (seed 002 §6 C and D) ----------------------------------------


def lt(names=("r1", "r2")) -> Rendezvous:
    rdv = Rendezvous("g0", "limit-time", tuple(names), MAX_SKEW_US)
    for n in names:
        rdv.joined(n, Release(0, 0), None)
    return rdv


def releases(out) -> list[tuple[str, int]]:
    return [(m, r.t) for k, m, r in out if k == "release"]


def complete_all(rdv: Rendezvous, names=("r1", "r2")) -> list:
    out = []
    for n in names:
        out += rdv.complete(n, rdv.in_progress.n, 0)
    return out


T_1000, T_1001, T_1002, T_1003, T_1004, T_1005 = (T0 + k * 60_000 * MS for k in range(6))


def test_at15_the_limit_time_is_the_minimum_over_the_streams():
    rdv = lt()
    assert rdv.watermark("r1", T_1005, 0, ("r1", "r2")) == []
    out = rdv.watermark("r2", T_1001, 0, ("r1", "r2"))
    assert releases(out) == [("r1", T_1001), ("r2", T_1001)]


def test_at16_every_member_receives_the_limit_time_and_stores_it(make_group):
    g = make_group(mode="limit-time", names=("r1", "r2"))
    g.deliver("r1", g.p["r1"].mark(0, T_1003, ("r1", "r2")))
    g.deliver("r2", g.p["r2"].mark(0, T_1002, ("r1", "r2")))
    assert [(k, m, r.t) for k, m, r in g.sent] == [("release", "r1", T_1002),
                                                   ("release", "r2", T_1002)]
    for m in ("r1", "r2"):
        again = MemberGate(g.s[m].dir / "group.json", "g0", "limit-time", m)
        assert again.released_t == T_1002 and again.bound() == T_1002


def test_at17_no_new_limit_time_until_every_member_has_reported():
    rdv = lt()
    assert rdv.watermark("r1", T_1003, 0, ("r1", "r2")) == []
    assert rdv.in_progress is None and rdv.released == Release(0, 0)
    assert rdv.blocked == "waiting for the first marker from r2"
    out = rdv.watermark("r2", T_1002, 0, ("r1", "r2"))
    assert releases(out) == [("r1", T_1002), ("r2", T_1002)]
    complete_all(rdv)
    # r1 moves on, r2 says nothing new: the previous L stays in force.
    assert rdv.watermark("r1", T_1005, 0, ("r1", "r2")) == []
    assert rdv.released.t == T_1002
    assert rdv.blocked == "waiting for r2 to pass the limit time"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.integers(0, 5_000),
                          st.booleans()), max_size=80),
       st.randoms(use_true_random=False))
def test_at18_the_published_limit_time_never_decreases(trace, rnd):
    """A random arrival trace of watermarks (each member's monotone, as its
    stream is, but reports may arrive stale), with completes arriving at
    random points: every published L is above the last one and at or below
    every member's reported watermark."""
    names = ("r1", "r2", "r3")
    rdv = lt(names)
    wm = {n: 0 for n in names}  # the highest watermark each member reported
    published: list[int] = []
    pending_complete: set[str] = set()

    def record(out) -> None:
        for kind, m, r in out:
            if kind == "release":
                assert r.t <= min(wm.values()), (r.t, wm)
                if not published or published[-1] != r.t:
                    published.append(r.t)
                pending_complete.add(m)

    for name, step, stale in trace:
        if stale and wm[name] > T0:  # an old report, re-sent after a reconnect
            t = max(T0 + 1, wm[name] - step)
        else:
            wm[name] = max(wm[name], T0) + step + 1
            t = wm[name]
        record(rdv.watermark(name, t, 0, names))
        if pending_complete and rnd.random() < 0.5:
            m = rnd.choice(sorted(pending_complete))
            pending_complete.discard(m)
            record(rdv.complete(m, rdv.in_progress.n, 0) if rdv.in_progress else [])
    assert published == sorted(set(published))
    assert rdv.released.t == (published[-1] if published else 0)


def test_at19_an_unstarted_member_blocks_everything(make_group):
    g = make_group(mode="limit-time", names=("r1", "r2", "r3"))
    members = ("r1", "r2", "r3")
    g.deliver("r1", g.p["r1"].write(T_1000, 0, W1), g.p["r1"].mark(0, T_1001, members))
    g.deliver("r2", g.p["r2"].write(T_1000 + MS, 0, W2), g.p["r2"].mark(0, T_1001, members))
    g.settle()
    assert g.sent == [] and visible(g) == set()
    assert g.rdv.blocked == "waiting for the first marker from r3"
    # r3's first delivery is its session-start marker: L is defined.
    g.deliver("r3", g.p["r3"].mark(0, T_1001, members))
    assert [m for _, m, _ in g.sent] == ["r1", "r2", "r3"]
    g.settle()
    assert visible(g) == {"W1", "W2"}


def test_at20_the_apply_example_with_bounds(make_group):
    """Cached A 10:00, B 10:02, C 10:04 on r1; the limit time follows r2's
    watermark: 10:01 applies only A, 10:02 B too, >= 10:04 C."""
    g = make_group(mode="limit-time", names=("r1", "r2"))
    members = ("r1", "r2")
    s1 = g.s["r1"]
    g.deliver("r1", g.p["r1"].write(T_1000, 0, b"A"), g.p["r1"].write(T_1002, 1, b"B"),
              g.p["r1"].write(T_1004, 2, b"C"), g.p["r1"].mark(0, T_1005, members))

    def image() -> list[bytes]:
        return [s1.block(i)[:1] for i in range(3)]

    def r2_at(t: int) -> None:
        g.deliver("r2", g.p["r2"].mark(0, t, members))
        g.settle()

    r2_at(T_1001)
    assert g.rdv.released.t == T_1001
    assert image() == [b"A", b"\0", b"\0"]
    r2_at(T_1002)
    assert image() == [b"A", b"B", b"\0"]
    r2_at(T_1003)
    assert image() == [b"A", b"B", b"\0"]
    r2_at(T_1004)
    assert image() == [b"A", b"B", b"C"]
    assert g.rdv.in_progress is None


def test_heartbeats_keep_the_limit_time_moving_for_an_idle_member(make_group):
    """AT-37: r2 has no writes, only heartbeat markers; r1's writes apply
    as its heartbeats pass them. Without heartbeats r2's first marker would
    hold L there and r1's later writes would wait."""
    g = make_group(mode="limit-time", names=("r1", "r2"))
    members = ("r1", "r2")
    g.deliver("r2", g.p["r2"].mark(0, T0, members))  # session start
    for k in range(1, 6):
        t = T0 + k * 20 * MS
        g.deliver("r1", g.p["r1"].write(t - 5 * MS, k, bytes([k])),
                  g.p["r1"].mark(0, t, members))
        assert g.s["r1"].block(k) == bytes(BLOCK)  # r2's watermark is behind
        g.settle()
        g.deliver("r2", g.p["r2"].mark(0, t, members))  # r2's heartbeat
        g.settle()
        assert g.rdv.released.t == t
        assert g.s["r1"].block(k) == bytes([k]) * BLOCK
    # r2 falls silent: r1 writes on, nothing more is applied.
    t = T0 + 200 * MS
    g.deliver("r1", g.p["r1"].write(t, 9, b"z"), g.p["r1"].mark(0, t + MS, members))
    g.settle()
    assert g.s["r1"].block(9) == bytes(BLOCK)
    assert g.rdv.blocked == "waiting for r2 to pass the limit time"


def test_limit_time_resign_via_the_member_list():
    names = ("r1", "r2", "r3")
    rdv = lt(names)
    for n in names:
        out = rdv.watermark(n, T_1001, 0, names)
    assert releases(out) == [(n, T_1001) for n in names]
    complete_all(rdv, names)
    # P2 is lost; the markers from now on list r1 and r3 only.
    assert rdv.watermark("r1", T_1003, 0, ("r1", "r3")) == []  # r3 is behind
    assert rdv.blocked == "waiting for r3 to pass the limit time"
    out = rdv.watermark("r3", T_1002, 0, ("r1", "r3"))
    assert releases(out) == [("r1", T_1002), ("r3", T_1002)]  # r2 not waited for
    assert rdv.view()["members"]["r2"]["state"] == "resigned"


def test_limit_time_releases_are_numbered_by_the_master():
    rdv = lt()
    for k in range(1, 5):
        rdv.watermark("r1", T0 + k, 0, ("r1", "r2"))
        out = rdv.watermark("r2", T0 + k, 0, ("r1", "r2"))
        assert [r.n for _, _, r in out] == [k, k]
        out = complete_all(rdv)
        assert [(kind, r.n) for kind, _, r in out] == [("reset", k)]


def test_at22_a_gap_in_one_stream_holds_back_later_writes_of_the_others(make_group):
    """r1 has everything through seq 2 (stamp 10:00:04 + ...); its seq 3
    is missing. r2's writes are all later than r1's watermark: none is
    applied until r1's seq 3 arrives; then all are, in their order."""
    g = make_group(mode="limit-time", names=("r1", "r2"))
    members = ("r1", "r2")
    p1, p2 = g.p["r1"], g.p["r2"]
    t = T0 + 4_000 * MS
    r1 = [p1.write(t, 0, b"a"), p1.mark(0, t + 1 * MS, members),
          p1.write(t + 5 * MS, 1, b"b"), p1.mark(0, t + 20 * MS, members)]
    g.deliver("r1", r1[0], r1[1])
    g.deliver("r1", r1[3])  # seq 4 before seq 3: a gap at 3
    g.deliver("r2", *(p2.write(t + k * MS, k, bytes([64 + k])) for k in range(6, 10)),
              p2.mark(0, t + 20 * MS, members))
    g.settle()
    assert g.rdv.released.t == t + 1 * MS  # r1's watermark: the marker before the gap
    assert g.s["r1"].block(0) == b"a" * BLOCK
    assert all(g.s["r2"].block(k) == bytes(BLOCK) for k in range(6, 10))
    g.deliver("r1", r1[2])  # the gap fills
    g.settle()
    assert g.rdv.released.t == t + 20 * MS
    assert g.s["r1"].block(1) == b"b" * BLOCK
    assert all(g.s["r2"].block(k) == bytes([64 + k]) * BLOCK for k in range(6, 10))


def test_at23_overlapping_writes_reordered_in_flight_end_with_the_later_one(make_group):
    g = make_group(mode="limit-time", names=("r1", "r2"))
    members = ("r1", "r2")
    s1, p1 = g.s["r1"], g.p["r1"]
    w1, w2 = p1.write(T0 + 1 * MS, 0, b"1"), p1.write(T0 + 2 * MS, 0, b"2")
    hb = p1.mark(0, T0 + 3 * MS, members)
    s1.q.add_token_bytes(w1[:HEADER_SIZE] + w2[:HEADER_SIZE])  # TOKENS ahead
    g.deliver("r1", w2)  # W2's data arrives first
    g.deliver("r2", g.p["r2"].mark(0, T0 + 10 * MS, members))
    g.settle()
    assert s1.block(0) == bytes(BLOCK)  # W2 waits for W1: never W1 after W2
    g.deliver("r1", w1, hb)
    g.settle()
    assert s1.block(0) == b"2" * BLOCK
    assert s1.q.applied_through == 3


def test_at26_journal_then_data_the_replica_never_shows_data_without_journal(make_group):
    """J (ts 1) on r1 and D (ts 2) on r2; D arrives first, J is delayed."""
    g = make_group(mode="limit-time", names=("r1", "r2"))
    members = ("r1", "r2")
    j = g.p["r1"].write(T0 + 1 * MS, 0, b"J")
    g.deliver("r2", g.p["r2"].write(T0 + 2 * MS, 0, b"D"), g.p["r2"].mark(0, T0 + 3 * MS,
                                                                           members))
    g.deliver("r1", g.p["r1"].mark(0, T0, members))  # r1's session start, before J
    for _ in range(3):
        g.settle()
        assert g.s["r2"].block(0) == bytes(BLOCK)
    g.deliver("r1", j, g.p["r1"].mark(0, T0 + 3 * MS, members))
    g.settle()
    assert (g.s["r1"].block(0), g.s["r2"].block(0)) == (b"J" * BLOCK, b"D" * BLOCK)


def test_at27_at28_a_member_past_the_limit_waits_and_its_buffer_drains(make_group):
    g = make_group(mode="limit-time", names=("r1", "r2"))
    members = ("r1", "r2")
    g.deliver("r1", *(g.p["r1"].write(T0 + k * MS, k, b"w") for k in range(1, 9)),
              g.p["r1"].mark(0, T0 + 9 * MS, members))
    g.deliver("r2", g.p["r2"].mark(0, T0 + 4 * MS, members))
    s1 = g.s["r1"]
    for _ in range(3):  # the applier wakes, finds the next record past L: no error, no skip
        g.settle()
        assert s1.q.applied_through == 4 and len(s1.q) == 5
    assert s1.q.pending_bytes > 0
    g.deliver("r2", g.p["r2"].mark(0, T0 + 9 * MS, members))
    g.settle()
    assert len(s1.q) == 0 and s1.q.pending_bytes == 0  # AT-28: the entries are gone


# -- checkpoint mode: prefix consistency over random interleavings -------------------


_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("checkpoint"), st.just("")),
    st.tuples(st.just("deliver"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("apply"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("restart"), st.sampled_from(("r1", "r2", "r3"))),
), max_size=70)


@pytest.mark.parametrize("mode", ["checkpoint", "limit-time"])
@settings(max_examples=50, deadline=None)
@given(ops=_OPS)
def test_any_interleaving_keeps_every_image_at_the_group_point(tmp_path_factory, mode, ops):
    """Three members; writes, markers (checkpoints, or heartbeats in mode
    limit-time), deliveries (one record at a time, each link at its own
    pace), applies and member restarts (kill -9) in any order. Whenever no member is mid-apply, every
    member's image holds exactly its writes stamped at or before the last
    released point (AT-25's prefix); mid-apply, between the previous point
    and the current one. At the end, with everything delivered and one more
    marker, every write is applied."""
    names = ("r1", "r2", "r3")
    # group.json is fsynced at every release: on tmpfs when there is one,
    # so that a hundred examples take seconds.
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="dpx-ix-", dir=shm if os.access(shm, os.W_OK)
                                 else tmp_path_factory.getbasetemp()))
    g = Group(root, mode=mode, names=names)
    try:
        clock = T0
        outbox: dict[str, list[bytes]] = {n: [] for n in names}
        writes: dict[str, list[tuple[int, int]]] = {n: [] for n in names}  # (ts, block)
        n_cp = 0
        blocks = 0
        prev_t = 0  # the point before the release in progress

        def expected(name: str, t: int) -> set[int]:
            return {b for ts, b in writes[name] if ts <= t}

        def shown(name: str) -> set[int]:
            return {b for _, b in writes[name] if g.s[name].block(b)[:1] == bytes([b + 1])}

        def check() -> None:
            nonlocal prev_t
            rel_t = g.rdv.released.t
            if all(v is None for v in g.in_progress().values()):
                for n in names:
                    assert shown(n) == expected(n, rel_t), (n, rel_t)
                prev_t = rel_t
            else:
                for n in names:
                    assert expected(n, prev_t) <= shown(n) <= expected(n, rel_t), n

        def cp() -> None:
            nonlocal n_cp, clock
            n_cp += 1
            clock += MS
            for n in names:  # inserted after every record stamped <= T
                outbox[n].append(g.p[n].mark(n_cp if mode == "checkpoint" else 0, clock,
                                             names))

        for op, name in ops:
            if op == "write" and blocks < IMAGE // BLOCK:
                clock += MS
                outbox[name].append(g.p[name].write(clock, blocks, bytes([blocks + 1])))
                writes[name].append((clock, blocks))
                blocks += 1
            elif op == "checkpoint":
                cp()
            elif op == "deliver" and outbox[name]:
                g.deliver(name, outbox[name].pop(0))
            elif op == "apply":
                g.apply_and_poll(name)
            elif op == "restart":  # the member's secondary, kill -9, and it rejoins
                g.s[name].restart()
                g.connect(name)
            check()
        cp()
        for n in names:
            if outbox[n]:
                g.deliver(n, *outbox[n])
                outbox[n] = []
        for _ in range(3):
            g.settle()
            check()
        assert g.rdv.released.t == clock
        if mode == "checkpoint":
            assert g.rdv.released.n == n_cp
        for n in names:
            assert shown(n) == {b for _, b in writes[n]}
    finally:
        for s in g.s.values():
            s.close()
        shutil.rmtree(root)


def _run_release_with_crash(g: Group, crash: bool) -> None:
    for k in range(4):
        g.deliver("r1", g.p["r1"].write(A + k * MS, k, bytes([k + 1])))
    g.deliver("r1", g.p["r1"].write(C, 10, b"z"))  # after T: stays buffered
    g.checkpoint(1, B)
    assert g.in_progress()["r1"] == 1
    s1 = g.s["r1"]
    if crash:
        # The applier wrote one record of the release; kill -9.
        assert s1.q.take_run(1) == 1
        s1.q.apply_taken(s1.jfd, s1.ifd, IMAGE)
        s1.q.mark_applied(s1.q.run_end)
        (s1.dir / "applied").write_text(str(s1.q.applied_through))
        g.connected.discard("r1")
        g.settle(("r2", "r3", "r4"))
        assert g.rdv.waiting == {"r1"}  # the reset waits for it
        s1.restart()
        assert s1.gate.in_progress == 1 and s1.gate.bound() == B  # persisted
        g.connect("r1")  # the master re-sends release 1
    g.settle()


def test_must_complete_across_a_member_restart_gives_the_same_image(make_group):
    """Behaviour 10 with the real queue, journal and applier: the member's
    secondary dies in the middle of applying release 1; on restart it finds
    update-in-progress, finishes the apply from its journal, completes, and
    the group gets its reset. The image equals the run without the crash;
    the record stamped after T (behaviour 19) is still buffered."""
    crashed, control = make_group(), make_group()
    _run_release_with_crash(crashed, crash=True)
    _run_release_with_crash(control, crash=False)
    assert crashed.in_progress() == {m: None for m in ALL}
    assert ("reset", "r1", 1) in crashed.kinds()
    for g in (crashed, control):
        s1 = g.s["r1"]
        assert [s1.block(k)[:1] for k in range(4)] == [b"\x01", b"\x02", b"\x03", b"\x04"]
        assert s1.block(10) == bytes(BLOCK) and len(s1.q) == 2
    img = [os.pread(g.s["r1"].ifd, IMAGE, 0) for g in (crashed, control)]
    assert img[0] == img[1]
    # And the buffered record survives another kill -9 and goes at the next release.
    crashed.s["r1"].restart()
    crashed.connect("r1")
    crashed.checkpoint(2, D)
    crashed.settle()
    assert crashed.s["r1"].block(10) == b"z" * BLOCK


_FLAKY_OPS = st.lists(st.one_of(
    st.tuples(st.just("write"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("checkpoint"), st.just("")),
    st.tuples(st.just("deliver"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("deliver-all"), st.just("")),
    st.tuples(st.just("apply"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("drop"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("join"), st.sampled_from(("r1", "r2", "r3"))),
    st.tuples(st.just("master"), st.permutations(("r1", "r2", "r3"))),
    st.tuples(st.just("restart"), st.sampled_from(("r1", "r2", "r3"))),
), max_size=80)


def _flaky_run(root: Path, ops, mode: str = "checkpoint") -> None:
    names = ("r1", "r2", "r3")
    g = Group(root, mode=mode, names=names)
    try:
        clock, n_cp, blocks = T0, 0, 0
        outbox: dict[str, list[bytes]] = {n: [] for n in names}
        writes: dict[str, list[tuple[int, int]]] = {n: [] for n in names}

        def shown(name: str) -> set[int]:
            return {b for _, b in writes[name] if g.s[name].block(b)[:1] == bytes([b + 1])}

        def cp() -> None:
            nonlocal n_cp, clock
            n_cp += 1
            clock += MS
            for n in names:
                outbox[n].append(g.p[n].mark(n_cp if mode == "checkpoint" else 0, clock, names))

        for op, arg in ops:
            if op == "write" and blocks < IMAGE // BLOCK:
                clock += MS
                outbox[arg].append(g.p[arg].write(clock, blocks, bytes([blocks + 1])))
                writes[arg].append((clock, blocks))
                blocks += 1
            elif op == "checkpoint":
                cp()
            elif op == "deliver" and outbox[arg]:
                g.deliver(arg, outbox[arg].pop(0))
            elif op == "deliver-all":
                for n in names:
                    if outbox[n]:
                        g.deliver(n, *outbox[n])
                        outbox[n] = []
            elif op == "apply":
                g.apply_and_poll(arg)
            elif op == "drop":  # its group link drops: the master's messages are lost
                g.connected.discard(arg)
                g.route(g.rdv.left(arg))
            elif op == "join" and arg not in g.connected:
                g.connect(arg)
            elif op == "restart":  # the member's secondary, kill -9 (its link drops too)
                g.s[arg].restart()
                g.connected.discard(arg)
                g.route(g.rdv.left(arg))
            elif op == "master":  # the master restarts; members rejoin in this order
                if g.rdv.in_progress is not None:
                    event("master restart with a release in progress")
                if set(g.connected) != set(names):
                    event("master restart with a member's link down")
                g.new_master(joining=arg)
            if all(v is None for v in g.in_progress().values()):
                t = g.rdv.released.t
                # Mid-apply anywhere: fenced. At rest: every image at the point
                # its gate was released to, and all of them at one point.
                points = {g.s[n].gate.released_t for n in names}
                for n in names:
                    want = {b for ts, b in writes[n] if ts <= g.s[n].gate.released_t}
                    assert shown(n) == want, n
                assert len(points) == 1 or t == 0, points
        # Links back, everything delivered, one more checkpoint: it converges.
        for n in names:
            if n not in g.connected:
                g.connect(n)
        cp()
        for n in names:
            if outbox[n]:
                g.deliver(n, *outbox[n])
        for _ in range(4):
            g.settle()
        event(f"checkpoints released: {min(n_cp, 3)}{'+' if n_cp > 3 else ''}")
        assert g.rdv.released.t == clock, (g.rdv.released, g.rdv.waiting, g.rdv.blocked)
        for n in names:
            assert shown(n) == {b for _, b in writes[n]}
    finally:
        for s in g.s.values():
            s.close()


@pytest.mark.parametrize("mode", ["checkpoint", "limit-time"])
@settings(max_examples=150, deadline=None)
@given(ops=_FLAKY_OPS)
# The smallest case hypothesis found for a stall (fixed: a member behind
# that joined first was never sent the adopted release): r1's link is down
# when release 1 goes out, then the master restarts and r1 joins first.
@example(ops=[("checkpoint", ""), ("drop", "r1"), ("deliver-all", ""),
              ("master", ["r1", "r2", "r3"])])
def test_master_restarts_and_link_drops_never_split_the_group_point(tmp_path_factory, mode,
                                                                     ops):
    """Both modes, with the master restarting, members' secondaries
    restarting (kill -9) and their group links dropping at any point (a
    dropped link loses the master's messages; a member rejoins with hello
    and report): at rest every member is at the
    same point with exactly its writes up to it; at the end the group
    converges to the last marker. (With a local fix of the stall, 1500
    examples of each mode pass.)"""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="dpx-fl-", dir=shm if os.access(shm, os.W_OK)
                                 else tmp_path_factory.getbasetemp()))
    try:
        _flaky_run(root, ops, mode)
    finally:
        shutil.rmtree(root)


def test_a_restarted_master_says_whether_every_member_has_joined():
    rdv = Rendezvous("g0", "checkpoint", ("r1", "r2"), MAX_SKEW_US)
    assert rdv.view()["all_joined"] is False
    rdv.joined("r1", Release(3, A), None)
    v = rdv.view()
    assert v["all_joined"] is False and v["members"]["r1"]["joined"] is True
    assert v["released"] == {"n": 3, "t": A}  # adopted from the join
    rdv.joined("r2", Release(3, A), None)
    assert rdv.view()["all_joined"] is True
    rdv.left("r2")
    assert rdv.view()["members"]["r2"]["connected"] is False


def test_limit_time_blocks_on_an_unmeasured_or_excessive_skew():
    rdv = lt()
    rdv.watermark("r1", T_1002, 0, ("r1", "r2"))
    assert rdv.watermark("r2", T_1002, None, ("r1", "r2")) == []
    assert rdv.blocked == "the clock skew of r2's primary is not measured yet"
    assert rdv.watermark("r2", T_1003, MAX_SKEW_US + 1, ("r1", "r2")) == []
    assert "r2's primary is 5.0 ms off" in rdv.blocked
    out = rdv.watermark("r2", T_1003, 10, ("r1", "r2"))
    assert releases(out) == [("r1", T_1002), ("r2", T_1002)]


def test_the_skew_estimate_follows_a_changed_offset_within_its_window():
    """An offset injected later (a clock stepped): once WINDOW newer pings
    are in, the old best sample is forgotten and the new offset is seen."""
    from replicator.group.clock import WINDOW
    est = SkewEstimator()
    est.sample(T0, T0 + 50, T0 + 100)  # offset 0, the best round trip ever
    for k in range(1, WINDOW):
        t0 = T0 + k * MS
        est.sample(t0, t0 + 1_000 + 9 * MS, t0 + 2_000)  # 9 ms off, rtt 2 us
    assert est.offset_ns() == 0  # the 100 ns round trip still wins
    t0 = T0 + WINDOW * MS
    est.sample(t0, t0 + 1_000 + 9 * MS, t0 + 2_000)
    assert est.offset_ns() == 9 * MS and est.skew_us() == 9000

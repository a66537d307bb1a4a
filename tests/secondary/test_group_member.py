"""A member secondary's side of its consistency group (replicator/group/member.py)
and the note its MARK records carry (replicator/group/notes.py).

The gate persists the released point and update-in-progress in group.json
(seed 000 behaviour 10 at the gate level: both survive a new instance, so
an apply cut by kill -9 is finished on restart), holds a marker only once
the stream is journaled through its seq, and turns held markers into the
master's messages (``held`` in mode checkpoint, ``watermark`` in mode
limit-time). Buffer persistence (behaviour 19) is the journal's; here the
pending queue rebuilt after a "restart" shows that the persisted bound
lets through exactly the released prefix."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from replicator.errors import DuplexError
from replicator.group.member import GroupStateError, Mark, MemberGate
from replicator.group.notes import MarkNote, NoteError
from replicator.protocol.group import make
from replicator.records import MARK_MAX, OP_MARK, OP_WRITE, encode_record, unpack_token
from replicator.secondary.pending import PendingQueue

T0 = 1_800_000_000_000_000_000  # a stamp (ns) far from 0, like CLOCK_REALTIME's


def note(n: int, members=("r1", "r2"), skew_us: int | None = 40) -> MarkNote:
    return MarkNote("g0", n, tuple(members), skew_us)


def mark(seq: int, t: int, n: int, **kw) -> Mark:
    return Mark(seq, t, note(n, **kw))


@pytest.fixture
def path(tmp_path):
    return tmp_path / "group.json"


def gate_at(path, mode: str = "checkpoint") -> MemberGate:
    return MemberGate(path, "g0", mode, "r1")


# -- persistence --------------------------------------------------------------


def test_a_fresh_gate_has_released_nothing_and_its_bound_admits_no_stamp(path):
    g = gate_at(path)
    assert (g.released_n, g.released_t, g.in_progress) == (0, 0, None)
    assert g.bound() == 1  # every real stamp is later: nothing is applied
    assert not path.exists()  # nothing to persist yet
    assert g.join_fields() == {"member": "r1", "released_n": 0, "released_t": 0,
                               "in_progress": None}


def test_released_point_and_update_in_progress_survive_a_new_instance(path):
    """Behaviour 10 at the gate: a release persisted before its apply is
    still in progress after a crash, with its bound; only the master's reset
    clears it, and that too survives."""
    g = gate_at(path)
    assert g.on_release(1, T0 + 500) == T0 + 500
    del g  # kill -9: nothing more is written
    g2 = gate_at(path)
    assert (g2.released_n, g2.released_t, g2.in_progress) == (1, T0 + 500, 1)
    assert g2.bound() == T0 + 500
    assert g2.join_fields() == {"member": "r1", "released_n": 1, "released_t": T0 + 500,
                                "in_progress": 1}
    assert g2.on_reset(1)
    g3 = gate_at(path)
    assert (g3.released_n, g3.released_t, g3.in_progress) == (1, T0 + 500, None)
    body = json.loads(path.read_text())
    assert body == {"group": "g0", "member": "r1", "released_n": 1, "released_t": T0 + 500,
                    "in_progress": None, "resigned": None}


def test_an_apply_cut_by_a_crash_is_finished_to_exactly_the_persisted_bound(path, tmp_path):
    """The journal (here: the records kept as bytes) survives; the queue is
    rebuilt from it after the crash and the gate's persisted bound lets
    through the records stamped at or before T, the marker, and no more."""
    stream = [encode_record(1, T0 + 100, 0, 4, OP_WRITE, b"aaaa"),
              encode_record(2, T0 + 300, 4, 4, OP_WRITE, b"bbbb"),
              encode_record(3, T0 + 200, 1, len(note(1).encode()), OP_MARK, note(1).encode()),
              encode_record(4, T0 + 400, 8, 4, OP_WRITE, b"cccc")]
    journal = {unpack_token(r).seq: r for r in stream}
    g = gate_at(path)
    g.on_release(1, T0 + 200)
    # Crash before anything was applied; restart.
    g = gate_at(path)
    q = PendingQueue.rebuild(0, ((unpack_token(r), s) for s, r in journal.items()))
    q.set_ts_bound(g.bound())
    run = q.next_run()
    assert [t.seq for t, _ in run] == [1]  # seq 2 (T0+300 > T) stops the run
    q.mark_applied(1)
    assert q.bound_reached(g.bound(), journaled=4)  # the release is complete here
    assert g.in_progress == 1  # until the master's reset
    # The next release (n=2 at T0+450) lets the rest through, marker included.
    assert g.on_release(2, T0 + 450) == T0 + 450
    q.set_ts_bound(gate_at(path).bound())
    assert [t.seq for t, _ in q.next_run()] == [2, 3, 4]


def test_a_release_is_idempotent_and_never_moves_the_bound_back(path):
    g = gate_at(path)
    assert g.on_release(2, T0 + 20) == T0 + 20
    # Re-sent while in progress (a master that restarted): armed again.
    assert g.on_release(2, T0 + 20) == T0 + 20
    assert g.in_progress == 2
    assert g.on_release(1, T0 + 10) is None  # older: ignored
    assert (g.released_n, g.released_t) == (2, T0 + 20)
    assert g.on_reset(2)
    assert g.on_release(2, T0 + 20) is None  # done and reset: ignored
    assert g.in_progress is None
    # A newer release with an earlier T (a new master's limit time) keeps
    # the bound where it was: nothing applied is ever outside the bound.
    assert g.on_release(3, T0 + 5) == T0 + 20
    assert gate_at(path).bound() == T0 + 20


def test_a_reset_clears_only_its_release_or_a_later_one_and_only_once(path):
    g = gate_at(path)
    assert not g.on_reset(1)  # nothing in progress
    g.on_release(4, T0)
    assert not g.on_reset(3)  # an old reset does not end release 4
    assert g.in_progress == 4
    assert g.on_reset(4)
    assert not g.on_reset(4)
    g.on_release(5, T0 + 1)
    assert g.on_reset(6)  # a later reset covers it (releases coalesce)
    assert gate_at(path).in_progress is None


def test_promote_to_fixes_the_point_and_ends_update_in_progress(path):
    g = gate_at(path)
    g.on_release(3, T0 + 30)
    g.promote_to(T0 + 30)
    g2 = gate_at(path)
    assert (g2.released_t, g2.in_progress) == (T0 + 30, None)


def _damaged() -> list:
    good = {"group": "g0", "member": "r1", "released_n": 1, "released_t": 5,
            "in_progress": None}
    cases = {
        "empty": b"",
        "truncated": json.dumps(good).encode()[:20],
        "not-utf8": b"\xff\xfe{}",
        "a-list": b"[1, 2]",
        "a-number": b"42",
        "other-group": json.dumps({**good, "group": "g9"}).encode(),
        "no-released-t": json.dumps({k: v for k, v in good.items()
                                     if k != "released_t"}).encode(),
        "string-n": json.dumps({**good, "released_n": "1"}).encode(),
        "negative-t": json.dumps({**good, "released_t": -5}).encode(),
        "float-n": json.dumps({**good, "released_n": 1.0}).encode(),
        "string-in-progress": json.dumps({**good, "in_progress": "1"}).encode(),
        "number-resigned": json.dumps({**good, "resigned": 5}).encode(),
    }
    return [pytest.param(raw, id=k) for k, raw in cases.items()]


@pytest.mark.parametrize("raw", _damaged())
def test_a_damaged_group_json_is_a_group_state_error_naming_the_file(path, raw):
    path.write_bytes(raw)
    with pytest.raises(GroupStateError) as ei:
        gate_at(path)
    msg = str(ei.value)
    assert str(path) in msg and "damaged group state" in msg
    assert isinstance(ei.value, DuplexError)  # the CLI prints it as one line
    assert "\n" not in msg


@pytest.mark.parametrize("field,value", [("in_progress", -1), ("in_progress", True),
                                         ("released_n", True), ("released_n", 1 << 64),
                                         ("released_t", 1 << 70), ("released_t", False)])
def test_a_value_a_join_cannot_carry_is_damage_found_at_load(path, field, value):
    """A bool, a negative or a 2^64 value in group.json: refused at load,
    not a ProtocolError at the next join (group_bugs.md, fixed in 9881aaf)."""
    body = {"group": "g0", "member": "r1", "released_n": 1, "released_t": 5,
            "in_progress": None, field: value}
    path.write_text(json.dumps(body))
    with pytest.raises(GroupStateError, match="damaged group state"):
        gate_at(path)


def test_every_group_json_the_gate_writes_loads_and_can_be_told_to_the_master(path):
    g = gate_at(path)
    g.on_release((1 << 64) - 1, (1 << 64) - 1)
    g2 = gate_at(path)
    make("join", **g2.join_fields())
    assert g2.hello()[0] == "join"


# -- markers --------------------------------------------------------------------


def test_a_marker_is_held_only_once_the_stream_is_journaled_through_its_seq(path):
    g = gate_at(path)
    g.on_marks([mark(5, T0 + 50, 1)])
    assert g.on_journaled(4, T0 + 40) == []
    assert g.held is None and not g.holds(T0 + 50)
    out = g.on_journaled(5, T0 + 50)
    assert out == [("held", {"member": "r1", "n": 1, "t": T0 + 50, "skew_us": 40,
                             "members": ["r1", "r2"]})]
    assert g.holds(T0 + 50) and not g.holds(T0 + 51)
    assert g.on_journaled(9, T0 + 90) == []  # no new marker: nothing new to say
    make(*out[0][:1], **out[0][1])  # the message is valid on the wire


def test_of_several_markers_journaled_at_once_the_newest_is_reported(path):
    g = gate_at(path)
    g.on_marks([mark(3, T0 + 30, 1), mark(6, T0 + 60, 2, members=("r1",))])
    g.on_marks([mark(9, T0 + 90, 3)])
    out = g.on_journaled(7, T0 + 70)
    assert [(m, f["n"], f["t"], f["members"]) for m, f in out] == [("held", 2, T0 + 60, ["r1"])]
    assert g.status()["held"] == {"n": 2, "t": T0 + 60, "seq": 6}
    out = g.on_journaled(9, T0 + 90)
    assert [f["n"] for _, f in out] == [3]


def test_markers_arriving_out_of_seq_order_are_held_in_seq_order(path):
    g = gate_at(path)
    g.on_marks([mark(9, T0 + 90, 3)])  # a frame from connection B
    g.on_marks([mark(5, T0 + 50, 2)])  # an earlier frame from connection A
    assert [f["n"] for _, f in g.on_journaled(6, T0 + 60)] == [2]
    assert [f["n"] for _, f in g.on_journaled(9, T0 + 90)] == [3]
    assert g.held.note.n == 3


def test_a_reconnecting_member_reports_its_held_point_again(path):
    """The master may have restarted: report() repeats the held point (the
    watermark in limit-time), nothing before a marker or while resigned."""
    g = gate_at(path)
    assert g.report() == []
    g.on_marks([mark(4, T0 + 40, 2)])
    g.on_journaled(4, T0 + 40)
    assert g.report() == [("held", {"member": "r1", "n": 2, "t": T0 + 40, "skew_us": 40,
                                    "members": ["r1", "r2"]})]
    assert g.report() == g.report()  # as often as it reconnects
    g.catching_up(base_seq=10)
    assert g.report() == []
    lt = MemberGate(path.with_name("lt.json"), "g0", "limit-time", "r1")
    lt.on_marks([mark(2, T0 + 20, 0)])
    lt.on_journaled(3, T0 + 35)
    assert [(m, f["t"]) for m, f in lt.report()] == [("watermark", T0 + 35)]
    for mtype, fields in g.report() + lt.report():
        make(mtype, **fields)


def test_markers_are_not_persisted_by_the_gate(path):
    """Held markers live in memory: after a restart the daemon's journal
    replay feeds them again (buffer persistence is the journal's)."""
    g = gate_at(path)
    g.on_marks([mark(2, T0 + 20, 1)])
    g.on_journaled(2, T0 + 20)
    assert not path.exists()
    assert gate_at(path).held is None


def test_a_member_catching_up_resigns_durably_and_rejoins_at_a_marker_past_the_base(path):
    """A catch-up increment puts the image at its primary's own point: the
    member leaves the group (resign), says so again after a restart, holds
    nothing meanwhile, and rejoins at the first marker after the base."""
    g = gate_at(path)
    g.on_release(1, T0 + 10)
    g.on_reset(1)
    out = g.catching_up(base_seq=100)
    assert [m for m, _ in out] == ["resign"] and "catching up" in out[0][1]["reason"]
    make("resign", **out[0][1])
    assert g.catching_up(base_seq=120) == []  # already out: said once
    assert g.hello()[0] == "resign"
    assert gate_at(path).resigned is not None  # a restart still says so
    assert gate_at(path).hello() == ("resign", out[0][1])
    g.on_marks([mark(110, T0 + 50, 2)])  # inside the increment's range: not yet
    assert g.on_journaled(110, T0 + 50) == []
    assert g.resigned is not None
    g.on_marks([mark(121, T0 + 60, 3)])
    out = g.on_journaled(121, T0 + 60)
    assert [m for m, _ in out] == ["join", "held"]
    assert out[0][1] == {"member": "r1", "released_n": 1, "released_t": T0 + 10,
                         "in_progress": None}
    assert out[1][1]["n"] == 3
    assert gate_at(path).resigned is None and g.hello()[0] == "join"


def test_limit_time_reports_no_watermark_before_the_first_marker(path):
    """AT-19 at the member: journaled data without any marker (no note yet:
    no member list, no measured skew) says nothing."""
    g = gate_at(path, "limit-time")
    assert g.on_journaled(10, T0 + 100) == []
    assert not g.holds(T0)


def test_limit_time_watermark_follows_journaled_stamps_and_heartbeats(path):
    g = gate_at(path, "limit-time")
    g.on_marks([mark(3, T0 + 30, 0, skew_us=7)])  # a heartbeat (n=0)
    out = g.on_journaled(3, T0 + 30)
    assert out == [("watermark", {"member": "r1", "t": T0 + 30, "skew_us": 7,
                                  "members": ["r1", "r2"]})]
    make(out[0][0], **out[0][1])
    # Data journaled after the marker moves the watermark to its stamp.
    assert [f["t"] for _, f in g.on_journaled(5, T0 + 52)] == [T0 + 52]
    assert g.on_journaled(5, T0 + 52) == []  # not moved: not re-sent
    # A marker whose T is before a write already journaled (the W3 case)
    # does not move the watermark back.
    g.on_marks([mark(6, T0 + 45, 0)])
    assert g.on_journaled(6, T0 + 45) == []
    assert g.watermark_t == T0 + 52 and g.holds(T0 + 52) and not g.holds(T0 + 53)
    # An idle stream: only heartbeats, each later than the last.
    g.on_marks([mark(7, T0 + 80, 0), mark(8, T0 + 99, 0)])
    assert [f["t"] for _, f in g.on_journaled(8, T0 + 99)] == [T0 + 99]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 50), st.integers(0, 50),
                          st.booleans()), min_size=1, max_size=40))
def test_limit_time_watermark_is_sound_and_strictly_increasing(tmp_path_factory, steps):
    """Any stream of writes (stamps strictly increasing) and markers (T at
    or before the clock when inserted, not before the previous marker's),
    journaled in random chunks, each commit told with the stamp of its last
    record as the daemon does: every reported watermark W is sound (every
    write stamped <= W is journaled) and the reported values increase."""
    g = MemberGate(tmp_path_factory.mktemp("wm") / "group.json", "g0", "limit-time", "r1")
    writes: list[tuple[int, int]] = []  # (seq, stamp)
    stamps: dict[int, int] = {}         # seq -> the record's stamp (a marker's: its T)
    unsent: list[Mark] = []
    clock = last_mark_t = T0
    reported: list[int] = []
    for seq, (is_mark, gap, back, commit) in enumerate(steps, start=1):
        if is_mark:
            t = max(last_mark_t, clock - back)
            last_mark_t = t
            unsent.append(mark(seq, t, 0))
            stamps[seq] = t
        else:
            clock += gap
            writes.append((seq, clock))
            stamps[seq] = clock
        if commit or seq == len(steps):
            g.on_marks(unsent)  # seen by the reader, then journaled
            unsent = []
            for mtype, f in g.on_journaled(seq, stamps[seq]):
                assert mtype == "watermark"
                late = [(s, ts) for s, ts in writes if ts <= f["t"] and s > seq]
                assert not late, f"watermark {f['t']} at seq {seq} but {late} not journaled"
                reported.append(f["t"])
    assert reported == sorted(set(reported))
    if any(is_mark for is_mark, *_ in steps):
        assert reported  # once a marker is held, something was reported


# -- the note of a MARK ------------------------------------------------------------


def test_a_note_round_trips_and_is_checked_strictly():
    n = MarkNote("g0", 17, ("r1", "r2", "r3"), None)
    assert MarkNote.decode(n.encode()) == n
    assert MarkNote.decode(MarkNote("g0", 0, (), 12).encode()).skew_us == 12
    with pytest.raises(NoteError, match=f"over {MARK_MAX}"):
        MarkNote("g0", 1, tuple("r%03d" % i for i in range(64)) * 20, 0).encode()


@pytest.mark.parametrize("obj,words", [
    ({"group": "g0", "n": 1, "members": []}, "exactly group, n, members, skew_us"),
    ({"group": "g0", "n": 1, "members": [], "skew_us": 0, "x": 1}, "exactly"),
    ({"group": "", "n": 1, "members": [], "skew_us": 0}, "group must be a name"),
    ({"group": "g0", "n": -1, "members": [], "skew_us": 0}, "n must be"),
    ({"group": "g0", "n": True, "members": [], "skew_us": 0}, "n must be"),
    ({"group": "g0", "n": 1 << 63, "members": [], "skew_us": 0}, "n must be"),
    ({"group": "g0", "n": 1, "members": [""], "skew_us": 0}, "members must be"),
    ({"group": "g0", "n": 1, "members": "r1", "skew_us": 0}, "members must be"),
    ({"group": "g0", "n": 1, "members": ["r"] * 65, "skew_us": 0}, "members must be"),
    ({"group": "g0", "n": 1, "members": [], "skew_us": -1}, "skew_us must be"),
    ({"group": "g0", "n": 1, "members": [], "skew_us": 1.5}, "skew_us must be"),
    ([], "exactly"),
])
def test_a_bad_note_is_refused_saying_why(obj, words):
    with pytest.raises(NoteError, match=words):
        MarkNote.decode(json.dumps(obj).encode())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=MARK_MAX))
def test_any_mark_data_decodes_or_raises_note_error(data):
    try:
        n = MarkNote.decode(data)
    except NoteError:
        return
    assert MarkNote.decode(n.encode()) == n


def test_deeply_nested_mark_data_is_a_note_error():
    """4000 '[' fit a MARK; json.loads raises RecursionError on them, which
    the daemon's reader would not turn into a StreamError."""
    with pytest.raises(NoteError, match="too deeply"):
        MarkNote.decode(b"[" * 4000)

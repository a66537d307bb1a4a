"""The primary's state tables (replicator/primary/states.py), walked
exhaustively: every state of each machine times every event is either the
table's move or a StateError naming the event and the state; and the moves
the shipper makes in the situations of issue 10 give the truthful words."""
from __future__ import annotations

import pytest

from replicator.primary import states as st
from replicator.status import CONNECTIONS, REPLICATIONS


def _event(cls: type[st.Event]) -> st.Event:
    if cls in (st.LinkFailed, st.Refused, st.SplitBrainFound):
        return cls("why")
    if cls is st.ResyncNeeded:
        return cls("because")
    return cls()


ALL = [(conn, repl, pending) for conn in st.CONNECTION_STATES for repl in st.REPLICATION_STATES
       for pending in (False, True)]


@pytest.mark.parametrize("conn,repl,pending", ALL)
@pytest.mark.parametrize("cls", st.EVENTS, ids=lambda c: c.name)
def test_every_state_and_event_is_the_tables_move_or_a_named_error(conn, repl, pending, cls):
    s = st.PrimaryStates(conn, repl, None, "because" if pending else None)
    ev = _event(cls)
    want_conn = st.TRANSITIONS[st.CONNECTION][conn].get(cls)
    want_repl = st.TRANSITIONS[st.REPLICATION][repl].get(cls)
    if want_conn is None or want_repl is None:
        assert not s.allows(cls)
        machine, state = ((st.CONNECTION, conn) if want_conn is None
                          else (st.REPLICATION, repl))
        with pytest.raises(st.StateError) as e:
            s.step(ev)
        assert str(e.value) == f"event {cls.name!r} is not allowed when {machine} is {state!r}"
        return
    assert s.allows(cls)
    after = s.step(ev)
    assert after.connection == want_conn
    # `duplex disconnect` drops the ring: a resync is owed (not in a split brain).
    pending_after = (pending or cls is st.ResyncNeeded
                     or (cls is st.AdminDisconnect and want_repl != st.SPLIT_BRAIN)) \
        and cls is not st.CaughtUp
    if want_repl == st.IDLE:
        want_repl = st.AHEAD if pending_after else st.OFF
    assert after.replication == want_repl
    assert after.resync_pending == pending_after
    if cls in (st.LinkFailed, st.Refused, st.SplitBrainFound):
        assert after.error == "why"
    elif cls is st.Attached:
        assert after.error is None


def test_every_word_the_tables_produce_is_in_the_status_schema():
    for machine, table in st.TRANSITIONS.items():
        words = set(table) | {n for moves in table.values() for n in moves.values()} - {st.IDLE}
        allowed = CONNECTIONS if machine == st.CONNECTION else REPLICATIONS
        assert words <= set(allowed), (machine, words - set(allowed))
    assert set(st.TRANSITIONS[st.CONNECTION]) == set(st.CONNECTION_STATES)
    assert set(st.TRANSITIONS[st.REPLICATION]) == set(st.REPLICATION_STATES)


def _reachable() -> set[tuple[str, str, bool]]:
    """Every (connection, replication, resync owed) the shipper can reach
    from a start with or without a resync owed (breadth first)."""
    seen, todo = set(), [st.PrimaryStates.initial(None), st.PrimaryStates.initial("x")]
    while todo:
        s = todo.pop()
        key = (s.connection, s.replication, s.resync_pending)
        if key in seen:
            continue
        seen.add(key)
        todo += [s.step(_event(c)) for c in st.EVENTS if s.allows(c)]
    return seen


def test_reachable_states_keep_the_invariants():
    reach = _reachable()
    for conn, repl, pending in reach:
        if repl in (st.OFF, st.AHEAD):  # Ahead exactly when a resync is owed
            assert (repl == st.AHEAD) == pending, (conn, repl, pending)
        if repl in (st.ESTABLISHED, st.SYNC_SOURCE):  # only in a session
            assert conn == st.CONNECTED, (conn, repl, pending)
        if repl == st.ESTABLISHED:
            assert not pending, (conn, repl, pending)
    # Every word is used: no dead state in the tables.
    assert {c for c, _, _ in reach} == set(st.CONNECTION_STATES)
    assert {r for _, r, _ in reach} == set(st.REPLICATION_STATES)


def _walk(*events: st.Event, resync: str | None = None) -> st.PrimaryStates:
    s = st.PrimaryStates.initial(resync)
    for ev in events:
        s = s.step(ev)
    return s


def test_a_dead_peer_with_a_resync_owed_is_connecting_and_ahead_with_both_reasons():
    s = _walk(st.Attached(), st.SyncStart(),
              st.LinkFailed("connecting to beta (10.0.0.2:7789): Connection refused"),
              resync="send ring overflowed")
    assert (s.connection, s.replication) == (st.CONNECTING, st.AHEAD)
    assert s.reason == ("connecting to beta (10.0.0.2:7789): Connection refused; "
                        "resync needed: send ring overflowed")


def test_a_refused_handshake_is_standalone_and_keeps_the_owed_resync():
    s = _walk(st.Refused("peer refused: authentication failed"), resync="initial sync")
    assert (s.connection, s.replication) == (st.STANDALONE, st.AHEAD)
    assert "authentication failed" in s.reason and "resync needed: initial sync" in s.reason


def test_split_brain_lasts_through_lost_links_until_a_handshake_succeeds():
    s = _walk(st.SplitBrainFound("split brain: ..."), st.LinkFailed("no route"),
              st.SplitBrainFound("split brain: ..."))
    assert (s.connection, s.replication) == (st.STANDALONE, st.SPLIT_BRAIN)
    s = s.step(st.LinkFailed("no route"))
    assert (s.connection, s.replication) == (st.CONNECTING, st.SPLIT_BRAIN)
    # The loser discarded its data: it sends its bitmap, a resync follows.
    s = s.step(st.Attached()).step(st.ResyncNeeded("the peer's own unshipped writes"))
    assert (s.connection, s.replication) == (st.CONNECTED, st.AHEAD)
    s = s.step(st.SyncStart()).step(st.CaughtUp())
    assert (s.connection, s.replication, s.reason) == (st.CONNECTED, st.ESTABLISHED, "")


def test_leaving_split_brain_goes_ahead_when_a_resync_is_owed_and_off_when_not():
    owed = _walk(st.SplitBrainFound("sb"), st.Refused("auth"), resync="unclean stop")
    assert owed.replication == st.AHEAD
    clean = _walk(st.SplitBrainFound("sb"), st.Refused("auth"))
    assert clean.replication == st.OFF


def test_an_overflow_while_streaming_goes_ahead_then_syncsource_then_established():
    s = _walk(st.Attached(), st.StreamStart())
    assert (s.connection, s.replication) == (st.CONNECTED, st.ESTABLISHED)
    s = s.step(st.ResyncNeeded("send ring overflowed"))
    assert s.replication == st.AHEAD
    s = s.step(st.SyncStart())
    assert s.replication == st.SYNC_SOURCE
    s = s.step(st.LinkFailed("lost"))
    assert (s.connection, s.replication) == (st.CONNECTING, st.AHEAD)


def test_stream_start_is_refused_while_a_resync_is_owed():
    s = _walk(st.Attached(), resync="initial sync")
    with pytest.raises(st.StateError, match="'stream start' is not allowed when replication "
                                            "is 'Ahead'"):
        s.step(st.StreamStart())


def test_random_walks_never_keep_an_error_once_connected():
    rng = __import__("random").Random(7)
    for _ in range(300):
        s = st.PrimaryStates.initial(rng.choice([None, "x"]))
        for _ in range(40):
            s = s.step(_event(rng.choice([c for c in st.EVENTS if s.allows(c)])))
            if s.connection == st.CONNECTED:
                assert s.error is None and st.CONNECTED not in s.reason, s


def test_states_are_immutable():
    s = st.PrimaryStates.initial(None)
    with pytest.raises(Exception):
        s.connection = st.CONNECTED  # type: ignore[misc]

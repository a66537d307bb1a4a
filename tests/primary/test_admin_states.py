"""The admin's events in the primary's tables (replicator/primary/states.py,
DESIGN §7): ``duplex disconnect`` is StandAlone and Ahead from any session
state, with a resync owed and the reason in words, until ``duplex connect``;
``pause-sync``/``resume-sync`` move neither machine, only the paused flag
that status shows."""
from __future__ import annotations

from replicator.primary import states as st


def _established() -> st.PrimaryStates:
    return st.PrimaryStates.initial(None).step(st.Attached()).step(st.StreamStart())


def test_disconnect_by_the_admin_is_standalone_and_ahead_and_connect_ends_it():
    s = _established().step(st.AdminDisconnect())
    assert (s.connection, s.replication, s.disconnected) == (st.STANDALONE, st.AHEAD, True)
    assert s.resync_pending  # the ring is dropped: the bitmap brings the peer back
    assert "disconnected by the admin" in s.reason
    assert not s.allows(st.AdminDisconnect) or s.step(st.AdminDisconnect()).disconnected
    back = s.step(st.AdminConnect())
    assert (back.connection, back.replication, back.disconnected) == \
        (st.CONNECTING, st.AHEAD, False)
    assert back.error is None and back.resync_pending


def test_disconnect_during_a_catch_up_leaves_the_resync_owed():
    s = st.PrimaryStates.initial("initial sync").step(st.Attached()).step(st.SyncStart())
    s = s.step(st.AdminDisconnect())
    assert (s.connection, s.replication) == (st.STANDALONE, st.AHEAD)
    assert s.resync_reason == "initial sync"  # the older reason is kept


def test_connect_is_only_a_move_after_a_disconnect():
    for s in (_established(), st.PrimaryStates.initial(None)):
        assert not s.allows(st.AdminConnect)


def test_pause_and_resume_only_set_the_flag_status_shows():
    s = st.PrimaryStates.initial("x").step(st.Attached()).step(st.SyncStart())
    p = s.step(st.SyncPaused())
    assert (p.connection, p.replication, p.sync_paused) == (st.CONNECTED, st.SYNC_SOURCE, True)
    assert st.SYNC_PAUSED_BY_ADMIN in p.reason
    # A lost link keeps the pause: the next catch-up starts paused.
    lost = p.step(st.LinkFailed("cut"))
    assert lost.sync_paused and lost.replication == st.AHEAD
    r = lost.step(st.SyncResumed())
    assert not r.sync_paused and st.SYNC_PAUSED_BY_ADMIN not in r.reason


def test_a_session_still_ending_after_a_disconnect_changes_nothing():
    s = st.PrimaryStates.initial("x").step(st.Attached()).step(st.AdminDisconnect())
    for ev in (st.SyncStart(), st.CaughtUp(), st.StreamStart(), st.Attached(),
               st.LinkFailed("closed by us")):
        assert s.step(ev) == s, ev
    assert (s.connection, s.replication, s.error) == (st.STANDALONE, st.AHEAD,
                                                      st.DISCONNECTED_BY_ADMIN)

"""The primary's flow policy (replicator/primary/flowctl.py): which waits
are in force in which replication state, the max-lag controller, and the
pull-ahead hysteresis. A recording fake stands in for the C core (its
waits are tested in tests/native/test_native_flow.py)."""
from __future__ import annotations

import pytest

from replicator.modes import Modes
from replicator.native.core import FlowPolicy
from replicator.primary import flowctl
from replicator.primary import states as st
from replicator.primary.flowctl import FlowControl, next_rate, policy


class FakeCore:
    def __init__(self):
        self.policies: list[FlowPolicy] = []
        self.durable = 0
        self.stats = {"bytes_written": 0}
        self.ring_stats = {"bytes": 0}
        self.fstats = {"room_timeouts": 0, "room_waiting": 0, "room_wait_s": 0.0,
                      "peer_waits": 0, "peer_wait_s": 0.0, "peer_waiting": 0,
                      "room_waits": 0, "delays": 0}

    def set_flow(self, p: FlowPolicy) -> None:
        self.policies.append(p)

    def set_durable(self, seq: int) -> None:
        self.durable = max(self.durable, seq)

    def flow_stats(self) -> dict:
        return dict(self.fstats)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


C_DEGRADE = Modes("C", "degrade", "block", 4 << 20, 5.0)
C_SUSPEND = Modes("C", "suspend", "block", 4 << 20, 5.0)
A_PULL = Modes()


def test_the_table_has_a_row_for_every_replication_state():
    assert set(flowctl.PHASE_OF) == set(st.REPLICATION_STATES)


@pytest.mark.parametrize("modes, repl, wait_peer, block, timeout, note", [
    (C_DEGRADE, st.ESTABLISHED, True, True, 5.0, None),
    (C_DEGRADE, st.OFF, False, False, None, "degraded: the peer is away"),
    (C_DEGRADE, st.SYNC_SOURCE, False, False, None, "degraded: catching up"),
    (C_DEGRADE, st.AHEAD, False, False, None, "degraded: catching up"),
    (C_SUSPEND, st.OFF, True, True, None, "suspended: the peer is away"),
    (C_SUSPEND, st.AHEAD, False, False, None, "degraded: catching up"),
    (A_PULL, st.ESTABLISHED, False, False, 10.0, None),
    (A_PULL, st.OFF, False, False, None, None),
])
def test_policy_per_state(modes, repl, wait_peer, block, timeout, note):
    pol, why = policy(modes, repl)
    assert (pol.wait_peer, pol.block, pol.block_timeout_s, why) == (wait_peer, block, timeout, note)
    assert pol.fill == modes.congestion_fill


def test_apply_sets_the_core_once_per_change_and_release_lets_everything_go():
    core = FakeCore()
    fc = FlowControl(core, C_DEGRADE, "r0")
    fc.apply(st.ESTABLISHED)
    fc.apply(st.ESTABLISHED)
    assert len(core.policies) == 1 and core.policies[-1].wait_peer
    assert fc.snapshot()["protocol_effective"] == "C"
    fc.apply(st.OFF)
    snap = fc.snapshot()
    assert not core.policies[-1].wait_peer and snap["protocol_effective"] == "A"
    assert snap["protocol_note"] == "degraded: the peer is away"
    fc.release()
    fc.apply(st.ESTABLISHED)  # stopped: stays released
    assert core.policies[-1] == FlowPolicy()


def test_acks_count_by_protocol():
    core = FakeCore()
    FlowControl(core, Modes("B", on_congestion="block"), "r0").on_received(7)
    assert core.durable == 7
    core = FakeCore()
    fc = FlowControl(core, C_DEGRADE, "r0")
    fc.on_received(7)  # C waits for the journal, not receipt
    assert core.durable == 0
    fc.on_journaled(5)
    assert core.durable == 5
    core = FakeCore()
    FlowControl(core, A_PULL, "r0").on_journaled(5)  # A waits for nothing
    assert core.durable == 0


def test_hysteresis_holds_a_catch_up_after_a_quick_pull_ahead_and_doubles():
    clock = Clock()
    fc = FlowControl(FakeCore(), A_PULL, "r0", clock=clock)
    fc.pulled_ahead(st.ESTABLISHED)  # the first: no hold
    assert fc.catch_up_hold() == 0
    holds = []
    for _ in range(7):
        fc.caught_up()
        clock.t += 1.0  # pulled ahead again a second later: flapping
        fc.pulled_ahead(st.ESTABLISHED)
        holds.append(fc.catch_up_hold())
        clock.t += holds[-1]
    assert holds[:3] == [flowctl.HOLD_MIN_S, 2 * flowctl.HOLD_MIN_S, 4 * flowctl.HOLD_MIN_S]
    assert max(holds) == flowctl.HOLD_MAX_S
    fc.caught_up()
    clock.t += flowctl.FLAP_WINDOW_S + 1  # streamed long enough: forgiven
    fc.pulled_ahead(st.ESTABLISHED)
    assert fc.catch_up_hold() == 0
    assert fc.snapshot()["flow"]["pull_aheads"] == 9


def test_an_overflow_while_away_is_not_congestion():
    fc = FlowControl(FakeCore(), A_PULL, "r0")
    fc.pulled_ahead(st.OFF)
    assert fc.snapshot()["flow"]["pull_aheads"] == 0 and fc.snapshot()["congestion"] == "none"
    fc.pulled_ahead(st.ESTABLISHED)
    assert fc.snapshot()["congestion"] == "pulled-ahead"
    fc.caught_up()
    assert fc.snapshot()["congestion"] == "none"


def test_blocked_writers_show_as_congestion_blocked():
    core = FakeCore()
    fc = FlowControl(core, C_DEGRADE, "r0")
    core.fstats.update(room_waiting=2, room_wait_s=1.5)
    snap = fc.snapshot()
    assert snap["congestion"] == "blocked" and snap["congestion_blocked_seconds"] == 1.5


def test_max_lag_controller_paces_under_the_drain_and_lifts_the_pace_again():
    drain = 50e6
    r = next_rate(0, 0.08, 0.1, drain)  # over half of 100 ms: 80% of the drain
    assert r == int(0.8 * drain)
    assert next_rate(r, 0.2, 0.1, drain) == int(0.5 * drain)  # over the bound: half
    assert next_rate(r, 0.03, 0.1, drain) == r  # between a quarter and a half: hold
    up = next_rate(r, 0.01, 0.1, drain)  # under a quarter: grow
    assert up == int(r * flowctl.GROW)
    while up:
        up = next_rate(up, 0.01, 0.1, drain)  # ...and lifted once well above the drain
        assert up == 0 or up <= flowctl.UNLIMITED * drain
    assert next_rate(0, None, 0.1, drain) == 0  # nothing queued, no pace: none
    # slowed, never stopped: no drain measured yet, or a tiny one
    assert next_rate(0, 0.5, 0.1, 0.0) == flowctl.MIN_RATE
    assert next_rate(0, 0.5, 0.1, 1000.0) == flowctl.MIN_RATE


def test_tick_drives_the_core_pace_only_while_streaming():
    core = FakeCore()
    clock = Clock()
    fc = FlowControl(core, Modes(max_lag_s=0.1), "r0", clock=clock)
    fc.apply(st.ESTABLISHED)
    fc.tick(lambda: 0.5)
    assert core.policies[-1].rate_bps == flowctl.MIN_RATE  # no drain measured yet
    fc.apply(st.AHEAD)
    assert core.policies[-1].rate_bps == 0
    n = len(core.policies)
    fc.tick(lambda: 0.5)
    assert len(core.policies) == n  # not streaming: no pace
    assert fc.snapshot()["flow"]["max_lag_rate_bytes"] == flowctl.MIN_RATE


def test_a_burst_is_seen_from_the_queue_before_it_is_late():
    """The oldest unapplied write is still young when a burst lands; the
    queue over the peer's drain rate says how late the newest will be."""
    clock = Clock()
    core = FakeCore()
    fc = FlowControl(core, Modes(max_lag_s=0.1), "r0", clock=clock)
    fc.apply(st.ESTABLISHED)
    for _ in range(5):  # steady: 10 MB/s written and drained, 200 kB queued (a busy link)
        clock.t += 0.01
        core.stats["bytes_written"] += 100_000
        core.ring_stats["bytes"] = 200_000
        fc.tick(lambda: 0.01)
    assert core.policies[-1].rate_bps == 0  # 20 ms of queue: under a quarter of 100 ms
    clock.t += 0.01
    core.stats["bytes_written"] += 20_000_000  # a 20 MB burst: 2 s at that rate
    core.ring_stats["bytes"] = 20_100_000
    fc.tick(lambda: 0.01)  # the oldest is 10 ms old: only the queue shows it
    assert 0 < core.policies[-1].rate_bps < 10_000_000  # paced under the drain
    assert flowctl.predicted_lag(0, 1e6) is None
    assert flowctl.predicted_lag(1_000_000, 1e6) == 1.0
    assert flowctl.predicted_lag(1, 0.0) == float("inf")


def test_a_paced_writer_does_not_take_its_own_pace_for_the_links():
    """Ticks whose queue emptied say nothing about what the link can take:
    they leave the drain estimate alone, so the pace can grow again."""
    clock = Clock()
    core = FakeCore()
    fc = FlowControl(core, Modes(max_lag_s=0.1), "r0", clock=clock)
    fc.apply(st.ESTABLISHED)
    for _ in range(5):  # busy: 50 MB/s drained with a queue left over
        clock.t += 0.01
        core.stats["bytes_written"] += 500_000
        core.ring_stats["bytes"] = 1_000_000
        fc.tick(lambda: 0.01)
    busy = fc.snapshot()["flow"]["drain_rate_bytes"]
    for _ in range(5):  # paced: a trickle that drains at once
        clock.t += 0.01
        core.stats["bytes_written"] += 10_000
        core.ring_stats["bytes"] = 0
        fc.tick(lambda: None)
    assert fc.snapshot()["flow"]["drain_rate_bytes"] == busy > 40_000_000

"""A consistency group across two primary hosts (issue 13; seed 000 §6):
the dependent chain of behaviour 7, the rendezvous gate (6), link loss
(14) and resign on primary loss (13), on the four-host lab of
tests/fixtures/group_lab.py: r0 from alpha to beta, r1 from gamma to delta
through a relay that delays r1's link by 250 ms.

The chain: W1 on r0, then W2 on r1 once W1's reply is in, then W3 on r0
once W2's is. Each is its own 4 KiB block with its own pattern. After a
disaster (both primaries and the relay killed with SIGKILL: every link of
the primary site cut) the secondaries must hold one of {}, {W1}, {W1, W2},
{W1, W2, W3}. The same chain without the group shows {W1, W3}: W3 reaches
beta at once while W2 still sits in the relay; that is the proof that the
check can fail.

Both group modes run everything (the lab fixture is parametrised);
``DUPLEX_GROUP_SEED`` replays one run's random kill instants. Between
rounds the primaries restart and the group must be active again with a
release since (GroupLab.wait_group_active, which also works around, and
counts, one known stall: see notes/group_bugs.md).
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from fixtures.group_lab import (
    CHAIN,
    ChainRound,
    GroupLab,
    chain_round,
    pattern,
    read_chain,
    restart_primaries,
)
from fixtures.processes import ProcessGroup

pytestmark = pytest.mark.system  # root, namespaces, nbdkit (the module labs are no conftest fixtures)

DELAY_MS = 250
ROUNDS = 3          # per mode (after W3, W2, W1); each a kill -9 of the primary site and a restart
CONTROL_ROUNDS = 2
SEED = int(os.environ.get("DUPLEX_GROUP_SEED", time.time_ns() % 100000))

_PROCS: list[ProcessGroup] = []


def _make_lab(tmp_path_factory: pytest.TempPathFactory, stack: ExitStack,
              mode: str | None) -> GroupLab:
    if os.geteuid() != 0:
        pytest.fail("the group lab needs root (network namespaces)", pytrace=False)
    root = tmp_path_factory.mktemp(f"group-{mode or 'none'}")
    procs = stack.enter_context(ProcessGroup(root / "logs"))
    _PROCS.append(procs)
    lab = GroupLab.create(root / "lab", procs, mode=mode, delay_ms=DELAY_MS)
    stack.callback(lab.close)
    lab.start_all()
    lab.wait_established()
    if mode is not None:
        lab.wait_group_active()
    return lab


@pytest.fixture(scope="module", params=["checkpoint", "limit-time"])
def glab(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[GroupLab]:
    """The grouped lab, one per mode, shared by the tests below (the last
    one kills gamma's primary for good)."""
    with ExitStack() as stack:
        yield _make_lab(tmp_path_factory, stack, request.param)


@pytest.fixture
def plain_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GroupLab]:
    """The same four hosts and slowed link, no [group.g0]."""
    with ExitStack() as stack:
        yield _make_lab(tmp_path_factory, stack, None)


@pytest.fixture(autouse=True)
def _lab_logs(request: pytest.FixtureRequest) -> None:
    """A failed test's report carries the shared labs' process logs."""
    groups = getattr(request.node, "_dpx_process_groups", [])
    groups.extend(_PROCS)
    request.node._dpx_process_groups = groups


# -- behaviour 7 ----------------------------------------------------------------


def test_control_without_group_shows_the_forbidden_state(plain_lab: GroupLab) -> None:
    """Ungrouped, the disaster right after W3 reached beta (W2 still in
    r1's relay) leaves {W1, W3}: the check below can fail."""
    rng = random.Random(SEED)
    states = []
    for i in range(CONTROL_ROUNDS):
        r = chain_round(plain_lab, i, rng, kill="after-w3")
        states.append(r)
        restart_primaries(plain_lab)
    forbidden = [r for r in states if not r.allowed]
    print(f"\ncontrol (no group): {len(states)} rounds, states "
          f"{[sorted(r.seen) for r in states]}, {len(forbidden)} forbidden")
    assert forbidden, f"no forbidden state without the group: {[sorted(r.seen) for r in states]}"
    assert all(r.seen == {"W1", "W3"} for r in forbidden), [sorted(r.seen) for r in forbidden]


def test_chain_across_two_primaries_stays_in_dependency_order(glab: GroupLab) -> None:
    """Behaviour 7: kill the primary site at random points of the chain;
    the secondaries always hold a prefix of it."""
    rng = random.Random(SEED)
    seen: Counter[str] = Counter()
    bad = []
    for i in range(ROUNDS):
        r = chain_round(glab, i, rng)
        state = "{" + ",".join(sorted(r.seen)) + "}"
        seen[state] += 1
        if not r.allowed:
            bad.append(f"round {i} (after {r.written[-1]}): {state}")
        restart_primaries(glab)
    print(f"\n{glab.mode}: {ROUNDS} rounds (seed {SEED}), states seen {dict(seen)}; "
          f"secondaries restarted for a stuck release: {glab.recoveries or 'none'}")
    assert not bad, f"forbidden states (seed {SEED}): {bad}"
    # The stuck release (an older reset sent after a newer release) is fixed
    # (the rendezvous decides and sends in one step): seeing it again fails.
    assert not glab.recoveries, f"a release got stuck again: {glab.recoveries}"


# -- behaviour 6 ----------------------------------------------------------------


def test_rendezvous_gate_holds_w3_until_delta_holds_w2(glab: GroupLab) -> None:
    """Behaviour 6: beta journals W3 at once, but applies it only once
    delta holds (has journaled) W2, which the relay delays by 250 ms.

    W2's seq lies in (s0, s1], gamma's written seq before and after it
    (markers may come in between); delta surely lacks W2 while its
    journaled seq is at most s0. (Applying is another matter: within one
    release, beta may apply W3 before delta has applied W2; that is what
    update-in-progress fences.)"""
    blocks = {"W1": 200, "W2": 201, "W3": 202}
    data = {w: pattern(f"gate-{glab.mode}-{w}") for w in blocks}
    glab.write("r0", blocks["W1"], data["W1"])
    s0 = glab.status("gamma")["seq"]["written"]
    glab.write("r1", blocks["W2"], data["W2"])
    s1 = glab.status("gamma")["seq"]["written"]
    glab.write("r0", blocks["W3"], data["W3"])
    written_at = time.monotonic()
    w3_at = None
    violations, unsure, samples = [], 0, 0
    deadline = written_at + 10
    while time.monotonic() < deadline:
        # beta first: delta's journaled seq only grows, so what it lacks
        # now it lacked when beta was read.
        beta_w3 = glab.read_block("beta", blocks["W3"]) == data["W3"]
        journaled = glab.status("delta")["seq"]["journaled"]
        samples += 1
        if beta_w3:
            w3_at = time.monotonic()
            if journaled <= s0:
                violations.append(journaled)
            elif journaled < s1:
                unsure += 1
            break
        time.sleep(0.002)
    assert w3_at is not None, "W3 never reached beta's image"
    assert not violations, (f"W3 applied on beta while delta's journal ended at seq "
                            f"{violations[0]}, before W2 (seq > {s0})")
    held_back = w3_at - written_at
    print(f"\n{glab.mode}: W3 applied on beta {held_back * 1000:.0f} ms after it was written "
          f"({samples} samples, {unsure} where delta's seq was within W2's interval)")
    # Ungrouped it lands within milliseconds; the gate waits for the relay.
    assert held_back >= 0.8 * DELAY_MS / 1000, f"W3 applied after only {held_back:.3f} s"
    assert glab.read_block("beta", blocks["W1"]) == data["W1"]
    glab.wait(lambda: glab.read_block("delta", blocks["W2"]) == data["W2"], "W2 on delta")
    # What a user sees: `duplex status r1 --json` on delta has the group.
    g = glab.cli_status("delta")["group"]
    assert g["group"] == "g0" and g["mode"] == glab.mode and g["role"] == "member", g
    assert set(g["view"]["members"]) == {"r0", "r1"}, g["view"]


# -- behaviour 14 ---------------------------------------------------------------


def test_link_loss_stops_the_group_and_nobody_gets_ahead(glab: GroupLab) -> None:
    """Behaviour 14: cut r1's link (kill the relay) for 1.5 s. Nothing
    written after the cut is released: beta does not get r0's write X
    and the released point stays before the cut; once the link is back,
    releases go on and X and r1's Y arrive."""
    glab.wait(lambda: glab.released()[0] > 0, "the group to release")
    cut_ns = time.time_ns()
    glab.stop_relay()
    x, y = pattern(f"link-{glab.mode}-X"), pattern(f"link-{glab.mode}-Y")
    glab.write("r0", 300, x)
    glab.write("r1", 301, y)
    released = []
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        released.append(glab.released())
        assert glab.read_block("beta", 300) != x, "beta applied X while r1's link was cut"
        time.sleep(0.05)
    assert max(t for _, t in released) < cut_ns, (
        f"a point after the cut was released while r1's link was down: "
        f"{max(t for _, t in released) - cut_ns} ns after it")
    # It stopped (the last 1.1 s saw no new release), not merely lagged.
    late = released[len(released) // 4:]
    assert len(set(late)) == 1, f"the released point moved during the cut: {late[0]} .. {late[-1]}"
    stuck = released[-1]
    glab.start_relay()
    glab.wait(lambda: glab.read_block("beta", 300) == x, "X on beta after the link returned",
              timeout=20)
    glab.wait(lambda: glab.read_block("delta", 301) == y, "Y on delta", timeout=20)
    assert glab.released()[1] > stuck[1]


# -- a restart of the primary master -----------------------------------------


@pytest.mark.parametrize("glab", ["checkpoint"], indirect=True)  # the member list is the same in both modes
def test_primary_master_restart_keeps_the_other_members(glab: GroupLab) -> None:
    """Restart alpha's primary (the checkpoint master) while gamma's group
    client cannot reach it for a second (well within the 3 s grace): r1
    is still a member, so the chain written right after the restart keeps
    dependency order through a disaster as soon as W3 is on beta."""
    glab.stop("alpha")
    glab.block_group_channel("gamma")
    try:
        glab.start("alpha")
        blocked_at = time.monotonic()
        r = ChainRound(90, {"W1": 90, "W2": 91, "W3": 92},
                       {w: pattern(f"master-restart-{glab.mode}-{w}") for w in ("W1", "W2", "W3")})
        for w, res in CHAIN:
            glab.write(res, r.blocks[w], r.data[w])
            r.written.append(w)
        deadline = time.monotonic() + 1.0
        while (time.monotonic() < deadline
               and glab.read_block("beta", r.blocks["W3"]) != r.data["W3"]):
            time.sleep(0.002)
        glab.disaster()
    finally:
        glab.block_group_channel("gamma", blocked=False)
    glab.settle()
    r.seen = frozenset(read_chain(glab, r))
    print(f"\nmaster restart: state {sorted(r.seen)} "
          f"({time.monotonic() - blocked_at:.1f} s after the restart)")
    restart_primaries(glab)
    assert r.allowed, f"forbidden state after a master restart: {sorted(r.seen)}"


# -- behaviour 13 (last: gamma's primary stays dead) ----------------------------


def test_member_resigns_when_its_primary_is_lost(glab: GroupLab) -> None:
    """Behaviour 13: gamma's primary dies for good. Until the grace is
    over r0 waits for r1 (a write X on r0 after the loss is not applied);
    then r1 resigns and r0 advances alone: X reaches beta, r1's state in
    the view is "resigned" and delta's image stays where it was."""
    glab.wait(lambda: glab.released()[0] > 0, "the group to release")
    glab.kill("gamma")
    glab.stop_relay()
    lost_at = time.monotonic()
    x = pattern(f"resign-{glab.mode}-X")
    glab.write("r0", 400, x)
    time.sleep(1.5)
    assert glab.read_block("beta", 400) != x, "beta applied X before r1 resigned"
    glab.wait(lambda: glab.read_block("beta", 400) == x, "X on beta once r1 resigned",
              timeout=15)
    resigned_after = time.monotonic() - lost_at
    view = glab.wait(lambda: (v := glab.view()).get("members", {}).get("r1", {})
                     .get("state") == "resigned" and v, "r1 resigned in the view", timeout=5)
    assert view["members"]["r0"]["state"] == "active", view
    print(f"\n{glab.mode}: r1 resigned, r0 advanced alone {resigned_after:.1f} s after "
          f"gamma's primary died")
    frozen = glab.image["delta"].read_bytes()
    before = glab.released()
    glab.write("r0", 401, x)
    glab.wait(lambda: glab.read_block("beta", 401) == x, "r0 still advancing", timeout=10)
    assert glab.released() > before
    assert glab.image["delta"].read_bytes() == frozen, "delta's image changed after it resigned"

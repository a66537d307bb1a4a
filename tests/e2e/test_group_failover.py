"""Failover of a consistency group (DESIGN §13), on the four-host lab of
tests/fixtures/group_lab.py (r0: alpha -> beta, r1: gamma -> delta, r1's
link slowed):

- must-complete across restart and buffer persistence (seed 000 behaviours
  10 and 19): kill -9 a member's secondary again and again under load; each
  restart finishes the release it was applying (update-in-progress is in
  group.json), the group goes on, and after the load the images equal the
  primaries' byte for byte;
- `duplex promote g0` on both secondary hosts after a disaster: every
  member at the same group point (the loss reports say which), and the
  secondaries hold a prefix of a dependent chain that alternated between
  the two primaries.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from contextlib import ExitStack
from typing import Iterator

import subprocess

import pytest

from fixtures.duplex_lab import REPO, duplex_env
from fixtures.group_lab import BLOCK, GroupLab, pattern
from fixtures.processes import ProcessGroup

pytestmark = pytest.mark.system  # root, namespaces, nbdkit

DELAY_MS = 120
SEED = int(os.environ.get("DUPLEX_GROUP_SEED", time.time_ns() % 100000))


@pytest.fixture(scope="module")
def flab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GroupLab]:
    if os.geteuid() != 0:
        pytest.fail("the group lab needs root (network namespaces)", pytrace=False)
    root = tmp_path_factory.mktemp("group-failover")
    with ExitStack() as stack:
        procs = stack.enter_context(ProcessGroup(root / "logs"))
        lab = GroupLab.create(root / "lab", procs, mode="checkpoint", delay_ms=DELAY_MS)
        stack.callback(lab.close)
        lab.start_all()
        lab.wait_established()
        yield lab


def _digest(path, size: int) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        h.update(f.read(size))
    return h.hexdigest()


def test_a_killed_secondary_finishes_its_release_on_restart(flab: GroupLab) -> None:
    """Behaviours 10 and 19: kill -9 delta while both primaries write;
    its restart finds group.json (update-in-progress when a release was
    being applied), finishes it, and the group releases again; nothing is
    lost or applied twice in a way that changes the result."""
    rng = random.Random(SEED)
    lab = flab
    kills, in_progress_seen = 6, 0
    block = 200
    for k in range(kills):
        until = time.monotonic() + rng.uniform(0.15, 0.4)
        while time.monotonic() < until:  # both primaries write, each after the other
            lab.write("r0", block, os.urandom(BLOCK))
            lab.write("r1", block, os.urandom(BLOCK))
            block = 200 + (block - 199) % 300
        lab.kill("delta")
        state = json.loads((lab.meta["delta"] / "group.json").read_text())
        if state["in_progress"] is not None:
            in_progress_seen += 1
        before = lab.released()
        lab.start("delta")
        # The group goes on: a release newer than before the kill, and no
        # update in progress left behind on delta.
        lab.wait(lambda: lab.released()[0] > before[0], "a release after delta's restart",
                 timeout=30)
        lab.wait(lambda: lab.group("delta").get("update_in_progress") is None
                 or lab.group("delta")["released"]["n"] > state["released_n"],
                 "delta's restart to finish its release", timeout=30)
    print(f"\n{kills} kills of delta under load, {in_progress_seen} caught a release "
          f"being applied (update-in-progress in group.json)")
    lab.wait_drained()
    # Idle, the group converges: every write is released and applied.
    lab.wait(lambda: all(_digest(lab.image[s], lab.size) == _digest(lab.image[p], lab.size)
                         for p, s in (("alpha", "beta"), ("gamma", "delta"))),
             "the secondaries' images to equal the primaries'", timeout=30, interval=0.2)


def test_a_member_catching_up_stays_in_the_group_at_its_point(flab: GroupLab) -> None:
    """r1's link is cut while gamma writes past its send ring (Ahead); then
    the chain W1 on r1, W2 on r0 after W1's reply, W3 on r1 after W2's.
    W1 and W3 reach delta in r1's catch-up increment once the link is back;
    the increment waits for the group's point, so delta never shows W3
    while beta lacks W2 (sampled while neither is applying a release), and
    r1 never resigns. Applied as soon as it committed (the increment not
    held), delta would show {W1, W3} before beta has W2."""
    lab = flab
    w1, w2, w3 = (pattern(f"catchup-{w}") for w in ("W1", "W2", "W3"))
    lab.stop_relay()  # r1's link is cut
    big = os.urandom(1 << 20)
    for i in range(10):  # 10 MiB > the 8 MiB ring: gamma goes Ahead
        lab.handle("r1").pwrite(big, (4 << 20) + i * (1 << 20))
    lab.wait(lambda: lab.status("gamma").get("replication") == "Ahead", "gamma Ahead")
    lab.write("r1", 900, w1)
    lab.write("r0", 900, w2)
    lab.write("r1", 901, w3)
    lab.start_relay()  # back: the catch-up runs
    bad, samples = [], 0
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        view = lab.view()
        if (view.get("members") or {}).get("r1", {}).get("state") == "resigned":
            bad.append("r1 resigned during its catch-up")
            break
        gb, gd = lab.group("beta"), lab.group("delta")
        w3_on_delta = lab.read_block("delta", 901) == w3
        w2_on_beta = lab.read_block("beta", 900) == w2
        if gb.get("update_in_progress") is None and gd.get("update_in_progress") is None:
            samples += 1
            if w3_on_delta and not w2_on_beta:
                bad.append(f"delta has W3 while beta lacks W2 (released "
                           f"{gb.get('released')}, {gd.get('released')})")
                break
        if w3_on_delta and w2_on_beta:
            break
        time.sleep(0.01)
    assert not bad, bad
    assert [lab.read_block("delta", 900) == w1, lab.read_block("beta", 900) == w2,
            lab.read_block("delta", 901) == w3] == [True] * 3, \
        "the catch-up did not bring the chain to the secondaries"
    print(f"\ncatch-up inside the group: {samples} unfenced samples, none with W3 before W2")
    lab.wait_established(timeout=60)


def _advancing(lab: GroupLab, node: str, window: float = 0.6) -> bool:
    """Does *node*'s released point move within *window* seconds?"""
    first = (lab.group(node).get("released") or {}).get("n")
    time.sleep(window)
    return (lab.group(node).get("released") or {}).get("n") != first


def test_losing_a_master_stops_the_point_and_it_resumes(flab: GroupLab) -> None:
    """The rendezvous master (beta) killed: no member applies past the
    last release; restarted, it learns the point from the joins and goes on.
    The checkpoint master (alpha's primary) killed: no checkpoint, so the
    point stops on both secondaries, at the same release; restarted, it
    issues larger numbers and the point moves again."""
    lab = flab
    assert _advancing(lab, "delta")
    lab.kill("beta")
    time.sleep(0.3)
    stuck = lab.group("delta")["released"]
    assert not _advancing(lab, "delta"), "delta applies releases with its master gone"
    lab.start("beta")
    lab.wait(lambda: lab.group("delta")["released"]["n"] > stuck["n"],
             "releases after the rendezvous master's restart", timeout=30)
    lab.kill("alpha")
    time.sleep(0.5)
    point = lab.group("beta")["released"]
    assert not _advancing(lab, "beta") and not _advancing(lab, "delta")
    lab.wait(lambda: lab.group("delta")["released"] == point and
             lab.group("delta").get("update_in_progress") is None,
             "delta at beta's point", timeout=10)
    blocked = lab.view().get("blocked") or ""
    assert "waiting for" in blocked and "r0" in blocked, blocked
    lab.start("alpha")
    lab.wait(lambda: lab.group("delta")["released"]["n"] > point["n"],
             "releases after the checkpoint master's restart", timeout=30)


def test_failover_script_dry_run_walks_each_member_of_the_group(flab: GroupLab) -> None:
    r = subprocess.run([str(REPO / "scripts" / "failover"), "--config", str(flab.config),
                        "--node", "delta", "--dry-run", "g0"],
                       capture_output=True, text=True, timeout=60, env=duplex_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failover of r1 to node delta (dry run: nothing is changed)" in r.stdout
    assert "would promote node delta" in r.stdout and "r1: dry run done" in r.stdout


def test_promote_group_puts_both_secondary_hosts_at_one_point(flab: GroupLab) -> None:
    """A dependent chain alternating between the primaries (each write
    after the previous one's reply), a disaster in the middle of it, then
    `duplex promote g0` on beta and on delta: both loss reports give the
    same group point, and the secondaries hold a prefix of the chain."""
    lab = flab
    alone = lab.duplex("delta", "promote", "r1", check=False)
    assert alone.returncode == 1 and "member of consistency group g0" in alone.stderr \
        and "duplex promote g0" in alone.stderr, alone.stderr
    chain = []  # (resource, block, data), in dependency order
    for i in range(120):
        res = ("r0", "r1")[i % 2]
        data = pattern(f"chain-{i}")
        lab.write(res, 600 + i // 2, data)
        chain.append((res, 600 + i // 2, data))
        time.sleep(0.004)
    lab.disaster()
    reports = {}
    for node in ("beta", "delta"):
        r = lab.duplex(node, "promote", "g0", "--json", timeout=120)
        (member,) = json.loads(r.stdout)["members"]
        reports[node] = member["loss_report"]
    g_beta, g_delta = reports["beta"]["group"], reports["delta"]["group"]
    assert g_beta["point_ns"] == g_delta["point_ns"] and g_beta["point_ns"] > 0
    assert g_beta["checkpoint"] == g_delta["checkpoint"]
    assert not g_beta.get("resigned") and not g_delta.get("resigned")
    held = []
    for res, block, data in chain:
        node = "beta" if res == "r0" else "delta"
        held.append(lab.read_block(node, block) == data)
    prefix = held.index(False) if False in held else len(held)
    assert all(held[:prefix]) and not any(held[prefix:]), \
        f"not a prefix of the chain: {''.join('1' if h else '0' for h in held)}"
    lost = sum(len(rep["lost"]) for rep in reports.values())
    print(f"\npromote g0: both at checkpoint {g_beta['checkpoint']}, the chain's first "
          f"{prefix} of {len(chain)} writes held, {lost} records listed lost")

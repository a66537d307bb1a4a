"""One write order across the volumes of a resource (issue 12), shown with
samples of the secondary checked against the global history.

The workload is a dependent chain (tests/fixtures/volume_history.py): write
i on one volume, wait for its reply, write i+1 on the other, each block
stamped with its global index. Every sample of a replica that keeps one
order across volumes is the history replayed to ONE prefix, both volumes
together. The first test shows the check can fail: the same chain over two
independent single-volume resources, one behind a slowed link, yields the
forbidden state (a later write on one volume without an earlier one on the
other).

Samples are taken by stopping the secondary daemons (SIGSTOP: a process
stops between system calls, so its image is what it had written at that
instant), reading the images, and continuing them; or by kill -9 and a
restart.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import nbd
import pytest
from fixtures.bank_ledger import Bank, check_bank
from fixtures.duplex_lab import VENV_BIN, Lab
from fixtures.netns import NetnsPair
from fixtures.processes import ProcessGroup
from fixtures.volume_history import (
    BLOCK,
    Chain,
    Sample,
    VolumeHistory,
    frozen_sample,
    read_images,
    status_sample,
)

pytestmark = pytest.mark.system  # root, namespaces, nbdkit (the module lab is no conftest fixture)

SIZE = 1 << 20  # small images (16 tracks each): a sample reads them whole in a millisecond
SLOTS = 64      # each volume's chain blocks cycle over its first 64 blocks
RELAY = Path(__file__).with_name("delay_relay.py")


def _connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def _start_primary_through_relay(lab: Lab, procs, delay_ms: int) -> None:
    """Start *lab*'s primary with its link to the secondary through a
    delaying relay in the primary's namespace. Only the primary reads the
    relayed address: the config is restored once it runs, so a secondary
    started again later still listens where it did."""
    relay_port = lab.port + 1
    relay = procs.start([str(VENV_BIN / "python"), str(RELAY), str(relay_port), lab.addr_b,
                         str(lab.port), str(delay_ms)], name=f"relay-{lab.port}", netns=lab.ns_a)
    lab.wait(lambda: "relay listening" in relay.log_text(), "the delay relay", proc=relay)
    text = lab.config.read_text()
    direct = f'address = "{lab.addr_b}:{lab.port}"'
    assert direct in text, f"no {direct} in {lab.config}"
    lab.config.write_text(text.replace(direct, f'address = "127.0.0.1:{relay_port}"'))
    try:
        lab.start_primary(history=False)
    finally:
        lab.config.write_text(text)


def test_two_independent_resources_show_the_forbidden_state(make_lab, procs):
    """The counterexample: volume 'data' is one resource behind a link
    slowed by 150 ms, volume 'wal' another on a fast link. Samples of the
    two secondaries, 'wal' stopped first (so 'wal' held at least as much at
    the instant 'data' stopped: the state is real, not an artefact of
    reading one after the other), hold a later write on 'wal' without an
    earlier one on 'data'. Once both have drained, the same check accepts
    the pair: it is the slowed link, not the checker, that fails."""
    data = make_lab(size=SIZE, port=7789)
    wal = make_lab(size=SIZE, port=7791)
    for lab in (data, wal):
        lab.create_md()
        lab.start_secondary()
    _start_primary_through_relay(data, procs, delay_ms=150)
    wal.start_primary(history=False)
    handles = {"data": _connect(data.uri), "wal": _connect(wal.uri)}
    history = VolumeHistory({"data": SIZE, "wal": SIZE})
    chain = Chain(history, lambda v, off, buf: handles[v].pwrite(buf, off), ("data", "wal"),
                  slots=SLOTS).start()
    images = {"data": data.image["beta"], "wal": wal.image["beta"]}
    samples = []
    try:
        chain.wait_for(200)
        for _ in range(30):
            samples.append(frozen_sample([wal.secondary.pid, data.secondary.pid], images))
            time.sleep(0.05)
    finally:
        n = chain.stop()
    verdicts = [history.check(s) for s in samples]
    forbidden = [v for v in verdicts if not v.ok]
    real = [v for v in forbidden if v.later[1] == "wal" and v.missing[1] == "data"]
    print(f"\ncounterexample: {n} chain writes, {len(samples)} samples, "
          f"{len(forbidden)} forbidden ({len(real)} later-on-wal), e.g.: "
          f"{forbidden[-1].message if forbidden else '-'}")
    assert real, ("the slowed independent resources never showed the forbidden state in "
                  f"{len(samples)} samples: {[v.message for v in verdicts[:3]]}")
    # Drained, the pair is the whole history: the check accepts it.
    for lab in (data, wal):
        lab.wait_drained(timeout=30)
    final = history.check({v: p.read_bytes() for v, p in images.items()})
    assert final.ok and final.prefix[1] == n, final.message
    # The bank of seed 004 T42 over the same pair: it loses or makes money,
    # or a deposit appears without its account.
    bank = Bank(lambda v, off, buf: handles[v].pwrite(buf, off))
    bank.open_accounts()
    for lab in (data, wal):
        lab.wait_drained(timeout=30)
    bank.history = VolumeHistory({"data": SIZE, "wal": SIZE}, base=read_images(images))
    bank.start()
    ledgers = []
    try:
        time.sleep(0.3)
        for _ in range(10):
            ledgers.append(frozen_sample([wal.secondary.pid, data.secondary.pid], images))
            time.sleep(0.05)
    finally:
        rounds = bank.stop()
    # Counted only where the later write is on 'wal' (stopped first): real states.
    broken = [p[0] for s in ledgers if (p := check_bank(bank, s))
              and (v := bank.history.check(s)).later and v.later[1] == "wal"]
    print(f"bank over two resources: {rounds} rounds, {len(ledgers)} samples, {len(broken)} "
          f"broken ledgers, e.g.: {broken[-1] if broken else '-'}")
    assert broken, "the bank over two independent resources never showed a broken ledger"
    for h in handles.values():
        h.shutdown()


# -- one resource, two volumes ----------------------------------------------

VOLUMES = ["data", "wal"]
# The two-volume lab's volumes: 64 tracks each, so that a catch-up of all
# of them takes many increments (long enough to be seen and killed in).
VSIZE = 4 << 20


@pytest.fixture(scope="module")
def vlab(tmp_path_factory) -> Iterator[tuple[Lab, NetnsPair]]:
    """One resource with volumes 'data' and 'wal', shared by the tests
    below, its link slowed by 50 ms (a relay, as in the counterexample);
    every process stopped and both namespaces deleted at the end."""
    if os.geteuid() != 0:
        pytest.fail("the two-volume lab needs root (network namespaces)", pytrace=False)
    root = tmp_path_factory.mktemp("volumes")
    with ExitStack() as stack:
        procs = stack.enter_context(ProcessGroup(root / "logs"))
        pair = NetnsPair.create(procs)
        stack.callback(pair.close)
        lab = Lab(root / "lab", procs, pair.ns_a, pair.ns_b, pair.addr_a, pair.addr_b,
                  size=VSIZE, volumes=VOLUMES,
                  options={"ring-size": "8MiB", "journal-size": "32MiB"})
        stack.callback(lab.stop)
        _VLAB_PROCS.append(procs)
        lab.create_md()
        lab.start_secondary()
        _start_primary_through_relay(lab, procs, delay_ms=50)
        yield lab, pair


_VLAB_PROCS: list[ProcessGroup] = []


@pytest.fixture(autouse=True)
def _vlab_logs(request: pytest.FixtureRequest) -> None:
    """A failed test's report carries the shared lab's process logs (the
    conftest hook reads the groups listed on the test item)."""
    groups = getattr(request.node, "_dpx_process_groups", [])
    groups.extend(_VLAB_PROCS)
    request.node._dpx_process_groups = groups


def _volume_handles(lab: Lab) -> dict[str, nbd.NBD]:
    return {v: _connect(lab.volume_uri(v)) for v in VOLUMES}


def _images(lab: Lab, node: str = "beta") -> dict[str, bytes]:
    """volume -> *node*'s image of it, now."""
    return read_images(lab.images[node])


def _frozen(lab: Lab) -> dict[str, bytes]:
    """The secondary's images at one instant (SIGSTOP, read, SIGCONT)."""
    return frozen_sample([lab.secondary.pid], lab.images["beta"])


def _status_sample(lab: Lab) -> Sample:
    """A frozen sample that also says whether it is whole."""
    return status_sample(lab.secondary.pid, lab.images["beta"], lambda: lab.control("beta"))


def _start_history(lab: Lab) -> VolumeHistory:
    """A history whose base is the pair as it is now (drained: equal)."""
    lab.wait_drained(timeout=60)
    base = _images(lab, "alpha")
    assert _images(lab) == base, "the secondary differs after a drain"
    return VolumeHistory({v: VSIZE for v in VOLUMES}, base=base)


def _kill9_sample(lab: Lab) -> dict[str, bytes]:
    """kill -9 the secondary, read its images, start it again and wait
    until its journal is replayed (it answers status again)."""
    os.killpg(lab.secondary.pid, signal.SIGKILL)
    lab.secondary.wait(10)
    images = _images(lab)
    lab.start_secondary()
    return images


def test_one_resource_keeps_one_order_across_volumes(vlab):
    """The same chain on one two-volume resource: every sample, frozen or
    after kill -9, is the global history replayed to one prefix across
    both volumes; drained, the replica is the whole history."""
    lab, _ = vlab
    history = _start_history(lab)
    handles = _volume_handles(lab)
    chain = Chain(history, lambda v, off, buf: handles[v].pwrite(buf, off), VOLUMES,
                  slots=SLOTS).start()
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        chain.wait_for(200)
        for i in range(40):
            if i in (13, 26):
                samples.append(("kill -9", _kill9_sample(lab)))
            else:
                samples.append(("frozen", _frozen(lab)))
            time.sleep(0.04)
    finally:
        n = chain.stop()
    lab.wait_drained(timeout=60)
    verdicts = [(how, history.check(s)) for how, s in samples]
    bad = [f"sample {i} ({how}): {v.message}" for i, (how, v) in enumerate(verdicts) if not v.ok]
    prefixes = sorted({v.prefix[1] for _, v in verdicts if v.ok})
    print(f"\none resource: {n} chain writes, {len(samples)} samples, {len(bad)} violations, "
          f"{len(prefixes)} distinct prefixes")
    assert not bad, "\n".join(bad)
    # The samples saw the replica at many points, not one quiet state.
    assert len(prefixes) >= 10, prefixes
    final = history.check(_images(lab))
    assert final.ok and final.prefix[1] == n, final.message
    for h in handles.values():
        h.shutdown()


def test_catch_up_after_a_link_outage_keeps_one_order(vlab):
    """The chain goes on while the link is cut, over every block of both
    volumes: the primary goes Ahead (the 8 MiB ring overflows) and catches
    up in increments that freeze both volumes at one fence. Every whole
    sample on the way (no apply run or increment in flight while it was
    taken) is one prefix across both volumes; a kill -9 in the middle of
    the catch-up changes nothing."""
    lab, pair = vlab
    history = _start_history(lab)
    handles = _volume_handles(lab)
    chain = Chain(history, lambda v, off, buf: handles[v].pwrite(buf, off), VOLUMES,
                  slots=SLOTS).start()
    seen: set[str] = set()
    samples: list[Sample] = []
    killed_at = None
    try:
        chain.wait_for(100)
        sent0 = lab.control("alpha")["incr_bytes_sent"]
        pair.link_down()
        try:
            # Every track of both volumes out of sync: a catch-up of many
            # increments, long enough to be seen and killed in.
            chain.slots = VSIZE // BLOCK
            lab.wait(lambda: lab.control("alpha")["replication"] == "Ahead",
                     "the primary to go Ahead", timeout=30)
            chain.wait_for(len(history) + 2 * VSIZE // BLOCK)
            chain.slots = SLOTS
        finally:
            pair.link_up()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(samples) < 60:
            p = lab.control("alpha")
            seen.add(p["replication"])
            if killed_at is None and p["replication"] == "SyncSource":
                _kill9_sample(lab)  # the raw image may be mid-increment: not checked
                killed_at = len(samples)
                continue
            if len(samples) % 2:
                chain.gate.clear()  # a lull: the secondary goes quiet, the sample is whole
                time.sleep(0.03)
            try:
                samples.append(_status_sample(lab))
            finally:
                chain.gate.set()
            # Until streaming resumed after the catch-up (the chain keeps
            # some tracks out of sync while their writes are in flight).
            # ...and whole samples at five points at least.
            if (len(samples) >= 20 and killed_at is not None
                    and p["replication"] == "Established" and p["incr_bytes_sent"] > sent0
                    and len({x.applied for x in samples if x.whole}) >= 5):
                break
            time.sleep(0.03)
    finally:
        chain.gate.set()
        pair.link_up()
        n = chain.stop()
    lab.wait_drained(timeout=60)
    whole = [s for s in samples if s.whole]
    verdicts = [history.check(s.images) for s in whole]
    bad = [v.message for v in verdicts if not v.ok]
    torn = sum(not history.check(s.images).ok for s in samples if not s.whole)
    print(f"\ncatch-up: {n} chain writes, states {sorted(seen)}, {len(samples)} samples "
          f"({len(whole)} whole), killed after sample {killed_at}, {len(bad)} violations, "
          f"{torn} non-whole samples not a prefix")
    assert lab.control("alpha")["incr_bytes_sent"] > sent0, "no increment was sent"
    assert killed_at is not None, f"the catch-up was never seen (states {seen}): no kill in it"
    assert not bad, "\n".join(bad)
    assert len({v.prefix[1] for v in verdicts}) >= 5, [v.prefix for v in verdicts]
    final = history.check(_images(lab))
    assert final.ok and final.prefix[1] == n, final.message
    for h in handles.values():
        h.shutdown()


def test_the_bank_of_seed_004_t42_balances_in_every_sample(vlab):
    """Seed 004 T42 on two volumes: accounts on 'data' and 'wal', customers
    opened on 'data', deposits on 'wal', withdrawals on 'data', transfers
    debited on one volume and credited on the other after the debit's
    reply. No sample (frozen or after kill -9) shows a deposit without its
    account, a withdrawal without its deposit, or a total other than the
    money the bank was opened with."""
    lab, _ = vlab
    handles = _volume_handles(lab)
    bank = Bank(lambda v, off, buf: handles[v].pwrite(buf, off))
    bank.open_accounts()
    bank.history = _start_history(lab)
    bank.start()
    samples = []
    try:
        time.sleep(0.3)
        for i in range(25):
            samples.append(_kill9_sample(lab) if i == 12 else _frozen(lab))
            time.sleep(0.04)
    finally:
        rounds = bank.stop()
    lab.wait_drained(timeout=60)
    broken = [f"sample {i}: {p}" for i, s in enumerate(samples) for p in check_bank(bank, s)]
    torn = [f"sample {i}: {v.message}" for i, s in enumerate(samples)
            if not (v := bank.history.check(s)).ok]
    print(f"\nbank on one resource: {rounds} rounds, {len(samples)} samples, "
          f"{len(broken)} broken ledgers, {len(torn)} not a prefix")
    assert not broken, "\n".join(broken)
    assert not torn, "\n".join(torn)
    assert rounds >= 20, "too few rounds to show anything"
    assert check_bank(bank, _images(lab)) == []
    for h in handles.values():
        h.shutdown()

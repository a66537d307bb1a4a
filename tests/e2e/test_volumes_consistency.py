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

import time
from pathlib import Path

import nbd

from fixtures.duplex_lab import VENV_BIN, Lab
from fixtures.volume_history import BLOCK, Chain, VolumeHistory, frozen_sample

SIZE = 1 << 20  # small images: a sample reads them whole in well under a millisecond
SLOTS = 64      # each volume's chain blocks cycle over its first 64 blocks
RELAY = Path(__file__).with_name("delay_relay.py")


def _connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def _through_relay(lab: Lab, procs, delay_ms: int) -> None:
    """Route *lab*'s primary to its secondary through a delaying relay in
    the primary's namespace (the secondary still listens where it did)."""
    relay_port = lab.port + 1
    relay = procs.start([str(VENV_BIN / "python"), str(RELAY), str(relay_port), lab.addr_b,
                         str(lab.port), str(delay_ms)], name=f"relay-{lab.port}", netns=lab.ns_a)
    lab.wait(lambda: "relay listening" in relay.log_text(), "the delay relay", proc=relay)
    text = lab.config.read_text()
    lab.config.write_text(text.replace(f'address = "{lab.addr_b}:{lab.port}"',
                                       f'address = "127.0.0.1:{relay_port}"'))


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
    _through_relay(data, procs, delay_ms=150)
    for lab in (data, wal):
        lab.start_primary(history=False)
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
    for h in handles.values():
        h.shutdown()

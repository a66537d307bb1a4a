"""Every thread of the primary is supervised (issue 10 item 1): a real
Engine (C core, bitmaps, metadata, control socket; no nbdkit, no peer) whose
seq-mark keeper or shipper raises shows the fault in status within seconds,
and the thread is restarted instead of ending silently."""
from __future__ import annotations

import errno

import pytest

from replicator.config import load_config
from replicator.node import create_metadata_set
from replicator.peerlink import PeerLink
from replicator.primary.engine import Engine
from replicator.status import health_problems
from fixtures.polling import eventually as _wait


@pytest.fixture
def engine(r0_config, monkeypatch):
    cfg = load_config(str(r0_config))
    res = cfg.resource("r0")
    create_metadata_set(cfg, res, res.node("alpha"), 4 << 20, assume_clean=True, force=False)
    attempts = []

    def no_peer(address, **kw):
        attempts.append(address)
        raise OSError(errno.ECONNREFUSED, "Connection refused")
    monkeypatch.setattr(PeerLink, "connect", no_peer)
    eng = Engine.open(str(r0_config), "r0", "alpha")
    eng.attempts = attempts
    yield eng
    eng.stop(drain_timeout=0.5)


def test_a_failing_seq_mark_keeper_is_a_fault_in_status_and_restarts(engine, monkeypatch):
    calls = []

    def full(next_seq):
        calls.append(next_seq)
        raise OSError(errno.ENOSPC, "No space left on device", "/meta/.metadata.json")
    monkeypatch.setattr(engine.mark, "advance", full)
    engine.start()
    st = _wait(lambda: (s := engine.status())["faults"] and s, "the fault in status")
    f = st["faults"][0]
    assert (f["thread"], f["state"]) == ("duplex-mark", "restarting"), f
    assert f["error"] == "No space left on device (/meta/.metadata.json)"
    assert any("duplex-mark" in p for p in health_problems(st))
    _wait(lambda: len(calls) >= 2, "the keeper to run again", timeout=10)


def test_a_bug_in_the_shipper_is_a_fault_and_it_keeps_trying(engine, monkeypatch):
    def boom(address, **kw):
        engine.attempts.append(address)
        raise RuntimeError("boom")
    monkeypatch.setattr(engine.shipper, "_connect_link", boom)
    engine.start()
    st = _wait(lambda: (s := engine.status())["faults"] and s, "the fault in status")
    assert st["faults"][0]["thread"] == "duplex-shipper"
    assert "shipper failed: RuntimeError: boom; restarting" in st["reason"]
    assert st["connection"] == "Connecting" and st["last_error"].startswith("shipper failed")
    _wait(lambda: len(engine.attempts) >= 2, "the restarted shipper to try again", timeout=10)


def test_without_a_peer_the_primary_says_connecting_with_the_error(engine):
    engine.start()
    st = _wait(lambda: (s := engine.status())["last_error"] and s, "the connect error")
    assert (st["connection"], st["replication"]) == ("Connecting", "Off")
    assert st["last_error"] == "connecting to beta (10.0.0.2:7789): Connection refused"
    assert st["faults"] == [] and st["peer"]["disk"] == "Unknown"

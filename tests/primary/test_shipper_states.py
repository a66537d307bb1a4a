"""The shipper's sender loop with a fake link factory (no sockets): it
moves state only through replicator/primary/states.py, re-reads the secret
at every attempt, names a refusal or a split brain, and a bug in it is a
supervised fault that restarts it instead of ending replication."""
from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest

from replicator.config import read_secret
from replicator.modes import Modes
from replicator.peerlink import LinkError, RefusedError
from replicator.primary import shipper as shipper_mod
from replicator.primary import states as st
from replicator.primary.shipper import Shipper
from replicator.protocol.errors import ErrorCode
from replicator.supervise import Supervisor
from fixtures.polling import eventually as _wait


class _Core:
    next_seq = 1
    ring_stats = {"bytes": 0, "oldest_seq": 0}
    dropped = False

    def ship_inflight(self):
        return None

    def ship_waiting_ts(self):
        return None

    def wake(self):
        pass

    def set_flow(self, policy):
        self.policy = policy

    def set_durable(self, seq):
        pass

    def flow_stats(self):
        return {"room_timeouts": 0, "room_waiting": 0, "room_wait_s": 0.0, "peer_waits": 0,
                "peer_wait_s": 0.0, "peer_waiting": 0, "room_waits": 0, "delays": 0}


def _shipper(tmp_path, connect, faults=None):
    secret = tmp_path / "r0.secret"
    res = SimpleNamespace(name="r0", connections=1, ring_size=1 << 20, resync_rate=0, modes=Modes(),
                          batch_bytes=1 << 20, batch_interval_s=0.001,
                          secret=lambda: read_secret(str(secret), "duplex.toml: resource.r0.secret-file"))
    peer = SimpleNamespace(name="beta", address=("127.0.0.1", 1),
                           address_str=lambda: "127.0.0.1:1")
    md = SimpleNamespace(resource_uuid="ab" * 16, generation="cd" * 16, device_size=1 << 20,
                         track_size=65536, bitmap_uuid=None, history=[],
                         volumes=[{"name": "default", "size": 1 << 20}])
    sup = Supervisor("r0 primary", on_fault=lambda f: sh.fault(f.error))
    ids = iter(range(1, 1000))
    sh = Shipper(_Core(), res, peer, "alpha", md, SimpleNamespace(nbits=16), resync_reason=None,
                 supervisor=sup, next_verify_id=lambda: next(ids), connect=connect)
    return sh, sup, secret


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(shipper_mod, "CONFIG_RETRY", 0.05)
    monkeypatch.setattr(shipper_mod, "REFUSED_RETRY", 0.05)
    monkeypatch.setattr(shipper_mod, "BACKOFF_MAX", 0.05)


def test_a_bad_secret_is_standalone_naming_the_file_and_fixing_it_connects(tmp_path):
    calls = []

    def connect(address, **kw):
        calls.append(kw["secret"])
        raise LinkError("Connection refused")

    sh, sup, secret = _shipper(tmp_path, connect)
    sh.start()
    try:
        _wait(lambda: "does not exist" in (sh.states.error or ""), "the missing file to be named")
        assert sh.states.connection == st.STANDALONE and not calls
        assert str(secret) in sh.snapshot()["reason"]
        secret.write_text("s3cret\n")
        secret.chmod(0o644)
        _wait(lambda: "chmod 600" in (sh.states.error or ""), "the open mode to be named")
        assert not calls
        secret.chmod(0o600)  # fixed: the next attempt reads it again
        _wait(lambda: calls, "a connection attempt")
        assert calls[0] == b"s3cret"
        _wait(lambda: sh.states.connection == st.CONNECTING, "Connecting")
        assert "Connection refused" in sh.states.error
        assert sup.faults() == []
    finally:
        sh.stop(0.1)
        sup.stop()


def test_a_split_brain_refusal_is_named_as_such(tmp_path):
    def connect(address, **kw):
        raise RefusedError("peer refused: split brain: ...; run `duplex connect r0 "
                           "--discard-my-data` on the node whose data is to be discarded",
                           ErrorCode.SPLIT_BRAIN)

    sh, sup, secret = _shipper(tmp_path, connect)
    secret.write_text("s\n")
    secret.chmod(0o600)
    sh.start()
    try:
        _wait(lambda: sh.states.replication == st.SPLIT_BRAIN, "SplitBrain")
        snap = sh.snapshot()
        assert (snap["connection"], snap["replication"]) == ("StandAlone", "SplitBrain")
        assert "duplex connect r0 --discard-my-data" in snap["reason"]
    finally:
        sh.stop(0.1)
        sup.stop()


def test_a_bug_in_the_sender_is_a_fault_and_the_sender_restarts(tmp_path):
    calls = []
    unblock = threading.Event()

    def connect(address, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")  # a bug, not a network error
        unblock.wait(5)
        raise LinkError("Connection refused")

    sh, sup, secret = _shipper(tmp_path, connect)
    secret.write_text("s\n")
    secret.chmod(0o600)
    sh.start()
    try:
        _wait(lambda: sup.faults(), "the fault to be recorded")
        fault = sup.faults()[0]
        assert (fault["thread"], fault["state"]) == ("duplex-shipper", "restarting")
        assert "boom" in fault["error"]
        assert "shipper failed: RuntimeError: boom" in (sh.states.error or "")
        _wait(lambda: len(calls) >= 2, "the restarted sender to connect again", timeout=10)
        assert sh._thread.is_alive()
    finally:
        unblock.set()
        sh.stop(0.1)
        sup.stop()


def test_the_primary_package_has_no_back_pointers_or_type_checking_imports():
    import replicator.primary as pkg
    root = os.path.dirname(pkg.__file__)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "TYPE_CHECKING" not in text, name
            assert "self.engine" not in text and "self.sh." not in text, name


def test_a_resync_asked_for_during_a_catch_up_is_not_lost_when_it_commits(tmp_path):
    # verify --fix marks tracks while a catch-up runs: they may lie outside
    # its frozen map, so the commit must not clear the owed resync.
    sh, sup, _ = _shipper(tmp_path, connect=None)
    for ev in (st.Attached(), st.ResyncNeeded("initial sync"), st.SyncStart()):
        sh._event(ev)
    sh.request_resync("verify found differing tracks")
    sh._committed(5)
    assert (sh.states.replication, sh.states.resync_reason) == (
        st.AHEAD, "verify found differing tracks")
    # Without a request meanwhile, the commit ends the resync.
    sh._event(st.SyncStart())
    sh._committed(6)
    assert (sh.states.replication, sh.states.resync_pending) == (st.ESTABLISHED, False)

"""The switchover's fence (replicator/primary/admin.py, DESIGN §7), with
stand-ins for the engine's parts: while ``duplex secondary`` drains and
hands over, every write, trim, zero and flush path refuses with EROFS; a
hand-over the peer does not confirm lifts the fence and changes nothing."""
from __future__ import annotations

import errno
import threading
from types import SimpleNamespace

import pytest

from replicator.primary import states as st
from replicator.primary.admin import AdminRefused, PrimaryAdmin


class FakeShipper:
    def __init__(self, confirm: bool):
        self.states = st.PrimaryStates.initial(None).step(st.Attached()).step(st.StreamStart())
        self.confirm = confirm
        self.seen_fenced: list[bool] = []
        self.admin: PrimaryAdmin | None = None

    def snapshot(self) -> dict:
        return {"journaled": 7, "applied": 7, "peer_disk": "UpToDate"}

    def hand_over(self, last: int, timeout: float) -> bool:
        assert self.admin is not None
        self.seen_fenced.append(self.admin.fenced)
        with pytest.raises(OSError) as e:  # a write arriving now
            self.admin.check_write()
        assert e.value.errno == errno.EROFS
        return self.confirm


def _admin(confirm: bool):
    res = SimpleNamespace(name="r0", journal_size=1 << 20)
    node = SimpleNamespace(name="alpha", export_uri=lambda: "nbd+unix:///?socket=/x")
    core = SimpleNamespace(flush=lambda: None, next_seq=8, ring_stats={"records": 0},
                           clear_on_release=True)
    oos = SimpleNamespace(count=lambda: 0)
    sh = FakeShipper(confirm)
    stopped = threading.Event()
    admin = PrimaryAdmin(res, node, "beta", SimpleNamespace(), core, oos, sh, 1 << 20,
                         stop_node=stopped.set)
    admin._clients = lambda: []
    demoted: list[bool] = []
    admin._become_secondary = lambda: demoted.append(True)
    sh.admin = admin
    return admin, sh, stopped, demoted


def test_writes_are_fenced_while_handing_over_and_the_node_stops_after():
    admin, sh, stopped, demoted = _admin(confirm=True)
    reply = admin.secondary(timeout_s=5)
    assert reply["handed_over_at"] == 7 and reply["role"] == "Secondary"
    assert sh.seen_fenced == [True] and demoted == [True] and stopped.is_set()
    with pytest.raises(OSError):  # stays read-only until nbdkit is gone
        admin.check_write()


def test_an_unconfirmed_hand_over_lifts_the_fence_and_stays_primary():
    admin, sh, stopped, demoted = _admin(confirm=False)
    with pytest.raises(AdminRefused, match="did not confirm the clean stop at seq 7"):
        admin.secondary(timeout_s=5)
    assert sh.seen_fenced == [True]
    assert not admin.fenced and demoted == [] and not stopped.is_set()
    admin.check_write()  # writable again


def test_clients_on_the_export_are_refused_before_anything_is_fenced():
    admin, sh, stopped, demoted = _admin(confirm=True)
    admin._clients = lambda: [5, 6]
    with pytest.raises(AdminRefused, match="2 NBD client connection"):
        admin.secondary(timeout_s=5)
    assert sh.seen_fenced == [] and not admin.fenced and not stopped.is_set()

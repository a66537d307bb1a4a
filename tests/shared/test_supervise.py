"""Supervised threads: an exception in a thread becomes a recorded fault,
restarted or failed as asked; nothing dies unseen."""
from __future__ import annotations

import threading

from replicator.supervise import FAILED, RESTARTING, Supervisor
from fixtures.polling import eventually as _wait


def test_a_failing_thread_without_restart_is_recorded_failed_and_reported():
    seen = []
    sup = Supervisor("r0", on_fault=seen.append)
    sup.spawn("duplex-apply", lambda: (_ for _ in ()).throw(OSError(28, "No space left on device", "/img")))
    faults = _wait(sup.failed)
    assert faults[0]["thread"] == "duplex-apply"
    assert faults[0]["state"] == FAILED
    assert faults[0]["error"] == "No space left on device (/img)"
    assert [f.thread for f in seen] == ["duplex-apply"]


def test_a_restartable_thread_runs_again_and_its_fault_clears_once_it_succeeds():
    runs = []

    def target():
        runs.append(1)
        if len(runs) < 3:
            raise ValueError("secret file /etc/duplex/r0.secret: mode 0644, must be 0600")

    sup = Supervisor("r0")
    sup.spawn("duplex-shipper", target, restart=True, backoff=(0.01, 0.02))
    _wait(lambda: len(runs) == 3)
    assert sup.join(2) == []
    assert sup.faults() == []


def test_a_restarting_fault_is_visible_while_it_lasts():
    release = threading.Event()

    def target():
        if not release.is_set():
            raise RuntimeError("boom")

    sup = Supervisor("r0")
    sup.spawn("duplex-shipper", target, restart=True, backoff=(0.05, 0.05))
    f = _wait(sup.faults)[0]
    assert f["state"] == RESTARTING and f["error"] == "RuntimeError: boom"
    _wait(lambda: sup.faults() and sup.faults()[0]["restarts"] >= 2)
    release.set()
    _wait(lambda: sup.faults() == [])


def test_stop_ends_restarts_and_exceptions_while_stopping_are_not_faults():
    sup = Supervisor("r0")
    stopping = threading.Event()

    def target():
        stopping.wait()
        raise ConnectionError("socket closed by stop")

    sup.spawn("duplex-reader", target, restart=True)
    sup.stop()
    stopping.set()
    assert sup.join(2) == []
    assert sup.faults() == []

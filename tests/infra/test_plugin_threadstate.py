"""nbdplugin/threadstate.py: one pinned Python thread state per thread."""
from __future__ import annotations

import threading

from nbdplugin import threadstate


def test_pin_takes_one_reference_per_thread_and_unpin_gives_it_back():
    seen: dict[str, object] = {}

    def body() -> None:
        tid = threading.get_ident()
        threadstate.pin()
        threadstate.pin()  # a second request on the same thread: no second reference
        seen["pinned"] = dict(threadstate._pinned).get(tid)
        threadstate.unpin()
        seen["after"] = tid in threadstate._pinned
        threadstate.unpin()  # a close without requests: nothing to give back

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen["pinned"] is not None
    assert seen["after"] is False


def test_pins_are_bounded(monkeypatch):
    monkeypatch.setattr(threadstate, "MAX_PINNED", 0)
    done = []

    def body() -> None:
        threadstate.pin()
        done.append(threading.get_ident() in threadstate._pinned)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert done == [False]

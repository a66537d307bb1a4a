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


def test_a_stale_entry_under_a_reused_ident_is_not_taken_for_this_threads_pin():
    """Thread idents are reused: an entry a dead thread left under this
    thread's ident must not count as this thread's pin, nor be released by
    it (releasing another thread's state crashed nbdkit)."""
    seen: dict[str, object] = {}

    def body() -> None:
        tid = threading.get_ident()
        threadstate._pinned[tid] = 12345  # what a thread that ended left behind
        threadstate.unpin()  # must not release 12345
        seen["kept"] = threadstate._pinned.get(tid)
        threadstate.pin()
        seen["own"] = threadstate._pinned.get(tid)
        threadstate.unpin()
        seen["after"] = tid in threadstate._pinned

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen["kept"] == 12345
    assert seen["own"] not in (None, 12345)
    assert seen["after"] is False


def test_disabled_pins_nothing(monkeypatch):
    monkeypatch.setattr(threadstate, "enabled", False)
    seen = []

    def body() -> None:
        threadstate.pin()
        seen.append(threading.get_ident() in threadstate._pinned)

    t = threading.Thread(target=body)
    t.start()
    t.join(10)
    assert seen == [False]

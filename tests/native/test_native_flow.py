"""The write path's flow control (native/flow.c): protocol B/C waits for the
peer, on-congestion block waits for room, max-lag slows writers. Each wait
must end exactly when its cause does, and never hold a writer for something
that cannot come (a dropped ring, a degraded link)."""
from __future__ import annotations

import threading
import time

import pytest

from replicator.native.core import FlowPolicy

REC = 48 + 4096  # one 4 KiB write in the ring


class Writer(threading.Thread):
    """One write on its own thread (cffi releases the GIL in the core)."""

    def __init__(self, core, off: int = 0, length: int = 4096, flush: bool = False):
        super().__init__(daemon=True)
        self.core, self.off, self.length, self.flush = core, off, length, flush
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.flush:
                self.result = self.core.flush()
            else:
                self.result = self.core.write(b"x" * self.length, self.off)
        except BaseException as e:  # reported by the test
            self.error = e

    def still_waiting(self, seconds: float = 0.3) -> bool:
        self.join(seconds)
        return self.is_alive()


def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_protocol_c_write_returns_only_once_the_peer_holds_its_record(make_rig):
    core = make_rig().core
    core.set_flow(FlowPolicy(wait_peer=True))
    w = Writer(core)
    w.start()
    assert w.still_waiting(), "the write returned before the peer held it"
    _wait_for(lambda: core.ring_stats["records"] == 1, "the record in the ring")
    seq = core.ring_stats["newest_seq"]
    core.set_durable(seq - 1)  # an older record: not this one
    assert w.still_waiting(0.2)
    core.set_durable(seq)
    w.join(5)
    assert not w.is_alive() and w.error is None and w.result.seq == seq
    st = core.flow_stats()
    assert st["peer_waits"] == 1 and st["peer_waiting"] == 0 and st["durable_seq"] == seq


def test_a_flush_waits_for_the_peer_too(make_rig):
    core = make_rig().core
    core.set_flow(FlowPolicy(wait_peer=True))
    w = Writer(core, flush=True)
    w.start()
    assert w.still_waiting()
    core.set_durable(core.next_seq - 1)
    w.join(5)
    assert not w.is_alive() and w.error is None


def test_already_durable_or_async_writes_do_not_wait(make_rig):
    core = make_rig().core
    core.write(b"a" * 4096, 0)  # protocol A: returns at once
    core.set_flow(FlowPolicy(wait_peer=True))
    core.set_durable(10 ** 9)  # the peer is ahead of anything this writes
    core.write(b"b" * 4096, 0)
    assert core.flow_stats()["peer_waits"] == 0


@pytest.mark.parametrize("how", ["degrade", "drop"])
def test_waiters_are_let_go_when_the_ack_cannot_come(make_rig, how):
    """Degrade (wait_peer switched off) and a dropped ring (Ahead: nothing
    queued will be acknowledged) both end every peer wait."""
    core = make_rig().core
    core.set_flow(FlowPolicy(wait_peer=True))
    writers = [Writer(core, off=i * 4096) for i in range(4)]
    for w in writers:
        w.start()
    _wait_for(lambda: core.flow_stats()["peer_waiting"] == 4, "four waiting writers")
    if how == "degrade":
        core.set_flow(FlowPolicy(wait_peer=False))
    else:
        core.drop()
    for w in writers:
        w.join(5)
        assert not w.is_alive() and w.error is None
    assert core.flow_stats()["releases"] >= 1


def test_block_holds_a_write_that_would_pass_the_fill_until_room_is_released(make_rig):
    core = make_rig(ring_size=1 << 20).core
    fill = 4 * REC
    core.set_flow(FlowPolicy(block=True, fill=fill, block_timeout_s=None))
    for i in range(4):
        core.write(b"q" * 4096, i * 4096)
    assert core.ring_stats["bytes"] == fill
    w = Writer(core, off=5 * 4096)
    w.start()
    assert w.still_waiting(), "a write passed congestion-fill"
    assert core.ring_stats["bytes"] <= fill and not core.ring_stats["dropped"]
    assert core.flow_stats()["room_waiting"] == 1
    oldest = core.ring_stats["oldest_seq"]
    core.release(oldest)  # the peer journaled one record: room for one
    w.join(5)
    assert not w.is_alive() and w.error is None and w.result.queued
    st = core.ring_stats
    assert st["bytes"] <= fill and st["records"] == 4 and not st["dropped"]
    fs = core.flow_stats()
    assert fs["room_waits"] == 1 and fs["room_timeouts"] == 0


def test_block_gives_up_after_its_timeout_and_pulls_ahead(make_rig):
    core = make_rig(ring_size=1 << 20).core
    core.set_flow(FlowPolicy(block=True, fill=2 * REC, block_timeout_s=0.2))
    core.write(b"q" * 4096, 0)
    core.write(b"q" * 4096, 4096)
    r = core.write(b"q" * 4096, 8192)  # waits 0.2 s, then pulls ahead
    assert not r.queued and core.ring_stats["dropped"]
    assert core.flow_stats()["room_timeouts"] == 1


def test_switching_block_off_lets_a_blocked_writer_pull_ahead_at_once(make_rig):
    """The link is lost under degrade: a writer waiting for room must not
    wait for its timeout."""
    core = make_rig(ring_size=1 << 20).core
    core.set_flow(FlowPolicy(block=True, fill=REC, block_timeout_s=None))
    core.write(b"q" * 4096, 0)
    w = Writer(core, off=4096)
    w.start()
    assert w.still_waiting()
    core.set_flow(FlowPolicy(block=False))
    w.join(5)
    assert not w.is_alive() and w.error is None
    # fill 0 is the ring's size: the write fitted, nothing was dropped
    assert w.result.queued and not core.ring_stats["dropped"]


def test_pull_ahead_at_the_fill_not_only_when_the_ring_is_full(make_rig):
    core = make_rig(ring_size=1 << 20).core
    core.set_flow(FlowPolicy(block=False, fill=2 * REC))
    core.write(b"q" * 4096, 0)
    core.write(b"q" * 4096, 4096)
    r = core.write(b"q" * 4096, 8192)
    assert not r.queued and core.ring_stats["dropped"]


def test_a_group_marker_never_blocks_on_a_congested_ring(make_rig):
    core = make_rig(ring_size=1 << 20).core
    core.set_flow(FlowPolicy(block=True, fill=REC, block_timeout_s=None))
    core.write(b"q" * 4096, 0)
    r = core.mark(0, 0, b"{}")  # over the fill, inside the ring: queued at once
    assert r.queued and not core.ring_stats["dropped"]


def test_max_lag_paces_the_bytes_of_every_writer(make_rig):
    """At 64 KiB/s a 4 KiB write takes a 62.5 ms turn in the bucket (2 ms
    of credit at most): of three back-to-back writes the second and third
    wait their turn; writers on other threads share the same bucket."""
    core = make_rig().core
    core.set_flow(FlowPolicy(rate_bps=64 << 10))
    for i in range(3):
        core.write(b"d" * 4096, i * 4096)
    st = core.flow_stats()
    assert st["delays"] == 2 and st["delay_s"] > 0.1, st
    w = Writer(core, off=0, length=4096)
    w.start()
    w.join(10)
    assert w.error is None and core.flow_stats()["delays"] == 3  # the same bucket
    core.set_flow(FlowPolicy())
    core.write(b"d" * 4096, 0)
    assert core.flow_stats()["delays"] == 3  # no rate: no pacing


def test_trims_and_zeros_are_not_paced(make_rig):
    core = make_rig().core
    core.set_flow(FlowPolicy(rate_bps=1 << 20))
    for _ in range(3):
        core.trim(0, 1 << 20)
    assert core.flow_stats()["delays"] == 0

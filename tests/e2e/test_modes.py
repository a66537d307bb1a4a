"""Replication modes end to end (replicator/modes.py, native/flow.c): a real
pair in two namespaces, writes through NBD, the secondary stopped
(SIGSTOP: it neither reads nor acknowledges) or its link cut.

- protocol C: no reply before the secondary journaled the record; kill -9
  of both nodes right after a reply loses nothing (the secondary alone,
  promoted, has it);
- protocol B: no reply while the secondary cannot receive;
- on-congestion block: queued bytes never pass congestion-fill, writers
  wait instead of going Ahead, and resume when the peer drains;
- on-disconnect: degrade replies again once the peer is declared gone (A,
  said in status), suspend holds writers until the link is back.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import nbd
import pytest

from fixtures.duplex_lab import Lab

BLOCK = 4096
FAST_PING = {"ping-interval": "500ms", "ping-timeout": "2s"}


def pattern(tag: str, size: int = BLOCK) -> bytes:
    raw = (tag.encode() + b"|") * (size // (len(tag) + 1) + 1)
    return raw[:size]


class PendingWrite(threading.Thread):
    """One NBD write on its own connection and thread: it may be held."""

    def __init__(self, uri: str, data: bytes, offset: int):
        super().__init__(daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.data, self.offset = data, offset
        self.error: BaseException | None = None
        self.done_at: float | None = None

    def run(self) -> None:
        try:
            self.h.pwrite(self.data, self.offset)
            self.done_at = time.monotonic()
        except BaseException as e:  # reported by the test
            self.error = e

    def finish(self, timeout: float = 30) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the write never returned"
        assert self.error is None, self.error
        self.h.shutdown()


def _write(lab: Lab, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    h.pwrite(data, offset)
    h.shutdown()


def _pair(make_lab, **options) -> Lab:
    lab = make_lab(size=16 << 20, options={**FAST_PING, **options})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    _write(lab, pattern("warm-up"), 0)
    lab.wait_drained()
    return lab


def _stopped(proc):
    """SIGSTOP *proc* for the with-block; SIGCONT after, whatever happens."""
    class _Ctx:
        def __enter__(self):
            os.kill(proc.pid, signal.SIGSTOP)

        def __exit__(self, *exc):
            os.kill(proc.pid, signal.SIGCONT)
    return _Ctx()


def test_protocol_c_replies_only_once_journaled_and_kill9_after_the_reply_loses_nothing(make_lab):
    lab = _pair(make_lab, protocol="C")
    st = lab.control("alpha")
    assert st["protocol"] == "C" and st["protocol_effective"] == "C", st
    data = pattern("journaled-before-the-reply")
    with _stopped(lab.secondary):
        w = PendingWrite(lab.uri, data, 8 * BLOCK)
        w.start()
        w.join(1.0)  # well under the 2 s ping-timeout: the link is still up
        assert w.is_alive(), "protocol C replied while the secondary could not journal"
        assert lab.control("alpha")["flow"]["waiting_for_peer"] >= 1
    w.finish()
    # The reply came: the record is in the secondary's journal. Kill both
    # at once: the primary cannot resend it to a restarted secondary.
    os.kill(lab.secondary.pid, signal.SIGKILL)
    lab.kill_primary()
    lab.secondary.wait(10)
    lab.start_secondary()
    lab.duplex("beta", "promote", "r0", timeout=60)
    with open(lab.image["beta"], "rb") as f:
        f.seek(8 * BLOCK)
        assert f.read(BLOCK) == data, "a write protocol C acknowledged is not on the secondary"


def test_protocol_b_replies_only_once_received(make_lab):
    lab = _pair(make_lab, protocol="B")
    with _stopped(lab.secondary):
        w = PendingWrite(lab.uri, pattern("received"), 3 * BLOCK)
        w.start()
        w.join(1.0)
        assert w.is_alive(), "protocol B replied while the secondary could not receive"
    w.finish()
    st = lab.control("alpha")
    assert st["flow"]["peer_waits"] >= 2 and st["protocol_effective"] == "B", st
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")


def test_block_keeps_queued_bytes_under_the_fill_and_resumes_when_the_peer_drains(make_lab):
    fill = 1 << 20
    # The default ping-timeout (6 s): the stopped secondary must not be
    # declared gone while the writers are blocked.
    lab = _pair(make_lab, **{"ring-size": "8MiB", "congestion-fill": "1MiB",
                             "on-congestion": "block", "congestion-timeout": "30s",
                             "ping-interval": "1s", "ping-timeout": "6s"})
    chunk = 256 << 10
    writers: list[PendingWrite] = []
    with _stopped(lab.secondary):
        for i in range(8):  # 2 MiB: twice the fill
            w = PendingWrite(lab.uri, pattern(f"w{i}", chunk), i * chunk)
            w.start()
            writers.append(w)
        lab.wait(lambda: lab.control("alpha")["congestion"] == "blocked",
                 "writers blocked for room", timeout=1.5)
        st = lab.control("alpha")
        assert st["ring"]["bytes"] <= fill, st["ring"]
        assert st["replication"] == "Established", st
        assert any(w.is_alive() for w in writers)
    for w in writers:
        w.finish()
    st = lab.wait_drained()
    pst = lab.control("alpha")
    assert pst["replication"] == "Established" and pst["flow"]["pull_aheads"] == 0, pst
    assert pst["flow"]["blocked_writes"] >= 1 and pst["congestion_blocked_seconds"] > 0
    assert pst["ring"]["drops"] == 0, "the ring was dropped: the pair went Ahead"
    assert lab.digest("beta") == lab.digest("alpha")


def test_degrade_replies_once_the_peer_is_gone_and_says_so(make_lab, netns_pair):
    lab = _pair(make_lab, protocol="C", **{"on-disconnect": "degrade"})
    netns_pair.link_down()
    try:
        w = PendingWrite(lab.uri, pattern("degraded"), 5 * BLOCK)
        w.start()
        w.finish(timeout=30)  # held until the peer is declared gone (2 s), then A
        st = lab.wait(lambda: (s := lab.control("alpha"))["protocol_effective"] == "A" and s,
                      "status to say protocol A is in force", timeout=10)
        assert "degraded" in st["protocol_note"], st
    finally:
        netns_pair.link_up()
    lab.wait(lambda: lab.control("alpha")["protocol_effective"] == "C",
             "protocol C in force again", timeout=60)
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")


def test_suspend_holds_writers_while_the_link_is_cut_and_loses_nothing(make_lab, netns_pair):
    lab = _pair(make_lab, protocol="C", **{"on-disconnect": "suspend"})
    data = pattern("suspended")
    netns_pair.link_down()
    try:
        w = PendingWrite(lab.uri, data, 6 * BLOCK)
        w.start()
        lab.wait(lambda: lab.control("alpha")["connection"] != "Connected",
                 "the peer declared gone", timeout=20)
        w.join(1.0)
        assert w.is_alive(), "suspend let a write reply with the peer gone"
        st = lab.control("alpha")
        assert st["protocol_effective"] == "C" and "suspended" in st["protocol_note"], st
    finally:
        netns_pair.link_up()
    w.finish(timeout=60)
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")
    pst = lab.control("alpha")
    assert pst["ring"]["drops"] == 0 and pst["out_of_sync_bytes"] == 0, pst


def _rate_limit(netns_pair, ns: str, port: int, rate: str) -> None:
    """Drop *ns*'s outgoing replication packets over *rate* (nftables; the
    table goes with the namespace)."""
    import subprocess
    script = ("add table inet dpxrate\n"
              "add chain inet dpxrate out { type filter hook output priority 0; }\n"
              f"add rule inet dpxrate out tcp dport {port} limit rate over {rate} drop\n")
    r = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "nft", "-f", "-"],
                       input=script.encode(), capture_output=True, timeout=10, check=False)
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def test_max_lag_slows_writers_on_a_slow_link_instead_of_letting_the_lag_grow(make_lab,
                                                                            netns_pair):
    """1 MB/s of link, writers that would send ten times that: with
    max-lag the writers are slowed (delays engaged), the pair keeps
    streaming, and the lag stays bounded; without it (the same load) the
    send ring would take 16 s to drain or the pair would go Ahead."""
    lab = _pair(make_lab, **{"max-lag": "100ms", "ping-interval": "1s", "ping-timeout": "6s"})
    _rate_limit(netns_pair, lab.ns_a, lab.port, "1 mbytes/second")

    def writer(n: int) -> None:
        h = nbd.NBD()
        h.connect_uri(lab.uri)
        for i in range(1000):  # 4 KiB as fast as it goes: ~10x the link unslowed
            h.pwrite(pattern(f"lag-{n}-{i}"), ((n * 1000 + i) * BLOCK) % lab.size)
        h.shutdown()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    worst, states = 0.0, set()
    while any(t.is_alive() for t in threads):
        st = lab.control("alpha")
        states.add(st["replication"])
        worst = max(worst, st["lag"]["seconds"] or 0.0)
        time.sleep(0.1)
    for t in threads:
        t.join()
    st = lab.control("alpha")
    assert st["flow"]["delayed_writes"] > 0, st["flow"]
    assert states == {"Established"}, states
    # Unslowed, the 8 MB burst would queue 8 s of lag (the ring holds it);
    # slowed, what is left is the few ticks before the burst is seen.
    assert worst < 4.0, f"lag reached {worst:.2f} s with max-lag 100 ms"
    lab.wait_drained()
    lab.wait(lambda: lab.control("alpha")["flow"]["max_lag_rate_bytes"] == 0,
             "the pace lifted once the lag is gone", timeout=20)
    assert lab.digest("beta") == lab.digest("alpha")

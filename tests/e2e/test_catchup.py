"""Ahead mode and consistent catch-up, end to end (issue 4): the link is
cut under load, the primary goes Ahead without stalling writes, and the
pair catches up in increments; every sample of the secondary on the way is
the primary's history replayed to some seq."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

from fixtures.duplex_lab import replay_history
from test_replication import _check_samples_are_prefixes
from fixtures.workload import Sampler, Workload


def _track_states(lab, stop: threading.Event, seen: set) -> None:
    while not stop.is_set():
        try:
            seen.add(lab.control("alpha")["replication"])
        except Exception:
            pass
        time.sleep(0.05)


def test_link_cut_goes_ahead_then_catches_up_through_valid_images(make_lab, netns_pair):
    # A small ring so that the outage overflows it: Ahead, then increments.
    lab = make_lab(size=32 << 20, options={"ring-size": "1MiB", "journal-size": "64MiB"})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=100, seed=11).run()
    lab.wait_drained()
    seen: set[str] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_track_states, args=(lab, stop, seen))
    watcher.start()
    try:
        netns_pair.link_down()
        wl = Workload(lab.uri, lab.size, threads=3, ops_per_thread=400, seed=12)
        t0 = time.monotonic()
        wl.run()  # never waits for the peer
        cut_time = time.monotonic() - t0
        # A silently cut link is noticed by the keepalive within seconds.
        st = lab.wait(lambda: (s := lab.control("alpha"))["replication"] == "Ahead" and s,
                      "the primary to report Ahead", timeout=30)
        assert st["out_of_sync_bytes"] > 0
        assert st["ring"]["bytes"] <= st["ring"]["capacity"]
        # Writes go on during the catch-up; the sampler checks every image.
        wl2 = Workload(lab.uri, lab.size, threads=2, ops_per_thread=600, seed=13, pace=0.002)
        with Sampler(lab.image["beta"], lambda: lab.control("beta"), wl2.gate) as sampler:
            netns_pair.link_up()
            wl2.run()
            lab.wait_drained(timeout=180)
            time.sleep(0.3)
    finally:
        stop.set()
        watcher.join()
    assert lab.digest("beta") == lab.digest("alpha"), "images differ after the catch-up"
    img, _ = replay_history(lab.history, lab.size)
    assert hashlib.sha256(img).hexdigest() == lab.digest("beta")
    assert "Ahead" in seen and "SyncSource" in seen and "Established" in seen, seen
    st = lab.control("alpha")
    assert st["out_of_sync_bytes"] == 0, st
    assert st["incr_bytes_sent"] > 0
    assert len({s for s, _ in sampler.samples}) >= 5, sampler.samples
    _check_samples_are_prefixes(lab, sampler.samples)
    assert cut_time < 60


def test_initial_sync_sends_neither_zero_tracks_nor_tracks_the_old_copy_holds(make_lab):
    lab = make_lab(size=16 << 20, options={"journal-size": "64MiB"})
    data = os.urandom(4 << 20)
    with open(lab.image["alpha"], "r+b") as f:
        f.seek(8 << 20)
        f.write(data)
    # Beta holds an old copy: the same data but three tracks, and junk where
    # alpha has zeros.
    old = bytearray(lab.image["alpha"].read_bytes())
    old[:1 << 20] = os.urandom(1 << 20)
    for t in (130, 140, 150):
        old[t * 65536:t * 65536 + 100] = b"old!" * 25
    lab.image["beta"].write_bytes(old)
    lab.create_md(assume_clean=False)
    st = lab.status("beta")
    assert st["disk"] == "Inconsistent", st
    lab.start_secondary()
    lab.start_primary()
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")
    assert lab.control("beta")["disk"] == "UpToDate"
    st = lab.control("alpha")
    assert st["out_of_sync_bytes"] == 0
    # Only the three differing tracks carried data; zero tracks went as
    # markers and matching tracks not at all.
    assert st["incr_bytes_sent"] == 3 * 65536, st["incr_bytes_sent"]
    assert st["matched_bytes"] >= len(data) - 3 * 65536, st["matched_bytes"]


def test_kill9_secondary_while_applying_an_increment_reapplies_it(make_lab, netns_pair, procs):
    lab = make_lab(size=16 << 20, options={"ring-size": "1MiB", "journal-size": "64MiB"})
    lab.create_md()
    os.environ["DUPLEX_TEST_SLOW_INCREMENT_APPLY"] = "0.05"
    try:
        sec = lab.start_secondary()
    finally:
        del os.environ["DUPLEX_TEST_SLOW_INCREMENT_APPLY"]
    lab.start_primary()
    netns_pair.link_down()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=300, seed=21).run()
    lab.wait(lambda: lab.control("alpha")["replication"] == "Ahead", "Ahead", timeout=30)
    netns_pair.link_up()
    lab.wait(lambda: "applying increment" in sec.log_text(), "an increment apply to start",
             proc=sec)
    time.sleep(0.1)
    sec.send_signal(signal.SIGKILL)
    sec.wait(10)
    lab.start_secondary()
    lab.wait_drained()
    assert "re-applying committed increment" in lab.secondary.log_text() or \
        "applying increment" in lab.secondary.log_text()
    assert lab.digest("beta") == lab.digest("alpha")


def _run_until_killed(wl: Workload) -> None:
    try:
        wl.run()
    except AssertionError:
        pass  # the primary was killed under it, as intended


def test_kill9_primary_at_random_points_then_catches_up(make_lab):
    lab = make_lab(size=16 << 20, options={"journal-size": "64MiB"})
    lab.create_md()
    lab.start_secondary()
    rnd = __import__("random").Random(99)
    for i in range(4):
        prim = lab.start_primary()
        wl = Workload(lab.uri, lab.size, threads=2, ops_per_thread=10_000, seed=100 + i)
        t = threading.Thread(target=_run_until_killed, args=(wl,))
        t.start()
        time.sleep(rnd.uniform(0.3, 1.5))
        os.killpg(prim.pid, signal.SIGKILL)  # duplex up and its nbdkit
        prim.wait(10)
        t.join()
        lab.sock.unlink(missing_ok=True)
    lab.start_primary()
    lab.wait_drained(timeout=120)
    assert lab.digest("beta") == lab.digest("alpha"), "images differ after crash recovery"

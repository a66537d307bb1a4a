"""Increments larger than the journal (issue 4): on a filesystem with
reflinks (XFS in a loop image made here) a snapshot keeps a valid image,
even across a kill -9 in the middle; elsewhere the secondary says
Inconsistent until the increment commits, never Consistent."""
from __future__ import annotations

import hashlib
import signal
import threading
import time
from pathlib import Path

import pytest

from fixtures.blockdev import reflink_xfs
from fixtures.duplex_lab import Lab, replay_history
from fixtures.workload import Workload

OPTIONS = {"ring-size": "1MiB", "journal-size": "4MiB", "resync-rate": "4MiB"}


@pytest.fixture
def xfs_dir(tmp_path: Path):
    """An XFS filesystem with reflinks, in a loop image, mounted."""
    with reflink_xfs(tmp_path, 1 << 30) as mnt:
        yield mnt


def _outage(lab: Lab, netns_pair) -> None:
    """Cut the link and write well over the journal's size."""
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=50, seed=51).run()
    lab.wait_drained()
    netns_pair.link_down()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=300, seed=52).run()
    lab.wait(lambda: lab.control("alpha")["replication"] == "Ahead", "Ahead", timeout=30)


def test_reflink_snapshot_keeps_a_valid_image_through_a_kill(make_lab, netns_pair, procs, xfs_dir):
    lab = Lab(xfs_dir / "lab", procs, netns_pair.ns_a, netns_pair.ns_b, netns_pair.addr_a,
              netns_pair.addr_b, size=32 << 20, options=OPTIONS)
    try:
        _outage(lab, netns_pair)
        before = lab.control("beta")["seq"]["applied"]
        netns_pair.link_up()
        st = lab.wait(lambda: (s := lab.control("beta"))["reason"].find("reflink snapshot") >= 0
                      and s, "an increment written in place under a snapshot", timeout=60)
        assert st["disk"] != "Inconsistent", st
        lab.secondary.send_signal(signal.SIGKILL)
        lab.secondary.wait(10)
        netns_pair.link_down()
        sec = lab.start_secondary()
        assert "restored" in sec.log_text(), sec.log_text()
        # The last committed increment (an earlier, smaller one may have
        # committed before the one that was killed).
        applied = lab.control("beta")["seq"]["applied"]
        assert applied >= before
        seen: list[str] = []
        replay_history(lab.history, lab.size, {applied: None},
                                lambda seq, im: seen.append(hashlib.sha256(im).hexdigest()))
        assert seen and seen[0] == lab.digest("beta"), \
            "after the kill the image is not the history replayed to its applied seq"
        netns_pair.link_up()
        lab.wait_drained(timeout=120)
        assert lab.digest("beta") == lab.digest("alpha")
    finally:
        lab.stop()
        lab.sock.unlink(missing_ok=True)


def test_without_reflinks_the_secondary_says_inconsistent_until_commit(make_lab, netns_pair):
    lab = make_lab(size=32 << 20, options=OPTIONS)
    _outage(lab, netns_pair)
    disks: list[str] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                s = lab.control("beta")
                disks.append(s["disk"] + "|" + s["reason"])
            except Exception:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t.start()
    try:
        netns_pair.link_up()
        lab.wait_drained(timeout=120)
    finally:
        stop.set()
        t.join()
    assert any(d.startswith("Inconsistent|") and "cannot be cloned" in d for d in disks), disks[-5:]
    assert lab.control("beta")["disk"] == "UpToDate"
    assert lab.digest("beta") == lab.digest("alpha")

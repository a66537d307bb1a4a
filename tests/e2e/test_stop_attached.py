"""Stopping a primary whose export is attached and mounted (issue 10, item 5).

A real ``duplex attach`` (nbdfuse + loop), a real ext4 mounted on it:
SIGTERM to ``duplex up`` (what ``systemctl stop`` sends) ends it within the
drain timeout and its log names what held the device; after nbdkit is
killed with SIGKILL, the next ``duplex up`` brings the attach back and the
filesystem's data reads again."""
from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fixtures.blockdev import mkfs, mountpoints_of, unmount
from fixtures.duplex_lab import RESOURCE, Lab

DRAIN_S = 3.0


def _record(lab: Lab) -> dict:
    return json.loads((lab.meta["alpha"] / "attach.json").read_text())


def _nbdkit_pid(lab: Lab) -> int:
    return int((lab.meta["alpha"] / "nbdkit.pid").read_text())


@pytest.fixture
def attached_lab(make_lab, tmp_path: Path):
    """A running pair whose primary export is attached (``duplex attach``)
    with an ext4 on it; unmounted and detached at teardown, also on failure."""
    lab = make_lab(size=32 << 20, options={"drain-timeout": f"{DRAIN_S:g}s"})
    lab.mnt = tmp_path / "mnt"

    def undo() -> None:
        rec = lab.meta["alpha"] / "attach.json"
        if rec.exists():
            for point in mountpoints_of(json.loads(rec.read_text())["device"]):
                unmount(point)
            lab.duplex("alpha", "detach", RESOURCE, check=False)
        if os.path.ismount(lab.mnt):
            unmount(lab.mnt)

    lab.teardown_hooks.append(undo)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    # In-process, with the FUSE mount under tmp_path: /run/duplex/r0/alpha
    # is what other tests' `duplex attach` uses.
    from replicator.attach import attach
    from replicator.config import load_config
    cfg = load_config(str(lab.config))
    res = cfg.resource(RESOURCE)
    device = attach(cfg, res, res.node("alpha"), run_dir=tmp_path / "run")
    mkfs(device, "ext4")
    lab.mnt.mkdir()
    subprocess.run(["mount", device, str(lab.mnt)], check=True)
    (lab.mnt / "hello.txt").write_text("written before the stop\n")
    subprocess.run(["sync", "-f", str(lab.mnt / "hello.txt")], check=True)
    return lab


def test_sigterm_with_a_mounted_attach_stops_within_drain_timeout_naming_the_mount(attached_lab):
    lab = attached_lab
    device = _record(lab)["device"]
    t0 = time.monotonic()
    lab.primary.send_signal(signal.SIGTERM)
    try:
        rc = lab.primary.wait(timeout=DRAIN_S + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"duplex up still runs {DRAIN_S + 10:g} s after SIGTERM "
                    f"(drain-timeout {DRAIN_S:g}s):\n{lab.primary.log_text(3000)}")
    took = time.monotonic() - t0
    log = lab.primary.log_text()
    assert took < DRAIN_S + 8, f"stopped after {took:.1f} s, drain-timeout {DRAIN_S:g}s"
    waits = [line for line in log.splitlines() if "waiting" in line and str(lab.mnt) in line]
    assert waits, f"no log line names the mount {lab.mnt} of {device}:\n{log}"
    assert device in waits[0], waits[0]
    assert "Traceback" not in log, log
    assert rc in (0, 1), rc


def test_after_nbdkit_is_killed_the_next_up_re_attaches_and_the_filesystem_reads(attached_lab):
    lab = attached_lab
    old = _record(lab)
    os.kill(_nbdkit_pid(lab), signal.SIGKILL)
    lab.primary.wait(timeout=15)  # duplex up ends with its nbdkit
    # What the README says a filesystem on top sees: every I/O fails (EIO).
    fd = os.open(old["device"], os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as ei:
            os.preadv(fd, [mmap.mmap(-1, 4096)], 0)
        assert ei.value.errno == errno.EIO, ei.value
    finally:
        os.close(fd)
    unmount(lab.mnt)  # what the admin does; the dead attach itself stays in place

    lab.start_primary(history=False)
    new = lab.wait(lambda: (r := _record(lab)).get("nbdfuse_pid") != old["nbdfuse_pid"] and r,
                   "duplex up to re-attach the export", timeout=30, proc=lab.primary)
    log = lab.wait(lambda: "re-attached the export as" in lab.primary.log_text()
                   and lab.primary.log_text(), "the re-attach log line", timeout=10)
    assert new["device"] in log, log
    subprocess.run(["mount", new["device"], str(lab.mnt)], check=True)
    assert (lab.mnt / "hello.txt").read_text() == "written before the stop\n"

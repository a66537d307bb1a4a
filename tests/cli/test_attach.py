"""attach/detach against a real nbdkit (memory plugin on a unix socket):
a real /dev/loopN whose writes reach the export, nothing left behind, a
dead FUSE mount (its nbdfuse gone) cleaned up, two nodes of one resource
side by side on one machine. Also the --watch redraw of ``duplex status``."""
from __future__ import annotations

import errno
import importlib.machinery
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.blockdev import loop_backing_file, loop_devices_backed_by, mounts
from fixtures.leaks import leftovers, pids_with_cmdline_containing, zombie_free
from fixtures.nbdkit import nbd_connect
from replicator import cli
from replicator.attach import AttachError, attach, detach, fuse_base_dir, is_mounted
from replicator.config import parse_config
from replicator.status import format_status, watch_frame

REPO = Path(__file__).resolve().parents[2]


def _config(setup_dir: Path, config_text, alpha_socket: Path, beta_socket: Path | None = None):
    """(config, resource r0) with alpha's (and beta's) export on the given sockets."""
    text = config_text(setup_dir).replace(f'export = "unix:{setup_dir}/r0.nbd"',
                                          f'export = "unix:{alpha_socket}"')
    if beta_socket is not None:
        beta_meta = f'meta-dir = "{setup_dir}/beta-meta"\n'
        text = text.replace(beta_meta, beta_meta + f'export = "unix:{beta_socket}"\n')
    (setup_dir / "duplex.toml").write_text(text)
    cfg = parse_config(text, str(setup_dir / "duplex.toml"))
    return cfg, cfg.resource("r0")


@pytest.fixture
def served(setup_dir, config_text, nbdkit_server):
    """(config, resource, alpha, server): alpha's export served by nbdkit memory 64M."""
    server = nbdkit_server("memory", "64M")
    (setup_dir / "alpha-meta").mkdir()
    cfg, r = _config(setup_dir, config_text, server.socket_path)
    return cfg, r, r.node("alpha"), server


@pytest.fixture
def run_dir(tmp_path):
    """Where attach mounts nbdfuse; asserts at teardown that nothing is left there."""
    d = tmp_path / "run"
    try:
        yield d
    finally:
        # Safety net if a test failed half-way: take down whatever is under
        # d (also a dead FUSE mount, which no attach record may describe).
        for dev in loop_devices_backed_by(d):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        left_mounts = [mp for _, mp, fstype in mounts() if fstype.startswith("fuse")
                       and mp.startswith(str(d))]
        for mp in reversed(left_mounts):
            if subprocess.run(["fusermount3", "-u", mp], capture_output=True).returncode:
                subprocess.run(["umount", "-l", mp], capture_output=True)
        for pid in zombie_free(pids_with_cmdline_containing(str(d))):
            os.kill(pid, signal.SIGKILL)  # an nbdfuse this test started
        left = leftovers(d)
        assert left.is_empty(), f"attach left behind: {left}"
        assert not left_mounts and not left.processes, f"attach left behind: {left_mounts}"


def _write_and_check(device: str, server_uri: str, payload: bytes, offset: int) -> None:
    """Write *payload* through *device* and prove it reached the NBD server."""
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, payload, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    h = nbd_connect(server_uri)
    try:
        assert h.pread(len(payload), offset) == payload
    finally:
        h.shutdown()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not zombie_free([pid]):
            return True
        time.sleep(0.05)
    return False


def test_attach_gives_a_loop_device_whose_writes_reach_the_export(served, run_dir):
    cfg, r, alpha, server = served
    device = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    try:
        assert device.startswith("/dev/loop")
        record = json.loads((Path(alpha.meta_dir) / "attach.json").read_text())
        assert (record["method"], record["device"]) == ("fuse", device)
        payload = os.urandom(8192)
        fd = os.open(device, os.O_RDWR)
        try:
            assert os.lseek(fd, 0, os.SEEK_END) == 64 << 20
            os.pwrite(fd, payload, 1 << 20)
            os.fsync(fd)
            assert os.pread(fd, 8192, 1 << 20) == payload
        finally:
            os.close(fd)
        h = nbd_connect(server.uri)  # the bytes are in the NBD server itself
        try:
            assert h.pread(8192, 1 << 20) == payload
        finally:
            h.shutdown()
    finally:
        assert detach(cfg, r, alpha) == device
    assert not (Path(alpha.meta_dir) / "attach.json").exists()
    assert loop_backing_file(device) != record["fuse_file"]  # the loop device is gone
    with pytest.raises(OSError):  # nbdfuse has exited
        os.kill(record["nbdfuse_pid"], 0)


def test_attach_twice_is_refused_and_detach_refuses_while_mounted(served, run_dir, tmp_path):
    cfg, r, alpha, _ = served
    device = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        with pytest.raises(AttachError) as ei:
            attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
        assert str(ei.value) == (f"resource r0 is already attached as {device} "
                                 f"(run `duplex detach r0` first)")
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mnt)], check=True, capture_output=True)
        mounted = True
        with pytest.raises(AttachError) as ei:
            detach(cfg, r, alpha)
        assert str(ei.value) == f"{device} is mounted on {mnt}; unmount it first"
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
        detach(cfg, r, alpha)


def test_attach_without_a_server_says_the_export_is_not_served(served, run_dir):
    cfg, r, alpha, server = served
    server.stop()
    with pytest.raises(AttachError) as ei:
        attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    msg = str(ei.value)
    assert msg.startswith(f"nothing serves the export {alpha.export_uri()} of resource r0 on node alpha")
    assert msg.endswith("is `duplex up r0` running here as primary?")
    assert not (Path(alpha.meta_dir) / "attach.json").exists()


def test_cli_attach_prints_the_device_and_detach_undoes_it(served, run_dir, capsys, monkeypatch):
    cfg, r, alpha, _ = served
    monkeypatch.setattr("replicator.attach.DEFAULT_RUN_DIR", str(run_dir))
    monkeypatch.setattr("replicator.attach.choose_method", lambda: "fuse")
    argv = ["--config", cfg.path, "--node", "alpha"]
    try:
        assert cli.main([*argv, "attach", "r0"]) == 0
        device = capsys.readouterr().out.strip()
        assert device.startswith("/dev/loop") and os.path.exists(device)
    finally:
        code = cli.main([*argv, "detach", "r0"])
    assert code == 0 and capsys.readouterr().out == f"r0: detached {device}\n"
    assert cli.main([*argv, "detach", "r0"]) == 1
    assert capsys.readouterr().err == (f"duplex: error: resource r0 is not attached on node alpha "
                                       f"(no {alpha.meta_dir}/attach.json)\n")

"""attach/detach against a real nbdkit (memory plugin on a unix socket):
a real /dev/loopN whose writes reach the export, and nothing left behind."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fixtures.blockdev import loop_backing_file
from fixtures.leaks import leftovers
from fixtures.nbdkit import nbd_connect
from replicator import cli
from replicator.attach import AttachError, attach, detach
from replicator.config import parse_config


@pytest.fixture
def served(setup_dir, config_text, nbdkit_server):
    """(config, resource, alpha, server): alpha's export served by nbdkit memory 64M."""
    server = nbdkit_server("memory", "64M")
    text = config_text(setup_dir).replace(f'export = "unix:{setup_dir}/r0.nbd"',
                                          f'export = "unix:{server.socket_path}"')
    (setup_dir / "duplex.toml").write_text(text)
    (setup_dir / "alpha-meta").mkdir()
    cfg = parse_config(text, str(setup_dir / "duplex.toml"))
    r = cfg.resource("r0")
    return cfg, r, r.node("alpha"), server


@pytest.fixture
def run_dir(tmp_path):
    """Where attach mounts nbdfuse; asserts at teardown that nothing is left there."""
    d = tmp_path / "run"
    try:
        yield d
    finally:
        # Safety net if a test failed half-way: undo whatever is recorded.
        rec = tmp_path / "alpha-meta" / "attach.json"
        if rec.exists():
            data = json.loads(rec.read_text())
            subprocess.run(["losetup", "-d", data["device"]], capture_output=True)
            subprocess.run(["fusermount3", "-u", data["mount_dir"]], capture_output=True)
        left = leftovers(d)
        assert left.is_empty(), f"attach left behind: {left}"


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

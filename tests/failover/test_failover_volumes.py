"""scripts/failover on a two-volume resource (DESIGN §8): the dry run names
each volume's export and mount-point; the attach and mount steps, run
against a real primary (our plugin, served alone), attach every volume and
mount ext4 whose journal is on the other volume (mke2fs -O journal_dev on
"wal", mkfs.ext4 -J device= on "data"), e2fsck and mount given the journal
as the volume's device here."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from _failover_helpers import run_failover
from fixtures.duplex_lab import REPO, RESOURCE, Lab
from fixtures.volume_primary import create_md, free_port, serve_primary_alone

MiB = 1 << 20


def _failover_module(monkeypatch):
    """scripts/failover as a module (its dataclasses need it in sys.modules)."""
    loader = importlib.machinery.SourceFileLoader("failover_script", str(REPO / "scripts" / "failover"))
    spec = importlib.util.spec_from_loader("failover_script", loader)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "failover_script", mod)
    loader.exec_module(mod)
    return mod


def test_dry_run_names_each_volumes_export_and_mount_point(tmp_path, procs):
    lab = Lab(tmp_path / "lab", procs, None, None, size=8 * MiB, volumes=["data", "wal"],
              port=free_port())
    lab.set_volume_keys("beta", "data", mount_point=str(tmp_path / "pg"))
    create_md(lab, "beta")
    r = run_failover(lab, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln.strip() for ln in r.stdout.splitlines()]
    at = lines.index("[5/6] attach")
    assert lines[at + 1:at + 3] == [
        f"volume data: would attach nbd+unix:///data?socket={lab.sock}.beta as a block device",
        f"volume wal: would attach nbd+unix:///wal?socket={lab.sock}.beta as a block device"]
    at = lines.index("[6/6] mount")
    assert lines[at + 1:at + 3] == [
        f"volume data: would e2fsck -p the device (ext2/3/4) and mount it on {tmp_path / 'pg'}",
        "no mount-point configured for volume wal: skipped"]


def _run(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(argv)}: {r.stdout}{r.stderr}"
    return r.stdout


@pytest.fixture
def ext4_with_journal_on_wal(tmp_path, procs):
    """alpha's images: ext4 on data, its journal on wal; then served."""
    lab = Lab(tmp_path / "lab", procs, None, None, size=32 * MiB, volumes=["data", "wal"],
              port=free_port(),
              volume_sizes={"wal": 8 * MiB})
    data_img, wal_img = lab.images["alpha"]["data"], lab.images["alpha"]["wal"]
    loops = []
    try:
        for img in (wal_img, data_img):
            loops.append(_run("losetup", "--find", "--show", str(img)).strip())
        _run("mke2fs", "-q", "-F", "-O", "journal_dev", "-b", "4096", loops[0])
        _run("mkfs.ext4", "-q", "-F", "-b", "4096", "-J", f"device={loops[0]}", loops[1])
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
    lab.set_volume_keys("alpha", "data", mount_point=str(tmp_path / "mnt"))
    serve_primary_alone(lab)
    yield lab
    lab.stop()


def test_attach_and_mount_per_volume_with_the_journal_on_the_other(ext4_with_journal_on_wal,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    lab = ext4_with_journal_on_wal
    mod = _failover_module(monkeypatch)
    monkeypatch.setattr("replicator.attach.DEFAULT_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr("replicator.attach.choose_method", lambda: "fuse")
    cfg = mod.load_config(str(lab.config))
    res = cfg.resource(RESOURCE)
    node = res.node("alpha")
    fo = mod.Failover(cfg, res, node, "alpha", no_fence=True, force=False, dry_run=False,
                      wait_disconnect=1, serve_timeout=10)
    mnt = tmp_path / "mnt"
    from replicator.attach import detach_volumes
    try:
        devices = fo.attach()
        fo.mount(devices)
        out = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
        assert list(devices) == ["data", "wal"]
        assert out[:2] == [f"volume data: attached as {devices['data']}",
                           f"volume wal: attached as {devices['wal']}"], out
        assert f"volume data: its journal is on volume wal ({devices['wal']})" == out[2], out
        assert f"volume wal: holds an external journal ({devices['wal']}): not mounted" in out
        # The journal's device number here is not the one mkfs recorded: e2fsck
        # -j fixes the hint (exit 1), and the mount names the device itself.
        assert any("Superblock hint for external superblock should be" in ln for ln in out), out
        assert "volume data: e2fsck -p: errors corrected (exit 1)" in out, out
        assert f"volume data: mounted {devices['data']} (ext4) on {mnt}" in out, out
        (mnt / "hello").write_text("on two volumes\n")
        _run("sync", "-f", str(mnt / "hello"))
        # Run again: what is done is reported and skipped.
        devices2 = fo.attach()
        fo.mount(devices2)
        out = [ln.strip() for ln in capsys.readouterr().out.splitlines()]
        assert devices2 == devices
        assert f"volume data: already attached as {devices['data']}: skipped" in out, out
        assert f"volume data: {devices['data']} is already mounted on {mnt}: skipped" in out, out
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        detach_volumes(cfg, res, node)
    # The file system and its journal, read back from the images by e2fsck.
    loops = []
    try:
        for img in (lab.images["alpha"]["wal"], lab.images["alpha"]["data"]):
            loops.append(_run("losetup", "--find", "--show", str(img)).strip())
        r = subprocess.run(["e2fsck", "-fn", "-j", loops[0], loops[1]], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
    assert Path(lab.images["alpha"]["data"]).stat().st_size == 32 * MiB

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
from replicator.status import format_line, offline_status, watch_frame

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
    left = {p.name: p.stat().st_size for p in run_dir.rglob("*") if p.is_file()}
    assert "nbdfuse.pid" not in left, "detach left a stale pid file (it names a reusable pid)"
    assert all(left.values()), f"detach left empty files behind: {left}"
    assert cli.main([*argv, "detach", "r0"]) == 1
    assert capsys.readouterr().err == (f"duplex: error: resource r0 is not attached on node alpha "
                                       f"(no {alpha.meta_dir}/attach.json)\n")


# --------------------------------------------------------------------------
# a dead FUSE mount: the server died, nbdfuse is gone, the mount is left


def _make_the_mount_dead(device: str, server, record: dict) -> None:
    """Kill the NBD server under an attached *device* and leave what that
    leaves: a FUSE mount whose daemon is gone (stat on it fails ENOTCONN).

    nbdfuse exits when its server dies in some versions and situations; the
    1.14 of Debian 12 rather answers EIO and stays. So once I/O has failed,
    nbdfuse is killed if it is still there: the mount is then exactly as dead
    as when nbdfuse exits on its own (it never unmounts on the way out)."""
    os.kill(server.pid, signal.SIGKILL)  # the server dies (a clean stop waits for clients)
    server.stop()  # reaps it
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        with pytest.raises(OSError):
            os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    pid = record["nbdfuse_pid"]
    if not _wait_gone(pid, 1.0):
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid, 5.0), f"nbdfuse {pid} did not exit"
    # The kernel tears the FUSE connection down after nbdfuse's last file
    # is closed; on a loaded machine stat can get there first.
    deadline = time.monotonic() + 5.0
    while True:
        try:
            os.stat(record["mount_dir"])
        except OSError as e:
            err = e
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{record['mount_dir']} still answers stat 5 s after nbdfuse died")
        time.sleep(0.05)
    # ENOTCONN, or ECONNABORTED while the kernel is still aborting requests.
    assert err.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    assert not os.path.ismount(record["mount_dir"])  # why ismount cannot be used
    assert is_mounted(record["mount_dir"])           # ...and mountinfo can


def test_detach_after_the_server_died_unmounts_the_dead_mount_and_attach_works_again(
        served, run_dir, setup_dir, config_text, nbdkit_server):
    cfg, r, alpha, server = served
    device = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    record = json.loads((Path(alpha.meta_dir) / "attach.json").read_text())
    _make_the_mount_dead(device, server, record)

    with pytest.raises(AttachError) as ei:  # dead, but nothing serves to replace it with
        attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    assert "nothing serves the export" in str(ei.value), str(ei.value)
    assert loop_backing_file(device) == record["fuse_file"], "the dead attach is detach's to undo"
    assert detach(cfg, r, alpha) == device
    assert not is_mounted(record["mount_dir"]), "detach left the dead FUSE mount"
    assert loop_backing_file(device) != record["fuse_file"]
    assert not (Path(alpha.meta_dir) / "attach.json").exists()

    # The export comes back (a new server, a new socket): attach works again.
    server2 = nbdkit_server("memory", "64M")
    cfg2, r2 = _config(setup_dir, config_text, server2.socket_path)
    alpha2 = r2.node("alpha")
    device2 = attach(cfg2, r2, alpha2, run_dir=run_dir, method="fuse")
    try:
        _write_and_check(device2, server2.uri, os.urandom(4096) * 2, 3 << 20)
    finally:
        assert detach(cfg2, r2, alpha2) == device2
    assert not is_mounted(record["mount_dir"])


def test_attach_replaces_a_dead_attach_but_not_while_its_device_is_mounted(
        served, run_dir, setup_dir, config_text, nbdkit_server, tmp_path):
    # After the server died and came back, attach does not say "already
    # attached" about a device that can never work again: it replaces it,
    # unless a filesystem is still mounted on it (named in the refusal).
    cfg, r, alpha, server = served
    device = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    record = json.loads((Path(alpha.meta_dir) / "attach.json").read_text())
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", device, str(mnt)], check=True, capture_output=True)
    try:
        _make_the_mount_dead(device, server, record)
        server2 = nbdkit_server("memory", "64M")
        cfg2, r2 = _config(setup_dir, config_text, server2.socket_path)
        alpha2 = r2.node("alpha")
        with pytest.raises(AttachError) as ei:
            attach(cfg2, r2, alpha2, run_dir=run_dir, method="fuse")
        assert f"mounted at {mnt}" in str(ei.value) and "dead" in str(ei.value), str(ei.value)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    device2 = attach(cfg2, r2, alpha2, run_dir=run_dir, method="fuse")
    try:
        new = json.loads((Path(alpha.meta_dir) / "attach.json").read_text())
        assert new["nbdfuse_pid"] != record["nbdfuse_pid"], "the dead attach stayed"
        _write_and_check(device2, server2.uri, os.urandom(4096) * 2, 3 << 20)
    finally:
        assert detach(cfg2, r2, alpha2) == device2


def test_attach_over_a_dead_mount_without_a_record_unmounts_it_first(
        served, run_dir, setup_dir, config_text, nbdkit_server):
    # What a crash leaves: the record is gone, the dead mount is not.
    cfg, r, alpha, server = served
    device = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    record_path = Path(alpha.meta_dir) / "attach.json"
    record = json.loads(record_path.read_text())
    _make_the_mount_dead(device, server, record)
    subprocess.run(["losetup", "-d", device], check=True, capture_output=True)
    record_path.unlink()

    server2 = nbdkit_server("memory", "64M")
    cfg2, r2 = _config(setup_dir, config_text, server2.socket_path)
    alpha2 = r2.node("alpha")
    device2 = attach(cfg2, r2, alpha2, run_dir=run_dir, method="fuse")
    try:
        assert json.loads(record_path.read_text())["mount_dir"] == record["mount_dir"]
        _write_and_check(device2, server2.uri, os.urandom(8192), 1 << 20)
    finally:
        detach(cfg2, r2, alpha2)


def test_attach_and_detach_report_os_errors_as_attach_errors(served, tmp_path, capsys,
                                                              monkeypatch):
    cfg, r, alpha, _ = served
    not_a_dir = tmp_path / "run-is-a-file"
    not_a_dir.write_text("")
    with pytest.raises(AttachError) as ei:
        attach(cfg, r, alpha, run_dir=not_a_dir, method="fuse")
    assert str(ei.value) == (f"creating the attach directory "
                             f"{not_a_dir}/r0/alpha/fuse: Not a directory")
    assert not (Path(alpha.meta_dir) / "attach.json").exists()

    # The same through the CLI: one line, exit 1, no traceback.
    monkeypatch.setattr("replicator.attach.DEFAULT_RUN_DIR", str(not_a_dir))
    monkeypatch.setattr("replicator.attach.choose_method", lambda: "fuse")
    assert cli.main(["--config", cfg.path, "--node", "alpha", "attach", "r0"]) == 1
    err = capsys.readouterr().err
    assert err == (f"duplex: error: creating the attach directory "
                   f"{not_a_dir}/r0/alpha/fuse: Not a directory\n")

    # detach: an attach record that is a directory, not a file.
    (Path(alpha.meta_dir) / "attach.json").mkdir()
    try:
        with pytest.raises(AttachError) as ei:
            detach(cfg, r, alpha)
        assert str(ei.value) == (f"{alpha.meta_dir}/attach.json: cannot read "
                                 f"the attach record: Is a directory")
    finally:
        (Path(alpha.meta_dir) / "attach.json").rmdir()


# --------------------------------------------------------------------------
# two nodes of one resource on one machine (the test lab, the demo)


@pytest.fixture
def served_both(setup_dir, config_text, nbdkit_server):
    """(config, resource, alpha, beta, alpha's server, beta's server)."""
    sa, sb = nbdkit_server("memory", "64M"), nbdkit_server("memory", "64M")
    for name in ("alpha-meta", "beta-meta"):
        (setup_dir / name).mkdir()
    cfg, r = _config(setup_dir, config_text, sa.socket_path, sb.socket_path)
    return cfg, r, r.node("alpha"), r.node("beta"), sa, sb


def test_two_nodes_attach_side_by_side_each_in_its_own_directory(served_both, run_dir):
    cfg, r, alpha, beta, sa, sb = served_both
    dev_a = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    try:
        dev_b = attach(cfg, r, beta, run_dir=run_dir, method="fuse")
        try:
            rec_a = json.loads((Path(alpha.meta_dir) / "attach.json").read_text())
            rec_b = json.loads((Path(beta.meta_dir) / "attach.json").read_text())
            assert rec_a["mount_dir"] == str(fuse_base_dir(r, alpha, run_dir) / "fuse")
            assert rec_b["mount_dir"] == str(fuse_base_dir(r, beta, run_dir) / "fuse")
            assert rec_a["mount_dir"] != rec_b["mount_dir"] and dev_a != dev_b
            a, b = os.urandom(4096), os.urandom(4096)
            _write_and_check(dev_a, sa.uri, a, 0)
            _write_and_check(dev_b, sb.uri, b, 0)
        finally:
            assert detach(cfg, r, beta) == dev_b
        # alpha's device outlives beta's detach, and still reaches alpha's server.
        assert loop_backing_file(dev_a) == rec_a["fuse_file"]
        _write_and_check(dev_a, sa.uri, a[::-1], 8192)
    finally:
        assert detach(cfg, r, alpha) == dev_a


def test_attach_never_unmounts_a_mount_another_node_recorded(served_both, run_dir):
    # beta's attach.json records the mount in the directory alpha is about
    # to use (as records of the old shared /run/duplex/RES/fuse could): to
    # alpha it looks like a leftover, but it is beta's, and beta's device
    # must keep working.
    cfg, r, alpha, beta, sa, _ = served_both
    device = attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
    os.replace(Path(alpha.meta_dir) / "attach.json", Path(beta.meta_dir) / "attach.json")
    rec = json.loads((Path(beta.meta_dir) / "attach.json").read_text())
    try:
        with pytest.raises(AttachError) as ei:
            attach(cfg, r, alpha, run_dir=run_dir, method="fuse")
        assert str(ei.value) == (
            f"{rec['mount_dir']} belongs to node beta (its attach record "
            f"{beta.meta_dir}/attach.json names it): node alpha does not touch it "
            f"(run `duplex --node beta detach r0` first)")
        assert is_mounted(rec["mount_dir"])
        assert loop_backing_file(device) == rec["fuse_file"]
        _write_and_check(device, sa.uri, os.urandom(4096), 4096)
        assert not (Path(alpha.meta_dir) / "attach.json").exists()
    finally:
        assert detach(cfg, r, beta) == device
    assert not is_mounted(rec["mount_dir"])


# --------------------------------------------------------------------------
# scripts/failover: the attach step


def _load_failover(monkeypatch):
    """scripts/failover as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("duplex_failover_script",
                                                  str(REPO / "scripts" / "failover"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    # @dataclass looks its module up in sys.modules while the class is made.
    monkeypatch.setitem(sys.modules, loader.name, mod)
    loader.exec_module(mod)
    return mod


def test_failover_attach_step_reports_an_os_error_as_a_step_failure(served, monkeypatch,
                                                                     capsys):
    cfg, r, alpha, _ = served
    failover = _load_failover(monkeypatch)

    def broken_attach(config, resource, node, **kwargs):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected",
                      "/run/duplex/r0/alpha/fuse")
    monkeypatch.setattr("replicator.attach.attach", broken_attach)
    f = failover.Failover(cfg, r, alpha, "alpha", no_fence=True, force=False, dry_run=False,
                          wait_disconnect=0.0, serve_timeout=1.0)
    with pytest.raises(failover.StepFailed) as ei:
        f.attach()
    assert str(ei.value) == (f"attaching {alpha.export_uri()} as a block device failed: "
                             f"/run/duplex/r0/alpha/fuse: Transport endpoint is not connected")


# --------------------------------------------------------------------------
# duplex status --watch (here because this helper owns only this test file;
# it belongs with tests/cli/test_status.py)


class _Terminal(io.StringIO):
    """A stdout that says it is a terminal and logs each write as an event."""

    def __init__(self, events: list, tty: bool = True):
        super().__init__()
        self.events, self.tty = events, tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.events.append(("write", s))
        return super().write(s)


def _watch(monkeypatch, config_file, tty: bool, frames: int = 3) -> list:
    events: list = []
    fetched = iter(range(1, 100))

    def fake_status(resource, node, timeout):
        d = offline_status(resource, node, None, f"test frame {next(fetched)}")
        events.append(("fetch", d["reason"]))
        return d

    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        if len(sleeps) == frames:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_status_of", fake_status)
    monkeypatch.setattr(cli.time, "sleep", fake_sleep)
    monkeypatch.setattr(cli.time, "strftime", lambda fmt, *a: "2024-01-02 03:04:05")
    monkeypatch.setattr(sys, "stdout", _Terminal(events, tty))
    code = cli.main(["--config", str(config_file), "--node", "alpha", "status", "r0",
                     "--watch", "--interval", "0.5"])
    assert code == 0 and sleeps == [0.5] * frames
    return [e for e in events if e != ("write", "")]


def test_status_watch_on_a_terminal_fetches_first_then_redraws_in_one_write(
        monkeypatch, config_file, setup_dir):
    cfg = parse_config(config_file.read_text(), str(config_file))
    r = cfg.resource("r0")
    events = _watch(monkeypatch, config_file, tty=True)
    header = "2024-01-02 03:04:05 (every 0.5s, Ctrl-C to stop)"
    expected = []
    for i in (1, 2, 3):
        d = offline_status(r, r.node("alpha"), None, f"test frame {i}")
        expected += [("fetch", f"test frame {i}"),
                     ("write", watch_frame(format_line(d), header=header))]
    # Nothing is cleared while the status is fetched: one write per frame,
    # after the fetch, overwriting the previous frame in place.
    assert events == expected
    assert all("\x1b[2J" not in s for kind, s in events if kind == "write")


def test_status_watch_to_a_pipe_prints_plain_frames_separated_by_a_blank_line(
        monkeypatch, config_file, setup_dir):
    cfg = parse_config(config_file.read_text(), str(config_file))
    r = cfg.resource("r0")
    events = _watch(monkeypatch, config_file, tty=False)
    out = "".join(s for kind, s in events if kind == "write")
    assert "\x1b" not in out
    frames = [format_line(offline_status(r, r.node("alpha"), None, f"test frame {i}"))
              for i in (1, 2, 3)]
    assert out == "".join(f"{f}\n\n" for f in frames)
    assert [e[0] for e in events if e[0] == "fetch"] == ["fetch"] * 3

"""A device in use is refused (issue 10, item 4): a real loop device with a
mounted ext4 as a node's device is refused by ``create-md``, ``up`` (both
roles) and ``attach``, each with one line naming the mount and no
traceback; an image file is locked by the daemon that uses it, and an
image that is a loop device's backing file is refused too."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DUPLEX = [sys.executable, "-m", "replicator.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def write_config(config_text):
    """Factory: write_config(tmp, alpha_device) -> the config's path."""
    return lambda tmp, alpha_device: _write_config(config_text, tmp, alpha_device)


def _write_config(config_text, tmp: Path, alpha_device: str) -> Path:
    """r0 with alpha on *alpha_device*, both nodes on 127.0.0.1 (so `up`
    gets past its address checks to the device), exports under *tmp*."""
    text = config_text(tmp).replace(f'device = "{tmp}/alpha.img"', f'device = "{alpha_device}"')
    text = (text.replace("10.0.0.1:7789", f"127.0.0.1:{_free_port()}")
                .replace("10.0.0.2:7789", f"127.0.0.1:{_free_port()}")
                .replace('journal-size = "16MiB"', 'journal-size = "8MiB"'))
    path = tmp / "duplex.toml"
    path.write_text(text)
    return path


def _duplex(config: Path, node: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    try:
        return subprocess.run([*DUPLEX, "--config", str(config), "--node", node, *args],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"duplex {' '.join(args)} still ran after {timeout:g} s: it took the device "
                    f"in use instead of refusing it\n{e.stderr or ''}")


def _assert_refused(r: subprocess.CompletedProcess, device: str, holder: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode != 0, f"accepted a device in use (exit 0):\n{out}"
    assert "Traceback" not in out, out
    lines = [line for line in r.stderr.splitlines() if device in line and holder in line]
    assert lines, f"no line names {device} and its holder ({holder!r}):\n{out}"
    assert "in use" in lines[0], lines[0]


@pytest.fixture
def loop_ext4(setup_dir: Path):
    """(loop device, its backing image, mount point): a real /dev/loopN with
    an ext4 on it, not mounted yet; ``mount()`` mounts it. Unmounted and
    detached at teardown, whatever the test did."""
    if os.geteuid() != 0:
        pytest.fail("loop devices need root; run the tests as root", pytrace=False)
    backing = setup_dir / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    mnt = setup_dir / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)

        def mount() -> None:
            subprocess.run(["mount", dev, str(mnt)], check=True, capture_output=True)

        yield dev, backing, mnt, mount
    finally:
        for _ in range(50):
            if not os.path.ismount(mnt):
                break
            subprocess.run(["umount", str(mnt)], capture_output=True)
            time.sleep(0.1)
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_create_md_refuses_a_mounted_loop_device_naming_the_mount(write_config, setup_dir, loop_ext4):
    dev, _, mnt, mount = loop_ext4
    mount()
    config = write_config(setup_dir, dev)
    r = _duplex(config, "alpha", "create-md", "r0")
    _assert_refused(r, dev, f"mounted at {mnt}")
    assert not (setup_dir / "alpha-meta" / "metadata.json").exists()


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_up_refuses_a_mounted_loop_device_naming_the_mount(write_config, setup_dir, loop_ext4, role):
    dev, _, mnt, mount = loop_ext4
    config = write_config(setup_dir, dev)
    r = _duplex(config, "alpha", "create-md", "r0")  # while nothing uses it
    assert r.returncode == 0, r.stdout + r.stderr
    mount()
    r = _duplex(config, "alpha", "up", "r0", "--role", role)
    _assert_refused(r, dev, f"mounted at {mnt}")


def test_attach_refuses_when_the_nodes_device_is_mounted(write_config, setup_dir, loop_ext4):
    dev, _, mnt, mount = loop_ext4
    mount()
    config = write_config(setup_dir, dev)
    r = _duplex(config, "alpha", "attach", "r0")
    _assert_refused(r, dev, f"mounted at {mnt}")


def test_an_image_that_backs_a_loop_device_is_refused(write_config, setup_dir, loop_ext4):
    dev, backing, mnt, mount = loop_ext4
    mount()
    config = write_config(setup_dir, str(backing))
    r = _duplex(config, "alpha", "create-md", "r0")
    _assert_refused(r, str(backing), f"the backing file of {dev}, mounted at {mnt}")


def test_a_running_daemon_locks_its_image_against_a_second_duplex(write_config, setup_dir):
    # Two configs naming one image (a typo away): the second is refused.
    from replicator.devices import DeviceBusy, claim_device
    config = write_config(setup_dir, str(setup_dir / "alpha.img"))
    assert _duplex(config, "beta", "create-md", "r0").returncode == 0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    up = subprocess.Popen([*DUPLEX, "--config", str(config), "--node", "beta", "up", "r0",
                           "--role", "secondary"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (setup_dir / "beta-meta" / "control.sock").exists():
            assert up.poll() is None, f"secondary exited: {up.stderr.read()}"
            assert time.monotonic() < deadline, "secondary did not start"
            time.sleep(0.05)
        with pytest.raises(DeviceBusy) as ei:
            claim_device(str(setup_dir / "beta.img"), "r1: node gamma")
        msg = str(ei.value)
        assert msg.startswith(f"r1: node gamma: device {setup_dir}/beta.img is in use (locked by "), msg
        assert f"pid {up.pid}" in msg and "another Duplex" in msg, msg
        other = setup_dir / "other.toml"
        other.write_text(config.read_text().replace(f"{setup_dir}/alpha-meta",
                                                    f"{setup_dir}/gamma-meta")
                         .replace(f'device = "{setup_dir}/alpha.img"',
                                  f'device = "{setup_dir}/beta.img"'))
        r = _duplex(other, "alpha", "create-md", "r0")
        _assert_refused(r, f"{setup_dir}/beta.img", f"pid {up.pid}")
    finally:
        up.terminate()
        up.wait(30)
    claim_device(str(setup_dir / "beta.img")).close()  # a stopped daemon let go

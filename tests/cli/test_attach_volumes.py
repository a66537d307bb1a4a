"""attach/detach of a two-volume resource (DESIGN §8) against the real
primary (our plugin under nbdkit, served alone: tests/fixtures/volume_primary.py):
``attach r0`` gives one device per volume and prints ``NAME DEVICE`` lines,
each device's writes reach that volume's image, ``--volume`` takes one,
each volume has its own record and FUSE directory, and detach gives them
all back leaving nothing behind."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.duplex_lab import Lab
from fixtures.volume_primary import free_port, serve_primary_alone
from replicator import attach as attach_mod
from replicator import cli
from replicator.config import load_config
from test_attach import run_dir  # noqa: F401 (the fixture: nothing left under it)

MiB = 1 << 20


@pytest.fixture
def lab(tmp_path, procs, run_dir, monkeypatch):  # noqa: F811
    lab = Lab(tmp_path / "lab", procs, None, None, size=8 * MiB, volumes=["data", "wal"],
              port=free_port(),
              volume_sizes={"wal": 4 * MiB})
    serve_primary_alone(lab)
    monkeypatch.setattr("replicator.attach.DEFAULT_RUN_DIR", str(run_dir))
    monkeypatch.setattr("replicator.attach.choose_method", lambda: "fuse")
    lab.argv = ["--config", str(lab.config), "--node", "alpha"]
    yield lab
    for v in ("data", "wal"):  # a test that failed half-way: give the devices back
        if (lab.meta["alpha"] / f"attach-{v}.json").exists():
            cli.main([*lab.argv, "detach", "r0", "--volume", v])
    lab.stop()


def _write(device: str, payload: bytes, offset: int) -> None:
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, payload, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_attach_gives_each_volume_its_device_and_detach_gives_them_back(lab, capsys, run_dir):  # noqa: F811
    assert cli.main([*lab.argv, "attach", "r0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["data", "wal"], lines
    dev = dict(ln.split() for ln in lines)
    assert all(d.startswith("/dev/loop") for d in dev.values()) and len(set(dev.values())) == 2
    assert os.path.getsize(lab.images["alpha"]["wal"]) == 4 * MiB
    _write(dev["data"], b"D" * 4096, 2 * MiB)
    _write(dev["wal"], b"W" * 4096, 2 * MiB)
    assert _read(lab.images["alpha"]["data"], 2 * MiB, 4096) == b"D" * 4096
    assert _read(lab.images["alpha"]["wal"], 2 * MiB, 4096) == b"W" * 4096
    for v in ("data", "wal"):
        rec = json.loads((lab.meta["alpha"] / f"attach-{v}.json").read_text())
        assert (rec["volume"], rec["device"]) == (v, dev[v])
        assert rec["mount_dir"] == str(Path(os.path.realpath(run_dir)) / "r0" / "alpha" / v / "fuse")
        assert rec["uri"] == f"nbd+unix:///{v}?socket={lab.sock}"
    assert not (lab.meta["alpha"] / "attach.json").exists()
    node = load_config(str(lab.config)).resource("r0").node("alpha")
    assert attach_mod.has_record(node)
    text = attach_mod.describe_attach(node)
    assert text == (f"volume data attached as {dev['data']} ({lab.meta['alpha']}/attach-data.json)"
                    f"; volume wal attached as {dev['wal']} ({lab.meta['alpha']}/attach-wal.json)")

    assert cli.main([*lab.argv, "detach", "r0"]) == 0
    assert capsys.readouterr().out == (f"r0: detached volume data ({dev['data']})\n"
                                       f"r0: detached volume wal ({dev['wal']})\n")
    assert not attach_mod.has_record(node)
    assert cli.main([*lab.argv, "detach", "r0"]) == 1
    assert capsys.readouterr().err == (
        f"duplex: error: no volume of resource r0 is attached on node alpha (no "
        f"{lab.meta['alpha']}/attach-data.json, {lab.meta['alpha']}/attach-wal.json)\n")


def test_one_volume_is_attached_with_volume_and_twice_is_refused_naming_it(lab, capsys):
    assert cli.main([*lab.argv, "attach", "r0", "--volume", "wal"]) == 0
    name, device = capsys.readouterr().out.split()
    assert name == "wal" and device.startswith("/dev/loop")
    assert not (lab.meta["alpha"] / "attach-data.json").exists()
    assert cli.main([*lab.argv, "attach", "r0", "--volume", "wal"]) == 1
    assert capsys.readouterr().err == (f"duplex: error: resource r0 volume wal is already attached "
                                       f"as {device} (run `duplex detach r0 --volume wal` first)\n")
    # Attaching all now: data attaches, wal is refused, and data is given back.
    assert cli.main([*lab.argv, "attach", "r0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("duplex: error: volume wal: resource r0 volume wal is already attached")
    assert err.rstrip().endswith("; volumes data given back"), err
    assert not (lab.meta["alpha"] / "attach-data.json").exists()
    assert cli.main([*lab.argv, "detach", "r0", "--volume", "data"]) == 1
    assert "volume data of resource r0 is not attached on node alpha" in capsys.readouterr().err
    assert cli.main([*lab.argv, "detach", "r0", "--volume", "wal"]) == 0
    assert capsys.readouterr().out == f"r0: detached volume wal ({device})\n"


def test_an_unknown_volume_is_refused_naming_the_volumes(lab, capsys):
    assert cli.main([*lab.argv, "attach", "r0", "--volume", "idx"]) == 1
    assert capsys.readouterr().err == ("duplex: error: resource r0 has no volume 'idx' on node "
                                       "alpha (its volumes: data, wal)\n")


def test_up_reattaches_every_dead_volume_once_the_server_is_back(lab, capsys):
    """The server dies under both attached volumes (nbdfuse goes with it, or
    is killed as it would die): once it serves again, the re-attach that
    `duplex up` runs gives each volume a working device in its own place."""
    import signal
    import time

    assert cli.main([*lab.argv, "attach", "r0"]) == 0
    dev = dict(ln.split() for ln in capsys.readouterr().out.splitlines())
    recs = {v: json.loads((lab.meta["alpha"] / f"attach-{v}.json").read_text())
            for v in ("data", "wal")}
    server = next(p for p in lab.procs.processes if p.name == "primary-alone")
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    for rec in recs.values():  # nbdfuse 1.14 answers EIO and stays: end it as a crash would
        try:
            os.kill(rec["nbdfuse_pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(attach_mod._pid_alive(r["nbdfuse_pid"]) for r in recs.values()):
        assert time.monotonic() < deadline, "nbdfuse did not exit"
        time.sleep(0.05)
    serve_primary_alone(lab, create=False)
    node = load_config(str(lab.config)).resource("r0").node("alpha")
    cfg = load_config(str(lab.config))
    msg = attach_mod.reattach(cfg, cfg.resource("r0"), node)
    assert msg is not None and msg.count("re-attached volume") == 2, msg
    assert "re-attached volume data's export as /dev/loop" in msg
    for v, payload in (("data", b"d" * 4096), ("wal", b"w" * 4096)):
        rec = json.loads((lab.meta["alpha"] / f"attach-{v}.json").read_text())
        assert rec["mount_dir"] == recs[v]["mount_dir"]  # the same place as before
        _write(rec["device"], payload, MiB)
        assert _read(lab.images["alpha"][v], MiB, 4096) == payload
    assert attach_mod.reattach(cfg, cfg.resource("r0"), node) is None  # both work: nothing to do
    assert set(dev) == {"data", "wal"}

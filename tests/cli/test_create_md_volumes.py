"""``duplex create-md`` on a resource with volume tables (DESIGN §8): each
volume's device size read and recorded in config order, the bitmap over
the logical size (the volumes laid end to end on track boundaries), one
line per volume; a missing or held device is refused in one line naming
the volume, and nothing is written."""
from __future__ import annotations

import fcntl
import os

from replicator import cli
from replicator.metadata import load_metadata
from replicator.native.bitmap import Bitmap

MiB = 1 << 20
TRACK = 64 << 10


def _setup(tmp_path, sizes: dict[str, int]):
    secret = tmp_path / "r0.secret"
    secret.write_text("s3cret\n")
    os.chmod(secret, 0o600)
    lines = ["[resource.r0]", f'secret-file = "{secret}"', 'track-size = "64KiB"',
             'journal-size = "2MiB"']
    for node, addr in (("alpha", "10.0.0.1"), ("beta", "10.0.0.2")):
        lines += ["", f"[resource.r0.on.{node}]", f'address = "{addr}:7789"',
                  f'meta-dir = "{tmp_path}/{node}-meta"']
        for vol, size in sizes.items():
            img = tmp_path / f"{node}-{vol}.img"
            with open(img, "wb") as f:
                f.truncate(size)
            lines += [f"[resource.r0.on.{node}.volume.{vol}]", f'device = "{img}"']
    cfg = tmp_path / "duplex.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return ["--config", str(cfg), "--node", "alpha"]


def test_create_md_records_each_volume_and_covers_the_logical_size(tmp_path, capsys):
    argv = _setup(tmp_path, {"data": 4 * MiB + 4096, "wal": MiB})
    assert cli.main([*argv, "create-md", "r0"]) == 0
    assert capsys.readouterr().out == (
        f"r0: created metadata for node alpha in {tmp_path}/alpha-meta\n"
        f"  volume data: device {tmp_path}/alpha-data.img (4.0 MiB)\n"
        f"  volume wal: device {tmp_path}/alpha-wal.img (1.0 MiB)\n"
        f"  track size 64.0 KiB, disk Inconsistent, needs initial sync\n")
    md = load_metadata(tmp_path / "alpha-meta", "r0")
    assert md.volumes == [{"name": "data", "size": 4 * MiB + 4096}, {"name": "wal", "size": MiB}]
    wal_base = 4 * MiB + TRACK  # data's partial last track, then wal on the next track
    assert md.device_size == wal_base + MiB
    bm = Bitmap.open(str(md.paths.bitmap), bytes.fromhex(md.node_uuid), TRACK)
    try:
        # Without --assume-clean every track of both volumes is owed to the peer.
        assert bm.nbits == md.device_size // TRACK and bm.count() == bm.nbits
    finally:
        bm.close()


def test_a_missing_volume_device_is_named_and_nothing_is_written(tmp_path, capsys):
    argv = _setup(tmp_path, {"data": 4 * MiB, "wal": MiB})
    (tmp_path / "alpha-wal.img").unlink()
    assert cli.main([*argv, "create-md", "r0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/alpha-wal.img" in err, err
    assert not (tmp_path / "alpha-meta" / "metadata.json").exists()


def test_a_held_volume_device_is_refused_naming_the_volume(tmp_path, capsys):
    argv = _setup(tmp_path, {"data": 4 * MiB, "wal": MiB})
    with open(tmp_path / "alpha-wal.img", "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another Duplex holds
        assert cli.main([*argv, "create-md", "r0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("duplex: error: r0: node alpha, volume wal: ") and err.count("\n") == 1, err
    assert not (tmp_path / "alpha-meta" / "metadata.json").exists()

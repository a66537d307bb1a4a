"""A real Engine over two image files (volumes "data" and "wal" of one
resource, DESIGN §8): C core, bitmaps, metadata, activity log; no nbdkit,
no peer. Each write lands in its own volume's image at its own offset,
one sequencer numbers every volume, the history records (volume, relative
offset), status splits the out-of-sync bytes by volume, and the engine
refuses a device whose size or volume list differs from the metadata's,
naming the volume."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.errors import DuplexError
from replicator.metadata import load_metadata, logical_size
from replicator.node import check_before_ready, create_metadata_set
from replicator.peerlink import PeerLink
from replicator.primary.engine import Engine
from replicator.records import OP_FLUSH, OP_WRITE, iter_records
from replicator.status import check_status, format_status
from replicator.volumes import read_volumes

MiB = 1 << 20
TRACK = 64 << 10
DATA_SIZE = 4 * MiB
WAL_SIZE = MiB + 4096  # not a whole number of tracks: an alignment gap follows


def _write_config(tmp_path: Path, volumes: dict[str, int]) -> Path:
    secret = tmp_path / "r0.secret"
    secret.write_text("unit-test-secret\n")
    os.chmod(secret, 0o600)
    lines = ["[resource.r0]", f'secret-file = "{secret}"', 'track-size = "64KiB"',
             'journal-size = "4MiB"']  # create-md preallocates it: keep the suite's disk small
    for node, addr in (("alpha", "10.0.0.1"), ("beta", "10.0.0.2")):
        (tmp_path / f"{node}-meta").mkdir(exist_ok=True)
        lines += ["", f"[resource.r0.on.{node}]", f'address = "{addr}:7789"',
                  f'meta-dir = "{tmp_path}/{node}-meta"', f'export = "unix:{tmp_path}/{node}.nbd"']
        for vol, size in volumes.items():
            img = tmp_path / f"{node}-{vol}.img"
            if not img.exists():
                with open(img, "wb") as f:
                    f.truncate(size)
            lines += ["", f"[resource.r0.on.{node}.volume.{vol}]", f'device = "{img}"']
    path = tmp_path / "duplex.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _create_md(config: Path) -> None:
    cfg = load_config(str(config))
    res = cfg.resource("r0")
    node = res.node("alpha")
    vols = read_volumes(node)
    create_metadata_set(cfg, res, node, logical_size(vols, res.track_size), assume_clean=True,
                        force=False, volumes=vols)


@pytest.fixture
def vol_config(tmp_path: Path, monkeypatch) -> Path:
    def no_peer(address, **kw):
        raise OSError(errno.ECONNREFUSED, "Connection refused")
    monkeypatch.setattr(PeerLink, "connect", no_peer)
    path = _write_config(tmp_path, {"data": DATA_SIZE, "wal": WAL_SIZE})
    _create_md(path)
    return path


@pytest.fixture
def engine(vol_config: Path, tmp_path: Path):
    eng = Engine.open(str(vol_config), "r0", "alpha", history_path=str(tmp_path / "history"))
    yield eng
    eng.stop(drain_timeout=0.2)


def _read(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_create_md_records_each_volume_and_the_logical_size(vol_config, tmp_path):
    md = load_metadata(tmp_path / "alpha-meta", "r0")
    assert md.volumes == [{"name": "data", "size": DATA_SIZE}, {"name": "wal", "size": WAL_SIZE}]
    # wal starts on the track after data; no padding after the last volume.
    assert md.device_size == DATA_SIZE + WAL_SIZE


def test_each_write_lands_in_its_volumes_image_at_its_offset(engine, tmp_path):
    a, b = b"D" * 4096, b"W" * 4096
    engine.write(a, 8192, volume=0)
    engine.write(b, 8192, volume=1)
    engine.write(b"E" * 512, WAL_SIZE - 512, volume=1)  # the wal's very end
    engine.flush()
    assert _read(tmp_path / "alpha-data.img", 8192, 4096) == a
    assert _read(tmp_path / "alpha-wal.img", 8192, 4096) == b
    assert _read(tmp_path / "alpha-wal.img", WAL_SIZE - 512, 512) == b"E" * 512
    # Nothing spilled into the other image, or past the wal's end.
    assert _read(tmp_path / "alpha-data.img", 0, DATA_SIZE).count(b"W") == 0
    assert os.path.getsize(tmp_path / "alpha-wal.img") == WAL_SIZE
    buf = bytearray(4096)
    engine.pread_into(buf, 8192, volume=1)
    assert bytes(buf) == b


def test_a_write_past_a_volumes_end_is_refused_not_spilled_into_the_next(engine):
    with pytest.raises(ValueError, match="outside the device .*alpha-data.img"):
        engine.write(b"x" * 4096, DATA_SIZE - 2048, volume=0)
    with pytest.raises(ValueError, match="volume 2 does not exist: 2 volume"):
        engine.write(b"x" * 512, 0, volume=2)


def test_one_sequencer_numbers_every_volume_and_records_carry_the_volume(engine, tmp_path):
    seqs = [engine.write(b"a" * 512, 0, volume=0).seq,
            engine.write(b"b" * 512, 4096, volume=1).seq,
            engine.zero(0, 4096, volume=1).seq,
            engine.flush().seq,
            engine.write(b"c" * 512, 512, volume=0).seq]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[-1] - seqs[0] == 4, seqs
    engine.stop(drain_timeout=0.2)
    engine.stop = lambda **kw: None  # the fixture's stop: already done
    recs = [(t.seq, t.op, t.volume, t.offset) for t, _ in
            iter_records((tmp_path / "history").read_bytes())]
    assert [(r[2], r[3]) for r in recs if r[1] == OP_WRITE] == [(0, 0), (1, 4096), (0, 512)], recs
    assert [r[0] for r in recs if r[1] == OP_FLUSH][:1] == [seqs[3]], recs


def test_status_lists_each_volume_with_its_own_out_of_sync_bytes(engine, tmp_path):
    engine.write(b"w" * 4096, WAL_SIZE - 4096, volume=1)  # the wal's last, partial track
    st = engine.status()
    assert check_status(st) == []
    vols = {v["name"]: v for v in st["volumes"]}
    assert [v["name"] for v in st["volumes"]] == ["data", "wal"]
    assert vols["data"] == {"name": "data", "device": str(tmp_path / "alpha-data.img"),
                            "size": DATA_SIZE, "out_of_sync_bytes": 0,
                            "nbd_uri": f"nbd+unix:///data?socket={tmp_path}/alpha.nbd"}
    # The wal's last track holds 4096 bytes of the volume: the rest is the gap.
    assert vols["wal"]["size"] == WAL_SIZE and vols["wal"]["out_of_sync_bytes"] == 4096, vols
    engine.write(b"d" * 512, 0, volume=0)
    st = engine.status()
    assert [v["out_of_sync_bytes"] for v in st["volumes"]] == [TRACK, 4096]
    text = format_status(st)
    assert f"  volume        data  {tmp_path}/alpha-data.img, 4.0 MiB, out of sync 64.0 KiB" in text
    assert f"  volume        wal   {tmp_path}/alpha-wal.img, 1.0 MiB, out of sync 4.0 KiB" in text


def test_a_volume_of_another_size_is_refused_naming_it_and_both_sizes(vol_config, tmp_path):
    os.truncate(tmp_path / "alpha-wal.img", WAL_SIZE + 65536)
    with pytest.raises(DuplexError) as ei:
        Engine.open(str(vol_config), "r0", "alpha")
    assert str(ei.value) == (f"r0: volume 'wal': device {tmp_path}/alpha-wal.img is "
                             f"{WAL_SIZE + 65536} bytes, but the metadata "
                             f"({tmp_path}/alpha-meta/metadata.json) was made for {WAL_SIZE} bytes")
    # up's own check says the same, with what to do.
    cfg = load_config(str(vol_config))
    res = cfg.resource("r0")
    md = load_metadata(tmp_path / "alpha-meta", "r0")
    with pytest.raises(DuplexError, match=r"^r0: volume 'wal': device .* was made for "
                                          rf"{WAL_SIZE} bytes: give the device back its size, "
                                          r"or run `duplex create-md r0 --force`"):
        check_before_ready(cfg, res, res.node("alpha"), md, primary=True)
    # The refused open gave every claim back: a good size opens again.
    os.truncate(tmp_path / "alpha-wal.img", WAL_SIZE)
    Engine.open(str(vol_config), "r0", "alpha").stop(drain_timeout=0.2)


def test_a_volume_the_metadata_does_not_list_is_refused_by_name(vol_config, tmp_path):
    _write_config(tmp_path, {"data": DATA_SIZE, "wal": WAL_SIZE, "idx": MiB})
    with pytest.raises(DuplexError, match=r"^r0: volume 'idx' is configured but not in the "
                                          r"metadata \(.*metadata.json lists data, wal; the "
                                          r"config lists data, wal, idx\)$"):
        Engine.open(str(vol_config), "r0", "alpha")


def test_a_volume_held_by_another_engine_is_refused_naming_the_volume(engine, vol_config):
    with pytest.raises(DuplexError, match=r"^r0: node alpha, volume data: .*alpha-data.img"):
        Engine.open(str(vol_config), "r0", "alpha")


def test_a_single_volume_engine_is_one_default_volume(r0_config, tmp_path, monkeypatch):
    monkeypatch.setattr(PeerLink, "connect",
                        lambda a, **kw: (_ for _ in ()).throw(OSError(errno.ECONNREFUSED, "no")))
    cfg = load_config(str(r0_config))
    res = cfg.resource("r0")
    create_metadata_set(cfg, res, res.node("alpha"), 4 << 20, assume_clean=True, force=False)
    eng = Engine.open(str(r0_config), "r0", "alpha")
    try:
        eng.write(b"s" * 4096, 4096)
        assert _read(tmp_path / "alpha.img", 4096, 4096) == b"s" * 4096
        st = eng.status()
        assert st["volumes"] == [{"name": "default", "device": str(tmp_path / "alpha.img"),
                                  "size": 4 << 20, "out_of_sync_bytes": TRACK,
                                  "nbd_uri": f"nbd+unix:///?socket={tmp_path}/r0.nbd"}]
        assert "volume " not in format_status(st)  # the table is as before volumes
    finally:
        eng.stop(drain_timeout=0.2)


def test_verify_ranges_name_their_volume_and_skip_the_gap():
    from replicator.layout import Layout
    from replicator.primary.verify import VerifyRun, by_volume

    lay = Layout([("data", DATA_SIZE), ("wal", WAL_SIZE)], TRACK)
    wal0 = lay.bases[1] // TRACK
    last = (lay.logical_size - 1) // TRACK  # the wal's partial last track
    run = VerifyRun(fix=False, total_tracks=lay.ntracks, differing=[wal0 - 1, wal0, last])
    d = run.as_dict(TRACK, lay.logical_size, lay)
    assert d["differing"] == [{"volume": "data", "offset": DATA_SIZE - TRACK, "length": TRACK},
                              {"volume": "wal", "offset": 0, "length": TRACK},
                              {"volume": "wal", "offset": WAL_SIZE - 4096, "length": 4096}]
    assert d["differing_bytes"] == 2 * TRACK + 4096
    one = [{"offset": 0, "length": TRACK}]
    assert by_volume(one, Layout.single(DATA_SIZE, TRACK)) == one  # one volume: as before


@pytest.mark.parametrize("recorded, why", [
    ([{"name": "wal", "size": 1}, {"name": "data", "size": 1}],
     "the volumes are configured in another order than the metadata's (M lists wal, data; "
     "the config lists data, wal)"),
    ([{"name": "data", "size": 1}, {"name": "wal", "size": 1}, {"name": "idx", "size": 1}],
     "volume 'idx' is in the metadata but no longer configured (M lists data, wal, idx; the "
     "config lists data, wal)"),
])
def test_a_volume_list_that_differs_from_the_metadata_is_named(vol_config, recorded, why):
    from replicator.volumes import VolumeSizeError, check_volumes

    res = load_config(str(vol_config)).resource("r0")
    with pytest.raises(VolumeSizeError) as ei:
        check_volumes(res, res.node("alpha"), recorded, "M", fix="do this")
    assert str(ei.value) == f"r0: {why}: do this"

"""The primary of a two-volume resource under real nbdkit (DESIGN §8), the
secondary left out: one nbdkit process serves volume "data" and volume
"wal" as exports of those names at one socket; an NBD client writing each
export lands in that volume's primary image at that offset, the export
list names both, "" is "data", and an unknown export name is refused with
an NBD error while the server goes on serving."""
from __future__ import annotations

import nbd
import pytest

from fixtures.duplex_lab import REPO, RESOURCE, Lab
from fixtures.nbdkit import start_nbdkit

MiB = 1 << 20
WAL_SIZE = 8 * MiB + 4096  # not whole tracks: the logical gap after it is no one's


@pytest.fixture
def served(tmp_path, procs):
    """(lab, nbdkit server) of alpha's primary alone, metadata made through
    the same create-md set building `duplex create-md` uses."""
    from replicator.config import load_config
    from replicator.metadata import logical_size
    from replicator.node import create_metadata_set
    from replicator.volumes import read_volumes

    lab = Lab(tmp_path / "lab", procs, None, None, size=16 * MiB, volumes=["data", "wal"],
              volume_sizes={"wal": WAL_SIZE})
    cfg = load_config(str(lab.config))
    res = cfg.resource(RESOURCE)
    node = res.node("alpha")
    (lab.meta["alpha"]).mkdir(parents=True, exist_ok=True)
    vols = read_volumes(node)
    create_metadata_set(cfg, res, node, logical_size(vols, res.track_size), True, False, vols)
    server = start_nbdkit(procs, REPO / "nbdplugin" / "plugin.py",
                          [f"config={lab.config}", f"resource={RESOURCE}", "node=alpha"],
                          workdir=tmp_path / "nbdkit", name="primary")
    yield lab, server
    lab.stop()


def _connect(sock, export: str):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(str(sock))
    return h


def _read(path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_each_export_writes_its_own_volume_image_at_its_offset(served):
    lab, server = served
    data, wal = _connect(server.socket_path, "data"), _connect(server.socket_path, "wal")
    default = _connect(server.socket_path, "")
    try:
        assert (data.get_size(), wal.get_size(), default.get_size()) == (16 * MiB, WAL_SIZE,
                                                                        16 * MiB)
        data.pwrite(b"D" * 65536, 3 * MiB)
        wal.pwrite(b"W" * 4096, 3 * MiB)
        wal.pwrite(b"E" * 4096, WAL_SIZE - 4096)  # the wal's end, before the gap
        default.pwrite(b"0" * 512, 0)             # "" is the first volume
        wal.flush()                               # covers every volume
        assert wal.pread(4096, 3 * MiB) == b"W" * 4096
        assert data.pread(4096, 3 * MiB) == b"D" * 4096
    finally:
        for h in (data, wal, default):
            h.shutdown()
    img_d, img_w = lab.images["alpha"]["data"], lab.images["alpha"]["wal"]
    assert _read(img_d, 3 * MiB, 65536) == b"D" * 65536
    assert _read(img_d, 0, 512) == b"0" * 512
    assert _read(img_w, 3 * MiB, 4096) == b"W" * 4096
    assert _read(img_w, WAL_SIZE - 4096, 4096) == b"E" * 4096
    assert b"W" not in img_d.read_bytes() and b"D" not in img_w.read_bytes()
    # Status through the control socket: each volume, its size, its dirty bytes
    # (no peer: every written track stays out of sync). The wal's last track
    # holds 4096 bytes of it; the rest of that track is the gap, counted for none.
    st = lab.control("alpha")
    assert [(v["name"], v["size"], v["out_of_sync_bytes"]) for v in st["volumes"]] == [
        ("data", 16 * MiB, 2 * 65536), ("wal", WAL_SIZE, 65536 + 4096)], st["volumes"]
    assert st["out_of_sync_bytes"] == 2 * 65536 + 65536 + 4096  # their sum


def test_the_export_list_names_the_volumes_and_an_unknown_name_is_refused(served):
    lab, server = served
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(server.socket_path))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    assert names == ["data", "wal"]
    bad = nbd.NBD()
    bad.set_export_name("nope")
    with pytest.raises(nbd.Error):
        bad.connect_unix(str(server.socket_path))
    assert server.process.is_running()
    ok = _connect(server.socket_path, "wal")  # the server goes on serving
    try:
        assert ok.get_size() == WAL_SIZE
    finally:
        ok.shutdown()
    assert "r0: no volume 'nope': the exports are 'data', 'wal'" in server.log_text()

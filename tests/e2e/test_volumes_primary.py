"""A two-volume resource under real nbdkit (DESIGN §8).

The primary alone (the secondary left out): one nbdkit process serves
volume "data" and volume "wal" as exports of those names at one socket; an
NBD client writing each export lands in that volume's primary image at that
offset, the export list names both, "" is "data", an unknown export name
is refused with an NBD error while the server goes on serving, and a
secondary with another volume list is refused at the handshake naming the
volume. Then the whole path as a user runs it (create-md, up on both
nodes): both volumes replicate, an initial sync copies both across the
alignment gap, and verify reports by volume."""
from __future__ import annotations

import json
import random

import nbd
import pytest

from fixtures.duplex_lab import Lab
from fixtures.volume_primary import free_port, serve_primary_alone

MiB = 1 << 20
WAL_SIZE = 8 * MiB + 4096  # not whole tracks: the logical gap after it is no one's


@pytest.fixture
def served(tmp_path, procs):
    """(lab, nbdkit process) of alpha's primary alone, its metadata made
    as `duplex create-md` makes it, nbdkit started as `duplex up` starts it."""
    lab = Lab(tmp_path / "lab", procs, None, None, size=16 * MiB, volumes=["data", "wal"],
              port=free_port(), volume_sizes={"wal": WAL_SIZE})
    proc = serve_primary_alone(lab)
    yield lab, proc
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
    lab, proc = served
    data, wal = _connect(lab.sock, "data"), _connect(lab.sock, "wal")
    default = _connect(lab.sock, "")
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
    lab, proc = served
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(str(lab.sock))
    names: list[str] = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    assert names == ["data", "wal"]
    bad = nbd.NBD()
    bad.set_export_name("nope")
    with pytest.raises(nbd.Error):
        bad.connect_unix(str(lab.sock))
    assert proc.is_running()
    ok = _connect(lab.sock, "wal")  # the server goes on serving
    try:
        assert ok.get_size() == WAL_SIZE
    finally:
        ok.shutdown()
    assert "r0: no volume 'nope': the exports are 'data', 'wal'" in proc.log_text()


def test_a_secondary_with_another_volume_list_is_refused_naming_the_volume(served, tmp_path,
                                                                           procs):
    """beta's own config gives r0 a plain device (one 'default' volume): the
    handshake refuses it on both sides, naming the volumes, and says so in
    status; nothing is replicated."""
    lab, proc = served
    other = Lab(tmp_path / "beta-view", procs, None, None, size=16 * MiB, port=lab.port)
    other.secret.write_text(lab.secret.read_text())
    other.create_md()
    other.start_secondary()
    try:
        # The secondary checks the primary's STATE (which comes first) and
        # refuses; the primary hears why.
        why = ("peer refused: volume lists differ: the primary has volume 'data', the "
               "secondary does not (the primary's: data, wal; the secondary's: default)")
        st = other.wait(lambda: (s := lab.control("alpha"))["last_error"]
                        and "volume lists" in s["last_error"] and s, "alpha's refusal",
                        timeout=30, proc=proc)
        assert why in st["last_error"], st["last_error"]
        assert st["connection"] != "Connected" and st["seq"]["journaled"] == 0
        sec = other.control("beta")  # the secondary names the refusal as its reason
        assert sec["reason"] == ("connection from 127.0.0.1 refused: "
                                 + why.removeprefix("peer refused: ")), sec
    finally:
        other.stop()


def test_both_volumes_replicate_through_create_md_and_up(make_lab):
    """The whole path as a user runs it: `duplex create-md` and `duplex up`
    on both nodes of a two-volume resource, writes on both exports (one
    order, one flush), and each secondary image ends equal to its primary
    image; status lists both volumes in sync on both nodes."""
    lab = make_lab(size=8 * MiB, volumes=["data", "wal"], volume_sizes={"wal": WAL_SIZE})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    data, wal = nbd.NBD(), nbd.NBD()
    data.connect_uri(lab.volume_uri("data"))
    wal.connect_uri(lab.volume_uri("wal"))
    try:
        for i in range(64):  # alternating, each write waited for: a dependent chain
            data.pwrite(bytes([i]) * 4096, (i * 7919 % 2000) * 4096)
            wal.pwrite(bytes([255 - i]) * 512, (i * 104729 % 16000) * 512)
        wal.pwrite(b"E" * 4096, WAL_SIZE - 4096)
        wal.zero(65536, 0)
        data.trim(65536, 65536)
        data.flush()
    finally:
        data.shutdown()
        wal.shutdown()
    st = lab.wait_drained()
    for v in ("data", "wal"):
        assert lab.digest("beta", v) == lab.digest("alpha", v), f"volume {v} differs"
    assert [(v["name"], v["size"]) for v in st["volumes"]] == [("data", 8 * MiB), ("wal", WAL_SIZE)]
    prim = lab.control("alpha")
    assert [(v["name"], v["out_of_sync_bytes"]) for v in prim["volumes"]] == [("data", 0), ("wal", 0)]
    text = lab.duplex("alpha", "status", "r0", "--verbose").stdout
    assert "  volume        wal   " in text and "out of sync 0 B" in text, text


def test_verify_names_the_volume_of_a_difference_and_fix_resends_it(make_lab):
    """verify spans every volume: a corruption behind the secondary's back
    in wal (mid-volume, and in its last, partial track) is reported by
    volume and volume-relative offset, and --fix resends it."""
    track = 64 << 10
    lab = make_lab(size=4 * MiB, volumes=["data", "wal"], volume_sizes={"wal": WAL_SIZE})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    h = nbd.NBD()
    h.connect_uri(lab.volume_uri("wal"))
    try:
        h.pwrite(b"w" * WAL_SIZE, 0)
        h.flush()
    finally:
        h.shutdown()
    lab.wait_drained()
    with open(lab.images["beta"]["wal"], "r+b") as f:
        for off in (3 * track + 100, WAL_SIZE - 10):
            f.seek(off)
            f.write(b"X" * 10)
    r = lab.duplex("alpha", "verify", "r0", "--json", check=False, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["differing"] == [
        {"volume": "wal", "offset": 3 * track, "length": track},
        {"volume": "wal", "offset": WAL_SIZE - 4096, "length": 4096}]
    human = lab.duplex("alpha", "verify", "r0", "--fix", check=False, timeout=120)
    assert f"  volume wal offset {3 * track} length {track}" in human.stdout, human.stdout
    lab.wait(lambda: lab.control("alpha")["out_of_sync_bytes"] == 0
             and lab.control("alpha")["replication"] == "Established", "the fix to be resent")
    lab.wait_drained()
    assert lab.digest("beta", "wal") == lab.digest("alpha", "wal")
    assert lab.digest("beta", "data") == lab.digest("alpha", "data")


def test_an_initial_sync_copies_both_volumes_across_the_alignment_gap(make_lab):
    """create-md without --assume-clean on volumes that differ between the
    nodes: the initial sync (catch-up increments over the logical space)
    makes each secondary image its primary's, the partial last tracks and
    the gap after data included; status shows nothing out of sync."""
    data_size = 4 * MiB + 4096  # a gap of one track less 4096 bytes follows data
    lab = make_lab(size=data_size, volumes=["data", "wal"], volume_sizes={"wal": WAL_SIZE})
    rnd = random.Random(12)
    for v in ("data", "wal"):
        with open(lab.images["alpha"][v], "r+b") as f:
            for _ in range(40):
                f.seek(rnd.randrange(0, lab.volume_size(v) - 4096))
                f.write(rnd.randbytes(4096))
            f.seek(lab.volume_size(v) - 512)
            f.write(b"T" * 512)  # the very last bytes of each volume
    lab.create_md(assume_clean=False)
    lab.start_secondary()
    lab.start_primary(history=False)
    lab.wait_drained()
    for v in ("data", "wal"):
        assert lab.digest("beta", v) == lab.digest("alpha", v), f"volume {v} differs"
    st = lab.control("alpha")
    assert [v["out_of_sync_bytes"] for v in st["volumes"]] == [0, 0]
    assert lab.control("beta")["disk"] in ("UpToDate", "Consistent")

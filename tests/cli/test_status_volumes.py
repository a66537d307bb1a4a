"""Status of a resource with volumes (DESIGN §8): the ``volumes`` list in
--json and in the human table, filled from the configuration when a
provider gives none, from the metadata when the node is down; the
out-of-sync bytes of each volume from the OOS bitmap's logical runs; a
plain-``device`` resource's table unchanged."""
from __future__ import annotations

from types import SimpleNamespace

from replicator.config import parse_config
from replicator.layout import Layout
from replicator.status import (check_status, format_status, new_status, offline_status,
                               volume_rows, volumes_out_of_sync)

TRACK = 64 << 10


def _r0(tmp):
    text = f"""\
[resource.r0]
secret-file = "{tmp}/r0.secret"
track-size = "64KiB"
[resource.r0.on.alpha]
address = "10.0.0.1:7789"
meta-dir = "{tmp}/alpha-meta"
[resource.r0.on.alpha.volume.data]
device = "/dev/sdb"
[resource.r0.on.alpha.volume.wal]
device = "/dev/sdc"
[resource.r0.on.beta]
address = "10.0.0.2:7789"
meta-dir = "{tmp}/beta-meta"
[resource.r0.on.beta.volume.data]
device = "/dev/vdb"
[resource.r0.on.beta.volume.wal]
device = "/dev/vdc"
"""
    return parse_config(text, "duplex.toml").resource("r0")


def test_a_provider_without_a_list_gets_the_configured_volumes_sizes_unknown(tmp_path):
    r0 = _r0(tmp_path)
    d = new_status(r0, r0.node("beta"), role="Secondary")
    assert check_status(d) == []
    assert d["volumes"] == [
        {"name": "data", "device": "/dev/vdb", "size": None, "out_of_sync_bytes": None},
        {"name": "wal", "device": "/dev/vdc", "size": None, "out_of_sync_bytes": None}]
    lines = format_status(d).splitlines()
    assert "  volume        data  /dev/vdb, size unknown, out of sync unknown" in lines
    assert "  volume        wal   /dev/vdc, size unknown, out of sync unknown" in lines


def test_a_stopped_node_shows_the_sizes_its_metadata_recorded(tmp_path):
    r0 = _r0(tmp_path)
    md = SimpleNamespace(role="Primary", disk="UpToDate", seq_hwm=7, needs_initial_sync=False,
                         seq_reserved=False,
                         volumes=[{"name": "data", "size": 1 << 30}, {"name": "wal", "size": 1 << 28}])
    d = offline_status(r0, r0.node("alpha"), md, "not running")
    assert [(v["name"], v["size"], v["out_of_sync_bytes"]) for v in d["volumes"]] == [
        ("data", 1 << 30, None), ("wal", 1 << 28, None)]
    assert "  volume        wal   /dev/sdc, 256.0 MiB, out of sync unknown" in format_status(d)


def test_out_of_sync_bytes_are_split_by_volume_and_the_gap_counts_for_none():
    lay = Layout([("data", 3 * TRACK + 4096), ("wal", 2 * TRACK)], TRACK)
    assert lay.bases == (0, 4 * TRACK)
    # Track 3 (data's partial last track: 4096 bytes of data, then the gap)
    # and track 4 (wal's first), as one logical run.
    runs = [(3 * TRACK, 2 * TRACK)]
    assert volumes_out_of_sync(runs, lay.bases, lay.sizes) == [4096, TRACK]
    assert volumes_out_of_sync([(0, lay.logical_size)], lay.bases, lay.sizes) == list(lay.sizes)
    assert volumes_out_of_sync([], lay.bases, lay.sizes) == [0, 0]


def test_a_damaged_volume_list_is_named_by_check_status(tmp_path):
    r0 = _r0(tmp_path)
    d = new_status(r0, r0.node("alpha"), volumes=[{"name": "data"}, "wal"])
    assert check_status(d) == ["missing key volumes[0].device", "missing key volumes[0].size",
                               "missing key volumes[0].out_of_sync_bytes",
                               "volumes[1] is not an object"]
    assert check_status(new_status(r0, r0.node("alpha"), volumes=[])) == [
        "volumes is not a non-empty list"]


def test_rows_take_sizes_and_out_of_sync_bytes_in_volume_order(tmp_path):
    r0 = _r0(tmp_path)
    rows = volume_rows(r0.node("alpha"), [10, 20], [0, 5])
    assert rows == [{"name": "data", "device": "/dev/sdb", "size": 10, "out_of_sync_bytes": 0},
                    {"name": "wal", "device": "/dev/sdc", "size": 20, "out_of_sync_bytes": 5}]

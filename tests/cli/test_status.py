"""The status schema and its human rendering, for a Primary and a Secondary."""
from __future__ import annotations

import json

import pytest

from replicator.config import parse_config
from replicator.metadata import create_metadata
from replicator.status import (check_status, format_status, new_status, offline_status,
                               progress_bar)


@pytest.fixture
def r0(setup_dir, config_text):
    return parse_config(config_text(setup_dir), "duplex.toml").resource("r0")


def test_primary_status_is_complete_and_renders_a_table(r0):
    d = new_status(r0, r0.node("alpha"), role="Primary", connection="Established",
                   disk="UpToDate", peer={"disk": "UpToDate"},
                   seq={"written": 1200, "journaled": 1190, "applied": 1180},
                   lag={"writes": 20, "bytes": 81920, "seconds": 0.0123},
                   out_of_sync_bytes=131072, nbd_uri=r0.node("alpha").export_uri())
    assert check_status(d) == []
    assert json.loads(json.dumps(d)) == d  # JSON-able as is
    assert format_status(d) == "\n".join([
        "r0 on alpha: Primary, Established, disk UpToDate",
        "  peer          beta (10.0.0.2:7789), disk UpToDate",
        "  seq           written 1200  journaled 1190  applied 1180",
        "  lag           20 writes, 80.0 KiB, 12ms",
        "  out of sync   128.0 KiB",
        f"  export        {r0.node('alpha').export_uri()}",
    ])


def test_secondary_sync_target_shows_a_progress_bar_and_eta(r0):
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="SyncTarget",
                   disk="Inconsistent", peer={"disk": "UpToDate"},
                   sync={"done_bytes": 1 << 30, "total_bytes": 4 << 30,
                         "rate": 100 << 20, "eta_seconds": 30.72},
                   reason="initial sync")
    assert check_status(d) == []
    text = format_status(d)
    assert text.splitlines()[0] == "r0 on beta: Secondary, SyncTarget, disk Inconsistent"
    assert "  peer          alpha (10.0.0.1:7789), disk UpToDate" in text
    assert ("  sync          [########......................]  25.0%  "
            "1.0 GiB of 4.0 GiB at 100.0 MiB/s, ETA 30.7s") in text
    assert text.splitlines()[-1] == "  reason        initial sync"
    assert "export" not in text


def test_check_status_names_what_is_wrong(r0):
    d = new_status(r0, r0.node("alpha"), role="Boss", sync={"done_bytes": 1})
    del d["lag"]
    assert check_status(d) == ["missing key 'lag'"]
    d = new_status(r0, r0.node("alpha"), role="Boss", sync={"done_bytes": 1})
    assert check_status(d) == [
        "role is 'Boss', not one of Primary, Secondary, Unknown",
        "missing key sync.total_bytes", "missing key sync.rate", "missing key sync.eta_seconds",
    ]


def test_offline_status_comes_from_metadata(r0, setup_dir):
    md = create_metadata(setup_dir / "beta-meta", "r0", "beta", 4 << 20, 65536, assume_clean=False)
    md.seq_hwm = 42
    d = offline_status(r0, r0.node("beta"), md, "not running")
    assert check_status(d) == []
    assert (d["running"], d["role"], d["connection"], d["disk"]) == (
        False, "Secondary", "StandAlone", "Inconsistent")
    assert d["seq"]["written"] == 42
    assert d["reason"] == "not running; needs initial sync"
    assert format_status(d).splitlines()[0] == "r0 on beta: Secondary, down, disk Inconsistent"


def test_progress_bar_clamps():
    assert progress_bar(5, 0, width=4) == "[....]   0.0%"
    assert progress_bar(10, 5, width=4) == "[####] 100.0%"

"""The status schema and its human rendering, for a Primary and a Secondary:
the table, the resync progress line, the catch-up byte count, the --watch
frame, and --json passing the provider's dict through untouched."""
from __future__ import annotations

import copy
import json

import pytest

from replicator import cli
from replicator.config import parse_config
from replicator.control import ControlServer
from replicator.metadata import create_metadata
from replicator.status import (check_status, format_eta, format_status, format_sync,
                               new_status, offline_status, progress_bar, watch_frame)


@pytest.fixture
def r0(setup_dir, config_text):
    return parse_config(config_text(setup_dir), "duplex.toml").resource("r0")


def test_primary_status_is_complete_and_renders_a_table(r0):
    d = new_status(r0, r0.node("alpha"), role="Primary", connection="Established",
                   disk="UpToDate", peer={"disk": "UpToDate"},
                   seq={"written": 1200, "journaled": 1190, "applied": 1180},
                   lag={"writes": 20, "bytes": 81920, "seconds": 0.0123},
                   out_of_sync_bytes=131072, nbd_uri=r0.node("alpha").export_uri(),
                   incr_bytes_sent=3 << 20)
    assert check_status(d) == []
    assert json.loads(json.dumps(d)) == d  # JSON-able as is
    assert format_status(d) == "\n".join([
        "r0 on alpha: Primary, Established, disk UpToDate",
        "  peer          beta (10.0.0.2:7789), disk UpToDate",
        "  seq           written 1200  journaled 1190  applied 1180",
        "  lag           20 writes, 80.0 KiB, 12ms",
        "  out of sync   128.0 KiB",
        f"  export        {r0.node('alpha').export_uri()}",
        "  catch-up      3.0 MiB sent in increments",
    ])


def test_primary_catching_up_shows_progress_bar_rate_eta_and_increment(r0):
    d = new_status(r0, r0.node("alpha"), role="Primary", connection="SyncSource",
                   disk="UpToDate", peer={"disk": "Consistent"},
                   out_of_sync_bytes=1 << 30, nbd_uri=r0.node("alpha").export_uri(),
                   sync={"done_bytes": 1267302401, "total_bytes": 2684354560,
                         "rate": 85 << 20, "eta_seconds": 15.9, "increment": 3},
                   incr_bytes_sent=1267302401)
    assert check_status(d) == []
    lines = format_status(d).splitlines()
    assert lines[0] == "r0 on alpha: Primary, SyncSource, disk UpToDate"
    assert lines[-2:] == [
        "  sync          [#########...........]  47.2%  1.2 GiB of 2.5 GiB, 85.0 MiB/s, "
        "eta 16s (increment 3)",
        "  catch-up      1.2 GiB sent in increments",
    ]


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
    assert ("  sync          [#####...............]  25.0%  "
            "1.0 GiB of 4.0 GiB, 100.0 MiB/s, eta 31s") in text
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
    assert format_status(d).splitlines()[0] == "r0 on beta: Secondary, StandAlone (not running), disk Inconsistent"


def test_progress_bar_clamps():
    assert progress_bar(5, 0, width=4) == "[....]   0.0%"
    assert progress_bar(10, 5, width=4) == "[####] 100.0%"


def test_sync_line_leaves_out_what_is_not_known_yet():
    # Right at the start of an increment: no rate measured, no ETA.
    assert format_sync({"done_bytes": 0, "total_bytes": 64 << 20, "rate": None,
                        "eta_seconds": None, "increment": 1}) == \
        "[....................]   0.0%  0 B of 64.0 MiB (increment 1)"
    # Providers without increments (and a total not known yet).
    assert format_sync({"done_bytes": 4096, "total_bytes": 0, "rate": 0,
                        "eta_seconds": None}) == \
        "[....................]   0.0%  4.0 KiB of 0 B, 0 B/s"
    assert format_sync({"done_bytes": 10 << 20, "total_bytes": 10 << 20, "rate": 1 << 20,
                        "eta_seconds": 0.0, "increment": 12}) == \
        "[####################] 100.0%  10.0 MiB of 10.0 MiB, 1.0 MiB/s, eta <1s (increment 12)"


def test_eta_is_whole_seconds_then_minutes_and_hours():
    assert [format_eta(s) for s in (0.2, 1.4, 15.5, 59.4, 245, 7380)] == \
        ["<1s", "1s", "16s", "59s", "4m05s", "2h03m"]


def test_catch_up_bytes_line_only_when_the_provider_reports_them(r0):
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="Established")
    assert "catch-up" not in format_status(d)
    d["incr_bytes_sent"] = 0
    assert "  catch-up      0 B sent in increments" in format_status(d).splitlines()


def test_formatting_leaves_the_status_dict_as_it_was(r0):
    d = new_status(r0, r0.node("alpha"), role="Primary", connection="SyncSource",
                   sync={"done_bytes": 1, "total_bytes": 2, "rate": 3, "eta_seconds": 4,
                         "increment": 5}, incr_bytes_sent=6)
    before = copy.deepcopy(d)
    format_status(d)
    assert d == before


def test_watch_frame_overwrites_in_place_and_erases_leftovers():
    frame = watch_frame("r0 on alpha: Primary\n  seq           written 7", header="12:00:00")
    assert frame == ("\x1b[H"
                     "12:00:00\x1b[K\n"
                     "r0 on alpha: Primary\x1b[K\n"
                     "  seq           written 7\x1b[K\n"
                     "\x1b[J")
    # No full-screen clear: that is what makes a redraw flicker.
    assert "\x1b[2J" not in frame
    assert watch_frame("a").startswith("\x1b[Ha\x1b[K\n")


def test_cli_json_passes_sync_through_and_human_form_shows_the_bar(capsys, config_file,
                                                                     setup_dir):
    meta = setup_dir / "alpha-meta"
    meta.mkdir()
    live = {"resource": "r0", "node": "alpha", "running": True, "role": "Primary",
            "connection": "SyncSource", "disk": "UpToDate",
            "peer": {"name": "beta", "address": "10.0.0.2:7789", "disk": "Consistent"},
            "seq": {"written": 10, "journaled": 5, "applied": 4},
            "lag": {"writes": 6, "bytes": 24576, "seconds": 1.5}, "out_of_sync_bytes": 1 << 20,
            "nbd_uri": "nbd+unix:///?socket=/x", "reason": None,
            "sync": {"done_bytes": 768 << 10, "total_bytes": 1 << 20, "rate": 256 << 10,
                     "eta_seconds": 1.0, "increment": 2},
            "incr_bytes_sent": 768 << 10, "ring": {"bytes": 0}}
    base = ["--config", str(config_file), "--node", "alpha", "status", "r0"]
    with ControlServer(meta, {"status": lambda: live}):
        assert cli.main([*base, "--json"]) == 0
        out = capsys.readouterr().out
        assert json.loads(out) == live
        assert cli.main(base) == 0  # one line
        assert capsys.readouterr().out == (
            "r0 role:Primary disk:UpToDate peer beta: Connected SyncSource peer-disk:Consistent "
            "75.0% eta 1s out-of-sync 1.0 MiB lag 1.5s\n")
        assert cli.main([*base, "--verbose"]) == 0  # the table
        out = capsys.readouterr().out
    assert ("  sync          [###############.....]  75.0%  768.0 KiB of 1.0 MiB, "
            "256.0 KiB/s, eta 1s (increment 2)") in out.splitlines()
    assert "  catch-up      768.0 KiB sent in increments" in out.splitlines()

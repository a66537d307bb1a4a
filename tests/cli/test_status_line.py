"""``duplex status`` for people: one line per resource (status.format_line),
as ``drbdadm status``; words only when they say something."""
from __future__ import annotations

import pytest

from replicator.config import parse_config
from replicator.status import format_line, format_lines, new_status, offline_status


@pytest.fixture
def r0(setup_dir, config_text):
    return parse_config(config_text(setup_dir)).resource("r0")


def test_a_healthy_primary_is_role_disk_peer_state_and_lag(r0):
    d = new_status(r0, r0.node("alpha"), role="Primary", connection="Established",
                   disk="UpToDate", peer={"disk": "UpToDate"}, lag={"seconds": 0.003})
    assert format_line(d) == \
        "r0 role:Primary disk:UpToDate peer beta: Connected Established lag 3ms"


def test_a_cut_primary_says_ahead_what_is_out_of_sync_and_why(r0):
    d = new_status(r0, r0.node("alpha"), role="Primary", connection="Connecting",
                   replication="Ahead", disk="UpToDate", peer={"disk": "Unknown"},
                   out_of_sync_bytes=12 << 20, last_error="connecting to beta: No route to host")
    assert format_line(d) == ("r0 role:Primary disk:UpToDate peer beta: Connecting Ahead "
                              "peer-disk:Unknown out-of-sync 12.0 MiB "
                              "(connecting to beta: No route to host)")


def test_a_sync_target_shows_its_progress_and_eta(r0):
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="SyncTarget",
                   disk="Inconsistent", peer={"disk": "UpToDate"}, lag={"seconds": None},
                   sync={"done_bytes": 1 << 30, "total_bytes": 4 << 30, "rate": 1,
                         "eta_seconds": 30.7}, reason="initial sync")
    assert format_line(d) == ("r0 role:Secondary disk:Inconsistent peer alpha: Connected "
                              "SyncTarget 25.0% eta 31s lag unknown (initial sync)")


def test_a_stopped_node_and_faulted_threads(r0):
    d = offline_status(r0, r0.node("beta"), None, "not running")
    assert format_line(d) == "r0 role:Unknown disk:Unknown not running (not running)"
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="Established",
                   disk="Consistent", peer={"disk": "UpToDate"},
                   faults=[{"thread": "duplex-applier", "state": "restarting", "error": "x"}])
    assert format_line(d) == ("r0 role:Secondary disk:Consistent peer alpha: Connected "
                              "Established lag 0ms faults:1 (duplex-applier)")
    assert format_lines([d, d]).count("\n") == 1

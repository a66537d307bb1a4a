"""Status tells the truth (issue 10 item 7): connection and replication are
separate and neither masks the other; a value nobody measured is unknown,
not zero; ``status --check`` exits 1 unless the node is healthy, naming
why; ``status --watch RES`` takes RES as the resource."""
from __future__ import annotations

import json

import pytest

from replicator import cli
from replicator.config import load_config
from replicator.control import ControlServer
from replicator.status import check_status, format_status, health_problems, new_status


@pytest.fixture
def r0(r0_config):
    return load_config(str(r0_config)).resource("r0")


def _primary(r0, **kw):
    fields = dict(role="Primary", connection="Connected", replication="Established",
                  disk="UpToDate", peer={"disk": "UpToDate"},
                  seq={"written": 10, "journaled": 10, "applied": 10})
    fields.update(kw)
    return new_status(r0, r0.node("alpha"), **fields)


def test_a_dead_peer_with_a_resync_owed_shows_both_layers(r0):
    d = _primary(r0, connection="Connecting", replication="Ahead",
                 last_error="connecting to beta (10.0.0.2:7789): Connection refused",
                 peer={"disk": "Unknown"}, seq={"written": 100, "applied": 10},
                 lag={"writes": 90, "bytes": 0, "seconds": None},
                 reason="connecting to beta (10.0.0.2:7789): Connection refused; "
                        "resync needed: send ring overflowed")
    assert check_status(d) == []
    lines = format_status(d).splitlines()
    assert lines[0] == "r0 on alpha: Primary, Connecting, Ahead, disk UpToDate"
    # 90 writes outstanding and no sample: the age is unknown, not 0us.
    assert lines[3] == "  lag           90 writes, 0 B, unknown", lines
    assert "Connection refused" in lines[-1] and "resync needed" in lines[-1]


def test_a_provider_that_names_only_the_replication_state_is_connected(r0):
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="SyncTarget")
    assert (d["connection"], d["replication"]) == ("Connected", "SyncTarget")
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="StandAlone",
                   replication=None)
    assert (d["connection"], d["replication"]) == ("StandAlone", "Off")
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="StandAlone",
                   replication="SplitBrain", reason="split brain: ...")
    assert format_status(d).splitlines()[0] == \
        "r0 on beta: Secondary, StandAlone, SplitBrain, disk Unknown"


def test_check_status_refuses_words_outside_the_schema(r0):
    d = _primary(r0)
    d["connection"] = "Ahead"  # the old masking word is no connection state
    assert check_status(d) == ["connection is 'Ahead', not one of StandAlone, Connecting, "
                               "Connected"]


@pytest.mark.parametrize("change,problem", [
    ({}, None),
    ({"connection": "Connecting", "replication": "Off", "last_error": "Connection refused"},
     "connection Connecting: Connection refused"),
    ({"replication": "SyncSource"}, "replication SyncSource"),
    ({"connection": "StandAlone", "replication": "SplitBrain"}, "replication SplitBrain"),
    ({"disk": "Failed"}, "disk Failed"),
    ({"peer": {"disk": "Inconsistent"}}, "peer disk Inconsistent"),
    ({"faults": [{"thread": "duplex-shipper", "state": "restarting", "error": "boom"}]},
     "thread duplex-shipper restarting: boom"),
    ({"running": False, "reason": "not running"}, "not running (not running)"),
])
def test_health_is_running_connected_established_disks_valid_no_fault(r0, change, problem):
    d = _primary(r0, **change)
    got = health_problems(d)
    assert (got == []) if problem is None else (problem in got), got


def test_a_secondary_behind_but_established_is_healthy(r0):
    d = new_status(r0, r0.node("beta"), role="Secondary", connection="Established",
                   disk="Consistent", peer={"disk": "UpToDate"})
    assert health_problems(d) == []


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_check_exits_1_naming_why_and_0_when_healthy(capsys, r0_config, r0):
    live = _primary(r0)
    base = ["--config", str(r0_config), "--node", "alpha", "status", "r0", "--check"]
    with ControlServer(r0_config.parent / "alpha-meta", {"status": lambda: live}):
        code, out, err = _run(capsys, *base)
        assert (code, err) == (0, "")
        assert out.splitlines()[0].startswith(
            "r0 role:Primary disk:UpToDate peer beta: Connected Established lag "), out
        code, out, err = _run(capsys, *base, "--verbose")  # the table
        assert out.splitlines()[0] == "r0 on alpha: Primary, Established, disk UpToDate"
        live.update(connection="Connecting", replication="Ahead", last_error="no route to host")
        code, out, err = _run(capsys, *base, "--json")
        assert code == 1 and json.loads(out)["connection"] == "Connecting"
        assert err == ("duplex: r0 on alpha is not healthy: connection Connecting: no route "
                       "to host; replication Ahead\n")
    # Not running at all: unhealthy too.
    code, _, err = _run(capsys, *base)
    assert code == 1 and "not running" in err


def test_status_watch_takes_the_resource_and_the_interval_from_its_own_option(capsys,
                                                                           r0_config,
                                                                           monkeypatch):
    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        raise KeyboardInterrupt
    monkeypatch.setattr(cli.time, "sleep", fake_sleep)
    code, out, err = _run(capsys, "--config", str(r0_config), "--node", "alpha", "status",
                          "--watch", "r0", "--json")
    assert (code, sleeps) == (0, [2.0]), err
    assert json.loads(out.splitlines()[0])["resource"] == "r0"
    code, _, _ = _run(capsys, "--config", str(r0_config), "--node", "alpha", "status",
                      "--watch", "r0", "--interval", "0.25", "--json")
    assert sleeps[-1] == 0.25

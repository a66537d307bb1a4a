"""The admin's commands at the command line (DESIGN §7) when the node is not
running: one clear line each (exit 1), never a traceback; ``outdate`` works
offline on a stopped Secondary and refuses a stopped Primary."""
from __future__ import annotations

import json

import pytest

from replicator import cli
from replicator.metadata import load_metadata


def _run(config_file, capsys, *argv):
    rc = cli.main(["--config", str(config_file), *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("cmd", ["disconnect", "invalidate", "invalidate-remote", "pause-sync",
                                 "resume-sync"])
def test_a_command_for_a_running_node_names_the_stopped_node(config_file, capsys, cmd):
    rc, _, err = _run(config_file, capsys, "--node", "beta", cmd, "r0")
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("duplex: error: r0 is not running on node beta: ") and \
        f"`duplex {cmd}` acts on a running node" in err, err


def test_secondary_on_a_stopped_node_points_at_demote(config_file, capsys):
    rc, _, err = _run(config_file, capsys, "--node", "alpha", "secondary", "r0")
    assert rc == 1 and "is not running" in err and "duplex demote r0" in err, err


def test_outdate_offline_marks_a_stopped_secondary_and_refuses_a_primary(config_file, capsys):
    assert _run(config_file, capsys, "--node", "beta", "create-md", "r0")[0] == 0
    rc, out, err = _run(config_file, capsys, "--node", "beta", "outdate", "r0")
    assert rc == 0 and "Outdated (set in its metadata" in out, err
    meta = config_file.parent / "beta-meta"
    assert load_metadata(meta, "r0", "beta").outdated
    rc, out, _ = _run(config_file, capsys, "--node", "beta", "status", "r0", "--json")
    assert rc == 0 and json.loads(out)["disk"] == "Outdated", out

    assert _run(config_file, capsys, "--node", "alpha", "create-md", "r0")[0] == 0
    md = load_metadata(config_file.parent / "alpha-meta", "r0", "alpha")
    with md.update():
        md.role = "Primary"
    rc, _, err = _run(config_file, capsys, "--node", "alpha", "outdate", "r0")
    assert rc == 1 and "is Primary" in err and "Traceback" not in err, err
    assert not load_metadata(config_file.parent / "alpha-meta", "r0", "alpha").outdated


def test_primary_is_promote_by_drbds_name(config_file, capsys):
    p = cli.build_parser()
    a = p.parse_args(["primary", "r0", "--force"])
    assert a.func is cli.cmd_promote and a.force and a.timeout == 60.0

"""The duplex CLI: commands wired to the right calls, and every user
mistake a one-line "duplex: error: ..." with exit 1 (usage errors exit 2),
never a traceback."""
from __future__ import annotations

import json
import sys
import types

import pytest

from replicator import cli
from replicator.control import ControlServer
from replicator.errors import DuplexError
from replicator.metadata import MetaPaths, load_metadata


@pytest.fixture
def fake_node(monkeypatch):
    """A stand-in replicator.node recording what the CLI asks of it."""
    import replicator.node as real_node

    mod = types.ModuleType("replicator.node")
    mod.calls = []

    def create_node_files(config, resource, node, metadata):
        mod.calls.append(("create_node_files", resource.name, node.name, metadata.device_size))
        metadata.paths.bitmap.write_bytes(b"\0" * 8)

    def create_metadata_set(*args):
        # The real all-or-nothing build around this fake's node files.
        monkeypatch.setattr(real_node, "create_node_files", mod.create_node_files)
        return real_node.create_metadata_set(*args)

    def run_up(config, resource, node, role):
        mod.calls.append(("run_up", resource.name, node.name, role))
        return 3

    mod.create_node_files, mod.run_up = create_node_files, run_up
    mod.create_metadata_set = create_metadata_set
    monkeypatch.setitem(sys.modules, "replicator.node", mod)
    return mod


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_create_md_writes_metadata_and_node_files(capsys, config_file, setup_dir, fake_node):
    code, out, err = run(capsys, "--config", str(config_file), "--node", "alpha", "create-md", "r0")
    assert (code, err) == (0, "")
    assert out == (f"r0: created metadata for node alpha in {setup_dir}/alpha-meta\n"
                   f"  device {setup_dir}/alpha.img (4.0 MiB), track size 64.0 KiB, "
                   f"disk Inconsistent, needs initial sync\n")
    assert fake_node.calls == [("create_node_files", "r0", "alpha", 4 << 20)]
    md = load_metadata(setup_dir / "alpha-meta", "r0", "alpha")
    assert (md.device_size, md.track_size, md.disk) == (4 << 20, 65536, "Inconsistent")
    assert MetaPaths(setup_dir / "alpha-meta").bitmap.exists()


def test_create_md_twice_needs_force(capsys, config_file, setup_dir, fake_node):
    base = ["--config", str(config_file), "--node", "beta", "create-md", "r0"]
    assert run(capsys, *base, "--assume-clean")[0] == 0
    code, out, err = run(capsys, *base)
    assert (code, out) == (1, "")
    assert err == (f"duplex: error: {setup_dir}/beta-meta/metadata.json: metadata for this node "
                   f"already exists; --force overwrites it and discards its replication state\n")
    assert run(capsys, *base, "--force")[0] == 0
    assert load_metadata(setup_dir / "beta-meta", "r0").disk == "Inconsistent"


def test_create_md_refuses_a_missing_device(capsys, config_file, setup_dir, fake_node):
    (setup_dir / "alpha.img").unlink()
    code, _, err = run(capsys, "--config", str(config_file), "--node", "alpha", "create-md", "r0")
    assert code == 1
    assert err == f"duplex: error: device {setup_dir}/alpha.img does not exist\n"
    assert not (setup_dir / "alpha-meta" / "metadata.json").exists()


def test_create_md_refuses_while_running(capsys, config_file, setup_dir, fake_node):
    (setup_dir / "alpha-meta").mkdir()
    with ControlServer(setup_dir / "alpha-meta", {"status": dict}):
        code, _, err = run(capsys, "--config", str(config_file), "--node", "alpha",
                           "create-md", "r0", "--force")
    assert code == 1 and "resource r0 is already up on this node (pid " in err


def test_create_md_failure_in_node_files_leaves_no_metadata(capsys, config_file, setup_dir, fake_node):
    def boom(*a):
        raise DuplexError("journal: no space left on /var")
    fake_node.create_node_files = boom
    code, _, err = run(capsys, "--config", str(config_file), "--node", "alpha", "create-md", "r0")
    assert (code, err) == (1, f"duplex: error: {setup_dir}/alpha-meta: cannot create the "
                              f"metadata set: journal: no space left on /var\n")
    assert not (setup_dir / "alpha-meta" / "metadata.json").exists()


def test_missing_engine_module_is_a_clear_error(capsys, config_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "replicator.node", None)  # import fails
    code, _, err = run(capsys, "--config", str(config_file), "--node", "alpha", "up", "r0")
    assert code == 1 and err.startswith("duplex: error: this installation has no replicator.node")


def test_up_calls_run_up_with_the_role_and_returns_its_code(capsys, config_file, fake_node):
    assert run(capsys, "--config", str(config_file), "--node", "beta", "up", "r0",
               "--role", "secondary")[0] == 3
    assert run(capsys, "--config", str(config_file), "--node", "alpha", "up", "r0")[0] == 3
    assert fake_node.calls == [("run_up", "r0", "beta", "secondary"), ("run_up", "r0", "alpha", None)]


@pytest.mark.parametrize("argv,fragment", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["up"], "the following arguments are required: RES"),
    (["up", "r0", "--role", "tertiary"], "invalid choice: 'tertiary'"),
    (["status", "--watch", "--interval", "0"], "'0' must be more than 0 seconds"),
])
def test_usage_errors_exit_2(capsys, config_file, argv, fragment):
    code, _, err = run(capsys, "--config", str(config_file), *argv)
    assert code == 2 and fragment in err


@pytest.mark.parametrize("argv,expected", [
    (["status", "r9"], "no resource 'r9' (configured: r0)"),
    (["--node", "gamma", "status", "r0"], "resource r0 has no node 'gamma' (its nodes: alpha, beta)"),
    (["--node", "alpha", "up", "r9"], "no resource 'r9' (configured: r0)"),
])
def test_user_errors_print_one_line_and_exit_1(capsys, config_file, argv, expected):
    code, out, err = run(capsys, "--config", str(config_file), *argv)
    assert (code, out) == (1, "")
    assert err == f"duplex: error: {config_file}: {expected}\n"


def test_bad_config_is_reported_with_file_and_key(capsys, setup_dir, config_text):
    path = setup_dir / "bad.toml"
    path.write_text(config_text(setup_dir).replace('"64KiB"', '"64KB"'))
    code, _, err = run(capsys, "--config", str(path), "status")
    assert code == 1
    assert err.startswith(f"duplex: error: {path}: resource.r0.track-size: '64KB' is not a size")


def test_host_not_a_node_is_an_error(capsys, config_file, monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "gamma")
    code, _, err = run(capsys, "--config", str(config_file), "status")
    assert code == 1
    assert err == f"duplex: error: {config_file}: no resource has a node called 'gamma' (use --node NAME)\n"
    code, _, err = run(capsys, "--config", str(config_file), "status", "r0")
    assert code == 1 and "this host (gamma) is not a node of resource r0" in err


def test_status_of_a_stopped_resource_comes_from_metadata(capsys, config_file, setup_dir, fake_node):
    base = ["--config", str(config_file), "--node", "alpha"]
    code, out, _ = run(capsys, *base, "status", "r0", "--json")
    d = json.loads(out)
    assert code == 0 and (d["running"], d["role"]) == (False, "Unknown")
    assert d["reason"] == f"not running; no metadata in {setup_dir}/alpha-meta: run `duplex create-md r0` first"
    run(capsys, *base, "create-md", "r0", "--assume-clean")
    code, out, _ = run(capsys, *base, "status", "r0")
    assert code == 0
    assert out == "r0 role:Secondary disk:UpToDate not running (not running)\n"
    code, out, _ = run(capsys, *base, "status", "r0", "--verbose")
    assert code == 0
    assert out.splitlines()[0] == "r0 on alpha: Secondary, StandAlone (not running), disk UpToDate"
    assert "  reason        not running" in out.splitlines()


def test_status_of_a_running_resource_comes_over_the_control_socket(capsys, config_file, setup_dir):
    meta = setup_dir / "alpha-meta"
    meta.mkdir()
    live = {"resource": "r0", "node": "alpha", "running": True, "role": "Primary",
            "connection": "Ahead", "disk": "UpToDate",
            "peer": {"name": "beta", "address": "10.0.0.2:7789", "disk": "Consistent"},
            "seq": {"written": 10, "journaled": 5, "applied": 4},
            "lag": {"writes": 6, "bytes": 24576, "seconds": 1.5}, "out_of_sync_bytes": 65536,
            "nbd_uri": "nbd+unix:///?socket=/x", "sync": None, "reason": "ring overflowed"}
    base = ["--config", str(config_file), "--node", "alpha"]
    with ControlServer(meta, {"status": lambda: live}):
        code, out, _ = run(capsys, *base, "status", "r0", "--json")
        assert code == 0 and json.loads(out) == live
        code, out, _ = run(capsys, *base, "status", "--json")  # all: a list
        assert code == 0 and json.loads(out) == [live]
        code, out, _ = run(capsys, *base, "status")
        assert out == ("r0 role:Primary disk:UpToDate peer beta: Connected Ahead "
                       "peer-disk:Consistent out-of-sync 64.0 KiB lag 1.5s (ring overflowed)\n")
        code, out, _ = run(capsys, *base, "status", "--verbose")
        assert out.splitlines()[0] == "r0 on alpha: Primary, Ahead, disk UpToDate"
        assert "  reason        ring overflowed" in out.splitlines()


def test_status_watch_redraws_until_ctrl_c(capsys, config_file, monkeypatch):
    sleeps = []

    def fake_sleep(s):
        sleeps.append(s)
        if len(sleeps) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli.time, "sleep", fake_sleep)
    code, out, _ = run(capsys, "--config", str(config_file), "--node", "beta",
                       "status", "r0", "--watch", "--interval", "0.5", "--json")
    assert code == 0 and sleeps == [0.5, 0.5, 0.5]
    assert [json.loads(l)["node"] for l in out.splitlines()] == ["beta"] * 3

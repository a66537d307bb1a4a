"""scripts/failover: the steps it prints, a dry run that changes nothing,
a failing fence command that stops it before promoting, and an old
primary that stays connected."""
from __future__ import annotations

import subprocess

from _failover_helpers import REPO, VENV_BIN, duplex_env, run_failover
from fixtures.duplex_lab import RESOURCE, Lab
from replicator.metadata import load_metadata


def _offline_lab(tmp_path, procs, **node_keys) -> Lab:
    """Config and metadata only: nothing runs (no namespaces needed)."""
    lab = Lab(tmp_path / "lab", procs, None, None)
    lab.create_md()
    if node_keys:
        lab.set_node_keys("beta", **node_keys)
    return lab


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path, procs):
    marker = tmp_path / "fenced"
    lab = _offline_lab(tmp_path, procs)
    lab.write_config(**{"fence-command": f"touch {marker}"})
    lab.set_node_keys("beta", service_address="10.250.0.10/24", service_interface="lo",
                      mount_point=str(tmp_path / "srv"))
    r = run_failover(lab, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert out.splitlines()[0] == "failover of r0 to node beta (dry run: nothing is changed)"
    for want in ("[1/6] fence", f"would run: touch {marker}",
                 "[2/6] promote", "would promote node beta once alpha's connection is gone",
                 "[3/6] address", "would add 10.250.0.10/24 to lo",
                 "[4/6] serve", "would start `duplex up r0` detached",
                 "[5/6] attach", f"would attach nbd+unix:///?socket={lab.sock}.beta",
                 "[6/6] mount", f"would e2fsck -p the device (ext2/3/4) and mount it on "
                                f"{tmp_path / 'srv'}",
                 "r0: dry run done"):
        assert want in out, f"{want!r} not in:\n{out}"
    assert not marker.exists()
    assert load_metadata(lab.meta["beta"], RESOURCE).role == "Secondary"
    assert not (lab.meta["beta"] / "loss-report.json").exists()


def test_failing_fence_command_stops_the_failover_before_promoting(tmp_path, procs):
    lab = _offline_lab(tmp_path, procs)
    lab.write_config(**{"fence-command": 'echo "cannot reach the PDU of $DUPLEX_PEER" >&2; exit 3'})
    r = run_failover(lab)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "| cannot reach the PDU of alpha" in r.stdout, r.stdout
    assert "step 1 (fence) failed: fence command failed (exit 3)" in r.stderr, r.stderr
    assert "--no-fence" in r.stderr
    assert "[2/6]" not in r.stdout
    assert load_metadata(lab.meta["beta"], RESOURCE).role == "Secondary"
    assert not (lab.meta["beta"] / "loss-report.json").exists()


def test_failover_refuses_while_the_old_primary_stays_connected(make_lab):
    lab = make_lab(size=8 << 20)
    lab.create_md()
    sec = lab.start_secondary()
    lab.start_primary(history=False)
    lab.wait(lambda: lab.control("beta")["replication"] == "Established", "the pair to connect")
    r = run_failover(lab, "--no-fence", "--wait-disconnect", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "step 2 (promote) failed: the old primary alpha is still connected after 1 s" \
        in r.stderr, r.stderr
    assert sec.is_running()
    assert load_metadata(lab.meta["beta"], RESOURCE).role == "Secondary"


def test_unknown_resource_is_a_clear_error(tmp_path, procs):
    lab = _offline_lab(tmp_path, procs)
    argv = [str(VENV_BIN / "python"), str(REPO / "scripts" / "failover"),
            "--config", str(lab.config), "--node", "beta", "r9"]
    r = subprocess.run(argv, capture_output=True, text=True, env=duplex_env())
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "failover: error:" in r.stderr and "no resource 'r9'" in r.stderr

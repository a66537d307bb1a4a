"""scripts/failover --dry-run announces exactly what the run would do now:
after a failover, a second dry run says every step would be skipped, line
for line what the second real run then prints; before one, what each step
would do, whether the old primary is connected right now, and that a run
with no fence-command goes unfenced."""
from __future__ import annotations

import shutil
import subprocess

from _failover_helpers import run_failover
from fixtures.duplex_lab import RESOURCE, Lab


def _steps(out: str) -> dict[str, list[str]]:
    """The lines each step printed: {"fence": [...], ..., "mount": [...]}."""
    steps: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("[") and "/6] " in line:
            current = line.split("] ", 1)[1]
            steps[current] = []
        elif current is not None and line.startswith("  "):
            steps[current].append(line.strip())
    return steps


def _as_run(dry_lines: list[str]) -> list[str]:
    """A dry run's lines as the run would print them (the same decision)."""
    return [line.replace("would skip", "skipped")
                .replace("this failover would run UNFENCED", "failing over UNFENCED")
            for line in dry_lines]


def _ext4_pair(make_lab) -> Lab:
    """A pair whose images hold the same fresh ext4 (so --assume-clean is
    true), beta with a mount-point; both running, then the primary killed."""
    lab = make_lab(size=32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(lab.image["alpha"])], check=True)
    shutil.copyfile(lab.image["alpha"], lab.image["beta"])
    lab.mount_point = lab.workdir / "beta-mnt"  # unmounted at teardown (conftest)
    lab.set_node_keys("beta", mount_point=str(lab.mount_point))
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    lab.wait(lambda: lab.control("beta")["replication"] == "Established", "the pair to connect")
    return lab


def test_dry_run_says_the_old_primary_is_connected_right_now(make_lab):
    lab = _ext4_pair(make_lab)
    r = run_failover(lab, "--dry-run", "--no-fence")
    assert r.returncode == 0, r.stdout + r.stderr
    promote = _steps(r.stdout)["promote"]
    assert promote[0] == ("the old primary alpha is connected right now (connection "
                          "Connected): it looks alive: the run would wait at most 20 s for its "
                          "connection to go and fail if it stays"), promote
    r = run_failover(lab, "--dry-run", "--no-fence", "--force")
    assert "connected right now (connection Connected): it looks alive: --force would promote " \
        "anyway (split brain if it keeps writing)" in r.stdout, r.stdout


def test_dry_run_announces_what_the_run_does_and_then_that_it_would_skip_every_step(make_lab):
    lab = _ext4_pair(make_lab)
    lab.kill_primary()
    lab.wait(lambda: lab.control("beta")["connection"] != "Connected", "beta to see alpha gone")

    dry = run_failover(lab, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    d = _steps(dry.stdout)
    # No fence-command, no --no-fence: unfenced, said on stdout and stderr.
    warning = ("warning: no fence-command configured for r0: this failover would run "
               "UNFENCED. If the old primary alpha is alive it goes on writing its own copy "
               "(split brain). Configure fence-command, or pass --no-fence to say you know "
               "it is down")
    assert d["fence"] == [warning] and f"failover: {warning}" in dry.stderr, dry.stdout
    assert d["promote"][0].startswith("the old primary alpha is not connected now"), d
    assert d["promote"][1].startswith("would promote node beta once alpha's connection is gone")
    uri = f"nbd+unix:///?socket={lab.sock}.beta"
    assert d["serve"] == ["would wait for the promoted secondary daemon of r0 to exit",
                          f"would start `duplex up r0` detached (log {lab.meta['beta']}/up.log) "
                          f"and wait for {uri}"], d["serve"]
    assert d["attach"] == [f"would attach {uri} as a block device"], d["attach"]
    assert d["mount"] == [f"would e2fsck -p the device (ext2/3/4) and mount it on "
                          f"{lab.mount_point}"], d["mount"]

    run = run_failover(lab)
    assert run.returncode == 0, run.stdout + run.stderr
    s = _steps(run.stdout)
    assert s["fence"] == _as_run(d["fence"]), s["fence"]
    assert any(line.startswith("r0: node beta is now Primary") for line in s["promote"])
    assert s["serve"][0].startswith("started `duplex up r0`") and \
        s["serve"][-1] == f"serving {uri}", s["serve"]
    assert s["attach"][0].startswith("attached as /dev/"), s["attach"]
    device = s["attach"][0].removeprefix("attached as ")
    assert s["mount"][-1] == f"mounted {device} (ext4) on {lab.mount_point}", s["mount"]

    # Done: a dry run now says that every step would be skipped, and the
    # run then prints exactly that (no second `up`, no second attach).
    dry2 = run_failover(lab, "--dry-run", "--no-fence")
    assert dry2.returncode == 0, dry2.stdout + dry2.stderr
    d2 = _steps(dry2.stdout)
    assert d2["promote"] == [d2["promote"][0]] and \
        d2["promote"][0].startswith("node beta is already Primary"), d2["promote"]
    assert d2["serve"] == [f"already serving {uri}: would skip"], d2["serve"]
    assert d2["attach"] == [f"already attached as {device}: would skip"], d2["attach"]
    assert d2["mount"] == [f"{device} is already mounted on {lab.mount_point}: would skip"]
    run2 = run_failover(lab, "--no-fence")
    assert run2.returncode == 0, run2.stdout + run2.stderr
    assert _steps(run2.stdout) == {k: _as_run(v) for k, v in d2.items()}, \
        f"the dry run:\n{dry2.stdout}\nthe run:\n{run2.stdout}"


def test_dry_run_stops_where_the_run_would_fail(tmp_path, procs):
    lab = Lab(tmp_path / "lab", procs, None, None)
    lab.create_md()
    lab.set_node_keys("beta", service_address="10.250.0.10/24", service_interface="nosuch9")
    r = run_failover(lab, "--dry-run", "--no-fence")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert ("failover: error: step 3 (address) would fail: service-interface nosuch9 of node "
            "beta does not exist on this host") in r.stderr, r.stderr
    assert "[4/6]" not in r.stdout

"""systemd/duplex@.service: it passes ``systemd-analyze verify`` and says
what the product relies on (notify readiness, restart after promotion,
the devices it may open)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from replicator.node import EXIT_PROMOTED

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "duplex@.service"
INSTALLED_DUPLEX = "/usr/local/bin/duplex"


def _settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (units repeat keys), any section."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd): the unit "
                    "cannot be verified", pytrace=False)
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_DUPLEX} up %i" in text
    # verify insists that ExecStart's binary exists: point it at this
    # checkout's console script, which is what gets installed there.
    duplex = REPO / ".venv" / "bin" / "duplex"
    assert duplex.exists(), f"{duplex} is missing: run scripts/setup"
    (tmp_path / UNIT.name).write_text(text.replace(INSTALLED_DUPLEX, str(duplex)))
    r = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "duplex@r0.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"systemd-analyze verify failed:\n{r.stdout}{r.stderr}"
    # Unknown keys and bad values are only warnings to verify: none allowed.
    assert r.stdout + r.stderr == "", f"systemd-analyze verify warned:\n{r.stdout}{r.stderr}"


def test_unit_runs_up_with_notify_readiness_and_restarts_as_primary_after_promotion():
    s = _settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["Restart"] == ["on-failure"] and s["RestartSec"]
    assert s["RestartForceExitStatus"] == [str(EXIT_PROMOTED)]
    assert s["SuccessExitStatus"] == [str(EXIT_PROMOTED)]
    assert s["KillSignal"] == ["SIGTERM"] and s["KillMode"] == ["mixed"]


def test_unit_hardening_still_lets_it_open_devices_fuse_and_loop():
    s = _settings(UNIT.read_text())
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/var/lib/duplex /run/duplex"]
    assert s["DevicePolicy"] == ["closed"]
    assert {"block-* rw", "/dev/fuse rw", "/dev/loop-control rw"} <= set(s["DeviceAllow"])
    assert s["PrivateDevices"] == ["no"]
    assert s["NoNewPrivileges"] == ["yes"] and s["CapabilityBoundingSet"]


ATTACH_UNIT = REPO / "systemd" / "duplex-attach@.service"


def test_attach_unit_passes_verify_and_is_ordered_between_the_server_and_a_mount(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (apt-get install systemd)", pytrace=False)
    duplex = REPO / ".venv" / "bin" / "duplex"
    for unit in (UNIT, ATTACH_UNIT):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED_DUPLEX, str(duplex)))
    r = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "duplex-attach@r0.service")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                            "SYSTEMD_UNIT_PATH": f"{tmp_path}:"})
    assert r.returncode == 0 and r.stdout + r.stderr == "", \
        f"systemd-analyze verify of the attach unit:\n{r.stdout}{r.stderr}"
    s = _settings(ATTACH_UNIT.read_text())
    # Started after the server, stopped before it (and stopped with it); a
    # mount Requires=/After= it is unmounted before the detach.
    assert s["BindsTo"] == ["duplex@%i.service"] and s["After"] == ["duplex@%i.service"]
    assert s["WantedBy"] == ["duplex@%i.service"]  # pulled in again by the restart as Primary
    assert s["ExecStart"] == [f"{INSTALLED_DUPLEX} attach %i"]
    assert s["ExecStop"] == [f"{INSTALLED_DUPLEX} detach %i"]
    assert s["Type"] == ["oneshot"] and s["RemainAfterExit"] == ["yes"]


def test_install_puts_the_entry_point_outside_the_checkout():
    """The unit runs /usr/local/bin/duplex with ProtectHome=yes: what the
    install links there must not live in a checkout (under /root or /home)."""
    script = (REPO / "scripts" / "install").read_text()
    assert 'VENV="$PREFIX/lib/duplex/venv"' in script
    assert 'ln -sfn "$VENV/bin/duplex" "$PREFIX/bin/duplex"' in script
    assert _settings(UNIT.read_text())["ProtectHome"] == ["yes"]


@pytest.mark.parametrize("argv, fragment", [
    (["--bogus"], "unknown argument --bogus"),
    (["--prefix", "relative/dir"], "--prefix must be an absolute path (got relative/dir)"),
    (["--unit-dir=etc"], "--unit-dir must be an absolute path (got etc)"),
])
def test_install_refuses_bad_arguments_with_a_clear_error(argv, fragment):
    r = subprocess.run([str(REPO / "scripts" / "install"), *argv], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode in (1, 2) and fragment in r.stderr, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr

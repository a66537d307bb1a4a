"""Fixtures of the failover tests: a Duplex pair in two namespaces (as in
tests/e2e), plus the teardown of what a failover leaves running: a mount on
the node's mount-point, an attached export, a detached ``duplex up``."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from fixtures.blockdev import mountpoints_of, unmount
from fixtures.duplex_lab import RESOURCE, Lab


def _stop_detached_up(meta: Path) -> None:
    """Kill the process group of a ``duplex up`` that scripts/failover started."""
    pidfile = meta / "up.pid"
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _undo_failover(lab: Lab) -> None:
    """Unmount the failover's mount, detach the export, stop its server."""
    errors = []
    mnt = getattr(lab, "mount_point", None)
    if mnt is not None and os.path.ismount(mnt):
        try:
            unmount(mnt)
        except Exception as e:
            errors.append(f"unmount {mnt}: {e}")
    for node in ("alpha", "beta"):
        record = lab.meta[node] / "attach.json"
        if record.exists():
            dev = json.loads(record.read_text()).get("device", "")
            for point in mountpoints_of(dev) if dev else ():
                try:
                    unmount(point)
                except Exception as e:
                    errors.append(f"unmount {point}: {e}")
            r = lab.duplex(node, "detach", RESOURCE, check=False)
            if r.returncode != 0:
                errors.append(f"detach on {node}: {r.stderr.strip()}")
        _stop_detached_up(lab.meta[node])
    if errors:
        raise RuntimeError("failover teardown: " + "; ".join(errors))


@pytest.fixture
def make_lab(make_lab: Callable[..., Lab]) -> Callable[..., Lab]:
    """The shared lab factory, whose teardown also undoes what a failover
    set up (mounts, attached exports, a detached ``duplex up``)."""

    def make(**kwargs) -> Lab:
        lab = make_lab(**kwargs)
        lab.teardown_hooks.append(lambda: _undo_failover(lab))
        return lab

    return make

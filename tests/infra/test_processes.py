"""The process helper: output captured to a log, whole process group stopped."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from fixtures.processes import FixtureError, ProcessGroup, peak_rss_bytes, wait_until


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_output_goes_to_the_log_file(procs: ProcessGroup) -> None:
    p = procs.start([sys.executable, "-c", "import sys; print('to stdout'); "
                     "print('to stderr', file=sys.stderr)"], name="printer")
    assert p.wait(timeout=30) == 0
    text = p.log_text()
    assert "to stdout" in text and "to stderr" in text, text
    assert p.log_path.parent == procs.log_dir


def test_stop_kills_the_process_and_the_children_it_forked(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # The parent ignores SIGTERM, so stop() must escalate to SIGKILL; the
    # child must die with the group even though the parent never waits for it.
    script = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
        "time.sleep(600)\n"
    )
    with ProcessGroup(tmp_path / "logs") as group:
        p = group.start([sys.executable, "-c", script], name="stubborn")
        wait_until(lambda: pidfile.exists() and pidfile.read_text() != "",
                   timeout=30, what="child pid", process=p)
        child = int(pidfile.read_text())
        assert _alive(p.pid) and _alive(child)
        started = time.monotonic()
        status = p.stop(grace=0.5)
        assert time.monotonic() - started < 10
    assert status == -9, f"a parent ignoring SIGTERM ends by SIGKILL, got {status}"
    wait_until(lambda: not _alive(child), timeout=10, what="child to die")


def test_wait_until_reports_the_log_of_a_process_that_died(procs: ProcessGroup) -> None:
    p = procs.start([sys.executable, "-c", "import sys; sys.exit('bad config key frob')"],
                    name="dies")
    with pytest.raises(FixtureError) as info:
        wait_until(lambda: False, timeout=30, what="server", process=p)
    assert "bad config key frob" in str(info.value)
    assert "exited before it was ready" in str(info.value)


def test_a_missing_program_is_named(procs: ProcessGroup) -> None:
    with pytest.raises(FixtureError, match="no-such-program-dpx"):
        procs.start(["no-such-program-dpx"])


def test_peak_rss_is_read_from_proc() -> None:
    rss = peak_rss_bytes(os.getpid())
    assert rss is not None and rss > 1024 * 1024
    assert peak_rss_bytes(2**22 + 12345) is None

"""replicator/journallog.py: records go to the journal (with the resource
and node as fields) only when stderr is the stream systemd's
$JOURNAL_STREAM names; anywhere else logging stays plain stderr lines.
(The journal itself, under a booted systemd: test_systemd_nspawn.py.)"""
from __future__ import annotations

import logging
import os
import sys

import pytest

from replicator import journallog


def _stream_of(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_dev}:{st.st_ino}"


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A file to be sys.stderr (pytest's capture is no file of its own);
    each test puts it in place itself: pytest swaps sys.stderr per phase."""
    with open(tmp_path / "stderr", "w") as f:
        yield f


def test_stderr_is_journal_only_when_journal_stream_names_stderr(stderr_file, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(sys, "stderr", stderr_file)
    monkeypatch.setenv("JOURNAL_STREAM", _stream_of(stderr_file.fileno()))
    assert journallog.stderr_is_journal()
    with open(tmp_path / "other", "w") as other:  # stderr redirected elsewhere by the unit
        monkeypatch.setenv("JOURNAL_STREAM", _stream_of(other.fileno()))
        assert not journallog.stderr_is_journal()
    for bad in ("", "12", "a:b", "1:"):
        monkeypatch.setenv("JOURNAL_STREAM", bad)
        assert not journallog.stderr_is_journal(), bad
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not journallog.stderr_is_journal()


def test_use_journal_swaps_the_stderr_handler_for_one_with_the_fields(stderr_file, monkeypatch):
    pytest.importorskip("systemd.journal", reason="python3-systemd (scripts/setup installs it)")
    monkeypatch.setattr(sys, "stderr", stderr_file)
    root = logging.getLogger()
    saved = list(root.handlers)
    plain = logging.StreamHandler(sys.stderr)
    root.handlers = [plain]
    try:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert not journallog.use_journal("r0", "beta")
        assert root.handlers == [plain]  # a terminal or a test: plain lines stay
        monkeypatch.setenv("JOURNAL_STREAM", _stream_of(stderr_file.fileno()))
        assert journallog.use_journal("r0", "beta")
        (handler,) = root.handlers
        from systemd.journal import JournalHandler
        assert isinstance(handler, JournalHandler)
        assert handler._extra == {"SYSLOG_IDENTIFIER": "duplex", "DUPLEX_RESOURCE": "r0",
                                  "DUPLEX_NODE": "beta"}
    finally:
        root.handlers = saved


def test_systemd_unit_is_the_service_of_our_cgroup_under_systemd_only(monkeypatch):
    """promote says "duplex@r0.service restarts by itself" from this."""
    from replicator.notify import systemd_unit

    v2 = "0::/system.slice/system-duplex.slice/duplex@r0.service\n"
    v1 = ("12:pids:/system.slice/system-duplex.slice/duplex@r0.service\n"
          "1:name=systemd:/system.slice/system-duplex.slice/duplex@r0.service\n0::/\n")
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert systemd_unit(v2) is None  # not started by systemd: `duplex up` by hand
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert systemd_unit(v2) == "duplex@r0.service"
    assert systemd_unit(v1) == "duplex@r0.service"
    assert systemd_unit("0::/user.slice/user-0.slice/session-1.scope\n") is None

"""The control socket: request/reply round trip, pluggable commands,
single ownership of a meta-dir, clean-up on stop."""
from __future__ import annotations

import os
import socket
import time
import stat

import pytest

from replicator.control import (ControlError, ControlServer, NotRunningError, is_running,
                                request)
from replicator.errors import DuplexError


def test_status_round_trip_and_pluggable_commands(tmp_path):
    calls = []
    server = ControlServer(tmp_path, {"status": lambda: {"role": "Primary", "seq": {"written": 7}}})

    def promote(force=False):
        calls.append(force)
        if not force:
            raise DuplexError("peer is connected as Primary; use --force")
        return {"ok": True}
    server.add_handler("promote", promote)
    with server:
        assert request(tmp_path, "status") == {"role": "Primary", "seq": {"written": 7}}
        assert request(tmp_path, "promote", force=True) == {"ok": True}
        with pytest.raises(ControlError) as ei:
            request(tmp_path, "promote", resource="r0")
        assert str(ei.value) == "resource r0: peer is connected as Primary; use --force"
        reply = request(tmp_path, "frobnicate", check=False)
        assert reply == {"error": "unknown command 'frobnicate' (known: promote, status)"}
        assert "error" in request(tmp_path, "status", check=False, bogus=1)
    assert calls == [True, False]


def test_socket_is_private_and_removed_on_stop(tmp_path):
    server = ControlServer(tmp_path, {"status": dict}).start()
    path = tmp_path / "control.sock"
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert is_running(tmp_path)
    finally:
        server.stop()
    assert not path.exists()
    assert not is_running(tmp_path)


def test_nothing_listening_is_a_clear_not_running_error(tmp_path):
    with pytest.raises(NotRunningError) as ei:
        request(tmp_path, "status", resource="r0")
    assert str(ei.value) == (f"resource r0 is not running on this node "
                             f"(no control socket at {tmp_path}/control.sock)")


def test_second_server_is_refused_while_the_first_lives(tmp_path):
    with ControlServer(tmp_path, {"status": lambda: {"who": "first"}}):
        with pytest.raises(ControlError, match="is already up on this node"):
            ControlServer(tmp_path, {"status": lambda: {"who": "second"}}).start()
        assert request(tmp_path, "status") == {"who": "first"}


def test_stale_socket_file_is_replaced(tmp_path):
    # A socket bound by a process that died: the file is there, nobody listens.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(tmp_path / "control.sock"))
    dead.close()
    with pytest.raises(NotRunningError):
        request(tmp_path, "status")
    with ControlServer(tmp_path, {"status": lambda: {"fresh": True}}):
        assert request(tmp_path, "status") == {"fresh": True}


def test_a_regular_file_in_the_way_is_not_deleted(tmp_path):
    (tmp_path / "control.sock").write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(tmp_path, {}).start()
    assert (tmp_path / "control.sock").read_text() == "precious"
    assert not is_running(tmp_path)  # the failed start released the lock


def test_long_meta_dir_path_beyond_sun_path_limit_works(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / "control.sock")) > 108
    with ControlServer(deep, {"status": lambda: {"deep": True}}):
        assert request(deep, "status") == {"deep": True}


def test_garbage_request_gets_an_error_and_the_server_survives(tmp_path):
    with ControlServer(tmp_path, {"status": lambda: {"ok": 1}}) as server:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(server.socket_path))
        s.sendall(b"\xff not json\n[1,2]\n")
        data = b""
        while data.count(b"\n") < 2:
            data += s.recv(4096)
        s.close()
        lines = data.decode().splitlines()
        assert lines[0].startswith('{"error":"request is not JSON')
        assert lines[1] == '{"error":"request must be an object with a \\"cmd\\" string"}'
        assert request(tmp_path, "status") == {"ok": 1}


def test_handler_bug_is_reported_not_fatal(tmp_path):
    def broken():
        raise RuntimeError("oops")
    with ControlServer(tmp_path, {"status": broken, "ping": lambda: {"pong": 1}}):
        with pytest.raises(ControlError, match="status: internal error: RuntimeError: oops"):
            request(tmp_path, "status")
        assert request(tmp_path, "ping") == {"pong": 1}


def test_a_bug_in_the_accept_loop_is_recorded_and_the_socket_serves_again(tmp_path, monkeypatch):
    import replicator.control as control_mod

    real_select = control_mod.select.select
    calls = {"n": 0}

    def flaky_select(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected accept-loop bug")
        return real_select(*args)

    monkeypatch.setattr(control_mod.select, "select", flaky_select)
    with ControlServer(tmp_path, {"status": lambda: {"ok": True}}) as server:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if request(tmp_path, "status", timeout=1) == {"ok": True}:
                    break
            except ControlError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("the control socket never answered after the fault")
        (fault,) = server.faults()
        assert fault["thread"] == "control" and "injected accept-loop bug" in fault["error"]
        assert fault["state"] == "restarting"

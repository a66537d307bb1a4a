"""systemd readiness: sd_notify datagrams, and ``duplex up`` sending
READY=1 exactly when it serves (secondary listening, primary's nbdkit
accepting on the export), STATUS lines, and STOPPING=1."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import nbd
import pytest

from replicator import notify


@pytest.fixture
def notify_socket(shm_dir: Path):
    """A datagram socket standing in for systemd's; yields (path, receive)."""
    path = shm_dir / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))

    def receive(timeout: float = 30) -> dict[str, str]:
        s.settimeout(timeout)
        data = s.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    try:
        yield str(path), receive
    finally:
        s.close()


def test_sd_notify_sends_one_datagram_of_key_value_lines(notify_socket):
    path, receive = notify_socket
    assert notify.sd_notify("READY=1", "STATUS=up and running", env={"NOTIFY_SOCKET": path})
    assert receive(2) == {"READY": "1", "STATUS": "up and running"}
    assert notify.stopping("Secondary:\nstopping") is False  # no NOTIFY_SOCKET here


def test_sd_notify_reaches_an_abstract_socket():
    name = f"duplex-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        assert notify.sd_notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"READY=1"


def test_sd_notify_outside_systemd_does_nothing_and_refuses_bad_lines():
    assert notify.sd_notify("READY=1", env={}) is False
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notify.sd_notify("READY=1\nMAINPID=1", env={"NOTIFY_SOCKET": "/nonexistent"})
    # A socket that is not there: logged, not raised.
    assert notify.sd_notify("READY=1", env={"NOTIFY_SOCKET": "/nonexistent/sock"}) is False


def test_up_notifies_ready_when_the_secondary_listens_and_the_primary_serves(
        make_lab, notify_socket):
    path, receive = notify_socket
    lab = make_lab(size=8 << 20)
    lab.create_md()
    lab.secondary = lab.start_up("beta", "--role", "secondary", extra_env={"NOTIFY_SOCKET": path})
    msg = receive()
    assert msg.get("READY") == "1", msg
    assert msg["STATUS"] == f"Secondary: listening on {lab.addr_b}:{lab.port}"
    assert lab.control("beta")["role"] == "Secondary"  # it answers as it said

    lab.primary = lab.start_up("alpha", "--role", "primary", extra_env={"NOTIFY_SOCKET": path})
    msg = receive()
    while msg.get("READY") != "1":  # "starting nbdkit" comes first
        assert "STATUS" in msg, msg
        msg = receive()
    # READY means the export accepts now: a client connects at once.
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    assert h.get_size() == lab.size
    h.shutdown()
    assert msg["STATUS"] == f"Primary: serving {lab.uri}"

    lab.primary.stop(grace=30)
    msg = receive()
    # Both nodes share the socket: the secondary's periodic STATUS lines may
    # come in between; the primary's next word must be STOPPING.
    for _ in range(20):  # bounded: a STOPPING that never comes fails, not hangs
        if "STOPPING" in msg or not msg.get("STATUS", "").startswith("Secondary:"):
            break
        msg = receive()
    assert msg.get("STOPPING") == "1", msg
    lab.secondary.stop(grace=30)
    msg = receive()
    while msg.get("STOPPING") != "1":  # periodic STATUS lines may come first
        msg = receive()
    assert msg["STATUS"] == "Secondary: stopping"

"""Two network namespaces joined by veth: reachable, cut, restored, removed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fixtures.leaks import leftovers
from fixtures.netns import NetnsPair, list_namespaces
from fixtures.processes import ProcessGroup, wait_until

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7789)); s.listen()
print('LISTEN' + 'ING', flush=True)  # not literally in argv, which the log echoes
while True:
    c, _ = s.accept()
    c.sendall(c.recv(100).upper()); c.close()
"""

CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], 7789), timeout=2)
s.sendall(b'ordered'); print(s.recv(100).decode())
"""


def _ping(pair: NetnsPair, ns: str, addr: str) -> bool:
    return pair.run(ns, ["ping", "-c", "1", "-W", "1", addr], check=False).returncode == 0


def _tcp(pair: NetnsPair) -> subprocess.CompletedProcess:
    return pair.run(pair.ns_a, [sys.executable, "-c", CLIENT, pair.addr_b], check=False,
                    timeout=30)


def test_pair_is_two_hosts_that_reach_each_other(netns_pair: NetnsPair) -> None:
    pair = netns_pair
    assert pair.ns_a != pair.ns_b
    assert set(list_namespaces()) >= {pair.ns_a, pair.ns_b}
    assert _ping(pair, pair.ns_a, pair.addr_b)
    assert _ping(pair, pair.ns_b, pair.addr_a)
    # Each namespace has its own loopback, up.
    assert _ping(pair, pair.ns_a, "127.0.0.1")
    server = pair.popen(pair.ns_b, [sys.executable, "-c", ECHO_SERVER, pair.addr_b],
                        name="echo")
    wait_until(lambda: "LISTENING" in server.log_text(), timeout=30, what="echo server",
               process=server)
    res = _tcp(pair)
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().strip() == "ORDERED"
    assert server.pid in pair.pids(pair.ns_b)
    assert server.pid not in pair.pids(pair.ns_a)


def test_link_down_cuts_traffic_and_link_up_restores_it(netns_pair: NetnsPair) -> None:
    pair = netns_pair
    server = pair.popen(pair.ns_b, [sys.executable, "-c", ECHO_SERVER, pair.addr_b],
                        name="echo")
    wait_until(lambda: "LISTENING" in server.log_text(), timeout=30, what="echo server",
               process=server)
    assert _tcp(pair).returncode == 0
    pair.link_down()
    assert not pair.link_is_up()
    assert not _ping(pair, pair.ns_a, pair.addr_b)
    assert _tcp(pair).returncode != 0, "TCP must fail while the link is down"
    pair.link_up()
    assert pair.link_is_up()
    assert _ping(pair, pair.ns_a, pair.addr_b)
    res = _tcp(pair)
    assert res.returncode == 0 and res.stdout.decode().strip() == "ORDERED", res.stderr


def test_close_kills_processes_in_the_namespaces_and_deletes_them(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path / "logs") as group:
        pair = NetnsPair.create(group)
        try:
            managed = pair.popen(pair.ns_a, ["sleep", "600"], name="sleeper")
            # A process not started through popen, left running in the namespace.
            stray = subprocess.Popen(["nsenter", f"--net=/run/netns/{pair.ns_b}", "sleep", "600"],
                                     stdin=subprocess.DEVNULL)
            wait_until(lambda: stray.pid in pair.pids(pair.ns_b), timeout=10,
                       what="stray sleeper")
        finally:
            pair.close()
        assert stray.wait(timeout=10) != 0
        assert not managed.is_running()
        left = leftovers(tmp_path, (pair.ns_a, pair.ns_b))
        assert left.namespaces == (), left
    assert pair.ns_a not in list_namespaces()

"""The group control channel's sockets (DESIGN §13): a listening master, a
member that keeps one connection to whichever node of the master resource
plays its side, and the link between them. The protocol itself is
protocol/group.py (sans-IO); the rules are rendezvous.py and member.py.

Threads and locks: a ``GroupServer`` has an accept thread and one reader
per link; a ``GroupClient`` one connect-and-read thread. ``GroupLink._send_lock``
serialises writes to its socket. ``GroupServer._lock`` guards ``links``.
Callbacks run on the reader threads and must not block for long.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

from replicator.protocol.errors import ProtocolError
from replicator.protocol.group import GroupConnection, GroupMessage, make
from replicator.supervise import Supervisor

log = logging.getLogger("duplex.group")

HANDSHAKE_TIMEOUT = 5.0
RECONNECT = (0.1, 1.0)  # a restarted master must see its members back well within RESIGN_GRACE
RECV = 65536


class GroupLink:
    """One authenticated group connection."""

    def __init__(self, sock: socket.socket, conn: GroupConnection) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = conn.peer
        self._send_lock = threading.Lock()
        self.closed = False

    @property
    def peer_member(self) -> str:
        """The resource the peer speaks for."""
        return self.peer["member"] if self.peer else "?"

    @property
    def peer_node(self) -> str:
        return self.peer["node"] if self.peer else "?"

    def send(self, mtype: str, **fields) -> bool:
        """Send one message; False when the link is gone (the reader
        notices and reports it)."""
        data = self.conn.send(make(mtype, **fields))
        with self._send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def close(self) -> None:
        with self._send_lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def read_loop(self, on_message: Callable[["GroupLink", GroupMessage], None]) -> str:
        """Read and dispatch until the link ends; returns why it ended."""
        while True:
            try:
                msg = self.conn.next_event()
            except ProtocolError as e:
                self._refuse(str(e))
                return str(e)
            if msg is not None:
                on_message(self, msg)
                continue
            try:
                data = self.sock.recv(RECV)
            except OSError as e:
                return f"connection lost: {e.strerror or e}"
            if not data:
                return "peer closed the connection"
            self.conn.receive_data(data)

    def _refuse(self, why: str) -> None:
        try:
            with self._send_lock:
                self.sock.sendall(self.conn.error(why))
        except OSError:
            pass


def handshake(sock: socket.socket, conn: GroupConnection, timeout: float = HANDSHAKE_TIMEOUT,
              check: Callable[[GroupMessage], str | None] | None = None) -> GroupLink:
    """Run the HELLO/AUTH exchange on *sock*; *check(peer_hello)* may
    refuse the peer with a reason. ProtocolError or OSError on failure."""
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.monotonic() + timeout
    sock.sendall(conn.initiate())
    checked = False
    try:
        while not conn.established or not checked:
            if time.monotonic() > deadline:
                raise ProtocolError("group handshake timed out")
            msg = conn.next_event()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if conn.peer is not None and not checked:
                why = check(conn.peer) if check else None
                if why:
                    raise ProtocolError(why)
                checked = True
            if msg is None and not (conn.established and checked):
                data = sock.recv(RECV)
                if not data:
                    raise ProtocolError("the group peer closed the connection during the "
                                        "handshake")
                conn.receive_data(data)
    except ProtocolError as e:
        try:
            sock.sendall(conn.error(str(e)))
        except OSError:
            pass
        raise
    sock.settimeout(None)
    return GroupLink(sock, conn)


class GroupServer:
    """A master's listener: accepts members of one side."""

    def __init__(self, sup: Supervisor, address: tuple[str, int], make_conn: Callable[[], GroupConnection],
                 check: Callable[[GroupMessage], str | None],
                 on_link: Callable[[GroupLink], None],
                 on_message: Callable[[GroupLink, GroupMessage], None],
                 on_close: Callable[[GroupLink, str], None]) -> None:
        self._sup = sup
        self._make_conn = make_conn
        self._check = check
        self._on_link = on_link
        self._on_message = on_message
        self._on_close = on_close
        self._lock = threading.Lock()
        self.links: list[GroupLink] = []
        self._stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(address)
        self.sock.listen(64)
        self.address = address

    def start(self) -> None:
        self._sup.spawn("duplex-group-accept", self._accept_loop, restart=True)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, addr = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self._sup.spawn(f"duplex-group-rx-{addr[0]}", lambda s=s: self._serve(s))

    def _serve(self, s: socket.socket) -> None:
        try:
            link = handshake(s, self._make_conn(), check=self._check)
        except (ProtocolError, OSError) as e:
            log.warning("group: refused a connection: %s", e)
            s.close()
            return
        with self._lock:
            if self._stop.is_set():
                link.close()
                return
            self.links.append(link)
        self._on_link(link)
        why = link.read_loop(self._on_message)
        with self._lock:
            if link in self.links:
                self.links.remove(link)
        link.close()
        self._on_close(link, why)

    def broadcast(self, mtype: str, only: Callable[[GroupLink], bool] | None = None,
                  **fields) -> None:
        """Send to every link (*only* filters)."""
        with self._lock:
            links = list(self.links)
        for link in links:
            if only is None or only(link):
                link.send(mtype, **fields)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self._lock:
            links, self.links = self.links, []
        for link in links:
            link.close()


class GroupClient:
    """A member's connection to its master, kept up: it tries each
    candidate endpoint in turn (the master resource's two nodes; only the
    one playing our side accepts us) and reconnects with backoff."""

    def __init__(self, sup: Supervisor, name: str, endpoints: list[tuple[str, int]],
                 make_conn: Callable[[], GroupConnection],
                 on_link: Callable[[GroupLink], None],
                 on_message: Callable[[GroupLink, GroupMessage], None],
                 on_close: Callable[[GroupLink, str], None]) -> None:
        self._sup = sup
        self._name = name
        self._endpoints = endpoints
        self._make_conn = make_conn
        self._on_link = on_link
        self._on_message = on_message
        self._on_close = on_close
        self._stop = threading.Event()
        self.link: GroupLink | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._sup.spawn(self._name, self._loop, restart=True)

    def _loop(self) -> None:
        delay = RECONNECT[0]
        while not self._stop.is_set():
            for ep in self._endpoints:
                if self._stop.is_set():
                    return
                try:
                    s = socket.create_connection(ep, timeout=HANDSHAKE_TIMEOUT)
                except OSError as e:
                    self.last_error = f"{ep[0]}:{ep[1]}: {e.strerror or e}"
                    continue
                try:
                    link = handshake(s, self._make_conn())
                except (ProtocolError, OSError) as e:
                    self.last_error = f"{ep[0]}:{ep[1]}: {e}"
                    s.close()
                    continue
                delay = RECONNECT[0]
                self.link = link
                self.last_error = None
                self._on_link(link)
                why = link.read_loop(self._on_message)
                self.link = None
                link.close()
                self.last_error = why
                self._on_close(link, why)
            self._stop.wait(delay)
            delay = min(delay * 2, RECONNECT[1])

    def send(self, mtype: str, **fields) -> bool:
        """Send on the current link; False when there is none."""
        link = self.link
        return link.send(mtype, **fields) if link is not None else False

    def stop(self) -> None:
        self._stop.set()
        link = self.link
        if link is not None:
            link.close()

"""The group control channel's sockets (DESIGN §13): a listening master, a
member that keeps one connection to whichever node of the master resource
plays its side, and the link between them. The protocol itself is
protocol/group.py (sans-IO); the rules are rendezvous.py and member.py.

Threads and locks: a ``GroupServer`` has an accept thread and one reader
per link; a ``GroupClient`` one connect-and-read thread. ``GroupLink._send_lock``
serialises writes to its socket. ``GroupServer._lock`` guards ``links``.
Callbacks run on the reader threads and must not block for long.

TLS (``tls = true`` in the group table, DESIGN §9): each connection is
wrapped before the HELLO/AUTH exchange, with mutual certificates signed by
the group's ``tls-ca``; the member checks that the master's certificate
names the master node it dialled, the master that the member's names a
node of the group and the node its HELLO then claims. The socket is a
``replicator.tls.TlsSocket`` from then on (its own lock serialises the
SSL object between the reader and the senders).
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable

from replicator.errors import DuplexError
from replicator.protocol.errors import ProtocolError
from replicator.protocol.group import GroupConnection, GroupMessage, make
from replicator.supervise import Supervisor
from replicator import tls as _tls

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


def _secure(sock: socket.socket, conn: GroupConnection, tls: ssl.SSLContext | None,
            names: set[str], server: bool, timeout: float):
    """*sock*, or a TlsSocket once TLS is up and the peer's certificate
    names one of *names*; ProtocolError saying why not. The master tells
    a plaintext member from a TLS one by its first byte, and refuses the
    mismatch with a reason both sides log."""
    if server:
        first = _tls.first_byte(sock, timeout)
        if first is None:
            raise ProtocolError("the group peer closed the connection before its HELLO")
        if tls is not None and first != _tls.TLS_HANDSHAKE:
            try:
                sock.sendall(conn.error(f"node {conn.node} requires TLS on group "
                                        f"{conn.group} (tls = true), and this connection is "
                                        f"plaintext"))
            except OSError:
                pass
            raise ProtocolError(_tls.PLAINTEXT_PEER)
        if tls is None and first == _tls.TLS_HANDSHAKE:
            try:
                sock.sendall(conn.error(_tls.TLS_PEER))
            except OSError:
                pass
            raise ProtocolError(_tls.TLS_PEER)
    if tls is None:
        return sock
    try:
        ssock = _tls.handshake(sock, tls, server, timeout)
    except _tls.TlsError as e:
        raise ProtocolError(str(e)) from None
    wrapped = _tls.TlsSocket(ssock)
    wrapped.settimeout(timeout)
    try:
        wrapped.cert_name = _tls.check_peer_name(ssock, names)
    except _tls.TlsError as e:
        try:
            wrapped.sendall(conn.error(f"node {conn.node} refused your certificate: {e}"))
        except OSError:
            pass
        wrapped.close()
        raise ProtocolError(str(e)) from None
    return wrapped


def handshake(sock: socket.socket, conn: GroupConnection, timeout: float = HANDSHAKE_TIMEOUT,
              check: Callable[[GroupMessage], str | None] | None = None, *,
              tls: ssl.SSLContext | None = None, tls_names: set[str] | None = None,
              server: bool = False) -> GroupLink:
    """Run the HELLO/AUTH exchange on *sock*; *check(peer_hello)* may
    refuse the peer with a reason. With *tls*, inside TLS, the peer's
    certificate naming one of *tls_names* and, once its HELLO is in, the
    node the HELLO claims. *server*: the accepting side. ProtocolError or
    OSError on failure."""
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    deadline = time.monotonic() + timeout
    try:
        sock = _secure(sock, conn, tls, set(tls_names or ()), server, timeout)
    except ssl.SSLError as e:
        raise ProtocolError(_tls.describe_ssl_error(e)) from None
    cert_name = getattr(sock, "cert_name", None)
    if cert_name is not None:
        inner = check

        def check(hello: GroupMessage) -> str | None:
            if str(hello["node"]).lower() != cert_name.lower():
                return (f"the peer's HELLO says node {hello['node']!r}, its certificate "
                        f"{cert_name!r}")
            return inner(hello) if inner is not None else None
    sock.sendall(conn.initiate())
    checked = False
    try:
        while not conn.established or not checked:
            if time.monotonic() > deadline:
                raise ProtocolError("group handshake timed out")
            msg = conn.next_event()
            # The peer is checked before our AUTH answers its HELLO: a
            # refused peer is never told it got in.
            if conn.peer is not None and not checked:
                why = check(conn.peer) if check else None
                if why:
                    raise ProtocolError(why)
                checked = True
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if msg is None and not (conn.established and checked):
                data = sock.recv(RECV)
                if not data:
                    raise ProtocolError("the group peer closed the connection during the "
                                        "handshake")
                conn.receive_data(data)
    except ssl.SSLError as e:  # the peer's verdict on our certificate (TLS 1.3: after ours)
        raise ProtocolError(_tls.describe_ssl_error(e)) from None
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
                 on_close: Callable[[GroupLink, str], None],
                 tls: Callable[[], ssl.SSLContext | None] | None = None,
                 tls_names: set[str] | None = None) -> None:
        """*tls()* gives the server context per connection (files read
        again: fixing them fixes the node), None for plaintext;
        *tls_names* the nodes a member's certificate may name."""
        self._sup = sup
        self._make_conn = make_conn
        self._tls = tls
        self._tls_names = set(tls_names or ())
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
            link = handshake(s, self._make_conn(), check=self._check,
                             tls=self._tls() if self._tls else None, tls_names=self._tls_names,
                             server=True)
        except (ProtocolError, OSError, DuplexError) as e:
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
                 on_close: Callable[[GroupLink, str], None],
                 tls: Callable[[], ssl.SSLContext | None] | None = None,
                 tls_names: list[str] | None = None) -> None:
        """*tls()* gives the client context per connection, None for
        plaintext; *tls_names[i]* is the node endpoint *i* belongs to (its
        certificate must name it)."""
        self._sup = sup
        self._name = name
        self._tls = tls
        self._tls_names = list(tls_names or ())
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
            for i, ep in enumerate(self._endpoints):
                if self._stop.is_set():
                    return
                try:
                    s = socket.create_connection(ep, timeout=HANDSHAKE_TIMEOUT)
                except OSError as e:
                    self.last_error = f"{ep[0]}:{ep[1]}: {e.strerror or e}"
                    continue
                try:
                    names = {self._tls_names[i]} if i < len(self._tls_names) else set()
                    link = handshake(s, self._make_conn(),
                                     tls=self._tls() if self._tls else None, tls_names=names)
                except (ProtocolError, OSError, DuplexError) as e:
                    if self.last_error != f"{ep[0]}:{ep[1]}: {e}":
                        log.warning("group: %s:%d: %s", ep[0], ep[1], e)
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

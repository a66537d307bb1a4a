"""The socket shell around the sans-IO protocol: one TCP connection to the
peer, its handshake, a reader thread and thread-safe senders.

Everything protocol lives in ``replicator.protocol``, and who may pair with
whom in ``replicator.generations``; this module only moves bytes between a
socket and a ``Connection`` and hands events to callbacks.

Threads and locks: each link runs a reader thread ("duplex-rx-PEER") and a
keepalive thread ("duplex-ka-PEER"); they end when the link closes.
``_send_lock`` serialises whole frames on the socket (the C streaming loop
holds it through :meth:`PeerLink.stream_socket`); ``_conn_lock`` guards the
sans-IO ``Connection``. Lock order: ``_send_lock``, then ``_conn_lock``.
``_sums_cv`` guards ``_sums`` and is taken alone.

TLS (DESIGN §9): with an SSLContext the connection is wrapped before the
HMAC handshake, the peer's certificate name checked against the node
expected, and the socket is a :class:`replicator.tls.TlsSocket` from then
on (its own leaf lock serialises the SSL object between the reader and
the senders). The C streaming loop cannot write into TLS: such a link has
no :meth:`PeerLink.stream_socket`; the shipper sends with :meth:`send_span`.
A TLS side and a plaintext side recognise each other from the first
bytes and refuse with a reason on both sides.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from replicator.generations import pairing_uuid  # noqa: F401 (the secondary's import)
from replicator.native.ffi import uninit_buffer
from replicator.errors import DuplexError
from replicator import tls as _tls
from replicator.protocol.connection import CLOSED, NEED_DATA, Connection
from replicator.protocol.errors import ErrorCode, ProtocolError
from replicator.protocol.frames import FrameType
from replicator.protocol.state import NEGOTIATING
from replicator.protocol.messages import (Ack, Error, Message, OosBitmap, Ping, Pong, Received,
                                          State, Stop, VerifyReq, VerifySums)

log = logging.getLogger("duplex.link")

# Bytes asked of one recv: below malloc's mmap threshold (a bigger buffer
# costs an mmap, page faults and a munmap with a TLB shootdown across the
# process's threads, per call). Large payloads do not go through these
# chunks anyway: the rest of a payload is received in place (recv_into).
RECV_BYTES = 64 << 10
HANDSHAKE_TIMEOUT = 10.0
DEAD_AFTER = 6.0  # no frame at all for this long: the peer is gone
KEEPALIVE = 1.0   # send a PING when nothing else went out for this long


class LinkError(DuplexError):
    """The connection failed (network, EOF, protocol violation)."""


class RefusedError(LinkError):
    """The handshake was refused (wrong secret, other resource, size...).
    ``code`` is the ErrorCode of the refusal (``SPLIT_BRAIN`` names one)."""

    def __init__(self, message: str, code: int = ErrorCode.PROTOCOL):
        super().__init__(message)
        self.code = int(code)

    @property
    def split_brain(self) -> bool:
        """True when the refusal is a split brain (either side's verdict)."""
        return self.code == ErrorCode.SPLIT_BRAIN


class PeerLink:
    """One authenticated, established connection to the peer."""

    def __init__(self, sock: socket.socket, conn: Connection,
                 on_event: Callable[["PeerLink", Message], None] | None = None,
                 on_ack: Callable[[int, int], None] | None = None,
                 on_idle: Callable[["PeerLink"], None] | None = None):
        self.sock = sock
        self.conn = conn
        #: True when the link runs inside TLS (no C streaming: send_span)
        self.tls = isinstance(sock, _tls.TlsSocket)
        #: the C streaming loop cannot write to this link (TLS, or frames
        #: to compress): the shipper sends with send_span
        self.python_send = self.tls or conn.compressor is not None
        self.on_event = on_event
        self.on_ack = on_ack
        self.on_idle = on_idle
        # Protocol B's RECEIVED, on the primary (set by the shipper).
        self.on_received: Callable[[int], None] | None = None
        self.peer_state: State = conn.peer_state_msg  # type: ignore[assignment]
        self.peer_name = conn.peer.node if conn.peer else "?"
        # The peer's disk as it last said: its STATE, then any ACK that
        # carries a disk state (a secondary whose applying failed, or
        # recovered). Read by the primary's status.
        self.peer_disk: str = self.peer_state.disk if self.peer_state else "Unknown"
        self.peer_disk_reason: str = ""
        self.error: str | None = None
        self.rtt: float | None = None
        self.clock_offset_ns: int | None = None
        self._send_lock = threading.Lock()
        self._conn_lock = threading.Lock()
        self._closed = threading.Event()
        self._last_rx = time.monotonic()
        self._last_tx = time.monotonic()
        self.keepalive = KEEPALIVE      # ping-interval of the resource
        self.dead_after = DEAD_AFTER    # ping-timeout of the resource
        self._timeouts_set = False      # set_timeouts() called: the reader may wait dead_after
        self._ping_nonce = 0
        self._reader: threading.Thread | None = None
        self._keeper: threading.Thread | None = None
        self._bitmap: OosBitmap | None = None
        self._bitmap_ready = threading.Event()
        self._stop_notice: Stop | None = None  # the peer's STOP (a clean stop), once it came
        self._stop_ready = threading.Event()
        self._sums: dict[tuple[int, int], VerifySums] = {}
        self._sums_cv = threading.Condition()

    # -- establishing -----------------------------------------------------

    @classmethod
    def connect(cls, address: tuple[str, int], *, role: str, resource: str, node: str,
                secret: bytes, local_state: State,
                on_ack: Callable[[int, int], None] | None = None,
                on_event: Callable[["PeerLink", Message], None] | None = None,
                timeout: float = HANDSHAKE_TIMEOUT, tls: ssl.SSLContext | None = None,
                tls_peer: str | None = None, compressor=None) -> "PeerLink":
        """Connect to *address*, authenticate, exchange STATE. With *tls*
        (a client context), inside TLS, the peer's certificate naming
        node *tls_peer*. With *compressor* (protocol.compression), the
        DATA and INCR_DATA frames we send go compressed."""
        sock = socket.create_connection(address, timeout=timeout)
        conn = Connection(role, resource, node, secret, allocate=uninit_buffer)
        conn.compressor = compressor
        return cls._establish(sock, conn, lambda peer: local_state, on_event, on_ack, timeout,
                              tls=tls, tls_peer=tls_peer, server=False)

    @classmethod
    def accept(cls, sock: socket.socket, *, role: str, resource: str, node: str,
               secret: bytes, state_for: Callable[[State], State],
               on_event: Callable[["PeerLink", Message], None] | None = None,
               on_idle: Callable[["PeerLink"], None] | None = None,
               timeout: float = HANDSHAKE_TIMEOUT, tls: ssl.SSLContext | None = None,
               tls_peer: str | None = None) -> "PeerLink":
        """Authenticate an accepted socket; *state_for(peer_state)* gives our
        STATE once the peer's is known (the secondary answers the primary).
        *on_idle(link)* runs on the reader thread whenever it has handled
        every frame received so far, before it waits for more bytes (the
        secondary's group commit). With *tls* (a server context), inside
        TLS, the peer's certificate naming node *tls_peer*; without it a
        TLS client is refused with a reason."""
        conn = Connection(role, resource, node, secret, allocate=uninit_buffer)
        return cls._establish(sock, conn, state_for, on_event, None, timeout, on_idle,
                              tls=tls, tls_peer=tls_peer, server=True)

    @classmethod
    def _establish(cls, sock, conn: Connection, state_for, on_event, on_ack,
                   timeout: float, on_idle=None, *, tls: ssl.SSLContext | None = None,
                   tls_peer: str | None = None, server: bool = False) -> "PeerLink":
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = time.monotonic() + timeout
        try:
            sock = _secure(sock, conn, tls, tls_peer, server, timeout)
            sock.sendall(conn.initiate())
            while not conn.established:
                if time.monotonic() > deadline:
                    raise LinkError("handshake timed out")
                ev = conn.next_event()
                if ev is NEED_DATA:
                    data = sock.recv(RECV_BYTES)
                    conn.receive_data(data)
                    continue
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                if ev is CLOSED:
                    raise LinkError("peer closed the connection during the handshake")
                if (tls is not None and conn.peer is not None and tls_peer is not None
                        and conn.peer.node.lower() != tls_peer.lower()):
                    raise ProtocolError(f"the peer's HELLO says node {conn.peer.node!r}, its "
                                        f"certificate {tls_peer!r}", ErrorCode.AUTH_FAILED)
                if isinstance(ev, Error):
                    raise RefusedError(f"peer refused: {ev.message}", ev.code)
                # The primary speaks first; the secondary answers its STATE.
                if conn.state is NEGOTIATING and (conn.our_role == "primary"
                                                  or conn.peer_state_msg is not None):
                    sock.sendall(_join(conn.send(state_for(conn.peer_state_msg))))
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
        except ProtocolError as e:
            try:
                sock.sendall(conn.error_frame(e))
            except OSError:
                pass
            sock.close()
            if e.code in (ErrorCode.AUTH_FAILED, ErrorCode.WRONG_RESOURCE, ErrorCode.SPLIT_BRAIN,
                          ErrorCode.ROLE_CONFLICT, ErrorCode.STATE_MISMATCH, ErrorCode.VERSION):
                raise RefusedError(str(e), e.code) from None
            raise LinkError(str(e)) from None
        except ssl.SSLError as e:  # the peer's verdict on our certificate (TLS 1.3: after ours)
            sock.close()
            raise RefusedError(_tls.describe_ssl_error(e), ErrorCode.AUTH_FAILED) from None
        except (OSError, LinkError) as e:
            sock.close()
            if isinstance(e, LinkError):
                raise
            if isinstance(e, socket.timeout):
                raise LinkError(f"the peer did not finish authenticating within {timeout:g} s "
                                f"(auth-timeout)") from None
            raise LinkError(f"handshake failed: {e}") from None
        sock.settimeout(None)
        link = cls(sock, conn, on_event, on_ack, on_idle)
        link._reader = threading.Thread(target=link._read_loop, name=f"duplex-rx-{link.peer_name}",
                                        daemon=True)
        link._reader.start()
        link._keeper = threading.Thread(target=link._keepalive_loop,
                                        name=f"duplex-ka-{link.peer_name}", daemon=True)
        link._keeper.start()
        return link

    # -- sending ----------------------------------------------------------

    def _check_not_failed(self) -> None:
        # The reader found a protocol error and is closing the link: to a
        # sender on another thread that is a lost link, not a bug of its own.
        if self.conn.failure is not None:
            raise LinkError(f"connection failed: {self.conn.failure}")

    def _send(self, make: Callable[[], bytes | list]) -> None:
        if self._closed.is_set():
            raise LinkError(self.error or "connection closed")
        with self._send_lock:
            with self._conn_lock:
                self._check_not_failed()
                out = make()
            try:
                if isinstance(out, list):
                    _sendmsg_all(self.sock, out)
                else:
                    self.sock.sendall(out)
                self._last_tx = time.monotonic()
            except OSError as e:
                self._fail(f"send failed: {e}")
                raise LinkError(self.error) from None

    @contextmanager
    def stream_socket(self) -> Iterator[int]:
        """Hold this link's send lock and give its socket's fd, for the C
        shipping loop to write TOKENS and DATA frames straight to it (the
        connection must be established: checked here, as for send_data).
        Not for a TLS link (the C loop would write plaintext into it) nor
        a compressing one (it writes frames as they are)."""
        if self.python_send:
            raise LinkError("a TLS or compressing link has no raw socket for the C "
                            "streaming loop")
        if self._closed.is_set():
            raise LinkError(self.error or "connection closed")
        with self._send_lock:
            with self._conn_lock:
                self._check_not_failed()
                self.conn.check_send(FrameType.DATA)
            try:
                yield self.sock.fileno()
            finally:
                self._last_tx = time.monotonic()

    def failed(self, reason: str) -> LinkError:
        """Mark the link failed (e.g. the C loop's write failed); the error to raise."""
        self._fail(reason)
        return LinkError(self.error)

    def send_tokens(self, tokens: bytes) -> None:
        self._send(lambda: self.conn.send_payload(FrameType.TOKENS, [tokens]))

    def send_data(self, span) -> None:
        """A DATA frame straight from a ring span (zero copy)."""
        self._send(lambda: self.conn.send_payload(FrameType.DATA, [span]))

    def send_span(self, tokens, span) -> None:
        """A ring span's TOKENS frame, then its DATA frame, back to back
        under one hold of the send lock: what the C loop writes per span,
        for a link it cannot write to (TLS)."""
        self._send(lambda: [*self.conn.send_payload(FrameType.TOKENS, [tokens]),
                            *self.conn.send_payload(FrameType.DATA, [span])])

    def send(self, msg: Message) -> None:
        self._send(lambda: self.conn.send(msg))

    def send_ack(self, journaled: int, applied: int, disk: str | None = None,
                 disk_reason: str = "") -> None:
        """ACK progress; with *disk*, also this side's disk state (see Ack)."""
        self.send(Ack(journaled, applied, disk, disk_reason))

    def send_received(self, seq: int) -> None:
        """Protocol B: received through *seq* (before the journal commit)."""
        self.send(Received(seq))

    def ping(self) -> None:
        self._ping_nonce += 1
        self.send(Ping(self._ping_nonce, time.time_ns()))

    def request_sums(self, req: VerifyReq, timeout: float) -> VerifySums:
        """Send a VERIFY_REQ and wait for its VERIFY_SUMS."""
        self.send(req)
        return self.await_sums(req, timeout)

    def await_sums(self, req: VerifyReq, timeout: float) -> VerifySums:
        """Wait for the VERIFY_SUMS answering *req* (already sent)."""
        key = (req.verify_id, req.first_track)
        deadline = time.monotonic() + timeout
        with self._sums_cv:
            while key not in self._sums:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed.is_set():
                    raise LinkError(self.error or f"peer {self.peer_name} did not answer a "
                                    f"verify request within {timeout:.0f} s")
                self._sums_cv.wait(min(left, 0.5))
            return self._sums.pop(key)

    def wait_bitmap(self, timeout: float) -> OosBitmap:
        """The BITMAP the peer announced in its STATE."""
        if not self._bitmap_ready.wait(timeout) or self._bitmap is None:
            raise LinkError(f"peer {self.peer_name} announced a BITMAP but sent none "
                            f"within {timeout:.0f} s")
        return self._bitmap

    def wait_stop(self, timeout: float) -> Stop | None:
        """The peer's STOP (a clean-stop notice or its echo), or None when
        none came within *timeout* s or the link failed first."""
        deadline = time.monotonic() + timeout
        while not self._stop_ready.wait(0.05):
            if self._closed.is_set() or time.monotonic() > deadline:
                return None
        return self._stop_notice

    def _keepalive_loop(self) -> None:
        """Tell the peer we are alive while our side has nothing to say
        (a secondary staging a long increment sends no ack for a while).
        Skipped while another thread is sending: bytes are moving then."""
        while not self._closed.wait(self.keepalive / 2):
            if time.monotonic() - self._last_tx < self.keepalive:
                continue
            if not self._send_lock.acquire(blocking=False):
                continue
            self._send_lock.release()
            try:
                self.ping()
            except LinkError:
                return

    # -- receiving --------------------------------------------------------

    def _read_loop(self) -> None:
        sock = self.sock
        # One timeout serves the socket's sends and receives alike: a receive
        # that waits this long means the peer is gone, and so does a send
        # that cannot go out for as long (a full buffer for a second is
        # only a slow peer: protocol B/C writers and block wait on it).
        # A receive waits until ping-timeout after the last frame (the
        # deadline, not a fresh ping-timeout each time); until set_timeouts
        # gives the resource's value (just after the handshake), at most a
        # second.
        try:
            while not self._closed.is_set():
                with self._conn_lock:
                    ev = self.conn.next_event()
                if ev is NEED_DATA:
                    if self.on_idle is not None:
                        self.on_idle(self)
                    with self._conn_lock:
                        space = self.conn.receive_buffer()
                    if self._timeouts_set:
                        sock.settimeout(max(0.05, self._last_rx + self.dead_after
                                            - time.monotonic()))
                    else:
                        sock.settimeout(min(1.0, self.dead_after))
                    try:
                        # A large payload is received in place; else a chunk.
                        if space is not None:
                            n = sock.recv_into(space)
                        else:
                            data = sock.recv(RECV_BYTES)
                    except socket.timeout:
                        # A timeout of exactly dead_after may end a hair early
                        # (poll rounds to ms): a margin, or it would wait twice.
                        if time.monotonic() - self._last_rx > self.dead_after * 0.95:
                            self._fail(f"no frame from {self.peer_name} for "
                                       f"{self.dead_after:g} s (ping-timeout)")
                        continue
                    self._last_rx = time.monotonic()
                    with self._conn_lock:
                        if space is not None:
                            self.conn.received_into(n)
                        else:
                            self.conn.receive_data(data)
                    continue
                if ev is CLOSED:
                    self._fail("peer closed the connection")
                    break
                self._dispatch(ev)
        except ProtocolError as e:
            log.error("protocol error from %s: %s", self.peer_name, e)
            try:
                with self._send_lock:
                    sock.sendall(self.conn.error_frame(e))
            except OSError:
                pass
            self._fail(f"protocol error: {e}")
        except OSError as e:
            self._fail(f"receive failed: {e}")
        except Exception as e:  # a handler bug must not leave a half-dead link
            log.exception("handler failed on link to %s", self.peer_name)
            self._fail(f"internal error: {e}")

    def _dispatch(self, ev: Message) -> None:
        if isinstance(ev, Received):
            if self.on_received:
                self.on_received(ev.received_seq)
        elif isinstance(ev, Ack):
            if ev.disk is not None:
                if (ev.disk, ev.disk_reason) != (self.peer_disk, self.peer_disk_reason):
                    log.log(logging.WARNING if ev.disk_reason else logging.INFO,
                            "peer %s: disk %s%s", self.peer_name, ev.disk,
                            f": {ev.disk_reason}" if ev.disk_reason else "")
                self.peer_disk, self.peer_disk_reason = ev.disk, ev.disk_reason
            if self.on_ack:
                self.on_ack(ev.journaled_seq, ev.applied_seq)
        elif isinstance(ev, Ping):
            self.send(Pong(ev.nonce, ev.send_ts_ns, time.time_ns()))
        elif isinstance(ev, Pong):
            now = time.time_ns()
            self.rtt = (now - ev.ping_ts_ns) / 1e9
            self.clock_offset_ns = ev.peer_ts_ns - (ev.ping_ts_ns + now) // 2
        elif isinstance(ev, VerifySums):
            with self._sums_cv:
                self._sums[(ev.verify_id, ev.first_track)] = ev
                self._sums_cv.notify_all()
        elif isinstance(ev, OosBitmap):
            self._bitmap = ev
            self._bitmap_ready.set()
        elif isinstance(ev, Stop):
            self._stop_notice = ev
            self._stop_ready.set()
            if self.on_event:
                self.on_event(self, ev)
        elif isinstance(ev, Error):
            self._fail(f"peer closed: {ev.message}")
        elif self.on_event:
            self.on_event(self, ev)

    # -- state ------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if not self._closed.is_set():
            self.error = reason
            self._closed.set()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set_timeouts(self, ping_interval: float, ping_timeout: float) -> None:
        """The resource's ping-interval (a PING when nothing else went out
        for that long) and ping-timeout (no frame that long: the peer is
        gone)."""
        self.keepalive = ping_interval
        self.dead_after = ping_timeout
        self._timeouts_set = True  # the reader's next receive waits ping-timeout

    def heard_ago(self) -> float:
        """Seconds since the last frame from the peer."""
        return max(0.0, time.monotonic() - self._last_rx)

    def alive(self) -> bool:
        return not self._closed.is_set()

    def close(self, reason: str = "closed") -> None:
        self._fail(reason)
        for t in (self._reader, self._keeper):
            if t and t is not threading.current_thread():
                t.join(5)
        self.sock.close()


def _join(out: bytes | list) -> bytes:
    return out if isinstance(out, bytes) else b"".join(bytes(p) for p in out)


def _secure(sock: socket.socket, conn: Connection, tls: ssl.SSLContext | None,
            tls_peer: str | None, server: bool, timeout: float):
    """The socket the handshake goes on: *sock* itself without TLS, else a
    TlsSocket once the TLS handshake and the name check passed. The
    accepting side looks at the first byte to tell a plaintext peer from
    a TLS one and refuses the mismatch with a reason on both sides."""
    if server:
        first = _tls.first_byte(sock, timeout)
        if first is None:
            raise LinkError("peer closed the connection during the handshake")
        is_tls = first == _tls.TLS_HANDSHAKE
        if tls is not None and not is_tls:
            # Plaintext frames the peer can read: it learns why at once.
            try:
                sock.sendall(conn.error_frame(ProtocolError(
                    f"node {conn.node} requires TLS for resource {conn.resource} (tls = true), "
                    f"and this connection is plaintext: set tls = true on both nodes",
                    ErrorCode.AUTH_FAILED)))
            except OSError:
                pass
            raise RefusedError(_tls.PLAINTEXT_PEER, ErrorCode.AUTH_FAILED)
        if tls is None and is_tls:
            try:  # the TLS client sees plaintext where a TLS record should be
                sock.sendall(conn.error_frame(ProtocolError(_tls.TLS_PEER, ErrorCode.AUTH_FAILED)))
            except OSError:
                pass
            raise RefusedError(_tls.TLS_PEER, ErrorCode.AUTH_FAILED)
    if tls is None:
        return sock
    try:
        ssock = _tls.handshake(sock, tls, server, timeout)
    except _tls.TlsError as e:
        raise RefusedError(str(e), ErrorCode.AUTH_FAILED) from None
    wrapped = _tls.TlsSocket(ssock)
    wrapped.settimeout(timeout)
    if tls_peer is not None:
        try:
            _tls.check_peer_name(ssock, tls_peer)
        except _tls.TlsError as e:
            try:  # inside TLS: the peer learns why, not just an EOF
                wrapped.sendall(conn.error_frame(ProtocolError(
                    f"node {conn.node} refused your certificate: {e}", ErrorCode.AUTH_FAILED)))
            except OSError:
                pass
            wrapped.close()
            raise RefusedError(str(e), ErrorCode.AUTH_FAILED) from None
    return wrapped


def _sendmsg_all(sock, parts: list) -> None:
    if isinstance(sock, _tls.TlsSocket):  # no sendmsg through TLS
        sock.send_parts(parts)
        return
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        n = sock.sendmsg(views)
        while n and views:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0

"""TLS for the replication link and the group control channel (DESIGN §9).

Mutual authentication with Python's ``ssl`` module: both sides present a
certificate signed by the resource's (or group's) ``tls-ca``, and each
checks that the other's certificate names the node it expects
(subjectAltName DNS entries, or the subject CN when there are none; exact,
case-insensitive, no wildcards: a node name is not a domain). The HMAC
challenge of the Duplex protocol still runs, inside TLS: TLS proves the
host, the shared secret the resource.

A plaintext peer meeting a TLS one is recognised from its first bytes (a
TLS record starts with 0x16, a Duplex frame with ``DPX1``), so both sides
say what is wrong instead of failing on garbage.

:class:`TlsSocket` lets a reader thread and a sender thread share one
``SSLSocket``: OpenSSL forbids concurrent calls on one SSL object, so every
call runs under ``TlsSocket._lock`` on a non-blocking socket, and the
waiting (``select``) happens outside the lock. ``_lock`` guards the SSL
object and is a leaf lock: nothing else is taken while it is held.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass

from replicator.errors import DuplexError

#: The first byte of a TLS handshake record (a ClientHello).
TLS_HANDSHAKE = 0x16
#: Payload bytes coalesced into one TLS write (below a TLS record, 16 KiB).
COALESCE = 16 << 10
_POLL = 0.2  # a blocked TLS send looks for a closed socket this often


class TlsError(DuplexError):
    """A TLS handshake or certificate check failed; the message says why."""


@dataclass(frozen=True)
class TlsFiles:
    """One node's TLS files: the CA that signs every certificate of the
    resource (or group), and this node's certificate and key. *where* is
    the config key prefix used in error messages (``FILE: resource.r0``),
    *node_where* the node table's (``FILE: resource.r0.on.alpha``)."""

    ca: str
    cert: str
    key: str
    where: str = "tls"
    node_where: str = "tls"


def _readable(path: str, key: str, private: bool = False) -> bytes:
    """The bytes of *path*, or ConfigError naming *key* and what is wrong."""
    from replicator.config import ConfigError

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{key}: cannot stat {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    if private and stat.S_IMODE(st.st_mode) & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"{key}: {path} is readable by every user (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def make_context(files: TlsFiles, server: bool) -> ssl.SSLContext:
    """An SSLContext for one side of a connection: TLS 1.2 or later, the
    peer's certificate required and checked against ``tls-ca``, this
    node's certificate and key loaded. The peer's name is checked after
    the handshake (:func:`check_peer_name`), the same way on both sides.
    ConfigError names the key of a missing, unreadable or malformed file."""
    from replicator.config import ConfigError

    ca_key = f"{files.where}.tls-ca"
    cert_key = f"{files.node_where}.tls-cert"
    key_key = f"{files.node_where}.tls-key"
    ca = _readable(files.ca, ca_key)
    cert = _readable(files.cert, cert_key)
    key = _readable(files.key, key_key, private=True)
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise ConfigError(f"{ca_key}: {files.ca} holds no PEM certificate")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ConfigError(f"{cert_key}: {files.cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"{key_key}: {files.key} holds no PEM private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # a node name, checked by check_peer_name on both sides
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        raise ConfigError(f"{ca_key}: {files.ca}: not a usable CA certificate "
                          f"({_ssl_reason(e)})") from None
    try:
        ctx.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e):
            raise ConfigError(f"{key_key}: {files.key} is not the key of {cert_key} "
                              f"{files.cert}") from None
        raise ConfigError(f"{cert_key}/{key_key}: {files.cert}, {files.key}: not a usable "
                          f"certificate and key ({_ssl_reason(e)})") from None
    except OSError as e:
        raise ConfigError(f"{cert_key}/{key_key}: {e.strerror or e}") from None
    return ctx


def cert_names(cert: dict) -> list[str]:
    """The names a peer certificate (``getpeercert()``) claims: its
    subjectAltName DNS entries, or its subject CN when it has none."""
    dns = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if dns:
        return dns
    return [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]


def check_peer_name(sock: ssl.SSLSocket, expected: str | set[str]) -> str:
    """The peer certificate's name that is *expected* (one node name, or
    any of a set); TlsError saying which names it has otherwise."""
    want = {expected} if isinstance(expected, str) else set(expected)
    names = cert_names(sock.getpeercert() or {})
    for n in names:
        for w in want:
            if n.lower() == w.lower():
                return w
    shown = ", ".join(repr(n) for n in names) or "no name"
    exp = " or ".join(repr(w) for w in sorted(want))
    raise TlsError(f"the peer's certificate is for {shown}, not node {exp} "
                   f"(subjectAltName DNS, else CN, must be the node name)")


def _ssl_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return e.verify_message
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    return getattr(e, "strerror", None) or str(e)


def describe_ssl_error(e: BaseException) -> str:
    """A TLS failure in words for the log and status: whose certificate was
    refused, or that the peer speaks plaintext."""
    reason = _ssl_reason(e)
    if isinstance(e, ssl.SSLCertVerificationError):
        return (f"TLS: the peer's certificate is not trusted: {reason} (is it signed by "
                f"tls-ca?)")
    text = str(e)
    if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER_FAILURE" in text \
            or "PACKET_LENGTH_TOO_LONG" in text:
        return ("TLS: the peer answered in plaintext, not TLS (tls is off in its "
                "configuration; set tls = true on both nodes)")
    if "ALERT" in text.upper() and isinstance(e, ssl.SSLError):
        return f"TLS: the peer refused our certificate ({reason})"
    if isinstance(e, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return ("TLS: the peer closed the connection during the TLS handshake (tls off on "
                "its side, or it refused our certificate)")
    return f"TLS: {reason}"


PLAINTEXT_PEER = ("the peer connected in plaintext, but this node requires TLS (tls = true): "
                  "set tls = true on both nodes")
TLS_PEER = ("the peer speaks TLS (tls = true on its side), but tls is off on this node: "
            "set the same tls on both nodes")


def first_byte(sock: socket.socket, timeout: float) -> int | None:
    """The first byte the peer sent, left in the socket (MSG_PEEK); None
    at EOF. socket.timeout when it sends nothing within *timeout*."""
    sock.settimeout(timeout)
    data = sock.recv(1, socket.MSG_PEEK)
    return data[0] if data else None


def handshake(sock: socket.socket, ctx: ssl.SSLContext, server: bool,
              timeout: float) -> ssl.SSLSocket:
    """Run the TLS handshake on *sock* (blocking, *timeout*): the SSLSocket.
    TlsError in words (describe_ssl_error) when it fails."""
    sock.settimeout(timeout)
    ssock = ctx.wrap_socket(sock, server_side=server, do_handshake_on_connect=False)
    try:
        ssock.do_handshake()
    except socket.timeout:
        raise
    except (ssl.SSLError, OSError) as e:
        raise TlsError(describe_ssl_error(e)) from None
    return ssock


class TlsSocket:
    """An established SSLSocket that a reader and a sender thread may use
    at once (see the module docstring). The subset of the socket interface
    peerlink.py and group/channel.py use: recv, recv_into, sendall,
    send_parts, settimeout, fileno, shutdown, close; ``socket.timeout``
    when a receive waits longer than the timeout."""

    def __init__(self, ssock: ssl.SSLSocket) -> None:
        self.ssock = ssock
        self._lock = threading.Lock()
        self._timeout: float | None = None
        self._shut = False
        #: the peer certificate's name that matched (set by the caller's check)
        self.cert_name: str | None = None
        ssock.setblocking(False)
        self._fd = ssock.fileno()

    def fileno(self) -> int:
        return self._fd

    def settimeout(self, timeout: float | None) -> None:
        """A receive, or one TLS write, waits at most *timeout* seconds
        (None: until the socket is shut down), then raises socket.timeout,
        as a plain socket's timeout does."""
        self._timeout = timeout

    def getpeercert(self) -> dict:
        return self.ssock.getpeercert() or {}

    def _call(self, op, eof=None):
        deadline = None
        if self._timeout is not None:
            deadline = time.monotonic() + self._timeout
        while True:
            with self._lock:
                if self._shut:
                    raise OSError(errno.EBADF, "the connection is closed")
                try:
                    return op()
                except ssl.SSLWantReadError:
                    rd, wr = [self._fd], []
                    # Decrypted bytes already buffered: no need to wait.
                    if self.ssock.pending():
                        continue
                except ssl.SSLWantWriteError:
                    rd, wr = [], [self._fd]
                except ssl.SSLZeroReturnError:  # the peer's close_notify
                    return eof
            wait = _POLL
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                wait = min(wait, left)
            select.select(rd, wr, [], wait)

    def recv(self, n: int) -> bytes:
        """Up to *n* decrypted bytes (b"" at EOF)."""
        buf = bytearray(n)
        got = self.recv_into(buf)
        return bytes(memoryview(buf)[:got])

    def recv_into(self, buf) -> int:
        """Receive into *buf*; the count (0 at EOF). One SSL read gives at
        most one TLS record (16 KiB): records already here are read too, in
        the same call, so a large payload costs the caller few calls."""
        view = memoryview(buf).cast("B")

        def op() -> int:
            n = self.ssock.recv_into(view)
            while n and n < view.nbytes:
                try:
                    k = self.ssock.recv_into(view[n:])
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLZeroReturnError):
                    break  # nothing more right now (or EOF next): give what we have
                if not k:
                    break
                n += k
            return n

        return self._call(op, 0)

    def sendall(self, data) -> None:
        """Send all of *data*. A write OpenSSL could not finish is retried
        with the same buffer (as OpenSSL requires)."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = self._call(lambda: self.ssock.send(view))
            view = view[n:]

    def send_parts(self, parts) -> None:
        """Send buffers in order: small ones coalesced into one TLS write,
        large ones (ring spans) written without a copy."""
        small = bytearray()
        for p in parts:
            v = memoryview(p).cast("B")
            if v.nbytes < COALESCE:
                small += v
                continue
            if small:
                self.sendall(small)
                small = bytearray()
            self.sendall(v)
        if small:
            self.sendall(small)

    def setsockopt(self, *args) -> None:
        self.ssock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        """Shut the TCP connection down (both threads see it at once);
        without the TLS close_notify: nothing is sent on a dying link."""
        socket.socket.shutdown(self.ssock, how)

    def close(self) -> None:
        with self._lock:
            self._shut = True
        self.ssock.close()

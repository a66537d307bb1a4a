"""A misbehaving 'primary' for the bad-input tests, run inside the primary's
namespace: ``python peer_client.py MODE HOST PORT SECRET_FILE SIZE``.
Prints one JSON line: what the secondary answered."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from replicator.protocol.connection import CLOSED, NEED_DATA, Connection  # noqa: E402
from replicator.protocol.errors import ProtocolError  # noqa: E402
from replicator.protocol.frames import HEADER, MAGIC, VERSION, FrameType  # noqa: E402
from replicator.protocol.messages import Error, State  # noqa: E402


def read_until_closed(sock: socket.socket, conn: Connection | None = None) -> dict:
    """Read what the daemon says until it closes the connection."""
    sock.settimeout(10)
    chunks = b""
    try:
        while True:
            d = sock.recv(65536)
            if not d:
                break
            chunks += d
            if conn is not None:
                conn.receive_data(d)
    except (socket.timeout, ConnectionResetError) as e:
        return {"outcome": "not closed" if isinstance(e, socket.timeout) else "reset",
                "bytes": len(chunks)}
    msg = None
    if conn is not None:
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA or ev is CLOSED:
                    break
                if isinstance(ev, Error):
                    msg = ev.message
        except ProtocolError as e:
            msg = msg or f"(local) {e}"
    return {"outcome": "closed", "message": msg, "bytes": len(chunks)}


class Recording(socket.socket):
    """A socket that keeps a copy of everything sent (for the replay)."""

    sent = b""

    def sendall(self, data, *a):  # type: ignore[override]
        Recording.sent += bytes(data)
        return super().sendall(data, *a)


def main() -> None:
    mode, host, port, secret_file, size = sys.argv[1:6]
    secret = Path(secret_file).read_text().strip().encode()
    size = int(size)
    if mode == "replay":
        # A whole authenticated handshake, recorded, then sent again
        # verbatim on a new connection: the fresh nonce of the secondary
        # makes the old AUTH worthless.
        # HELLO and an AUTH that passed, recorded; no STATE.
        handshake(Recording(socket.AF_INET, socket.SOCK_STREAM), host, port, secret,
                  size, "r0", mode="auth-only")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(Recording.sent)
        print(json.dumps(read_until_closed(sock, Connection("primary", "r0", "intruder",
                                                            secret))))
        return
    sock = socket.create_connection((host, int(port)), timeout=10)
    if mode == "silent":
        # Connect and say nothing: the secondary must drop it (auth-timeout).
        print(json.dumps(read_until_closed(sock)))
        return
    if mode == "garbage":
        sock.sendall(os.urandom(4096))
        print(json.dumps(read_until_closed(sock)))
        return
    if mode == "oversized":
        # A well-formed header announcing a 1 GiB DATA frame before any auth.
        sock.sendall(HEADER.pack(MAGIC, VERSION, FrameType.DATA, 0, 1 << 30, 0))
        print(json.dumps(read_until_closed(sock)))
        return
    resource = "r9" if mode == "other-resource" else "r0"
    if mode == "wrong-secret":
        secret = b"not-the-secret"
    print(json.dumps(handshake(sock, host, port, secret, size, resource, mode=mode)))


def handshake(sock: socket.socket, host: str, port: str, secret: bytes, size: int,
              resource: str, mode: str = "") -> dict:
    """HELLO, AUTH and STATE as a primary would; what came of it."""
    if sock.fileno() >= 0 and not _connected(sock):
        sock.settimeout(10)
        sock.connect((host, int(port)))
    conn = Connection("primary", resource, "intruder", secret)
    sock.sendall(conn.initiate())
    sock.settimeout(10)
    try:
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                d = sock.recv(65536)
                conn.receive_data(d)
                if not d:
                    break
                continue
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if ev is CLOSED or isinstance(ev, Error):
                return {"outcome": "closed",
                        "message": ev.message if isinstance(ev, Error) else None}
            if conn.state.name == "NEGOTIATING" and mode == "auth-only":
                # Authenticated: stop before STATE (a STATE from this
                # client would be adopted as a primary's: it knows the secret).
                sock.close()
                return {"outcome": "authenticated"}
            if conn.state.name == "NEGOTIATING" and mode == "second-hello":
                # Authenticated both ways, then a HELLO that claims another
                # resource instead of STATE: refused.
                from replicator.protocol.frames import encode_frame
                from replicator.protocol.messages import Hello
                hello = Hello(1, "r9", "intruder", "primary", os.urandom(32))
                sock.sendall(encode_frame(FrameType.HELLO, hello.encode()))
                return read_until_closed(sock)
            if conn.state.name == "NEGOTIATING":
                st = State(b"\x11" * 16, b"\x22" * 16, size if mode != "other-size" else size * 2,
                           65536, "primary", "UpToDate")
                sock.sendall(conn.send(st))
                conn.check_state = False
            if conn.established:
                break
    except ProtocolError as e:
        return {"outcome": "refused", "message": str(e)}
    except OSError as e:
        return {"outcome": "reset", "message": str(e)}
    return {"outcome": "established"}


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()

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


def main() -> None:
    mode, host, port, secret_file, size = sys.argv[1:6]
    secret = Path(secret_file).read_text().strip().encode()
    size = int(size)
    sock = socket.create_connection((host, int(port)), timeout=10)
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
                print(json.dumps({"outcome": "closed",
                                  "message": ev.message if isinstance(ev, Error) else None}))
                return
            if conn.state.name == "NEGOTIATING":
                st = State(b"\x11" * 16, b"\x22" * 16, size if mode != "other-size" else size * 2,
                           65536, "primary", "UpToDate")
                sock.sendall(conn.send(st))
                conn.check_state = False
            if conn.established:
                break
    except ProtocolError as e:
        print(json.dumps({"outcome": "refused", "message": str(e)}))
        return
    except OSError as e:
        print(json.dumps({"outcome": "reset", "message": str(e)}))
        return
    print(json.dumps({"outcome": "established"}))


if __name__ == "__main__":
    main()

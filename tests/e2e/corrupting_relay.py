"""A TCP relay that damages one DATA frame in transit, for the end-to-end
integrity test: ``python corrupting_relay.py LISTEN_PORT TARGET_HOST
TARGET_PORT SKIP MARKER``.

It listens on 127.0.0.1:LISTEN_PORT (in the primary's namespace), forwards
every connection to TARGET_HOST:TARGET_PORT, and in the primary-to-secondary
direction follows the frame headers (replicator/protocol/frames.py): after
SKIP DATA frames it flips one bit inside the data of the next one's first
record, once for the whole run, and writes the frame's first seq to MARKER.
Everything else passes unchanged, in both directions.
"""
from __future__ import annotations

import socket
import struct
import sys
import threading
from pathlib import Path

FRAME_HEADER = struct.Struct("<4sBBHII")  # magic, version, type, flags, length, crc
DATA = 0x11
RECORD_HEADER = 48

_lock = threading.Lock()
_state = {"data_frames": 0, "done": False}


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _forward_frames(src: socket.socket, dst: socket.socket, skip: int, marker: Path) -> None:
    while True:
        head = _recv_exact(src, FRAME_HEADER.size)
        if head is None:
            return
        _, _, ftype, _, length, _ = FRAME_HEADER.unpack(head)
        payload = _recv_exact(src, length) if length else b""
        if payload is None:
            return
        if ftype == DATA and len(payload) > RECORD_HEADER + 64:
            with _lock:
                _state["data_frames"] += 1
                hit = not _state["done"] and _state["data_frames"] > skip
                if hit:
                    _state["done"] = True
            if hit:
                damaged = bytearray(payload)
                damaged[RECORD_HEADER + 32] ^= 0x10  # inside the first record's data
                payload = bytes(damaged)
                (seq,) = struct.unpack_from("<Q", payload, 0)
                marker.write_text(f"{seq}\n")
        dst.sendall(head + payload)


def _forward_bytes(src: socket.socket, dst: socket.socket) -> None:
    while True:
        chunk = src.recv(65536)
        if not chunk:
            return
        dst.sendall(chunk)


def _serve(client: socket.socket, target: tuple[str, int], skip: int, marker: Path) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return

    def pump(fn, *args) -> None:
        try:
            fn(*args)
        except OSError:
            pass
        finally:
            # One side ended: end both, as a cut connection would.
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    threads = [threading.Thread(target=pump, args=(_forward_frames, client, upstream, skip, marker),
                                daemon=True),
               threading.Thread(target=pump, args=(_forward_bytes, upstream, client), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    upstream.close()


def main() -> None:
    listen_port, host, port, skip, marker = sys.argv[1:6]
    server = socket.create_server(("127.0.0.1", int(listen_port)))
    print("relay listening", flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve, args=(client, (host, int(port)), int(skip), Path(marker)),
                         daemon=True).start()


if __name__ == "__main__":
    main()

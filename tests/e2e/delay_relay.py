"""A TCP relay that delays what it forwards, for a slowed link (this kernel
has no netem): ``python delay_relay.py LISTEN_PORT TARGET_HOST TARGET_PORT
DELAY_MS``.

It listens on 127.0.0.1:LISTEN_PORT (in the primary's namespace) and
forwards every connection to TARGET_HOST:TARGET_PORT. Bytes from the client
(the primary) reach the target DELAY_MS after they arrived, in order;
replies pass at once. The bandwidth is not limited: the relay reads as fast
as the client sends and holds the delayed bytes in memory.

Threads: per connection one reader that timestamps chunks into a queue, one
sender that forwards each when it is due, and one reply pump; the queue is
the only state they share (queue.Queue locks it).
"""
from __future__ import annotations

import queue
import socket
import sys
import threading
import time


def _shut(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _serve(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    q: queue.Queue[tuple[float, bytes]] = queue.Queue()

    def read() -> None:
        try:
            while chunk := client.recv(65536):
                q.put((time.monotonic() + delay, chunk))
        except OSError:
            pass
        q.put((0.0, b""))  # end of stream, after what is queued

    def send() -> None:
        try:
            while True:
                due, chunk = q.get()
                if not chunk:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                upstream.sendall(chunk)
        except OSError:
            pass
        _shut(client, upstream)  # one side ended: end both, as a cut would

    def reply() -> None:
        try:
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
        except OSError:
            pass
        _shut(client, upstream)

    threads = [threading.Thread(target=f, daemon=True) for f in (read, send, reply)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    upstream.close()


def main() -> None:
    listen_port, host, port, delay_ms = sys.argv[1:5]
    server = socket.create_server(("127.0.0.1", int(listen_port)))
    print("relay listening", flush=True)
    while True:
        client, _ = server.accept()
        threading.Thread(target=_serve, args=(client, (host, int(port)), int(delay_ms) / 1000),
                         daemon=True).start()


if __name__ == "__main__":
    main()

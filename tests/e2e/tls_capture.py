"""Record every frame seen on one interface, for the TLS tests: run inside
a network namespace (``python tls_capture.py IFACE OUT``); it appends each
raw Ethernet frame (an AF_PACKET socket, what tcpdump reads) to OUT until
SIGTERM. The test then looks for a payload pattern in OUT."""
from __future__ import annotations

import signal
import socket
import sys

ETH_P_ALL = 0x0003


def main() -> None:
    iface, out = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((iface, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.settimeout(0.2)
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(1))
    with open(out, "wb", buffering=0) as f:
        print("capturing", flush=True)
        while not done:
            try:
                f.write(s.recv(1 << 16))
            except socket.timeout:
                continue
            except InterruptedError:
                continue


if __name__ == "__main__":
    main()

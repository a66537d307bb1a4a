"""The copy floor of replication on this machine, for ``scripts/bench replication``.

Whatever its design, a replicator that keeps the secondary a crash image
must move every byte written a few more times than a plain pass-through
does: into the send ring (a copy, and a CRC over it), through TCP (a send
and a receive copy), into the secondary's journal (a write) and into its
image (a write). Those are measured here, in CPU time per MiB, on this
machine and in the same run as the table. Added to what the pass-through
(b) itself used per MiB (its server and fio), they bound what (c) can reach
when fio, the primary and the secondary share the machine's CPUs::

    floor MB/s = CPUs / (CPU per MiB of (b) + the copies per MiB)

It is a bound, not a prediction: it counts no syscall, wakeup, lock or
Python, only bytes moved.
"""
from __future__ import annotations

import os
import resource
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class CopyCosts:
    """CPU seconds per MiB of each data movement replication cannot avoid."""

    memcpy: float
    crc: float
    tcp: float          # send and receive, both ends (loopback)
    file_write: float   # pwrite into a file in the bench's tmpfs directory

    @property
    def replication(self) -> float:
        """Ring copy + CRC + TCP + journal write + image write, per MiB."""
        return self.memcpy + self.crc + self.tcp + 2 * self.file_write

    def describe(self) -> str:
        ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
        return (f"ring copy {ms(self.memcpy)}, CRC {ms(self.crc)}, TCP send+receive "
                f"{ms(self.tcp)}, journal and image writes 2 x {ms(self.file_write)}")


def _per_mib(work, mib: int, tries: int = 3) -> float:
    """CPU seconds per MiB of *work(n)*: the least of *tries* runs over
    *mib* MiB in all (a floor: a noisy neighbour only ever adds)."""
    work(8)  # warm up: pages touched, code paths hot
    each = max(1, mib // tries)
    best = float("inf")
    for _ in range(tries):
        c0 = _cpu()
        work(each)
        best = min(best, (_cpu() - c0) / each)
    return best


def measure_copy_costs(directory: Path, mib: int = 512) -> CopyCosts:
    """Measure each movement over *mib* MiB; *directory* holds a scratch
    file (the bench's tmpfs directory, where the images live)."""
    from replicator.native.crc32c import crc32c  # the C core's CRC, as the ring uses it

    data = os.urandom(MiB)
    dest = bytearray(MiB)

    def memcpy(n: int) -> None:
        for _ in range(n):
            dest[:] = data

    def crc(n: int) -> None:
        for _ in range(n):
            crc32c(data)

    path = directory / "floor.scratch"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        def write(n: int) -> None:
            for i in range(n):
                os.pwrite(fd, data, (i % 64) * MiB)  # 64 MiB, rewritten: warm pages

        file_write = _per_mib(write, mib)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return CopyCosts(memcpy=_per_mib(memcpy, mib), crc=_per_mib(crc, mib),
                     tcp=_per_mib(_tcp_transfer, mib), file_write=file_write)


def _tcp_transfer(mib: int) -> None:
    """Send *mib* MiB over a loopback TCP connection and receive them."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        tx = socket.create_connection(server.getsockname())
        rx, _ = server.accept()
    with tx, rx:
        data = os.urandom(MiB)

        def receive() -> None:
            buf = memoryview(bytearray(MiB))
            left = mib * MiB
            while left:
                n = rx.recv_into(buf[:min(MiB, left)])
                if not n:
                    raise ConnectionError("loopback connection closed early")
                left -= n

        t = threading.Thread(target=receive, name="floor-rx")
        t.start()
        for _ in range(mib):
            tx.sendall(data)
        t.join()


def floor_mb_per_s(b_cpu_per_mib: float, costs: CopyCosts, cpus: int) -> float:
    """The MB/s bound for (c), given what (b) used per MiB (seconds)."""
    return cpus / (b_cpu_per_mib + costs.replication) * MiB / 1e6

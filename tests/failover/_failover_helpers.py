"""Helpers of the failover tests (imported by the test modules)."""
from __future__ import annotations

import json
import subprocess

from fixtures.duplex_lab import REPO, RESOURCE, VENV_BIN, Lab, duplex_env
from fixtures.workload import random_op


def run_failover(lab: Lab, *args: str, node: str = "beta", timeout: float = 120
                 ) -> subprocess.CompletedProcess:
    """scripts/failover on *node*, in its network namespace (nsenter --net:
    mounts it makes stay visible to the test)."""
    ns = {"alpha": lab.ns_a, "beta": lab.ns_b}[node]
    argv = [str(VENV_BIN / "python"), str(REPO / "scripts" / "failover"),
            "--config", str(lab.config), "--node", node, RESOURCE, *args]
    if ns:
        argv = ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=duplex_env(), stdin=subprocess.DEVNULL)


def promote(lab: Lab, *args: str, node: str = "beta") -> tuple[subprocess.CompletedProcess, dict | None]:
    """``duplex promote r0 --json ARGS`` on *node*: the result and, when it
    succeeded, its JSON document."""
    r = lab.duplex(node, "promote", RESOURCE, "--json", *args, check=False, timeout=120)
    doc = json.loads(r.stdout) if r.returncode == 0 else None
    return r, doc


def wait_quiet(lab: Lab, node: str = "beta", settle: float = 0.6, timeout: float = 30) -> dict:
    """Until *node*'s seq counters stop moving for *settle* seconds and it
    has applied every in-order record it journaled; returns its status."""
    import time

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        st = lab.control(node)
        seq = st["seq"]
        if last is not None and seq == last["seq"]:
            return st
        last = st
        time.sleep(settle)
    raise AssertionError(f"{node} did not settle within {timeout} s: {last}")


def history_records(path) -> dict[int, tuple]:
    """The primary's history log as {seq: (token, data bytes)}, whole
    records only (a kill -9 can leave the last one torn)."""
    from replicator.records import HEADER_SIZE, RecordError, unpack_token

    data = path.read_bytes()
    out: dict[int, tuple] = {}
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        try:
            tok = unpack_token(data, pos)
        except RecordError:
            break
        if pos + tok.size > len(data):
            break
        out[tok.seq] = (tok, bytes(data[pos + HEADER_SIZE: pos + HEADER_SIZE + tok.data_len]))
        pos += tok.size
    return out


def replay_to(records: dict[int, tuple], size: int, through: int) -> bytes:
    """A zero image of *size* with every recorded write <= *through* applied."""
    from replicator.records import OP_TRIM, OP_WRITE, OP_ZERO

    img = bytearray(size)
    for seq in sorted(records):
        if seq > through:
            break
        tok, data = records[seq]
        if tok.op == OP_WRITE:
            img[tok.offset:tok.offset + tok.length] = data
        elif tok.op in (OP_TRIM, OP_ZERO):
            img[tok.offset:tok.offset + tok.length] = bytes(tok.length)
    return bytes(img)


class Writer:
    """Threads writing to an NBD export until stopped or until the server
    dies (that is what the failover tests do to it): random writes, trims
    and zeros, half of them in a small hot region, some flushes and FUA.
    Errors after the server is gone are expected and only counted."""

    def __init__(self, uri: str, size: int, threads: int = 3, seed: int = 1,
                 pace: float = 0.001):
        import threading

        self.uri, self.size, self.seed, self.pace = uri, size, seed, pace
        self.ops = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(n,), daemon=True)
                         for n in range(threads)]

    def _worker(self, n: int) -> None:
        import random
        import time

        import nbd

        rnd = random.Random(self.seed * 1000 + n)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            i = 0
            while not self._stop.is_set():
                i += 1
                random_op(h, rnd, n, i, self.size, (512, 4096, 4096, 8192, 65536))
                self.ops += 1
                if self.pace:
                    time.sleep(self.pace)
        except nbd.Error as e:
            self.failures.append(f"writer {n}: {e}")
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass  # the server is gone

    def start(self) -> "Writer":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)


def slow_link(netns_pair, lab: Lab, rate: str = "4 mbytes/second", loss_percent: int = 3) -> None:
    """Make the replication link slow and lossy (nftables in beta's
    namespace: packets from alpha to the replication port over *rate*, and
    *loss_percent* of all, are dropped), so that the secondary lags and
    data trails its tokens when the link is cut."""
    rules = (
        "table inet duplex_slow {\n chain in {\n  type filter hook input priority 0;\n"
        f"  ip saddr {lab.addr_a} tcp dport {lab.port} limit rate over {rate} drop\n"
        f"  ip saddr {lab.addr_a} tcp dport {lab.port} numgen random mod 100 < {loss_percent} drop\n"
        " }\n}\n")
    netns_pair.run(lab.ns_b, ["nft", "-f", "-"], input=rules.encode())

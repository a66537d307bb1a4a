"""A concurrent NBD workload from a real client (libnbd), and a sampler of
the secondary's image that only keeps whole samples."""
from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbd


@dataclass
class Workload:
    """Threads issuing writes, trims, zeros and flushes, with overlaps: half
    of the writes land in a small hot region that every thread hits."""

    uri: str
    size: int
    threads: int = 4
    ops_per_thread: int = 400
    seed: int = 1
    pace: float = 0.0  # seconds between a thread's requests
    errors: list[str] = field(default_factory=list)
    done_ops: int = 0
    # Cleared by a Sampler now and then to let the secondary go quiet.
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def _worker(self, n: int) -> None:
        rnd = random.Random(self.seed * 1000 + n)
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            hot = self.size // 16
            for i in range(self.ops_per_thread):
                self.gate.wait()
                r = rnd.random()
                length = rnd.choice((512, 4096, 4096, 8192, 65536, 200_000 // 512 * 512))
                base = 0 if rnd.random() < 0.5 else hot
                span = (hot if base == 0 else self.size - hot) - length
                off = base + rnd.randrange(0, span // 512) * 512
                if r < 0.80:
                    h.pwrite(bytes([n + 1, i & 0xFF]) * (length // 2), off,
                             nbd.CMD_FLAG_FUA if rnd.random() < 0.05 else 0)
                elif r < 0.88:
                    h.trim(length, off)
                elif r < 0.96:
                    h.zero(length, off)
                else:
                    h.flush()
                self.done_ops += 1
                if self.pace:
                    time.sleep(self.pace)
        except Exception as e:  # reported by run()
            self.errors.append(f"worker {n}: {e}")
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass  # the server is gone (a crash test killed it)

    def run(self) -> None:
        ts = [threading.Thread(target=self._worker, args=(n,)) for n in range(self.threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        if self.errors:
            raise AssertionError("workload failed: " + "; ".join(self.errors))


@dataclass
class Sampler:
    """Reads the secondary's image repeatedly. A sample is kept only when
    no apply run was in flight from before the read to after it, so it is
    exactly the image at 'applied through A'."""

    image: Path
    status: callable
    gate: threading.Event | None = None  # a Workload's gate: sample in quiet moments too
    samples: list[tuple[int, str]] = field(default_factory=list)
    discarded: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _one(self) -> None:
        before = self.status()
        data = self.image.read_bytes()
        after = self.status()
        a, b = before["apply"], after["apply"]
        if (a["runs_started"] == a["runs_done"] == b["runs_started"]
                and before["seq"]["applied"] == after["seq"]["applied"]):
            self.samples.append((before["seq"]["applied"], hashlib.sha256(data).hexdigest()))
        else:
            self.discarded += 1

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            if self.gate is not None and n % 2 == 0:
                # Every other sample in a lull: writers hold, the secondary
                # catches up to some seq, and the sample is whole.
                self.gate.clear()
                time.sleep(0.03)
                try:
                    self._one()
                finally:
                    self.gate.set()
            else:
                self._one()
            time.sleep(0.03)

    def __enter__(self) -> "Sampler":
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

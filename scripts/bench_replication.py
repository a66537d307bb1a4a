"""``scripts/bench replication``: what replication costs an NBD client.

fio's nbd engine (libnbd inside fio, no kernel in the path) writes to an
image on tmpfs through three servers, one after the other, in this run:

  (a) nbdkit's C ``file`` plugin: the limit without Python or replication;
  (b) ``scripts/passthrough_plugin.py``: nbdkit's embedded Python, writing
      straight to the file, nothing else, as any Python plugin is written;
  (p) the same plugin keeping one Python thread state per connection thread
      (``pin=1``), as Duplex's plugin does (nbdplugin/threadstate.py): the
      floor under a Python plugin that avoids nbdkit's per-request
      thread-state churn;
  (c) the Duplex primary, replicating to a secondary in another network
      namespace (shown as "not available yet" until the replication engine
      exists: never with made-up numbers);
  (c2) the same with a resource of two volumes, ``data`` and ``wal`` (each
      half of the image size, so the device bytes are those of (c)), fio
      writing both exports at once: one job per export, each with half the
      iodepth, so the requests in flight are those of (c). Its IOPS are the
      sum of both jobs, its p99 the worse job's; "vs (c)" is its IOPS over
      (c)'s in the same run: the cost per write of one write order across
      two volumes (issue 12 wants it within 10%; printed, not asserted);
  (cc) (c) written the way (c2) is, two fio jobs at half the iodepth, both
      on the one export: two NBD connections, so two nbdkit connection
      threads reading requests, as (c2) has. "vs (cc)" of (c2) is then the
      cost of the second volume alone, the connections being equal.
  (ct) (c) with ``tls = true`` (DESIGN §9): the link in TLS with mutual
      certificates (made for the run by ``openssl``), the shipper's Python
      sending path instead of the C streaming loop; "vs (c)" is the cost of
      TLS per write.
  (cz), (cl) (c) with ``compression = "zstd"`` / ``"lz4"`` (their default
      levels): the DATA and increment frames compressed, sent from Python
      as for TLS. They run only the workloads whose data is chosen: "noise"
      (fio's refill_buffers: fresh random bytes for every write,
      incompressible, so the stored fallback) and "text" (fio's
      buffer_compress_percentage: compressible), which (c) runs too for
      comparison. (fio's default buffers are random bytes used again for
      every write: a batch of them compresses, so they are neither.)

Workloads: 4 KiB random writes at iodepth 16, and 1 MiB sequential writes at
iodepth 4; the same with incompressible ("noise") and compressible ("text")
buffers, for (c), (cz), (cl) only. Reported per run: IOPS, MB/s, p99 latency (fio's total latency,
submission to completion), IOPS ratios to (a) and (b), replication lag p50/p99
when the target reports it, and the peak RSS (VmHWM) of each server process,
read from /proc just before it is stopped. Progress goes to stderr; ``run``
returns the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO / "tests"), str(REPO / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_table import Table, fmt_bytes, fmt_count, fmt_mbps, fmt_ns, ratio  # noqa: E402
from fixtures.images import shm_directory, touch_pages  # noqa: E402
from fixtures.nbdkit import start_nbdkit  # noqa: E402
from fixtures.processes import (ManagedProcess, ProcessGroup, cpu_seconds,  # noqa: E402
                                peak_rss_bytes)
from bench_floor import CopyCosts, floor_mb_per_s, measure_copy_costs  # noqa: E402

PASSTHROUGH_PLUGIN = REPO / "scripts" / "passthrough_plugin.py"
TARGET_KEYS = ("a", "b", "p", "c", "ct", "cz", "cl", "cc", "c2")
THREAD_MODELS = ("serialize_all_requests", "serialize_requests", "parallel")
MIN_LAG_SAMPLES = 5  # streaming status samples needed to report the lag


def progress(msg: str) -> None:
    """Progress for the person waiting, on stderr (stdout carries the table)."""
    print(f"bench replication: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Workload:
    """One fio job shape."""

    key: str
    label: str
    fio_args: tuple[str, ...]
    #: Requests in flight, in all (split across the jobs of a target with
    #: several exports).
    iodepth: int = 1
    #: Large sequential writes: bytes, not requests, are the cost, so the
    #: copy floor (bench_floor.py) applies.
    bulk: bool = False
    #: Only these targets run it (None: every target).
    targets: tuple[str, ...] | None = None


WORKLOADS: dict[str, Workload] = {
    w.key: w for w in (
        Workload("randwrite-4k", "4 KiB random write, iodepth 16",
                 ("--rw=randwrite", "--bs=4k", "--norandommap", "--randrepeat=0"),
                 iodepth=16),
        Workload("seqwrite-1m", "1 MiB sequential write, iodepth 4",
                 ("--rw=write", "--bs=1M"), iodepth=4, bulk=True),
        # Buffers fio fills to compress to about a third (zstd's and lz4's
        # ratios differ): what compression on the wire is for.
        Workload("randwrite-4k-noise", "4 KiB random write, iodepth 16, incompressible data",
                 ("--rw=randwrite", "--bs=4k", "--norandommap", "--randrepeat=0",
                  "--refill_buffers"), iodepth=16, targets=("c", "cz", "cl")),
        Workload("seqwrite-1m-noise", "1 MiB sequential write, iodepth 4, incompressible data",
                 ("--rw=write", "--bs=1M", "--refill_buffers"), iodepth=4, bulk=True,
                 targets=("c", "cz", "cl")),
        Workload("randwrite-4k-text", "4 KiB random write, iodepth 16, compressible data",
                 ("--rw=randwrite", "--bs=4k", "--norandommap", "--randrepeat=0",
                  "--buffer_compress_percentage=66", "--buffer_compress_chunk=512",
                  "--refill_buffers"), iodepth=16, targets=("c", "cz", "cl")),
        Workload("seqwrite-1m-text", "1 MiB sequential write, iodepth 4, compressible data",
                 ("--rw=write", "--bs=1M", "--buffer_compress_percentage=66",
                  "--buffer_compress_chunk=512", "--refill_buffers"), iodepth=4, bulk=True,
                 targets=("c", "cz", "cl")),
    )
}


class TargetUnavailable(Exception):
    """This target cannot run here yet; the message says why."""


@dataclass
class Running:
    """A started target: where fio connects and what to measure and stop."""

    #: One NBD URI per export fio writes at once (one fio job each).
    uris: list[str]
    #: (label, peak RSS in bytes) of each server process, read while they run.
    rss: Callable[[], list[tuple[str, int | None]]]
    stop: Callable[[], None]
    #: Extra numbers measured by the target itself after the run, e.g.
    #: {"lag_p50_ns": ..., "lag_p99_ns": ...} for replication lag.
    metrics: Callable[[], dict[str, float]] = field(default=lambda: {})
    #: Every server process (for the CPU they use during the run).
    pids: Callable[[], list[int]] = field(default=lambda: [])


def rss_of(*named: tuple[str, ManagedProcess]) -> Callable[[], list[tuple[str, int | None]]]:
    """An ``rss`` callable for processes we started directly."""
    return lambda: [(name, p.peak_rss_bytes()) for name, p in named]


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every live descendant of ``pid``."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append((int(entry), comm))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child[0])
    return out


@dataclass
class Context:
    """What a target gets to start with."""

    procs: ProcessGroup
    workdir: Path
    image: Path
    options: argparse.Namespace


class Target:
    """A server fio can write to. Subclasses set ``key``/``label`` and ``start``."""

    key = "?"
    label = "?"

    def start(self, ctx: Context) -> Running:
        """Start serving ``ctx.image``; raise TargetUnavailable if it cannot be run here."""
        raise NotImplementedError


class FilePluginTarget(Target):
    """(a) nbdkit's C file plugin."""

    key = "a"
    label = "(a) nbdkit file plugin (C)"

    def start(self, ctx: Context) -> Running:
        server = start_nbdkit(ctx.procs, "file", [str(ctx.image)], workdir=ctx.workdir,
                              name="nbdkit-file")
        return Running([server.uri], rss_of(("nbdkit", server.process)), server.stop,
                       pids=lambda: [server.process.pid])


class PassthroughTarget(Target):
    """(b) the pass-through Python plugin, as any Python plugin is written;
    (p) the same with its Python thread state pinned per connection thread
    (nbdplugin/threadstate.py), as Duplex's plugin does: the floor under a
    Python plugin that avoids nbdkit's per-request thread-state churn."""

    @property
    def label(self) -> str:  # type: ignore[override]
        if self.pin:
            return f"(p) Python pass-through, thread state pinned ({self.model})"
        return f"(b) Python pass-through ({self.model})"

    def __init__(self, model: str, pin: bool = False) -> None:
        self.model = model
        self.pin = pin
        self.key = "p" if pin else "b"

    def start(self, ctx: Context) -> Running:
        server = start_nbdkit(ctx.procs, PASSTHROUGH_PLUGIN,
                              [f"file={ctx.image}", f"threads={self.model}",
                               f"pin={1 if self.pin else 0}"],
                              workdir=ctx.workdir, name="nbdkit-passthrough")
        return Running([server.uri], rss_of(("nbdkit", server.process)), server.stop,
                       pids=lambda: [server.process.pid])


class DuplexTarget(Target):
    """(c) the Duplex primary replicating to a secondary in another namespace;
    (c2) the same with a resource of several volumes, one export each.

    Runs the product as a user does, through ``tests/fixtures/duplex_lab.py``
    (``duplex create-md``, ``duplex up`` on each node): the secondary in one
    namespace, the primary (nbdkit with the Duplex plugin) in the other, TCP
    over a veth pair. Lag is sampled from the primary's status while fio runs;
    stopping waits until the secondary has applied everything.
    """

    LAG_SAMPLE_SECONDS = 0.2
    #: runs only the workloads that name it (compression: the data is chosen)
    chosen_data_only = False

    def __init__(self, volumes: Sequence[str] = (), connections: int = 1,
                 tls: bool = False, compression: str | None = None) -> None:
        self.volumes = list(volumes)
        self.connections = connections
        self.tls = tls
        self.compression = compression
        if compression:
            self.chosen_data_only = True
            self.key = f"c{compression[0]}"
            self.label = f"({self.key}) Duplex primary -> secondary, {compression}"
        elif tls:
            self.key = "ct"
            self.label = "(ct) Duplex primary -> secondary, TLS"
        elif self.volumes:
            self.key = f"c{len(self.volumes)}"
            self.label = (f"({self.key}) Duplex, {len(self.volumes)} volumes "
                          f"({', '.join(self.volumes)}) -> secondary")
        elif connections > 1:
            self.key = "cc"
            self.label = f"(cc) Duplex, 1 volume, {connections} connections -> secondary"
        else:
            self.key = "c"
            self.label = "(c) Duplex primary -> secondary"

    def start(self, ctx: Context) -> Running:
        if importlib.util.find_spec("replicator.node") is None:
            raise TargetUnavailable("the replication engine (replicator/node.py) does not "
                                    "exist yet")
        try:
            import replicator._core  # noqa: F401  (built by scripts/setup)
        except ImportError as e:
            raise TargetUnavailable(f"the C core replicator._core is not built ({e})") from None
        from fixtures.duplex_lab import Lab
        from fixtures.netns import NetnsPair

        pair = NetnsPair.create(ctx.procs)
        lab = None
        ctx.workdir.mkdir(parents=True, exist_ok=True)
        # Two images and two journals on tmpfs: removed with the run, or
        # repeated rounds would fill memory.
        workdir = Path(tempfile.mkdtemp(prefix="lab-", dir=ctx.workdir))
        try:
            # The product's defaults, not the small test geometry. Volumes
            # share the image size, so (c2) has the device bytes (and the
            # tracks) of (c), and random writes the same spread.
            size = ctx.options.size // max(1, len(self.volumes))
            lab = Lab(workdir, ctx.procs, pair.ns_a, pair.ns_b,
                      pair.addr_a, pair.addr_b, size=size, preallocate=True,
                      volumes=self.volumes or None,
                      options={"ring-size": "64MiB", "journal-size": "1GiB",
                               "al-extent-size": "4MiB", "al-extents": 1024})
            if self.tls:
                self._tls_config(lab, workdir)
            if self.compression:
                lab.options["compression"] = self.compression
                lab.write_config()
            lab.create_md(assume_clean=True)
            lab.start_secondary()
            lab.start_primary(history=False)
        except BaseException:
            if lab is not None:
                lab.stop()
                lab.sock.unlink(missing_ok=True)
            pair.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        sampler = _LagSampler(lambda: lab.control("alpha"), self.LAG_SAMPLE_SECONDS)
        sampler.start()
        wire = {"tx0": _tx_bytes(pair.ns_a)}

        def stop() -> None:
            try:
                sampler.stop()
                lab.wait_drained(timeout=300)
                # Bytes the primary's veth sent for every byte written:
                # frames, TCP/IP headers, and compression.
                written = lab.control("alpha").get("written_bytes") or 0
                tx = _tx_bytes(pair.ns_a)
                if written and tx is not None and wire["tx0"] is not None:
                    wire["per_written"] = (tx - wire["tx0"]) / written
            finally:
                lab.stop()
                lab.sock.unlink(missing_ok=True)
                pair.close()
                shutil.rmtree(workdir, ignore_errors=True)

        def rss() -> list[tuple[str, int | None]]:
            # `duplex up` runs the primary's nbdkit as a child: report that one.
            nbdkits = [pid for pid, comm in descendants(lab.primary.pid) if comm == "nbdkit"]
            primary = peak_rss_bytes(nbdkits[0]) if nbdkits else lab.primary.peak_rss_bytes()
            return [("primary", primary), ("secondary", lab.secondary.peak_rss_bytes())]

        def pids() -> list[int]:
            return [pid for p in (lab.primary, lab.secondary)
                    for pid in (p.pid, *(c for c, _ in descendants(p.pid)))]

        uris = [lab.volume_uri(v) for v in self.volumes] or [lab.uri] * self.connections

        def metrics() -> dict[str, float]:
            out = sampler.metrics()
            if "per_written" in wire:
                out["wire_per_written"] = wire["per_written"]
            return out

        return Running(uris, rss, stop, metrics, pids)

    @staticmethod
    def _tls_config(lab, workdir: Path) -> None:
        """tls = true, a CA and one certificate per node (EC P-256)."""
        if shutil.which("openssl") is None:
            raise TargetUnavailable("the openssl command (to make the certificates) is missing")
        from fixtures.tls_certs import make_ca, make_cert

        pki = workdir / "pki"
        ca = make_ca(pki)
        lab.options.update({"tls": True, "tls-ca": str(ca.cert)})
        lab.write_config()
        for node in ("alpha", "beta"):
            cert = make_cert(pki, ca, node)
            lab.set_node_keys(node, tls_cert=str(cert.cert), tls_key=str(cert.key))


def _tx_bytes(netns: str) -> int | None:
    """Bytes sent so far by the veth in namespace *netns* (``ip -s``)."""
    from fixtures.netns import IFNAME_A, IFNAME_B

    r = subprocess.run(["ip", "-n", netns, "-s", "-j", "link", "show"], capture_output=True,
                       text=True, timeout=10)
    if r.returncode != 0:
        return None
    for link in json.loads(r.stdout):
        if link.get("ifname") in (IFNAME_A, IFNAME_B):
            return int(link["stats64"]["tx"]["bytes"])
    return None


class _LagSampler:
    """Samples the primary's status in a thread: ``lag.seconds`` while it
    streams, and whether it was streaming at all (Established) or had gone
    Ahead / was catching up after the send ring overflowed."""

    def __init__(self, status: Callable[[], dict], interval: float) -> None:
        self._status = status
        self._interval = interval
        self._samples: list[float] = []
        self._states: list[str] = []
        self._drops = 0
        self._errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lag-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                st = self._status()
            except Exception:
                self._errors += 1  # a busy control socket must not end the run
                continue
            state = st.get("replication", st.get("connection", "?"))  # older nodes: one word
            self._states.append(state)
            self._drops = max(self._drops, int((st.get("ring") or {}).get("drops") or 0))
            lag = (st.get("lag") or {}).get("seconds")
            if state == "Established" and lag is not None:
                self._samples.append(float(lag))

    def metrics(self) -> dict[str, float]:
        """lag_p50_ns / lag_p99_ns over the samples taken while streaming;
        ring_drops and not_streaming (the share of samples in another
        state than Established)."""
        out: dict[str, float] = {"ring_drops": self._drops}
        if self._states:
            out["not_streaming"] = sum(s != "Established" for s in self._states) / len(self._states)
        # A percentile of a handful of samples (the pair was Ahead for most
        # of the run) would print as a measured lag: leave it out.
        if len(self._samples) >= MIN_LAG_SAMPLES:
            xs = sorted(self._samples)
            pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
            out.update(lag_p50_ns=pick(0.50) * 1e9, lag_p99_ns=pick(0.99) * 1e9)
        return out


@dataclass
class Result:
    """One fio run against one target."""

    workload: Workload
    target_label: str
    target_key: str
    iops: float | None = None
    bw_bytes: float | None = None
    p99_ns: float | None = None
    rss: list[tuple[str, int | None]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: str | None = None
    failed: str | None = None
    #: IOPS of every round (--repeat), this result being the median one.
    rounds: list[float] = field(default_factory=list)
    #: CPUs kept busy during the run: the server processes, and fio.
    server_cpus: float | None = None
    fio_cpus: float | None = None

    @property
    def cpus(self) -> float | None:
        """Server and fio CPUs together."""
        if self.server_cpus is None or self.fio_cpus is None:
            return None
        return self.server_cpus + self.fio_cpus

    def cpu_per_mib(self) -> float | None:
        """CPU seconds (server and fio) per MiB written."""
        if self.cpus is None or not self.bw_bytes:
            return None
        return self.cpus / (self.bw_bytes / (1 << 20))


def median_result(runs: Sequence[Result]) -> Result:
    """Of the rounds of one (workload, target), the one with the median
    IOPS (all its columns come from that round), with every round's IOPS
    in ``rounds``; a round that did not run wins, so that it is shown."""
    bad = [r for r in runs if r.iops is None]
    if bad:
        return bad[0]
    ordered = sorted(runs, key=lambda r: r.iops)
    pick = ordered[(len(ordered) - 1) // 2]
    pick.rounds = [r.iops for r in runs]
    return pick


def parse_size(text: str) -> int:
    """'1G', '512M', '64MiB', '4096' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected a number with an optional "
                                         "K/M/G/T suffix, e.g. 1G")
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


def fio_argv(uris: Sequence[str], workload: Workload, runtime: float, ramp: float,
             out: Path) -> list[str]:
    """fio's command line: the shared options, then one job per URI, the
    workload's iodepth split evenly between them (at least 1 each)."""
    argv = ["fio", "--ioengine=nbd", *workload.fio_args, "--time_based",
            f"--runtime={runtime:g}", f"--ramp_time={ramp:g}", "--lat_percentiles=1",
            "--output-format=json", f"--output={out}"]
    depth = max(1, workload.iodepth // len(uris))
    for i, uri in enumerate(uris):
        # Options after --name belong to that job only.
        argv += [f"--name=duplex-bench-{i}", f"--uri={uri}", f"--iodepth={depth}"]
    return argv


def merge_jobs(jobs: Sequence[dict]) -> dict:
    """Several fio jobs that ran at once as one: IOPS, bandwidth and CPU
    summed, p99 latency the worst job's (percentiles of separate jobs do
    not add). One job is returned as it is."""
    if len(jobs) == 1:
        return jobs[0]
    p99s = []
    for job in jobs:
        pct = (job["write"].get("lat_ns") or job["write"]["clat_ns"]).get("percentile", {})
        if "99.000000" in pct:
            p99s.append(pct["99.000000"])
    return {
        "write": {"iops": sum(j["write"]["iops"] for j in jobs),
                  "bw_bytes": sum(j["write"]["bw_bytes"] for j in jobs),
                  "lat_ns": {"percentile": {"99.000000": max(p99s)} if p99s else {}}},
        "usr_cpu": sum(j.get("usr_cpu", 0) for j in jobs),
        "sys_cpu": sum(j.get("sys_cpu", 0) for j in jobs),
    }


def run_fio(uris: Sequence[str], workload: Workload, runtime: float, ramp: float,
            out: Path) -> dict:
    """Run fio with its nbd engine, one job per URI, all at once; return
    their numbers as one job of fio's JSON report (``write`` holds the
    numbers of the writes, ``usr_cpu``/``sys_cpu`` fio's CPU %): merge_jobs."""
    argv = fio_argv(uris, workload, runtime, ramp, out)
    where = " and ".join(uris)
    try:
        res = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL,
                             timeout=runtime + ramp + 120, check=False)
    except FileNotFoundError as e:
        raise SystemExit("bench: fio is not installed (run scripts/setup)") from e
    if res.returncode != 0:
        raise RuntimeError(f"fio failed (exit {res.returncode}) on {where}:\n"
                           f"{res.stderr.decode(errors='replace')[-2000:]}")
    text = out.read_text()
    # fio may print a line ("fio: connected to NBD server") before the JSON.
    report = json.loads(text[text.index("{"):])
    jobs = report["jobs"]
    if len(jobs) != len(uris):
        raise RuntimeError(f"fio reported {len(jobs)} jobs for {len(uris)} exports on {where}")
    for job, uri in zip(jobs, uris):
        if job.get("error"):
            raise RuntimeError(f"fio job error {job['error']} on {uri}")
    return merge_jobs(jobs)


def measure(target: Target, workload: Workload, options: argparse.Namespace,
            shm: Path) -> Result:
    """Start ``target`` on a fresh image, run ``workload``, read RSS, stop it."""
    result = Result(workload, target.label, target.key)
    image = shm / "image.raw"
    image.unlink(missing_ok=True)
    fd = os.open(image, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, options.size)
    finally:
        os.close(fd)
    # Allocated and touched up front, so no target pays for tmpfs page
    # allocation or the first touch of fresh memory inside its run.
    touch_pages(image)
    with ProcessGroup(shm / "logs") as procs:
        ctx = Context(procs, shm / "run", image, options)
        try:
            running = target.start(ctx)
        except TargetUnavailable as e:
            result.unavailable = str(e)
            progress(f"{target.label}: not available yet: {e}")
            return result
        except Exception as e:
            # Shown as a failed row: the other targets' numbers still count.
            result.failed = f"could not start: {e}"
            progress(f"{target.label}: {result.failed}")
            _dump_logs(procs)
            return result
        stopped = False
        try:
            progress(f"{target.label}, {workload.label}: {options.runtime:g} s ...")
            pids = running.pids()
            cpu0, t0 = _cpu_of(pids), time.monotonic()
            job = run_fio(running.uris, workload, options.runtime, options.ramp,
                          shm / "fio.json")
            result.server_cpus = (_cpu_of(pids) - cpu0) / (time.monotonic() - t0)
            result.fio_cpus = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100
            write = job["write"]
            # VmHWM must be read while the process still exists.
            rss = running.rss()
            stopped = True
            running.stop()  # (c) waits here until the secondary has applied all
            result.iops = write["iops"]
            result.bw_bytes = write["bw_bytes"]
            pct = (write.get("lat_ns") or write["clat_ns"]).get("percentile", {})
            result.p99_ns = pct.get("99.000000")
            result.metrics = running.metrics()
            result.rss = rss
        except Exception as e:
            result.failed = f"run failed: {e}"
            progress(f"{target.label}: {result.failed}")
            _dump_logs(procs)
            if not stopped:
                running.stop()
    image.unlink(missing_ok=True)
    return result


def _cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds the live processes among *pids* used so far."""
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def _dump_logs(procs: ProcessGroup) -> None:
    """The server logs of a failed run, on stderr (they are deleted with the scratch dir)."""
    for title, text in procs.logs(tail_bytes=3000):
        print(f"--- {title} ---\n{text.rstrip()}", file=sys.stderr)


def build_table(results: Sequence[Result], options: argparse.Namespace,
                costs: CopyCosts | None = None) -> Table:
    """The report: one section per workload, one row per target, ratios of
    IOPS; with *costs*, the copy floor under the bulk workload's (c)."""
    table = Table("Replication cost: fio nbd engine -> nbdkit, image on tmpfs",
                  ["target", ("IOPS", ">"), ("MB/s", ">"), ("p99 lat", ">"), ("CPUs", ">"),
                   ("vs (a)", ">"), ("vs (b)", ">"), ("vs (p)", ">"), ("vs (c)", ">"),
                   ("vs (cc)", ">"), ("wire", ">"), ("lag p50", ">"), ("lag p99", ">"),
                   "peak RSS"])
    for workload in {r.workload.key: r.workload for r in results}.values():
        table.add_section(workload.label)
        rows = [r for r in results if r.workload.key == workload.key]
        base = {r.target_key: r.iops for r in rows}
        for r in rows:
            if r.unavailable is not None or r.failed is not None:
                state = "not available yet" if r.failed is None else "FAILED"
                table.add_row(f"{r.target_label}: {state}",
                              *([None] * (len(table.columns) - 1)))
                continue
            rss = ", ".join(f"{name} {fmt_bytes(v) if v else '?'}" for name, v in r.rss)
            table.add_row(
                r.target_label, fmt_count(r.iops), fmt_mbps(r.bw_bytes), fmt_ns(r.p99_ns),
                f"{r.cpus:.2f}" if r.cpus is not None else None,
                ratio(r.iops, base.get("a")) if r.target_key != "a" else None,
                ratio(r.iops, base.get("b")) if r.target_key.startswith("c") else None,
                ratio(r.iops, base.get("p")) if r.target_key.startswith("c") else None,
                ratio(r.iops, base.get("c")) if r.target_key in ("c2", "cc", "ct", "cz", "cl")
                else None,
                ratio(r.iops, base.get("cc")) if r.target_key == "c2" else None,
                (f"{r.metrics['wire_per_written']:.2f}x" if "wire_per_written" in r.metrics
                 else None),
                fmt_ns(r.metrics.get("lag_p50_ns")), fmt_ns(r.metrics.get("lag_p99_ns")),
                rss or None)
    table.add_note(f"fio --ioengine=nbd, {options.runtime:g} s per run after "
                   f"{options.ramp:g} s ramp, image {fmt_bytes(options.size)} "
                   "preallocated on /dev/shm; each run starts a fresh server")
    table.add_note("vs (a), vs (b), vs (p), vs (c), vs (cc): IOPS of the row over IOPS of "
                   "(a) / (b) / (p) / (c) / (cc) in the same workload; p99 lat: fio total latency; peak RSS: VmHWM "
                   "of the server")
    if any(r.target_key == "c2" for r in results):
        table.add_note("(c2): one resource, volumes data and wal of half the image each, one "
                       "fio job per export at half the iodepth, both at once; IOPS and MB/s "
                       "the sum of the two jobs, p99 the worse job's; vs (c) is the cost per "
                       "write of one write order across two volumes (target: >= 0.90x)")
    if any(r.target_key == "ct" for r in results):
        table.add_note("(ct): (c) with tls = true (mutual certificates, TLS 1.3 here); the "
                       "shipper sends from Python through the ssl module, the C streaming "
                       "loop being unable to write into TLS; vs (c) is the cost of TLS per "
                       "write")
    if any(r.target_key in ("cz", "cl") for r in results):
        table.add_note("(cz), (cl): (c) with compression = zstd / lz4 (default levels), sent "
                       "from Python; vs (c) is the cost (or gain) per write against (c) on "
                       "the same data")
    table.add_note("wire: bytes the primary's veth sent (frames, TCP/IP headers, catch-up) "
                   "per byte written to the device, from the start to the drain")
    if any(r.target_key == "cc" for r in results):
        table.add_note("(cc): (c) with two fio jobs at half the iodepth on its one export, as "
                       "(c2) is written: the same two NBD connections; vs (cc) of (c2) is the "
                       "cost of the second volume with the connections equal")
    table.add_note("lag: age of the oldest write not applied on the secondary yet (sent, or "
                   "held back for its batch), from the primary's status every 0.2 s while "
                   "streaming")
    table.add_note("(p) keeps one Python thread state per nbdkit connection thread, as "
                   "Duplex's plugin does; (b) lets nbdkit make and free one per request")
    table.add_note(f"CPUs: CPU time of the server processes and of fio over the run's wall "
                   f"time ({os.cpu_count()} CPUs here, shared by all of them)")
    if costs is not None:
        for note in floor_notes(results, costs):
            table.add_note(note)
    if options.repeat > 1:
        table.add_note(f"each row: the median of {options.repeat} rounds, the targets "
                       "interleaved; IOPS of every round:")
        for r in results:
            if r.rounds:
                table.add_note(f"  {r.target_label.split(' ')[0]} {r.workload.key}: "
                               + ", ".join(fmt_count(x) for x in r.rounds))
    for r in results:
        drops = r.metrics.get("ring_drops", 0)
        if r.target_key.startswith("c") and drops:
            table.add_note(
                f"({r.target_key}), {r.workload.label}: the send ring overflowed {drops:g} time(s); the "
                f"primary was Ahead or catching up in {r.metrics.get('not_streaming', 0):.0%} "
                "of the status samples (it never blocks writers, DESIGN §3): that share of the "
                "run was not streamed in order, and its IOPS are not replication IOPS")
    said = set()
    for r in results:
        why = r.unavailable or r.failed
        if why is not None and (r.target_key, why) not in said:
            said.add((r.target_key, why))
            table.add_note(f"{r.target_label}: {_one_line(why)}")
    return table


def floor_notes(results: Sequence[Result], costs: CopyCosts) -> list[str]:
    """What the copy floor says about each bulk workload's (c): the bound
    given the cheapest serving of the writes, (a), (b) or (p), in CPU per
    MiB, plus the copies replication adds (bench_floor)."""
    notes = []
    for wkey in {r.workload.key for r in results if r.workload.bulk}:
        rows = {r.target_key: r for r in results if r.workload.key == wkey}
        b, c = rows.get("b"), rows.get("c")
        bases = [r for k, r in rows.items() if k in "abp" and r.cpu_per_mib() is not None]
        if b is None or not b.bw_bytes or not bases:
            continue
        # The cheapest way to serve the writes at all: a replicator needs
        # at least that, whichever plugin it is built on.
        base = min(bases, key=lambda r: r.cpu_per_mib())
        cpus = os.cpu_count() or 1
        bound = floor_mb_per_s(base.cpu_per_mib(), costs, cpus)
        notes.append(
            f"copy floor, {b.workload.label}: serving the writes cost at least "
            f"{base.cpu_per_mib() * 1e3:.2f} ms of CPU per MiB (server and fio, "
            f"{base.target_label.split(' ')[0]}, the cheapest); replicating adds at least "
            f"{costs.replication * 1e3:.2f} ms ({costs.describe()}; measured in this run), "
            f"so on {cpus} CPUs (c) cannot pass {bound:.0f} MB/s = "
            f"{bound * 1e6 / b.bw_bytes:.2f}x (b)"
            + (f"; (c) reached {c.bw_bytes / (bound * 1e6):.2f} of that bound"
               if c is not None and c.bw_bytes else ""))
    return notes


def _one_line(text: str, limit: int = 300) -> str:
    """First and last line of a (multi-line) error; the whole of it went to stderr."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    short = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return short if len(short) <= limit else short[:limit - 3] + "..."


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options of ``scripts/bench replication``."""
    p = argparse.ArgumentParser(prog="scripts/bench replication",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=float, default=10.0,
                   help="seconds of fio per target and workload (default 10)")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every target, interleaved; the table shows the median "
                        "round (default 1)")
    p.add_argument("--ramp", type=float, default=1.0,
                   help="seconds of fio warm-up not counted (default 1)")
    p.add_argument("--size", type=parse_size, default=parse_size("1G"),
                   help="image size, e.g. 1G (default), on /dev/shm")
    p.add_argument("--targets", default=",".join(TARGET_KEYS),
                   help=f"comma-separated subset of {','.join(TARGET_KEYS)} (default all)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--passthrough-threads", choices=THREAD_MODELS,
                   default="serialize_all_requests",
                   help="thread model of the pass-through plugin (b)")
    opts = p.parse_args(list(argv))
    opts.target_keys = [t.strip() for t in opts.targets.split(",") if t.strip()]
    for key in opts.target_keys:
        if key not in TARGET_KEYS:
            p.error(f"--targets: unknown target {key!r} (expected {', '.join(TARGET_KEYS)})")
    opts.workload_keys = [w.strip() for w in opts.workloads.split(",") if w.strip()]
    for key in opts.workload_keys:
        if key not in WORKLOADS:
            p.error(f"--workloads: unknown workload {key!r} (expected {', '.join(WORKLOADS)})")
    if opts.runtime <= 0 or opts.ramp < 0:
        p.error("--runtime must be > 0 and --ramp >= 0")
    if not 1 <= opts.repeat <= 20:
        p.error("--repeat must be between 1 and 20")
    return opts


def run(argv: Sequence[str]) -> Table:
    """Measure every (workload, target) pair in this run; return the table."""
    options = parse_args(argv)
    targets: dict[str, Target] = {
        "a": FilePluginTarget(),
        "b": PassthroughTarget(options.passthrough_threads),
        "p": PassthroughTarget(options.passthrough_threads, pin=True),
        "c": DuplexTarget(),
        "ct": DuplexTarget(tls=True),
        "cz": DuplexTarget(compression="zstd"),
        "cl": DuplexTarget(compression="lz4"),
        "cc": DuplexTarget(connections=2),
        "c2": DuplexTarget(volumes=("data", "wal")),
    }
    runs: dict[tuple[str, str], list[Result]] = {}
    started = time.monotonic()
    with shm_directory("dpx-bench-") as shm:
        for wkey in options.workload_keys:
            # Rounds interleave the targets, so that a noisy neighbour's
            # burst does not land on one target only.
            for i in range(options.repeat):
                if options.repeat > 1:
                    progress(f"round {i + 1} of {options.repeat}")
                for tkey in options.target_keys:
                    allowed = WORKLOADS[wkey].targets
                    if (allowed and tkey not in allowed) or (
                            allowed is None and getattr(targets[tkey], "chosen_data_only", False)):
                        continue
                    runs.setdefault((wkey, tkey), []).append(
                        measure(targets[tkey], WORKLOADS[wkey], options, shm))
        costs = None
        if any(WORKLOADS[w].bulk for w in options.workload_keys) and "b" in options.target_keys:
            progress("copy floor: timing the copies replication cannot avoid ...")
            costs = measure_copy_costs(shm)
    progress(f"done in {time.monotonic() - started:.0f} s")
    return build_table([median_result(r) for r in runs.values()], options, costs)


if __name__ == "__main__":
    print(run(sys.argv[1:]).render())

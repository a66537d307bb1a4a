"""``scripts/bench modes``: the replication modes against the peer a user would pick instead.

Every row is measured in this run, fio's nbd engine writing an image on
tmpfs (the workloads of ``scripts/bench replication``: 4 KiB random writes at
iodepth 16, 1 MiB sequential writes at iodepth 4):

  (a)  nbdkit's C ``file`` plugin, no replication; (b) the pass-through
       Python plugin (1 MiB only): with (a), the cheapest serving of the
       writes, under the copy floor (bench_floor.py);
  (qb) qemu-storage-daemon exporting the image over NBD, a ``blockdev-mirror``
       job (``copy-mode = background``) copying it to an NBD target
       (``qemu-nbd``) in the secondary's namespace over TCP, measured once
       the job is ready;
  (qw) the same in ``copy-mode = write-blocking``: a write completes once it
       is on the target too (QEMU's nearest to protocol C);
  (c)  Duplex, protocol A, ``on-congestion = pull-ahead``: today's default;
  (cb) Duplex, protocol A, ``on-congestion = block``;
  (cC) Duplex, protocol C (a write returns once journaled on the secondary);
  (c/2) (c) with fio ``--rate`` at half the MB/s (c) reached in this run:
       the replication lag when the link keeps up; (cb/2) the same for (cb),
       on request (``--targets``), to keep the default run near 10 minutes;
  (cm) Duplex, protocol A with ``max-lag = "100ms"``, fio unlimited, the
       link limited by nftables in the secondary's namespace (``--link-rate``):
       whether max-lag holds the lag under its bound.

Per row: IOPS, MB/s, p99 latency, CPU per write (CPU time of every server
process and fio over the writes), each host's share of it (the primary's
host: its server and fio; the secondary's: its server), the share of status
samples not streaming in order (Ahead or catching up), replication lag
p50/p99 and the flow counters. The targets of issue 14 are printed under the
table with pass/miss. Rounds interleave the targets; each row is the median
round (by IOPS). Progress goes to stderr; ``run`` returns the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO / "tests"), str(REPO / "scripts"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_floor import CopyCosts, floor_mb_per_s, measure_copy_costs  # noqa: E402
from bench_replication import (PASSTHROUGH_PLUGIN, WORKLOADS, Workload,  # noqa: E402
                               descendants, parse_size, run_fio)
from bench_table import Table, fmt_bytes, fmt_count, fmt_mbps, fmt_ns, ratio  # noqa: E402
from fixtures.images import shm_directory, touch_pages  # noqa: E402
from fixtures.nbdkit import start_nbdkit  # noqa: E402
from fixtures.processes import ProcessGroup, cpu_seconds  # noqa: E402

#: The workloads of scripts/bench replication this bench runs (others there,
#: e.g. compressible data, are not about the modes).
MODE_WORKLOADS = ("randwrite-4k", "seqwrite-1m")
#: Keys of the unlimited rows, in the order they run in a round.
BASE_KEYS = ("a", "b", "qb", "qw", "c", "cb", "cC")
#: Rows run after the unlimited ones (they need (c)'s median MB/s).
LAG_KEYS = ("c/2", "cb/2", "cm")
TARGET_KEYS = BASE_KEYS + LAG_KEYS
#: The default run (about 10 minutes): (cb/2) only on request.
DEFAULT_KEYS = tuple(k for k in TARGET_KEYS if k != "cb/2")
#: (b) serves only under the copy floor, which only the bulk workload has.
BULK_ONLY = ("b",)
MAX_LAG = "100ms"
NBD_TARGET_PORT = 10809
LAG_SAMPLE_SECONDS = 0.1
MIN_LAG_SAMPLES = 5
HOSTS = ("primary", "secondary")

#: Duplex's resource keys for each Duplex row (on top of the bench geometry).
DUPLEX_MODES: dict[str, dict[str, Any]] = {
    "c": {"protocol": "A", "on-congestion": "pull-ahead"},
    "cb": {"protocol": "A", "on-congestion": "block"},
    "cC": {"protocol": "C"},
    "c/2": {"protocol": "A", "on-congestion": "pull-ahead"},
    "cb/2": {"protocol": "A", "on-congestion": "block"},
    "cm": {"protocol": "A", "max-lag": MAX_LAG},
}
LABELS = {
    "a": "(a) nbdkit file plugin (C), no replication",
    "b": "(b) Python pass-through, no replication",
    "qb": "(qb) qemu-storage-daemon mirror, background",
    "qw": "(qw) qemu-storage-daemon mirror, write-blocking",
    "c": "(c) Duplex protocol A, pull-ahead (today)",
    "cb": "(cb) Duplex protocol A, on-congestion block",
    "cC": "(cC) Duplex protocol C",
    "c/2": "(c/2) (c) at half (c)'s MB/s",
    "cb/2": "(cb/2) (cb) at half (c)'s MB/s",
    "cm": f"(cm) Duplex A, max-lag {MAX_LAG}, link limited",
}


def progress(msg: str) -> None:
    """Progress for the person waiting, on stderr (stdout carries the table)."""
    print(f"bench modes: {msg}", file=sys.stderr, flush=True)


# -- what a started target gives the measurement ---------------------------

@dataclass
class Started:
    """A running target: where fio writes, whose CPU counts, how to stop it."""

    uri: str
    #: host ("primary" / "secondary") -> the pids of its server processes
    host_pids: Callable[[], dict[str, list[int]]]
    stop: Callable[[], None]
    #: numbers the target measured itself (lag, states, flow counters)
    metrics: Callable[[], dict[str, float]] = field(default=lambda: {})


class Unavailable(Exception):
    """The target cannot run on this machine; the message says why."""


# -- qemu-storage-daemon ----------------------------------------------------

class Qmp:
    """A minimal QMP client over a unix socket: one command at a time,
    events kept aside (only ``query-block-jobs`` is polled, so none is needed)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self._file.readline()
        if not line:
            raise ConnectionError("qemu-storage-daemon closed its QMP socket")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run *command*; its ``return`` value, or RuntimeError with QMP's error."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class QsdMirrorTarget:
    """(qb)/(qw): qemu-storage-daemon in the primary's namespace exports the
    image over NBD and mirrors it (``blockdev-mirror``, *copy_mode*) to
    qemu-nbd serving the secondary's image over TCP in the other namespace.
    Everything is set up through QMP, as a user would: blockdev-add of the
    source file and of the NBD target, the export, the mirror; fio starts
    when the job is ready (the first full copy done)."""

    def __init__(self, key: str, copy_mode: str) -> None:
        self.key = key
        self.copy_mode = copy_mode

    def start(self, procs: ProcessGroup, workdir: Path, image: Path, size: int) -> Started:
        """Start both servers, the mirror job, and wait for it to be ready."""
        for tool in ("qemu-storage-daemon", "qemu-nbd"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} is not installed (Debian qemu-system-common, "
                                  "qemu-utils; scripts/setup installs them)")
        from fixtures.netns import NetnsPair

        pair = NetnsPair.create(procs)
        work = Path(tempfile.mkdtemp(prefix="qsd-", dir=workdir))
        try:
            remote = work / "secondary.img"
            _preallocated(remote, size)
            nbd = procs.start(["qemu-nbd", "--format=raw", "--persistent", "--shared=4",
                               f"--bind={pair.addr_b}", f"--port={NBD_TARGET_PORT}",
                               "--cache=writeback", "--aio=threads", "--export-name=",
                               str(remote)], name="qemu-nbd", netns=pair.ns_b)
            _wait_port(pair, pair.ns_b, NBD_TARGET_PORT, nbd)
            qmp_path, sock = work / "qmp.sock", work / "export.sock"
            qsd = procs.start(["qemu-storage-daemon", "--chardev",
                               f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
                               "--monitor", "chardev=qmp0"],
                              name="qemu-storage-daemon", netns=pair.ns_a)
            qmp = Qmp(qmp_path)
            try:
                qmp.execute("blockdev-add", driver="file", **{"node-name": "src-file"},
                            filename=str(image), aio="threads")
                qmp.execute("blockdev-add", driver="raw", **{"node-name": "src"},
                            file="src-file")
                qmp.execute("blockdev-add", driver="nbd", **{"node-name": "tgt"},
                            server={"type": "inet", "host": pair.addr_b,
                                    "port": str(NBD_TARGET_PORT)}, export="")
                qmp.execute("nbd-server-start", addr={"type": "unix",
                                                      "data": {"path": str(sock)}})
                # Exported before the mirror starts, so the job's filter
                # node takes the export as a parent: writes go through it.
                qmp.execute("block-export-add", type="nbd", id="exp0", **{"node-name": "src"},
                            name="src", writable=True)
                qmp.execute("blockdev-mirror", **{"job-id": "mirror0", "copy-mode": self.copy_mode},
                            device="src", target="tgt", sync="full")
                deadline = time.monotonic() + 300
                while not any(j.get("ready") for j in qmp.execute("query-block-jobs")):
                    jobs = qmp.execute("query-block-jobs")
                    if not jobs:
                        raise RuntimeError("the mirror job ended before it was ready "
                                           f"(log: {qsd.log_text(2000)})")
                    if time.monotonic() > deadline:
                        raise RuntimeError("the mirror job was not ready within 300 s")
                    time.sleep(0.1)
            except BaseException:
                qmp.close()
                raise
        except BaseException:
            procs.stop_all()
            pair.close()
            shutil.rmtree(work, ignore_errors=True)
            raise

        def stop() -> None:
            try:
                # Cancel (not complete): the mirror's target is the
                # secondary's copy, the source stays the one served.
                qmp.execute("block-job-cancel", device="mirror0", force=True)
                qmp.close()
            finally:
                qsd.stop()
                nbd.stop()
                pair.close()
                shutil.rmtree(work, ignore_errors=True)

        return Started(f"nbd+unix:///src?socket={sock}",
                       lambda: {"primary": [qsd.pid], "secondary": [nbd.pid]}, stop)


def _preallocated(path: Path, size: int) -> None:
    """A file of *size* bytes, allocated and touched, as every image of the bench."""
    with open(path, "wb") as f:
        f.truncate(size)
        os.posix_fallocate(f.fileno(), 0, size)
    touch_pages(path)


def _wait_port(pair, ns: str, port: int, proc, timeout: float = 20) -> None:
    """Until something listens on TCP *port* in namespace *ns*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = pair.run(ns, ["ss", "-Hltn", f"sport = :{port}"], check=False)
        if r.stdout.strip():
            return
        if not proc.is_running():
            raise RuntimeError(f"{proc.describe()} exited:\n{proc.log_text(2000)}")
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


# -- Duplex -----------------------------------------------------------------

class StatusSampler:
    """Samples the primary's status in a thread: the replication state, the
    lag while streaming, and the flow counters of the last sample."""

    def __init__(self, status: Callable[[], dict], interval: float) -> None:
        self._status = status
        self._interval = interval
        self.states: list[str] = []
        self.lags: list[float] = []
        self.last: dict = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-sampler", daemon=True)

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and take one last sample (the counters at the end)."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.last = self._status()
        except Exception:
            self.errors += 1

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                st = self._status()
            except Exception:
                self.errors += 1  # a busy control socket must not end the run
                continue
            self.last = st
            self.states.append(st.get("replication", "?"))
            lag = (st.get("lag") or {}).get("seconds")
            if st.get("replication") == "Established" and lag is not None:
                self.lags.append(float(lag))

    def metrics(self) -> dict[str, float]:
        """See :func:`sample_metrics`; with the flow counters of the last sample."""
        out = sample_metrics(self.states, self.lags)
        flow = self.last.get("flow") or {}
        for k in ("blocked_writes", "block_timeouts", "pull_aheads", "delayed_writes",
                  "peer_waits"):
            if k in flow:
                out[k] = float(flow[k])
        if "congestion_blocked_seconds" in self.last:
            out["blocked_s"] = float(self.last["congestion_blocked_seconds"])
        return out


def sample_metrics(states: Sequence[str], lags: Sequence[float],
                   min_samples: int = MIN_LAG_SAMPLES) -> dict[str, float]:
    """From status samples: ``not_streaming`` (the share of samples in
    another state than Established: Ahead, SyncSource, ...) and, with at least
    *min_samples* lags taken while streaming, ``lag_p50_ns``/``lag_p99_ns``
    (nearest rank; fewer samples would print a handful as a percentile)."""
    out: dict[str, float] = {}
    if states:
        out["not_streaming"] = sum(s != "Established" for s in states) / len(states)
    if len(lags) >= min_samples:
        xs = sorted(lags)
        pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
        out.update(lag_p50_ns=pick(0.50) * 1e9, lag_p99_ns=pick(0.99) * 1e9)
    return out


class DuplexModeTarget:
    """A Duplex pair (the product run as a user runs it, tests/fixtures/
    duplex_lab.py) with the resource keys *modes*; *link_mb*: a limit of
    the replication link in MB/s, *link_limit* how (:func:`limit_link`)."""

    def __init__(self, key: str, modes: dict[str, Any], link_mb: float | None = None,
                 link_limit: str = "nft") -> None:
        self.key = key
        self.modes = modes
        self.link_mb = link_mb
        self.link_limit = link_limit

    def start(self, procs: ProcessGroup, workdir: Path, image: Path, size: int) -> Started:
        """Create the metadata, start the secondary then the primary."""
        try:
            import replicator._core  # noqa: F401  (built by scripts/setup)
        except ImportError as e:
            raise Unavailable(f"the C core replicator._core is not built ({e})") from None
        from fixtures.duplex_lab import Lab
        from fixtures.netns import NetnsPair

        pair = NetnsPair.create(procs)
        lab = None
        work = Path(tempfile.mkdtemp(prefix="lab-", dir=workdir))
        try:
            # The geometry of scripts/bench replication's (c), plus the mode.
            lab = Lab(work, procs, pair.ns_a, pair.ns_b, pair.addr_a, pair.addr_b,
                      size=size, preallocate=True,
                      options={"ring-size": "64MiB", "journal-size": _journal_size(size),
                               "al-extent-size": "4MiB", "al-extents": 1024, **self.modes})
            lab.create_md(assume_clean=True)
            lab.start_secondary()
            lab.start_primary(history=False)
            if self.link_mb:
                limit_link(pair, lab.addr_a, lab.port, self.link_mb, self.link_limit)
        except BaseException:
            if lab is not None:
                lab.stop()
                lab.sock.unlink(missing_ok=True)
            pair.close()
            shutil.rmtree(work, ignore_errors=True)
            raise
        sampler = StatusSampler(lambda: lab.control("alpha"), LAG_SAMPLE_SECONDS)
        sampler.start()

        def stop() -> None:
            try:
                sampler.stop()
                if self.link_mb:
                    unlimit_link(pair, self.link_limit)  # drain at the link's full speed
                lab.wait_drained(timeout=300)
            finally:
                lab.stop()
                lab.sock.unlink(missing_ok=True)
                pair.close()
                shutil.rmtree(work, ignore_errors=True)

        def host_pids() -> dict[str, list[int]]:
            return {host: [p.pid, *(c for c, _ in descendants(p.pid))]
                    for host, p in (("primary", lab.primary), ("secondary", lab.secondary))}

        return Started(lab.uri, host_pids, stop, sampler.metrics)


def _journal_size(image_size: int) -> str:
    """The journal of the bench's pair: as big as the image (as scripts/bench
    replication's 1 GiB for 1 GiB), at least 256 MiB; every page of it is
    touched before the run, so a smaller image starts faster."""
    return f"{max(256 << 20, image_size) >> 20}MiB"


NFT_TABLE = "duplex_bench_limit"


def limit_link(pair, src: str, port: int, mb_per_s: float, how: str) -> None:
    """Limit the replication link to *mb_per_s* (10^6 bytes a second).
    ``nft``: nftables in the secondary's namespace drops the packets from
    *src* to *port* over the rate (a policer: TCP backs off on the drops);
    ``tbf``: a token-bucket shaper on the primary's end of the veth (a
    queue of 2 MB, as a slow link's router has: packets wait, not drop)."""
    if how == "nft":
        rules = (f"table inet {NFT_TABLE} {{\n chain in {{\n  type filter hook input priority 0;\n"
                 f"  ip saddr {src} tcp dport {port} limit rate over {mb_per_s:g} mbytes/second "
                 "drop\n }\n}\n")
        pair.run(pair.ns_b, ["nft", "-f", "-"], input=rules.encode())  # FixtureError: nft's words
    else:
        pair.run(pair.ns_a, ["tc", "qdisc", "add", "dev", pair.ifname_a, "root", "tbf",
                             "rate", f"{mb_per_s * 8:g}mbit", "burst", "256kb", "limit", "2mb"])


def unlimit_link(pair, how: str) -> None:
    """Undo :func:`limit_link` (the namespaces' end removes it too)."""
    if how == "nft":
        pair.run(pair.ns_b, ["nft", "delete", "table", "inet", NFT_TABLE], check=False)
    else:
        pair.run(pair.ns_a, ["tc", "qdisc", "del", "dev", pair.ifname_a, "root"], check=False)


class NbdkitTarget:
    """(a) nbdkit's C file plugin, (b) the pass-through Python plugin: no replication."""

    def __init__(self, key: str) -> None:
        self.key = key

    def start(self, procs: ProcessGroup, workdir: Path, image: Path, size: int) -> Started:
        """Start nbdkit on *image*."""
        if self.key == "a":
            server = start_nbdkit(procs, "file", [str(image)], workdir=workdir, name="nbdkit-file")
        else:
            server = start_nbdkit(procs, PASSTHROUGH_PLUGIN,
                                  [f"file={image}", "threads=serialize_all_requests", "pin=0"],
                                  workdir=workdir, name="nbdkit-passthrough")
        return Started(server.uri, lambda: {"primary": [server.process.pid]}, server.stop)


# -- one measurement ----------------------------------------------------------

@dataclass
class Result:
    """One fio run against one target."""

    key: str
    workload: Workload
    iops: float | None = None
    bw_bytes: float | None = None
    p99_ns: float | None = None
    #: CPU seconds per second of the run: each host's server processes, and fio
    host_cpus: dict[str, float] = field(default_factory=dict)
    fio_cpus: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    failed: str | None = None
    rounds: list[float] = field(default_factory=list)
    #: what fio was limited to, bytes/s (the half-rate rows)
    rate: float | None = None

    @property
    def label(self) -> str:
        return LABELS[self.key]

    @property
    def cpus(self) -> float | None:
        """Every server process and fio, in CPUs kept busy."""
        if self.fio_cpus is None or not self.host_cpus:
            return None
        return sum(self.host_cpus.values()) + self.fio_cpus

    def cpu_us_per_write(self) -> float | None:
        """CPU-microseconds (all servers and fio) per write."""
        return None if self.cpus is None or not self.iops else self.cpus / self.iops * 1e6

    def cpu_per_mib(self) -> float | None:
        """CPU seconds (all servers and fio) per MiB written."""
        return None if self.cpus is None or not self.bw_bytes else self.cpus / (self.bw_bytes / (1 << 20))

    def host_share(self) -> dict[str, float]:
        """Each host's share of the CPU (fio runs on the primary's host)."""
        total = self.cpus
        if not total:
            return {}
        out = {h: self.host_cpus.get(h, 0.0) for h in HOSTS}
        out["primary"] += self.fio_cpus or 0.0
        return {h: v / total for h, v in out.items()}


def make_target(key: str, options: argparse.Namespace):
    """The target object of row *key*."""
    if key in ("a", "b"):
        return NbdkitTarget(key)
    if key in ("qb", "qw"):
        return QsdMirrorTarget(key, "background" if key == "qb" else "write-blocking")
    return DuplexModeTarget(key, DUPLEX_MODES[key],
                            link_mb=options.link_mb if key == "cm" else None,
                            link_limit=options.link_limit)


def measure(key: str, workload: Workload, options: argparse.Namespace, shm: Path,
            rate: float | None = None) -> Result:
    """Start row *key*'s target on a fresh image, run fio, stop it."""
    result = Result(key, workload, rate=rate)
    if rate is not None:
        workload = dataclasses.replace(workload, fio_args=(*workload.fio_args,
                                                           f"--rate={int(rate)}"))
    image = shm / "image.raw"
    image.unlink(missing_ok=True)
    _preallocated(image, options.size)
    with ProcessGroup(shm / "logs") as procs:
        workdir = shm / "run"
        workdir.mkdir(parents=True, exist_ok=True)
        t_start = time.monotonic()
        try:
            started = make_target(key, options).start(procs, workdir, image, options.size)
        except Exception as e:
            result.failed = f"could not start: {e}"
            progress(f"{result.label}: {result.failed}")
            _dump_logs(procs)
            return result
        stopped = False
        try:
            progress(f"{result.label}, {workload.label}"
                     + (f" at {rate / 1e6:.0f} MB/s" if rate else "")
                     + f": {options.runtime:g} s (started in {time.monotonic() - t_start:.1f} s) ...")
            pids = started.host_pids()
            cpu0 = {h: _cpu_of(p) for h, p in pids.items()}
            t0 = time.monotonic()
            job = run_fio([started.uri], workload, options.runtime, options.ramp,
                          shm / "fio.json")
            wall = time.monotonic() - t0
            result.host_cpus = {h: (_cpu_of(p) - cpu0[h]) / wall for h, p in pids.items()}
            result.fio_cpus = (job.get("usr_cpu", 0) + job.get("sys_cpu", 0)) / 100
            stopped = True
            t_stop = time.monotonic()
            started.stop()
            progress(f"  stopped in {time.monotonic() - t_stop:.1f} s")
            write = job["write"]
            result.iops = write["iops"]
            result.bw_bytes = write["bw_bytes"]
            pct = (write.get("lat_ns") or write["clat_ns"]).get("percentile", {})
            result.p99_ns = pct.get("99.000000")
            result.metrics = started.metrics()
        except Exception as e:
            result.failed = f"run failed: {e}"
            progress(f"{result.label}: {result.failed}")
            _dump_logs(procs)
            if not stopped:
                try:
                    started.stop()
                except Exception as e2:  # the group's exit kills what is left
                    progress(f"{result.label}: stopping failed too: {e2}")
    image.unlink(missing_ok=True)
    return result


def _cpu_of(pids: Sequence[int]) -> float:
    """CPU seconds the live processes among *pids* used so far."""
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def _dump_logs(procs: ProcessGroup) -> None:
    for title, text in procs.logs(tail_bytes=3000):
        print(f"--- {title} ---\n{text.rstrip()}", file=sys.stderr)


def median_result(runs: Sequence[Result]) -> Result:
    """The round with the median IOPS (all its columns from that round),
    every round's IOPS in ``rounds``; a failed round wins, so it is shown."""
    bad = [r for r in runs if r.iops is None]
    if bad:
        return bad[0]
    ordered = sorted(runs, key=lambda r: r.iops)
    pick = ordered[(len(ordered) - 1) // 2]
    pick.rounds = [r.iops for r in runs]
    return pick


# -- the table and the targets ---------------------------------------------------

@dataclass
class Check:
    """One target of issue 14: what is compared, the value, pass or miss."""

    what: str
    measured: str
    passed: bool | None  # None: could not be measured


def check_targets(results: Sequence[Result], costs: CopyCosts | None,
                  cpus: int) -> list[Check]:
    """The targets of issue 14 this bench measures, each from rows of this run."""
    by = {(r.workload.key, r.key): r for r in results}
    ok = lambda r: r is not None and r.failed is None and r.iops  # noqa: E731
    checks: list[Check] = []

    cc, qw, qb = (by.get(("randwrite-4k", k)) for k in ("cC", "qw", "qb"))
    if ok(cc) and ok(qw):
        x = cc.iops / qw.iops
        checks.append(Check("4 KiB, protocol C >= 1.5x (qw) write-blocking", f"{x:.2f}x", x >= 1.5))
    else:
        checks.append(Check("4 KiB, protocol C >= 1.5x (qw) write-blocking", "not measured", None))
    if ok(cc) and ok(qb):
        x = cc.iops / qb.iops
        checks.append(Check("4 KiB, protocol C > (qb) background", f"{x:.2f}x", x > 1.0))
    else:
        checks.append(Check("4 KiB, protocol C > (qb) background", "not measured", None))

    cb = by.get(("seqwrite-1m", "cb"))
    if ok(cb) and "not_streaming" in cb.metrics:
        share = cb.metrics["not_streaming"]
        checks.append(Check("1 MiB, A + block: never Ahead or catching up",
                            f"{share:.0%} of samples, {cb.metrics.get('pull_aheads', 0):g} "
                            "pull-aheads", share == 0 and not cb.metrics.get("pull_aheads")))
    else:
        checks.append(Check("1 MiB, A + block: never Ahead or catching up", "not measured", None))
    bound = copy_floor(results, costs, cpus)
    if ok(cb) and bound is not None:
        x = cb.bw_bytes / (bound * 1e6)
        checks.append(Check("1 MiB, A + block >= 0.8 of the copy floor",
                            f"{x:.2f} ({fmt_mbps(cb.bw_bytes)} of {bound:.0f} MB/s)", x >= 0.8))
    else:
        checks.append(Check("1 MiB, A + block >= 0.8 of the copy floor", "not measured", None))

    for key in ("c/2", "cb/2"):
        for wkey, wlabel in (("randwrite-4k", "4 KiB"), ("seqwrite-1m", "1 MiB")):
            r = by.get((wkey, key))
            if r is None and key == "cb/2":
                continue  # not in the default run: no line for it
            what = f"{wlabel}, {LABELS[key].split(' ')[0]}: lag p99 < 50 ms at half rate"
            checks.append(_lag_check(r, what, 50e6, strict=True))
    for wkey, wlabel in (("randwrite-4k", "4 KiB"), ("seqwrite-1m", "1 MiB")):
        r = by.get((wkey, "cm"))
        checks.append(_lag_check(r, f"{wlabel}, (cm): max-lag {MAX_LAG} holds (lag p99 <= "
                                    "100 ms, never Ahead)", 100e6, streaming=True))
    return checks


def _lag_check(r: Result | None, what: str, bound_ns: float, streaming: bool = False,
               strict: bool = False) -> Check:
    """Lag p99 under (*strict*) or at most *bound_ns*; with *streaming*, and
    never out of Established (a lag measured only while streaming says
    nothing of the samples Ahead)."""
    if r is None or r.failed is not None or "lag_p99_ns" not in r.metrics:
        why = "not measured" if r is None or r.failed else "too few streaming samples"
        return Check(what, why, None)
    p99 = r.metrics["lag_p99_ns"]
    ahead = r.metrics.get("not_streaming", 0.0)
    text = fmt_ns(p99) + (f", not streaming {ahead:.0%}" if ahead else "")
    under = p99 < bound_ns if strict else p99 <= bound_ns
    return Check(what, text, under and (not streaming or ahead == 0))


def copy_floor(results: Sequence[Result], costs: CopyCosts | None, cpus: int) -> float | None:
    """The copy floor (MB/s) of the 1 MiB workload: the cheapest serving of
    the writes, (a) or (b), in CPU per MiB, plus the copies replication
    cannot avoid (bench_floor), on *cpus* CPUs."""
    if costs is None:
        return None
    bases = [r for r in results if r.workload.bulk and r.key in ("a", "b")
             and r.failed is None and r.cpu_per_mib() is not None]
    if not bases:
        return None
    return floor_mb_per_s(min(r.cpu_per_mib() for r in bases), costs, cpus)


class ModesTable(Table):
    """The rows, and under them the targets with pass/miss (a second table)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.targets = Table("Issue 14 targets (from the rows above, this run)",
                             ["target", "measured", "pass/miss"])

    def render(self) -> str:
        return super().render() + "\n\n" + self.targets.render()


def build_table(results: Sequence[Result], options: argparse.Namespace,
                costs: CopyCosts | None = None) -> ModesTable:
    """The report: one section per workload, one row per target, the targets."""
    table = ModesTable(
        "Replication modes vs qemu-storage-daemon mirror: fio nbd engine, image on tmpfs",
        ["target", ("IOPS", ">"), ("MB/s", ">"), ("p99 lat", ">"), ("CPU/write", ">"),
         ("pri/sec", ">"), ("vs (qw)", ">"), ("vs (qb)", ">"), ("vs (c)", ">"),
         ("not streaming", ">"), ("lag p50", ">"), ("lag p99", ">"), "flow"])
    cpus = os.cpu_count() or 1
    for wkey in dict.fromkeys(r.workload.key for r in results):
        rows = [r for r in results if r.workload.key == wkey]
        table.add_section(rows[0].workload.label)
        base = {r.key: r.iops for r in rows if r.failed is None}
        for r in rows:
            label = r.label + (f" ({fmt_mbps(r.rate)} MB/s)" if r.rate else "")
            if r.failed is not None:
                table.add_row(f"{label}: FAILED", *([None] * (len(table.columns) - 1)))
                continue
            share = r.host_share()
            cpu = r.cpu_us_per_write()
            m = r.metrics
            flow = ", ".join(f"{name} {m[k]:g}" for k, name in
                             (("blocked_writes", "blocked"), ("block_timeouts", "timeouts"),
                              ("pull_aheads", "pull-aheads"), ("delayed_writes", "delayed"),
                              ("peer_waits", "peer waits")) if m.get(k))
            duplex = r.key.startswith("c")
            table.add_row(
                label, fmt_count(r.iops), fmt_mbps(r.bw_bytes), fmt_ns(r.p99_ns),
                f"{cpu:.1f} us" if cpu is not None else None,
                (f"{share['primary']:.0%}/{share['secondary']:.0%}"
                 if share and r.key not in ("a", "b") else None),
                ratio(r.iops, base.get("qw")) if duplex or r.key == "qb" else None,
                ratio(r.iops, base.get("qb")) if duplex else None,
                ratio(r.iops, base.get("c")) if duplex and r.key != "c" else None,
                f"{m['not_streaming']:.0%}" if "not_streaming" in m else None,
                fmt_ns(m.get("lag_p50_ns")), fmt_ns(m.get("lag_p99_ns")), flow or None)
    table.add_note(f"fio --ioengine=nbd, {options.runtime:g} s per run after {options.ramp:g} s "
                   f"ramp, image {fmt_bytes(options.size)} preallocated on /dev/shm; each run "
                   "starts fresh servers; the replicas are in another network namespace (veth)")
    table.add_note("(qb)/(qw): qemu-storage-daemon exports the image (NBD, unix socket) and "
                   "blockdev-mirror copies it (sync full, then measured once ready) to qemu-nbd "
                   "serving the secondary's image over TCP; copy-mode background / write-blocking")
    table.add_note("CPU/write: CPU time of every server process (both hosts) and fio over the "
                   "run, per write; pri/sec: the primary host's share (its server and fio) and "
                   f"the secondary's ({cpus} CPUs here, shared by all)")
    table.add_note("not streaming: status samples (every 0.1 s) in Ahead or catching up "
                   "(SyncSource), not Established; lag: age of the oldest write not yet applied "
                   "on the secondary, from the samples while streaming; flow: the primary's "
                   "flow counters at the end of the run")
    if any(r.key == "cm" for r in results):
        how = ("nftables in the secondary's namespace drops the packets over it"
               if options.link_limit == "nft" else
               "tc tbf on the primary's veth queues the packets over it, 2 MB of queue")
        table.add_note(f"(cm): the replication link limited to {options.link_mb:g} MB/s ({how}), "
                       "fio unlimited")
    bound = copy_floor(results, costs, cpus)
    if costs is not None and bound is not None:
        table.add_note(f"copy floor, 1 MiB: the cheapest serving of the writes ((a) or (b), CPU "
                       f"per MiB) plus the copies replication cannot avoid ({costs.describe()}; "
                       f"ms per MiB, measured in this run): {bound:.0f} MB/s on {cpus} CPUs")
    if options.repeat > 1:
        table.add_note(f"each row: the median of {options.repeat} rounds, the targets "
                       "interleaved; IOPS of every round:")
        for r in results:
            if r.rounds:
                table.add_note(f"  {r.label.split(' ')[0]} {r.workload.key}: "
                               + ", ".join(fmt_count(x) for x in r.rounds))
    for r in results:
        if r.failed is not None:
            table.add_note(f"{r.label}, {r.workload.key}: {r.failed.splitlines()[0][:300]}")
    for c in check_targets(results, costs, cpus):
        table.targets.add_row(c.what, c.measured,
                              "-" if c.passed is None else "pass" if c.passed else "MISS")
    return table


# -- the run ----------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options of ``scripts/bench modes``."""
    p = argparse.ArgumentParser(prog="scripts/bench modes", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=float, default=4.0,
                   help="seconds of fio per row and round (default 4)")
    p.add_argument("--ramp", type=float, default=1.0, help="seconds of fio warm-up (default 1)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds, the targets interleaved; rows show the median (default 3)")
    p.add_argument("--size", type=parse_size, default=parse_size("512M"),
                   help="image size on /dev/shm (default 512M; the journal as big)")
    p.add_argument("--targets", default=",".join(DEFAULT_KEYS),
                   help=f"comma-separated subset of {','.join(TARGET_KEYS)} (default "
                        f"{','.join(DEFAULT_KEYS)})")
    p.add_argument("--workloads", default=",".join(MODE_WORKLOADS),
                   help=f"comma-separated subset of {','.join(MODE_WORKLOADS)}")
    p.add_argument("--link-mb", type=float, default=50.0,
                   help="the link limit of (cm), MB/s (default 50)")
    p.add_argument("--link-limit", choices=("nft", "tbf"), default="nft",
                   help="how (cm)'s link is limited: an nftables policer dropping packets "
                        "over the rate (default), or a tc tbf shaper queueing them")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 s per row, one round, a 256 MiB image")
    opts = p.parse_args(list(argv))
    if opts.quick:
        opts.runtime, opts.ramp, opts.repeat, opts.size = 2.0, 0.5, 1, 256 << 20
    opts.target_keys = [t.strip() for t in opts.targets.split(",") if t.strip()]
    for key in opts.target_keys:
        if key not in TARGET_KEYS:
            p.error(f"--targets: unknown target {key!r} (expected {', '.join(TARGET_KEYS)})")
    if any(k in opts.target_keys for k in ("c/2", "cb/2")) and "c" not in opts.target_keys:
        p.error("--targets: c/2 and cb/2 run at half of (c)'s MB/s: include c")
    opts.workload_keys = [w.strip() for w in opts.workloads.split(",") if w.strip()]
    for key in opts.workload_keys:
        if key not in MODE_WORKLOADS:
            p.error(f"--workloads: unknown workload {key!r} (expected "
                    f"{', '.join(MODE_WORKLOADS)})")
    if opts.runtime <= 0 or opts.ramp < 0:
        p.error("--runtime must be > 0 and --ramp >= 0")
    if not 1 <= opts.repeat <= 20:
        p.error("--repeat must be between 1 and 20")
    if not 0.1 <= opts.link_mb <= 10_000:
        p.error(f"--link-mb: {opts.link_mb:g} MB/s is out of range (0.1 to 10000)")
    return opts


def run_keys(keys: Sequence[str], workload: Workload) -> list[str]:
    """The rows of *keys* that run with *workload* ((b) only for bulk writes)."""
    return [k for k in keys if workload.bulk or k not in BULK_ONLY]


def run(argv: Sequence[str]) -> ModesTable:
    """Measure every row, interleaved rounds; return the table."""
    options = parse_args(argv)
    runs: dict[tuple[str, str], list[Result]] = {}
    started = time.monotonic()
    base = [k for k in BASE_KEYS if k in options.target_keys]
    lag = [k for k in LAG_KEYS if k in options.target_keys]
    with shm_directory("dpx-bench-modes-") as shm:
        for i in range(options.repeat):
            progress(f"round {i + 1} of {options.repeat}")
            for wkey in options.workload_keys:
                for key in run_keys(base, WORKLOADS[wkey]):
                    runs.setdefault((wkey, key), []).append(
                        measure(key, WORKLOADS[wkey], options, shm))
        half = {}
        for wkey in options.workload_keys:
            c = runs.get((wkey, "c"))
            if c and median_result(c).bw_bytes:
                half[wkey] = median_result(c).bw_bytes / 2
        for i in range(options.repeat if lag else 0):
            progress(f"lag rows, round {i + 1} of {options.repeat}")
            for wkey in options.workload_keys:
                for key in lag:
                    rate = half.get(wkey) if key != "cm" else None
                    if key != "cm" and rate is None:
                        continue  # (c) did not run: no half rate
                    runs.setdefault((wkey, key), []).append(
                        measure(key, WORKLOADS[wkey], options, shm, rate=rate))
        costs = None
        if any(WORKLOADS[w].bulk for w in options.workload_keys) and \
                any(k in options.target_keys for k in ("a", "b")):
            progress("copy floor: timing the copies replication cannot avoid ...")
            costs = measure_copy_costs(shm)
    progress(f"done in {time.monotonic() - started:.0f} s")
    ordered = sorted(runs.items(), key=lambda kv: (options.workload_keys.index(kv[0][0]),
                                                   TARGET_KEYS.index(kv[0][1])))
    return build_table([median_result(rs) for _, rs in ordered], options, costs)


if __name__ == "__main__":
    print(run(sys.argv[1:]).render())

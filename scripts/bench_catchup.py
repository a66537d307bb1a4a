"""``scripts/bench catchup``: catch-up and initial sync against nbdcopy.

Two scenarios, each on a fresh pair of network namespaces joined by a veth
(the same path the product replicates over), with the product run as a user
runs it (``tests/fixtures/duplex_lab.Lab``: ``duplex create-md``, ``duplex
up``):

* **catch-up**: ``create-md --assume-clean``, both nodes up, the link cut,
  ``--dirty`` percent of the device (1% by default) overwritten with random
  4 KiB..64 KiB writes spread over the device through libnbd, the primary
  confirmed Ahead (its send ring, sized below the dirtied bytes, overflowed)
  with ``out_of_sync_bytes`` > 0; then the link restored and the time taken
  until the secondary has applied everything and the pair is Established
  with nothing out of sync.
* **initial sync**: ``create-md`` without ``--assume-clean`` on a primary
  image holding random data over ``--fill`` percent of it (spread in 1 MiB
  chunks), both nodes started, timed from the primary's start until the
  secondary is UpToDate and drained.

Each is compared with ``nbdcopy`` copying the whole device over the same
veth: ``nbdkit file`` serves the secondary's image in the secondary's
namespace on TCP and ``nbdcopy --no-extents --sparse=0 --flush`` runs in the
primary's namespace, so every byte crosses the link, as a full copy would.

Measured per row: seconds, the data the tool says it sent (Duplex's
``incr_bytes_sent``; nbdcopy: the device), the bytes on the wire (both
directions, read from the veth's counters in the primary's namespace
before and after), and the ratios of seconds and wire bytes to nbdcopy's.
After each Duplex run the two images are compared byte for byte; a run
that leaves them different is a FAILED row, never a number.

Images go on /dev/shm when MemAvailable leaves room for the other work on
this machine, else on /var/tmp (``--scratch`` forces one); everything --
namespaces, processes, image files -- is removed at the end, also on
failure, Ctrl-C or SIGTERM. Progress goes to stderr; ``run`` returns the
table.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests"), str(REPO / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_table import Table, fmt_bytes, ratio  # noqa: E402
from fixtures.nbdkit import nbd_connect, start_nbdkit  # noqa: E402
from fixtures.processes import ProcessGroup  # noqa: E402

SHM_ROOT = Path("/dev/shm")
DISK_ROOT = Path("/var/tmp")
TRACK_SIZE = 64 << 10          # the product's default track-size
NBDCOPY_PORT = 10809
POLL_SECONDS = 0.05
MIN_RING = 1 << 20             # the config's smallest ring-size
DEFAULT_RING = 16 << 20
FILL_CHUNK = 1 << 20
COMPARE_CHUNK = 16 << 20
SCENARIOS = ("catchup", "initial-sync")


def progress(msg: str) -> None:
    """Progress for the person waiting, on stderr (stdout carries the table)."""
    print(f"bench catchup: {msg}", file=sys.stderr, flush=True)


class BenchFailure(Exception):
    """A measurement could not be made; the message says why (shown in the table)."""


# -- options -----------------------------------------------------------------

def parse_size(text: str) -> int:
    """'4G', '512M', '64MiB', '4096' -> bytes (binary units)."""
    from replicator.sizes import parse_size as _parse
    try:
        n = _parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return n


def parse_percent(text: str) -> float:
    """'1', '0.5', '50%' -> a float percentage in (0, 100]."""
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"percentage {text!r}: expected a number "
                                         "such as 1 or 0.5") from None
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"percentage {text!r} must be > 0 and <= 100")
    return v


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options of ``scripts/bench catchup`` (sizes/ratios checked, defaults derived)."""
    p = argparse.ArgumentParser(prog="scripts/bench catchup",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("4GiB"),
                   help="device size, e.g. 512M or 4G (default 4GiB)")
    p.add_argument("--dirty", type=parse_percent, default=1.0,
                   help="percent of the device overwritten while the link is cut "
                        "(default 1)")
    p.add_argument("--fill", type=parse_percent, default=50.0,
                   help="percent of the primary holding data before the initial sync "
                        "(default 50)")
    p.add_argument("--ring-size", type=parse_size, default=None,
                   help="the primary's send ring; default: 16MiB, or less so that the "
                        "dirtied bytes overflow it at least twice over")
    p.add_argument("--journal-size", type=parse_size, default=None,
                   help="the secondary's journal; default 1GiB, at most a quarter of "
                        "--size (at least 16MiB)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--scratch", choices=("auto", "shm", "disk"), default="auto",
                   help="where images go: /dev/shm if memory allows (auto, default), "
                        "/dev/shm (shm) or /var/tmp (disk)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="longest wait for one catch-up, sync or copy, seconds (default 900)")
    p.add_argument("--ahead-timeout", type=float, default=30.0,
                   help="longest wait for the primary to report Ahead after the "
                        "dirtying writes, seconds (default 30)")
    p.add_argument("--seed", type=int, default=1,
                   help="seed of the dirtying writes' offsets and lengths (default 1)")
    o = p.parse_args(list(argv))
    o.scenario_keys = [s.strip() for s in o.scenarios.split(",") if s.strip()]
    for key in o.scenario_keys:
        if key not in SCENARIOS:
            p.error(f"--scenarios: unknown scenario {key!r} (expected {', '.join(SCENARIOS)})")
    if not o.scenario_keys:
        p.error("--scenarios: name at least one scenario")
    if o.size % TRACK_SIZE or o.size < 4 * FILL_CHUNK:
        p.error(f"--size {o.size}: must be a multiple of 64KiB and at least 4MiB")
    if o.timeout <= 0 or o.ahead_timeout <= 0:
        p.error("--timeout and --ahead-timeout must be > 0")
    o.dirty_bytes = max(4096, int(o.size * o.dirty / 100) // 4096 * 4096)
    if o.ring_size is None:
        # The ring must overflow during the outage, or the pair would just
        # resume from it (no catch-up to measure).
        o.ring_size = DEFAULT_RING
        if o.dirty_bytes < 2 * DEFAULT_RING:
            o.ring_size = max(MIN_RING, _pow2_floor(max(1, o.dirty_bytes // 4)))
    if o.ring_size < MIN_RING:
        p.error(f"--ring-size {o.ring_size}: the product needs at least 1MiB")
    if "catchup" in o.scenario_keys and o.dirty_bytes <= o.ring_size:
        p.error(f"--dirty {o.dirty:g}% of {fmt_bytes(o.size)} is {fmt_bytes(o.dirty_bytes)}, "
                f"which does not overflow a {fmt_bytes(o.ring_size)} send ring: the pair "
                "would resume from the ring instead of catching up; use a larger --size "
                "or --dirty, or a smaller --ring-size")
    if o.journal_size is None:
        o.journal_size = min(1 << 30, max(16 << 20, o.size // 4))
    if o.journal_size < MIN_RING:
        p.error(f"--journal-size {o.journal_size}: the product needs at least 1MiB")
    return o


# -- scratch space -----------------------------------------------------------

def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def choose_scratch(mode: str, need: int) -> tuple[Path, str]:
    """The directory images go in, and a sentence saying where and why.

    tmpfs pages are memory shared with other work: use /dev/shm only when
    MemAvailable keeps 2 GiB or 10% of RAM (the larger) free beyond ``need``.
    """
    mem = _meminfo()
    avail, total = mem.get("MemAvailable", 0), mem.get("MemTotal", 0)
    reserve = max(2 << 30, total // 10)
    shm_free = shutil.disk_usage(SHM_ROOT).free if SHM_ROOT.is_dir() else 0
    shm_ok = SHM_ROOT.is_dir() and avail >= need + reserve and shm_free >= need
    why = (f"{fmt_bytes(need)} of images and journal; MemAvailable {fmt_bytes(avail)}, "
           f"/dev/shm free {fmt_bytes(shm_free)}")
    if mode == "shm" or (mode == "auto" and shm_ok):
        if shm_free < need:
            raise BenchFailure(f"/dev/shm has {fmt_bytes(shm_free)} free, {fmt_bytes(need)} "
                               "needed; use --scratch disk or a smaller --size")
        return SHM_ROOT, f"images on /dev/shm (tmpfs): {why}"
    disk_free = shutil.disk_usage(DISK_ROOT).free
    if disk_free < need:
        raise BenchFailure(f"neither /dev/shm nor {DISK_ROOT} has room: {why}, "
                           f"{DISK_ROOT} free {fmt_bytes(disk_free)}; use a smaller --size")
    reason = "as asked" if mode == "disk" else "memory too short for tmpfs"
    return DISK_ROOT, f"images on {DISK_ROOT} (disk, {reason}): {why}"


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup below runs for both."""
    me = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != me:
            # A forked helper (pyroute2 forks one per namespace socket and
            # SIGTERMs it) inherits this handler: die as SIGTERM would make it.
            os._exit(128 + signum)
        raise KeyboardInterrupt(f"signal {signum}")
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@dataclass
class Env:
    """One scenario's world: a scratch dir, its processes, a namespace pair."""

    workdir: Path
    procs: ProcessGroup
    pair: Any  # fixtures.netns.NetnsPair

    def wire(self) -> tuple[int, int]:
        """(tx, rx) bytes of the primary's veth end, from its own namespace."""
        from pyroute2 import NetNS
        with NetNS(self.pair.ns_a) as ns:
            idx = ns.link_lookup(ifname=self.pair.ifname_a)[0]
            st = ns.get_links(idx)[0].get_attr("IFLA_STATS64")
        return int(st["tx_bytes"]), int(st["rx_bytes"])

    def dump_logs(self) -> None:
        """The logs of this scenario's processes, on stderr (they go with the scratch dir)."""
        for title, text in self.procs.logs(tail_bytes=3000):
            print(f"--- {title} ---\n{text.rstrip()}", file=sys.stderr)


@contextmanager
def scenario_env(root: Path, name: str) -> Iterator[Env]:
    """A scratch directory under ``root`` and a fresh namespace pair; all removed after."""
    from fixtures.netns import NetnsPair
    workdir = Path(tempfile.mkdtemp(prefix=f"dpx-catchup-{os.getpid()}-{name}-", dir=root))
    procs = ProcessGroup(workdir / "logs")
    pair = None
    try:
        pair = NetnsPair.create(procs)
        yield Env(workdir, procs, pair)
    finally:
        try:
            procs.stop_all()
        except Exception as e:
            progress(f"cleanup: {e}")
        if pair is not None:
            try:
                pair.close()
            except Exception as e:
                progress(f"cleanup: {e}")
        shutil.rmtree(workdir, ignore_errors=True)


# -- measurements ------------------------------------------------------------

@dataclass
class Measurement:
    """One timed transfer: Duplex or nbdcopy, in one scenario."""

    label: str
    seconds: float | None = None
    data_bytes: int | None = None
    wire_tx: int | None = None
    wire_rx: int | None = None
    failed: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def wire_bytes(self) -> int | None:
        """Both directions on the veth."""
        if self.wire_tx is None or self.wire_rx is None:
            return None
        return self.wire_tx + self.wire_rx


@dataclass
class ScenarioResult:
    """A scenario's Duplex row and its nbdcopy baseline."""

    key: str
    title: str
    duplex: Measurement
    baseline: Measurement
    notes: list[str] = field(default_factory=list)


def touch_image(path: Path) -> None:
    """Write zeros over the whole (preallocated) image.

    tmpfs hands out fallocated pages unwritten and clears each on its first
    write (in a VM that is also the page's first touch); measured here, a
    first nbdcopy into such a file took 3 to 6 times as long as the next.
    A real device has no such cost, so no run may pay it: every page is
    written once before anything is timed."""
    zeros = bytes(COMPARE_CHUNK)
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        for off in range(0, size, len(zeros)):
            os.pwrite(fd, zeros[:min(len(zeros), size - off)], off)
    finally:
        os.close(fd)


def _new_lab(env: Env, o: argparse.Namespace):
    from fixtures.duplex_lab import Lab
    lab = Lab(env.workdir / "lab", env.procs, env.pair.ns_a, env.pair.ns_b,
              env.pair.addr_a, env.pair.addr_b, size=o.size, preallocate=True,
              options={"track-size": TRACK_SIZE, "ring-size": o.ring_size,
                       "journal-size": o.journal_size})
    progress(f"writing zeros over both {fmt_bytes(o.size)} images (no first-touch "
             "cost inside a timed run)")
    for img in lab.image.values():
        touch_image(img)
    return lab


def _stop_lab(lab: Any) -> None:
    try:
        lab.stop()
    finally:
        lab.sock.unlink(missing_ok=True)


def wait_caught_up(lab: Any, timeout: float) -> tuple[dict, dict, float | None]:
    """Poll until the pair is Established, nothing out of sync, the secondary
    UpToDate and drained. Returns (primary status, secondary status, the
    monotonic time SyncSource was first seen or None)."""
    deadline = time.monotonic() + timeout
    first_sync = None
    last: dict = {}
    while True:
        for proc in (lab.primary, lab.secondary):
            if proc is not None and not proc.is_running():
                raise BenchFailure(f"{proc.describe()} exited:\n{proc.log_text(2000)}")
        try:
            p, s = lab.control("alpha"), lab.control("beta")
        except Exception as e:  # a busy control socket is not a failure
            p, s = {}, {}
            last = {"error": str(e)}
        now = time.monotonic()
        if p and s:
            last = {"primary": {k: p.get(k) for k in ("connection", "out_of_sync_bytes",
                                                     "sync", "seq")},
                    "secondary": {k: s.get(k) for k in ("connection", "disk", "seq")}}
            if p["replication"] == "SyncSource" and first_sync is None:
                first_sync = now
            written = p["seq"]["written"]
            if (p["replication"] == "Established" and p["out_of_sync_bytes"] == 0
                    and p["sync"] is None and p["seq"]["journaled"] >= written
                    and s["seq"]["applied"] >= written and s["disk"] == "UpToDate"):
                return p, s, first_sync
        if now > deadline:
            raise BenchFailure(f"not caught up after {timeout:g} s; last status: {last}")
        time.sleep(POLL_SECONDS)


def compare_images(a: Path, b: Path) -> None:
    """Raise BenchFailure naming the first differing 4 KiB block if the images differ."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(COMPARE_CHUNK), fb.read(COMPARE_CHUNK)
            if x != y:
                at = off + next((i for i in range(0, min(len(x), len(y)), 4096)
                                 if x[i:i + 4096] != y[i:i + 4096]), min(len(x), len(y)))
                raise BenchFailure(f"{a.name} and {b.name} differ (first in the 4 KiB at {at}) "
                                   "after Duplex reported it was in sync")
            if not x:
                return
            off += len(x)


def dirty_device(uri: str, size: int, target: int, seed: int) -> tuple[int, int, int]:
    """Random 4 KiB..64 KiB writes of random data at random 4 KiB-aligned
    offsets over the whole device, until ``target`` bytes are written.
    Returns (writes, bytes written, distinct 64 KiB tracks touched)."""
    rng = random.Random(seed)
    h = nbd_connect(uri)
    writes = written = 0
    tracks: set[int] = set()
    try:
        while written < target:
            length = min(rng.randint(1, 16) * 4096, max(4096, target - written))
            off = rng.randrange(0, (size - length) // 4096 + 1) * 4096
            h.pwrite(rng.randbytes(length), off)
            tracks.update(range(off // TRACK_SIZE, (off + length - 1) // TRACK_SIZE + 1))
            writes += 1
            written += length
        h.flush()
    finally:
        h.shutdown()
    return writes, written, len(tracks)


def fill_image(path: Path, size: int, percent: float) -> int:
    """Random data over ``percent`` of the image, in 1 MiB chunks spread evenly
    (the rest stays zero). Returns the bytes written."""
    chunks = size // FILL_CHUNK
    pool_size = 32 << 20
    pool = os.urandom(pool_size + FILL_CHUNK)
    frac = percent / 100
    written = 0
    with open(path, "r+b") as f:
        for i in range(chunks):
            if int((i + 1) * frac) == int(i * frac):
                continue  # this chunk stays zero
            # A stride that is not a multiple of the chunk: no two chunks alike.
            start = (i * 4099 * 4096) % pool_size
            f.seek(i * FILL_CHUNK)
            f.write(pool[start:start + FILL_CHUNK])
            written += FILL_CHUNK
        f.flush()
        os.fsync(f.fileno())
    return written


def measure_catchup(env: Env, o: argparse.Namespace, m: Measurement) -> None:
    """The catch-up row: cut, dirty, confirm Ahead, restore, time until drained."""
    lab = _new_lab(env, o)
    try:
        lab.create_md(assume_clean=True)
        lab.start_secondary()
        lab.start_primary(history=False)
        lab.wait(lambda: lab.control("alpha")["replication"] == "Established",
                 "the pair to connect", timeout=60, proc=lab.primary)
        progress("link cut; dirtying the device")
        env.pair.link_down()
        writes, written, tracks = dirty_device(lab.uri, o.size, o.dirty_bytes, o.seed)
        ntracks = o.size // TRACK_SIZE
        m.notes.append(f"dirtied with {writes} writes of 4-64 KiB: {fmt_bytes(written)} "
                       f"({100 * written / o.size:.2f}% of the device), {tracks} of {ntracks} "
                       f"64 KiB tracks touched ({100 * tracks / ntracks:.2f}%)")
        try:
            st = lab.wait(lambda: (s := lab.control("alpha"))["replication"] == "Ahead"
                          and s["out_of_sync_bytes"] > 0 and s,
                          "Ahead", timeout=o.ahead_timeout, proc=lab.primary)
        except AssertionError:
            st = lab.control("alpha")
            raise BenchFailure(
                f"the primary did not go Ahead within {o.ahead_timeout:g} s after "
                f"{fmt_bytes(written)} of writes (connection {st.get('connection')}, "
                f"out_of_sync_bytes {st.get('out_of_sync_bytes')}, ring-size "
                f"{fmt_bytes(o.ring_size)})") from None
        oos = st["out_of_sync_bytes"]
        incr0 = st["incr_bytes_sent"]
        m.notes.append(f"primary Ahead with {fmt_bytes(oos)} out of sync "
                       f"(ring-size {fmt_bytes(o.ring_size)}, journal-size "
                       f"{fmt_bytes(o.journal_size)})")
        tx0, rx0 = env.wire()
        progress(f"primary Ahead, {fmt_bytes(oos)} out of sync; link restored, "
                 "timing the catch-up")
        t0 = time.monotonic()
        env.pair.link_up()
        p, _, first_sync = wait_caught_up(lab, o.timeout)
        t1 = time.monotonic()
        tx1, rx1 = env.wire()
        if p["incr_bytes_sent"] <= incr0:
            raise BenchFailure("the pair came back without sending an increment "
                               "(incr_bytes_sent did not grow): no catch-up was measured")
        m.seconds = t1 - t0
        m.data_bytes = p["incr_bytes_sent"] - incr0
        m.wire_tx, m.wire_rx = tx1 - tx0, rx1 - rx0
        if first_sync is not None:
            m.notes.append(f"SyncSource first seen {first_sync - t0:.2f} s after the link "
                           "came up (reconnect)")
    finally:
        _stop_lab(lab)
    progress(f"catch-up: {m.seconds:.2f} s; comparing the images")
    compare_images(lab.image["alpha"], lab.image["beta"])


def measure_initial_sync(env: Env, o: argparse.Namespace, m: Measurement) -> None:
    """The initial-sync row: a primary with data, no --assume-clean, timed to UpToDate."""
    lab = _new_lab(env, o)
    try:
        progress(f"writing random data over {o.fill:g}% of the primary image")
        filled = fill_image(lab.image["alpha"], o.size, o.fill)
        m.notes.append(f"primary holds {fmt_bytes(filled)} of random data in 1 MiB chunks, "
                       "the rest zero; secondary all zero")
        lab.create_md(assume_clean=False)
        lab.start_secondary()
        tx0, rx0 = env.wire()
        progress("timing the initial sync (from the primary's start)")
        t0 = time.monotonic()
        lab.start_primary(history=False)
        p, _, first_sync = wait_caught_up(lab, o.timeout)
        t1 = time.monotonic()
        tx1, rx1 = env.wire()
        if first_sync is not None:
            m.notes.append(f"SyncSource first seen {first_sync - t0:.2f} s after the primary "
                           "was started")
        if p["incr_bytes_sent"] <= 0 and filled:
            raise BenchFailure("the secondary became UpToDate without any data sent")
        m.seconds = t1 - t0
        m.data_bytes = p["incr_bytes_sent"]
        m.wire_tx, m.wire_rx = tx1 - tx0, rx1 - rx0
    finally:
        _stop_lab(lab)
    progress(f"initial sync: {m.seconds:.2f} s; comparing the images")
    compare_images(lab.image["alpha"], lab.image["beta"])


_STATS_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def nbdkit_stats_write_bytes(statsfile: Path) -> int:
    """Bytes of NBD writes in an nbdkit stats filter file (``write: N ops, T s,
    8.00 MiB, ...``; nbdkit prints three significant digits). 0 when no
    write line is there (no writes)."""
    try:
        text = statsfile.read_text()
    except FileNotFoundError:
        raise BenchFailure(f"nbdkit's stats filter wrote no {statsfile}") from None
    for line in text.splitlines():
        if line.startswith("write:"):
            fields = [f.strip() for f in line.split(",")]
            value, _, unit = fields[2].partition(" ")
            if unit not in _STATS_UNITS:
                raise BenchFailure(f"{statsfile}: cannot read the write size in {line!r}")
            return round(float(value) * _STATS_UNITS[unit])
    return 0


def measure_nbdcopy(env: Env, o: argparse.Namespace, m: Measurement) -> None:
    """The baseline: nbdcopy of the whole primary image into the secondary's
    image served by nbdkit file in the secondary's namespace, over the veth."""
    src = env.workdir / "lab" / "alpha.img"
    dst = env.workdir / "lab" / "beta.img"
    for img in (src, dst):
        if not img.exists():
            raise BenchFailure(f"{img} does not exist (the scenario's setup failed)")
    pair = env.pair
    if not pair.link_is_up():
        pair.link_up()
    statsfile = env.workdir / "nbdkit-dst.stats"
    # The stats filter counts the bytes the destination received in NBD
    # writes: nbdcopy's "data sent", measured rather than assumed.
    server = start_nbdkit(env.procs, "file", [str(dst), f"statsfile={statsfile}"],
                          workdir=env.workdir / "nbdkit", filters=["stats"],
                          netns=pair.ns_b, tcp=(pair.addr_b, NBDCOPY_PORT),
                          name="nbdkit-dst")
    try:
        argv = ["nbdcopy", "--no-extents", "--sparse=0", "--flush", str(src),
                f"nbd://{pair.addr_b}:{NBDCOPY_PORT}/"]
        progress(f"nbdcopy of the whole {fmt_bytes(o.size)} device over the veth")
        tx0, rx0 = env.wire()
        t0 = time.monotonic()
        try:
            pair.run(pair.ns_a, argv, timeout=o.timeout)
        except Exception as e:
            raise BenchFailure(f"nbdcopy failed: {e}") from None
        t1 = time.monotonic()
        tx1, rx1 = env.wire()
    finally:
        server.stop()  # nbdkit writes the statsfile as it exits
    m.seconds = t1 - t0
    m.data_bytes = nbdkit_stats_write_bytes(statsfile)
    m.wire_tx, m.wire_rx = tx1 - tx0, rx1 - rx0
    progress(f"nbdcopy: {m.seconds:.2f} s")


def run_scenario(key: str, root: Path, o: argparse.Namespace) -> ScenarioResult:
    """One scenario in its own namespaces and scratch dir: Duplex, then nbdcopy."""
    if key == "catchup":
        title = f"catch-up after dirtying {o.dirty:g}% of a {fmt_bytes(o.size)} device"
        duplex = Measurement("Duplex catch-up (link up -> in sync)")
        measure: Callable[[Env, argparse.Namespace, Measurement], None] = measure_catchup
    else:
        title = f"initial sync of a {fmt_bytes(o.size)} device, {o.fill:g}% data"
        duplex = Measurement("Duplex initial sync (start -> UpToDate)")
        measure = measure_initial_sync
    res = ScenarioResult(key, title, duplex, Measurement("nbdcopy, whole device"))
    progress(f"{title}: setting up")
    try:
        with scenario_env(root, key) as env:
            for m, fn in ((duplex, measure), (res.baseline, measure_nbdcopy)):
                try:
                    fn(env, o, m)
                except Exception as e:
                    m.failed = str(e) or type(e).__name__
                    m.seconds = m.data_bytes = m.wire_tx = m.wire_rx = None
                    progress(f"{m.label}: FAILED: {m.failed}")
                    if not isinstance(e, BenchFailure):  # a bug here or in a fixture
                        traceback.print_exc(file=sys.stderr)
                    env.dump_logs()
    except Exception as e:  # the namespaces or scratch dir could not be made
        for m in (duplex, res.baseline):
            if m.failed is None and m.seconds is None:
                m.failed = f"setup failed: {e}"
        progress(f"{title}: setup failed: {e}")
    return res


# -- the report --------------------------------------------------------------

def _secs(s: float | None) -> str | None:
    return None if s is None else f"{s:.2f}"


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    short = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return short if len(short) <= limit else short[:limit - 3] + "..."


def build_table(results: Sequence[ScenarioResult], o: argparse.Namespace,
                where: str) -> Table:
    """One section per scenario: the Duplex row and its nbdcopy baseline."""
    t = Table("Catch-up and initial sync: Duplex vs nbdcopy of the whole device, one veth",
              ["scenario", ("seconds", ">"), ("data sent", ">"), ("wire bytes", ">"),
               ("time vs nbdcopy", ">"), ("wire vs nbdcopy", ">")])
    for r in results:
        t.add_section(r.title)
        base = r.baseline
        for m in (r.duplex, base):
            if m.failed is not None:
                t.add_row(f"{m.label}: FAILED", *([None] * (len(t.columns) - 1)))
                continue
            is_base = m is base
            t.add_row(m.label, _secs(m.seconds), fmt_bytes(m.data_bytes),
                      fmt_bytes(m.wire_bytes),
                      None if is_base else ratio(m.seconds, base.seconds),
                      None if is_base else ratio(m.wire_bytes, base.wire_bytes))
    t.add_note(where)
    t.add_note("wire bytes: both directions, counted on the primary's veth end "
               "(IFLA_STATS64) before and after; data sent: Duplex's incr_bytes_sent "
               "(no writes were streamed during these runs), nbdcopy: NBD write bytes "
               "the destination nbdkit's stats filter counted (3 digits)")
    t.add_note("nbdcopy --no-extents --sparse=0 --flush from the primary's namespace "
               "to nbdkit file on TCP in the secondary's: every byte crosses the link")
    t.add_note("ratios: the Duplex row over nbdcopy's in the same scenario; images "
               "compared byte for byte after each Duplex run")
    for r in results:
        for m in (r.duplex, r.baseline):
            for n in m.notes:
                t.add_note(f"{r.key}: {n}")
            if m.failed is not None:
                t.add_note(f"{r.key}: {m.label} FAILED: {_one_line(m.failed)}")
    return t


def measure_all(o: argparse.Namespace) -> tuple[list[ScenarioResult], str]:
    """Run the scenarios ``o`` selects; return their results and where the images were."""
    need = 2 * o.size + o.journal_size + (64 << 20)
    with _sigterm_as_interrupt():
        try:
            root, where = choose_scratch(o.scratch, need)
        except BenchFailure as e:
            progress(str(e))
            return [ScenarioResult(k, k, Measurement(f"Duplex {k}", failed=str(e)),
                                   Measurement("nbdcopy, whole device", failed=str(e)))
                    for k in o.scenario_keys], "no scratch space"
        progress(where)
        return [run_scenario(k, root, o) for k in o.scenario_keys], where


def run(argv: Sequence[str]) -> Table:
    """Measure the selected scenarios in this run; return the table."""
    o = parse_args(argv)
    started = time.monotonic()
    try:
        results, where = measure_all(o)
    except KeyboardInterrupt:
        progress("interrupted; the namespaces, processes and images of this run are removed")
        raise
    progress(f"done in {time.monotonic() - started:.0f} s")
    return build_table(results, o, where)


if __name__ == "__main__":
    print(run(sys.argv[1:]).render())

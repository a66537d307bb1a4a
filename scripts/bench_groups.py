"""``scripts/bench groups``: how far a consistency group's point trails the
writes, and what the group costs the writers (issue 13, DESIGN §13).

Two members on two primary hosts: the four-host lab of
``tests/fixtures/group_lab.py`` (r0 from alpha to beta, r1 from gamma to
delta, each host a network namespace, real nbdkit and TCP), r1's
replication link slowed by the delaying relay (``--delay-ms``, one way:
primary to secondary). fio's nbd engine writes both primaries' exports at
once, 4 KiB random writes at a fixed rate per export (``--rate``, iodepth
1; 200 and 500 per export by default, one section each): steady loads that
saturate neither link (at 500 per export the lab's own processes keep about
one of a 2-CPU machine's CPUs busy: the second rate shows what CPU
contention does to the tail). Three
configurations, each on a fresh lab, interleaved round by round so that a
noisy neighbour's burst does not land on one of them only:

  (u) the same two resources ungrouped (no ``[group.g0]``): the baseline;
  (k) grouped, mode ``checkpoint``;
  (t) grouped, mode ``limit-time``.

Measured per round:

- **exposure**: what a disaster now would lose, in time: now minus the
  time of the group's released point, as beta (the rendezvous master)
  persisted it in ``META-DIR/group.json`` before applying it, the point a
  promotion would land on. A thread of this process reads that file every
  2-8 ms (random, so as not to beat with the checkpoint interval): the
  daemons pay nothing for it. Samples of every round of a configuration
  are pooled: p50 / p99 / max. Another thread asks beta's control socket
  for ``status`` every 50-150 ms, in every configuration alike: the notes
  say what the master waited for, also while exposure was over 100 ms, and
  how often its view (what ``duplex status g0`` prints) named the same point.
- **write cost**: fio's completion latency (clat) p50 / p99 over both
  jobs (``--group_reporting`` merges their histograms), and the IOPS the
  two jobs reached; each the median of the rounds, and the ratio to the
  ungrouped median of this run.
- **CPU**: CPU seconds the two secondaries (``duplex up``) and the two
  primaries (``duplex up`` and its nbdkit) used during the fio run, median
  of the rounds.

Progress goes to stderr; ``run`` returns the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO / "tests"), str(REPO / "scripts"), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_table import Table, fmt_count, fmt_ns, ratio

CONFIGS = {"u": None, "k": "checkpoint", "t": "limit-time"}
LABELS = {"u": "(u) ungrouped (baseline)", "k": "(k) group, mode checkpoint",
          "t": "(t) group, mode limit-time"}
FILE_GAP_S = (0.002, 0.008)     # between reads of beta's group.json, uniform at random
STATUS_GAP_S = (0.05, 0.15)     # between control-socket status calls
FIRST_RELEASE_TIMEOUT = 30.0    # a grouped lab must release before fio starts
TARGET_NS = 100e6               # issue 13: exposure p99 under 100 ms


def progress(msg: str) -> None:
    """Progress for the person waiting, on stderr (stdout carries the table)."""
    print(f"bench groups: {msg}", file=sys.stderr, flush=True)


@dataclass
class Round:
    """One configuration's numbers in one round."""

    key: str
    exposure_ns: list[float] = field(default_factory=list)       # beta's released point
    view_lag_ns: list[float] = field(default_factory=list)       # the view's point older by
    samples_failed: int = 0
    status_samples: int = 0
    blocked: dict[str, int] = field(default_factory=dict)        # reason -> samples
    slow: dict[str, int] = field(default_factory=dict)           # the same, exposure > target
    window_s: float | None = None     # first to last counted sample
    iops: float | None = None
    clat_p50_ns: float | None = None
    clat_p99_ns: float | None = None
    cpu_secondaries: float | None = None
    cpu_primaries: float | None = None
    releases: int | None = None       # releases during the fio run (n moved by)
    load: float | None = None         # 1-minute load average when fio ended
    failed: str | None = None


class ExposureSampler:
    """Samples beta's group point between :meth:`count_from` and :meth:`stop`.

    Two threads. The file sampler reads beta's ``group.json`` (the release
    its gate persisted before applying it: the point a promotion now would
    land on) every 2-8 ms: a small file on tmpfs, read from this process,
    so the daemons pay nothing for it. The status sampler asks beta's
    control socket for ``status`` every 50-150 ms, for what the master says
    it waits for and how its view (what ``duplex status g0`` prints)
    compares; seldom, because every status call takes the daemon's time.

    Threads and locks: each thread appends to its own lists of the Round
    (and sets ``_latest``, one float read by the other thread: atomic in
    CPython); the bench thread reads them only after :meth:`stop` joined
    both. ``_counting`` and ``_stop`` are threading.Events."""

    def __init__(self, meta_dir: Path, into: Round) -> None:
        self.meta_dir, self.r = meta_dir, into
        self._stop = threading.Event()
        self._counting = threading.Event()
        self._threads = [threading.Thread(target=self._file_loop, name="exposure-file",
                                          daemon=True),
                         threading.Thread(target=self._status_loop, name="exposure-status",
                                          daemon=True)]
        self._latest: float | None = None  # the newest exposure sample
        self.first_n: int | None = None
        self.last_n: int | None = None
        self.first_at: float | None = None
        self.last_at: float | None = None

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def count_from(self) -> None:
        """Samples from now on count (fio's ramp is over)."""
        self._counting.set()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)

    def _file_loop(self) -> None:
        path = self.meta_dir / "group.json"
        rng = random.Random()
        while not self._stop.wait(rng.uniform(*FILE_GAP_S)):
            try:
                body = json.loads(path.read_bytes())  # replaced atomically (rename)
            except (OSError, ValueError):
                if self._counting.is_set():
                    self.r.samples_failed += 1
                continue
            # After the read: the point was persisted before this instant,
            # so the exposure is overstated by at most the read's time.
            now_ns = time.time_ns()
            if not self._counting.is_set() or not body.get("released_t"):
                continue
            exposure = now_ns - body["released_t"]
            self.r.exposure_ns.append(exposure)
            self._latest = exposure
            self.last_n, self.last_at = body.get("released_n"), time.monotonic()
            if self.first_n is None:
                self.first_n, self.first_at = self.last_n, self.last_at

    def _status_loop(self) -> None:
        from replicator.control import request
        rng = random.Random()
        while not self._stop.wait(rng.uniform(*STATUS_GAP_S)):
            try:
                st = request(self.meta_dir, "status", timeout=2)
            except Exception:  # noqa: BLE001 - a busy control socket must not end the run
                if self._counting.is_set():
                    self.r.samples_failed += 1
                continue
            if not self._counting.is_set():
                continue
            self.r.status_samples += 1
            g = st.get("group") or {}
            rel = g.get("released") or {}
            view = g.get("view") or {}
            vrel = view.get("released") or {}
            if vrel.get("t") and rel.get("t"):
                self.r.view_lag_ns.append(rel["t"] - vrel["t"])
            if view.get("blocked"):
                # "waiting for r1 to hold checkpoint 1796...": the number
                # differs every time; the reason is what counts.
                why = re.sub(r"\d{4,}", "N", str(view["blocked"]))
                self.r.blocked[why] = self.r.blocked.get(why, 0) + 1
                latest = self._latest
                if latest is not None and latest > TARGET_NS:
                    self.r.slow[why] = self.r.slow.get(why, 0) + 1


def _tree_cpu(pids: Sequence[int]) -> float:
    """CPU seconds of *pids* and their live descendants so far."""
    from bench_replication import descendants
    from fixtures.processes import cpu_seconds
    total = 0.0
    for pid in pids:
        for p in (pid, *(c for c, _ in descendants(pid))):
            total += cpu_seconds(p) or 0.0
    return total


def fio_argv(uris: Sequence[str], rate: int, options: argparse.Namespace,
             out: Path) -> list[str]:
    """One fio job per export, each at *rate* IOPS, iodepth 1, the two
    reported as one (their latency histograms merged)."""
    argv = ["fio", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--norandommap",
            "--randrepeat=0", "--iodepth=1", f"--rate_iops={rate}", "--time_based",
            f"--runtime={options.runtime:g}", f"--ramp_time={options.ramp:g}",
            "--group_reporting", "--output-format=json", f"--output={out}"]
    for i, uri in enumerate(uris):
        argv += [f"--name=group-bench-{i}", f"--uri={uri}"]
    return argv


def run_fio(uris: Sequence[str], rate: int, options: argparse.Namespace, out: Path) -> dict:
    """fio's merged job (``write`` holds the numbers)."""
    argv = fio_argv(uris, rate, options, out)
    try:
        res = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL,
                             timeout=options.runtime + options.ramp + 120, check=False)
    except FileNotFoundError as e:
        raise SystemExit("bench: fio is not installed (run scripts/setup)") from e
    if res.returncode != 0:
        raise RuntimeError(f"fio failed (exit {res.returncode}):\n"
                           f"{res.stderr.decode(errors='replace')[-2000:]}")
    text = out.read_text()
    report = json.loads(text[text.index("{"):])  # fio may print a line before the JSON
    job = report["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    return job


def measure(key: str, rate: int, options: argparse.Namespace, scratch: Path) -> Round:
    """One round of configuration *key* at *rate* writes per second per
    primary, on a fresh four-host lab."""
    from fixtures.group_lab import GroupLab
    from fixtures.processes import ProcessGroup

    r = Round(key)
    mode = CONFIGS[key]
    work = Path(tempfile.mkdtemp(prefix=f"groups-{key}-", dir=scratch))
    try:
        with ProcessGroup(work / "logs") as procs:
            lab = None
            try:
                lab = GroupLab.create(work / "lab", procs, mode=mode, size=options.size,
                                      interval=options.interval, delay_ms=options.delay_ms)
                lab.start_all()
                lab.wait_established()
                if mode is not None:
                    lab.wait(lambda: lab.released()[0] > 0, "the group's first release",
                             timeout=FIRST_RELEASE_TIMEOUT, proc=lab.up["beta"])
                sampler = ExposureSampler(lab.meta["beta"], r)
                sampler.start()
                secondaries = [lab.up[n].pid for n in ("beta", "delta")]
                primaries = [lab.up[n].pid for n in ("alpha", "gamma")]
                uris = [f"nbd+unix:///?socket={lab.sock[n]}" for n in ("alpha", "gamma")]
                progress(f"{LABELS[key]}: fio {options.runtime:g} s at {rate} IOPS "
                         f"per primary ...")
                timer = threading.Timer(options.ramp, sampler.count_from)
                timer.start()
                t0 = time.monotonic()
                cs0, cp0 = _tree_cpu(secondaries), _tree_cpu(primaries)
                try:
                    job = run_fio(uris, rate, options, work / "fio.json")
                finally:
                    timer.cancel()
                    sampler.stop()
                cs1, cp1 = _tree_cpu(secondaries), _tree_cpu(primaries)
                r.load = os.getloadavg()[0]  # the machine is shared: say how busy it was
                # CPU over the counted part only: fio's ramp is in t0..now too,
                # scale it to the measured runtime so rows compare.
                span = time.monotonic() - t0
                scale = options.runtime / span if span > 0 else 1.0
                r.cpu_secondaries = (cs1 - cs0) * scale
                r.cpu_primaries = (cp1 - cp0) * scale
                w = job["write"]
                r.iops = w["iops"]
                pct = w["clat_ns"].get("percentile", {})
                r.clat_p50_ns = pct.get("50.000000")
                r.clat_p99_ns = pct.get("99.000000")
                if sampler.first_n is not None and sampler.last_n is not None:
                    r.releases = sampler.last_n - sampler.first_n
                    r.window_s = sampler.last_at - sampler.first_at
                if mode is not None and not r.exposure_ns:
                    r.failed = ("no released point was read during the run "
                                f"(blocked: {r.blocked or 'not said'})")
            except Exception as e:  # noqa: BLE001 - a failed row; the other rounds still count
                r.failed = f"{type(e).__name__}: {e}"
                progress(f"{LABELS[key]}: FAILED: {r.failed}")
                for title, text in procs.logs(tail_bytes=2000):
                    print(f"--- {title} ---\n{text.rstrip()}", file=sys.stderr)
            finally:
                if lab is not None:
                    try:
                        lab.close()
                    except Exception as e:  # noqa: BLE001 - a failed round, the rest still run
                        r.failed = r.failed or f"teardown: {e}"
                        progress(f"{LABELS[key]}: teardown failed: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return r


def _pct(xs: Sequence[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def build_table(rounds: dict[int, dict[str, list[Round]]],
                options: argparse.Namespace) -> Table:
    """One section per write rate, one row per configuration; ratios
    against the ungrouped median at the same rate."""
    t = Table(f"Consistency groups: two members on two primary hosts, r1's link "
              f"+{options.delay_ms} ms",
              ["configuration", ("exp p50", ">"), ("exp p99", ">"), ("p99 mid rnd", ">"),
               ("exp max", ">"), ("write p50", ">"), ("write p99", ">"), ("IOPS", ">"),
               ("IOPS vs (u)", ">"), ("p50 vs (u)", ">"), ("p99 vs (u)", ">"),
               ("CPU sec", ">"), ("CPU pri", ">")])
    for rate, by_key in rounds.items():
        t.add_section(f"4 KiB random writes, {rate} IOPS on each primary, iodepth 1; "
                      f"checkpoint interval {options.interval}")
        med: dict[str, dict[str, float | None]] = {}
        for key, rs in by_key.items():
            ok = [r for r in rs if r.failed is None]
            med[key] = {"iops": _median([r.iops for r in ok]),
                        "p50": _median([r.clat_p50_ns for r in ok]),
                        "p99": _median([r.clat_p99_ns for r in ok]),
                        "cs": _median([r.cpu_secondaries for r in ok]),
                        "cp": _median([r.cpu_primaries for r in ok])}
        base = med.get("u", {})
        for key, rs in by_key.items():
            ok = [r for r in rs if r.failed is None]
            if not ok:
                t.add_row(f"{LABELS[key]}: FAILED", *([None] * (len(t.columns) - 1)))
                continue
            exp = [x for r in ok for x in r.exposure_ns]
            m = med[key]
            grouped = key != "u"
            t.add_row(LABELS[key],
                      fmt_ns(_pct(exp, 0.50)) if grouped else None,
                      fmt_ns(_pct(exp, 0.99)) if grouped else None,
                      fmt_ns(_median([_pct(r.exposure_ns, 0.99) for r in ok]))
                      if grouped else None,
                      fmt_ns(max(exp)) if grouped and exp else None,
                      fmt_ns(m["p50"]), fmt_ns(m["p99"]), fmt_count(m["iops"]),
                      ratio(m["iops"], base.get("iops")) if grouped else None,
                      ratio(m["p50"], base.get("p50")) if grouped else None,
                      ratio(m["p99"], base.get("p99")) if grouped else None,
                      f"{m['cs']:.2f}" if m["cs"] is not None else None,
                      f"{m['cp']:.2f}" if m["cp"] is not None else None)
    t.add_note(f"four network namespaces, r0 alpha -> beta, r1 gamma -> delta through a relay "
               f"delaying primary-to-secondary bytes by {options.delay_ms} ms; fio --ioengine=nbd "
               f"on both primaries' exports at once, {options.runtime:g} s after "
               f"{options.ramp:g} s ramp, images {options.size >> 20} MiB on /dev/shm")
    t.add_note("exp: exposure = now - the group's released point, as beta (the rendezvous "
               "master) persisted it in META-DIR/group.json (read every 2-8 ms), samples of "
               "every round pooled; p99 mid rnd: the median of the rounds' own p99s (one "
               "round hit by a neighbour's burst moves it less); target: exp p99 < 100 ms")
    t.add_note("write p50/p99: fio completion latency of both jobs merged; IOPS: both jobs; "
               "each the median of the rounds; vs (u): over the ungrouped median at the same "
               "rate in this run (target: within 5%)")
    t.add_note(f"CPU sec / CPU pri: CPU seconds of the two secondaries' `duplex up` / the two "
               f"primaries' `duplex up` and nbdkit over the {options.runtime:g} s run, median "
               f"({os.cpu_count()} CPUs, shared with fio and the relay)")
    t.add_note(f"{options.repeat} round(s), configurations (and rates) interleaved, a fresh lab "
               "each")
    for rate, by_key in rounds.items():
        for key, rs in by_key.items():
            if key != "u":
                _mode_notes(t, f"({key}" + (f" @{rate})" if len(rounds) > 1 else ")"), key,
                            rs, options)
    loads = [r.load for by_key in rounds.values() for rs in by_key.values() for r in rs
             if r.load is not None]
    if loads:
        t.add_note(f"1-minute load average at the end of each run: {min(loads):.1f} to "
                   f"{max(loads):.1f} (this run's own processes count in it too)")
    for rate, by_key in rounds.items():
        for key, rs in by_key.items():
            tag = f"({key}" + (f" @{rate})" if len(rounds) > 1 else ")")
            if options.repeat > 1:
                t.add_note(f"  {tag} per round: IOPS "
                           + ", ".join(fmt_count(r.iops) or "-" for r in rs)
                           + "; write p99 " + ", ".join(fmt_ns(r.clat_p99_ns) or "-" for r in rs)
                           + ("; exposure p99 " + ", ".join(
                               fmt_ns(_pct(r.exposure_ns, 0.99)) or "-" for r in rs)
                              if key != "u" else ""))
            for r in rs:
                if r.failed is not None:
                    t.add_note(f"{tag} a round FAILED: {r.failed.splitlines()[0][:300]}")
    return t


def _mode_notes(t: Table, tag: str, key: str, rs: Sequence[Round],
                options: argparse.Namespace) -> None:
    """What the samples of one grouped configuration say beyond the row."""
    rel = [(r.releases, r.window_s) for r in rs if r.releases and r.window_s]
    n_exp = sum(len(r.exposure_ns) for r in rs)
    t.add_note(f"{tag} {n_exp} exposure samples; "
               + ("checkpoints released through" if key == "k" else "releases of L")
               + " per second: " + (", ".join(f"{n / w:.0f}" for n, w in rel) or "-")
               + (f" (a checkpoint every {options.interval})" if key == "k" else ""))
    lag = [x for r in rs for x in r.view_lag_ns]
    if lag:
        same = sum(1 for x in lag if x == 0) / len(lag)
        t.add_note(f"{tag} the master's view (what `duplex status g0` prints) named "
                   f"beta's point in {same:.0%} of the samples"
                   + ("" if same == 1 else f"; else older by up to {fmt_ns(max(0, max(lag)))}"
                      f", newer by up to {fmt_ns(max(0, -min(lag)))}"))
    blocked: dict[str, int] = {}
    slow: dict[str, int] = {}
    for r in rs:
        for why, c in r.blocked.items():
            blocked[why] = blocked.get(why, 0) + c
        for why, c in r.slow.items():
            slow[why] = slow.get(why, 0) + c
    if blocked:
        total = sum(r.status_samples for r in rs) or 1
        t.add_note(f"{tag} what the master's view said it waited for (share of the samples): "
                   + "; ".join(f"{why} {c / total:.0%}" for why, c in
                               sorted(blocked.items(), key=lambda kv: -kv[1])))
    over = sum(1 for r in rs for x in r.exposure_ns if x > TARGET_NS)
    if over:
        t.add_note(f"{tag} {over / max(1, n_exp):.1%} of the exposure samples over "
                   f"{TARGET_NS / 1e6:.0f} ms; status samples taken then: "
                   + ("; ".join(f"{why} ({c})" for why, c in sorted(
                       slow.items(), key=lambda kv: -kv[1]))
                      or "none blocked (a release was being applied)"))
    failed = sum(r.samples_failed for r in rs)
    if failed:
        t.add_note(f"{tag} {failed} samples failed (group.json unreadable, or the control "
                   "socket busy)")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options of ``scripts/bench groups``."""
    p = argparse.ArgumentParser(prog="scripts/bench groups",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", type=float, default=10.0,
                   help="seconds of fio per configuration and round (default 10)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds, the configurations interleaved (default 3)")
    p.add_argument("--delay-ms", type=int, default=20,
                   help="delay of r1's link, primary to secondary, in ms (default 20)")
    p.add_argument("--rate", default="200,500",
                   help="4 KiB writes per second on each primary; several, comma-separated, "
                        "make one section each (default 200,500)")
    p.add_argument("--interval", default="20ms",
                   help="the group's checkpoint-interval (default 20ms)")
    p.add_argument("--ramp", type=float, default=1.0,
                   help="seconds of fio warm-up not counted (default 1)")
    p.add_argument("--size-mib", type=int, default=64,
                   help="each image's size in MiB (default 64)")
    p.add_argument("--configs", default="u,k,t",
                   help="comma-separated subset of u (ungrouped), k (checkpoint), "
                        "t (limit-time); default all")
    opts = p.parse_args(list(argv))
    if opts.runtime <= 0 or opts.ramp < 0:
        p.error("--runtime must be > 0 and --ramp >= 0")
    if not 1 <= opts.repeat <= 20:
        p.error("--repeat must be between 1 and 20")
    if opts.delay_ms < 1:
        p.error("--delay-ms must be at least 1 (the bench is about a slowed link)")
    try:
        opts.rates = [int(x) for x in opts.rate.split(",") if x.strip()]
    except ValueError:
        p.error(f"--rate: expected numbers of writes per second, e.g. 200,500 (got {opts.rate!r})")
    if not opts.rates or min(opts.rates) < 1:
        p.error("--rate: each rate must be at least 1")
    opts.size = opts.size_mib << 20
    opts.keys = [k.strip() for k in opts.configs.split(",") if k.strip()]
    for k in opts.keys:
        if k not in CONFIGS:
            p.error(f"--configs: unknown configuration {k!r} (expected u, k, t)")
    return opts


def run(argv: Sequence[str]) -> Table:
    """Every configuration, --repeat rounds interleaved; the table."""
    options = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench groups: needs root (network namespaces): run it as root")
    started = time.monotonic()
    rounds: dict[int, dict[str, list[Round]]] = {
        rate: {k: [] for k in options.keys} for rate in options.rates}
    from fixtures.images import shm_directory
    # Images and journals on tmpfs, as the other benchmarks: the numbers
    # are the replicator's, not this machine's disk.
    with shm_directory("dpx-bench-groups-") as scratch:
        for i in range(options.repeat):
            progress(f"round {i + 1} of {options.repeat}")
            runs = [(rate, key) for rate in options.rates for key in options.keys]
            for rate, key in runs if i % 2 == 0 else reversed(runs):
                rounds[rate][key].append(measure(key, rate, options, scratch))
    progress(f"done in {time.monotonic() - started:.0f} s")
    return build_table(rounds, options)


if __name__ == "__main__":
    print(run(sys.argv[1:]).render())

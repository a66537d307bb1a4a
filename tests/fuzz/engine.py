"""Run the targets of tests/fuzz/targets.py under atheris (libFuzzer for
Python: coverage-guided, it keeps inputs that reach new code and mutates
those).

One target runs in one child process (``python engine.py worker NAME ...``):
libFuzzer owns that process and ends it with exit(), and a hang or an
allocation past the memory limit kills it. The child does not stop at the
first crash: :func:`targets.check` classifies every case, and each new
crash signature is written once to ``crashes/`` (the input) and to
``crashes.jsonl`` (signature, message, traceback). A child that libFuzzer
itself kills (timeout, out of memory, a signal in C code) leaves its
``timeout-``/``oom-``/``crash-`` artifact; :func:`fuzz` records that as a
crash too and starts the child again for the time left, on the same corpus.

The corpus of each target lives in ``<workdir>/<target>/corpus`` and grows
across runs; the seeds are written afresh to a second, read-only corpus
directory each run.

Threads and locks: none; the children run one after another.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

TIMEOUT_S = 10         # one case longer than this is a hang
RSS_LIMIT_MB = 2048    # a case growing the process past this is a huge allocation
AS_LIMIT = 3 << 30     # address space: a single huge allocation fails as MemoryError


@dataclass
class Result:
    """What one target's run found."""

    target: str
    seconds: float = 0.0
    cases: int = 0
    cov_start: int | None = None
    cov_end: int | None = None
    corpus: int | None = None
    crashes: dict[str, dict] = field(default_factory=dict)  # signature -> record
    restarts: int = 0

    @property
    def new_coverage(self) -> int | None:
        """Coverage edges the run added beyond its starting corpus."""
        if self.cov_start is None or self.cov_end is None:
            return None
        return self.cov_end - self.cov_start

    @property
    def rate(self) -> float:
        """Cases per second."""
        return self.cases / self.seconds if self.seconds else 0.0


def _shm() -> str | None:
    """/dev/shm when it is there and writable (the children's scratch files)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _write_seeds(target, seed_dir: Path) -> int:
    seed_dir.mkdir(parents=True, exist_ok=True)
    seeds = target.seeds()
    for s in seeds:
        (seed_dir / f"seed-{hashlib.sha1(s).hexdigest()[:16]}").write_bytes(s)
    return len(seeds)


_STATUS = re.compile(r"^#(\d+)\s+(INITED|NEW|REDUCE|pulse|DONE|RELOAD)\b.*?cov: (\d+)"
                     r"(?:.*?corp: (\d+))?")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_DEATH = re.compile(r"==\d+== ERROR: libFuzzer: (\S+)|ALARM: working on the last Unit|"
                    r"out-of-memory|deadly signal")


def _parse_log(text: str, res: Result) -> tuple[int, str | None, str | None]:
    """Fold one child's libFuzzer log into *res*; (cases, artifact, death reason)."""
    cases = 0
    artifact = death = None
    for line in text.splitlines():
        if mo := _STATUS.match(line):
            cov = int(mo.group(3))
            if mo.group(2) == "INITED" and res.cov_start is None:
                res.cov_start = cov
            res.cov_end = cov
            cases = max(cases, int(mo.group(1)))
            if mo.group(4):
                res.corpus = int(mo.group(4))
        elif mo := _DONE.match(line):
            cases = max(cases, int(mo.group(1)))
        elif mo := _EXECUTED.match(line):
            cases = max(cases, int(mo.group(1)))
        elif mo := _ARTIFACT.search(line):
            artifact = mo.group(1)
        elif mo := _DEATH.search(line):
            # libFuzzer's ERROR line names the death best; the others stand in
            if mo.group(1) or death is None:
                death = mo.group(1) or mo.group(0)
    return cases, artifact, death


def fuzz(name: str, seconds: float, workdir: Path, runs: int | None = None,
         verbose: bool = False) -> Result:
    """Fuzz target *name* for *seconds* (or *runs* cases) in *workdir*."""
    sys.path.insert(0, str(HERE.parent))
    from fuzz.targets import TARGETS  # noqa: E402 - after the path
    target = TARGETS[name]
    base = workdir / name
    corpus = base / "corpus"
    crash_dir = base / "crashes"
    for d in (corpus, crash_dir):
        d.mkdir(parents=True, exist_ok=True)
    jsonl = base / "crashes.jsonl"
    res = Result(name)
    start_lines = len(_read_jsonl(jsonl))
    with tempfile.TemporaryDirectory(prefix=f"duplex-fuzz-seeds-{name}-") as seed_dir:
        _write_seeds(target, Path(seed_dir))
        dict_file = base / "dictionary"
        if target.dictionary:
            dict_file.write_text("".join(f'"{_dict_escape(tok)}"\n' for tok in target.dictionary))
        t0 = time.monotonic()
        while True:
            left = seconds - (time.monotonic() - t0)
            if runs is None and left < 1:
                break
            argv = [sys.executable, str(HERE / "engine.py"), "worker", name, str(crash_dir),
                    str(jsonl), str(corpus), seed_dir, f"-max_len={target.max_len}",
                    f"-timeout={TIMEOUT_S}", f"-rss_limit_mb={RSS_LIMIT_MB}",
                    f"-artifact_prefix={crash_dir}/", "-print_final_stats=1",
                    "-reload=0"]
            if target.dictionary:
                argv.append(f"-dict={dict_file}")
            argv.append(f"-runs={runs}" if runs is not None else f"-max_total_time={max(1, int(left))}")
            scratch = tempfile.mkdtemp(prefix=f"duplex-fuzz-{name}-", dir=_shm())
            try:
                proc = subprocess.run(argv, cwd=str(REPO), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace",
                                      env={**os.environ, "DUPLEX_FUZZ_SCRATCH": scratch})
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if verbose:
                sys.stderr.write(proc.stdout)
            cases, artifact, death = _parse_log(proc.stdout, res)
            res.cases += cases
            if proc.returncode != 0 and (death or artifact):
                sig = f"libFuzzer: {death or 'crash'} in target {name}"
                rec = {"signature": sig, "kind": death or "crash", "input": artifact,
                       "message": proc.stdout[-2000:], "traceback": ""}
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                res.restarts += 1
            elif proc.returncode != 0:
                raise RuntimeError(f"fuzz worker for {name} failed (exit {proc.returncode}):\n"
                                   + proc.stdout[-3000:])
            if runs is not None:
                break
        res.seconds = time.monotonic() - t0
    found = _read_jsonl(jsonl)
    for rec in found[start_lines:]:
        res.crashes.setdefault(rec["signature"], rec)
    return res


def _dict_escape(tok: bytes) -> str:
    """A token as a libFuzzer dictionary string: \\xNN for anything but
    printable ASCII, backslash and quote escaped."""
    return "".join(chr(b) if 32 <= b < 127 and b not in (0x22, 0x5C) else f"\\x{b:02x}"
                   for b in tok)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# -- the child ----------------------------------------------------------------

_EDGES = 256
# numbers, hex and UUIDs (runs of hex digits and dashes; a word made of
# hex letters goes too, the same way every time)
_NUMBERS = re.compile(r"0x[0-9a-fA-F]+|[0-9a-fA-F][0-9a-fA-F-]{3,}|\d+")


def _outcome_edges(atheris):
    """One instrumented function per outcome bucket: calling it for bucket
    *k* covers one edge that no other bucket covers."""
    scope: dict = {}
    exec("\n".join(f"def e{i}():\n    return {i}" for i in range(_EDGES)), scope)  # noqa: S102
    funcs = [atheris.instrument_func(scope[f"e{i}"]) for i in range(_EDGES)]
    return lambda k: funcs[k]()


def _worker(argv: list[str]) -> None:
    """``worker NAME CRASH_DIR JSONL [libFuzzer args...]``: run under atheris."""
    import logging
    import resource

    name, crash_dir, jsonl = argv[0], Path(argv[1]), Path(argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > AS_LIMIT:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, hard))
    logging.disable(logging.CRITICAL)  # the code under test warns on odd files

    import atheris
    sys.path.insert(0, str(HERE.parent))
    with atheris.instrument_imports(include=["replicator", "tomllib", "json"]):
        import replicator.config  # noqa: F401 - instrumented before targets imports them
        import replicator.metadata  # noqa: F401
        import replicator.oosfiles  # noqa: F401
        import replicator.protocol.connection  # noqa: F401
        import replicator.records  # noqa: F401
        import replicator.secondary.journal  # noqa: F401
        import tomllib  # noqa: F401
    from fuzz.targets import TARGETS, check

    target = TARGETS[name]
    edge = _outcome_edges(atheris)

    def outcome(exc: BaseException) -> None:
        # Which check refused the input, as coverage: the C parsers (bitmap,
        # activity log, record scan) are not instrumented, so without this
        # the fuzzer could not tell an input that passed the magic from one
        # that passed the checksum. Numbers and paths are dropped so that
        # only the kind of refusal counts.
        text = _NUMBERS.sub("", f"{type(exc).__name__}: {exc}".replace(scratch, ""))
        edge(zlib.crc32(text.encode("utf-8", "replace")) % _EDGES)

    from fuzz.targets import scratch_dir
    scratch = str(scratch_dir())
    seen: set[str] = set()  # per run: a crash seen before is reported again

    def one_input(data: bytes) -> None:
        crash = check(target, data, on_expected=outcome)
        if crash is None or crash.signature in seen:
            return
        seen.add(crash.signature)
        digest = hashlib.sha1(data).hexdigest()[:16]
        path = crash_dir / f"crash-{digest}"
        path.write_bytes(data)
        with open(jsonl, "a") as f:
            f.write(json.dumps({"signature": crash.signature, "kind": crash.kind,
                                "input": str(path), "message": crash.message,
                                "traceback": crash.traceback}) + "\n")
        sys.stderr.write(f"NEW CRASH {crash.signature}: {crash.message}\n")

    atheris.Setup([sys.argv[0], *argv[3:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        _worker(sys.argv[2:])
    else:
        sys.exit("engine.py is run by scripts/fuzz (worker NAME ...)")

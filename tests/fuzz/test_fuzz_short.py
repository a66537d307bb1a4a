"""A short coverage-guided fuzz of every target (atheris, about a second
each), the seed corpus checked case by case, and the crash classification
itself. The long run is ``scripts/fuzz``; the targets and their contracts
are tests/fuzz/targets.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fuzz import engine
from fuzz.targets import TARGETS, Crash, Target, check

# Cases per target: about half a second at each target's rate on one core
# (each run also pays a second of start-up: imports, instrumentation).
RUNS = {"connection": 300, "journal": 800, "config": 1000, "oosfiles": 1000,
        "frames": 1500, "bitmap": 1500, "actlog": 1500, "group": 1500}
DEFAULT_RUNS = 3000


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_keeps_the_contract(name: str):
    seeds = TARGETS[name].seeds()
    assert seeds, f"target {name} has no seeds"
    crashes = {s[:40]: c for s in seeds if (c := check(TARGETS[name], s)) is not None}
    assert not crashes, "\n".join(c.traceback for c in crashes.values())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_short_fuzz_run_finds_no_crash(name: str, tmp_path: Path):
    runs = RUNS.get(name, DEFAULT_RUNS)
    r = engine.fuzz(name, seconds=60, workdir=tmp_path, runs=runs)
    assert not r.crashes, "\n\n".join(f"{sig}\n{rec['traceback'] or rec['message']}"
                                      for sig, rec in r.crashes.items())
    assert r.cases >= runs, f"{name}: only {r.cases} of {runs} cases ran"
    assert r.cov_end and r.cov_end > 0, f"{name}: the run reported no coverage (not instrumented?)"


def _boom(data: bytes) -> None:
    if data == b"key":
        {}["missing"]
    if data == b"value":
        raise ValueError("the documented error")
    if data == b"leak":
        _leaked.append(os.open("/dev/null", os.O_RDONLY))  # the leak is the test


_leaked: list[int] = []


class _Subclass(ValueError):
    pass


def _forbidden(data: bytes) -> None:
    raise _Subclass("an expected class, but a bug")


def test_check_tells_a_crash_from_the_documented_error():
    t = Target("t", _boom, (ValueError,), lambda: [])
    assert check(t, b"value") is None
    assert check(t, b"fine") is None
    crash = check(t, b"key")
    assert isinstance(crash, Crash) and crash.kind == "KeyError"
    assert crash.signature.startswith("KeyError at tests/fuzz/test_fuzz_short.py:")
    assert "_boom" in crash.signature


def test_check_counts_a_forbidden_subclass_and_a_leaked_fd_as_crashes():
    assert check(Target("t", _forbidden, (ValueError,), lambda: [],
                        forbidden=(_Subclass,)), b"").kind == "_Subclass"
    try:
        crash = check(Target("t", _boom, (ValueError,), lambda: []), b"leak")
    finally:
        while _leaked:
            os.close(_leaked.pop())
    assert crash is not None and crash.kind == "FdLeak"


_LOG = """\
INFO: Seed: 1234
#438	INITED cov: 694 ft: 1533 corp: 346/83Kb exec/s: 0 rss: 53Mb
#2020	NEW    cov: 699 ft: 1540 corp: 347/83Kb lim: 673 exec/s: 0 rss: 53Mb L: 340/664 MS: 2
#9000	pulse  cov: 701 ft: 1544 corp: 348/84Kb lim: 673 exec/s: 3000 rss: 60Mb
ALARM: working on the last Unit for 11 seconds
==4242== ERROR: libFuzzer: timeout after 11 seconds
MS: 1 ChangeBit-; base unit: 0123
artifact_prefix='/w/crashes/'; Test unit written to /w/crashes/timeout-abcdef
stat::number_of_executed_units: 9123
"""


def test_a_libfuzzer_log_gives_cases_coverage_and_the_death():
    r = engine.Result("t")
    cases, artifact, death = engine._parse_log(_LOG, r)
    assert (cases, r.cov_start, r.cov_end, r.new_coverage, r.corpus) == (9123, 694, 701, 7, 348)
    assert artifact == "/w/crashes/timeout-abcdef"
    assert death == "timeout"

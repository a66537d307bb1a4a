"""The C core under many threads, built with ThreadSanitizer and with
AddressSanitizer + UndefinedBehaviorSanitizer: stress_core.c hammers one
core (producers, a consumer that rewinds, releases and resumes, a thread
that fences, syncs, swaps the CR bitmap and drops the ring) and checks
record order, CRCs and pending counts; the sanitizers check the memory
model and memory safety underneath."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"
HARNESS = Path(__file__).with_name("stress_core.c")
SOURCES = sorted(NATIVE.glob("*.c"))  # every module the core links with
SECONDS = "3"

SANITIZERS = {
    "thread": (["-fsanitize=thread"], {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"}),
    "address+undefined": (["-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
                          {"ASAN_OPTIONS": "detect_leaks=1 exitcode=66"}),
}


@pytest.mark.slow  # builds and runs a sanitizer harness: 15 s
@pytest.mark.parametrize("sanitizer", list(SANITIZERS))
def test_core_survives_concurrent_use_under_sanitizer(sanitizer, tmp_path, shm_dir):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler is needed to build the stress harness"
    flags, env = SANITIZERS[sanitizer]
    exe = tmp_path / "stress"
    build = subprocess.run(
        [cc, "-std=c11", "-g", "-O1", "-pthread", "-D_GNU_SOURCE", "-Wall", "-Wextra",
         "-Werror", *flags, f"-I{NATIVE}", str(HARNESS), *map(str, SOURCES), "-o", str(exe)],
        capture_output=True, text=True, timeout=180)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe), str(shm_dir), SECONDS], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **env})
    report = run.stderr[-6000:]
    assert run.returncode == 0, f"exit {run.returncode}:\n{report}"
    assert "Sanitizer" not in run.stderr and "FAIL" not in run.stderr, report
    assert " writes, " in run.stderr, report

"""Crash safety of the bitmaps (DESIGN §5): after a SIGKILL at any moment,
the on-disk OOS bitmap plus the activity log's extents cover every track
whose content changed -- and the activity log is really needed for that."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
from pathlib import Path

import pytest

from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap

CHILD = Path(__file__).with_name("crash_writer.py")
TRACK = 4096
SIZE = 16 << 20
EXTENT = 64 << 10
SLOTS = 4
ITERATIONS = 40


def set_bits(bm: Bitmap) -> set[int]:
    return {i for off, n in bm.runs() for i in range(off // TRACK, (off + n) // TRACK)}


def run_and_kill(d: Path, seed: int, delay: float) -> None:
    child = subprocess.Popen([sys.executable, str(CHILD), str(d), str(seed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = child.stdout.readline()
        assert line == b"ready\n", f"writer did not start: {child.stderr.read().decode()}"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


@pytest.mark.slow  # SIGKILLs a writer process over and over: 9 s
def test_bitmap_plus_activity_log_cover_every_changed_track_after_sigkill(shm_dir):
    rng = random.Random(2024)
    load_bearing = 0
    changed_total = 0
    for it in range(ITERATIONS):
        d = shm_dir / f"run{it}"
        d.mkdir()
        original = rng.randbytes(SIZE)
        (d / "device.img").write_bytes(original)
        uuid = uuid_mod.uuid4().bytes
        (d / "uuid").write_text(uuid.hex())
        Bitmap.create(str(d / "oos.bm"), uuid, TRACK, SIZE // TRACK).close()
        ActivityLog.create(str(d / "al"), uuid, EXTENT, SLOTS).close()

        run_and_kill(d, seed=it, delay=rng.uniform(0.002, 0.1))

        now = (d / "device.img").read_bytes()
        changed = {t for t in range(SIZE // TRACK)
                   if now[t * TRACK:(t + 1) * TRACK] != original[t * TRACK:(t + 1) * TRACK]}
        bm = Bitmap.open(str(d / "oos.bm"), uuid, TRACK)
        al = ActivityLog.open(str(d / "al"), uuid)
        try:
            assert bm.was_dirty, f"run {it}: a killed writer must leave the bitmap dirty"
            on_disk = set_bits(bm)
            al.recover_into(bm)
            recovered = set_bits(bm)
        finally:
            bm.close()
            al.close()
        missing = changed - recovered
        assert not missing, (f"run {it}: {len(missing)} changed tracks are in neither the "
                             f"bitmap nor the activity log, e.g. {sorted(missing)[:8]}")
        changed_total += len(changed)
        if changed - on_disk:
            load_bearing += 1
    print(f"{load_bearing} of {ITERATIONS} runs needed the activity log; {changed_total} tracks changed")
    assert changed_total > ITERATIONS * 10, "the writers must have changed something"
    assert load_bearing > 0, ("the on-disk bitmap alone always sufficed: the test does not "
                              "show that the activity log is needed")

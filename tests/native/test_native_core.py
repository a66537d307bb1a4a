"""The primary's write path: ordering, replay, trims and zeros, errors."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest

from replicator import records
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core, CoreError
from replicator.records import OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO


def drain(core: Core) -> bytes:
    """Everything the ring holds, from the send cursor on, as one buffer."""
    out = bytearray()
    while True:
        span = core.peek(1 << 30)
        if not span:
            return bytes(out)
        out += span
        core.advance(len(span))


def replay(image: bytearray, packed: bytes) -> list[int]:
    """Apply records in the order given; return their seqs."""
    seqs = []
    for tok, data in records.iter_records(packed):
        seqs.append(tok.seq)
        if tok.op == OP_WRITE:
            image[tok.offset:tok.offset + tok.length] = data
        elif tok.op in (OP_TRIM, OP_ZERO):
            image[tok.offset:tok.offset + tok.length] = bytes(tok.length)
    return seqs


def test_concurrent_writes_replayed_in_seq_order_give_the_final_image(make_rig):
    rig = make_rig(size=1 << 20, history=True)
    per_thread = 250

    def worker(k: int):
        rng = random.Random(k)
        for _ in range(per_thread):
            # Half the ops in one hot 64 KiB area (overlaps), half anywhere.
            base, span = (0, 64 << 10) if rng.random() < 0.5 else (0, rig.size)
            length = rng.randint(1, 12 << 10)
            off = base + rng.randint(0, span - length)
            roll = rng.random()
            if roll < 0.08:
                rig.core.trim(off, length)
            elif roll < 0.16:
                rig.core.zero(off, length)
            else:
                rig.core.write(rng.randbytes(length), off, fua=roll > 0.97)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    final = rig.device_bytes()
    image = bytearray(rig.original)
    seqs = replay(image, drain(rig.core))
    assert seqs == list(range(1, 4 * per_thread + 1)), "seqs must be unique and contiguous"
    assert image == final, "replaying the ring in seq order must give the device's content"

    image = bytearray(rig.original)
    hist_seqs = replay(image, (rig.dir / "history").read_bytes())
    assert hist_seqs == seqs
    assert image == final
    assert rig.core.next_seq == 4 * per_thread + 1


def test_a_write_issued_after_another_returned_has_the_larger_seq(make_rig):
    rig = make_rig(size=1 << 20)
    log: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def worker(k: int):
        rng = random.Random(100 + k)
        mine = []
        for _ in range(400):
            off = rng.randrange(0, rig.size - 4096)
            start = time.monotonic_ns()
            res = rig.core.write(b"z" * rng.randint(1, 4096), off)
            mine.append((start, time.monotonic_ns(), res.seq))
        with lock:
            log.extend(mine)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    by_end = sorted(log, key=lambda r: r[1])
    max_seq_ended = -1
    j = 0
    for start, _end, seq in sorted(log):
        while j < len(by_end) and by_end[j][1] < start:
            max_seq_ended = max(max_seq_ended, by_end[j][2])
            j += 1
        assert seq > max_seq_ended, (
            f"write with seq {seq} started after a write with seq {max_seq_ended} returned")


def test_records_carry_what_was_asked(make_rig):
    rig = make_rig()
    c = rig.core
    # One volume here: records of other volumes are in test_native_volumes.py.
    w = c.write(b"abc", 4095, fua=True, volume=0)
    t = c.trim(8192, 5000)
    z = c.zero(0, 10, volume=0)
    f = c.flush()
    assert [w.seq, t.seq, z.seq, f.seq] == [1, 2, 3, 4]
    toks = [tok for tok, _ in records.iter_records(drain(c))]
    assert [(x.op, x.offset, x.length, x.data_len, x.volume, x.flags) for x in toks] == [
        (OP_WRITE, 4095, 3, 3, 0, records.FLAG_FUA),
        (OP_TRIM, 8192, 5000, 0, 0, 0),
        (OP_ZERO, 0, 10, 0, 0, 0),
        (OP_FLUSH, 0, 0, 0, 0, 0),
    ]
    now = time.time_ns()
    assert all(now - 10**10 < x.ts_ns <= now for x in toks)
    assert [x.ts_ns for x in toks] == sorted(x.ts_ns for x in toks)


def test_trim_and_zero_leave_zeros_and_mark_tracks(make_rig):
    rig = make_rig(size=1 << 20)
    c = rig.core
    c.trim(4096 * 3 + 7, 20_000)
    c.zero(500_000, 3)
    data = rig.device_bytes()
    assert data[4096 * 3 + 7:4096 * 3 + 7 + 20_000] == bytes(20_000)
    assert data[500_000:500_003] == bytes(3)
    assert data[:4096 * 3 + 7] == rig.original[:4096 * 3 + 7]
    assert data[500_003:] == rig.original[500_003:]
    assert rig.oos.test_range(4096 * 3 + 7, 20_000)
    assert rig.oos.test_bit(500_000 // 4096)
    assert rig.oos.count() == 5 + 1  # tracks 3..7, and 122
    assert c.pread(3, 500_000) == bytes(3)


def test_whole_device_trim_beyond_the_activity_log_syncs_the_bitmap_first(make_rig):
    rig = make_rig(size=4 << 20, extent_size=64 << 10, slots=4)
    before = rig.oos.sync_count
    res = rig.core.trim(0, rig.size)
    assert res.queued
    assert rig.core.stats["large_ranges"] == 1
    assert rig.oos.sync_count > before
    assert rig.oos.count() == rig.size // 4096
    assert rig.device_bytes() == bytes(rig.size)


def test_range_outside_the_device_is_refused(make_rig):
    rig = make_rig(size=1 << 20)
    with pytest.raises(ValueError, match="outside the device"):
        rig.core.write(b"x" * 10, rig.size - 5)
    with pytest.raises(ValueError, match="outside the device"):
        rig.core.trim(0, 0)
    assert rig.core.next_seq == 1, "a refused request takes no seq"


def test_pread_locked_reads_what_was_written(make_rig):
    rig = make_rig()
    rig.core.write(b"hello", 1000)
    assert rig.core.pread(5, 1000, locked=True) == b"hello"
    buf = bytearray(7)
    assert rig.core.pread_into(buf, 999) == 7
    assert bytes(buf) == rig.original[999:1000] + b"hello" + rig.original[1005:1006]


def test_writes_mark_the_cr_bitmap_while_it_is_set(make_rig, res_uuid):
    rig = make_rig(size=1 << 20)
    cr = Bitmap.create(None, res_uuid, 4096, rig.oos.nbits)
    with rig.core.fence():  # the freeze: an exact cut between requests
        frozen = rig.oos.copy()
        rig.core.set_cr(cr)
    rig.core.write(b"x", 4096 * 9)
    rig.core.set_cr(None)
    rig.core.write(b"x", 4096 * 11)
    assert [i for i in range(cr.nbits) if cr.test_bit(i)] == [9]
    assert rig.oos.test_bit(9) and rig.oos.test_bit(11)
    assert frozen.count() == 0
    frozen.close()
    with pytest.raises(CoreError, match="still used"):
        rig.oos.close()
    cr.close()


def test_fence_holds_writes_until_released(make_rig):
    rig = make_rig()
    done = threading.Event()
    with rig.core.fence():
        t = threading.Thread(target=lambda: (rig.core.write(b"x", 0), done.set()))
        t.start()
        time.sleep(0.1)
        assert not done.is_set()
    assert done.wait(5)
    t.join()


def test_clean_close_leaves_clean_bitmap_and_empty_activity_log(shm_dir, res_uuid):
    from replicator.native.actlog import ActivityLog
    dev = shm_dir / "dev"
    dev.write_bytes(bytes(1 << 20))
    oos = Bitmap.create(str(shm_dir / "oos"), res_uuid, 4096, 256)
    al = ActivityLog.create(str(shm_dir / "al"), res_uuid, 64 << 10, 4)
    core = Core(str(dev), 1 << 20, oos, al, 1 << 20, 7)
    assert core.write(b"q" * 9000, 70_000).seq == 7
    core.close()
    oos.close()
    al.close()
    oos = Bitmap.open(str(shm_dir / "oos"), res_uuid, 4096)
    al = ActivityLog.open(str(shm_dir / "al"), res_uuid)
    assert not oos.was_dirty
    assert oos.count() == 3, "unshipped writes stay out of sync across a clean restart"
    assert al.recovered_extents() == []
    oos.close()
    al.close()


IO_ERROR_CHILD = r"""
import os, resource, signal, sys, uuid
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core
d = sys.argv[1]
u = uuid.uuid4().bytes
oos = Bitmap.create(d + "/oos", u, 4096, 1024)
al = ActivityLog.create(d + "/al", u, 1 << 20, 4)
core = Core(d + "/dev", 4 << 20, oos, al, 1 << 20, 1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
core.write(b"a" * 4096, 0)
try:
    core.write(b"b" * 4096, 3 << 20)
except OSError as e:
    print("errno", e.errno, e)
print("next", core.next_seq, "bit", oos.test_bit(768), "pending", core.pending(768))
"""


def test_device_error_raises_oserror_takes_no_seq_and_keeps_the_bit(shm_dir):
    (shm_dir / "dev").write_bytes(bytes(4 << 20))
    out = subprocess.run([sys.executable, "-c", IO_ERROR_CHILD, str(shm_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("errno 27 "), lines  # EFBIG
    assert "write of 4096 bytes at 3145728" in lines[0]
    assert lines[1] == "next 2 bit True pending 0", lines


@pytest.fixture
def loop_device(shm_dir):
    """A loop device over a random 8 MiB file on tmpfs; detached at teardown."""
    if os.geteuid() != 0:
        pytest.fail("loop devices need root; run the tests as root", pytrace=False)
    backing = shm_dir / "backing.img"
    backing.write_bytes(os.urandom(8 << 20))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_writes_trims_and_zeros(loop_device, shm_dir, res_uuid):
    from replicator.native.actlog import ActivityLog
    size = 8 << 20
    oos = Bitmap.create(None, res_uuid, 4096, size // 4096)
    al = ActivityLog.create(str(shm_dir / "al"), res_uuid, 64 << 10, 8)
    with pytest.raises(CoreError, match=f"device {loop_device}: has {size} bytes, {size + 4096} requested"):
        Core(loop_device, size + 4096, Bitmap.create(None, res_uuid, 4096, size // 4096 + 1),
             al, 1 << 20, 1)
    core = Core(loop_device, size, oos, al, 1 << 20, 1)
    try:
        core.write(b"w" * 8192, 4096, fua=True)
        core.trim(1 << 20, 64 << 10)       # BLKZEROOUT: aligned
        core.zero(3 << 20, 1000)           # unaligned: written as zeros
        core.flush()
        with open(loop_device, "rb") as f:
            data = f.read()
        assert data[4096:12288] == b"w" * 8192
        assert data[1 << 20:(1 << 20) + (64 << 10)] == bytes(64 << 10)
        assert data[3 << 20:(3 << 20) + 1000] == bytes(1000)
        assert [t.op for t, _ in records.iter_records(drain(core))] == [
            OP_WRITE, OP_TRIM, OP_ZERO, OP_FLUSH]
    finally:
        core.close()
        oos.close()
        al.close()

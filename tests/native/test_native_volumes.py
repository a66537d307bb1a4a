"""Several volumes in one core (native/core.h, replicator/layout.py): each
write lands on its own device at its own offset, one counter orders every
volume, records carry (volume, relative offset), and the track machinery
(OOS bits, release, freeze, drain, collisions) works on logical offsets."""
from __future__ import annotations

import errno
import random
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from replicator import records
from replicator.layout import Layout
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core, CoreError
from replicator.native.ffi import ffi, lib
from replicator.records import OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO

TRACK = 4096
# Volume 0 ends 1000 bytes into its sixth track: an alignment gap of 3096
# bytes follows it, and volume 1 starts at logical track 6.
SIZE0 = 5 * TRACK + 1000
SIZE1 = 8 * TRACK
# Each device is larger than the volume it exports: a read or write that
# ran past a volume's end would meet these bytes.
TAIL = b"\xaa" * 5000
UUID = b"\x17" * 16


@dataclass
class Vols:
    """Two image files opened as volumes 0 and 1 of one core."""

    paths: list[Path]
    original: list[bytes]
    layout: Layout
    oos: Bitmap
    al: ActivityLog
    core: Core

    def image(self, v: int) -> bytes:
        """Volume v's exported bytes, after checking its device's tail is untouched."""
        b = self.paths[v].read_bytes()
        assert b[self.layout.sizes[v]:] == TAIL, f"volume {v}: bytes past its end changed"
        return b[:self.layout.sizes[v]]


@pytest.fixture
def vols(shm_dir: Path):
    rnd = random.Random(12)
    paths = [shm_dir / "data.img", shm_dir / "wal.img"]
    original = [rnd.randbytes(SIZE0), rnd.randbytes(SIZE1)]
    for p, b in zip(paths, original):
        p.write_bytes(b + TAIL)
    layout = Layout([("data", SIZE0), ("wal", SIZE1)], TRACK)
    oos = Bitmap.create(str(shm_dir / "oos.bm"), UUID, TRACK, layout.ntracks)
    al = ActivityLog.create(str(shm_dir / "al"), UUID, 4 * TRACK, 8)
    core = Core.open_volumes([str(p) for p in paths], layout, oos, al, 16 << 20, 1)
    yield Vols(paths, original, layout, oos, al, core)
    core.close(clean=False)
    oos.abandon()
    al.close()


def drain(core: Core) -> list[tuple[records.Token, bytes]]:
    """Every record from the send cursor on: [(token, data)]."""
    out = bytearray()
    while span := core.peek(1 << 30):
        out += span
        core.advance(len(span))
    return list(records.iter_records(bytes(out)))


def test_layout_puts_volume_1_at_a_track_aligned_base(vols):
    assert vols.layout.bases == (0, 6 * TRACK)
    assert vols.core.size == 6 * TRACK + SIZE1
    assert lib.core_nvolumes(vols.core._c) == 2


def test_each_write_lands_on_its_own_device_at_its_own_offset(vols):
    c = vols.core
    c.write(b"A" * 480, SIZE0 - 480, volume=0)       # up to volume 0's very end
    c.write(b"B" * 100, 0, volume=1)
    c.write(b"C" * 100, SIZE1 - 100, volume=1)       # up to volume 1's very end
    c.zero(TRACK, 10, volume=1)
    c.trim(0, 7, volume=0)
    want0 = bytearray(vols.original[0])
    want0[SIZE0 - 480:] = b"A" * 480
    want0[0:7] = bytes(7)
    want1 = bytearray(vols.original[1])
    want1[0:100] = b"B" * 100
    want1[SIZE1 - 100:] = b"C" * 100
    want1[TRACK:TRACK + 10] = bytes(10)
    assert vols.image(0) == bytes(want0), "volume 0's device differs from the writes to it"
    assert vols.image(1) == bytes(want1), "volume 1's device differs from the writes to it"


def test_one_counter_orders_both_volumes_and_records_say_which(vols):
    c = vols.core
    issued = []
    for i in range(12):
        v = i % 2
        off = (i * 997) % (vols.layout.sizes[v] - 64)
        data = bytes([i]) * 64
        issued.append((c.write(data, off, volume=v).seq, v, off, data))
    z = c.zero(SIZE1 - 8, 8, volume=1)
    f = c.flush()
    assert [s for s, *_ in issued] + [z.seq, f.seq] == list(range(1, 15)), \
        "seqs are not one counter in issue order"
    recs = drain(c)
    got = [(t.seq, t.volume, t.offset, d) for t, d in recs[:12]]
    assert got == issued
    assert [(t.op, t.volume, t.offset, t.length) for t, _ in recs[12:]] == [
        (OP_ZERO, 1, SIZE1 - 8, 8), (OP_FLUSH, 0, 0, 0)]


def test_concurrent_writes_on_both_volumes_replay_to_both_images(vols):
    """Replaying the ring in seq order onto copies of the two originals gives
    exactly the two devices: one order covers both volumes."""
    c = vols.core

    def worker(k: int) -> None:
        rng = random.Random(k)
        for _ in range(200):
            v = rng.randrange(2)
            size = vols.layout.sizes[v]
            n = rng.randint(1, 3 * TRACK)
            off = rng.randint(0, size - n)
            if rng.random() < 0.1:
                c.zero(off, n, volume=v)
            else:
                c.write(rng.randbytes(n), off, volume=v)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    images = [bytearray(b) for b in vols.original]
    seqs = []
    for tok, data in drain(c):
        seqs.append(tok.seq)
        img = images[tok.volume]
        if tok.op == OP_WRITE:
            img[tok.offset:tok.offset + tok.length] = data
        elif tok.op in (OP_TRIM, OP_ZERO):
            img[tok.offset:tok.offset + tok.length] = bytes(tok.length)
    assert seqs == list(range(1, 801))
    assert bytes(images[0]) == vols.image(0)
    assert bytes(images[1]) == vols.image(1)


def _raw(c: Core, op: str, volume: int, off: int, length: int) -> int:
    res = ffi.new("struct core_result *")
    if op == "write":
        buf = ffi.new("char[]", b"\xff" * length)
        return lib.core_write(c._c, buf, length, off, 0, volume, res)
    return getattr(lib, f"core_{op}")(c._c, off, length, 0, volume, res)


@pytest.mark.parametrize("op", ["write", "trim", "zero"])
@pytest.mark.parametrize("volume,off,length", [
    (2, 0, 10),                   # no such volume
    (0xFFFFFFFF, 0, 10),
    (0, SIZE0 - 10, 20),          # past volume 0's end, into the alignment gap
    (0, SIZE0, 1),
    (1, SIZE1 - 1, 2),            # past volume 1's end (the logical end)
])
def test_bad_volume_or_range_is_einval_and_touches_nothing(vols, op, volume, off, length):
    c = vols.core
    assert _raw(c, op, volume, off, length) == -errno.EINVAL
    assert c.next_seq == 1, "a refused request took a seq"
    assert vols.oos.count() == 0, "a refused request marked tracks"
    assert drain(c) == []
    assert vols.image(0) == vols.original[0] and vols.image(1) == vols.original[1]
    with pytest.raises(ValueError, match="volume .* does not exist|outside the device"):
        if op == "write":
            c.write(b"\xff" * length, off, volume=volume)
        else:
            getattr(c, op)(off, length, volume=volume)


def test_oos_marks_logical_tracks_and_release_clears_them(vols):
    c = vols.core
    c.write(b"x" * 10, 2 * TRACK + 5, volume=1)    # volume 1's track 2: logical 8
    c.write(b"y" * 10, SIZE0 - 10, volume=0)       # volume 0's partial last: logical 5
    w = c.write(b"z" * (TRACK + 2), TRACK - 1, volume=1)  # logical 6, 7, 8
    assert [t for t in range(vols.layout.ntracks) if vols.oos.test_bit(t)] == [5, 6, 7, 8]
    assert [c.pending(t) for t in (5, 6, 7, 8)] == [1, 1, 1, 2]
    drain(c)
    assert c.release(w.seq) == 3
    assert vols.oos.count() == 0, "release did not find the tracks of volume 1's records"
    assert all(c.pending(t) == 0 for t in range(vols.layout.ntracks))


def test_pread_is_logical_and_stops_at_the_volume_end(vols):
    c = vols.core
    o0, o1 = vols.original
    assert c.pread(TRACK, 5 * TRACK) == o0[5 * TRACK:]          # 1000 bytes, then the gap
    assert c.pread(100, SIZE0 + 5) == b""                       # in the gap: nothing
    assert c.pread(TRACK, 6 * TRACK, locked=True) == o1[:TRACK]  # volume 1's first track
    assert c.pread(3 * TRACK, 4 * TRACK) == o0[4 * TRACK:]      # cut at volume 0's end
    assert c.pread(SIZE1, 6 * TRACK) == o1
    with pytest.raises(ValueError, match="outside"):
        c.pread(2, c.size - 1)


def test_freeze_and_drain_read_each_track_from_its_volume(vols):
    c = vols.core
    o0, o1 = vols.original
    c.drop()
    vols.oos.set_range(0, c.size)
    frozen = Bitmap.create(None, UUID, TRACK, vols.layout.ntracks)
    cr = Bitmap.create(None, UUID, TRACK, vols.layout.ntracks)
    c.freeze(frozen, cr, 1 << 20, stream=False)
    assert c.drain_track(7) == o1[TRACK:2 * TRACK], "volume 1's track read the wrong bytes"
    assert c.drain_track(5) == o0[5 * TRACK:], "volume 0's partial track is cut at its end"
    assert c.drain_track(0) == o0[:TRACK]
    assert c.drain_track(7) is None  # taken already
    c.thaw()
    frozen.close()


def test_collision_on_volume_1_copies_volume_1_at_the_freeze(vols):
    c = vols.core
    o0, o1 = vols.original
    c.drop()
    vols.oos.set_range(0, c.size)
    frozen = Bitmap.create(None, UUID, TRACK, vols.layout.ntracks)
    cr = Bitmap.create(None, UUID, TRACK, vols.layout.ntracks)
    c.freeze(frozen, cr, 1 << 20, stream=False)
    c.write(b"\xee" * 50, 3 * TRACK + 7, volume=1)   # logical track 9
    c.write(b"\xdd" * 50, SIZE0 - 50, volume=0)      # logical track 5 (partial)
    assert not frozen.test_bit(9) and not frozen.test_bit(5)
    got = c.collisions()
    assert got == [(9 * TRACK, o1[3 * TRACK:4 * TRACK]), (5 * TRACK, o0[5 * TRACK:])], \
        "collision copies are not the volumes' bytes at the freeze, at logical offsets"
    assert [t for t in range(vols.layout.ntracks) if cr.test_bit(t)] == [5, 9]
    assert c.drain_track(9) is None
    c.thaw()
    frozen.close()


def _open_raw(vols_spec: list[tuple[str, int, int]], oos: Bitmap, al: ActivityLog) -> tuple[int, str]:
    keep = [ffi.new("char[]", p.encode()) for p, _, _ in vols_spec]
    arr = ffi.new("struct core_volume[]", len(vols_spec))
    for i, (_, size, base) in enumerate(vols_spec):
        arr[i].path, arr[i].size, arr[i].base = keep[i], size, base
    out = ffi.new("struct core **")
    err = ffi.new("char[]", 512)
    rc = lib.core_open(out, arr, len(vols_spec), oos._ptr(), al._ptr(), 1 << 20, 1, ffi.NULL,
                       err, 512)
    if rc == 0:
        lib.core_close(out[0], False, err, 512)
    return rc, ffi.string(err).decode()


def test_open_refuses_a_wrong_layout_and_a_device_given_twice(shm_dir):
    a, b = shm_dir / "a.img", shm_dir / "b.img"
    a.write_bytes(bytes(SIZE0))
    b.write_bytes(bytes(SIZE1))
    oos = Bitmap.create(None, UUID, TRACK, 20)
    al = ActivityLog.create(str(shm_dir / "al"), UUID, 4 * TRACK, 8)
    try:
        assert _open_raw([(str(a), SIZE0, 0), (str(b), SIZE1, 6 * TRACK)], oos, al)[0] == 0
        rc, msg = _open_raw([(str(a), SIZE0, 0), (str(b), SIZE1, SIZE0)], oos, al)
        assert rc == -errno.EINVAL and f"{b}: volume 1 has logical base {SIZE0}" in msg, msg
        rc, msg = _open_raw([(str(a), SIZE0, TRACK)], oos, al)
        assert rc == -errno.EINVAL and "the layout puts it at 0" in msg, msg
        rc, msg = _open_raw([(str(a), SIZE0, 0), (str(a), SIZE0, 6 * TRACK)], oos, al)
        assert rc == -errno.EINVAL and "volume 1 is the same device as volume 0" in msg, msg
        rc, msg = _open_raw([], oos, al)
        assert rc == -errno.EINVAL and "no volume" in msg, msg
        small = Bitmap.create(None, UUID, TRACK, 10)
        with pytest.raises(CoreError, match="OOS bitmap covers 40960 bytes .* logical size"):
            Core.open_volumes([str(a), str(b)], Layout([("a", SIZE0), ("b", SIZE1)], TRACK),
                              small, al, 1 << 20, 1)
        small.close()
        with pytest.raises(ValueError, match="1 device"):
            Core.open_volumes([str(a)], Layout([("a", SIZE0), ("b", SIZE1)], TRACK),
                              oos, al, 1 << 20, 1)
    finally:
        oos.close()
        al.close()


_FLUSH_CHILD = textwrap.dedent("""
    import sys
    from replicator.layout import Layout
    from replicator.native.actlog import ActivityLog
    from replicator.native.bitmap import Bitmap
    from replicator.native.core import Core
    d, a, b = sys.argv[1:4]
    lay = Layout([("a", {s0}), ("b", {s1})], {ts})
    oos = Bitmap.create(None, b"u" * 16, {ts}, lay.ntracks)
    al = ActivityLog.create(d + "/al", b"u" * 16, {ts} * 4, 8)
    c = Core.open_volumes([a, b], lay, oos, al, 1 << 20, 1)
    c.write(b"1" * 10, 0, volume=0)
    c.write(b"2" * 10, 0, volume=1)
    print("flush seq", c.flush().seq, flush=True)
    c.close(clean=False)
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_flush_fdatasyncs_every_volume(shm_dir):
    a, b = shm_dir / "a.img", shm_dir / "b.img"
    a.write_bytes(bytes(SIZE0))
    b.write_bytes(bytes(SIZE1))
    code = _FLUSH_CHILD.format(s0=SIZE0, s1=SIZE1, ts=TRACK)
    p = subprocess.run(["strace", "-f", "-y", "-e", "trace=fdatasync,fsync", "-o",
                        str(shm_dir / "trace"), sys.executable, "-c", code, str(shm_dir),
                        str(a), str(b)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0, p.stderr
    assert "flush seq 3" in p.stdout
    trace = (shm_dir / "trace").read_text()
    synced = re.findall(r"f(?:data)?sync\(\d+<([^>]*)>\) = 0", trace)
    assert synced.count(str(a)) == 1 and synced.count(str(b)) == 1, \
        f"one flush must sync each volume once; synced: {synced}"

"""The C core's side of catch-up increments: freeze, drain, and the
collision rule (DESIGN §4). An increment must be exactly the device as it
was at the freeze, whatever the application writes while it drains."""
from __future__ import annotations

import random
import threading

import pytest

from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core

TRACK = 4096
NTRACKS = 64
SIZE = TRACK * NTRACKS
UUID = b"\x42" * 16


@pytest.fixture
def core(tmp_path):
    dev = tmp_path / "dev.img"
    rnd = random.Random(5)
    dev.write_bytes(bytes(rnd.randrange(256) for _ in range(SIZE)))
    oos = Bitmap.create(str(tmp_path / "oos"), UUID, TRACK, NTRACKS)
    al = ActivityLog.create(str(tmp_path / "al"), UUID, TRACK * 4, 8)
    c = Core(str(dev), SIZE, oos, al, 1 << 20, 1)
    yield c, dev
    c.close()
    oos.close()
    al.close()


def _bitmaps():
    return (Bitmap.create(None, UUID, TRACK, NTRACKS), Bitmap.create(None, UUID, TRACK, NTRACKS))


def _freeze(c: Core, cap: int, dirty: int = SIZE) -> tuple[Bitmap, Bitmap, int]:
    """Ahead with the first *dirty* bytes out of sync, then freeze them:
    (frozen map, CR map, base seq)."""
    c.drop()
    c.oos.set_range(0, dirty)
    frozen, cr = _bitmaps()
    return frozen, cr, c.freeze(frozen, cr, cap, stream=False)


def _drain(c: Core, frozen: Bitmap) -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    t = frozen.find_next(0)
    while t >= 0:
        data = c.drain_track(t)
        if data is not None:
            got[t * TRACK] = data
        t = frozen.find_next(t + 1)
    for off, data in c.collisions():
        assert off not in got, f"track at {off} both drained and collision-copied"
        got[off] = data
    return got


def test_write_to_a_frozen_track_goes_into_the_increment_as_it_was(core):
    c, dev = core
    before = dev.read_bytes()
    frozen, cr, base = _freeze(c, 1 << 20)
    assert base == c.next_seq - 1
    c.write(b"\xee" * 100, 5 * TRACK + 10)         # a frozen track, not drained yet
    c.write(b"\xdd" * TRACK, 9 * TRACK)            # another one, whole track
    assert not frozen.test_bit(5) and not frozen.test_bit(9), "collision did not take the tracks"
    inc = _drain(c, frozen)
    c.thaw()
    c.set_cr(None)
    assert sorted(inc) == [t * TRACK for t in range(NTRACKS)]
    for off, data in inc.items():
        assert data == before[off:off + TRACK], \
            f"increment data of the track at {off} is not the device at the freeze"
    assert cr.test_bit(5) and cr.test_bit(9) and cr.count() == 2, "CR must record the writes"
    assert not c.collision_overflowed
    frozen.close()
    cr.close()


def test_write_to_an_already_drained_track_is_not_copied(core):
    c, dev = core
    frozen, cr, _ = _freeze(c, 1 << 20, dirty=4 * TRACK)
    first = c.drain_track(0)
    assert first is not None
    c.write(b"\x11" * 512, 0)
    assert c.collisions() == [], "a drained track was copied again"
    assert c.drain_track(0) is None, "a track was drained twice"
    c.thaw()
    c.set_cr(None)
    frozen.close()
    cr.close()


def test_concurrent_writers_never_leak_into_the_increment(core):
    c, dev = core
    before = dev.read_bytes()
    frozen, cr, _ = _freeze(c, 8 << 20)
    stop = threading.Event()

    def writer(n: int) -> None:
        rnd = random.Random(n)
        while not stop.is_set():
            off = rnd.randrange(0, SIZE - 8192)
            c.write(bytes([0x80 + n]) * rnd.choice((512, 4096, 8192)), off)

    ts = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in ts:
        t.start()
    try:
        inc = _drain(c, frozen)
    finally:
        stop.set()
        for t in ts:
            t.join()
    c.thaw()
    c.set_cr(None)
    inc.update(dict(c.collisions()))
    assert len(inc) == NTRACKS
    bad = [off for off, data in inc.items() if data != before[off:off + TRACK]]
    assert not bad, f"writes leaked into the increment at {bad[:5]}"
    assert dev.read_bytes() != before, "the writers wrote nothing: the test proves nothing"
    frozen.close()
    cr.close()


def test_collision_queue_overflow_is_reported_not_dropped(core):
    c, dev = core
    frozen, cr, _ = _freeze(c, 2 * (TRACK + 16))
    for t in range(4):
        c.write(b"\x01" * 512, t * TRACK)
    assert c.collision_overflowed
    c.thaw()
    c.set_cr(None)
    frozen.close()
    cr.close()


def test_freeze_with_stream_resumes_the_ring_after_the_base(core):
    c, dev = core
    c.write(b"a" * 512, 0)
    c.drop()
    c.write(b"b" * 512, 0)
    assert c.dropped
    frozen, cr = _bitmaps()
    base = c.freeze(frozen, cr, 1 << 20, stream=True)
    assert not c.dropped
    r = c.write(b"c" * 512, TRACK)
    assert r.queued and r.seq == base + 1
    c.thaw()
    c.set_cr(None)
    frozen.close()
    cr.close()


def test_collision_copies_can_be_taken_in_slices(core):
    # The shipper sends the queue slice by slice, so that it never holds a
    # second copy of all of it (up to COLLIDE_CAP bytes).
    c, dev = core
    before = dev.read_bytes()
    frozen, cr, _ = _freeze(c, 1 << 20)
    for t in range(10):
        c.write(b"\x5a" * 64, t * TRACK)
    slices = []
    while got := c.collisions(2 * TRACK, drain=False):
        slices.append(got)
    assert [len(s) for s in slices] == [1] * 10  # a slice has room for one track + header
    got = [p for s in slices for p in s]
    assert got == [(t * TRACK, before[t * TRACK:(t + 1) * TRACK]) for t in range(10)]
    c.write(b"\x5a" * 64, 11 * TRACK)
    assert c.collisions(64 * TRACK, drain=False) == [(11 * TRACK, before[11 * TRACK:12 * TRACK])]
    c.thaw()
    c.set_cr(None)
    frozen.close()
    cr.close()

"""The track bitmap: operations against a Python model, persistence across
clean close and crash, and refusal of torn, foreign or damaged files."""
from __future__ import annotations

import os
import struct
import threading
import uuid as uuid_mod
from pathlib import Path

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from replicator.native.bitmap import Bitmap, BitmapError
from replicator.native.core import CoreError
from replicator.crc32c import _crc32c_py

TS = 512
NBITS = 300  # several 64-bit words, last one partial
UUID = uuid_mod.UUID("6d2f5a4e-0c1b-4e7f-9a3d-2b8c7e1f0a55").bytes


def tracks_of(off: int, length: int) -> set[int]:
    if length == 0:
        return set()
    return set(range(off // TS, (off + length - 1) // TS + 1))


byte_ranges = st.integers(0, NBITS * TS - 1).flatmap(
    lambda off: st.tuples(st.just(off), st.integers(0, NBITS * TS - off)))


class BitmapModel(RuleBasedStateMachine):
    """Every operation on the C bitmap agrees with a set of track numbers."""

    @initialize()
    def start(self):
        self.bm = Bitmap.create(None, UUID, TS, NBITS)
        self.model: set[int] = set()
        self.other = Bitmap.create(None, UUID, TS, NBITS)
        self.other_model: set[int] = set()

    def teardown(self):
        if hasattr(self, "bm"):
            self.bm.close()
            self.other.close()

    @rule(r=byte_ranges)
    def set_range(self, r):
        added = tracks_of(*r) - self.model
        assert self.bm.set_range(*r) == len(added)
        self.model |= tracks_of(*r)

    @rule(r=byte_ranges)
    def clear_range(self, r):
        gone = tracks_of(*r) & self.model
        assert self.bm.clear_range(*r) == len(gone)
        self.model -= tracks_of(*r)

    @rule(r=byte_ranges)
    def test_range(self, r):
        assert self.bm.test_range(*r) == bool(tracks_of(*r) & self.model)

    @rule(i=st.integers(0, NBITS - 1))
    def set_bit(self, i):
        assert self.bm.set_bit(i) == (i in self.model)
        self.model.add(i)

    @rule(i=st.integers(0, NBITS - 1))
    def clear_bit(self, i):
        assert self.bm.clear_bit(i) == (i in self.model)
        self.model.discard(i)

    @rule(i=st.integers(0, NBITS + 5))
    def find_next(self, i):
        want = min((t for t in self.model if t >= i), default=-1)
        assert self.bm.find_next(i) == want

    @rule(r=byte_ranges)
    def fill_other(self, r):
        self.other.set_range(*r)
        self.other_model |= tracks_of(*r)

    @rule()
    def merge_from_other(self):
        assert self.bm.merge_from(self.other) == len(self.other_model - self.model)
        self.model |= self.other_model

    @rule()
    def subtract_other(self):
        assert self.bm.subtract(self.other) == len(self.other_model & self.model)
        self.model -= self.other_model

    @rule()
    def copy_is_equal_and_independent(self):
        cp = self.bm.copy()
        try:
            assert {i for i in range(NBITS) if cp.test_bit(i)} == self.model
            cp.set_range(0, NBITS * TS)
            assert self.bm.count() == len(self.model)
        finally:
            cp.close()

    @rule()
    def clear_all(self):
        self.bm.clear_all()
        self.model.clear()

    @invariant()
    def count_and_runs_agree(self):
        if not hasattr(self, "bm"):
            return
        assert self.bm.count() == len(self.model)
        covered = set()
        for off, length in self.bm.runs():
            assert off % TS == 0 and length % TS == 0
            covered |= set(range(off // TS, (off + length) // TS))
        assert covered == self.model


TestBitmapAgreesWithModel = BitmapModel.TestCase
TestBitmapAgreesWithModel.settings = settings(max_examples=60, stateful_step_count=40,
                                              deadline=None)


# ---- persistence ----------------------------------------------------------

def bits_on_disk(path: Path, nbits: int) -> set[int]:
    raw = path.read_bytes()[4096:]
    return {i for i in range(nbits) if raw[i // 8] >> (i % 8) & 1}


def test_bits_survive_clean_close_and_reopen(tmp_path, res_uuid):
    p = tmp_path / "oos.bm"
    bm = Bitmap.create(str(p), res_uuid, 4096, 1000)
    bm.set_range(4096 * 10, 4096 * 3)
    bm.set_bit(999)
    bm.close()
    bm = Bitmap.open(str(p), res_uuid, 4096)
    try:
        assert not bm.was_dirty
        assert (bm.nbits, bm.track_size) == (1000, 4096)
        assert [i for i in range(1000) if bm.test_bit(i)] == [10, 11, 12, 999]
    finally:
        bm.close()


def test_after_a_crash_the_file_holds_the_bits_as_of_the_last_sync(tmp_path, res_uuid):
    p = tmp_path / "oos.bm"
    bm = Bitmap.create(str(p), res_uuid, 4096, 100_000)
    bm.set_bit(5)
    bm.set_bit(70_000)
    bm.sync()
    bm.set_bit(6)  # never synced: lost with the "crash"
    assert bits_on_disk(p, 100_000) == {5, 70_000}
    bm.abandon()
    bm = Bitmap.open(str(p), res_uuid, 4096)
    try:
        assert bm.was_dirty, "a bitmap that was not closed cleanly must say so"
        assert [i for i in range(100_000) if bm.test_bit(i)] == [5, 70_000]
    finally:
        bm.close()
    # A clean close after a dirty open leaves it clean again.
    assert not Bitmap.open(str(p), res_uuid, 4096).was_dirty


def test_opening_marks_the_file_dirty_before_any_change(tmp_path, res_uuid):
    p = tmp_path / "oos.bm"
    Bitmap.create(str(p), res_uuid, 4096, 64).close()
    bm = Bitmap.open(str(p), res_uuid, 4096)
    try:
        state = struct.unpack_from("<I", p.read_bytes(), 12)[0]
        assert state == 2, "header must say DIRTY while the bitmap is open"
    finally:
        bm.close()
    assert struct.unpack_from("<I", p.read_bytes(), 12)[0] == 1


def test_copy_to_a_file_is_durable_without_close(tmp_path, res_uuid):
    bm = Bitmap.create(None, res_uuid, 4096, 5000)
    bm.set_range(0, 4096 * 3)
    bm.set_bit(4999)
    frozen = bm.copy(str(tmp_path / "frozen.bm"))
    bm.clear_all()
    assert frozen.count() == 4
    assert bits_on_disk(tmp_path / "frozen.bm", 5000) == {0, 1, 2, 4999}
    frozen.abandon()
    bm.close()


def test_runs_and_dirty_bytes_stop_at_the_device_size(res_uuid):
    size = 10 * 4096 + 100  # last track is partial
    bm = Bitmap.create(None, res_uuid, 4096, 11)
    bm.set_range(0, 4096)
    bm.set_range(9 * 4096, 2 * 4096)
    assert list(bm.runs()) == [(0, 4096), (9 * 4096, 2 * 4096)]
    assert list(bm.runs(size)) == [(0, 4096), (9 * 4096, 4096 + 100)]
    assert bm.dirty_bytes() == 3 * 4096
    assert bm.dirty_bytes(size) == 2 * 4096 + 100
    bm.close()


def test_concurrent_setters_never_lose_a_bit(res_uuid):
    bm = Bitmap.create(None, res_uuid, 512, 4096)

    def worker(k):
        for i in range(k, 4096, 4):  # four threads share every word
            bm.set_bit(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bm.count() == 4096
    bm.close()


def test_range_outside_the_bitmap_is_refused(res_uuid):
    bm = Bitmap.create(None, res_uuid, 4096, 10)
    with pytest.raises(ValueError, match="outside the bitmap"):
        bm.set_range(9 * 4096, 4097)
    with pytest.raises(IndexError, match="track 10"):
        bm.test_bit(10)
    bm.close()


def test_merge_refuses_another_geometry(res_uuid):
    a = Bitmap.create(None, res_uuid, 4096, 10)
    b = Bitmap.create(None, res_uuid, 4096, 11)
    c = Bitmap.create(None, uuid_mod.uuid4().bytes, 4096, 10)
    with pytest.raises(ValueError, match="bitmaps differ"):
        a.merge_from(b)
    with pytest.raises(ValueError, match="bitmaps differ"):
        a.merge_from(c)
    for x in (a, b, c):
        x.close()


# ---- refusing bad files ---------------------------------------------------

@pytest.fixture
def closed_bitmap(tmp_path, res_uuid) -> Path:
    p = tmp_path / "oos.bm"
    bm = Bitmap.create(str(p), res_uuid, 4096, 40_000)
    bm.set_range(0, 4096 * 100)
    bm.close()
    return p


def refused(path: Path, uuid: bytes, track_size: int = 4096) -> str:
    with pytest.raises(BitmapError) as ei:
        Bitmap.open(str(path), uuid, track_size)
    msg = str(ei.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    return msg


def test_torn_file_is_refused(closed_bitmap, res_uuid):
    full = closed_bitmap.stat().st_size
    os.truncate(closed_bitmap, full - 4096)
    msg = refused(closed_bitmap, res_uuid)
    assert f"torn: {full - 4096} bytes, expected {full}" in msg
    os.truncate(closed_bitmap, 100)
    assert "torn: 100 bytes" in refused(closed_bitmap, res_uuid)


def test_bitmap_of_another_resource_is_refused(closed_bitmap, res_uuid):
    other = uuid_mod.uuid4()
    msg = refused(closed_bitmap, other.bytes)
    assert f"belongs to resource {uuid_mod.UUID(bytes=res_uuid)}, expected {other}" in msg


def test_bitmap_with_another_track_size_is_refused(closed_bitmap, res_uuid):
    assert "track size 4096, expected 65536" in refused(closed_bitmap, res_uuid, 65536)


def test_bitmap_of_another_format_version_is_refused(closed_bitmap, res_uuid):
    with open(closed_bitmap, "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<I", 2))
    assert "format version 2, this build reads version 1" in refused(closed_bitmap, res_uuid)


def test_garbage_file_is_refused(tmp_path, res_uuid):
    p = tmp_path / "junk"
    p.write_bytes(os.urandom(3 * 4096))
    assert "not a Duplex bitmap" in refused(p, res_uuid)
    p.write_bytes(b"")
    assert "torn: 0 bytes" in refused(p, res_uuid)


def test_header_with_a_bad_checksum_is_refused(closed_bitmap, res_uuid):
    with open(closed_bitmap, "r+b") as f:
        f.seek(40)  # the bit count
        f.write(struct.pack("<Q", 40_001))
    assert "header checksum mismatch" in refused(closed_bitmap, res_uuid)


def test_clean_bitmap_with_damaged_bits_is_refused(closed_bitmap, res_uuid):
    with open(closed_bitmap, "r+b") as f:
        f.seek(4096 + 2000)
        f.write(b"\x01")
    assert "bits damaged" in refused(closed_bitmap, res_uuid)


def test_header_checksum_covers_the_whole_header_block(closed_bitmap, res_uuid):
    raw = bytearray(closed_bitmap.read_bytes()[:4096])
    stored = struct.unpack_from("<I", raw, 52)[0]
    raw[52:56] = bytes(4)
    assert _crc32c_py(raw) == stored


def test_a_bitmap_cannot_be_opened_twice(closed_bitmap, res_uuid):
    bm = Bitmap.open(str(closed_bitmap), res_uuid, 4096)
    try:
        assert "in use" in refused(closed_bitmap, res_uuid)
    finally:
        bm.close()


def test_closed_bitmap_refuses_use(res_uuid):
    bm = Bitmap.create(None, res_uuid, 4096, 10)
    bm.close()
    bm.close()  # idempotent
    with pytest.raises(CoreError, match="closed"):
        bm.count()

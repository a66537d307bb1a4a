"""The activity log: write-ahead transactions, eviction after a bitmap sync,
recovery, and refusal of damaged or foreign files."""
from __future__ import annotations

import struct
import threading
import time
import uuid as uuid_mod
from pathlib import Path

import pytest

from replicator.native.actlog import ActivityLog, ActivityLogError
from replicator.native.bitmap import Bitmap

EXT = 64 << 10
TS = 4096
PER = EXT // TS  # tracks per extent


def bits_on_disk(path: Path, nbits: int) -> set[int]:
    raw = path.read_bytes()[4096:]
    return {i for i in range(nbits) if raw[i // 8] >> (i % 8) & 1}


@pytest.fixture
def files(tmp_path, res_uuid):
    return tmp_path / "al", tmp_path / "oos.bm"


def test_transaction_only_when_an_extent_becomes_active(files, res_uuid):
    al = ActivityLog.create(str(files[0]), res_uuid, EXT, 4)
    try:
        al.begin(0, 100)
        assert al.stats["transactions"] == 1
        al.end(0, 100)
        for _ in range(10):  # already active: no I/O
            al.begin(10, EXT - 10)
            al.end(10, EXT - 10)
        assert al.stats["transactions"] == 1
        al.begin(EXT - 1, 2)  # touches extents 0 and 1: one transaction for 1
        al.end(EXT - 1, 2)
        assert al.stats["transactions"] == 2
        assert al.active_extents() == [0, 1]
    finally:
        al.close()


def test_recovery_marks_every_track_of_the_active_extents(files, res_uuid):
    al = ActivityLog.create(str(files[0]), res_uuid, EXT, 8)
    al.begin(3 * EXT + 5, 10)
    al.begin(7 * EXT, 1)
    al.close()  # not quiesced: the set stays durable, as after a crash
    al = ActivityLog.open(str(files[0]), res_uuid)
    bm = Bitmap.create(None, res_uuid, TS, 8 * PER - 3)  # last extent is partial
    try:
        assert sorted(al.recovered_extents()) == [3, 7]
        assert al.recover_into(bm) == PER + (PER - 3)
        want = set(range(3 * PER, 4 * PER)) | set(range(7 * PER, 8 * PER - 3))
        assert {i for i in range(bm.nbits) if bm.test_bit(i)} == want
    finally:
        bm.close()
        al.close()


def test_eviction_syncs_the_bitmap_before_forgetting_the_extent(files, res_uuid):
    al_path, bm_path = files
    al = ActivityLog.create(str(al_path), res_uuid, EXT, 2)
    bm = Bitmap.create(str(bm_path), res_uuid, TS, 16 * PER)
    try:
        for e in (0, 1):
            al.begin(e * EXT, 1, bm)
            bm.set_bit(e * PER + 2)
            al.end(e * EXT, 1)
        assert bits_on_disk(bm_path, bm.nbits) == set(), "bits are written back lazily"
        syncs = bm.sync_count
        al.begin(5 * EXT, 1, bm)  # evicts extent 0 (least recently used)
        al.end(5 * EXT, 1)
        assert bm.sync_count == syncs + 1
        assert bits_on_disk(bm_path, bm.nbits) == {2, PER + 2}
        assert al.active_extents() == [1, 5]
    finally:
        bm.close()
        al.close()
    al = ActivityLog.open(str(al_path), res_uuid)
    assert sorted(al.recovered_extents()) == [1, 5]
    al.close()


def test_begin_waits_while_every_slot_is_in_flight(files, res_uuid):
    al = ActivityLog.create(str(files[0]), res_uuid, EXT, 2)
    al.begin(0, 1)
    al.begin(EXT, 1)
    done = threading.Event()

    def third():
        al.begin(2 * EXT, 1)
        done.set()

    t = threading.Thread(target=third)
    t.start()
    try:
        time.sleep(0.2)
        assert not done.is_set(), "a third extent cannot become active while two are in flight"
        al.end(EXT, 1)
        assert done.wait(5), "ending one range must let the waiter in"
        assert al.active_extents() == [0, 2]
        assert al.stats["waits"] >= 1
    finally:
        al.end(0, 1)
        t.join()
        al.close()


def test_range_needing_more_extents_than_slots_is_refused(files, res_uuid):
    al = ActivityLog.create(str(files[0]), res_uuid, EXT, 4)
    with pytest.raises(ValueError, match="more than 4 extents"):
        al.begin(0, 5 * EXT)
    al.close()


def test_quiesce_writes_an_empty_set(files, res_uuid):
    al = ActivityLog.create(str(files[0]), res_uuid, EXT, 4)
    al.begin(0, 1)
    al.end(0, 1)
    al.close(Bitmap.create(None, res_uuid, TS, 64))
    al = ActivityLog.open(str(files[0]), res_uuid)
    assert al.recovered_extents() == []
    al.close()


def _block_offsets(path: Path) -> tuple[int, int]:
    block_size = struct.unpack_from("<I", path.read_bytes(), 40)[0]
    return 4096, 4096 + block_size


def _txn_number(path: Path, off: int) -> int:
    return struct.unpack_from("<Q", path.read_bytes(), off + 8)[0]


def test_a_torn_newest_transaction_falls_back_to_the_previous_one(files, res_uuid):
    al_path = files[0]
    al = ActivityLog.create(str(al_path), res_uuid, EXT, 4)
    al.begin(0, 1)          # txn 2: {0}
    al.begin(EXT, 1)        # txn 3: {0, 1}
    al.close()
    blocks = _block_offsets(al_path)
    newest = max(blocks, key=lambda off: _txn_number(al_path, off))
    with open(al_path, "r+b") as f:  # tear it: the extent list half written
        f.seek(newest + 40)
        f.write(b"\xee" * 4)
    al = ActivityLog.open(str(al_path), res_uuid)
    assert al.recovered_extents() == [0]
    al.close()


def test_both_transaction_blocks_damaged_is_refused(files, res_uuid):
    al_path = files[0]
    ActivityLog.create(str(al_path), res_uuid, EXT, 4).close()
    with open(al_path, "r+b") as f:
        for off in _block_offsets(al_path):
            f.seek(off + 20)
            f.write(b"garbage")
    with pytest.raises(ActivityLogError, match="both transaction blocks are damaged") as ei:
        ActivityLog.open(str(al_path), res_uuid)
    assert str(al_path) in str(ei.value)


def test_activity_log_of_another_resource_is_refused(files, res_uuid):
    ActivityLog.create(str(files[0]), res_uuid, EXT, 4).close()
    other = uuid_mod.uuid4()
    with pytest.raises(ActivityLogError, match=f"belongs to resource .* expected {other}"):
        ActivityLog.open(str(files[0]), other.bytes)


def test_torn_or_garbage_activity_log_is_refused(files, res_uuid):
    al_path = files[0]
    ActivityLog.create(str(al_path), res_uuid, EXT, 4).close()
    full = al_path.stat().st_size
    with open(al_path, "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(ActivityLogError, match=f"torn: {full - 100} bytes, expected {full}"):
        ActivityLog.open(str(al_path), res_uuid)
    al_path.write_bytes(b"\x00" * 9000)
    with pytest.raises(ActivityLogError, match="not a Duplex activity log"):
        ActivityLog.open(str(al_path), res_uuid)


def test_recovery_refuses_a_bitmap_whose_tracks_do_not_tile_extents(files, res_uuid):
    al = ActivityLog.create(str(files[0]), res_uuid, 4096 * 3, 4)
    bm = Bitmap.create(None, res_uuid, 8192, 10)
    with pytest.raises(ActivityLogError, match="not a multiple of the bitmap's track size 8192"):
        al.recover_into(bm)
    bm.close()
    al.close()

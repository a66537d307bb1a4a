"""Applying records to an image file: exact bytes for every op."""
from __future__ import annotations

import os

import pytest

from _secondary_helpers import ImageModel, fill, first_diff, read_file, rec
from replicator.secondary import applier
from replicator.secondary.applier import ApplyError, apply_record, apply_run, record_data, zero_range
from replicator.records import OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO

SIZE = 256 * 1024


@pytest.fixture
def image(tmp_path):
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\xee" * SIZE, 0)  # allocated, non-zero content
        yield fd
    finally:
        os.close(fd)


def test_write_puts_the_data_at_its_offset(image):
    tok, raw = rec(1, 1000, fill(1, 5000))
    apply_record(image, *record_data(raw))
    got = read_file(image, SIZE)
    assert got[1000:6000] == fill(1, 5000)
    assert got[:1000] == b"\xee" * 1000 and got[6000:] == b"\xee" * (SIZE - 6000)


@pytest.mark.parametrize("op", [OP_TRIM, OP_ZERO])
def test_trim_and_zero_make_the_range_read_as_zeros(image, op):
    tok, raw = rec(2, 4096 + 100, op=op, length=3 * 4096)
    apply_record(image, tok)
    got = read_file(image, SIZE)
    assert got[4196:4196 + 3 * 4096] == bytes(3 * 4096)
    assert got[:4196] == b"\xee" * 4196
    assert got[4196 + 3 * 4096:] == b"\xee" * (SIZE - 4196 - 3 * 4096)
    assert os.fstat(image).st_size == SIZE


def test_trim_punches_a_hole_in_a_regular_file(image):
    before = os.fstat(image).st_blocks
    apply_record(image, rec(1, 0, op=OP_TRIM, length=SIZE)[0])
    assert os.fstat(image).st_blocks < before
    assert read_file(image, SIZE) == bytes(SIZE)


def test_zeroing_falls_back_to_writing_zeros_where_punching_is_refused(image, monkeypatch):
    calls = []

    def refuse(fd, mode, off, length):
        calls.append((off, length))
        applier.ctypes.set_errno(applier.errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(applier, "_fallocate", refuse)
    apply_record(image, rec(1, 3000, op=OP_ZERO, length=2 * 1024 * 1024)[0])
    assert calls == [(3000, SIZE - 3000)]  # clipped at end of file, like a punch
    got = read_file(image, SIZE)
    assert got[:3000] == b"\xee" * 3000 and got[3000:] == bytes(SIZE - 3000)
    assert os.fstat(image).st_size == SIZE  # zeroing never grows the image


def test_flush_fdatasyncs_the_image(image, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    apply_record(image, rec(1, op=OP_FLUSH)[0])
    assert synced == [image]


def test_record_past_the_end_of_the_image_is_refused(image):
    tok, raw = rec(9, SIZE - 10, fill(9, 20))
    with pytest.raises(ApplyError, match="record seq 9: write of 20 bytes at offset "
                                         f"{SIZE - 10} runs past the end"):
        apply_record(image, *record_data(raw), image_size=SIZE)
    assert os.fstat(image).st_size == SIZE


def test_run_with_adjacent_writes_matches_one_by_one_application(image, tmp_path):
    run = [rec(1, 0, fill(1, 4096)), rec(2, 4096, fill(2, 4096)), rec(3, 8192, fill(3, 100)),
           rec(4, 4000, fill(4, 200)),  # overlaps 1 and 2: must land after them
           rec(5, 4200, fill(5, 10)), rec(6, 100, op=OP_ZERO, length=50),
           rec(7, 150, fill(7, 30)), rec(8, op=OP_FLUSH), rec(9, 180, fill(9, 4000))]
    stats = apply_run({0: image}, (record_data(r) for _, r in run))
    model = ImageModel(SIZE)
    model.buf[:] = b"\xee" * SIZE
    for tok, raw in run:
        model.apply(tok, raw[48:48 + tok.data_len])
    got = read_file(image, SIZE)
    assert got == bytes(model.buf), first_diff(got, bytes(model.buf))
    assert stats.records == 9 and stats.last_seq == 9 and stats.flushes == 1
    # 1-3 merge into one pwritev, 4-5 are adjacent too, 7 and 9 follow zero/flush.
    assert stats.syscalls == 6


def test_run_applies_each_volume_to_its_own_image(image, tmp_path):
    fd1 = os.open(tmp_path / "vol1", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd1, 8192)
        apply_run({0: image, 1: fd1}, [record_data(rec(1, 0, b"A" * 100, volume=1)[1]),
                                       record_data(rec(2, 100, b"B" * 100, volume=0)[1]),
                                       record_data(rec(3, 100, b"C" * 100, volume=1)[1])])
        assert os.pread(fd1, 200, 0) == b"A" * 100 + b"C" * 100
        assert os.pread(image, 200, 0) == b"\xee" * 100 + b"B" * 100
        with pytest.raises(ApplyError, match="no image for volume 7"):
            apply_run({0: image}, [record_data(rec(4, 0, b"x", volume=7)[1])])
    finally:
        os.close(fd1)


def test_zero_range_past_end_of_file_does_nothing(image):
    assert zero_range(image, SIZE + 10, 100) == 0
    assert os.fstat(image).st_size == SIZE


def test_write_with_wrong_data_length_is_refused(image):
    tok, _ = rec(3, 0, b"abcd")
    with pytest.raises(ApplyError, match="write of 4 bytes given 3 data bytes"):
        apply_record(image, tok, b"abc")
    assert tok.op == OP_WRITE

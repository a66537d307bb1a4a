"""records_check_volumes (native/records.c): every record of a frame names
a volume of the resource and lies inside it, checked in one C call; the
secondary words the first bad one (replicator/secondary/pending.py)."""
from __future__ import annotations

import pytest

from replicator.native.records import first_outside_volumes
from replicator.records import HEADER_SIZE, OP_FLUSH, OP_MARK, OP_TRIM, OP_WRITE, encode_record
from replicator.secondary.pending import StreamError, check_volumes

SIZES = [1 << 20, 64 << 10]  # two volumes


def rec(seq: int, off: int, length: int, op: int = OP_WRITE, vol: int = 0) -> bytes:
    data = b"x" * length if op == OP_WRITE else b""
    return encode_record(seq, 1, off, length, op, data, volume=vol)


def test_records_inside_their_volumes_pass():
    buf = rec(1, 0, 4096) + rec(2, (64 << 10) - 4096, 4096, vol=1) + rec(3, 0, 0, OP_FLUSH)
    assert first_outside_volumes(buf, SIZES) is None
    check_volumes(buf, SIZES)


@pytest.mark.parametrize("bad, words", [
    (rec(2, 0, 4096, vol=2), "names volume 2"),
    (rec(2, 64 << 10, 4096, vol=1), "past the end of volume 1"),
    (rec(2, (1 << 64) - 4096, 8192, OP_TRIM), "past the end of volume 0"),  # would wrap
])
def test_the_first_bad_record_is_found_and_worded(bad, words):
    first = rec(1, 0, 4096)
    buf = first + bad + rec(3, 0, 4096)
    assert first_outside_volumes(buf, SIZES) == len(first)
    with pytest.raises(StreamError, match=words):
        check_volumes(buf, SIZES)


def test_flush_and_mark_carry_no_range():
    buf = rec(1, 123 << 30, 0, OP_FLUSH) + encode_record(2, 5, 7, 2, OP_MARK, b"{}")
    assert first_outside_volumes(buf, SIZES) is None


def test_tokens_are_headers_only():
    toks = rec(1, 0, 4096)[:HEADER_SIZE] + rec(2, 0, 4096, vol=5)[:HEADER_SIZE]
    assert first_outside_volumes(toks, SIZES, tokens_only=True) == HEADER_SIZE

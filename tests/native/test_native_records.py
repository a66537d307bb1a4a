"""records_check: a whole buffer of packed records checked in one C call,
agreeing with the Python decoder on what is good and what is not."""
from __future__ import annotations

import os
import struct

import pytest

from replicator.native.records import scan_records
from replicator.records import (OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO, RecordError,
                                encode_record, iter_records)


def _buffer() -> bytes:
    return b"".join([
        encode_record(1, 10, 0, 4096, OP_WRITE, os.urandom(4096)),
        encode_record(2, 11, 8192, 5, OP_WRITE, b"odd!!"),   # padded data
        encode_record(3, 12, 0, 65536, OP_TRIM),
        encode_record(4, 13, 0, 512, OP_ZERO),
        encode_record(5, 14, 0, 0, OP_FLUSH),
    ])


def test_good_buffer_counts_every_record():
    buf = _buffer()
    assert scan_records(buf) == (5, 5)  # count, highest seq
    assert [t.seq for t, _ in iter_records(buf)] == [1, 2, 3, 4, 5]
    assert scan_records(b"") == (0, 0)


@pytest.mark.parametrize("where", [60, 4096 + 48 + 3, 4096 + 48 + 48 + 8 + 40])
def test_any_flipped_byte_is_refused_and_named_by_the_python_path(where):
    bad = bytearray(_buffer())
    bad[where] ^= 0x40
    assert scan_records(bad) is None
    with pytest.raises(RecordError):
        list(iter_records(bad))


def test_truncated_and_misshapen_records_are_refused():
    buf = _buffer()
    assert scan_records(buf[:-1]) is None
    assert scan_records(buf[:30]) is None
    bad = bytearray(buf)
    bad[36] = 9  # unknown op of the first record
    assert scan_records(bad) is None
    bad = bytearray(buf)
    struct.pack_into("<I", bad, 28, 100)  # data_len differs from length
    assert scan_records(bad) is None

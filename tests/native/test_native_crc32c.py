"""CRC32C in the C core: published vectors on both code paths, agreement
between the paths, and continuation across split buffers."""
from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from replicator.native import crc32c as native
from replicator.crc32c import _crc32c_py

# RFC 3720 appendix B.4; the CRC bytes there are listed low byte first.
ISCSI_READ_PDU = bytes.fromhex(
    "01c00000" + "00" * 12 + "14000000" "00000400" "00000014" "00000018"
    "28000000" "00000000" "02000000" "00000000")

VECTORS = [
    pytest.param(b"123456789", 0xE3069283, id="check-123456789"),
    pytest.param(bytes(32), 0x8A9136AA, id="32-zeros"),
    pytest.param(b"\xff" * 32, 0x62A8AB43, id="32-ones"),
    pytest.param(bytes(range(32)), 0x46DD794E, id="ascending"),
    pytest.param(bytes(range(31, -1, -1)), 0x113FDB5C, id="descending"),
    pytest.param(ISCSI_READ_PDU, 0xD9963A56, id="iscsi-read-pdu"),
    pytest.param(b"", 0, id="empty"),
]

PATHS = [pytest.param(native.crc32c_sw, id="table"), pytest.param(native.crc32c_hw, id="sse42"),
         pytest.param(native.crc32c, id="dispatch")]


def test_this_machine_runs_the_sse42_path():
    # Every machine we build on has SSE4.2; if this fails, the "sse42" cases
    # below silently test the table path twice.
    assert native.crc32c_hw_available()


@pytest.mark.parametrize("fn", PATHS)
@pytest.mark.parametrize("data,expected", VECTORS)
def test_published_vectors_on_every_path(fn, data, expected):
    assert fn(data) == expected, f"{fn.__name__}({data[:8]!r}...) = {fn(data):#010x}, want {expected:#010x}"


@pytest.mark.parametrize("length", [1, 7, 8, 9, 63, 255, 256, 767, 768, 769, 4096,
                                    3 * 8192 - 1, 3 * 8192, 3 * 8192 + 13, 100_003, 1 << 20])
def test_paths_agree_on_random_data_at_every_alignment(length):
    rng = random.Random(length)
    blob = rng.randbytes(length + 8)
    mv = memoryview(blob)
    for start in range(8):
        piece = mv[start:start + length]
        sw, hw = native.crc32c_sw(piece), native.crc32c_hw(piece)
        assert sw == hw, f"length {length} start {start}: table {sw:#x} != sse42 {hw:#x}"
    if length <= 4096:
        assert native.crc32c_sw(mv[:length]) == _crc32c_py(mv[:length])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40_000), st.data())
def test_continuing_across_split_buffers_equals_one_shot(blob, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=4)))
    for fn in (native.crc32c_sw, native.crc32c_hw):
        crc, prev = 0, 0
        for cut in cuts + [len(blob)]:
            crc = fn(blob[prev:cut], crc)
            prev = cut
        assert crc == fn(blob), f"{fn.__name__} split at {cuts}"


def test_accepts_bytes_bytearray_and_memoryview():
    data = os.urandom(1000)
    want = native.crc32c(data)
    assert native.crc32c(bytearray(data)) == want
    assert native.crc32c(memoryview(data)) == want
    assert native.crc32c(memoryview(bytearray(b"x" + data))[1:]) == want


def test_replicator_crc32c_uses_the_native_core():
    from replicator import crc32c as shim
    assert shim._crc32c_native is native.crc32c
    assert shim.crc32c(b"123456789") == 0xE3069283

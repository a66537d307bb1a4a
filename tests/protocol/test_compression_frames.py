"""Compressed DATA and INCR_DATA frames (protocol/compression.py, DESIGN §9):
round trips through two Connections for zstd and lz4, the stored fallback
for data that does not shrink, the CRC over the uncompressed bytes, and a
decoder that refuses decompression bombs and malformed prefixes before
inflating anything."""
from __future__ import annotations

import os

import pytest

from replicator import records
from replicator.protocol import Data, IncrData
from replicator.protocol.compression import PREFIX, Compressor, decompress
from replicator.protocol.errors import FrameError, LocalProtocolError
from replicator.protocol.frames import (FLAG_COMPRESSED, HEADER, MAGIC, VERSION, FrameDecoder,
                                        FrameType, encode_compressed, encode_frame)

zstandard = pytest.importorskip("zstandard")
lz4_block = pytest.importorskip("lz4.block")

TEXT = b"".join(b"row %08d: the quick brown fox jumps over the lazy dog\n" % i
                for i in range(20000))  # ~1 MiB, compressible


def rec(seq: int, data: bytes, offset: int = 0) -> bytes:
    return records.encode_record(seq, 0, offset, len(data), records.OP_WRITE, data)


def _frames(data) -> list:
    dec = FrameDecoder()
    dec.feed(b"".join(bytes(p) for p in data) if isinstance(data, list) else data)
    out = []
    while (f := dec.next_frame()) is not None:
        out.append(f)
    return out


@pytest.mark.parametrize("codec, level", [("zstd", None), ("zstd", 9), ("lz4", None),
                                          ("lz4", 9)])
def test_data_and_incr_data_round_trip_compressed_between_connections(proto, codec, level):
    p, s = proto.establish(*proto.make_pair())
    p.compressor = Compressor(codec, level)
    payload = rec(11, TEXT[:512 << 10]) + rec(12, TEXT[:4096], offset=1 << 20)
    out = p.send(Data(payload))
    wire = sum(memoryview(x).nbytes for x in out)
    assert wire < len(payload) // 4, f"{codec}: {wire} bytes on the wire for {len(payload)}"
    (ev,) = proto.deliver(s, out)
    assert isinstance(ev, Data) and bytes(ev.payload) == payload
    assert ev.count == 2 and ev.max_seq == 12
    assert p.compressed_in == len(payload) and p.compressed_out < len(payload) // 4
    from replicator.protocol import IncrBegin
    proto.deliver(s, p.send(IncrBegin(1, 12, 1, 256 << 10)))
    out = p.send(IncrData(1, 65536, TEXT[:256 << 10]))
    (ev,) = proto.deliver(s, out)
    assert isinstance(ev, IncrData) and bytes(ev.data) == TEXT[:256 << 10]
    assert sum(memoryview(x).nbytes for x in out) < (256 << 10) // 4


def test_data_that_does_not_shrink_goes_stored(proto):
    p, s = proto.establish(*proto.make_pair())
    p.compressor = Compressor("zstd")
    payload = rec(11, os.urandom(256 << 10))
    out = p.send(Data(payload))
    header = bytes(out[0])[:16] if len(bytes(out[0])) >= 16 else bytes(out[1])[:16]
    assert not HEADER.unpack(header)[3] & FLAG_COMPRESSED  # the stored fallback
    (ev,) = proto.deliver(s, out)
    assert bytes(ev.payload) == payload
    assert encode_compressed(FrameType.DATA, [payload], Compressor("lz4")) is None


def _frame(ftype: int, flags: int, body: bytes, crc_over: bytes = b"") -> bytes:
    from replicator.crc32c import crc32c

    head = HEADER.pack(MAGIC, VERSION, ftype, flags, len(body), 0)
    crc = crc32c(crc_over, crc32c(head))
    return HEADER.pack(MAGIC, VERSION, ftype, flags, len(body), crc) + body


def test_the_crc_covers_the_uncompressed_payload():
    raw_a, raw_b = TEXT[:65536], TEXT[65536:131072]
    head, body = encode_compressed(FrameType.INCR_DATA, [raw_a], Compressor("zstd"))
    (f,) = _frames(head + body)
    assert f.flags & FLAG_COMPRESSED and bytes(f.payload) == raw_a
    # The same compressed bytes with a CRC over them (not over what they
    # decompress to) are refused: the check is on the bytes used.
    from replicator.crc32c import crc32c
    forged = _frame(FrameType.INCR_DATA, FLAG_COMPRESSED, body, crc_over=body)
    with pytest.raises(FrameError, match="CRC mismatch"):
        _frames(forged)
    # Another payload under A's CRC: refused after decompression.
    _, body_b = encode_compressed(FrameType.INCR_DATA, [raw_b], Compressor("zstd"))
    swapped = head[:8] + len(body_b).to_bytes(4, "little") + head[12:16] + body_b
    with pytest.raises(FrameError, match="CRC mismatch"):
        _frames(swapped)
    assert crc32c(b"") == 0


def _prefixed(codec: int, raw: int, data: bytes) -> bytes:
    return PREFIX.pack(codec, raw) + data


def test_a_zstd_bomb_is_refused_before_it_inflates():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))  # ~8 KiB
    # Declared small in the prefix, 256 MiB in the zstd frame: refused.
    with pytest.raises(FrameError, match="declares 268435456 bytes, the prefix 4096"):
        decompress("INCR_DATA", _prefixed(1, 4096, bomb), 64 << 20)
    # Declared as it is: above the frame limit, refused before decompressing.
    with pytest.raises(FrameError, match="above the maximum of 67108864"):
        decompress("INCR_DATA", _prefixed(1, 256 << 20, bomb), 64 << 20)
    # A zstd frame that does not declare its size: refused.
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 65536)
    with pytest.raises(FrameError, match="declares -1 bytes"):
        decompress("INCR_DATA", _prefixed(1, 65536, no_size), 64 << 20)


def test_an_lz4_block_larger_than_declared_is_refused():
    block = lz4_block.compress(b"\0" * (16 << 20), store_size=False)
    with pytest.raises(FrameError, match="does not decompress"):
        decompress("DATA", _prefixed(2, 4096, block), 64 << 20)


def test_a_bomb_in_a_frame_is_refused_by_the_decoder():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
    frame = _frame(FrameType.INCR_DATA, FLAG_COMPRESSED, _prefixed(1, 1 << 20, bomb))
    with pytest.raises(FrameError, match="the zstd frame declares"):
        _frames(frame)


@pytest.mark.parametrize("body, words", [
    (b"\x01\0\0", "shorter than its 8-byte prefix"),
    (_prefixed(9, 10, b"x"), "unknown codec 9"),
    (b"\x01\x01\0\0" + (10).to_bytes(4, "little") + b"x", "non-zero reserved"),
    (_prefixed(1, 0, b""), "empty payload"),
    (_prefixed(1, 100, b"not zstd at all"), "does not decompress"),
    (_prefixed(2, 100, b"\xff" * 20), "does not decompress"),
])
def test_malformed_compressed_payloads_are_frame_errors(body, words):
    with pytest.raises(FrameError, match=words):
        decompress("DATA", body, 64 << 20)


def test_compressed_flag_is_refused_on_other_frame_types():
    frame = _frame(FrameType.TOKENS, FLAG_COMPRESSED, b"x" * 48)
    with pytest.raises(FrameError, match="only DATA and INCR_DATA"):
        _frames(frame)
    with pytest.raises(LocalProtocolError):
        encode_compressed(FrameType.ACK, [b"x" * 100], Compressor("zstd"))


def test_levels_are_checked():
    with pytest.raises(LocalProtocolError, match="out of range"):
        Compressor("zstd", 40)
    with pytest.raises(LocalProtocolError, match="unknown compression"):
        Compressor("gzip")
    assert Compressor("zstd").level == 3 and Compressor("lz4").level == 0
    assert encode_frame  # the plain encoder is untouched


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(codec=st.sampled_from([1, 2]), raw=st.integers(1, 1 << 20), data=st.binary(max_size=512))
def test_arbitrary_compressed_bytes_are_a_frame_error_or_exactly_the_declared_size(codec, raw,
                                                                                  data):
    try:
        out = decompress("DATA", _prefixed(codec, raw, data), 1 << 20)
    except FrameError:
        return
    assert len(out) == raw

"""The frame codec: layout, CRC, streaming decode in any chunking, and every rejection."""
from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given, settings, strategies as st

from replicator.crc32c import crc32c
from replicator.protocol.errors import FrameError, LocalProtocolError
from replicator.protocol.frames import (DEFAULT_MAX_FRAME, FLAG_RECORDS_CRC, HEADER,
                                        HEADER_SIZE, MAGIC, MAX_CONTROL_PAYLOAD,
                                        FrameDecoder, FrameType,
                                        encode_frame, encode_header)


def decode_all(decoder: FrameDecoder) -> list:
    frames = []
    while (f := decoder.next_frame()) is not None:
        frames.append(f)
    return frames


def frame_with(ftype=FrameType.PING, payload=b"\x01" * 16, magic=MAGIC, version=1,
               flags=0, length=None, crc=None) -> bytes:
    """A frame built by hand, so tests can break any one field."""
    length = len(payload) if length is None else length
    head = struct.pack("<4sBBHII", magic, version, ftype, flags, length, 0)
    if crc is None:
        crc = crc32c(payload, crc32c(head))
    return struct.pack("<4sBBHII", magic, version, ftype, flags, length, crc) + payload


def test_crc32c_is_castagnoli():
    # The standard check value of CRC-32C; the frame CRC depends on it.
    assert crc32c(b"123456789") == 0xE3069283


def test_header_is_magic_version_type_flags_length_crc_over_header_and_payload():
    payload = b"seq and ts go here"
    frame = encode_frame(FrameType.PING, payload)
    magic, version, ftype, flags, length, crc = HEADER.unpack(frame[:HEADER_SIZE])
    assert (magic, version, ftype, flags, length) == (b"DPX1", 1, FrameType.PING, 0, len(payload))
    zeroed = frame[:12] + b"\0\0\0\0"
    assert crc == crc32c(zeroed + payload)
    assert frame[HEADER_SIZE:] == payload
    assert frame == frame_with(FrameType.PING, payload)


def test_frame_type_numbers_are_stable():
    # These numbers are on the wire: changing one breaks every deployed peer.
    assert {t.name: int(t) for t in FrameType} == {
        "HELLO": 0x01, "AUTH": 0x02, "STATE": 0x03, "TOKENS": 0x10, "DATA": 0x11,
        "FLUSH": 0x12, "INCR_BEGIN": 0x20, "INCR_DATA": 0x21, "INCR_COMMIT": 0x22, "INCR_ZERO": 0x23,
        "ACK": 0x30, "PING": 0x31, "PONG": 0x32, "BITMAP": 0x33, "RECEIVED": 0x34,
        "VERIFY_REQ": 0x40, "VERIFY_SUMS": 0x41, "GROUP": 0x50, "STOP": 0x70, "ERROR": 0x7F}


def test_encode_header_crc_over_parts_equals_crc_of_their_concatenation():
    parts = [b"head", bytearray(b"-middle-"), memoryview(b"0123456789")[2:7], b""]
    joined = b"".join(bytes(p) for p in parts)
    assert encode_header(FrameType.DATA, parts) == encode_frame(FrameType.DATA, joined)[:HEADER_SIZE]
    # a single buffer is one part, not a list of ints
    assert encode_header(FrameType.DATA, joined) == encode_header(FrameType.DATA, [joined])


def test_encode_header_refuses_unknown_type_and_wide_flags():
    with pytest.raises(LocalProtocolError, match="unknown frame type 0x99"):
        encode_header(0x99, [b""])
    with pytest.raises(LocalProtocolError, match="flags 65536 do not fit"):
        encode_header(FrameType.PING, [b""], flags=1 << 16)


def test_every_frame_type_round_trips_through_the_decoder():
    frames = [(t, bytes([int(t)]) * (3 * int(t) % 50)) for t in FrameType]
    dec = FrameDecoder()
    dec.feed(b"".join(encode_frame(t, p) for t, p in frames))
    got = decode_all(dec)
    assert [(f.type, bytes(f.payload), f.flags) for f in got] == [(t, p, 0) for t, p in frames]


def test_decoder_fed_byte_by_byte_yields_each_frame_once_complete():
    stream = encode_frame(FrameType.ACK, b"A" * 16) + encode_frame(FrameType.ERROR, b"\x01\x00bye")
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got += decode_all(dec)
        if i == HEADER_SIZE + 16 - 1:
            assert [f.type for f in got] == [FrameType.ACK]  # ready at its last byte, not later
    assert [(f.type, bytes(f.payload)) for f in got] == [(FrameType.ACK, b"A" * 16),
                                                         (FrameType.ERROR, b"\x01\x00bye")]
    assert dec.buffered == 0


frame_st = st.tuples(st.sampled_from(list(FrameType)), st.binary(max_size=300))


@settings(max_examples=150, deadline=None)
@given(frames=st.lists(frame_st, min_size=1, max_size=6), data=st.data())
def test_decoder_yields_the_same_frames_for_any_chunking(frames, data):
    stream = b"".join(encode_frame(t, p) for t, p in frames)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    dec = FrameDecoder()
    got = []
    for i, chunk in enumerate(chunks):
        # alternate bytes and bytearray inputs: both must work
        dec.feed(chunk if i % 2 else bytearray(chunk))
        got += decode_all(dec)
    dec.feed(b"")
    assert decode_all(dec) == []
    assert dec.at_eof
    assert [(f.type, bytes(f.payload)) for f in got] == frames


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=200), prefix_magic=st.booleans())
def test_garbage_input_raises_frame_error_and_nothing_else(garbage, prefix_magic):
    dec = FrameDecoder(max_frame=4096)
    dec.feed((MAGIC + garbage) if prefix_magic else garbage)
    dec.feed(b"")
    with pytest.raises(FrameError):
        decode_all(dec)


def test_bad_magic_is_rejected_naming_the_magic():
    dec = FrameDecoder()
    dec.feed(frame_with(magic=b"HTTP"))
    with pytest.raises(FrameError, match=r"bad frame magic b'HTTP', expected b'DPX1'"):
        dec.next_frame()


def test_unsupported_version_is_rejected_naming_both_versions():
    dec = FrameDecoder()
    dec.feed(frame_with(version=2))
    with pytest.raises(FrameError, match=r"unsupported frame version 2 \(this node speaks 1\)"):
        dec.next_frame()


def test_unknown_type_is_rejected_naming_the_type():
    dec = FrameDecoder()
    dec.feed(frame_with(ftype=0x13))
    with pytest.raises(FrameError, match="unknown frame type 0x13"):
        dec.next_frame()


def test_unknown_flags_are_rejected():
    dec = FrameDecoder()
    dec.feed(frame_with(flags=0x8000))
    with pytest.raises(FrameError, match="PING frame has unknown flags 0x8000"):
        dec.next_frame()


# DATA without FLAG_RECORDS_CRC: its frame CRC still covers the payload.
@pytest.mark.parametrize("ftype, size", [(FrameType.ACK, 16), (FrameType.DATA, 48)])
def test_crc_mismatch_in_payload_is_rejected(ftype, size):
    frame = bytearray(frame_with(ftype, b"\x07" * size))
    frame[-1] ^= 0x01
    dec = FrameDecoder()
    dec.feed(bytes(frame))
    with pytest.raises(FrameError, match=f"{ftype.name} frame of {size} bytes: CRC mismatch"):
        dec.next_frame()


def test_crc_covers_the_header_too():
    # PING and ACK both carry 16 bytes: retyping the frame keeps it well-formed
    # but must break its CRC.
    frame = bytearray(frame_with(FrameType.PING, b"\x07" * 16))
    frame[5] = FrameType.ACK
    dec = FrameDecoder()
    dec.feed(bytes(frame))
    with pytest.raises(FrameError, match="CRC mismatch"):
        dec.next_frame()


def test_records_crc_flag_makes_the_frame_crc_cover_the_header_only():
    # DATA payloads are records with CRCs of their own (checked by
    # messages.Data); the frame layer does not pass over the megabytes again.
    payload = b"records, each with its own crc"
    head = encode_header(FrameType.DATA, [payload], flags=FLAG_RECORDS_CRC)
    assert struct.unpack_from("<I", head, 12)[0] == crc32c(head[:12] + b"\0\0\0\0")
    damaged = bytearray(head + payload)
    damaged[-1] ^= 0x01
    dec = FrameDecoder()
    dec.feed(bytes(damaged))
    f = dec.next_frame()
    assert (f.type, f.flags, bytes(f.payload)) == (FrameType.DATA, FLAG_RECORDS_CRC,
                                                   bytes(damaged[HEADER_SIZE:]))
    # ... but the header still is covered.
    damaged = bytearray(head + payload)
    damaged[8] ^= 0x01  # length
    dec = FrameDecoder()
    dec.feed(bytes(damaged) + b"x")
    with pytest.raises(FrameError, match="DATA frame of 31 bytes: CRC mismatch"):
        dec.next_frame()


@pytest.mark.parametrize("ftype", [FrameType.TOKENS, FrameType.INCR_DATA, FrameType.ACK])
def test_records_crc_flag_is_refused_on_other_frames(ftype):
    dec = FrameDecoder()
    dec.feed(frame_with(ftype, b"\x07" * 48, flags=FLAG_RECORDS_CRC))
    with pytest.raises(FrameError, match=f"{ftype.name} frame has flag RECORDS_CRC, which only "
                                         f"DATA frames may carry"):
        dec.next_frame()
    with pytest.raises(LocalProtocolError, match=f"cannot encode: {ftype.name} frame has flag"):
        encode_header(ftype, [b"x"], flags=FLAG_RECORDS_CRC)


def test_oversized_length_is_rejected_from_the_header_before_buffering_the_payload():
    dec = FrameDecoder(max_frame=1 << 20)
    dec.feed(frame_with(FrameType.DATA, b"", length=(1 << 20) + 1)[:HEADER_SIZE] + b"x" * 100)
    with pytest.raises(FrameError, match=r"DATA frame announces 1048577 payload bytes, "
                                         r"above the maximum of 1048576"):
        dec.next_frame()
    assert dec.allocated == HEADER_SIZE, "the decoder allocated a payload buffer"
    assert dec.buffered == HEADER_SIZE


def test_hostile_4gib_length_costs_no_memory():
    tracemalloc.start()
    try:
        dec = FrameDecoder()  # default 64 MiB limit
        dec.feed(frame_with(FrameType.DATA, b"", length=0xFFFFFFFF)[:HEADER_SIZE])
        with pytest.raises(FrameError, match="above the maximum of 67108864"):
            dec.next_frame()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"decoding a hostile header peaked at {peak} bytes"
    assert DEFAULT_MAX_FRAME == 64 << 20


def test_control_frames_are_limited_to_64k_even_when_bulk_may_be_larger():
    dec = FrameDecoder()
    dec.feed(frame_with(FrameType.HELLO, b"", length=MAX_CONTROL_PAYLOAD + 1)[:HEADER_SIZE])
    with pytest.raises(FrameError, match=f"HELLO frame announces {MAX_CONTROL_PAYLOAD + 1} "
                                         f"payload bytes, above the maximum of {MAX_CONTROL_PAYLOAD}"):
        dec.next_frame()
    assert dec.allocated == HEADER_SIZE


def test_frame_at_exactly_the_maximum_is_accepted():
    dec = FrameDecoder(max_frame=4096)
    dec.feed(encode_frame(FrameType.DATA, b"z" * 4096))
    (f,) = decode_all(dec)
    assert bytes(f.payload) == b"z" * 4096


def test_eof_inside_a_header_is_a_truncated_frame():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.PING, b"p" * 16)[:9])
    assert dec.next_frame() is None
    dec.feed(b"")
    with pytest.raises(FrameError, match=r"connection closed inside a frame header \(9 of 16 bytes\)"):
        dec.next_frame()


def test_eof_inside_a_payload_is_a_truncated_frame():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.DATA, b"d" * 100)[:HEADER_SIZE + 40])
    assert dec.next_frame() is None
    dec.feed(b"")
    with pytest.raises(FrameError, match=r"connection closed inside a DATA frame "
                                         r"\(40 of 100 payload bytes\)"):
        dec.next_frame()


def test_clean_eof_between_frames_is_not_an_error():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.PING, b"p" * 16))
    dec.feed(b"")
    assert len(decode_all(dec)) == 1
    assert dec.next_frame() is None and dec.at_eof


def test_frames_before_a_bad_frame_are_returned_and_the_error_is_sticky():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.PING, b"p" * 16) + frame_with(magic=b"XXXX"))
    assert dec.next_frame().type is FrameType.PING
    with pytest.raises(FrameError, match="bad frame magic") as first:
        dec.next_frame()
    with pytest.raises(FrameError) as second:
        dec.next_frame()
    assert second.value is first.value


def test_feeding_after_eof_is_a_local_error():
    dec = FrameDecoder()
    dec.feed(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        dec.feed(b"more")


def test_payload_within_one_received_chunk_is_a_slice_of_it_not_a_copy():
    chunk = encode_frame(FrameType.DATA, b"r" * 1000) + encode_frame(FrameType.PING, b"p" * 16)
    dec = FrameDecoder()
    dec.feed(chunk)
    data, ping = decode_all(dec)
    assert data.payload.obj is chunk and ping.payload.obj is chunk
    assert data.payload.readonly
    assert dec.allocated == HEADER_SIZE  # no payload buffer was ever needed


def test_payload_split_across_chunks_is_assembled_into_one_buffer():
    frame = encode_frame(FrameType.DATA, bytes(range(256)) * 4)
    dec = FrameDecoder()
    dec.feed(frame[:100])
    assert dec.next_frame() is None
    assert dec.allocated == HEADER_SIZE + 1024  # one buffer, exactly the payload
    dec.feed(frame[100:])
    (f,) = decode_all(dec)
    assert bytes(f.payload) == bytes(range(256)) * 4
    assert f.payload.readonly


def test_a_reused_receive_buffer_does_not_corrupt_pending_frames():
    # Shells that recv_into one bytearray overwrite it on the next read.
    frame = encode_frame(FrameType.ACK, b"a" * 16)
    buf = bytearray(frame[:20])
    dec = FrameDecoder()
    dec.feed(buf)
    buf[:] = b"\xff" * 20
    dec.feed(frame[20:])
    (f,) = decode_all(dec)
    assert bytes(f.payload) == b"a" * 16


def test_a_large_payload_can_be_received_in_place_without_a_chunk_copy():
    """The rest of a payload being assembled is offered as a buffer to
    recv_into; the frame that comes out is the one that was sent."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    wire = encode_frame(FrameType.DATA, payload)
    dec = FrameDecoder()
    assert dec.payload_space() is None  # nothing begun
    dec.feed(wire[:HEADER_SIZE + 1000])
    assert dec.next_frame() is None
    space = dec.payload_space()
    assert space is not None and len(space) == len(payload) - 1000
    rest = wire[HEADER_SIZE + 1000:]
    space[:300_000] = rest[:300_000]
    dec.received_into(300_000)
    assert dec.next_frame() is None
    dec.feed(rest[300_000:400_000])       # a chunk again: no space offered while it waits
    assert dec.payload_space() is None
    assert dec.next_frame() is None
    space = dec.payload_space()
    space[:] = rest[400_000:]
    dec.received_into(len(rest) - 400_000)
    frame = dec.next_frame()
    assert frame.type is FrameType.DATA and bytes(frame.payload) == payload
    assert dec.payload_space() is None


def test_received_into_more_than_the_offered_space_is_refused():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.DATA, bytes(5000))[:HEADER_SIZE + 10])
    assert dec.next_frame() is None
    with pytest.raises(LocalProtocolError, match="payload space"):
        dec.received_into(6000)


def test_received_into_zero_is_eof_inside_the_frame():
    dec = FrameDecoder()
    dec.feed(encode_frame(FrameType.DATA, bytes(5000))[:HEADER_SIZE + 10])
    assert dec.next_frame() is None
    dec.received_into(0)
    with pytest.raises(FrameError, match="closed inside a DATA frame"):
        dec.next_frame()


def test_payloads_are_assembled_in_buffers_from_the_given_allocator():
    # The secondary passes an allocator that does not zero the memory; every
    # byte must then come from the stream, whichever way it arrives.
    asked = []

    def allocate(n):
        asked.append(n)
        return memoryview(bytearray(b"\xee" * n))

    big = bytes(range(256)) * 64
    frame = encode_frame(FrameType.DATA, big)
    dec = FrameDecoder(allocate=allocate)
    dec.feed(frame[:1000])                     # assembled: copied from chunks
    assert dec.next_frame() is None
    space = dec.payload_space()
    space[:5000] = frame[1000:6000]            # ... and received in place
    dec.received_into(5000)
    dec.feed(frame[6000:] + encode_frame(FrameType.PING, b"\x01" * 16))
    f = dec.next_frame()
    assert bytes(f.payload) == big and f.payload.readonly
    assert dec.next_frame().type == FrameType.PING  # sliced from its chunk: no allocation
    assert asked == [len(big)]


def test_an_allocator_giving_the_wrong_buffer_is_a_local_error():
    dec = FrameDecoder(allocate=lambda n: bytearray(n - 1))
    dec.feed(encode_frame(FrameType.DATA, b"x" * 100)[:50])
    with pytest.raises(LocalProtocolError, match="the payload allocator gave 99 bytes"):
        dec.next_frame()

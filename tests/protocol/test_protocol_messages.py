"""Messages: every one round-trips, and decode refuses anything not exactly right."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from replicator import records
from replicator.protocol.errors import ProtocolError
from replicator.protocol.frames import FrameType
from replicator.protocol.messages import (MESSAGE_CLASSES, OosBitmap, VerifyReq, VerifySums, IncrZero, STATE_NEEDS_RESYNC, Ack, Auth, Data,
                                          Error, Flush, Hello, IncrBegin, IncrCommit, IncrData,
                                          GroupFrame, Ping, Pong, Received, State, Stop, Tokens, decode_message,
                                          truncate_utf8)

U64 = (1 << 64) - 1
UUID_A = bytes.fromhex("00112233445566778899aabbccddeeff")
UUID_B = bytes.fromhex("ffeeddccbbaa99887766554433221100")


def two_records() -> bytes:
    return (records.encode_record(7, 1000, 4096, 5, records.OP_WRITE, b"hello", volume=1)
            + records.encode_record(8, 1001, 0, 1 << 20, records.OP_TRIM))


EXAMPLES = [
    Hello(1, "r0", "alpha.example", "primary", bytes(range(32))),
    Hello(1, "ressource-é", "β-node", "secondary", b"\xff" * 32),
    Auth(bytes(range(32, 64))),
    State(UUID_A, UUID_B, 1 << 40, 65536, "primary", "UpToDate", written_seq=U64,
          oldest_held_seq=17, flags=STATE_NEEDS_RESYNC),
    State(bytes(16), UUID_B, 512, 512, "secondary", "Inconsistent", journaled_seq=9,
          applied_seq=8, history=(UUID_A, UUID_B)),
    Tokens(b"".join(t.pack() for t, _ in records.iter_records(two_records()))),
    Data(two_records()),
    Flush(U64),
    IncrBegin(3, 1000, 12, 12 * 65536),
    IncrData(3, 65536, b"track bytes", volume=2),
    IncrCommit(3, 1999),
    Ack(10, 9),
    Ping(42, 1_700_000_000_000_000_000),
    Pong(42, 1_700_000_000_000_000_000, 1_700_000_000_000_500_000),
    Error(4, "peer node beta serves resource 'r1', this node serves 'r0'"),
    Error(65535, ""),
    OosBitmap(65536, 20, b"\x05\x00\x08"),
    VerifyReq(1, 256, 256, 99),
    IncrZero(3, 131072, 65536),
    VerifySums(1, 256, 100, (0, 0xFFFFFFFF, 12345)),
    GroupFrame(b'{"type":"reset","n":7}'),
    Stop(1234, 1_700_000_000_000_000_000),
    Received(4321),
]


def test_there_is_one_message_class_per_frame_type():
    assert set(MESSAGE_CLASSES) == set(FrameType)
    assert {type(m).TYPE for m in EXAMPLES} == set(FrameType)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    payload = msg.encode()
    again = decode_message(msg.TYPE, payload)
    assert again == msg
    assert again.encode() == payload
    assert b"".join(bytes(p) for p in msg.encode_parts()) == payload


def test_hello_layout_is_fixed_part_then_names():
    h = Hello(1, "r0", "alpha", "secondary", b"N" * 32)
    assert h.encode() == struct.pack("<HBB32sBB", 1, 2, 0, b"N" * 32, 2, 5) + b"r0alpha"


def test_state_layout_is_88_bytes_plus_16_per_history_uuid():
    s = State(UUID_A, UUID_B, 4096, 4096, "primary", "Outdated", 1, 2, 3, 4, 0, (UUID_A,))
    raw = s.encode()
    assert len(raw) == 88 + 16
    assert raw[:32] == UUID_A + UUID_B
    assert struct.unpack_from("<QIBBBB", raw, 32) == (4096, 4096, 1, 4, 1, 0)
    assert struct.unpack_from("<QQQQI", raw, 48) == (1, 2, 3, 4, 0)


def test_tokens_keep_the_raw_headers_and_decode_them():
    raw = b"".join(t.pack() for t, _ in records.iter_records(two_records()))
    msg = Tokens.decode(memoryview(raw))
    assert msg.payload == raw
    assert [(t.seq, t.offset, t.length, t.op) for t in msg.tokens] == [
        (7, 4096, 5, records.OP_WRITE), (8, 0, 1 << 20, records.OP_TRIM)]
    assert Tokens.of(msg.tokens) == msg


def test_data_keeps_a_view_of_the_received_bytes_and_checked_records():
    buf = two_records()
    msg = Data.decode(memoryview(buf))
    assert msg.payload.obj is buf, "DATA payload was copied"
    (t1, d1), (t2, d2) = msg.records
    assert (t1.seq, bytes(d1), t2.seq, bytes(d2)) == (7, b"hello", 8, b"")
    assert d1.obj is buf, "record data was copied"


def test_incr_data_keeps_a_view_of_its_data():
    payload = IncrData(1, 0, b"x" * 100).encode()
    msg = IncrData.decode(memoryview(payload))
    assert msg.data.obj is payload and bytes(msg.data) == b"x" * 100


def test_pong_gives_rtt_and_clock_offset():
    ping = Ping(1, send_ts_ns=1000)
    pong = Pong.answer(ping, now_ns=50_600)     # peer clock is ~50 us ahead
    assert pong == Pong(1, 1000, 50_600)
    assert pong.rtt_ns(recv_ts_ns=2200) == 1200
    assert pong.clock_offset_ns(recv_ts_ns=2200) == 50_600 - 1600


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16), st.integers(0, U64), st.integers(9, 31),
       st.sampled_from(["primary", "secondary"]),
       st.sampled_from(["UpToDate", "Consistent", "Inconsistent", "Outdated"]),
       st.lists(st.integers(0, U64), min_size=4, max_size=4), st.sampled_from([0, 1]),
       st.lists(st.binary(min_size=16, max_size=16), max_size=8))
def test_any_valid_state_round_trips(ruuid, gen, size, shift, role, disk, seqs, flags, hist):
    s = State(ruuid, gen, size, 1 << shift, role, disk, *seqs, flags, tuple(hist))
    assert State.decode(s.encode()) == s


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=60).filter(str.isprintable),
       st.text(min_size=1, max_size=60).filter(str.isprintable), st.binary(min_size=32, max_size=32),
       st.sampled_from(["primary", "secondary"]))
def test_any_valid_hello_round_trips(resource, node, nonce, role):
    h = Hello(1, resource, node, role, nonce)
    assert Hello.decode(h.encode()) == h


# -- strict decoding: each problem named ----------------------------------

@pytest.mark.parametrize("cls,size", [(Ack, 16), (Ping, 16), (Pong, 24), (Flush, 8),
                                      (IncrBegin, 32), (IncrCommit, 16), (Auth, 32)])
def test_fixed_size_messages_refuse_any_other_length(cls, size):
    name = cls.TYPE.name
    for bad in (size - 1, size + 1, 0):
        with pytest.raises(ProtocolError, match=f"^{name}: payload is {bad} bytes, expected {size}$"):
            cls.decode(b"\0" * bad)


def test_hello_refuses_unknown_role():
    raw = bytearray(Hello(1, "r0", "a", "primary", b"n" * 32).encode())
    raw[2] = 9
    with pytest.raises(ProtocolError, match="HELLO: field role has unknown value 9"):
        Hello.decode(bytes(raw))


def test_hello_refuses_nonzero_reserved_byte():
    raw = bytearray(Hello(1, "r0", "a", "primary", b"n" * 32).encode())
    raw[3] = 1
    with pytest.raises(ProtocolError, match="HELLO: field reserved is 1, must be zero"):
        Hello.decode(bytes(raw))


def test_hello_refuses_names_that_are_not_utf8():
    raw = struct.pack("<HBB32sBB", 1, 1, 0, b"n" * 32, 2, 1) + b"\xff\xfeA"
    with pytest.raises(ProtocolError, match="HELLO: field resource is not valid UTF-8"):
        Hello.decode(raw)


def test_hello_refuses_a_length_that_disagrees_with_the_names():
    raw = Hello(1, "r0", "alpha", "primary", b"n" * 32).encode()
    with pytest.raises(ProtocolError, match="HELLO: payload is 46 bytes, expected 45"):
        Hello.decode(raw + b"!")
    with pytest.raises(ProtocolError, match="HELLO: payload is 10 bytes, shorter than its 38-byte"):
        Hello.decode(raw[:10])


def test_hello_refuses_control_characters_and_empty_names():
    with pytest.raises(ProtocolError, match=r"HELLO: field node 'a\\nb' contains control"):
        Hello(1, "r0", "a\nb", "primary", b"n" * 32)
    with pytest.raises(ProtocolError, match="HELLO: field resource is empty"):
        Hello(1, "", "a", "primary", b"n" * 32)


def test_hello_refuses_a_short_nonce():
    with pytest.raises(ProtocolError, match="HELLO: field nonce is 31 bytes, expected 32"):
        Hello(1, "r0", "a", "primary", b"n" * 31)


def test_state_refuses_unknown_disk_state_and_role():
    raw = bytearray(EXAMPLES[3].encode())
    raw[45] = 9
    with pytest.raises(ProtocolError, match="STATE: field disk has unknown value 9"):
        State.decode(bytes(raw))
    raw = bytearray(EXAMPLES[3].encode())
    raw[44] = 0
    with pytest.raises(ProtocolError, match="STATE: field role has unknown value 0"):
        State.decode(bytes(raw))
    with pytest.raises(ProtocolError, match="STATE: field disk is 'Diskless', expected one of"):
        State(UUID_A, UUID_B, 0, 4096, "primary", "Diskless")


def test_state_refuses_unknown_flags_and_bad_track_size():
    with pytest.raises(ProtocolError, match="STATE: field flags has unknown bits 0x00000100"):
        State(UUID_A, UUID_B, 0, 4096, "primary", "UpToDate", flags=0x101)
    with pytest.raises(ProtocolError, match="STATE: field track_size 5000 is not a power of two"):
        State(UUID_A, UUID_B, 0, 5000, "primary", "UpToDate")


def test_state_refuses_a_history_count_the_payload_does_not_carry():
    raw = bytearray(EXAMPLES[4].encode())  # two history UUIDs
    raw[46] = 3
    with pytest.raises(ProtocolError, match="STATE: payload is 120 bytes, expected 136"):
        State.decode(bytes(raw))
    raw[46] = 9
    with pytest.raises(ProtocolError, match="STATE: field history count 9 is above 8"):
        State.decode(bytes(raw))


def test_state_refuses_out_of_range_seq():
    with pytest.raises(ProtocolError, match=r"STATE: field applied_seq value -1 is out of range"):
        State(UUID_A, UUID_B, 0, 4096, "secondary", "Consistent", applied_seq=-1)


def test_tokens_refuse_a_partial_header_and_a_bad_op():
    raw = Tokens.decode(EXAMPLES[5].encode()).payload
    with pytest.raises(ProtocolError, match="TOKENS: field payload is invalid: token list of 95 "
                                            "bytes is not a multiple of 48"):
        Tokens.decode(raw[:-1])
    bad = bytearray(raw)
    bad[36] = 77  # op of the first token
    with pytest.raises(ProtocolError, match="TOKENS: field payload is invalid: record seq 7: "
                                            "unknown op 77"):
        Tokens.decode(bytes(bad))
    with pytest.raises(ProtocolError, match="TOKENS: field payload is empty"):
        Tokens.decode(b"")


def test_data_refuses_a_record_with_a_bad_crc_or_truncated_data():
    bad = bytearray(two_records())
    bad[48] ^= 0xFF  # first data byte of seq 7
    with pytest.raises(ProtocolError, match="DATA: field payload is invalid: record seq 7: CRC mismatch"):
        Data.decode(bytes(bad))
    with pytest.raises(ProtocolError, match="DATA: field payload is invalid: record seq 7: data "
                                            "runs past the end"):
        Data.decode(two_records()[:52])
    with pytest.raises(ProtocolError, match="DATA: field payload is empty"):
        Data.decode(b"")


def test_incr_data_refuses_empty_data_and_nonzero_reserved():
    with pytest.raises(ProtocolError, match="INCR_DATA: payload is 24 bytes, shorter than its 25-byte"):
        IncrData.decode(struct.pack("<QQII", 1, 0, 0, 0))
    with pytest.raises(ProtocolError, match="INCR_DATA: field reserved is not zero"):
        IncrData.decode(struct.pack("<QQII", 1, 0, 0, 5) + b"x")


def test_error_refuses_invalid_utf8_and_overlong_messages():
    with pytest.raises(ProtocolError, match="ERROR: field message is not valid UTF-8"):
        Error.decode(b"\x01\x00\xc3")
    with pytest.raises(ProtocolError, match="ERROR: field message is 4097 bytes of UTF-8, "
                                            "above the limit of 4096"):
        Error.decode(b"\x01\x00" + b"m" * 4097)


def test_truncate_utf8_never_splits_a_character():
    assert truncate_utf8("é" * 3000, 4095) == "é" * 2047


@settings(max_examples=300, deadline=None)
@given(ftype=st.sampled_from(list(FrameType)), payload=st.binary(max_size=200))
def test_any_payload_decodes_or_raises_protocol_error_and_nothing_else(ftype, payload):
    try:
        msg = decode_message(ftype, payload)
    except ProtocolError as e:
        assert str(e).startswith(ftype.name + ":"), f"error does not name the message: {e}"
    else:
        assert msg.encode() == payload  # whatever decodes re-encodes to the same bytes


def test_bitmap_lists_its_tracks_and_refuses_a_wrong_length():
    bm = OosBitmap(65536, 20, b"\x05\x00\x08")
    assert bm.tracks() == [0, 2, 19]
    with pytest.raises(ProtocolError, match="bits"):
        OosBitmap(65536, 20, b"\x05\x00")

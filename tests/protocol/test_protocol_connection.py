"""Two Connections back to back, no sockets: handshake, refusals, and replication traffic."""
from __future__ import annotations

import tracemalloc

import pytest

from replicator import records
from replicator.protocol import (CLOSED, NEED_DATA, Ack, Connection, Data, Error, ErrorCode,
                                 FrameError, Flush, Hello, IncrBegin, IncrCommit, IncrData,
                                 LocalProtocolError, Ping, Pong, ProtocolError, Tokens)
from replicator.protocol.frames import (FLAG_RECORDS_CRC, HEADER_SIZE, FrameType, encode_frame,
                                        encode_header)
from replicator.protocol.state import (AUTH_SENT, AUTHENTICATING, ESTABLISHED, IDLE, NEGOTIATING,
                                       STATE_SENT, TRANSITIONS, PartyState)


def rec(seq: int, data: bytes = b"", op: int = records.OP_WRITE, offset: int = 0) -> bytes:
    length = len(data) if op == records.OP_WRITE else 4096
    return records.encode_record(seq, 1_700_000_000_000_000_000 + seq, offset, length, op, data)


def tokens_of(*recs: bytes) -> Tokens:
    return Tokens.of(t for r in recs for t, _ in records.iter_records(r))


# -- the table ------------------------------------------------------------

def test_before_both_are_authenticated_only_hello_auth_and_error_can_pass():
    for role, table in TRANSITIONS.items():
        for state in (IDLE, AUTHENTICATING, AUTH_SENT):
            assert {t.name for t in table[state]} <= {"HELLO", "AUTH", "ERROR"}, (role, state)


def test_established_lets_the_primary_stream_and_the_secondary_only_ack():
    assert {t.name for t in TRANSITIONS["primary"][ESTABLISHED]} == {
        "TOKENS", "DATA", "FLUSH", "INCR_BEGIN", "INCR_DATA", "INCR_COMMIT", "INCR_ZERO", "VERIFY_REQ", "PING", "PONG",
        "STOP", "ERROR"}
    assert {t.name for t in TRANSITIONS["secondary"][ESTABLISHED]} == {"ACK", "RECEIVED", "BITMAP", "VERIFY_SUMS",
                                                                        "PING", "PONG", "STOP", "ERROR"}


def test_every_live_state_allows_error():
    for role, table in TRANSITIONS.items():
        for state, moves in table.items():
            if state is not PartyState.CLOSED:
                assert moves[FrameType.ERROR] is PartyState.CLOSED, (role, state)


# -- the handshake ---------------------------------------------------------

def test_full_handshake_reaches_established_on_both_sides(proto):
    p, s = proto.make_pair()
    assert p.state is IDLE and p.peer_state is IDLE
    p_events, s_events = proto.authenticate(p, s)
    assert [type(e) for e in s_events] == [Hello, type(p_events[1])]
    assert [type(e).__name__ for e in p_events] == ["Hello", "Auth"]
    assert p.peer.node == "beta" and s.peer.node == "alpha"
    assert p.state is p.peer_state is s.state is s.peer_state is NEGOTIATING

    p_state = proto.make_state("primary", written_seq=10, oldest_held_seq=1)
    s_state = proto.make_state("secondary", journaled_seq=4, applied_seq=3)
    assert proto.deliver(s, p.send(p_state)) == [p_state]
    assert p.state is STATE_SENT and s.peer_state is STATE_SENT and not p.established
    assert proto.deliver(p, s.send(s_state)) == [s_state]
    assert p.established and s.established
    assert p.peer_state_msg == s_state and s.peer_state_msg == p_state
    assert p.local_state_msg == p_state


def test_states_may_cross_on_the_wire(proto):
    p, s = proto.make_pair()
    proto.authenticate(p, s)
    to_s = p.send(proto.make_state("primary"))
    to_p = s.send(proto.make_state("secondary"))
    proto.deliver(s, to_s)
    proto.deliver(p, to_p)
    assert p.established and s.established


def test_the_peer_hello_may_arrive_before_we_initiate(proto):
    p, s = proto.make_pair()
    s_hello = s.initiate()
    assert proto.deliver(p, s_hello)[0].node == "beta"
    assert p.data_to_send() == b"", "AUTH queued before our own HELLO"
    out = p.initiate()  # now HELLO and AUTH together, in that order
    assert out[5] == FrameType.HELLO
    events = proto.deliver(s, out)
    assert [type(e).__name__ for e in events] == ["Hello", "Auth"]
    proto.deliver(p, s.data_to_send())
    assert p.state is NEGOTIATING and s.state is NEGOTIATING


def test_send_puts_queued_auth_in_front_if_the_caller_forgot_data_to_send(proto):
    p, s = proto.make_pair()
    p_hello = p.initiate()
    proto.deliver(p, s.initiate())           # p has queued its AUTH
    s_events = proto.deliver(s, p_hello)     # s queues its AUTH
    proto.deliver(p, s.data_to_send())
    assert p.state is NEGOTIATING
    # p never called data_to_send(): its AUTH must precede its STATE
    out = p.send(proto.make_state("primary"))
    events = proto.deliver(s, out)
    assert [type(e).__name__ for e in s_events + events] == ["Hello", "Auth", "State"]


def test_a_peer_of_another_resource_is_refused_naming_both(proto):
    p = Connection("primary", "r0", "alpha", proto.SECRET)
    s = Connection("secondary", "r1", "beta", proto.SECRET)
    p.initiate()
    with pytest.raises(ProtocolError, match="peer node beta serves resource 'r1', this node "
                                            "serves 'r0'") as exc:
        proto.deliver(p, s.initiate())
    assert exc.value.code == ErrorCode.WRONG_RESOURCE
    assert p.data_to_send() == b"", "AUTH sent to a peer of another resource"


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_two_nodes_of_the_same_role_are_refused(proto, role):
    a = Connection(role, "r0", "alpha", proto.SECRET)
    b = Connection(role, "r0", "beta", proto.SECRET)
    a.initiate()
    with pytest.raises(ProtocolError, match=f"peer node beta is also {role} of resource 'r0': "
                                            f"two {role}s refused") as exc:
        proto.deliver(a, b.initiate())
    assert exc.value.code == ErrorCode.ROLE_CONFLICT


def test_another_protocol_version_is_refused(proto):
    p, _ = proto.make_pair()
    p.initiate()
    hello = Hello(2, "r0", "beta", "secondary", proto.S_NONCE)
    with pytest.raises(ProtocolError, match="peer node beta speaks protocol version 2, this "
                                            "node speaks 1"):
        proto.deliver(p, encode_frame(FrameType.HELLO, hello.encode()))


def test_a_state_contradicting_the_hello_role_is_refused(proto):
    p, s = proto.make_pair(check_state=False)
    proto.authenticate(p, s)
    lying = proto.make_state("primary")
    with pytest.raises(ProtocolError, match="STATE: peer node beta reports role primary but its "
                                            "HELLO said secondary"):
        proto.deliver(p, encode_frame(FrameType.STATE, lying.encode()))


def test_incompatible_states_are_refused_and_the_peer_learns_why(proto):
    p, s = proto.make_pair()
    proto.authenticate(p, s)
    proto.deliver(s, p.send(proto.make_state("primary")))
    small = proto.make_state("secondary", device_size=proto.DEVICE_SIZE // 2)
    with pytest.raises(ProtocolError, match=f"the primary's is {proto.DEVICE_SIZE} bytes, the "
                                            f"secondary's is {proto.DEVICE_SIZE // 2} bytes") as exc:
        s.send(small)  # s already knows p's STATE: the mismatch is found before sending
    events = proto.deliver(p, s.error_frame(exc.value))
    assert events == [Error(ErrorCode.STATE_MISMATCH, str(exc.value)), CLOSED]
    assert not p.established and p.next_event() is CLOSED


def test_the_primary_checks_the_secondary_state_on_receipt(proto):
    p, s = proto.make_pair()
    proto.authenticate(p, s)
    proto.deliver(s, p.send(proto.make_state("primary")))
    other = proto.make_state("secondary", track_size=4096)
    s.check_state = False  # only the primary checks, so the check on receipt is what runs
    with pytest.raises(ProtocolError, match="the secondary's is 4096 bytes, the primary's is 65536 bytes"):
        proto.deliver(p, s.send(other))


# -- out-of-state frames, refused by name -------------------------------------

def test_data_before_auth_is_refused_naming_frame_state_and_role(proto):
    p, s = proto.make_pair()
    s.initiate()
    proto.deliver(s, p.initiate())
    data = encode_frame(FrameType.DATA, rec(1, b"x" * 8))
    with pytest.raises(ProtocolError, match=r"^DATA frame while AUTHENTICATING \(role primary\)$"):
        proto.deliver(s, data)


def test_a_large_data_header_before_auth_is_refused_before_its_payload_is_buffered(proto):
    p, s = proto.make_pair()
    s.initiate()
    proto.deliver(s, p.initiate())
    header = encode_header(FrameType.DATA, [b"\0" * 100])[:12] + b"\0\0\0\0"
    header = header[:8] + (60 << 20).to_bytes(4, "little") + header[12:]
    tracemalloc.start()
    try:
        s.receive_data(header)
        with pytest.raises(ProtocolError, match=r"DATA frame while AUTHENTICATING \(role primary\)"):
            s.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"a refused 60 MiB DATA header cost {peak} bytes"
    assert s._decoder.allocated == HEADER_SIZE


def test_state_before_auth_is_refused(proto):
    p, s = proto.make_pair()
    p.initiate()
    proto.deliver(p, s.initiate())
    with pytest.raises(ProtocolError, match=r"^STATE frame while AUTHENTICATING \(role secondary\)$"):
        proto.deliver(p, encode_frame(FrameType.STATE, proto.make_state("secondary").encode()))


def test_a_second_hello_is_refused(proto):
    p, s = proto.make_pair()
    p.initiate()
    s_hello = s.initiate()
    proto.deliver(p, s_hello)
    with pytest.raises(ProtocolError, match=r"HELLO frame while AUTHENTICATING \(role secondary\)"):
        proto.deliver(p, s_hello)


def test_ack_from_the_primary_is_refused(established):
    p, s = established
    s.receive_data(encode_frame(FrameType.ACK, Ack(1, 1).encode()))
    with pytest.raises(ProtocolError, match=r"^ACK frame while ESTABLISHED \(role primary\)$"):
        s.next_event()


def test_tokens_from_the_secondary_are_refused(established):
    p, s = established
    p.receive_data(encode_frame(FrameType.TOKENS, tokens_of(rec(1, b"abc")).encode()))
    with pytest.raises(ProtocolError, match=r"^TOKENS frame while ESTABLISHED \(role secondary\)$"):
        p.next_event()


def test_a_protocol_error_is_sticky(established):
    p, s = established
    p.receive_data(encode_frame(FrameType.DATA, rec(1, b"abc")))
    with pytest.raises(ProtocolError) as first:
        p.next_event()
    with pytest.raises(ProtocolError) as again:
        p.next_event()
    assert again.value is first.value
    with pytest.raises(LocalProtocolError, match="cannot send PING: the connection failed"):
        p.send(Ping(1, 2))


def test_our_own_out_of_state_sends_are_local_errors(proto):
    p, s = proto.make_pair()
    p.initiate()
    with pytest.raises(LocalProtocolError, match=r"cannot send: DATA frame while AUTHENTICATING "
                                                 r"\(role primary\)"):
        p.send(Data(rec(1, b"abc")))
    p2, s2 = proto.establish(*proto.make_pair())
    with pytest.raises(LocalProtocolError, match=r"TOKENS frame while ESTABLISHED \(role secondary\)"):
        s2.send(tokens_of(rec(1, b"abc")))
    with pytest.raises(LocalProtocolError, match=r"ACK frame while ESTABLISHED \(role primary\)"):
        p2.send(Ack(1, 1))
    with pytest.raises(LocalProtocolError, match="HELLO is sent by the connection itself"):
        p2.send(Hello(1, "r0", "alpha", "primary", b"n" * 32))
    q, r = proto.make_pair()
    proto.authenticate(q, r)
    with pytest.raises(LocalProtocolError, match="STATE says role secondary but this connection "
                                                 "is the primary"):
        q.send(proto.make_state("secondary"))


def test_eof_mid_frame_is_an_error_and_clean_eof_closes(established):
    p, s = established
    frame = encode_frame(FrameType.ACK, Ack(5, 4).encode())
    p.receive_data(frame[:10])
    assert p.next_event() is NEED_DATA
    p.receive_data(b"")
    with pytest.raises(FrameError, match=r"connection closed inside a frame header \(10 of 16"):
        p.next_event()
    s.receive_data(b"")
    assert s.next_event() is CLOSED
    assert str(s.state) == "CLOSED" and s.next_event() is CLOSED


def test_a_received_error_closes_and_is_returned_as_an_event(established):
    p, s = established
    out = s.send(Error(ErrorCode.SHUTDOWN, "secondary beta stopping"))
    assert str(s.state) == "CLOSED"
    p.receive_data(out + encode_frame(FrameType.ACK, Ack(1, 1).encode()))
    assert p.next_event() == Error(ErrorCode.SHUTDOWN, "secondary beta stopping")
    assert p.next_event() is CLOSED  # nothing after ERROR is processed
    assert str(p.state) == str(p.peer_state) == "CLOSED"


# -- replication traffic once established -----------------------------------

def test_tokens_then_data_then_acks_flow_between_the_two_sides(proto, established):
    p, s = established
    r1, r2, r3 = rec(11, b"first write!"), rec(12, op=records.OP_TRIM), rec(13, b"x" * 4096, offset=8192)

    toks = tokens_of(r1, r2, r3)
    (got,) = proto.deliver(s, p.send(toks))
    assert [t.seq for t in got.tokens] == [11, 12, 13]
    assert got.payload == toks.payload

    (d1,) = proto.deliver(s, p.send(Data(r3)))          # data may come in any order
    (d2,) = proto.deliver(s, p.send(Data(r1 + r2)))
    assert [(t.seq, bytes(d)) for t, d in d1.records + d2.records] == [
        (13, b"x" * 4096), (11, b"first write!"), (12, b"")]

    assert proto.deliver(s, p.send(Flush(13))) == [Flush(13)]
    assert proto.deliver(p, s.send(Ack(journaled_seq=13, applied_seq=12))) == [Ack(13, 12)]

    ping = Ping(7, 1000)
    (got_ping,) = proto.deliver(s, p.send(ping))
    (pong,) = proto.deliver(p, s.send(Pong.answer(got_ping, now_ns=5000)))
    assert pong.rtt_ns(recv_ts_ns=3000) == 2000
    assert p.established and s.established


def test_data_is_sent_as_header_plus_the_callers_buffers(established):
    p, s = established
    payload = rec(11, b"ring bytes")
    out = p.send(Data(payload))
    assert isinstance(out, list) and len(out) == 2
    assert out[0] == encode_header(FrameType.DATA, [payload], flags=FLAG_RECORDS_CRC)
    assert bytes(out[1]) == payload


@pytest.mark.parametrize("where, why", [
    (HEADER_SIZE + 48 + 3, "record seq 11: CRC mismatch"),       # a data byte
    (HEADER_SIZE + 48 + 12, "record seq 11: padding after the data is not zero"),
    (HEADER_SIZE + 8, "record seq 11: CRC mismatch"),            # its timestamp
])
def test_a_damaged_data_frame_is_refused_by_its_record_crcs(established, where, why):
    # DATA frames carry FLAG_RECORDS_CRC: their frame CRC stops at the
    # header, so each record's own CRC (and zero padding) must catch this.
    p, s = established
    out = p.send(Data(rec(11, b"ring bytes")))  # 10 bytes of data: 6 of padding
    frame = bytearray(b"".join(bytes(x) for x in out))
    assert frame[6] == FLAG_RECORDS_CRC
    frame[where] ^= 0x40
    s.receive_data(bytes(frame))
    with pytest.raises(ProtocolError, match=f"DATA: field payload is invalid: {why}"):
        s.next_event()


def test_send_payload_ships_ring_spans_without_joining_them(proto, established):
    p, s = established
    ring = bytearray(rec(20, b"wrapped around the ring end") + rec(21, b"tail"))
    split = 30  # the ring wrapped inside the first record
    spans = [memoryview(ring)[:split], memoryview(ring)[split:]]
    out = p.send_payload(FrameType.DATA, spans)
    assert out[1] is spans[0] and out[2] is spans[1]
    (d,) = proto.deliver(s, out)
    assert [(t.seq, bytes(x)) for t, x in d.records] == [(20, b"wrapped around the ring end"),
                                                         (21, b"tail")]
    with pytest.raises(LocalProtocolError, match="send_payload\\(\\) carries TOKENS or DATA, not ACK"):
        p.send_payload(FrameType.ACK, [b"x"])


def test_received_data_is_a_view_of_the_received_chunk(established):
    p, s = established
    chunk = b"".join(bytes(b) for b in p.send(Data(rec(30, b"no copy please"))))
    s.receive_data(chunk)
    d = s.next_event()
    assert d.payload.obj is chunk
    assert d.records[0][1].obj is chunk


def test_increment_frames_pass_when_established(proto, established):
    p, s = established
    msgs = [IncrBegin(1, 13, 2, 8192), IncrData(1, 0, b"t" * 4096), IncrData(1, 65536, b"u" * 4096),
            IncrCommit(1, 13)]
    got = []
    for m in msgs:
        got += proto.deliver(s, p.send(m))
    assert got == msgs


def test_a_bulk_frame_above_max_frame_is_refused_on_send(proto):
    p, s = proto.establish(*proto.make_pair(max_frame=4096))
    with pytest.raises(LocalProtocolError, match="DATA payload of 5048 bytes is above the maximum "
                                                 "frame of 4096"):
        p.send(Data(rec(1, b"y" * 5000)))


def test_error_frame_names_the_problem_and_closes(proto, established):
    p, s = established
    s.receive_data(encode_frame(FrameType.DATA, b"\xff" * 48))
    with pytest.raises(ProtocolError) as exc:
        s.next_event()
    out = s.error_frame(exc.value)
    (err, closed) = proto.deliver(p, out)
    assert err.code == ErrorCode.PROTOCOL and err.message == str(exc.value)
    assert "DATA: field payload is invalid" in err.message
    assert closed is CLOSED


def test_the_secondary_sees_the_same_events_when_bytes_arrive_one_at_a_time(proto):
    p, s = proto.make_pair()
    hello = p.initiate()
    s_hello = s.initiate()
    events = []
    for i in range(len(hello)):
        events += proto.deliver(s, hello[i:i + 1])
    assert [type(e).__name__ for e in events] == ["Hello"]
    proto.deliver(p, s_hello + s.data_to_send())
    proto.deliver(s, p.data_to_send())
    proto.deliver(s, p.send(proto.make_state("primary")))
    proto.deliver(p, s.send(proto.make_state("secondary")))
    assert s.established

    r = rec(11, b"abc" * 100)
    stream = b"".join(bytes(b) for part in (p.send(tokens_of(r)), p.send(Data(r)), [p.send(Flush(11))])
                      for b in part)
    events = []
    for i in range(len(stream)):
        events += proto.deliver(s, stream[i:i + 1])
    assert events == [tokens_of(r), Data(r), Flush(11)]

"""The consistency group's control channel (replicator/protocol/group.py):
every message is checked against its schema in MESSAGES (exact fields, each
of its kind and bounds), any payload either decodes or raises ProtocolError,
and the HMAC handshake between a member and a master lets through only a
peer of the same group holding the same secret, in the other role."""
from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import event, given, settings, strategies as st

from replicator.protocol.errors import ErrorCode, ProtocolError
from replicator.protocol.frames import FrameType, encode_frame
from replicator.protocol.group import (DOMAIN, GROUP_VERSION, MAX_MESSAGE, MESSAGES,
                                       GroupConnection, GroupMessage, decode, encode,
                                       group_mac, make)

SECRET = b"g0 group secret, 32 bytes long!!"

# A valid value of each field kind of the schema table.
GOOD = {"u64": 7, "opt_u64": None, "name": "r1", "text": "why", "hex": "00ff",
        "side": "secondary", "role": "member", "names": ["r1", "r2"], "any": {"k": [1]}}

# Values each kind must refuse (and a word the error must carry).
BAD = {
    "u64": [-1, 1 << 64, "7", 7.0, True, None, [7]],
    "opt_u64": [-1, 1 << 64, "7", 1.5, False],
    "name": ["", "x" * 256, "é" * 128, 5, None, ["r1"]],
    "text": ["x" * 4097, 5, None],
    "hex": ["ABCD", "xyz", "0x12", 12, None],
    "side": ["tertiary", "", 1, None],
    "role": ["owner", "Member", "", None],
    "names": ["r1", [""], ["x" * 256], [1], ["r%d" % i for i in range(65)], None, {"r1": 1}],
    "any": [[1], "view", 1, None],
}


def good_fields(mtype: str) -> dict:
    return {name: GOOD[kind] for name, kind in MESSAGES[mtype].items()}


def payload_of(msg: GroupMessage) -> bytes:
    """The JSON payload of *msg*'s GROUP frame (the frame minus its header)."""
    return encode(msg)[16:]


# -- the schema table ---------------------------------------------------------


@pytest.mark.parametrize("mtype", sorted(MESSAGES))
def test_every_message_type_round_trips_through_its_frame(mtype):
    msg = make(mtype, **good_fields(mtype))
    frame = encode(msg)
    assert frame[:4] == b"DPX1"
    back = decode(frame[16:])
    assert back == msg
    assert back.type == mtype and back.fields == good_fields(mtype)


def test_an_unknown_type_is_refused_by_name():
    with pytest.raises(ProtocolError, match="unknown type 'gossip'"):
        make("gossip")
    with pytest.raises(ProtocolError, match="unknown type 'gossip'"):
        decode(b'{"type":"gossip"}')


@pytest.mark.parametrize("mtype", sorted(MESSAGES))
def test_a_missing_field_is_refused_naming_it(mtype):
    fields = good_fields(mtype)
    name = sorted(fields)[0]
    del fields[name]
    with pytest.raises(ProtocolError, match=rf"group {mtype}: missing field\(s\) {name}"):
        make(mtype, **fields)
    body = json.dumps({"type": mtype, **fields}).encode()
    with pytest.raises(ProtocolError, match=rf"missing field\(s\) {name}"):
        decode(body)


@pytest.mark.parametrize("mtype", sorted(MESSAGES))
def test_an_extra_field_is_refused_naming_it(mtype):
    body = json.dumps({"type": mtype, **good_fields(mtype), "sneaky": 1}).encode()
    with pytest.raises(ProtocolError, match=rf"group {mtype}: unknown field\(s\) sneaky"):
        decode(body)


def _cases():
    for mtype, schema in sorted(MESSAGES.items()):
        for field, kind in sorted(schema.items()):
            for bad in BAD[kind]:
                yield pytest.param(mtype, field, bad, id=f"{mtype}.{field}={bad!r:.20}")


@pytest.mark.parametrize("mtype,field,bad", list(_cases()))
def test_a_field_of_the_wrong_kind_or_out_of_bounds_is_refused_naming_it(mtype, field, bad):
    fields = good_fields(mtype)
    fields[field] = bad
    with pytest.raises(ProtocolError, match=rf"group {mtype}: field {field} "):
        make(mtype, **fields)
    # The same through the wire (what a peer can send).
    try:
        body = json.dumps({"type": mtype, **fields}).encode()
    except ValueError:
        return
    with pytest.raises(ProtocolError, match=rf"field {field} "):
        decode(body)


def test_fields_at_their_bounds_are_accepted():
    msg = make("held", member="m" * 255, n=(1 << 64) - 1, t=0, skew_us=(1 << 64) - 1,
               members=["x" * 255] * 64)
    assert decode(payload_of(msg)) == msg
    assert make("resign", member="é" * 127, reason="r" * 4096)["reason"] == "r" * 4096


def test_an_oversize_message_is_refused_on_both_sides():
    big = make("view", view={"pad": "x" * MAX_MESSAGE})
    with pytest.raises(ProtocolError, match=f"over {MAX_MESSAGE}"):
        encode(big)
    # A peer that builds the frame anyway: the decoder refuses its header
    # before it buffers the payload.
    body = json.dumps({"type": "view", "view": {"pad": "x" * MAX_MESSAGE}}).encode()
    frame = encode_frame(FrameType.GROUP, body)
    master, member = _pair()
    _handshake(master, member)
    master.receive_data(frame[:64])
    with pytest.raises(ProtocolError, match="above the maximum"):
        master.next_event()


@pytest.mark.parametrize("payload,words", [
    (b"\xff\xfe", "not a JSON object"),
    (b"{", "not a JSON object"),
    (b"[1, 2]", "with a type"),
    (b'"hello"', "with a type"),
    (b'{"n": 1}', "with a type"),
    (b'{"type": 5}', "with a type"),
    (b"", "not a JSON object"),
])
def test_a_payload_that_is_not_a_typed_json_object_is_refused(payload, words):
    with pytest.raises(ProtocolError, match=words):
        decode(payload)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_protocol_error(payload):
    try:
        msg = decode(payload)
    except ProtocolError:
        return
    assert msg.type in MESSAGES and set(msg.fields) == set(MESSAGES[msg.type])


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                max_size=4),
    max_leaves=6)
_keys = (st.sampled_from(sorted({f for s in MESSAGES.values() for f in s} | {"mtype"}))
         | st.text(max_size=8))


@st.composite
def _near_messages(draw) -> dict:
    """A message of a known type with each field kept good, replaced by any
    JSON value, or left out, and maybe extra keys; or an unknown type."""
    mtype = draw(st.sampled_from(sorted(MESSAGES)) | st.text(max_size=8))
    obj: dict = {}
    for name, kind in MESSAGES.get(mtype, {}).items():
        choice = draw(st.integers(0, 9))
        if choice < 7:
            obj[name] = GOOD[kind]
        elif choice < 9:
            obj[name] = draw(_json)
    obj.update(draw(st.dictionaries(_keys, _json, max_size=2)))
    return {**obj, "type": mtype}


@settings(max_examples=300, deadline=None)
@given(_near_messages())
def test_any_json_object_decodes_to_a_schema_exact_message_or_raises_protocol_error(obj):
    """Typed objects near the schema (its fields, some good, some of any
    value, some missing, extra keys): the result is either exactly valid or
    a ProtocolError, never another exception."""
    body = json.dumps(obj).encode()
    try:
        msg = decode(body)
    except ProtocolError:
        event("refused")
        return
    event("accepted")
    assert msg.type == obj["type"]
    assert msg.fields == {k: v for k, v in obj.items() if k != "type"}
    assert set(msg.fields) == set(MESSAGES[msg.type])
    make(msg.type, **msg.fields)  # valid by construction: rebuilding it passes
    assert decode(payload_of(msg)) == msg


def test_a_field_named_mtype_is_a_protocol_error_not_a_type_error():
    """make()'s own parameter name is no field a peer can collide with
    (was a TypeError: group_bugs.md, fixed in a56a66c)."""
    with pytest.raises(ProtocolError, match="unknown field"):
        decode(b'{"type":"auth","mac":"00","mtype":"x"}')


@pytest.mark.parametrize("payload", [b"[" * 60000,
                                     b'{"type":"view","view":' + b'{"a":' * 10000 + b"1"
                                     + b"}" * 10001],
                         ids=["array", "view-object"])
def test_deeply_nested_json_is_a_protocol_error(payload):
    """json.loads raises RecursionError here (was let through:
    group_bugs.md, fixed in a56a66c)."""
    assert len(payload) <= MAX_MESSAGE  # fits one GROUP frame: any peer can send it
    with pytest.raises(ProtocolError):
        decode(payload)


# -- the handshake ------------------------------------------------------------


def _pair(member_secret: bytes = SECRET, master_secret: bytes = SECRET, *,
          member_group: str = "g0", master_group: str = "g0",
          member_role: str = "member", master_role: str = "master"):
    master = GroupConnection(role=master_role, group=master_group, node="alpha", member="r1",
                             side="secondary", secret=master_secret)
    member = GroupConnection(role=member_role, group=member_group, node="beta", member="r2",
                             side="secondary", secret=member_secret)
    return master, member


def _drain(conn: GroupConnection, data: bytes) -> list[GroupMessage]:
    conn.receive_data(data)
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def _handshake(master: GroupConnection, member: GroupConnection) -> None:
    """HELLOs both ways, then the AUTHs they produced."""
    got_m = _drain(master, member.initiate())
    got_s = _drain(member, master.initiate())
    assert [m.type for m in got_m] == ["hello"] and [m.type for m in got_s] == ["hello"]
    _drain(master, member.data_to_send())
    _drain(member, master.data_to_send())


def test_mac_is_hmac_sha256_over_domain_role_peer_nonce_own_nonce_group():
    peer, own = b"P" * 32, b"O" * 32
    want = hmac.new(b"k", b"duplex-group-v1" + b"\x01" + peer + own + b"g0",
                    hashlib.sha256).digest()
    assert DOMAIN == b"duplex-group-v1"
    assert group_mac(b"k", "member", peer, own, "g0") == want
    assert want != group_mac(b"k", "master", peer, own, "g0")
    assert want != group_mac(b"k", "member", own, peer, "g0")
    assert want != group_mac(b"k", "member", peer, own, "g1")
    assert want != group_mac(b"j", "member", peer, own, "g0")


def test_one_secret_establishes_both_ends_and_messages_flow_both_ways():
    master, member = _pair()
    assert not master.established and not member.established
    _handshake(master, member)
    assert master.established and member.established
    assert master.peer["member"] == "r2" and master.peer["role"] == "member"
    assert member.peer["node"] == "alpha" and member.peer["role"] == "master"
    held = make("held", member="r2", n=3, t=1000, skew_us=12, members=["r1", "r2"])
    assert _drain(master, member.send(held)) == [held]
    rel = make("release", n=3, t=1000)
    assert _drain(member, master.send(rel)) == [rel]


def test_a_different_secret_fails_authentication_on_both_sides():
    master, member = _pair(member_secret=b"another secret of 32 bytes......")
    _drain(master, member.initiate())
    _drain(member, master.initiate())
    with pytest.raises(ProtocolError, match="does not know the secret of group g0") as ei:
        _drain(master, member.data_to_send())
    assert ei.value.code == ErrorCode.AUTH_FAILED
    with pytest.raises(ProtocolError, match="authentication failed") as ei:
        _drain(member, master.data_to_send())
    assert ei.value.code == ErrorCode.AUTH_FAILED
    assert not master.established and not member.established


def test_a_reflected_nonce_is_refused():
    """An attacker replays the master's own HELLO nonce back to it (so the
    master would compute the MAC it needs): refused before any AUTH."""
    master, _ = _pair()
    master.initiate()
    fake = make("hello", version=GROUP_VERSION, group="g0", node="mallory", member="r2",
                side="secondary", role="member", nonce=master.nonce.hex())
    with pytest.raises(ProtocolError, match="reflected nonce") as ei:
        _drain(master, encode(fake))
    assert ei.value.code == ErrorCode.AUTH_FAILED
    assert master.data_to_send() == b""  # no AUTH of ours leaked to it


@pytest.mark.parametrize("nonce", ["", "00" * 31, "00" * 33, "0" * 63])
def test_a_nonce_of_the_wrong_length_is_refused(nonce):
    master, _ = _pair()
    fake = make("hello", version=GROUP_VERSION, group="g0", node="mallory", member="r2",
                side="secondary", role="member", nonce=nonce)
    with pytest.raises(ProtocolError, match="bad or reflected nonce"):
        _drain(master, encode(fake))


def test_a_reflected_mac_is_refused():
    """A man in the middle without the secret, posing as master, bounces
    the member's own AUTH back to it: the role byte makes it wrong."""
    _, member = _pair()
    member.initiate()
    mallory = make("hello", version=GROUP_VERSION, group="g0", node="mallory", member="r1",
                   side="secondary", role="master", nonce=(b"M" * 32).hex())
    _drain(member, encode(mallory))
    own_auth = member.data_to_send()
    assert own_auth
    with pytest.raises(ProtocolError, match="authentication failed"):
        _drain(member, own_auth)
    assert not member.established


def test_a_peer_of_another_group_is_refused():
    master, member = _pair(member_group="g1")
    with pytest.raises(ProtocolError, match="in group 'g1', this node in 'g0'") as ei:
        _drain(master, member.initiate())
    assert ei.value.code == ErrorCode.WRONG_RESOURCE


@pytest.mark.parametrize("role", ["member", "master"])
def test_two_ends_of_the_same_role_are_refused(role):
    a, b = _pair(member_role=role, master_role=role)
    with pytest.raises(ProtocolError, match=f"also a {role}") as ei:
        _drain(a, b.initiate())
    assert ei.value.code == ErrorCode.ROLE_CONFLICT


def test_another_group_version_is_refused():
    master, _ = _pair()
    fake = make("hello", version=GROUP_VERSION + 1, group="g0", node="newer", member="r2",
                side="secondary", role="member", nonce=("ab" * 32))
    with pytest.raises(ProtocolError, match="group version") as ei:
        _drain(master, encode(fake))
    assert ei.value.code == ErrorCode.VERSION


def test_a_message_before_hello_is_refused():
    master, _ = _pair()
    held = make("held", member="r2", n=1, t=1, skew_us=0, members=["r2"])
    with pytest.raises(ProtocolError, match="before authentication") as ei:
        _drain(master, encode(held))
    assert ei.value.code == ErrorCode.AUTH_FAILED


def test_a_message_between_hello_and_auth_is_refused():
    """The peer's HELLO is in but its AUTH is not: still unauthenticated."""
    master, member = _pair()
    _drain(master, member.initiate())
    _drain(member, master.initiate())
    assert not master.established
    rel = encode(make("complete", member="r2", n=1, seq=5))
    with pytest.raises(ProtocolError, match="group complete before authentication"):
        _drain(master, rel)


def test_our_side_cannot_send_before_the_handshake():
    master, member = _pair()
    with pytest.raises(ProtocolError, match="before the handshake"):
        member.send(make("join", member="r2", released_n=0, released_t=0, in_progress=None))
    _drain(master, member.initiate())
    _drain(member, master.initiate())
    _drain(master, member.data_to_send())
    # The member has sent its AUTH but not yet checked the master's.
    with pytest.raises(ProtocolError, match="before the handshake"):
        member.send(make("resign", member="r2", reason="x"))


def test_auth_before_hello_and_a_second_auth_or_hello_are_refused():
    master, member = _pair()
    with pytest.raises(ProtocolError, match="auth out of order"):
        _drain(master, encode(make("auth", mac="00" * 32)))
    master, member = _pair()
    _drain(master, member.initiate())
    _drain(member, master.initiate())
    auth_bytes = member.data_to_send()
    _drain(master, auth_bytes)
    with pytest.raises(ProtocolError, match="auth out of order"):
        _drain(master, auth_bytes)
    master, member = _pair()
    hello = member.initiate()
    _drain(master, hello)
    with pytest.raises(ProtocolError, match="a second group hello"):
        _drain(master, hello)


def test_a_frame_of_another_type_is_refused():
    master, _ = _pair()
    with pytest.raises(ProtocolError, match="group channel got a PING frame"):
        _drain(master, encode_frame(FrameType.PING, b"\0" * 8))


def test_the_peers_error_message_is_raised_with_its_words():
    master, member = _pair()
    with pytest.raises(ProtocolError, match="the group peer refused: r9 is not a member"):
        _drain(member, master.error("r9 is not a member"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_the_handshake_and_messages_survive_any_chunking(cuts):
    """Bytes arrive in chunks of any size (TCP): the same messages come out."""
    master, member = _pair()

    def feed(conn: GroupConnection, data: bytes) -> list[GroupMessage]:
        out, pos, i = [], 0, 0
        while pos < len(data):
            n = cuts[i % len(cuts)]
            i += 1
            conn.receive_data(data[pos:pos + n])
            pos += n
            while (ev := conn.next_event()) is not None:
                out.append(ev)
        return out

    assert [m.type for m in feed(master, member.initiate())] == ["hello"]
    assert [m.type for m in feed(member, master.initiate())] == ["hello"]
    assert [m.type for m in feed(master, member.data_to_send())] == ["auth"]
    assert [m.type for m in feed(member, master.data_to_send())] == ["auth"]
    assert master.established and member.established
    msgs = [make("held", member="r2", n=k, t=k * 10, skew_us=None, members=["r1", "r2"])
            for k in range(5)]
    assert feed(master, b"".join(member.send(m) for m in msgs)) == msgs


def test_a_truncated_frame_at_eof_is_a_protocol_error():
    master, member = _pair()
    hello = member.initiate()
    master.receive_data(hello[:-3])
    assert master.next_event() is None  # more bytes may come
    master.receive_data(b"")
    with pytest.raises(ProtocolError):
        master.next_event()


def test_a_damaged_frame_is_a_protocol_error():
    master, member = _pair()
    hello = bytearray(member.initiate())
    hello[-2] ^= 0x20  # a bit flipped in the JSON: the frame CRC catches it
    with pytest.raises(ProtocolError, match="CRC"):
        _drain(master, bytes(hello))

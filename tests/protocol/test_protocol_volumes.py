"""STATE's volume list (DESIGN §8): carried after the history, compared at
the handshake, a differing list refused with a reason naming the volume;
a single-volume node sends no list, so its STATE is byte for byte the one
nodes from before volumes send, and two such nodes compare as before."""
from __future__ import annotations

import struct

import pytest

from replicator.config import DEFAULT_VOLUME
from replicator.protocol import CLOSED, ErrorCode, ProtocolError, State, check_peer_state
from replicator.protocol.compat import wire_volumes
from replicator.protocol.messages import LEGACY_VOLUME, Error

MiB = 1 << 20
VOLS = (("data", 48 * MiB), ("wal", 16 * MiB))


def test_the_legacy_volume_name_is_the_configs_default():
    assert LEGACY_VOLUME == DEFAULT_VOLUME


def test_a_volume_list_survives_encode_and_decode(proto):
    st = proto.make_state("primary", volumes=VOLS, history=(b"\x01" * 16,))
    back = State.decode(st.encode())
    assert back == st and back.volumes == VOLS and back.volume_list == VOLS


def test_a_single_volume_state_is_the_state_from_before_volumes(proto):
    st = proto.make_state("primary", volumes=wire_volumes([(DEFAULT_VOLUME, proto.DEVICE_SIZE)]))
    raw = st.encode()
    # The fixed part and one history UUID per entry, nothing after: what an
    # older node sends and decodes exactly.
    assert st.volumes == () and len(raw) == struct.calcsize("<16s16sQIBBBBQQQQII")
    back = State.decode(raw)
    assert back.volumes == () and back.volume_list == ((LEGACY_VOLUME, proto.DEVICE_SIZE),)


def test_wire_volumes_sends_a_list_for_anything_but_the_one_default_volume():
    assert wire_volumes([("default", 4096)]) == ()
    assert wire_volumes([("data", 4096)]) == (("data", 4096),)
    assert wire_volumes(list(VOLS)) == VOLS


def _pair(proto, p_vols, s_vols, **s_kw):
    return (proto.make_state("primary", volumes=p_vols),
            proto.make_state("secondary", volumes=s_vols, **s_kw))


def test_the_same_volume_list_passes(proto):
    check_peer_state(*_pair(proto, VOLS, VOLS))


@pytest.mark.parametrize("local_role", ["primary", "secondary"])
def test_a_volume_on_one_side_only_is_refused_naming_it(proto, local_role):
    p, s = _pair(proto, VOLS, VOLS[:1])
    local, peer = (p, s) if local_role == "primary" else (s, p)
    with pytest.raises(ProtocolError) as ei:
        check_peer_state(local, peer)
    assert str(ei.value) == ("volume lists differ: the primary has volume 'wal', the secondary "
                             "does not (the primary's: data, wal; the secondary's: data)")
    assert ei.value.code == ErrorCode.STATE_MISMATCH


def test_a_volume_of_another_size_is_refused_naming_it_and_both_sizes(proto):
    p, s = _pair(proto, VOLS, (VOLS[0], ("wal", 16 * MiB - 4096)))
    with pytest.raises(ProtocolError, match=r"^volume 'wal': sizes differ: the secondary's is "
                                            rf"{16 * MiB - 4096} bytes, the primary's is "
                                            rf"{16 * MiB} bytes$"):
        check_peer_state(p, s)


def test_the_same_volumes_in_another_order_are_refused(proto):
    p, s = _pair(proto, VOLS, VOLS[::-1])
    with pytest.raises(ProtocolError, match="^volume lists differ in order: the secondary's is "
                                            "wal, data, the primary's is data, wal$"):
        check_peer_state(p, s)


def test_a_single_volume_peer_of_a_multi_volume_node_is_refused_naming_the_volumes(proto):
    p, s = _pair(proto, VOLS, ())  # an older, or plain-`device`, secondary
    with pytest.raises(ProtocolError, match="^volume lists differ: the secondary has volume "
                                            "'default', the primary does not"):
        check_peer_state(p, s)


def test_two_single_volume_nodes_are_compared_by_device_size_as_before(proto):
    p, s = _pair(proto, (), (), device_size=proto.DEVICE_SIZE // 2)
    with pytest.raises(ProtocolError, match="^device sizes differ: "):
        check_peer_state(p, s)


def test_the_refusal_reaches_the_peer_over_the_connection(proto):
    p, s = proto.make_pair()
    proto.authenticate(p, s)
    proto.deliver(s, p.send(proto.make_state("primary", volumes=VOLS)))
    with pytest.raises(ProtocolError, match="the primary has volume 'wal'") as exc:
        s.send(proto.make_state("secondary", volumes=VOLS[:1]))
    events = proto.deliver(p, s.error_frame(exc.value))
    assert events == [Error(ErrorCode.STATE_MISMATCH, str(exc.value)), CLOSED]


def test_the_primary_checks_a_received_list_too(proto):
    p, s = proto.make_pair()
    proto.authenticate(p, s)
    proto.deliver(s, p.send(proto.make_state("primary", volumes=VOLS)))
    s.check_state = False
    with pytest.raises(ProtocolError, match="^volume 'data': sizes differ"):
        proto.deliver(p, s.send(proto.make_state("secondary",
                                                 volumes=(("data", MiB), VOLS[1]))))


@pytest.mark.parametrize("vols, why", [
    ((("data", 0),), r"^STATE: field volumes\[0\].size of volume 'data' is 0$"),
    ((("data", 1), ("data", 2)), "names volume 'data' twice"),
    ((("da\nta", 1),), "contains control or unprintable characters"),
    ((("", 1),), r"^STATE: field volumes\[0\].name is empty$"),
    (tuple((f"v{i}", 1) for i in range(65)), "has 65 volumes, at most 64 allowed"),
])
def test_a_bad_volume_list_is_refused_by_field(proto, vols, why):
    with pytest.raises(ProtocolError, match=why):
        proto.make_state("primary", volumes=vols)


def _raw(proto, tail: bytes) -> bytes:
    return proto.make_state("primary").encode() + tail


@pytest.mark.parametrize("tail, why", [
    (b"\x01", "too short for a volume list"),
    (struct.pack("<H", 0), "count 0 is not 1..64"),
    (struct.pack("<HQB", 1, 4096, 4) + b"wa", "ends inside the name of volume 0 of 1"),
    (struct.pack("<HQB", 2, 4096, 1) + b"w", "ends inside volume 1 of 2"),
    (struct.pack("<HQB", 1, 4096, 1) + b"w" + b"\0", "payload is .* bytes, expected"),
    (struct.pack("<HQB", 1, 4096, 1) + b"\xff", "is not valid UTF-8"),
])
def test_a_damaged_volume_list_on_the_wire_is_refused(proto, tail, why):
    with pytest.raises(ProtocolError, match=why):
        State.decode(_raw(proto, tail))

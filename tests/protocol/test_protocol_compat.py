"""check_peer_state: two STATEs that cannot replicate one resource are refused, by name."""
from __future__ import annotations

import pytest

from replicator.protocol import ErrorCode, ProtocolError, check_peer_state


def test_matching_states_pass(proto):
    check_peer_state(proto.make_state("primary"), proto.make_state("secondary"))


def test_another_resource_uuid_is_refused_naming_both(proto):
    local = proto.make_state("primary")
    peer = proto.make_state("secondary", resource_uuid=b"\x11" * 16)
    with pytest.raises(ProtocolError, match=f"peer's resource UUID is {'11' * 16}, ours is "
                                            f"{proto.RESOURCE_UUID.hex()}: these are different "
                                            f"resources") as exc:
        check_peer_state(local, peer)
    assert exc.value.code == ErrorCode.STATE_MISMATCH


@pytest.mark.parametrize("fresh_side", ["local", "peer"])
def test_a_fresh_side_with_no_resource_uuid_may_join(proto, fresh_side):
    local = proto.make_state("secondary", resource_uuid=bytes(16) if fresh_side == "local"
                             else proto.RESOURCE_UUID)
    peer = proto.make_state("primary", resource_uuid=bytes(16) if fresh_side == "peer"
                            else proto.RESOURCE_UUID)
    check_peer_state(local, peer)


def test_a_different_device_size_is_refused_with_both_sizes(proto):
    local = proto.make_state("primary", device_size=1 << 30)
    peer = proto.make_state("secondary", device_size=(1 << 30) - 4096)
    with pytest.raises(ProtocolError, match="^device sizes differ: the secondary's is 1073737728 bytes, the primary's is "
                                            "1073741824 bytes$"):
        check_peer_state(local, peer)


def test_a_fresh_side_must_still_have_the_same_device_size(proto):
    local = proto.make_state("primary")
    peer = proto.make_state("secondary", resource_uuid=bytes(16), device_size=4096)
    with pytest.raises(ProtocolError, match="the secondary's is 4096 bytes"):
        check_peer_state(local, peer)


def test_a_different_track_size_is_refused_with_both_sizes(proto):
    local = proto.make_state("secondary", track_size=65536)
    peer = proto.make_state("primary", track_size=4096)
    with pytest.raises(ProtocolError, match="^track sizes differ: the primary's is 4096 bytes, the secondary's is "
                                            "65536 bytes$"):
        check_peer_state(local, peer)


def test_two_states_of_the_same_role_are_refused(proto):
    with pytest.raises(ProtocolError, match="peer reports role primary, as we do") as exc:
        check_peer_state(proto.make_state("primary"), proto.make_state("primary"))
    assert exc.value.code == ErrorCode.ROLE_CONFLICT

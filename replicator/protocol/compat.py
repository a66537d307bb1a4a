"""Can these two nodes replicate one resource? Pure checks on the exchanged STATEs.

The rule for resource UUIDs: a resource UUID is created once, when the
resource's metadata is first initialised, and never changes. All zeros means "fresh": the node has no
history for this resource yet and will take the peer's UUID with its first
full sync. So two UUIDs must be equal *unless one side is fresh*; two
different non-zero UUIDs are two different resources (or one was
re-created), and replicating between them would overwrite one with the
other. Device size and track size must always be equal: the bitmaps and the
offsets in every record mean the same thing on both sides only then.

Which side is ahead (generations, history UUIDs, split brain) is decided by
the generation handshake, not here.
"""
from __future__ import annotations

from replicator.protocol.errors import ErrorCode, ProtocolError
from replicator.protocol.messages import State


def check_peer_state(local: State, peer: State) -> None:
    """Raise ProtocolError naming the first mismatch between *local* and *peer*.

    Checks: roles complementary; resource UUIDs equal unless either is fresh
    (all zeros); device sizes equal; track sizes equal.
    """
    if local.role == peer.role:
        raise ProtocolError(f"peer reports role {peer.role}, as we do: two {peer.role}s "
                            f"cannot replicate to each other", ErrorCode.ROLE_CONFLICT)
    if not local.fresh and not peer.fresh and local.resource_uuid != peer.resource_uuid:
        raise ProtocolError(f"peer's resource UUID is {peer.resource_uuid.hex()}, ours is "
                            f"{local.resource_uuid.hex()}: these are different resources "
                            f"(or one was re-created)", ErrorCode.STATE_MISMATCH)
    if local.device_size != peer.device_size:
        # Named by role, not "peer"/"ours": the text reaches the other side
        # too (ERROR frame), where "ours" would mean the opposite.
        raise ProtocolError(f"device sizes differ: the {peer.role}'s is {peer.device_size} "
                            f"bytes, the {local.role}'s is {local.device_size} bytes",
                            ErrorCode.STATE_MISMATCH)
    if local.track_size != peer.track_size:
        raise ProtocolError(f"track sizes differ: the {peer.role}'s is {peer.track_size} "
                            f"bytes, the {local.role}'s is {local.track_size} bytes",
                            ErrorCode.STATE_MISMATCH)

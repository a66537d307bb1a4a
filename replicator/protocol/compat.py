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

Volumes (DESIGN §8): both sides must list the same volumes, by name, in the
same order, each of the same size; a STATE without a list is one volume
named LEGACY_VOLUME of device_size bytes, so two single-volume nodes (old
or new) compare exactly as before. A differing list is refused with a
reason naming the first volume that differs, before the device sizes
(which then differ too, and say less).
"""
from __future__ import annotations

from replicator.protocol.errors import ErrorCode, ProtocolError
from replicator.protocol.messages import LEGACY_VOLUME, State


def wire_volumes(volumes: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """What a node puts in STATE.volumes for its (name, size) list: nothing
    for the one legacy volume (the single-volume STATE, unchanged), else
    the list."""
    vols = tuple((str(n), int(s)) for n, s in volumes)
    if len(vols) == 1 and vols[0][0] == LEGACY_VOLUME:
        return ()
    return vols


def _check_volumes(local: State, peer: State) -> None:
    if not local.volumes and not peer.volumes:
        return  # two single-volume nodes: the device sizes say it, as before volumes
    mine, theirs = local.volume_list, peer.volume_list
    if mine == theirs:
        return
    # Named by role, as the sizes are: the text reaches the other side too.
    names_m, names_t = [n for n, _ in mine], [n for n, _ in theirs]
    for n in names_t:
        if n not in names_m:
            raise ProtocolError(f"volume lists differ: the {peer.role} has volume {n!r}, the "
                                f"{local.role} does not (the {peer.role}'s: "
                                f"{', '.join(names_t)}; the {local.role}'s: {', '.join(names_m)})",
                                ErrorCode.STATE_MISMATCH)
    for n in names_m:
        if n not in names_t:
            raise ProtocolError(f"volume lists differ: the {local.role} has volume {n!r}, the "
                                f"{peer.role} does not (the {local.role}'s: "
                                f"{', '.join(names_m)}; the {peer.role}'s: {', '.join(names_t)})",
                                ErrorCode.STATE_MISMATCH)
    if names_m != names_t:
        raise ProtocolError(f"volume lists differ in order: the {peer.role}'s is "
                            f"{', '.join(names_t)}, the {local.role}'s is {', '.join(names_m)}",
                            ErrorCode.STATE_MISMATCH)
    for (n, sm), (_, st) in zip(mine, theirs):
        if sm != st:
            raise ProtocolError(f"volume {n!r}: sizes differ: the {peer.role}'s is {st} bytes, "
                                f"the {local.role}'s is {sm} bytes", ErrorCode.STATE_MISMATCH)


def check_peer_state(local: State, peer: State) -> None:
    """Raise ProtocolError naming the first mismatch between *local* and *peer*.

    Checks: roles complementary; resource UUIDs equal unless either is fresh
    (all zeros); the same volumes (names, order, sizes); device sizes
    equal; track sizes equal.
    """
    if local.role == peer.role:
        raise ProtocolError(f"peer reports role {peer.role}, as we do: two {peer.role}s "
                            f"cannot replicate to each other", ErrorCode.ROLE_CONFLICT)
    if not local.fresh and not peer.fresh and local.resource_uuid != peer.resource_uuid:
        raise ProtocolError(f"peer's resource UUID is {peer.resource_uuid.hex()}, ours is "
                            f"{local.resource_uuid.hex()}: these are different resources "
                            f"(or one was re-created)", ErrorCode.STATE_MISMATCH)
    _check_volumes(local, peer)
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

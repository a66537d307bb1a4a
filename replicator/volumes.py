"""A node's volumes against its metadata: sizes read, compared, laid out.

The configuration lists a node's volumes (``Node.volumes``, config order);
the metadata records the list create-md saw (``Metadata.volumes``,
``{"name", "size"}`` each), and the layout (replicator.layout) lays them
end to end in the logical space the bitmaps cover (DESIGN §8). Both roles
open every volume the same way: read each device's size, check it against
the metadata's list by name, and build the Layout; so that the two sides,
``up`` and ``create-md`` agree by construction, the checks live here.

A single-volume resource (a plain ``device``) is one volume named
``config.DEFAULT_VOLUME`` at base 0, exactly as before volumes existed.
"""
from __future__ import annotations

from typing import Any, Self

from replicator.config import Node, Resource, Volume
from replicator.devices import DeviceClaim, claim_device, device_size
from replicator.errors import DuplexError
from replicator.layout import Layout

__all__ = ["VolumeClaims", "VolumeSizeError", "check_volumes", "claim_volumes", "layout_of",
           "read_volumes", "volume_list", "volume_uri"]


class VolumeSizeError(DuplexError):
    """A volume's device differs from what the metadata was made for."""


class VolumeClaims:
    """Exclusive use of every volume's device (replicator.devices claims),
    given back together."""

    def __init__(self, claims: list[DeviceClaim]):
        self.claims = claims

    @property
    def held(self) -> bool:
        """Whether every claim is still held."""
        return all(c.held for c in self.claims)

    def refresh(self, context: str = "") -> None:
        """Claim again each device that is another file now (DeviceClaim.refresh)."""
        for c in self.claims:
            c.refresh(context)

    def close(self) -> None:
        """Give every device back."""
        for c in self.claims:
            c.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def claim_volumes(resource: Resource, node: Node) -> VolumeClaims:
    """Claim every volume's device for Duplex alone, in config order; the
    error (DeviceBusy, DuplexError) names the node, the volume (when there
    are volume tables) and the holder. All or none: the claims taken
    before a refused one are given back."""
    claims: list[DeviceClaim] = []
    try:
        for v in node.volumes:
            context = f"{resource.name}: node {node.name}"
            if node.multi_volume:
                context += f", volume {v.name}"
            claims.append(claim_device(v.device, context))
    except BaseException:
        for c in claims:
            c.close()
        raise
    return VolumeClaims(claims)


def volume_uri(node: Node, vol: Volume) -> str:
    """The NBD URI of *vol*'s export on *node* (when it is primary): the
    export named by the volume, or the default export "" for a
    plain-``device`` resource."""
    if not node.multi_volume:
        return node.export_uri()
    exp = node.export
    if exp.kind == "unix":
        return f"nbd+unix:///{vol.name}?socket={exp.path}"
    return f"{exp.uri()}/{vol.name}"


def read_volumes(node: Node) -> list[dict[str, Any]]:
    """``[{"name", "size"}]`` of *node*'s volumes in config order, each
    size read from its device now (what create-md records)."""
    return [{"name": v.name, "size": device_size(v.device)} for v in node.volumes]


def volume_list(md_volumes: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """The metadata's volume list as (name, size) pairs."""
    return [(str(v["name"]), int(v["size"])) for v in md_volumes]


def layout_of(md_volumes: list[dict[str, Any]], track_size: int) -> Layout:
    """The logical layout of the metadata's volume list."""
    return Layout(volume_list(md_volumes), track_size)


def check_volumes(resource: Resource, node: Node, md_volumes: list[dict[str, Any]],
                  metadata_path: str, fix: str = "") -> list[int]:
    """Every configured volume of *node* is in the metadata's list, in the
    same order, and its device has the recorded size. Returns the devices'
    sizes (config order). Raises VolumeSizeError naming the volume, its
    device and both sizes; *fix* is appended (what the user can do)."""
    tail = f": {fix}" if fix else ""
    names = [v.name for v in node.volumes]
    recorded = [str(v["name"]) for v in md_volumes]
    if names != recorded:
        missing = [n for n in names if n not in recorded]
        extra = [n for n in recorded if n not in names]
        if missing:
            what = f"volume {missing[0]!r} is configured but not in the metadata"
        elif extra:
            what = f"volume {extra[0]!r} is in the metadata but no longer configured"
        else:
            what = "the volumes are configured in another order than the metadata's"
        raise VolumeSizeError(
            f"{resource.name}: {what} ({metadata_path} lists "
            f"{', '.join(recorded) or 'none'}; the config lists {', '.join(names)}){tail}")
    sizes: list[int] = []
    for v, rec in zip(node.volumes, md_volumes):
        size = device_size(v.device)
        want = int(rec["size"])
        if size != want:
            label = "device" if not node.multi_volume else f"volume {v.name!r}: device"
            raise VolumeSizeError(
                f"{resource.name}: {label} {v.device} is {size} bytes, but the metadata "
                f"({metadata_path}) was made for {want} bytes{tail}")
        sizes.append(size)
    return sizes

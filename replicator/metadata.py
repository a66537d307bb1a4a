"""This node's metadata for one resource, and the names of every file in
its meta-dir.

The metadata is a small JSON document::

    {"magic": "duplex-metadata", "version": 1, "crc32c": N, "body": {...}}

where ``crc32c`` is the CRC32C of the body serialised canonically (sorted
keys, no spaces, UTF-8). A file whose magic, version or checksum is wrong,
or that belongs to another resource or node, is refused with an error that
says which; it is never silently used (DESIGN §5).

Saving is atomic: write a temporary file in the same directory, fsync it,
rename it over the old one, fsync the directory. A crash leaves either the
old or the new metadata, never a torn one.

Threads and locks: one :class:`Metadata` object is shared by the threads of
a node (on the primary: the write path, the seq mark's housekeeping, the
shipper and catch-up; on the secondary: the receiver, applier and control).
``Metadata._lock`` (re-entrant) guards every field and the file: a change
and its save happen together under it, ``with md.update(): md.x = ...``,
so no thread saves another's half-made change and no two saves interleave.
Take it before any lock of the C core's and never call into the network
while holding it.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from replicator.crc32c import crc32c
from replicator.errors import DuplexError
from replicator.fileio import atomic_write

MAGIC = "duplex-metadata"
VERSION = 1

ROLE_PRIMARY = "Primary"
ROLE_SECONDARY = "Secondary"
ROLES = (ROLE_PRIMARY, ROLE_SECONDARY)

DISK_UPTODATE = "UpToDate"
DISK_CONSISTENT = "Consistent"
DISK_INCONSISTENT = "Inconsistent"
DISK_OUTDATED = "Outdated"
DISK_STATES = (DISK_UPTODATE, DISK_CONSISTENT, DISK_INCONSISTENT, DISK_OUTDATED)


class MetadataError(DuplexError):
    """Metadata is missing, damaged, foreign or of an unsupported version."""


@dataclass(frozen=True)
class MetaPaths:
    """Every file a node keeps in its meta-dir, named in one place."""

    meta_dir: Path

    def __init__(self, meta_dir: str | os.PathLike):
        object.__setattr__(self, "meta_dir", Path(meta_dir))

    @property
    def metadata(self) -> Path:
        """The metadata document (this module)."""
        return self.meta_dir / "metadata.json"

    @property
    def bitmap(self) -> Path:
        """The persisted out-of-sync bitmap (primary)."""
        return self.meta_dir / "oos.bitmap"

    @property
    def activity_log(self) -> Path:
        """The activity log of hot extents (primary, DESIGN §5)."""
        return self.meta_dir / "activity.log"

    @property
    def journal(self) -> Path:
        """The secondary's record journal (preallocated)."""
        return self.meta_dir / "journal"

    @property
    def control_socket(self) -> Path:
        """The local control socket of the running daemon."""
        return self.meta_dir / "control.sock"

    @property
    def lock(self) -> Path:
        """flock()ed by the running daemon: one daemon per meta-dir."""
        return self.meta_dir / "daemon.lock"

    @property
    def attach(self) -> Path:
        """What ``duplex attach`` set up (so ``detach`` can undo it)."""
        return self.meta_dir / "attach.json"

    @property
    def loss_report(self) -> Path:
        """The JSON loss report written by ``duplex promote``."""
        return self.meta_dir / "loss-report.json"

    @property
    def group_state(self) -> Path:
        """A group member secondary's released point and update-in-progress
        flag (group/member.py); a primary master's checkpoint counter."""
        return self.meta_dir / "group.json"


def new_uuid() -> str:
    """A random 16-byte identifier, as 32 hex digits."""
    return secrets.token_hex(16)


@dataclass
class Metadata:
    """One node's persistent state for one resource.

    Identifiers are 32 hex digits. ``generation`` is the current data
    generation (DRBD's current UUID); ``bitmap_uuid`` the generation the
    OOS bitmap is relative to (None when the bitmap is empty of meaning);
    ``history`` the older generations, newest first.
    """

    resource: str
    node: str
    resource_uuid: str
    node_uuid: str
    generation: str
    device_size: int
    track_size: int
    history: list[str] = field(default_factory=list)
    bitmap_uuid: str | None = None
    peer_node_uuid: str | None = None  # set at the first handshake
    role: str = ROLE_SECONDARY
    disk: str = DISK_INCONSISTENT
    needs_initial_sync: bool = True
    seq_hwm: int = 0
    # True while seq_hwm is a reservation above the seqs handed out (a
    # primary runs, or crashed); False once a clean stop recorded the exact
    # last seq. Offline status shows "written" only when it is exact.
    seq_reserved: bool = False
    # `duplex connect --discard-my-data`: at the next handshake this node
    # gives up its own changes and syncs from the peer (split brain).
    discard_my_data: bool = False
    # `duplex invalidate` (DESIGN §7): this secondary's data is discarded; at
    # every handshake it hands the primary every track as out of sync,
    # until an increment of that session commits (the full sync is done).
    invalidated: bool = False
    # `duplex outdate`: this secondary's data is declared out of date
    # (fencing); promote refuses it without --force. Cleared once, connected
    # again, it has applied everything its primary had written.
    outdated: bool = False
    # A planned switchover (`duplex secondary` on the primary): the primary
    # stopped cleanly after this seq and wrote nothing since; None when no
    # clean stop is known. Cleared when a primary connects again.
    clean_stop_seq: int | None = None
    created: float = 0.0
    updated: float = 0.0
    # The resource's volumes in config order, {"name", "size"} each; their
    # sizes laid end to end (track-aligned) make device_size, the logical
    # size every bitmap covers (DESIGN §8). Absent in files of a
    # single-volume resource made before volumes: one volume, DEFAULT_VOLUME.
    volumes: list[dict[str, Any]] = field(default_factory=list)
    # Where it lives; not part of the document.
    meta_dir: Path = field(default=Path("."), compare=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False,
                                   compare=False, repr=False)

    @property
    def paths(self) -> MetaPaths:
        """The files of this node's meta-dir."""
        return MetaPaths(self.meta_dir)

    def to_body(self) -> dict[str, Any]:
        """The document body (everything but meta_dir), a copy."""
        with self._lock:
            return {f.name: (list(v) if isinstance(v := getattr(self, f.name), list) else v)
                    for f in fields(self) if f.name in _FIELD_TYPES}

    def save(self) -> None:
        """Validate and write atomically (temp, fsync, rename, fsync dir)."""
        with self._lock:
            self.updated = time.time()
            body = self.to_body()
            _validate_body(body, self.paths.metadata)
            atomic_write(self.paths.metadata, encode_metadata(body))

    @contextmanager
    def update(self) -> Iterator["Metadata"]:
        """Change fields and save them as one step: ``with md.update(): ...``.
        Holds the lock for the block; saves when it ends without an
        exception (then nothing is saved, but the object keeps whatever the
        block already set: callers set fields only after their checks)."""
        with self._lock:
            yield self
            self.save()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_metadata(body: dict[str, Any]) -> bytes:
    """The file content for *body*: magic, version, checksum, body."""
    doc = {"magic": MAGIC, "version": VERSION, "crc32c": crc32c(_canonical(body)), "body": body}
    return (json.dumps(doc, sort_keys=True, indent=2) + "\n").encode("utf-8")


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "resource": (str,), "node": (str,), "resource_uuid": (str,), "node_uuid": (str,),
    "generation": (str,), "device_size": (int,), "track_size": (int,),
    "history": (list,), "bitmap_uuid": (str, type(None)),
    "peer_node_uuid": (str, type(None)), "role": (str,), "disk": (str,),
    "needs_initial_sync": (bool,), "seq_hwm": (int,), "seq_reserved": (bool,), "discard_my_data": (bool,),
    "invalidated": (bool,), "outdated": (bool,), "clean_stop_seq": (int, type(None)),
    "created": (float, int),
    "updated": (float, int),
    "volumes": (list,),
}

#: The name of the one volume of a resource configured with a plain ``device``.
DEFAULT_VOLUME = "default"


def _is_uuid(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 32 and all(ch in "0123456789abcdef" for ch in v)


def _validate_body(body: dict[str, Any], where: Path) -> None:
    """Raise MetadataError naming the first field that is wrong."""
    body.setdefault("discard_my_data", False)  # absent in the first format-1 files
    if "volumes" not in body and isinstance(body.get("device_size"), int):
        body["volumes"] = [{"name": DEFAULT_VOLUME, "size": body["device_size"]}]
    body.setdefault("seq_reserved", False)  # absent before it was added: exact as before
    # Absent before the admin commands (DESIGN §7): none of them had run.
    body.setdefault("invalidated", False)
    body.setdefault("outdated", False)
    body.setdefault("clean_stop_seq", None)
    missing = [k for k in _FIELD_TYPES if k not in body]
    if missing:
        raise MetadataError(f"{where}: field {missing[0]!r} is missing")
    extra = [k for k in body if k not in _FIELD_TYPES]
    if extra:
        raise MetadataError(f"{where}: unknown field {extra[0]!r}")
    for k, types in _FIELD_TYPES.items():
        v = body[k]
        # bool is an int; an int field holding a bool is still wrong.
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise MetadataError(f"{where}: field {k!r} has the wrong type ({type(v).__name__})")
    for k in ("resource_uuid", "node_uuid", "generation"):
        if not _is_uuid(body[k]):
            raise MetadataError(f"{where}: field {k!r} is not a 32-hex-digit identifier: {body[k]!r}")
    for k in ("bitmap_uuid", "peer_node_uuid"):
        if body[k] is not None and not _is_uuid(body[k]):
            raise MetadataError(f"{where}: field {k!r} is not a 32-hex-digit identifier: {body[k]!r}")
    if not all(_is_uuid(h) for h in body["history"]):
        raise MetadataError(f"{where}: field 'history' holds something that is not an identifier")
    if body["role"] not in ROLES:
        raise MetadataError(f"{where}: field 'role' is {body['role']!r} (expected one of {', '.join(ROLES)})")
    if body["disk"] not in DISK_STATES:
        raise MetadataError(f"{where}: field 'disk' is {body['disk']!r} (expected one of {', '.join(DISK_STATES)})")
    if body["device_size"] <= 0 or body["track_size"] <= 0 or body["seq_hwm"] < 0:
        raise MetadataError(f"{where}: device_size/track_size must be > 0 and seq_hwm >= 0")
    _validate_volumes(body, where)


def _validate_volumes(body: dict[str, Any], where: Path) -> None:
    vols = body["volumes"]
    names = set()
    end = 0
    ts = body["track_size"]
    for i, v in enumerate(vols):
        if (not isinstance(v, dict) or set(v) != {"name", "size"} or not isinstance(v["name"], str)
                or not v["name"] or type(v["size"]) is not int or v["size"] <= 0):
            raise MetadataError(f"{where}: field 'volumes' entry {i} is not "
                                f"{{\"name\": NAME, \"size\": BYTES}}: {v!r}")
        if v["name"] in names:
            raise MetadataError(f"{where}: field 'volumes' names volume {v['name']!r} twice")
        names.add(v["name"])
        end = (end + ts - 1) // ts * ts + v["size"]
    if not vols or end != body["device_size"]:
        raise MetadataError(f"{where}: field 'volumes' ({len(vols)} volume(s), {end} bytes laid "
                            f"end to end) does not match device_size {body['device_size']}")


def decode_metadata(data: bytes, where: Path) -> dict[str, Any]:
    """Check magic, version and checksum of file content; return the body."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetadataError(f"{where}: damaged metadata (not JSON: {e})") from None
    except ValueError:  # JSON, but an integer past Python's digit limit
        raise MetadataError(f"{where}: damaged metadata (a number of more than "
                            f"{sys.get_int_max_str_digits()} digits)") from None
    except RecursionError:
        raise MetadataError(f"{where}: damaged metadata (arrays or objects nested too "
                            f"deeply to be metadata)") from None
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise MetadataError(f"{where}: not a Duplex metadata file (bad magic)")
    if doc.get("version") != VERSION:
        raise MetadataError(
            f"{where}: metadata format version {doc.get('version')!r} is not supported "
            f"(this Duplex reads version {VERSION})"
        )
    body = doc.get("body")
    if not isinstance(body, dict):
        raise MetadataError(f"{where}: damaged metadata (no body)")
    want = doc.get("crc32c")
    try:
        got = crc32c(_canonical(body))
    except RecursionError:  # parsed a few levels short of the limit, deeper than dumps goes
        raise MetadataError(f"{where}: damaged metadata (arrays or objects nested too "
                            f"deeply to be metadata)") from None
    if want != got:
        raise MetadataError(
            f"{where}: damaged metadata: checksum mismatch "
            f"(stored {want!r}, computed {got}); restore it or run create-md --force"
        )
    _validate_body(body, where)
    return body


def logical_size(volumes: list[dict[str, Any]], track_size: int) -> int:
    """The volumes' sizes laid end to end, each starting on a track."""
    end = 0
    for v in volumes:
        end = (end + track_size - 1) // track_size * track_size + v["size"]
    return end


def create_metadata(meta_dir: str | os.PathLike, resource: str, node: str,
                    device_size: int, track_size: int, assume_clean: bool,
                    force: bool = False,
                    volumes: list[dict[str, Any]] | None = None) -> Metadata:
    """Create and save fresh metadata in *meta_dir* (created if missing).

    New random resource, node and generation identifiers. With
    *assume_clean* the disk is UpToDate and no initial sync is needed (both
    devices declared identical); otherwise Inconsistent, needing one.
    Refuses to overwrite existing metadata unless *force*. *volumes*
    (``{"name", "size"}`` each, config order) for a resource of several
    volumes; then *device_size* must be their :func:`logical_size`.
    """
    paths = MetaPaths(meta_dir)
    if paths.metadata.exists() and not force:
        raise MetadataError(
            f"{paths.metadata}: metadata for this node already exists; "
            f"--force overwrites it and discards its replication state"
        )
    if device_size <= 0:
        raise MetadataError(f"device size must be > 0, not {device_size}")
    try:
        paths.meta_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise MetadataError(f"{paths.meta_dir}: cannot create meta-dir: {e.strerror}") from None
    now = time.time()
    md = Metadata(
        resource=resource, node=node, resource_uuid=new_uuid(), node_uuid=new_uuid(),
        generation=new_uuid(), device_size=device_size, track_size=track_size,
        disk=DISK_UPTODATE if assume_clean else DISK_INCONSISTENT,
        needs_initial_sync=not assume_clean, created=now, updated=now,
        meta_dir=paths.meta_dir,
        volumes=[dict(v) for v in volumes] if volumes else
        [{"name": DEFAULT_VOLUME, "size": device_size}],
    )
    md.save()
    return md


def load_metadata(meta_dir: str | os.PathLike, resource: str,
                  node: str | None = None) -> Metadata:
    """Load and check this node's metadata for *resource* from *meta_dir*.

    Refuses missing, damaged, unsupported-version metadata, and metadata of
    another resource (or of another node, when *node* is given).
    """
    paths = MetaPaths(meta_dir)
    try:
        data = paths.metadata.read_bytes()
    except FileNotFoundError:
        raise MetadataError(
            f"no metadata in {paths.meta_dir}: run `duplex create-md {resource}` first"
        ) from None
    except OSError as e:
        raise MetadataError(f"{paths.metadata}: cannot read: {e.strerror}") from None
    body = decode_metadata(data, paths.metadata)
    if body["resource"] != resource:
        raise MetadataError(
            f"{paths.metadata}: belongs to resource {body['resource']!r}, not {resource!r} "
            f"(two resources sharing a meta-dir?)"
        )
    if node is not None and body["node"] != node:
        raise MetadataError(
            f"{paths.metadata}: belongs to node {body['node']!r}, not {node!r} "
            f"(two nodes sharing a meta-dir?)"
        )
    return Metadata(**body, meta_dir=paths.meta_dir)

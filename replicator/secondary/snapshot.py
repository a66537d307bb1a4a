"""Reflink snapshots of the secondary's image, for catch-up increments too
large to stage in the journal (DESIGN §4).

Such an increment is written straight into the image. Before the first
byte lands, the image is cloned with FICLONE (XFS, btrfs: instant, shares
every extent), and a marker in meta-dir names the clone and the increment's
base seq. Until the increment commits, the clone is the valid crash image:
after a crash, or when the node is promoted mid-increment, the clone is put
back in place. Where the filesystem cannot clone (ext4, tmpfs, a block
device) there is no snapshot, and the secondary says Inconsistent until the
increment commits.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import DuplexError
from replicator.fileio import atomic_write

log = logging.getLogger("duplex.snapshot")

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
MARKER = "increment-snapshot.json"


@dataclass(frozen=True)
class Snapshot:
    """A clone of the image taken before increment *incr_id* (base seq)."""

    path: str
    incr_id: int
    base: int


def marker_path(meta_dir: str | os.PathLike) -> Path:
    return Path(meta_dir) / MARKER


def snapshot_path(image: str) -> str:
    return f"{image}.duplex-snapshot"


def take(image_fd: int, image: str, meta_dir: str | os.PathLike, incr_id: int,
         base: int) -> Snapshot | None:
    """Clone the image (fdatasync first: the clone must hold what the image
    holds durably). None when the filesystem cannot clone."""
    if not stat.S_ISREG(os.fstat(image_fd).st_mode):
        return None
    path = snapshot_path(image)
    os.fdatasync(image_fd)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        log.warning("cannot create snapshot %s: %s", path, e.strerror)
        return None
    try:
        fcntl.ioctl(fd, FICLONE, image_fd)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        os.unlink(path)
        log.info("no reflink snapshot of %s (%s): the image is Inconsistent during the "
                 "increment", image, e.strerror)
        return None
    os.close(fd)
    snap = Snapshot(path, incr_id, base)
    _write_marker(meta_dir, snap)
    log.info("reflink snapshot %s taken before increment %d", path, incr_id)
    return snap


def _write_marker(meta_dir, snap: Snapshot) -> None:
    atomic_write(marker_path(meta_dir), json.dumps(
        {"path": snap.path, "incr_id": snap.incr_id, "base": snap.base}).encode())


def pending(meta_dir: str | os.PathLike) -> Snapshot | None:
    """The snapshot of an increment that had not committed, if any."""
    m = marker_path(meta_dir)
    try:
        d = json.loads(m.read_text())
        return Snapshot(str(d["path"]), int(d["incr_id"]), int(d["base"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{m}: damaged snapshot marker ({e}); the image may be torn: "
                            f"compare it with {snapshot_path('<image>')} by hand") from None


def restore(snap: Snapshot, image: str, meta_dir: str | os.PathLike) -> None:
    """Put the clone back as the image (atomic rename) and forget it."""
    os.replace(snap.path, image)
    marker_path(meta_dir).unlink(missing_ok=True)
    log.warning("restored %s from the snapshot taken before increment %d (it never "
                "committed)", image, snap.incr_id)


def drop(snap: Snapshot, meta_dir: str | os.PathLike) -> None:
    """The increment committed: the clone is no longer needed."""
    marker_path(meta_dir).unlink(missing_ok=True)
    try:
        os.unlink(snap.path)
    except FileNotFoundError:
        pass


class SnapshotError(DuplexError):
    """A snapshot marker cannot be read."""

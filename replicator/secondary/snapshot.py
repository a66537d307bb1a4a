"""Reflink snapshots of the secondary's images, for catch-up increments too
large to stage in the journal (DESIGN §4).

Such an increment is written straight into the images. Before the first
byte lands, every image of the resource (one per volume, DESIGN §8) is
cloned with FICLONE (XFS, btrfs: instant, shares every extent), and one
marker in meta-dir names the clones and the increment's base seq. Until the
increment commits, the clones together are the valid crash image: after a
crash, or when the node is promoted mid-increment, they are all put back in
place. Where any image cannot be cloned (ext4, tmpfs, a block device) there
is no snapshot at all -- a snapshot of some volumes only would restore a
state that never existed -- and the secondary says Inconsistent until the
increment commits.

The marker of a single-volume resource is what it always was
(``{"path", "incr_id", "base"}``); several volumes add ``images``, the
(image, clone) pairs. Restoring renames each clone over its image and only
then removes the marker, so a crash half-way restores the rest next time.
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
    """Clones of the images taken before increment *incr_id* (base seq).
    *path* is the first clone; *images* every (image, clone) pair, empty
    for a marker of one image (then the image is the caller's)."""

    path: str
    incr_id: int
    base: int
    images: tuple[tuple[str, str], ...] = ()

    def pairs(self, image: str) -> list[tuple[str, str]]:
        """(image, clone) pairs; *image* is the one image of an old marker."""
        return list(self.images) if self.images else [(image, self.path)]


def marker_path(meta_dir: str | os.PathLike) -> Path:
    return Path(meta_dir) / MARKER


def snapshot_path(image: str) -> str:
    return f"{image}.duplex-snapshot"


def take(images: list[tuple[int, str]] | int, image: str | os.PathLike | None = None,
         meta_dir: str | os.PathLike | None = None, incr_id: int = 0,
         base: int = 0) -> Snapshot | None:
    """Clone every image, given as (fd, path) pairs (or, for one image,
    ``take(fd, path, meta_dir, incr_id, base)``); fdatasync first: a clone
    must hold what its image holds durably. None, with no clone left
    behind, when any image cannot be cloned."""
    if isinstance(images, int):
        images = [(images, str(image))]
    clones: list[tuple[str, str]] = []
    for fd, path in images:
        clone = _clone(fd, path)
        if clone is None:
            for _img, c in clones:
                _unlink(c)
            return None
        clones.append((path, clone))
    snap = Snapshot(clones[0][1], incr_id, base, tuple(clones) if len(clones) > 1 else ())
    _write_marker(meta_dir, snap)
    log.info("reflink snapshot %s taken before increment %d",
             ", ".join(c for _i, c in clones), incr_id)
    return snap


def _clone(image_fd: int, image: str) -> str | None:
    """The FICLONE copy of one image, durable; None when it cannot be made."""
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
    return path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_marker(meta_dir, snap: Snapshot) -> None:
    doc: dict = {"path": snap.path, "incr_id": snap.incr_id, "base": snap.base}
    if snap.images:
        doc["images"] = [{"image": i, "path": c} for i, c in snap.images]
    atomic_write(marker_path(meta_dir), json.dumps(doc).encode())


def pending(meta_dir: str | os.PathLike) -> Snapshot | None:
    """The snapshot of an increment that had not committed, if any."""
    m = marker_path(meta_dir)
    try:
        d = json.loads(m.read_text())
        images = tuple((str(e["image"]), str(e["path"])) for e in d.get("images", ()))
        return Snapshot(str(d["path"]), int(d["incr_id"]), int(d["base"]), images)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{m}: damaged snapshot marker ({e}); the image may be torn: "
                            f"compare it with {snapshot_path('<image>')} by hand") from None


def restore(snap: Snapshot, image: str, meta_dir: str | os.PathLike) -> None:
    """Put every clone back as its image (atomic renames) and forget them.
    *image*: the image of a one-image marker. A clone already renamed (a
    crash during an earlier restore) is skipped: the marker goes last."""
    for img, clone in snap.pairs(image):
        try:
            os.replace(clone, img)
        except FileNotFoundError:
            if not os.path.exists(img):
                raise
            continue  # restored before a crash
        log.warning("restored %s from the snapshot taken before increment %d (it never "
                    "committed)", img, snap.incr_id)
    marker_path(meta_dir).unlink(missing_ok=True)


def drop(snap: Snapshot, meta_dir: str | os.PathLike) -> None:
    """The increment committed: the clones are no longer needed."""
    marker_path(meta_dir).unlink(missing_ok=True)
    for _img, clone in snap.pairs(""):
        _unlink(clone)


class SnapshotError(DuplexError):
    """A snapshot marker cannot be read."""

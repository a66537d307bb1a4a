"""A node's out-of-sync bitmap and activity log files, opened together.

After an unclean stop the bitmap on disk is only as fresh as its last sync;
every extent the activity log still holds active is ORed in (DESIGN §5),
so the bitmap again covers every track a write may have touched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from replicator.config import Resource
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import CoreError
from replicator.errors import DuplexError
from replicator.metadata import Metadata

log = logging.getLogger("duplex.oosfiles")


class BitmapFilesError(DuplexError):
    """The bitmap or activity log is damaged, foreign or missing."""


@dataclass
class _Opened:
    md: Metadata
    oos: Bitmap
    al: ActivityLog


def open_bitmaps(md: Metadata, resource: Resource) -> _Opened:
    """Open the OOS bitmap and activity log; after an unclean stop, OR every
    active extent into the bitmap (DESIGN §5) and make that durable."""
    uuid = bytes.fromhex(md.node_uuid)
    oos = al = None
    try:
        oos = Bitmap.open(str(md.paths.bitmap), uuid, md.track_size)
        al = ActivityLog.open(str(md.paths.activity_log), uuid)
        if oos.was_dirty:
            # The activity log's geometry is only checked against the
            # bitmap's here (an extent size that is no multiple of the
            # track size): a damaged log is refused like any other.
            n = al.recover_into(oos)
            oos.sync()
            log.warning("%s: previous run did not stop cleanly: %d tracks of the "
                        "activity log marked out of sync", md.resource, n)
    except CoreError as e:
        # Neither file stays open (and locked) behind the error; the bitmap
        # stays DIRTY, so the next open recovers again.
        if al is not None:
            al.close()
        if oos is not None:
            oos.abandon()
        raise BitmapFilesError(str(e)) from None
    return _Opened(md, oos, al)



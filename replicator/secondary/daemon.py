"""The secondary daemon: receives the stream, journals it, applies in-order
runs to the image, acknowledges (DESIGN §6).

Threads, each with one job:

- a listener accepting connections (several may carry one stream; arrival
  order across them does not matter, the seq does);
- one reader per connection: validates frames, appends each DATA frame to
  the journal as one entry (not yet durable) and to the pending queue
  (native/rxq.c: one call per frame). Whenever it has handled every frame
  received so far it commits the journal -- one fdatasync for all of it,
  group commit -- and acks "journaled through N": no hand-off per frame;
- the applier: writes only in-order runs of journaled records to the image
  (in C, from the received frames while they are kept in memory, else read
  back from the journal), fdatasyncs the image and checkpoints the journal,
  acks "applied through N" (coalesced);
- the committer: a safety net, committing what a reader left behind;
- per connection, a handshake thread, then a reaper that closes the link
  once it failed; per VERIFY_REQ, a thread that answers it.

The image therefore only ever holds a prefix of the primary's history. A
record is applied only once it is durable in the journal, so a crash never
leaves the image holding a write the journal could not replay.

Volumes (DESIGN §8): a resource of several volumes has one image per
volume, claimed and opened together (``images``: volume index -> fd, in
config order) and sized against the metadata's volume list. One journal
and one pending queue carry all of them; a record goes to its volume's
image at its volume-relative offset, and a record naming a volume the
resource lacks (or running past its end) is a protocol error at receipt:
the link closes with the reason, nothing of the frame is journaled.
Catch-up increments and verify work on LOGICAL offsets (replicator.layout)
and are split to (volume, offset) here. Every durability point -- a
checkpoint, a FLUSH record, an increment's apply -- fdatasyncs every
image. Runs are written in C either way (native/rxq.h: rxq_apply_run, or
rxq_apply_run_volumes over every image).

Every thread runs under a :class:`replicator.supervise.Supervisor`: an
unexpected exception is logged with its traceback and shown in status as a
named fault (``faults``; the human status prints each); the listener, the
committer and the applier are restarted with backoff (each starts from
state kept under the lock, so a re-run is safe), the per-connection
threads are not (the primary reconnects).

Apply errors (ENOSPC, EIO while writing the image) are not faults but a
disk state: the applier stops with disk **Failed** and the reason ("applying
seq N: No space left on device (image PATH)"), in status here and, in every
ACK, on the primary. Nothing is marked applied, so the failed run --
possibly half written -- is applied again from the journal: the image stays
a prefix. Receiving and journaling go on while the journal has room (then
the readers pause, as always when the journal is full). The applier retries
with backoff (APPLY_RETRY) and at once on ``duplex connect RES``. A failed
fdatasync of the image is different: the kernel may have dropped the
unwritten pages, and a later fdatasync would not say so. Nothing is
checkpointed any more, so the journal still holds every record since the
last checkpoint; a retry writes all of them again from the journal
(``_reapply_since_checkpoint``) and fdatasyncs, and only that success
clears the failure. While the disk is Failed no catch-up increment is
taken (it would be written in place with nothing to redo it from): the
link closes with the reason and the primary, Ahead, keeps its bitmap.
Only when the records are not all in the journal (an increment written in
place) does the node ask for a restart.

Threads and locks
-----------------
``_lock`` (a Condition) guards the pending queue, journal appends and
checkpoints, ``links``, ``incr``, ``_committed`` and the apply-failure
fields (``apply_error``, ``_sync_error``); its waiters are woken by every
checkpoint. ``_commit_lock`` serialises journal commits (fdatasync) and
guards ``journaled`` (written only right after a commit); it is taken
inside ``_lock`` or alone, never the other way round. ``_ack_lock``
guards the ack coalescing fields and is never held with another lock. The
run counters (``runs_started``, ``runs_done``) are written by the one
thread applying and read by observers waiting under ``_lock``.
Lock order: ``_lock`` -> ``_commit_lock``.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping

from replicator.config import (DEFAULT_VOLUME, ConfigError, Group, Node, Resource, load_config,
                               select_node)
from replicator.group.member import GroupStateError, Mark, MemberGate
from replicator.group.notes import MarkNote, NoteError
from replicator.group.secondaries import SecondaryGroup
from replicator.group.side import GroupStartError
from replicator.native.records import find_op
from replicator.records import HEADER_SIZE, OP_MARK, OP_WRITE, unpack_token
from replicator.control import ControlServer
from replicator.devices import device_size
from replicator.layout import Layout
from replicator.errors import DuplexError
from replicator.secondary.journal import Journal, JournalError
from replicator.modes import WAITS_FOR
from replicator.metadata import (DISK_CONSISTENT, DISK_INCONSISTENT, DISK_OUTDATED, DISK_UPTODATE,
                                 Metadata, load_metadata)
from replicator.peerlink import LinkError, PeerLink, RefusedError, pairing_uuid
from replicator.fileio import atomic_write
from replicator.oosfiles import open_bitmaps
from replicator.secondary.applier import ApplyError, apply_run, record_data
from replicator.secondary.pending import PendingQueue, StreamError, check_volumes
from replicator.supervise import Fault, Supervisor
from replicator.secondary import snapshot
from replicator.protocol.errors import ProtocolError
from replicator import generations
from replicator.secondary.increments import Increment, IncrementReceiver
from replicator.secondary.admin import SecondaryAdmin
from replicator.protocol.compat import wire_volumes
from replicator.protocol.errors import ErrorCode
from replicator.protocol.messages import (STATE_DISCARD_MY_DATA, STATE_HAS_BITMAP_UUID,
                                          STATE_NEEDS_RESYNC, STATE_SENDS_BITMAP, ZERO_UUID, Data,
                                          IncrBegin, IncrCommit, IncrData, IncrZero, Message, OosBitmap,
                                          State, Stop, Tokens, VerifyReq, VerifySums)
from replicator.status import new_status, volume_rows
from replicator.tracks import track_digest
from replicator.volumes import VolumeClaims, VolumeSizeError, claim_volumes, layout_of
from replicator import volumes as volumes_mod

log = logging.getLogger("duplex.secondary")

RUN_BYTES = 8 << 20          # apply at most this much between acks
CHECKPOINT_INTERVAL = 1.0    # seconds between image fdatasync + journal checkpoint
CHECKPOINT_BYTES = 64 << 20  # ...or after this much was applied
IDLE_CHECKPOINT = 0.05       # ...or once idle, but not more often than this
ACK_INTERVAL = 0.002         # "applied" acks are coalesced over this long
APPLY_RETRY = (0.5, 10.0)    # a failed apply is retried after this, doubling to the max
DISK_FAILED = "Failed"       # this node cannot write its image (runtime only, never saved)
BLKROGET = 0x125E            # _IO(0x12, 94): is the block device read-only


#: Handshakes one source host may have under way at once (a primary opens
#: at most `connections` links, and a reconnect replaces them).
MAX_HANDSHAKES_PER_SOURCE = 8


class SecondaryError(DuplexError):
    """The secondary cannot start (metadata, journal, image)."""


class ApplyFailed(SecondaryError):
    """Writing a run to the image failed; nothing of it was marked applied."""


def _bits_of(bm, tracks: list[int]) -> bytes:
    out = bytearray((bm.nbits + 7) // 8)
    for t in tracks:
        out[t // 8] |= 1 << (t % 8)
    return bytes(out)


class Secondary(IncrementReceiver):
    """One resource's secondary side."""

    def __init__(self, resource: Resource, node: Node, md: Metadata, journal: Journal,
                 images: Mapping[int, int] | int, pending: PendingQueue):
        """*images*: volume index -> the fd of its image (or one fd: volume 0)."""
        self.resource = resource
        self.node = node
        self.peer = resource.peer_of(node.name)
        self.md = md
        self.journal = journal
        self.images: dict[int, int] = ({0: images} if isinstance(images, int)
                                       else dict(images))
        self.claim: VolumeClaims | None = None  # set by open(): the images are ours alone
        self.pending = pending
        self.size = md.device_size  # logical: the volumes laid end to end
        self.layout: Layout = (layout_of(md.volumes, md.track_size) if md.volumes
                               else Layout.single(md.device_size, md.track_size))
        # Several volumes: records are checked at receipt, runs go to every image.
        self.multi = len(self.layout) > 1
        self.devices: dict[int, str] = {i: v.device for i, v in enumerate(node.volumes)
                                        if i < len(self.layout)}
        self._lock = threading.Condition()      # pending + journal appends/checkpoints
        self._commit_lock = threading.Lock()
        self._commit_wake = threading.Event()
        self._apply_wake = threading.Event()
        self._ack_lock = threading.Lock()
        self._last_ack = 0.0
        self._ack_due = False
        # What the primary's writers wait for (protocol B/C, replicator/modes.py);
        # _received_sent is the reader threads' (a race only resends a seq).
        self._waits_for = WAITS_FOR[resource.modes.protocol]
        self._received_sent = 0
        self._stop = threading.Event()
        self.journaled = pending.received_through  # replayed records are durable
        self.links: set[PeerLink] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self.primary_needs_resync = False
        self.receiving = True
        self.incr: Increment | None = None      # being received
        self._committed: list[Increment] = []   # committed, to apply
        self._pause_apply = threading.Event()    # an in-place increment owns the image
        self.inconsistent_reason = ""
        self.standalone_reason = ""
        self.split_brain = False  # the last handshake was refused as split brain
        self.own_oos = None          # this node's own OOS bitmap (as an old primary)
        self._clear_own_oos_at: int | None = None
        self.last_error = ""
        self.promote_waiting = ""   # what a promotion under way waits for (status)
        self.group: SecondaryGroup | None = None  # a consistency group's member side
        self.refused: dict[str, int] = {}  # _lock: refused connections/frames by reason
        self._handshaking: dict[str, int] = {}  # _lock: handshakes under way, by source host
        self._flood_logged = 0.0
        self._group_bound = 0       # _lock: the group's released point (0: no group)
        # Counted so that an observer can tell whether the image changed
        # while it read it: a sample is whole when no run was in flight.
        self.runs_started = 0
        self.runs_done = 0
        # Applying the image failed (ENOSPC, EIO...): the reason, when the
        # applier retries (monotonic), how long it waits next.
        self.apply_error = ""
        self._sync_error = ""       # a failed image fdatasync: no checkpoint until re-applied
        self._restart_error = ""    # why only a restart recovers (re-applying cannot)
        self._retry_at = 0.0
        self._retry_delay = APPLY_RETRY[0]
        self._apply_retry = threading.Event()  # `duplex connect`: retry now
        self._disk_news = False     # the disk recovered: say so in the next ACK
        self.sup = Supervisor(f"{resource.name} secondary", on_fault=self._on_fault)
        self.control = ControlServer(node.meta_dir, {"status": self.status,
                                                     "connect": self.connect_cmd,
                                                     "verify": self._verify_here,
                                                     "verify-status": self._verify_here},
                                     name="secondary")
        # disconnect, connect, invalidate, outdate, the clean stop (DESIGN §7).
        self.admin = SecondaryAdmin(self)
        self.admin.register(self.control)

    @classmethod
    def open(cls, config_path: str | None, resource_name: str, node_name: str | None) -> "Secondary":
        """Load config and metadata, open the journal, replay it."""
        cfg = load_config(config_path)
        res = cfg.resource(resource_name)
        node = select_node(res, node_name)
        md = load_metadata(node.meta_dir, res.name)
        # Exclusive before the journal replay writes: a mounted or held
        # device, or an image another Duplex uses, is refused by name.
        context = f"{res.name}: node {node.name}"
        claim = claim_volumes(res, node)
        try:
            cls._check_sizes(res, node, md)
            journal = Journal.open(str(md.paths.journal), bytes.fromhex(md.node_uuid))
        except JournalError as e:
            claim.close()
            raise SecondaryError(str(e)) from None
        except BaseException:
            claim.close()
            raise
        marks: list = []  # a group's markers not yet applied: held again after the restart

        def replayed():
            for tok, pos in journal.replay():
                if tok.op == OP_MARK and pos is not None and tok.seq > journal.applied_seq:
                    marks.append((tok, pos))
                yield tok, pos

        pending = PendingQueue.rebuild(journal.applied_seq, replayed(),
                                       applied_token=journal.applied_token)
        if len(pending):
            log.info("%s: journal replay: applied through %d, %d records pending (through %d)",
                     res.name, pending.applied_through, len(pending), pending.received_through)
        snap = snapshot.pending(node.meta_dir)
        if snap is not None:
            if journal.applied_seq >= snap.base:
                snapshot.drop(snap, node.meta_dir)  # it committed before the stop
            else:
                snapshot.restore(snap, node.device, node.meta_dir)
                claim.refresh(context)  # the restored clones are new files: lock them
        sec = cls(res, node, md, journal, _open_images(node), pending)
        sec.claim = claim
        group = cfg.group_of(res.name)
        if group is not None:
            try:
                sec.join_group(group, list(cfg.resource(group.master).nodes))
                sec._replayed_marks(marks)
            except GroupStateError as e:
                sec.journal.close()
                sec.close_images()
                claim.close()
                raise SecondaryError(f"{res.name}: {e}") from None
        # Our own out-of-sync tracks: empty on a secondary that was always
        # one; an old primary's unshipped writes after a failover.
        opened = open_bitmaps(md, res)
        opened.al.close(opened.oos)
        sec.own_oos = opened.oos
        for incr_id, base, positions in journal.committed_increments():
            inc = Increment(incr_id, base, True, positions)
            if sec._increment_waits(inc):
                # A group member's increment beyond the group's point: it
                # waits in the apply loop, as before the stop.
                log.info("%s: journal replay: committed increment %d waits for the group's "
                         "point", res.name, incr_id)
                sec._committed.append(inc)
                sec.pending.cover(base)
                sec.journaled = max(sec.journaled, sec.pending.received_through)
                sec.group.gate.on_journaled(sec.journaled, sec.pending.stamp_of(sec.journaled))
                continue
            # Redo: committed before the stop, maybe not (fully) applied.
            log.info("%s: journal replay: re-applying committed increment %d", res.name, incr_id)
            try:
                inc = Increment(incr_id, base, True, positions)
                while sec._runs_before(inc) and sec.apply_next_run(
                        min(sec.journaled, base) - sec.pending.applied_through):
                    pass
                sec._apply_increment(inc)
            except ApplyFailed as e:
                sec.journal.close()
                sec.close_images()
                claim.close()
                raise SecondaryError(f"{res.name}: journal replay: {e}; free space on (or "
                                     f"repair) the image's device and start again (the "
                                     f"journal keeps every record)") from None
            except OSError as e:
                sec.journal.close()
                sec.close_images()
                claim.close()
                raise SecondaryError(
                    f"{res.name}: re-applying committed increment {incr_id} to "
                    f"{e.filename or node.device} failed: {e.strerror or e}; free space on (or "
                    f"repair) the image's device and start again (the journal keeps the "
                    f"increment)") from None
        return sec

    def join_group(self, group: Group, master_nodes: list[str]) -> None:
        """Be a member of consistency group *group* (DESIGN §13): from now
        on nothing stamped after the group's released point is applied."""
        gate = MemberGate(self.md.paths.group_state, group.name, group.mode, self.resource.name)
        self._group_bound = gate.bound()
        self.pending.set_ts_bound(self._group_bound)
        self.group = SecondaryGroup(group, self.resource.name, self.node.name, master_nodes,
                                    gate, self._set_group_bound, self._group_bound_reached,
                                    self.sync_images)

    def _replayed_marks(self, marks: list) -> None:
        """The markers the journal replay found: held (and reported when the
        group agent starts) as if they had just arrived."""
        found = []
        for tok, pos in marks:
            try:
                note = MarkNote.decode(self.journal.read_record(pos)[HEADER_SIZE:][:tok.data_len])
            except (NoteError, JournalError) as e:
                log.warning("%s: journal replay: marker seq %d ignored: %s",
                            self.resource.name, tok.seq, e)
                continue
            if note.group == self.group.group.name:
                found.append(Mark(tok.seq, tok.ts_ns, note))
        self.group.gate.on_marks(found)
        self.group.gate.on_journaled(self.journaled, self.pending.stamp_of(self.journaled))

    def _set_group_bound(self, t: int) -> None:
        with self._lock:
            self._group_bound = t
            self.pending.set_ts_bound(t)
        self._apply_wake.set()

    def _increment_waits(self, inc: Increment) -> bool:
        """A group member's staged increment waits until the group's bound
        reaches the first marker after it (MemberGate.increment_point)."""
        if self.group is None or not inc.staged:
            return False
        point = self.group.gate.increment_point(inc.base)
        return point is None or point > self._group_bound

    def _runs_before(self, inc: Increment) -> bool:
        """Whether journaled records below *inc*'s base are still to be
        applied first. The primary cleared the bits of every record the
        journal acknowledged, so the increment does not carry them, and its
        rebase would drop them: they go to the image before it (the records
        after the first one missing are in the increment, and so are the
        seqs a group member's increment covers: no record waits there)."""
        nxt = self.pending.applied_through + 1
        # At or below the journaled seq a known stamp means the record is
        # here, complete: a run can take it (rxq_take_run stops at a gap).
        return nxt <= min(self.journaled, inc.base) and self.pending.stamp_of(nxt) != 0

    def _increment_due(self) -> bool:
        """A committed increment is first in line and may be applied now
        (the caller holds _lock)."""
        return bool(self._committed) and not self._increment_waits(self._committed[0])

    def _hold_for_group(self) -> None:
        """A committed staged increment of a group member is durable but
        may have to wait for the group's point: the records after it count
        as journaled meanwhile (so its primary's catch-up goes on and the
        markers after it can be held)."""
        if self.group is None:
            return
        with self._lock:
            held = [inc for inc in self._committed if inc.staged]
            for inc in held:
                self.pending.cover(inc.base)
        if held:
            self._commit_received(always=True)

    def _group_bound_reached(self) -> int | None:
        """The applied seq once nothing journaled at or before the bound is
        left to apply (None: not yet). An increment held for a later point
        is nothing to apply now."""
        with self._lock:
            if self.runs_started != self.runs_done or self._increment_due():
                return None
            if not self.pending.bound_reached(self._group_bound, self.journaled):
                return None
            return self.pending.applied_through

    def _note_marks(self, payload) -> None:
        """The group's MARK records in a DATA frame, for the member gate."""
        offs = find_op(payload, OP_MARK)
        if not offs:
            return
        marks = []
        for off in offs:
            tok = unpack_token(payload, off)
            try:
                note = MarkNote.decode(payload[off + HEADER_SIZE:off + HEADER_SIZE + tok.data_len])
            except NoteError as e:
                raise StreamError(f"record seq {tok.seq}: {e}") from None
            if note.group != self.group.group.name:
                raise StreamError(f"record seq {tok.seq}: a marker of group {note.group!r}, "
                                  f"but {self.resource.name} is in group "
                                  f"{self.group.group.name!r}")
            marks.append(Mark(tok.seq, tok.ts_ns, note))
        self.group.gate.on_marks(marks)

    @staticmethod
    def _check_sizes(res: Resource, node: Node, md: Metadata) -> None:
        """Each image has the size the metadata records for its volume
        (SecondaryError naming the volume, its device and both sizes)."""
        names = [str(v["name"]) for v in md.volumes]
        if not node.multi_volume and names in ([], [DEFAULT_VOLUME]):
            size = device_size(node.device)  # one volume: the words it always had
            if size != md.device_size:
                raise SecondaryError(f"{node.device} is {size} bytes, but the metadata of "
                                     f"{res.name} was made for {md.device_size}")
            return
        try:
            volumes_mod.check_volumes(res, node, md.volumes, str(md.paths.metadata),
                                      fix="the secondary does not start")
        except VolumeSizeError as e:
            raise SecondaryError(str(e)) from None

    # -- images -----------------------------------------------------------

    @property
    def fd(self) -> int:
        """The image of volume 0 (the one image of a single-volume resource)."""
        return self.images[0]

    def device_of(self, vol: int) -> str:
        """The device (image path) of volume *vol*."""
        return self.devices.get(vol, self.node.device)

    def images_label(self) -> str:
        """The image(s) for messages: the path, or every volume's."""
        if not self.multi:
            return self.node.device
        return ", ".join(f"{self.layout.names[i]} {d}" for i, d in sorted(self.devices.items()))

    def sync_images(self) -> None:
        """fdatasync every image; an OSError names the failing image (filename)."""
        for vol, fd in self.images.items():
            try:
                os.fdatasync(fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, self.device_of(vol)) from None

    def close_images(self) -> None:
        """Close every image's fd."""
        images, self.images = self.images, {}
        for fd in images.values():
            os.close(fd)

    def _reopen_images(self) -> None:
        self.images = _open_images(self.node, len(self.layout))

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Check the secret file, bind the replication endpoint, start every
        thread. Raises SecondaryError (one line: the file or the address and
        what to do) before anything listens."""
        try:
            self.resource.secret()  # read again at every handshake
            self.resource.tls_context(self.node.name, server=True)  # TLS files: the same
        except ConfigError as e:
            raise SecondaryError(f"{self.resource.name}: cannot start the secondary: {e}") from None
        host, port = self.node.address
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(fam, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            ls.bind((host, port))
        except OSError as e:
            ls.close()
            raise SecondaryError(f"{self.resource.name}: cannot listen on "
                                 f"{self.node.address_str()}: {e.strerror}") from None
        ls.listen(8)
        ls.settimeout(0.5)
        self._listener = ls
        if self.group is not None:
            try:
                self._start_group()
            except SecondaryError:
                ls.close()
                raise
        self.control.start()
        # Each loop keeps its state in fields of this object (under _lock),
        # so running it again after an unexpected exception is safe.
        for name, target in (("listen", self._accept_loop), ("commit", self._commit_loop),
                             ("apply", self._apply_loop)):
            self._threads.append(self.sup.spawn(f"duplex-{name}", target, restart=True,
                                                backoff=(0.2, 5.0)))
        self._apply_wake.set()
        log.info("%s: secondary listening on %s", self.resource.name, self.node.address_str())

    def _start_group(self) -> None:
        try:
            self.group.start()
        except GroupStartError as e:
            raise SecondaryError(str(e)) from None

    def stop(self) -> None:
        """Stop accepting, drop links, apply what is journaled, checkpoint."""
        self._stop.set()
        self.sup.stop()
        if self.group is not None:
            self.group.stop()
        for link in list(self.links):
            link.close("secondary stopping")
        self._commit_wake.set()
        self._apply_wake.set()
        self._apply_retry.set()
        left = self.sup.join(30)
        if left:
            log.warning("%s: threads still running at stop: %s", self.resource.name,
                        ", ".join(left))
        if self._listener:
            self._listener.close()
        self.control.stop()
        self._close_own_oos()
        try:
            self._checkpoint()
        except OSError as e:  # the journal keeps what the image may have lost
            log.error("%s: image %s: fdatasync at stop failed: %s; the journal keeps every "
                      "record since seq %d and the next start applies them again",
                      self.resource.name, e.filename or self.node.device, e.strerror,
                      self.journal.applied_seq)
        self.journal.close()
        self.close_images()
        if self.claim is not None:
            self.claim.close()
        log.info("%s: secondary stopped, applied through %d", self.resource.name,
                 self.pending.applied_through)

    # -- connections ------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            if not self.receiving or not self.admin.accepts():  # promoted, or disconnected
                sock.close()
                continue
            with self._lock:
                busy = self._handshaking.get(addr[0], 0)
                if busy < MAX_HANDSHAKES_PER_SOURCE:
                    self._handshaking[addr[0]] = busy + 1
            if busy >= MAX_HANDSHAKES_PER_SOURCE:
                # A flood of half-open connections from one host must not
                # take every thread: the extra ones are closed at once.
                sock.close()
                self._count_refused_reason("too-many-handshakes")
                now = time.monotonic()
                if now - self._flood_logged > 10:
                    self._flood_logged = now
                    log.warning("%s: %s has %d connections in the handshake already: further "
                                "ones closed (logged once per 10 s)", self.resource.name,
                                addr[0], busy)
                continue
            try:
                self.sup.spawn("duplex-handshake", lambda s=sock, a=addr: self._handshake(s, a))
            except BaseException:
                sock.close()  # no thread owns it
                raise

    def _state_for(self, peer: State) -> State:
        """Our STATE, once the primary's is known: the generation handshake
        (DESIGN §7) decides here whether we follow this primary."""
        self._check_generations(peer)
        with self._lock:
            history, has_bitmap = generations.state_history(self.md)
            flags = ((STATE_NEEDS_RESYNC if self.md.needs_initial_sync else 0)
                     | (STATE_HAS_BITMAP_UUID if has_bitmap else 0)
                     | (STATE_DISCARD_MY_DATA if self.md.discard_my_data else 0)
                     | (STATE_SENDS_BITMAP if self.admin.sends_bitmap() or self._own_oos_tracks()
                        else 0))
            return State(pairing_uuid(self.md), bytes.fromhex(self.md.generation),
                         self.md.device_size, self.md.track_size, "secondary", self._disk(),
                         journaled_seq=self.journaled,
                         applied_seq=self.pending.applied_through,
                         flags=flags, history=history,
                         volumes=wire_volumes([(v["name"], v["size"]) for v in self.md.volumes]))

    def _answer_verify(self, link: PeerLink, req: VerifyReq) -> None:
        """Checksums of the requested tracks, read between apply runs once
        everything written before the primary's read is applied (or after
        a while anyway: the primary then retries what differs)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with self._lock:
                if self.pending.applied_through >= req.after_seq and not self._committed:
                    break
            time.sleep(0.01)
        ts = self.md.track_size
        sums = []
        with self._lock:  # no run is applied while we read
            while self.runs_started != self.runs_done:
                self._lock.wait(0.01)
            applied = self.pending.applied_through
            for t in range(req.first_track, req.first_track + req.count):
                sums.append(self._track_sum(t * ts, ts))
        try:
            link.send(VerifySums(req.verify_id, req.first_track, applied, tuple(sums)))
        except LinkError:
            pass

    def _track_sum(self, off: int, ts: int) -> int:
        """Digest of the logical track at *off*, read from its volume's image
        and cut at that volume's end (as the primary's core_pread returns
        short there); 0 past the logical end."""
        if off >= self.size:
            return 0
        try:
            vol, voff, n = self.layout.clip(off, ts)
        except ValueError:  # no volume holds it (an alignment gap)
            return 0
        return track_digest(os.pread(self.images[vol], n, voff)) if n > 0 else 0

    def _check_generations(self, peer_state: State) -> None:
        """Refuse a primary whose data we must not follow: split brain,
        unrelated data, or older data than ours (ProtocolError: the primary
        is told why, and both sides report it)."""
        # The one rule both sides follow (the primary calls it too).
        v = generations.verdict(
            generations.SECONDARY, generations.of_metadata(self.md),
            generations.from_state(peer_state, bool(peer_state.flags & STATE_HAS_BITMAP_UUID)),
            resource=self.resource.name, secondary_fresh=self.md.peer_node_uuid is None,
            secondary_discards=self.md.discard_my_data)
        self.split_brain = v.split_brain
        if v.accept:
            if v.discards:
                log.warning("%s: %s", self.resource.name, v.why)
            return
        self.standalone_reason = v.why
        log.error("%s: refusing primary: %s", self.resource.name, v.why)
        raise ProtocolError(v.why, ErrorCode.SPLIT_BRAIN if v.split_brain
                            else ErrorCode.STATE_MISMATCH)

    def _follow(self, link: PeerLink) -> None:
        """After a successful handshake: take the primary's generations, and
        hand it our own out-of-sync tracks (an old primary coming back: its
        writes that never reached the peer are overwritten by the resync)."""
        ps = link.peer_state
        peer = generations.from_state(ps, bool(ps.flags & STATE_HAS_BITMAP_UUID))
        tracks = [] if self.admin.send_invalid_bitmap(link, ps.written_seq) else \
            self._own_oos_tracks()
        if tracks:
            self._write_failback_report(peer, tracks)
            link.send(OosBitmap(self.md.track_size, self.own_oos.nbits,
                                _bits_of(self.own_oos, tracks)))
            self._clear_own_oos_at = ps.written_seq  # cleared once an increment covers it
        with self._lock:
            changed = self.md.generation != peer.current or self.md.discard_my_data
            if changed:
                with self.md.update():
                    generations.adopt(self.md, peer)
                    if self.md.disk == DISK_OUTDATED:
                        self.md.disk = DISK_CONSISTENT
            self.standalone_reason = ""
        self.admin.followed(ps.written_seq, self.pending.applied_through)

    def _close_own_oos(self) -> None:
        with self._lock:
            bm, self.own_oos = self.own_oos, None
        if bm is not None:
            bm.close()

    def _own_oos_tracks(self) -> list[int]:
        """Tracks this node wrote as a primary that its peer never got.
        Only a node that was primary (demoted: Outdated) or that gives up
        its data has such tracks; a secondary's bitmap from create-md means
        nothing here."""
        bm = self.own_oos
        if (bm is None or self.md.needs_initial_sync
                or not (self.md.disk == DISK_OUTDATED or self.md.discard_my_data)
                or not bm.count()):
            return []
        out, t = [], bm.find_next(0)
        while t >= 0:
            out.append(t)
            t = bm.find_next(t + 1)
        return out

    def _write_failback_report(self, peer, tracks: list[int]) -> None:
        """What this node wrote that its peer never got, as track ranges:
        the resync that follows overwrites it."""
        ranges: list[list[int]] = []
        for t in tracks:
            off = t * self.md.track_size
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1][1] += self.md.track_size
            else:
                ranges.append([off, self.md.track_size])
        if self.multi:  # logical ranges -> each volume's, by name
            rows = [{"volume": self.layout.names[v], "offset": o, "length": k}
                    for lo, n in ranges for v, o, k in _volume_pieces(self.layout, lo, n)]
        else:
            rows = [{"offset": o, "length": n} for o, n in ranges]
        report = {"resource": self.resource.name, "node": self.node.name,
                  "superseded_by_generation": peer.current,
                  "our_generation": self.md.generation,
                  "note": ("writes of this node that never reached its peer, by range (the "
                           "exact writes are not kept); the resync from the peer overwrites "
                           "them"),
                  "ranges": rows,
                  "bytes": sum(r["length"] for r in rows),
                  "time": time.time()}
        path = self.md.paths.meta_dir / "failback-report.json"
        atomic_write(path, (json.dumps(report, indent=2) + "\n").encode(), 0o644)
        log.warning("%s: %d bytes in %d ranges written here never reached the peer; they "
                    "are overwritten by the resync (listed in %s)", self.resource.name,
                    report["bytes"], len(ranges), path)

    def _handshake(self, sock: socket.socket, addr) -> None:
        """Authenticate and follow one primary (its own thread). Every way
        out closes the socket unless a reaper now owns the link."""
        link: PeerLink | None = None
        handed = False
        try:
            try:
                # The secret is read per handshake: fixing the file fixes the node.
                secret = self.resource.secret()
                tls = self.resource.tls_context(self.node.name, server=True)
            except ConfigError as e:
                self.last_error = f"connection from {addr[0]} refused: {e}"
                log.error("%s: %s", self.resource.name, self.last_error)
                return
            try:
                link = PeerLink.accept(sock, role="secondary", resource=self.resource.name,
                                       node=self.node.name, secret=secret,
                                       state_for=self._state_for, on_event=self._on_event,
                                       on_idle=self._on_idle,
                                       timeout=self.resource.auth_timeout_s, tls=tls,
                                       tls_peer=self.resource.peer_of(self.node.name).name)
                link.set_timeouts(self.resource.ping_interval_s, self.resource.ping_timeout_s)
            except (LinkError, DuplexError, OSError) as e:
                self.last_error = f"connection from {addr[0]} refused: {e}"
                log.error("%s: %s", self.resource.name, self.last_error)
                self._count_refused(e)
                return
            finally:
                self._handshake_done(addr[0])
            with self._lock:
                # Promoted, or disconnected by the admin, while this handshake ran.
                if not self.receiving or not self.admin.accepts():
                    return
                self.links.add(link)
            self._adopt(link.peer_state)
            try:
                self._follow(link)
            except (LinkError, DuplexError) as e:
                link.error = link.error or str(e)
                return
            self.primary_needs_resync = bool(link.peer_state.flags & STATE_NEEDS_RESYNC)
            self.sup.clear("duplex-handshake")  # an earlier one's fault is history now
            log.info("%s: primary %s connected from %s", self.resource.name, link.peer_name,
                     addr[0])
            if self.apply_error:
                self._send_ack(force=True)  # the reason, which STATE cannot carry
            reaped = link
            self.sup.spawn("duplex-reap", lambda: self._reap(reaped))
            handed = True  # the reaper closes it
        finally:
            if not handed:
                if link is not None:
                    self._drop(link, link.error or "this node no longer receives (promoted)")
                else:
                    sock.close()  # closing twice is harmless: accept may have

    def _handshake_done(self, host: str) -> None:
        with self._lock:
            n = self._handshaking.get(host, 0) - 1
            if n > 0:
                self._handshaking[host] = n
            else:
                self._handshaking.pop(host, None)

    def _count_refused_reason(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def _count_refused(self, e: BaseException) -> None:
        """Count a refused connection or frame by reason (metrics)."""
        if isinstance(e, StreamError):
            reason = "stream"
        elif isinstance(e, RefusedError):
            reason = ErrorCode(e.code).name.lower() if e.code in ErrorCode._value2member_map_ \
                else "refused"
        elif isinstance(e, LinkError):
            reason = "handshake"
        else:
            reason = "other"
        self._count_refused_reason(reason)

    def _drop(self, link: PeerLink, reason: str) -> None:
        """Forget *link* and close it: its socket and its threads."""
        with self._lock:
            self.links.discard(link)
        link.close(reason)

    def _reap(self, link: PeerLink) -> None:
        """Wait for *link* to fail, then close it (its socket: no fd stays
        behind a failed session) and record why."""
        try:
            while link.alive() and not self._stop.is_set():
                time.sleep(0.2)
            if link.error and not self._stop.is_set():
                self.last_error = link.error
                log.warning("%s: link to %s closed: %s", self.resource.name, link.peer_name,
                            link.error)
        finally:
            self._drop(link, link.error or "closed")

    def _adopt(self, peer: State) -> None:
        """At the first handshake the secondary takes the primary's resource
        UUID; from then on a peer with another one is refused."""
        if self.md.peer_node_uuid is None and peer.resource_uuid != ZERO_UUID:
            with self.md.update():
                self.md.resource_uuid = peer.resource_uuid.hex()
                self.md.peer_node_uuid = peer.resource_uuid.hex()

    def _on_event(self, link: PeerLink, ev: Message) -> None:
        """Reader thread: TOKENS and DATA from the primary."""
        try:
            if isinstance(ev, Tokens):
                self._on_tokens(ev)
            elif isinstance(ev, Data):
                self._on_data(ev)
            elif isinstance(ev, IncrBegin):
                self._hold_while_failed(link, ev)
                self._on_incr_begin(ev)
                if self.group is not None and self.incr is not None and not self.incr.staged:
                    # Written in place, it cannot wait for the group's point:
                    # the member leaves the group until it streams again.
                    self.group.catching_up(ev.base_seq)
            elif isinstance(ev, IncrData):
                self._on_incr_data(ev)
            elif isinstance(ev, IncrCommit):
                self._on_incr_commit(ev)
                self._hold_for_group()
            elif isinstance(ev, IncrZero):
                self._on_incr_zero(ev)
            elif isinstance(ev, Stop):  # a planned switchover's clean stop
                self.admin.on_stop(link, ev)
            elif isinstance(ev, VerifyReq):
                # Off the reader thread: waiting for the applier needs the
                # frames that follow.
                self.sup.spawn("duplex-verify", lambda: self._answer_verify(link, ev))
        except StreamError as e:
            self._count_refused(e)
            raise ProtocolError(str(e)) from None
        except OSError as e:
            if self.incr is None or self.incr.staged:
                raise  # the journal: the link fails with it, and says why
            # An increment written in place hit a full or failing image: a
            # disk state, as for a run; the primary sends it again after the
            # reconnect this causes.
            where = e.filename or self.node.device
            what = ("metadata file" if os.path.dirname(os.path.abspath(where)) ==
                    os.path.abspath(self.node.meta_dir) else "image")
            self._apply_failed(f"writing increment {self.incr.id} in place: "
                               f"{e.strerror or e} ({what} {where})")
            raise ProtocolError(self.apply_error) from None

    def _on_tokens(self, ev: Tokens) -> None:
        if self.multi:  # a token for a volume we lack closes the link, before anything
            check_volumes(ev.payload, self.layout.sizes, tokens_only=True)
        with self._lock:
            self._wait_room(len(ev.payload))
            # Queued first: a frame the queue refuses never reaches the journal.
            if self.pending.add_token_bytes(ev.payload):
                self.journal.append_token_frame(ev.payload, ev.max_seq)

    def _on_data(self, ev: Data) -> None:
        # The frame was checked (structure, CRCs) in one C call by decode;
        # here it is checked against the queue, journaled as one entry and
        # queued, each in one call: no Python work per record.
        payload = ev.payload
        if self.multi:  # several volumes: each record's volume and range, at receipt
            check_volumes(payload, self.layout.sizes)
        with self._lock:
            self._wait_room(len(payload))
            if self.pending.add_frame(payload, 0, dry_run=True):
                if self.group is not None:
                    self._note_marks(payload)
                base = self.journal.append_frame(payload, ev.max_seq)
                self.pending.add_frame(payload, base, max_seq=ev.max_seq)

    def _on_idle(self, link: PeerLink) -> None:
        """Reader thread, every frame received so far handled: commit and
        ack. Commit and ack ride on the reader, so a frame costs no thread
        hand-off. Under protocol B the primary's writers wait for receipt:
        RECEIVED goes out before the commit's fdatasync."""
        if self._waits_for == "received":
            with self._lock:
                target = self.pending.received_through
            if target > self._received_sent:
                self._received_sent = target
                try:
                    link.send_received(target)
                except LinkError:
                    pass  # the reader sees the link go
        self._commit_received()

    def _commit_received(self, always: bool = False) -> None:
        """Commit the journal (group commit: one fdatasync for all that was
        appended) when it holds newly received records, or *always*; then
        ack "journaled" -- the primary frees its ring on it."""
        with self._lock:
            target = self.pending.received_through
        if target <= self.journaled and not always:
            return
        with self._commit_lock:
            self.journal.commit()
            # Two threads commit (the reader and the committer): the field
            # is theirs under _commit_lock, or it could step back.
            advanced = target > self.journaled
            if advanced:
                self.journaled = target
        if advanced:
            self._apply_wake.set()
            # Coalesced (the applier sends it if due), unless writers on the
            # primary wait for it (protocol B/C): then at once, once per commit.
            self._send_ack(force=self._waits_for is not None)
            if self.group is not None:
                with self._lock:
                    ts = self.pending.stamp_of(target)
                self.group.on_journaled(target, ts)

    def _wait_room(self, n: int) -> None:
        # Backpressure: never overwrite unapplied journal entries; the
        # socket stops being read and TCP slows the primary down.
        while not self.journal.has_room(n):
            if self._stop.is_set():
                raise LinkError("stopping")
            self._apply_wake.set()
            self._lock.wait(0.5)

    # -- commit and apply -------------------------------------------------

    def _commit_loop(self) -> None:
        while not self._stop.is_set():
            self._commit_wake.wait(0.5)
            self._commit_wake.clear()
            self._commit_received(always=True)

    def _apply_loop(self) -> None:
        last_ckpt = time.monotonic()
        since_ckpt = 0
        while True:
            if self.apply_error and not self._wait_retry():
                return  # stopping
            if self._sync_error and not self._restart_error:
                try:
                    self._reapply_since_checkpoint()
                except OSError as e:
                    self._sync_failed(e)
                    continue
            elif self.apply_error and not self._sync_error:
                with self._lock:
                    idle = not self._committed and self.journaled <= self.pending.applied_through
                if idle:
                    # Nothing here to retry with: the failure was an
                    # increment's (written in place, or its metadata), and
                    # its retry is the primary's next offer, let through
                    # now. Failing again doubles the wait.
                    self._apply_succeeded(keep_backoff=True)
            if self.group is not None:
                self.group.poll()  # a release applied: complete it
            with self._lock:
                # Peeked, not popped: one that fails stays first, to retry.
                inc = self._committed[0] if self._committed else None
                if inc is not None and self._increment_waits(inc):
                    inc = None  # a group member's: held until the group's point passes it
                elif inc is not None and self._runs_before(inc):
                    inc = None  # journaled records below its base go first (see there)
            if inc is not None:
                try:
                    self._apply_increment(inc)
                except OSError as e:
                    if not self._sync_error:
                        self._apply_failed(f"applying increment {inc.id}: {e.strerror or e} "
                                           f"(image {e.filename or self.node.device})")
                    continue
                with self._lock:
                    self._committed.remove(inc)
                self._apply_succeeded()
                self._send_ack()
                continue
            with self._lock:
                limit = 0 if self._pause_apply.is_set() else \
                    self.journaled - self.pending.applied_through
            try:
                applied = self.apply_next_run(limit) if limit > 0 else 0
            except ApplyFailed as e:
                self._apply_failed(str(e))
                continue
            if applied:
                self._apply_succeeded()
            since_ckpt += applied
            run = applied > 0
            now = time.monotonic()
            # Idle: free the journal soon, but a stream that leaves the
            # applier idle between every record must not cost two
            # fdatasyncs per record on a real disk.
            idle_due = not run and now - last_ckpt >= IDLE_CHECKPOINT
            if since_ckpt and (since_ckpt >= CHECKPOINT_BYTES or now - last_ckpt >= CHECKPOINT_INTERVAL
                               or idle_due or self._room_wanted()):
                try:
                    self._checkpoint()
                except OSError as e:
                    self._sync_failed(e)
                    continue
                since_ckpt = 0
                last_ckpt = now
            if run:
                self._send_ack()
                continue
            if self._ack_due:
                self._send_ack(force=True)
            if self._stop.is_set():
                return
            self._apply_wake.wait(IDLE_CHECKPOINT if since_ckpt else 0.2)
            self._apply_wake.clear()

    def apply_next_run(self, limit: int | None = None) -> int:
        """Write the next in-order run (at most *limit* records: only
        journaled ones may go) to the image and mark it applied. The write
        runs in C without the lock, reading the data back from the journal.
        Returns the encoded bytes applied, 0 when nothing was ready."""
        with self._lock:
            if not self.pending.take_run(max_records=limit, max_bytes=RUN_BYTES):
                return 0
            run = self.pending.info()
        self.runs_started += 1
        try:
            try:
                if self.multi:
                    self.pending.apply_taken_volumes(
                        self.journal.fd, [self.images[v] for v in range(len(self.layout))],
                        self.layout.sizes)
                else:
                    self.pending.apply_taken(self.journal.fd, self.fd, self.size)
            except OSError as e:
                # Nothing is marked: the run, maybe half written, is applied
                # again from the journal, never skipped. The image holds
                # every write through applied_through: the first seq of the
                # run is the one that could not be applied.
                first = self.pending.applied_through + 1
                end = run.run_end
                what = f"seq {first}" + (f" (run {first}..{end})" if end > first else "")
                err = os.strerror(e.errno) if e.errno else str(e)
                vol = getattr(e, "duplex_volume", None)
                image = self.device_of(vol) if self.multi and vol is not None else \
                    self.node.device
                if e.errno in (errno.EPERM, errno.EROFS, errno.EACCES) and _read_only(image):
                    err += ": the device is read-only"
                raise ApplyFailed(f"applying {what}: {err} (image {image})") from None
            except ApplyError as e:
                raise ApplyFailed(f"applying: {e} (image {self.images_label()})") from None
            with self._lock:
                self.pending.mark_applied(run.run_end)
            return run.run_bytes
        finally:
            self.runs_done += 1

    # -- apply failures: a disk state, retried ----------------------------

    def _apply_failed(self, why: str) -> None:
        """Applying failed: disk Failed with *why*, until a retry succeeds."""
        with self._lock:
            first = self.apply_error != why
            self.apply_error = why
            delay = self._retry_delay
            self._retry_at = time.monotonic() + delay
            self._retry_delay = min(delay * 2, APPLY_RETRY[1])
        if first and self._restart_error:
            log.error("%s: disk Failed: %s", self.resource.name, why)
        elif first:
            log.error("%s: disk Failed: %s; the journal keeps every record (applied through "
                      "seq %d) and receiving goes on while it has room; retrying in %.1f s, "
                      "or now with `duplex connect %s`", self.resource.name, why,
                      self.pending.applied_through, delay, self.resource.name)
        self._send_ack(force=True)

    def _apply_succeeded(self, keep_backoff: bool = False) -> None:
        """A run or increment went to the image: a failure before it is over
        (after a failed fdatasync: once the records were written again).
        *keep_backoff*: a retry let through, not yet a success: the next
        failure waits twice as long."""
        if not self.apply_error or self._sync_error:
            return
        with self._lock:
            why, self.apply_error = self.apply_error, ""
            if not keep_backoff:
                self._retry_delay = APPLY_RETRY[0]
            self._disk_news = True
        log.warning("%s: %s (it had failed: %s); applied through seq %d", self.resource.name,
                    "retrying: the next increment may go on" if keep_backoff else
                    "applying resumed", why, self.pending.applied_through)

    def _sync_failed(self, e: OSError) -> None:
        """fdatasync of the image failed: written pages may be lost, and a
        later fdatasync would not say so. Nothing is checkpointed any more;
        a retry writes every record since the checkpoint again
        (:meth:`_reapply_since_checkpoint`). An increment written in place
        is in no journal: then only a restart (and the primary's catch-up)
        recovers."""
        with self._lock:
            in_place = (self.incr is not None and not self.incr.staged) or any(
                not inc.staged for inc in self._committed)
        image = e.filename or self.node.device
        if in_place:
            why = (f"fdatasync of image {image} failed: {e.strerror or e}, and an increment "
                   f"written in place is not in the journal: restart the secondary "
                   f"(systemctl restart duplex@{self.resource.name})")
        else:
            why = (f"fdatasync of image {image} failed: {e.strerror or e}; the journal keeps "
                   f"every record since seq {self.journal.applied_seq}, and each retry writes "
                   f"them all again")
        with self._lock:
            self._sync_error = why
            if in_place:
                self._restart_error = why
        self._apply_failed(why)

    def _reapply_since_checkpoint(self) -> None:
        """After a failed fdatasync of the image: write every record applied
        since the last checkpoint again, in seq order, from the journal
        (nothing was checkpointed since, so each one is still there), then
        fdatasync every image. Success clears the failure; an OSError (the
        image still fails) leaves it. Applying the same prefix again gives
        the same bytes (applier.py), so the image ends as it was meant to."""
        with self._lock:
            ckpt, upto = self.journal.applied_seq, self.pending.applied_through
            found: dict[int, tuple] = {}
            for tok, pos in self.journal.replay():
                if ckpt < tok.seq <= upto and (pos is not None or tok.seq not in found):
                    found[tok.seq] = (tok, pos)
        missing = next((q for q in range(ckpt + 1, upto + 1)
                        if q not in found or (found[q][0].op == OP_WRITE and found[q][1] is None)),
                       None)
        if missing is not None:
            why = (f"{self._sync_error}; but seq {missing} is not in the journal: restart the "
                   f"secondary (systemctl restart duplex@{self.resource.name})")
            with self._lock:
                self._restart_error = self._sync_error = why
            self._apply_failed(why)
            return

        def items():
            for q in range(ckpt + 1, upto + 1):
                tok, pos = found[q]
                yield tok, (record_data(self.journal.read_record(pos))[1] if pos is not None
                            else b"")

        self.runs_started += 1  # samplers: the image changes under them
        try:
            apply_run(self.images, items(), dict(enumerate(self.layout.sizes)))
            self.sync_images()
        finally:
            self.runs_done += 1
        with self._lock:
            self._sync_error = ""
        log.warning("%s: wrote seqs %d..%d again from the journal after the failed fdatasync "
                    "and made the image durable", self.resource.name, ckpt + 1, upto)
        self._apply_succeeded()

    def _wait_retry(self) -> bool:
        """While applying has failed: wait for the next retry (backoff, or
        `duplex connect`). False when stopping."""
        while not self._stop.is_set():
            if self._restart_error:
                self._apply_retry.wait(1.0)  # only a restart recovers
                self._apply_retry.clear()
                continue
            left = self._retry_at - time.monotonic()
            if left <= 0 or self._apply_retry.is_set():
                self._apply_retry.clear()
                return True
            self._apply_retry.wait(min(left, 1.0))
        return False

    @property
    def restart_needed(self) -> str:
        """Why only a restart can make this node go on (a failed fdatasync
        of the image after an increment written in place), or "". ``duplex
        up`` then exits non-zero."""
        return self._restart_error

    def retry_apply(self) -> None:
        """Retry a failed apply now (``duplex connect``, promote)."""
        with self._lock:
            self._retry_at = 0.0
            self._retry_delay = APPLY_RETRY[0]
        self._apply_retry.set()
        self._apply_wake.set()

    def _on_fault(self, fault: Fault) -> None:
        """A supervised thread raised (the supervisor logged it): keep the
        last one as the reason status gives when nothing else explains."""
        self.last_error = f"thread {fault.thread} {fault.state}: {fault.error}"

    def _room_wanted(self) -> bool:
        return self.journal.free_bytes < self.journal.area_size // 4

    def _checkpoint(self) -> None:
        """Make the image durable, then free the journal behind it. After
        a failed fdatasync nothing is freed any more (see _sync_failed)."""
        if self._sync_error:
            return
        self.sync_images()
        with self._lock:
            applied = self.pending.applied_through
            if applied > self.journal.applied_seq:
                with self._commit_lock:
                    self.journal.checkpoint(applied, self.pending.applied_token)
            self._lock.notify_all()
        self.admin.check_applied(applied)  # an outdated mark clears once caught up

    def _send_ack(self, force: bool = False) -> None:
        """Tell the primary where we are, at most once per ACK_INTERVAL
        unless *force*: a busy applier does not cost an ack per run; it
        sends the one still due when it goes idle."""
        now = time.monotonic()
        with self._ack_lock:
            if not force and now - self._last_ack < ACK_INTERVAL:
                self._ack_due = True
                return
            self._last_ack = now
            self._ack_due = False
        with self._lock:
            links = list(self.links)
            applied = self.pending.applied_through
            # The disk state rides along while it is Failed, and once after.
            disk, why = None, ""
            if self.apply_error:
                disk, why = DISK_FAILED, self.apply_error
            elif self._disk_news:
                disk, self._disk_news = self._disk(), False
        for link in links:
            try:
                link.send_ack(self.journaled, applied, disk, why)
            except LinkError:
                pass

    # -- promotion hooks (replicator/promote.py drives these) -------------

    def stop_receiving(self, reason: str = "promoted") -> None:
        """Refuse new connections and close the current ones: nothing more
        enters the queue after this. An increment written in place that
        will now never commit is rolled back to its reflink snapshot."""
        self.receiving = False
        self._close_own_oos()
        for link in list(self.links):
            link.close(reason)
        inc = self.incr
        if inc is not None and inc.snapshot is not None:
            with self._lock:
                self.incr = None
                self.close_images()
                snapshot.restore(inc.snapshot, self.node.device, self.node.meta_dir)
                if self.claim is not None:  # the restored clones are new files: lock them
                    self.claim.refresh(f"{self.resource.name}: node {self.node.name}")
                self._reopen_images()
                self._pause_apply.clear()
        with self._lock:
            self.links.clear()

    def apply_all(self, timeout: float = 60.0,
                  progress: Callable[[str], None] | None = None) -> int:
        """Wait until every journaled in-order record is applied, then make
        the image durable and checkpoint. Returns the applied seq.

        Never waits longer than *timeout* seconds: then SecondaryError says
        what it waited for and why it did not come (an apply error, a
        committed increment). *progress* gets a line every few seconds while
        it waits. A failed apply is retried at once, then with backoff."""
        self._commit_wake.set()
        self.retry_apply()
        start = time.monotonic()
        deadline = start + timeout
        next_note = start + 2.0
        while True:
            with self._lock:
                target = min(self.journaled, self.pending.received_through)
                applied = self.pending.applied_through
                # In a group, "everything" is everything up to its point.
                reached = (self.pending.bound_reached(self._group_bound, self.journaled)
                           if self._group_bound else applied >= target)
                done = (reached and not self._increment_due()
                        and self.runs_started == self.runs_done)
            if done:
                break
            now = time.monotonic()
            waiting = self._waiting_for(applied, target)
            if now > deadline:
                raise SecondaryError(
                    f"{self.resource.name}: gave up after {timeout:g} s: {waiting}"
                    + ("; free space on (or repair) the image's device and run promote again "
                       "(the journal keeps every record), or give promote a longer --timeout"
                       if self.apply_error else "; run promote again with a longer --timeout"))
            if now >= next_note:
                next_note = now + 5.0
                line = f"{self.resource.name}: promote: {waiting} ({now - start:.0f} s of {timeout:g} s)"
                log.info("%s", line)
                self.promote_waiting = line
                if progress is not None:
                    progress(line)
            self._apply_wake.set()
            time.sleep(0.05)
        try:
            self._checkpoint()
        except OSError as e:
            self._sync_failed(e)
            raise SecondaryError(f"{self.resource.name}: {self._sync_error}") from None
        if self._sync_error:
            raise SecondaryError(f"{self.resource.name}: {self._sync_error}")
        return self.pending.applied_through

    def _waiting_for(self, applied: int, target: int) -> str:
        """What apply_all waits for, in words."""
        if self.apply_error:
            return (f"applied through seq {applied} of {target} journaled, and cannot apply "
                    f"{self.apply_error.removeprefix('applying ')}")
        if self._committed:
            return f"applying catch-up increment {self._committed[0].id}"
        return f"applying the journal: applied through seq {applied} of {target}"

    def connect_cmd(self, discard_my_data: bool = False, resource: str | None = None) -> dict:
        """Control request ``connect``: --discard-my-data takes effect at the
        next handshake (the primary retries on its own)."""
        if discard_my_data:
            with self._lock, self.md.update():
                self.md.discard_my_data = True
            log.warning("%s: this node's own changes will be discarded at the next handshake",
                        self.resource.name)
        retried = bool(self.apply_error)
        if retried:
            log.info("%s: connect: retrying the failed apply now", self.resource.name)
            self.retry_apply()
        return {"resource": self.resource.name, "discard_my_data": self.md.discard_my_data,
                "apply_retried": retried, "apply_error": self.apply_error}

    def _verify_here(self, **_args) -> dict:
        """Control requests ``verify``/``verify-status``: verify is the
        primary's; say so in one line."""
        raise SecondaryError(
            f"{self.resource.name}: node {self.node.name} is the Secondary; `duplex verify` "
            f"compares both sides from the primary: run `duplex verify {self.resource.name}` "
            f"on {self.peer.name}")

    def loss_view(self):
        """The pending queue's view for a loss report (DESIGN §7)."""
        with self._lock:
            return self.pending.loss_view()

    # -- status -----------------------------------------------------------

    def _disk(self) -> str:
        if self.apply_error:
            return DISK_FAILED
        if self.md.needs_initial_sync or self.md.disk == DISK_INCONSISTENT:
            return DISK_INCONSISTENT
        if self.md.outdated:  # `duplex outdate`
            return DISK_OUTDATED
        if self.links and self.pending.applied_through >= self.journaled and not len(self.pending):
            return DISK_UPTODATE
        return DISK_CONSISTENT

    def status(self) -> dict:
        """The status document (replicator/status.py schema)."""
        with self._lock:
            info = self.pending.info()
            applied, highest, pending_bytes = info.applied, info.highest, info.bytes
            connected = any(l.alive() for l in self.links)
            first_ts = None
            oldest = self.pending.oldest_pending()
            if oldest is not None:
                first_ts = oldest.ts_ns
            disk = self._disk()
            tok = self.pending.applied_token
            point_ns = tok.ts_ns if tok is not None else None  # the image's recovery point
            refused = dict(self.refused)
        connection = "Established" if connected else "Connecting"
        if not connected and self.standalone_reason:
            connection = "StandAlone"
        if connected and self.incr is not None:
            connection = "SyncTarget"
        elif connected and self.primary_needs_resync:
            connection = "Behind"
        return new_status(
            self.resource, self.node, running=True, role="Secondary",
            connection=connection, disk=disk,
            replication="SplitBrain" if connection == "StandAlone" and self.split_brain else None,
            peer={"disk": "UpToDate" if connected else "Unknown"},
            seq={"written": highest, "journaled": self.journaled, "applied": applied},
            lag={"writes": highest - applied, "bytes": pending_bytes,
                 "seconds": round(max(0.0, (time.time_ns() - first_ts) / 1e9), 3) if first_ts else 0.0},
            out_of_sync_bytes=0,
            reason=self.standalone_reason or self._apply_note() or self._incr_note() or (
                self.last_error if not connected or self.sup.faults() else ""),
            journal={"used_bytes": self.journal.used_bytes, "size": self.journal.area_size},
            apply={"runs_started": self.runs_started, "runs_done": self.runs_done,
                   "error": self.apply_error or None},
            faults=self.sup.faults() + (self.group.sup.faults() if self.group else []),
            promote_waiting=self.promote_waiting or None,
            volumes=volume_rows(self.node, self.layout.sizes, [0] * len(self.layout)),
            group=self.group.status() if self.group is not None else None,
            consistent_point_ns=point_ns, refused=refused,
            disconnected_by_admin=self.admin.disconnected)

    def _apply_note(self) -> str:
        """The reason status gives while applying fails."""
        why = self.apply_error
        if not why:
            return ""
        if self._restart_error:
            return why
        room = ("receiving continues while the journal has room" if
                not self.journal.used_bytes >= self.journal.area_size * 0.95 else
                "the journal is full: receiving is paused")
        left = max(0.0, self._retry_at - time.monotonic())
        return (f"{why}; {room}; retrying in {left:.0f} s, or now with "
                f"`duplex connect {self.resource.name}`")


def _read_only(device: str) -> bool:
    """Whether *device* is a block device set read-only (BLKROGET)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return struct.unpack("i", fcntl.ioctl(fd, BLKROGET, b"\0" * 4))[0] != 0
    except OSError:
        return False  # not a block device
    finally:
        os.close(fd)


def _open_images(node: Node, count: int | None = None) -> dict[int, int]:
    """Open every volume's image read-write: volume index -> fd (all or none)."""
    fds: dict[int, int] = {}
    try:
        for i, v in enumerate(node.volumes[:count]):
            fds[i] = os.open(v.device, os.O_RDWR | os.O_CLOEXEC)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _volume_pieces(layout: Layout, off: int, length: int) -> list[tuple[int, int, int]]:
    """The parts of the logical range [off, off+length) that lie in a
    volume, as (volume, relative offset, length); alignment gaps and
    anything past the end are left out."""
    out = []
    end = off + length
    for i, (b, sz) in enumerate(zip(layout.bases, layout.sizes)):
        lo, hi = max(off, b), min(end, b + sz)
        if hi > lo:
            out.append((i, lo - b, hi - lo))
    return out

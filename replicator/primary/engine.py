"""The primary engine: the C core behind the nbdkit plugin, the shipper that
drains its send ring to the secondary, and the status it reports.

It lives inside the nbdkit process. The plugin's data callbacks call
``write``/``trim``/``zero``/``flush``, each one C call with the GIL released.

Volumes (DESIGN §8): the resource's volumes (one for a plain ``device``)
are opened in one core, laid end to end in one logical space
(``self.layout``, replicator.layout) with one sequencer, one OOS bitmap and
one activity log. The data path takes a volume index and a volume-relative
offset; a flush covers every volume. ``self.size`` is the logical size
(the bitmaps'), ``self.layout.sizes[i]`` each volume's.
Threads (shipper, control socket, seq mark) start in ``start()``, which the
plugin calls from ``after_fork`` (DESIGN §10).

The engine owns the parts and wires them: the shipper, the verifier and
the catch-up get the core, the metadata, the bitmaps and callbacks, never
the engine. Status reads each part once and says what each one knows.

Threads and locks: the shipper's sender ("duplex-shipper") and the seq-mark
keeper ("duplex-mark") run under ``self.sup`` (replicator.supervise), which
restarts them with backoff if they raise and reports the fault in status;
verify passes ("duplex-verify") run under it too, without restarts. The
nbdkit request threads run the data path. ``_gen_lock`` guards
``_attached`` and ``_bumped`` and the generation change of
``_new_generation``; lock order: ``_gen_lock``, then the metadata's lock.
The shipper's and the verifier's locks are their own (see their modules).
"""
from __future__ import annotations

import logging
import os
import threading
import time

from replicator.config import Group, Node, Resource, load_config, select_node
from replicator.group.primaries import PrimaryGroup
from replicator.group.side import GroupStartError
from replicator.control import ControlServer
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core, CoreError, WriteResult
from replicator.errors import DuplexError
from replicator.events import EventSource
from replicator import generations
from replicator.handlers import HandlerRunner
from replicator.metadata import DISK_UPTODATE, Metadata, load_metadata, new_uuid
from replicator.oosfiles import open_bitmaps
from replicator.primary import states
from replicator.primary.admin import PrimaryAdmin
from replicator.primary.seqmark import SeqMark
from replicator.primary.shipper import THREAD_NAME as SHIPPER_THREAD, Shipper
from replicator.primary.verify import Verifier, VerifyIds
from replicator.status import new_status, volume_rows, volumes_out_of_sync
from replicator.supervise import Fault, Supervisor
from replicator.volumes import (VolumeClaims, check_volumes, claim_volumes, layout_of,
                                volume_uri)

log = logging.getLogger("duplex.primary")

# Test aid: nbdkit's environment may shift this primary's clock (ns), to
# inject skew between a group's primaries (DESIGN §13).
CLOCK_OFFSET_ENV = "DUPLEX_TEST_CLOCK_OFFSET_NS"


class EngineError(DuplexError):
    """The primary cannot start: metadata, bitmap or device problem."""


class Engine:
    """One resource's primary side inside nbdkit."""

    def __init__(self, resource: Resource, node: Node, peer: Node, md: Metadata,
                 oos: Bitmap, al: ActivityLog, core: Core, mark: SeqMark,
                 claim: VolumeClaims | None = None):
        self.resource = resource
        self.claim = claim  # the devices are ours alone until stop() (devices.py)
        self.node = node
        self.peer = peer
        self.md = md
        self.oos = oos
        self.al = al
        self.core = core
        self.mark = mark
        self.layout = core.layout
        self.size = md.device_size  # logical: the volumes laid end to end
        self.started = time.time()
        self.sup = Supervisor(f"{resource.name} primary", on_fault=self._on_fault)
        # Bits set when this run starts belong to data the (empty) ring no
        # longer holds: only a resync can clear them.
        resync = None
        if md.needs_initial_sync:
            resync = "the peer has never been synced (initial sync)"
        elif oos.count() > 0:
            resync = "out-of-sync data from before this start (initial sync or unclean stop)"
        ids = VerifyIds()  # verify and the catch-up ask the peer over one link
        self.shipper = Shipper(core, resource, peer, node.name, md, oos, resync_reason=resync,
                               supervisor=self.sup, next_verify_id=ids.next,
                               on_attached=self.attached, on_detached=self.detached)
        self.verifier = Verifier(core, oos, md, name=resource.name, peer_name=peer.name,
                                 current_link=self.shipper.current_link, next_verify_id=ids.next,
                                 mark_out_of_sync=self.mark_out_of_sync,
                                 spawn=lambda name, target: self.sup.spawn(name, target))
        self.control = ControlServer(node.meta_dir, {"status": self.status,
                                                     "verify": self._verify_cmd,
                                                     "verify-status": self._verify_status_cmd},
                                     name="primary")
        # disconnect, connect, invalidate-remote, pause/resume-sync, the
        # switchover `secondary` (DESIGN §7): replicator/primary/admin.py.
        self.admin = PrimaryAdmin(resource, node, peer.name, md, core, oos, self.shipper,
                                  self.size, group_name=lambda: (
                                      self.group.group.name if self.group is not None else None))
        self.admin.register(self.control)
        # `duplex events` (DESIGN §14): the status, and the verify result,
        # diffed every 50 ms; the handlers run from the same stream.
        self.events = EventSource(self._event_snapshot,
                                  lag_threshold=resource.handlers.lag_threshold_s)
        self.control.add_stream("events", self.events.serve)
        self.handlers = HandlerRunner(resource.handlers, node.name, peer.name, self.events)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # One read descriptor per volume (reads bypass the core: no lock).
        self._fds: list[int] = []
        try:
            for v in node.volumes:
                self._fds.append(os.open(v.device, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            for fd in self._fds:
                os.close(fd)
            raise
        self._gen_lock = threading.Lock()
        self._attached = False  # the peer follows our current generation
        self._bumped = False    # a new generation was started since the peer left
        self.group: PrimaryGroup | None = None  # a consistency group's primary side

    def join_group(self, group: Group, master_nodes: list[str]) -> None:
        """Be a member of consistency group *group* (DESIGN §13): its
        checkpoints (or heartbeats) become MARK records in our stream."""
        self.group = PrimaryGroup(group, self.resource.name, self.node.name, master_nodes,
                                  self.group_mark, self.core.now_ns)

    def group_mark(self, t: int, n: int, note: bytes) -> WriteResult:
        """Sequence a group marker (the group's marker thread)."""
        res = self.core.mark(t, n, note)
        if not res.queued:
            self.shipper.ring_dropped()
        return res

    @classmethod
    def open(cls, config_path: str, resource_name: str, node_name: str,
             history_path: str | None = None) -> "Engine":
        """Load config and metadata, open bitmaps and the core."""
        cfg = load_config(config_path)
        res = cfg.resource(resource_name)
        node = select_node(res, node_name)
        peer = res.peer_of(node.name)
        res.secret()  # before anything serves: a missing or open secret file is named now
        res.tls_context(node.name, server=False)  # and a bad TLS file (DESIGN §9)
        md = load_metadata(node.meta_dir, res.name)
        # Exclusive before anything writes: a mounted or held device, or an
        # image another Duplex serves, is refused with its holder named.
        claim = claim_volumes(res, node)
        try:
            try:
                check_volumes(res, node, md.volumes, str(md.paths.metadata))
                layout = layout_of(md.volumes, md.track_size)
            except ValueError as e:  # a list metadata.py accepted but no layout can hold
                raise EngineError(f"{res.name}: {md.paths.metadata}: {e}") from None
            if layout.logical_size != md.device_size:
                raise EngineError(f"{res.name}: {md.paths.metadata}: the volumes laid end to "
                                  f"end make {layout.logical_size} bytes, not its device_size "
                                  f"{md.device_size}")
            opened = open_bitmaps(md, res)
            mark = SeqMark(md)
            devices = [v.device for v in node.volumes]
            try:
                core = Core.open_volumes(devices, layout, opened.oos, opened.al, res.ring_size,
                                         mark.first_seq(), history_path=history_path)
            except (CoreError, OSError) as e:
                raise EngineError(f"{res.name}: cannot open {', '.join(devices)}: {e}") from None
            eng = cls(res, node, peer, md, opened.oos, opened.al, core, mark, claim)
            offset = os.environ.get(CLOCK_OFFSET_ENV)
            if offset:  # a test aid: this primary's clock runs off by that many ns
                core.set_clock_offset(int(offset))
            group = cfg.group_of(res.name)
            if group is not None:
                eng.join_group(group, list(cfg.resource(group.master).nodes))
            return eng
        except BaseException:
            claim.close()
            raise

    # -- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Start the shipper, the control socket and the seq-mark keeper."""
        self.control.start()
        self.shipper.start()
        self._threads.append(self.sup.spawn("duplex-mark", self._housekeeping, restart=True))
        self.events.start(spawn=lambda name, fn: self.sup.spawn(name, fn, restart=True))
        if self.group is not None:
            try:
                self.group.start()
            except GroupStartError as e:
                raise EngineError(str(e)) from None

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop cleanly: let the shipper drain (for at most *drain_timeout*,
        default the resource's drain-timeout), make bitmaps durable, record
        the exact last seq."""
        if drain_timeout is None:
            drain_timeout = self.resource.drain_timeout_s
        self._stop.set()
        if self.group is not None:
            self.group.stop()
        self.sup.stop()  # what raises from now on is part of stopping, not a fault
        shipper_done = self.shipper.stop(drain_timeout)
        self.handlers.stop()
        self.events.stop()
        self.control.stop()
        try:
            self.core.flush()
        except OSError as e:
            log.error("%s: final flush failed: %s", self.resource.name, e)
        next_seq = self.core.next_seq
        if shipper_done:  # else the shipper may still be inside the core: leave it open
            self.core.close()
        self.oos.close()
        self.al.close()
        self.mark.close(next_seq)
        for fd in self._fds:
            os.close(fd)
        if self.claim is not None:
            self.claim.close()
        log.info("%s: primary stopped at seq %d", self.resource.name, next_seq - 1)

    def _on_fault(self, fault: Fault) -> None:
        """A supervised thread raised (logged with its traceback by the
        supervisor, shown in status under ``faults``)."""
        if fault.thread == SHIPPER_THREAD:
            self.shipper.fault(fault.error)

    def _housekeeping(self) -> None:
        while not self._stop.wait(0.5):
            self.mark.advance(self.core.next_seq)

    def _event_snapshot(self) -> dict:
        """What the event stream diffs: the status and the verify pass
        (its start time tells one finished pass from the next)."""
        run = self.verifier.run
        return dict(self.status(), verify=dict(self.verifier.status(),
                                               started=run.started if run else None))

    # -- verify ------------------------------------------------------------------

    def _verify_cmd(self, fix: bool = False, resource: str | None = None) -> dict:
        return self.verifier.start(fix)

    def _verify_status_cmd(self, resource: str | None = None) -> dict:
        return self.verifier.status()

    def mark_out_of_sync(self, tracks: list[int], reason: str) -> None:
        """Mark *tracks* out of sync durably and have them resent."""
        for t in tracks:
            self.oos.set_bit(t)
        self.oos.sync()
        self.shipper.request_resync(reason)

    # -- generations (DESIGN §7) ---------------------------------------------

    def attached(self) -> None:
        """The peer has our generation now (handshake done)."""
        with self._gen_lock:
            self._attached = True
            self._bumped = False
        self.sup.clear(SHIPPER_THREAD)  # a shipper that failed before works again

    def detached(self) -> None:
        """The peer is gone: the next write starts a new generation."""
        self._attached = False

    def _new_generation(self) -> None:
        # A write without the peer begins a history the peer cannot know;
        # recorded before the write completes, so that if the peer is
        # promoted meanwhile, the next meeting sees split brain.
        with self._gen_lock:
            if self._attached or self._bumped:
                return
            self._bumped = True
            if self.md.bitmap_uuid is not None:
                return  # our generation is not the peer's yet (promoted, or bumped before)
            with self.md.update():  # lock order: _gen_lock, then the metadata's
                old = generations.bump(self.md, new_uuid())
            log.info("%s: writing without the peer: new generation %s (was %s)",
                     self.resource.name, self.md.generation[:8], old[:8])

    # -- the data path (plugin callbacks) ---------------------------------

    def write(self, buf, offset: int, fua: bool = False, volume: int = 0) -> WriteResult:
        """One NBD write at *offset* of *volume* (an index into the
        volumes): the whole primary write path in one C call."""
        if not self._attached and not self._bumped:
            self._new_generation()
        if self.admin.fenced:  # a switchover (duplex secondary): read-only
            self.admin.check_write()
        res = self.core.write(buf, offset, fua, volume)  # positional: the hot path
        if not res.queued:
            self.shipper.ring_dropped()
        return res

    def trim(self, offset: int, length: int, fua: bool = False, volume: int = 0) -> WriteResult:
        """Discard a range of *volume* (reads as zeros on both sides)."""
        if not self._attached and not self._bumped:
            self._new_generation()
        if self.admin.fenced:
            self.admin.check_write()
        res = self.core.trim(offset, length, volume=volume)
        if fua:
            self.core.flush()
        if not res.queued:
            self.shipper.ring_dropped()
        return res

    def zero(self, offset: int, length: int, fua: bool = False, volume: int = 0) -> WriteResult:
        """Write zeros over a range of *volume*."""
        if not self._attached and not self._bumped:
            self._new_generation()
        if self.admin.fenced:
            self.admin.check_write()
        res = self.core.zero(offset, length, volume=volume)
        if fua:
            self.core.flush()
        if not res.queued:
            self.shipper.ring_dropped()
        return res

    def flush(self) -> WriteResult:
        """Make every volume durable (one FLUSH record covers them all)."""
        if self.admin.fenced:
            self.admin.check_write()
        res = self.core.flush()
        if not res.queued:
            self.shipper.ring_dropped()
        return res

    def volume_size(self, volume: int) -> int:
        """The size in bytes of *volume* (what its NBD export reports)."""
        return self.layout.sizes[volume]

    def pread_into(self, buf, offset: int, volume: int = 0) -> None:
        """Read at *offset* of *volume*. Reads need no lock: NBD gives no
        ordering between overlapping in-flight reads and writes."""
        mv = memoryview(buf)
        fd = self._fds[volume]
        done = 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise OSError(5, f"short read at offset {offset + done}")
            done += n

    # -- status -----------------------------------------------------------

    def status(self) -> dict:
        """The status document (replicator/status.py schema)."""
        sh = self.shipper.snapshot()
        written = self.core.next_seq - 1
        # Out-of-sync bytes inside each volume (the alignment gaps count for
        # none); the resource's are their sum. One volume: the bitmap's own
        # count (C), as before volumes; several: a walk over its runs.
        if len(self.layout) == 1:
            vol_oos = [self.oos.dirty_bytes(self.size)]
        else:
            vol_oos = volumes_out_of_sync(self.oos.runs(self.size), self.layout.bases,
                                          self.layout.sizes)
        applied = sh["applied"]
        streaming = (sh["connection"] == states.CONNECTED
                     and sh["replication"] == states.ESTABLISHED)
        return new_status(
            self.resource, self.node, running=True, role="Primary",
            connection=sh["connection"], replication=sh["replication"],
            last_error=sh["last_error"], disk=DISK_UPTODATE,
            peer={"disk": ("UpToDate" if streaming and applied >= written
                           and sh["peer_disk"] in ("UpToDate", "Consistent")
                           else sh["peer_disk"])},
            seq={"written": written, "journaled": sh["journaled"], "applied": applied},
            lag={"writes": max(0, written - applied), "bytes": sh["lag_bytes"],
                 "seconds": sh["lag_seconds"]},
            out_of_sync_bytes=sum(vol_oos),
            volumes=[dict(row, nbd_uri=volume_uri(self.node, v)) for row, v in
                     zip(volume_rows(self.node, self.layout.sizes, vol_oos), self.node.volumes)],
            nbd_uri=self.node.export_uri(), reason=sh["reason"], sync=sh["sync"],
            incr_bytes_sent=sh["incr_bytes_sent"], matched_bytes=sh["matched_bytes"],
            **{k: sh[k] for k in ("protocol", "protocol_effective", "protocol_note",
                                  "on_congestion", "congestion", "congestion_blocked_seconds",
                                  "flow")},
            ring=self.core.ring_stats, uptime_seconds=round(time.time() - self.started, 1),
            faults=self.sup.faults() + (self.group.sup.faults() if self.group else []),
            group=self.group.status() if self.group is not None else None,
            written_bytes=self.core.stats["bytes_written"],
            disconnected_by_admin=self.shipper.states.disconnected)

"""The shipper: drains the primary's send ring to the secondary.

One thread sends, one reads. The sender owns every ring consumer call
(peek, advance, release, rewind), so the ring keeps a single consumer; the
reader only records what the secondary acknowledged and wakes the sender.

Streaming runs in C (``Core.ship``, native/ship.c) with the GIL released:
the nbdkit request threads then have the GIL to themselves, which is what
the write path's speed depends on. The sender's Python loop only looks in
every RETURN_AFTER seconds (release what was journaled, ping, stop, catch
up after an overflow). A TLS or compressing link cannot be written from
C: for it the same loop runs in Python (:meth:`Shipper._ship_python`,
DESIGN §9).

Batching (DESIGN §3): a span is whatever the ring holds, up to
``batch-bytes``; it goes out when that much is queued or ``batch-interval``
after the previous one, whichever comes first. Tokens go ahead of data:
each span goes out as a TOKENS frame and then its DATA frame, so the
secondary always knows which writes it is missing (tokens before data,
the M1/M2 split of the ordered-replication design, DESIGN §3).
A catch-up streams with :meth:`Shipper.pump`, which announces up to four
spans before it sends the oldest one's data.

States: the shipper reports what happens (connected, refused, the ring
overflowed, caught up...) as events of :mod:`replicator.primary.states`;
the connection and replication words status shows come from those tables
only. Who may pair with whom is :func:`replicator.generations.verdict`, the
rule the secondary applies too.

Collaborators: the core, the resource, the peer node, the metadata and the
OOS bitmap; a link factory (``PeerLink.connect`` unless a test gives
another); callbacks into the engine (``on_attached``, ``on_detached``); the
VERIFY_REQ id counter; the supervisor that runs the sender thread and
restarts it with backoff if it raises.

Threads and locks: the sender thread ("duplex-shipper", supervised) runs
sessions and catch-ups; each link's reader thread calls :meth:`_on_ack`;
the nbdkit request threads call :meth:`ring_dropped`; the control thread
calls :meth:`snapshot` and :meth:`request_resync`. ``Shipper._lock`` guards
``_states``, ``_again``, ``peer_disk``, ``journaled``, ``applied``, ``_samples``,
``sync``, ``incr_bytes_sent`` and ``matched_bytes``. It is a leaf: nothing
else is locked while it is held, except the core's own internal lock in
the status reads of :meth:`snapshot`. ``_queued``, ``_links``, ``_rr``,
``_released`` and ``_last_send_ns`` belong to the sender thread alone.
The admin's commands (disconnect, connect, pause-sync, resume-sync) only
step ``_states`` under the lock and wake the sender, which acts on them at
its next look (it owns the links and the ring). A switchover's
``_handover_at`` is written by the control thread and read by the sender
(one int, no lock); ``_handover_done`` hands the outcome, ``handed_over``,
back (written by the sender before it sets the event).
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from collections import deque
from contextlib import ExitStack
from typing import Callable

from replicator import generations
from replicator.config import ConfigError, Node, Resource
from replicator.native.core import CoreError, ShipResult
from replicator.peerlink import LinkError, PeerLink, RefusedError
from replicator.primary import states as st
from replicator.primary.catchup import CatchUp, Hooks, SyncProgress
from replicator.primary.flowctl import FlowControl
from replicator.protocol.compat import wire_volumes
from replicator.protocol.errors import ErrorCode
from replicator.protocol.messages import (STATE_DISCARD_MY_DATA, STATE_HAS_BITMAP_UUID,
                                          STATE_NEEDS_RESYNC, STATE_SENDS_BITMAP, ZERO_UUID,
                                          State, Stop)
from replicator.supervise import Supervisor

log = logging.getLogger("duplex.shipper")

_SEQ_TS = struct.Struct("<QQ")
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
SHORT_SESSION = 1.0  # a session that ended sooner backs the next attempt off
REFUSED_RETRY = 5.0
CONFIG_RETRY = 1.0   # a bad secret file is re-read this often: fixing it fixes the node
PING_INTERVAL = 1.0
MAX_ANNOUNCED_SPANS = 256
RETURN_AFTER = 0.02  # the C streaming loop hands control back this often
THREAD_NAME = "duplex-shipper"


def local_primary_state(md, core, needs_resync: bool) -> State:
    """The primary's STATE. The primary's resource UUID is the resource's:
    a fresh secondary adopts it at its first handshake."""
    stats = core.ring_stats
    history, has_bitmap = generations.state_history(md)
    flags = (STATE_NEEDS_RESYNC if needs_resync else 0) | (STATE_HAS_BITMAP_UUID if has_bitmap else 0)
    return State(bytes.fromhex(md.resource_uuid), bytes.fromhex(md.generation), md.device_size,
                 md.track_size, "primary", "UpToDate",
                 written_seq=core.next_seq - 1,
                 oldest_held_seq=stats.get("oldest_seq", 0) or 0,
                 flags=flags, history=history,
                 volumes=wire_volumes([(v["name"], v["size"]) for v in md.volumes]))


class Shipper:
    """Ships the ring to the peer; reconnects; resumes from the peer's
    journaled seq when the ring still holds what follows it."""

    def __init__(self, core, resource: Resource, peer: Node, node_name: str, md, oos, *,
                 resync_reason: str | None, supervisor: Supervisor,
                 next_verify_id: Callable[[], int],
                 on_attached: Callable[[], None] = lambda: None,
                 on_detached: Callable[[], None] = lambda: None,
                 connect: Callable[..., PeerLink] | None = None):
        self.core = core
        self.res = resource
        self.peer = peer
        self.node_name = node_name
        self.md = md
        self.oos = oos
        self._sup = supervisor
        self._next_verify_id = next_verify_id
        self._on_attached = on_attached
        self._on_detached = on_detached
        self._connect_link = connect or PeerLink.connect  # looked up now: tests may replace it
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self._states = st.PrimaryStates.initial(resync_reason)
        # What a write waits for (protocol B/C, on-congestion, max-lag): set
        # on the core from the replication state at every change.
        self.flow = FlowControl(core, resource.modes, resource.name)
        self.flow.apply(self._states.replication)
        self._logged_error: str | None = None
        self._again: str | None = None  # a resync asked for during a catch-up
        # What the peer has told us; read by status.
        self.peer_disk = "Unknown"
        self.journaled = 0
        self.applied = 0
        self._released = 0
        self._samples: deque[tuple[int, int]] = deque()  # (last seq of a span, ts of its first record)
        self._queued: deque[tuple[PeerLink, memoryview]] = deque()  # announced, DATA not sent yet
        self._links: list[PeerLink] = []
        self._rr = 0
        self._last_send_ns = 0
        self._incr_id = 0
        self.sync: SyncProgress | None = None  # while catching up
        self.incr_bytes_sent = 0
        self.matched_bytes = 0      # initial sync: tracks the peer already held
        self.peer_initial_sync = False
        # A planned switchover (DESIGN §7): the seq the sender is to hand
        # over at, and its outcome (True: the peer echoed the STOP).
        self._handover_at: int | None = None
        self._handover_done = threading.Event()
        self.handed_over = False

    # -- states -----------------------------------------------------------

    def _event(self, event: st.Event) -> st.PrimaryStates:
        """Move both state machines (states.py decides; a move the tables
        do not allow raises StateError, a bug the supervisor reports)."""
        with self._lock:
            before = self._states
            self._states = after = before.step(event)
        # The state now, not `after`: of two threads stepping at once, the
        # one applying last must apply the newest state.
        self.flow.apply(self._states.replication)
        if (before.connection, before.replication) != (after.connection, after.replication):
            log.info("%s: %s: connection %s -> %s, replication %s -> %s", self.res.name,
                     event.name, before.connection, after.connection, before.replication,
                     after.replication)
        return after

    @property
    def states(self) -> st.PrimaryStates:
        """The current states (immutable)."""
        return self._states

    @property
    def needs_resync(self) -> bool:
        """True while the OOS bitmap holds writes the ring does not."""
        return self._states.resync_pending

    def _resync(self, reason: str, replace: bool = True) -> None:
        with self._lock:
            if self._states.resync_pending and not replace:
                return
            self._states = self._states.step(st.ResyncNeeded(reason))
        self.flow.apply(self._states.replication)

    def fault(self, error: str) -> None:
        """The sender thread raised (the supervisor restarts it): the
        session it ran is gone."""
        self._event(st.LinkFailed(f"shipper failed: {error}; restarting"))

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread, supervised: restarted with backoff if it raises."""
        self._thread = self._sup.spawn(THREAD_NAME, self._run, restart=True,
                                       backoff=(BACKOFF_MAX / 4, 30.0))
        self.flow.start(self._sup, lambda: self.snapshot()["lag_seconds"], self._stopping)

    def stop(self, drain_timeout: float) -> bool:
        """Ask the sender to drain what the peer has not journaled, for at
        most *drain_timeout* seconds, then close. False if the sender thread
        did not end (then the core must stay open: it may still be in it)."""
        self._drain_deadline = time.monotonic() + drain_timeout
        self._stopping.set()
        self._wake.set()
        self.core.wake()
        if self._thread:
            self._thread.join(drain_timeout + 1)
            if self._thread.is_alive():
                # Stuck mid-frame on a peer that does not read: give up.
                log.warning("%s: the peer does not read; giving up the drain", self.res.name)
                self.core.abort_ship()
                for one in list(self._links):  # a TLS link's Python sender: shut its socket
                    if getattr(one, "python_send", False):
                        one.failed("streaming aborted: stopping")
                self._thread.join(5)
            if self._thread.is_alive():
                log.error("%s: the shipper did not stop", self.res.name)
                self.flow.release()
                return False
        self.flow.release()  # drained or given up: no write waits for the peer any more
        return True

    # -- the admin's commands (DESIGN §7; replicator/primary/admin.py) ------

    def admin_disconnect(self) -> None:
        """``duplex disconnect``: StandAlone on purpose. The sender ends the
        session at its next look (it owns the links), drops the ring and
        waits; the OOS bitmap keeps every write the peer lacks."""
        self._event(st.AdminDisconnect())
        self._wake.set()
        self.core.wake()

    def admin_connect(self) -> bool:
        """``duplex connect`` after a disconnect; False when not disconnected."""
        with self._lock:
            if not self._states.disconnected:
                return False
        self._event(st.AdminConnect())
        self._wake.set()
        return True

    def pause_sync(self, paused: bool) -> None:
        """``duplex pause-sync`` / ``resume-sync``: the catch-up sends no
        increment while paused (one under way is abandoned, nothing lost)."""
        self._event(st.SyncPaused() if paused else st.SyncResumed())
        self._wake.set()

    def hand_over(self, last_seq: int, timeout: float) -> bool:
        """Planned switchover: once the peer journaled *last_seq* and the
        ring is empty, send STOP(last_seq) and wait for its echo (the peer
        applied and recorded it). True: handed over, the sender has ended
        and connects no more. False: no echo in *timeout* s (the shipper
        goes on as before)."""
        self._handover_done.clear()
        self.handed_over = False
        self._handover_at = last_seq
        self._wake.set()
        self.core.wake()
        self._handover_done.wait(timeout)
        self._handover_at = None
        return self.handed_over

    def _hand_over(self, link: PeerLink) -> bool:
        """Sender thread: STOP, then the echo. True when handed over."""
        at = self._handover_at
        with self._lock:
            journaled = self.journaled
        if at is None or journaled < at or self.core.ring_stats.get("records", 0):
            return False
        link.send(Stop(at, time.time_ns()))
        echo = link.wait_stop(10.0)
        ok = echo is not None and echo.last_seq == at
        if ok:
            log.info("%s: handed over to %s at seq %d (clean stop)", self.res.name,
                     self.peer.name, at)
            self.handed_over = True
            self._stopping.set()  # no reconnect: this node is no longer the primary
        else:
            log.warning("%s: %s did not confirm the clean stop at seq %d", self.res.name,
                        self.peer.name, at)
            self._handover_at = None
        self._handover_done.set()
        return ok

    def _admin_hold(self, link: PeerLink, pausable: bool) -> None:
        """Catch-up hook: LinkError once the admin disconnected (or the node
        stops); with *pausable*, wait here while the sync is paused."""
        while True:
            s = self._states
            if s.disconnected:
                raise LinkError(st.DISCONNECTED_BY_ADMIN)
            if self._stopping.is_set() or not link.alive():
                raise LinkError(link.error or "stopping")
            if not (pausable and s.sync_paused):
                return
            self._wake.wait(0.2)
            self._wake.clear()

    def ring_dropped(self) -> None:
        """Called from the write path when the ring overflowed: from now on
        writes only mark OOS, and only a resync brings the peer back."""
        if not self._states.resync_pending:  # every write while Ahead comes here: cheap first
            with self._lock:
                first = not self._states.resync_pending
                if first:
                    was = self._states.replication
                    self._states = self._states.step(st.ResyncNeeded("send ring overflowed"))
            if first:
                self.flow.pulled_ahead(was)
                self.flow.apply(self._states.replication)
                log.warning("%s: send ring overflowed: going Ahead (writes only mark "
                            "the out-of-sync bitmap)", self.res.name)
        if not self._wake.is_set():
            self._wake.set()

    def snapshot(self) -> dict:
        """A consistent view for status."""
        with self._lock:
            states = self._states
            streaming = (states.connection == st.CONNECTED
                         and states.replication == st.ESTABLISHED)
            now_ns = time.time_ns()
            # Spans reported after the ack that covered them are not lag.
            while self._samples and self._samples[0][0] <= self.applied:
                self._samples.popleft()
            oldest = self._samples[0][1] if self._samples else None
            inflight = self.core.ship_inflight()
            if inflight is not None and inflight[0] > self.applied:
                # Sent by the streaming call still running, not yet applied.
                oldest = inflight[1] if oldest is None else min(oldest, inflight[1])
            waiting = self.core.ship_waiting_ts() if streaming else None
            if waiting is not None:  # written, held back for its batch
                oldest = waiting if oldest is None else min(oldest, waiting)
            lag_s: float | None = 0.0
            if oldest is not None:
                lag_s = round(max(0.0, (now_ns - oldest) / 1e9), 3)
            elif self.core.next_seq - 1 > self.applied:
                lag_s = None  # writes outstanding, none sampled: unknown, not zero
            peer_disk = self.peer_disk
            peer_disk_reason = ""
            if states.connection == st.CONNECTED:
                for link in list(self._links):  # its STATE's, then what its ACKs say
                    if link.alive():
                        peer_disk = link.peer_disk
                        peer_disk_reason = link.peer_disk_reason
                        break
            else:
                peer_disk = "Unknown"  # not connected: we do not know
            reason = states.reason
            if peer_disk_reason:
                reason = "; ".join(p for p in (reason, f"peer disk {peer_disk}: "
                                               f"{peer_disk_reason}") if p)
            return {
                "connection": states.connection,
                "replication": states.replication,
                "last_error": states.error,
                "resync_reason": states.resync_reason,
                "reason": reason,
                "peer_disk": peer_disk,
                "journaled": self.journaled,
                "applied": self.applied,
                "lag_bytes": self.core.ring_stats.get("bytes", 0),
                "lag_seconds": lag_s,
                "sync": (dict(self.sync.as_dict(), paused=states.sync_paused) if self.sync
                         else None),
                "incr_bytes_sent": self.incr_bytes_sent,
                "matched_bytes": self.matched_bytes,
                **self.flow.snapshot(),
            }

    # -- acks (reader thread) ---------------------------------------------

    def _on_ack(self, journaled: int, applied: int) -> None:
        self.flow.on_journaled(journaled)  # protocol B/C writers waiting for it return
        with self._lock:
            self.journaled = max(self.journaled, journaled)
            self.applied = max(self.applied, applied)
            while self._samples and self._samples[0][0] <= self.applied:
                self._samples.popleft()
        self._wake.set()

    # -- sender thread ----------------------------------------------------

    def _log_once(self, level: int, text: str) -> None:
        # A node refused every few seconds logs the reason once, not forever.
        if text != self._logged_error:
            self._logged_error = text
            log.log(level, "%s: %s", self.res.name, text)

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stopping.is_set():
            if self._states.disconnected:
                # `duplex disconnect`: writes only mark the OOS bitmap (the
                # ring is dropped here, by its one consumer) until `connect`.
                if not self.core.dropped:
                    self.core.drop()
                self._wake.wait(0.2)
                self._wake.clear()
                continue
            try:
                # Read at every attempt: fixing the file fixes the node.
                secret = self.res.secret()
                tls = (self.res.tls_context(self.node_name, server=False)
                       if getattr(self.res, "tls", False) else None)  # (a test's resource)
                if getattr(self.res, "compression", "none") != "none":
                    self.res.compressor()  # a missing codec package: named, as the secret
            except ConfigError as e:
                self._event(st.Refused(f"{e}"))
                self._log_once(logging.ERROR, f"cannot connect to {self.peer.name}: {e}")
                self._stopping.wait(CONFIG_RETRY)
                continue
            links: list[PeerLink] = []
            try:
                # Several connections may carry the stream (config
                # "connections"); the first one also carries the increments.
                for _ in range(max(1, self.res.connections)):
                    links.append(self._connect(secret, tls))
            except RefusedError as e:
                for extra in links:
                    extra.close()
                self._refused(e)
                self._stopping.wait(REFUSED_RETRY)
                continue
            except (LinkError, OSError) as e:
                for extra in links:
                    extra.close()
                why = _describe(e, self.peer)
                self._event(st.LinkFailed(why))
                self._log_once(logging.WARNING, f"cannot connect: {why}")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self._links = links
            refused = peer_error = False
            began = time.monotonic()
            try:
                self._session(links[0])
            except RefusedError as e:
                self._refused(e)
                refused = True
            except (LinkError, OSError) as e:
                # The peer ended it with an ERROR frame, or sent a frame we
                # refused: unlike a reset, trying again at once changes nothing.
                peer_error = "peer closed:" in str(e) or "protocol error" in str(e)
                if self._states.disconnected:  # ended on purpose: StandAlone stays
                    log.info("%s: disconnected from %s by the admin", self.res.name,
                             self.peer.name)
                elif not self.handed_over:
                    if not self._stopping.is_set():
                        log.warning("%s: connection to %s lost: %s", self.res.name,
                                    self.peer.name, e)
                    self._event(st.LinkFailed(f"connection to {self.peer.name} lost: {e}"))
            finally:
                self._on_detached()
                for one in links:
                    one.close()
                self._links = []
            if refused:
                self._stopping.wait(REFUSED_RETRY)
            elif peer_error and time.monotonic() - began < SHORT_SESSION:
                # A peer that closes every session at once (a protocol error,
                # a disk it cannot write) is not retried a hundred times a
                # second; a link that is only reset is (a reset storm).
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            else:
                backoff = BACKOFF_MIN
        self._event(st.Stopped())

    def _refused(self, e: RefusedError) -> None:
        """A refused handshake (either side's verdict): StandAlone, or
        SplitBrain. The caller retries after a pause: the fix is made
        elsewhere (the peer's config, `connect --discard-my-data`)."""
        if e.split_brain:
            self._event(st.SplitBrainFound(str(e)))
        else:
            self._event(st.Refused(str(e)))
        self._log_once(logging.ERROR, f"handshake with {self.peer.name} refused: {e}")

    def _connect(self, secret: bytes, tls=None) -> PeerLink:
        # TLS (DESIGN §9): the peer's certificate must name the peer node.
        extra = {"tls": tls, "tls_peer": self.peer.name} if tls is not None else {}
        # Compression (DESIGN §9): a compressor per connection; the peer needs no setting.
        if getattr(self.res, "compression", "none") != "none":
            extra["compressor"] = self.res.compressor()
        link = self._connect_link(self.peer.address, role="primary", resource=self.res.name,
                                  node=self.node_name, secret=secret,
                                  local_state=local_primary_state(self.md, self.core,
                                                                  self.needs_resync),
                                  on_ack=self._on_ack, timeout=5.0, **extra)
        if hasattr(link, "set_timeouts"):  # a test's fake link may not have it
            link.set_timeouts(self.res.ping_interval_s, self.res.ping_timeout_s)
        link.on_received = self.flow.on_received  # protocol B's acknowledgement
        return link

    def _agree_on_generations(self, link: PeerLink) -> None:
        """DESIGN §7: decide who is ahead (generations.verdict, the rule
        the secondary applies too). Refuses unless this node is ahead or
        the same; takes the peer's own out-of-sync tracks (an old primary
        coming back) into the OOS bitmap."""
        ps = link.peer_state
        md = self.md
        local = generations.of_metadata(md)
        peer = generations.from_state(ps, bool(ps.flags & STATE_HAS_BITMAP_UUID))
        v = generations.verdict(generations.PRIMARY, local, peer, resource=self.res.name,
                                secondary_fresh=ps.resource_uuid == ZERO_UUID,
                                secondary_discards=bool(ps.flags & STATE_DISCARD_MY_DATA))
        if not v.accept:
            raise RefusedError(v.why, ErrorCode.SPLIT_BRAIN if v.split_brain
                               else ErrorCode.STATE_MISMATCH)
        if v.discards:
            log.warning("%s: %s", self.res.name, v.why)
        if ps.flags & STATE_SENDS_BITMAP:
            bm = link.wait_bitmap(10.0)
            if bm.track_size != self.oos.track_size or bm.nbits > self.oos.nbits:
                raise LinkError(f"peer {link.peer_name} sent a bitmap of {bm.nbits} tracks of "
                                f"{bm.track_size} bytes; this node has {self.oos.nbits} of "
                                f"{self.oos.track_size}")
            tracks = bm.tracks()  # once: a big dirty bitmap is a long list
            for t in tracks:
                self.oos.set_bit(t)
            self.oos.sync()
            if ps.disk == "Inconsistent" and not ps.flags & STATE_DISCARD_MY_DATA:
                # `duplex invalidate` there (DESIGN §7): not an old primary's writes
                log.warning("%s: peer %s was invalidated by the admin: all %d tracks are "
                            "resent", self.res.name, link.peer_name, len(tracks))
                why = "the peer's data was invalidated by the admin (full sync)"
            else:
                log.warning("%s: peer %s brought %d out-of-sync tracks of its own (writes "
                            "that never reached this node); they will be resent",
                            self.res.name, link.peer_name, len(tracks))
                why = "the peer's own unshipped writes are overwritten"
            if tracks:
                self._resync(why)
        if md.bitmap_uuid is not None or md.peer_node_uuid is None:
            with md.update():
                md.bitmap_uuid = None  # the peer takes our generation now
                if md.peer_node_uuid is None:
                    md.peer_node_uuid = md.resource_uuid  # paired: no longer fresh
        self._on_attached()

    def _session(self, link: PeerLink) -> None:
        self._agree_on_generations(link)
        ps = link.peer_state
        with self._lock:
            self.peer_disk = ps.disk
            self.journaled = ps.journaled_seq
            self.applied = ps.applied_seq
            self._released = 0
            self._samples.clear()
        self._event(st.Attached())
        self._logged_error = None
        last = self.core.next_seq - 1
        self.peer_initial_sync = bool(ps.flags & STATE_NEEDS_RESYNC)
        if self.peer_initial_sync:
            self._resync("the peer has never been synced (initial sync)", replace=False)
        if ps.journaled_seq > last and not self.needs_resync:
            raise RefusedError(f"peer journaled seq {ps.journaled_seq}, beyond our last seq "
                               f"{last}: the two sides have different histories")
        if not self.needs_resync and not self.core.rewind(ps.journaled_seq):
            self._resync(f"the send ring no longer holds seq {ps.journaled_seq + 1} "
                         "(the peer was away too long)")
        self._queued.clear()
        if self.needs_resync:
            log.info("%s: catching up %s: %s", self.res.name, self.peer.name,
                     self._states.resync_reason)
            self._catch_up(link)
            log.info("%s: caught up; streaming to %s", self.res.name, self.peer.name)
        else:
            log.info("%s: streaming to %s from seq %d", self.res.name, self.peer.name,
                     ps.journaled_seq + 1)
            self._event(st.StreamStart())
        self._stream(link)

    def _catch_up(self, link: PeerLink) -> None:
        """Run a catch-up over *link* (SyncSource until it commits)."""
        self._event(st.SyncStart())
        hooks = Hooks(journaled=self._journaled, pump=lambda: self.pump(link, release=False),
                      wait_ack=self.wait_ack, progress=self._set_progress,
                      add_bytes=self._add_bytes, committed=self._committed,
                      next_increment=self.next_increment, next_verify_id=self._next_verify_id,
                      peer_initial_sync=self.peer_initial_sync,
                      hold=lambda pausable: self._admin_hold(link, pausable),
                      paused=lambda: self._states.sync_paused)
        CatchUp(self.core, self.oos, self.md, self.res, link, hooks).run()

    def current_link(self) -> PeerLink | None:
        """The first connection, while the session is up (for verify)."""
        links = self._links
        s = self._states
        if (links and links[0].alive() and s.connection == st.CONNECTED
                and s.replication in (st.ESTABLISHED, st.SYNC_SOURCE)):
            return links[0]
        return None

    def request_resync(self, reason: str) -> None:
        """Bits were set in the OOS bitmap behind the ring's back (verify
        --fix): ship them with a catch-up. During a catch-up they may lie
        outside its frozen map, so another one follows it."""
        with self._lock:
            if self._states.replication == st.SYNC_SOURCE:
                self._again = reason
        self._resync(reason)
        self._wake.set()

    # -- hooks of the catch-up (each takes the lock for what it touches) ----

    def _journaled(self) -> int:
        with self._lock:
            return self.journaled

    def _set_progress(self, prog: SyncProgress | None) -> None:
        with self._lock:
            self.sync = prog

    def _add_bytes(self, sent: int, matched: int) -> None:
        with self._lock:
            self.incr_bytes_sent += sent
            self.matched_bytes += matched

    def _committed(self, base: int) -> None:
        """The streaming increment committed: the peer holds everything
        through *base*, and the ring carries what follows."""
        with self._lock:
            self.journaled = max(self.journaled, base)
            self._states = self._states.step(st.CaughtUp())
            if self._again is not None:  # marked during the catch-up: one more round
                self._states = self._states.step(st.ResyncNeeded(self._again))
                self._again = None
        self.flow.caught_up()
        self.flow.apply(self._states.replication)

    # -- helpers for the catch-up ------------------------------------------

    def next_increment(self) -> int:
        """A new increment id (unique for this run)."""
        self._incr_id += 1
        return self._incr_id

    def wait_ack(self, timeout: float) -> None:
        """Sleep until an ack arrives (or *timeout*)."""
        self._wake.wait(timeout)
        self._wake.clear()

    # -- streaming --------------------------------------------------------

    def pump(self, link: PeerLink, release: bool = True) -> bool:
        """One round of streaming: release what the peer journaled, announce
        what the ring holds (TOKENS ahead of data), send one DATA frame.
        Returns whether anything was sent."""
        core = self.core
        if release:
            self._release()
        self._live_links(link)
        announced = 0
        while len(self._queued) < MAX_ANNOUNCED_SPANS and announced < 4:
            try:
                span = core.peek(self.res.batch_bytes)
                if not span:
                    break
                core.advance(len(span))
            except CoreError:
                # The ring overflowed under us: its spans are gone; the
                # caller sees needs_resync and catches up instead.
                if not core.dropped:
                    raise
                self._queued.clear()
                self.ring_dropped()
                return False
            tokens = core.tokens(span)
            # A span's tokens and data travel on one connection, tokens
            # first; spans are spread over the connections in turn.
            self._rr += 1
            out = self._links[self._rr % len(self._links)] if self._links else link
            out.send_tokens(tokens)
            first_ts = _SEQ_TS.unpack_from(tokens, 0)[1]
            last_seq = _SEQ_TS.unpack_from(tokens, len(tokens) - 48)[0]
            with self._lock:
                self._samples.append((last_seq, first_ts))
            self._queued.append((out, span))
            announced += 1
        if self._queued:
            if core.dropped:
                self._queued.clear()
                self.ring_dropped()
                return False
            out, span = self._queued.popleft()
            out.send_data(span)
            return True
        return announced > 0

    def _live_links(self, link: PeerLink) -> list[PeerLink]:
        """The connections carrying the stream (*link* when there is only
        it); LinkError when one of them is down."""
        links = self._links or [link]
        for one in links:
            if not one.alive():
                raise LinkError(one.error or "connection closed")
        return links

    def _release(self) -> None:
        """Free the ring up to what the peer journaled."""
        with self._lock:
            journaled = self.journaled
        if journaled > self._released:
            self.core.release(journaled)
            self._released = journaled

    def _stream(self, link: PeerLink) -> None:
        """Stream the ring. The sending runs in C (Core.ship) with the
        GIL released, coming back every RETURN_AFTER seconds (or when the
        ring overflows or a socket fails) for acks, pings and stop."""
        last_ping = time.monotonic()
        interval = self.res.batch_interval_s
        while True:
            if self._states.disconnected:  # `duplex disconnect`: end the session
                raise LinkError(st.DISCONNECTED_BY_ADMIN)
            if self.needs_resync:
                # The ring overflowed while connected: catch up, then stream
                # (after the hysteresis hold, when it flaps).
                hold = self.flow.catch_up_hold()
                if hold > 0 and not self._stopping.is_set():
                    self._release()
                    if time.monotonic() - last_ping >= PING_INTERVAL:
                        link.ping()
                        last_ping = time.monotonic()
                    self._stopping.wait(min(hold, RETURN_AFTER * 5))
                    continue
                self._queued.clear()
                self._catch_up(link)
                continue
            if self._handover_at is not None and self._hand_over(link):
                return
            self.flow.apply(self._states.replication)  # a no-op unless it changed
            stopping = self._stopping.is_set()
            if stopping and (self.core.ring_stats.get("records", 0) == 0
                             or time.monotonic() > self._drain_deadline):
                return
            self._release()
            links = self._live_links(link)
            while self._queued:  # announced by a catch-up's pump(), not yet sent
                out, span = self._queued.popleft()
                out.send_data(span)
            # A frame never exceeds what the peer accepts (the largest
            # record, 32 MiB, is below the smallest limit).
            batch = min(self.res.batch_bytes, *(one.conn.max_frame for one in links))
            if any(getattr(one, "python_send", False) for one in links):
                # The C loop cannot write into TLS, nor compress: the same loop in Python.
                res = self._ship_python(links, 0.0 if stopping else interval, batch)
            else:
                with ExitStack() as held:
                    fds = [held.enter_context(one.stream_socket()) for one in links]
                    res = self.core.ship(fds, self._rr, 0.0 if stopping else interval, batch,
                                         RETURN_AFTER, self._last_send_ns)
            self._rr = res.next_fd
            self._last_send_ns = res.last_send_ns
            if res.samples:
                with self._lock:
                    self._samples.extend(res.samples)
            if res.stop == "dropped":
                self.ring_dropped()
                continue
            if res.stop == "io" and res.errnum == errno.ECANCELED:
                log.warning("%s: streaming aborted (stopping; the peer was not reading)",
                            self.res.name)
                raise links[0].failed("streaming aborted: stopping")
            if res.stop == "io":
                raise links[res.fd_index].failed(f"send failed: {os.strerror(res.errnum)}")
            if res.stop == "bad":
                raise CoreError(f"streaming failed: {os.strerror(res.errnum)} (memory, or a "
                                f"ring span that is not whole records)")
            now = time.monotonic()
            if now - last_ping >= PING_INTERVAL:
                link.ping()
                last_ping = now
            if stopping and not res.spans:
                self._wake.wait(0.01)  # everything sent: wait for the acks
                self._wake.clear()


    def _ship_python(self, links: list[PeerLink], interval_s: float,
                     batch: int) -> ShipResult:
        """What Core.ship() does (native/ship.c), in Python, for links the C
        loop cannot write to (TLS): for up to RETURN_AFTER, peek a span,
        send its TOKENS and DATA frames on the next link in turn, advance,
        with the same batching rule. A failed send raises LinkError (the
        session ends as after the C loop's "io"). The GIL is held between
        sends; the encryption and the socket writes release it."""
        core = self.core
        start = time.monotonic()
        rr = self._rr
        last_send = self._last_send_ns
        samples: list[tuple[int, int]] = []
        spans = records = nbytes = 0
        stop = "timeout"
        while True:
            if core.dropped:
                stop = "dropped"
                break
            left = start + RETURN_AFTER - time.monotonic()
            if left <= 0:
                break
            unsent = core.ring_stats["unsent_bytes"]
            if unsent == 0:
                core.wait(left)  # returns at once when records arrive
                continue
            wait = (last_send + interval_s * 1e9 - time.monotonic_ns()) / 1e9
            if unsent < batch and wait > 0:
                time.sleep(min(wait, left))  # the batching rule (DESIGN §3)
                continue
            span = core.peek(batch)
            if not span:
                continue
            tokens = core.tokens(span)
            links[rr % len(links)].send_span(tokens, span)
            try:
                core.advance(len(span))
            except CoreError:
                if not core.dropped:
                    raise
                stop = "dropped"  # the ring overflowed while the span was on its way
                break
            samples.append((_SEQ_TS.unpack_from(tokens, len(tokens) - 48)[0],
                            _SEQ_TS.unpack_from(tokens, 0)[1]))
            spans += 1
            records += len(tokens) // 48
            nbytes += len(span)
            rr += 1
            last_send = time.monotonic_ns()
        return ShipResult(stop, 0, 0, rr % len(links), spans, records, nbytes, samples, last_send)


def _describe(e: BaseException, peer: Node) -> str:
    """A connection error in words, naming the peer and its address."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"connecting to {peer.name} ({peer.address_str()}): {text}"

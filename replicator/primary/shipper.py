"""The shipper: drains the primary's send ring to the secondary.

One thread sends, one reads. The sender owns every ring consumer call
(peek, advance, release, rewind), so the ring keeps a single consumer; the
reader only records what the secondary acknowledged and wakes the sender.

Streaming runs in C (``Core.ship``, native/ship.c) with the GIL released:
the nbdkit request threads then have the GIL to themselves, which is what
the write path's speed depends on. The sender's Python loop only looks in
every RETURN_AFTER seconds (release what was journaled, ping, stop, catch
up after an overflow).

Batching (DESIGN §3): a span is whatever the ring holds, up to
``batch-bytes``; it goes out when that much is queued or ``batch-interval``
after the previous one, whichever comes first. Tokens go ahead of data:
each span goes out as a TOKENS frame and then its DATA frame, so the
secondary always knows which writes it is missing (tokens before data,
the M1/M2 split of the ordered-replication design, DESIGN §3).
A catch-up streams with :meth:`Shipper.pump`, which announces up to four
spans before it sends the oldest one's data.
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
from typing import TYPE_CHECKING

from replicator.primary.catchup import CatchUp
from replicator.native.core import CoreError
from replicator.peerlink import LinkError, PeerLink, RefusedError, local_primary_state
from replicator import generations
from replicator.generations import Decision
from replicator.protocol.messages import (STATE_DISCARD_MY_DATA, STATE_HAS_BITMAP_UUID,
                                          STATE_NEEDS_RESYNC, STATE_SENDS_BITMAP, ZERO_UUID)

if TYPE_CHECKING:
    from replicator.primary.engine import Engine

log = logging.getLogger("duplex.shipper")

_SEQ_TS = struct.Struct("<QQ")
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
REFUSED_RETRY = 5.0
PING_INTERVAL = 1.0
MAX_ANNOUNCED_SPANS = 256
RETURN_AFTER = 0.02  # the C streaming loop hands control back this often


class Shipper:
    """Ships the ring to the peer; reconnects; resumes from the peer's
    journaled seq when the ring still holds what follows it."""

    def __init__(self, engine: "Engine", needs_resync: bool):
        self.engine = engine
        self.core = engine.core
        self.res = engine.resource
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._drain_deadline = 0.0
        self._thread: threading.Thread | None = None
        self.needs_resync = needs_resync
        self._resync_reason = ("out-of-sync data from before this start (initial sync or "
                               "unclean stop)" if needs_resync else "")
        # What the peer has told us; read by status.
        self.connection = "Connecting"
        self.reason = ""
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
        self.sync = None  # SyncProgress while catching up
        self.incr_bytes_sent = 0
        self.matched_bytes = 0      # initial sync: tracks the peer already held
        self.peer_initial_sync = False
        self.verify_ids = 0         # ids of VERIFY_REQ (verify and catch-up share the link)

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="duplex-shipper", daemon=True)
        self._thread.start()

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
                self._thread.join(5)
            if self._thread.is_alive():
                log.error("%s: the shipper did not stop", self.res.name)
                return False
        return True

    def ring_dropped(self) -> None:
        """Called from the write path when the ring overflowed: from now on
        writes only mark OOS, and only a resync brings the peer back."""
        if not self.needs_resync:
            self.needs_resync = True
            self._resync_reason = "send ring overflowed"
            log.warning("%s: send ring overflowed: going Ahead (writes only mark "
                        "the out-of-sync bitmap)", self.res.name)
        if not self._wake.is_set():  # every write while Ahead comes here
            self._wake.set()

    def snapshot(self) -> dict:
        """A consistent view for status."""
        with self._lock:
            now_ns = time.time_ns()
            lag_s = 0.0
            # Spans reported after the ack that covered them are not lag.
            while self._samples and self._samples[0][0] <= self.applied:
                self._samples.popleft()
            oldest = self._samples[0][1] if self._samples else None
            inflight = self.core.ship_inflight()
            if inflight is not None and inflight[0] > self.applied:
                # Sent by the streaming call still running, not yet applied.
                oldest = inflight[1] if oldest is None else min(oldest, inflight[1])
            waiting = self.core.ship_waiting_ts() if self.connection == "Established" else None
            if waiting is not None:  # written, held back for its batch
                oldest = waiting if oldest is None else min(oldest, waiting)
            if oldest is not None:
                lag_s = max(0.0, (now_ns - oldest) / 1e9)
            elif self.core.next_seq - 1 > self.applied and self.connection != "Established":
                lag_s = -1.0  # unknown: nothing sent yet
            connection = self.connection
            reason = self.reason
            peer_disk = self.peer_disk
            for link in list(self._links):  # a disk state the peer's ACKs carry
                if link.alive() and link.peer_disk_reason:
                    peer_disk = link.peer_disk
                    reason = reason or f"peer disk {peer_disk}: {link.peer_disk_reason}"
                    break
            if self.needs_resync and connection != "SyncSource":
                connection = "Ahead"
                reason = f"resync needed: {self._resync_reason}"
            return {
                "connection": connection,
                "reason": reason,
                "peer_disk": peer_disk,
                "journaled": self.journaled,
                "applied": self.applied,
                "lag_bytes": self.core.ring_stats.get("bytes", 0),
                "lag_seconds": round(lag_s, 3) if lag_s >= 0 else None,
                "sync": self.sync.as_dict() if self.sync else None,
                "incr_bytes_sent": self.incr_bytes_sent,
                "matched_bytes": self.matched_bytes,
            }

    # -- acks (reader thread) ---------------------------------------------

    def _on_ack(self, journaled: int, applied: int) -> None:
        with self._lock:
            self.journaled = max(self.journaled, journaled)
            self.applied = max(self.applied, applied)
            while self._samples and self._samples[0][0] <= self.applied:
                self._samples.popleft()
        self._wake.set()

    # -- sender thread ----------------------------------------------------

    def _set(self, connection: str, reason: str = "") -> None:
        with self._lock:
            self.connection = connection
            self.reason = reason

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        peer = self.engine.peer
        while not self._stopping.is_set():
            self._set("Connecting")
            links: list[PeerLink] = []
            try:
                # Several connections may carry the stream (config
                # "connections"); the first one also carries the increments.
                for _ in range(max(1, self.res.connections)):
                    links.append(self._connect())
            except RefusedError as e:
                for extra in links:
                    extra.close()
                self._set("StandAlone", str(e))
                log.error("%s: peer %s refused: %s", self.res.name, peer.name, e)
                self._stopping.wait(REFUSED_RETRY)
                continue
            except (LinkError, OSError) as e:
                for extra in links:
                    extra.close()
                self._set("Connecting", str(e))
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_MIN
            link = links[0]
            self._links = links
            try:
                self._session(link)
            except (LinkError, OSError) as e:
                if not self._stopping.is_set():
                    log.warning("%s: connection to %s lost: %s", self.res.name, peer.name, e)
            except Exception:  # a bug must not silently end replication
                log.exception("%s: shipper failed; reconnecting", self.res.name)
                self._stopping.wait(BACKOFF_MAX)
            finally:
                self.engine.detached()
                for one in links:
                    one.close()
                self._links = []
        self._set("StandAlone", "stopped")

    def _connect(self) -> PeerLink:
        return PeerLink.connect(self.engine.peer.address, role="primary", resource=self.res.name,
                                node=self.engine.node.name, secret=self.res.secret(),
                                local_state=local_primary_state(self.engine, self.needs_resync),
                                on_ack=self._on_ack, timeout=5.0)

    def _agree_on_generations(self, link: PeerLink) -> None:
        """DESIGN §7: decide who is ahead. Refuses (StandAlone) unless this
        node is ahead or the same; takes the peer's own out-of-sync tracks
        (an old primary coming back) into the OOS bitmap."""
        ps = link.peer_state
        md = self.engine.md
        local = generations.of_metadata(md)
        peer = generations.from_state(ps, bool(ps.flags & STATE_HAS_BITMAP_UUID))
        fresh_peer = ps.resource_uuid == ZERO_UUID
        decision = generations.compare(local, peer)
        if ps.flags & STATE_DISCARD_MY_DATA and decision in (Decision.SPLIT_BRAIN,
                                                              Decision.PEER_AHEAD):
            log.warning("%s: %s; the peer discards its data (connect --discard-my-data)",
                        self.res.name, generations.explain(decision, local, peer))
            decision = Decision.LOCAL_AHEAD
        if not fresh_peer and decision not in (Decision.SAME, Decision.LOCAL_AHEAD):
            why = generations.explain(decision, local, peer)
            if decision is Decision.SPLIT_BRAIN:
                why += ("; nothing is merged: on the node whose changes are to be dropped, "
                        "run `duplex connect RES --discard-my-data`")
            elif decision is Decision.PEER_AHEAD:
                why += "; demote this node (`duplex demote RES`) to sync from it"
            raise RefusedError(why)
        if ps.flags & STATE_SENDS_BITMAP:
            bm = link.wait_bitmap(10.0)
            merged = 0
            for t in bm.tracks():
                if t < self.engine.oos.nbits and not self.engine.oos.set_bit(t):
                    merged += 1
            self.engine.oos.sync()
            log.warning("%s: peer %s brought %d out-of-sync tracks of its own (writes that "
                        "never reached this node); they will be resent", self.res.name,
                        link.peer_name, len(bm.tracks()))
            if bm.tracks():
                self.needs_resync = True
                self._resync_reason = "the peer's own unshipped writes are overwritten"
        changed = False
        if md.bitmap_uuid is not None:
            md.bitmap_uuid = None  # the peer takes our generation now
            changed = True
        if md.peer_node_uuid is None:
            md.peer_node_uuid = md.resource_uuid  # paired: no longer fresh
            changed = True
        if changed:
            md.save()
        self.engine.attached()

    def _session(self, link: PeerLink) -> None:
        self._agree_on_generations(link)
        ps = link.peer_state
        with self._lock:
            self.peer_disk = ps.disk
            self.journaled = ps.journaled_seq
            self.applied = ps.applied_seq
            self._released = 0
            self._samples.clear()
        last = self.core.next_seq - 1
        self.peer_initial_sync = bool(ps.flags & STATE_NEEDS_RESYNC)
        if self.peer_initial_sync and not self.needs_resync:
            self.needs_resync = True
            self._resync_reason = "the peer has never been synced (initial sync)"
        if ps.journaled_seq > last and not self.needs_resync:
            raise RefusedError(f"peer journaled seq {ps.journaled_seq}, beyond our last seq "
                               f"{last}: the two sides have different histories")
        if not self.needs_resync and not self.core.rewind(ps.journaled_seq):
            self.needs_resync = True
            self._resync_reason = (f"the send ring no longer holds seq {ps.journaled_seq + 1} "
                                   "(the peer was away too long)")
        self._queued.clear()
        if self.needs_resync:
            log.info("%s: catching up %s: %s", self.res.name, self.engine.peer.name,
                     self._resync_reason)
            self._set("SyncSource")
            CatchUp(self, link).run()
            log.info("%s: caught up; streaming to %s", self.res.name, self.engine.peer.name)
        else:
            log.info("%s: streaming to %s from seq %d", self.res.name, self.engine.peer.name,
                     ps.journaled_seq + 1)
        self._set("Established")
        self._stream(link)

    def current_link(self) -> PeerLink | None:
        """The first connection, while the session is up (for verify)."""
        links = self._links
        if links and links[0].alive() and self.connection in ("Established", "SyncSource"):
            return links[0]
        return None

    def request_resync(self, reason: str) -> None:
        """Bits were set in the OOS bitmap behind the ring's back (verify
        --fix): ship them with a catch-up."""
        self._resync_reason = reason
        self.needs_resync = True
        self._wake.set()

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
            if self.needs_resync:
                # The ring overflowed while connected: catch up, then stream.
                self._queued.clear()
                self._set("SyncSource")
                CatchUp(self, link).run()
                self._set("Established")
                continue
            stopping = self._stopping.is_set()
            if stopping and (self.core.ring_stats.get("records", 0) == 0
                             or time.monotonic() > self._drain_deadline):
                return
            self._release()
            links = self._live_links(link)
            while self._queued:  # announced by a catch-up's pump(), not yet sent
                out, span = self._queued.popleft()
                out.send_data(span)
            with ExitStack() as held:
                fds = [held.enter_context(one.stream_socket()) for one in links]
                # A frame never exceeds what the peer accepts (the largest
                # record, 32 MiB, is below the smallest limit).
                batch = min(self.res.batch_bytes, *(one.conn.max_frame for one in links))
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

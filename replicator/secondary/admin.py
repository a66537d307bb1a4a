"""The admin's commands on a running secondary (DESIGN §7), answered through
its control socket: ``disconnect``, ``connect`` (wrapping the daemon's own:
``--discard-my-data`` and the apply retry keep their meaning),
``invalidate``, ``outdate``, the clean-stop notice of a planned switchover,
and the refusals of the commands that belong to the Primary
(``invalidate-remote``, ``pause-sync``, ``resume-sync``, ``secondary``).

- ``disconnect``: StandAlone on purpose: the links close and the listener
  closes every new connection until ``connect``. Not persisted (a ``duplex
  up`` accepts its primary again), as DRBD's is not.
- ``invalidate``: this node's data is discarded. ``invalidated`` is set in
  the metadata (disk Inconsistent: promote refuses it) and the link is
  closed; at every handshake from then on the secondary hands its primary
  a BITMAP of every track, so the primary resends all of them, in
  increments. Cleared when an increment of such a session commits (its base
  is at or past the primary's seq at the handshake: the BITMAP was merged
  before it froze). Refused while no primary is connected: the data would
  be gone with no source to sync it from.
- ``outdate``: ``outdated`` in the metadata: promote refuses without
  --force. Refused while the primary is connected (it would be cleared at
  once: fencing outdates a disconnected secondary). Cleared once, connected
  again, this node has applied through the primary's seq at the handshake
  (a streamed catch-up or an increment: the next completed sync).
- A STOP from the primary (``duplex secondary`` there): once every record
  through its seq is applied and checkpointed, ``clean_stop_seq`` is saved
  and the STOP echoed; a promotion's loss report then says 0 writes lost.

Threads and locks: the handlers run on control-socket client threads, the
hooks on the daemon's reader, applier and handshake threads. ``disconnected``
is a bool read by the listener; ``_outdated_until`` and ``_invalid_until``
(seqs, or None) are written at a handshake and read after applies; each is
one reference, swapped whole. A STOP is answered on a supervised thread of
its own (``duplex-clean-stop``), which waits for the applier. Metadata changes go through ``md.update()``
(its own lock). Nothing here takes the daemon's ``_lock`` except through
its methods.
"""
from __future__ import annotations

import logging

from replicator.errors import DuplexError
from replicator.metadata import DISK_INCONSISTENT
from replicator.protocol.messages import OosBitmap, Stop

log = logging.getLogger("duplex.secondary")

DISCONNECTED_BY_ADMIN = "disconnected by the admin"


class AdminRefused(DuplexError):
    """An admin command was refused; the message says why and what to do."""


class SecondaryAdmin:
    """The admin commands and hooks of one secondary daemon (*sec*)."""

    def __init__(self, sec):
        """*sec*: the running secondary.daemon.Secondary."""
        self.sec = sec
        self.name = sec.resource.name
        self.node = sec.node.name
        self.peer = sec.peer.name
        self.disconnected = False
        self._outdated_until: int | None = None
        self._invalid_until: int | None = None

    def register(self, control) -> None:
        """Answer the admin commands on *control* (the daemon's server)."""
        for cmd, fn in (("disconnect", self.disconnect), ("connect", self.connect),
                        ("invalidate", self.invalidate),
                        ("invalidate-remote", self.invalidate_remote),
                        ("pause-sync", self.pause_sync), ("resume-sync", self.resume_sync),
                        ("outdate", self.outdate), ("secondary", self.secondary)):
            control.add_handler(cmd, fn)

    def _connected(self) -> bool:
        return any(link.alive() for link in tuple(self.sec.links))

    def _close_links(self, reason: str) -> None:
        for link in tuple(self.sec.links):
            link.close(reason)

    # -- the link ----------------------------------------------------------------

    def disconnect(self, resource: str | None = None) -> dict:
        """``duplex disconnect``: StandAlone until ``duplex connect``."""
        if self.disconnected:
            raise AdminRefused(f"{self.name}: node {self.node} is already disconnected by the "
                               f"admin; `duplex connect {self.name}` reconnects it")
        self.disconnected = True
        self.sec.standalone_reason = (f"{DISCONNECTED_BY_ADMIN} (`duplex connect {self.name}` "
                                      f"reconnects)")
        self._close_links(DISCONNECTED_BY_ADMIN)
        log.warning("%s: disconnected from %s by the admin", self.name, self.peer)
        return {"resource": self.name, "node": self.node, "connection": "StandAlone",
                "message": f"{self.name}: node {self.node} is StandAlone (disconnected by the "
                           f"admin); its primary keeps what this node lacks and sends it "
                           f"after `duplex connect {self.name}`"}

    def connect(self, discard_my_data: bool = False, resource: str | None = None) -> dict:
        """``duplex connect``: accept the primary again after a disconnect,
        then the daemon's own connect (--discard-my-data, the apply retry)."""
        reconnecting = self.disconnected
        if reconnecting:
            self.disconnected = False
            self.sec.standalone_reason = ""
            log.info("%s: connect: accepting %s again", self.name, self.peer)
        reply = self.sec.connect_cmd(discard_my_data=discard_my_data)
        return dict(reply, reconnecting=reconnecting)

    # -- invalidate, outdate ----------------------------------------------------

    def invalidate(self, resource: str | None = None) -> dict:
        """``duplex invalidate``: discard this node's data; a full sync from
        the primary follows at once (the link is reconnected for it)."""
        md = self.sec.md
        if self.disconnected or not self._connected():
            raise AdminRefused(
                f"{self.name}: cannot invalidate node {self.node}: no primary is connected "
                f"({'disconnected by the admin' if self.disconnected else 'Connecting'}); its "
                f"data would be discarded with no source to sync it from. Connect the "
                f"primary first")
        if md.invalidated:
            raise AdminRefused(f"{self.name}: node {self.node} is invalidated already; the "
                               f"full sync from {self.peer} is under way")
        with md.update():
            md.invalidated = True
            md.disk = DISK_INCONSISTENT
        log.warning("%s: invalidated by the admin: every track is resynced from %s",
                    self.name, self.peer)
        # The primary reconnects at once; the new handshake carries the BITMAP.
        self._close_links("invalidated by the admin: reconnect for a full sync")
        return {"resource": self.name, "node": self.node, "invalidated": True,
                "disk": DISK_INCONSISTENT}

    def outdate(self, resource: str | None = None) -> dict:
        """``duplex outdate``: this node's data is marked Outdated."""
        if self._connected():
            raise AdminRefused(
                f"{self.name}: cannot outdate node {self.node}: its primary {self.peer} is "
                f"connected and replicating to it, so its data is current; `duplex "
                f"disconnect {self.name}` first (fencing outdates a disconnected secondary)")
        md = self.sec.md
        if not md.outdated:
            with md.update():
                md.outdated = True
        log.warning("%s: marked Outdated by the admin: promote refuses it without --force",
                    self.name)
        return {"resource": self.name, "node": self.node, "disk": "Outdated"}

    # -- the primary's commands -------------------------------------------------

    def _primary_only(self, what: str) -> dict:
        raise AdminRefused(f"{self.name}: node {self.node} is the Secondary; {what} runs on "
                           f"the primary {self.peer}")

    def invalidate_remote(self, resource: str | None = None) -> dict:
        """Refused here: the primary discards its peer's data."""
        return self._primary_only(f"`duplex invalidate-remote {self.name}` discards the "
                                  f"peer's data and (`duplex invalidate {self.name}` here "
                                  f"discards this node's);")

    def pause_sync(self, resource: str | None = None) -> dict:
        """Refused here: the sync source pauses."""
        return self._primary_only(f"the sync is sent by the primary: `duplex pause-sync "
                                  f"{self.name}`")

    def resume_sync(self, resource: str | None = None) -> dict:
        """Refused here: the sync source resumes."""
        return self._primary_only(f"the sync is sent by the primary: `duplex resume-sync "
                                  f"{self.name}`")

    def secondary(self, timeout_s: float = 60.0, resource: str | None = None) -> dict:
        """Refused: this node is Secondary already."""
        raise AdminRefused(f"{self.name}: node {self.node} is already Secondary; `duplex "
                           f"secondary {self.name}` hands over from the primary {self.peer}")

    # -- hooks of the daemon ------------------------------------------------------

    def accepts(self) -> bool:
        """The listener: take a new connection? (not while disconnected)"""
        return not self.disconnected

    def sends_bitmap(self) -> bool:
        """The STATE: an invalidated node hands over every track."""
        return self.sec.md.invalidated

    def send_invalid_bitmap(self, link, written_seq: int) -> bool:
        """After the handshake: an invalidated node sends every track as
        out of sync (instead of its own OOS tracks). True when it did."""
        md = self.sec.md
        if not md.invalidated:
            return False
        nbits = (md.device_size + md.track_size - 1) // md.track_size
        bits = bytearray(b"\xff" * (nbits // 8))
        if nbits % 8:
            bits.append((1 << (nbits % 8)) - 1)
        link.send(OosBitmap(md.track_size, nbits, bytes(bits)))
        self._invalid_until = written_seq
        log.info("%s: invalidated: asked %s for every track (%d)", self.name, self.peer, nbits)
        return True

    def followed(self, written_seq: int, applied: int) -> None:
        """A primary was followed (handshake done), which had written
        through *written_seq*: a clean stop is history now, and an outdated
        mark clears once this node applied that far."""
        md = self.sec.md
        if md.clean_stop_seq is not None:
            with md.update():
                md.clean_stop_seq = None
        if md.outdated:
            self._outdated_until = written_seq
            self.check_applied(applied)

    def check_applied(self, applied: int) -> None:
        """After a checkpoint (or an increment applied through *applied*):
        the sync that clears an outdated mark has completed."""
        until = self._outdated_until
        if until is None or applied < until:
            return
        self._outdated_until = None
        md = self.sec.md
        if md.outdated:
            with md.update():
                md.outdated = False
            log.info("%s: caught up with %s through seq %d: no longer Outdated", self.name,
                     self.peer, applied)

    def increment_applied(self, base: int) -> None:
        """An increment was applied at *base*: a full sync asked for by
        ``invalidate`` is complete when it covers the handshake's seq."""
        until = self._invalid_until
        md = self.sec.md
        if md.invalidated and until is not None and base >= until:
            self._invalid_until = None
            with md.update():
                md.invalidated = False
            log.info("%s: the full sync after invalidate completed (seq %d)", self.name, base)
        self.check_applied(base)

    def on_stop(self, link, ev: Stop) -> None:
        """The reader thread got the primary's STOP: apply, record and echo
        it on a thread of its own (applying needs the reader free)."""
        self.sec.sup.spawn("duplex-clean-stop", lambda: self._clean_stop(link, ev))

    def _clean_stop(self, link, ev: Stop) -> None:
        sec = self.sec
        try:
            applied = sec.apply_all(30.0)
        except DuplexError as e:
            log.error("%s: the primary stopped cleanly at seq %d, but applying failed: %s; "
                      "not confirmed", self.name, ev.last_seq, e)
            return
        finally:
            sec.promote_waiting = ""
        if applied < ev.last_seq:
            log.error("%s: the primary stopped cleanly at seq %d, but this node applied only "
                      "through %d: not confirmed", self.name, ev.last_seq, applied)
            return
        with sec.md.update():
            sec.md.clean_stop_seq = ev.last_seq
        try:
            link.send(Stop(ev.last_seq, ev.ts_ns))
        except DuplexError as e:  # LinkError: the primary does not see it confirmed
            log.warning("%s: could not confirm the clean stop: %s", self.name, e)
            return
        log.warning("%s: primary %s stopped cleanly at seq %d (planned switchover): every "
                    "write is applied here; `duplex promote %s` loses nothing", self.name,
                    self.peer, ev.last_seq, self.name)
        sec.last_error = (f"primary {self.peer} stopped cleanly at seq {ev.last_seq} (planned "
                          f"switchover)")

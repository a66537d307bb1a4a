"""The admin's commands on a running primary (DESIGN §7), answered through
its control socket: ``disconnect``, ``connect``, ``invalidate-remote``,
``pause-sync``, ``resume-sync``, the switchover ``secondary``, and the
refusals of the commands that belong to a Secondary (``invalidate``,
``outdate``).

Each command either acts or refuses with the reason, like promote does;
none of them loses a write:

- ``disconnect``: StandAlone on purpose. The ring is dropped and the pair
  goes Ahead: the out-of-sync bitmap keeps every write the peer lacks, and
  ``connect`` brings the pair back through a catch-up. Not persisted: a
  ``duplex up`` connects again (as DRBD's disconnect is not kept across
  ``down``/``up``).
- ``invalidate-remote``: every track out of sync, a full sync to the peer
  (no digest matching: the peer's data is taken as wrong). Refused while
  the peer is not connected, and while a sync runs.
- ``pause-sync`` / ``resume-sync``: no increment goes out while paused
  (one under way is abandoned; the bitmap still covers it). New writes are
  not streamed meanwhile either: a catch-up keeps the pair Ahead until its
  last increment commits. Not persisted.
- ``secondary``: a planned switchover (:meth:`PrimaryAdmin.secondary`).

Threads and locks: the handlers run on control-socket client threads.
``_switch_lock`` lets one switchover run at a time; ``fenced`` (read by the
write path, written here) is a plain bool: the write path only reads it.
Everything else is the shipper's and the engine's, through their methods.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

from replicator.errors import DuplexError
from replicator.metadata import ROLE_SECONDARY
from replicator.primary import states

log = logging.getLogger("duplex.primary")

#: After the reply to ``duplex secondary`` went out, nbdkit is stopped this
#: much later (so the CLI reads its answer first).
STOP_AFTER_REPLY_S = 0.5


def stop_nbdkit() -> None:
    """Stop the nbdkit this engine runs in (its SIGTERM: the engine's clean
    stop), a moment after the reply to ``duplex secondary`` went out."""
    threading.Timer(STOP_AFTER_REPLY_S, os.kill, args=(os.getpid(), signal.SIGTERM)).start()


class AdminRefused(DuplexError):
    """An admin command was refused; the message says why and what to do."""


class PrimaryAdmin:
    """The admin commands of one running primary engine."""

    def __init__(self, resource, node, peer_name: str, md, core, oos, shipper, size: int,
                 group_name: Callable[[], str | None] = lambda: None,
                 stop_node: Callable[[], None] = stop_nbdkit):
        """The engine's narrow collaborators: *resource*, this *node*, the
        peer's name, the metadata, the core, the OOS bitmap, the shipper,
        the logical size; *group_name* says which consistency group the
        resource is in now (None: none); *stop_node* ends the node after a
        hand-over (nbdkit's own SIGTERM)."""
        self.res = resource
        self.node_cfg = node
        self.md = md
        self.core = core
        self.oos = oos
        self.shipper = shipper
        self.size = size
        self.group_name = group_name
        self.stop_node = stop_node
        self.name = resource.name
        self.node = node.name
        self.peer = peer_name
        self.fenced = False  # a switchover: writes fail with EROFS
        self._switch_lock = threading.Lock()

    def register(self, control) -> None:
        """Answer the admin commands on *control* (the engine's server)."""
        for cmd, fn in (("disconnect", self.disconnect), ("connect", self.connect),
                        ("invalidate", self.invalidate),
                        ("invalidate-remote", self.invalidate_remote),
                        ("pause-sync", self.pause_sync), ("resume-sync", self.resume_sync),
                        ("outdate", self.outdate), ("secondary", self.secondary)):
            control.add_handler(cmd, fn)

    # -- the link --------------------------------------------------------------

    def disconnect(self, resource: str | None = None) -> dict:
        """``duplex disconnect``: StandAlone until ``duplex connect``."""
        sh = self.shipper
        if sh.states.disconnected:
            raise AdminRefused(f"{self.name}: node {self.node} is already disconnected by the "
                               f"admin; `duplex connect {self.name}` reconnects it")
        sh.admin_disconnect()
        log.warning("%s: disconnected from %s by the admin: writes only mark the out-of-sync "
                    "bitmap until `duplex connect %s`", self.name, self.peer, self.name)
        return {"resource": self.name, "node": self.node, "connection": states.STANDALONE,
                "message": f"{self.name}: node {self.node} is StandAlone (disconnected by the "
                           f"admin); its writes are kept in the out-of-sync bitmap and sent "
                           f"by a catch-up after `duplex connect {self.name}`"}

    def connect(self, discard_my_data: bool = False, resource: str | None = None) -> dict:
        """``duplex connect``: reconnect after a disconnect (a Primary has no
        data of its own to discard)."""
        if discard_my_data:
            raise AdminRefused(f"{self.name}: node {self.node} is Primary: its data is the "
                               f"source; make it Secondary first (`duplex secondary "
                               f"{self.name}`, or stop it and `duplex demote {self.name}`)")
        return {"resource": self.name, "node": self.node,
                "reconnecting": self.shipper.admin_connect()}

    # -- syncs -------------------------------------------------------------------

    def invalidate(self, resource: str | None = None) -> dict:
        """Refused: a Primary's data is the source of every sync."""
        raise AdminRefused(
            f"{self.name}: node {self.node} is Primary: its data is the source of every sync "
            f"and discarding it would lose writes; `duplex invalidate-remote {self.name}` "
            f"here discards the peer's data instead")

    def invalidate_remote(self, resource: str | None = None) -> dict:
        """``duplex invalidate-remote``: the peer's data is discarded, every
        track is sent to it again (a full sync, in increments)."""
        s = self.shipper.states
        if s.connection != states.CONNECTED:
            raise AdminRefused(
                f"{self.name}: cannot invalidate the peer's data: {self.peer} is not connected "
                f"({s.connection}{': ' + s.error if s.error else ''}); connect it first")
        if self.fenced:
            raise AdminRefused(f"{self.name}: a switchover is under way")
        if s.replication == states.SYNC_SOURCE:
            # Its last increment turns clearing on release back on, which
            # could clear tracks marked here before the next sync sent them.
            raise AdminRefused(f"{self.name}: a sync to {self.peer} is under way; run "
                               f"invalidate-remote again once `duplex status {self.name}` "
                               f"shows it finished")
        # No release may clear a bit between setting and the catch-up's
        # drop of the ring: every track must go, written to lately or not.
        self.core.clear_on_release = False
        self.oos.set_range(0, self.size)
        self.oos.sync()
        self.shipper.request_resync("invalidate-remote: the admin discarded the peer's data "
                                   "(full sync)")
        log.warning("%s: invalidate-remote: every track of %s is resent", self.name, self.peer)
        return {"resource": self.name, "node": self.node, "peer": self.peer,
                "out_of_sync_bytes": self.oos.dirty_bytes(self.size)}

    def pause_sync(self, resource: str | None = None) -> dict:
        """``duplex pause-sync``: no increment goes out until resume-sync."""
        sh = self.shipper
        if sh.states.sync_paused:
            raise AdminRefused(f"{self.name}: the sync is already paused (by the admin); "
                               f"`duplex resume-sync {self.name}` resumes it")
        sh.pause_sync(True)
        log.warning("%s: sync paused by the admin", self.name)
        return {"resource": self.name, "node": self.node, "sync_paused": True,
                "replication": sh.states.replication}

    def resume_sync(self, resource: str | None = None) -> dict:
        """``duplex resume-sync``."""
        sh = self.shipper
        if not sh.states.sync_paused:
            raise AdminRefused(f"{self.name}: the sync is not paused; nothing to resume")
        sh.pause_sync(False)
        log.info("%s: sync resumed by the admin", self.name)
        return {"resource": self.name, "node": self.node, "sync_paused": False,
                "replication": sh.states.replication}

    def outdate(self, resource: str | None = None) -> dict:
        """Refused: only a Secondary's data can be out of date."""
        raise AdminRefused(
            f"{self.name}: node {self.node} is Primary: its data is the newest there is; "
            f"outdate marks a Secondary's data (run it on {self.peer})")

    # -- a planned switchover ------------------------------------------------------

    def check_write(self) -> None:
        """Raise EROFS while a switchover fences writes (the write path)."""
        if self.fenced:
            import errno
            raise OSError(errno.EROFS, f"{self.name}: node {self.node} is handing over to "
                                       f"{self.peer} (duplex secondary): read-only")

    def _clients(self) -> list[int]:
        from replicator.exportuse import export_clients
        return export_clients(os.getpid(), self.node_cfg)

    def _refuse_unless_ready(self) -> None:
        group = self.group_name()
        if group is not None:
            raise AdminRefused(f"{self.name}: a member of consistency group "
                               f"{group}: a switchover of one member is not "
                               f"supported; stop it (`duplex down {self.name}`) instead")
        s = self.shipper.states
        if s.disconnected:
            raise AdminRefused(f"{self.name}: node {self.node} is disconnected by the admin: "
                               f"`duplex connect {self.name}` first; a switchover hands over "
                               f"to a connected peer")
        if s.connection != states.CONNECTED or s.replication != states.ESTABLISHED:
            why = s.reason or "not streaming"
            raise AdminRefused(
                f"{self.name}: cannot hand over to {self.peer}: it is not connected and "
                f"streaming (connection {s.connection}, replication {s.replication}: {why}), "
                f"so it lacks writes a promotion there would lose; wait until `duplex status "
                f"{self.name}` shows Established")
        peer_disk = self.shipper.snapshot()["peer_disk"]
        if peer_disk not in ("UpToDate", "Consistent"):
            raise AdminRefused(f"{self.name}: cannot hand over to {self.peer}: its disk is "
                               f"{peer_disk}")
        clients = self._clients()
        if clients:
            raise AdminRefused(
                f"{self.name}: {len(clients)} NBD client connection(s) to the export "
                f"{self.node_cfg.export_uri()} are open: a switchover would cut off a writer; "
                f"unmount the filesystem and `duplex detach {self.name}` first")

    def secondary(self, timeout_s: float = 60.0, resource: str | None = None) -> dict:
        """``duplex secondary``: fence writes, drain until the peer has
        journaled and applied every write, hand over (STOP: the peer records
        "the primary stopped cleanly at seq N"), become Secondary, stop.

        Refused, and nothing changes, when the peer is not connected and
        streaming, when NBD clients are connected, or when the hand-over is
        not confirmed within *timeout_s*: the node stays Primary."""
        if not self._switch_lock.acquire(blocking=False):
            raise AdminRefused(f"{self.name}: a switchover is already under way")
        try:
            self._refuse_unless_ready()
            self.fenced = True
            try:
                if self._clients():  # connected between the check and the fence
                    raise AdminRefused(f"{self.name}: an NBD client connected meanwhile: "
                                       f"detach it and try again")
                last = self._drain(float(timeout_s))
                if not self.shipper.hand_over(last, min(30.0, float(timeout_s))):
                    raise AdminRefused(f"{self.name}: {self.peer} did not confirm the clean "
                                       f"stop at seq {last}; node {self.node} stays Primary")
            except BaseException:
                self.fenced = False
                raise
            self._become_secondary()
            log.warning("%s: handed over to %s at seq %d: now Secondary; stopping the "
                        "primary", self.name, self.peer, last)
            # nbdkit stops (its SIGTERM: the engine's clean stop); `duplex
            # up` then carries on as the secondary (node.run_up).
            self.stop_node()
            return {"resource": self.name, "node": self.node, "peer": self.peer,
                    "handed_over_at": last, "role": ROLE_SECONDARY}
        finally:
            self._switch_lock.release()

    def _drain(self, timeout: float) -> int:
        """Flush, then wait until the peer journaled and applied every seq
        and no track is out of sync. Returns the last seq."""
        self.core.flush()  # every write durable here; the peer syncs its image at it
        last = self.core.next_seq - 1
        deadline = time.monotonic() + timeout
        while True:
            snap = self.shipper.snapshot()
            s = self.shipper.states
            if s.connection != states.CONNECTED or s.replication != states.ESTABLISHED:
                raise AdminRefused(f"{self.name}: the link to {self.peer} changed during the "
                                   f"switchover ({s.connection}, {s.replication}: {s.reason}); "
                                   f"node {self.node} stays Primary")
            oos = self.oos.count()
            if (snap["journaled"] >= last and snap["applied"] >= last and oos == 0
                    and self.core.ring_stats.get("records", 0) == 0):
                return last
            if time.monotonic() > deadline:
                raise AdminRefused(
                    f"{self.name}: {self.peer} did not apply every write within {timeout:g} s "
                    f"(journaled {snap['journaled']}, applied {snap['applied']} of seq {last}, "
                    f"{oos} tracks out of sync); node {self.node} stays Primary; try again "
                    f"with a longer --timeout")
            time.sleep(0.02)

    def _become_secondary(self) -> None:
        """Role Secondary, disk Consistent (promote.demote_handed_over)."""
        from replicator.promote import demote_handed_over

        demote_handed_over(self.md, self.res)

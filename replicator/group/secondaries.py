"""A group member's secondary side (DESIGN §13), in the secondary daemon.

The secondary of the group's master resource is the rendezvous master
(rendezvous.py runs in its process; its own member talks to it by direct
calls). Every other member's secondary keeps a connection to it and:

- reports what it holds (``held`` / ``watermark``, from member.py), and
  ``join`` with its persisted point whenever it (re)connects;
- on ``release`` (n, T): persists update-in-progress, raises the pending
  queue's bound to T and wakes the applier; once nothing stamped at or
  before T is left to apply and the images are durable, sends ``complete``;
- on ``reset``: clears update-in-progress;
- keeps the master's latest ``view`` for status.

The daemon gives it narrow collaborators: ``set_bound(t)`` (the pending
queue's bound plus an applier wake-up), ``bound_reached() -> applied seq |
None`` (None: records stamped at or before the bound remain, or a run is
in flight) and ``sync()`` (fdatasync the images).

Threads and locks: ``SecondaryGroup._lock`` guards the rendezvous (master
only), ``view``, ``_complete_sent``. ``_route_lock`` (master, re-entrant,
taken before ``_lock``) makes a rendezvous event and the sending of its
messages one step: sends are in decision order.
Threads: channel.py's; ``poll()`` runs on the daemon's applier thread.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from replicator.config import Group
from replicator.group.channel import GroupLink
from replicator.group.member import MemberGate
from replicator.group.rendezvous import Release, Rendezvous
from replicator.group.side import GroupSide
from replicator.protocol.group import GroupMessage, make

log = logging.getLogger("duplex.group")

VIEW_INTERVAL = 0.1
WATERMARK_EVERY = 0.003


class SecondaryGroup(GroupSide):
    """See the module doc."""

    SIDE = "secondary"
    OTHER = "primary"

    def __init__(self, group: Group, resource: str, node: str, master_nodes: list[str],
                 gate: MemberGate, set_bound: Callable[[int], None],
                 bound_reached: Callable[[], int | None], sync: Callable[[], None]) -> None:
        super().__init__(group, resource, node, master_nodes)
        self.gate = gate
        self._set_bound = set_bound
        self._bound_reached = bound_reached
        self._sync = sync
        self._lock = threading.Lock()
        self.rdv = (Rendezvous(group.name, group.mode, tuple(group.resources),
                               int(group.max_skew_s * 1e6)) if self.is_master else None)
        self.view: dict | None = None
        self.view_at = 0.0
        self._complete_sent: int | None = None
        # Master: a rendezvous event and the sending of what it decided are
        # one step, so two readers cannot send a release and an older reset
        # in the other order (re-entrant: our own member answers inline).
        self._route_lock = threading.RLock()
        self._last_wm = 0.0  # the daemon's committer/reader threads: a throttle only

    # -- lifecycle ----------------------------------------------------------

    def _started(self) -> None:
        """The rendezvous master hears its own member's hello and sends
        views; a member's hello goes on each (re)connect (_on_link)."""
        if self.is_master:
            mtype, fields = self.gate.hello()
            self.send(mtype, fields)
            for mtype, fields in self.gate.report():
                self.send(mtype, fields)
            self.sup.spawn("duplex-group-view", self._view_loop, restart=True)

    # -- the master: the rendezvous and routing -----------------------------

    def _rdv(self, event: str, *args) -> list:
        with self._lock:
            out = getattr(self.rdv, event)(*args)
            self.view = self.rdv.view()
            self.view_at = time.time()
        return out

    def _route(self, out: list) -> None:
        """Deliver the rendezvous's messages: to our own member by call, to
        the others over their links."""
        for kind, member, rel in out:
            targets = [member] if member is not None else list(self.group.resources)
            for m in targets:
                if m == self.resource:
                    if kind == "release":
                        self._on_release(rel.n, rel.t)
                    else:
                        self._on_reset(rel.n)
                elif self._server is not None:
                    fields = {"n": rel.n, "t": rel.t} if kind == "release" else {"n": rel.n}
                    self._server.broadcast(kind, only=lambda link, m=m: link.peer_member == m,
                                           **fields)

    def _view_loop(self) -> None:
        while not self._stop.wait(VIEW_INTERVAL):
            with self._lock:
                view = self.rdv.view()
                self.view = view
                self.view_at = time.time()
            if self._server is not None:
                self._server.broadcast("view", view=view)

    # -- messages -----------------------------------------------------------

    def _on_link(self, link: GroupLink) -> None:
        if self.is_master:
            log.info("group %s: secondary of %s (node %s) joined", self.group.name,
                     link.peer_member, link.peer_node)
        else:
            log.info("group %s: connected to the rendezvous master %s", self.group.name,
                     link.peer_node)
            mtype, fields = self.gate.hello()
            link.send(mtype, **fields)
            for mtype, fields in self.gate.report():
                link.send(mtype, **fields)
            self._complete_sent = None  # say it again to this master

    def _on_close(self, link: GroupLink, why: str) -> None:
        if self.is_master:
            with self._route_lock:
                self._rdv("left", link.peer_member)
            log.warning("group %s: secondary of %s left: %s", self.group.name,
                        link.peer_member, why)
        else:
            log.warning("group %s: lost the rendezvous master: %s", self.group.name, why)

    def _on_message(self, link: GroupLink, msg: GroupMessage) -> None:
        if self.is_master:
            member = link.peer_member
            if msg.fields.get("member", member) != member:
                log.warning("group %s: %s sent a message for %s: ignored", self.group.name,
                            member, msg["member"])
                return
            with self._route_lock:
                self._route(self._master_event(msg))
            return
        if msg.type == "release":
            self._on_release(msg["n"], msg["t"])
        elif msg.type == "reset":
            self._on_reset(msg["n"])
        elif msg.type == "view":
            with self._lock:
                self.view = msg["view"]
                self.view_at = time.time()

    def _master_event(self, msg: GroupMessage) -> list:
        f = msg.fields
        if msg.type == "join":
            return self._rdv("joined", f["member"], Release(f["released_n"], f["released_t"]),
                             f["in_progress"])
        if msg.type == "held":
            return self._rdv("held", f["member"], f["n"], f["t"], f["skew_us"],
                             tuple(f["members"]))
        if msg.type == "watermark":
            return self._rdv("watermark", f["member"], f["t"], f["skew_us"],
                             tuple(f["members"]))
        if msg.type == "complete":
            return self._rdv("complete", f["member"], f["n"], f["seq"])
        if msg.type == "resign":
            log.warning("group %s: %s resigned: %s", self.group.name, f["member"], f["reason"])
            return self._rdv("resign", f["member"], f["reason"])
        if msg.type == "freeze":
            log.warning("group %s: frozen by %s: a promotion is under way", self.group.name,
                        f["member"])
            return self._rdv("freeze")
        return []

    def send(self, mtype: str, fields: dict) -> None:
        """Send a member message to the master (ours: a direct call)."""
        if self.is_master:
            with self._route_lock:
                self._route(self._master_event(make(mtype, **fields)))
        elif self._client is not None:
            self._client.send(mtype, **fields)

    # -- our member ---------------------------------------------------------

    def on_journaled(self, journaled: int, journaled_ts: int) -> None:
        """The daemon journaled through *journaled*: report what is held.
        Watermarks (limit-time) go at most every WATERMARK_EVERY seconds:
        under load every journal commit moves it; the next commit or
        heartbeat marker carries a skipped one."""
        now = time.monotonic()
        if self.group.mode == "limit-time" and now - self._last_wm < WATERMARK_EVERY:
            return
        for mtype, fields in self.gate.on_journaled(journaled, journaled_ts):
            if mtype == "watermark":
                self._last_wm = now
            self.send(mtype, fields)

    def catching_up(self, base_seq: int) -> None:
        """A catch-up increment begins on our member (see MemberGate)."""
        for mtype, fields in self.gate.catching_up(base_seq):
            self.send(mtype, fields)

    def _on_release(self, n: int, t: int) -> None:
        bound = self.gate.on_release(n, t)
        if bound is not None:
            self._set_bound(bound)
        elif self.gate.in_progress is None:
            # An old release we already finished: the master wants to hear it.
            self.send("complete", {"member": self.resource, "n": n, "seq": 0})

    def _on_reset(self, n: int) -> None:
        self.gate.on_reset(n)

    def poll(self) -> None:
        """Applier thread: report an update-in-progress that is done."""
        n = self.gate.in_progress
        if n is None or self._complete_sent == n:
            return
        seq = self._bound_reached()
        if seq is None:
            return
        self._sync()  # the release is durable in the images before it counts
        self._complete_sent = n
        self.send("complete", {"member": self.resource, "n": n, "seq": seq})

    def freeze(self) -> bool:
        """Ask the master to release nothing new (a promotion starts); False
        when the master cannot be reached."""
        if self.is_master:
            with self._route_lock:
                self._route(self._rdv("freeze"))
            return True
        return self._client is not None and self._client.send("freeze", member=self.resource)

    def status(self) -> dict:
        """This member's group state and the master's latest view."""
        with self._lock:
            view, at = self.view, self.view_at
        st = self.gate.status()
        st["role"] = "rendezvous master" if self.is_master else "member"
        st["connected"] = self.connected()
        st["last_error"] = (None if st["connected"] or self._client is None
                            else self._client.last_error)
        st["view"] = view
        st["view_age_seconds"] = round(time.time() - at, 3) if view else None
        return st

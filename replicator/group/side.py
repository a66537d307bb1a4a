"""What a group member's two agents share (DESIGN §13): the node of the
master resource listens on its group endpoint, every other member connects
to whichever node of the master resource plays its side; both speak
protocol/group.py over channel.py. primaries.py and secondaries.py
subclass :class:`GroupSide` with their side and their message handlers.

Threads and locks: the channel's (channel.py); ``_stop`` is an Event.
"""
from __future__ import annotations

import threading
from typing import ClassVar

from replicator.config import ConfigError, Group
from replicator.errors import DuplexError
from replicator.group.channel import GroupClient, GroupLink, GroupServer
from replicator.protocol.group import GroupConnection, GroupMessage
from replicator.supervise import Supervisor


class GroupStartError(DuplexError):
    """The node cannot join its group (secret file, endpoint)."""


class GroupSide:
    """One member's side of its group: its channel and its supervisor."""

    SIDE: ClassVar[str]   # "primary" or "secondary"
    OTHER: ClassVar[str]

    def __init__(self, group: Group, resource: str, node: str, master_nodes: list[str]) -> None:
        self.group = group
        self.resource = resource
        self.node = node
        self.is_master = resource == group.master
        self._master_nodes = master_nodes
        self._stop = threading.Event()
        self.sup = Supervisor(f"{resource} group {group.name}")
        self._server: GroupServer | None = None
        self._client: GroupClient | None = None

    def start(self) -> None:
        """Join: check the secret, listen (master) or connect, then start
        the side's own threads (:meth:`_started`). GroupStartError names
        what is wrong."""
        try:
            self.group.secret()
            self.group.tls_context(self.node, server=self.is_master)  # bad TLS files: now
        except ConfigError as e:
            raise GroupStartError(f"{self.resource}: cannot join group {self.group.name}: "
                                  f"{e}") from None
        if self.is_master:
            host, port = self.group.endpoint(self.node)
            try:
                self._server = GroupServer(self.sup, (host, port), self._conn,
                                           self._check_member, self._on_link,
                                           self._on_message, self._on_close,
                                           tls=self._tls_context,
                                           tls_names=set(self.group.endpoints))
            except OSError as e:
                raise GroupStartError(f"{self.resource}: cannot listen on group "
                                      f"{self.group.name}'s endpoint {host}:{port}: "
                                      f"{e.strerror}") from None
            self._server.start()
        else:
            eps = [self.group.endpoint(n) for n in self._master_nodes]
            self._client = GroupClient(self.sup, "duplex-group-client", eps, self._conn,
                                       self._on_link, self._on_message, self._on_close,
                                       tls=self._tls_context, tls_names=self._master_nodes)
            self._client.start()
        self._started()

    def _started(self) -> None:
        """The side's threads, once the channel is up (subclasses)."""

    def stop(self) -> None:
        """Leave: stop the threads and close the channel."""
        self._stop.set()
        self.sup.stop()
        if self._server:
            self._server.stop()
        if self._client:
            self._client.stop()

    def connected(self) -> bool:
        """A master is always with itself; a member when its link is up."""
        return self.is_master or (self._client is not None and self._client.link is not None)

    def _conn(self) -> GroupConnection:
        return GroupConnection(role="master" if self.is_master else "member",
                               group=self.group.name, node=self.node, member=self.resource,
                               side=self.SIDE, secret=self.group.secret())

    def _tls_context(self):
        """This node's SSLContext on the group channel (None: plaintext),
        files read again per connection."""
        return self.group.tls_context(self.node, server=self.is_master)

    def _check_member(self, hello: GroupMessage) -> str | None:
        if hello["side"] != self.SIDE:
            return (f"node {self.node} is the {self.SIDE} of {self.resource}: "
                    f"{self.OTHER}s of group {self.group.name} meet at its {self.OTHER}")
        if hello["member"] not in self.group.resources or hello["member"] == self.resource:
            return f"{hello['member']!r} is not another member of group {self.group.name}"
        return None

    # The channel's callbacks (subclasses).
    def _on_link(self, link: GroupLink) -> None:
        raise NotImplementedError

    def _on_message(self, link: GroupLink, msg: GroupMessage) -> None:
        raise NotImplementedError

    def _on_close(self, link: GroupLink, why: str) -> None:
        raise NotImplementedError

"""A connection failed by bytes its reader received: the failure is a
property of the sans-IO connection, and a PeerLink sender on another thread
(the secondary's applier sending an ACK) sees a lost link, not a bug."""
from __future__ import annotations

import socket

import pytest

from replicator.peerlink import LinkError, PeerLink
from replicator.protocol import ProtocolError


def _failed_secondary(proto):
    p, s = proto.establish(*proto.make_pair())
    assert s.failure is None
    with pytest.raises(ProtocolError):
        proto.deliver(s, b"\xde\xad\xbe\xef" * 16)  # not a frame
    return s


def test_a_connection_failed_by_received_bytes_says_why(proto):
    s = _failed_secondary(proto)
    assert isinstance(s.failure, ProtocolError)


def test_a_send_on_a_link_whose_reader_failed_is_a_lost_link(proto):
    s = _failed_secondary(proto)
    a, b = socket.socketpair()
    try:
        link = PeerLink(a, s)
        with pytest.raises(LinkError, match="connection failed"):
            link.send_ack(5, 4)
        b.setblocking(False)  # nothing was sent
        with pytest.raises(BlockingIOError):
            b.recv(1)
    finally:
        a.close()
        b.close()

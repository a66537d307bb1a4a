"""Shared helpers for the protocol tests: two Connections wired back to back, no sockets."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from replicator.protocol import CLOSED, NEED_DATA, Connection, State

SECRET = b"r0 shared secret, 32 bytes long!"
RESOURCE_UUID = bytes.fromhex("5a1e0c3d9b7f4e21a0c4d2b8e6f10357")
GENERATION = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
DEVICE_SIZE = 64 << 20
TRACK_SIZE = 64 << 10
P_NONCE = bytes(range(32))
S_NONCE = bytes(range(100, 132))


def deliver(conn: Connection, data) -> list:
    """Feed *data* (bytes or a list of buffers) to *conn*; return the events it yields.

    Stops at NEED_DATA; a CLOSED is included as the last element.
    """
    if isinstance(data, list):
        data = b"".join(bytes(b) for b in data)
    if data:
        conn.receive_data(data)
    events = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if ev is CLOSED:
            return events


def make_pair(p_secret: bytes = SECRET, s_secret: bytes = SECRET, **kw):
    """An unconnected primary 'alpha' and secondary 'beta' of resource r0."""
    p = Connection("primary", "r0", "alpha", p_secret, nonce=P_NONCE, **kw)
    s = Connection("secondary", "r0", "beta", s_secret, nonce=S_NONCE, **kw)
    return p, s


def authenticate(p: Connection, s: Connection):
    """Run HELLO/AUTH both ways; return the events each side saw."""
    s_events = deliver(s, p.initiate())          # primary HELLO -> secondary answers AUTH
    p_events = deliver(p, s.initiate())          # secondary HELLO + AUTH -> primary AUTH
    s_events += deliver(s, p.data_to_send())     # primary AUTH
    assert s.data_to_send() == b""
    return p_events, s_events


def make_state(role: str, **kw) -> State:
    """A STATE with the shared defaults, overridden by *kw*."""
    fields = dict(resource_uuid=RESOURCE_UUID, generation=GENERATION, device_size=DEVICE_SIZE,
                  track_size=TRACK_SIZE, role=role,
                  disk="UpToDate" if role == "primary" else "Consistent")
    fields.update(kw)
    return State(**fields)


def establish(p: Connection, s: Connection, p_state: State | None = None,
              s_state: State | None = None):
    """Authenticate, then exchange STATEs (primary first)."""
    authenticate(p, s)
    p_state = p_state or make_state("primary", written_seq=10, oldest_held_seq=1)
    s_state = s_state or make_state("secondary", journaled_seq=4, applied_seq=3)
    assert deliver(s, p.send(p_state)) == [p_state]
    assert deliver(p, s.send(s_state)) == [s_state]
    return p, s


@pytest.fixture
def proto():
    """The helpers above, for the test modules (conftest is not importable by name)."""
    return SimpleNamespace(deliver=deliver, make_pair=make_pair, authenticate=authenticate,
                           make_state=make_state, establish=establish, SECRET=SECRET,
                           RESOURCE_UUID=RESOURCE_UUID, GENERATION=GENERATION,
                           DEVICE_SIZE=DEVICE_SIZE, TRACK_SIZE=TRACK_SIZE,
                           P_NONCE=P_NONCE, S_NONCE=S_NONCE)


@pytest.fixture
def established(proto):
    """A primary and a secondary Connection past the handshake."""
    return establish(*make_pair())

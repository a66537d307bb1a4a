"""The Duplex connection state machine, for both parties, as data.

Rules of this file (after h11's ``_state.py``):

- Everything that decides whether a frame may be sent or received lives
  here, in ``TRANSITIONS``. Nothing is inferred from ``if``s elsewhere.
- This file does not know which side it plays. ``ConnectionState`` tracks
  *both* parties (keyed by role) and the same table binds both: we use it to
  check what we send and what we receive.
- Frame *contents* (nonces, MACs, resource names, sizes) are checked by
  the Connection; this file only knows frame types.

Theory of operation
-------------------

Each party (the primary and the secondary) runs its own small machine.
Its state says which frame types it may send next::

    IDLE --HELLO--> AUTHENTICATING --AUTH--> AUTH_SENT
                                                 |  (both parties AUTH_SENT)
                                                 v
                   STATE_SENT <--STATE-- NEGOTIATING
                       |  (both parties STATE_SENT)
                       v
                  ESTABLISHED  (primary: TOKENS DATA FLUSH INCR_* PING PONG STOP;
                                secondary: ACK RECEIVED PING PONG STOP)

    any state except CLOSED --ERROR--> CLOSED

The two arrows marked "both parties" are *triggered* transitions: a party
that has sent AUTH waits in AUTH_SENT until the other has sent (and we have
verified) its AUTH too; then both move on together. The same for STATE.
So until both sides are authenticated only HELLO, AUTH and ERROR can pass,
and no replication frame can pass before both STATEs were exchanged.
A party sends AUTH only once it has the other's HELLO (its nonce); that
cross-party rule is the Connection's, since it needs the nonce anyway.

When either party closes (ERROR sent or received, or EOF) the connection
is over: ``close()`` moves both parties to CLOSED.
"""
from __future__ import annotations

from enum import Enum

from replicator.protocol.errors import ProtocolError
from replicator.protocol.frames import FrameType as F
from replicator.protocol.messages import PRIMARY, SECONDARY


class PartyState(Enum):
    """Where one party is in the connection's life (value = its display name)."""

    IDLE = "IDLE"                      # has sent nothing
    AUTHENTICATING = "AUTHENTICATING"  # sent HELLO; owes AUTH
    AUTH_SENT = "AUTH_SENT"            # sent AUTH; waiting for the other party's
    NEGOTIATING = "NEGOTIATING"        # both authenticated; owes STATE
    STATE_SENT = "STATE_SENT"          # sent STATE; waiting for the other party's
    ESTABLISHED = "ESTABLISHED"        # replicating
    CLOSED = "CLOSED"                  # sent ERROR, or the connection ended

    def __str__(self) -> str:
        return self.value


IDLE = PartyState.IDLE
AUTHENTICATING = PartyState.AUTHENTICATING
AUTH_SENT = PartyState.AUTH_SENT
NEGOTIATING = PartyState.NEGOTIATING
STATE_SENT = PartyState.STATE_SENT
ESTABLISHED = PartyState.ESTABLISHED
CLOSED = PartyState.CLOSED

_HANDSHAKE: dict[PartyState, dict[F, PartyState]] = {
    IDLE: {F.HELLO: AUTHENTICATING, F.ERROR: CLOSED},
    AUTHENTICATING: {F.AUTH: AUTH_SENT, F.ERROR: CLOSED},
    AUTH_SENT: {F.ERROR: CLOSED},
    NEGOTIATING: {F.STATE: STATE_SENT, F.ERROR: CLOSED},
    STATE_SENT: {F.ERROR: CLOSED},
    CLOSED: {},
}

#: role -> state -> frame type (sent by a party of that role) -> its new state
TRANSITIONS: dict[str, dict[PartyState, dict[F, PartyState]]] = {
    PRIMARY: {
        **_HANDSHAKE,
        ESTABLISHED: {
            F.TOKENS: ESTABLISHED,
            F.DATA: ESTABLISHED,
            F.FLUSH: ESTABLISHED,
            F.INCR_BEGIN: ESTABLISHED,
            F.INCR_DATA: ESTABLISHED,
            F.INCR_COMMIT: ESTABLISHED,
            F.INCR_ZERO: ESTABLISHED,
            F.VERIFY_REQ: ESTABLISHED,
            F.PING: ESTABLISHED,
            F.PONG: ESTABLISHED,
            F.STOP: ESTABLISHED,
            F.ERROR: CLOSED,
        },
    },
    SECONDARY: {
        **_HANDSHAKE,
        ESTABLISHED: {
            F.ACK: ESTABLISHED,
            F.RECEIVED: ESTABLISHED,
            F.BITMAP: ESTABLISHED,
            F.VERIFY_SUMS: ESTABLISHED,
            F.PING: ESTABLISHED,
            F.PONG: ESTABLISHED,
            F.STOP: ESTABLISHED,
            F.ERROR: CLOSED,
        },
    },
}

#: when every party is in the key state, every party moves to the value state
TRIGGERED = {
    AUTH_SENT: NEGOTIATING,
    STATE_SENT: ESTABLISHED,
}


def other_role(role: str) -> str:
    """The complementary role."""
    return SECONDARY if role == PRIMARY else PRIMARY


class ConnectionState:
    """Both parties' states, moved only by the TRANSITIONS table."""

    def __init__(self) -> None:
        self.states: dict[str, PartyState] = {PRIMARY: IDLE, SECONDARY: IDLE}

    def next_state(self, role: str, ftype: F) -> PartyState:
        """The state a *role* party would reach by sending *ftype*; ProtocolError if not allowed."""
        state = self.states[role]
        try:
            return TRANSITIONS[role][state][ftype]
        except KeyError:
            raise ProtocolError(f"{ftype.name} frame while {state} (role {role})") from None

    def process(self, role: str, ftype: F) -> None:
        """Apply the party of *role* sending *ftype* (ProtocolError if the table forbids it)."""
        self.states[role] = self.next_state(role, ftype)
        self._fire_triggered()

    def close(self) -> None:
        """The connection ended: both parties CLOSED."""
        for role in self.states:
            self.states[role] = CLOSED

    def _fire_triggered(self) -> None:
        if CLOSED in self.states.values():
            self.close()
            return
        states = set(self.states.values())
        if len(states) == 1:
            (state,) = states
            if state in TRIGGERED:
                for role in self.states:
                    self.states[role] = TRIGGERED[state]

"""The primary's replication states and their allowed moves: the one place
those words live.

Rules of this file (after h11's ``_state.py``): everything that decides the
primary's ``connection`` and ``replication`` words is here, as data; the
shipper only reports events (:meth:`PrimaryStates.step`); status only reads
the result. No socket, thread or clock appears here.

Theory of operation. Two machines move on the same events, as h11's client
and server do. They are DRBD's two layers:

- ``connection``: is there a session with the peer? ``Connecting`` (trying;
  the last error says why it is not up yet), ``StandAlone`` (a handshake
  was refused, by either side or by our own configuration; the shipper
  still retries now and then, since the fix happens elsewhere), or
  ``Connected``.
- ``replication``: what the data stream does. ``Off`` (no session; the send
  ring still holds every write the peer lacks, so reconnecting resumes
  streaming), ``Ahead`` (writes only mark the out-of-sync bitmap: the ring
  overflowed, or out-of-sync tracks predate this start; only a resync brings
  the peer back), ``SyncSource`` (a catch-up runs), ``Established``
  (streaming), ``SplitBrain`` (both nodes wrote as Primary after they
  parted: refused until ``duplex connect RES --discard-my-data`` runs on the
  node whose data is to be discarded).

Neither machine masks the other: a dead peer with a resync pending is
``Connecting`` and ``Ahead``, each with its own reason.

Two admin commands act on the machines through events too. ``duplex
disconnect`` (:class:`AdminDisconnect`) makes the connection StandAlone on
purpose from any state and the replication Ahead (the ring is dropped, the
out-of-sync bitmap keeps every write the peer lacks, so nothing is lost);
only :class:`AdminConnect` (``duplex connect``) leaves it. ``duplex
pause-sync`` / ``resume-sync`` (:class:`SyncPaused`, :class:`SyncResumed`)
move neither machine: they set or clear :attr:`PrimaryStates.sync_paused`,
which the catch-up obeys (no increment is sent while it is set; the pair
stays Ahead or SyncSource). Neither is persisted: ``duplex up`` starts
connecting, with the sync running (as DRBD's are not kept across down/up).

Where the replication table says :data:`IDLE`, the new state is ``Ahead``
if a resync is owed and ``Off`` if not: the one rule outside the tables,
used only when leaving ``SplitBrain`` (which hides whether one is owed).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

# -- the words ------------------------------------------------------------------

STANDALONE = "StandAlone"
CONNECTING = "Connecting"
CONNECTED = "Connected"

OFF = "Off"
ESTABLISHED = "Established"
AHEAD = "Ahead"
SYNC_SOURCE = "SyncSource"
SPLIT_BRAIN = "SplitBrain"

CONNECTION_STATES = (STANDALONE, CONNECTING, CONNECTED)
REPLICATION_STATES = (OFF, ESTABLISHED, AHEAD, SYNC_SOURCE, SPLIT_BRAIN)

IDLE = "<Off or Ahead>"  # see the module docstring

CONNECTION = "connection"
REPLICATION = "replication"


# -- events (what the shipper reports) ------------------------------------------

@dataclass(frozen=True)
class Event:
    """Something that happened to the shipper."""

    name: ClassVar[str] = "event"


@dataclass(frozen=True)
class LinkFailed(Event):
    """Connecting failed at the network level, or the session's connection
    was lost. *error* says how."""

    name: ClassVar[str] = "link failed"
    error: str


@dataclass(frozen=True)
class Refused(Event):
    """A handshake was refused (by the peer or by this node), or this node's
    own configuration keeps it from connecting (the secret file)."""

    name: ClassVar[str] = "refused"
    error: str


@dataclass(frozen=True)
class SplitBrainFound(Event):
    """The generations show that both nodes wrote as Primary."""

    name: ClassVar[str] = "split brain found"
    error: str


@dataclass(frozen=True)
class Attached(Event):
    """A handshake succeeded and the peer follows this node's data."""

    name: ClassVar[str] = "attached"


@dataclass(frozen=True)
class StreamStart(Event):
    """The ring holds what follows the peer's journaled seq: stream it."""

    name: ClassVar[str] = "stream start"


@dataclass(frozen=True)
class ResyncNeeded(Event):
    """The out-of-sync bitmap holds writes the ring does not (an overflow,
    bits from before this start, verify --fix, the peer's own tracks)."""

    name: ClassVar[str] = "resync needed"
    reason: str


@dataclass(frozen=True)
class SyncStart(Event):
    """A catch-up begins."""

    name: ClassVar[str] = "sync start"


@dataclass(frozen=True)
class CaughtUp(Event):
    """The catch-up's last increment committed and streaming resumed."""

    name: ClassVar[str] = "caught up"


@dataclass(frozen=True)
class Stopped(Event):
    """The shipper stopped (the node is going down)."""

    name: ClassVar[str] = "stopped"


@dataclass(frozen=True)
class AdminDisconnect(Event):
    """``duplex disconnect``: StandAlone on purpose until AdminConnect."""

    name: ClassVar[str] = "disconnected by the admin"


@dataclass(frozen=True)
class AdminConnect(Event):
    """``duplex connect`` after a disconnect: connecting again."""

    name: ClassVar[str] = "connect by the admin"


@dataclass(frozen=True)
class SyncPaused(Event):
    """``duplex pause-sync``: no increment goes out until SyncResumed."""

    name: ClassVar[str] = "sync paused by the admin"


@dataclass(frozen=True)
class SyncResumed(Event):
    """``duplex resume-sync``."""

    name: ClassVar[str] = "sync resumed by the admin"


EVENTS: tuple[type[Event], ...] = (LinkFailed, Refused, SplitBrainFound, Attached, StreamStart,
                                   ResyncNeeded, SyncStart, CaughtUp, Stopped, AdminDisconnect,
                                   AdminConnect, SyncPaused, SyncResumed)

#: What a session reports; ignored once the admin disconnected (see step).
SESSION_EVENTS: tuple[type[Event], ...] = (LinkFailed, Attached, StreamStart, SyncStart,
                                           CaughtUp)

#: The words status shows for the admin's own states (DESIGN §7).
DISCONNECTED_BY_ADMIN = "disconnected by the admin"
SYNC_PAUSED_BY_ADMIN = "sync paused (by the admin)"
_ADMIN_RESYNC = "the node was disconnected by the admin (writes only mark the out-of-sync bitmap)"


# -- the tables: machine -> state -> event -> new state ----------------------

TRANSITIONS: dict[str, dict[str, dict[type[Event], str]]] = {
    CONNECTION: {
        CONNECTING: {
            LinkFailed: CONNECTING, Refused: STANDALONE, SplitBrainFound: STANDALONE,
            Attached: CONNECTED, ResyncNeeded: CONNECTING, Stopped: STANDALONE,
            AdminDisconnect: STANDALONE, SyncPaused: CONNECTING, SyncResumed: CONNECTING,
        },
        STANDALONE: {
            # A retry that fails at the network level is Connecting again:
            # the refusal is no longer the latest news.
            LinkFailed: CONNECTING, Refused: STANDALONE, SplitBrainFound: STANDALONE,
            Attached: CONNECTED, ResyncNeeded: STANDALONE, Stopped: STANDALONE,
            AdminDisconnect: STANDALONE, AdminConnect: CONNECTING, SyncPaused: STANDALONE,
            SyncResumed: STANDALONE,
        },
        CONNECTED: {
            # A refusal after the handshake: the peer journaled beyond our seq.
            LinkFailed: CONNECTING, Refused: STANDALONE, StreamStart: CONNECTED,
            ResyncNeeded: CONNECTED, SyncStart: CONNECTED, CaughtUp: CONNECTED,
            Stopped: STANDALONE, AdminDisconnect: STANDALONE, SyncPaused: CONNECTED,
            SyncResumed: CONNECTED,
        },
    },
    REPLICATION: {
        OFF: {
            LinkFailed: OFF, Refused: OFF, SplitBrainFound: SPLIT_BRAIN, Attached: OFF,
            StreamStart: ESTABLISHED, ResyncNeeded: AHEAD, Stopped: OFF,
            AdminDisconnect: AHEAD, AdminConnect: OFF, SyncPaused: OFF, SyncResumed: OFF,
        },
        AHEAD: {
            LinkFailed: AHEAD, Refused: AHEAD, SplitBrainFound: SPLIT_BRAIN, Attached: AHEAD,
            ResyncNeeded: AHEAD, SyncStart: SYNC_SOURCE, Stopped: AHEAD,
            AdminDisconnect: AHEAD, AdminConnect: AHEAD, SyncPaused: AHEAD, SyncResumed: AHEAD,
        },
        ESTABLISHED: {
            LinkFailed: OFF, Refused: OFF, ResyncNeeded: AHEAD, Stopped: OFF,
            # Disconnected on purpose: the ring is dropped, the bitmap kept.
            AdminDisconnect: AHEAD, SyncPaused: ESTABLISHED, SyncResumed: ESTABLISHED,
        },
        SYNC_SOURCE: {
            # An interrupted catch-up leaves the resync owed.
            LinkFailed: AHEAD, Refused: AHEAD, ResyncNeeded: SYNC_SOURCE,
            CaughtUp: ESTABLISHED, Stopped: AHEAD, AdminDisconnect: AHEAD,
            SyncPaused: SYNC_SOURCE, SyncResumed: SYNC_SOURCE,
        },
        SPLIT_BRAIN: {
            # Only a handshake that succeeds (the loser discarded its data)
            # or refuses for another reason ends it; a lost link does not.
            LinkFailed: SPLIT_BRAIN, Refused: IDLE, SplitBrainFound: SPLIT_BRAIN,
            Attached: IDLE, ResyncNeeded: SPLIT_BRAIN, Stopped: SPLIT_BRAIN,
            AdminDisconnect: SPLIT_BRAIN, AdminConnect: SPLIT_BRAIN, SyncPaused: SPLIT_BRAIN,
            SyncResumed: SPLIT_BRAIN,
        },
    },
}


class StateError(Exception):
    """An event the tables do not allow in the current state (a bug in the
    caller: the shipper reported something impossible)."""


@dataclass(frozen=True)
class PrimaryStates:
    """Both machines' states and their reasons; immutable, :meth:`step`
    returns the next one."""

    connection: str = CONNECTING
    replication: str = OFF
    error: str | None = None        # the last connection error (kept until attached)
    resync_reason: str | None = None  # why a resync is owed (None: none is)
    disconnected: bool = False        # `duplex disconnect`: StandAlone until `connect`
    sync_paused: bool = False         # `duplex pause-sync`: no increment goes out

    @classmethod
    def initial(cls, resync_reason: str | None) -> "PrimaryStates":
        """At start: Connecting; Ahead when a resync is owed already."""
        return cls(CONNECTING, AHEAD if resync_reason else OFF, None, resync_reason)

    @property
    def resync_pending(self) -> bool:
        """True while the out-of-sync bitmap holds what the ring does not."""
        return self.resync_reason is not None

    def step(self, event: Event) -> "PrimaryStates":
        """The states after *event*; StateError if a machine does not allow it."""
        if self.disconnected and isinstance(event, SESSION_EVENTS):
            # The session the admin disconnected is still ending (the
            # sender looks between steps): what it reports changes nothing.
            return self
        conn = _move(CONNECTION, self.connection, event)
        repl = _move(REPLICATION, self.replication, event)
        error, reason = self.error, self.resync_reason
        disconnected, paused = self.disconnected, self.sync_paused
        if isinstance(event, AdminDisconnect):
            disconnected, error = True, DISCONNECTED_BY_ADMIN
            if reason is None and repl != SPLIT_BRAIN:
                reason = _ADMIN_RESYNC
        elif isinstance(event, AdminConnect):
            disconnected, error = False, None
        elif isinstance(event, SyncPaused):
            paused = True
        elif isinstance(event, SyncResumed):
            paused = False
        elif isinstance(event, (LinkFailed, Refused, SplitBrainFound)):
            error = event.error
        elif isinstance(event, Attached):
            error = None
        elif isinstance(event, ResyncNeeded):
            reason = event.reason
        elif isinstance(event, CaughtUp):
            reason = None
        if repl == IDLE:
            repl = AHEAD if reason is not None else OFF
        return replace(self, connection=conn, replication=repl, error=error,
                       resync_reason=reason, disconnected=disconnected, sync_paused=paused)

    def allows(self, event_type: type[Event]) -> bool:
        """Whether both machines accept an event of *event_type* now."""
        return (event_type in TRANSITIONS[CONNECTION][self.connection]
                and event_type in TRANSITIONS[REPLICATION][self.replication])

    @property
    def reason(self) -> str:
        """The status ``reason``: the connection's error when it is not up,
        then why a resync is owed. Both, never one for the other."""
        parts = []
        if self.connection != CONNECTED and self.error:
            parts.append(self.error)
        if self.resync_reason is not None and self.replication != SPLIT_BRAIN:
            parts.append(f"resync needed: {self.resync_reason}")
        if self.sync_paused:
            parts.append(SYNC_PAUSED_BY_ADMIN)
        return "; ".join(parts)


def _move(machine: str, state: str, event: Event) -> str:
    try:
        return TRANSITIONS[machine][state][type(event)]
    except KeyError:
        raise StateError(f"event {event.name!r} is not allowed when {machine} is "
                         f"{state!r}") from None

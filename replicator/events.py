"""``duplex events``: a running node's changes as a stream of lines, in the
manner of ``drbdsetup events2`` (DESIGN §14).

Theory of operation. A node's state is its status document
(replicator/status.py). The differ (:func:`exists_events`,
:func:`diff_events`) is pure: given the previous and the new snapshot it
returns the events between them, read from one table, :data:`FIELDS` (the
object an event is about, its word, and where the value lives in a
snapshot). Adding a field to the stream is one line there. Events that
no status field carries (a promotion, a verify result, a handler run)
are made by :func:`explicit_event` and published by the caller.

:class:`EventSource` runs the differ: a watcher thread snapshots the node
every ``interval`` (50 ms) and publishes what changed to every subscriber.
A subscriber gets the current state first (``exists`` lines), then the
``exists -`` marker, then ``change`` lines: taken under one lock, so that
nothing is lost or shown twice between the two parts. Memory is bounded:
each subscriber has a queue of at most ``max_queue`` events; one that falls
that far behind is dropped with a message saying so, never buffered
without bound. Listeners inside the process (the handlers,
replicator/handlers.py) are called with each batch and must return at
once.

The wire (the control socket's ``events`` stream) carries one JSON object
per line, the event's :meth:`Event.to_dict`; ``duplex events`` renders text
with :func:`format_event`. Text lines::

    exists resource name:r0 role:Primary congestion:none
    exists connection name:r0 peer-node-id:beta connection:Connected
    exists device name:r0 disk:UpToDate
    exists peer-device name:r0 peer-node-id:beta replication:Established peer-disk:UpToDate
    exists -
    change connection name:r0 peer-node-id:beta connection:Connecting last-error:"peer timed out"
    change peer-device name:r0 peer-node-id:beta replication:Ahead
    change peer-device name:r0 peer-node-id:beta replication:SyncSource done:0
    event promote name:r0 node:beta forced:no lost-writes:0
    call helper name:r0 helper:split-brain
    response helper name:r0 helper:split-brain status:0 seconds:0.01

Threads and locks: the watcher ("duplex-events") and the callers of
:meth:`EventSource.emit` publish under ``EventSource._lock``, which guards
``_last`` (the last snapshot), ``_subs`` and ``_listeners``; each
:class:`Subscription`'s condition guards its queue and ``dropped``. A
subscriber's socket is written only by its own control client thread,
never under ``_lock``: a slow reader stalls nobody but itself.
"""
from __future__ import annotations

import collections
import datetime
import errno
import json
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from replicator.errors import DuplexError

log = logging.getLogger("duplex.events")

#: Snapshot interval of the watcher (seconds).
DEFAULT_INTERVAL = 0.05
#: Events a subscriber may fall behind before it is dropped.
DEFAULT_MAX_QUEUE = 1000
#: The objects, in the order ``exists`` lists them, and their identity keys.
OBJECTS: dict[str, tuple[str, ...]] = {
    "resource": ("name",),
    "connection": ("name", "peer-node-id"),
    "device": ("name",),
    "peer-device": ("name", "peer-node-id"),
}
#: Verbs: the state at subscription, a change, an explicit event, a handler
#: started and its result (DRBD's ``call``/``response helper``).
VERBS = ("exists", "change", "event", "call", "response")


def _get(path: tuple[str, ...]) -> Callable[[dict], Any]:
    def read(snap: dict) -> Any:
        v: Any = snap
        for k in path:
            if not isinstance(v, dict):
                return None
            v = v.get(k)
        return v
    return read


def _sync_done(snap: dict) -> Any:
    """Resync / catch-up progress in whole percent (so at most ~100 lines
    per pass), None when no resync runs."""
    sync = snap.get("sync")
    if not isinstance(sync, dict) or not sync.get("total_bytes"):
        return None
    return min(100, int(100 * (sync.get("done_bytes") or 0) / sync["total_bytes"]))


def _yes_no(path: tuple[str, ...]) -> Callable[[dict], Any]:
    read = _get(path)

    def yn(snap: dict) -> Any:
        v = read(snap)
        return None if v is None else ("yes" if v else "no")
    return yn


@dataclass(frozen=True)
class Field:
    """One word of the stream: the object it belongs to, its key in the
    lines, and how to read its value from a snapshot (None: the snapshot
    has no such value, and the word is left out)."""

    obj: str
    key: str
    read: Callable[[dict], Any]


#: Everything the stream reports. A snapshot without a field's value (an
#: older peer, the other role) simply leaves that word out.
FIELDS: tuple[Field, ...] = (
    Field("resource", "role", _get(("role",))),
    Field("resource", "congestion", _get(("congestion",))),       # primary: none|blocked|pulled-ahead
    Field("connection", "connection", _get(("connection",))),
    Field("connection", "protocol", _get(("protocol",))),
    Field("connection", "protocol-in-force", _get(("protocol_effective",))),  # A while degraded
    Field("connection", "last-error", _get(("last_error",))),
    Field("device", "disk", _get(("disk",))),
    Field("peer-device", "replication", _get(("replication",))),
    Field("peer-device", "peer-disk", _get(("peer", "disk"))),
    Field("peer-device", "done", _sync_done),                     # resync / catch-up, percent
    Field("peer-device", "increment", _get(("sync", "increment"))),
    Field("peer-device", "lag-exceeded", _yes_no(("lag_exceeded",))),  # see with_lag_flag
)


@dataclass
class Event:
    """One line of the stream."""

    verb: str                 # one of VERBS
    obj: str                  # resource, connection, ..., or "-" for the marker
    fields: dict[str, Any] = field(default_factory=dict)  # identity keys first
    time: float = 0.0         # seconds since the epoch

    def to_dict(self) -> dict:
        """The JSON form: ``{"type", "object", "time", ...fields}``."""
        return {"type": self.verb, "object": self.obj, "time": round(self.time, 6),
                **self.fields}

    def text(self, timestamps: bool = False) -> str:
        """The text line (see the module docstring)."""
        return format_event(self.to_dict(), timestamps)


def _identity(snap: dict, obj: str) -> dict[str, Any]:
    ident: dict[str, Any] = {"name": snap.get("resource")}
    if "peer-node-id" in OBJECTS[obj]:
        ident["peer-node-id"] = (snap.get("peer") or {}).get("name")
    return ident


def _values(snap: dict, obj: str) -> dict[str, Any]:
    return {f.key: v for f in FIELDS if f.obj == obj and (v := f.read(snap)) is not None}


def exists_events(snap: dict, now: float) -> list[Event]:
    """The ``exists`` lines of *snap* (every object, every known field) and
    the ``exists -`` marker after them."""
    out = [Event("exists", obj, {**_identity(snap, obj), **_values(snap, obj)}, now)
           for obj in OBJECTS]
    out.append(Event("exists", "-", {}, now))
    return out


def diff_events(prev: dict, new: dict, now: float) -> list[Event]:
    """The ``change`` lines from snapshot *prev* to *new*: one per object
    with the fields whose value changed (a field that disappears is left
    out: the change that ended it says so, e.g. replication after a resync)."""
    out = []
    for obj in OBJECTS:
        changed: dict[str, Any] = {}
        for f in FIELDS:
            if f.obj != obj:
                continue
            old, cur = f.read(prev), f.read(new)
            if cur is not None and cur != old:
                changed[f.key] = cur
            elif cur is None and old is not None and f.key == "last-error":
                changed[f.key] = ""  # the error is gone: say so, not silence
        if changed:
            out.append(Event("change", obj, {**_identity(new, obj), **changed}, now))
    out += _verify_events(prev, new, now)
    return out


def _verify_events(prev: dict, new: dict, now: float) -> list[Event]:
    """A verify result, when the snapshot's ``verify`` (the primary's
    verify-status, not part of the status document) shows a pass that has
    finished since *prev*."""
    v, p = new.get("verify"), prev.get("verify") or {}
    if not isinstance(v, dict) or v.get("running") is not False or v.get("never_run"):
        return []
    same = ("started",) if "started" in v else ("seconds", "total_tracks")
    if p.get("running") is False and all(p.get(k) == v.get(k) for k in same):
        return []  # the same finished pass as before
    fields = {"peer-node-id": (new.get("peer") or {}).get("name"),
              "result": ("failed" if v.get("failure") else
                         "differ" if v.get("differing_bytes") else "same"),
              "differing-bytes": v.get("differing_bytes", 0),
              "skipped-ranges": len(v.get("skipped") or ()),
              "fixed": "yes" if v.get("marked_out_of_sync") else "no",
              "seconds": v.get("seconds")}
    if v.get("failure"):
        fields["failure"] = v["failure"]
    return [explicit_event("verify", new, now, **fields)]


def explicit_event(kind: str, snap: dict, now: float, **fields: Any) -> Event:
    """An event no status field carries (``event promote``, ``event
    verify``): *kind* is its object, *snap* names the resource; keyword
    arguments become its words (underscores as dashes)."""
    return Event("event", kind, {"name": snap.get("resource"),
                                 **{k.replace("_", "-"): v for k, v in fields.items()}}, now)


def with_lag_flag(snap: dict, threshold: float | None) -> dict:
    """*snap* with ``lag_exceeded`` set (lag seconds above *threshold*),
    or unchanged without a threshold; for the ``lag-exceeded`` word."""
    if threshold is None:
        return snap
    secs = (snap.get("lag") or {}).get("seconds")
    return {**snap, "lag_exceeded": secs is not None and float(secs) > threshold}


# --------------------------------------------------------------------------
# text


def _word(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        v = f"{v:g}"
    s = str(v)
    if s == "" or any(c.isspace() or c in '"\\' for c in s):
        return json.dumps(s)  # a value with spaces stays one word
    return s


def format_event(d: dict, timestamps: bool = False) -> str:
    """The text line of a wire event dict: ``VERB OBJECT key:value ...``,
    with an ISO timestamp first when asked (as ``events2 --timestamps``)."""
    words = [str(d.get("type")), str(d.get("object"))]
    words += [f"{k}:{_word(v)}" for k, v in d.items() if k not in ("type", "object", "time")]
    line = " ".join(words)
    if timestamps:
        t = datetime.datetime.fromtimestamp(float(d.get("time") or 0.0)).astimezone()
        line = f"{t.isoformat(timespec='microseconds')} {line}"
    return line


# --------------------------------------------------------------------------
# the source: watcher, subscribers, listeners


class Subscription:
    """One subscriber's bounded queue of events."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._q: collections.deque[Event] = collections.deque()
        self.dropped: str | None = None  # why it was dropped
        self.closed = False

    def put(self, events: Iterable[Event]) -> bool:
        """Queue *events*; False (and dropped) when that would pass the bound."""
        with self._cond:
            if self.dropped or self.closed:
                return False
            for ev in events:
                if len(self._q) >= self.max_queue:
                    self._q.clear()
                    self.dropped = (f"dropped: this subscriber fell {self.max_queue} events "
                                    f"behind (read the stream faster, or subscribe again)")
                    self._cond.notify_all()
                    return False
                self._q.append(ev)
            self._cond.notify_all()
            return True

    def close(self) -> None:
        """The source stops: wake the reader, which ends the stream."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def get(self, timeout: float) -> list[Event] | None:
        """Every queued event (waiting up to *timeout* for one); [] on a
        timeout; None when dropped or closed and nothing is left."""
        with self._cond:
            if not self._q and not self.dropped and not self.closed:
                self._cond.wait(timeout)
            if self._q:
                out = list(self._q)
                self._q.clear()
                return out
            return None if (self.dropped or self.closed) else []


Listener = Callable[[list[Event], "dict | None", dict], None]


class EventSource:
    """The node's event stream: the differ over periodic snapshots, plus
    explicit events."""

    def __init__(self, snapshot: Callable[[], dict], *, interval: float = DEFAULT_INTERVAL,
                 max_queue: int = DEFAULT_MAX_QUEUE, lag_threshold: float | None = None,
                 clock: Callable[[], float] = time.time):
        """*snapshot*: the node's status document (a function that may
        raise: that tick is skipped and logged)."""
        self._snapshot = snapshot
        self.interval = interval
        self.max_queue = max_queue
        self.lag_threshold = lag_threshold
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict | None = None
        self._subs: list[Subscription] = []
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._snap_error: str | None = None  # the last snapshot failure logged (watcher's)

    # -- lifecycle --------------------------------------------------------

    def start(self, spawn: Callable[[str, Callable[[], None]], Any] | None = None) -> None:
        """Start the watcher (through *spawn*, a supervisor's, when given)."""
        self.tick()  # the first snapshot: subscribers get exists lines at once
        if spawn is not None:
            t = spawn("duplex-events", self._watch)
            self._thread = t if isinstance(t, threading.Thread) else None
        else:
            self._thread = threading.Thread(target=self._watch, name="duplex-events",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching; every subscriber's stream ends."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            subs, self._subs = self._subs, []
        for s in subs:
            s.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    # -- publishing ---------------------------------------------------------

    def tick(self) -> list[Event]:
        """Take one snapshot and publish what changed (the watcher's step)."""
        try:
            snap = with_lag_flag(self._snapshot(), self.lag_threshold)
        except Exception as e:  # a status that cannot be read now; next tick
            if str(e) != self._snap_error:  # said once, not 20 times a second
                log.warning("events: cannot read the status (%s: %s); retrying",
                            type(e).__name__, e)
                self._snap_error = str(e)
            return []
        self._snap_error = None
        with self._lock:
            prev, self._last = self._last, snap
            events = [] if prev is None else diff_events(prev, snap, self._clock())
            if events:
                self._publish(events, prev, snap)
        return events

    def emit(self, kind: str, verb: str = "event", **fields: Any) -> Event:
        """Publish an explicit event about *kind* (``promote``, or
        ``helper`` with verb ``call``/``response``)."""
        with self._lock:
            snap = self._last or {}
            ev = explicit_event(kind, snap, self._clock(), **fields)
            ev.verb = verb
            self._publish([ev], snap, snap)
        return ev

    def _publish(self, events: list[Event], prev: dict | None, snap: dict) -> None:
        # Under _lock: subscribers see events in one order, after their exists.
        for s in list(self._subs):
            if not s.put(events):
                self._subs.remove(s)
                if s.dropped:
                    log.warning("events: %s", s.dropped)
        for fn in self._listeners:
            try:
                fn(events, prev, snap)
            except Exception:  # a listener's bug must not stop the stream
                log.exception("events: listener failed")

    # -- subscribing --------------------------------------------------------

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(events, previous snapshot, snapshot)`` with every batch
        (on the publishing thread: it must only queue work)."""
        with self._lock:
            self._listeners.append(fn)

    def subscribe(self, now: bool = False) -> tuple[list[Event], Subscription | None]:
        """The exists lines of the current state and, unless *now*, a
        subscription to the changes after them."""
        with self._lock:
            snap = self._last
            exists = exists_events(snap or {}, self._clock()) if snap is not None else []
            if now or self._stop.is_set():
                return exists, None
            sub = Subscription(self.max_queue)
            self._subs.append(sub)
            return exists, sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget *sub* (its reader went away)."""
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def serve(self, sock: socket.socket, now: bool = False, **_: Any) -> None:
        """The control socket's ``events`` stream on *sock* (the client
        thread's): exists lines, the marker, then changes until the source
        stops, the client hangs up or falls too far behind."""
        exists, sub = self.subscribe(now)
        if not exists:
            _send(sock, {"error": "the node has no status yet: try again"})
            if sub is not None:
                self.unsubscribe(sub)
            return
        try:
            _send_many(sock, exists)
            if sub is None:
                return
            while True:
                batch = sub.get(timeout=1.0)
                if batch is None:
                    if sub.dropped:
                        _send(sock, {"error": sub.dropped})
                    return
                if batch:
                    _send_many(sock, batch)
                elif _hung_up(sock):
                    return
        except OSError:  # the reader went away (or stalled past the socket timeout)
            return
        finally:
            if sub is not None:
                self.unsubscribe(sub)


def _send(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n")


def _send_many(sock: socket.socket, events: list[Event]) -> None:
    sock.sendall(b"".join(json.dumps(e.to_dict(), separators=(",", ":")).encode("utf-8")
                          + b"\n" for e in events))


def _hung_up(sock: socket.socket) -> bool:
    """Whether the subscriber closed its end (it sends nothing after the
    request, so readable means EOF)."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        return bool(ready) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


# --------------------------------------------------------------------------
# the client (``duplex events``)


class EventStreamError(DuplexError):
    """The node sent an error instead of events (e.g. dropped as too slow)."""


class EventStream:
    """One node's ``events`` stream, read as wire dicts."""

    def __init__(self, meta_dir: str, resource: str, now: bool = False,
                 connect_timeout: float = 5.0):
        """Connect and ask for the stream; NotRunningError when nothing
        serves *meta_dir*."""
        from replicator.control import ControlError, NotRunningError, _sun_path
        from replicator.metadata import MetaPaths

        self.resource = resource
        path = MetaPaths(meta_dir).control_socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(connect_timeout)
        try:
            with _sun_path(path) as name:
                sock.connect(name)
            sock.sendall(json.dumps({"cmd": "events", "now": bool(now)}).encode() + b"\n")
        except OSError as e:
            sock.close()
            if isinstance(e, (FileNotFoundError, ConnectionRefusedError)) or \
                    e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
                raise NotRunningError(
                    f"resource {resource} is not running on this node (no control socket "
                    f"at {path}): events come from a running node (`duplex up "
                    f"{resource}`)") from None
            raise ControlError(f"resource {resource}: cannot connect to {path}: "
                               f"{e.strerror or e}") from None
        sock.settimeout(None)  # a quiet stream may say nothing for hours
        self._sock = sock
        self._file = sock.makefile("rb")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """The next event dict; StopIteration when the node ends the stream."""
        try:
            line = self._file.readline(1 << 20)
        except OSError:
            line = b""
        if not line:
            raise StopIteration
        try:
            d = json.loads(line)
        except ValueError:
            raise EventStreamError(f"resource {self.resource}: the node sent a line that is "
                                   f"not JSON") from None
        if not isinstance(d, dict):
            raise EventStreamError(f"resource {self.resource}: the node sent a line that is "
                                   f"not an object")
        if "error" in d:
            raise EventStreamError(f"resource {self.resource}: {d['error']}")
        return d

    def close(self) -> None:
        """Hang up."""
        self._file.close()
        self._sock.close()

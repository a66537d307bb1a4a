"""Handlers: the commands of ``[resource.R.handlers]``, run when the event
stream (replicator/events.py) shows their moment (DESIGN §14).

=====================  ==================================================
handler                runs when
=====================  ==================================================
split-brain            replication becomes SplitBrain
fence-peer             a Primary loses its connection to the peer, or
                       this node is promoted (the old primary may live)
before-resync-target   this node becomes SyncTarget (a catch-up starts)
after-resync-target    this node stops being SyncTarget
out-of-sync            a verify pass found differing data
lag-exceeded           the lag passes ``lag-exceeded-threshold``
=====================  ==================================================

Which handler a batch of events calls is one pure function,
:func:`handler_triggers`. Unlike DRBD's, a handler never holds anything
up: before-resync-target runs as the resync starts, not before it, and
fence-peer does not gate the promotion. A handler runs ``/bin/sh -c
COMMAND`` with the resource's state in its environment (``DUPLEX_RESOURCE``,
``DUPLEX_NODE``, ``DUPLEX_PEER``, ``DUPLEX_ROLE``, ``DUPLEX_EVENT`` = the
handler's name, ``DUPLEX_CONNECTION``, ``DUPLEX_REPLICATION``,
``DUPLEX_DISK``, ``DUPLEX_PEER_DISK``, ``DUPLEX_LAG_SECONDS``,
``DUPLEX_LAG_WRITES``, ``DUPLEX_OUT_OF_SYNC_BYTES``, ``DUPLEX_EVENT_LINE``
= the event line, and each word of that event as ``DUPLEX_<WORD>``).

Threads and locks: each handler has its own worker thread
("duplex-handler-NAME"), started at its first run, which runs that
handler's calls one at a time from a queue of at most :data:`MAX_WAITING`;
a call beyond that is skipped and logged. A run that outlives
``handler-timeout`` is killed (its whole process group); when the node
stops, calls already made get a few seconds to run. The exit status
and time of every run are logged and published as ``response helper``
events. ``HandlerRunner._lock`` guards ``_workers``; it is taken by the event
source's publishing thread, which only queues.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from replicator.config import Handlers
from replicator.events import Event, EventSource

log = logging.getLogger("duplex.handlers")

#: Calls of one handler that may wait while it runs; more are skipped.
MAX_WAITING = 4
#: Output of a run kept for the log (bytes, its end).
OUTPUT_TAIL = 2000


def handler_triggers(events: list[Event], prev: dict | None, snap: dict) -> list[tuple[str, Event]]:
    """Which handlers *events* (the batch that took the node from *prev* to
    *snap*) call, each with the event that called it, in order."""
    out: list[tuple[str, Event]] = []
    prev = prev or {}
    for ev in events:
        f = ev.fields
        if ev.verb == "change" and ev.obj == "peer-device":
            repl = f.get("replication")
            if repl == "SplitBrain":
                out.append(("split-brain", ev))
            if repl == "SyncTarget":
                out.append(("before-resync-target", ev))
            elif repl is not None and prev.get("replication") == "SyncTarget":
                out.append(("after-resync-target", ev))
            if f.get("lag-exceeded") == "yes":
                out.append(("lag-exceeded", ev))
        elif ev.verb == "change" and ev.obj == "connection":
            if (f.get("connection") not in (None, "Connected")
                    and prev.get("connection") == "Connected" and snap.get("role") == "Primary"):
                out.append(("fence-peer", ev))
        elif ev.verb == "event" and ev.obj == "promote":
            out.append(("fence-peer", ev))
        elif ev.verb == "event" and ev.obj == "verify" and f.get("result") == "differ":
            out.append(("out-of-sync", ev))
    return out


def handler_env(handler: str, ev: Event, snap: dict, node: str, peer: str) -> dict[str, str]:
    """The DUPLEX_* variables of one run (added to the daemon's environment)."""
    env = {f"DUPLEX_{k.upper().replace('-', '_')}": _env_value(v)
           for k, v in ev.fields.items() if v is not None}
    lag = snap.get("lag") or {}
    env.update({
        "DUPLEX_RESOURCE": str(snap.get("resource") or ev.fields.get("name") or ""),
        "DUPLEX_NODE": node,
        "DUPLEX_PEER": peer,
        "DUPLEX_ROLE": str(snap.get("role") or "Unknown"),
        "DUPLEX_EVENT": handler,
        "DUPLEX_EVENT_LINE": ev.text(),
        "DUPLEX_CONNECTION": str(snap.get("connection") or ""),
        "DUPLEX_REPLICATION": str(snap.get("replication") or ""),
        "DUPLEX_DISK": str(snap.get("disk") or ""),
        "DUPLEX_PEER_DISK": str((snap.get("peer") or {}).get("disk") or ""),
        "DUPLEX_LAG_SECONDS": _env_value(lag.get("seconds")),
        "DUPLEX_LAG_WRITES": _env_value(lag.get("writes")),
        "DUPLEX_OUT_OF_SYNC_BYTES": _env_value(snap.get("out_of_sync_bytes")),
    })
    return env


def _env_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


@dataclass
class RunResult:
    """How one handler run ended."""

    handler: str
    returncode: int | None   # None: killed at the timeout
    seconds: float
    output: str              # the end of its stdout and stderr

    @property
    def timed_out(self) -> bool:
        """Killed after handler-timeout."""
        return self.returncode is None


def run_command(handler: str, command: str, env: dict[str, str], timeout: float) -> RunResult:
    """Run ``/bin/sh -c command`` with *env* added, at most *timeout*
    seconds (then its process group is killed)."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as e:
        return RunResult(handler, 127, time.monotonic() - t0, f"cannot start /bin/sh: {e}")
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the shell and whatever it started
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        rc = None
    text = (out or b"")[-OUTPUT_TAIL:].decode("utf-8", "replace").strip()
    return RunResult(handler, rc, time.monotonic() - t0, text)


class HandlerRunner:
    """Runs a resource's handlers from its event source, never blocking it."""

    def __init__(self, handlers: Handlers, node: str, peer: str, source: EventSource,
                 run: Callable[[str, str, dict[str, str], float], RunResult] = run_command):
        self.handlers = handlers
        self.node = node
        self.peer = peer
        self.source = source
        self._run = run
        self._lock = threading.Lock()
        self._workers: dict[str, tuple[queue.Queue, threading.Thread]] = {}
        self._stopping = threading.Event()
        if handlers.commands:
            source.add_listener(self.on_events)

    def on_events(self, events: list[Event], prev: dict | None, snap: dict) -> None:
        """The event source's listener: queue the runs *events* (from
        snapshot *prev* to *snap*) call for."""
        with self._lock:
            for name, ev in handler_triggers(events, prev, snap):
                command = self.handlers.command(name)
                if command is None or self._stopping.is_set():
                    continue
                env = handler_env(name, ev, snap, self.node, self.peer)
                if name not in self._workers:
                    q: queue.Queue = queue.Queue()  # bounded below; stop's sentinel always fits
                    t = threading.Thread(target=self._worker, args=(name, command, q),
                                         name=f"duplex-handler-{name}", daemon=True)
                    self._workers[name] = (q, t)
                    t.start()
                q = self._workers[name][0]
                if q.qsize() < MAX_WAITING:  # only this thread puts: the count cannot grow
                    q.put_nowait(env)
                else:
                    log.warning("handler %s: %d calls already wait for it to finish; "
                                "this one (%s) is skipped", name, MAX_WAITING, ev.text())

    def _worker(self, name: str, command: str, q: queue.Queue) -> None:
        while True:
            env = q.get()
            if env is None:
                return
            self.source.emit("helper", verb="call", helper=name)
            log.info("handler %s: running %r (%s)", name, command, env["DUPLEX_EVENT_LINE"])
            try:
                r = self._run(name, command, env, self.handlers.timeout_s)
            except Exception as e:  # a bug here must not end this handler's runs
                log.exception("handler %s: could not run", name)
                r = RunResult(name, 127, 0.0, str(e))
            if r.timed_out:
                log.error("handler %s: still running after handler-timeout %g s: killed "
                          "(%.1f s)%s", name, self.handlers.timeout_s, r.seconds,
                          f"; output: {r.output}" if r.output else "")
            elif r.returncode != 0:
                log.error("handler %s: exit status %d after %.2f s%s", name, r.returncode,
                          r.seconds, f"; output: {r.output}" if r.output else "")
            else:
                log.info("handler %s: done (exit status 0, %.2f s)", name, r.seconds)
            self.source.emit("helper", verb="response", helper=name,
                             status="timeout" if r.timed_out else r.returncode,
                             seconds=round(r.seconds, 3))

    def stop(self, timeout: float = 10.0) -> None:
        """Take no more calls and give the calls already made up to
        *timeout* seconds (at most handler-timeout) to run: a fence-peer
        called by a promotion runs before the node restarts. A run still
        going then is left to finish on its own (its own session), logged."""
        self._stopping.set()
        with self._lock:
            workers = list(self._workers.items())
            for q, _ in self._workers.values():
                q.put_nowait(None)
        deadline = time.monotonic() + min(timeout, self.handlers.timeout_s)
        for name, (_, t) in workers:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("handler %s: still running as the node stops: left to finish "
                            "on its own (its exit status will not be logged)", name)

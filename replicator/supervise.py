"""Supervised threads: no daemon thread of Duplex dies silently.

A thread started with :meth:`Supervisor.spawn` runs its target; when the
target raises, the exception is logged once with its traceback, recorded as
a :class:`Fault`, and the owner's ``on_fault`` callback is told (it turns
the fault into a state the node reports: a shipper restarting, a disk
Failed). Then either the target runs again after a backoff (``restart``:
for components that start from a clean state, such as a shipper whose
config error may be fixed) or the thread stays down, recorded "failed",
until the owner clears it.

A target that returns normally ends its thread; that is not a fault.

Threads and locks: ``Supervisor._lock`` guards ``_faults`` and
``_threads``. It is never held while a target or a callback runs, so a
callback may call back into the supervisor (``faults()``, ``clear()``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("duplex.supervise")

RESTARTING = "restarting"
FAILED = "failed"
#: A restarted target that has run this long without raising is healthy
#: again: its fault is cleared and the backoff starts over.
HEALTHY_AFTER = 10.0


@dataclass
class Fault:
    """What went wrong in one supervised thread."""

    thread: str
    error: str
    state: str                       # RESTARTING or FAILED
    since: float = field(default_factory=time.time)
    restarts: int = 0

    def as_dict(self) -> dict:
        """The fault as status shows it."""
        return {"thread": self.thread, "error": self.error, "state": self.state,
                "since": round(self.since, 3), "restarts": self.restarts}


def describe(exc: BaseException) -> str:
    """One line for an exception: its type and message, and for an OSError
    the path it concerns."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervisor:
    """Owns a node's background threads and what went wrong in them."""

    def __init__(self, owner: str, on_fault: Callable[[Fault], None] | None = None):
        self.owner = owner
        self._on_fault = on_fault
        self._lock = threading.Lock()
        self._faults: dict[str, Fault] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def spawn(self, name: str, target: Callable[[], None], *, restart: bool = False,
              backoff: tuple[float, float] = (0.2, 5.0)) -> threading.Thread:
        """Run *target* in a daemon thread named *name*, supervised."""
        t = threading.Thread(target=self._run, args=(name, target, restart, backoff),
                             name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()
        return t

    def _run(self, name: str, target: Callable[[], None], restart: bool,
             backoff: tuple[float, float]) -> None:
        delay = backoff[0]
        restarts = 0
        while True:
            started = time.monotonic()
            try:
                target()
                with self._lock:
                    self._faults.pop(name, None)
                return
            except BaseException as e:  # noqa: BLE001 (the point: nothing escapes unseen)
                if self._stopping.is_set():
                    log.debug("%s: %s ended while stopping: %s", self.owner, name, e)
                    return
                log.error("%s: thread %s failed: %s", self.owner, name, describe(e),
                          exc_info=True)
                if time.monotonic() - started >= HEALTHY_AFTER:
                    delay = backoff[0]
                fault = Fault(name, describe(e), RESTARTING if restart else FAILED,
                              restarts=restarts)
                with self._lock:
                    self._faults[name] = fault
                if self._on_fault is not None:
                    try:
                        self._on_fault(fault)
                    except Exception:  # noqa: BLE001
                        log.exception("%s: the fault handler failed", self.owner)
                if not restart:
                    return
            if self._stopping.wait(delay):
                return
            restarts += 1
            delay = min(delay * 2, backoff[1])
            log.info("%s: restarting thread %s (restart %d)", self.owner, name, restarts)
            with self._lock:
                f = self._faults.get(name)
                if f is not None:
                    f.restarts = restarts

    def faults(self) -> list[dict]:
        """Every current fault, oldest first, as status shows them."""
        with self._lock:
            return [f.as_dict() for f in sorted(self._faults.values(), key=lambda f: f.since)]

    def failed(self) -> list[dict]:
        """The faults of threads that stay down."""
        return [f for f in self.faults() if f["state"] == FAILED]

    def clear(self, name: str) -> None:
        """Forget the fault of *name* (its owner recovered it)."""
        with self._lock:
            self._faults.pop(name, None)

    def stop(self) -> None:
        """No more restarts; exceptions from now on are part of stopping."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stopping.is_set()

    def join(self, timeout: float) -> list[str]:
        """Wait up to *timeout* seconds in all for the threads; returns the
        names of those still running."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in threads if t.is_alive()]

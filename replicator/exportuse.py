"""Who uses a primary's export, and what ``duplex up`` does about them
when it stops and when it starts again.

Stopping. nbdkit (1.32) on SIGTERM stops accepting, then waits without
any bound for every connected client to hang up. A filesystem mounted on
an attached device never hangs up, so ``systemctl stop`` used to hang,
silent, until SIGKILL. :class:`PrimaryStop` bounds and explains it:

1. it logs (and tells systemd) what the stop waits for: the client
   connections to the export, the device ``attach.json`` says is attached
   to it, and where that device is mounted;
2. forwards SIGTERM to nbdkit and waits up to the resource's
   ``drain-timeout`` for the clients to go (an admin unmounting and
   detaching in that time gets a clean stop);
3. then disconnects them: it takes a duplicate of each client socket of
   nbdkit (``pidfd_getfd``) and shuts it down, so nbdkit's connection
   threads read EOF and nbdkit stops the engine cleanly (bitmaps durable,
   the exact last seq recorded, the ring drained for at most
   ``drain-timeout``); the device on top then fails every I/O with EIO;
4. kills nbdkit if it still runs ``drain-timeout`` + :data:`ENGINE_GRACE_S`
   after that (the activity log makes even that safe): a stop is bounded.

Starting again. An attach record left in place (nbdkit crashed, or a stop
like the above) describes a device that no longer reaches the export:
nbdfuse exits with its server. :func:`reattach_when_serving` gives the
export a working device again once nbdkit serves (see
:func:`replicator.attach.reattach`).

Threads and locks: :class:`PrimaryStop` runs in the main thread; its
signal handler only records the signal (no lock: one int written by the
handler, read by the loop in the same thread). The re-attach runs in its
own supervised thread ``duplex-reattach``, which shares nothing with the
stop; it takes the attach lock (a flock on the meta-dir, attach.py), as
``duplex attach`` and ``detach`` do, so a user's attach meanwhile wins.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from replicator import attach as attach_mod
from replicator import notify
from replicator.config import Config, Node, Resource
from replicator.supervise import Supervisor

log = logging.getLogger("duplex")

#: After the clients are gone, how much longer than drain-timeout nbdkit
#: may take to stop the engine (final flush, bitmaps) before it is killed.
ENGINE_GRACE_S = 10.0
#: How often a stop that still waits says so again.
REPORT_EVERY_S = 5.0
_SYS_PIDFD_GETFD = 438  # <asm/unistd_64.h>, Linux 5.6


# --------------------------------------------------------------------------
# the export's client connections, seen from outside nbdkit


def _socket_fds(pid: int) -> list[int]:
    """File descriptors of process *pid* that are sockets."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return []
    out = []
    for e in entries:
        try:
            if os.readlink(e).startswith("socket:["):
                out.append(int(e.name))
        except OSError:
            continue
    return sorted(out)


def _borrow(pid: int, fds: list[int]) -> list[tuple[int, socket.socket]]:
    """Duplicates of *pid*'s sockets *fds* in this process (``pidfd_getfd``,
    which needs no ptrace capability for our own child); those that could
    not be taken are left out. The caller closes them."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return []
    out = []
    try:
        for fd in fds:
            dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
            if dup >= 0:
                try:
                    out.append((fd, socket.socket(fileno=dup)))
                except OSError:
                    os.close(dup)
    finally:
        os.close(pidfd)
    return out


def _is_client(s: socket.socket, node: Node) -> bool:
    """Whether *s* is an accepted connection of *node*'s export. By its
    own address and a peer, not by /proc/net tables: an accepted unix
    socket belongs to the client's network namespace, not nbdkit's."""
    exp = node.export
    try:
        name = s.getsockname()
        s.getpeername()  # the listener has none
    except OSError:
        return False
    if exp.kind == "unix":
        if isinstance(name, bytes):
            name = os.fsdecode(name)
        return s.family == socket.AF_UNIX and name == str(exp.path)
    return s.family in (socket.AF_INET, socket.AF_INET6) and name[1] == exp.port


def export_clients(pid: int, node: Node) -> list[int]:
    """nbdkit's (*pid*) file descriptors of client connections to the export."""
    found = []
    for fd, s in _borrow(pid, _socket_fds(pid)):
        try:
            if _is_client(s, node):
                found.append(fd)
        finally:
            s.close()
    return found


def disconnect_clients(pid: int, fds: list[int]) -> int:
    """Shut down nbdkit's client sockets *fds* through duplicates of them:
    each connection thread then reads EOF and ends. Returns how many were
    shut down."""
    done = 0
    for _, s in _borrow(pid, fds):
        try:
            s.shutdown(socket.SHUT_RDWR)
            done += 1
        except OSError:
            pass
        finally:
            s.close()
    return done


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------
# stopping


class PrimaryStop:
    """Waits for nbdkit (*proc*) to exit; on SIGTERM/SIGINT runs the bounded
    stop of the module docstring. Install :meth:`on_signal` as the handler,
    then call :meth:`wait`."""

    def __init__(self, proc: subprocess.Popen, resource: Resource, node: Node):
        self.proc = proc
        self.resource = resource
        self.node = node
        self.drain_s = resource.drain_timeout_s
        self.signum: int | None = None
        self._phase = "running"  # -> "clients" -> "engine" -> "killed"
        self._since = 0.0
        self._reported = 0.0
        self._hurry = False

    def on_signal(self, signum: int, frame) -> None:
        """Signal handler: only records the signal; :meth:`wait` acts on it.
        A second signal cuts the wait for the clients short."""
        if self.signum is None:
            self.signum = signum
        else:
            self._hurry = True

    def wait(self) -> int:
        """nbdkit's exit status, once it has exited."""
        while True:
            try:
                rc = self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self.signum is not None:
                    self._step(time.monotonic())
                continue
            if self.signum is not None and self._phase == "running":
                # The signal reached nbdkit too (a process-group kill) and it
                # was gone before the first step: still say we are stopping.
                log.info("%s: signal %d: stopping", self.resource.name, self.signum)
                notify.stopping("Primary: stopping")
            return rc

    def _what_holds(self) -> str:
        """", attached as /dev/loopN (attach.json), mounted at /x" or ""."""
        held = attach_mod.describe_attach(self.node)
        return f": the export is {held}" if held else ""

    def _step(self, now: float) -> None:
        name = self.resource.name
        if self._phase == "running":
            self._phase, self._since, self._reported = "clients", now, now
            clients = export_clients(self.proc.pid, self.node)
            if clients:
                msg = (f"{name}: signal {self.signum}: stopping; waiting up to {self.drain_s:g} s "
                       f"(drain-timeout) for {_plural(len(clients), 'client connection')} to "
                       f"the export to close{self._what_holds()}; for a clean stop unmount "
                       f"it and run `duplex detach {name}`")
                log.warning("%s", msg)
                notify.stopping(f"Primary: stopping, waiting for "
                                f"{_plural(len(clients), 'client')}{self._what_holds()}")
            else:
                log.info("%s: signal %d: stopping (no client connected)", name, self.signum)
                notify.stopping("Primary: stopping")
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
        elif self._phase == "clients":
            clients = export_clients(self.proc.pid, self.node)
            if not clients:
                self._phase, self._since = "engine", now
                log.info("%s: no client connected any more: nbdkit stops the engine", name)
            elif now - self._since >= self.drain_s or self._hurry:
                n = disconnect_clients(self.proc.pid, clients)
                log.warning(
                    "%s: %s still open after %.0f s (drain-timeout %g s): disconnected %d%s; "
                    "it now fails every I/O (EIO); unmount it, then `duplex detach %s`, or "
                    "start `duplex up %s` again, which re-attaches it", name,
                    _plural(len(clients), "client connection"), now - self._since, self.drain_s, n,
                    self._what_holds() or " (nothing attached by duplex)", name, name)
                self._phase, self._since = "engine", now
            elif now - self._reported >= REPORT_EVERY_S:
                self._reported = now
                log.info("%s: still waiting for %s (%.0f s of %g s)%s", name,
                         _plural(len(clients), "client connection"), now - self._since,
                         self.drain_s, self._what_holds())
        elif self._phase == "engine" and now - self._since >= self.drain_s + ENGINE_GRACE_S:
            log.error("%s: nbdkit did not stop within %g s after its clients left: killing it "
                      "(the activity log covers what was in flight)", name,
                      self.drain_s + ENGINE_GRACE_S)
            self.proc.kill()
            self._phase = "killed"

    def report_stopped(self) -> None:
        """After nbdkit exited: say what still holds the attached device."""
        held = attach_mod.describe_attach(self.node)
        if held:
            log.warning("%s: primary stopped; the export was %s: that device fails every "
                        "I/O until `duplex up %s` re-attaches it (or `duplex detach %s` "
                        "after unmounting it)", self.resource.name, held,
                        self.resource.name, self.resource.name)


# --------------------------------------------------------------------------
# starting again


def reattach_when_serving(config: Config, resource: Resource, node: Node,
                          proc: subprocess.Popen, pidfile: Path,
                          timeout: float = 120.0) -> threading.Thread | None:
    """If an attach record is in place, re-attach the export once nbdkit
    serves (it writes *pidfile* then), in a daemon thread; None when there
    is nothing to re-attach."""
    if not attach_mod.has_record(node):
        return None

    def run() -> None:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if pidfile.read_text().strip():
                    break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            return
        try:
            msg = attach_mod.reattach(config, resource, node)
        except attach_mod.AttachError as e:
            log.warning("%s: the attach in place could not be re-established: %s",
                        resource.name, e)
            return
        if msg:
            log.info("%s: %s", resource.name, msg)

    # Supervised: an unexpected error is logged with its traceback, once;
    # a re-attach is not retried blindly (the admin may be unmounting).
    return Supervisor(f"{resource.name} primary").spawn("duplex-reattach", run, restart=False)

"""The local control socket of a running node (``meta-dir/control.sock``).

Protocol: newline-delimited JSON over an AF_UNIX stream socket. A request
is ``{"cmd": NAME, ...args}``; the reply is the handler's dict, or
``{"error": MESSAGE}``. A connection may carry several requests in turn.

Server: :class:`ControlServer` runs a daemon thread and answers with a
table ``cmd -> handler``; a handler is called with the request's other keys
as keyword arguments and returns a JSON-able dict (``add_handler`` lets
promote, verify, ... plug in more commands). A handler raising
:class:`DuplexError` answers ``{"error": str(e)}``.

Ownership: one process at a time owns a meta-dir. It holds an ``flock`` on
``meta-dir/daemon.lock`` (:class:`NodeLock`, which also records its pid in
the file), taken before any other file of the meta-dir is touched: ``duplex
up`` takes it first thing and keeps it for its lifetime (the primary's
nbdkit inherits the descriptor, named by ``$DUPLEX_LOCK_FD``), and so do
``create-md``, ``promote`` and ``demote`` while they change the node. The
server takes the lock itself unless its process already holds it (see
:func:`held_lock_fd`). So a second ``up`` is refused before it can remove
anything of the running one, and a socket file left by a dead daemon is
replaced. The socket is created mode 0600 (bound under a temporary name,
chmod, renamed into place, so it is never reachable with looser
permissions).

Threads and locks: the server runs one accept thread (supervised: a bug in
it is logged, recorded in :meth:`ControlServer.faults` or the owner's
supervisor, and the loop restarts) and one short-lived thread per client;
handlers run on the client threads, so they must be thread-safe themselves.
``_held_locks`` (this process's NodeLocks, by lock path) is guarded by
``_held_guard``, which is never held while anything else is taken; nothing
else is shared between threads.

Socket paths longer than AF_UNIX allows (108 bytes; deep test directories)
are reached through ``/proc/self/fd/N/`` of an open directory descriptor.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from replicator.errors import DuplexError
from replicator.metadata import MetaPaths
from replicator.supervise import Supervisor

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a request or reply larger than this is refused

Handler = Callable[..., dict]


class ControlError(DuplexError):
    """The control socket could not be used, or the daemon answered an error."""


class NotRunningError(ControlError):
    """Nothing listens on the control socket: the resource is down here."""


class NodeBusyError(ControlError):
    """Another process owns the meta-dir (holds its daemon lock)."""


#: The environment variable naming a descriptor of the meta-dir's daemon
#: lock that a parent (``duplex up``) holds and passed down (to nbdkit).
LOCK_FD_ENV = "DUPLEX_LOCK_FD"

_held_guard = threading.Lock()
_held_locks: dict[str, "NodeLock"] = {}  # realpath of daemon.lock -> the lock this process holds


def _lock_holder(path: Path) -> int | None:
    """The pid recorded in a daemon lock file (None if none is readable)."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class NodeLock:
    """This process owns the meta-dir: an exclusive ``flock`` on
    ``daemon.lock``, with our pid written in it (the pid a refused second
    command names). Released by :meth:`release` (or process exit).

    *resource* names the resource in messages, *hint* is added to the
    busy message (what to do); with *register* the control servers this
    process starts serve under this lock instead of taking their own. Raises :class:`NodeBusyError`
    ("resource r0 is already up on this node (pid N)") when another process
    holds it, and ControlError naming the path when the file cannot be
    created or written (missing or read-only meta-dir, full disk)."""

    def __init__(self, meta_dir: str | os.PathLike, resource: str | None = None,
                 hint: str = "", pid: int | None = None, register: bool = True):
        self.paths = MetaPaths(meta_dir)
        self.path = self.paths.lock
        self.resource = resource
        what = f"resource {resource}" if resource else f"the resource in {self.paths.meta_dir}"
        if not self.paths.meta_dir.is_dir():
            raise ControlError(
                f"{self.paths.meta_dir}: the meta-dir does not exist"
                + (f" (run `duplex create-md {resource}` first)" if resource else ""))
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            e.filename = None
            raise ControlError(f"{self.path}: cannot open the daemon lock: "
                               f"{describe_oserror(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _lock_holder(self.path)
            raise NodeBusyError(
                f"{what} is already up on this node "
                f"({f'pid {holder}' if holder else f'a process holds {self.path}'})"
                + (f"; {hint}" if hint else "")) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{pid or os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            e.filename = None
            raise ControlError(f"{self.path}: cannot write the daemon lock: "
                               f"{describe_oserror(e)}") from None
        self.fd: int | None = fd
        if register:  # the servers this process starts serve under it
            with _held_guard:
                _held_locks[os.path.realpath(self.path)] = self

    def release(self) -> None:
        """Give the meta-dir up (closing our descriptor drops the flock)."""
        with _held_guard:
            if _held_locks.get(os.path.realpath(self.path)) is self:
                del _held_locks[os.path.realpath(self.path)]
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "NodeLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def held_lock_fd(meta_dir: str | os.PathLike) -> int | None:
    """A descriptor of *meta_dir*'s daemon lock this process already holds:
    a :class:`NodeLock` of ours, or the one ``$DUPLEX_LOCK_FD`` names (the
    parent ``duplex up`` holds it for nbdkit) when it is that very file."""
    path = MetaPaths(meta_dir).lock
    with _held_guard:
        mine = _held_locks.get(os.path.realpath(path))
    if mine is not None and mine.fd is not None:
        return mine.fd
    env = os.environ.get(LOCK_FD_ENV, "")
    if not env.isdigit():
        return None
    try:
        a, b = os.fstat(int(env)), os.stat(path)
    except OSError:
        return None
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        return None
    # Ours to use, not to hand on: a child that outlived us would hold the
    # node's lock.
    os.set_inheritable(int(env), False)
    return int(env)


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """A name for *path* that fits in sockaddr_un.

    Long paths are reached through /proc/self/fd of an O_PATH descriptor of
    the directory (bind() and connect() follow that magic link).
    """
    if len(os.fsencode(str(path))) <= 107:
        yield str(path)
        return
    dfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{dfd}/{path.name}"
    finally:
        os.close(dfd)


def _send_json(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n")


class _LineReader:
    """Reads newline-terminated lines from a socket, bounded by MAX_LINE."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def readline(self) -> bytes | None:
        """The next line without its newline; None at a clean EOF."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ValueError(f"line longer than {MAX_LINE} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                if self.buf:
                    raise ValueError("connection closed in the middle of a line")
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


class ControlServer:
    """Answers control requests on a meta-dir's socket from a daemon thread."""

    def __init__(self, meta_dir: str | os.PathLike,
                 handlers: dict[str, Handler] | None = None, name: str = "control",
                 supervisor: Supervisor | None = None):
        """*supervisor*: the owner's (its faults then show in the owner's
        status); without one the server supervises its accept thread itself
        (:meth:`faults`)."""
        self.paths = MetaPaths(meta_dir)
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self._streams: dict[str, Callable[..., None]] = {}  # add_stream
        self.name = name
        self._given_sup = supervisor
        self._sup: Supervisor | None = supervisor
        self._own_lock: NodeLock | None = None
        self._sock: socket.socket | None = None
        self._ino: int | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def add_handler(self, cmd: str, handler: Handler) -> None:
        """Answer requests ``{"cmd": cmd, ...}`` with ``handler(**args)``."""
        self.handlers[cmd] = handler

    def add_stream(self, cmd: str, handler: Callable[..., None]) -> None:
        """Answer a request ``{"cmd": cmd, ...}`` with ``handler(sock,
        **args)``, which owns the client's socket until it returns (the
        ``events`` stream, replicator/events.py); the connection then closes."""
        self._streams[cmd] = handler

    @property
    def socket_path(self) -> Path:
        """Where the server listens."""
        return self.paths.control_socket

    # -- lifecycle --------------------------------------------------------

    def start(self) -> "ControlServer":
        """Take the meta-dir's daemon lock, bind the socket, start serving.

        Raises ControlError when another live process already serves this
        meta-dir.
        """
        path = self.socket_path
        # A process that owns the meta-dir already (duplex up took the lock
        # first; nbdkit inherited it) serves under that lock.
        borrowed = held_lock_fd(self.paths.meta_dir)
        own_lock = None
        if borrowed is None:
            own_lock = NodeLock(self.paths.meta_dir, register=False)
        lock_fd = borrowed if own_lock is None else own_lock.fd
        assert lock_fd is not None
        try:
            # We hold the lock, so whatever socket file is there is stale.
            if path.exists() or path.is_symlink():
                if not path.is_socket():
                    raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
                path.unlink()
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                with _sun_path(tmp) as name:
                    sock.bind(name)
                os.chmod(tmp, 0o600)
                os.replace(tmp, path)
                sock.listen(16)
            except OSError as e:
                sock.close()
                tmp.unlink(missing_ok=True)
                raise ControlError(f"cannot create control socket {path}: {e.strerror}") from None
        except BaseException:
            if own_lock is not None:
                own_lock.release()
            raise
        self._own_lock, self._sock = own_lock, sock
        self._ino = path.stat().st_ino
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._stopping.clear()
        if self._given_sup is None:  # a fresh one per start: stop() ends its restarts
            self._sup = Supervisor(f"control socket {path}")
        assert self._sup is not None
        # Restarted after a bug in the loop: a node whose control socket
        # died would look "not running" to status and promote.
        self._thread = self._sup.spawn(self.name, self._serve, restart=True,
                                       backoff=(0.1, 2.0))
        return self

    def faults(self) -> list[dict]:
        """Faults of the accept thread (also in the owner's supervisor, if
        one was given)."""
        return [] if self._sup is None else [
            f for f in self._sup.faults() if f["thread"] == self.name]

    def stop(self) -> None:
        """Stop serving, remove the socket file (if still ours), release the lock."""
        if self._thread is None:
            return
        self._stopping.set()
        if self._given_sup is None and self._sup is not None:
            self._sup.stop()  # no restart of the loop from here on
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        self._thread = None
        assert self._sock is not None
        self._sock.close()
        self._sock = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            if self.socket_path.stat().st_ino == self._ino:
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        if self._own_lock is not None:  # a borrowed lock stays with its owner
            self._own_lock.release()
            self._own_lock = None

    def __enter__(self) -> "ControlServer":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving ----------------------------------------------------------

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError as e:  # e.g. ECONNABORTED: the client went away
                log.debug("control accept failed: %s", e)
                continue
            # One thread per client: a slow handler (promote) must not
            # block status. Not supervised: it lives for one client, and
            # what it could raise is caught and logged in _client.
            threading.Thread(target=self._client, args=(conn,),
                             name=f"{self.name}-client", daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except Exception:  # dispatch catches handler errors: this is a bug here
            log.exception("control: client thread failed")

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            reader = _LineReader(conn)
            while True:
                try:
                    line = reader.readline()
                except (ValueError, OSError) as e:
                    log.warning("control: dropping client: %s", e)
                    return
                if line is None:
                    return
                stream = self._stream_of(line)
                if stream is not None:
                    handler, args = stream
                    try:
                        handler(conn, **args)
                    except TypeError as e:  # wrong arguments: tell the client
                        try:
                            _send_json(conn, {"error": f"{e}"})
                        except OSError:
                            pass
                    return
                reply = self.dispatch(line)
                try:
                    _send_json(conn, reply)
                except OSError:
                    return

    def _stream_of(self, line: bytes) -> tuple[Callable[..., None], dict] | None:
        """The stream handler and its arguments when *line* asks for one."""
        if not self._streams:
            return None
        try:
            req = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None  # dispatch gives the error
        if not isinstance(req, dict) or req.get("cmd") not in self._streams:
            return None
        return self._streams[req.pop("cmd")], req

    def dispatch(self, line: bytes) -> dict:
        """The reply to one request line (also usable without a socket)."""
        try:
            req = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError too
            return {"error": f"request is not JSON: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"error": 'request must be an object with a "cmd" string'}
        cmd = req.pop("cmd")
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"error": f"unknown command {cmd!r} (known: {', '.join(sorted(self.handlers))})"}
        try:
            reply = handler(**req)
        except DuplexError as e:
            return {"error": str(e)}
        except OSError as e:
            # A disk problem (full, read-only, I/O error) while the handler
            # changed files: the user must know which file, not a bug report.
            log.exception("control: %s failed", cmd)
            return {"error": f"{cmd}: {describe_oserror(e)}"}
        except TypeError as e:
            # Almost always wrong arguments; log in case it was a bug inside.
            log.exception("control: %s failed", cmd)
            return {"error": f"{cmd}: {e}"}
        except Exception as e:  # a bug in a handler must not kill the daemon
            log.exception("control: %s failed", cmd)
            return {"error": f"{cmd}: internal error: {type(e).__name__}: {e}"}
        if not isinstance(reply, dict):
            return {"error": f"{cmd}: handler returned {type(reply).__name__}, not an object"}
        return reply


_OSERROR_HINTS = {
    errno.ENOSPC: "free space on that filesystem and try again",
    errno.EDQUOT: "the disk quota is used up: free space and try again",
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write",
    errno.EACCES: "permission denied: run as the user that owns it (root)",
    errno.EIO: "an I/O error: check the disk (dmesg)",
}


def describe_oserror(e: OSError) -> str:
    """``PATH: strerror`` for an OSError (both paths of a rename), or the
    bare strerror when the error carries no path."""
    what = e.strerror or str(e)
    hint = _OSERROR_HINTS.get(e.errno)
    if hint:
        what = f"{what} ({hint})"
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {what}"
    if e.filename is not None:
        return f"{e.filename}: {what}"
    return what


def lock_holder(meta_dir: str | os.PathLike) -> int | None:
    """The pid of the process that holds *meta_dir*'s daemon lock now, or
    None when nobody holds it (or the pid is unknown: a lock held with no
    pid written gives 0)."""
    if not is_running(meta_dir):
        return None
    return _lock_holder(MetaPaths(meta_dir).lock) or 0


def is_running(meta_dir: str | os.PathLike) -> bool:
    """Whether a daemon holds *meta_dir*'s lock (i.e. runs, whatever it answers)."""
    try:
        fd = os.open(MetaPaths(meta_dir).lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def request(meta_dir: str | os.PathLike, cmd: str, *, timeout: float = 5.0,
            resource: str | None = None, check: bool = True, **args: Any) -> dict:
    """Send ``{"cmd": cmd, **args}`` to the node running in *meta_dir*.

    Returns the reply dict. Raises NotRunningError when nothing listens
    there, ControlError on a timeout or broken reply, and (with *check*) a
    ControlError carrying the daemon's message when the reply is an error.
    *resource* only names the resource in messages.
    """
    path = MetaPaths(meta_dir).control_socket
    what = f"resource {resource}" if resource else f"the resource in {MetaPaths(meta_dir).meta_dir}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            with _sun_path(path) as name:
                sock.connect(name)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise NotRunningError(
                f"{what} is not running on this node (no control socket at {path})"
            ) from None
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise NotRunningError(
                    f"{what} is not running on this node (no control socket at {path})"
                ) from None
            raise ControlError(f"cannot connect to {path}: {e.strerror}") from None
        try:
            _send_json(sock, {"cmd": cmd, **args})
            line = _LineReader(sock).readline()
        except socket.timeout:
            raise ControlError(f"{what} did not answer {cmd!r} within {timeout:g}s ({path})") from None
        except (OSError, ValueError) as e:
            raise ControlError(f"{what}: control connection failed: {e}") from None
    finally:
        sock.close()
    if line is None:
        raise ControlError(f"{what} closed the control connection without answering {cmd!r}")
    try:
        reply = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError too
        raise ControlError(f"{what} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{what} sent a reply that is not an object")
    if check and "error" in reply:
        msg = str(reply["error"])
        # Most daemon errors already lead with the resource ("r0: ..."):
        # say it once, not "resource r0: r0: ...".
        if resource and msg.startswith((f"{resource}:", f"resource {resource} ")):
            raise ControlError(msg)
        raise ControlError(f"{what}: {msg}")
    return reply

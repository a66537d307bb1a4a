"""Running one node's side of a resource: ``duplex up`` and the files
``duplex create-md`` makes.

The primary runs inside nbdkit (our plugin in front of the device); this
module starts nbdkit with the right interpreter path and forwards signals.
The secondary runs in this process.

The role lives in the metadata (``duplex promote`` / ``duplex demote``
change it); ``up --role`` only chooses it on fresh metadata. Under systemd
(``Type=notify``) ``up`` reports READY=1 once it serves: the secondary when
it listens, the primary when nbdkit accepts on the export. A secondary that
is promoted through its control socket stops and exits with
:data:`EXIT_PROMOTED`, to be started again as primary.

``up`` owns the node first (the meta-dir's lock, :class:`replicator.control.
NodeLock`, which nbdkit inherits), then checks what it will need
(:func:`check_before_ready`), and only then starts anything.

Threads and locks: ``up`` of a primary runs one supervised thread,
``duplex-ready`` (waits for nbdkit's pid file, then READY=1), sharing
nothing but the nbdkit process handle, which it only polls. The secondary's
threads are the daemon's (replicator/secondary/daemon.py); this module only
waits for a signal or a promotion (a ``threading.Event``). No lock here.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from replicator import notify
from replicator.control import describe_oserror
from replicator.config import Config, Node, Resource
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import CoreError
from replicator.errors import DuplexError
from replicator.secondary.journal import Journal
from replicator.supervise import Supervisor
from replicator.volumes import check_volumes
from replicator.metadata import ROLE_PRIMARY, ROLE_SECONDARY, Metadata, load_metadata

log = logging.getLogger("duplex")

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN = REPO_ROOT / "nbdplugin" / "plugin.py"
NBDKIT_PIDFILE = "nbdkit.pid"  # in the meta-dir: written by nbdkit when it serves
#: The plugin writes a startup error (one line) to this descriptor and exits.
STARTUP_ERROR_FD_ENV = "DUPLEX_STARTUP_ERROR_FD"

#: ``duplex up`` exits with this after its secondary was promoted: the node
#: must be started again, now as primary (systemd: RestartForceExitStatus).
#: 75 is EX_TEMPFAIL, "try again".
EXIT_PROMOTED = 75


# --------------------------------------------------------------------------
# create-md: the metadata set, all or nothing

#: Files of one node's metadata set, in the order they are put in place:
#: metadata.json last, since its presence is what makes the others count.
SET_FILES = ("oos.bitmap", "activity.log", "journal", "metadata.json")
_BUILD_PREFIX = ".create-md."
_SLACK = 256 << 10  # metadata document, superblocks, headers


def set_bytes(resource: Resource, device_size: int) -> int:
    """About how many bytes a new metadata set takes in the meta-dir
    (the journal is preallocated; bitmaps are a bit per track/extent)."""
    tracks = (device_size + resource.track_size - 1) // resource.track_size
    return resource.journal_size + tracks // 8 + resource.al_extents * 16 + _SLACK


def check_meta_dir_room(meta_dir: Path, need: int, what: str) -> None:
    """DuplexError naming *meta_dir* unless it has *need* bytes free."""
    try:
        st = os.statvfs(meta_dir)
    except OSError as e:
        raise DuplexError(f"{meta_dir}: cannot check free space: {e.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if free < need:
        from replicator.sizes import format_size
        raise DuplexError(f"{meta_dir}: {format_size(free)} free, but {what} needs "
                          f"{format_size(need)}: free space there, or move meta-dir")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_builds(meta_dir: Path) -> None:
    """Remove what an interrupted create-md left (its build directory).
    Only called with the node's lock held, so no create-md is running."""
    for p in meta_dir.glob(_BUILD_PREFIX + "*"):
        _remove_tree(p)


def create_metadata_set(config: Config, resource: Resource, node: Node, size: int,
                        assume_clean: bool, force: bool,
                        volumes: list[dict] | None = None) -> Metadata:
    """``create-md``: make the metadata, OOS bitmap, activity log and
    journal of *node*, all or nothing. The caller holds the node's lock.

    *volumes*: the node's volumes as ``[{"name", "size"}]`` in config order
    (replicator.volumes.read_volumes); *size* is then their logical size
    (metadata.logical_size: laid end to end on track boundaries), which the
    bitmaps cover. None: one volume of *size* bytes, today's resource.

    Every precondition is checked before anything is written (no metadata
    yet, or *force*; journal path usable; room for a whole new set beside
    the old one). The set is then built in a temporary directory inside the
    meta-dir and renamed into place file by file, metadata last (the old
    set is moved aside first and put back if a rename fails). A failure
    while building (a full disk) removes the build and leaves the old set
    untouched, or nothing when there was none. A crash in the short rename
    phase leaves no metadata.json, which create-md (without --force) then
    replaces whole; ``up`` says to run it.
    """
    from replicator.metadata import MetaPaths, MetadataError, create_metadata

    paths = MetaPaths(node.meta_dir)
    meta = paths.meta_dir
    remove_stale_builds(meta)
    if paths.metadata.exists() and not force:
        raise MetadataError(f"{paths.metadata}: metadata for this node already exists; "
                            f"--force overwrites it and discards its replication state")
    for f in SET_FILES:
        p = meta / f
        if (p.exists() or p.is_symlink()) and not p.is_file():
            raise DuplexError(f"{p} exists and is not a regular file: move it away, it is "
                              f"where create-md puts the node's {f}")
    check_meta_dir_room(meta, set_bytes(resource, size),
                        f"a new metadata set (journal-size {resource.journal_size} bytes"
                        + (", beside the old set until it replaces it)" if force else ")"))
    try:
        build = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=meta))
    except OSError as e:
        e.filename = None
        raise DuplexError(f"{meta}: cannot write in the meta-dir: "
                          f"{describe_oserror(e)}") from None
    try:
        try:
            md = create_metadata(build, resource.name, node.name, size, resource.track_size,
                                 assume_clean, volumes=volumes)
            create_node_files(config, resource, node, md)
            for f in SET_FILES:
                if (build / f).exists():
                    fd = os.open(build / f, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        except OSError as e:
            e.filename = e.filename2 = None  # names inside the build mean nothing
            raise DuplexError(f"{meta}: cannot create the metadata set: "
                              f"{describe_oserror(e)}") from None
        except DuplexError as e:
            # Name the files where they were going, not their build names.
            what = str(e).replace(str(build), str(meta))
            raise DuplexError(f"{meta}: cannot create the metadata set: {what}") from None
        _swap_in(build, meta)
    finally:
        _remove_tree(build)
    md.meta_dir = meta
    return md


def _swap_in(build: Path, meta: Path) -> None:
    """Move the set in *build* into *meta*: each old file aside (into
    *build*, as ``old.NAME``), then the new one in; metadata.json last.
    Any failure puts the old files back."""
    moved: list[tuple[Path, Path]] = []  # (from, to), to undo in reverse
    try:
        old_md = meta / "metadata.json"
        if old_md.exists():  # first: from here on the old set no longer counts
            os.rename(old_md, build / "old.metadata.json")
            moved.append((old_md, build / "old.metadata.json"))
        for f in SET_FILES:
            new, dest = build / f, meta / f
            if not new.exists():
                continue
            if dest.exists() and f != "metadata.json":
                os.rename(dest, build / f"old.{f}")
                moved.append((dest, build / f"old.{f}"))
            os.rename(new, dest)
            moved.append((new, dest))
        _fsync_dir(meta)
    except OSError as e:
        for src, dst in reversed(moved):
            try:
                os.rename(dst, src)
            except OSError:
                log.error("create-md: could not move %s back to %s", dst, src)
        raise DuplexError(f"{meta}: cannot put the new metadata set in place: "
                          f"{e.strerror}; the old set is kept") from None


def create_node_files(config: Config, resource: Resource, node: Node, md: Metadata) -> None:
    """Make the OOS bitmap, activity log and journal of a new node. Without
    --assume-clean every track starts out of sync (a full sync is owed)."""
    paths = md.paths
    uuid = bytes.fromhex(md.node_uuid)
    nbits = (md.device_size + md.track_size - 1) // md.track_size
    try:
        bm = Bitmap.create(str(paths.bitmap), uuid, md.track_size, nbits)
        if md.needs_initial_sync:
            bm.set_range(0, md.device_size)
        bm.close()
        ActivityLog.create(str(paths.activity_log), uuid, resource.al_extent_size,
                           resource.al_extents).close()
    except CoreError as e:
        raise DuplexError(str(e)) from None
    Journal.create(str(paths.journal), uuid, resource.journal_size).close()


def setup_logging(resource: str | None = None, node: str | None = None) -> None:
    """Log lines on stderr, as tests and terminals read them; under systemd
    (stderr is the journal) records with DUPLEX_RESOURCE/DUPLEX_NODE fields."""
    from replicator.journallog import use_journal

    logging.basicConfig(level=os.environ.get("DUPLEX_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    use_journal(resource, node)


def metadata_is_fresh(md: Metadata) -> bool:
    """True while the metadata was never used in either role: no seq was
    ever reserved (a primary reserves one when it starts), no peer was ever
    met (a secondary records it at the first handshake), no generation was
    left behind (promote). Only then may ``up --role`` choose the role."""
    return (md.seq_hwm == 0 and md.peer_node_uuid is None and not md.history
            and md.bitmap_uuid is None)


def resolve_role(md: Metadata, role: str | None, record: bool = True) -> str:
    """The role ``duplex up`` starts in: the metadata's. *role* (``--role``)
    must agree with it, except on fresh metadata (just made by create-md),
    where it decides and is recorded (saved, unless not *record*). Raises
    DuplexError naming promote/demote when they disagree."""
    if role is None:
        return md.role
    try:
        wanted = {"primary": ROLE_PRIMARY, "secondary": ROLE_SECONDARY}[role]
    except KeyError:
        raise DuplexError(f"--role {role!r} is not a role (primary or secondary)") from None
    if wanted == md.role:
        return wanted
    if metadata_is_fresh(md):
        if record:
            with md.update():
                md.role = wanted
        return wanted
    how = (f"`duplex promote {md.resource}` makes a Secondary Primary"
           if wanted == ROLE_PRIMARY else
           f"`duplex demote {md.resource}` makes a stopped Primary Secondary")
    raise DuplexError(
        f"{md.resource}: --role {role} disagrees with the metadata of node {md.node}, "
        f"which is {md.role} (in {md.paths.metadata}); the role lives in the metadata "
        f"once a node has been used: {how}. Run `duplex up {md.resource}` without --role "
        f"to start it as {md.role}")


def plugin_env() -> dict[str, str]:
    """nbdkit embeds /usr/bin/python3: give it this checkout and the
    virtualenv's site-packages (DESIGN §10)."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def nbdkit_command(config: Config, resource: Resource, node: Node,
                   history: str | None = None, threads: str | None = None) -> list[str]:
    """The nbdkit command line serving *node*'s export through our plugin."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise DuplexError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    argv = [nbdkit, "-f", "--exit-with-parent", *node.export.nbdkit_args(), "python", str(PLUGIN),
            f"config={config.path}", f"resource={resource.name}", f"node={node.name}"]
    if history:
        argv.append(f"history={history}")
    modes = resource.modes
    if not threads and (modes.waits_for or modes.on_congestion == "block"
                        or modes.max_lag_s is not None):
        # Writes that wait (for the peer, for room, max-lag) must wait side by side:
        # serialised, each would wait alone (no group commit) and hold up
        # every read and every new connection meanwhile.
        threads = "parallel"
    if threads:
        argv.append(f"threads={threads}")
    return argv


def _wait_for_signal(wake: threading.Event | None = None,
                     tick: Callable[[], None] | None = None) -> int | None:
    """Block until SIGTERM/SIGINT (returns the signal) or until *wake* is
    set by another thread (returns None); *tick* runs about once a second."""
    wake = wake or threading.Event()
    got: list[int] = []

    def handler(signum, frame):
        got.append(signum)
        wake.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)
    while not wake.wait(1.0):
        if tick is not None:
            tick()
    return got[0] if got else None


def _notify_when_serving(proc: subprocess.Popen, pidfile: Path, resource: Resource,
                         node: Node, timeout: float = 120.0) -> None:
    """READY=1 once nbdkit accepts on the export: nbdkit writes its -P
    pidfile only after its sockets listen and the plugin is loaded."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if pidfile.read_text().strip():
                notify.ready(f"Primary: serving {node.export_uri()}")
                log.info("%s: primary ready: serving %s", resource.name, node.export_uri())
                return
        except (FileNotFoundError, UnicodeDecodeError):  # not there, or being written
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        log.warning("%s: nbdkit did not get ready within %.0f s", resource.name, timeout)


def _startup_error(fd: int) -> str | None:
    """The one-line error the plugin wrote to its error pipe before nbdkit
    exited (None if it wrote none). Read after nbdkit is gone: EOF then."""
    chunks = []
    while True:
        try:
            b = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    return text.splitlines()[-1] if text else None


def run_primary(config: Config, resource: Resource, node: Node,
                lock_fd: int | None = None) -> int:
    """nbdkit with the plugin, in the foreground, until SIGTERM/SIGINT.

    *lock_fd* is the node's daemon lock (held by ``run_up``): nbdkit
    inherits it, so the plugin serves under it and nothing else can take
    the node meanwhile. Only because it is held are the export socket and
    pid file below known to be stale leftovers, safe to remove. A startup
    error of the plugin comes back through a pipe and is raised as one
    DuplexError line."""
    if node.export.kind == "unix":
        Path(node.export.path).parent.mkdir(parents=True, exist_ok=True)
        Path(node.export.path).unlink(missing_ok=True)
    pidfile = Path(node.meta_dir) / NBDKIT_PIDFILE
    pidfile.unlink(missing_ok=True)
    argv = nbdkit_command(config, resource, node, os.environ.get("DUPLEX_HISTORY"),
                          os.environ.get("DUPLEX_THREADS"))
    argv[1:1] = ["-P", str(pidfile)]
    log.info("%s: starting primary: %s", resource.name, " ".join(argv))
    env = plugin_env()
    env.pop("NOTIFY_SOCKET", None)  # readiness is ours to report, not nbdkit's
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(err_r, False)
    env[STARTUP_ERROR_FD_ENV] = str(err_w)
    pass_fds = [err_w]
    if lock_fd is not None:
        from replicator.control import LOCK_FD_ENV
        env[LOCK_FD_ENV] = str(lock_fd)
        pass_fds.append(lock_fd)
    notify.status("Primary: starting nbdkit")
    try:
        proc = subprocess.Popen(argv, env=env, pass_fds=pass_fds)
    finally:
        os.close(err_w)

    # SIGTERM/SIGINT: a stop bounded by drain-timeout that says what it
    # waits for (clients, the attached device, its mount): exportuse.py.
    from replicator.exportuse import PrimaryStop, reattach_when_serving
    stop = PrimaryStop(proc, resource, node)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop.on_signal)
    # Supervised: if it failed, READY=1 would never come (systemd would
    # kill a serving node at its start timeout) and nobody would know why.
    Supervisor(f"{resource.name} up").spawn(
        "duplex-ready", lambda: _notify_when_serving(proc, pidfile, resource, node))
    reattach_when_serving(config, resource, node, proc, pidfile)  # an attach left in place
    metrics = _serve_metrics(node, lambda: _primary_status(node, resource))
    rc = stop.wait()
    if metrics is not None:
        metrics.shutdown()
    pidfile.unlink(missing_ok=True)
    stop.report_stopped()
    startup_error = _startup_error(err_r)
    os.close(err_r)
    if startup_error:
        if node.export.kind == "unix":  # ours (we hold the lock); nbdkit was killed
            Path(node.export.path).unlink(missing_ok=True)
        notify.stopping(f"Primary: {startup_error}")
        raise DuplexError(startup_error)
    if rc != 0:
        log.error("%s: nbdkit exited with status %d", resource.name, rc)
        notify.stopping(f"Primary: nbdkit exited with status {rc}")
        return 1
    return 0


def _primary_status(node: Node, resource: Resource) -> dict:
    """The primary's status, from the engine inside nbdkit."""
    from replicator.control import request
    return request(node.meta_dir, "status", resource=resource.name, timeout=5)


def _serve_metrics(node: Node, status):
    """Serve Prometheus metrics when the node has metrics-address (the
    address was checked before ready); the server, or None."""
    if node.metrics_address is None:
        return None
    from replicator.metrics import serve
    try:
        return serve(node.metrics_address, status)
    except OSError as e:  # lost a race for the port since the check: say so, go on
        host, port = node.metrics_address
        log.error("metrics: cannot listen on %s:%d: %s; the node runs without metrics",
                  host, port, e.strerror)
        return None


def stop_running(resource: Resource, node: Node, timeout: float | None = None,
                 progress=None) -> str:
    """``duplex down``: SIGTERM to the process that runs the node (the one
    that holds its daemon lock: ``duplex up``), the same clean, bounded stop
    as ``systemctl stop``; wait until the lock is free. Returns what
    happened, in words; DuplexError when it does not stop in time."""
    from replicator.control import lock_holder

    pid = lock_holder(node.meta_dir)
    if pid is None:
        return f"{resource.name} is not running on node {node.name}: nothing to stop"
    if pid == 0:
        raise DuplexError(f"{resource.name}: a process holds {node.meta_dir}/daemon.lock but "
                          f"did not write its pid: stop it by hand")
    if timeout is None:
        timeout = resource.drain_timeout_s + 20.0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"{resource.name}: pid {pid} was already gone"
    except PermissionError:
        raise DuplexError(f"{resource.name}: not allowed to signal pid {pid} "
                          f"(run as root)") from None
    start = time.monotonic()
    next_note = start + 2.0
    while lock_holder(node.meta_dir) is not None:
        now = time.monotonic()
        if now - start > timeout:
            raise DuplexError(f"{resource.name}: pid {pid} is still running {timeout:g} s "
                              f"after SIGTERM; its log says what it waits for "
                              f"(kill -9 {pid} is the last resort: a crash stop)")
        if progress is not None and now >= next_note:
            next_note = now + 5.0
            progress(f"{resource.name}: waiting for pid {pid} to stop ({now - start:.0f} s)")
        time.sleep(0.1)
    return f"{resource.name}: node {node.name} stopped (pid {pid}, {time.monotonic() - start:.1f} s)"


def _join_control_clients(sec, timeout: float) -> None:
    """Let control clients still being answered (the promote reply) finish:
    their threads end when the client has read its reply and hung up."""
    deadline = time.monotonic() + timeout
    name = f"{sec.control.name}-client"
    for t in threading.enumerate():
        if t.name == name and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


def run_secondary(config: Config, resource: Resource, node: Node) -> int:
    """The receiver, applier and journal, until SIGTERM/SIGINT -- or until
    it is promoted, when it returns EXIT_PROMOTED so that the node is
    started again, as primary."""
    from replicator.promote import DEFAULT_TIMEOUT, promote_running
    from replicator.secondary.daemon import Secondary

    sec = Secondary.open(config.path, resource.name, node.name)
    promoted = threading.Event()
    wake = threading.Event()  # promoted, or the node cannot go on without a restart

    def promote(force: bool = False, timeout_s: float = DEFAULT_TIMEOUT,
                group: bool = False, wait_s: float = 0.0) -> dict:
        reply = promote_running(sec, force, float(timeout_s), bool(group), float(wait_s))
        # The unit (RestartForceExitStatus=75) starts it again: promote says so.
        reply["restarted_by"] = notify.systemd_unit()
        report = reply.get("loss_report") or {}
        events.emit("promote", node=node.name, forced=",".join(reply.get("forced") or ()) or "no",
                    consistent_through_seq=reply.get("consistent_through_seq"),
                    lost_writes=sum(int(w.get("count", 1)) for w in report.get("lost") or ()))
        promoted.set()
        wake.set()
        return reply

    sec.control.add_handler("promote", promote)
    events, handlers = _secondary_events(sec, resource, node)
    sec.start()
    events.start(spawn=lambda name, fn: sec.sup.spawn(name, fn, restart=True))
    metrics = _serve_metrics(node, sec.status)
    notify.ready(f"Secondary: listening on {node.address_str()}")
    last_status = [0.0]

    def tick() -> None:
        if sec.restart_needed:  # exit non-zero: systemd (Restart=on-failure) restarts it
            wake.set()
            return
        # systemctl status shows where replication stands, every few seconds.
        if not os.environ.get("NOTIFY_SOCKET") or time.monotonic() - last_status[0] < 5:
            return
        last_status[0] = time.monotonic()
        st = sec.status()
        notify.status(f"Secondary: {st['connection']}, disk {st['disk']}, applied through "
                      f"seq {st['seq']['applied']}, lag {st['lag']['writes']} writes")

    try:
        sig = _wait_for_signal(wake, tick)
        if sig is None and not promoted.is_set():
            log.error("%s: stopping: %s", resource.name, sec.restart_needed)
            notify.stopping(f"Secondary: stopping to restart: {sec.restart_needed}")
        elif sig is None:
            unit = notify.systemd_unit()
            log.info("%s: promoted to Primary: the secondary stops; %s", resource.name,
                     f"{unit} restarts it as Primary" if unit else
                     f"start the node again (`duplex up {resource.name}`) to serve the image")
            notify.stopping("Secondary: promoted to Primary, restarting as Primary")
        else:
            log.info("%s: signal %d: stopping", resource.name, sig)
            notify.stopping("Secondary: stopping")
    finally:
        if metrics is not None:
            metrics.shutdown()
        handlers.stop()
        events.stop()
        sec.stop()
    if promoted.is_set():
        _join_control_clients(sec, 10.0)
        return EXIT_PROMOTED
    return 1 if sec.restart_needed else 0


def _secondary_events(sec, resource: Resource, node: Node):
    """The secondary's event source (``duplex events``, DESIGN §14) on its
    control socket, and the handlers run from it."""
    from replicator.events import EventSource
    from replicator.handlers import HandlerRunner

    events = EventSource(sec.status, lag_threshold=resource.handlers.lag_threshold_s)
    sec.control.add_stream("events", events.serve)
    return events, HandlerRunner(resource.handlers, node.name,
                                 resource.peer_of(node.name).name, events)


def run_up(config: Config, resource: Resource, node: Node, role: str | None) -> int:
    """``duplex up RES [--role R]``: run this node's side in the foreground,
    in the role its metadata holds (see :func:`resolve_role`)."""
    from replicator.control import NodeLock

    setup_logging(resource.name, node.name)
    # The lock first: a second `up` must not touch the running one's files.
    lock = NodeLock(node.meta_dir, resource.name)
    try:
        md = load_metadata(node.meta_dir, resource.name, node.name)
        # Refuse a wrong --role first, check what up needs, only then record.
        primary = resolve_role(md, role, record=False) == ROLE_PRIMARY
        check_before_ready(config, resource, node, md, primary=primary)
        if resolve_role(md, role) == ROLE_PRIMARY:
            rc = run_primary(config, resource, node, lock.fd)
            if rc != 0 or load_metadata(node.meta_dir, resource.name,
                                        node.name).role != ROLE_SECONDARY:
                return rc
            # `duplex secondary` handed over and demoted the engine, then
            # stopped nbdkit (DESIGN §7): the node carries on as secondary,
            # still under this lock, as DRBD's does.
            log.info("%s: handed over: continuing as secondary", resource.name)
            notify.status("Primary handed over: starting as Secondary")
        return run_secondary(config, resource, node)
    finally:
        lock.release()


# --------------------------------------------------------------------------
# up: check what it will need before it says ready

#: Room ``up`` wants free in the meta-dir: metadata saves, the loss report,
#: the lock file. (The journal and bitmaps are preallocated by create-md.)
UP_MIN_FREE = 1 << 20


def _read_secret(resource: Resource) -> bytes:
    """The resource's secret, checked as both roles check it at every
    handshake (config.read_secret: present, 0600, not empty)."""
    return resource.secret()


def _check_bindable(host: str, port: int, what: str) -> None:
    """DuplexError naming *what* unless (host, port) can be bound now."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DuplexError(f"{what}: cannot resolve {host}: {e.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DuplexError(f"{what}: another process listens there already "
                                  f"(`ss -ltnp` names it): stop it, or change the port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise DuplexError(f"{what}: not an address of this host: correct the "
                                  f"config, or run on the host that has it") from None
            raise DuplexError(f"{what}: cannot listen: {e.strerror}") from None


def _check_meta_dir_writable(meta: Path) -> None:
    """Write, sync and remove a probe file in the meta-dir: read-only and
    full filesystems fail here, naming the directory, not later."""
    probe = meta / f".up-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        e.filename = None  # the probe's name means nothing to the user
        raise DuplexError(f"{meta}: cannot write in the meta-dir: "
                          f"{describe_oserror(e)}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def check_before_ready(config: Config, resource: Resource, node: Node, md: Metadata,
                       primary: bool) -> None:
    """Everything ``up`` will need, checked before anything starts (so
    before READY=1): meta-dir writable with room, the device there and of
    the metadata's size (each volume's), the secret file, the address it listens on
    (secondary) or the export (primary). Raises DuplexError with one line
    naming the file, path or key. *primary*: the role it is to start in."""
    meta = Path(node.meta_dir)
    _check_meta_dir_writable(meta)
    check_meta_dir_room(meta, UP_MIN_FREE, "`duplex up`")
    # Every volume's device, each of the size the metadata recorded.
    check_volumes(resource, node, md.volumes, str(md.paths.metadata),
                  fix=f"give the device back its size, or run `duplex create-md "
                      f"{resource.name} --force` (discards the replication state; a full "
                      f"sync follows)")
    _read_secret(resource)
    key = f"{resource.config_path}: resource.{resource.name}.on.{node.name}"
    if primary:
        if node.export.kind == "tcp":
            _check_bindable(node.export.host, node.export.port,
                            f"{key}.export: {node.export}")
        else:
            parent = Path(node.export.path).parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DuplexError(f"{key}.export: cannot create {parent}: {e.strerror}") from None
    else:
        host, port = node.address
        _check_bindable(host, port, f"{key}.address: {node.address_str()}")
    if node.metrics_address is not None:
        host, port = node.metrics_address
        _check_bindable(host, port, f"{key}.metrics-address: {host}:{port}")

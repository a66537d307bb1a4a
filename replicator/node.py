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
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Callable

from replicator import notify
from replicator.config import Config, Node, Resource
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import CoreError
from replicator.errors import DuplexError
from replicator.secondary.journal import Journal
from replicator.metadata import ROLE_PRIMARY, ROLE_SECONDARY, Metadata, load_metadata

log = logging.getLogger("duplex")

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN = REPO_ROOT / "nbdplugin" / "plugin.py"
NBDKIT_PIDFILE = "nbdkit.pid"  # in the meta-dir: written by nbdkit when it serves

#: ``duplex up`` exits with this after its secondary was promoted: the node
#: must be started again, now as primary (systemd: RestartForceExitStatus).
#: 75 is EX_TEMPFAIL, "try again".
EXIT_PROMOTED = 75


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


def setup_logging() -> None:
    """Log lines on stderr, as the systemd journal and tests read them."""
    logging.basicConfig(level=os.environ.get("DUPLEX_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def metadata_is_fresh(md: Metadata) -> bool:
    """True while the metadata was never used in either role: no seq was
    ever reserved (a primary reserves one when it starts), no peer was ever
    met (a secondary records it at the first handshake), no generation was
    left behind (promote). Only then may ``up --role`` choose the role."""
    return (md.seq_hwm == 0 and md.peer_node_uuid is None and not md.history
            and md.bitmap_uuid is None)


def resolve_role(md: Metadata, role: str | None) -> str:
    """The role ``duplex up`` starts in: the metadata's. *role* (``--role``)
    must agree with it, except on fresh metadata (just made by create-md),
    where it decides and is recorded. Raises DuplexError naming
    promote/demote when they disagree."""
    if role is None:
        return md.role
    try:
        wanted = {"primary": ROLE_PRIMARY, "secondary": ROLE_SECONDARY}[role]
    except KeyError:
        raise DuplexError(f"--role {role!r} is not a role (primary or secondary)") from None
    if wanted == md.role:
        return wanted
    if metadata_is_fresh(md):
        md.role = wanted
        md.save()
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
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        log.warning("%s: nbdkit did not get ready within %.0f s", resource.name, timeout)


def run_primary(config: Config, resource: Resource, node: Node) -> int:
    """nbdkit with the plugin, in the foreground, until SIGTERM/SIGINT."""
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
    notify.status("Primary: starting nbdkit")
    proc = subprocess.Popen(argv, env=env)

    def forward(signum, frame):
        notify.stopping("Primary: stopping")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    threading.Thread(target=_notify_when_serving, args=(proc, pidfile, resource, node),
                     name="duplex-ready", daemon=True).start()
    rc = proc.wait()
    pidfile.unlink(missing_ok=True)
    if rc != 0:
        log.error("%s: nbdkit exited with status %d", resource.name, rc)
        notify.stopping(f"Primary: nbdkit exited with status {rc}")
        return 1
    return 0


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
    from replicator.promote import promote_running
    from replicator.secondary.daemon import Secondary

    sec = Secondary.open(config.path, resource.name, node.name)
    promoted = threading.Event()

    def promote(force: bool = False) -> dict:
        reply = promote_running(sec, force)
        promoted.set()
        return reply

    sec.control.add_handler("promote", promote)
    sec.start()
    notify.ready(f"Secondary: listening on {node.address_str()}")
    last_status = [0.0]

    def tick() -> None:
        # systemctl status shows where replication stands, every few seconds.
        if not os.environ.get("NOTIFY_SOCKET") or time.monotonic() - last_status[0] < 5:
            return
        last_status[0] = time.monotonic()
        st = sec.status()
        notify.status(f"Secondary: {st['connection']}, disk {st['disk']}, applied through "
                      f"seq {st['seq']['applied']}, lag {st['lag']['writes']} writes")

    try:
        sig = _wait_for_signal(promoted, tick)
        if sig is None:
            log.info("%s: promoted to Primary: the secondary stops; start the node again "
                     "(`duplex up %s`) to serve the image", resource.name, resource.name)
            notify.stopping("Secondary: promoted to Primary, restarting as Primary")
        else:
            log.info("%s: signal %d: stopping", resource.name, sig)
            notify.stopping("Secondary: stopping")
    finally:
        sec.stop()
    if promoted.is_set():
        _join_control_clients(sec, 10.0)
        return EXIT_PROMOTED
    return 0


def run_up(config: Config, resource: Resource, node: Node, role: str | None) -> int:
    """``duplex up RES [--role R]``: run this node's side in the foreground,
    in the role its metadata holds (see :func:`resolve_role`)."""
    setup_logging()
    md = load_metadata(node.meta_dir, resource.name, node.name)
    if resolve_role(md, role) == ROLE_PRIMARY:
        return run_primary(config, resource, node)
    return run_secondary(config, resource, node)

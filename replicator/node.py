"""Running one node's side of a resource: ``duplex up`` and the files
``duplex create-md`` makes.

The primary runs inside nbdkit (our plugin in front of the device); this
module starts nbdkit with the right interpreter path and forwards signals.
The secondary runs in this process.
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
from pathlib import Path

from replicator.config import Config, Node, Resource
from replicator.core import ActivityLog, Bitmap, CoreError
from replicator.errors import DuplexError
from replicator.journal import Journal
from replicator.metadata import ROLE_PRIMARY, ROLE_SECONDARY, Metadata, load_metadata

log = logging.getLogger("duplex")

REPO_ROOT = Path(__file__).resolve().parent.parent
PLUGIN = REPO_ROOT / "nbdplugin" / "plugin.py"


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


def _role_of(md: Metadata, role: str | None) -> str:
    wanted = {"primary": ROLE_PRIMARY, "secondary": ROLE_SECONDARY, None: md.role}[role]
    if wanted != md.role:
        md.role = wanted
        md.save()
    return wanted


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


def _wait_for_signal() -> int:
    stop = threading.Event()
    got: list[int] = []

    def handler(signum, frame):
        got.append(signum)
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)
    while not stop.wait(1.0):
        pass
    return got[0]


def run_primary(config: Config, resource: Resource, node: Node) -> int:
    """nbdkit with the plugin, in the foreground, until SIGTERM/SIGINT."""
    if node.export.kind == "unix":
        Path(node.export.path).parent.mkdir(parents=True, exist_ok=True)
        Path(node.export.path).unlink(missing_ok=True)
    argv = nbdkit_command(config, resource, node, os.environ.get("DUPLEX_HISTORY"),
                          os.environ.get("DUPLEX_THREADS"))
    log.info("%s: starting primary: %s", resource.name, " ".join(argv))
    proc = subprocess.Popen(argv, env=plugin_env())

    def forward(signum, frame):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    rc = proc.wait()
    if rc != 0:
        log.error("%s: nbdkit exited with status %d", resource.name, rc)
        return 1
    return 0


def run_secondary(config: Config, resource: Resource, node: Node) -> int:
    """The receiver, applier and journal, until SIGTERM/SIGINT."""
    from replicator.secondary import Secondary

    sec = Secondary.open(config.path, resource.name, node.name)
    sec.start()
    try:
        sig = _wait_for_signal()
        log.info("%s: signal %d: stopping", resource.name, sig)
    finally:
        sec.stop()
    return 0


def run_up(config: Config, resource: Resource, node: Node, role: str | None) -> int:
    """``duplex up RES [--role R]``: run this node's side in the foreground."""
    setup_logging()
    md = load_metadata(node.meta_dir, resource.name, node.name)
    if _role_of(md, role) == ROLE_PRIMARY:
        return run_primary(config, resource, node)
    return run_secondary(config, resource, node)

"""``duplex attach`` / ``duplex detach``: give the user a block device for
this node's NBD export, and take it away again.

Two ways, chosen by what the kernel has:

* kernel nbd (``/sys/module/nbd`` or ``/dev/nbd0`` exists, and
  ``nbd-client`` is installed): ``nbd-client`` connects a free
  ``/dev/nbdX`` to the export;
* otherwise FUSE: ``nbdfuse RUN/<res>/fuse/nbd URI`` presents the export as
  a file, and ``losetup --find --show`` puts a loop device on that file.

What was set up is recorded in ``meta-dir/attach.json``, so ``detach`` can
undo exactly that: ``losetup -d``, ``fusermount3 -u`` (which makes nbdfuse
exit; it is killed only if it does not), or ``nbd-client -d``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from replicator.config import DEFAULT_RUN_DIR, Config, Node, Resource
from replicator.errors import DuplexError
from replicator.metadata import MetaPaths

WAIT_S = 10.0  # how long to wait for nbdfuse / loop devices to settle


class AttachError(DuplexError):
    """Attaching or detaching the export's block device failed."""


def _run(argv: list[str], what: str, timeout: float = 30.0) -> str:
    """Run a helper program; its stdout, or AttachError with its stderr."""
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
    except FileNotFoundError:
        raise AttachError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise AttachError(f"{what}: {' '.join(argv)} did not finish within {timeout:g}s") from None
    if p.returncode != 0:
        raise AttachError(f"{what}: {' '.join(argv)} failed: {p.stderr.strip() or p.returncode}")
    return p.stdout


def kernel_has_nbd() -> bool:
    """Whether the kernel has the nbd driver (loaded, or its devices exist)."""
    return os.path.exists("/sys/module/nbd") or os.path.exists("/dev/nbd0")


def choose_method() -> str:
    """``"nbd"`` when the kernel driver and nbd-client are there, else ``"fuse"``."""
    return "nbd" if kernel_has_nbd() and shutil.which("nbd-client") else "fuse"


def check_export(uri: str, resource: str, node: str) -> int:
    """Connect to the export once; its size, or AttachError saying it is not served."""
    try:
        import nbd  # libnbd's Python binding (python3-libnbd)
    except ImportError:  # pragma: no cover - installed with libnbd
        raise AttachError("the Python libnbd binding (python3-libnbd) is not installed") from None
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        size = h.get_size()
        h.shutdown()
    except nbd.Error as e:
        raise AttachError(
            f"nothing serves the export {uri} of resource {resource} on node {node} "
            f"({e.string}); is `duplex up {resource}` running here as primary?"
        ) from None
    return size  # the handle closes when it is collected


def _record_path(node: Node) -> Path:
    return MetaPaths(node.meta_dir).attach


def _read_record(node: Node) -> dict[str, Any] | None:
    path = _record_path(node)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AttachError(f"{path}: cannot read the attach record: {e}") from None


def _write_record(node: Node, record: dict[str, Any]) -> None:
    path = _record_path(node)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def _loop_backing_file(device: str) -> str | None:
    """The file behind loop *device*, or None when it is not set up."""
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _nbd_connected(device: str) -> bool:
    return os.path.exists(f"/sys/block/{os.path.basename(device)}/pid")


def _record_is_live(record: dict[str, Any]) -> bool:
    if record.get("method") == "nbd":
        return _nbd_connected(record["device"])
    return _loop_backing_file(record["device"]) == record.get("fuse_file")


def _mounted_at(device: str) -> str | None:
    """Where *device* is mounted, if anywhere (by device number)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return None
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == want:
                return fields[4]
    return None


def _pid_alive(pid: int) -> bool:
    try:
        # Reap it if it is our child (tests run attach and detach in one process).
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":  # exited since the waitpid above: reap it if ours
        try:
            # Blocking: a multi-threaded leader shows Z before its threads
            # are gone, and WNOHANG would not reap it yet.
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return False
    return True


def _is_nbdfuse(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0) == b"nbdfuse"


def _wait(cond, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# --------------------------------------------------------------------------
# attach


def _attach_nbd(uri: str, node: Node) -> dict[str, Any]:
    exp = node.export
    for dev in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
        if (dev / "pid").exists():
            continue
        device = f"/dev/{dev.name}"
        if exp.kind == "unix":
            argv = ["nbd-client", "-unix", str(exp.path), device]
        else:
            argv = ["nbd-client", str(exp.host), str(exp.port), device]
        _run(argv, f"connecting {device} to {uri}")
        return {"method": "nbd", "device": device, "uri": uri}
    raise AttachError("no free /dev/nbdX device (all are connected)")


def _attach_fuse(uri: str, resource: Resource, run_dir: Path) -> dict[str, Any]:
    for tool in ("nbdfuse", "losetup", "fusermount3"):
        if not shutil.which(tool):
            raise AttachError(f"{tool} is not installed (needed to attach without kernel nbd)")
    base = run_dir / resource.name
    mount_dir = base / "fuse"
    fuse_file = mount_dir / "nbd"
    pidfile = base / "nbdfuse.pid"
    logfile = base / "nbdfuse.log"
    mount_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.path.ismount(mount_dir):
        # Left behind by a crash (we hold no record of it): unmount first.
        _run(["fusermount3", "-u", str(mount_dir)], f"unmounting stale {mount_dir}")
    pidfile.unlink(missing_ok=True)
    with open(logfile, "wb") as log:
        # Own session: nbdfuse must outlive this command and its terminal.
        proc = subprocess.Popen(
            ["nbdfuse", "-P", str(pidfile), str(fuse_file), uri],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )

    def ready() -> bool:
        return pidfile.exists() and os.path.ismount(mount_dir) and fuse_file.exists()

    if not _wait(lambda: ready() or proc.poll() is not None) or not ready():
        err = logfile.read_text(errors="replace").strip()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", "-q", str(mount_dir)], capture_output=True)
            raise AttachError(f"nbdfuse did not present {fuse_file} within {WAIT_S:g}s: {err}")
        raise AttachError(f"nbdfuse could not attach {uri}: {err or f'exit {proc.returncode}'}")
    try:
        # Direct I/O: no second page cache between the loop device and the
        # export, so a write reaches nbdkit (and the replication stream) when
        # it completes, and flushes mean what they say.
        device = _run(["losetup", "--find", "--show", "--direct-io=on", str(fuse_file)],
                      f"setting up a loop device on {fuse_file}").strip()
    except AttachError:
        subprocess.run(["fusermount3", "-u", str(mount_dir)], capture_output=True)
        _wait(lambda: proc.poll() is not None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return {"method": "fuse", "device": device, "uri": uri, "mount_dir": str(mount_dir),
            "fuse_file": str(fuse_file), "nbdfuse_pid": proc.pid}


def attach(config: Config, resource: Resource, node: Node, *,
           run_dir: str | os.PathLike = DEFAULT_RUN_DIR, method: str | None = None) -> str:
    """Give a block device for *node*'s export; return its path.

    *method* is ``"nbd"`` or ``"fuse"`` (default: :func:`choose_method`).
    Refuses when already attached, or when nothing serves the export.
    """
    record = _read_record(node)
    if record is not None:
        if _record_is_live(record):
            raise AttachError(
                f"resource {resource.name} is already attached as {record['device']} "
                f"(run `duplex detach {resource.name}` first)"
            )
        _undo(record, strict=False)  # stale leftovers of a crash or reboot
        _record_path(node).unlink(missing_ok=True)
    uri = node.export_uri()
    check_export(uri, resource.name, node.name)
    method = method or choose_method()
    if method == "nbd":
        record = _attach_nbd(uri, node)
    elif method == "fuse":
        record = _attach_fuse(uri, resource, Path(run_dir))
    else:
        raise AttachError(f"unknown attach method {method!r} (nbd or fuse)")
    record.update(resource=resource.name, node=node.name, created=time.time())
    _write_record(node, record)
    return record["device"]


# --------------------------------------------------------------------------
# detach


def _undo(record: dict[str, Any], strict: bool) -> None:
    """Tear down what *record* describes. With *strict*, a step that fails
    raises; otherwise (cleaning up stale state) it is skipped."""
    device = record.get("device", "")

    def step(fn) -> None:
        try:
            fn()
        except AttachError:
            if strict:
                raise

    if record.get("method") == "nbd":
        if _nbd_connected(device):
            step(lambda: _run(["nbd-client", "-d", device], f"disconnecting {device}"))
        return

    fuse_file, mount_dir = record.get("fuse_file"), record.get("mount_dir")
    if device and _loop_backing_file(device) == fuse_file:
        step(lambda: _run(["losetup", "-d", device], f"detaching {device}"))
        if not _wait(lambda: _loop_backing_file(device) != fuse_file) and strict:
            raise AttachError(f"{device} is still in use after losetup -d (who holds it open?)")
    if mount_dir and os.path.ismount(mount_dir):
        def unmount() -> None:
            # The loop driver may release the file a moment after losetup -d.
            for _ in range(40):
                p = subprocess.run(["fusermount3", "-u", mount_dir], capture_output=True, text=True)
                if p.returncode == 0 or not os.path.ismount(mount_dir):
                    return
                time.sleep(0.05)
            raise AttachError(f"fusermount3 -u {mount_dir} failed: {p.stderr.strip()}")
        step(unmount)
    pid = record.get("nbdfuse_pid")
    if pid and not _wait(lambda: not _pid_alive(pid), timeout=5.0) and _is_nbdfuse(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait(lambda: not _pid_alive(pid), timeout=5.0):
            os.kill(pid, signal.SIGKILL)
            _wait(lambda: not _pid_alive(pid), timeout=2.0)
    if mount_dir:
        try:
            os.rmdir(mount_dir)
        except OSError:
            pass


def detach(config: Config, resource: Resource, node: Node) -> str:
    """Undo :func:`attach`; return the device path that was detached.

    Refuses while the device is mounted.
    """
    record = _read_record(node)
    if record is None:
        raise AttachError(f"resource {resource.name} is not attached on node {node.name} "
                          f"(no {_record_path(node)})")
    device = record.get("device", "?")
    if _record_is_live(record):
        where = _mounted_at(device)
        if where:
            raise AttachError(f"{device} is mounted on {where}; unmount it first")
        holders = Path(f"/sys/block/{os.path.basename(device)}/holders")
        if holders.is_dir() and any(holders.iterdir()):
            raise AttachError(f"{device} is in use by {', '.join(p.name for p in holders.iterdir())}")
    _undo(record, strict=True)
    _record_path(node).unlink(missing_ok=True)
    return device


def fuse_base_dir(resource, node, run_dir=DEFAULT_RUN_DIR):  # TEMP shim: old layout
    return Path(run_dir) / resource.name


def is_mounted(path) -> bool:  # TEMP shim for the tests
    with open("/proc/self/mountinfo") as f:
        return any(l.split()[4] == os.path.realpath(path) for l in f)

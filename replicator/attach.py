"""``duplex attach`` / ``duplex detach``: give the user a block device for
this node's NBD export, and take it away again.

Two ways, chosen by what the kernel has:

* kernel nbd (``/sys/module/nbd`` or ``/dev/nbd0`` exists, and
  ``nbd-client`` is installed): ``nbd-client`` connects a free
  ``/dev/nbdX`` to the export;
* otherwise FUSE: ``nbdfuse RUN/<res>/<node>/fuse/nbd URI`` presents the
  export as a file, and ``losetup --find --show`` puts a loop device on that
  file. The directory is per node, so the two nodes of a resource can both
  be attached on one machine (the test lab, the demo).

What was set up is recorded in ``meta-dir/attach.json``, so ``detach`` can
undo exactly that: ``losetup -d``, ``fusermount3 -u`` (which makes nbdfuse
exit; it is killed only if it does not), or ``nbd-client -d``.

A FUSE mount whose nbdfuse is gone (it died, or exited when its server did)
stays mounted but dead: stat() on it fails with ENOTCONN, so
``os.path.ismount`` says False. Mounts are therefore looked up in
``/proc/self/mountinfo``, where a dead mount is still listed, and unmounted
with ``fusermount3 -u`` (``umount -l`` when that keeps failing). A mount that
another node's attach record describes is never touched.

A record whose device no longer reaches the export (nbdfuse exits with
its server) is dead: ``attach`` replaces it, and ``duplex up`` does once
nbdkit serves again (:func:`reattach`), unless the dead device is still
mounted or held. Attach, detach and that re-attach of one node take turns
under a flock on its meta-dir.

Volumes (DESIGN §8): a resource with volume tables has one export per
volume, named by it; each is attached on its own device with its own
record, ``meta-dir/attach-NAME.json``, and (FUSE) its own directory
``RUN/<res>/<node>/<volume>``. ``attach_volumes`` attaches every volume
(or the one named) and ``detach_volumes`` detaches them; a failure part
way gives back the devices that call attached. A plain-``device``
resource keeps ``attach.json``, ``RUN/<res>/<node>`` and the default
export, exactly as before; :func:`attach` and :func:`detach` are its
one-volume face. ``has_record``, ``describe_attach`` and ``reattach``
(``duplex up``) cover every volume of the node.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from replicator.config import DEFAULT_RUN_DIR, Config, Node, Resource, Volume
from replicator.devices import check_not_in_use, holders
from replicator.errors import DuplexError
from replicator.metadata import MetaPaths
from replicator.volumes import volume_uri

WAIT_S = 10.0  # how long to wait for nbdfuse / loop devices to settle


class AttachError(DuplexError):
    """Attaching or detaching the export's block device failed."""


def _os_error_text(e: OSError) -> str:
    """``PATH: reason`` for an OSError (no errno number, no repr quotes)."""
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename else reason


@contextmanager
def _os_step(what: str) -> Iterator[None]:
    """Turn an OSError in the block into AttachError saying *what* failed."""
    try:
        yield
    except OSError as e:
        if e.filename and e.filename in what:
            raise AttachError(f"{what}: {e.strerror or e}") from None
        raise AttachError(f"{what}: {_os_error_text(e)}") from None


def fuse_base_dir(resource: Resource, node: Node,
                  run_dir: str | os.PathLike | None = None, vol: Volume | None = None) -> Path:
    """Where the FUSE attach of *node* keeps its mount (``fuse/``), nbdfuse's
    pid file and log: ``RUN/<resource>/<node>``, and ``.../<volume>`` for
    each volume of a resource with volume tables. Per node, so that two
    nodes of one resource on one machine never share (or unmount) each
    other's."""
    base = Path(DEFAULT_RUN_DIR if run_dir is None else run_dir) / resource.name / node.name
    return base / vol.name if vol is not None and node.multi_volume else base


def select_volumes(resource: Resource, node: Node, name: str | None) -> list[Volume]:
    """Every volume of *node* (config order), or the one called *name*;
    AttachError naming the volumes there are when there is none of that name."""
    if name is None:
        return list(node.volumes)
    for v in node.volumes:
        if v.name == name:
            return [v]
    raise AttachError(f"resource {resource.name} has no volume {name!r} on node {node.name} "
                      f"(its volumes: {', '.join(v.name for v in node.volumes)})")


def _label(node: Node, vol: Volume) -> str:
    """What messages add after "resource r0" to name a volume: " volume data"
    with volume tables, nothing for a plain-``device`` resource."""
    return f" volume {vol.name}" if node.multi_volume else ""


def _unescape_mount_field(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return s.encode().decode("unicode_escape") if "\\" in s else s


def _mount_points() -> list[str]:
    """Every mount point this process sees (also dead FUSE mounts)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [_unescape_mount_field(line.split()[4]) for line in f]


def is_mounted(path: str | os.PathLike) -> bool:
    """Whether something is mounted on *path*, also a dead FUSE mount (which
    ``os.path.ismount`` misses: stat() on it fails with ENOTCONN)."""
    # realpath does not fail on a dead mount: it only lstat()s, ignoring errors.
    return os.path.realpath(path) in _mount_points()


def _unmount(mount_dir: str) -> None:
    """Unmount the FUSE mount *mount_dir*, live or dead; AttachError if it stays.

    ``fusermount3 -u`` is retried for a moment (the loop driver may release
    the file just after ``losetup -d``); if the mount still stays, ``umount
    -l`` takes it out of the tree, and the kernel drops it once its last user
    lets go. Callers make sure no loop device of ours still uses it."""
    err = ""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            p = subprocess.run(["fusermount3", "-u", mount_dir], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=30)
            err = p.stderr.strip() or f"exit {p.returncode}"
        except FileNotFoundError:
            err = "fusermount3 is not installed"
        except subprocess.TimeoutExpired:
            err = "did not finish within 30s"
        if not is_mounted(mount_dir):
            return
        if time.monotonic() >= deadline or "not installed" in err:
            break
        time.sleep(0.05)
    try:
        p = subprocess.run(["umount", "-l", mount_dir], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        lazy_err = p.stderr.strip() or f"exit {p.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        lazy_err = str(e)
    if is_mounted(mount_dir):
        raise AttachError(f"cannot unmount {mount_dir}: fusermount3 -u: {err}; "
                          f"umount -l: {lazy_err}")


def _unmount_quietly(mount_dir: str) -> None:
    """:func:`_unmount` while already failing: keep the first error."""
    try:
        _unmount(mount_dir)
    except AttachError:
        pass


def _loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is *path*."""
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        device = f"/dev/{entry.name}"
        if _loop_backing_file(device) == path:
            found.append(device)
    return found


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


def _record_path(node: Node, vol: Volume | None = None) -> Path:
    """attach.json, or attach-NAME.json for volume NAME of a resource with
    volume tables (*vol* None: the node's first volume)."""
    paths = MetaPaths(node.meta_dir)
    if not node.multi_volume:
        return paths.attach
    vol = vol or node.volumes[0]
    return paths.meta_dir / f"attach-{vol.name}.json"


def _read_record(node: Node, vol: Volume | None = None) -> dict[str, Any] | None:
    path = _record_path(node, vol)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AttachError(f"{path}: cannot read the attach record: "
                          f"{e.strerror or e}") from None
    except ValueError as e:
        raise AttachError(f"{path}: cannot read the attach record: {e}") from None
    if (not isinstance(record, dict) or record.get("method") not in ("nbd", "fuse")
            or not isinstance(record.get("device"), str)):
        raise AttachError(f"{path}: not an attach record (it needs \"method\": \"nbd\" "
                          f"or \"fuse\" and a \"device\"); remove it if nothing is attached")
    return record


def _write_record(node: Node, record: dict[str, Any], vol: Volume | None = None) -> None:
    path = _record_path(node, vol)
    tmp = path.with_name(path.name + ".tmp")
    with _os_step(f"writing the attach record {path}"):
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)


def _other_owner(resource: Resource, node: Node, mount_dir: str) -> tuple[str, Path] | None:
    """(node name, record path) of another node of *resource* whose attach
    record describes *mount_dir*, if any: that mount is not ours to touch."""
    want = os.path.realpath(mount_dir)
    mine = {os.path.realpath(_record_path(node, v)) for v in node.volumes}
    for other in resource.nodes.values():
        if other.name == node.name:
            continue
        for v in other.volumes:
            path = _record_path(other, v)
            if os.path.realpath(path) in mine:
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # none (the usual case), or unreadable: it claims nothing
            theirs = record.get("mount_dir") if isinstance(record, dict) else None
            if theirs and os.path.realpath(theirs) == want:
                return other.name, path
    return None


def _refuse_if_other_owns(resource: Resource, node: Node, mount_dir: str) -> None:
    owner = _other_owner(resource, node, mount_dir)
    if owner is not None:
        name, path = owner
        raise AttachError(
            f"{mount_dir} belongs to node {name} (its attach record {path} names it): "
            f"node {node.name} does not touch it (run `duplex --node {name} detach "
            f"{resource.name}` first)")


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


def _is_our_nbdfuse(pid: int, fuse_file: str | None) -> bool:
    """Whether *pid* is an nbdfuse serving *fuse_file* (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (os.path.basename(argv[0]) == b"nbdfuse"
            and (fuse_file is None or os.fsencode(fuse_file) in argv))


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


def _attach_nbd(uri: str, node: Node, vol: Volume) -> dict[str, Any]:
    exp = node.export
    for dev in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:])):
        if (dev / "pid").exists():
            continue
        device = f"/dev/{dev.name}"
        if exp.kind == "unix":
            argv = ["nbd-client", "-unix", str(exp.path), device]
        else:
            argv = ["nbd-client", str(exp.host), str(exp.port), device]
        if node.multi_volume:
            argv += ["-N", vol.name]  # the volume's export (else the default one)
        _run(argv, f"connecting {device} to {uri}")
        return {"method": "nbd", "device": device, "uri": uri}
    raise AttachError("no free /dev/nbdX device (all are connected)")


def _clear_leftover_mount(resource: Resource, node: Node, mount_dir: Path,
                          fuse_file: Path) -> None:
    """Unmount what a crash left on *mount_dir* (no record describes it):
    typically a dead mount whose nbdfuse is gone. Refuses when another
    node's record claims it, or a loop device still uses its file."""
    if not is_mounted(mount_dir):
        return
    _refuse_if_other_owns(resource, node, str(mount_dir))
    users = _loops_backed_by(str(fuse_file))
    if users:
        # Unmounting (even lazily) under a live loop device would hide it.
        raise AttachError(
            f"{mount_dir} is left over from an earlier attach and {', '.join(users)} "
            f"still uses {fuse_file}: unmount what uses {users[0]}, `losetup -d` it, "
            f"and attach again")
    _unmount(str(mount_dir))


def _attach_fuse(uri: str, resource: Resource, node: Node, run_dir: Path,
                 vol: Volume) -> dict[str, Any]:
    for tool in ("nbdfuse", "losetup", "fusermount3"):
        if not shutil.which(tool):
            raise AttachError(f"{tool} is not installed (needed to attach without kernel nbd)")
    # Canonical, as the kernel reports it in mountinfo and loop backing files.
    base = Path(os.path.realpath(fuse_base_dir(resource, node, run_dir, vol)))
    mount_dir = base / "fuse"
    fuse_file = mount_dir / "nbd"
    pidfile = base / "nbdfuse.pid"
    logfile = base / "nbdfuse.log"
    # Before mkdir: mkdir on a dead mount fails with ENOTCONN.
    _clear_leftover_mount(resource, node, mount_dir, fuse_file)
    with _os_step(f"creating the attach directory {mount_dir}"):
        mount_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _os_step(f"starting nbdfuse on {mount_dir} (log {logfile})"):
        pidfile.unlink(missing_ok=True)
        with open(logfile, "wb") as log:
            # Own session: nbdfuse must outlive this command and its terminal.
            proc = subprocess.Popen(
                ["nbdfuse", "-P", str(pidfile), str(fuse_file), uri],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )

    def ready() -> bool:
        try:
            return pidfile.exists() and is_mounted(mount_dir) and fuse_file.exists()
        except OSError:  # ENOTCONN: nbdfuse mounted, then died
            return False

    if not _wait(lambda: ready() or proc.poll() is not None) or not ready():
        try:
            err = logfile.read_text(errors="replace").strip()
        except OSError as e:
            err = f"(its log: {_os_error_text(e)})"
        hung = proc.poll() is None
        if hung:
            proc.kill()
        proc.wait()
        if is_mounted(mount_dir):
            _unmount_quietly(str(mount_dir))
        if hung:
            raise AttachError(f"nbdfuse did not present {fuse_file} within {WAIT_S:g}s: {err}")
        raise AttachError(f"nbdfuse could not attach {uri}: {err or f'exit {proc.returncode}'}")
    try:
        # Direct I/O: no second page cache between the loop device and the
        # export, so a write reaches nbdkit (and the replication stream) when
        # it completes, and flushes mean what they say.
        device = _run(["losetup", "--find", "--show", "--direct-io=on", str(fuse_file)],
                      f"setting up a loop device on {fuse_file}").strip()
    except AttachError:
        _unmount_quietly(str(mount_dir))
        _wait(lambda: proc.poll() is not None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return {"method": "fuse", "device": device, "uri": uri, "mount_dir": str(mount_dir),
            "fuse_file": str(fuse_file), "nbdfuse_pid": proc.pid}


def attach(config: Config, resource: Resource, node: Node, *,
           run_dir: str | os.PathLike | None = None, method: str | None = None) -> str:
    """Give a block device for *node*'s export; return its path.

    *run_dir* holds the FUSE mounts (default :data:`DEFAULT_RUN_DIR`, looked
    up at call time); see :func:`fuse_base_dir`.
    *method* is ``"nbd"`` or ``"fuse"`` (default: :func:`choose_method`).
    Refuses when already attached, or when nothing serves the export. A
    dead attach in place (its nbdfuse exited with the server) is replaced,
    unless its device is still mounted or held (then AttachError names the
    holder). Every
    failure, also an unexpected OSError, is an :class:`AttachError` naming
    what failed.
    """
    return attach_volumes(config, resource, node, run_dir=run_dir, method=method,
                          volume=node.volumes[0].name)[0][1]


def attach_volumes(config: Config, resource: Resource, node: Node, *,
                   run_dir: str | os.PathLike | None = None, method: str | None = None,
                   volume: str | None = None) -> list[tuple[str, str]]:
    """Attach every volume of *node* (or only *volume*), each on its own
    block device, as :func:`attach` does one; returns [(volume, device)] in
    config order. All or nothing: when one fails, the devices this call
    attached are detached again and the AttachError names the volume."""
    vols = select_volumes(resource, node, volume)
    base = Path(DEFAULT_RUN_DIR if run_dir is None else run_dir)
    done: list[tuple[Volume, str]] = []
    try:
        with _record_lock(node):
            try:
                for v in vols:
                    done.append((v, _attach(resource, node, base, method, v)))
            except AttachError as e:
                for v, _ in reversed(done):
                    record = _read_record(node, v)
                    if record is not None:
                        _undo(record, resource, node, strict=False)
                        _record_path(node, v).unlink(missing_ok=True)
                if node.multi_volume and len(vols) > 1:
                    failed = vols[len(done)]
                    given = (f"; volumes {', '.join(v.name for v, _ in done)} given back"
                             if done else "")
                    raise AttachError(f"volume {failed.name}: {e}{given}") from None
                raise
    except OSError as e:  # a safety net: the steps name their own errors
        raise AttachError(f"attaching resource {resource.name} on node {node.name}: "
                          f"{_os_error_text(e)}") from None
    return [(v.name, dev) for v, dev in done]


@contextmanager
def _record_lock(node: Node) -> Iterator[None]:
    """Serialise attach, detach and the re-attach of ``duplex up`` on one
    node (a flock on the meta-dir itself: no extra file), so that two of
    them never both set up a device for one record."""
    meta = MetaPaths(node.meta_dir).meta_dir
    if not meta.is_dir():
        # No metadata, so no record and nothing served: the steps say so.
        yield
        return
    with _os_step(f"locking the meta-dir {meta} for attach"):
        fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also lets go of the lock


def _attach(resource: Resource, node: Node, run_dir: Path, method: str | None,
            vol: Volume) -> str:
    record = _read_record(node, vol)
    if record is not None and _record_is_live(record) and _record_works(record):
        flag = f" --volume {vol.name}" if node.multi_volume else ""
        raise AttachError(f"resource {resource.name}{_label(node, vol)} is already attached as "
                          f"{record['device']} (run `duplex detach {resource.name}{flag}` first)")
    # The export writes the volume's device: if that is mounted or held
    # here as well, the new device would be a second writer under a live
    # filesystem. (A running primary's own O_EXCL claim is no mount or
    # holder, so this does not refuse the normal case.)
    check_not_in_use(vol.device, f"{resource.name}: node {node.name}"
                     + (f", volume {vol.name}" if node.multi_volume else ""))
    uri = volume_uri(node, vol)
    check_export(uri, resource.name, node.name)
    if record is not None:
        # Dead (its nbdfuse exited with the server) or stale (a reboot):
        # replaced, unless something still uses the dead device.
        if _record_is_live(record):
            _refuse_if_dead_in_use(resource, record)
        _undo(record, resource, node, strict=False)
        with _os_step(f"removing the stale attach record {_record_path(node, vol)}"):
            _record_path(node, vol).unlink(missing_ok=True)
    method = method or choose_method()
    if method == "nbd":
        record = _attach_nbd(uri, node, vol)
    elif method == "fuse":
        record = _attach_fuse(uri, resource, node, run_dir, vol)
    else:
        raise AttachError(f"unknown attach method {method!r} (nbd or fuse)")
    record.update(resource=resource.name, node=node.name, created=time.time())
    if node.multi_volume:
        record["volume"] = vol.name
    _write_record(node, record, vol)
    return record["device"]


def _record_works(record: dict[str, Any]) -> bool:
    """Whether a live *record*'s device still reaches the export: false for
    a FUSE attach whose nbdfuse is gone (it exits with its server)."""
    pid = record.get("nbdfuse_pid")
    if record.get("method") == "fuse" and pid:
        return _pid_alive(pid) and _is_our_nbdfuse(pid, record.get("fuse_file"))
    return True


def _refuse_if_dead_in_use(resource: Resource, record: dict[str, Any]) -> None:
    """AttachError naming the holder when the dead attach's device is still
    mounted or held: it cannot be replaced under its user."""
    device, res = record["device"], resource.name
    found = holders(device)
    if found:
        why = (f"its nbdfuse (pid {record['nbdfuse_pid']}) has exited"
               if record.get("nbdfuse_pid") else "its server is gone")
        raise AttachError(
            f"resource {res} is attached as {device}, but that attach is dead ({why}, every "
            f"I/O on it fails) and {device} is still in use ({'; '.join(found)}): unmount "
            f"it, then run `duplex attach {res}` again, which replaces the dead attach")


def record_path(node: Node, vol: Volume | None = None) -> Path:
    """Where the attach record of *vol* (default: the first volume) of
    *node* lives: attach.json, or attach-NAME.json with volume tables."""
    return _record_path(node, vol)


def attach_records(node: Node) -> list[Path]:
    """The attach records in place for *node*'s volumes (config order)."""
    return [p for v in node.volumes if (p := _record_path(node, v)).exists()]


def has_record(node: Node) -> bool:
    """Whether an attach record is in place for *node* (for any volume)."""
    return bool(attach_records(node))


def describe_attach(node: Node) -> str | None:
    """``attached as /dev/loop5 (attach.json), mounted at /mnt`` when an
    attach record is in place, else None; with volume tables one such
    part per attached volume (``volume data attached as ...``), joined by
    "; ". Never raises (used while stopping)."""
    parts = []
    for v in node.volumes:
        try:
            record = _read_record(node, v)
        except AttachError:
            continue
        if record is None:
            continue
        device = record["device"]
        found = holders(device) if _record_is_live(record) else []
        parts.append(f"{_label(node, v).strip() + ' ' if node.multi_volume else ''}"
                     f"attached as {device} ({_record_path(node, v)})"
                     + (f", {', '.join(found)}" if found else ""))
    return "; ".join(parts) or None


def reattach(config: Config, resource: Resource, node: Node) -> str | None:
    """After the server came back (``duplex up`` calls this once nbdkit
    serves): give the export a working device again if the attach record
    in place is dead. Returns what was done (None: nothing to do, the
    attach works or there is none). AttachError when the dead device is
    still in use (mounted: the admin must unmount it) or attaching fails."""
    done: list[str] = []
    try:
        with _record_lock(node):
            for v in node.volumes:
                record = _read_record(node, v)
                if record is None or (_record_is_live(record) and _record_works(record)):
                    continue  # none, or someone attached meanwhile
                old = record["device"]
                if _record_is_live(record):
                    _refuse_if_dead_in_use(resource, record)
                mount_dir = record.get("mount_dir")
                # The same place as before: RUN/<resource>/<node>[/<volume>]/fuse.
                depth = 3 if node.multi_volume else 2
                run_dir = (Path(mount_dir).parents[depth] if mount_dir
                           else Path(DEFAULT_RUN_DIR))
                device = _attach(resource, node, run_dir, record.get("method"), v)
                what = f"volume {v.name}'s export" if node.multi_volume else "the export"
                done.append(f"re-attached {what} as {device} (the attach in place, {old}, "
                            f"died with the previous server)")
    except OSError as e:  # a safety net, as in attach()
        raise AttachError(f"re-attaching resource {resource.name} on node {node.name}: "
                          f"{_os_error_text(e)}") from None
    return "; ".join(done) or None


# --------------------------------------------------------------------------
# detach


def _undo(record: dict[str, Any], resource: Resource, node: Node, strict: bool) -> None:
    """Tear down what *record* describes. With *strict*, a step that fails
    raises; otherwise (cleaning up stale state) it is skipped. A FUSE mount
    that another node's record describes is refused, strict or not."""
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
    if mount_dir:
        # Records of older versions all named /run/duplex/RES/fuse: then
        # the loop device and mount may well be the other node's by now.
        _refuse_if_other_owns(resource, node, mount_dir)
    if device and fuse_file and _loop_backing_file(device) == fuse_file:
        step(lambda: _run(["losetup", "-d", device], f"detaching {device}"))
        if not _wait(lambda: _loop_backing_file(device) != fuse_file) and strict:
            raise AttachError(f"{device} is still in use after losetup -d (who holds it open?)")
    if mount_dir and is_mounted(mount_dir):
        users = _loops_backed_by(fuse_file) if fuse_file else []

        def unmount() -> None:
            if users:  # never unmount (even lazily) under a live loop device
                raise AttachError(f"cannot unmount {mount_dir}: {', '.join(users)} still "
                                  f"uses {fuse_file}")
            _unmount(mount_dir)
        step(unmount)
    pid = record.get("nbdfuse_pid")
    if (pid and not _wait(lambda: not _pid_alive(pid), timeout=5.0)
            and _is_our_nbdfuse(pid, fuse_file)):
        try:
            os.kill(pid, signal.SIGTERM)
            if not _wait(lambda: not _pid_alive(pid), timeout=5.0):
                os.kill(pid, signal.SIGKILL)
                _wait(lambda: not _pid_alive(pid), timeout=2.0)
        except ProcessLookupError:
            pass  # it exited just now
    if mount_dir:
        try:
            os.rmdir(mount_dir)
        except OSError:
            return  # still mounted (a non-strict step failed) or not empty: leave it
        # nbdfuse is gone: its pid file would only name a pid that may be
        # reused. Its log stays if it says anything, for whoever wonders how
        # it ended; then the directories go if nothing else is in them.
        base = Path(mount_dir).parent
        (base / "nbdfuse.pid").unlink(missing_ok=True)
        log = base / "nbdfuse.log"
        if log.exists() and log.stat().st_size == 0:
            log.unlink()
        # RUN/<res>/<node>[/<volume>]: up to RUN/<res> when nothing else is in them.
        for d in (base, base.parent, *((base.parent.parent,) if record.get("volume") else ())):
            try:
                d.rmdir()
            except OSError:
                break  # not empty: something else lives there


def detach(config: Config, resource: Resource, node: Node) -> str:
    """Undo :func:`attach`; return the device path that was detached.

    Refuses while the device is mounted. Also takes away a dead FUSE mount
    (its nbdfuse gone with the server). Every failure, also an unexpected
    OSError, is an :class:`AttachError` naming what failed.
    """
    return detach_volumes(config, resource, node, volume=node.volumes[0].name)[0][1]


def detach_volumes(config: Config, resource: Resource, node: Node,
                   volume: str | None = None) -> list[tuple[str, str]]:
    """Undo :func:`attach_volumes` for every attached volume of *node* (or
    only *volume*); returns [(volume, device)] detached. Every device is
    checked (not mounted, not held) before any is detached, so a refusal
    leaves all of them as they were. AttachError when none is attached."""
    vols = select_volumes(resource, node, volume)
    try:
        with _record_lock(node):
            records = [(v, r) for v in vols if (r := _read_record(node, v)) is not None]
            if not records:
                if node.multi_volume:
                    what = (f"volume {volume} of resource {resource.name} is not" if volume
                            else f"no volume of resource {resource.name} is")
                    where = ", ".join(str(_record_path(node, v)) for v in vols)
                    raise AttachError(f"{what} attached on node {node.name} (no {where})")
                raise AttachError(f"resource {resource.name} is not attached on node "
                                  f"{node.name} (no {_record_path(node)})")
            for v, record in records:
                _check_detachable(node, v, record)
            out = []
            for v, record in records:
                _undo(record, resource, node, strict=True)
                with _os_step(f"removing the attach record {_record_path(node, v)}"):
                    _record_path(node, v).unlink(missing_ok=True)
                out.append((v.name, record.get("device", "?")))
            return out
    except OSError as e:  # a safety net: the steps name their own errors
        raise AttachError(f"detaching resource {resource.name} on node {node.name}: "
                          f"{_os_error_text(e)}") from None


def _check_detachable(node: Node, vol: Volume, record: dict[str, Any]) -> None:
    """AttachError when *record*'s device is mounted or held."""
    device = record.get("device", "?")
    if _record_is_live(record):
        lead = f"volume {vol.name}: " if node.multi_volume else ""
        where = _mounted_at(device)
        if where:
            raise AttachError(f"{lead}{device} is mounted on {where}; unmount it first")
        found = holders(device)  # a dm/md holder, a partition's mount, swap
        if found:
            raise AttachError(f"{lead}{device} is in use ({'; '.join(found)}); stop that "
                              f"use first")

"""The things Duplex replicates: regular image files and block devices
alike. Their size, and who else uses them.

A device Duplex serves or receives into must be Duplex's alone (DRBD
refuses a busy backing device too): a second writer under a live
filesystem, or two daemons writing one image, corrupt it without any error.
:func:`claim_device` takes it exclusively for as long as the claim is held:

* a block device is opened with ``O_EXCL``: the kernel refuses that while
  the device is mounted, used by a loop/dm/md holder, used as swap, or
  opened ``O_EXCL`` by another process (another Duplex), and it keeps all of
  those out while we hold it;
* an image file gets a ``flock(LOCK_EX)``, which every Duplex takes, so two
  daemons can never write one image; a loop device on the image (another
  writer the lock does not stop) is refused as well.

When the kernel says busy, :func:`holders` finds out who from
``/proc/self/mountinfo``, ``/sys/dev/block/M:N/holders``, ``/proc/swaps``,
``/proc/locks`` and the processes' open files, so the refusal names the
holder in one line.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import Self

from replicator.errors import DuplexError

BLKGETSIZE64 = 0x80081272  # <linux/fs.h>: _IOR(0x12, 114, size_t)


class DeviceBusy(DuplexError):
    """The device is in use by something else: mounted, held, or locked."""


def _stat_device(path: str, lead: str = "") -> os.stat_result:
    """os.stat of a device path, its failure worded (*lead* first)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise DuplexError(f"{lead}device {path} does not exist") from None
    except OSError as e:
        raise DuplexError(f"{lead}device {path}: {e.strerror}") from None


def device_size(path: str) -> int:
    """Size in bytes of a block device or regular file; DuplexError if unusable."""
    st = _stat_device(path)
    if stat.S_ISREG(st.st_mode):
        size = st.st_size
    elif stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise DuplexError(f"device {path}: cannot open: {e.strerror}") from None
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("Q", buf)[0]
        except OSError:
            size = os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    else:
        raise DuplexError(f"device {path} is neither a block device nor a regular file")
    if size == 0:
        raise DuplexError(f"device {path} is empty (size 0)")
    if size % 512:
        raise DuplexError(f"device {path} is {size} bytes, not a multiple of 512")
    return size


# --------------------------------------------------------------------------
# who uses a device


def _unescape(s: str) -> str:
    # mountinfo and /proc/swaps escape space, tab, newline and backslash as \ooo.
    return s.encode().decode("unicode_escape") if "\\" in s else s


def _mount_points_of(rdev: int) -> list[str]:
    """Where the block device with number *rdev* is mounted."""
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            return [_unescape(line.split()[4]) for line in f if line.split()[2] == want]
    except OSError:
        return []


def _sys_dir(rdev: int) -> Path | None:
    """The device's directory in sysfs (``/sys/dev/block/M:N``, resolved)."""
    p = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    try:
        return p.resolve(strict=True)
    except OSError:
        return None


def _dev_name(sysdir: Path) -> str:
    """``/dev/NAME`` of a sysfs block device, with a dm device's own name."""
    try:
        dm = (sysdir / "dm" / "name").read_text().strip()
        return f"/dev/{sysdir.name} ({dm})"
    except OSError:
        return f"/dev/{sysdir.name}"


def _rdev_of(sysdir: Path) -> int | None:
    try:
        major, minor = (sysdir / "dev").read_text().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def _block_holders(rdev: int, path: str) -> list[str]:
    """Mounts, stacked holders and swap use of a block device and its partitions."""
    found: list[str] = []
    sysdir = _sys_dir(rdev)
    parts: list[tuple[str, int, Path | None]] = [(path, rdev, sysdir)]
    if sysdir is not None:
        for sub in sorted(sysdir.iterdir()) if sysdir.is_dir() else []:
            if (sub / "partition").exists():
                prdev = _rdev_of(sub)
                if prdev is not None:
                    parts.append((f"its partition /dev/{sub.name}", prdev, sub))
    for name, r, sd in parts:
        for mp in _mount_points_of(r):
            found.append(f"{name} is mounted at {mp}" if name != path else f"mounted at {mp}")
        holders_dir = sd / "holders" if sd is not None else None
        if holders_dir is not None and holders_dir.is_dir():
            for h in sorted(holders_dir.iterdir()):
                what = _dev_name(h.resolve())
                found.append(f"{name} is held by {what}" if name != path else f"held by {what}")
    try:
        with open("/proc/swaps", encoding="utf-8") as f:
            for line in list(f)[1:]:
                swap = _unescape(line.split()[0])
                try:
                    if os.stat(swap).st_rdev in {r for _, r, _ in parts}:
                        found.append(f"used as swap ({swap})")
                except OSError:
                    pass
    except OSError:
        pass
    return found


def _loop_holders(path: str) -> list[str]:
    """Loop devices whose backing file is the image *path*, and their mounts."""
    real = os.path.realpath(path)
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == real:
            rdev = _rdev_of(entry)
            mps = _mount_points_of(rdev) if rdev is not None else []
            found.append(f"the backing file of /dev/{entry.name}"
                         + (f", mounted at {', '.join(mps)}" if mps else ""))
    return found


def _process_name(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = "?"
    return f"{comm} (pid {pid}{', this process' if pid == os.getpid() else ''})"


def _lock_holders(st: os.stat_result) -> list[str]:
    """Processes holding a POSIX or flock lock on the file *st* (/proc/locks)."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    found = []
    try:
        with open("/proc/locks", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; "->" marks waiters.
                if "->" in fields or len(fields) < 6 or fields[5] != want:
                    continue
                if fields[4].lstrip("-").isdigit() and int(fields[4]) > 0:
                    found.append(f"locked by {_process_name(int(fields[4]))}")
    except OSError:
        pass
    return list(dict.fromkeys(found))


def _openers(st: os.stat_result) -> list[str]:
    """Processes that have the device or file *st* open (scanning /proc/*/fd)."""
    is_blk = stat.S_ISBLK(st.st_mode)
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                o = os.stat(fd)
            except OSError:
                continue
            same = (stat.S_ISBLK(o.st_mode) and o.st_rdev == st.st_rdev) if is_blk else (
                o.st_dev == st.st_dev and o.st_ino == st.st_ino)
            if same:
                found.append(f"open in {_process_name(int(pid_dir.name))}")
                break
    return found


def holders(path: str) -> list[str]:
    """Who uses the device or image *path*, each as a short phrase
    ("mounted at /mnt", "held by /dev/dm-0 (vg-lv)", "the backing file of
    /dev/loop3", "locked by nbdkit (pid 42)"). Empty when nothing is seen."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if stat.S_ISBLK(st.st_mode):
        return _block_holders(st.st_rdev, path)
    if stat.S_ISREG(st.st_mode):
        return _loop_holders(path)
    return []


def _busy(path: str, found: list[str], context: str) -> DeviceBusy:
    """The one-line refusal: who holds *path*, and what to do about it."""
    lead = f"{context}: " if context else ""
    text = " ".join(found)
    if "mounted at" in text:
        todo = "unmount it"
    elif "held by" in text or "backing file" in text or "swap" in text:
        todo = "remove that user (losetup -d, dmsetup remove, swapoff)"
    else:
        todo = "stop that process"
    return DeviceBusy(f"{lead}device {path} is in use ({'; '.join(found)}): Duplex needs it "
                      f"to itself; {todo}, or correct `device` in the config")


def check_not_in_use(path: str, context: str = "") -> None:
    """Raise DeviceBusy when *path* is mounted, held by a loop/dm/md device
    or swap, or (an image) is a loop device's backing file. A check without
    a claim, for commands that must not take it from a running Duplex."""
    found = holders(path)
    if found:
        raise _busy(path, found, context)


class DeviceClaim:
    """Exclusive use of a device or image file while this object is open:
    an ``O_EXCL`` open of a block device, a ``flock`` on an image file."""

    def __init__(self, path: str, fd: int, st: os.stat_result):
        self.path = path
        self._fd: int | None = fd
        self._st = st

    @property
    def held(self) -> bool:
        """Whether the claim is still held (not closed)."""
        return self._fd is not None

    def refresh(self, context: str = "") -> None:
        """Claim *path* again if it is another file now (an image that was
        replaced by a snapshot's rename): the lock must be on the file that
        is written. DeviceBusy when someone else got the new file first."""
        if self._fd is None or stat.S_ISBLK(self._st.st_mode):
            return
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == (self._st.st_dev, self._st.st_ino):
            return
        new = claim_device(self.path, context)
        self.close()
        self._fd, self._st = new._fd, new._st
        new._fd = None

    def close(self) -> None:
        """Give the device back."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a claim dropped on an error path must not leak its lock
        self.close()


def claim_device(path: str, context: str = "") -> DeviceClaim:
    """Take *path* for Duplex alone (see the module docstring); *context*
    (e.g. ``"r0: node alpha"``) leads the error. DeviceBusy naming the
    holder when it is in use, DuplexError when it cannot be opened."""
    lead = f"{context}: " if context else ""
    st = _stat_device(path, lead)
    if stat.S_ISBLK(st.st_mode):
        try:
            # O_EXCL without O_CREAT on a block device: an exclusive claim,
            # the one mount, losetup's dm/md and other Duplexes take too.
            fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise DuplexError(f"{lead}device {path}: cannot open: {e.strerror}") from None
            found = _block_holders(st.st_rdev, path) or _openers(st) or [
                "claimed by the kernel or another process; `lsblk` and `fuser -v` may tell"]
            raise _busy(path, found, context) from None
        return DeviceClaim(path, fd, os.fstat(fd))
    if not stat.S_ISREG(st.st_mode):
        raise DuplexError(f"{lead}device {path} is neither a block device nor a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DuplexError(f"{lead}device {path}: cannot open: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fst = os.fstat(fd)
        os.close(fd)
        found = _lock_holders(fst) or _openers(fst) or ["locked by another process"]
        raise _busy(path, [f"{h}: another Duplex serves this image" if h.startswith("locked")
                           else h for h in found], context) from None
    except OSError as e:
        os.close(fd)
        raise DuplexError(f"{lead}device {path}: cannot lock: {e.strerror}") from None
    loops = _loop_holders(path)
    if loops:
        os.close(fd)
        raise _busy(path, loops, context)
    return DeviceClaim(path, fd, os.fstat(fd))

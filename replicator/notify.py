"""systemd readiness notification (``sd_notify``), without libsystemd.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an AF_UNIX
datagram socket (a path, or ``@name`` in the abstract namespace). A
notification is one datagram of newline-separated ``KEY=VALUE`` lines:

* ``READY=1``    -- the service is up: the secondary listens, or the
  primary's nbdkit accepts on its export;
* ``STATUS=...`` -- one line shown by ``systemctl status``;
* ``STOPPING=1`` -- shutting down (after SIGTERM, or a promotion);
* ``MAINPID=N``  -- not used: ``duplex up`` itself is the main process.

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op returning
False. A failed send is logged and also returns False: a notification
must never take the daemon down.
"""
from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("duplex.notify")


def _address(value: str) -> str | None:
    """The sockaddr for a $NOTIFY_SOCKET value, or None if unsupported."""
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:... -- not for a local daemon


def sd_notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` *lines* to $NOTIFY_SOCKET (from *env*, default
    the process environment). True if a datagram was sent."""
    value = (os.environ if env is None else env).get("NOTIFY_SOCKET")
    if not value:
        return False
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"sd_notify: {line!r} is not one KEY=VALUE line")
    addr = _address(value)
    if addr is None:
        log.warning("NOTIFY_SOCKET=%s is not a unix socket path; not notifying", value)
        return False
    msg = "\n".join(lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(msg, addr)
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", value, e)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(status: str | None = None) -> bool:
    """READY=1, with an optional STATUS line."""
    return sd_notify("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))


def status(text: str) -> bool:
    """A STATUS line for ``systemctl status``."""
    return sd_notify(f"STATUS={_one_line(text)}")


def stopping(status: str | None = None) -> bool:
    """STOPPING=1, with an optional STATUS line."""
    return sd_notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))


def systemd_unit(cgroups: str | None = None) -> str | None:
    """The systemd service unit this process runs in (``duplex@r0.service``),
    or None outside systemd. systemd sets ``$INVOCATION_ID`` for every
    service it starts; the unit is the last part of our cgroup path
    (*cgroups*: the text of /proc/self/cgroup, read when not given)."""
    if not os.environ.get("INVOCATION_ID"):
        return None
    if cgroups is None:
        try:
            with open("/proc/self/cgroup", encoding="utf-8") as f:
                cgroups = f.read()
        except OSError:
            return None
    lines = cgroups.splitlines()
    # cgroup v2 ("0::/system.slice/...") or v1's name=systemd hierarchy.
    for line in lines:
        _, _, path = line.partition(":")
        hierarchy, _, path = path.partition(":")
        if hierarchy in ("", "name=systemd"):
            unit = path.rstrip("/").rsplit("/", 1)[-1]
            if unit.endswith(".service"):
                return unit
    return None

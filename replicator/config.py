"""The configuration file: resources, and per resource its two nodes.

Default path ``/etc/duplex/duplex.toml`` (``--config`` or the environment
variable ``DUPLEX_CONFIG`` override it). The schema is exact: an unknown
key, a missing required key or a bad value is an error that names the
file, the key path and what is wrong, e.g.::

    /etc/duplex/duplex.toml: resource.r0.track-size: '64KB' is not a size (use e.g. 64KiB: ...)

Schema (defaults shown; only ``secret-file`` and the node's ``address``,
``device`` and ``meta-dir`` are required)::

    [resource.r0]
    secret-file = "/etc/duplex/r0.secret"  # content (stripped) is the shared secret
    track-size = "64KiB"        # bitmap granularity: power of two, >= 4KiB
    ring-size = "64MiB"         # primary send ring, >= 1MiB
    journal-size = "1GiB"       # secondary journal, >= 1MiB
    al-extent-size = "4MiB"     # activity-log extent: multiple of track-size
    al-extents = 1024           # active extents
    batch-bytes = "1MiB"        # shipper sends when this much is queued ...
    batch-interval = "2ms"      # ... or when this long has passed
    drain-timeout = "10s"       # a clean stop waits this long for the peer
    connections = 1             # TCP connections carrying the stream (1..64)
    resync-rate = "0"           # resync limit in bytes/s, 0 = unlimited
    protocol = "A"              # A: reply when local; B: when the peer received it; C: journaled
    on-disconnect = "degrade"   # B/C with the peer away: "degrade" (to A) or "suspend" writers
    on-congestion = "pull-ahead"  # ring past congestion-fill: go Ahead, or "block" writers
                                # (default "block" for B and C)
    congestion-fill = "64MiB"   # bytes queued for the peer (default ring-size)
    congestion-timeout = "10s"  # a blocked write waits this long, then pulls ahead
    max-lag = "100ms"           # optional: slow writers to keep the lag under this
    fence-command = "..."       # optional, run by scripts/failover
    tls = false                 # true: the link runs in TLS, mutual certificates (DESIGN §9)
    tls-ca = "/etc/duplex/ca.pem"       # with tls: the CA that signs both nodes' certificates
    compression = "none"        # DATA and increment frames: "zstd", "lz4" or "none"
    compression-level = 3       # optional: zstd 1..19 (3), lz4 0..16 (0: fast mode)

    [resource.r0.on.alpha]      # exactly two node tables
    address = "10.0.0.1:7789"   # replication endpoint: IPv4:port, [IPv6]:port, name:port
    device = "/dev/sdb"         # block device or image file (absolute path)
    meta-dir = "/var/lib/duplex/r0"
    export = "unix:/run/duplex/r0.nbd"  # unix:PATH or tcp:HOST:PORT
    service-address = "10.0.0.10/24"    # optional: address failover moves
    service-interface = "eth0"          # optional
    mount-point = "/srv/data"           # optional
    tls-cert = "/etc/duplex/alpha.pem"  # with tls: this node's certificate, named for the
    tls-key = "/etc/duplex/alpha.key"   #   node (SAN DNS or CN), and its key

A resource of several volumes (one write order across them, DESIGN §8)
names them in volume tables instead of ``device``; both nodes list the same
names, in the same order::

    [resource.r0.on.alpha.volume.data]
    device = "/dev/sdb"
    mount-point = "/srv/pg"             # optional, per volume
    [resource.r0.on.alpha.volume.wal]
    device = "/dev/sdc"
"""
from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from replicator.errors import DuplexError
from replicator.modes import ON_CONGESTION, ON_DISCONNECT, PROTOCOLS, Modes, default_on_congestion
from replicator.sizes import parse_duration, parse_rate, parse_size

DEFAULT_CONFIG_PATH = "/etc/duplex/duplex.toml"
DEFAULT_VOLUME = "default"  # the one volume of a resource with a plain `device`
DEFAULT_RUN_DIR = "/run/duplex"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class ConfigError(DuplexError):
    """The configuration file (or a file it names) is wrong."""


@dataclass(frozen=True)
class Export:
    """Where nbdkit serves a node's NBD export: a unix socket or TCP."""

    kind: str  # "unix" or "tcp"
    path: str | None = None  # unix
    host: str | None = None  # tcp
    port: int | None = None  # tcp

    def uri(self) -> str:
        """The NBD URI a client (libnbd, nbdfuse, qemu) connects to."""
        if self.kind == "unix":
            return f"nbd+unix:///?socket={self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}"

    def nbdkit_args(self) -> list[str]:
        """nbdkit command-line options that make it serve here."""
        if self.kind == "unix":
            return ["-U", str(self.path)]
        return ["-i", str(self.host), "-p", str(self.port)]

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class Volume:
    """One volume of a node: its name (the NBD export name on the primary)
    and its device. A resource with a plain ``device`` has one, named
    :data:`DEFAULT_VOLUME`."""

    name: str
    device: str
    mount_point: str | None = None


@dataclass(frozen=True)
class Node:
    """One host's side of a resource."""

    name: str
    address: tuple[str, int]  # replication endpoint (host, port)
    device: str               # the first volume's device (the only one, mostly)
    meta_dir: str
    export: Export
    service_address: str | None = None  # "10.0.0.10/24"
    service_interface: str | None = None
    mount_point: str | None = None
    volumes: tuple[Volume, ...] = ()
    metrics_address: tuple[str, int] | None = None  # Prometheus metrics (off: None)
    tls_cert: str | None = None  # this node's certificate (PEM), with tls = true
    tls_key: str | None = None   # its private key (PEM)

    def __post_init__(self) -> None:
        if not self.volumes:
            object.__setattr__(self, "volumes",
                               (Volume(DEFAULT_VOLUME, self.device, self.mount_point),))

    @property
    def multi_volume(self) -> bool:
        """True for a resource configured with volume tables."""
        return len(self.volumes) > 1 or self.volumes[0].name != DEFAULT_VOLUME

    def export_uri(self) -> str:
        """The NBD URI of this node's export (when it is primary)."""
        return self.export.uri()

    def address_str(self) -> str:
        """The replication endpoint as ``host:port`` (``[v6]:port``)."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def read_secret(path: str, where: str = "secret-file") -> bytes:
    """The shared secret in *path*: its content, whitespace stripped.

    Both roles call this before they listen or connect, and at every
    handshake. Refuses, with ConfigError naming *where* (the config key),
    the path and the fix: a missing file, one that is not a regular file,
    one any other user may read or write (the mode must be 0600 or
    stricter), one that cannot be read, an empty one.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot stat {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ConfigError(f"{where}: {path} is readable by every user "
                          f"(mode {mode:04o}); run chmod 600 {path}")
    if mode & 0o070:
        raise ConfigError(f"{where}: {path} is open to its group "
                          f"(mode {mode:04o}); run chmod 600 {path}")
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read {path}: {e.strerror}") from None
    if not secret:
        raise ConfigError(f"{where}: {path} is empty")
    return secret


#: The handlers a resource may name in ``[resource.R.handlers]``
#: (replicator/handlers.py runs them; DESIGN §14).
HANDLER_NAMES = ("split-brain", "fence-peer", "before-resync-target", "after-resync-target",
                 "out-of-sync", "lag-exceeded")


@dataclass(frozen=True)
class Handlers:
    """``[resource.R.handlers]``: a shell command per handler name, the
    lag above which ``lag-exceeded`` runs, and how long a handler may run."""

    commands: tuple[tuple[str, str], ...] = ()   # (handler name, command), config order
    lag_threshold_s: float | None = None         # lag-exceeded-threshold (with lag-exceeded)
    timeout_s: float = 30.0                      # handler-timeout: then it is killed

    def command(self, name: str) -> str | None:
        """The command for handler *name*, or None when none is set."""
        return dict(self.commands).get(name)


@dataclass(frozen=True)
class Resource:
    """A replicated device: its tuning and its two nodes."""

    name: str
    secret_file: str
    track_size: int
    ring_size: int
    journal_size: int
    al_extent_size: int
    al_extents: int
    batch_bytes: int
    batch_interval_s: float
    connections: int
    resync_rate: int  # bytes/s, 0 = unlimited
    fence_command: str | None
    drain_timeout_s: float = 10.0  # a clean stop waits this long for the peer
    ping_interval_s: float = 1.0   # a PING when nothing else went to the peer for this long
    ping_timeout_s: float = 6.0    # no frame from the peer for this long: it is gone
    auth_timeout_s: float = 5.0    # a connection that has not authenticated by then is dropped
    modes: Modes = Modes()         # protocol, on-disconnect, on-congestion, max-lag
    tls: bool = False              # the replication link runs inside TLS (DESIGN §9)
    tls_ca: str | None = None      # the CA that signs both nodes' certificates
    compression: str = "none"      # DATA and INCR_DATA frames: "zstd", "lz4" or "none"
    compression_level: int | None = None  # None: the codec's default
    handlers: Handlers = field(default_factory=Handlers)  # [resource.R.handlers]
    nodes: dict[str, Node] = field(default_factory=dict)
    config_path: str = DEFAULT_CONFIG_PATH

    def secret(self) -> bytes:
        """The shared secret: the secret file's content, whitespace stripped.

        Read on demand (status does not need it), and again at every
        handshake, so that fixing the file fixes a running node. See
        :func:`read_secret` for what is refused.
        """
        return read_secret(self.secret_file,
                           f"{self.config_path}: resource.{self.name}.secret-file")

    def tls_context(self, node_name: str, server: bool) -> "ssl.SSLContext | None":
        """The SSLContext node *node_name* uses on the replication link
        (None when tls is off). Its files are read now, and again at every
        connection as the secret is: ConfigError names the key of a
        missing, unreadable or malformed file."""
        if not self.tls:
            return None
        from replicator.tls import TlsFiles, make_context
        node = self.node(node_name)
        return make_context(TlsFiles(str(self.tls_ca), str(node.tls_cert), str(node.tls_key),
                                     f"{self.config_path}: resource.{self.name}",
                                     f"{self.config_path}: resource.{self.name}.on.{node_name}"),
                            server)

    def compressor(self):
        """A new compressor for one connection's sends (None with
        compression = "none"); ConfigError naming the key when this host
        lacks the codec's Python package."""
        if self.compression == "none":
            return None
        from replicator.protocol.compression import Compressor, available
        why = available(self.compression)
        if why is not None:
            raise ConfigError(f"{self.config_path}: resource.{self.name}.compression: {why}")
        return Compressor(self.compression, self.compression_level)

    def node(self, name: str) -> Node:
        """The node called *name*; a clear error if the resource has none."""
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(
                f"{self.config_path}: resource {self.name} has no node {name!r} "
                f"(its nodes: {', '.join(sorted(self.nodes))})"
            ) from None

    def peer_of(self, name: str) -> Node:
        """The other node of the pair."""
        self.node(name)  # validates
        (peer,) = [n for n in self.nodes.values() if n.name != name]
        return peer


GROUP_MODES = ("checkpoint", "limit-time")


@dataclass(frozen=True)
class Group:
    """A consistency group (DESIGN §13): resources on different primary
    hosts that the secondaries keep at one common point in time."""

    name: str
    resources: tuple[str, ...]
    secret_file: str
    mode: str                 # "checkpoint" (seed 000) or "limit-time" (seed 002)
    interval_s: float         # checkpoint (or heartbeat) interval
    max_skew_s: float         # releases stop while a primary's clock is further off
    master: str               # the resource whose two nodes are the masters
    endpoints: dict[str, tuple[str, int]]  # node name -> its group endpoint
    config_path: str = DEFAULT_CONFIG_PATH
    tls: bool = False                      # the group channel runs inside TLS
    tls_ca: str | None = None
    tls_files: dict[str, tuple[str, str]] = field(default_factory=dict)  # node -> (cert, key)

    def tls_context(self, node: str, server: bool) -> "ssl.SSLContext | None":
        """The SSLContext of *node* on the group channel (None when tls is
        off); ConfigError names the key of a bad file."""
        if not self.tls:
            return None
        from replicator.tls import TlsFiles, make_context
        cert, key = self.tls_files[node]
        return make_context(TlsFiles(str(self.tls_ca), cert, key,
                                     f"{self.config_path}: group.{self.name}",
                                     f"{self.config_path}: group.{self.name}.on.{node}"), server)

    def secret(self) -> bytes:
        """The group's shared secret (read again at every handshake)."""
        return read_secret(self.secret_file, f"{self.config_path}: group.{self.name}.secret-file")

    def endpoint(self, node: str) -> tuple[str, int]:
        """The group endpoint of *node*."""
        return self.endpoints[node]


@dataclass(frozen=True)
class Config:
    """A loaded configuration file."""

    path: str
    resources: dict[str, Resource]
    groups: dict[str, Group] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        """The group called *name*; the error lists the configured ones."""
        try:
            return self.groups[name]
        except KeyError:
            raise ConfigError(
                f"{self.path}: no group {name!r} "
                f"(configured: {', '.join(sorted(self.groups)) or 'none'})") from None

    def group_of(self, resource: str) -> Group | None:
        """The group *resource* belongs to, if any."""
        for g in self.groups.values():
            if resource in g.resources:
                return g
        return None

    def resource(self, name: str) -> Resource:
        """The resource called *name*; the error lists the configured ones."""
        try:
            return self.resources[name]
        except KeyError:
            raise ConfigError(
                f"{self.path}: no resource {name!r} "
                f"(configured: {', '.join(sorted(self.resources)) or 'none'})"
            ) from None

    def resources_of_node(self, node_name: str) -> list[Resource]:
        """The resources that have a node called *node_name*, by name."""
        return [r for _, r in sorted(self.resources.items()) if node_name in r.nodes]


def host_names() -> list[str]:
    """Names this host answers to: its host name and, if qualified, the short name."""
    name = socket.gethostname()
    names = [name]
    if "." in name:
        names.append(name.split(".", 1)[0])
    return names


def select_node(resource: Resource, node_name: str | None = None) -> Node:
    """This host's node of *resource*: *node_name* (``--node``) or the host name."""
    if node_name is not None:
        return resource.node(node_name)
    for name in host_names():
        if name in resource.nodes:
            return resource.nodes[name]
    raise ConfigError(
        f"{resource.config_path}: this host ({host_names()[0]}) is not a node of "
        f"resource {resource.name} (its nodes: {', '.join(sorted(resource.nodes))}); "
        f"use --node NAME"
    )


def local_node_name(config: Config, node_name: str | None = None) -> str:
    """The node name this host plays: *node_name*, or the host name (or its
    short form) when some resource has a node of that name."""
    if node_name is not None:
        return node_name
    names = host_names()
    for name in names:
        if any(name in r.nodes for r in config.resources.values()):
            return name
    return names[0]


# --------------------------------------------------------------------------
# Loading and validation


class _Checker:
    """Validation helpers that know the file, so errors carry it."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {what}")

    def table(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table ([{key}]), not {_kind(value)}")
        return value

    def keys(self, table: dict, key: str, allowed: set[str], required: set[str]) -> None:
        for k in table:
            if k not in allowed:
                hint = _did_you_mean(k, allowed)
                raise self.fail(f"{key}.{k}" if key else k,
                                f"unknown key{hint} (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required):
            if k not in table:
                raise self.fail(f"{key}.{k}", "required key is missing")

    def string(self, table: dict, key: str, name: str, default: str | None = None) -> str | None:
        if name not in table:
            return default
        v = table[name]
        if not isinstance(v, str):
            raise self.fail(f"{key}.{name}", f"must be a string, not {_kind(v)}")
        if not v.strip():
            raise self.fail(f"{key}.{name}", "must not be empty")
        if "\0" in v:  # no path, command or address holds one; os calls refuse it
            raise self.fail(f"{key}.{name}", "contains a NUL character (\\u0000)")
        return v

    def abspath(self, table: dict, key: str, name: str, default: str | None = None) -> str | None:
        v = self.string(table, key, name, default)
        if v is not None and not os.path.isabs(v):
            raise self.fail(f"{key}.{name}", f"{v!r} is not an absolute path")
        return v

    def parsed(self, table: dict, key: str, name: str, default: Any,
               parse: Callable[[Any], Any]) -> Any:
        v = table.get(name, default)
        try:
            return parse(v)
        except ValueError as e:
            raise self.fail(f"{key}.{name}", str(e)) from None

    def integer(self, table: dict, key: str, name: str, default: int, lo: int, hi: int) -> int:
        v = table.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"{key}.{name}", f"must be an integer, not {_kind(v)}")
        if not lo <= v <= hi:
            raise self.fail(f"{key}.{name}", f"{v} is out of range ({lo}..{hi})")
        return v


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


def _did_you_mean(k: str, allowed: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(k, sorted(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_address(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``name:port`` -> (host, port).

    Raises ValueError naming the value.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a string \"host:port\", not {_kind(text)}")
    m = re.fullmatch(r"\[([^\]]+)\]:([0-9]+)", text)
    if m:
        host, port_s = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:7789")
        if ":" not in text:
            raise ValueError(f"{text!r} has no port (use host:port, e.g. 10.0.0.1:7789)")
        host, port_s = text.rsplit(":", 1)
        if not host:
            raise ValueError(f"{text!r} has no host (use host:port, e.g. 10.0.0.1:7789)")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv4 address") from None
        elif not _HOSTNAME.match(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{text!r}: port {port_s!r} is not a port number (1..65535)")
    return host, int(port_s)


def parse_export(text: str) -> Export:
    """``unix:/abs/path`` or ``tcp:HOST:PORT`` -> Export. Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string, not {_kind(text)}")
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not os.path.isabs(path):
            raise ValueError(f"{text!r}: the socket path must be absolute (unix:/run/duplex/r0.nbd)")
        if len(os.fsencode(path)) > 107:
            raise ValueError(f"{text!r}: the socket path is longer than 107 bytes")
        return Export("unix", path=path)
    if text.startswith("tcp:"):
        host, port = parse_address(text[len("tcp:"):])
        return Export("tcp", host=host, port=port)
    raise ValueError(f"{text!r} is not an export (use unix:PATH or tcp:HOST:PORT)")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


_RESOURCE_KEYS = {
    "secret-file", "track-size", "ring-size", "journal-size", "al-extent-size",
    "al-extents", "batch-bytes", "batch-interval", "connections", "resync-rate",
    "fence-command", "drain-timeout", "ping-interval", "ping-timeout", "auth-timeout",
    "protocol", "on-disconnect", "on-congestion", "congestion-fill", "congestion-timeout",
    "max-lag",
    "on", "handlers", "tls", "tls-ca", "compression", "compression-level",
}
_HANDLER_KEYS = {*HANDLER_NAMES, "lag-exceeded-threshold", "handler-timeout"}
_NODE_KEYS = {
    "address", "device", "meta-dir", "export", "service-address",
    "service-interface", "mount-point", "volume", "metrics-address", "tls-cert", "tls-key",
}
_VOLUME_KEYS = {"device", "mount-point"}


def _parse_node(c: _Checker, res_name: str, name: str, table: Any) -> Node:
    key = f"resource.{res_name}.on.{name}"
    if not _NAME.match(name):
        raise c.fail(key, f"{name!r} is not a valid node name (letters, digits, '_', '.', '-')")
    t = c.table(table, key)
    c.keys(t, key, _NODE_KEYS, {"address", "meta-dir"})
    address = c.parsed(t, key, "address", None, parse_address)
    volumes = _parse_volumes(c, key, t)
    device = volumes[0].device
    meta_dir = c.abspath(t, key, "meta-dir")
    export = c.parsed(t, key, "export", f"unix:{DEFAULT_RUN_DIR}/{res_name}.nbd", parse_export)
    service_address = c.string(t, key, "service-address")
    if service_address is not None:
        try:
            ipaddress.ip_interface(service_address)
        except ValueError:
            raise c.fail(f"{key}.service-address",
                         f"{service_address!r} is not an address with prefix length "
                         f"(use e.g. 10.0.0.10/24)") from None
        if "/" not in service_address:
            raise c.fail(f"{key}.service-address",
                         f"{service_address!r} needs a prefix length (e.g. {service_address}/24)")
    service_interface = c.string(t, key, "service-interface")
    if service_address is not None and service_interface is None:
        raise c.fail(f"{key}.service-interface",
                     "required when service-address is set (the interface to put it on)")
    mount_point = c.abspath(t, key, "mount-point")
    if "volume" in t and mount_point is not None:
        raise c.fail(f"{key}.mount-point", "give mount-point in each volume table instead")
    if "volume" not in t:
        volumes = (Volume(DEFAULT_VOLUME, device, mount_point),)
    metrics = c.parsed(t, key, "metrics-address", None,
                       lambda v: None if v is None else parse_address(v))
    return Node(name=name, address=address, device=device, meta_dir=meta_dir,
                export=export, service_address=service_address,
                service_interface=service_interface, mount_point=mount_point,
                volumes=volumes, metrics_address=metrics,
                tls_cert=c.abspath(t, key, "tls-cert"), tls_key=c.abspath(t, key, "tls-key"))


def _parse_volumes(c: _Checker, key: str, t: dict) -> tuple[Volume, ...]:
    """The node's volume tables, or its one plain ``device``."""
    if "volume" not in t:
        if "device" not in t:
            raise c.fail(f"{key}.device", "is required (or volume tables: volume.NAME.device)")
        return (Volume(DEFAULT_VOLUME, c.abspath(t, key, "device")),)
    if "device" in t:
        raise c.fail(f"{key}.device", "a plain device beside volume tables: give every "
                     "device in its volume table (volume.NAME.device)")
    vt = c.table(t["volume"], f"{key}.volume")
    if not vt:
        raise c.fail(f"{key}.volume", "names no volume")
    out: list[Volume] = []
    seen: dict[str, str] = {}
    for vname, table in vt.items():
        vkey = f"{key}.volume.{vname}"
        if not _NAME.match(vname):
            raise c.fail(vkey, f"{vname!r} is not a valid volume name (letters, digits, '_', '.', '-')")
        v = c.table(table, vkey)
        c.keys(v, vkey, _VOLUME_KEYS, {"device"})
        dev = c.abspath(v, vkey, "device")
        real = os.path.realpath(dev)
        if real in seen:
            raise c.fail(f"{vkey}.device", f"{dev} is also volume {seen[real]!r}'s device")
        seen[real] = vname
        out.append(Volume(vname, dev, c.abspath(v, vkey, "mount-point")))
    return tuple(out)


def _check_same_volumes(c: _Checker, key: str, nodes: dict[str, Node]) -> None:
    """Both nodes list the same volume names in the same order."""
    (a, na), (b, nb) = nodes.items()
    names_a = [v.name for v in na.volumes]
    names_b = [v.name for v in nb.volumes]
    if names_a == names_b:
        return
    for x, nx, ny, other in ((a, names_a, names_b, b), (b, names_b, names_a, a)):
        missing = [v for v in nx if v not in ny]
        if missing:
            raise c.fail(f"{key}.on.{x}.volume.{missing[0]}",
                         f"volume {missing[0]!r} is on node {x} only: node {other} must list "
                         f"the same volumes")
    raise c.fail(f"{key}.on", f"the nodes list their volumes in different orders "
                 f"({a}: {', '.join(names_a)}; {b}: {', '.join(names_b)}): use one order")


def _parse_handlers(c: _Checker, key: str, table: Any) -> Handlers:
    """``[resource.R.handlers]``: every error names its key."""
    key = f"{key}.handlers"
    t = c.table(table, key)
    c.keys(t, key, _HANDLER_KEYS, set())
    commands = tuple((n, c.string(t, key, n)) for n in HANDLER_NAMES if n in t)
    threshold = None
    if "lag-exceeded-threshold" in t:
        threshold = c.parsed(t, key, "lag-exceeded-threshold", None, parse_duration)
        if not 0 < threshold <= 86400:
            raise c.fail(f"{key}.lag-exceeded-threshold",
                         f"{t['lag-exceeded-threshold']!r} must be more than 0 and at most 24h")
    if ("lag-exceeded" in t) != (threshold is not None):
        missing = "lag-exceeded-threshold" if "lag-exceeded" in t else "lag-exceeded"
        raise c.fail(f"{key}.{missing}", "required key is missing (lag-exceeded and "
                     "lag-exceeded-threshold go together)")
    timeout = c.parsed(t, key, "handler-timeout", "30s", parse_duration)
    if not 0.1 <= timeout <= 3600:
        raise c.fail(f"{key}.handler-timeout",
                     f"{t.get('handler-timeout')!r} must be between 100ms and 1h")
    return Handlers(commands=commands, lag_threshold_s=threshold, timeout_s=timeout)


def _parse_tls(c: _Checker, key: str, t: dict,
               node_files: dict[str, tuple[str | None, str | None]]) -> tuple[bool, str | None]:
    """``tls`` and ``tls-ca`` of a resource or group table *t* at *key*,
    checked against each node's (tls-cert, tls-key) in *node_files*: with
    tls = true all are required, without it none may be set (a key that
    would silently do nothing). The files are read when used
    (Resource.tls_context): a node has only its own."""
    tls = t.get("tls", False)
    if not isinstance(tls, bool):
        raise c.fail(f"{key}.tls", f"must be true or false, not {_kind(tls)}")
    ca = c.abspath(t, key, "tls-ca")
    if not tls:
        if ca is not None:
            raise c.fail(f"{key}.tls-ca", "is set but tls is not true (set tls = true, or "
                         "remove it)")
        for n, files in node_files.items():
            for k, v in zip(("tls-cert", "tls-key"), files):
                if v is not None:
                    raise c.fail(f"{key}.on.{n}.{k}", "is set but tls is not true (set "
                                 f"{key}.tls = true, or remove it)")
        return False, None
    if ca is None:
        raise c.fail(f"{key}.tls-ca", "required when tls = true (the CA certificate that "
                     "signs every node's certificate)")
    for n, files in node_files.items():
        for k, v in zip(("tls-cert", "tls-key"), files):
            if v is None:
                raise c.fail(f"{key}.on.{n}.{k}", "required when tls = true (this node's "
                             + ("certificate" if k == "tls-cert" else "private key") + ", PEM)")
    return True, ca


def _parse_compression(c: _Checker, key: str, t: dict) -> tuple[str, int | None]:
    """``compression`` ("none", "zstd", "lz4") and ``compression-level``
    (within the codec's range; only with a codec)."""
    from replicator.protocol.compression import LEVELS

    name = c.string(t, key, "compression", "none")
    if name not in ("none", *LEVELS):
        raise c.fail(f"{key}.compression", f"{name!r} is not one of none, zstd, lz4")
    if "compression-level" not in t:
        return name, None
    if name == "none":
        raise c.fail(f"{key}.compression-level", "is set but compression is \"none\" (set "
                     "compression = \"zstd\" or \"lz4\", or remove it)")
    lo, hi, _ = LEVELS[name]
    return name, c.integer(t, key, "compression-level", 0, lo, hi)


def _parse_resource(c: _Checker, name: str, table: Any) -> Resource:
    key = f"resource.{name}"
    if not _NAME.match(name):
        raise c.fail(key, f"{name!r} is not a valid resource name (letters, digits, '_', '.', '-')")
    t = c.table(table, key)
    c.keys(t, key, _RESOURCE_KEYS, {"secret-file", "on"})

    secret_file = c.abspath(t, key, "secret-file")
    track_size = c.parsed(t, key, "track-size", "64KiB", parse_size)
    if not _power_of_two(track_size) or track_size < 4096:
        raise c.fail(f"{key}.track-size",
                     f"{t.get('track-size')!r} must be a power of two and at least 4KiB")
    ring_size = c.parsed(t, key, "ring-size", "64MiB", parse_size)
    if ring_size < 1 << 20:
        raise c.fail(f"{key}.ring-size", f"{t.get('ring-size')!r} is too small (at least 1MiB)")
    journal_size = c.parsed(t, key, "journal-size", "1GiB", parse_size)
    if journal_size < 1 << 20:
        raise c.fail(f"{key}.journal-size",
                     f"{t.get('journal-size')!r} is too small (at least 1MiB)")
    al_extent_size = c.parsed(t, key, "al-extent-size", "4MiB", parse_size)
    if al_extent_size < track_size or al_extent_size % track_size:
        raise c.fail(f"{key}.al-extent-size",
                     f"{t.get('al-extent-size', '4MiB')!r} must be a multiple of "
                     f"track-size ({track_size} bytes)")
    al_extents = c.integer(t, key, "al-extents", 1024, 1, 1 << 20)
    batch_bytes = c.parsed(t, key, "batch-bytes", "1MiB", parse_size)
    if not 4096 <= batch_bytes <= ring_size:
        raise c.fail(f"{key}.batch-bytes",
                     f"{t.get('batch-bytes', '1MiB')!r} must be between 4KiB and ring-size")
    batch_interval = c.parsed(t, key, "batch-interval", "2ms", parse_duration)
    if batch_interval > 10:
        raise c.fail(f"{key}.batch-interval",
                     f"{t.get('batch-interval')!r} is too long (at most 10s)")
    drain_timeout = c.parsed(t, key, "drain-timeout", "10s", parse_duration)
    if drain_timeout > 3600:
        raise c.fail(f"{key}.drain-timeout",
                     f"{t.get('drain-timeout')!r} is too long (at most 1h)")
    ping_interval = c.parsed(t, key, "ping-interval", "1s", parse_duration)
    if not 0.05 <= ping_interval <= 60:
        raise c.fail(f"{key}.ping-interval",
                     f"{t.get('ping-interval')!r} must be between 50ms and 60s")
    ping_timeout = c.parsed(t, key, "ping-timeout", "6s", parse_duration)
    if not 1 <= ping_timeout <= 600 or ping_timeout < 2 * ping_interval:
        raise c.fail(f"{key}.ping-timeout",
                     f"{t.get('ping-timeout')!r} must be between 1s and 10min and at least "
                     f"twice ping-interval")
    auth_timeout = c.parsed(t, key, "auth-timeout", "5s", parse_duration)
    if not 0.1 <= auth_timeout <= 120:
        raise c.fail(f"{key}.auth-timeout",
                     f"{t.get('auth-timeout')!r} must be between 100ms and 2min")
    connections = c.integer(t, key, "connections", 1, 1, 64)
    resync_rate = c.parsed(t, key, "resync-rate", 0, parse_rate)
    fence_command = c.string(t, key, "fence-command")
    modes = _parse_modes(c, t, key, ring_size)
    handlers = _parse_handlers(c, key, t["handlers"]) if "handlers" in t else Handlers()

    on = c.table(t["on"], f"{key}.on")
    if len(on) != 2:
        raise c.fail(f"{key}.on",
                     f"a resource needs exactly two nodes, found {len(on)}"
                     + (f" ({', '.join(on)})" if on else ""))
    nodes = {n: _parse_node(c, name, n, nt) for n, nt in on.items()}
    _check_same_volumes(c, key, nodes)
    tls, tls_ca = _parse_tls(c, key, t, {n: (nd.tls_cert, nd.tls_key)
                                         for n, nd in nodes.items()})
    compression, compression_level = _parse_compression(c, key, t)
    return Resource(
        name=name, secret_file=secret_file, track_size=track_size,
        ring_size=ring_size, journal_size=journal_size,
        al_extent_size=al_extent_size, al_extents=al_extents,
        batch_bytes=batch_bytes, batch_interval_s=batch_interval, drain_timeout_s=drain_timeout,
        ping_interval_s=ping_interval, ping_timeout_s=ping_timeout,
        auth_timeout_s=auth_timeout,
        connections=connections, resync_rate=resync_rate,
        fence_command=fence_command, nodes=nodes, config_path=c.path, handlers=handlers,
        modes=modes,
        tls=tls, tls_ca=tls_ca, compression=compression, compression_level=compression_level,
    )


def _choice(c: _Checker, t: dict, key: str, name: str, default: str,
            allowed: tuple[str, ...]) -> str:
    value = c.string(t, key, name, default)
    if value not in allowed:
        raise c.fail(f"{key}.{name}", f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _parse_modes(c: _Checker, t: dict, key: str, ring_size: int) -> Modes:
    protocol = _choice(c, t, key, "protocol", "A", PROTOCOLS)
    on_disconnect = _choice(c, t, key, "on-disconnect", "degrade", ON_DISCONNECT)
    on_congestion = _choice(c, t, key, "on-congestion", default_on_congestion(protocol),
                            ON_CONGESTION)
    if protocol != "A" and on_congestion == "pull-ahead":
        # As DRBD: a write that waits for the peer cannot also run ahead of it.
        raise c.fail(f"{key}.on-congestion",
                     f"'pull-ahead' needs protocol A (protocol is {protocol!r}): a write "
                     f"that waits for the peer cannot run ahead of it; use 'block'")
    fill = c.parsed(t, key, "congestion-fill", ring_size, parse_size)
    if not 1 << 20 <= fill <= ring_size:
        raise c.fail(f"{key}.congestion-fill",
                     f"{t.get('congestion-fill')!r} must be between 1MiB and ring-size "
                     f"({ring_size} bytes)")
    timeout = c.parsed(t, key, "congestion-timeout", "10s", parse_duration)
    if not 0.01 <= timeout <= 3600:
        raise c.fail(f"{key}.congestion-timeout",
                     f"{t.get('congestion-timeout')!r} must be between 10ms and 1h")
    max_lag = c.parsed(t, key, "max-lag", None, parse_duration) if "max-lag" in t else None
    if max_lag is not None and not 0.005 <= max_lag <= 600:
        raise c.fail(f"{key}.max-lag", f"{t.get('max-lag')!r} must be between 5ms and 10min")
    return Modes(protocol=protocol, on_disconnect=on_disconnect, on_congestion=on_congestion,
                 congestion_fill=fill, congestion_timeout_s=timeout, max_lag_s=max_lag)


_GROUP_KEYS = {"resources", "secret-file", "mode", "checkpoint-interval", "max-clock-skew",
               "master", "on", "tls", "tls-ca"}


def _parse_group(c: _Checker, name: str, table: Any, resources: dict[str, Resource],
                 taken: dict[str, str]) -> Group:
    key = f"group.{name}"
    if not _NAME.match(name):
        raise c.fail(key, f"{name!r} is not a valid group name (letters, digits, '_', '.', '-')")
    if name in resources:
        raise c.fail(key, f"a resource is called {name!r} too: commands take either, so the "
                     f"names must differ")
    t = c.table(table, key)
    c.keys(t, key, _GROUP_KEYS, {"resources", "secret-file", "on"})
    members = t["resources"]
    if (not isinstance(members, list) or not all(isinstance(m, str) for m in members)):
        raise c.fail(f"{key}.resources", "must be a list of resource names")
    if len(members) < 2:
        raise c.fail(f"{key}.resources", "a group needs at least two resources")
    if len(set(members)) != len(members):
        raise c.fail(f"{key}.resources", "names a resource twice")
    for m in members:
        if m not in resources:
            raise c.fail(f"{key}.resources", f"no resource {m!r} is configured")
        if m in taken:
            raise c.fail(f"{key}.resources",
                         f"resource {m} is already in group {taken[m]} (one group per resource)")
        taken[m] = name
    secret_file = c.abspath(t, key, "secret-file")
    mode = c.string(t, key, "mode", "checkpoint")
    if mode not in GROUP_MODES:
        raise c.fail(f"{key}.mode", f"{mode!r} is not one of {', '.join(GROUP_MODES)}")
    interval = c.parsed(t, key, "checkpoint-interval", "20ms", parse_duration)
    if not 0.001 <= interval <= 10:
        raise c.fail(f"{key}.checkpoint-interval",
                     f"{t.get('checkpoint-interval')!r} must be between 1ms and 10s")
    max_skew = c.parsed(t, key, "max-clock-skew", "5ms", parse_duration)
    if max_skew > 10:
        raise c.fail(f"{key}.max-clock-skew", f"{t.get('max-clock-skew')!r} is over 10s")
    master = c.string(t, key, "master", members[0])
    if master not in members:
        raise c.fail(f"{key}.master", f"{master!r} is not one of the group's resources")
    on = c.table(t["on"], f"{key}.on")
    needed = {n for m in members for n in resources[m].nodes}
    for n in sorted(set(on) - needed):
        raise c.fail(f"{key}.on.{n}", f"{n} is not a node of any of the group's resources "
                     f"({', '.join(sorted(needed))})")
    for n in sorted(needed - set(on)):
        raise c.fail(f"{key}.on", f"node {n} has no group endpoint: add [{key}.on.{n}] "
                     f"with address = \"IP:PORT\"")
    endpoints = {}
    node_files: dict[str, tuple[str | None, str | None]] = {}
    for n, nt in on.items():
        nk = f"{key}.on.{n}"
        nt = c.table(nt, nk)
        c.keys(nt, nk, {"address", "tls-cert", "tls-key"}, {"address"})
        endpoints[n] = c.parsed(nt, nk, "address", None, parse_address)
        node_files[n] = (c.abspath(nt, nk, "tls-cert"), c.abspath(nt, nk, "tls-key"))
    tls, tls_ca = _parse_tls(c, key, t, node_files)
    return Group(name=name, resources=tuple(members), secret_file=secret_file, mode=mode,
                 interval_s=interval, max_skew_s=max_skew, master=master,
                 endpoints=endpoints, config_path=c.path, tls=tls, tls_ca=tls_ca,
                 tls_files={n: (str(a), str(b)) for n, (a, b) in node_files.items()}
                 if tls else {})


def parse_config(text: str, path: str = DEFAULT_CONFIG_PATH) -> Config:
    """Parse and validate TOML *text*; *path* is used in messages."""
    c = _Checker(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    c.keys(data, "", {"resource", "group"}, set())
    resources_t = c.table(data.get("resource", {}), "resource")
    if not resources_t:
        raise ConfigError(f"{path}: no resources (add a [resource.NAME] table)")
    resources = {name: _parse_resource(c, name, t) for name, t in resources_t.items()}
    taken: dict[str, str] = {}
    groups = {name: _parse_group(c, name, t, resources, taken)
              for name, t in c.table(data.get("group", {}), "group").items()}
    return Config(path=path, resources=resources, groups=groups)


def default_config_path() -> str:
    """``$DUPLEX_CONFIG`` if set, else /etc/duplex/duplex.toml."""
    return os.environ.get("DUPLEX_CONFIG") or DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the configuration file at *path* (default:
    :func:`default_config_path`)."""
    p = str(path) if path is not None else default_config_path()
    try:
        text = Path(p).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: configuration file does not exist (use --config FILE)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return parse_config(text, p)

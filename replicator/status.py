"""The status of a resource on one node: the dict schema every provider
fills, how a stopped node's status is derived from its metadata, and the
human rendering.

Schema (``duplex status --json``; providers may add keys, never drop
these)::

    {
      "resource": "r0", "node": "alpha",
      "running": true,                      # false: derived from metadata
      "role": "Primary",                    # Primary | Secondary | Unknown
      "connection": "Connected",            # StandAlone | Connecting | Connected
      "replication": "Established",         # see REPLICATIONS
      "last_error": null,                   # why the connection is not up (or null)
      "disk": "UpToDate",                   # see DISKS
      "peer": {"name": "beta", "address": "10.0.0.2:7789", "disk": "UpToDate"},
      "seq": {"written": 120, "journaled": 118, "applied": 117},
      "lag": {"writes": 3, "bytes": 12288, "seconds": 0.004},   # seconds: null = unknown
      "out_of_sync_bytes": 0,
      "nbd_uri": "nbd+unix:///?socket=/run/duplex/r0.nbd",   # primary, else null
      "sync": null,       # or {"done_bytes", "total_bytes", "rate", "eta_seconds",
                          #     "increment"} (increment: optional)
      "incr_bytes_sent": 0,   # optional (primary): catch-up bytes sent since up
      "protocol": "C",        # optional (primary): configured (replicator/modes.py)
      "protocol_effective": "A",   # what writes wait for now: A while degraded
      "protocol_note": "degraded: the peer is away",   # why not the configured one
      "congestion": "none",   # optional (primary): none | blocked | pulled-ahead
      "congestion_blocked_seconds": 0.0,   # time writers spent blocked for room
      "flow": {...},          # optional (primary): the flow control's counters
      "reason": null,     # why StandAlone / Inconsistent / down, in words
      "faults": [],       # optional: supervised threads that raised
      "disconnected_by_admin": false,  # optional: `duplex disconnect` (DESIGN §7)
      "volumes": [        # config order; one "default" for a plain `device`
        {"name": "data", "device": "/dev/sdb", "size": 1073741824,
         "out_of_sync_bytes": 0,                  # size, out_of_sync_bytes: null = unknown
         "nbd_uri": "nbd+unix:///data?socket=/run/duplex/r0.nbd"}   # primary: its export
      ]
    }

``connection`` and ``replication`` are DRBD's two layers and neither masks
the other: a primary whose peer died while a resync is owed is
``Connecting`` (``last_error`` says why) and ``Ahead``. ``replication`` is
``Off`` while there is no session, ``SplitBrain`` when a handshake found
that both nodes wrote as Primary (``reason`` names the command that ends
it). The primary's words and moves are in replicator/primary/states.py.
A value nobody measured is null (JSON) and "unknown" (human), never 0.

``seq.written`` is the last seq assigned (primary) or received (secondary);
``journaled`` and ``applied`` are what the secondary acknowledged / did.
``lag`` is written minus applied, in writes, bytes and the age of the oldest
unapplied write. ``sync.rate`` is bytes/s. ``volumes`` splits the
resource by volume (DESIGN §8): each volume's device, its size and the
out-of-sync bytes inside it (``out_of_sync_bytes`` is their sum); a
provider that does not know one of them gives null, and new_status fills
the names and devices from the configuration when it gives no list.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

from replicator.config import DEFAULT_VOLUME, Node, Resource
from replicator.metadata import Metadata
from replicator.sizes import format_duration, format_size

ROLES = ("Primary", "Secondary", "Unknown")
CONNECTIONS = ("StandAlone", "Connecting", "Connected")
REPLICATIONS = ("Off", "Established", "Ahead", "Behind", "SyncSource", "SyncTarget",
                "SplitBrain")
CONNECTED = "Connected"
DISKS = ("UpToDate", "Consistent", "Inconsistent", "Outdated", "Failed", "Unknown")

_TEMPLATE: dict[str, Any] = {
    "resource": None,
    "node": None,
    "running": True,
    "role": "Unknown",
    "connection": "StandAlone",
    "replication": "Off",
    "last_error": None,
    "disk": "Unknown",
    "peer": {"name": None, "address": None, "disk": "Unknown"},
    "seq": {"written": 0, "journaled": 0, "applied": 0},
    "lag": {"writes": 0, "bytes": 0, "seconds": 0.0},
    "out_of_sync_bytes": 0,
    "nbd_uri": None,
    "sync": None,
    "reason": None,
    "volumes": None,  # new_status: from the node's configuration unless given
    "group": None,    # a consistency group member: its side of the group (DESIGN §13)
}
_VOLUME_KEYS = ("name", "device", "size", "out_of_sync_bytes")
_SYNC_KEYS = ("done_bytes", "total_bytes", "rate", "eta_seconds")
SYNC_BAR_WIDTH = 20  # the sync line's bar: the whole line fits ~100 columns


def new_status(resource: Resource, node: Node, **fields: Any) -> dict:
    """A complete status dict for *node* of *resource*, with every key of the
    schema present (defaults: not connected, nothing written), updated by
    *fields*. Nested dicts (peer, seq, lag) are merged, not replaced."""
    d = copy.deepcopy(_TEMPLATE)
    peer = resource.peer_of(node.name)
    d.update(resource=resource.name, node=node.name)
    d["peer"].update(name=peer.name, address=peer.address_str())
    for k, v in fields.items():
        if k not in _TEMPLATE:
            d[k] = v
        elif isinstance(_TEMPLATE[k], dict) and isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    if d["connection"] in REPLICATIONS:
        # A provider that names only the replication state (the secondary:
        # Established, SyncTarget, Behind) is connected.
        d["replication"], d["connection"] = d["connection"], CONNECTED
    if d["replication"] is None:
        d["replication"] = "Off"
    if d["volumes"] is None:
        d["volumes"] = volume_rows(node)
    return d


def volume_rows(node: Node, sizes: Sequence[int | None] | None = None,
                out_of_sync: Sequence[int | None] | None = None) -> list[dict]:
    """The ``volumes`` list of *node*: name and device from its config,
    with *sizes* and *out_of_sync* bytes (volume order) where known, else null."""
    n = len(node.volumes)
    sizes = list(sizes) if sizes is not None else [None] * n
    oos = list(out_of_sync) if out_of_sync is not None else [None] * n
    return [{"name": v.name, "device": v.device, "size": sizes[i], "out_of_sync_bytes": oos[i]}
            for i, v in enumerate(node.volumes)]


def volumes_out_of_sync(runs: Iterable[tuple[int, int]], bases: Sequence[int],
                        sizes: Sequence[int]) -> list[int]:
    """Out-of-sync bytes inside each volume, from the OOS bitmap's runs of
    LOGICAL (offset, length) bytes and the volumes' logical bases and sizes
    (replicator.layout): a run is counted where it overlaps a volume, so the
    alignment gap after a volume's end counts for none."""
    out = [0] * len(bases)
    for off, length in runs:
        end = off + length
        for i, (b, sz) in enumerate(zip(bases, sizes)):
            lo, hi = max(off, b), min(end, b + sz)
            if hi > lo:
                out[i] += hi - lo
    return out


def health_problems(d: dict) -> list[str]:
    """Why a status is not healthy, in words (empty: healthy).

    Healthy, for ``duplex status --check``: running; connection Connected;
    replication Established (not catching up, not Ahead); disk UpToDate (a
    Secondary may be Consistent: asynchronous, a valid past image, moving);
    the peer's disk UpToDate or Consistent; no supervised thread faulted.
    """
    out = []
    if d.get("running") is not True:
        return [f"not running ({d.get('reason') or 'no reason given'})"]
    if d.get("connection") != CONNECTED:
        out.append(f"connection {d.get('connection')}"
                   + (f": {d.get('last_error')}" if d.get("last_error") else ""))
    if d.get("replication") != "Established":
        out.append(f"replication {d.get('replication')}")
    disk_ok = ("UpToDate", "Consistent") if d.get("role") == "Secondary" else ("UpToDate",)
    if d.get("disk") not in disk_ok:
        out.append(f"disk {d.get('disk')}")
    peer_disk = (d.get("peer") or {}).get("disk")
    if peer_disk not in ("UpToDate", "Consistent"):
        out.append(f"peer disk {peer_disk}")
    for f in d.get("faults") or ():
        out.append(f"thread {f.get('thread')} {f.get('state')}: {f.get('error')}")
    if out and d.get("reason"):
        out.append(f"reason: {d['reason']}")
    return out


def check_status(d: dict) -> list[str]:
    """Problems with a status dict against the schema (empty list: fine).

    For tests of providers; the CLI displays whatever it gets.
    """
    problems = [f"missing key {k!r}" for k in _TEMPLATE if k not in d]
    if problems:
        return problems
    for key, allowed in (("role", ROLES), ("connection", CONNECTIONS),
                         ("replication", REPLICATIONS), ("disk", DISKS)):
        if d[key] not in allowed:
            problems.append(f"{key} is {d[key]!r}, not one of {', '.join(allowed)}")
    for key in ("peer", "seq", "lag"):
        if not isinstance(d[key], dict):
            problems.append(f"{key} is not an object")
            continue
        problems += [f"missing key {key}.{k}" for k in _TEMPLATE[key] if k not in d[key]]
    if d["sync"] is not None:
        if not isinstance(d["sync"], dict):
            problems.append("sync is neither null nor an object")
        else:
            problems += [f"missing key sync.{k}" for k in _SYNC_KEYS if k not in d["sync"]]
    if not isinstance(d["out_of_sync_bytes"], int):
        problems.append("out_of_sync_bytes is not an integer")
    vols = d["volumes"]
    if not isinstance(vols, list) or not vols:
        problems.append("volumes is not a non-empty list")
    else:
        for i, v in enumerate(vols):
            if not isinstance(v, dict):
                problems.append(f"volumes[{i}] is not an object")
                continue
            problems += [f"missing key volumes[{i}].{k}" for k in _VOLUME_KEYS if k not in v]
    return problems


def offline_status(resource: Resource, node: Node, metadata: Metadata | None,
                   reason: str) -> dict:
    """The status of a resource that is not running on this node, from its
    metadata (None when there is none or it cannot be read; *reason* says
    why it is down or what is wrong)."""
    if metadata is None:
        return new_status(resource, node, running=False, reason=reason)
    # A mark still reserved means the last run did not stop cleanly: the
    # last seq it wrote is somewhere below the mark, not the mark itself.
    reserved = getattr(metadata, "seq_reserved", False)
    recorded = {v.get("name"): v.get("size") for v in getattr(metadata, "volumes", None) or ()}
    return new_status(
        resource, node, running=False, role=metadata.role,
        disk="Outdated" if getattr(metadata, "outdated", False) else metadata.disk,  # duplex outdate
        seq={"written": None if reserved else metadata.seq_hwm},
        volumes=volume_rows(node, [recorded.get(v.name) for v in node.volumes]),
        reason=reason + ("; needs initial sync" if metadata.needs_initial_sync else "")
        + (f"; the last run did not stop cleanly: its last seq is unknown (below "
           f"{metadata.seq_hwm})" if reserved else ""),
    )


def _num(v: Any) -> str:
    return "-" if v is None else str(v)


def progress_bar(done: float, total: float, width: int = 30) -> str:
    """``[#########.....................]  31.0%``"""
    frac = 0.0 if not total else max(0.0, min(1.0, done / total))
    filled = int(round(frac * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}%"


def format_eta(seconds: float) -> str:
    """An ETA for people: whole seconds (``16s``), then ``4m05s``, ``2h03m``;
    ``<1s`` when nearly done. No decimals: they would flicker under --watch."""
    if seconds < 1:
        return "<1s"
    if seconds < 60:
        return f"{int(round(seconds))}s"
    return format_duration(seconds)


def format_sync(sync: dict) -> str:
    """One line of resync progress from a status ``sync`` dict::

        [#########...........]  47.2%  1.2 GiB of 2.5 GiB, 85.0 MiB/s, eta 16s (increment 3)

    A field that is missing or null (rate, eta, increment) is left out.
    """
    done, total = sync.get("done_bytes") or 0, sync.get("total_bytes") or 0
    text = (f"{progress_bar(done, total, width=SYNC_BAR_WIDTH)}  "
            f"{format_size(done)} of {format_size(total)}")
    if sync.get("rate") is not None:
        text += f", {format_size(sync['rate'])}/s"
    if sync.get("eta_seconds") is not None:
        text += f", eta {format_eta(float(sync['eta_seconds']))}"
    if sync.get("increment") is not None:
        text += f" (increment {sync['increment']})"
    return text


def format_status(d: dict) -> str:
    """A short human table of one status dict."""
    g = d.get
    conn, repl = g("connection", "?"), g("replication")
    if g("running") is False:
        state = f"{g('role', 'Unknown')}, {conn} (not running)"
    elif conn == CONNECTED and repl:
        state = f"{g('role', 'Unknown')}, {repl}"  # the replication state says it is connected
    else:
        state = f"{g('role', 'Unknown')}, {_admin_conn(d, conn)}" + (
            f", {repl}" if repl and repl != "Off" else "")
    lines = [f"{g('resource')} on {g('node')}: {state}, disk {g('disk', 'Unknown')}"]
    peer = g("peer") or {}
    if peer.get("name"):
        lines.append(f"  peer          {peer.get('name')} ({peer.get('address')}), "
                     f"disk {peer.get('disk') or 'Unknown'}")
    seq = g("seq") or {}
    lines.append(f"  seq           written {_num(seq.get('written'))}  "
                 f"journaled {_num(seq.get('journaled'))}  applied {_num(seq.get('applied'))}")
    lag = g("lag")
    if g("running") is not False and lag:
        secs = lag.get("seconds")
        lines.append(f"  lag           {_num(lag.get('writes'))} writes, "
                     f"{format_size(lag.get('bytes') or 0)}, "
                     f"{'unknown' if secs is None else format_duration(float(secs))}")
    if g("out_of_sync_bytes") is not None:
        lines.append(f"  out of sync   {format_size(g('out_of_sync_bytes') or 0)}")
    vols = g("volumes") or []
    if len(vols) > 1 or (vols and vols[0].get("name") != DEFAULT_VOLUME):
        # A plain `device` resource shows no volume lines: its table is as before.
        width = max(len(str(v.get("name"))) for v in vols)
        for v in vols:
            size, oos = v.get("size"), v.get("out_of_sync_bytes")
            lines.append(f"  volume        {str(v.get('name')):<{width}}  {v.get('device')}, "
                         f"{'size unknown' if size is None else format_size(size)}, "
                         f"out of sync "
                         f"{'unknown' if oos is None else format_size(oos)}")
    if g("nbd_uri"):
        lines.append(f"  export        {g('nbd_uri')}")
    sync = g("sync")
    if isinstance(sync, dict):
        lines.append("  sync          " + format_sync(sync))
    if g("incr_bytes_sent") is not None:
        lines.append(f"  catch-up      {format_size(g('incr_bytes_sent') or 0)} "
                     f"sent in increments")
    if g("protocol") and (g("protocol") != "A" or g("protocol_note")):
        lines.append(f"  protocol      {g('protocol')}" + (
            f" (in force: {g('protocol_effective')}; {g('protocol_note')})"
            if g("protocol_note") else ""))
    blocked = g("congestion_blocked_seconds") or 0
    if g("congestion") not in (None, "none") or blocked:
        # Only when something happened: a "0us" here would read as a lag.
        lines.append(f"  congestion    {g('congestion')} (on-congestion {g('on_congestion')}"
                     + (f"; writers blocked {format_duration(float(blocked))} in all"
                        if blocked else "") + ")")
    if g("reason"):
        lines.append(f"  reason        {g('reason')}")
    for f in g("faults") or ():  # supervised threads that raised (replicator.supervise)
        lines.append(f"  fault         thread {f.get('thread')} {f.get('state')}: {f.get('error')}")
    return "\n".join(lines)


def format_statuses(ds: list[dict]) -> str:
    """Several resources' tables, separated by blank lines."""
    return "\n\n".join(format_status(d) for d in ds)


def _admin_conn(d: dict, conn: str) -> str:
    """The connection word, saying when the admin disconnected the node
    (``duplex disconnect``, DESIGN §7: key ``disconnected_by_admin``)."""
    return f"{conn} (disconnected by the admin)" if d.get("disconnected_by_admin") else conn


def format_line(d: dict) -> str:
    """One status dict in one line, as ``drbdadm status`` gives it (the
    table is :func:`format_status`, ``duplex status --verbose``)::

        r0 role:Primary disk:UpToDate peer beta: Connected Established lag 3ms
        r0 role:Primary disk:UpToDate peer beta: Connecting Ahead out-of-sync 12.0 MiB (connecting to beta: Connection refused)
        r0 role:Secondary disk:Consistent peer alpha: Connected SyncTarget 47.2% eta 16s
        r0 role:Secondary disk:Consistent not running (not running)

    Words appear only when they say something: the replication state when
    not Off, the peer's disk when not UpToDate, out-of-sync bytes when
    any, the lag while connected, the reason or error, faulted threads.
    """
    g = d.get
    words = [str(g("resource")), f"role:{g('role') or 'Unknown'}", f"disk:{g('disk') or 'Unknown'}"]
    if g("running") is False:
        words.append("not running")
        if g("reason"):
            words.append(f"({g('reason')})")
        return " ".join(words)
    peer = g("peer") or {}
    conn, repl = g("connection") or "StandAlone", g("replication")
    if conn in REPLICATIONS:  # a provider that names only the replication state
        conn, repl = CONNECTED, conn
    words += [f"peer {peer.get('name')}:", _admin_conn(d, conn)]
    if repl and repl != "Off":
        words.append(repl)
    if peer.get("disk") not in (None, "UpToDate"):
        words.append(f"peer-disk:{peer.get('disk')}")
    sync = g("sync")
    if isinstance(sync, dict) and sync.get("total_bytes"):
        words.append(f"{100 * (sync.get('done_bytes') or 0) / sync['total_bytes']:.1f}%")
        if sync.get("eta_seconds") is not None:
            words.append(f"eta {format_eta(float(sync['eta_seconds']))}")
    if g("out_of_sync_bytes"):
        words.append(f"out-of-sync {format_size(g('out_of_sync_bytes'))}")
    if g("protocol") and g("protocol") != "A":
        words.append(f"protocol:{g('protocol')}" + (
            f"(in force:{g('protocol_effective')})" if g("protocol_note") else ""))
    if g("congestion") not in (None, "none"):
        words.append(f"congestion:{g('congestion')}")
    lag = g("lag") or {}
    if conn == CONNECTED:
        secs = lag.get("seconds")
        words.append("lag " + ("unknown" if secs is None else "0ms" if not secs
                               else format_duration(float(secs))))
    faults = g("faults") or ()
    if faults:
        words.append(f"faults:{len(faults)} ({', '.join(str(f.get('thread')) for f in faults)})")
    why = g("reason") or (g("last_error") if conn != CONNECTED else None)
    if why:
        words.append(f"({why})")
    return " ".join(words)


def format_lines(ds: list[dict]) -> str:
    """Several resources, one line each."""
    return "\n".join(format_line(d) for d in ds)


def watch_frame(text: str, header: str = "") -> str:
    """What ``duplex status --watch`` writes to a terminal for one refresh:
    cursor home, every line of *header* and *text* followed by erase-to-end
    of line, then erase below. The previous frame is overwritten in place
    rather than cleared first, so the screen does not flicker, and lines that
    got shorter (or a table that lost lines) leave nothing behind."""
    lines = ([header] if header else []) + text.split("\n")
    return "\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J"

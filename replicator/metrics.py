"""Prometheus metrics of a running node, served by ``duplex up`` when the
node has ``metrics-address`` (off by default).

Every scrape reads the node's status document (replicator/status.py; the
primary's from nbdkit over the control socket, the secondary's in
process) and turns it into metrics with prometheus_client's collector
interface, so a metric can never disagree with ``duplex status --json``
taken at the same moment. Names and labels follow drbd-reactor's exporter
where DRBD has the counterpart (``name`` is the resource, ``conn_name``
the peer, ``volume`` the volume), with the ``duplex_`` prefix; what DRBD
lacks (lag in seconds, the recovery point, journal and ring use, a
group's exposure) is added.

Threads: prometheus_client's HTTP server thread calls :meth:`collect`; the
status function it is given must be safe to call from it (both roles'
are: they take their own locks).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("duplex.metrics")

ROLES = ("Primary", "Secondary", "Unknown")


class StatusCollector(Collector):
    """The metrics of one node, from its status document."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self._status = status

    def collect(self) -> Iterator:
        try:
            st = self._status()
        except Exception as e:  # the node is starting or stopping: say so, do not fail
            up = GaugeMetricFamily("duplex_up", "1 when the node answers its status", labels=[])
            up.add_metric([], 0)
            log.debug("metrics: no status: %s", e)
            yield up
            return
        yield from status_metrics(st)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _one(metric: str, doc: str, name: str, value: float) -> GaugeMetricFamily:
    """A gauge of one resource with one value."""
    g = _gauge(metric, doc, ["name"])
    g.add_metric([name], value)
    return g


def status_metrics(st: dict) -> Iterator:
    """The metric families for one status document."""
    name = st.get("resource") or ""
    peer = (st.get("peer") or {}).get("name") or ""
    up = _gauge("duplex_up", "1 when the node answers its status", [])
    up.add_metric([], 1 if st.get("running") else 0)
    yield up

    role = _gauge("duplex_resource_role", "the node's role (1 for the current one)",
                  ["name", "role"])
    for r in ROLES:
        role.add_metric([name, r], 1 if st.get("role") == r else 0)
    yield role

    conn = _gauge("duplex_connection_state", "the connection to the peer (1 for the current "
                  "state)", ["name", "conn_name", "state"])
    conn.add_metric([name, peer, str(st.get("connection"))], 1)
    yield conn
    repl = _gauge("duplex_replication_state", "the replication state (1 for the current one)",
                  ["name", "conn_name", "state"])
    repl.add_metric([name, peer, str(st.get("replication"))], 1)
    yield repl
    disk = _gauge("duplex_device_disk_state", "this node's disk state (1 for the current one)",
                  ["name", "state"])
    disk.add_metric([name, str(st.get("disk"))], 1)
    yield disk
    pdisk = _gauge("duplex_peerdevice_disk_state", "the peer's disk state as this node knows "
                   "it (1 for the current one)", ["name", "conn_name", "state"])
    pdisk.add_metric([name, peer, str((st.get("peer") or {}).get("disk"))], 1)
    yield pdisk

    seq = st.get("seq") or {}
    seqs = _gauge("duplex_seq", "sequence numbers: written (primary) or received, journaled "
                  "and applied", ["name", "kind"])
    for k in ("written", "journaled", "applied"):
        seqs.add_metric([name, k], seq.get(k) or 0)
    yield seqs

    oos = _gauge("duplex_peerdevice_outofsync_bytes", "bytes out of sync with the peer",
                 ["name", "conn_name", "volume"])
    for v in st.get("volumes") or []:
        oos.add_metric([name, peer, str(v.get("name"))], v.get("out_of_sync_bytes") or 0)
    yield oos

    lag = st.get("lag") or {}
    for key, doc in (("seconds", "age of the oldest write the secondary has not applied"),
                     ("writes", "writes written but not yet applied on the secondary"),
                     ("bytes", "bytes written but not yet applied on the secondary")):
        g = _gauge(f"duplex_lag_{key}", doc, ["name"])
        g.add_metric([name], lag.get(key) or 0)
        yield g

    point = st.get("consistent_point_ns")
    if point:
        yield _one("duplex_consistent_point_timestamp_seconds", "the secondary's recovery "
                   "point: when the primary wrote the last write its image holds", name,
                   point / 1e9)

    journal = st.get("journal")
    if journal:
        yield _one("duplex_journal_used_bytes", "bytes of the journal holding live entries",
                   name, journal.get("used_bytes") or 0)
        yield _one("duplex_journal_size_bytes", "the journal's log area", name,
                   journal.get("size") or 0)

    ring = st.get("ring")
    if ring:
        yield _one("duplex_ring_used_bytes", "bytes of the send ring held for the peer", name,
                   ring.get("bytes") or 0)
        yield _one("duplex_ring_size_bytes", "the send ring's capacity", name,
                   ring.get("capacity") or 0)
        c = CounterMetricFamily("duplex_ahead_transitions", "times the send ring overflowed "
                                "and the primary went Ahead", labels=["name"])
        c.add_metric([name], ring.get("drops") or 0)
        yield c

    flow = st.get("flow")
    if flow is not None:  # the primary's replication mode (DESIGN §3, Modes)
        g = _gauge("duplex_protocol_in_force", "1 for the protocol writes wait for now "
                   "(A while B or C is degraded)", ["name", "protocol", "configured"])
        for p in ("A", "B", "C"):
            g.add_metric([name, p, st.get("protocol") or "A"],
                         1 if st.get("protocol_effective") == p else 0)
        yield g
        g = _gauge("duplex_congestion", "1 for the congestion state now", ["name", "state"])
        for word in ("none", "blocked", "pulled-ahead"):
            g.add_metric([name, word], 1 if st.get("congestion") == word else 0)
        yield g
        c = CounterMetricFamily("duplex_congestion_blocked_seconds", "time writers spent "
                                "waiting for room in the send ring (on-congestion block)",
                                labels=["name"])
        c.add_metric([name], st.get("congestion_blocked_seconds") or 0)
        yield c
        c = CounterMetricFamily("duplex_peer_wait_seconds", "time writers spent waiting for "
                                "the peer (protocol B, C)", labels=["name"])
        c.add_metric([name], flow.get("peer_wait_seconds") or 0)
        yield c
        c = CounterMetricFamily("duplex_pull_aheads", "times congestion made the pair go "
                                "Ahead", labels=["name"])
        c.add_metric([name], flow.get("pull_aheads") or 0)
        yield c
        yield _one("duplex_max_lag_rate_bytes", "the pace (bytes/s) max-lag lets writes go "
                   "at now, 0 = no limit", name, flow.get("max_lag_rate_bytes") or 0)

    sync = st.get("sync") or {}
    g = _gauge("duplex_resync_remaining_bytes", "bytes a catch-up or initial sync still has "
               "to send", ["name"])
    g.add_metric([name], max(0, (sync.get("total_bytes") or 0) - (sync.get("done_bytes") or 0)))
    yield g

    written = st.get("written_bytes")
    if written is not None:
        c = CounterMetricFamily("duplex_device_written_bytes", "bytes written to the device "
                                "through the export", labels=["name"])
        c.add_metric([name], written)
        yield c

    refused = CounterMetricFamily("duplex_frames_refused", "connections and frames refused "
                                  "from the peer, by reason", labels=["name", "reason"])
    for reason, n in sorted((st.get("refused") or {}).items()):
        refused.add_metric([name, reason], n)
    yield refused

    faults = _gauge("duplex_thread_faults", "supervised threads that raised and are "
                    "restarting or failed", ["name"])
    faults.add_metric([name], len(st.get("faults") or []))
    yield faults

    group = st.get("group") or {}
    view = group.get("view") or {}
    rel = (view.get("released") or group.get("released") or {})
    if group and rel.get("t"):
        g = _gauge("duplex_group_point_timestamp_seconds", "the consistency group's released "
                   "point (DESIGN §13)", ["group"])
        g.add_metric([group.get("group", "")], rel["t"] / 1e9)
        yield g


def serve(address: tuple[str, int], status: Callable[[], dict]):
    """Serve the node's metrics on *address* (host, port) in a daemon
    thread; returns the HTTP server (``shutdown()`` stops it). OSError when
    the address cannot be bound."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    server, _thread = start_http_server(address[1], addr=address[0], registry=registry)
    log.info("metrics on http://%s:%d/metrics", address[0], address[1])
    return server

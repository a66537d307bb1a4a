"""The replication mode's metrics (replicator/metrics.py) from a primary's
status document: the protocol in force, the congestion state and the
time writers waited, each readable the way a scrape reads it."""
from __future__ import annotations

from prometheus_client.registry import CollectorRegistry

from replicator.metrics import StatusCollector


def _registry(st: dict) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(StatusCollector(lambda: st))
    return reg


STATUS = {
    "resource": "r0", "node": "alpha", "role": "Primary", "connection": "Connecting",
    "replication": "Off", "disk": "UpToDate", "peer": {"name": "beta", "disk": "Unknown"},
    "seq": {"written": 9, "journaled": 5, "applied": 5},
    "lag": {"writes": 4, "bytes": 0, "seconds": 0.5}, "out_of_sync_bytes": 0,
    "protocol": "C", "protocol_effective": "A", "protocol_note": "degraded: the peer is away",
    "congestion": "blocked", "congestion_blocked_seconds": 1.25,
    "flow": {"peer_wait_seconds": 0.75, "pull_aheads": 2, "max_lag_rate_bytes": 4 << 20},
}


def test_the_protocol_in_force_and_the_configured_one():
    reg = _registry(STATUS)
    assert reg.get_sample_value("duplex_protocol_in_force",
                                {"name": "r0", "protocol": "A", "configured": "C"}) == 1
    assert reg.get_sample_value("duplex_protocol_in_force",
                                {"name": "r0", "protocol": "C", "configured": "C"}) == 0


def test_congestion_and_the_time_writers_waited():
    reg = _registry(STATUS)
    assert reg.get_sample_value("duplex_congestion", {"name": "r0", "state": "blocked"}) == 1
    assert reg.get_sample_value("duplex_congestion", {"name": "r0", "state": "none"}) == 0
    assert reg.get_sample_value("duplex_congestion_blocked_seconds_total", {"name": "r0"}) == 1.25
    assert reg.get_sample_value("duplex_peer_wait_seconds_total", {"name": "r0"}) == 0.75
    assert reg.get_sample_value("duplex_pull_aheads_total", {"name": "r0"}) == 2
    assert reg.get_sample_value("duplex_max_lag_rate_bytes", {"name": "r0"}) == 4 << 20


def test_a_secondary_has_none_of_them():
    st = {k: v for k, v in STATUS.items() if k not in ("flow", "protocol", "congestion")}
    reg = _registry(st)
    assert reg.get_sample_value("duplex_congestion", {"name": "r0", "state": "none"}) is None

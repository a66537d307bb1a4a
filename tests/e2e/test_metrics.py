"""Prometheus metrics (metrics-address): scrape a running pair and check
the values against `duplex status --json` of the same node, and that a
link cut shows in the connection state; off by default."""
from __future__ import annotations

import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from fixtures.workload import Workload

PORT = 9942


def scrape(ns: str, host: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the node's /metrics,
    fetched inside its namespace."""
    code = (f"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("
            f"'http://{host}:{PORT}/metrics', timeout=5).read().decode())")
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30, check=True)
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def one(samples: dict, metric: str, /, **labels) -> float:
    key = (metric, tuple(sorted(labels.items())))
    assert key in samples, \
        f"{key} not scraped; have {sorted(k for k in samples if k[0] == metric)}"
    return samples[key]


def test_metrics_match_status_on_both_nodes(make_lab, netns_pair):
    lab = make_lab(size=16 << 20)
    lab.set_node_keys("alpha", metrics_address=f"{lab.addr_a}:{PORT}")
    lab.set_node_keys("beta", metrics_address=f"{lab.addr_b}:{PORT}")
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=200).run()
    lab.wait_drained()
    time.sleep(0.3)  # quiet: status and scrape see the same numbers

    a = scrape(lab.ns_a, lab.addr_a)
    st = lab.control("alpha")
    assert one(a, "duplex_up") == 1
    assert one(a, "duplex_resource_role", name="r0", role="Primary") == 1
    assert one(a, "duplex_resource_role", name="r0", role="Secondary") == 0
    assert one(a, "duplex_connection_state", name="r0", conn_name="beta",
               state="Connected") == 1
    assert one(a, "duplex_replication_state", name="r0", conn_name="beta",
               state="Established") == 1
    assert one(a, "duplex_seq", name="r0", kind="written") == st["seq"]["written"]
    assert one(a, "duplex_seq", name="r0", kind="applied") == st["seq"]["applied"]
    assert one(a, "duplex_device_written_bytes_total", name="r0") == st["written_bytes"] > 0
    assert one(a, "duplex_ring_size_bytes", name="r0") == st["ring"]["capacity"]
    assert one(a, "duplex_peerdevice_outofsync_bytes", name="r0", conn_name="beta",
               volume="default") == st["out_of_sync_bytes"] == 0
    assert one(a, "duplex_lag_writes", name="r0") == st["lag"]["writes"]

    b = scrape(lab.ns_b, lab.addr_b)
    sb = lab.control("beta")
    assert one(b, "duplex_resource_role", name="r0", role="Secondary") == 1
    assert one(b, "duplex_seq", name="r0", kind="journaled") == sb["seq"]["journaled"]
    assert one(b, "duplex_journal_used_bytes", name="r0") == sb["journal"]["used_bytes"]
    assert one(b, "duplex_journal_size_bytes", name="r0") == sb["journal"]["size"]
    point = one(b, "duplex_consistent_point_timestamp_seconds", name="r0")
    assert abs(point - sb["consistent_point_ns"] / 1e9) < 1e-6 and point > time.time() - 120

    netns_pair.link_down()
    lab.wait(lambda: lab.control("alpha")["connection"] != "Connected", "the link cut seen")
    a2 = scrape(lab.ns_a, lab.addr_a)
    state = lab.control("alpha")["connection"]
    assert one(a2, "duplex_connection_state", name="r0", conn_name="beta", state=state) == 1
    netns_pair.link_up()


def test_a_metrics_address_it_cannot_bind_is_refused_before_ready(make_lab):
    lab = make_lab(size=8 << 20)
    lab.set_node_keys("beta", metrics_address="192.0.2.7:9942")  # not this host's
    lab.create_md()
    r = lab.duplex("beta", "up", "r0", "--role", "secondary", check=False, netns=True,
                   timeout=30)
    assert r.returncode == 1
    assert "metrics-address" in r.stderr and "Traceback" not in r.stderr, r.stderr

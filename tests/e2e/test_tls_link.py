"""TLS on the replication link, end to end (DESIGN §9): a pair replicating
over TLS between two network namespaces, the wire captured on the
secondary's veth (an AF_PACKET socket, as tcpdump reads it) to show the
payload is not in clear there while it is without TLS; a certificate from
another CA, one that names another node, and a plaintext peer are refused
on both sides with the reason in status."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbd
import pytest

from fixtures.duplex_lab import RESOURCE
from fixtures.netns import IFNAME_B
from fixtures.tls_certs import Cert, make_ca, make_cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command makes the test certificates")

CAPTURE = Path(__file__).with_name("tls_capture.py")
# 16 bytes that occur nowhere else: a TLS record or a TCP header cannot hold them by chance.
PATTERN = b"DuplexTlsProbe\x5a\xa5"
PAYLOAD = PATTERN * (256 << 10 // len(PATTERN))  # 256 KiB


def _certs(tmp: Path) -> dict[str, Cert]:
    ca = make_ca(tmp / "pki")
    return {"ca": ca, "alpha": make_cert(tmp / "pki", ca, "alpha"),
            "beta": make_cert(tmp / "pki", ca, "beta")}


def _tls_config(lab, certs: dict[str, Cert]) -> None:
    lab.write_config(**{"tls": True, "tls-ca": str(certs["ca"].cert)})
    for node in ("alpha", "beta"):
        lab.set_node_keys(node, tls_cert=str(certs[node].cert), tls_key=str(certs[node].key))


def _write(uri: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def _capture(lab, procs, tmp: Path):
    out = tmp / "wire.bin"
    p = procs.start([sys.executable, str(CAPTURE), IFNAME_B, str(out)], name="capture",
                    netns=lab.ns_b)
    lab.wait(lambda: "capturing" in p.log_text(200), "the capture to start", proc=p)
    return p, out


def _replicate_pattern(lab, procs, tmp: Path) -> bytes:
    """Start the pair under a capture, write PAYLOAD, drain; the capture."""
    lab.create_md()
    cap, out = _capture(lab, procs, tmp)
    lab.start_secondary()
    lab.start_primary()
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "streaming")
    _write(lab.uri, 1 << 20, PAYLOAD)
    lab.wait_drained()
    cap.stop(grace=5)
    assert lab.digest("beta") == lab.digest("alpha")
    with open(lab.image["beta"], "rb") as f:
        f.seek(1 << 20)
        assert f.read(len(PAYLOAD)) == PAYLOAD
    return out.read_bytes()


def test_pair_replicates_over_tls_and_the_payload_is_not_in_clear(make_lab, procs, tmp_path):
    lab = make_lab()
    _tls_config(lab, _certs(tmp_path))
    wire = _replicate_pattern(lab, procs, tmp_path)
    # The capture saw the replication traffic (at least the payload's size
    # went by), and not one copy of the pattern is readable in it.
    assert len(wire) > len(PAYLOAD), f"the capture holds {len(wire)} bytes only"
    assert PATTERN not in wire, "the payload crossed the veth in clear despite tls = true"
    st = lab.control("alpha")
    assert st["connection"] == "Connected"


def test_without_tls_the_capture_sees_the_payload(make_lab, procs, tmp_path):
    # The capture's own check: the same run in plaintext shows the pattern.
    lab = make_lab()
    wire = _replicate_pattern(lab, procs, tmp_path)
    assert wire.count(PATTERN) >= len(PAYLOAD) // len(PATTERN) // 2


def _refused_both(lab, primary_words: str, secondary_words: str) -> tuple[str, str]:
    """Wait for the primary's status and the secondary's to give the
    refusal reason; both texts."""
    def primary():
        st = lab.control("alpha")
        text = json.dumps(st)
        return text if st["connection"] == "StandAlone" and primary_words in text else None

    def secondary():
        text = json.dumps(lab.control("beta"))
        return text if secondary_words in text else None

    p = lab.wait(primary, f"the primary to report {primary_words!r}", timeout=40)
    s = lab.wait(secondary, f"the secondary to report {secondary_words!r}", timeout=40)
    assert lab.control("beta")["seq"]["applied"] == 0
    return p, s


def test_certificate_of_another_ca_is_refused_on_both_sides(make_lab, tmp_path):
    lab = make_lab()
    certs = _certs(tmp_path)
    other = make_ca(tmp_path / "other", name="rogue-ca")
    certs["alpha"] = make_cert(tmp_path / "other", other, "alpha")
    _tls_config(lab, certs)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    # beta checks alpha's certificate against tls-ca and refuses it; alpha
    # hears beta's alert.
    p, s = _refused_both(lab, "refused our certificate", "not trusted")
    assert "unknown ca" in p or "certificate" in p
    assert lab.primary.is_running() and lab.secondary.is_running()


def test_certificate_naming_another_node_is_refused_on_both_sides(make_lab, tmp_path):
    lab = make_lab()
    certs = _certs(tmp_path)
    # Signed by the right CA, but for "gamma": not the node beta expects.
    certs["alpha"] = make_cert(tmp_path / "pki", certs["ca"], "gamma", file="alpha-as-gamma")
    _tls_config(lab, certs)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    p, s = _refused_both(lab, "refused your certificate", "is for 'gamma', not node 'alpha'")
    assert "gamma" in p


def test_cn_names_the_node_when_the_certificate_has_no_san(make_lab, tmp_path):
    lab = make_lab()
    certs = _certs(tmp_path)
    certs["alpha"] = make_cert(tmp_path / "pki", certs["ca"], "alpha", san=[],
                               file="alpha-cn-only")
    _tls_config(lab, certs)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    _write(lab.uri, 0, PAYLOAD[:65536])
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")


def _split_configs(lab, certs, tls_on: str) -> None:
    """Node *tls_on* gets a config with tls = true, the other one without."""
    _tls_config(lab, certs)
    tls_cfg = lab.config.with_name("duplex-tls.toml")
    tls_cfg.write_text(lab.config.read_text())
    lab.write_config()
    plain_cfg = lab.config.with_name("duplex-plain.toml")
    plain_cfg.write_text(lab.config.read_text())
    lab.config = tls_cfg if tls_on == "beta" else plain_cfg
    lab.create_md()
    lab.start_secondary()
    lab.config = tls_cfg if tls_on == "alpha" else plain_cfg
    lab.start_primary()


def test_plaintext_primary_meeting_a_tls_secondary_is_refused_on_both_sides(make_lab, tmp_path):
    lab = make_lab()
    _split_configs(lab, _certs(tmp_path), tls_on="beta")
    p, s = _refused_both(lab, "requires TLS", "connected in plaintext")
    assert lab.primary.is_running() and lab.secondary.is_running()


def test_tls_primary_meeting_a_plaintext_secondary_is_refused_on_both_sides(make_lab, tmp_path):
    lab = make_lab()
    _split_configs(lab, _certs(tmp_path), tls_on="alpha")
    p, s = _refused_both(lab, "answered in plaintext", "the peer speaks TLS")
    assert lab.primary.is_running() and lab.secondary.is_running()


def test_initial_sync_and_a_restarted_secondary_catch_up_over_tls(make_lab, tmp_path):
    # The catch-up's frames (increments, DATA from Python) and resuming from
    # the ring after a kill -9 go through the same TLS socket.
    import signal
    import threading

    from fixtures.workload import Workload

    lab = make_lab(options={"ring-size": "64MiB"})
    _tls_config(lab, _certs(tmp_path))
    lab.create_md(assume_clean=False)
    lab.start_primary()
    _write(lab.uri, 0, PAYLOAD)  # before the secondary exists: initial sync carries it
    sec = lab.start_secondary()
    wl = Workload(lab.uri, lab.size, threads=3, ops_per_thread=400, seed=11)
    t = threading.Thread(target=wl.run)
    t.start()
    lab.wait(lambda: lab.control("beta")["seq"]["applied"] > 100, "some writes applied",
             timeout=120)
    sec.send_signal(signal.SIGKILL)
    sec.wait(10)
    lab.start_secondary()
    t.join()
    assert not wl.errors
    lab.wait_drained(timeout=180)
    assert lab.digest("beta") == lab.digest("alpha")

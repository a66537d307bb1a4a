"""Compression on the wire, end to end (DESIGN §9): a pair between two
network namespaces with ``compression = "zstd"`` or ``"lz4"``, the bytes on
the secondary's veth counted by an AF_PACKET capture (tls_capture.py):
compressible writes cross in a fraction of their size, incompressible ones
go stored and still replicate, and a catch-up's increments (INCR_DATA) are
compressed too. The images are compared byte for byte after each drain."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbd
import pytest

from fixtures.netns import IFNAME_B

pytest.importorskip("zstandard")
pytest.importorskip("lz4.block")

CAPTURE = Path(__file__).with_name("tls_capture.py")
TEXT = b"".join(b"row %08d: the quick brown fox jumps over the lazy dog\n" % i
                for i in range(80000))[:4 << 20]  # 4 MiB of text


def _write(uri: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        for i in range(0, len(data), 1 << 20):
            h.pwrite(data[i:i + (1 << 20)], offset + i)
        h.flush()
    finally:
        h.shutdown()


def _capture(lab, procs, tmp: Path):
    out = tmp / f"wire-{len(list(tmp.glob('wire-*')))}.bin"
    p = procs.start([sys.executable, str(CAPTURE), IFNAME_B, str(out)], name="capture",
                    netns=lab.ns_b)
    lab.wait(lambda: "capturing" in p.log_text(200), "the capture to start", proc=p)
    return p, out


def _wire_bytes(lab, procs, tmp: Path, data: bytes) -> int:
    """Write *data* to the streaming pair under a capture: the bytes seen."""
    cap, out = _capture(lab, procs, tmp)
    _write(lab.uri, 8 << 20, data)
    lab.wait_drained()
    cap.stop(grace=5)
    assert lab.digest("beta") == lab.digest("alpha")
    return out.stat().st_size


def _streaming(lab) -> None:
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "streaming")


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compressible_writes_cross_in_a_fraction_of_their_size(make_lab, procs, tmp_path, codec):
    lab = make_lab(size=32 << 20, options={"compression": codec})
    _streaming(lab)
    wire = _wire_bytes(lab, procs, tmp_path, TEXT)
    # Frames, TCP/IP headers and ACKs included: well under a quarter.
    assert wire < len(TEXT) // 4, f"{codec}: {wire} bytes captured for {len(TEXT)} written"


def test_without_compression_the_same_writes_cross_whole(make_lab, procs, tmp_path):
    # The capture's own check: it counts every byte of an uncompressed run.
    lab = make_lab(size=32 << 20)
    _streaming(lab)
    assert _wire_bytes(lab, procs, tmp_path, TEXT) > len(TEXT)


def test_incompressible_writes_go_stored_and_replicate(make_lab, procs, tmp_path):
    lab = make_lab(size=32 << 20, options={"compression": "zstd", "compression-level": 1})
    _streaming(lab)
    noise = os.urandom(4 << 20)
    wire = _wire_bytes(lab, procs, tmp_path, noise)
    assert wire > len(noise)  # nothing to gain: sent as it is (no expansion either way)


def test_initial_sync_increments_are_compressed(make_lab, procs, tmp_path):
    # The primary's image already holds the text when the pair first
    # meets: the initial sync's INCR_DATA frames carry it, compressed.
    lab = make_lab(size=32 << 20, options={"compression": "zstd"})
    with open(lab.image["alpha"], "r+b") as f:
        f.seek(8 << 20)
        f.write(TEXT)
    lab.create_md(assume_clean=False)
    cap, out = _capture(lab, procs, tmp_path)
    lab.start_secondary()
    lab.start_primary()
    lab.wait_drained(timeout=180)
    cap.stop(grace=5)
    assert lab.digest("beta") == lab.digest("alpha")
    assert out.stat().st_size < len(TEXT) // 4, f"{out.stat().st_size} bytes captured"

"""The secondary of a two-volume resource against the real primary (DESIGN
§8): nbdkit serving volumes "data" and "wal" (fixtures.volume_primary,
started as `duplex up` starts it) replicates to a Secondary run in this
process on beta's two images. Writes on both exports reach beta's images
at their offsets, in one order; after the secondary was away, the catch-up
increment (logical tracks, both volumes) brings both images to the
primary's again; a verify finds nothing different, and a block changed in
beta's 'wal' behind Duplex's back at its logical track; the primary lost,
the running secondary is promoted with one loss report naming the volumes."""
from __future__ import annotations

import nbd
import pytest

from fixtures.duplex_lab import RESOURCE, Lab
from fixtures.volume_primary import create_md, free_port, serve_primary_alone

MiB = 1 << 20
WAL_SIZE = 4 * MiB + 4096  # not whole tracks: an alignment gap follows it


def _connect(sock, export: str):
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(str(sock))
    return h


def _start_beta(lab: Lab):
    from replicator.secondary.daemon import Secondary

    sec = Secondary.open(str(lab.config), RESOURCE, "beta")
    sec.start()
    return sec


@pytest.fixture
def pair(tmp_path, procs):
    """(lab, secondary): alpha's primary served by nbdkit, beta's Secondary here."""
    lab = Lab(tmp_path / "lab", procs, None, None, size=8 * MiB, volumes=["data", "wal"],
              port=free_port(), volume_sizes={"wal": WAL_SIZE},
              options={"ring-size": "1MiB"})  # an outage outgrows it: an increment
    proc = serve_primary_alone(lab)
    create_md(lab, "beta")
    box = {"sec": _start_beta(lab)}
    yield lab, box, proc
    if box["sec"] is not None:
        box["sec"].stop()
    lab.stop()


def _write_both(lab: Lab, rounds: int, seed: int) -> None:
    """A chain alternating volumes; each write waits for the one before."""
    data, wal = _connect(lab.sock, "data"), _connect(lab.sock, "wal")
    try:
        for i in range(rounds):
            blk = bytes([(seed + i) % 251 + 1]) * 4096
            data.pwrite(blk, (i * 69632) % (8 * MiB - 4096))
            wal.pwrite(blk, (i * 20480) % (WAL_SIZE - 4096))
        wal.pwrite(b"E" * 4096, WAL_SIZE - 4096)   # the wal's last block, before the gap
        data.pwrite(b"T" * 4096, 8 * MiB - 4096)   # data's last block
        wal.flush()                                 # covers both volumes
    finally:
        data.shutdown()
        wal.shutdown()


def _same_images(lab: Lab) -> None:
    for vol in ("data", "wal"):
        a, b = lab.images["alpha"][vol].read_bytes(), lab.images["beta"][vol].read_bytes()
        assert len(a) == len(b) and a == b, \
            f"volume {vol}: beta differs from alpha ({len(a)} vs {len(b)} bytes)"


def test_writes_on_both_exports_reach_the_secondary_images_and_catch_up_after_an_outage(
        pair, caplog):
    lab, box, proc = pair
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "connected",
             timeout=30)
    _write_both(lab, 40, seed=1)
    st = lab.wait_drained(timeout=60)
    assert [(v["name"], v["size"]) for v in st["volumes"]] == [("data", 8 * MiB),
                                                               ("wal", WAL_SIZE)], st["volumes"]
    _same_images(lab)
    # The secondary goes away; the primary goes on (its writes out of sync),
    # then the catch-up increment brings back both volumes at one point.
    box["sec"].stop()
    box["sec"] = None
    _write_both(lab, 200, seed=77)               # 1.6 MB: more than the ring holds
    p = lab.control("alpha")
    assert p["out_of_sync_bytes"] > 0 and all(v["out_of_sync_bytes"] for v in p["volumes"]), p
    caplog.set_level("INFO", logger="duplex.secondary")
    box["sec"] = _start_beta(lab)
    lab.wait_drained(timeout=60)
    _same_images(lab)
    applied = [r.getMessage() for r in caplog.records
               if r.name == "duplex.secondary" and " applied (" in r.getMessage()]
    assert any("increment" in m for m in applied), "the catch-up was no increment"
    # Verify reads each logical track from the right image on both sides.
    assert _verify(lab)["differing"] == []
    # One block of beta's 'wal' changed behind Duplex's back: verify finds
    # that track (logical 8 MiB + 2 MiB: read from beta's wal image) and
    # names it by volume.
    with open(lab.images["beta"]["wal"], "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"X" * 512)
    st = _verify(lab)
    assert st["differing"] == [{"volume": "wal", "offset": 2 * MiB, "length": 64 << 10}], \
        st["differing"]
    # The primary is lost: the running secondary is promoted; one loss
    # report for the resource, naming the volumes.
    from replicator.metadata import load_metadata
    from replicator.promote import promote_running

    proc.stop(grace=10)
    lab.wait(lambda: not box["sec"].links or not any(l.alive() for l in box["sec"].links),
             "the link to go", timeout=30)
    out = promote_running(box["sec"])
    assert out["loss_report"]["volumes"] == ["data", "wal"], out["loss_report"]
    assert out["loss_report"]["lost"] == [], out["loss_report"]
    assert load_metadata(lab.meta["beta"], RESOURCE).role == "Primary"


def _verify(lab: Lab) -> dict:
    import time

    from replicator.control import request

    request(lab.meta["alpha"], "verify", resource=RESOURCE, fix=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = request(lab.meta["alpha"], "verify-status", resource=RESOURCE)
        if not st["running"]:
            assert not st.get("failure"), st
            return st
        time.sleep(0.1)
    raise AssertionError("verify did not finish in 60 s")

"""The secondary's disks failing, in a real lab (issue 16 item 5): its image
returning EIO for a while and for good, its image going read-only, its
meta-dir (where the journal lives) filling up.

Each time the same promise: the secondary stops applying and says why in
status (disk Failed, with the reason), the primary goes Ahead once the
journal and the ring are full and keeps the bitmap, nothing is lost, and
replication resumes once the disk is back (by itself, or at once with
``duplex connect r0``); the final images are compared byte for byte.

The image is a /dev/loopN whose writes fail on demand (fixtures/
faulty_disk.py: nbdkit's error filter behind nbdfuse + losetup). The
secondary writes it through the page cache, so a failing disk mostly shows
as a failed fdatasync: the pages it wrote since the last checkpoint may be
gone from the cache, and only the journal still has them.
(tests/e2e/test_secondary_disk_full.py is the image filesystem filling up.)
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import nbd
import pytest

from fixtures.faulty_disk import fill, make_faulty_disk, small_fs

SIZE = 16 << 20
CHUNK = 256 << 10
# Small enough that a few MiB of writes fill the journal and then the
# ring while the image fails: the primary goes Ahead.
OPTIONS = {"ring-size": "1MiB", "journal-size": "8MiB"}


@pytest.fixture
def faulty(procs, nbd_block_device, tmp_path, shm_dir):
    """Factory: a FaultyDisk of *size* bytes (request before make_lab: the
    lab stops before the device is detached)."""
    def make(size: int = SIZE, name: str = "beta-disk"):
        return make_faulty_disk(procs, nbd_block_device, tmp_path / "disks", shm_dir, size, name)
    return make


def _lab_on(make_lab, device: str | None = None, meta: Path | None = None, **opts):
    """A connected lab whose secondary image is *device* (default: a file)
    and whose secondary meta-dir is *meta* (default: under the lab)."""
    lab = make_lab(size=SIZE, options={**OPTIONS, **opts})
    if device is not None:
        lab.image["beta"] = Path(device)
        lab.images["beta"][""] = Path(device)
    if meta is not None:
        lab.meta["beta"] = meta
    lab.write_config()
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    lab.wait(lambda: lab.status("alpha").get("peer", {}).get("disk") in ("UpToDate", "Consistent"),
             "the two sides to connect", timeout=30)
    return lab


def _write(lab, first: int, count: int, fua: bool = False) -> None:
    """CHUNK-sized writes of distinct data at chunks first..first+count-1
    (mod the device), then a flush."""
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        for i in range(first, first + count):
            h.pwrite(bytes([i % 251 + 1]) * CHUNK, i * CHUNK % SIZE,
                     nbd.CMD_FLAG_FUA if fua else 0)
        h.flush()
    finally:
        h.shutdown()


def _failed(lab, *words: str) -> dict:
    """Until beta's disk is Failed with every one of *words* in the reason."""
    return lab.wait(lambda: (s := lab.status("beta")) and s.get("disk") == "Failed"
                    and all(w in (s.get("reason") or "") for w in words) and s,
                    f"beta's disk to be Failed ({', '.join(words)})", timeout=60)


def _ahead(lab) -> dict:
    """Until the primary has gone Ahead (writes only mark its bitmap) and
    keeps the bitmap, with its peer's disk Failed. Its catch-up then
    starts and waits: the secondary holds an increment while its disk is
    Failed, so the state is Ahead or a stalled SyncSource; either way the
    bitmap holds the tracks."""
    return lab.wait(lambda: (s := lab.control("alpha"))["replication"] in ("Ahead", "SyncSource")
                    and s["out_of_sync_bytes"] > 0 and s["peer"].get("disk") == "Failed" and s,
                    "the primary to go Ahead and keep the bitmap", timeout=60)


def _recovered(lab, image_digest) -> None:
    """Drained, not Failed on either side, images identical."""
    lab.wait_drained(timeout=120)
    beta = lab.status("beta")
    assert beta["disk"] != "Failed" and not beta["apply"]["error"], beta
    lab.wait(lambda: lab.status("alpha")["peer"].get("disk") != "Failed",
             "alpha to see its peer's disk recovered", timeout=30)
    assert image_digest() == lab.digest("alpha"), "the images differ"
    assert "Traceback" not in lab.secondary.log_text()


def test_a_transient_eio_stops_applying_and_it_resumes_by_itself_with_nothing_lost(faulty, make_lab):
    disk = faulty()
    lab = _lab_on(make_lab, disk.device)
    _write(lab, 0, 8)
    lab.wait_drained()
    disk.fail()
    _write(lab, 8, 40)  # 10 MiB: more than the journal and the ring hold
    beta = _failed(lab, "Input/output error", disk.device)
    assert beta["journal"]["used_bytes"] > 0, beta["journal"]  # nothing freed since the failure
    human = lab.duplex("beta", "status", "r0").stdout
    assert "Failed" in human and "Input/output error" in human, human
    alpha = _ahead(lab)
    assert alpha["peer"]["disk"] == "Failed", alpha
    assert "Input/output error" in str(alpha) and disk.device in str(alpha), alpha
    _write(lab, 40, 4)  # Ahead: writes only mark the bitmap
    disk.heal()  # no command: the applier retries with backoff
    _recovered(lab, disk.digest)


def test_a_persistent_eio_holds_over_retries_and_a_restart_until_the_disk_is_back(faulty, make_lab):
    disk = faulty()
    lab = _lab_on(make_lab, disk.device)
    disk.fail()
    _write(lab, 0, 40)
    _failed(lab, "Input/output error")
    _ahead(lab)
    for _ in range(2):  # `duplex connect` retries now; the disk still fails
        r = lab.duplex("beta", "connect", "r0")
        assert "retrying the failed apply now" in r.stdout, r.stdout
    _failed(lab, "Input/output error")
    # A restart while the disk fails: the stop cannot make the image
    # durable, the journal keeps every record, and the start applies them.
    lab.secondary.stop(grace=30)
    disk.heal()
    lab.start_secondary()
    _recovered(lab, disk.digest)


def test_a_read_only_image_is_named_and_applying_resumes_when_it_is_writable(faulty, make_lab):
    disk = faulty()
    lab = _lab_on(make_lab, disk.device)
    _write(lab, 0, 4)
    lab.wait_drained()
    disk.set_readonly(True)
    try:
        _write(lab, 4, 40)
        beta = _failed(lab, "read-only", disk.device)
        _ahead(lab)
        assert beta["seq"]["journaled"] > beta["seq"]["applied"], beta["seq"]
    finally:
        disk.set_readonly(False)
    lab.duplex("beta", "connect", "r0")  # now, if the backoff has not retried already
    _recovered(lab, disk.digest)


@pytest.mark.xfail(strict=False, reason="flaky: 1 CI run in 4 timed out waiting for the primary "
                   "to see the peer's disk Failed while Ahead (a race of the held increment and "
                   "the ACK's disk state, not understood yet: issue 16 note)")
def test_a_full_meta_dir_is_named_and_replication_resumes_when_there_is_room(make_lab, netns_pair,
                                                                           tmp_path):
    meta = tmp_path / "beta-meta"
    with small_fs(tmp_path / "meta.img", meta, 32 << 20):  # the 8 MiB journal and room
        lab = _lab_on(make_lab, meta=meta)
        try:
            _write(lab, 0, 4)
            lab.wait_drained()
            ballast = fill(meta)
            # Streaming needs no room: the journal is preallocated.
            _write(lab, 4, 8)
            lab.wait_drained()
            # A catch-up larger than the journal goes in place, and the
            # metadata (disk Inconsistent until it commits) must be saved.
            netns_pair.link_down()
            _write(lab, 12, 48)
            lab.wait(lambda: lab.control("alpha")["replication"] == "Ahead", "Ahead")
            netns_pair.link_up()
            beta = _failed(lab, "No space left on device", "metadata file", str(meta))
            assert "image" not in beta["apply"]["error"], beta["apply"]
            alpha = _ahead(lab)
            assert "No space left on device" in str(alpha), alpha
            ballast.unlink()
            _recovered(lab, lambda: hashlib.sha256(lab.image["beta"].read_bytes()).hexdigest())
        finally:
            lab.stop()

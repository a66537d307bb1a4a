"""The primary's own device returning EIO (issue 16 item 5), in a real lab:
the NBD client gets the error, nothing is sequenced for a write that did
not happen (the seq counter and the secondary's image show it), and the
other writes replicate as before.

The device is a /dev/loopN whose writes fail on demand (fixtures/
faulty_disk.py). The primary writes it through the page cache, so only a
write that must be durable at once -- FUA, which the C core writes with
RWF_DSYNC -- and a flush see the EIO; the test sends FUA writes while
the device fails (a flush after them succeeds: the kernel reports a
writeback error once per descriptor, and those writes already got it).
"""
from __future__ import annotations

import errno
from pathlib import Path

import nbd
import pytest

from fixtures.faulty_disk import make_faulty_disk

SIZE = 16 << 20
CHUNK = 64 << 10


@pytest.fixture
def faulty(procs, nbd_block_device, tmp_path, shm_dir):
    """Factory: a FaultyDisk (request before make_lab: the lab stops first)."""
    def make(size: int = SIZE, name: str = "alpha-disk"):
        return make_faulty_disk(procs, nbd_block_device, tmp_path / "disks", shm_dir, size, name)
    return make


def _data(i: int) -> bytes:
    return bytes([i % 251 + 1]) * CHUNK


def test_eio_on_the_primarys_device_reaches_the_client_and_sequences_nothing(faulty, make_lab):
    disk = faulty()
    lab = make_lab(size=SIZE)
    lab.image["alpha"] = Path(disk.device)
    lab.images["alpha"][""] = Path(disk.device)
    lab.write_config()
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    lab.wait(lambda: lab.status("alpha").get("peer", {}).get("disk") in ("UpToDate", "Consistent"),
             "the two sides to connect", timeout=30)
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        for i in range(8):
            h.pwrite(_data(i), i * CHUNK)
        h.flush()
        lab.wait_drained()
        before = lab.control("alpha")["seq"]["written"]

        disk.fail()
        for i in range(8, 12):  # durable writes: each sees the device's EIO
            with pytest.raises(nbd.Error) as ei:
                h.pwrite(_data(i), i * CHUNK, nbd.CMD_FLAG_FUA)
            assert ei.value.errnum == errno.EIO, ei.value
        st = lab.control("alpha")
        assert st["seq"]["written"] == before, st["seq"]  # nothing sequenced for them

        disk.heal()
        for i in range(12, 20):  # the other writes go on, and replicate
            h.pwrite(_data(i), i * CHUNK)
        h.flush()
    finally:
        h.shutdown()
    st = lab.control("alpha")
    assert st["seq"]["written"] == before + 8 + 1, st["seq"]  # 8 writes and a flush
    written = st["seq"]["written"]
    lab.wait(lambda: lab.control("beta")["seq"]["applied"] >= written,
             "the secondary to apply every sequenced write")
    # The failed writes' tracks stay out of sync (the device may have
    # changed under them; the page cache still holds their data): the next
    # catch-up sends them. Nothing else is.
    # The primary clears the others' bits once it has read the peer's ack
    # (its sender looks every 20 ms): wait for that, then exactly 4 remain.
    st = lab.wait(lambda: (s := lab.control("alpha"))["out_of_sync_bytes"] <= 4 * CHUNK and s,
                  "the primary to release what the peer journaled", timeout=20)
    assert st["replication"] == "Established", st
    assert st["out_of_sync_bytes"] == 4 * CHUNK, st  # track-size 64KiB = CHUNK
    beta = lab.image["beta"].read_bytes()
    for i in range(8, 12):  # the failed writes are not on the secondary
        assert beta[i * CHUNK:(i + 1) * CHUNK] == bytes(CHUNK), f"failed write {i} replicated"
    for i in (*range(8), *range(12, 20)):
        assert beta[i * CHUNK:(i + 1) * CHUNK] == _data(i), f"write {i} not replicated"
    # Byte for byte with what the primary's disk holds.
    assert beta == disk.read_bytes(), "the secondary differs from the primary's disk"
    # The log names the device and the error (nbdkit's python plugin prints
    # the exception it was given with its traceback: noted in bugs.md).
    assert f"Input/output error: write of {CHUNK} bytes at {8 * CHUNK} to {disk.device}" \
        in lab.primary.log_text()

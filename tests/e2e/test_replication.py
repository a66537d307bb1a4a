"""Ordered replication end to end: real nbdkit with the Duplex plugin in one
network namespace, the secondary daemon in another, real TCP between them,
a real NBD client (libnbd) writing."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
import time
from pathlib import Path

from fixtures.blockdev import mkfs, mounted
from fixtures.duplex_lab import replay_history
from fixtures.workload import Sampler, Workload


def _check_samples_are_prefixes(lab, samples) -> int:
    """Every sample of the secondary must equal the history replayed through
    exactly the seq it had applied. Returns how many were checked."""
    want: dict[int, set[str]] = {}
    for seq, digest in samples:
        want.setdefault(seq, set()).add(digest)
    bad = []

    def check(seq: int, img: bytearray) -> None:
        h = hashlib.sha256(img).hexdigest()
        for d in want[seq]:
            if d != h:
                bad.append(seq)

    replay_history(lab.history, lab.size, want, check)
    assert not bad, f"secondary samples that are not the history replayed to their seq: {bad}"
    return len(samples)


def test_concurrent_workload_replicates_in_order_to_identical_image(make_lab):
    lab = make_lab(size=32 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    # Paced, so that the sampler sees the image at many points of the history.
    wl = Workload(lab.uri, lab.size, threads=4, ops_per_thread=1000, pace=0.002)
    with Sampler(lab.image["beta"], lambda: lab.control("beta"), wl.gate) as sampler:
        wl.run()
        st = lab.wait_drained()
        time.sleep(0.3)
    assert wl.done_ops == 4000
    written = lab.control("alpha")["seq"]["written"]
    img, last = replay_history(lab.history, lab.size)
    assert last == written, f"history ends at seq {last}, primary wrote through {written}"
    assert hashlib.sha256(img).hexdigest() == lab.digest("alpha"), \
        "the primary image is not its own history replayed"
    assert lab.digest("beta") == lab.digest("alpha"), "images differ after drain"
    assert st["seq"]["applied"] == written
    distinct = {s for s, _ in sampler.samples}
    assert len(distinct) >= 10, (f"too few whole samples to show anything: {sampler.samples} "
                                f"({sampler.discarded} discarded)")
    _check_samples_are_prefixes(lab, sampler.samples)


def test_kill9_secondary_mid_stream_loses_nothing(make_lab):
    # A ring large enough to hold what is written while the secondary is
    # down: resuming from the ring is what this test is about.
    lab = make_lab(options={"ring-size": "256MiB"})
    lab.create_md()
    sec = lab.start_secondary()
    lab.start_primary()
    wl = Workload(lab.uri, lab.size, threads=3, ops_per_thread=600, seed=7)
    t = threading.Thread(target=wl.run)
    t.start()
    lab.wait(lambda: lab.control("beta")["seq"]["applied"] > 200, "some writes applied")
    sec.send_signal(signal.SIGKILL)
    sec.wait(10)
    time.sleep(1.0)  # writes go on while the secondary is down
    lab.start_secondary()
    t.join()
    assert not wl.errors
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")
    img, _ = replay_history(lab.history, lab.size)
    assert hashlib.sha256(img).hexdigest() == lab.digest("beta")


def test_link_cut_and_restored_resumes_replication(make_lab, netns_pair):
    lab = make_lab(options={"ring-size": "256MiB"})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=200, seed=3).run()
    lab.wait_drained()
    netns_pair.link_down()
    wl = Workload(lab.uri, lab.size, threads=2, ops_per_thread=300, seed=4)
    started = time.monotonic()
    wl.run()  # writes must not wait for the peer
    cut_writes = time.monotonic() - started
    p = lab.control("alpha")
    assert p["seq"]["written"] > p["seq"]["applied"], "nothing outstanding while cut?"
    netns_pair.link_up()
    lab.wait_drained(timeout=120)
    assert lab.digest("beta") == lab.digest("alpha")
    assert cut_writes < 60


def test_ext4_on_attached_device_replicates_a_clean_filesystem(make_lab, nbd_block_device,
                                                              tmp_path):
    lab = make_lab(size=128 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    dev = nbd_block_device(lab.uri)
    mkfs(dev.path, "ext4")
    files = {}
    with mounted(dev.path, tmp_path / "mnt", fstype="ext4") as mnt:
        for i in range(40):
            data = hashlib.sha256(str(i).encode()).digest() * (1000 + 97 * i)
            (mnt / f"file{i}.bin").write_bytes(data)
            files[f"file{i}.bin"] = hashlib.sha256(data).hexdigest()
        (mnt / "dir").mkdir()
        (mnt / "dir" / "note.txt").write_text("replicated\n")
    lab.wait_drained()
    # A copy, so checking it cannot race the applier.
    copy = tmp_path / "beta-copy.img"
    copy.write_bytes(lab.image["beta"].read_bytes())
    r = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, f"e2fsck on the secondary image:\n{r.stdout}\n{r.stderr}"
    out = subprocess.run(["debugfs", "-R", "ls -l /", str(copy)], capture_output=True, text=True).stdout
    for name in files:
        assert name in out, f"{name} missing on the secondary"
    got = subprocess.run(["debugfs", "-R", "cat /dir/note.txt", str(copy)],
                         capture_output=True, text=True).stdout
    assert got == "replicated\n"
    for name, digest in list(files.items())[:5]:
        data = subprocess.run(["debugfs", "-R", f"cat /{name}", str(copy)],
                              capture_output=True).stdout
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} differs on the secondary"


def test_two_connections_carry_one_stream_in_order(make_lab):
    """Spans are spread over two TCP connections, so frames arrive at the
    secondary in any order; the seq alone decides what is applied."""
    lab = make_lab(size=32 << 20, options={"connections": 2, "batch-bytes": "64KiB"})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    wl = Workload(lab.uri, lab.size, threads=4, ops_per_thread=600, seed=31, pace=0.001)
    with Sampler(lab.image["beta"], lambda: lab.control("beta"), wl.gate) as sampler:
        wl.run()
        lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")
    assert "primary alpha connected" in lab.secondary.log_text()
    assert lab.secondary.log_text().count("primary alpha connected") >= 2, \
        "the primary did not open two connections"
    _check_samples_are_prefixes(lab, sampler.samples)


def test_primary_stops_cleanly_while_the_secondary_has_stopped_reading(make_lab):
    """A secondary that stops reading (here SIGSTOP; in life a full journal
    or a hung host) leaves the primary's C streaming loop in the middle of a
    frame. Stopping the primary must still end: the drain gives up after its
    timeout and the loop is aborted, and nbdkit exits with a clean close."""
    import os

    import nbd

    # A short drain: the stop must come before the primary's reader declares
    # the silent peer dead (6 s), which would free the loop by itself.
    lab = make_lab(size=64 << 20, options={"ring-size": "64MiB", "drain-timeout": "1s"})
    lab.create_md()
    sec = lab.start_secondary()
    pri = lab.start_primary(history=False)
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=50, seed=11).run()
    lab.wait_drained()
    os.kill(sec.pid, signal.SIGSTOP)
    try:
        h = nbd.NBD()
        h.connect_uri(lab.uri)
        chunk = os.urandom(1 << 20)
        for i in range(40):  # well past what the TCP buffers hold
            h.pwrite(chunk, (i % 60) << 20)
        h.shutdown()
        lab.wait(lambda: lab.control("alpha")["ring"]["unsent_bytes"] > 0,
                 "the shipper to be stuck behind the stopped secondary")
        started = time.monotonic()
        rc = pri.stop(grace=60)
        took = time.monotonic() - started
    finally:
        os.kill(sec.pid, signal.SIGCONT)
    assert rc == 0, f"primary exited {rc}:\n{pri.log_text(3000)}"
    assert took < 40, f"primary took {took:.0f} s to stop"
    log = pri.log_text()
    assert "giving up the drain" in log, "the shipper was not stuck: the test shows nothing"
    assert "streaming aborted" in log
    assert "the shipper did not stop" not in log
    assert "primary stopped at seq" in log


def _journal_generation(path) -> int:
    """The journal's superblock generation: one more per checkpoint."""
    import struct
    with open(path, "rb") as f:
        raw = f.read(8192)
    # magic, version, flags, uuid, size, gen: gen is the u64 at byte 40
    return max(struct.unpack_from("<Q", raw, off + 40)[0] for off in (0, 4096))


def test_a_trickle_of_writes_does_not_checkpoint_per_write(make_lab):
    """One write at a time leaves the applier idle after each: it must still
    free the journal soon, but not fdatasync the image and the journal for
    every record (on a real disk that is two flushes per write)."""
    import os

    import nbd

    lab = make_lab(size=8 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    journal = lab.meta["beta"] / "journal"
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        gen0 = _journal_generation(journal)
        started = time.monotonic()
        for i in range(100):  # 5 ms apart: the applier is idle in between
            h.pwrite(os.urandom(4096), i * 4096)
            time.sleep(0.005)
        took = time.monotonic() - started
        checkpoints = _journal_generation(journal) - gen0
    finally:
        h.shutdown()
    assert checkpoints <= took / 0.05 + 3, \
        f"{checkpoints} checkpoints for 100 writes in {took:.2f} s: about one per write"
    # ... and an idle secondary frees its journal all the same.
    lab.wait(lambda: lab.control("beta")["journal"]["used_bytes"] == 0, "the journal freed")
    assert lab.digest("beta") == lab.digest("alpha")


def test_a_data_frame_damaged_in_transit_is_refused_and_sent_again(make_lab, procs, tmp_path):
    """DATA frames carry a CRC of their header only; each record's own CRC
    must catch damage on the wire. A relay on the path flips one bit in one
    record's data: the secondary refuses the frame before journaling it,
    the primary reconnects and sends it again, and the images end
    identical. Every block is written once, so a damaged write that reached
    the image could not be hidden by a later one."""
    import os

    import nbd

    from fixtures.duplex_lab import VENV_BIN

    lab = make_lab(size=16 << 20)
    lab.create_md()
    lab.start_secondary()
    marker = tmp_path / "damaged-seq"
    relay_port = lab.port + 1
    script = Path(__file__).with_name("corrupting_relay.py")
    relay = procs.start([str(VENV_BIN / "python"), str(script), str(relay_port), lab.addr_b,
                         str(lab.port), "20", str(marker)], name="relay", netns=lab.ns_a)
    lab.wait(lambda: "relay listening" in relay.log_text(), "the relay", proc=relay)
    # The primary (only) reaches beta through the relay.
    text = lab.config.read_text()
    lab.config.write_text(text.replace(f'address = "{lab.addr_b}:{lab.port}"',
                                       f'address = "127.0.0.1:{relay_port}"'))
    lab.start_primary(history=False)
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        for i in range(lab.size // 16384):
            h.pwrite(os.urandom(16384), i * 16384)
            if i % 64 == 0:
                time.sleep(0.01)  # several frames, not one
    finally:
        h.shutdown()
    lab.wait(lambda: marker.exists(), "the relay to damage a frame")
    lab.wait_drained()
    damaged = int(marker.read_text())
    assert lab.digest("beta") == lab.digest("alpha"), "the damage reached the secondary's image"
    log = lab.secondary.log_text()
    assert f"record seq {damaged}: CRC mismatch" in log, \
        f"the damaged record was not named:\n{log[-3000:]}"
    assert "Traceback" not in log

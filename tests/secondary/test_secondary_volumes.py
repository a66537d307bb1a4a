"""The secondary of a resource with two volumes (issue 12, DESIGN §8): one
journal and one pending queue, each record applied to its volume's image
at its volume-relative offset, in seq order; a record naming a volume the
resource lacks is refused at receipt (nothing journaled, nothing written);
catch-up increments at LOGICAL offsets split across both images and
applied atomically, redone whole after a kill -9 mid-apply; verify digests
of logical tracks cut at a volume's end; a FLUSH syncs every image; a
reflink snapshot of every image, restored together; offline promote
writes one loss report naming each lost write's volume.

A real Secondary (metadata, journal, pending queue) on two image files;
no primary: frames are fed to its reader-side calls."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from _secondary_helpers import ImageModel, fill, first_diff, rec
from replicator.config import load_config
from replicator.metadata import create_metadata, load_metadata
from replicator.node import create_node_files
from replicator.promote import promote_offline
from replicator.protocol.errors import ProtocolError
from replicator.protocol.messages import (Data, IncrBegin, IncrCommit, IncrData, IncrZero, Tokens,
                                          VerifyReq)
from replicator.records import OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO
from replicator.secondary import snapshot
from replicator.secondary.daemon import Secondary, SecondaryError
from replicator.secondary.pending import StreamError
from replicator.tracks import track_digest

REPO = Path(__file__).resolve().parents[2]
TRACK = 64 << 10
DATA = 5 * TRACK + 4096        # not a whole number of tracks: an alignment gap follows
WAL = 4 * TRACK
WAL_BASE = 6 * TRACK           # round_up(DATA, TRACK)
LOGICAL = WAL_BASE + WAL
SIZES = {0: DATA, 1: WAL}
NAMES = ("data", "wal")


def _config(tmp: Path, sizes: dict[int, int] = SIZES) -> Path:
    secret = tmp / "r0.secret"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    tables = []
    for node, port in (("alpha", 7791), ("beta", 7790)):
        tables.append(f"""
[resource.r0.on.{node}]
address = "127.0.0.1:{port}"
meta-dir = "{tmp}/meta-{node}"
export = "unix:{tmp}/{node}.nbd"
""")
        for i, name in enumerate(NAMES):
            img = tmp / f"{node}-{name}.img"
            with open(img, "wb") as f:
                f.truncate(sizes[i])
            tables.append(f"""[resource.r0.on.{node}.volume.{name}]
device = "{img}"
""")
    path = tmp / "duplex.toml"
    path.write_text(f"""
[resource.r0]
secret-file = "{secret}"
journal-size = "8MiB"
ring-size = "1MiB"
al-extent-size = "1MiB"
""" + "".join(tables))
    return path


@pytest.fixture
def cfg(tmp_path) -> Path:
    """A two-volume resource; beta's metadata and node files made."""
    path = _config(tmp_path)
    res = load_config(path).resource("r0")
    node = res.node("beta")
    md = create_metadata(node.meta_dir, "r0", "beta", LOGICAL, res.track_size,
                         assume_clean=True,
                         volumes=[{"name": n, "size": SIZES[i]} for i, n in enumerate(NAMES)])
    create_node_files(load_config(path), res, node, md)
    return path


def _close(sec: Secondary) -> None:
    """As stop() without threads: checkpoint, close journal, images, claims."""
    sec._checkpoint()
    sec._close_own_oos()
    sec.journal.close()
    sec.close_images()
    if sec.claim is not None:
        sec.claim.close()


@pytest.fixture
def beta(cfg):
    sec = Secondary.open(str(cfg), "r0", "beta")
    try:
        yield sec
    finally:
        if sec.images:
            _close(sec)


def _feed(sec: Secondary, recs, tokens=None) -> None:
    """As a reader would: TOKENS, then DATA, then group commit."""
    toks = tokens if tokens is not None else recs
    if toks:
        sec._on_tokens(Tokens(b"".join(r.raw[:48] for r in toks)))
    if recs:
        sec._on_data(Data(memoryview(b"".join(r.raw for r in recs))))
    sec._commit_received()


def _apply_all(sec: Secondary) -> None:
    while sec.apply_next_run(sec.journaled - sec.pending.applied_through):
        pass


def _images(sec: Secondary) -> dict[int, bytes]:
    out = {}
    for vol, path in sec.devices.items():
        data = Path(path).read_bytes()
        out[vol] = data + bytes(SIZES[vol] - len(data))
    return out


def _replay(history) -> dict[int, bytes]:
    """Each volume's image after the history (a model of the primary)."""
    models = {v: ImageModel(SIZES[v]) for v in SIZES}
    for r in history:
        if r.token.op != OP_FLUSH:
            models[r.token.volume].apply(r.token, r.raw[48:48 + r.token.data_len])
    return {v: bytes(m.buf) for v, m in models.items()}


def _history() -> list:
    """Writes, trims and zeros alternating over both volumes, overlapping,
    up to the end of each volume, and a flush."""
    h = []
    seq = 0

    def add(vol, off, n, op=OP_WRITE):
        nonlocal seq
        seq += 1
        if op == OP_WRITE:
            h.append(rec(seq, off, fill(seq, n), volume=vol))
        else:
            h.append(rec(seq, off, op=op, length=n, volume=vol))

    for i in range(12):
        add(i % 2, (i * 12288) % (3 * TRACK), 16384)
    add(0, DATA - 8192, 8192)           # the last bytes of 'data', in its partial track
    add(1, WAL - 4096, 4096)            # the last block of 'wal'
    add(0, 4096, 8192, OP_TRIM)
    add(1, 0, 0, OP_FLUSH)
    add(1, 8192, 4096, OP_ZERO)
    add(0, 0, 4096)
    add(1, 0, 4096)
    return h


def test_records_of_two_volumes_land_in_their_images_in_seq_order(beta, cfg):
    sec = beta
    hist = _history()
    # Frames out of seq order (another connection's frame first): the
    # queue waits for the gap, then applies in order.
    _feed(sec, hist[10:], tokens=hist)
    _apply_all(sec)
    assert sec.pending.applied_through == 0
    _feed(sec, hist[:10], tokens=[])
    _apply_all(sec)
    assert sec.pending.applied_through == len(hist)
    want, got = _replay(hist), _images(sec)
    for v in SIZES:
        assert got[v] == want[v], f"volume {NAMES[v]}: {first_diff(got[v], want[v])}"
    # The other volume's image was never written past its own records:
    # 'wal' is untouched beyond what its writes cover (the model says so).
    # After a restart (journal replayed, nothing left to apply) the same.
    _close(sec)
    again = Secondary.open(str(cfg), "r0", "beta")
    try:
        assert again.pending.applied_through == len(hist)
        assert _images(again) == want
    finally:
        _close(again)


def test_a_restart_applies_the_journal_of_both_volumes(cfg):
    sec = Secondary.open(str(cfg), "r0", "beta")
    hist = _history()
    _feed(sec, hist)                    # journaled, not applied
    sec._close_own_oos()
    sec.journal.close()
    sec.close_images()
    sec.claim.close()
    again = Secondary.open(str(cfg), "r0", "beta")
    try:
        _apply_all(again)
        want, got = _replay(hist), _images(again)
        for v in SIZES:
            assert got[v] == want[v], f"volume {NAMES[v]}: {first_diff(got[v], want[v])}"
    finally:
        _close(again)


@pytest.mark.parametrize("bad,why", [
    (rec(1, 0, fill(1, 4096), volume=7), "names volume 7, but the resource has 2 volume(s)"),
    (rec(1, WAL - 4096, fill(1, 8192), volume=1), "run past the end of volume 1"),
    (rec(1, DATA, op=OP_TRIM, length=4096, volume=0), "run past the end of volume 0"),
])
def test_a_record_for_a_volume_the_resource_lacks_is_a_protocol_error(beta, bad, why):
    sec = beta
    before = (sec.journal.used_bytes, sec.journal.next_lsn, _images(sec))
    # As a token: refused before anything is queued or journaled.
    with pytest.raises(ProtocolError, match=re.escape(why)):
        sec._on_event(None, Tokens(bad.raw[:48]))
    assert len(sec.pending) == 0
    # As data after a good token of the same seq (the header differs: the
    # volume check names it first) and as data after its own token.
    with pytest.raises(StreamError, match=re.escape(why)):
        sec._on_data(Data(memoryview(bad.raw)))
    assert (sec.journal.used_bytes, sec.journal.next_lsn, _images(sec)) == before
    assert sec.pending.highest_token_seq == 0


def test_an_increment_across_both_volumes_is_staged_then_applied_at_commit(beta):
    sec = beta
    base = _images(sec)
    pieces = _increment_pieces()
    _send_increment(sec, pieces, commit=False)
    assert _images(sec) == base, "staged: nothing reaches the images before COMMIT"
    sec._on_incr_commit(IncrCommit(1, 5))
    sec._apply_increment(sec._committed.pop(0))
    assert _images(sec) == _expected_after(pieces, base)
    assert sec.pending.applied_through == 5 and sec.journal.applied_seq == 5


def _increment_pieces() -> list[tuple]:
    """(logical offset, data or zero length) pieces of one increment: the
    partial last track of 'data' (cut at its end), tracks of 'wal', a zero
    range in each."""
    return [
        (0, fill(101, TRACK)),
        (5 * TRACK, fill(102, DATA - 5 * TRACK)),      # 'data' ends inside this track
        (WAL_BASE, fill(103, 2 * TRACK)),              # 'wal' tracks 0-1
        (TRACK, 4096 * 3),                             # zeros in 'data'
        (WAL_BASE + 3 * TRACK, TRACK),                 # zeros: the last track of 'wal'
        (WAL_BASE + 2 * TRACK, fill(104, TRACK)),
    ]


def _send_increment(sec, pieces, commit: bool = True, incr_id: int = 1, base: int = 5) -> None:
    """An increment bringing the images to seq *base* (above the applied
    seq 0: a committed increment at or below the checkpoint is not redone)."""
    sec._on_incr_begin(IncrBegin(incr_id, base, 8, sum(p if isinstance(p, int) else len(p)
                                                       for _, p in pieces)))
    for off, p in pieces:
        if isinstance(p, int):
            sec._on_incr_zero(IncrZero(incr_id, off, p))
        else:
            sec._on_incr_data(IncrData(incr_id, off, memoryview(p)))
    if commit:
        sec._on_incr_commit(IncrCommit(incr_id, base))


def _expected_after(pieces, base: dict[int, bytes]) -> dict[int, bytes]:
    imgs = {v: bytearray(b) for v, b in base.items()}
    bases = {0: 0, 1: WAL_BASE}
    for off, p in pieces:
        vol = 1 if off >= WAL_BASE else 0
        rel = off - bases[vol]
        n = p if isinstance(p, int) else len(p)
        imgs[vol][rel:rel + n] = bytes(n) if isinstance(p, int) else p
    return {v: bytes(b) for v, b in imgs.items()}


def test_an_increment_piece_in_the_alignment_gap_is_refused(beta):
    sec = beta
    sec._on_incr_begin(IncrBegin(1, 0, 1, TRACK))
    with pytest.raises(StreamError, match="alignment gap"):
        sec._on_incr_data(IncrData(1, 5 * TRACK, memoryview(fill(9, TRACK))))
    with pytest.raises(StreamError, match="volume field must be 0"):
        sec._on_incr_data(IncrData(1, 0, memoryview(fill(9, 4096)), volume=1))


_CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}, {secondary!r}]
    from test_secondary_volumes import _apply_all, _feed, _history, _increment_pieces, _send_increment
    from replicator.secondary.daemon import Secondary
    sec = Secondary.open({cfg!r}, "r0", "beta")
    if {applied}:                                  # the image already at the base, checkpointed
        _feed(sec, _history()[:{applied}])
        _apply_all(sec)
        sec._checkpoint()
    _send_increment(sec, _increment_pieces())      # committed in the journal
    print("committed", flush=True)
    sec._apply_increment(sec._committed.pop(0))    # slowed: killed in the middle
    print("applied", flush=True)
""")


@pytest.mark.parametrize("applied", [0, 5], ids=["base-above-checkpoint", "base-at-checkpoint"])
def test_a_kill_in_the_middle_of_an_increment_is_redone_on_both_volumes(cfg, applied):
    """The increment brings the images to seq 5; killed while applying it,
    the restart applies it again, whole, to both images -- also when the
    images were already checkpointed at seq 5 before it began (an increment
    of only resync tracks, no new writes: base == checkpoint)."""
    sec = Secondary.open(str(cfg), "r0", "beta")
    base = _images(sec)
    _close(sec)
    before = _replay(_history()[:applied]) if applied else base
    want = _expected_after(_increment_pieces(), before)
    env = dict(os.environ, DUPLEX_TEST_SLOW_INCREMENT_APPLY="0.4")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(tests=str(REPO / "tests"),
                                              secondary=str(REPO / "tests" / "secondary"),
                                              cfg=str(cfg), applied=applied)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "committed", child.stderr.read()
        time.sleep(0.4 * 2.5)          # two or three of the six pieces applied
    finally:
        child.kill()
        child.wait(10)
    devices = sorted(Path(cfg).parent.glob("beta-*.img"))
    torn = {NAMES.index(p.name[5:-4]): p.read_bytes() for p in devices}
    assert torn != want and torn != before, "the kill must land in the middle of the apply"
    again = Secondary.open(str(cfg), "r0", "beta")   # the redo: every volume
    try:
        got = _images(again)
        for v in SIZES:
            assert got[v] == want[v], f"volume {NAMES[v]}: {first_diff(got[v], want[v])}"
        assert again.pending.applied_through == 5
    finally:
        _close(again)


def test_verify_digests_logical_tracks_cut_at_each_volume_end(beta):
    sec = beta
    hist = _history()
    _feed(sec, hist)
    _apply_all(sec)
    imgs = _replay(hist)
    want = []
    for t in range(LOGICAL // TRACK + 1):     # one past the end reads as nothing
        off = t * TRACK
        if off < WAL_BASE:
            chunk = imgs[0][off:off + TRACK]
        else:
            chunk = imgs[1][off - WAL_BASE:off - WAL_BASE + TRACK]
        want.append(track_digest(chunk) if chunk else 0)
    assert len(imgs[0][5 * TRACK:6 * TRACK]) == 4096  # the cut track is short

    class Link:
        def send(self, msg):
            self.msg = msg

    link = Link()
    sec._answer_verify(link, VerifyReq(1, 0, len(want), 0))
    assert list(link.msg.sums) == want


_FLUSH_CHILD = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{tests!r}, {secondary!r}]
    from test_secondary_volumes import _apply_all, _feed
    from _secondary_helpers import fill, rec
    from replicator.records import OP_FLUSH
    from replicator.secondary.daemon import Secondary
    sec = Secondary.open({cfg!r}, "r0", "beta")
    _feed(sec, [rec(1, 0, fill(1, 4096), volume=1), rec(2, op=OP_FLUSH)])
    print(" ".join(str(fd) for fd in sorted(sec.images.values())), flush=True)
    os.getcwd()                      # strace marks: the apply lies between them
    _apply_all(sec)
    os.getcwd()
""")


def test_a_flush_syncs_every_image(cfg, tmp_path):
    """The FLUSH record (volume field 0) fdatasyncs both images, in C: seen
    with strace in a child applying one write and one flush."""
    trace = tmp_path / "trace"
    out = subprocess.run(
        ["strace", "-f", "-qq", "-e", "trace=fdatasync,getcwd", "-o", str(trace),
         sys.executable, "-c", _FLUSH_CHILD.format(tests=str(REPO / "tests"),
                                                   secondary=str(REPO / "tests" / "secondary"),
                                                   cfg=str(cfg))],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    fds = sorted(int(x) for x in out.stdout.split())
    lines = trace.read_text().splitlines()
    marks = [i for i, ln in enumerate(lines) if "getcwd(" in ln]
    assert len(marks) >= 2, lines
    synced = sorted(int(re.search(r"fdatasync\((\d+)\)", ln).group(1))
                    for ln in lines[marks[-2]:marks[-1]] if "fdatasync(" in ln)
    assert synced == fds, (synced, fds)


def test_images_are_checked_against_the_metadata_volume_list_by_name(cfg):
    res = load_config(cfg).resource("r0")
    wal = res.node("beta").volumes[1].device
    with open(wal, "r+b") as f:
        f.truncate(WAL + TRACK)
    with pytest.raises(SecondaryError) as e:
        Secondary.open(str(cfg), "r0", "beta")
    assert str(e.value).startswith(f"r0: volume 'wal': device {wal} is {WAL + TRACK} bytes, "
                                   f"but the metadata"), e.value
    assert f"was made for {WAL} bytes" in str(e.value)
    # The claims were given back: with the size fixed it opens.
    with open(wal, "r+b") as f:
        f.truncate(WAL)
    _close(Secondary.open(str(cfg), "r0", "beta"))


def test_a_snapshot_marker_of_two_images_restores_both(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    imgs = [tmp_path / "data.img", tmp_path / "wal.img"]
    for i, p in enumerate(imgs):
        p.write_bytes(b"new" * 100)
        Path(snapshot.snapshot_path(str(p))).write_bytes(bytes([65 + i]) * 300)
    snap = snapshot.Snapshot(snapshot.snapshot_path(str(imgs[0])), 3, 40,
                             tuple((str(p), snapshot.snapshot_path(str(p))) for p in imgs))
    snapshot._write_marker(meta, snap)
    back = snapshot.pending(meta)
    assert back == snap
    # A crash after the first rename: restoring again finishes the second.
    os.replace(snapshot.snapshot_path(str(imgs[0])), imgs[0])
    snapshot.restore(back, str(imgs[0]), meta)
    assert imgs[0].read_bytes() == b"A" * 300 and imgs[1].read_bytes() == b"B" * 300
    assert snapshot.pending(meta) is None


@pytest.fixture
def xfs_dir(tmp_path: Path):
    """An XFS filesystem with reflinks, in a loop image, mounted."""
    from fixtures.blockdev import reflink_xfs

    if os.geteuid() != 0:
        pytest.fail("the reflink test needs root (loop devices)", pytrace=False)
    with reflink_xfs(tmp_path, 400 << 20) as mnt:
        yield mnt


def test_an_increment_too_large_for_the_journal_runs_under_a_snapshot_of_every_image(xfs_dir):
    cfg = _config(xfs_dir)
    res = load_config(cfg).resource("r0")
    node = res.node("beta")
    md = create_metadata(node.meta_dir, "r0", "beta", LOGICAL, res.track_size, True,
                         volumes=[{"name": n, "size": SIZES[i]} for i, n in enumerate(NAMES)])
    create_node_files(load_config(cfg), res, node, md)
    sec = Secondary.open(str(cfg), "r0", "beta")
    try:
        hist = _history()
        _feed(sec, hist)
        _apply_all(sec)
        before = _images(sec)
        # Announced larger than the journal: written in place, both images cloned.
        sec._on_incr_begin(IncrBegin(1, len(hist), 8, 64 << 20))
        assert sec.incr.snapshot is not None and len(sec.incr.snapshot.images) == 2
        marker = json.loads(snapshot.marker_path(node.meta_dir).read_text())
        assert [e["image"] for e in marker["images"]] == [v.device for v in node.volumes]
        for off, p in _increment_pieces():
            if isinstance(p, int):
                sec._on_incr_zero(IncrZero(1, off, p))
            else:
                sec._on_incr_data(IncrData(1, off, memoryview(p)))
        assert _images(sec) == _expected_after(_increment_pieces(), before)
        # Promoted before it commits: both images go back together.
        sec.stop_receiving("promoted")
        assert _images(sec) == before
        assert snapshot.pending(node.meta_dir) is None
        assert not any(Path(snapshot.snapshot_path(v.device)).exists() for v in node.volumes)
    finally:
        _close(sec)


def test_offline_promote_names_each_lost_write_by_its_volume(cfg):
    sec = Secondary.open(str(cfg), "r0", "beta")
    hist = _history()[:6]
    # Seq 3's data never arrives: 1-2 applied, 3 lost, 4-6 arrived but after the gap.
    _feed(sec, hist[:2] + hist[3:], tokens=hist)
    _close(sec)
    cfgobj = load_config(cfg)
    res = cfgobj.resource("r0")
    out = promote_offline(str(cfg), res, res.node("beta"))
    report = out["loss_report"]
    assert report["consistent_through_seq"] == 2
    assert report["volumes"] == list(NAMES)
    lost = [(w["seq"], w["volume"], w["volume_name"], w["data_arrived"]) for w in report["lost"]]
    assert lost == [(3, 0, "data", False), (4, 1, "wal", True), (5, 0, "data", True),
                    (6, 1, "wal", True)], lost
    text = Path(out["loss_report_path"]).read_text()
    assert json.loads(text)["lost"][1]["volume_name"] == "wal"
    from replicator.secondary.lossreport import LossReport
    human = LossReport.from_json(text).to_text()
    assert "vol wal  write" in human and "vol data  write" in human, human
    assert "(volumes data, wal)" in human, human
    # Both images hold the consistent point: seqs 1-2 only.
    want = _replay(hist[:2])
    for v, name in enumerate(NAMES):
        img = Path(res.node("beta").volumes[v].device).read_bytes()
        assert img == want[v], f"volume {name}: {first_diff(img, want[v])}"
    assert load_metadata(res.node("beta").meta_dir, "r0").role == "Primary"


def test_the_failback_report_names_each_volume_and_its_own_offsets(beta):
    """An old primary's tracks its peer never got, as logical tracks 4-7:
    the end of 'data' (cut at its end: the gap is no one's) and the first
    two tracks of 'wal', each by name at its own offset."""
    sec = beta

    class Peer:
        current = "0" * 32

    sec._write_failback_report(Peer(), [4, 5, 6, 7])
    report = json.loads((sec.md.paths.meta_dir / "failback-report.json").read_text())
    assert report["ranges"] == [
        {"volume": "data", "offset": 4 * TRACK, "length": DATA - 4 * TRACK},
        {"volume": "wal", "offset": 0, "length": 2 * TRACK}], report["ranges"]
    assert report["bytes"] == DATA - 4 * TRACK + 2 * TRACK


def test_status_lists_each_volume_with_its_device_and_size(beta):
    st = beta.status()
    assert [(v["name"], v["device"], v["size"]) for v in st["volumes"]] == [
        (n, beta.devices[i], SIZES[i]) for i, n in enumerate(NAMES)], st["volumes"]

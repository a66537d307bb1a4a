"""Promotion of a stopped secondary from its journal alone (no daemon, no
network): the loss-report example (a hole at 130, data for 131 and 135
beyond it) built in a real journal, applied to a real image file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from replicator.config import load_config
from replicator.native.bitmap import Bitmap
from replicator.errors import DuplexError
from replicator.secondary.journal import Journal
from replicator.metadata import MetaPaths, create_metadata, load_metadata
from replicator.node import create_node_files
from replicator.promote import demote, promote
from replicator.records import OP_TRIM, OP_WRITE, encode_record, unpack_token

SIZE = 4 << 20
TS = 1_700_000_000_000_000_000


def _config(tmp: Path) -> Path:
    secret = tmp / "r0.secret"
    secret.write_text("secret\n")
    os.chmod(secret, 0o600)
    for name in ("alpha", "beta"):
        with open(tmp / f"{name}.img", "wb") as f:
            f.truncate(SIZE)
    path = tmp / "duplex.toml"
    path.write_text(f"""
[resource.r0]
secret-file = "{secret}"
journal-size = "4MiB"
ring-size = "1MiB"
al-extent-size = "1MiB"
[resource.r0.on.alpha]
address = "10.0.0.1:7789"
device = "{tmp}/alpha.img"
meta-dir = "{tmp}/meta-alpha"
export = "unix:{tmp}/alpha.nbd"
[resource.r0.on.beta]
address = "10.0.0.2:7789"
device = "{tmp}/beta.img"
meta-dir = "{tmp}/meta-beta"
export = "unix:{tmp}/beta.nbd"
""")
    return path


def _record(seq: int) -> bytes:
    if seq == 125:
        return encode_record(seq, TS + seq, 4096 * 5, 8192, OP_TRIM, b"", 0)
    data = bytes([seq & 0xFF]) * 4096
    return encode_record(seq, TS + seq, 4096 * (seq % 100), 4096, OP_WRITE, data, 0)


@pytest.fixture
def beta(tmp_path):
    """Config, and beta's metadata and files as create-md makes them."""
    cfg = load_config(_config(tmp_path))
    res = cfg.resource("r0")
    node = res.node("beta")
    md = create_metadata(node.meta_dir, "r0", "beta", SIZE, res.track_size, assume_clean=True)
    create_node_files(cfg, res, node, md)
    return cfg, res, node, md


def test_offline_promote_applies_the_in_order_run_and_reports_fig5(beta):
    cfg, res, node, md = beta
    recs = {s: _record(s) for s in range(120, 137)}
    # Journal as a secondary would leave it: tokens 120..136 except 133
    # (never announced), data for 120..129, 131 and 135 (the loss-report example).
    with Journal.open(str(md.paths.journal), bytes.fromhex(md.node_uuid)) as j:
        j.append_tokens(b"".join(recs[s][:48] for s in recs if s != 133))
        j.append(b"".join(recs[s] for s in [*range(120, 130), 131, 135]))
        j.checkpoint(119)  # as if 1..119 were applied long ago
        j.commit()

    result = promote(cfg, res, node)
    rep = result.report
    assert rep.consistent_through_seq == 129
    assert rep.consistent_through_ts_ns == TS + 129
    assert [w.seq for w in rep.lost] == list(range(130, 137))
    assert [w.seq for w in rep.lost if w.data_arrived] == [131, 135]
    assert [w.seq for w in rep.lost if not w.announced] == [133]
    first = rep.lost[0]
    assert (first.seq, first.offset, first.length, first.op) == (130, 4096 * 30, 4096, "write")
    assert rep.last_known_seq == 136
    # The image holds 120..129 and nothing later: 131 and 135 arrived but
    # sit behind the hole at 130.
    img = Path(node.device).read_bytes()
    for s in range(120, 137):
        tok = unpack_token(recs[s])
        got = img[tok.offset:tok.offset + 4096]
        if s <= 129 and s != 125:
            assert got == bytes([s]) * 4096, f"seq {s} not applied"
        elif s > 129:
            assert got == bytes(4096), f"seq {s} applied past the hole at 130"
    assert img[4096 * 5:4096 * 7] == bytes(8192)  # the trim at 125
    saved = json.loads(Path(result.report_path).read_text())
    assert saved["consistent_through_seq"] == 129 and len(saved["lost"]) == 7
    md2 = load_metadata(node.meta_dir, "r0", "beta")
    assert md2.role == "Primary" and md2.bitmap_uuid == md.generation == md2.history[0]
    assert md2.generation != md.generation
    assert md2.seq_hwm >= 136  # the new primary's seqs go on past every seq heard of
    with Journal.open(str(md.paths.journal), bytes.fromhex(md.node_uuid)) as j:
        assert j.applied_seq == 129
    bm = Bitmap.open(str(md.paths.bitmap), bytes.fromhex(md.node_uuid), md.track_size)
    try:
        assert bm.count() == 0  # changes since the promotion only
    finally:
        bm.close()


def test_offline_promote_refuses_while_another_process_holds_the_node(beta):
    import fcntl

    cfg, res, node, md = beta
    fd = os.open(MetaPaths(node.meta_dir).lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(DuplexError, match="is running on node beta"):
            promote(cfg, res, node)
    finally:
        os.close(fd)
    assert load_metadata(node.meta_dir, "r0").role == "Secondary"


def test_demote_makes_a_stopped_primary_an_outdated_secondary_with_a_fresh_journal(beta):
    cfg, res, node, md = beta
    with Journal.open(str(md.paths.journal), bytes.fromhex(md.node_uuid)) as j:
        j.append_tokens(_record(5)[:48])  # a stale announcement
        j.commit()
    with pytest.raises(DuplexError, match="already Secondary"):
        demote(cfg, res, node)
    promoted = promote(cfg, res, node)
    assert promoted.report.last_known_seq == 5
    MetaPaths(node.meta_dir).attach.write_text("{}")
    with pytest.raises(DuplexError, match="duplex detach r0"):
        demote(cfg, res, node)
    MetaPaths(node.meta_dir).attach.unlink()
    md2 = demote(cfg, res, node)
    assert (md2.role, md2.disk, md2.generation) == ("Secondary", "Outdated", promoted.generation)
    with Journal.open(str(md.paths.journal), bytes.fromhex(md.node_uuid)) as j:
        assert list(j.replay()) == [] and j.applied_seq == 0
    # Outdated: promoting it again needs --force, and says why.
    with pytest.raises(DuplexError, match="Outdated.*--force"):
        promote(cfg, res, node)

"""``duplex promote`` end to end: a pair in two namespaces, real nbdkit,
real TCP. Refusals, the loss report against the primary's own history
(point A exact, every loss listed: DESIGN §7), and the promoted node serving
its image."""
from __future__ import annotations

import hashlib
import json
import random
import time

import nbd

from _failover_helpers import (Writer, history_records, promote, replay_to, slow_link,
                               wait_quiet)
from fixtures.duplex_lab import RESOURCE
from replicator.secondary.journal import Journal
from replicator.metadata import load_metadata
from replicator.records import OP_NAMES


def _write_block(uri: str, offset: int, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        h.pwrite(data, offset)
        h.flush()
    finally:
        h.shutdown()


def _read_block(uri: str, offset: int, length: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.pread(length, offset)
    finally:
        h.shutdown()


def test_promote_is_refused_while_the_primary_is_connected_and_force_overrides(make_lab):
    lab = make_lab(size=16 << 20)
    lab.create_md()
    sec = lab.start_secondary()
    lab.start_primary(history=False)
    _write_block(lab.uri, 0, b"A" * 4096)
    lab.wait_drained()

    r, _ = promote(lab)
    assert r.returncode == 1, f"promote was not refused:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert "alpha is connected" in r.stderr and "--force" in r.stderr, r.stderr
    # The refusal changed nothing: still a secondary, still replicating.
    assert load_metadata(lab.meta["beta"], RESOURCE).role == "Secondary"
    assert sec.is_running()
    _write_block(lab.uri, 8192, b"B" * 4096)
    st = lab.wait_drained()
    assert st["role"] == "Secondary" and st["replication"] == "Established"

    r, doc = promote(lab, "--force")
    assert r.returncode == 0, f"promote --force failed:\n{r.stdout}\n{r.stderr}"
    assert doc["role"] == "Primary" and any("connected" in f for f in doc["forced"])
    assert doc["consistent_through_seq"] == st["seq"]["applied"]
    assert doc["loss_report"]["lost"] == []
    # The daemon stops: it is no longer a secondary, `up` starts it again.
    assert sec.wait(20) == 75, sec.log_text(3000)
    md = load_metadata(lab.meta["beta"], RESOURCE)
    assert (md.role, md.disk, md.generation) == ("Primary", "UpToDate", doc["generation"])
    assert md.history[0] == doc["previous_generation"] == md.bitmap_uuid
    assert json.loads((lab.meta["beta"] / "loss-report.json").read_text()) == doc["loss_report"]


def test_promote_refuses_an_inconsistent_secondary_unless_forced(make_lab):
    lab = make_lab(size=8 << 20)
    lab.duplex("alpha", "create-md", RESOURCE, "--assume-clean")
    lab.duplex("beta", "create-md", RESOURCE)  # Inconsistent: owes a full sync

    # Running: through the control socket.
    sec = lab.start_secondary()
    r, _ = promote(lab)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "Inconsistent" in r.stderr and "initial sync" in r.stderr and "--force" in r.stderr, \
        r.stderr
    assert sec.is_running()
    sec.stop()
    # Stopped: offline, the same refusal.
    r, _ = promote(lab)
    assert r.returncode == 1 and "Inconsistent" in r.stderr and "--force" in r.stderr, r.stderr
    assert load_metadata(lab.meta["beta"], RESOURCE).role == "Secondary"

    r, doc = promote(lab, "--force")
    assert r.returncode == 0, r.stderr
    assert any("initial sync" in f for f in doc["forced"])
    md = load_metadata(lab.meta["beta"], RESOURCE)
    # Declared good by force: the peer is owed a full sync from it.
    assert (md.role, md.disk, md.needs_initial_sync) == ("Primary", "UpToDate", True)


def test_loss_report_matches_the_primary_history_after_link_cut_and_kill(make_lab, netns_pair):
    lab = make_lab(size=32 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=True)
    slow_link(netns_pair, lab)  # data lags its tokens when the cut comes
    rnd = random.Random()
    writer = Writer(lab.uri, lab.size, threads=4, seed=rnd.randrange(1000)).start()
    try:
        # A random moment while writing: cut the link, then the primary dies.
        lab.wait(lambda: writer.ops > 300, "the workload to get going")
        time.sleep(rnd.uniform(0.2, 1.5))
        netns_pair.link_down()
        time.sleep(0.2)  # writes go on into the cut link
        lab.kill_primary()
    finally:
        writer.stop()
    quiet = wait_quiet(lab, "beta")
    applied = quiet["seq"]["applied"]

    # The link looks alive to beta (no FIN crossed the cut): --force.
    r, doc = promote(lab, "--force")
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    lab.secondary.wait(20)
    report = doc["loss_report"]
    a = report["consistent_through_seq"]
    assert a == applied, f"report says A={a}, the secondary had applied {applied}"

    hist = history_records(lab.history)
    assert a in hist, f"A={a} is not in the primary's history (last {max(hist)})"
    assert max(hist) > a, "the primary wrote nothing after A: nothing was lost, nothing shown"
    assert report["consistent_through_ts_ns"] == hist[a][0].ts_ns
    want = hashlib.sha256(replay_to(hist, lab.size, a)).hexdigest()
    assert lab.digest("beta") == want, f"beta's image is not the history replayed to seq {a}"

    # What the secondary knew after A: every token in its journal.
    with Journal.open(str(lab.meta["beta"] / "journal"),
                      bytes.fromhex(load_metadata(lab.meta["beta"], RESOURCE).node_uuid)) as j:
        assert j.applied_seq == a
        known: dict[int, bool] = {}
        for tok, pos in j.replay():
            if tok.seq > a:
                known[tok.seq] = known.get(tok.seq, False) or pos is not None
    listed = {e["seq"]: e for e in report["lost"] if e["announced"]}
    assert set(listed) == set(known), (
        f"listed lost writes differ from the tokens beta held: only listed "
        f"{sorted(set(listed) - set(known))[:10]}, only held {sorted(set(known) - set(listed))[:10]}")
    for seq, e in listed.items():
        tok = hist[seq][0]
        assert (e["volume"], e["offset"], e["length"], e["ts_ns"]) == (
            tok.volume, tok.offset, tok.length, tok.ts_ns), f"seq {seq}: {e} vs history {tok}"
        assert e["op"] == OP_NAMES[tok.op], f"seq {seq}: op {e['op']} vs history {tok}"
        assert e["data_arrived"] == known[seq], f"seq {seq}: data_arrived is wrong"
    # In order, from A+1 to the last token, the unannounced ones as gaps.
    seqs = [s for e in report["lost"] for s in range(e["seq"], e["seq"] + e["count"])]
    assert seqs == list(range(a + 1, report["last_known_seq"] + 1))
    assert all(e["count"] == 1 for e in report["lost"] if e["announced"])
    assert report["last_known_seq"] == max([a, *known])
    if report["lost"]:
        first = report["lost"][0]
        # A+1 stopped the run: never announced, or its data never came.
        assert not first["announced"] or not first["data_arrived"], first
    assert f"Nothing after seq {report['last_known_seq']} is known" in report["note"]


def test_promoted_node_serves_its_image_and_keeps_its_role(make_lab):
    lab = make_lab(size=16 << 20)
    lab.create_md()
    sec = lab.start_secondary()
    primary = lab.start_primary(history=False)
    block = hashlib.sha256(b"known block").digest() * 128  # 4 KiB
    _write_block(lab.uri, 1 << 20, block)
    lab.wait_drained()
    primary.stop()
    lab.wait(lambda: lab.control("beta")["connection"] != "Connected", "beta to see alpha go")

    r, doc = promote(lab)  # no --force needed: the primary is gone
    assert r.returncode == 0, r.stderr
    assert doc["forced"] == []
    assert sec.wait(20) == 75

    r = lab.duplex("beta", "up", RESOURCE, "--role", "secondary", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "duplex demote r0" in r.stderr and "Primary" in r.stderr, r.stderr

    new = lab.start_up("beta")
    uri = lab.export_uri("beta")
    lab.wait(lambda: lab.status("beta").get("role") == "Primary" and _read_block(uri, 0, 512),
             "beta to serve its image", proc=new)
    assert _read_block(uri, 1 << 20, len(block)) == block
    # It is a primary now: writes go to its image.
    _write_block(uri, 2 << 20, b"N" * 4096)
    assert _read_block(uri, 2 << 20, 4096) == b"N" * 4096
    st = lab.control("beta")
    assert st["role"] == "Primary" and st["seq"]["written"] > doc["consistent_through_seq"]

    r = lab.duplex("beta", "demote", RESOURCE, check=False)
    assert r.returncode == 1 and "stop it first" in r.stderr, r.stderr
    new.stop()
    r = lab.duplex("beta", "demote", RESOURCE, check=False)
    assert r.returncode == 0, r.stderr
    md = load_metadata(lab.meta["beta"], RESOURCE)
    assert (md.role, md.disk) == ("Secondary", "Outdated")
    assert md.generation == doc["generation"]  # what it holds is still that history

"""A planned switchover (DESIGN §7): ``duplex secondary r0`` on the running
primary drains its peer, hands over with a clean-stop notice (STOP) and
carries on as Secondary; ``duplex promote r0`` on the peer then reports
0 lost writes. And a fresh pair's first Primary, both started Secondary, is
one command: ``duplex primary r0 --force``. Real nbdkit, real TCP between
two namespaces; data checked by comparing image bytes."""
from __future__ import annotations

import json
import os

import nbd

from fixtures.duplex_lab import RESOURCE
from replicator.metadata import load_metadata
from fixtures.nbdio import write_all


_write = write_all


def _some_writes(seed: int, size: int, n: int = 40) -> list[tuple[int, bytes]]:
    import random
    rnd = random.Random(seed)
    return [(rnd.randrange(0, size // 4096) * 4096, rnd.randbytes(4096 * rnd.randint(1, 8)))
            for _ in range(n)]


def _drained(lab, primary: str, secondary: str) -> bool:
    p, s = lab.control(primary), lab.control(secondary)
    w = p["seq"]["written"]
    return (p["replication"] == "Established" and p["out_of_sync_bytes"] == 0
            and s["seq"]["applied"] >= w and p["seq"]["journaled"] >= w)


def test_a_fresh_pair_gets_its_first_primary_with_one_command(make_lab):
    lab = make_lab(size=8 << 20)
    with open(lab.image["alpha"], "r+b") as f:  # alpha's data is the one that counts
        f.write(os.urandom(3 << 20))
    for node in ("alpha", "beta"):
        lab.duplex(node, "create-md", RESOURCE)  # both owe an initial sync
    up_a = lab.start_up("alpha", "--role", "secondary")
    lab.wait(lambda: lab.status("alpha").get("running"), "alpha as secondary", proc=up_a)
    lab.start_secondary()

    r = lab.duplex("alpha", "primary", RESOURCE, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "initial sync" in r.stderr and "--force" in r.stderr, r.stderr
    assert load_metadata(lab.meta["alpha"], RESOURCE).role == "Secondary"

    r = lab.duplex("alpha", "primary", RESOURCE, "--force")
    assert "node alpha is now Primary" in r.stdout, r.stdout
    assert up_a.wait(20) == 75  # `duplex up` starts it again (systemd does by itself)
    up_a = lab.start_up("alpha")
    lab.wait(lambda: lab.status("alpha").get("role") == "Primary"
             and lab.status("alpha").get("running"), "alpha as primary", proc=up_a)
    lab.wait(lambda: _drained(lab, "alpha", "beta"), "the full sync to beta", timeout=120)
    assert lab.image["beta"].read_bytes() == lab.image["alpha"].read_bytes()


def test_switchover_hands_over_cleanly_and_promote_loses_nothing(make_lab):
    lab = make_lab(size=16 << 20)
    lab.create_md()
    sec = lab.start_secondary()
    prim = lab.start_primary(history=False)
    _write(lab.uri, _some_writes(1, lab.size))

    # Refused while a client holds the export: the switchover would cut off a writer.
    h = nbd.NBD()
    h.connect_uri(lab.uri)
    try:
        h.pwrite(b"held" * 1024, 0)
        h.flush()
        r = lab.duplex("alpha", "secondary", RESOURCE, check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "NBD client" in r.stderr and "duplex detach r0" in r.stderr, r.stderr
        h.pwrite(b"more" * 1024, 8192)  # nothing changed: still a writable primary
        h.flush()
    finally:
        h.shutdown()
    assert lab.control("alpha")["role"] == "Primary"

    # On the secondary: it is Secondary already.
    r = lab.duplex("beta", "secondary", RESOURCE, check=False)
    assert r.returncode == 1 and "already Secondary" in r.stderr, r.stderr

    written = lab.control("alpha")["seq"]["written"]
    r = lab.duplex("alpha", "secondary", RESOURCE)
    assert "node alpha handed over to beta at seq" in r.stdout, r.stdout
    at = int(r.stdout.split(" at seq ", 1)[1].split()[0])
    assert at >= written  # the switchover's own flush may come after
    # alpha carries on, as Secondary, in the same `duplex up`.
    lab.wait(lambda: lab.status("alpha").get("role") == "Secondary"
             and lab.status("alpha").get("running"), "alpha as secondary", proc=prim)
    md_a = load_metadata(lab.meta["alpha"], RESOURCE)
    assert (md_a.role, md_a.disk) == ("Secondary", "Consistent")
    md_b = load_metadata(lab.meta["beta"], RESOURCE)
    assert md_b.clean_stop_seq == at
    st = lab.control("beta")
    assert st["seq"]["applied"] == at and st["connection"] != "Connected"
    # The peer holds exactly the old primary's data.
    assert lab.image["beta"].read_bytes() == lab.image["alpha"].read_bytes()

    r = lab.duplex("beta", "promote", RESOURCE, timeout=120)  # no --force: alpha is gone
    assert "Lost writes: 0" in r.stdout and f"stopped cleanly at seq {at}" in r.stdout, r.stdout
    report = json.loads((lab.meta["beta"] / "loss-report.json").read_text())
    assert report["lost_writes"] == 0 and report["lost"] == []
    assert report["consistent_through_seq"] == at
    assert report["clean_stop"] == {"seq": at, "primary": "alpha"}
    assert sec.wait(20) == 75

    # beta serves; alpha follows it as its secondary, with every new write.
    up_b = lab.start_up("beta")
    lab.wait(lambda: lab.status("beta").get("role") == "Primary"
             and lab.status("beta").get("running"), "beta as primary", proc=up_b)
    _write(lab.export_uri("beta"), _some_writes(2, lab.size))
    lab.wait(lambda: _drained(lab, "beta", "alpha"), "alpha to follow beta", timeout=120)
    assert lab.image["alpha"].read_bytes() == lab.image["beta"].read_bytes()


def test_switchover_is_refused_without_a_streaming_peer_and_when_stopped(make_lab):
    lab = make_lab(size=8 << 20)
    lab.create_md()
    sec = lab.start_secondary()
    lab.start_primary(history=False)
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "established")
    sec.stop()
    lab.wait(lambda: lab.control("alpha")["connection"] != "Connected", "alpha sees beta go")

    r = lab.duplex("alpha", "secondary", RESOURCE, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not connected and streaming" in r.stderr and "lacks writes" in r.stderr, r.stderr
    st = lab.control("alpha")
    assert st["role"] == "Primary"
    _write(lab.uri, [(0, b"x" * 4096)])  # still writable: the refusal fenced nothing

    lab.duplex("alpha", "down", RESOURCE, timeout=60)
    r = lab.duplex("alpha", "secondary", RESOURCE, check=False)
    assert r.returncode == 1 and "is not running" in r.stderr and "demote" in r.stderr, r.stderr
    assert load_metadata(lab.meta["alpha"], RESOURCE).role == "Primary"

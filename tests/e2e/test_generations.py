"""Failback and split brain (issue 5): generation identifiers decide at
every handshake who is ahead; an old primary coming back resyncs only what
changed; two sides that both wrote as primary are never merged."""
from __future__ import annotations

import json
import time


from fixtures.duplex_lab import RESOURCE
from fixtures.nbdio import write_all

TRACK = 64 << 10


_write = write_all


def _region(base: int, n: int, tag: int, stride: int = 3 * TRACK) -> list[tuple[int, bytes]]:
    return [(base + i * stride, bytes([tag, i & 0xFF]) * 2048) for i in range(n)]


def _tracks(writes) -> set[int]:
    return {off // TRACK for off, data in writes} | {(off + len(d) - 1) // TRACK
                                                      for off, d in writes}


def _wait_in_sync(lab, primary: str, secondary: str, timeout: float = 90) -> dict:
    def ok():
        p, s = lab.control(primary), lab.control(secondary)
        return (p if p["replication"] == "Established" and p["out_of_sync_bytes"] == 0
                and s["seq"]["applied"] >= p["seq"]["written"] else None)
    return lab.wait(ok, f"{secondary} in sync with {primary}", timeout=timeout)


def _promote_beta(lab) -> dict:
    r = lab.duplex("beta", "promote", RESOURCE, "--json")
    return json.loads(r.stdout)


def test_failback_resyncs_only_changed_tracks_and_lists_the_old_primarys_lost_writes(make_lab,
                                                                                    netns_pair):
    lab = make_lab(size=64 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    _write(lab.uri, _region(0, 40, 1))
    lab.wait_drained()
    # Disaster: the link goes, the primary writes a little more, then dies.
    netns_pair.link_down()
    unshipped = _region(8 << 20, 10, 2)
    _write(lab.uri, unshipped)
    lab.kill_primary()
    lab.wait(lambda: lab.control("beta")["connection"] != "Connected", "beta to notice")
    doc = _promote_beta(lab)
    assert lab.secondary.wait(20) == 75  # the promoted daemon hands over to `up`
    beta = lab.start_up("beta", name="beta-primary")
    lab.wait(lambda: lab.control("beta")["role"] == "Primary", "beta to serve", proc=beta)
    changed = _region(16 << 20, 12, 3)
    _write(lab.export_uri("beta"), changed)
    # The old primary comes back, learns it was superseded.
    lab.duplex("alpha", "demote", RESOURCE)
    alpha = lab.start_up("alpha", name="alpha-secondary")
    netns_pair.link_up()
    st = _wait_in_sync(lab, "beta", "alpha")
    assert alpha.is_running()
    beta_digest = lab.digest("beta")
    assert lab.digest("alpha") == beta_digest, "images differ after failback"
    # Only the changed tracks moved: the new primary's changes and the old
    # primary's unshipped writes (plus at most the extents its activity log
    # had active at the crash), not the device.
    sent = st["incr_bytes_sent"]
    least = len(_tracks(changed) | _tracks(unshipped)) * TRACK
    # After its crash the old primary also counts every extent its activity
    # log held active (1 MiB extents in the lab) as changed (DESIGN §5).
    extents = {off >> 20 for off, _ in _region(0, 40, 1) + unshipped}
    al_tracks = {e * 16 + i for e in extents for i in range(16)}
    most = len(_tracks(changed) | _tracks(unshipped) | al_tracks) * TRACK
    assert least <= sent <= most, (sent, least, most)
    assert sent < lab.size // 4
    report = json.loads((lab.meta["alpha"] / "failback-report.json").read_text())
    covered = {t for r in report["ranges"] for t in range(r["offset"] // TRACK,
                                                         (r["offset"] + r["length"]) // TRACK)}
    assert _tracks(unshipped) <= covered, "the old primary's unshipped writes are not listed"
    assert report["superseded_by_generation"] == doc["generation"] or report["bytes"] > 0


def test_split_brain_is_detected_and_discard_my_data_resolves_it(make_lab, netns_pair):
    lab = make_lab(size=32 << 20)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    _write(lab.uri, _region(0, 20, 1))
    lab.wait_drained()
    netns_pair.link_down()
    # Both sides notice the partition...
    lab.wait(lambda: lab.control("alpha")["connection"] != "Connected", "alpha to notice")
    lab.wait(lambda: lab.control("beta")["connection"] != "Connected", "beta to notice")
    # ...and both write as primary.
    _write(lab.uri, _region(4 << 20, 8, 2))
    _promote_beta(lab)
    lab.secondary.wait(20)
    beta = lab.start_up("beta", name="beta-primary")
    lab.wait(lambda: lab.control("beta")["role"] == "Primary", "beta to serve", proc=beta)
    _write(lab.export_uri("beta"), _region(12 << 20, 8, 3))
    # Heal: alpha steps down and comes back as secondary.
    lab.primary.stop(grace=30)
    lab.duplex("alpha", "demote", RESOURCE)
    alpha = lab.start_up("alpha", name="alpha-secondary")
    netns_pair.link_up()
    st = lab.wait(lambda: (s := lab.control("beta"))["connection"] == "StandAlone"
                  and "split brain" in s["reason"] and s, "beta to report split brain",
                  timeout=60)
    sa = lab.wait(lambda: (s := lab.control("alpha"))["connection"] == "StandAlone"
                  and "split brain" in s["reason"] and s, "alpha to report split brain")
    assert "--discard-my-data" in sa["reason"]
    assert "split brain" in st["reason"]
    # Named on both sides, with the one command that ends it (issue 10 item 8).
    assert (st["replication"], sa["replication"]) == ("SplitBrain", "SplitBrain"), (st, sa)
    for s in (st, sa):
        assert ("run `duplex connect r0 --discard-my-data` on the node whose data is to be "
                "discarded") in s["reason"], s["reason"]
        assert "promote it" not in s["reason"]
    assert lab.digest("alpha") != lab.digest("beta"), "split brain must not be merged"
    before = lab.digest("alpha")
    time.sleep(6)  # the primary retries; nothing changes while it is refused
    assert lab.digest("alpha") == before
    r = lab.duplex("alpha", "connect", RESOURCE, "--discard-my-data")
    assert "discard" in r.stdout
    _wait_in_sync(lab, "beta", "alpha")
    assert lab.digest("alpha") == lab.digest("beta")
    assert alpha.is_running() and beta.is_running()

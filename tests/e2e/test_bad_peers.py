"""Bad input from the network: every bad peer is refused with a clear reason,
the daemon stays up, and no image is touched."""
from __future__ import annotations

from fixtures.peers import run_peer_client as _attack
from fixtures.workload import Workload


def test_bad_peers_are_refused_and_the_secondary_stays_up(make_lab, netns_pair):
    lab = make_lab()
    lab.create_md()
    sec = lab.start_secondary()
    before = lab.digest("beta")
    expect = {
        "wrong-secret": "authentication failed",
        "other-resource": "serves resource 'r9'",
        "other-size": f"the primary's is {lab.size * 2} bytes",
        "garbage": "",
        "oversized": "",
    }
    for mode, words in expect.items():
        got = _attack(netns_pair, lab, mode)
        assert got["outcome"] in ("closed", "refused", "reset"), f"{mode}: {got}"
        assert sec.is_running(), f"secondary died after {mode}:\n{sec.log_text(3000)}"
        if words:
            log = sec.log_text()
            assert words in log or words in (got.get("message") or ""), \
                f"{mode}: no clear reason ({words!r}) in the log:\n{log[-2000:]}\nclient: {got}"
    log = sec.log_text()
    assert "bad magic" in log or "magic" in log, f"garbage not named in the log:\n{log[-2000:]}"
    assert str(1 << 30) in log or "maximum" in log or "above" in log, \
        f"oversized frame not named in the log:\n{log[-2000:]}"
    assert lab.digest("beta") == before, "a refused peer changed the image"
    assert "Traceback" not in sec.log_text()
    # Still serving the real primary afterwards.
    lab.start_primary()
    Workload(lab.uri, lab.size, threads=2, ops_per_thread=100).run()
    lab.wait_drained()
    assert lab.digest("beta") == lab.digest("alpha")


def test_primary_reports_a_peer_with_another_device_size(make_lab):
    lab = make_lab()
    with open(lab.image["beta"], "r+b") as f:
        f.truncate(lab.size // 2)
    lab.create_md()
    lab.start_secondary()
    lab.start_primary()
    st = lab.wait(lambda: (s := lab.control("alpha"))["connection"] == "StandAlone" and s,
                  "primary to refuse the peer")
    assert str(lab.size) in st["reason"] and str(lab.size // 2) in st["reason"], st["reason"]
    # Each size named by its owner, not "peer"/"ours" from the refusing side.
    assert (f"the primary's is {lab.size} bytes, the secondary's is {lab.size // 2} bytes"
            in st["reason"]), st["reason"]
    # The primary keeps serving its own device.
    Workload(lab.uri, lab.size, threads=1, ops_per_thread=50).run()

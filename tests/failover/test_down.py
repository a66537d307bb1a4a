"""`duplex down RES`: a clean stop of a running node from another shell
(SIGTERM to its `duplex up`, bounded like systemctl stop), on either role;
on a stopped node it says there is nothing to stop."""
from __future__ import annotations

from fixtures.duplex_lab import RESOURCE


def test_down_stops_each_role_cleanly_and_says_so(make_lab):
    lab = make_lab(size=8 << 20)
    lab.create_md()
    sec = lab.start_secondary()
    prim = lab.start_primary(history=False)
    lab.wait(lambda: lab.control("alpha")["replication"] == "Established", "established")

    r = lab.duplex("beta", "down", RESOURCE, timeout=60)
    assert "r0: node beta stopped" in r.stdout, r.stdout + r.stderr
    sec.wait(10)
    assert sec.returncode == 0
    lab.wait(lambda: lab.control("alpha")["connection"] != "Connected", "alpha sees it go")

    r = lab.duplex("alpha", "down", RESOURCE, timeout=60)
    assert "r0: node alpha stopped" in r.stdout, r.stdout + r.stderr
    prim.wait(10)
    assert prim.returncode == 0

    r = lab.duplex("beta", "down", RESOURCE)
    assert r.stdout.strip() == "r0 is not running on node beta: nothing to stop"

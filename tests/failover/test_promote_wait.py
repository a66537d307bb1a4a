"""Promote right after a disaster: the primary died behind a cut link, so
the secondary still thinks it is connected until ping-timeout. `promote`
says when the primary was last heard from and when it will be declared
gone, and by default waits for that instead of failing (--wait)."""
from __future__ import annotations

import re
import time

from _failover_helpers import promote


def _lab_cut_from_a_dead_primary(make_lab, netns_pair, ping_timeout: str):
    lab = make_lab(size=8 << 20)
    lab.write_config(**{"ping-timeout": ping_timeout, "ping-interval": "500ms"})
    lab.create_md()
    lab.start_secondary()
    lab.start_primary(history=False)
    lab.wait(lambda: lab.control("beta")["connection"] == "Connected", "connected")
    netns_pair.link_down()  # the disaster: first the link, then the primary
    lab.kill_primary()
    return lab


def test_promote_wait_0_refuses_and_says_when_the_primary_is_declared_gone(make_lab,
                                                                           netns_pair):
    lab = _lab_cut_from_a_dead_primary(make_lab, netns_pair, "8s")
    r, _ = promote(lab, "--wait", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    m = re.search(r"last heard from ([0-9.]+) s ago; if it is gone, it is declared so "
                  r"([0-9.]+) s from now, at ping-timeout 8 s: `promote --wait` waits for that",
                  r.stderr)
    assert m, r.stderr
    assert float(m.group(1)) < 8 and 0 < float(m.group(2)) <= 8


def test_promote_waits_for_ping_timeout_by_default_and_succeeds(make_lab, netns_pair):
    lab = _lab_cut_from_a_dead_primary(make_lab, netns_pair, "3s")
    start = time.monotonic()
    r, doc = promote(lab)
    took = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert doc["role"] == "Primary"
    assert took < 3 + 5, f"promote took {took:.1f} s with ping-timeout 3 s"
    assert "waiting for the primary's connection to go" in r.stderr, r.stderr

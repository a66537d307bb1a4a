"""The generation verdict (replicator/generations.py), the one rule both
sides apply at a handshake: every case of compare() times the secondary's
--discard-my-data flag times whether it was ever paired, from both roles'
points of view. Both views must agree, and every refusal must end in the
one command that resolves it."""
from __future__ import annotations

import itertools

import pytest

from replicator import generations as g
from replicator.generations import Decision, Generations

A, B, C, D, X, Y = (c * 32 for c in "abcdef")

# (primary's generations, secondary's generations, compare() from the primary)
CASES = {
    "same": (Generations(B, None, (A,)), Generations(B, None, (A,)), Decision.SAME),
    "primary ahead": (Generations(C, B, (B, A)), Generations(B, None, (A,)),
                      Decision.LOCAL_AHEAD),
    "secondary ahead": (Generations(B, None, (A,)), Generations(C, B, (B, A)),
                        Decision.PEER_AHEAD),
    "split brain": (Generations(C, B, (B, A)), Generations(D, B, (B, A)), Decision.SPLIT_BRAIN),
    "unrelated": (Generations(X, None, ()), Generations(Y, None, ()), Decision.UNRELATED),
}

# What the handshake does: (accepted, accepted only because the secondary
# discards, split brain) for (case, secondary discards, secondary fresh).
EXPECTED = {
    ("same", False): (True, False, False),
    ("same", True): (True, False, False),
    ("primary ahead", False): (True, False, False),
    ("primary ahead", True): (True, False, False),
    ("secondary ahead", False): (False, False, False),
    ("secondary ahead", True): (True, True, False),
    ("split brain", False): (False, False, True),
    ("split brain", True): (True, True, False),
    ("unrelated", False): (False, False, False),
    ("unrelated", True): (False, False, False),  # nothing shared: discarding cannot help
}


def _both(case: str, discards: bool, fresh: bool) -> tuple[g.Verdict, g.Verdict]:
    p, s, _ = CASES[case]
    kw = dict(resource="r0", secondary_fresh=fresh, secondary_discards=discards)
    return g.verdict(g.PRIMARY, p, s, **kw), g.verdict(g.SECONDARY, s, p, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_compare_gives_the_case_its_name(case):
    p, s, decision = CASES[case]
    assert g.compare(p, s) is decision


@pytest.mark.parametrize("case,discards,fresh",
                         list(itertools.product(CASES, (False, True), (False, True))))
@pytest.mark.parametrize("role", [g.PRIMARY, g.SECONDARY])
def test_every_case_times_discard_times_both_roles(case, discards, fresh, role):
    on_primary, on_secondary = _both(case, discards, fresh)
    v = on_primary if role == g.PRIMARY else on_secondary
    want = (True, False, False) if fresh else EXPECTED[(case, discards)]
    assert (v.accept, v.discards, v.split_brain) == want, v
    # The two sides never disagree: one rule binds both parties.
    assert ((on_primary.accept, on_primary.discards, on_primary.split_brain)
            == (on_secondary.accept, on_secondary.discards, on_secondary.split_brain))
    if not v.accept:
        assert "`duplex " in v.why, v.why  # a refusal names what to run
        assert "RES" not in v.why and " r0 " in v.why  # the resource's name, not a placeholder


def test_split_brain_names_the_one_command_that_resolves_it_on_both_sides():
    for v in _both("split brain", False, False):
        assert v.why.endswith("run `duplex connect r0 --discard-my-data` on the node whose "
                              "data is to be discarded"), v.why
        assert "split brain" in v.why


def test_advice_never_sends_an_outdated_secondary_to_a_plain_promote():
    # issue 10 item 8: "promote it" was advised to a node promote refuses
    # (Outdated). The advice either discards, or promotes with --force
    # after the primary was demoted.
    for v in _both("secondary ahead", False, False):
        assert "promote it" not in v.why
        assert "`duplex connect r0 --discard-my-data` on the secondary" in v.why
        assert "`duplex promote r0 --force`" in v.why and "`duplex demote r0`" in v.why


def test_unrelated_data_points_to_create_md_not_to_discard():
    for v in _both("unrelated", True, False):
        assert not v.accept and "`duplex create-md r0 --force`" in v.why
        assert "--discard-my-data" not in v.why


def test_a_role_that_is_neither_is_an_error():
    p, s, _ = CASES["same"]
    with pytest.raises(ValueError, match="role 'tertiary'"):
        g.verdict("tertiary", p, s, resource="r0", secondary_fresh=False,
                  secondary_discards=False)

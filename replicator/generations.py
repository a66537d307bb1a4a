"""Generation identifiers: who is ahead when two nodes meet (DESIGN §7).

DRBD's model, for two nodes. Each node keeps:

- ``current``: the generation of its data. A primary starts a new one
  whenever it begins a history the peer cannot know: when it is promoted,
  and at its first write while it has no peer (so that two sides writing
  apart can be told from one side being behind);
- ``bitmap``: the generation its out-of-sync bitmap is relative to (the
  last one both sides shared), or None when the bitmap is relative to the
  peer's current data;
- ``history``: older generations, newest first.

Comparing them at every handshake gives one of five answers
(:func:`compare`), and :func:`verdict` turns that answer into what the
handshake does. Both sides call :func:`verdict` with their own view, so
they cannot disagree (h11's rule: one rule binds both parties). Pure code:
no I/O; tests/primary/test_generations_verdict.py walks every case times
the discard flag times both roles.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from replicator.protocol.messages import ZERO_UUID


class Decision(Enum):
    """What the handshake concludes about the two data sets."""

    SAME = "same data generation"
    PEER_AHEAD = "the peer is ahead: this node syncs from it"
    LOCAL_AHEAD = "this node is ahead: the peer syncs from it"
    SPLIT_BRAIN = "split brain: both nodes wrote as Primary after they parted"
    UNRELATED = "unrelated data: the two nodes share no generation"


@dataclass(frozen=True)
class Generations:
    """One node's generation identifiers (hex strings)."""

    current: str
    bitmap: str | None
    history: tuple[str, ...]

    def knows(self, gen: str) -> bool:
        """True if *gen* is this node's current data or an ancestor of it."""
        return gen == self.current or gen == self.bitmap or gen in self.history


def compare(local: Generations, peer: Generations) -> Decision:
    """Who is ahead, from *local*'s point of view."""
    if local.current == peer.current:
        return Decision.SAME
    local_knows_peer = local.knows(peer.current)
    peer_knows_local = peer.knows(local.current)
    if local_knows_peer and not peer_knows_local:
        return Decision.LOCAL_AHEAD
    if peer_knows_local and not local_knows_peer:
        return Decision.PEER_AHEAD
    # Neither current generation descends from the other. A shared ancestor
    # means both moved on from it separately: split brain.
    shared = ({local.bitmap, *local.history} - {None}) & ({peer.bitmap, *peer.history} - {None})
    if shared:
        return Decision.SPLIT_BRAIN
    return Decision.UNRELATED


def explain(decision: Decision, local: Generations, peer: Generations) -> str:
    """A sentence for logs and status naming the generations involved."""
    return (f"{decision.value} (this node {local.current[:8]}, "
            f"peer {peer.current[:8]})")


# -- the verdict: what the handshake does ----------------------------------

PRIMARY = "primary"
SECONDARY = "secondary"

_MIRROR = {Decision.PEER_AHEAD: Decision.LOCAL_AHEAD, Decision.LOCAL_AHEAD: Decision.PEER_AHEAD}


@dataclass(frozen=True)
class Verdict:
    """What one node concludes at a handshake.

    ``accept``: the secondary follows the primary's data (the handshake
    goes on). ``discards``: accepted only because the secondary gives up
    data the primary does not have (``connect --discard-my-data``).
    ``split_brain``: refused because both wrote as Primary. ``why``: a
    sentence for logs and status; when refused, it ends with the command
    that resolves it.
    """

    decision: Decision
    accept: bool
    discards: bool
    split_brain: bool
    why: str


def verdict(role: str, local: Generations, peer: Generations, *, resource: str,
            secondary_fresh: bool, secondary_discards: bool) -> Verdict:
    """The handshake's outcome, seen from the node playing *role*.

    *secondary_fresh*: the secondary was never paired (it announces a zero
    resource UUID), so it takes the primary's data whatever it held (an
    initial sync follows). *secondary_discards*: the secondary's
    ``--discard-my-data`` flag (its own metadata on the secondary, the
    STATE flag on the primary). The rule, from the primary's view::

        fresh secondary              accept (initial sync)
        SAME                         accept
        primary ahead                accept
        secondary ahead              accept if the secondary discards, else refuse
        SPLIT_BRAIN                  accept if the secondary discards, else refuse
        UNRELATED                    refuse (discarding cannot help: nothing is shared)
    """
    if role not in (PRIMARY, SECONDARY):
        raise ValueError(f"role {role!r} is neither {PRIMARY!r} nor {SECONDARY!r}")
    decision = compare(local, peer)
    seen = decision if role == PRIMARY else _MIRROR.get(decision, decision)
    text = explain(decision, local, peer)

    def refuse(advice: str, split: bool = False) -> Verdict:
        return Verdict(decision, False, False, split, f"{text}; {advice}")

    if secondary_fresh or seen in (Decision.SAME, Decision.LOCAL_AHEAD):
        return Verdict(decision, True, False, False, text)
    if seen in (Decision.PEER_AHEAD, Decision.SPLIT_BRAIN) and secondary_discards:
        return Verdict(decision, True, True, False,
                       f"{text}; the secondary discards its own changes (--discard-my-data)")
    if seen is Decision.SPLIT_BRAIN:
        return refuse(f"nothing is merged: run `duplex connect {resource} --discard-my-data` "
                      f"on the node whose data is to be discarded", split=True)
    if seen is Decision.PEER_AHEAD:
        # The secondary holds writes the primary never had.
        return refuse(f"to keep the primary's data, run `duplex connect {resource} "
                      f"--discard-my-data` on the secondary; to keep the secondary's, stop the "
                      f"primary, `duplex demote {resource}` there, then `duplex promote "
                      f"{resource} --force` on the secondary")
    return refuse(f"the secondary's metadata belongs to other data: run `duplex create-md "
                  f"{resource} --force` on the node whose data is to be replaced (a full sync "
                  f"follows)")


# -- glue with metadata and the STATE message ---------------------------------

MAX_SENT_HISTORY = 8  # what a STATE carries (protocol MAX_HISTORY)


def pairing_uuid(md) -> bytes:
    """The resource UUID a node announces: ours once paired, zeros ("fresh")
    before the first successful handshake, so that two nodes made by
    ``create-md`` independently can meet (protocol.compat)."""
    return bytes.fromhex(md.resource_uuid) if md.peer_node_uuid else ZERO_UUID


def of_metadata(md) -> Generations:
    """The generations recorded in a node's metadata."""
    return Generations(md.generation, md.bitmap_uuid, tuple(md.history))


def state_history(md) -> tuple[tuple[bytes, ...], bool]:
    """The ``history`` of a STATE (bitmap generation first when there is
    one) and whether the bitmap generation is in it."""
    gens = ([md.bitmap_uuid] if md.bitmap_uuid else []) + list(md.history)
    return tuple(bytes.fromhex(g) for g in gens[:MAX_SENT_HISTORY]), md.bitmap_uuid is not None


def from_state(state, has_bitmap: bool) -> Generations:
    """A peer's generations from its STATE."""
    hist = [h.hex() for h in state.history]
    bitmap = hist.pop(0) if has_bitmap and hist else None
    return Generations(state.generation.hex(), bitmap, tuple(hist))


def adopt(md, peer: Generations, keep: int = 16) -> None:
    """This node now follows *peer*'s data: take its generations (the
    bitmap is relative to the peer's current data from now on)."""
    md.generation = peer.current
    md.history = [h for h in (peer.bitmap, *peer.history) if h][:keep]
    md.bitmap_uuid = None
    md.discard_my_data = False


def bump(md, new: str, keep: int = 16) -> str:
    """Start a new generation (a primary writing without its peer): the
    bitmap stays relative to the last generation both sides shared."""
    old = md.generation
    if md.bitmap_uuid is None:
        md.bitmap_uuid = old
    md.history = ([old] + [h for h in md.history if h != old])[:keep]
    md.generation = new
    return old

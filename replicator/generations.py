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

Comparing them at every handshake gives one of five answers. Pure code: no
I/O, tested on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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


# -- glue with metadata and the STATE message ---------------------------------

MAX_SENT_HISTORY = 8  # what a STATE carries (protocol MAX_HISTORY)


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

"""The note a group's MARK record carries (DESIGN §13): which group, the
checkpoint number, the member list the primary master counted as active
(seed 000's copy-active table) and the inserting primary's clock offset to
the primary master. JSON, at most records.MARK_MAX bytes, checked strictly:
it arrives over the replication link and is journaled."""
from __future__ import annotations

import json
from dataclasses import dataclass

from replicator.protocol.group import load_json
from replicator.records import MARK_MAX

MAX_MEMBERS = 64


class NoteError(ValueError):
    """A MARK's note is not a valid group note."""


@dataclass(frozen=True)
class MarkNote:
    """See the module doc. ``skew_us`` None: not measured yet."""

    group: str
    n: int
    members: tuple[str, ...]
    skew_us: int | None

    def encode(self) -> bytes:
        """The MARK record's data."""
        raw = json.dumps({"group": self.group, "n": self.n, "members": list(self.members),
                          "skew_us": self.skew_us}, separators=(",", ":")).encode()
        if len(raw) > MARK_MAX:
            raise NoteError(f"group note of {len(raw)} bytes is over {MARK_MAX}")
        return raw

    @classmethod
    def decode(cls, data) -> MarkNote:
        """Parse and check a MARK's data; NoteError says what is wrong."""
        d = load_json(data, "group note", NoteError)
        if not isinstance(d, dict) or set(d) != {"group", "n", "members", "skew_us"}:
            raise NoteError("group note must have exactly group, n, members, skew_us")
        g, n, members, skew = d["group"], d["n"], d["members"], d["skew_us"]
        if not isinstance(g, str) or not g:
            raise NoteError("group note: group must be a name")
        if type(n) is not int or not 0 <= n < 1 << 63:
            raise NoteError("group note: n must be a non-negative integer")
        if (not isinstance(members, list) or len(members) > MAX_MEMBERS
                or not all(isinstance(m, str) and m for m in members)):
            raise NoteError(f"group note: members must be a list of at most {MAX_MEMBERS} names")
        if skew is not None and (type(skew) is not int or not 0 <= skew < 1 << 63):
            raise NoteError("group note: skew_us must be a non-negative integer or null")
        return cls(g, n, tuple(members), skew)

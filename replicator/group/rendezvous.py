"""The rendezvous master's rule, sans-IO (DESIGN §13; seed 000 §2.6, seed 002 §C).

The secondaries of a group report what they hold durably: in mode
``checkpoint`` the last checkpoint (n, T) whose marker is journaled with
everything before it (``held``), in mode ``limit-time`` the stamp through
which their stream is complete (``watermark``). The master releases a point
when every member the point names holds it:

- checkpoint: the highest n held by every member of the newest marker's
  member list;
- limit-time: L = the minimum of the members' watermarks (seed 002's limit
  time), released only when it moves forward;

and never while a member's primary clock is further from the primary
master's than ``max_skew`` (or not measured yet). One release is in
progress at a time: each member applies it (update-in-progress, persisted
on the member), reports ``complete``; when all have, the master resets it
and may release the next (which covers everything since: releases
coalesce). A frozen master (a promotion has begun) releases nothing new.

Members come from the markers themselves: each MARK's note lists the
resources the primary master counted as active when it issued the point
(the copy-active table of seed 000 step 206). A secondary whose primary
left that table is resigned: nothing waits for it. A member the list names
that is disconnected or behind holds the group back, as it must (seed 000
behaviour 14): nobody gets ahead.

Everything here is plain data and methods that return the messages to send;
agent.py does the IO. Not thread-safe: the caller serialises calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MemberView:
    """What the master knows of one member's secondary."""

    name: str
    connected: bool = False
    held_n: int = 0            # checkpoint: the last checkpoint held
    held_t: int = 0            # its T; limit-time: the watermark
    skew_us: int | None = None  # its primary's clock offset to the primary master
    members: tuple[str, ...] = ()  # the member list of its last marker
    completed_n: int = 0       # the last release it finished
    applied_seq: int = 0       # its applied seq at that release
    reported: tuple[int, int | None] | None = None  # (released n, in progress) at its join
    resigned: str | None = None  # why it resigned, when it has


@dataclass
class Release:
    """A point released to the members: (n, T)."""

    n: int
    t: int


@dataclass
class Rendezvous:
    """The rendezvous master of one group (see module doc)."""

    group: str
    mode: str
    configured: tuple[str, ...]
    max_skew_us: int
    released: Release = field(default_factory=lambda: Release(0, 0))
    in_progress: Release | None = None
    waiting: set[str] = field(default_factory=set)
    frozen: bool = False
    blocked: str | None = None  # why nothing is released now (status)
    checkpoints: dict[int, int] = field(default_factory=dict)  # n -> T, recent ones

    def __post_init__(self) -> None:
        self.members: dict[str, MemberView] = {m: MemberView(m) for m in self.configured}
        self._sent: set[str] = set()  # members sent the release in progress

    # -- events -----------------------------------------------------------

    def joined(self, member: str, released: Release, in_progress: int | None) -> list:
        """A member's secondary connected, persisting *released* (and in
        the middle of applying *in_progress*).

        The master may have restarted and forgotten: it adopts the highest
        point any member reports, and a release still being applied somewhere
        is in progress again, waited for from every required member that has
        not reported itself past it (those not yet joined included). A
        member behind the newest point gets it again and is waited for, so
        nothing is reset while a member still lacks it (behaviour 12)."""
        m = self._member(member)
        m.connected = True
        m.resigned = None
        m.reported = (released.n, in_progress)
        if released.n > self.released.n:
            self.released = Release(released.n, released.t)
        if (in_progress is not None and in_progress >= self.released.n
                and (self.in_progress is None or in_progress > self.in_progress.n)):
            self.in_progress = Release(in_progress, released.t)
            self.waiting = {x for x in self._required(self.configured)
                            if not self._past(x, in_progress)}
            self._sent = set()
        target = self.in_progress or self.released
        out: list = []
        if target.n and not self._past(member, target.n):
            if self.in_progress is None:  # the others finished it: it alone applies it now
                self.in_progress = Release(target.n, target.t)
                self.waiting = set()
                self._sent = set()
            self.waiting.add(member)
            self._sent.add(member)
            out.append(("release", member, self.in_progress))
        elif self.in_progress is not None:
            self.waiting.discard(member)
        # Connected members that reported a lower point than the one in
        # progress and have not been sent it (it may have been adopted from
        # this join, after theirs).
        for other in self.members.values():
            if (other.name != member and other.connected and other.reported is not None
                    and self.in_progress is not None and other.name not in self._sent
                    and not self._past(other.name, self.in_progress.n)):
                self.waiting.add(other.name)
                self._sent.add(other.name)
                out.append(("release", other.name, self.in_progress))
        return out + self._maybe_reset() + self._maybe_release()

    def _past(self, member: str, n: int) -> bool:
        """Has *member* reported (since this master started) that it
        finished release n, or completed it here?"""
        m = self.members[member]
        if m.completed_n >= n:
            return True
        if m.reported is None:
            return False
        rep_n, rep_ip = m.reported
        return rep_n >= n and (rep_ip is None or rep_ip > n)

    def left(self, member: str) -> list:
        """A member's secondary disconnected (it still counts: behaviour 14)."""
        self._member(member).connected = False
        return []

    def held(self, member: str, n: int, t: int, skew_us: int | None,
             members: tuple[str, ...]) -> list:
        """Checkpoint mode: *member* holds checkpoint n (time t) durably."""
        m = self._member(member)
        if n > m.held_n:
            m.held_n, m.held_t = n, t
        m.skew_us = skew_us
        m.members = members
        if n:
            self.checkpoints[n] = t
        return self._maybe_release()

    def watermark(self, member: str, t: int, skew_us: int | None,
                  members: tuple[str, ...]) -> list:
        """Limit-time mode: *member*'s stream is complete through stamp t."""
        m = self._member(member)
        if t > m.held_t:
            m.held_t = t
        m.skew_us = skew_us
        m.members = members
        return self._maybe_release()

    def complete(self, member: str, n: int, applied_seq: int) -> list:
        """*member* finished applying release n (its image is durable)."""
        m = self._member(member)
        if n >= m.completed_n and applied_seq:  # an old release's answer carries no seq
            m.applied_seq = applied_seq
        m.completed_n = max(m.completed_n, n)
        if self.in_progress is None or n != self.in_progress.n:
            return [("reset", member, Release(n, 0))]  # an old release: it alone
        self.waiting.discard(member)
        return self._maybe_reset() + self._maybe_release()

    def _maybe_reset(self) -> list:
        """Reset the release in progress once no required member waits."""
        if self.in_progress is None:
            return []
        self.waiting &= set(self._required(self._current_members()))
        if self.waiting:
            return []
        done, self.in_progress = self.in_progress, None
        return [("reset", None, done)]

    def resign(self, member: str, reason: str) -> list:
        """*member* leaves the group until its primary returns."""
        m = self._member(member)
        m.resigned = reason
        self.waiting.discard(member)
        return self._maybe_reset() + self._maybe_release()

    def freeze(self) -> list:
        """A promotion started: release nothing new from now on."""
        self.frozen = True
        return []

    # -- the rule ---------------------------------------------------------

    def _member(self, name: str) -> MemberView:
        m = self.members.get(name)
        if m is None:
            raise KeyError(name)
        return m

    def _current_members(self) -> tuple[str, ...]:
        """The member list of the newest marker anyone holds (all configured
        before any marker arrived: an unstarted member blocks, AT-19)."""
        newest = max(self.members.values(), key=lambda m: (m.held_n, m.held_t))
        return newest.members or self.configured

    def _required(self, names) -> list[str]:
        return [n for n in names if n in self.members and self.members[n].resigned is None]

    def _skew_problem(self, names) -> str | None:
        for name in names:
            s = self.members[name].skew_us
            if s is None:
                return f"the clock skew of {name}'s primary is not measured yet"
            if s > self.max_skew_us:
                return (f"the clock of {name}'s primary is {s / 1000:.1f} ms off the primary "
                        f"master's (max-clock-skew {self.max_skew_us / 1000:g} ms): no release "
                        f"until the clocks agree (check NTP on the primaries)")
        return None

    def _candidate(self) -> tuple[Release | None, str | None, list[str]]:
        """The point that could be released now, or why none can."""
        names = self._required(self._current_members())
        if not names:
            return None, "no member is active", names
        absent = [n for n in names if self.members[n].held_t == 0]
        if absent:
            return None, f"waiting for the first marker from {', '.join(absent)}", names
        if self.mode == "checkpoint":
            n = min(self.members[x].held_n for x in names)
            if n <= self.released.n:
                slow = [x for x in names if self.members[x].held_n <= self.released.n]
                return None, f"waiting for {', '.join(slow)} to hold checkpoint " \
                             f"{self.released.n + 1}", names
            t = self.checkpoints.get(n)
            if t is None:  # only possible for a point every member held before a restart
                t = min(self.members[x].held_t for x in names)
            return Release(n, t), None, names
        t = min(self.members[x].held_t for x in names)
        if t <= self.released.t:
            slow = [x for x in names if self.members[x].held_t <= self.released.t]
            return None, f"waiting for {', '.join(slow)} to pass the limit time", names
        return Release(self.released.n + 1, t), None, names

    def _maybe_release(self) -> list:
        if self.in_progress is not None:
            self.blocked = None
            return []
        if self.frozen:
            self.blocked = "frozen: a promotion is under way"
            return []
        rel, why, names = self._candidate()
        if rel is not None:
            why = self._skew_problem(names)
        self.blocked = why
        if rel is None or why is not None:
            return []
        self.released = rel
        self.in_progress = rel
        self.waiting = set(names)
        self._sent = set(names)
        for n in [k for k in self.checkpoints if k <= rel.n]:
            del self.checkpoints[n]
        return [("release", name, rel) for name in names]

    # -- status -----------------------------------------------------------

    def view(self) -> dict:
        """The group as the master sees it (status, and sent to members)."""
        current = set(self._current_members())
        return {
            "mode": self.mode,
            "released": {"n": self.released.n, "t": self.released.t},
            "update_in_progress": self.in_progress.n if self.in_progress else None,
            "waiting": sorted(self.waiting),
            "frozen": self.frozen,
            "blocked": self.blocked,
            # Every required member has told this master where it is (since
            # it started): only then is "nothing in progress" known.
            "all_joined": all(self.members[x].reported is not None
                              for x in self._required(self._current_members())),
            "members": {
                m.name: {"connected": m.connected,
                         "state": ("resigned" if m.resigned or m.name not in current
                                   else "active"),
                         "resigned": m.resigned,
                         "held_n": m.held_n, "held_t": m.held_t, "skew_us": m.skew_us,
                         "completed_n": m.completed_n, "applied_seq": m.applied_seq,
                         "joined": m.reported is not None}
                for m in self.members.values()},
        }

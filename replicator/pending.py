"""The secondary's pending write queue (seed 001, FIG. 5). Pure: no I/O.

Theory of operation
-------------------
Every write the primary sequences reaches the secondary twice: first its
*token* (the 48-byte record header, seed 001's M1 entry), then the whole
*record* (header + data, an M2 field). The queue keeps one entry per seq
after ``applied_through``:

* **incomplete**: the token is known, the data is not (yet);
* **complete**: the data has arrived and was stored somewhere; the queue
  keeps only an opaque *location* for it (a journal position), so memory
  stays bounded by the number of entries, not by their data.

A seq that lies below the highest token seen but was never announced is a
*gap*: nothing is known about it, not even its address.

The applier asks :meth:`PendingQueue.next_run` for the in-order run of
complete entries that starts right after ``applied_through``; the first
gap or token without data stops the run, so seq N+1 is never handed out
before N. After writing the run to the image it calls
:meth:`PendingQueue.mark_applied` with the run's last seq.

Several TCP connections may carry one stream. Frames from different
connections arrive in any order -- only the seq matters -- but on each
connection a record's token comes before its data, so data for a seq whose
token is unknown is a protocol violation (:class:`StreamError`).

After a reconnect the primary re-sends what it has not seen acked, so
duplicates are normal: a token or record for a seq already applied is
ignored, and one for a seq already known is ignored when it is identical.
The same seq with a different header is a broken stream and is refused.

When the primary is gone, :meth:`PendingQueue.loss_view` describes what the
secondary knows about the writes it does not have (seed 001 §2.7);
:mod:`replicator.lossreport` turns it into the loss report.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from replicator.errors import DuplexError
from replicator.records import OP_NAMES, Token

#: How far past ``applied_through`` a token may be. A primary has at most a
#: ring's worth of records in flight (a 64 MiB ring holds under 1.4 million
#: data-less tokens, far fewer writes), so a seq further ahead is a broken
#: stream; refusing it bounds the queue's memory and the loss report.
DEFAULT_WINDOW = 1 << 21


class StreamError(DuplexError):
    """The replication stream broke a rule of the protocol (the peer's fault).

    The connection that carried the offending frame must be closed; the
    queue itself is left unchanged by the call that raised.
    """


_NO_DATA: Any = object()  # location placeholder of an incomplete entry


@dataclass(frozen=True, slots=True)
class LostEntry:
    """A seq after the consistent point, as the queue knows it."""

    seq: int
    token: Token | None  # None: the seq was never announced
    data_arrived: bool


@dataclass(frozen=True, slots=True)
class LossView:
    """What :meth:`PendingQueue.loss_view` returns: the raw loss report.

    ``entries`` lists every seq in ``(applied_through, last_token_seq]`` in
    order; an entry whose ``token`` is None was never announced.
    """

    applied_through: int
    applied_token: Token | None  # the last applied record's token, when kept
    entries: tuple[LostEntry, ...]
    last_token_seq: int

    @property
    def missing(self) -> list[int]:
        """Seqs inside the range that were never announced."""
        return [e.seq for e in self.entries if e.token is None]


class PendingQueue:
    """Records received but not yet applied, keyed by seq.

    *applied_through* is the seq through which the image already holds
    every write (0 for a fresh image); *applied_token* optionally the token
    of that last applied record, kept for its timestamp (the loss report's
    "consistent through seq A at time T"). *window* bounds how far past
    ``applied_through`` a token may lie.
    """

    def __init__(self, applied_through: int, applied_token: Token | None = None,
                 window: int = DEFAULT_WINDOW) -> None:
        if applied_through < 0:
            raise ValueError(f"applied_through {applied_through} is negative")
        if applied_token is not None and applied_token.seq != applied_through:
            raise ValueError(f"applied_token has seq {applied_token.seq}, "
                             f"not applied_through {applied_through}")
        if window < 1:
            raise ValueError(f"window {window} must be at least 1")
        self._applied = applied_through
        self._applied_token = applied_token
        self._window = window
        # seq -> [token, location]; location is _NO_DATA while incomplete.
        self._entries: dict[int, list[Any]] = {}
        self._highest = applied_through
        # Every seq <= _received is applied or complete; maintained as data
        # arrives so the "journaled through" ack costs nothing.
        self._received = applied_through
        self._bytes = 0  # encoded bytes of complete, unapplied records
        self._run_end: int | None = None  # end of the last run handed out
        # Base seq of a catch-up increment being staged: the stream that
        # follows it starts there, however far from applied_through.
        self._base_hint = applied_through

    # -- building --------------------------------------------------------

    @classmethod
    def rebuild(cls, applied_through: int, items: Iterable[tuple[Token, Any]],
                applied_token: Token | None = None,
                window: int = DEFAULT_WINDOW) -> PendingQueue:
        """A queue rebuilt from a journal replay after a restart.

        *items* yields ``(token, location)`` in journal order; a location of
        None means a token-only entry. A record carries its own header, so
        its token is added first: journal order need not put tokens first.
        """
        q = cls(applied_through, applied_token, window)
        for tok, loc in items:
            q.add_tokens((tok,))
            if loc is not None:
                q.add_record(tok, loc)
        return q

    # -- receiving -------------------------------------------------------

    def _check_token(self, tok: Token) -> bool:
        """True if *tok* is new; False for a harmless duplicate; raises
        StreamError if it contradicts what the queue knows."""
        seq = tok.seq
        if seq <= self._applied:
            if (seq == self._applied and self._applied_token is not None
                    and tok != self._applied_token):
                raise StreamError(
                    f"token for seq {seq} differs from the record already applied "
                    f"under that seq ({_describe(tok)} vs {_describe(self._applied_token)})")
            return False
        floor = max(self._applied, self._base_hint)
        if seq > floor + self._window:
            raise StreamError(
                f"token for seq {seq} is more than {self._window} seqs past "
                f"the applied seq {floor}")
        known = self._entries.get(seq)
        if known is None:
            return True
        if known[0] != tok:
            raise StreamError(
                f"two different tokens for seq {seq}: {_describe(known[0])} "
                f"then {_describe(tok)}")
        return False

    def add_tokens(self, tokens: Iterable[Token]) -> int:
        """Announce writes (a TOKENS frame); returns how many were new.

        A token for an applied seq, or one identical to a known token, is a
        re-send and is ignored. The same seq under a different header raises
        StreamError, and then no token of *tokens* is taken.
        """
        toks = list(tokens)
        new: dict[int, Token] = {}
        for tok in toks:
            if self._check_token(tok):
                prev = new.get(tok.seq)
                if prev is not None and prev != tok:
                    raise StreamError(
                        f"two different tokens for seq {tok.seq} in one batch: "
                        f"{_describe(prev)} then {_describe(tok)}")
                new[tok.seq] = tok
        for seq, tok in new.items():
            self._entries[seq] = [tok, _NO_DATA]
            if seq > self._highest:
                self._highest = seq
        return len(new)

    def check_record(self, token: Token) -> bool:
        """Would :meth:`add_record` take a record with this header?

        True: new data for an announced seq. False: a duplicate to ignore.
        Raises StreamError (data before its token, or a conflicting header)
        without changing anything -- so a receiver can refuse a frame before
        it spends journal space on it.
        """
        seq = token.seq
        if seq <= self._applied:
            self._check_token(token)  # raises on a conflict with A's token
            return False
        entry = self._entries.get(seq)
        if entry is None:
            raise StreamError(f"data for seq {seq} arrived before its token")
        if entry[0] != token:
            raise StreamError(
                f"data for seq {seq} carries a header that differs from its token: "
                f"{_describe(token)} vs token {_describe(entry[0])}")
        return entry[1] is _NO_DATA

    def add_record(self, token: Token, location: Any) -> bool:
        """Record that the data of *token* is stored at *location*.

        Returns True if the entry became complete, False if the record was a
        duplicate (already complete or applied) and was ignored -- the first
        location stays. Raises StreamError if the token was never announced
        or the header differs from the announced token.
        """
        if location is None or location is _NO_DATA:
            raise ValueError("a record's location must not be None")
        if not self.check_record(token):
            return False
        seq = token.seq
        self._entries[seq][1] = location
        self._bytes += token.size
        if seq == self._received + 1:
            self._received = self._complete_run_end(seq)
        return True

    def _complete_run_end(self, seq: int) -> int:
        """The last seq of the run of complete entries starting at *seq*
        (which is applied or complete)."""
        while True:
            nxt = self._entries.get(seq + 1)
            if nxt is None or nxt[1] is _NO_DATA:
                return seq
            seq += 1

    # -- applying --------------------------------------------------------

    def next_run(self, max_records: int | None = None,
                 max_bytes: int | None = None) -> list[tuple[Token, Any]]:
        """The in-order run of complete entries after ``applied_through``.

        Returns ``[(token, location), ...]`` for seqs applied_through+1,
        +2, ... up to the first gap or incomplete entry (empty if the next
        seq is not complete). *max_records* and *max_bytes* cap the run (it
        always holds at least one record when any is ready, so a record
        larger than *max_bytes* still gets through). Nothing is removed:
        call :meth:`mark_applied` with the run's last seq once it is applied.
        """
        run: list[tuple[Token, Any]] = []
        nbytes = 0
        seq = self._applied + 1
        limit = self._received  # everything up to here is complete
        while seq <= limit:
            if max_records is not None and len(run) >= max_records:
                break
            tok, loc = self._entries[seq]
            if run and max_bytes is not None and nbytes + tok.size > max_bytes:
                break
            run.append((tok, loc))
            nbytes += tok.size
            seq += 1
        self._run_end = run[-1][0].seq if run else None
        return run

    def mark_applied(self, seq: int) -> None:
        """The run ending at *seq* is now in the image: drop its entries.

        *seq* must be the last seq of the run :meth:`next_run` returned
        last; anything else is a bug in the caller (ValueError), because
        marking a seq applied that was not handed out would skip writes.
        """
        if self._run_end is None:
            raise ValueError(f"mark_applied({seq}) without a run handed out by next_run()")
        if seq != self._run_end:
            raise ValueError(f"mark_applied({seq}): the run handed out ends at seq {self._run_end}")
        for s in range(self._applied + 1, seq + 1):
            tok, _ = self._entries.pop(s)
            self._bytes -= tok.size
            last = tok
        self._applied = seq
        self._applied_token = last
        self._run_end = None

    # -- catch-up increments -------------------------------------------------

    def expect_base(self, seq: int) -> None:
        """An increment that will bring the image to *seq* is being staged:
        accept tokens for the stream that follows it."""
        self._base_hint = max(self._base_hint, seq)

    def rebase(self, seq: int, token: Token | None = None) -> None:
        """A committed increment brought the image to *seq*: every entry at
        or below it is superseded; the in-order stream continues at seq+1."""
        if seq < self._applied:
            raise ValueError(f"rebase({seq}) goes back from applied seq {self._applied}")
        for s in [s for s in self._entries if s <= seq]:
            tok, loc = self._entries.pop(s)
            if loc is not _NO_DATA:
                self._bytes -= tok.size
        self._applied = seq
        self._applied_token = token
        self._highest = max(self._highest, seq)
        self._base_hint = max(self._base_hint, seq)
        self._received = self._complete_run_end(seq)
        self._run_end = None

    # -- state -----------------------------------------------------------

    @property
    def applied_through(self) -> int:
        """Every seq <= this is in the image (the "applied through" ack)."""
        return self._applied

    @property
    def applied_token(self) -> Token | None:
        """Token of the last applied record, when known (for its ts)."""
        return self._applied_token

    @property
    def highest_token_seq(self) -> int:
        """Highest seq announced so far (never less than applied_through)."""
        return self._highest

    @property
    def received_through(self) -> int:
        """Every seq <= this is applied or has its data stored.

        This is the "journaled through" ack once the journal holding the
        data has been committed.
        """
        return self._received

    @property
    def pending_bytes(self) -> int:
        """Encoded bytes of the complete records not yet applied."""
        return self._bytes

    def __len__(self) -> int:
        """Entries (complete or not) after applied_through."""
        return len(self._entries)

    def first_gap(self) -> tuple[int, bool] | None:
        """The first seq that blocks applying, as ``(seq, known)``.

        *known* is False when the seq was never announced (its address is
        unknown), True when its token arrived but its data did not. None if
        nothing announced is missing.
        """
        if self._received >= self._highest:
            return None
        seq = self._received + 1
        return seq, seq in self._entries

    def oldest_pending(self) -> Token | None:
        """Token of the lowest announced seq not yet applied (the oldest
        write the image lacks, for the lag in seconds), or None."""
        for seq in range(self._applied + 1, self._highest + 1):
            e = self._entries.get(seq)
            if e is not None:
                return e[0]
        return None

    def loss_view(self) -> LossView:
        """What is known about every write after ``applied_through``.

        Lists each seq from applied_through+1 to the highest token seq, in
        order: its token (None if never announced) and whether its data
        arrived. Nothing after ``last_token_seq`` is known.
        """
        entries = []
        for seq in range(self._applied + 1, self._highest + 1):
            e = self._entries.get(seq)
            if e is None:
                entries.append(LostEntry(seq, None, False))
            else:
                entries.append(LostEntry(seq, e[0], e[1] is not _NO_DATA))
        return LossView(self._applied, self._applied_token, tuple(entries), self._highest)

    def __repr__(self) -> str:
        gap = self.first_gap()
        return (f"<PendingQueue applied_through={self._applied} "
                f"received_through={self._received} highest={self._highest} "
                f"entries={len(self._entries)} first_gap={gap}>")


def _describe(tok: Token) -> str:
    """A token in a few words, for error messages."""
    op = OP_NAMES.get(tok.op, f"op{tok.op}")
    return (f"{op} vol {tok.volume} offset {tok.offset} length {tok.length} "
            f"ts {tok.ts_ns} crc {tok.crc:#010x}")

"""The secondary's pending write queue: in-order runs by seq (DESIGN §6).

Theory of operation
-------------------
Every write the primary sequences reaches the secondary twice: first its
*token* (the 48-byte record header, sent ahead: an M1 entry), then the whole
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
secondary knows about the writes it does not have (DESIGN §7);
:mod:`replicator.secondary.lossreport` turns it into the loss report.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from replicator.errors import DuplexError
from replicator.secondary.applier import ApplyError
from replicator.native.rxq import RXQ_FAULTS, RxFault, RxInfo, RxQueue
from replicator.native.records import first_outside_volumes
from replicator.records import (HEADER_SIZE, NO_RANGE_OPS, OP_MARK, OP_NAMES, Token, padded,
                               unpack_token)

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


@dataclass(frozen=True, slots=True)
class LostEntry:
    """A seq after the consistent point, as the queue knows it; or a run of
    *count* consecutive seqs from *seq* on that were never announced
    (nothing tells them apart, and after a long catch-up there can be
    millions)."""

    seq: int
    token: Token | None  # None: never announced
    data_arrived: bool
    count: int = 1


@dataclass(frozen=True, slots=True)
class LossView:
    """What :meth:`PendingQueue.loss_view` returns: the raw loss report.

    ``entries`` covers every seq in ``(applied_through, last_token_seq]`` in
    order; an entry whose ``token`` is None stands for ``count`` seqs that
    were never announced.
    """

    applied_through: int
    applied_token: Token | None  # the last applied record's token, when kept
    entries: tuple[LostEntry, ...]
    last_token_seq: int

    @property
    def missing(self) -> list[int]:
        """Seqs inside the range that were never announced."""
        return [s for e in self.entries if e.token is None
                for s in range(e.seq, e.seq + e.count)]


class PendingQueue:
    """Records received but not yet applied, keyed by seq.

    *applied_through* is the seq through which the image already holds
    every write (0 for a fresh image); *applied_token* optionally the token
    of that last applied record, kept for its timestamp (the loss report's
    "consistent through seq A at time T"). *window* bounds how far past
    ``applied_through`` a token may lie.

    The entries live in C (native/rxq.h), so that a TOKENS or DATA frame
    costs one call however many records it holds. A location is normally
    an int (the record's offset in the journal, which the C applier reads
    back); any other object is kept here beside it (tests, tools).
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
        self._rx = RxQueue(applied_through, applied_token.pack() if applied_token else None,
                           window)
        self._objs: dict[int, Any] = {}  # seq -> a location that is not an int

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

    @property
    def hot_limit(self) -> int:
        """Bytes of received frames kept in memory for the applier."""
        return self._rx.hot_limit

    @hot_limit.setter
    def hot_limit(self, n: int) -> None:
        self._rx.hot_limit = n

    @property
    def hot_bytes(self) -> int:
        """Bytes of received frames kept in memory right now."""
        return self._rx.hot_bytes

    # -- receiving -------------------------------------------------------

    def add_tokens(self, tokens: Iterable[Token]) -> int:
        """Announce writes (a TOKENS frame); returns how many were new.

        A token for an applied seq, or one identical to a known token, is a
        re-send and is ignored. The same seq under a different header raises
        StreamError, and then no token of *tokens* is taken.
        """
        return self.add_token_bytes(b"".join(t.pack() for t in tokens))

    def add_token_bytes(self, payload) -> int:
        """:meth:`add_tokens` for a TOKENS payload as it arrived (packed
        48-byte headers): one call for the whole frame."""
        if len(payload) % HEADER_SIZE:
            raise StreamError(f"token list of {len(payload)} bytes is not a multiple of "
                              f"{HEADER_SIZE}")
        try:
            return self._rx.add_tokens(payload)
        except RxFault as f:
            raise _stream_error(f) from None

    def add_frame(self, payload, location: int, dry_run: bool = False,
                  max_seq: int | None = None) -> int:
        """The checked records of a DATA frame, stored from *location* on
        (each record at location + its offset in *payload*). Duplicates are
        ignored; a broken rule raises StreamError and changes nothing. With
        *dry_run* only the check. Returns how many records were new.

        Given the frame's *max_seq*, the queue may keep *payload* (immutable
        bytes, or a view of them) until that seq is applied, within
        :attr:`hot_limit` bytes, so the applier writes from memory."""
        try:
            return self._rx.add_records(payload, location, dry_run, max_seq)
        except RxFault as f:
            raise _stream_error(f) from None

    def check_record(self, token: Token) -> bool:
        """Would :meth:`add_record` take a record with this header?

        True: new data for an announced seq. False: a duplicate to ignore.
        Raises StreamError (data before its token, or a conflicting header)
        without changing anything -- so a receiver can refuse a frame before
        it spends journal space on it.
        """
        try:
            return self._rx.add_record(token.pack(), 0, dry_run=True)
        except RxFault as f:
            raise _stream_error(f) from None

    def add_record(self, token: Token, location: Any) -> bool:
        """Record that the data of *token* is stored at *location*.

        Returns True if the entry became complete, False if the record was a
        duplicate (already complete or applied) and was ignored -- the first
        location stays. Raises StreamError if the token was never announced
        or the header differs from the announced token.
        """
        if location is None:
            raise ValueError("a record's location must not be None")
        loc = getattr(location, "offset", location)  # a JournalPos: its offset
        try:
            new = self._rx.add_record(token.pack(), loc if isinstance(loc, int) else 0)
        except RxFault as f:
            raise _stream_error(f) from None
        if new and not isinstance(loc, int):
            self._objs[token.seq] = location
        return new

    # -- applying --------------------------------------------------------

    def take_run(self, max_records: int | None = None, max_bytes: int | None = None) -> int:
        """Hand out the in-order run of complete entries after
        ``applied_through`` without building Python objects for it (see
        :meth:`next_run`); returns its length. :meth:`apply_taken` writes
        it, :meth:`mark_applied` with :attr:`run_end` drops it."""
        return self._rx.take_run(max_records or 0, max_bytes or 0)

    @property
    def run_end(self) -> int | None:
        """Last seq of the run handed out, None when there is none."""
        return self._rx.info().run_end or None

    def apply_taken(self, journal_fd: int, image_fd: int, image_size: int) -> int:
        """Write the run handed out to the image (native/rxq.h: the data
        read back from the journal at each int location, adjacent writes
        merged). The only I/O of this module, done in C with the GIL
        released; safe beside the other calls, which the caller serialises.
        Returns the data bytes written. Raises OSError (I/O) or ApplyError
        (a record that cannot go to this image), with nothing marked."""
        try:
            return self._rx.apply_run(journal_fd, image_fd, image_size)
        except RxFault as f:
            raise _apply_error(f) from None

    def apply_taken_volumes(self, journal_fd: int, image_fds: Sequence[int],
                            image_sizes: Sequence[int]) -> int:
        """:meth:`apply_taken` for a resource of several volumes (DESIGN §8):
        volume v's image is ``image_fds[v]`` of ``image_sizes[v]`` bytes;
        each record goes to its volume's image at its offset, a FLUSH syncs
        every image. An OSError carries ``duplex_volume``, the index of the
        image that failed (None: the journal read)."""
        try:
            return self._rx.apply_run_volumes(journal_fd, list(image_fds), list(image_sizes))
        except RxFault as f:
            raise _apply_error(f) from None

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
        n = self.take_run(max_records, max_bytes)
        run = []
        for i in range(n):
            raw, loc = self._rx.run_item(i)
            tok = unpack_token(raw)
            run.append((tok, self._objs.get(tok.seq, loc) if self._objs else loc))
        return run

    def mark_applied(self, seq: int) -> None:
        """The run ending at *seq* is now in the image: drop its entries.

        *seq* must be the last seq of the run :meth:`next_run` returned
        last; anything else is a bug in the caller (ValueError), because
        marking a seq applied that was not handed out would skip writes.
        """
        if not self._rx.mark_applied(seq):  # the C queue checks the run; words here
            end = self._rx.info().run_end
            if not end:
                raise ValueError(f"mark_applied({seq}) without a run handed out by next_run()")
            raise ValueError(f"mark_applied({seq}): the run handed out ends at seq {end}")
        self._forget_objs(seq)

    def _forget_objs(self, seq: int) -> None:
        if self._objs:
            for s in [s for s in self._objs if s <= seq]:
                del self._objs[s]

    # -- catch-up increments -------------------------------------------------

    def expect_base(self, seq: int) -> None:
        """An increment that will bring the image to *seq* is being staged:
        accept tokens for the stream that follows it."""
        self._rx.expect_base(seq)

    def rebase(self, seq: int, token: Token | None = None) -> None:
        """A committed increment brought the image to *seq*: every entry at
        or below it is superseded; the in-order stream continues at seq+1."""
        if token is not None and token.seq != seq:
            raise ValueError(f"rebase({seq}) given the token of seq {token.seq}")
        if not self._rx.rebase(seq, token.pack() if token else None):
            raise ValueError(f"rebase({seq}) goes back from applied seq {self.applied_through}")
        self._forget_objs(seq)

    # -- state -----------------------------------------------------------

    @property
    def applied_through(self) -> int:
        """Every seq <= this is in the image (the "applied through" ack)."""
        return self._rx.info().applied

    @property
    def applied_token(self) -> Token | None:
        """Token of the last applied record, when known (for its ts)."""
        raw = self._rx.info().applied_token
        return unpack_token(raw) if raw else None

    @property
    def highest_token_seq(self) -> int:
        """Highest seq announced so far (never less than applied_through)."""
        return self._rx.info().highest

    # -- a consistency group's bound (DESIGN §13) ---------------------------

    def set_ts_bound(self, ts_ns: int) -> None:
        """Runs stop before the first record (other than a MARK) stamped
        after *ts_ns*; 0: no bound."""
        self._rx.set_ts_bound(ts_ns)

    def cover(self, seq: int) -> None:
        """A committed increment ending at *seq* waits (a consistency
        group's, DESIGN §13): the records after it count as received (so
        journaled and acknowledged), runs wait for its rebase."""
        self._rx.cover(seq)

    def stamp_of(self, seq: int) -> int:
        """The stamp of *seq* if the queue knows its token (or it is the
        applied one), else 0."""
        _st, tok, _loc = self._rx.get(seq)
        if tok is None:
            at = self.applied_token
            return at.ts_ns if at is not None and at.seq == seq else 0
        return int.from_bytes(tok[8:16], "little")

    def bound_reached(self, bound: int, journaled: int) -> bool:
        """Nothing journaled and stamped at or before *bound* is left to
        apply: the next seq is not journaled, or is a record stamped after
        the bound."""
        nxt = self.applied_through + 1
        if nxt > journaled:
            return True
        _st, tok, _loc = self._rx.get(nxt)
        if tok is None:
            return True
        op = tok[36]
        return op != OP_MARK and int.from_bytes(tok[8:16], "little") > bound

    @property
    def received_through(self) -> int:
        """Every seq <= this is applied or has its data stored.

        This is the "journaled through" ack once the journal holding the
        data has been committed.
        """
        return self._rx.info().received

    @property
    def pending_bytes(self) -> int:
        """Encoded bytes of the complete records not yet applied."""
        return self._rx.info().bytes

    def info(self) -> RxInfo:
        """Every counter above in one call."""
        return self._rx.info()

    def __len__(self) -> int:
        """Entries (complete or not) after applied_through."""
        return self._rx.info().entries

    def first_gap(self) -> tuple[int, bool] | None:
        """The first seq that blocks applying, as ``(seq, known)``.

        *known* is False when the seq was never announced (its address is
        unknown), True when its token arrived but its data did not. None if
        nothing announced is missing.
        """
        info = self._rx.info()
        if info.received >= info.highest:
            return None
        seq = info.received + 1
        return seq, self._rx.get(seq)[0] != 0

    def oldest_pending(self) -> Token | None:
        """Token of the lowest announced seq not yet applied (the oldest
        write the image lacks, for the lag in seconds), or None. One C
        pass over the entries, however wide the gaps (status calls it)."""
        raw = self._rx.oldest()
        return unpack_token(raw) if raw is not None else None

    def loss_view(self) -> LossView:
        """What is known about every write after ``applied_through``.

        Covers each seq from applied_through+1 to the highest token seq, in
        order: its token and whether its data arrived, or, for a run of
        seqs never announced, one entry with their count. Nothing after
        ``last_token_seq`` is known. Costs one call per known entry, not
        per seq.
        """
        info = self._rx.info()
        entries = []
        nxt = info.applied + 1
        for seq in self._rx.live_seqs():
            if seq > nxt:
                entries.append(LostEntry(nxt, None, False, seq - nxt))
            state, raw, _ = self._rx.get(seq)
            entries.append(LostEntry(seq, unpack_token(raw), state == RxQueue.COMPLETE))
            nxt = seq + 1
        if info.highest >= nxt:
            entries.append(LostEntry(nxt, None, False, info.highest - nxt + 1))
        return LossView(info.applied, self.applied_token, tuple(entries), info.highest)

    def __repr__(self) -> str:
        info = self._rx.info()
        return (f"<PendingQueue applied_through={info.applied} "
                f"received_through={info.received} highest={info.highest} "
                f"entries={info.entries} first_gap={self.first_gap()}>")


# Header fields read to check a record's volume (records.HEADER layout).
_OFF_LEN_DLEN_VOL = struct.Struct("<QII I")  # offset, length, data_len, volume at byte 16
_OP_AT = 36


def check_volumes(payload, sizes: Sequence[int], tokens_only: bool = False) -> None:
    """Every record (or token) packed in *payload* names a volume of the
    resource (index < len(sizes)) and lies inside it (FLUSH: any range; it
    covers every volume). StreamError naming the seq otherwise, before
    anything is queued or journaled. *payload* was structure-checked by the
    frame decoder, so each header is whole."""
    first = first_outside_volumes(payload, sizes, tokens_only)  # one C call per frame
    if first is None:
        return
    mv = memoryview(payload).cast("B")
    pos, n = first, len(mv)  # the record the C check stopped at, worded here
    nvol = len(sizes)
    while pos + HEADER_SIZE <= n:
        off, length, dlen, vol = _OFF_LEN_DLEN_VOL.unpack_from(mv, pos + 16)
        if vol >= nvol:
            seq = struct.unpack_from("<Q", mv, pos)[0]
            raise StreamError(f"record seq {seq} names volume {vol}, but the resource has "
                              f"{nvol} volume(s) (0..{nvol - 1})")
        if mv[pos + _OP_AT] not in NO_RANGE_OPS and off + length > sizes[vol]:
            seq = struct.unpack_from("<Q", mv, pos)[0]
            raise StreamError(f"record seq {seq}: {length} bytes at offset {off} run past "
                              f"the end of volume {vol} ({sizes[vol]} bytes)")
        pos += HEADER_SIZE if tokens_only else HEADER_SIZE + padded(dlen)


_FAULTS = {v: k for k, v in RXQ_FAULTS.items()}


def _stream_error(f: RxFault) -> Exception:
    """The words for a rule the stream broke (native/rxq.h faults)."""
    kind = _FAULTS.get(f.fault, "")
    seq = f.seq
    if kind == "nomem":
        return MemoryError(f"pending queue: out of memory at seq {seq}")
    if kind == "bad_record":
        return StreamError(f"malformed record header at byte {f.off} of the frame")
    got = _describe(unpack_token(f.got)) if kind not in ("window", "no_token") else ""
    had = _describe(unpack_token(f.had)) if kind not in ("window", "no_token") else ""
    if kind == "applied_differs":
        return StreamError(f"token for seq {seq} differs from the record already applied "
                           f"under that seq ({got} vs {had})")
    if kind == "window":
        return StreamError(f"token for seq {seq} is more than {f.limit} seqs past "
                           f"the applied seq {f.floor}")
    if kind == "token_differs":
        return StreamError(f"two different tokens for seq {seq}: {had} then {got}")
    if kind == "batch_differs":
        return StreamError(f"two different tokens for seq {seq} in one batch: {had} then {got}")
    if kind == "no_token":
        return StreamError(f"data for seq {seq} arrived before its token")
    if kind == "data_differs":
        return StreamError(f"data for seq {seq} carries a header that differs from its "
                           f"token: {got} vs token {had}")
    return StreamError(f"pending queue: fault {f.fault} at seq {seq}")


def _apply_error(f: RxFault) -> Exception:
    kind = _FAULTS.get(f.fault, "")
    if kind == "io":
        e = OSError(f.errnum, f"applying seq {f.seq}: {os.strerror(f.errnum)}")
        e.duplex_volume = getattr(f, "volume", None)  # which image (several volumes)
        return e
    if kind == "range":
        t = unpack_token(f.got)
        return ApplyError(f"record seq {f.seq}: {OP_NAMES.get(t.op, t.op)} of {t.length} bytes "
                           f"at offset {t.offset} runs past the end of the {f.limit}-byte image")
    if kind == "volume":
        return ApplyError(f"record seq {f.seq}: no image for volume {unpack_token(f.got).volume}")
    if kind == "journal":
        return ApplyError(f"journal offset {f.off} does not hold record seq {f.seq}: "
                           f"the journal is damaged or was overwritten")
    if kind == "nomem":
        return MemoryError(f"applying seq {f.seq}: out of memory")
    return ApplyError(f"applying seq {f.seq}: fault {f.fault}")


def _describe(tok: Token) -> str:
    """A token in a few words, for error messages."""
    op = OP_NAMES.get(tok.op, f"op{tok.op}")
    return (f"{op} vol {tok.volume} offset {tok.offset} length {tok.length} "
            f"ts {tok.ts_ns} crc {tok.crc:#010x}")

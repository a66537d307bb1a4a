"""The secondary's journal: received records, durable before they are acked.

Theory of operation
-------------------
The journal is one preallocated file::

    [0, 4096)       superblock slot 0
    [4096, 8192)    superblock slot 1
    [8192, size)    the log area, used as a circular log of entries

**Superblock.** Magic, format version, the resource's UUID, the file size,
a generation counter, and the *checkpoint*: the seq through which records
are applied to the image (and the image fdatasynced), the token of that
last applied record (for its timestamp), and where the live log starts
(position, LSN and chain value of its first entry). Each write goes to the
slot the previous one did not use, so a torn superblock write leaves the
previous superblock intact; :meth:`Journal.open` takes the valid slot with
the higher generation.

**Entries.** ``header (40 bytes) + payload``, padded to 8 bytes::

    u32 magic   u16 type   u16 flags   u64 lsn   u32 payload_len
    u32 prev    (crc of the previous entry: a chain)
    u64 seq_hi  (highest seq the entry holds)
    u32 crc     (CRC32C of the header with crc = 0, then the payload;
                 the header alone with ENTRY_FLAG_RECORDS_CRC)
    u32 reserved

A RECORDS entry carries ENTRY_FLAG_RECORDS_CRC (format version 2): its
records were checked on arrival and each carries a CRC32C of its own (and
zero padding), so the entry's CRC covers only its header, and
:meth:`Journal.open` checks the records instead. That spares a pass over
every replicated byte on the hot path and detects a torn or damaged
payload just as well. Version 1 journals (every entry's CRC covering its
payload) still open; the superblocks are then rewritten as version 2, so
that an older Duplex does not take flagged entries for a torn tail.

A RECORDS payload is one or more records in :mod:`replicator.records`
encoding, so a DATA frame's validated records go to disk in one write. A
TOKENS payload is a list of 48-byte tokens (announcements without data).
INCR_DATA and INCR_COMMIT stage catch-up increments (DESIGN §4): an
INCR_DATA payload is ``u64 incr_id, u64 offset, u32 length, u32 volume``
then the data; an INCR_COMMIT payload is ``u64 incr_id, u64 base_seq``. An
increment's entries carry its base seq as seq_hi, so they stay live until
the image has been brought to that seq, i.e. until the increment was
applied. An increment is applied only once its COMMIT entry is durable
(redo: a crash while applying it applies it again on restart); the entries
of an increment that never committed are dead and freed as if applied.

An entry never spans the end of the log area: when it does not fit, it is
written at the start of the area instead, and a reader that finds no valid
entry at the current position looks at the start. An entry is valid only
if its magic, LSN (previous + 1), chain value (the previous entry's crc)
and crc all match, so stale entries from earlier laps -- and entries left
behind a torn tail that was later overwritten -- are never mistaken for
live ones. :meth:`Journal.open` scans the live log from the checkpoint and
stops at the first invalid entry: a torn tail was never committed, hence
never acked, and the primary still has it.

**Space.** An entry is freed by :meth:`Journal.checkpoint` once every
record it holds is applied (``seq_hi <= applied_seq``), oldest first. Data
arrives out of seq order, so a record's own position says nothing about
what may be freed; the entry's seq_hi does. An append that would overwrite
a live entry raises :class:`JournalFull` (or check :meth:`Journal.has_room`
first): the receiver stops reading from its sockets until the applier
catches up. The journal never overwrites unapplied data.

**Contract with the receiver and the applier.**

1. ``append`` the records (one entry per DATA frame), ``commit`` once for a
   batch of appends (one fdatasync), then ack "journaled through". The
   applier must never apply a record that is not yet durable here, or a
   secondary crash could leave a later write in the image without an
   earlier one: either hand positions to the pending queue only after the
   commit, or cap runs at the queue's ``received_through`` as it was when
   the commit began.
2. After writing runs to the image and fdatasyncing it, call
   ``checkpoint(applied_seq, applied_token)``.
3. On restart, ``open`` then :meth:`Journal.replay` into
   :meth:`PendingQueue.rebuild` with ``applied_through = journal.applied_seq``;
   records between the checkpoint and the crash are applied again, in
   order, which restores the image exactly (every op overwrites its whole
   range).
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import struct
import uuid as uuidlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from replicator.crc32c import crc32c
from replicator.errors import DuplexError
from replicator.fileio import pwritev_all
from replicator.records import (HEADER_SIZE, RecordError, Token, iter_records, iter_tokens,
                                padded, record_crc, scan_records, unpack_token)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no entry flags
SB_MAGIC = b"DPXJRNL\0"
SB_SLOT_SIZE = 4096
SB_OFFSETS = (0, SB_SLOT_SIZE)
AREA_START = 2 * SB_SLOT_SIZE
MIN_AREA = 4096

# magic, version, flags, uuid, size, gen, applied_seq, tail_pos, tail_lsn,
# tail_prev, has_token, applied_token, reserved; then u32 crc.
_SB = struct.Struct("<8sII16sQQQQQIII48s")
_SB_CRC = struct.Struct("<I")
_SB_VERSION_AT = 8  # the version sits here in every format version

ENTRY_MAGIC = 0x4C4E524A  # "JRNL"
ENTRY_RECORDS = 1
ENTRY_TOKENS = 2
ENTRY_INCR_DATA = 3    # reserved: staged catch-up increment data
ENTRY_INCR_COMMIT = 4  # reserved: the COMMIT(k) marker of an increment
ENTRY_INCR_ZERO = 5    # a range of an increment that reads as zeros (no data)
ENTRY_FLAG_RECORDS_CRC = 0x0001  # the crc covers the header; the records check themselves
ENTRY_TYPE_NAMES = {ENTRY_RECORDS: "records", ENTRY_TOKENS: "tokens",
                    ENTRY_INCR_ZERO: "increment zeros",
                    ENTRY_INCR_DATA: "increment data", ENTRY_INCR_COMMIT: "increment commit"}
# magic, type, flags, lsn, payload_len, prev, seq_hi, crc, reserved
_INCR_DATA = struct.Struct("<QQII")
_INCR_COMMIT = struct.Struct("<QQ")


class _Concat:
    """Two buffers as one payload for _append_entry (len + CRC + write)."""

    def __init__(self, head: bytes, body: memoryview):
        self.parts = [head, body]

    def __len__(self) -> int:
        return len(self.parts[0]) + len(self.parts[1])


_EH = struct.Struct("<IHHQIIQII")
ENTRY_HEADER_SIZE = _EH.size  # 40
_EH_CRC_AT = 32


class JournalError(DuplexError):
    """The journal file is unusable or an operation on it failed; the
    message names the file and what is wrong."""


class JournalFull(JournalError):
    """An append would overwrite entries not yet applied: stop reading from
    the peer until the applier checkpoints (backpressure)."""


@dataclass(frozen=True, slots=True)
class JournalPos:
    """Where one record lives: file *offset* and *size* (encoded record
    bytes), with its *seq* and the *lsn* of the entry holding it."""

    offset: int
    size: int
    seq: int
    lsn: int


@dataclass(frozen=True, slots=True)
class _Entry:
    """Index of one live entry (the payload stays on disk)."""

    pos: int
    size: int  # header + padded payload
    lsn: int
    prev: int
    crc: int
    type: int
    payload_len: int
    seq_hi: int


def entry_size(payload_len: int) -> int:
    """Bytes an entry with *payload_len* payload bytes takes in the log."""
    return ENTRY_HEADER_SIZE + padded(payload_len)


def _as_uuid_bytes(u: bytes | uuidlib.UUID) -> bytes:
    b = u.bytes if isinstance(u, uuidlib.UUID) else bytes(u)
    if len(b) != 16:
        raise ValueError(f"resource uuid must be 16 bytes, got {len(b)}")
    return b


def _records_intact(payload) -> bool:
    """Does every record in *payload* pass its CRC and shape checks?"""
    if scan_records(payload) is not None:
        return True
    try:  # the C core said no, or is not built: the Python check decides
        for _ in iter_records(payload):
            pass
    except RecordError:
        return False
    return True


def _payload_problem(etype: int, payload: bytes) -> str | None:
    """What is wrong with the payload of an intact entry of *etype*
    (one whose crc covers its payload), or None: what replay and the
    increment readers will parse must parse."""
    try:
        if etype == ENTRY_RECORDS:
            if not payload:
                return "no records"
            for _ in iter_records(payload):
                pass
        elif etype == ENTRY_TOKENS:
            if not payload:
                return "no tokens"
            for _ in iter_tokens(payload):
                pass
    except RecordError as e:
        return str(e)
    if etype == ENTRY_INCR_DATA:
        if len(payload) < _INCR_DATA.size:
            return f"{len(payload)} bytes, shorter than its {_INCR_DATA.size}-byte head"
        length = _INCR_DATA.unpack_from(payload)[2]
        if length != len(payload) - _INCR_DATA.size:
            return f"its head says {length} data bytes, it holds {len(payload) - _INCR_DATA.size}"
    elif etype == ENTRY_INCR_ZERO and len(payload) != _INCR_DATA.size:
        return f"{len(payload)} bytes, expected {_INCR_DATA.size}"
    elif etype == ENTRY_INCR_COMMIT and len(payload) != _INCR_COMMIT.size:
        return f"{len(payload)} bytes, expected {_INCR_COMMIT.size}"
    return None


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    chunks = []
    while n:
        b = os.pread(fd, n, offset)
        if not b:
            break
        chunks.append(b)
        n -= len(b)
        offset += len(b)
    return b"".join(chunks)


class Journal:
    """An open journal. Use :meth:`create` or :meth:`open`, not the
    constructor.

    Threads: appends, checkpoints and the index (``backlog``,
    ``committed_increments``, ``replay``) are serialised by the caller (the
    daemon's ``_lock``). :meth:`commit` alone may run beside an append, by
    design (group commit, under the daemon's ``_commit_lock``): it reads
    ``_next_lsn`` once, which an append advances only after its write has
    completed, so it makes durable exactly the entries written before it
    looked, and never claims one still being written."""

    def __init__(self, path: str, fd: int, uuid: bytes, size: int) -> None:
        self.path = path
        self._fd = fd
        self.uuid = uuid
        self.size = size
        self._area_end = size
        self._gen = 0
        self._applied_seq = 0
        self._applied_token: Token | None = None
        self._live: deque[_Entry] = deque()
        self._head = AREA_START
        self._next_lsn = 1
        self._prev = 0  # chain value the next entry carries
        self._committed_lsn = 0

    # -- creating and opening --------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, uuid: bytes | uuidlib.UUID, size: int,
               overwrite: bool = False) -> Journal:
        """Create and preallocate a journal of *size* bytes for resource
        *uuid*; returns it open. Refuses an existing file unless
        *overwrite*, which starts the file over (all its data is dropped).
        """
        path = os.fspath(path)
        ub = _as_uuid_bytes(uuid)
        if size % 4096 or size < AREA_START + MIN_AREA:
            raise JournalError(
                f"journal {path}: size {size} must be a multiple of 4096 and at least "
                f"{AREA_START + MIN_AREA} bytes")
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        if not overwrite:
            flags |= os.O_EXCL
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise JournalError(f"journal {path}: already exists (refusing to overwrite it)") from None
        except OSError as e:
            raise JournalError(f"journal {path}: cannot create: {e.strerror}") from None
        try:
            cls._lock(path, fd)  # before truncating: never a journal in use
            try:
                os.ftruncate(fd, 0)  # drop old contents: fallocate keeps them
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise JournalError(f"journal {path}: cannot preallocate {size} bytes: "
                                   f"{e.strerror}") from None
            j = cls(path, fd, ub, size)
            # A random chain seed: entries of an earlier journal at this path
            # can never continue this one's chain.
            j._prev = int.from_bytes(os.urandom(4), "little")
            j._write_superblock(fsync=False)
            j._write_superblock(fsync=True)  # both slots valid from the start
            dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)  # the new name itself must survive a crash
            finally:
                os.close(dfd)
            return j
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, uuid: bytes | uuidlib.UUID) -> Journal:
        """Open the journal of resource *uuid* and scan its live log.

        Raises JournalError naming the file and the reason: missing, too
        short or truncated, not a journal, another resource's, another
        format version, both superblocks damaged, or in use.
        """
        path = os.fspath(path)
        ub = _as_uuid_bytes(uuid)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise JournalError(f"journal {path}: no such file") from None
        except OSError as e:
            raise JournalError(f"journal {path}: cannot open: {e.strerror}") from None
        try:
            cls._lock(path, fd)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise JournalError(f"journal {path}: not a regular file")
            sb = cls._read_superblock(path, fd, st.st_size)
            (_, _, _, sb_uuid, size, gen, applied, tail_pos, tail_lsn, tail_prev,
             has_token, _, tok_bytes) = sb
            if sb_uuid != ub:
                raise JournalError(
                    f"journal {path}: belongs to resource {uuidlib.UUID(bytes=sb_uuid)}, "
                    f"not {uuidlib.UUID(bytes=ub)}")
            if size % 4096 or size < AREA_START + MIN_AREA:
                # create() makes no such journal; a log area this small
                # (or none) would stall the receiver for good.
                raise JournalError(
                    f"journal {path}: its superblock gives a size of {size} bytes, not a "
                    f"multiple of 4096 of at least {AREA_START + MIN_AREA}: damaged")
            if st.st_size < size:
                raise JournalError(
                    f"journal {path}: truncated: the file is {st.st_size} bytes but its "
                    f"superblock says {size}")
            if not AREA_START <= tail_pos <= size:
                raise JournalError(f"journal {path}: superblock checkpoint position "
                                   f"{tail_pos} lies outside the log area")
            j = cls(path, fd, ub, size)
            j._gen = gen
            j._applied_seq = applied
            if has_token:
                try:
                    j._applied_token = unpack_token(tok_bytes)
                except RecordError as e:
                    raise JournalError(f"journal {path}: checkpoint token: {e}") from None
            j._head, j._next_lsn, j._prev = tail_pos, tail_lsn, tail_prev
            j._scan()
            j._forget_uncommitted()
            j._committed_lsn = j._next_lsn - 1
            if sb[1] != FORMAT_VERSION:
                j._write_superblock(fsync=False)  # both slots: see the module doc
                j._write_superblock(fsync=True)
            return j
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _lock(path: str, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalError(f"journal {path}: in use by another process") from None

    @staticmethod
    def _read_superblock(path: str, fd: int, file_size: int) -> tuple:
        """The valid superblock with the highest generation, or a clear error."""
        if file_size < AREA_START + MIN_AREA:
            raise JournalError(
                f"journal {path}: too short ({file_size} bytes) to be a journal: "
                f"torn or truncated")
        best = None
        reasons = []
        versions = set()
        for slot, off in enumerate(SB_OFFSETS):
            raw = _pread_exact(fd, _SB.size + _SB_CRC.size, off)
            if raw[:8] != SB_MAGIC:
                reasons.append(f"slot {slot}: no journal magic")
                continue
            (version,) = struct.unpack_from("<I", raw, _SB_VERSION_AT)
            if version not in READABLE_VERSIONS:
                versions.add(version)
                reasons.append(f"slot {slot}: format version {version}")
                continue
            (crc,) = _SB_CRC.unpack_from(raw, _SB.size)
            if crc32c(raw[:_SB.size]) != crc:
                reasons.append(f"slot {slot}: checksum mismatch")
                continue
            fields = _SB.unpack_from(raw)
            if best is None or fields[5] > best[5]:
                best = fields
        if best is not None:
            return best
        if versions:
            raise JournalError(
                f"journal {path}: format version {', '.join(map(str, sorted(versions)))}; "
                f"this Duplex reads version {FORMAT_VERSION}")
        if all("no journal magic" in r for r in reasons):
            raise JournalError(f"journal {path}: not a Duplex journal (no superblock magic)")
        raise JournalError(f"journal {path}: both superblocks are damaged "
                           f"({'; '.join(reasons)})")

    def _write_superblock(self, fsync: bool = True) -> None:
        """Write the checkpoint to the slot the last write did not use."""
        if self._live:
            t = self._live[0]
            tail = (t.pos, t.lsn, t.prev)
        else:
            tail = (self._head, self._next_lsn, self._prev)
        gen = self._gen + 1
        tok = self._applied_token
        body = _SB.pack(SB_MAGIC, FORMAT_VERSION, 0, self.uuid, self.size, gen,
                        self._applied_seq, *tail, 1 if tok else 0, 0,
                        tok.pack() if tok else b"\0" * HEADER_SIZE)
        block = body + _SB_CRC.pack(crc32c(body))
        try:
            pwritev_all(self._fd, [block], SB_OFFSETS[gen % 2])
            if fsync:
                os.fdatasync(self._fd)
        except OSError as e:
            raise JournalError(f"journal {self.path}: superblock write failed: "
                               f"{e.strerror}") from None
        self._gen = gen

    # -- the log ------------------------------------------------------------

    def _read_entry(self, pos: int, lsn: int, prev: int) -> _Entry | None:
        """The entry at *pos* if it is the valid continuation of the chain."""
        if pos + ENTRY_HEADER_SIZE > self._area_end:
            return None
        raw = _pread_exact(self._fd, ENTRY_HEADER_SIZE, pos)
        if len(raw) < ENTRY_HEADER_SIZE:
            return None
        magic, etype, flags, e_lsn, plen, e_prev, seq_hi, crc, _ = _EH.unpack(raw)
        if magic != ENTRY_MAGIC or e_lsn != lsn or e_prev != prev:
            return None
        size = entry_size(plen)
        if pos + size > self._area_end:
            return None
        payload = _pread_exact(self._fd, plen, pos + ENTRY_HEADER_SIZE)
        hdr0 = raw[:_EH_CRC_AT] + b"\0\0\0\0" + raw[_EH_CRC_AT + 4:]
        if len(payload) != plen:
            return None
        self_checked = flags & ENTRY_FLAG_RECORDS_CRC and etype == ENTRY_RECORDS
        expect = crc32c(hdr0)
        if not self_checked:
            expect = crc32c(payload, expect)
        if expect != crc:
            return None
        if etype not in ENTRY_TYPE_NAMES or flags & ~ENTRY_FLAG_RECORDS_CRC or (
                flags and not self_checked):
            # Intact and in the chain, yet of a type or with flags we do not
            # know: written by a newer Duplex. Skipping it would drop data.
            raise JournalError(f"journal {self.path}: entry lsn {lsn} at offset {pos} has "
                               f"unknown type {etype} or flags 0x{flags:04x} "
                               f"(written by a newer version?)")
        if self_checked and not _records_intact(payload):
            return None  # torn (or damaged) like a payload failing the entry crc
        bad = None if self_checked else _payload_problem(etype, payload)
        if bad is not None:
            # The crc covers this payload, so it is not torn: it was written
            # so (or damaged and re-checksummed). Replaying it would fail, and
            # taking it for the end of the log would drop the entries after it.
            raise JournalError(f"journal {self.path}: entry lsn {lsn} at offset {pos} "
                               f"({ENTRY_TYPE_NAMES[etype]}) is malformed: {bad}")
        return _Entry(pos, size, lsn, prev, crc, etype, plen, seq_hi)

    def _scan(self) -> None:
        """Index the live log from the checkpoint to the first invalid entry."""
        used = 0
        area = self._area_end - AREA_START
        while True:
            e = self._read_entry(self._head, self._next_lsn, self._prev)
            if e is None and self._head != AREA_START:
                # The writer puts an entry at the start when it did not fit.
                e = self._read_entry(AREA_START, self._next_lsn, self._prev)
                if e is not None and self._live:
                    # The gap at the end is inside the live log; before its
                    # first entry it is not (used_bytes counts from there).
                    used += self._area_end - self._head
            if e is None or used + e.size > area:
                break
            used += e.size
            self._live.append(e)
            self._head = e.pos + e.size
            self._next_lsn = e.lsn + 1
            self._prev = e.crc

    def _place(self, size: int) -> int | None:
        """Where an entry of *size* bytes goes, or None if it would
        overwrite a live entry."""
        start, end, head = AREA_START, self._area_end, self._head
        if size > end - start:
            return None
        if not self._live:
            return head if head + size <= end else start
        tail = self._live[0].pos
        if head > tail:
            if head + size <= end:
                return head
            return start if start + size <= tail else None
        return head if head + size <= tail else None

    def has_room(self, payload_len: int) -> bool:
        """Would an entry with *payload_len* payload bytes fit right now?"""
        return self._place(entry_size(payload_len)) is not None

    def _append_entry(self, etype: int, payload, seq_hi: int, flags: int = 0) -> _Entry:
        plen = len(payload)
        size = entry_size(plen)
        if size > self._area_end - AREA_START:
            raise ValueError(f"journal {self.path}: an entry of {size} bytes can never fit "
                             f"in a log area of {self._area_end - AREA_START} bytes")
        pos = self._place(size)
        if pos is None:
            oldest = self._live[0]
            raise JournalFull(
                f"journal {self.path}: full ({self.used_bytes} of {self.area_size} bytes used; "
                f"the oldest entry holds seqs up to {oldest.seq_hi}, applied only through "
                f"{self._applied_seq}); cannot take {size} more bytes")
        hdr0 = _EH.pack(ENTRY_MAGIC, etype, flags, self._next_lsn, plen, self._prev, seq_hi, 0, 0)
        parts = payload.parts if isinstance(payload, _Concat) else [payload]
        crc = crc32c(hdr0)
        for part in parts if not flags & ENTRY_FLAG_RECORDS_CRC else ():
            crc = crc32c(part, crc)
        hdr = _EH.pack(ENTRY_MAGIC, etype, flags, self._next_lsn, plen, self._prev, seq_hi, crc, 0)
        pad = b"\0" * (size - ENTRY_HEADER_SIZE - plen)
        try:
            pwritev_all(self._fd, [hdr, *parts, pad], pos)
        except OSError as e:
            raise JournalError(f"journal {self.path}: write of {size} bytes at offset {pos} "
                               f"failed: {e.strerror}") from None
        e = _Entry(pos, size, self._next_lsn, self._prev, crc, etype, plen, seq_hi)
        self._live.append(e)
        self._head = pos + size
        self._next_lsn += 1
        self._prev = crc
        return e

    # -- increments -------------------------------------------------------

    def append_incr_data(self, incr_id: int, base_seq: int, offset: int, data,
                         volume: int = 0) -> int:
        """Stage one piece of increment *incr_id*; returns its file position
        (for :meth:`read_incr_data`). Not durable until :meth:`commit`."""
        mv = memoryview(data).cast("B")
        head = _INCR_DATA.pack(incr_id, offset, len(mv), volume)
        e = self._append_entry(ENTRY_INCR_DATA, _Concat(head, mv), base_seq)
        return e.pos + ENTRY_HEADER_SIZE

    def append_incr_zero(self, incr_id: int, base_seq: int, offset: int, length: int,
                         volume: int = 0) -> int:
        """Stage a range of increment *incr_id* that reads as zeros."""
        e = self._append_entry(ENTRY_INCR_ZERO, _INCR_DATA.pack(incr_id, offset, length, volume),
                               base_seq)
        return e.pos + ENTRY_HEADER_SIZE

    def append_incr_commit(self, incr_id: int, base_seq: int) -> None:
        """Stage COMMIT(incr_id); durable after :meth:`commit`, and from then
        on the increment is applied even across a crash."""
        self._append_entry(ENTRY_INCR_COMMIT, _INCR_COMMIT.pack(incr_id, base_seq), base_seq)

    def read_incr_data(self, pos: int) -> tuple[int, int, bytes | int]:
        """(offset, volume, data) of the staged piece at *pos*; for a range
        of zeros, its length instead of data."""
        etype = _EH.unpack(_pread_exact(self._fd, ENTRY_HEADER_SIZE,
                                        pos - ENTRY_HEADER_SIZE))[1]
        head = _pread_exact(self._fd, _INCR_DATA.size, pos)
        incr_id, offset, length, volume = _INCR_DATA.unpack(head)
        if etype == ENTRY_INCR_ZERO:
            return offset, volume, length
        data = _pread_exact(self._fd, length, pos + _INCR_DATA.size)
        if len(data) != length:
            raise JournalError(f"journal {self.path}: staged increment {incr_id} data at "
                               f"offset {pos} is truncated")
        return offset, volume, data

    def committed_increments(self) -> list[tuple[int, int, list[int]]]:
        """Increments whose COMMIT is in the live log and whose base seq is
        at or above the checkpoint: ``[(incr_id, base_seq, [data positions])]``
        in log order, to be applied (again) on restart.

        At the checkpoint too: an increment that carries only resync tracks
        (no write since the checkpoint) has base == checkpoint, and a crash
        while applying it leaves torn tracks that only its redo repairs.
        Redoing one that was applied already is harmless: its pieces are
        the image at its base, and every record after the base is still in
        the live log (none was checkpointed), replayed on top of it."""
        pieces: dict[int, list[int]] = {}
        done = []
        for e in self._live:
            if e.type in (ENTRY_INCR_DATA, ENTRY_INCR_ZERO):
                incr_id = _INCR_DATA.unpack(_pread_exact(self._fd, _INCR_DATA.size,
                                                         e.pos + ENTRY_HEADER_SIZE))[0]
                pieces.setdefault(incr_id, []).append(e.pos + ENTRY_HEADER_SIZE)
            elif e.type == ENTRY_INCR_COMMIT:
                incr_id, base = _INCR_COMMIT.unpack(_pread_exact(
                    self._fd, _INCR_COMMIT.size, e.pos + ENTRY_HEADER_SIZE))
                if base >= self._applied_seq:
                    done.append((incr_id, base, pieces.pop(incr_id, [])))
                else:
                    pieces.pop(incr_id, None)
        return done

    def _forget_uncommitted(self) -> None:
        """Increments without a COMMIT in the live log will never be
        applied: let their entries be freed with the next checkpoint."""
        committed = set()
        for e in self._live:
            if e.type == ENTRY_INCR_COMMIT:
                committed.add(_INCR_COMMIT.unpack(_pread_exact(
                    self._fd, _INCR_COMMIT.size, e.pos + ENTRY_HEADER_SIZE))[0])
        for i, e in enumerate(self._live):
            if e.type in (ENTRY_INCR_DATA, ENTRY_INCR_ZERO):
                incr_id = _INCR_DATA.unpack(_pread_exact(self._fd, _INCR_DATA.size,
                                                         e.pos + ENTRY_HEADER_SIZE))[0]
                if incr_id not in committed:
                    self._live[i] = dataclasses.replace(e, seq_hi=0)

    # -- public API -----------------------------------------------------

    def append(self, records: bytes | bytearray | memoryview) -> list[tuple[Token, JournalPos]]:
        """Append validated records (one or more, records.py encoding) as
        one entry with one write; returns each record's token and position.

        Not durable until :meth:`commit`. Raises JournalFull if the entry
        would overwrite unapplied data (nothing is written then), RecordError
        if *records* does not parse.
        """
        mv = memoryview(records).cast("B")
        found = []
        off = 0
        while off < len(mv):
            tok = unpack_token(mv, off)
            if off + tok.size > len(mv):
                raise RecordError(f"record seq {tok.seq}: data runs past the end of the buffer")
            found.append((tok, off))
            off += tok.size
        if not found:
            raise ValueError("append() needs at least one record")
        if scan_records(mv) is None:
            list(iter_records(mv))  # names the bad record
        e = self._append_entry(ENTRY_RECORDS, mv, max(t.seq for t, _ in found),
                               ENTRY_FLAG_RECORDS_CRC)
        base = e.pos + ENTRY_HEADER_SIZE
        return [(t, JournalPos(base + o, t.size, t.seq, e.lsn)) for t, o in found]

    def append_frame(self, records, seq_hi: int) -> int:
        """:meth:`append` for records already checked (a DATA frame's
        payload, with its highest seq): one entry, no per-record work.
        Returns the file offset of the first record; each record lies at
        that offset plus its offset in *records*.

        The records must have passed ``records.scan_records`` (as
        ``messages.Data`` does): the entry's CRC covers only its header,
        and :meth:`open` would take an entry with a bad record for the
        torn end of the log."""
        mv = memoryview(records).cast("B")
        if not len(mv):
            raise ValueError("append_frame() needs at least one record")
        return self._append_entry(ENTRY_RECORDS, mv, seq_hi,
                                  ENTRY_FLAG_RECORDS_CRC).pos + ENTRY_HEADER_SIZE

    def append_token_frame(self, tokens, seq_hi: int) -> None:
        """:meth:`append_tokens` for a checked TOKENS payload."""
        mv = memoryview(tokens).cast("B")
        if not len(mv):
            raise ValueError("append_token_frame() needs at least one token")
        self._append_entry(ENTRY_TOKENS, mv, seq_hi)

    def append_tokens(self, tokens: bytes | bytearray | memoryview) -> list[Token]:
        """Append a TOKENS payload (48-byte headers, no data) as one entry,
        so announcements survive a restart for the loss report."""
        toks = list(iter_tokens(tokens))
        if not toks:
            raise ValueError("append_tokens() needs at least one token")
        self.append_token_frame(tokens, max(t.seq for t in toks))
        return toks

    def commit(self) -> int:
        """Make every entry appended so far durable with one fdatasync.

        Returns the LSN committed through. Call once per batch of appends
        (group commit), then ack "journaled through".
        """
        lsn = self._next_lsn - 1
        if lsn == self._committed_lsn:
            return lsn
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise JournalError(f"journal {self.path}: fdatasync failed: {e.strerror}") from None
        self._committed_lsn = lsn
        return lsn

    def read_record(self, pos: JournalPos | int, verify: bool = True) -> bytes:
        """The record (header + padded data) at *pos*, read with pread.

        *pos* is a JournalPos or a record's file offset (the pending queue
        keeps offsets); for an offset the header is read first for the size.
        With *verify*, the header's seq and the record CRC are checked, so
        a damaged journal is never applied to the image (JournalError).
        """
        if isinstance(pos, int):
            try:
                head = unpack_token(_pread_exact(self._fd, HEADER_SIZE, pos))
            except (OSError, RecordError) as e:
                raise JournalError(f"journal {self.path}: no record at offset {pos}: "
                                   f"{getattr(e, 'strerror', None) or e}") from None
            pos = JournalPos(pos, head.size, head.seq, 0)
        try:
            raw = _pread_exact(self._fd, pos.size, pos.offset)
        except OSError as e:
            raise JournalError(f"journal {self.path}: read of seq {pos.seq} at offset "
                               f"{pos.offset} failed: {e.strerror}") from None
        if verify:
            try:
                if len(raw) != pos.size:
                    raise RecordError("short read")
                tok = unpack_token(raw)
                if tok.seq != pos.seq or tok.size != pos.size:
                    raise RecordError(f"found record seq {tok.seq} of {tok.size} bytes")
                data = memoryview(raw)[HEADER_SIZE:HEADER_SIZE + tok.data_len]
                if record_crc(raw, data) != tok.crc:
                    raise RecordError("CRC mismatch")
            except RecordError as e:
                raise JournalError(f"journal {self.path}: record seq {pos.seq} at offset "
                                   f"{pos.offset} is damaged: {e}") from None
        return raw

    def checkpoint(self, applied_seq: int, applied_token: Token | None = None) -> int:
        """Record that every seq <= *applied_seq* is in the image, which the
        caller has already fdatasynced; frees the entries that hold only
        applied records. Writes the superblock durably (one fdatasync, which
        also commits pending appends). Returns the bytes freed.

        No record position is needed: since data arrives out of seq order,
        entries are freed by their highest seq, oldest first.
        """
        if applied_seq < self._applied_seq:
            raise ValueError(f"checkpoint({applied_seq}) goes back from {self._applied_seq}")
        if applied_token is not None and applied_token.seq != applied_seq:
            raise ValueError(f"applied_token has seq {applied_token.seq}, not {applied_seq}")
        n = 0
        while n < len(self._live) and self._live[n].seq_hi <= applied_seq:
            n += 1
        before = self.used_bytes
        freed = list(self._live)[:n]
        old = (self._applied_seq, self._applied_token)
        for _ in range(n):
            self._live.popleft()
        self._applied_seq = applied_seq
        if applied_token is not None or applied_seq != old[0]:
            self._applied_token = applied_token
        try:
            # Durable before the freed space can be reused: otherwise a
            # crash would leave the old superblock pointing at overwritten
            # entries.
            self._write_superblock(fsync=True)
        except BaseException:
            self._live.extendleft(reversed(freed))
            self._applied_seq, self._applied_token = old
            raise
        self._committed_lsn = self._next_lsn - 1
        return before - self.used_bytes

    def replay(self) -> Iterator[tuple[Token, JournalPos | None]]:
        """Every record and token in the live log, in log order.

        Yields ``(token, pos)`` for a record and ``(token, None)`` for a
        token-only announcement; feed it to :meth:`PendingQueue.rebuild`
        with ``applied_through=self.applied_seq``. The log was validated by
        :meth:`open` (a torn tail is already cut off).
        """
        for e in list(self._live):
            if e.type in (ENTRY_INCR_DATA, ENTRY_INCR_COMMIT, ENTRY_INCR_ZERO):
                continue  # see committed_increments()
            base = e.pos + ENTRY_HEADER_SIZE
            payload = _pread_exact(self._fd, e.payload_len, base)
            if e.type == ENTRY_TOKENS:
                for tok in iter_tokens(payload):
                    yield tok, None
                continue
            off = 0
            while off < e.payload_len:
                tok = unpack_token(payload, off)
                yield tok, JournalPos(base + off, tok.size, tok.seq, e.lsn)
                off += tok.size

    def backlog(self) -> tuple[int, int, int]:
        """What the live log holds beyond the checkpoint, from its index
        alone (no record payload is read): the highest journaled seq above
        :attr:`applied_seq` (0: none), the committed increments based above
        the checkpoint (not applied yet), and those based at it (perhaps
        applied: the journal cannot tell, so a start redoes them)."""
        hi = max((e.seq_hi for e in self._live if e.type == ENTRY_RECORDS
                  and e.seq_hi > self._applied_seq), default=0)
        bases = [base for _, base, _ in self.committed_increments()]
        return (hi, sum(b > self._applied_seq for b in bases),
                sum(b == self._applied_seq for b in bases))

    # -- state ------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The journal file's descriptor (the C applier reads records back
        through it)."""
        return self._fd

    @property
    def applied_seq(self) -> int:
        """Seq of the last checkpoint: the image holds every seq <= it."""
        return self._applied_seq

    @property
    def applied_token(self) -> Token | None:
        """Token of the last applied record at the last checkpoint, if given."""
        return self._applied_token

    @property
    def area_size(self) -> int:
        """Bytes of the log area (the file minus the superblocks)."""
        return self._area_end - AREA_START

    @property
    def used_bytes(self) -> int:
        """Log bytes held by live entries (and the gaps they wrapped over)."""
        if not self._live:
            return 0
        tail = self._live[0].pos
        if self._head > tail:
            return self._head - tail
        return (self._area_end - tail) + (self._head - AREA_START)

    @property
    def free_bytes(self) -> int:
        """Log bytes not held by live entries (not all contiguous)."""
        return self.area_size - self.used_bytes

    @property
    def entries(self) -> int:
        """Number of live entries."""
        return len(self._live)

    @property
    def next_lsn(self) -> int:
        """LSN the next entry will carry."""
        return self._next_lsn

    @property
    def committed_lsn(self) -> int:
        """Every entry with an LSN <= this is durable."""
        return self._committed_lsn

    def close(self) -> None:
        """Close the file (uncommitted appends may be lost, as in a crash)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Journal {self.path} applied={self._applied_seq} entries={len(self._live)} "
                f"used={self.used_bytes}/{self.area_size}>")


__all__ = ["Journal", "JournalError", "JournalFull", "JournalPos", "entry_size",
           "ENTRY_RECORDS", "ENTRY_TOKENS", "ENTRY_INCR_DATA", "ENTRY_INCR_COMMIT",
           "FORMAT_VERSION"]


def image_behind_journal(path: str | os.PathLike, uuid: bytes | uuidlib.UUID) -> str | None:
    """For the status of a stopped secondary: None when its image alone is
    the replica, else a sentence saying what its journal still holds and
    what replays it (the image and the journal together are the crash
    image, DESIGN §12). Raises JournalError as :meth:`Journal.open`."""
    with Journal.open(path, uuid) as j:
        hi, increments, maybe = j.backlog()
        applied = j.applied_seq
    if not hi and not increments:
        if maybe:
            return (f"its journal holds {maybe} committed catch-up increment(s) at seq "
                    f"{applied} that may be half applied: `duplex up` or `duplex promote` "
                    f"redoes them before the image is used")
        return None
    held = []
    if hi:
        held.append(f"records through seq {hi} (the image has seq {applied})")
    if increments:
        held.append(f"{increments} committed catch-up increment(s)")
    return ("the image alone is behind its journal, which holds " + " and ".join(held)
            + ": `duplex up` or `duplex promote` replays it before the image is used")

"""The replication record: one write, trim, zero or flush, as the C core
lays it out in the send ring, as it travels in TOKENS/DATA frames, and as
the secondary's journal stores it. One encoding everywhere, so records move
from ring to socket to journal without being re-encoded.

Layout (little-endian, 48-byte header, data padded to 8 bytes)::

    u64 seq        global sequence number (never reused)
    u64 ts_ns      CLOCK_REALTIME at sequencing, nanoseconds
    u64 offset     byte offset on the volume
    u32 length     bytes affected
    u32 data_len   bytes of data that follow (== length for WRITE, else 0)
    u32 volume     volume number within the consistency group
    u8  op         OP_WRITE / OP_TRIM / OP_ZERO / OP_FLUSH
    u8  flags      FLAG_FUA
    u16 reserved   zero
    u32 crc        CRC32C of the header (crc field zero) and the data  [byte 40]
    u32 reserved   zero

A *token* is the header alone, sent ahead of its data (M1 of the ordered
replication design, DESIGN §3); a *record* is the header followed by its
data (an M2 field).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from replicator.crc32c import crc32c

try:  # the C core checks a whole buffer of records in one call
    from replicator.native.records import scan_records as _scan
except ImportError:  # pragma: no cover - only before the core is built
    _scan = None

HEADER = struct.Struct("<QQQIIIBBHII")
HEADER_SIZE = HEADER.size  # 48
assert HEADER_SIZE == 48

OP_WRITE = 1
OP_TRIM = 2
OP_ZERO = 3
OP_FLUSH = 4
# A consistency group's point marker (DESIGN §13): volume 0, offset =
# checkpoint number (0: heartbeat), ts = the point T, data (length ==
# data_len, at most MARK_MAX) = the group's JSON note.
OP_MARK = 5
MARK_MAX = 4096
OP_NAMES = {OP_WRITE: "write", OP_TRIM: "trim", OP_ZERO: "zero", OP_FLUSH: "flush",
            OP_MARK: "mark"}
# Ops that touch no range of any volume (their offset/length mean something else).
NO_RANGE_OPS = frozenset({OP_FLUSH, OP_MARK})

FLAG_FUA = 1


class RecordError(ValueError):
    """A record or token failed validation (bad op, length, padding or CRC)."""


def padded(n: int) -> int:
    """Bytes that *n* data bytes occupy once padded to 8."""
    return (n + 7) & ~7


@dataclass(frozen=True, slots=True)
class Token:
    """A record header: everything about a write except its data."""

    seq: int
    ts_ns: int
    offset: int
    length: int
    data_len: int
    volume: int
    op: int
    flags: int
    crc: int

    @property
    def size(self) -> int:
        """Encoded size of the full record (header plus padded data)."""
        return HEADER_SIZE + padded(self.data_len)

    def pack(self) -> bytes:
        return HEADER.pack(self.seq, self.ts_ns, self.offset, self.length,
                           self.data_len, self.volume, self.op, self.flags,
                           0, self.crc, 0)


def unpack_token(buf, pos: int = 0) -> Token:
    """Decode and sanity-check the header at *pos* (no data CRC check)."""
    if len(buf) - pos < HEADER_SIZE:
        raise RecordError(f"truncated record header at byte {pos}")
    seq, ts, off, length, dlen, vol, op, flags, rsv1, crc, rsv = HEADER.unpack_from(buf, pos)
    if op not in OP_NAMES:
        raise RecordError(f"record seq {seq}: unknown op {op}")
    if rsv or rsv1:
        raise RecordError(f"record seq {seq}: reserved field is not zero")
    if op in (OP_WRITE, OP_MARK):
        if dlen != length:
            raise RecordError(f"record seq {seq}: {OP_NAMES[op]} of {length} bytes carries "
                              f"{dlen} data bytes")
    elif dlen != 0:
        raise RecordError(f"record seq {seq}: {OP_NAMES[op]} must carry no data")
    if op == OP_MARK and (vol != 0 or dlen > MARK_MAX):
        raise RecordError(f"record seq {seq}: a mark must name volume 0 and carry at most "
                          f"{MARK_MAX} bytes")
    return Token(seq, ts, off, length, dlen, vol, op, flags, crc)


def record_crc(header: bytes | memoryview, data: bytes | memoryview) -> int:
    """CRC32C over *header* with its crc field zeroed, then *data*."""
    h = bytearray(header[:HEADER_SIZE])
    h[40:44] = b"\0\0\0\0"
    return crc32c(data, crc32c(h))


def encode_record(seq: int, ts_ns: int, offset: int, length: int, op: int,
                  data: bytes = b"", volume: int = 0, flags: int = 0) -> bytes:
    """Build one record (header, data, zero padding) with its CRC."""
    hdr = HEADER.pack(seq, ts_ns, offset, length, len(data), volume, op, flags, 0, 0, 0)
    crc = record_crc(hdr, data)
    hdr = HEADER.pack(seq, ts_ns, offset, length, len(data), volume, op, flags, 0, crc, 0)
    return hdr + bytes(data) + b"\0" * (padded(len(data)) - len(data))


def scan_records(buf, tokens_only: bool = False) -> tuple[int, int] | None:
    """(count, highest seq) of the records packed in *buf*, every one
    checked in one C call (structure and CRC; *tokens_only*: 48-byte
    headers, structure only); None when one is bad or the core is not
    built (iter_records / iter_tokens then find and word the problem)."""
    return _scan(buf, tokens_only) if _scan is not None else None


def iter_records(buf, check_crc: bool = True):
    """Yield (token, data memoryview) for each record in a packed buffer.

    Raises RecordError naming the first bad record; nothing is yielded past it.
    """
    mv = memoryview(buf)
    if check_crc and scan_records(mv) is not None:
        check_crc = False  # all checked in one C call; else find the bad one below
    pos = 0
    while pos < len(mv):
        tok = unpack_token(mv, pos)
        end = pos + tok.size
        if end > len(mv):
            raise RecordError(f"record seq {tok.seq}: data runs past the end of the buffer")
        data = mv[pos + HEADER_SIZE: pos + HEADER_SIZE + tok.data_len]
        if check_crc and record_crc(mv[pos:pos + HEADER_SIZE], data) != tok.crc:
            raise RecordError(f"record seq {tok.seq}: CRC mismatch")
        if check_crc and any(mv[pos + HEADER_SIZE + tok.data_len:end]):
            raise RecordError(f"record seq {tok.seq}: padding after the data is not zero")
        yield tok, data
        pos = end


def iter_tokens(buf):
    """Yield each Token of a packed TOKENS payload (headers only)."""
    if len(buf) % HEADER_SIZE:
        raise RecordError(f"token list of {len(buf)} bytes is not a multiple of {HEADER_SIZE}")
    for pos in range(0, len(buf), HEADER_SIZE):
        yield unpack_token(buf, pos)

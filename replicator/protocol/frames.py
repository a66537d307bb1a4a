"""The frame codec: how Duplex messages are delimited and checked on the wire.

Every frame is a 16-byte header followed by its payload (little-endian, as
the record format)::

    0   4s  magic    b"DPX1"
    4   u8  version  1
    5   u8  type     FrameType
    6   u16 flags    frame flags (FLAG_RECORDS_CRC, FLAG_COMPRESSED; unknown bits are refused)
    8   u32 length   payload bytes that follow
    12  u32 crc      CRC32C over the header with this field zero, then the payload
                     (only the header with FLAG_RECORDS_CRC)

FLAG_RECORDS_CRC is for DATA frames, and every DATA frame has it: their
payload is records that each carry a CRC32C of their own, and the receiver
checks all of them before it uses any (``messages.Data``), so a second CRC
pass over the megabytes of a DATA frame, on each side, would only repeat
that check. The receiver also refuses non-zero padding, so that every
payload byte is covered by a record CRC or checked.

FLAG_COMPRESSED is for DATA and INCR_DATA frames (``compression.py``): the
payload is a prefix and the compressed bytes, ``length`` counts those, and
the CRC covers the header and the payload once decompressed (for DATA,
with FLAG_RECORDS_CRC, still the header only): what is checked is what is
used. The decoder decompresses, bounded by the type's limit, before the
CRC check; a frame that does not decompress to its declared size is a
FrameError.

The decoder is sans-IO: feed it byte chunks of any size (``feed``), pull whole
frames (``next_frame``). It checks magic, version, type, flags and length as
soon as the 16 header bytes are in, *before* it allocates anything for the
payload, so a hostile length costs nothing. Only the bulk types (TOKENS,
DATA, INCR_DATA) may be as large as ``max_frame``; every other type is
limited to ``max_control`` (64 KiB), which is what an unauthenticated peer
can make us allocate at most.

Zero copy: the encoder takes the payload as a list of buffers and returns
only the header, so a sender can ``sendmsg([header, *spans])`` straight from
the C send ring. The decoder hands out payloads as read-only memoryviews: a
slice of the received chunk when the whole payload arrived in it (no copy),
else one buffer the size of the payload filled as chunks arrive (one copy).
"""
from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

from replicator.crc32c import crc32c
from replicator.protocol.compression import decompress
from replicator.protocol.errors import FrameError, LocalProtocolError

MAGIC = b"DPX1"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 16
CRC_OFFSET = 12

DEFAULT_MAX_FRAME = 64 << 20     # bulk payloads (TOKENS, DATA, INCR_DATA)
MAX_CONTROL_PAYLOAD = 64 << 10   # every other type
MAX_LENGTH_FIELD = 0xFFFFFFFF
FLAG_RECORDS_CRC = 0x0001        # the CRC covers the header; the records check themselves
FLAG_COMPRESSED = 0x0002         # DATA / INCR_DATA payload compressed (protocol/compression.py)
KNOWN_FLAGS = FLAG_RECORDS_CRC | FLAG_COMPRESSED


class FrameType(IntEnum):
    """Frame types. The high nibble groups them; gaps leave room for more."""

    # 0x0_: handshake
    HELLO = 0x01
    AUTH = 0x02
    STATE = 0x03
    # 0x1_: the replication stream, primary -> secondary
    TOKENS = 0x10
    DATA = 0x11
    FLUSH = 0x12
    # 0x2_: catch-up increments, primary -> secondary
    INCR_BEGIN = 0x20
    INCR_DATA = 0x21
    INCR_COMMIT = 0x22
    INCR_ZERO = 0x23   # an all-zero track of the increment: no data on the wire
    # 0x3_: feedback and liveness
    ACK = 0x30
    PING = 0x31
    PONG = 0x32
    BITMAP = 0x33  # secondary -> primary: its own out-of-sync tracks
    RECEIVED = 0x34  # secondary -> primary: received through seq N (protocol B)
    # 0x4_: online verify
    VERIFY_REQ = 0x40   # primary -> secondary: checksums of these tracks, please
    VERIFY_SUMS = 0x41  # secondary -> primary: the checksums
    # 0x5_: a consistency group's control channel (protocol/group.py)
    GROUP = 0x50
    # 0x7_: connection control
    STOP = 0x70   # a clean stop: "nothing follows seq N"; the secondary echoes it
    ERROR = 0x7F


BULK_TYPES = frozenset({FrameType.TOKENS, FrameType.DATA, FrameType.INCR_DATA,
                        FrameType.BITMAP, FrameType.VERIFY_SUMS})
COMPRESSIBLE_TYPES = frozenset({FrameType.DATA, FrameType.INCR_DATA})  # FLAG_COMPRESSED
_TYPES_BY_VALUE = {int(t): t for t in FrameType}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is a read-only memoryview (see module doc)."""

    type: FrameType
    flags: int
    payload: memoryview


def frame_type(value: int) -> FrameType:
    """The FrameType for *value*; FrameError naming it if it is not one."""
    try:
        return _TYPES_BY_VALUE[int(value)]
    except KeyError:
        raise FrameError(f"unknown frame type 0x{int(value):02x}") from None


def payload_limit(ftype: FrameType, max_frame: int = DEFAULT_MAX_FRAME,
                  max_control: int = MAX_CONTROL_PAYLOAD) -> int:
    """Largest payload a frame of *ftype* may carry under these limits."""
    return max_frame if ftype in BULK_TYPES else min(max_control, max_frame)


def as_byte_views(parts) -> list[memoryview]:
    """*parts* (one buffer, or an iterable of buffers) as flat byte memoryviews, uncopied."""
    # A single bytes-like is one part, not an iterable of ints.
    if isinstance(parts, (bytes, bytearray, memoryview)):
        parts = (parts,)
    views = []
    for p in parts:
        v = p if isinstance(p, memoryview) else memoryview(p)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        views.append(v)
    return views


def frame_flags(ftype: FrameType) -> int:
    """The flags every frame of *ftype* is sent with (FLAG_RECORDS_CRC on DATA)."""
    return FLAG_RECORDS_CRC if ftype == FrameType.DATA else 0


def _check_flags(ftype: FrameType, flags: int) -> str | None:
    """Why *flags* are not valid on a frame of *ftype*, or None."""
    if flags & ~KNOWN_FLAGS:
        return f"{ftype.name} frame has unknown flags 0x{flags:04x}"
    if flags & FLAG_RECORDS_CRC and ftype != FrameType.DATA:
        return f"{ftype.name} frame has flag RECORDS_CRC, which only DATA frames may carry"
    if flags & FLAG_COMPRESSED and ftype not in COMPRESSIBLE_TYPES:
        return (f"{ftype.name} frame has flag COMPRESSED, which only DATA and INCR_DATA frames "
                f"may carry")
    return None


def encode_header(ftype: int, parts: Iterable = (), flags: int = 0) -> bytes:
    """The 16-byte header for a frame whose payload is the concatenation of *parts*.

    *parts* is a list of buffers (bytes, memoryview, cffi buffer...) or one
    buffer; the CRC runs over each part in turn, nothing is concatenated, so
    the caller can send ``[header, *parts]`` with one sendmsg. With
    FLAG_RECORDS_CRC in *flags* the CRC covers the header alone.
    """
    try:
        ftype = frame_type(ftype)
    except FrameError as e:
        raise LocalProtocolError(f"cannot encode: {e}") from None
    if not 0 <= flags <= 0xFFFF:
        raise LocalProtocolError(f"cannot encode {ftype.name}: flags {flags} do not fit in u16")
    bad = _check_flags(ftype, flags)
    if bad is not None:
        raise LocalProtocolError(f"cannot encode: {bad}")
    views = as_byte_views(parts)
    length = sum(v.nbytes for v in views)
    if length > MAX_LENGTH_FIELD:
        raise LocalProtocolError(f"cannot encode {ftype.name}: payload of {length} bytes "
                                 f"does not fit the u32 length field")
    head = HEADER.pack(MAGIC, VERSION, ftype, flags, length, 0)
    crc = crc32c(head)
    for v in views if not flags & FLAG_RECORDS_CRC else ():
        crc = crc32c(v, crc)
    return head[:CRC_OFFSET] + struct.pack("<I", crc)


def encode_compressed(ftype: int, parts, compressor, flags: int = 0) -> list | None:
    """``[header, payload]`` of a frame of *ftype* (DATA or INCR_DATA)
    whose payload, the concatenation of *parts*, goes compressed by
    *compressor* (a compression.Compressor), with FLAG_COMPRESSED; the CRC
    covers the header and the uncompressed payload (DATA: the header
    only). None when the payload does not shrink: send it as it is."""
    ftype = frame_type(ftype)
    if ftype not in COMPRESSIBLE_TYPES:
        raise LocalProtocolError(f"cannot compress a {ftype.name} frame")
    views = as_byte_views(parts)
    raw = views[0] if len(views) == 1 else b"".join(views)
    body = compressor.compress(raw)
    if body is None:
        return None
    flags |= FLAG_COMPRESSED
    if len(body) > MAX_LENGTH_FIELD:
        raise LocalProtocolError(f"cannot encode {ftype.name}: {len(body)} bytes")
    head = HEADER.pack(MAGIC, VERSION, ftype, flags, len(body), 0)
    crc = crc32c(head)
    if not flags & FLAG_RECORDS_CRC:
        crc = crc32c(raw, crc)
    return [head[:CRC_OFFSET] + struct.pack("<I", crc), body]


def encode_frame(ftype: int, payload=b"", flags: int = 0) -> bytes:
    """A whole frame as one bytes object (header + payload parts joined)."""
    views = as_byte_views(payload)
    return encode_header(ftype, views, flags) + b"".join(views)


HeaderHook = Callable[[FrameType, int, int], None]
Allocate = Callable[[int], object]  # n -> a writable buffer of n bytes


class FrameDecoder:
    """Turns a byte stream, fed in arbitrary chunks, into checked Frames.

    ``feed(data)`` only stores a reference to *data* (``bytes`` are kept
    as they are; other buffers are copied once, since callers reuse them);
    ``feed(b"")`` signals EOF. ``next_frame()`` returns the next whole
    Frame, or None when more bytes are needed, and raises FrameError on the
    first bad frame; frames before it are returned first. Errors are sticky:
    once raised, every later call raises the same error.

    *on_header(type, flags, length)* is called once per frame when its header
    has passed the codec's checks and before any payload is buffered; it may
    raise (the Connection rejects out-of-state frames there).

    *allocate(n)* gives the buffer a payload is assembled in (``bytearray``
    by default). A receiver of large frames may pass one that does not zero
    the memory first: every byte is written before the frame is returned.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME,
                 max_control: int = MAX_CONTROL_PAYLOAD,
                 on_header: HeaderHook | None = None,
                 allocate: Allocate = bytearray) -> None:
        if max_frame <= 0 or max_control <= 0:
            raise ValueError(f"frame limits must be positive (max_frame={max_frame}, "
                             f"max_control={max_control})")
        self.max_frame = max_frame
        self.max_control = max_control
        self.on_header = on_header
        self._allocate = allocate
        self._chunks: deque[memoryview] = deque()  # unparsed input, by reference
        self._pending = 0                          # bytes in _chunks
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_fill = 0
        self._head: tuple[FrameType, int, int, int] | None = None  # type, flags, length, crc
        self._payload: memoryview | None = None
        self._assembling = False  # _payload is our own buffer being filled
        self._pay_fill = 0
        self._eof = False
        self._error: Exception | None = None

    # -- input ------------------------------------------------------------

    def feed(self, data) -> None:
        """Add received bytes; ``b""`` means the peer closed its side."""
        if self._eof:
            raise LocalProtocolError("bytes fed to the frame decoder after EOF")
        if len(data) == 0:
            self._eof = True
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may overwrite its buffer on the next recv
        self._chunks.append(memoryview(data))
        self._pending += len(data)

    def payload_space(self) -> memoryview | None:
        """Where the next received bytes may go straight away: the rest of a
        large payload being assembled, when no other received bytes wait.
        A reader can ``recv_into`` it and call :meth:`received_into`,
        saving the copy from a chunk into the payload. None otherwise."""
        if (self._error is None and not self._eof and self._head is not None
                and not self._chunks and self._assembling
                and self._pay_fill < len(self._payload)):
            return self._payload[self._pay_fill:]
        return None

    def received_into(self, n: int) -> None:
        """*n* bytes were written into the view :meth:`payload_space` gave
        (0: the peer closed)."""
        if n == 0:
            self.feed(b"")
            return
        if self.payload_space() is None or not 0 < n <= len(self._payload) - self._pay_fill:
            raise LocalProtocolError(f"received_into({n}) without that much payload space")
        self._pay_fill += n

    @property
    def at_eof(self) -> bool:
        """True once EOF was fed and every complete frame has been taken."""
        return self._eof and self._pending == 0 and self._hdr_fill == 0

    @property
    def allocated(self) -> int:
        """Bytes the decoder itself allocated to assemble frames (header + payload buffer)."""
        return HEADER_SIZE + (len(self._payload) if self._assembling else 0)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in a Frame."""
        return self._pending + self._hdr_fill + self._pay_fill

    # -- output -----------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """The next complete Frame, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_frame()
        except Exception as e:
            # Sticky, and drop what we hold: this stream is dead.
            self._error = e
            self._chunks.clear()
            self._pending = 0
            self._payload = None
            self._assembling = False
            raise

    def _take(self, dest: memoryview) -> int:
        """Copy up to len(dest) bytes from the input chunks into dest."""
        n = 0
        while n < len(dest) and self._chunks:
            chunk = self._chunks[0]
            k = min(len(chunk), len(dest) - n)
            dest[n:n + k] = chunk[:k]
            n += k
            if k == len(chunk):
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[k:]
        self._pending -= n
        return n

    def _next_frame(self) -> Frame | None:
        if self._head is None:
            self._hdr_fill += self._take(memoryview(self._hdr)[self._hdr_fill:])
            if self._hdr_fill < HEADER_SIZE:
                if self._eof and self._hdr_fill:
                    raise FrameError(f"connection closed inside a frame header "
                                     f"({self._hdr_fill} of {HEADER_SIZE} bytes)")
                return None
            self._head = self._check_header()
            ftype, flags, length, _ = self._head
            if self.on_header is not None:
                self.on_header(ftype, flags, length)
            self._start_payload(length)

        ftype, flags, length, crc = self._head
        if self._assembling and self._pay_fill < length:
            self._pay_fill += self._take(self._payload[self._pay_fill:])
        if self._pay_fill < length:
            if self._eof and self._pending == 0:
                raise FrameError(f"connection closed inside a {ftype.name} frame "
                                 f"({self._pay_fill} of {length} payload bytes)")
            return None

        payload = self._payload.toreadonly()
        head = bytes(self._hdr[:CRC_OFFSET]) + b"\0\0\0\0"
        if flags & FLAG_COMPRESSED:
            # Bounded by the type's limit (a bomb is refused); the CRC is
            # then checked over what was decompressed.
            payload = memoryview(decompress(ftype.name, payload, payload_limit(
                ftype, self.max_frame, self.max_control))).toreadonly()
        actual = crc32c(head) if flags & FLAG_RECORDS_CRC else crc32c(payload, crc32c(head))
        self._head = None
        self._hdr_fill = 0
        self._payload = None
        self._assembling = False
        self._pay_fill = 0
        if actual != crc:
            raise FrameError(f"{ftype.name} frame of {length} bytes: CRC mismatch "
                             f"(header says 0x{crc:08x}, computed 0x{actual:08x})")
        return Frame(ftype, flags, payload)

    def _check_header(self) -> tuple[FrameType, int, int, int]:
        magic, version, ftype, flags, length, crc = HEADER.unpack(self._hdr)
        if magic != MAGIC:
            raise FrameError(f"bad frame magic {bytes(magic)!r}, expected {MAGIC!r} "
                             f"(not a Duplex peer, or the stream lost sync)")
        if version != VERSION:
            raise FrameError(f"unsupported frame version {version} (this node speaks {VERSION})")
        ftype = frame_type(ftype)
        bad = _check_flags(ftype, flags)
        if bad is not None:
            raise FrameError(bad)
        limit = payload_limit(ftype, self.max_frame, self.max_control)
        if length > limit:
            raise FrameError(f"{ftype.name} frame announces {length} payload bytes, "
                             f"above the maximum of {limit}")
        return ftype, flags, length, crc

    def _start_payload(self, length: int) -> None:
        """Pick where the payload will live: the input chunk itself, or one new buffer."""
        self._pay_fill = 0
        self._assembling = False
        if length == 0:
            self._payload = memoryview(b"")
            return
        if self._chunks and len(self._chunks[0]) >= length:
            # Whole payload already here, inside an immutable bytes chunk: slice it.
            chunk = self._chunks[0]
            self._payload = chunk[:length]
            self._pay_fill = length
            if len(chunk) == length:
                self._chunks.popleft()
            else:
                self._chunks[0] = chunk[length:]
            self._pending -= length
            return
        buf = memoryview(self._allocate(length))
        if buf.format != "B" or buf.ndim != 1 or buf.readonly or buf.nbytes != length:
            raise LocalProtocolError(f"the payload allocator gave {buf.nbytes} bytes of "
                                     f"format {buf.format!r} for a {length}-byte payload")
        self._payload = buf
        self._assembling = True

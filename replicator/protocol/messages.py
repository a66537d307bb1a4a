"""The messages of the Duplex protocol: one small immutable class per frame type.

Each class has ``TYPE`` (its FrameType), ``encode() -> bytes`` (the frame
payload), ``encode_parts()`` (the payload as a list of buffers, for zero-copy
sends) and ``decode(payload)`` (a classmethod). Construction validates every
field, so a message that exists is a valid one, whether it was built locally
or decoded from the wire; problems raise ProtocolError naming the message
and the field ("STATE: field disk has unknown value 9").

Payload layouts (little-endian; ``x`` = reserved, must be zero):

=========== ==============================================================
HELLO       u16 proto_version, u8 role, u8 x, 32s nonce, u8 len(resource),
            u8 len(node), resource UTF-8, node UTF-8
AUTH        32s mac
STATE       16s resource_uuid, 16s generation, u64 device_size,
            u32 track_size, u8 role, u8 disk, u8 n_history, u8 x,
            u64 written_seq, u64 oldest_held_seq, u64 journaled_seq,
            u64 applied_seq, u32 flags, u32 x, n_history * 16s history
TOKENS      packed 48-byte record headers (replicator.records)
DATA        packed records (replicator.records)
FLUSH       u64 seq
INCR_BEGIN  u64 incr_id, u64 base_seq, u64 tracks, u64 nbytes
INCR_DATA   u64 incr_id, u64 offset, u32 volume, u32 x, data
INCR_COMMIT u64 incr_id, u64 end_seq
ACK         u64 journaled_seq, u64 applied_seq [, u8 disk, u8 x, u16 len(reason),
            reason UTF-8]   (the bracketed part: the secondary's disk state,
            sent by a secondary whose disk is not as its STATE said, e.g.
            Failed while applying; absent = no news)
RECEIVED    u64 received_seq   (protocol B: received, not yet journaled)
PING        u64 nonce, u64 send_ts_ns
PONG        u64 nonce, u64 ping_ts_ns, u64 peer_ts_ns
STOP        u64 last_seq, u64 ts_ns (a planned switchover: the primary
            stopped cleanly after seq *last_seq*; the secondary echoes it
            once it has applied and recorded that, then closes)
ERROR       u16 code, message UTF-8
GROUP       a group channel's JSON message (protocol/group.py)
=========== ==============================================================
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from replicator import records as _records
from replicator.records import scan_records as _scan_records
from replicator.protocol.errors import ProtocolError
from replicator.protocol.frames import FrameType

PROTOCOL_VERSION = 1

PRIMARY = "primary"
SECONDARY = "secondary"
ROLE_CODES = {PRIMARY: 1, SECONDARY: 2}
ROLES_BY_CODE = {v: k for k, v in ROLE_CODES.items()}

# Failed: the node cannot write its image (an apply error such as ENOSPC
# or EIO); it keeps journaling and retries (DRBD's Failed/Diskless).
DISK_STATES = ("UpToDate", "Consistent", "Inconsistent", "Outdated", "Failed")
DISK_CODES = {name: i + 1 for i, name in enumerate(DISK_STATES)}
DISKS_BY_CODE = {v: k for k, v in DISK_CODES.items()}

NONCE_SIZE = 32
MAC_SIZE = 32
UUID_SIZE = 16
ZERO_UUID = bytes(UUID_SIZE)
MAX_NAME_BYTES = 255
MAX_ERROR_MESSAGE = 4096
MAX_HISTORY = 8
MAX_VOLUMES = 64
LEGACY_VOLUME = "default"  # the one volume of a STATE without a list (config.DEFAULT_VOLUME)
MAX_VERIFY_TRACKS = 4096

# STATE flags
STATE_NEEDS_RESYNC = 1 << 0   # this node knows its data differs from the peer's (bitmap set)
STATE_HAS_BITMAP_UUID = 1 << 1  # history[0] is the generation the sender's bitmap is relative to
STATE_DISCARD_MY_DATA = 1 << 2  # the sender (a secondary) gives up its own changes: sync from the peer
STATE_SENDS_BITMAP = 1 << 3   # the sender follows with a BITMAP of tracks the peer must resend
STATE_KNOWN_FLAGS = (STATE_NEEDS_RESYNC | STATE_HAS_BITMAP_UUID | STATE_DISCARD_MY_DATA
                     | STATE_SENDS_BITMAP)

_U16 = (1 << 16) - 1
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


# -- field checks ----------------------------------------------------------

def _fail(msg: str, fieldname: str, problem: str) -> ProtocolError:
    return ProtocolError(f"{msg}: field {fieldname} {problem}")


def _uint(msg: str, fieldname: str, value, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(msg, fieldname, f"must be an integer, not {type(value).__name__}")
    if not 0 <= value <= limit:
        raise _fail(msg, fieldname, f"value {value} is out of range 0..{limit}")
    return value


def _fixed_bytes(msg: str, fieldname: str, value, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise _fail(msg, fieldname, f"must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != size:
        raise _fail(msg, fieldname, f"is {len(value)} bytes, expected {size}")
    return value


def _name(msg: str, fieldname: str, value, limit: int = MAX_NAME_BYTES,
          allow_empty: bool = False, printable: bool = True) -> str:
    if not isinstance(value, str):
        raise _fail(msg, fieldname, f"must be a str, not {type(value).__name__}")
    raw = value.encode("utf-8", "surrogatepass")
    if not raw and not allow_empty:
        raise _fail(msg, fieldname, "is empty")
    if len(raw) > limit:
        raise _fail(msg, fieldname, f"is {len(raw)} bytes of UTF-8, above the limit of {limit}")
    if printable and not value.isprintable():
        raise _fail(msg, fieldname, f"{value!r} contains control or unprintable characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(msg, fieldname, f"{value!r} is not encodable as UTF-8") from None
    return value


def _utf8(msg: str, fieldname: str, raw) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(msg, fieldname, f"is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _role(msg: str, value) -> str:
    if value not in ROLE_CODES:
        raise _fail(msg, "role", f"is {value!r}, expected 'primary' or 'secondary'")
    return value


def _exact(msg: str, payload, size: int) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{msg}: payload is {len(payload)} bytes, expected {size}")


def _at_least(msg: str, payload, size: int) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{msg}: payload is {len(payload)} bytes, shorter than "
                            f"its {size}-byte fixed part")


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # normalising fields of a frozen dataclass


class Message:
    """Base of all messages: the frame type and the zero-copy encoding hook."""

    TYPE: ClassVar[FrameType]
    __slots__ = ()

    def encode(self) -> bytes:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def encode_parts(self) -> list:
        """The payload as a list of buffers (bulk messages avoid joining them)."""
        return [self.encode()]


# -- handshake ---------------------------------------------------------------

_HELLO = struct.Struct("<HBB32sBB")


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame of each side: who it is, what it serves, and its auth challenge."""

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    proto_version: int
    resource: str
    node: str
    role: str
    nonce: bytes

    def __post_init__(self) -> None:
        _uint("HELLO", "proto_version", self.proto_version, _U16)
        _name("HELLO", "resource", self.resource)
        _name("HELLO", "node", self.node)
        _role("HELLO", self.role)
        _set(self, "nonce", _fixed_bytes("HELLO", "nonce", self.nonce, NONCE_SIZE))

    def encode(self) -> bytes:
        r = self.resource.encode()
        n = self.node.encode()
        return _HELLO.pack(self.proto_version, ROLE_CODES[self.role], 0, self.nonce,
                           len(r), len(n)) + r + n

    @classmethod
    def decode(cls, payload) -> Hello:
        _at_least("HELLO", payload, _HELLO.size)
        version, role, rsv, nonce, rlen, nlen = _HELLO.unpack_from(payload)
        if rsv:
            raise _fail("HELLO", "reserved", f"is {rsv}, must be zero")
        if role not in ROLES_BY_CODE:
            raise _fail("HELLO", "role", f"has unknown value {role}")
        _exact("HELLO", payload, _HELLO.size + rlen + nlen)
        pos = _HELLO.size
        resource = _utf8("HELLO", "resource", payload[pos:pos + rlen])
        node = _utf8("HELLO", "node", payload[pos + rlen:pos + rlen + nlen])
        return cls(version, resource, node, ROLES_BY_CODE[role], nonce)


@dataclass(frozen=True, slots=True)
class Auth(Message):
    """The answer to the peer's challenge: an HMAC-SHA256 (see auth.py)."""

    TYPE: ClassVar[FrameType] = FrameType.AUTH
    mac: bytes

    def __post_init__(self) -> None:
        _set(self, "mac", _fixed_bytes("AUTH", "mac", self.mac, MAC_SIZE))

    def encode(self) -> bytes:
        return self.mac

    @classmethod
    def decode(cls, payload) -> Auth:
        _exact("AUTH", payload, MAC_SIZE)
        return cls(bytes(payload))


_STATE = struct.Struct("<16s16sQIBBBBQQQQII")
_VOLS = struct.Struct("<H")     # the volume list's count
_VOL = struct.Struct("<QB")     # each volume: size, name length; then the name (UTF-8)


@dataclass(frozen=True, slots=True)
class State(Message):
    """Each side's identity and progress, exchanged once after authentication.

    ``written_seq`` and ``oldest_held_seq`` are the primary's (last seq
    assigned; oldest seq its ring can still resend, 0 = none); the
    secondary's are ``journaled_seq`` and ``applied_seq``. A side fills the
    fields that are not its own with what it knows, or 0. ``history`` carries
    older generation UUIDs (newest first) for the generation handshake; this
    module only carries and bounds them. A resource UUID of all zeros means
    "fresh, not yet initialised" (see compat.check_peer_state).

    ``volumes``: the resource's volumes as (name, size) pairs in config
    order (DESIGN §8). Empty means one volume named ``LEGACY_VOLUME`` of
    ``device_size`` bytes: a single-volume resource sends no list, so its
    STATE is byte for byte what nodes from before volumes send and accept.
    On the wire the list follows the history: u16 count, then per volume
    u64 size, u8 name length, the name in UTF-8.
    """

    TYPE: ClassVar[FrameType] = FrameType.STATE
    resource_uuid: bytes
    generation: bytes
    device_size: int
    track_size: int
    role: str
    disk: str
    written_seq: int = 0
    oldest_held_seq: int = 0
    journaled_seq: int = 0
    applied_seq: int = 0
    flags: int = 0
    history: tuple[bytes, ...] = ()
    volumes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        _set(self, "resource_uuid", _fixed_bytes("STATE", "resource_uuid", self.resource_uuid, UUID_SIZE))
        _set(self, "generation", _fixed_bytes("STATE", "generation", self.generation, UUID_SIZE))
        _uint("STATE", "device_size", self.device_size, _U64)
        _uint("STATE", "track_size", self.track_size, _U32)
        if self.track_size < 512 or self.track_size & (self.track_size - 1):
            raise _fail("STATE", "track_size", f"{self.track_size} is not a power of two >= 512")
        _role("STATE", self.role)
        if self.disk not in DISK_CODES:
            raise _fail("STATE", "disk", f"is {self.disk!r}, expected one of {', '.join(DISK_STATES)}")
        for f in ("written_seq", "oldest_held_seq", "journaled_seq", "applied_seq"):
            _uint("STATE", f, getattr(self, f), _U64)
        _uint("STATE", "flags", self.flags, _U32)
        if self.flags & ~STATE_KNOWN_FLAGS:
            raise _fail("STATE", "flags", f"has unknown bits 0x{self.flags & ~STATE_KNOWN_FLAGS:08x}")
        hist = tuple(self.history)
        if len(hist) > MAX_HISTORY:
            raise _fail("STATE", "history", f"has {len(hist)} UUIDs, at most {MAX_HISTORY} allowed")
        _set(self, "history", tuple(_fixed_bytes("STATE", f"history[{i}]", u, UUID_SIZE)
                                    for i, u in enumerate(hist)))
        vols = tuple(self.volumes)
        if len(vols) > MAX_VOLUMES:
            raise _fail("STATE", "volumes", f"has {len(vols)} volumes, at most {MAX_VOLUMES} allowed")
        seen: set[str] = set()
        out = []
        for i, v in enumerate(vols):
            if not isinstance(v, tuple) or len(v) != 2:
                raise _fail("STATE", f"volumes[{i}]", "must be a (name, size) pair")
            name = _name("STATE", f"volumes[{i}].name", v[0], limit=255)
            size = _uint("STATE", f"volumes[{i}].size", v[1], _U64)
            if size == 0:
                raise _fail("STATE", f"volumes[{i}].size", f"of volume {name!r} is 0")
            if name in seen:
                raise _fail("STATE", "volumes", f"names volume {name!r} twice")
            seen.add(name)
            out.append((name, size))
        _set(self, "volumes", tuple(out))

    @property
    def fresh(self) -> bool:
        """True when this side has no resource UUID yet (never initialised)."""
        return self.resource_uuid == ZERO_UUID

    @property
    def volume_list(self) -> tuple[tuple[str, int], ...]:
        """The volumes, the legacy form spelled out: one ``LEGACY_VOLUME``
        of ``device_size`` bytes when no list was sent."""
        return self.volumes or ((LEGACY_VOLUME, self.device_size),)

    def encode(self) -> bytes:
        out = _STATE.pack(self.resource_uuid, self.generation, self.device_size,
                          self.track_size, ROLE_CODES[self.role], DISK_CODES[self.disk],
                          len(self.history), 0, self.written_seq, self.oldest_held_seq,
                          self.journaled_seq, self.applied_seq, self.flags, 0) + b"".join(self.history)
        if self.volumes:
            parts = [out, _VOLS.pack(len(self.volumes))]
            for name, size in self.volumes:
                raw = name.encode("utf-8")
                parts += [_VOL.pack(size, len(raw)), raw]
            out = b"".join(parts)
        return out

    @classmethod
    def decode(cls, payload) -> State:
        _at_least("STATE", payload, _STATE.size)
        (ruuid, gen, size, track, role, disk, nhist, rsv1, written, oldest, journaled,
         applied, flags, rsv2) = _STATE.unpack_from(payload)
        if rsv1 or rsv2:
            raise _fail("STATE", "reserved", "is not zero")
        if role not in ROLES_BY_CODE:
            raise _fail("STATE", "role", f"has unknown value {role}")
        if disk not in DISKS_BY_CODE:
            raise _fail("STATE", "disk", f"has unknown value {disk}")
        if nhist > MAX_HISTORY:
            raise _fail("STATE", "history", f"count {nhist} is above {MAX_HISTORY}")
        end = _STATE.size + UUID_SIZE * nhist
        if len(payload) < end:
            _exact("STATE", payload, end)
        hist = tuple(bytes(payload[_STATE.size + i * UUID_SIZE:_STATE.size + (i + 1) * UUID_SIZE])
                     for i in range(nhist))
        vols = _decode_volumes(payload, end) if len(payload) > end else ()
        return cls(ruuid, gen, size, track, ROLES_BY_CODE[role], DISKS_BY_CODE[disk],
                   written, oldest, journaled, applied, flags, hist, vols)


def _decode_volumes(payload, at: int) -> tuple[tuple[str, int], ...]:
    """STATE's volume list from offset *at* to the end of *payload*."""
    if len(payload) < at + _VOLS.size:
        raise ProtocolError(f"STATE: payload is {len(payload)} bytes: {len(payload) - at} "
                            f"byte(s) after the history, too short for a volume list")
    (n,) = _VOLS.unpack_from(payload, at)
    if n == 0 or n > MAX_VOLUMES:
        raise _fail("STATE", "volumes", f"count {n} is not 1..{MAX_VOLUMES}")
    at += _VOLS.size
    out = []
    for i in range(n):
        if len(payload) < at + _VOL.size:
            raise ProtocolError(f"STATE: payload ends inside volume {i} of {n}")
        size, ln = _VOL.unpack_from(payload, at)
        at += _VOL.size
        if len(payload) < at + ln:
            raise ProtocolError(f"STATE: payload ends inside the name of volume {i} of {n}")
        out.append((_utf8("STATE", f"volumes[{i}].name", payload[at:at + ln]), size))
        at += ln
    _exact("STATE", payload, at)
    return tuple(out)


# -- the replication stream -------------------------------------------------

@dataclass(frozen=True, slots=True)
class Tokens(Message):
    """Tokens (M1): record headers sent ahead of their data (DESIGN §3).

    ``payload`` is the raw packed headers (kept as received, so the
    secondary can journal them as they are), checked in one C call at
    construction; ``count`` and ``max_seq`` come from that check, and
    ``tokens`` decodes the list on first use (the secondary's fast path
    never does).
    """

    TYPE: ClassVar[FrameType] = FrameType.TOKENS
    payload: bytes
    count: int = field(init=False, compare=False, repr=False)
    max_seq: int = field(init=False, compare=False, repr=False)
    _tokens: tuple | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise _fail("TOKENS", "payload", f"must be bytes, not {type(self.payload).__name__}")
        raw = bytes(self.payload)
        if not raw:
            raise _fail("TOKENS", "payload", "is empty (a TOKENS frame carries at least one token)")
        _set(self, "payload", raw)
        _set_scanned(self, "TOKENS", "_tokens", raw, True,
                     lambda: tuple((t, None) for t in _records.iter_tokens(raw)))

    @property
    def tokens(self) -> tuple[_records.Token, ...]:
        """The decoded tokens, in frame order."""
        if self._tokens is None:
            _set(self, "_tokens", tuple((t, None) for t in _records.iter_tokens(self.payload)))
        return tuple(t for t, _ in self._tokens)

    @classmethod
    def of(cls, tokens) -> Tokens:
        """A TOKENS message listing *tokens* (replicator.records.Token objects), in the given order."""
        return cls(b"".join(t.pack() for t in tokens))

    def encode(self) -> bytes:
        return self.payload

    def encode_parts(self) -> list:
        return [self.payload]

    @classmethod
    def decode(cls, payload) -> Tokens:
        return cls(bytes(payload))

    def __repr__(self) -> str:
        seqs = [t.seq for t in self.tokens]
        return f"Tokens(n={len(seqs)}, seqs={seqs[0]}..{seqs[-1]})"


@dataclass(frozen=True, slots=True, repr=False)
class Data(Message):
    """Records (M2): whole records (header + data), in the record format.

    ``payload`` is a read-only memoryview (a slice of the receive buffer when
    decoded: not copied); construction checks every record's structure and
    CRC once, in one C call, which also gives ``count`` and ``max_seq``.
    ``records``, the (Token, data memoryview) pairs, is decoded on first
    use; the secondary journals and queues ``payload`` as it is.
    """

    TYPE: ClassVar[FrameType] = FrameType.DATA
    payload: memoryview
    count: int = field(init=False, compare=False)
    max_seq: int = field(init=False, compare=False)
    _records: tuple | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise _fail("DATA", "payload", f"must be bytes, not {type(self.payload).__name__}")
        mv = memoryview(self.payload).cast("B").toreadonly()
        if not len(mv):
            raise _fail("DATA", "payload", "is empty (a DATA frame carries at least one record)")
        _set(self, "payload", mv)
        _set_scanned(self, "DATA", "_records", mv, False,
                     lambda: tuple(_records.iter_records(mv)))

    @property
    def records(self) -> tuple[tuple[_records.Token, memoryview], ...]:
        """(Token, data memoryview) of each record, in frame order."""
        if self._records is None:
            _set(self, "_records", tuple(_records.iter_records(self.payload, check_crc=False)))
        return self._records

    def encode(self) -> bytes:
        return bytes(self.payload)

    def encode_parts(self) -> list:
        return [self.payload]

    @classmethod
    def decode(cls, payload) -> Data:
        return cls(payload)

    def __repr__(self) -> str:
        seqs = [t.seq for t, _ in self.records]
        return f"Data(n={len(seqs)}, bytes={len(self.payload)}, seqs={seqs[0]}..{seqs[-1]})"


def _set_scanned(msg, name: str, cache: str, buf, tokens_only: bool, decode) -> None:
    """Set ``count`` and ``max_seq`` of a TOKENS or DATA message from one C
    check of every record in *buf*. When that finds a bad one, *decode()*
    (the Python decoder, which names it) words the error; its result, a
    tuple of (token, data) pairs, is kept in *cache*."""
    scan = _scan_records(buf, tokens_only=tokens_only)
    decoded = None
    if scan is None:
        try:
            decoded = decode()
        except _records.RecordError as e:
            raise _fail(name, "payload", f"is invalid: {e}") from None
        scan = (len(decoded), max(t.seq for t, _ in decoded))
    _set(msg, "count", scan[0])
    _set(msg, "max_seq", scan[1])
    _set(msg, cache, decoded)


_U64_1 = struct.Struct("<Q")
_U64_2 = struct.Struct("<QQ")
_U64_3 = struct.Struct("<QQQ")
_U64_4 = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class Flush(Message):
    """A durability point: the primary made every record with seq <= ``seq`` durable."""

    TYPE: ClassVar[FrameType] = FrameType.FLUSH
    seq: int

    def __post_init__(self) -> None:
        _uint("FLUSH", "seq", self.seq, _U64)

    def encode(self) -> bytes:
        return _U64_1.pack(self.seq)

    @classmethod
    def decode(cls, payload) -> Flush:
        _exact("FLUSH", payload, _U64_1.size)
        return cls(*_U64_1.unpack(payload))


# -- increments (codec only; the catch-up engine drives them) ---------------

@dataclass(frozen=True, slots=True)
class IncrBegin(Message):
    """Start of catch-up increment ``incr_id``: ``tracks`` tracks, ``nbytes`` bytes, frozen after ``base_seq``."""

    TYPE: ClassVar[FrameType] = FrameType.INCR_BEGIN
    incr_id: int
    base_seq: int
    tracks: int
    nbytes: int

    def __post_init__(self) -> None:
        for f in ("incr_id", "base_seq", "tracks", "nbytes"):
            _uint("INCR_BEGIN", f, getattr(self, f), _U64)

    def encode(self) -> bytes:
        return _U64_4.pack(self.incr_id, self.base_seq, self.tracks, self.nbytes)

    @classmethod
    def decode(cls, payload) -> IncrBegin:
        _exact("INCR_BEGIN", payload, _U64_4.size)
        return cls(*_U64_4.unpack(payload))


_INCR_DATA = struct.Struct("<QQII")


@dataclass(frozen=True, slots=True)
class IncrData(Message):
    """Track content for increment ``incr_id``: ``data`` at byte ``offset`` of ``volume``."""

    TYPE: ClassVar[FrameType] = FrameType.INCR_DATA
    incr_id: int
    offset: int
    data: memoryview
    volume: int = 0

    def __post_init__(self) -> None:
        _uint("INCR_DATA", "incr_id", self.incr_id, _U64)
        _uint("INCR_DATA", "offset", self.offset, _U64)
        _uint("INCR_DATA", "volume", self.volume, _U32)
        if not isinstance(self.data, (bytes, bytearray, memoryview)):
            raise _fail("INCR_DATA", "data", f"must be bytes, not {type(self.data).__name__}")
        mv = memoryview(self.data).cast("B").toreadonly()
        if not len(mv):
            raise _fail("INCR_DATA", "data", "is empty")
        if self.offset + len(mv) > _U64 + 1:
            raise _fail("INCR_DATA", "offset", f"{self.offset} + {len(mv)} bytes runs past 2**64")
        _set(self, "data", mv)

    def _head(self) -> bytes:
        return _INCR_DATA.pack(self.incr_id, self.offset, self.volume, 0)

    def encode(self) -> bytes:
        return self._head() + bytes(self.data)

    def encode_parts(self) -> list:
        return [self._head(), self.data]

    @classmethod
    def decode(cls, payload) -> IncrData:
        _at_least("INCR_DATA", payload, _INCR_DATA.size + 1)
        incr_id, offset, volume, rsv = _INCR_DATA.unpack_from(payload)
        if rsv:
            raise _fail("INCR_DATA", "reserved", "is not zero")
        return cls(incr_id, offset, memoryview(payload)[_INCR_DATA.size:], volume)


@dataclass(frozen=True, slots=True)
class IncrCommit(Message):
    """Increment ``incr_id`` is complete; stream records after it start at ``end_seq`` + 1."""

    TYPE: ClassVar[FrameType] = FrameType.INCR_COMMIT
    incr_id: int
    end_seq: int

    def __post_init__(self) -> None:
        _uint("INCR_COMMIT", "incr_id", self.incr_id, _U64)
        _uint("INCR_COMMIT", "end_seq", self.end_seq, _U64)

    def encode(self) -> bytes:
        return _U64_2.pack(self.incr_id, self.end_seq)

    @classmethod
    def decode(cls, payload) -> IncrCommit:
        _exact("INCR_COMMIT", payload, _U64_2.size)
        return cls(*_U64_2.unpack(payload))


# -- feedback, liveness, errors --------------------------------------------

@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The secondary's progress: journaled (durable) through, and applied
    through; optionally its disk state (``disk``, one of DISK_STATES, with
    ``disk_reason`` in words), so that a disk that fails or recovers after
    the handshake is known to the primary without a new STATE. ``disk`` is
    None when the ACK says nothing about it (the 16-byte form)."""

    TYPE: ClassVar[FrameType] = FrameType.ACK
    journaled_seq: int
    applied_seq: int
    disk: str | None = None
    disk_reason: str = ""

    def __post_init__(self) -> None:
        _uint("ACK", "journaled_seq", self.journaled_seq, _U64)
        _uint("ACK", "applied_seq", self.applied_seq, _U64)
        if self.disk is not None and self.disk not in DISK_CODES:
            raise _fail("ACK", "disk", f"is {self.disk!r}, expected one of {', '.join(DISK_STATES)}")
        _name("ACK", "disk_reason", self.disk_reason, MAX_ERROR_MESSAGE, allow_empty=True,
              printable=False)
        if self.disk is None and self.disk_reason:
            raise _fail("ACK", "disk_reason", "is set without a disk state")

    def encode(self) -> bytes:
        head = _U64_2.pack(self.journaled_seq, self.applied_seq)
        if self.disk is None:
            return head
        reason = self.disk_reason.encode()
        return head + _ACK_DISK.pack(DISK_CODES[self.disk], 0, len(reason)) + reason

    @classmethod
    def decode(cls, payload) -> Ack:
        if len(payload) < _U64_2.size + _ACK_DISK.size:  # the plain form, or nothing valid
            _exact("ACK", payload, _U64_2.size)
            return cls(*_U64_2.unpack(payload))
        journaled, applied = _U64_2.unpack_from(payload)
        disk, rsv, n = _ACK_DISK.unpack_from(payload, _U64_2.size)
        if rsv:
            raise _fail("ACK", "reserved", "is not zero")
        if disk not in DISKS_BY_CODE:
            raise _fail("ACK", "disk", f"has unknown value {disk}")
        start = _U64_2.size + _ACK_DISK.size
        _exact("ACK", payload, start + n)
        return cls(journaled, applied, DISKS_BY_CODE[disk],
                   _utf8("ACK", "disk_reason", payload[start:]))


_ACK_DISK = struct.Struct("<BBH")


@dataclass(frozen=True, slots=True)
class Received(Message):
    """Protocol B: the secondary has received every record through
    ``received_seq`` (not yet durable there; the ACK says journaled)."""

    TYPE: ClassVar[FrameType] = FrameType.RECEIVED
    received_seq: int

    def __post_init__(self) -> None:
        _uint("RECEIVED", "received_seq", self.received_seq, _U64)

    def encode(self) -> bytes:
        return _U64_1.pack(self.received_seq)

    @classmethod
    def decode(cls, payload) -> Received:
        _exact("RECEIVED", payload, _U64_1.size)
        return cls(*_U64_1.unpack(payload))


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Liveness probe; ``send_ts_ns`` is the sender's clock when it sent it."""

    TYPE: ClassVar[FrameType] = FrameType.PING
    nonce: int
    send_ts_ns: int

    def __post_init__(self) -> None:
        _uint("PING", "nonce", self.nonce, _U64)
        _uint("PING", "send_ts_ns", self.send_ts_ns, _U64)

    def encode(self) -> bytes:
        return _U64_2.pack(self.nonce, self.send_ts_ns)

    @classmethod
    def decode(cls, payload) -> Ping:
        _exact("PING", payload, _U64_2.size)
        return cls(*_U64_2.unpack(payload))


@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to a PING: echoes its nonce and timestamp, adds the answerer's clock."""

    TYPE: ClassVar[FrameType] = FrameType.PONG
    nonce: int
    ping_ts_ns: int
    peer_ts_ns: int

    def __post_init__(self) -> None:
        _uint("PONG", "nonce", self.nonce, _U64)
        _uint("PONG", "ping_ts_ns", self.ping_ts_ns, _U64)
        _uint("PONG", "peer_ts_ns", self.peer_ts_ns, _U64)

    @classmethod
    def answer(cls, ping: Ping, now_ns: int) -> Pong:
        """The PONG for *ping*, stamped with the answerer's clock *now_ns*."""
        return cls(ping.nonce, ping.send_ts_ns, now_ns)

    def rtt_ns(self, recv_ts_ns: int) -> int:
        """Round-trip time, given the pinger's clock when this PONG arrived."""
        return recv_ts_ns - self.ping_ts_ns

    def clock_offset_ns(self, recv_ts_ns: int) -> int:
        """Peer clock minus ours, assuming the path is symmetric (NTP's estimate)."""
        return self.peer_ts_ns - (self.ping_ts_ns + recv_ts_ns) // 2

    def encode(self) -> bytes:
        return _U64_3.pack(self.nonce, self.ping_ts_ns, self.peer_ts_ns)

    @classmethod
    def decode(cls, payload) -> Pong:
        _exact("PONG", payload, _U64_3.size)
        return cls(*_U64_3.unpack(payload))


_ERROR = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Why the sender is closing the connection (``code``: errors.ErrorCode)."""

    TYPE: ClassVar[FrameType] = FrameType.ERROR
    code: int
    message: str

    def __post_init__(self) -> None:
        _uint("ERROR", "code", self.code, _U16)
        _set(self, "code", int(self.code))
        _name("ERROR", "message", self.message, MAX_ERROR_MESSAGE, allow_empty=True,
              printable=False)

    def encode(self) -> bytes:
        return _ERROR.pack(self.code) + self.message.encode()

    @classmethod
    def decode(cls, payload) -> Error:
        _at_least("ERROR", payload, _ERROR.size)
        (code,) = _ERROR.unpack_from(payload)
        return cls(code, _utf8("ERROR", "message", payload[_ERROR.size:]))


@dataclass(frozen=True, slots=True)
class Stop(Message):
    """A clean-stop notice (planned switchover, DESIGN §7): the primary
    wrote nothing after ``last_seq`` and stops; ``ts_ns`` is its clock then.
    The secondary sends the same message back once it has applied through
    ``last_seq`` and recorded the stop."""

    TYPE: ClassVar[FrameType] = FrameType.STOP
    last_seq: int
    ts_ns: int

    def __post_init__(self) -> None:
        _uint("STOP", "last_seq", self.last_seq, _U64)
        _uint("STOP", "ts_ns", self.ts_ns, _U64)

    def encode(self) -> bytes:
        return _U64_2.pack(self.last_seq, self.ts_ns)

    @classmethod
    def decode(cls, payload) -> Stop:
        _exact("STOP", payload, _U64_2.size)
        return cls(*_U64_2.unpack(payload))


_BITMAP = struct.Struct("<IIQ")


@dataclass(frozen=True, slots=True)
class OosBitmap(Message):
    """A secondary's own out-of-sync tracks (its writes the peer never got,
    as an old primary coming back), sent once after STATE: the primary
    resends those tracks too. ``bits`` is the raw bit array, bit i = track i."""

    TYPE: ClassVar[FrameType] = FrameType.BITMAP
    track_size: int
    nbits: int
    bits: bytes

    def __post_init__(self) -> None:
        _uint("BITMAP", "track_size", self.track_size, _U32)
        if self.track_size < 512 or self.track_size & (self.track_size - 1):
            raise _fail("BITMAP", "track_size", f"{self.track_size} is not a power of two >= 512")
        _uint("BITMAP", "nbits", self.nbits, _U64)
        if len(self.bits) != (self.nbits + 7) // 8:
            raise _fail("BITMAP", "bits", f"holds {len(self.bits)} bytes for {self.nbits} bits")
        _set(self, "bits", bytes(self.bits))

    def encode(self) -> bytes:
        return _BITMAP.pack(self.track_size, 0, self.nbits) + self.bits

    @classmethod
    def decode(cls, payload) -> OosBitmap:
        _at_least("BITMAP", payload, _BITMAP.size)
        track, rsv, nbits = _BITMAP.unpack_from(payload)
        if rsv:
            raise _fail("BITMAP", "reserved", "is not zero")
        return cls(track, nbits, bytes(payload[_BITMAP.size:]))

    def tracks(self) -> list[int]:
        """The set tracks, in order."""
        out = []
        for i, byte in enumerate(self.bits):
            while byte:
                low = byte & -byte
                out.append(i * 8 + low.bit_length() - 1)
                byte ^= low
        return [t for t in out if t < self.nbits]


_INCR_ZERO = struct.Struct("<QQII")


@dataclass(frozen=True, slots=True)
class IncrZero(Message):
    """An increment's range that reads as zeros: sent as a marker, not data
    (the initial sync of a mostly empty device moves almost nothing)."""

    TYPE: ClassVar[FrameType] = FrameType.INCR_ZERO
    incr_id: int
    offset: int
    length: int
    volume: int = 0

    def __post_init__(self) -> None:
        _uint("INCR_ZERO", "incr_id", self.incr_id, _U64)
        _uint("INCR_ZERO", "offset", self.offset, _U64)
        _uint("INCR_ZERO", "length", self.length, _U32)
        _uint("INCR_ZERO", "volume", self.volume, _U32)
        if not self.length:
            raise _fail("INCR_ZERO", "length", "is 0")

    def encode(self) -> bytes:
        return _INCR_ZERO.pack(self.incr_id, self.offset, self.length, self.volume)

    @classmethod
    def decode(cls, payload) -> IncrZero:
        _exact("INCR_ZERO", payload, _INCR_ZERO.size)
        return cls(*_INCR_ZERO.unpack_from(payload))


_VERIFY_REQ = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class VerifyReq(Message):
    """Online verify: the CRC32C of tracks [first, first+count), read once
    the secondary has applied through *after_seq*."""

    TYPE: ClassVar[FrameType] = FrameType.VERIFY_REQ
    verify_id: int
    first_track: int
    count: int
    after_seq: int

    def __post_init__(self) -> None:
        for f in ("verify_id", "first_track", "count", "after_seq"):
            _uint("VERIFY_REQ", f, getattr(self, f), _U64)
        if not 1 <= self.count <= MAX_VERIFY_TRACKS:
            raise _fail("VERIFY_REQ", "count", f"is {self.count}, expected 1..{MAX_VERIFY_TRACKS}")

    def encode(self) -> bytes:
        return _VERIFY_REQ.pack(self.verify_id, self.first_track, self.count, self.after_seq)

    @classmethod
    def decode(cls, payload) -> VerifyReq:
        _exact("VERIFY_REQ", payload, _VERIFY_REQ.size)
        return cls(*_VERIFY_REQ.unpack_from(payload))


_VERIFY_SUMS = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class VerifySums(Message):
    """The answer to a VerifyReq: one 64-bit digest per track (see
    replicator.tracks.track_digest), in order, and the seq through which the
    image was applied when it was read."""

    TYPE: ClassVar[FrameType] = FrameType.VERIFY_SUMS
    verify_id: int
    first_track: int
    applied_seq: int
    sums: tuple[int, ...]

    def __post_init__(self) -> None:
        for f in ("verify_id", "first_track", "applied_seq"):
            _uint("VERIFY_SUMS", f, getattr(self, f), _U64)
        if not 1 <= len(self.sums) <= MAX_VERIFY_TRACKS:
            raise _fail("VERIFY_SUMS", "sums", f"holds {len(self.sums)} checksums, "
                        f"expected 1..{MAX_VERIFY_TRACKS}")
        _set(self, "sums", tuple(_uint("VERIFY_SUMS", "sums", v, _U64) for v in self.sums))

    def encode(self) -> bytes:
        return (_VERIFY_SUMS.pack(self.verify_id, self.first_track, self.applied_seq)
                + struct.pack(f"<{len(self.sums)}Q", *self.sums))

    @classmethod
    def decode(cls, payload) -> VerifySums:
        _at_least("VERIFY_SUMS", payload, _VERIFY_SUMS.size + 8)
        vid, first, applied = _VERIFY_SUMS.unpack_from(payload)
        rest = len(payload) - _VERIFY_SUMS.size
        if rest % 8:
            raise _fail("VERIFY_SUMS", "sums", f"are {rest} bytes, not a multiple of 8")
        sums = struct.unpack_from(f"<{rest // 8}Q", payload, _VERIFY_SUMS.size)
        return cls(vid, first, applied, sums)


@dataclass(frozen=True, slots=True)
class GroupFrame(Message):
    """A consistency group's control message (protocol/group.py decodes
    and checks the JSON inside); never valid on a replication link."""

    TYPE: ClassVar[FrameType] = FrameType.GROUP
    payload: bytes

    def encode(self) -> bytes:
        return self.payload

    @classmethod
    def decode(cls, payload) -> GroupFrame:
        return cls(bytes(payload))


MESSAGE_CLASSES: dict[FrameType, type[Message]] = {
    cls.TYPE: cls for cls in (Hello, Auth, State, Tokens, Data, Flush, IncrBegin,
                              IncrData, IncrCommit, Ack, Ping, Pong, Error, OosBitmap,
                              VerifyReq, VerifySums, IncrZero, GroupFrame, Stop, Received)
}
assert set(MESSAGE_CLASSES) == set(FrameType), "every frame type needs a message class"


def decode_message(ftype: FrameType, payload) -> Message:
    """Decode the payload of a frame of *ftype* into its message (ProtocolError if invalid)."""
    return MESSAGE_CLASSES[ftype].decode(payload)


def truncate_utf8(text: str, limit: int = MAX_ERROR_MESSAGE) -> str:
    """*text* cut to at most *limit* UTF-8 bytes without splitting a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[:limit].decode("utf-8", "ignore")

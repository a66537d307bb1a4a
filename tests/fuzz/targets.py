"""Fuzz targets: every Duplex parser of untrusted bytes, one function each.

A target takes one ``bytes`` and feeds it to the code under test the way
the real program does (a peer's byte stream, a file in a meta-dir). Its
contract: it returns, or it raises one of the target's ``expected`` error
classes, the user-facing error that parser documents (``ProtocolError``
from the wire, ``JournalError``, ``BitmapError``, ``ActivityLogError``,
``BitmapFilesError``, ``MetadataError``, ``ConfigError``, ``RecordError``).
Any other exception, an assertion of the target's own (a round trip that
does not come back equal, a committed record lost on reopen), or a file
descriptor left open is a *crash*: :func:`check` turns it into a
:class:`Crash` with a signature (exception type and the innermost frame in
``replicator/``) that deduplicates it.

File formats with checksums get a *fixup*: when bit 0 of the first input
byte is set, the target recomputes the checksums (and for the journal the
LSN/chain of its entries, for the wire the frame CRCs and the AUTH MAC)
before the bytes reach the parser, so that a fuzzer's mutations get past
the checksum and reach the code behind it. With the bit clear the bytes go
in as they are, and the checksum paths are fuzzed too.

``seeds()`` of each target are real frames and files made by the code
itself (a handshake transcript of two Connections, a journal written by
:class:`Journal`, a bitmap and activity log from the C core, metadata
saved by :class:`Metadata`, duplex.toml files as the config tests write
them), each prefixed with its fixup byte.

No atheris here: the engine (tests/fuzz/engine.py) drives these targets
with atheris; the tests call :func:`check` directly.

Threads and locks: none. A target is called from one thread at a time; its
scratch files live in one per-process temporary directory
(:func:`scratch_dir`), rewritten by every case.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from replicator.config import ConfigError, load_config
from replicator.crc32c import crc32c
from replicator.metadata import Metadata, MetadataError, decode_metadata, encode_metadata
from replicator.native.actlog import ActivityLog, ActivityLogError
from replicator.native.bitmap import Bitmap, BitmapError
from replicator.oosfiles import BitmapFilesError, open_bitmaps
from replicator.protocol import frames as fr
from replicator.protocol import messages as m
from replicator.protocol.auth import auth_mac
from replicator.protocol.connection import CLOSED, NEED_DATA, Connection
from replicator.protocol.errors import LocalProtocolError, ProtocolError
from replicator.protocol.state import ESTABLISHED, NEGOTIATING
from replicator.records import (HEADER as REC_HEADER, HEADER_SIZE as REC_HEADER_SIZE, OP_FLUSH,
                                OP_TRIM, OP_WRITE, OP_ZERO, RecordError, encode_record,
                                iter_records, iter_tokens, padded, record_crc, scan_records,
                                unpack_token)
from replicator.secondary import journal as jn

FIXUP = 0x01  # bit 0 of the first input byte: recompute checksums first

# Fixed identities, so that a corpus kept from an earlier run still matches.
RESOURCE = "r0"
SECRET = b"fuzz-shared-secret"
NONCE_PRIMARY = bytes(range(1, 33))
NONCE_SECONDARY = bytes(range(101, 133))
RESOURCE_UUID = bytes.fromhex("5ec0ffee000000000000000000000001")
NODE_UUID_HEX = "00112233445566778899aabbccddeeff"
NODE_UUID = bytes.fromhex(NODE_UUID_HEX)
TRACK = 4096
DEVICE_SIZE = 64 * TRACK


# -- the contract -----------------------------------------------------------

@dataclass(frozen=True)
class Crash:
    """One case that broke a target's contract."""

    signature: str   # "ExcType at replicator/x.py:123 in func": the dedup key
    kind: str        # the exception's type name
    message: str
    traceback: str


@dataclass(frozen=True)
class Target:
    """A parser under test: ``run(data)`` and the errors it may raise."""

    name: str
    run: Callable[[bytes], None]
    expected: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    max_len: int = 4096
    doc: str = ""
    #: expected subclasses that are still crashes (our bug, not the input's)
    forbidden: tuple[type[BaseException], ...] = field(default=())
    #: tokens the mutator may insert (libFuzzer -dict): syntax a random
    #: byte flip rarely makes, such as a TOML \\u escape
    dictionary: tuple[bytes, ...] = ()


class FdLeak(Exception):
    """A case left file descriptors open (a leak kills a long-running daemon)."""


class ContractViolation(AssertionError):
    """A target's own invariant failed (round trip, durability)."""


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def signature(exc: BaseException) -> str:
    """Exception type plus where it was raised: the innermost frame in
    replicator/ (else the innermost frame at all), as file:line."""
    frames = traceback.extract_tb(exc.__traceback__)
    inner = [f for f in frames if "/replicator/" in f.filename] or frames
    if not inner:
        return type(exc).__name__
    f = inner[-1]
    path = f.filename
    for marker in ("/replicator/", "/tests/fuzz/"):
        if marker in path:
            path = marker.lstrip("/") + path.split(marker, 1)[1]
            break
    return f"{type(exc).__name__} at {path}:{f.lineno} in {f.name}"


def check(target: Target, data: bytes, fd_check: bool = True,
          on_expected: Callable[[BaseException], None] | None = None) -> Crash | None:
    """Run *target* on *data*: None if it kept its contract, else the Crash.
    *on_expected* is shown each documented error the case raised (the
    engine turns its message into coverage feedback)."""
    before = _open_fds() if fd_check else 0
    try:
        target.run(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - classifying is the point
        if isinstance(e, target.expected) and not isinstance(e, target.forbidden):
            if on_expected is not None:
                on_expected(e)
        else:
            return Crash(signature(e), type(e).__name__, str(e)[:500],
                         "".join(traceback.format_exception(e)))
    if fd_check:
        after = _open_fds()
        if after > before:
            e = FdLeak(f"{after - before} file descriptor(s) left open by one case")
            return Crash(f"FdLeak in target {target.name}", "FdLeak", str(e), str(e))
    return None


_scratch: Path | None = None


def scratch_dir() -> Path:
    """This process's directory for the files a case writes (on /dev/shm
    when there is one: millions of small writes). $DUPLEX_FUZZ_SCRATCH
    names it when the caller removes it (the engine: a fuzzing child ends
    in libFuzzer's exit(), which runs no atexit handler); else it is made
    here and removed at exit."""
    global _scratch
    if _scratch is None:
        given = os.environ.get("DUPLEX_FUZZ_SCRATCH")
        if given:
            _scratch = Path(given)
            _scratch.mkdir(parents=True, exist_ok=True)
        else:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _scratch = Path(tempfile.mkdtemp(prefix="duplex-fuzz-", dir=base))
            atexit.register(shutil.rmtree, _scratch, True)
    return _scratch


def _write(name: str, data: bytes) -> str:
    path = scratch_dir() / name
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _split(data: bytes) -> tuple[int, bytes]:
    return (data[0], data[1:]) if data else (0, b"")


# -- the wire: real frames --------------------------------------------------

def _state(role: str, **kw) -> m.State:
    base = dict(resource_uuid=RESOURCE_UUID, generation=bytes(range(16)),
                device_size=DEVICE_SIZE, track_size=TRACK, role=role,
                disk="UpToDate" if role == m.PRIMARY else "Consistent")
    base.update(kw)
    return m.State(**base)


def _conn(role: str) -> Connection:
    nonce = NONCE_PRIMARY if role == m.PRIMARY else NONCE_SECONDARY
    node = "alpha" if role == m.PRIMARY else "beta"
    return Connection(role, RESOURCE, node, SECRET, nonce=nonce, max_frame=1 << 20)


def _flat(out) -> bytes:
    return out if isinstance(out, bytes) else b"".join(bytes(p) for p in out)


def _records_payload(n: int, first_seq: int = 1) -> bytes:
    out = []
    for i in range(n):
        seq = first_seq + i
        op = (OP_WRITE, OP_WRITE, OP_TRIM, OP_ZERO, OP_FLUSH)[i % 5]
        data = bytes([seq & 0xFF]) * (13 + 512 * (i % 3)) if op == OP_WRITE else b""
        length = len(data) if op == OP_WRITE else (TRACK if op != OP_FLUSH else 0)
        out.append(encode_record(seq, 1_700_000_000_000_000_000 + seq, (seq * 4096) % DEVICE_SIZE,
                                 length, op, data, volume=0, flags=1 if i % 4 == 3 else 0))
    return b"".join(out)


def _tokens_payload(payload: bytes) -> bytes:
    return b"".join(t.pack() for t, _ in iter_records(payload))


def _primary_stream() -> list[m.Message]:
    """What a primary sends after the handshake."""
    recs = _records_payload(5)
    return [m.Tokens(_tokens_payload(recs)), m.Data(recs), m.Flush(5),
            m.IncrBegin(1, 5, 2, 2 * TRACK), m.IncrData(1, 0, bytes(range(256)) * 2),
            m.IncrZero(1, TRACK, TRACK), m.IncrCommit(1, 5),
            m.VerifyReq(7, 0, 4, 5), m.Ping(1, 123), m.Pong(2, 100, 200)]


def _secondary_stream() -> list[m.Message]:
    """What a secondary sends after the handshake."""
    return [m.Ack(3, 2), m.Ack(5, 5, "Failed", "EIO writing the image"),
            m.OosBitmap(TRACK, 20, b"\x05\x00\x08"), m.VerifySums(7, 0, 5, (1, 2, 3, 4)),
            m.Ping(9, 42), m.Pong(1, 123, 456),
            m.Error(9, "shutting down")]


def _transcripts() -> dict[str, bytes]:
    """A whole connection between two Connections: what each side sent,
    keyed by the sender's role."""
    p, s = _conn(m.PRIMARY), _conn(m.SECONDARY)
    sent = {m.PRIMARY: bytearray(), m.SECONDARY: bytearray()}
    conns = {m.PRIMARY: p, m.SECONDARY: s}
    sent[m.PRIMARY] += p.initiate()
    sent[m.SECONDARY] += s.initiate()
    fed = {m.PRIMARY: 0, m.SECONDARY: 0}
    states_sent = set()
    for _ in range(10):
        for role, c in conns.items():
            other = m.SECONDARY if role == m.PRIMARY else m.PRIMARY
            new = bytes(sent[other][fed[role]:])
            fed[role] = len(sent[other])
            if new:
                c.receive_data(new)
            while c.next_event() not in (NEED_DATA, CLOSED):
                pass
            sent[role] += c.data_to_send()
            if c.state is NEGOTIATING and role not in states_sent:
                sent[role] += _flat(c.send(_state(role)))
                states_sent.add(role)
    assert p.established and s.established, "the seed handshake did not complete"
    for msg in _primary_stream():
        sent[m.PRIMARY] += _flat(p.send(msg))
    for msg in _secondary_stream():
        sent[m.SECONDARY] += _flat(s.send(msg))
    return {k: bytes(v) for k, v in sent.items()}


def _split_frames(stream: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + fr.HEADER_SIZE <= len(stream):
        length = struct.unpack_from("<I", stream, pos + 8)[0]
        out.append(stream[pos:pos + fr.HEADER_SIZE + length])
        pos += fr.HEADER_SIZE + length
    return out


def fix_frames(stream: bytes, auth_for: str | None = None) -> bytes:
    """*stream* with each frame's CRC recomputed (frames are delimited by
    their length fields; a last partial frame is left as it is). With
    *auth_for* (the role of the Connection reading *stream*), an AUTH
    frame's MAC is replaced by the right answer to that side's nonce, using
    the nonce of the first HELLO in *stream*."""
    out = bytearray(stream)
    pos = 0
    peer_nonce = None
    while pos + fr.HEADER_SIZE <= len(out):
        magic, version, ftype, flags, length, _ = fr.HEADER.unpack_from(out, pos)
        end = pos + fr.HEADER_SIZE + length
        if end > len(out):
            break
        body = pos + fr.HEADER_SIZE
        if ftype == fr.FrameType.HELLO and length >= 36 and peer_nonce is None:
            peer_nonce = bytes(out[body + 4:body + 36])
        if ftype == fr.FrameType.AUTH and length == m.MAC_SIZE and auth_for and peer_nonce:
            peer_role = m.SECONDARY if auth_for == m.PRIMARY else m.PRIMARY
            ours = NONCE_PRIMARY if auth_for == m.PRIMARY else NONCE_SECONDARY
            out[body:end] = auth_mac(SECRET, peer_role, ours, peer_nonce, RESOURCE)
        head = bytes(out[pos:pos + fr.CRC_OFFSET]) + b"\0\0\0\0"
        crc = crc32c(head)
        if not flags & fr.FLAG_RECORDS_CRC:
            crc = crc32c(bytes(out[body:end]), crc)
        struct.pack_into("<I", out, pos + fr.CRC_OFFSET, crc)
        if ftype in (fr.FrameType.TOKENS, fr.FrameType.DATA):
            out[body:end] = fix_records(bytes(out[body:end]))
        pos = end
    return bytes(out)


def _chunks(data: bytes, mode: int) -> list[bytes]:
    """Cut *data* as a socket might deliver it: whole, or in pieces of 1,
    7 or 61 bytes (bits 1-2 of the mode byte)."""
    size = (0, 1, 7, 61)[(mode >> 1) & 3]
    if not size:
        return [data] if data else []
    return [data[i:i + size] for i in range(0, len(data), size)]


def _roundtrip(msg: m.Message) -> None:
    again = m.decode_message(msg.TYPE, _flat(msg.encode_parts()))
    if again != msg:
        raise ContractViolation(f"{msg.TYPE.name} does not survive encode/decode: "
                                f"{msg!r} came back as {again!r}")


def target_frames(data: bytes) -> None:
    """The frame decoder alone (no state machine): every frame decoded into
    its message, every message re-encoded to the same message."""
    mode, stream = _split(data)
    if mode & FIXUP:
        stream = fix_frames(stream)
    dec = fr.FrameDecoder(max_frame=1 << 20)
    for chunk in _chunks(stream, mode) + [b""]:
        dec.feed(chunk)
        while (frame := dec.next_frame()) is not None:
            msg = m.decode_message(frame.type, frame.payload)
            _roundtrip(msg)
            again = _flat([fr.encode_header(msg.TYPE, msg.encode_parts(), frame.flags),
                           *msg.encode_parts()])
            if again != fr.encode_frame(frame.type, frame.payload, frame.flags):
                raise ContractViolation(f"{frame.type.name}: re-encoded frame differs")


def target_messages(data: bytes) -> None:
    """One message payload: byte 0 picks the frame type, the rest is the
    payload given to its decoder."""
    if not data:
        return
    types = sorted(m.MESSAGE_CLASSES)
    ftype = types[data[0] % len(types)]
    msg = m.decode_message(ftype, memoryview(data[1:]))
    _roundtrip(msg)
    repr(msg)
    if isinstance(msg, m.OosBitmap):
        msg.tracks()
    if isinstance(msg, m.Tokens):
        msg.tokens  # noqa: B018 - the lazy decode must not fail after the check
    if isinstance(msg, m.Data):
        msg.records  # noqa: B018


def target_connection(data: bytes) -> None:
    """A Connection receiving a peer's byte stream through the handshake
    and into the replication stream. Byte 0: bit 0 fixup (frame CRCs and
    the AUTH MAC), bits 1-2 chunking, bit 3 our role (set: secondary). Our
    side sends its HELLO first, its STATE when negotiating, and answers
    PINGs, as the shipper and the daemon do."""
    mode, stream = _split(data)
    role = m.SECONDARY if mode & 8 else m.PRIMARY
    if mode & FIXUP:
        stream = fix_frames(stream, auth_for=role)
    conn = _conn(role)
    conn.initiate()
    sent_state = False
    for chunk in _chunks(stream, mode) + [b""]:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            conn.data_to_send()
            if ev is NEED_DATA or ev is CLOSED:
                break
            if conn.state is NEGOTIATING and not sent_state:
                conn.send(_state(role))
                sent_state = True
            if isinstance(ev, m.Ping) and conn.state is ESTABLISHED:
                conn.send(m.Pong.answer(ev, 1))
            if isinstance(ev, (m.Tokens, m.Data)):
                repr(ev)
        if ev is CLOSED:
            break


def _seed_frames() -> list[bytes]:
    t = _transcripts()
    out = []
    for stream in t.values():
        out += [bytes([FIXUP]) + stream, bytes([FIXUP | 4]) + stream]
        out += [bytes([FIXUP]) + f for f in _split_frames(stream)]
    return out


def _seed_messages() -> list[bytes]:
    types = sorted(m.MESSAGE_CLASSES)
    t = _transcripts()
    out = []
    for stream in t.values():
        for f in _split_frames(stream):
            ftype = f[5]
            out.append(bytes([types.index(ftype)]) + f[fr.HEADER_SIZE:])
    st = _state(m.PRIMARY, volumes=(("data", 3 * TRACK), ("wal", TRACK)),
                history=(bytes(16), bytes(range(16))), flags=m.STATE_NEEDS_RESYNC)
    out.append(bytes([types.index(fr.FrameType.STATE)]) + st.encode())
    return out


def _seed_connection() -> list[bytes]:
    t = _transcripts()
    # Our role bit 3: the stream is the *other* side's.
    return [bytes([FIXUP]) + t[m.SECONDARY], bytes([FIXUP | 8]) + t[m.PRIMARY],
            bytes([FIXUP | 2]) + t[m.SECONDARY], bytes([FIXUP | 8 | 6]) + t[m.PRIMARY]]


# -- the group channel (protocol/group.py) ---------------------------------------

GROUP_NAME = "g0"
GROUP_SECRET = b"fuzz-group-secret"
GROUP_NONCES = {"member": bytes(range(40, 72)), "master": bytes(range(140, 172))}


def _group_conn(role: str):
    from replicator.protocol import group as g
    c = g.GroupConnection(role=role, group=GROUP_NAME, node=f"{role}-node", member="r0",
                          side="secondary", secret=GROUP_SECRET)
    c.nonce = GROUP_NONCES[role]  # fixed, so that the fixup can answer it
    return c


def fix_group_frames(stream: bytes, reader: str) -> bytes:
    """*stream* (GROUP frames for a *reader*-role GroupConnection) with
    each AUTH carrying the right MAC for the first HELLO's nonce, and every
    frame's CRC (and length, when the MAC changed it) recomputed."""
    from replicator.protocol import group as g
    out = bytearray()
    pos = 0
    peer_nonce = None
    while pos + fr.HEADER_SIZE <= len(stream):
        length = struct.unpack_from("<I", stream, pos + 8)[0]
        end = pos + fr.HEADER_SIZE + length
        if end > len(stream):
            break
        head, payload = bytearray(stream[pos:pos + fr.HEADER_SIZE]), stream[pos + fr.HEADER_SIZE:end]
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError):
            obj = None
        if isinstance(obj, dict) and obj.get("type") == "hello" and peer_nonce is None:
            try:
                peer_nonce = bytes.fromhex(str(obj.get("nonce")))
            except ValueError:
                pass
        elif isinstance(obj, dict) and obj.get("type") == "auth" and peer_nonce is not None:
            peer_role = "master" if reader == "member" else "member"
            obj["mac"] = g.group_mac(GROUP_SECRET, peer_role, GROUP_NONCES[reader], peer_nonce,
                                     GROUP_NAME).hex()
            payload = json.dumps(obj, separators=(",", ":")).encode()
            struct.pack_into("<I", head, 8, len(payload))
        struct.pack_into("<I", head, fr.CRC_OFFSET, 0)
        struct.pack_into("<I", head, fr.CRC_OFFSET, crc32c(payload, crc32c(bytes(head))))
        out += head + payload
        pos = end
    return bytes(out + stream[pos:])


def target_group(data: bytes) -> None:
    """A group channel end (member, or master with bit 3 of byte 0)
    receiving its peer's bytes: handshake, authentication, control
    messages; every message decoded must encode to the same message."""
    from replicator.protocol import group as g
    mode, stream = _split(data)
    role = "master" if mode & 8 else "member"
    if mode & FIXUP:
        stream = fix_group_frames(stream, role)
    conn = _group_conn(role)
    conn.initiate()
    for chunk in _chunks(stream, mode) + [b""]:
        conn.receive_data(chunk)
        while (msg := conn.next_event()) is not None:
            conn.data_to_send()
            again = g.decode(g.encode(msg)[fr.HEADER_SIZE:])
            if again != msg:
                raise ContractViolation(f"group {msg.type} does not survive encode/decode: "
                                        f"{msg!r} came back as {again!r}")


def _seed_group() -> list[bytes]:
    from replicator.protocol import group as g
    out = []
    for reader, sender in (("member", "master"), ("master", "member")):
        a, b = _group_conn(reader), _group_conn(sender)

        def pump(c, data: bytes) -> bytes:
            c.receive_data(data)
            while c.next_event() is not None:
                pass
            return c.data_to_send()

        a_hello = a.initiate()
        stream = b.initiate() + pump(b, a_hello)       # b's HELLO and AUTH
        pump(b, pump(a, stream))                         # a's AUTH back: b established
        msgs = ([g.make("release", n=3, t=1_700_000_000_000_000), g.make("reset", n=2),
                 g.make("view", view={"members": {"r0": {"held": 3}}, "point": [3, 7]}),
                 g.make("checkpoint", n=4, t=5, members=["r0", "r1"]),
                 g.make("ping", nonce=1, t0=2), g.make("pong", nonce=1, t0=2, t1=3)]
                if sender == "master" else
                [g.make("join", member="r0", released_n=2, released_t=9, in_progress=None),
                 g.make("held", member="r0", n=3, t=10, skew_us=5, members=["r0"]),
                 g.make("watermark", member="r0", t=11, skew_us=None, members=["r0", "r1"]),
                 g.make("complete", member="r0", n=3, seq=77),
                 g.make("resign", member="r0", reason="catching up"),
                 g.make("freeze", member="r0")])
        assert a.established and b.established, "the seed group handshake did not complete"
        stream += b"".join(b.send(msg) for msg in msgs) + b.error("stopping")
        out.append(bytes([FIXUP | (8 if reader == "master" else 0)]) + stream)
    return out


# -- records ------------------------------------------------------------------

def fix_records(buf: bytes) -> bytes:
    """*buf* with the CRC of every record whose header parses recomputed,
    walking records as iter_records does."""
    out = bytearray(buf)
    pos = 0
    while pos + REC_HEADER_SIZE <= len(out):
        fields = list(REC_HEADER.unpack_from(out, pos))
        size = REC_HEADER_SIZE + padded(fields[4])
        if pos + size > len(out):
            break
        fields[9] = record_crc(bytes(out[pos:pos + REC_HEADER_SIZE]),
                               bytes(out[pos + REC_HEADER_SIZE:pos + REC_HEADER_SIZE + fields[4]]))
        REC_HEADER.pack_into(out, pos, *fields)
        pos += size
    return bytes(out)


def _py_records(buf: bytes) -> list[tuple[int, int]] | None:
    """The records of *buf* checked by Python alone, (seq, size) each, or
    None when one is bad: the reference the C scan is compared with."""
    out = []
    pos = 0
    try:
        while pos < len(buf):
            tok = unpack_token(buf, pos)
            end = pos + tok.size
            if end > len(buf):
                return None
            data = buf[pos + REC_HEADER_SIZE:pos + REC_HEADER_SIZE + tok.data_len]
            if record_crc(buf[pos:pos + REC_HEADER_SIZE], data) != tok.crc:
                return None
            if any(buf[pos + REC_HEADER_SIZE + tok.data_len:end]):
                return None
            out.append((tok.seq, tok.size))
            pos = end
    except RecordError:
        return None
    return out


def target_records(data: bytes) -> None:
    """A packed record buffer (DATA payload, journal entry): the C core's
    one-call check must agree with the Python reference, and iter_records
    must yield exactly the records it counted. Bit 1 of byte 0: the buffer
    is a TOKENS payload (headers only) instead."""
    mode, buf = _split(data)
    if mode & FIXUP:
        buf = fix_records(buf)
    if mode & 2:
        scan = scan_records(buf, tokens_only=True)
        try:
            toks = list(iter_tokens(buf))
        except RecordError:
            toks = None
        if not buf:  # nothing to check: the C scan counts zero, messages refuse it
            return
        if (scan is None) != (toks is None):
            raise ContractViolation(f"tokens: C scan says {scan}, Python "
                                    f"{'rejects' if toks is None else f'{len(toks)} tokens'}")
        if scan is not None and scan != (len(toks), max(t.seq for t in toks)):
            raise ContractViolation(f"tokens: C scan {scan} differs from Python")
        return
    if not buf:
        return
    ref = _py_records(buf)
    scan = scan_records(buf)
    if (scan is None) != (ref is None):
        raise ContractViolation(f"records: C scan says {scan}, Python "
                                f"{'rejects' if ref is None else f'{len(ref)} records'}")
    if scan is not None and scan != (len(ref), max(s for s, _ in ref)):
        raise ContractViolation(f"records: C scan {scan} differs from Python {ref}")
    got = [(t.seq, t.size) for t, _ in iter_records(buf)]
    if ref is not None and got != ref:
        raise ContractViolation(f"iter_records gave {got}, the reference {ref}")


def _seed_records() -> list[bytes]:
    recs = _records_payload(6)
    one = encode_record(77, 1, 8192, 4096, OP_WRITE, b"z" * 4096)
    return [bytes([FIXUP]) + recs, bytes([FIXUP]) + one, bytes([FIXUP | 2]) + _tokens_payload(recs),
            bytes([0]) + recs[:len(recs) // 2]]


# -- the journal ----------------------------------------------------------------

def fix_journal(buf: bytes) -> bytes:
    """*buf* (a journal file) with both superblock checksums recomputed and
    the entry chain from the best superblock's checkpoint made consistent:
    each entry found (by its magic) gets the LSN, chain value and CRC a
    valid continuation has, and the records of a RECORDS entry their CRCs."""
    out = bytearray(buf)
    if len(out) < jn.AREA_START + jn.MIN_AREA:
        return bytes(out)
    best = None
    for off in jn.SB_OFFSETS:
        if out[off:off + 8] != jn.SB_MAGIC:
            continue
        body = bytes(out[off:off + jn._SB.size])
        struct.pack_into("<I", out, off + jn._SB.size, crc32c(body))
        fields = jn._SB.unpack_from(out, off)
        if best is None or fields[5] > best[5]:
            best = fields
    if best is None:
        return bytes(out)
    size = min(best[4], len(out))
    pos, lsn, prev = best[7], best[8], best[9]
    seen = set()
    while jn.AREA_START <= pos and pos + jn.ENTRY_HEADER_SIZE <= size and pos not in seen:
        seen.add(pos)
        magic = struct.unpack_from("<I", out, pos)[0]
        if magic != jn.ENTRY_MAGIC:
            if pos == jn.AREA_START:
                break
            pos = jn.AREA_START  # the writer wraps an entry that did not fit
            continue
        _, etype, flags, _, plen, _, seq_hi, _, rsv = jn._EH.unpack_from(out, pos)
        end = pos + jn.entry_size(plen)
        if end > size:
            break
        payload_at = pos + jn.ENTRY_HEADER_SIZE
        if etype == jn.ENTRY_RECORDS:
            out[payload_at:payload_at + plen] = fix_records(bytes(out[payload_at:payload_at + plen]))
        hdr0 = jn._EH.pack(jn.ENTRY_MAGIC, etype, flags, lsn, plen, prev, seq_hi, 0, rsv)
        crc = crc32c(hdr0)
        if not (flags & jn.ENTRY_FLAG_RECORDS_CRC and etype == jn.ENTRY_RECORDS):
            crc = crc32c(bytes(out[payload_at:payload_at + plen]), crc)
        out[pos:pos + jn.ENTRY_HEADER_SIZE] = jn._EH.pack(jn.ENTRY_MAGIC, etype, flags, lsn, plen,
                                                          prev, seq_hi, crc, rsv)
        pos, lsn, prev = end, lsn + 1, crc
    return bytes(out)


def target_journal(data: bytes) -> None:
    """A journal file as a restarted secondary meets it: open (superblocks,
    the scan of the live log), replay, read back every record and staged
    increment piece, then append and commit one record and checkpoint;
    reopened, the journal must hold that record (it was acked)."""
    mode, buf = _split(data)
    if mode & FIXUP:
        buf = fix_journal(buf)
    path = _write("journal", buf)
    with jn.Journal.open(path, RESOURCE_UUID) as j:
        replayed = list(j.replay())
        for tok, pos in replayed:
            if pos is not None:
                j.read_record(pos)
                j.read_record(pos.offset)
        for _incr, _base, pieces in j.committed_increments():
            for p in pieces:
                j.read_incr_data(p)
        j.backlog()
        if j.area_size < jn.MIN_AREA or not 0 <= j.used_bytes <= j.area_size:
            raise ContractViolation(f"journal uses {j.used_bytes} of {j.area_size} bytes")
        seq = max([j.applied_seq] + [t.seq for t, _ in replayed]) + 1
        if seq >= 1 << 63:
            return
        rec = encode_record(seq, 1, 0, 512, OP_WRITE, b"\xaa" * 512)
        if not j.has_room(len(rec)):
            return
        j.append(rec)
        j.commit()
        # a checkpoint at the same seq frees what open found applied and
        # writes a superblock for the live log as the scan left it
        j.checkpoint(j.applied_seq)
    with jn.Journal.open(path, RESOURCE_UUID) as j:
        if seq not in {t.seq for t, p in j.replay() if p is not None}:
            raise ContractViolation(f"record seq {seq}, appended and committed, is not in "
                                    f"the journal after reopening")


def _seed_journal() -> list[bytes]:
    d = Path(tempfile.mkdtemp(prefix="seed-journal-", dir=scratch_dir()))
    out = []

    def snap(path: Path) -> bytes:
        return bytes([FIXUP]) + path.read_bytes()

    p = d / "empty"
    jn.Journal.create(p, RESOURCE_UUID, 16384).close()
    out.append(snap(p))

    p = d / "busy"
    with jn.Journal.create(p, RESOURCE_UUID, 16384) as j:
        recs = _records_payload(4)
        j.append(recs)
        j.append_tokens(_tokens_payload(_records_payload(2, first_seq=5)))
        j.append_incr_data(1, 4, 0, b"\x11" * 300)
        j.append_incr_zero(1, 4, 4096, 4096)
        j.append_incr_commit(1, 4)
        j.append_incr_data(2, 4, 8192, b"\x22" * 64)  # never committed
        j.commit()
        j.checkpoint(1, next(t for t, _ in iter_records(recs) if t.seq == 1))
    out.append(snap(p))

    # The same entries as format version 1 wrote them: no entry flags, every
    # crc over its payload (open rewrites the superblocks as version 2).
    v1 = bytearray(p.read_bytes())
    for off in jn.SB_OFFSETS:
        struct.pack_into("<I", v1, off + jn._SB_VERSION_AT, 1)
    pos = jn.AREA_START
    while struct.unpack_from("<I", v1, pos)[0] == jn.ENTRY_MAGIC:
        struct.pack_into("<H", v1, pos + 6, 0)
        pos += jn.entry_size(struct.unpack_from("<I", v1, pos + 16)[0])
    out.append(bytes([FIXUP]) + fix_journal(bytes(v1)))

    p = d / "wrapped"
    with jn.Journal.create(p, RESOURCE_UUID, 16384) as j:
        seq = 1
        for _ in range(12):  # fill, checkpoint, wrap around the area's end
            rec = encode_record(seq, seq, 0, 700, OP_WRITE, bytes([seq]) * 700)
            j.append(rec)
            j.commit()
            if seq % 3 == 0:
                j.checkpoint(seq - 1)
            seq += 1
    out.append(snap(p))
    return out


# -- bitmap, activity log, and the two opened together ---------------------------------

def fix_bitmap(buf: bytes) -> bytes:
    """A bitmap file with its header CRC, and the CRC of its bits, recomputed."""
    out = bytearray(buf)
    if len(out) < 4096:
        return bytes(out)
    nbits = struct.unpack_from("<Q", out, 40)[0]
    nbytes = -(-((nbits + 63) // 64 * 8) // 4096) * 4096 if nbits < 1 << 41 else 0
    if 0 < nbytes and 4096 + nbytes <= len(out):
        struct.pack_into("<I", out, 48, crc32c(bytes(out[4096:4096 + nbytes])))
    struct.pack_into("<I", out, 52, 0)
    struct.pack_into("<I", out, 52, crc32c(bytes(out[:4096])))
    return bytes(out)


def fix_actlog(buf: bytes) -> bytes:
    """An activity log with its header CRC and both transaction CRCs recomputed."""
    out = bytearray(buf)
    if len(out) < 4096:
        return bytes(out)
    struct.pack_into("<I", out, 44, 0)
    struct.pack_into("<I", out, 44, crc32c(bytes(out[:4096])))
    block = struct.unpack_from("<I", out, 40)[0]
    for b in range(2):
        at = 4096 + b * block
        if not block or at + 40 > len(out):
            break
        count = struct.unpack_from("<I", out, at + 32)[0]
        if 40 + 4 * count > min(block, len(out) - at):
            continue
        struct.pack_into("<I", out, at + 36, 0)
        crc = crc32c(bytes(out[at + 40:at + 40 + 4 * count]), crc32c(bytes(out[at:at + 40])))
        struct.pack_into("<I", out, at + 36, crc)
    return bytes(out)


def _bitmap_track_size(buf: bytes) -> int:
    """The track size the caller passes: the file's own (its metadata
    would say the same), when it is one a caller could pass."""
    if len(buf) >= 36:
        ts = struct.unpack_from("<I", buf, 32)[0]
        if ts > 0:
            return ts
    return TRACK


def target_bitmap(data: bytes) -> None:
    """A bitmap file: open, read every bit, sync, close cleanly, reopen:
    the same bits must come back."""
    mode, buf = _split(data)
    if mode & FIXUP:
        buf = fix_bitmap(buf)
    path = _write("oos.bitmap", buf)
    ts = _bitmap_track_size(buf)
    with Bitmap.open(path, NODE_UUID, ts) as bm:
        runs = list(bm.runs())
        count = bm.count()
        bm.dirty_bytes(bm.nbits * ts)
        bm.find_next(0)
        bm.find_next_zero(0)
        if sum(n for _, n in runs) != count * ts:
            raise ContractViolation(f"runs cover {sum(n for _, n in runs)} bytes, "
                                    f"count() says {count} tracks of {ts}")
        bm.sync()
    with Bitmap.open(path, NODE_UUID, ts) as bm:
        if list(bm.runs()) != runs:
            raise ContractViolation("bitmap bits differ after a clean close and reopen")


def target_actlog(data: bytes) -> None:
    """An activity log file: open, recover into a bitmap, activate and
    release a range, quiesce, close, reopen."""
    mode, buf = _split(data)
    if mode & FIXUP:
        buf = fix_actlog(buf)
    path = _write("activity.log", buf)
    with ActivityLog.open(path, NODE_UUID) as al:
        rec = al.recovered_extents()
        al.active_extents()
        al.stats  # noqa: B018
        with Bitmap.create(None, NODE_UUID, TRACK, 1024) as bm:
            al.recover_into(bm)
            al.begin(0, TRACK, bm)
            al.end(0, TRACK)
            al.quiesce(bm)
    with ActivityLog.open(path, NODE_UUID) as al:
        if al.recovered_extents():
            raise ContractViolation(f"extents {al.recovered_extents()} recovered after a "
                                    f"quiesce (before it: {rec})")


_oos_cache: dict[str, object] = {}


def _oos_files() -> tuple[Metadata, bytes, bytes, bytes]:
    """A real meta-dir: metadata, a DIRTY bitmap (a crash's), an activity
    log with a recovered extent; (metadata, bitmap bytes, clean bitmap
    bytes, activity-log bytes)."""
    if "md" not in _oos_cache:
        d = scratch_dir() / "meta"
        d.mkdir(exist_ok=True)
        md = Metadata(resource=RESOURCE, node="alpha", resource_uuid=RESOURCE_UUID.hex(),
                      node_uuid=NODE_UUID_HEX, generation="ab" * 16, device_size=DEVICE_SIZE,
                      track_size=TRACK, role="Primary", disk="UpToDate",
                      needs_initial_sync=False, meta_dir=d,
                      volumes=[{"name": "default", "size": DEVICE_SIZE}])
        md.save()
        paths = md.paths
        for p in (paths.bitmap, paths.activity_log):
            if p.exists():
                p.unlink()
        with Bitmap.create(str(paths.bitmap), NODE_UUID, TRACK, DEVICE_SIZE // TRACK) as bm:
            bm.set_range(3 * TRACK, 2 * TRACK)
        clean = paths.bitmap.read_bytes()
        bm = Bitmap.open(str(paths.bitmap), NODE_UUID, TRACK)
        al = ActivityLog.create(str(paths.activity_log), NODE_UUID, 4 * TRACK, 8)
        al.begin(9 * TRACK, TRACK, bm)
        al.end(9 * TRACK, TRACK)
        bm.abandon()  # a crash: the bitmap stays DIRTY, the extent stays logged
        al.close()
        _oos_cache.update(md=md, bitmap=paths.bitmap.read_bytes(), clean=clean,
                          actlog=paths.activity_log.read_bytes())
    c = _oos_cache
    return c["md"], c["bitmap"], c["clean"], c["actlog"]  # type: ignore[return-value]


def target_oosfiles(data: bytes) -> None:
    """A node's bitmap and activity log opened together after a crash
    (oosfiles.open_bitmaps): bit 1 of byte 0 says which file is the fuzzed
    one (set: the activity log), the other is a real one."""
    md, bitmap, _, actlog = _oos_files()
    mode, buf = _split(data)
    if mode & 2:
        actlog = fix_actlog(buf) if mode & FIXUP else buf
    else:
        bitmap = fix_bitmap(buf) if mode & FIXUP else buf
    paths = md.paths
    paths.bitmap.write_bytes(bitmap)
    paths.activity_log.write_bytes(actlog)
    opened = open_bitmaps(md, None)  # type: ignore[arg-type] - the resource is not used
    opened.oos.close()
    opened.al.close()


def _seed_bitmap() -> list[bytes]:
    _, bitmap, clean, _ = _oos_files()
    return [bytes([FIXUP]) + bitmap, bytes([FIXUP]) + clean, bytes([0]) + clean]


def _seed_actlog() -> list[bytes]:
    _, _, _, actlog = _oos_files()
    d = scratch_dir() / "seed-al"
    d.mkdir(exist_ok=True)
    p = d / "empty.log"
    if p.exists():
        p.unlink()
    ActivityLog.create(str(p), NODE_UUID, 4 * TRACK, 3).close()
    return [bytes([FIXUP]) + actlog, bytes([FIXUP]) + p.read_bytes()]


def _seed_oosfiles() -> list[bytes]:
    _, bitmap, clean, actlog = _oos_files()
    return [bytes([FIXUP]) + bitmap, bytes([FIXUP]) + clean, bytes([FIXUP | 2]) + actlog]


# -- metadata and config ----------------------------------------------------------

def fix_metadata(buf: bytes) -> bytes:
    """Metadata content with its crc32c recomputed, when it parses as a
    document with a body."""
    try:
        doc = json.loads(buf)
        if isinstance(doc, dict) and isinstance(doc.get("body"), dict):
            doc["crc32c"] = crc32c(json.dumps(doc["body"], sort_keys=True,
                                              separators=(",", ":")).encode("utf-8"))
            return json.dumps(doc).encode("utf-8")
    except (ValueError, RecursionError, TypeError):
        pass
    return buf


def target_metadata(data: bytes) -> None:
    """metadata.json content: decode and check it, build the Metadata, and
    encode it again: the same body must decode."""
    mode, buf = _split(data)
    if mode & FIXUP:
        buf = fix_metadata(buf)
    where = Path("/var/lib/duplex/r0/metadata.json")
    body = decode_metadata(buf, where)
    md = Metadata(**body, meta_dir=where.parent)
    again = decode_metadata(encode_metadata(md.to_body()), where)
    if again != md.to_body():
        raise ContractViolation(f"metadata body changed in a round trip: {body} -> {again}")


def target_config(data: bytes) -> None:
    """duplex.toml content: load it as `duplex` does (a file), then use
    what the commands use of each resource and node."""
    path = _write("duplex.toml", data)
    cfg = load_config(path)
    for r in cfg.resources.values():
        _usable_path(f"resource.{r.name}.secret-file", r.secret_file)
        for name, node in r.nodes.items():
            r.node(name)
            r.peer_of(name)
            node.export_uri()
            node.address_str()
            node.export.nbdkit_args()
            node.multi_volume  # noqa: B018
            key = f"resource.{r.name}.on.{name}"
            _usable_path(f"{key}.meta-dir", node.meta_dir)
            _usable_path(f"{key}.export", node.export.path)
            for v in node.volumes:
                _usable_path(f"{key}.volume.{v.name}.device", v.device)
                _usable_path(f"{key}.volume.{v.name}.mount-point", v.mount_point)


def _usable_path(key: str, path: str | None) -> None:
    """A path the loader accepted must be one the system calls take: a
    NUL inside would fail later, in whichever command opens it, as a
    ValueError traceback."""
    if path is not None and "\0" in path:
        raise ContractViolation(f"{key}: the loader accepted a path with a NUL byte: {path!r}")


def _config_text(extra_resource: str = "", alpha: str = "", beta: str = "") -> str:
    return (f'[resource.r0]\nsecret-file = "/etc/duplex/r0.secret"\ntrack-size = "64KiB"\n'
            f'ring-size = "64MiB"\njournal-size = "16MiB"\n{extra_resource}\n'
            f'[resource.r0.on.alpha]\naddress = "10.0.0.1:7789"\n'
            f'meta-dir = "/var/lib/duplex/r0"\nexport = "unix:/run/duplex/r0.nbd"\n{alpha}\n'
            f'[resource.r0.on.beta]\naddress = "[fd00::2]:7789"\n'
            f'meta-dir = "/var/lib/duplex/r0"\n{beta}\n')


def _seed_config() -> list[bytes]:
    plain = _config_text(alpha='device = "/dev/sdb"', beta='device = "/dev/sdc"')
    full = _config_text(
        extra_resource='batch-interval = "1.5s"\nconnections = 4\nresync-rate = "100MiB/s"\n'
                       'fence-command = "/usr/local/bin/fence beta"\nal-extent-size = "1MiB"\n'
                       'drain-timeout = "30s"\nal-extents = 64\nbatch-bytes = "512KiB"',
        alpha='device = "/dev/sdb"\nservice-address = "10.0.0.10/24"\n'
              'service-interface = "eth0"\nmount-point = "/srv/data"',
        beta='device = "/dev/sdc"\nexport = "tcp:127.0.0.1:10809"')
    vols = _config_text(
        alpha='[resource.r0.on.alpha.volume.data]\ndevice = "/dev/sdb"\nmount-point = "/srv/pg"\n'
              '[resource.r0.on.alpha.volume.wal]\ndevice = "/dev/sdc"',
        beta='[resource.r0.on.beta.volume.data]\ndevice = "/dev/vdb"\n'
             '[resource.r0.on.beta.volume.wal]\ndevice = "/dev/vdc"')
    return [t.encode() for t in (plain, full, vols)]


def _seed_metadata() -> list[bytes]:
    md, _, _, _ = _oos_files()
    body = md.to_body()
    two = dict(body, volumes=[{"name": "data", "size": 3 * TRACK + 5},
                              {"name": "wal", "size": DEVICE_SIZE - 4 * TRACK}],
               history=["cd" * 16], bitmap_uuid="ef" * 16, peer_node_uuid="01" * 16)
    old = {k: v for k, v in body.items() if k not in ("volumes", "seq_reserved", "discard_my_data")}
    return [bytes([FIXUP]) + encode_metadata(b) for b in (body, two, old)] + [
        bytes([0]) + md.paths.metadata.read_bytes()]


_TOML_TOKENS = (b"\\u0000", b"\\U0000000", b"\\u00e9", b"\\ud800", b"\\n", b"\\\"", b'"""', b"'''",
                b"[resource.r0.on.alpha.volume.", b"[resource.r0.on.", b"[[resource]]", b" = ",
                b"{}", b"[]", b"= {device = ", b"= true", b"= 1e999", b"= -1", b"= 0x7fffffff",
                b"= 99999999999999999999", b"1979-05-27T07:32:00Z", b"volume", b"device",
                b"mount-point", b"meta-dir", b"export", b"address", b"service-address",
                b"service-interface", b"secret-file", b"track-size", b"ring-size",
                b"journal-size", b"al-extent-size", b"al-extents", b"batch-bytes",
                b"batch-interval", b"drain-timeout", b"connections", b"resync-rate",
                b"fence-command", b"unix:", b"tcp:", b"[::1]:", b"KiB", b"MiB", b"GiB", b"TiB",
                b"KB", b"ms", b"us", b"min", b"/s", b"0.5", b"1.5")
_JSON_TOKENS = (b"\\u0000", b"\\ud800", b"\\udc00", b"1e999", b"-0", b"NaN", b"Infinity",
                b"-Infinity", b"true", b"false", b"null", b"[]", b"{}", b'""', b'"volumes"',
                b'"name"', b'"size"', b'"history"', b'"role"', b'"disk"', b'"body"', b'"crc32c"',
                b'"magic"', b'"version"', b'"Primary"', b'"Secondary"', b'"UpToDate"',
                b'"Outdated"', b'"device_size"', b'"track_size"', b'"seq_hwm"',
                b"18446744073709551616", b"9223372036854775807", b"0.0")


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("frames", target_frames, (ProtocolError,), _seed_frames, 8192,
           "frame decoder and message codecs, no state", forbidden=(LocalProtocolError,)),
    Target("messages", target_messages, (ProtocolError,), _seed_messages, 4096,
           "one message payload per case", forbidden=(LocalProtocolError,)),
    Target("connection", target_connection, (ProtocolError,), _seed_connection, 8192,
           "Connection: handshake, auth, STATE check, stream", forbidden=(LocalProtocolError,)),
    Target("group", target_group, (ProtocolError,), _seed_group, 8192,
           "group channel end: handshake, auth, control messages (JSON)",
           forbidden=(LocalProtocolError,), dictionary=_JSON_TOKENS),
    Target("records", target_records, (RecordError,), _seed_records, 8192,
           "record buffers: C scan against the Python reference"),
    Target("journal", target_journal, (jn.JournalError,), _seed_journal, 1 << 16,
           "the secondary's journal file: open, replay, append, reopen"),
    Target("bitmap", target_bitmap, (BitmapError,), _seed_bitmap, 1 << 16,
           "OOS bitmap file"),
    Target("actlog", target_actlog, (ActivityLogError,), _seed_actlog, 1 << 15,
           "activity log file"),
    Target("oosfiles", target_oosfiles, (BitmapFilesError,), _seed_oosfiles, 1 << 16,
           "bitmap and activity log opened together after a crash"),
    Target("metadata", target_metadata, (MetadataError,), _seed_metadata, 16384,
           "metadata.json", dictionary=_JSON_TOKENS),
    Target("config", target_config, (ConfigError,), _seed_config, 4096,
           "duplex.toml", dictionary=_TOML_TOKENS),
)}

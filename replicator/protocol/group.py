"""The consistency group's control channel, sans-IO (DESIGN §13).

Seed 000's couplers: the primaries' channel (checkpoints, clock pings) and
the secondaries' channel (held checkpoints or watermarks, releases,
completions, resets). Both are this one protocol over TCP, between a
member (the side that connects) and a master (the side that listens).

Every frame is a GROUP frame (frames.py: header, CRC32C) whose payload is
one JSON object with a ``type``. JSON because these are small, rare control
messages (tens a second) whose fields grow: the bulk data never crosses
this channel. Each message type has a schema in :data:`MESSAGES`, a table
both sides use: a decoded message has exactly the fields its type lists,
each of its kind and within its bounds, or ProtocolError names the message
and the field.

Authentication is the replication link's challenge (auth.py) with its own
domain: each HELLO carries a 32-byte nonce; each AUTH is::

    HMAC-SHA256(secret, b"duplex-group-v1" || own_role || peer_nonce
                        || own_nonce || group)

with own_role 1 for a member and 2 for a master, so a MAC cannot be
reflected, replayed on another connection or carried to another group.
No other message is accepted before both AUTHs are checked.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any

from replicator.protocol.errors import ErrorCode, ProtocolError
from replicator.protocol.frames import FrameDecoder, FrameType, encode_frame

GROUP_VERSION = 1
MAX_MESSAGE = 64 * 1024  # a view of 64 members is far below this
NONCE_BYTES = 32
DOMAIN = b"duplex-group-v1"
ROLE_BYTES = {"member": 1, "master": 2}
SIDES = ("primary", "secondary")

_U64 = (1 << 64) - 1
_NAME = 255

# Field kinds: (python type, bound). "u64": int in [0, 2**64); "name": a
# non-empty str of at most 255 UTF-8 bytes; "text": str up to 4 KiB;
# "hex": str of hex digits; "opt_u64": u64 or null; "side": one of SIDES;
# "names": a list of at most 64 names; "any": a JSON object (the
# master's view, shown by status as it is).
MESSAGES: dict[str, dict[str, str]] = {
    # handshake
    "hello": {"version": "u64", "group": "name", "node": "name", "member": "name",
              "side": "side", "role": "role", "nonce": "hex"},
    "auth": {"mac": "hex"},
    # primaries: the checkpoint master to each primary; clock pings both ways
    "checkpoint": {"n": "u64", "t": "u64", "members": "names"},
    "ping": {"nonce": "u64", "t0": "u64"},
    "pong": {"nonce": "u64", "t0": "u64", "t1": "u64"},
    # secondaries to the rendezvous master
    "join": {"member": "name", "released_n": "u64", "released_t": "u64",
             "in_progress": "opt_u64"},
    "held": {"member": "name", "n": "u64", "t": "u64", "skew_us": "opt_u64",
             "members": "names"},
    "watermark": {"member": "name", "t": "u64", "skew_us": "opt_u64", "members": "names"},
    "complete": {"member": "name", "n": "u64", "seq": "u64"},
    "resign": {"member": "name", "reason": "text"},
    "freeze": {"member": "name"},
    # the rendezvous master to every secondary
    "release": {"n": "u64", "t": "u64"},
    "reset": {"n": "u64"},
    "view": {"view": "any"},
    # either side, before closing
    "error": {"message": "text"},
}


@dataclass(frozen=True)
class GroupMessage:
    """One decoded, checked control message: its type and fields."""

    type: str
    fields: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]


def _check_field(mtype: str, name: str, kind: str, value: Any) -> Any:
    def bad(problem: str) -> ProtocolError:
        return ProtocolError(f"group {mtype}: field {name} {problem}")

    if kind in ("u64", "opt_u64"):
        if value is None and kind == "opt_u64":
            return None
        if type(value) is not int or not 0 <= value <= _U64:
            raise bad(f"must be an integer 0..2^64-1, not {value!r:.40}")
        return value
    if kind in ("name", "text", "hex", "side", "role"):
        if not isinstance(value, str):
            raise bad(f"must be a string, not {type(value).__name__}")
        limit = _NAME if kind == "name" else 4096
        if len(value.encode("utf-8", "surrogatepass")) > limit or (kind == "name" and not value):
            raise bad(f"must be 1..{limit} bytes")
        if kind == "hex" and any(ch not in "0123456789abcdef" for ch in value):
            raise bad("must be lower-case hex")
        if kind == "side" and value not in SIDES:
            raise bad(f"must be one of {', '.join(SIDES)}, not {value!r:.40}")
        if kind == "role" and value not in ROLE_BYTES:
            raise bad(f"must be member or master, not {value!r:.40}")
        return value
    if kind == "names":
        if (not isinstance(value, list) or len(value) > 64
                or not all(isinstance(v, str) and 0 < len(v.encode("utf-8", "surrogatepass"))
                           <= _NAME for v in value)):
            raise bad("must be a list of at most 64 names")
        return value
    if kind == "any":
        if not isinstance(value, dict):
            raise bad("must be an object")
        return value
    raise AssertionError(kind)


def make(mtype: str, /, **fields: Any) -> GroupMessage:
    """A checked message of *mtype* (ProtocolError on a bad field: a bug
    when built locally, a refused frame when decoded)."""
    schema = MESSAGES.get(mtype)
    if schema is None:
        raise ProtocolError(f"group message has unknown type {mtype!r:.40}")
    if set(fields) != set(schema):
        missing = sorted(set(schema) - set(fields))
        extra = sorted(set(fields) - set(schema))
        raise ProtocolError(f"group {mtype}: " + "; ".join(
            ([f"missing field(s) {', '.join(missing)}"] if missing else [])
            + ([f"unknown field(s) {', '.join(e[:40] for e in extra)}"] if extra else [])))
    return GroupMessage(mtype, {k: _check_field(mtype, k, schema[k], v) for k, v in fields.items()})


def encode(msg: GroupMessage) -> bytes:
    """The GROUP frame carrying *msg*."""
    body = json.dumps({"type": msg.type, **msg.fields}, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"group {msg.type}: {len(body)} bytes is over {MAX_MESSAGE}")
    return encode_frame(FrameType.GROUP, body)


def load_json(raw, what: str, error: type[Exception], expect: str = "JSON"):
    """*raw* (UTF-8 JSON from the network) parsed, or *error* naming *what*
    and what was *expected* (deep nesting and bad UTF-8 included: never
    another exception)."""
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except RecursionError:
        raise error(f"{what} nests JSON too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{what} is not {expect}: {e}") from None


def decode(payload) -> GroupMessage:
    """The message in a GROUP frame's payload, checked against its schema."""
    obj = load_json(payload, "group frame", ProtocolError, "a JSON object")
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("group frame is not a JSON object with a type")
    mtype = obj.pop("type")
    return make(mtype, **obj)


def group_mac(secret: bytes, own_role: str, peer_nonce: bytes, own_nonce: bytes,
              group: str) -> bytes:
    """The AUTH mac a *own_role* side sends, answering *peer_nonce*."""
    msg = DOMAIN + bytes([ROLE_BYTES[own_role]]) + peer_nonce + own_nonce + group.encode()
    return hmac.new(secret, msg, hashlib.sha256).digest()


class GroupConnection:
    """One end of a group channel, sans-IO (the h11 shape).

    ``initiate()`` gives our HELLO; feed received bytes to
    ``receive_data()`` and take messages from ``next_event()`` (None: need
    more bytes); ``send(msg)`` gives the bytes of a message. Until both
    sides are authenticated only HELLO and AUTH pass (``established``);
    anything else, a second HELLO, a wrong group, version or secret raises
    ProtocolError. The peer's HELLO is ``peer`` once received.
    """

    def __init__(self, *, role: str, group: str, node: str, member: str, side: str,
                 secret: bytes) -> None:
        if role not in ROLE_BYTES:
            raise ValueError(role)
        self.role = role
        self.group = group
        self.node = node
        self.member = member
        self.side = side
        self._secret = bytes(secret)
        self.nonce = os.urandom(NONCE_BYTES)
        self._dec = FrameDecoder(max_frame=MAX_MESSAGE + 64)
        self.peer: GroupMessage | None = None
        self._peer_authed = False
        self._sent_auth = False
        self._out: list[bytes] = []

    @property
    def established(self) -> bool:
        """Both sides authenticated: control messages may flow."""
        return self._peer_authed and self._sent_auth

    def initiate(self) -> bytes:
        """Our HELLO."""
        return encode(make("hello", version=GROUP_VERSION, group=self.group, node=self.node,
                           member=self.member, side=self.side, role=self.role,
                           nonce=self.nonce.hex()))

    def data_to_send(self) -> bytes:
        """Bytes queued by the handshake (our AUTH), to send now."""
        out, self._out = b"".join(self._out), []
        return out

    def send(self, msg: GroupMessage) -> bytes:
        """The bytes of *msg*; only once established."""
        if not self.established:
            raise ProtocolError(f"group {msg.type} before the handshake finished")
        return encode(msg)

    def error(self, message: str) -> bytes:
        """An error message to send before closing (any time)."""
        return encode(make("error", message=message[:1000]))

    def receive_data(self, data) -> None:
        """Bytes from the peer (b"" at EOF)."""
        self._dec.feed(data)

    def next_event(self) -> GroupMessage | None:
        """The next message from the peer, or None when more bytes are
        needed. Handshake messages are handled here and also returned."""
        frame = self._dec.next_frame()
        if frame is None:
            return None
        if frame.type is not FrameType.GROUP:
            raise ProtocolError(f"group channel got a {frame.type.name} frame",
                                ErrorCode.PROTOCOL)
        msg = decode(frame.payload)
        if msg.type == "error":
            raise ProtocolError(f"the group peer refused: {msg['message']}", ErrorCode.PROTOCOL)
        if msg.type == "hello":
            self._on_hello(msg)
        elif msg.type == "auth":
            self._on_auth(msg)
        elif not self.established:
            raise ProtocolError(f"group {msg.type} before authentication", ErrorCode.AUTH_FAILED)
        return msg

    def _on_hello(self, msg: GroupMessage) -> None:
        if self.peer is not None:
            raise ProtocolError("a second group hello", ErrorCode.PROTOCOL)
        if msg["version"] != GROUP_VERSION:
            raise ProtocolError(f"group peer {msg['node']} speaks group version "
                                f"{msg['version']}, this node {GROUP_VERSION}", ErrorCode.VERSION)
        if msg["group"] != self.group:
            raise ProtocolError(f"group peer {msg['node']} is in group {msg['group']!r}, "
                                f"this node in {self.group!r}", ErrorCode.WRONG_RESOURCE)
        if msg["role"] == self.role:
            raise ProtocolError(f"group peer {msg['node']} is also a {self.role}",
                                ErrorCode.ROLE_CONFLICT)
        nonce = bytes.fromhex(msg["nonce"]) if len(msg["nonce"]) == 2 * NONCE_BYTES else b""
        if len(nonce) != NONCE_BYTES or nonce == self.nonce:
            raise ProtocolError(f"group peer {msg['node']} sent a bad or reflected nonce",
                                ErrorCode.AUTH_FAILED)
        self.peer = msg
        self._peer_nonce = nonce
        mac = group_mac(self._secret, self.role, nonce, self.nonce, self.group)
        self._out.append(encode(make("auth", mac=mac.hex())))
        self._sent_auth = True

    def _on_auth(self, msg: GroupMessage) -> None:
        if self.peer is None or self._peer_authed:
            raise ProtocolError("group auth out of order", ErrorCode.AUTH_FAILED)
        want = group_mac(self._secret, self.peer["role"], self.nonce, self._peer_nonce,
                         self.group)
        if not hmac.compare_digest(want.hex(), msg["mac"]):
            raise ProtocolError(f"group authentication failed: node {self.peer['node']} does "
                                f"not know the secret of group {self.group} (the group "
                                f"secret files differ)", ErrorCode.AUTH_FAILED)
        self._peer_authed = True

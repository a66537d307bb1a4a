"""One Duplex connection, either role, with no I/O in it (h11's Connection shape).

The caller moves bytes; the Connection turns them into events and back::

    conn = Connection(role="secondary", resource="r0", node="beta", secret=key)
    sock.sendall(conn.initiate())                   # our HELLO
    while True:
        conn.receive_data(sock.recv(1 << 20))       # b"" = EOF
        while True:
            try:
                ev = conn.next_event()
            except ProtocolError as e:
                sock.sendall(conn.error_frame(e)); sock.close(); ...
            if ev is NEED_DATA or ev is CLOSED: break
            out = conn.data_to_send()               # AUTH, produced by the connection
            if out: sock.sendall(out)
            ...handle ev (Hello, Auth, State, Tokens, Data, Ack, ...)...

Events are the message classes of ``messages.py``. ``send(event)`` returns
the bytes to write: ``bytes`` for small messages, a list of buffers for
TOKENS / DATA / INCR_DATA (for ``sendmsg``, no copy). Anything the
Connection queued by itself (its AUTH) is put in front of what ``send`` or
``initiate`` returns, so bytes always leave in protocol order even if the
caller forgets ``data_to_send()``.

The Connection does the mechanical part of the handshake itself: it checks
the peer's HELLO (protocol version, resource name, complementary role, no
echoed nonce), answers the challenge with AUTH, verifies the peer's AUTH,
checks that the peer's STATE says the role its HELLO said, and, once both
STATEs are known, runs ``compat.check_peer_state`` (unless
``check_state=False``). What a STATE *means* for replication (where to
resume, whether to resync) is the caller's business.

Frame types are checked against the state table as soon as a frame's
header arrives, before its payload is buffered: a DATA header before
authentication is refused at 16 bytes.
"""
from __future__ import annotations

from replicator.protocol.auth import auth_mac, new_nonce, verify_mac
from replicator.protocol.compat import check_peer_state
from replicator.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from replicator.protocol.frames import (BULK_TYPES, DEFAULT_MAX_FRAME, MAX_CONTROL_PAYLOAD,
                                        COMPRESSIBLE_TYPES, Allocate, FrameDecoder, FrameType,
                                        as_byte_views, encode_compressed, encode_frame,
                                        encode_header, frame_flags, payload_limit)
from replicator.protocol.messages import (PROTOCOL_VERSION, ROLE_CODES, Auth, Error, Hello,
                                          Message, State, decode_message, truncate_utf8)
from replicator.protocol.state import (AUTHENTICATING, CLOSED as CLOSED_STATE, ESTABLISHED,
                                       IDLE, ConnectionState, PartyState, other_role)


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: next_event(): no whole frame yet, feed more bytes
NEED_DATA = _Sentinel("NEED_DATA")
#: next_event(): the connection is over (EOF, or ERROR sent/received)
CLOSED = _Sentinel("CLOSED")


class Connection:
    """The protocol state of one connection to the peer, in either role."""

    def __init__(self, role: str, resource: str, node: str, secret: bytes,
                 nonce: bytes | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 max_control: int = MAX_CONTROL_PAYLOAD, check_state: bool = True,
                 allocate: Allocate = bytearray) -> None:
        """*role* is ours ("primary"/"secondary"); *secret* the resource's shared key.

        *nonce* (32 bytes) is our challenge; a fresh random one by default.
        *max_frame* bounds bulk payloads (TOKENS, DATA, INCR_DATA) both ways.
        *allocate* gives the buffers large payloads are received into
        (see :class:`FrameDecoder`).
        """
        if role not in ROLE_CODES:
            raise ValueError(f"role must be 'primary' or 'secondary', not {role!r}")
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError(f"the shared secret of resource {resource!r} must be non-empty bytes")
        self.our_role = role
        self.peer_role = other_role(role)
        self.resource = resource
        self.node = node
        self._secret = bytes(secret)
        # Validates resource, node and nonce (ProtocolError naming the field).
        self._hello = Hello(PROTOCOL_VERSION, resource, node, role,
                            new_nonce() if nonce is None else nonce)
        self.max_frame = max_frame
        self.max_control = max_control
        self.check_state = check_state
        self._cstate = ConnectionState()
        self._decoder = FrameDecoder(max_frame, max_control, on_header=self._check_header,
                                     allocate=allocate)
        self._out = bytearray()
        self._error: ProtocolError | None = None
        #: compresses the DATA and INCR_DATA frames we send (compression.Compressor;
        #: None: sent as they are). The receiving side needs no setting.
        self.compressor = None
        #: payload bytes given to the compressor, and what went on the wire for them
        self.compressed_in = 0
        self.compressed_out = 0
        #: the peer's HELLO once received (its node name, nonce...)
        self.peer: Hello | None = None
        #: the STATE we sent, and the peer's, once exchanged
        self.local_state_msg: State | None = None
        self.peer_state_msg: State | None = None

    # -- states -----------------------------------------------------------

    @property
    def state(self) -> PartyState:
        """Our party's state."""
        return self._cstate.states[self.our_role]

    @property
    def peer_state(self) -> PartyState:
        """The peer party's state, as far as we know."""
        return self._cstate.states[self.peer_role]

    @property
    def established(self) -> bool:
        """True once both sides are authenticated and both STATEs exchanged."""
        return self.state is ESTABLISHED and self.peer_state is ESTABLISHED

    @property
    def nonce(self) -> bytes:
        """Our challenge, as sent in our HELLO."""
        return self._hello.nonce

    # -- outgoing ---------------------------------------------------------

    def initiate(self) -> bytes:
        """Our HELLO (plus our AUTH if the peer's HELLO is already in)."""
        if self.state is not IDLE:
            raise LocalProtocolError(f"initiate() while {self.state} (role {self.our_role}): "
                                     f"HELLO was already sent")
        self._cstate.process(self.our_role, FrameType.HELLO)
        out = encode_frame(FrameType.HELLO, self._hello.encode())
        self._maybe_queue_auth()
        return out + self.data_to_send()

    def data_to_send(self) -> bytes:
        """Bytes the connection produced by itself (our AUTH); empty if none. Clears them."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, event: Message) -> bytes | list:
        """The bytes carrying *event* to the peer (a list of buffers for bulk types).

        Raises LocalProtocolError if our role and state do not allow it. For a
        STATE, may raise ProtocolError if the peer's STATE is already known and
        incompatible (check_peer_state): close with error_frame() then.
        """
        if not isinstance(event, Message):
            raise LocalProtocolError(f"cannot send {type(event).__name__}: not a protocol message")
        ftype = event.TYPE
        if isinstance(event, (Hello, Auth)):
            raise LocalProtocolError(f"{ftype.name} is sent by the connection itself "
                                     f"(initiate() and data_to_send())")
        self._check_send(ftype)
        if isinstance(event, State):
            if event.role != self.our_role:
                raise LocalProtocolError(f"STATE says role {event.role} but this connection "
                                         f"is the {self.our_role}")
            self.local_state_msg = event
            self._maybe_check_states()
        parts = event.encode_parts()
        return self._emit(ftype, parts)

    def send_payload(self, ftype: FrameType, parts) -> list:
        """A TOKENS or DATA frame whose payload is *parts* (buffers, e.g. C send-ring spans).

        Zero copy: returns ``[header, *parts]`` (preceded by any queued
        bytes) for sendmsg. The payload is not parsed here; it must be packed
        tokens or records straight from the ring.
        """
        ftype = FrameType(ftype)
        if ftype not in (FrameType.TOKENS, FrameType.DATA):
            raise LocalProtocolError(f"send_payload() carries TOKENS or DATA, not {ftype.name}")
        self._check_send(ftype)
        views = as_byte_views(parts)
        if not sum(v.nbytes for v in views):
            raise LocalProtocolError(f"{ftype.name} frame with an empty payload")
        return self._emit(ftype, views)

    def error_frame(self, exc: BaseException) -> bytes:
        """An ERROR frame telling the peer why we close (*exc*'s message and code).

        Usable in any state, including after a ProtocolError; the connection
        is CLOSED afterwards and queued bytes are dropped.
        """
        code = exc.code if isinstance(exc, ProtocolError) else ErrorCode.INTERNAL
        if isinstance(exc, LocalProtocolError):
            code = ErrorCode.INTERNAL  # our bug: do not blame the peer
        text = truncate_utf8(str(exc) or type(exc).__name__)
        self._out.clear()
        self._cstate.close()
        return encode_frame(FrameType.ERROR, Error(code, text).encode())

    @property
    def failure(self) -> ProtocolError | None:
        """The protocol error that failed this connection (received bytes
        broke a rule), or None: from then on nothing but an ERROR frame may
        be sent."""
        return self._error

    def check_send(self, ftype: FrameType) -> None:
        """LocalProtocolError unless a frame of *ftype* may be sent now
        (for a sender that writes stream frames itself, e.g. in C)."""
        self._check_send(ftype)

    def _check_send(self, ftype: FrameType) -> None:
        if self._error is not None:
            raise LocalProtocolError(f"cannot send {ftype.name}: the connection failed "
                                     f"({self._error}); send error_frame() and close")
        try:
            self._cstate.next_state(self.our_role, ftype)
        except ProtocolError as e:
            raise LocalProtocolError(f"cannot send: {e}") from None

    def _emit(self, ftype: FrameType, parts: list) -> bytes | list:
        length = sum(memoryview(p).nbytes for p in parts)
        limit = payload_limit(ftype, self.max_frame, self.max_control)
        if length > limit:
            raise LocalProtocolError(f"{ftype.name} payload of {length} bytes is above the "
                                     f"maximum frame of {limit}")
        packed = None
        if self.compressor is not None and ftype in COMPRESSIBLE_TYPES:
            packed = encode_compressed(ftype, parts, self.compressor, frame_flags(ftype))
        if packed is not None:
            self.compressed_in += length
            self.compressed_out += memoryview(packed[1]).nbytes
            header, parts = packed[0], packed[1:]
        else:
            header = encode_header(ftype, parts, frame_flags(ftype))
        self._cstate.process(self.our_role, ftype)
        queued = self.data_to_send()
        if ftype in BULK_TYPES:
            return ([queued] if queued else []) + [header, *parts]
        return queued + header + b"".join(parts)

    def _maybe_queue_auth(self) -> None:
        # Our AUTH needs the peer's nonce and must follow our HELLO.
        if self.peer is not None and self.state is AUTHENTICATING:
            mac = auth_mac(self._secret, self.our_role, self.peer.nonce, self.nonce, self.resource)
            self._out += encode_frame(FrameType.AUTH, Auth(mac).encode())
            self._cstate.process(self.our_role, FrameType.AUTH)

    # -- incoming ---------------------------------------------------------

    def receive_data(self, data) -> None:
        """Hand over bytes received from the peer; ``b""`` means the peer closed."""
        self._decoder.feed(data)

    def receive_buffer(self):
        """A writable view to receive the next bytes into directly (the rest
        of a large payload), or None: then use :meth:`receive_data`."""
        return self._decoder.payload_space()

    def received_into(self, n: int) -> None:
        """*n* bytes were received into :meth:`receive_buffer` (0: closed)."""
        self._decoder.received_into(n)

    def next_event(self):
        """The next event: a message, NEED_DATA, or CLOSED.

        Raises ProtocolError on any violation; the error is sticky (every
        later call raises it again). Close the connection then, after sending
        ``error_frame(exc)`` if you want the peer to know why.
        """
        if self._error is not None:
            raise self._error
        if self.state is CLOSED_STATE:
            return CLOSED
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if self._decoder.at_eof:
                    self._cstate.close()
                    return CLOSED
                return NEED_DATA
            event = decode_message(frame.type, frame.payload)
            self._handle(event)
        except ProtocolError as e:
            self._error = e
            raise
        return event

    def _check_header(self, ftype: FrameType, flags: int, length: int) -> None:
        # Before any payload is buffered: refuse frames the peer may not send now.
        self._cstate.next_state(self.peer_role, ftype)

    def _handle(self, event: Message) -> None:
        if isinstance(event, Hello):
            self._on_hello(event)
        elif isinstance(event, Auth):
            self._on_auth(event)
        elif isinstance(event, State):
            self._on_state(event)
        elif isinstance(event, Error):
            self._cstate.process(self.peer_role, FrameType.ERROR)
            self._out.clear()
        else:
            self._cstate.process(self.peer_role, event.TYPE)

    def _on_hello(self, hello: Hello) -> None:
        self._cstate.next_state(self.peer_role, FrameType.HELLO)
        if hello.proto_version != PROTOCOL_VERSION:
            raise ProtocolError(f"peer node {hello.node} speaks protocol version "
                                f"{hello.proto_version}, this node speaks {PROTOCOL_VERSION}",
                                ErrorCode.VERSION)
        if hello.resource != self.resource:
            raise ProtocolError(f"peer node {hello.node} serves resource {hello.resource!r}, "
                                f"this node serves {self.resource!r}", ErrorCode.WRONG_RESOURCE)
        if hello.role == self.our_role:
            raise ProtocolError(f"peer node {hello.node} is also {hello.role} of resource "
                                f"{self.resource!r}: two {hello.role}s refused",
                                ErrorCode.ROLE_CONFLICT)
        if hello.nonce == self.nonce:
            raise ProtocolError(f"peer node {hello.node} sent our own nonce back "
                                f"(a reflected HELLO)", ErrorCode.AUTH_FAILED)
        self._cstate.process(self.peer_role, FrameType.HELLO)
        self.peer = hello
        self._maybe_queue_auth()

    def _on_auth(self, auth: Auth) -> None:
        self._cstate.next_state(self.peer_role, FrameType.AUTH)
        assert self.peer is not None  # the peer is AUTHENTICATING: its HELLO was processed
        if self.state is IDLE:
            raise ProtocolError(f"peer node {self.peer.node} sent AUTH before our HELLO: it "
                                f"cannot have answered our challenge", ErrorCode.AUTH_FAILED)
        if not verify_mac(self._secret, self.peer_role, self.nonce, self.peer.nonce,
                          self.resource, auth.mac):
            raise ProtocolError(f"authentication failed: peer node {self.peer.node} does not "
                                f"know the shared secret of resource {self.resource} (the "
                                f"secrets configured on the two nodes differ)",
                                ErrorCode.AUTH_FAILED)
        self._cstate.process(self.peer_role, FrameType.AUTH)

    def _on_state(self, st: State) -> None:
        self._cstate.next_state(self.peer_role, FrameType.STATE)
        if st.role != self.peer_role:
            node = self.peer.node if self.peer else "?"
            raise ProtocolError(f"STATE: peer node {node} reports role {st.role} but its "
                                f"HELLO said {self.peer_role}", ErrorCode.ROLE_CONFLICT)
        self.peer_state_msg = st
        self._maybe_check_states()
        self._cstate.process(self.peer_role, FrameType.STATE)

    def _maybe_check_states(self) -> None:
        if self.check_state and self.local_state_msg and self.peer_state_msg:
            try:
                check_peer_state(self.local_state_msg, self.peer_state_msg)
            except ProtocolError as e:
                self._error = e
                raise

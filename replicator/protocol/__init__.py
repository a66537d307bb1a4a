"""The Duplex wire protocol, sans-IO (the h11 way): no sockets, threads or clocks here.

- ``frames``: the frame codec (header, CRC32C, streaming decoder, zero-copy encoder)
- ``messages``: one immutable class per frame type, strict encode/decode
- ``auth``: the two-way HMAC-SHA256 challenge
- ``state``: the connection state machine, as a table
- ``compat``: can two STATEs replicate one resource?
- ``connection``: the Connection tying them together, for either role
- ``errors``: ProtocolError, FrameError, LocalProtocolError, ErrorCode
"""
from replicator.protocol.compat import check_peer_state
from replicator.protocol.connection import CLOSED, NEED_DATA, Connection
from replicator.protocol.errors import ErrorCode, FrameError, LocalProtocolError, ProtocolError
from replicator.protocol.frames import (DEFAULT_MAX_FRAME, Frame, FrameDecoder, FrameType,
                                        encode_frame, encode_header)
from replicator.protocol.messages import (PRIMARY, SECONDARY, Ack, Auth, Data, Error, Flush,
                                          Hello, IncrBegin, IncrCommit, IncrData, Message, Ping,
                                          Pong, State, Tokens)
from replicator.protocol.state import PartyState

__all__ = [
    "Ack", "Auth", "CLOSED", "Connection", "DEFAULT_MAX_FRAME", "Data", "Error", "ErrorCode",
    "Flush", "Frame", "FrameDecoder", "FrameError", "FrameType", "Hello", "IncrBegin",
    "IncrCommit", "IncrData", "LocalProtocolError", "Message", "NEED_DATA", "PRIMARY",
    "PartyState", "Ping", "Pong", "ProtocolError", "SECONDARY", "State", "Tokens",
    "check_peer_state", "encode_frame", "encode_header",
]

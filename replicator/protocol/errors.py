"""Exceptions of the Duplex wire protocol, and the codes an ERROR frame carries.

Three kinds of failure, as in h11:

- ``ProtocolError``: the peer (or the bytes it sent) broke the protocol. The
  caller closes the connection, optionally after sending
  ``Connection.error_frame(exc)`` so the peer learns why.
- ``FrameError``: a ``ProtocolError`` found by the frame codec (magic,
  version, type, length, CRC, truncation).
- ``LocalProtocolError``: *our* caller asked for something the protocol does
  not allow (sending DATA before the handshake, a role it does not hold).
  It is a bug in the calling code, not in the peer.

Each carries an ``ErrorCode`` so that ``error_frame`` can tell the peer what
kind of problem ended the connection.
"""
from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Codes carried by ERROR frames (u16 on the wire; unknown codes are kept as ints)."""

    PROTOCOL = 1        # malformed or out-of-state frame
    FRAME = 2           # framing: magic, version, type, length, CRC
    AUTH_FAILED = 3     # HMAC challenge failed, or a reflected nonce
    WRONG_RESOURCE = 4  # the peer serves another resource
    ROLE_CONFLICT = 5   # two primaries (or two secondaries)
    STATE_MISMATCH = 6  # resource UUID, device size or track size differ
    VERSION = 7         # protocol version not spoken here
    INTERNAL = 8        # the sender failed for a reason of its own
    SHUTDOWN = 9        # orderly close (daemon stopping, role change)
    SPLIT_BRAIN = 10    # both nodes wrote as Primary after they parted (generations)


class ProtocolError(Exception):
    """The peer broke the protocol; the message names what and where.

    ``code`` is the ErrorCode an ERROR frame about this problem carries.
    """

    default_code = ErrorCode.PROTOCOL

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = int(self.default_code if code is None else code)


class FrameError(ProtocolError):
    """A frame failed the codec's checks (magic, version, type, length, CRC)."""

    default_code = ErrorCode.FRAME


class LocalProtocolError(ProtocolError):
    """Our own caller tried something the protocol forbids (a bug on this side)."""

    default_code = ErrorCode.INTERNAL

"""Mutual authentication: an HMAC-SHA256 challenge in both directions.

Each side's HELLO carries a fresh 32-byte nonce (its challenge). Each side
then proves it knows the resource's shared secret by sending AUTH with::

    mac = HMAC-SHA256(secret,
                      b"duplex-auth-v1"   14 bytes, domain separation
                      || own_role         1 byte: 1 primary, 2 secondary
                      || peer_nonce       32 bytes: the challenge it answers
                      || own_nonce        32 bytes: its own challenge
                      || resource)        UTF-8 name, last so no length is needed

Why a reflected MAC cannot pass: the verifier recomputes the MAC with the
*peer's* role and the nonces in the peer's order (our nonce as the
challenge answered). A MAC we sent ourselves was computed with our role and
the nonces the other way round, so bouncing it back (or answering our
challenge with our own MAC from a second connection) fails on the role byte
and on the nonce order. Binding the resource name stops a MAC for one
resource from being replayed on another that shares the secret, and fresh
nonces on both sides stop replays across connections. The Connection also
refuses a peer HELLO that echoes our own nonce.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from replicator.protocol.messages import MAC_SIZE, NONCE_SIZE, ROLE_CODES

AUTH_DOMAIN = b"duplex-auth-v1"


def new_nonce() -> bytes:
    """A fresh random challenge for our HELLO."""
    return os.urandom(NONCE_SIZE)


def auth_mac(secret: bytes, own_role: str, peer_nonce: bytes, own_nonce: bytes,
             resource: str) -> bytes:
    """The AUTH mac a node of *own_role* sends, answering *peer_nonce* (see module doc)."""
    if len(peer_nonce) != NONCE_SIZE or len(own_nonce) != NONCE_SIZE:
        raise ValueError(f"nonces must be {NONCE_SIZE} bytes "
                         f"(got {len(peer_nonce)} and {len(own_nonce)})")
    msg = (AUTH_DOMAIN + bytes([ROLE_CODES[own_role]]) + bytes(peer_nonce)
           + bytes(own_nonce) + resource.encode("utf-8"))
    mac = hmac.new(bytes(secret), msg, hashlib.sha256).digest()
    assert len(mac) == MAC_SIZE
    return mac


def verify_mac(secret: bytes, peer_role: str, our_nonce: bytes, peer_nonce: bytes,
               resource: str, mac: bytes) -> bool:
    """True if *mac* is what a *peer_role* node knowing *secret* answers to *our_nonce*.

    Constant-time comparison (hmac.compare_digest).
    """
    expected = auth_mac(secret, peer_role, our_nonce, peer_nonce, resource)
    return hmac.compare_digest(expected, bytes(mac))

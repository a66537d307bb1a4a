"""Mutual HMAC authentication: only holders of the resource's secret get past AUTH."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from replicator.protocol import Auth, Connection, ErrorCode, Hello, ProtocolError
from replicator.protocol.auth import AUTH_DOMAIN, auth_mac, verify_mac
from replicator.protocol.frames import FrameType, encode_frame
from replicator.protocol.state import AUTH_SENT, NEGOTIATING

N_P = b"P" * 32
N_S = b"S" * 32


def test_mac_is_hmac_sha256_over_domain_role_peer_nonce_own_nonce_resource():
    expected = hmac.new(b"key", b"duplex-auth-v1" + b"\x01" + N_S + N_P + b"r0",
                        hashlib.sha256).digest()
    assert AUTH_DOMAIN == b"duplex-auth-v1"
    assert auth_mac(b"key", "primary", N_S, N_P, "r0") == expected


def test_mac_binds_role_nonce_order_resource_and_secret():
    base = auth_mac(b"key", "primary", N_S, N_P, "r0")
    assert base != auth_mac(b"key", "secondary", N_S, N_P, "r0")
    assert base != auth_mac(b"key", "primary", N_P, N_S, "r0")
    assert base != auth_mac(b"key", "primary", N_S, N_P, "r1")
    assert base != auth_mac(b"kez", "primary", N_S, N_P, "r0")


def test_verify_accepts_the_peer_answer_and_refuses_our_own_reflected():
    # We are the primary with nonce N_P; the secondary's honest answer:
    answer = auth_mac(b"key", "secondary", N_P, N_S, "r0")
    assert verify_mac(b"key", "secondary", N_P, N_S, "r0", answer)
    # Our own MAC, bounced back at us, must not pass as the secondary's.
    ours = auth_mac(b"key", "primary", N_S, N_P, "r0")
    assert not verify_mac(b"key", "secondary", N_P, N_S, "r0", ours)


def exchange_hellos(p, s):
    """Both sides say HELLO first; return (p's AUTH, s's AUTH), not yet delivered."""
    p_hello, s_hello = p.initiate(), s.initiate()
    s.receive_data(p_hello)
    assert isinstance(s.next_event(), Hello)
    p.receive_data(s_hello)
    assert isinstance(p.next_event(), Hello)
    return p.data_to_send(), s.data_to_send()


@pytest.mark.parametrize("wrong_side", ["primary", "secondary"])
def test_a_wrong_secret_on_either_side_fails_authentication_on_both(proto, wrong_side):
    p_secret = b"not the secret" if wrong_side == "primary" else proto.SECRET
    s_secret = b"not the secret" if wrong_side == "secondary" else proto.SECRET
    p, s = proto.make_pair(p_secret, s_secret)
    p_auth, s_auth = exchange_hellos(p, s)
    for checker, auth, sender in ((p, s_auth, "beta"), (s, p_auth, "alpha")):
        checker.receive_data(auth)
        with pytest.raises(ProtocolError, match=f"^authentication failed: peer node {sender} does "
                                                f"not know the shared secret of resource r0") as exc:
            checker.next_event()
        assert exc.value.code == ErrorCode.AUTH_FAILED
        assert checker.state is AUTH_SENT and checker.peer_state is not AUTH_SENT


def test_the_same_secret_authenticates_both_sides(proto):
    p, s = proto.make_pair()
    p_auth, s_auth = exchange_hellos(p, s)
    assert proto.deliver(p, s_auth) == [Auth(auth_mac(proto.SECRET, "secondary", proto.P_NONCE,
                                                      proto.S_NONCE, "r0"))]
    assert len(proto.deliver(s, p_auth)) == 1
    assert p.state is p.peer_state is s.state is s.peer_state is NEGOTIATING


def test_the_failing_side_tells_the_peer_why_and_both_close(proto):
    p, s = proto.make_pair(b"wrong", proto.SECRET)
    p_auth, _ = exchange_hellos(p, s)
    s.receive_data(p_auth)
    with pytest.raises(ProtocolError) as exc:
        s.next_event()
    events = proto.deliver(p, s.error_frame(exc.value))
    assert events[0].code == ErrorCode.AUTH_FAILED
    assert "peer node alpha does not know the shared secret of resource r0" in events[0].message
    assert str(p.state) == str(s.state) == "CLOSED"


def test_a_reflected_mac_does_not_authenticate_an_attacker(proto):
    # The attacker, posing as a secondary, gets our AUTH (computed over its
    # nonce) and sends it straight back as its own proof.
    p, _ = proto.make_pair()
    attacker_nonce = b"A" * 32
    p.initiate()
    hello = Hello(1, "r0", "mallory", "secondary", attacker_nonce)
    p.receive_data(encode_frame(FrameType.HELLO, hello.encode()))
    assert isinstance(p.next_event(), Hello)
    our_auth = p.data_to_send()
    assert our_auth[5] == FrameType.AUTH
    p.receive_data(our_auth)
    with pytest.raises(ProtocolError, match="authentication failed: peer node mallory"):
        p.next_event()
    assert p.state is AUTH_SENT and p.peer_state is not NEGOTIATING


def test_a_hello_echoing_our_nonce_is_refused(proto):
    p, _ = proto.make_pair()
    p.initiate()
    hello = Hello(1, "r0", "mallory", "secondary", p.nonce)
    p.receive_data(encode_frame(FrameType.HELLO, hello.encode()))
    with pytest.raises(ProtocolError, match="peer node mallory sent our own nonce back") as exc:
        p.next_event()
    assert exc.value.code == ErrorCode.AUTH_FAILED
    assert p.data_to_send() == b"", "AUTH was sent to a reflected HELLO"


def test_auth_before_our_hello_is_refused(proto):
    p, s = proto.make_pair()
    # Peer says HELLO and immediately a (necessarily guessed) AUTH; we have not initiated.
    hello = Hello(1, "r0", "beta", "secondary", proto.S_NONCE)
    guess = Auth(auth_mac(proto.SECRET, "secondary", b"\0" * 32, proto.S_NONCE, "r0"))
    p.receive_data(encode_frame(FrameType.HELLO, hello.encode())
                   + encode_frame(FrameType.AUTH, guess.encode()))
    assert isinstance(p.next_event(), Hello)
    with pytest.raises(ProtocolError, match="peer node beta sent AUTH before our HELLO"):
        p.next_event()


def test_fresh_random_nonces_differ_between_connections():
    a = Connection("primary", "r0", "alpha", b"k")
    b = Connection("primary", "r0", "alpha", b"k")
    assert len(a.nonce) == 32 and a.nonce != b.nonce


def test_an_empty_secret_is_refused_naming_the_resource():
    with pytest.raises(ValueError, match="shared secret of resource 'r0' must be non-empty"):
        Connection("primary", "r0", "alpha", b"")

"""The ACK's optional disk state: a secondary whose image fails (or
recovers) after the handshake tells its primary, without a new STATE.
No sockets: messages and two Connections back to back."""
from __future__ import annotations

import pytest

from replicator.protocol import Ack, ProtocolError
from replicator.protocol.frames import FrameType
from replicator.protocol.messages import DISK_CODES, State

REASON = "applying seq 103: No space left on device (image /srv/r0.img)"


def test_plain_ack_keeps_its_16_byte_form_and_says_nothing_about_the_disk():
    a = Ack(10, 9)
    assert len(a.encode()) == 16
    assert Ack.decode(a.encode()) == a and a.disk is None


def test_ack_with_a_failed_disk_and_its_reason_round_trips():
    a = Ack(104, 102, "Failed", REASON)
    raw = a.encode()
    assert len(raw) == 16 + 4 + len(REASON.encode())
    assert Ack.decode(raw) == a


def test_ack_with_a_recovered_disk_and_no_reason_round_trips():
    a = Ack(104, 104, "Consistent")
    assert Ack.decode(a.encode()) == a


def test_failed_is_a_disk_state_a_state_frame_can_carry():
    s = State(b"\1" * 16, b"\2" * 16, 1 << 20, 4096, "secondary", "Failed")
    assert State.decode(s.encode()).disk == "Failed"


@pytest.mark.parametrize("mangle,message", [
    (lambda raw: raw[:16] + bytes([99]) + raw[17:], "ACK: field disk has unknown value 99"),
    (lambda raw: raw[:17] + b"\1" + raw[18:], "ACK: field reserved is not zero"),
    (lambda raw: raw + b"x", "ACK: payload is 30 bytes, expected 29"),
    (lambda raw: raw[:-1], "ACK: payload is 28 bytes, expected 29"),
    (lambda raw: raw[:-3] + b"\xff\xfe\xfd", "ACK: field disk_reason is not valid UTF-8"),
])
def test_a_malformed_disk_part_is_refused_and_named(mangle, message):
    raw = Ack(1, 1, "Failed", "no space.").encode()
    assert len(raw) == 29
    with pytest.raises(ProtocolError, match=f"^{message}"):
        Ack.decode(mangle(raw))


def test_a_reason_without_a_disk_state_cannot_be_built():
    with pytest.raises(ProtocolError, match="ACK: field disk_reason is set without a disk state"):
        Ack(1, 1, None, "why")
    with pytest.raises(ProtocolError, match="ACK: field disk is 'Broken'"):
        Ack(1, 1, "Broken")


def test_the_disk_state_crosses_an_established_connection(proto, established):
    p, s = established
    sent = Ack(7, 5, "Failed", REASON)
    assert proto.deliver(p, s.send(sent)) == [sent]
    assert proto.deliver(p, s.send(Ack(7, 7, "Consistent"))) == [Ack(7, 7, "Consistent")]
    assert FrameType.ACK == Ack.TYPE and DISK_CODES["Failed"] == 5

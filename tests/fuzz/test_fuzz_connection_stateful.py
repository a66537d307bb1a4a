"""Two Connections talking, driven by hypothesis.stateful: random sends
of what each role may send, deliveries cut at random byte counts, a
flipped bit in flight, sends the state table forbids, and an ERROR
closing the link. The rules checked after every step: the receiver gets
exactly the messages sent, in order, never one that was damaged on the way
(a flip ends in a ProtocolError or a stall, never in a wrong event), and a
forbidden send is refused without changing either side's state.

The one-sided fuzz of the same Connection, with its seeds, is the
``connection`` target of tests/fuzz/targets.py."""
from __future__ import annotations

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fuzz.targets import _conn, _flat, _records_payload, _state, _tokens_payload
from replicator.protocol import messages as m
from replicator.protocol.connection import CLOSED, NEED_DATA
from replicator.protocol.errors import LocalProtocolError, ProtocolError
from replicator.records import OP_WRITE, encode_record

U64 = st.integers(0, (1 << 64) - 1)


def _data(seqs: list[int]) -> m.Data:
    return m.Data(b"".join(encode_record(s, s, (s % 64) * 4096, 9, OP_WRITE, bytes([s & 255]) * 9)
                           for s in seqs))


PRIMARY_MSGS = st.one_of(
    st.builds(m.Flush, U64),
    st.builds(m.Ping, U64, U64),
    st.builds(m.Pong, U64, U64, U64),
    st.builds(m.IncrBegin, U64, U64, U64, U64),
    st.builds(m.IncrData, U64, st.integers(0, 1 << 40), st.binary(min_size=1, max_size=300)),
    st.builds(m.IncrZero, U64, U64, st.integers(1, (1 << 32) - 1)),
    st.builds(m.IncrCommit, U64, U64),
    st.builds(m.VerifyReq, U64, U64, st.integers(1, m.MAX_VERIFY_TRACKS), U64),
    st.lists(st.integers(1, 1 << 40), min_size=1, max_size=4).map(_data),
    st.just(m.Tokens(_tokens_payload(_records_payload(3)))),
)
SECONDARY_MSGS = st.one_of(
    st.builds(m.Ack, U64, U64),
    st.builds(m.Ack, U64, U64, st.sampled_from(m.DISK_STATES), st.text(max_size=40)),
    st.builds(m.Ping, U64, U64),
    st.builds(m.Pong, U64, U64, U64),
    st.builds(m.VerifySums, U64, U64, U64, st.lists(U64, min_size=1, max_size=8).map(tuple)),
    st.integers(1, 200).flatmap(lambda n: st.binary(min_size=(n + 7) // 8, max_size=(n + 7) // 8)
                                .map(lambda b: m.OosBitmap(4096, n, b))),
)
FORBIDDEN = {m.PRIMARY: [m.Ack(1, 1), m.OosBitmap(4096, 8, b"\x01")],
             m.SECONDARY: [m.Flush(1), _data([1]), m.IncrCommit(1, 1)]}
OTHER = {m.PRIMARY: m.SECONDARY, m.SECONDARY: m.PRIMARY}


class TwoConnections(RuleBasedStateMachine):
    """The primary's and the secondary's Connection with the bytes in
    flight between them, per direction (keyed by the sender's role)."""

    @initialize()
    def handshake(self) -> None:
        self.conns = {m.PRIMARY: _conn(m.PRIMARY), m.SECONDARY: _conn(m.SECONDARY)}
        self.wire = {r: bytearray(c.initiate()) for r, c in self.conns.items()}
        self.sent: dict[str, list] = {m.PRIMARY: [], m.SECONDARY: []}
        self.got: dict[str, list] = {m.PRIMARY: [], m.SECONDARY: []}
        self.damaged = {m.PRIMARY: False, m.SECONDARY: False}   # a flip in flight
        self.failed = {m.PRIMARY: False, m.SECONDARY: False}    # the receiver raised
        self.closed = False
        self.closed_by: str | None = None
        for _ in range(6):
            for role in self.conns:
                self._deliver(OTHER[role], len(self.wire[OTHER[role]]))
                c = self.conns[role]
                if c.local_state_msg is None and str(c.state) == "NEGOTIATING":
                    self.wire[role] += _flat(c.send(_state(role)))
        assert all(c.established for c in self.conns.values()), \
            {r: str(c.state) for r, c in self.conns.items()}
        self.got = {m.PRIMARY: [], m.SECONDARY: []}  # the handshake's events are not counted

    def _deliver(self, sender: str, n: int) -> None:
        """Hand up to *n* in-flight bytes from *sender* to the other side
        and take every event they complete."""
        rx = self.conns[OTHER[sender]]
        chunk, self.wire[sender][:n] = bytes(self.wire[sender][:n]), b""
        if not chunk or self.failed[sender]:
            return
        rx.receive_data(chunk)
        while True:
            try:
                ev = rx.next_event()
            except ProtocolError as e:
                assert not isinstance(e, LocalProtocolError), e
                assert self.damaged[sender], f"an undamaged stream failed: {e}"
                self.failed[sender] = True
                return
            self.wire[OTHER[sender]] += rx.data_to_send()  # its AUTH, in the handshake
            if ev is NEED_DATA or ev is CLOSED:
                return
            if not isinstance(ev, (m.Hello, m.Auth, m.State)):
                self.got[sender].append(ev)

    def _can_send(self, role: str) -> bool:
        # a side whose reader failed may send nothing but an ERROR
        c = self.conns[role]
        return not self.closed and c.established and c.failure is None

    @precondition(lambda self: self._can_send(m.PRIMARY))
    @rule(msg=PRIMARY_MSGS)
    def primary_sends(self, msg) -> None:
        self.wire[m.PRIMARY] += _flat(self.conns[m.PRIMARY].send(msg))
        self.sent[m.PRIMARY].append(msg)

    @precondition(lambda self: self._can_send(m.SECONDARY))
    @rule(msg=SECONDARY_MSGS)
    def secondary_sends(self, msg) -> None:
        self.wire[m.SECONDARY] += _flat(self.conns[m.SECONDARY].send(msg))
        self.sent[m.SECONDARY].append(msg)

    @rule(role=st.sampled_from([m.PRIMARY, m.SECONDARY]), data=st.data())
    def forbidden_send_is_refused(self, role: str, data) -> None:
        c = self.conns[role]
        before = (c.state, c.peer_state, len(self.wire[role]))
        msg = data.draw(st.sampled_from(FORBIDDEN[role]))
        try:
            c.send(msg)
        except LocalProtocolError:
            pass
        else:
            raise AssertionError(f"the {role} was allowed to send {msg!r}")
        assert (c.state, c.peer_state, len(self.wire[role])) == before

    @rule(sender=st.sampled_from([m.PRIMARY, m.SECONDARY]), n=st.integers(1, 5000))
    def deliver(self, sender: str, n: int) -> None:
        self._deliver(sender, n)

    @precondition(lambda self: any(self.wire.values()))
    @rule(sender=st.sampled_from([m.PRIMARY, m.SECONDARY]), where=st.floats(0, 1),
          bit=st.integers(0, 7))
    def flip_a_bit_in_flight(self, sender: str, where: float, bit: int) -> None:
        w = self.wire[sender]
        if not w:
            return
        w[min(len(w) - 1, int(where * len(w)))] ^= 1 << bit
        self.damaged[sender] = True

    @precondition(lambda self: not self.closed)
    @rule(role=st.sampled_from([m.PRIMARY, m.SECONDARY]))
    def close_with_an_error(self, role: str) -> None:
        err = ProtocolError("test closes the link")
        self.wire[role] += self.conns[role].error_frame(err)
        self.sent[role].append(m.Error(err.code, str(err)))
        self.closed = True
        self.closed_by = role
        assert str(self.conns[role].state) == "CLOSED"

    @invariant()
    def receivers_got_a_prefix_of_what_was_sent(self) -> None:
        for sender in (m.PRIMARY, m.SECONDARY):
            got, sent = self.got[sender], self.sent[sender]
            assert got == sent[:len(got)], (f"from the {sender}: received {got[-3:]!r}, "
                                            f"sent {sent[:len(got)][-3:]!r}")

    def teardown(self) -> None:
        # Whatever was still in flight arrives: an undamaged direction
        # delivers every message sent.
        for sender in (m.PRIMARY, m.SECONDARY):
            self._deliver(sender, len(self.wire[sender]))
            # (the side that closed takes nothing more in)
            if not self.damaged[sender] and self.closed_by != OTHER[sender]:
                assert self.got[sender] == self.sent[sender], (
                    f"from the {sender}: {len(self.got[sender])} of "
                    f"{len(self.sent[sender])} messages arrived")


TwoConnections.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_two_connections = TwoConnections.TestCase

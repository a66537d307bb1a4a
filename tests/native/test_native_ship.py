"""The primary's C streaming loop (native/ship.c) through Core.ship():
frames on the wire, round robin over sockets, the batching rule, idle
returns, drops, socket failures and backpressure on non-blocking sockets.

Every test reads the other end of a socket pair and decodes what arrived
with the Python codec (FrameDecoder, Tokens, Data), so the C framing is
checked against the protocol's own reference implementation.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

from replicator.native.core import Core
from replicator.protocol.frames import HEADER_SIZE as FRAME_HEADER, FrameDecoder, FrameType
from replicator.protocol.messages import Data, Tokens
from replicator.records import HEADER_SIZE as REC_HEADER, OP_FLUSH, OP_TRIM, OP_WRITE, OP_ZERO
from replicator.records import Token, padded

MiB = 1 << 20


# ---- helpers ----------------------------------------------------------------

@dataclass(frozen=True)
class Sent:
    """What the test asked the core to do, to compare with what arrived."""

    seq: int
    op: int
    offset: int
    length: int
    data: bytes


@dataclass(frozen=True)
class Span:
    """One TOKENS + DATA frame pair as decoded from the wire."""

    tokens: Tokens
    data: Data

    @property
    def records(self) -> list[tuple[Token, bytes]]:
        return [(t, bytes(d)) for t, d in self.data.records]


def rec_size(data_len: int) -> int:
    """Bytes one record takes in the ring and in a DATA frame."""
    return REC_HEADER + padded(data_len)


def wire_bytes(spans: int, records: int, nbytes: int) -> int:
    """Bytes ship() puts on the wire for a ShipResult's counters: two frame
    headers per span, a 48-byte token per record, and the records."""
    return spans * 2 * FRAME_HEADER + records * REC_HEADER + nbytes


def decode_spans(raw: bytes, eof: bool = True) -> tuple[list[Span], list[int]]:
    """Decode a byte stream into TOKENS/DATA pairs; also the stream offsets
    at which frames end. Fails on a half frame, a type out of turn, or a
    TOKENS payload that is not exactly the headers of the DATA records."""
    dec = FrameDecoder()
    dec.feed(raw)
    if eof:
        dec.feed(b"")
    frames = []
    ends = []
    pos = 0
    while (f := dec.next_frame()) is not None:
        frames.append(f)
        pos += FRAME_HEADER + len(f.payload)
        ends.append(pos)
    assert dec.buffered == 0, f"{dec.buffered} bytes of a half-written frame at the end"
    if eof:
        assert dec.at_eof
    types = [f.type for f in frames]
    assert types == [FrameType.TOKENS, FrameType.DATA] * (len(frames) // 2), (
        f"frames must alternate TOKENS, DATA; got {[t.name for t in types]}")
    spans = []
    for tf, df in zip(frames[::2], frames[1::2]):
        toks = Tokens.decode(tf.payload)
        data = Data.decode(df.payload)  # checks every record's structure and CRC
        headers = bytearray()
        pos = 0
        for tok, _ in data.records:
            headers += data.payload[pos:pos + REC_HEADER]
            pos += tok.size
        assert pos == len(data.payload)
        assert toks.payload == bytes(headers), "TOKENS must be the headers of the DATA records"
        spans.append(Span(toks, data))
    return spans, ends


def all_records(spans: list[Span]) -> list[tuple[Token, bytes]]:
    return [r for s in spans for r in s.records]


def assert_records_match(got: list[tuple[Token, bytes]], sent: list[Sent]) -> None:
    """The records arrived in seq order and carry what was asked."""
    assert [t.seq for t, _ in got] == [s.seq for s in sent]
    for (tok, data), s in zip(got, sent):
        assert (tok.op, tok.offset, tok.length) == (s.op, s.offset, s.length), f"seq {s.seq}"
        assert data == s.data, f"seq {s.seq}: data differs"


def recv_available(sock: socket.socket) -> bytes:
    """Everything already queued on *sock*, without waiting for more."""
    out = bytearray()
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return bytes(out)


class Reader(threading.Thread):
    """Reads a socket into a buffer until EOF or stop(); optionally slowly
    (chunk bytes per recv, then a pause) to make the sender wait."""

    def __init__(self, sock: socket.socket, chunk: int = 1 << 20, pause: float = 0.0):
        super().__init__(daemon=True)
        self.sock = sock
        self.chunk = chunk
        self.pause = pause
        self.lock = threading.Lock()
        self.buf = bytearray()
        self.first_byte_at: float | None = None
        self.eof = False
        self._stop_evt = threading.Event()
        sock.settimeout(0.02)

    def run(self) -> None:
        while not self._stop_evt.is_set():
            try:
                chunk = self.sock.recv(self.chunk)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                self.eof = True
                return
            with self.lock:
                if self.first_byte_at is None:
                    self.first_byte_at = time.monotonic()
                self.buf += chunk
            if self.pause:
                time.sleep(self.pause)

    def data(self) -> bytes:
        with self.lock:
            return bytes(self.buf)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5)


@pytest.fixture
def sockpair() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    """Factory for AF_UNIX stream socket pairs, all closed at teardown."""
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        made.extend((a, b))
        return a, b

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.fixture
def reader() -> Iterator[Callable[..., Reader]]:
    """Factory for Reader threads, all stopped and joined at teardown."""
    made: list[Reader] = []

    def make(sock: socket.socket, chunk: int = 1 << 20, pause: float = 0.0) -> Reader:
        r = Reader(sock, chunk, pause)
        made.append(r)
        r.start()
        return r

    try:
        yield make
    finally:
        for r in made:
            r.stop()


def write(core: Core, log: list[Sent], data: bytes, offset: int, fua: bool = False) -> None:
    res = core.write(data, offset, fua=fua)
    assert res.queued
    log.append(Sent(res.seq, OP_WRITE, offset, len(data), data))


# ---- 1. frames --------------------------------------------------------------

def test_spans_go_out_as_tokens_then_data_frames_carrying_the_writes(make_rig, sockpair):
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    sent: list[Sent] = []
    write(core, sent, os.urandom(1000), 0)
    write(core, sent, os.urandom(5000), 12345)       # alone above batch_bytes
    r = core.trim(8192, 4096)
    sent.append(Sent(r.seq, OP_TRIM, 8192, 4096, b""))
    r = core.zero(100_000, 10)
    sent.append(Sent(r.seq, OP_ZERO, 100_000, 10, b""))
    r = core.flush()
    sent.append(Sent(r.seq, OP_FLUSH, 0, 0, b""))
    write(core, sent, b"xyz", 4095, fua=True)        # unaligned, padded to 8
    ring_bytes = sum(rec_size(len(s.data)) for s in sent)
    assert core.ring_stats["unsent_bytes"] == ring_bytes

    res = core.ship([a.fileno()], 0, 0.0, 4096, 0.2)

    assert res.stop == "timeout"
    assert (res.errnum, res.next_fd) == (0, 0)
    spans, _ = decode_spans(recv_available(b), eof=False)
    got = all_records(spans)
    assert_records_match(got, sent)
    # Whole records up to batch_bytes per span, one record when it alone is larger.
    for s in spans:
        assert len(s.data.payload) <= 4096 or s.data.count == 1
    assert [s.data.count for s in spans] == [1, 1, 4]
    assert (res.spans, res.records, res.bytes) == (len(spans), len(sent), ring_bytes)
    assert res.samples == [(s.records[-1][0].seq, s.records[0][0].ts_ns) for s in spans]
    assert core.ring_stats["unsent_bytes"] == 0

    # The DATA payloads are the ring's bytes, unchanged: send them again by hand.
    assert core.rewind(sent[0].seq - 1)
    again = bytearray()
    while span := core.peek(1 << 30):
        again += span
        core.advance(len(span))
    assert b"".join(bytes(s.data.payload) for s in spans) == bytes(again)


def test_samples_keep_the_last_seq_when_there_are_more_spans_than_room(make_rig, sockpair, reader):
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    rd = reader(b)
    seqs = [core.write(b"s" * 8, 8 * i).seq for i in range(1100)]  # 1100 one-record spans

    res = core.ship([a.fileno()], 0, 0.0, 1, 0.5)

    assert (res.stop, res.spans, res.records) == ("timeout", 1100, 1100)
    assert len(res.samples) == 1024
    assert [s[0] for s in res.samples[:-1]] == seqs[:1023]
    assert res.samples[-1][0] == seqs[-1], "the last sample is stretched to the newest span"
    expected = wire_bytes(res.spans, res.records, res.bytes)
    deadline = time.monotonic() + 5
    while len(rd.data()) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    spans, _ = decode_spans(rd.data(), eof=False)
    assert [t.seq for t, _ in all_records(spans)] == seqs


def test_ship_without_sockets_is_refused(make_rig):
    rig = make_rig()
    rig.core.write(b"x", 0)
    with pytest.raises(ValueError, match="at least one socket"):
        rig.core.ship([], 0, 0.0, 4096, 0.05)
    assert rig.core.ring_stats["unsent_bytes"] == rec_size(1)


# ---- 2. round robin ---------------------------------------------------------

def test_spans_alternate_over_the_sockets_from_first_fd(make_rig, sockpair):
    rig = make_rig()
    core = rig.core
    a0, b0 = sockpair()
    a1, b1 = sockpair()
    fds = [a0.fileno(), a1.fileno()]
    sent: list[Sent] = []
    for i in range(5):
        write(core, sent, bytes([65 + i]) * (100 + i), 1000 * i)

    res = core.ship(fds, 1, 0.0, 1, 0.1)  # batch_bytes 1: one record per span

    assert (res.stop, res.spans, res.records) == ("timeout", 5, 5)
    assert res.next_fd == 0, "five spans from index 1 end on index 1: next is 0"
    got0, _ = decode_spans(recv_available(b0), eof=False)
    got1, _ = decode_spans(recv_available(b1), eof=False)
    assert [t.seq for t, _ in all_records(got1)] == [sent[0].seq, sent[2].seq, sent[4].seq]
    assert [t.seq for t, _ in all_records(got0)] == [sent[1].seq, sent[3].seq]

    # The next call picks up where this one stopped.
    write(core, sent, b"F" * 7, 9000)
    res2 = core.ship(fds, res.next_fd, 0.0, 1, 0.1)
    assert (res2.spans, res2.next_fd) == (1, 1)
    more0, _ = decode_spans(recv_available(b0), eof=False)
    assert recv_available(b1) == b""
    assert [t.seq for t, _ in all_records(more0)] == [sent[5].seq]

    everything = sorted(all_records(got0 + got1 + more0), key=lambda r: r[0].seq)
    assert_records_match(everything, sent)  # each record exactly once, intact


# ---- 3. batching ------------------------------------------------------------

def test_a_lone_small_write_waits_for_the_interval(make_rig, sockpair, reader):
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    interval = 0.6
    sent: list[Sent] = []
    write(core, sent, b"lonely", 4096)
    wrote_at = time.monotonic()
    just_sent = time.monotonic_ns()  # as if a span had just gone out

    res = core.ship([a.fileno()], 0, interval, MiB, 0.15, just_sent)
    assert (res.stop, res.spans, res.records, res.bytes) == ("timeout", 0, 0, 0)
    assert res.last_send_ns == just_sent
    assert recv_available(b) == b""
    assert core.ring_stats["unsent_bytes"] == rec_size(6)

    rd = reader(b)
    res = core.ship([a.fileno()], 0, interval, MiB, 1.2, res.last_send_ns)
    assert (res.stop, res.spans, res.records) == ("timeout", 1, 1)
    assert rd.first_byte_at is not None
    assert rd.first_byte_at - wrote_at >= 0.9 * interval, "sent before the interval passed"
    spans, _ = decode_spans(rd.data(), eof=False)
    assert_records_match(all_records(spans), sent)


def test_a_lone_small_write_goes_once_the_interval_passed_across_short_calls(make_rig, sockpair):
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    interval = 0.3
    core.write(b"lonely", 4096)
    wrote_at = time.monotonic()
    last_send = time.monotonic_ns()  # a span had just gone out
    spans = 0
    while spans == 0 and time.monotonic() - wrote_at < 4 * interval:
        # As the shipper calls it: short calls, the last send carried over.
        res = core.ship([a.fileno()], 0, interval, MiB, 0.05, last_send)
        assert res.stop == "timeout"
        last_send = res.last_send_ns
        spans += res.spans
    assert spans == 1, f"still unsent {time.monotonic() - wrote_at:.2f}s after the write"
    assert time.monotonic() - wrote_at >= 0.9 * interval, "sent before the interval passed"


def test_a_write_after_an_idle_interval_goes_at_once(make_rig, sockpair):
    """Nothing sent for longer than the interval: no reason to wait."""
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    core.write(b"first after a pause", 0)
    # Had it waited for the 5 s interval, this 0.3 s call would send nothing.
    res = core.ship([a.fileno()], 0, 5.0, MiB, 0.3, time.monotonic_ns() - 6 * 10**9)
    assert (res.stop, res.spans, res.records) == ("timeout", 1, 1)


def test_batch_bytes_unsent_go_at_once_and_the_rest_waits(make_rig, sockpair):
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    sent: list[Sent] = []
    for i in range(3):
        write(core, sent, bytes([97 + i]) * 2000, 10_000 * i)  # 2048 bytes each in the ring

    t0 = time.monotonic()
    res = core.ship([a.fileno()], 0, 5.0, 4096, 0.3, time.monotonic_ns())
    took = time.monotonic() - t0

    # 6144 >= 4096 unsent: a full batch goes now; the 2048 left wait for the interval.
    assert (res.stop, res.spans, res.records, res.bytes) == ("timeout", 1, 2, 4096)
    assert took < 2.5
    spans, _ = decode_spans(recv_available(b), eof=False)
    assert_records_match(all_records(spans), sent[:2])
    assert core.ring_stats["unsent_bytes"] == 2048

    res = core.ship([a.fileno()], 0, 0.0, 4096, 0.05)  # interval 0: no waiting
    assert (res.spans, res.records) == (1, 1)
    spans, _ = decode_spans(recv_available(b), eof=False)
    assert_records_match(all_records(spans), sent[2:])


def test_a_batch_filled_while_waiting_for_the_interval_goes_at_once(make_rig, sockpair, reader):
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    rd = reader(b)
    interval = 1.5
    box = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "res", core.ship([a.fileno()], 0, interval, 4096, interval + 0.5,
                         time.monotonic_ns())))
    t.start()
    try:
        time.sleep(0.1)
        core.write(b"small", 0)              # ship starts waiting for the interval
        time.sleep(0.2)
        core.write(os.urandom(8000), 8192)   # now 8104 >= 4096 bytes are unsent
        filled_at = time.monotonic()
        deadline = filled_at + interval + 1
        while rd.first_byte_at is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        t.join(10)
    assert box["res"].records == 2
    assert rd.first_byte_at is not None
    assert rd.first_byte_at - filled_at < 0.5 * interval, (
        f"a full batch waited {rd.first_byte_at - filled_at:.2f}s for the interval")


# ---- 4. idle ----------------------------------------------------------------

def test_an_empty_ring_returns_timeout_after_return_after(make_rig, sockpair):
    rig = make_rig()
    a, b = sockpair()
    for interval in (0.0, 0.05):
        t0 = time.monotonic()
        res = rig.core.ship([a.fileno()], 0, interval, MiB, 0.3)
        took = time.monotonic() - t0
        assert res.stop == "timeout"
        assert (res.spans, res.records, res.bytes, res.samples) == (0, 0, 0, [])
        assert 0.25 <= took <= 1.5, f"idle ship() took {took:.3f}s for return_after 0.3s"
    assert recv_available(b) == b""


def test_an_idle_ship_wakes_for_a_write_and_sends_it(make_rig, sockpair, reader):
    rig = make_rig()
    a, b = sockpair()
    rd = reader(b)
    box: dict = {}

    def later():
        time.sleep(0.1)
        box["seq"] = rig.core.write(b"wake up", 0).seq
        box["at"] = time.monotonic()

    t = threading.Thread(target=later)
    t.start()
    try:
        res = rig.core.ship([a.fileno()], 0, 0.0, MiB, 1.0)
    finally:
        t.join(5)
    assert (res.stop, res.spans, res.records) == ("timeout", 1, 1)
    assert rd.first_byte_at is not None and rd.first_byte_at - box["at"] < 0.5
    spans, _ = decode_spans(rd.data(), eof=False)
    assert [t.seq for t, _ in all_records(spans)] == [box["seq"]]


# ---- 5. drops ---------------------------------------------------------------

def test_a_dropped_ring_returns_dropped_and_sends_nothing(make_rig, sockpair):
    rig = make_rig()
    a, b = sockpair()
    rig.core.write(b"gone", 0)
    rig.core.drop()
    t0 = time.monotonic()
    res = rig.core.ship([a.fileno()], 0, 0.0, MiB, 2.0)
    assert (res.stop, res.spans, res.records) == ("dropped", 0, 0)
    assert time.monotonic() - t0 < 1.0, "a drop is reported at once, not at return_after"
    assert recv_available(b) == b""


def test_a_ring_overflow_returns_dropped(make_rig, sockpair):
    rig = make_rig(ring_size=4096)
    a, b = sockpair()
    assert rig.core.write(os.urandom(3000), 0).queued
    assert not rig.core.write(os.urandom(3000), 4096).queued  # does not fit: ring drops
    assert rig.core.ring_stats["dropped"]
    res = rig.core.ship([a.fileno()], 0, 0.0, MiB, 1.0)
    assert (res.stop, res.spans) == ("dropped", 0)
    assert recv_available(b) == b""


def test_a_drop_during_an_idle_ship_returns_dropped_at_once(make_rig, sockpair):
    rig = make_rig()
    a, b = sockpair()
    t = threading.Timer(0.1, rig.core.drop)
    t.start()
    t0 = time.monotonic()
    try:
        res = rig.core.ship([a.fileno()], 0, 0.0, MiB, 3.0)
    finally:
        t.join(5)
    assert res.stop == "dropped"
    assert time.monotonic() - t0 < 1.5


# ---- 6. socket failure ------------------------------------------------------

def test_a_closed_peer_gives_io_with_the_failed_socket_and_no_sigpipe(make_rig, sockpair):
    rig = make_rig()
    core = rig.core
    a0, b0 = sockpair()
    a1, b1 = sockpair()
    b1.close()
    sent: list[Sent] = []
    write(core, sent, b"one", 0)
    write(core, sent, b"two!", 64)

    pipes: list[int] = []
    old = signal.signal(signal.SIGPIPE, lambda signum, frame: pipes.append(signum))
    try:
        res = core.ship([a0.fileno(), a1.fileno()], 0, 0.0, 1, 1.0)
        time.sleep(0.01)  # let a pending Python-level signal handler run
    finally:
        signal.signal(signal.SIGPIPE, old)

    assert pipes == [], "ship() raised SIGPIPE (send without MSG_NOSIGNAL)"
    assert res.stop == "io"
    assert res.errnum in (errno.EPIPE, errno.ECONNRESET), os.strerror(res.errnum)
    assert res.fd_index == 1
    assert (res.spans, res.records, res.next_fd) == (1, 1, 1)
    spans, _ = decode_spans(recv_available(b0), eof=False)
    assert_records_match(all_records(spans), sent[:1])
    # The span that failed stays unsent, to go again on another connection.
    assert core.ring_stats["unsent_bytes"] == rec_size(4)


def test_io_failure_in_a_child_with_default_sigpipe_does_not_kill_it(shm_dir):
    """With SIGPIPE at its default action (as a C host may leave it), a
    write to a closed peer must come back as EPIPE, not end the process."""
    import subprocess
    import sys
    script = f"""
import os, signal, socket, uuid
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
from replicator.native.actlog import ActivityLog
from replicator.native.bitmap import Bitmap
from replicator.native.core import Core
d = {str(shm_dir)!r}
u = uuid.uuid4().bytes
with open(d + "/dev", "wb") as f:
    f.truncate(1 << 20)
oos = Bitmap.create(d + "/oos", u, 4096, 256)
al = ActivityLog.create(d + "/al", u, 64 << 10, 8)
core = Core(d + "/dev", 1 << 20, oos, al, 1 << 20, 1)
core.write(b"x" * 100, 0)
a, b = socket.socketpair()
b.close()
res = core.ship([a.fileno()], 0, 0.0, 4096, 1.0)
print(res.stop, res.errnum)
core.close(clean=False)
oos.abandon()
al.close()
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.returncode == 0, f"child ended with {out.returncode}: {out.stderr}"
    stop, err = out.stdout.split()
    assert stop == "io" and int(err) in (errno.EPIPE, errno.ECONNRESET)


# ---- 7. backpressure --------------------------------------------------------

def test_a_slow_reader_on_a_nonblocking_socket_gets_every_frame_whole(make_rig, sockpair, reader):
    rig = make_rig(size=4 * MiB, extent_size=MiB, slots=8, ring_size=16 * MiB)
    core = rig.core
    a, b = sockpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    a.setblocking(False)  # O_NONBLOCK: ship() meets EAGAIN and must poll
    assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 64 << 10

    rng = random.Random(7)
    sent: list[Sent] = []
    total = 0
    while total < 4 * MiB:
        roll = rng.random()
        length = rng.randint(1, 128 << 10)
        off = rng.randrange(0, rig.size - length)
        if roll < 0.05:
            r = core.trim(off, length)
            sent.append(Sent(r.seq, OP_TRIM, off, length, b""))
        elif roll < 0.1:
            r = core.zero(off, length)
            sent.append(Sent(r.seq, OP_ZERO, off, length, b""))
        else:
            write(core, sent, rng.randbytes(length), off)
            total += length
    batch = 256 << 10

    rd = reader(b, chunk=16 << 10, pause=0.002)  # ~8 MB/s: far slower than ship()
    boundaries = []   # stream offsets where ship() returned
    on_wire = 0
    results = []
    deadline = time.monotonic() + 30
    while core.ring_stats["unsent_bytes"] > 0:
        assert time.monotonic() < deadline, "the ring did not drain"
        t0 = time.monotonic()
        res = core.ship([a.fileno()], 0, 0.0, batch, 0.02)
        assert time.monotonic() - t0 < 5, "ship() stuck far past return_after"
        assert res.stop == "timeout", res
        results.append(res)
        on_wire += wire_bytes(res.spans, res.records, res.bytes)
        boundaries.append(on_wire)
    a.shutdown(socket.SHUT_WR)
    rd.join(30)
    assert rd.eof, "the reader did not reach EOF"

    returned_mid_stream = [r for r in results[:-1] if r.spans]
    assert len(returned_mid_stream) >= 3, "ship() should have returned while data was pending"
    assert sum(r.records for r in results) == len(sent)
    raw = rd.data()
    assert len(raw) == on_wire
    spans, ends = decode_spans(raw)  # EOF fed: a half frame anywhere fails here
    assert set(boundaries) <= set(ends) | {0}, "ship() returned in the middle of a frame"
    for s in spans:
        assert len(s.data.payload) <= batch or s.data.count == 1
    assert_records_match(all_records(spans), sent)


def test_records_survive_the_ring_wrapping_around(make_rig, sockpair):
    rig = make_rig(ring_size=64 << 10)
    core = rig.core
    a, b = sockpair()
    rng = random.Random(3)
    sent: list[Sent] = []
    got: list[tuple[Token, bytes]] = []
    for _ in range(40):  # ~480 KiB through a 64 KiB ring: several wraps
        for _ in range(3):
            n = rng.randint(1, 8 << 10)
            write(core, sent, rng.randbytes(n), rng.randrange(0, rig.size - n))
        res = core.ship([a.fileno()], 0, 0.0, 16 << 10, 0.01)
        assert res.stop == "timeout", res
        spans, _ = decode_spans(recv_available(b), eof=False)
        got += all_records(spans)
        assert core.ring_stats["unsent_bytes"] == 0
        core.release(sent[-1].seq)
    assert not core.ring_stats["dropped"]
    assert_records_match(got, sent)


def test_wake_makes_an_idle_ship_return_kicked(make_rig, sockpair):
    """Stopping must not wait for return_after: wake() ends the call."""
    rig = make_rig()
    core = rig.core
    a, _ = sockpair()
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "res", core.ship([a.fileno()], 0, 0.0, MiB, 30.0)))
    t.start()
    time.sleep(0.2)
    core.wake()
    t.join(5)
    assert not t.is_alive(), "ship() ignored wake()"
    assert box["res"].stop == "kicked"


def test_abort_gives_up_mid_frame_on_a_peer_that_does_not_read(make_rig, sockpair):
    """A peer that stops reading holds ship() inside a frame (a frame is
    never left half written while the link lives); abort_ship() is the way
    out when shutting down, and says ECANCELED."""
    rig = make_rig()
    core = rig.core
    a, _ = sockpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    a.setblocking(False)
    core.write(os.urandom(1 << 20), 0)  # far more than the socket buffers hold
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "res", core.ship([a.fileno()], 0, 0.0, 2 * MiB, 0.1)))
    t.start()
    t.join(0.6)
    assert t.is_alive(), "ship() returned in the middle of a frame"
    core.abort_ship()
    t.join(5)
    assert not t.is_alive(), "abort_ship() did not end ship()"
    res = box["res"]
    assert (res.stop, res.errnum, res.spans) == ("io", errno.ECANCELED, 0)
    assert core.ship([a.fileno()], 0, 0.0, MiB, 5.0).errnum == errno.ECANCELED  # sticky


def test_what_a_running_call_sent_is_visible_before_it_returns(make_rig, sockpair, reader):
    """Status reads the lag while ship() runs: the call publishes the last
    seq it sent and the ts of the first record it sent, reset per call."""
    rig = make_rig()
    core = rig.core
    a, b = sockpair()
    reader(b)
    assert core.ship_inflight() is None
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "res", core.ship([a.fileno()], 0, 0.0, MiB, 1.5)))
    t.start()
    try:
        before = time.time_ns()
        first = core.write(b"x" * 512, 0).seq
        last = core.write(b"y" * 512, 4096).seq
        deadline = time.monotonic() + 5
        while (core.ship_inflight() or (0, 0))[0] != last and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = core.ship_inflight()
    finally:
        t.join(10)
    assert seen is not None and seen[0] == last and first < last
    assert before <= seen[1] <= time.time_ns()  # the first record's ts
    assert box["res"].records == 2
    core.ship([a.fileno()], 0, 0.0, MiB, 0.05)
    assert core.ship_inflight() is None  # a new call starts empty


def test_a_record_held_back_for_its_batch_is_visible_as_waiting(make_rig, sockpair):
    """Status counts writes the loop holds back for the batch interval in
    the lag: the loop publishes the oldest one's ts while it waits."""
    rig = make_rig()
    core = rig.core
    a, _ = sockpair()
    before = time.time_ns()
    core.write(b"held back", 0)
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault(
        "res", core.ship([a.fileno()], 0, 5.0, MiB, 0.5, time.monotonic_ns())))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while core.ship_waiting_ts() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = core.ship_waiting_ts()
    finally:
        t.join(10)
    assert box["res"].spans == 0
    assert waiting is not None and before <= waiting <= time.time_ns()

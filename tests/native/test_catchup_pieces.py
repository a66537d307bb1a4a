"""How the catch-up cuts an increment's tracks into INCR_DATA and
INCR_ZERO frames: adjacent tracks travel together, but no frame is larger
than PIECE_BYTES (the frame is joined in memory before it is sent)."""
from __future__ import annotations

from replicator.primary.catchup import PIECE_BYTES, CatchUp, SyncProgress
from replicator.protocol.messages import IncrData, IncrZero

TRACK = 64 << 10


class _Link:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def _catchup() -> tuple[CatchUp, _Link]:
    cu = object.__new__(CatchUp)  # only the piece cutting is exercised
    cu.link = _Link()
    cu.rate = 0
    cu.hooks = type("Hooks", (), {"add_bytes": staticmethod(lambda sent, matched: None)})()
    return cu, cu.link


def _track(t: int, zero: bool = False) -> tuple[int, bytes]:
    return t * TRACK, bytes(TRACK) if zero else bytes([t % 251 + 1]) * TRACK


def test_adjacent_tracks_travel_together_up_to_piece_bytes():
    cu, link = _catchup()
    per_piece = PIECE_BYTES // TRACK
    pieces = [_track(t) for t in range(3 * per_piece + 2)] + [_track(500), _track(501)]
    prog = SyncProgress()
    cu._send_pieces(7, pieces, prog)
    sizes = [(m.offset, len(m.data)) for m in link.sent]
    assert sizes == [(0, PIECE_BYTES), (PIECE_BYTES, PIECE_BYTES), (2 * PIECE_BYTES, PIECE_BYTES),
                     (3 * PIECE_BYTES, 2 * TRACK), (500 * TRACK, 2 * TRACK)]
    assert all(isinstance(m, IncrData) and m.incr_id == 7 for m in link.sent)
    sent = b"".join(m.data for m in link.sent)
    assert sent == b"".join(d for _, d in pieces)
    assert prog.done_bytes == len(sent)


def test_zero_tracks_travel_as_markers_between_data():
    cu, link = _catchup()
    pieces = [_track(0), _track(1, zero=True), _track(2, zero=True), _track(3),
              _track(9, zero=True)]
    cu._send_pieces(1, pieces, SyncProgress())
    zeros = [(m.offset, m.length) for m in link.sent if isinstance(m, IncrZero)]
    data = [(m.offset, len(m.data)) for m in link.sent if isinstance(m, IncrData)]
    assert zeros == [(TRACK, 2 * TRACK), (9 * TRACK, TRACK)]
    assert data == [(0, TRACK), (3 * TRACK, TRACK)]


def test_zero_check_takes_any_length_without_copying_the_data():
    from replicator.tracks import is_zero, track_digest, zero_digest
    for n in (0, 1, 4095, TRACK, PIECE_BYTES, (4 << 20) + 3, 9 << 20):
        assert is_zero(bytes(n)) and is_zero(bytearray(n))
        if n:
            assert not is_zero(bytes(n - 1) + b"\x01")
            assert not is_zero(b"\x01" + bytes(n - 1))
    assert track_digest(bytes(TRACK)) == zero_digest(TRACK) != track_digest(b"\x01" * TRACK)

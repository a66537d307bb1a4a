"""The logical layout of a resource's volumes: bases, round trips between
logical and (volume, offset), and ranges that touch a gap or the end refused."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from replicator.layout import Layout

TS = 4096


def test_bases_are_track_aligned_end_to_end():
    lay = Layout([("data", 10_000), ("wal", 8192), ("x", 1)], TS)
    assert lay.bases == (0, 12288, 20480)
    assert lay.sizes == (10_000, 8192, 1)
    assert lay.names == ("data", "wal", "x")
    assert lay.logical_size == 20481
    assert lay.ntracks == 6
    assert len(lay) == 3


def test_single_is_base_zero_and_identity():
    lay = Layout.single(1 << 20, TS)
    assert lay.bases == (0,)
    assert lay.logical_size == 1 << 20
    assert lay.locate(12345) == (0, 12345)
    assert lay.to_logical(0, 12345) == 12345
    assert lay.split(0, 1 << 20) == [(0, 0, 1 << 20)]


def test_locate_and_to_logical():
    lay = Layout([("data", 10_000), ("wal", 8192)], TS)
    assert lay.locate(0) == (0, 0)
    assert lay.locate(9999) == (0, 9999)
    assert lay.locate(12288) == (1, 0)
    assert lay.locate(12288 + 8191) == (1, 8191)
    assert lay.to_logical(1, 5) == 12293
    assert lay.to_logical(0, 10_000) == 10_000  # the end of a volume


def test_gap_and_end_are_refused_with_a_reason():
    lay = Layout([("data", 10_000), ("wal", 8192)], TS)
    with pytest.raises(ValueError, match="alignment gap after volume 'data'"):
        lay.locate(10_000)
    with pytest.raises(ValueError, match="outside the volumes"):
        lay.locate(lay.logical_size)
    with pytest.raises(ValueError, match="outside the volumes"):
        lay.locate(-1)
    with pytest.raises(ValueError, match="crosses the alignment gap"):
        lay.split(9000, 5000)
    with pytest.raises(ValueError, match="alignment gap"):
        lay.split(10_000, 10)
    with pytest.raises(ValueError, match="outside the volumes"):
        lay.split(12288, 8193)
    with pytest.raises(ValueError, match="must be positive"):
        lay.split(0, 0)
    with pytest.raises(ValueError, match="outside volume 'wal'"):
        lay.to_logical(1, 8193)
    with pytest.raises(ValueError, match="volume index 2 out of range"):
        lay.to_logical(2, 0)


def test_split_across_an_aligned_boundary():
    # A volume that ends on a track boundary has no gap: a range may span it.
    lay = Layout([("a", 8192), ("b", 8192)], TS)
    assert lay.split(4096, 8192) == [(0, 4096, 4096), (1, 0, 4096)]


def test_clip_cuts_a_track_at_the_volume_end():
    lay = Layout([("data", 10_000), ("wal", 8192)], TS)
    assert lay.clip(8192, TS) == (0, 8192, 10_000 - 8192)
    assert lay.clip(12288, TS) == (1, 0, TS)
    assert list(lay.track_range(0)) == [0, 1, 2]
    assert list(lay.track_range(1)) == [3, 4]


def test_volume_index_names_the_known_volumes():
    lay = Layout([("data", 10), ("wal", 10)], TS)
    assert lay.volume_index("wal") == 1
    with pytest.raises(ValueError, match="no volume 'log'; the volumes are 'data', 'wal'"):
        lay.volume_index("log")


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        Layout([("a", 10)], 3000)
    with pytest.raises(ValueError, match="at least one volume"):
        Layout([], TS)
    with pytest.raises(ValueError, match="listed twice"):
        Layout([("a", 10), ("a", 10)], TS)
    with pytest.raises(ValueError, match="'b': size 0"):
        Layout([("a", 10), ("b", 0)], TS)


def test_equality_is_by_names_sizes_and_track_size():
    assert Layout([("a", 10), ("b", 20)], TS) == Layout([("a", 10), ("b", 20)], TS)
    assert Layout([("a", 10), ("b", 20)], TS) != Layout([("b", 20), ("a", 10)], TS)
    assert Layout([("a", 10)], TS) != Layout([("a", 10)], 2 * TS)


layouts = st.builds(
    lambda sizes, shift: Layout([(f"v{i}", s) for i, s in enumerate(sizes)], 1 << shift),
    st.lists(st.integers(1, 50_000), min_size=1, max_size=5),
    st.integers(9, 14))


@settings(max_examples=200, deadline=None)
@given(layouts, st.data())
def test_volume_offset_round_trips(lay: Layout, data):
    vol = data.draw(st.integers(0, len(lay) - 1))
    off = data.draw(st.integers(0, lay.sizes[vol] - 1))
    logical = lay.to_logical(vol, off)
    assert lay.locate(logical) == (vol, off)
    # Bases are track-aligned: a track never holds bytes of two volumes.
    assert lay.bases[vol] % lay.track_size == 0
    assert all(lay.locate(t * lay.track_size)[0] == vol for t in lay.track_range(vol))


@settings(max_examples=200, deadline=None)
@given(layouts, st.data())
def test_split_pieces_cover_the_range_exactly(lay: Layout, data):
    start = data.draw(st.integers(0, lay.logical_size - 1))
    length = data.draw(st.integers(1, lay.logical_size - start))
    # split accepts exactly the ranges whose every byte is some volume's.
    if not _all_owned(lay, start, length):
        with pytest.raises(ValueError, match="alignment gap"):
            lay.split(start, length)
        return
    pieces = lay.split(start, length)
    assert sum(n for _, _, n in pieces) == length
    pos = start
    for vol, off, n in pieces:
        assert lay.to_logical(vol, off) == pos
        assert off + n <= lay.sizes[vol]
        pos += n
    assert pos == start + length


def _all_owned(lay: Layout, start: int, length: int) -> bool:
    """Whether [start, start+length) lies in volumes only: it misses every gap."""
    end = start + length
    for vol in range(len(lay)):
        gap_start = lay.bases[vol] + lay.sizes[vol]
        gap_end = lay.bases[vol + 1] if vol + 1 < len(lay) else gap_start
        if gap_start < gap_end and start < gap_end and gap_start < end:
            return False
    return end <= lay.logical_size

"""The cross-volume prefix check (tests/fixtures/volume_history.py) on
hand-built samples: it accepts every prefix of a chain, and names the
forbidden state, stray bytes and foreign content."""
from __future__ import annotations

import pytest
from fixtures.volume_history import BLOCK, Chain, VolumeHistory, describe_block, stamp

SIZES = {"data": 16 * BLOCK, "wal": 8 * BLOCK}


def _chain(n: int, slots: int = 4) -> VolumeHistory:
    h = VolumeHistory(SIZES)
    written: list[tuple[str, int, bytes]] = []
    c = Chain(h, lambda v, o, d: written.append((v, o, d)), ("data", "wal"), slots=slots,
              count=n)
    c.start()
    c.join()
    assert len(h) == n and len(written) == n
    return h


def _sample(h: VolumeHistory, k: int) -> dict[str, bytes]:
    return {v: h.image(v, k) for v in SIZES}


def test_every_prefix_of_a_chain_with_overwrites_is_accepted_as_exactly_that_prefix():
    h = _chain(40, slots=4)  # slots reused: each block is overwritten five times
    for k in range(41):
        verdict = h.check(_sample(h, k))
        assert verdict.ok, (k, verdict.message)
        assert verdict.prefix == (k, k), (k, verdict.prefix)


def test_a_later_write_on_one_volume_without_an_earlier_one_on_the_other_is_named():
    h = _chain(20, slots=8)
    sample = _sample(h, 10)  # writes 0..9
    later = h.writes[11]  # on wal; write 10 (on data) is missing
    assert (later.volume, h.writes[10].volume) == ("wal", "data")
    img = bytearray(sample["wal"])
    img[later.offset:later.offset + BLOCK] = later.data
    sample["wal"] = bytes(img)
    verdict = h.check(sample)
    assert not verdict.ok and verdict.prefix is None
    assert verdict.later == (11, "wal") and verdict.missing == (10, "data"), verdict
    assert "forbidden state" in verdict.message
    assert "holds write 11" in verdict.message and "lacks the earlier write 10" in verdict.message


def test_a_lost_write_in_the_middle_is_a_violation_even_on_one_volume():
    h = _chain(12, slots=8)
    sample = _sample(h, 12)
    lost = h.writes[4]
    img = bytearray(sample[lost.volume])
    img[lost.offset:lost.offset + BLOCK] = bytes(BLOCK)  # as before the history
    sample[lost.volume] = bytes(img)
    verdict = h.check(sample)
    assert not verdict.ok and verdict.missing == (4, lost.volume), verdict.message


def test_bytes_no_write_touched_must_be_the_base():
    h = _chain(6, slots=2)
    sample = _sample(h, 6)
    img = bytearray(sample["data"])
    img[15 * BLOCK + 7] = 1  # a block the chain never wrote
    sample["data"] = bytes(img)
    verdict = h.check(sample)
    assert not verdict.ok
    assert "'data' byte 61447 differs" in verdict.message and "no write touched it" in verdict.message


def test_content_no_write_put_there_is_named():
    h = _chain(6, slots=2)
    sample = _sample(h, 6)
    img = bytearray(sample["wal"])
    img[0:BLOCK] = stamp(999, "wal")
    sample["wal"] = bytes(img)
    verdict = h.check(sample)
    assert not verdict.ok and "holds write 999 (wal), which no write" in verdict.message


def test_a_base_other_than_zeros_counts_as_before_the_history():
    base = {v: bytes([7]) * n for v, n in SIZES.items()}
    h = VolumeHistory(SIZES, base=base)
    h.append("data", 0, stamp(0, "data"))
    h.append("wal", BLOCK, stamp(1, "wal"))
    assert h.check(base).prefix == (0, 0)
    assert h.check({v: h.image(v, 1) for v in SIZES}).prefix == (1, 1)
    assert not h.check({"data": base["data"], "wal": h.image("wal", 2)}).ok


def test_a_sample_of_the_wrong_size_and_unaligned_writes_are_refused():
    h = VolumeHistory(SIZES)
    with pytest.raises(ValueError, match="whole 4096-byte blocks"):
        h.append("data", 100, bytes(BLOCK))
    with pytest.raises(ValueError, match="no volume 'log'"):
        h.append("log", 0, bytes(BLOCK))
    assert "is 3 bytes" in h.check({"data": b"abc", "wal": bytes(SIZES["wal"])}).message


def test_describe_block_names_stamps_and_zeros():
    assert describe_block(stamp(17, "wal")) == "write 17 (wal)"
    assert describe_block(bytes(BLOCK)) == "zeros"

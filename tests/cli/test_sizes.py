"""Sizes are 1024-based with explicit units; durations need a unit."""
import pytest

from replicator.sizes import (format_duration, format_size, parse_duration, parse_rate,
                              parse_size)


@pytest.mark.parametrize("text,value", [
    (4096, 4096), ("4096", 4096), ("512B", 512), ("64K", 65536), ("64k", 65536),
    ("64KiB", 65536), ("64 KiB", 65536), ("1MiB", 1 << 20), ("1.5GiB", 3 << 29),
    ("2T", 2 << 40), ("0", 0),
])
def test_sizes_are_binary(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text,fragment", [
    ("64KB", "use e.g. 64KiB: sizes are 1024-based and 'KB' is ambiguous"),
    ("1mb", "use e.g. 1MiB"),
    ("1.3B", "is not a whole number of bytes"),
    ("-1", "is not a size"),
    (True, "is not a size"),
    (-5, "is negative"),
])
def test_bad_sizes_say_why(text, fragment):
    with pytest.raises(ValueError) as ei:
        parse_size(text)
    assert fragment in str(ei.value)


def test_rates_accept_per_second():
    assert parse_rate("100MiB/s") == parse_rate("100MiB") == 100 << 20
    assert parse_rate("0") == 0
    with pytest.raises(ValueError, match="is not a rate"):
        parse_rate("fast")


@pytest.mark.parametrize("text,seconds", [
    ("2ms", 0.002), ("1s", 1.0), ("1.5s", 1.5), ("250us", 0.00025), ("2m", 120.0), ("0", 0.0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_durations_need_a_unit():
    with pytest.raises(ValueError, match="has no unit"):
        parse_duration("5")
    with pytest.raises(ValueError, match="has no unit"):
        parse_duration(5)


def test_formatting():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 << 30) == "3.0 GiB"
    assert format_duration(0.0123) == "12ms"
    assert format_duration(125) == "2m05s"

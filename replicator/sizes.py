"""Parsing and printing of sizes, rates and durations.

Sizes are always binary (1024-based), because every size Duplex takes is
a memory or disk granularity:

* a plain integer, or a string of digits: bytes (``4096``, ``"4096"``);
* ``B`` for bytes (``"512B"``);
* ``K``/``M``/``G``/``T`` or ``KiB``/``MiB``/``GiB``/``TiB`` (case of the
  letter ignored, so ``64k`` = ``64K`` = ``64KiB`` = 65536);
* a decimal fraction is allowed when it comes to a whole number of bytes
  (``"1.5GiB"``).

``KB``/``MB``/``GB``/``TB`` are refused: they mean 1000-based to some
readers and 1024-based to others, and a track size off by 2.4% is not a
mistake to make silently. The error says to write ``KiB`` instead.

Rates are sizes per second (``"100MiB"`` or ``"100MiB/s"``; ``0`` means
unlimited). Durations need a unit: ``us``, ``ms``, ``s``, ``m``, ``h``
(``"2ms"``, ``"1.5s"``); only ``0`` may go without one.

The parsers raise :class:`ValueError` with a message that quotes the value
and shows a correct example; the config loader prefixes file and key.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tib": 1 << 40,
}
_AMBIGUOUS = {"kb": "KiB", "mb": "MiB", "gb": "GiB", "tb": "TiB"}

_DURATION_UNITS = {
    "us": Decimal("0.000001"),
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "min": Decimal(60),
    "h": Decimal(3600),
}

_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Bytes meant by *value* (an int, or a string like ``"64KiB"``).

    Raises ValueError naming the value when it is not a size.
    """
    if isinstance(value, bool):  # bool is an int in Python; never a size
        raise ValueError(f"{value!r} is not a size (use e.g. 64KiB)")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; a size must be >= 0")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a size (use e.g. 64KiB)")
    m = _NUMBER_UNIT.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a size (use e.g. 64KiB)")
    number, unit = m.group(1), m.group(2).lower()
    if unit in _AMBIGUOUS:
        raise ValueError(
            f"{value!r} is not a size (use e.g. {number}{_AMBIGUOUS[unit]}: "
            f"sizes are 1024-based and {m.group(2)!r} is ambiguous)"
        )
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"{value!r} is not a size: unknown unit {m.group(2)!r} "
            f"(use B, KiB, MiB, GiB or TiB, e.g. 64KiB)"
        )
    exact = Decimal(number) * _SIZE_UNITS[unit]
    if exact != exact.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(exact)


def parse_rate(value: int | str) -> int:
    """Bytes per second meant by *value* (``"100MiB"``, ``"100MiB/s"``, 0).

    0 means unlimited. Raises ValueError naming the value.
    """
    if isinstance(value, str) and value.strip().lower().endswith("/s"):
        value = value.strip()[:-2]
    try:
        return parse_size(value)
    except ValueError as e:
        raise ValueError(
            str(e).replace("is not a size", "is not a rate").replace(
                "e.g. 64KiB", "e.g. 100MiB/s")
        ) from None


def parse_duration(value: str | int | float) -> float:
    """Seconds meant by *value* (``"2ms"``, ``"1.5s"``, ``"0"``).

    A unit is required (a bare ``2`` could be seconds or milliseconds),
    except for zero. Raises ValueError naming the value.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 2ms or 1s)")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        raise ValueError(
            f"{value!r} has no unit (use a string such as \"{value}ms\" or \"{value}s\")"
        )
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a duration (use e.g. 2ms or 1s)")
    m = _NUMBER_UNIT.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a duration (use e.g. 2ms or 1s)")
    number, unit = m.group(1), m.group(2).lower()
    if unit == "":
        if Decimal(number) == 0:
            return 0.0
        raise ValueError(f"{value!r} has no unit (use e.g. {number}ms or {number}s)")
    if unit not in _DURATION_UNITS:
        raise ValueError(
            f"{value!r} is not a duration: unknown unit {m.group(2)!r} "
            f"(use us, ms, s, m or h, e.g. 2ms)"
        )
    try:
        return float(Decimal(number) * _DURATION_UNITS[unit])
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        raise ValueError(f"{value!r} is not a duration (use e.g. 2ms or 1s)") from None


def format_size(n: int | float) -> str:
    """A human size: ``512 B``, ``64.0 KiB``, ``1.5 GiB``."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A human duration: ``850us``, ``12ms``, ``3.2s``, ``4m05s``, ``2h03m``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}m{s:02d}s"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h{rem // 60:02d}m"

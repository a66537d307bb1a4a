"""CRC32C (Castagnoli). Uses the C core (SSE4.2 where the CPU has it);
falls back to a table in Python only when the core is not built, so that
pure-Python tools still work (slowly)."""
from __future__ import annotations

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def _crc32c_py(data, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    t = _TABLE
    for b in bytes(data):
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:  # the C core, when built
    from replicator.native.crc32c import crc32c as _crc32c_native  # type: ignore
except ImportError:  # pragma: no cover - only before the core is built
    _crc32c_native = None


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of *data* (bytes-like), continuing from *crc*."""
    if _crc32c_native is not None:
        return _crc32c_native(data, crc)
    return _crc32c_py(data, crc)

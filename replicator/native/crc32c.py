"""native/crc32c.h: CRC32C (Castagnoli), the SSE4.2 path where the CPU has
it, else a table. replicator/crc32c.py imports this module for its fast
path, so nothing here may import replicator.crc32c or replicator.records."""
from __future__ import annotations

from replicator.native.ffi import ffi as _ffi, lib as _lib

__all__ = ["crc32c", "crc32c_sw", "crc32c_hw", "crc32c_hw_available"]


def crc32c(data, crc: int = 0) -> int:
    """CRC32C of *data* (bytes, bytearray, memoryview), continuing from *crc*;
    SSE4.2 when the CPU has it."""
    buf = _ffi.from_buffer(data)
    return _lib.crc32c(crc, buf, len(buf))


def crc32c_sw(data, crc: int = 0) -> int:
    """CRC32C through the portable table path."""
    buf = _ffi.from_buffer(data)
    return _lib.crc32c_sw(crc, buf, len(buf))


def crc32c_hw(data, crc: int = 0) -> int:
    """CRC32C through the SSE4.2 path (the table path if the CPU lacks it)."""
    buf = _ffi.from_buffer(data)
    return _lib.crc32c_hw(crc, buf, len(buf))


def crc32c_hw_available() -> bool:
    """True when this CPU runs the SSE4.2 path."""
    return bool(_lib.crc32c_hw_available())

"""native/records.h: checking records packed in a buffer (the 48-byte
header, its CRC and the data's), one C call for a whole frame.
replicator/records.py imports this module for its fast path, so nothing
here may import replicator.records or replicator.crc32c."""
from __future__ import annotations

from replicator.native.ffi import ffi as _ffi, lib as _lib

__all__ = ["RECORD_HEADER_SIZE", "scan_records"]

RECORD_HEADER_SIZE = 48


def scan_records(buf, tokens_only: bool = False) -> tuple[int, int] | None:
    """Check every record packed in *buf* in one C call: structure and CRC
    (with *tokens_only*, 48-byte headers without data: structure only).
    Returns (count, highest seq), or None when one is bad (the caller then
    finds and words the problem record by record)."""
    src = _ffi.from_buffer(buf)
    bad = _ffi.new("uint64_t *")
    fault = _ffi.new("int *")
    top = _ffi.new("uint64_t *")
    check = _lib.records_check_tokens if tokens_only else _lib.records_check
    n = check(src, len(src), bad, fault, top)
    return None if n < 0 else (n, top[0])

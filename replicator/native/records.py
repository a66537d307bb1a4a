"""native/records.h: checking records packed in a buffer (the 48-byte
header, its CRC and the data's), one C call for a whole frame.
replicator/records.py imports this module for its fast path, so nothing
here may import replicator.records or replicator.crc32c."""
from __future__ import annotations

from replicator.native.ffi import ffi as _ffi, lib as _lib

__all__ = ["RECORD_HEADER_SIZE", "find_op", "first_outside_volumes", "scan_records"]

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


def find_op(buf, op: int) -> list[int]:
    """The byte offsets of the records of *op* packed in *buf* (already
    checked by :func:`scan_records`), in one C call: the secondary finds a
    group's MARK records in a DATA frame without a loop over the rest."""
    src = _ffi.from_buffer(buf)
    out = _ffi.new("uint64_t[16]")
    n = _lib.records_find_op(src, len(src), op, out, 16)
    if n > 16:
        out = _ffi.new(f"uint64_t[{n}]")
        n = _lib.records_find_op(src, len(src), op, out, n)
    return [out[i] for i in range(n)]


def first_outside_volumes(buf, sizes, tokens_only: bool = False) -> int | None:
    """The byte offset of the first record (with *tokens_only*, 48-byte
    header) packed in *buf* that names no volume of *sizes* (bytes per
    volume) or runs past its end, in one C call; None when every one fits.
    *buf* must have passed :func:`scan_records`."""
    src = _ffi.from_buffer(buf)
    fault = _ffi.new("int *")
    vols = _ffi.new("uint64_t[]", list(sizes))
    at = _lib.records_check_volumes(src, len(src), tokens_only, vols, len(sizes), fault)
    return None if at < 0 else at

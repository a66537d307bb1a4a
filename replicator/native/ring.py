"""native/ring.h, the part the send ring offers without a Core: the tokens
(48-byte headers) of a span of records. The ring itself lives inside the
Core (replicator.native.core: peek, advance, release, rewind, ring_stats)."""
from __future__ import annotations

from replicator.native.ffi import ffi as _ffi, lib as _lib

__all__ = ["tokens"]


def tokens(span) -> bytes:
    """The 48-byte headers of the records packed in *span* (a TOKENS payload)."""
    src = _ffi.from_buffer(span)
    n = len(src)
    if n == 0:
        return b""
    out = _ffi.new("char[]", n)  # char[]: ffi.unpack gives bytes
    w = _lib.ring_tokens(src, n, _ffi.cast("unsigned char *", out), n)
    if w < 0:
        raise ValueError(f"span of {n} bytes is not a sequence of whole records")
    return _ffi.unpack(out, w)

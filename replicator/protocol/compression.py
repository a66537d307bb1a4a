"""Compression of bulk frames on the wire (DESIGN §9), sans-IO.

A DATA or INCR_DATA frame with FLAG_COMPRESSED carries, instead of its
payload, an 8-byte prefix and the payload compressed::

    0   u8   codec     1 zstd, 2 lz4 (block format)
    1   3x   zero
    4   u32  raw       length of the payload once decompressed

The frame's CRC covers the header and the *uncompressed* payload (DATA:
the header only, as always; its records carry their own CRCs, over the
uncompressed bytes), so what is checked is what is used. A payload that
does not shrink goes uncompressed (the stored fallback): the flag is per
frame.

Decompression is bounded before it runs: ``raw`` may not exceed the
frame type's payload limit, zstd's own frame must declare exactly ``raw``
bytes of content, and the output buffer is ``raw`` bytes (lz4 fails
rather than write past it). A decompression bomb is refused, not inflated.

The bindings are ``zstandard`` and ``lz4`` (PyPI), imported on first use.
"""
from __future__ import annotations

import struct

from replicator.protocol.errors import FrameError, LocalProtocolError

CODECS = {"zstd": 1, "lz4": 2}
NAMES = {v: k for k, v in CODECS.items()}
PREFIX = struct.Struct("<B3xI")
#: compression-level: (lowest, highest, default) per codec
LEVELS = {"zstd": (1, 19, 3), "lz4": (0, 16, 0)}


def _module(name: str):
    try:
        if name == "zstd":
            import zstandard
            return zstandard
        import lz4.block
        return lz4.block
    except ImportError:
        raise LocalProtocolError(f"compression {name!r}: the Python package "
                                 f"{'zstandard' if name == 'zstd' else 'lz4'} is not installed "
                                 f"(scripts/setup installs it)") from None


def available(name: str) -> str | None:
    """None when codec *name* can be used here, else why not."""
    try:
        _module(name)
    except LocalProtocolError as e:
        return str(e)
    return None


class Compressor:
    """One codec at one level, for one connection's sender (not thread
    safe: the Connection calls it under its owner's lock)."""

    def __init__(self, name: str, level: int | None = None) -> None:
        if name not in CODECS:
            raise LocalProtocolError(f"unknown compression {name!r} (zstd, lz4)")
        lo, hi, default = LEVELS[name]
        self.level = default if level is None else level
        if not lo <= self.level <= hi:
            raise LocalProtocolError(f"compression-level {self.level} is out of range for "
                                     f"{name} ({lo}..{hi})")
        self.name = name
        self.codec = CODECS[name]
        mod = _module(name)
        if name == "zstd":
            self._cctx = mod.ZstdCompressor(level=self.level, write_content_size=True)
            self._compress = self._cctx.compress
        else:
            mode = "high_compression" if self.level > 0 else "default"
            self._compress = lambda data: mod.compress(data, mode=mode, compression=self.level,
                                                       store_size=False)

    def compress(self, raw) -> bytes | None:
        """The compressed payload (prefix included), or None when it would
        not be smaller than *raw*: then the frame goes as it is."""
        n = memoryview(raw).nbytes
        out = self._compress(raw)
        if len(out) + PREFIX.size >= n:
            return None
        return PREFIX.pack(self.codec, n) + out


def decompress(ftype_name: str, payload, limit: int) -> bytes:
    """The payload of a compressed frame, decompressed; FrameError when the
    prefix is bad, the declared size exceeds *limit*, or the data does not
    decompress to exactly the declared size."""
    mv = memoryview(payload)
    if mv.nbytes < PREFIX.size:
        raise FrameError(f"compressed {ftype_name} frame of {mv.nbytes} bytes: shorter than "
                         f"its {PREFIX.size}-byte prefix")
    codec, raw = PREFIX.unpack_from(mv)
    if bytes(mv[1:4]) != b"\0\0\0":
        raise FrameError(f"compressed {ftype_name} frame: non-zero reserved prefix bytes")
    name = NAMES.get(codec)
    if name is None:
        raise FrameError(f"compressed {ftype_name} frame: unknown codec {codec}")
    if raw > limit:
        raise FrameError(f"compressed {ftype_name} frame declares {raw} bytes once "
                         f"decompressed, above the maximum of {limit}")
    if raw == 0:
        raise FrameError(f"compressed {ftype_name} frame declares an empty payload")
    try:
        mod = _module(name)
    except LocalProtocolError as e:
        raise FrameError(f"compressed {ftype_name} frame: {e}") from None
    data = mv[PREFIX.size:]
    try:
        if name == "zstd":
            # decompress() sizes its output by the frame's declared content
            # size, ignoring max_output_size: check that size first.
            declared = mod.frame_content_size(data)
            if declared != raw:
                raise FrameError(f"compressed {ftype_name} frame: the zstd frame declares "
                                 f"{declared} bytes, the prefix {raw}")
            out = mod.ZstdDecompressor().decompress(data, max_output_size=raw)
        else:
            out = mod.decompress(data, uncompressed_size=raw)
    except FrameError:
        raise
    except Exception as e:  # the bindings' own errors: corrupt input
        raise FrameError(f"compressed {ftype_name} frame does not decompress ({name}): "
                         f"{e}") from None
    if len(out) != raw:
        raise FrameError(f"compressed {ftype_name} frame decompressed to {len(out)} bytes, "
                         f"its prefix says {raw}")
    return out

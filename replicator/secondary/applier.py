"""Applying records to the secondary's image.

Every op overwrites its whole range, so applying a run again after a crash
restores exactly the same bytes (journal replay relies on this):

* WRITE: the data, with a pwrite loop;
* TRIM and ZERO: the range reads as zeros afterwards, as on the primary
  (whose C core punches holes in files and zeroes ranges of devices).
  Regular files: ``fallocate(PUNCH_HOLE | KEEP_SIZE)``; block devices:
  ``BLKZEROOUT``; where those are refused, zeros are written;
* FLUSH: fdatasync of the image (a durability point of the stream); in
  :func:`apply_run`, of every image: a flush covers every volume of the
  resource (DESIGN §8), whatever its volume field (the primary sends 0).

:func:`apply_run` applies an in-order run and merges adjacent writes into
one ``pwritev``, which is the same as writing them one after another.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from replicator.errors import DuplexError
from replicator.fileio import pwritev_all
from replicator.records import (HEADER_SIZE, NO_RANGE_OPS, OP_FLUSH, OP_MARK, OP_NAMES,
                                OP_TRIM, OP_WRITE, OP_ZERO, Token, unpack_token)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
_SECTOR = 512

_ZEROS = memoryview(bytes(1 << 20))
_IOV_MAX = 1024
_MAX_MERGE = 8 << 20  # bytes per merged pwritev

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# errnos that mean "this file or device cannot do it": fall back to zeros.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY}


class ApplyError(DuplexError):
    """A record cannot be applied to the image (names the seq and why)."""


@dataclass
class ApplyStats:
    """What :func:`apply_run` did."""

    records: int = 0
    bytes_written: int = 0
    syscalls: int = 0  # pwrite(v)/fallocate/ioctl/fdatasync calls
    flushes: int = 0
    last_seq: int | None = None


def record_data(raw: bytes | memoryview) -> tuple[Token, memoryview]:
    """Split an encoded record (as :meth:`Journal.read_record` returns it)
    into its token and its data (padding dropped)."""
    tok = unpack_token(raw)
    mv = memoryview(raw)
    return tok, mv[HEADER_SIZE:HEADER_SIZE + tok.data_len]


def pwrite_all(fd: int, data, offset: int) -> int:
    """Write all of *data* at *offset* (pwrite may write less); returns the
    syscall count."""
    mv = memoryview(data).cast("B")
    calls = 0
    while mv:
        n = os.pwrite(fd, mv, offset)
        calls += 1
        mv = mv[n:]
        offset += n
    return calls


def _write_zeros(fd: int, offset: int, length: int) -> int:
    calls = 0
    while length:
        n = min(length, len(_ZEROS))
        calls += pwrite_all(fd, _ZEROS[:n], offset)
        offset += n
        length -= n
    return calls


def zero_range(fd: int, offset: int, length: int) -> int:
    """Make ``[offset, offset+length)`` of the image read as zeros.

    Regular file: punch a hole (size kept); block device: BLKZEROOUT on the
    sector-aligned middle; zeros are written wherever those are refused.
    On a regular file the range is clipped at end of file, as a punch is:
    zeroing never grows the image. Returns the syscall count.
    """
    if length <= 0:
        return 0
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return _zero_blockdev(fd, offset, length)
    if offset >= st.st_size:
        return 0
    length = min(length, st.st_size - offset)
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return 1
    err = ctypes.get_errno()
    if err not in _UNSUPPORTED:
        raise OSError(err, f"fallocate(PUNCH_HOLE) at {offset}+{length}: {os.strerror(err)}")
    return 1 + _write_zeros(fd, offset, length)


def _zero_blockdev(fd: int, offset: int, length: int) -> int:
    start = -(-offset // _SECTOR) * _SECTOR
    end = (offset + length) // _SECTOR * _SECTOR
    calls = 0
    if end <= start:  # less than one whole sector
        return _write_zeros(fd, offset, length)
    if start > offset:
        calls += _write_zeros(fd, offset, start - offset)
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", start, end - start))
        calls += 1
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        calls += 1 + _write_zeros(fd, start, end - start)
    if offset + length > end:
        calls += _write_zeros(fd, end, offset + length - end)
    return calls


def _check(token: Token, data, image_size: int | None) -> None:
    if token.op not in OP_NAMES:
        raise ApplyError(f"record seq {token.seq}: unknown op {token.op}")
    if token.op == OP_WRITE and len(data) != token.length:
        raise ApplyError(f"record seq {token.seq}: write of {token.length} bytes "
                         f"given {len(data)} data bytes")
    if (image_size is not None and token.op not in NO_RANGE_OPS
            and token.offset + token.length > image_size):
        raise ApplyError(
            f"record seq {token.seq}: {OP_NAMES[token.op]} of {token.length} bytes at offset "
            f"{token.offset} runs past the end of the {image_size}-byte image "
            f"of volume {token.volume}")


def apply_record(fd: int, token: Token, data=b"", image_size: int | None = None) -> int:
    """Apply one record to the image open on *fd*; returns the syscall count.

    *data* is the record's data (WRITE only; exactly ``token.length``
    bytes). With *image_size*, a range past the image's end raises
    ApplyError instead of growing the file.
    """
    _check(token, data, image_size)
    if token.op == OP_WRITE:
        return pwrite_all(fd, data, token.offset)
    if token.op in (OP_TRIM, OP_ZERO):
        return zero_range(fd, token.offset, token.length)
    if token.op == OP_MARK:
        return 0  # a group point marker: nothing to write
    os.fdatasync(fd)  # OP_FLUSH
    return 1


def apply_run(images: Mapping[int, int], items: Iterable[tuple[Token, object]],
              image_sizes: Mapping[int, int] | None = None) -> ApplyStats:
    """Apply an in-order run of ``(token, data)`` to the images.

    *images* maps volume -> fd; offsets are volume-relative. Writes that
    continue each other on the same volume (each starting where the
    previous ended, consecutive in the run) go out as one pwritev. A FLUSH
    fdatasyncs every image. The caller fdatasyncs the images before it
    acks or checkpoints the run.
    """
    stats = ApplyStats()
    batch: list = []       # pending merged write: buffers
    b_vol = b_off = b_end = 0

    def flush_batch() -> None:
        nonlocal batch
        if not batch:
            return
        fd = images[b_vol]
        if len(batch) == 1:
            stats.syscalls += pwrite_all(fd, batch[0], b_off)
        else:
            stats.syscalls += pwritev_all(fd, batch, b_off)
        batch = []

    for tok, data in items:
        if tok.op == OP_MARK:  # a group point marker writes nothing
            stats.records += 1
            stats.last_seq = tok.seq
            continue
        if tok.volume not in images:
            raise ApplyError(f"record seq {tok.seq}: no image for volume {tok.volume}")
        size = image_sizes.get(tok.volume) if image_sizes is not None else None
        _check(tok, data, size)
        if tok.op == OP_WRITE:
            if (batch and tok.volume == b_vol and tok.offset == b_end
                    and len(batch) < _IOV_MAX and b_end - b_off + tok.length <= _MAX_MERGE):
                batch.append(data)
                b_end += tok.length
            else:
                flush_batch()
                batch = [data]
                b_vol, b_off, b_end = tok.volume, tok.offset, tok.offset + tok.length
            stats.bytes_written += tok.length
        elif tok.op == OP_FLUSH:
            flush_batch()
            for fd in images.values():  # a flush covers every volume
                os.fdatasync(fd)
                stats.syscalls += 1
            stats.flushes += 1
        else:
            flush_batch()
            stats.syscalls += apply_record(images[tok.volume], tok, data, size)
        stats.records += 1
        stats.last_seq = tok.seq
    flush_batch()
    return stats



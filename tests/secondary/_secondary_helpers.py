"""Shared helpers of the secondary's tests: records and a tiny image model."""
from __future__ import annotations

import os
from typing import NamedTuple

from replicator.records import (OP_FLUSH, OP_NAMES, OP_TRIM, OP_WRITE, OP_ZERO, Token,
                                encode_record, unpack_token)

BASE_TS = 1_700_000_000_123_456_789


class Rec(NamedTuple):
    """A record as (token, encoded bytes); short repr for hypothesis reports."""

    token: Token
    raw: bytes

    def __repr__(self) -> str:
        t = self.token
        return f"<seq {t.seq} {OP_NAMES[t.op]} vol {t.volume} {t.offset}+{t.length}>"


def rec(seq: int, offset: int = 0, data: bytes = b"", op: int = OP_WRITE, volume: int = 0,
        length: int | None = None, ts_ns: int | None = None) -> Rec:
    """(token, encoded record) for one write/trim/zero/flush."""
    if op == OP_WRITE:
        length = len(data)
    elif length is None:
        length = 0
    ts = BASE_TS + seq * 1000 if ts_ns is None else ts_ns
    raw = encode_record(seq, ts, offset, length, op, data if op == OP_WRITE else b"", volume)
    return Rec(unpack_token(raw), raw)


def fill(seq: int, n: int) -> bytes:
    """Data that differs between seqs and between positions."""
    return bytes((seq * 37 + i * 11 + 1) % 256 for i in range(n))


class ImageModel:
    """The primary's image as a bytearray: replay of a write history."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def apply(self, tok: Token, data: bytes) -> None:
        if tok.op == OP_WRITE:
            self.buf[tok.offset:tok.offset + tok.length] = data
        elif tok.op in (OP_TRIM, OP_ZERO):
            end = min(tok.offset + tok.length, len(self.buf))
            self.buf[tok.offset:end] = bytes(max(0, end - tok.offset))
        else:
            assert tok.op == OP_FLUSH


def prefix_images(size: int, history: list[tuple[Token, bytes]]) -> dict[int, bytes]:
    """seq -> the image after every write with seq <= it (key 0: empty)."""
    m = ImageModel(size)
    out = {0: bytes(m.buf)}
    for tok, raw in history:
        m.apply(tok, raw[48:48 + tok.data_len])
        out[tok.seq] = bytes(m.buf)
    return out


def read_file(fd: int, size: int) -> bytes:
    """The first *size* bytes of the file on *fd* (zeros past EOF)."""
    data = os.pread(fd, size, 0)
    return data + bytes(size - len(data))


def first_diff(a: bytes, b: bytes) -> str:
    """Where two images first differ, for assertion messages."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at byte {i}: {x:#04x} != {y:#04x}"
    return f"lengths {len(a)} != {len(b)}" if len(a) != len(b) else "identical"

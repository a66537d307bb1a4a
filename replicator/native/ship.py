"""native/ship.h: the streaming loop that sends the Core's send ring to the
secondary's sockets in C (TOKENS + DATA frames per span), the GIL released.
Core.ship() calls stream(); this module turns its arguments and result
into C structs and back."""
from __future__ import annotations

from typing import NamedTuple

from replicator.native.ffi import ffi as _ffi, lib as _lib

__all__ = ["ShipResult", "stream"]


class ShipResult(NamedTuple):
    """What one Core.ship() call did and why it returned: stop is
    "timeout" (time to look around), "kicked" (wake() was called),
    "dropped" (the ring overflowed), "io" (socket *fd_index* failed with
    *errnum*; ECANCELED after abort_ship()) or "bad"."""

    stop: str
    errnum: int
    fd_index: int
    next_fd: int
    spans: int
    records: int
    bytes: int
    samples: list  # (last seq of a span, ts of its first record)
    last_send_ns: int  # pass to the next ship() call


_SHIP_SAMPLES = 1024
_SHIP_STOPS = {_lib.SHIP_TIMEOUT: "timeout", _lib.SHIP_DROPPED: "dropped", _lib.SHIP_IO: "io",
               _lib.SHIP_BAD: "bad", _lib.SHIP_KICKED: "kicked"}


def stream(core_ptr, abort, inflight, fds: list[int], first_fd: int, interval_s: float,
           batch_bytes: int, return_after_s: float, last_send_ns: int = 0) -> ShipResult:
    """One ship_stream() call on the C core *core_ptr*; *abort* (``int *``)
    and *inflight* (``uint64_t[3]``: last seq sent, ts of its span's first
    record, ts of the oldest record held back) are the Core's, shared with
    other threads. See Core.ship() for the rest."""
    fdarr = _ffi.new("int[]", list(fds))
    params = _ffi.new("struct ship_params *", {
        "interval_ns": int(interval_s * 1e9), "batch_bytes": batch_bytes,
        "return_after_ns": int(return_after_s * 1e9), "last_send_ns": last_send_ns,
        "abort": abort, "inflight": inflight})
    inflight[0] = inflight[1] = inflight[2] = 0
    res = _ffi.new("struct ship_result *")
    samples = _ffi.new("uint64_t[]", 2 * _SHIP_SAMPLES)
    rc = _lib.ship_stream(core_ptr, fdarr, len(fds), first_fd, params, res, samples,
                          _SHIP_SAMPLES)
    if rc < 0:
        raise ValueError("ship() needs at least one socket")
    pairs = list(_ffi.unpack(samples, 2 * res.nsamples))
    return ShipResult(_SHIP_STOPS.get(res.stop, "?"), res.errnum, res.fd_index, res.next_fd,
                      res.spans, res.records, res.bytes, list(zip(pairs[::2], pairs[1::2])),
                      res.last_send_ns)

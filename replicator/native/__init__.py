"""The C core, seen from Python: one module here per part of native/, and
the only package that touches cffi objects (everything else uses the
classes here). Every call into C releases the GIL (cffi does that for
API-mode calls), so a request costs one C call during which other threads
run.

| module   | native/      | what                                                   |
|----------|--------------|--------------------------------------------------------|
| ffi      | (util.h)     | ffi/lib of replicator._core; CoreError, BitmapError,   |
|          |              | ActivityLogError; shared helpers; uninit_buffer        |
| crc32c   | crc32c.h     | crc32c, crc32c_sw, crc32c_hw, crc32c_hw_available      |
| records  | records.h    | RECORD_HEADER_SIZE, scan_records (check a frame)       |
| ring     | ring.h       | tokens (the headers of a span of records)              |
| bitmap   | bitmap.h     | Bitmap (OOS, CR, frozen), BITMAP_HEADER_SIZE           |
| actlog   | actlog.h     | ActivityLog (write-ahead active extents)               |
| core     | core.h,      | Core (the write path, its send ring, catch-up          |
|          | collide.h    | increments), WriteResult, CoreError                    |
| ship     | ship.h       | ShipResult, stream (Core.ship: the ring to sockets, C) |
| rxq      | rxq.h        | RxQueue, RxInfo, RxFault, RXQ_FAULTS (the secondary's  |
|          |              | pending queue)                                         |

The compiled module stays replicator._core (native/build_core.py). This
file imports nothing, so ``import replicator.native.crc32c`` is the first
thing to raise ImportError when the core is not built: replicator/crc32c.py
and replicator/records.py catch that and fall back to pure Python. For the
same reason no module here imports replicator.crc32c or replicator.records.
"""

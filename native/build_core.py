"""cffi build script for the C core: API mode, out-of-line, module
replicator._core.

setup.py names it (cffi_modules=["native/build_core.py:ffibuilder"]), so
`pip install -e .` builds replicator/_core*.so. Run it directly to build
the module in place without pip: `python native/build_core.py`.

Paths are taken from this file's location, so it works from any cwd.
cffi releases the GIL around every call into the core: the write path is
one C call per request, with the GIL released.
"""
from __future__ import annotations

import os
import sys

from cffi import FFI

NATIVE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(NATIVE_DIR)
MODULES = ["crc32c", "bitmap", "actlog", "ring", "collide", "records", "core"]


def _native_path(name: str, absolute: bool) -> str:
    """A file in native/. setuptools refuses absolute source paths and
    resolves relative ones from the cwd (the project root under pip);
    cffi's own compile() changes directory, so it needs absolute ones."""
    path = os.path.join(NATIVE_DIR, name)
    return path if absolute else os.path.relpath(path)


def make_builder(absolute: bool = False) -> FFI:
    """The FFI builder for replicator._core."""
    builder = FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "replicator._core",
        "\n".join(f'#include "{m}.h"' for m in MODULES),
        sources=[_native_path(m + ".c", absolute) for m in MODULES],
        include_dirs=[NATIVE_DIR],
        define_macros=[("_GNU_SOURCE", None)],
        extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-pthread"],
        extra_link_args=["-pthread"],
        depends=[_native_path(f, absolute) for f in sorted(os.listdir(NATIVE_DIR))
                 if f.endswith(".h")],
    )
    return builder


CDEF = r"""
/* crc32c.h */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);
uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len);
bool crc32c_hw_available(void);

/* records.h */
int64_t records_check(const unsigned char *buf, size_t len, uint64_t *bad_off, int *fault);

/* bitmap.h */
#define BITMAP_VERSION 1
#define BITMAP_HEADER_SIZE 4096
struct bitmap;
int bitmap_create(struct bitmap **out, const char *path, const uint8_t uuid[16],
                  uint32_t track_size, uint64_t nbits, char *err, size_t errlen);
int bitmap_open(struct bitmap **out, const char *path, const uint8_t uuid[16],
                uint32_t track_size, char *err, size_t errlen);
int bitmap_copy(struct bitmap **out, struct bitmap *src, const char *path,
                char *err, size_t errlen);
int bitmap_close(struct bitmap *bm, char *err, size_t errlen);
void bitmap_abandon(struct bitmap *bm);
int bitmap_sync(struct bitmap *bm, char *err, size_t errlen);
bool bitmap_was_dirty(const struct bitmap *bm);
uint32_t bitmap_track_size(const struct bitmap *bm);
uint64_t bitmap_nbits(const struct bitmap *bm);
void bitmap_uuid(const struct bitmap *bm, uint8_t out[16]);
bool bitmap_has_file(const struct bitmap *bm);
uint64_t bitmap_sync_count(const struct bitmap *bm);
int64_t bitmap_set_range(struct bitmap *bm, uint64_t off, uint64_t len);
int64_t bitmap_clear_range(struct bitmap *bm, uint64_t off, uint64_t len);
int bitmap_test_range(const struct bitmap *bm, uint64_t off, uint64_t len);
int64_t bitmap_set_bits(struct bitmap *bm, uint64_t first, uint64_t last);
int64_t bitmap_clear_bits(struct bitmap *bm, uint64_t first, uint64_t last);
bool bitmap_set_bit(struct bitmap *bm, uint64_t i);
bool bitmap_clear_bit(struct bitmap *bm, uint64_t i);
bool bitmap_test_bit(const struct bitmap *bm, uint64_t i);
uint64_t bitmap_count(const struct bitmap *bm);
uint64_t bitmap_find_next(const struct bitmap *bm, uint64_t i);
uint64_t bitmap_find_next_zero(const struct bitmap *bm, uint64_t i);
int64_t bitmap_merge(struct bitmap *dst, const struct bitmap *src);
int64_t bitmap_subtract(struct bitmap *dst, const struct bitmap *src);
void bitmap_clear_all(struct bitmap *bm);

/* actlog.h */
struct actlog;
struct actlog_stats {
    uint64_t transactions;
    uint64_t evictions;
    uint64_t waits;
    uint32_t active;
    uint32_t slots;
    uint64_t extent_size;
    uint64_t last_txn;
};
int actlog_create(struct actlog **out, const char *path, const uint8_t uuid[16],
                  uint64_t extent_size, uint32_t slots, char *err, size_t errlen);
int actlog_open(struct actlog **out, const char *path, const uint8_t uuid[16], char *err,
                size_t errlen);
void actlog_close(struct actlog *al);
uint64_t actlog_extent_size(const struct actlog *al);
uint32_t actlog_slots(const struct actlog *al);
void actlog_stats(struct actlog *al, struct actlog_stats *st);
size_t actlog_recovered(const struct actlog *al, uint64_t *out, size_t cap);
size_t actlog_active(struct actlog *al, uint64_t *out, size_t cap);
int64_t actlog_recover_into(const struct actlog *al, struct bitmap *bm, char *err,
                            size_t errlen);
int actlog_begin(struct actlog *al, uint64_t off, uint64_t len, struct bitmap *sync_first);
void actlog_end(struct actlog *al, uint64_t off, uint64_t len);
int actlog_quiesce(struct actlog *al, struct bitmap *bm, char *err, size_t errlen);

/* ring.h (the parts the wrapper uses) */
struct ring_stats {
    uint64_t capacity;
    uint64_t bytes_used;
    uint64_t bytes_unsent;
    uint64_t records_held;
    uint64_t oldest_seq;
    uint64_t newest_seq;
    uint64_t drops;
    bool dropped;
};
int64_t ring_tokens(const unsigned char *span, size_t len, unsigned char *out, size_t cap);

/* core.h */
#define CORE_FUA 1
struct core;
struct core_result {
    uint64_t seq;
    bool queued;
};
struct core_stats {
    uint64_t writes, trims, zeros, flushes;
    uint64_t bytes_written;
    uint64_t not_queued;
    uint64_t large_ranges;
    uint64_t history_errors;
};
int core_open(struct core **out, const char *device_path, uint64_t size, struct bitmap *oos,
              struct actlog *al, size_t ring_size, uint64_t first_seq,
              const char *history_path, char *err, size_t errlen);
int core_close(struct core *c, bool clean, char *err, size_t errlen);
int core_write(struct core *c, const void *buf, uint64_t len, uint64_t off, uint32_t flags,
               uint32_t volume, struct core_result *res);
int core_trim(struct core *c, uint64_t off, uint64_t len, uint32_t flags, uint32_t volume,
              struct core_result *res);
int core_zero(struct core *c, uint64_t off, uint64_t len, uint32_t flags, uint32_t volume,
              struct core_result *res);
int core_flush(struct core *c, uint32_t volume, struct core_result *res);
int64_t core_pread(struct core *c, void *buf, uint64_t len, uint64_t off, bool locked);
uint64_t core_next_seq(struct core *c);
void core_stats(struct core *c, struct core_stats *st);
uint32_t core_pending(struct core *c, uint64_t track);
bool core_wait(struct core *c, int64_t timeout_ns);
void core_kick(struct core *c);
size_t core_peek(struct core *c, size_t max, const unsigned char **ptr);
int core_advance(struct core *c, size_t n);
int64_t core_release(struct core *c, uint64_t seq);
int core_rewind(struct core *c, uint64_t seq);
void core_ring_stats(struct core *c, struct ring_stats *st);
void core_drop(struct core *c);
bool core_dropped(struct core *c);
int core_resume(struct core *c, uint64_t first_seq);
void core_set_clear_on_release(struct core *c, bool on);
bool core_clear_on_release(struct core *c);
void core_fence(struct core *c);
void core_unfence(struct core *c);
int core_set_cr(struct core *c, struct bitmap *cr);
int core_freeze(struct core *c, struct bitmap *frozen, struct bitmap *cr, size_t collide_cap,
                bool stream, uint64_t *base);
int64_t core_drain_track(struct core *c, uint64_t t, void *buf, size_t cap);
int64_t core_collisions(struct core *c, void *out, size_t cap);
bool core_collision_overflowed(struct core *c);
void core_thaw(struct core *c);
"""

ffibuilder = make_builder()


def build_in_place() -> str:
    """Compile replicator/_core*.so next to replicator/__init__.py."""
    tmpdir = os.path.join(ROOT_DIR, "build", "cffi-core")
    os.makedirs(tmpdir, exist_ok=True)
    so = make_builder(absolute=True).compile(tmpdir=tmpdir, verbose=False)
    pkg = os.path.join(ROOT_DIR, "replicator")
    dest = os.path.join(pkg, os.path.basename(so))
    # One module file only: a stale _core.abi3.so (pip) or
    # _core.cpython-*.so (here) must not shadow the fresh one.
    for f in os.listdir(pkg):
        if f.startswith("_core.") and f.endswith(".so") and os.path.join(pkg, f) != dest:
            os.unlink(os.path.join(pkg, f))
    os.replace(so, dest)
    return dest


if __name__ == "__main__":
    print(build_in_place(), file=sys.stderr)

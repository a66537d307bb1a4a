/*
 * bitmap.h: a track bitmap (one bit per track of the device), optionally
 * backed by a file.
 *
 * File layout: a 4 KiB header (magic "DPXBMAP\0", version, resource UUID,
 * track size, bit count, state CLEAN/DIRTY, CRC32C of the bits, CRC32C of
 * the header) followed by the bits, padded to 4 KiB pages.
 *
 * The bits live in memory and reach the file only at bitmap_sync(): the
 * on-disk bits are exactly "as of the last sync", as after a power loss.
 * The activity log (actlog.h) covers what changed since. Opening a file
 * marks its header DIRTY durably before anything can change; a clean
 * bitmap_close() writes the bits, their checksum and CLEAN.
 *
 * Bit operations are lock-free (atomic fetch_or/fetch_and on 64-bit words)
 * and safe from many threads. bitmap_sync() calls are serialised inside.
 * Anonymous bitmaps (path NULL) have no file; sync on them is a no-op.
 */
#ifndef DUPLEX_BITMAP_H
#define DUPLEX_BITMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BITMAP_VERSION 1
#define BITMAP_HEADER_SIZE 4096
#define BITMAP_NONE UINT64_MAX

struct bitmap;

/* Create a bitmap of nbits zero bits. path NULL: in memory only. A file is
 * built beside path and renamed over it, so a crash leaves either the old
 * file or the complete new one. 0 or -errno with a message in err. */
int bitmap_create(struct bitmap **out, const char *path, const uint8_t uuid[16],
                  uint32_t track_size, uint64_t nbits, char *err, size_t errlen);

/* Open an existing bitmap file for writing after validating it (see the
 * file comment); marks it DIRTY durably. 0 or -errno with a message. */
int bitmap_open(struct bitmap **out, const char *path, const uint8_t uuid[16],
                uint32_t track_size, char *err, size_t errlen);

/* A new bitmap with src's geometry and content (a freeze). path NULL: in
 * memory; else a durable file. */
int bitmap_copy(struct bitmap **out, struct bitmap *src, const char *path,
                char *err, size_t errlen);

/* Clean close: sync, write CLEAN with the bits checksum, free. The bitmap
 * is freed even on error (the file then stays DIRTY). 0 or -errno. */
int bitmap_close(struct bitmap *bm, char *err, size_t errlen);

/* Free without writing anything, as a crash would leave the file. */
void bitmap_abandon(struct bitmap *bm);

/* Write changed pages and fdatasync. 0 or -errno. */
int bitmap_sync(struct bitmap *bm, char *err, size_t errlen);

bool bitmap_was_dirty(const struct bitmap *bm);
uint32_t bitmap_track_size(const struct bitmap *bm);
uint64_t bitmap_nbits(const struct bitmap *bm);
void bitmap_uuid(const struct bitmap *bm, uint8_t out[16]);
bool bitmap_has_file(const struct bitmap *bm);
uint64_t bitmap_sync_count(const struct bitmap *bm);

/* Byte ranges map to the tracks they touch. Out of range: -ERANGE.
 * set/clear return the number of bits they changed. */
int64_t bitmap_set_range(struct bitmap *bm, uint64_t off, uint64_t len);
int64_t bitmap_clear_range(struct bitmap *bm, uint64_t off, uint64_t len);
int bitmap_test_range(const struct bitmap *bm, uint64_t off, uint64_t len); /* 1 any set, 0, -ERANGE */

/* Track-index ranges [first, last] (inclusive); the caller checks bounds. */
int64_t bitmap_set_bits(struct bitmap *bm, uint64_t first, uint64_t last);
int64_t bitmap_clear_bits(struct bitmap *bm, uint64_t first, uint64_t last);

/* Single bits; the caller checks i < nbits. set/clear return the old bit. */
bool bitmap_set_bit(struct bitmap *bm, uint64_t i);
bool bitmap_clear_bit(struct bitmap *bm, uint64_t i);
bool bitmap_test_bit(const struct bitmap *bm, uint64_t i);

uint64_t bitmap_count(const struct bitmap *bm);
/* First set bit >= i, or BITMAP_NONE. */
uint64_t bitmap_find_next(const struct bitmap *bm, uint64_t i);
/* First clear bit >= i, or nbits when every bit from i on is set. */
uint64_t bitmap_find_next_zero(const struct bitmap *bm, uint64_t i);

/* dst |= src, dst &= ~src. Same UUID, track size and bit count, else
 * -EINVAL. Return the number of bits changed in dst. */
int64_t bitmap_merge(struct bitmap *dst, const struct bitmap *src);
int64_t bitmap_subtract(struct bitmap *dst, const struct bitmap *src);

void bitmap_clear_all(struct bitmap *bm);

#endif /* DUPLEX_BITMAP_H */

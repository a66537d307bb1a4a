/*
 * actlog.h: the activity log (DRBD's AL).
 *
 * The device is cut into extents (a multiple of the bitmap's track size).
 * At most `slots` extents are active. Before a write may touch an extent
 * that is not active, actlog_begin() persists the new active set as one
 * transaction (write-ahead: pwrite + fdatasync before it returns); writes
 * to active extents cost no I/O. So the OOS bitmap can be written back
 * lazily: after a crash, every extent in the last durable transaction
 * counts as dirty (actlog_recover_into).
 *
 * Eviction keeps the invariant: an extent leaves the set only when it has
 * nothing in flight, and only after the OOS bitmap was synced (its bits
 * for that extent are durable), and only then is the transaction without
 * it written. When every slot is in flight, actlog_begin() waits.
 *
 * File layout: a 4 KiB header (magic "DPXACTL\0", version, resource UUID,
 * extent size, slots, block size, CRC32C) and two transaction blocks used
 * alternately (transaction n goes to block n % 2), so a torn write of one
 * leaves the other. A transaction: magic "DPXALTX\0", number, UUID, count,
 * CRC32C, then `count` u32 extent numbers.
 *
 * All functions are thread-safe.
 */
#ifndef DUPLEX_ACTLOG_H
#define DUPLEX_ACTLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct bitmap;
struct actlog;

#define ACTLOG_VERSION 1

struct actlog_stats {
	uint64_t transactions; /* written since open */
	uint64_t evictions;
	uint64_t waits; /* begins that waited for a slot */
	uint32_t active;
	uint32_t slots;
	uint64_t extent_size;
	uint64_t last_txn;
};

/* Create (or replace) an AL file with an empty active set. */
int actlog_create(struct actlog **out, const char *path, const uint8_t uuid[16],
                  uint64_t extent_size, uint32_t slots, char *err, size_t errlen);

/* Open and validate; the newest valid transaction becomes both the
 * recovery set and the starting active set. Fails with a reason for a torn
 * or foreign file or when both transaction blocks are damaged. */
int actlog_open(struct actlog **out, const char *path, const uint8_t uuid[16], char *err,
                size_t errlen);

/* Free. No I/O: the durable active set stays as it is (see quiesce). */
void actlog_close(struct actlog *al);

uint64_t actlog_extent_size(const struct actlog *al);
uint32_t actlog_slots(const struct actlog *al);
void actlog_stats(struct actlog *al, struct actlog_stats *st);

/* Extents of the recovery set (the durable set found at open, or empty
 * after create). Returns the count; writes at most cap of them. */
size_t actlog_recovered(const struct actlog *al, uint64_t *out, size_t cap);

/* Current in-memory active set. Returns the count; writes at most cap. */
size_t actlog_active(struct actlog *al, uint64_t *out, size_t cap);

/* OR every track of every recovered extent into bm. Returns the number of
 * bits that were newly set, or -errno (extent size not a multiple of the
 * bitmap's track size) with a message. */
int64_t actlog_recover_into(const struct actlog *al, struct bitmap *bm, char *err,
                            size_t errlen);

/* Make the extents of [off, off+len) active, taking one in-flight
 * reference on each. sync_first: the bitmap to sync before evicting
 * (NULL: none). 0; -E2BIG when the range needs more extents than there
 * are slots (the caller must make its marks durable another way); -EFBIG
 * for an extent number past 2^32; -errno after an I/O error (the log then
 * stays failed). */
int actlog_begin(struct actlog *al, uint64_t off, uint64_t len, struct bitmap *sync_first);

/* Drop the in-flight references actlog_begin() took for the same range. */
void actlog_end(struct actlog *al, uint64_t off, uint64_t len);

/* Wait until nothing is in flight, sync bm (if given), then write an
 * empty transaction: a clean state in which recovery marks nothing. */
int actlog_quiesce(struct actlog *al, struct bitmap *bm, char *err, size_t errlen);

#endif /* DUPLEX_ACTLOG_H */

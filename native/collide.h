/*
 * collide.h: the collision queue of a catch-up increment (DESIGN §4).
 *
 * While an increment drains its frozen tracks, a write aimed at a track
 * that is still frozen must first copy that track's current content into
 * the increment, so the increment stays exactly the device at the freeze.
 * The write path pushes such copies here (under the track's lock, before
 * the write reaches the device); the shipper takes them out.
 *
 * The queue is bounded. When a copy does not fit, the queue records the
 * overflow and drops nothing silently: the increment can no longer be a
 * point-in-time image and the caller must start another one.
 */
#ifndef DUPLEX_COLLIDE_H
#define DUPLEX_COLLIDE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct collide;

/* Each entry, as collide_take() lays it out: u64 offset (logical), u32 length,
 * u32 zero, then the data padded to 8 bytes. */
#define COLLIDE_ENTRY_HEADER 16

int collide_create(struct collide **out, size_t cap);
void collide_destroy(struct collide *q);

/* Forget every entry and the overflow flag; new capacity cap. */
int collide_reset(struct collide *q, size_t cap);

/* Read len bytes at dev_off from fd into a new entry that records
 * entry_off as its offset (the core passes the track's LOGICAL offset and
 * reads its volume's device at the volume-relative one). 0, -ENOSPC
 * (overflow is now flagged) or -errno of the read. */
int collide_push_read(struct collide *q, int fd, uint64_t dev_off, uint32_t len,
                      uint64_t entry_off);

/* Move whole entries, oldest first, into out (at most cap bytes; a single
 * entry larger than cap is never split: returns -ENOBUFS). Bytes copied. */
int64_t collide_take(struct collide *q, void *out, size_t cap);

bool collide_overflowed(struct collide *q);
size_t collide_bytes(struct collide *q);

#endif

/*
 * core.h: the primary's write path, one call per request (DESIGN §3).
 *
 * core_write/trim/zero:
 *   1. lock the tracks' stripes (ascending, so overlapping writes are
 *      serialised and disjoint ones are not);
 *   2. make the range's extents active in the activity log (write-ahead),
 *      count the write as pending on its tracks, set their OOS (and CR) bits;
 *   3. write the device;
 *   4. under the sequencer: next seq, CLOCK_REALTIME timestamp, reserve
 *      the record in the send ring (and append it to the history file);
 *      then fill and commit the record outside the sequencer;
 *   5. end the activity-log range, unlock.
 * Seq is assigned after the local write while the track locks are held:
 * overlapping writes get seqs in disk order, and a write issued after
 * another returned gets the larger seq.
 *
 * Pending counts: each track counts the writes in flight or queued and not
 * yet released that touch it. core_release() clears a track's OOS bit when
 * its count reaches 0, unless bit clearing is off: a ring drop turns it off
 * (the writes made while dropped exist only as OOS bits), and only the
 * owner turns it back on, once a catch-up has shipped them.
 *
 * Volumes (replicator/layout.py has the same arithmetic in Python): a
 * resource's volumes lie end to end in one LOGICAL address space, volume i
 * at logical base b_i, b_0 = 0, b_{i+1} = round_up(b_i + size_i, track
 * size). A track never spans two volumes; a volume's last track may be
 * partial and the rest of it (the alignment gap) is nobody's. One OOS
 * bitmap, CR bitmap, activity log, set of track locks and sequencer cover
 * the logical space, so a freeze fences every volume at one instant and
 * Ahead, catch-up, verify and recovery span every volume unchanged.
 *   - core_write/trim/zero take (volume, volume-relative offset), mark and
 *     lock at logical b_v + off, do the I/O on volume v's device at off,
 *     and the record carries (volume, off).
 *   - core_flush fdatasyncs every volume; its one FLUSH record has volume
 *     REC_FLUSH_VOLUME (records.h).
 *   - core_pread, core_drain_track and the collision entries use LOGICAL
 *     offsets: a read is cut at the end of the volume holding its first
 *     byte, and the alignment gap reads as nothing (0 bytes).
 * A single device is one volume at base 0 (core_open_device): logical
 * offsets are device offsets, exactly as before volumes existed.
 *
 * The bitmaps, activity log and history stay owned by the caller and must
 * outlive the core. Every call is thread-safe except core_close().
 */
#ifndef DUPLEX_CORE_H
#define DUPLEX_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flow.h"
#include "ring.h"

struct bitmap;
struct actlog;
struct core;

#define CORE_FUA 1u

/* What a request got: its seq and whether its record is in the ring
 * (false: done locally and marked out of sync only). */
struct core_result {
	uint64_t seq;
	bool queued;
};

struct core_stats {
	uint64_t writes, trims, zeros, flushes;
	uint64_t bytes_written;
	uint64_t not_queued;   /* requests done locally but not queued */
	uint64_t large_ranges; /* ranges too large for the activity log */
	uint64_t history_errors;
};

/* One volume: its device (regular file or block device), the bytes it
 * exports (<= the device's size) and its logical base (see above). */
struct core_volume {
	const char *path;
	uint64_t size;
	uint64_t base;
};

/* Open n >= 1 volumes read-write, one fd each. The bases must be exactly
 * the layout above (-EINVAL naming the volume otherwise), and no two
 * volumes may be the same file or device. oos covers the logical size
 * (last base + last size); al's extent size is a multiple of oos's track
 * size. history_path: NULL or a file that receives every record in seq
 * order (test aid). 0 or -errno with a message. */
int core_open(struct core **out, const struct core_volume *vols, uint32_t n, struct bitmap *oos,
              struct actlog *al, size_t ring_size, uint64_t first_seq,
              const char *history_path, char *err, size_t errlen);

/* core_open of one volume at base 0: a single device of size bytes. */
int core_open_device(struct core **out, const char *device_path, uint64_t size,
                     struct bitmap *oos, struct actlog *al, size_t ring_size, uint64_t first_seq,
                     const char *history_path, char *err, size_t errlen);

uint32_t core_nvolumes(struct core *c);

/* clean: fdatasync every volume, then quiesce the activity log (sync oos,
 * empty transaction). Frees the core in any case. 0 or -errno. */
int core_close(struct core *c, bool clean, char *err, size_t errlen);

/* 0 with *res set, or -errno (nothing sequenced). -EINVAL for a volume
 * >= n or a range past the volume's end: no device is touched. */
int core_write(struct core *c, const void *buf, uint64_t len, uint64_t off, uint32_t flags,
               uint32_t volume, struct core_result *res);
int core_trim(struct core *c, uint64_t off, uint64_t len, uint32_t flags, uint32_t volume,
              struct core_result *res);
int core_zero(struct core *c, uint64_t off, uint64_t len, uint32_t flags, uint32_t volume,
              struct core_result *res);
/* fdatasync every volume, sync the OOS bitmap, append one FLUSH record. */
int core_flush(struct core *c, struct core_result *res);

/* Group point marker (DESIGN §13): one MARK record (ring.h) with ts = t,
 * offset = number and the note as its data, sequenced only once this
 * core's clock has passed t, so every record stamped at or before t is
 * ahead of it in seq order (insertion is atomic with stamping: both happen
 * under the sequencer). t = 0: a heartbeat stamped now. -ETIMEDOUT
 * (nothing sequenced) when the clock is more than 10 s behind t, -EINVAL
 * for a note over REC_MARK_MAX. res->queued is false while the ring is
 * dropped. */
int core_mark(struct core *c, uint64_t t, uint64_t number, const void *note, uint32_t note_len,
              struct core_result *res);
/* Shift this core's clock (tests inject skew between primaries). */
void core_set_clock_offset(struct core *c, int64_t offset_ns);
/* The core's clock: CLOCK_REALTIME plus the offset, in ns. */
uint64_t core_now(struct core *c);

/* Read at a LOGICAL offset, cut at the end of the volume holding off (0
 * bytes when off is in an alignment gap). locked: hold the track locks (a
 * snapshot of the range no write is half-way through). Bytes read, or
 * -errno (-EINVAL: the range runs past the logical end). */
int64_t core_pread(struct core *c, void *buf, uint64_t len, uint64_t off, bool locked);

uint64_t core_next_seq(struct core *c);
void core_stats(struct core *c, struct core_stats *st);
uint32_t core_pending(struct core *c, uint64_t track);

/* Consumer side (one consumer thread). */
bool core_wait(struct core *c, int64_t timeout_ns);
bool core_wait_bytes(struct core *c, uint64_t want, int64_t timeout_ns);
void core_kick(struct core *c);
uint64_t core_kicks(struct core *c);
size_t core_peek(struct core *c, size_t max, const unsigned char **ptr);
int core_advance(struct core *c, size_t n);
int64_t core_release(struct core *c, uint64_t seq);
int core_rewind(struct core *c, uint64_t seq);
void core_ring_stats(struct core *c, struct ring_stats *st);

/* Go Ahead on purpose: drop the ring (bit clearing turns off). */
void core_drop(struct core *c);
bool core_dropped(struct core *c);
/* Leave DROPPED: empty ring, next seq = first_seq (>= next seq, else
 * -EINVAL; -EALREADY when not dropped). Bit clearing stays off. */
int core_resume(struct core *c, uint64_t first_seq);
void core_set_clear_on_release(struct core *c, bool on);
bool core_clear_on_release(struct core *c);

/* Flow control (flow.h): the shipper sets the policy as the link comes
 * and goes (fill 0 or over the ring's size: the ring's size), and reports
 * what the peer holds. */
void core_set_flow(struct core *c, const struct flow_policy *p);
void core_get_flow(struct core *c, struct flow_policy *out);
void core_set_durable(struct core *c, uint64_t seq);
void core_flow_stats(struct core *c, struct flow_stats *st);

/* Write fence: waits for requests in flight and holds off new ones. */
void core_fence(struct core *c);
void core_unfence(struct core *c);
/* CR hook: requests from now on also mark cr (NULL: none); each request
 * uses the old or the new one. For an exact cut, call it between
 * core_fence() and core_unfence(). -EINVAL when its geometry differs from
 * the OOS bitmap's. */
int core_set_cr(struct core *c, struct bitmap *cr);

/* Catch-up increments (DESIGN §4). core_freeze, under the write fence:
 * copy the OOS bitmap into frozen, start recording writes in cr, arm the
 * collision rule (a write to a track still set in frozen first copies the
 * track into the collision queue of collide_cap bytes and clears it), and
 * with stream resume a dropped ring at the next seq. *base: the last seq
 * before this instant. core_drain_track: take track t from the frozen map
 * (logical) and read it into buf, cut at its volume's end (bytes read; 0
 * if a write already took it).
 * core_collisions: move queued copies out (collide.h entry layout).
 * core_thaw: disarm the collision rule. */
int core_freeze(struct core *c, struct bitmap *frozen, struct bitmap *cr, size_t collide_cap,
                bool stream, uint64_t *base);
int64_t core_drain_track(struct core *c, uint64_t t, void *buf, size_t cap);
int64_t core_collisions(struct core *c, void *out, size_t cap);
bool core_collision_overflowed(struct core *c);
void core_thaw(struct core *c);

#endif /* DUPLEX_CORE_H */

/*
 * ring.h: the send ring.
 *
 * A bounded buffer of records in the replicator/records.py encoding
 * (48-byte header + data padded to 8; CRC32C in the header). Producers
 * reserve space in seq order (the caller serialises reservations, see
 * core.c), fill the record without any lock, then commit; the consumer
 * sees records strictly in reservation order, and only up to the first one
 * not yet committed. A record is never split across the end of the buffer:
 * a skip marker (8 bytes of 0xff, a seq no record has) sends the reader
 * back to the start, so the consumer reads spans of whole records in
 * place, without a copy.
 *
 * Cursors: tail (oldest held record) <= send (next to send) <= published
 * (end of committed records) <= head (end of reservations). Records stay
 * held after they are sent, until ring_release(), so they can be sent
 * again after a reconnect (ring_rewind()).
 *
 * Overflow never blocks and never drops silently: the reservation that
 * does not fit fails with -ENOSPC and the ring becomes DROPPED. While
 * DROPPED every held record counts as discarded (nothing can be peeked,
 * released or rewound to), every reservation fails with -EPIPE ("not
 * queued"), and reservations still being filled are committed as
 * discarded. ring_reset() leaves DROPPED with an empty ring.
 *
 * Consumer calls (wait, peek, advance, release, rewind, reset) are for one
 * consumer thread at a time; producer calls for any number of threads.
 */
#ifndef DUPLEX_RING_H
#define DUPLEX_RING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define RING_HEADER 48
#define RING_SKIP UINT64_MAX

/* Record header field offsets (records.py HEADER "<QQQIIIBBHII"). */
#define REC_SEQ 0
#define REC_TS 8
#define REC_OFFSET 16
#define REC_LENGTH 24
#define REC_DATA_LEN 28
#define REC_VOLUME 32
#define REC_OP 36
#define REC_FLAGS 37
#define REC_CRC 40

#define REC_OP_WRITE 1
#define REC_OP_TRIM 2
#define REC_OP_ZERO 3
#define REC_OP_FLUSH 4
/* A group point marker (DESIGN §13): volume 0, offset = checkpoint number
 * (0: a heartbeat), ts = the point T, data (length == data_len, at most
 * REC_MARK_MAX) = the group's JSON note (members, clock skew). Every record
 * stamped at or before ts precedes it in seq order. */
#define REC_OP_MARK 5
#define REC_MARK_MAX 4096
#define REC_FLAG_FUA 1

struct ring;

/* A reservation: lives with its producer (e.g. on its stack) from
 * ring_reserve() to ring_commit(). The producer writes len bytes at ptr. */
struct ring_resv {
	unsigned char *ptr;
	size_t len;
	uint64_t pos, end; /* ring-internal */
	struct ring_resv *prev, *next;
	bool discarded;
};

struct ring_stats {
	uint64_t capacity;
	uint64_t bytes_used;   /* held, including skipped tail space */
	uint64_t bytes_unsent; /* committed and not yet sent */
	uint64_t records_held; /* reserved and not released */
	uint64_t oldest_seq;   /* valid when records_held > 0 */
	uint64_t newest_seq;   /* valid when records_held > 0 */
	uint64_t drops;        /* times the ring was dropped */
	bool dropped;
};

/* size: bytes of buffer (>= 4096; rounded down to a multiple of 8).
 * first_seq: seq of the first record that will be appended. */
int ring_create(struct ring **out, size_t size, uint64_t first_seq);
void ring_destroy(struct ring *ring);

/* Reserve len bytes (a whole record: multiple of 8, >= 48) for the record
 * with this seq. 0; -ENOSPC: did not fit, the ring is now DROPPED;
 * -EPIPE: the ring was already DROPPED; -EINVAL: bad length. */
int ring_reserve(struct ring *ring, size_t len, uint64_t seq, struct ring_resv *r);
/* The same, but the ring may hold at most limit bytes (<= its size) with
 * this record: over it, drop (as above) or, when !drop, -EAGAIN (nothing
 * changed: wait for room with ring_wait_room and try again). A record that
 * can never fit under limit drops the ring even when !drop. */
int ring_reserve_within(struct ring *ring, size_t len, uint64_t seq, uint64_t limit, bool drop,
                        struct ring_resv *r);
/* Wait until a record of len bytes fits under limit (releases make room),
 * the ring is dropped, reset or empty, ring_wake_room() is called, or the
 * CLOCK_MONOTONIC deadline_ns passes (< 0: no deadline). False only on
 * the deadline with no room; the caller's retry sees what changed. */
bool ring_wait_room(struct ring *ring, size_t len, uint64_t limit, int64_t deadline_ns);
/* Wake every ring_wait_room() (its policy changed: the caller re-checks). */
void ring_wake_room(struct ring *ring);

/* Publish a filled reservation. True: queued. False: a drop discarded it
 * while it was being filled. */
bool ring_commit(struct ring *ring, struct ring_resv *r);

/* Enter DROPPED now (e.g. the peer is unreachable). */
void ring_drop(struct ring *ring);
bool ring_dropped(struct ring *ring);

/* Wait up to timeout_ns for records to send. True when there are; false on
 * timeout, drop or ring_kick(). */
bool ring_wait(struct ring *ring, int64_t timeout_ns);
/* The same, until at least want bytes are ready to send (a full batch). */
bool ring_wait_bytes(struct ring *ring, uint64_t want, int64_t timeout_ns);
void ring_kick(struct ring *ring);
/* How many times ring_kick() was called. */
uint64_t ring_kicks(struct ring *ring);

/* A contiguous span of whole committed records from the send cursor: up to
 * max bytes, but at least one record when any. Returns its length (0: none)
 * and sets *ptr. Valid until the records are released or the ring reset. */
size_t ring_peek(struct ring *ring, size_t max, const unsigned char **ptr);

/* Move the send cursor past n bytes of whole records (as peeked).
 * 0; -EINVAL: n does not end on a record boundary within committed data;
 * -EPIPE: dropped. */
int ring_advance(struct ring *ring, size_t n);

/* Called with each record's header by release and reset. */
typedef void (*ring_record_fn)(void *ctx, const unsigned char *hdr);

/* Free every held record with seq <= seq, calling fn on each first.
 * Returns the number released (0 when dropped). */
uint64_t ring_release(struct ring *ring, uint64_t seq, ring_record_fn fn, void *ctx);

/* Send again from the first held record with seq > seq. 0; -ERANGE: the
 * record seq + 1 is no longer held; -EPIPE: dropped. */
int ring_rewind(struct ring *ring, uint64_t seq);

/* Empty the ring and leave DROPPED; the next record will carry first_seq.
 * Waits for reservations being filled, then calls fn on every record it
 * throws away (held or discarded). */
void ring_reset(struct ring *ring, uint64_t first_seq, ring_record_fn fn, void *ctx);

void ring_stats(struct ring *ring, struct ring_stats *st);

/* Copy the 48-byte headers of the records packed in span into out.
 * Returns bytes written, or -EINVAL if span is not whole records, -ENOSPC
 * if out is too small. */
int64_t ring_tokens(const unsigned char *span, size_t len, unsigned char *out, size_t cap);

#endif /* DUPLEX_RING_H */

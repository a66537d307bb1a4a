/*
 * ring.c: the send ring (see ring.h for the contract).
 *
 * Cursors are virtual byte positions that only grow; the buffer index is
 * position % size. Reservations being filled are kept in a list ordered
 * by position: `published` is the start of the oldest one (or head when
 * none), so a slow producer holds back the consumer but never lets it read
 * a half-written record.
 */
#include "ring.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

struct ring {
	unsigned char *buf;
	size_t size;
	size_t map_size;

	pthread_mutex_t lock;
	pthread_cond_t data_cond; /* consumer waits for records */
	pthread_cond_t idle_cond; /* reset waits for reservations to finish */
	pthread_cond_t room_cond; /* producers wait for room (on-congestion block) */

	uint64_t head, published, send, tail;
	struct ring_resv *rfirst, *rlast;
	bool dropped;
	uint64_t nrec;             /* records in [tail, head) */
	uint64_t first_unreleased; /* seq of the oldest record not released */
	uint64_t newest_seq;
	uint64_t kick_gen;
	uint32_t consumer_waiting;
	uint64_t want;             /* bytes the waiting consumer wants ready */
	uint32_t reset_waiting;
	uint32_t room_waiting;     /* producers in ring_wait_room */
	uint64_t drops;
};

static inline uint64_t rd64(const unsigned char *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static inline uint32_t rd32(const unsigned char *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

static inline size_t rec_size(const unsigned char *hdr)
{
	return RING_HEADER + (((size_t)rd32(hdr + REC_DATA_LEN) + 7) & ~(size_t)7);
}

/* Position of the record at virtual position q, past a skip marker. */
static inline uint64_t past_skip(const struct ring *ring, uint64_t q)
{
	size_t phys = q % ring->size;

	if (rd64(ring->buf + phys) == RING_SKIP)
		return q + (ring->size - phys);
	return q;
}

int ring_create(struct ring **out, size_t size, uint64_t first_seq)
{
	struct ring *ring;

	*out = NULL;
	size &= ~(size_t)7;
	if (size < 4096)
		return -EINVAL;
	ring = calloc(1, sizeof(*ring));
	if (ring == NULL)
		return -ENOMEM;
	ring->size = size;
	ring->want = 1;
	ring->map_size = (size + 4095) & ~(size_t)4095;
	/* Populated now: no page faults on the write path later. */
	ring->buf = mmap(NULL, ring->map_size, PROT_READ | PROT_WRITE,
	                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (ring->buf == MAP_FAILED) {
		free(ring);
		return -ENOMEM;
	}
	pthread_mutex_init(&ring->lock, NULL);
	{
		pthread_condattr_t ca;
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&ring->data_cond, &ca);
		pthread_cond_init(&ring->room_cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	pthread_cond_init(&ring->idle_cond, NULL);
	ring->first_unreleased = first_seq;
	*out = ring;
	return 0;
}

void ring_destroy(struct ring *ring)
{
	if (ring == NULL)
		return;
	munmap(ring->buf, ring->map_size);
	pthread_mutex_destroy(&ring->lock);
	pthread_cond_destroy(&ring->data_cond);
	pthread_cond_destroy(&ring->idle_cond);
	pthread_cond_destroy(&ring->room_cond);
	free(ring);
}

/* Enter DROPPED (lock held). */
static void drop_locked(struct ring *ring)
{
	if (ring->dropped)
		return;
	ring->dropped = true;
	ring->drops++;
	for (struct ring_resv *r = ring->rfirst; r != NULL; r = r->next)
		r->discarded = true;
	ring->kick_gen++;
	pthread_cond_broadcast(&ring->data_cond);
	if (ring->room_waiting)
		pthread_cond_broadcast(&ring->room_cond); /* no room will come: stop waiting */
}

/* Bytes the ring would hold with a record of len appended now (lock held). */
static uint64_t used_with(const struct ring *ring, size_t len)
{
	size_t phys = ring->head % ring->size;
	size_t pad = phys + len > ring->size ? ring->size - phys : 0;

	return ring->head + pad + len - ring->tail;
}

int ring_reserve(struct ring *ring, size_t len, uint64_t seq, struct ring_resv *r)
{
	return ring_reserve_within(ring, len, seq, ring->size, true, r);
}

int ring_reserve_within(struct ring *ring, size_t len, uint64_t seq, uint64_t limit, bool drop,
                        struct ring_resv *r)
{
	size_t phys, pad;

	if (len < RING_HEADER || len % 8 != 0)
		return -EINVAL;
	if (limit > ring->size)
		limit = ring->size;
	pthread_mutex_lock(&ring->lock);
	if (ring->dropped) {
		pthread_mutex_unlock(&ring->lock);
		return -EPIPE;
	}
	phys = ring->head % ring->size;
	pad = phys + len > ring->size ? ring->size - phys : 0;
	if (len > ring->size || used_with(ring, len) > limit) {
		/* Only releases make room: with nothing held, waiting is in vain. */
		if (!drop && len <= limit && ring->tail != ring->head) {
			pthread_mutex_unlock(&ring->lock);
			return -EAGAIN;
		}
		drop_locked(ring);
		pthread_mutex_unlock(&ring->lock);
		return -ENOSPC;
	}
	if (pad) /* pad >= 8: positions are multiples of 8 */
		memset(ring->buf + phys, 0xff, 8);
	r->pos = ring->head;
	r->end = ring->head + pad + len;
	r->ptr = ring->buf + (phys + pad) % ring->size;
	r->len = len;
	r->discarded = false;
	r->next = NULL;
	r->prev = ring->rlast;
	if (ring->rlast)
		ring->rlast->next = r;
	else
		ring->rfirst = r;
	ring->rlast = r;
	ring->head = r->end;
	ring->nrec++;
	ring->newest_seq = seq;
	pthread_mutex_unlock(&ring->lock);
	return 0;
}

bool ring_commit(struct ring *ring, struct ring_resv *r)
{
	bool queued;
	uint64_t before;

	pthread_mutex_lock(&ring->lock);
	if (r->prev)
		r->prev->next = r->next;
	else
		ring->rfirst = r->next;
	if (r->next)
		r->next->prev = r->prev;
	else
		ring->rlast = r->prev;
	queued = !r->discarded;
	before = ring->published;
	ring->published = ring->rfirst ? ring->rfirst->pos : ring->head;
	if (ring->published != before && ring->consumer_waiting &&
	    ring->published - ring->send >= ring->want)
		pthread_cond_signal(&ring->data_cond);
	if (ring->rfirst == NULL && ring->reset_waiting)
		pthread_cond_broadcast(&ring->idle_cond);
	pthread_mutex_unlock(&ring->lock);
	return queued;
}

void ring_drop(struct ring *ring)
{
	pthread_mutex_lock(&ring->lock);
	drop_locked(ring);
	pthread_mutex_unlock(&ring->lock);
}

bool ring_dropped(struct ring *ring)
{
	bool d;

	pthread_mutex_lock(&ring->lock);
	d = ring->dropped;
	pthread_mutex_unlock(&ring->lock);
	return d;
}

bool ring_wait_bytes(struct ring *ring, uint64_t want, int64_t timeout_ns)
{
	struct timespec deadline;
	uint64_t gen;
	bool ready;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	if (timeout_ns < 0)
		timeout_ns = 0;
	if (want == 0)
		want = 1;
	deadline.tv_sec += timeout_ns / 1000000000;
	deadline.tv_nsec += timeout_ns % 1000000000;
	if (deadline.tv_nsec >= 1000000000) {
		deadline.tv_sec++;
		deadline.tv_nsec -= 1000000000;
	}
	pthread_mutex_lock(&ring->lock);
	gen = ring->kick_gen;
	ring->want = want;
	while (ring->published - ring->send < want && !ring->dropped && ring->kick_gen == gen) {
		int r;
		ring->consumer_waiting++;
		r = pthread_cond_timedwait(&ring->data_cond, &ring->lock, &deadline);
		ring->consumer_waiting--;
		if (r == ETIMEDOUT)
			break;
	}
	ring->want = 1;
	ready = !ring->dropped && ring->published - ring->send >= want;
	pthread_mutex_unlock(&ring->lock);
	return ready;
}

bool ring_wait_room(struct ring *ring, size_t len, uint64_t limit, int64_t deadline_ns)
{
	struct timespec dl = {(time_t)(deadline_ns / 1000000000), (long)(deadline_ns % 1000000000)};
	const struct timespec *deadline = deadline_ns < 0 ? NULL : &dl;
	bool room;
	bool woken = false;

	if (limit > ring->size)
		limit = ring->size;
	pthread_mutex_lock(&ring->lock);
	while (!ring->dropped && ring->tail != ring->head && used_with(ring, len) > limit) {
		int r;
		ring->room_waiting++;
		if (deadline != NULL)
			r = pthread_cond_timedwait(&ring->room_cond, &ring->lock, deadline);
		else
			r = pthread_cond_wait(&ring->room_cond, &ring->lock);
		ring->room_waiting--;
		if (r == ETIMEDOUT)
			break;
		woken = true; /* a release, a drop, or the policy changed: let the caller look */
		break;
	}
	room = woken || ring->dropped || ring->tail == ring->head || used_with(ring, len) <= limit;
	pthread_mutex_unlock(&ring->lock);
	return room;
}

void ring_wake_room(struct ring *ring)
{
	pthread_mutex_lock(&ring->lock);
	if (ring->room_waiting)
		pthread_cond_broadcast(&ring->room_cond);
	pthread_mutex_unlock(&ring->lock);
}

bool ring_wait(struct ring *ring, int64_t timeout_ns)
{
	return ring_wait_bytes(ring, 1, timeout_ns);
}

uint64_t ring_kicks(struct ring *ring)
{
	uint64_t gen;

	pthread_mutex_lock(&ring->lock);
	gen = ring->kick_gen;
	pthread_mutex_unlock(&ring->lock);
	return gen;
}

void ring_kick(struct ring *ring)
{
	pthread_mutex_lock(&ring->lock);
	ring->kick_gen++;
	pthread_cond_broadcast(&ring->data_cond);
	pthread_mutex_unlock(&ring->lock);
}

size_t ring_peek(struct ring *ring, size_t max, const unsigned char **ptr)
{
	uint64_t pos, pub, limit, q;

	*ptr = NULL;
	pthread_mutex_lock(&ring->lock);
	if (ring->dropped || ring->send == ring->published) {
		pthread_mutex_unlock(&ring->lock);
		return 0;
	}
	/* A skip marker at the send cursor is not data: step over it. */
	ring->send = past_skip(ring, ring->send);
	pos = ring->send;
	pub = ring->published;
	pthread_mutex_unlock(&ring->lock);

	/* [pos, pub) is committed and only this consumer moves send, so the
	 * bytes are stable without the lock. */
	limit = pos + (ring->size - pos % ring->size);
	if (limit > pub)
		limit = pub;
	q = pos;
	while (q < limit) {
		const unsigned char *h = ring->buf + q % ring->size;
		size_t n;
		if (rd64(h) == RING_SKIP)
			break;
		n = rec_size(h);
		if (q > pos && q - pos + n > max)
			break;
		q += n;
	}
	*ptr = ring->buf + pos % ring->size;
	return (size_t)(q - pos);
}

int ring_advance(struct ring *ring, size_t n)
{
	uint64_t q, target;
	int r = 0;

	pthread_mutex_lock(&ring->lock);
	if (ring->dropped) {
		r = -EPIPE;
		goto out;
	}
	if (n == 0)
		goto out;
	if (ring->send == ring->published) {
		r = -EINVAL;
		goto out;
	}
	q = past_skip(ring, ring->send);
	target = q + n;
	if (target > ring->published || q / ring->size != (target - 1) / ring->size) {
		r = -EINVAL;
		goto out;
	}
	while (q < target) {
		const unsigned char *h = ring->buf + q % ring->size;
		if (rd64(h) == RING_SKIP)
			break;
		q += rec_size(h);
	}
	if (q != target) {
		r = -EINVAL;
		goto out;
	}
	ring->send = target;
out:
	pthread_mutex_unlock(&ring->lock);
	return r;
}

uint64_t ring_release(struct ring *ring, uint64_t seq, ring_record_fn fn, void *ctx)
{
	uint64_t q, pub, count = 0, last = 0;

	pthread_mutex_lock(&ring->lock);
	if (ring->dropped) {
		pthread_mutex_unlock(&ring->lock);
		return 0;
	}
	q = ring->tail;
	pub = ring->published;
	pthread_mutex_unlock(&ring->lock);

	/* Callbacks run without the lock, so producers keep appending; the
	 * records stay ours until tail moves below. */
	while (q < pub) {
		const unsigned char *h;
		uint64_t s;
		q = past_skip(ring, q);
		if (q >= pub)
			break;
		h = ring->buf + q % ring->size;
		s = rd64(h + REC_SEQ);
		if (s > seq)
			break;
		if (fn)
			fn(ctx, h);
		q += rec_size(h);
		last = s;
		count++;
	}

	pthread_mutex_lock(&ring->lock);
	if (count) {
		/* Even if a drop happened meanwhile: these records were released
		 * and their callbacks ran, so a later reset must not see them. */
		ring->tail = q;
		if (ring->send < q)
			ring->send = q;
		ring->nrec -= count;
		ring->first_unreleased = last + 1;
		if (ring->room_waiting)
			pthread_cond_broadcast(&ring->room_cond);
	}
	pthread_mutex_unlock(&ring->lock);
	return count;
}

int ring_rewind(struct ring *ring, uint64_t seq)
{
	uint64_t q;
	int r = 0;

	pthread_mutex_lock(&ring->lock);
	if (ring->dropped) {
		r = -EPIPE;
		goto out;
	}
	if (seq + 1 < ring->first_unreleased) {
		r = -ERANGE;
		goto out;
	}
	q = ring->tail;
	while (q < ring->published) {
		const unsigned char *h;
		q = past_skip(ring, q);
		if (q >= ring->published)
			break;
		h = ring->buf + q % ring->size;
		if (rd64(h + REC_SEQ) > seq)
			break;
		q += rec_size(h);
	}
	if (q > ring->published)
		q = ring->published;
	ring->send = q;
out:
	pthread_mutex_unlock(&ring->lock);
	return r;
}

void ring_reset(struct ring *ring, uint64_t first_seq, ring_record_fn fn, void *ctx)
{
	uint64_t q;

	pthread_mutex_lock(&ring->lock);
	/* Reservations being filled must finish: their headers are not
	 * readable yet, and their producers will touch the buffer. */
	while (ring->rfirst != NULL) {
		ring->reset_waiting++;
		pthread_cond_wait(&ring->idle_cond, &ring->lock);
		ring->reset_waiting--;
	}
	q = ring->tail;
	while (q < ring->head) {
		const unsigned char *h;
		q = past_skip(ring, q);
		if (q >= ring->head)
			break;
		h = ring->buf + q % ring->size;
		if (fn)
			fn(ctx, h);
		q += rec_size(h);
	}
	ring->tail = ring->send = ring->published = ring->head;
	ring->nrec = 0;
	ring->dropped = false;
	ring->first_unreleased = first_seq;
	if (ring->room_waiting)
		pthread_cond_broadcast(&ring->room_cond);
	pthread_mutex_unlock(&ring->lock);
}

void ring_stats(struct ring *ring, struct ring_stats *st)
{
	pthread_mutex_lock(&ring->lock);
	st->capacity = ring->size;
	st->dropped = ring->dropped;
	st->drops = ring->drops;
	if (ring->dropped) {
		st->bytes_used = st->bytes_unsent = st->records_held = 0;
		st->oldest_seq = st->newest_seq = 0;
	} else {
		st->bytes_used = ring->head - ring->tail;
		st->bytes_unsent = ring->published - ring->send;
		st->records_held = ring->nrec;
		st->oldest_seq = ring->first_unreleased;
		st->newest_seq = ring->newest_seq;
	}
	pthread_mutex_unlock(&ring->lock);
}

int64_t ring_tokens(const unsigned char *span, size_t len, unsigned char *out, size_t cap)
{
	size_t q = 0, w = 0;

	while (q < len) {
		size_t n;
		if (len - q < RING_HEADER || rd64(span + q) == RING_SKIP)
			return -EINVAL;
		n = rec_size(span + q);
		if (n > len - q)
			return -EINVAL;
		if (cap - w < RING_HEADER)
			return -ENOSPC;
		memcpy(out + w, span + q, RING_HEADER);
		w += RING_HEADER;
		q += n;
	}
	return (int64_t)w;
}

/*
 * flow.c: the primary's write-path flow control (see flow.h).
 *
 * lock guards durable_seq, release_gen and the peer-wait counters; the
 * policy is a set of atomics read once per request (no lock on the hot
 * path when every wait is off); the other counters are atomics.
 */
#include "flow.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

/* A peer waiter looks at the policy this often even when nobody wakes it
 * (a shipper that died cannot leave a writer stuck for good). */
#define RECHECK_NS 200000000ll

struct flow {
	_Atomic bool wait_peer, block;
	_Atomic uint64_t fill;
	_Atomic int64_t block_timeout_ns;
	_Atomic uint64_t rate_bps;

	pthread_mutex_t pace_lock; /* guards next_ns: the bucket's next free instant */
	int64_t next_ns;

	pthread_mutex_t lock;
	pthread_cond_t durable_cond;
	uint64_t durable_seq;
	_Atomic uint64_t release_gen; /* written under lock; read without it by flow_gen */
	uint64_t peer_waiting;

	_Atomic uint64_t peer_waits, peer_wait_ns, room_waits, room_wait_ns, room_waiting,
	    room_timeouts, delays, delay_total_ns, releases;
};

int64_t flow_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int flow_create(struct flow **out, uint64_t fill)
{
	struct flow *f = calloc(1, sizeof(*f));
	pthread_condattr_t ca;

	*out = NULL;
	if (f == NULL)
		return -ENOMEM;
	pthread_mutex_init(&f->lock, NULL);
	pthread_mutex_init(&f->pace_lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&f->durable_cond, &ca);
	pthread_condattr_destroy(&ca);
	atomic_store(&f->fill, fill);
	atomic_store(&f->block_timeout_ns, -1);
	*out = f;
	return 0;
}

void flow_destroy(struct flow *f)
{
	if (f == NULL)
		return;
	pthread_mutex_destroy(&f->lock);
	pthread_mutex_destroy(&f->pace_lock);
	pthread_cond_destroy(&f->durable_cond);
	free(f);
}

void flow_release_all(struct flow *f)
{
	pthread_mutex_lock(&f->lock);
	f->release_gen++;
	if (f->peer_waiting)
		atomic_fetch_add(&f->releases, 1);
	pthread_cond_broadcast(&f->durable_cond);
	pthread_mutex_unlock(&f->lock);
}

void flow_set_policy(struct flow *f, const struct flow_policy *p)
{
	bool was = atomic_exchange(&f->wait_peer, p->wait_peer);

	atomic_store(&f->block, p->block);
	atomic_store(&f->fill, p->fill);
	atomic_store(&f->block_timeout_ns, p->block_timeout_ns);
	atomic_store(&f->rate_bps, p->rate_bps);
	if (was && !p->wait_peer)
		flow_release_all(f); /* degraded: nobody waits for the peer any more */
}

void flow_get_policy(struct flow *f, struct flow_policy *out)
{
	out->wait_peer = atomic_load(&f->wait_peer);
	out->block = atomic_load(&f->block);
	out->fill = atomic_load(&f->fill);
	out->block_timeout_ns = atomic_load(&f->block_timeout_ns);
	out->rate_bps = atomic_load(&f->rate_bps);
}

void flow_set_durable(struct flow *f, uint64_t seq)
{
	pthread_mutex_lock(&f->lock);
	if (seq > f->durable_seq) {
		f->durable_seq = seq;
		if (f->peer_waiting)
			pthread_cond_broadcast(&f->durable_cond);
	}
	pthread_mutex_unlock(&f->lock);
}

uint64_t flow_gen(struct flow *f) { return atomic_load(&f->release_gen); }

void flow_wait_durable(struct flow *f, uint64_t seq, uint64_t gen)
{
	int64_t t0;

	if (!atomic_load(&f->wait_peer))
		return;
	pthread_mutex_lock(&f->lock);
	if (f->durable_seq >= seq) {
		pthread_mutex_unlock(&f->lock);
		return;
	}
	t0 = flow_now_ns();
	f->peer_waiting++;
	while (f->durable_seq < seq && f->release_gen == gen && atomic_load(&f->wait_peer)) {
		int64_t d = flow_now_ns() + RECHECK_NS;
		struct timespec dl = {(time_t)(d / 1000000000), (long)(d % 1000000000)};
		pthread_cond_timedwait(&f->durable_cond, &f->lock, &dl);
	}
	f->peer_waiting--;
	pthread_mutex_unlock(&f->lock);
	atomic_fetch_add(&f->peer_waits, 1);
	atomic_fetch_add(&f->peer_wait_ns, (uint64_t)(flow_now_ns() - t0));
}

void flow_pace(struct flow *f, uint64_t bytes)
{
	uint64_t rate = atomic_load(&f->rate_bps);
	int64_t now, start;
	struct timespec ts;

	if (rate == 0 || bytes == 0)
		return;
	pthread_mutex_lock(&f->pace_lock);
	now = flow_now_ns();
	if (f->next_ns < now - FLOW_BURST_NS)
		f->next_ns = now - FLOW_BURST_NS; /* idle credit is bounded: no burst after a pause */
	start = f->next_ns;
	/* bytes <= 4 GiB and 1e9: the product fits in 64 bits */
	f->next_ns += (int64_t)(bytes * 1000000000u / rate);
	pthread_mutex_unlock(&f->pace_lock);
	if (start <= now)
		return;
	ts.tv_sec = (time_t)((start - now) / 1000000000);
	ts.tv_nsec = (long)((start - now) % 1000000000);
	nanosleep(&ts, NULL);
	atomic_fetch_add(&f->delays, 1);
	atomic_fetch_add(&f->delay_total_ns, (uint64_t)(start - now));
}

void flow_room_begin(struct flow *f) { atomic_fetch_add(&f->room_waiting, 1); }

void flow_room_end(struct flow *f, uint64_t waited_ns, bool timed_out)
{
	atomic_fetch_sub(&f->room_waiting, 1);
	atomic_fetch_add(&f->room_waits, 1);
	atomic_fetch_add(&f->room_wait_ns, waited_ns);
	if (timed_out)
		atomic_fetch_add(&f->room_timeouts, 1);
}

void flow_stats(struct flow *f, struct flow_stats *st)
{
	pthread_mutex_lock(&f->lock);
	st->durable_seq = f->durable_seq;
	st->peer_waiting = f->peer_waiting;
	pthread_mutex_unlock(&f->lock);
	st->peer_waits = atomic_load(&f->peer_waits);
	st->peer_wait_ns = atomic_load(&f->peer_wait_ns);
	st->room_waits = atomic_load(&f->room_waits);
	st->room_wait_ns = atomic_load(&f->room_wait_ns);
	st->room_waiting = atomic_load(&f->room_waiting);
	st->room_timeouts = atomic_load(&f->room_timeouts);
	st->delays = atomic_load(&f->delays);
	st->delay_ns = atomic_load(&f->delay_total_ns);
	st->releases = atomic_load(&f->releases);
}

/*
 * flow.h: the primary's write-path flow control (DESIGN §3, "Modes").
 *
 * Three ways a request may be held before it returns to the client, each
 * switched by the shipper as the link comes and goes (the policy table is
 * replicator/modes.py):
 *
 *   wait_peer  protocol B/C: the request returns once the peer holds its
 *              record (durable_seq >= its seq: B received, C journaled).
 *   block      on-congestion block: a record that would take the ring past
 *              `fill` bytes waits for room (up to block_timeout_ns, then
 *              the ring is dropped and the pair pulls ahead).
 *   rate_bps   max-lag: the writes' bytes are paced to this rate (a token
 *              bucket shared by every writer; writers slowed, not stopped).
 *
 * Every wait ends when the policy is switched off (the link is lost under
 * on-disconnect = degrade) or the ring is dropped (nothing queued will be
 * acknowledged any more): a writer never waits for something that cannot
 * come.
 */
#ifndef DUPLEX_FLOW_H
#define DUPLEX_FLOW_H

#include <stdbool.h>
#include <stdint.h>

struct flow;

struct flow_policy {
	bool wait_peer;
	bool block;
	uint64_t fill;            /* bytes the ring may hold; past it: block or pull ahead */
	int64_t block_timeout_ns; /* < 0: wait for room for ever (on-disconnect = suspend) */
	uint64_t rate_bps;        /* max-lag: bytes per second writes may go at, 0 = no limit */
};

struct flow_stats {
	uint64_t durable_seq;
	uint64_t peer_waits, peer_wait_ns, peer_waiting;     /* waited for the peer; now */
	uint64_t room_waits, room_wait_ns, room_waiting;     /* blocked for room; now */
	uint64_t room_timeouts;                              /* gave up waiting: pulled ahead */
	uint64_t delays, delay_ns;                           /* max-lag pacing sleeps */
	uint64_t releases;                                   /* every waiter let go (drop, degrade) */
};

/* fill: the initial limit (the ring's size: today's pull-ahead). */
int flow_create(struct flow **out, uint64_t fill);
void flow_destroy(struct flow *f);

void flow_set_policy(struct flow *f, const struct flow_policy *p);
void flow_get_policy(struct flow *f, struct flow_policy *out);
/* The peer holds every seq <= seq (never moves back). */
void flow_set_durable(struct flow *f, uint64_t seq);
/* Let every peer waiter go: what they wait for will not come. */
void flow_release_all(struct flow *f);
/* The release generation: taken before a record is sequenced, so that a
 * release (drop) after that lets its wait go. */
uint64_t flow_gen(struct flow *f);
/* Wait until durable_seq >= seq while wait_peer stays on and no release
 * happened since gen was taken. */
void flow_wait_durable(struct flow *f, uint64_t seq, uint64_t gen);
/* max-lag pacing, when the policy sets a rate: the request's bytes take
 * their turn in a token bucket shared by every writer (FLOW_BURST_NS of
 * credit at most), sleeping until it comes. */
#define FLOW_BURST_NS 2000000
void flow_pace(struct flow *f, uint64_t bytes);
void flow_stats(struct flow *f, struct flow_stats *st);

/* For the core: bracket a room wait (counts and time), and count a timeout. */
void flow_room_begin(struct flow *f);
void flow_room_end(struct flow *f, uint64_t waited_ns, bool timed_out);

/* CLOCK_MONOTONIC in ns. */
int64_t flow_now_ns(void);

#endif /* DUPLEX_FLOW_H */

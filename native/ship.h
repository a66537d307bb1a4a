/*
 * ship.h: the primary's streaming loop in C. replicator/primary/shipper.py calls
 * ship_stream() with the GIL released and gets control back at least every
 * return_after_ns (pings, acks, status, stop), so between returns no Python
 * runs for the stream and the nbdkit request threads keep the GIL to
 * themselves.
 *
 * Each span of the send ring (whole records, up to batch_bytes) goes out as
 * a TOKENS frame and a DATA frame (replicator/protocol/frames.py layout) in
 * one writev, spans spread over the given sockets in turn. The batching
 * rule (DESIGN §3): a span is taken when batch_bytes are queued, or when
 * interval_ns passed since the previous one.
 *
 * The caller holds the sockets' send locks and has checked that the
 * connections are established. A frame is always written whole: a peer
 * that stops reading (journal backpressure) holds the loop in the middle of
 * one, past return_after_ns, until it reads again or *abort is set.
 */
#ifndef DUPLEX_SHIP_H
#define DUPLEX_SHIP_H

#include <stddef.h>
#include <stdint.h>

struct core;

enum ship_stop {
	SHIP_TIMEOUT = 0, /* return_after_ns elapsed (or the ring stayed empty) */
	SHIP_DROPPED = 1, /* the ring overflowed: resync needed */
	SHIP_IO = 2,      /* a socket failed (errnum, fd_index), or *abort was set
	                   * (ECANCELED; maybe mid-frame: the sockets are done) */
	SHIP_BAD = 3,     /* the ring handed out something that is not records,
	                   * or memory ran out (errnum) */
	SHIP_KICKED = 4,  /* core_kick() between frames (e.g. stop asked) */
};

struct ship_params {
	int64_t interval_ns;
	uint64_t batch_bytes;
	int64_t return_after_ns;
	int64_t last_send_ns; /* CLOCK_MONOTONIC of the previous send (0: none) */
	const int *abort;     /* set (any thread): give up, even mid-frame */
	uint64_t *inflight;   /* NULL, or [last seq sent, ts of the first record
	                       * sent] in this call, and [2] the ts of the oldest
	                       * record waiting to be sent (0: none), kept current
	                       * for readers in other threads (status: the lag
	                       * before the call returns its samples) */
};

struct ship_result {
	int stop;
	int errnum;
	int fd_index;
	uint32_t next_fd;   /* round robin: pass back in as first_fd */
	int64_t last_send_ns; /* pass back in as params.last_send_ns */
	uint64_t spans;
	uint64_t records;
	uint64_t bytes;
	uint64_t nsamples;  /* (last seq, first ts) pairs written to samples */
};

/* Stream until something to report. samples: room for samples_cap pairs
 * (u64 last seq of a span, u64 ts of its first record), for the lag. */
int ship_stream(struct core *c, const int *fds, uint32_t nfds, uint32_t first_fd,
                const struct ship_params *p, struct ship_result *r,
                uint64_t *samples, size_t samples_cap);

#endif

/* ship.c: the primary's streaming loop (see ship.h). */
#include "ship.h"

#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#include "core.h"
#include "crc32c.h"
#include "ring.h"
#include "util.h"

/* replicator/protocol/frames.py: magic, version, type, flags, length, crc. */
#define FRAME_HEADER 16
#define FRAME_VERSION 1
#define FRAME_TOKENS 0x10
#define FRAME_DATA 0x11
/* The CRC of a DATA frame covers its header: every record in it carries a
 * CRC of its own, which the receiver checks (frames.py, FLAG_RECORDS_CRC). */
#define FRAME_FLAG_RECORDS_CRC 0x0001

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void frame_header(unsigned char h[FRAME_HEADER], uint8_t type, const void *payload,
                         uint32_t len)
{
	uint32_t crc;

	memcpy(h, "DPX1", 4);
	h[4] = FRAME_VERSION;
	h[5] = type;
	h[6] = type == FRAME_DATA ? FRAME_FLAG_RECORDS_CRC : 0;
	h[7] = 0;
	memcpy(h + 8, &len, 4);
	memset(h + 12, 0, 4);
	crc = crc32c(0, h, FRAME_HEADER);
	if (type != FRAME_DATA)
		crc = crc32c(crc, payload, len);
	memcpy(h + 12, &crc, 4);
}

static bool aborted(const struct ship_params *p)
{
	return p->abort != NULL && __atomic_load_n(p->abort, __ATOMIC_RELAXED);
}

/* Write iov[0..n) whole, waiting for room when the socket is non-blocking
 * (its reader thread uses a timeout). 0 or -errno (-ECANCELED: aborted). */
static int writev_full(int fd, struct iovec *iov, int n, const struct ship_params *p)
{
	while (n > 0) {
		struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
		ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL); /* EPIPE, not SIGPIPE */
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				struct pollfd pfd = {.fd = fd, .events = POLLOUT};
				if (aborted(p))
					return -ECANCELED;
				if (poll(&pfd, 1, 100) < 0 && errno != EINTR)
					return -errno;
				continue;
			}
			return -errno;
		}
		dpx_iov_consume(&iov, &n, (size_t)w);
	}
	return 0;
}

int ship_stream(struct core *c, const int *fds, uint32_t nfds, uint32_t first_fd,
                const struct ship_params *p, struct ship_result *r,
                uint64_t *samples, size_t samples_cap)
{
	int64_t start = now_ns(), last_send = p->last_send_ns;
	uint64_t kicks = core_kicks(c);
	unsigned char *tokens = NULL;
	size_t tokens_cap = 0;
	uint32_t next = nfds ? first_fd % nfds : 0;

	memset(r, 0, sizeof(*r));
	r->next_fd = next;
	r->last_send_ns = last_send;
	if (nfds == 0)
		return -EINVAL;
	for (;;) {
		struct ring_stats st;
		const unsigned char *span;
		unsigned char th[FRAME_HEADER], dh[FRAME_HEADER];
		struct iovec iov[4];
		int64_t now = now_ns(), left = start + p->return_after_ns - now;
		size_t len;
		int64_t ntok;
		int rc;

		if (core_dropped(c)) {
			r->stop = SHIP_DROPPED;
			break;
		}
		if (aborted(p)) {
			r->stop = SHIP_IO;
			r->errnum = ECANCELED;
			break;
		}
		if (core_kicks(c) != kicks) {
			r->stop = SHIP_KICKED;
			break;
		}
		if (left <= 0) {
			r->stop = SHIP_TIMEOUT;
			break;
		}
		core_ring_stats(c, &st);
		if (st.bytes_unsent == 0) {
			if (p->inflight != NULL)
				__atomic_store_n(&p->inflight[2], 0, __ATOMIC_RELAXED);
			if (!core_wait(c, left) && !core_dropped(c) && core_kicks(c) == kicks) {
				r->stop = SHIP_TIMEOUT; /* idle: let the caller look around */
				break;
			}
			continue;
		}
		if (st.bytes_unsent < p->batch_bytes && now - last_send < p->interval_ns) {
			/* The batching rule (DESIGN §3): wait for the interval to pass or
			 * for a full batch, whichever comes first. */
			int64_t wait = last_send + p->interval_ns - now;
			if (p->inflight != NULL && core_peek(c, 1, &span) > 0) {
				uint64_t ts;
				memcpy(&ts, span + REC_TS, 8);
				__atomic_store_n(&p->inflight[2], ts, __ATOMIC_RELAXED);
			}
			core_wait_bytes(c, p->batch_bytes, wait < left ? wait : left);
			continue;
		}
		len = core_peek(c, p->batch_bytes, &span);
		if (len == 0)
			continue;
		if (len > tokens_cap) { /* tokens never outgrow their span */
			unsigned char *grown = realloc(tokens, len);
			if (grown == NULL) {
				r->stop = SHIP_BAD;
				r->errnum = ENOMEM;
				break;
			}
			tokens = grown;
			tokens_cap = len;
		}
		ntok = ring_tokens(span, len, tokens, tokens_cap);
		if (ntok <= 0 || len > UINT32_MAX) {
			r->stop = SHIP_BAD;
			r->errnum = EINVAL;
			break;
		}
		frame_header(th, FRAME_TOKENS, tokens, (uint32_t)ntok);
		frame_header(dh, FRAME_DATA, span, (uint32_t)len);
		iov[0] = (struct iovec){th, FRAME_HEADER};
		iov[1] = (struct iovec){tokens, (size_t)ntok};
		iov[2] = (struct iovec){dh, FRAME_HEADER};
		iov[3] = (struct iovec){(void *)span, len};
		if ((rc = writev_full(fds[next], iov, 4, p)) < 0) {
			r->stop = SHIP_IO;
			r->errnum = -rc;
			r->fd_index = (int)next;
			break;
		}
		if ((rc = core_advance(c, len)) < 0) {
			/* -EPIPE: the ring overflowed while the span was on its way. */
			r->stop = rc == -EPIPE ? SHIP_DROPPED : SHIP_BAD;
			r->errnum = -rc;
			break;
		}
		{
			uint64_t first_ts, last_seq;
			memcpy(&first_ts, tokens + REC_TS, 8);
			memcpy(&last_seq, tokens + ntok - RING_HEADER + REC_SEQ, 8);
			if (p->inflight != NULL) {
				if (__atomic_load_n(&p->inflight[1], __ATOMIC_RELAXED) == 0)
					__atomic_store_n(&p->inflight[1], first_ts, __ATOMIC_RELAXED);
				__atomic_store_n(&p->inflight[0], last_seq, __ATOMIC_RELAXED);
			}
			if (r->nsamples < samples_cap) {
				samples[2 * r->nsamples] = last_seq;
				samples[2 * r->nsamples + 1] = first_ts;
				r->nsamples++;
			} else if (samples_cap) {
				samples[2 * (samples_cap - 1)] = last_seq; /* stretch the last one */
			}
		}
		r->spans++;
		r->records += (uint64_t)ntok / RING_HEADER;
		r->bytes += len;
		next = (next + 1) % nfds;
		r->next_fd = next;
		last_send = now_ns();
		r->last_send_ns = last_send;
	}
	free(tokens);
	return 0;
}

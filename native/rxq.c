/* rxq.c: the secondary's pending write queue (see rxq.h). */
#include "rxq.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>

#include "records.h"
#include "ring.h"
#include "util.h"

/*
 * Entries live in an open-addressing table keyed by seq, with linear
 * probing. The home slot is a Fibonacci hash of the seq, not seq & mask:
 * with the identity, a catch-up's new range whose seqs share home slots
 * with an old range still queued met one long cluster, and each insert
 * probed through all of it (100k entries took 38 s). A slot is empty
 * (seq 0), live (seq > applied) or dead: applied (seq <= applied) or
 * removed (RXQ_GONE). Dead slots keep probe chains intact and are reused
 * by inserts; a rehash drops them.
 */
#define RXQ_GONE UINT64_MAX
#define MIN_CAP 1024u
#define APPLY_READ_MAX (8u << 20) /* journal bytes read back per pread */
#define MERGE_MAX (8u << 20)      /* image bytes per merged pwritev */

struct slot {
	uint64_t seq;
	uint64_t loc;
	const unsigned char *hot; /* the record in the caller's frame buffer, or NULL */
	uint32_t state; /* RXQ_ANNOUNCED / RXQ_COMPLETE */
	uint32_t batch; /* the call that last marked it: add_tokens (rollback), add_records (counting) */
	unsigned char tok[RXQ_TOKEN];
};

struct item {
	uint64_t loc;
	const unsigned char *hot;
	unsigned char tok[RXQ_TOKEN];
};

struct rxq {
	uint64_t applied, received, highest, base_hint, window;
	uint64_t bytes, live, used; /* used: non-empty slots (live or dead) */
	uint64_t cap, mask;
	unsigned shift; /* 64 - log2(cap), for home() */
	struct slot *slots;
	uint32_t batch;
	uint64_t ts_bound; /* 0: none; else a run stops before a non-MARK record stamped later */
	uint64_t covered;  /* seqs <= it without an entry are in a committed, unapplied increment */
	bool has_applied_tok;
	unsigned char applied_tok[RXQ_TOKEN];
	struct item *run; /* the run handed out */
	uint64_t run_n, run_cap, run_end, run_bytes;
	unsigned char *scratch; /* apply: journal bytes read back */
	size_t scratch_cap;
	struct iovec *iov;
};

static uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static uint64_t tok_seq(const unsigned char *t) { return rd64(t + REC_SEQ); }
static uint64_t rec_size(const unsigned char *t)
{
	return RING_HEADER + (((uint64_t)rd32(t + REC_DATA_LEN) + 7) & ~(uint64_t)7);
}

static bool is_dead(const struct rxq *q, uint64_t seq)
{
	return seq == RXQ_GONE || seq <= q->applied;
}

static uint64_t home(const struct rxq *q, uint64_t seq)
{
	return (seq * UINT64_C(0x9E3779B97F4A7C15)) >> q->shift;
}

static unsigned log2u(uint64_t pow2)
{
	unsigned n = 0;

	while (pow2 > 1) {
		pow2 >>= 1;
		n++;
	}
	return n;
}

static struct slot *find(const struct rxq *q, uint64_t seq)
{
	for (uint64_t i = home(q, seq);; i = (i + 1) & q->mask) {
		struct slot *s = &q->slots[i];
		if (s->seq == seq)
			return s;
		if (s->seq == 0)
			return NULL;
	}
}

static int rehash(struct rxq *q, uint64_t min_live)
{
	uint64_t cap = MIN_CAP;
	struct slot *old = q->slots, *fresh;
	uint64_t old_cap = q->cap;

	while (cap < 4 * min_live)
		cap <<= 1;
	fresh = calloc(cap, sizeof(*fresh));
	if (fresh == NULL)
		return -1;
	q->slots = fresh;
	q->cap = cap;
	q->mask = cap - 1;
	q->shift = 64 - log2u(cap);
	q->used = 0;
	for (uint64_t i = 0; i < old_cap; i++) {
		struct slot *s = &old[i];
		if (s->seq == 0 || is_dead(q, s->seq))
			continue;
		uint64_t j = home(q, s->seq);
		while (fresh[j].seq != 0)
			j = (j + 1) & q->mask;
		fresh[j] = *s;
		q->used++;
	}
	free(old);
	return 0;
}

/* A slot for a seq known to be absent; NULL when out of memory. */
static struct slot *insert(struct rxq *q, uint64_t seq)
{
	if ((q->used + 1) * 4 > q->cap * 3 && rehash(q, q->live + 1) != 0)
		return NULL;
	for (uint64_t i = home(q, seq);; i = (i + 1) & q->mask) {
		struct slot *s = &q->slots[i];
		if (s->seq == 0)
			q->used++;
		else if (!is_dead(q, s->seq))
			continue;
		memset(s, 0, sizeof(*s));
		s->seq = seq;
		q->live++;
		return s;
	}
}

static void remove_slot(struct rxq *q, struct slot *s)
{
	s->seq = RXQ_GONE;
	q->live--;
}

int rxq_new(struct rxq **out, uint64_t applied, const unsigned char *applied_token,
            uint64_t window)
{
	struct rxq *q = calloc(1, sizeof(*q));

	*out = NULL;
	if (q == NULL)
		return -ENOMEM;
	if (applied_token != NULL && tok_seq(applied_token) != applied) {
		free(q);
		return -EINVAL;
	}
	q->applied = q->received = q->highest = q->base_hint = applied;
	q->window = window;
	if (applied_token != NULL) {
		memcpy(q->applied_tok, applied_token, RXQ_TOKEN);
		q->has_applied_tok = true;
	}
	q->cap = MIN_CAP;
	q->mask = MIN_CAP - 1;
	q->shift = 64 - log2u(MIN_CAP);
	q->slots = calloc(q->cap, sizeof(*q->slots));
	q->iov = calloc(IOV_MAX, sizeof(*q->iov));
	if (q->slots == NULL || q->iov == NULL) {
		rxq_free(q);
		return -ENOMEM;
	}
	*out = q;
	return 0;
}

void rxq_free(struct rxq *q)
{
	if (q == NULL)
		return;
	free(q->slots);
	free(q->run);
	free(q->scratch);
	free(q->iov);
	free(q);
}

void rxq_info(const struct rxq *q, struct rxq_info *out)
{
	out->applied = q->applied;
	out->received = q->received;
	out->highest = q->highest;
	out->base_hint = q->base_hint;
	out->bytes = q->bytes;
	out->entries = q->live;
	out->run_end = q->run_end;
	out->run_records = q->run_n;
	out->run_bytes = q->run_bytes;
	out->has_applied_token = q->has_applied_tok;
	memcpy(out->applied_token, q->applied_tok, RXQ_TOKEN);
}

static int fail(struct rxq_err *err, int fault, uint64_t seq, const unsigned char *got,
                const unsigned char *had)
{
	err->fault = fault;
	err->seq = seq;
	if (got != NULL)
		memcpy(err->got, got, RXQ_TOKEN);
	if (had != NULL)
		memcpy(err->had, had, RXQ_TOKEN);
	return -1;
}

/* 1: new; 0: a harmless duplicate; -1: a broken rule (err set). */
static int check_token(const struct rxq *q, const unsigned char *tok, struct rxq_err *err)
{
	uint64_t seq = tok_seq(tok), floor;
	const struct slot *s;

	if (seq <= q->applied) {
		if (seq == q->applied && q->has_applied_tok &&
		    memcmp(tok, q->applied_tok, RXQ_TOKEN) != 0)
			return fail(err, RXQ_APPLIED_DIFFERS, seq, tok, q->applied_tok);
		return 0;
	}
	floor = q->applied > q->base_hint ? q->applied : q->base_hint;
	if (seq > floor && seq - floor > q->window) {
		err->limit = q->window;
		err->floor = floor;
		return fail(err, RXQ_WINDOW, seq, tok, NULL);
	}
	s = find(q, seq);
	if (s == NULL)
		return 1;
	if (memcmp(s->tok, tok, RXQ_TOKEN) != 0)
		return fail(err, RXQ_TOKEN_DIFFERS, seq, tok, s->tok);
	return 0;
}

int64_t rxq_add_tokens(struct rxq *q, const unsigned char *toks, size_t n, struct rxq_err *err)
{
	uint64_t highest = q->highest;
	int64_t added = 0;
	size_t i;

	for (i = 0; i < n; i++) {
		if (!records_header_ok(toks + i * RXQ_TOKEN)) {
			err->off = i * RXQ_TOKEN;
			return fail(err, RXQ_BAD_RECORD, tok_seq(toks + i * RXQ_TOKEN),
			            toks + i * RXQ_TOKEN, NULL);
		}
		if (check_token(q, toks + i * RXQ_TOKEN, err) < 0)
			return -1;
	}
	q->batch++;
	for (i = 0; i < n; i++) {
		const unsigned char *t = toks + i * RXQ_TOKEN;
		uint64_t seq = tok_seq(t);
		struct slot *s;

		if (seq <= q->applied)
			continue;
		s = find(q, seq);
		if (s != NULL) {
			if (s->batch == q->batch && memcmp(s->tok, t, RXQ_TOKEN) != 0) {
				fail(err, RXQ_BATCH_DIFFERS, seq, t, s->tok);
				goto rollback;
			}
			continue;
		}
		s = insert(q, seq);
		if (s == NULL) {
			fail(err, RXQ_NOMEM, seq, t, NULL);
			goto rollback;
		}
		s->state = RXQ_ANNOUNCED;
		s->batch = q->batch;
		memcpy(s->tok, t, RXQ_TOKEN);
		if (seq > highest)
			highest = seq;
		added++;
	}
	q->highest = highest;
	return added;

rollback:
	/* Undo this call's inserts: the queue is left as it was. */
	while (i-- > 0) {
		struct slot *s = find(q, tok_seq(toks + i * RXQ_TOKEN));
		if (s != NULL && s->batch == q->batch)
			remove_slot(q, s);
	}
	return -1;
}

/* 1: new data for an announced seq; 0: duplicate; -1: broken rule. */
static int check_record(const struct rxq *q, const unsigned char *h, struct rxq_err *err)
{
	uint64_t seq = tok_seq(h);
	const struct slot *s;

	if (seq <= q->applied)
		return check_token(q, h, err) < 0 ? -1 : 0;
	s = find(q, seq);
	if (s == NULL)
		return fail(err, RXQ_NO_TOKEN, seq, h, NULL);
	if (memcmp(s->tok, h, RXQ_TOKEN) != 0)
		return fail(err, RXQ_DATA_DIFFERS, seq, h, s->tok);
	return s->state == RXQ_ANNOUNCED;
}

static void advance_received(struct rxq *q)
{
	for (;;) {
		const struct slot *s = find(q, q->received + 1);
		if (s == NULL && q->received < q->covered) {
			q->received++; /* durable in a committed increment */
			continue;
		}
		if (s == NULL || s->state != RXQ_COMPLETE)
			return;
		q->received++;
	}
}

static void complete(struct rxq *q, struct slot *s, uint64_t loc, const unsigned char *hot)
{
	s->state = RXQ_COMPLETE;
	s->loc = loc;
	s->hot = hot;
	q->bytes += rec_size(s->tok);
	if (s->seq == q->received + 1)
		advance_received(q);
}

int64_t rxq_add_records(struct rxq *q, const unsigned char *buf, size_t len, uint64_t loc_base,
                        int hot, int dry_run, struct rxq_err *err)
{
	int64_t fresh = 0;
	size_t pos;

	/* Pass 1 checks everything (and counts a seq repeated in the frame
	 * once, by marking its slot with this call's number); pass 2 stores. */
	q->batch++;
	for (pos = 0; pos < len; pos += rec_size(buf + pos)) {
		struct slot *s;
		int r;
		if (len - pos < RING_HEADER || !records_header_ok(buf + pos) ||
		    rec_size(buf + pos) > len - pos) {
			err->off = pos;
			return fail(err, RXQ_BAD_RECORD, 0, NULL, NULL);
		}
		if ((r = check_record(q, buf + pos, err)) < 0)
			return -1;
		if (r == 0)
			continue;
		s = find(q, tok_seq(buf + pos));
		if (s->batch != q->batch) {
			s->batch = q->batch;
			fresh++;
		}
	}
	if (dry_run)
		return fresh;
	fresh = 0;
	for (pos = 0; pos < len; pos += rec_size(buf + pos)) {
		struct slot *s = tok_seq(buf + pos) > q->applied ? find(q, tok_seq(buf + pos)) : NULL;
		if (s != NULL && s->state == RXQ_ANNOUNCED) {
			complete(q, s, loc_base + pos, hot ? buf + pos : NULL);
			fresh++;
		}
	}
	return fresh;
}

int rxq_add_record(struct rxq *q, const unsigned char *token, uint64_t loc, int dry_run,
                   struct rxq_err *err)
{
	int r;

	if (!records_header_ok(token)) {
		err->off = 0;
		return fail(err, RXQ_BAD_RECORD, tok_seq(token), token, NULL);
	}
	if ((r = check_record(q, token, err)) <= 0 || dry_run)
		return r;
	complete(q, find(q, tok_seq(token)), loc, NULL);
	return 1;
}

uint64_t rxq_live_seqs(const struct rxq *q, uint64_t *out, uint64_t cap)
{
	uint64_t n = 0;

	for (uint64_t i = 0; i < q->cap; i++) {
		uint64_t seq = q->slots[i].seq;
		if (seq == 0 || is_dead(q, seq))
			continue;
		if (n < cap)
			out[n] = seq;
		n++;
	}
	return n;
}

uint64_t rxq_oldest(const struct rxq *q, unsigned char *token)
{
	const struct slot *best = NULL;

	for (uint64_t i = 0; i < q->cap; i++) {
		const struct slot *s = &q->slots[i];
		if (s->seq == 0 || is_dead(q, s->seq))
			continue;
		if (best == NULL || s->seq < best->seq)
			best = s;
	}
	if (best == NULL)
		return 0;
	memcpy(token, best->tok, RXQ_TOKEN);
	return best->seq;
}

int rxq_get(const struct rxq *q, uint64_t seq, unsigned char *token, uint64_t *loc)
{
	const struct slot *s = seq > q->applied ? find(q, seq) : NULL;

	if (s == NULL)
		return RXQ_NONE;
	memcpy(token, s->tok, RXQ_TOKEN);
	*loc = s->loc;
	return (int)s->state;
}

int64_t rxq_take_run(struct rxq *q, uint64_t max_records, uint64_t max_bytes)
{
	uint64_t n = 0, bytes = 0;

	q->run_n = 0;
	q->run_end = 0;
	for (uint64_t seq = q->applied + 1; seq <= q->received; seq++) {
		const struct slot *s = find(q, seq);
		uint64_t size;

		if (s == NULL)
			break; /* covered by an increment not applied yet: it goes first */
		size = rec_size(s->tok);

		if (max_records && n >= max_records)
			break;
		if (n && max_bytes && bytes + size > max_bytes)
			break;
		if (q->ts_bound && s->tok[REC_OP] != REC_OP_MARK && rd64(s->tok + REC_TS) > q->ts_bound)
			break; /* a consistency group has not released it yet */
		if (n == q->run_cap) {
			uint64_t cap = q->run_cap ? 2 * q->run_cap : 256;
			struct item *grown = realloc(q->run, cap * sizeof(*grown));
			if (grown == NULL)
				return -ENOMEM;
			q->run = grown;
			q->run_cap = cap;
		}
		q->run[n].loc = s->loc;
		q->run[n].hot = s->hot;
		memcpy(q->run[n].tok, s->tok, RXQ_TOKEN);
		n++;
		bytes += size;
	}
	q->run_n = n;
	q->run_bytes = bytes;
	q->run_end = n ? q->applied + n : 0;
	return (int64_t)n;
}

void rxq_set_ts_bound(struct rxq *q, uint64_t ts)
{
	q->ts_bound = ts;
}

uint64_t rxq_received_ts(const struct rxq *q)
{
	const struct slot *s = q->received > q->applied ? find(q, q->received) : NULL;

	if (s == NULL)
		return q->has_applied_tok ? rd64(q->applied_tok + REC_TS) : 0;
	return rd64(s->tok + REC_TS);
}

int rxq_run_item(const struct rxq *q, uint64_t i, unsigned char *token, uint64_t *loc)
{
	if (i >= q->run_n)
		return -1;
	memcpy(token, q->run[i].tok, RXQ_TOKEN);
	*loc = q->run[i].loc;
	return 0;
}

int rxq_mark_applied(struct rxq *q, uint64_t seq)
{
	if (q->run_end == 0 || seq != q->run_end)
		return -1;
	/* The slots die by themselves: their seq is now <= applied. */
	q->applied = seq;
	q->live -= q->run_n;
	q->bytes -= q->run_bytes;
	memcpy(q->applied_tok, q->run[q->run_n - 1].tok, RXQ_TOKEN);
	q->has_applied_tok = true;
	q->run_n = q->run_end = q->run_bytes = 0;
	return 0;
}

void rxq_cover(struct rxq *q, uint64_t seq)
{
	if (seq > q->covered)
		q->covered = seq;
	if (seq > q->base_hint)
		q->base_hint = seq;
	advance_received(q);
}

void rxq_expect_base(struct rxq *q, uint64_t seq)
{
	if (seq > q->base_hint)
		q->base_hint = seq;
}

int rxq_rebase(struct rxq *q, uint64_t seq, const unsigned char *token)
{
	if (seq < q->applied || (token != NULL && tok_seq(token) != seq))
		return -1;
	for (uint64_t i = 0; i < q->cap; i++) {
		struct slot *s = &q->slots[i];
		if (s->seq == 0 || is_dead(q, s->seq) || s->seq > seq)
			continue;
		if (s->state == RXQ_COMPLETE)
			q->bytes -= rec_size(s->tok);
		q->live--; /* dies with the new applied seq */
	}
	q->applied = seq;
	q->has_applied_tok = token != NULL;
	if (token != NULL)
		memcpy(q->applied_tok, token, RXQ_TOKEN);
	if (seq > q->highest)
		q->highest = seq;
	if (seq > q->base_hint)
		q->base_hint = seq;
	q->received = seq;
	advance_received(q);
	q->run_n = q->run_end = q->run_bytes = 0;
	return 0;
}

/* ---- applying ------------------------------------------------------------ */

static int io_fail(struct rxq_err *err, int errnum, uint64_t seq)
{
	err->errnum = errnum;
	return fail(err, RXQ_IO, seq, NULL, NULL);
}

/* Read back from the journal the records of the run from index i on that
 * lie back to back there (up to APPLY_READ_MAX bytes) into the scratch
 * buffer; [*start, *end) is what it now holds. */
static int read_back(struct rxq *q, uint64_t i, int journal_fd, uint64_t *start, uint64_t *end,
                     struct rxq_err *err)
{
	uint64_t first = i, s = q->run[i].loc, e = s;
	ssize_t got;

	while (i < q->run_n && q->run[i].hot == NULL && q->run[i].loc == e &&
	       (i == first || e - s + rec_size(q->run[i].tok) <= APPLY_READ_MAX)) {
		e += rec_size(q->run[i].tok);
		i++;
	}
	if (e - s > q->scratch_cap) {
		unsigned char *grown = realloc(q->scratch, e - s);
		if (grown == NULL)
			return fail(err, RXQ_NOMEM, tok_seq(q->run[first].tok), NULL, NULL);
		q->scratch = grown;
		q->scratch_cap = e - s;
	}
	got = dpx_pread_full(journal_fd, q->scratch, e - s, (off_t)s);
	if (got < 0)
		return io_fail(err, (int)-got, tok_seq(q->run[first].tok));
	if ((uint64_t)got != e - s)
		return io_fail(err, EIO, tok_seq(q->run[first].tok));
	*start = s;
	*end = e;
	return 0;
}

int rxq_apply_run(struct rxq *q, int journal_fd, int image_fd, uint64_t image_size,
                  uint64_t *written, struct rxq_err *err)
{
	return rxq_apply_run_volumes(q, journal_fd, &image_fd, &image_size, 1, written, err);
}

/* The merged write of volume vol: out to its image, or the fault. */
static int flush_merged(struct rxq *q, int *niov, int fd, uint32_t vol, uint64_t m_off,
                        uint64_t seq, struct rxq_err *err)
{
	int r;

	if (*niov == 0)
		return 0;
	r = dpx_pwritev_full(fd, q->iov, *niov, (off_t)m_off);
	*niov = 0;
	if (r < 0) {
		err->volume = vol;
		return io_fail(err, -r, seq);
	}
	return 0;
}

int rxq_apply_run_volumes(struct rxq *q, int journal_fd, const int *image_fds,
                          const uint64_t *image_sizes, uint32_t nvol,
                          uint64_t *written, struct rxq_err *err)
{
	struct stat st;
	bool is_blk[RXQ_MAX_VOLUMES];
	uint64_t r_start = 0, r_end = 0; /* journal bytes in the scratch buffer */
	uint64_t m_off = 0, m_end = 0;   /* image range of the merged write */
	uint32_t m_vol = 0;              /* ...and its volume */
	int niov = 0, r;

	*written = 0;
	err->volume = UINT32_MAX;
	if (nvol == 0 || nvol > RXQ_MAX_VOLUMES)
		return io_fail(err, EINVAL, 0);
	for (uint32_t v = 0; v < nvol; v++) {
		if (fstat(image_fds[v], &st) != 0) {
			err->volume = v;
			return io_fail(err, errno, 0);
		}
		is_blk[v] = S_ISBLK(st.st_mode);
	}
	for (uint64_t k = 0; k < q->run_n; k++) {
		const unsigned char *t = q->run[k].tok, *h = q->run[k].hot;
		uint64_t seq = tok_seq(t), off = rd64(t + REC_OFFSET), loc = q->run[k].loc;
		uint32_t length = rd32(t + REC_LENGTH), vol = rd32(t + REC_VOLUME);
		uint8_t op = t[REC_OP];

		if (h == NULL && !(loc >= r_start && loc + rec_size(t) <= r_end)) {
			/* The scratch buffer is about to change under the merged write. */
			if (flush_merged(q, &niov, image_fds[m_vol], m_vol, m_off, seq, err) < 0)
				return -1;
			if (read_back(q, k, journal_fd, &r_start, &r_end, err) < 0)
				return -1;
		}
		if (h == NULL)
			h = q->scratch + (loc - r_start);
		/* The journal must hold this very record: its header is the token. */
		if (memcmp(h, t, RXQ_TOKEN) != 0) {
			err->off = loc;
			return fail(err, RXQ_JOURNAL, seq, h, t);
		}
		if (op == REC_OP_MARK)
			continue; /* a group point marker: nothing to write */
		if (vol >= nvol) {
			err->volume = vol;
			return fail(err, RXQ_VOLUME, seq, t, NULL);
		}
		if (op != REC_OP_FLUSH && (off > image_sizes[vol] || length > image_sizes[vol] - off)) {
			err->limit = image_sizes[vol];
			err->volume = vol;
			return fail(err, RXQ_RANGE, seq, t, NULL);
		}
		if (op == REC_OP_WRITE) {
			if (niov == 0 || vol != m_vol || off != m_end || niov == IOV_MAX ||
			    m_end - m_off + length > MERGE_MAX) {
				if (flush_merged(q, &niov, image_fds[m_vol], m_vol, m_off, seq, err) < 0)
					return -1;
				m_off = m_end = off;
				m_vol = vol;
			}
			q->iov[niov].iov_base = (void *)(h + RING_HEADER);
			q->iov[niov++].iov_len = length;
			m_end += length;
			*written += length;
			continue;
		}
		if (flush_merged(q, &niov, image_fds[m_vol], m_vol, m_off, seq, err) < 0)
			return -1;
		if (op == REC_OP_FLUSH) {
			/* A flush covers every volume of the resource. */
			for (uint32_t v = 0; v < nvol; v++) {
				if ((r = dpx_fdatasync(image_fds[v])) < 0) {
					err->volume = v;
					return io_fail(err, -r, seq);
				}
			}
			continue;
		}
		r = dpx_zero_range(image_fds[vol], is_blk[vol], off, length, true);
		if (r < 0) {
			err->volume = vol;
			return io_fail(err, -r, seq);
		}
	}
	if (q->run_n > 0 &&
	    flush_merged(q, &niov, image_fds[m_vol], m_vol, m_off,
	                 tok_seq(q->run[q->run_n - 1].tok), err) < 0)
		return -1;
	return 0;
}

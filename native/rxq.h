/*
 * rxq.h: the secondary's pending write queue (DESIGN §6) and the
 * applier's inner loop, so that a TOKENS or DATA frame costs one call, not
 * a Python loop per record. replicator/secondary/pending.py wraps it and documents
 * the rules; in short:
 *
 * - one entry per seq after `applied`: a token (48-byte record header),
 *   then, once the data arrived, a location (the record's file offset in
 *   the journal);
 * - `received`: every seq <= it is applied or complete;
 * - a run is the in-order complete entries after `applied`; the applier
 *   takes one (rxq_take_run), writes it without holding any lock
 *   (rxq_apply_run reads only the copy the run keeps), then marks it
 *   applied;
 * - a call that finds a broken rule changes nothing and says why in
 *   struct rxq_err.
 *
 * Not thread-safe: the caller serialises every call except rxq_apply_run,
 * which touches only the handed-out run (one applier at a time).
 */
#ifndef DUPLEX_RXQ_H
#define DUPLEX_RXQ_H

#include <stddef.h>
#include <stdint.h>

#define RXQ_TOKEN 48

/* What broke a rule (pending.py words the message from the fields). */
enum rxq_fault {
	RXQ_OK = 0,
	RXQ_APPLIED_DIFFERS = 1, /* token for the applied seq differs from its record */
	RXQ_WINDOW = 2,          /* seq too far past the applied seq (err->limit, err->floor) */
	RXQ_TOKEN_DIFFERS = 3,   /* two different tokens for one seq */
	RXQ_BATCH_DIFFERS = 4,   /* ...within one batch */
	RXQ_NO_TOKEN = 5,        /* data before its token */
	RXQ_DATA_DIFFERS = 6,    /* data header differs from its token */
	RXQ_NOMEM = 7,
	RXQ_BAD_RECORD = 8,      /* a token or record is malformed (err->off) */
	RXQ_RANGE = 9,           /* apply: the range runs past the image (err->limit = size) */
	RXQ_VOLUME = 10,         /* apply: no image for the record's volume */
	RXQ_IO = 11,             /* apply: a syscall failed (err->errnum) */
	RXQ_JOURNAL = 12,        /* apply: the journal holds another record there */
};

struct rxq_err {
	int fault;
	int errnum;
	uint64_t seq;
	uint64_t limit;
	uint64_t floor;
	uint64_t off;
	unsigned char got[48];  /* the offending token or header */
	unsigned char had[48];  /* what the queue holds for that seq */
	uint32_t volume;        /* apply: the volume whose image failed (UINT32_MAX: none) */
};

/* A snapshot of the counters, in one call. */
struct rxq_info {
	uint64_t applied;      /* every seq <= this is in the image */
	uint64_t received;     /* every seq <= this is applied or complete */
	uint64_t highest;      /* highest seq announced */
	uint64_t base_hint;    /* base seq of an increment being staged */
	uint64_t bytes;        /* encoded bytes of complete, unapplied records */
	uint64_t entries;      /* entries after `applied` (complete or not) */
	uint64_t run_end;      /* last seq of the run handed out, 0: none */
	uint64_t run_records;
	uint64_t run_bytes;    /* encoded bytes of the run handed out */
	int has_applied_token;
	unsigned char applied_token[48];
};

/* Entry states, as rxq_get reports them. */
#define RXQ_NONE 0
#define RXQ_ANNOUNCED 1
#define RXQ_COMPLETE 2

struct rxq;

/* A queue whose image holds every seq <= applied; applied_token (48 bytes)
 * may be NULL. window: how far past max(applied, base) a seq may lie. */
int rxq_new(struct rxq **out, uint64_t applied, const unsigned char *applied_token,
            uint64_t window);
void rxq_free(struct rxq *q);

void rxq_info(const struct rxq *q, struct rxq_info *out);

/* Announce n tokens (n * 48 bytes). Returns how many were new, or -1. */
int64_t rxq_add_tokens(struct rxq *q, const unsigned char *toks, size_t n, struct rxq_err *err);

/* Packed records (already checked by records_check) of one DATA frame.
 * Each new one becomes complete at location loc_base + its offset in buf;
 * duplicates are ignored. With hot, buf stays valid and unchanged until
 * `applied` reaches its highest seq (the caller keeps it), and the applier
 * writes from it instead of reading the journal back. With dry_run nothing
 * changes (a check first). Returns how many were (or would be) new, or -1. */
int64_t rxq_add_records(struct rxq *q, const unsigned char *buf, size_t len, uint64_t loc_base,
                        int hot, int dry_run, struct rxq_err *err);

/* One record, by its header, stored at loc (journal replay, tests): 1 new,
 * 0 duplicate, -1 broken rule. With dry_run nothing changes. */
int rxq_add_record(struct rxq *q, const unsigned char *token, uint64_t loc, int dry_run,
                   struct rxq_err *err);

/* The seqs of the entries after `applied`, in no order, into out (room for
 * cap). Returns how many there are (more than cap: only cap written). */
uint64_t rxq_live_seqs(const struct rxq *q, uint64_t *out, uint64_t cap);

/* The lowest seq after `applied` that has an entry, its token into token;
 * 0 when there is none. One pass over the table, however wide the gaps. */
uint64_t rxq_oldest(const struct rxq *q, unsigned char *token);

/* State of seq (RXQ_NONE/ANNOUNCED/COMPLETE); token and *loc filled when known. */
int rxq_get(const struct rxq *q, uint64_t seq, unsigned char *token, uint64_t *loc);

/* Hand out the in-order run after `applied` (at most max_records records
 * and max_bytes bytes, but at least one when one is ready; 0: no limit).
 * Returns its length; rxq_run_item reads it. */
int64_t rxq_take_run(struct rxq *q, uint64_t max_records, uint64_t max_bytes);

/* A consistency group's apply bound (DESIGN §13): from now on a run stops
 * before the first record other than a MARK stamped after ts (0: no
 * bound). Stamps increase with seq, so what passes is a prefix. */
void rxq_set_ts_bound(struct rxq *q, uint64_t ts);

/* The stamp of the record at `received` (the last of the complete prefix),
 * or of the applied token when nothing is pending (0: none known). */
uint64_t rxq_received_ts(const struct rxq *q);
int rxq_run_item(const struct rxq *q, uint64_t i, unsigned char *token, uint64_t *loc);

/* Write the handed-out run to the image: each record's data read back from
 * the journal at its location (header compared with the token), adjacent
 * writes merged, TRIM/ZERO as zeroing, FLUSH as fdatasync. Single volume
 * (0). *written: data bytes written. 0, or -1 with err (nothing marked). */
int rxq_apply_run(struct rxq *q, int journal_fd, int image_fd, uint64_t image_size,
                  uint64_t *written, struct rxq_err *err);

/* rxq_apply_run for a resource of several volumes (DESIGN §8): volume v's
 * image is image_fds[v], image_sizes[v] bytes, v < nvol (1..RXQ_MAX_VOLUMES);
 * each record goes to its volume's image at its (volume-relative) offset;
 * writes merge only within one volume; a FLUSH fdatasyncs every image; a
 * record naming volume >= nvol fails RXQ_VOLUME. err->volume names the
 * image of a RANGE or IO fault. rxq_apply_run is this with one volume. */
#define RXQ_MAX_VOLUMES 64
int rxq_apply_run_volumes(struct rxq *q, int journal_fd, const int *image_fds,
                          const uint64_t *image_sizes, uint32_t nvol,
                          uint64_t *written, struct rxq_err *err);

/* The run ending at seq is in the image. 0, or -1 (not the run handed out). */
int rxq_mark_applied(struct rxq *q, uint64_t seq);

/* Accept tokens for the stream that follows an increment's base seq. */
void rxq_expect_base(struct rxq *q, uint64_t seq);

/* A committed increment up to seq is durable but held (a consistency
 * group's, DESIGN §13): `received` may pass the seqs it covers, so records
 * after it count as journaled; runs still stop there until rxq_rebase. */
void rxq_cover(struct rxq *q, uint64_t seq);

/* A committed increment brought the image to seq: drop every entry at or
 * below it. token may be NULL. 0, or -1 if seq < applied. */
int rxq_rebase(struct rxq *q, uint64_t seq, const unsigned char *token);

#endif

/*
 * actlog.c: the activity log (see actlog.h for the contract).
 *
 * Slots hold extents; a hash finds an extent's slot, an LRU list orders
 * the slots in the set (most recent first). A slot in the set is ACTIVE
 * (durable in the last transaction) or PENDING (being written in the
 * transaction under way). Only one thread writes a transaction at a time
 * (txn_busy); it does the I/O without the mutex, so writes to extents that
 * are already active never wait for it.
 */
#include "actlog.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bitmap.h"
#include "crc32c.h"
#include "util.h"

#define AL_MAGIC "DPXACTL\0"
#define TXN_MAGIC "DPXALTX\0"
#define AL_HEADER_SIZE 4096u
#define AL_MAX_SLOTS (1u << 20)

enum { SLOT_FREE = 0, SLOT_PENDING, SLOT_ACTIVE };

struct al_header {
	char magic[8];
	uint32_t version;
	uint32_t slots;
	uint8_t uuid[16];
	uint64_t extent_size;
	uint32_t block_size;
	uint32_t header_crc; /* CRC32C of the 4 KiB header block with this field 0 */
};
_Static_assert(sizeof(struct al_header) == 48, "AL header layout");

struct al_txn {
	char magic[8];
	uint64_t txn;
	uint8_t uuid[16];
	uint32_t count;
	uint32_t crc; /* CRC32C of this header (crc 0) and the count extents */
	/* uint32_t extent[count] follows */
};
_Static_assert(sizeof(struct al_txn) == 40, "AL transaction layout");

struct al_slot {
	uint32_t extent;
	uint32_t inflight;
	uint8_t state;
	int32_t hnext;              /* hash chain, or free list */
	int32_t lru_prev, lru_next; /* the set, most recently used first */
};

struct actlog {
	char *path;
	int fd;
	uint8_t uuid[16];
	uint64_t extent_size;
	uint32_t slots;
	uint32_t block_size;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct al_slot *slot;
	int32_t *bucket;
	uint32_t nbuckets; /* power of two */
	int32_t free_head;
	int32_t lru_head, lru_tail;
	uint32_t nset;        /* slots ACTIVE or PENDING */
	uint64_t inflight;    /* sum of slot inflight counts */
	uint32_t waiters;
	bool txn_busy;
	int error;            /* sticky -errno after a failed transaction */
	uint64_t next_txn;
	unsigned char *block; /* transaction buffer, owned by the txn_busy holder */

	uint32_t *recovered;
	size_t nrecovered;

	uint64_t n_txn, n_evict, n_wait, last_txn;
};

/* ---- set bookkeeping (mutex held) --------------------------------------- */

static inline uint32_t hash_ext(const struct actlog *al, uint32_t e)
{
	return (e * 2654435761u) & (al->nbuckets - 1);
}

static int32_t lookup(const struct actlog *al, uint32_t e)
{
	for (int32_t s = al->bucket[hash_ext(al, e)]; s >= 0; s = al->slot[s].hnext) {
		if (al->slot[s].extent == e)
			return s;
	}
	return -1;
}

static void lru_unlink(struct actlog *al, int32_t s)
{
	struct al_slot *x = &al->slot[s];

	if (x->lru_prev >= 0)
		al->slot[x->lru_prev].lru_next = x->lru_next;
	else
		al->lru_head = x->lru_next;
	if (x->lru_next >= 0)
		al->slot[x->lru_next].lru_prev = x->lru_prev;
	else
		al->lru_tail = x->lru_prev;
	x->lru_prev = x->lru_next = -1;
}

static void lru_push_front(struct actlog *al, int32_t s)
{
	struct al_slot *x = &al->slot[s];

	x->lru_prev = -1;
	x->lru_next = al->lru_head;
	if (al->lru_head >= 0)
		al->slot[al->lru_head].lru_prev = s;
	al->lru_head = s;
	if (al->lru_tail < 0)
		al->lru_tail = s;
}

static int32_t insert(struct actlog *al, uint32_t e, uint8_t state)
{
	int32_t s = al->free_head;
	uint32_t h = hash_ext(al, e);

	al->free_head = al->slot[s].hnext;
	al->slot[s].extent = e;
	al->slot[s].inflight = 0;
	al->slot[s].state = state;
	al->slot[s].hnext = al->bucket[h];
	al->bucket[h] = s;
	lru_push_front(al, s);
	al->nset++;
	return s;
}

static void remove_slot(struct actlog *al, int32_t s)
{
	uint32_t h = hash_ext(al, al->slot[s].extent);
	int32_t *pp = &al->bucket[h];

	while (*pp != s)
		pp = &al->slot[*pp].hnext;
	*pp = al->slot[s].hnext;
	lru_unlink(al, s);
	al->slot[s].state = SLOT_FREE;
	al->slot[s].hnext = al->free_head;
	al->free_head = s;
	al->nset--;
}

/* Fill al->block with the current set as transaction txn. */
static void build_txn(struct actlog *al, uint64_t txn)
{
	struct al_txn *t = (struct al_txn *)al->block;
	uint32_t *ext = (uint32_t *)(al->block + sizeof(*t));
	uint32_t n = 0;

	memset(al->block, 0, al->block_size);
	for (int32_t s = al->lru_head; s >= 0; s = al->slot[s].lru_next)
		ext[n++] = al->slot[s].extent;
	memcpy(t->magic, TXN_MAGIC, 8);
	t->txn = txn;
	memcpy(t->uuid, al->uuid, 16);
	t->count = n;
	t->crc = crc32c(0, al->block, sizeof(*t) + 4 * (size_t)n);
}

static int write_txn(struct actlog *al, uint64_t txn)
{
	off_t where = (off_t)(AL_HEADER_SIZE + (txn % 2) * al->block_size);
	int r = dpx_pwrite_full(al->fd, al->block, al->block_size, where);

	if (r == 0)
		r = dpx_fdatasync(al->fd);
	return r;
}

/* ---- lifecycle ------------------------------------------------------------ */

static uint32_t block_size_for(uint32_t slots)
{
	return (uint32_t)dpx_round_up(sizeof(struct al_txn) + 4 * (uint64_t)slots, DPX_PAGE);
}

static void al_free(struct actlog *al)
{
	if (al == NULL)
		return;
	if (al->fd >= 0)
		close(al->fd);
	free(al->slot);
	free(al->bucket);
	free(al->block);
	free(al->recovered);
	free(al->path);
	pthread_mutex_destroy(&al->lock);
	pthread_cond_destroy(&al->cond);
	free(al);
}

static int al_alloc(struct actlog **out, const char *path, const uint8_t uuid[16],
                    uint64_t extent_size, uint32_t slots)
{
	struct actlog *al = calloc(1, sizeof(*al));

	if (al == NULL)
		return -ENOMEM;
	al->fd = -1;
	pthread_mutex_init(&al->lock, NULL);
	pthread_cond_init(&al->cond, NULL);
	memcpy(al->uuid, uuid, 16);
	al->extent_size = extent_size;
	al->slots = slots;
	al->block_size = block_size_for(slots);
	for (al->nbuckets = 16; al->nbuckets < 2 * slots; al->nbuckets *= 2)
		;
	al->path = strdup(path);
	al->slot = calloc(slots, sizeof(*al->slot));
	al->bucket = malloc(al->nbuckets * sizeof(*al->bucket));
	al->block = malloc(al->block_size);
	if (al->path == NULL || al->slot == NULL || al->bucket == NULL || al->block == NULL) {
		al_free(al);
		return -ENOMEM;
	}
	for (uint32_t b = 0; b < al->nbuckets; b++)
		al->bucket[b] = -1;
	for (uint32_t s = 0; s < slots; s++) {
		al->slot[s].hnext = (int32_t)s + 1 < (int32_t)slots ? (int32_t)s + 1 : -1;
		al->slot[s].lru_prev = al->slot[s].lru_next = -1;
	}
	al->free_head = 0;
	al->lru_head = al->lru_tail = -1;
	*out = al;
	return 0;
}

int actlog_create(struct actlog **out, const char *path, const uint8_t uuid[16],
                  uint64_t extent_size, uint32_t slots, char *err, size_t errlen)
{
	unsigned char hdr[AL_HEADER_SIZE];
	struct al_header *h = (struct al_header *)hdr;
	struct actlog *al;
	char *tmp = NULL;
	int r, old_fd;

	*out = NULL;
	if (extent_size < 4096 || extent_size % 512 != 0) {
		dpx_seterr(err, errlen, "activity log %s: extent size %llu is not a multiple of 512 >= 4096",
		           path, (unsigned long long)extent_size);
		return -EINVAL;
	}
	if (slots < 1 || slots > AL_MAX_SLOTS) {
		dpx_seterr(err, errlen, "activity log %s: %u slots out of range (1 .. %u)", path, slots,
		           AL_MAX_SLOTS);
		return -EINVAL;
	}
	if ((r = al_alloc(&al, path, uuid, extent_size, slots)) < 0) {
		dpx_seterr(err, errlen, "activity log %s: out of memory", path);
		return r;
	}
	old_fd = open(path, O_RDWR | O_CLOEXEC);
	if (old_fd >= 0 && (r = dpx_lock(old_fd, "activity log", path, err, errlen)) < 0)
		goto fail;
	tmp = malloc(strlen(path) + 5);
	if (tmp == NULL) {
		r = -ENOMEM;
		goto fail;
	}
	strcpy(tmp, path);
	strcat(tmp, ".tmp");
	al->fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (al->fd < 0) {
		r = -errno;
		dpx_seterr(err, errlen, "activity log %s: cannot create %s: %s", path, tmp, strerror(-r));
		goto fail;
	}
	if ((r = dpx_lock(al->fd, "activity log", tmp, err, errlen)) < 0)
		goto fail;
	memset(hdr, 0, sizeof(hdr));
	memcpy(h->magic, AL_MAGIC, 8);
	h->version = ACTLOG_VERSION;
	h->slots = slots;
	memcpy(h->uuid, uuid, 16);
	h->extent_size = extent_size;
	h->block_size = al->block_size;
	h->header_crc = crc32c(0, hdr, sizeof(hdr));
	r = dpx_pwrite_full(al->fd, hdr, sizeof(hdr), 0);
	/* Both blocks valid and empty: later, "both invalid" always means damage. */
	for (uint64_t t = 0; r == 0 && t < 2; t++) {
		build_txn(al, t);
		r = dpx_pwrite_full(al->fd, al->block, al->block_size,
		                    (off_t)(AL_HEADER_SIZE + t * al->block_size));
	}
	if (r == 0)
		r = dpx_fdatasync(al->fd);
	if (r < 0) {
		dpx_seterr(err, errlen, "activity log %s: cannot write %s: %s", path, tmp, strerror(-r));
		goto fail;
	}
	if (rename(tmp, path) != 0) {
		r = -errno;
		dpx_seterr(err, errlen, "activity log %s: cannot rename %s into place: %s", path, tmp,
		           strerror(-r));
		goto fail;
	}
	if ((r = dpx_fsync_parent(path)) < 0) {
		dpx_seterr(err, errlen, "activity log %s: cannot sync its directory: %s", path,
		           strerror(-r));
		goto fail;
	}
	al->next_txn = 2;
	al->last_txn = 1;
	if (old_fd >= 0)
		close(old_fd);
	free(tmp);
	*out = al;
	return 0;
fail:
	if (tmp != NULL && al->fd >= 0)
		unlink(tmp);
	if (old_fd >= 0)
		close(old_fd);
	free(tmp);
	al_free(al);
	return r;
}

/* Check one transaction block: 1 valid, 0 damaged, -1 valid but foreign. */
static int check_block(const unsigned char *blk, uint32_t block_size, uint32_t slots,
                       const uint8_t uuid[16])
{
	struct al_txn t;
	unsigned char tmp[sizeof(struct al_txn)];
	uint32_t crc;

	memcpy(&t, blk, sizeof(t));
	if (memcmp(t.magic, TXN_MAGIC, 8) != 0 || t.count > slots ||
	    sizeof(t) + 4 * (uint64_t)t.count > block_size)
		return 0;
	memcpy(tmp, blk, sizeof(tmp));
	memset(tmp + offsetof(struct al_txn, crc), 0, 4);
	crc = crc32c(0, tmp, sizeof(tmp));
	crc = crc32c(crc, blk + sizeof(t), 4 * (size_t)t.count);
	if (crc != t.crc)
		return 0;
	return memcmp(t.uuid, uuid, 16) == 0 ? 1 : -1;
}

int actlog_open(struct actlog **out, const char *path, const uint8_t uuid[16], char *err,
                size_t errlen)
{
	unsigned char hdr[AL_HEADER_SIZE];
	struct al_header h;
	struct actlog *al = NULL;
	unsigned char *blk[2] = {NULL, NULL};
	struct stat st;
	uint32_t stored, computed;
	uint64_t expected;
	int fd, r, best = -1, valid[2];
	ssize_t n = 0;

	*out = NULL;
	fd = dpx_open_locked("activity log", path, &st, hdr, sizeof(hdr), &n, err, errlen);
	if (fd < 0)
		return fd;
	memcpy(&h, hdr, sizeof(h));
	r = -EINVAL;
	if (n >= 8 && memcmp(h.magic, AL_MAGIC, 8) != 0) {
		dpx_seterr(err, errlen, "activity log %s: not a Duplex activity log (bad magic)", path);
		goto fail;
	}
	if (n < (ssize_t)AL_HEADER_SIZE) {
		dpx_seterr(err, errlen, "activity log %s: torn: %lld bytes, expected at least %u", path,
		           (long long)st.st_size, AL_HEADER_SIZE);
		goto fail;
	}
	if (h.version != ACTLOG_VERSION) {
		dpx_seterr(err, errlen, "activity log %s: format version %u, this build reads version %u",
		           path, h.version, ACTLOG_VERSION);
		goto fail;
	}
	stored = h.header_crc;
	memset(hdr + offsetof(struct al_header, header_crc), 0, 4);
	computed = crc32c(0, hdr, sizeof(hdr));
	if (stored != computed) {
		dpx_seterr(err, errlen,
		           "activity log %s: header checksum mismatch (stored %08x, computed %08x)",
		           path, stored, computed);
		goto fail;
	}
	if (memcmp(h.uuid, uuid, 16) != 0) {
		char have[37], want[37];
		dpx_uuid_str(h.uuid, have);
		dpx_uuid_str(uuid, want);
		dpx_seterr(err, errlen, "activity log %s: belongs to resource %s, expected %s", path,
		           have, want);
		goto fail;
	}
	if (h.slots < 1 || h.slots > AL_MAX_SLOTS || h.extent_size < 4096 ||
	    h.block_size != block_size_for(h.slots)) {
		dpx_seterr(err, errlen,
		           "activity log %s: inconsistent header (%u slots, extent size %llu, block size %u)",
		           path, h.slots, (unsigned long long)h.extent_size, h.block_size);
		goto fail;
	}
	expected = AL_HEADER_SIZE + 2 * (uint64_t)h.block_size;
	if ((uint64_t)st.st_size < expected) {
		dpx_seterr(err, errlen, "activity log %s: torn: %lld bytes, expected %llu", path,
		           (long long)st.st_size, (unsigned long long)expected);
		goto fail;
	}
	if ((r = al_alloc(&al, path, uuid, h.extent_size, h.slots)) < 0) {
		dpx_seterr(err, errlen, "activity log %s: out of memory", path);
		goto fail;
	}
	al->fd = fd;
	fd = -1;
	for (int b = 0; b < 2; b++) {
		blk[b] = malloc(al->block_size);
		if (blk[b] == NULL) {
			r = -ENOMEM;
			dpx_seterr(err, errlen, "activity log %s: out of memory", path);
			goto fail;
		}
		n = dpx_pread_full(al->fd, blk[b], al->block_size,
		                   (off_t)(AL_HEADER_SIZE + (uint64_t)b * al->block_size));
		if (n != (ssize_t)al->block_size) {
			r = n < 0 ? (int)n : -EIO;
			dpx_seterr(err, errlen, "activity log %s: cannot read transaction block %d: %s",
			           path, b, strerror(-r));
			goto fail;
		}
		valid[b] = check_block(blk[b], al->block_size, al->slots, uuid);
	}
	for (int b = 0; b < 2; b++) {
		if (valid[b] == 1 &&
		    (best < 0 || ((struct al_txn *)blk[b])->txn > ((struct al_txn *)blk[best])->txn))
			best = b;
	}
	if (best < 0) {
		r = -EINVAL;
		if (valid[0] == -1 || valid[1] == -1)
			dpx_seterr(err, errlen,
			           "activity log %s: transaction blocks belong to another resource", path);
		else
			dpx_seterr(err, errlen,
			           "activity log %s: both transaction blocks are damaged (bad magic or checksum)",
			           path);
		goto fail;
	}
	{
		struct al_txn t;
		const uint32_t *ext = (const uint32_t *)(blk[best] + sizeof(t));
		memcpy(&t, blk[best], sizeof(t));
		al->recovered = malloc(sizeof(uint32_t) * (t.count ? t.count : 1));
		if (al->recovered == NULL) {
			r = -ENOMEM;
			dpx_seterr(err, errlen, "activity log %s: out of memory", path);
			goto fail;
		}
		/* The durable set is also where we start: those extents are already
		 * logged, so writes to them need no new transaction. */
		for (uint32_t i = 0; i < t.count; i++) {
			if (lookup(al, ext[i]) >= 0)
				continue;
			al->recovered[al->nrecovered++] = ext[i];
			insert(al, ext[i], SLOT_ACTIVE);
		}
		al->last_txn = t.txn;
		al->next_txn = t.txn + 1;
	}
	free(blk[0]);
	free(blk[1]);
	*out = al;
	return 0;
fail:
	free(blk[0]);
	free(blk[1]);
	if (fd >= 0)
		close(fd);
	al_free(al);
	return r;
}

void actlog_close(struct actlog *al)
{
	al_free(al);
}

uint64_t actlog_extent_size(const struct actlog *al) { return al->extent_size; }
uint32_t actlog_slots(const struct actlog *al) { return al->slots; }

void actlog_stats(struct actlog *al, struct actlog_stats *st)
{
	pthread_mutex_lock(&al->lock);
	st->transactions = al->n_txn;
	st->evictions = al->n_evict;
	st->waits = al->n_wait;
	st->active = al->nset;
	st->slots = al->slots;
	st->extent_size = al->extent_size;
	st->last_txn = al->last_txn;
	pthread_mutex_unlock(&al->lock);
}

size_t actlog_recovered(const struct actlog *al, uint64_t *out, size_t cap)
{
	for (size_t i = 0; i < al->nrecovered && i < cap; i++)
		out[i] = al->recovered[i];
	return al->nrecovered;
}

size_t actlog_active(struct actlog *al, uint64_t *out, size_t cap)
{
	size_t n = 0;

	pthread_mutex_lock(&al->lock);
	for (int32_t s = al->lru_head; s >= 0; s = al->slot[s].lru_next) {
		if (n < cap)
			out[n] = al->slot[s].extent;
		n++;
	}
	pthread_mutex_unlock(&al->lock);
	return n;
}

int64_t actlog_recover_into(const struct actlog *al, struct bitmap *bm, char *err, size_t errlen)
{
	uint32_t ts = bitmap_track_size(bm);
	uint64_t nbits = bitmap_nbits(bm), per;
	int64_t changed = 0;

	if (al->extent_size % ts != 0) {
		dpx_seterr(err, errlen,
		           "activity log %s: extent size %llu is not a multiple of the bitmap's track size %u",
		           al->path, (unsigned long long)al->extent_size, ts);
		return -EINVAL;
	}
	per = al->extent_size / ts;
	for (size_t i = 0; i < al->nrecovered; i++) {
		uint64_t first = (uint64_t)al->recovered[i] * per;
		uint64_t last = first + per - 1;
		if (first >= nbits)
			continue;
		if (last >= nbits)
			last = nbits - 1;
		changed += bitmap_set_bits(bm, first, last);
	}
	return changed;
}

/* ---- the write path ------------------------------------------------------- */

int actlog_begin(struct actlog *al, uint64_t off, uint64_t len, struct bitmap *sync_first)
{
	uint64_t e0, e1;
	int r;

	if (len == 0)
		return 0;
	e0 = off / al->extent_size;
	e1 = (off + len - 1) / al->extent_size;
	if (e1 > UINT32_MAX)
		return -EFBIG;
	if (e1 - e0 + 1 > al->slots)
		return -E2BIG;

	pthread_mutex_lock(&al->lock);
	for (;;) {
		uint32_t missing = 0, free_slots, need, found = 0;
		bool pending = false;

		if (al->error) {
			r = al->error;
			goto out;
		}
		for (uint64_t e = e0; e <= e1; e++) {
			int32_t s = lookup(al, (uint32_t)e);
			if (s < 0)
				missing++;
			else if (al->slot[s].state == SLOT_PENDING)
				pending = true;
		}
		if (missing == 0 && !pending) {
			/* Fast path: every extent is durable in the log. */
			for (uint64_t e = e0; e <= e1; e++) {
				int32_t s = lookup(al, (uint32_t)e);
				al->slot[s].inflight++;
				al->inflight++;
				lru_unlink(al, s);
				lru_push_front(al, s);
			}
			r = 0;
			goto out;
		}
		if (al->txn_busy || pending) {
			al->waiters++;
			pthread_cond_wait(&al->cond, &al->lock);
			al->waiters--;
			continue;
		}
		free_slots = al->slots - al->nset;
		need = missing > free_slots ? missing - free_slots : 0;
		/* Count victims: idle extents outside our range, oldest first. */
		for (int32_t s = al->lru_tail; s >= 0 && found < need; s = al->slot[s].lru_prev) {
			uint32_t e = al->slot[s].extent;
			if (al->slot[s].inflight == 0 && (e < e0 || e > e1))
				found++;
		}
		if (found < need) {
			al->n_wait++;
			al->waiters++;
			pthread_cond_wait(&al->cond, &al->lock);
			al->waiters--;
			continue;
		}
		/* We write the next transaction. Victims leave the set now, so no
		 * one can start a write to them before it is durable without them. */
		for (int32_t s = al->lru_tail; s >= 0 && need > 0;) {
			int32_t prev = al->slot[s].lru_prev;
			uint32_t e = al->slot[s].extent;
			if (al->slot[s].inflight == 0 && (e < e0 || e > e1)) {
				remove_slot(al, s);
				al->n_evict++;
				need--;
			}
			s = prev;
		}
		bool evicted = free_slots < missing;
		for (uint64_t e = e0; e <= e1; e++) {
			if (lookup(al, (uint32_t)e) < 0)
				insert(al, (uint32_t)e, SLOT_PENDING);
		}
		uint64_t txn = al->next_txn++;
		build_txn(al, txn);
		al->txn_busy = true;
		pthread_mutex_unlock(&al->lock);

		r = 0;
		/* Evicted extents' bits must be durable before the log forgets them. */
		if (evicted && sync_first != NULL)
			r = bitmap_sync(sync_first, NULL, 0);
		if (r == 0)
			r = write_txn(al, txn);

		pthread_mutex_lock(&al->lock);
		al->txn_busy = false;
		pthread_cond_broadcast(&al->cond);
		if (r < 0) {
			al->error = r;
			goto out;
		}
		al->n_txn++;
		al->last_txn = txn;
		/* While txn_busy nobody else could evict, so our whole range is
		 * still in the set: take the references now. */
		for (uint64_t e = e0; e <= e1; e++) {
			int32_t s = lookup(al, (uint32_t)e);
			al->slot[s].state = SLOT_ACTIVE;
			al->slot[s].inflight++;
			al->inflight++;
		}
		for (int32_t s = al->lru_head; s >= 0; s = al->slot[s].lru_next)
			al->slot[s].state = SLOT_ACTIVE;
		r = 0;
		goto out;
	}
out:
	pthread_mutex_unlock(&al->lock);
	return r;
}

void actlog_end(struct actlog *al, uint64_t off, uint64_t len)
{
	uint64_t e0, e1;
	bool wake = false;

	if (len == 0)
		return;
	e0 = off / al->extent_size;
	e1 = (off + len - 1) / al->extent_size;
	pthread_mutex_lock(&al->lock);
	for (uint64_t e = e0; e <= e1 && e <= UINT32_MAX; e++) {
		int32_t s = lookup(al, (uint32_t)e);
		if (s >= 0 && al->slot[s].inflight > 0) {
			al->inflight--;
			if (--al->slot[s].inflight == 0)
				wake = true;
		}
	}
	if (wake && al->waiters > 0)
		pthread_cond_broadcast(&al->cond);
	pthread_mutex_unlock(&al->lock);
}

int actlog_quiesce(struct actlog *al, struct bitmap *bm, char *err, size_t errlen)
{
	uint64_t txn;
	int r;

	pthread_mutex_lock(&al->lock);
	while (!al->error && (al->txn_busy || al->inflight > 0)) {
		al->waiters++;
		pthread_cond_wait(&al->cond, &al->lock);
		al->waiters--;
	}
	if (al->error) {
		r = al->error;
		pthread_mutex_unlock(&al->lock);
		dpx_seterr(err, errlen, "activity log %s: failed earlier: %s", al->path, strerror(-r));
		return r;
	}
	while (al->lru_head >= 0)
		remove_slot(al, al->lru_head);
	txn = al->next_txn++;
	build_txn(al, txn);
	al->txn_busy = true;
	pthread_mutex_unlock(&al->lock);

	r = bm != NULL ? bitmap_sync(bm, err, errlen) : 0;
	if (r == 0) {
		r = write_txn(al, txn);
		if (r < 0)
			dpx_seterr(err, errlen, "activity log %s: cannot write transaction: %s", al->path,
			           strerror(-r));
	}

	pthread_mutex_lock(&al->lock);
	al->txn_busy = false;
	if (r < 0)
		al->error = r;
	else {
		al->n_txn++;
		al->last_txn = txn;
	}
	pthread_cond_broadcast(&al->cond);
	pthread_mutex_unlock(&al->lock);
	return r;
}

/*
 * bitmap.c: the track bitmap (see bitmap.h for the contract).
 *
 * Memory: the bits are anonymous memory loaded from the file at open. A
 * byte per 4 KiB page of bits remembers which pages changed since the last
 * sync; bitmap_sync() writes only those. A setter changes the word first
 * and marks the page after, while a syncer clears the page mark before it
 * copies the page, so a concurrent change is either in the copy or leaves
 * the page marked for the next sync. The copy reads word by word
 * atomically; bits are independent, so a page copied while another bit in
 * it changes is still right bit by bit.
 */
#include "bitmap.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"
#include "util.h"

#define BITMAP_MAGIC "DPXBMAP\0"
#define STATE_CLEAN 1u
#define STATE_DIRTY 2u
#define WORDS_PER_PAGE (DPX_PAGE / 8)

struct bm_header {
	char magic[8];
	uint32_t version;
	uint32_t state;
	uint8_t uuid[16];
	uint32_t track_size;
	uint32_t header_size;
	uint64_t nbits;
	uint32_t bits_crc;
	uint32_t header_crc; /* CRC32C of the 4 KiB header block with this field 0 */
	uint64_t generation; /* header writes so far: helps post-mortems */
};
_Static_assert(sizeof(struct bm_header) == 64, "bitmap header layout");

struct bitmap {
	char *path; /* NULL: anonymous */
	int fd;
	uint8_t uuid[16];
	uint32_t track_size;
	uint64_t nbits;
	uint64_t nwords;
	size_t bits_bytes; /* nwords * 8 rounded up to pages */
	size_t npages;
	_Atomic uint64_t *words;
	atomic_uchar *dirty; /* per page of bits; NULL when anonymous */
	bool was_dirty;
	uint64_t generation;
	_Atomic uint64_t syncs;
	pthread_mutex_t sync_lock;
};

static size_t bits_bytes_for(uint64_t nbits)
{
	return (size_t)dpx_round_up((nbits + 63) / 64 * 8, DPX_PAGE);
}

static bool is_pow2(uint32_t v)
{
	return v != 0 && (v & (v - 1)) == 0;
}

static void bm_free(struct bitmap *bm)
{
	if (bm == NULL)
		return;
	if (bm->fd >= 0)
		close(bm->fd);
	if (bm->words != NULL && bm->words != MAP_FAILED)
		munmap((void *)bm->words, bm->bits_bytes);
	free(bm->dirty);
	free(bm->path);
	pthread_mutex_destroy(&bm->sync_lock);
	free(bm);
}

/* Allocate the in-memory part for a geometry. */
static int bm_alloc(struct bitmap **out, const char *path, const uint8_t uuid[16],
                    uint32_t track_size, uint64_t nbits)
{
	struct bitmap *bm = calloc(1, sizeof(*bm));

	if (bm == NULL)
		return -ENOMEM;
	bm->fd = -1;
	pthread_mutex_init(&bm->sync_lock, NULL);
	memcpy(bm->uuid, uuid, 16);
	bm->track_size = track_size;
	bm->nbits = nbits;
	bm->nwords = (nbits + 63) / 64;
	bm->bits_bytes = bits_bytes_for(nbits);
	bm->npages = bm->bits_bytes / DPX_PAGE;
	bm->words = mmap(NULL, bm->bits_bytes, PROT_READ | PROT_WRITE,
	                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (bm->words == MAP_FAILED) {
		bm->words = NULL;
		bm_free(bm);
		return -ENOMEM;
	}
	if (path != NULL) {
		bm->path = strdup(path);
		bm->dirty = calloc(bm->npages, sizeof(atomic_uchar));
		if (bm->path == NULL || bm->dirty == NULL) {
			bm_free(bm);
			return -ENOMEM;
		}
	}
	*out = bm;
	return 0;
}

static inline void mark_dirty(struct bitmap *bm, uint64_t word)
{
	atomic_uchar *d;

	if (bm->dirty == NULL)
		return;
	d = &bm->dirty[word / WORDS_PER_PAGE];
	/* Read first: most writes hit pages already marked, and a plain load
	 * keeps the cache line shared between CPUs. */
	if (!atomic_load_explicit(d, memory_order_relaxed))
		atomic_exchange(d, 1);
}

static int write_header(struct bitmap *bm, uint32_t state, uint32_t bits_crc)
{
	unsigned char block[BITMAP_HEADER_SIZE];
	struct bm_header *h = (struct bm_header *)block;
	int r;

	memset(block, 0, sizeof(block));
	memcpy(h->magic, BITMAP_MAGIC, 8);
	h->version = BITMAP_VERSION;
	h->state = state;
	memcpy(h->uuid, bm->uuid, 16);
	h->track_size = bm->track_size;
	h->header_size = BITMAP_HEADER_SIZE;
	h->nbits = bm->nbits;
	h->bits_crc = bits_crc;
	h->generation = ++bm->generation;
	h->header_crc = crc32c(0, block, sizeof(block));
	r = dpx_pwrite_full(bm->fd, block, sizeof(block), 0);
	if (r == 0)
		r = dpx_fdatasync(bm->fd);
	return r;
}

static bool geometry_ok(uint32_t track_size, uint64_t nbits, char *err, size_t errlen,
                        const char *path)
{
	if (!is_pow2(track_size) || track_size < 512) {
		dpx_seterr(err, errlen, "bitmap %s: track size %u is not a power of two >= 512",
		           path ? path : "(memory)", track_size);
		return false;
	}
	if (nbits == 0 || nbits > (UINT64_C(1) << 40)) {
		dpx_seterr(err, errlen, "bitmap %s: bit count %llu out of range (1 .. 2^40)",
		           path ? path : "(memory)", (unsigned long long)nbits);
		return false;
	}
	return true;
}

/* Refuse to take over a file another process (or another open) holds. */
int bitmap_create(struct bitmap **out, const char *path, const uint8_t uuid[16],
                  uint32_t track_size, uint64_t nbits, char *err, size_t errlen)
{
	struct bitmap *bm;
	char *tmp = NULL;
	int r, old_fd = -1;

	*out = NULL;
	if (!geometry_ok(track_size, nbits, err, errlen, path))
		return -EINVAL;
	r = bm_alloc(&bm, path, uuid, track_size, nbits);
	if (r < 0) {
		dpx_seterr(err, errlen, "bitmap %s: out of memory", path ? path : "(memory)");
		return r;
	}
	if (path == NULL) {
		*out = bm;
		return 0;
	}
	/* If the target exists and is open elsewhere, do not replace it. */
	old_fd = open(path, O_RDWR | O_CLOEXEC);
	if (old_fd >= 0 && (r = dpx_lock(old_fd, "bitmap", path, err, errlen)) < 0)
		goto fail;
	tmp = malloc(strlen(path) + 5);
	if (tmp == NULL) {
		r = -ENOMEM;
		dpx_seterr(err, errlen, "bitmap %s: out of memory", path);
		goto fail;
	}
	strcpy(tmp, path);
	strcat(tmp, ".tmp");
	bm->fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (bm->fd < 0) {
		r = -errno;
		dpx_seterr(err, errlen, "bitmap %s: cannot create %s: %s", path, tmp, strerror(-r));
		goto fail;
	}
	if ((r = dpx_lock(bm->fd, "bitmap", tmp, err, errlen)) < 0)
		goto fail;
	if (ftruncate(bm->fd, (off_t)(BITMAP_HEADER_SIZE + bm->bits_bytes)) != 0) {
		r = -errno;
		dpx_seterr(err, errlen, "bitmap %s: cannot size %s: %s", path, tmp, strerror(-r));
		goto fail;
	}
	if ((r = write_header(bm, STATE_DIRTY, 0)) < 0) {
		dpx_seterr(err, errlen, "bitmap %s: cannot write header: %s", path, strerror(-r));
		goto fail;
	}
	if (rename(tmp, path) != 0) {
		r = -errno;
		dpx_seterr(err, errlen, "bitmap %s: cannot rename %s into place: %s", path, tmp,
		           strerror(-r));
		goto fail;
	}
	if ((r = dpx_fsync_parent(path)) < 0) {
		dpx_seterr(err, errlen, "bitmap %s: cannot sync its directory: %s", path,
		           strerror(-r));
		goto fail;
	}
	if (old_fd >= 0)
		close(old_fd);
	free(tmp);
	*out = bm;
	return 0;
fail:
	if (tmp != NULL && bm->fd >= 0)
		unlink(tmp);
	if (old_fd >= 0)
		close(old_fd);
	free(tmp);
	bm_free(bm);
	return r;
}

int bitmap_open(struct bitmap **out, const char *path, const uint8_t uuid[16],
                uint32_t track_size, char *err, size_t errlen)
{
	unsigned char block[BITMAP_HEADER_SIZE];
	struct bm_header h;
	struct bitmap *bm = NULL;
	struct stat st;
	uint32_t stored, computed;
	uint64_t expected;
	ssize_t n = 0;
	int fd, r;

	*out = NULL;
	fd = dpx_open_locked("bitmap", path, &st, block, sizeof(block), &n, err, errlen);
	if (fd < 0)
		return fd;
	memcpy(&h, block, sizeof(h));
	if (n >= 8 && memcmp(h.magic, BITMAP_MAGIC, 8) != 0) {
		r = -EINVAL;
		dpx_seterr(err, errlen, "bitmap %s: not a Duplex bitmap (bad magic)", path);
		goto fail;
	}
	if (n < BITMAP_HEADER_SIZE) {
		r = -EINVAL;
		dpx_seterr(err, errlen, "bitmap %s: torn: %lld bytes, expected at least %u", path,
		           (long long)st.st_size, BITMAP_HEADER_SIZE);
		goto fail;
	}
	if (h.version != BITMAP_VERSION) {
		r = -EINVAL;
		dpx_seterr(err, errlen, "bitmap %s: format version %u, this build reads version %u",
		           path, h.version, BITMAP_VERSION);
		goto fail;
	}
	stored = h.header_crc;
	memset(block + offsetof(struct bm_header, header_crc), 0, 4);
	computed = crc32c(0, block, sizeof(block));
	if (stored != computed) {
		r = -EINVAL;
		dpx_seterr(err, errlen,
		           "bitmap %s: header checksum mismatch (stored %08x, computed %08x)", path,
		           stored, computed);
		goto fail;
	}
	if (memcmp(h.uuid, uuid, 16) != 0) {
		char have[37], want[37];
		dpx_uuid_str(h.uuid, have);
		dpx_uuid_str(uuid, want);
		r = -EINVAL;
		dpx_seterr(err, errlen, "bitmap %s: belongs to resource %s, expected %s", path, have,
		           want);
		goto fail;
	}
	if (h.track_size != track_size) {
		r = -EINVAL;
		dpx_seterr(err, errlen, "bitmap %s: track size %u, expected %u", path, h.track_size,
		           track_size);
		goto fail;
	}
	if (h.header_size != BITMAP_HEADER_SIZE || (h.state != STATE_CLEAN && h.state != STATE_DIRTY) ||
	    !geometry_ok(h.track_size, h.nbits, NULL, 0, path)) {
		r = -EINVAL;
		dpx_seterr(err, errlen,
		           "bitmap %s: inconsistent header (header size %u, state %u, %llu bits)",
		           path, h.header_size, h.state, (unsigned long long)h.nbits);
		goto fail;
	}
	expected = BITMAP_HEADER_SIZE + bits_bytes_for(h.nbits);
	if ((uint64_t)st.st_size < expected) {
		r = -EINVAL;
		dpx_seterr(err, errlen, "bitmap %s: torn: %lld bytes, expected %llu", path,
		           (long long)st.st_size, (unsigned long long)expected);
		goto fail;
	}
	if ((r = bm_alloc(&bm, path, uuid, track_size, h.nbits)) < 0) {
		dpx_seterr(err, errlen, "bitmap %s: out of memory", path);
		goto fail;
	}
	bm->fd = fd;
	fd = -1;
	bm->generation = h.generation;
	n = dpx_pread_full(bm->fd, (void *)bm->words, bm->bits_bytes, BITMAP_HEADER_SIZE);
	if (n < 0 || (size_t)n != bm->bits_bytes) {
		r = n < 0 ? (int)n : -EIO;
		dpx_seterr(err, errlen, "bitmap %s: cannot read bits: %s", path, strerror(-r));
		goto fail;
	}
	if (h.state == STATE_CLEAN) {
		computed = crc32c(0, (const void *)bm->words, bm->bits_bytes);
		if (computed != h.bits_crc) {
			r = -EINVAL;
			dpx_seterr(err, errlen,
			           "bitmap %s: bits damaged (checksum %08x, header says %08x)", path,
			           computed, h.bits_crc);
			goto fail;
		}
	}
	/* Bits past nbits must read as zero whatever a DIRTY file holds there. */
	if (bm->nbits % 64)
		bm->words[bm->nwords - 1] &= ~(~UINT64_C(0) << (bm->nbits % 64));
	memset((void *)(bm->words + bm->nwords), 0, bm->bits_bytes - bm->nwords * 8);
	bm->was_dirty = h.state == STATE_DIRTY;
	if ((r = write_header(bm, STATE_DIRTY, 0)) < 0) {
		dpx_seterr(err, errlen, "bitmap %s: cannot mark dirty: %s", path, strerror(-r));
		goto fail;
	}
	*out = bm;
	return 0;
fail:
	if (fd >= 0)
		close(fd);
	bm_free(bm);
	return r;
}

int bitmap_copy(struct bitmap **out, struct bitmap *src, const char *path, char *err,
                size_t errlen)
{
	struct bitmap *bm;
	int r;

	r = bitmap_create(&bm, path, src->uuid, src->track_size, src->nbits, err, errlen);
	if (r < 0)
		return r;
	for (uint64_t w = 0; w < src->nwords; w++) {
		uint64_t v = atomic_load_explicit(&src->words[w], memory_order_relaxed);
		if (v) {
			atomic_store_explicit(&bm->words[w], v, memory_order_relaxed);
			mark_dirty(bm, w);
		}
	}
	if (path != NULL && (r = bitmap_sync(bm, err, errlen)) < 0) {
		bitmap_abandon(bm);
		return r;
	}
	*out = bm;
	return 0;
}

/* Write pages [p, q) of bits at their place in the file. The words are
 * read one by one with atomic loads into a bounce buffer (other threads may
 * be changing them), so the kernel never reads memory that is being
 * written. */
static int write_pages(struct bitmap *bm, uint64_t *bounce, size_t bounce_pages, size_t p,
                       size_t q)
{
	while (p < q) {
		size_t n = q - p < bounce_pages ? q - p : bounce_pages;
		uint64_t w0 = (uint64_t)p * WORDS_PER_PAGE;
		int r;
		for (uint64_t i = 0; i < n * WORDS_PER_PAGE; i++)
			bounce[i] = atomic_load_explicit(&bm->words[w0 + i], memory_order_relaxed);
		r = dpx_pwrite_full(bm->fd, bounce, n * DPX_PAGE,
		                    (off_t)(BITMAP_HEADER_SIZE + (uint64_t)p * DPX_PAGE));
		if (r < 0)
			return r;
		p += n;
	}
	return 0;
}

int bitmap_sync(struct bitmap *bm, char *err, size_t errlen)
{
	enum { BOUNCE_PAGES = 64 };
	uint64_t *bounce;
	int r = 0;

	if (bm->fd < 0)
		return 0;
	bounce = malloc(BOUNCE_PAGES * DPX_PAGE);
	if (bounce == NULL) {
		dpx_seterr(err, errlen, "bitmap %s: out of memory", bm->path);
		return -ENOMEM;
	}
	/* One sync at a time: a second caller must not return before pages a
	 * first caller took off the dirty list are on disk. */
	pthread_mutex_lock(&bm->sync_lock);
	for (size_t p = 0; p < bm->npages;) {
		size_t q;
		if (!atomic_exchange(&bm->dirty[p], 0)) {
			p++;
			continue;
		}
		for (q = p + 1; q < bm->npages && atomic_exchange(&bm->dirty[q], 0); q++)
			;
		r = write_pages(bm, bounce, BOUNCE_PAGES, p, q);
		if (r < 0) {
			for (size_t i = p; i < q; i++)
				atomic_store(&bm->dirty[i], 1);
			dpx_seterr(err, errlen, "bitmap %s: write failed: %s", bm->path, strerror(-r));
			goto out;
		}
		p = q;
	}
	r = dpx_fdatasync(bm->fd);
	if (r < 0)
		dpx_seterr(err, errlen, "bitmap %s: fdatasync failed: %s", bm->path, strerror(-r));
	else
		atomic_fetch_add(&bm->syncs, 1);
out:
	pthread_mutex_unlock(&bm->sync_lock);
	free(bounce);
	return r;
}

int bitmap_close(struct bitmap *bm, char *err, size_t errlen)
{
	int r = 0;

	if (bm->fd >= 0) {
		/* Bits first, durable; only then the header that vouches for them. */
		r = bitmap_sync(bm, err, errlen);
		if (r == 0) {
			uint32_t crc = crc32c(0, (const void *)bm->words, bm->bits_bytes);
			r = write_header(bm, STATE_CLEAN, crc);
			if (r < 0)
				dpx_seterr(err, errlen, "bitmap %s: cannot write clean header: %s",
				           bm->path, strerror(-r));
		}
	}
	bm_free(bm);
	return r;
}

void bitmap_abandon(struct bitmap *bm)
{
	bm_free(bm);
}

bool bitmap_was_dirty(const struct bitmap *bm) { return bm->was_dirty; }
uint32_t bitmap_track_size(const struct bitmap *bm) { return bm->track_size; }
uint64_t bitmap_nbits(const struct bitmap *bm) { return bm->nbits; }
bool bitmap_has_file(const struct bitmap *bm) { return bm->fd >= 0; }
uint64_t bitmap_sync_count(const struct bitmap *bm) { return atomic_load(&bm->syncs); }

void bitmap_uuid(const struct bitmap *bm, uint8_t out[16])
{
	memcpy(out, bm->uuid, 16);
}

/* Mask of bits [first, last] within word w. */
static inline uint64_t word_mask(uint64_t w, uint64_t first, uint64_t last)
{
	uint64_t m = ~UINT64_C(0);

	if (w == first / 64)
		m &= ~UINT64_C(0) << (first % 64);
	if (w == last / 64)
		m &= ~UINT64_C(0) >> (63 - last % 64);
	return m;
}

int64_t bitmap_set_bits(struct bitmap *bm, uint64_t first, uint64_t last)
{
	int64_t changed = 0;

	for (uint64_t w = first / 64; w <= last / 64; w++) {
		uint64_t m = word_mask(w, first, last);
		uint64_t old;
		/* A write to an already-marked track costs no atomic RMW. */
		if ((atomic_load_explicit(&bm->words[w], memory_order_relaxed) & m) == m)
			continue;
		old = atomic_fetch_or(&bm->words[w], m);
		changed += __builtin_popcountll(m & ~old);
		mark_dirty(bm, w);
	}
	return changed;
}

int64_t bitmap_clear_bits(struct bitmap *bm, uint64_t first, uint64_t last)
{
	int64_t changed = 0;

	for (uint64_t w = first / 64; w <= last / 64; w++) {
		uint64_t m = word_mask(w, first, last);
		uint64_t old;
		if ((atomic_load_explicit(&bm->words[w], memory_order_relaxed) & m) == 0)
			continue;
		old = atomic_fetch_and(&bm->words[w], ~m);
		changed += __builtin_popcountll(m & old);
		mark_dirty(bm, w);
	}
	return changed;
}

/* Byte range -> inclusive track range; false when out of range. */
static bool range_tracks(const struct bitmap *bm, uint64_t off, uint64_t len,
                         uint64_t *first, uint64_t *last)
{
	unsigned shift = (unsigned)__builtin_ctz(bm->track_size);

	if (len == 0 || off + len < off)
		return false;
	*first = off >> shift;
	*last = (off + len - 1) >> shift;
	return *last < bm->nbits;
}

int64_t bitmap_set_range(struct bitmap *bm, uint64_t off, uint64_t len)
{
	uint64_t a, b;

	if (len == 0)
		return 0;
	if (!range_tracks(bm, off, len, &a, &b))
		return -ERANGE;
	return bitmap_set_bits(bm, a, b);
}

int64_t bitmap_clear_range(struct bitmap *bm, uint64_t off, uint64_t len)
{
	uint64_t a, b;

	if (len == 0)
		return 0;
	if (!range_tracks(bm, off, len, &a, &b))
		return -ERANGE;
	return bitmap_clear_bits(bm, a, b);
}

int bitmap_test_range(const struct bitmap *bm, uint64_t off, uint64_t len)
{
	uint64_t a, b;

	if (len == 0)
		return 0;
	if (!range_tracks(bm, off, len, &a, &b))
		return -ERANGE;
	for (uint64_t w = a / 64; w <= b / 64; w++) {
		if (atomic_load_explicit(&bm->words[w], memory_order_relaxed) & word_mask(w, a, b))
			return 1;
	}
	return 0;
}

bool bitmap_set_bit(struct bitmap *bm, uint64_t i)
{
	uint64_t m = UINT64_C(1) << (i % 64);
	uint64_t old;

	if (atomic_load_explicit(&bm->words[i / 64], memory_order_relaxed) & m)
		return true;
	old = atomic_fetch_or(&bm->words[i / 64], m);
	mark_dirty(bm, i / 64);
	return (old & m) != 0;
}

bool bitmap_clear_bit(struct bitmap *bm, uint64_t i)
{
	uint64_t m = UINT64_C(1) << (i % 64);
	uint64_t old;

	if (!(atomic_load_explicit(&bm->words[i / 64], memory_order_relaxed) & m))
		return false;
	old = atomic_fetch_and(&bm->words[i / 64], ~m);
	mark_dirty(bm, i / 64);
	return (old & m) != 0;
}

bool bitmap_test_bit(const struct bitmap *bm, uint64_t i)
{
	return (atomic_load_explicit(&bm->words[i / 64], memory_order_relaxed) >> (i % 64)) & 1;
}

uint64_t bitmap_count(const struct bitmap *bm)
{
	uint64_t n = 0;

	for (uint64_t w = 0; w < bm->nwords; w++)
		n += (uint64_t)__builtin_popcountll(
		    atomic_load_explicit(&bm->words[w], memory_order_relaxed));
	return n;
}

uint64_t bitmap_find_next(const struct bitmap *bm, uint64_t i)
{
	uint64_t w, v;

	if (i >= bm->nbits)
		return BITMAP_NONE;
	w = i / 64;
	v = atomic_load_explicit(&bm->words[w], memory_order_relaxed) & (~UINT64_C(0) << (i % 64));
	for (;;) {
		if (v) {
			uint64_t idx = w * 64 + (uint64_t)__builtin_ctzll(v);
			return idx < bm->nbits ? idx : BITMAP_NONE;
		}
		if (++w >= bm->nwords)
			return BITMAP_NONE;
		v = atomic_load_explicit(&bm->words[w], memory_order_relaxed);
	}
}

uint64_t bitmap_find_next_zero(const struct bitmap *bm, uint64_t i)
{
	uint64_t w, v;

	if (i >= bm->nbits)
		return bm->nbits;
	w = i / 64;
	v = ~atomic_load_explicit(&bm->words[w], memory_order_relaxed) & (~UINT64_C(0) << (i % 64));
	for (;;) {
		if (v) {
			uint64_t idx = w * 64 + (uint64_t)__builtin_ctzll(v);
			return idx < bm->nbits ? idx : bm->nbits;
		}
		if (++w >= bm->nwords)
			return bm->nbits;
		v = ~atomic_load_explicit(&bm->words[w], memory_order_relaxed);
	}
}

static bool same_geometry(const struct bitmap *a, const struct bitmap *b)
{
	return a->nbits == b->nbits && a->track_size == b->track_size &&
	       memcmp(a->uuid, b->uuid, 16) == 0;
}

int64_t bitmap_merge(struct bitmap *dst, const struct bitmap *src)
{
	int64_t changed = 0;

	if (!same_geometry(dst, src))
		return -EINVAL;
	for (uint64_t w = 0; w < dst->nwords; w++) {
		uint64_t v = atomic_load_explicit(&src->words[w], memory_order_relaxed);
		uint64_t old;
		if (v == 0 || (atomic_load_explicit(&dst->words[w], memory_order_relaxed) & v) == v)
			continue;
		old = atomic_fetch_or(&dst->words[w], v);
		changed += __builtin_popcountll(v & ~old);
		mark_dirty(dst, w);
	}
	return changed;
}

int64_t bitmap_subtract(struct bitmap *dst, const struct bitmap *src)
{
	int64_t changed = 0;

	if (!same_geometry(dst, src))
		return -EINVAL;
	for (uint64_t w = 0; w < dst->nwords; w++) {
		uint64_t v = atomic_load_explicit(&src->words[w], memory_order_relaxed);
		uint64_t old;
		if (v == 0 || (atomic_load_explicit(&dst->words[w], memory_order_relaxed) & v) == 0)
			continue;
		old = atomic_fetch_and(&dst->words[w], ~v);
		changed += __builtin_popcountll(v & old);
		mark_dirty(dst, w);
	}
	return changed;
}

void bitmap_clear_all(struct bitmap *bm)
{
	for (uint64_t w = 0; w < bm->nwords; w++) {
		if (atomic_load_explicit(&bm->words[w], memory_order_relaxed) == 0)
			continue;
		atomic_store(&bm->words[w], 0);
		mark_dirty(bm, w);
	}
}

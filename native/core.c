/*
 * core.c: the primary's write path (see core.h for the contract).
 *
 * Lock order: fence (read) -> track stripes -> activity log -> pending
 * groups (one at a time) -> sequencer -> ring. The consumer side takes
 * consumer -> [sequencer ->] ring, then pending groups one at a time with
 * no other lock held.
 *
 * Volumes: struct core_vol holds one fd per volume and its logical base.
 * Everything keyed by track (locks, pending counts, bitmaps, activity log)
 * uses logical offsets; only the device I/O and the records use the
 * volume-relative ones.
 */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "actlog.h"
#include "bitmap.h"
#include "collide.h"
#include "crc32c.h"
#include "flow.h"
#include "records.h"
#include "util.h"

#define NSTRIPES 256u      /* track lock stripes */
#define PEND_GROUP_SHIFT 6 /* 64 adjacent tracks share a pending lock */
#define NPEND_LOCKS 256u
#define PEND_CHUNK 4096u   /* pending counters are allocated per chunk */

/* One volume: read-only after core_open. */
struct core_vol {
	int fd;
	bool is_blk;
	char *path;    /* for messages */
	uint64_t size; /* bytes exported */
	uint64_t base; /* logical offset of its byte 0, track-aligned */
};

struct core {
	struct core_vol *vols;
	uint32_t nvols;
	atomic_bool dsync_ok; /* pwritev2(RWF_DSYNC) works here */
	uint64_t size; /* logical size: the last volume's base + size */
	struct bitmap *oos;
	_Atomic(struct bitmap *) cr; /* read once per request */
	struct bitmap *frozen; /* catch-up increment being drained, or NULL (fence) */
	struct collide *collide; /* copies of frozen tracks hit by writes */
	struct actlog *al;
	struct ring *ring;
	struct flow *flow; /* waits for the peer, for room, max-lag (flow.h) */
	unsigned track_shift;
	uint64_t ntracks;

	pthread_rwlock_t fence;
	pthread_mutex_t track_lock[NSTRIPES];
	pthread_mutex_t pend_lock[NPEND_LOCKS];
	_Atomic(uint32_t *) *pend; /* chunks of per-track pending counts */
	uint64_t npend_chunks;
	atomic_bool clear_enabled;

	pthread_mutex_t seq_lock;
	uint64_t next_seq;
	uint64_t last_ts;      /* seq_lock: the last stamp; stamps strictly increase */
	_Atomic int64_t clock_offset; /* ns added to CLOCK_REALTIME (tests inject skew) */
	int hist_fd;

	pthread_mutex_t consumer_lock;

	_Atomic uint64_t n_writes, n_trims, n_zeros, n_flushes, n_bytes, n_not_queued, n_large,
	    n_hist_err;
};


/* ---- small helpers ---------------------------------------------------- */

static inline void wr64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void wr32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* The volume holding logical byte off, or NULL (alignment gap or past the
 * end). Volumes are few: a scan from the last one. */
static const struct core_vol *vol_at(const struct core *c, uint64_t off)
{
	for (uint32_t i = c->nvols; i-- > 0;) {
		const struct core_vol *v = &c->vols[i];
		if (v->base <= off)
			return off - v->base < v->size ? v : NULL;
	}
	return NULL;
}

/* The bytes of logical track t that its volume holds (from the track's
 * start to the volume's end at most), and that volume; NULL: none. */
static const struct core_vol *track_extent(const struct core *c, uint64_t t, uint64_t *lo,
                                           uint64_t *len)
{
	const struct core_vol *v;

	*lo = t << c->track_shift;
	*len = (uint64_t)1 << c->track_shift;
	v = vol_at(c, *lo);
	if (v != NULL && *len > v->base + v->size - *lo)
		*len = v->base + v->size - *lo;
	return v;
}

static uint64_t now_ns(const struct core *c)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec +
	       (uint64_t)atomic_load(&c->clock_offset);
}

/* The next stamp, with seq_lock held: strictly above the previous one, so
 * seq order is timestamp order with no ties even when the clock steps back
 * (a group's apply bound "ts <= T" is then always a prefix of the stream). */
static uint64_t next_stamp(struct core *c)
{
	uint64_t t = now_ns(c);

	if (t <= c->last_ts)
		t = c->last_ts + 1;
	c->last_ts = t;
	return t;
}

static void fill_header(unsigned char *h, uint64_t seq, uint64_t ts, uint64_t off,
                        uint32_t length, uint32_t dlen, uint32_t volume, uint8_t op,
                        uint8_t flags)
{
	memset(h, 0, RING_HEADER);
	wr64(h + REC_SEQ, seq);
	wr64(h + REC_TS, ts);
	wr64(h + REC_OFFSET, off);
	wr32(h + REC_LENGTH, length);
	wr32(h + REC_DATA_LEN, dlen);
	wr32(h + REC_VOLUME, volume);
	h[REC_OP] = op;
	h[REC_FLAGS] = flags;
}

static uint32_t record_crc(const unsigned char *h, const void *data, size_t dlen)
{
	return crc32c(crc32c(0, h, RING_HEADER), data, dlen); /* crc field is still 0 */
}

/* ---- locks -------------------------------------------------------------- */

static void lock_tracks(struct core *c, uint64_t t0, uint64_t t1)
{
	uint32_t a, b;

	if (t1 - t0 + 1 >= NSTRIPES) {
		for (uint32_t s = 0; s < NSTRIPES; s++)
			pthread_mutex_lock(&c->track_lock[s]);
		return;
	}
	/* Fewer than NSTRIPES consecutive tracks map to distinct stripes, a
	 * cyclic interval: take it in ascending stripe order. */
	a = (uint32_t)(t0 % NSTRIPES);
	b = (uint32_t)(t1 % NSTRIPES);
	if (a <= b) {
		for (uint32_t s = a; s <= b; s++)
			pthread_mutex_lock(&c->track_lock[s]);
	} else {
		for (uint32_t s = 0; s <= b; s++)
			pthread_mutex_lock(&c->track_lock[s]);
		for (uint32_t s = a; s < NSTRIPES; s++)
			pthread_mutex_lock(&c->track_lock[s]);
	}
}

static void unlock_tracks(struct core *c, uint64_t t0, uint64_t t1)
{
	if (t1 - t0 + 1 >= NSTRIPES) {
		for (uint32_t s = 0; s < NSTRIPES; s++)
			pthread_mutex_unlock(&c->track_lock[s]);
		return;
	}
	for (uint64_t t = t0; t <= t1; t++)
		pthread_mutex_unlock(&c->track_lock[t % NSTRIPES]);
}

/* ---- pending counts ---------------------------------------------------- */

static int pend_ensure(struct core *c, uint64_t t0, uint64_t t1)
{
	for (uint64_t ci = t0 / PEND_CHUNK; ci <= t1 / PEND_CHUNK; ci++) {
		uint32_t *expect = NULL, *chunk;
		if (atomic_load_explicit(&c->pend[ci], memory_order_acquire) != NULL)
			continue;
		chunk = calloc(PEND_CHUNK, sizeof(uint32_t));
		if (chunk == NULL)
			return -ENOMEM;
		if (!atomic_compare_exchange_strong(&c->pend[ci], &expect, chunk))
			free(chunk);
	}
	return 0;
}

static inline uint32_t *pend_slot(struct core *c, uint64_t t)
{
	return &atomic_load_explicit(&c->pend[t / PEND_CHUNK], memory_order_acquire)[t % PEND_CHUNK];
}

static inline pthread_mutex_t *pend_lock(struct core *c, uint64_t t)
{
	return &c->pend_lock[(t >> PEND_GROUP_SHIFT) % NPEND_LOCKS];
}

/* Count a request on its tracks, then mark them. The count goes first: a
 * release can clear a bit only at count 0, so it cannot undo our mark. */
static void pend_add(struct core *c, uint64_t t0, uint64_t t1)
{
	struct bitmap *cr = atomic_load(&c->cr);

	for (uint64_t t = t0; t <= t1;) {
		pthread_mutex_t *m = pend_lock(c, t);
		uint64_t group_end = ((t >> PEND_GROUP_SHIFT) + 1) << PEND_GROUP_SHIFT;
		pthread_mutex_lock(m);
		for (; t <= t1 && t < group_end; t++)
			(*pend_slot(c, t))++;
		pthread_mutex_unlock(m);
	}
	bitmap_set_bits(c->oos, t0, t1);
	if (cr != NULL)
		bitmap_set_bits(cr, t0, t1);
}

/* Take counts back; clear a bit at count 0 when allowed. */
static void pend_sub(struct core *c, uint64_t t0, uint64_t t1, bool may_clear)
{
	for (uint64_t t = t0; t <= t1;) {
		pthread_mutex_t *m = pend_lock(c, t);
		uint64_t group_end = ((t >> PEND_GROUP_SHIFT) + 1) << PEND_GROUP_SHIFT;
		pthread_mutex_lock(m);
		/* Read under the lock: a writer that saw the ring dropped turned
		 * clearing off before it took its count back. */
		bool clear = may_clear && atomic_load(&c->clear_enabled);
		for (; t <= t1 && t < group_end; t++) {
			uint32_t *n = pend_slot(c, t);
			if (*n > 0 && --*n == 0 && clear)
				bitmap_clear_bit(c->oos, t);
		}
		pthread_mutex_unlock(m);
	}
}

/* A record's logical tracks: its offset is relative to its volume. */
static bool record_tracks(struct core *c, const unsigned char *hdr, uint64_t *t0, uint64_t *t1)
{
	uint64_t off = rd64(hdr + REC_OFFSET);
	uint32_t len = rd32(hdr + REC_LENGTH), vol = rd32(hdr + REC_VOLUME);

	if (hdr[REC_OP] == REC_OP_FLUSH || hdr[REC_OP] == REC_OP_MARK || len == 0 ||
	    vol >= c->nvols)
		return false;
	off += c->vols[vol].base;
	*t0 = off >> c->track_shift;
	*t1 = (off + len - 1) >> c->track_shift;
	return true;
}

static void on_release(void *ctx, const unsigned char *hdr)
{
	struct core *c = ctx;
	uint64_t t0, t1;

	if (record_tracks(c, hdr, &t0, &t1))
		pend_sub(c, t0, t1, true);
}

static void on_discard(void *ctx, const unsigned char *hdr)
{
	struct core *c = ctx;
	uint64_t t0, t1;

	if (record_tracks(c, hdr, &t0, &t1))
		pend_sub(c, t0, t1, false);
}

/* ---- device I/O ----------------------------------------------------------- */

static int dev_write(struct core *c, const struct core_vol *v, const void *buf, uint64_t len,
                     uint64_t off, bool fua)
{
	uint64_t done = 0;
	int r;

	if (fua && atomic_load(&c->dsync_ok)) {
		/* One durable write instead of write + fdatasync. */
		while (done < len) {
			struct iovec iov = {(char *)buf + done, (size_t)(len - done)};
			ssize_t n = pwritev2(v->fd, &iov, 1, (off_t)(off + done), RWF_DSYNC);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
					atomic_store(&c->dsync_ok, false);
					break;
				}
				return -errno;
			}
			if (n == 0)
				return -EIO;
			done += (uint64_t)n;
		}
		if (done == len)
			return 0;
	}
	r = dpx_pwrite_full(v->fd, (const char *)buf + done, len - done, (off_t)(off + done));
	if (r == 0 && fua)
		r = dpx_fdatasync(v->fd);
	return r;
}

/* Make [off, off+len) read as zeros (util.h), then FUA if asked. */
static int dev_zero(const struct core_vol *v, uint64_t off, uint64_t len, bool punch_first,
                    bool fua)
{
	int r = dpx_zero_range(v->fd, v->is_blk, off, len, punch_first);

	if (r < 0)
		return r;
	return fua ? dpx_fdatasync(v->fd) : 0;
}

/* fdatasync every volume; the first failure stops (the others keep their
 * error state for the next flush). */
static int sync_volumes(struct core *c, char *err, size_t errlen)
{
	for (uint32_t i = 0; i < c->nvols; i++) {
		int r = dpx_fdatasync(c->vols[i].fd);
		if (r < 0) {
			dpx_seterr(err, errlen, "device %s: fdatasync failed: %s", c->vols[i].path,
			           strerror(-r));
			return r;
		}
	}
	return 0;
}

/* ---- lifecycle ------------------------------------------------------------ */

static void core_free(struct core *c)
{
	if (c->pend != NULL) {
		for (uint64_t i = 0; i < c->npend_chunks; i++)
			free(atomic_load(&c->pend[i]));
		free((void *)c->pend);
	}
	ring_destroy(c->ring);
	flow_destroy(c->flow);
	collide_destroy(c->collide);
	for (uint32_t i = 0; c->vols != NULL && i < c->nvols; i++) {
		if (c->vols[i].fd >= 0)
			close(c->vols[i].fd);
		free(c->vols[i].path);
	}
	free(c->vols);
	if (c->hist_fd >= 0)
		close(c->hist_fd);
	pthread_rwlock_destroy(&c->fence);
	for (uint32_t i = 0; i < NSTRIPES; i++)
		pthread_mutex_destroy(&c->track_lock[i]);
	for (uint32_t i = 0; i < NPEND_LOCKS; i++)
		pthread_mutex_destroy(&c->pend_lock[i]);
	pthread_mutex_destroy(&c->seq_lock);
	pthread_mutex_destroy(&c->consumer_lock);
	free(c);
}

/* Open volume v's device and check that it holds v->size bytes. */
static int open_volume(struct core_vol *v, char *err, size_t errlen)
{
	struct stat st;
	uint64_t dev_size;
	int r;

	v->fd = open(v->path, O_RDWR | O_CLOEXEC);
	if (v->fd < 0) {
		r = -errno;
		dpx_seterr(err, errlen, "device %s: cannot open: %s", v->path, strerror(-r));
		return r;
	}
	if (fstat(v->fd, &st) != 0) {
		r = -errno;
		dpx_seterr(err, errlen, "device %s: cannot stat: %s", v->path, strerror(-r));
		return r;
	}
	if (S_ISBLK(st.st_mode)) {
		v->is_blk = true;
		if (ioctl(v->fd, BLKGETSIZE64, &dev_size) != 0) {
			r = -errno;
			dpx_seterr(err, errlen, "device %s: cannot get its size: %s", v->path,
			           strerror(-r));
			return r;
		}
	} else if (S_ISREG(st.st_mode)) {
		dev_size = (uint64_t)st.st_size;
	} else {
		dpx_seterr(err, errlen, "device %s: neither a block device nor a regular file",
		           v->path);
		return -EINVAL;
	}
	if (dev_size < v->size) {
		dpx_seterr(err, errlen, "device %s: has %llu bytes, %llu requested", v->path,
		           (unsigned long long)dev_size, (unsigned long long)v->size);
		return -EINVAL;
	}
	return 0;
}

/* The volumes' sizes and bases against the layout (core.h). */
static int check_layout(const struct core_volume *vols, uint32_t n, uint32_t ts, char *err,
                        size_t errlen)
{
	uint64_t want = 0;

	if (n == 0) {
		dpx_seterr(err, errlen, "core: no volume given");
		return -EINVAL;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (vols[i].size == 0) {
			dpx_seterr(err, errlen, "device %s: size must be > 0", vols[i].path);
			return -EINVAL;
		}
		if (vols[i].base != want) {
			dpx_seterr(err, errlen,
			           "device %s: volume %u has logical base %llu, the layout puts it at %llu",
			           vols[i].path, i, (unsigned long long)vols[i].base,
			           (unsigned long long)want);
			return -EINVAL;
		}
		if (vols[i].size > UINT64_MAX - ts - vols[i].base) {
			dpx_seterr(err, errlen, "device %s: size %llu overflows the logical space",
			           vols[i].path, (unsigned long long)vols[i].size);
			return -EINVAL;
		}
		want = (vols[i].base + vols[i].size + ts - 1) / ts * ts;
	}
	return 0;
}

int core_open(struct core **out, const struct core_volume *vols, uint32_t n, struct bitmap *oos,
              struct actlog *al, size_t ring_size, uint64_t first_seq,
              const char *history_path, char *err, size_t errlen)
{
	struct core *c;
	uint32_t ts = bitmap_track_size(oos);
	const char *name;
	uint64_t size;
	pthread_rwlockattr_t ra;
	int r;

	*out = NULL;
	if ((r = check_layout(vols, n, ts, err, errlen)) < 0)
		return r;
	name = vols[0].path; /* messages about the whole core name the first device */
	size = vols[n - 1].base + vols[n - 1].size;
	if (bitmap_nbits(oos) < (size + ts - 1) / ts) {
		dpx_seterr(err, errlen,
		           "device %s: OOS bitmap covers %llu bytes (%llu tracks of %u), %s size is %llu",
		           name, (unsigned long long)(bitmap_nbits(oos) * ts),
		           (unsigned long long)bitmap_nbits(oos), ts,
		           n > 1 ? "the volumes' logical" : "device", (unsigned long long)size);
		return -EINVAL;
	}
	if (actlog_extent_size(al) % ts != 0) {
		dpx_seterr(err, errlen,
		           "device %s: activity log extent size %llu is not a multiple of the track size %u",
		           name, (unsigned long long)actlog_extent_size(al), ts);
		return -EINVAL;
	}
	c = calloc(1, sizeof(*c));
	if (c == NULL) {
		dpx_seterr(err, errlen, "device %s: out of memory", name);
		return -ENOMEM;
	}
	c->hist_fd = -1;
	pthread_rwlockattr_init(&ra);
	/* A fence must not starve behind a steady stream of writes. */
	pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
	pthread_rwlock_init(&c->fence, &ra);
	pthread_rwlockattr_destroy(&ra);
	for (uint32_t i = 0; i < NSTRIPES; i++)
		pthread_mutex_init(&c->track_lock[i], NULL);
	for (uint32_t i = 0; i < NPEND_LOCKS; i++)
		pthread_mutex_init(&c->pend_lock[i], NULL);
	pthread_mutex_init(&c->seq_lock, NULL);
	pthread_mutex_init(&c->consumer_lock, NULL);
	c->size = size;
	c->oos = oos;
	c->al = al;
	c->track_shift = (unsigned)__builtin_ctz(ts);
	c->ntracks = (size + ts - 1) / ts;
	c->next_seq = first_seq;
	atomic_store(&c->clear_enabled, true);
	atomic_store(&c->dsync_ok, true);
	c->npend_chunks = (c->ntracks + PEND_CHUNK - 1) / PEND_CHUNK;
	c->pend = calloc(c->npend_chunks, sizeof(*c->pend));
	c->vols = calloc(n, sizeof(*c->vols));
	if (c->pend == NULL || c->vols == NULL) {
		r = -ENOMEM;
		dpx_seterr(err, errlen, "device %s: out of memory", name);
		goto fail;
	}
	c->nvols = n;
	for (uint32_t i = 0; i < n; i++)
		c->vols[i].fd = -1;
	if ((r = ring_create(&c->ring, ring_size, first_seq)) < 0) {
		dpx_seterr(err, errlen, "device %s: cannot create a send ring of %zu bytes: %s",
		           name, ring_size, r == -EINVAL ? "too small (minimum 4096)" : strerror(-r));
		goto fail;
	}
	if ((r = flow_create(&c->flow, ring_size)) < 0) {
		dpx_seterr(err, errlen, "device %s: out of memory", name);
		goto fail;
	}
	for (uint32_t i = 0; i < n; i++) {
		struct core_vol *v = &c->vols[i];
		struct stat si, sj;
		v->size = vols[i].size;
		v->base = vols[i].base;
		if ((v->path = strdup(vols[i].path)) == NULL) {
			r = -ENOMEM;
			dpx_seterr(err, errlen, "device %s: out of memory", vols[i].path);
			goto fail;
		}
		if ((r = open_volume(v, err, errlen)) < 0)
			goto fail;
		/* Two volumes on one device would overwrite each other. */
		for (uint32_t j = 0; j < i; j++) {
			if (fstat(v->fd, &si) == 0 && fstat(c->vols[j].fd, &sj) == 0 &&
			    (si.st_mode & S_IFMT) == (sj.st_mode & S_IFMT) &&
			    (S_ISBLK(si.st_mode) ? si.st_rdev == sj.st_rdev
			                         : si.st_dev == sj.st_dev && si.st_ino == sj.st_ino)) {
				r = -EINVAL;
				dpx_seterr(err, errlen, "device %s: volume %u is the same device as volume %u (%s)",
				           v->path, i, j, c->vols[j].path);
				goto fail;
			}
		}
	}
	if (history_path != NULL) {
		c->hist_fd = open(history_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
		if (c->hist_fd < 0) {
			r = -errno;
			dpx_seterr(err, errlen, "history %s: cannot create: %s", history_path, strerror(-r));
			goto fail;
		}
	}
	*out = c;
	return 0;
fail:
	core_free(c);
	return r;
}

int core_open_device(struct core **out, const char *device_path, uint64_t size,
                     struct bitmap *oos, struct actlog *al, size_t ring_size, uint64_t first_seq,
                     const char *history_path, char *err, size_t errlen)
{
	struct core_volume v = {device_path, size, 0};

	return core_open(out, &v, 1, oos, al, ring_size, first_seq, history_path, err, errlen);
}

uint32_t core_nvolumes(struct core *c) { return c->nvols; }

int core_close(struct core *c, bool clean, char *err, size_t errlen)
{
	int r = 0;

	if (clean) {
		r = sync_volumes(c, err, errlen);
		if (r == 0)
			r = actlog_quiesce(c->al, c->oos, err, errlen);
	}
	core_free(c);
	return r;
}

/* ---- the write path ------------------------------------------------------- */

static int write_all(int fd, const void *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf = (const char *)buf + n;
		len -= (size_t)n;
	}
	return 0;
}

static int write_history(struct core *c, const unsigned char *hdr, const void *data, size_t dlen)
{
	static const unsigned char pad[8];
	size_t padn = ((dlen + 7) & ~(size_t)7) - dlen;
	int r = write_all(c->hist_fd, hdr, RING_HEADER);

	if (r == 0 && dlen)
		r = write_all(c->hist_fd, data, dlen);
	if (r == 0 && padn)
		r = write_all(c->hist_fd, pad, padn);
	return r;
}

/* Copy data into the ring and, if crc is given, compute the record CRC
 * (header with crc 0, then data) on the way: in chunks that stay in cache,
 * one pass over memory instead of two (and no non-temporal stores, which
 * a single large memcpy would use). */
static void copy_and_crc(unsigned char *dst, const void *src, size_t len, uint32_t *crc,
                         const unsigned char *hdr)
{
	enum { CHUNK = 16384 };
	uint32_t c = crc ? crc32c(0, hdr, RING_HEADER) : 0;

	for (size_t o = 0; o < len; o += CHUNK) {
		size_t n = len - o < CHUNK ? len - o : CHUNK;
		memcpy(dst + o, (const unsigned char *)src + o, n);
		if (crc)
			c = crc32c(c, dst + o, n);
	}
	if (crc)
		*crc = c;
}

enum seq_outcome {
	SEQ_QUEUED,    /* the record is in the ring; its release takes the counts back */
	SEQ_NO_RECORD, /* ring full or dropped: the caller takes the counts back */
	SEQ_DISCARDED, /* dropped while being filled: the ring reset takes them back */
};

/* Reserve rsize bytes for the next seq and return with the sequencer held.
 * Under on-congestion block a record that would take the ring past the
 * fill waits for room without the sequencer (the releases that make room
 * never need it), up to the policy's timeout; then it pulls ahead. A
 * marker (may_block false) never waits and may use the whole ring: it is
 * tiny, and the group's clock must not stall behind writers. */
static int reserve_next(struct core *c, size_t rsize, bool may_block, struct ring_resv *rv)
{
	struct flow_policy fp;
	int64_t deadline = 0, t0 = 0;
	bool waited = false, timed_out = false, block;
	uint64_t limit;
	int rr;

	flow_get_policy(c->flow, &fp);
	block = may_block && fp.block;
	limit = may_block ? fp.fill : UINT64_MAX;
	for (;;) {
		pthread_mutex_lock(&c->seq_lock);
		rr = ring_reserve_within(c->ring, rsize, c->next_seq, limit, !block, rv);
		if (rr != -EAGAIN)
			break;
		pthread_mutex_unlock(&c->seq_lock);
		if (!waited) {
			waited = true;
			t0 = flow_now_ns();
			deadline = fp.block_timeout_ns < 0 ? -1 : t0 + fp.block_timeout_ns;
			flow_room_begin(c->flow);
		}
		if (!ring_wait_room(c->ring, rsize, limit, deadline)) {
			timed_out = true;
			block = false; /* waited long enough: pull ahead (counted, the shipper says so) */
			continue;
		}
		flow_get_policy(c->flow, &fp); /* the link may have gone meanwhile */
		block = block && fp.block;
		limit = fp.fill;
	}
	if (waited)
		flow_room_end(c->flow, (uint64_t)(flow_now_ns() - t0), timed_out);
	return rr;
}

/* Step 4: sequence the request and queue its record. */
static enum seq_outcome sequence(struct core *c, uint8_t op, uint8_t flags, uint64_t off, uint32_t length,
                     const void *data, uint32_t dlen, uint32_t volume, uint64_t ts,
                     bool may_block, uint64_t *seq_out)
{
	unsigned char hdr[RING_HEADER];
	struct ring_resv rv;
	size_t rsize = RING_HEADER + (((size_t)dlen + 7) & ~(size_t)7);
	bool have_crc = false;
	uint32_t crc = 0;
	int rr;

	rr = reserve_next(c, rsize, may_block, &rv); /* returns with seq_lock held */
	*seq_out = c->next_seq++;
	{
		uint64_t stamp = next_stamp(c);
		fill_header(hdr, *seq_out, ts ? ts : stamp, off, length, dlen, volume, op, flags);
	}
	if (rr == -ENOSPC) {
		/* This append overflowed: the ring is now dropped, and nothing
		 * in it will be acknowledged: nobody waits for the peer. */
		atomic_store(&c->clear_enabled, false);
		flow_release_all(c->flow);
	}
	if (c->hist_fd >= 0) {
		crc = record_crc(hdr, data, dlen);
		have_crc = true;
		wr32(hdr + REC_CRC, crc);
		if (write_history(c, hdr, data, dlen) < 0)
			atomic_fetch_add(&c->n_hist_err, 1);
	}
	pthread_mutex_unlock(&c->seq_lock);

	if (rr < 0) {
		atomic_fetch_add(&c->n_not_queued, 1);
		return SEQ_NO_RECORD;
	}
	/* Fill without the sequencer held: copies of big writes run in
	 * parallel; the ring publishes records in reservation order. */
	copy_and_crc(rv.ptr + RING_HEADER, data, dlen, have_crc ? NULL : &crc, hdr);
	memset(rv.ptr + RING_HEADER + dlen, 0, rsize - RING_HEADER - dlen);
	if (!have_crc)
		wr32(hdr + REC_CRC, crc);
	memcpy(rv.ptr, hdr, RING_HEADER);
	if (!ring_commit(c->ring, &rv)) {
		atomic_fetch_add(&c->n_not_queued, 1);
		return SEQ_DISCARDED;
	}
	return SEQ_QUEUED;
}

/* The collision rule (DESIGN §4): a track still frozen for the increment
 * being drained goes into the increment as it is now, before this write
 * changes it. Called with the tracks locked and the fence read-held. The
 * entry is keyed by the track's logical offset, read from its volume. */
static void collide_tracks(struct core *c, uint64_t t0, uint64_t t1)
{
	for (uint64_t t = t0; t <= t1; t++) {
		uint64_t lo, len;
		const struct core_vol *v;
		if (!bitmap_clear_bit(c->frozen, t))
			continue;
		v = track_extent(c, t, &lo, &len);
		if (v != NULL)
			(void)collide_push_read(c->collide, v->fd, lo - v->base, (uint32_t)len, lo);
	}
}

static int do_range_op(struct core *c, uint8_t op, const void *buf, uint64_t len, uint64_t off,
                       uint32_t flags, uint32_t volume, struct core_result *res)
{
	uint64_t t0, t1, lo;
	const struct core_vol *v;
	bool fua = (flags & CORE_FUA) != 0, al_held = false, large = false;
	enum seq_outcome outcome;
	uint64_t gen = 0;
	int r;

	res->queued = false;
	/* Checked before anything: a bad volume or range touches no device,
	 * no bitmap and no seq. */
	if (volume >= c->nvols)
		return -EINVAL;
	v = &c->vols[volume];
	if (len == 0 || len > UINT32_MAX || off > v->size || len > v->size - off)
		return -EINVAL;
	lo = v->base + off; /* tracks, locks and the activity log are logical */
	t0 = lo >> c->track_shift;
	t1 = (lo + len - 1) >> c->track_shift;

	pthread_rwlock_rdlock(&c->fence);
	lock_tracks(c, t0, t1);
	if ((r = pend_ensure(c, t0, t1)) < 0)
		goto out;
	r = actlog_begin(c->al, lo, len, c->oos);
	if (r == 0) {
		al_held = true;
	} else if (r == -E2BIG) {
		large = true; /* too many extents for the log: see below */
	} else {
		goto out;
	}
	if (c->frozen != NULL)
		collide_tracks(c, t0, t1);
	pend_add(c, t0, t1);
	if (large) {
		/* The marks themselves must be durable before the device changes. */
		atomic_fetch_add(&c->n_large, 1);
		if ((r = bitmap_sync(c->oos, NULL, 0)) < 0)
			goto undo;
	}
	if (op == REC_OP_WRITE)
		r = dev_write(c, v, buf, len, off, fua);
	else
		r = dev_zero(v, off, len, op == REC_OP_TRIM, fua);
	if (r < 0)
		goto undo; /* the bits stay set: the device may have changed */

	gen = flow_gen(c->flow); /* a drop from here on lets the peer wait below go */
	outcome = sequence(c, op, fua ? REC_FLAG_FUA : 0, off, (uint32_t)len, buf,
	                   op == REC_OP_WRITE ? (uint32_t)len : 0, volume, 0, true, &res->seq);
	res->queued = outcome == SEQ_QUEUED;
	if (outcome == SEQ_NO_RECORD)
		pend_sub(c, t0, t1, false); /* nothing will ever release it */
	switch (op) {
	case REC_OP_WRITE:
		atomic_fetch_add(&c->n_writes, 1);
		atomic_fetch_add(&c->n_bytes, len);
		break;
	case REC_OP_TRIM:
		atomic_fetch_add(&c->n_trims, 1);
		break;
	default:
		atomic_fetch_add(&c->n_zeros, 1);
	}
	r = 0;
	goto out;
undo:
	pend_sub(c, t0, t1, false);
out:
	if (al_held)
		actlog_end(c->al, lo, len);
	unlock_tracks(c, t0, t1);
	pthread_rwlock_unlock(&c->fence);
	if (r == 0 && res->queued) {
		/* Protocol B/C and max-lag hold the reply, with no lock held:
		 * other writers (and the freeze) go on meanwhile. */
		flow_wait_durable(c->flow, res->seq, gen);
		flow_pace(c->flow, op == REC_OP_WRITE ? len : 0);
	}
	return r;
}

int core_write(struct core *c, const void *buf, uint64_t len, uint64_t off, uint32_t flags,
               uint32_t volume, struct core_result *res)
{
	return do_range_op(c, REC_OP_WRITE, buf, len, off, flags, volume, res);
}

int core_trim(struct core *c, uint64_t off, uint64_t len, uint32_t flags, uint32_t volume,
              struct core_result *res)
{
	return do_range_op(c, REC_OP_TRIM, NULL, len, off, flags, volume, res);
}

int core_zero(struct core *c, uint64_t off, uint64_t len, uint32_t flags, uint32_t volume,
              struct core_result *res)
{
	return do_range_op(c, REC_OP_ZERO, NULL, len, off, flags, volume, res);
}

int core_flush(struct core *c, struct core_result *res)
{
	int r;

	res->queued = false;
	pthread_rwlock_rdlock(&c->fence);
	/* Every volume: a flush orders writes across the whole resource. */
	r = sync_volumes(c, NULL, 0);
	if (r == 0)
		r = bitmap_sync(c->oos, NULL, 0);
	if (r == 0) {
		uint64_t gen = flow_gen(c->flow);
		res->queued = sequence(c, REC_OP_FLUSH, 0, 0, 0, NULL, 0, REC_FLUSH_VOLUME, 0,
		                       true, &res->seq) == SEQ_QUEUED;
		atomic_fetch_add(&c->n_flushes, 1);
		pthread_rwlock_unlock(&c->fence);
		if (res->queued)
			flow_wait_durable(c->flow, res->seq, gen); /* B/C: a flush is durable there too */
		return r;
	}
	pthread_rwlock_unlock(&c->fence);
	return r;
}

int core_mark(struct core *c, uint64_t t, uint64_t number, const void *note, uint32_t note_len,
              struct core_result *res)
{
	res->queued = false;
	if (note_len > REC_MARK_MAX)
		return -EINVAL;
	if (t != 0) {
		/* Wait (without the sequencer) until no write can still be
		 * stamped at or before t; the clock only moves on, so every
		 * stamp after this one is above t too. */
		for (;;) {
			uint64_t now;
			pthread_mutex_lock(&c->seq_lock);
			now = now_ns(c);
			if (c->last_ts > now)
				now = c->last_ts;
			pthread_mutex_unlock(&c->seq_lock);
			if (now > t)
				break;
			if (t - now > 10ull * 1000000000u)
				return -ETIMEDOUT; /* a clock 10 s behind: refuse, do not stall */
			struct timespec d = {(time_t)((t - now + 1) / 1000000000u),
			                     (long)((t - now + 1) % 1000000000u)};
			nanosleep(&d, NULL);
		}
	}
	pthread_rwlock_rdlock(&c->fence);
	res->queued = sequence(c, REC_OP_MARK, 0, number, note_len, note, note_len, 0, t,
	                       false, &res->seq) == SEQ_QUEUED;
	pthread_rwlock_unlock(&c->fence);
	return 0;
}

void core_set_clock_offset(struct core *c, int64_t offset_ns)
{
	atomic_store(&c->clock_offset, offset_ns);
}

uint64_t core_now(struct core *c)
{
	return now_ns(c);
}

int64_t core_pread(struct core *c, void *buf, uint64_t len, uint64_t off, bool locked)
{
	uint64_t t0 = 0, t1 = 0;
	const struct core_vol *v;
	ssize_t n;

	if (off > c->size || len > c->size - off)
		return -EINVAL;
	if (len == 0 || (v = vol_at(c, off)) == NULL)
		return 0; /* the alignment gap holds no bytes */
	if (len > v->base + v->size - off)
		len = v->base + v->size - off; /* cut at the volume's end */
	if (locked) {
		t0 = off >> c->track_shift;
		t1 = (off + len - 1) >> c->track_shift;
		lock_tracks(c, t0, t1);
	}
	n = dpx_pread_full(v->fd, buf, (size_t)len, (off_t)(off - v->base));
	if (locked)
		unlock_tracks(c, t0, t1);
	return n;
}

/* ---- accessors ---------------------------------------------------------- */

uint64_t core_next_seq(struct core *c)
{
	uint64_t s;

	pthread_mutex_lock(&c->seq_lock);
	s = c->next_seq;
	pthread_mutex_unlock(&c->seq_lock);
	return s;
}

void core_stats(struct core *c, struct core_stats *st)
{
	st->writes = atomic_load(&c->n_writes);
	st->trims = atomic_load(&c->n_trims);
	st->zeros = atomic_load(&c->n_zeros);
	st->flushes = atomic_load(&c->n_flushes);
	st->bytes_written = atomic_load(&c->n_bytes);
	st->not_queued = atomic_load(&c->n_not_queued);
	st->large_ranges = atomic_load(&c->n_large);
	st->history_errors = atomic_load(&c->n_hist_err);
}

uint32_t core_pending(struct core *c, uint64_t track)
{
	uint32_t *chunk, n;

	if (track >= c->ntracks)
		return 0;
	chunk = atomic_load_explicit(&c->pend[track / PEND_CHUNK], memory_order_acquire);
	if (chunk == NULL)
		return 0;
	pthread_mutex_lock(pend_lock(c, track));
	n = chunk[track % PEND_CHUNK];
	pthread_mutex_unlock(pend_lock(c, track));
	return n;
}

/* ---- consumer side ---------------------------------------------------------- */

bool core_wait(struct core *c, int64_t timeout_ns) { return ring_wait(c->ring, timeout_ns); }
bool core_wait_bytes(struct core *c, uint64_t want, int64_t timeout_ns)
{
	return ring_wait_bytes(c->ring, want, timeout_ns);
}
void core_kick(struct core *c) { ring_kick(c->ring); }
uint64_t core_kicks(struct core *c) { return ring_kicks(c->ring); }

size_t core_peek(struct core *c, size_t max, const unsigned char **ptr)
{
	return ring_peek(c->ring, max, ptr);
}

int core_advance(struct core *c, size_t n) { return ring_advance(c->ring, n); }

int64_t core_release(struct core *c, uint64_t seq)
{
	uint64_t n;

	pthread_mutex_lock(&c->consumer_lock);
	n = ring_release(c->ring, seq, on_release, c);
	pthread_mutex_unlock(&c->consumer_lock);
	return (int64_t)n;
}

int core_rewind(struct core *c, uint64_t seq)
{
	int r;

	pthread_mutex_lock(&c->consumer_lock);
	r = ring_rewind(c->ring, seq);
	pthread_mutex_unlock(&c->consumer_lock);
	return r;
}

void core_ring_stats(struct core *c, struct ring_stats *st) { ring_stats(c->ring, st); }

void core_drop(struct core *c)
{
	pthread_mutex_lock(&c->seq_lock);
	atomic_store(&c->clear_enabled, false);
	ring_drop(c->ring);
	flow_release_all(c->flow);
	pthread_mutex_unlock(&c->seq_lock);
}

bool core_dropped(struct core *c) { return ring_dropped(c->ring); }

int core_resume(struct core *c, uint64_t first_seq)
{
	int r = 0;

	pthread_mutex_lock(&c->consumer_lock);
	pthread_mutex_lock(&c->seq_lock);
	if (!ring_dropped(c->ring)) {
		r = -EALREADY;
	} else if (first_seq < c->next_seq) {
		r = -EINVAL;
	} else {
		/* Holding the sequencer: no new reservations; the reset waits for
		 * the ones being filled and takes back every dropped record's
		 * pending counts (their bits stay set). */
		ring_reset(c->ring, first_seq, on_discard, c);
		c->next_seq = first_seq;
	}
	pthread_mutex_unlock(&c->seq_lock);
	pthread_mutex_unlock(&c->consumer_lock);
	return r;
}

void core_set_clear_on_release(struct core *c, bool on) { atomic_store(&c->clear_enabled, on); }
bool core_clear_on_release(struct core *c) { return atomic_load(&c->clear_enabled); }

void core_set_flow(struct core *c, const struct flow_policy *p)
{
	struct flow_policy q = *p;
	struct ring_stats rs;

	ring_stats(c->ring, &rs);
	if (q.fill == 0 || q.fill > rs.capacity)
		q.fill = rs.capacity;
	flow_set_policy(c->flow, &q);
	ring_wake_room(c->ring); /* room waiters look at the new policy */
}
void core_get_flow(struct core *c, struct flow_policy *out) { flow_get_policy(c->flow, out); }
void core_set_durable(struct core *c, uint64_t seq) { flow_set_durable(c->flow, seq); }
void core_flow_stats(struct core *c, struct flow_stats *st) { flow_stats(c->flow, st); }

void core_fence(struct core *c) { pthread_rwlock_wrlock(&c->fence); }
void core_unfence(struct core *c) { pthread_rwlock_unlock(&c->fence); }

int core_set_cr(struct core *c, struct bitmap *cr)
{
	if (cr != NULL && (bitmap_nbits(cr) != bitmap_nbits(c->oos) ||
	                   bitmap_track_size(cr) != bitmap_track_size(c->oos)))
		return -EINVAL;
	atomic_store(&c->cr, cr);
	return 0;
}

/* ---- catch-up increments ------------------------------------------------ */

int core_freeze(struct core *c, struct bitmap *frozen, struct bitmap *cr, size_t collide_cap,
                bool stream, uint64_t *base)
{
	int r = 0;

	if (bitmap_nbits(frozen) != bitmap_nbits(c->oos) ||
	    bitmap_track_size(frozen) != bitmap_track_size(c->oos) ||
	    (cr != NULL && (bitmap_nbits(cr) != bitmap_nbits(c->oos) ||
	                    bitmap_track_size(cr) != bitmap_track_size(c->oos))))
		return -EINVAL;
	if (c->collide == NULL && (r = collide_create(&c->collide, collide_cap)) < 0)
		return r;
	pthread_rwlock_wrlock(&c->fence);
	/* No request is in flight: the OOS bitmap, the seq and the device
	 * agree, and this instant is the increment's point in time. */
	bitmap_clear_all(frozen);
	bitmap_merge(frozen, c->oos);
	if (cr != NULL)
		bitmap_clear_all(cr);
	collide_reset(c->collide, collide_cap);
	c->frozen = frozen;
	c->cr = cr;
	pthread_mutex_lock(&c->consumer_lock);
	pthread_mutex_lock(&c->seq_lock);
	*base = c->next_seq - 1;
	if (stream && ring_dropped(c->ring))
		ring_reset(c->ring, c->next_seq, on_discard, c);
	pthread_mutex_unlock(&c->seq_lock);
	pthread_mutex_unlock(&c->consumer_lock);
	pthread_rwlock_unlock(&c->fence);
	return 0;
}

int64_t core_drain_track(struct core *c, uint64_t t, void *buf, size_t cap)
{
	int64_t n = 0;
	uint64_t lo, len;
	const struct core_vol *v;

	if (t >= c->ntracks)
		return -EINVAL;
	v = track_extent(c, t, &lo, &len);
	if (len > cap)
		return -ENOBUFS;
	pthread_rwlock_rdlock(&c->fence);
	lock_tracks(c, t, t);
	/* Under the track's lock: either we take it from the frozen map here,
	 * or a write already took it into the collision queue. */
	if (c->frozen != NULL && bitmap_clear_bit(c->frozen, t) && v != NULL)
		n = dpx_pread_full(v->fd, buf, (size_t)len, (off_t)(lo - v->base));
	unlock_tracks(c, t, t);
	pthread_rwlock_unlock(&c->fence);
	return n;
}

int64_t core_collisions(struct core *c, void *out, size_t cap)
{
	return c->collide == NULL ? 0 : collide_take(c->collide, out, cap);
}

bool core_collision_overflowed(struct core *c)
{
	return c->collide != NULL && collide_overflowed(c->collide);
}

void core_thaw(struct core *c)
{
	pthread_rwlock_wrlock(&c->fence);
	c->frozen = NULL;
	pthread_rwlock_unlock(&c->fence);
}

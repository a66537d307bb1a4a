/*
 * stress_core.c: many threads on one core, for ThreadSanitizer and
 * AddressSanitizer builds (test_native_stress.py compiles and runs it).
 *
 * Producers write, trim, zero and flush random ranges; one consumer checks
 * that records come out whole (CRC) and in strict seq order, rewinds now
 * and then, releases, and resumes after drops; a chaos thread fences,
 * syncs, swaps the CR bitmap and drops the ring. At the end every pending
 * count must be back to zero, and the files must reopen clean.
 *
 * The core has two volumes: volume 0 ends 3000 bytes short of a track
 * boundary (an alignment gap), volume 1 starts at the next track. Requests
 * go to either; records must name a volume and stay within it.
 *
 * usage: stress_core DIR SECONDS
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "actlog.h"
#include "bitmap.h"
#include "core.h"
#include "crc32c.h"
#include "ring.h"

#define DEV_SIZE (8u << 20) /* the logical size */
#define TS 4096u
#define NTRACKS (DEV_SIZE / TS)
#define NVOLS 2
static const uint64_t vol_size[NVOLS] = {(4u << 20) - 3000, 4u << 20};
static const uint64_t vol_base[NVOLS] = {0, 4u << 20};
#define NPROD 4

static struct core *core;
static struct bitmap *oos, *cr;
static atomic_bool producers_done, consumer_done;
static atomic_int failures;
static double deadline;

#define CHECK(cond, ...)                                                          \
	do {                                                                          \
		if (!(cond)) {                                                            \
			fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);                  \
			fprintf(stderr, __VA_ARGS__);                                         \
			fputc('\n', stderr);                                                  \
			atomic_fetch_add(&failures, 1);                                       \
		}                                                                         \
	} while (0)

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static void *producer(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg;
	unsigned char *buf = malloc(16384);
	uint64_t last = 0;

	for (size_t i = 0; i < 16384; i++)
		buf[i] = (unsigned char)(i * 7 + seed);
	while (now() < deadline) {
		uint32_t vol = (uint32_t)rand_r(&seed) % NVOLS;
		uint64_t len = 1 + (uint64_t)rand_r(&seed) % 16384;
		uint64_t off = (uint64_t)rand_r(&seed) % (vol_size[vol] - len + 1);
		int roll = rand_r(&seed) % 100, rc;
		struct core_result res;
		if (roll < 5)
			rc = core_trim(core, off, len, 0, vol, &res);
		else if (roll < 10)
			rc = core_zero(core, off, len, 0, vol, &res);
		else if (roll < 12)
			rc = core_flush(core, &res);
		else
			rc = core_write(core, buf, len, off, roll == 99 ? CORE_FUA : 0, vol, &res);
		CHECK(rc == 0, "request failed: %d", rc);
		CHECK(res.seq > last || last == 0, "seq went back in one thread: %llu after %llu",
		      (unsigned long long)res.seq, (unsigned long long)last);
		last = res.seq;
	}
	free(buf);
	return NULL;
}

/* Check the records of a span; returns the last seq (or expect - 1). */
static uint64_t check_span(const unsigned char *p, size_t n, uint64_t *expect)
{
	size_t q = 0;
	uint64_t last = 0;

	while (q < n) {
		const unsigned char *h = p + q;
		unsigned char hdr[48];
		uint32_t dlen = rd32(h + REC_DATA_LEN), crc;
		uint64_t seq = rd64(h + REC_SEQ);
		memcpy(hdr, h, 48);
		memset(hdr + REC_CRC, 0, 4);
		crc = crc32c(crc32c(0, hdr, 48), h + 48, dlen);
		CHECK(crc == rd32(h + REC_CRC), "record %llu: CRC mismatch", (unsigned long long)seq);
		if (h[REC_OP] == REC_OP_FLUSH) {
			CHECK(rd32(h + REC_VOLUME) == 0, "record %llu: flush of volume %u",
			      (unsigned long long)seq, rd32(h + REC_VOLUME));
		} else {
			uint32_t v = rd32(h + REC_VOLUME);
			CHECK(v < NVOLS && rd64(h + REC_OFFSET) + rd32(h + REC_LENGTH) <= vol_size[v],
			      "record %llu: range %llu+%u outside volume %u", (unsigned long long)seq,
			      (unsigned long long)rd64(h + REC_OFFSET), rd32(h + REC_LENGTH), v);
		}
		if (*expect)
			CHECK(seq == *expect, "record %llu where %llu was due", (unsigned long long)seq,
			      (unsigned long long)*expect);
		*expect = seq + 1;
		last = seq;
		q += 48 + ((dlen + 7u) & ~7u);
	}
	CHECK(q == n, "span of %zu bytes ends inside a record", n);
	return last;
}

static void *consumer(void *arg)
{
	uint64_t expect = 0, released = 0;
	unsigned seed = 99;

	(void)arg;
	for (;;) {
		const unsigned char *p;
		size_t n;
		if (core_dropped(core)) {
			uint64_t first = core_next_seq(core) + (uint64_t)(rand_r(&seed) % 3);
			int rc = core_resume(core, first);
			CHECK(rc == 0 || rc == -EINVAL, "resume: %d", rc);
			if (rc == 0) {
				expect = first;
				if (rand_r(&seed) % 2)
					core_set_clear_on_release(core, true);
			}
			continue;
		}
		if (!core_wait(core, 1000000)) {
			struct ring_stats st;
			core_ring_stats(core, &st);
			if (atomic_load(&producers_done) && st.bytes_unsent == 0 && !st.dropped)
				break;
			continue;
		}
		n = core_peek(core, 65536, &p);
		if (n == 0)
			continue;
		uint64_t last = check_span(p, n, &expect);
		int rc = core_advance(core, n);
		CHECK(rc == 0 || rc == -EPIPE, "advance: %d", rc);
		if (rand_r(&seed) % 8 == 0 && released) {
			/* A reconnect: send again from just after what was released. */
			if (core_rewind(core, released) == 0)
				expect = released + 1;
			continue;
		}
		if (rand_r(&seed) % 2 && core_release(core, last) > 0)
			released = last;
	}
	atomic_store(&consumer_done, true);
	return NULL;
}

static void *chaos(void *arg)
{
	unsigned seed = 7;

	(void)arg;
	while (!atomic_load(&producers_done)) {
		int roll = rand_r(&seed) % 100;
		usleep(200 + (unsigned)(rand_r(&seed) % 2000));
		if (roll < 20) {
			core_fence(core);
			usleep(100);
			core_unfence(core);
		} else if (roll < 40) {
			CHECK(bitmap_sync(oos, NULL, 0) == 0, "bitmap sync failed");
		} else if (roll < 55) {
			CHECK(core_set_cr(core, rand_r(&seed) % 2 ? cr : NULL) == 0, "set_cr failed");
		} else if (roll < 60) {
			core_drop(core);
		} else {
			struct ring_stats st;
			core_ring_stats(core, &st);
			(void)bitmap_count(oos);
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char path[4096], path1[4096], err[512];
	struct core_volume vols[NVOLS];
	struct actlog *al;
	const uint8_t uuid[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
	pthread_t prod[NPROD], cons, ch;
	uint64_t last;
	int fd;

	if (argc != 3) {
		fprintf(stderr, "usage: %s DIR SECONDS\n", argv[0]);
		return 2;
	}
	for (int v = 0; v < NVOLS; v++) {
		snprintf(path, sizeof(path), "%s/dev%d", argv[1], v);
		fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
		if (fd < 0 || ftruncate(fd, (off_t)vol_size[v]) != 0)
			return perror("device"), 2;
		close(fd);
	}
	snprintf(path, sizeof(path), "%s/oos", argv[1]);
	if (bitmap_create(&oos, path, uuid, TS, NTRACKS, err, sizeof(err)) < 0)
		return fprintf(stderr, "%s\n", err), 2;
	if (bitmap_create(&cr, NULL, uuid, TS, NTRACKS, err, sizeof(err)) < 0)
		return fprintf(stderr, "%s\n", err), 2;
	snprintf(path, sizeof(path), "%s/al", argv[1]);
	if (actlog_create(&al, path, uuid, 64 << 10, 8, err, sizeof(err)) < 0)
		return fprintf(stderr, "%s\n", err), 2;
	snprintf(path, sizeof(path), "%s/dev0", argv[1]);
	snprintf(path1, sizeof(path1), "%s/dev1", argv[1]);
	vols[0] = (struct core_volume){path, vol_size[0], vol_base[0]};
	vols[1] = (struct core_volume){path1, vol_size[1], vol_base[1]};
	/* A small ring: it wraps all the time and overflows now and then. */
	if (core_open(&core, vols, NVOLS, oos, al, 256 << 10, 1, NULL, err, sizeof(err)) < 0)
		return fprintf(stderr, "%s\n", err), 2;

	deadline = now() + atof(argv[2]);
	pthread_create(&cons, NULL, consumer, NULL);
	pthread_create(&ch, NULL, chaos, NULL);
	for (int i = 0; i < NPROD; i++)
		pthread_create(&prod[i], NULL, producer, (void *)(uintptr_t)(i + 1));
	for (int i = 0; i < NPROD; i++)
		pthread_join(prod[i], NULL);
	atomic_store(&producers_done, true);
	pthread_join(ch, NULL);
	pthread_join(cons, NULL);

	/* Everything left is released (or taken back by a final resume). */
	if (core_dropped(core))
		core_resume(core, core_next_seq(core));
	last = core_next_seq(core) - 1;
	core_release(core, last);
	for (uint64_t t = 0; t < NTRACKS; t++)
		CHECK(core_pending(core, t) == 0, "track %llu: %u requests still pending",
		      (unsigned long long)t, core_pending(core, t));
	{
		struct core_stats st;
		struct ring_stats rs;
		core_stats(core, &st);
		core_ring_stats(core, &rs);
		fprintf(stderr, "%llu writes, %llu trims, %llu zeros, %llu flushes, %llu not queued, "
		        "%llu drops, last seq %llu\n",
		        (unsigned long long)st.writes, (unsigned long long)st.trims,
		        (unsigned long long)st.zeros, (unsigned long long)st.flushes,
		        (unsigned long long)st.not_queued, (unsigned long long)rs.drops,
		        (unsigned long long)last);
		CHECK(rs.records_held == 0, "%llu records still held", (unsigned long long)rs.records_held);
	}
	CHECK(core_close(core, true, err, sizeof(err)) == 0, "core close: %s", err);
	CHECK(bitmap_close(oos, err, sizeof(err)) == 0, "bitmap close: %s", err);
	bitmap_close(cr, NULL, 0);
	actlog_close(al);

	snprintf(path, sizeof(path), "%s/oos", argv[1]);
	CHECK(bitmap_open(&oos, path, uuid, TS, err, sizeof(err)) == 0, "reopen: %s", err);
	if (oos) {
		CHECK(!bitmap_was_dirty(oos), "closed cleanly, yet reopened dirty");
		bitmap_close(oos, NULL, 0);
	}
	snprintf(path, sizeof(path), "%s/al", argv[1]);
	CHECK(actlog_open(&al, path, uuid, err, sizeof(err)) == 0, "reopen: %s", err);
	if (al) {
		uint64_t ext[8];
		CHECK(actlog_recovered(al, ext, 8) == 0, "quiesced log still has extents");
		actlog_close(al);
	}
	return atomic_load(&failures) ? 1 : 0;
}

/* collide.c: the collision queue of a catch-up increment (see collide.h). */
#include "collide.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

struct collide {
	pthread_mutex_t lock;
	unsigned char *buf;
	size_t cap, used;
	bool overflow;
};

static size_t entry_size(uint32_t len) { return COLLIDE_ENTRY_HEADER + (((size_t)len + 7) & ~(size_t)7); }

int collide_create(struct collide **out, size_t cap)
{
	struct collide *q = calloc(1, sizeof(*q));

	*out = NULL;
	if (q == NULL)
		return -ENOMEM;
	pthread_mutex_init(&q->lock, NULL);
	q->cap = cap;
	*out = q;
	return 0;
}

void collide_destroy(struct collide *q)
{
	if (q == NULL)
		return;
	pthread_mutex_destroy(&q->lock);
	free(q->buf);
	free(q);
}

int collide_reset(struct collide *q, size_t cap)
{
	pthread_mutex_lock(&q->lock);
	q->used = 0;
	q->overflow = false;
	if (cap != q->cap) {
		free(q->buf);
		q->buf = NULL;
		q->cap = cap;
	}
	pthread_mutex_unlock(&q->lock);
	return 0;
}

int collide_push_read(struct collide *q, int fd, uint64_t dev_off, uint32_t len,
                      uint64_t entry_off)
{
	size_t need = entry_size(len);
	ssize_t n;
	int r = 0;

	pthread_mutex_lock(&q->lock);
	if (q->overflow || need > q->cap - q->used) {
		q->overflow = true;
		r = -ENOSPC;
		goto out;
	}
	if (q->buf == NULL && (q->buf = malloc(q->cap)) == NULL) {
		q->overflow = true;
		r = -ENOMEM;
		goto out;
	}
	/* Collisions are rare (a write hitting a not yet drained track): read
	 * under the queue's lock, the simplest way to keep entries whole. */
	n = dpx_pread_full(fd, q->buf + q->used + COLLIDE_ENTRY_HEADER, len, (off_t)dev_off);
	if (n < 0) {
		r = (int)n;
		q->overflow = true; /* the increment lacks this track: it must restart */
		goto out;
	}
	memcpy(q->buf + q->used, &entry_off, 8);
	memcpy(q->buf + q->used + 8, &len, 4);
	memset(q->buf + q->used + 12, 0, 4);
	memset(q->buf + q->used + COLLIDE_ENTRY_HEADER + len, 0, need - COLLIDE_ENTRY_HEADER - len);
	q->used += need;
out:
	pthread_mutex_unlock(&q->lock);
	return r;
}

int64_t collide_take(struct collide *q, void *out, size_t cap)
{
	size_t n = 0;
	uint32_t len;

	pthread_mutex_lock(&q->lock);
	while (n < q->used) {
		memcpy(&len, q->buf + n + 8, 4);
		if (n + entry_size(len) > cap)
			break;
		n += entry_size(len);
	}
	if (n == 0 && q->used > 0) {
		pthread_mutex_unlock(&q->lock);
		return -ENOBUFS;
	}
	memcpy(out, q->buf, n);
	memmove(q->buf, q->buf + n, q->used - n);
	q->used -= n;
	pthread_mutex_unlock(&q->lock);
	return (int64_t)n;
}

bool collide_overflowed(struct collide *q)
{
	bool o;

	pthread_mutex_lock(&q->lock);
	o = q->overflow;
	pthread_mutex_unlock(&q->lock);
	return o;
}

size_t collide_bytes(struct collide *q)
{
	size_t u;

	pthread_mutex_lock(&q->lock);
	u = q->used;
	pthread_mutex_unlock(&q->lock);
	return u;
}

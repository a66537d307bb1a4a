/*
 * util.h: small helpers shared by the native modules (I/O loops, error
 * messages, UUID formatting). Header-only, everything static inline.
 */
#ifndef DUPLEX_UTIL_H
#define DUPLEX_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* On-disk formats are little-endian; we write structs directly. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "Duplex native formats assume a little-endian host");

#define DPX_PAGE 4096u

static inline uint64_t dpx_round_up(uint64_t v, uint64_t to)
{
	return (v + to - 1) / to * to;
}

/* Format a message into err (if given). */
static inline void dpx_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline void dpx_seterr(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* pread until len bytes or EOF; returns bytes read or -errno. */
static inline ssize_t dpx_pread_full(int fd, void *buf, size_t len, off_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			break;
		done += (size_t)n;
	}
	return (ssize_t)done;
}

/* Drop the first w bytes, just written, from iov[0..*n). */
static inline void dpx_iov_consume(struct iovec **iov, int *n, size_t w)
{
	while (*n > 0 && w >= (*iov)->iov_len) {
		w -= (*iov)->iov_len;
		(*iov)++;
		(*n)--;
	}
	if (*n > 0) {
		(*iov)->iov_base = (char *)(*iov)->iov_base + w;
		(*iov)->iov_len -= w;
	}
}

/* pwritev all of iov[0..n) at off (loops on short writes; iov is
 * consumed). 0 or -errno. */
static inline int dpx_pwritev_full(int fd, struct iovec *iov, int n, off_t off)
{
	dpx_iov_consume(&iov, &n, 0); /* empty buffers: nothing to write */
	while (n > 0) {
		ssize_t w = pwritev(fd, iov, n, off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (w == 0)
			return -EIO;
		off += w;
		dpx_iov_consume(&iov, &n, (size_t)w);
	}
	return 0;
}

/* pwrite all of buf (loops on short writes); returns 0 or -errno. */
static inline int dpx_pwrite_full(int fd, const void *buf, size_t len, off_t off)
{
	struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};

	return dpx_pwritev_full(fd, &iov, 1, off);
}

static inline int dpx_fdatasync(int fd)
{
	while (fdatasync(fd) != 0) {
		if (errno != EINTR)
			return -errno;
	}
	return 0;
}

/* Make [off, off+len) of fd read as zeros by the cheapest means that
 * works: BLKZEROOUT on a block device (BLKDISCARD would not promise
 * zeros); on a file a punched hole or a zeroed range (punch_first picks
 * the order), the size kept; else written zeros. 0 or -errno. */
static inline int dpx_zero_range(int fd, int is_blk, uint64_t off, uint64_t len, int punch_first)
{
	static const unsigned char zeros[65536];

	if (is_blk) {
		uint64_t range[2] = {off, len};
		if (off % 512 == 0 && len % 512 == 0 && ioctl(fd, BLKZEROOUT, range) == 0)
			return 0;
	} else {
		int first = punch_first ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE;
		int second = punch_first ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE;
		if (fallocate(fd, first | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
			return 0;
		if (fallocate(fd, second | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0)
			return 0;
	}
	for (uint64_t done = 0; done < len;) {
		uint64_t n = len - done < sizeof(zeros) ? len - done : sizeof(zeros);
		int r = dpx_pwrite_full(fd, zeros, (size_t)n, (off_t)(off + done));
		if (r < 0)
			return r;
		done += n;
	}
	return 0;
}

/* "01234567-89ab-cdef-0123-456789abcdef" (37 bytes with the NUL). */
static inline void dpx_uuid_str(const uint8_t u[16], char out[37])
{
	snprintf(out, 37,
	         "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
	         u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9],
	         u[10], u[11], u[12], u[13], u[14], u[15]);
}

/* fsync the directory holding path, so a rename or create is durable. */
static inline int dpx_fsync_parent(const char *path)
{
	char dir[4096];
	const char *slash = strrchr(path, '/');
	int fd, r = 0;

	if (slash == NULL) {
		strcpy(dir, ".");
	} else if (slash == path) {
		strcpy(dir, "/");
	} else {
		size_t n = (size_t)(slash - path);
		if (n >= sizeof(dir))
			return -ENAMETOOLONG;
		memcpy(dir, path, n);
		dir[n] = '\0';
	}
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fsync(fd) != 0)
		r = -errno;
	close(fd);
	return r;
}

/* An exclusive flock: one user of a metadata file at a time. 0 or -errno. */
static inline int dpx_lock(int fd, const char *what, const char *path, char *err, size_t errlen)
{
	if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
		int e = errno;
		if (e == EWOULDBLOCK)
			dpx_seterr(err, errlen, "%s %s: in use (locked by another open)", what, path);
		else
			dpx_seterr(err, errlen, "%s %s: cannot lock: %s", what, path, strerror(e));
		return -e;
	}
	return 0;
}

/* Open a metadata file (bitmap, activity log) for update: O_RDWR, an
 * exclusive flock (one user at a time), fstat, and read up to hdrlen bytes
 * of its header into hdr (zero-filled first; *nread: bytes read). Returns
 * the fd, or -errno with a message naming *what* and *path*. */
static inline int dpx_open_locked(const char *what, const char *path, struct stat *st,
                                  void *hdr, size_t hdrlen, ssize_t *nread,
                                  char *err, size_t errlen)
{
	int fd = open(path, O_RDWR | O_CLOEXEC), r;

	if (fd < 0) {
		r = -errno;
		dpx_seterr(err, errlen, "%s %s: cannot open: %s", what, path, strerror(-r));
		return r;
	}
	if ((r = dpx_lock(fd, what, path, err, errlen)) < 0) {
		close(fd);
		return r;
	}
	if (fstat(fd, st) != 0) {
		r = -errno;
		dpx_seterr(err, errlen, "%s %s: cannot stat: %s", what, path, strerror(-r));
		close(fd);
		return r;
	}
	memset(hdr, 0, hdrlen);
	*nread = dpx_pread_full(fd, hdr, hdrlen, 0);
	if (*nread < 0) {
		r = (int)*nread;
		dpx_seterr(err, errlen, "%s %s: cannot read header: %s", what, path, strerror(-r));
		close(fd);
		return r;
	}
	return fd;
}

#endif /* DUPLEX_UTIL_H */

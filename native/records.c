/* records.c: check packed records in one call (see records.h). */
#include "records.h"

#include <stdbool.h>
#include <string.h>

#include "crc32c.h"
#include "ring.h"

static uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }

bool records_header_ok(const unsigned char *h)
{
	uint32_t length = rd32(h + REC_LENGTH), dlen = rd32(h + REC_DATA_LEN);
	uint8_t op = h[REC_OP];

	if (op < REC_OP_WRITE || op > REC_OP_MARK || rd16(h + 38) != 0 || rd32(h + 44) != 0)
		return false;
	if (op == REC_OP_MARK)
		return rd32(h + REC_VOLUME) == 0 && dlen == length && dlen <= REC_MARK_MAX;
	return op == REC_OP_WRITE ? dlen == length : dlen == 0;
}

static uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

int64_t records_check(const unsigned char *buf, size_t len, uint64_t *bad_off, int *fault,
                      uint64_t *max_seq)
{
	static const unsigned char zero4[4];
	size_t pos = 0;
	int64_t n = 0;

	*max_seq = 0;
	while (pos < len) {
		const unsigned char *h = buf + pos;
		uint32_t dlen, crc;
		size_t size;

		*bad_off = pos;
		if (len - pos < RING_HEADER) {
			*fault = RECORDS_TRUNCATED;
			return -1;
		}
		if (!records_header_ok(h)) {
			*fault = RECORDS_BAD_SHAPE;
			return -1;
		}
		dlen = rd32(h + REC_DATA_LEN);
		size = RING_HEADER + (((size_t)dlen + 7) & ~(size_t)7);
		if (size > len - pos) {
			*fault = RECORDS_TRUNCATED;
			return -1;
		}
		/* CRC32C of the header with its crc field zeroed, then the data. */
		crc = crc32c(0, h, REC_CRC);
		crc = crc32c(crc, zero4, 4);
		crc = crc32c(crc, h + REC_CRC + 4, RING_HEADER - REC_CRC - 4);
		crc = crc32c(crc, h + RING_HEADER, dlen);
		if (crc != rd32(h + REC_CRC)) {
			*fault = RECORDS_BAD_CRC;
			return -1;
		}
		/* The padding is the only part no CRC covers: it must be zero. */
		for (size_t i = RING_HEADER + dlen; i < size; i++) {
			if (h[i] != 0) {
				*fault = RECORDS_BAD_PADDING;
				return -1;
			}
		}
		if (rd64(h + REC_SEQ) > *max_seq)
			*max_seq = rd64(h + REC_SEQ);
		pos += size;
		n++;
	}
	*fault = RECORDS_OK;
	return n;
}

int64_t records_check_tokens(const unsigned char *buf, size_t len, uint64_t *bad_off, int *fault,
                             uint64_t *max_seq)
{
	*max_seq = 0;
	*bad_off = len - len % RING_HEADER;
	if (len % RING_HEADER != 0) {
		*fault = RECORDS_TRUNCATED;
		return -1;
	}
	for (size_t pos = 0; pos < len; pos += RING_HEADER) {
		if (!records_header_ok(buf + pos)) {
			*bad_off = pos;
			*fault = RECORDS_BAD_SHAPE;
			return -1;
		}
		if (rd64(buf + pos + REC_SEQ) > *max_seq)
			*max_seq = rd64(buf + pos + REC_SEQ);
	}
	*fault = RECORDS_OK;
	return (int64_t)(len / RING_HEADER);
}

int64_t records_find_op(const unsigned char *buf, size_t len, uint8_t op, uint64_t *offsets,
                        size_t max)
{
	size_t pos = 0, n = 0;

	while (pos + RING_HEADER <= len) {
		uint64_t size = RING_HEADER + (((uint64_t)rd32(buf + pos + REC_DATA_LEN) + 7) & ~7ull);
		if (buf[pos + REC_OP] == op) {
			if (n < max)
				offsets[n] = pos;
			n++;
		}
		if (size > len - pos)
			break;
		pos += size;
	}
	return (int64_t)n;
}

int64_t records_check_volumes(const unsigned char *buf, size_t len, bool tokens_only,
                              const uint64_t *sizes, uint32_t nvol, int *fault)
{
	size_t pos = 0;

	*fault = RECORDS_VOL_OK;
	while (pos + RING_HEADER <= len) {
		const unsigned char *h = buf + pos;
		uint32_t vol = rd32(h + REC_VOLUME);
		uint8_t op = h[REC_OP];
		uint64_t size;
		if (vol >= nvol) {
			*fault = RECORDS_VOL_UNKNOWN;
			return (int64_t)pos;
		}
		/* Checked in 64 bits: offset + length cannot wrap past a size. */
		if (op != REC_OP_FLUSH && op != REC_OP_MARK &&
		    (rd64(h + REC_OFFSET) > sizes[vol] ||
		     (uint64_t)rd32(h + REC_LENGTH) > sizes[vol] - rd64(h + REC_OFFSET))) {
			*fault = RECORDS_VOL_PAST_END;
			return (int64_t)pos;
		}
		size = tokens_only ? RING_HEADER
		                   : RING_HEADER + (((uint64_t)rd32(h + REC_DATA_LEN) + 7) & ~7ull);
		if (size > len - pos)
			break;
		pos += size;
	}
	return -1;
}

/*
 * crc32c.c: CRC32C, hardware (SSE4.2) and table paths.
 *
 * The hardware path follows Mark Adler's well-known scheme: the crc32
 * instruction has a latency of 3 cycles but a throughput of 1 per cycle, so
 * long buffers are cut into three adjacent blocks whose CRCs run in
 * parallel, then combined by "shifting" a CRC over a block of zeros with a
 * precomputed GF(2) operator table.
 */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define DPX_HAVE_X86 1
#endif

#define POLY 0x82f63b78u /* reflected 0x1EDC6F41 */

/* ---- table path: slicing-by-8 ------------------------------------------ */

static uint32_t sw_table[8][256];
static pthread_once_t sw_once = PTHREAD_ONCE_INIT;

static void sw_init(void)
{
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
		sw_table[0][n] = c;
	}
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = sw_table[0][n];
		for (int k = 1; k < 8; k++) {
			c = sw_table[0][c & 0xff] ^ (c >> 8);
			sw_table[k][n] = c;
		}
	}
}

uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
	const unsigned char *p = buf;
	uint64_t c;

	pthread_once(&sw_once, sw_init);
	c = crc ^ 0xffffffffu;
	while (len && ((uintptr_t)p & 7)) {
		c = sw_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
		len--;
	}
	while (len >= 8) {
		uint64_t w;
		memcpy(&w, p, 8);
		c ^= w; /* little-endian: byte 0 is the lowest */
		c = sw_table[7][c & 0xff] ^ sw_table[6][(c >> 8) & 0xff] ^
		    sw_table[5][(c >> 16) & 0xff] ^ sw_table[4][(c >> 24) & 0xff] ^
		    sw_table[3][(c >> 32) & 0xff] ^ sw_table[2][(c >> 40) & 0xff] ^
		    sw_table[1][(c >> 48) & 0xff] ^ sw_table[0][c >> 56];
		p += 8;
		len -= 8;
	}
	while (len--)
		c = sw_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
	return (uint32_t)c ^ 0xffffffffu;
}

/* ---- hardware path ------------------------------------------------------ */

#ifdef DPX_HAVE_X86

#define LONG_BLOCK 8192
#define SHORT_BLOCK 256

static uint32_t crc_long[4][256];
static uint32_t crc_short[4][256];
static pthread_once_t hw_once = PTHREAD_ONCE_INIT;

static uint32_t gf2_matrix_times(const uint32_t *mat, uint32_t vec)
{
	uint32_t sum = 0;

	while (vec) {
		if (vec & 1)
			sum ^= *mat;
		vec >>= 1;
		mat++;
	}
	return sum;
}

static void gf2_matrix_square(uint32_t *square, const uint32_t *mat)
{
	for (int n = 0; n < 32; n++)
		square[n] = gf2_matrix_times(mat, mat[n]);
}

/* Operator that applies len zero bytes to a CRC register (len: power of 2). */
static void zeros_op(uint32_t *even, size_t len)
{
	uint32_t odd[32];
	uint32_t row = 1;

	odd[0] = POLY; /* one zero bit */
	for (int n = 1; n < 32; n++) {
		odd[n] = row;
		row <<= 1;
	}
	gf2_matrix_square(even, odd); /* two zero bits */
	gf2_matrix_square(odd, even); /* four zero bits */
	do {
		gf2_matrix_square(even, odd);
		len >>= 1;
		if (len == 0)
			return;
		gf2_matrix_square(odd, even);
		len >>= 1;
	} while (len);
	memcpy(even, odd, sizeof(odd));
}

static void zeros_table(uint32_t zeros[4][256], size_t len)
{
	uint32_t op[32];

	zeros_op(op, len);
	for (uint32_t n = 0; n < 256; n++) {
		zeros[0][n] = gf2_matrix_times(op, n);
		zeros[1][n] = gf2_matrix_times(op, n << 8);
		zeros[2][n] = gf2_matrix_times(op, n << 16);
		zeros[3][n] = gf2_matrix_times(op, n << 24);
	}
}

static void hw_init(void)
{
	zeros_table(crc_long, LONG_BLOCK);
	zeros_table(crc_short, SHORT_BLOCK);
}

static inline uint32_t shift(uint32_t zeros[4][256], uint32_t crc)
{
	return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^
	       zeros[2][(crc >> 16) & 0xff] ^ zeros[3][crc >> 24];
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_sse42(uint32_t crc, const void *buf, size_t len)
{
	const unsigned char *next = buf;
	const unsigned char *end;
	uint64_t crc0, crc1, crc2;

	crc0 = crc ^ 0xffffffffu;
	while (len && ((uintptr_t)next & 7)) {
		crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
		len--;
	}
	/* Three parallel streams over LONG_BLOCK-sized thirds. */
	while (len >= LONG_BLOCK * 3) {
		crc1 = 0;
		crc2 = 0;
		end = next + LONG_BLOCK;
		do {
			uint64_t a, b, c;
			memcpy(&a, next, 8);
			memcpy(&b, next + LONG_BLOCK, 8);
			memcpy(&c, next + 2 * LONG_BLOCK, 8);
			crc0 = _mm_crc32_u64(crc0, a);
			crc1 = _mm_crc32_u64(crc1, b);
			crc2 = _mm_crc32_u64(crc2, c);
			next += 8;
		} while (next < end);
		crc0 = shift(crc_long, (uint32_t)crc0) ^ crc1;
		crc0 = shift(crc_long, (uint32_t)crc0) ^ crc2;
		next += LONG_BLOCK * 2;
		len -= LONG_BLOCK * 3;
	}
	while (len >= SHORT_BLOCK * 3) {
		crc1 = 0;
		crc2 = 0;
		end = next + SHORT_BLOCK;
		do {
			uint64_t a, b, c;
			memcpy(&a, next, 8);
			memcpy(&b, next + SHORT_BLOCK, 8);
			memcpy(&c, next + 2 * SHORT_BLOCK, 8);
			crc0 = _mm_crc32_u64(crc0, a);
			crc1 = _mm_crc32_u64(crc1, b);
			crc2 = _mm_crc32_u64(crc2, c);
			next += 8;
		} while (next < end);
		crc0 = shift(crc_short, (uint32_t)crc0) ^ crc1;
		crc0 = shift(crc_short, (uint32_t)crc0) ^ crc2;
		next += SHORT_BLOCK * 2;
		len -= SHORT_BLOCK * 3;
	}
	while (len >= 8) {
		uint64_t a;
		memcpy(&a, next, 8);
		crc0 = _mm_crc32_u64(crc0, a);
		next += 8;
		len -= 8;
	}
	while (len) {
		crc0 = _mm_crc32_u8((uint32_t)crc0, *next++);
		len--;
	}
	return (uint32_t)crc0 ^ 0xffffffffu;
}

bool crc32c_hw_available(void)
{
	return __builtin_cpu_supports("sse4.2");
}

uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
	if (!crc32c_hw_available())
		return crc32c_sw(crc, buf, len);
	pthread_once(&hw_once, hw_init);
	return crc32c_sse42(crc, buf, len);
}

#else /* no x86 */

bool crc32c_hw_available(void)
{
	return false;
}

uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
	return crc32c_sw(crc, buf, len);
}

#endif

uint32_t crc32c(uint32_t crc, const void *buf, size_t len)
{
	return crc32c_hw(crc, buf, len);
}

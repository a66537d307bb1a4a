/*
 * crc32c.h: CRC32C (Castagnoli, iSCSI polynomial 0x1EDC6F41, reflected).
 *
 * Standard semantics: crc32c(0, "123456789", 9) == 0xE3069283, and
 * crc32c(crc32c(0, a, n), b, m) == crc32c(0, a || b, n + m).
 * crc32c() picks the SSE4.2 instruction when the CPU has it, else a
 * slicing-by-8 table. Both paths are exported so tests can pin each one.
 * All functions are thread-safe.
 */
#ifndef DUPLEX_CRC32C_H
#define DUPLEX_CRC32C_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Continue crc (0 to start) over len bytes at buf; fastest available path. */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);

/* Portable table path (slicing-by-8). */
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);

/* SSE4.2 path (three interleaved streams); falls back to crc32c_sw when the
 * CPU lacks SSE4.2, so it is always safe to call. */
uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len);

/* True when crc32c_hw really uses the CPU instruction. */
bool crc32c_hw_available(void);

#endif /* DUPLEX_CRC32C_H */

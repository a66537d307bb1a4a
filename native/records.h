/*
 * records.h: checking a buffer of packed records (replicator/records.py
 * layout: 48-byte header, data padded to 8) in one call: structure and
 * CRC32C of every record. The receiver checks a whole DATA frame this way
 * instead of one call per record.
 *
 * Volumes (replicator/layout.py): a WRITE, TRIM or ZERO record carries the
 * index of its volume (config order) and an offset relative to that
 * volume. A FLUSH record covers every volume of the resource (the core
 * fdatasyncs them all before sequencing it) and its volume field is
 * REC_FLUSH_VOLUME, 0, whatever the number of volumes.
 */
#ifndef DUPLEX_RECORDS_H
#define DUPLEX_RECORDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The volume field of every FLUSH record: it covers all volumes. */
#define REC_FLUSH_VOLUME 0

/* Why a record is refused (the Python layer words the message). */
enum records_fault {
	RECORDS_OK = 0,
	RECORDS_TRUNCATED = 1, /* header or data runs past the buffer */
	RECORDS_BAD_SHAPE = 2, /* unknown op, data_len/length mismatch, reserved bits */
	RECORDS_BAD_CRC = 3,
	RECORDS_BAD_PADDING = 4, /* data padding not zero */
};

/* Shape of one 48-byte header: known op, data_len matching the op,
 * reserved fields zero (no CRC: a token has no data). */
bool records_header_ok(const unsigned char *h);

/* The number of records in buf, or -1 with *bad_off the offset of the
 * first bad record and *fault why. *max_seq: the highest seq. */
int64_t records_check(const unsigned char *buf, size_t len, uint64_t *bad_off, int *fault,
                      uint64_t *max_seq);

/* The same for a TOKENS payload: headers only, shape checked. */
int64_t records_check_tokens(const unsigned char *buf, size_t len, uint64_t *bad_off, int *fault,
                             uint64_t *max_seq);

/* The byte offsets of the records of op in a buffer of packed records
 * that records_check passed: at most max stored; returns how many there
 * are. (The secondary finds a group's MARK records in a DATA frame.) */
int64_t records_find_op(const unsigned char *buf, size_t len, uint8_t op, uint64_t *offsets,
                        size_t max);

/* Why a record is refused by records_check_volumes. */
enum records_volume_fault {
	RECORDS_VOL_OK = 0,
	RECORDS_VOL_UNKNOWN = 1,  /* names no volume of the resource */
	RECORDS_VOL_PAST_END = 2, /* a range past the end of its volume */
};

/* Every record (tokens_only: every 48-byte header) of a buffer the frame
 * decoder passed names one of nvol volumes and lies inside it (sizes[i]
 * bytes; FLUSH and MARK carry no range). -1 when all do, else the byte
 * offset of the first that does not, with *fault why. The receiver checks
 * a frame of a multi-volume resource in one call. */
int64_t records_check_volumes(const unsigned char *buf, size_t len, bool tokens_only,
                              const uint64_t *sizes, uint32_t nvol, int *fault);

#endif

/* logq native codec: the C twin of logq/_codec_py.py.
 *
 * This header is fed verbatim to cffi's cdef() by native/build_native.py, so
 * it holds only what cffi can parse: #defines of integer constants and
 * function prototypes (no #include, no include guard, no expressions).
 * Include <stdint.h> and <stddef.h> before it.
 *
 * The LOGQ_* constants mirror logq/_format.py (tests/test_codec.py checks
 * that they agree); LOGQ_E_* are this codec's negative return codes.
 */

#define LOGQ_FORMAT_VERSION 2
#define LOGQ_SEGMENT_HEADER_SIZE 32
#define LOGQ_SEGMENT_HEADER_CRC_AT 28
#define LOGQ_RECORD_HEADER_SIZE 28
#define LOGQ_RECORD_CRC_START 4
#define LOGQ_RECORD_MARK 0x80
#define LOGQ_FLAG_DELIVER_AT 0x01
#define LOGQ_FLAG_KEY 0x02
#define LOGQ_FLAG_CONT 0x04
#define LOGQ_FLAG_BATCH 0x08
#define LOGQ_FLAGS_KNOWN 0x8F
#define LOGQ_DELIVER_AT_SIZE 8
#define LOGQ_BATCH_COUNT_SIZE 4
#define LOGQ_MAX_BATCH 0xFFFFFFFF
#define LOGQ_MAX_PAYLOAD 0x40000000
#define LOGQ_MAX_META 0xFFFF
#define LOGQ_MAX_KEY 0xFFF7
#define LOGQ_CRC_MASK_DELTA 0xA282EAD8

#define LOGQ_SCAN_OK 0
#define LOGQ_SCAN_END 1
#define LOGQ_SCAN_TRUNCATED 2
#define LOGQ_SCAN_BAD_HEADER 3
#define LOGQ_SCAN_BAD_CRC 4
#define LOGQ_SCAN_BAD_OFFSET 5
#define LOGQ_SCAN_FIELDS 5

#define LOGQ_CONTROL_SIZE 4096
#define LOGQ_CTL_TAIL_BASE 8
#define LOGQ_CTL_TAIL_POS 16
#define LOGQ_CTL_TAIL_NEXT 24
#define LOGQ_CTL_WANT 32
#define LOGQ_CTL_HOLDER 40
#define LOGQ_CTL_GENERATION 48
#define LOGQ_CTL_WAITERS 56
#define LOGQ_CTL_BOOT_ID 64
#define LOGQ_CTL_SYNCED_BASE 80
#define LOGQ_CTL_SYNCED_NEXT 88
#define LOGQ_CTL_SYNCING 96
#define LOGQ_CTL_SYNCING_NEXT 104
#define LOGQ_CTL_WRITTEN 112
#define LOGQ_CTL_WRITTEN_WAITERS 120

#define LOGQ_SPARSE_STRIDE 64

/* Negative results of the encoders (positions are never negative). */
#define LOGQ_E_NOFIT -1   /* the record(s) do not fit before end; nothing written */
#define LOGQ_E_WANT -2    /* put: the control block's WANT word is set; nothing written */
#define LOGQ_E_ARG -3     /* a field value does not fit its header field; nothing written */

/* CRC32C (Castagnoli) continuing from crc (0 to start); crcmod's "crc-32c"
 * convention: crc32c(crc32c(0, a), b) == crc32c(0, a + b). */
uint32_t logq_crc32c(uint32_t crc, const uint8_t *data, size_t len);
/* The same, always through the portable slicing-by-8 tables. */
uint32_t logq_crc32c_sw(uint32_t crc, const uint8_t *data, size_t len);
/* 1 if logq_crc32c uses a CPU instruction (SSE4.2 or ARMv8 CRC32), else 0. */
int logq_crc32c_hw(void);

/* One record at buf[pos]; the new position or LOGQ_E_NOFIT / LOGQ_E_ARG. */
int64_t logq_encode(uint8_t *buf, uint64_t pos, uint64_t end, uint64_t offset,
                    uint64_t ts, const uint8_t *payload, uint64_t len,
                    uint32_t priority, uint32_t flags,
                    const uint8_t *meta, uint64_t meta_len);

/* n records whose payloads are consecutive slices of joined (joined_len
 * bytes; lengths[i] each), offsets first_offset, first_offset + 1, ...; all
 * or nothing.  Records 1..n-1 carry LOGQ_FLAG_CONT and record 0 is written
 * last; when n >= 2, record 0 carries LOGQ_FLAG_BATCH and n as a u32 meta
 * (LOGQ_BATCH_COUNT_SIZE more bytes; n > LOGQ_MAX_BATCH is LOGQ_E_ARG).  As in _codec_py.encode_batch, the fit check counts joined_len and a
 * payload running past joined_len is cut short there. */
int64_t logq_encode_batch(uint8_t *buf, uint64_t pos, uint64_t end,
                          uint64_t first_offset, uint64_t ts,
                          const uint8_t *joined, uint64_t joined_len,
                          const uint32_t *lengths, uint64_t n,
                          uint32_t priority);

/* The writer of one process: the active segment's mapping, the control
 * block, and the fields LOGQ_W_POS (where the next record goes), LOGQ_W_END
 * (0 while this process may not append) and LOGQ_W_NEXT (its offset).  The
 * caller changes them only under logq_writer_lock. */
typedef struct logq_writer logq_writer;
#define LOGQ_W_POS 0
#define LOGQ_W_END 1
#define LOGQ_W_NEXT 2
logq_writer *logq_writer_new(void);
void logq_writer_free(logq_writer *w);
void logq_writer_lock(logq_writer *w);
void logq_writer_unlock(logq_writer *w);
void logq_writer_attach(logq_writer *w, uint8_t *seg, uint8_t *ctl);
uint64_t logq_writer_get(logq_writer *w, int field);
void logq_writer_set(logq_writer *w, int field, uint64_t value);

/* The put hot path, under the writer's mutex: one record with the current
 * time (CLOCK_REALTIME ns), priority 0, no meta, at LOGQ_W_POS with offset
 * LOGQ_W_NEXT; returns that offset, or LOGQ_E_WANT (the control block's
 * WANT word is set) or LOGQ_E_NOFIT, writing nothing.  After writing, the
 * new position and next offset are published in the control block. */
int64_t logq_put(logq_writer *w, const uint8_t *payload, uint64_t len);

/* Fault in the pages of buf[start, start + len) for writing (Linux
 * MADV_POPULATE_WRITE), so appends into them do not stop to fault: 0, or -1
 * where the kernel cannot. */
int logq_prefault(uint8_t *buf, uint64_t start, uint64_t len);

/* Wait (once, at most timeout_ns) for the control block's next offset to
 * pass offset: 1 if it has, 0 if not yet (a timeout, a wake-up for another
 * record, or a signal: call again).  Without the GIL; no busy waiting (a
 * futex on Linux).  logq_wake wakes the waiters after a writer published a
 * new tail; logq_put does it itself. */
int logq_wait(uint8_t *ctl, uint64_t offset, int64_t timeout_ns);
void logq_wake(uint8_t *ctl);

/* The same for the group commit: wait (once, at most timeout_ns) for the
 * control block's SYNCED_NEXT to pass offset (1 if it has); logq_wake_synced
 * wakes every such waiter after a syncer published a new SYNCED_NEXT. */
int logq_wait_synced(uint8_t *ctl, uint64_t offset, int64_t timeout_ns);
void logq_wake_synced(uint8_t *ctl);

/* What settlements wrote, across processes: WRITTEN is a counter bumped
 * (logq_bump_written) after every commit whose transaction ran write hooks
 * (the tasks layer's outcomes).  logq_written reads it; logq_wait_written
 * waits (once, at most timeout_ns) for it to differ from seen: 1 if it does,
 * 0 if not yet.  Without the GIL; a futex on Linux, woken only while
 * WRITTEN_WAITERS says someone sleeps. */
uint64_t logq_written(uint8_t *ctl);
int logq_wait_written(uint8_t *ctl, uint64_t seen, int64_t timeout_ns);
void logq_bump_written(uint8_t *ctl);

/* Validate records in [start, end) carrying expected_offset, +1, ...; at most
 * max_records.  Returns the count; result[0] = stop position, result[1] =
 * status (LOGQ_SCAN_*); fields (or NULL) gets LOGQ_SCAN_FIELDS values per
 * record: position, payload position, payload length, timestamp,
 * meta_len | priority << 16 | flags << 24. */
int64_t logq_scan(const uint8_t *buf, uint64_t start, uint64_t end,
                  uint64_t expected_offset, uint64_t max_records,
                  uint64_t *fields, uint64_t *result);

/* The position of the record carrying offset target, walking from start,
 * where the record carrying at_offset lies: the records skipped are only
 * checked for a sane header carrying the offset expected (no CRC); the one
 * returned is validated whole (as logq_scan does) and carries target.
 * Otherwise -status (LOGQ_SCAN_*): the caller falls back to a full scan. */
int64_t logq_seek(const uint8_t *buf, uint64_t start, uint64_t end,
                  uint64_t at_offset, uint64_t target);

/* The smallest position p >= start where an intact record with
 * min_offset <= offset <= max_offset lies wholly before end; -1 if none.
 * Records flagged LOGQ_FLAG_CONT (inside a batch) qualify only if batch_ok
 * (the caller knows every batch below max_offset was written whole). */
int64_t logq_find_next(const uint8_t *buf, uint64_t start, uint64_t end,
                       uint64_t min_offset, uint64_t max_offset, int batch_ok);

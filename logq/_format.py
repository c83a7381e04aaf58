"""The logq on-disk format, version 2.  This docstring is the specification.

Every other module takes its sizes and offsets from the constants below;
``native/logq_native.h`` mirrors them and ``tests/test_codec.py`` checks that
the two agree.  All integers are little-endian.

Queue directory
===============
::

    queue/
      logq.meta                  identity file: magic, format version, queue id
      00000000000000000000.log   segment files, named {base_offset:020d}.log
      00000000000000012345.log
      index/                     LMDB environment (derived state + group state),
                                 fsynced on every commit
      leases/                    LMDB environment of consumer leases and cursors,
                                 never fsynced: it survives the death of
                                 processes, and is deleted after a reboot
      owners/                    one flock(2)ed file per process consuming:
                                 its leases die with it
      control                    shared-memory coordination between live
                                 processes (never trusted after a reboot)
      append.lock, open.lock     flock(2) files; sync.lock: held by the process
                                 whose fdatasync is in progress (group commit)
      quarantine/                damaged bytes and broken index files, kept aside,
                                 and ``manifest``: one JSON line per range of
                                 offsets given up (see ``_quarantine``)
      status/                    live processes' state for other processes to
                                 read (``_status``); not durable

``logq.meta`` is a small text file, written once at creation and fsynced
together with its directory::

    logq-queue
    version 1
    id 3f2c...          (32 hex digits: the stable queue identity)

Its ``version`` is the version of the directory layout (META_VERSION, still
1); each segment names its own record format version in its header.  An
unknown ``version`` in ``logq.meta`` or in a segment header is refused with
:class:`logq.FormatVersionError`, naming the version found.

Versions
--------
* **2** (this logq writes it): the head of a ``put_many`` batch of two or
  more records carries the batch's record count (BATCH, below), so that
  recovery can tell a whole batch from the part of one that a power cut left.
* **1**: the same records without BATCH.  Still read: a segment keeps the
  version it was created with, its batches have no count, and recovery
  judges them as before (a batch whose head is intact is taken whole).
  Nothing is ever appended to a version 1 segment: a writer that finds one
  active rolls to a new version 2 segment before its first record (or, if
  it holds no record yet, rewrites its header as version 2).  The codecs
  read both versions alike (a version 1 writer never set BATCH).

Segment file
============
A segment starts with a 32-byte header, followed by records packed back to
back (no padding).  A segment file is created one growth step long
(``preallocate_bytes``) and grown by the writer in such steps ahead of the
records, up to ``segment_bytes`` (or more, for a first record that would
not fit); every byte is allocated (``posix_fallocate``) before anything is
written there.  A file never shrinks while the queue is open; the unused
tail is zero.

=====  ====  ==================================================================
off    size  field
=====  ====  ==================================================================
0      8     magic ``b"LOGQSEG\\x00"``
8      2     format version (2; 1 is still read)
10     2     header size (32)
12     4     reserved, zero
16     8     base offset: the offset of the first record in this segment
24     4     reserved, zero
28     4     masked CRC32C of bytes 0..27
=====  ====  ==================================================================

Record
======
=====  ====  ==================================================================
off    size  field
=====  ====  ==================================================================
0      4     crc: masked CRC32C of every byte after this field, up to the end
             of the payload (bytes 4..27 of the header, the meta, the payload)
4      4     length: payload length in bytes, at most MAX_PAYLOAD
8      8     offset: the record's logical offset
16     8     timestamp: nanoseconds since the UNIX epoch, writer's clock
24     2     meta_len: bytes of metadata between header and payload
26     1     priority: 0..255 (0 is the default)
27     1     flags: bit 7 (RECORD_MARK) is always set; bit 0 HAS_DELIVER_AT;
             bit 1 HAS_KEY; bit 2 CONT; bit 3 BATCH (version 2); the
             other bits must be zero
28     ...   meta (meta_len bytes), then the payload (length bytes)
=====  ====  ==================================================================

The meta block holds, in this order: the delivery time (u64 nanoseconds since
the epoch) when HAS_DELIVER_AT is set, then the batch count (u32, the number
of records in the batch, this head included: at least 2) when BATCH is set,
then the idempotency key (the rest of the meta, at least one byte) when
HAS_KEY is set.  So ``meta_len`` is exactly ``8 * HAS_DELIVER_AT + 4 * BATCH
+ len(key)``, and zero when no flag is set.  The codecs check only these
lengths; what a count means is the log's business (below).

The CRC is CRC32C (Castagnoli, reflected, init and final xor 0xFFFFFFFF;
``crc32c(b"123456789") == 0xE3069283``), masked as in LevelDB so that a CRC
stored inside data does not reproduce itself::

    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

CONT marks a record that continues the batch (one ``put_many``) begun by the
record before it.  A writer writes a batch's CONT records first and its first
record (the head) last, so a reader of the page cache, which stops at the
first record that does not validate, sees a batch whole or not at all.  A
batch lies within one segment.

A power cut is another matter: the disk may keep the page holding the head
and lose a later page holding the rest of the batch.  So in version 2 the
head of a batch of ``n >= 2`` records carries BATCH and the count ``n``, and
its ``n - 1`` CONT records follow it at offsets ``head + 1 ..``.  The rule
that decides what survives (``_log.scan_tail``):

* **Above the durable checkpoint** (records the index does not vouch for
  as fsynced): a head whose count of CONT records does not follow intact is
  a **torn batch**; none of it is taken.  At the tail of the newest segment
  it is cut with the torn tail; elsewhere it is given up (kept in
  quarantine), like damage.  Resynchronisation after damage lands only on a
  record that is not CONT, so the rest of a torn batch is never taken for
  data.
* **Below the durable checkpoint** every batch was written whole: damage
  there destroys only the records it touches, and resynchronisation may land
  on a CONT record (``find_next(..., batch_ok=True)``).
* A version 1 head (no BATCH) is taken with the CONT records that follow it
  intact, as version 1 always did.

Offsets are dense: the records of segment ``B`` carry offsets ``B, B+1, …``
and the next segment's base is the offset after this segment's last record.
Offsets stay below 2**63 (the writer returns them as signed 64-bit values).

Why it reads safely after a crash
---------------------------------
* A header of 28 zero bytes means "no record here": the end of the data in a
  preallocated segment.  It can never validate, because RECORD_MARK is unset.
* A torn record (the writer died mid-copy, or a power cut kept only some of
  its pages) fails its CRC or runs past the end of the file.
* Garbage fails RECORD_MARK, the flag/meta rules, the length bound, the CRC,
  or the offset check: a record is only accepted when its offset field equals
  the offset the reader expects next, so a stale but intact record left from
  an earlier write at that position is not taken for a new one.
* Every length is checked against the bytes left and MAX_PAYLOAD before any
  slice is taken.

Scanning a region stops at the first record that does not validate and says
why (the ``SCAN_*`` status codes).  What the stop means is decided by the
caller: at the tail of the active segment it is the end of the log (a torn
tail is truncated); inside a sealed segment it is damage, and the reader
resynchronises by searching for the next intact record whose offset is
higher (:func:`logq._codec.find_next`).

Worked examples
===============
Record at offset 5, timestamp 1_700_000_000_000_000_000 ns, priority 0, no
meta, payload ``b"hi"``: 30 bytes ::

    86 53 5d 07   02 00 00 00   05 00 00 00 00 00 00 00
    00 00 2a 36 fe 9c 97 17   00 00   00   80   68 69

``86 53 5d 07`` is the masked CRC32C of the 26 bytes that follow it
(``tests/test_codec.py`` checks this example).

``put_many([b"a", b"b"])`` at offset 7, same timestamp: the head (flags
``0x88``: RECORD_MARK | BATCH, ``meta_len`` 4, meta ``02 00 00 00``: two
records) then one CONT record (flags ``0x84``); 62 bytes, the CONT record
written first::

    91 f6 ba 09   01 00 00 00   07 00 00 00 00 00 00 00
    00 00 2a 36 fe 9c 97 17   04 00   00   88   02 00 00 00   61
    3c d1 dc 7f   01 00 00 00   08 00 00 00 00 00 00 00
    00 00 2a 36 fe 9c 97 17   00 00   00   84   62
"""

from __future__ import annotations

import struct
from typing import Any

FORMAT_VERSION = 2            # the segment format this logq writes
READABLE_VERSIONS = (1, 2)    # segment formats it reads
META_VERSION = 1              # the directory layout named in logq.meta

# --- directory -----------------------------------------------------------
META_FILE = "logq.meta"
META_MAGIC = "logq-queue"
INDEX_DIR = "index"
LEASES_DIR = "leases"
OWNERS_DIR = "owners"
CONTROL_FILE = "control"
APPEND_LOCK_FILE = "append.lock"
OPEN_LOCK_FILE = "open.lock"
SYNC_LOCK_FILE = "sync.lock"
QUARANTINE_DIR = "quarantine"
QUARANTINE_MANIFEST = "manifest"
STATUS_DIR = "status"
SEGMENT_SUFFIX = ".log"


def segment_name(base: int) -> str:
    """The file name of the segment whose first offset is ``base``."""
    return f"{base:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> int | None:
    """The base offset named by ``name``, or None if it is not a segment file."""
    if len(name) != 20 + len(SEGMENT_SUFFIX) or not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[:20]
    return int(stem) if stem.isdigit() else None


# --- segment header ------------------------------------------------------
SEGMENT_MAGIC = b"LOGQSEG\x00"
SEGMENT_HEADER_SIZE = 32
SEGMENT_HEADER = struct.Struct("<8sHHIQI")  # magic, version, hsize, 0, base, 0
SEGMENT_HEADER_CRC_AT = 28

# --- record header -------------------------------------------------------
RECORD_HEADER_SIZE = 28
RECORD_HEADER = struct.Struct("<IIQQHBB")  # crc, length, offset, ts, meta_len, prio, flags
RECORD_BODY = struct.Struct("<IQQHBB")     # the header after the crc field
RECORD_CRC_START = 4                       # the CRC covers bytes from here on
RECORD_MARK = 0x80
FLAG_DELIVER_AT = 0x01
FLAG_KEY = 0x02
FLAG_CONT = 0x04
FLAG_BATCH = 0x08            # version 2: the meta holds the batch's record count
FLAGS_KNOWN = RECORD_MARK | FLAG_DELIVER_AT | FLAG_KEY | FLAG_CONT | FLAG_BATCH
DELIVER_AT_SIZE = 8
BATCH_COUNT_SIZE = 4
BATCH_COUNT = struct.Struct("<I")
MAX_BATCH = 0xFFFFFFFF
MAX_PAYLOAD = 1 << 30        # hard limit of the format; max_message_bytes is lower
MAX_META = 0xFFFF
MAX_KEY = MAX_META - DELIVER_AT_SIZE

CRC_MASK_DELTA = 0xA282EAD8

# --- scan status codes (shared with native/logq_native.h) ----------------
SCAN_OK = 0          # stopped after max_records records, all valid
SCAN_END = 1         # reached the end of the region, or a header of zeros
SCAN_TRUNCATED = 2   # a record runs past the end of the region (torn)
SCAN_BAD_HEADER = 3  # mark, flags, meta or length rules broken
SCAN_BAD_CRC = 4
SCAN_BAD_OFFSET = 5  # intact record, but not the offset expected next

SCAN_REASONS = {
    SCAN_OK: "ok",
    SCAN_END: "end of data",
    SCAN_TRUNCATED: "record runs past the end of the data (torn)",
    SCAN_BAD_HEADER: "invalid record header",
    SCAN_BAD_CRC: "CRC mismatch",
    SCAN_BAD_OFFSET: "unexpected record offset",
}
# Not a codec status: the log's verdict on an intact batch head whose count
# of CONT records does not follow it intact (see "the rule" above).
TORN_BATCH = 6
SCAN_REASONS[TORN_BATCH] = "torn batch (its head's count of records does not follow intact)"

# Each record found by a scan is reported as SCAN_FIELDS integers:
# record position, payload position, payload length, timestamp, attrs,
# where attrs = meta_len | priority << 16 | flags << 24.
SCAN_FIELDS = 5

# --- control block: shared memory between live processes ---------------
# The ``control`` file is mapped by every process that has the queue open.
# It coordinates the append lock and publishes the tail; it is rebuilt from
# the log whenever a process opens the queue while no other has it open, so
# nothing in it needs to survive a power cut.  Its words are native-endian
# 8-byte integers, always loaded and stored whole.
CONTROL_SIZE = 4096
CONTROL_MAGIC = b"LOGQCTL\x01"
CTL_TAIL_BASE = 8    # u64: base offset of the active segment
CTL_TAIL_POS = 16    # u64: position after the last complete record in it
CTL_TAIL_NEXT = 24   # u64: the next offset to be written
# The holder publishes its tail in that order: NEXT, then POS, then BASE
# (each store after the records it covers are written).  A holder killed
# between two of those stores leaves NEXT past whole records that start at
# POS; the next holder reads them as the log's (``_log._first_at``).
CTL_WANT = 32        # u64: nonzero while another process waits for the append lock
CTL_HOLDER = 40      # u64: pid holding the append lock; 0 once released cleanly
CTL_GENERATION = 48  # u64: bumped each time the append lock changes hands
CTL_WAITERS = 56     # u32: consumers blocked waiting for new records
CTL_BOOT_ID = 64     # 16 bytes: the kernel boot id when the block was set up
# Group commit across processes.  One process at a time fdatasyncs for all:
# the one holding the flock of ``sync.lock`` (the kernel lets it go when the
# process dies, so a SIGKILLed syncer never blocks the others).  Under that
# lock it sets SYNCING_NEXT then SYNCING, reads the published TAIL_NEXT (n)
# and TAIL_BASE, fdatasyncs every segment from SYNCED_BASE to the active
# one, and only once every fdatasync returned stores SYNCED_BASE then
# SYNCED_NEXT = n, clears SYNCING and wakes the waiters (a futex on
# SYNCED_NEXT's low 32 bits).  So a process whose records lie below
# SYNCED_NEXT returns without an fdatasync of its own; one whose records lie
# below SYNCING_NEXT while SYNCING is set waits for SYNCED_NEXT to pass
# them, trying the lock between waits (it gets it only if the syncer died:
# then it syncs itself).  SYNCING is advisory, the lock is the truth: a
# killed syncer never advances SYNCED_NEXT, so no put returns early.
CTL_SYNCED_BASE = 80     # u64: base of the segment holding offset SYNCED_NEXT
CTL_SYNCED_NEXT = 88     # u64: every record appended since the block was set up
                         #      and below this offset is on stable storage
CTL_SYNCING = 96         # u64: pid of the process whose fdatasync is in progress, or 0
CTL_SYNCING_NEXT = 104   # u64: the offset that fdatasync will make SYNCED_NEXT
# What settlements wrote (the write hooks of acks and nacks: the tasks
# layer's outcomes): WRITTEN is bumped after every commit that ran hooks, so
# a process waiting for an outcome sleeps on it (a futex on its low 32 bits,
# woken only while WRITTEN_WAITERS is nonzero) and looks again when it moves.
CTL_WRITTEN = 112        # u64: a counter of commits that ran write hooks
CTL_WRITTEN_WAITERS = 120  # u32: processes blocked waiting for WRITTEN to move

# --- index ---------------------------------------------------------------
SPARSE_STRIDE = 64   # one sparse index entry per this many records


def mask_crc(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + CRC_MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - CRC_MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


def record_size(payload_len: int, meta_len: int = 0) -> int:
    return RECORD_HEADER_SIZE + meta_len + payload_len


def batch_size(count: int, payload_bytes: int) -> int:
    """Bytes that ``count`` records with ``payload_bytes`` of payload in all
    take as one batch (the head's count included)."""
    return RECORD_HEADER_SIZE * count + payload_bytes + (BATCH_COUNT_SIZE if count > 1 else 0)


def batch_count_at(buf: Any, pos: int, attrs: int) -> int:
    """The count of the validated BATCH head at ``pos`` whose SCAN_FIELDS
    attrs are ``attrs`` (the u32 after its delivery time, if any)."""
    at = pos + RECORD_HEADER_SIZE + (DELIVER_AT_SIZE if attrs >> 24 & FLAG_DELIVER_AT else 0)
    return BATCH_COUNT.unpack_from(buf, at)[0]


def encode_meta(deliver_at_ns: int | None, key: bytes | None) -> tuple[int, bytes]:
    """(flags, meta bytes) for the optional attributes of one record."""
    flags = RECORD_MARK
    meta = b""
    if deliver_at_ns is not None:
        flags |= FLAG_DELIVER_AT
        meta = struct.pack("<Q", deliver_at_ns)
    if key:
        flags |= FLAG_KEY
        meta += key
    return flags, meta


def decode_meta(flags: int, meta: bytes) -> tuple[int | None, bytes | None]:
    """(deliver_at_ns, key) from a validated record's flags and meta (a
    batch count between them is skipped)."""
    deliver_at = None
    if flags & FLAG_DELIVER_AT:
        (deliver_at,) = struct.unpack_from("<Q", meta, 0)
        meta = meta[DELIVER_AT_SIZE:]
    if flags & FLAG_BATCH:
        meta = meta[BATCH_COUNT_SIZE:]
    key = bytes(meta) if flags & FLAG_KEY else None
    return deliver_at, key


def meta_valid(flags: int, meta_len: int) -> bool:
    """Whether flags and meta_len obey the format's rules."""
    if not flags & RECORD_MARK or flags & ~FLAGS_KNOWN & 0xFF:
        return False
    need = DELIVER_AT_SIZE if flags & FLAG_DELIVER_AT else 0
    if flags & FLAG_BATCH:
        need += BATCH_COUNT_SIZE
    if flags & FLAG_KEY:
        return meta_len > need
    return meta_len == need

"""One segment file: created at its full length, mapped whole, read by
offset through a sparse index that is built lazily by scanning.

A segment file is created at ``segment_bytes`` (its span), but sparse:
the writer allocates its blocks in steps (``preallocate_bytes``) ahead of
itself, always with ``posix_fallocate`` before a byte is written there,
so disk use follows the contents and a write through the mapping never
lands in a hole (a full disk is DiskFullError at the allocation, not
SIGBUS at the write).  The span is set once so that nothing is remapped
as the contents grow, and because the kernel maps pages near the end of
a file one at a time, where it maps pages far from it in large folios
(a file grown in small steps costs five times the page faults).  A file
grows past its span only for a record bigger than ``segment_bytes``;
readers remap when they find it grown.  A file never shrinks while any
process may map it; only recovery, run while no other process has the
queue open, truncates.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from array import array
from typing import Any

from logq import _codec as C
from logq import _format as F
from logq._errors import FormatVersionError
from logq._fsutil import extend, fsync_dir, given_up, preallocate

log = logging.getLogger("logq")

_STRIDE = F.SPARSE_STRIDE
_OFFSET_AT = struct.Struct("<Q")
_LENGTH_META = struct.Struct("<4xI16xH")   # a record header's length and meta_len
_seek = C.seek_unchecked


def encode_header(base: int, version: int = F.FORMAT_VERSION) -> bytes:
    head = F.SEGMENT_HEADER.pack(F.SEGMENT_MAGIC, version, F.SEGMENT_HEADER_SIZE, 0, base, 0)
    return head[:F.SEGMENT_HEADER_CRC_AT] + struct.pack("<I", F.mask_crc(C.crc32c(head[:F.SEGMENT_HEADER_CRC_AT])))


def header_problem(head: bytes, base: int, path: str) -> str | None:
    """Why a segment header is unusable, or None.  An intact header of an
    unknown format version raises FormatVersionError."""
    if len(head) < F.SEGMENT_HEADER_SIZE:
        return "file shorter than the segment header"
    magic, version, hsize, _, hbase, _ = F.SEGMENT_HEADER.unpack_from(head, 0)
    (crc,) = struct.unpack_from("<I", head, F.SEGMENT_HEADER_CRC_AT)
    if magic != F.SEGMENT_MAGIC:
        return "bad segment magic"
    if crc != F.mask_crc(C.crc32c(head[:F.SEGMENT_HEADER_CRC_AT])):
        return "segment header CRC mismatch"
    if version not in F.READABLE_VERSIONS:
        raise FormatVersionError(
            f"{path} is in logq segment format version {version}; this logq reads versions "
            f"{', '.join(map(str, F.READABLE_VERSIONS))} only (upgrade logq to read it)")
    if hsize != F.SEGMENT_HEADER_SIZE:
        return f"unexpected header size {hsize}"
    if hbase != base:
        return f"header names base offset {hbase}, the file name {base}"
    return None


class Segment:
    """A mapped segment.  Not thread-safe: its Log serialises access."""

    def __init__(self, path: str, base: int, *, readonly: bool = False) -> None:
        """Map the segment at ``path``; ``readonly`` (for checking a queue
        without writing to it) maps it read-only."""
        self.path = path
        self.base = base
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self.size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, F.SEGMENT_HEADER_SIZE, 0)
            self.header_problem = header_problem(head, base, path)
            # The format its records were written in (a header that cannot
            # be read is rewritten by recovery in the current one).
            self.version = (F.FORMAT_VERSION if self.header_problem
                            else F.SEGMENT_HEADER.unpack_from(head, 0)[1])
            if self.header_problem:
                log.warning("segment %s: %s; reading its records by their own CRCs",
                            path, self.header_problem)
            access = mmap.ACCESS_READ if readonly else mmap.ACCESS_WRITE
            # None for an empty file (and after close()): nothing reads below size 0.
            self.mm: mmap.mmap = (mmap.mmap(self.fd, self.size, access=access)  # type: ignore[assignment]
                                  if self.size else None)
        except BaseException:
            os.close(self.fd)
            raise
        self.h = C.handle(self.mm) if self.mm is not None else None
        # Held while the mapping is replaced, and by whoever touches it
        # without the Log's lock (the housekeeper faulting pages in ahead
        # of the writer), so nothing uses a mapping being unmapped.
        self.remap_lock = threading.Lock()
        # The file's first ``allocated`` bytes have blocks (known to the
        # append lock's holder, which allocated them or found records there).
        self.allocated = 0
        # Sparse index: sparse[i] is the position of the first intact record
        # whose offset is >= base + i * SPARSE_STRIDE, for the records known
        # so far: [base, known_next), which end at known_pos.
        self.sparse = array("Q")
        self.known_pos = F.SEGMENT_HEADER_SIZE
        self.known_next = base
        self.lost: list[tuple[int, int]] = []   # [first, end) offsets lost to damage
        self.given_up: Any = ()   # ranges already recorded in quarantine/manifest (set by the Log)
        self.stored_next = base  # the Index holds the sparse index up to here
        # Where the last read_run stopped (offset, position): a consumer's
        # next read starts there, without a seek from the sparse index (two
        # scans over up to a stride of records).  A hint only: the scan from
        # it validates the record, and anything else falls back to a seek.
        self.run_next, self.run_pos = -1, 0

    # -- creation -----------------------------------------------------------
    @classmethod
    def create(cls, qdir: str, base: int, size: int, span: int = 0) -> "Segment":
        """Create the segment file ``span`` bytes long (where the file may
        be: see ``extend``) with its first ``size`` bytes allocated, and
        durably publish it (its header, its length and its directory entry
        are fsynced before it appears under its final name)."""
        path = os.path.join(qdir, F.segment_name(base))
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            extend(fd, max(size, span))
            preallocate(fd, size, path)
            os.pwrite(fd, encode_header(base), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)
        fsync_dir(qdir)
        seg = cls(path, base)
        seg.allocated = size
        return seg

    def allocate(self, size: int, span: int) -> None:
        """Allocate the file's first ``size`` bytes (holder only, before it
        writes there), and make it at least ``span`` long where it may be (a
        segment of an older logq was only as long as what it had
        allocated).  Raises DiskFullError (nothing written) when the disk
        has no room."""
        if self.size < span:
            extend(self.fd, span)
        preallocate(self.fd, size, self.path, self.allocated)
        self.allocated = max(self.allocated, size)
        self.grow()

    def grow(self) -> None:
        """Map all of a file that grew past the mapping (here: a record
        bigger than the span, or the span of an older logq's file).  The
        holder remaps in place (mremap keeps the pages mapped so far, so
        appends do not fault them in again; the ftruncate that mmap.resize
        does first finds the file at its new size already and changes
        nothing)."""
        size = os.fstat(self.fd).st_size
        if self.mm is None or size <= self.size:
            self.refresh_size()
            return
        with self.remap_lock:
            if self.h is not None:
                C.release(self.h)
                self.h = None
            try:
                self.mm.resize(size)
            except (OSError, ValueError, BufferError, SystemError, TypeError):
                self.h = C.handle(self.mm)
            else:
                self.h = C.handle(self.mm)
                self.size = size
                return
        self.refresh_size()

    def refresh_size(self) -> bool:
        """Remap if another process grew the file; whether it had grown."""
        size = os.fstat(self.fd).st_size
        if size <= self.size:
            return False
        with self.remap_lock:
            if self.h is not None:
                C.release(self.h)
            if self.mm is not None:
                self.mm.close()
            self.mm = mmap.mmap(self.fd, size)
            self.h = C.handle(self.mm)
            self.size = size
        return True

    # -- reading ------------------------------------------------------------
    def load_sparse(self, end: int, count: int, positions: array[int]) -> None:
        """Adopt a sparse index stored for this segment: of all its records
        if sealed, of a prefix of them if it was the active one."""
        if len(positions) == (count + _STRIDE - 1) // _STRIDE and end <= self.size:
            self.sparse = positions
            self.known_pos = end
            self.known_next = self.stored_next = self.base + count

    def reset_index(self) -> None:
        """Forget the sparse index (recovery cut the records it described)."""
        self.sparse = array("Q")
        self.known_pos = F.SEGMENT_HEADER_SIZE
        self.known_next = self.stored_next = self.base
        self.run_next = -1

    def offset_at(self, pos: int) -> int:
        return _OFFSET_AT.unpack_from(self.mm, pos + 8)[0]

    def extend(self, want: int, limit: int) -> None:
        """Scan forward until the records up to ``want`` are known, but never
        beyond ``limit`` (the first offset not in this segment or not yet
        written).  Damage found on the way is skipped and recorded in
        ``lost``: every record below ``limit`` is supposed to exist."""
        if self.h is None and not self.refresh_size():
            # Nothing mapped, nothing to scan: every offset up to the limit
            # is lost, and the frontier moves past them (a reader must never
            # scan this segment at its frontier).
            self.lose(self.known_next, limit, self.known_pos, "segment file is empty")
            self.known_next = max(self.known_next, limit)
            return
        while self.known_next <= want and self.known_next < limit:
            rel = self.known_next - self.base
            if rel % _STRIDE == 0 and len(self.sparse) == rel // _STRIDE:
                self.sparse.append(self.known_pos)
            chunk = min(_STRIDE - rel % _STRIDE, limit - self.known_next)
            n, stop, status, _ = C.scan(self.h, self.known_pos, self.size, self.known_next, chunk)
            self.known_pos = stop
            self.known_next += n
            if n < chunk:
                self._resync(stop, status, limit)

    def _resync(self, stop: int, status: int, limit: int) -> None:
        # Every record below limit exists: a scan that stopped short either
        # met the end of this process's mapping (the writer grew the file
        # since, possibly in the middle of a record) or damage.
        if self.refresh_size():
            return  # the records go on in the part of the file mapped just now
        found, resume = self._skip_damage(stop, self.known_next, status, limit)
        if found < 0:
            self.known_next = limit
            return
        # Sparse entries for strides starting inside the lost range point at
        # the first intact record after it.
        while len(self.sparse) * _STRIDE + self.base <= resume:
            self.sparse.append(found)
        self.known_pos = found
        self.known_next = resume

    def _skip_damage(self, stop: int, bad: int, status: int, limit: int) -> tuple[int, int]:
        """Offset ``bad`` did not validate at ``stop``: record the offsets lost
        up to the next intact record below ``limit``; that record's
        (position, offset), or (-1, limit) if there is none.  Below the limit
        every batch was written whole, so a record inside one (CONT) is a
        fair place to resume."""
        found = C.find_next(self.h, stop, self.size, bad, limit - 1, True)
        resume = self.offset_at(found) if found >= 0 else limit
        self.lose(bad, resume, stop, F.SCAN_REASONS[status])
        return found, resume

    def lose(self, first: int, end: int, pos: int, reason: str) -> None:
        """Record (once) and log that offsets [first, end) were destroyed."""
        if first >= end or any(a <= first < b for a, b in self.lost):
            return
        self.lost.append((first, end))
        if given_up(self.given_up, first, end):
            log.debug("segment %s: offsets %d..%d were given up earlier (quarantine/manifest)",
                      self.path, first, end - 1)
            return
        log.error("segment %s: %d record(s) lost to damage at position %d (%s): offsets %d..%d",
                  self.path, end - first, pos, reason, first, end - 1)

    def lost_count(self) -> int:
        return sum(b - a for a, b in self.lost)

    def seek(self, offset: int, limit: int) -> tuple[int, int] | None:
        """(position, offset) of the first intact record at or after
        ``offset`` and below ``limit``, or None if there is none."""
        while True:
            self.extend(offset, limit)
            skip = self._lost_end(offset)
            if skip is None:
                break
            offset = skip
        if offset >= min(limit, self.known_next):
            return None
        i = (offset - self.base) // _STRIDE
        pos = self.sparse[i]
        floor = self.base + i * _STRIDE
        at = self.offset_at(pos) if pos + F.RECORD_HEADER_SIZE <= self.size else -1
        if not floor <= at <= offset:
            at = floor  # damaged since the index was built: the scan below finds out
        while True:
            # Skip to the target, then validate it: two scans that build no
            # per-record fields.
            n, stop, status, _ = C.scan(self.h, pos, self.size, at, offset - at)
            if n == offset - at:
                one = C.scan(self.h, stop, self.size, offset, 1)
                if one[0] == 1:
                    return stop, offset
                status = one[2]
            # Damage found in a part that was already indexed (a stored
            # index, or bytes changed since): record it, skip to what follows.
            found, resume = self._skip_damage(stop, at + n, status, limit)
            if found < 0:
                return None
            if offset < resume:
                return found, resume
            pos, at = found, resume

    def find(self, offset: int) -> tuple[int, int] | None:
        """(payload position, length) of the intact record ``offset``, found
        through the sparse index with one codec call; None where that is not
        the whole story (the region not indexed yet, losses in this segment,
        or the walk failed): :meth:`read_run` then does it properly.  The
        caller keeps ``offset`` below the segment's limit."""
        rel = offset - self.base
        i = rel // _STRIDE
        if offset >= self.known_next or self.lost or i >= len(self.sparse):
            return None
        # (below known_next: the walk stays inside the mapping, offsets in order)
        pos = _seek(self.h, self.sparse[i], self.size, offset - rel % _STRIDE, offset)
        if pos < 0:
            return None
        length, meta_len = _LENGTH_META.unpack_from(self.mm, pos)
        return pos + F.RECORD_HEADER_SIZE + meta_len, length

    def _lost_end(self, offset: int) -> int | None:
        for a, b in self.lost:
            if a <= offset < b:
                return b
        return None

    def read_run(self, offset: int, max_records: int, limit: int) -> tuple[int, list[int]] | None:
        """(first offset, SCAN_FIELDS integers per record) for up to
        ``max_records`` consecutive intact records from the first intact one
        at or after ``offset`` and below ``limit``; None if there is none."""
        while True:
            hinted = False
            if offset == self.known_next and offset < limit and self.h is not None:
                found: tuple[int, int] | None = (self.known_pos, offset)  # reading at the frontier
            elif offset == self.run_next and offset < limit and self.h is not None and not self.lost:
                found, hinted = (self.run_pos, offset), True            # where the last read stopped
            else:
                found = self.seek(offset, limit)
            if found is None:
                return None
            pos, at = found
            n, stop, _, fields = C.scan(self.h, pos, self.size, at, min(max_records, limit - at), True)
            if n == 0 and hinted:
                self.run_next = -1      # not a record of that offset there now: seek
                continue
            if n == 0:
                # Damage at the frontier: let extend() record and skip it.
                self.extend(at, limit)
                offset = at
                continue
            if at == self.known_next and pos == self.known_pos:
                # These records are now validated: extend the sparse index.
                first = (-(at - self.base)) % _STRIDE
                for j in range(first, n, _STRIDE):
                    if len(self.sparse) == (at + j - self.base) // _STRIDE:
                        self.sparse.append(fields[j * F.SCAN_FIELDS])
                self.known_pos = stop
                self.known_next = at + n
            self.run_next, self.run_pos = at + n, stop
            return at, fields

    def close(self) -> None:
        with self.remap_lock:
            if self.h is not None:
                C.release(self.h)
                self.h = None
            if self.mm is not None:
                self.mm.close()
                self.mm = None  # type: ignore[assignment]
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

"""The pure-Python codec: the reference for ``native/logq_native.c``.

Every function here has a native twin of the same name and contract in
``logq._native`` (see :mod:`logq._codec`); the tests check that both give
byte-identical output and identical scan results on any input.

``buf`` arguments are writable (encode) or readable (scan) buffers such as an
``mmap`` or ``bytearray``; ``handle(buf)`` turns one into what the functions
take (the buffer itself here, a cffi pointer in the native twin).
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any, Literal, overload

import crcmod.predefined

from logq import _format as F

NAME = "pure"

_crc32c = crcmod.predefined.mkCrcFun("crc-32c")
_ZERO_HEADER = bytes(F.RECORD_HEADER_SIZE)
_HDR = F.RECORD_HEADER_SIZE
_pack_body = F.RECORD_BODY.pack_into
_unpack_header = F.RECORD_HEADER.unpack_from
_pack_u32 = struct.Struct("<I").pack_into


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (0 to start)."""
    return _crc32c(bytes(data), crc) if not isinstance(data, bytes) else _crc32c(data, crc)


def handle(buf: Any) -> Any:
    return buf


def release(h: Any) -> None:
    pass


def _put(buf: Any, pos: int, offset: int, ts: int, payload: Any,
         priority: int, flags: int, meta: bytes) -> int:
    n = len(payload)
    mlen = len(meta)
    body = pos + _HDR
    _pack_body(buf, pos + 4, n, offset, ts, mlen, priority, flags)
    if mlen:
        buf[body:body + mlen] = meta
    end = body + mlen + n
    buf[body + mlen:end] = payload
    _pack_u32(buf, pos, F.mask_crc(_crc32c(bytes(buf[pos + 4:end]))))
    return end


def encode(buf: Any, pos: int, end: int, offset: int, ts: int, payload: Any,
           priority: int = 0, flags: int = F.RECORD_MARK, meta: bytes = b"") -> int:
    """Write one record at ``pos``; the new position, or -1 if it does not fit
    before ``end`` (nothing is written then)."""
    if pos + _HDR + len(meta) + len(payload) > end:
        return -1
    return _put(buf, pos, offset, ts, payload, priority, flags, meta)


def encode_batch(buf: Any, pos: int, end: int, first_offset: int, ts: int,
                 joined: Any, lengths: Any, priority: int = 0) -> int:
    """Write ``len(lengths)`` records whose payloads are consecutive slices of
    ``joined``, with offsets from ``first_offset``, as one batch (the first
    of two or more carries BATCH and their count); the new position, or -1
    if they do not all fit before ``end`` (nothing is written then)."""
    count = len(lengths)
    if pos + F.batch_size(count, len(joined)) > end:
        return -1
    src = memoryview(joined)
    # Records 1.. first, flagged CONT; record 0 last: a reader stops at it
    # until it is whole, so the batch appears all at once or not at all.
    # Record 0 of two or more carries their count (BATCH): after a power
    # cut, recovery checks that all of them reached the disk.
    head_flags, head_meta = F.RECORD_MARK, b""
    if count > 1:
        head_flags, head_meta = F.RECORD_MARK | F.FLAG_BATCH, F.BATCH_COUNT.pack(count)
    first_pos = pos
    at = 0
    for i, n in enumerate(lengths):
        if i:
            pos = _put(buf, pos, first_offset + i, ts, src[at:at + n], priority,
                       F.RECORD_MARK | F.FLAG_CONT, b"")
        else:
            pos += _HDR + len(head_meta) + len(src[:n])
        at += n
    if lengths:
        _put(buf, first_pos, first_offset, ts, src[:lengths[0]], priority, head_flags, head_meta)
    return pos


class Writer:
    """The writer of one process: the active segment (``seg``, a handle),
    the control block (``ctl``, a handle or None), and ``pos`` (where the
    next record goes), ``end`` (0 while this process may not append) and
    ``next`` (its offset).  Change them only while holding the writer
    (``with writer:``), as ``put`` does."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self.seg: Any = None
        self.ctl: Any = None
        self._words: Any = None
        self.pos = 0
        self.end = 0
        self.next = 0
        self.handle = self   # what put() takes

    def attach(self, seg: Any, ctl: Any) -> None:
        if self._words is not None:
            self._words.release()
        self.seg, self.ctl = seg, ctl
        # Control-block words are loaded and stored whole (a struct
        # pack_into writes byte by byte: another process could read a torn
        # tail), through a view of native 8-byte words.
        self._words = None if ctl is None else memoryview(ctl).cast("B").cast("Q")

    def __enter__(self) -> "Writer":
        self._mu.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mu.release()


def put(w: Writer, payload: bytes, length: int) -> int:
    """The put hot path: one record at ``w.pos`` with offset ``w.next``, the
    current time, priority 0, no meta; returns its offset, or -2 without
    writing while the control block's WANT word is set (another process
    waits for the append lock), or -1 if it does not fit before ``w.end``.
    After writing, the new tail is published in the control block."""
    with w._mu:
        words = w._words
        if words is not None and words[F.CTL_WANT >> 3]:
            return -2
        if w.pos + _HDR + length > w.end:
            return -1
        off = w.next
        w.pos = _put(w.seg, w.pos, off, time.time_ns(), payload, 0, F.RECORD_MARK, b"")
        w.next = off + 1
        if words is not None:
            words[F.CTL_TAIL_NEXT >> 3] = off + 1      # before the position: Log.publish
            words[F.CTL_TAIL_POS >> 3] = w.pos
        return off


def prefault(buf: Any, start: int, length: int) -> int:
    """Fault in pages ahead of the writer: only the native codec can (it
    runs without the GIL); -1 here."""
    return -1


def _wait_word(ctl: Any, at: int, offset: int, timeout_ns: int, nap_ns: int) -> int:
    """1 if the control block's word at ``at`` has passed ``offset``, else
    after a nap of at most ``nap_ns`` (and ``timeout_ns``) 1 or 0 again."""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        if words[at >> 3] <= offset and timeout_ns > 0:
            time.sleep(min(timeout_ns, nap_ns) / 1e9)
        return 1 if words[at >> 3] > offset else 0
    finally:
        words.release()


def wait(ctl: Any, offset: int, timeout_ns: int) -> int:
    """Wait (once, at most ``timeout_ns``) for the control block's next
    offset to pass ``offset``: 1 if it has, 0 if not yet.  Without futexes
    this polls: it sleeps at most 5 ms before looking again."""
    return _wait_word(ctl, F.CTL_TAIL_NEXT, offset, timeout_ns, 5_000_000)


def wake(ctl: Any) -> None:
    """Wake the processes waiting in ``wait`` (nothing to do when polling)."""


def wait_synced(ctl: Any, offset: int, timeout_ns: int) -> int:
    """Wait (once, at most ``timeout_ns``) for the control block's
    SYNCED_NEXT to pass ``offset``: 1 if it has, 0 if not yet.  Polls: it
    sleeps at most 0.2 ms (a fraction of an fdatasync) before looking again."""
    return _wait_word(ctl, F.CTL_SYNCED_NEXT, offset, timeout_ns, 200_000)


def wake_synced(ctl: Any) -> None:
    """Wake the processes waiting in ``wait_synced`` (nothing to do when polling)."""


def written(ctl: Any) -> int:
    """The control block's WRITTEN counter (commits that ran write hooks)."""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        return words[F.CTL_WRITTEN >> 3]
    finally:
        words.release()


def wait_written(ctl: Any, seen: int, timeout_ns: int) -> int:
    """Wait (once, at most ``timeout_ns``) for WRITTEN to differ from
    ``seen``: 1 if it does, 0 if not yet.  Polls: it sleeps at most 1 ms
    before looking again (a blocked ``result()`` is that late at most)."""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        if words[F.CTL_WRITTEN >> 3] == seen and timeout_ns > 0:
            time.sleep(min(timeout_ns, 1_000_000) / 1e9)
        return 1 if words[F.CTL_WRITTEN >> 3] != seen else 0
    finally:
        words.release()


def bump_written(ctl: Any) -> None:
    """Count a commit that ran write hooks.  (Not atomic across processes:
    two bumps at once may count as one, but either moves the word past what
    a waiter saw, which is all a waiter looks for.)"""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        words[F.CTL_WRITTEN >> 3] = (words[F.CTL_WRITTEN >> 3] + 1) & 0xFFFFFFFFFFFFFFFF
    finally:
        words.release()


def _check(buf: Any, pos: int, end: int, expected: int | None) -> tuple[int, int, tuple[Any, ...]]:
    """(status, size, header) of the record at ``pos``.  ``expected`` None
    accepts any offset.  Status SCAN_OK means valid."""
    left = end - pos
    if left < _HDR:
        return (F.SCAN_END if buf[pos:end] == bytes(left) else F.SCAN_TRUNCATED), 0, ()
    if buf[pos:pos + _HDR] == _ZERO_HEADER:
        return F.SCAN_END, 0, ()
    h = _unpack_header(buf, pos)
    crc, length, off, ts, mlen, prio, flags = h
    if length > F.MAX_PAYLOAD or not F.meta_valid(flags, mlen):
        return F.SCAN_BAD_HEADER, 0, h
    size = _HDR + mlen + length
    if size > left:
        return F.SCAN_TRUNCATED, 0, h
    if F.mask_crc(_crc32c(bytes(buf[pos + 4:pos + size]))) != crc:
        return F.SCAN_BAD_CRC, 0, h
    if expected is not None and off != expected:
        return F.SCAN_BAD_OFFSET, size, h
    return F.SCAN_OK, size, h


# (asked for fields, a scan returns them: the overloads say so to callers)
@overload
def scan(buf: Any, start: int, end: int, expected_offset: int, max_records: int,
         fields: Literal[False] = ...) -> tuple[int, int, int, None]: ...
@overload
def scan(buf: Any, start: int, end: int, expected_offset: int, max_records: int,
         fields: Literal[True]) -> tuple[int, int, int, list[int]]: ...
def scan(buf: Any, start: int, end: int, expected_offset: int, max_records: int,
         fields: bool = False) -> tuple[int, int, int, list[int] | None]:
    """Validate records from ``start`` while they carry ``expected_offset``,
    ``expected_offset + 1``, …, at most ``max_records`` of them.

    Returns ``(count, stop, status, out)``: ``stop`` is the position after the
    last valid record, ``status`` why the scan stopped (``SCAN_OK`` when it
    reached ``max_records``), ``out`` the SCAN_FIELDS integers per record when
    ``fields`` is true, else None."""
    out: list[int] | None = [] if fields else None
    pos, n, status = start, 0, F.SCAN_OK
    while n < max_records:
        if pos >= end:
            status = F.SCAN_END
            break
        status, size, h = _check(buf, pos, end, expected_offset + n)
        if status != F.SCAN_OK:
            break
        if out is not None:
            mlen = h[4]
            out += (pos, pos + _HDR + mlen, h[1], h[3], mlen | h[5] << 16 | h[6] << 24)
        pos += size
        n += 1
    return n, pos, status, out


def seek(buf: Any, start: int, end: int, at_offset: int, target: int) -> int:
    """The position of the intact record carrying ``target``, walking from
    ``start``, where the record carrying ``at_offset`` lies: the records
    skipped are checked only for a sane header with the offset expected (no
    CRC: a damaged one that still looks sane only moves where the walk
    lands); the record returned is validated whole and carries ``target``.
    Otherwise ``-status`` (a SCAN_* code), and the caller scans properly.
    For random reads through the sparse index."""
    if not 0 <= at_offset <= target < 1 << 64:
        return -F.SCAN_BAD_OFFSET     # no record carries such an offset
    pos, off = start, at_offset
    while off < target:
        if pos >= end or end - pos < _HDR:
            return -F.SCAN_TRUNCATED
        _, length, o, _, mlen, _, flags = _unpack_header(buf, pos)
        if length > F.MAX_PAYLOAD or not F.meta_valid(flags, mlen) or o != off:
            return -F.SCAN_BAD_HEADER
        size = _HDR + mlen + length
        if size > end - pos:
            return -F.SCAN_TRUNCATED
        pos += size
        off += 1
    if pos >= end:
        return -F.SCAN_END
    status, _, h = _check(buf, pos, end, target)
    return pos if status == F.SCAN_OK else -status


# The flags byte (27) of a record is RECORD_MARK plus known bits: one of these.
_MARKS_ALL = tuple(bytes([F.RECORD_MARK | f]) for f in range(F.FLAGS_KNOWN - F.RECORD_MARK + 1))
_MARKS_HEAD = tuple(m for m in _MARKS_ALL if not m[0] & F.FLAG_CONT)
_MAX_HIGHS = 16


def find_next(buf: Any, start: int, end: int, min_offset: int, max_offset: int,
              batch_ok: bool = False) -> int:
    """The first position ``p >= start`` where an intact record with
    ``min_offset <= offset <= max_offset`` lies wholly before ``end`` (a
    record inside a batch, flagged CONT, only if ``batch_ok``: the caller
    knows every batch below ``max_offset`` was written whole); -1 if there
    is none.  Used to resynchronise after damage."""
    if min_offset > max_offset:
        return -1
    marks = _MARKS_ALL if batch_ok else _MARKS_HEAD
    lo = max(min_offset, 0) >> 24
    hi = min(max_offset, (1 << 64) - 1) >> 24
    if hi - lo >= _MAX_HIGHS:  # a wide range: search on the flags byte alone
        return _search(buf, start, end, end, min_offset, max_offset, None, marks)
    best = -1
    # An intact record's offset field (bytes 8..15) holds its offset, so its
    # top five bytes are one of the few values the wanted range allows.
    for high in range(lo, hi + 1):
        bound = end if best < 0 else best
        p = _search(buf, start, end, bound, min_offset, max_offset, high.to_bytes(5, "little"), marks)
        if p >= 0:
            best = p
    return best


def _search(buf: Any, start: int, end: int, bound: int, min_offset: int, max_offset: int,
            pattern: bytes | None, marks: tuple[bytes, ...]) -> int:
    """The smallest ``p`` in ``[start, bound)`` for find_next whose flags byte
    is one of ``marks`` and, unless ``pattern`` is None, whose offset's top five
    bytes are ``pattern``.  Both are found with ``find`` (memchr speed) in
    turn, each from where the other matched, so neither a zero-filled tail
    (where a pattern of zeros is everywhere) nor binary data (where flag-like
    bytes are common) costs a Python step per byte."""
    last = min(bound - 1, end - _HDR)  # the largest position allowed
    if last < start:
        return -1
    flags_end = last + _HDR           # flags byte of p at p + 27 <= last + 27
    hits = [buf.find(m, start + 27, flags_end) for m in marks]
    p = start
    while True:
        for i, hit in enumerate(hits):
            if 0 <= hit < p + 27:
                hits[i] = buf.find(marks[i], p + 27, flags_end)
        live = [hit for hit in hits if hit >= 0]
        if not live:
            return -1
        p = min(live) - 27
        if pattern is not None:
            q = buf.find(pattern, p + 11, last + 16)
            if q < 0:
                return -1
            if q != p + 11:
                p = q - 11
                continue
        status, _, h = _check(buf, p, end, None)
        if status == F.SCAN_OK and min_offset <= h[2] <= max_offset:
            return p
        p += 1

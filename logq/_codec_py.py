"""The pure-Python codec: the reference for ``native/logq_native.c``.

Every function here has a native twin of the same name and contract in
``logq._native`` (see :mod:`logq._codec`); the tests check that both give
byte-identical output and identical scan results on any input.

``buf`` arguments are writable (encode) or readable (scan) buffers such as an
``mmap`` or ``bytearray``; ``handle(buf)`` turns one into what the functions
take (the buffer itself here, a cffi pointer in the native twin).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import struct
import sys
import threading
import time
from typing import Any, Callable, Literal, overload

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
            if (words[F.CTL_WAITERS >> 3] >> _WAITERS_SHIFT) & 0xFFFFFFFF:
                _wake_on(w.ctl, F.CTL_TAIL_NEXT)
        return off


def prefault(buf: Any, start: int, length: int) -> int:
    """Fault in pages ahead of the writer: only the native codec can (it
    runs without the GIL); -1 here."""
    return -1


# -- waiting: a futex through ctypes where there is one (Linux), else naps ----
# The native codec's protocol (see logq_native.c): a waiter counts itself
# in a waiters word, reads the word it waits on and sleeps on its low 32
# bits while they still hold what it read; a writer stores the word, then
# wakes the sleepers if the count says there are any.  Here the counts are
# not atomic (two processes counting at once may lose one) and Python has
# no fences, so a wake-up can be missed: every sleep is therefore also
# bounded by the nap the polling version used.  A missed wake-up costs no
# more than polling did; every other one is prompt.
def _futex() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    nr = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "ppc64le": 221, "s390x": 238,
          "i686": 240, "i386": 240, "armv7l": 240, "armv6l": 240}.get(platform.machine())
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):  # pragma: no cover - no libc to call
        return None
    if nr is None:  # pragma: no cover - an architecture without a number here
        return None
    call.restype = ctypes.c_long
    return functools.partial(call, ctypes.c_long(nr))


_FUTEX = _futex()
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1     # shared (not PRIVATE): the word is in a shared mapping
_LOW = 0 if sys.byteorder == "little" else 4    # the low 32 bits of a native u64
_WAITERS_SHIFT = _LOW * 8     # WAITERS (a u32 at a u64's address) within that u64, as put() reads it


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _address(ctl: Any, at: int) -> int:
    """The address of the control block's byte ``at`` (its mapping stays put
    until the queue closes, after its sleepers left)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(ctl)) + at


def _sleep_on(ctl: Any, at: int, expect: int, ns: int, nap_ns: int) -> None:
    """Sleep at most ``ns`` while the low 32 bits of the u64 at ``at`` hold
    ``expect`` (where there is no futex, a nap of at most ``nap_ns``)."""
    try:
        word = None if _FUTEX is None else _address(ctl, at + _LOW)
    except TypeError:       # a read-only mapping (an inspection, not a queue in use)
        word = None
    if word is None:
        time.sleep(min(ns, nap_ns) / 1e9)
        return
    ts = _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)
    _FUTEX(ctypes.c_void_p(word), ctypes.c_long(_FUTEX_WAIT), ctypes.c_long(expect & 0xFFFFFFFF),
           ctypes.byref(ts), None, ctypes.c_long(0))


def _wake_on(ctl: Any, at: int) -> None:
    if _FUTEX is not None:
        _FUTEX(ctypes.c_void_p(_address(ctl, at + _LOW)), ctypes.c_long(_FUTEX_WAKE),
               ctypes.c_long(0x7FFFFFFF), None, None, ctypes.c_long(0))


def _count(ctl: Any, at: int, by: int) -> None:
    """Add ``by`` to the u32 count at ``at`` (not atomically: see above)."""
    n = memoryview(ctl).cast("B").cast("I")
    try:
        n[at >> 2] = (n[at >> 2] + by) & 0xFFFFFFFF
    finally:
        n.release()


def _counted(ctl: Any, at: int) -> bool:
    n = memoryview(ctl).cast("B").cast("I")
    try:
        return n[at >> 2] != 0
    finally:
        n.release()


def _wait_word(ctl: Any, at: int, moved: Callable[[int], bool], timeout_ns: int, nap_ns: int,
               waiters: int | None, poll_ns: int) -> int:
    """1 if the control block's word at ``at`` has ``moved`` (a test of its
    value), else after a sleep on it of at most ``nap_ns`` (and
    ``timeout_ns``; a nap of at most ``poll_ns`` without a futex) 1 or 0
    again; counted in the u32 at ``waiters`` while it sleeps."""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        now = words[at >> 3]
        if not moved(now) and timeout_ns > 0:
            if waiters is not None:
                _count(ctl, waiters, 1)
            try:
                now = words[at >> 3]    # after counting: a writer that stored since wakes us
                if not moved(now):
                    _sleep_on(ctl, at, now, min(timeout_ns, nap_ns), poll_ns)
            finally:
                if waiters is not None:
                    _count(ctl, waiters, -1)
            now = words[at >> 3]
        return 1 if moved(now) else 0
    finally:
        words.release()


def wait(ctl: Any, offset: int, timeout_ns: int) -> int:
    """Wait (once, at most ``timeout_ns``) for the control block's next
    offset to pass ``offset``: 1 if it has, 0 if not yet.  A futex, woken by
    ``wake``; a sleep is at most 5 ms (see above)."""
    return _wait_word(ctl, F.CTL_TAIL_NEXT, offset.__lt__, timeout_ns, 5_000_000, F.CTL_WAITERS, 5_000_000)


def wake(ctl: Any) -> None:
    """Wake the processes waiting in ``wait`` (after publishing a tail)."""
    if _counted(ctl, F.CTL_WAITERS):
        _wake_on(ctl, F.CTL_TAIL_NEXT)


def wait_synced(ctl: Any, offset: int, timeout_ns: int) -> int:
    """Wait (once, at most ``timeout_ns``) for the control block's
    SYNCED_NEXT to pass ``offset``: 1 if it has, 0 if not yet.  A futex
    that every ``wake_synced`` wakes (no count: one call per fdatasync);
    without one, a nap of at most 0.2 ms (a fraction of an fdatasync)."""
    return _wait_word(ctl, F.CTL_SYNCED_NEXT, offset.__lt__, timeout_ns, timeout_ns, None, 200_000)


def wake_synced(ctl: Any) -> None:
    """Wake the processes waiting in ``wait_synced``."""
    _wake_on(ctl, F.CTL_SYNCED_NEXT)


def written(ctl: Any) -> int:
    """The control block's WRITTEN counter (commits that ran write hooks)."""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        return words[F.CTL_WRITTEN >> 3]
    finally:
        words.release()


def wait_written(ctl: Any, seen: int, timeout_ns: int) -> int:
    """Wait (once, at most ``timeout_ns``) for WRITTEN to differ from
    ``seen``: 1 if it does, 0 if not yet.  A futex woken by ``bump_written``;
    a sleep is at most 1 ms (a blocked ``result()`` is that late at most)."""
    return _wait_word(ctl, F.CTL_WRITTEN, seen.__ne__, timeout_ns, 1_000_000, F.CTL_WRITTEN_WAITERS,
                      1_000_000)


def bump_written(ctl: Any) -> None:
    """Count a commit that ran write hooks, and wake ``wait_written``'s
    sleepers.  (Not atomic across processes: two bumps at once may count as
    one, but either moves the word past what a waiter saw, which is all a
    waiter looks for.)"""
    words = memoryview(ctl).cast("B").cast("Q")
    try:
        words[F.CTL_WRITTEN >> 3] = (words[F.CTL_WRITTEN >> 3] + 1) & 0xFFFFFFFFFFFFFFFF
    finally:
        words.release()
    if _counted(ctl, F.CTL_WRITTEN_WAITERS):
        _wake_on(ctl, F.CTL_WRITTEN)


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

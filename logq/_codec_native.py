"""The native codec: ``logq._native`` (native/logq_native.c, built with cffi)
behind exactly the interface of :mod:`logq._codec_py`, its reference.

``handle(buf)`` is a cffi ``uint8_t[]`` over the buffer (an mmap, read-only
or not, a bytearray or bytes); release it with ``release(h)`` before closing
the mmap.  Positions past the buffer (``end > len(h)``) raise ValueError
instead of touching memory outside it, except in ``put``, the hot path,
whose Writer's fields its caller keeps within the segment.  Field values the header cannot hold
(priority or flags above 255, meta over 65535 bytes) raise ``struct.error``
like the reference; negative numbers raise OverflowError.
"""

from __future__ import annotations

import struct
from array import array
from typing import Any, Literal, overload

from logq import _format as F
from logq._native import ffi, lib

NAME = "native"

_NULL = ffi.NULL
_from_buffer = ffi.from_buffer
_new = ffi.new
_new_raw = ffi.new_allocator(should_clear_after_alloc=False)
_buffer = ffi.buffer
_release = ffi.release

_crc = lib.logq_crc32c
_encode = lib.logq_encode
_encode_batch = lib.logq_encode_batch
_scan = lib.logq_scan
_find_next = lib.logq_find_next
_seek = lib.logq_seek

_HDR = F.RECORD_HEADER_SIZE
_NFIELDS = F.SCAN_FIELDS
_U64_MAX = (1 << 64) - 1
_E_ARG = lib.LOGQ_E_ARG

assert array("I").itemsize == 4


def hardware_crc() -> bool:
    """Whether CRC32C runs on a CPU instruction (SSE4.2 / ARMv8 CRC32)."""
    return bool(lib.logq_crc32c_hw())


def _bytes_like(data: Any) -> Any:
    """bytes as they are (cffi passes them without a copy), other buffers as a
    cffi view; anything else through bytes() as the reference does."""
    if type(data) is bytes:
        return data
    try:
        return _from_buffer("uint8_t[]", data)
    except (TypeError, ValueError):
        return bytes(data)


def _too_far(h: Any, end: int) -> ValueError:
    return ValueError(f"end {end} is past the end of the buffer ({len(h)} bytes)")


def crc32c(data: Any, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (0 to start)."""
    if type(data) is not bytes:
        data = _bytes_like(data)
    return _crc(crc, data, len(data))


def handle(buf: Any) -> Any:
    return _from_buffer("uint8_t[]", buf)


def release(h: Any) -> None:
    _release(h)


def encode(h: Any, pos: int, end: int, offset: int, ts: int, payload: Any,
           priority: int = 0, flags: int = F.RECORD_MARK, meta: bytes = b"") -> int:
    """Write one record at ``pos``; the new position, or -1 if it does not fit
    before ``end`` (nothing is written then)."""
    if end > len(h):
        raise _too_far(h, end)
    payload = _bytes_like(payload)
    meta = _bytes_like(meta)
    r = _encode(h, pos, end, offset, ts, payload, len(payload), priority, flags,
                meta, len(meta))
    if r == _E_ARG:
        raise struct.error("record field out of range "
                           f"(priority {priority}, flags {flags}, meta {len(meta)} bytes)")
    return r


def encode_batch(h: Any, pos: int, end: int, first_offset: int, ts: int,
                 joined: Any, lengths: Any, priority: int = 0) -> int:
    """Write ``len(lengths)`` records whose payloads are consecutive slices of
    ``joined``, with offsets from ``first_offset``, as one batch (the first
    of two or more carries BATCH and their count); the new position, or -1
    if they do not all fit before ``end`` (nothing is written then)."""
    if end > len(h):
        raise _too_far(h, end)
    if not (type(lengths) is array and lengths.typecode == "I"):
        lengths = array("I", lengths)
    joined = _bytes_like(joined)
    n = len(lengths)
    r = _encode_batch(h, pos, end, first_offset, ts, joined, len(joined),
                      _from_buffer("uint32_t[]", lengths) if n else _NULL, n, priority)
    if r == _E_ARG:
        raise struct.error(f"record field out of range (priority {priority}, "
                           f"offsets {first_offset}..{first_offset + n - 1})")
    return r


_W_POS, _W_END, _W_NEXT = lib.LOGQ_W_POS, lib.LOGQ_W_END, lib.LOGQ_W_NEXT
_wget, _wset = lib.logq_writer_get, lib.logq_writer_set


class Writer:
    """The writer of one process (see ``_codec_py.Writer``): a C struct with
    its own mutex, which ``put`` takes and ``with writer:`` holds."""

    def __init__(self) -> None:
        self.handle = ffi.gc(lib.logq_writer_new(), lib.logq_writer_free)
        if self.handle == _NULL:
            raise MemoryError("logq_writer_new")
        self.seg: Any = None
        self.ctl: Any = None

    def attach(self, seg: Any, ctl: Any) -> None:
        # Keep the handles alive as long as the struct points into them.
        self.seg, self.ctl = seg, ctl
        lib.logq_writer_attach(self.handle, _NULL if seg is None else seg,
                               _NULL if ctl is None else ctl)

    pos = property(lambda self: _wget(self.handle, _W_POS),
                   lambda self, v: _wset(self.handle, _W_POS, v))
    end = property(lambda self: _wget(self.handle, _W_END),
                   lambda self, v: _wset(self.handle, _W_END, v))
    next = property(lambda self: _wget(self.handle, _W_NEXT),
                    lambda self, v: _wset(self.handle, _W_NEXT, v))

    def __enter__(self) -> "Writer":
        lib.logq_writer_lock(self.handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        lib.logq_writer_unlock(self.handle)


# The put hot path, called as put(writer.handle, payload_bytes, len(payload)).
put = lib.logq_put

# prefault(h, start, length): map pages ahead of the writer, without the GIL.
prefault = lib.logq_prefault

# wait(ctl, offset, timeout_ns) -> 1 once the tail passed offset, else 0 (a
# futex, without the GIL); wake(ctl) after publishing a tail from Python.
wait = lib.logq_wait
wake = lib.logq_wake

# wait_synced(ctl, offset, timeout_ns) -> 1 once SYNCED_NEXT passed offset,
# else 0 (a futex, without the GIL); wake_synced(ctl) after publishing it.
wait_synced = lib.logq_wait_synced
wake_synced = lib.logq_wake_synced

# written(ctl) -> the WRITTEN counter; wait_written(ctl, seen, timeout_ns) ->
# 1 once it differs from seen, else 0 (a futex, without the GIL);
# bump_written(ctl) after a commit that ran write hooks.
written = lib.logq_written
wait_written = lib.logq_wait_written
bump_written = lib.logq_bump_written


# (asked for fields, a scan returns them: the overloads say so to callers)
@overload
def scan(h: Any, start: int, end: int, expected_offset: int, max_records: int,
         fields: Literal[False] = ...) -> tuple[int, int, int, None]: ...
@overload
def scan(h: Any, start: int, end: int, expected_offset: int, max_records: int,
         fields: Literal[True]) -> tuple[int, int, int, list[int]]: ...
def scan(h: Any, start: int, end: int, expected_offset: int, max_records: int,
         fields: bool = False) -> tuple[int, int, int, list[int] | None]:
    """Validate records from ``start`` while they carry ``expected_offset``,
    ``expected_offset + 1``, …, at most ``max_records`` of them.

    Returns ``(count, stop, status, out)`` as the reference does."""
    if end > len(h):
        raise _too_far(h, end)
    if max_records > _U64_MAX:
        max_records = _U64_MAX
    elif max_records < 0:
        max_records = 0
    res = _new("uint64_t[2]")
    if expected_offset > _U64_MAX:
        # No record can carry that offset: the first intact one is at the
        # wrong offset (whatever offset it has), as in the reference.
        status = F.SCAN_OK
        if max_records:
            n = _scan(h, start, end, 0, 1, _NULL, res)
            status = F.SCAN_BAD_OFFSET if n else res[1]
        return 0, start, status, [] if fields else None
    if not fields:
        n = _scan(h, start, end, expected_offset, max_records, _NULL, res)
        return n, res[0], res[1], None
    # every record takes at least _HDR bytes of [start, end)
    cap = min(max_records, (end - start) // _HDR) if end > start else 0
    out = _new_raw("uint64_t[]", cap * _NFIELDS)
    n = _scan(h, start, end, expected_offset, max_records, out, res)
    return n, res[0], res[1], memoryview(_buffer(out, n * _NFIELDS * 8)).cast("Q").tolist()


def find_next(h: Any, start: int, end: int, min_offset: int, max_offset: int,
              batch_ok: bool = False) -> int:
    """The first position ``p >= start`` where an intact record with
    ``min_offset <= offset <= max_offset`` lies wholly before ``end`` (a
    record inside a batch, flagged CONT, only if ``batch_ok``); -1 if there
    is none.  Used to resynchronise after damage."""
    if end > len(h):
        raise _too_far(h, end)
    if max_offset > _U64_MAX:
        max_offset = _U64_MAX
    if min_offset < 0:
        min_offset = 0
    if min_offset > max_offset:
        return -1
    return _find_next(h, start, end, min_offset, max_offset, 1 if batch_ok else 0)


def seek(h: Any, start: int, end: int, at_offset: int, target: int) -> int:
    """The position of the intact record carrying ``target``, walking the
    headers from ``start`` (where the record carrying ``at_offset`` lies);
    ``-status`` when the walk or the record does not check out.  As the
    reference does."""
    if end > len(h):
        raise _too_far(h, end)
    if not 0 <= at_offset <= target <= _U64_MAX:
        return -F.SCAN_BAD_OFFSET
    return _seek(h, start, end, at_offset, target)


# seek without the argument checks, for a caller that keeps them by
# construction (end within the mapping, at_offset <= target, both >= 0):
# a random read's sparse-index hop, where the checks cost a fifth of it.
seek_unchecked = _seek

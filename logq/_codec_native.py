"""The native codec: ``logq._native`` (native/logq_native.c, built with cffi)
behind exactly the interface of :mod:`logq._codec_py`, its reference.

``handle(buf)`` is a cffi ``uint8_t[]`` over the buffer (an mmap, read-only
or not, a bytearray or bytes); release it with ``release(h)`` before closing
the mmap.  Positions past the buffer (``end > len(h)``) raise ValueError
instead of touching memory outside it, except in ``append``, the hot path,
which trusts its caller.  Field values the header cannot hold
(priority or flags above 255, meta over 65535 bytes) raise ``struct.error``
like the reference; negative numbers raise OverflowError.
"""

from __future__ import annotations

import struct
from array import array
from typing import Any

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
_encode_batch = lib.logq_encode_batch_n
_append = lib.logq_append
_scan = lib.logq_scan
_find_next = lib.logq_find_next

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
    ``joined``, with offsets from ``first_offset``; the new position, or -1
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


def append(h: Any, pos: int, end: int, offset: int, payload: bytes, ctl: Any = None) -> int:
    """The put hot path: ``encode`` with the current time, priority 0, no meta.

    With a control block handle ``ctl``: returns -2 without writing while its
    WANT word is nonzero, and after writing publishes the new tail position
    and next offset in it.

    Unlike the other functions this one does not check ``end <= len(h)``
    (it is the hot path): the caller must pass an ``end`` within the buffer."""
    try:
        return _append(h, pos, end, offset, payload, len(payload), ctl or _NULL)
    except TypeError:
        if type(payload) is bytes:
            raise
        payload = _bytes_like(payload)
        return _append(h, pos, end, offset, payload, len(payload), ctl or _NULL)


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


def find_next(h: Any, start: int, end: int, min_offset: int, max_offset: int) -> int:
    """The first position ``p >= start`` where an intact record with
    ``min_offset <= offset <= max_offset`` lies wholly before ``end``; -1 if
    there is none.  Used to resynchronise after damage."""
    if end > len(h):
        raise _too_far(h, end)
    if max_offset > _U64_MAX:
        max_offset = _U64_MAX
    if min_offset < 0:
        min_offset = 0
    if min_offset > max_offset:
        return -1
    return _find_next(h, start, end, min_offset, max_offset)

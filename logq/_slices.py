"""Payloads out of a mapped segment, as ``bytes``, many at a time.

A scan reports where each payload lies (its position and length, see
``_format.SCAN_FIELDS``).  Copying them out one slice at a time costs a
Python-level slice per record, which is as much as everything else a
consumer does per message.  Records of one size follow one another at one
stride, broken only where a record carries a meta (a batch head's count):
so a run of them is one ``struct`` format (``"{gap}x{n}s"`` repeated), and
one ``unpack_from`` makes all its ``bytes`` in C.

Promise: ``cut`` returns exactly ``[buf[p:p + n] for p, n in zip(pos,
lens)]``.  The fast path is taken only after the positions it implies were
checked against ``pos`` in full (a list comparison, in C); anything it does
not fit (lengths that differ, many breaks) is sliced one by one.
"""

from __future__ import annotations

import struct
from typing import Any

_MIN = 16           # fewer records than this: slice them one by one
_MAX_BREAKS = 8     # more stride changes than this: slice them one by one
_CACHE_MAX = 128
_formats: dict[tuple[int, tuple[tuple[int, int, int], ...]], struct.Struct] = {}


def cut(buf: Any, pos: list[int], lens: list[int]) -> list[bytes]:
    """The payloads at ``pos`` (positions in ``buf``) of ``lens`` bytes."""
    k = len(pos)
    if k >= _MIN:
        n = lens[0]
        if lens.count(n) == k:
            segs = _segments(pos, n, k)
            if segs is not None:
                st = _formats.get((n, segs))
                if st is None:
                    st = _format(n, segs)
                if _positions(pos[0], n, segs) == pos:
                    return list(st.unpack_from(buf, pos[0]))
    return [buf[p:p + m] for p, m in zip(pos, lens)]


def _segments(pos: list[int], n: int, k: int) -> tuple[tuple[int, int, int], ...] | None:
    """The positions as runs ``(gap before the first, stride after it,
    count)``, found by bisection where the stride breaks (a guess that
    ``cut`` checks in full); None past ``_MAX_BREAKS``."""
    segs: list[tuple[int, int, int]] = []
    a, prev_end = 0, pos[0]
    while a < k:
        if len(segs) > _MAX_BREAKS:
            return None
        if a + 1 == k:
            segs.append((pos[a] - prev_end, 0, 1))
            break
        base, s = pos[a], pos[a + 1] - pos[a]
        if s < n or s <= 0:
            return None       # (overlapping or repeated positions: not a log's)
        b = k
        if pos[k - 1] != base + (k - 1 - a) * s:
            lo, hi = a + 1, k - 1           # pos[lo] fits the stride, pos[hi] does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if pos[mid] == base + (mid - a) * s:
                    lo = mid
                else:
                    hi = mid
            b = hi
        segs.append((pos[a] - prev_end, s, b - a))
        prev_end = pos[b - 1] + n
        a = b
    return tuple(segs)


def _format(n: int, segs: tuple[tuple[int, int, int], ...]) -> struct.Struct:
    parts = []
    for gap, stride, count in segs:
        parts.append(f"{gap}x{n}s")
        if count > 1:
            parts.append(f"{stride - n}x{n}s" * (count - 1))
    if len(_formats) >= _CACHE_MAX:
        _formats.clear()
    st = _formats[(n, segs)] = struct.Struct("<" + "".join(parts))
    return st


def _positions(first: int, n: int, segs: tuple[tuple[int, int, int], ...]) -> list[int]:
    """The payload positions that ``segs`` describe, from ``first``."""
    out: list[int] = []
    at = first
    for gap, stride, count in segs:
        at += gap
        out += range(at, at + stride * count, stride) if count > 1 else (at,)
        at += stride * (count - 1) + n
    return out

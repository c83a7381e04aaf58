"""Scanning a segment for its intact records, and giving up the bytes that
do not hold any: the tools of recovery (``Log.recover``), of repairing
after a writer that died holding the append lock, and of ``logq check``.

A batch belongs to the log only whole (the format's rule, ``_format``):
above what a checkpoint vouches for, ``scan_tail`` stops at a batch that
is not, as at damage."""

from __future__ import annotations

import os

from logq import _codec as C
from logq import _format as F
from logq._fsutil import keep_aside, record_loss
from logq._segment import Segment

_PAGE = 4096


def scan_tail(seg: Segment, pos: int, nxt: int, *, limit: int | None = None,
              resync: bool = True, durable: int = 0) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    """Scan a segment from a known record boundary: to its end (the newest
    segment), or up to offset ``limit`` (a sealed one, whose next segment
    starts there).

    Returns (position after the last intact record of the log, next offset,
    lost ranges as (first offset, end offset, position of the damage,
    position of the intact record after it or -1)).  With ``resync``, a bad
    record followed later by an intact record with a higher offset is damage
    in the middle (its offsets are lost, the scan goes on); with nothing
    intact after it, it is the tail, or (before ``limit``) the loss of the
    rest.

    ``durable``: every record below this offset was durable, so written
    whole (the index's checkpoint vouches for it).  Below it, damage loses
    only the records it touches: resynchronisation may land inside a batch
    (on a CONT record).  From it on, a batch belongs to the log only whole
    (the format's rule, ``_format``): a BATCH head whose count of CONT
    records does not follow intact is a torn batch, where the scan stops as
    at damage (``F.TORN_BATCH``), and resynchronisation lands only on a
    record that begins a batch or stands alone."""
    lost: list[tuple[int, int, int, int]] = []
    while True:
        room = (1 << 62) if limit is None else limit - nxt
        n, stop, status = _scan_whole(seg, pos, nxt, room, durable)
        pos, nxt = stop, nxt + n
        if n == room or not resync or stop >= seg.size and limit is None:
            return pos, nxt, lost
        most = limit - 1 if limit is not None else nxt + (seg.size - stop) // F.RECORD_HEADER_SIZE
        # A torn batch's head is intact: look past it.
        start = stop + 1 if status == F.TORN_BATCH else stop
        found = -1
        if nxt < durable:
            found = C.find_next(seg.h, start, seg.size, nxt, min(most, durable - 1), True)
        if found < 0:
            found = C.find_next(seg.h, start, seg.size, max(nxt, durable), most)
        if found < 0:
            if limit is not None:
                lost.append((nxt, limit, stop, -1))
                nxt = limit
            return pos, nxt, lost
        resume = seg.offset_at(found)
        lost.append((nxt, resume, stop, found))
        pos, nxt = found, resume


_CHUNK = 1 << 16      # records per scan above the checkpoint (their fields are kept)


def _scan_whole(seg: Segment, pos: int, nxt: int, room: int, durable: int) -> tuple[int, int, int]:
    """``C.scan`` of up to ``room`` records from ``pos`` (offset ``nxt``),
    that also stops (status TORN_BATCH) at a batch head at or above offset
    ``durable`` whose batch is not whole: (count, stop, status)."""
    total = 0
    if nxt < durable:
        below = min(room, durable - nxt)
        n, stop, status, _ = C.scan(seg.h, pos, seg.size, nxt, below)
        if n < below or below == room:
            return n, stop, status
        total, pos, nxt, room = n, stop, nxt + n, room - n
    chunk = _CHUNK
    while True:
        want = min(room, chunk)
        n, stop, status, fields = C.scan(seg.h, pos, seg.size, nxt, want, True)
        whole, need = _whole_batches(seg, fields, n)
        if whole == n:
            total += n
            if n < want or n == room:
                return total, stop, status
            pos, nxt, room, chunk = stop, nxt + n, room - n, _CHUNK
            continue
        if need and n == want < room:
            # The scan stopped at the chunk's end, inside the batch: scan on
            # from its head, far enough to see all of it.
            total, nxt, room = total + whole, nxt + whole, room - whole
            pos = fields[whole * F.SCAN_FIELDS]
            # (no more records than the segment can hold, whatever a count says)
            chunk = max(_CHUNK, min(need, (seg.size - pos) // F.RECORD_HEADER_SIZE + 1))
            continue
        return total + whole, fields[whole * F.SCAN_FIELDS], F.TORN_BATCH


_BATCH_BIT = F.FLAG_BATCH << 24
_CONT_BIT = F.FLAG_CONT << 24


def _whole_batches(seg: Segment, fields: list[int], n: int) -> tuple[int, int]:
    """Of ``n`` consecutive intact records (their SCAN_FIELDS), how many
    precede the first batch that is not whole among them, and how many
    records that batch needs when it only runs past them (0 if it is
    broken: a record that is not CONT where its count wants one)."""
    attrs = fields[4::F.SCAN_FIELDS]
    for i in [i for i, a in enumerate(attrs) if a & _BATCH_BIT]:
        count = F.batch_count_at(seg.mm, fields[i * F.SCAN_FIELDS], attrs[i])
        rest = attrs[i + 1:i + count]
        if not all(a & _CONT_BIT for a in rest):
            return i, 0
        if i + count > n:
            return i, count
    return n, 0


def ends_at(seg: Segment, pos: int, nxt: int) -> bool:
    """Whether the record before offset ``nxt`` lies intact in ``seg`` and
    ends at ``pos`` (what a checkpoint (base, pos, nxt) claims).  Searches
    backwards from ``pos`` in growing windows: its cost is about the size
    of that record."""
    if nxt == seg.base:
        return pos == F.SEGMENT_HEADER_SIZE
    if seg.h is None or nxt < seg.base or pos > seg.size:
        return False
    window = _PAGE
    lo = pos
    while lo > F.SEGMENT_HEADER_SIZE:
        lo, hi = max(F.SEGMENT_HEADER_SIZE, pos - window), lo
        p = C.find_next(seg.h, lo, pos, nxt - 1, nxt - 1, True)
        while 0 <= p < hi:
            if C.scan(seg.h, p, pos, nxt - 1, 1)[:2] == (1, pos):
                return True
            p = C.find_next(seg.h, p + 1, pos, nxt - 1, nxt - 1, True)
        window *= 4
    return False



def quarantine_bytes(qdir: str, seg: Segment, start: int, end: int, offsets: tuple[int, int],
                     reason: str) -> str | None:
    """Give up segment bytes [start, end), which held ``offsets`` [first,
    end): keep them in quarantine, record the loss in the manifest, then
    zero them in place (in that order, each step durable), so that no
    reader ever takes a fragment of them for a record.  The path kept
    (None for an empty range: offsets whose bytes are gone already)."""
    dest = (keep_aside(qdir, f"{F.segment_name(seg.base)}.{start}-{end}", bytes(seg.mm[start:end]))
            if end > start else None)
    record_loss(qdir, {"segment": F.segment_name(seg.base), "start": start, "end": end,
                       "first_offset": offsets[0], "end_offset": offsets[1],
                       "file": dest and os.path.basename(dest), "reason": reason})
    if end > start:
        seg.mm[start:end] = bytes(end - start)
        os.fdatasync(seg.fd)
    return dest


def _data_end(seg: Segment, start: int) -> int:
    """The position after the last non-zero byte of ``seg`` (at least start)."""
    tail = bytes(seg.mm[start:seg.size]).rstrip(b"\0")
    return start + len(tail)


def _first_at(seg: Segment, pos: int, nxt: int) -> int:
    """The offset the log goes on from at the published tail (``seg``,
    ``pos``, ``nxt``) of a holder that died.  A tail is published next
    first, then position, then base: killed between the stores, the holder
    leaves ``nxt`` past the records that start at ``pos``: those of its
    last append, or, in a roll, all of the segment it was leaving (``pos``
    already at a header, the base not yet the new segment's).  They are
    whole (records are written before they are published); their own
    offsets are the log's if they run up to ``nxt``.  Otherwise ``nxt``."""
    if seg.h is None or pos + F.RECORD_HEADER_SIZE > seg.size:
        return nxt
    first = seg.offset_at(pos)
    if not 0 <= first < nxt:
        return nxt
    n, _, _, _ = C.scan(seg.h, pos, seg.size, first, nxt - first)
    return first if n == nxt - first else nxt


def _record_extent(seg: Segment, pos: int) -> int:
    """Where a record whose header may be torn, starting at ``pos``, ends."""
    if pos + F.RECORD_HEADER_SIZE > seg.size:
        return seg.size
    _, length, _, _, meta_len, _, _ = F.RECORD_HEADER.unpack_from(seg.mm, pos)
    return min(seg.size, pos + F.RECORD_HEADER_SIZE + meta_len + min(length, F.MAX_PAYLOAD))


def _torn_extent(seg: Segment, pos: int, nxt: int) -> int:
    """Where the bytes a writer that died appending at ``pos`` (offset
    ``nxt``: every whole record before it was kept) may have left end: the
    record it was writing, or a batch it did not finish.  A batch's head is
    written last, so the head's bytes at ``pos`` may be zeros or torn with
    the batch's other records whole after them, and the last of those
    torn: found by their offsets (after ``nxt``) and followed to their end."""
    end = _record_extent(seg, pos)
    if seg.h is None:
        return end
    found = C.find_next(seg.h, pos, seg.size, nxt + 1, nxt + (1 << 32), True)
    if found >= 0:
        n, stop, _, _ = C.scan(seg.h, found, seg.size, seg.offset_at(found), 1 << 32)
        end = max(end, _record_extent(seg, stop))
    return end

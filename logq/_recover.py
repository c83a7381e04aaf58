"""Recovery: opening a queue that no other process has open, finding the
tail of its log and making it safe to append after.

Who recovers
------------
Recovery runs only in a process that opens the queue while no other process
has it open (``open.lock`` is held shared by every open queue).  It scans the
newest segment from the last durable checkpoint, keeps every intact record,
skips damaged ones when intact records follow, and cuts the file at the end
of the last intact record (freeing, then preallocating again, everything
after it, so that no stale bytes survive past the tail).  Above the
checkpoint a batch is kept only whole (its head's count of records follows
intact; ``scan_tail``): a torn batch is cut or given up, never returned in
part.  The checkpoint's position is trusted only once the record before it
is found intact there: if the records it vouches for are gone, recovery
scans the segment from its start and the log ends after the last intact
record (so new puts follow it).  Rolling does not fsync the sealed segment,
so after a machine restart (a new kernel boot id) the sealed segments since
the checkpoint are validated too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from logq import _codec as C
from logq import _format as F
from logq._fsutil import fsync_dir, quarantine_path
from logq._log import Log
from logq._scan import _data_end, ends_at, quarantine_bytes, scan_tail
from logq._segment import Segment, encode_header

log = logging.getLogger("logq")


@dataclass
class Recovery:
    """What opening the queue found and did."""
    clean: bool = True                # the last shutdown was clean
    scanned_bytes: int = 0
    truncated_bytes: int = 0          # torn bytes cut from the tail
    lost: list[tuple[int, int]] = field(default_factory=list)  # [first, end) offsets
    damaged_bases: list[int] = field(default_factory=list)    # sealed segments repaired
    durable_lost: int = 0             # records below the checkpoint that are gone


def recover(lg: Log, checkpoint: tuple[int, int, int] | None, clean: bool) -> Recovery:
    """Find the tail of the log and make it safe to append after."""
    assert lg.alone
    rep = Recovery(clean=clean)
    for name in os.listdir(lg.dir):
        if name.endswith(F.SEGMENT_SUFFIX + ".tmp"):
            os.unlink(os.path.join(lg.dir, name))
    if not lg.bases:
        rep.clean = True
        start = checkpoint[2] if checkpoint else 0
        lg.set_active(lg.new_segment(start, 0), F.SEGMENT_HEADER_SIZE, start)
        return rep
    base = lg.bases[-1]
    if not clean and lg.rebooted:
        _validate_sealed(lg, checkpoint, rep)
    seg = lg.segment(base)
    if seg.size < F.SEGMENT_HEADER_SIZE:
        seg = _rebuild_short(lg, seg, rep)
    pos, nxt = F.SEGMENT_HEADER_SIZE, base
    # Records below the checkpoint were durable, so written whole.
    durable = checkpoint[2] if checkpoint else 0
    # The quick open after a clean shutdown needs the checkpoint's
    # position confirmed: from anywhere else, a zeroed range (given up
    # by repair) would read as the end of the log.
    trusted = False
    if checkpoint and checkpoint[0] == base and checkpoint[2] >= base:
        if F.SEGMENT_HEADER_SIZE <= checkpoint[1] <= seg.size and \
                ends_at(seg, checkpoint[1], checkpoint[2]):
            pos, nxt = checkpoint[1], checkpoint[2]
            trusted = True
        else:
            # The records it vouches for are gone (zeroed, cut): starting
            # there would put new records behind a hole.
            log.error("segment %s: the durable checkpoint (offset %d at position %d) does not "
                      "follow an intact record; scanning the segment from its start",
                      seg.path, checkpoint[2], checkpoint[1])
    if clean and trusted and C.scan(seg.h, pos, seg.size, nxt, 1)[2] == F.SCAN_END:
        lg.set_active(seg, pos, nxt)
        return rep
    rep.clean = False
    seg.reset_index()   # any stored one may describe records about to be cut
    start = pos
    pos, nxt, lost = scan_tail(seg, pos, nxt, durable=durable)
    rep.scanned_bytes += pos - start
    for a, b, at, found in lost:
        # Damage with intact records after it (the tail has none): keep
        # the bytes aside and record the loss, as after a restart.
        if found > at:
            _quarantine_bytes(lg, seg, at, found, (a, b), "did not hold intact records")
        seg.lose(a, b, at, "found by recovery")
        rep.lost.append((a, b))
    if checkpoint and checkpoint[2] > nxt:
        rep.durable_lost = checkpoint[2] - nxt
        log.error("queue %s: %d record(s) below the durable checkpoint (offset %d) are gone; "
                  "the log now ends at offset %d", lg.dir, rep.durable_lost, checkpoint[2], nxt)
    rep.truncated_bytes = _cut_tail(seg, pos)
    # (a file shorter than segment_bytes grows when a record needs it: room())
    if seg.header_problem:
        os.pwrite(seg.fd, encode_header(base), 0)
        os.fsync(seg.fd)
        seg.header_problem = None
    lg.set_active(seg, pos, nxt)
    return rep


def _validate_sealed(lg: Log, checkpoint: tuple[int, int, int] | None, rep: Recovery) -> None:
    """After a restart: the sealed segments written since the last
    checkpoint may never have reached the disk whole (rolling does not
    fsync).  Scan them; where records are missing, or a batch is not
    whole, keep the bytes in quarantine and zero them, so that no reader
    later takes part of a torn batch for data."""
    first = checkpoint[0] if checkpoint else lg.bases[0]
    for i, base in enumerate(lg.bases[:-1]):
        if base < first:
            continue
        limit, seg = lg.bases[i + 1], lg.segment(base)
        if seg.h is None:
            continue
        pos, nxt = F.SEGMENT_HEADER_SIZE, base
        if checkpoint and checkpoint[0] == base and ends_at(seg, checkpoint[1], checkpoint[2]):
            pos, nxt = checkpoint[1], checkpoint[2]
        end, _, lost = scan_tail(seg, pos, nxt, limit=limit,
                                 durable=checkpoint[2] if checkpoint else 0)
        rep.scanned_bytes += end - pos
        for first_lost, end_lost, at, found in lost:
            stop = found if found >= 0 else _data_end(seg, at)
            if stop > at:
                _quarantine_bytes(lg, seg, at, stop, (first_lost, end_lost),
                                       "did not hold whole records after a restart")
            seg.lose(first_lost, end_lost, at, "not on disk after a restart")
            rep.lost.append((first_lost, end_lost))
        if lost:
            rep.damaged_bases.append(base)
        seg.reset_index()


def _quarantine_bytes(lg: Log, seg: Segment, start: int, end: int, offsets: tuple[int, int],
                      reason: str) -> None:
    """Keep seg's bytes [start, end) in quarantine/, record the offsets
    they held as given up, then zero them."""
    dest = quarantine_bytes(lg.dir, seg, start, end, offsets, reason)
    log.error("segment %s: bytes %d..%d (offsets %d..%d) %s; kept in %s and zeroed",
              seg.path, start, end, offsets[0], offsets[1] - 1, reason, dest)


def _rebuild_short(lg: Log, seg: Segment, rep: Recovery) -> Segment:
    """The newest segment is too short to hold its header (a torn
    creation or a truncated file): keep its bytes aside, start it anew."""
    base = seg.base
    dest = quarantine_path(lg.dir, F.segment_name(base))
    lg.segments.pop(base).close()
    os.rename(seg.path, dest)
    fsync_dir(os.path.dirname(dest))
    log.error("segment %s is too short (%d bytes) to be a segment: moved to %s",
              seg.path, seg.size, dest)
    rep.clean = False
    lg.bases.remove(base)
    return lg.new_segment(base, 0)


def _cut_tail(seg: Segment, pos: int) -> int:
    """Drop every byte after ``pos`` (the file keeps its length: a hole
    after ``pos``), so nothing written before the crash can reappear
    after the tail."""
    probe = bytes(seg.mm[pos:min(seg.size, pos + (1 << 16))])
    torn = len(probe.rstrip(b"\0"))
    os.ftruncate(seg.fd, pos)
    os.ftruncate(seg.fd, seg.size)
    seg.allocated = min(seg.allocated, pos)
    os.fsync(seg.fd)
    if torn:
        # Not damage (a writer died mid-write): the Queue's recovery summary reports it.
        log.debug("segment %s: cut a torn tail at position %d (%d non-zero bytes after it)",
                    seg.path, pos, torn)
    return torn

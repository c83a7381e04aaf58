"""A consumer group's durable records in the index, below the group
state: its settled set (a watermark and the intervals settled above it)
and the encodings of its schedule and dead-letter entries.  Pure index
access, no locks and no lease table: ``_group`` drives it inside its own
transactions."""

from __future__ import annotations

import bisect
import struct
from typing import Any, Iterator

from logq._index import G_WATERMARK
from logq._leases import merge_settled

_ERROR_MAX = 4096
_DEAD = struct.Struct("<IQQI")   # attempts, dead-letter time ns, message timestamp ns, error length
_SCHED = struct.Struct("<I")     # deliveries made so far; the last error follows
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_I64_MAX = (1 << 63) - 1


def _be(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _intervals(txn: Any, idx: Any, p: bytes, lo: int) -> Iterator[tuple[bytes, int, int]]:
    """(key, start, end) of the group's settled intervals that end after
    ``lo``, in order."""
    cur = txn.cursor(db=idx.acks)
    if cur.set_range(p + _be(lo)):
        if not cur.prev():
            cur.first()
        elif bytes(cur.key()[:len(p)]) != p:
            cur.next()      # the interval before belongs to another group
    elif not cur.last():
        return
    while True:
        k = bytes(cur.key())
        if k[:len(p)] == p:
            a, b = int.from_bytes(k[-8:], "big"), _U64.unpack(cur.value())[0]
            if b > lo:
                yield k, a, b
        elif k > p:
            return
        if not cur.next():
            return


class _Skips:
    """Offsets in [lo, hi) already settled or scheduled: none unless the
    cursors were lost (after a reboot) or a group moved."""

    def __init__(self, txn: Any, idx: Any, p: bytes, lo: int, hi: int) -> None:
        self.spans: list[tuple[int, int]] = []
        for _k, a, b in _intervals(txn, idx, p, lo):
            if a >= hi:
                break
            self.spans.append((a, b))
        self.sched: set[int] = set()
        cur = txn.cursor(db=idx.pending)
        if cur.set_range(p + _be(lo)):
            for k in cur.iternext(values=False):
                if bytes(k[:len(p)]) != p or int.from_bytes(k[-8:], "big") >= hi:
                    break
                self.sched.add(int.from_bytes(k[-8:], "big"))
        self.starts = [a for a, _ in self.spans]

    def __bool__(self) -> bool:
        return bool(self.spans or self.sched)

    def __contains__(self, o: int) -> bool:
        if o in self.sched:
            return True
        i = bisect.bisect_right(self.starts, o) - 1
        return i >= 0 and o < self.spans[i][1]


def _is_settled(txn: Any, idx: Any, p: bytes, mark: int, off: int) -> bool:
    if off < mark:
        return True
    for _k, a, b in _intervals(txn, idx, p, off):
        return a <= off < b
    return False


def _settle(txn: Any, idx: Any, p: bytes, g: list[int], new: list[tuple[int, int]]) -> None:
    """Add runs to the group's settled set in ``txn``; ``g`` (its value) is
    updated in place: the watermark moves over what touches it."""
    if not new:
        return
    lo, hi = min(a for a, _ in new), max(b for _, b in new)
    near, keys = [], []
    for k, a, b in _intervals(txn, idx, p, max(lo - 1, 0)):
        if a > hi:
            break
        near.append((a, b))
        keys.append(k)
    mark, merged = merge_settled(g[G_WATERMARK], near, new)
    for k in keys:
        txn.delete(k, db=idx.acks)
    for a, b in merged:
        txn.put(p + _be(a), _U64.pack(b), db=idx.acks)
    g[G_WATERMARK] = mark


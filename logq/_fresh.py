"""Claiming messages never delivered to a group: scanning the log from a
group's cursors (one cursor, or one per priority level once a record with
a priority was put), leaving delayed records to the schedule, and leasing
what was picked as range claims in the lease table.  ``_Group`` (in
``_group``) mixes this in; it runs inside the claim's write transaction of
the lease table (``vt``), with the group's index and cursors at hand.

Ordering: one cursor hands out records in log order; with priorities,
higher levels first, except that a level whose oldest waiting record has
waited ``priority_aging`` is served first (``_leases.level_order``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from logq import _format as F
from logq._index import Index, Scratch
from logq._leases import Claim, Lease, Ledger, level_order
from logq._options import MAX_PRIORITY
from logq._settled import _SCHED, _U64, _I64, _Skips, _be

if TYPE_CHECKING:
    from logq._group import GroupOptions
    from logq._queue import Queue

_ALL = 255                       # the cursor of a group that has seen no priorities
_SCAN_CHUNK = 1024


_Pick = tuple[Any, ...]  # (offset, payload, ts ns, priority, key)


class _Run(NamedTuple):
    """Consecutive plain records picked together."""
    start: int
    payloads: list[bytes]
    ts: list[int]


class _Chunk(NamedTuple):
    """Consecutive messages claimed together under one lease."""
    start: int
    payloads: list[bytes] | list[None]
    ts: list[int]
    lease: Lease


class FreshClaims:
    """The part of ``_Group`` that picks and leases new messages (see the
    module's docstring).  Needs from its host: ``scratch``, ``idx``,
    ``prefix``, ``q``, ``opts``, ``ledger`` and ``_priorities``."""

    scratch: Scratch
    idx: Index
    prefix: bytes
    q: Queue
    opts: GroupOptions
    ledger: Ledger
    owner: int
    _priorities: bool

    # -- new messages -------------------------------------------------------------
    def _fresh(self, vt: Any, n: int, cursors: dict[int, int], skip: "_Skips", tail: int,
               wall: int, deadline: int, with_payloads: bool) -> list[_Chunk]:
        """Up to ``n`` messages never delivered to this group, from its
        cursor; once a record with a priority has been put, from one cursor
        per level, higher levels first (aged ones before them)."""
        sc, p = self.scratch, self.prefix
        delayed: list[tuple[int, int]] = []
        picks: dict[int, list[Any]] = {}
        resume: dict[int, int] = {}
        order: list[int] = []
        if _ALL in cursors and self._priorities:
            vt.delete(p + bytes([_ALL]), db=sc.cursors)
            cursors = {lvl: cursors[_ALL] for lvl in range(MAX_PRIORITY + 1)}
        if _ALL in cursors:
            picks[_ALL], resume[_ALL], prio_at = self._scan(_ALL, cursors[_ALL], tail, n, wall,
                                                            skip, delayed, with_payloads)
            if prio_at is not None:
                # The first priority: from here on, one cursor per level,
                # all starting where this scan did.
                vt.delete(p + bytes([_ALL]), db=sc.cursors)
                cursors = {lvl: cursors[_ALL] for lvl in range(MAX_PRIORITY + 1)}
                picks, resume = {}, {}
                delayed.clear()
        if _ALL not in cursors:
            for lvl in range(MAX_PRIORITY + 1):
                picks[lvl], resume[lvl], _ = self._scan(lvl, cursors[lvl], tail, n, wall,
                                                        skip, delayed, with_payloads)
            heads = {lvl: ps[0][2] for lvl, ps in picks.items() if lvl != _ALL and ps}
            order += level_order(heads, wall, int(self.opts.priority_aging * 1e9))
            order += [lvl for lvl in range(MAX_PRIORITY + 1) if lvl not in order]
        if delayed:
            self._schedule_delayed(delayed)
        out: list[_Chunk] = []
        if _ALL in cursors:
            # One cursor: the scan stopped at n records; all of them go.
            cursors[_ALL] = resume[_ALL]
            out = self._lease_run(vt, picks[_ALL], deadline)
        for lvl in order:
            ps = picks[lvl]         # (tuples: level scans make no runs)
            take = min(n - sum(len(c.ts) for c in out), len(ps))
            if lvl in cursors:
                # Past what was taken; past the whole scan if all of it was.
                cursors[lvl] = ps[take][0] if take < len(ps) else resume[lvl]
            out += self._lease_run(vt, ps[:take], deadline)
        for lvl, c in cursors.items():
            vt.put(p + bytes([lvl]), _U64.pack(c), db=sc.cursors)
        return out

    def _scan(self, lvl: int, start: int, stop: int, n: int, wall: int, skip: "_Skips",
              delayed: list[tuple[int, int]], with_payloads: bool = True
              ) -> tuple[list["_Pick"], int, int | None]:
        """Scan [start, stop) for up to ``n`` deliverable records of
        priority ``lvl`` (of any, for _ALL).  Returns the picks, the offset
        to resume the scan at once all of them are taken, and (for _ALL)
        the offset of the first record with a priority, where it stops.
        Delayed records not yet due go to ``delayed`` instead."""
        picks: list[Any] = []
        count = 0
        off = start
        while off < stop and count < n:
            # (one cursor takes every record it scans: read no more than it needs)
            want = n - count if lvl == _ALL else _SCAN_CHUNK
            at, payloads, ts, attrs, metas = self.q._fetch(off, min(want, stop - off), with_payloads)
            if not attrs:
                break
            if payloads is None:
                payloads = [None] * len(attrs)     # type: ignore[list-item]  # (read by whoever runs them: the pool's workers)
            if lvl == _ALL and not skip and metas is None:
                # The common case: no meta, no priority, nothing to skip: a
                # run (start, payloads, timestamps), no tuple per record.
                take = min(n - count, len(attrs))
                picks.append(_Run(at, payloads[:take], ts[:take]))
                count += take
                off = at + take
                continue
            off = at + len(attrs)
            for i, a in enumerate(attrs):
                o = at + i
                if count >= n:
                    off = o
                    break
                prio = (a >> 16) & 0xFF
                if lvl == _ALL and prio:
                    return picks, o, o
                if (lvl != _ALL and prio != lvl) or o in skip:
                    continue
                key = None
                # (metas is None when no record of the chunk has a deliver-at
                # or a key: a put_many batch's head has a meta, its count, and
                # nothing to decode here.  This per-record path runs for a
                # plain chunk when a schedule entry lies ahead of the cursor.)
                if a & 0xFFFF and metas is not None:
                    due, key = F.decode_meta(a >> 24, metas[i])
                    if due is not None and due > wall:
                        delayed.append((due, o))
                        continue
                picks.append((o, payloads[i], ts[i], prio, key))
                count += 1
        return picks, off, None

    def _schedule_delayed(self, delayed: list[tuple[int, int]]) -> None:
        idx, p = self.idx, self.prefix

        def fn(txn: Any) -> None:
            for due, off in delayed:
                if txn.get(p + _be(off), db=idx.pending) is None:
                    txn.put(p + _be(due) + _be(off), _SCHED.pack(0), db=idx.sched)
                    txn.put(p + _be(off), _be(due), db=idx.pending)
        idx.write(fn)

    def _note_claims(self, vt: Any, deadline: int) -> None:
        """Keep the group's claim summary covering a claim made now."""
        sc, p = self.scratch, self.prefix
        raw = vt.get(p + b"D", db=sc.summary)
        if raw is None or _I64.unpack(raw)[0] > deadline:
            vt.put(p + b"D", _I64.pack(deadline), db=sc.summary)
        vt.put(p + b"O" + _be(self.owner), b"", db=sc.summary)

    def _lease_run(self, vt: Any, picks: list[Any], deadline: int) -> list[_Chunk]:
        """Range claims over runs of consecutive picks; their chunks (a
        plain run shares one lease; a pick with a key or a priority has its
        own)."""
        out: list[_Chunk] = []
        sc, p, put = self.scratch, self.prefix, vt.put
        i = 0
        while i < len(picks):
            if type(picks[i]) is _Run:
                start, payloads, ts = picks[i]
                i += 1
                end = start + len(ts)
                ms = [_Chunk(start, payloads, ts, Lease(1, deadline, start, group=self))]
            else:
                j = i + 1
                while j < len(picks) and type(picks[j]) is not _Run and picks[j][0] == picks[j - 1][0] + 1:
                    j += 1
                start, end = picks[i][0], picks[j - 1][0] + 1
                ms = [_Chunk(o, [d], [t], Lease(1, deadline, start, group=self, key=k, priority=pr))
                      for o, d, t, pr, k in picks[i:j]]
                i = j
            put(p + b"R" + _be(start), Claim(start, end, self.owner, deadline, 1).pack(), db=sc.claims)
            self.ledger.add_range(start, end, end - start)
            out += ms
        return out

"""Consumer groups: get, ack, nack, extend, commit; retries, dead letters,
delays and priorities, over the queue, the index and the lease table.

Where each piece of state lives, and why:

* **durable** (``index/``, fsynced on commit): a group's watermark, settled
  intervals above it, the schedule (retries and delayed messages, with
  their attempt counts and last errors), dead letters, counters.  This is
  what "acked and committed" means; it survives crashes and power cuts.
* **volatile** (``leases/``, never fsynced): claims (which process holds
  which offsets until when) and scan cursors.  Only live processes need
  them; a claim whose owner died is reaped at once (each process holds a
  flock on ``owners/<id>``; the kernel drops it when the process dies),
  and after a reboot the table is deleted and delivery resumes from the
  durable state.

Commit order (``_Group.commit``): the durable transaction (acks, nacks,
dead letters) first, then the volatile one that frees the claims.  A crash
in between leaves claims whose offsets are settled; reaping skips them.

Delivery guarantee: at least once.  A message acked and committed is never
delivered to that group again; one delivered and not committed (acks are
committed every ``commit_every`` acks or ``commit_interval`` seconds, or by
``commit()``) is delivered again after a crash.  An ack that arrives after
the message's lease ran out is still accepted, but the message may already
have gone to another consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any

from logq import _format as F
from logq import _owners
from logq._batch import Batch
from logq._errors import NotDeliveredError, OffsetError, QueueClosedError
from logq._fresh import _ALL, FreshClaims, _Chunk
from logq._handout import HandOut, Message
from logq._index import (G_ACKED, G_DEAD, G_DELIVERED, G_REDELIVERED, G_WATERMARK, GROUP,
                         K_PRIORITIES, _prefixed, open_scratch)
from logq._leases import (Claim, Lease, Ledger, Retry, Settlement, after_failure, runs)
from logq._options import _check_int, _check_seconds
from logq._queue import Queue
from logq._settled import (_DEAD, _ERROR_MAX, _I64, _I64_MAX, _SCHED, _U64, _Skips, _be,
                           _is_settled, _settle)

log = logging.getLogger("logq")

START = ("earliest", "latest")
_MAX_NAME = 200
_LATE_NS = 1_000_000_000  # an ack within this of its lease deadline checks for a redelivery
_OFFSET, _LEASE = attrgetter("offset"), attrgetter("_l")
_ATTEMPT = attrgetter("_l.attempt")


@dataclass(frozen=True)
class GroupOptions:
    """A consumer group's options, with their defaults.  They belong to the
    consumers of this process; the group's durable state does not record
    them (``start`` applies only when the group is created)."""
    visibility_timeout: float = 30.0   # a delivered message is leased for this long (s)
    max_attempts: int = 5              # deliveries before a message goes to the dead letters
    backoff_base: float = 1.0          # first retry within this many seconds...
    backoff_max: float = 300.0         # ...doubling up to this cap, with full jitter
    start: str = "earliest"            # a new group starts at the oldest message, or the end
    commit_every: int = 10_000         # commit acks after this many...
    commit_interval: float = 1.0       # ...or this many seconds, whichever first
    prefetch: int = 256                # most messages get() claims at once
    priority_aging: float = 60.0       # a message waiting this long is served before priorities (s)

    def __post_init__(self) -> None:
        _check_seconds("visibility_timeout", self.visibility_timeout)
        _check_int("max_attempts", self.max_attempts, 1, 1 << 30)
        _check_seconds("backoff_base", self.backoff_base)
        _check_seconds("backoff_max", self.backoff_max)
        _check_seconds("commit_interval", self.commit_interval)
        _check_seconds("priority_aging", self.priority_aging)
        _check_int("commit_every", self.commit_every, 1, 1 << 30)
        _check_int("prefetch", self.prefetch, 1, 1 << 20)
        if self.start not in START:
            raise ValueError(f"start must be 'earliest' or 'latest', not {self.start!r}")


@dataclass(frozen=True)
class DeadLetter:
    """A message that used up its attempts: its original ``offset``,
    ``data``, ``timestamp``, the ``attempts`` made, the last ``error`` text,
    and when it was dead-lettered (``dead_at``, epoch seconds)."""
    offset: int
    data: bytes
    timestamp: float
    attempts: int
    error: str
    dead_at: float


def _merge_runs(rs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged half-open runs."""
    out: list[list[int]] = []
    for a, b in sorted(rs):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _check_name(name: Any) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"a group name must be a str, not {type(name).__name__}")
    raw = name.encode()
    if not 0 < len(raw) <= _MAX_NAME or "\0" in name:
        raise ValueError(f"a group name must be 1 to {_MAX_NAME} bytes of UTF-8 without NUL, "
                         f"not {name!r}")
    return raw


class _Group(FreshClaims, HandOut):
    """One consumer group as seen by one Queue object: the ledger of
    messages out, the prefetch buffer, and the commit timer.  Consumer
    objects of the same group on the same Queue share it (and so compete
    for its messages)."""

    def __init__(self, q: Queue, name: str, opts: GroupOptions) -> None:
        self.q = q
        self.name = name
        self.prefix = _check_name(name) + b"\0"
        self.opts = opts
        self.idx = q._index
        self._create(opts.start)
        _owners.clear_dead(q.path)
        self.scratch = open_scratch(q.path, may_reset=False)
        try:
            self._owner = _owners.acquire(q.path, q.queue_id)
        except BaseException:
            self.scratch.close()
            raise
        self.owner = self._owner.id
        self.lock = threading.Lock()          # ledger, buffer, counters
        self.claiming = threading.Lock()      # one claim at a time per process
        self.committing = threading.Lock()    # one commit at a time per process
        self.posting = threading.Lock()       # a nack and its posted retry, against a commit
        self.ledger = Ledger()
        # Callables run in the transaction that commits the acks (nacks)
        # made with them (Consumer.ack/nack ``write=``), taken with them.
        self.ack_writes: list[Any] = []
        self.nack_writes: list[Any] = []
        self.buffer: deque[Message] = deque()
        self.delivered = 0                    # counted since the last commit
        self.redelivered = 0
        self.users = 0
        self.closed = False
        self.rate = 0.0                       # get() calls per second, smoothed
        self._last_claim = time.monotonic()
        self._gets = 0
        self._vt_ns = int(opts.visibility_timeout * 1e9)
        self._priorities = False              # a record with a priority exists
        self._timer_wake = threading.Condition(self.lock)
        self._timer = threading.Thread(target=self._commit_timer, daemon=True,
                                       name=f"logq-commit-{name}")
        self._timer.start()

    def _create(self, start: str) -> None:
        q = self.q
        if self.idx.get(self.prefix[:-1], self.idx.groups) is not None:
            return
        origin = q.first_offset if start == "earliest" else q.next_offset

        def fn(txn: Any) -> None:
            if txn.get(self.prefix[:-1], db=self.idx.groups) is None:
                txn.put(self.prefix[:-1], GROUP.pack(origin, 0, 0, 0, 0, 0), db=self.idx.groups)
        self.idx.write(fn)

    # -- claiming ---------------------------------------------------------------
    def claim(self, n: int) -> list[Message]:
        """Lease up to ``n`` deliverable messages to this process: due
        retries and delayed messages first, then new ones (by priority).
        Reaps expired claims and those of dead processes on the way."""
        with self.claiming:
            chunks = self._claim_chunks(n, True)
            out: list[Message] = []
            for start, payloads, ts, lease in chunks:
                if len(ts) == 1:
                    out.append(Message(start, payloads[0], ts[0], lease))  # type: ignore[arg-type]
                else:
                    out += map(Message, range(start, start + len(ts)), payloads, ts, repeat(lease))  # type: ignore[arg-type]
            with self.lock:
                self.ledger.deliver(out)  # type: ignore[arg-type]
            return out

    def take(self, n: int, payloads: bool) -> Batch | None:
        """Like ``claim``, as one Batch (None: nothing deliverable), counted
        as handed out; without the payloads unless ``payloads``."""
        with self.claiming:
            chunks = self._claim_chunks(n, payloads)
            if not chunks:
                return None
            b = Batch(chunks)
            with self.lock:
                self.ledger.deliver_batch(b)
                self.delivered += b.left
                self.redelivered += sum(len(c[2]) for c in chunks if c[3].attempt > 1)
            return b

    def _claim_chunks(self, n: int, payloads: bool) -> list[_Chunk]:
        if self.closed:
            raise QueueClosedError(f"the consumer of group {self.name!r} is closed")
        # One write transaction of the lease table: it serialises the
        # claimers of every process.
        return self.scratch.write(lambda vt: self._claim_in(vt, n, payloads))

    def _claim_in(self, vt: Any, n: int, with_payloads: bool) -> list[_Chunk]:
        sc, idx, p = self.scratch, self.idx, self.prefix
        now, wall = time.monotonic_ns(), time.time_ns()
        deadline = now + self._vt_ns
        self._reap(vt, now, wall)
        tail = self.q.next_offset
        cursors = {k[-1]: _U64.unpack(v)[0] for k, v in _prefixed(vt.cursor(db=sc.cursors), p)}
        retries = self._retries_due(vt, wall, n)

        def snapshot(txn: Any) -> tuple[int, bool, list[tuple[int, int, int]], _Skips]:
            # Everything this claim needs from the index, in one read.
            mark = GROUP.unpack(txn.get(p[:-1], db=idx.groups))[G_WATERMARK]
            prio = self._priorities or txn.get(K_PRIORITIES, db=idx.main) is not None
            for lvl, c in (cursors or {_ALL: mark}).items():
                if c > tail or c < mark:
                    c = mark    # the log was cut below it, or the group moved past it
                cursors[lvl] = c
            due = self._due(txn, vt, wall, n)
            if retries:
                # Retries not yet committed by their nacker, settled since
                # (acked by another consumer after a redelivery) are done.
                retries[:] = [r for r in retries if not _is_settled(txn, idx, p, mark, r[1])]
            return mark, prio, due, _Skips(txn, idx, p, min(cursors.values()), tail)
        mark, self._priorities, due, skip = idx.read(snapshot)
        out: list[_Chunk] = []
        # 1. the schedule: retries (posted or durable) and delayed messages that are due
        for due_ns, off, attempts in sorted(due + retries)[:n]:
            vt.delete(p + b"N" + _be(off), db=sc.claims)
            m = self._load_one(off, attempts + 1, deadline, due_ns)
            if m is None:
                continue
            vt.put(p + b"S" + _be(off), Claim(off, off + 1, self.owner, deadline, m.lease.attempt,
                                              due_ns).pack(), db=sc.claims)
            out.append(m)
        # 2. new messages, from the cursors
        if len(out) < n:
            out += self._fresh(vt, n - len(out), cursors, skip, tail, wall, deadline, with_payloads)
        if out:
            self._note_claims(vt, deadline)
        return out

    def _reap(self, vt: Any, now: int, wall: int) -> None:
        """Give back the claims that expired or whose owner died: each of
        their unsettled offsets is scheduled again (an expired lease with
        backoff from when it ran out; a dead owner's at once), or
        dead-lettered if it used its attempts.  A retry posted by a process
        that died before committing it goes the same way as the lease it
        replaced (at once, the attempt counted)."""
        sc, p = self.scratch, self.prefix
        earliest = vt.get(p + b"D", db=sc.summary)
        if earliest is None:
            return      # no claims
        owners = [int.from_bytes(k[-8:], "big") for k, _ in _prefixed(vt.cursor(db=sc.summary), p + b"O")]
        alive: dict[int, bool] = {o: o == self.owner or _owners.alive(self.q.path, o) for o in owners}
        if now < _I64.unpack(earliest)[0] and all(alive.values()):
            return      # nothing can have expired, and every holder lives
        doomed: list[tuple[bytes, Any, bool]] = []
        kept_deadline, kept_owners = None, set()
        for k, v in _prefixed(vt.cursor(db=sc.claims), p):
            retry = k[len(p):len(p) + 1] == b"N"
            c: Any = (Retry if retry else Claim).unpack(int.from_bytes(k[-8:], "big"), v)
            if c.owner not in alive:
                alive[c.owner] = _owners.alive(self.q.path, c.owner)
            if not alive[c.owner] or (not retry and c.deadline <= now):
                doomed.append((k, c, alive[c.owner]))
            else:
                # (a retry has no deadline: it keeps the summary present)
                d = _I64_MAX if retry else c.deadline
                kept_deadline = d if kept_deadline is None else min(kept_deadline, d)
                kept_owners.add(c.owner)
        # The summary, exact again.
        for o in owners:
            if o not in kept_owners:
                vt.delete(p + b"O" + _be(o), db=sc.summary)
        if kept_deadline is None:
            vt.delete(p + b"D", db=sc.summary)
        else:
            vt.put(p + b"D", _I64.pack(kept_deadline), db=sc.summary)
        if not doomed:
            return
        # Offsets with a claim or a retry of their own: a range reaped
        # around them leaves them to it.
        singles = {int.from_bytes(k[-8:], "big") for k, _ in _prefixed(vt.cursor(db=sc.claims), p + b"S")}
        singles.update(int.from_bytes(k[-8:], "big") for k, _ in _prefixed(vt.cursor(db=sc.claims), p + b"N"))
        expired: list[tuple[int, int, int, int | None]] = []    # (offset, attempt, from due, due)
        died: list[tuple[int, int, int, int | None]] = []
        for k, c, owner_alive in doomed:
            kind = k[len(p):len(p) + 1]
            if not owner_alive:
                at_once = self._due_after(c.attempts if kind == b"N" else c.attempt, wall, 0.0)
                if kind == b"N":
                    died.append((c.offset, c.attempts, c.from_due, at_once))
                elif kind == b"S":
                    died.append((c.start, c.attempt, c.due, at_once))
                else:
                    died += [(o, c.attempt, 0, at_once) for o in range(c.start, c.end) if o not in singles]
                continue
            # The backoff runs from when the lease ran out, not from now.
            due = self._due_after(c.attempt, wall - max(0, now - c.deadline), None)
            if kind == b"S":
                expired.append((c.start, c.attempt, c.due, due))
            else:
                expired += [(o, c.attempt, 0, due) for o in range(c.start, c.end) if o not in singles]
        self._fail(expired, wall, "lease expired", None)
        self._fail(died, wall, "the consumer process holding it died", None)
        for k, c, _ in doomed:
            vt.delete(k, db=sc.claims)
        log.info("queue %s group %r: %d lease(s) reaped (%d expired, %d of dead processes)",
                 self.q.path, self.name, len(doomed), len(expired), len(died))

    def _due_after(self, attempt: int, base: int, delay: float | None) -> int | None:
        """When a delivery ``attempt`` that failed at ``base`` (wall ns) is
        due again: after ``delay`` seconds, or the backoff when None; None
        when it used its attempts (dead letter)."""
        o = self.opts
        after = after_failure(attempt, max_attempts=o.max_attempts, backoff_base=o.backoff_base,
                              backoff_max=o.backoff_max, delay=delay)
        return None if after is None else base + int(after * 1e9)

    def _fail(self, items: list[tuple[int, int, int, int | None]], wall: int, default_error: str,
              errors: dict[int, str | None] | None, writes: list[Any] = ()) -> None:  # type: ignore[assignment]
        """Schedule or dead-letter failed deliveries (offset, attempt, the
        due of the schedule entry it came from or 0, when it is due again
        in wall ns or None for the dead letters) in one durable
        transaction.  Offsets already settled are skipped; an offset with a
        schedule entry made since keeps it.  ``writes`` (the nacks' write
        hooks) run in the same transaction."""
        if not items:
            return
        idx, p = self.idx, self.prefix
        dead: list[tuple[int, int, str]] = []
        # Payloads of what may be dead-lettered, read now: the log is not
        # read inside an index transaction (lock order: queue, then index).
        bodies = {off: self._body(off) for off, _a, _d, due in items if due is None}

        def fn(txn: Any) -> None:
            dead.clear()
            g = list(GROUP.unpack(txn.get(p[:-1], db=idx.groups)))
            for off, attempt, from_due, due in items:
                if _is_settled(txn, idx, p, g[G_WATERMARK], off):
                    continue
                pend = txn.get(p + _be(off), db=idx.pending)
                if pend is not None and int.from_bytes(pend, "big") != from_due:
                    continue    # nacked and scheduled since: that entry rules
                error = (errors or {}).get(off)
                error = error if error is not None else default_error
                if pend is not None:
                    txn.delete(p + pend + _be(off), db=idx.sched)
                if due is None:
                    txn.delete(p + _be(off), db=idx.pending)
                    dead.append((off, attempt, error))
                    continue
                txn.put(p + _be(due) + _be(off), _SCHED.pack(attempt) + error.encode()[:_ERROR_MAX],
                        db=idx.sched)
                txn.put(p + _be(off), _be(due), db=idx.pending)
            if dead:
                self._bury(txn, g, dead, wall, bodies)
            for w in writes:
                w(txn)
            txn.put(p[:-1], GROUP.pack(*g), db=idx.groups)
        idx.write(fn)
        for off, attempt, error in dead:
            log.warning("queue %s group %r: message %d dead-lettered after %d attempt(s): %s",
                        self.q.path, self.name, off, attempt, error)

    def _body(self, off: int) -> tuple[bytes, int] | None:
        """(payload, timestamp) of the record at ``off``, or None if it is
        gone (dropped by max_bytes, or lost to damage)."""
        try:
            at, payloads, ts, _attrs, _m = self.q._fetch(off, 1)
        except OffsetError:
            return None
        return (payloads[0], ts[0]) if at == off and payloads else None

    def _bury(self, txn: Any, g: list[int], dead: list[tuple[int, int, str]], wall: int,
              bodies: dict[int, tuple[bytes, int] | None]) -> None:
        """Move messages to the dead letters (with a copy of each payload)
        and settle them."""
        idx, p = self.idx, self.prefix
        for off, attempt, error in dead:
            body = bodies.get(off)
            if body is None:
                continue    # the record is gone: nothing to keep
            err = error.encode()[:_ERROR_MAX]
            txn.put(p + _be(off), _DEAD.pack(attempt, wall, body[1], len(err)) + err + body[0],
                    db=idx.dead)
            g[G_DEAD] += 1
        _settle(txn, idx, p, g, [(off, off + 1) for off, _a, _e in dead])

    def _due(self, txn: Any, vt: Any, wall: int, n: int) -> list[tuple[int, int, int]]:
        """Up to ``n`` schedule entries due by ``wall`` that no live
        process holds and no posted retry overrides: (due, offset,
        deliveries so far)."""
        p, sc = self.prefix, self.scratch
        out: list[tuple[int, int, int]] = []
        for k, v in _prefixed(txn.cursor(db=self.idx.sched), p):
            due = int.from_bytes(k[-16:-8], "big")
            if due > wall or len(out) >= n:
                break
            off = int.from_bytes(k[-8:], "big")
            if vt.get(p + b"S" + _be(off), db=sc.claims) is None and \
                    vt.get(p + b"N" + _be(off), db=sc.claims) is None:
                out.append((due, off, _SCHED.unpack_from(v)[0]))
        return out

    def _retries_due(self, vt: Any, wall: int, n: int) -> list[tuple[int, int, int]]:
        """Up to ``n`` posted retries due by ``wall`` (earliest first) that
        no live process holds: (due, offset, deliveries so far)."""
        p, sc = self.prefix, self.scratch
        out = []
        for k, v in _prefixed(vt.cursor(db=sc.claims), p + b"N"):
            r = Retry.unpack(int.from_bytes(k[-8:], "big"), v)
            if r.due <= wall and vt.get(p + b"S" + _be(r.offset), db=sc.claims) is None:
                out.append((r.due, r.offset, r.attempts))
        out.sort()
        return out[:n]

    def next_due(self) -> int | None:
        """The earliest time (wall ns) a retry or delayed message is due,
        durable or posted, or None."""
        def fn(txn: Any) -> int | None:
            for k, _ in _prefixed(txn.cursor(db=self.idx.sched), self.prefix):
                return int.from_bytes(k[-16:-8], "big")
            return None
        durable = self.idx.read(fn)

        def posted(vt: Any) -> int | None:
            dues = [Retry.unpack(0, v).due for _k, v in _prefixed(vt.cursor(db=self.scratch.claims),
                                                                    self.prefix + b"N")]
            return min(dues) if dues else None
        retry = self.scratch.read(posted)
        return min((d for d in (durable, retry) if d is not None), default=None)

    def _load_one(self, off: int, attempt: int, deadline: int, due: int) -> _Chunk | None:
        try:
            at, payloads, ts, attrs, metas = self.q._fetch(off, 1)
        except OffsetError:
            at, payloads = -1, []
        if at != off or not payloads:
            # Dropped (max_bytes) or lost to damage since it was scheduled.
            self._forget_scheduled(off, due)
            return None
        _deliver_at, key = F.decode_meta(attrs[0] >> 24, metas[0]) if metas and 0 in metas else (None, None)
        return _Chunk(off, payloads[:1], ts[:1], Lease(attempt, deadline, -1, due, True, self, key,
                                                       (attrs[0] >> 16) & 0xFF))

    def _forget_scheduled(self, off: int, due: int) -> None:
        idx, p = self.idx, self.prefix

        def fn(txn: Any) -> None:
            txn.delete(p + _be(due) + _be(off), db=idx.sched)
            txn.delete(p + _be(off), db=idx.pending)
            g = list(GROUP.unpack(txn.get(p[:-1], db=idx.groups)))
            _settle(txn, idx, p, g, [(off, off + 1)])
            txn.put(p[:-1], GROUP.pack(*g), db=idx.groups)
        idx.write(fn)
        log.warning("queue %s group %r: scheduled message %d is no longer in the log",
                    self.q.path, self.name, off)

    def commit(self) -> None:
        """Make every ack and nack so far durable (one transaction).  Commits
        run one at a time: a commit that found nothing to take must still
        wait for one in flight (the timer's, or another thread's) to be
        durable before it returns."""
        with self.committing:
            self._commit()

    def nack(self, m: Message, delay: float | None, error: str | None, write: Any = None,
             bury: bool = False) -> None:
        """``m`` failed: due again ``delay`` seconds from now (the backoff
        when None), or dead-lettered if it used its attempts (or ``bury``).  The retry is
        posted in the lease table at once, where every live process of the
        group sees it; the durable record follows at the next commit (until
        then, a crash of this process redelivers ``m`` at once, the attempt
        counted, like any lease of a dead process)."""
        due = None if bury else self._due_after(m.attempt, time.time_ns(), delay)
        with self.posting:
            with self.lock:
                self.ledger.nack(m, due, error)
                if write is not None:
                    self.nack_writes.append(write)
                full = self.ledger.pending() >= self.opts.commit_every
            if due is not None:
                self._post_retry(m, due)
        if due is not None:
            self.q._poke()
        if full:
            self.commit()

    def _post_retry(self, m: Message, due: int) -> None:
        sc, p, off = self.scratch, self.prefix, m.offset

        def fn(vt: Any) -> None:
            vt.put(p + b"N" + _be(off), Retry(off, self.owner, due, m.attempt, m.due).pack(), db=sc.claims)
            if m.single:
                # Our own claim on it goes: the retry decides when it is due.
                raw = vt.get(p + b"S" + _be(off), db=sc.claims)
                if raw is not None and Claim.unpack(off, raw).owner == self.owner:
                    vt.delete(p + b"S" + _be(off), db=sc.claims)
            self._note_claims(vt, _I64_MAX)
        sc.write(fn)

    def _commit(self) -> None:
        with self.posting, self.lock:
            s = self.ledger.take()
            ack_writes, nack_writes = self.ack_writes, self.nack_writes
            self.ack_writes, self.nack_writes = [], []
            delivered, redelivered = self.delivered, self.redelivered
            self.delivered = self.redelivered = 0
        if not s.acks and not s.nacks and not s.runs and not delivered:
            return
        idx, p = self.idx, self.prefix
        now, wall = time.monotonic_ns(), time.time_ns()
        special = {id(lease) for lease in set(map(_LEASE, s.acks)) if lease.single or now > lease.deadline - _LATE_NS}
        # (offset, single) of the acks that may have a schedule entry
        check = [(d.offset, d.single) for d in s.acks if id(d._l) in special] if special else []
        settled = runs(map(_OFFSET, s.acks)) if s.acks else []
        if s.runs:
            for a, b, lease in s.runs:
                if lease.single or now > lease.deadline - _LATE_NS:
                    check += [(o, lease.single) for o in range(a, b)]
            settled = _merge_runs(settled + [(a, b) for a, b, _lease in s.runs])
        acked = s.count()
        acks_durable = False
        try:
            def fn(txn: Any) -> None:
                g = list(GROUP.unpack(txn.get(p[:-1], db=idx.groups)))
                g[G_DELIVERED] += delivered
                g[G_REDELIVERED] += redelivered
                g[G_ACKED] += acked
                # Only a message delivered from the schedule (``single``) or
                # acked late may have a schedule entry: it came from one, or
                # was reaped (and scheduled again) after its lease ran out.
                # (Checked per lease: a batch shares one.)
                for off, _single in check:
                    pend = txn.get(p + _be(off), db=idx.pending)
                    if pend is not None:
                        txn.delete(p + pend + _be(off), db=idx.sched)
                        txn.delete(p + _be(off), db=idx.pending)
                _settle(txn, idx, p, g, settled)
                # Write hooks, in the transaction of their own settlement:
                # an ack's here, a nack's in _fail's (one each, in order).
                for w in ack_writes:
                    w(txn)
                txn.put(p[:-1], GROUP.pack(*g), db=idx.groups)
            if s.acks or s.runs or delivered or ack_writes:
                idx.write(fn)
            acks_durable = True
            if s.nacks:
                self._fail([(d.offset, d.attempt, d.due, due) for d, due, _e in s.nacks], wall,
                           "nacked", {d.offset: e for d, _due, e in s.nacks}, nack_writes)
        except BaseException:
            with self.lock:
                if acks_durable:
                    # The acks, the counters and the acks' write hooks are
                    # committed: only the nacks go back (run again, the acks'
                    # hooks would record their outcomes twice).
                    self.ledger.restore(Settlement([], s.nacks, []))
                    self.ledger.settled(Settlement(s.acks, [], s.runs))
                else:
                    self.ledger.restore(s)
                    self.ack_writes[:0] = ack_writes
                    self.delivered += delivered
                    self.redelivered += redelivered
                self.nack_writes[:0] = nack_writes
            raise
        with self.lock:
            done = self.ledger.settled(s)
        # (A retried single gave up its claim when the retry was posted; the
        # posted retry goes now that the durable schedule has it.)
        self._free_claims(done, [off for off, single in check if single] +
                          [d.offset for d, due, _e in s.nacks if d.single and due is None],
                          [(d.offset, due) for d, due, _e in s.nacks if due is not None])
        if s.nacks or ack_writes:
            self.q._poke()      # (consumers look again: something was scheduled)
        if ack_writes or nack_writes:
            self.q._bump_written()  # whoever waits for what a hook wrote looks again

    def _free_claims(self, ranges: list[int], singles: list[int],
                     retries: list[tuple[int, int]] = ()) -> None:  # type: ignore[assignment]
        """Delete claims whose messages are all settled or given back, and
        the posted retries (offset, due) now in the durable schedule; only
        this process's own (one reaped after its lease ran out may be
        another consumer's now).  (A range claim never hides a schedule
        entry: a message nacked out of a live range is delivered from the
        schedule, and reaping the range skips it.)"""
        if not ranges and not singles and not retries:
            return
        sc, p, me = self.scratch, self.prefix, self.owner

        def fn(vt: Any) -> None:
            for key in [p + b"R" + _be(start) for start in ranges] + [p + b"S" + _be(o) for o in singles]:
                raw = vt.get(key, db=sc.claims)
                if raw is not None and Claim.unpack(0, raw).owner == me:
                    vt.delete(key, db=sc.claims)
            for off, due in retries:
                raw = vt.get(p + b"N" + _be(off), db=sc.claims)
                if raw is not None:
                    r = Retry.unpack(off, raw)
                    if r.owner == me and r.due == due:
                        vt.delete(p + b"N" + _be(off), db=sc.claims)
        sc.write(fn)

    def extend(self, m: Message, seconds: float) -> None:
        _check_seconds("seconds", seconds)
        deadline = time.monotonic_ns() + int(seconds * 1e9)
        with self.lock:
            if self.ledger.out.get(m.offset) is not m:
                self.ledger._take(m)            # raises, naming it
        sc, p, off = self.scratch, self.prefix, m.offset

        def fn(vt: Any) -> bool:
            # Only a lease this process still holds is extended: one reaped
            # after it ran out may be another consumer's by now.
            raw = vt.get(p + b"S" + _be(off), db=sc.claims)
            if raw is not None:
                c = Claim.unpack(off, raw)
                if c.owner != self.owner or c.attempt != m.attempt:
                    return False
            elif m.single:
                return False
            else:
                raw = vt.get(p + b"R" + _be(m.range_start), db=sc.claims)
                if raw is None:
                    return False
                c = Claim.unpack(m.range_start, raw)
                if c.owner != self.owner or not c.start <= off < c.end:
                    return False
            claim = Claim(off, off + 1, self.owner, max(m.deadline, deadline), m.attempt, m.due)
            vt.put(p + b"S" + _be(off), claim.pack(), db=sc.claims)
            return True
        if not sc.write(fn):
            raise NotDeliveredError(f"the lease on message {off} ran out and was given back to the "
                                    f"group {self.name!r} (it may be out with another consumer): it "
                                    "cannot be extended; an ack is still accepted")
        with self.lock:
            self.ledger.extend(m, deadline)

    def give_back(self, ms: list[Message]) -> None:
        """Return messages out with this process unprocessed: delivered
        again at once, their attempt not counted.  Raises NotDeliveredError
        (changing nothing) if one is not out."""
        with self.lock:
            for m in ms:
                if self.ledger.out.get(m.offset) is not m:
                    self.ledger._take(m)     # raises, naming it
        self._reschedule(ms)
        self._forget(ms)

    def _reschedule(self, ms: list[Message]) -> None:
        """Schedule ``ms`` for now, as they were (durably, before their
        claims may go)."""
        fresh = [m.offset for m in ms if not m.due]     # (the others keep their schedule entry)
        if not fresh:
            return
        wall = time.time_ns()
        idx, p = self.idx, self.prefix

        def fn(txn: Any) -> None:
            for off in fresh:
                if txn.get(p + _be(off), db=idx.pending) is None:
                    txn.put(p + _be(wall) + _be(off), _SCHED.pack(0), db=idx.sched)
                    txn.put(p + _be(off), _be(wall), db=idx.pending)
        idx.write(fn)

    def _forget(self, ms: list[Message]) -> None:
        """Take ``ms`` (settled or scheduled durably by now) out of the
        ledger, and delete the claims nothing is left under."""
        with self.lock:
            done = [start for start in map(self.ledger.forget, ms) if start is not None]
        self._free_claims(done, [m.offset for m in ms if m.single])
        self.q._poke()

    def detach(self, b: Batch, idxs: list[int] | None) -> list[Message]:
        """Deliveries of a batch as Messages of their own (to nack, give
        back or extend them one by one); raises NotDeliveredError
        (changing nothing) if one is not out."""
        with self.lock:
            return self.ledger.detach(b, idxs, lambda i, off, lease: Message(  # type: ignore[return-value]
                off, b.payload(i), b.timestamp_ns(i), lease))  # type: ignore[arg-type]

    def release(self) -> None:
        """Give back what this process holds: buffered messages not handed
        out yet (as ``give_back``) and messages out and not settled (a
        failed attempt: delivered again at once, or dead-lettered)."""
        with self.lock:
            self.ledger.detach_all(lambda b, i, off, lease: Message(
                off, b.payload(i), b.timestamp_ns(i), lease))  # type: ignore[attr-defined]
            buffered = list(self.buffer)
            self.buffer.clear()
            out = list(self.ledger.out.values())
        if not out:
            return
        held = {id(m) for m in buffered}
        wall = time.time_ns()
        self._fail([(m.offset, m.attempt, m.due, self._due_after(m.attempt, wall, 0.0))
                    for m in out if id(m) not in held],
                   wall, "its consumer closed before settling it", None)
        self._reschedule(buffered)
        self._forget(out)  # type: ignore[arg-type]

    def _commit_timer(self) -> None:
        while True:
            with self.lock:
                self._timer_wake.wait(self.opts.commit_interval)
                if self.closed:
                    return
                pending = self.ledger.pending() or self.delivered
            if pending:
                try:
                    self.commit()
                except QueueClosedError:
                    return
                except Exception:
                    log.exception("queue %s group %r: a timed commit failed", self.q.path, self.name)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.commit()
            self.release()
        finally:
            with self.lock:
                self.closed = True
                self._timer_wake.notify_all()
            if self._timer is not threading.current_thread():
                self._timer.join()
            self.scratch.close()
            _owners.release(self._owner)

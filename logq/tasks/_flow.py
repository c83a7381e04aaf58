"""Flow control of running tasks: ``concurrency``, ``rate_limit`` and
``serialize_by``, applied where the pool dispatches (the ``Gate``).

Where the decision is made, and why there.  The pool's parent process
takes messages from the queue and sends them to its workers; with limits
configured it takes them through a :class:`Gate`, which passes on at once
the messages no limit holds back and *holds* the others (still leased to
this pool, in memory, in queue order) until they may start.  So:

* a task type at its limit never blocks the types behind it: the gate
  keeps taking messages past the held ones (up to ``_HOLD_MAX`` held);
* a held task spends nothing: no attempt is counted, no retry is posted,
  nothing is written to the queue; its status stays ``queued``;
* the hot path is untouched: an app without limits gets no gate, and a
  batch without a limited task in it passes the gate as it came.

The decision itself is ``_limits.pick_next`` over the held candidates, on
state shared by every pool of the queue directory, in its lease table (the
volatile LMDB environment ``leases/``, database ``tasks.flow``), read and
written in one write transaction per decision, which serialises the pools:

* ``r`` owner offset -> name and key: a task this pool started and has
  not settled.  Counted against its name's ``concurrency``; its key (if
  any) is busy.  Deleted when the pool settles the task (ack or nack: the
  delivery is no longer out), gives it back, or stops;
* ``w`` key offset -> owner: a held task with a ``serialize_by`` key.  A
  pool does not start a task of a key while another live pool holds an
  earlier task of that key (order across pools);
* ``b`` name -> (tokens, updated): the token bucket of a rate-limited name
  (on the system-wide monotonic clock; the table does not outlive a boot).

How it dispatches: a limited task goes in a batch of its own, only to a
worker with nothing out (``ready``), so it starts when it is let through
instead of waiting behind another batch while it counts; one counted task
per batch (``pick_next(counted_capacity=1)``: a batch runs on one worker,
one message after another).  Unlimited tasks held beside limited ones go in
the next batch, to any worker.  A decision looks only at what one pick
could start (of each key its earliest, of each name its first ``n``), and
is made on a take after a release, a due token, a pick that used capacity,
new messages, or every ``_LOOK`` while another pool holds slots or keys.

Crash safety: records name their owner, the process's id in ``owners/``
(the kernel drops its flock when the process dies); records of a dead
owner are deleted by the next decision of any pool, so a SIGKILLed pool
never holds a slot or a key for long.  A SIGKILLed *worker* settles its
task as failed (the pool's), which releases the slot at once.  What a pool
held dies with it like any message it had claimed: delivered again, the
attempt counted (the group's rule for a dead consumer), although it never
ran.

Promises (with ``N`` = ``concurrency``): at most N tasks of a name are out
with workers at once, summed over every pool of the directory (a task
counts from its dispatch to its settlement); at most ``burst + rate * T``
tasks of a name are dispatched in any window of ``T`` seconds (``burst`` =
``max(1, rate * 50 ms)``; a start follows its dispatch by the worker's
latency: a worker still starting up can bunch them); tasks sharing a key
never run at once, and start in offset (submission) order -- within a pool
always, across pools except for two claims racing within microseconds.  A
task waiting for its retry (backoff) does not hold its key.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import inspect
import json
import logging
import math
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from logq import _owners
from logq._batch import Batch
from logq.tasks._limits import Candidate, Limits, LimitsState, counted, pick_next
from logq.tasks._records import MAGIC, decode_task

log = logging.getLogger("logq")

_HOLD_MAX = 10_000       # messages held at most; past it, the gate stops taking (HOL again)
_LOOK = 0.05             # while holding, look at the other pools' slots this often (s)
_BURST_SECONDS = 0.05    # a rate's default burst: what it lets through in this long (>= 1)
_BUCKET = struct.Struct("<dd")
_OWNER = struct.Struct(">Q")


# -- per task ------------------------------------------------------------------------
def task_limits(opts: Any) -> Limits | None:
    """The ``Limits`` of a task's options, or None when it has none (a
    ``ValueError`` for a bad ``concurrency`` or ``rate_limit``)."""
    if opts.concurrency is None and opts.rate_limit is None:
        return None
    if opts.rate_limit is not None:
        from logq.tasks._limits import parse_rate
        rate = parse_rate(opts.rate_limit)
        burst = max(1.0, math.floor(rate.per_second * _BURST_SECONDS))
        return Limits(opts.concurrency, rate, burst)
    return Limits(opts.concurrency)


def check_serialize_by(fn: Callable[..., Any], by: Any) -> None:
    """``serialize_by`` is None, the name of one of ``fn``'s parameters, or
    a callable taking the task's arguments; else a ValueError/TypeError."""
    if by is None or callable(by):
        return
    if not isinstance(by, str):
        raise TypeError(f"serialize_by is an argument name or a callable, not {type(by).__name__}")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if by not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"serialize_by={by!r}: {fn.__qualname__} has no parameter {by!r} "
                         f"(it has {list(params)})")


def serialize_key(task: Any, args: Any, kwargs: Any) -> bytes | None:
    """The ``serialize_by`` key of a submission of ``task`` (16 bytes,
    scoped by the task's name), or None when the task has none.  Raises
    TypeError when the argument is missing or the key function fails (the
    submission is refused: nothing is stored)."""
    by = task.options.serialize_by
    if by is None:
        return None
    if callable(by):
        try:
            value = by(*args, **kwargs)
        except Exception as e:
            raise TypeError(f"serialize_by of task {task.name} failed on its arguments: "
                            f"{type(e).__name__}: {e}") from e
    else:
        try:
            bound = inspect.signature(task.fn).bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"task {task.name}: {e}") from None
        bound.apply_defaults()
        if by in bound.arguments:
            value = bound.arguments[by]
        else:
            value = bound.kwargs.get(by, bound.arguments.get("kwargs", {}).get(by))
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.blake2b(f"{task.name}\0{text}".encode(), digest_size=16).digest()


def _name_of(data: Any) -> bytes | None:
    """The task name of a task record, without decoding the rest."""
    if data is None or len(data) < 9 or data[:2] != MAGIC:
        return None
    return bytes(data[9:9 + data[6]])


# -- the gate --------------------------------------------------------------------------
@dataclass
class _Held:
    msg: Any
    cand: Candidate


class Gate:
    """The pool's dispatch filter for an app with limits (module
    docstring).  Used by one pool (``WorkerPool(gate=...)``), from its
    loop's thread only."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.limits: dict[str, Limits] = {}
        self.keyed: set[str] = set()
        for name, t in app._tasks.items():
            lim = task_limits(t.options)
            if lim is not None:
                self.limits[name] = lim
            if t.options.serialize_by is not None:
                self.keyed.add(name)
        self.gated = {n.encode() for n in set(self.limits) | self.keyed}
        self.held: list[_Held] = []          # in offset order
        self.fresh: list[_Held] = []         # held since the last full look
        self.slots: dict[int, tuple[Batch, int]] = {}   # offset -> where it went (r records)
        self.waiting: set[int] = set()       # offsets with a w record
        self._owner: int | None = None
        self._sc: Any = None
        self._db: Any = None
        self._wake = math.inf                # a held task's token is due (monotonic)
        self._look = 0.0                     # the next full look (monotonic)
        self._extend_at = 0.0                # the next look at held leases (monotonic)
        self._dirty = False

    # -- the pool's protocol ----------------------------------------------------------
    def take(self, c: Any, n: int, timeout: float | None, payloads: bool,
             ready: bool = True) -> Batch | None:
        """Up to ``n`` messages that may start now, as a Batch (or None once
        ``timeout`` seconds passed: None waits forever).  Takes from the
        consumer ``c`` as ``Consumer._take`` does; holds what may not
        start.  A limited task goes only in a batch for a ``ready`` worker
        (one with nothing out): it starts when it is let through, instead
        of waiting behind another batch while it counts against its limit."""
        self._open(c)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self._sweep(c)
            left = None if end is None else max(0.0, end - time.monotonic())
            if self.held:
                out = self._dispatch(c, n) if ready else self._unlimited(c, n)
                if out is not None:
                    return out
                nap = self.nap(_LOOK)
                left = nap if left is None else min(left, nap)
            if len(self.held) >= _HOLD_MAX:
                if end is not None and time.monotonic() >= end:
                    return None
                time.sleep(left or 0.0)
                continue
            b = c._take(n, left, payloads)
            if len(b):
                if not self._limited(b):
                    return b            # nothing limited in it: as it came (no order to keep
                                        # with what is held: an unlimited task has no key)
                self._hold(c, b)
                continue
            if end is not None and time.monotonic() >= end:
                return None

    def holding(self) -> int:
        """How many messages wait here for a limit."""
        return len(self.held)

    def nap(self, longest: float) -> float:
        """How long the pool may wait for its workers before the gate has
        something to look at again (at most ``longest``)."""
        if not self.held:
            return longest
        now = time.monotonic()
        return max(0.0, min(longest, self._wake - now, self._look - now))

    def close(self, c: Any) -> None:
        """Give back what is held (delivered again at once, no attempt
        counted) and delete this pool's records."""
        if self._sc is None:
            return
        held = [h.msg for h in self.held]
        self.held, self.fresh = [], []
        if held:
            try:
                c.give_back(held)
            except Exception:
                log.exception("logq tasks gate: giving back %d held message(s) failed", len(held))
        me, db = _OWNER.pack(self._owner or 0), self._db

        def fn(vt: Any) -> None:
            for off in self.slots:
                vt.delete(b"r" + me + _OWNER.pack(off), db=db)
            for k, v in list(vt.cursor(db=db).iternext()):
                if k[:1] == b"w" and bytes(v) == me:
                    vt.delete(k, db=db)
        try:
            self._sc.write(fn)
        finally:
            self.slots.clear()
            self.waiting.clear()
            self._sc.close()
            self._sc = None

    # -- inside -------------------------------------------------------------------
    def _open(self, c: Any) -> None:
        if self._sc is None:
            from logq._index import open_scratch
            self._sc = open_scratch(c.queue.path, may_reset=False)
            self._db = self._sc.open_db(b"tasks.flow")   # not env.open_db: see _Env.open_db
            self._owner = c._g.owner
            self._path = c.queue.path

    def _limited(self, b: Batch) -> bool:
        gated = self.gated
        return any(_name_of(p) in gated for p in b.payloads or ())

    def _hold(self, c: Any, b: Batch) -> None:
        """Hold every message of ``b`` (those no limit holds back go with
        the next decision)."""
        for m in c._g.detach(b, None):
            name = _name_of(m.data)
            text = name.decode(errors="replace") if name is not None else ""
            key = None
            if text in self.keyed:
                key = self._key_of(text, m)
            h = _Held(m, Candidate(m.offset, text, key, m.priority))
            bisect.insort(self.held, h, key=lambda x: x.cand.id)  # type: ignore[type-var]
            self.fresh.append(h)

    def _key_of(self, name: str, m: Any) -> bytes | None:
        task = self.app._tasks[name]
        try:
            rec = decode_task(m.data)
            args, kwargs = self.app._serializer(rec.serializer).loads(rec.args)  # type: ignore[union-attr]
            return serialize_key(task, args, kwargs)
        except Exception as e:
            # (Checked at submission: only a record of another app version gets here.)
            log.warning("logq tasks: task at offset %d: no serialize_by key (%s): runs unserialized",
                        m.offset, e)
            return None

    def _sweep(self, c: Any) -> None:
        """Release the slots of tasks no longer out (settled, given back)."""
        if not self.slots:
            return
        g = c._g
        done = []
        with g.lock:
            led = g.ledger
            for off, (b, i) in self.slots.items():
                if b.open[i] and led.batches.get(id(b)) is b:
                    continue
                d = b.detached.get(i)
                if d is not None and led.out.get(d.offset) is d:
                    continue
                done.append(off)
        if not done:
            return
        me, db = _OWNER.pack(self._owner or 0), self._db

        def fn(vt: Any) -> None:
            for off in done:
                vt.delete(b"r" + me + _OWNER.pack(off), db=db)
        self._sc.write(fn)
        for off in done:
            del self.slots[off]
        self._dirty = True

    def _dispatch(self, c: Any, n: int) -> Batch | None:
        """Decide which held messages start now; them as a Batch, or None."""
        now = time.monotonic()
        full = self._dirty or now >= self._wake or now >= self._look
        if not full and not self.fresh:
            return None
        if full:
            cands = _eligible(self.held, n)
            busy: set[bytes] = set()
            if now >= self._extend_at:
                self._extend_leases(c)
        else:
            # Only the newly held: the others wait for a release or a time
            # (so their keys stay busy for the new ones behind them).
            fresh = {id(h) for h in self.fresh}
            cands = _eligible(self.fresh, n)
            busy = {h.cand.key for h in self.held if id(h) not in fresh and h.cand.key is not None}  # type: ignore[misc]
        self.fresh = []
        self._dirty = False
        if full:
            self._wake = math.inf
        pick, waits, foreign = self._sc.write(lambda vt: self._decide(vt, cands, set(busy), n, now))
        self.waiting.update(waits)
        if full or foreign:
            # Another pool's slots are released where this one cannot see:
            # look again soon; without any, only a release here (or a
            # token) can change the decision.
            self._look = now + _LOOK if foreign else math.inf
        if pick.wake_at is not None:
            self._wake = min(self._wake, pick.wake_at)
        if not pick.start:
            return None
        go = pick.start
        limited = [cd for cd in go if cd.key is not None or cd.name in self.limits]
        if limited and len(limited) < len(go):
            # Limited tasks in a batch of their own: unlimited ones queued
            # behind a slow limited one in a worker would wait for it.  (They
            # stay held, costing nothing: the next take sends them.)
            go = tuple(limited)
        started = {cd.id for cd in go}
        msgs = [h.msg for h in self.held if h.cand.id in started]
        self.held = [h for h in self.held if h.cand.id not in started]
        # Capacity was used: the candidates left out of this pick (or that
        # waited for capacity) are worth a look at the next take.
        self._dirty = bool(self.held)
        for off in started:
            self.waiting.discard(off)
        b = _as_batch(c, msgs)
        by_id = {cd.id: cd for cd in go}
        for i, m in enumerate(msgs):
            if self._needs_slot(by_id[m.offset]):
                self.slots[m.offset] = (b, i)
        return b

    def _unlimited(self, c: Any, n: int) -> Batch | None:
        """Held messages no limit applies to (they came in a batch with
        limited ones), up to ``n``, as a Batch; or None."""
        free = [h for h in self.held if h.cand.key is None and h.cand.name not in self.limits][:n]
        if not free:
            return None
        gone = {id(h) for h in free}
        self.held = [h for h in self.held if id(h) not in gone]
        self.fresh = [h for h in self.fresh if id(h) not in gone]
        return _as_batch(c, [h.msg for h in free])

    def _needs_slot(self, cd: Candidate) -> bool:
        """Whether a started task is counted while it runs (an r record)."""
        return counted(cd, self.limits)

    def _decide(self, vt: Any, cands: list[Candidate], busy: set[bytes], n: int, now: float) -> Any:
        """One decision, in the lease table's write transaction: the shared
        state (reaping dead owners' records), ``pick_next``, its records."""
        db, path = self._db, self._path
        me = _OWNER.pack(self._owner or 0)
        alive: dict[bytes, bool] = {me: True}

        def live(owner: bytes) -> bool:
            if owner not in alive:
                alive[owner] = _owners.alive(path, _OWNER.unpack(owner)[0])
            return alive[owner]
        st = LimitsState()
        others: dict[bytes, int] = {}           # key -> earliest offset another pool holds
        doomed = []
        foreign = False
        for k, v in vt.cursor(db=db).iternext():
            kind = k[:1]
            if kind == b"r":
                owner = bytes(k[1:9])
                if not live(owner):
                    doomed.append(bytes(k))
                    continue
                foreign = foreign or owner != me
                name, _, key = bytes(v).partition(b"\0")
                nm = name.decode(errors="replace")
                st.running[nm] = st.running.get(nm, 0) + 1
                if key:
                    st.running_keys.add(key)
            elif kind == b"w":
                owner = bytes(v)
                if owner == me:
                    continue
                if not live(owner):
                    doomed.append(bytes(k))
                    continue
                key, off = bytes(k[1:17]), _OWNER.unpack(k[17:25])[0]
                others[key] = min(off, others.get(key, off))
                foreign = True
            elif kind == b"b":
                st.buckets[bytes(k[1:]).decode(errors="replace")] = _BUCKET.unpack(v)
        for k in doomed:
            vt.delete(k, db=db)
        # A key another pool holds an earlier task of waits for it.
        first: dict[bytes, int] = {}
        for cd in cands:
            if cd.key is not None and cd.key not in first:
                first[cd.key] = cd.id  # type: ignore[assignment, index]
        for key, off in others.items():
            if key in first and off < first[key]:
                busy.add(key)
        if busy:
            st.running_keys |= busy
        # (One counted task per batch: a batch runs on one worker, one
        # message after another, so two would hold two slots for one.)
        pick = pick_next(cands, self.limits, st, now, capacity=n, counted_capacity=1)
        started = {cd.id for cd in pick.start}
        for cd in pick.start:
            if self._needs_slot(cd):
                vt.put(b"r" + me + _OWNER.pack(cd.id), cd.name.encode() + b"\0" + (cd.key or b""), db=db)  # type: ignore[operator]
            if cd.id in self.waiting:
                vt.delete(b"w" + cd.key + _OWNER.pack(cd.id), db=db)  # type: ignore[operator]
        waits = []      # (what to remember once the transaction is done: it may run twice)
        for cd in cands:
            if cd.key is not None and cd.id not in self.waiting and cd.id not in started:
                vt.put(b"w" + cd.key + _OWNER.pack(cd.id), me, db=db)  # type: ignore[operator]  # (this pool's keys are bytes)
                waits.append(cd.id)
        for name, state in pick.state.buckets.items():  # type: ignore[assignment]
            if state != st.buckets.get(name):  # type: ignore[call-overload]
                vt.put(b"b" + name.encode(), _BUCKET.pack(*state), db=db)  # type: ignore[attr-defined]
        return pick, waits, foreign

    def _extend_leases(self, c: Any) -> None:
        """Keep the leases of held messages from running out while they
        wait (the tasks pool's visibility timeout is a day by default)."""
        vt_s = c.options.visibility_timeout
        self._extend_at = time.monotonic() + min(60.0, vt_s / 4)
        soon = time.monotonic_ns() + int(vt_s * 0.5e9)
        for h in self.held:
            if h.msg.deadline < soon:
                try:
                    c._g.extend(h.msg, vt_s)
                except Exception:
                    pass    # lost: whoever has it now runs it; it is settled there


def _eligible(held: list[_Held], n: int) -> list[Candidate]:
    """The candidates among ``held`` (in offset order) that one pick of
    capacity ``n`` could start, in offset order: of each key its earliest,
    of each name its first ``n`` by priority.  (The others would wait for
    the same reason; leaving them out keeps a decision over a large
    backlog small.)"""
    per_name: dict[str, list[Candidate]] = {}
    keys: set[bytes] = set()
    for h in held:
        cd = h.cand
        if cd.key is not None:
            if cd.key in keys:
                continue
            keys.add(cd.key)  # type: ignore[arg-type]
        per_name.setdefault(cd.name, []).append(cd)
    out: list[Candidate] = []
    for cs in per_name.values():
        if len(cs) <= n:
            out += cs
        elif len({c.priority for c in cs}) == 1:
            out += cs[:n]
        else:
            out += heapq.nsmallest(n, cs, key=lambda c: (-c.priority, c.id))
    if len(per_name) > 1:
        out.sort(key=lambda c: c.id)  # type: ignore[arg-type, return-value]
    return out


def _as_batch(c: Any, msgs: list[Any]) -> Batch:
    """Messages this consumer holds (detached) as one Batch again, out like
    any batch ``take`` returned (the pool sends and settles batches)."""
    g = c._g
    with g.lock:
        led = g.ledger
        for m in msgs:
            if led.out.get(m.offset) is m:
                del led.out[m.offset]
        b = Batch([(m.offset, [m.data], [m.ts_ns], m._l) for m in msgs])
        led.deliver_batch(b)
    b._consumer = c
    return b

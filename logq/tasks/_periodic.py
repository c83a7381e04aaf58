"""Periodic tasks: ``@app.periodic("*/5 * * * *")`` or
``@app.periodic(every=timedelta(minutes=5))``, fired by a scheduler thread
in every tasks pool (``logq worker``, ``app.pool()``).

**Each slot fires exactly once**, however many pools run the scheduler,
across restarts and power cuts.  A slot is claimed, then submitted, then
marked done, each step durable before the next:

1. *claim*: one index transaction (fsynced) that finds the task's record
   in ``tasks.periodic`` with no claim pending and its last slot before
   this one, and writes ``last = slot`` plus a pending claim (the slot,
   this process's owner id, the queue's next offset before the put, the
   time).  Index write transactions are serialised, so of two schedulers
   racing for a slot one claims it and the other sees it taken;
2. *submit*: ``apply_async`` with the slot's key (``_cron.slot_key``) as the
   queue's idempotency key, then ``Queue.flush`` (the record is on stable
   storage);
3. *done*: an index transaction that clears the pending claim.

A claim left pending by a process that died (its flock in ``owners/`` is
gone: SIGKILL, power cut) is taken over by the next scheduler that looks:
it fires the slot unless the record is there -- the key is in the queue's
dedup index, or a record with that key is in the log after the claim's
offset (the log is the truth: a record lost to a power cut before its
fsync is not there, and recovery forgets dedup keys past a cut tail).  So
a slot is submitted once, or once more only if its first record was lost.
(Running it is then at least once, as for every task.)

After downtime, ``catch_up`` says which missed slots fire (see
``App.periodic``); the decision is ``Schedule.due_slots``, from the last
slot fired as recorded in the index.  A schedule that never fired has
missed nothing: it starts with the next on-time slot.  The scheduler
sleeps until the next slot (at most ``_MAX_SLEEP``, so a wall clock set
forward is noticed); nothing polls.
"""

from __future__ import annotations

import inspect
import logging
import struct
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

from logq import _format as F
from logq import _owners
from logq._errors import OffsetError
from logq._pool import WorkerPool
from logq.tasks._cron import (CATCH_UP_MODES, DEFAULT_CATCH_UP_LIMIT, DEFAULT_GRACE, Schedule,
                              as_utc, schedule, slot_key)

log = logging.getLogger("logq")

_MAX_SLEEP = 30.0        # the scheduler looks at least this often (s)
_BUSY_LOOK = 0.05        # another live process holds a claim: look again this soon (s)
_SCAN_SPAN = 600e9       # a dead claimer's record is looked for this long after its claim (ns)
# last slot (ns; -1: never), pending slot (ns; -1: none), its owner, the
# queue's next offset before its put, when it was claimed (ns)
_REC = struct.Struct(">qqQQq")
_NONE = (-1, -1, 0, 0, 0)


@dataclass(frozen=True)
class Periodic:
    """A registered periodic task: its Task, Schedule, catch-up mode,
    ``grace`` (how late the latest slot may be seen and still be on time),
    ``limit`` (most slots one catch-up fires) and whether the function
    takes the slot's time as its argument."""
    task: Any
    schedule: Schedule
    catch_up: str
    grace: timedelta
    limit: int
    with_slot: bool


def register(app: Any, cron: str | None, *, every: timedelta | None, catch_up: str,
             tz: Any = None, grace: timedelta = DEFAULT_GRACE, limit: int = DEFAULT_CATCH_UP_LIMIT,
             name: str | None = None, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """The decorator of ``App.periodic`` (its docstring is the reference)."""
    sched = schedule(cron, every=every, tz=tz)
    if catch_up not in CATCH_UP_MODES:
        raise ValueError(f"catch_up must be one of {', '.join(map(repr, CATCH_UP_MODES))}, "
                         f"not {catch_up!r}")
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise ValueError(f"grace must be a timedelta >= 0, not {grace!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a whole number >= 1, not {limit!r}")

    def deco(fn: Callable[..., Any]) -> Any:
        n = name or f"{fn.__module__}.{fn.__qualname__}"
        slot_key(n, 0)                  # a name the slot keys can carry (no '@')
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        if len(params) > 1:
            raise TypeError(f"periodic task {n} takes at most one argument (the slot's time), "
                            f"not {len(params)}")
        t = app.task(fn, name=n, **options)
        app._periodic[n] = Periodic(t, sched, catch_up, grace, limit, bool(params))
        return t
    return deco


class Scheduler:
    """Fires an app's periodic tasks (module docstring).  ``start()`` runs
    it in a thread of this process until ``stop()``; ``tick(now)`` is one
    look (what the thread does at each wake), returning when to look next
    (epoch seconds)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.periodics = list(app._periodic.values())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner: Any = None
        self._db: Any = None

    # -- the thread --------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="logq-periodic")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    wake = self.tick()
                except Exception:
                    log.exception("logq tasks: the periodic scheduler of %s failed; trying again",
                                  self.app.path)
                    wake = time.time() + 1.0
                self._stop.wait(min(max(0.0, wake - time.time()), _MAX_SLEEP))
        finally:
            self.close()

    def close(self) -> None:
        if self._owner is not None:
            _owners.release(self._owner)
            self._owner = None

    # -- one look ------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> float:
        """Fire what is due at ``now`` (default: the time); when to look
        again (epoch seconds)."""
        q = self.app.queue
        if self._owner is None:
            self._owner = _owners.acquire(q.path, q.queue_id)
            self._db = self.app._store().idx.open_db(b"tasks.periodic")
        now = time.time() if now is None else now
        wake = now + _MAX_SLEEP
        for p in self.periodics:
            wake = min(wake, self._tick(p, now))
        return wake

    def _tick(self, p: Periodic, now: float) -> float:
        rec = self._read(p.task.name)
        if rec[1] >= 0:
            if not self._settle_claim(p, rec):
                return now + _BUSY_LOOK          # a live process is submitting it
            rec = self._read(p.task.name)
        last = None if rec[0] < 0 else rec[0] / 1e9
        due = p.schedule.due_slots(last, now, catch_up=p.catch_up, limit=p.limit, grace=p.grace)
        for slot in due.fire:
            ns = _ns(slot)
            at = self.app.queue.next_offset
            if not self._claim(p.task.name, ns, at):
                return min(due.next_slot.timestamp(), now + _BUSY_LOOK)   # taken: look again
            self._submit(p, ns)
            self._done(p.task.name, ns)
        if due.skipped_after is not None:
            log.info("logq tasks: periodic %s: slots after %s and before %s skipped (catch_up=%r)",
                     p.task.name, due.skipped_after.isoformat(), due.skipped_until.isoformat()
                     if due.skipped_until else "now", p.catch_up)
        return due.next_slot.timestamp()

    # -- the record ------------------------------------------------------------------------
    def _read(self, name: str) -> tuple[int, int, int, int, int]:
        raw = self.app._store().idx.get(name.encode(), self._db)
        return _NONE if raw is None else _REC.unpack(raw)

    def _claim(self, name: str, slot_ns: int, at: int) -> bool:
        key, me = name.encode(), self._owner.id

        def fn(txn: Any) -> bool:
            raw = txn.get(key, db=self._db)
            last, pending, _o, _a, _c = _NONE if raw is None else _REC.unpack(raw)
            if pending >= 0 or last >= slot_ns:
                return False
            txn.put(key, _REC.pack(slot_ns, slot_ns, me, at, time.time_ns()), db=self._db)
            return True
        return self.app._store().idx.write(fn)

    def _done(self, name: str, slot_ns: int) -> None:
        key, me = name.encode(), self._owner.id

        def fn(txn: Any) -> None:
            raw = txn.get(key, db=self._db)
            if raw is None:
                return
            last, pending, owner, _a, _c = _REC.unpack(raw)
            if pending == slot_ns and owner == me:
                txn.put(key, _REC.pack(last, -1, 0, 0, 0), db=self._db)
        self.app._store().idx.write(fn)

    def _submit(self, p: Periodic, slot_ns: int) -> None:
        slot = slot_ns / 1e9
        key = slot_key(p.task.name, as_utc(slot))
        p.task.apply_async(args=(slot,) if p.with_slot else (), key=key)
        self.app.queue.flush()      # on stable storage before the claim is marked done

    def _settle_claim(self, p: Periodic, rec: tuple[int, int, int, int, int]) -> bool:
        """A pending claim: if its owner is dead (or is us: a look that
        failed half way), take it over and finish it (submit unless its
        record is there).  False while a live process holds it."""
        _last, pending, owner, at, claimed = rec
        q = self.app.queue
        me = self._owner.id
        if owner != me and _owners.alive(q.path, owner):
            return False
        name = p.task.name.encode()

        def take_over(txn: Any) -> bool:
            raw = txn.get(name, db=self._db)
            if raw is None or _REC.unpack(raw) != rec:
                return False        # someone else finished or took it meanwhile
            txn.put(name, _REC.pack(rec[0], pending, me, at, claimed), db=self._db)
            return True
        if not self.app._store().idx.write(take_over):
            return True
        if not self._submitted(p, pending, at, claimed):
            log.warning("logq tasks: periodic %s: slot %s was claimed by a process that died "
                        "before submitting it: submitting it now", p.task.name,
                        as_utc(pending / 1e9).isoformat())
            self._submit(p, pending)
        self._done(p.task.name, pending)
        return True

    def _submitted(self, p: Periodic, slot_ns: int, at: int, claimed_ns: int) -> bool:
        """Whether the slot's record is in the queue: its key in the dedup
        index, or a record with its key in the log after ``at``."""
        key = slot_key(p.task.name, as_utc(slot_ns / 1e9)).encode()
        q = self.app.queue
        if q._index.dedup_find(key, 0) is not None:
            return True
        off, end = max(at, q.first_offset), q.next_offset
        while off < end:
            try:
                first, _payloads, ts, attrs, metas = q._fetch(off, min(256, end - off), False)
            except OffsetError:
                return False
            if not attrs:
                return False
            for i, a in enumerate(attrs):
                if ts[i] > claimed_ns + _SCAN_SPAN:
                    return False
                if a & 0xFFFF and metas and i in metas:
                    _due, k = F.decode_meta(a >> 24, metas[i])
                    if k == key:
                        return True
            off = first + len(attrs)
        return False


def _ns(t: Any) -> int:
    """An aware datetime as epoch nanoseconds, exactly."""
    d = t - as_utc(0)
    return (d.days * 86400 + d.seconds) * 1_000_000_000 + d.microseconds * 1000


class TaskPool(WorkerPool):
    """A WorkerPool that also runs an app's periodic scheduler (a thread in
    the pool's process, for as long as the pool runs)."""

    def __init__(self, *args: Any, scheduler: Scheduler | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scheduler = scheduler

    def _serve(self, until_idle: bool) -> None:
        if self.scheduler is not None:
            self.scheduler.start()
        try:
            super()._serve(until_idle)
        finally:
            if self.scheduler is not None:
                self.scheduler.stop()

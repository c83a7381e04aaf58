"""Where a task's facts live, and how its state is derived from them.

Durable (the index, fsynced with the queue's group commits):

* the task record: the queue message itself (``_records``), in the log;
* ``tasks.outcome``: task id -> Outcome, written only by a settlement's
  own transaction (an ack or nack of the task's message, through the
  consumer's ``write=`` hook) or by ``cancel``/``retry``;
* ``tasks.expiry``: (expires ns, id) -> "" for a finished outcome, or
  (latest expires ns, first id) -> the ids of outcomes that a settlement
  stored together with the same TTL, each after a newline (one entry per
  TTL per transaction, not per task); purged with the
  settlements that follow (and by ``purge``), so the index does not grow
  without bound.  An outcome is purged once its own ``expires_ns`` has
  passed (a later outcome of the same task keeps it);
* ``tasks.moved``: id -> offset of the record ``retry`` put for it;
* ``tasks.counters``: per task name, counts and histograms for operators,
  added to in the transactions that record what they count (``_census``);
* the queue's own group state of group ``tasks``: settled offsets, the
  schedule (delays, retries), dead letters.

Volatile (the lease table, never fsynced): ``tasks.running``, worker pid
-> the task it has been running for a while; trusted only while that
process lives.

``status`` reads them in this order, first match wins: a final outcome;
a dead letter (failed); settled without an outcome (expired: not found);
a live worker's marker (running); a posted or durable schedule entry due
later (retrying after a failure, else scheduled); queued.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterator

from logq import _format as F
from logq._errors import OffsetError, TaskNotFound
from logq._index import GROUP, G_WATERMARK, open_scratch
from logq._leases import Retry
from logq._status import pid_alive
from logq._settled import _DEAD, _be, _is_settled
from logq.tasks import _state as S
from logq.tasks._census import Tally
from logq.tasks._records import (EXPIRES_AT, Outcome, TaskRecord, decode_task, error_json, parse_id,
                                 state_of)

GROUP_NAME = "tasks"
PREFIX = GROUP_NAME.encode() + b"\0"


@dataclass(frozen=True)
class TaskStatus:
    """What is known of a task now.  Times are epoch seconds (None: not
    yet, or not known); ``pid`` is the worker process while ``running``;
    ``error`` is ``{"type", "message", "traceback"}`` of the last failure
    (or the reason of a cancel), else None."""
    id: str
    name: str
    state: str
    attempts: int
    submitted: float | None
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    error: dict[str, str] | None = None
    due: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_EXPIRES = struct.Struct("<Q")


def _split_ids(v: bytes) -> list[bytes]:
    """The ids of a shared expiry entry (each after a newline)."""
    return v[1:].split(b"\n")


def _s(ns: int) -> float | None:
    return ns / 1e9 if ns else None




class Store:
    """The task records of one open queue, for this process."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.idx = q._index
        self.outcome = self.idx.open_db(b"tasks.outcome")
        self.expiry = self.idx.open_db(b"tasks.expiry")
        self.moved = self.idx.open_db(b"tasks.moved")
        self.counters = self.idx.open_db(b"tasks.counters")     # see _census
        self.scratch = open_scratch(q.path, may_reset=False)
        self.running = self.scratch.open_db(b"tasks.running")

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None  # type: ignore[assignment]

    # -- writes inside a settlement's transaction -------------------------------------
    def record(self, txn: Any, task_id: str, event: str, out: Outcome) -> bool:
        """Apply ``event`` to the task in ``txn`` (a settlement's own
        transaction), storing ``out`` when it changes the state: a final
        outcome is never overwritten (late news about a cancelled task is
        ignored).  Whether it was stored."""
        key = task_id.encode()
        raw = txn.get(key, db=self.outcome)
        current = state_of(raw) if raw is not None else S.RUNNING
        if current not in S.FINAL:
            current = S.RUNNING     # a recorded failure was an earlier attempt
        new = S.TRANSITIONS.get((current, event)) or S.next_state(current, event)
        if new == current and current in S.FINAL:
            return False
        txn.put(key, out.pack(), db=self.outcome)
        if out.expires_ns:
            txn.put(_be(out.expires_ns) + key, b"", db=self.expiry)
        return True

    def expire(self, txn: Any, expires_ns: int, keys: list[bytes]) -> None:
        """Note in ``txn`` that the outcomes of ``keys`` (task ids, stored
        in it) expire by ``expires_ns``: one entry for them all."""
        joined = b"\n".join(keys)
        if joined.count(b"\n") != len(keys) - 1:
            # (ids never hold a newline: one that did gets an entry of its own)
            for k in keys:
                txn.put(_be(expires_ns) + k, b"", db=self.expiry)
            return
        txn.put(_be(expires_ns) + keys[0], b"\n" + joined, db=self.expiry)

    def purge_expired(self, txn: Any, now_ns: int, limit: int = 1000) -> int:
        """Delete the outcomes whose time ran out (at least ``limit``
        outcomes looked at, whole expiry entries); how many entries."""
        n = looked = 0
        cur = txn.cursor(db=self.expiry)
        doomed = []
        for k, v in cur.iternext():
            if int.from_bytes(k[:8], "big") > now_ns or looked >= limit:
                break
            k, v = bytes(k), bytes(v)
            ids = [k[8:]] if not v else _split_ids(v)
            doomed.append((k, ids))
            looked += len(ids)
            n += 1
        for k, ids in doomed:
            for tid in ids:
                raw = txn.get(tid, db=self.outcome)
                if raw is not None and 0 < _EXPIRES.unpack_from(raw, EXPIRES_AT)[0] <= now_ns:
                    txn.delete(tid, db=self.outcome)
                    txn.delete(tid, db=self.moved)
            txn.delete(k, db=self.expiry)
        return n

    # -- reads ---------------------------------------------------------------------------
    def recorded(self, task_id: str) -> Outcome | None:
        key = task_id.encode()
        try:
            with self.idx.env.begin() as t:
                raw = t.get(key, db=self.outcome)
        except Exception:       # (the map grew in another process: the index's own read handles it)
            raw = self.idx.read(lambda t: t.get(key, db=self.outcome))
        return None if raw is None else Outcome.unpack(raw)

    def load(self, offset: int) -> tuple[TaskRecord, int, int | None] | None:
        """The task record at ``offset``, its timestamp and its deliver-at
        (wall ns, or None), or None."""
        try:
            at, payloads, ts, attrs, metas = self.q._fetch(offset, 1)
        except OffsetError:
            return None
        if at != offset or not payloads:
            return None
        rec = decode_task(bytes(payloads[0]))
        if rec is None:
            return None
        due = None
        if metas and 0 in metas:
            due, _key = F.decode_meta(attrs[0] >> 24, metas[0])
        return rec, ts[0], due

    def markers(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """task id -> (pid, marker) for the workers alive now."""
        def fn(vt: Any) -> list[tuple[int, bytes]]:
            return [(int.from_bytes(k, "big"), bytes(v)) for k, v in vt.cursor(db=self.running).iternext()]
        out = {}
        for pid, v in self.scratch.read(fn):
            try:
                m = json.loads(v)
            except ValueError:
                continue
            if m.get("id") and pid_alive(pid):
                out[m["id"]] = (pid, m)
        return out

    def status(self, task_id: str, markers: dict[str, Any] | None = None) -> TaskStatus:
        """The task's state now; raises TaskNotFound."""
        parsed = parse_id(task_id)
        if parsed is None:
            raise TaskNotFound(f"{task_id!r} is not a task id (they look like '1234-9f3a0c21')")
        key = task_id.encode()
        idx, p = self.idx, PREFIX

        def fn(txn: Any) -> tuple[Any, ...]:
            raw = txn.get(key, db=self.outcome)
            mv = txn.get(key, db=self.moved)
            off = int.from_bytes(mv, "big") if mv is not None else parsed[0]
            graw = txn.get(p[:-1], db=idx.groups)
            mark = GROUP.unpack(graw)[G_WATERMARK] if graw is not None else 0
            settled = graw is not None and _is_settled(txn, idx, p, mark, off)
            dead = txn.get(p + _be(off), db=idx.dead)
            pend = txn.get(p + _be(off), db=idx.pending)
            return (None if raw is None else Outcome.unpack(raw), off, settled,
                    None if dead is None else bytes(dead), None if pend is None else bytes(pend))
        out, off, settled, dead, pend = idx.read(fn)
        if out is not None and out.state in S.FINAL:
            return self._from_outcome(task_id, out)
        found = self.load(off)
        if found is None or found[0].task_id(off) != task_id:
            raise TaskNotFound(f"no task {task_id} in {self.q.path}")
        rec, ts, deliver_at = found
        attempts = out.attempts if out is not None else 0
        error = out.error() if out is not None else None
        base: dict[str, Any] = dict(id=task_id, name=rec.name, submitted=_s(ts) if out is None else _s(out.submitted_ns))
        if base["submitted"] is None:
            base["submitted"] = _s(ts)
        if dead is not None:
            n, dead_at, _ts, elen = _DEAD.unpack_from(dead)
            text = dead[_DEAD.size:_DEAD.size + elen].decode(errors="replace")
            return TaskStatus(state=S.FAILED, attempts=n, finished=_s(dead_at),
                              error=error or {"type": "", "message": text, "traceback": ""}, **base)
        if settled:
            raise TaskNotFound(f"task {task_id} finished and its record expired")
        mk = (markers if markers is not None else self.markers()).get(task_id)
        if mk is not None:
            pid, m = mk
            return TaskStatus(state=S.RUNNING, attempts=max(attempts, int(m.get("attempt", 1))),
                              started=m.get("started"), pid=pid, error=error, **base)
        due = None
        raw = self.scratch.read(lambda vt: vt.get(p + b"N" + _be(off), db=self.scratch.claims))
        if raw is not None:
            due = Retry.unpack(off, raw).due
        elif pend is not None:
            due = int.from_bytes(pend, "big")
        elif deliver_at is not None and out is None:
            due = deliver_at        # not yet seen by a consumer: the record's own time
        now = time.time_ns()
        later = due is not None and due > now
        state = S.pending_state(due_later=later, failed_before=out is not None)
        return TaskStatus(state=state, attempts=attempts, error=error,
                          due=_s(due) if later else None, **base)  # type: ignore[arg-type]

    def _from_outcome(self, task_id: str, out: Outcome) -> TaskStatus:
        return TaskStatus(id=task_id, name=out.name, state=out.state, attempts=out.attempts,
                          submitted=_s(out.submitted_ns), started=_s(out.started_ns),
                          finished=_s(out.finished_ns), error=out.error())

    def ids(self) -> Iterator[str]:
        """Every task id this queue knows: finished or failed once
        (outcomes), then those whose records wait in the log."""
        seen: set[str] = set()

        def fn(txn: Any) -> list[str]:
            return [bytes(k).decode() for k, _ in txn.cursor(db=self.outcome).iternext()]
        for tid in self.idx.read(fn):
            seen.add(tid)
            yield tid
        graw = self.idx.get(PREFIX[:-1], self.idx.groups)
        start = GROUP.unpack(graw)[G_WATERMARK] if graw is not None else self.q.first_offset
        for off, data in self.q.scan(max(start, self.q.first_offset)):
            rec = decode_task(data)
            if rec is None:
                continue
            tid = rec.task_id(off)
            if tid not in seen:
                seen.add(tid)
                yield tid

    # -- operations -----------------------------------------------------------------
    def cancel(self, task_id: str, ttl_ns: int, hooks: Any = (), batch_hooks: Any = ()) -> bool:
        """Record the task cancelled, durably, unless it finished: True if
        it was (not) finished and is cancelled now.  ``hooks``,
        ``batch_hooks``: the App's settle hooks and settle batch hooks, run
        in the same transaction."""
        st = self.status(task_id)        # raises TaskNotFound
        if st.state in S.FINAL:
            return False
        key = task_id.encode()
        now = time.time_ns()

        def fn(txn: Any) -> bool:
            raw = txn.get(key, db=self.outcome)
            if raw is not None and state_of(raw) in S.FINAL:
                return False
            out = Outcome(S.CANCELLED, st.attempts, int((st.submitted or 0) * 1e9),
                          int((st.started or 0) * 1e9), now, now + ttl_ns if ttl_ns else 0, "",
                          st.name, error_json("TaskCancelled", "cancelled", ""))
            txn.put(key, out.pack(), db=self.outcome)
            if out.expires_ns:
                txn.put(_be(out.expires_ns) + key, b"", db=self.expiry)
            for h in hooks:
                h(txn, task_id, S.CANCEL, out)
            for h in batch_hooks:
                h(txn, [(task_id, S.CANCEL, out)])
            t = Tally()
            t.count(st.name, "cancelled")
            t.apply(txn, self.counters)
            return True
        done = self.idx.write(fn)
        self.q._poke()
        self.q._bump_written()      # a blocked result() raises TaskCancelled now
        return done

    def reopen(self, task_id: str) -> None:
        """Before ``retry`` puts a finished task again: its final outcome
        becomes a non-final marker (queued, no attempts), so the worker that
        takes the new record runs it and may record its outcome (a final
        one would make the worker skip it and absorb the news).  Until
        ``moved_to``, the task reads as before (its dead letter, or its
        cancel's outcome)."""
        key = task_id.encode()

        def fn(txn: Any) -> None:
            raw = txn.get(key, db=self.outcome)
            if raw is None:
                return
            o = Outcome.unpack(raw)
            txn.put(key, Outcome(S.QUEUED, 0, o.submitted_ns, 0, 0, 0, "", o.name, b"").pack(),
                    db=self.outcome)
        self.idx.write(fn)

    def moved_to(self, task_id: str, offset: int) -> None:
        """After ``retry`` put the task again at ``offset``: forget its
        reopened outcome and its old dead letter, point its id there (one
        transaction).  An outcome the new run recorded already stays."""
        key = task_id.encode()
        parsed = parse_id(task_id)

        def fn(txn: Any) -> None:
            mv = txn.get(key, db=self.moved)
            old = int.from_bytes(mv, "big") if mv is not None else parsed[0] if parsed else None
            if old is not None and old != offset:
                txn.delete(PREFIX + _be(old), db=self.idx.dead)
            raw = txn.get(key, db=self.outcome)
            if raw is not None and state_of(raw) == S.QUEUED:
                txn.delete(key, db=self.outcome)        # the marker of reopen
            txn.put(key, _be(offset), db=self.moved)
        self.idx.write(fn)

    def purge(self, state: str | None, older_than: float, now: float | None = None) -> int:
        """Delete finished outcomes (of ``state``, or any final one) that
        finished more than ``older_than`` seconds ago; how many."""
        limit = int(((now or time.time()) - older_than) * 1e9)

        def fn(txn: Any) -> int:
            doomed = []
            for k, v in txn.cursor(db=self.outcome).iternext():
                o = Outcome.unpack(v)
                if o.state in S.FINAL and (state is None or o.state == state) and \
                        o.finished_ns and o.finished_ns <= limit:
                    doomed.append((bytes(k), o.expires_ns))
            for k, exp in doomed:
                txn.delete(k, db=self.outcome)
                txn.delete(k, db=self.moved)
                if exp:
                    txn.delete(_be(exp) + k, db=self.expiry)
            return len(doomed)
        return self.idx.write(fn)

"""Exactly-once joins: where a workflow's graph is kept, and what settling
one of its tasks writes, in the transaction that settles it.

**How a dependant starts.**  Every task of a graph is put in the log when
the graph is submitted.  A task with parents is put *parked*: its
deliver-at is "never" (``NEVER``), so the queue's schedule holds it and
no consumer gets it.  Starting it is one index write, the *release*: its
schedule entry moves to now (``release``), and the consumers deliver it
like a due retry.  The log is not part of an index transaction, but the
release is: so the settle hook (``Joins.on_settle``, an App settle hook:
``logq.tasks`` calls it inside the transaction that records a task's
outcome together with its ack) records the parent's result for its
dependants, counts the join down and releases the dependants that became
ready, all in that one transaction.  Either all of it commits with the
ack or none of it does (a kill before the commit redelivers the parent,
which settles again).  An outcome is recorded once (a final outcome is
never overwritten), so a join counts each parent once, and a released
task is marked done, so it is released once: never lost, never started
twice.  (A started task runs at least once, like every task: a worker
killed mid-task runs it again, the attempt counted.)

**Records** (index database ``wf.graph``, keys prefixed by kind)::

    N<task id>        node: JSON {"w": workflow id, "n": task name, "i": index,
                      "p": [parent ids], "d": [[dependant id, position]],
                      "le": [error handler ids]}
    W<task id>        wait: struct <IBBI: parents left, flags, mode, parents
    I<task id>\\0<pos> a parent's result kept for a dependant: serializer
                      name length (1 byte), name, payload
    M<workflow id>    meta: JSON {"kind", "created", "n", "le": [...], "root": label}
    C<workflow id>    tasks of the workflow not finished yet (u32)
    L<workflow id>\\0<u32 index>  -> task id (its members, in order)

Modes: how a dependant gets its parents' results: ``NONE``; ``FIRST``
(the one parent's result is its first argument: a chain link); ``ALL``
(the list of its parents' results, in order, is its first argument: a
chord callback; a failed parent allowed by ``allow_failure`` gives None);
``ERROR`` (an error handler: the id of the task that failed).

**Failure policy.**  A parent that ends failed or cancelled fails each
dependant at once (state failed, error "dependency X failed"), and so on
down the graph, unless the dependant was submitted with
``allow_failure``; the first failure in a workflow releases its
``link_error`` handlers (once); handlers not needed when the last task
finished are cancelled.  A task retried with ``logq tasks retry`` after
it failed does not revive dependants failed by it.

A graph submitted by a process killed during ``submit`` (after some of its
puts, before the transaction) leaves records that never run: parked ones
stay in the schedule; an unparked root may run alone.  Nothing accepted
(returned to the caller) is ever lost.
"""

from __future__ import annotations

import json
import struct
import time
from typing import Any, Iterable

from logq._settled import _SCHED, _be
from logq.tasks import _state as S
from logq.tasks._records import Outcome, error_json, parse_id
from logq.tasks._store import PREFIX

NEVER = 9.9e10                    # deliver_at (epoch s) of a parked task: the queue's "never"
INPUT_MARK = "__logq_wf_inputs__"  # kwarg of a task whose parents' results it gets

NONE, FIRST, ALL, ERROR = 0, 1, 2, 3
DONE, ALLOW, FINISHED = 1, 2, 4    # wait flags: released (or failed), allow_failure, its own end counted
_WAIT = struct.Struct("<IBBI")
_U32 = struct.Struct(">I")


def _k(kind: bytes, ident: str) -> bytes:
    return kind + ident.encode()


def _prefix_items(txn: Any, db: Any, prefix: bytes) -> Iterable[tuple[bytes, bytes]]:
    cur = txn.cursor(db=db)
    if not cur.set_range(prefix):
        return
    for k, v in cur.iternext():
        if not bytes(k).startswith(prefix):
            return
        yield bytes(k), bytes(v)


def release(txn: Any, idx: Any, task_id: str, now_ns: int | None = None) -> None:
    """Make the parked (or delayed) task message of ``task_id`` due now, in
    ``txn``: its schedule entry in the tasks group moves to ``now``.  Also
    right before the group has scanned the record (the scan keeps an entry
    it finds).  Call it only for a message not settled (a released
    message settled since would be delivered again)."""
    off = parse_id(task_id)[0]  # type: ignore[index]
    p = PREFIX
    now = time.time_ns() if now_ns is None else now_ns
    pend = txn.get(p + _be(off), db=idx.pending)
    if pend is not None:
        txn.delete(p + bytes(pend) + _be(off), db=idx.sched)
    txn.put(p + _be(now) + _be(off), _SCHED.pack(0), db=idx.sched)
    txn.put(p + _be(off), _be(now), db=idx.pending)


class Joins:
    """The graph records of one App's queue, and its settle hook."""

    def __init__(self, app: Any, txn: Any = None) -> None:
        from logq.workflows._plugin import open_db
        self.app = app
        store = app._store()
        self.store = store
        self.idx = store.idx
        self.db = open_db(self.idx, b"wf.graph", txn)

    # -- the settle hook ----------------------------------------------------------
    def on_settle(self, txn: Any, task_id: str, event: str, out: Outcome) -> None:
        """App settle hook: a task's outcome was recorded in ``txn``."""
        if out.state not in S.FINAL:
            return
        raw = txn.get(_k(b"N", task_id), db=self.db)
        if raw is None:
            return      # not a workflow's task: one lookup, nothing more
        self.finish(txn, [(task_id, json.loads(raw), out)])

    def finish(self, txn: Any, work: list[tuple[str, dict[str, Any], Outcome]]) -> None:
        """Propagate finished tasks (id, node, outcome) through the graph,
        in ``txn``; a worklist, not recursion (a chain may be long)."""
        db = self.db
        now = time.time_ns()
        while work:
            tid, node, out = work.pop()
            wk = _k(b"W", tid)
            w = txn.get(wk, db=db)
            left, flags, mode, npar = _WAIT.unpack(w) if w is not None else (0, DONE, NONE, 0)
            if flags & FINISHED:
                continue        # counted already (a retried task finishing again)
            if not flags & DONE:
                # Ended while parked (cancelled): its message goes through
                # the queue and is dropped there (final outcome: not run).
                release(txn, self.idx, tid, now)
            txn.put(wk, _WAIT.pack(left, flags | DONE | FINISHED, mode, npar), db=db)
            for k, _v in list(_prefix_items(txn, db, _k(b"I", tid) + b"\0")):
                txn.delete(k, db=db)
            failed = out.state != S.SUCCEEDED
            wid = node.get("w")
            if wid:
                self._count_down(txn, wid, now)
                if failed:
                    for h in node.get("le", ()):
                        self._start_handler(txn, h, tid, now)
            for d, pos in node.get("d", ()):
                nxt = self._edge(txn, tid, out, d, pos, now)
                if nxt is not None:
                    work.append(nxt)

    def _edge(self, txn: Any, tid: str, out: Outcome, d: str, pos: int,
              now: int) -> tuple[str, dict[str, Any], Outcome] | None:
        """Parent ``tid`` ended with ``out``: its dependant ``d`` (at
        position ``pos`` of its parents) counts it.  A dependant failed by
        it is returned, to propagate."""
        db = self.db
        wk = _k(b"W", d)
        w = txn.get(wk, db=db)
        if w is None:
            return None
        left, flags, mode, npar = _WAIT.unpack(w)
        if flags & DONE:
            return None
        if out.state != S.SUCCEEDED and not flags & ALLOW:
            node = json.loads(txn.get(_k(b"N", d), db=db))
            msg = f"dependency {tid} ({out.name}) {out.state}"
            ttl = self.app._ttl(node.get("n", ""))
            dout = Outcome(S.FAILED, 0, now, 0, now, now + int(ttl * 1e9) if ttl else 0, "",
                           node.get("n", ""), error_json("DependencyFailed", msg, ""))
            key = d.encode()
            raw = txn.get(key, db=self.store.outcome)
            if raw is not None and Outcome.unpack(raw).state in S.FINAL:
                return None
            txn.put(key, dout.pack(), db=self.store.outcome)
            if dout.expires_ns:
                txn.put(_be(dout.expires_ns) + key, b"", db=self.store.expiry)
            # (its message is released by finish, and dropped unrun)
            return d, node, dout
        if out.state == S.SUCCEEDED and mode in (FIRST, ALL):
            ser = out.serializer.encode()
            txn.put(_k(b"I", d) + b"\0" + _U32.pack(pos), bytes([len(ser)]) + ser + out.payload, db=db)
        left -= 1
        if left <= 0:
            flags |= DONE
            release(txn, self.idx, d, now)
        txn.put(wk, _WAIT.pack(max(left, 0), flags, mode, npar), db=db)
        return None

    def _start_handler(self, txn: Any, h: str, failed: str, now: int) -> None:
        wk = _k(b"W", h)
        w = txn.get(wk, db=self.db)
        if w is None:
            return
        left, flags, mode, npar = _WAIT.unpack(w)
        if flags & DONE:
            return      # the first failure started it
        txn.put(_k(b"I", h) + b"\0" + _U32.pack(0), b"\0" + failed.encode(), db=self.db)
        txn.put(wk, _WAIT.pack(0, flags | DONE, mode, npar), db=self.db)
        release(txn, self.idx, h, now)

    def _count_down(self, txn: Any, wid: str, now: int) -> None:
        ck = _k(b"C", wid)
        raw = txn.get(ck, db=self.db)
        if raw is None:
            return
        n = _U32.unpack(raw)[0] - 1
        txn.put(ck, _U32.pack(max(n, 0)), db=self.db)
        if n > 0:
            return
        # The last task ended: error handlers that no failure started are
        # cancelled (their parked messages drain unrun).
        meta = txn.get(_k(b"M", wid), db=self.db)
        for h in json.loads(meta).get("le", ()) if meta is not None else ():
            w = txn.get(_k(b"W", h), db=self.db)
            if w is not None and not _WAIT.unpack(w)[1] & DONE:
                self._cancel_one(txn, h, "not needed: nothing failed", now)
                self.finish(txn, [(h, json.loads(txn.get(_k(b"N", h), db=self.db)),
                                   Outcome.unpack(txn.get(h.encode(), db=self.store.outcome)))])

    def _cancel_one(self, txn: Any, tid: str, why: str, now: int) -> Outcome | None:
        """Write ``tid`` cancelled unless it is final; its outcome then."""
        key = tid.encode()
        raw = txn.get(key, db=self.store.outcome)
        if raw is not None and Outcome.unpack(raw).state in S.FINAL:
            return None
        node = txn.get(_k(b"N", tid), db=self.db)
        name = json.loads(node).get("n", "") if node is not None else ""
        ttl = self.app._ttl(name)
        out = Outcome(S.CANCELLED, 0, now, 0, now, now + int(ttl * 1e9) if ttl else 0, "", name,
                      error_json("TaskCancelled", why, ""))
        txn.put(key, out.pack(), db=self.store.outcome)
        if out.expires_ns:
            txn.put(_be(out.expires_ns) + key, b"", db=self.store.expiry)
        return out

    # -- the worker side: a dependant's inputs --------------------------------------
    def inputs(self, task_id: str) -> tuple[int, list[Any]]:
        """(mode, [decoded result per parent position, None where missing])."""
        db = self.db

        def fn(txn: Any) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
            return (txn.get(_k(b"W", task_id), db=db),
                    list(_prefix_items(txn, db, _k(b"I", task_id) + b"\0")))
        w, items = self.idx.read(fn)
        if w is None:
            return NONE, []
        _left, _flags, mode, npar = _WAIT.unpack(w)
        vals: list[Any] = [None] * max(npar, 1)
        for k, v in items:
            pos = _U32.unpack(k[-4:])[0]
            n = v[0]
            ser, payload = v[1:1 + n].decode(), v[1 + n:]
            if pos < len(vals):
                vals[pos] = payload.decode() if not ser else self.app._serializer(ser).loads(payload)
        return mode, vals

    def run_hook(self, task_id: str, name: str, args: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
        """App run hook: a task marked as getting its parents' results gets
        them as its first argument."""
        if INPUT_MARK not in kwargs:
            return args, kwargs
        kwargs = dict(kwargs)
        kwargs.pop(INPUT_MARK)
        mode, vals = self.inputs(task_id)
        if mode in (FIRST, ERROR):
            return [vals[0], *args], kwargs
        if mode == ALL:
            return [vals, *args], kwargs
        return args, kwargs

    # -- reads ----------------------------------------------------------------------
    def node(self, task_id: str) -> dict[str, Any] | None:
        raw = self.idx.get(_k(b"N", task_id), self.db)
        return None if raw is None else json.loads(raw)

    def waiting(self, task_id: str) -> bool:
        """Whether the task is parked, waiting for its parents."""
        raw = self.idx.get(_k(b"W", task_id), self.db)
        return raw is not None and not _WAIT.unpack(raw)[1] & DONE

    def meta(self, wid: str) -> dict[str, Any] | None:
        raw = self.idx.get(_k(b"M", wid), self.db)
        return None if raw is None else json.loads(raw)

    def members(self, wid: str) -> list[str]:
        def fn(txn: Any) -> list[str]:
            return [v.decode() for _k2, v in _prefix_items(txn, self.db, _k(b"L", wid) + b"\0")]
        return self.idx.read(fn)

    def workflows(self) -> list[str]:
        def fn(txn: Any) -> list[str]:
            return [k[1:].decode() for k, _v in _prefix_items(txn, self.db, b"M")]
        return self.idx.read(fn)

    # -- cancel -----------------------------------------------------------------------
    def cancel(self, wid: str) -> int:
        """Cancel every task of the workflow not finished, in one
        transaction: the parked ones never start, the running ones see
        ``current().cancelled``.  How many."""
        ids = self.members(wid)
        now = time.time_ns()

        def fn(txn: Any) -> int:
            done = []
            for tid in ids:
                out = self._cancel_one(txn, tid, f"workflow {wid} cancelled", now)
                if out is not None:
                    done.append(tid)
                    w = txn.get(_k(b"W", tid), db=self.db)
                    if w is not None:
                        left, flags, mode, npar = _WAIT.unpack(w)
                        if not flags & DONE:
                            release(txn, self.idx, tid, now)
                            txn.put(_k(b"W", tid), _WAIT.pack(left, flags | DONE, mode, npar), db=self.db)
            self.finish(txn, [(tid, json.loads(txn.get(_k(b"N", tid), db=self.db)),
                               Outcome.unpack(txn.get(tid.encode(), db=self.store.outcome)))
                              for tid in done])
            return len(done)
        n = self.idx.write(fn)
        q = self.store.q
        q._poke()
        q._bump_written()
        return n

"""Durable workflows: a function whose steps are checkpointed in the index,
so that after a crash it resumes from its last completed step.

    @workflow(app)
    def onboard(ctx, user_id):
        acct = ctx.step(create_account, user_id)
        ctx.sleep(3600)
        ok = ctx.wait_event("email-confirmed", timeout=86400)
        ctx.step(send_welcome, acct, ok)
        return acct

    w = onboard.start(42, workflow_id="onboard-42")    # the id is the idempotency key
    send_event(app, w.id, "email-confirmed", True); w.status(); w.result(timeout=60)

**How it runs.**  A workflow runs as tasks of the App (its *runs*), each
a replay of the function from the top: ``ctx.step`` returns the recorded
result of a step that completed, and runs (then records) the first one
that did not: steps run inline in the worker, a step is a record write,
not a task.  ``start`` puts the first runs due at once (one ``put_many``,
flushed), then writes the workflows in one index transaction; a first run
delivered before that transaction commits waits for it.  ``ctx.sleep`` and ``ctx.wait_event`` *park* the workflow:
the run puts the next run *parked* (``_joins``: due "never") and returns,
so no worker is held.  The workflow record names its *current* run; only
that run may record steps and only its settlement moves the workflow on,
in the transaction that settles it (a settle hook): to its next run, made
current and released there for the wake-up time (at once if the awaited
event came meanwhile; a wait without a deadline stays parked until
``send_event`` releases it), or to its end.  So a next run never starts
before it is current.  Any other run (a second start of the same id, a
run released after its workflow was cancelled) finds it is not current
and does nothing.  A run's worker killed mid-run: the same message is
delivered again (at once, to any worker of any pool) and replays; the
parked next run it may have put stays parked, never released (a record
in the schedule, nothing runs).

**Promises.**
* A step whose record committed never runs again for that workflow; the
  step running when a process was killed runs again (at least once).  So
  each step's side effect happens once per committed step record, plus
  once more for each kill during it.
* Step records are keyed by (workflow id, step number) and hold the step
  name: a replay that reaches a different name at a recorded position
  fails the workflow with NonDeterminismError (loudly, nothing recorded).
* A step that raised is recorded too: the workflow sees StepFailed (with
  the remote type and message) on the first run and on every replay.
* Records are in the LMDB index, fsynced per transaction.  With
  ``checkpoint="step"`` (the default) each step's record commits (one
  fsynced transaction) before the step returns: it is durable, also
  against a power cut, before anything that follows it runs.  With
  ``checkpoint="run"`` a step's record is one write to the worker's
  journal (``_journal``: the page cache, it survives the death of
  processes, not of the machine) and travels in the run's outcome to the
  index, written in the transaction that commits the run's ack (its park
  or its end, batched with the other acks of the pool).  The promises
  above hold for kills (a run delivered again reads the journals of its
  earlier attempts); after a power cut the steps of the runs whose
  settlement had not committed run again.  Sleeps, waits and children are
  recorded in the index in both modes (a timer's wake-up time is durable
  before it parks).  A parking run flushes its next run to disk before it
  returns, and ``start`` its first runs before its transaction, so a power
  cut cannot lose a started or a parked workflow.
* ``start`` with a ``workflow_id`` that exists returns the first one
  (whatever its arguments); ``send_event`` stores the event durably: a
  wait that comes later takes it (oldest first), one that is parked on it
  is released in the same transaction.

The records (index database ``wf.flow``) are kept by ``_flows``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from logq.tasks._records import dumps, encode_task, make_id, new_nonce
from logq.tasks._run import current
from logq.workflows._joins import NEVER
from logq.workflows._flows import (_FIRST_GIVE_UP, CANCELLED, FAILED, RUNNING, SUCCEEDED, Flows,
                                   NonDeterminismError, StepFailed, WorkflowCancelled, WorkflowError,
                                   WorkflowFailed, WorkflowStatus, _err, _fk, _NotCurrent, _pack_step,
                                   _Park)

_WAIT_SLICE = 0.25
_LOOK_EVERY = 0.02      # checkpoint="run": a run looks this often whether it was cancelled (s)
_FIRST_WAIT = 0.5       # a first run that came before its workflow's start transaction waits this long


class WorkflowContext:
    """What a workflow function gets as ``ctx``: ``id``, ``step``,
    ``sleep``, ``wait_event``, ``child``.  Everything the function does
    that is not deterministic (I/O, time, randomness) belongs in a step."""

    def __init__(self, flows: Flows, wf: "Workflow", wid: str, run: str,
                 steps: dict[int, Any] | None = None, pending: dict[int, bytes] | None = None) -> None:
        self.flows, self.wf, self.id, self.run = flows, wf, wid, run
        self._n = 0
        self._rec = flows.steps(wid) if steps is None else steps
        self._ser = flows.app._serializer(wf.serializer)
        self._per_run = wf.checkpoint == "run"
        # checkpoint="run": the step records (packed) this run carries back
        # in its outcome (those not in the index yet), and when it last
        # looked whether it is still current.
        self._carry: dict[int, bytes] = dict(pending or {})
        self._looked = time.monotonic()

    def _still_current(self) -> None:
        """checkpoint="run" looks at most every _LOOK_EVERY s (an index read)
        whether this run is still current (the workflow was not cancelled);
        checkpoint="step" does in each step's transaction."""
        now = time.monotonic()
        if now - self._looked >= _LOOK_EVERY:
            f = self.flows.flow(self.id)
            if f is None or f["current"] != self.run or f["state"] != RUNNING:
                raise _NotCurrent(self.id)
            self._looked = now

    def _carried(self) -> list[list[Any]]:
        return [[k, p.decode("latin-1")] for k, p in sorted(self._carry.items())]

    def _next(self, name: str) -> tuple[int, tuple[dict[str, Any], bytes] | None]:
        k = self._n
        self._n += 1
        rec = self._rec.get(k)
        if rec is not None and rec[0].get("name") != name:
            raise NonDeterminismError(
                f"workflow {self.id}: step {k} is recorded as {rec[0].get('name')!r} but the code "
                f"now reaches {name!r} there (did the code change, or branch on something no step "
                "recorded?)")
        return k, rec

    def step(self, fn: Callable[..., Any], *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` once: its result is recorded (one index
        transaction) and returned, also on every replay.  An exception is
        recorded too and raised as StepFailed, on every replay."""
        n = name or getattr(fn, "__qualname__", None) or repr(fn)
        k, rec = self._next(n)
        if rec is None:
            try:
                value = fn(*args, **kwargs)
                header, payload = {"name": n, "ok": True}, dumps(self._ser, value, f"the result of step {n}")
            except Exception as e:
                header, payload = {"name": n, "ok": False}, json.dumps(_err(e)).encode()
            if self._per_run:
                self._still_current()
                packed = self._carry[k] = _pack_step(header, payload)
                self.flows.journal.append(self.id, self.run, k, packed)
                rec = header, payload
            else:
                rec = self.flows.record(self.id, self.run, k, header, payload)
            self._rec[k] = rec
        header, payload = rec
        if not header.get("ok"):
            e = json.loads(payload)  # type: ignore[misc]
            raise StepFailed(n, e.get("type", ""), e.get("message", ""))
        return self._ser.loads(payload)

    def sleep(self, seconds: float) -> None:
        """Sleep durably: the workflow parks (no worker held) and resumes
        after ``seconds``, across restarts and power cuts."""
        k, rec = self._next("sleep")
        if rec is None:
            until = time.time_ns() + int(seconds * 1e9)
            rec = self.flows.record(self.id, self.run, k, {"name": "sleep", "until": until}, b"")
            self._rec[k] = rec
        until = rec[0]["until"]
        if time.time_ns() < until:
            raise _Park(self.wf._put_run(self.id, NEVER, flush=True), None, until)

    def wait_event(self, name: str, timeout: float | None = None) -> Any:
        """The value of event ``name`` sent to this workflow
        (``send_event``; one sent earlier is taken at once), parking until
        it comes; None once ``timeout`` seconds passed without it."""
        k, rec = self._next(f"event:{name}")
        if rec is None:
            until = time.time_ns() + int(timeout * 1e9) if timeout is not None else 0
            rec = self.flows.record(self.id, self.run, k, {"name": f"event:{name}", "until": until,
                                                          "done": False}, b"")
            self._rec[k] = rec
        header, payload = rec
        if not header.get("done"):
            until = header.get("until") or 0
            got = self.flows.take_event(self.id, self.run, k, header, name,
                                        bool(until) and time.time_ns() >= until)
            if got is None:
                raise _Park(self.wf._put_run(self.id, NEVER, flush=True), name, until)
            self._rec[k] = got
            header, payload = got
        if header.get("timeout"):
            return None
        return self._ser.loads(payload)

    def child(self, wf: "Workflow", *args: Any, **kwargs: Any) -> Any:
        """Run workflow ``wf`` as a child (id ``<this id>/<step>``) and
        return its result, parking until it ends; raises WorkflowFailed if
        it failed or was cancelled."""
        k, rec = self._next(f"child:{wf.name}")
        cid = f"{self.id}/{k}"
        if rec is None:
            rec = self.flows.record(self.id, self.run, k, {"name": f"child:{wf.name}", "child": cid,
                                                          "done": False}, b"")
            self._rec[k] = rec
            wf.flows().start(wf, cid, args, kwargs, parent=(self.id, f"child:{cid}"))
        header, payload = rec
        if not header.get("done"):
            got = self.flows.take_event(self.id, self.run, k, header, f"child:{cid}", False)
            if got is None:
                raise _Park(self.wf._put_run(self.id, NEVER, flush=True), f"child:{cid}", 0)
            self._rec[k] = got
            header, payload = got
        body = self._ser.loads(payload)
        if body.get("state") != SUCCEEDED:
            e = body.get("error") or {}
            raise WorkflowFailed(cid, e.get("type", body.get("state", "")), e.get("message", ""))
        return body.get("result")


class Workflow:
    """A registered workflow function: ``start(*args, workflow_id=)``."""

    def __init__(self, app: Any, fn: Callable[..., Any], name: str, serializer: str,
                 checkpoint: str = "step") -> None:
        if checkpoint not in ("step", "run"):
            raise ValueError(f"checkpoint must be 'step' or 'run', not {checkpoint!r}")
        self.app, self.fn, self.name, self.serializer = app, fn, name, serializer
        self.checkpoint = checkpoint
        self.__doc__ = fn.__doc__

    def flows(self) -> Flows:
        from logq.workflows._plugin import flows_of
        return flows_of(self.app)

    def start(self, *args: Any, workflow_id: str | None = None, **kwargs: Any) -> "WorkflowHandle":
        """Start it (durably, on return); ``workflow_id`` is the idempotency
        key: a workflow with that id that exists is returned instead."""
        wid = workflow_id or f"{self.name}-{os.urandom(6).hex()}"
        self.flows().start(self, wid, args, kwargs)
        return WorkflowHandle(self.app, wid)

    def start_many(self, calls: Any, workflow_ids: list[str] | None = None) -> list["WorkflowHandle"]:
        """Start one workflow per item of ``calls`` (each a tuple of
        positional arguments), in one index transaction: cheaper than a
        ``start`` each.  ``workflow_ids``: their idempotency keys, as for
        ``start``."""
        calls = [tuple(c) for c in calls]
        ids = list(workflow_ids) if workflow_ids is not None else \
            [f"{self.name}-{os.urandom(6).hex()}" for _ in calls]
        if len(ids) != len(calls):
            raise ValueError(f"{len(calls)} calls but {len(ids)} workflow ids")
        self.flows().start_many(self, [(w, c, {}) for w, c in zip(ids, calls)])
        return [WorkflowHandle(self.app, w) for w in ids]

    def _put_run(self, wid: str, deliver_at: float, flush: bool = False) -> str:
        """Put a run of workflow ``wid`` due at ``deliver_at``; its task id."""
        ser = self.app._serializer(self.serializer)
        nonce = new_nonce()
        q = self.app.queue
        off = q.put(encode_task(nonce, self.name, ser.name, dumps(ser, [[wid], {}], "a run")),
                    deliver_at=deliver_at)
        if flush:
            q.flush()       # on disk before the settlement that makes it current
        return make_id(off, nonce)

    def _run(self, wid: str, since: int = 0) -> dict[str, Any]:
        """The task body of a run (in a worker).  ``since``: the start time
        (ns) of a first run, put before its workflow's transaction."""
        ctx = current()
        run = ctx.id if ctx is not None else ""
        flows = self.flows()
        f, raw, steps, pending = flows.load(wid, run, ctx.attempt if ctx is not None else 1)
        if f is None and since:
            f, raw, steps, pending = self._await_start(flows, wid, run, since)
        if f is None or f["current"] != run or f["state"] != RUNNING:
            return {"noop": 1}
        ser = self.app._serializer(f["ser"])
        args, kwargs = ser.loads(raw)
        wctx = WorkflowContext(flows, self, wid, run, steps, pending)
        try:
            value = self.fn(wctx, *args, **kwargs)
        except _Park as p:
            return {"park": p.resume, "wait": p.event, "until": p.until, "steps": wctx._carried()}
        except _NotCurrent:
            return {"noop": 1}
        except Exception as e:
            return {"fail": _err(e), "steps": wctx._carried()}
        try:
            dumps(ser, value, f"the result of workflow {self.name}")
        except Exception as e:
            return {"fail": _err(e), "steps": wctx._carried()}
        return {"done": [value], "steps": wctx._carried()}

    def _await_start(self, flows: Flows, wid: str, run: str, since: int) -> Any:
        """A first run delivered before its start transaction committed:
        wait a little for it; then retry later (the attempt fails and is
        retried with the queue's backoff) while the start is recent; once
        it is old, its starter died before the transaction (``start`` never
        returned): nothing to run."""
        q = self.app.queue
        limit = time.monotonic() + _FIRST_WAIT
        while True:
            seen = q._written()
            got = flows.load(wid, run)
            if got[0] is not None:
                return got
            left = limit - time.monotonic()
            if left <= 0:
                break
            q._wait_written(seen, min(left, 0.05))
        if time.time_ns() - since < _FIRST_GIVE_UP * 1e9:
            raise WorkflowError(f"workflow {wid}: its first run came before its start committed; later")

        # Give up, in a transaction that conflicts with the start's: either
        # the start committed first (then run), or this marks the run given
        # up and that start, when it comes, fails instead of accepting a
        # workflow whose run is gone.  Never both.
        def give_up(txn: Any) -> bool:
            if txn.get(_fk(b"F", wid), db=flows.db) is not None:
                return False
            txn.put(_fk(b"X", run), b"", db=flows.db)
            return True
        if not flows._write(give_up):
            return flows.load(wid, run)
        return got

    def __repr__(self) -> str:
        return f"<logq workflow {self.name}>"


def workflow(app: Any, *, name: str | None = None, serializer: str = "json",
             checkpoint: str = "step") -> Callable[..., Workflow]:
    """Register a durable workflow on ``app``: ``@workflow(app)``.  Its
    runs are tasks of the app named after it (run by any worker of the
    app's pools).  ``checkpoint``: "step" (each step's record is one
    fsynced index transaction before the step returns) or "run" (a step's
    record is one write to the worker's journal, which survives the death
    of processes but not of the machine, and becomes durable with the
    settlement of its run, at its next park or its end: after a power
    cut, the steps since then run again)."""
    def register(fn: Callable[..., Any]) -> Workflow:
        n = name or f"{fn.__module__}.{fn.__qualname__}"
        wf = Workflow(app, fn, n, serializer, checkpoint)

        def run(wid: str, since: int = 0) -> dict[str, Any]:
            return wf._run(wid, since)
        run.__name__ = run.__qualname__ = fn.__name__
        # A run is retried after a kill as long as it takes; results of
        # runs are bookkeeping (the workflow's own result is in its record).
        app.task(name=n, retries=1 << 20, result_ttl=600.0, serializer=serializer)(run)
        app.__dict__.setdefault("_wf_names", set()).add(n)
        app.__dict__.setdefault("_workflows", {})[n] = wf
        return wf
    return register


class WorkflowHandle:
    """A durable workflow, by id: usable from any process on the queue."""

    def __init__(self, app: Any, wid: str) -> None:
        self.app, self.id = app, wid

    def _flows(self) -> Flows:
        from logq.workflows._plugin import flows_of
        return flows_of(self.app)

    def status(self) -> WorkflowStatus:
        return self._flows().status(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Its return value once it succeeded: blocks up to ``timeout`` s
        (woken by the commits that settle runs, in any process).  Raises
        WorkflowFailed, WorkflowCancelled, TaskNotFound or TimeoutError."""
        flows = self._flows()
        q = self.app.queue
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = q._written()
            state, value = flows.result(self.id)
            if state == SUCCEEDED:
                return value
            if state == FAILED:
                e = value or {}
                raise WorkflowFailed(self.id, e.get("type", ""), e.get("message", ""))
            if state == CANCELLED:
                raise WorkflowCancelled(f"workflow {self.id} was cancelled")
            left = _WAIT_SLICE if limit is None else min(_WAIT_SLICE, limit - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"workflow {self.id} did not finish within {timeout}s")
            q._wait_written(seen, left)

    def send_event(self, name: str, value: Any = None) -> bool:
        return self._flows().send_event(self.id, name, value)

    def cancel(self) -> bool:
        return self._flows().cancel(self.id)

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id}>"


def send_event(app: Any, wid: str, name: str, value: Any = None) -> bool:
    """Send event ``name`` (with ``value``) to workflow ``wid``; see
    Flows.send_event."""
    return WorkflowHandle(app, wid).send_event(name, value)


def get_workflow(app: Any, wid: str) -> WorkflowHandle:
    """The handle of a durable workflow by id; raises TaskNotFound."""
    h = WorkflowHandle(app, wid)
    h.status()
    return h


__all__ = ["workflow", "Workflow", "WorkflowContext", "WorkflowHandle", "WorkflowStatus",
           "send_event", "get_workflow", "WorkflowError", "NonDeterminismError", "StepFailed",
           "WorkflowFailed", "WorkflowCancelled"]

"""Running tasks on the WorkerPool: the handler that runs in each worker
(``Runner``), the pool-side decision of each attempt's ack or nack and
what is written with it (``Settler``), and ``current()``.

An attempt's outcome travels back from the worker as a tuple; the pool's
process writes it (``Store.record``) inside the transaction that commits
the ack (succeeded), the nack (failed, retried with the queue's backoff) or
the dead letter (failed for good: out of retries, an error not in
``retry_on``, an unknown task name; ``logq tasks retry`` runs it again) it
causes.  A worker or pool killed mid-task records
nothing: its message is delivered again, the attempt counted; the attempt
after the last allowed one fails the task without running it.

A watchdog thread in each worker marks a task running for more than
``_MARK_AFTER`` s in the lease table (worker pid, attempt, start), looks
for its cancellation there and in the index, and enforces the task's
``timeout`` and the cancel grace by SIGKILLing its own process (the pool
replaces it); the reason is left in the marker for the pool to record.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from typing import Any

from logq._errors import (ResultTooLargeError, SerializationError, TaskError, UnknownTaskError)
from logq.tasks import _state as S
from logq.tasks._census import Tally
from logq.tasks._records import Outcome, decode_task, dumps, error_json, state_of

_MARK_AFTER = 0.05      # a task running this long gets a marker (s)
_LOOK = 0.02            # the watchdog looks this often (s)
_local = threading.local()
# The state an attempt's outcome leads to from running (next_state, looked up once).
_AFTER_RUNNING = {e: S.next_state(S.RUNNING, e) for e in (S.SUCCEED, S.FAIL, S.GIVE_UP)}


class TaskContext:
    """What a running task can know: its ``id``, ``name``, ``attempt``, and
    ``cancelled`` (True once ``cancel()`` was called for it: return soon;
    after the app's ``cancel_grace`` seconds the worker is killed)."""

    def __init__(self, task_id: str, name: str, attempt: int) -> None:
        self.id = task_id
        self.name = name
        self.attempt = attempt
        self.cancelled = False


def current() -> TaskContext | None:
    """The task running in this thread (in a worker), else None."""
    return getattr(_local, "ctx", None)


def _err(e: BaseException, tb: str | None = None) -> tuple[str, str, str]:
    t = type(e)
    name = t.__qualname__ if t.__module__ in ("builtins", None) else f"{t.__module__}.{t.__qualname__}"
    return name, str(e), tb if tb is not None else "".join(traceback.format_exception(e))


class Runner:
    """The pool's handler: decode a task message, run it, return its
    outcome ``(event, task id, payload, started ns, finished ns, serializer,
    name, attempt)``.  Picklable: it carries only the app's import path."""

    def __init__(self, app_spec: str, path: str, extensions: tuple[str, ...] = ()) -> None:
        self.app_spec = app_spec
        self.path = path
        self.extensions = extensions    # modules that registered App.extensions in the pool's process
        self._app: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"app_spec": self.app_spec, "path": self.path, "extensions": self.extensions}

    def __setstate__(self, st: dict[str, Any]) -> None:
        self.app_spec, self.path = st["app_spec"], st["path"]
        self.extensions = st.get("extensions", ())
        self._app = None

    def _load(self) -> Any:
        import importlib
        for m in self.extensions:
            importlib.import_module(m)
        mod, _, attr = self.app_spec.partition(":")
        app: Any = importlib.import_module(mod)
        for part in attr.split("."):
            app = getattr(app, part)
        app.path = self.path        # the pool's queue, wherever the app's module points
        app._extend()
        self._app = app
        self._store = app._store()
        self._running: tuple[Any, ...] | None = None
        self._marked: Any = None
        threading.Thread(target=self._watch, daemon=True, name="logq-task-watch").start()
        return app

    def __call__(self, m: Any) -> tuple[Any, ...]:
        app = self._app or self._load()
        rec = decode_task(m.data)
        if rec is None:
            return (None,)      # not a task: acked, nothing recorded
        tid = rec.task_id(m.offset)
        sub = m.ts_ns

        def give_up(e: BaseException, tb: str = "") -> tuple[Any, ...]:
            now = time.time_ns()
            return (S.GIVE_UP, tid, error_json(*_err(e, tb)), now, now, "", rec.name, m.attempt, sub)
        raw = self._store.idx.read(lambda t: t.get(tid.encode(), db=self._store.outcome))
        if raw is not None and state_of(raw) in S.FINAL:
            return (None,)      # cancelled (or finished) before it started: never runs
        task = app._tasks.get(rec.name)
        if task is None:
            return give_up(UnknownTaskError(
                f"unknown task name {rec.name!r}: this worker's app {self.app_spec} registers "
                f"{sorted(app._tasks)}; `logq tasks retry {tid}` once a worker knows it"))
        if m.attempt > task.retries + 1:
            return give_up(TaskError(f"attempt {m.attempt} of a task allowed {task.retries + 1}: "
                                     "its process died (SIGKILL, crash) during its last attempt"))
        try:
            ser = app._serializer(rec.serializer)
            args, kwargs = ser.loads(rec.args)
        except Exception as e:
            return give_up(SerializationError(f"the arguments of task {tid} cannot be decoded: "
                                              f"{type(e).__name__}: {e}"))
        try:
            for h in app.run_hooks:
                args, kwargs = h(tid, rec.name, args, kwargs)
        except Exception as e:
            return give_up(e)
        ctx = TaskContext(tid, rec.name, m.attempt)
        started = time.time_ns()
        self._running = (ctx, time.monotonic(), task.timeout, started)
        _local.ctx = ctx
        try:
            value = task.fn(*args, **kwargs)
        except Exception as e:
            finished = time.time_ns()
            retry = isinstance(e, task.retry_on) and m.attempt <= task.retries
            return (S.FAIL if retry else S.GIVE_UP, tid, error_json(*_err(e)), started, finished, "",
                    rec.name, m.attempt, sub)
        finally:
            _local.ctx = None
            self._running = None
        finished = time.time_ns()
        try:
            payload = dumps(ser, value, f"the result of task {rec.name} ({tid})")
        except SerializationError as e:
            return give_up(e)
        if len(payload) > app.max_result_bytes:
            return give_up(ResultTooLargeError(
                f"the result of task {rec.name} ({tid}) is {len(payload)} bytes encoded, over "
                f"max_result_bytes={app.max_result_bytes}: store it elsewhere and return a reference"))
        return (S.SUCCEED, tid, payload, started, finished, ser.name, rec.name, m.attempt, sub)

    # -- the watchdog ------------------------------------------------------------------
    def _mark(self, value: dict[str, Any] | None) -> None:
        st = self._store
        key = os.getpid().to_bytes(8, "big")

        def fn(vt: Any) -> None:
            if value is None:
                vt.delete(key, db=st.running)
            else:
                vt.put(key, json.dumps(value).encode(), db=st.running)
        st.scratch.write(fn)

    def _watch(self) -> None:
        app = self._app
        cancel_seen = None
        while True:
            time.sleep(_LOOK)
            try:
                run = self._running
                if run is None:
                    if self._marked is not None:
                        self._mark(None)
                        self._marked = None
                    cancel_seen = None
                    continue
                ctx, t0, timeout, started = run
                now = time.monotonic()
                if now - t0 < _MARK_AFTER:
                    continue
                info = {"id": ctx.id, "attempt": ctx.attempt, "started": started / 1e9}
                if self._marked is not ctx:
                    self._mark(info)
                    self._marked = ctx
                    cancel_seen = None
                if not ctx.cancelled:
                    raw = self._store.idx.read(lambda t: t.get(ctx.id.encode(), db=self._store.outcome))
                    if raw is not None and state_of(raw) == S.CANCELLED:
                        ctx.cancelled = True
                        cancel_seen = now
                why = None
                if timeout is not None and now - t0 > timeout:
                    why = f"TaskTimeout: ran longer than timeout={timeout}s: its worker was killed"
                elif cancel_seen is not None and now - cancel_seen > app.cancel_grace:
                    why = (f"TaskCancelled: still running {app.cancel_grace}s after cancel(): its "
                           "worker was killed")
                if why is not None and self._running is run:
                    self._mark(dict(info, why=why))
                    os.kill(os.getpid(), signal.SIGKILL)
            except Exception:   # pragma: no cover - the watchdog must not die
                pass


class Settler:
    """The pool's ``on_outcome``: each message's ack or nack, and the
    outcome written in the transaction that commits it; expired outcomes
    are purged in those transactions too."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app._store()
        self._last_purge = 0.0
        app._extend()

    def __call__(self, msgs: list[Any], values: list[Any] | None,
                 failures: dict[int, str]) -> tuple[list[Any], Any, list[Any]]:
        acks: list[Any] = []
        entries: list[tuple[Any, ...]] = []
        nacks: list[tuple[Any, ...]] = []
        waits: dict[str, int] = {}      # task id -> ns from due to its first attempt's start
        for i, m in enumerate(msgs):
            why = failures.get(m.offset)
            v = values[i] if values is not None and why is None else None
            if why is not None:
                v = self._lost(m, why)
            if v is None or v[0] is None:
                acks.append(m)
                continue
            if v[7] == 1 and v[3]:
                waits[v[1]] = v[3] - max(m.ts_ns, m.due or 0)
            if v[0] == S.FAIL:
                err = json.loads(v[2])
                nacks.append((m, f"{err['type']}: {err['message']}", self._writer([v], waits=waits)))
            elif v[0] == S.GIVE_UP and not self._cancelled(v):
                # Out of retries: to the group's dead letters (with its
                # payload), the failed outcome in the same transaction.
                err = json.loads(v[2])
                nacks.append((m, f"{err['type']}: {err['message']}", self._writer([v], waits=waits), True))
            else:
                acks.append(m)
                entries.append(v)
        now = time.monotonic()
        purge = now - self._last_purge >= 1.0
        if purge:
            self._last_purge = now
        write = self._writer(entries, purge, waits) if entries or purge else None
        return acks, write, nacks

    def _writer(self, entries: list[tuple[Any, ...]], purge: bool = False,
                waits: dict[str, int] | None = None) -> Any:
        store, app = self.store, self.app

        def write(txn: Any) -> None:
            counted = []    # for the operators' counters, added to once per transaction
            hooks = app.settle_hooks
            for event, tid, payload, started, finished, ser, name, attempt, sub in entries:
                final = event != S.FAIL
                ttl = app._ttl(name)
                state = _AFTER_RUNNING.get(event) or S.next_state(S.RUNNING, event)
                out = Outcome(state, attempt, sub, started, finished if final else 0,
                              finished + int(ttl * 1e9) if final and ttl else 0, ser, name, payload)
                if store.record(txn, tid, event, out):
                    for h in hooks:
                        h(txn, tid, event, out)
                    counted.append((name, event, started, finished, waits.get(tid) if waits else None))
            if counted:
                tally = Tally()
                tally.settled_all(counted)
                tally.apply(txn, store.counters)
            if purge:
                store.purge_expired(txn, time.time_ns())
        return write

    def _cancelled(self, v: tuple[Any, ...]) -> bool:
        """Whether a task that gave up was cancelled (killed after the
        grace, or it raised once it saw ``cancelled``): acked, not a dead
        letter; its cancelled outcome stands."""
        if json.loads(v[2]).get("type", "").startswith("TaskCancelled"):
            return True
        st = self.store
        raw = st.idx.read(lambda t: t.get(v[1].encode(), db=st.outcome))
        return raw is not None and state_of(raw) == S.CANCELLED

    def _lost(self, m: Any, why: str) -> tuple[Any, ...] | None:
        """The outcome of an attempt whose worker died, timed out (the
        pool's timeout) or whose handler raised (a bug here)."""
        rec = decode_task(m.data)
        if rec is None:
            return None
        tid = rec.task_id(m.offset)
        # A reason left by the worker's watchdog (its own timeout, a cancel).
        for _tid, (pid, mk) in self._dead_markers(tid).items():
            why = mk.get("why") or why
        task = self.app._tasks.get(rec.name)
        retries = task.retries if task is not None else 0
        kind, _, msg = why.partition(": ")
        if not msg:
            kind, msg = "WorkerLost", why
        event = S.FAIL if m.attempt <= retries and not kind.startswith("TaskCancelled") else S.GIVE_UP
        now = time.time_ns()
        return (event, tid, error_json(kind, msg, why), 0, now, "", rec.name, m.attempt, m.ts_ns)

    def _dead_markers(self, tid: str) -> dict[str, Any]:
        """Markers of dead workers that ran ``tid`` (deleted as read)."""
        st = self.store
        found: dict[str, Any] = {}

        def fn(vt: Any) -> None:
            for k, v in list(vt.cursor(db=st.running).iternext()):
                try:
                    mk = json.loads(bytes(v))
                except ValueError:
                    continue
                pid = int.from_bytes(k, "big")
                if mk.get("id") == tid:
                    from logq._status import pid_alive
                    if not pid_alive(pid):
                        found[tid] = (pid, mk)
                        vt.delete(k, db=st.running)
        st.scratch.write(fn)
        return found

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
import struct
import signal
import threading
import time
import traceback
from typing import Any

from logq._errors import (ResultTooLargeError, SerializationError, TaskError, UnknownTaskError)
from logq.tasks import _state as S
from logq.tasks._census import Tally
from logq.tasks._records import (EXPIRES_AT, Outcome, decode_task, dumps, error_json, make_id,
                                 pack_outcome, state_of, task_head)

_MARK_AFTER = 0.05      # a task running this long gets a marker (s)
_LOOK = 0.02            # the watchdog looks this often (s)
_local = threading.local()
# The state an attempt's outcome leads to from running (next_state, looked up
# once), as its index in STATES (how an outcome record holds it).
_AFTER_RUNNING = {e: S.STATES.index(S.next_state(S.RUNNING, e)) for e in (S.SUCCEED, S.FAIL, S.GIVE_UP)}
_FINAL_INDEX = frozenset(S.STATES.index(x) for x in S.FINAL)
_EXPIRES = struct.Struct("<Q")
_SUCCEED = S.SUCCEED


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


def outcome(event: str, key: bytes, attempt: int, submitted: int, started: int, finished: int,
            ser: bytes, name: str, payload: bytes, ttl: float | None) -> tuple[Any, ...]:
    """What a worker sends back for an attempt that ran (or gave up): the
    value the Settler stores, ``(event, task id as bytes, the packed
    Outcome, task name, started ns, finished ns)``.  The outcome is packed
    here, in the worker, so that the pool's process (one for all workers)
    only stores it."""
    final = event != S.FAIL
    return (event, key, pack_outcome(_AFTER_RUNNING[event], attempt, submitted, started,
                                     finished if final else 0,
                                     finished + int(ttl * 1e9) if final and ttl else 0,
                                     ser, name.encode(), payload),
            name, started, finished)


class Runner:
    """The pool's handler: decode a task message, run it, return its
    outcome (``outcome``: packed here; the pool's Settler stores it with
    the ack or nack), or ``(None,)``: nothing to record.  Picklable: it
    carries only the app's import path."""

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
        # Unpickled as a worker starts: load the app now, not in the first
        # task (a worker's first task paid for the imports and the store's
        # opening: tens of ms, seen as a stall of its whole first batch).
        # A failure here is raised again, with its cause, by that first task.
        try:
            self._load()
        except Exception:
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
        self._env = self._store.idx.env
        self._sers: dict[str, tuple[Any, bytes]] = {}    # serializer name -> (it, its name as bytes)
        self._running: tuple[Any, ...] | None = None
        self._marked: Any = None
        threading.Thread(target=self._watch, daemon=True, name="logq-task-watch").start()
        return app

    def _outcome_raw(self, key: bytes) -> bytes | None:
        """The task's recorded outcome, read now (a fresh snapshot: a cancel
        committed before this look is seen)."""
        st = self._store
        try:
            with self._env.begin() as t:
                return t.get(key, db=st.outcome)
        except Exception:       # (the map grew in another process: the index's own read handles it)
            return st.idx.read(lambda t: t.get(key, db=st.outcome))

    def _give_up(self, e: BaseException, key: bytes, name: str, m: Any, tb: str = "") -> tuple[Any, ...]:
        now = time.time_ns()
        return outcome(S.GIVE_UP, key, m.attempt, m.ts_ns, now, now, b"", name, error_json(*_err(e, tb)),
                       self._app._ttl(name))

    def __call__(self, m: Any) -> tuple[Any, ...]:
        app = self._app or self._load()
        data = m.data
        head = task_head(data)
        if head is None:
            return (None,)      # not a task: acked, nothing recorded
        nonce, name, sername, origin, name_b, _ser_b, at = head
        tid = origin or make_id(m.offset, nonce)
        key = tid.encode()
        raw = self._outcome_raw(key)
        if raw is not None and raw[0] in _FINAL_INDEX:
            return (None,)      # cancelled (or finished) before it started: never runs
        task = app._tasks.get(name)
        if task is None:
            return self._give_up(UnknownTaskError(
                f"unknown task name {name!r}: this worker's app {self.app_spec} registers "
                f"{sorted(app._tasks)}; `logq tasks retry {tid}` once a worker knows it"), key, name, m)
        attempt = m.attempt
        if attempt > task.retries + 1:
            return self._give_up(TaskError(f"attempt {attempt} of a task allowed {task.retries + 1}: "
                                           "its process died (SIGKILL, crash) during its last attempt"),
                                 key, name, m)
        sers = self._sers.get(sername)
        try:
            if sers is None:
                ser = app._serializer(sername)
                sers = self._sers[sername] = (ser, ser.name.encode())
            args, kwargs = sers[0].loads(bytes(data[at:]))
        except Exception as e:
            return self._give_up(SerializationError(f"the arguments of task {tid} cannot be decoded: "
                                                    f"{type(e).__name__}: {e}"), key, name, m)
        ser, ser_b = sers
        hooks = app.run_hooks
        if hooks:
            try:
                for h in hooks:
                    args, kwargs = h(tid, name, args, kwargs)
            except Exception as e:
                return self._give_up(e, key, name, m)
        ctx = TaskContext(tid, name, attempt)
        started = time.time_ns()
        self._running = (ctx, time.monotonic(), task.timeout, started)
        _local.ctx = ctx
        try:
            value = task.fn(*args, **kwargs)
        except Exception as e:
            finished = time.time_ns()
            retry = isinstance(e, task.retry_on) and attempt <= task.retries
            return outcome(S.FAIL if retry else S.GIVE_UP, key, attempt, m.ts_ns, started, finished, b"",
                           name, error_json(*_err(e)), task.options.result_ttl)
        finally:
            _local.ctx = None
            self._running = None
        finished = time.time_ns()
        try:
            payload = dumps(ser, value, f"the result of task {name} ({tid})")
        except SerializationError as e:
            return self._give_up(e, key, name, m)
        if len(payload) > app.max_result_bytes:
            return self._give_up(ResultTooLargeError(
                f"the result of task {name} ({tid}) is {len(payload)} bytes encoded, over "
                f"max_result_bytes={app.max_result_bytes}: store it elsewhere and return a reference"),
                key, name, m)
        ttl = task.options.result_ttl
        # (outcome(), inlined: this is every task's path)
        return (_SUCCEED, key, pack_outcome(_AFTER_RUNNING[_SUCCEED], attempt, m.ts_ns, started, finished,
                                            finished + int(ttl * 1e9) if ttl else 0, ser_b, name_b, payload),
                name, started, finished)

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


# The pool's text for a message whose record was gone when its worker read
# it (dropped by max_bytes, or lost to damage): that worker sends no value
# for it, so the batch's values are one short for each.
_GONE = "the record is no longer in the log"


def _align(msgs: list[Any], values: list[Any] | None,
           failures: dict[int, str]) -> tuple[list[Any], dict[int, str]]:
    """One value per message: None where none came back (no values at
    all: a dead worker's message; the gone records of a batch).  A shape
    that cannot be told apart settles every message without a failure of
    its own as lost (it runs again: at least once), never one message with
    another's outcome."""
    if values is None:
        return [None] * len(msgs), failures
    gone = {o for o, why in failures.items() if why == _GONE}
    if len(values) + sum(1 for m in msgs if m.offset in gone) == len(msgs):
        it = iter(values)
        return [None if m.offset in gone else next(it) for m in msgs], failures
    lost = dict(failures)
    for m in msgs:
        lost.setdefault(m.offset, "WorkerLost: the worker's values did not match its batch")
    return [None] * len(msgs), lost


def _later_final(txn: Any, db: Any, key: bytes, failed: Outcome) -> bool:
    """Whether the final outcome stored for ``key`` is of a later attempt
    than the ``failed`` one."""
    raw = txn.get(key, db=db)
    return raw is not None and Outcome.unpack(raw).attempts > failed.attempts


class Settler:
    """The pool's ``on_outcome``: each message's ack or nack, and the
    outcome written in the transaction that commits it; expired outcomes
    are purged in those transactions too.

    The outcomes come packed from the workers (``outcome``): a first
    outcome of a task is one put that must not overwrite (LMDB's
    NOOVERWRITE: no read before it); only a task that has an outcome
    already (an earlier failed attempt, a cancel, a redelivery) goes
    through ``Store.record`` and the state machine.  The expiry entries of
    a transaction's outcomes are one entry per TTL (``Store.expire``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app._store()
        self._last_purge = 0.0
        app._extend()

    def __call__(self, msgs: list[Any], values: list[Any] | None,
                 failures: dict[int, str]) -> tuple[list[Any], Any, list[Any]]:
        now = time.monotonic()
        purge = now - self._last_purge >= 1.0
        if purge:
            self._last_purge = now
        if values is None or len(values) != len(msgs):
            values, failures = _align(msgs, values, failures)
        if not failures and all(v[0] == _SUCCEED for v in values):
            # The usual batch: every attempt succeeded, every message is acked.
            waits: list[int | None] = []    # per entry: ns from due to its first attempt's start
            add = waits.append
            lease = first = due = None
            for m, v in zip(msgs, values):
                if m._l is not lease:       # (a batch's messages share their lease until one changes)
                    lease = m._l
                    first, due = lease.attempt == 1, lease.due or 0
                if first:
                    ts = m.ts_ns
                    add(v[4] - (ts if ts > due else due))
                else:
                    add(None)
            return msgs, self._writer(values, waits, purge) if values or purge else None, []
        acks: list[Any] = []
        entries: list[tuple[Any, ...]] = []
        waits = []
        nacks: list[tuple[Any, ...]] = []
        for m, v in zip(msgs, values):
            if failures:
                why = failures.get(m.offset)
                if why is not None:
                    v = self._lost(m, why)
            if v is None or v[0] is None:
                acks.append(m)
                continue
            event = v[0]
            wait = v[4] - max(m.ts_ns, m.due or 0) if v[4] and m.attempt == 1 else None
            if event == _SUCCEED:
                acks.append(m)
                entries.append(v)
                waits.append(wait)
            elif event == S.FAIL:
                nacks.append((m, self._reason(v), self._writer([v], [wait])))
            elif event == S.GIVE_UP and not self._cancelled(v):
                # Out of retries: to the group's dead letters (with its
                # payload), the failed outcome in the same transaction.
                nacks.append((m, self._reason(v), self._writer([v], [wait]), True))
            else:
                acks.append(m)
                entries.append(v)
                waits.append(wait)
        write = self._writer(entries, waits, purge) if entries or purge else None
        return acks, write, nacks

    @staticmethod
    def _reason(v: tuple[Any, ...]) -> str:
        """A failed attempt's error as the nack's text (``type: message``)."""
        err = json.loads(Outcome.unpack(v[2]).payload)
        return f"{err['type']}: {err['message']}"

    def _writer(self, entries: list[tuple[Any, ...]], waits: list[int | None],
                purge: bool = False) -> Any:
        store, app = self.store, self.app

        def write(txn: Any) -> None:
            put, db, hooks, many = txn.put, store.outcome, app.settle_hooks, app.settle_batch_hooks
            absorbed: set[bytes] = set()     # ids whose outcome changed nothing (a final one stood)
            changed: list[tuple[str, str, Outcome]] = []    # for the batch hooks
            expiring: dict[int, list[Any]] = {}     # TTL ns -> [latest expiry, keys]
            ttls: dict[str, int] = {}                # task name -> this app's result_ttl in ns
            for event, key, packed, name, _started, finished in entries:
                out = None
                # The TTL is this process's (the worker packed its own).
                ttl = ttls.get(name)
                if ttl is None:
                    ttl = ttls[name] = int((app._ttl(name) or 0) * 1e9)
                exp = finished + ttl if ttl and event != S.FAIL else 0
                if exp != _EXPIRES.unpack_from(packed, EXPIRES_AT)[0]:
                    packed = packed[:EXPIRES_AT] + _EXPIRES.pack(exp) + packed[EXPIRES_AT + 8:]
                if put(key, packed, db=db, overwrite=False):
                    # The task's first outcome (the usual case): stored.
                    if exp:
                        e = expiring.get(ttl)
                        if e is None:
                            expiring[ttl] = [exp, key]
                        else:
                            if exp > e[0]:
                                e[0] = exp
                            e.append(key)
                else:
                    # It has one: the state machine decides (a final one absorbs).
                    out = Outcome.unpack(packed)
                    if not store.record(txn, key.decode(), event, out):
                        if event != S.FAIL or not _later_final(txn, db, key, out):
                            absorbed.add(key)
                        # (else the failure of an earlier attempt, whose nack
                        # commits after the ack of the retry that finished
                        # first: the state stands, the retry is counted)
                        continue
                if hooks or many:
                    if out is None:
                        out = Outcome.unpack(packed)
                    tid = key.decode()
                    for h in hooks:
                        h(txn, tid, event, out)
                    if many:
                        changed.append((tid, event, out))
            if changed:
                for hm in many:
                    hm(txn, changed)
            for e in expiring.values():
                store.expire(txn, e[0], e[1:])
            vs, ws = entries, waits
            if absorbed:
                kept = [i for i, v in enumerate(entries) if v[1] not in absorbed]
                vs, ws = [entries[i] for i in kept], [waits[i] for i in kept]
            if vs:
                tally = Tally()
                tally.settled_all(vs, ws)
                tally.apply(txn, store.counters)
            if purge:
                store.purge_expired(txn, time.time_ns())
        return write

    def _cancelled(self, v: tuple[Any, ...]) -> bool:
        """Whether a task that gave up was cancelled (killed after the
        grace, or it raised once it saw ``cancelled``): acked, not a dead
        letter; its cancelled outcome stands."""
        if json.loads(Outcome.unpack(v[2]).payload).get("type", "").startswith("TaskCancelled"):
            return True
        st = self.store
        raw = st.idx.read(lambda t: t.get(v[1], db=st.outcome))
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
        return outcome(event, tid.encode(), m.attempt, m.ts_ns, 0, now, b"", rec.name,
                       error_json(kind, msg, why), self.app._ttl(rec.name))

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

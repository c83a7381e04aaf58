"""App, the task decorator, and handles.

    app = App("/var/lib/app/q")
    @app.task(retries=3, timeout=30, retry_on=(IOError,), result_ttl=86400)
    def resize(path, width): ...
    h = resize.delay("a.jpg", 200)          # TaskHandle
    h.status(); h.result(timeout=5); h.cancel(); app.get(h.id)

Submitting is one put of the task record (``_records``): durable as the
queue's fsync policy says, with the queue's priority, delay/eta and
idempotency key.  Any process that opens the same directory can follow a
task by its id, also after restarts.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

from logq._errors import (TaskCancelled, TaskError, TaskFailed, UnknownTaskError)
from logq._queue import Queue
from logq.tasks import _state as S
from logq.tasks._records import (JSON, PICKLE, Serializer, dumps, encode_task, make_id,
                                 new_nonce)
from logq.tasks._store import GROUP_NAME, Store, TaskStatus

# result() sleeps at most this long before it looks at a task's whole status
# (a backstop: commits wake it, in any process).
_WAIT_SLICE = 0.25

# This process's pid, kept fresh across forks (a queue opened before a fork
# is the parent's: the child opens its own).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


@dataclass(frozen=True)
class TaskOptions:
    retries: int = 3                   # attempts after the first, on errors in retry_on
    timeout: float | None = None       # an attempt running longer: its worker is killed (s)
    priority: int = 0                  # 0..9, higher first (the queue's priorities)
    result_ttl: float | None = 86400.0 # a finished task's record and result are kept this long (s)
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    serializer: str = "json"           # arguments and result: "json", "pickle" or one registered
    # Flow control (logq.tasks._flow), across every pool of the directory:
    concurrency: int | None = None     # at most this many of this task running at once
    rate_limit: str | None = None      # "N/s", "N/m", "N/h", "N/d": starts at most this often
    serialize_by: Any = None           # argument name or callable(*args, **kwargs): one at a time per key


class Task:
    """A registered function.  Call it directly to run it here; ``delay``
    or ``apply_async`` to submit it."""

    def __init__(self, app: "App", fn: Callable[..., Any], name: str, opts: TaskOptions) -> None:
        self.app, self.fn, self.name, self.options = app, fn, name, opts
        self.retries, self.timeout, self.retry_on = opts.retries, opts.timeout, opts.retry_on
        self._what = f"the arguments of task {name}"
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def s(self, *args: Any, **kwargs: Any) -> "Signature":
        """This task with these arguments, not submitted (``logq.workflows``
        composes them; in a chain it gets the previous result first)."""
        return Signature(self, args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> "Signature":
        """Like ``s``, immutable: a chain does not pass it the previous result."""
        return Signature(self, args, kwargs, immutable=True)

    def delay(self, *args: Any, **kwargs: Any) -> "TaskHandle":
        """Submit with these arguments and the task's defaults."""
        return self.apply_async(args=args, kwargs=kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> "TaskHandle":
        """``delay`` for asyncio (see ``aapply_async``)."""
        return await self.aapply_async(args=args, kwargs=kwargs)

    async def aapply_async(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                           **options: Any) -> "TaskHandle":
        """``apply_async`` for asyncio: the same submission (one put, durable
        as the queue's fsync policy says), run on the event loop's default
        executor (it may wait for an fsync, or open the queue); the same
        options and errors.  Submitted even if the awaiting task is
        cancelled once it started."""
        import asyncio
        import functools
        job = functools.partial(self.apply_async, args, kwargs, **options)
        return await asyncio.get_running_loop().run_in_executor(None, job)

    def apply_async(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, *,
                    delay: float | None = None, eta: float | None = None,
                    priority: int | None = None, key: str | None = None) -> "TaskHandle":
        """Submit; the handle.  ``delay`` seconds or ``eta`` (epoch seconds):
        not before then.  ``key``: if a task was submitted with this key
        within the queue's ``dedup_window``, its handle is returned and
        nothing new is stored.  Raises SerializationError (a TypeError) for
        arguments the serializer cannot encode, nothing stored."""
        opts = self.options
        ser = self.app._serializer(opts.serializer)
        if opts.serialize_by is not None:
            from logq.tasks._flow import serialize_key
            serialize_key(self, args, kwargs or {})     # a missing key argument: refused here
        body = dumps(ser, [list(args), dict(kwargs) if kwargs else {}], self._what)
        nonce = new_nonce()
        off = self.app.queue.put(encode_task(nonce, self.name, ser.name, body), key=key,
                                 priority=opts.priority if priority is None else priority,
                                 delay=delay, deliver_at=eta)
        if key is not None:
            found = self.app._store().load(off)
            if found is not None:
                return TaskHandle(self.app, found[0].task_id(off))
        return TaskHandle(self.app, make_id(off, nonce), known=True)

    def __repr__(self) -> str:
        return f"<logq task {self.name}>"


@dataclass(frozen=True)
class Signature:
    """A task and its arguments, not yet submitted; ``delay()`` submits it."""
    task: Task
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    immutable: bool = False

    def delay(self) -> "TaskHandle":
        return self.task.apply_async(self.args, self.kwargs)


class TaskHandle:
    """A submitted task, by id: usable from any process on the queue."""

    def __init__(self, app: "App", task_id: str, known: bool = False) -> None:
        self.app = app
        self.id = task_id
        self._known = known     # just submitted or looked up here: result() need not check it exists

    def status(self) -> TaskStatus:
        """Its state now (see TaskStatus); raises TaskNotFound."""
        return self.app._store().status(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Its return value, once it succeeded: blocks up to ``timeout``
        seconds (None: forever).  It sleeps until a commit in any process
        writes an outcome (the control block's WRITTEN count: a futex,
        no polling; on the pure codec a missed wake-up costs at most 1 ms),
        then looks for its own.  Raises TaskFailed (remote type, message,
        traceback), TaskCancelled, TaskNotFound, or TimeoutError."""
        if self._known:
            # The first look, without the generator (a result that is there
            # already: the common case of a reader behind its tasks).
            out = self.app._store().recorded(self.id)
            if out is not None and out.state in S.FINAL:
                return self._final(out)
        q = self.app.queue
        looks = self._looks(timeout)
        woke = None     # (a generator's first send)
        try:
            while True:
                seen, left = looks.send(woke)
                woke = q._wait_written(seen, left)
        except StopIteration as done:
            return done.value

    async def aresult(self, timeout: float | None = None) -> Any:
        """``result`` for asyncio: the same looks (LMDB reads, on the event
        loop), the sleeps between them on a watcher of the WRITTEN count
        (``logq.aio.written_changed``: one thread per queue and event loop,
        not one per waiter).  The same return value and exceptions."""
        import asyncio

        from logq import aio      # (here: the tasks layer does not depend on the adapter)
        if self.app._st is None:
            await asyncio.get_running_loop().run_in_executor(None, self.app._store)  # opens the queue
        q = self.app.queue
        looks = self._looks(timeout)
        woke = None     # (a generator's first send)
        try:
            while True:
                seen, left = looks.send(woke)
                woke = await aio.written_changed(q, seen, left)
        except StopIteration as done:
            return done.value

    def _looks(self, timeout: float | None) -> Generator[tuple[int, float], bool | None, Any]:
        """What ``result`` does between its sleeps: each look yields (the
        WRITTEN count it read before looking, seconds to sleep on it) and is
        sent whether the count moved; it returns the value or raises."""
        store = self.app._store()
        q = self.app.queue
        limit = None if timeout is None else time.monotonic() + timeout
        woke: bool | None = self._known      # (a handle of a task known to exist skips the first whole status)
        while True:
            seen = q._written()     # before looking: a commit after this look wakes the wait
            out = store.recorded(self.id)
            if out is not None and out.state in S.FINAL:
                return self._final(out)
            if not woke:
                # The first look (unless the handle is known), and each
                # slice that passed without a wake: the whole status (an
                # unknown or expired id raises TaskNotFound; a dead letter
                # without an outcome is failed).
                st = store.status(self.id)
                if st.state == S.FAILED:
                    e = st.error or {}
                    raise TaskFailed(self.id, e.get("type", ""), e.get("message", ""), e.get("traceback", ""))
            left = _WAIT_SLICE if limit is None else min(_WAIT_SLICE, limit - time.monotonic())
            if left <= 0:
                raise TimeoutError(f"task {self.id} did not finish within {timeout}s")
            woke = yield seen, left

    def _final(self, out: Any) -> Any:
        if out.state == S.SUCCEEDED:
            return self.app._serializer(out.serializer).loads(out.payload)
        e = out.error() or {}
        if out.state == S.CANCELLED:
            raise TaskCancelled(f"task {self.id} was cancelled")
        raise TaskFailed(self.id, e.get("type", ""), e.get("message", ""), e.get("traceback", ""))

    def cancel(self) -> bool:
        """Cancel it, durably: a task not started never starts; a running
        one sees ``current().cancelled`` and is killed after the app's
        ``cancel_grace`` seconds.  False if it had finished already."""
        return self.app.cancel(self.id)

    def __repr__(self) -> str:
        return f"<TaskHandle {self.id}>"


class App:
    """The tasks of one queue directory.  ``queue_options`` go to
    ``logq.open``; the queue is opened on first use, in each process.
    ``max_result_bytes``: larger encoded results fail their task with
    ResultTooLargeError.  ``cancel_grace``: seconds a cancelled running
    task has to return before its worker is killed.

    Extension points, for a layer above (``logq.workflows``), which this
    layer never imports: ``App.extensions`` (class-wide) holds callables
    ``ext(app)`` applied once to every App before it settles or runs
    tasks; a pool's workers import the modules that defined them first.
    They fill ``settle_hooks``, each ``fn(txn, task_id, event, outcome)``
    called inside the index transaction that records an outcome (a
    settlement's, or cancel's) when it changed the task's state: what it
    writes through ``txn`` is durable exactly with that outcome; and
    ``run_hooks``, each ``fn(task_id, name, args, kwargs) -> (args,
    kwargs)`` called in the worker before a task runs.  ``settle_batch_hooks``
    is the cheaper form of ``settle_hooks`` for a pool's settlements (a
    call per task costs every task in the pool's process, which all
    workers share): each ``fn(txn, items)`` is called once per transaction
    that records outcomes, with ``items`` every ``(task_id, event,
    outcome)`` whose state it changed, in order, after all of them are
    stored in ``txn``; the same durability."""

    extensions: list[Callable[["App"], None]] = []

    def __init__(self, path: str, *, max_result_bytes: int = 1 << 20, cancel_grace: float = 5.0,
                 **queue_options: Any) -> None:
        self.path = str(path)
        self.queue_options = queue_options
        self.max_result_bytes = max_result_bytes
        self.cancel_grace = cancel_grace
        self._tasks: dict[str, Task] = {}
        self._periodic: dict[str, Any] = {}     # name -> _periodic.Periodic
        self._serializers: dict[str, Serializer] = {"json": JSON, "pickle": PICKLE}
        self._q: Queue | None = None
        self._st: Store | None = None
        self._pid = 0
        self._lock = threading.Lock()
        frame = sys._getframe(1)
        self._module = frame.f_globals.get("__name__")
        self.settle_hooks: list[Callable[..., None]] = []
        self.run_hooks: list[Callable[..., Any]] = []
        self.settle_batch_hooks: list[Callable[..., None]] = []
        self._extended = 0

    def _extend(self) -> None:
        """Apply the extensions registered since the last call (once each)."""
        while self._extended < len(App.extensions):
            self._extended += 1
            App.extensions[self._extended - 1](self)

    # -- registry ---------------------------------------------------------------------
    def task(self, fn: Callable[..., Any] | None = None, *, name: str | None = None,
             **options: Any) -> Any:
        """Register a function as a task (``@app.task`` or ``@app.task(...)``);
        options: see TaskOptions."""
        def register(f: Callable[..., Any]) -> Task:
            opts = TaskOptions(**options)
            if isinstance(opts.retry_on, type):
                object.__setattr__(opts, "retry_on", (opts.retry_on,))
            from logq.tasks._flow import check_serialize_by, task_limits
            task_limits(opts)                           # ValueError for a bad limit
            check_serialize_by(f, opts.serialize_by)
            n = name or f"{f.__module__}.{f.__qualname__}"
            if n in self._tasks:
                raise ValueError(f"task name {n!r} is registered twice")
            t = self._tasks[n] = Task(self, f, n, opts)
            return t
        return register(fn) if fn is not None else register

    def periodic(self, cron: str | None = None, *, every: Any = None, catch_up: str = "latest",
                 **options: Any) -> Any:
        """Register a function as a task fired on a schedule: a 5-field
        ``cron`` expression (``"*/5 * * * *"``, UTC unless ``tz="Europe/Berlin"``)
        or ``every=timedelta(...)`` (slots at whole multiples of it since the
        epoch, or since ``origin=``).  The function takes no argument, or one:
        the slot's time (epoch seconds).  Other options: ``name``, those of
        ``task``, and ``grace`` (a timedelta, default 60 s: how late the
        scheduler may see the latest slot and still count it on time) and
        ``limit`` (most slots one catch-up fires, default 100).

        The scheduler runs in every tasks pool (``logq worker``,
        ``app.pool()``); each slot is submitted exactly once however many
        run, across restarts and power cuts (claimed durably in the index
        first; ``logq.tasks._periodic``).  After downtime, ``catch_up``:

        * ``"latest"`` (default): of the slots missed, only the most recent
          fires (once), then the schedule goes on;
        * ``"all"``: every missed slot fires, oldest first (at most
          ``limit``: past it, the oldest are skipped);
        * ``"none"``: missed slots are skipped; only an on-time slot fires.

        A schedule that never fired starts with its next on-time slot."""
        from logq.tasks._periodic import register
        return register(self, cron, every=every, catch_up=catch_up, **options)

    def register_serializer(self, ser: Serializer) -> None:
        self._serializers[ser.name] = ser

    def _serializer(self, name: str) -> Serializer:
        try:
            return self._serializers[name or "json"]
        except KeyError:
            raise UnknownTaskError(f"no serializer {name!r} registered (known: "
                                   f"{sorted(self._serializers)})") from None

    def _ttl(self, name: str) -> float | None:
        t = self._tasks.get(name)
        return t.options.result_ttl if t is not None else 86400.0

    # -- the queue --------------------------------------------------------------------
    @property
    def queue(self) -> Queue:
        q = self._q
        if q is not None and self._pid == _PID[0]:
            return q        # the hot path (hooks ask for it per task): no lock, no system call
        with self._lock:
            if self._q is None or self._pid != _PID[0]:
                self._q = Queue(self.path, **self.queue_options)
                self._st = None
                self._pid = _PID[0]
            return self._q

    def _store(self) -> Store:
        st = self._st
        if st is not None and self._q is not None and self._pid == _PID[0]:
            return st
        q = self.queue
        with self._lock:
            if self._st is None:
                self._st = Store(q)
            return self._st

    def close(self) -> None:
        with self._lock:
            if self._st is not None:
                self._st.close()
            if self._q is not None:
                self._q.close()
            self._q = self._st = None

    # -- by id ------------------------------------------------------------------------
    def get(self, task_id: str) -> TaskHandle:
        """The handle of a task by id (raises TaskNotFound if unknown)."""
        self._store().status(task_id)
        return TaskHandle(self, task_id, known=True)

    def cancel(self, task_id: str) -> bool:
        self._extend()
        ttl = self._ttl(self._store().status(task_id).name)
        return self._store().cancel(task_id, int((ttl or 0) * 1e9), self.settle_hooks,
                                    self.settle_batch_hooks)

    def retry(self, task_id: str) -> TaskHandle:
        """Run a failed (or cancelled) task again, with its arguments and a
        fresh count of attempts; same id."""
        st = self._store().status(task_id)
        if st.state not in (S.FAILED, S.CANCELLED):
            raise TaskError(f"task {task_id} is {st.state}: only a failed or cancelled task can be retried")
        store = self._store()
        from logq.tasks._records import parse_id
        off = parse_id(task_id)[0]  # type: ignore[index]
        raw = store.idx.get(task_id.encode(), store.moved)
        if raw is not None:
            off = int.from_bytes(raw, "big")
        found = store.load(off)
        if found is None:
            raise TaskError(f"task {task_id}: its record is no longer in the queue; cannot retry")
        rec = found[0]
        store.reopen(task_id)       # first: a worker must not take the new record for finished
        new = self.queue.put(encode_task(rec.nonce, rec.name, rec.serializer, rec.args, origin=task_id))
        store.moved_to(task_id, new)
        return TaskHandle(self, task_id)

    def statuses(self, state: str | None = None, name: str | None = None) -> list[TaskStatus]:
        """Every known task's status (optionally of one state / name)."""
        store = self._store()
        marks = store.markers()
        out = []
        for tid in store.ids():
            try:
                st = store.status(tid, marks)
            except TaskError:
                continue
            if (state is None or st.state == state) and (name is None or st.name == name):
                out.append(st)
        return out

    def purge(self, state: str | None = S.SUCCEEDED, older_than: float = 0.0) -> int:
        return self._store().purge(state, older_than)

    # -- running ----------------------------------------------------------------------
    def spec(self) -> str:
        """``module:attribute`` by which workers import this app."""
        mod = sys.modules.get(self._module or "")
        if mod is not None and self._module != "__main__":
            for k, v in vars(mod).items():
                if v is self:
                    return f"{self._module}:{k}"
        raise TaskError("workers import the app by name: define it at module level in an "
                        "importable module (not __main__), or pass spec='module:app'")

    def pool(self, spec: str | None = None, **options: Any) -> Any:
        """A WorkerPool running this app's tasks (options: the pool's)."""
        from logq.tasks._flow import Gate
        from logq.tasks._periodic import Scheduler, TaskPool
        from logq.tasks._run import Runner, Settler
        timeouts = [t.timeout for t in self._tasks.values()]
        options.setdefault("visibility_timeout", 86400.0)
        options.setdefault("max_attempts", 1 << 30)     # retries are per task (the Runner's)
        options.setdefault("commit_interval", 0.005)
        options.setdefault("backoff_max", 300.0)
        if timeouts and None not in timeouts:
            options.setdefault("timeout", max(timeouts) + 5.0)  # type: ignore[operator, type-var]  # a backstop for a stuck C call
        self._extend()
        exts = tuple(sorted({e.__module__ for e in App.extensions}))
        periodic = options.pop("periodic", True)       # False: this pool runs no scheduler
        limited = any(t.options.concurrency is not None or t.options.rate_limit is not None or
                      t.options.serialize_by is not None for t in self._tasks.values())
        return TaskPool(self.path, Runner(spec or self.spec(), self.path, exts), GROUP_NAME,
                        queue_options=self.queue_options, on_outcome=Settler(self),
                        gate=Gate(self) if limited else None,
                        scheduler=Scheduler(self) if periodic and self._periodic else None, **options)

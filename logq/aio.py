"""logq for asyncio: the queue, its consumer groups and the tasks' results,
awaited instead of blocked on.

    async with logq.aio.open("/var/lib/app/q") as q:
        off = await q.put(b"x"); await q.put_many([b"a", b"b"]); await q.flush()
        async with q.consumer("billing") as c:
            async for m in c:                 # or await c.get(timeout=), c.get_many(n, timeout=)
                async with m.process():       # ack on success, nack (backoff) on an exception
                    ...

An adapter at the edge: it drives a plain ``logq.Queue`` and its Consumers
(``q.sync``, ``c.sync``), so every promise of theirs holds here unchanged:
durability by fsync policy, at-least-once delivery, leases, retries, dead
letters.  Nothing in the core imports this module.  A ``logq.aio.Queue``
belongs to the event loop that opened it.

Where each call runs.  Nothing blocks the event loop for longer than one
LMDB transaction (and the in-process locks a put in another thread holds
for one append):

* on the loop: ``put`` of plain bytes when it needs no waiting (this
  process holds the append lock, the record fits the active segment, the
  policy is not "always" and no put of this queue is in the executor);
  ``get``/``get_many``/``async for`` attempts (a claim: one transaction of
  the lease table, no fsync; delivering a delayed message schedules it in
  the index); ``ack``, ``ack_many``, ``nack`` and ``extend`` (memory and the
  lease table) unless the ack or nack makes the group commit
  (``commit_every``); ``next_offset``; reading ``Message`` fields;
* on the queue's own single-thread executor, in call order: opening and
  closing the queue and its consumers, ``put`` otherwise, ``put_many``,
  ``flush``, ``read``, ``stats``, ``commit``, ``give_back``, an ack or nack
  that commits, and giving back what a cancelled ``get`` had already got.
  A call handed to the executor takes effect even if the awaiting task is
  cancelled (its result is then lost: a cancelled ``put`` may have stored
  the message).

How a waiting ``get`` wakes.  The queue's control block has a futex word
(the tail) that every put of every process moves, and that nacks and give
backs poke.  Futexes have no file descriptor, so one thread per open queue
per process sleeps on the word (only while some coroutine waits) and writes
an eventfd that the event loop watches (``loop.add_reader``).  Each waiting
round reads the tail *before* it looks for messages and the thread sleeps
on exactly that value, so a put after the look is never missed.  The gets
of one group wait in one queue, served in order by one pump task per
group: a put wakes one claim, not one per waiter, and a thousand idle
waiters cost what one does (a claim every 0.5 s, as a blocked sync ``get``
does, to pick up expired leases and the messages of dead consumers).  With
the pure codec the thread polls the word every 5 ms while someone waits.

Cancellation.  A ``get`` cancelled while it waits leaves nothing behind:
messages it was handed after the cancel are given back (delivered again at
once, their attempt not counted).  ``Message.process()``: see there.

``aresult``: ``TaskHandle.aresult`` (``logq.tasks``) waits for an outcome
through the same kind of thread on the WRITTEN word (``written_changed``
here).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import threading
import time
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Generator, Generic, Iterable, TypeVar

from logq import _codec as C
from logq._consumer import _IDLE_LOOK, Consumer as _SyncConsumer
from logq._errors import Empty, NotDeliveredError, QueueClosedError
from logq._group import Message as _SyncMessage
from logq._queue import Queue as _SyncQueue, open as _open_sync

__all__ = ["open", "Queue", "Consumer", "Message", "written_changed"]

log = logging.getLogger("logq")

T = TypeVar("T")

_SLICE = 1.0            # the watcher thread sleeps at most this long per futex wait (s)
_POKE_MARGIN = 0.01     # a native wait that ended this much before its slice: a poke
_IDLE_EXIT = 5.0        # a watcher thread with nothing to watch exits after this long (s)


# -- the watcher: a futex word, seen by the event loop through an fd ---------------
class _Watcher:
    """One thread that sleeps on a futex word of a queue's control block
    while coroutines of one event loop wait for it to move, and an eventfd
    (a pipe where there is none) the loop watches.  ``changed(seen)``
    returns once the word moved past ``seen`` (a poke counts), or after
    the timeout.  The thread sleeps on the very value the waiter saw, so no
    change after that look is missed; it runs only while armed and exits
    after ``_IDLE_EXIT`` seconds without waiters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, moved: Callable[[int], bool],
                 wait_once: Callable[[int, float], bool], pokes: bool, slice_s: float,
                 name: str) -> None:
        self._loop = weakref.ref(loop)  # (weak: a registry keyed by loop holds watchers)
        self._moved = moved             # (seen) -> whether the word passed it (on the loop)
        self._wait_once = wait_once     # (seen, seconds) -> moved; returns early on a poke
        self._pokes = pokes             # an early return means a poke (native futexes)
        self._slice = slice_s
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._target: int | None = None  # the value the thread sleeps on (None: disarmed)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._listeners: set[asyncio.Future[None]] = set()
        if hasattr(os, "eventfd"):
            self._rfd = self._wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
            os.set_blocking(self._wfd, False)
        loop.add_reader(self._rfd, self._on_signal)

    # the loop's side
    async def changed(self, seen: int, timeout: float | None) -> None:
        """Return once the word passed ``seen`` (or was poked), or after
        ``timeout`` seconds (None: no limit)."""
        if self._moved(seen):
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._listeners.add(fut)
        with self._cond:
            if self._stopped:
                raise QueueClosedError("the queue is closed")
            if self._target is None or seen > self._target:
                # (The tail only grows: a waiter that saw less is answered
                # by the look below.)
                self._target = seen
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            else:
                self._cond.notify()
        timer = None
        try:
            if self._moved(seen):       # moved before the thread looked: it may not signal
                return
            if timeout is not None:
                timer = loop.call_later(max(timeout, 0.0), _resolve, fut)
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._listeners.discard(fut)
            if not self._listeners:
                with self._cond:
                    self._target = None     # the thread stops after its current sleep

    def _on_signal(self) -> None:
        try:
            if self._rfd == self._wfd:
                os.eventfd_read(self._rfd)
            else:  # pragma: no cover
                os.read(self._rfd, 4096)
        except BlockingIOError:
            pass
        for fut in list(self._listeners):
            _resolve(fut)

    # the thread's side
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._target is None and not self._stopped:
                    if not self._cond.wait(_IDLE_EXIT) and self._target is None:
                        self._thread = None
                        return
                if self._stopped:
                    self._thread = None
                    return
                seen = self._target
            began = time.monotonic()
            try:
                moved = self._wait_once(seen, self._slice)
            except QueueClosedError:
                moved = True            # the waiters look again, and find it closed
            except Exception:  # pragma: no cover - a bug: let the waiters look again
                log.exception("logq.aio: the watcher thread failed")
                moved = True
            if not moved and not (self._pokes and time.monotonic() - began < self._slice - _POKE_MARGIN):
                continue                # the slice passed (or the pure codec's nap)
            with self._cond:
                self._target = None     # the waiters re-arm after they looked
                stopped = self._stopped
            if not stopped:
                try:
                    os.eventfd_write(self._wfd, 1) if self._rfd == self._wfd else os.write(self._wfd, b"\0")
                except BlockingIOError:  # pragma: no cover - a pipe full of signals already
                    pass

    def stop(self) -> threading.Thread | None:
        """Stop the thread (it leaves within a slice; the caller may join
        the thread returned) and stop watching the fd."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
            t = self._thread
        loop = self._loop()
        try:
            if loop is not None:
                loop.remove_reader(self._rfd)
        except Exception:  # pragma: no cover - the loop is closed already
            pass
        for fut in list(self._listeners):
            _resolve(fut)
        return t

    def close_fds(self) -> None:
        """After the thread has left: the fds go."""
        for fd in {self._rfd, self._wfd}:
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass


def _resolve(fut: asyncio.Future[Any], value: Any = None) -> None:
    if not fut.done():
        fut.set_result(value)


# -- the queue -------------------------------------------------------------------------
class _Opening(Generic[T]):
    """What ``open`` and ``Queue.consumer`` return: await it for the
    object, or use it as ``async with`` (closed at the end)."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._obj: Any = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._make().__await__()

    async def __aenter__(self) -> T:
        self._obj = await self._make()
        return self._obj  # type: ignore[no-any-return]

    async def __aexit__(self, *exc: Any) -> None:
        await self._obj.close()


def open(path: str | os.PathLike[str], **options: Any) -> _Opening["Queue"]:  # noqa: A001 - the API name
    """Open the queue in ``path`` (created if needed) for the running event
    loop: ``async with logq.aio.open(path) as q`` or ``q = await
    logq.aio.open(path)``.  Options: those of ``logq.open``.  Opening
    (recovery included) runs in the queue's executor."""
    async def make() -> Queue:
        loop = asyncio.get_running_loop()
        ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="logq-aio")
        job = ex.submit(_open_sync, path, **options)
        try:
            q = await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            job.add_done_callback(_close_opened)    # opened after all: nobody will use it
            ex.shutdown(wait=False)
            raise
        except BaseException:
            ex.shutdown(wait=False)
            raise
        return Queue(q, loop, ex)
    return _Opening(make)


def _close_opened(job: concurrent.futures.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is None:
        job.result().close()


class Queue:
    """A queue for asyncio (see the module's docstring for where each call
    runs).  ``sync`` is the ``logq.Queue`` it drives (its blocking calls
    must not be made on the loop); ``path``, ``options`` are its."""

    def __init__(self, q: _SyncQueue, loop: asyncio.AbstractEventLoop,
                 ex: concurrent.futures.ThreadPoolExecutor) -> None:
        self.sync = q
        self.path = q.path
        self.options = q.options
        self.loop = loop
        self._ex = ex
        self._closed = False
        self._in_executor = 0           # puts handed to the executor, not finished yet
        self._consumers: set[Consumer] = set()
        self._gates: dict[str, _Gate] = {}
        self._tail = _Watcher(loop, lambda seen: q.next_offset > seen, q._wait_once,
                              C.native_enabled(), _SLICE, f"logq-aio-{q.path}")

    def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Awaitable[T]:
        """Run ``fn`` on the executor; the job completes even if the awaiting
        task is cancelled."""
        if self._closed:
            raise QueueClosedError(f"queue {self.path} is closed")
        job = self._ex.submit(functools.partial(fn, *args, **kwargs))
        fut = asyncio.wrap_future(job, loop=self.loop)
        fut.add_done_callback(_retrieve)
        return asyncio.shield(fut)

    def _background(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` on the executor without waiting; a failure is logged."""
        def job() -> None:
            try:
                fn(*args)
            except QueueClosedError:
                pass
            except Exception:
                log.exception("queue %s: a background call of logq.aio failed", self.path)
        if not self._closed:
            self._ex.submit(job)

    # -- producing --------------------------------------------------------------------
    async def put(self, data: bytes | bytearray | memoryview, *, key: bytes | str | None = None,
                  priority: int = 0, delay: float | None = None,
                  deliver_at: float | None = None) -> int:
        """``logq.Queue.put``: the offset, durable as the fsync policy says.
        On the loop when it needs no waiting, else on the executor."""
        if (type(data) is bytes and not self._in_executor and key is None and not priority
                and delay is None and deliver_at is None and not self._closed):
            off = self.sync._put_nowait(data)
            if off >= 0:
                return off
        self._in_executor += 1
        try:
            return await self._run(self.sync.put, data, key=key, priority=priority, delay=delay,
                                   deliver_at=deliver_at)
        finally:
            self._in_executor -= 1

    async def put_many(self, items: Iterable[bytes | bytearray | memoryview]) -> range:
        """``logq.Queue.put_many`` (all or nothing), on the executor."""
        items = list(items)
        self._in_executor += 1
        try:
            return await self._run(self.sync.put_many, items)
        finally:
            self._in_executor -= 1

    async def flush(self) -> None:
        """Return once everything this process put is on stable storage."""
        await self._run(self.sync.flush)

    async def read(self, offset: int) -> bytes:
        """``logq.Queue.read``, on the executor."""
        return await self._run(self.sync.read, offset)

    async def stats(self) -> dict[str, Any]:
        """``logq.Queue.stats``, on the executor."""
        return await self._run(self.sync.stats)

    @property
    def next_offset(self) -> int:
        return self.sync.next_offset

    # -- consuming --------------------------------------------------------------------
    def consumer(self, group: str, **options: Any) -> _Opening["Consumer"]:
        """A consumer of the durable group ``group``: ``async with
        q.consumer(group) as c`` or ``c = await q.consumer(group)``.
        Options: ``logq.GroupOptions``."""
        async def make() -> Consumer:
            c = await self._run(self.sync.consumer, group, **options)
            if self._closed:
                self._background(c.close)
                raise QueueClosedError(f"queue {self.path} is closed")
            gate = self._gates.get(group)
            if gate is None:
                gate = self._gates[group] = _Gate(self, c._g)
            gate.group = c._g       # (a new group state once all its consumers here closed)
            ac = Consumer(self, c, gate)
            self._consumers.add(ac)
            return ac
        return _Opening(make)

    # -- lifecycle --------------------------------------------------------------------
    async def close(self) -> None:
        """Close its consumers (each commits and gives back what it holds)
        and the queue (``logq.Queue.close``).  A second call does nothing."""
        if self._closed:
            return
        for c in list(self._consumers):
            await c.close()
        self._closed = True
        thread = self._tail.stop()
        for gate in self._gates.values():
            gate.stop()

        def shut() -> None:
            if thread is not None:
                self.sync._poke()       # out of its futex wait now
                thread.join()
            self.sync.close()
        try:
            job = self._ex.submit(shut)
            await asyncio.shield(asyncio.wrap_future(job, loop=self.loop))
        finally:
            self._tail.close_fds()
            self._ex.shutdown(wait=False)

    async def __aenter__(self) -> "Queue":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<logq.aio.Queue {self.path!r}{' closed' if self._closed else ''}>"


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # (A shielded job whose awaiter was cancelled: nobody reads its error.)
    if not fut.cancelled():
        fut.exception()


# -- consuming -------------------------------------------------------------------------
class _Gate:
    """The gets of one group on one aio Queue that wait, in arrival order,
    and the one pump task that serves them: it reads the tail, claims for
    the first waiters until nothing is left, and sleeps on the watcher
    until the tail passes what it read, a poke, the next due message, or
    ``_IDLE_LOOK``."""

    def __init__(self, aq: Queue, group: Any) -> None:
        self.aq = aq
        self.group = group              # the sync group state (for next_due)
        self.waiters: dict[asyncio.Future[list[_SyncMessage]], tuple[_SyncConsumer, int, bool]] = {}
        self.pump: asyncio.Task[None] | None = None

    def wait(self, c: _SyncConsumer, n: int, single: bool,
             timeout: float | None) -> asyncio.Future[list[_SyncMessage]]:
        loop = self.aq.loop
        fut: asyncio.Future[list[_SyncMessage]] = loop.create_future()
        self.waiters[fut] = (c, n, single)
        fut.add_done_callback(self._gone)
        if timeout is not None:
            timer = loop.call_later(max(timeout, 0.0), _resolve, fut, [])
            fut.add_done_callback(lambda _f: timer.cancel())
        if self.pump is None:
            self.pump = loop.create_task(self._run())
        return fut

    def _gone(self, fut: asyncio.Future[Any]) -> None:
        self.waiters.pop(fut, None)

    async def _run(self) -> None:
        q = self.aq.sync
        try:
            while self.waiters:
                try:
                    tail = q.next_offset        # before the look: a later put wakes the wait
                except QueueClosedError as e:
                    self._fail(e)
                    return
                if not self._serve() or not self.waiters:
                    continue
                sleep = _IDLE_LOOK
                try:
                    due = self.group.next_due()
                except QueueClosedError:
                    due = None      # (the next claim raises it to the waiters)
                if due is not None:
                    sleep = min(sleep, max(0.0, (due - time.time_ns()) / 1e9))
                try:
                    await self.aq._tail.changed(tail, sleep)
                except QueueClosedError as e:
                    self._fail(e)
                    return
        finally:
            self.pump = None

    def _serve(self) -> bool:
        """Claim for the waiters in order, until nothing is left (True) or
        none waits (False)."""
        for fut, (c, n, single) in list(self.waiters.items()):
            if fut.done():
                continue
            try:
                got = _claim(c, n, single)
            except BaseException as e:
                self.waiters.pop(fut, None)
                fut.set_exception(e)
                continue
            if not got:
                return True
            self.waiters.pop(fut, None)
            fut.set_result(got)
        return False

    def _fail(self, e: BaseException, c: _SyncConsumer | None = None) -> None:
        for fut, (who, _n, _s) in list(self.waiters.items()):
            if c is None or who is c:
                self.waiters.pop(fut, None)
                if not fut.done():
                    fut.set_exception(e)

    def stop(self) -> None:
        self._fail(QueueClosedError(f"queue {self.aq.path} is closed"))
        if self.pump is not None:
            self.pump.cancel()


def _claim(c: _SyncConsumer, n: int, single: bool) -> list[_SyncMessage]:
    """What is deliverable now, without waiting (a claim: one lease-table
    transaction)."""
    if single:
        try:
            return [c.get(timeout=0)]
        except Empty:
            return []
    return c.get_many(n, timeout=0)


class Message:
    """A delivered message: ``offset``, ``data``, ``timestamp``, ``ts_ns``,
    ``attempt``, ``key``, ``priority`` (as ``logq.Message``, which is
    ``sync``).  Settle it through the consumer that delivered it, or with
    ``process()``."""

    __slots__ = ("sync", "_c", "_done")

    def __init__(self, m: _SyncMessage, c: "Consumer") -> None:
        self.sync = m
        self._c = c
        self._done = False          # settled through the aio consumer

    offset = property(lambda self: self.sync.offset)
    data = property(lambda self: self.sync.data)
    ts_ns = property(lambda self: self.sync.ts_ns)
    timestamp = property(lambda self: self.sync.timestamp)
    attempt = property(lambda self: self.sync.attempt)
    key = property(lambda self: self.sync.key)
    priority = property(lambda self: self.sync.priority)

    def process(self) -> "_Processing":
        """``async with m.process(): ...`` settles the message when the block
        ends (after aio-pika's ``message.process()``): acked if the block
        returns; nacked with the group's backoff (the exception's repr as
        the error: after ``max_attempts`` a dead letter) if it raises an
        Exception; given back (delivered again at once, the attempt not
        counted) if it ends with a BaseException that is not an Exception,
        such as CancelledError or KeyboardInterrupt.  The exception is
        re-raised, never swallowed.  A message already settled inside the
        block (``c.ack/nack/give_back`` of this consumer) is left alone."""
        return _Processing(self)

    def __repr__(self) -> str:
        return f"<logq.aio.Message offset={self.offset} attempt={self.attempt}>"


class _Processing:
    __slots__ = ("m",)

    def __init__(self, m: Message) -> None:
        self.m = m

    async def __aenter__(self) -> Message:
        return self.m

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> bool:
        m = self.m
        if m._done:
            return False
        c = m._c
        if et is None:
            await c.ack(m)
        elif issubclass(et, Exception):
            try:
                await c.nack(m, error=f"{et.__name__}: {e}"[:2000])
            except Exception:
                # The block's exception is the one to see; the message is
                # delivered again anyway once its lease runs out.
                log.warning("logq.aio: nacking message %d after %s failed", m.offset, et.__name__,
                            exc_info=True)
        else:
            # Cancelled or interrupted: not the message's fault.  Not awaited
            # (a second cancel must not leave it out).
            m._done = True
            c._aq._background(c.sync.give_back, [m.sync])
        return False


class Consumer:
    """A consumer of a group for asyncio (see the module's docstring for
    where each call runs).  ``sync`` is the ``logq.Consumer`` it drives:
    the same group state, leases and guarantees."""

    def __init__(self, aq: Queue, c: _SyncConsumer, gate: _Gate) -> None:
        self._aq = aq
        self.sync = c
        self.group = c.group
        self.options = c.options
        self._gate = gate
        self._g = c._g
        self._commit_every = c.options.commit_every
        self._closed = False

    # -- delivery -----------------------------------------------------------------------
    async def get(self, timeout: float | None = None) -> Message:
        """The next message, leased for ``visibility_timeout``; waits up to
        ``timeout`` seconds (None: until one comes), then raises
        logq.Empty.  Waiting gets of a group are served in order."""
        if not self._gate.waiters and not self._closed:
            try:
                return Message(self.sync.get(timeout=0), self)
            except Empty:
                if timeout is not None and timeout <= 0:
                    raise
        got = await self._wait(1, True, timeout)
        if not got:
            raise Empty(f"no message for group {self.group!r} within {timeout}s")
        return Message(got[0], self)

    async def get_many(self, max_messages: int, timeout: float | None = 0.0) -> list[Message]:
        """Up to ``max_messages`` messages: at least one unless ``timeout``
        seconds pass first (then []); ``timeout=None`` waits for one."""
        if self._closed:
            raise QueueClosedError(f"consumer of group {self.group!r} is closed")
        if not self._gate.waiters or (timeout is not None and timeout <= 0):
            got = self.sync.get_many(max_messages, timeout=0)
            if got or (timeout is not None and timeout <= 0):
                return [Message(m, self) for m in got]
        got = await self._wait(max_messages, False, timeout)
        return [Message(m, self) for m in got]

    async def _wait(self, n: int, single: bool, timeout: float | None) -> list[_SyncMessage]:
        if self._closed:
            raise QueueClosedError(f"consumer of group {self.group!r} is closed")
        fut = self._gate.wait(self.sync, n, single, timeout)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None and fut.result():
                # Handed messages after the cancel: they go back at once.
                self._aq._background(self.sync.give_back, fut.result())
            raise

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        """Messages as ``get()`` returns them, forever (until the consumer
        closes: QueueClosedError)."""
        if not self._gate.waiters and not self._closed:
            try:
                return Message(self.sync.get(timeout=0), self)
            except Empty:
                pass
        got = await self._wait(1, True, None)
        return Message(got[0], self)

    # -- settling -----------------------------------------------------------------------
    def _commits(self, k: int) -> bool:
        """Whether settling ``k`` more makes the group commit (an fsync):
        then the call goes to the executor."""
        return self._g.ledger.pending() + k >= self._commit_every

    async def ack(self, m: Message) -> None:
        """``logq.Consumer.ack``: never delivered to this group again once
        committed."""
        sm = _unwrap(m)
        if self._commits(1):
            await self._aq._run(self.sync.ack, sm)
        else:
            self.sync.ack(sm)
        m._done = True

    async def ack_many(self, ms: Iterable[Message]) -> None:
        """Ack every message (all or, on an error, none)."""
        ms = list(ms)
        sms = [_unwrap(m) for m in ms]
        if self._commits(len(sms)):
            await self._aq._run(self.sync.ack_many, sms)
        else:
            self.sync.ack_many(sms)
        for m in ms:
            m._done = True

    async def nack(self, m: Message, delay: float | None = None, error: str | None = None) -> None:
        """``logq.Consumer.nack``: delivered again ``delay`` seconds from now
        (None: the group's backoff), or a dead letter after
        ``max_attempts``."""
        sm = _unwrap(m)
        if self._commits(1):
            await self._aq._run(self.sync.nack, sm, delay, error)
        else:
            self.sync.nack(sm, delay, error)
        m._done = True

    async def give_back(self, ms: Iterable[Message]) -> None:
        """Return messages unprocessed: delivered again at once, the attempt
        not counted."""
        ms = list(ms)
        await self._aq._run(self.sync.give_back, [_unwrap(m) for m in ms])
        for m in ms:
            m._done = True

    async def extend(self, m: Message, seconds: float) -> None:
        """Keep ``m`` leased at least ``seconds`` from now (NotDeliveredError
        if its lease ran out and went back to the group)."""
        self.sync.extend(_unwrap(m), seconds)

    async def commit(self) -> None:
        """Return once every ack and nack so far is durable."""
        await self._aq._run(self.sync.commit)

    async def close(self) -> None:
        """``logq.Consumer.close`` (commit, and give back what this process
        holds once the group's last consumer here closes); its waiting gets
        raise QueueClosedError.  A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._gate._fail(QueueClosedError(f"consumer of group {self.group!r} is closed"), self.sync)
        self._aq._consumers.discard(self)
        if not self._aq._closed:
            await self._aq._run(self.sync.close)

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<logq.aio.Consumer group={self.group!r}{' closed' if self._closed else ''}>"


def _unwrap(m: Any) -> _SyncMessage:
    if type(m) is Message:
        return m.sync
    if m is None:
        raise NotDeliveredError("ack/nack/extend of None: pass the Message that get() returned")
    raise NotDeliveredError(f"logq.aio settles a logq.aio.Message, not {type(m).__name__}")


# -- what settlements wrote (the tasks layer's outcomes) ---------------------------------
_written: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[_SyncQueue, _Watcher]]" = \
    weakref.WeakKeyDictionary()
_WRITTEN_SLICE = 0.05   # short: the queue's close waits for the thread's current sleep


async def written_changed(q: _SyncQueue, seen: int, timeout: float) -> bool:
    """Return once the WRITTEN count of ``q``'s control block moved from
    ``seen`` (a commit in any process ran write hooks: a task outcome), or
    after ``timeout`` seconds: whether it moved.  One watcher thread per
    queue and event loop, whatever the number of waiters."""
    loop = asyncio.get_running_loop()
    per_loop = _written.get(loop)
    if per_loop is None:
        per_loop = _written[loop] = weakref.WeakKeyDictionary()
    w = per_loop.get(q)
    if w is None:
        w = per_loop[q] = _Watcher(loop, lambda s: q._written() != s,
                                   lambda s, t: q._asleep(q._wait_written, s, t),
                                   False, _WRITTEN_SLICE, f"logq-aio-written-{q.path}")
        weakref.finalize(w, _forget_fds, weakref.ref(loop), w._rfd, w._wfd)
    await w.changed(seen, timeout)
    return q._written() != seen


def _forget_fds(loop_ref: Any, *fds: int) -> None:
    """A watcher of ``written_changed`` was dropped (its queue was): its fds
    go, on its loop if that still runs (a reader is removed there)."""
    def drop() -> None:
        try:
            loop.remove_reader(fds[0])
        except Exception:
            pass
        for fd in set(fds):
            try:
                os.close(fd)
            except OSError:
                pass
    loop = loop_ref()
    if loop is None or loop.is_closed():
        drop()
    else:
        try:
            loop.call_soon_threadsafe(drop)
        except RuntimeError:
            drop()

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
  the lease table, no fsync, with an index write inside when it schedules
  a delayed message or reaps the leases of a dead consumer); ``ack``, ``ack_many``, ``nack`` and ``extend`` (memory and the
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
from typing import Any, Awaitable, Callable, Generator, Generic, Iterable, TypeVar

from logq import _codec as C
from logq._errors import QueueClosedError
from logq._queue import Queue as _SyncQueue, open as _open_sync
from logq.aio._consumer import Consumer, Message, _Gate
from logq.aio._watch import _Watcher, written_changed

__all__ = ["open", "Queue", "Consumer", "Message", "written_changed"]

log = logging.getLogger("logq")

T = TypeVar("T")

_SLICE = 1.0            # the watcher thread sleeps at most this long per futex wait (s)


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
        return self._obj

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
                if self._tail._listeners:
                    self._tail.nudge()
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

"""The consumers of logq.aio: waiting gets in line per group (``_Gate``),
``Consumer``, ``Message`` and ``Message.process()``.  Where each call runs:
see the package's docstring."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable

from logq._consumer import _IDLE_LOOK, Consumer as _SyncConsumer
from logq._errors import Empty, NotDeliveredError, QueueClosedError
from logq._handout import Message as _SyncMessage
from logq.aio._watch import _resolve

if TYPE_CHECKING:
    from logq.aio import Queue

log = logging.getLogger("logq")


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
                if not self._serve():
                    continue            # (no waiter is left: the loop ends)
                sleep = _IDLE_LOOK
                try:
                    due = self.group.next_due()
                except QueueClosedError:
                    due = None      # (the next claim raises it to the waiters)
                if due is not None:
                    # (at least 1 ms: a due time that passed while nothing
                    # was claimable must not turn this loop into a spin)
                    sleep = min(sleep, max(0.001, (due - time.time_ns()) / 1e9))
                try:
                    await self.aq._tail.changed(tail, sleep)
                except QueueClosedError as e:
                    self._fail(e)
                    return
        finally:
            self.pump = None

    def _serve(self) -> bool:
        """Claim for the waiters in order, until nothing is left (True) or
        none waits (False).  Waiters done already (timed out, cancelled)
        leave here: their done-callbacks run only once the pump yields."""
        for fut, (c, n, single) in list(self.waiters.items()):
            if fut.done():
                self.waiters.pop(fut, None)
                continue
            try:
                got = _claim(c, n, single)
            except Exception as e:
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

    __slots__ = ("sync", "_c")

    def __init__(self, m: _SyncMessage, c: "Consumer") -> None:
        self.sync = m
        self._c = c

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
        block (by any consumer of its group here) is left alone."""
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
        if not m._c._g.holds(m.sync):
            return False        # settled inside the block (no longer out with this process)
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
        self._ledger = c._g.ledger
        self._buffered = c._g.from_buffer     # get()'s fast path: claimed already
        self._ack = c.ack
        self._commit_every = c.options.commit_every
        self._closed = False

    # -- delivery -----------------------------------------------------------------------
    async def get(self, timeout: float | None = None) -> Message:
        """The next message, leased for ``visibility_timeout``; waits up to
        ``timeout`` seconds (None: until one comes), then raises
        logq.Empty.  Waiting gets of a group are served in order."""
        if not self._gate.waiters and not self._closed:
            got = self._buffered(1, True)
            if got:
                return Message(got[0], self)
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
            got = self._buffered(1, True)
            if got:
                return Message(got[0], self)
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
        # (the hot path: _unwrap and _commits inlined)
        sm = m.sync if type(m) is Message else _unwrap(m)
        led = self._ledger
        if led.pending() + 1 >= self._commit_every:
            await self._aq._run(self._ack, sm)
        else:
            self._ack(sm)

    async def ack_many(self, ms: Iterable[Message]) -> None:
        """Ack every message (all or, on an error, none)."""
        sms = [_unwrap(m) for m in ms]
        if self._commits(len(sms)):
            await self._aq._run(self.sync.ack_many, sms)
        else:
            self.sync.ack_many(sms)

    async def nack(self, m: Message, delay: float | None = None, error: str | None = None) -> None:
        """``logq.Consumer.nack``: delivered again ``delay`` seconds from now
        (None: the group's backoff), or a dead letter after
        ``max_attempts``."""
        sm = _unwrap(m)
        if self._commits(1):
            await self._aq._run(self.sync.nack, sm, delay, error)
        else:
            self.sync.nack(sm, delay, error)

    async def give_back(self, ms: Iterable[Message]) -> None:
        """Return messages unprocessed: delivered again at once, the attempt
        not counted."""
        await self._aq._run(self.sync.give_back, [_unwrap(m) for m in ms])

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

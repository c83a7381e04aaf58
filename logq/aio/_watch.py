"""The watcher: a futex word of a queue's control block, seen by an event
loop through a file descriptor.  Futexes have no fd; one thread per word
and loop sleeps on the futex while coroutines wait, and writes an eventfd
(a pipe where there is none) that the loop watches with ``add_reader``."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from typing import Any, Callable

from logq._errors import QueueClosedError
from logq._queue import Queue as _SyncQueue

log = logging.getLogger("logq")

_IDLE_EXIT = 5.0        # a watcher thread with nothing to watch exits after this long (s)
_POKE_MARGIN = 0.01     # a native wait that ended this much before its slice: a poke


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
        with self._cond:
            if self._stopped:
                raise QueueClosedError("the queue is closed")
            self._listeners.add(fut)
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

    def nudge(self) -> None:
        """The word moved by this loop's own doing (a put here): answer the
        waiters now, without the round trip through the thread."""
        for fut in list(self._listeners):
            _resolve(fut)

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
                moved = self._wait_once(seen, self._slice)  # type: ignore[arg-type]
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

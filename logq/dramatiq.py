"""Dramatiq on logq: a broker and a results backend.

    import dramatiq
    from dramatiq.results import Results
    from logq.dramatiq import LogqBroker, LogqResultBackend

    broker = LogqBroker("/var/lib/app/q")
    broker.add_middleware(Results(backend=LogqResultBackend("/var/lib/app/q")))
    dramatiq.set_broker(broker)

Layout: ``path`` is a root directory; each Dramatiq queue is a logq queue
in ``<path>/<quoted name>/`` (``logq._named.queue_dir``), consumed through
the consumer group ``dramatiq``; results live in
``<path>/dramatiq-results.kv/`` (``logq._named.KV``).

Promises:

* ``enqueue`` is a ``put`` under the queue's fsync policy (``fsync``,
  ``"batch"`` by default: in the page cache on return, fsynced within
  0.2 s); ``delay`` makes it a logq delayed message, delivered at its time
  (no ``.DQ`` queue and no worker holding it meanwhile); the message's
  ``broker_priority`` option (0..9) is logq's priority, higher first.
* A message given to a worker is *leased* to the worker's process:
  ``ack`` settles it (committed within ``commit_interval``, 0.02 s);
  ``nack`` -- Dramatiq's "reject: move to the dead letters", which a
  worker does once the ``Retries`` middleware gave up -- settles it and
  keeps it in the group's dead letters, in the same transaction (``logq
  dlq <path>/<queue> dramatiq list``, ``replay``); ``requeue`` (a worker
  shutting down) gives it back at once without counting an attempt.
* A worker process that dies (SIGKILL, OOM) loses its leases at once:
  what it held unacked is delivered again to the other workers at once,
  not after a timeout (logq's ``owners/`` flock).  A lease also runs out
  after ``visibility_timeout`` (3600 s) while its worker lives (a message
  running longer than that runs twice).  Deliveries that died with their
  worker count as attempts: after ``max_attempts`` (5) the message goes to
  the dead letters.
* Bytes in a queue that are not a Dramatiq message are dead-lettered on
  delivery with the decoding error, never handed to an actor.

``flush`` settles the messages deliverable now (delayed ones stay, to
come when due); ``join`` waits until a queue's group has settled every
message (acked or dead-lettered), delayed ones included.

Needs the ``dramatiq`` extra; nothing in logq's core imports this module.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

import dramatiq
from dramatiq.common import q_name
from dramatiq.errors import DecodeError, QueueJoinTimeout, QueueNotFound
from dramatiq.message import Message
from dramatiq.results import ResultBackend
from dramatiq.results.backend import Missing
from dramatiq.results.errors import ResultTimeout

from logq._named import KV, bury, close_under, open_queue, queue_dir

__all__ = ["LogqBroker", "LogqResultBackend", "GROUP"]

GROUP = "dramatiq"
RESULTS_DIR = "dramatiq-results.kv"
_BUSY_NAP = 0.002        # prefetch full: the worker acks between our calls, so return soon
_OUTSTANDING_WAIT = 0.05  # with messages out, block at most this long (their acks wait for us)


class LogqBroker(dramatiq.Broker):
    """A Dramatiq broker on logq queues under ``path`` (see the module
    docstring).  Options (keyword-only): ``fsync`` (for queues this process
    creates), ``visibility_timeout``, ``max_attempts``, ``commit_interval``."""

    def __init__(self, path: str | os.PathLike[str], middleware: Any = None, *,
                 fsync: str = "batch", visibility_timeout: float = 3600.0, max_attempts: int = 5,
                 commit_interval: float = 0.02) -> None:
        super().__init__(middleware=middleware)
        self.path = os.path.abspath(os.fspath(path))
        self.queues: dict[str, str] = {}
        self.fsync = fsync
        self.group_options = {"visibility_timeout": float(visibility_timeout),
                              "max_attempts": int(max_attempts),
                              "commit_interval": float(commit_interval)}

    def _queue(self, queue_name: str) -> Any:
        return open_queue(self.queues[queue_name], fsync=self.fsync)

    def close(self) -> None:
        """Close the logq queues this process opened under ``path``
        (committing their acks); a later use opens them again."""
        close_under(self.path)

    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        self.emit_before("declare_queue", queue_name)
        self.queues[queue_name] = queue_dir(self.path, queue_name)
        self.emit_after("declare_queue", queue_name)

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Put ``message`` on its queue (``delay`` in milliseconds)."""
        name = q_name(message.queue_name)
        if name not in self.queues:
            raise QueueNotFound(name)
        if name != message.queue_name:
            message = message.copy(queue_name=name)
        self.emit_before("enqueue", message, delay)
        prio = int(message.options.get("broker_priority", 0) or 0)
        data = message.encode()
        if delay:
            self._queue(name).put(data, delay=delay / 1000, priority=max(0, min(prio, 9)))
        elif prio:
            self._queue(name).put(data, priority=max(0, min(prio, 9)))
        else:
            self._queue(name).put(data)
        self.emit_after("enqueue", message, delay)
        return message

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> "_Consumer":
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        return _Consumer(self, queue_name, prefetch, timeout)

    def _group(self, queue_name: str) -> Any:
        return self._queue(queue_name).consumer(GROUP, **self.group_options)

    def flush(self, queue_name: str) -> None:
        """Settle every message of the queue deliverable now."""
        c = self._group(queue_name)
        try:
            while True:
                got = c.get_many(1000, timeout=0)
                if not got:
                    break
                c.ack_many(got)
        finally:
            c.close()

    def flush_all(self) -> None:
        for name in list(self.queues):
            self.flush(name)

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until every message put on the queue so far is settled
        (acked or dead-lettered; delayed ones too); QueueJoinTimeout after
        ``timeout`` milliseconds."""
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        limit = None if timeout is None else time.monotonic() + timeout / 1000
        nap = 0.001
        q = self._queue(queue_name)
        while True:
            g = q.stats()["groups"].get(GROUP)
            left = len(q) if g is None else g["backlog"]
            if left == 0:
                return
            if limit is not None and time.monotonic() >= limit:
                raise QueueJoinTimeout(queue_name)
            time.sleep(nap)
            nap = min(nap * 2, 0.05)


class _Consumer(dramatiq.Consumer):
    """Deliveries of one queue to one worker process.  Like every Dramatiq
    consumer, used by one thread (the worker's consumer thread)."""

    def __init__(self, broker: LogqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = timeout / 1000
        self.c = broker._group(queue_name)
        self.out: dict[int, Any] = {}       # offset -> logq Message, handed to the worker
        self.ready: list[Any] = []          # claimed, not handed yet

    def __next__(self) -> Any:
        while True:
            if self.ready:
                m = self.ready.pop(0)
                try:
                    proxy = dramatiq.MessageProxy(Message.decode(m.data))
                except DecodeError as e:
                    self._bury(m, f"not a Dramatiq message: {e}")
                    continue
                proxy._logq = m         # type: ignore[attr-defined]  # the delivery behind it
                self.out[m.offset] = m
                return proxy
            room = self.prefetch - len(self.out)
            if room <= 0:
                time.sleep(_BUSY_NAP)
                return None
            wait = self.timeout if not self.out else min(self.timeout, _OUTSTANDING_WAIT)
            self.ready = self.c.get_many(room, timeout=wait)
            if not self.ready:
                return None

    def _take(self, message: Any) -> Any:
        m = getattr(message, "_logq", None)
        if m is None or self.out.pop(m.offset, None) is not m:
            return None
        return m

    def ack(self, message: Any) -> None:
        m = self._take(message)
        if m is not None:
            self.c.ack(m)

    def nack(self, message: Any) -> None:
        """Dead-letter ``message``: settled, and kept in the group's dead
        letters with its error, in one transaction."""
        m = self._take(message)
        if m is not None:
            exc = getattr(message, "_exception", None)
            self._bury(m, f"rejected by the worker: {exc!r}" if exc is not None else "rejected by the worker")

    def _bury(self, m: Any, error: str) -> None:
        bury(self.c, m, error)

    def requeue(self, messages: Iterable[Any]) -> None:
        """Give ``messages`` back at once (the worker is stopping), no attempt counted."""
        back = [m for m in (self._take(x) for x in messages) if m is not None]
        if back:
            self.c.give_back(back)

    def close(self) -> None:
        """Give back what was claimed and not handed out; commit."""
        try:
            if self.ready:
                self.c.give_back(self.ready)
                self.ready = []
        finally:
            self.c.close()


class LogqResultBackend(ResultBackend):
    """Dramatiq results in the LMDB index of ``<path>/dramatiq-results.kv``:
    durable when stored, read by any process, expiring after the
    ``result_ttl`` Dramatiq gives.  A blocking ``get_result`` sleeps until
    a result is stored (by any process: a futex wait on the table's write
    count), not on the base backend's growing timer from 100 ms."""

    def __init__(self, path: str | os.PathLike[str], *, namespace: str = "dramatiq-results",
                 encoder: Any = None) -> None:
        super().__init__(namespace=namespace, encoder=encoder)
        self.path = os.path.abspath(os.fspath(path))
        self.kv = KV(os.path.join(self.path, RESULTS_DIR), "dramatiq.results")

    def _get(self, message_key: str) -> Any:
        raw = self.kv.get(message_key.encode())
        return Missing if raw is None else self.encoder.decode(raw)

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        self.kv.set(message_key.encode(), self.encoder.encode(result), ttl / 1000 if ttl else None)

    def get_result(self, message: Any, *, block: bool = False, timeout: int | None = None) -> Any:
        if not block:
            return super().get_result(message, block=False)
        key = self.build_message_key(message).encode()
        raw = self.kv.wait(key, (timeout if timeout is not None else 10_000) / 1000)
        if raw is None:
            raise ResultTimeout(message)
        return self.unwrap_result(self.encoder.decode(raw))


"""A kombu transport on logq: ``Celery(broker="logq:///var/lib/app/q")``.

Layout: the URL's path is a root directory; each kombu queue is a logq
queue in ``<root>/<quoted name>/`` (``logq._named.queue_dir``), consumed
through one consumer group, ``kombu``.

Delivery (what differs from kombu's in-memory ack emulation):

* A message handed to the worker is *leased* to its process in logq's
  lease table, not kept in process memory.  Its kombu delivery tag maps to
  that lease: ``basic_ack`` acks it in logq (committed within
  ``commit_interval``, 0.02 s by default: a worker killed just after a
  task finished may run it again, never lose it);
  ``basic_reject(requeue=True)`` and a channel closed with messages
  unacked (a warm shutdown) give them back at once, without counting an
  attempt; ``basic_reject(requeue=False)`` settles the message and keeps
  it in the group's dead letters (as AMQP's dead-letter exchange would),
  in the same transaction; so does a message that is not a kombu message
  (not JSON of one), on delivery, instead of stopping the consumer.
* A worker process that dies (SIGKILL, OOM, a crash) loses its leases at
  once: every message it held and had not acked -- prefetched, reserved,
  or running with ``acks_late`` -- is delivered again to the next worker,
  not after a visibility timeout (logq releases the leases of a dead
  process through its ``owners/`` flock).  Such a delivery counts as an
  attempt: a message out with ``max_attempts`` (5) workers that died goes
  to the group's dead letters (``logq dlq <root>/<queue> kombu list``).
* A lease also runs out after ``visibility_timeout`` (3600 s, as kombu's
  Redis and SQS transports) while its worker lives: the message is then
  delivered again (a task running longer than that with ``acks_late``
  runs twice).
* ``eta``/``countdown`` (and Celery's retries with a countdown): the
  message is put as a logq *delayed* message due at its ETA, so no worker
  receives it before then and no lease is held while it waits: the
  visibility-timeout duplicates of ETA tasks that kombu's Redis transport
  has cannot happen.  A worker that gets it a little early (clocks) holds
  it until the ETA, as Celery does.
* Priorities: the message's ``priority`` (0..9) is logq's priority,
  *higher first*, as AMQP/RabbitMQ order them (kombu's Redis transport
  serves lower numbers first).
* Publishing is a ``put`` under the queue's fsync policy (``fsync``,
  ``"batch"`` by default: in the page cache when ``delay()`` returns,
  fsynced within 0.2 s).

Routing: direct exchanges and the default exchange.  Bindings are kept
in each process's memory, as kombu's virtual transports do; a message
published to a direct exchange with no binding known in this process goes
to the queue named by its routing key (Celery's convention), never
nowhere.  Fanout exchanges are not supported, so Celery's remote control
(``celery inspect``/``control``), gossip and mingle are off with this
broker.

Celery's event loop: the transport is asynchronous for kombu's hub
(``register_with_event_loop``): a watcher thread sleeps on the consumed
queues and signals an eventfd the loop watches; the loop then delivers
what is ready without blocking.  Outside an event loop (a kombu consumer
of its own, or ``event_loop=False``) ``drain_events`` blocks on the queue
itself.

Transport options (``broker_transport_options``): ``visibility_timeout``,
``max_attempts``, ``commit_interval``, ``fsync`` (the queue's policy, for
queues this process creates), ``event_loop`` (True: offer Celery its event
loop), ``polling_interval`` (the blocking loop's longest nap while the
worker's prefetch is full, 0.02 s).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from datetime import datetime, timezone
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps, loads

from logq._named import bury, open_queue, queue_dir


GROUP = "kombu"
_DEFAULTS: dict[str, Any] = {"visibility_timeout": 3600.0, "max_attempts": 5,
                             "commit_interval": 0.02, "fsync": "batch"}
_BLOCK_SLICE = 1.0      # a drain without timeout looks around this often (s)
_SEVERAL_SLICE = 0.05   # waiting on one of several queues, at most this long at a time
_LOOKS_PER_WAKE = 64    # deliveries per event-loop wake before yielding to the loop's other work
_WATCH_SLICE = 0.5      # the watcher looks around (reaped leases, other processes' nacks) this often
_tags = itertools.count(1)


def root_of(client: Any) -> str:
    """The root directory of a kombu connection to ``logq:///<path>``."""
    host = client.hostname or ""
    if host not in ("", "localhost"):
        raise ValueError(f"logq:// URLs name a local directory (logq:///var/lib/app/q), "
                         f"not host {host!r}")
    vhost = client.virtual_host or ""
    path = "/" + vhost.lstrip("/")
    if path == "/":
        raise ValueError("a logq:// URL needs a directory: logq:///var/lib/app/q")
    return path


def eta_seconds(headers: dict[str, Any] | None) -> float | None:
    """Celery's ``eta`` header (ISO 8601; naive means UTC, Celery's
    default ``enable_utc``) as epoch seconds, or None."""
    eta = (headers or {}).get("eta")
    if not eta:
        return None
    try:
        at = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
    except ValueError:
        return None
    if not isinstance(at, datetime):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp()


class QoS(virtual.QoS):
    """kombu's prefetch accounting, with acks and requeues done in logq."""

    def ack(self, delivery_tag: Any) -> None:
        self.channel._settle(delivery_tag, "ack")
        super().ack(delivery_tag)
        self.channel._slot_freed()

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        self.channel._settle(delivery_tag, "give_back" if requeue else "bury")
        super().ack(delivery_tag)      # (kombu's own reject would put a copy back)
        self.channel._slot_freed()

    def restore_unacked(self) -> list[Any]:
        """Give back every message this channel holds unacked (a channel
        closing, a warm shutdown): delivered again at once, no attempt
        counted."""
        self._flush()
        errors = []
        for tag in list(self._delivered):
            try:
                self.channel._settle(tag, "give_back")
            except Exception as exc:
                errors.append((exc, self._delivered.get(tag)))
        self._delivered.clear()
        return errors

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: logq redelivers what ran out of its lease itself."""


class Channel(virtual.Channel):
    """A kombu channel over logq queues (see the module docstring)."""

    QoS = QoS
    supports_fanout = False
    from_transport_options = virtual.Channel.from_transport_options + tuple(_DEFAULTS)  # type: ignore[assignment]

    visibility_timeout = _DEFAULTS["visibility_timeout"]
    max_attempts = _DEFAULTS["max_attempts"]
    commit_interval = _DEFAULTS["commit_interval"]
    fsync = _DEFAULTS["fsync"]

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.root = root_of(connection.client)
        self._out: dict[str, tuple[Any, Any]] = {}      # delivery tag -> (consumer, logq Message)
        self._consumers_by_queue: dict[str, Any] = {}
        self._no_ack: set[str] = set()
        self._lock = threading.Lock()

    # -- queues ---------------------------------------------------------------------
    def _queue(self, name: str) -> Any:
        return open_queue(queue_dir(self.root, name), fsync=self.fsync)

    @staticmethod
    def _usable(c: Any) -> bool:
        return c is not None and not c._closed and not c._g.closed and c._g.q._log is not None

    def _consumer(self, name: str) -> Any:
        """This channel's consumer of queue ``name`` (again after its queue
        was closed, or in a forked child)."""
        c = self._consumers_by_queue.get(name)
        if not self._usable(c):
            with self._lock:        # (the event loop's watcher asks too)
                c = self._consumers_by_queue.get(name)
                if not self._usable(c):
                    c = self._queue(name).consumer(
                        GROUP, visibility_timeout=float(self.visibility_timeout),
                        max_attempts=int(self.max_attempts),
                        commit_interval=float(self.commit_interval))
                    self._consumers_by_queue[name] = c
        return c

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._queue(queue)

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        return os.path.isdir(queue_dir(self.root, queue))

    def _size(self, queue: str) -> int:
        g = self._queue(queue).stats()["groups"].get(GROUP)
        return len(self._queue(queue)) if g is None else g["backlog"] - g["in_flight"]

    def _purge(self, queue: str) -> int:
        """Settle every message of ``queue`` deliverable now (delayed ones
        stay, as Redis's purge leaves its unacked and scheduled ones)."""
        c = self._consumer(queue)
        n = 0
        while True:
            got = c.get_many(1000, timeout=0)
            if not got:
                break
            c.ack_many(got)
            n += len(got)
        c.commit()
        return n

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self._purge(queue)

    # -- publishing -----------------------------------------------------------------
    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        at = eta_seconds(message.get("headers"))
        prio = self._get_message_priority(message)
        data = dumps(message).encode()      # (kombu's JSON, as its Redis transport: datetimes, UUIDs)
        if at is not None and at > time.time():
            self._queue(queue).put(data, priority=prio, deliver_at=at)
        elif prio:
            self._queue(queue).put(data, priority=prio)
        else:
            self._queue(queue).put(data)

    def _lookup(self, exchange: str, routing_key: str, default: Any = None) -> list[str]:
        found = super()._lookup(exchange, routing_key, default)
        if not found and routing_key and self.typeof(exchange).type == "direct":
            # No binding known in this process: Celery names the queue by
            # its routing key.  (A message is never published to nowhere.)
            return [routing_key]
        return found

    # -- consuming ------------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack.add(queue)
        self._consumer(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: Any) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        self._no_ack.discard(queue)
        return super().basic_cancel(consumer_tag)

    def _raw(self, queue: str, c: Any, m: Any, no_ack: bool) -> dict[str, Any]:
        """The kombu payload of logq message ``m``, with a delivery tag of
        this delivery (a redelivery gets a new one).  ValueError if ``m``
        is not one."""
        raw = loads(m.data)
        if not isinstance(raw, dict) or not isinstance(raw.get("properties", {}), dict):
            raise ValueError("a JSON value that is not a kombu message")
        props = raw.setdefault("properties", {})
        tag = f"{m.offset}.{m.attempt}.{os.getpid()}.{next(_tags)}"
        props["delivery_tag"] = tag
        props.setdefault("delivery_info", {})
        if m.attempt > 1:
            raw["redelivered"] = True
        if no_ack:
            c.ack(m)
        else:
            self._out[tag] = (c, m)
        return raw

    def _one(self, queue: str, no_ack: bool) -> dict[str, Any] | None:
        """The next deliverable message of ``queue`` now, or None (what is
        not a kombu message is dead-lettered on the way)."""
        c = self._consumer(queue)
        while True:
            got = c.get_many(1, timeout=0)
            if not got:
                return None
            try:
                return self._raw(queue, c, got[0], no_ack)
            except ValueError as e:
                bury(c, got[0], f"not a kombu message: {e}")

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        raw = self._one(queue, False)
        if raw is None:
            raise Empty()
        return raw

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        raw = self._one(queue, no_ack)
        if raw is None:
            return None
        message = self.Message(raw, channel=self)
        if not no_ack:
            self.qos.append(message, message.delivery_tag)
        return message

    def drain_events(self, timeout: float | None = None, callback: Any = None) -> None:
        """Deliver what is ready on the consumed queues (up to what the
        prefetch limit allows), waiting up to ``timeout`` seconds for the
        first message: a futex wait on the queue (a put by any process
        wakes it), not polling.  Raises Empty when nothing came, at once
        when the prefetch limit is reached."""
        callback = callback or self.connection._deliver
        queues = list(self._active_queues)
        if not self._consumers or not queues or not self.qos.can_consume():
            raise Empty()
        n = self.qos.can_consume_max_estimate()
        n = 64 if n is None else max(1, n)
        start = next(_tags) % len(queues)
        order = queues[start:] + queues[:start]
        for q in order:             # what is ready now, fairly
            if self._deliver_from(q, n, 0, callback):
                return
        wait = _BLOCK_SLICE if timeout is None else timeout
        if len(order) > 1:
            wait = min(wait, _SEVERAL_SLICE)
        if wait > 0 and self._deliver_from(order[0], n, wait, callback):
            return
        raise Empty()

    def _deliver_from(self, queue: str, n: int, timeout: float, callback: Any) -> bool:
        c = self._consumer(queue)
        got = c.get_many(n, timeout=timeout)
        no_ack = queue in self._no_ack
        delivered = False
        for m in got:
            try:
                raw = self._raw(queue, c, m, no_ack)
            except ValueError as e:     # (json's errors, UnicodeDecodeError among them)
                bury(c, m, f"not a kombu message: {e}")
                continue
            callback(raw, queue)
            delivered = True
        return delivered

    # -- settling -------------------------------------------------------------------
    def _slot_freed(self) -> None:
        """A prefetch slot is free: an event loop (if any) delivers again."""
        wake = getattr(self.connection, "_wake", None)
        if wake is not None:
            wake.room.set()     # (a watcher waiting for room looks again)
            wake.signal()       # (the loop delivers into the free slot now)

    def _settle(self, tag: str, how: str) -> None:
        """Ack (or give back) the logq delivery behind kombu ``tag``; a tag
        already settled does nothing."""
        entry = self._out.pop(tag, None)
        if entry is None:
            return
        c, m = entry
        if how == "ack":
            c.ack(m)
        elif how == "bury":
            bury(c, m, "rejected by the consumer (basic_reject without requeue)")
        else:
            c.give_back([m])

    def close(self) -> None:
        super().close()             # gives back what is unacked (QoS.restore_unacked)
        for c in list(self._consumers_by_queue.values()):
            try:
                c.commit()
            except Exception:       # (a queue closed at exit already committed)
                pass


class Transport(virtual.Transport):
    """kombu's ``logq://`` transport."""

    Channel = Channel
    default_port = None
    driver_type = "logq"
    driver_name = "logq"
    polling_interval = 0.02
    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct"]))
    _wake: "_Wake | None" = None

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        if not client.transport_options.get("event_loop", True):
            # Celery then runs its blocking loop (drain_events) and billiard's plain pool.
            self.implements = virtual.Transport.implements.extend(
                asynchronous=False, exchange_type=frozenset(["direct"]))

    # -- Celery's event loop (kombu's hub) ----------------------------------------------
    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Deliver from the worker's event loop: a watcher thread sleeps on
        the consumed queues (a futex wait: a put by any process, a poke, or
        the next due time wakes it) and signals an eventfd the loop
        watches; the loop then delivers what is ready without blocking
        (each look is one claim transaction).  An ack or reject that frees
        a prefetch slot signals it too."""
        if self._wake is None:
            self._wake = _Wake(self)
        loop.add_reader(self._wake.fd, self._on_wake)

    def _on_wake(self) -> None:
        wake = self._wake
        if wake is None:
            return
        wake.clear()
        for _ in range(_LOOKS_PER_WAKE):
            try:
                self.cycle.get(self._deliver, timeout=0)  # type: ignore[union-attr]
            except Empty:
                return
        wake.signal()       # (more may be ready: after the loop's other work)

    def close_connection(self, connection: Any) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.stop()
        super().close_connection(connection)

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Deliver the next message(s) of any channel; socket.timeout after
        ``timeout`` seconds without one.  While every channel is at its
        prefetch limit (the worker is busy), naps doubling from 1 ms to
        ``polling_interval`` (acks come from other threads)."""
        limit = None if timeout is None else time.monotonic() + timeout
        nap = 0.001
        while True:
            left = None if limit is None else limit - time.monotonic()
            try:
                self.cycle.get(self._deliver,  # type: ignore[union-attr]
                               timeout=left if left is None else max(0.0, left))
                return
            except Empty:
                pass
            left = None if limit is None else limit - time.monotonic()
            if left is not None and left <= 0:
                raise socket.timeout()
            time.sleep(nap if left is None else min(nap, left))
            nap = min(nap * 2, self.polling_interval)

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {"port": None, "hostname": None}     # a local directory: no host to default to

    def driver_version(self) -> str:
        import logq
        return logq.__version__


class _Wake:
    """An eventfd that Celery's event loop watches, and the thread that
    signals it when a consumed queue may have something: it snapshots the
    queue's tail, signals (so the loop looks after the snapshot: nothing
    put before it is missed), then sleeps until a put past the snapshot,
    a poke, the group's next due time or ``_WATCH_SLICE``."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        if hasattr(os, "eventfd"):
            self.fd = self._wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:   # (Python 3.9, or not Linux: a pipe does the same)
            self.fd, self._wfd = os.pipe()
            os.set_blocking(self.fd, False)
            os.set_blocking(self._wfd, False)
        self._stop = threading.Event()
        self.room = threading.Event()     # set when an ack frees a prefetch slot
        self._thread = threading.Thread(target=self._watch, name="logq-kombu-watch", daemon=True)
        self._thread.start()

    def signal(self) -> None:
        try:
            os.write(self._wfd, (1).to_bytes(8, "little"))   # (an eventfd adds the 8-byte count)
        except OSError:
            pass        # (already signalled to the limit, or closed)

    def clear(self) -> None:
        try:
            while os.read(self.fd, 4096) and self._wfd != self.fd:
                pass    # (a pipe: read until empty; an eventfd: one read resets it)
        except OSError:
            pass

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self._watch_once()
            except Exception:   # (a queue closing at exit): look again shortly
                if self._stop.wait(0.05):
                    return

    def _watch_once(self) -> None:
        channels = [ch for ch in list(self.transport.channels or []) if getattr(ch, "_active_queues", None)]
        if not channels:
            self._stop.wait(0.05)
            return
        if not any(ch.qos.can_consume() for ch in channels):
            # Every prefetch slot is taken: puts do not matter until an ack
            # frees one (which sets ``room``); no wake per put meanwhile.
            self.room.wait(_WATCH_SLICE)
            self.room.clear()
            self.signal()
            return
        self.room.clear()
        queues = [(ch, q) for ch in channels for q in list(ch._active_queues)]
        slice_s = _WATCH_SLICE if len(queues) == 1 else _SEVERAL_SLICE
        for ch, name in queues:
            c = ch._consumer(name)
            q = c.queue
            seen = q.next_offset
            self.signal()
            wait = slice_s
            due = c._g.next_due()
            if due is not None:
                wait = min(wait, max(0.0, (due - time.time_ns()) / 1e9))
            if wait > 0:
                q.wait(seen, wait)
            if self._stop.is_set():
                return

    def stop(self) -> None:
        self._stop.set()
        self.room.set()
        self._thread.join(5)
        for fd in {self.fd, self._wfd}:
            try:
                os.close(fd)
            except OSError:
                pass

"""Store and forward: drain a consumer group into NATS JetStream or MQTT.

An edge device puts into a logq queue whatever the state of its uplink; a
:class:`Forwarder` consumes one consumer group of that queue (``"forward"``
unless told otherwise) and publishes each message upstream, many at a time.
A message is acked in logq only after the upstream acknowledged it (a
JetStream publish ack; a PUBACK at MQTT QoS 1), and acks are committed in
batches (the group's ``commit_interval``), so while the link is down the
messages simply stay in the queue, under its disk budget (``max_bytes``,
``on_full``), and drain when it comes back.

    fw = Forwarder("/var/lib/app/q", "nats://127.0.0.1:4222", subject="edge.events",
                   stream="EDGE")
    fw.run()                    # until SIGTERM/SIGINT (or fw.stop() from another thread)

The clients are optional dependencies, imported only when a forwarder
connects: ``pip install 'logq[nats]'`` (nats-py) or ``'logq[mqtt]'``
(paho-mqtt).

Promises
--------

**JetStream: each message exactly once, in order** -- within the limits
below.  Every message is published with the header
``Nats-Msg-Id: <queue_id>:<offset>:<timestamp_ns>`` (``queue_id`` is the
queue directory's stable identity; the record's write timestamp tells a
record from a later one at the same offset, which follows when recovery cut
a tail that was never durable), so JetStream drops a second copy that
arrives within the stream's ``duplicate_window``.  Order comes from three rules:

1. *One forwarder per group.*  A forwarder holds an exclusive lock for its
   (queue, group) while it runs; a second one raises ForwarderBusyError.
2. *Publish in one order, and on any failure start again from the oldest
   message not acknowledged.*  Messages go out on one connection, which
   the server handles in order, so what landed of a window is a prefix of
   it.  On any failure (a publish error, an ack timeout, a lost
   connection) the connection is dropped and the whole window is sent
   again, oldest first, after reconnecting: the prefix that had landed is
   dropped as duplicates, the rest lands in order.  Acks in logq follow the
   same order (only the acknowledged prefix of the window is acked), so
   what logq has committed is always a prefix of what was published.
3. *After a restart, what the last process held is sent again sorted by
   offset.*  A killed forwarder's messages are given back to the group at
   once (its leases die with it); a new forwarder first claims everything
   the group has due for redelivery, sorts it by offset, and sends it before
   anything new.  (Claiming only part of it could otherwise put a later
   message ahead of an earlier one after two crashes in a row.)

While one forwarder process lives, the duplicate window does not bound how
long an outage may last: on every reconnect the forwarder reads the last
message of its subject in the stream; if it landed since the previous
connect (its stream sequence grew), this process sent it, and if it is in
the window about to be sent again, everything sent before it is in the
stream too (rule 2: landed then, or earlier, which made it a duplicate), so
those are acked without being sent again.  (A message the stream answered
with an error did not land: the skip stops before it.)  What the duplicate window does bound is **a restart**: a
forwarder killed (or stopped during an outage) leaves up to ``window``
messages it cannot know landed, plus the acks not yet committed
(``commit_interval``); sent again by the next forwarder, they are dropped
only if they arrive within ``duplicate_window`` of the first copy.  So keep
the stream's window longer than a forwarder can be down (the default made
here is 2 minutes; a forwarder refuses a stream whose window is shorter than
its ``duplicate_window`` option).  Past it, delivery is still at least once
and duplicates are bounded by ``window`` plus one commit interval of acks.

Other limits: the resume check and the order hold when this forwarder is
the only publisher on its subject.  Delayed and prioritised messages are
forwarded when the group delivers them (a delayed message lands when it is
due, after later offsets).  A message the stream refuses while later ones
are accepted (a per-message error, e.g. larger than the stream's
``max_msg_size``) breaks the order, and one it always refuses stops the
forwarder at that message: ``stats()["last_error"]`` says why.

**MQTT: at least once.**  QoS 1 (or 2); a message is acked in logq after
its PUBACK (PUBCOMP).  MQTT brokers do not deduplicate QoS 1 publishes, so a
failure sends the unacknowledged window again: duplicates are possible,
at most ``window`` per failure (plus one commit interval of acks after a
crash of the forwarder); first copies arrive in order.
``duplicates_total`` counts what was sent again (an upper bound).

**Outages.** Reconnects back off exponentially with full jitter
(``backoff_base`` .. ``backoff_max``); a circuit breaker counts connection
attempts and failed sessions, and after ``breaker_min_calls`` of them in
``breaker_window`` seconds at a failure rate of ``breaker_threshold`` it
stops trying for ``breaker_cooldown`` seconds, then lets one probe through.
``stats()`` shows progress, lag and state, and the same dict is published
as a status file (``logq stat``, ``logq metrics``) every
``status_interval`` seconds and on every change of state.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from logq import _format as F
from logq import _status
from logq._consumer import Consumer, Message
from logq._errors import ForwardConfigError, ForwardError, ForwarderBusyError, LogqError
from logq._options import _check_int, _check_seconds
from logq._queue import Queue
from logq._retry import CircuitBreaker, backoff_delay
from logq._service import Service
from logq._sinks import (Entry, LinkLost, MqttSink, NatsSink, check_installed, check_subject, check_topic, describe,
                         parse_target)

log = logging.getLogger("logq")

__all__ = ["Forwarder", "ForwardOptions", "ForwardError", "ForwardConfigError", "ForwarderBusyError"]

_LONG_LEASE = 1e8          # s: the forwarder's leases never run out (a dead forwarder's go at once)
_NO_DEAD_LETTERS = 1 << 30  # deliveries: a message is never dead-lettered for a crash or an outage
_STARTUP_CHUNK = 10_000    # claims of the redelivery backlog at start
_IDLE_WAIT = 0.25          # a forwarder with nothing to do sleeps in get_many this long at a time
_POLL = 0.05               # waits for acks look at stop requests and lost connections this often
_UNTIL_IDLE_GRACE = 1.0    # until_idle: a redelivery due later than this does not keep it running


@dataclass(frozen=True)
class ForwardOptions:
    """A forwarder's options, with their defaults."""
    group: str = "forward"          # the consumer group forwarded
    window: int = 1000              # publishes in flight (sent, not yet acknowledged)
    ack_timeout: float = 10.0       # a publish unacknowledged this long fails the window (s)
    connect_timeout: float = 5.0    # one connection attempt (s)
    commit_interval: float = 0.2    # acks are committed in logq this often (s)...
    commit_every: int = 50_000      # ...or after this many
    backoff_base: float = 0.1       # reconnects: the first within this many seconds...
    backoff_max: float = 10.0       # ...doubling up to this cap, with full jitter
    breaker_threshold: float = 0.5  # failure fraction of connection attempts that opens the breaker...
    breaker_window: float = 30.0    # ...over this many seconds...
    breaker_min_calls: int = 3      # ...once at least this many attempts were made
    breaker_cooldown: float = 5.0   # open this long, then one probe
    drain_timeout: float = 10.0     # at stop, wait this long for the acks of what is in flight (s)
    status_interval: float = 1.0    # the status file is refreshed this often (s)
    # NATS JetStream
    stream: str | None = None       # the stream; created (file storage) if missing.  None: the
                                    # stream that captures the subject, which must exist
    duplicate_window: float = 120.0  # a created stream's; an existing one must have at least this
    resume_check: bool = True       # on reconnect, ack what the stream shows landed (see above)
    # MQTT
    qos: int = 1                    # 1 or 2 (0 has no acknowledgement to wait for)
    client_id: str | None = None    # default: logq-forward-<queue id>-<group>
    keepalive: int = 30             # MQTT keepalive (s)

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ForwardConfigError(f"group must be a non-empty str, not {self.group!r}")
        _check_int("window", self.window, 1, 1 << 20)
        _check_int("commit_every", self.commit_every, 1, 1 << 30)
        _check_int("breaker_min_calls", self.breaker_min_calls, 1, 1 << 20)
        _check_int("keepalive", self.keepalive, 1, 65535)
        for name in ("ack_timeout", "connect_timeout", "commit_interval", "backoff_base", "backoff_max",
                     "breaker_window", "drain_timeout", "status_interval", "duplicate_window"):
            _check_seconds(name, getattr(self, name))
        if self.breaker_cooldown < 0:
            raise ForwardConfigError("breaker_cooldown must not be negative")
        if not 0 < self.breaker_threshold <= 1:
            raise ForwardConfigError(f"breaker_threshold must be in (0, 1], not {self.breaker_threshold!r}")
        if self.qos not in (1, 2):
            raise ForwardConfigError(f"qos must be 1 or 2 (QoS 0 is never acknowledged), not {self.qos!r}")
        if self.stream is not None and (not isinstance(self.stream, str) or not self.stream
                                        or any(c in self.stream for c in " .*>\t")):
            raise ForwardConfigError(f"stream must be a JetStream stream name (no spaces, '.', '*' "
                                     f"or '>'), not {self.stream!r}")


# -- the forwarder ------------------------------------------------------------------------
class Forwarder(Service):
    """Forward consumer group ``group`` of the queue at ``queue`` (a path,
    or an open :class:`logq.Queue` that stays open) to ``target``:
    ``nats://HOST:PORT`` with ``subject=`` (JetStream), or
    ``mqtt://HOST:PORT`` with ``topic=``.  Options: :class:`ForwardOptions`
    (keywords), and ``queue_options`` for ``logq.open`` when given a path.

    ``run()`` blocks until ``stop()``, SIGTERM or SIGINT (in the main
    thread), or with ``until_idle=True`` until nothing is left to forward;
    ``start()``/``stop()`` run it in a background thread; ``stats()`` at any
    time.  Bad arguments raise ForwardConfigError (a ValueError) here,
    before anything is touched."""

    _thread_name = "logq-forward"
    _started_error = ForwardError

    def __init__(self, queue: str | os.PathLike[str] | Queue, target: str, *, subject: str | None = None,
                 topic: str | None = None, queue_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        try:
            self.options = o = ForwardOptions(**options)
        except ForwardConfigError:
            raise
        except (TypeError, ValueError) as e:
            raise ForwardConfigError(str(e)) from None
        self.target = parse_target(target)
        if self.target.scheme == "nats":
            if topic is not None or subject is None:
                raise ForwardConfigError("a nats:// target needs subject= (--subject), not topic=")
            check_subject(subject)
            check_installed(NatsSink)
        else:
            if subject is not None or topic is None:
                raise ForwardConfigError("an mqtt:// target needs topic= (--topic), not subject=")
            check_topic(topic)
            check_installed(MqttSink)
        self._subject, self._topic = subject, topic
        if isinstance(queue, Queue):
            self._queue, self.path = queue, queue.path
        else:
            self._queue, self.path = None, os.fspath(queue)  # type: ignore[assignment]
            if not os.path.isdir(self.path):
                raise ForwardConfigError(f"no queue directory at {self.path!r}")
        self.queue_options = dict(queue_options or {})
        self.group = o.group
        self.breaker = CircuitBreaker(threshold=o.breaker_threshold, window=o.breaker_window,
                                      min_calls=o.breaker_min_calls, cooldown=o.breaker_cooldown, probes=1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._drain = True
        self._c = {"published_total": 0, "acked_total": 0, "sent_total": 0, "duplicates_total": 0,
                   "resent_total": 0, "skipped_landed_total": 0, "reconnects_total": 0,
                   "failures_total": 0, "connects_total": 0}
        self._connected = False
        self._in_flight = 0
        self._pending = 0
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._lag: int | None = None
        self._started: float | None = None
        self._shown: tuple[Any, ...] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def run(self, until_idle: bool = False) -> dict[str, Any]:
        """Forward until stopped (SIGTERM/SIGINT drain: stop claiming, wait
        up to ``drain_timeout`` for the acks of what is in flight, give the
        rest back, commit); with ``until_idle`` until nothing is left.
        Returns the final stats."""
        return self._run(until_idle)

    def _serve(self, until_idle: bool) -> None:
        asyncio.run(self._main(until_idle))

    def stop(self, drain: bool = True) -> dict[str, Any]:
        """Stop (waiting up to ``drain_timeout`` for in-flight acks when
        ``drain``); returns the final stats; raises what ended the run, if
        it failed."""
        self._drain = drain
        self._request_stop()
        return self._join()

    def __repr__(self) -> str:
        return f"<logq.Forwarder {self.path!r} group={self.group!r} -> {self.target.public}>"

    def _request_stop(self) -> None:
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass        # the loop has finished

    def stats(self) -> dict[str, Any]:
        """Counters since start, and the state now (the status file's body)."""
        with self._lock:
            out: dict[str, Any] = {
                "target": self.target.public,
                "protocol": self.target.scheme,
                "subject": self._subject if self._subject is not None else self._topic,
                "group": self.group,
                "connected": self._connected,
                "breaker": self.breaker.state,
                "breaker_opened_total": self.breaker.opened,
                "in_flight": self._in_flight,
                "pending": self._pending,
                "lag": self._lag,
                "window": self.options.window,
                "last_error": self._last_error,
                "last_error_at": self._last_error_at,
                "started": self._started,
            }
            out.update(self._c)
        return out

    # -- the loop ---------------------------------------------------------------------
    async def _main(self, until_idle: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._stop.is_set():
            return
        own = self._queue is None
        q = Queue(self.path, **self.queue_options) if own else self._queue
        lock_fd = -1
        c = None
        sink: Any = None
        try:
            lock_fd = self._lock_group(q.path)
            o = self.options
            if self.target.scheme == "nats":
                sink = NatsSink(self.target, self._subject, o, q.queue_id)  # type: ignore[arg-type]
            else:
                sink = MqttSink(self.target, self._topic, o, q.queue_id, self.group)  # type: ignore[arg-type]
            c = Consumer(q, self.group, visibility_timeout=_LONG_LEASE, max_attempts=_NO_DEAD_LETTERS,
                         commit_every=o.commit_every, commit_interval=o.commit_interval, prefetch=1)
            self._started = time.time()
            await _Run(self, q, c, sink, until_idle).go()
        finally:
            try:
                if c is not None:
                    c.close()
            finally:
                if own:
                    q.close()
                _status.withdraw(q.path, "forward", self.group)
                if lock_fd >= 0:
                    os.close(lock_fd)

    def _lock_group(self, qdir: str) -> int:
        """An exclusive flock for (queue, group), held until the run ends
        (or the process dies)."""
        where = os.path.join(qdir, F.STATUS_DIR)
        os.makedirs(where, exist_ok=True)
        digest = hashlib.sha1(self.group.encode()).hexdigest()[:16]
        path = os.path.join(where, f"forward-{digest}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ForwarderBusyError(f"another forwarder runs for group {self.group!r} of {qdir} "
                                     "(one per group keeps the order); stop it first") from None
        return fd

    def _failed(self, why: str) -> None:
        with self._lock:
            self._c["failures_total"] += 1
            self._last_error = why
            self._last_error_at = time.time()


class _Run:
    """One run of a forwarder: the event loop's state."""

    def __init__(self, fw: Forwarder, q: Queue, c: Consumer, sink: Any, until_idle: bool) -> None:
        self.fw, self.q, self.c, self.sink = fw, q, c, sink
        self.o = fw.options
        self.until_idle = until_idle
        self.pending: deque[Entry] = deque()   # claimed, to send (in order)
        self.window: deque[Entry] = deque()    # sent, awaiting acknowledgement (in order)
        self.tried: dict[int, bool] = {}         # offsets sent on a connection that failed -> refused
        self.last_seq: int | None = None         # the subject's last stream sequence at the last connect
        self.attempt = 0                         # failed connection attempts in a row
        self.next_status = 0.0
        self.claimed_tail = -1                   # q.next_offset when a claim last found nothing
        self.c_ = fw._c

    # -- top level --------------------------------------------------------------------
    async def go(self) -> None:
        fw = self.fw
        self._startup_claims()
        self._status(force=True)
        try:
            while not fw._stop.is_set():
                if not fw._connected:
                    if not await self._connect():
                        continue
                try:
                    progressed = await self._pump()
                except LinkLost as e:
                    await self._link_failed(str(e))
                    continue
                if not progressed and not self.window and not self.pending:
                    if await self._idle():
                        break
                self._status()
        finally:
            await self._shutdown()

    def _startup_claims(self) -> None:
        """Claim everything due for redelivery (a dead forwarder's
        messages, given-back ones) before anything new, and send it in
        offset order (module docstring, rule 3)."""
        got: list[Message] = []
        while True:
            batch = self.c.get_many(_STARTUP_CHUNK, timeout=0)
            got += batch
            if len(batch) < _STARTUP_CHUNK or any(not m.due for m in batch):
                break
        got.sort(key=_offset)
        self.pending.extend(map(Entry, got))
        if got and got[0].due:
            log.info("logq forward %s: %d message(s) to send again first", self.q.path,
                     sum(1 for m in got if m.due))

    # -- connecting ---------------------------------------------------------------------
    async def _connect(self) -> bool:
        fw, o, br = self.fw, self.o, self.fw.breaker
        now = time.monotonic()
        if not br.allow(now):
            self._status()
            await self._sleep(min(0.1, max(0.01, br.cooldown)))
            return False
        try:
            last = await asyncio.wait_for(self.sink.connect(), o.connect_timeout + 1)
        except ForwardError:
            await self.sink.close()
            raise
        except Exception as e:  # noqa: BLE001 - any failure to connect is retried
            await self.sink.close()
            self.attempt += 1
            fw._failed(f"connect to {fw.target.public} failed: {describe(e)}")
            br.record(False, time.monotonic())
            self._status(force=True)
            await self._sleep(backoff_delay(self.attempt, o.backoff_base, o.backoff_max))
            return False
        br.record(True, time.monotonic())
        self.attempt = 0
        with fw._lock:
            if self.c_["connects_total"]:
                self.c_["reconnects_total"] += 1
            self.c_["connects_total"] += 1
            fw._connected = True
        if last is not None:
            last_id, seq = last
            if self.last_seq is not None and seq > self.last_seq and last_id is not None:
                self._skip_landed(last_id)
            self.last_seq = seq
        self._status(force=True)
        return True

    def _skip_landed(self, last_id: str) -> None:
        """The subject's last message in the stream is ``last_id`` and it
        landed since the previous connect, so this process sent it: if it
        is in the window being sent again, everything this process sent
        before it is in the stream too (landed then, or before: a
        duplicate); ack them without sending.  A message the stream refused
        (an error reply) stops the run: it did not land."""
        if not self.tried:
            return
        k = None
        for i, e in enumerate(self.pending):
            if self.tried.get(e.m.offset, True):
                break       # not sent on the failed connection, or refused there
            if self.sink.msg_id(e.m) == last_id:
                k = i
        if k is None:
            return
        landed = [self.pending.popleft().m for _ in range(k + 1)]
        for m in landed:
            self.tried.pop(m.offset, None)
        self.c.ack_many(landed)
        with self.fw._lock:
            self.c_["acked_total"] += len(landed)
            self.c_["skipped_landed_total"] += len(landed)
        log.info("logq forward %s: %d message(s) had landed before the link failed", self.q.path,
                 len(landed))

    async def _link_failed(self, why: str) -> None:
        """Drop the connection; the window goes back in front of what is
        pending, to be sent again in the same order."""
        fw = self.fw
        fw._failed(why)
        fw.breaker.record(False, time.monotonic())
        for e in self.window:
            f = e.fut
            self.tried[e.m.offset] = f is not None and f.done() and not f.cancelled() \
                and f.exception() is not None
        self.pending.extendleft(reversed(self.window))
        self.window.clear()
        with fw._lock:
            fw._connected = False
            fw._in_flight = 0
        await self.sink.close()
        self.attempt += 1
        log.warning("logq forward %s -> %s: %s; %d message(s) will be sent again", self.q.path,
                    fw.target.public, why, len(self.tried))
        self._status(force=True)
        await self._sleep(backoff_delay(self.attempt, self.o.backoff_base, self.o.backoff_max))

    # -- moving messages -----------------------------------------------------------------
    async def _pump(self) -> bool:
        """Fill the window, then settle what was acknowledged (waiting up to
        _POLL for the oldest).  Whether anything moved."""
        sink, window, pending, o = self.sink, self.window, self.pending, self.o
        moved = False
        room = o.window - len(window)
        if room and len(pending) < room:
            self._claim()
        if room and pending:
            tried = self.tried
            now = time.monotonic()
            n = min(room, len(pending))
            resent = 0
            for _ in range(n):
                e = pending.popleft()
                if tried and tried.pop(e.m.offset, None) is not None:
                    resent += 1
                e.sent = now
                window.append(e)
                try:
                    await sink.send(e)
                except LinkLost:
                    raise
                except Exception as ex:  # noqa: BLE001 - a closed connection, a full buffer
                    raise LinkLost(f"publish failed: {describe(ex)}") from None
            with self.fw._lock:
                self.c_["sent_total"] += n
                self.c_["resent_total"] += resent
                if sink.kind == "mqtt":
                    self.c_["duplicates_total"] += resent
            moved = True
        if not window:
            return moved
        if sink.lost:
            raise LinkLost(sink.lost)
        head = window[0]
        if not head.fut.done():
            wait = head.sent + o.ack_timeout - time.monotonic()
            if wait <= 0:
                raise LinkLost(f"no acknowledgement within {o.ack_timeout:g}s")
            await asyncio.wait([head.fut], timeout=min(wait, _POLL))
        return self._settle() or moved

    def _settle(self) -> bool:
        """Ack in logq the acknowledged prefix of the window."""
        window, outcome = self.window, self.sink.outcome
        done: list[Message] = []
        dups = 0
        while window and window[0].fut.done():
            e = window[0]
            try:
                dups += outcome(e.fut)
            except asyncio.CancelledError:
                raise LinkLost("publish cancelled") from None
            except Exception as ex:  # noqa: BLE001 - the upstream refused it
                if done:
                    self._ack(done, dups)
                raise LinkLost(f"publish of offset {e.m.offset} failed: {describe(ex)}") from None
            window.popleft()
            done.append(e.m)
        if done:
            self._ack(done, dups)
        return bool(done)

    def _ack(self, done: list[Message], dups: int) -> None:
        self.c.ack_many(done)
        fw = self.fw
        with fw._lock:
            self.c_["published_total"] += len(done)
            self.c_["acked_total"] += len(done)
            if self.sink.kind == "nats":
                self.c_["duplicates_total"] += dups
            fw._in_flight = len(self.window)
            fw._pending = len(self.pending)

    def _claim(self) -> None:
        """Claim up to a window's worth more, unless the last claim found
        nothing and nothing was put since."""
        tail = self.q.next_offset
        if tail == self.claimed_tail and not self._due_soon():
            return
        got = self.c.get_many(self.o.window, timeout=0)
        if got:
            self.pending.extend(map(Entry, got))
            self.claimed_tail = -1
        else:
            self.claimed_tail = tail

    def _due_soon(self) -> bool:
        due = self.c._g.next_due()
        return due is not None and due <= time.time_ns()

    async def _idle(self) -> bool:
        """Nothing in hand: wait a little for a message (a put wakes the
        wait).  True when ``until_idle`` and nothing is left to forward."""
        c = self.c
        loop = asyncio.get_running_loop()
        got = await loop.run_in_executor(None, c.get_many, self.o.window, _IDLE_WAIT)
        if got:
            self.pending.extend(map(Entry, got))
            self.claimed_tail = -1
            return False
        if self.until_idle:
            due = c._g.next_due()
            return due is None or due > time.time_ns() + _UNTIL_IDLE_GRACE * 1e9
        return False

    # -- stopping ---------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Give back what was not sent; wait for the acks of what was (up to
        drain_timeout) while connected; give back the rest; commit."""
        fw, c = self.fw, self.c
        try:
            if self.pending:
                c.give_back([e.m for e in self.pending])
                self.pending.clear()
            deadline = time.monotonic() + self.o.drain_timeout
            while fw._drain and self.window and fw._connected and time.monotonic() < deadline:
                if self.sink.lost:
                    break
                head = self.window[0]
                if head.fut is None:
                    break
                if not head.fut.done():
                    await asyncio.wait([head.fut], timeout=min(_POLL, max(0.0, deadline - time.monotonic())))
                try:
                    self._settle()
                except LinkLost as e:
                    fw._failed(str(e))
                    break
            if self.window:
                c.give_back([e.m for e in self.window])
                self.window.clear()
            c.commit()
        finally:
            await self.sink.close()
            with fw._lock:
                fw._connected = False
                fw._in_flight = 0
                fw._pending = 0
            self._status(force=True, final=True)

    # -- helpers ----------------------------------------------------------------------
    async def _sleep(self, seconds: float) -> None:
        wake = self.fw._wake
        assert wake is not None
        if self.fw._stop.is_set():
            return
        try:
            await asyncio.wait_for(wake.wait(), max(0.0, seconds))
        except asyncio.TimeoutError:
            pass

    def _status(self, force: bool = False, final: bool = False) -> None:
        """Publish the stats as a status file every status_interval, and at
        once when the state (connection, breaker) changed."""
        fw = self.fw
        now = time.monotonic()
        state = (fw._connected, fw.breaker.current(now))
        if not force and state == fw._shown and now < self.next_status:
            return
        with fw._lock:
            fw._in_flight = len(self.window)
            fw._pending = len(self.pending)
        try:
            fw._lag = self.q.stats()["groups"].get(fw.group, {}).get("backlog")
        except LogqError:
            pass
        fw._shown = state
        self.next_status = now + self.o.status_interval
        if not final:
            _status.publish(self.q.path, "forward", fw.group, fw.stats())


def _offset(m: Message) -> int:
    return m.offset

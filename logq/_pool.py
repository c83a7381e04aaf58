"""The worker pool: run a handler on every message of a consumer group in N
worker processes, never losing one.

The parent process owns everything durable: it claims messages through a
consumer of the group (``take``: a batch of offsets; the payloads are not
read), sends each batch to an idle worker over its pipe as runs of offsets
(``(first, count)``, plus attempts, keys and priorities only when some
message is not plain), collects each batch's failures (offsets and error
texts), acks the rest as runs and nacks the failures, and commits: one
index commit every ``commit_every`` acks or ``commit_interval`` seconds.
A worker opens the queue itself and reads the payloads from the log's
shared mapping (zero-copy dispatch: no payload crosses a pipe); it writes
nothing to the queue, and runs the handler.  So:

* a worker that dies (SIGKILL, a crash in C) or overruns ``timeout`` is
  killed and replaced; the message it was running counts as a failed
  attempt (the error says which), the rest of its batch is given back
  unprocessed (no attempt counted);
* the parent dying takes its workers with it (PR_SET_PDEATHSIG on Linux,
  and a closed pipe everywhere) and releases its leases at once, so another
  pool delivers what was not committed: at least once, with the redelivery
  window of the consumer group (docs/consumer-groups.md);
* a failure burst (a downstream outage) opens a circuit breaker: dispatch
  stops for ``breaker_cooldown`` seconds, then a few probes go through; the
  messages wait in the queue instead of burning their attempts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields
from multiprocessing.connection import wait as wait_for
from operator import attrgetter
from typing import Any, Callable

from logq import _status
from logq._batch import Batch
from logq._consumer import Consumer, GroupOptions, Message
from logq._errors import LogqError
from logq._options import _check_int, _check_seconds
from logq._queue import Queue
from logq._retry import CircuitBreaker
from logq._service import Service
from logq._worker import _Worker, resolve_handler

log = logging.getLogger("logq")

_TS = attrgetter("ts_ns")
_LATENCY_SAMPLES = 20_000      # put -> commit latencies kept for the percentiles
_COUNTERS_EVERY = 0.2          # with nothing else to commit, the delivery counters this often (s)
_IDLE_GRACE = 1.0
_BATCH_SECONDS = 0.02          # adaptive batch size: about this much work per batch...
_BATCH_MAX = 2000              # ...within 1 and this many messages
_DEPTH = 2                     # batches out with one worker at a time, if small enough:
_PIPE_ROOM = 48 << 10          # a batch queued behind a running one must fit in the pipe
                               # (a hung worker never reads it: a larger send would block)
_START_FAILURES = 5            # workers in a row dying before any work: give up, say why              # until_idle: retries due later than this do not keep the pool running


@dataclass(frozen=True)
class PoolOptions:
    """The pool's own options, with their defaults (the consumer-group
    options are accepted too: visibility_timeout, max_attempts,
    backoff_base, backoff_max)."""
    workers: int = 2                  # processes to start with
    min_workers: int | None = None    # autoscaling floor (default: workers)
    max_workers: int | None = None    # autoscaling ceiling (default: workers)
    batch: bool = False               # handler(list_of_messages) instead of handler(message)
    batch_size: int | None = None     # messages sent to a worker at once (None: adaptive)
    timeout: float | None = None      # a message running longer kills its worker (s)
    start_method: str | None = None   # multiprocessing start method (default: forkserver, or spawn)
    commit_every: int = 10_000        # commit acks after this many...
    commit_interval: float = 0.2      # ...or this many seconds
    breaker_threshold: float = 0.5    # failure fraction that opens the breaker...
    breaker_window: float = 10.0      # ...over this many seconds...
    breaker_min_calls: int = 20       # ...once at least this many outcomes are in
    breaker_cooldown: float = 5.0     # open this long, then half-open
    breaker_probes: int = 3           # probes that must succeed to close it
    scale_interval: float = 1.0       # autoscaling looks this often (s)
    idle_timeout: float = 5.0         # a worker idle this long may be stopped (s)

    def __post_init__(self) -> None:
        _check_int("workers", self.workers, 1, 4096)
        lo = self.workers if self.min_workers is None else self.min_workers
        hi = self.workers if self.max_workers is None else self.max_workers
        _check_int("min_workers", lo, 1, 4096)
        _check_int("max_workers", hi, 1, 4096)
        if not lo <= self.workers <= hi:
            raise ValueError(f"need min_workers <= workers <= max_workers, not {lo}, {self.workers}, {hi}")
        object.__setattr__(self, "min_workers", lo)
        object.__setattr__(self, "max_workers", hi)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1, 1 << 20)
        _check_int("commit_every", self.commit_every, 1, 1 << 30)
        _check_int("breaker_min_calls", self.breaker_min_calls, 1, 1 << 30)
        _check_int("breaker_probes", self.breaker_probes, 1, 1 << 20)
        for name in ("commit_interval", "breaker_window", "scale_interval", "idle_timeout"):
            _check_seconds(name, getattr(self, name))
        if self.timeout is not None:
            _check_seconds("timeout", self.timeout)
        if not 0 < self.breaker_threshold <= 1:
            raise ValueError(f"breaker_threshold must be in (0, 1], not {self.breaker_threshold!r}")
        if self.breaker_cooldown < 0:
            raise ValueError("breaker_cooldown must not be negative")
        methods = multiprocessing.get_all_start_methods()
        if self.start_method is not None and self.start_method not in methods:
            raise ValueError(f"start_method must be one of {methods}, not {self.start_method!r}")


@dataclass
class PoolStats:
    """A snapshot of a pool.  Counts since the pool started; latencies are
    from put to the commit that made the ack durable."""
    processed: int = 0                # handled successfully, acked
    failed: int = 0                   # handler raised, timed out, or its worker died
    retried: int = 0                  # failures scheduled for another attempt
    dead_lettered: int = 0            # failures that used up max_attempts
    timeouts: int = 0
    worker_deaths: int = 0            # workers that died or were killed (timeouts included)
    in_flight: int = 0                # messages out with workers now
    waiting: int = 0                  # claimed, not yet sent to a worker
    workers: int = 0
    busy_seconds: dict[int, float] = field(default_factory=dict)   # per worker pid
    latency_p50: float | None = None
    latency_p99: float | None = None
    throughput: float = 0.0           # processed per second, over the last scale interval
    breaker: str = "closed"
    breaker_opened: int = 0
    commits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class WorkerPool(Service):
    """Run ``handler(message)`` (or ``handler(messages)`` with
    ``batch=True``) on every message of consumer group ``group`` of the
    queue at ``path``, in worker processes.  ``handler`` is an importable
    callable (or ``"module:function"``).  Options: see PoolOptions, plus
    the consumer-group options and ``queue_options`` for ``logq.open``.

    Use ``run()`` (blocks; ``until_idle=True`` returns once nothing is left
    to do), or ``start()``/``stop()``, or ``with WorkerPool(...) as pool``.
    SIGTERM and SIGINT make ``run()`` drain: finish what workers hold,
    commit, stop.

    ``on_outcome`` (for a layer above, such as ``logq.tasks``): called in
    the pool's process as ``on_outcome(messages, values, failures)`` for
    every batch a worker finished (``values``: the handler's return values,
    one per message; ``failures``: offset -> error text) and as
    ``on_outcome([m], None, {m.offset: why})`` for a message whose worker
    died or timed out.  It returns ``(acks, write, nacks)``: the messages
    to ack, a ``write(txn)`` run in the transaction that commits those acks
    (or None), and ``(message, error, write)`` to nack, each write run in
    the transaction that commits its nack (Consumer.ack/nack ``write=``);
    ``(message, error, write, True)`` sends it to the dead letters at once
    (Consumer.nack ``bury=``: the layer above decided it is out of retries).
    Not with ``batch=True``.

    ``gate`` (for a layer above with flow control, such as ``logq.tasks``'
    limits): dispatch takes messages through ``gate.take(consumer, n,
    timeout, payloads, ready)`` (``Consumer.take``'s contract: a Batch or
    None; ``ready``: the batch goes to a worker with nothing out, where it
    starts at once), which may hold some back; the pool waits for its workers at most
    ``gate.nap(seconds)``, is not idle while ``gate.holding()``, and calls
    ``gate.close(consumer)`` before it closes its consumer (the gate gives
    back what it holds)."""

    _thread_name = "logq-pool"

    def __init__(self, path: str | os.PathLike[str], handler: Any, group: str = "default", *,
                 queue_options: dict[str, Any] | None = None,
                 on_stats: Callable[[PoolStats], None] | None = None,
                 on_outcome: Callable[..., Any] | None = None, gate: Any = None,
                 **options: Any) -> None:
        group_keys = {f.name for f in fields(GroupOptions)} - {"commit_every", "commit_interval", "prefetch"}
        self.group_options = {k: options.pop(k) for k in list(options) if k in group_keys}
        self.options = PoolOptions(**options)
        if on_outcome is not None and self.options.batch:
            raise ValueError("on_outcome works per message: not with batch=True")
        self.on_outcome = on_outcome
        self.gate = gate
        self.path = os.fspath(path)
        self.group = group
        resolve_handler(handler)          # fail now, not in every worker
        if not isinstance(handler, str):
            try:
                pickle.dumps(handler)
            except Exception as e:
                raise ValueError(f"the handler must be importable by the worker processes (a "
                                 f"module-level function, or 'module:function'): {e}") from None
        self.handler = handler
        self.queue_options = dict(queue_options or {})
        self.on_stats = on_stats
        method = self.options.start_method or (
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
        self._ctx = multiprocessing.get_context(method)
        self._stats = PoolStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drain = True
        self._drain_timeout: float | None = None
        self._start_failures = 0
        self._per_message = 0.0         # smoothed seconds of handler time per message
        self._batch_bytes = 1 << 30     # bytes of the last batch sent (pipelining waits for one)
        self._target = self.options.workers
        self._latencies: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self.breaker = CircuitBreaker(threshold=self.options.breaker_threshold,
                                      window=self.options.breaker_window,
                                      min_calls=self.options.breaker_min_calls,
                                      cooldown=self.options.breaker_cooldown,
                                      probes=self.options.breaker_probes)

    # -- lifecycle --------------------------------------------------------------
    def run(self, until_idle: bool = False) -> PoolStats:
        """Process messages until ``stop()``, SIGTERM or SIGINT (or, with
        ``until_idle``, until nothing is in flight and nothing is
        deliverable); then drain and commit.  Returns the final stats."""
        return self._run(until_idle)

    def _serve(self, until_idle: bool) -> None:
        self._loop(until_idle)

    def _request_stop(self) -> None:
        self._stop.set()

    def stop(self, drain: bool = True, timeout: float | None = None) -> PoolStats:
        """Stop dispatching; with ``drain``, let workers finish what they
        hold (up to ``timeout`` seconds), else kill them and give their work
        back; commit; stop the workers.  Returns the final stats."""
        self._drain = drain
        self._drain_timeout = timeout
        self._request_stop()
        return self._join()

    def __repr__(self) -> str:
        return f"<logq.WorkerPool {self.path!r} group={self.group!r}>"

    def stats(self) -> PoolStats:
        with self._lock:
            s = PoolStats(**self._stats.as_dict())
            s.busy_seconds = dict(self._stats.busy_seconds)
            s.breaker = self.breaker.state
            s.breaker_opened = self.breaker.opened
            lat = sorted(self._latencies)
        if lat:
            s.latency_p50 = lat[len(lat) // 2]
            s.latency_p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return s

    # -- the loop ---------------------------------------------------------------
    def _new_worker(self) -> _Worker:
        # (A worker only reads: it opens the queue without ``exclusive``,
        # which is the pool's.)
        opts = {k: v for k, v in self.queue_options.items() if k != "exclusive"}
        return _Worker(self._ctx, self.handler, self.options.batch, self.on_outcome is not None,
                       self.path, opts)

    def _take(self, c: Consumer, n: int, timeout: float, ready: bool = True) -> Batch | None:
        """A batch of up to ``n`` messages, or None.  Without the payloads
        (the workers read them) unless ``on_outcome`` needs them here."""
        if self.gate is not None:
            return self.gate.take(c, n, timeout, self.on_outcome is not None, ready)
        b = c._take(n, timeout, self.on_outcome is not None)
        return b if len(b) else None

    def _loop(self, until_idle: bool) -> None:
        o = self.options
        q = Queue(self.path, **self.queue_options)
        c = Consumer(q, self.group, commit_every=1 << 30, commit_interval=1e6, prefetch=1,
                     **self.group_options)
        workers: list[_Worker] = []
        waiting: deque[Batch] = deque()
        self._batch_ids = 0
        self._uncommitted: list[int] = []       # put timestamps (ns) of acks not yet committed
        self._last_commit = time.monotonic()
        last_scale = time.monotonic()
        processed_at_scale = 0
        pressure = 0
        breaker_seen = ("closed", 0)        # (state, times opened) last logged
        try:
            for _ in range(self._target):
                workers.append(self._new_worker())
            while True:
                now = time.monotonic()
                stopping = self._stop.is_set()
                self._reap_workers(c, workers, now)
                self._collect(c, workers, 0.0)
                if stopping:
                    break
                # dispatch to workers with room, as the breaker allows
                depth = _DEPTH if self._batch_bytes <= _PIPE_ROOM else 1
                idle = [w for w in workers if len(w.out) < depth]
                if self.gate is not None:
                    # Emptiest first: a task let through a limit goes where it
                    # starts now, not behind another worker's batch.
                    idle.sort(key=lambda w: len(w.out))
                state = self.breaker.current(now)
                if (state, self.breaker.opened) != breaker_seen:
                    self._log_breaker(breaker_seen[0], state)
                    breaker_seen = (state, self.breaker.opened)
                if state == "open":
                    while waiting:
                        c.give_back(waiting.popleft())      # they wait in the queue, not here
                elif idle:
                    size = self._batch_size()
                    for w in idle:
                        if state != "closed" and not self.breaker.allow(now):
                            break
                        if waiting and (state == "closed" or len(waiting[0]) == 1):
                            b: Batch | None = waiting.popleft()
                        else:
                            # (half-open: one probe)
                            b = self._take(c, size if state == "closed" else 1, 0, not w.out)
                        if b is None:
                            break
                        self._send(w, b)
                self._maybe_commit(c, force=False)
                busy = [w for w in workers if w.out]
                with self._lock:
                    self._stats.in_flight = sum(len(b[1]) for w in busy for b in w.out)
                    self._stats.waiting = sum(map(len, waiting))
                    self._stats.workers = len(workers)
                # autoscaling
                if now - last_scale >= o.scale_interval:
                    done = self._stats.processed - processed_at_scale
                    with self._lock:
                        self._stats.throughput = done / (now - last_scale)
                    processed_at_scale = self._stats.processed
                    last_scale = now
                    pressure = self._scale(c, workers, waiting, pressure, now)
                    st = self.stats()
                    # For `logq metrics` and `logq stat` in other processes.
                    _status.publish(self.path, "pool", self.group,
                                    dict(st.as_dict(), min_workers=o.min_workers, max_workers=o.max_workers))
                    if self.on_stats is not None:
                        self.on_stats(st)
                if not busy and not waiting:
                    if state == "open":
                        self._stop.wait(0.05)           # the cooldown runs
                        continue
                    if until_idle and self._idle(c):
                        break
                    # nothing out: sleep in get_many (a put wakes it)
                    got = self._take(c, self._batch_size() if state == "closed" else 1, self._nap(0.2))
                    if got is not None:
                        waiting.append(got)
                elif busy:
                    starved = any(not w.out for w in workers) and not waiting
                    wait = self._nap(0.05 if starved else 0.2)
                    if self.gate is not None and starved:
                        wait = self.gate.nap(wait)      # a held task may start sooner
                    self._collect(c, workers, wait)
            self._shutdown(c, workers, waiting)
        finally:
            _status.withdraw(self.path, "pool", self.group)
            for w in workers:
                w.kill()
            if self.gate is not None:
                try:
                    self.gate.close(c)
                except Exception:
                    log.exception("logq pool %s: closing its gate failed", self.path)
            c.close()
            q.close()

    def _log_breaker(self, before: str, after: str) -> None:
        """Log a change of the circuit breaker (seen once per loop turn)."""
        b = self.breaker
        if after == "open":
            log.warning("logq pool %s group %r: circuit breaker %s (failure rate at or above %g of "
                        "at least %d outcomes in %gs): dispatch paused for %gs, claimed messages "
                        "go back to the queue", self.path, self.group,
                        "opened again (a probe failed)" if before != "closed" else "opened",
                        b.threshold, b.min_calls, b.window, b.cooldown)
        elif after == "half_open":
            log.info("logq pool %s group %r: circuit breaker half-open: sending %d probe(s)",
                     self.path, self.group, b.probes)
        else:
            log.info("logq pool %s group %r: circuit breaker closed: dispatch resumes",
                     self.path, self.group)

    def _batch_size(self) -> int:
        """The option, or enough messages for about _BATCH_SECONDS of work."""
        if self.options.batch_size is not None:
            return self.options.batch_size
        if not self._per_message:
            return 100
        return max(1, min(_BATCH_MAX, int(_BATCH_SECONDS / self._per_message)))

    def _send(self, w: _Worker, b: Batch) -> None:
        self._batch_ids += 1
        if not w.out:
            w.since = time.monotonic()
        w.out.append((self._batch_ids, b))
        # Attempts, keys and priorities only when some message has them
        # (a fresh run shares one lease: attempt 1, no key, priority 0).
        extra = None if b.plain() else (b.attempts.tolist(), b.keys, b.priorities.tolist())
        runs = b.runs
        self._batch_bytes = 24 * len(runs) + (0 if extra is None else 48 * len(b))
        try:
            w.conn.send((self._batch_ids, runs, extra))
        except (BrokenPipeError, OSError):
            pass        # it died: _reap_workers settles the batch

    def _collect(self, c: Consumer, workers: list[_Worker], timeout: float) -> None:
        """Settle the batches that workers finished (waiting up to ``timeout``)."""
        busy = {w.conn: w for w in workers if w.out}
        if not busy:
            return
        for conn in wait_for(list(busy), timeout):
            w = busy[conn]
            try:
                got: tuple[int, list[tuple[int, str]], list[Any] | None, float] = \
                    conn.recv()  # type: ignore[call-arg, union-attr, assignment]
            except (EOFError, OSError):
                continue    # it died: _reap_workers
            batch_id, failures, values, spent = got
            sent_id, b = w.out.popleft()
            assert sent_id == batch_id, (sent_id, batch_id)
            w.batches_done += 1
            now = time.monotonic()
            took = now - w.since
            w.busy += took
            # (per message as the worker spent it: the round trip would
            # count the pipe and the wait behind the batch before it, and
            # after a trickle of single messages keep batches small)
            each = spent / len(b)
            self._per_message = each if not self._per_message else 0.8 * self._per_message + 0.2 * each
            w.since = now
            w.idle_since = now
            with self._lock:
                self._stats.busy_seconds[w.proc.pid or 0] = w.busy
            self._settle_batch(c, b, dict(failures), now, values)

    def _settle_batch(self, c: Consumer, b: Batch, failures: dict[int, str], now: float,
                      values: list[Any] | None) -> None:
        """Ack a batch a worker finished as runs, but for its failures:
        nacked one by one."""
        if self.on_outcome is not None:
            # (the batch's messages as views of it: what the layer above
            # acks whole is acked as the batch's runs, by ack_many)
            self._settle(c, c._g.views(b), failures, now, values)
            return
        if not failures:
            c.ack(b)
            self._uncommitted += b._ts
            ok = len(b)
        else:
            offsets = b.offsets
            good = [i for i, o in enumerate(offsets) if o not in failures]
            bad = [i for i, o in enumerate(offsets) if o in failures]
            c.ack(b, good)
            self._uncommitted += [b.timestamp_ns(i) for i in good]
            ok = len(good)
            for m in c._g.detach(b, bad):
                self._failed(c, m, failures[m.offset])
        self.breaker.record_many(ok, len(b) - ok, now)
        with self._lock:
            self._stats.processed += ok

    def _settle(self, c: Consumer, msgs: list[Message], failures: dict[int, str], now: float,
                values: list[Any] | None = None) -> None:
        if self.on_outcome is not None:
            # The layer above decides each message's ack or nack, and what
            # is written with it.
            ok, write, bad = self.on_outcome(msgs, values, failures)
            c.ack_many(ok, write=write)
            self._uncommitted += map(_TS, ok)
            self.breaker.record_many(len(ok), len(bad), now)
            with self._lock:
                self._stats.processed += len(ok)
            for m, error, w, *bury in bad:
                self._failed(c, m, error, w, bool(bury and bury[0]))
            return
        ok = [m for m in msgs if m.offset not in failures] if failures else msgs
        c.ack_many(ok)
        self._uncommitted += map(_TS, ok)
        self.breaker.record_many(len(ok), len(msgs) - len(ok), now)
        with self._lock:
            self._stats.processed += len(ok)
        for m in msgs:
            if m.offset in failures:
                self._failed(c, m, failures[m.offset])

    def _failed(self, c: Consumer, m: Message, error: str, write: Any = None,
                bury: bool = False) -> None:
        dead = bury or m.attempt >= c.options.max_attempts
        c.nack(m, error=error[-4000:], write=write, bury=bury)
        with self._lock:
            self._stats.failed += 1
            if dead:
                self._stats.dead_lettered += 1
            else:
                self._stats.retried += 1

    def _reap_workers(self, c: Consumer, workers: list[_Worker], now: float) -> None:
        """Replace workers that died or overran the timeout; settle their work."""
        o = self.options
        for w in list(workers):
            timed_out = False
            if w.out and o.timeout is not None and w.progress[1]:
                timed_out = time.monotonic_ns() - w.progress[1] > o.timeout * 1e9
            if w.proc.is_alive() and not timed_out:
                continue
            if timed_out:
                w.proc.kill()
            w.proc.join()
            code, pid = w.proc.exitcode, w.proc.pid
            running = w.progress[0] if w.progress[1] else None
            # (A death is rare: its batches become Messages of their own.)
            batch = [m for _id, b in w.out for m in c._g.detach(b, None)]
            started = [m for m in batch if m.offset == running]
            rest = [m for m in batch if m.offset != running]
            w.close()
            workers.remove(w)
            with self._lock:
                self._stats.worker_deaths += 1
                self._stats.timeouts += timed_out
            what = (f"timed out after {o.timeout}s (worker killed)" if timed_out
                    else f"worker process died (exit code {code})")
            log.warning("logq pool %s group %r: worker %s %s %s; %d other message(s) of its "
                        "batches given back", self.path, self.group, pid,
                        f"timed out after {o.timeout}s and was killed" if timed_out
                        else f"died (exit code {code})",
                        "between messages" if running is None else f"while handling offset {running}",
                        len(rest))
            if w.batches_done == 0 and not batch:
                self._start_failures += 1
                if self._start_failures >= _START_FAILURES:
                    raise LogqError(f"logq pool {self.path}: {self._start_failures} workers in a row "
                                    f"died before doing any work (last exit code {code}); see their "
                                    "output (is the handler importable in a fresh process?)")
            else:
                self._start_failures = 0
            if rest:
                c.give_back(rest)       # not started, or done and unreported: not counted
            if started and self.on_outcome is not None:
                self._settle(c, started, {m.offset: what for m in started}, now)
                started = []
            for m in started:
                self.breaker.record(False, now)
                self._failed(c, m, what)
            if not self._stop.is_set() and len(workers) < max(self._target, o.min_workers):  # type: ignore[operator, type-var]
                workers.append(self._new_worker())

    def _nap(self, most: float) -> float:
        """How long the loop may block: ``most``, but no later than the
        commit that acks waiting to be committed are due (a result waits
        for it: `result()` of the tasks layer)."""
        if not self._uncommitted:
            return most
        return min(most, max(0.0, self._last_commit + self.options.commit_interval - time.monotonic()))

    def _maybe_commit(self, c: Consumer, force: bool) -> None:
        o = self.options
        since = time.monotonic() - self._last_commit
        # Acks and nacks are committed commit_interval after the last
        # commit; the group's delivery counters alone only every
        # _COUNTERS_EVERY (a commit of nothing else after each take would
        # cost every task a second fsync, and reset the clock that its ack
        # then waits on).
        if force or len(self._uncommitted) >= o.commit_every or \
                (since >= o.commit_interval and (self._uncommitted or c._g.ledger.pending())) or \
                since >= max(o.commit_interval, _COUNTERS_EVERY):
            c.commit()
            now = time.time_ns()
            # Only what the deque keeps: a commit of many acks would compute most in vain.
            self._latencies.extend([(now - t) / 1e9 for t in self._uncommitted[-_LATENCY_SAMPLES:]])
            self._uncommitted = []
            self._last_commit = time.monotonic()
            with self._lock:
                self._stats.commits += 1

    def _idle(self, c: Consumer) -> bool:
        """Nothing deliverable now, and no retry due within _IDLE_GRACE
        (a nack's retry is seen at once; the commit makes it durable)."""
        if self.gate is not None and self.gate.holding():
            return False        # held for a limit: work to do
        self._maybe_commit(c, force=True)
        due = c._g.next_due()
        return due is None or due > time.time_ns() + _IDLE_GRACE * 1e9

    def _scale(self, c: Consumer, workers: list[_Worker], waiting: deque[Batch], pressure: int,
               now: float) -> int:
        """Grow by one when every worker was busy and work was waiting for
        two looks in a row; shrink by one when a worker has been idle for
        idle_timeout (never below min_workers)."""
        o = self.options
        all_busy = bool(workers) and all(w.out for w in workers)
        if all_busy and not waiting and len(workers) < o.max_workers:  # type: ignore[operator]
            # Is there more to do than the workers hold?  (Dispatch claims
            # only what fits, so nothing waits here while all are busy.)
            got = self._take(c, 1, 0, False)
            if got is not None:
                waiting.append(got)
        pressure = pressure + 1 if all_busy and waiting else 0
        if pressure >= 2 and len(workers) < o.max_workers:  # type: ignore[operator]
            workers.append(self._new_worker())
            self._target = len(workers)
            log.info("logq pool %s: backlog: %d workers now", self.path, len(workers))
            return 0
        if len(workers) > o.min_workers:  # type: ignore[operator]
            for w in workers:
                if not w.out and now - w.idle_since >= o.idle_timeout:
                    workers.remove(w)
                    w.stop(1.0)
                    self._target = len(workers)
                    log.info("logq pool %s: idle: %d workers now", self.path, len(workers))
                    break
        return pressure

    def _shutdown(self, c: Consumer, workers: list[_Worker], waiting: deque[Batch]) -> None:
        """Stop: give back what was never sent, drain (or kill) the workers,
        commit."""
        while waiting:
            c.give_back(waiting.popleft())
        deadline = None if self._drain_timeout is None else time.monotonic() + self._drain_timeout
        while self._drain and any(w.out for w in workers):
            if deadline is not None and time.monotonic() >= deadline:
                break
            self._reap_workers(c, workers, time.monotonic())
            self._collect(c, workers, 0.1)
        for w in list(workers):
            if w.out:
                w.kill()
                for _id, b in w.out:
                    c.give_back(b)
            else:
                w.stop(2.0)
            workers.remove(w)
        self._maybe_commit(c, force=True)

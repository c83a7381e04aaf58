"""The worker side of the pool (``_pool``): what runs in a worker process,
and the parent's handle on one.

A worker opens the queue read-only, receives batches as runs of offsets,
reads their payloads from the log's shared mapping, runs the handler and
sends back the failures (and the return values, for a layer above).  It
writes nothing to the queue: everything durable is the parent's.  It dies
with the parent (PR_SET_PDEATHSIG, and a pipe the parent holds open).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from itertools import repeat
from multiprocessing.connection import Connection
from typing import Any, Callable

from logq._batch import Batch
from logq._consumer import Message
from logq._errors import OffsetError
from logq._leases import Lease
from logq._queue import Queue


def resolve_handler(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """A handler given as a callable, or as ``"module:function"``."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"a handler is a callable or 'module:function', not {spec!r}")
    mod, _, name = spec.partition(":")
    obj: Any = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    return obj


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)      # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - best effort; the pipe still tells
        pass


def _watch_pool(alive: Connection) -> None:
    """Exit the worker when the pool's end of ``alive`` closes (the pool
    died), even while the handler hangs.  (Under forkserver the worker's
    parent is the fork server, which need not notice the pool's death.)"""
    try:
        alive.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(3)


def _read_runs(q: Queue, runs: list[tuple[int, int]]) -> tuple[list[int], list[Any], list[int], list[int]]:
    """The records of ``runs`` (first offset, count) from the log: their
    offsets, payloads and timestamps, and the offsets no longer there
    (dropped by max_bytes, or lost to damage, since they were claimed)."""
    offsets: list[int] = []
    datas: list[Any] = []
    stamps: list[int] = []
    gone: list[int] = []
    for start, count in runs:
        off, end = start, start + count
        while off < end:
            try:
                at, payloads, ts, _attrs, _metas = q._fetch(off, end - off)
            except OffsetError:
                at, payloads, ts = end, [], []
            if not ts:
                gone += range(off, end)
                break
            if at > off:
                gone += range(off, min(at, end))
                if at >= end:
                    break
            take = min(len(ts), end - at)
            offsets += range(at, at + take)
            datas += payloads[:take]  # type: ignore[index]
            stamps += ts[:take]
            off = at + take
    return offsets, datas, stamps, gone


def _worker_main(spec: Any, conn: Connection, progress: Any, batch: bool, alive: Connection,
                 returns: bool, path: str, queue_options: dict[str, Any]) -> None:
    """A worker: open the queue at ``path`` (to read only); receive (batch
    id, runs of offsets as (first, count), None or (attempts, keys,
    priorities) per message), read the payloads from the log, run the
    handler, send back (batch id, failures as (offset, error text), with
    ``returns`` the handler's return values (one per message, None for a
    failure) else None, and the seconds the worker spent on the batch,
    from its arrival to the reply: the parent sizes batches by it, without
    the pipe's latency or the time the batch waited).  ``progress`` holds
    the offset being handled and since when (monotonic ns; 0 when idle)."""
    # (Under forkserver the parent is the fork server, which exits with the
    # pool; a pool that died before this line shows as EOF on the pipe.)
    _die_with_parent()
    threading.Thread(target=_watch_pool, args=(alive,), daemon=True, name="logq-watch").start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the parent drains on ^C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    handler = resolve_handler(spec)
    q = Queue(path, **queue_options)
    while True:
        try:
            work = conn.recv()
        except (EOFError, OSError):
            return
        if work is None:
            q.close()
            return
        arrived = time.monotonic()
        batch_id, runs, extra = work
        offsets, payloads, stamps, gone = _read_runs(q, runs)
        if extra is None:
            lease = Lease(1, 0, -1)
            msgs = list(map(Message, offsets, payloads, stamps, repeat(lease)))
        else:
            attempts, keys, prios = extra
            if gone:
                keep = set(offsets)
                every = [o for start, count in runs for o in range(start, start + count)]
                attempts, keys, prios = ([x for o, x in zip(every, xs) if o in keep]
                                         for xs in (attempts, keys, prios))
            msgs = [Message(o, d, t, Lease(a, 0, -1, key=k, priority=p))
                    for o, d, t, a, k, p in zip(offsets, payloads, stamps, attempts, keys, prios)]
        failures: list[tuple[int, str]] = [(o, "the record is no longer in the log") for o in gone]
        if not msgs:
            try:
                conn.send((batch_id, failures, [None] * len(gone) if returns else None,
                           time.monotonic() - arrived))
            except (BrokenPipeError, OSError):
                return
            continue
        values: list[Any] = []
        if batch:
            progress[0], progress[1] = offsets[0], time.monotonic_ns()
            try:
                handler(msgs)
            except Exception:
                err = traceback.format_exc()
                failures = [(o, err) for o in offsets]
        else:
            for m in msgs:
                progress[0], progress[1] = m.offset, time.monotonic_ns()
                try:
                    value = handler(m)
                except Exception:
                    value = None
                    failures.append((m.offset, traceback.format_exc()))
                if returns:
                    values.append(value)
        progress[1] = 0
        try:
            conn.send((batch_id, failures, values if returns else None, time.monotonic() - arrived))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, spec: Any, batch: bool, returns: bool, path: str,
                 queue_options: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        watch, self.alive = ctx.Pipe(duplex=False)   # the pool holds the write end until it dies
        self.progress = ctx.RawArray("q", 2)
        self.proc = ctx.Process(target=_worker_main, args=(spec, child, self.progress, batch, watch, returns,
                                                           path, queue_options),
                                daemon=True, name="logq-worker")
        self.proc.start()
        child.close()
        watch.close()
        # Batches sent and not yet reported, oldest first: a second one
        # waits in the pipe while the first runs, so a worker never idles
        # for a round trip.
        self.out: deque[tuple[int, Batch]] = deque()
        self.busy = 0.0
        self.batches_done = 0
        self.since = 0.0              # when its current batch was sent (monotonic)
        self.idle_since = time.monotonic()

    def stop(self, grace: float) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.close()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.close()

    def close(self) -> None:
        self.conn.close()
        self.alive.close()
        self.proc.close()

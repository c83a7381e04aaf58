"""Module-level handlers for test_pool.py.  Worker processes are started
with forkserver or spawn and import their handler by name, so the handlers
live in a module of their own, importable in a fresh interpreter (this
directory is on sys.path: conftest.py puts it there, and the workers get
the parent's sys.path).

``noop`` and ``sleep_10ms`` are logq.WorkerPool handlers (they get a
logq.Message; returning normally acks it).  ``noop_result`` and
``sleep_10ms_result`` do the same work for the baseline,
multiprocessing.Pool, whose tasks are (id, payload) pairs: they return the
id, so that the parent can count what its workers handled.
"""

from __future__ import annotations

import time
from typing import Any

SLEEP = 0.010      # seconds per message of the sleeping handlers


def noop(message: Any) -> None:
    """Do nothing: what is left is the pool's own cost per message."""


def sleep_10ms(message: Any) -> None:
    """Sleep 10 ms: a handler waiting on I/O, which only more workers speed up."""
    time.sleep(SLEEP)


def noop_result(task: tuple[int, bytes]) -> int:
    """The baseline's no-op: return the task's id."""
    return task[0]


def sleep_10ms_result(task: tuple[int, bytes]) -> int:
    """The baseline's sleeping handler: sleep 10 ms, return the task's id."""
    time.sleep(SLEEP)
    return task[0]


def mpq_produce(q: Any, payloads: list[bytes], n: int, chunk: int) -> None:
    """The multiprocessing.Queue peer's producer (its own process): put
    (id, payload) pairs for ids 0..n-1, ``chunk`` of them per put (a list),
    then None."""
    for start in range(0, n, chunk):
        q.put([(i, payloads[i % len(payloads)]) for i in range(start, min(n, start + chunk))])
    q.put(None)

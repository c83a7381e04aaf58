"""Module-level handlers for test_pool.py: the pool's workers (started with
forkserver or spawn) import them by name, so they live in a module of their
own, importable in a fresh interpreter (bench_helpers.child_env() and
test_pool.py put this directory on the path)."""

from __future__ import annotations

import time
from typing import Any

SLEEP = 0.010      # seconds per message of the sleeping handler


def noop(message: Any) -> None:
    """Do nothing: what is left is the pool's own cost per message."""


def sleep_10ms(message: Any) -> None:
    """Sleep 10 ms: a handler waiting on I/O, which only more workers speed up."""
    time.sleep(SLEEP)


def noop_result(item: Any) -> int:
    """The baseline's no-op (multiprocessing.Pool): returns 1 so that the
    parent can count what its workers handled."""
    return 1


def sleep_10ms_result(item: Any) -> int:
    """The baseline's sleeping handler: returns 1, counted by the parent."""
    time.sleep(SLEEP)
    return 1

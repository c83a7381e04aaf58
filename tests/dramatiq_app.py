"""The Dramatiq app of tests/test_dramatiq.py, on logq (LogqBroker and
LogqResultBackend), importable by real ``dramatiq dramatiq_app`` worker
processes.  Its root directory comes from LOGQ_DRAMATIQ_ROOT; the actors
the tests count append a line per run to ``<root>/runs/<token>``."""

from __future__ import annotations

import os
import time

import dramatiq
from dramatiq.results import Results

import helpers
from logq.dramatiq import LogqBroker, LogqResultBackend

ROOT = os.environ.get("LOGQ_DRAMATIQ_ROOT", "/nonexistent")
RUNS = os.path.join(ROOT, "runs")

broker = LogqBroker(ROOT)
backend = LogqResultBackend(ROOT)
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


def mark(token: str) -> int:
    """Record one run of ``token``; how many so far (this one included)."""
    return helpers.mark_run(RUNS, token)


def runs(token: str) -> list[tuple[int, float]]:
    return helpers.runs_of(RUNS, token)


@dramatiq.actor(store_results=True, max_retries=0)
def add(a, b):
    return a + b


@dramatiq.actor(store_results=True, max_retries=0)
def stamp(token):
    mark(token)
    return time.time()


@dramatiq.actor(max_retries=1, min_backoff=100, max_backoff=200)
def doomed(token):
    """Fails every time: retried once by Dramatiq, then rejected (nack)."""
    mark(token)
    raise RuntimeError(f"doomed {token}")


@dramatiq.actor(store_results=True, max_retries=0, queue_name="killq", time_limit=120_000)
def slow(token, seconds):
    """Sleeps ``seconds`` on its first run only; returns its run count."""
    n = mark(token)
    if n == 1:
        time.sleep(seconds)
    return n


@dramatiq.actor(store_results=True, max_retries=0, queue_name="warmq")
def nap(token, seconds):
    mark(token)
    time.sleep(seconds)
    return seconds

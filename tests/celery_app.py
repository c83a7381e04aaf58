"""The Celery app of tests/test_celery.py, on logq (broker and result
backend), importable by real ``celery -A celery_app worker`` processes.
Its root directory comes from LOGQ_CELERY_ROOT; each task that the tests
count appends a line to ``<root>/runs/<token>`` (O_APPEND: one write per
run, whole, from any process), so a test can see how many times it ran."""

from __future__ import annotations

import os
import time

import helpers
import logq.celery  # noqa: F401  (registers the logq:// transport with kombu)
from celery import Celery

ROOT = os.environ.get("LOGQ_CELERY_ROOT", "/nonexistent")
RUNS = os.path.join(ROOT, "runs")

app = Celery("celery_app", broker=f"logq://{ROOT}", backend=f"logq://{ROOT}")
app.conf.update(
    task_acks_late=True,               # a task is acked when it finished: a killed one runs again
    task_reject_on_worker_lost=True,   # a pool child killed alone: the task is given back, not failed
    worker_lost_wait=0.5,              # (how long Celery waits for a dead child's result: 10 s by default)
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    # Short, so that an ETA task held by the worker past it would be
    # delivered twice -- unless the transport stores it as a delayed message.
    # (The kill test's workers lease for an hour: only the death of the
    # worker's process can explain a prompt redelivery there.)
    broker_transport_options={"visibility_timeout": float(os.environ.get("LOGQ_CELERY_VT", "2"))},
)


def mark(token: str) -> int:
    """Record one run of ``token``; how many so far (this one included)."""
    return helpers.mark_run(RUNS, token)


def runs(token: str) -> list[tuple[int, float]]:
    return helpers.runs_of(RUNS, token)


@app.task
def add(a, b):
    return a + b


@app.task
def total(xs):
    return sum(xs)


@app.task
def stamp(token):
    mark(token)
    return time.time()


@app.task(bind=True, max_retries=5)
def flaky(self, token, failures):
    """Fails ``failures`` times (retrying after 0.2 s), then returns its run count."""
    n = mark(token)
    if n <= failures:
        raise self.retry(countdown=0.2, exc=RuntimeError(f"failure {n}"))
    return n


@app.task
def slow(token, seconds):
    """Sleeps ``seconds`` on its first run only; returns its run count."""
    n = mark(token)
    if n == 1:
        time.sleep(seconds)
    return n

"""The app of the tasks tests (tests/test_tasks*.py), importable by the
pool's worker processes.  Its queue directory comes from LOGQ_TASK_APP_DIR,
set by the test before the pool starts (the forkserver is started then,
with that environment)."""

from __future__ import annotations

import os
import signal
import time

from logq.tasks import App, current

app = App(os.environ.get("LOGQ_TASK_APP_DIR", "/nonexistent"), cancel_grace=0.5)


@app.task(name="add")
def add(a, b):
    return a + b


@app.task(name="noop", retries=0)
def noop():
    return None


class Flaky(Exception):
    pass


@app.task(name="flaky", retries=2, retry_on=(Flaky,))
def flaky(ctl, fail_times):
    """Fails with Flaky ``fail_times`` times (counted in a file), then succeeds."""
    n = int(open(ctl).read()) if os.path.exists(ctl) else 0
    with open(ctl, "w") as f:
        f.write(str(n + 1))
    if n < fail_times:
        raise Flaky(f"flaky failure {n + 1}")
    return n + 1


@app.task(name="bad", retries=3, retry_on=(Flaky,))
def bad():
    raise ValueError("not retried")


@app.task(name="sleep", retries=0, timeout=1.0)
def sleep(seconds):
    time.sleep(seconds)
    return "woke"


@app.task(name="coop", retries=0)
def coop():
    while not current().cancelled:
        time.sleep(0.01)
    return "saw cancel"


@app.task(name="stubborn", retries=0)
def stubborn():
    while True:
        time.sleep(0.01)


@app.task(name="unserialisable")
def unserialisable():
    return object()


@app.task(name="big")
def big(n):
    return "x" * n


@app.task(name="slowok", retries=5)
def slowok(ms, marker):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(ms / 1000)
    return ms


# Retries for its own death and for each of the three pool kills of
# test_sigkill_of_worker_and_of_pool_loses_nothing that may catch it out
# (a delivery to a process that died counts as an attempt).
@app.task(name="die_once", retries=5)
def die_once(ctl):
    if not os.path.exists(ctl):
        open(ctl, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"

"""The app of tests/test_tasks_flow.py: tasks with flow-control limits,
importable by the pool's worker processes.  Each task appends one line
per run to a file the test names (``O_APPEND``: whole lines from any
number of processes), with its real start and end times."""

from __future__ import annotations

import os
import signal
import time

from logq.tasks import App

app = App(os.environ.get("LOGQ_TASK_APP_DIR", "/nonexistent"), cancel_grace=0.5)


def _log(path: str, *fields: object) -> None:
    with open(path, "a") as f:
        f.write(" ".join(map(str, fields)) + "\n")


@app.task(name="limited", concurrency=2, retries=2)
def limited(path, ms):
    t0 = time.time()
    time.sleep(ms / 1000)
    _log(path, t0, time.time(), os.getpid())


@app.task(name="rated", rate_limit="20/s", retries=0)
def rated(path):
    _log(path, time.time())


@app.task(name="serial", serialize_by="acct", retries=0)
def serial(acct, i, path, ms=20):
    t0 = time.time()
    time.sleep(ms / 1000)
    _log(path, acct, i, t0, time.time())


@app.task(name="free", retries=0)
def free(path):
    _log(path, time.time())


@app.task(name="one", concurrency=1, retries=2)
def one(ctl, path, ms):
    """Concurrency 1; SIGKILLs its own worker on its first run (``ctl``
    does not exist yet) while holding the only slot."""
    t0 = time.time()
    if not os.path.exists(ctl):
        open(ctl, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(ms / 1000)
    _log(path, t0, time.time(), os.getpid())
    return "ok"

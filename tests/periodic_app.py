"""The app of tests/test_tasks_periodic.py: periodic tasks on short
periods, importable by the pool's worker processes (and by the child
processes that run competing schedulers).  Each run appends its slot to
``LOGQ_PERIODIC_OUT`` (whole lines, ``O_APPEND``)."""

from __future__ import annotations

import os
from datetime import timedelta

from logq.tasks import App

app = App(os.environ.get("LOGQ_TASK_APP_DIR", "/nonexistent"))


def _log(name: str, slot: float) -> None:
    out = os.environ.get("LOGQ_PERIODIC_OUT")
    if out:
        with open(out, "a") as f:
            f.write(f"{name} {slot!r} {os.getpid()}\n")


@app.periodic(every=timedelta(seconds=0.2), catch_up="all", name="tick", retries=0)
def tick(slot):
    _log("tick", slot)


# The catch-up modes, driven by Scheduler.tick(now) in the test (one-second
# slots; grace 0.1 s, so that a slot seen 0.5 s late counts as missed).
@app.periodic(every=timedelta(seconds=1), catch_up="all", name="c_all", grace=timedelta(seconds=0.1))
def c_all(slot):
    _log("c_all", slot)


@app.periodic(every=timedelta(seconds=1), catch_up="latest", name="c_latest",
              grace=timedelta(seconds=0.1))
def c_latest(slot):
    _log("c_latest", slot)


@app.periodic(every=timedelta(seconds=1), catch_up="none", name="c_none", grace=timedelta(seconds=0.1))
def c_none():
    _log("c_none", 0.0)

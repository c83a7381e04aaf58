"""The app of the workflows tests (tests/test_workflows*.py), importable by
the pool's worker processes; it holds no tests.  Its queue directory is
set by each test (``app.path``; the pool passes it to its workers); tasks
that leave a trace append "task-id attempt pid tag" lines to the file
``<queue directory>.trace`` (the workers' app.path is the pool's)."""

from __future__ import annotations

import os
import time

from logq.tasks import App, current
from logq.workflows import StepFailed, workflow

app = App(os.environ.get("LOGQ_WF_APP_DIR", "/nonexistent"), cancel_grace=0.5)


def trace(tag: str) -> None:
    ctx = current()
    with open(app.path + ".trace", "a") as f:
        f.write(f"{ctx.id if ctx else '-'} {ctx.attempt if ctx else 0} {os.getpid()} {tag}\n")


@app.task(name="add", retries=20)
def add(a, b):
    trace(f"add {a} {b}")
    return a + b


@app.task(name="double", retries=20)
def double(x):
    trace(f"double {x}")
    return 2 * x


@app.task(name="total", retries=20)
def total(results, extra=0):
    trace(f"total {len(results)}")
    return sum(r for r in results if r is not None) + extra


@app.task(name="collect", retries=20)
def collect(results):
    trace(f"collect {len(results)}")
    return results


@app.task(name="noop", retries=20)
def noop(*args):
    return None


@app.task(name="boom", retries=0)
def boom(*args):
    trace("boom")
    raise ValueError("boom")


@app.task(name="on_error", retries=20)
def on_error(failed_id):
    trace(f"on_error {failed_id}")
    return failed_id


@app.task(name="nap", retries=20)
def nap(seconds, value=None):
    time.sleep(seconds)
    trace(f"nap {seconds}")
    return value


@app.task(name="echo", retries=20)
def echo(*args):
    trace(f"echo {list(args)}")
    return list(args)


# -- durable workflows -------------------------------------------------------------
def effect(wid: str, tag: str) -> str:
    """A step's side effect: one line "wid tag pid" in <queue>.effects."""
    with open(app.path + ".effects", "a") as f:
        f.write(f"{wid} {tag} {os.getpid()}\n")
    return tag


def slow_effect(wid: str, tag: str, seconds: float) -> str:
    time.sleep(seconds)
    return effect(wid, tag)


@workflow(app, name="three")
def three(ctx, seconds):
    out = [ctx.step(slow_effect, ctx.id, f"s{k}", seconds) for k in range(3)]
    return out


@workflow(app, name="three_run", checkpoint="run")
def three_run(ctx, seconds):
    """``three`` with its steps checkpointed per run (the lease table)."""
    out = [ctx.step(slow_effect, ctx.id, f"s{k}", seconds) for k in range(3)]
    ctx.sleep(0.05)     # a park: the run's settlement makes its steps durable
    return out + [ctx.step(slow_effect, ctx.id, "s3", seconds)]


@workflow(app, name="onboard")
def onboard(ctx, user):
    acct = ctx.step(effect, ctx.id, f"account-{user}")
    ctx.sleep(0.3)
    ok = ctx.wait_event("confirmed", timeout=10)
    ctx.step(effect, ctx.id, f"welcome-{ok}")
    return [acct, ok]


@workflow(app, name="waiter")
def waiter(ctx, timeout):
    a = ctx.wait_event("go", timeout=timeout)
    b = ctx.wait_event("go", timeout=timeout)
    return [a, b]


@workflow(app, name="fickle")
def fickle(ctx, flag_path):
    """Reaches a different step on replay once flag_path exists."""
    if os.path.exists(flag_path):
        ctx.step(effect, ctx.id, "other", name="other")
    else:
        ctx.step(effect, ctx.id, "first", name="first")
    ctx.sleep(0.3)
    return "done"


@workflow(app, name="failing")
def failing(ctx):
    try:
        ctx.step(boom)
    except StepFailed as e:
        caught = e.type
    ctx.step(effect, ctx.id, "after")
    raise RuntimeError(f"gave up after {caught}")


@workflow(app, name="parent")
def parent(ctx, n):
    kids = [ctx.child(three, 0.0) for _ in range(n)]
    return len(kids)

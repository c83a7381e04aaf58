"""The ``tasks`` workload of ``logq bench``: no-op tasks of ``logq.tasks``
end to end, with their status and result stored, read beside the raw
``WorkerPool`` no-op rate of the same run (``grid`` adds a ``pool`` run
before every ``tasks`` one; ``bench.run`` makes it the tasks row's floor).

The pool (``App.pool``: the tasks' Runner and Settler, ``workers``
processes) runs in a thread of this process; one producer process warms
it, submits ``messages`` tasks (``delay``), then reads every result in
order (``result()``: the last returns once all are stored) and checks each.
The clock runs from the first submission to the last result.  CPU counts
this process (the pool) and its worker processes, not the producer.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from logq._bench_params import STALL_SECONDS, BenchError, Params
from logq._bench_procs import _cpu_seconds, _in_child, _proc_usage
from logq.tasks import App

app = App(os.environ.get("LOGQ_BENCH_TASKS_Q", "/nonexistent"))   # the path is set per run
WARM = 20


def _noop(i: int) -> int:
    """The task: returns its argument (so that each result can be checked)."""
    return i


noop: Any = app.task(_noop, name="logq.bench.noop", retries=0)


def _produce(qdir: str, queue_options: dict[str, Any], n: int, warm: int) -> dict[str, Any]:
    """In the producer process: warm the pool, submit ``n``, read them all."""
    app.close()
    app.path, app.queue_options = qdir, queue_options
    try:
        for i in range(warm):
            if noop.delay(-1 - i).result(timeout=STALL_SECONDS) != -1 - i:
                raise BenchError("a warm-up task's result is wrong")
        t0 = time.monotonic()       # (CLOCK_MONOTONIC: the same in every process)
        hs = [noop.delay(i) for i in range(n)]
        t_sub = time.monotonic()
        bad = sum(1 for i, h in enumerate(hs) if h.result(timeout=STALL_SECONDS) != i)
        return {"t0": t0, "t1": time.monotonic(), "submitted": t_sub, "bad": bad}
    finally:
        app.close()


def run(p: Params, qdir: str, ctx: Any, progress: Callable[[float], None]) -> dict[str, Any]:
    """One ``tasks`` run on the new queue ``qdir``; what ``run_one`` reads."""
    app.close()
    app.path, app.queue_options = qdir, p.queue_options()
    options: dict[str, Any] = {"workers": p.workers, "commit_every": p.commit_every}
    if p.commit_interval is not None:
        options["commit_interval"] = p.commit_interval
    pool = app.pool("logq._bench_tasks:app", **options)
    box: dict[str, Any] = {}

    def host() -> None:
        try:
            box["stats"] = pool.run()
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    thread = threading.Thread(target=host, name="logq-bench-tasks-pool", daemon=True)
    thread.start()
    try:
        before, c0 = _proc_usage(), _cpu_seconds()
        commits0 = pool.stats().commits
        out = _in_child(ctx, _produce, qdir, p.queue_options(), p.messages, WARM)
        c1, after = _cpu_seconds(), _proc_usage()
        st = pool.stats()
    finally:
        pool.stop()
        thread.join()
        app.close()
    if "error" in box:
        raise BenchError(f"the tasks pool failed: {box['error']!r}") from box["error"]
    progress(1.0)
    # (the producer has exited: what is left in /proc are the pool's workers)
    cpu = (c1 - c0) + sum(after[pid][0] - before.get(pid, (0.0, 0))[0] for pid in after)
    rss = max([after[pid][1] for pid in after] + [0])
    n = p.messages
    return {"t0": out["t0"], "t1": out["t1"], "put": n, "acked": n - out["bad"], "fsyncs": 0,
            "commits": st.commits - commits0, "cpu": cpu, "rss_children": rss, "lat": None,
            "pool_stats": st, "warm": WARM, "bad": out["bad"]}


def verify(qdir: str, out: dict[str, Any]) -> str:
    """The queue and the results against the run: "ok" or what differs."""
    import logq
    problems = []
    if out["bad"]:
        problems.append(f"{out['bad']} results wrong or missing")
    with logq.open(qdir) as q:
        st = q.stats()
    g = st["groups"].get("tasks", {})
    total = out["put"] + out["warm"]
    if st["next_offset"] != total or st["lost_records"]:
        problems.append(f"the queue's next offset is {st['next_offset']}, {total} tasks were submitted")
    if g.get("acked") != total or g.get("backlog"):
        problems.append(f"the tasks group says {g.get('acked')} acked, backlog {g.get('backlog')}; "
                        f"{total} were submitted")
    ps = out["pool_stats"]
    if ps.failed or ps.worker_deaths:
        problems.append(f"pool: {ps.failed} failed attempts, {ps.worker_deaths} worker deaths")
    return "; ".join(problems) or "ok"

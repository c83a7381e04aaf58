"""What flow control costs (logq.tasks._flow), end to end: the no-op task
of tasks_peers.py (result stored, ``logq worker`` with 2 workers, producer
in another process, every result checked), in three apps run one after
another in the same run:

* ``plain``: no task has a limit: the pool has no gate (the floor);
* ``gated``: another task of the app has ``concurrency=1``, so the pool
  takes every batch through the gate, but the no-op itself is unlimited
  (the cost of the gate on tasks it lets through: should be ~1 x);
* ``limited``: the no-op itself has ``concurrency=2`` (every task is held,
  decided in a lease-table transaction, dispatched one per batch: the price
  of a limit on a task this small, read as a fraction of the floor).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import tasks_peers as TP

APPS = {
    "plain": "@app.task\ndef noop(i):\n    return i\n",
    "gated": ("@app.task\ndef noop(i):\n    return i\n\n"
              "@app.task(concurrency=1)\ndef other():\n    return None\n"),
    "limited": "@app.task(concurrency=2)\ndef noop(i):\n    return i\n",
}
HEAD = "import os\nfrom logq.tasks import App\n\napp = App(os.environ['LOGQ_BENCH_TASKS_Q'])\n\n\n"


def run_app(body: str, n: int) -> float:
    """tasks/s of ``n`` no-op tasks end to end through the app ``body``."""
    d = tempfile.mkdtemp(prefix="logq-flow-")
    env = dict(os.environ, LOGQ_BENCH_TASKS_Q=os.path.join(d, "q"),
               PYTHONPATH=os.pathsep.join([d, TP.ROOT]))     # (logq from this tree)
    with open(os.path.join(d, "logq_bench_tasks.py"), "w") as f:
        f.write(HEAD + body)
    log = open(os.path.join(d, "worker.log"), "wb")
    worker = subprocess.Popen([sys.executable, "-m", "logq", "worker", "logq_bench_tasks:app",
                               "--workers", str(TP.WORKERS)], env=env, cwd=d, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = subprocess.run([sys.executable, "-c", TP._LOGQ_PRODUCER, str(n), str(TP.WARM_TASKS)],
                             env=env, cwd=d, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])["rate"]
    finally:
        TP._stop([worker])
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def test_flow_control_cost(benchmark, report):
    n = TP.n_tasks("logq")
    rates: dict[str, float] = {}
    benchmark.pedantic(lambda: rates.update({k: run_app(v, n) for k, v in APPS.items()}),
                       rounds=1, iterations=1, warmup_rounds=0)
    floor = rates["plain"]
    report(f"logq.tasks: no-op, unlimited, through the gate (n={n:,})", rates["gated"], "tasks/s",
           "the same app without limits (no gate)", floor, ratio_target=(">=", 0.9))
    report(f"logq.tasks: no-op with concurrency=2 (n={n:,})", rates["limited"], "tasks/s",
           "the same app without limits (no gate)", floor,
           note="each task held, decided in a lease-table transaction, one per batch")

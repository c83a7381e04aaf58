"""The tasks pool killed just before or just after one of its write
transactions, at points spread over its work.

The pool's process claims tasks (the lease table), marks them running and
commits each finished task's status and result together with its ack (the
index).  A pool process (with its workers) runs submitted tasks and SIGKILLs
itself around its ``k``-th LMDB write; a second pool then runs until idle.
Every task must end ``succeeded`` with its result (none stuck "running",
none lost), its attempts counted, whatever the point of death.  Which
points: ``ROUNDS`` of them, spread over a dry run's writes from a start the
seed picks (each round starts a pool twice, so not every one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import helpers
from helpers import SEED, child_env

TASKS = 24
ROUNDS = 3

_POOL = r"""
import sys
import helpers, task_app
task_app.app.path, kill_at = sys.argv[1], int(sys.argv[2])
event = helpers.kill_at_event(kill_at)
if kill_at >= 0:
    helpers.around_writes(event)
task_app.app.pool("task_app:app", workers=2).run(until_idle=True)
print("events", event.count, flush=True)
"""


def _run_pool(qdir: str, kill_at: int, log: str) -> tuple[int, int | None]:
    """A pool process over ``qdir`` (killing itself at event ``kill_at``;
    never if 0, not counting if -1); (its exit code, its event count)."""
    with open(log, "wb") as out:
        p = subprocess.run([sys.executable, "-c", _POOL, qdir, str(kill_at)], stdout=out,
                           stderr=subprocess.STDOUT, env=child_env(LOGQ_TASK_APP_DIR=qdir),
                           cwd=helpers.TESTS, timeout=120)
    text = open(log, "rb").read().decode(errors="replace")
    events = [int(ln.split()[1]) for ln in text.splitlines() if ln.startswith("events ")]
    return p.returncode, (events[0] if events else None)


def _round(root: str, kill_at: int) -> dict:
    import task_app
    qdir = os.path.join(root, f"q{kill_at}")
    app = task_app.app
    app.close()
    app.path = qdir
    try:
        hs = [task_app.add.delay(i, 1000) for i in range(TASKS)]
        app.close()
        rc, events = _run_pool(qdir, kill_at, os.path.join(root, f"pool{kill_at}.log"))
        out: dict = {"k": kill_at, "rc": rc, "events": events, "problems": []}
        if kill_at > 0 and rc != -9 and not (rc == 0 and events is not None and events < kill_at):
            # (how many writes a pool makes varies with its batches: it may finish first)
            out["problems"].append(f"the pool was not killed (exit {rc}, {events} events)")
        if kill_at != 0:
            rc2, _ = _run_pool(qdir, -1, os.path.join(root, f"again{kill_at}.log"))
            if rc2 != 0:
                out["problems"].append(f"the second pool exited with {rc2}")
        for i, h in enumerate(hs):
            st = h.status()
            if st.state != "succeeded" or h.result(timeout=0) != i + 1000 or st.attempts < 1:
                out["problems"].append(f"task {i}: {st.state}, attempts {st.attempts}")
        return out
    finally:
        app.close()


def driver(root: str, seed: str) -> None:
    dry = _round(root, 0)
    print(json.dumps(dry), flush=True)
    n = dry["events"] or 0
    stride = max(1, n // ROUNDS)
    for k in range(1 + int(seed) % stride, n + 1, stride):
        print(json.dumps(_round(root, k)), flush=True)


def test_pool_killed_around_its_write_transactions_loses_no_task(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import sys, test_tasks_kill_points as t; t.driver(*sys.argv[1:])",
                           str(tmp_path), str(SEED)], env=child_env(), cwd=helpers.TESTS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [json.loads(ln) for ln in proc.stdout.splitlines()]
    dry, kills = rounds[0], rounds[1:]
    assert not dry["problems"] and dry["events"] and dry["events"] >= 4, dry
    assert sum(r["rc"] == -9 for r in kills) >= 2, kills
    bad = [r for r in kills if r["problems"]]
    assert not bad, "\n".join(f"killed at event {r['k']}: {r['problems']}" for r in bad)

"""Durable workflows with a process of the pool killed just before or after
one of its write transactions.

The pool's process and its workers each write to the index: a worker
records a step (``checkpoint="step"``) or journals it (``"run"``), the
pool's process commits runs with their acks.  With ``LOGQ_WF_KILL`` set,
whichever process of the pool first reaches its ``k``-th write event (just
before or just after a write transaction; each process counts its own)
SIGKILLs itself, once: a worker (the pool replaces it) or the pool's
process (its workers go with it, and a second pool takes over).  Every
workflow must finish with its results, each step's effect must have run,
and at most once more than once per workflow: the step that was running
at the kill, as documented ("at least once for the step running at the
kill"); a completed step never runs again.  Points spread over a dry
run's events from a start the seed picks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import helpers
from helpers import SEED, child_env
from logq.tasks import App
from logq.workflows import workflow

app = App(os.environ.get("LOGQ_WF_KP_DIR", "/nonexistent"))
ROUNDS = 2
FLOWS = 4


def _install_kill() -> None:
    """In a process of the pool: SIGKILL it at its k-th write event if no
    process took the kill yet (the marker file says)."""
    spec = os.environ.get("LOGQ_WF_KILL")
    if not spec:
        return
    k, marker = spec.split(":", 1)
    kill_at = int(k)
    from logq import _index
    write = _index._Env.write
    events = [0]

    def event() -> None:
        events[0] += 1
        if events[0] == kill_at:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(self, fn):
        event()
        out = write(self, fn)
        event()
        return out

    _index._Env.write = counted


_install_kill()


def effect(wid: str, tag: str) -> str:
    with open(app.path + ".effects", "a") as f:
        f.write(f"{wid} {tag}\n")
    return tag


def _flow(ctx):
    return [ctx.step(effect, ctx.id, "a"), ctx.step(effect, ctx.id, "b"), ctx.step(effect, ctx.id, "c")]


@workflow(app, name="kp_step")
def kp_step(ctx):
    return _flow(ctx)


@workflow(app, name="kp_run", checkpoint="run")
def kp_run(ctx):
    return _flow(ctx)


POOL = ("import sys, test_workflows_kill_points as W; W.app.path = sys.argv[1]; "
        "W.app.pool('test_workflows_kill_points:app', workers=2, backoff_base=0.01, "
        "backoff_max=0.02).run(until_idle=True)")


def _pool(qdir: str, env: dict, log: str) -> int:
    with open(log, "wb") as out:
        return subprocess.run([sys.executable, "-c", POOL, qdir], stdout=out, stderr=subprocess.STDOUT,
                              env=child_env(LOGQ_WF_KP_DIR=qdir, **env), cwd=helpers.TESTS,
                              timeout=120).returncode


def _round(root: str, kill_at: int) -> dict:
    qdir = os.path.join(root, f"q{kill_at}")
    marker = qdir + ".killed"
    app.close()
    app.path = qdir
    out: dict = {"k": kill_at, "problems": []}
    try:
        started = [f.start() for f in (kp_step, kp_run) for _ in range(FLOWS // 2)]
        app.close()
        env = {"LOGQ_WF_KILL": f"{kill_at}:{marker}"} if kill_at else {}
        out["rc"] = _pool(qdir, env, qdir + ".pool1.log")
        out["killed"] = os.path.exists(marker)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(w.status().state == "succeeded" for w in started):
            if _pool(qdir, {}, qdir + ".pool2.log") != 0:
                out["problems"].append("the second pool failed")
                break
        for w in started:
            if w.result(timeout=0) != ["a", "b", "c"]:
                out["problems"].append(f"{w.id}: {w.status().state}")
        with open(qdir + ".effects") as f:
            counts = Counter(tuple(ln.split()) for ln in f.read().splitlines())
        for w in started:
            runs = [counts[(w.id, t)] for t in "abc"]
            if min(runs) < 1 or max(runs) > 2 or runs.count(2) > 1:
                out["problems"].append(f"{w.id}: effects ran {runs} times (a, b, c)")
    finally:
        app.close()
    return out


def driver(root: str, seed: str, top: str) -> None:
    n = int(top)
    stride = max(1, n // ROUNDS)
    for k in range(1 + int(seed) % stride, n + 1, stride):
        print(json.dumps(_round(root, k)), flush=True)


def test_workflows_with_a_pool_process_killed_around_a_write(tmp_path):
    # 30 events: the pool's process makes 30 to 40 in this work (its
    # workers fewer each), so the kills land in either.
    proc = subprocess.run([sys.executable, "-c", "import sys, test_workflows_kill_points as t; t.driver(*sys.argv[1:])",
                           str(tmp_path), str(SEED), "30"], env=child_env(), cwd=helpers.TESTS,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert rounds and sum(r["killed"] for r in rounds) >= 1, rounds
    bad = [r for r in rounds if r["problems"]]
    assert not bad, "\n".join(f"killed at event {r['k']}: {r['problems']}" for r in bad)

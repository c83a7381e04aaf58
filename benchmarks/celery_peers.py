"""Celery on logq beside Celery on a local Redis (issue 14), same run, same
app, same worker command; only the broker and result backend URLs differ.

Two experiments, for each transport:

* **throughput**: a warm ``celery worker`` (prefork, 2 children) and N
  no-op tasks ``noop(i)`` (returns ``i``) submitted with ``delay()`` from
  this process; the clock stops when all N results are stored (counted a
  chunk of 100 keys at a time: Redis ``EXISTS``, logq one read
  transaction).  Every result is then read back with ``AsyncResult.get``
  and must be ``i``.  Celery's defaults otherwise (acks on start, prefetch
  multiplier 4).
* **SIGKILL**: N tasks ``work(i)`` (sleeps 10 ms, then appends ``i`` to a
  file: one ``O_APPEND`` write per completed run); once a third have
  completed, the worker's whole process group is SIGKILLed and a new
  worker started; then we wait until every task completed or nothing
  completed for ``SETTLE_SECONDS``.  Counted from the file: *lost* (never
  completed in that window) and *duplicated* (completed more than once).
  Run with ``task_acks_late=True`` (the setting for at-least-once) and
  with Celery's default early acks.

Durability: Redis as benchmarks/tasks_peers.py starts it (``appendonly
yes``, ``appendfsync everysec``) with kombu's default Redis transport
options (``visibility_timeout`` 3600 s); logq with ``fsync="batch"``
(0.2 s) for the queues and an fsynced LMDB transaction per stored result.

Worker processes import this module by name (``celery -A
celery_peers:app``); the app is built from LOGQ_CP_BROKER / LOGQ_CP_BACKEND.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import logq.celery  # noqa: E402,F401  (the logq:// transport)
from celery import Celery  # noqa: E402

from logq._named import close_under  # noqa: E402

N_NOOP = 2000
N_KILL = 300
WARM = 20
WORK_SECONDS = 0.01
KILL_FRACTION = 1 / 3
SETTLE_SECONDS = 8.0
STALL_SECONDS = 60.0
START_TIMEOUT = 60.0


def make_app(broker: str, backend: str, acks_late: bool = False) -> Celery:
    app = Celery("celery_peers", broker=broker, backend=backend)
    app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                    task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_acks_late=acks_late)
    if os.environ.get("LOGQ_CP_EVENT_LOOP") == "0" and broker.startswith("logq:"):
        app.conf.broker_transport_options = {"event_loop": False}
    app.task(name="noop")(noop)
    app.task(name="work")(work)
    return app


def noop(i: int) -> int:
    return i


def work(i: int) -> int:
    time.sleep(WORK_SECONDS)
    fd = os.open(os.environ["LOGQ_CP_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{i}\n".encode())
    finally:
        os.close(fd)
    return i


def __getattr__(name: str) -> Any:
    """``celery_peers.app``: built from the environment (worker processes)."""
    if name == "app":
        a = make_app(os.environ["LOGQ_CP_BROKER"], os.environ["LOGQ_CP_BACKEND"],
                     os.environ.get("LOGQ_CP_ACKS_LATE") == "1")
        globals()["app"] = a
        return a
    raise AttributeError(name)


class Worker:
    """``celery -A celery_peers:app worker`` (prefork, 2 children) in its own session."""

    def __init__(self, env: dict[str, str], log_path: str) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")
        seen = self.text().count(" ready.")        # (a second worker logs to the same file)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_peers:app", "worker", "-c", "2",
             "-P", "prefork", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "info"],
            env=env, cwd=BENCH_DIR, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while self.text().count(" ready.") <= seen:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"celery worker did not start:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


def _env(broker: str, backend: str, runs: str, acks_late: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([BENCH_DIR, ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(LOGQ_CP_BROKER=broker, LOGQ_CP_BACKEND=backend, LOGQ_CP_RUNS=runs,
               LOGQ_CP_ACKS_LATE="1" if acks_late else "0")
    return env


class _Counter:
    """How many of the given results are stored: a chunk of 100 keys at a
    time past the ones already seen (Redis EXISTS; logq one read
    transaction), so polling costs the store little."""

    def __init__(self, app: Celery, backend_url: str) -> None:
        self.app = app
        self.seen = 0
        if backend_url.startswith("redis"):
            from redis import Redis
            r = Redis.from_url(backend_url)
            self.count = lambda keys: r.exists(*keys)
        else:
            kv = app.backend.kv
            self.count = lambda keys: sum(v is not None for v in kv.mget(keys))

    def done(self, keys: list[bytes]) -> int:
        while self.seen < len(keys):
            chunk = keys[self.seen:self.seen + 100]
            if self.count(chunk) < len(chunk):
                break
            self.seen += len(chunk)
        return self.seen


def throughput(broker: str, backend: str, n: int, workdir: str) -> dict[str, float]:
    """N no-op tasks end to end (see the module docstring): tasks/s."""
    app = make_app(broker, backend)
    w = Worker(_env(broker, backend, os.path.join(workdir, "runs"), False), os.path.join(workdir, "w.log"))
    try:
        task = app.tasks["noop"]
        for i in range(WARM):
            assert task.delay(-1 - i).get(timeout=60) == -1 - i
        t0 = time.perf_counter()
        hs = [task.delay(i) for i in range(n)]
        t_sub = time.perf_counter()
        keys = [app.backend.get_key_for_task(h.id) for h in hs]
        c = _Counter(app, backend)
        last, moved = -1, time.perf_counter()
        while True:
            done = c.done(keys)
            now = time.perf_counter()
            if done >= n:
                break
            if done != last:
                last, moved = done, now
            elif now - moved > STALL_SECONDS:
                raise RuntimeError(f"results stopped at {done} of {n}")
            time.sleep(0.005)
        t_done = time.perf_counter()
        wrong = [(i, v) for i, v in ((i, h.get(timeout=30)) for i, h in enumerate(hs)) if v != i]
        if wrong:
            raise RuntimeError(f"{len(wrong)} of {n} results wrong, e.g. {wrong[:3]}")
        return {"rate": n / (t_done - t0), "submit_rate": n / (t_sub - t0)}
    finally:
        w.kill()


@dataclass
class KillResult:
    n: int
    completed_before_kill: int
    lost: int
    duplicated: int
    extra_runs: int
    ran: int
    settle_seconds: float
    notes: list[str] = field(default_factory=list)


def _runs(path: str) -> Counter[int]:
    try:
        with open(path) as f:
            return Counter(int(x) for x in f.read().split())
    except FileNotFoundError:
        return Counter()


def kill_experiment(broker: str, backend: str, n: int, workdir: str, acks_late: bool) -> KillResult:
    """N tasks, SIGKILL of the worker a third of the way, a new worker;
    lost and duplicated completions (see the module docstring)."""
    runs = os.path.join(workdir, "runs")
    app = make_app(broker, backend, acks_late)
    env = _env(broker, backend, runs, acks_late)
    log_path = os.path.join(workdir, "w.log")
    w = Worker(env, log_path)
    try:
        task = app.tasks["work"]
        for i in range(n):
            task.delay(i)
        deadline = time.monotonic() + STALL_SECONDS
        while sum(_runs(runs).values()) < n * KILL_FRACTION:
            if time.monotonic() > deadline:
                raise RuntimeError("the first worker made no progress")
            time.sleep(0.005)
    finally:
        w.kill()
    before = sum(_runs(runs).values())
    w2 = Worker(env, log_path)
    try:
        last, moved = -1, time.monotonic()
        while True:
            got = _runs(runs)
            now = time.monotonic()
            if len(got) >= n and now - moved > 0.5:
                break           # (every task completed; a moment more for late duplicates)
            total = sum(got.values())
            if total != last:
                last, moved = total, now
            elif now - moved > SETTLE_SECONDS:
                break
            time.sleep(0.02)
    finally:
        w2.kill()
    got = _runs(runs)
    return KillResult(n, before, n - len([i for i in range(n) if got[i]]),
                      sum(1 for i in range(n) if got[i] > 1),
                      sum(max(0, got[i] - 1) for i in range(n)), sum(got.values()), SETTLE_SECONDS)


def scratch(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix)


def cleanup(path: str) -> None:
    close_under(path)       # (this process's producer and result queues there)
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    # A quick look without pytest: python benchmarks/celery_peers.py [N]
    sys.path.insert(0, BENCH_DIR)
    import tasks_peers as TP
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    d = scratch("celery-peers-")
    try:
        with TP.RedisServer(d) as rs:
            out = {}
            for kind, url in (("logq", f"logq://{d}/logq"), ("redis", rs.url(0))):
                wd = scratch(f"{kind}-")
                out[kind] = throughput(url, url, n, wd)
                cleanup(wd)
            print(json.dumps(out))
    finally:
        cleanup(d)

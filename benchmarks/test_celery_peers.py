"""Celery on logq vs Celery on a local Redis, same run (issue 14): no-op
tasks end to end, and what a SIGKILL of the worker mid-batch costs each
(tasks lost, tasks run twice), with late and with early acks.  The
workload, the checks and each side's durability: celery_peers.py.

Asserted (not timing): every result of the throughput runs is right, and
logq loses no task to the SIGKILL.  Redis's losses are reported, not
asserted: they are the peer's documented behaviour (a message unacked by a
dead worker waits for its ``visibility_timeout``, 3600 s, to come back).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

import celery_peers as CP
import tasks_peers as TP


def _n(base: int) -> int:
    raw = os.environ.get("LOGQ_BENCH_SCALE", "")
    return max(100, int(base * (float(raw) if raw else 1.0)))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip(TP.REDIS_MISSING)
    if importlib.util.find_spec("redis") is None:
        pytest.skip("redis-py is not installed: pip install -e '.[peers]'")
    with TP.RedisServer(str(tmp_path_factory.mktemp("redis"))) as rs:
        yield rs


def _redis_url(rs: TP.RedisServer) -> str:
    from redis import Redis
    url = rs.url(0)
    Redis.from_url(url).flushdb()
    return url


def test_celery_noop_end_to_end(benchmark, report, redis_server, monkeypatch):
    """logq with Celery's event loop (the transport's default), Redis, and
    logq with Celery's blocking loop (``event_loop=False``), one after the
    other in this run."""
    n = _n(CP.N_NOOP)
    out = {}

    def all_three():
        for kind in ("logq", "redis", "logq-blocking"):
            monkeypatch.setenv("LOGQ_CP_EVENT_LOOP", "0" if kind == "logq-blocking" else "1")
            wd = CP.scratch(f"celery-{kind}-")
            try:
                url = _redis_url(redis_server) if kind == "redis" else f"logq://{wd}/q"
                out[kind] = CP.throughput(url, url, n, wd)
            finally:
                CP.cleanup(wd)
    benchmark.pedantic(all_three, rounds=1, iterations=1, warmup_rounds=0)
    for kind, loop in (("logq", "event loop"), ("logq-blocking", "blocking loop, event_loop=False")):
        report(f"Celery on logq ({loop}): no-op task end to end, result stored, prefork -c 2 (n={n:,})",
               out[kind]["rate"], "tasks/s", "Celery on a local redis-server, same run", out["redis"]["rate"],
               ratio_target=(">=", 1.0),
               note=f"submit {out[kind]['submit_rate']:,.0f}/s vs {out['redis']['submit_rate']:,.0f}/s; "
                    "logq fsync=batch, each result an fsynced LMDB txn; Redis appendfsync everysec")


@pytest.mark.parametrize("acks_late", [True, False], ids=["acks_late", "acks_early"])
def test_celery_sigkill_mid_batch(report, note, redis_server, acks_late):
    n = _n(CP.N_KILL)
    res = {}
    for kind in ("logq", "redis"):
        wd = CP.scratch(f"celery-kill-{kind}-")
        try:
            url = f"logq://{wd}/q" if kind == "logq" else _redis_url(redis_server)
            res[kind] = CP.kill_experiment(url, url, n, wd, acks_late)
        finally:
            CP.cleanup(wd)
    mode = "task_acks_late=True" if acks_late else "early acks (Celery's default)"
    for kind, r in res.items():
        note(f"SIGKILL of the Celery worker after {r.completed_before_kill} of {r.n} tasks, {mode}, "
             f"{kind}: {r.lost} lost (not run within {r.settle_seconds:.0f} s of the last progress), "
             f"{r.duplicated} run twice ({r.ran} runs in all)")
    lg, rd = res["logq"], res["redis"]
    report(f"SIGKILL mid-batch ({mode}, n={n}): tasks lost, Celery on logq", lg.lost, "tasks",
           "Celery on Redis, same run", rd.lost,
           note=f"run twice: logq {lg.duplicated}, Redis {rd.duplicated}")
    assert lg.lost == 0, f"Celery on logq lost {lg.lost} of {n} tasks to a SIGKILL ({mode})"

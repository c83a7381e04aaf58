"""Task queues side by side (issue 12): the same no-op task end to end with
its result stored, in huey (SqliteHuey), Celery, RQ and Dramatiq (the last
three on a redis-server started here), and in logq.tasks once it has an
``App``.  The workload, the checks and each peer's durability setting are
in tasks_peers.py's docstring; the durability is printed beside each figure.

Figures read against each other: each peer beside the best peer of the run;
logq's row beside the best peer too, with the issue's goal (>= 20 x) as
its ratio target.  logq's row is skipped (with a note) only while
``logq.tasks`` has no ``App``; once it has one, ``tasks_peers.run_logq``
must be written or this test fails.  A peer not installed, or redis-server
missing, is a note, not a failure; a peer that runs and loses or garbles a
result fails the test.
"""

from __future__ import annotations

import pytest

import tasks_peers as TP


def test_task_peers_end_to_end(benchmark, report, note):
    rows: list[TP.PeerFigure] = []
    benchmark.pedantic(lambda: rows.extend(TP.run_all()), rounds=1, iterations=1, warmup_rounds=0)
    measured = [r for r in rows if r.rate is not None]
    for r in rows:
        if r.rate is None:
            note(f"{r.peer}: not measured: {r.why}")
    if not measured:
        pytest.skip("no peer could be measured here: " + "; ".join(f"{r.peer}: {r.why}" for r in rows))
    best = max(measured, key=lambda r: r.rate)
    for r in measured:
        report(f"{r.peer}: no-op task, result stored, 2 workers (n={r.n:,})", r.rate, "tasks/s",
               f"best peer ({best.peer})", best.rate,
               note=f"submit {r.submit_rate:,.0f}/s; {r.durability}")
    if not TP.logq_ready():
        note("logq: not measured: logq.tasks has no App yet (issue 12); the peers' figures stand alone")
        return
    n = TP.n_tasks("logq")
    rate = TP.run_logq(n, TP.WORKERS)
    report(f"logq.tasks: no-op task, result stored, 2 workers (n={n:,})", rate, "tasks/s",
           f"best peer ({best.peer})", best.rate, ratio_target=(">=", 20.0),
           note=TP.DURABILITY["logq"])
    # The same figure beside what it is built on, measured in this run: the
    # raw WorkerPool's no-op rate (issue 12: >= 0.2 x, and >= 50 k tasks/s).
    big = max(n, 20 * TP.N_TASKS)
    rate_big = TP.run_logq(big, TP.WORKERS)
    raw = TP.run_raw_pool(big, TP.WORKERS)
    report(f"logq.tasks: no-op task, result stored, 2 workers (n={big:,})", rate_big, "tasks/s",
           "raw WorkerPool no-op, 2 workers, same run", raw, target=(">=", 50_000.0),
           ratio_target=(">=", 0.2), note="producer in another process; the pool rate from "
                                          "`logq bench --workload pool`")

"""The throughput-tuning harness behind ``logq bench``: logq's workloads,
over a grid of settings, beside this machine's floors measured in the same
run, so every figure also reads as a ratio.

Workloads (``Params.workload``):

* ``produce``: ``producers`` processes put ``messages`` records (``put()``
  when ``batch`` is 1, else ``put_many(batch)``) under the ``fsync`` policy.
* ``consume``: the queue is filled first (untimed); ``consumers`` processes
  drain it through one consumer group (``get()``+``ack()`` when ``batch``
  is 1, else ``get_many(batch)``+``ack_many``), committing every
  ``commit_every`` acks or ``commit_interval`` seconds.
* ``e2e``: producers and consumers at once; the figure is the rate of
  committed messages, and the latency is put -> the commit that made the
  ack durable.
* ``pool``: producers feed a ``WorkerPool`` of ``workers`` processes
  running :func:`noop`; latency as for ``e2e`` (the pool's own samples).
* ``tasks``: ``logq.tasks`` end to end (``_bench_tasks``): a producer
  process submits ``messages`` no-op tasks and reads every result; the pool
  runs them on ``workers`` processes.  Read beside the raw ``pool`` rate of
  the same settings, which the grid adds, as its floor.  Not run unless
  asked (``--workload tasks``, or ``all``).

Every producer and consumer is a process of its own (started with
forkserver where there is one, spawn elsewhere) that opens the queue,
reports ready, and waits for one start signal: the time from that signal to
the last put (produce) or the last commit (the others) is the figure.
``messages`` and ``duration`` bound a run, whichever comes first.  A run
checks what it measured: the queue holds every record put, and the group
acked every one of them (``RunResult.check``).

Put -> commit latency: the consumers commit themselves, on the same
every-``commit_every``-acks-or-``commit_interval``-seconds rule as
``GroupOptions`` (the group's own timer is switched off), so that the moment
each commit returns is known; a message's latency is that moment minus its
put timestamp.  Unpaced producers (no ``rate``) outrun the consumers, and
the latency then measures the backlog: pace them with ``rate`` to measure
the queue instead.

Floors, per payload size: one ``os.write`` per record, the records joined
into 1 MiB writes, the payloads sliced out of the mapped segments of a
closed queue (the least any Python reader does), and the median
``fdatasync`` after overwriting 4 KiB in place in a preallocated file (the
way logq writes its segments).  The floor a run is read against
(:meth:`Floors.for_run`): writes (per record for ``batch`` 1, joined
otherwise), capped at ``batch`` records per fdatasync under
``fsync="always"``; the slice loop for ``consume``; the lower of the two for
``e2e`` and ``pool``.

CPU is the user+system time of the bench process and of its producers and
consumers (each measures its own) over the timed window, as a percentage of
one CPU; pool workers are read from ``/proc`` (Linux).  RSS: the peak of the
bench process so far, and of the largest child.

``compare`` runs the same produce-then-consume workload through peer queues
when they are installed (:data:`PEERS`), each at its closest durability
setting to the chosen ``fsync`` policy, and says which.

The harness is split by concept, each module importing only those above it
in this list: ``_bench_params`` (Params, parsing, the grid, BenchError),
``_bench_floors`` (the floors), ``_bench_report`` (the result types; the
table, JSON, CSV and plot), ``_bench_procs`` (child processes: start
method, one call in a child, CPU and RSS), ``_bench_work`` (logq's
workloads and :func:`run_one`), ``_bench_peers`` (the peer queues and
:func:`run_peer`); this module runs the whole grid (:func:`run`) and
exports the public names.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable

import logq
from logq._bench_floors import (FLOOR_MAX_RECORDS, FLOOR_MIN_RECORDS, SYNC_ROUNDS, Floors, PayloadFloors,
                                floor_fdatasync, floor_joined, floor_slices, floor_write, measure_floors)
from logq._bench_params import (PEER_PHASE_SECONDS, QUEUE_WORKLOADS, STALL_SECONDS, SWEEPABLE, WORKLOADS,
                                BenchError, Params,
                                grid, parse_float, parse_fsync, parse_int, parse_size, parse_sweep)
from logq._bench_peers import PEERS, parse_peers, run_peer
from logq._bench_procs import _context, _in_child
from logq._bench_report import (PeerResult, Report, RunResult, as_json, format_report, format_table, plot,
                                write_csv)
from logq._bench_work import GROUP, noop, run_one

__all__ = [
    "format_table",
    "run", "Params", "grid", "WORKLOADS", "QUEUE_WORKLOADS", "SWEEPABLE", "parse_size", "parse_int", "parse_float",
    "parse_fsync", "parse_sweep", "BenchError", "GROUP", "PEER_PHASE_SECONDS", "STALL_SECONDS",
    "floor_write", "floor_joined", "floor_fdatasync", "floor_slices", "measure_floors", "Floors",
    "PayloadFloors", "FLOOR_MAX_RECORDS", "FLOOR_MIN_RECORDS", "SYNC_ROUNDS",
    "RunResult", "PeerResult", "Report", "format_report", "as_json", "write_csv", "plot",
    "noop", "run_one", "PEERS", "parse_peers", "run_peer",
]


# -- the whole run ---------------------------------------------------------------------------------
def _label(p: Params, swept: list[str]) -> str:
    return " ".join([p.workload] + [f"{n}={getattr(p, n)}" for n in swept])


def run(params: list[Params], *, sweeps: list[tuple[str, list[Any]]] | None = None,
        dirpath: str | None = None, compare: list[str] | None = None,
        progress: Callable[[int, int, str, float], None] | None = None) -> Report:
    """Measure the floors, then run every ``params`` point (and the peers of
    ``compare``) on temporary queues under ``dirpath``; the report.  A run
    whose check fails is reported (``Report.failed``), not raised."""
    sweeps = sweeps or []
    say = progress or (lambda i, n, label, f: None)
    swept = [n for n, _ in sweeps]
    peer_points = []
    if compare:
        seen = set()
        for p in params:
            key = (p.payload, p.fsync, p.messages, p.duration)
            if key not in seen:
                seen.add(key)
                peer_points.append(p)
    total = len(params) + len(peer_points) * len(compare or [])
    base = tempfile.mkdtemp(prefix="logq-bench-", dir=dirpath)
    try:
        ctx = _context()
        say(0, total, "floors", 0.0)
        floors = _in_child(ctx, measure_floors, base, [p.payload for p in params],
                           max(p.messages for p in params))
        first = params[0]
        fixed = {k: v for k, v in asdict(first).items() if k not in swept and k != "workload"}
        report = Report(_meta(base), floors, fixed, sweeps)
        for i, p in enumerate(params):
            label = _label(p, swept)
            report.results.append(run_one(p, base, floors, ctx, lambda f: say(i, total, label, f), label))
        _tasks_beside_pool(report.results)
        k = len(params)
        for p in peer_points:
            for name in compare or []:
                say(k, total, f"peer {name} fsync={p.fsync} payload={p.payload}", 0.0)
                rows = run_peer(name, p, base, floors, ctx)
                for row in rows:
                    mine = next((r for r in report.results if r.workload == row.workload and
                                 r.params.payload == p.payload and r.params.fsync == p.fsync), None)
                    if mine is not None and row.msgs_per_s:
                        row.logq_msgs_per_s = mine.msgs_per_s
                        row.logq_vs_peer = mine.msgs_per_s / row.msgs_per_s
                report.peers.extend(rows)
                k += 1
        say(total, total, "done", 1.0)
        return report
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _tasks_beside_pool(results: list[RunResult]) -> None:
    """A ``tasks`` row's floor: the raw ``pool`` row of the same settings in
    this run (the no-op WorkerPool rate its tasks are built on)."""
    for r in results:
        if r.workload != "tasks":
            continue
        pool = next((x for x in results if x.workload == "pool" and
                     asdict(x.params) == dict(asdict(r.params), workload="pool")), None)
        if pool is not None and pool.msgs_per_s:
            r.floor, r.floor_msgs_per_s = "raw WorkerPool no-op, this run", pool.msgs_per_s
            r.ratio = r.msgs_per_s / pool.msgs_per_s


def _meta(base: str) -> dict[str, Any]:
    return {"logq_version": logq.__version__, "native": logq.native_enabled(),
            "codec": "native" if logq.native_enabled() else "pure-Python",
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
            "cpus": os.cpu_count(), "dir": os.path.dirname(base) or base,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

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
"""

from __future__ import annotations

import collections
import csv
import importlib
import importlib.util
import itertools
import math
import mmap
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
import types
from array import array
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing.connection import wait as wait_for
from operator import attrgetter
from typing import Any, Callable

import logq

WORKLOADS = ("produce", "consume", "e2e", "pool")
GROUP = "bench"
FLOOR_MAX_RECORDS = 200_000      # floors: at most this many records...
FLOOR_MIN_RECORDS = 20_000       # ...and at least this many
SYNC_ROUNDS = 200                # fdatasync floor: median of this many
PEER_PHASE_SECONDS = 3.0         # a peer's produce (or consume) phase stops after this long
STALL_SECONDS = 120.0            # a run that makes no progress this long is abandoned
_POLL = 0.05                     # the parent looks at its children this often (s)
_IDLE_GET = 0.005                # consumers: longest get wait before they look whether the run is over
_COMMIT_OFF = 1 << 30            # consumers: the group's own commit triggers, switched off
_INTERVAL_OFF = 1e8
_VISIBILITY = 600.0              # leases long enough that nothing is redelivered in a run
_TS = attrgetter("ts_ns")


class BenchError(logq.LogqError):
    """A benchmark run failed (a child process died or raised, or a run
    stalled); the message says which and why."""


# -- parameters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Params:
    """One run's settings, with their defaults.  ``commit_interval`` None
    means the library's default for the workload (GroupOptions: 1 s; the
    pool: 0.2 s); ``rate`` None means unpaced producers."""
    workload: str = "e2e"
    payload: int = 100               # bytes per message
    batch: int = 100                 # put_many / get_many size (1: put() / get())
    fsync: str = "batch"             # the producers' fsync policy
    fsync_interval: float = 0.2      # "batch": longest a put waits to be fsynced (s)
    fsync_bytes: int = 4 << 20       # "batch": fsync once this much is unsynced
    commit_every: int = 10_000       # consumers commit after this many acks...
    commit_interval: float | None = None   # ...or this many seconds
    producers: int = 1               # producer processes
    consumers: int = 1               # consumer processes (consume, e2e)
    workers: int = 2                 # pool worker processes (pool)
    rate: float | None = None        # total msgs/s the producers aim at (None: as fast as they can)
    messages: int = 300_000          # a run stops after this many messages...
    duration: float | None = None    # ...or this many seconds, whichever first

    def __post_init__(self) -> None:
        if self.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {self.workload!r}")
        if self.fsync not in logq.FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(logq.FSYNC_POLICIES)}, not {self.fsync!r}")
        for name, lo in (("payload", 0), ("batch", 1), ("fsync_bytes", 1), ("commit_every", 1),
                         ("producers", 1), ("consumers", 1), ("workers", 1), ("messages", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, not {v!r}")
        for name in ("fsync_interval", "commit_interval", "rate", "duration"):
            v = getattr(self, name)
            if v is None and name != "fsync_interval":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e9:
                raise ValueError(f"{name} must be a positive number, not {v!r}")
        if self.payload > 16 << 20:
            raise ValueError(f"payload must be at most 16 MiB (logq's max_message_bytes), not {self.payload}")

    @property
    def effective_commit_interval(self) -> float:
        if self.commit_interval is not None:
            return self.commit_interval
        return logq.PoolOptions().commit_interval if self.workload == "pool" else \
            logq.GroupOptions().commit_interval

    def queue_options(self) -> dict[str, Any]:
        return {"fsync": self.fsync, "fsync_interval": self.fsync_interval,
                "fsync_bytes": self.fsync_bytes}


def parse_size(text: str) -> int:
    """An integer number of bytes, with an optional K/KiB/M/MiB suffix (powers of 1024)."""
    t = text.strip()
    for suffix, mult in (("KiB", 1 << 10), ("MiB", 1 << 20), ("K", 1 << 10), ("M", 1 << 20),
                         ("k", 1 << 10), ("", 1)):
        if t.endswith(suffix) and t[:len(t) - len(suffix)].strip().isdigit():
            return int(t[:len(t) - len(suffix)]) * mult
    raise ValueError(f"not a size in bytes: {text!r} (e.g. 100, 4KiB, 1MiB)")


def parse_int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def parse_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"not a finite number: {text!r}")
    return v


def parse_fsync(text: str) -> str:
    if text not in logq.FSYNC_POLICIES:
        raise ValueError(f"not an fsync policy: {text!r} (one of {', '.join(logq.FSYNC_POLICIES)})")
    return text


# What --sweep may vary, and how each value is read.
SWEEPABLE: dict[str, Callable[[str], Any]] = {
    "payload": parse_size, "batch": parse_int, "fsync": parse_fsync,
    "fsync_interval": parse_float, "fsync_bytes": parse_size, "commit_every": parse_int,
    "commit_interval": parse_float, "producers": parse_int, "consumers": parse_int,
    "workers": parse_int, "rate": parse_float, "messages": parse_int, "duration": parse_float,
}


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``PARAM=v1,v2,...`` -> (param, values); ValueError saying what is wrong."""
    name, eq, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not eq or not name:
        raise ValueError(f"expected PARAM=v1,v2,... (e.g. batch=1,100), not {text!r}")
    if name not in SWEEPABLE:
        raise ValueError(f"unknown parameter {name!r}: one of {', '.join(SWEEPABLE)}")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
        raise ValueError(f"{name}: empty value in {values!r}")
    out = [SWEEPABLE[name](v) for v in items]
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: a value is repeated in {values!r}")
    for v in out:                 # each value on its own, so the error names it
        replace(Params(), **{name: v})
    return name, out


def grid(base: Params, workloads: list[str], sweeps: list[tuple[str, list[Any]]]) -> list[Params]:
    """Every combination: each workload x the sweeps' values, in order."""
    if len(sweeps) > 2:
        raise ValueError("at most two --sweep options (a grid)")
    names = [n for n, _ in sweeps]
    if len(set(names)) != len(names):
        raise ValueError(f"--sweep {names[0]} given twice")
    out = []
    for w in workloads:
        for combo in itertools.product(*[vals for _, vals in sweeps]):
            out.append(replace(base, workload=w, **dict(zip(names, combo))))
    return out


# -- floors ------------------------------------------------------------------------------------
def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def floor_write(dirpath: str, n: int, payload: bytes) -> float:
    """Records per second with one os.write per record."""
    path = os.path.join(dirpath, "floor-write")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        w = os.write
        t = time.perf_counter()
        for _ in range(n):
            w(fd, payload)
        return _rate(n, time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)


def floor_joined(dirpath: str, n: int, payload: bytes) -> float:
    """Records per second when the records are joined and written 1 MiB at a time."""
    path = os.path.join(dirpath, "floor-joined")
    per_chunk = max(1, (1 << 20) // max(1, len(payload)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        t = time.perf_counter()
        done = 0
        while done < n:
            k = min(per_chunk, n - done)
            os.write(fd, b"".join([payload] * k))
            done += k
        return _rate(n, time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)


def floor_fdatasync(dirpath: str, rounds: int = 200, *, in_place: bool = False) -> float:
    """Median seconds of fdatasync after writing 4 KiB: appended to the file,
    or (``in_place``) over blocks preallocated with posix_fallocate, the way
    logq writes into its segments (the allocation is made durable first)."""
    path = os.path.join(dirpath, "floor-sync")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    block = b"\1" * 4096
    times = []
    try:
        if in_place:
            os.posix_fallocate(fd, 0, rounds * len(block))
            os.fsync(fd)
        for i in range(rounds):
            os.pwrite(fd, block, i * len(block))
            t = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        os.close(fd)
        os.unlink(path)


def floor_slices(qdir: str) -> float:
    """Records per second when every payload of a closed queue is sliced out
    of its mapped segments with positions found beforehand (untimed): the
    least any Python reader of the log has to do."""
    from logq import _codec as C
    from logq import _format as F
    runs = []
    for name in sorted(os.listdir(qdir)):
        base = F.parse_segment_name(name)
        if base is None:
            continue
        with open(os.path.join(qdir, name), "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        h = C.handle(mm)
        fields_ = C.scan(h, F.SEGMENT_HEADER_SIZE, len(mm), base, 1 << 40, True)[3] or []
        C.release(h)
        runs.append((mm, fields_[1::F.SCAN_FIELDS], fields_[2::F.SCAN_FIELDS]))
    n = sum(len(p) for _, p, _ in runs)
    t = time.perf_counter()
    for mm, pos, lens in runs:
        [mm[p:p + k] for p, k in zip(pos, lens)]
    rate = _rate(n, time.perf_counter() - t)
    for mm, _, _ in runs:
        mm.close()
    return rate


@dataclass
class PayloadFloors:
    """The floors that depend on the record size, in records per second."""
    payload: int
    records: int
    write: float                  # one os.write per record
    joined: float                 # joined, 1 MiB writes
    slices: float                 # mmap slice loop over a closed queue


@dataclass
class Floors:
    """This machine's floors, measured in the same run."""
    fdatasync: float              # median seconds, 4 KiB in place in a preallocated file
    by_payload: dict[int, PayloadFloors] = field(default_factory=dict)

    def for_run(self, p: Params) -> tuple[str, float]:
        """(name, records/s) of the floor that run ``p`` is read against."""
        pf = self.by_payload[p.payload]
        slices = ("mmap slice loop", pf.slices)
        if p.workload == "consume":
            return slices
        if p.batch == 1:
            name, rate = "os.write per record", pf.write
        else:
            name, rate = "joined 1 MiB writes", pf.joined
        if p.fsync == "always":
            synced = p.batch / self.fdatasync
            if synced < rate:
                name, rate = (f"{p.batch} records per fdatasync" if p.batch > 1 else "1 / fdatasync"), synced
        if p.workload in ("e2e", "pool") and pf.slices < rate:
            return slices
        return name, rate

    def as_dict(self) -> dict[str, Any]:
        return {"fdatasync_s": self.fdatasync, "fdatasync_per_s": 1 / self.fdatasync,
                "by_payload": [asdict(f) for f in self.by_payload.values()]}


def measure_floors(dirpath: str, payloads: list[int], messages: int) -> Floors:
    """The floors for each payload size (writes: best of 3), and fdatasync."""
    fl = Floors(floor_fdatasync(dirpath, SYNC_ROUNDS, in_place=True))
    n = max(FLOOR_MIN_RECORDS, min(FLOOR_MAX_RECORDS, messages))
    for size in sorted(set(payloads)):
        k = max(1000, min(n, (256 << 20) // max(1, size)))     # at most 256 MiB a floor
        payload = b"f" * size
        write = max(floor_write(dirpath, k, payload) for _ in range(3))
        joined = max(floor_joined(dirpath, k, payload) for _ in range(3))
        qdir = os.path.join(dirpath, f"floor-q{size}")
        with logq.open(qdir, fsync="never") as q:
            batch = [payload] * 1000
            for i in range(0, k, 1000):
                q.put_many(batch[:min(1000, k - i)])
        slices = max(floor_slices(qdir) for _ in range(3))
        shutil.rmtree(qdir, ignore_errors=True)
        fl.by_payload[size] = PayloadFloors(size, k, write, joined, slices)
    return fl


# -- results -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One run's settings and figures.  ``name``, ``msgs_per_s``,
    ``mb_per_s``, ``floor``, ``floor_msgs_per_s`` and ``ratio`` are the
    fields the earlier harness reported, kept for readers of its JSON."""
    name: str
    workload: str
    params: Params
    messages_put: int = 0
    messages_consumed: int = 0         # acked and committed (consume, e2e, pool)
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_p999_ms: float | None = None
    latency_samples: int = 0
    fsyncs: int = 0                    # the producers' data fsyncs (q.stats()["fsyncs"])
    fsyncs_per_s: float = 0.0
    records_per_fsync: float | None = None   # mean group-commit size
    commits: int = 0                   # the consumers' (or pool's) index commits
    cpu_percent: float | None = None   # of one CPU: this process and its children
    rss_parent_mb: float = 0.0         # peak RSS of the bench process so far
    rss_children_mb: float = 0.0       # peak RSS of the largest child
    floor: str = ""
    floor_msgs_per_s: float = 0.0
    ratio: float = 0.0
    check: str = "ok"

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        p = asdict(self.params)
        p["commit_interval"] = self.params.effective_commit_interval
        del p["workload"]
        return {"system": "logq", **d, **p}


@dataclass
class PeerResult:
    """A peer queue's produce or consume phase, or a note that it is missing."""
    peer: str
    kind: str                          # the class used
    workload: str                      # "produce" or "consume" ("-" when missing)
    payload: int
    fsync: str                         # the logq policy it stands beside
    durability: str                    # the setting used, in words
    installed: bool = True
    messages: int = 0
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    floor: str = ""
    floor_msgs_per_s: float = 0.0
    ratio: float = 0.0
    logq_msgs_per_s: float | None = None   # logq's figure at the same settings, when measured
    logq_vs_peer: float | None = None
    cpu_percent: float | None = None
    rss_mb: float = 0.0
    version: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.peer, **asdict(self)}


@dataclass
class Report:
    meta: dict[str, Any]
    floors: Floors
    fixed: dict[str, Any]
    sweeps: list[tuple[str, list[Any]]]
    results: list[RunResult] = field(default_factory=list)
    peers: list[PeerResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.meta, "native": self.meta["native"], "floors": self.floors.as_dict(),
                "fixed": self.fixed, "sweep": {n: v for n, v in self.sweeps},
                "results": [r.as_dict() for r in self.results],
                "peers": [p.as_dict() for p in self.peers]}

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.check != "ok"]


def _percentile(sorted_values: Any, q: float) -> float | None:
    n = len(sorted_values)
    if not n:
        return None
    return sorted_values[min(n - 1, int(q * n))]


# -- child processes -----------------------------------------------------------------------------
def noop(message: Any) -> None:
    """The pool workload's handler: does nothing (``logq.bench:noop``)."""


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (getrusage:
    microseconds, where os.times() counts 10 ms ticks)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    r = resource.getrusage(who).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class _Shared:
    """Counters the children publish and the parent (and the consumers,
    for the end of the run) read: per producer, records put and a done flag;
    per consumer, records acked; per child, a ready flag."""

    def __init__(self, ctx: Any, producers: int, consumers: int) -> None:
        self.put = ctx.RawArray("q", max(1, producers))
        self.done = ctx.RawArray("b", max(1, producers))
        self.acked = ctx.RawArray("q", max(1, consumers))
        self.ready = ctx.RawArray("b", producers + consumers)
        self.producers = producers

    def all_put(self) -> tuple[int, bool]:
        """(records put so far, whether every producer has finished)."""
        return sum(self.put[:self.producers]), all(self.done[:self.producers])


def _child_main(role: str, index: int, p: Params, qdir: str, sh: _Shared, start: Any,
                target: int, conn: Any) -> None:
    """A producer or consumer (``role``): run it and send back its figures
    (or the traceback)."""
    try:
        fn = _producer if role == "producer" else _consumer
        out = fn(index, p, qdir, sh, start, target)
        out["rss"] = _maxrss_bytes()
        conn.send(out)
    except BaseException:   # noqa: BLE001 - the parent reports it
        conn.send({"error": traceback.format_exc()})
        raise SystemExit(1)
    finally:
        conn.close()


def _producer(i: int, p: Params, qdir: str, sh: _Shared, start: Any, target: int) -> dict[str, Any]:
    share = target // p.producers + (1 if i < target % p.producers else 0)
    payload = b"x" * p.payload
    batch = [payload] * p.batch
    each = p.rate / p.producers if p.rate else None
    check_every = max(1, 256 // p.batch)       # look at the clock about every 256 records
    with logq.open(qdir, **p.queue_options()) as q:
        put, put_many = q.put, q.put_many
        f0 = q.stats()["fsyncs"]
        sh.ready[i] = 1
        start.wait()
        c0, t0 = _cpu_seconds(), time.monotonic()
        deadline = t0 + p.duration if p.duration else math.inf
        sent = rounds = 0
        while sent < share:
            k = min(p.batch, share - sent)
            if p.batch == 1:
                put(payload)
            else:
                put_many(batch if k == p.batch else batch[:k])
            sent += k
            rounds += 1
            if rounds % check_every == 0:
                sh.put[i] = sent
                now = time.monotonic()
                if now >= deadline:
                    break
                if each is not None and sent / each > now - t0:
                    time.sleep(sent / each - (now - t0))
        t1, c1 = time.monotonic(), _cpu_seconds()
        sh.put[i] = sent
        sh.done[i] = 1
        fsyncs = q.stats()["fsyncs"] - f0
    return {"put": sent, "t0": t0, "t1": t1, "cpu": c1 - c0, "fsyncs": fsyncs}


def _consumer(j: int, p: Params, qdir: str, sh: _Shared, start: Any, target: int) -> dict[str, Any]:
    """Consume until every record is acked: ``target`` of them (consume),
    or, when ``target`` is 0 (e2e), as many as the producers put once they
    are all done."""
    every, interval = p.commit_every, p.effective_commit_interval
    lat = array("d")
    pending: list[int] = []            # put timestamps (ns) of acks not yet committed
    commits = 0
    with logq.open(qdir, **p.queue_options()) as q:
        with q.consumer(GROUP, commit_every=_COMMIT_OFF, commit_interval=_INTERVAL_OFF,
                        visibility_timeout=_VISIBILITY) as c:
            get, get_many, ack, ack_many = c.get, c.get_many, c.ack, c.ack_many
            size = p.payload
            sh.ready[sh.producers + j] = 1
            start.wait()
            c0, t0 = _cpu_seconds(), time.monotonic()
            deadline = t0 + p.duration if p.duration and target else math.inf
            last_commit = t0
            acked = bad = rounds = 0
            while True:
                if p.batch == 1:
                    try:
                        m = get(timeout=_IDLE_GET)
                    except logq.Empty:
                        ms = []
                    else:
                        ack(m)
                        ms = [m]
                else:
                    ms = get_many(p.batch, timeout=_IDLE_GET)
                    if ms:
                        ack_many(ms)
                rounds += 1
                if ms:
                    bad += sum(len(m.data) != size for m in ms)
                    pending.extend(map(_TS, ms))
                    acked += len(ms)
                    sh.acked[j] = acked
                now = time.monotonic()
                finished = False
                # (the shared counters are summed now and then, and whenever the queue looks empty)
                if not ms or rounds % 32 == 0 or (target and acked >= target):
                    if target:
                        finished = sum(sh.acked) >= target or now >= deadline
                    else:
                        put, producers_done = sh.all_put()
                        finished = producers_done and sum(sh.acked) >= put
                if pending and (finished or len(pending) >= every or now - last_commit >= interval):
                    c.commit()
                    at = time.time_ns()
                    lat.extend([(at - t) / 1e9 for t in pending])
                    pending = []
                    commits += 1
                    last_commit = time.monotonic()
                if finished:
                    break
            t1, c1 = time.monotonic(), _cpu_seconds()
    if bad:
        raise BenchError(f"consumer {j}: {bad} messages came back with the wrong length")
    return {"acked": acked, "t0": t0, "t1": t1, "cpu": c1 - c0, "commits": commits, "lat": lat}


# -- the parent ------------------------------------------------------------------------------------
def _context() -> Any:
    """forkserver where there is one (children start fast from a server that
    has logq imported), spawn elsewhere: never a bare fork of a process with
    threads (and queues) of its own."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["logq.bench"])
        return ctx
    return multiprocessing.get_context("spawn")


def _child_call(fn: Callable[..., Any], args: tuple, conn: Any) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException:   # noqa: BLE001 - the parent reports it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _in_child(ctx: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a child process (so that what it maps and allocates
    does not count in this process's peak RSS); its result."""
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_call, args=(fn, args, w), daemon=True, name=f"logq-bench-{fn.__name__}")
    proc.start()
    w.close()
    try:
        try:
            kind, value = r.recv()
        except EOFError:
            proc.join()
            raise BenchError(f"{fn.__name__} died (exit code {proc.exitcode})") from None
    finally:
        proc.join()
        r.close()
    if kind == "error":
        raise BenchError(f"{fn.__name__} failed:\n{value}")
    return value


def _proc_usage() -> dict[int, tuple[float, int]]:
    """{pid: (CPU seconds, peak RSS bytes)} of every descendant of this
    process, from /proc; {} where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rindex(b")") + 2:].split()       # (the command name may hold anything)
        stats[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / tick)
    mine: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - mine
        mine |= frontier
    out = {}
    for pid in mine:
        hwm = 0
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmHWM:"):
                        hwm = int(line.split()[1]) * 1024
        except OSError:
            continue
        out[pid] = (stats[pid][1], hwm)
    return out


class _Children:
    """The producer and consumer processes of one run: start them, wait
    until they are ready, start them all at once, collect their figures."""

    def __init__(self, ctx: Any, p: Params, qdir: str, producers: int, consumers: int,
                 consume_target: int) -> None:
        self.sh = _Shared(ctx, producers, consumers)
        self.start_event = ctx.Event()
        self.members: list[tuple[tuple[str, int], Any, Any]] = []     # ((role, i), process, pipe)
        self.results: dict[tuple[str, int], dict[str, Any]] = {}
        roles = [("producer", i, p.messages) for i in range(producers)] + \
                [("consumer", j, consume_target) for j in range(consumers)]
        try:
            for role, i, target in roles:
                r, w = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child_main, name=f"logq-bench-{role}-{i}", daemon=True,
                                   args=(role, i, p, qdir, self.sh, self.start_event, target, w))
                self.members.append(((role, i), proc, r))
                proc.start()
                w.close()
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> set[int]:
        return {proc.pid for _, proc, _ in self.members if proc.pid}

    def wait_ready(self) -> None:
        limit = time.monotonic() + STALL_SECONDS
        while not all(self.sh.ready):
            self.poll(_POLL)
            if time.monotonic() > limit:
                raise BenchError(f"the benchmark's processes did not start within {STALL_SECONDS:.0f} s")

    def go(self) -> float:
        t = time.monotonic()
        self.start_event.set()
        return t

    def poll(self, timeout: float) -> None:
        """Collect what children sent (waiting up to ``timeout``); raise if
        one failed or died without reporting."""
        pipes = {r: who for who, _, r in self.members if who not in self.results}
        live = {proc.sentinel: (who, proc) for who, proc, _ in self.members
                if who not in self.results and proc.exitcode is None}
        if not pipes and not live:
            time.sleep(timeout)
            return
        for ready in wait_for(list(pipes) + list(live), timeout):
            if ready in pipes:
                self._receive(pipes[ready], ready)
        for who, proc, r in self.members:
            if who not in self.results and proc.exitcode is not None:
                if r.poll():
                    self._receive(who, r)
                if who not in self.results:
                    raise BenchError(f"{who[0]} {who[1]} died (exit code {proc.exitcode}) before it "
                                     "reported (its output, if any, is above)")

    def _receive(self, who: tuple[str, int], r: Any) -> None:
        try:
            msg = r.recv()
        except (EOFError, OSError):
            return          # it died: poll() says so
        if "error" in msg:
            raise BenchError(f"{who[0]} {who[1]} failed:\n{msg['error']}")
        self.results[who] = msg

    def finished(self) -> bool:
        return len(self.results) == len(self.members)

    def of(self, role: str) -> list[dict[str, Any]]:
        return [v for (r, _), v in sorted(self.results.items()) if r == role]

    def close(self) -> None:
        for _, proc, r in self.members:
            if proc.pid is not None:
                proc.join(5 if proc.exitcode is None and self.finished() else 0)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            r.close()


def _prefill(qdir: str, p: Params, n: int) -> None:
    payload = b"x" * p.payload
    with logq.open(qdir, fsync="never") as q:
        q.consumer(GROUP).close()      # the group exists before the consumers race to make it
        for i in range(0, n, 1000):
            q.put_many([payload] * min(1000, n - i))


def _drive(ch: _Children, progress: Callable[[float], None], fraction: Callable[[], float],
           done: Callable[[], bool], poll: float = _POLL) -> None:
    """Wait for the run to end, reporting its progress; abandon it when
    nothing moves for STALL_SECONDS."""
    last, moved = -1.0, time.monotonic()
    while not done():
        ch.poll(poll)
        f = fraction()
        progress(f)
        if f != last:
            last, moved = f, time.monotonic()
        elif time.monotonic() - moved > STALL_SECONDS:
            raise BenchError(f"no progress for {STALL_SECONDS:.0f} s (at {f:.0%})")


def _usage(ch: _Children, before: dict[int, tuple[float, int]], after: dict[int, tuple[float, int]],
           cpu_self: float, reports: list[dict[str, Any]]) -> tuple[float, int]:
    """(CPU seconds, largest peak RSS) of the window: this process, the
    children (as they measured themselves), and other descendants (pool
    workers; from /proc)."""
    others = [pid for pid in after if pid not in ch.pids]
    cpu = cpu_self + sum(r["cpu"] for r in reports) + \
        sum(after[pid][0] - before.get(pid, (0.0, 0))[0] for pid in others)
    rss = max([r["rss"] for r in reports] + [after[pid][1] for pid in others] + [0])
    return cpu, rss


def _run_children(p: Params, qdir: str, ctx: Any, progress: Callable[[float], None]) -> dict[str, Any]:
    """produce, consume and e2e: the children do the work."""
    producers = 0 if p.workload == "consume" else p.producers
    consumers = 0 if p.workload == "produce" else p.consumers
    if p.workload == "consume":
        _in_child(ctx, _prefill, qdir, p, p.messages)
    elif consumers:
        _in_child(ctx, _prefill, qdir, p, 0)
    ch = _Children(ctx, p, qdir, producers, consumers, p.messages if p.workload == "consume" else 0)
    sh = ch.sh
    try:
        ch.wait_ready()
        before = _proc_usage()
        c0 = _cpu_seconds()
        t0 = ch.go()

        def fraction() -> float:
            f = (sum(sh.acked) if consumers else sum(sh.put)) / p.messages
            if p.duration:
                f = max(f, (time.monotonic() - t0) / p.duration)
            return min(f, 1.0)
        _drive(ch, progress, fraction, ch.finished)
        c1 = _cpu_seconds()
        after = _proc_usage()
    finally:
        ch.close()
    prods, cons = ch.of("producer"), ch.of("consumer")
    cpu, rss = _usage(ch, before, after, c1 - c0, prods + cons)
    return {"t0": t0, "t1": max(r["t1"] for r in (cons or prods)),
            "put": sum(r["put"] for r in prods) if prods else p.messages,
            "acked": sum(r["acked"] for r in cons), "fsyncs": sum(r["fsyncs"] for r in prods),
            "commits": sum(r["commits"] for r in cons), "cpu": cpu, "rss_children": rss,
            # (a pre-filled queue's put -> commit latency is how long it waited: not reported)
            "lat": sorted(itertools.chain.from_iterable(r["lat"] for r in cons)) if p.workload == "e2e" else None}


def _durable_acks(q: logq.Queue) -> int:
    return q.stats()["groups"].get(GROUP, {}).get("acked", 0)


def _run_pool(p: Params, qdir: str, ctx: Any, progress: Callable[[float], None]) -> dict[str, Any]:
    """pool: producers in child processes, the WorkerPool in a thread of
    this process.  The clock stops when the group's durable acked count
    (read from the index) says that every message was committed."""
    warm = p.workers
    _in_child(ctx, _prefill, qdir, p, warm)
    pool = logq.WorkerPool(qdir, "logq.bench:noop", group=GROUP, workers=p.workers,
                           commit_every=p.commit_every, commit_interval=p.effective_commit_interval,
                           queue_options=p.queue_options(), visibility_timeout=_VISIBILITY)
    # The pool keeps the latencies of its last 20,000 commits (for its
    # stats); the run's percentiles need every one.
    samples = getattr(pool, "_latencies", None)
    if samples is not None:
        samples = pool._latencies = collections.deque()
    box: dict[str, Any] = {}

    def host() -> None:
        try:
            box["stats"] = pool.run()
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    def alive() -> None:
        if not thread.is_alive():
            e = box.get("error")
            raise BenchError(f"the pool stopped: {e!r}" if e else "the pool stopped early") from e

    thread = threading.Thread(target=host, name="logq-bench-pool", daemon=True)
    ch = q = None
    thread.start()
    try:
        # Warm up: the workers run, and the warm-up messages are committed
        # (and their latencies recorded) before the clock starts.
        limit = time.monotonic() + STALL_SECONDS
        while True:
            st = pool.stats()
            if st.processed >= warm and st.commits >= 1 and (samples is None or len(samples) >= warm):
                break
            alive()
            if time.monotonic() > limit:
                raise BenchError(f"the pool did not process {warm} warm-up messages in {STALL_SECONDS:.0f} s")
            time.sleep(0.01)
        commits0 = st.commits
        # (opened only now that the pool's own queue and consumer are open:
        # see the report on _index._close_shared)
        q = logq.open(qdir)            # only reads the group's durable state
        ch = _Children(ctx, p, qdir, p.producers, 0, 0)
        sh = ch.sh
        ch.wait_ready()
        before = _proc_usage()
        c0 = _cpu_seconds()
        t0 = ch.go()
        durable = [0]

        def fraction() -> float:
            alive()
            durable[0] = _durable_acks(q) - warm
            f = durable[0] / p.messages
            if p.duration:
                f = max(f, (time.monotonic() - t0) / p.duration)
            return min(f, 1.0)

        def done() -> bool:
            put, finished = sh.all_put()
            return finished and ch.finished() and durable[0] >= put
        _drive(ch, progress, fraction, done, poll=0.005)
        t1 = time.monotonic()
        c1 = _cpu_seconds()
        after = _proc_usage()
    finally:
        pool.stop()
        thread.join()
        if q is not None:
            q.close()
        if ch is not None:
            ch.close()
    if "error" in box:
        raise BenchError(f"the pool failed: {box['error']!r}") from box["error"]
    st = box["stats"]
    prods = ch.of("producer")
    cpu, rss = _usage(ch, before, after, c1 - c0, prods)
    lat = sorted(list(samples)[warm:]) if samples is not None else None
    return {"t0": t0, "t1": t1, "put": sum(r["put"] for r in prods), "acked": st.processed - warm,
            "fsyncs": sum(r["fsyncs"] for r in prods), "commits": st.commits - commits0, "cpu": cpu,
            "rss_children": rss, "lat": lat, "pool_stats": st, "warm": warm}


def _verify(qdir: str, p: Params, out: dict[str, Any]) -> str:
    """What the queue says against what the run counted: "ok" or the discrepancy."""
    warm = out.get("warm", 0)
    with logq.open(qdir) as q:
        st = q.stats()
    problems = []
    # (offsets are dense from 0; retention may have deleted settled segments)
    if st["next_offset"] != out["put"] + warm or st["lost_records"]:
        problems.append(f"the queue's next offset is {st['next_offset']} ({st['lost_records']} records "
                        f"lost), {out['put'] + warm} were put")
    if p.workload != "produce":
        g = st["groups"].get(GROUP, {})
        bounded = p.workload == "consume" and p.duration     # consumers may stop before the end
        if out["acked"] != out["put"] and not (bounded and out["acked"] < out["put"]):
            problems.append(f"{out['acked']} acked of {out['put']} put")
        if g.get("acked") != out["acked"] + warm or g.get("backlog") != out["put"] - out["acked"]:
            problems.append(f"the group's durable state says {g.get('acked')} acked, backlog "
                            f"{g.get('backlog')}; the run acked {out['acked'] + warm} of {out['put'] + warm}")
        ps = out.get("pool_stats")
        if ps is not None and (ps.failed or ps.worker_deaths):
            problems.append(f"pool: {ps.failed} handler failures, {ps.worker_deaths} worker deaths")
    return "; ".join(problems) or "ok"


def run_one(p: Params, base: str, floors: Floors, ctx: Any | None = None,
            progress: Callable[[float], None] = lambda f: None, name: str = "") -> RunResult:
    """Run ``p`` on a new queue under ``base`` (removed afterwards)."""
    ctx = ctx or _context()
    qdir = tempfile.mkdtemp(prefix=f"{p.workload}-", dir=base)
    try:
        out = _run_pool(p, qdir, ctx, progress) if p.workload == "pool" else \
            _run_children(p, qdir, ctx, progress)
        check = _verify(qdir, p, out)
    finally:
        shutil.rmtree(qdir, ignore_errors=True)
    secs = max(out["t1"] - out["t0"], 1e-9)
    n = out["put"] if p.workload == "produce" else out["acked"]
    fname, frate = floors.for_run(p)
    rate = n / secs
    r = RunResult(
        name=name or p.workload, workload=p.workload, params=p,
        messages_put=out["put"], messages_consumed=out["acked"], seconds=secs,
        msgs_per_s=rate, mb_per_s=rate * p.payload / 1e6,
        fsyncs=out["fsyncs"], fsyncs_per_s=out["fsyncs"] / secs,
        records_per_fsync=out["put"] / out["fsyncs"] if out["fsyncs"] else None,
        commits=out["commits"], cpu_percent=100 * out["cpu"] / secs,
        rss_parent_mb=_maxrss_bytes() / 2**20, rss_children_mb=out["rss_children"] / 2**20,
        floor=fname, floor_msgs_per_s=frate, ratio=rate / frate if frate else 0.0, check=check)
    lat = out["lat"]
    if lat:
        r.latency_p50_ms, r.latency_p99_ms, r.latency_p999_ms = (
            _percentile(lat, q) * 1e3 for q in (0.50, 0.99, 0.999))
        r.latency_samples = len(lat)
    elif "pool_stats" in out and out["pool_stats"].latency_p50 is not None:
        st = out["pool_stats"]                      # the pool's last 20,000 commits
        r.latency_p50_ms, r.latency_p99_ms = st.latency_p50 * 1e3, st.latency_p99 * 1e3
    return r


# -- peers ---------------------------------------------------------------------------------------
# SQLite's synchronous level closest to each logq policy.  In WAL mode FULL
# syncs the WAL at every commit; NORMAL only at checkpoints (a commit
# survives the death of the process, a power cut may lose the newest); OFF never.
_SQLITE_SYNC = {"always": "FULL", "batch": "NORMAL", "never": "OFF"}
_RAW = types.SimpleNamespace(dumps=bytes, loads=bytes)     # persist-queue: store the bytes as they are


class _Peer:
    """A peer queue: how to open it at the durability closest to a logq
    policy (and how to say so), put one message, take one (get + ack)."""
    name = ""
    module = ""
    kind = ""

    def durability(self, fsync: str) -> str:
        raise NotImplementedError

    def open(self, path: str, fsync: str) -> Any:
        raise NotImplementedError

    def put(self, h: Any, data: bytes) -> None:
        raise NotImplementedError

    def take(self, h: Any) -> bytes | None:
        """Get and acknowledge one message; None when empty."""
        raise NotImplementedError

    def close(self, h: Any) -> None:
        h.close()


class _PersistQueue(_Peer):
    name, module, kind = "persist-queue", "persistqueue", "SQLiteAckQueue"
    CLEAR_EVERY = 1000     # acked rows stay (and slow get()) until clear_acked_data(): its own remedy

    def durability(self, fsync: str) -> str:
        return (f"SQLiteAckQueue, auto_commit=True (a transaction per put, get and ack), "
                f"sqlite WAL, synchronous={_SQLITE_SYNC[fsync]}; clear_acked_data() every {self.CLEAR_EVERY}")

    def open(self, path: str, fsync: str) -> Any:
        from persistqueue import SQLiteAckQueue
        h = SQLiteAckQueue(path, serializer=_RAW, auto_commit=True, multithreading=False)
        h._conn.execute(f"PRAGMA synchronous={_SQLITE_SYNC[fsync]}")
        h.bench_taken = 0
        return h

    def put(self, h: Any, data: bytes) -> None:
        h.put(data)

    def take(self, h: Any) -> bytes | None:
        import persistqueue
        try:
            item = h.get(block=False)
        except persistqueue.Empty:
            return None
        h.ack(item)
        h.bench_taken += 1
        if h.bench_taken % self.CLEAR_EVERY == 0:
            h.clear_acked_data()
        return item


class _LiteQueue(_Peer):
    name, module, kind = "litequeue", "litequeue", "LiteQueue"

    def durability(self, fsync: str) -> str:
        return (f"LiteQueue, autocommit (a transaction per put, pop and done), "
                f"sqlite WAL, synchronous={_SQLITE_SYNC[fsync]}")

    def open(self, path: str, fsync: str) -> Any:
        from litequeue import LiteQueue
        os.makedirs(path, exist_ok=True)
        h = LiteQueue(os.path.join(path, "queue.sqlite3"))
        h.conn.execute(f"PRAGMA synchronous={_SQLITE_SYNC[fsync]}")
        return h

    def put(self, h: Any, data: bytes) -> None:
        h.put(data)

    def take(self, h: Any) -> bytes | None:
        m = h.pop()
        if m is None:
            return None
        h.done(m.message_id)
        return m.data

    def close(self, h: Any) -> None:
        h.conn.close()


class _DiskCache(_Peer):
    name, module, kind = "diskcache", "diskcache", "Deque"
    _LEVEL = {"FULL": 2, "NORMAL": 1, "OFF": 0}

    def durability(self, fsync: str) -> str:
        return (f"Deque over Cache(sqlite_synchronous={self._LEVEL[_SQLITE_SYNC[fsync]]}: "
                f"{_SQLITE_SYNC[fsync]}), sqlite WAL, a transaction per append and per popleft "
                "(popleft is get+ack; values >= 32 KiB go to files it does not fsync)")

    def open(self, path: str, fsync: str) -> Any:
        from diskcache import Cache, Deque
        cache = Cache(path, eviction_policy="none", sqlite_synchronous=self._LEVEL[_SQLITE_SYNC[fsync]])
        return Deque.fromcache(cache)

    def put(self, h: Any, data: bytes) -> None:
        h.append(data)

    def take(self, h: Any) -> bytes | None:
        try:
            return h.popleft()
        except IndexError:
            return None

    def close(self, h: Any) -> None:
        h.cache.close()


class _Queuelib(_Peer):
    name, module, kind = "queuelib", "queuelib", "FifoSQLiteQueue / FifoDiskQueue"

    def durability(self, fsync: str) -> str:
        if fsync == "always":
            return ("FifoSQLiteQueue, a transaction per push and per pop (pop is get+ack), "
                    "sqlite rollback journal, synchronous=FULL")
        if fsync == "batch":
            return ("FifoSQLiteQueue, a transaction per push and per pop (pop is get+ack), "
                    "sqlite WAL, synchronous=NORMAL")
        return ("FifoDiskQueue: one os.write per push, never fsyncs "
                "(its read and write positions are saved only at close)")

    def open(self, path: str, fsync: str) -> Any:
        from queuelib import queue as qq
        if fsync == "never":
            return qq.FifoDiskQueue(path)
        os.makedirs(path, exist_ok=True)
        h = qq.FifoSQLiteQueue(os.path.join(path, "queue.sqlite3"))
        if fsync == "batch":
            h._db.execute("PRAGMA journal_mode=WAL")
        h._db.execute(f"PRAGMA synchronous={_SQLITE_SYNC[fsync]}")
        return h

    def put(self, h: Any, data: bytes) -> None:
        h.push(data)

    def take(self, h: Any) -> bytes | None:
        return h.pop()


PEERS: dict[str, _Peer] = {pe.name: pe for pe in (_PersistQueue(), _Queuelib(), _LiteQueue(), _DiskCache())}


def parse_peers(text: str) -> list[str]:
    """``a,b,...`` or ``all`` -> peer names; ValueError naming an unknown one."""
    names = list(PEERS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no peer named in {text!r}: one or more of {', '.join(PEERS)}, or all")
    for n in names:
        if n not in PEERS:
            raise ValueError(f"unknown peer {n!r}: one of {', '.join(PEERS)}, or all")
    return list(dict.fromkeys(names))


def _peer_main(name: str, p: Params, path: str, conn: Any) -> None:
    """In a child process: put up to ``p.messages`` one by one, then take
    them back one by one, each phase stopping after ``p.duration`` (or
    PEER_PHASE_SECONDS); send the figures."""
    peer = PEERS[name]
    try:
        try:
            importlib.import_module(peer.module)
        except ImportError as e:
            conn.send({"missing": f"{type(e).__name__}: {e}"})
            return
        limit = p.duration or PEER_PHASE_SECONDS
        payload = b"x" * p.payload
        h = peer.open(path, p.fsync)
        try:
            put = peer.put
            c0, t0 = _cpu_seconds(), time.monotonic()
            deadline, n = t0 + limit, 0
            while n < p.messages:
                put(h, payload)
                n += 1
                if n % 64 == 0 and time.monotonic() >= deadline:
                    break
            t1, c1 = time.monotonic(), _cpu_seconds()
            take = peer.take
            got = bad = 0
            deadline = t1 + limit
            while got < n:
                item = take(h)
                if item is None:
                    raise BenchError(f"{name} came back empty after {got} of {n} messages")
                bad += item != payload
                got += 1
                if got % 64 == 0 and time.monotonic() >= deadline:
                    break
            t2, c2 = time.monotonic(), _cpu_seconds()
        finally:
            peer.close(h)
        if bad:
            raise BenchError(f"{name} gave back {bad} wrong payloads")
        try:
            from importlib.metadata import version
            ver = version(name)
        except Exception:  # noqa: BLE001 - only shown beside the figures
            ver = ""
        conn.send({"put": n, "got": got, "produce": (t1 - t0, c1 - c0), "consume": (t2 - t1, c2 - c1),
                   "rss": _maxrss_bytes(), "version": ver})
    except BaseException:   # noqa: BLE001 - the parent reports it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_peer(name: str, p: Params, base: str, floors: Floors, ctx: Any | None = None) -> list[PeerResult]:
    """The peer's produce and consume rows for ``p`` (payload, fsync,
    messages, duration), or one row saying it is not installed."""
    peer = PEERS[name]
    ctx = ctx or _context()
    durability = peer.durability(p.fsync)
    missing = PeerResult(name, peer.kind, "-", p.payload, p.fsync, durability, installed=False)
    if importlib.util.find_spec(peer.module) is None:
        missing.note = f"not installed (pip install {name}, or logq[compare])"
        return [missing]
    path = tempfile.mkdtemp(prefix=f"peer-{name}-", dir=base)
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peer_main, args=(name, p, os.path.join(path, "q"), w),
                       name=f"logq-bench-peer-{name}", daemon=True)
    try:
        proc.start()
        w.close()
        limit = 2 * (p.duration or PEER_PHASE_SECONDS) + STALL_SECONDS
        if not r.poll(limit):
            raise BenchError(f"peer {name} did not finish within {limit:.0f} s")
        try:
            msg = r.recv()
        except EOFError:
            proc.join()
            raise BenchError(f"peer {name} died (exit code {proc.exitcode}) before it reported") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        r.close()
        shutil.rmtree(path, ignore_errors=True)
    if "missing" in msg:
        missing.note = f"not installed: {msg['missing']}"
        return [missing]
    if "error" in msg:
        raise BenchError(f"peer {name} failed:\n{msg['error']}")
    pf = floors.by_payload[p.payload]
    out = []
    for phase, n in (("produce", msg["put"]), ("consume", msg["got"])):
        secs, cpu = msg[phase]
        secs = max(secs, 1e-9)
        if phase == "consume":
            fname, frate = "mmap slice loop", pf.slices
        elif p.fsync == "always":
            fname, frate = "1 / fdatasync", 1 / floors.fdatasync
        else:
            fname, frate = "os.write per record", pf.write
        rate = n / secs
        out.append(PeerResult(name, peer.kind, phase, p.payload, p.fsync, durability, True, n, secs, rate,
                              rate * p.payload / 1e6, fname, frate, rate / frate if frate else 0.0,
                              cpu_percent=100 * cpu / secs, rss_mb=msg["rss"] / 2**20,
                              version=msg.get("version", "")))
    return out


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


def _meta(base: str) -> dict[str, Any]:
    return {"logq_version": logq.__version__, "native": logq.native_enabled(),
            "codec": "native" if logq.native_enabled() else "pure-Python",
            "python": platform.python_version(),
            "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
            "cpus": os.cpu_count(), "dir": os.path.dirname(base) or base,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# -- output ----------------------------------------------------------------------------------------
def _num(v: float | None, digits: int = 3) -> str:
    """A figure to about ``digits`` significant digits, with thousands separators."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:,.0f}"
    return f"{v:,.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


def _si(v: float) -> str:
    for div, unit in ((1e6, " M"), (1e3, " k")):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _table(rows: list[list[str]], left: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _fixed_text(fixed: dict[str, Any]) -> str:
    parts = []
    for k, v in fixed.items():
        if v is None:
            v = {"commit_interval": "library default", "rate": "unpaced", "duration": "none"}.get(k, "-")
        elif k in ("payload", "fsync_bytes"):
            v = _bytes(v)
        elif k in ("fsync_interval", "commit_interval", "duration"):
            v = f"{v:g} s"
        elif k == "rate":
            v = f"{v:,.0f} msgs/s"
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def format_report(report: Report) -> str:
    """The tables: a header with the machine and the floors, one row per
    run, then the peers."""
    m, fl = report.meta, report.floors
    out = [f"logq {m['logq_version']} ({m['codec']} codec), Python {m['python']}, {m['machine']}, "
           f"{m['cpus']} CPUs; queues in {m['dir']}"]
    out.append(f"floors (same run): fdatasync {fl.fdatasync * 1e6:,.0f} us (4 KiB in place, preallocated) "
               f"= {_si(1 / fl.fdatasync)}/s")
    for pf in fl.by_payload.values():
        out.append(f"  {pf.payload} B records: os.write per record {_si(pf.write)}/s, "
                   f"joined 1 MiB writes {_si(pf.joined)}/s, mmap slice loop {_si(pf.slices)}/s")
    out.append(f"fixed: {_fixed_text(report.fixed)}")
    out.append("ratio = msgs/s / floor (same run); latency = put -> the commit that made the ack durable; "
               "CPU % of one CPU, this process and its children")
    out.append("")
    swept = [n for n, _ in report.sweeps]
    head = ["workload"] + swept + ["msgs/s", "MB/s", "floor", "floor/s", "ratio", "p50 ms", "p99 ms",
                                   "p99.9 ms", "fsyncs/s", "recs/fsync", "commits", "CPU %", "RSS MB", "check"]
    rows = [head]
    for r in report.results:
        rows.append([r.workload] + [str(getattr(r.params, n)) for n in swept] + [
            f"{r.msgs_per_s:,.0f}", _num(r.mb_per_s), r.floor, _si(r.floor_msgs_per_s), _num(r.ratio),
            _num(r.latency_p50_ms), _num(r.latency_p99_ms), _num(r.latency_p999_ms),
            _num(r.fsyncs_per_s), _num(r.records_per_fsync), str(r.commits), _num(r.cpu_percent),
            f"{r.rss_parent_mb:.0f}/{r.rss_children_mb:.0f}", r.check])
    out += _table(rows, {0, 1 + len(swept) + 2, len(head) - 1} | set(range(1, 1 + len(swept))))
    out.append("RSS MB: peak of this process / of its largest child")
    if report.peers:
        out.append("")
        out.append(f"peers: the same payloads put one by one, then taken back one by one, in one process; "
                   f"each phase stops after the messages or {PEER_PHASE_SECONDS:g} s (--duration)")
        rows = [["peer", "fsync", "workload", "messages", "msgs/s", "MB/s", "floor", "ratio", "logq/peer",
                 "durability setting (closest to logq's fsync policy)"]]
        for pr in report.peers:
            if not pr.installed:
                rows.append([pr.peer, pr.fsync, "-", "-", "-", "-", "-", "-", "-", pr.note])
                continue
            rows.append([f"{pr.peer} {pr.version}".strip(), pr.fsync, pr.workload, f"{pr.messages:,}", f"{pr.msgs_per_s:,.0f}",
                         _num(pr.mb_per_s), pr.floor, _num(pr.ratio), _num(pr.logq_vs_peer), pr.durability])
        out += _table(rows, {0, 1, 2, 6, 9})
    if report.failed:
        out.append("")
        for r in report.failed:
            out.append(f"CHECK FAILED: {r.name}: {r.check}")
    return "\n".join(out)


def as_json(report: Report) -> dict[str, Any]:
    return report.as_dict()


def write_csv(report: Report, path: str) -> None:
    """One row per run (then per peer phase), every field a column."""
    rows = [r.as_dict() for r in report.results] + [p.as_dict() for p in report.peers]
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def plot(report: Report, path: str) -> None:
    """Throughput and put->commit latency against the (first) swept
    parameter, one line per workload (and per value of the second sweep).
    Needs matplotlib (``pip install 'logq[plot]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"--plot needs matplotlib: pip install 'logq[plot]' ({e})") from None
    swept = [n for n, _ in report.sweeps]
    xname = swept[0] if swept else "workload"
    xs = report.sweeps[0][1] if swept else list(dict.fromkeys(r.workload for r in report.results))
    numeric = bool(swept) and all(isinstance(v, (int, float)) for v in xs)
    pos = {v: (v if numeric else i) for i, v in enumerate(xs)}
    series: dict[str, list[RunResult]] = {}
    for r in report.results:
        key = r.workload if not swept else r.workload + (
            f", {swept[1]}={getattr(r.params, swept[1])}" if len(swept) > 1 else "")
        series.setdefault(key if swept else "logq", []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    m, fl = report.meta, report.floors
    lines = [f"logq bench: {m['codec']} codec, {m['machine']}, {m['cpus']} CPUs; fdatasync "
             f"{fl.fdatasync * 1e6:,.0f} us. Fixed:"]
    for item in _fixed_text(report.fixed).split(", "):       # wrapped between items, not inside one
        if len(lines[-1]) + len(item) > 140:
            lines.append("")
        lines[-1] += (" " if lines[-1] else "") + item + ","
    fig.suptitle("\n".join(lines).rstrip(","), fontsize=9)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (key, rs) in enumerate(series.items()):
        color = colors[k % len(colors)]
        xv = [pos[getattr(r.params, xname) if swept else r.workload] for r in rs]
        ax1.plot(xv, [r.msgs_per_s for r in rs], "o-", color=color, label=key)
        with_lat = [(x, r) for x, r in zip(xv, rs) if r.latency_p50_ms is not None]
        if with_lat:
            ax2.plot([x for x, _ in with_lat], [r.latency_p50_ms for _, r in with_lat], "o-", color=color,
                     label=f"{key} p50")
            ax2.plot([x for x, _ in with_lat], [r.latency_p99_ms for _, r in with_lat], "s--", color=color,
                     alpha=0.7, label=f"{key} p99")
    for ax, title, unit in ((ax1, "throughput", "messages/s"), (ax2, "put -> commit latency", "ms")):
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xlabel(xname)
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y and y > 0]
        if ys and max(ys) / min(ys) >= 10:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=max(ys or [1]) * 1.1)     # (a narrow range: a log axis exaggerates it)
        ax.grid(True, which="both", alpha=0.3)
        if numeric:
            if min(xs) > 0 and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in xs])
        else:
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(v) for v in xs])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not ax2.get_lines():
        ax2.text(0.5, 0.5, "no latency: e2e and pool runs measure it", ha="center", va="center",
                 transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

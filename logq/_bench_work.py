"""logq's workloads in ``logq bench`` (``bench``): produce, consume, e2e and
pool, each on a new queue, with every producer and consumer a process of
its own; :func:`run_one` runs one :class:`Params` point, checks what it
measured against what the queue says, and returns its :class:`RunResult`."""

from __future__ import annotations

import collections
import itertools
import math
import shutil
import tempfile
import threading
import time
import traceback
from array import array
from multiprocessing.connection import wait as wait_for
from operator import attrgetter
from typing import Any, Callable

import logq
from logq._bench_floors import Floors
from logq._bench_params import STALL_SECONDS, BenchError, Params
from logq._bench_procs import _context, _cpu_seconds, _in_child, _maxrss_bytes, _proc_usage
from logq._bench_report import RunResult

GROUP = "bench"
_POLL = 0.05                     # the parent looks at its children this often (s)
_IDLE_GET = 0.005                # consumers: longest get wait before they look whether the run is over
_COMMIT_OFF = 1 << 30            # consumers: the group's own commit triggers, switched off
_INTERVAL_OFF = 1e8
_VISIBILITY = 600.0              # leases long enough that nothing is redelivered in a run
_TS = attrgetter("ts_ns")


def _percentile(sorted_values: Any, q: float) -> float | None:
    n = len(sorted_values)
    if not n:
        return None
    return sorted_values[min(n - 1, int(q * n))]


# -- child processes -----------------------------------------------------------------------------
def noop(message: Any) -> None:
    """The pool workload's handler: does nothing (``logq._bench_work:noop``)."""


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
    pool = logq.WorkerPool(qdir, "logq._bench_work:noop", group=GROUP, workers=p.workers,
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
        if p.workload == "tasks":
            from logq import _bench_tasks     # (imports logq.tasks: only for this workload)
            out = _bench_tasks.run(p, qdir, ctx, progress)
            check = _bench_tasks.verify(qdir, out)
        else:
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
            _percentile(lat, q) * 1e3 for q in (0.50, 0.99, 0.999))  # type: ignore[operator]
        r.latency_samples = len(lat)
    elif "pool_stats" in out and out["pool_stats"].latency_p50 is not None:
        st = out["pool_stats"]                      # the pool's last 20,000 commits
        r.latency_p50_ms, r.latency_p99_ms = st.latency_p50 * 1e3, st.latency_p99 * 1e3
    return r

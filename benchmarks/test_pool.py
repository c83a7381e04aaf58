"""logq.WorkerPool: a handler run in worker processes on every message of a
consumer group, beside a naive baseline measured in the same run.

1. No-op handler, 100 B messages, 2 workers (a 2-core machine): end-to-end
   msgs/s, from the first message offered until the group's *durable*
   acked count (``q.stats()["groups"]``, read from the index) says that
   all of them were committed.  Two cases, NOOP_ROUNDS rounds of each for
   each batch_size (the pool's adaptive default, 100, 500, 2000):

   * a producer in another process putting concurrently (a put() per
     message, as fast as it can), the pool started and warm (every worker
     has handled messages) before the clock starts;
   * a pre-filled queue, timed from ``pool.start()`` (worker start-up
     included).

   The best batch_size is the figure; the others are in the note, with the
   rate at which the pool had *processed* (acked, not yet committed) them
   all.  One more round has the producer paced at PACED_RATE, below what
   the pool can do, for the put -> commit latency: ``pool.stats()`` keeps
   the latencies of the last 20,000 commits only, so the latency is read
   from the snapshots that ``on_stats`` gets while the producer runs (at
   the end of any run they would show its last commits only).  And
   NOOP_ROUNDS rounds with the producer putting ``put_many(BASE_CHUNK)``,
   fed as the multiprocessing.Pool peer below is fed (BASE_CHUNK pairs per
   ``mp.Queue.put``): the figure beside that peer.  With a put() per
   message the producer process, not the pool, sets the pace on 2 cores.

2. A handler sleeping 10 ms, 32 workers: msgs/s beside the ideal
   32 / 10 ms = 3,200 msgs/s (target: >= 90 % of it); two rounds with
   batch_size=1 (the figure), one with the adaptive batch size (in the
   note).  Every worker has handled a message before the clock starts; the
   messages are then put at once (put_many, in this process).

3. The baseline, for both: multiprocessing.Pool (2 or 32 workers) fed from
   persist-queue's SQLiteAckQueue (a durable queue in SQLite, WAL), with a
   commit per message: get() of BASE_CHUNK messages (each get a
   transaction), pool.map() of them, then ack() of each (each ack a
   transaction).  (A get -> apply_async -> ack pipeline of single messages
   was slower: its acks contend for the GIL with the Pool's threads.)  It
   runs on a pre-filled queue.  persist-queue is optional: without it the
   baseline is reported as not measured.

The clock stops at the durable commit of the last message.  The pool
commits every ``commit_every`` acks or ``commit_interval`` seconds, so the
last acks of a run wait up to commit_interval (plus the pool's idle wait in
get_many) for their commit: a tail of up to ~0.7 s that a run of a few
seconds feels; the notes give the processed-only rate beside it.

Every round is checked (untimed): the pool processed exactly n messages,
none failed or was retried, no worker died; the group's durable counters
say n acked and delivered once each, nothing redelivered, dead-lettered,
scheduled, in flight or left in the backlog; every worker process is gone
after stop(); the producer put exactly n; the baseline's workers returned
every message id exactly once, its payloads were the ones put, and its
queue holds nothing ready or unacked.  A round whose durable count stops
moving for STALL seconds fails with the pool's and the group's stats.

Worker processes import their handler from pool_bench_handlers.py
(forkserver/spawn: the handler must be importable in a fresh interpreter).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import types
from typing import Any

import bench_helpers as H
import pool_bench_handlers as PH
import psutil
import pytest

import logq

SIZE = 100
NOOP = "pool_bench_handlers:noop"
SLEEPER = "pool_bench_handlers:sleep_10ms"
NOOP_WORKERS = 2
SLEEP_WORKERS = 32
BATCH_SIZES: tuple[int | None, ...] = (None, 100, 500, 2000)   # None: the pool's adaptive size
NOOP_TARGET = 250_000          # msgs/s, no-op, 2 workers
NOOP_ROUNDS = 2                # rounds of each (mode, batch_size)
PACED_RATE = 100_000           # msgs/s offered by the paced producer (the latency round)
PACED_SECONDS = 3              # ... for this long (at least 1.5 s at any scale)
IDEAL_SLEEP = SLEEP_WORKERS / PH.SLEEP      # 3,200 msgs/s
POLL = 0.01                    # how often the clock looks at the group's durable count (s)
STALL = 60.0                   # no durable progress for this long: the round hangs, fail
PIN = "pin"

_ids = itertools.count()

# persist-queue stores what its serializer makes of an item: with this one,
# the payload itself (the default would pickle it).
_RAW = types.SimpleNamespace(dumps=bytes, loads=bytes)
BASE_CHUNK = 256               # baseline: messages got, mapped and acked per step
BASE_CLEAR_EVERY = 1000        # baseline: clear_acked_data() every this many acks (as test_consume.py)
BASE_NOTE = (f"get {BASE_CHUNK} (a SQLite transaction each), pool.map them, ack each (a transaction "
             f"each); clear_acked_data() every {BASE_CLEAR_EVERY:,} acks")


def _n_noop() -> int:
    return H.scaled_multiple(1_000_000, 10_000)


def _n_sleep() -> int:
    return H.scaled_multiple(16_000, SLEEP_WORKERS)


def _n_base_noop() -> int:
    return H.scaled_multiple(5_000, BASE_CHUNK)


def _n_base_sleep() -> int:
    return H.scaled_multiple(3_000, BASE_CHUNK)


def _bs(bs: int | None) -> str:
    return "adaptive" if bs is None else str(bs)


# -- the pool's rounds --------------------------------------------------------------------
PRODUCER = r"""
import os, sys, time
import bench_helpers as H
import logq
path, n, go, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
chunk = int(sys.argv[5])        # 0: a put() per message; else put_many of this many
seq = H.sequence(H.make_pool(100, tag="produce"), n)
q = logq.open(path)
put = q.put
print("ready", flush=True)
os.read(go, 1)                  # the pool is warm: go
t = time.perf_counter()
if rate:                        # paced: 1,000 puts, then sleep until they are due
    for k in range(0, n, 1000):
        for p in seq[k:k + 1000]:
            put(p)
        ahead = t + (k + 1000) / rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
elif chunk:
    for k in range(0, n, chunk):
        q.put_many(seq[k:k + chunk])
else:
    for p in seq:
        put(p)
secs = time.perf_counter() - t
q.close()
print(n, secs, flush=True)
"""


def _forked_workers() -> list[psutil.Process]:
    """The processes that this process's fork server forked (pool workers,
    logq's and multiprocessing.Pool's) and that are still running."""
    out = []
    for child in psutil.Process().children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                out += [p for p in child.children() if p.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_row(q: logq.Queue, group: str) -> dict[str, Any]:
    """The group's durable counters ({} until the pool has created the group)."""
    return q.stats()["groups"].get(group, {})


def _wait_durable(ctx: dict[str, Any], t0: float) -> None:
    """Poll until the group's durable acked count reaches ctx["total"];
    note when the pool had processed them all (in memory) and when they
    were all committed (seconds since t0)."""
    q, group, pool, total = ctx["q"], ctx["group"], ctx["pool"], ctx["total"]
    last, last_at = -1, time.perf_counter()
    processed_at = None
    for i in itertools.count():
        now = time.perf_counter()
        if processed_at is None and not i % 3 and pool.stats().processed >= total:
            processed_at = now - t0
        acked = _group_row(q, group).get("acked", 0)
        if acked >= total:
            ctx["durable_at"] = now - t0
            ctx["processed_at"] = processed_at if processed_at is not None else now - t0
            return
        if acked != last:
            last, last_at = acked, now
        elif now - last_at > STALL:
            raise AssertionError(
                f"the pool hangs: {acked:,} of {total:,} durably acked, no progress for {STALL:.0f}s; "
                f"pool {pool.stats().as_dict()}; group {_group_row(q, group)}")
        time.sleep(POLL)


def _warm(ctx: dict[str, Any], payloads: list[bytes], per_round: int, workers: int) -> None:
    """Put ``per_round`` messages and wait until they are durably acked,
    until every worker has handled some (each worker process started and
    imported its handler)."""
    q, pool = ctx["q"], ctx["pool"]
    batch = H.sequence(payloads, per_round)
    for _ in range(20):
        q.put_many(batch)
        ctx["total"] += per_round
        _wait_durable(ctx, time.perf_counter())
        if len(pool.stats().busy_seconds) >= workers:
            return
    raise AssertionError(f"only {len(pool.stats().busy_seconds)} of {workers} workers ever got "
                         f"work: {pool.stats().as_dict()}")


def _stop_and_check(ctx: dict[str, Any]) -> None:
    """Stop the pool (drain) and check what it did: n processed and
    durably acked once each, nothing else; its workers gone."""
    pool, q, group, total = ctx["pool"], ctx["q"], ctx["group"], ctx["total"]
    st = ctx["stats"] = pool.stop()
    ctx["stopped"] = True
    assert st.processed == total, f"the pool processed {st.processed:,} messages, {total:,} were put"
    assert (st.failed, st.retried, st.dead_lettered, st.timeouts, st.worker_deaths) == (0, 0, 0, 0, 0), st
    assert st.in_flight == 0 and st.waiting == 0, st
    g = q.stats()["groups"][group]
    want = {"acked": total, "delivered": total, "backlog": 0, "in_flight": 0, "scheduled": 0,
            "redelivered": 0, "dead_lettered": 0, "dead_letters": 0, "dropped": 0}
    got = {k: g[k] for k in want}
    assert got == want, f"group {group} after the round: {got}, expected {want}"
    assert q.next_offset == total, f"the queue holds {q.next_offset:,} messages, {total:,} were put"
    pids = list(st.busy_seconds)
    assert len(pids) >= ctx["workers"], f"{len(pids)} workers did work, of {ctx['workers']}"
    deadline = time.monotonic() + 5
    while (any(map(_alive, pids)) or _forked_workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    assert not left, f"worker processes still running 5 s after stop(): {left}"
    others = _forked_workers()
    assert not others, f"processes forked for the pool still running 5 s after stop(): {others}"


def _teardown(ctx: dict[str, Any]) -> None:
    try:
        if not ctx.get("stopped") and "pool" in ctx:
            ctx["stopped"] = True
            errors: list[BaseException] = []

            def stop() -> None:
                try:
                    ctx["pool"].stop(drain=False, timeout=5)
                except BaseException as e:  # noqa: BLE001 - the round already failed; say why
                    errors.append(e)

            t = threading.Thread(target=stop, daemon=True)
            t.start()
            t.join(30)
            if t.is_alive():
                # The pool's loop is stuck (e.g. in a send to a worker that
                # does not read): kill its workers so that it comes loose.
                stuck = _forked_workers()
                print(f"\n[pool] stop() did not return in 30 s; killing {[p.pid for p in stuck]}")
                for p in stuck:
                    p.kill()
                t.join(30)
            if errors:
                print(f"\n[pool] stop() after a failed round raised {errors[0]!r}")
        proc = ctx.get("producer")
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in ctx.get("fds", ()):
            try:
                os.close(fd)
            except OSError:
                pass
    finally:
        ctx["q"].close()
        if ctx.get("own_dir"):
            shutil.rmtree(ctx["q"].path, ignore_errors=True)


# -- the baseline: multiprocessing.Pool + SQLiteAckQueue ------------------------------------
def _baseline(qdir: str, n: int, workers: int, fn: Any) -> dict[str, Any] | None:
    """Fill a new SQLiteAckQueue with n 100 B payloads and start a
    multiprocessing.Pool (untimed; every worker handles a task first), then
    time: get BASE_CHUNK messages (a transaction each), pool.map them,
    ack each (a transaction each).  None without persist-queue."""
    try:
        from persistqueue import SQLiteAckQueue
    except ImportError:
        return None
    path = os.path.join(qdir, f"baseline{next(_ids)}")
    payloads = H.sequence(H.make_pool(SIZE, tag="base"), n)
    pq = SQLiteAckQueue(path, serializer=_RAW, auto_commit=True)
    try:
        for p in payloads:
            pq.put(p)
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in
                                          multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as mp:
            warm = mp.map(fn, [(-1, b"")] * (workers * 2), chunksize=1)
            assert warm == [-1] * (workers * 2)
            got: list[int] = []
            sent: list[int] = []
            datas: list[bytes] = []
            get, ack, clear, pmap = pq.get, pq.ack, pq.clear_acked_data, mp.map
            t = time.perf_counter()
            left = n
            while left:
                items = [get(block=False, raw=True) for _ in range(min(BASE_CHUNK, left))]
                left -= len(items)
                tasks = [(it["pqid"], it["data"]) for it in items]
                sent += [it["pqid"] for it in items]
                datas += [it["data"] for it in items]
                for pqid in pmap(fn, tasks, chunksize=max(1, -(-len(tasks) // workers))):
                    ack(id=pqid)
                    got.append(pqid)
                    if not len(got) % BASE_CLEAR_EVERY:
                        clear()
            secs = time.perf_counter() - t
        assert datas == payloads, "the baseline's queue gave back wrong payloads"
        assert len(set(sent)) == n, "the baseline's queue handed out a message twice"
        assert sorted(got) == sorted(sent), "the baseline's workers did not return every message once"
        assert pq.unack_count() == 0 and pq.ready_count() == 0, "the baseline left messages unacked"
        return {"secs": secs, "rate": n / secs, "n": n}
    finally:
        pq.close()
        shutil.rmtree(path, ignore_errors=True)


def _baseline_mpq(n: int, workers: int, payloads: list[bytes]) -> dict[str, Any]:
    """The peer issue 15 names: a multiprocessing.Pool fed the same 100 B
    payloads from a multiprocessing.Queue, no durability at all.  A producer
    process puts (id, payload) pairs, BASE_CHUNK per put; this process
    takes them off the queue and imap_unordered's them to the Pool (chunks
    of BASE_CHUNK / workers), counting the ids that come back.  Timed from
    the producer's start to the last result (the Pool warm first)."""
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in
                                      multiprocessing.get_all_start_methods() else "spawn")
    q = ctx.Queue(maxsize=64)
    with ctx.Pool(workers) as mp:
        assert mp.map(PH.noop_result, [(-1, b"")] * (workers * 2), chunksize=1) == [-1] * (workers * 2)
        producer = ctx.Process(target=PH.mpq_produce, args=(q, payloads, n, BASE_CHUNK))

        def tasks() -> Any:
            while True:
                chunk = q.get()
                if chunk is None:
                    return
                yield from chunk
        t = time.perf_counter()
        producer.start()
        seen = sum(1 for _ in mp.imap_unordered(PH.noop_result, tasks(),
                                                chunksize=max(1, BASE_CHUNK // workers)))
        secs = time.perf_counter() - t
        producer.join(30)
    assert seen == n and producer.exitcode == 0, (seen, producer.exitcode)
    return {"secs": secs, "rate": n / secs, "n": n}


def _not_measured(note: Any) -> None:
    note("persist-queue is not installed (pip install persist-queue): the pool's baseline "
         "(multiprocessing.Pool + SQLiteAckQueue) was not measured")


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def payloads() -> list[bytes]:
    return H.make_pool(SIZE, tag="pool")


@pytest.fixture(scope="module")
def prefilled(bench_dir, payloads):
    """A closed queue of n 100 B messages (put_many(1000), fsync="never",
    one flush), with a group that never consumes (so that logq keeps the
    segments the rounds' groups settle: each round drains it with a new
    group, which starts at the first message)."""
    n = _n_noop()
    path = os.path.join(bench_dir, "pool-prefilled")
    chunks = H.batches(H.sequence(payloads, n), 1000)
    with logq.open(path, fsync="never") as q:
        q.consumer(PIN).close()
        for c in chunks:
            q.put_many(c)
        q.flush()
        assert q.next_offset == n
    yield {"path": path, "n": n}
    shutil.rmtree(path, ignore_errors=True)


# -- 1. no-op handler, 2 workers ----------------------------------------------------------------
def _summary(rs: list[dict[str, Any]], n: int) -> tuple[dict[str, Any], float, str]:
    """The best round of the best batch_size, the median of that
    batch_size's rounds, and every batch_size's best / median."""
    by: dict[Any, list[dict[str, Any]]] = {}
    for r in rs:
        r["rate"] = n / r["durable_at"]
        by.setdefault(r["bs"], []).append(r)
    best = max(rs, key=lambda r: r["rate"])
    med = statistics.median(r["rate"] for r in by[best["bs"]])
    text = ", ".join(f"{_bs(bs)}: {max(r['rate'] for r in g):,.0f} / "
                     f"{statistics.median(r['rate'] for r in g):,.0f}" for bs, g in by.items())
    return best, med, text


def test_pool_noop(benchmark, qdir, prefilled, payloads, report, note, floor_fdatasync_prealloc):
    """No-op handler, 2 workers, 100 B: with a producer in another process
    putting concurrently, and on a pre-filled queue; NOOP_ROUNDS rounds of
    each batch_size; then one round with the producer paced at PACED_RATE
    (below what the pool can do) for the put -> commit latency; the
    baseline once, in the first round's setup."""
    n = prefilled["n"]
    n_paced = H.scaled_multiple(PACED_SECONDS * PACED_RATE, 1000, minimum=PACED_RATE // 1000 * 3 // 2)
    plan = [(mode, bs) for _ in range(NOOP_ROUNDS) for bs in BATCH_SIZES
            for mode in ("producer", "prefilled")] + [("paced", None)] + \
        [("batched", None)] * NOOP_ROUNDS
    results: list[dict[str, Any]] = []
    base: list[dict[str, Any] | None] = []

    def setup():
        if not base:
            base.append(_baseline(qdir, _n_base_noop(), NOOP_WORKERS, PH.noop_result))
        mode, bs = plan[len(results)]
        ctx: dict[str, Any] = {"mode": mode, "bs": bs, "workers": NOOP_WORKERS, "total": 0,
                               "group": f"g{next(_ids)}", "n": n_paced if mode == "paced" else n}
        if mode == "prefilled":
            ctx["q"] = logq.open(prefilled["path"])
            ctx["pool"] = logq.WorkerPool(prefilled["path"], NOOP, ctx["group"],
                                          workers=NOOP_WORKERS, batch_size=bs)
            ctx["total"] = n
        else:
            path = os.path.join(qdir, f"q{next(_ids)}")
            ctx["q"] = logq.open(path)
            ctx["own_dir"] = True
            try:
                extra: dict[str, Any] = {}
                if mode == "paced":     # snapshots of the latencies while the producer runs
                    snaps = ctx["snaps"] = []
                    extra = {"scale_interval": 0.25,
                             "on_stats": lambda st: snaps.append((time.perf_counter(), st))}
                ctx["pool"] = logq.WorkerPool(path, NOOP, ctx["group"], workers=NOOP_WORKERS,
                                              batch_size=bs, **extra).start()
                _warm(ctx, payloads, 4 * (bs or 100), NOOP_WORKERS)
                go_r, go_w = os.pipe()
                ctx["fds"] = (go_r, go_w)
                rate = PACED_RATE if mode == "paced" else 0
                proc = ctx["producer"] = subprocess.Popen(
                    [sys.executable, "-c", PRODUCER, path, str(ctx["n"]), str(go_r), str(rate),
                     str(BASE_CHUNK if mode == "batched" else 0)],
                    pass_fds=(go_r,), env=H.child_env(), stdout=subprocess.PIPE, text=True)
                ready = proc.stdout.readline()      # it imported, built its payloads, opened
                assert ready == "ready\n", f"the producer did not start: {ready!r}"
                ctx["total"] += ctx["n"]
            except BaseException:
                _teardown(ctx)
                raise
        results.append(ctx)
        return ctx

    def work(ctx):
        t0 = ctx["t0"] = time.perf_counter()
        if ctx["mode"] == "prefilled":
            ctx["pool"].start()
        else:
            os.write(ctx["fds"][1], b"g")
        _wait_durable(ctx, t0)

    def check(ctx):
        _stop_and_check(ctx)
        if ctx["mode"] != "prefilled":
            out, _ = ctx["producer"].communicate(timeout=60)      # after its "ready" line
            assert ctx["producer"].returncode == 0, f"the producer failed: {out!r}"
            put, secs = out.split()
            assert int(put) == ctx["n"], f"the producer put {put} messages, not {ctx['n']:,}"
            ctx["producer_secs"] = float(secs)

    H.Rounds(benchmark, rounds=len(plan), setup=setup, work=work, check=check, teardown=_teardown)

    mpq = _baseline_mpq(n, NOOP_WORKERS, payloads)
    b = base[0]
    if b is None:
        _not_measured(note)
    else:
        report(f"baseline: multiprocessing.Pool({NOOP_WORKERS}) + SQLiteAckQueue, no-op", b["rate"],
               "msgs/s", "1 / fdatasync (prealloc)", 1 / floor_fdatasync_prealloc.value,
               note=f"{b['n']:,} messages, pre-filled; {BASE_NOTE}")
    for mode, label, lat in (("producer", "producer in another process",
                              "(from put; the producer outruns the pool: mostly time waiting in the backlog)"),
                             ("prefilled", "pre-filled queue, from start()",
                              "(from put: mostly time waiting in the pre-filled queue)")):
        best, med, others = _summary([r for r in results if r["mode"] == mode], n)
        st = best["stats"]
        extra = (f"; the producer's put() loop took {best['producer_secs']:.2f}s of the "
                 f"{best['durable_at']:.2f}s" if mode == "producer" else "")
        report(f"WorkerPool no-op, {NOOP_WORKERS} workers, 100 B, {label}", best["rate"], "msgs/s",
               "baseline mp.Pool + SQLiteAckQueue" if b else "baseline (not measured)",
               b["rate"] if b else None, median=med, target=(">=", NOOP_TARGET),
               note=f"{n:,} messages per round; best batch_size {_bs(best['bs'])}; by batch_size "
                    f"(best / median of {NOOP_ROUNDS}): {others}; best round: all processed at "
                    f"{best['processed_at']:.2f}s ({n / best['processed_at']:,.0f}/s), all durable at "
                    f"{best['durable_at']:.2f}s; put->commit latency of the last 20,000 commits: p50 "
                    f"{st.latency_p50 * 1e3:,.0f} ms, p99 {st.latency_p99 * 1e3:,.0f} ms {lat}{extra}")
    # Fed alike: the peer's producer puts BASE_CHUNK pairs per mp.Queue.put,
    # so here the producer puts them with put_many(BASE_CHUNK) (the put()
    # loop's own figure is above: there the producer is the limit).
    best, med, _ = _summary([r for r in results if r["mode"] == "batched"], n)
    report(f"WorkerPool no-op, {NOOP_WORKERS} workers, producer in another process (put_many({BASE_CHUNK})), "
           f"vs multiprocessing.Pool({NOOP_WORKERS}) fed by a multiprocessing.Queue", best["rate"], "msgs/s",
           "mp.Pool + mp.Queue (no durability)", mpq["rate"], median=med, target=(">=", 1e6),
           ratio_target=(">=", 3.0),
           note=f"the peer: {mpq['n']:,} (id, payload) pairs put by a producer process, "
                f"{BASE_CHUNK} per put, imap_unordered to the Pool; logq: the same payloads, "
                f"put_many({BASE_CHUNK}) by a producer process, adaptive batch_size, best of "
                f"{NOOP_ROUNDS} rounds; all processed at {best['processed_at']:.2f}s; the producer took "
                f"{best['producer_secs']:.2f}s; logq's figure is durable commits")
    # pool.stats() keeps the latencies of the last 20,000 commits: the end of
    # a run shows its tail only.  The snapshots taken while the producer was
    # putting (after its first half second) show the steady state.
    paced = next(r for r in results if r["mode"] == "paced")
    st = paced["stats"]
    t0 = paced["t0"]
    steady = [s for t, s in paced["snaps"]
              if t0 + 0.5 <= t <= t0 + paced["producer_secs"] and s.latency_p50 is not None]
    assert steady, "no latency snapshot while the paced producer ran"
    p50 = statistics.median(s.latency_p50 for s in steady)
    p99s = sorted(s.latency_p99 for s in steady)
    window = logq.PoolOptions().commit_every / PACED_RATE
    offered = paced["n"] / paced["producer_secs"]
    report(f"WorkerPool no-op put->commit latency p50, producer paced at {PACED_RATE / 1e3:,.0f} k msgs/s",
           p50 * 1e3, "ms", "commit_every / offered rate", window * 1e3,
           note=f"{paced['n']:,} messages offered at {offered:,.0f}/s, adaptive batch_size; median of "
                f"{len(steady)} pool.stats() snapshots taken while the producer ran (each: the last "
                f"20,000 commits); p99 in those snapshots {p99s[0] * 1e3:,.0f} to {p99s[-1] * 1e3:,.0f} ms; "
                f"at the end of the run (its last commits): p50 {st.latency_p50 * 1e3:,.0f} ms, p99 "
                f"{st.latency_p99 * 1e3:,.0f} ms; all durable {paced['durable_at']:.2f}s after the first "
                f"put ({paced['n'] / paced['durable_at']:,.0f}/s)")


# -- 2. a handler sleeping 10 ms, 32 workers ---------------------------------------------------
def test_pool_sleep_32_workers(benchmark, qdir, payloads, report, note):
    """sleep(10 ms) per message, 32 workers: two rounds with batch_size=1
    (the figure) and one with the adaptive batch size (in the note); beside
    the ideal 3,200 msgs/s and the baseline (measured in each round's setup)."""
    n = _n_sleep()
    plan = [1, 1, None]
    base: list[dict[str, Any] | None] = []
    rounds: list[dict[str, Any]] = []

    def setup():
        if len(base) < 2:
            base.append(_baseline(qdir, _n_base_sleep(), SLEEP_WORKERS, PH.sleep_10ms_result))
        path = os.path.join(qdir, f"q{next(_ids)}")
        bs = plan[len(rounds)]
        ctx: dict[str, Any] = {"workers": SLEEP_WORKERS, "total": 0, "group": f"g{next(_ids)}",
                               "q": logq.open(path), "own_dir": True, "bs": bs}
        try:
            ctx["pool"] = logq.WorkerPool(path, SLEEPER, ctx["group"], workers=SLEEP_WORKERS,
                                          batch_size=bs).start()
            _warm(ctx, payloads, 2 * SLEEP_WORKERS, SLEEP_WORKERS)
            ctx["batch"] = H.sequence(payloads, n)
        except BaseException:
            _teardown(ctx)
            raise
        rounds.append(ctx)
        return ctx

    def work(ctx):
        t0 = time.perf_counter()
        ctx["q"].put_many(ctx["batch"])
        ctx["total"] += n
        _wait_durable(ctx, t0)

    H.Rounds(benchmark, rounds=len(plan), setup=setup, work=work, check=_stop_and_check,
             teardown=_teardown)
    best, med, _ = _summary([c for c in rounds if c["bs"] == 1], n)
    auto = next(c for c in rounds if c["bs"] is None)
    auto["rate"] = n / auto["durable_at"]

    def seen(c: dict[str, Any]) -> str:
        return (f"all processed at {c['processed_at']:.2f}s ({n / c['processed_at']:,.0f}/s, ratio "
                f"{n / c['processed_at'] / IDEAL_SLEEP:.3g}), all durable at {c['durable_at']:.2f}s")

    report(f"WorkerPool sleep(10 ms), {SLEEP_WORKERS} workers, batch_size=1", best["rate"], "msgs/s",
           f"ideal: {SLEEP_WORKERS} workers / 10 ms", IDEAL_SLEEP, median=med, ratio_target=(">=", 0.9),
           note=f"{n:,} messages put at once per round, every worker warm; best round: {seen(best)}; "
                f"adaptive batch_size: {auto['rate']:,.0f}/s (ratio {auto['rate'] / IDEAL_SLEEP:.3g}), "
                f"{seen(auto)}")
    if any(b is None for b in base):
        _not_measured(note)
        return
    brates = [b["rate"] for b in base]
    report(f"baseline: multiprocessing.Pool({SLEEP_WORKERS}) + SQLiteAckQueue, sleep(10 ms)",
           max(brates), "msgs/s", f"ideal: {SLEEP_WORKERS} workers / 10 ms", IDEAL_SLEEP,
           median=statistics.median(brates),
           note=f"{base[0]['n']:,} messages per round, pre-filled; {BASE_NOTE}")
    report(f"WorkerPool sleep(10 ms), {SLEEP_WORKERS} workers, vs the baseline", best["rate"], "msgs/s",
           "baseline mp.Pool + SQLiteAckQueue", max(brates), median=med)

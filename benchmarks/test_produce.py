"""Producing: put() and put_many() under each fsync policy, beside the floor
each is read against.  Every round runs on a fresh queue and is checked
afterwards (untimed): every record put is there, in order, intact, and under
fsync="always" the fdatasyncs were really made.

The fsync="always" benchmarks are read against the session's fdatasync floor
(preallocated file); since disk latency drifts most of all on a shared
machine, each round's setup also measures a short fdatasync median beside
the round, shown in the note."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading

import bench_helpers as H
import pytest

import logq
from logq.bench import floor_fdatasync

_ids = itertools.count()
MiB = 1 << 20


def _fresh(qdir: str, **options) -> logq.Queue:
    return logq.open(os.path.join(qdir, f"q{next(_ids)}"), **options)


def _close(q: logq.Queue) -> None:
    q.close()
    shutil.rmtree(q.path, ignore_errors=True)   # drop the round's pages and disk space now


def _beside(qdir: str, lats: list[float]) -> None:
    lats.append(floor_fdatasync(qdir, 30, in_place=True))


def _beside_note(lats: list[float]) -> str:
    return f"fdatasync beside the rounds: {statistics.median(lats) * 1e6:,.0f} us"


# -- fsync="never" ---------------------------------------------------------------------
def test_put_loop_never(benchmark, qdir, report, floor_write):
    """put() in a loop, 100 B payloads, fsync="never"."""
    n = H.n_small_records()
    seq = H.sequence(H.make_pool(100), n)

    def work(q):
        put = q.put
        for p in seq:
            put(p)

    r = H.Rounds(benchmark, rounds=5, setup=lambda: _fresh(qdir, fsync="never"), work=work,
                 check=lambda q: H.verify_queue(q, seq), teardown=_close)
    report("put() loop, 100 B, fsync=never", n / r.best, "msgs/s",
           floor_write.name, floor_write.value, median=n / r.median,
           target=(">=", 1e6), ratio_target=(">=", 1.0), note=f"{n:,} records per round")


@pytest.mark.parametrize("case", ["100B", "1KiB", "1KiB-no-roll"])
def test_put_many_never(benchmark, qdir, report, case, request):
    """put_many() of 1,000 payloads at a time, fsync="never".  The no-roll
    case is the 1 KiB one with segments big enough for the whole round: the
    difference is what rolling segments costs (a roll fdatasyncs the sealed
    segment before the put that caused it returns)."""
    size = 100 if case == "100B" else 1024
    floor = request.getfixturevalue("floor_joined_100" if size == 100 else "floor_joined_1k")
    n = H.n_small_records() if size == 100 else H.n_kib_records()
    seq = H.sequence(H.make_pool(size), n)
    chunks = H.batches(seq, 1000)
    options = {"fsync": "never"}
    if case == "1KiB-no-roll":
        data = n * (size + 28) + MiB
        options["segment_bytes"] = max(64 * MiB, -(-data // (64 * MiB)) * 64 * MiB)

    def work(q):
        put_many = q.put_many
        for b in chunks:
            put_many(b)

    def check(q):
        H.verify_queue(q, seq)
        if case == "1KiB-no-roll":
            assert q.stats()["segments"] == 1

    r = H.Rounds(benchmark, rounds=7 if size == 100 else 5, setup=lambda: _fresh(qdir, **options),
                 work=work, check=check, teardown=_close)
    if size == 100:
        report("put_many(1000), 100 B, fsync=never", n / r.best, "msgs/s", floor.name, floor.value,
               median=n / r.median, note=f"{n:,} records per round")
        return
    mb = size / 1e6
    name = "put_many(1000), 1 KiB, fsync=never"
    note = f"{n:,} records ({n * size // MiB} MiB) per round"
    if case == "1KiB-no-roll":
        name += f", segment_bytes={options['segment_bytes'] // MiB} MiB (no roll)"
        note += "; not a default setting: shows what the rolls cost"
    report(name, n * mb / r.best, "MB/s", floor.name, floor.value * mb, median=n * mb / r.median,
           target=(">=", 1500), ratio_target=(">=", 0.8), note=note)


# -- fsync="always" --------------------------------------------------------------------
def test_put_always_one_thread(benchmark, qdir, report, floor_fdatasync_prealloc):
    """put() in a loop, fsync="always": one fdatasync per put, one thread."""
    n = H.scaled(3000, 200)
    seq = H.sequence(H.make_pool(100), n)
    fsyncs, beside = [], []

    def setup():
        _beside(qdir, beside)
        q = _fresh(qdir, fsync="always")
        return q, q.stats()["fsyncs"]

    def work(ctx):
        put = ctx[0].put
        for p in seq:
            put(p)

    def check(ctx):
        q, before = ctx
        fsyncs.append(q.stats()["fsyncs"] - before)
        assert fsyncs[-1] >= n, f"{fsyncs[-1]} fdatasyncs for {n} durable puts"
        assert q.stats()["durable_next_offset"] >= n
        H.verify_queue(q, seq)

    r = H.Rounds(benchmark, rounds=7, setup=setup, work=work, check=check,
                 teardown=lambda ctx: _close(ctx[0]))
    lat = floor_fdatasync_prealloc.value
    report("put() loop, 100 B, fsync=always, 1 thread", n / r.best, "msgs/s",
           "1 / fdatasync (prealloc)", 1 / lat, median=n / r.median, target=(">=", 8000),
           note=f"{n:,} puts and {sum(fsyncs) // len(fsyncs):,} fdatasyncs per round; "
                + _beside_note(beside))


def test_put_always_eight_threads(benchmark, qdir, report, floor_fdatasync_prealloc):
    """put() from 8 threads sharing one Queue, fsync="always": group commit."""
    threads_n = 8
    per = H.scaled(2500, 50)
    n = per * threads_n
    pools = [H.make_pool(100, tag=f"t{j}", k=per) for j in range(threads_n)]
    puts_per_fsync, beside = [], []

    def setup():
        _beside(qdir, beside)
        q = _fresh(qdir, fsync="always")
        go = threading.Event()
        offsets = [[] for _ in range(threads_n)]
        errors = []

        def producer(j):
            go.wait()
            put, mine = q.put, offsets[j]
            try:
                for p in pools[j]:
                    mine.append(put(p))
            except BaseException as e:  # reported by check()
                errors.append(e)

        ths = [threading.Thread(target=producer, args=(j,), daemon=True) for j in range(threads_n)]
        for t in ths:
            t.start()
        return {"q": q, "go": go, "threads": ths, "offsets": offsets, "errors": errors,
                "fsyncs": q.stats()["fsyncs"]}

    def work(ctx):
        ctx["go"].set()
        for t in ctx["threads"]:
            t.join()

    def check(ctx):
        q = ctx["q"]
        assert not ctx["errors"], ctx["errors"]
        st = q.stats()
        assert st["durable_next_offset"] >= n
        puts_per_fsync.append(n / (st["fsyncs"] - ctx["fsyncs"]))
        # every put returned its own offset, all of them dense from 0 ...
        assert sorted(itertools.chain(*ctx["offsets"])) == list(range(n))
        # ... and each offset holds the payload that put returned it for
        expected = [b""] * n
        for j, offs in enumerate(ctx["offsets"]):
            for off, p in zip(offs, pools[j]):
                expected[off] = p
        H.verify_queue(q, expected)

    def teardown(ctx):
        ctx["go"].set()
        for t in ctx["threads"]:
            t.join()
        _close(ctx["q"])

    r = H.Rounds(benchmark, rounds=7, setup=setup, work=work, check=check, teardown=teardown)
    lat = floor_fdatasync_prealloc.value
    report("put() loop, 100 B, fsync=always, 8 threads", n / r.best, "msgs/s",
           "1 / fdatasync (prealloc)", 1 / lat, median=n / r.median, target=(">=", 40_000),
           note=f"{n:,} puts per round; " + _beside_note(beside))
    report("put() fsync=always, 8 threads: puts per fsync", statistics.mean(puts_per_fsync),
           "puts/fsync", "threads (most that can share)", threads_n,
           median=statistics.median(puts_per_fsync), note="group commit, from q.stats()['fsyncs']")


def test_put_many_always(benchmark, qdir, report, floor_fdatasync_prealloc):
    """put_many() of 100 payloads per durable call, fsync="always"."""
    calls = H.scaled(2000, 50)
    n = calls * 100
    seq = H.sequence(H.make_pool(100), n)
    chunks = H.batches(seq, 100)
    beside = []

    def setup():
        _beside(qdir, beside)
        q = _fresh(qdir, fsync="always")
        return q, q.stats()["fsyncs"]

    def work(ctx):
        put_many = ctx[0].put_many
        for b in chunks:
            put_many(b)

    def check(ctx):
        q, before = ctx
        made = q.stats()["fsyncs"] - before
        assert made >= calls, f"{made} fdatasyncs for {calls} durable calls"
        H.verify_queue(q, seq)

    r = H.Rounds(benchmark, rounds=7, setup=setup, work=work, check=check,
                 teardown=lambda ctx: _close(ctx[0]))
    lat = floor_fdatasync_prealloc.value
    report("put_many(100), 100 B, fsync=always", n / r.best, "msgs/s",
           "100 records / fdatasync (prealloc)", 100 / lat, median=n / r.median,
           target=(">=", 500_000), note=f"{calls:,} durable calls per round; " + _beside_note(beside))
    # Every round, not only the best: each against the fdatasync measured
    # just before it (disk latency drifts between rounds on a shared machine).
    per = sorted((n / t) / (100 / b) for t, b in zip(r.times, beside))
    worst = min(range(len(r.times)), key=lambda i: (n / r.times[i]) / (100 / beside[i]))
    report("put_many(100), fsync=always, worst round", n / r.times[worst], "msgs/s",
           "100 records / fdatasync beside it", 100 / beside[worst], ratio_target=(">=", 0.8),
           note="each round's ratio to the fdatasync measured just before it: "
                + ", ".join(f"{x:.2f}" for x in per))


# -- fsync="always", several processes ---------------------------------------------------
_PRODUCER = r"""
import json, os, sys, time
import logq
qdir, tag, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
q = logq.open(qdir, fsync="always")
for i in range(200):                    # warm up: the file's first pages, the code
    q.put(b"warm-%s-%d" % (tag.encode(), i))
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
began = time.perf_counter()
offsets = [q.put(b"%s:%d:" % (tag.encode(), i) + bytes(90)) for i in range(n)]
took = time.perf_counter() - began
st = q.stats()
q.close()
print(json.dumps({"began": began, "took": took, "fsyncs": st["fsyncs"], "offsets": offsets}), flush=True)
"""


def _processes_put(qdir: str, k: int, n: int) -> tuple[float, int, list[list[int]]]:
    """``k`` producer processes each put ``n`` records of 100 B under
    fsync="always", started together: (seconds from the first start to the
    last finish, fdatasyncs they made in all, each one's offsets)."""
    logq.open(qdir).close()
    go = qdir + ".go"
    procs = [subprocess.Popen([sys.executable, "-c", _PRODUCER, qdir, f"p{j}", str(n), go],
                              stdout=subprocess.PIPE, text=True, env=H.child_env()) for j in range(k)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        open(go, "w").close()
        outs = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None and not os.path.exists(go) else None
            p.wait(60)
            p.stdout.close()
        if os.path.exists(go):
            os.unlink(go)
    began = min(o["began"] for o in outs)
    ended = max(o["began"] + o["took"] for o in outs)
    return ended - began, sum(o["fsyncs"] for o in outs), [o["offsets"] for o in outs]


def test_put_always_four_processes(benchmark, qdir, report, floor_fdatasync_prealloc):
    """put() from 4 processes, fsync="always": cross-process group commit.
    Floors: one process's rate in the same run (each round runs one
    process, then four), and 1 / fdatasync."""
    k, n = 4, H.scaled(1500, 100)
    one, four, syncs_per_s, one_syncs, beside = [], [], [], [], []
    rounds = iter(range(1000))

    def setup():
        _beside(qdir, beside)
        r = next(rounds)
        return {"one": os.path.join(qdir, f"one{r}"), "four": os.path.join(qdir, f"four{r}")}

    def work(ctx):
        t1, f1, _ = _processes_put(ctx["one"], 1, n)
        one.append(n / t1)
        one_syncs.append(f1 / t1)
        t4, f4, ctx["offsets"] = _processes_put(ctx["four"], k, n)
        four.append(k * n / t4)
        syncs_per_s.append(f4 / t4)
        ctx["fsyncs"] = f4

    def check(ctx):
        # every put returned its own offset, and each holds what was put
        with logq.open(ctx["four"]) as q:
            assert len(q) == k * (n + 200)
            for j, offs in enumerate(ctx["offsets"]):
                assert len(set(offs)) == n
                for i in (0, n // 2, n - 1):
                    assert q.read(offs[i]) == b"p%d:%d:" % (j, i) + bytes(90)
        assert ctx["fsyncs"] <= k * (n + 200)     # shared, never more than one per put

    def teardown(ctx):
        for d in (ctx["one"], ctx["four"]):
            shutil.rmtree(d, ignore_errors=True)

    H.Rounds(benchmark, rounds=3, setup=setup, work=work, check=check, teardown=teardown)
    report("put() loop, 100 B, fsync=always, 4 processes", max(four), "msgs/s",
           "1 process, same run", max(one), median=statistics.median(four), ratio_target=(">=", 3.0),
           note=f"{k} x {n:,} puts per round; fdatasyncs/s: 4 processes "
                f"{statistics.median(syncs_per_s):,.0f}, 1 process {statistics.median(one_syncs):,.0f}; "
                + _beside_note(beside))
    report("put() fsync=always, 4 processes, vs 1 / fdatasync", max(four), "msgs/s",
           "1 / fdatasync (prealloc)", 1 / floor_fdatasync_prealloc.value,
           median=statistics.median(four), note="the same rounds, read against the fdatasync floor")

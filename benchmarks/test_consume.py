"""Consuming through a consumer group: get_many()+ack_many(), get()+ack(),
the drain rate at three backlog depths, batched commits against a commit
per ack, and a peer (persist-queue's SQLiteAckQueue) doing get+ack on the
same payloads.  100 B payloads throughout (LOGQ_BENCH_SCALE scales every
count).

Floors and peers, all measured in the same run:

* read_many(off, 1000) over the same records: what reading them costs
  with no group, no leases, no acks.  The mmap slice loop of test_read.py
  over the same segment files is shown too (the least any Python reader of
  the log can do).
* the drain rate of a shallow queue, for the deeper ones;
* a commit per ack, for batched commits (and 1 / fdatasync for a commit per ack);
* persist-queue, a durable queue with acks in SQLite, for get()+ack().

Every round consumes with a group of its own (a new group starts at the
first message) on a freshly opened Queue (each queue also has a group that
never consumes, so that logq keeps the segments the others have settled:
see _build), and is checked afterwards:
as many messages as asked, offsets contiguous from 0 with attempt 1,
payloads right (every one for get(), one sampled message per batch of
get_many()), and the group's durable counters (acked, watermark) saying
that all of them were committed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import time
import types
from typing import Any

import bench_helpers as H
import pytest

import logq
from logq import _format as F

SIZE = 100
REC = F.RECORD_HEADER_SIZE + SIZE
BATCH = 1000
GET_TIMEOUT = 10.0       # a get that finds nothing raises logq.Empty instead of hanging

_groups = itertools.count()


def _group() -> str:
    return f"bench{next(_groups)}"


PIN = "pin"


def _build(path: str, n: int, pool: list[bytes]) -> None:
    """A closed queue of ``n`` records, record i carrying ``pool[i % len(pool)]``,
    written with put_many(1000) under fsync="never", then one flush.

    The queue gets a group that never consumes (PIN) first: logq deletes the
    sealed segments that every group has settled (housekeeping, every few
    seconds), so without one the log would be gone once a round's group had
    drained it, and the next round's new group would start past it."""
    assert n % BATCH == 0
    cycle = H.batches(H.sequence(pool, len(pool) * BATCH), BATCH)   # len(pool) batches, repeating
    q = logq.open(path, fsync="never")
    try:
        q.consumer(PIN).close()
        put_many = q.put_many
        for i in range(n // BATCH):
            put_many(cycle[i % len(cycle)])
        q.flush()
        assert q.next_offset == n, f"built {q.next_offset} records of {n}"
    finally:
        q.close()


class Expected:
    """What record i of a built queue carries (without a list of millions)."""

    def __init__(self, pool: list[bytes]) -> None:
        self.pool = pool

    def __getitem__(self, i: int) -> bytes:
        return self.pool[i % len(self.pool)]


@pytest.fixture(scope="module")
def pool() -> list[bytes]:
    return H.make_pool(SIZE, tag="consume")


@pytest.fixture(scope="module")
def log_1m(bench_dir, pool):
    """The queue most benchmarks here consume from: n 100 B records."""
    n = H.n_small_records()
    path = os.path.join(bench_dir, "consume-1m")
    _build(path, n, pool)
    with logq.open(path) as q:
        H.verify_queue(q, H.sequence(pool, n))
        segments = q.stats()["segments"]
    yield {"path": path, "n": n, "segments": segments, "seq": Expected(pool)}
    shutil.rmtree(path, ignore_errors=True)


# -- floors -------------------------------------------------------------------------
def _read_many_loop(path: str, n: int) -> tuple[float, int, bytes]:
    """Seconds to read records 0..n-1 with read_many(off, 1000) on a freshly
    opened queue; how many were read and the last payload."""
    with logq.open(path) as q:
        read_many = q.read_many
        t = time.perf_counter()
        off = got = 0
        last = b""
        while got < n:
            first, ps = read_many(off, min(BATCH, n - got))
            if not ps:
                break
            got += len(ps)
            off = first + len(ps)
            last = ps[-1]
        return time.perf_counter() - t, got, last


class ReadFloor:
    """The read_many(off, 1000) floor over the first n records of a queue:
    best of 3 when first needed, run again beside each round (kept if better)."""

    def __init__(self, log: dict, n: int, add_floor: Any) -> None:
        self.log, self.n = log, n
        self.floor = None
        self.rate = 0.0
        for _ in range(3):
            self.again()
        self.floor = add_floor("read_many(off, 1000), sequential (consume log)", self.rate, "msgs/s",
                               f"{self.rate * SIZE / 1e6:,.1f} MB/s",
                               f"best of 3 x {n:,} records, and beside each round")

    def again(self) -> None:
        secs, got, last = _read_many_loop(self.log["path"], self.n)
        assert got == self.n, f"read_many read {got} records of {self.n}"
        assert last == self.log["seq"][self.n - 1], "read_many read the wrong records"
        # (the records themselves were verified when the log was built)
        if self.n / secs > self.rate:
            self.rate = self.n / secs
            if self.floor is not None:
                self.floor.value = self.rate
                self.floor.also = f"{self.rate * SIZE / 1e6:,.1f} MB/s"


@pytest.fixture(scope="module")
def floor_read_all(log_1m, add_floor):
    return ReadFloor(log_1m, log_1m["n"], add_floor)


@pytest.fixture(scope="module")
def floor_mmap(log_1m, add_floor):
    """test_read.py's mmap slice loop over this module's log (same shape of records)."""
    from test_read import RawLog
    raw = RawLog(log_1m["path"], log_1m["n"])
    try:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            chunks = raw.sequential()
            best = min(best, time.perf_counter() - t)
        flat = [p for c in chunks for p in c]
        seq = log_1m["seq"]
        assert len(flat) == log_1m["n"] and all(flat[i] == seq[i] for i in range(0, len(flat), 997)), \
            "the mmap floor did not read the records that were put"
    finally:
        raw.close()
    n = log_1m["n"]
    return add_floor("mmap slice loop, sequential (consume log)", n / best, "msgs/s",
                     f"{n * SIZE / best / 1e6:,.1f} MB/s", f"best of 3 x {n:,} records")


# -- consuming, and checking what was consumed ------------------------------------------
def _open_consumer(path: str, again=None, **options) -> dict:
    if again is not None:
        again()
    q = logq.open(path, fsync="batch")
    name = _group()
    return {"q": q, "name": name, "c": q.consumer(name, **options)}


def _close(ctx: dict) -> None:
    try:
        ctx["c"].close()
    finally:
        ctx["q"].close()


def _drain_many(c: Any, n: int, settle: Any = None) -> tuple[int, list]:
    """get_many(1000) + ``settle`` (default ack_many) until n messages are
    consumed; commit.  Per batch: (first offset, last offset, count, one
    message of it) for the check."""
    get_many, settle = c.get_many, settle or c.ack_many
    runs = []
    got = 0
    while got < n:
        ms = get_many(min(BATCH, n - got))
        if not ms:
            break
        settle(ms)
        runs.append((ms[0].offset, ms[-1].offset, len(ms), ms[len(runs) % len(ms)]))
        got += len(ms)
    c.commit()
    return got, runs


def _ack_each(c: Any, commit_each: bool) -> Any:
    """A ``settle`` for _drain_many: ack() per message, and commit() after
    each ack if ``commit_each``."""
    ack, commit = c.ack, c.commit
    if not commit_each:
        def settle(ms: list) -> None:
            for m in ms:
                ack(m)
        return settle

    def settle_committing(ms: list) -> None:
        for m in ms:
            ack(m)
            commit()
    return settle_committing


def _check_runs(got: int, runs: list, n: int, seq: Any) -> None:
    assert got == n, f"consumed {got} messages of {n}"
    at = 0
    for first, last, count, m in runs:
        assert first == at, f"a batch started at offset {first}, expected {at}"
        assert last - first + 1 == count, f"the batch at {first} is not {count} consecutive offsets"
        assert first <= m.offset <= last and m.attempt == 1, f"message {m.offset} (attempt {m.attempt})"
        assert m.data == seq[m.offset], f"message {m.offset} carries {m.data[:24]!r}..."
        at = last + 1


PREFETCH = 256            # GroupOptions.prefetch, the default


def _check_group(q: Any, name: str, n: int, prefetched: bool = False) -> None:
    """The group's durable state: n acked and committed, none redelivered;
    n delivered and none out, or after get() (which claims up to PREFETCH
    messages ahead into the consumer's buffer, counted as delivered and in
    flight) at most that many more."""
    g = q.stats()["groups"][name]
    assert g["acked"] == n, f"group {name}: {g}"
    assert g["watermark"] == n, f"group {name}: watermark {g['watermark']}, expected {n}"
    assert g["redelivered"] == 0, f"group {name}: {g}"
    ahead = PREFETCH if prefetched else 0
    assert n <= g["delivered"] <= n + ahead and g["in_flight"] <= ahead, f"group {name}: {g}"


# -- 1. get_many(1000) + ack_many ----------------------------------------------------------
def test_get_many_ack_many(benchmark, log_1m, report, floor_read_all, floor_mmap):
    """get_many(1000) + ack_many() over the whole log, commits every
    commit_every acks (the default), fsync="batch"."""
    n, seq, path = log_1m["n"], log_1m["seq"], log_1m["path"]

    def work(ctx):
        ctx["out"] = _drain_many(ctx["c"], n)

    def check(ctx):
        _check_runs(*ctx["out"], n, seq)
        _check_group(ctx["q"], ctx["name"], n)

    r = H.Rounds(benchmark, rounds=5, setup=lambda: _open_consumer(path, floor_read_all.again),
                 work=work, check=check, teardown=_close)
    fl = floor_read_all.floor
    report("get_many(1000)+ack_many, 100 B, fsync=batch", n / r.best, "msgs/s", fl.name, fl.value,
           median=n / r.median, target=(">=", 2e6),
           note=f"{n:,} messages in {log_1m['segments']} segments per round, "
                f"commit_every={logq.GroupOptions().commit_every}")
    report("get_many(1000)+ack_many vs mmap slice loop", n / r.best, "msgs/s", floor_mmap.name,
           floor_mmap.value, median=n / r.median, ratio_target=(">=", 0.35))


# -- 1b. take(1000) + ack(batch) ---------------------------------------------------------------
def _drain_take(c: Any, n: int) -> tuple[int, list]:
    """take(1000) + ack(batch) until n messages are consumed; commit.  Per
    batch, for the check: (first offset, last offset, count, (offset,
    payload, attempt) of one message of it)."""
    take, ack = c.take, c.ack
    runs = []
    got = 0
    while got < n:
        b = take(min(BATCH, n - got))
        k = len(b)
        if not k:
            break
        ack(b)
        i = len(runs) % k
        (first, _count), = b.runs
        runs.append((first, first + k - 1, k, _Seen(first + i, b.payloads[i], b.attempts[i])))
        got += k
    c.commit()
    return got, runs


class _Seen:
    def __init__(self, offset: int, data: bytes, attempt: int) -> None:
        self.offset, self.data, self.attempt = offset, data, attempt


def test_take_ack(benchmark, log_1m, report, floor_read_all, floor_mmap):
    """take(1000) + ack(batch) over the whole log (a batch as parallel
    arrays, its acks as runs), commits every commit_every acks (the
    default), fsync="batch"."""
    n, seq, path = log_1m["n"], log_1m["seq"], log_1m["path"]

    def work(ctx):
        ctx["out"] = _drain_take(ctx["c"], n)

    def check(ctx):
        _check_runs(*ctx["out"], n, seq)
        _check_group(ctx["q"], ctx["name"], n)

    r = H.Rounds(benchmark, rounds=5, setup=lambda: _open_consumer(path, floor_read_all.again),
                 work=work, check=check, teardown=_close)
    report("take(1000)+ack(batch) vs mmap slice loop", n / r.best, "msgs/s", floor_mmap.name,
           floor_mmap.value, median=n / r.median, ratio_target=(">=", 0.5),
           note=f"{n:,} messages per round, commit_every={logq.GroupOptions().commit_every}")


# -- 2. get() + ack() -------------------------------------------------------------------------
def test_get_ack(benchmark, log_1m, report, floor_read_all, floor_write):
    """get() + ack() per message over the first n messages, default options."""
    n = H.scaled_multiple(200_000, BATCH)
    seq, path = log_1m["seq"], log_1m["path"]

    def work(ctx):
        c = ctx["c"]
        get, ack = c.get, c.ack
        offs, datas = ctx["offs"], ctx["datas"] = [], []
        add_off, add_data = offs.append, datas.append
        for _ in range(n):
            m = get(GET_TIMEOUT)
            ack(m)
            add_off(m.offset)
            add_data(m.data)
        c.commit()

    def check(ctx):
        assert ctx["offs"] == list(range(n)), "get() did not deliver offsets 0..n-1 in order"
        assert ctx["datas"] == H.sequence(seq.pool, n), "get() delivered wrong payloads"
        _check_group(ctx["q"], ctx["name"], n, prefetched=True)

    r = H.Rounds(benchmark, rounds=5, setup=lambda: _open_consumer(path, floor_read_all.again),
                 work=work, check=check, teardown=_close)
    fl = floor_read_all.floor
    report("get()+ack() per message, 100 B, fsync=batch", n / r.best, "msgs/s", fl.name, fl.value,
           median=n / r.median, target=(">=", 300_000),
           note=f"first {n:,} messages per round; floor over all {log_1m['n']:,}")
    report("get()+ack() vs one os.write per record", n / r.best, "msgs/s", floor_write.name,
           floor_write.value, median=n / r.median, ratio_target=(">=", 0.5))


# -- 3. drain rate against backlog depth ----------------------------------------------------
@pytest.fixture(scope="module")
def depths(bench_dir, pool, note):
    """Queues 10 k, 1 M and 10 M messages deep (scaled), built once and
    removed after the module.  The deepest (1.3 GB at scale 1) is made
    smaller, with a note, if it would take more than a quarter of the free
    disk (less than ~5 GB free at scale 1)."""
    shallow, middle, deep = (H.scaled_multiple(d, BATCH) for d in (10_000, 1_000_000, 10_000_000))
    free = shutil.disk_usage(bench_dir).free
    if deep * REC > free // 4:
        small = max(middle, free // 4 // REC // BATCH * BATCH)
        if small * REC > free // 2:
            pytest.skip(f"only {free >> 20} MiB free in {bench_dir}: not enough for the depth benchmark")
        note(f"only {free >> 20} MiB free in {bench_dir}: the deepest queue is {small:,} messages "
             f"instead of {deep:,}")
        deep = small
    paths = {}
    try:
        t = time.perf_counter()
        for d in (shallow, middle, deep):
            paths[d] = os.path.join(bench_dir, f"depth-{d}")
            _build(paths[d], d, pool)
        print(f"\n[setup] built queues {shallow:,}, {middle:,} and {deep:,} messages deep "
              f"({(shallow + middle + deep) * REC >> 20} MiB) in {time.perf_counter() - t:.1f} s")
        yield {"shallow": shallow, "middle": middle, "deep": deep, "paths": paths}
    finally:
        for p in paths.values():
            shutil.rmtree(p, ignore_errors=True)


def test_drain_rate_vs_depth(benchmark, depths, report, pool):
    """get_many(1000)+ack_many over the first 200 k messages (scaled) of
    the three queues.  The deepest is timed by the rounds; the two others in
    each round's setup, interleaved with it (in turns: shallow or middle
    first).  The shallow queue holds fewer than 200 k: its sample is the sum
    of several drains of all of it, each by a new group, so that every
    sample covers the same number of messages (the best of many short
    samples would beat the best of a few long ones by luck alone)."""
    seq = Expected(pool)
    shallow, middle, deep = depths["shallow"], depths["middle"], depths["deep"]
    take = H.scaled_multiple(200_000, BATCH)
    counts = {d: min(take, d) for d in (shallow, middle, deep)}
    reps = {shallow: max(1, counts[deep] // counts[shallow]), middle: 1}
    paths = depths["paths"]
    times: dict[int, list[float]] = {shallow: [], middle: []}

    def drain(d):
        ctx = _open_consumer(paths[d])
        try:
            t = time.perf_counter()
            out = _drain_many(ctx["c"], counts[d])
            secs = time.perf_counter() - t
            _check_runs(*out, counts[d], seq)
            _check_group(ctx["q"], ctx["name"], counts[d])
            return secs
        finally:
            _close(ctx)

    def setup():
        order = (shallow, middle) if len(times[shallow]) % 2 else (middle, shallow)
        for d in order:
            times[d].append(sum(drain(d) for _ in range(reps[d])))
        return _open_consumer(paths[deep])

    def work(ctx):
        ctx["out"] = _drain_many(ctx["c"], counts[deep])

    def check(ctx):
        _check_runs(*ctx["out"], counts[deep], seq)
        _check_group(ctx["q"], ctx["name"], counts[deep])

    r = H.Rounds(benchmark, rounds=5, setup=setup, work=work, check=check, teardown=_close)
    per = {d: counts[d] * reps[d] for d in times}
    base = per[shallow] / min(times[shallow])
    report(f"drain get_many+ack_many, {shallow:,} deep", base, "msgs/s", "-", None,
           median=per[shallow] / statistics.median(times[shallow]),
           note=f"each sample {reps[shallow]} drains of all {counts[shallow]:,}, by new groups")
    for d, best, med in ((middle, per[middle] / min(times[middle]),
                          per[middle] / statistics.median(times[middle])),
                         (deep, counts[deep] / r.best, counts[deep] / r.median)):
        report(f"drain get_many+ack_many, first {counts[d]:,} of {d:,} deep", best, "msgs/s",
               f"drain of the {shallow:,} deep queue", base, median=med, ratio_target=(">=", 0.9))


# -- 4. batched commits against a commit per ack -----------------------------------------
def test_batched_vs_commit_per_ack(benchmark, log_1m, report, floor_fdatasync_prealloc):
    """get_many(1000) + ack() per message: commits every commit_every acks (the
    default), timed by the rounds; and, in each round's setup, the same with
    commit() after every ack (over fewer messages: each is a durable
    transaction of the index)."""
    seq, path = log_1m["seq"], log_1m["path"]
    n = H.scaled_multiple(200_000, BATCH)
    n_each = H.scaled_multiple(5_000, BATCH)
    each_times: list[float] = []

    def setup():
        ctx = _open_consumer(path)
        try:
            t = time.perf_counter()
            out = _drain_many(ctx["c"], n_each, _ack_each(ctx["c"], commit_each=True))
            each_times.append(time.perf_counter() - t)
            _check_runs(*out, n_each, seq)
            _check_group(ctx["q"], ctx["name"], n_each)
        finally:
            _close(ctx)
        return _open_consumer(path)

    def work(ctx):
        ctx["out"] = _drain_many(ctx["c"], n, _ack_each(ctx["c"], commit_each=False))

    def check(ctx):
        _check_runs(*ctx["out"], n, seq)
        _check_group(ctx["q"], ctx["name"], n)

    r = H.Rounds(benchmark, rounds=3, setup=setup, work=work, check=check, teardown=_close)
    each, each_med = n_each / min(each_times), n_each / statistics.median(each_times)
    lat = floor_fdatasync_prealloc.value
    report("get_many(1000)+ack()+commit() per ack, 100 B", each, "msgs/s",
           "1 / fdatasync (prealloc)", 1 / lat, median=each_med,
           note=f"{n_each:,} messages per round")
    report("get_many(1000)+ack(), batched commits vs a commit per ack", n / r.best, "msgs/s",
           "commit() after every ack", each, median=n / r.median, ratio_target=(">=", 20),
           note=f"{n:,} messages per round, commit_every={logq.GroupOptions().commit_every}")


# -- 5. peer: persist-queue's SQLiteAckQueue -------------------------------------------------
# Acked rows stay in SQLiteAckQueue's table until clear_acked_data() (which
# keeps the latest 1,000), and its get() scans past them (status is not
# indexed): without the clearing its get+ack rate falls as it goes (from
# ~3.4 k/s to ~0.5 k/s over 20 k messages on the reference VM).  Its own
# remedy, timed: clear_acked_data() every 1,000 acks.
PEER_CLEAR_EVERY = 1000
# persist-queue stores what its serializer makes of an item: with this one,
# the 100 B payload itself (the default would pickle it).
_RAW = types.SimpleNamespace(dumps=bytes, loads=bytes)


def _peer_round(qdir: str, payloads: list[bytes]) -> float | None:
    """Fill a new SQLiteAckQueue with the payloads (untimed), then time
    get()+ack() of each; None if persist-queue is not installed."""
    try:
        from persistqueue import SQLiteAckQueue
    except ImportError:
        return None
    path = os.path.join(qdir, f"peer{next(_groups)}")
    pq = SQLiteAckQueue(path, serializer=_RAW, auto_commit=True)
    try:
        put = pq.put
        for p in payloads:
            put(p)
        got = []
        add = got.append
        get, ack, clear = pq.get, pq.ack, pq.clear_acked_data
        t = time.perf_counter()
        for i in range(1, len(payloads) + 1):
            item = get(block=False)
            ack(item)
            add(item)
            if not i % PEER_CLEAR_EVERY:
                clear()
        secs = time.perf_counter() - t
        assert got == payloads, "the peer gave back wrong payloads"
        # every message acked: none ready or out (acked rows are cleared but the latest 1,000)
        assert pq.unack_count() == 0 and pq.ready_count() == 0, "the peer left messages unacked"
        assert 0 < pq.acked_count() <= PEER_CLEAR_EVERY
        return secs
    finally:
        pq.close()
        shutil.rmtree(path, ignore_errors=True)


def test_get_ack_vs_persist_queue(benchmark, log_1m, qdir, report, note, floor_fdatasync_prealloc):
    """get()+ack() per message over the same n payloads: logq (timed by the
    rounds; default batched commits), and in each round's setup logq with
    commit() after every ack and persist-queue's SQLiteAckQueue, which
    commits (fsyncs, SQLite WAL with synchronous=FULL) the get and the ack
    of every message.  persist-queue is optional: without it the peer is
    reported as not measured."""
    seq, path = log_1m["seq"], log_1m["path"]
    n = H.scaled_multiple(20_000, BATCH)
    payloads = H.sequence(seq.pool, n)
    peer_times: list[float] = []
    each_times: list[float] = []
    missing: list[bool] = []

    def loop(ctx, commit_each):
        c = ctx["c"]
        get, ack, commit = c.get, c.ack, c.commit
        datas = ctx["datas"] = []
        add = datas.append
        if commit_each:
            for _ in range(n):
                m = get(GET_TIMEOUT)
                ack(m)
                commit()
                add(m.data)
        else:
            for _ in range(n):
                m = get(GET_TIMEOUT)
                ack(m)
                add(m.data)
        c.commit()

    def check(ctx):
        assert ctx["datas"] == payloads, "get() delivered wrong payloads"
        _check_group(ctx["q"], ctx["name"], n, prefetched=True)

    def setup():
        secs = _peer_round(qdir, payloads)
        if secs is None:
            missing.append(True)
        else:
            peer_times.append(secs)
        ctx = _open_consumer(path)
        try:
            t = time.perf_counter()
            loop(ctx, True)
            each_times.append(time.perf_counter() - t)
            check(ctx)
        finally:
            _close(ctx)
        return _open_consumer(path)

    r = H.Rounds(benchmark, rounds=2, setup=setup, work=lambda ctx: loop(ctx, False), check=check,
                 teardown=_close)
    mine, mine_med = n / r.best, n / r.median
    each, each_med = n / min(each_times), n / statistics.median(each_times)
    if missing:
        note("persist-queue is not installed (pip install persist-queue): the peer was not measured")
        for name, fig, med in (("logq get()+ack() vs persist-queue SQLiteAckQueue", mine, mine_med),
                               ("logq get()+ack()+commit() vs persist-queue SQLiteAckQueue", each,
                                each_med)):
            report(name, fig, "msgs/s", "persist-queue (not measured)", None, median=med,
                   note="peer not measured: persist-queue not installed")
        return
    peer, peer_med = n / min(peer_times), n / statistics.median(peer_times)
    report("persist-queue SQLiteAckQueue get()+ack(), 100 B (peer)", peer, "msgs/s",
           "1 / fdatasync (prealloc)", 1 / floor_fdatasync_prealloc.value, median=peer_med,
           note=f"{n:,} messages per round; every get and ack is a durable SQLite transaction; "
                f"clear_acked_data() every {PEER_CLEAR_EVERY:,} acks")
    report("logq get()+ack() vs persist-queue SQLiteAckQueue", mine, "msgs/s",
           "persist-queue get()+ack()", peer, median=mine_med,
           note="logq commits every 1,000 acks (default); persist-queue every get and ack")
    report("logq get()+ack()+commit() vs persist-queue SQLiteAckQueue", each, "msgs/s",
           "persist-queue get()+ack()", peer, median=each_med,
           note="both durable at every ack")

"""Opening a big log (LOGQ_BENCH_LOG_MB, default 1 GiB, of 1 KiB records):
after a clean shutdown (beside a log 1/8 the size: open time must not grow
with the log), after a producer was SIGKILLed mid-write (recovery), and the
memory a process holding it open costs.

One big log serves the whole module (built once, removed at its end).  The
recovery rounds append to it; ``BigLog.next``/``last`` follow what it holds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import bench_helpers as H
import pytest

import logq
from logq import _format as F

MiB = 1 << 20
KIB_REC = F.RECORD_HEADER_SIZE + 1024
SEGMENT = logq.Options().segment_bytes


class BigLog:
    """A closed queue of n 1 KiB records; record i is pool[i % len(pool)]
    until ``built``, then whatever the recovery rounds appended."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.pool = H.make_pool(1024, tag="big")
        self.n = max(1000, size // KIB_REC // 1000 * 1000)
        with logq.open(path, fsync="never") as q:
            chunk = H.sequence(self.pool, 1000 * len(self.pool))   # periodic: reuse it
            for start in range(0, self.n, 1000):
                s = start % len(self.pool)
                q.put_many(chunk[s:s + 1000])
            assert q.next_offset == self.n
            for i in (0, 1, self.n // 2, self.n - 1):
                assert q.read(i) == self.expected(i), f"record {i} of the big log is wrong"
            self.disk_bytes = q.stats()["segment_bytes_on_disk"]
        self.next = self.n                  # what the log holds now
        self.last = self.expected(self.n - 1)

    def expected(self, i: int) -> bytes:
        return self.pool[i % len(self.pool)]

    def check_open(self, q: logq.Queue) -> None:
        """Cheap checks that ``q`` is this log, whole: its ends and a sample."""
        assert q.first_offset == 0
        assert q.next_offset == self.next, f"next offset {q.next_offset}, expected {self.next}"
        assert q.read(self.next - 1) == self.last
        for i in random.Random(self.next).sample(range(self.n), 8):
            assert q.read(i) == self.expected(i), f"record {i} of the big log is wrong"


def _size_mib(mib: int) -> str:
    return f"{mib / 1024:g} GiB" if mib >= 1024 else f"{mib:g} MiB"


@pytest.fixture(scope="module")
def logs(bench_dir, note):
    """The big log and one 1/8 its size, in bench_dir; removed after the module."""
    want = H.LOG_MB * MiB
    free = shutil.disk_usage(bench_dir).free
    size = want
    if free < 3 * want:
        size = max(SEGMENT, free // 3 // SEGMENT * SEGMENT)
        if free < 3 * size:
            pytest.skip(f"only {free >> 20} MiB free in {bench_dir}: not enough for the open benchmarks")
        note(f"only {free >> 20} MiB free in {bench_dir}: the big log is {size >> 20} MiB "
             f"instead of LOGQ_BENCH_LOG_MB={H.LOG_MB}")
    big_dir = os.path.join(bench_dir, "big")
    small_dir = os.path.join(bench_dir, "eighth")
    try:
        t = time.perf_counter()
        big = BigLog(big_dir, size)
        small = BigLog(small_dir, size // 8)
        print(f"\n[setup] built {big.disk_bytes >> 20} MiB ({big.n:,} records) and "
              f"{small.disk_bytes >> 20} MiB ({small.n:,} records) logs in {time.perf_counter() - t:.1f} s")
        yield {"big": big, "small": small, "mib": size >> 20}
    finally:
        shutil.rmtree(big_dir, ignore_errors=True)
        shutil.rmtree(small_dir, ignore_errors=True)


def _timed_open(path: str) -> tuple[logq.Queue, float]:
    t = time.perf_counter()
    q = logq.open(path)
    return q, time.perf_counter() - t


def test_open_clean(benchmark, logs, report, floor_fdatasync_prealloc):
    """logq.open after a clean shutdown: the big log (timed by pytest-benchmark)
    and, interleaved in each round's setup, the 1/8 log."""
    big, small = logs["big"], logs["small"]
    small_times = []

    def setup():
        q, dt = _timed_open(small.path)
        try:
            st = q.stats()
            assert st["last_shutdown_clean"] and st["recovery_truncated_bytes"] == 0
            small.check_open(q)
        finally:
            q.close()
        small_times.append(dt)
        return {}

    def work(ctx):
        ctx["q"] = logq.open(big.path)

    def check(ctx):
        st = ctx["q"].stats()
        assert st["last_shutdown_clean"], "a cleanly closed log was opened as unclean"
        assert st["recovery_truncated_bytes"] == 0
        big.check_open(ctx["q"])

    def teardown(ctx):
        if "q" in ctx:
            ctx["q"].close()

    r = H.Rounds(benchmark, rounds=21, setup=setup, work=work, check=check, teardown=teardown)
    lat = floor_fdatasync_prealloc.value * 1e3
    mib = logs["mib"]
    report(f"open after clean shutdown, {_size_mib(mib)} log", r.best * 1e3, "ms",
           "fdatasync (prealloc)", lat, median=r.median * 1e3, target=("<=", 50),
           note=f"{big.n:,} records, {big.disk_bytes >> 20} MiB of segments")
    s_best, s_med = min(small_times) * 1e3, sorted(small_times)[len(small_times) // 2] * 1e3
    report(f"open after clean shutdown, {_size_mib(mib / 8)} log", s_best, "ms",
           "fdatasync (prealloc)", lat, median=s_med, target=("<=", 50))
    report(f"open time growth, {_size_mib(mib)} vs {_size_mib(mib / 8)} log", r.best * 1e3, "ms",
           f"open of the {_size_mib(mib / 8)} log", s_best, median=r.median * 1e3,
           note="ratio ~1: open time does not grow with the log (8x the size)")


_CHILD = """
import os, sys
import bench_helpers as H
import logq
path, tag = sys.argv[1], sys.argv[2]
q = logq.open(path, fsync="never")
pool = H.make_pool(100, tag=tag)
os.write(1, b"first %d\\n" % q.next_offset)
put, done = q.put, 0
while True:
    for p in pool:
        put(p)
    done += len(pool)
    os.write(1, b"done %d\\n" % done)     # every record before this one was put
"""


def _kill_producer(path: str, tag: str, want: int, timeout: float = 30.0) -> tuple[int, int, int]:
    """Start a producer on ``path``, SIGKILL it once it reports ``want``
    records put (mid-loop); (its first offset, records it reported, kill
    signal status)."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, path, tag], stdout=subprocess.PIPE,
                            env=H.child_env())
    first, done = None, 0
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            word, value = line.split()
            if word == b"first":
                first = int(value)
            else:
                done = int(value)
            if done >= want or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:     # what it reported before it died
            word, value = line.split()
            if word == b"done":
                done = max(done, int(value))
    finally:
        proc.kill()
        rc = proc.wait()
        proc.stdout.close()
    assert first is not None, "the producer did not open the queue"
    assert rc == -signal.SIGKILL, f"the producer ended with {rc}, not by SIGKILL"
    return first, done, rc


def test_open_after_sigkill(benchmark, logs, report, floor_fdatasync_prealloc):
    """logq.open (recovery) after a producer was SIGKILLed while putting
    (fsync="never") on the big log; every record it reported must be there."""
    big = logs["big"]
    want = H.scaled(200_000, 5000)
    rounds = iter(range(100))
    info = []

    def setup():
        tag = f"kill{next(rounds)}"
        first, done, _ = _kill_producer(big.path, tag, want)
        assert first == big.next, f"the producer started at {first}, the log ended at {big.next}"
        return {"tag": tag, "first": first, "done": done}

    def work(ctx):
        ctx["q"] = logq.open(big.path)

    def check(ctx):
        q, first, done = ctx["q"], ctx["first"], ctx["done"]
        st = q.stats()
        assert not st["last_shutdown_clean"], "a SIGKILLed log was opened as clean"
        end = q.next_offset
        assert end >= first + done, f"the producer reported {done} records, {end - first} are there"
        # every record the producer put (reported or not) is there and intact
        H.verify_range(q, first, H.sequence(H.make_pool(100, tag=ctx["tag"]), end - first))
        assert st["lost_records"] == 0
        info.append((done, end - first - done, st["recovery_truncated_bytes"]))
        big.next, big.last = end, q.read(end - 1)
        assert q.read(big.n - 1) == big.expected(big.n - 1)

    def teardown(ctx):
        if "q" in ctx:
            ctx["q"].close()

    r = H.Rounds(benchmark, rounds=5, setup=setup, work=work, check=check, teardown=teardown)
    lat = floor_fdatasync_prealloc.value * 1e3
    reported = sum(i[0] for i in info) // len(info)
    extra = sum(i[1] for i in info) // len(info)
    torn = sum(i[2] for i in info) // len(info)
    report(f"open after SIGKILL mid-write (recovery), {_size_mib(logs['mib'])} log", r.best * 1e3,
           "ms", "fdatasync (prealloc)", lat, median=r.median * 1e3, target=("<=", 200),
           note=f"per round: ~{reported:,} records reported by the producer, ~{extra:,} more found, "
                f"~{torn:,} torn bytes cut")


_RSS = """
import json, sys
import psutil
import logq
out = {}
if sys.argv[1] == "hold":
    q = logq.open(sys.argv[2])
    last = q.next_offset - 1
    out["ok"] = last == int(sys.argv[3]) and q.read(last).hex() == sys.argv[4]
    out["messages"] = q.stats()["messages"]
    out["rss"] = psutil.Process().memory_info().rss
    q.close()
else:
    out["rss"] = psutil.Process().memory_info().rss
print(json.dumps(out))
"""


def _rss(*args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", _RSS, *args], capture_output=True, env=H.child_env(),
                         timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    return json.loads(res.stdout)


def _newest_base(path: str) -> int:
    return max(b for b in map(F.parse_segment_name, os.listdir(path)) if b is not None)


def _fill_active(big: BigLog, fill: str) -> int:
    """Append 1 KiB records to the big log until its active segment holds
    only them and is nearly empty ("low": just rolled) or nearly full
    ("high": 90% of segment_bytes); the bytes of records it then holds."""
    pay = big.expected(0)
    with logq.open(big.path, fsync="never") as q:
        base = _newest_base(big.path)
        while _newest_base(big.path) == base:     # roll: up to one segment of 1 KiB records
            q.put_many([pay] * 1000)
        base = _newest_base(big.path)
        if fill == "high":
            want = int(SEGMENT * 0.9) // KIB_REC
            while q.next_offset - base < want:
                q.put_many([pay] * min(1000, want - (q.next_offset - base)))
        assert _newest_base(big.path) == base
        big.next, big.last = q.next_offset, pay
        return (q.next_offset - base) * KIB_REC


@pytest.mark.parametrize("fill", ["low", "high"])
def test_rss_holding_big_log(benchmark, logs, report, fill):
    """RSS of a process that opened the big log, read its last record and
    called stats(), minus that of a bare interpreter that imported logq
    (both measured with psutil, in fresh subprocesses, each round).

    Reading the last record after an open scans the active segment from its
    start (sealed segments have a stored sparse index, the active one does
    not), so the figure depends on how full the active segment is, not on
    the size of the log: measured just after a roll ("low") and with the
    active segment 90% full ("high")."""
    big = logs["big"]
    used = _fill_active(big, fill)
    bare_rss = []

    def setup():
        bare_rss.append(_rss("bare")["rss"])
        return {}

    def work(ctx):
        ctx["out"] = _rss("hold", big.path, str(big.next - 1), big.last.hex())
        return ctx["out"]

    def check(ctx):
        assert ctx["out"]["ok"], "the holding process did not read the last record back"
        assert ctx["out"]["messages"] == big.next

    r = H.Rounds(benchmark, rounds=3, setup=setup, work=work, check=check)
    deltas = sorted((o["rss"] - b) / MiB for o, b in zip(r.results, bare_rss))
    bare = min(bare_rss) / MiB
    report(f"RSS holding the {_size_mib(logs['mib'])} log open, active segment {fill}, minus bare",
           deltas[0], "MiB", "bare interpreter + import logq", bare, median=deltas[len(deltas) // 2],
           target=("<=", 30),
           note=f"open + read(last) + stats(); the active segment holds {used / MiB:.1f} MiB "
                f"of records (segment_bytes {SEGMENT // MiB} MiB)")

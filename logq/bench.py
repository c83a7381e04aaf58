"""The throughput harness behind ``logq bench``: logq's workloads beside this
machine's floors, measured in the same run so every figure reads as a ratio.

Floors: one ``os.write`` per record, the same records joined into 1 MiB
writes, the latency of ``fdatasync`` after a 4 KiB append, and slicing the
payloads out of the mapped segments.
"""

from __future__ import annotations

import mmap
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import logq


@dataclass
class Result:
    name: str
    msgs_per_s: float
    mb_per_s: float
    floor: str = ""
    floor_msgs_per_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.msgs_per_s / self.floor_msgs_per_s if self.floor_msgs_per_s else 0.0


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
        fields = C.scan(h, F.SEGMENT_HEADER_SIZE, len(mm), base, 1 << 40, True)[3] or []
        C.release(h)
        runs.append((mm, fields[1::F.SCAN_FIELDS], fields[2::F.SCAN_FIELDS]))
    n = sum(len(p) for _, p, _ in runs)
    t = time.perf_counter()
    for mm, pos, lens in runs:
        [mm[p:p + k] for p, k in zip(pos, lens)]
    rate = _rate(n, time.perf_counter() - t)
    for mm, _, _ in runs:
        mm.close()
    return rate


def run(*, messages: int = 300_000, payload_size: int = 100, dirpath: str | None = None,
        progress: Callable[[str], None] | None = None) -> list[Result]:
    """Run the default workload set on a temporary queue under ``dirpath``."""
    say = progress or (lambda s: None)
    base = tempfile.mkdtemp(prefix="logq-bench-", dir=dirpath)
    payload = b"x" * payload_size
    mb = payload_size / 1e6
    out: list[Result] = []
    try:
        say("floors")
        f_write = floor_write(base, messages, payload)
        f_joined = floor_joined(base, messages, payload)
        f_sync = floor_fdatasync(base)
        sync_rate = 1 / f_sync

        def timed(name: str, n: int, body: Callable[[logq.Queue], object], **opts: str) -> float:
            """msgs/s of ``body(q)`` handling ``n`` records of queue ``name``."""
            say(name)
            with logq.open(os.path.join(base, name), **opts) as q:
                t = time.perf_counter()
                body(q)
                return _rate(n, time.perf_counter() - t)

        def put_loop(count: int) -> Callable[[logq.Queue], None]:
            def body(q: logq.Queue) -> None:
                for _ in range(count):
                    q.put(payload)
            return body

        def put_many_loop(size: int, rounds: int) -> Callable[[logq.Queue], None]:
            batch = [payload] * size
            def body(q: logq.Queue) -> None:
                for _ in range(rounds):
                    q.put_many(batch)
            return body

        def in_threads(q: logq.Queue) -> None:
            threads = [threading.Thread(target=put_loop(n_always // 4), args=(q,)) for _ in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()

        def read_all(q: logq.Queue) -> None:
            off = q.first_offset
            while True:
                first, got = q.read_many(off, 4096)
                if not got:
                    return
                off = first + len(got)

        n_always = 2000
        rounds = max(1, messages // 1000)
        rows = [
            ("put() fsync=never", timed("q1", messages, put_loop(messages), fsync="never"),
             "os.write per record", f_write),
            ("put_many(1000) fsync=never",
             timed("q2", rounds * 1000, put_many_loop(1000, rounds), fsync="never"),
             "joined 1 MiB writes", f_joined),
            ("put() fsync=always, 1 thread", timed("q3", n_always, put_loop(n_always), fsync="always"),
             "1 / fdatasync latency", sync_rate),
            ("put() fsync=always, 8 threads", timed("q4", 8 * (n_always // 4), in_threads, fsync="always"),
             "1 / fdatasync latency", sync_rate),
            ("put_many(100) fsync=always", timed("q5", 500 * 100, put_many_loop(100, 500), fsync="always"),
             "100 records / fdatasync", 100 * sync_rate),
            ("read_many(4096) sequential", timed("q2", rounds * 1000, read_all, fsync="never"),
             "mmap slice loop", floor_slices(os.path.join(base, "q2"))),
        ]
        out = [Result(name, r, r * mb, floor, value) for name, r, floor, value in rows]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def format_table(results: list[Result]) -> str:
    rows = [("workload", "msgs/s", "MB/s", "floor (same run)", "floor msgs/s", "ratio")]
    for r in results:
        rows.append((r.name, f"{r.msgs_per_s:,.0f}", f"{r.mb_per_s:,.1f}", r.floor,
                     f"{r.floor_msgs_per_s:,.0f}", f"{r.ratio:.2f}x"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_dicts(results: list[Result]) -> list[dict]:
    return [dict(asdict(r), ratio=r.ratio) for r in results]

"""This machine's floors (``bench``), measured in the same run as the
figures they are read against: one ``os.write`` per record, the records
joined into 1 MiB writes, ``fdatasync`` after 4 KiB (appended, or in place
in a preallocated file), and the payloads sliced out of the mapped segments
of a closed queue; :class:`Floors` says which floor a run is read against.
The benchmarks (``benchmarks/conftest.py``) use the same functions."""

from __future__ import annotations

import mmap
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import logq
from logq._bench_params import Params

FLOOR_MAX_RECORDS = 200_000      # floors: at most this many records...
FLOOR_MIN_RECORDS = 20_000       # ...and at least this many
SYNC_ROUNDS = 200                # fdatasync floor: median of this many


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

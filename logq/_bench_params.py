"""What a ``logq bench`` run is asked to do (``bench``): the workloads, one
run's settings (:class:`Params`, checked when it is made), how the command
line's values and ``--sweep PARAM=v1,v2,...`` are read, and the grid of runs
they make.  Also what every other part of the harness shares: the limits of
a run and :class:`BenchError`.  No I/O here."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import logq

WORKLOADS = ("produce", "consume", "e2e", "pool", "tasks")
QUEUE_WORKLOADS = WORKLOADS[:4]  # what `logq bench` runs unless told (tasks: --workload tasks, or all)
PEER_PHASE_SECONDS = 3.0         # a peer's produce (or consume) phase stops after this long
STALL_SECONDS = 120.0            # a run that makes no progress this long is abandoned


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
        if self.workload == "tasks":
            return 0.005        # App.pool's
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
    if "tasks" in workloads and "pool" not in workloads:
        # (the tasks row is read beside the raw pool's no-op rate of the same run)
        workloads = [w2 for w in workloads for w2 in (["pool", w] if w == "tasks" else [w])]
    out = []
    for w in workloads:
        for combo in itertools.product(*[vals for _, vals in sweeps]):
            out.append(replace(base, workload=w, **dict(zip(names, combo))))
    return out

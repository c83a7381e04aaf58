"""The child processes of ``logq bench`` (``bench``): the start method,
running one function in a child of its own, and what a process costs (CPU
seconds, peak RSS, of this process and of all its descendants).  Every
function a child runs is defined at module level in the bench modules, so
forkserver and spawn children can import it by name."""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import traceback
from typing import Any, Callable

from logq._bench_params import BenchError


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads (getrusage:
    microseconds, where os.times() counts 10 ms ticks)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    r = resource.getrusage(who).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _context() -> Any:
    """forkserver where there is one (children start fast from a server that
    has logq imported), spawn elsewhere: never a bare fork of a process with
    threads (and queues) of its own."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["logq.bench"])     # (which imports every bench module)
        return ctx
    return multiprocessing.get_context("spawn")


def _child_call(fn: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
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

"""Shared machinery of the benchmarks: sizes from the environment, payloads
that name themselves (so a check can tell a lost, duplicated or reordered
record from the right one), a round runner on top of
``benchmark.pedantic`` that times only the work and checks every round
outside the timed part, and a verifier that reads a queue back.

Child processes (test_open.py) import this module too: ``child_env()`` puts
this directory and the directory logq is imported from on their PYTHONPATH.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)

try:
    import logq  # noqa: F401
except ImportError:  # not installed: benchmark the checkout this directory is in
    sys.path.insert(0, ROOT)
    import logq  # noqa: F401

LOGQ_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(logq.__file__)))


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, not {raw!r}")
    return value


#: Multiplies every record count (not the 1 GiB log, see LOG_MB).
SCALE = _env_float("LOGQ_BENCH_SCALE", 1.0)
#: Size of the big log of test_open.py, in MiB.
LOG_MB = int(_env_float("LOGQ_BENCH_LOG_MB", 1024))


def scaled(n: int, minimum: int = 1) -> int:
    """``n`` times LOGQ_BENCH_SCALE, at least ``minimum``."""
    return max(minimum, int(n * SCALE))


def scaled_multiple(n: int, unit: int, minimum: int = 1) -> int:
    """``scaled(n)`` rounded down to a multiple of ``unit`` (at least ``minimum`` units)."""
    return max(minimum, scaled(n) // unit) * unit


# Record counts shared by a benchmark and the floor it is read against, so
# that both move the same number of bytes through the page cache.
def n_small_records() -> int:
    """100 B records per round of the fsync="never" producers (and their floors)."""
    return scaled_multiple(1_000_000, 1000)


def n_kib_records() -> int:
    """1 KiB records per round of put_many(1000) of 1 KiB (and its floor)."""
    return scaled_multiple(262_144, 1000)


# -- payloads ------------------------------------------------------------------
POOL = 1021   # distinct payloads per pool (prime: a shift of the sequence shows)


def make_pool(size: int, tag: str = "r", k: int = POOL) -> list[bytes]:
    """``k`` distinct payloads of exactly ``size`` bytes; payload i starts
    with ``tag`` and i, the rest is a filler that depends on i."""
    out = []
    for i in range(k):
        head = f"{tag}:{i}:".encode()
        if len(head) > size:
            raise ValueError(f"payload size {size} too small for tag {tag!r}")
        fill = bytes((i * 7 + j) & 0xFF for j in range(64))
        body = (fill * (size // 64 + 1))[:size - len(head)]
        out.append(head + body)
    return out


def sequence(pool: Sequence[bytes], n: int, start: int = 0) -> list[bytes]:
    """The payloads of records ``start .. start+n-1`` when record i carries
    ``pool[i % len(pool)]`` (a list of references: cheap even for millions)."""
    k = len(pool)
    s = start % k
    reps = (s + n) // k + 1
    return (list(pool) * reps)[s:s + n]


def batches(seq: Sequence[bytes], size: int) -> list[list[bytes]]:
    return [list(seq[i:i + size]) for i in range(0, len(seq), size)]


# -- checking what was measured -----------------------------------------------------
def verify_range(q: Any, first: int, expected: Sequence[bytes], chunk: int = 4096) -> None:
    """Assert that the records ``first .. first+len(expected)-1`` of ``q``
    are exactly ``expected``: none lost, damaged, duplicated or reordered."""
    off = first
    end = first + len(expected)
    while off < end:
        at, got = q.read_many(off, min(chunk, end - off))
        assert at == off, f"record {off} missing: the next intact record is {at}"
        assert got, f"records {off}..{end - 1} missing (queue ends at {q.next_offset})"
        want = expected[off - first:off - first + len(got)]
        if got != want:
            for i, (g, w) in enumerate(zip(got, want)):
                assert g == w, f"record {off + i}: read {g[:24]!r}..., expected {w[:24]!r}..."
        off += len(got)


def verify_queue(q: Any, expected: Sequence[bytes], first: int = 0) -> None:
    """Assert that ``q`` holds exactly ``expected`` from ``first`` to its end."""
    assert q.first_offset == first, f"first offset {q.first_offset}, expected {first}"
    assert q.next_offset == first + len(expected), \
        f"queue holds {q.next_offset - first} records, {len(expected)} were put"
    verify_range(q, first, expected)
    assert q.stats()["lost_records"] == 0


# -- rounds --------------------------------------------------------------------------
class Rounds:
    """Run ``work(ctx)`` for ``rounds`` rounds under ``benchmark.pedantic``.

    ``setup()`` makes each round's context (untimed); ``check(ctx)`` asserts
    the round's result and ``teardown(ctx)`` releases it (both untimed, run
    before the next round's setup and after the last round).  ``times`` are
    the seconds each round's ``work`` took, timed here as well, so the
    figures exist even under ``--benchmark-disable``."""

    def __init__(self, benchmark: Any, *, rounds: int, setup: Callable[[], Any],
                 work: Callable[[Any], Any], check: Callable[[Any], None] | None = None,
                 teardown: Callable[[Any], None] | None = None) -> None:
        self.times: list[float] = []
        self.results: list[Any] = []
        pending: list[Any] = []

        def finish() -> None:
            while pending:
                ctx = pending.pop()
                try:
                    if check is not None:
                        check(ctx)
                finally:
                    if teardown is not None:
                        teardown(ctx)

        def _setup() -> tuple[tuple[Any], dict]:
            finish()
            ctx = setup()
            pending.append(ctx)
            return (ctx,), {}

        def _run(ctx: Any) -> None:
            t0 = time.perf_counter()
            r = work(ctx)
            self.times.append(time.perf_counter() - t0)
            self.results.append(r)

        try:
            benchmark.pedantic(_run, setup=_setup, rounds=rounds, iterations=1, warmup_rounds=0)
            finish()
        finally:
            # a failed round: still release what it held
            while pending:
                ctx = pending.pop()
                if teardown is not None:
                    teardown(ctx)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python: this one (LOGQ_PURE included),
    with logq and this directory importable."""
    env = dict(os.environ)
    parts = [LOGQ_ROOT, BENCH_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env

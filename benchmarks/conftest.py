"""Benchmark configuration: this machine's floors, measured once per run with
``logq.bench``'s floor functions (plus an fdatasync floor for a preallocated
file, the way logq writes its segments), a ``report`` fixture that every
benchmark calls with its figure and the floor it is read against, and the
table of every figure, its floor and their ratio at the end of the run
(also written as JSON to the path in LOGQ_BENCH_JSON, if set).

Nothing here asserts on speed: the machine is shared and noisy.  The
benchmarks assert on what they measured instead (see README.md).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_helpers as H  # noqa: E402

import logq  # noqa: E402
import logq.bench as LB  # noqa: E402

FLOOR_REPEATS = 3                 # throughput floors: best of this many runs
SYNC_ROUNDS = 200                 # fdatasync floors: median of this many


@dataclass
class Figure:
    name: str
    figure: float
    unit: str
    floor_name: str
    floor: float | None
    ratio: float | None
    median: float | None = None        # the median round, where there are rounds
    target: str = ""
    met: bool | None = None
    note: str = ""
    test: str = ""


@dataclass
class Floor:
    name: str
    value: float
    unit: str
    also: str = ""                     # the same floor in another unit
    how: str = ""


@dataclass
class Run:
    figures: list[Figure] = field(default_factory=list)
    floors: dict[str, Floor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    t0: float = field(default_factory=time.perf_counter)


_RUN = pytest.StashKey[Run]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RUN] = Run()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", H.ROOT, *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _codec() -> str:
    return "native" if logq.native_enabled() else "pure"


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"logq {logq.__version__} from {H.LOGQ_ROOT}, codec: {_codec()} "
            f"(LOGQ_PURE={os.environ.get('LOGQ_PURE', '')!r})",
            f"LOGQ_BENCH_SCALE={H.SCALE:g} LOGQ_BENCH_LOG_MB={H.LOG_MB}"]


# -- a scratch directory for the whole run ---------------------------------------
@pytest.fixture(scope="session")
def bench_dir() -> Any:
    """Where queues and floor files go (LOGQ_BENCH_DIR, default the system
    temp dir); removed at the end of the run."""
    d = tempfile.mkdtemp(prefix="logq-bench-", dir=os.environ.get("LOGQ_BENCH_DIR") or None)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qdir(bench_dir: str, request: pytest.FixtureRequest) -> Any:
    """A fresh directory for this test's queues, removed after it."""
    d = tempfile.mkdtemp(prefix=request.node.name[:40].replace("/", "_") + "-", dir=bench_dir)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- floors -----------------------------------------------------------------------
def _best_rate(fn: Callable[[], float]) -> float:
    return max(fn() for _ in range(FLOOR_REPEATS))


def _register(request: pytest.FixtureRequest, floor: Floor) -> Floor:
    request.config.stash[_RUN].floors[floor.name] = floor
    print(f"\n[floor] {floor.name}: {floor.value:,.6g} {floor.unit}"
          + (f" ({floor.also})" if floor.also else ""))
    return floor


@pytest.fixture(scope="session")
def floor_write(bench_dir: str, request: pytest.FixtureRequest) -> Floor:
    """Records/s with one os.write per 100 B record (logq.bench.floor_write)."""
    n = H.n_small_records()
    rate = _best_rate(lambda: LB.floor_write(bench_dir, n, b"w" * 100))
    return _register(request, Floor("os.write per 100 B record", rate, "msgs/s",
                                    f"{rate * 100 / 1e6:,.1f} MB/s",
                                    f"best of {FLOOR_REPEATS} x {n:,} writes"))


def _joined(bench_dir: str, request: pytest.FixtureRequest, size: int) -> Floor:
    n = H.n_small_records() if size < 1024 else H.n_kib_records()
    rate = _best_rate(lambda: LB.floor_joined(bench_dir, n, b"j" * size))
    label = f"{size} B" if size < 1024 else f"{size // 1024} KiB"
    return _register(request, Floor(f"joined 1 MiB writes, {label} records", rate, "msgs/s",
                                    f"{rate * size / 1e6:,.1f} MB/s",
                                    f"best of {FLOOR_REPEATS} x {n:,} records"))


@pytest.fixture(scope="session")
def floor_joined_100(bench_dir: str, request: pytest.FixtureRequest) -> Floor:
    """Records/s when 100 B records are joined and written 1 MiB at a time."""
    return _joined(bench_dir, request, 100)


@pytest.fixture(scope="session")
def floor_joined_1k(bench_dir: str, request: pytest.FixtureRequest) -> Floor:
    """Records/s when 1 KiB records are joined and written 1 MiB at a time."""
    return _joined(bench_dir, request, 1024)


def _sync_floor(bench_dir: str, request: pytest.FixtureRequest, name: str, in_place: bool) -> Floor:
    lat = LB.floor_fdatasync(bench_dir, SYNC_ROUNDS, in_place=in_place)
    return _register(request, Floor(name, lat, "s", f"{lat * 1e6:,.0f} us, {1 / lat:,.0f}/s",
                                    f"median of {SYNC_ROUNDS}"))


@pytest.fixture(scope="session")
def floor_fdatasync(bench_dir: str, request: pytest.FixtureRequest) -> Floor:
    """Median fdatasync latency (s) after a 4 KiB append."""
    return _sync_floor(bench_dir, request, "fdatasync after a 4 KiB append", False)


@pytest.fixture(scope="session")
def floor_fdatasync_prealloc(bench_dir: str, request: pytest.FixtureRequest) -> Floor:
    """Median fdatasync latency (s) after overwriting 4 KiB of a posix_fallocate'd
    file in place, the way logq writes into its segments."""
    return _sync_floor(bench_dir, request, "fdatasync, 4 KiB in place in a preallocated file", True)


@pytest.fixture(scope="session")
def add_floor(request: pytest.FixtureRequest) -> Callable[..., Floor]:
    """``add_floor(name, value, unit, also="", how="")``: list a floor that a
    benchmark measured itself (e.g. test_read.py's mmap slice loop) with the others."""
    def _add(name: str, value: float, unit: str, also: str = "", how: str = "") -> Floor:
        return _register(request, Floor(name, value, unit, also, how))
    return _add


# -- reporting -------------------------------------------------------------------------
def _meets(value: float, target: tuple[str, float] | None) -> bool | None:
    if target is None or value is None:
        return None
    op, bound = target
    return value >= bound if op == ">=" else value <= bound


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:,.1f}"
    if abs(v) >= 0.01:
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return f"{v:.3g}"


def _target_text(target: tuple[str, float] | None, unit: str,
                 ratio_target: tuple[str, float] | None) -> str:
    parts = []
    sym = {">=": ">=", "<=": "<"}
    if target:
        parts.append(f"{sym[target[0]]} {_fmt(target[1])} {unit}")
    if ratio_target:
        parts.append(f"ratio {sym[ratio_target[0]]} {ratio_target[1]:g}")
    return ", ".join(parts)


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., Figure]:
    """``report(name, figure, unit, floor_name, floor_value, *, median=None,
    target=None, ratio_target=None, note="")``: record a figure beside its
    floor (in the same unit; ratio = figure / floor) and print it.

    ``target`` and ``ratio_target`` are (">=" or "<=", bound): the table says
    whether the figure meets them; nothing fails on them."""
    run = request.config.stash[_RUN]

    def _report(name: str, figure: float, unit: str, floor_name: str, floor_value: float | None,
                *, median: float | None = None, target: tuple[str, float] | None = None,
                ratio_target: tuple[str, float] | None = None, note: str = "") -> Figure:
        ratio = figure / floor_value if floor_value else None
        met = None
        if target or ratio_target:
            checks = [_meets(figure, target), _meets(ratio, ratio_target) if ratio is not None else None]
            checks = [c for c in checks if c is not None]
            met = all(checks) if checks else None
        fig = Figure(name, figure, unit, floor_name, floor_value, ratio, median,
                     _target_text(target, unit, ratio_target), met, note, request.node.nodeid)
        run.figures.append(fig)
        line = f"\n[bench] {name}: {_fmt(figure)} {unit}"
        if median is not None:
            line += f" (median {_fmt(median)})"
        if floor_value:
            line += f" | floor {floor_name}: {_fmt(floor_value)} {unit} | ratio {ratio:.3g}"
        if fig.target:
            line += f" | target {fig.target}: {'met' if met else 'MISSED'}"
        if note:
            line += f" | {note}"
        print(line)
        return fig

    return _report


@pytest.fixture(scope="session")
def note(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Add a line to the notes printed under the table (e.g. a size reduced for lack of disk)."""
    run = request.config.stash[_RUN]

    def _note(text: str) -> None:
        run.notes.append(text)
        print(f"\n[note] {text}")

    return _note


def _table(rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    return LB.format_table(rows, left=set(range(len(rows[0]))) - right)


def _meta() -> dict[str, Any]:
    dirty = _git("status", "--porcelain", "--", "logq", "native")
    return {
        "logq_version": logq.__version__,
        "logq_path": H.LOGQ_ROOT,
        "codec": _codec(),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        "logq_sources_modified": bool(dirty),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, "
                   f"{os.cpu_count()} CPUs",
        "loadavg": os.getloadavg(),
        "scale": H.SCALE,
        "log_mb": H.LOG_MB,
    }


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = config.stash.get(_RUN, None)
    if run is None or not (run.figures or run.floors):
        return
    tr = terminalreporter
    meta = _meta()
    meta["wall_seconds"] = round(time.perf_counter() - run.t0, 1)
    tr.section("logq benchmarks: figures beside same-run floors")
    tr.write_line(f"codec {meta['codec']}, logq {meta['logq_version']} at {meta['git_head']}"
                  f"{' (logq/native modified in the work tree)' if meta['logq_sources_modified'] else ''}, "
                  f"Python {meta['python']}, {meta['machine']}, load {meta['loadavg'][0]:.2f}, "
                  f"scale {H.SCALE:g}, log {H.LOG_MB} MiB, {meta['wall_seconds']} s")
    tr.write_line("figures are the best round (median beside it); ratio = figure / floor")
    tr.write_line("")
    rows = [("benchmark", "figure", "median", "unit", "floor (same run)", "floor", "ratio", "target", "")]
    for f in run.figures:
        rows.append((f.name, _fmt(f.figure), _fmt(f.median), f.unit, f.floor_name, _fmt(f.floor),
                     f"{f.ratio:.3g}" if f.ratio is not None else "-", f.target,
                     "" if f.met is None else ("met" if f.met else "MISSED")))
    for line in _table(rows, {1, 2, 5, 6}):
        tr.write_line(line)
    if run.floors:
        tr.write_line("")
        rows = [("floor", "value", "unit", "", "how")]
        for fl in run.floors.values():
            rows.append((fl.name, _fmt(fl.value) if fl.unit != "s" else f"{fl.value:.3g}",
                         fl.unit, fl.also, fl.how))
        for line in _table(rows, {1}):
            tr.write_line(line)
    notes = run.notes + [f"{f.name}: {f.note}" for f in run.figures if f.note]
    if notes:
        tr.write_line("")
        for n in notes:
            tr.write_line(f"note: {n}")
    path = os.environ.get("LOGQ_BENCH_JSON")
    if path:
        doc = {"meta": meta,
               "figures": [asdict(f) for f in run.figures],
               "floors": [asdict(f) for f in run.floors.values()],
               "notes": run.notes}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        tr.write_line(f"\nwrote {path}")

"""The report of a ``logq bench`` run (``bench``): what each run measured
(:class:`RunResult`, :class:`PeerResult`, gathered in :class:`Report`) and
how it reads: the table, JSON, CSV and a plot (matplotlib, imported only
by :func:`plot`)."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from logq._bench_floors import Floors
from logq._bench_params import PEER_PHASE_SECONDS, Params


# -- results -----------------------------------------------------------------------------------
@dataclass
class RunResult:
    """One run's settings and figures.  ``name``, ``msgs_per_s``,
    ``mb_per_s``, ``floor``, ``floor_msgs_per_s`` and ``ratio`` are the
    fields the earlier harness reported, kept for readers of its JSON."""
    name: str
    workload: str
    params: Params
    messages_put: int = 0
    messages_consumed: int = 0         # acked and committed (consume, e2e, pool)
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_p999_ms: float | None = None
    latency_samples: int = 0
    fsyncs: int = 0                    # the producers' data fsyncs (q.stats()["fsyncs"])
    fsyncs_per_s: float = 0.0
    records_per_fsync: float | None = None   # mean group-commit size
    commits: int = 0                   # the consumers' (or pool's) index commits
    cpu_percent: float | None = None   # of one CPU: this process and its children
    rss_parent_mb: float = 0.0         # peak RSS of the bench process so far
    rss_children_mb: float = 0.0       # peak RSS of the largest child
    floor: str = ""
    floor_msgs_per_s: float = 0.0
    ratio: float = 0.0
    check: str = "ok"

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "params"}
        p = asdict(self.params)
        p["commit_interval"] = self.params.effective_commit_interval
        del p["workload"]
        return {"system": "logq", **d, **p}


@dataclass
class PeerResult:
    """A peer queue's produce or consume phase, or a note that it is missing."""
    peer: str
    kind: str                          # the class used
    workload: str                      # "produce" or "consume" ("-" when missing)
    payload: int
    fsync: str                         # the logq policy it stands beside
    durability: str                    # the setting used, in words
    installed: bool = True
    messages: int = 0
    seconds: float = 0.0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    floor: str = ""
    floor_msgs_per_s: float = 0.0
    ratio: float = 0.0
    logq_msgs_per_s: float | None = None   # logq's figure at the same settings, when measured
    logq_vs_peer: float | None = None
    cpu_percent: float | None = None
    rss_mb: float = 0.0
    version: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"system": self.peer, **asdict(self)}


@dataclass
class Report:
    meta: dict[str, Any]
    floors: Floors
    fixed: dict[str, Any]
    sweeps: list[tuple[str, list[Any]]]
    results: list[RunResult] = field(default_factory=list)
    peers: list[PeerResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**self.meta, "native": self.meta["native"], "floors": self.floors.as_dict(),
                "fixed": self.fixed, "sweep": {n: v for n, v in self.sweeps},
                "results": [r.as_dict() for r in self.results],
                "peers": [p.as_dict() for p in self.peers]}

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.check != "ok"]


# -- output ----------------------------------------------------------------------------------------
def _num(v: float | None, digits: int = 3) -> str:
    """A figure to about ``digits`` significant digits, with thousands separators."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:,.0f}"
    return f"{v:,.{max(0, digits - 1 - int(math.floor(math.log10(abs(v)))))}f}"


def _si(v: float) -> str:
    for div, unit in ((1e6, " M"), (1e3, " k")):
        if v >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def format_table(rows: list[Any], left: set[int]) -> list[str]:
    """Lines of a text table: the first row is the header, underlined;
    columns in ``left`` are left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) if i in left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _bytes(n: int) -> str:
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _fixed_text(fixed: dict[str, Any]) -> str:
    parts = []
    for k, v in fixed.items():
        if v is None:
            v = {"commit_interval": "library default", "rate": "unpaced", "duration": "none"}.get(k, "-")
        elif k in ("payload", "fsync_bytes"):
            v = _bytes(v)
        elif k in ("fsync_interval", "commit_interval", "duration"):
            v = f"{v:g} s"
        elif k == "rate":
            v = f"{v:,.0f} msgs/s"
        parts.append(f"{k} {v}")
    return ", ".join(parts)


def format_report(report: Report) -> str:
    """The tables: a header with the machine and the floors, one row per
    run, then the peers."""
    m, fl = report.meta, report.floors
    out = [f"logq {m['logq_version']} ({m['codec']} codec), Python {m['python']}, {m['machine']}, "
           f"{m['cpus']} CPUs; queues in {m['dir']}"]
    out.append(f"floors (same run): fdatasync {fl.fdatasync * 1e6:,.0f} us (4 KiB in place, preallocated) "
               f"= {_si(1 / fl.fdatasync)}/s")
    for pf in fl.by_payload.values():
        out.append(f"  {pf.payload} B records: os.write per record {_si(pf.write)}/s, "
                   f"joined 1 MiB writes {_si(pf.joined)}/s, mmap slice loop {_si(pf.slices)}/s")
    out.append(f"fixed: {_fixed_text(report.fixed)}")
    out.append("ratio = msgs/s / floor (same run); latency = put -> the commit that made the ack durable; "
               "CPU % of one CPU, this process and its children")
    out.append("")
    swept = [n for n, _ in report.sweeps]
    head = ["workload"] + swept + ["msgs/s", "MB/s", "floor", "floor/s", "ratio", "p50 ms", "p99 ms",
                                   "p99.9 ms", "fsyncs/s", "recs/fsync", "commits", "CPU %", "RSS MB", "check"]
    rows = [head]
    for r in report.results:
        rows.append([r.workload] + [str(getattr(r.params, n)) for n in swept] + [
            f"{r.msgs_per_s:,.0f}", _num(r.mb_per_s), r.floor, _si(r.floor_msgs_per_s), _num(r.ratio),
            _num(r.latency_p50_ms), _num(r.latency_p99_ms), _num(r.latency_p999_ms),
            _num(r.fsyncs_per_s), _num(r.records_per_fsync), str(r.commits), _num(r.cpu_percent),
            f"{r.rss_parent_mb:.0f}/{r.rss_children_mb:.0f}", r.check])
    out += format_table(rows, {0, 1 + len(swept) + 2, len(head) - 1} | set(range(1, 1 + len(swept))))
    out.append("RSS MB: peak of this process / of its largest child")
    if report.peers:
        out.append("")
        out.append(f"peers: the same payloads put one by one, then taken back one by one, in one process; "
                   f"each phase stops after the messages or {PEER_PHASE_SECONDS:g} s (--duration)")
        rows = [["peer", "fsync", "workload", "messages", "msgs/s", "MB/s", "floor", "ratio", "logq/peer",
                 "durability setting (closest to logq's fsync policy)"]]
        for pr in report.peers:
            if not pr.installed:
                rows.append([pr.peer, pr.fsync, "-", "-", "-", "-", "-", "-", "-", pr.note])
                continue
            rows.append([f"{pr.peer} {pr.version}".strip(), pr.fsync, pr.workload, f"{pr.messages:,}", f"{pr.msgs_per_s:,.0f}",
                         _num(pr.mb_per_s), pr.floor, _num(pr.ratio), _num(pr.logq_vs_peer), pr.durability])
        out += format_table(rows, {0, 1, 2, 6, 9})
    if report.failed:
        out.append("")
        for r in report.failed:
            out.append(f"CHECK FAILED: {r.name}: {r.check}")
    return "\n".join(out)


def as_json(report: Report) -> dict[str, Any]:
    return report.as_dict()


def write_csv(report: Report, path: str) -> None:
    """One row per run (then per peer phase), every field a column."""
    rows = [r.as_dict() for r in report.results] + [p.as_dict() for p in report.peers]
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def plot(report: Report, path: str) -> None:
    """Throughput and put->commit latency against the (first) swept
    parameter, one line per workload (and per value of the second sweep).
    Needs matplotlib (``pip install 'logq[plot]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"--plot needs matplotlib: pip install 'logq[plot]' ({e})") from None
    swept = [n for n, _ in report.sweeps]
    xname = swept[0] if swept else "workload"
    xs = report.sweeps[0][1] if swept else list(dict.fromkeys(r.workload for r in report.results))
    numeric = bool(swept) and all(isinstance(v, (int, float)) for v in xs)
    pos = {v: (v if numeric else i) for i, v in enumerate(xs)}
    series: dict[str, list[RunResult]] = {}
    for r in report.results:
        key = r.workload if not swept else r.workload + (
            f", {swept[1]}={getattr(r.params, swept[1])}" if len(swept) > 1 else "")
        series.setdefault(key if swept else "logq", []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2))
    m, fl = report.meta, report.floors
    lines = [f"logq bench: {m['codec']} codec, {m['machine']}, {m['cpus']} CPUs; fdatasync "
             f"{fl.fdatasync * 1e6:,.0f} us. Fixed:"]
    for item in _fixed_text(report.fixed).split(", "):       # wrapped between items, not inside one
        if len(lines[-1]) + len(item) > 140:
            lines.append("")
        lines[-1] += (" " if lines[-1] else "") + item + ","
    fig.suptitle("\n".join(lines).rstrip(","), fontsize=9)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (key, rs) in enumerate(series.items()):
        color = colors[k % len(colors)]
        xv = [pos[getattr(r.params, xname) if swept else r.workload] for r in rs]
        ax1.plot(xv, [r.msgs_per_s for r in rs], "o-", color=color, label=key)
        with_lat = [(x, r) for x, r in zip(xv, rs) if r.latency_p50_ms is not None]
        if with_lat:
            ax2.plot([x for x, _ in with_lat], [r.latency_p50_ms for _, r in with_lat], "o-", color=color,
                     label=f"{key} p50")
            ax2.plot([x for x, _ in with_lat], [r.latency_p99_ms for _, r in with_lat], "s--", color=color,
                     alpha=0.7, label=f"{key} p99")
    for ax, title, unit in ((ax1, "throughput", "messages/s"), (ax2, "put -> commit latency", "ms")):
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xlabel(xname)
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if y and y > 0]
        if ys and max(ys) / min(ys) >= 10:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=max(ys or [1]) * 1.1)     # (a narrow range: a log axis exaggerates it)
        ax.grid(True, which="both", alpha=0.3)
        if numeric:
            if min(xs) > 0 and max(xs) / min(xs) >= 100:  # type: ignore[operator]
                ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in xs])
        else:
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([str(v) for v in xs])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if not ax2.get_lines():
        ax2.text(0.5, 0.5, "no latency: e2e and pool runs measure it", ha="center", va="center",
                 transform=ax2.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

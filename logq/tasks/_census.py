"""Counting tasks, for operators: durable counters per task name, and a
census of every task's state per name.  ``logq stat`` prints the census;
``logq metrics`` (``logq._metrics``) exports both.

**Counters** (``tasks.counters`` in the index; key ``name \\0 kind``) are
added to in the transactions that record what they count, so they are
exactly as durable as the outcomes, the same from whichever process reads
them, and never lost to a crash or counted twice:

* ``succeeded``, ``failed`` (final failures: dead letters), ``retried``
  (failed attempts scheduled again): by the pool's settlements, once per
  commit batch and name (a ``Tally``);
* ``cancelled``: by ``cancel``;
* ``runtime`` (finished - started of each attempt that ran) and ``wait``
  (first attempt's start - when it became due: submission, or its
  delay/eta): histograms, as the bucket counts and the sum.

**The census** (``census``) reads outcomes (the final states of tasks
whose records have not expired) and walks the group's unsettled records
(every other task: scheduled, queued, running, retrying), in one index
snapshot.  Its cost grows with the backlog and the outcomes kept.

``submitted`` is derived, not stored (a submission is one put, with no
index write): the tasks that reached a final state (the three counters)
plus those not yet final (the census).  A task counts once, when it is
first seen either way; ``retry`` of a failed task counts it again (it is
submitted anew).
"""

from __future__ import annotations

import struct
import time
from bisect import bisect_left
from typing import Any

from logq._errors import OffsetError
from logq._index import GROUP, G_WATERMARK
from logq._leases import Retry
from logq._settled import _be, _is_settled
from logq.tasks import _state as S
from logq.tasks._records import _OUT, decode_task, state_of

RUNTIME_BOUNDS = (0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)
WAIT_BOUNDS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0)
HISTOGRAMS = {"runtime": RUNTIME_BOUNDS, "wait": WAIT_BOUNDS}
# The bounds in ns (bisect of an int against ints: no division per task).
# bisect_left of x ns among these equals that of x / 1e9 s among the bounds.
_RUNTIME_NS = tuple(int(b * 1e9) for b in RUNTIME_BOUNDS)
_WAIT_NS = tuple(int(b * 1e9) for b in WAIT_BOUNDS)
COUNTERS = ("succeeded", "failed", "retried", "cancelled")
_EVENT_COUNTER = {S.SUCCEED: "succeeded", S.GIVE_UP: "failed", S.FAIL: "retried"}
_U64 = struct.Struct(">Q")
_SCAN_CHUNK = 4096


def _key(name: str, kind: str) -> bytes:
    return name.encode() + b"\0" + kind.encode()


class Tally:
    """What one transaction adds to the counters, by task name."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.hists: dict[tuple[str, str], list[float]] = {}

    def count(self, name: str, kind: str, n: int = 1) -> None:
        k = (name, kind)
        self.counts[k] = self.counts.get(k, 0) + n

    def observe(self, name: str, kind: str, seconds: float) -> None:
        bounds = HISTOGRAMS[kind]
        h = self.hists.get((name, kind))
        if h is None:
            h = self.hists[(name, kind)] = [0.0] * (len(bounds) + 2)    # counts..., sum
        h[bisect_left(bounds, seconds)] += 1
        h[-1] += seconds

    def settled(self, name: str, event: str, started_ns: int, finished_ns: int,
                wait_ns: int | None = None) -> None:
        """An attempt's outcome, recorded (``wait_ns``: how long its task
        waited to start, for a first attempt)."""
        kind = _EVENT_COUNTER.get(event)
        if kind is not None:
            k = (name, kind)
            self.counts[k] = self.counts.get(k, 0) + 1
        if started_ns and finished_ns >= started_ns:
            self.observe(name, "runtime", (finished_ns - started_ns) / 1e9)
        if wait_ns is not None:
            self.observe(name, "wait", max(0, wait_ns) / 1e9)

    def settled_all(self, values: list[tuple[Any, ...]], waits: list[int | None]) -> None:
        """``settled`` of each outcome a pool's worker sent back (``values``:
        ``(event, id, packed outcome, name, started ns, finished ns)``, the
        Settler's) with the ns its task waited to start (``waits``: None
        but for a first attempt), in one loop: it runs in the pool's
        commits, per task.  Rows of one name in a row share their lookups;
        times are bucketed as integer ns."""
        counts, hists, kinds, bl = self.counts, self.hists, _EVENT_COUNTER, bisect_left
        rb, wb = _RUNTIME_NS, _WAIT_NS
        name_at: str | None = None
        rt: list[float] = []
        wt: list[float] = []
        rsum = wsum = 0     # ns of runtime, of wait, of the rows of name_at not yet added
        for v, wait in zip(values, waits):
            event, name, started, finished = v[0], v[3], v[4], v[5]
            if name != name_at:
                if name_at is not None:
                    rt[-1] += rsum / 1e9
                    wt[-1] += wsum / 1e9
                    rsum = wsum = 0
                name_at = name
                rt = hists.get((name, "runtime")) or hists.setdefault(
                    (name, "runtime"), [0.0] * (len(RUNTIME_BOUNDS) + 2))
                wt = hists.get((name, "wait")) or hists.setdefault(
                    (name, "wait"), [0.0] * (len(WAIT_BOUNDS) + 2))
            kind = kinds.get(event)
            if kind is not None:
                k = (name, kind)
                counts[k] = counts.get(k, 0) + 1
            if started and finished >= started:
                x = finished - started
                rt[bl(rb, x)] += 1
                rsum += x
            if wait is not None:
                x = wait if wait > 0 else 0
                wt[bl(wb, x)] += 1
                wsum += x
        if name_at is not None:
            rt[-1] += rsum / 1e9
            wt[-1] += wsum / 1e9
        # (a histogram of no observation is not kept: one is made only
        # once something is observed, as by ``settled``)
        for k in [k for k, h in hists.items() if not any(h)]:
            del hists[k]

    def __bool__(self) -> bool:
        return bool(self.counts or self.hists)

    def apply(self, txn: Any, db: Any) -> None:
        """Add it to the counters in ``txn``."""
        for (name, kind), n in self.counts.items():
            k = _key(name, kind)
            raw = txn.get(k, db=db)
            txn.put(k, _U64.pack((_U64.unpack(raw)[0] if raw is not None else 0) + n), db=db)
        for (name, kind), h in self.hists.items():
            k = _key(name, kind)
            raw = txn.get(k, db=db)
            n = len(h) - 1
            fmt = f"<{n}Qd"
            old = struct.unpack(fmt, raw) if raw is not None and len(raw) == struct.calcsize(fmt) \
                else (0,) * n + (0.0,)
            txn.put(k, struct.pack(fmt, *(int(a + b) for a, b in zip(old[:n], h[:n])), old[n] + h[n]),
                    db=db)


def read_counters(txn: Any, db: Any) -> dict[str, dict[str, Any]]:
    """name -> {counter: n, histogram: (bounds, counts, sum)}."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in txn.cursor(db=db).iternext():
        name_b, _, kind_b = bytes(k).rpartition(b"\0")
        name, kind = name_b.decode(errors="replace"), kind_b.decode(errors="replace")
        if kind in HISTOGRAMS:
            n = len(HISTOGRAMS[kind]) + 1
            fmt = f"<{n}Qd"
            if len(v) != struct.calcsize(fmt):
                continue
            vals = struct.unpack(fmt, v)
            out.setdefault(name, {})[kind] = (HISTOGRAMS[kind], list(vals[:n]), vals[n])
        elif len(v) == _U64.size:
            out.setdefault(name, {})[kind] = _U64.unpack(v)[0]
    return out


def _outcome_name(raw: bytes) -> str:
    s, n = raw[_OUT.size - 2], raw[_OUT.size - 1]
    return bytes(raw[_OUT.size + s:_OUT.size + s + n]).decode(errors="replace")


def census(store: Any, limit: int = 1_000_000) -> dict[str, Any]:
    """``{"states": {name: {state: n}}, "counters": {name: {...}},
    "submitted": {name: n}, "truncated": bool}``: every task's state by
    name now (at most ``limit`` unsettled records are walked: beyond,
    ``truncated``), the durable counters, and ``submitted`` (see the
    module docstring)."""
    from logq.tasks._store import PREFIX
    q, idx, p = store.q, store.idx, PREFIX
    graw = idx.get(p[:-1], idx.groups)
    start = max(GROUP.unpack(graw)[G_WATERMARK] if graw is not None else 0, q.first_offset)
    # The unsettled region's task records (read before the snapshot: one
    # put after it is simply not counted yet).
    recs: list[tuple[int, str, str, bool]] = []     # offset, id, name, due later
    now = time.time_ns()
    off, truncated = start, False
    from logq import _format as F
    while True:
        try:
            at, payloads, _ts, attrs, metas = q._fetch(off, _SCAN_CHUNK)
        except OffsetError:                 # retention moved the first offset past it
            off = max(off + 1, q.first_offset)
            continue
        if not payloads:
            break
        for i, data in enumerate(payloads):
            rec = decode_task(data)
            if rec is None:
                continue
            later = False
            if metas and i in metas:
                due, _key_ = F.decode_meta(attrs[i] >> 24, metas[i])
                later = due is not None and due > now
            recs.append((at + i, rec.task_id(at + i), rec.name, later))
        off = at + len(payloads)
        if len(recs) >= limit:
            truncated = True
            break
    marks = store.markers()
    posted: dict[int, int] = {}

    def vfn(vt: Any) -> None:
        cur = vt.cursor(db=store.scratch.claims)
        if cur.set_range(p + b"N"):
            for k, v in cur:
                if not bytes(k).startswith(p + b"N"):
                    break
                o = int.from_bytes(k[-8:], "big")
                posted[o] = Retry.unpack(o, v).due
    store.scratch.read(vfn)

    def fn(txn: Any) -> dict[str, Any]:
        states: dict[str, dict[str, int]] = {}

        def add(name: str, state: str) -> None:
            d = states.setdefault(name, {})
            d[state] = d.get(state, 0) + 1
        for _k, v in txn.cursor(db=store.outcome).iternext():
            st = state_of(v)
            if st in S.FINAL:
                add(_outcome_name(v), st)
        g = txn.get(p[:-1], db=idx.groups)
        mark = GROUP.unpack(g)[G_WATERMARK] if g is not None else 0
        for o, tid, name, later in recs:
            raw = txn.get(tid.encode(), db=store.outcome)
            if raw is not None and state_of(raw) in S.FINAL:
                continue                    # counted above
            if g is not None and _is_settled(txn, idx, p, mark, o):
                if txn.get(p + _be(o), db=idx.dead) is not None:
                    add(name, S.FAILED)     # a dead letter without an outcome
                continue
            if tid in marks:
                add(name, S.RUNNING)
                continue
            due = posted.get(o)
            if due is None:
                pend = txn.get(p + _be(o), db=idx.pending)
                due = int.from_bytes(pend, "big") if pend is not None else None
            if due is not None:
                later = due > now
            add(name, S.pending_state(due_later=later, failed_before=raw is not None))
        counters = read_counters(txn, store.counters)
        return {"states": states, "counters": counters}
    out = idx.read(fn)
    submitted: dict[str, int] = {}
    for name in set(out["states"]) | set(out["counters"]):
        c = out["counters"].get(name, {})
        live = sum(n for st, n in out["states"].get(name, {}).items() if st not in S.FINAL)
        submitted[name] = sum(int(c.get(k, 0)) for k in ("succeeded", "failed", "cancelled")) + live
    out["submitted"] = submitted
    out["truncated"] = truncated
    return out


def table(c: dict[str, Any]) -> list[str]:
    """The census as lines of text: a row per task name, a column per state."""
    names = sorted(c["states"])
    if not names:
        return ["tasks     none"]
    w = max(12, max(len(n) for n in names))
    lines = [f"{'task':<{w}} " + " ".join(f"{s:>9}" for s in S.STATES)]
    for n in names:
        d = c["states"][n]
        lines.append(f"{n:<{w}} " + " ".join(f"{d.get(s, 0):>9}" for s in S.STATES))
    if c.get("truncated"):
        lines.append("(the census stopped after its limit of unsettled records: counts are lower bounds)")
    return lines


def export(out: Any, q: Any, ql: dict[str, str]) -> None:
    """Add the tasks' families of the open queue ``q`` (if it has tasks)
    to ``out`` (``logq._metrics``' families)."""
    if "tasks" not in q.stats()["groups"]:
        return
    from logq.tasks._store import Store
    store = Store(q)
    try:
        c = census(store)
    finally:
        store.close()
    docs = {"submitted": "Tasks submitted (final ones counted plus those not yet final).",
            "succeeded": "Tasks that succeeded.",
            "failed": "Tasks that failed for good (out of retries: in the dead letters).",
            "retried": "Failed attempts scheduled for another one.",
            "cancelled": "Tasks cancelled before they finished."}
    names = sorted(set(c["states"]) | set(c["counters"]))
    for kind, doc in docs.items():
        for name in names:
            value = c["submitted"].get(name, 0) if kind == "submitted" else \
                c["counters"].get(name, {}).get(kind, 0)
            out.add(f"logq_task_{kind}", "counter", doc, dict(ql, name=name), value)
    for kind, metric, doc in (("runtime", "logq_task_runtime_seconds", "Time each attempt ran."),
                              ("wait", "logq_task_queue_wait_seconds",
                               "Time from when a task was due (submitted, or its delay/eta) to its "
                               "first attempt's start.")):
        for name in names:
            h = c["counters"].get(name, {}).get(kind)
            if h is not None:
                bounds, counts, total = h
                out.add(metric, "histogram", doc, dict(ql, name=name), (list(bounds), counts, total))
    for name in names:
        d = c["states"].get(name, {})
        for st in S.STATES:
            out.add("logq_tasks", "gauge", "Tasks by state now (final ones until their records expire).",
                    dict(ql, name=name, state=st), d.get(st, 0))


def _register() -> None:
    from logq import _metrics
    _metrics.extend(export)


_register()

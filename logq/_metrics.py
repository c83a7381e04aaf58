"""Metrics: a queue's counters, gauges and histograms, for Prometheus.

Two sources, never mixed within one metric:

* **durable** figures come from the log and the index (``Queue.stats()``)
  and from the quarantine manifest, so they are right after a crash, and
  the same whichever process reads them;
* **per-process** figures (fsyncs and their latency, records per fsync, a
  worker pool's and a forwarder's counters) live in one process's memory:
  each live process publishes them to its status file (``_status``) and
  they are exported with a ``pid`` label.  A process that exits takes its
  series with it (its status file is dropped by ``_status.read_all``); a
  restarted one starts new series, which Prometheus reads as a counter reset.

Every series has a ``queue`` label: the queue directory's absolute path.

===========================================  =========  ====================  ===========
metric                                       type       labels (+ queue)      source
===========================================  =========  ====================  ===========
logq_up                                      gauge                            1: stats() read
logq_messages_put_total                      counter                          durable
logq_messages                                gauge                            durable
logq_first_offset                            gauge                            durable
logq_segments                                gauge                            durable
logq_segment_bytes                           gauge                            durable
logq_disk_bytes                              gauge                            durable
logq_lost_records_total                      counter                          durable
logq_quarantined_ranges_total                counter                          durable
logq_quarantined_bytes_total                 counter                          durable
logq_group_{backlog,in_flight,scheduled,     gauge      group                 durable
dead_letters,watermark}
logq_group_oldest_unacked_age_seconds        gauge      group                 durable
logq_group_{delivered,acked,redelivered,     counter    group                 durable
dead_lettered,dropped}_total
logq_handle_info                             gauge      pid, fsync            process
logq_handle_failed                           gauge      pid                   process
logq_max_bytes                               gauge      pid                   process
logq_fsyncs_total                            counter    pid                   process
logq_fsync_duration_seconds                  histogram  pid                   process
logq_fsync_records                           histogram  pid                   process
logq_recovery_unclean                        gauge      pid                   process
logq_recovery_truncated_bytes                gauge      pid                   process
logq_recovery_lost_records                   gauge      pid                   process
logq_pool_*                                  both       group, pid            process
logq_pool_breaker_state                      gauge      group, pid, state     process
logq_forward_*                               both       group, target, pid    process
logq_forward_breaker_state                   gauge      group, target, pid,   process
                                                        state
logq_task_{submitted,succeeded,failed,       counter    name                  durable
retried,cancelled}_total
logq_task_runtime_seconds                    histogram  name                  durable
logq_task_queue_wait_seconds                 histogram  name                  durable
logq_tasks                                   gauge      name, state           durable
===========================================  =========  ====================  ===========

The ``logq_task*`` families are added by ``logq.tasks`` (once imported:
``logq metrics`` imports it) for a queue with a ``tasks`` group; see
``logq.tasks._census`` for what each counts.

The recovery gauges come from the process that opened the queue first
(the one that recovered it); they last as long as that process.

Use: ``register(q)`` (or ``Collector(q)``) in a process that has the queue
open, or ``Collector(path)``, which opens the queue for each collection
and closes it again (so it never holds a queue that a maintenance command
needs to itself): that is what ``logq metrics PATH`` serves.  prometheus_client
is needed only to collect (``pip install 'logq[metrics]'``).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from logq import _status
from logq._errors import LogqError
from logq._fsutil import losses
from logq._queue import Queue

log = logging.getLogger("logq")

_NEED = ("logq's metrics need the prometheus_client package, which is not installed: "
         "pip install 'logq[metrics]' (or pip install prometheus-client)")
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED = {"kind", "name", "pid", "updated"}
BREAKER_STATES = ("closed", "open", "half_open")


def _prometheus() -> Any:
    """prometheus_client's metric families, imported on first use."""
    try:
        from prometheus_client import core
    except ImportError as e:
        raise ImportError(_NEED) from e
    return core


# -- what is exported, independent of prometheus_client -------------------------
@dataclass
class Family:
    """One metric: its name (a counter's without ``_total``), type, help,
    label names, and samples (label values, value); a histogram's value is
    (bounds, counts per bucket not cumulative, the last above every bound, sum)."""
    name: str
    kind: str
    doc: str
    labels: tuple[str, ...]
    samples: list[tuple[tuple[str, ...], Any]] = field(default_factory=list)


_QUEUE_GAUGES = (
    ("messages", "logq_messages", "Messages retained in the log (next offset - first offset)."),
    ("first_offset", "logq_first_offset", "Offset of the oldest message retained."),
    ("segments", "logq_segments", "Segment files."),
    ("segment_bytes_on_disk", "logq_segment_bytes", "Size of the segment files (allocated so far: they grow in preallocate_bytes steps)."),
    ("disk_bytes", "logq_disk_bytes", "Bytes allocated for the log, the index and the lease table."),
)
_GROUP_GAUGES = (
    ("backlog", "logq_group_backlog", "Messages the group has not settled (acked or dead-lettered)."),
    ("in_flight", "logq_group_in_flight", "Messages leased to live consumers of the group."),
    ("scheduled", "logq_group_scheduled", "Messages waiting for a retry or a delay."),
    ("dead_letters", "logq_group_dead_letters", "Messages in the group's dead letters now."),
    ("oldest_unacked_age", "logq_group_oldest_unacked_age_seconds",
     "Age of the oldest message the group has not settled (0 without a backlog)."),
    ("watermark", "logq_group_watermark", "Offset below which the group has settled everything."),
)
_GROUP_COUNTERS = (
    ("delivered", "logq_group_delivered", "Deliveries to the group's consumers (durably counted)."),
    ("acked", "logq_group_acked", "Messages the group acknowledged."),
    ("redelivered", "logq_group_redelivered", "Deliveries after the first (retries, expired leases)."),
    ("dead_lettered", "logq_group_dead_lettered", "Messages moved to the group's dead letters."),
    ("dropped", "logq_group_dropped",
     "Unsettled messages the group lost to max_bytes (on_full='drop_oldest')."),
)
_POOL_COUNTERS = (      # each since the pool started
    ("processed", "Messages the pool's handlers processed and the pool acked"),
    ("failed", "Failed attempts: the handler raised, timed out, or its worker died"),
    ("retried", "Failures scheduled for another attempt"),
    ("dead_lettered", "Failures that used up max_attempts"),
    ("timeouts", "Messages that overran the timeout (their worker was killed)"),
    ("worker_deaths", "Worker processes that died or were killed"),
    ("commits", "Index commits of the pool's acks"),
    ("breaker_opened", "Times the pool's circuit breaker opened"),
)
_POOL_GAUGES = (
    ("in_flight", "Messages out with the pool's workers."),
    ("waiting", "Messages claimed by the pool, not yet sent to a worker."),
    ("workers", "Worker processes."),
    ("min_workers", "Autoscaling floor."),
    ("max_workers", "Autoscaling ceiling."),
)
_FORWARD_DOCS = {
    "published_total": "Messages the forwarder published and the target confirmed.",
    "duplicates_total": "Messages the target reported as duplicates (already published).",
    "reconnects_total": "Reconnections to the target.",
    "breaker_opened_total": "Times the forwarder's circuit breaker opened.",
    "failures_total": "Failed publish attempts.",
    "in_flight": "Messages sent to the target and not yet confirmed.",
    "lag": "Messages of the group not yet forwarded.",
    "connected": "1 while the forwarder is connected to its target.",
}


class _Families:
    """Families by name, in the order first asked for."""

    def __init__(self) -> None:
        self.by_name: dict[str, Family] = {}

    def get(self, name: str, kind: str, doc: str, labels: tuple[str, ...]) -> Family:
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = Family(name, kind, doc, labels)
        return fam

    def add(self, name: str, kind: str, doc: str, labels: dict[str, str], value: Any) -> None:
        fam = self.get(name, kind, doc, tuple(labels))
        if fam.kind != kind or fam.labels != tuple(labels):
            return      # a generic status field clashing with a known one: keep the known one
        fam.samples.append((tuple(labels.values()), value))


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _state(s: Any) -> str:
    return str(s).replace("-", "_")


def _add_state(out: _Families, name: str, doc: str, labels: dict[str, str], current: Any) -> None:
    """An enum as one gauge per state, 1 for the current one."""
    now = _state(current)
    for st in BREAKER_STATES + (() if now in BREAKER_STATES else (now,)):
        out.add(name, "gauge", doc, dict(labels, state=st), 1.0 if st == now else 0.0)


def _add_histogram(out: _Families, name: str, doc: str, labels: dict[str, str], s: dict[str, Any],
                   key: str) -> None:
    bounds, counts, total = s.get(f"{key}_bounds"), s.get(f"{key}_counts"), s.get(f"{key}_sum")
    if not (isinstance(bounds, (list, tuple)) and isinstance(counts, (list, tuple))):
        return
    bounds, counts = list(bounds), list(counts)
    if (len(counts) == len(bounds) + 1 and all(_number(x) is not None for x in bounds + counts)
            and _number(total) is not None):
        out.add(name, "histogram", doc, labels, (bounds, counts, float(total)))  # type: ignore[arg-type]


def _durable(out: _Families, q: Queue, ql: dict[str, str]) -> dict[str, Any]:
    """The durable families of one queue (from its log, index and
    quarantine manifest); its stats."""
    st = q.stats()
    out.add("logq_messages_put", "counter", "Messages ever put (the next offset).", ql, st["next_offset"])
    for key, name, doc in _QUEUE_GAUGES:
        out.add(name, "gauge", doc, ql, st[key])
    try:
        ranges = losses(q.path)
    except OSError as e:
        log.warning("metrics: cannot read the quarantine manifest of %s: %s", q.path, e)
        ranges = []
    lost = bytes_kept = 0
    for r in ranges:
        try:
            lost += max(0, int(r["end_offset"]) - int(r["first_offset"]))
            bytes_kept += max(0, int(r["end"]) - int(r["start"]))
        except (KeyError, TypeError, ValueError):
            continue
    # The manifest lists every range given up; stats() also knows what
    # this handle found (damage met while reading): both are lower bounds.
    out.add("logq_lost_records", "counter", "Records lost to damage (quarantine manifest).",
            ql, max(lost, st["lost_records"]))
    out.add("logq_quarantined_ranges", "counter",
            "Ranges of offsets given up to damage and kept in quarantine.", ql, len(ranges))
    out.add("logq_quarantined_bytes", "counter", "Damaged bytes kept in quarantine.", ql, bytes_kept)
    for group, g in sorted(st["groups"].items()):
        gl = dict(ql, group=group)
        for key, name, doc in _GROUP_GAUGES:
            out.add(name, "gauge", doc, gl, g[key])
        for key, name, doc in _GROUP_COUNTERS:
            out.add(name, "counter", doc, gl, g[key])
    return st


def _queue_process(out: _Families, s: dict[str, Any], ql: dict[str, str]) -> None:
    pl = dict(ql, pid=str(s["pid"]))
    out.add("logq_handle_info", "gauge", "A live process that has the queue open, with its fsync policy.",
            dict(pl, fsync=str(s.get("fsync", ""))), 1.0)
    if "failed" in s:
        out.add("logq_handle_failed", "gauge",
                "1 if an fsync failed in this process: it must reopen the queue.", pl, _number(s["failed"]))
    if _number(s.get("max_bytes")) is not None:
        out.add("logq_max_bytes", "gauge", "The process's disk budget (max_bytes).", pl, s["max_bytes"])
    if _number(s.get("fsyncs")) is not None:
        out.add("logq_fsyncs", "counter", "Group commits (fdatasync rounds) by this process.", pl, s["fsyncs"])
    _add_histogram(out, "logq_fsync_duration_seconds", "Time of each group commit's fdatasyncs.",
                   pl, s, "fsync_seconds")
    _add_histogram(out, "logq_fsync_records", "Records made durable by each group commit.",
                   pl, s, "fsync_records")
    if s.get("opened_first"):
        _recovery(out, s, ql)


def _recovery(out: _Families, s: dict[str, Any], ql: dict[str, str]) -> None:
    """What the process that opened the queue first found and did."""
    pl = dict(ql, pid=str(s["pid"]))
    out.add("logq_recovery_unclean", "gauge",
            "1 if this process found an unclean shutdown when it opened (and recovered) the queue.",
            pl, 0.0 if s.get("last_shutdown_clean", True) else 1.0)
    for key, name, doc in (("recovery_truncated_bytes", "logq_recovery_truncated_bytes",
                            "Torn bytes this process cut from the tail when it recovered the queue."),
                           ("recovery_lost_records", "logq_recovery_lost_records",
                            "Records this process found lost when it recovered the queue.")):
        if _number(s.get(key)) is not None:
            out.add(name, "gauge", doc, pl, s[key])


def _pool_process(out: _Families, s: dict[str, Any], ql: dict[str, str]) -> None:
    pl = dict(ql, group=str(s["name"]), pid=str(s["pid"]))
    for key, doc in _POOL_COUNTERS:
        if _number(s.get(key)) is not None:
            out.add(f"logq_pool_{key}", "counter", f"{doc}, since the pool started.", pl, s[key])
    for key, doc in _POOL_GAUGES:
        if _number(s.get(key)) is not None:
            out.add(f"logq_pool_{key}", "gauge", doc, pl, s[key])
    if _number(s.get("throughput")) is not None:
        out.add("logq_pool_processed_per_second", "gauge",
                "Messages processed per second over the last scale interval.", pl, s["throughput"])
    busy = s.get("busy_seconds")
    if isinstance(busy, dict) and all(_number(v) is not None for v in busy.values()):
        out.add("logq_pool_busy_seconds", "counter", "Seconds workers spent on batches.", pl,
                sum(map(float, busy.values())))
    for q_, key in (("0.5", "latency_p50"), ("0.99", "latency_p99")):
        if _number(s.get(key)) is not None:
            out.add("logq_pool_ack_latency_seconds", "gauge",
                    "Put-to-durable-ack latency quantiles over the pool's recent messages.",
                    dict(pl, quantile=q_), s[key])
    if "breaker" in s:
        _add_state(out, "logq_pool_breaker_state", "The pool's circuit breaker: 1 for its state.",
                   pl, s["breaker"])


def _forward_process(out: _Families, s: dict[str, Any], ql: dict[str, str]) -> None:
    pl = dict(ql, group=str(s["name"]), target=str(s.get("target", "")), pid=str(s["pid"]))
    for key, value in s.items():
        v = _number(value)
        if key in _RESERVED or key in ("target", "breaker") or v is None or not _NAME.match(key):
            continue
        counter = key.endswith("_total") and not isinstance(value, bool)
        name = f"logq_forward_{key[:-6] if counter else key}"
        doc = _FORWARD_DOCS.get(key, f"The forwarder's {key!r}.")
        out.add(name, "counter" if counter else "gauge", doc, pl, v)
    if "breaker" in s:
        _add_state(out, "logq_forward_breaker_state", "The forwarder's circuit breaker: 1 for its state.",
                   pl, s["breaker"])


_PROCESS = {"queue": _queue_process, "pool": _pool_process, "forward": _forward_process}

# Families a layer above adds for the queues it keeps data in (the tasks
# layer registers its own when imported): ``fn(families, queue, labels)``,
# called while the queue is open.  A failing one costs only its families.
_EXTENSIONS: list[Any] = []


def extend(fn: Any) -> None:
    """Add ``fn(families, queue, labels)`` to every collection (once)."""
    if fn not in _EXTENSIONS:
        _EXTENSIONS.append(fn)


def _extended(out: _Families, q: Queue, ql: dict[str, str]) -> None:
    for fn in _EXTENSIONS:
        try:
            fn(out, q, ql)
        except (LogqError, OSError, ValueError, KeyError) as e:
            log.warning("metrics: %s failed on queue %s: %s", getattr(fn, "__qualname__", fn), q.path, e)


def gather(sources: Iterable[Queue | str], recovered: dict[str, dict[str, Any]] | None = None
           ) -> list[Family]:
    """Every family for the queues ``sources``: open queues, or queue
    directories, each opened for the occasion and closed again.  When such
    an opening recovers a queue after an unclean shutdown, what it found is
    kept in ``recovered`` (by path) and exported as long as it is passed in."""
    out = _Families()
    recovered = {} if recovered is None else recovered
    for src in sources:
        path = src.path if isinstance(src, Queue) else os.fspath(src)
        ql = {"queue": os.path.abspath(path)}
        own: dict[str, Any] | None = None      # this process's live figures, fresher than its file
        up_doc = "1 if the queue's durable figures could be read."
        out.get("logq_up", "gauge", up_doc, ("queue",))   # first in the output
        try:
            if isinstance(src, Queue):
                _durable(out, src, ql)
                _extended(out, src, ql)
                own = _own_status(src)
            else:
                from logq._check import require_queue
                require_queue(path)
                q = Queue(path, fsync="never")
                try:
                    _durable(out, q, ql)
                    _extended(out, q, ql)
                    if q._log is not None and q._log.alone and not q._recovery.clean:
                        recovered[path] = _own_status(q)
                finally:
                    q.close()
            up = 1.0
        except (LogqError, OSError) as e:
            log.warning("metrics: cannot read queue %s: %s", path, e)
            up = 0.0
        out.add("logq_up", "gauge", up_doc, ql, up)
        if path in recovered:
            _recovery(out, recovered[path], ql)
        statuses = _status.read_all(path)
        if own is not None:
            statuses = [s for s in statuses if not (s.get("kind") == "queue" and s.get("pid") == own["pid"])]
            statuses.append(own)
        for s in statuses:
            export = _PROCESS.get(s.get("kind"))    # type: ignore[arg-type]
            if export is None:
                continue
            try:
                export(out, s, ql)
            except (KeyError, TypeError, ValueError) as e:
                log.debug("metrics: skipping a malformed status of %s: %r (%s)", path, s, e)
    return list(out.by_name.values())


def _own_status(q: Queue) -> dict[str, Any]:
    return dict(q._status_fields(), kind="queue", name=str(os.getpid()), pid=os.getpid())


# -- prometheus_client ------------------------------------------------------------
def _family(core: Any, f: Family) -> Any:
    from prometheus_client.utils import floatToGoString
    if f.kind == "counter":
        fam = core.CounterMetricFamily(f.name, f.doc, labels=f.labels)
    elif f.kind == "gauge":
        fam = core.GaugeMetricFamily(f.name, f.doc, labels=f.labels)
    else:
        fam = core.HistogramMetricFamily(f.name, f.doc, labels=f.labels)
        for values, (bounds, counts, total) in f.samples:
            running, buckets = 0.0, []
            for bound, n in zip(list(bounds) + [float("inf")], counts):
                running += n
                buckets.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            fam.add_metric(list(values), buckets, total)
        return fam
    for values, value in f.samples:
        fam.add_metric(list(values), value)
    return fam


class Collector:
    """A prometheus_client collector over one or more queues: each an open
    ``Queue`` (in-process use) or a queue directory (opened for each
    collection and closed again).  Register it with a registry, or use
    ``register``."""

    def __init__(self, *sources: Queue | str | os.PathLike[str]) -> None:
        if not sources:
            raise ValueError("a metrics collector needs at least one queue or queue directory")
        self.sources = [s if isinstance(s, Queue) else os.fspath(s) for s in sources]
        self._recovered: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()   # one collection at a time (scrapes come in threads)
        _prometheus()

    def collect(self) -> Iterator[Any]:
        core = _prometheus()
        with self._lock:
            families = gather(self.sources, self._recovered)
        for f in families:
            yield _family(core, f)

    def describe(self) -> Iterator[Any]:
        """The fixed families (without samples): a registry refuses a second
        collector of logq metrics, which would duplicate them (give one
        collector every queue instead)."""
        core = _prometheus()
        names = (["logq_up", "logq_messages_put", "logq_lost_records", "logq_quarantined_ranges"]
                 + [n for _k, n, _d in _QUEUE_GAUGES + _GROUP_GAUGES])
        for name in names:
            yield core.GaugeMetricFamily(name, "")


def register(*sources: Queue | str | os.PathLike[str], registry: Any = None) -> Collector:
    """Export the metrics of ``sources`` (open queues or queue directories)
    through ``registry`` (default: prometheus_client's global one, which
    ``prometheus_client.start_http_server`` serves).  The collector."""
    c = Collector(*sources)
    if registry is None:
        from prometheus_client import REGISTRY as registry
    registry.register(c)
    return c


def serve(path: str, port: int, host: str = "127.0.0.1") -> Any:
    """Serve the metrics of the queue at ``path`` over HTTP (``/metrics``)
    from a background thread; the server (``shutdown()`` and
    ``server_close()`` it).  Raises NotAQueueError for a directory that is
    not a queue, OSError when the port cannot be bound, ImportError
    without prometheus_client."""
    _prometheus()
    from prometheus_client import CollectorRegistry, start_http_server
    from logq._check import require_queue
    require_queue(path)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(Collector(path))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise OSError(e.errno, f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
    return server

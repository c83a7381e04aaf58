"""Metrics (``logq metrics PATH --port N``, ``logq._metrics``) and the log
records operators rely on.

The exporter runs as a real process on loopback and is scraped over HTTP;
its figures are checked against ``q.stats()`` of the same queue after real
work (puts, gets, acks, nacks, dead letters), after SIGKILLs of a producer
and a consumer, and for the live processes that publish status files (a
writer, a worker pool, a forwarder).  No assertion depends on timing: the
tests wait for a state, with a generous deadline, then check it exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import helpers
import logq
import pool_handlers
from helpers import Child, children, payload, wait_for
from logq import _metrics
from logq._index import RESERVE_BYTES

WAIT = 20.0          # seconds any awaited state may take on a loaded machine
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- the exporter as a process ------------------------------------------------------------
class Exporter:
    """``python -m logq metrics QDIR --port 0`` (the port it took is read
    from the line it prints)."""

    def __init__(self, qdir: str, log_path: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "logq", "metrics", qdir, "--port", "0"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=helpers.child_env(), cwd=helpers.TESTS)
        wait_for(lambda: "/metrics" in self.output() or self.proc.poll() is not None, WAIT,
                 "the exporter to announce its address")
        out = self.output()
        assert self.proc.poll() is None, f"the exporter exited: {out}"
        self.url = out[out.index("http://"):].split()[0]

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def scrape(self) -> Series:
        with urllib.request.urlopen(self.url, timeout=WAIT) as r:
            assert r.status == 200
            text = r.read().decode()
        out: Series = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "queue"))
                out[(s.name, labels)] = s.value
        return out

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(WAIT)
        finally:
            self.reap()

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        self._log.close()


@contextlib.contextmanager
def exporter(tmp_path, qdir: str) -> Iterator[Exporter]:
    e = Exporter(qdir, str(tmp_path / "exporter.log"))
    try:
        yield e
    finally:
        e.reap()


def value(series: Series, name: str, **labels: object) -> float | None:
    return series.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))))


def with_pid(series: Series, pid: int) -> list[str]:
    return sorted({name for name, labels in series if ("pid", str(pid)) in labels})


GROUP_FIELDS = {"backlog": "logq_group_backlog", "in_flight": "logq_group_in_flight",
                "scheduled": "logq_group_scheduled", "dead_letters": "logq_group_dead_letters",
                "watermark": "logq_group_watermark", "delivered": "logq_group_delivered_total",
                "acked": "logq_group_acked_total", "redelivered": "logq_group_redelivered_total",
                "dead_lettered": "logq_group_dead_lettered_total", "dropped": "logq_group_dropped_total"}


def assert_durable_equal(series: Series, st: dict) -> None:
    """Every durable series equals the figure of ``st`` (q.stats())."""
    assert value(series, "logq_up") == 1
    assert value(series, "logq_messages_put_total") == st["next_offset"]
    assert value(series, "logq_messages") == st["messages"]
    assert value(series, "logq_first_offset") == st["first_offset"]
    assert value(series, "logq_segments") == st["segments"]
    assert value(series, "logq_lost_records_total") == st["lost_records"]
    assert set(n for (name, labels) in series if name == "logq_group_backlog"
               for k, n in labels if k == "group") == set(st["groups"])
    for group, g in st["groups"].items():
        got = {f: value(series, name, group=group) for f, name in GROUP_FIELDS.items()}
        assert got == {f: g[f] for f in GROUP_FIELDS}, group
        age = value(series, "logq_group_oldest_unacked_age_seconds", group=group)
        assert (age > 0) == (g["oldest_unacked_age"] > 0), (age, g)


# -- 1. durable figures ---------------------------------------------------------------------
def test_durable_metrics_equal_stats_after_puts_gets_acks_nacks_and_dead_letters(tmp_path):
    """Two groups over 50 messages: "billing" acks 45 and nacks 5, which
    are redelivered and acked; "audit" (max_attempts=1) nacks 3, which are
    dead-lettered at once.  The scraped series equal q.stats() of the
    test's own handle, then again after 30 more puts, while the test keeps
    the queue open (the exporter opens it beside)."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put_many([payload("m", i) for i in range(50)])
        billing = q.consumer("billing", visibility_timeout=60, prefetch=1)
        audit = q.consumer("audit", visibility_timeout=60, max_attempts=1, prefetch=1)
        got: list = []
        while len(got) < 50:
            got += billing.get_many(50 - len(got), timeout=1)
        billing.ack_many(got[5:])
        for m in got[:5]:
            billing.nack(m, delay=0)
        billing.commit()
        redone: list = []
        while len(redone) < 5:
            redone += billing.get_many(5 - len(redone), timeout=1)
        assert sorted(m.offset for m in redone) == [m.offset for m in got[:5]]
        assert all(m.attempt == 2 for m in redone)
        billing.ack_many(redone)
        billing.commit()
        for m in audit.get_many(3, timeout=1):
            audit.nack(m, error="no")
        audit.commit()
        st = q.stats()
        assert st["groups"]["billing"]["redelivered"] == 5 and st["groups"]["billing"]["backlog"] == 0
        assert st["groups"]["audit"]["dead_letters"] == 3 and st["groups"]["audit"]["backlog"] == 47
        with exporter(tmp_path, qdir) as e:
            assert_durable_equal(e.scrape(), q.stats())
            q.put_many([payload("n", i) for i in range(30)])
            series = e.scrape()
            assert value(series, "logq_messages_put_total") == 80
            assert_durable_equal(series, q.stats())
            assert e.stop() == 0, e.output()
        billing.close()
        audit.close()


# -- 2. per-process series ------------------------------------------------------------------
WRITER = """
import logq, os, sys, time
q = logq.open(sys.argv[1], fsync="always")
for i in range(int(sys.argv[3])):
    q.put(b"w%d" % i)
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[2] + ".stop"):
    time.sleep(0.01)
q.close()
open(sys.argv[2] + ".closed", "w").close()
while not os.path.exists(sys.argv[2] + ".exit"):
    time.sleep(0.01)
"""


def test_a_live_writer_shows_its_fsyncs_and_they_vanish_when_it_exits(tmp_path):
    """A child puts 40 messages with fsync="always", then idles with the
    queue open: its series (pid label) appear — 40 records made durable
    over fsyncs_total > 0 group commits, as many fsync latencies observed —
    and are gone once it closed the queue (still running), and after it
    exited."""
    qdir, ready = str(tmp_path / "q"), str(tmp_path / "ready")
    logq.open(qdir).close()
    n = 40
    with exporter(tmp_path, qdir) as e, children() as kids:
        kids.append(Child(WRITER, str(tmp_path / "writer.log"), qdir, ready, n))
        pid = kids[0].pid
        wait_for(lambda: os.path.exists(ready), WAIT, "the writer's puts")

        def published() -> bool:
            return value(e.scrape(), "logq_fsync_records_sum", pid=pid) == n
        wait_for(published, WAIT, "the writer's status to cover its 40 puts", interval=0.1)
        series = e.scrape()
        fsyncs = value(series, "logq_fsyncs_total", pid=pid)
        assert fsyncs and fsyncs > 0
        assert value(series, "logq_fsync_duration_seconds_count", pid=pid) == fsyncs
        assert value(series, "logq_fsync_records_count", pid=pid) == fsyncs
        assert value(series, "logq_fsync_duration_seconds_bucket", pid=pid, le="+Inf") == fsyncs
        assert value(series, "logq_handle_info", pid=pid, fsync="always") == 1
        assert value(series, "logq_handle_failed", pid=pid) == 0
        assert value(series, "logq_messages_put_total") == n
        open(ready + ".stop", "w").close()
        wait_for(lambda: os.path.exists(ready + ".closed"), WAIT, "the writer to close the queue")
        assert kids[0].alive() and with_pid(e.scrape(), pid) == []
        open(ready + ".exit", "w").close()
        assert kids[0].wait(WAIT) == 0, kids[0].output()
        assert with_pid(e.scrape(), pid) == []
        assert e.stop() == 0, e.output()


# -- 3. after SIGKILLs -------------------------------------------------------------------------
PRODUCER = """
import logq, sys, time
q = logq.open(sys.argv[1], fsync="batch")
i = 0
while True:
    q.put_many([b"p%d" % (i + k) for k in range(10)])
    i += 10
    time.sleep(0.002)
"""
CONSUMER = """
import logq, sys
q = logq.open(sys.argv[1])
c = q.consumer("g", max_attempts=2, visibility_timeout=60, commit_interval=0.05, backoff_base=0.01,
               backoff_max=0.01)
while True:
    for m in c.get_many(50, timeout=0.1):
        if m.offset % 7 == 0:
            c.nack(m, error="seven")
        else:
            c.ack(m)
"""


def test_durable_metrics_after_sigkill_equal_post_crash_stats(tmp_path):
    """A producer and a consumer (which nacks every 7th message: retried
    once, then dead-lettered) are SIGKILLed mid-run.  The scrape after the
    crash equals stats() of a fresh handle, in either order (the exporter
    may be the one that recovers the queue), and the dead processes'
    series are gone."""
    qdir = str(tmp_path / "q")
    logq.open(qdir).close()
    with exporter(tmp_path, qdir) as e, children() as kids:
        kids.append(Child(PRODUCER, str(tmp_path / "producer.log"), qdir))
        kids.append(Child(CONSUMER, str(tmp_path / "consumer.log"), qdir))

        def progressed() -> bool:
            s = e.scrape()
            return (value(s, "logq_group_acked_total", group="g") or 0) > 200 and \
                (value(s, "logq_group_dead_lettered_total", group="g") or 0) > 5 and \
                all(with_pid(s, k.pid) for k in kids)        # both published their status
        wait_for(progressed, WAIT, "the consumer to ack and dead-letter", interval=0.05)
        for k in kids:
            k.kill()
            k.proc.wait(WAIT)
        first = e.scrape()
        with logq.open(qdir) as q:
            st = q.stats()
            second = e.scrape()
        assert_durable_equal(first, st)
        assert_durable_equal(second, st)
        # The exporter's opening found the crash (it was alone) and says so
        # for as long as it runs.
        for s in (first, second):
            assert value(s, "logq_recovery_unclean", pid=e.proc.pid) == 1
        g = st["groups"]["g"]
        assert g["acked"] > 200 and g["dead_lettered"] > 5 and g["redelivered"] >= g["dead_lettered"]
        for k in kids:
            assert with_pid(second, k.pid) == []
        assert e.stop(signal.SIGINT) == 0, e.output()


# -- 4. a worker pool's status -----------------------------------------------------------------
POOL = """
import logq, os, sys, time
logq.WorkerPool(sys.argv[1], "pool_handlers:handle", group="pg", workers=1, scale_interval=0.1,
                commit_interval=0.05).run()
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[2] + ".exit"):
    time.sleep(0.01)
"""


def test_a_pool_in_a_child_is_exported_then_withdrawn(tmp_path):
    """A WorkerPool process on group "pg" handles 20 messages: its series
    (processed, workers, breaker state) appear beside the durable group
    figures, and are gone once SIGTERM made it drain and stop (the process
    still running)."""
    qdir, ctl = str(tmp_path / "q"), str(tmp_path / "ctl")
    os.makedirs(ctl)
    n = 20
    with logq.open(qdir) as q:
        q.put_many([pool_handlers.message_data(ctl, payload("ok", i)) for i in range(n)])
    with exporter(tmp_path, qdir) as e, children() as kids:
        stopped = str(tmp_path / "stopped")
        kids.append(Child(POOL, str(tmp_path / "pool.log"), qdir, stopped))
        pid = kids[0].pid

        def done() -> bool:
            return value(e.scrape(), "logq_pool_processed_total", group="pg", pid=pid) == n
        wait_for(done, WAIT, "the pool's status to show every message processed", interval=0.1)
        series = e.scrape()
        assert value(series, "logq_pool_workers", group="pg", pid=pid) == 1
        assert value(series, "logq_pool_failed_total", group="pg", pid=pid) == 0
        assert value(series, "logq_pool_breaker_state", group="pg", pid=pid, state="closed") == 1
        assert value(series, "logq_pool_breaker_state", group="pg", pid=pid, state="open") == 0
        kids[0].proc.send_signal(signal.SIGTERM)
        wait_for(lambda: os.path.exists(stopped), WAIT, "the pool to drain and stop")
        series = e.scrape()
        assert kids[0].alive() and with_pid(series, pid) == []
        open(stopped + ".exit", "w").close()
        assert kids[0].wait(WAIT) == 0, kids[0].output()
        assert value(series, "logq_group_acked_total", group="pg") == n
        assert value(series, "logq_group_backlog", group="pg") == 0


# -- 5. a forwarder's status (the contract: _status.publish from a live process) ----------------
FORWARDER = """
import os, sys, time
from logq import _status
_status.publish(sys.argv[1], "forward", "fg", {
    "target": "nats://127.0.0.1:4222/subj", "connected": True, "breaker": "half-open",
    "published_total": 42, "duplicates_total": 2, "reconnects_total": 3, "breaker_opened_total": 1,
    "failures_total": 5, "in_flight": 7, "lag": 11})
open(sys.argv[2], "w").close()
while not os.path.exists(sys.argv[2] + ".stop"):
    time.sleep(0.01)
"""


def test_a_forwarder_status_is_exported_and_gone_when_it_exits(tmp_path):
    """A child publishes a forwarder status (and exits without withdrawing
    it, as a crash would): every field is exported with group, target and
    pid labels, the breaker as a one-hot state; after the child exits its
    series are gone."""
    qdir, ready = str(tmp_path / "q"), str(tmp_path / "ready")
    logq.open(qdir).close()
    with exporter(tmp_path, qdir) as e, children() as kids:
        kids.append(Child(FORWARDER, str(tmp_path / "fwd.log"), qdir, ready))
        pid = kids[0].pid
        wait_for(lambda: os.path.exists(ready), WAIT, "the forwarder's status")
        s = e.scrape()
        lb = {"group": "fg", "target": "nats://127.0.0.1:4222/subj", "pid": pid}
        assert {k: value(s, f"logq_forward_{k}", **lb) for k in (
            "published_total", "duplicates_total", "reconnects_total", "breaker_opened_total",
            "failures_total", "in_flight", "lag", "connected")} == {
            "published_total": 42, "duplicates_total": 2, "reconnects_total": 3,
            "breaker_opened_total": 1, "failures_total": 5, "in_flight": 7, "lag": 11, "connected": 1}
        assert {st: value(s, "logq_forward_breaker_state", state=st, **lb)
                for st in ("closed", "open", "half_open")} == {"closed": 0, "open": 0, "half_open": 1}
        open(ready + ".stop", "w").close()
        assert kids[0].wait(WAIT) == 0, kids[0].output()
        assert with_pid(e.scrape(), pid) == []


# -- 6. bad input ------------------------------------------------------------------------------
def run_cli(*args: str, code: str = "import sys; from logq.cli import main; sys.exit(main(sys.argv[1:]))"
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=helpers.child_env(), cwd=helpers.TESTS, timeout=60)


def test_bad_path_port_in_use_and_missing_prometheus_fail_clearly(tmp_path):
    """A missing directory and a directory that is not a queue: non-zero
    exit, the reason on stderr, nothing created.  A port already bound and
    prometheus_client not importable: the same, naming the port / the extra."""
    missing = str(tmp_path / "nope")
    r = run_cli("metrics", missing, "--port", "0")
    assert r.returncode != 0 and "no such queue directory" in r.stderr and missing in r.stderr, r
    assert not os.path.exists(missing)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    r = run_cli("metrics", str(other), "--port", "0")
    assert r.returncode != 0 and "not a logq queue" in r.stderr, r
    assert sorted(os.listdir(other)) == ["notes.txt"]

    qdir = str(tmp_path / "q")
    logq.open(qdir).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_cli("metrics", qdir, "--port", str(port))
    assert r.returncode != 0 and f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr, r
    r = run_cli("metrics", qdir, "--port", "0", code="import sys; sys.modules['prometheus_client'] = None; "
                "from logq.cli import main; sys.exit(main(sys.argv[1:]))")
    assert r.returncode != 0 and "logq[metrics]" in r.stderr, r


# -- 7. in-process use -------------------------------------------------------------------------
def test_in_process_collector_reads_its_own_queue_live(tmp_path):
    """register(q, registry=...) in the process that puts: its own fsync
    figures are exported at once (no status file delay), the durable ones
    equal stats(); a second logq collector in the same registry is refused."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="always") as q:
        for i in range(5):
            q.put(payload("x", i))
        reg = CollectorRegistry()
        _metrics.register(q, registry=reg)
        series: Series = {}
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            for s in fam.samples:
                series[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "queue")))] = s.value
        assert value(series, "logq_fsyncs_total", pid=os.getpid()) == q.stats()["fsyncs"] >= 1
        assert value(series, "logq_fsync_records_sum", pid=os.getpid()) == 5
        assert_durable_equal(series, q.stats())
        with pytest.raises(ValueError):
            _metrics.register(q, registry=reg)


# -- 8. log records ---------------------------------------------------------------------------
def test_drop_oldest_logs_the_lost_offsets_once(tmp_path, caplog):
    """At max_bytes with on_full="drop_oldest", a group that has settled
    nothing loses the oldest segment: one WARNING names the queue, the group,
    the count and the range of offsets they held, up to the new first
    offset; the group's dropped counter (durable) says the same."""
    qdir = str(tmp_path / "q")
    seg = 4096
    caplog.set_level(logging.INFO, logger="logq")
    with logq.open(qdir, segment_bytes=seg, max_bytes=2 * seg + 3 * RESERVE_BYTES + 64 * seg,
                   on_full="drop_oldest") as q:
        q.consumer("slow").close()
        i = 0
        while not any("lost" in r.getMessage() for r in caplog.records):
            q.put(payload("d", i))
            i += 1
            assert i < 200_000, "nothing was dropped"
        st = q.stats()
    first, dropped = st["first_offset"], st["groups"]["slow"]["dropped"]
    drops = [r for r in caplog.records if "unsettled" in r.getMessage()]
    assert drops and all(r.levelno == logging.WARNING for r in drops)
    found = [re.search(r"group 'slow' lost (\d+) unsettled message\(s\) among offsets (\d+)\.\.(\d+)",
                       r.getMessage()) for r in drops]
    assert all(found) and all(qdir in r.getMessage() for r in drops), [r.getMessage() for r in drops]
    counts, belows = [int(m.group(1)) for m in found], [int(m.group(3)) + 1 for m in found]
    # the ranges are consecutive and each says exactly how many went
    assert [int(m.group(2)) for m in found] == [0] + belows[:-1]
    assert counts == [int(m.group(3)) + 1 - int(m.group(2)) for m in found]
    assert belows == sorted(set(belows)), belows        # each drop logged once
    assert sum(counts) == dropped == belows[-1] == first > 0, (counts, belows, dropped, first)


def test_pool_logs_worker_deaths_and_breaker_changes(tmp_path, caplog):
    """A worker SIGKILLed by its message (kill1) and a burst of failures
    that opens the breaker: one WARNING per death naming the offset it was
    running, a WARNING when the breaker opens, an INFO when it goes
    half-open."""
    qdir, ctl = str(tmp_path / "q"), str(tmp_path / "ctl")
    os.makedirs(ctl)
    tags = ["kill1"] + ["raise"] * 6
    with logq.open(qdir) as q:
        q.put_many([pool_handlers.message_data(ctl, payload(t, i)) for i, t in enumerate(tags)])
    caplog.set_level(logging.INFO, logger="logq")
    pool = logq.WorkerPool(qdir, "pool_handlers:handle", group="lg", workers=1, batch_size=1,
                           visibility_timeout=60, max_attempts=50, backoff_base=0.01, backoff_max=0.01,
                           breaker_min_calls=4, breaker_threshold=0.5, breaker_cooldown=0.2,
                           breaker_probes=1, commit_interval=0.05)
    pool.start()
    try:
        def logged() -> bool:
            text = [r.getMessage() for r in caplog.records]
            return any("died (exit code" in t for t in text) and any("half-open" in t for t in text)
        wait_for(logged, WAIT, "a worker death and a breaker opening to be logged", interval=0.05)
    finally:
        final = pool.stop(drain=False)
    deaths = [r for r in caplog.records if "died (exit code" in r.getMessage()]
    assert len(deaths) == final.worker_deaths >= 1
    assert deaths[0].levelno == logging.WARNING
    assert "while handling offset 0" in deaths[0].getMessage() and "'lg'" in deaths[0].getMessage()
    opened = [r for r in caplog.records if "circuit breaker opened" in r.getMessage()]
    assert opened and all(r.levelno == logging.WARNING for r in opened)
    assert "circuit breaker opened (" in opened[0].getMessage()
    half = [r for r in caplog.records if "half-open" in r.getMessage()]
    assert half and all(r.levelno == logging.INFO for r in half)


def test_a_status_line_is_cheap_to_publish(tmp_path):
    """The housekeeper publishes at most once a second: a queue idle for a
    while leaves one status file whose content stops changing."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="always") as q:
        q.put(b"x")
        path = os.path.join(qdir, "status", f"queue.{os.getpid()}.{os.getpid()}.json")
        wait_for(lambda: os.path.exists(path) and b'"fsyncs":1' in open(path, "rb").read(), WAIT,
                 "the status file to show the fsync")
        before = os.stat(path).st_mtime_ns
        time.sleep(1.5)
        assert os.stat(path).st_mtime_ns == before
    assert not os.path.exists(path)


def test_status_files_of_names_that_differ_only_in_unsafe_characters_stay_apart(tmp_path):
    from logq import _status
    qdir = str(tmp_path)
    _status.publish(qdir, "forward", "a.b", {"n": 1})
    _status.publish(qdir, "forward", "a_b", {"n": 2})
    assert sorted((s["name"], s["n"]) for s in _status.read_all(qdir, "forward")) == [("a.b", 1), ("a_b", 2)]
    _status.withdraw(qdir, "forward", "a.b")
    assert [s["name"] for s in _status.read_all(qdir)] == ["a_b"]

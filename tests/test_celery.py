"""Celery on logq (logq.celery): real ``celery -A celery_app worker``
processes (prefork, 2 children) on the logq transport and result backend:
a task app, retries, a countdown (run once, not before its time, although
the lease timeout is shorter than the countdown), a chord (joined by the
backend's counter: no ``celery.chord_unlock``), priorities, a worker
SIGKILLed mid-task (the task runs again on the next worker), and a pool
child SIGKILLed alone (the task is given back and runs again).

One worker serves the module (Celery starts slowly); the kill test starts
its own, on a queue of their own."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("celery")

import helpers  # noqa: E402

import logq  # noqa: E402

START_TIMEOUT = 60.0


class Worker(helpers.Daemon):
    """A ``celery worker`` (prefork, 2 children) in its own session."""

    def __init__(self, root: str, name: str, queue: str = "celery", *extra: str, **env: str) -> None:
        super().__init__(
            [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "-c", "2", "-P", "prefork",
             "-n", f"{name}@%h", "-Q", queue, "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-l", "info", *extra],
            os.path.join(root, f"{name}.log"), " ready.",
            env=helpers.child_env(LOGQ_CELERY_ROOT=root, **env), cwd=root, timeout=START_TIMEOUT)

    def terminate_group(self, timeout: float = 30) -> float:
        """SIGTERM to every process of the worker (as systemd's default
        KillMode does); seconds until it exited.  AssertionError if it hangs."""
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the worker did not exit {timeout}s after SIGTERM to its group:\n"
                                 f"{self.text()[-2000:]}") from None
        self.log.close()
        return time.monotonic() - t0

    # stop(): a warm shutdown, SIGTERM to the main process only (a SIGTERM
    # to the pool's children as well can hang billiard's pool at exit).


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("celery"))
    os.environ["LOGQ_CELERY_ROOT"] = d
    import celery_app
    importlib.reload(celery_app)        # (the app reads its root at import)
    yield d
    os.environ.pop("LOGQ_CELERY_ROOT", None)
    # The queues this process opened to submit and to read results (the
    # later tests of the session count what is left open).
    from logq._named import close_under
    close_under(d)


@pytest.fixture(scope="module")
def worker(root):
    w = Worker(root, "w1")
    yield w
    w.kill()        # (a warm shutdown waits out Celery's 2 s poll and the pool: seconds of CI)


@pytest.fixture(scope="module")
def tasks(root):
    import celery_app
    return celery_app


def test_tasks_run_and_results_come_back(worker, tasks):
    assert tasks.add.delay(2, 3).get(timeout=20) == 5
    rs = [tasks.add.delay(i, i) for i in range(100)]
    assert [r.get(timeout=30) for r in rs] == [2 * i for i in range(100)]
    # The results are in the logq index: read back by id, from a new backend object.
    again = tasks.app.AsyncResult(rs[7].id, backend=type(tasks.app.backend)(app=tasks.app,
                                                                            url=tasks.app.backend.url))
    assert again.get(timeout=5) == 14
    assert again.state == "SUCCESS"


def test_retries_rerun_until_success(worker, tasks):
    r = tasks.flaky.delay("flaky", 2)
    assert r.get(timeout=30) == 3           # failed twice, ran a third time
    assert len(tasks.runs("flaky")) == 3


def test_countdown_runs_once_not_before_its_time(worker, tasks):
    t0 = time.time()
    r = tasks.stamp.apply_async(("later",), countdown=3)
    started = r.get(timeout=30)
    assert started >= t0 + 3 - 0.05, f"ran {started - t0:.2f}s after submit, countdown was 3s"
    # A worker holding the message for its 3 s ETA would have seen its 2 s
    # lease run out and got a second copy, run at the same ETA: look again.
    time.sleep(1.0)
    assert len(tasks.runs("later")) == 1, tasks.runs("later")


def test_chord_joins_through_the_backend_counter(worker, tasks):
    from celery import chord
    r = chord(tasks.add.s(i, i) for i in range(10))(tasks.total.s())
    assert r.get(timeout=30) == sum(2 * i for i in range(10))
    assert "chord_unlock" not in worker.text()      # no polling task was ever scheduled


def test_warm_shutdown_gives_back_what_it_reserved(root, tasks):
    """A warm shutdown (SIGTERM to the main process) finishes the running
    task and gives back the tasks it had reserved: delivered again at once,
    their attempt not counted (the delivery tag says which delivery)."""
    from kombu import Connection
    w = Worker(root, "w4", "warmq", "-c", "1", "--prefetch-multiplier", "4")
    try:
        r = tasks.slow.apply_async(("warm", 2), queue="warmq")
        later = [tasks.add.apply_async((i, i), queue="warmq") for i in range(3)]
        deadline = time.monotonic() + 30
        while not tasks.runs("warm") or w.text().count("received") < 4:
            assert time.monotonic() < deadline, "the worker did not reserve the tasks"
            time.sleep(0.05)
    finally:
        w.stop()
    assert r.get(timeout=10) == 1                   # the running task finished first
    with Connection(f"logq://{root}") as conn:
        q = conn.SimpleQueue("warmq")
        got = [q.get(timeout=5) for _ in range(3)]
        attempts = [int(m.delivery_tag.split(".")[1]) for m in got]
        ids = sorted(m.headers["id"] for m in got)
        for m in got:
            m.ack()
        q.close()
    assert ids == sorted(h.id for h in later)
    # Delivered before (each was "received" by w4), and still their first
    # counted attempt: given back, not failed (a release at exit would count).
    assert attempts == [1, 1, 1], attempts
    with logq.open(os.path.join(root, "warmq")) as lq:
        g = lq.stats()["groups"]["kombu"]
    assert g["dead_letters"] == 0


def test_priorities_higher_first(root, tasks):
    """Published with priorities to a queue no worker consumes: a kombu
    consumer gets them higher first (logq's priority order, as AMQP)."""
    from kombu import Connection
    with Connection(f"logq://{root}") as conn:
        q = conn.SimpleQueue("prio-test")
        for p in (1, 9, 5, 0):
            q.put({"p": p}, priority=p)
        got = []
        for _ in range(4):
            m = q.get(timeout=5)
            got.append(m.payload["p"])
            m.ack()
        q.close()
    assert got == [9, 5, 1, 0]


def test_killed_worker_task_runs_again(root, tasks):
    """SIGKILL of a worker (its process group: the main process and the
    pool) while a task runs: the unacked task is delivered again at once to
    the next worker -- its lease was for an hour: only the death of its
    holder released it -- and finishes there."""
    # (On a queue of their own, which the module's worker does not consume.)
    w2 = Worker(root, "w2", "killq", LOGQ_CELERY_VT="3600")
    try:
        r = tasks.slow.apply_async(("killed", 30), queue="killq")
        deadline = time.monotonic() + 30
        while not tasks.runs("killed"):
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)
    finally:
        w2.kill()
    first_pid = tasks.runs("killed")[0][0]
    w3 = Worker(root, "w3", "killq", LOGQ_CELERY_VT="3600")
    try:
        assert r.get(timeout=30) == 2           # ran again, on the new worker, and finished
        runs = tasks.runs("killed")
        assert len(runs) == 2 and runs[1][0] != first_pid, runs
        # Now only the pool child running a task dies (as to the OOM killer):
        # Celery rejects the task with requeue (task_reject_on_worker_lost),
        # the transport gives its hour-long lease back, and it runs again.
        r = tasks.slow.apply_async(("child", 30), queue="killq")
        deadline = time.monotonic() + 30
        while not tasks.runs("child"):
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.05)
        os.kill(tasks.runs("child")[0][0], signal.SIGKILL)
        assert r.get(timeout=30) == 2
        assert len(tasks.runs("child")) == 2
        # And a SIGTERM to every process of it stops it (Celery's event loop
        # and its pool shut down; nothing hangs at exit).
        w3.terminate_group()
    finally:
        if w3.proc.poll() is None:
            w3.kill()


def test_garbage_and_unknown_tasks_go_to_the_dead_letters(root, worker, tasks):
    """Bytes that are not a kombu message, and a task no worker knows
    (Celery rejects it), end in the group's dead letters -- kept, not
    dropped -- and the worker goes on with the next task."""
    from logq._named import queue_dir
    with logq.open(queue_dir(root, "celery")) as q:
        q.put(b"\xff not json")
    tasks.app.send_task("no.such.task", args=(1,))
    assert tasks.add.delay(20, 22).get(timeout=20) == 42
    deadline = time.monotonic() + 10
    while True:
        with logq.open(queue_dir(root, "celery")) as q, q.consumer("kombu") as c:
            dead = c.dead_letters()
        if len(dead) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(dead) == 2, dead
    errors = sorted(d.error for d in dead)
    assert "not a kombu message" in errors[0] and "rejected" in errors[1], errors
    assert any(d.data == b"\xff not json" for d in dead)
    assert any(b"no.such.task" in d.data for d in dead)


def test_purge_and_size(root, tasks):
    """``celery purge`` / kombu's queue_purge settles what is deliverable;
    the size is the backlog."""
    from kombu import Connection
    with Connection(f"logq://{root}") as conn:
        q = conn.SimpleQueue("purge-test")
        for i in range(5):
            q.put({"i": i})
        assert q.qsize() == 5
        assert q.clear() == 5
        assert q.qsize() == 0
        with pytest.raises(q.Empty):
            q.get(timeout=0.2)
        q.close()


def test_event_loop_wake_fd(monkeypatch):
    """The fd Celery's event loop watches: readable once signalled, not
    after it is cleared; an eventfd, or a pipe where there is none."""
    import select
    from types import SimpleNamespace

    from logq.celery._transport import _Wake
    for pipe in (False, True):
        if pipe:
            monkeypatch.delattr(os, "eventfd", raising=False)
        w = _Wake(SimpleNamespace(channels=[]))     # (nothing consumed: the watcher only naps)
        try:
            assert select.select([w.fd], [], [], 0)[0] == []
            w.signal()
            w.signal()
            assert select.select([w.fd], [], [], 1)[0] == [w.fd]
            w.clear()
            assert select.select([w.fd], [], [], 0)[0] == []
        finally:
            w.stop()

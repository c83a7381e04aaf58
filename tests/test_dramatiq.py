"""Dramatiq on logq (logq.dramatiq): real ``dramatiq dramatiq_app`` worker
processes on LogqBroker and LogqResultBackend: actors and their results,
a delayed message (not before its time, once), Dramatiq's retries ending
in a nack (the message lands in logq's dead letters with its error),
``join``, and a worker SIGKILLed mid-message (the message runs again on
the next worker, at once although its lease was for an hour).

One worker serves the module; the kill test starts its own on a queue of
their own."""

from __future__ import annotations

import importlib
import os
import sys
import time

import pytest

pytest.importorskip("dramatiq")

import helpers  # noqa: E402

import logq  # noqa: E402

START_TIMEOUT = 60.0


class Worker(helpers.Daemon):
    """``dramatiq dramatiq_app`` with one process of 2 threads, in its own session."""

    def __init__(self, root: str, name: str, queue: str = "default", threads: int = 2) -> None:
        super().__init__(
            [sys.executable, "-m", "dramatiq", "dramatiq_app", "--processes", "1", "--threads", str(threads),
             "--queues", queue],
            os.path.join(root, f"{name}.log"), "is ready for action",
            env=helpers.child_env(LOGQ_DRAMATIQ_ROOT=root), cwd=root, timeout=START_TIMEOUT)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dramatiq"))
    os.environ["LOGQ_DRAMATIQ_ROOT"] = d
    import dramatiq_app
    importlib.reload(dramatiq_app)      # (the app reads its root at import)
    yield dramatiq_app
    os.environ.pop("LOGQ_DRAMATIQ_ROOT", None)


@pytest.fixture(scope="module")
def worker(app):
    w = Worker(app.ROOT, "w1")
    yield w
    w.kill()        # (the tests are done: no need to wait for a warm shutdown)


def test_actors_run_and_results_come_back(worker, app):
    assert app.add.send(2, 3).get_result(block=True, timeout=20_000) == 5
    ms = [app.add.send(i, i) for i in range(50)]
    assert [m.get_result(block=True, timeout=20_000) for m in ms] == [2 * i for i in range(50)]
    # Stored in the logq index: read by a new backend object.
    fresh = app.LogqResultBackend(app.ROOT)
    assert fresh.get_result(ms[9]) == 18


def test_delayed_message_runs_once_at_its_time(worker, app):
    t0 = time.time()
    m = app.stamp.send_with_options(args=("later",), delay=1500)
    started = m.get_result(block=True, timeout=20_000)
    assert started >= t0 + 1.5 - 0.05, f"ran {started - t0:.2f}s after send, the delay was 1.5s"
    assert len(app.runs("later")) == 1


def test_rejected_message_goes_to_the_dead_letters(worker, app):
    """Dramatiq's nack (its retries gave up) keeps the message in logq's
    dead letters with its error; so do bytes that are not a Dramatiq
    message, without stopping the worker."""
    with logq.open(app.broker.queues["default"]) as q:
        q.put(b"\x00 not a message")
    app.doomed.send("doomed")
    app.broker.join("default", timeout=30_000)      # settled: acked or dead-lettered
    assert len(app.runs("doomed")) == 2             # the first run and Dramatiq's one retry
    with logq.open(app.broker.queues["default"]) as q:
        with q.consumer("dramatiq") as c:
            dead = sorted(c.dead_letters(), key=lambda d: d.error)
    assert len(dead) == 2, dead
    assert dead[0].data == b"\x00 not a message" and "not a Dramatiq message" in dead[0].error
    assert b"doomed" in dead[1].data and "doomed" in dead[1].error, dead[1]
    assert app.add.send(1, 1).get_result(block=True, timeout=20_000) == 2


def test_flush_drops_what_is_queued(app):
    """No worker consumes this queue: flush settles its messages, and join
    then has nothing to wait for."""
    app.broker.declare_queue("flushq")
    for i in range(3):
        app.broker.enqueue(app.add.message(i, i).copy(queue_name="flushq"))
    with pytest.raises(app.dramatiq.errors.QueueJoinTimeout):
        app.broker.join("flushq", timeout=100)
    app.broker.flush("flushq")
    app.broker.join("flushq", timeout=5_000)


def test_killed_worker_message_runs_again(app):
    """SIGKILL of a worker while its actor runs: the unacked message goes
    at once to the next worker (leases are for an hour: only the death of
    the holder released it) and finishes there."""
    w2 = Worker(app.ROOT, "w2", "killq")
    try:
        m = app.slow.send("killed", 60)
        deadline = time.monotonic() + 30
        while not app.runs("killed"):
            assert time.monotonic() < deadline, "the message never started"
            time.sleep(0.05)
    finally:
        w2.kill()
    first_pid = app.runs("killed")[0][0]
    w3 = Worker(app.ROOT, "w3", "killq")
    try:
        assert m.get_result(block=True, timeout=30_000) == 2
    finally:
        w3.kill()
    runs = app.runs("killed")
    assert len(runs) == 2 and runs[1][0] != first_pid, runs


def test_stopping_worker_gives_back_its_prefetched_messages(app):
    """SIGTERM to a worker: the message it runs finishes, the ones it
    prefetched are given back (requeue): delivered again at once, their
    attempt not counted (a release at exit would count one)."""
    w = Worker(app.ROOT, "w5", "warmq", threads=1)         # (prefetch: 2 messages)
    try:
        first = app.nap.send("warm", 2)
        rest = [app.nap.send(f"warm{i}", 0) for i in range(2)]
        qdir = app.broker.queues["warmq"]
        deadline = time.monotonic() + 30
        while True:
            with logq.open(qdir) as q:
                out = q.stats()["groups"].get("dramatiq", {}).get("in_flight", 0)
            if app.runs("warm") and out >= 2:
                break                   # one running, one prefetched
            assert time.monotonic() < deadline, "the worker did not prefetch"
            time.sleep(0.05)
    finally:
        w.stop()
    assert first.get_result(block=True, timeout=10_000) == 2
    with logq.open(qdir) as q, q.consumer("dramatiq") as c:
        got = c.get_many(10, timeout=2)
        c.give_back(got)
    assert len(got) == 2 and all(m.attempt == 1 for m in got), [(m.offset, m.attempt) for m in got]
    assert {app.dramatiq.Message.decode(m.data).message_id for m in got} == {m.message_id for m in rest}

"""The tasks layer end to end: real worker processes (the WorkerPool),
real SIGKILLs, real LMDB.  The app is tests/task_app.py."""

from __future__ import annotations

import os
import time

import pytest

import helpers
import task_app
from logq.tasks import (SerializationError, TaskCancelled, TaskFailed,
                        TaskNotFound)
from logq.tasks._records import encode_task

SUBMIT = r"""
import sys, task_app
task_app.app.path = sys.argv[1]
hs = [task_app.add.delay(i, 1) for i in range(int(sys.argv[2]))]
print(" ".join(h.id for h in hs), flush=True)
"""


@pytest.fixture
def pool(app):
    p = app.pool("task_app:app", workers=2, backoff_base=0.05, backoff_max=0.1)
    p.start()
    yield p
    p.stop()


def wait_state(h, states, timeout=30):
    helpers.wait_for(lambda: h.status().state in states, timeout, f"{h.id} to be {states}")
    return h.status()


def test_submit_run_result_across_processes(app, pool, tmp_path) -> None:
    rc, out = helpers.run_child(SUBMIT, str(tmp_path / "sub.log"), app.path, 20)
    assert rc == 0, out
    ids = out.split()
    assert len(ids) == 20
    for i, tid in enumerate(ids):
        h = app.get(tid)
        assert h.result(timeout=30) == i + 1
        st = h.status()
        assert st.state == "succeeded" and st.attempts == 1 and st.name == "add"
        assert st.submitted <= st.started <= st.finished
    with pytest.raises(TaskNotFound):
        app.get("12345-00000000")
    with pytest.raises(TaskNotFound):
        app.get("nonsense")


def test_retries_with_retry_on_then_success_and_failure(app, pool, tmp_path) -> None:
    h = task_app.flaky.delay(str(tmp_path / "ctl1"), 2)
    assert h.result(timeout=30) == 3
    assert h.status().attempts == 3
    h2 = task_app.flaky.delay(str(tmp_path / "ctl2"), 10)      # out of retries
    with pytest.raises(TaskFailed) as e:
        h2.result(timeout=30)
    assert e.value.type.endswith("Flaky") and "flaky failure 3" in e.value.message
    assert "raise Flaky" in e.value.traceback
    st = h2.status()
    assert st.state == "failed" and st.attempts == 3 and st.error["type"].endswith("Flaky")
    h3 = task_app.bad.delay()                                   # not in retry_on: no retry
    with pytest.raises(TaskFailed) as e:
        h3.result(timeout=30)
    assert e.value.type == "ValueError" and h3.status().attempts == 1


def test_timeout_kills_the_worker(app, pool) -> None:
    h = task_app.sleep.delay(30)
    with pytest.raises(TaskFailed) as e:
        h.result(timeout=60)
    assert e.value.type == "TaskTimeout"
    assert task_app.add.delay(1, 2).result(timeout=30) == 3     # the pool goes on


def test_cancel_queued_and_running(app, tmp_path) -> None:
    h = task_app.add.apply_async(args=(1, 2), delay=3600)
    assert h.status().state == "scheduled"
    assert h.cancel() is True
    assert h.status().state == "cancelled"
    q = task_app.add.delay(5, 5)
    assert q.status().state == "queued"
    assert q.cancel()
    p = app.pool("task_app:app", workers=1)
    p.start()
    try:
        coop = task_app.coop.delay()
        st = wait_state(coop, {"running"})
        assert st.pid and st.pid != os.getpid()
        assert coop.cancel()
        stub = task_app.stubborn.delay()
        wait_state(stub, {"running"})
        stub.cancel()
        with pytest.raises(TaskCancelled):
            stub.result(timeout=30)
        with pytest.raises(TaskCancelled):
            q.result(timeout=30)
        assert task_app.add.delay(2, 2).result(timeout=30) == 4
        helpers.wait_for(lambda: p.stats().worker_deaths >= 1, 30, "the stubborn worker killed")
    finally:
        p.stop()
    assert q.status().state == "cancelled" and q.status().attempts == 0
    assert coop.status().state == "cancelled"
    assert not h.cancel()       # finished: nothing to do


def test_idempotency_key(app) -> None:
    a = task_app.add.apply_async(args=(1, 1), key="k1")
    b = task_app.add.apply_async(args=(9, 9), key="k1")
    assert a.id == b.id
    assert task_app.add.apply_async(args=(1, 1), key="k2").id != a.id


def test_bad_input(app, pool) -> None:
    with pytest.raises(SerializationError):
        task_app.add.delay(object(), 1)
    assert app.queue.next_offset == 0           # nothing stored
    with pytest.raises(TypeError):
        task_app.add.delay({1, 2}, 1)
    h = task_app.unserialisable.delay()
    with pytest.raises(TaskFailed) as e:
        h.result(timeout=30)
    assert e.value.type == "logq._errors.SerializationError"
    h = task_app.big.delay(app.max_result_bytes + 10)
    with pytest.raises(TaskFailed) as e:
        h.result(timeout=30)
    assert "ResultTooLargeError" in e.value.type and "max_result_bytes" in e.value.message
    # an unknown name in a message: failed with a clear error, kept for retry
    off = app.queue.put(encode_task(0xABCDEF01, "no.such.task", "json", b"[[],{}]"))
    tid = f"{off}-abcdef01"
    with pytest.raises(TaskFailed) as e:
        app.get(tid).result(timeout=30)
    assert "unknown task name 'no.such.task'" in e.value.message
    assert task_app.add.delay(1, 1).result(timeout=30) == 2


def test_result_ttl_expiry(app, tmp_path) -> None:
    t = app._tasks["add"]
    # Long enough for result() to read it first on a loaded machine (a TTL
    # of a fraction of a second raced the reader), short enough to wait out.
    object.__setattr__(t.options, "result_ttl", 3.0)
    try:
        p = app.pool("task_app:app", workers=1)
        p.start()
        try:
            h = task_app.add.delay(1, 2)
            assert h.result(timeout=30) == 3
            time.sleep(3.5)
            task_app.noop.delay().result(timeout=30)        # a later commit purges
            helpers.wait_for(lambda: _gone(h), 30, "the expired result to go")
        finally:
            p.stop()
    finally:
        object.__setattr__(t.options, "result_ttl", 86400.0)


def _gone(h) -> bool:
    try:
        h.status()
    except TaskNotFound:
        return True
    return False


def test_sigkill_of_worker_and_of_pool_loses_nothing(app, tmp_path) -> None:
    marker = str(tmp_path / "marker")
    d = task_app.die_once.delay(str(tmp_path / "ctl"))
    hs = [task_app.slowok.delay(20, marker) for _ in range(40)]
    code = ("import sys, task_app; task_app.app.path = sys.argv[1]; "
            "task_app.app.pool('task_app:app', workers=2).run()")
    with helpers.children() as kids:
        for round_ in range(3):
            kid = helpers.Child(code, str(tmp_path / f"pool{round_}.log"), app.path)
            kids.append(kid)
            helpers.wait_for(lambda: os.path.exists(marker), 60, "a task to start")
            time.sleep(0.3)
            kid.kill()
            kid.wait(30)
        kid = helpers.Child(code, str(tmp_path / "poolz.log"), app.path)
        kids.append(kid)
        assert d.result(timeout=60) == "survived"
        assert d.status().attempts >= 2     # its own death, plus any pool kill that caught it
        for h in hs:
            assert h.result(timeout=60) == 20
        states = {h.status().state for h in hs}
        assert states == {"succeeded"}


def test_states_listing(app) -> None:
    a = task_app.add.delay(1, 2)
    b = task_app.add.apply_async(args=(1, 2), delay=3600)
    sts = {s.id: s.state for s in app.statuses()}
    assert sts == {a.id: "queued", b.id: "scheduled"}
    assert [s.id for s in app.statuses(state="scheduled")] == [b.id]

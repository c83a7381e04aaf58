"""Durable workflows (issue 13): steps recorded and replayed, durable
sleep across a pool restart, events sent before and after the wait,
non-determinism detected, child workflows, the id as idempotency key, and
SIGKILLs of pools and workers mid-workflow.  Real worker pools, real LMDB;
the app is tests/test_workflows_app.py."""

from __future__ import annotations

import random
import time
from typing import Any
from collections import Counter, defaultdict

import pytest

import helpers
import test_workflows_app as W
from logq.workflows import (NonDeterminismError, WorkflowCancelled, WorkflowError, WorkflowFailed,
                            get_workflow, send_event)
from test_workflows import _kill_worker, _pid_alive


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One queue and one pool for the tests that need no queue of their own
    (set up after the tests that do: they close the app)."""
    a = W.app
    a.close()
    a.path = str(tmp_path_factory.mktemp("shared") / "q")
    p = start_pool(a)
    yield a, p
    p.stop()
    a.close()


@pytest.fixture
def wapp(tmp_path):
    a = W.app
    a.close()
    a.path = str(tmp_path / "q")
    yield a
    a.close()


def start_pool(app, **kw):
    p = app.pool("test_workflows_app:app", workers=2, backoff_base=0.02, backoff_max=0.05, **kw)
    p.start()
    return p


def effects(app) -> list[tuple[str, str, int]]:
    try:
        with open(app.path + ".effects") as f:
            return [(a, b, int(c)) for a, b, c in (ln.split(" ") for ln in f.read().splitlines())]
    except FileNotFoundError:
        return []


def test_durable_sleep_across_a_pool_restart(wapp) -> None:
    p = start_pool(wapp)
    w = W.onboard.start("cat")
    helpers.wait_for(lambda: w.status().state == "sleeping", 30, "the workflow to sleep")
    p.stop()
    w.send_event("confirmed", True)            # stored while no pool runs
    time.sleep(0.4)                            # its sleep ends while nothing runs
    assert w.status().state == "sleeping"
    p = start_pool(wapp)                       # a new pool, a new process's workers
    try:
        assert w.result(timeout=30) == ["account-cat", True]
    finally:
        p.stop()
    assert Counter(e[1] for e in effects(wapp) if e[0] == w.id) == {"account-cat": 1, "welcome-True": 1}


POOL = ("import sys, test_workflows_app as W; W.app.path = sys.argv[1]; "
        "W.app.pool('test_workflows_app:app', workers=2, backoff_base=0.02, backoff_max=0.05).run()")


def test_sigkill_mid_workflow_each_step_effect_once_per_record(wapp, tmp_path) -> None:
    """Pools and workers SIGKILLed at random moments while 3-step workflows
    run (some checkpointed per step, some per run): every workflow finishes with its three results; a step whose
    record committed never ran again (on the processes that lived, each
    step ran at most once; extra runs were on processes that died during
    the step, the documented at-least-once of the step running at a kill)."""
    rnd = random.Random(helpers.SEED)
    ws = [W.three.start(0.04) for _ in range(8)] + [W.three_run.start(0.04) for _ in range(4)]
    with helpers.children() as kids:
        for round_ in range(2):
            kid = helpers.Child(POOL, str(tmp_path / f"pool{round_}.log"), wapp.path)
            kids.append(kid)
            seen = len(effects(wapp))
            helpers.wait_for(lambda: len(effects(wapp)) > seen or not kid.alive(), 30, "a step to run")
            t_end = time.monotonic() + rnd.uniform(0.8, 1.5)
            while time.monotonic() < t_end:
                time.sleep(rnd.uniform(0.05, 0.2))
                pids = {e[2] for e in effects(wapp)[-10:]}
                if pids and rnd.random() < 0.6:
                    _kill_worker(rnd.choice(sorted(pids)))
            kid.kill()
            kid.wait(30)
            ws += [W.three.start(0.04) for _ in range(2)] + [W.three_run.start(0.04) for _ in range(2)]
        kids.append(helpers.Child(POOL, str(tmp_path / "poolz.log"), wapp.path))
        for w in ws:
            steps = 3 if w.id.startswith("three-") else 4
            assert w.result(timeout=60) == [f"s{k}" for k in range(steps)], w.id
        runs = effects(wapp)
        alive = {pid for _w, _t, pid in runs if _pid_alive(pid)}
        per_step = defaultdict(list)
        for wid, tag, pid in runs:
            per_step[(wid, tag)].append(pid)
        for w in ws:
            steps = 3 if w.id.startswith("three-") else 4
            for k in range(steps):
                pids = per_step[(w.id, f"s{k}")]
                assert pids, f"{w.id} step {k} never ran"
                assert sum(pid in alive for pid in pids) <= 1, (w.id, k, pids)
                assert all(not _pid_alive(pid) for pid in pids[:-1]), (w.id, k, pids)
            assert w.status().steps == steps + (steps == 4)       # (the sleep is a step too)


# Sharing one queue and pool (``shared``), after the tests above.


def test_steps_replay_sleep_and_events(shared) -> None:
    wapp, p = shared
    w = W.three.start(0.0)
    assert w.result(timeout=30) == ["s0", "s1", "s2"]
    st = w.status()
    assert st.state == "succeeded" and st.steps == 3
    # The id is the idempotency key: the first start stands.
    a = W.onboard.start("ann", workflow_id="onboard-ann")
    again = W.onboard.start("bob", workflow_id="onboard-ann")
    assert again.id == a.id
    helpers.wait_for(lambda: a.status().state in ("sleeping", "waiting"), 30, "the workflow to sleep")
    helpers.wait_for(lambda: a.status().state == "waiting", 30, "the workflow to wait")
    assert a.status().waiting == "confirmed"
    helpers.wait_for(lambda: p.stats().in_flight == 0, 10, "no worker held while it waits")
    assert send_event(wapp, a.id, "confirmed", "yes") is True
    assert a.result(timeout=30) == ["account-ann", "yes"]
    assert [e[1] for e in effects(wapp) if e[0] == a.id] == ["account-ann", "welcome-yes"]
    # An event sent before the wait is kept for it; two waits take two.
    b = W.waiter.start(10)
    b.send_event("go", 1)
    helpers.wait_for(lambda: b.status().state == "waiting", 30, "the second wait")
    b.send_event("go", 2)
    assert b.result(timeout=30) == [1, 2]
    # A wait that times out gives None.
    c = W.waiter.start(0.2)
    assert c.result(timeout=30) == [None, None]
    assert send_event(wapp, c.id, "go", 3) is False        # finished: nothing stored


def test_nondeterminism_failure_and_children(shared, tmp_path) -> None:
    wapp, p = shared
    flag = str(tmp_path / "flag")
    w = W.fickle.start(flag)
    helpers.wait_for(lambda: w.status().state == "sleeping", 30, "the workflow to sleep")
    open(flag, "w").close()                 # the replay after the sleep branches differently
    with pytest.raises(WorkflowFailed, match="NonDeterminismError.*step 0 is recorded as 'first'"):
        w.result(timeout=30)
    assert w.status().error["type"].endswith("NonDeterminismError")
    assert [e[1] for e in effects(wapp) if e[0] == w.id] == ["first"]    # 'other' never ran
    f = W.failing.start()
    with pytest.raises(WorkflowFailed, match="RuntimeError: gave up after ValueError"):
        f.result(timeout=30)
    assert [e[1] for e in effects(wapp) if e[0] == f.id] == ["after"]
    par = W.parent.start(2)
    assert par.result(timeout=30) == 2
    assert get_workflow(wapp, f"{par.id}/0").result(timeout=5) == ["s0", "s1", "s2"]
    assert get_workflow(wapp, f"{par.id}/1").status().state == "succeeded"
    assert issubclass(NonDeterminismError, WorkflowError)


def test_cancel_a_waiting_workflow(shared) -> None:
    wapp, _p = shared
    w = W.waiter.start(None)                       # waits without a deadline
    helpers.wait_for(lambda: w.status().state == "waiting", 30, "the wait")
    run = w.status().current
    assert w.cancel() is True and w.cancel() is False
    with pytest.raises(WorkflowCancelled):
        w.result(timeout=5)
    assert w.send_event("go", 1) is False
    # Its parked run was released to drain: it ran as not current, did nothing.
    helpers.wait_for(lambda: wapp._store().status(run).state == "succeeded", 30, "the run to drain")
    assert w.status().state == "cancelled" and w.status().steps == 1


def test_start_many_one_transaction_idempotent(shared) -> None:
    wapp, _p = shared
    ws = W.three.start_many([(0.0,)] * 5 + [(0.0,)], workflow_ids=[f"many-{i}" for i in range(5)] + ["many-0"])
    assert [w.id for w in ws][-1] == "many-0"
    assert [w.result(timeout=30) for w in ws] == [["s0", "s1", "s2"]] * 6
    assert sum(1 for e in effects(wapp) if e[0] == "many-0") == 3          # started once


def test_a_first_run_that_gives_up_on_its_start_makes_that_start_fail(wapp, monkeypatch) -> None:
    """start() puts a workflow's first run before its index transaction; a
    run that comes first waits, and once the start is older than
    _FIRST_GIVE_UP gives up.  The give-up is a transaction of its own that
    conflicts with the start's: here the start's transaction is held back
    until the run gave up, and then the start raises and leaves no
    workflow behind (before, it returned with the workflow accepted and
    its only run gone: stuck running forever).  A start that committed
    before the run looked is run as usual."""
    import logq.workflows._flows as D
    from logq.tasks import TaskNotFound

    wf = W.onboard
    flows = wf.flows()
    real_write, real_make_id = flows._write, D.make_id
    runs: list[str] = []
    monkeypatch.setattr(D, "make_id", lambda off, nonce: runs.append(real_make_id(off, nonce)) or runs[-1])
    gave_up: list[Any] = []
    held: list[Any] = []
    old = time.time_ns() - int(2 * D._FIRST_GIVE_UP * 1e9)

    def held_back(fn):
        if not held:                # the start's transaction: the run gives up first
            held.append(fn)
            gave_up.append(wf._await_start(flows, "late-1", runs[-1], old))
        return real_write(fn)
    monkeypatch.setattr(flows, "_write", held_back)
    with pytest.raises(WorkflowError, match="not started"):
        wf.start("cat", workflow_id="late-1")
    assert gave_up and gave_up[0][0] is None, "the run should have found no workflow and given up"
    with pytest.raises(TaskNotFound):
        get_workflow(wapp, "late-1")
    monkeypatch.setattr(flows, "_write", real_write)

    # The other order: the start committed, then its (old) first run looks.
    wf.start("dog", workflow_id="early-1")
    f, _raw, _steps, _pending = wf._await_start(flows, "early-1", runs[-1], old)
    assert f is not None and f["current"] == runs[-1]

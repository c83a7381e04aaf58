"""Workflows (issue 13), the joins: chains, groups, chords, DAGs and
depends_on on real worker pools, real LMDB, and SIGKILLs of the pool and
its workers at random moments while chains and chords run.  The app is
tests/test_workflows_app.py."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict

import pytest

import helpers
import test_workflows_app as W
from logq.tasks import TaskCancelled, TaskFailed, TaskNotFound
from logq.workflows import DAG, GraphError, chain, chord, depends_on, group, handle


@pytest.fixture
def wapp(tmp_path):
    a = W.app
    a.close()
    a.path = str(tmp_path / "q")
    yield a
    a.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One queue and one pool for the tests that need no queue of their own
    (each looks only at its own tasks): a pool start costs seconds."""
    a = W.app
    a.close()
    a.path = str(tmp_path_factory.mktemp("shared") / "q")
    p = a.pool("test_workflows_app:app", workers=2, backoff_base=0.05, backoff_max=0.1)
    p.start()
    yield a
    p.stop()
    a.close()


@pytest.fixture
def pool(shared):
    return shared


def trace(app) -> list[tuple[str, int, int, str]]:
    """(task id, attempt, pid, tag) of every traced run."""
    try:
        with open(app.path + ".trace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for ln in lines:
        tid, attempt, pid, tag = ln.split(" ", 3)
        out.append((tid, int(attempt), int(pid), tag))
    return out


def test_cancel_group_cancels_what_has_not_started(wapp) -> None:
    # No pool yet: nothing has started.
    c = chord([W.double.s(i) for i in range(3)], W.total.s()).delay()
    ch = chain(W.double.s(1), W.double.s(), W.double.s()).delay()
    assert c.cancel() == 4
    assert ch.tasks[1].cancel() is True              # one parked link: the rest fail after it
    p = wapp.pool("test_workflows_app:app", workers=2)
    p.start()
    try:
        with pytest.raises(TaskCancelled):
            c.result(timeout=30)
        assert ch.tasks[0].result(timeout=30) == 2
        with pytest.raises(TaskFailed, match="cancelled"):
            ch.result(timeout=30)
        time.sleep(0.3)         # (a cancelled task that ran would have traced by now)
    finally:
        p.stop()
    ran = {r[0] for r in trace(wapp)}
    assert not ran & {t.id for t in c.tasks}            # none of the chord ran
    assert ran & {t.id for t in ch.tasks} == {ch.tasks[0].id}


POOL = ("import sys, test_workflows_app as W; W.app.path = sys.argv[1]; "
        "W.app.pool('test_workflows_app:app', workers=2, backoff_base=0.02, backoff_max=0.05).run()")


def test_sigkill_rounds_every_join_once(wapp, tmp_path) -> None:
    """Pools and workers SIGKILLed at random moments while chords, chains
    and a DAG run: every callback runs with every member's result (the join
    counted each exactly once), none is lost, and no task id ran twice
    in one attempt (a release never starts a task a second time)."""
    rnd = random.Random(helpers.SEED)
    chords, chains, dags = [], [], []

    def submit(k: int) -> None:
        for i in range(k):
            n = rnd.randint(3, 8)
            chords.append((chord([W.nap.s(0.01, j) for j in range(n)], W.total.s()).delay(),
                           sum(range(n))))
            chains.append((chain(W.add.s(i, 1), W.double.s(), W.double.s(), W.add.s(1)).delay(),
                           (i + 1) * 4 + 1))
        d = DAG()
        d.add("a", W.add.s(1, 1)).add("b", W.double.s(), after=["a"], pass_results=True)
        d.add("c", W.double.s(), after=["a"], pass_results=True)
        d.add("z", W.total.s(), after=["b", "c"], pass_results=True)
        dags.append(d.delay())
    submit(6)
    with helpers.children() as kids:
        for round_ in range(2):
            kid = helpers.Child(POOL, str(tmp_path / f"pool{round_}.log"), wapp.path)
            kids.append(kid)
            seen = len(trace(wapp))
            helpers.wait_for(lambda: len(trace(wapp)) > seen or not kid.alive(), 30, "a task to run")
            t_end = time.monotonic() + rnd.uniform(0.8, 1.6)
            while time.monotonic() < t_end:
                time.sleep(rnd.uniform(0.05, 0.3))
                pids = {r[2] for r in trace(wapp)[-20:]} - {os.getpid()}
                if pids and rnd.random() < 0.5:
                    _kill_worker(rnd.choice(sorted(pids)))
            kid.kill()                                                  # the pool
            kid.wait(30)
            submit(2)                                                   # more, between pools
        kids.append(helpers.Child(POOL, str(tmp_path / "poolz.log"), wapp.path))
        for h, expect in chords:
            assert h.result(timeout=60) == expect, h.id
        for h, expect in chains:
            assert h.result(timeout=60) == expect, h.id
        for h in dags:
            assert h["z"].result(timeout=60) == 8
        # Every run of a task but one was on a process that died (a worker
        # killed, or one whose pool was): the pool reruns what a dead worker
        # had done and not reported (its attempt not counted), so extra runs
        # there are at-least-once delivery; on the processes that lived, each
        # task ran once.  A join that released a task twice would show here.
        runs = trace(wapp)
        alive = {pid for _t, _a, pid, _tag in runs if _pid_alive(pid)}
        live_runs = defaultdict(int)
        for tid, _a, pid, _tag in runs:
            live_runs[tid] += pid in alive
        assert max(live_runs.values()) == 1, [t for t, n in live_runs.items() if n > 1]
        callbacks = {h.last.id for h, _e in chords} | {h["z"].id for h in dags}
        ran_callbacks = {tid for tid, _a, _p, tag in runs if tag.startswith("total")}
        assert ran_callbacks == callbacks                   # each ran; no other did
        # The index agrees: every join counted down to zero and released once.
        j = W.app.__dict__["_wf_joins"]
        for h in [h for h, _e in chords + chains] + dags:
            assert j.idx.get(b"C" + h.id.encode(), j.db) == b"\0\0\0\0"
            for t in h.tasks:
                assert not j.waiting(t.id)



def _kill_worker(pid: int) -> None:
    """SIGKILL a pool worker (checked: a forkserver child, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"forkserver" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# The tests below share one queue and pool (``shared``), set up after the
# tests above (which each close the app for a queue of their own) are done.


def test_chain_group_chord_results(pool) -> None:
    h = chain(W.add.s(1, 2), W.double.s(), W.add.s(10)).delay()
    assert h.result(timeout=30) == 16                     # (1+2)*2+10
    assert [st.state for st in h.statuses()] == ["succeeded"] * 3
    g = group(W.double.s(i) for i in range(6)).delay()
    assert g.results(timeout=30) == [0, 2, 4, 6, 8, 10]
    c = chord([W.double.s(i) for i in range(10)], W.collect.s()).delay()
    assert c.result(timeout=30) == [2 * i for i in range(10)]   # in member order
    # A chain through a group: the step after it gets the list.
    h2 = chain(W.add.s(1, 1), group([W.double.s(), W.double.s()]), W.total.s()).delay()
    assert h2.result(timeout=30) == 8
    # An immutable link does not get the previous result.
    h3 = chain(W.add.s(1, 1), W.echo.si("fixed")).delay()
    assert h3.result(timeout=30) == ["fixed"]
    # Found again by id, from the index.
    again = handle(pool, c.id)
    assert [t.id for t in again.tasks] == [t.id for t in c.tasks]
    # Each callback ran once.
    runs = [r for r in trace(pool) if r[0] == c.last.id]
    assert len(runs) == 1 and runs[0][3] == "collect 10"


def test_failure_policy_allow_failure_and_link_error(pool) -> None:
    c = chord([W.double.s(1), W.boom.s(), W.double.s(2)], W.total.s()).delay()
    with pytest.raises(TaskFailed, match="DependencyFailed: dependency .* \\(boom\\) failed"):
        c.result(timeout=30)
    assert not [r for r in trace(pool) if r[0] == c.last.id]   # never ran
    ok = chord([W.double.s(1), W.boom.s(), W.double.s(2)], W.collect.s(), allow_failure=True).delay()
    assert ok.result(timeout=30) == [2, None, 4]
    # A failure runs down a chain: every later link fails, none runs.
    ch = chain(W.double.s(1), W.boom.s(), W.double.s(), W.double.s(), link_error=W.on_error.s()).delay()
    with pytest.raises(TaskFailed, match="dependency"):
        ch.result(timeout=30)
    states = [st.state for st in ch.statuses()]
    assert states == ["succeeded", "failed", "failed", "failed"]
    assert ch.handlers[0].result(timeout=30) == ch.tasks[1].id   # link_error got the failed task's id
    # link_error of a workflow where nothing failed: cancelled, never run.
    fine = chain(W.double.s(1), W.double.s(), link_error=W.on_error.s()).delay()
    assert fine.result(timeout=30) == 4
    helpers.wait_for(lambda: fine.handlers[0].status().state == "cancelled", 30, "the handler cancelled")
    assert not [r for r in trace(pool) if r[3].startswith("on_error") and r[0] == fine.handlers[0].id]


def test_depends_on_existing_tasks(pool) -> None:
    a = W.double.delay(4)
    assert a.result(timeout=30) == 8              # a parent finished before the dependant exists
    b = W.nap.delay(0.3, "b")
    r = depends_on(W.echo.s("after"), [a, b])
    assert r.result(timeout=30) == ["after"]
    assert r.status().started >= b.status().finished
    s = depends_on(W.collect.s(), [a, b], pass_results=True)
    assert s.result(timeout=30) == [8, "b"]
    bad = W.boom.delay()
    f = depends_on(W.echo.s("x"), [a, bad])
    with pytest.raises(TaskFailed, match="dependency"):
        f.result(timeout=30)
    allowed = depends_on(W.echo.s("y"), [bad], allow_failure=True)
    assert allowed.result(timeout=30) == ["y"]
    with pytest.raises(TaskNotFound):
        depends_on(W.echo.s("z"), ["999999-00000000"])


def test_dag_and_cycle_refused(pool) -> None:
    d = DAG()
    d.add("report", W.collect.s(), after=["load", "audit"], pass_results=True)
    d.add("extract", W.add.s(1, 2))
    d.add("load", W.double.s(), after=["extract"], pass_results=True)
    d.add("audit", W.echo.s("audit"), after=["extract"])
    h = d.delay()
    assert h["report"].result(timeout=30) == [6, ["audit"]]
    before = pool.queue.next_offset
    cyc = DAG().add("a", W.noop.s(), after=["c"]).add("b", W.noop.s(), after=["a"]).add(
        "c", W.noop.s(), after=["b"])
    with pytest.raises(GraphError, match="cycle"):
        cyc.delay()
    with pytest.raises(GraphError, match="not a node"):
        DAG().add("a", W.noop.s(), after=["nope"]).delay()
    assert pool.queue.next_offset == before        # nothing was put


def test_scan_past_a_batch_with_a_release_ahead(tmp_path) -> None:
    """A parked record released before the group's scan reached it puts a
    schedule entry ahead of the cursor; the scan then goes record by record,
    and a put_many batch's head (whose meta is only its count) in a chunk of
    plain records asserted there (the pool died).  Regression test."""
    import logq
    from logq.workflows._joins import NEVER, release
    q = logq.open(str(tmp_path / "q"))
    try:
        c = q.consumer("tasks", prefetch=1)
        q.put_many([b"a", b"b", b"c"])
        off = q.put(b"parked", deliver_at=NEVER)
        q._index.write(lambda txn: release(txn, q._index, f"{off}-00000000", time.time_ns() + 10**9))
        got = [c.get(timeout=5).offset for _ in range(4)]
        assert got == [0, 1, 2, 3]
    finally:
        q.close()


def test_graph_building_is_pure_and_refuses_cycles() -> None:
    """_graph without a queue: chain/group/chord composition modes, and
    random DAGs put parents first, or are refused when they have a cycle."""
    from logq.workflows import _graph as G
    from logq.workflows._joins import ALL, FIRST, NONE
    nodes, exits = G.build(chain(W.add.s(1, 2), group([W.double.s(), W.double.s()]), W.total.s()))
    assert [(n.label, n.parents, n.mode) for n in nodes] == [
        ("add", [], NONE), ("double", [0], FIRST), ("double", [0], FIRST), ("total", [1, 2], ALL)]
    assert exits == [3]
    nodes, _ = G.build(chord([W.double.s(i) for i in range(3)], W.total.s()).c, allow_failure=True)
    assert nodes[-1].parents == [0, 1, 2] and nodes[-1].mode == ALL and nodes[-1].allow_failure
    assert not any(n.allow_failure for n in nodes[:-1])
    with pytest.raises(G.GraphError):
        G.build("not a task")
    rnd = random.Random(helpers.SEED)
    for _ in range(300):
        k = rnd.randint(1, 9)
        named = {f"n{i}": (W.noop.s(), [f"n{j}" for j in range(k) if j != i and rnd.random() < 0.25],
                           False, rnd.random() < 0.5) for i in range(k)}
        # A cycle exists iff no order puts every node after its parents.
        done: set[str] = set()
        progress = True
        while progress:
            progress = False
            for name, (_s, after, _a, _p) in named.items():
                if name not in done and all(a in done for a in after):
                    done.add(name)
                    progress = True
        if len(done) < k:
            with pytest.raises(GraphError, match="cycle"):
                G.order(named)
            continue
        ns, at = G.order(named)
        for name, (_s, after, _a, pr) in named.items():
            n = ns[at[name]]
            assert sorted(n.parents) == sorted(at[a] for a in set(after))
            assert all(p < at[name] for p in n.parents)
            assert n.mode == ((FIRST if len(n.parents) == 1 else ALL) if pr and n.parents else NONE)

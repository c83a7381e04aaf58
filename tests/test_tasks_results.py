"""Results and failures of tasks across processes (issue 12): the
cross-process "written" wake a blocked ``result()`` sleeps on, and failed
tasks in the dead letters.  Real worker processes, real LMDB, both codecs.
The app is tests/task_app.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import helpers
import task_app
import logq
from logq.tasks import TaskFailed
from logq.tasks._records import decode_task, encode_task, parse_id

# A child that blocks in Queue._wait_written until the parent's commit
# with a write hook moves the count: it prints whether it woke and the
# count it saw.
WAITER = r"""
import sys, time, logq
q = logq.open(sys.argv[1])
seen = int(sys.argv[2])
print("ready", flush=True)
t0 = time.monotonic()
woke = q._wait_written(seen, 60.0)
while not woke and time.monotonic() - t0 < 60:
    woke = q._wait_written(seen, 60.0)    # (a spurious wake-up: again)
print("woke" if woke else "timeout", q._written(), round(time.monotonic() - t0, 3), flush=True)
q.close()
"""

# A child that submits, then blocks in result() for each of its tasks.
SUBMIT_AND_WAIT = r"""
import sys, task_app
task_app.app.path = sys.argv[1]
hs = [task_app.add.delay(i, 100) for i in range(int(sys.argv[2]))]
print(" ".join(str(h.result(timeout=60)) for h in hs), flush=True)
"""


@pytest.fixture
def pool(app):
    p = app.pool("task_app:app", workers=2, backoff_base=0.02, backoff_max=0.05)
    p.start()
    yield p
    p.stop()


def test_a_commit_with_a_write_hook_wakes_a_waiter_in_another_process(tmp_path) -> None:
    q = logq.open(str(tmp_path / "q"))
    try:
        c = q.consumer("g")
        q.put(b"x")
        seen = q._written()
        assert q._wait_written(seen, 0.05) is False         # nothing written: it times out
        kid = helpers.Child(WAITER, str(tmp_path / "waiter.log"), q.path, seen)
        try:
            helpers.wait_for(lambda: "ready" in kid.output(), 30, "the waiter to start")
            m = c.get(timeout=10)
            c.ack(m, write=lambda txn: None)
            c.commit()                                      # a commit that ran a hook: bumps
            assert q._written() != seen
            assert kid.wait(60) == 0
            words = kid.output().split()
            assert words[1] == "woke" and int(words[2]) != seen, kid.output()
        finally:
            kid.reap()
        # A commit without write hooks does not move the count.
        before = q._written()
        q.put(b"y")
        c.ack(c.get(timeout=10))
        c.commit()
        assert q._written() == before
    finally:
        q.close()


def test_results_from_another_process(app, pool, tmp_path) -> None:
    rc, out = helpers.run_child(SUBMIT_AND_WAIT, str(tmp_path / "sub.log"), app.path, 30, timeout=120)
    assert rc == 0, out
    assert out.split()[-30:] == [str(i + 100) for i in range(30)]


def test_cancel_from_another_process_wakes_a_blocked_result(app, tmp_path) -> None:
    h = task_app.add.apply_async(args=(1, 2), delay=3600)
    code = ("import sys, task_app\ntask_app.app.path = sys.argv[1]\n"
            "from logq.tasks import TaskCancelled\n"
            "try:\n    task_app.app.get(sys.argv[2]).result(timeout=60)\n"
            "except TaskCancelled:\n    print('cancelled', flush=True)\n")
    kid = helpers.Child(code, str(tmp_path / "res.log"), app.path, h.id)
    try:
        helpers.wait_for(lambda: _waiting(app), 30,
                         "the child to block in result()")
        assert h.cancel()
        assert kid.wait(60) == 0
        assert "cancelled" in kid.output()
    finally:
        kid.reap()


def _waiting(app) -> bool:
    """Whether some process sleeps on the written count (its waiter word)."""
    from logq import _format as F
    lg = app.queue._log
    return int.from_bytes(lg.ctl[F.CTL_WRITTEN_WAITERS:F.CTL_WRITTEN_WAITERS + 4], sys.byteorder) > 0 \
        if logq.native_enabled() else True


def _dead(app) -> dict[int, object]:
    c = app.queue.consumer("tasks")
    try:
        return {d.offset: d for d in c.dead_letters()}
    finally:
        c.close()


def test_out_of_retries_goes_to_the_dead_letters_and_retry_runs_it_again(app, pool, tmp_path) -> None:
    ctl = str(tmp_path / "ctl")
    h = task_app.flaky.delay(ctl, 10)               # fails 3 times: out of retries
    with pytest.raises(TaskFailed) as e:
        h.result(timeout=60)
    assert "raise Flaky" in e.value.traceback
    st = h.status()
    assert st.state == "failed" and st.attempts == 3 and st.error["type"].endswith("Flaky")
    assert "flaky failure 3" in st.error["message"] and "raise Flaky" in st.error["traceback"]
    off = parse_id(h.id)[0]
    dead = _dead(app)
    assert off in dead, dead
    letter = dead[off]
    assert decode_task(letter.data).name == "flaky"          # the task record itself is kept
    assert letter.attempts == 3 and "flaky failure 3" in letter.error
    # A task whose error is not in retry_on: dead at once, after one attempt.
    h2 = task_app.bad.delay()
    with pytest.raises(TaskFailed):
        h2.result(timeout=60)
    assert parse_id(h2.id)[0] in _dead(app) and h2.status().attempts == 1
    # `retry`: the same id runs again (fresh attempts), its dead letter goes.
    with open(ctl, "w") as f:
        f.write("100")                              # the next attempt succeeds
    assert app.retry(h.id).id == h.id
    assert h.result(timeout=60) == 101
    assert h.status().state == "succeeded" and h.status().attempts == 1
    assert off not in _dead(app)
    # The CLI's retry does the same from another process.
    out = subprocess.run([sys.executable, "-m", "logq", "tasks", app.path, "retry", h2.id, "--json"],
                         env=helpers.child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == h2.id
    with pytest.raises(TaskFailed):
        h2.result(timeout=60)                        # `bad` fails again: dead again
    assert h2.status().state == "failed"
    assert pool.stats().dead_lettered >= 3


def test_unknown_task_name_is_a_dead_letter_nothing_lost(app, pool) -> None:
    off = app.queue.put(encode_task(0x01020304, "no.such.task", "json", b"[[],{}]"))
    tid = f"{off}-01020304"
    with pytest.raises(TaskFailed) as e:
        app.get(tid).result(timeout=60)
    assert "unknown task name 'no.such.task'" in e.value.message
    dead = _dead(app)
    assert off in dead and decode_task(dead[off].data).name == "no.such.task"
    assert task_app.add.delay(2, 3).result(timeout=60) == 5


def _scrape(path: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``logq metrics``' families for ``path``, served over
    HTTP and parsed by prometheus_client: (name, sorted labels) -> value."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    import logq.tasks  # noqa: F401
    from logq import _metrics as M
    server = M.serve(path, 0)
    try:
        host, port = server.server_address[:2]
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "queue"))
            out[(s.name, labels)] = s.value
    return out


def test_stat_and_metrics_count_tasks_by_name_and_state(app, tmp_path) -> None:
    p = app.pool("task_app:app", workers=2, backoff_base=0.02, backoff_max=0.05)
    p.start()
    try:
        for h in [task_app.add.delay(i, 1) for i in range(5)]:
            h.result(timeout=60)
        assert task_app.flaky.delay(str(tmp_path / "ctl"), 1).result(timeout=60) == 2   # one retry
        with pytest.raises(TaskFailed):
            task_app.bad.delay().result(timeout=60)
    finally:
        p.stop()
    assert task_app.add.apply_async(args=(0, 0), delay=3600).cancel()
    task_app.add.apply_async(args=(0, 0), delay=3600)               # scheduled
    task_app.add.delay(1, 1), task_app.add.delay(2, 2)               # queued: no pool runs them
    want = {"add": {"succeeded": 5, "cancelled": 1, "scheduled": 1, "queued": 2},
            "flaky": {"succeeded": 1}, "bad": {"failed": 1}}
    app.close()     # the CLI and the scrape open the queue themselves
    out = subprocess.run([sys.executable, "-m", "logq", "stat", app.path, "--json"],
                         env=helpers.child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)["tasks"]
    assert st["states"] == want
    assert st["submitted"] == {"add": 9, "flaky": 1, "bad": 1}
    text = subprocess.run([sys.executable, "-m", "logq", "stat", app.path], env=helpers.child_env(),
                          capture_output=True, text=True, timeout=60).stdout
    row = next(line.split() for line in text.splitlines() if line.startswith("add "))
    assert row[1:] == ["1", "2", "0", "0", "5", "0", "1"]           # in _state.STATES order

    m = _scrape(app.path)
    n = (("name", "add"),)
    assert m[("logq_task_submitted_total", n)] == 9
    assert m[("logq_task_succeeded_total", n)] == 5
    assert m[("logq_task_cancelled_total", n)] == 1
    assert m[("logq_task_failed_total", (("name", "bad"),))] == 1
    assert m[("logq_task_retried_total", (("name", "flaky"),))] == 1
    assert m[("logq_task_succeeded_total", (("name", "flaky"),))] == 1
    assert m[("logq_task_runtime_seconds_count", n)] == 5
    assert m[("logq_task_runtime_seconds_count", (("name", "flaky"),))] == 2      # both attempts
    assert m[("logq_task_queue_wait_seconds_count", n)] == 5                     # first attempts
    assert m[("logq_task_runtime_seconds_bucket", (("le", "+Inf"), ("name", "add")))] == 5
    assert m[("logq_tasks", (("name", "add"), ("state", "queued")))] == 2
    assert m[("logq_tasks", (("name", "bad"), ("state", "failed")))] == 1
    assert m[("logq_tasks", (("name", "add"), ("state", "running")))] == 0


# A Store opened (its index databases created) while another thread of the
# process holds a write transaction: py-lmdb's open_db without a
# transaction of its own waited for the write lock holding the GIL, and
# the holder never got the GIL back (a producer's first result() hung so
# while its queue's housekeeper wrote a checkpoint).
OPEN_DURING_WRITE = r"""
import sys, threading, time, logq
from logq.tasks._store import Store
q = logq.open(sys.argv[1])
held = threading.Event()
def hold(txn):
    held.set()
    time.sleep(0.5)         # (releases the GIL, holding the write lock)
t = threading.Thread(target=lambda: q._index.write(hold))
t.start()
held.wait()
s = Store(q)
t.join()
s.close(); q.close()
print("ok", flush=True)
"""


def test_store_opens_while_another_thread_writes(tmp_path) -> None:
    rc, out = helpers.run_child(OPEN_DURING_WRITE, str(tmp_path / "open.log"), str(tmp_path / "q"), timeout=60)
    assert rc == 0 and "ok" in out, out


def test_bench_tasks_workload_beside_the_raw_pool(tmp_path) -> None:
    out = subprocess.run([sys.executable, "-m", "logq", "bench", "--workload", "tasks", "--messages", "300",
                          "--dir", str(tmp_path), "--json"], env=helpers.child_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout)["results"]
    assert [r["workload"] for r in rows] == ["pool", "tasks"]
    pool, tasks = rows
    assert pool["check"] == "ok" and tasks["check"] == "ok", rows
    assert tasks["messages_consumed"] == 300 and tasks["msgs_per_s"] > 0
    assert tasks["floor"] == "raw WorkerPool no-op, this run"
    assert tasks["floor_msgs_per_s"] == pool["msgs_per_s"]


def test_outcomes_stored_together_expire_by_their_own_time(tmp_path) -> None:
    # A settlement's outcomes share one expiry entry per TTL (Store.expire);
    # purge deletes each once its own expires_ns passed: one rewritten with
    # a later expiry (a retried task) stays, as does one never expiring.
    from logq.tasks._records import Outcome
    from logq.tasks._store import Store
    q = logq.open(str(tmp_path / "q"))
    st = Store(q)
    try:
        def out(exp: int) -> bytes:
            return Outcome("succeeded", 1, 1, 2, 3, exp, "json", "t", b"1").pack()
        keys = [b"%d-0000000%d" % (i, i) for i in range(4)]

        def fill(txn) -> None:
            for k in keys[:3]:
                assert txn.put(k, out(100), db=st.outcome, overwrite=False)
            txn.put(keys[3], out(0), db=st.outcome)
            st.expire(txn, 100, keys[:3])
            st.expire(txn, 50, [b"old\nstyle"])         # (no id holds a newline: an entry of its own)
        st.idx.write(fill)
        st.idx.write(lambda txn: txn.put(keys[1], out(10**18), db=st.outcome))    # rewritten: later
        assert st.idx.write(lambda txn: st.purge_expired(txn, 99)) == 1      # only the 50 one is due
        assert all(st.recorded(k.decode()) is not None for k in keys)
        assert st.idx.write(lambda txn: st.purge_expired(txn, 100)) == 1
        assert [st.recorded(k.decode()) is not None for k in keys] == [False, True, False, True]
        assert st.idx.read(lambda txn: sum(1 for _ in txn.cursor(db=st.expiry).iternext())) == 0
    finally:
        st.close()
        q.close()


def test_settle_batch_hooks_run_once_per_transaction_with_what_changed(app) -> None:
    # App.settle_batch_hooks: one call per transaction that records
    # outcomes, with every (id, event, outcome) it changed; what it writes
    # through txn is there with the outcomes (the same transaction).
    from logq.tasks import _state as S
    seen: list[list[tuple[str, str, str]]] = []
    db = app._store().idx.open_db(b"test.batch_hook")

    def hook(txn, items) -> None:
        seen.append([(tid, ev, out.state) for tid, ev, out in items])
        for tid, _ev, out in items:
            txn.put(tid.encode(), out.state.encode(), db=db)
    app.settle_batch_hooks.append(hook)
    try:
        hs = [task_app.add.delay(i, 1) for i in range(30)]
        parked = task_app.add.apply_async((0, 0), delay=60)
        assert app.cancel(parked.id)
        p = app.pool("task_app:app", workers=2)
        p.start()
        try:
            assert [h.result(timeout=60) for h in hs] == [i + 1 for i in range(30)]
        finally:
            p.stop()
        flat = [x for call in seen for x in call]
        assert sorted(flat) == sorted([(h.id, S.SUCCEED, S.SUCCEEDED) for h in hs]
                                      + [(parked.id, S.CANCEL, S.CANCELLED)])
        assert all(call for call in seen)       # never called with nothing
        st = app._store()
        stored = st.idx.read(lambda t: {bytes(k).decode(): bytes(v).decode() for k, v in t.cursor(db=db)})
        assert stored == {x[0]: x[2] for x in flat}
    finally:
        app.settle_batch_hooks.remove(hook)


def test_tally_of_a_settlement_equals_one_observation_per_outcome() -> None:
    # Tally.settled_all (the pool's commits: integer-ns buckets, runs of a
    # name sharing lookups) counts exactly what settled() per outcome does,
    # bucket bounds included.
    import random

    from logq.tasks._census import Tally
    rnd = random.Random(12)
    for _ in range(200):
        vals, waits, rows = [], [], []
        for _ in range(rnd.randint(0, 30)):
            name, ev = rnd.choice("abc"), rnd.choice(["succeed", "fail", "give_up", "lost"])
            st = rnd.choice([0, 10**9])
            fin = st + rnd.choice([0, 1, 10**6 - 1, 10**6, 10**6 + 1, 5 * 10**6, 10**9, 700 * 10**9, -5])
            w = rnd.choice([None, -3, 0, 10**6, 10**7, 10**8, 4 * 10**12])
            vals.append((ev, b"id", b"", name, st, fin))
            waits.append(w)
            rows.append((name, ev, st, fin, w))
        fast, slow = Tally(), Tally()
        fast.settled_all(vals, waits)
        for r in rows:
            slow.settled(*r)
        assert fast.counts == slow.counts
        assert {k: h[:-1] for k, h in fast.hists.items()} == {k: h[:-1] for k, h in slow.hists.items()}
        assert all(abs(fast.hists[k][-1] - slow.hists[k][-1]) < 1e-6 for k in slow.hists)


def test_json_serializer_matches_the_json_module_and_refuses_what_it_refuses() -> None:
    # The JSON serializer calls json's C encoder and scanner directly (made
    # once): the same bytes as json.dumps(separators=(",", ":")) and the same
    # values back; what json refuses is a SerializationError, nothing else.
    from logq._errors import SerializationError
    from logq.tasks._records import JSON, dumps
    values = [0, -7, 2.5, "", "é\n\"\\", None, False, [1, [2, {}]], {"a": 1, "b": [None, "x"]}, {1: 2}]
    for v in values:
        b = JSON.dumps(v)
        assert b == json.dumps(v, separators=(",", ":")).encode()
        assert JSON.loads(b) == json.loads(b) and JSON.loads(memoryview(b)) == json.loads(b)
    circular: list = []
    circular.append(circular)
    for bad in (float("nan"), object(), {"s": {1, 2}}, circular):
        with pytest.raises(SerializationError):
            dumps(JSON, bad, "a value")
    assert JSON.loads(b" [1] ") == [1]
    for bad in (b"", b"[1,", b"1x", b"\xff"):
        with pytest.raises(ValueError):
            JSON.loads(bad)


def test_a_batch_with_a_gone_record_settles_each_message_with_its_own_outcome(app) -> None:
    # A worker sends no value for a record gone from the log (the pool's
    # "no longer in the log" failure): the Settler lines the values up with
    # the other messages; a shape it cannot line up settles them as lost.
    from logq.tasks import _state as S
    from logq.tasks._run import _GONE, Runner, Settler
    hs = [task_app.add.delay(i, 10) for i in range(3)]
    q = app.queue
    c = q.consumer("tasks")
    msgs = c.get_many(3, timeout=5)
    assert [m.offset for m in msgs] == [int(h.id.split("-")[0]) for h in hs]
    run = Runner("task_app:app", app.path)
    values = [run(msgs[0]), run(msgs[2])]                 # msgs[1]'s record "gone"
    acks, write, nacks = Settler(app)(msgs, values, {msgs[1].offset: _GONE})
    assert acks == [msgs[0], msgs[2]] and [n[0] for n in nacks] == [msgs[1]]
    c.ack_many(acks, write=write)
    m, error, nack_write = nacks[0][:3]
    c.nack(m, error=error, write=nack_write)
    c.commit()
    assert hs[0].result(timeout=5) == 10 and hs[2].result(timeout=5) == 12
    assert hs[1].status().state == S.RETRYING
    # Values that do not line up: every message is lost, none takes another's outcome.
    acks, write, nacks = Settler(app)(msgs, values[:1], {msgs[1].offset: _GONE})
    assert acks == [] and [n[0] for n in nacks] == msgs
    c.close()


def test_a_retry_that_finishes_before_its_failed_attempt_commits_still_counts_as_retried(app, tmp_path) -> None:
    """The failed attempt's nack and the retry's ack can commit together
    (the retry was due at once and finished within the commit interval);
    the acks' transaction goes first, so the failure arrives after the
    final outcome.  It must not change the state, and the retry must
    still be counted (the CI saw logq_task_retried_total 0 here)."""
    p = app.pool("task_app:app", workers=1, backoff_base=0.001, backoff_max=0.001, commit_interval=2.0)
    p.start()
    try:
        h = task_app.flaky.delay(str(tmp_path / "ctl"), 1)
        assert h.result(timeout=60) == 2
    finally:
        p.stop()
    st = h.status()
    assert st.state == "succeeded" and st.attempts == 2
    app.close()
    m = _scrape(app.path)
    n = (("name", "flaky"),)
    assert m[("logq_task_retried_total", n)] == 1
    assert m[("logq_task_succeeded_total", n)] == 1

"""Concurrent producers: processes x threads putting into one queue, with
small segments so that rolls happen under contention.  Afterwards the queue
holds exactly what was put, at dense offsets, once each, intact, and every
producer's returned offsets are the ones its payloads are at.  Also: group
commit among threads, two Queue objects in one process, and a queue used
after fork."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import pytest

import logq
from helpers import (CONCURRENT, READER, Child, Hang, children, deadline, identity, payload,
                     run_child, verify_contents, wait_for)

PROCS, THREADS, PER_THREAD = 3, 4, 40


def digest(entries) -> str:
    h = hashlib.sha256()
    for o, p in entries:
        h.update(b"%d:%d:" % (o, len(p)))
        h.update(p)
    return h.hexdigest()


DIGEST_CHILD = """
import hashlib, sys, logq
h = hashlib.sha256()
with logq.open(sys.argv[1]) as q:
    for o, p in q.scan():
        h.update(b"%d:%d:" % (o, len(p)))
        h.update(p)
    print(q.next_offset, h.hexdigest())
"""


@pytest.mark.parametrize("fsync", ["never", "always"])
def test_processes_times_threads(tmp_path, fsync):
    qdir = str(tmp_path / "q")
    go = str(tmp_path / "go")
    n = PROCS * THREADS * PER_THREAD
    results = [str(tmp_path / f"result-{p}") for p in range(PROCS)]
    reader_result = str(tmp_path / "reader-result")
    # created first: a concurrent first open is test_concurrent_first_open's subject
    logq.open(qdir, segment_bytes=4096).close()
    with children() as kids:
        for p in range(PROCS):
            cfg = {"dir": qdir, "fsync": fsync, "tag": f"p{p}", "threads": THREADS,
                   "per_thread": PER_THREAD, "ready": str(tmp_path / f"ready-{p}"), "go": go,
                   "result": results[p]}
            kids.append(Child(CONCURRENT, str(tmp_path / f"out-{p}"), json.dumps(cfg)))
        kids.append(Child(READER, str(tmp_path / "out-reader"),
                          json.dumps({"dir": qdir, "n": n, "ready": str(tmp_path / "ready-r"),
                                      "go": go, "result": reader_result})))
        ready = [str(tmp_path / f"ready-{p}") for p in range(PROCS)] + [str(tmp_path / "ready-r")]
        wait_for(lambda: all(map(os.path.exists, ready)) or not all(k.alive() for k in kids), 60,
                 "the producers to open the queue")
        open(go, "w").close()
        for k in kids:
            assert k.wait(120) == 0, f"child {k.pid} failed:\n{k.output()}"
    reported = []
    for r in results:
        with open(r) as f:
            reported += [tuple(x) for x in json.load(f)]
    assert len(reported) == n
    assert len({o for o, _, _ in reported}) == n, "two puts were given the same offset"
    with logq.open(qdir, segment_bytes=4096) as q:
        assert q.next_offset == n and len(q) == n and q.first_offset == 0
        seen = verify_contents(q, reported, max_unreported=0)
        assert set(seen) == {(t, i) for _, t, i in reported}
        st = q.stats()
        assert st["segments"] >= 5, "no rolls under contention: the test lost its point"
        mine = digest(q.scan())
    # what a process that did not take part sees
    rc, out = run_child(DIGEST_CHILD, str(tmp_path / "digest.out"), qdir)
    assert rc == 0, out
    assert out.split()[-2:] == [str(n), mine]
    # what the reader saw while the producers were putting
    with open(reader_result) as f:
        followed = [tuple(x) for x in json.load(f)]
    assert followed == sorted((o, t, i) for (t, i), o in seen.items())


FIRST_OPEN = """
import helpers, logq, os, sys, time
qdir, go, tag = sys.argv[1:4]
while not os.path.exists(go):
    time.sleep(0.0005)
with logq.open(qdir, fsync="always", segment_bytes=4096) as q:
    offs = [q.put(helpers.payload(tag, i)) for i in range(20)]
print(" ".join(map(str, offs)))
"""


def test_concurrent_first_open(tmp_path):
    """Several processes open a queue that does not exist yet at the same
    moment: all of them must get the same queue (one creates it, the others
    join) and their puts all land."""
    for attempt in range(3):
        qdir = str(tmp_path / f"q{attempt}")
        go = str(tmp_path / f"go{attempt}")
        with children() as kids:
            for p in range(4):
                kids.append(Child(FIRST_OPEN, str(tmp_path / f"out-{attempt}-{p}"), qdir, go, f"c{p}"))
            open(go, "w").close()
            outs = []
            for k in kids:
                rc = k.wait(60)
                outs.append(k.output())
                assert rc == 0, f"a concurrent first open failed:\n{k.output()}"
        reported = [(int(o), f"c{p}", i) for p, out in enumerate(outs)
                    for i, o in enumerate(out.split()[-20:])]
        with logq.open(qdir) as q:
            verify_contents(q, reported, max_unreported=0)
            assert q.next_offset == 80


def test_group_commit_among_threads(tmp_path):
    """8 threads share one Queue with fsync="always": all puts land, once
    each, and concurrent puts share fsyncs (fewer fsyncs than puts).  A
    reader thread follows along and never sees a torn record."""
    path = tmp_path / "q"
    nthreads, per = 8, 50
    offsets: list[list[int]] = [[] for _ in range(nthreads)]
    errors: list[BaseException] = []
    done = threading.Event()
    barrier = threading.Barrier(nthreads + 1)
    with logq.open(path, fsync="always", segment_bytes=4096) as q:
        def put(t: int) -> None:
            try:
                barrier.wait()
                for i in range(per):
                    offsets[t].append(q.put(payload(f"g{t}", i)))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        def follow() -> None:
            off = 0
            try:
                while off < nthreads * per:
                    finished = done.is_set()       # every put had returned before this read
                    first, got = q.read_many(off, 100)
                    assert not got or first == off
                    for p in got:
                        identity(p)
                    off += len(got)
                    if finished and not got:
                        raise AssertionError(f"reader stuck at {off} of {q.next_offset}")
                    if not got:
                        time.sleep(0.0005)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=put, args=(t,)) for t in range(nthreads)]
        reader = threading.Thread(target=follow)
        for th in threads + [reader]:
            th.start()
        with deadline(60, "8 threads putting"):
            barrier.wait()
            for th in threads:
                th.join()
            done.set()
            reader.join()
        assert not errors, errors
        fsyncs = q.stats()["fsyncs"]
        assert 0 < fsyncs < nthreads * per, f"{fsyncs} fsyncs for {nthreads * per} puts: no group commit"
        reported = [(o, f"g{t}", i) for t in range(nthreads) for i, o in enumerate(offsets[t])]
        verify_contents(q, reported, max_unreported=0)
    with logq.open(path) as q:
        verify_contents(q, reported, max_unreported=0)
        assert q.next_offset == nthreads * per


def test_two_queue_objects_in_one_process(tmp_path):
    path = tmp_path / "q"
    q1 = logq.open(path, fsync="never", segment_bytes=4096)
    q2 = logq.open(path, fsync="always", segment_bytes=4096)
    reported = []
    try:
        with deadline(60, "two Queue objects taking turns"):
            for i in range(60):                      # take turns, one thread
                reported.append((q1.put(payload("one", i)), "one", i))
                reported.append((q2.put(payload("two", i)), "two", i))
            for o, t, i in reported:                 # each sees the other's records
                assert q1.read(o) == q2.read(o) == payload(t, i)
            assert q1.next_offset == q2.next_offset == 120

            def hammer(q, tag):                      # and at the same time
                for i in range(60, 160):
                    reported.append((q.put(payload(tag, i)), tag, i))
            ts = [threading.Thread(target=hammer, args=(q1, "one")),
                  threading.Thread(target=hammer, args=(q2, "two"))]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert q1.next_offset == q2.next_offset == 320
            verify_contents(q2, reported, max_unreported=0)
    finally:
        q1.close()
        q2.close()
    with logq.open(path) as q:
        verify_contents(q, reported, max_unreported=0)
        assert q.next_offset == 320
        assert q.stats()["last_shutdown_clean"] is True


FORK_CHILD_CHECKS = ("put", "put_many", "read", "flush", "len", "stats")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_queue_used_after_fork_raises(tmp_path):
    path = tmp_path / "q"
    q = logq.open(path, fsync="always", segment_bytes=4096)
    try:
        q.put(b"before fork")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:   # the child: report through the pipe, never return into pytest
            code = 0
            try:
                os.close(r)
                calls = {"put": lambda: q.put(b"x"), "put_many": lambda: q.put_many([b"x"]),
                         "read": lambda: q.read(0), "flush": q.flush, "len": lambda: len(q),
                         "stats": q.stats}
                out = []
                for name in FORK_CHILD_CHECKS:
                    try:
                        calls[name]()
                        out.append(f"{name}: no error")
                    except logq.QueueClosedError as e:
                        out.append(f"{name}: closed" + (" (fork)" if "fork" in str(e) else ""))
                    except BaseException as e:  # noqa: BLE001
                        out.append(f"{name}: {type(e).__name__}: {e}")
                q.close()      # closing the inherited copy is harmless
                with logq.open(path, fsync="always") as q2:   # reopening in the child works
                    out.append(f"reopened put: {q2.put(b'from child')}")
                os.write(w, "\n".join(out).encode())
            except BaseException as e:  # noqa: BLE001
                os.write(w, f"child crashed: {e!r}".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        report = None
        try:
            with deadline(30, "the forked child"), os.fdopen(r, "rb") as f:
                report = f.read().decode()
        finally:
            if report is None:
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, report
        lines = report.splitlines()
        for name, line in zip(FORK_CHILD_CHECKS, lines):
            assert line == f"{name}: closed (fork)", report
        assert lines[-1] == "reopened put: 1", report
        # the parent's queue is unaffected
        assert q.read(1) == b"from child"
        assert q.put(b"parent again") == 2
    finally:
        q.close()
    with logq.open(path) as q:
        assert [p for _, p in q.scan()] == [b"before fork", b"from child", b"parent again"]



_LEASE_TXN_THEN_PUT = r"""
import os, sys, time, lmdb, logq
qdir, ready = sys.argv[1], sys.argv[2]
q = logq.open(qdir)
env = lmdb.open(os.path.join(qdir, "leases"), subdir=True, max_dbs=16)
with env.begin(write=True):            # the lease table's write lock, as a claim holds it
    open(ready, "w").close()
    time.sleep(0.3)                    # the parent puts, then waits for this lock
    q.put(b"from the child")           # waits for the append lock the parent holds
q.close()
"""

_PUT_THEN_STATS = r"""
import os, subprocess, sys, time, logq
qdir, ready, child = sys.argv[1], sys.argv[2], sys.argv[3]
with logq.open(qdir, fsync="never") as q:
    kid = subprocess.Popen([sys.executable, "-c", child, qdir, ready])
    while not os.path.exists(ready):
        time.sleep(0.001)
    q.put(b"from the parent")          # this process holds the append lock now
    q.stats()                          # and opens the lease table: waits for the child's lock
    assert kid.wait(30) == 0
    print(sorted(p for _, p in q.scan()), flush=True)
"""


def test_waiting_for_the_lease_table_lets_other_threads_give_the_append_lock_away(tmp_path):
    """A process holds the append lock (its puts keep it until another
    process asks) and opens the lease table while another process holds
    that table's write lock and waits for the append lock, as a consumer
    does when its claim reads the tail while a put of its process waits.
    Waiting for the lease table must not stall the first process's other
    threads: its housekeeper hands the append lock over, the other process
    finishes, and both go on.  (LMDB's own open_db waited holding the GIL:
    the two processes deadlocked; found as a hang of the Dramatiq tests.)
    Run in a process of its own, so that a deadlock fails the test."""
    qdir, ready = str(tmp_path / "q"), str(tmp_path / "ready")
    with logq.open(qdir) as q:
        q.consumer("g").close()        # a group, and no lease table open in this process
    with children() as kids:
        kid = Child(_PUT_THEN_STATS, str(tmp_path / "parent.out"), qdir, ready, _LEASE_TXN_THEN_PUT)
        kids.append(kid)
        try:
            code = kid.wait(30)
        except Hang:
            raise AssertionError("the processes deadlocked: one waited for the lease table "
                                 "with its threads stalled and the append lock held") from None
        assert code == 0, kid.output()
        assert "[b'from the child', b'from the parent']" in kid.output(), kid.output()

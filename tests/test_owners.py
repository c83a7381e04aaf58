"""Owners (``owners/<id>``, the flocked file that says a process holding
leases is alive) follow the queue directory, not its path, and are left
behind by nothing: no descriptor after queues, consumers and pools close,
in any order and from several threads; a directory deleted and made again
at the same path gets a new owner, so a live process's leases there do not
look dead to others; a forked or forkserver child takes an id of its own
and never releases or shares its parent's.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import threading

import helpers
import logq
from logq import _owners


def _fds_under(root: str) -> list[str]:
    out = []
    for n in os.listdir("/proc/self/fd"):
        try:
            t = os.readlink("/proc/self/fd/" + n)
        except OSError:
            continue
        if t.startswith(root + "/"):
            out.append(t)
    return out


def test_nothing_left_open_after_queues_consumers_and_pools_close(tmp_path):
    root = os.path.realpath(str(tmp_path))
    import test_pool as TP
    qdir, ctl = TP.setup(tmp_path, ["ok"] * 20)
    for i in range(3):
        q = logq.open(qdir)
        c1, c2 = q.consumer("a"), q.consumer("b")
        c1.ack(c1.get(timeout=5))
        assert len(_owners.held()) == 1 and _owners.held()[0].refs == 2   # one per process and dir
        (c2.close(), c1.close()) if i % 2 else c1.close()   # the queue closes what is left
        q.close()
        assert _fds_under(root) == [] and _owners.held() == []
        assert os.listdir(os.path.join(qdir, "owners")) == []
        logq.WorkerPool(qdir, TP.HANDLER, group="p%d" % i, workers=1).run(until_idle=True)
        assert _fds_under(root) == [] and _owners.held() == [], i


def test_threads_share_one_owner_and_the_last_one_releases_it(tmp_path):
    qdir = str(tmp_path / "q")
    logq.open(qdir).close()
    barrier = threading.Barrier(4)
    ids, errors = [], []

    def work(k: int) -> None:
        try:
            for _ in range(5):
                with logq.open(qdir) as q:
                    c = q.consumer("g%d" % k)
                    ids.append(c._g.owner)
                    barrier.wait(10)
                    c.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    assert _owners.held() == [] and _fds_under(os.path.realpath(qdir)) == []


HOLDS = """
import sys, logq
q = logq.open(sys.argv[1]); c = q.consumer('g', visibility_timeout=30)
print(len(c.get_many(10, timeout=1))); q.close()
"""


def test_directory_made_again_at_the_same_path_gets_a_new_owner(tmp_path):
    P = str(tmp_path / "q")
    old = logq.open(P)                  # still open when its directory goes
    old.put(b"old")
    oc = old.consumer("g")
    oc.ack(oc.get(timeout=5))
    old_id = oc._g.owner
    shutil.rmtree(P, ignore_errors=True)
    shutil.rmtree(P, ignore_errors=True)
    with logq.open(P) as q:
        q.put_many([b"m%d" % i for i in range(10)])
        c = q.consumer("g", visibility_timeout=30)
        held = c.get_many(10, timeout=5)
        assert len(held) == 10 and c._g.owner != old_id
        assert os.listdir(os.path.join(P, "owners")) == [f"{c._g.owner:016x}"]
        rc, out = helpers.run_child(HOLDS, str(tmp_path / "other.log"), P)
        assert (rc, out.strip()) == (0, "0"), out       # this live process's leases hold
        c.ack_many(held)
    old.close()


def _report_owner(qdir: str, conn) -> None:
    q = logq.open(qdir)
    c = q.consumer("g")
    conn.send((c._g.owner, len(c.get_many(10, timeout=0.5))))
    q.close()
    conn.send(_owners.held())


def test_forked_and_forkserver_children_take_ids_of_their_own(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put_many([b"x"] * 3)
        c = q.consumer("g", visibility_timeout=30)
        held = c.get_many(3, timeout=5)
        me = c._g.owner
        for method in ("fork", "forkserver"):
            ctx = multiprocessing.get_context(method)
            a, b = ctx.Pipe()
            p = ctx.Process(target=_report_owner, args=(qdir, b))
            p.start()
            child_id, got = a.recv()
            assert a.recv() == []                       # it released its own
            p.join(30)
            assert p.exitcode == 0, method
            assert child_id != me and got == 0, (method, child_id, got)
            # The child's exit released nothing of ours: still locked, still held.
            assert _owners.held()[0].id == me and _owners.alive(qdir, me)
            assert os.path.exists(os.path.join(qdir, "owners", f"{me:016x}"))
        c.ack_many(held)
    assert _owners.held() == []

"""logq._named, what the Celery and Dramatiq adapters share: the queue
directory of a framework's queue name, and the key-value table of the
result backends (expiry; ``incr`` atomic across real processes and
counting each member once)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import helpers

from logq._named import KV, close_under, queue_dir


def test_queue_dir_stays_inside_and_is_one_to_one(tmp_path):
    root = str(tmp_path)
    names = ["celery", "..", ".", "a/b", "../x", ".hidden", "x.y", "x%2Ey", "ü", "a b"]
    dirs = [queue_dir(root, n) for n in names]
    assert len(set(dirs)) == len(names)
    for d in dirs:
        assert os.path.dirname(d) == root and "/" not in os.path.basename(d)
        assert not os.path.basename(d).startswith(".")
        assert "." not in os.path.basename(d)      # (".kv" directories cannot collide)
    assert queue_dir(root, "celery") == os.path.join(root, "celery")


def test_set_get_expire_delete(tmp_path):
    kv = KV(str(tmp_path / "r.kv"), "t")
    try:
        kv.set(b"a", b"1")
        kv.set(b"b", b"2", ttl=0.2)
        kv.set(b"c", b"3", ttl=60)
        assert kv.mget([b"a", b"b", b"c", b"z"]) == [b"1", b"2", b"3", None]
        kv.expire(b"c", 0)                  # for ever now
        time.sleep(0.3)
        assert kv.get(b"b") is None         # expired: gone at once for readers
        assert kv.count() == 3              # ...and from the table at the next write
        kv.set(b"d", b"4")
        assert kv.count() == 3 and kv.get(b"c") == b"3"
        kv.delete(b"a")
        assert kv.get(b"a") is None
        assert kv.wait(b"d", 1) == b"4" and kv.wait(b"nope", 0.05) is None
    finally:
        close_under(str(tmp_path))


_INCR = """
import sys
from logq._named import KV
kv = KV(sys.argv[1], "t")
for i in range(int(sys.argv[2])):
    kv.incr(b"plain")
    kv.incr(b"members", member=f"m{i}".encode())
"""


def test_incr_is_atomic_across_processes_and_counts_members_once(tmp_path):
    path = str(tmp_path / "r.kv")
    kv = KV(path, "t")
    try:
        kv.incr(b"plain")                   # (creates the queue before the children race)
        procs = [subprocess.Popen([sys.executable, "-c", _INCR, path, "20"], env=helpers.child_env())
                 for _ in range(3)]
        assert all(p.wait(120) == 0 for p in procs)
        assert kv.get(b"plain") == b"61"        # 1 + 3 x 20: no increment lost
        assert kv.get(b"members") == b"20"      # each member counted once, by whichever came first
        assert kv.incr(b"members", member=b"m0") == 20
        kv.delete(b"members")                   # members go with their counter
        assert kv.incr(b"members", member=b"m0") == 1
    finally:
        close_under(str(tmp_path))


def test_the_core_imports_no_adapter():
    """Adapters sit at the edge: importing logq (its queue, tasks and
    command line) loads neither them nor their frameworks."""
    code = ("import sys, logq, logq.tasks, logq.cli\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('celery', 'kombu', 'dramatiq')\n"
            "             or m.startswith(('logq.celery', 'logq.dramatiq')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], env=helpers.child_env(), check=True, timeout=60)

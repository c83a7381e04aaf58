"""The LMDB index on its own: the map grows by itself, and a damaged data
file is recognised from its own metadata before LMDB would map it."""

from __future__ import annotations

import os
from array import array

import logq
from logq import _format as F
from logq._index import lmdb_file_problem, open_index


def test_map_grows_without_map_full_error(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir):
        pass
    idx = open_index(qdir, may_rebuild=True)
    try:
        start = idx.env.info()["map_size"]
        big = array("Q", range(1 << 17))            # 1 MiB per segment entry
        for base in range(0, 40 * 64, 64):          # 40 MiB in all
            idx.set_sparse(base, 123, len(big) * F.SPARSE_STRIDE, big)
        assert idx.env.info()["map_size"] > start
        assert idx.sparse(64 * 39) == (123, len(big) * F.SPARSE_STRIDE, big)
    finally:
        idx.close()
    with logq.open(qdir) as q:                      # still opens, and works
        assert q.put(b"x") == 0


def test_lmdb_file_problem_reads_the_meta_pages(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put(b"x")
    data = os.path.join(qdir, F.INDEX_DIR, "data.mdb")
    assert lmdb_file_problem(data) is None
    with open(data, "r+b") as f:
        f.truncate(3 * 4096)        # the file is preallocated beyond its pages: cut into them
    assert "truncated" in lmdb_file_problem(data)
    with open(data, "r+b") as f:
        f.seek(16)
        f.write(b"\0\0\0\0")                        # the magic of meta page 0
    assert "magic" in lmdb_file_problem(data)
    assert lmdb_file_problem(os.path.join(qdir, "missing.mdb")) is None


def test_stats_say_when_the_index_was_rebuilt(tmp_path):
    import shutil
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put(b"x")
        assert q.stats()["index_rebuilt"] is False      # new, not rebuilt
    with logq.open(qdir) as q:
        assert q.stats()["index_rebuilt"] is False
    shutil.rmtree(os.path.join(qdir, F.INDEX_DIR))
    with logq.open(qdir) as q:
        assert q.stats()["index_rebuilt"] is True
        assert q.read(0) == b"x"


OPEN_SCRATCH = r"""
import sys
from logq._index import open_scratch
sc = open_scratch(sys.argv[1], may_reset=False)
print("opened", flush=True)
"""


def test_a_child_forked_while_the_lease_table_opens_does_not_hold_it(tmp_path, monkeypatch):
    """The lease table is probed and opened under a lock.  A child forked
    (by any thread) while this process holds that lock must not keep it:
    here the fork happens inside the locked section, the child lives on
    for a minute, and another process must still open the table."""
    import signal
    import time

    import lmdb

    import helpers
    from logq import _index

    qdir = str(tmp_path / "q")
    with logq.open(qdir):
        pass
    _index.reset_scratch(qdir)
    kids: list[int] = []
    real_open = lmdb.open

    def forking_open(*a, **kw):
        pid = os.fork()
        if pid == 0:                     # the child keeps every descriptor it inherited
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
        return real_open(*a, **kw)
    monkeypatch.setattr(_index.lmdb, "open", forking_open)
    try:
        sc = _index.Scratch(qdir, may_reset=False)
        assert kids, "the open did not go through lmdb.open"
        monkeypatch.setattr(_index.lmdb, "open", real_open)
        rc, out = helpers.run_child(OPEN_SCRATCH, str(tmp_path / "child.log"), qdir, timeout=30)
        assert rc == 0 and "opened" in out, out
        sc.env.close()
    finally:
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)

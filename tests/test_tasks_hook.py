"""The consumer's transactional write hook (``ack(m, write=)``,
``ack_many(ms, write=)``, ``nack(m, ..., write=)``): what a hook writes is
durable exactly when its settlement is.  Rule: each hook runs in the
transaction of its own settlement (a commit's acks are one transaction,
its nacks another), so a SIGKILL anywhere can never separate them."""

from __future__ import annotations

import random
import time

import logq
from logq._index import GROUP, G_WATERMARK
from logq._settled import _is_settled

import helpers

CHILD = r"""
import sys, random, logq
path, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
q = logq.open(path)
db = q._index.open_db(b"test.hook")
c = q.consumer("g", commit_every=rnd.choice([1, 7, 50]), commit_interval=0.01, max_attempts=3,
               backoff_base=0.001, backoff_max=0.001)
from logq._settled import _be
print("ready", flush=True)
while True:
    for m in c.get_many(20, timeout=0.05):
        tag = b"ack" if rnd.random() < 0.8 else b"nack"
        def w(txn, off=m.offset, tag=tag, a=m.attempt):
            txn.put(_be(off) + tag + bytes([a]), b"1", db=db)
        if tag == b"ack":
            c.ack(m, write=w)
        else:
            c.nack(m, error="x", write=w)
"""


def _state(path: str) -> tuple[set[int], dict[int, set[tuple[str, int]]], set[int]]:
    q = logq.open(path)
    try:
        idx = q._index
        db = idx.open_db(b"test.hook")
        p = b"g\0"

        def fn(txn):
            g = txn.get(p[:-1], db=idx.groups)
            mark = GROUP.unpack(g)[G_WATERMARK] if g is not None else 0
            settled = {o for o in range(q.next_offset) if g is not None and _is_settled(txn, idx, p, mark, o)}
            marks: dict[int, set] = {}
            for k, _v in txn.cursor(db=db).iternext():
                k = bytes(k)
                marks.setdefault(int.from_bytes(k[:8], "big"), set()).add((k[8:-1].decode(), k[-1]))
            dead = {int.from_bytes(bytes(k)[-8:], "big") for k, _ in txn.cursor(db=idx.dead).iternext()}
            sched = {}
            for k, v in txn.cursor(db=idx.pending).iternext():
                sched[int.from_bytes(bytes(k)[-8:], "big")] = 1
            return settled, marks, dead | set(sched) - settled
        return idx.read(fn)
    finally:
        q.close()


def test_hooks_commit_with_their_settlement(tmp_path) -> None:
    path = str(tmp_path / "q")
    with logq.open(path) as q:
        q.put_many([b"a", b"b", b"c", b"d"])
        db = q._index.open_db(b"test.hook")
        c = q.consumer("g", commit_every=1000, commit_interval=60, backoff_base=60, backoff_max=60)
        ms = c.get_many(4)
        c.ack(ms[0], write=lambda t: t.put(b"a", b"1", db=db))
        c.ack_many(ms[1:3], write=lambda t: t.put(b"bc", b"1", db=db))
        c.nack(ms[3], error="no", write=lambda t: t.put(b"d", b"1", db=db))
        assert q._index.get(b"a", db) is None      # not before the commit
        c.commit()
        assert [q._index.get(k, db) for k in (b"a", b"bc", b"d")] == [b"1"] * 3
        c.close()


def test_sigkill_never_separates_a_hook_from_its_settlement(tmp_path) -> None:
    rnd = random.Random(helpers.SEED)
    path = str(tmp_path / "q")
    with logq.open(path) as q:
        q.put_many([b"m%d" % i for i in range(3000)])
    with helpers.children() as kids:
        for round_ in range(5):
            kid = helpers.Child(CHILD, str(tmp_path / f"c{round_}.log"), path, rnd.randrange(1 << 30))
            kids.append(kid)
            helpers.wait_for(lambda: "ready" in kid.output(), 30, "the child to start")
            time.sleep(rnd.uniform(0.05, 0.4))
            kid.kill()
            kid.wait(30)
            settled, marks, _ = _state(path)
            for off in settled:
                # settled by an ack: an ack mark of some attempt; or
                # dead-lettered by a nack: its nack mark
                assert off in marks, f"offset {off} settled without its hook's write"
            for off, ms in marks.items():
                if any(t == "ack" for t, _a in ms):
                    assert off in settled, f"offset {off}: hook written, ack not durable"
        assert len(settled) > 20 and any(t == "nack" for ms in marks.values() for t, _a in ms)


def test_a_failing_nack_hook_does_not_run_the_committed_acks_hooks_again(tmp_path):
    """A commit writes its acks (with their hooks) in one transaction and
    its nacks in another.  When the nacks' transaction fails (here: its
    hook raises once), the acks are durable already: the retried commit
    writes the nacks only, and each ack's hook ran in exactly one committed
    transaction (the tasks layer's settle hooks count on it)."""
    with logq.open(str(tmp_path / "q")) as q:
        q.put_many([b"a", b"b", b"c"])
        db = q._index.open_db(b"test.hook")
        c = q.consumer("g", commit_every=1000, commit_interval=60)
        m1, m2, m3 = c.get_many(3, timeout=5)

        def count(txn, key):
            n = int(txn.get(key, db=db) or b"0")
            txn.put(key, str(n + 1).encode(), db=db)

        fails = [True]

        def nack_hook(txn):
            if fails.pop() if fails else False:
                raise RuntimeError("the nack's write fails once")
            count(txn, b"nack")
        c.ack(m1, write=lambda txn: count(txn, b"ack1"))
        c.ack(m3, write=lambda txn: count(txn, b"ack3"))
        c.nack(m2, error="x", write=nack_hook)
        try:
            c.commit()
        except RuntimeError:
            pass
        else:
            raise AssertionError("the failing nack hook did not fail the commit")
        c.commit()
        got = q._index.read(lambda txn: {k: txn.get(k, db=db) for k in (b"ack1", b"ack3", b"nack")})
        assert got == {b"ack1": b"1", b"ack3": b"1", b"nack": b"1"}, got
        assert q.stats()["groups"]["g"]["acked"] == 2
        c.close()

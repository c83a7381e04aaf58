"""Consumer.take: batches of deliveries as parallel arrays, across real
processes and real SIGKILLs.  Competing takers in several processes get
disjoint sets and together all; a taker SIGKILLed holding a batch has it
redelivered at once, the attempt counted; partial acks of a batch and a
nack of the rest; payloads stay valid (copies) after the batch is
settled; take honours priorities, delays, keys and dead letters as get
does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import logq
from helpers import child_env

TAKER = r"""
import logq, os, sys, time
path, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
with logq.open(path) as q:
    c = q.consumer("g", visibility_timeout=300)
    idle = 0
    while idle < 3:
        b = c.take(n, timeout=0.3)
        if not len(b):
            idle += 1
            continue
        idle = 0
        assert b.payloads == [b"m%d" % o for o in b.offsets]
        c.ack(b)
        c.commit()
        os.write(fd, "".join(f"{o}\n" for o in b.offsets).encode())
"""

HOLDER = r"""
import logq, sys, time
path = sys.argv[1]
q = logq.open(path)
c = q.consumer("g", visibility_timeout=300)
b = c.take(50, timeout=5)
print(" ".join(map(str, b.offsets)), flush=True)
time.sleep(600)
"""


def _fill(path: str, n: int) -> None:
    with logq.open(path) as q:
        q.put_many([b"m%d" % i for i in range(n)])


def test_competing_takers_in_processes_get_disjoint_sets_and_together_all(tmp_path):
    path, n = str(tmp_path / "q"), 20_000
    _fill(path, n)
    outs = [str(tmp_path / f"out{i}") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", TAKER, path, o, str(k)], env=child_env())
             for o, k in zip(outs, (1, 97, 1000))]
    for p in procs:
        assert p.wait(120) == 0
    got = [[int(x) for x in open(o).read().split()] if os.path.exists(o) else [] for o in outs]
    every = [o for g in got for o in g]
    assert sorted(every) == list(range(n)), "lost or duplicated across processes"
    with logq.open(path) as q:
        st = q.stats()["groups"]["g"]
        assert st["acked"] == n and st["backlog"] == 0 and st["redelivered"] == 0


def test_sigkill_mid_batch_redelivers_it_with_the_attempt_counted(tmp_path):
    path = str(tmp_path / "q")
    _fill(path, 120)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, path], env=child_env(),
                         stdout=subprocess.PIPE, text=True)
    held = [int(x) for x in p.stdout.readline().split()]
    assert held == list(range(50))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with logq.open(path) as q:
        c = q.consumer("g", visibility_timeout=300)
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 30
        while len(seen) < 120 and time.monotonic() < deadline:
            b = c.take(200, timeout=0.5)
            seen.update(zip(b.offsets, b.attempts))
            c.ack(b)
        c.commit()
        assert sorted(seen) == list(range(120))
        assert all(seen[o] == 2 for o in held), "the killed batch's attempt was not counted"
        assert all(seen[o] == 1 for o in range(50, 120))
        assert q.stats()["groups"]["g"]["acked"] == 120


def test_partial_acks_then_nack_of_the_rest(tmp_path):
    with logq.open(str(tmp_path / "q")) as q:
        q.put_many([b"p%d" % i for i in range(10)])
        c = q.consumer("g", max_attempts=2)
        b = c.take(10)
        assert list(b.offsets) == list(range(10)) and list(b.attempts) == [1] * 10
        c.ack(b, [0, 1, 2])
        b.ack(5)
        with pytest.raises(logq.NotDeliveredError):
            c.ack(b, [4, 5])            # 5 is settled: nothing is
        with pytest.raises(logq.NotDeliveredError):
            c.ack(b, [3, 3])
        c.nack(b, delay=0, error="bad", indices=[3, 4])
        c.nack(b, delay=0)                # the rest: 6..9
        with pytest.raises(logq.NotDeliveredError):
            c.ack(b)
        c.commit()
        again = c.take(10, timeout=5)
        assert sorted(again.offsets) == [3, 4, 6, 7, 8, 9]
        assert list(again.attempts) == [2] * 6
        assert again.payloads == [b"p%d" % o for o in again.offsets]
        c.nack(again, error="twice")      # max_attempts=2: dead letters
        c.commit()
        assert [d.offset for d in c.dead_letters()] == [3, 4, 6, 7, 8, 9]
        assert c.dead_letters()[0].error == "twice"
        st = q.stats()["groups"]["g"]
        assert st["acked"] == 4 and st["dead_letters"] == 6 and st["backlog"] == 0


def test_payloads_stay_valid_after_the_batch_is_settled_and_the_queue_closed(tmp_path):
    q = logq.open(str(tmp_path / "q"))
    q.put_many([bytes([i]) * 300 for i in range(50)])
    c = q.consumer("g")
    b = c.take(50)
    ps = b.payloads
    c.ack(b)
    c.commit()
    q.close()
    assert all(isinstance(p, bytes) for p in ps)
    assert ps == [bytes([i]) * 300 for i in range(50)]


def test_take_follows_get_semantics_priorities_delays_keys(tmp_path):
    """The same order and the same attributes as get_many on a twin queue."""
    def fill(q):
        q.put(b"low")
        q.put(b"high", priority=5)
        q.put(b"later", delay=3600)
        q.put(b"keyed", key=b"k1")
        q.put(b"mid", priority=2)
    a, b_ = logq.open(str(tmp_path / "a")), logq.open(str(tmp_path / "b"))
    try:
        fill(a)
        fill(b_)
        ms = a.consumer("g").get_many(10)
        bt = b_.consumer("g").take(10)
        assert [m.data for m in ms] == bt.payloads
        assert [m.offset for m in ms] == list(bt.offsets)
        assert [m.priority for m in ms] == list(bt.priorities)
        assert [m.key for m in ms] == bt.keys
        assert b"later" not in bt.payloads
    finally:
        a.close()
        b_.close()


def test_a_batch_is_settled_only_by_its_own_group(tmp_path):
    with logq.open(str(tmp_path / "q")) as q:
        q.put_many([b"a", b"b"])
        c1, c2 = q.consumer("one"), q.consumer("two")
        b = c1.take(2)
        with pytest.raises(logq.NotDeliveredError):
            c2.ack(b)
        with pytest.raises(logq.NotDeliveredError):
            c2.nack(b)
        c1.ack(b)
        empty = c1.take(5, timeout=0)
        assert len(empty) == 0
        c1.ack(empty)                    # nothing to do

"""Queue.wait: a reader blocks until a record is put, by this process or
another, without polling (a futex on the shared tail, natively), and a
close() wakes it."""

from __future__ import annotations

import threading
import time

import pytest

import logq
from helpers import run_child

WAITER = r"""
import resource, sys, time
import logq
q = logq.open(sys.argv[1])
start = q.next_offset
print("waiting", start, flush=True)
cpu0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.monotonic()
idle = q.wait(start, timeout=1.0)            # nobody puts in this second
cpu1 = resource.getrusage(resource.RUSAGE_SELF)
print("idle", idle, round(time.monotonic() - t0, 3),
      round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 4), flush=True)
open(sys.argv[2], "w").close()               # tell the parent to put now
woke = q.wait(start, timeout=30.0)
print("woke", woke, q.read(start), flush=True)
q.close()
"""


def test_a_put_in_another_process_wakes_a_waiter(tmp_path):
    qdir = str(tmp_path / "q")
    go = tmp_path / "go"
    with logq.open(qdir) as q:
        q.put(b"before")

    def producer() -> None:
        while not go.exists():
            time.sleep(0.01)
        with logq.open(qdir) as q:
            q.put(b"hello")

    t = threading.Thread(target=producer)
    t.start()
    rc, out = run_child(WAITER, str(tmp_path / "out"), qdir, str(go), timeout=60)
    t.join()
    assert rc == 0, out
    idle = out.split("idle ")[1].split()
    assert idle[0] == "False"                 # timed out: nothing was put
    assert float(idle[1]) >= 0.99
    # An idle waiter sleeps: a second of waiting costs next to no CPU (the
    # pure codec looks every 5 ms; allow for that and a slow machine).
    assert float(idle[2]) < (0.05 if logq.native_enabled() else 0.3), out
    assert "woke True b'hello'" in out


def test_a_put_in_this_process_wakes_a_waiting_thread(tmp_path):
    with logq.open(tmp_path / "q") as q:
        got = []
        t = threading.Thread(target=lambda: got.append(q.wait(0, timeout=30)))
        t.start()
        time.sleep(0.05)
        assert not got                         # still waiting: nothing put yet
        q.put(b"x")
        t.join(30)
        assert got == [True]
        assert q.wait(0, timeout=0) is True    # already there: no waiting
        assert q.wait(1, timeout=0.01) is False


def test_close_wakes_waiters(tmp_path):
    q = logq.open(tmp_path / "q")
    errors = []

    def waiter() -> None:
        try:
            q.wait(5, timeout=60)
        except logq.QueueClosedError as e:
            errors.append(e)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.05)
    q.close()
    t.join(30)
    assert not t.is_alive()
    assert len(errors) == 1
    with pytest.raises(logq.QueueClosedError):
        q.wait(0, timeout=0)

"""A settlement takes effect when it is made, not at the group's next
commit: ``nack(m, delay=d)`` redelivers d seconds after the nack (never
before), ``nack(m)`` after the backoff, in this process and in a competing
consumer process, with ``commit_interval`` far away (30 s) and no commit in
between; a nack of part of a batch; the pool's failure path; ``extend``
seen by another process, and refused once the lease was given away.  The
nacking process SIGKILLed before its commit: the message comes back at
once, that delivery counted as an attempt.

Times are lower bounds held strictly (never before d) and upper bounds far
below the commit interval: a loaded machine may be slow, not early.
"""

from __future__ import annotations

import time

import pytest

import helpers
import logq

LONG = 30.0         # commit_interval: a redelivery that waited for the commit would take this long
SOON = 10.0         # "at once", generously, on a loaded two-core machine


def _queue(tmp_path, n=1):
    q = logq.open(str(tmp_path / "q"))
    q.put_many([b"m%d" % i for i in range(n)])
    return q


@pytest.mark.parametrize("how", [{"delay": 0.0}, {"delay": 0.5}, {}])
def test_nack_redelivers_at_its_own_time_without_a_commit(tmp_path, how):
    with _queue(tmp_path) as q:
        c = q.consumer("g", commit_interval=LONG, backoff_base=0.05, backoff_max=0.05)
        m = c.get(timeout=5)
        t = time.monotonic()
        c.nack(m, **how)
        m2 = c.get(timeout=SOON)
        dt = time.monotonic() - t
        assert (m2.offset, m2.attempt) == (m.offset, 2)
        assert dt >= how.get("delay", 0.0)
        assert dt < SOON
        # Nothing was committed for it: the retry came from the lease table.
        assert q.stats()["groups"]["g"]["scheduled"] == 0
        c.ack(m2)
        c.commit()
        assert q.stats()["groups"]["g"]["watermark"] == 1


def test_nack_of_part_of_a_batch(tmp_path):
    with _queue(tmp_path, 6) as q:
        c = q.consumer("g", commit_interval=LONG)
        ms = c.get_many(6, timeout=5)
        assert len(ms) == 6
        t = time.monotonic()
        for m in ms[1:3]:
            c.nack(m, delay=0.3)
        c.ack_many([ms[0]] + ms[3:])
        got = [c.get(timeout=SOON), c.get(timeout=SOON)]
        assert time.monotonic() - t >= 0.3
        assert sorted((m.offset, m.attempt) for m in got) == [(1, 2), (2, 2)]
        c.ack_many(got)
        c.commit()
        assert q.stats()["groups"]["g"]["watermark"] == 6


WAITER = """
import sys, time, os, logq
q = logq.open(sys.argv[1])
c = q.consumer("g", commit_interval=30.0)
os.write(1, b"ready\\n")
m = c.get(timeout=25)
os.write(1, ("got %d %d %r\\n" % (m.offset, m.attempt, time.monotonic())).encode())
c.ack(m)
q.close()
"""


def test_nack_is_seen_by_a_competing_process_before_any_commit(tmp_path):
    with _queue(tmp_path) as q:
        c = q.consumer("g", commit_interval=LONG)
        m = c.get(timeout=5)
        with helpers.children() as kids:
            kid = helpers.Child(WAITER, str(tmp_path / "waiter.log"), q.path)
            kids.append(kid)
            helpers.wait_for(lambda: "ready" in kid.output(), 30, "the competing consumer")
            time.sleep(0.3)      # it waits in get() now, with nothing deliverable
            t = time.monotonic()
            c.nack(m, delay=0.5)
            assert kid.wait(30) == 0, kid.output()
        word, off, attempt, at = kid.output().split("\n")[1].split()
        assert (word, int(off), int(attempt)) == ("got", m.offset, 2)
        # (Due times are wall-clock, this is monotonic: 5 ms for the two clocks' drift.)
        assert t + 0.5 - 0.005 <= float(at) < t + SOON
        c.close()


NACKER = """
import sys, time, os, logq
q = logq.open(sys.argv[1])
c = q.consumer("g", commit_interval=30.0, commit_every=1000)
m = c.get(timeout=10)
c.nack(m, delay=60)
os.write(1, ("nacked %d %d\\n" % (m.offset, m.attempt)).encode())
time.sleep(60)
"""


def test_nacking_process_killed_before_its_commit_redelivers_at_once(tmp_path):
    with _queue(tmp_path) as q:
        with helpers.children() as kids:
            kid = helpers.Child(NACKER, str(tmp_path / "nacker.log"), q.path)
            kids.append(kid)
            helpers.wait_for(lambda: "nacked" in kid.output(), 30, "the nack")
            kid.kill()
            kid.wait(30)
        c = q.consumer("g", commit_interval=LONG)
        t = time.monotonic()
        m = c.get(timeout=SOON)
        # Not after the nack's 60 s (never made durable): at once, and the
        # delivery to the dead process counted.
        assert (m.offset, m.attempt) == (0, 2)
        assert time.monotonic() - t < SOON
        c.ack(m)
        c.close()


HOLDER = """
import sys, time, os, logq
q = logq.open(sys.argv[1])
c = q.consumer("g", visibility_timeout=float(sys.argv[2]))
got = c.get_many(10, timeout=float(sys.argv[3]))
os.write(1, ("got %s\\n" % ",".join("%d:%d" % (m.offset, m.attempt) for m in got)).encode())
time.sleep(float(sys.argv[4]))
q.close()
"""


def test_extend_holds_against_other_processes_and_a_lost_lease_is_not_extended(tmp_path):
    with _queue(tmp_path) as q:
        c = q.consumer("g", visibility_timeout=0.5)
        m = c.get(timeout=5)
        c.extend(m, 60)
        time.sleep(0.6)     # the original lease ran out; the extension holds
        rc, out = helpers.run_child(HOLDER, str(tmp_path / "h1.log"), q.path, 30, 1.0, 0)
        assert rc == 0 and "got \n" in out, out
        c.ack(m)
        c.commit()

        q.put(b"next")
        m = c.get(timeout=5)
        time.sleep(0.6)     # ran out, not extended: another process may take it
        with helpers.children() as kids:
            kid = helpers.Child(HOLDER, str(tmp_path / "h2.log"), q.path, 30, 5.0, 30)
            kids.append(kid)
            helpers.wait_for(lambda: "got" in kid.output(), 30, "the other consumer")
            assert f"got {m.offset}:2" in kid.output(), kid.output()
            with pytest.raises(logq.NotDeliveredError):
                c.extend(m, 60)         # it would steal the other consumer's lease
            c.ack(m)                    # a late ack is still accepted
        c.close()


def test_pool_failure_path_retries_without_waiting_for_the_pool_commit(tmp_path):
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    import pool_handlers
    import test_pool as TP
    with logq.open(str(tmp_path / "q")) as q:
        q.put(pool_handlers.message_data(str(ctl), helpers.payload("raise", 0)))
    p = TP.pool(str(tmp_path / "q"), workers=1, commit_interval=LONG, max_attempts=3,
                backoff_base=0.05, backoff_max=0.05)
    t = time.monotonic()
    with TP.Running(p):
        helpers.wait_for(lambda: p.stats().dead_lettered >= 1, 25, "three attempts")
        assert time.monotonic() - t < 25
    fails = [ln for ln in TP.lines(str(ctl)) if ln[0] == "fail"]
    assert [int(ln[3]) for ln in fails] == [1, 2, 3]

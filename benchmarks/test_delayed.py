"""Pending delayed messages must not slow ``get``: the same drain of plain
messages (get_many(1000) + ack_many) on a queue whose group has a million
delayed messages waiting (due in an hour; LOGQ_BENCH_SCALE scales the
count), beside the drain of an identical queue without them, in the same
run.  The delayed messages are moved to the group's time-ordered schedule
once, by the first claim that passes them (timed separately); after that a
claim looks only at the schedule's first entry.  Target: the ratio stays
within 10 % of 1.
"""

from __future__ import annotations

import os
import time

import bench_helpers as H

import logq

PLAIN = 100


def _build(path: str, delayed: int, plain: list[bytes]) -> None:
    due = time.time() + 3600
    with logq.open(path, fsync="never") as q:
        for i in range(delayed):
            q.put(b"later-%d" % i, deliver_at=due)
        for b in H.batches(plain, 1000):
            q.put_many(b)


def _drain(path: str, expect: list[bytes], *, first_claim: bool = False) -> tuple[float, float]:
    """(msgs/s of the drain, seconds of the first claim)."""
    with logq.open(path, fsync="never") as q:
        c = q.consumer("g")
        t = time.perf_counter()
        ms = c.get_many(1000)
        first = time.perf_counter() - t
        got = [m.data for m in ms]
        c.ack_many(ms)
        t = time.perf_counter()
        while len(got) < len(expect):
            ms = c.get_many(1000)
            assert ms, f"drain stopped after {len(got)} of {len(expect)}"
            got += [m.data for m in ms]
            c.ack_many(ms)
        c.commit()
        rate = (len(expect) - 1000) / (time.perf_counter() - t)
        assert got == expect
        st = q.stats()["groups"]["g"]
        assert st["backlog"] == st["scheduled"]         # only the delayed ones wait
        return rate, first


def test_pending_delayed_messages_do_not_slow_get(bench_dir, report, note):
    delayed = H.scaled(1_000_000, 1000)
    plain = H.sequence(H.make_pool(PLAIN, tag="plain"), H.scaled(200_000, 5000))
    with_delayed = os.path.join(bench_dir, "delayed-1m")
    without = os.path.join(bench_dir, "delayed-none")
    t = time.perf_counter()
    _build(with_delayed, delayed, plain)
    build = time.perf_counter() - t
    _build(without, 0, plain)
    base, _ = _drain(without, plain)
    rate, first = _drain(with_delayed, plain)
    note(f"{delayed} delayed puts took {build:.1f}s; the first claim moved them to the "
         f"schedule in {first:.2f}s")
    report(f"get_many+ack_many with {delayed} delayed pending", rate, "msgs/s",
           "same drain, no delayed messages", base, ratio_target=(">=", 0.9))

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
import statistics
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


class _Drain:
    """A group draining one queue in chunks (after its first claim, which
    moves the delayed messages to the schedule and is timed apart)."""

    def __init__(self, path: str) -> None:
        self.q = logq.open(path, fsync="never")
        self.c = self.q.consumer("g")
        t = time.perf_counter()
        ms = self.c.get_many(1000)
        self.first = time.perf_counter() - t
        self.got = [m.data for m in ms]
        self.c.ack_many(ms)

    def chunk(self, n: int) -> float:
        """msgs/s of draining ``n`` more messages."""
        c, got = self.c, self.got
        want = len(got) + n
        t = time.perf_counter()
        while len(got) < want:
            ms = c.get_many(1000)
            assert ms, f"drain stopped after {len(got)}"
            got += [m.data for m in ms]
            c.ack_many(ms)
        return n / (time.perf_counter() - t)

    def finish(self, expect: list[bytes]) -> None:
        if len(self.got) < len(expect):
            self.chunk(len(expect) - len(self.got))
        self.c.commit()
        assert self.got == expect
        st = self.q.stats()["groups"]["g"]
        assert st["backlog"] == st["scheduled"]         # only the delayed ones wait
        self.q.close()


def test_pending_delayed_messages_do_not_slow_get(bench_dir, report, note):
    delayed = H.scaled(1_000_000, 1000)
    chunk = 10_000
    plain = H.sequence(H.make_pool(PLAIN, tag="plain"), H.scaled_multiple(200_000, chunk, 2))
    with_delayed = os.path.join(bench_dir, "delayed-1m")
    without = os.path.join(bench_dir, "delayed-none")
    t = time.perf_counter()
    _build(with_delayed, delayed, plain)
    build = time.perf_counter() - t
    _build(without, 0, plain)
    a, b = _Drain(without), _Drain(with_delayed)
    rates_a, rates_b = [], []
    # Interleaved chunks, so that the machine's noise falls on both alike.
    for _ in range((len(plain) - 1000) // chunk):
        rates_a.append(a.chunk(chunk))
        rates_b.append(b.chunk(chunk))
    a.finish(plain)
    b.finish(plain)
    note(f"{delayed} delayed puts took {build:.1f}s; the first claim moved them to the "
         f"schedule in {b.first:.2f}s")
    report(f"get_many+ack_many with {delayed} delayed pending", max(rates_b), "msgs/s",
           "same drain, no delayed messages", max(rates_a),
           median=statistics.median(rates_b), ratio_target=(">=", 0.9),
           note=f"best of {len(rates_b)} interleaved chunks of {chunk}; median ratio "
                f"{statistics.median(rates_b) / statistics.median(rates_a):.3g}")

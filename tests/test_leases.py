"""The pure bookkeeping (``logq._leases``, ``logq._retry``), tested on its
own: settled-set merging against a model, backoff bounds, the ledger's
rules for acks and nacks, priority order with aging, the circuit breaker's
states.  No files, no processes, no clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logq import NotDeliveredError
from logq._leases import (Claim, Delivery, Lease, Ledger, after_failure, is_settled, level_order,
                          merge_settled, runs)
from logq._retry import CircuitBreaker, backoff_delay


def model_settled(mark: int, intervals: list[tuple[int, int]]) -> set[int]:
    return set(range(mark)) | {o for a, b in intervals for o in range(a, b)}


def check_normal(mark: int, intervals: list[tuple[int, int]]) -> None:
    """Intervals sorted, disjoint, not touching each other or the watermark."""
    prev = mark
    for a, b in intervals:
        assert a < b
        assert a > prev, f"interval {(a, b)} touches or overlaps what is before it ({prev})"
        prev = b


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 50), st.lists(st.lists(st.integers(0, 120), max_size=30), max_size=8))
def test_merge_settled_matches_a_set_model(mark, batches):
    intervals: list[tuple[int, int]] = []
    model = set(range(mark))
    for batch in batches:
        mark, intervals = merge_settled(mark, intervals, runs(batch))
        model |= set(batch)
        check_normal(mark, intervals)
        assert model_settled(mark, intervals) == model
        # the watermark is exactly the first offset not settled
        assert mark not in model and all(o in model for o in range(mark))
        for o in range(130):
            assert is_settled(o, mark, intervals) == (o in model)


def test_runs_merge_and_sort():
    assert runs([5, 3, 4, 10, 10, 11]) == [(3, 6), (10, 12)]
    assert runs([]) == []


def test_claim_round_trips():
    c = Claim(10, 20, 0xDEADBEEF, 123456789, 3, 987)
    assert Claim.unpack(10, c.pack()) == c


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.floats(0.001, 10), st.floats(0.001, 1000), st.floats(0, 1, exclude_max=True))
def test_backoff_full_jitter_bounds(attempt, base, cap, r):
    d = backoff_delay(attempt, base, cap, lambda: r)
    assert 0 <= d <= min(cap, base * 2 ** (attempt - 1)) + 1e-9


def test_backoff_spreads_and_doubles():
    rng = random.Random(1)
    for attempt in (1, 2, 3, 4):
        xs = [backoff_delay(attempt, 0.1, 100, rng.random) for _ in range(2000)]
        ceiling = 0.1 * 2 ** (attempt - 1)
        assert max(xs) <= ceiling and max(xs) > 0.9 * ceiling   # reaches the ceiling
        assert min(xs) < 0.1 * ceiling                           # and near zero: full jitter
    with pytest.raises(ValueError):
        backoff_delay(0, 1, 1)


def test_after_failure_dead_letters_at_max_attempts():
    kw = dict(max_attempts=3, backoff_base=1.0, backoff_max=10.0, rand=lambda: 0.5)
    assert after_failure(1, **kw) == 0.5
    assert after_failure(2, **kw) == 1.0
    assert after_failure(3, **kw) is None           # third delivery failed: dead
    assert after_failure(2, delay=7.0, **kw) == 7.0  # an explicit delay wins
    assert after_failure(3, delay=7.0, **kw) is None


def test_level_order_higher_first_then_aged_first():
    now = 1_000_000
    assert level_order({0: now, 5: now, 3: now}, now, 100) == [5, 3, 0]
    # level 0's oldest waited 200 >= aging 100: it goes first
    assert level_order({0: now - 200, 5: now, 3: now}, now, 100) == [0, 5, 3]
    # two aged levels: oldest first
    assert level_order({1: now - 150, 2: now - 300, 9: now}, now, 100) == [2, 1, 9]


def d(offset: int, start: int = 0, attempt: int = 1) -> Delivery:
    return Delivery(offset, Lease(attempt, 10**12, start))


def test_ledger_ack_nack_rules():
    led = Ledger()
    led.add_range(0, 3, 3)
    a, b, c = d(0), d(1), d(2)
    led.deliver([a, b, c])
    led.ack(a)
    with pytest.raises(NotDeliveredError):
        led.ack(a)                       # twice
    with pytest.raises(NotDeliveredError):
        led.nack(d(1), None, None)       # a different object for the same offset
    with pytest.raises(NotDeliveredError):
        led.ack_many([b, b])             # the same message twice in one call
    assert 1 in led.out                  # ... and nothing was acked by it
    led.nack(b, 2.0, "e")
    s = led.take()
    assert [x.offset for x in s.acks] == [0] and s.nacks[0][1:] == (2.0, "e")
    assert led.settled(s) == []          # offset 2 still out: the range stays
    led.ack(c)
    assert led.settled(led.take()) == [0]


def test_a_lease_is_shared_until_changed_on_its_own():
    led = Ledger()
    shared = Lease(1, 100, 0)
    a, b = Delivery(0, shared), Delivery(1, shared)
    led.deliver([a, b])
    led.extend(a, 500)
    assert (a.deadline, a.single) == (500, True)
    assert (b.deadline, b.single) == (100, False)     # b keeps the batch's lease
    led.extend(b, 50)
    assert b.deadline == 100                          # never shortened


def test_ledger_restore_after_a_failed_commit():
    led = Ledger()
    led.add_range(0, 2, 2)
    a, b = d(0), d(1)
    led.deliver([a, b])
    led.ack_many([a, b])
    s = led.take()
    assert led.pending() == 0
    led.restore(s)
    assert led.pending() == 2
    assert led.settled(led.take()) == [0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 19), st.sampled_from(["ack", "nack", "give_back", "expire"])),
                max_size=60))
def test_ledger_never_settles_twice(ops):
    led = Ledger()
    led.add_range(0, 20, 20)
    ds = {o: d(o) for o in range(20)}
    led.deliver(ds.values())
    settled: set[int] = set()
    gone: set[int] = set()
    expired = False
    freed: list[int] = []
    for o, op in ops:
        if o in settled or o in gone:
            if op == "ack":
                with pytest.raises(NotDeliveredError):
                    led.ack(ds[o])
            elif op == "nack":
                with pytest.raises(NotDeliveredError):
                    led.nack(ds[o], None, None)
            continue
        if op == "ack":
            led.ack(ds[o])
            settled.add(o)
        elif op == "nack":
            led.nack(ds[o], None, None)
            settled.add(o)
        elif op == "give_back":
            start = led.forget(ds[o])       # rescheduled durably by the caller first
            freed += [] if start is None else [start]
            gone.add(o)
        else:
            led.expire(ds[o])               # its lease ran out while buffered
            expired = True
            gone.add(o)
    s = led.take()
    assert {x.offset for x in s.acks} | {n[0].offset for n in s.nacks} == settled
    freed += led.settled(s)
    # the range is freed once, when nothing of it is out, and never if an
    # expired delivery left it to be reaped (the reaper needs the claim)
    assert freed == ([0] if len(settled | gone) == 20 and not expired else [])


def test_circuit_breaker_opens_half_opens_and_closes():
    br = CircuitBreaker(threshold=0.5, window=10, min_calls=4, cooldown=5, probes=2)
    t = 0.0
    for ok in (True, False, False, True):
        assert br.allow(t)
        br.record(ok, t)
    assert br.state == "open" and br.opened == 1
    assert not br.allow(t + 4.9)
    assert br.allow(t + 5.0) and br.state == "half_open"
    assert br.allow(t + 5.0)
    assert not br.allow(t + 5.0)          # only `probes` calls at a time
    br.record(True, t + 5.1)
    br.record(False, t + 5.2)             # a failed probe: open again
    assert br.state == "open" and br.opened == 2
    assert br.allow(t + 10.3) and br.allow(t + 10.3)
    br.record(True, t + 10.4)
    br.record(True, t + 10.5)
    assert br.state == "closed"


def test_circuit_breaker_forgets_old_failures():
    br = CircuitBreaker(threshold=0.5, window=1, min_calls=4, cooldown=5)
    for i in range(3):
        br.record(False, i * 0.1)
    for i in range(10):
        br.record(True, 5 + i * 0.01)     # the failures left the window
    assert br.state == "closed"

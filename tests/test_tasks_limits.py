"""logq.tasks._limits: flow-control policies (pure).

Rates parse or say why not; the token bucket never lets more than
``burst + rate * T`` through any window of T seconds and its waits are
exact; ``pick_next`` is driven through random histories of submissions,
finishes and clock steps, and after every pick: no name over its
concurrency, no key running twice, each key started in queue order, each
name's starts within its bucket, at most ``capacity`` started, and every
waiting candidate waits for a reason of its own (no head-of-line blocking)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logq.tasks import _limits as L


# -- rates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text, count, per", [
    ("100/s", 100, 1), ("10/m", 10, 60), ("5/h", 5, 3600), ("2/d", 2, 86400), ("0.5/s", 0.5, 1),
    (" 3 / min ", 3, 60), ("7/SEC", 7, 1), ("1/hour", 1, 3600), ("4/day", 4, 86400), (".5/m", 0.5, 60),
])
def test_parse_rate(text, count, per):
    r = L.parse_rate(text)
    assert (r.count, r.per, r.text) == (count, per, text)
    assert r.per_second == count / per
    assert L.parse_rate(r) is r


@pytest.mark.parametrize("text", ["", "100", "100/", "/s", "100/x", "100/ms", "-1/s", "0/s", "1e3/s",
                                  "a/s", "10/s/s", "10 per second", "inf/s", "nan/s"])
def test_parse_rate_errors(text):
    with pytest.raises(ValueError, match="rate"):
        L.parse_rate(text)


def test_parse_rate_type():
    with pytest.raises(TypeError):
        L.parse_rate(100)


# -- the token bucket ------------------------------------------------------------------------
def test_bucket_basics():
    b = L.TokenBucket.for_rate("2/s", burst=3)
    assert [b.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(10.0) == pytest.approx(0.5)
    assert b.wait(10.25) == pytest.approx(0.25)
    assert b.state == (pytest.approx(0.0), 10.0)           # wait() changed nothing
    assert b.take(10.5) == 0.0
    # the state is two numbers: stored and rebuilt elsewhere, the bucket goes on
    c = L.TokenBucket.from_state(2.0, 3, b.state)
    assert c.take(10.5) == pytest.approx(0.5) and c.take(11.0) == 0.0
    # a clock set back does not refill; the wait counts from the last update
    d = L.TokenBucket(1.0, 1)
    assert d.take(100.0) == 0.0
    assert d.take(50.0) == pytest.approx(51.0)
    with pytest.raises(ValueError, match="never be taken"):
        d.take(200.0, n=2)
    for bad in ({"rate": 0}, {"rate": -1}, {"rate": math.inf}, {"rate": 1, "burst": 0.5},
                {"rate": 1, "burst": math.inf}):
        with pytest.raises(ValueError):
            L.TokenBucket(**bad)


steps = st.lists(st.tuples(st.floats(0, 2.0, allow_nan=False), st.integers(1, 4)), min_size=1, max_size=80)


@settings(max_examples=300, deadline=None)
@given(rate=st.floats(0.1, 100.0), burst=st.integers(1, 10), start=st.floats(-1e6, 1e9), steps=steps)
def test_bucket_never_exceeds_its_rate_in_any_window(rate, burst, start, steps):
    b = L.TokenBucket(rate, burst)
    now, taken = start, []
    for dt, tries in steps:
        now += dt
        for _ in range(tries):
            w = b.take(now)
            if w == 0.0:
                taken.append(now)
            else:
                assert w > 0
                # the wait is exact: a moment before, still nothing; at it, a token
                probe = L.TokenBucket.from_state(rate, burst, b.state)
                if w * 0.01 > 1000 * math.ulp(max(1.0, abs(now))):
                    assert probe.wait(now + w * 0.99) > 0
                assert L.TokenBucket.from_state(rate, burst, b.state).take(now + w) == 0.0
    for i in range(len(taken)):
        for j in range(i, len(taken)):
            window = taken[j] - taken[i]
            # float slack: EPSILON per take plus rounding of the times themselves
            slack = (j - i + 1) * L.EPSILON + rate * 1e-12 * max(1.0, abs(taken[j])) * 4
            assert j - i + 1 <= burst + rate * window + slack + 1e-9


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.1, 100.0), burst=st.integers(1, 10), idle=st.floats(0, 1000))
def test_bucket_lets_a_full_burst_through(rate, burst, idle):
    b = L.TokenBucket(rate, burst)
    b.take(0.0)
    now = idle + burst / rate                        # long enough to be full again
    assert all(b.take(now) == 0.0 for _ in range(burst))
    assert b.take(now) > 0


# -- concurrency and serialize_by, alone ------------------------------------------------------
def test_concurrency_allows():
    assert L.concurrency_allows(0, None) and L.concurrency_allows(10**9, None)
    assert L.concurrency_allows(3, 4) and not L.concurrency_allows(4, 4)


def test_serialize():
    assert L.serialize([], []) == []
    assert L.serialize({"a"}, ["a", "b", None, "b", "c", None, "a"]) == \
        [False, True, True, False, True, True, False]


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, 5)), st.lists(st.one_of(st.none(), st.integers(0, 5)), max_size=30))
def test_serialize_properties(running, keys):
    ok = L.serialize(running, keys)
    started = [k for k, o in zip(keys, ok) if o and k is not None]
    assert len(started) == len(set(started)) and not set(started) & running
    for i, (k, o) in enumerate(zip(keys, ok)):
        # a candidate is refused only by its own key: running, or an earlier one has it
        assert o == (k is None or (k not in running and k not in keys[:i]))


# -- pick_next ------------------------------------------------------------------------------------
def test_limits_validation():
    assert L.Limits(rate="10/s").rate == L.Rate(10, 1.0, "10/s")
    for bad in ({"concurrency": 0}, {"concurrency": 1.5}, {"rate": "fast"}, {"burst": 0}):
        with pytest.raises(ValueError):
            L.Limits(**bad)
    with pytest.raises(ValueError, match="capacity"):
        L.pick_next([], {}, L.LimitsState(), 0.0, capacity=-1)
    with pytest.raises(ValueError, match="counted_capacity"):
        L.pick_next([], {}, L.LimitsState(), 0.0, counted_capacity=-1)


def test_counted_capacity_spreads_counted_tasks():
    # One counted task per pick (a dispatcher spreads them over its workers);
    # the uncounted ones behind it are not held back.
    limits = {"c": L.Limits(concurrency=3)}
    cands = [L.Candidate(1, "c"), L.Candidate(2, "c"), L.Candidate(3, "u"),
             L.Candidate(4, "k", key="x"), L.Candidate(5, "u")]
    p = L.pick_next(cands, limits, L.LimitsState(), 0.0, counted_capacity=1)
    assert [c.id for c in p.start] == [1, 3, 5]
    assert {w.candidate.id: w.reason for w in p.wait} == {2: "capacity", 4: "capacity"}
    assert p.state.running == {"c": 1, "u": 2}


def test_no_head_of_line_blocking_example():
    cands = [L.Candidate(1, "slow"), L.Candidate(2, "slow"), L.Candidate(3, "fast"),
             L.Candidate(4, "slow", key="k"), L.Candidate(5, "fast", key="k"),
             L.Candidate(6, "fast", key="j"), L.Candidate(7, "rated"), L.Candidate(8, "rated")]
    limits = {"slow": L.Limits(concurrency=1), "rated": L.Limits(rate="1/s")}
    state = L.LimitsState(running={"slow": 1})
    p = L.pick_next(cands, limits, state, 100.0)
    assert [c.id for c in p.start] == [3, 6, 7]
    assert [(w.candidate.id, w.reason) for w in p.wait] == \
        [(1, "concurrency"), (2, "concurrency"), (4, "concurrency"), (5, "key"), (8, "rate")]
    assert p.wake_at == pytest.approx(101.0) and p.wait[-1].until == pytest.approx(101.0)
    assert state.running == {"slow": 1} and not state.running_keys      # not changed
    assert p.state.running == {"slow": 1, "fast": 2, "rated": 1} and p.state.running_keys == {"j"}
    after = L.finished(p.state, L.Candidate(6, "fast", key="j"))
    assert after.running["fast"] == 1 and after.running_keys == set()
    with pytest.raises(ValueError, match="not counted as running"):
        L.finished(state, L.Candidate(9, "fast"))


def test_priority_and_capacity():
    cands = [L.Candidate(1, "a", priority=0), L.Candidate(2, "b", priority=5),
             L.Candidate(3, "a", priority=5), L.Candidate(4, "c", key="k", priority=0),
             L.Candidate(5, "c", key="k", priority=9)]
    p = L.pick_next(cands, {}, L.LimitsState(), 0.0, capacity=2)
    # 5 outranks all but waits behind 4 (same key, earlier in the queue); then 2, 3 by priority
    assert [c.id for c in p.start] == [2, 3]
    assert {w.candidate.id: w.reason for w in p.wait} == {5: "key", 1: "capacity", 4: "capacity"}
    assert p.wake_at is None


NAMES = ["a", "b", "c"]
KEYS = [None, None, "k1", "k2", "k3"]


@st.composite
def histories(draw):
    limits = {}
    for n in NAMES:
        conc = draw(st.one_of(st.none(), st.integers(1, 3)))
        rate = draw(st.one_of(st.none(), st.sampled_from(["1/s", "5/s", "0.5/s", "30/m"])))
        limits[n] = L.Limits(conc, rate, draw(st.integers(1, 3)))
    events = draw(st.lists(st.tuples(
        st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(KEYS), st.integers(0, 2)), max_size=4),
        st.floats(0, 1.5), st.lists(st.integers(0, 10), max_size=3),
        st.one_of(st.none(), st.integers(0, 4)), st.one_of(st.none(), st.integers(0, 2))),
        min_size=1, max_size=40))
    return limits, events


@settings(max_examples=300, deadline=None)
@given(histories())
def test_pick_next_promises_over_random_histories(h):
    limits, events = h
    state = L.LimitsState()
    pending: list[L.Candidate] = []
    running: list[L.Candidate] = []
    submitted_by_key: dict[str, list[int]] = {}
    started_by_key: dict[str, list[int]] = {}
    starts: dict[str, list[float]] = {n: [] for n in NAMES}
    now, next_id = 1000.0, 0
    for new, dt, finish, capacity, counted_capacity in events:
        for name, key, prio in new:
            c = L.Candidate(next_id, name, key, prio)
            next_id += 1
            pending.append(c)
            if key is not None:
                submitted_by_key.setdefault(key, []).append(c.id)
        now += dt
        for i in sorted({f % len(running) for f in finish} if running else (), reverse=True):
            state = L.finished(state, running.pop(i))
        before = state.copy()
        p = L.pick_next(pending, limits, state, now, capacity=capacity,
                        counted_capacity=counted_capacity)
        assert state == before                                   # the input is not changed
        # every candidate is decided once
        assert sorted([c.id for c in p.start] + [w.candidate.id for w in p.wait]) == \
            sorted(c.id for c in pending)
        if capacity is not None:
            assert len(p.start) <= capacity
        n_counted = sum(L.counted(c, limits) for c in p.start)
        if counted_capacity is not None:
            assert n_counted <= counted_capacity
        # each wait has a reason of its own
        for w in p.wait:
            c, lim = w.candidate, limits[w.candidate.name]
            assert w.reason in L.REASONS
            if w.reason == L.KEY:
                earlier = pending[:pending.index(c)]
                assert c.key in state.running_keys or any(e.key == c.key for e in earlier)
            elif w.reason == L.CONCURRENCY:
                assert lim.concurrency is not None and p.state.running.get(c.name, 0) >= lim.concurrency
            elif w.reason == L.CAPACITY:
                assert (capacity is not None and len(p.start) == capacity) or \
                    (counted_capacity is not None and L.counted(c, limits) and n_counted == counted_capacity)
            else:
                bucket = L.TokenBucket.from_state(lim.rate.per_second, lim.burst, p.state.buckets[c.name])
                assert bucket.wait(now) > 0 and w.until == pytest.approx(now + bucket.wait(now))
                assert p.wake_at is not None and p.wake_at <= w.until
        started_ids = {c.id for c in p.start}
        pending = [c for c in pending if c.id not in started_ids]
        running += p.start
        state = p.state
        for c in p.start:
            starts[c.name].append(now)
            if c.key is not None:
                started_by_key.setdefault(c.key, []).append(c.id)
        # the limits hold while these run
        for n in NAMES:
            count = sum(1 for c in running if c.name == n)
            assert state.running.get(n, 0) == count
            if limits[n].concurrency is not None:
                assert count <= limits[n].concurrency
        keys = [c.key for c in running if c.key is not None]
        assert len(keys) == len(set(keys)) and set(keys) == state.running_keys
    for key, ids in started_by_key.items():
        assert ids == submitted_by_key[key][:len(ids)]           # queue order within a key
    for n, times in starts.items():
        lim = limits[n]
        if lim.rate is None:
            continue
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert j - i + 1 <= lim.burst + lim.rate.per_second * (times[j] - times[i]) + 1e-6

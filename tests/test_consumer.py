"""Consumer-group features in one process, on real queues: groups and
fan-out, acks in any order and commits, bad acks, nack with a delay or with
backoff, dead letters (list, replay, purge), lease expiry and extend,
delayed messages, priorities with aging, idempotent producers across a
restart, stats, and bad input that must leave the queue intact.  The
crash and multi-process cases are in test_consumer_crash.py."""

from __future__ import annotations

import random
import threading
import time

import pytest

import helpers
import logq


def fill(q: logq.Queue, n: int, tag: str = "m") -> list[bytes]:
    data = [helpers.payload(tag, i) for i in range(n)]
    q.put_many(data)
    return data


def drain(c: logq.Consumer, *, ack: bool = True, timeout: float = 0.2) -> list[logq.Message]:
    got = []
    while True:
        ms = c.get_many(500, timeout=timeout)
        if not ms:
            return got
        if ack:
            c.ack_many(ms)
        got += ms


# -- groups -----------------------------------------------------------------
def test_groups_fan_out_and_keep_their_position_across_reopen(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        data = fill(q, 300)
        a, b = q.consumer("a"), q.consumer("b")
        got_a = drain(a)
        got_b = [m.data for m in b.get_many(100)]
        b.ack_many([])                                   # an empty ack_many is fine
        assert [m.data for m in got_a] == data
        assert got_b == data[:100]
        b.commit()
    with logq.open(qdir) as q:
        # a committed everything; b had 100 out and not acked: delivered again
        assert q.consumer("a").get_many(10, timeout=0.1) == []
        again = drain(q.consumer("b"))
        assert [m.data for m in again] == data
        assert [m.attempt for m in again[:100]] == [2] * 100
        assert all(m.attempt == 1 for m in again[100:])


def test_start_latest_skips_what_is_there(tmp_path):
    with logq.open(tmp_path / "q") as q:
        fill(q, 50)
        c = q.consumer("late", start="latest")
        assert c.get_many(10, timeout=0.05) == []
        off = q.put(b"new")
        assert [m.offset for m in c.get_many(10)] == [off]


def test_out_of_order_acks_settle_exactly_what_was_acked(tmp_path):
    qdir = str(tmp_path / "q")
    rng = random.Random(helpers.SEED)
    with logq.open(qdir) as q:
        fill(q, 1000)
        c = q.consumer("g", commit_every=10**6, commit_interval=1000)
        ms = drain(c, ack=False)
        assert len(ms) == 1000
        rng.shuffle(ms)
        acked = {m.offset for m in ms[:700]}
        for m in ms[:700]:
            c.ack(m)
        c.commit()
        st = q.stats()["groups"]["g"]
        assert st["acked"] == 700 and st["backlog"] == 300
        assert st["watermark"] == min(set(range(1000)) - acked)
        # close gives back the 300 still out, as failed deliveries
    with logq.open(qdir) as q:
        c = q.consumer("g")
        rest = drain(c)
        c.commit()
        assert sorted(m.offset for m in rest) == sorted(set(range(1000)) - acked)
        assert q.stats()["groups"]["g"]["backlog"] == 0


def test_bad_acks_raise_and_change_nothing(tmp_path):
    with logq.open(tmp_path / "q") as q:
        fill(q, 5)
        c, other = q.consumer("g"), q.consumer("h")
        m = c.get()
        with pytest.raises(logq.NotDeliveredError):
            c.ack(None)
        with pytest.raises(logq.NotDeliveredError):
            c.ack(b"bytes")
        with pytest.raises(logq.NotDeliveredError):
            other.ack(m)                  # delivered to group g, not h
        with pytest.raises(logq.NotDeliveredError):
            c.ack_many([m, None])
        c.ack(m)
        with pytest.raises(logq.NotDeliveredError):
            c.ack(m)                      # twice
        with pytest.raises(logq.NotDeliveredError):
            c.nack(m)
        c.commit()
        assert q.stats()["groups"]["g"]["acked"] == 1
        with pytest.raises(ValueError):
            c.get_many(0)
        with pytest.raises(ValueError):
            c.nack(c.get(), delay=-1)


def test_a_consumer_is_an_iterator_and_get_times_out(tmp_path):
    with logq.open(tmp_path / "q") as q:
        fill(q, 3)
        c = q.consumer("g")
        it = iter(c)
        assert [next(it).offset for _ in range(3)] == [0, 1, 2]
        t = time.monotonic()
        with pytest.raises(logq.Empty):
            c.get(timeout=0.2)
        assert time.monotonic() - t >= 0.19


def test_blocked_get_wakes_on_put_from_another_thread(tmp_path):
    with logq.open(tmp_path / "q") as q:
        c = q.consumer("g")
        got = []
        t = threading.Thread(target=lambda: got.append(c.get(timeout=10)))
        t.start()
        time.sleep(0.2)
        q.put(b"wake")
        t.join(10)
        assert got and got[0].data == b"wake"


def test_an_idle_consumer_does_not_poll(tmp_path):
    import resource
    with logq.open(tmp_path / "q") as q:
        c = q.consumer("g")
        before = resource.getrusage(resource.RUSAGE_SELF)
        t = time.thread_time()
        assert c.get_many(1, timeout=2.0) == []
        spent = time.thread_time() - t
        after = resource.getrusage(resource.RUSAGE_SELF)
        process = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        # A busy poll would burn about 2 s; a sleeping consumer (and the
        # queue's housekeeping threads) a few milliseconds.
        assert spent < 0.2, spent
        assert process < 0.4, process


# -- retries and dead letters ----------------------------------------------------
def test_nack_with_delay_redelivers_after_exactly_that(tmp_path):
    with logq.open(tmp_path / "q") as q:
        q.put(b"x")
        c = q.consumer("g")
        m = c.get()
        t = time.time()
        c.nack(m, delay=0.4)
        c.commit()
        m2 = c.get(timeout=5)
        waited = time.time() - t
        assert m2.offset == m.offset and m2.attempt == 2 and m2.data == b"x"
        assert waited >= 0.39


def test_nack_backs_off_within_full_jitter_bounds(tmp_path):
    base = 0.15
    with logq.open(tmp_path / "q") as q:
        q.put(b"x")
        c = q.consumer("g", backoff_base=base, backoff_max=10, max_attempts=10)
        m = c.get()
        for attempt in range(1, 5):
            assert m.attempt == attempt
            t = time.time()
            c.nack(m)
            c.commit()
            m = c.get(timeout=10)
            waited = time.time() - t
            # uniform in [0, base * 2**(attempt-1)], plus slack for a loaded
            # machine (far below backoff_max, which a wrong bound would use)
            assert waited <= base * 2 ** (attempt - 1) + 1.5, (attempt, waited)


def test_dead_letters_after_max_attempts_then_replay_and_purge(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put(b"ok")
        bad = q.put(b"poison", priority=0)
        c = q.consumer("g", max_attempts=3, backoff_base=0.01, backoff_max=0.02)
        seen = []
        while True:
            ms = c.get_many(10, timeout=0.5)
            if not ms:
                break
            for m in ms:
                seen.append((m.offset, m.attempt))
                if m.data == b"poison":
                    c.nack(m, error=f"failed on attempt {m.attempt}")
                else:
                    c.ack(m)
            c.commit()
        assert [a for o, a in seen if o == bad] == [1, 2, 3]
        dead = c.dead_letters()
        assert [(d.offset, d.data, d.attempts, d.error) for d in dead] == \
            [(bad, b"poison", 3, "failed on attempt 3")]
        st = q.stats()["groups"]["g"]
        assert st["dead_lettered"] == 1 and st["dead_letters"] == 1 and st["backlog"] == 0
    with logq.open(qdir) as q:      # dead letters are durable
        c = q.consumer("g", max_attempts=3)
        assert [d.offset for d in c.dead_letters()] == [bad]
        (new,) = c.replay()
        assert c.dead_letters() == []
        m = c.get(timeout=2)
        assert (m.offset, m.data, m.attempt) == (new, b"poison", 1)
        c.nack(m, delay=0)
        c.commit()
        for _ in range(2):
            m = c.get(timeout=2)
            c.nack(m, error="again")
            c.commit()
        assert [d.offset for d in c.dead_letters()] == [new]
        assert c.purge() == 1 and c.dead_letters() == []


def test_lease_expiry_redelivers_and_extend_prevents_it(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q1, logq.open(qdir) as q2:
        q1.put(b"a")
        q1.put(b"b")
        c1 = q1.consumer("g", visibility_timeout=0.5, backoff_base=0.01, backoff_max=0.01, prefetch=1)
        c2 = q2.consumer("g", visibility_timeout=30, backoff_base=0.01, backoff_max=0.01, prefetch=1)
        ma = c1.get()
        mb = c1.get()
        c1.extend(mb, 5)
        assert c2.get_many(10, timeout=0.2) == []      # both leased
        m = c2.get(timeout=3)                            # a's lease runs out
        assert (m.offset, m.attempt) == (ma.offset, 2)
        assert c2.get_many(10, timeout=1.0) == []        # b's was extended
        c2.ack(m)
        c1.ack(mb)
        c1.ack(ma)          # late, but accepted: a is settled either way
        c1.commit()
        c2.commit()
        assert q1.stats()["groups"]["g"]["backlog"] == 0


def test_give_back_redelivers_at_once_without_counting_an_attempt(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q1, logq.open(qdir) as q2:
        fill(q1, 3)
        c1, c2 = q1.consumer("g"), q2.consumer("g")
        ms = c1.get_many(3)
        c1.give_back(ms[1:])
        with pytest.raises(logq.NotDeliveredError):
            c1.give_back(ms[1:])                 # not out any more
        again = c2.get_many(10, timeout=1)
        assert [(m.offset, m.attempt) for m in again] == [(1, 1), (2, 1)]
        c1.ack(ms[0])
        c2.ack_many(again)
        c1.commit()
        c2.commit()
        assert q1.stats()["groups"]["g"]["backlog"] == 0


# -- delays and priorities --------------------------------------------------------
def test_delayed_messages_come_in_due_order_never_early(tmp_path):
    with logq.open(tmp_path / "q") as q:
        now = time.time()
        q.put(b"later", delay=0.6)
        q.put(b"sooner", deliver_at=now + 0.3)
        q.put(b"now")
        q.put(b"past", deliver_at=now - 10)
        c = q.consumer("g")
        first = c.get_many(10)
        assert [m.data for m in first] == [b"now", b"past"]
        c.ack_many(first)
        order = []
        for _ in range(2):
            m = c.get(timeout=5)
            order.append((m.data, time.time() - now))
            c.ack(m)
        assert [d for d, _ in order] == [b"sooner", b"later"]
        assert order[0][1] >= 0.29 and order[1][1] >= 0.59


def test_delayed_and_prioritised_records_among_batches_are_not_taken_as_plain(tmp_path):
    # Records of a put_many batch carry the CONT flag: a scan that judged
    # "plain" by the largest attrs word took delayed records for plain ones.
    with logq.open(tmp_path / "q") as q:
        q.put(b"later", delay=3600)
        q.put_many([b"a", b"b", b"c"])
        q.put(b"later2", delay=3600)
        q.put_many([b"d", b"e"])
        c = q.consumer("g")
        assert [m.data for m in c.get_many(100)] == [b"a", b"b", b"c", b"d", b"e"]
    with logq.open(tmp_path / "p") as q:
        q.put_many([b"a", b"b"])
        q.put(b"top", priority=9)
        q.put_many([b"c", b"d"])
        c = q.consumer("g")
        assert [m.data for m in c.get_many(100)] == [b"top", b"a", b"b", b"c", b"d"]


def test_many_delayed_messages_wait_in_the_schedule_not_in_the_scan(tmp_path):
    with logq.open(tmp_path / "q") as q:
        far = time.time() + 3600
        for i in range(3000):
            q.put(b"d%d" % i, deliver_at=far)
        c = q.consumer("g")
        assert c.get_many(10, timeout=0.1) == []
        st = q.stats()["groups"]["g"]
        assert st["scheduled"] == 3000 and st["backlog"] == 3000
        off = q.put(b"plain")
        assert [m.offset for m in c.get_many(10)] == [off]


def test_priorities_higher_first(tmp_path):
    with logq.open(tmp_path / "q") as q:
        for i in range(5):
            q.put(b"low%d" % i)
        q.put(b"high", priority=9)
        q.put(b"mid", priority=4)
        q.put(b"high2", priority=9)
        c = q.consumer("g")
        got = [m.data for m in c.get_many(100)]
        assert got == [b"high", b"high2", b"mid"] + [b"low%d" % i for i in range(5)]
        assert [m.priority for m in c.get_many(1, timeout=0)] == []


def test_priority_aging_keeps_low_priority_from_starving(tmp_path):
    with logq.open(tmp_path / "q") as q:
        q.put(b"old-low")
        time.sleep(0.35)
        for i in range(5):
            q.put(b"high%d" % i, priority=9)
        c = q.consumer("g", priority_aging=0.3)
        assert c.get().data == b"old-low"         # waited past priority_aging
        c2 = q.consumer("h", priority_aging=60)
        assert c2.get().data == b"high0"


# -- idempotent producers ---------------------------------------------------------
def test_dedup_keys_survive_a_restart_and_expire(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        a = q.put(b"first", key="order-1")
        assert q.put(b"second", key="order-1") == a
        assert q.put(b"third", key=b"order-2") == a + 1
        assert len(q) == 2
    with logq.open(qdir) as q:
        assert q.put(b"again", key="order-1") == a
        assert len(q) == 2
        m = q.consumer("g").get()
        assert (m.key, m.data) == (b"order-1", b"first")
    with logq.open(qdir, dedup_window=0.2) as q:
        time.sleep(0.25)
        assert q.put(b"after the window", key="order-1") == 2


# -- stats and bad input ----------------------------------------------------------
def test_stats_are_durable_counters(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        fill(q, 20)
        c = q.consumer("g", backoff_base=0.01, backoff_max=0.01)
        ms = c.get_many(20)
        c.ack_many(ms[:15])
        for m in ms[15:]:
            c.nack(m)
        c.commit()
        again = drain(c, timeout=0.5)
        assert len(again) == 5
    with logq.open(qdir) as q:
        st = q.stats()["groups"]["g"]
        assert st["delivered"] == 25 and st["acked"] == 20 and st["redelivered"] == 5
        assert st["backlog"] == 0 and st["in_flight"] == 0 and st["watermark"] == 20


def test_bad_put_and_group_arguments_leave_the_queue_intact(tmp_path):
    with logq.open(tmp_path / "q") as q:
        q.put(b"keep")
        for kw, exc in [({"priority": 10}, ValueError), ({"priority": -1}, ValueError),
                        ({"priority": "9"}, TypeError), ({"priority": True}, TypeError),
                        ({"delay": -1}, ValueError), ({"delay": float("nan")}, ValueError),
                        ({"delay": "1"}, TypeError), ({"delay": 1, "deliver_at": 5}, ValueError),
                        ({"key": b""}, ValueError), ({"key": b"k" * 300}, ValueError),
                        ({"key": 7}, TypeError)]:
            with pytest.raises(exc):
                q.put(b"x", **kw)
        for name, exc in [("", ValueError), ("a\0b", ValueError), (5, TypeError), ("x" * 300, ValueError)]:
            with pytest.raises(exc):
                q.consumer(name)
        for kw in [{"visibility_timeout": 0}, {"max_attempts": 0}, {"start": "middle"},
                   {"commit_every": 0}, {"bogus": 1}]:
            with pytest.raises((ValueError, TypeError)):
                q.consumer("g", **kw)
        assert len(q) == 1 and q.read(0) == b"keep"
        assert [m.data for m in q.consumer("g").get_many(10)] == [b"keep"]


def test_settled_state_stays_merged_when_dead_letters_come_out_of_order(tmp_path):
    # Dead letters are settled in the order their failures were committed,
    # not in offset order; the settled intervals must still merge, so that
    # the watermark reaches the end (and retention can delete segments).
    with logq.open(tmp_path / "q") as q:
        fill(q, 40)
        c = q.consumer("g", max_attempts=1, commit_every=10**6, commit_interval=1000)
        ms = c.get_many(40)
        rng = random.Random(helpers.SEED)
        rng.shuffle(ms)
        for m in ms:
            if m.offset % 2:
                c.nack(m, error="odd")
            else:
                c.ack(m)
        c.commit()
        st = q.stats()["groups"]["g"]
        assert st["watermark"] == 40 and st["backlog"] == 0 and st["dead_letters"] == 20
        assert q._index.read(lambda t: sum(1 for _ in t.cursor(db=q._index.acks))) == 0


def test_a_group_open_twice_on_one_queue_object_needs_the_same_options(tmp_path):
    """Consumers of one group on one Queue object share its state: a second
    one asking for other options is refused, not silently given the first's."""
    with logq.open(str(tmp_path / "q")) as q:
        a = q.consumer("g", visibility_timeout=5)
        b = q.consumer("g", visibility_timeout=5)
        with pytest.raises(ValueError, match="other options"):
            q.consumer("g", visibility_timeout=50)
        b.close()
        a.close()
        q.consumer("g", visibility_timeout=50).close()    # once closed, new options are fine


@pytest.mark.parametrize("seed", range(6))
def test_get_many_views_settle_like_messages(tmp_path, seed):
    """get_many's messages are views of one batch (acked as its runs when
    ack_many gets exactly them all); every other settlement of one makes
    it a delivery of its own first.  Random mixes of acks (one, a subset,
    the whole list, a copy of it, twice), nacks, give-backs and extends
    over several get_many batches at once: a settled message never comes
    again, every other one does, a second settlement raises
    NotDeliveredError and changes nothing."""
    rng = random.Random(seed)
    n = 400
    q = logq.open(str(tmp_path / "q"))
    try:
        q.put_many([b"m%d" % i for i in range(n)])
        c = q.consumer("g", visibility_timeout=60, max_attempts=100, backoff_base=0.001, backoff_max=0.001)
        acked: set[int] = set()
        batches = []
        while True:
            ms = c.get_many(rng.randrange(1, 60))
            if not ms:
                break
            batches.append(ms)
        assert sorted(m.offset for ms in batches for m in ms) == list(range(n))
        for ms in batches:
            assert all(m.data == b"m%d" % m.offset for m in ms)
            how = rng.randrange(7)
            if how == 0:
                c.ack_many(ms)                      # the whole list: the batch's runs
                acked.update(m.offset for m in ms)
            elif how == 1:
                c.ack_many(list(ms))                # a copy, same messages
                acked.update(m.offset for m in ms)
            elif how == 2:
                some = rng.sample(ms, rng.randrange(0, len(ms) + 1))
                c.ack_many(some)
                acked.update(m.offset for m in some)
                rest = [m for m in ms if m not in some]
                if rest:
                    c.give_back(rest)
            elif how == 3:
                for m in ms:
                    if rng.random() < 0.5:
                        c.ack(m)
                        acked.add(m.offset)
                    else:
                        c.nack(m, delay=0)
            elif how == 4:
                m = rng.choice(ms)
                c.extend(m, 30)
                c.ack(m)
                acked.add(m.offset)
                c.ack_many([x for x in ms if x is not m])
                acked.update(x.offset for x in ms)
            elif how == 5:
                c.give_back(ms)
            else:
                c.ack_many(ms)
                acked.update(m.offset for m in ms)
                with pytest.raises(logq.NotDeliveredError):
                    c.ack_many(ms)                  # twice: nothing changes
                with pytest.raises(logq.NotDeliveredError):
                    c.ack(rng.choice(ms))
        c.commit()
        again = [m.offset for m in drain(c, timeout=0.5)]
        c.commit()
        assert sorted(again) == sorted(set(range(n)) - acked), "settled came again, or unsettled did not"
        c.close()
    finally:
        q.close()

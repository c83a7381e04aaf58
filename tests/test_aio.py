"""logq.aio on real event loops (asyncio.run), real files and LMDB, real
producer processes: wake-ups across processes, cancellation that leaves no
lease, Message.process(), order, many idle waiters, tasks' adelay and
aresult.  Both codecs (CI runs the suite with LOGQ_PURE=1 too)."""

from __future__ import annotations

import asyncio
import threading
import time

import psutil
import pytest

import helpers
import logq
import logq.aio
from logq import Empty, NotDeliveredError, QueueClosedError

# A producer in another process: waits for the go file, then puts its
# arguments' count of messages b"<tag>-<i>" one by one.
PRODUCER = r"""
import os, sys, time, logq
qdir, go, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
q = logq.open(qdir)
while not os.path.exists(go):
    time.sleep(0.005)
for i in range(n):
    q.put(f"{tag}-{i}".encode())
q.close()
print("put", n, flush=True)
"""


def run(coro, timeout: float = 60):
    """asyncio.run with a watchdog: a hang fails the test."""
    async def guarded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(guarded())


def sync_stats(qdir: str, group: str) -> dict:
    with logq.open(qdir) as q:
        return q.stats()["groups"][group]


def test_put_get_ack_in_order_and_durable(tmp_path) -> None:
    qdir = str(tmp_path / "q")

    async def main():
        async with logq.aio.open(qdir) as q:
            offs = [await q.put(b"m-%d" % i) for i in range(50)]
            assert offs == list(range(50))
            r = await q.put_many([b"m-%d" % i for i in range(50, 300)])
            assert r == range(50, 300)
            assert await q.put(b"m-300", priority=0, key="k1") == 300
            assert await q.put(b"again", key="k1") == 300      # deduplicated, on the executor
            await q.flush()
            assert q.next_offset == 301 and await q.read(7) == b"m-7"
            got = []
            async with q.consumer("g") as c:
                async for m in c:
                    got.append((m.offset, m.data, m.attempt))
                    await c.ack(m)
                    if len(got) == 301:
                        break
                await c.commit()
                with pytest.raises(Empty):
                    await c.get(timeout=0.05)
                assert await c.get_many(10, timeout=0.05) == []
            return got
    got = run(main())
    assert [o for o, _d, _a in got] == list(range(301))
    assert all(d == b"m-%d" % o and a == 1 for o, d, a in got)
    st = sync_stats(qdir, "g")
    assert st["acked"] == 301 and st["backlog"] == 0 and st["in_flight"] == 0


def test_a_waiting_get_wakes_on_a_put_from_another_process(tmp_path, monkeypatch) -> None:
    """The get sleeps (the loop stays free: a ticker runs meanwhile), and
    wakes once the child puts: the look-around is pushed past the get's
    timeout, so only the wake-up can deliver in time."""
    monkeypatch.setattr(logq.aio._consumer, "_IDLE_LOOK", 120.0)
    qdir = str(tmp_path / "q")
    go = str(tmp_path / "go")

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g") as c:
                ticks = 0
                stop = asyncio.Event()

                async def ticker():
                    nonlocal ticks
                    while not stop.is_set():
                        await asyncio.sleep(0.005)
                        ticks += 1
                t = asyncio.create_task(ticker())
                with helpers.children() as kids:
                    kids.append(helpers.Child(PRODUCER, str(tmp_path / "p.log"), qdir, go, "x", 3))
                    getter = asyncio.create_task(c.get(timeout=30))
                    await asyncio.sleep(0.3)
                    assert not getter.done()
                    open(go, "w").close()
                    began = time.monotonic()
                    m = await getter
                    woke = time.monotonic() - began
                    assert m.data == b"x-0"
                    await c.ack(m)
                    rest = [await c.get(timeout=30) for _ in range(2)]
                    assert [r.data for r in rest] == [b"x-1", b"x-2"]
                    await c.ack_many(rest)
                    assert kids[0].wait(30) == 0
                stop.set()
                await t
                return ticks, woke
    ticks, woke = run(main())
    assert ticks >= 20, "the event loop was blocked while the get waited"
    assert woke < 30


def test_a_put_between_the_look_and_the_sleep_is_not_missed(tmp_path, monkeypatch) -> None:
    """The race a wake-up design must not lose: a put (here by another
    Queue object, as another process would) lands after the pump found
    nothing and before it sleeps.  The sleep is on the tail read before
    the look, so it ends at once (the look-around is pushed out of reach)."""
    from logq.aio import _consumer as AC
    monkeypatch.setattr(AC, "_IDLE_LOOK", 120.0)
    # Pokes off (the producer's hand-back of the append lock pokes the
    # word, and a poke would also end the sleep): only the tail counts.
    monkeypatch.setattr(logq.aio.C, "native_enabled", lambda: False)
    qdir = str(tmp_path / "q")
    other = logq.open(qdir)
    serve = AC._Gate._serve
    raced = []

    def serve_then_put(self):
        left = serve(self)
        if left and not raced:
            raced.append(other.put(b"between"))
        return left
    monkeypatch.setattr(AC._Gate, "_serve", serve_then_put)

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g") as c:
                m = await c.get(timeout=30)
                assert (m.offset, m.data) == (0, b"between") and raced == [0]
                await c.ack(m)
    try:
        run(main())
    finally:
        other.close()


def test_cancelled_get_leaves_no_lease(tmp_path) -> None:
    """A get cancelled while waiting takes nothing; one cancelled after the
    pump handed it a message (before it resumed) gives that message back:
    no claim is left, and it is delivered again at once, its attempt not
    counted."""
    qdir = str(tmp_path / "q")
    go = str(tmp_path / "go")

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g", prefetch=1) as c:
                # 1. cancelled while nothing came
                getter = asyncio.create_task(c.get())
                await asyncio.sleep(0.05)
                getter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await getter
                assert not c._gate.waiters
                # 2. cancelled between the hand-over and its resumption: the
                # first time this coroutine sees the waiter done, the getter
                # has not run yet (asyncio runs ready callbacks in order).
                getter = asyncio.create_task(c.get())
                await asyncio.sleep(0.05)
                (fut,) = c._gate.waiters
                with helpers.children() as kids:
                    kids.append(helpers.Child(PRODUCER, str(tmp_path / "p.log"), qdir, go, "c", 1))
                    open(go, "w").close()
                    while not fut.done():
                        await asyncio.sleep(0)
                    assert fut.result() and not getter.done()
                    getter.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await getter
                    assert kids[0].wait(30) == 0
                await c.commit()        # after the give-back, on the same executor
                st = (await q.stats())["groups"]["g"]
                assert st["in_flight"] == 0
                # Given back, not failed: delivered again, first attempt.
                m = await c.get(timeout=5)
                assert (m.offset, m.data, m.attempt) == (0, b"c-0", 1)
                await c.ack(m)
    run(main())
    st = sync_stats(qdir, "g")
    assert st["acked"] == 1 and st["in_flight"] == 0 and st["redelivered"] == 0


def test_cancelled_waiters_leave_nothing_for_other_processes(tmp_path) -> None:
    """Many gets cancelled at once while the aio consumer stays open: a
    consumer in another process then gets every message put after."""
    qdir = str(tmp_path / "q")

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g", prefetch=1) as c:
                getters = [asyncio.create_task(c.get()) for _ in range(20)]
                await asyncio.sleep(0.05)
                for g in getters:
                    g.cancel()
                await asyncio.gather(*getters, return_exceptions=True)
                assert not c._gate.waiters
                await q.put_many([b"n-%d" % i for i in range(20)])
                code = ("import sys, logq\nq = logq.open(sys.argv[1]); c = q.consumer('g')\n"
                        "ms = [c.get(timeout=10) for _ in range(20)]\nc.ack_many(ms); c.close(); q.close()\n"
                        "print(sorted(m.offset for m in ms))")
                rc, out = await asyncio.to_thread(helpers.run_child, code, str(tmp_path / "k.log"), qdir)
                assert rc == 0, out
                assert out.strip() == str(list(range(20)))
    run(main())


AIO_HOLDER = r"""
import asyncio, sys, logq.aio
async def main():
    async with logq.aio.open(sys.argv[1]) as q:
        async with q.consumer("g", prefetch=1) as c:
            ms = [await c.get(timeout=30) for _ in range(5)]
            print("holding", *[m.offset for m in ms], flush=True)
            await asyncio.sleep(3600)
asyncio.run(main())
"""


def test_sigkilled_aio_consumer_messages_reach_an_awaiting_one(tmp_path) -> None:
    """A consumer process on logq.aio is SIGKILLed holding 5 messages: this
    process's awaiting gets receive them (the dead owner's leases are
    reaped at the pump's look-around), each as a second attempt."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put_many([b"k-%d" % i for i in range(5)])

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g") as c:
                with helpers.children() as kids:
                    kids.append(helpers.Child(AIO_HOLDER, str(tmp_path / "h.log"), qdir))
                    await asyncio.to_thread(helpers.wait_for, lambda: "holding" in kids[0].output(),
                                            30, "the child to hold 5 messages")
                    assert kids[0].output().split()[1:6] == ["0", "1", "2", "3", "4"]
                    getters = [asyncio.create_task(c.get(timeout=30)) for _ in range(5)]
                    await asyncio.sleep(0.2)
                    assert not any(g.done() for g in getters)       # leased to the child
                    kids[0].kill()
                    ms = await asyncio.gather(*getters)
                assert sorted((m.offset, m.attempt) for m in ms) == [(i, 2) for i in range(5)]
                await c.ack_many(ms)
    run(main())
    st = sync_stats(qdir, "g")
    assert st["acked"] == 5 and st["in_flight"] == 0


def test_process_acks_nacks_with_backoff_and_gives_back_on_cancel(tmp_path) -> None:
    qdir = str(tmp_path / "q")

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g", backoff_base=0.05, backoff_max=0.05, max_attempts=2) as c:
                await q.put_many([b"ok", b"bad", b"stop"])
                m = await c.get(timeout=5)
                async with m.process():
                    assert m.data == b"ok"
                with pytest.raises(NotDeliveredError):
                    await c.ack(m)              # settled by process()
                m = await c.get(timeout=5)
                assert m.data == b"bad"
                with pytest.raises(ValueError, match="boom"):   # re-raised, not swallowed
                    async with m.process():
                        raise ValueError("boom")
                # "stop": the block is cancelled: given back, attempt not counted.
                m = await c.get(timeout=5)
                assert m.data == b"stop"

                async def work(m):
                    async with m.process():
                        await asyncio.sleep(30)
                t = asyncio.create_task(work(m))
                await asyncio.sleep(0.02)
                t.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await t
                seen = {}
                while len(seen) < 2:
                    m = await c.get(timeout=5)
                    seen[m.data] = m.attempt
                    if m.data == b"bad":
                        with pytest.raises(ValueError):
                            async with m.process():
                                raise ValueError("boom again")
                    else:
                        async with m.process():
                            pass
                assert seen == {b"stop": 1, b"bad": 2}
                await c.commit()
                dead = await asyncio.to_thread(c.sync.dead_letters)
                assert [(d.data, d.attempts) for d in dead] == [(b"bad", 2)]
                assert "ValueError: boom again" in dead[0].error
                # settled inside the block: process() leaves it alone
                await q.put(b"manual")
                m = await c.get(timeout=5)
                async with m.process():
                    await c.nack(m, delay=0)
                m2 = await c.get(timeout=5)
                assert (m2.data, m2.attempt) == (b"manual", 2)
                await c.ack(m2)
    run(main())
    st = sync_stats(qdir, "g")
    assert st["acked"] == 3 and st["dead_letters"] == 1 and st["in_flight"] == 0


def test_nack_delay_extend_and_get_many(tmp_path) -> None:
    qdir = str(tmp_path / "q")

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g", visibility_timeout=5) as c:
                await q.put_many([b"a", b"b", b"c"])
                ms = await c.get_many(10, timeout=1)
                assert [m.data for m in ms] == [b"a", b"b", b"c"]
                await c.extend(ms[0], 60)
                began = time.monotonic()
                await c.nack(ms[1], delay=0.3)
                await c.ack_many([ms[0], ms[2]])
                m = await c.get(timeout=10)         # waits for the due time, not a put
                assert m.data == b"b" and m.attempt == 2
                assert time.monotonic() - began >= 0.25
                await c.ack(m)
                with pytest.raises(NotDeliveredError):
                    await c.ack(m)
                with pytest.raises(NotDeliveredError):
                    await c.ack(None)
                # a delayed put wakes a waiting get_many when due
                await q.put(b"later", delay=0.2)
                got = await c.get_many(5, timeout=10)
                assert [g.data for g in got] == [b"later"]
                await c.ack_many(got)
    run(main())


def test_close_fails_waiting_gets_and_later_calls(tmp_path) -> None:
    qdir = str(tmp_path / "q")

    async def main():
        q = await logq.aio.open(qdir)
        c = await q.consumer("g")
        getter = asyncio.create_task(c.get())
        await asyncio.sleep(0.05)
        await c.close()
        with pytest.raises(QueueClosedError):
            await getter
        with pytest.raises(QueueClosedError):
            await c.get(timeout=0)
        c2 = await q.consumer("g")
        getter = asyncio.create_task(c2.get_many(3, timeout=None))
        await asyncio.sleep(0.05)
        await q.close()
        with pytest.raises(QueueClosedError):
            await getter
        with pytest.raises(QueueClosedError):
            await q.put(b"x")
        await q.close()         # a second time: nothing
    run(main())
    with logq.open(qdir) as q:
        assert q.next_offset == 0


def test_the_pump_drops_waiters_that_ended_before_it_ran(tmp_path) -> None:
    """A waiter that timed out or was cancelled is still in line until its
    done-callback runs: the pump must drop it, not loop on it (it once
    spun there without yielding, so the callback never ran)."""
    qdir = str(tmp_path / "q")

    async def main():
        async with logq.aio.open(qdir) as q:
            async with q.consumer("g") as c:
                getter = asyncio.create_task(c.get(timeout=5))
                await asyncio.sleep(0.05)
                (fut,) = c._gate.waiters
                fut.cancel()            # done; its callbacks are only scheduled
                assert fut in c._gate.waiters
                assert c._gate._serve() is False and not c._gate.waiters
                with pytest.raises(asyncio.CancelledError):
                    await getter
    run(main())


def test_many_idle_waiters_cost_nothing_then_each_gets_one(tmp_path) -> None:
    """1 000 consumers of one group, each awaiting a get: a few seconds of
    CPU time near zero (one watcher thread, one pump), then 1 000 messages
    from another process reach 1 000 distinct waiters."""
    qdir = str(tmp_path / "q")
    go = str(tmp_path / "go")
    n = 1000

    async def main():
        async with logq.aio.open(qdir) as q:
            cs = [await q.consumer("g", prefetch=1) for _ in range(n)]
            getters = [asyncio.create_task(c.get(timeout=60)) for c in cs]
            await asyncio.sleep(0.5)        # all waiting
            me = psutil.Process()
            threads = threading.active_count()
            t0, c0 = time.monotonic(), sum(me.cpu_times()[:2])
            await asyncio.sleep(2.0)
            cpu = sum(me.cpu_times()[:2]) - c0
            wall = time.monotonic() - t0
            assert threading.active_count() <= threads
            # one executor thread and one watcher thread for all 1 000 waiters
            ours = [t.name for t in threading.enumerate() if t.name.startswith("logq-aio")]
            assert len(ours) <= 2, ours
            with helpers.children() as kids:
                kids.append(helpers.Child(PRODUCER, str(tmp_path / "p.log"), qdir, go, "w", n))
                open(go, "w").close()
                ms = await asyncio.gather(*getters)
                assert kids[0].wait(60) == 0
            assert sorted(m.offset for m in ms) == list(range(n))
            for c, m in zip(cs, ms):
                await c.ack(m)
            await cs[0].commit()
            for c in cs:
                await c.close()
            return cpu, wall
    cpu, wall = run(main(), timeout=120)
    # Generous (a loaded CI box; the pure codec's watcher polls every 5 ms):
    # a waiter that polled would burn far more.
    assert cpu < 0.25 * wall, f"{cpu:.3f} s of CPU in {wall:.2f} s with {n} idle waiters"
    st = sync_stats(qdir, "g")
    assert st["acked"] == n and st["in_flight"] == 0


def test_producer_and_consumer_tasks_on_one_loop(tmp_path) -> None:
    """Puts from tasks on the loop (fast path) and from the executor
    (fsync="always"), consumed by competing consumers: each message once."""
    for fsync in ("batch", "always"):
        qdir = str(tmp_path / fsync)

        async def main():
            async with logq.aio.open(qdir, fsync=fsync) as q:
                seen: list[int] = []

                async def produce(k):
                    for i in range(100):
                        await q.put(b"%d-%d" % (k, i))

                async def consume(c):
                    while len(seen) < 400:
                        try:
                            m = await c.get(timeout=0.5)
                        except Empty:
                            continue
                        seen.append(m.offset)
                        await c.ack(m)
                cs = [await q.consumer("g") for _ in range(3)]
                await asyncio.gather(*(produce(k) for k in range(4)), *(consume(c) for c in cs))
                for c in cs:
                    await c.close()
                return seen
        seen = run(main())
        assert sorted(seen) == list(range(400)), fsync


def test_tasks_adelay_and_aresult(app, tmp_path) -> None:
    import task_app
    from logq.tasks import TaskFailed

    p = app.pool("task_app:app", workers=2, backoff_base=0.05, backoff_max=0.1)
    p.start()
    try:
        async def main():
            hs = [await task_app.add.adelay(i, 1) for i in range(20)]
            bad = await task_app.bad.aapply_async()
            results = await asyncio.gather(*(h.aresult(timeout=30) for h in hs))
            assert results == [i + 1 for i in range(20)]
            with pytest.raises(TaskFailed):
                await bad.aresult(timeout=30)
            names = [t.name for t in threading.enumerate() if t.name.startswith("logq-aio-written")]
            assert len(names) <= 1      # one watcher for all the waiters of this loop
            slow = await task_app.sleep.adelay(0.5)
            with pytest.raises(TimeoutError):
                await slow.aresult(timeout=0.05)
            assert await slow.aresult(timeout=30) == "woke"
        run(main())
    finally:
        p.stop()

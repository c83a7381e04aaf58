"""logq.aio beside the blocking API, in the same run:

* ``async for`` + ``await c.ack(m)`` against ``c.get()`` + ``c.ack(m)``
  over the same records (target: at least 0.7 x);
* how soon an awaiting ``get`` wakes when another process puts (target:
  median within 2 ms), beside the floor of waking a process at all (the
  same two processes passing a byte through a pipe) and the blocking
  ``get``'s wake in the same rounds;
* the CPU time of 1 000 consumers of one group each awaiting a ``get`` on
  an idle queue (target: none to speak of), beside 1 000 threads blocked
  in the sync ``get`` (each looks around twice a second) and beside one
  awaiting consumer.

Each figure is checked: every message consumed once, in order, attempt 1,
and acked durably; every wake delivered the stamp that was put.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import struct
import subprocess
import sys
import threading
import time

import bench_helpers as H
import psutil

import logq
import logq.aio

SIZE = 100
ROUNDS = 5
WAKE_ROUNDS = 60
IDLE_SECONDS = 3.0
IDLE_WAITERS = 1000


def _build(path: str, n: int) -> None:
    with logq.open(path, fsync="never") as q:
        for i in range(0, n, 1000):
            q.put_many([b"%099d" % j for j in range(i, min(n, i + 1000))])
        q.flush()


def _check(offsets: list[int], qdir: str, group: str, n: int) -> None:
    assert offsets == list(range(n)), "not every message once, in order"
    with logq.open(qdir) as q:
        st = q.stats()["groups"][group]
    assert st["acked"] == n and st["watermark"] == n, st


def _sync_round(qdir: str, group: str, n: int) -> float:
    offs = []
    with logq.open(qdir) as q:
        c = q.consumer(group)
        t = time.perf_counter()
        for _ in range(n):
            m = c.get(timeout=10)
            offs.append(m.offset)
            c.ack(m)
        c.commit()
        rate = n / (time.perf_counter() - t)
        c.close()
    _check(offs, qdir, group, n)
    return rate


def _aio_round(qdir: str, group: str, n: int) -> float:
    offs: list[int] = []

    async def main() -> float:
        async with logq.aio.open(qdir) as q:
            async with q.consumer(group) as c:
                t = time.perf_counter()
                async for m in c:
                    offs.append(m.offset)
                    await c.ack(m)
                    if len(offs) == n:
                        break
                await c.commit()
                return n / (time.perf_counter() - t)
    rate = asyncio.run(main())
    _check(offs, qdir, group, n)
    return rate


def test_async_for_ack_against_sync_get_ack(qdir, report):
    n = H.scaled(100_000, 1000)
    _build(qdir, n)
    sync, aio = [], []
    for r in range(ROUNDS):        # interleaved: drift hits both alike
        sync.append(_sync_round(qdir, f"sync{r}", n))
        aio.append(_aio_round(qdir, f"aio{r}", n))
    report("async for + await ack, best round", max(aio), "msg/s",
           "sync get() + ack(), best round", max(sync), median=statistics.median(aio),
           ratio_target=(">=", 0.7),
           note=f"{n} messages of {SIZE} B per round, {ROUNDS} rounds each, interleaved; "
                f"sync median {statistics.median(sync):,.0f}/s")


WAKE_CHILD = r"""
import os, struct, sys, time
import logq
qdir, go_r, ready_w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
qs = {b"a": logq.open(qdir + "/aio"), b"s": logq.open(qdir + "/sync")}
while True:
    cmd = os.read(go_r, 1)
    if not cmd or cmd == b"q":
        break
    time.sleep(0.02)            # the parent is asleep by now
    stamp = struct.pack("<d", time.monotonic())
    if cmd in qs:
        qs[cmd].put(stamp)
    else:
        os.write(ready_w, stamp)
for q in qs.values():
    q.close()
"""


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def test_awaiting_get_wakes_on_a_put_from_another_process(qdir, report):
    # (a queue for each kind of get: neither sees the other's stamps)
    for sub in ("aio", "sync"):
        logq.open(os.path.join(qdir, sub)).close()
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", WAKE_CHILD, qdir, str(go_r), str(ready_w)],
                             pass_fds=(go_r, ready_w), env=H.child_env())
    aio_lat: list[float] = []
    sync_lat: list[float] = []
    pipe_lat: list[float] = []

    def stamp_of(data: bytes) -> float:
        return time.monotonic() - struct.unpack("<d", data)[0]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with logq.aio.open(os.path.join(qdir, "aio")) as q:
            async with q.consumer("g") as c:
                sq = logq.open(os.path.join(qdir, "sync"))
                sc = sq.consumer("g")
                try:
                    for _ in range(WAKE_ROUNDS):
                        # the awaiting get (the loop is idle meanwhile)
                        os.write(go_w, b"a")
                        m = await c.get(timeout=10)
                        aio_lat.append(stamp_of(m.data))
                        await c.ack(m)
                        # the blocking get, same process, in a thread
                        os.write(go_w, b"s")
                        sm = await loop.run_in_executor(None, sc.get, 10)
                        sync_lat.append(stamp_of(sm.data))
                        sc.ack(sm)
                        # a pipe: the floor of waking this process at all
                        os.write(go_w, b"w")
                        fut = loop.create_future()
                        loop.add_reader(ready_r, lambda: fut.done() or fut.set_result(os.read(ready_r, 8)))
                        data = await fut
                        loop.remove_reader(ready_r)
                        pipe_lat.append(stamp_of(data))
                finally:
                    sc.close()
                    sq.close()
    try:
        asyncio.run(main())
        os.write(go_w, b"q")
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
    # Each round's message was the stamp the child put for it: positive,
    # and younger than a round (a stale one would be a round old or more).
    assert len(aio_lat) == len(sync_lat) == WAKE_ROUNDS
    assert all(0 < x < 0.02 + 1.0 for x in aio_lat + sync_lat), (aio_lat, sync_lat)
    ms = 1e3
    report("awaiting get() wake after a put in another process, median",
           statistics.median(aio_lat) * ms, "ms",
           "pipe wake into the same event loop, median", statistics.median(pipe_lat) * ms,
           target=("<=", 2.0),
           note=f"{WAKE_ROUNDS} rounds; p99 {_pct(aio_lat, 0.99) * ms:.3g} ms (pipe "
                f"{_pct(pipe_lat, 0.99) * ms:.3g} ms); blocking get() in the same rounds: median "
                f"{statistics.median(sync_lat) * ms:.3g} ms; codec "
                f"{'native' if logq.native_enabled() else 'pure (futex through ctypes)'}")


def _cpu_while(seconds: float) -> float:
    me = psutil.Process()
    c0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    return (sum(me.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


def _aio_idle_cpu(qdir: str, group: str, waiters: int) -> float:
    async def main() -> float:
        async with logq.aio.open(qdir) as q:
            cs = [await q.consumer(group) for _ in range(waiters)]
            getters = [asyncio.create_task(c.get()) for c in cs]
            await asyncio.sleep(0.5)
            me = psutil.Process()
            c0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
            await asyncio.sleep(IDLE_SECONDS)
            cpu = (sum(me.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
            assert not any(g.done() for g in getters), "an idle waiter returned"
            for g in getters:
                g.cancel()
            await asyncio.gather(*getters, return_exceptions=True)
            for c in cs:
                await c.close()
            return cpu
    return asyncio.run(main())


def _threads_idle_cpu(qdir: str, group: str, waiters: int) -> float:
    q = logq.open(qdir)
    cs = [q.consumer(group) for _ in range(waiters)]
    stop = threading.Event()

    def block(c):
        while not stop.is_set():
            try:
                c.get(timeout=0.5)
                raise AssertionError("an idle waiter got a message")
            except logq.Empty:
                pass
    ts = [threading.Thread(target=block, args=(c,), daemon=True) for c in cs]
    for t in ts:
        t.start()
    time.sleep(0.5)
    cpu = _cpu_while(IDLE_SECONDS)
    stop.set()
    for t in ts:
        t.join()
    for c in cs:
        c.close()
    q.close()
    return cpu


def test_idle_awaiting_consumers_use_no_cpu(qdir, report):
    with logq.open(qdir) as q:
        q.put(b"settled")
        c = q.consumer("aio1000")
        c.ack(c.get())
        c.close()
    many = _aio_idle_cpu(qdir, "aio1000", IDLE_WAITERS)
    one = _aio_idle_cpu(qdir, "aio1000", 1)
    threads = _threads_idle_cpu(qdir, "aio1000", IDLE_WAITERS)
    pct = 100.0
    report(f"CPU of {IDLE_WAITERS} idle awaiting consumers (one group)", many * pct, "% of a core",
           f"{IDLE_WAITERS} threads blocked in the sync get()", threads * pct,
           target=("<=", 1.0),
           note=f"over {IDLE_SECONDS:g} s; one awaiting consumer: {one * pct:.3g} %; codec "
                f"{'native' if logq.native_enabled() else 'pure (futex through ctypes)'}")

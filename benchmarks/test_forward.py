"""logq.forward: messages forwarded from a queue into a local JetStream
stream, beside publishing the same messages directly with nats-py in the
same run.

A nats-server with JetStream (file storage, its store in the benchmark's
scratch directory) runs on 127.0.0.1 for the module (tests/services.py
starts it, installing the Debian package if it is missing).  For each
payload size (100 B and 1 KiB) ROUNDS rounds alternate between:

* **direct** (the floor): a fresh stream (file storage, 2 minute duplicate
  window), one connection, ``js.publish_async`` with a ``Nats-Msg-Id``
  header per message and at most WINDOW acks outstanding (the forwarder's
  window), timed from connecting until the last ack;
* **forwarder**: a fresh stream with the same configuration, a queue
  pre-filled with the same messages (untimed), ``Forwarder.start()``
  timed until the forwarder has the upstream's ack for every message
  (``stats()["published_total"]``, polled every millisecond): connecting,
  checking the stream, claiming, publishing, settling and acking in logq
  included; the final commit and shutdown are not.

Every round is checked: the stream holds exactly n messages; after the
forwarder stops, the group's backlog is 0 and its durable acked count is n,
with no failures and no duplicates reported.  (tests/test_forward.py checks
every payload and its order; here the count keeps the rounds short.)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections import deque
from typing import Any

import bench_helpers as H
import pytest

import logq
from logq.forward import Forwarder

sys.path.insert(0, os.path.join(H.ROOT, "tests"))
import services  # noqa: E402

ROUNDS = 3
WINDOW = 1000
TARGET = 0.9                 # the forwarder at >= 90 % of direct publishing (issue 15)
SIZES = {100: 100_000, 1024: 50_000}


@pytest.fixture(scope="module")
def nats_server(bench_dir: str) -> Any:
    pytest.importorskip("nats", reason="the forwarder benchmark needs nats-py: pip install 'logq[nats]'")
    srv = services.NatsServer(os.path.join(bench_dir, "nats"))
    srv.start()
    yield srv
    srv.close()


async def _reset_stream(url: str, name: str, subject: str) -> None:
    import nats
    from nats.js.errors import NotFoundError
    nc = await nats.connect(url, allow_reconnect=False)
    js = nc.jetstream(timeout=30)
    try:
        await js.delete_stream(name)
    except NotFoundError:
        pass
    await js.add_stream(name=name, subjects=[subject], storage="file", duplicate_window=120)
    await nc.close()


async def _count(url: str, name: str) -> int:
    import nats
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        return (await nc.jetstream(timeout=30).stream_info(name)).state.messages
    finally:
        await nc.close()


async def _direct(url: str, subject: str, payloads: list[bytes]) -> float:
    """Seconds to publish ``payloads`` with WINDOW acks outstanding."""
    import nats
    t0 = time.perf_counter()
    nc = await nats.connect(url, allow_reconnect=False)
    js = nc.jetstream(timeout=30, publish_async_max_pending=WINDOW + 1)
    await js.find_stream_name_by_subject(subject)       # the forwarder looks its stream up too
    out: deque[Any] = deque()
    publish = js.publish_async
    for i, data in enumerate(payloads):
        out.append(await publish(subject, data, headers={"Nats-Msg-Id": f"direct:{i}"}))
        if len(out) >= WINDOW:
            ack = await out.popleft()
            assert not ack.duplicate
    for fut in out:
        assert not (await fut).duplicate
    took = time.perf_counter() - t0
    await nc.close()
    return took


def _forward_round(url: str, qdir: str, subject: str, n: int) -> tuple[float, dict[str, Any]]:
    fw = Forwarder(qdir, url, subject=subject, window=WINDOW)
    t0 = time.perf_counter()
    fw.start()
    try:
        while fw.stats()["published_total"] < n:
            if fw._thread is not None and not fw._thread.is_alive():
                break
            time.sleep(0.001)
        took = time.perf_counter() - t0
    finally:
        st = fw.stop()
    return took, st


@pytest.mark.parametrize("size", sorted(SIZES))
def test_forward_vs_direct(benchmark: Any, nats_server: Any, qdir: str, report: Any, size: int) -> None:
    n = H.scaled_multiple(SIZES[size], 1000)
    payloads = H.sequence(H.make_pool(size, tag="f"), n)
    url = nats_server.url
    direct: list[float] = []
    forward: list[float] = []
    last: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        k = len(direct) + len(forward)
        path = os.path.join(qdir, f"q{k}")
        with logq.open(path, fsync="never") as q:
            for b in H.batches(payloads, 1000):
                q.put_many(b)
        asyncio.run(_reset_stream(url, "DIRECT", "bench.direct"))
        asyncio.run(_reset_stream(url, "FWD", "bench.fwd"))
        return {"path": path}

    def work(ctx: dict[str, Any]) -> None:
        # direct and forwarded rounds alternate, so both see the same machine
        direct.append(asyncio.run(_direct(url, "bench.direct", payloads)))
        took, st = _forward_round(url, ctx["path"], "bench.fwd", n)
        forward.append(took)
        ctx["stats"] = st

    def check(ctx: dict[str, Any]) -> None:
        assert asyncio.run(_count(url, "DIRECT")) == n
        assert asyncio.run(_count(url, "FWD")) == n, "the forwarded stream does not hold every message once"
        st = ctx["stats"]
        assert st["published_total"] == n and st["failures_total"] == 0 and st["duplicates_total"] == 0, st
        with logq.open(ctx["path"]) as q:
            g = q.stats()["groups"]["forward"]
        assert g["backlog"] == 0 and g["acked"] == n, g
        last.update(st)

    H.Rounds(benchmark, rounds=ROUNDS, setup=setup, work=work, check=check)
    best_d, best_f = n / min(direct), n / min(forward)
    mb = best_f * size / 1e6
    report(f"forwarder -> JetStream, {size} B, window {WINDOW}", best_f, "msgs/s",
           f"direct nats-py publish_async, window {WINDOW}", best_d,
           median=n / statistics.median(forward), ratio_target=(">=", TARGET),
           note=f"{n:,} messages per round, {ROUNDS} rounds; {mb:,.1f} MB/s of payload; direct median "
                f"{n / statistics.median(direct):,.0f}/s; file storage, duplicate window 2 min")

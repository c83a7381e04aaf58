"""The "batch" fsync policy's two triggers, on a real queue: a put is made
durable within about ``fsync_interval`` (never left unsynced), and no more
often than that while puts keep coming (the background thread must not
fsync at every wake).  Bounds only in the direction a slow machine cannot
break: a busy machine makes fewer fsyncs, never more."""

from __future__ import annotations

import time

import logq
from logq import _format as F
from helpers import wait_for


def test_batch_fsyncs_follow_fsync_interval(tmp_path):
    with logq.open(str(tmp_path / "q"), fsync="batch", fsync_interval=1.0) as q:
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            q.put(b"x" * 100)
            time.sleep(0.0005)
        took = time.monotonic() - start
        fsyncs = q.stats()["fsyncs"]
        assert 1 <= fsyncs <= took / 1.0 + 2, f"{fsyncs} fsyncs in {took:.1f} s at fsync_interval=1"
        last = q.put(b"last")
        wait_for(lambda: q.stats()["durable_next_offset"] > last, 10, "the last put to be fsynced")


def test_batch_fsyncs_after_fsync_bytes_without_waiting_for_the_interval(tmp_path):
    with logq.open(str(tmp_path / "q"), fsync="batch", fsync_interval=600, fsync_bytes=1 << 16) as q:
        q.put(b"small")
        time.sleep(0.2)
        assert q.stats()["durable_next_offset"] == 0, "fsynced long before fsync_interval"
        # The put that brings the unsynced bytes to fsync_bytes triggers an
        # fsync of what was put by then (the puts after it may wait for the
        # next fsync_bytes or the interval: they are not waited for here).
        offsets, unsynced, crossing = [], 5 + F.RECORD_HEADER_SIZE, None
        for _ in range(20):
            offsets.append(q.put(b"y" * 4096))
            unsynced += 4096 + F.RECORD_HEADER_SIZE
            if crossing is None and unsynced >= 1 << 16:
                crossing = offsets[-1]
        assert crossing is not None
        wait_for(lambda: q.stats()["durable_next_offset"] > crossing, 10,
                 "fsync_bytes to trigger an fsync")

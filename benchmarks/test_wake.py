"""How soon a consumer blocked in ``get()`` wakes when another process puts
(target: within 10 ms), beside the floor of waking a process at all: the
same two processes passing a byte through a pipe.  Each round the parent
blocks (in get, or in os.read), the child stamps ``time.monotonic()`` and
puts (or writes); the parent's latency is its receive time minus the
stamp (CLOCK_MONOTONIC is shared by the processes of one machine).
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import time

import bench_helpers as H

import logq

ROUNDS = 60

CHILD = r"""
import os, struct, sys, time
import logq
qdir, go_r, ready_w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = logq.open(qdir)
while True:
    cmd = os.read(go_r, 1)
    if not cmd or cmd == b"q":
        break
    time.sleep(0.02)            # the parent is asleep by now
    stamp = struct.pack("<d", time.monotonic())
    if cmd == b"p":
        q.put(stamp)
    else:
        os.write(ready_w, stamp)
q.close()
"""


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def test_blocked_get_wakes_on_a_put_from_another_process(bench_dir, report):
    qdir = os.path.join(bench_dir, "wake")
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    q = logq.open(qdir)
    c = q.consumer("g")
    child = subprocess.Popen([sys.executable, "-c", CHILD, qdir, str(go_r), str(ready_w)],
                             pass_fds=(go_r, ready_w), env=H.child_env())
    try:
        get_lat, pipe_lat = [], []
        for _ in range(ROUNDS):
            os.write(go_w, b"p")
            m = c.get(timeout=10)
            get_lat.append(time.monotonic() - struct.unpack("<d", m.data)[0])
            c.ack(m)
            os.write(go_w, b"w")
            stamp = os.read(ready_r, 8)
            pipe_lat.append(time.monotonic() - struct.unpack("<d", stamp)[0])
        os.write(go_w, b"q")
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        q.close()
    ms = 1e3
    report("get() wake after a put in another process, median", statistics.median(get_lat) * ms, "ms",
           "pipe wake between the same processes, median", statistics.median(pipe_lat) * ms,
           target=("<=", 10.0), note=f"{ROUNDS} rounds; p99 {_pct(get_lat, 0.99) * ms:.3g} ms "
                                     f"(pipe {_pct(pipe_lat, 0.99) * ms:.3g} ms); codec "
                                     f"{'native' if logq.native_enabled() else 'pure (futex through ctypes)'}")

"""Retention and the disk budget: settled segments are deleted, unsettled
ones never (except under on_full="drop_oldest", which counts what it
dropped); at ``max_bytes`` a put blocks, is rejected, or drops the oldest
segment; and a really full filesystem (a small tmpfs where the machine lets
us mount one, else RLIMIT_FSIZE) refuses puts cleanly while acks and
commits still go through, and works again once space frees."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

import helpers
import logq
from logq._index import RESERVE_BYTES

SEG = 4096


def put_n(q: logq.Queue, n: int, tag: str = "r", start: int = 0) -> list[bytes]:
    data = [helpers.payload(tag, i) for i in range(start, start + n)]
    for d in data:
        q.put(d)
    return data


def settle(c: logq.Consumer, n: int) -> list[logq.Message]:
    got: list[logq.Message] = []
    while len(got) < n:
        ms = c.get_many(min(500, n - len(got)), timeout=1)
        assert ms, f"only {len(got)} of {n} messages came"
        c.ack_many(ms)
        got += ms
    c.commit()
    return got


def test_segments_go_only_once_every_group_settled_them(tmp_path):
    with logq.open(tmp_path / "q", segment_bytes=SEG) as q:
        data = put_n(q, 300)
        a, b = q.consumer("a"), q.consumer("b")
        settle(a, 300)
        settle(b, 60)
        helpers.wait_for(lambda: q.first_offset > 0, 5, "retention after group b settled 60")
        time.sleep(1.2)          # another housekeeping round: still nothing of b's backlog goes
        assert 0 < q.first_offset <= 60
        rest = settle(b, 240)
        assert [m.data for m in rest] == data[60:]
        helpers.wait_for(lambda: q.first_offset > 250, 5, "retention after both groups settled")
        assert q.read(299) == data[299]


def test_without_groups_nothing_is_deleted(tmp_path):
    with logq.open(tmp_path / "q", segment_bytes=SEG) as q:
        put_n(q, 200)
        time.sleep(1.5)
        assert q.first_offset == 0 and q.stats()["segments"] > 5


def test_retention_keeps_settled_segments_for_its_time(tmp_path):
    with logq.open(tmp_path / "q", segment_bytes=SEG, retention=2.5) as q:
        put_n(q, 200)
        settle(q.consumer("g"), 200)
        time.sleep(1.5)
        assert q.first_offset == 0
        helpers.wait_for(lambda: q.first_offset > 0, 6, "retention after 2.5 s")


def budget(seg: int = 1 << 16) -> dict:
    return dict(segment_bytes=seg, max_bytes=2 * seg + 3 * RESERVE_BYTES + 6 * seg)


def fill_until_full(q: logq.Queue, limit: int = 100_000) -> int:
    for i in range(limit):
        try:
            q.put(helpers.payload("f", i))
        except logq.QueueFullError:
            return i
    raise AssertionError("max_bytes never refused a put")


def test_reject_at_max_bytes_then_accept_once_settled(tmp_path):
    with logq.open(tmp_path / "q", on_full="reject", **budget()) as q:
        c = q.consumer("g")
        n = fill_until_full(q)
        assert q.stats()["disk_bytes"] <= q.options.max_bytes
        assert len(q) == n
        with pytest.raises(logq.QueueFullError):
            q.put_many([b"x"] * 2000)
        assert len(q) == n                       # nothing of the refused batch
        got = settle(c, n)
        assert [helpers.identity(m.data)[1] for m in got] == list(range(n))
        helpers.wait_for(lambda: _put_ok(q), 5, "room after settling")


def _put_ok(q: logq.Queue) -> bool:
    try:
        for i in range(3000):
            q.put(b"y" * 100)
        return True
    except logq.QueueFullError:
        return False


def test_block_waits_for_room_or_times_out(tmp_path):
    with logq.open(tmp_path / "q", on_full="block", put_timeout=0.3, **budget()) as q:
        c = q.consumer("g")
        n = fill_until_full(q)               # put_timeout: QueueFullError after 0.3 s
        t = time.monotonic()
        with pytest.raises(logq.QueueFullError):
            q.put(bytes(60_000))
        assert time.monotonic() - t >= 0.29
    with logq.open(tmp_path / "q", on_full="block", **budget()) as q:
        c = q.consumer("g")
        done = threading.Event()

        def consumer() -> None:
            time.sleep(0.5)
            settle(c, n)
            done.set()
        t = threading.Thread(target=consumer)
        t.start()
        for i in range(200):                 # needs new segments: waits for the consumer
            q.put(bytes(1000))
        t.join()
        assert done.is_set()
        assert len(q) >= 200


def test_drop_oldest_counts_what_it_dropped_and_never_delivers_it(tmp_path):
    with logq.open(tmp_path / "q", on_full="drop_oldest", **budget()) as q:
        c = q.consumer("g")
        total = 12_000
        for i in range(total):
            q.put(helpers.payload("d", i))       # never refused
        assert q.stats()["disk_bytes"] <= q.options.max_bytes
        first = q.first_offset
        assert first > 0
        st = q.stats()["groups"]["g"]
        assert st["dropped"] == first
        got = settle(c, total - first)
        assert [helpers.identity(m.data)[1] for m in got] == list(range(first, total))
        assert c.get_many(10, timeout=0.2) == []


# -- a really full filesystem --------------------------------------------------------
ENOSPC_CHILD = r"""
import resource, signal, sys, time
import logq
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
qdir, mode = sys.argv[1], sys.argv[2]
q = logq.open(qdir, fsync="batch", segment_bytes=(256 << 10) if mode == "tmpfs" else (2 << 20))
c = q.consumer("g")
if mode == "rlimit":
    # No file may grow past 1.5 MiB: the index and lease table stay below
    # it, the next 2 MiB segment fails.
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 19, resource.RLIM_INFINITY))
stored = []
try:
    for i in range(100_000):
        stored.append(q.put(b"m%d-" % i + bytes(1000)))
except logq.DiskFullError as e:
    assert isinstance(e, logq.QueueFullError), type(e)
    print("full after", len(stored), flush=True)
else:
    raise SystemExit("the filesystem never filled")
assert all(q.read(o) == b"m%d-" % i + bytes(1000) for i, o in enumerate(stored))
# Acks and their commits still go through on the full disk ...
got = 0
while got < len(stored):
    ms = c.get_many(1000, timeout=1)
    assert ms, got
    assert all(m.data == b"m%d-" % m.offset + bytes(1000) for m in ms)
    c.ack_many(ms)
    c.commit()
    got += len(ms)
if mode == "rlimit":
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
# ... and once retention deletes the settled segments, puts work again.
# (each of these needs a new segment soon: the one it replaces must go)
more = [q.put(b"after%d-" % i + bytes(1000)) for i in range(len(stored) // 2)]
assert more == list(range(len(stored), len(stored) + len(stored) // 2))
q.close()
print("ok", len(stored), flush=True)
"""


@pytest.fixture
def small_fs(tmp_path):
    """A 6 MiB tmpfs if this machine lets us mount one (root), else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_filesystem_refuses_puts_but_acks_commit(tmp_path, small_fs):
    mode = "tmpfs" if small_fs else "rlimit"
    qdir = os.path.join(small_fs or str(tmp_path), "q")
    rc, out = helpers.run_child(ENOSPC_CHILD, str(tmp_path / "out"), qdir, mode, timeout=120)
    assert rc == 0, out
    stored = int(out.split("ok ")[1].split()[0])
    assert stored > 100
    with logq.open(qdir) as q:
        st = q.stats()["groups"]["g"]
        assert st["acked"] == stored and st["backlog"] == stored // 2
        m = q.consumer("g").get()
        assert (m.offset, m.data) == (stored, b"after0-" + bytes(1000))

"""Disk use follows the contents: the active segment's file grows in steps of
``preallocate_bytes`` ahead of the writer instead of being allocated whole
at ``segment_bytes``.  What preallocation bought is kept: every byte is
allocated (posix_fallocate) before it is written through a mapping, so a
full disk at a growth step is a clean DiskFullError (never SIGBUS: the
child's exit status says so); readers in other processes follow a file
that grows under them; a writer SIGKILLed while growing leaves a queue
that reopens with every reported record."""

from __future__ import annotations

import os
import random
import signal
import time

from helpers import Child, children, count_lines, read_report, run_child, wait_for

import logq

MiB = 1 << 20


def disk_bytes(path: str) -> int:
    """Blocks allocated under ``path`` (segments, index, everything)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def segment_sizes(path: str) -> list[int]:
    return [os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path)) if n.endswith(".log")]


def test_small_queue_holds_little_disk(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        empty = disk_bytes(qdir)
        for i in range(1000):
            q.put(b"%05d" % i + bytes(95))
        q.flush()
        full = disk_bytes(qdir)
        assert q.options.preallocate_bytes == 4 * MiB
    assert empty <= 6 * MiB, empty           # one 4 MiB step and the index
    assert full <= 8 * MiB, full             # the target of issue 15
    with logq.open(qdir) as q:
        assert len(q) == 1000 and q.read(999) == b"00999" + bytes(95)
        assert disk_bytes(qdir) <= 8 * MiB


def test_file_grows_in_steps_up_to_segment_bytes(tmp_path):
    qdir = str(tmp_path / "q")
    step = 64 << 10
    with logq.open(qdir, fsync="never", segment_bytes=1 * MiB, preallocate_bytes=step) as q:
        assert segment_sizes(qdir) == [step]
        payloads = [os.urandom(1000) for _ in range(3000)]     # about 3 segments
        for p in payloads:
            q.put(p)
            (size,) = segment_sizes(qdir)[-1:]
            # allocated ahead of the writer, never far beyond it
            assert size <= 1 * MiB
        q.flush()
        sizes = segment_sizes(qdir)
        assert len(sizes) >= 3
        assert all(s <= 1 * MiB for s in sizes)
        assert all(s >= 1 * MiB - 1100 for s in sizes[:-1])  # sealed: rolled only when full
        assert disk_bytes(qdir) <= sum(sizes) + 2 * MiB
    with logq.open(qdir) as q:
        assert [q.read(o) for o in range(len(payloads))] == payloads


def test_big_first_record_and_options(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir, segment_bytes=1 * MiB, preallocate_bytes=64 << 10) as q:
        big = os.urandom(3 * MiB)
        q.put(b"small")
        q.put(big)                       # rolls to a segment sized for it
        q.put(b"after")
        assert q.read(1) == big and q.read(2) == b"after"
    for bad in (0, 4095, -1):
        try:
            logq.open(str(tmp_path / "bad"), preallocate_bytes=bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"preallocate_bytes={bad} accepted")


def test_max_bytes_counts_what_is_allocated(tmp_path):
    """The budget is met at a growth step, not only at a roll: with 512 KiB
    segments grown 64 KiB at a time, a lone producer (no group: nothing may
    be deleted) is refused before the directory's allocated blocks pass
    max_bytes."""
    qdir = str(tmp_path / "q")
    budget = 5 * MiB      # the least allowed is two segments and the index reserves (4 MiB)
    q = logq.open(qdir, max_bytes=budget, segment_bytes=1 << 19, preallocate_bytes=64 << 10,
                  on_full="reject")
    stored = 0
    with q:
        try:
            for i in range(100_000):
                q.put(os.urandom(900))
                stored += 1
        except logq.QueueFullError:
            pass
        else:
            raise AssertionError("never full")
        assert disk_bytes(qdir) <= budget + (64 << 10)
        assert len(q) == stored


FULL_CHILD = r"""
import os, resource, signal, sys
import logq
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # get EFBIG, not the signal
qdir, mode = sys.argv[1], sys.argv[2]
step = 256 << 10
# One segment of 64 MiB (the default) grown 256 KiB at a time: the limit
# (no file may pass 1 MiB) is met at a growth step inside the segment, not
# at a roll.
with logq.open(qdir, preallocate_bytes=step):
    pass
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
q = logq.open(qdir, fsync=mode, preallocate_bytes=step)
stored = []
try:
    for i in range(100_000):
        stored.append(q.put(b"m%d-" % i + bytes(300)))
except logq.DiskFullError as e:
    print("full after", len(stored), "puts:", e, flush=True)
else:
    raise SystemExit("the disk never filled")
assert len(stored) > 1000, len(stored)              # several steps were taken first
assert all(q.read(o) == b"m%d-" % i + bytes(300) for i, o in enumerate(stored))
before = q.next_offset
for attempt in range(3):                            # refused again, nothing written
    try:
        q.put_many([b"x" * 300] * 50)
    except logq.DiskFullError:
        pass
    else:
        raise SystemExit("a put_many past the limit was taken")
assert q.next_offset == before
q.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
assert q.put(b"after") == before                     # space again: works again
q.close()
print("ok", len(stored), flush=True)
"""


def test_full_disk_at_a_growth_step(tmp_path):
    for mode in ("always", "never"):
        qdir = str(tmp_path / f"q-{mode}")
        rc, out = run_child(FULL_CHILD, str(tmp_path / f"out-{mode}"), qdir, mode, timeout=120)
        assert rc == 0, out                     # not -SIGBUS: no write into an unallocated page
        stored = int(out.split("ok ")[1].split()[0])
        with logq.open(qdir) as q:
            assert len(q) == stored + 1
            assert q.read(stored) == b"after"
            assert q.read(0) == b"m0-" + bytes(300)
            assert q.read(stored - 1) == b"m%d-" % (stored - 1) + bytes(300)


READER_CHILD = r"""
import sys, time
import logq
qdir, n = sys.argv[1], int(sys.argv[2])
q = logq.open(qdir)
off = 0
deadline = time.monotonic() + 60
while off < n:
    if not q.wait(off, timeout=max(0.0, deadline - time.monotonic())):
        raise SystemExit(f"timed out at offset {off}")
    first, payloads = q.read_many(off, 500)
    assert first == off, (first, off)
    for p in payloads:
        i = int(p[:8])
        assert i == off and p == b"%08d" % i + bytes(i % 3000), off
        off += 1
q.close()
print("read", off, flush=True)
"""


def test_reader_in_another_process_follows_growth(tmp_path):
    """A reader process maps the active segment while the writer grows it
    step after step (and records straddle the old end of its mapping)."""
    qdir = str(tmp_path / "q")
    n = 4000
    q = logq.open(qdir, fsync="never", segment_bytes=8 * MiB, preallocate_bytes=16 << 10)
    q.put(b"%08d" % 0)
    with children() as kids:
        kid = Child(READER_CHILD, str(tmp_path / "out"), qdir, str(n))
        kids.append(kid)
        rng = random.Random(1)
        for i in range(1, n):
            q.put(b"%08d" % i + bytes(i % 3000))
            if rng.random() < 0.01:
                time.sleep(0.002)
        assert kid.wait(120) == 0, kid.output()
        assert f"read {n}" in kid.output()
    assert len(segment_sizes(qdir)) == 1         # it all grew in place
    q.close()


GROW_PRODUCER = r"""
import os, sys
import logq
qdir, report = sys.argv[1], sys.argv[2]
q = logq.open(qdir, fsync="never", segment_bytes=1 << 20, preallocate_bytes=8 << 10)
fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    off = q.put(b"%08d" % i + bytes(i % 700))
    os.write(fd, b"%d g %d\n" % (off, i))
    i += 1
"""


def test_sigkill_while_growing_then_reopen(tmp_path):
    """8 KiB steps: the writer grows its file every few puts, so a SIGKILL at
    a random moment often lands in or around a growth (fallocate, remap)."""
    qdir = str(tmp_path / "q")
    rng = random.Random(15)
    reported_all: dict[int, int] = {}
    for run in range(5):
        report = str(tmp_path / f"report-{run}")
        with children() as kids:
            kid = Child(GROW_PRODUCER, str(tmp_path / f"out-{run}"), qdir, report)
            kids.append(kid)
            wait_for(lambda: count_lines(report) > 50 or not kid.alive(), 30, "the producer to start")
            assert kid.alive(), kid.output()
            time.sleep(rng.uniform(0.01, 0.3))
            kid.kill()
            assert kid.wait(30) == -signal.SIGKILL, kid.output()
        for off, _tag, i in read_report(report):
            reported_all[off] = i
        with logq.open(qdir, segment_bytes=1 << 20, preallocate_bytes=8 << 10) as q:
            for off, i in reported_all.items():
                assert q.read(off) == b"%08d" % i + bytes(i % 700), off
            assert q.next_offset >= max(reported_all) + 1
            # and it takes new records at once (never read back by offset above)
            off = q.put(b"reopened-%d" % run)
            assert q.read(off) == b"reopened-%d" % run
    for size in segment_sizes(qdir):
        assert size <= 1 << 20

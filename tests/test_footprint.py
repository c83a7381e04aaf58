"""Disk use follows the contents: a segment file is ``segment_bytes`` long
but sparse, and the writer allocates its blocks in steps of
``preallocate_bytes`` ahead of itself instead of all at once.  What
preallocation bought is kept: every byte is allocated (posix_fallocate)
before it is written through a mapping, so a full disk at a growth step is
a clean DiskFullError (never SIGBUS: the child's exit status says so, on a
real filesystem that fills up); readers in other processes follow; a writer
SIGKILLed while allocating leaves a queue that reopens with every reported
record."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from helpers import Child, child_env, children, count_lines, read_report, wait_for

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
    """The bytes allocated to each segment file, oldest first."""
    return [os.stat(os.path.join(path, n)).st_blocks * 512 for n in sorted(os.listdir(path))
            if n.endswith(".log")]


# A sparse file's blocks may include a block of extent metadata (ext4).
SLACK = 8 << 10


def segment_lengths(path: str) -> list[int]:
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
        assert segment_sizes(qdir) == [step] and segment_lengths(qdir) == [1 * MiB]
        payloads = [os.urandom(1000) for _ in range(3000)]     # about 3 segments
        for p in payloads:
            q.put(p)
            (size,) = segment_sizes(qdir)[-1:]
            # allocated ahead of the writer, never far beyond it
            assert size <= 1 * MiB + SLACK
        q.flush()
        sizes = segment_sizes(qdir)
        assert len(sizes) >= 3
        assert all(s <= 1 * MiB + SLACK for s in sizes)
        assert all(s >= 1 * MiB - 1100 for s in sizes[:-1])  # sealed: rolled only when full
        assert all(n == 1 * MiB for n in segment_lengths(qdir))  # sparse, never remapped
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
import os, signal, sys
import logq
qdir, mode = sys.argv[1], sys.argv[2]
step = 256 << 10
# One segment of 64 MiB (the default), sparse, allocated 256 KiB at a time,
# on a small tmpfs that a ballast file fills to about 2 MiB: the disk fills
# at an allocation step inside the segment, not at a roll.
q = logq.open(qdir, fsync=mode, preallocate_bytes=step)
q.put(b"first")
q.flush()
st = os.statvfs(qdir)
ballast = os.path.join(os.path.dirname(qdir), "ballast")
fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - (2 << 20))
os.close(fd)
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
os.unlink(ballast)
assert q.put(b"after") == before                     # space again: works again
q.close()
with logq.open(qdir) as q:
    assert len(q) == len(stored) + 2 and q.read(before) == b"after" and q.read(0) == b"first"
    assert all(q.read(o) == b"m%d-" % i + bytes(300) for i, o in enumerate(stored))
print("ok", len(stored), flush=True)
"""


def test_full_disk_at_a_growth_step(tmp_path):
    """On a real filesystem that fills up (a 24 MiB tmpfs, mounted in a
    private mount namespace of the child: ``unshare`` as root, or with a
    user namespace otherwise)."""
    for mode in ("always", "never"):
        mnt = tmp_path / f"fs-{mode}"
        mnt.mkdir()
        qdir = str(mnt / "q")
        script = tmp_path / f"child-{mode}.py"
        script.write_text(FULL_CHILD)
        shell = (f"mount -t tmpfs -o size=24m tmpfs {mnt} && cd {os.path.dirname(__file__)} && "
                 f"exec {sys.executable} {script} {qdir} {mode}")
        user = [] if os.geteuid() == 0 else ["-r"]
        proc = subprocess.run(["unshare", "-m", *user, "sh", "-c", shell], capture_output=True,
                              text=True, timeout=120, env=child_env())
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out        # not -SIGBUS: no write into an unallocated page
        assert "full after" in out and int(out.split("ok ")[1].split()[0]) > 1000, out


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
        assert size <= (1 << 20) + SLACK

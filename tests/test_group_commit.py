"""Group commit across processes under fsync="always": a process whose
records another process's completed fdatasync covered returns without its
own; one that sees a sync in progress that will cover them waits for it.
A killed syncer never makes another's put return early (nothing is
published before its fdatasync returned) and never blocks the others (the
kernel releases its ``sync.lock``).

The power-cut model here is exact about fdatasync: each producer logs,
after every fdatasync it made, how far into which segment that call
reached (what was complete when it began).  After SIGKILLing every
producer, everything past the furthest logged point of each segment is
destroyed, as a power cut may; every put that returned, in any process,
must still be there."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import struct
import threading
import time

import pytest
from helpers import Child, children, count_lines, read_report, run_child, wait_for

import logq
from logq import _codec as C
from logq import _format as F

CTL = struct.Struct("=Q")

PRODUCER = r"""
import os, sys
qdir, tag, report, synclog = sys.argv[1:5]
import logq
from logq import _format as F

ctl_fd = None
real = os.fdatasync
log_fd = os.open(synclog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

def fdatasync(fd):
    # How far this call reaches: the published tail when it begins (records
    # before it are complete); a segment the tail has left is sealed: all of it.
    path = os.readlink(f"/proc/self/fd/{fd}")
    name = os.path.basename(path)
    words = memoryview(ctl).cast("Q")
    pos, base = words[F.CTL_TAIL_POS >> 3], words[F.CTL_TAIL_BASE >> 3]
    words.release()
    mine = F.parse_segment_name(name)
    if mine is None:
        return real(fd)
    covered = pos if base == mine else (os.fstat(fd).st_size if base > mine else F.SEGMENT_HEADER_SIZE)
    real(fd)
    os.write(log_fd, f"{name} {covered}\n".encode())

q = logq.open(qdir, fsync="always")
import mmap
ctl = mmap.mmap(os.open(os.path.join(qdir, "control"), os.O_RDWR), F.CONTROL_SIZE)
os.fdatasync = fdatasync
fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    off = q.put(b"%s:%d:" % (tag.encode(), i) + bytes(i % 200))
    os.write(fd, b"%d %s %d\n" % (off, tag.encode(), i))
    i += 1
"""


def _synced_points(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f.read().split("\n")[:-1]:
                name, covered = line.split()
                out[name] = max(out.get(name, 0), int(covered))
    except FileNotFoundError:
        pass
    return out


def _cut_power(qdir: str, points: dict[str, int], rng: random.Random) -> None:
    for name in sorted(os.listdir(qdir)):
        if F.parse_segment_name(name) is None:
            continue
        path = os.path.join(qdir, name)
        size = os.path.getsize(path)
        keep = max(points.get(name, 0), F.SEGMENT_HEADER_SIZE)
        rest = size - keep
        if rest <= 0:
            continue
        new = bytes(rest) if rng.random() < 0.5 else rng.randbytes(min(rest, 1 << 16)) + bytes(max(0, rest - (1 << 16)))
        with open(path, "r+b") as f:
            f.seek(keep)
            f.write(new)
    os.truncate(os.path.join(qdir, "control"), 0)      # rebuilt after a reboot


def test_producers_killed_then_power_cut(tmp_path):
    """Four producers under fsync="always" (they hand the append lock over
    before each sync, and gather each other's puts), SIGKILLed at random moments,
    five times over; after each, a power cut that keeps only what some
    fdatasync reached.  Every put that returned is there, intact."""
    qdir = str(tmp_path / "q")
    logq.open(qdir).close()
    rng = random.Random(1515)
    returned: dict[int, bytes] = {}
    puts = syncs = 0
    for run in range(5):
        synclog = str(tmp_path / f"synclog-{run}")
        reports = []
        with children() as kids:
            for k in range(4):
                report = str(tmp_path / f"report-{run}-{k}")
                reports.append(report)
                kids.append(Child(PRODUCER, str(tmp_path / f"out-{run}-{k}"), qdir, f"p{k}", report, synclog))
            wait_for(lambda: all(count_lines(r) > 20 or not kid.alive() for r, kid in zip(reports, kids)),
                     60, "the producers to start")
            assert all(kid.alive() for kid in kids), [kid.output() for kid in kids]
            time.sleep(rng.uniform(0.05, 0.4))
            # one at a time, at random moments (mid-put, mid-fdatasync, waiting)
            for kid in rng.sample(kids, len(kids)):
                kid.kill()
                time.sleep(rng.uniform(0, 0.02))
            for kid in kids:
                assert kid.wait(30) == -signal.SIGKILL, kid.output()
        for report in reports:
            for off, tag, i in read_report(report):
                returned[off] = b"%s:%d:" % (tag.encode(), i) + bytes(i % 200)
                puts += 1
        syncs += count_lines(synclog)
        _cut_power(qdir, _synced_points(synclog), rng)
        with logq.open(qdir) as q:
            for off, data in returned.items():
                assert q.read(off) == data, f"run {run}: offset {off} lost or changed after the power cut"
    # the producers shared fdatasyncs (threads of one process always could)
    assert syncs < puts, (syncs, puts)


def test_sync_words_in_the_native_header():
    if not C.native_enabled():
        return
    from logq._native import lib
    for name in ("CTL_SYNCED_BASE", "CTL_SYNCED_NEXT", "CTL_SYNCING", "CTL_SYNCING_NEXT"):
        assert getattr(lib, "LOGQ_" + name) == getattr(F, name), name
    assert F.CTL_BOOT_ID + 16 <= F.CTL_SYNCED_BASE and F.CTL_SYNCING_NEXT + 8 <= F.CONTROL_SIZE


STUCK_SYNCER = r"""
import fcntl, mmap, os, struct, sys, time
from logq import _format as F
qdir, mode = sys.argv[1], sys.argv[2]
fd = os.open(os.path.join(qdir, F.SYNC_LOCK_FILE), os.O_RDWR)
ctl = mmap.mmap(os.open(os.path.join(qdir, F.CONTROL_FILE), os.O_RDWR), F.CONTROL_SIZE)
words = memoryview(ctl).cast("Q")
if mode in ("holding", "gathering"):
    fcntl.flock(fd, fcntl.LOCK_EX)          # a syncer stuck in (or killed in) its fdatasync
if mode != "gathering":
    # it announces a sync that would cover everything (a syncer that gathers
    # other processes' puts first holds the lock and announces nothing yet)
    words[F.CTL_SYNCING_NEXT >> 3] = 1 << 60
    words[F.CTL_SYNCING >> 3] = os.getpid()
print("syncing", flush=True)
if mode in ("holding", "gathering"):
    time.sleep(600)
"""


def _ctl_word(qdir: str, at: int) -> int:
    with open(os.path.join(qdir, F.CONTROL_FILE), "rb") as f:
        return CTL.unpack_from(f.read(), at)[0]


@pytest.mark.parametrize("mode", ["holding", "gathering"])
def test_killed_syncer_neither_returns_early_nor_blocks(tmp_path, mode):
    """A syncer killed in its fdatasync, or before it (holding sync.lock
    while it lets other processes' puts append first)."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="always") as q:
        q.put(b"first")
        synced_before = _ctl_word(qdir, F.CTL_SYNCED_NEXT)
        with children() as kids:
            kid = Child(STUCK_SYNCER, str(tmp_path / "out"), qdir, mode)
            kids.append(kid)
            wait_for(lambda: "syncing" in kid.output(), 30, "the syncer to announce its sync")
            fsyncs = q.stats()["fsyncs"]
            result: list = []
            t = threading.Thread(target=lambda: result.append(q.put(b"second")), daemon=True)
            t.start()
            # The announced sync would cover it (or the syncer holds the
            # lock): the put waits (it must not return before some
            # fdatasync covered it) ...
            t.join(0.5)
            assert t.is_alive() and not result
            assert _ctl_word(qdir, F.CTL_SYNCED_NEXT) == synced_before
            # ... and the syncer dies without publishing: the put syncs itself.
            kid.kill()
            assert kid.wait(30) == -signal.SIGKILL
            t.join(30)
            assert not t.is_alive(), "the put stayed blocked after the syncer died"
        assert result == [1]
        assert q.stats()["fsyncs"] > fsyncs
        assert _ctl_word(qdir, F.CTL_SYNCED_NEXT) >= 2
        assert _ctl_word(qdir, F.CTL_SYNCING) == 0


def test_stale_sync_words_are_ignored(tmp_path):
    """SYNCING left set by a process that died (no lock held) does not make
    a put wait on it for ever, nor return early."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="always") as q:
        q.put(b"first")
        rc, out = run_child(STUCK_SYNCER, str(tmp_path / "out"), qdir, "stale", timeout=60)
        assert rc == 0, out
        fsyncs = q.stats()["fsyncs"]
        done = threading.Event()
        t = threading.Thread(target=lambda: (q.put(b"second"), done.set()), daemon=True)
        t.start()
        assert done.wait(30), "a stale SYNCING word blocked the put"
        assert q.stats()["fsyncs"] > fsyncs
        assert _ctl_word(qdir, F.CTL_SYNCED_NEXT) >= 2


def test_sync_lock_is_free_after_close(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="always") as q:
        q.put(b"x")
    fd = os.open(os.path.join(qdir, F.SYNC_LOCK_FILE), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)

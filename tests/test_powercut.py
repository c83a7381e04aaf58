"""Simulated power cuts.  A child puts with fsync="always" (or "batch" and
flush() after each put) and reports each offset once that returned; it is
SIGKILLed.  What a power cut can do is then done by hand to everything that
was NOT yet promised durable: the bytes after the durable end of the newest
segment become zeros, random garbage, a torn partial copy of the next record,
or zeros followed by garbage in a later page; a segment created by a roll
holds garbage after its header; an empty newest segment whose creation was
not yet durable may vanish; the control block (shared memory,
never trusted after a reboot) becomes garbage.

The durable end is the end of the last record that was promised: the last
reported one, or further when logq itself had vouched for more (the
checkpoint in the index).  Only the newest segment is damaged here; sealed
segments that a power cut left torn (rolling does not fsync them) are the
subject of the restart tests in test_batch_atomic.py.

After reopening: every reported message is intact, nothing after the cut is
served (no garbage, no stale bytes left past the tail), and the queue takes
new puts that read back after another reopen.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest

import logq
from helpers import (PRODUCER, SEED, Child, children, checkpoint, count_lines, deadline, identity,
                     payload, read_flushes, read_report, segment_header, segment_records, segments,
                     verify_contents, wait_for, write_at)
from logq import _codec as C
from logq import _format as F

SEG = 16384          # four pages per segment, so there is a "later page"
PAGE = 4096
BIG_SEG = 65536      # room for many unflushed pages after the last flush
PATTERNS = ["zeros", "garbage", "torn", "later-page", "rolled"]
MODES = {"always": {"fsync": "always"}, "batch-flush": {"fsync": "batch", "flush": True},
         "big-always": {"fsync": "always", "big": True}}


def run_producer(tmp_path, qdir, cfg: dict, tag: str, rng: random.Random) -> list[tuple[int, str, int]]:
    report = str(tmp_path / f"report-{tag}")
    conf = dict(cfg, dir=str(qdir), tag=tag, report=report, segment_bytes=SEG, max_puts=3000)
    with children() as kids:
        kid = Child(PRODUCER, str(tmp_path / f"out-{tag}"), json.dumps(conf))
        kids.append(kid)
        wait_for(lambda: count_lines(report) > 0 or not kid.alive(), 30, "the producer to start")
        assert kid.alive(), kid.output()
        time.sleep(rng.uniform(0.02, 0.25))
        kid.kill()
        assert kid.wait(30) == -signal.SIGKILL, kid.output()
    got = read_report(report)
    assert got
    return got


def durable_end(qdir, reported) -> tuple[int, str, int, int]:
    """(newest base, its path, cut position, first offset not promised)."""
    base, path = segments(qdir)[-1]
    ck = checkpoint(qdir)
    # Records below the newest segment's base are left alone (see above).
    promised = max(max(o for o, _, _ in reported) + 1, ck[2] if ck else 0, base)
    if promised == base:
        return base, path, F.SEGMENT_HEADER_SIZE, promised
    recs = {o: (p, e) for o, p, e in segment_records(path, base)}
    assert promised - 1 in recs, f"promised record {promised - 1} not on disk before the cut"
    return base, path, recs[promised - 1][1], promised


def next_record_bytes(data: bytes, cut: int, offset: int, rng: random.Random) -> bytes:
    """The encoded record for ``offset``: from the disk if the child wrote it
    (unreported), else a made-up one."""
    h = C.handle(bytearray(data))
    try:
        found = C.scan(h, cut, len(data), offset, 1, True)
    finally:
        C.release(h)
    if found[0] == 1:
        _, ppos, plen = found[3][:3]
        return data[cut:ppos + plen]
    buf = bytearray(F.RECORD_HEADER_SIZE + 400)
    h = C.handle(buf)
    end = C.encode(h, 0, len(buf), offset, time.time_ns(), rng.randbytes(rng.randrange(60, 400)))
    C.release(h)
    return bytes(buf[:end])


def cut_power(qdir, path: str, cut: int, promised: int, pattern: str, rng: random.Random) -> bool:
    """Damage ``path`` from ``cut`` on; whether any non-zero byte was written."""
    with open(path, "rb") as f:
        data = f.read()
    size = len(data)
    rest = size - cut
    if pattern == "zeros":
        new = bytes(rest)
    elif pattern == "garbage":
        new = rng.randbytes(rest)
    elif pattern == "torn":
        rec = next_record_bytes(data, cut, promised, rng)
        keep = rng.randrange(8, len(rec))
        new = (rec[:keep] + bytes(rest))[:rest]
    else:   # zeros, then garbage in a later page, then zeros
        g = (cut // PAGE + 1) * PAGE
        if g >= size:
            g = cut + rest // 2
        new = bytearray(rest)
        hi = min(size, g + PAGE)
        new[g - cut:hi - cut] = rng.randbytes(hi - g)
        new = bytes(new)
    with open(path, "r+b") as f:
        f.seek(cut)
        f.write(new)
    # the control block is rebuilt after a reboot: whatever it holds
    ctl = os.path.join(qdir, "control")
    choice = rng.randrange(3)
    if choice == 0:
        with open(ctl, "r+b") as f:
            f.write(rng.randbytes(F.CONTROL_SIZE))
    elif choice == 1:
        os.truncate(ctl, 0)
    return any(new)


@pytest.mark.parametrize("run", [0, 1])
@pytest.mark.parametrize("mode", list(MODES))
def test_power_cut_after_sigkill(tmp_path, mode, run):
    rng = random.Random(f"{SEED}-{mode}-{run}")
    src = tmp_path / "killed"
    reported = run_producer(tmp_path, src, MODES[mode], "a", rng)
    if run == 1:   # a second life on the same queue, then a second kill
        reported += run_producer(tmp_path, src, MODES[mode], "b", rng)
    for pattern in PATTERNS:
        check_one_cut(tmp_path, src, reported, pattern, random.Random(f"{SEED}-{mode}-{run}-{pattern}"))


def check_one_cut(tmp_path, src, reported, pattern: str, rng: random.Random) -> None:
    qdir = tmp_path / f"cut-{pattern}"
    shutil.copytree(src, qdir)
    base, path, cut, promised = durable_end(qdir, reported)
    dropped, garbage = False, False
    if cut == F.SEGMENT_HEADER_SIZE and len(segments(qdir)) > 1 and rng.random() < 0.5:
        os.unlink(path)          # its creation had not reached the disk
        dropped = True
    elif pattern == "rolled" and base != promised:
        # killed inside a roll: the next segment was created (its header is
        # durable) but its data pages are whatever the disk held
        cut_power(qdir, path, cut, promised, "zeros", rng)
        garbage = True
        path, cut = os.path.join(qdir, F.segment_name(promised)), F.SEGMENT_HEADER_SIZE
        with open(path, "wb") as f:
            f.write(segment_header(promised) + rng.randbytes(SEG - F.SEGMENT_HEADER_SIZE))
        base = promised
    else:
        garbage = cut_power(qdir, path, cut, promised, "garbage" if pattern == "rolled" else pattern, rng)
    where = f"[{pattern}{', newest segment dropped' if dropped else ''}: cut at {cut} of segment {base}, " \
            f"{promised} records promised]"
    with deadline(60, f"reopening after the power cut {where}"):
        with logq.open(qdir, fsync="always", segment_bytes=SEG) as q:
            st = q.stats()
            assert st["last_shutdown_clean"] is False, where
            assert q.next_offset == promised, f"{where} the queue ends at {q.next_offset}"
            if garbage:
                assert st["recovery_truncated_bytes"] > 0, where
            if not dropped:
                with open(path, "rb") as f:
                    f.seek(cut)
                    after = f.read()
                assert after == bytes(len(after)), f"{where} stale bytes left past the tail"
            seen = verify_contents(q, reported, max_unreported=1)
            assert len(seen) == promised
            with pytest.raises(logq.OffsetError):
                q.read(promised)
            assert q.read_many(promised, 5) == (promised, [])
            new = q.put_many([payload("new", i) for i in range(40)])   # crosses a roll or two
            assert new == range(promised, promised + 40), where
            for i in range(40, 60):
                assert q.put(payload("new", i)) == promised + i
        with logq.open(qdir, segment_bytes=SEG) as q:
            reported_new = [(promised + i, "new", i) for i in range(60)]
            seen = verify_contents(q, reported + reported_new)
            assert q.next_offset == promised + 60
            assert q.stats()["last_shutdown_clean"] is True


@pytest.mark.parametrize("run", [0, 1])
def test_unflushed_page_lost_later_pages_kept(tmp_path, run):
    """fsync="batch" without a flush after every put: flush() every 10 puts
    is the promise.  A power cut may write back the page cache out of order:
    the page holding the first records after the last flush (put back as it
    was at the flush: its tail zero) is lost while later pages of the same
    segment reached the disk.  Every flushed record must be intact; the
    records after the hole are real puts and may be served (those in the hole
    then raise RecordLostError) or cut off, but no garbage is served, and the
    queue goes on taking puts."""
    rng = random.Random(f"{SEED}-outoforder-{run}")
    qdir = tmp_path / "q"
    report = str(tmp_path / "report")
    conf = {"dir": str(qdir), "fsync": "batch", "fsync_interval": 60, "tag": "u", "report": report,
            "segment_bytes": BIG_SEG, "max_puts": 5000, "flush_every": 50}
    with children() as kids:
        kid = Child(PRODUCER, str(tmp_path / "out"), json.dumps(conf))
        kids.append(kid)
        wait_for(lambda: count_lines(report) > 30 or not kid.alive(), 30, "the producer to start")
        assert kid.alive(), kid.output()
        time.sleep(rng.uniform(0.02, 0.2))
        kid.kill()
        assert kid.wait(30) == -signal.SIGKILL, kid.output()
    put = {o: (t, i) for o, t, i in read_report(report)}
    flushed = read_flushes(report)
    assert flushed
    reported = [(o, *put[o]) for o in sorted(put) if o <= flushed[-1]]
    base, path, cut, promised = durable_end(qdir, reported)
    hole_end = min(os.path.getsize(path), (cut // PAGE + 1) * PAGE)
    later = [o for o, p, e in segment_records(path, base) if p >= hole_end]
    write_at(path, cut, bytes(hole_end - cut))          # the page as it was at the flush
    where = f"[hole {cut}..{hole_end} in segment {base}; {len(later)} intact records after it]"
    with deadline(60, f"reopening {where}"):
        with logq.open(qdir, fsync="batch", segment_bytes=BIG_SEG) as q:
            nxt = q.next_offset
            assert nxt >= promised, where
            got = list(q.scan())
            offs = [o for o, _ in got]
            assert offs == sorted(set(offs)) and (not offs or offs[-1] < nxt), where
            for o, p in got:
                assert identity(p) == put.get(o, identity(p)), f"{where} offset {o}"
            assert set(range(promised)) <= set(offs), f"{where} a flushed record is missing"
            for o in set(range(nxt)) - set(offs):
                with pytest.raises(logq.RecordLostError):
                    q.read(o)
            if later and nxt > promised:
                assert nxt == later[-1] + 1, f"{where} served the records after the hole only partly"
            assert q.stats()["lost_records"] == nxt - len(offs), f"{where} lost records miscounted"
            new = q.put_many([payload("new", i) for i in range(40)])
            assert new == range(nxt, nxt + 40)
        with logq.open(qdir, segment_bytes=BIG_SEG) as q:
            assert [o for o, _ in q.scan()] == offs + list(new)
            assert all(q.read(o) == payload("new", i) for i, o in enumerate(new))


def test_damage_found_by_recovery_is_counted_once(tmp_path):
    """Recovery after a crash finds a damaged record in the middle of the
    newest segment and resynchronises after it; the record is reported lost
    once (stats, read), however often it is read past afterwards."""
    qdir = tmp_path / "q"
    code = ("import logq, os, sys\n"
            "q = logq.open(sys.argv[1], fsync='always', segment_bytes=65536)\n"
            "for i in range(60):\n"
            "    q.put(b'%03d' % i * 30)\n"
            "os._exit(0)\n")                      # dies without closing, as after SIGKILL
    with children() as kids:
        kid = Child(code, str(tmp_path / "out"), qdir)
        kids.append(kid)
        assert kid.wait(60) == 0, kid.output()
    base, path = segments(qdir)[-1]
    recs = segment_records(path, base)
    assert len(recs) == 60
    _, pos, _ = recs[20]
    write_at(path, pos + 40, bytes(8))
    with logq.open(qdir) as q:
        assert q.stats()["last_shutdown_clean"] is False
        assert q.next_offset == 60
        for _ in range(3):
            assert [o for o, _ in q.scan()] == [o for o in range(60) if o != 20]
            with pytest.raises(logq.RecordLostError):
                q.read(20)
            assert q.read(21) == b"021" * 30
            assert q.stats()["lost_records"] == 1
    with logq.open(qdir) as q:
        assert [o for o, _ in q.scan()] == [o for o in range(60) if o != 20]
        assert q.stats()["lost_records"] == 1


# -- power cuts inside put_many batches ------------------------------------
#
# A writer puts a durable prefix (flush), then several batches that are never
# synced, and is SIGKILLed.  The page cache then holds every byte it wrote; a
# power cut keeps any subset of the pages after the durable end (each page as
# written, or as it was on disk: zeros, since segments are preallocated; the
# page holding the durable end keeps its durable prefix either way).  Every
# subset is tried.  After the restart each batch is whole or absent, every
# flushed record is intact, nothing damaged is served, and new puts follow.

BATCH_CHILD = """
import json, os, sys, logq
from helpers import payload
cfg = json.loads(sys.argv[2])
q = logq.open(sys.argv[1], fsync="never", segment_bytes=cfg["segment_bytes"])
b = 0
for k in cfg["durable"]:
    q.put_many([payload("b%d" % b, i) for i in range(k)])
    b += 1
q.flush()
for k in cfg["unsynced"]:
    q.put_many([payload("b%d" % b, i) for i in range(k)])
    b += 1
print("written", q.next_offset, flush=True)
sys.stdin.read()
"""

# (durable batch sizes, unsynced batch sizes): batch heads land at many
# positions within a page and batches cross one, two or more page boundaries.
BATCH_SCENARIOS = [
    ([3, 9], [12]),
    ([1], [2, 30, 5]),
    ([20], [1, 40]),
    ([7, 7, 7], [4, 4, 4, 4, 25]),
    ([], [60]),
    ([33], [3, 3, 90]),
]
MAX_PAGES = 6        # at most 2**6 subsets of pages per scenario


def kill_batch_writer(tmp_path, qdir, cfg: dict) -> None:
    with children() as kids:
        kid = Child(BATCH_CHILD, str(tmp_path / "out"), str(qdir), json.dumps(cfg))
        kids.append(kid)
        wait_for(lambda: "written" in kid.output() or not kid.alive(), 30, "the writer to finish")
        assert kid.alive(), kid.output()
        kid.kill()
        assert kid.wait(30) == -signal.SIGKILL, kid.output()


def batches_served(q: logq.Queue) -> dict[str, list[int]]:
    """batch tag -> the item numbers served, every payload checked intact."""
    out: dict[str, list[int]] = {}
    for _, p in q.scan():
        tag, i = identity(p)
        out.setdefault(tag, []).append(i)
    return out


@pytest.mark.parametrize("scenario", range(len(BATCH_SCENARIOS)))
def test_power_cut_inside_put_many_batches(tmp_path, scenario):
    durable_sizes, unsynced = BATCH_SCENARIOS[scenario]
    src = tmp_path / "killed"
    kill_batch_writer(tmp_path, src, {"segment_bytes": BIG_SEG, "durable": durable_sizes,
                                      "unsynced": unsynced})
    (base, path), = segments(src)
    ck = checkpoint(src)
    assert ck is not None and ck[2] == sum(durable_sizes)
    with open(path, "rb") as f:
        written = f.read()
    sizes = dict(enumerate(durable_sizes + unsynced))
    end = segment_records(path, base)[-1][2]
    first_page = ck[1] // PAGE
    pages = list(range(first_page, (end - 1) // PAGE + 1))
    assert 1 < len(pages) <= MAX_PAGES, (scenario, pages)
    for kept in range(1 << len(pages)):
        qdir = tmp_path / f"cut-{kept}"
        shutil.copytree(src, qdir)
        with open(qdir / os.path.basename(path), "r+b") as f:
            for j, page in enumerate(pages):
                if kept >> j & 1:
                    continue
                lo = max(page * PAGE, ck[1])
                f.seek(lo)
                f.write(bytes(min(len(written), (page + 1) * PAGE) - lo))
        os.truncate(qdir / "control", 0)      # a restart: the control block is not trusted
        where = f"[scenario {scenario}, pages {pages} kept {[p for j, p in enumerate(pages) if kept >> j & 1]}]"
        with deadline(60, f"reopening {where}"):
            with logq.open(qdir, fsync="never", segment_bytes=BIG_SEG) as q:
                got = batches_served(q)
                for tag, items in got.items():
                    assert items == list(range(sizes[int(tag[1:])])), f"{where} batch {tag} is partial: {items}"
                for b in range(len(durable_sizes)):
                    assert f"b{b}" in got, f"{where} the flushed batch b{b} is gone"
                served = [o for o, _ in q.scan()]
                nxt = q.next_offset
                assert not served or served[-1] < nxt
                new = q.put_many([payload("new", i) for i in range(3)])
                assert new == range(nxt, nxt + 3), where
            with logq.open(qdir, segment_bytes=BIG_SEG) as q:
                assert [o for o, _ in q.scan()] == served + list(new), where
        shutil.rmtree(qdir)


def test_power_cut_keeps_the_head_page_only(tmp_path):
    """The case that once returned part of a batch: the page holding a
    batch's head (written last) reached the disk, the page holding its end
    did not.  Recovery cuts the batch whole, and the log goes on after the
    flushed records."""
    src = tmp_path / "q"
    kill_batch_writer(tmp_path, src, {"segment_bytes": BIG_SEG, "durable": [9], "unsynced": [30]})
    (base, path), = segments(src)
    recs = segment_records(path, base)
    head_end, last = recs[9][2], recs[-1][1]
    assert head_end // PAGE < last // PAGE
    write_at(path, (head_end // PAGE + 1) * PAGE, bytes(PAGE))
    os.truncate(src / "control", 0)
    with logq.open(src, segment_bytes=BIG_SEG) as q:
        assert list(batches_served(q)) == ["b0"]
        assert q.next_offset == 9
        assert q.stats()["recovery_truncated_bytes"] > 0
        assert q.put(b"after") == 9


BATCH_WINDOW_CHILD = """
import os, sys, time, logq
from helpers import payload
q = logq.open(sys.argv[1], fsync="batch", fsync_interval=%(I)r, checkpoint_interval=0.001,
              segment_bytes=%(S)d)
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
i = 0
while True:
    r = q.put_many([payload("w", i + j) for j in range(1 + i %% 5)])
    # after the call returned: the offsets and when (CLOCK_MONOTONIC is the machine's clock)
    os.write(fd, ("%%d %%d %%r\\n" %% (r.start, r.stop, time.monotonic())).encode())
    i += len(r)
    time.sleep(0.002)
"""
FSYNC_INTERVAL = 0.05
SLACK = 3.0          # scheduling on a loaded machine; far below what the test runs for


def test_fsync_batch_window_survives_a_power_cut(tmp_path):
    """fsync="batch": a record put more than fsync_interval (plus slack)
    before the power cut is on disk.  What was fsynced is read from the
    index's checkpoint (committed after each fsync here, never before it);
    the power cut zeroes everything after it, in the newest segment and in
    every segment rolled since (rolling does not fsync)."""
    qdir, report = tmp_path / "q", str(tmp_path / "report")
    code = BATCH_WINDOW_CHILD % {"I": FSYNC_INTERVAL, "S": SEG}
    with children() as kids:
        kid = Child(code, str(tmp_path / "out"), str(qdir), report)
        kids.append(kid)
        wait_for(lambda: count_lines(report) > 0 or not kid.alive(), 30, "the writer to start")
        time.sleep(SLACK + FSYNC_INTERVAL + 1.0)
        assert kid.alive(), kid.output()
        kid.kill()
        cut_at = time.monotonic()
        assert kid.wait(30) == -signal.SIGKILL, kid.output()
    with open(report) as f:
        puts = [(int(a), int(b), float(t)) for a, b, t in (line.split() for line in f.read().split("\n")[:-1])]
    must = [r for r in puts if r[2] < cut_at - FSYNC_INTERVAL - SLACK]
    assert must, "nothing was put long enough before the cut"
    ck = checkpoint(qdir)
    assert ck is not None
    for base, path in segments(qdir):
        if base == ck[0]:
            write_at(path, ck[1], bytes(os.path.getsize(path) - ck[1]))
        elif base > ck[0]:
            write_at(path, F.SEGMENT_HEADER_SIZE, bytes(os.path.getsize(path) - F.SEGMENT_HEADER_SIZE))
    os.truncate(qdir / "control", 0)
    with logq.open(qdir, segment_bytes=SEG) as q:
        got = {o: p for o, p in q.scan()}
        for start, stop, _ in must:
            for o in range(start, stop):
                assert o in got, f"offset {o}, put {cut_at - _:.2f}s before the cut, was lost"
        for o, p in got.items():
            identity(p)
        assert q.next_offset >= must[-1][1]


def test_power_cut_tears_batches_in_sealed_segments(tmp_path):
    """Rolling does not fsync: after a restart the segments sealed since the
    checkpoint are checked too.  Each page of them lost in turn (zeros):
    every batch is whole or absent, the flushed ones all there, what was
    given up is kept in quarantine, and the queue takes new puts."""
    src = tmp_path / "killed"
    unsynced = [17, 2, 23, 11, 30, 8, 26, 40, 12, 33, 19, 25, 6, 44, 21]
    kill_batch_writer(tmp_path, src, {"segment_bytes": SEG, "durable": [5, 9], "unsynced": unsynced})
    ck = checkpoint(src)
    segs = segments(src)
    assert len(segs) >= 3, "the unsynced batches should span several segments"
    sizes = dict(enumerate([5, 9] + unsynced))
    cases = []
    for base, path in segs[:-1]:
        if base < ck[0]:
            continue
        end = segment_records(path, base)[-1][2]
        lo = ck[1] if base == ck[0] else F.SEGMENT_HEADER_SIZE
        for page in range(lo // PAGE, (end - 1) // PAGE + 1):
            cases.append((path, max(lo, page * PAGE), min(end, (page + 1) * PAGE)))
    assert cases
    for k, (path, lo, hi) in enumerate(cases):
        qdir = tmp_path / f"cut-{k}"
        shutil.copytree(src, qdir)
        write_at(str(qdir / os.path.basename(path)), lo, bytes(hi - lo))
        os.truncate(qdir / "control", 0)
        where = f"[{os.path.basename(path)} bytes {lo}..{hi} lost]"
        with deadline(60, f"reopening {where}"):
            with logq.open(qdir, fsync="never", segment_bytes=SEG) as q:
                got = batches_served(q)
                for tag, items in got.items():
                    assert items == list(range(sizes[int(tag[1:])])), f"{where} batch {tag} is partial"
                assert {"b0", "b1"} <= set(got), f"{where} a flushed batch is gone"
                lost = q.stats()["lost_records"]
                nxt = q.next_offset
                assert len([o for o, _ in q.scan()]) + lost == nxt, where
                assert q.put(b"after") == nxt
        if lost:
            manifest = qdir / F.QUARANTINE_DIR / F.QUARANTINE_MANIFEST
            assert manifest.exists(), f"{where} records given up without a trace"
        shutil.rmtree(qdir)

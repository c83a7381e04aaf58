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
checkpoint in the index, or a roll, which fsyncs the sealed segment before
the next one is created).

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
from helpers import (PRODUCER, SEED, Child, children, checkpoint, count_lines, deadline, payload,
                     read_report, segment_header, segment_records, segments, verify_contents,
                     wait_for)
from logq import _codec as C
from logq import _format as F

SEG = 16384          # four pages per segment, so there is a "later page"
PAGE = 4096
PATTERNS = ["zeros", "garbage", "torn", "later-page", "rolled"]
MODES = {"always": {"fsync": "always"}, "batch-flush": {"fsync": "batch", "flush": True}}


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

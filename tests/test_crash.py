"""Producer crash tests: a child process puts in a loop and reports each
offset only after the call returned (after flush() too for "batch"); the
parent SIGKILLs it at a random moment, several rounds on the same queue, and
then checks that every reported message is there, intact, in order, exactly
once.  segment_bytes=4096 makes the kills land during segment rolls too; the
rounds that kill shortly after the start land during opening and recovery.

A SIGKILL leaves the page cache intact, so this holds for every fsync policy.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

import logq
from helpers import (PRODUCER, SEED, Child, children, count_lines, payload, read_report,
                     verify_contents, wait_for)

ROUNDS = 6

MODES = {
    # name: (producer config, how many unreported records may be present per round)
    "always": ({"fsync": "always"}, 1),
    "batch-flush": ({"fsync": "batch", "flush": True}, 1),
    "put_many-always": ({"fsync": "always", "mode": "put_many", "batch_max": 8}, 8),
    "never": ({"fsync": "never"}, 1),
    # records of several pages, bigger than segment_bytes: grown segments
    "big-always": ({"fsync": "always", "big": True}, 1),
}


def kill_rounds(tmp_path, qdir, cfg: dict, rounds: int, rng: random.Random):
    """Run ``rounds`` producers one after another on ``qdir``, each killed at a
    random moment; (all reported records, tags in order, per-round counts)."""
    reported, tags, counts = [], [], []
    for r in range(rounds):
        tag = f"r{r}"
        report = str(tmp_path / f"report-{tag}")
        conf = dict(cfg, dir=str(qdir), tag=tag, report=report, max_puts=4000)
        with children() as kids:
            kid = Child(PRODUCER, str(tmp_path / f"out-{tag}"), json.dumps(conf))
            kids.append(kid)
            if r % 3 == 1:
                # anywhere from interpreter start-up through open/recovery to puts
                time.sleep(rng.uniform(0.0, 0.5))
            else:
                wait_for(lambda: count_lines(report) > 0 or not kid.alive(), 30,
                         f"producer {tag} to start")
                assert kid.alive(), f"producer {tag} died:\n{kid.output()}"
                time.sleep(rng.uniform(0.0, 0.15))
            assert kid.alive(), f"producer {tag} exited before the kill:\n{kid.output()}"
            kid.kill()
            rc = kid.wait(30)
        assert rc == -signal.SIGKILL, f"producer {tag} exited with {rc}:\n{kid.output()}"
        got = read_report(report)
        reported += got
        tags.append(("big" if cfg.get("big") else "") + tag)
        counts.append(len(got))
    return reported, tags, counts


@pytest.mark.parametrize("mode", list(MODES))
def test_sigkill_rounds_keep_every_reported_message(tmp_path, mode):
    cfg, slack = MODES[mode]
    qdir = tmp_path / "q"
    rng = random.Random(f"{SEED}-{mode}")
    reported, tags, counts = kill_rounds(tmp_path, qdir, cfg, ROUNDS, rng)
    assert sum(counts) > 0 and all(counts[r] > 0 for r in range(ROUNDS) if r % 3 != 1), counts

    with logq.open(qdir, segment_bytes=4096) as q:
        st = q.stats()
        assert st["segments"] >= 2, "no segment roll happened: the test lost its point"
        seen = verify_contents(q, reported, max_unreported=slack, tag_order=tags)
        assert q.next_offset == len(seen)
        # the recovered queue goes on at the next dense offset
        end = q.next_offset
        assert q.put(b"after-crashes") == end
        r = q.put_many([b"a", b"b"])
        assert list(r) == [end + 1, end + 2]
    with logq.open(qdir) as q:
        assert q.read(end) == b"after-crashes"
        assert list(q.scan(end)) == [(end, b"after-crashes"), (end + 1, b"a"), (end + 2, b"b")]
        first, run = q.read_many(end, 10)      # may stop at a segment boundary
        assert first == end and run == [b"after-crashes", b"a", b"b"][:len(run)] and run
        assert q.stats()["last_shutdown_clean"] is True
        assert q.stats()["lost_records"] == 0


def test_kill_while_holding_the_append_lock(tmp_path):
    """Two processes append to one queue; one of them is SIGKILLed (almost
    always while it holds the append lock: the other one pauses between puts
    and has to ask for it).  The survivor must repair what the dead one left
    and go on; every reported message of both is there exactly once."""
    qdir = tmp_path / "q"
    rng = random.Random(f"{SEED}-lock")
    reported, holder_at_kill = [], []
    ctl = os.path.join(qdir, "control")
    for r in range(4):
        stop = str(tmp_path / f"stop-{r}")
        with children() as kids:
            conf = {"dir": str(qdir), "fsync": "always" if r % 2 else "never", "max_puts": 20000}
            victim_rep = str(tmp_path / f"victim-{r}")
            survivor_rep = str(tmp_path / f"survivor-{r}")
            victim = Child(PRODUCER, str(tmp_path / f"victim-out-{r}"),
                           json.dumps(dict(conf, tag=f"v{r}", report=victim_rep)))
            kids.append(victim)
            wait_for(lambda: count_lines(victim_rep) > 0 or not victim.alive(), 30, "the victim to start")
            survivor = Child(PRODUCER, str(tmp_path / f"survivor-out-{r}"),
                             json.dumps(dict(conf, tag=f"s{r}", report=survivor_rep,
                                             stop_file=stop, pause=0.001)))
            kids.append(survivor)
            wait_for(lambda: count_lines(survivor_rep) > 3 or not survivor.alive(), 30,
                     "the survivor to start")
            assert victim.alive(), victim.output()
            assert survivor.alive(), survivor.output()
            time.sleep(rng.uniform(0.01, 0.1))
            # kill at a moment the victim holds the lock (the HOLDER word of the
            # control block names it), if that happens within a second
            t_end = time.monotonic() + 1
            while time.monotonic() < t_end:
                with open(ctl, "rb") as f:
                    f.seek(40)
                    holder = int.from_bytes(f.read(8), "little")
                if holder == victim.pid:
                    break
            victim.kill()
            holder_at_kill.append(holder == victim.pid)
            assert victim.wait(30) == -signal.SIGKILL
            n = count_lines(survivor_rep)
            wait_for(lambda: count_lines(survivor_rep) >= n + 50 or not survivor.alive(), 30,
                     "the survivor to go on appending after the victim died holding the lock")
            assert survivor.alive(), f"the survivor died:\n{survivor.output()}"
            open(stop, "w").close()
            assert survivor.wait(30) == 0, survivor.output()
        v, s = read_report(victim_rep), read_report(survivor_rep)
        assert v and s
        reported += v + s
    assert any(holder_at_kill), "the victim never held the append lock when killed"
    with logq.open(qdir, segment_bytes=4096) as q:
        seen = verify_contents(q, reported, max_unreported=1)
        assert q.next_offset == len(seen)
        survivors = {(t, i) for _, t, i in reported if t.startswith("s")}
        assert survivors <= set(seen)
        assert q.put(b"end") == len(seen)


def test_random_kills_among_concurrent_producers(tmp_path):
    """Three producers append at once; one at a time, a random one is
    SIGKILLed and replaced by a new one, eight times, while the others keep
    going (repairs after dead holders, joins of a live queue, rolls under
    contention).  In the end every reported record of all of them is there
    exactly once."""
    qdir = str(tmp_path / "q")
    stop = str(tmp_path / "stop")
    rng = random.Random(f"{SEED}-many")
    reports, n = [], 0
    with children() as kids:
        live = []

        def start() -> None:
            nonlocal n
            tag = f"k{n}"
            n += 1
            rep = str(tmp_path / f"report-{tag}")
            conf = {"dir": qdir, "fsync": "always", "tag": tag, "report": rep, "stop_file": stop,
                    "pause": 0.0005, "mode": "put_many" if n % 2 else "put", "batch_max": 4}
            kid = Child(PRODUCER, str(tmp_path / f"out-{tag}"), json.dumps(conf))
            kids.append(kid)
            live.append((kid, rep))
            reports.append(rep)

        logq.open(qdir, segment_bytes=4096).close()
        for _ in range(3):
            start()
        for _ in range(8):
            time.sleep(rng.uniform(0.05, 0.2))
            for kid, rep in live:
                assert kid.alive(), f"a producer died on its own:\n{kid.output()}"
            kid, rep = live.pop(rng.randrange(len(live)))
            kid.kill()
            assert kid.wait(30) == -signal.SIGKILL
            start()
        counts = [count_lines(rep) for _, rep in live]
        wait_for(lambda: all(count_lines(rep) > c + 20 or not kid.alive()
                             for (kid, rep), c in zip(live, counts)), 30,
                 "the remaining producers to go on")
        open(stop, "w").close()
        for kid, _ in live:
            assert kid.wait(30) == 0, kid.output()
    reported = [r for rep in reports for r in read_report(rep)]
    with logq.open(qdir, segment_bytes=4096) as q:
        seen = verify_contents(q, reported, max_unreported=4)
        assert q.next_offset == len(seen)
        assert q.stats()["segments"] > 3


def test_next_holder_repairs_what_a_dead_holder_left(tmp_path):
    """The exact state a holder leaves when it dies mid-put: one record it
    finished but did not publish, then a torn one (header and part of the
    payload), and its pid in the HOLDER word.  The next process to take the
    append lock keeps the finished record, zeroes the torn one, and appends
    after the finished one."""
    from logq import _codec as C
    from logq import _format as F
    qdir = tmp_path / "q"
    with logq.open(qdir, fsync="never", segment_bytes=4096) as q0:
        q0.put_many([payload("pre", i) for i in range(5)])
    dead = Child("pass", str(tmp_path / "out"))
    assert dead.wait(30) == 0
    dead.reap()
    q = logq.open(qdir, fsync="always", segment_bytes=4096)
    try:
        assert q.next_offset == 5
        ctl_path = os.path.join(qdir, "control")
        with open(ctl_path, "rb") as f:
            ctl = f.read()
        u64 = lambda at: int.from_bytes(ctl[at:at + 8], "little")  # noqa: E731
        base, pos, nxt = u64(F.CTL_TAIL_BASE), u64(F.CTL_TAIL_POS), u64(F.CTL_TAIL_NEXT)
        assert (base, nxt) == (0, 5)
        assert u64(F.CTL_HOLDER) == 0
        finished, torn = payload("dead", 0), payload("dead", 1) + b"#" * 200
        buf = bytearray(1024)
        h = C.handle(buf)
        end1 = C.encode(h, 0, len(buf), 5, time.time_ns(), finished)
        end2 = C.encode(h, end1, len(buf), 6, time.time_ns(), torn)
        C.release(h)
        assert 0 < end1 < end2
        cut = end1 + F.RECORD_HEADER_SIZE + 40          # the header and 40 payload bytes
        seg_path = os.path.join(qdir, F.segment_name(base))
        with open(seg_path, "r+b") as f:
            f.seek(pos)
            f.write(bytes(buf[:cut]))
        with open(ctl_path, "r+b") as f:
            f.seek(F.CTL_HOLDER)
            f.write(dead.pid.to_bytes(8, "little"))
        off = q.put(b"next holder")
        assert off == 6, f"expected the put after the dead holder's finished record 5, got {off}"
        assert q.read(5) == finished
        assert q.read(6) == b"next holder"
        with open(seg_path, "rb") as f:
            data = f.read()
        mine = pos + (end1 - 0) + F.RECORD_HEADER_SIZE + len(b"next holder")
        assert data[mine:pos + cut] == bytes(pos + cut - mine), "torn bytes left after the tail"
    finally:
        q.close()
    with logq.open(qdir) as q:
        assert [p for _, p in q.scan()] == (
            [payload("pre", i) for i in range(5)] + [finished, b"next holder"])
        assert q.stats()["lost_records"] == 0


def test_holder_killed_mid_roll_does_not_shadow_the_next_record(tmp_path):
    """A holder SIGKILLed inside a roll, after the new segment file was
    created but before the new tail was published, leaves a segment named for
    the next offset.  The next holder goes on from the published tail; the
    record it then appends (put returned, fsync="always") must stay readable,
    also after a reopen, and its offset must never be handed out again.

    (Found by test_kill_while_holding_the_append_lock; this is the same state
    made deterministically.)"""
    from logq import _format as F
    from logq._segment import Segment
    qdir = tmp_path / "q"
    with logq.open(qdir, fsync="always", segment_bytes=4096) as q0:
        q0.put_many([payload("pre", i) for i in range(3)])
    dead = Child("pass", str(tmp_path / "out"))
    assert dead.wait(30) == 0
    dead.reap()
    q = logq.open(qdir, fsync="always", segment_bytes=4096)
    try:
        Segment.create(str(qdir), 3, 4096).close()       # the dead holder's roll
        with open(os.path.join(qdir, "control"), "r+b") as f:
            f.seek(F.CTL_HOLDER)
            f.write(dead.pid.to_bytes(8, "little"))
        off = q.put(b"acknowledged")
        assert off == 3
        assert q.read(3) == b"acknowledged"
    finally:
        q.close()
    with logq.open(qdir) as q:
        assert q.next_offset == 4, "an acknowledged record vanished after reopen"
        assert q.read(3) == b"acknowledged"
        assert q.put(b"later") == 4


def test_creator_killed_before_the_meta_file_was_published(tmp_path):
    """A process creating a queue writes logq.meta.<pid>.tmp and links it to
    logq.meta.  Killed between the two, it leaves a directory holding only
    the temporary file: that is a queue nobody finished creating, and the
    next open must finish the job (not call it a foreign directory forever)."""
    qdir = tmp_path / "q"
    qdir.mkdir()
    (qdir / "logq.meta.4242.tmp").write_text("logq-queue\nversion 1\nid 0123456789abcdef0123456789abcdef\n")
    with logq.open(qdir, fsync="always", segment_bytes=4096) as q:
        assert q.put(b"first") == 0
    with logq.open(qdir) as q:
        assert q.read(0) == b"first"


# -- damage inside batches, met by recovery after a SIGKILL ----------------------
BATCHES_THEN_DIE = """
import os, sys, logq
from helpers import payload
q = logq.open(sys.argv[1], fsync="never", segment_bytes=1 << 20)
q.put_many([payload("d", i) for i in range(400)])
q.flush()                                          # the checkpoint vouches for 0..399
q.put_many([payload("d", i) for i in range(400, 500)])
os.fsync(os.open(sys.argv[1] + "/00000000000000000000.log", os.O_RDONLY))   # on disk, not vouched for
os.kill(os.getpid(), 9)
"""


def _die_after_batches(tmp_path) -> tuple[str, dict]:
    from helpers import record_map, run_child
    qdir = str(tmp_path / "q")
    rc, out = run_child(BATCHES_THEN_DIE, str(tmp_path / "out"), qdir)
    assert rc == -signal.SIGKILL, out
    return qdir, record_map(qdir)


def test_recovery_resyncs_inside_a_durable_batch(tmp_path):
    """After a SIGKILL, recovery scans from the segment's start (the
    checkpoint's records at 395..399 are gone, so its position is not
    trusted) and meets damage inside the durable batch: only the damaged
    records are lost; the unvouched batch after it is whole, and kept."""
    from helpers import identity, write_at
    qdir, recs = _die_after_batches(tmp_path)
    path, pos, end = recs[199]
    write_at(path, end - 4, b"\xff" * 8)                               # 199 and 200
    write_at(path, recs[395][1], bytes(recs[399][2] - recs[395][1]))   # 395..399
    with logq.open(qdir) as q:
        assert q.stats()["last_shutdown_clean"] is False
        got = dict(q.scan())
        # 395..399 are gone, and the next batch (intact, whole) follows them
        assert sorted(got) == [o for o in range(500) if o not in (199, 200) and not 395 <= o < 400]
        assert all(identity(p) == ("d", o) for o, p in got.items())
        assert q.next_offset == 500


def test_recovery_gives_up_a_batch_above_the_checkpoint_that_is_not_whole(tmp_path):
    """The batch after the checkpoint loses a record in its middle: above
    the checkpoint a batch is all or nothing, and with nothing intact after
    it, it is the torn tail: recovery cuts it whole (saying how many bytes),
    and the durable records before it stay."""
    from helpers import identity, write_at
    qdir, recs = _die_after_batches(tmp_path)
    path, pos, end = recs[450]
    write_at(path, pos + 30, b"\xff" * 4)
    with logq.open(qdir) as q:
        got = dict(q.scan())
        assert sorted(got) == list(range(400))
        assert all(identity(p) == ("d", o) for o, p in got.items())
        assert q.next_offset == 400
        assert q.stats()["recovery_truncated_bytes"] > 0
        assert q.put(b"next") == 400
    with open(path, "rb") as f:
        f.seek(recs[400][1] + 28 + 5)
        assert f.read(recs[499][2] - recs[400][1]).strip(b"\0") == b"", "the torn batch was not cut"

"""put_many is all-or-nothing, also across crashes: a batch's first record is
written last (the others carry the CONT flag), so a killed writer leaves its
last batch whole or gone, a torn head takes the batch with it, and a reader
in another process never sees part of a batch."""

from __future__ import annotations

import os
import random
import signal
import struct
import time

import logq
from helpers import SEED, Child, children, segment_records, segments, wait_for, write_at

from logq import _format as F

K = 50           # records per batch
BATCH_WRITER = """
import logq, sys
q = logq.open(sys.argv[1], fsync="never", segment_bytes=1 << 16)
print("ready", flush=True)
b = int(sys.argv[2]) if len(sys.argv) > 2 else 0
while True:
    q.put_many([b"%d:%d:" % (b, i) + bytes(i % 7) * (i % 90) for i in range(%(K)d)])
    b += 1
""".replace("%(K)d", str(K))


def batches_of(q: logq.Queue) -> dict[int, list[int]]:
    """batch id -> the item numbers present, checking every payload."""
    out: dict[int, list[int]] = {}
    for _, p in q.scan():
        b, i, rest = p.split(b":", 2)
        assert rest == bytes(int(i) % 7) * (int(i) % 90), f"damaged payload {p[:40]!r}"
        out.setdefault(int(b), []).append(int(i))
    return out


def assert_whole(batches: dict[int, list[int]], what: str) -> None:
    for b, items in batches.items():
        assert items == list(range(K)), f"{what}: batch {b} is partial: {len(items)} of {K} items"
    assert sorted(batches) == list(range(len(batches))), f"{what}: batches missing in the middle"


def test_killed_writer_leaves_whole_batches(tmp_path):
    rng = random.Random(f"{SEED}-batch-kill")
    qdir = str(tmp_path / "q")
    seen = 0
    for round_ in range(6):
        with children() as kids:
            kid = Child(BATCH_WRITER, str(tmp_path / f"out{round_}"), qdir, round_ * 10**6)
            kids.append(kid)
            wait_for(lambda: "ready" in kid.output() or not kid.alive(), 30, "the writer to start")
            time.sleep(rng.uniform(0.01, 0.15))
            kid.kill()
            assert kid.wait(30) == -signal.SIGKILL, kid.output()
        with logq.open(qdir) as q:
            got = batches_of(q)
            assert all(items == list(range(K)) for items in got.values()), \
                f"round {round_}: a partial batch survived the kill"
            assert len(q) == K * len(got), "records outside whole batches"
            for r in range(round_ + 1):     # each run's batches: whole, none skipped
                ids = sorted(b - r * 10**6 for b in got if r * 10**6 <= b < (r + 1) * 10**6)
                assert ids == list(range(len(ids))), f"round {r}: batches missing in the middle"
            assert len(q) >= seen
            seen = len(q)
    assert seen > 0


def test_torn_batch_head_drops_the_whole_batch(tmp_path):
    """A power cut that keeps a batch's CONT records but not its head (the
    head is written last): recovery must drop the batch, not serve its tail."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="never", segment_bytes=1 << 20) as q:
        for b in range(3):
            q.put_many([b"%d:%d:" % (b, i) + bytes(i % 7) * (i % 90) for i in range(K)])
    base, path = segments(qdir)[-1]
    recs = segment_records(path, base)
    head_off, head_pos, head_end = recs[2 * K]           # the head of batch 2
    write_at(path, head_pos, bytes(head_end - head_pos))
    # As after a power cut: an unclean shutdown, with the last durable
    # checkpoint before batch 2 (a torn record is never below it).
    import lmdb
    env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), max_dbs=16)
    with env.begin(write=True) as txn:
        main = env.open_db(b"main", txn=txn)
        txn.put(b"clean", b"0", db=main)
        txn.put(b"checkpoint", struct.pack("<QQQ", base, head_pos, head_off), db=main)
    env.close()
    with logq.open(qdir) as q:
        assert q.next_offset == 2 * K
        assert_whole(batches_of(q), "after a torn batch head")
        assert q.put_many([b"new"]) == range(2 * K, 2 * K + 1)
    with logq.open(qdir) as q:
        assert q.read(2 * K) == b"new"


def test_damage_inside_a_sealed_batch_loses_only_damaged_records(tmp_path):
    """Inside a sealed segment every batch was written whole, so damage to
    one record of a batch does not cost the rest of it."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="never", segment_bytes=1 << 16) as q:
        for b in range(40):
            q.put_many([b"%d:%d:" % (b, i) + bytes(i % 7) * (i % 90) for i in range(K)])
    base, path = segments(qdir)[0]
    recs = segment_records(path, base)
    off, pos, end = recs[K + 10]                          # inside batch 1, sealed
    write_at(path, pos + F.RECORD_HEADER_SIZE - 1, b"\x00")   # break its flags byte
    with logq.open(qdir) as q:
        got = batches_of(q)
        assert got[1] == [i for i in range(K) if i != 10]
        assert q.stats()["lost_records"] == 1


def test_reader_in_another_process_never_sees_part_of_a_batch(tmp_path):
    qdir = str(tmp_path / "q")
    reader = """
import logq, sys, time
q = logq.open(sys.argv[1])
off, counts, deadline = 0, {}, time.monotonic() + 3
while time.monotonic() < deadline:
    first, got = q.read_many(off, 7)           # odd sizes: cut batches anywhere
    for p in got:
        b = int(p.split(b":", 1)[0])
        counts[b] = counts.get(b, 0) + 1
    off = first + len(got)
    # at a pause, every batch seen so far must be whole
    if not got:
        partial = {b: n for b, n in counts.items() if n != %(K)d}
        assert not partial, partial
print("ok", len(counts), flush=True)
""".replace("%(K)d", str(K))
    with logq.open(qdir, fsync="never", segment_bytes=1 << 16):
        pass
    with children() as kids:
        w = Child(BATCH_WRITER, str(tmp_path / "w"), qdir)
        r = Child(reader, str(tmp_path / "r"), qdir)
        kids += [w, r]
        assert r.wait(60) == 0, r.output()
        assert "ok" in r.output()
        w.kill()
        w.wait(30)


def _power_cut_state(qdir: str, checkpoint: tuple[int, int, int], *, reboot: bool) -> None:
    """Make the closed queue look as after a crash: unclean, the durable
    checkpoint at ``checkpoint``, and (``reboot``) a control block written
    before the machine restarted."""
    import lmdb
    env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), max_dbs=16)
    with env.begin(write=True) as txn:
        main = env.open_db(b"main", txn=txn)
        txn.put(b"clean", b"0", db=main)
        txn.put(b"checkpoint", struct.pack("<QQQ", *checkpoint), db=main)
    env.close()
    if reboot:
        write_at(os.path.join(qdir, F.CONTROL_FILE), F.CTL_BOOT_ID, b"\xee" * 16)


def test_restart_validates_sealed_segments_since_the_checkpoint(tmp_path):
    """Rolling does not fsync, so after a restart a sealed segment written
    since the last checkpoint may hold a batch whose head never reached the
    disk: recovery keeps those bytes in quarantine, zeroes them, and the rest
    of that batch is never served; everything else is."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="never", segment_bytes=1 << 16) as q:
        for b in range(60):
            q.put_many([b"%d:%d:" % (b, i) + bytes(i % 7) * (i % 90) for i in range(K)])
    segs = segments(qdir)
    assert len(segs) >= 3
    base, path = segs[1]                                  # sealed, after the checkpoint
    recs = segment_records(path, base)
    heads = [r for r in recs if (r[0] % K) == 0]
    off, pos, end = heads[1]                              # the head of a batch inside it
    write_at(path, pos, bytes(end - pos))
    _power_cut_state(qdir, (segs[0][0], F.SEGMENT_HEADER_SIZE, segs[0][0]), reboot=True)
    with logq.open(qdir) as q:
        got = batches_of(q)
        torn = off // K
        assert torn not in got, "the rest of a batch whose head is gone was served"
        assert_whole({b: v for b, v in got.items() if b != torn} | {torn: list(range(K))}, "restart")
        assert q.stats()["lost_records"] == K
        assert q.next_offset == 60 * K
    assert any(n.startswith(os.path.basename(path)) for n in os.listdir(os.path.join(qdir, "quarantine")))
    # What recovery gave up is on record: verify calls it a known loss, not damage.
    rep = logq.verify(qdir)
    assert rep.clean and [(d.first_offset, d.end_offset, d.known) for d in rep.damage] == \
        [(torn * K, torn * K + K, True)]


def test_without_restart_sealed_damage_loses_only_the_damaged_record(tmp_path):
    """The same damage when the machine did not restart (the page cache held
    every write): it is corruption, not a torn write, and only the damaged
    record is lost."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="never", segment_bytes=1 << 16) as q:
        for b in range(60):
            q.put_many([b"%d:%d:" % (b, i) + bytes(i % 7) * (i % 90) for i in range(K)])
    segs = segments(qdir)
    base, path = segs[1]
    recs = segment_records(path, base)
    off, pos, end = [r for r in recs if (r[0] % K) == 0][1]
    write_at(path, pos, bytes(end - pos))
    _power_cut_state(qdir, (segs[0][0], F.SEGMENT_HEADER_SIZE, segs[0][0]), reboot=False)
    with logq.open(qdir) as q:
        got = batches_of(q)
        assert got[off // K] == list(range(1, K))
        assert q.stats()["lost_records"] == 1

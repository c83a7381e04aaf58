"""Tamper tests on closed queues: a queue of known payloads spread over many
4096-byte segments is closed, its files are edited with plain file I/O, and
it is opened again.

Whatever the damage: opening succeeds (or raises the documented error), no
damaged payload is ever returned (each payload read or scanned equals the
original at that offset), every record before the first damaged byte is
served, records after damage in a sealed segment are still served where the
framing allows while the damaged ones raise RecordLostError on read, are
skipped by scan and counted in stats()["lost_records"], a broken index is
set aside in quarantine/ and rebuilt, and the queue takes new puts at the
next offset afterwards.

Reopening after damage to the index runs in a child process: LMDB faults
(SIGBUS) on a truncated file, and that must show up as a failed test, not as
a dead test run.
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

import logq
from helpers import (CHECK_QUEUES, SEED, build_queue, deadline, payload, record_map, run_child,
                     segment_header, segments, write_at)
from logq import _format as F

N = 400
TAG = "t"
HDR = F.SEGMENT_HEADER_SIZE


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Two closed queues of N records: "plain" (sealed segments never read,
    so no stored sparse index) and "indexed" (everything read before close,
    so the index holds the sealed segments' sparse indexes)."""
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for variant in ("plain", "indexed"):
        d = root / variant
        build_queue(str(d), N, TAG, read_all=variant == "indexed")
        segs = segments(str(d))
        assert len(segs) >= 8, "the queue should span many segments"
        out[variant] = d
    return out


class Clone:
    """A copy of a pristine queue, and the layout of its records on disk."""

    def __init__(self, src, dst, n: int = N, tag: str = TAG) -> None:
        shutil.copytree(src, dst)
        self.dir = str(dst)
        self.items = [payload(tag, i) for i in range(n)]
        self.records = record_map(self.dir)                    # off -> (path, pos, end)
        assert sorted(self.records) == list(range(n))
        self.segs = segments(self.dir)
        self.newest_base, self.newest = self.segs[-1]
        self.sealed = self.segs[:-1]

    def in_segment(self, path: str) -> list[tuple[int, int, int]]:
        return sorted((o, p, e) for o, (sp, p, e) in self.records.items() if sp == path)

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for _, path in self.segs:
            with open(path, "rb") as f:
                out[path] = f.read()
        return out


@pytest.fixture
def plain(pristine, tmp_path):
    return Clone(pristine["plain"], tmp_path / "q")


@pytest.fixture
def indexed(pristine, tmp_path):
    return Clone(pristine["indexed"], tmp_path / "q")


def changed_records(c: Clone, before: dict[str, bytes]) -> set[int]:
    """Offsets of the records whose bytes differ from ``before``."""
    out = set()
    for off, (path, pos, end) in c.records.items():
        with open(path, "rb") as f:
            f.seek(pos)
            now = f.read(end - pos)
        if now != before[path][pos:end]:
            out.add(off)
    return out


def check(c: Clone, *, lost: set[int] = frozenset(), end: int | set[int] = N, what: str = "") -> None:
    """Open the tampered queue and check what it serves: offsets below the
    log's end read back as the originals except ``lost`` ones, which raise
    RecordLostError and are skipped by scan.  ``end`` is the expected
    next_offset (or the set of acceptable ones: records from the end on are
    gone).  Then new puts, and a reopen."""
    ends = {end} if isinstance(end, int) else set(end)
    with deadline(4, f"reading the tampered queue {what}"):
        with logq.open(c.dir, fsync="batch", segment_bytes=4096) as q:
            nxt = q.next_offset
            assert nxt in ends, f"{what}: the queue ends at {nxt}, expected one of {sorted(ends)}"
            lost_here = {o for o in lost if o < nxt}
            want = [o for o in range(nxt) if o not in lost_here]
            got = list(q.scan())
            bad = [o for o, p in got if o >= N or p != c.items[o]]
            assert not bad, f"{what}: damaged or foreign payloads returned at offsets {bad[:10]}"
            assert [o for o, _ in got] == want, (
                f"{what}: scan served {len(got)} records; missing "
                f"{sorted(set(want) - {o for o, _ in got})[:20]}, unexpected "
                f"{sorted({o for o, _ in got} - set(want))[:20]}")
            assert q.stats()["lost_records"] == len(lost_here), what
            for o in range(nxt):
                if o in lost_here:
                    with pytest.raises(logq.RecordLostError) as ei:
                        q.read(o)
                    assert isinstance(ei.value, LookupError) and ei.value.offset == o
                    first, run = q.read_many(o, 3)
                    assert first > o and all(p == c.items[first + k] for k, p in enumerate(run))
                else:
                    assert q.read(o) == c.items[o], f"{what}: offset {o}"
            with pytest.raises(logq.OffsetError):
                q.read(nxt)
            new = q.put_many([b"new-%d" % i for i in range(30)])       # rolls at least once
            assert new == range(nxt, nxt + 30)
        with logq.open(c.dir, segment_bytes=4096) as q:
            assert q.next_offset == nxt + 30
            assert [q.read(o) for o in new] == [b"new-%d" % i for i in range(30)]
            got = list(q.scan())
            assert [o for o, _ in got] == want + list(new)
            assert q.stats()["lost_records"] == len(lost_here)


# -- the newest segment ------------------------------------------------------------
def truncation_points(c: Clone, rng: random.Random) -> list[int]:
    recs = c.in_segment(c.newest)
    size = os.path.getsize(c.newest)
    pts = {0, 1, HDR - 1, HDR, HDR + 1, HDR + F.RECORD_HEADER_SIZE, recs[-1][2], recs[-1][2] - 1,
           recs[-1][2] + 1, size - 1}
    for _, p, e in rng.sample(recs, min(4, len(recs))):
        pts |= {p, p + 1, e - 1}
    while len(pts) < 24:
        pts.add(rng.randrange(0, size))
    return sorted(pts)


def test_truncate_newest_segment(pristine, tmp_path):
    rng = random.Random(f"{SEED}-truncate")
    probe = Clone(pristine["plain"], tmp_path / "probe")
    for k, cut in enumerate(truncation_points(probe, rng)):
        c = Clone(pristine["plain"], tmp_path / f"q{k}")
        os.truncate(c.newest, cut)
        recs = c.in_segment(c.newest)
        first_gone = next((o for o, _, e in recs if e > cut), N)
        if cut < HDR:
            first_gone = c.newest_base
        # the log ends where the damage starts, or keeps its offsets and
        # reports the records cut off as lost
        check(c, lost=set(range(first_gone, N)), end={first_gone, N},
              what=f"[newest segment truncated to {cut} bytes]")
        if cut < HDR:
            kept = os.listdir(os.path.join(c.dir, F.QUARANTINE_DIR))
            assert any(n.startswith(F.segment_name(c.newest_base)) for n in kept), kept


@pytest.mark.parametrize("kind", ["zeros", "garbage"])
@pytest.mark.parametrize("where", ["sealed", "newest"])
@pytest.mark.parametrize("variant", ["plain", "indexed"])
def test_overwrite_range(pristine, tmp_path, kind, where, variant):
    rng = random.Random(f"{SEED}-{kind}-{where}-{variant}")
    for trial in range(4):
        c = Clone(pristine[variant], tmp_path / f"q{trial}")
        if where == "sealed":
            _, path = rng.choice(c.sealed[1:-1])
        else:
            path = c.newest
        recs = c.in_segment(path)
        start = rng.randrange(HDR, recs[-1][2] + 20)
        length = rng.choice([1, 2, 8, rng.randrange(1, 400)])
        before = c.snapshot()
        write_at(path, start, bytes(length) if kind == "zeros" else rng.randbytes(length))
        lost = changed_records(c, before)
        what = f"[{kind} over {start}..{start + length} of {os.path.basename(path)}, records {sorted(lost)}]"
        if where == "sealed":
            check(c, lost=lost, end=N, what=what)
        else:
            first = min(lost, default=N)
            check(c, lost=lost, end={first, N}, what=what)


def test_several_damaged_ranges_in_one_sealed_segment(plain):
    rng = random.Random(f"{SEED}-several")
    _, path = plain.sealed[2]
    recs = plain.in_segment(path)
    before = plain.snapshot()
    for i in (1, len(recs) // 2, len(recs) - 1):       # one in the middle, one at each end
        _, p, e = recs[i]
        write_at(path, rng.randrange(p, e), rng.randbytes(3))
    lost = changed_records(plain, before)
    assert len(lost) == 3
    check(plain, lost=lost, what="[three damaged records in one sealed segment]")


def test_damage_after_the_sparse_index_was_used(plain):
    """Damage to a sealed segment while a queue has it open and indexed:
    later reads must not return the damaged bytes either."""
    _, path = plain.sealed[1]
    recs = plain.in_segment(path)
    with deadline(4, "reading after damage under an open queue"):
        with logq.open(plain.dir, segment_bytes=4096) as q:
            assert [p for _, p in q.scan()] == plain.items
            victim, p, e = recs[len(recs) // 2]
            write_at(path, p + F.RECORD_HEADER_SIZE, b"\xff\xfe")
            with pytest.raises(logq.RecordLostError):
                q.read(victim)
            assert q.read(victim + 1) == plain.items[victim + 1]
            assert q.read(victim - 1) == plain.items[victim - 1]
            got = list(q.scan())
            assert [o for o, _ in got] == [o for o in range(N) if o != victim]
            assert all(x == plain.items[o] for o, x in got)


@pytest.mark.parametrize("seed", range(6))
def test_random_reads_after_damage_under_an_open_queue(pristine, tmp_path, seed):
    """read(offset) through the sparse index skips records by their headers:
    with headers, lengths and payloads damaged in place after the index was
    built, every read gives the record's own payload or RecordLostError,
    never another record's bytes or damaged ones."""
    rng = random.Random(SEED + seed)
    c = Clone(pristine["plain"], tmp_path / "q")
    with logq.open(c.dir, segment_bytes=4096) as q:
        assert [p for _, p in q.scan()] == c.items      # builds the sparse index
        victims = set()
        for _ in range(rng.randrange(1, 6)):
            _, path = rng.choice(c.sealed)
            off, p, e = rng.choice(c.in_segment(path))
            at = rng.choice([p + 4, p + 8, p + 24, p + F.RECORD_HEADER_SIZE, rng.randrange(p, e)])
            write_at(path, at, rng.randbytes(rng.randrange(1, 5)))
            victims.add(off)
        order = list(range(N))
        rng.shuffle(order)
        for off in order:
            try:
                got = q.read(off)
            except logq.RecordLostError:
                assert off in victims, f"offset {off} lost, only {sorted(victims)} damaged"
                continue
            assert got == c.items[off], f"offset {off}: wrong bytes"


@pytest.mark.parametrize("seed", range(4))
def test_runs_read_on_from_where_the_last_stopped_after_damage(pristine, tmp_path, seed):
    """A consumer's next read_many starts where its last one stopped (a
    segment remembers that position instead of seeking): records damaged
    in place between reads, right there or further on, are skipped, never
    returned, and every intact one is served in order."""
    rng = random.Random(SEED + 100 + seed)
    c = Clone(pristine["plain"], tmp_path / "q")
    with logq.open(c.dir, segment_bytes=4096) as q:
        assert [p for _, p in q.scan()] == c.items
        victims: set[int] = set()
        off = 0
        got: list[int] = []
        while off < N:
            if rng.random() < 0.3:
                # damage the record the next read starts at, or one a little after it
                v = min(N - 1, off + rng.choice([0, 0, 1, rng.randrange(1, 20)]))
                _path, p, e = c.records[v]
                at = rng.choice([p + 4, p + 8, p + F.RECORD_HEADER_SIZE, rng.randrange(p, e)])
                write_at(_path, at, rng.randbytes(rng.randrange(1, 4)))
                victims.add(v)
            first, payloads = q.read_many(off, rng.randrange(1, 30))
            if not payloads:
                break
            for i, x in enumerate(payloads):
                assert x == c.items[first + i], f"offset {first + i}: wrong or damaged bytes"
            assert all(o in victims for o in range(off, first)), \
                f"offsets {off}..{first - 1} skipped, only {sorted(victims)} damaged"
            got += range(first, first + len(payloads))
            off = first + len(payloads)
        assert set(range(N)) - set(got) <= victims


@pytest.mark.parametrize("cut", ["none", "inside-last", "before-last", "file-short"])
@pytest.mark.parametrize("victim", [0, 3, 6])     # not the last: that one is the tail
def test_a_range_repair_zeroed_is_never_taken_for_the_end_of_the_log(tmp_path, victim, cut):
    """repair zeroes what it gives up, and a zero header reads as "no record
    here".  Whatever happens to the newest segment later (a clean reopen, a
    torn or cut tail), recovery steps over that range: every intact record
    after it keeps its offset, and new puts never reuse one of them."""
    qdir = str(tmp_path / "q")
    items = [payload("z", i) for i in range(12)]
    with logq.open(qdir, segment_bytes=1 << 16) as q:
        for p in items[:8]:
            q.put(p)
    (_, seg), = segments(qdir)

    def start(o):       # single puts: no meta, payloads unique
        with open(seg, "rb") as f:
            return f.read().find(items[o]) - F.RECORD_HEADER_SIZE

    write_at(seg, start(victim) + F.RECORD_HEADER_SIZE + 1, b"\xff")
    logq.repair(qdir)
    assert logq.verify(qdir).clean
    with logq.open(qdir, segment_bytes=1 << 16) as q:
        for p in items[8:]:
            q.put(p)
    lost = {victim}
    if cut == "inside-last":
        os.truncate(seg, start(11) + 10)
        lost.add(11)
    elif cut == "before-last":
        os.truncate(seg, start(11))
        lost.add(11)
    elif cut == "file-short":
        os.truncate(seg, start(10))       # 10 and 11 gone
        lost |= {10, 11}
    with logq.open(qdir, segment_bytes=1 << 16) as q:
        got = dict(q.scan())
        assert sorted(got) == [o for o in range(12) if o not in lost]
        assert all(got[o] == items[o] for o in got)
        assert q.next_offset == max(got) + 1
        assert q.put(b"next") == max(got) + 1


def test_append_garbage_to_newest_segment(plain):
    rng = random.Random(f"{SEED}-append")
    with open(plain.newest, "ab") as f:
        f.write(rng.randbytes(5000))
    check(plain, what="[garbage appended to the newest segment]")


def test_garbage_in_the_zero_tail_of_the_newest_segment(plain):
    rng = random.Random(f"{SEED}-tail")
    end = plain.in_segment(plain.newest)[-1][2]
    size = os.path.getsize(plain.newest)
    for at in (end, end + 1, (end + size) // 2):
        c = Clone(plain.dir, os.path.join(os.path.dirname(plain.dir), f"tail{at}"))
        write_at(c.newest, at, rng.randbytes(min(64, size - at)))
        check(c, what=f"[garbage at {at} after the last record at {end}]")


@pytest.mark.parametrize("which", ["sealed", "newest", "first"])
@pytest.mark.parametrize("field", ["all", "magic", "base", "crc"])
def test_damaged_segment_header(plain, which, field):
    rng = random.Random(f"{SEED}-header-{which}-{field}")
    base, path = {"sealed": plain.sealed[3], "newest": plain.segs[-1], "first": plain.segs[0]}[which]
    at, data = {"all": (0, rng.randbytes(HDR)), "magic": (0, b"XOGQSEG\x00"),
                "base": (16, (base + 5).to_bytes(8, "little")),
                "crc": (28, b"\x00\x00\x00\x00")}[field]
    write_at(path, at, data)
    check(plain, what=f"[{field} of the {which} segment header damaged]")


def test_newest_segment_replaced_by_empty_file(plain):
    os.truncate(plain.newest, 0)
    check(plain, lost=set(range(plain.newest_base, N)), end={plain.newest_base, N},
          what="[newest segment emptied]")


@pytest.mark.parametrize("variant", ["plain", "indexed"])
def test_sealed_segment_deleted(pristine, tmp_path, variant):
    """A sealed segment in the middle vanishes: its records are lost (never
    made up from the neighbours' bytes), everything else is served."""
    c = Clone(pristine[variant], tmp_path / "q")
    base, path = c.sealed[3]
    gone = {o for o, _, _ in c.in_segment(path)}
    os.unlink(path)
    check(c, lost=gone, what=f"[sealed segment {base} deleted]")


# -- format versions -------------------------------------------------------------------
def test_unknown_version_in_meta(plain):
    meta = os.path.join(plain.dir, F.META_FILE)
    with open(meta) as f:
        text = f.read()
    with open(meta, "w") as f:
        f.write(text.replace("version 1\n", "version 42\n"))
    before = plain.snapshot()
    for _ in range(2):
        with pytest.raises(logq.FormatVersionError) as ei:
            logq.open(plain.dir)
        assert "42" in str(ei.value)
    assert plain.snapshot() == before, "a refused open changed the segments"
    with open(meta, "w") as f:
        f.write(text)
    check(plain, what="[meta version restored]")


@pytest.mark.parametrize("which", ["newest", "sealed"])
def test_unknown_version_in_segment_header(plain, which):
    base, path = plain.segs[-1] if which == "newest" else plain.sealed[2]
    with open(path, "rb") as f:
        original = f.read(HDR)
    write_at(path, 0, segment_header(base, version=7))
    before = plain.snapshot()
    with pytest.raises(logq.FormatVersionError) as ei:
        q = logq.open(plain.dir)
        try:
            for off in range(base, base + 3):    # a sealed one may be looked at when read
                q.read(off)
        finally:
            q.close()
    assert "7" in str(ei.value).replace(str(plain.dir), "")
    assert plain.snapshot() == before, "a refused segment was modified"
    write_at(path, 0, original)
    check(plain, what="[segment version restored]")


def test_segment_header_crc_helper_matches_logq():
    """The test's own header encoder agrees with logq's (else the version
    tests above would test a CRC mismatch instead)."""
    from logq._segment import encode_header
    assert segment_header(12345) == encode_header(12345)


# -- the index ----------------------------------------------------------------------
def index_file(c: Clone, name: str = "data.mdb") -> str:
    return os.path.join(c.dir, F.INDEX_DIR, name)


def test_delete_index_directory(indexed):
    shutil.rmtree(os.path.join(indexed.dir, F.INDEX_DIR))
    check(indexed, what="[index/ deleted]")
    assert os.path.exists(index_file(indexed)), "the index was not rebuilt"


def test_delete_lock_mdb(indexed):
    os.unlink(index_file(indexed, "lock.mdb"))
    check(indexed, what="[index/lock.mdb deleted]")


def run_checks_in_child(tmp_path, dirs: list[str], labels: list[str]) -> None:
    rc, out = run_child(CHECK_QUEUES, str(tmp_path / "child.out"), *[f"{d}:{N}:{TAG}" for d in dirs],
                        timeout=120)
    lines = out.splitlines()
    ok = {line.split(" ", 1)[1] for line in lines if line.startswith("ok ")}
    failed = [f"{labels[dirs.index(line[5:].split(':')[0])]}: {line.split(': ', 1)[1]}"
              for line in lines if line.startswith("fail ")]
    crashed = next((lab for d, lab in zip(dirs, labels) if d not in ok
                    and not any(line.startswith(f"fail {d}:") for line in lines)), None)
    assert rc == 0 and not failed, (
        f"reopening failed on {len(failed)} of {len(dirs)} damaged indexes"
        + (f"; the process died (exit {rc}) on {crashed}" if rc else "") + ":\n  "
        + "\n  ".join(failed) + ("\n" + out[-2000:] if rc else ""))
    assert len(ok) == len(dirs)


def test_truncated_data_mdb(pristine, tmp_path):
    rng = random.Random(f"{SEED}-mdb")
    size = os.path.getsize(os.path.join(pristine["indexed"], F.INDEX_DIR, "data.mdb"))
    sizes = sorted({0, 1, 100, 159, 160, 4095, 4096, 4097, 8191, 8192, 8193, size // 2,
                    size - 4096, size - 1} | {rng.randrange(size) for _ in range(6)})
    dirs = []
    for s in sizes:
        c = Clone(pristine["indexed"], tmp_path / f"q{s}")
        os.truncate(index_file(c), s)
        dirs.append(c.dir)
    run_checks_in_child(tmp_path, dirs, [f"data.mdb truncated to {s} bytes" for s in sizes])
    for s, d in zip(sizes, dirs):
        if s < 8192:        # not even the two meta pages: it must have been set aside
            kept = os.listdir(os.path.join(d, F.QUARANTINE_DIR))
            assert any(os.path.exists(os.path.join(d, F.QUARANTINE_DIR, k, "data.mdb")) for k in kept), (s, kept)


def test_garbage_in_data_mdb(pristine, tmp_path):
    rng = random.Random(f"{SEED}-mdbgarbage")
    size = os.path.getsize(os.path.join(pristine["indexed"], F.INDEX_DIR, "data.mdb"))
    cases = [(0, 4096), (4096, 4096), (0, 8192), (16, 8), (4096 + 16, 8)]    # meta pages
    cases += [(8192, size - 8192)] + [(at, 4096) for at in range(8192, size, 4096)]     # data pages
    dirs = []
    for k, (at, n) in enumerate(cases):
        c = Clone(pristine["indexed"], tmp_path / f"q{k}")
        write_at(index_file(c), at, rng.randbytes(n))
        dirs.append(c.dir)
    run_checks_in_child(tmp_path, dirs, [f"garbage over data.mdb[{at}:{at + n}]" for at, n in cases])
    for (at, n), d in zip(cases, dirs):
        if at < 8192:
            assert os.path.isdir(os.path.join(d, F.QUARANTINE_DIR)), f"broken meta page at {at} not quarantined"


# -- verify and repair after damage inside batches ---------------------------------------
#
# A closed queue of single puts and put_many batches of many sizes, damaged at
# hypothesis's choice of places (bytes overwritten, zeroed or flipped).  Every
# record was durable (a clean close checkpoints the whole log), so every batch
# was written whole: damage destroys exactly the records whose bytes it
# changed, wherever it falls inside a batch.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

MIXED_N = 240


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A closed queue of MIXED_N records: payload("m", offset), put alone or
    in batches of 2..40 (several segments; batches cross no segment)."""
    d = tmp_path_factory.mktemp("mixed") / "q"
    rng = random.Random(f"{SEED}-mixed")
    with logq.open(str(d), fsync="batch", segment_bytes=8192) as q:
        while q.next_offset < MIXED_N:
            at = q.next_offset
            k = min(MIXED_N - at, rng.choice([1, 1, 2, 3, 5, 8, 17, 40]))
            if k == 1:
                q.put(payload("m", at))
            else:
                q.put_many([payload("m", at + j) for j in range(k)])
    assert len(segments(str(d))) >= 3
    return d


damage = st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 300),
                            st.sampled_from(["zeros", "garbage", "flip"])), min_size=1, max_size=3)


def inflict(c: "Clone", damage, rng: random.Random) -> None:
    """Apply hypothesis-drawn damage (where, length, kind) to the data of
    c's segments: zeros, garbage or flipped bits, in place."""
    data_end = {path: max(e for o, (p, _, e) in c.records.items() if p == path) for _, path in c.segs}
    for where, length, kind in damage:
        _, path = c.segs[where % len(c.segs)]
        pos = HDR + where // len(c.segs) % (data_end[path] - HDR)
        with open(path, "r+b") as f:
            f.seek(pos)
            old = f.read(length)
            new = (bytes(len(old)) if kind == "zeros" else rng.randbytes(len(old)) if kind == "garbage"
                   else bytes(b ^ (1 << rng.randrange(8)) for b in old))
            f.seek(pos)
            f.write(new)


@settings(max_examples=int(30 * float(os.environ.get("LOGQ_TEST_SCALE", "1"))), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=damage, seed=st.integers(0, 2**32))
def test_verify_and_repair_damage_inside_batches(mixed, tmp_path_factory, damage, seed):
    """verify names exactly the damaged offsets; repair zeroes no intact
    record (every one keeps its bytes, at its position); verify is clean
    afterwards; every intact record is served at its offset, the damaged
    ones raise RecordLostError, and new puts follow the last intact record."""
    c = Clone(mixed, tmp_path_factory.mktemp("dmg") / "q", MIXED_N, "m")
    rng = random.Random(seed)
    before = c.snapshot()
    inflict(c, damage, rng)
    hit = changed_records(c, before)
    if not hit:
        return
    what = f"[damage {damage}: records {sorted(hit)}]"
    rep = logq.verify(c.dir)
    named = {o for d in rep.damage for o in range(d.first_offset, d.end_offset)}
    assert not rep.clean and named == hit, f"{what} verify names {sorted(named)}"
    damaged = c.snapshot()
    logq.repair(c.dir)
    for off, (path, pos, end) in c.records.items():
        if off not in hit:
            with open(path, "rb") as f:
                f.seek(pos)
                assert f.read(end - pos) == damaged[path][pos:end], f"{what} repair changed intact record {off}"
    after = logq.verify(c.dir)
    assert after.clean and after.torn_tail is None, f"{what} not clean after repair: {after.damage}"
    # Damage that reaches the end of the log leaves it ending before it.
    nxt = max(set(range(MIXED_N)) - hit) + 1
    with deadline(30, f"reading the repaired queue {what}"):
        with logq.open(c.dir, segment_bytes=8192) as q:
            assert q.next_offset == nxt, what
            assert [(o, p) for o, p in q.scan()] == [(o, c.items[o]) for o in range(nxt) if o not in hit], what
            for o in sorted(hit):
                if o < nxt:
                    with pytest.raises(logq.RecordLostError):
                        q.read(o)
            assert q.put_many([b"new-1", b"new-2"]) == range(nxt, nxt + 2)
            assert q.put(b"new-3") == nxt + 2
        assert logq.verify(c.dir).clean, what


# Above the durable checkpoint a batch counts only whole: a writer killed
# after putting more batches than it flushed, then damage anywhere.  Below
# the checkpoint damage loses the records it touched; above it, the whole
# batch of every record it touched.  verify, repair and recovery agree.
KILLED_LAYOUT = [1, 3, 1, 9, 2, 17, 1, 5, 30, 1, 4, 12, 1, 2, 25, 8, 1, 40, 6, 3]
KILLED_FLUSHED = 9          # batches below the checkpoint
KILLED_CHILD = """
import sys, logq
from helpers import payload
q = logq.open(sys.argv[1], fsync="never", segment_bytes=8192)
layout = [int(x) for x in sys.argv[2].split(",")]
for k, n in enumerate(layout):
    at = q.next_offset
    if n == 1:
        q.put(payload("k", at))
    else:
        q.put_many([payload("k", at + j) for j in range(n)])
    if k + 1 == int(sys.argv[3]):
        q.flush()
print("written", flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A queue whose writer was SIGKILLed: KILLED_LAYOUT's batches, the first
    KILLED_FLUSHED of them below the durable checkpoint."""
    from helpers import Child, checkpoint, children, wait_for
    root = tmp_path_factory.mktemp("killed")
    d = root / "q"
    with children() as kids:
        kid = Child(KILLED_CHILD, str(root / "out"), str(d), ",".join(map(str, KILLED_LAYOUT)),
                    KILLED_FLUSHED)
        kids.append(kid)
        wait_for(lambda: "written" in kid.output() or not kid.alive(), 30, "the writer")
        assert kid.alive(), kid.output()
        kid.kill()
        kid.wait(30)
    assert checkpoint(str(d))[2] == sum(KILLED_LAYOUT[:KILLED_FLUSHED])
    assert len(segments(str(d))) >= 3
    return d


@settings(max_examples=int(30 * float(os.environ.get("LOGQ_TEST_SCALE", "1"))), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(damage=damage, seed=st.integers(0, 2**32))
def test_damage_above_the_checkpoint_takes_whole_batches(killed, tmp_path_factory, damage, seed):
    total = sum(KILLED_LAYOUT)
    durable = sum(KILLED_LAYOUT[:KILLED_FLUSHED])
    batch_of, at = {}, 0
    for n in KILLED_LAYOUT:
        for j in range(n):
            batch_of[at + j] = range(at, at + n)
        at += n
    c = Clone(killed, tmp_path_factory.mktemp("dmg") / "q", total, "k")
    rng = random.Random(seed)
    before = c.snapshot()
    inflict(c, damage, rng)
    hit = changed_records(c, before)
    lost = {o for o in hit if o < durable} | {b for o in hit if o >= durable for b in batch_of[o]}
    kept = set(range(total)) - lost
    nxt = max(kept) + 1 if kept else 0
    what = f"[damage {damage}: records {sorted(hit)}, lost {sorted(lost)}]"
    rep = logq.verify(c.dir)
    named = {o for d in rep.damage for o in range(d.first_offset, d.end_offset)}
    assert rep.next_offset == nxt, f"{what} verify says the log ends at {rep.next_offset}"
    assert named | set(range(nxt, total)) == lost | set(range(nxt, total)), f"{what} verify names {sorted(named)}"
    damaged = c.snapshot()
    logq.repair(c.dir)
    for off, (path, pos, end) in c.records.items():
        if off in kept:
            with open(path, "rb") as f:
                f.seek(pos)
                assert f.read(end - pos) == damaged[path][pos:end], f"{what} repair changed record {off}"
    assert logq.verify(c.dir).clean, what
    with deadline(30, f"reading the repaired queue {what}"):
        with logq.open(c.dir, segment_bytes=8192) as q:
            assert q.next_offset == nxt, what
            assert [(o, p) for o, p in q.scan()] == [(o, c.items[o]) for o in sorted(kept)], what
            assert q.put_many([b"new-1", b"new-2"]) == range(nxt, nxt + 2)
        assert logq.verify(c.dir).clean, what

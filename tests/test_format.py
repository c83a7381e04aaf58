"""The on-disk format across versions: queues written in segment format 1
(by an older logq: batches without a count) open and read as before, and
new records never go into a version 1 segment; format 2 is what is written;
a version this logq does not know is refused by name.  The byte-level
golden examples of both record kinds are in test_codec.py."""

from __future__ import annotations

import os
import struct
import uuid

import lmdb

import pytest

import logq
from helpers import payload, segment_header, segments, write_at
from logq import _codec_py as P
from logq import _format as F

TS = 1_700_000_000_000_000_000


def v1_segment(base: int, batches: list[list[bytes]], size: int = 8192) -> bytes:
    """A version 1 segment, as an older logq wrote it: each batch's head
    plain, the rest CONT, no count anywhere."""
    buf = bytearray(size)
    buf[:F.SEGMENT_HEADER_SIZE] = segment_header(base, version=1)
    pos, off = F.SEGMENT_HEADER_SIZE, base
    for batch in batches:
        for i, p in enumerate(batch):
            flags = F.RECORD_MARK | (F.FLAG_CONT if i else 0)
            pos = P.encode(buf, pos, size, off, TS, p, 0, flags)
            assert pos > 0
            off += 1
    return bytes(buf)


def v1_queue(qdir, segs: list[tuple[int, list[list[bytes]]]]) -> None:
    os.makedirs(qdir)
    with open(os.path.join(qdir, F.META_FILE), "w") as f:
        f.write(f"{F.META_MAGIC}\nversion 1\nid {uuid.uuid4().hex}\n")
    for base, batches in segs:
        with open(os.path.join(qdir, F.segment_name(base)), "wb") as f:
            f.write(v1_segment(base, batches))


def version_of(path: str) -> int:
    with open(path, "rb") as f:
        return F.SEGMENT_HEADER.unpack_from(f.read(F.SEGMENT_HEADER_SIZE))[1]


def items(tag: str, n: int) -> list[bytes]:
    return [payload(tag, i) for i in range(n)]


def test_a_version_1_queue_reads_and_new_records_go_to_a_version_2_segment(tmp_path):
    qdir = str(tmp_path / "q")
    old = items("old", 30)
    v1_queue(qdir, [(0, [old[:1], old[1:10]]), (10, [old[10:25], old[25:26], old[26:30]])])
    with logq.open(qdir) as q:                   # no index yet: rebuilt from the v1 log
        assert [p for _, p in q.scan()] == old
        assert q.next_offset == 30
        new = q.put_many(items("new", 5))
        assert new == range(30, 35)
        assert q.put(b"one") == 35
    (b0, p0), (b1, p1), (b2, p2) = segments(qdir)
    assert (b0, b1, b2) == (0, 10, 30)
    assert version_of(p0) == version_of(p1) == 1 and version_of(p2) == F.FORMAT_VERSION == 2
    with logq.open(qdir) as q:
        assert [p for _, p in q.scan()] == old + items("new", 5) + [b"one"]
    assert logq.verify(qdir).clean


def test_an_empty_active_version_1_segment_is_rewritten_as_version_2(tmp_path):
    qdir = str(tmp_path / "q")
    old = items("old", 4)
    v1_queue(qdir, [(0, [old]), (4, [])])
    with logq.open(qdir) as q:
        assert q.put_many(items("new", 3)) == range(4, 7)
    assert [b for b, _ in segments(qdir)] == [0, 4]
    assert version_of(segments(qdir)[1][1]) == 2
    with logq.open(qdir) as q:
        assert [p for _, p in q.scan()] == old + items("new", 3)


def test_a_version_1_batch_is_judged_as_before(tmp_path):
    """Version 1 heads carry no count: after a crash, a head and the CONT
    records that follow it intact are kept (what version 1 promised)."""
    qdir = str(tmp_path / "q")
    old = items("old", 12)
    v1_queue(qdir, [(0, [old[:2], old[2:12]])])
    path = segments(qdir)[0][1]
    with open(path, "rb") as f:
        data = f.read()
    seventh = data.find(old[7]) - F.RECORD_HEADER_SIZE
    write_at(path, seventh, bytes(len(data.rstrip(b"\0")) - seventh))
    with logq.open(qdir) as q:
        assert [p for _, p in q.scan()] == old[:7]


def test_unknown_segment_version_is_refused_by_name(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put_many([b"a", b"b"])
    path = segments(qdir)[0][1]
    write_at(path, 0, segment_header(0, version=3))
    with pytest.raises(logq.FormatVersionError, match="version 3"):
        logq.open(qdir)
    with pytest.raises(logq.FormatVersionError, match="version 3"):
        logq.verify(qdir)


def test_a_count_that_is_not_met_in_a_durable_batch_loses_only_the_damage(tmp_path):
    """Below the durable checkpoint the count is not a verdict: a batch was
    written whole there, and damage to one of its records loses that one."""
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put_many(items("b", 40))
    path = segments(qdir)[0][1]
    with open(path, "rb") as f:
        data = f.read()
    at = data.find(payload("b", 20))
    write_at(path, at + 3, b"\xff\xff")
    with logq.open(qdir) as q:
        assert [o for o, _ in q.scan()] == [o for o in range(40) if o != 20]
        assert q.next_offset == 40
    rep = logq.verify(qdir)
    assert [(d.first_offset, d.end_offset) for d in rep.damage] == [(20, 21)]


def test_a_hostile_count_never_crashes_recovery(tmp_path):
    """Counts of 0, 1 and far past the segment, with valid CRCs, after an
    unclean shutdown: recovery keeps what is whole and does not hang."""
    for count in (0, 1, 3, 1 << 31):
        qdir = str(tmp_path / f"q{count}")
        with logq.open(qdir) as q:
            q.put(b"first")
        base, path = segments(qdir)[0]
        buf = bytearray(200)
        end = P._put(buf, 0, 1, TS, b"x", 0, F.RECORD_MARK | F.FLAG_BATCH, struct.pack("<I", count))
        end = P._put(buf, end, 2, TS, b"y", 0, F.RECORD_MARK | F.FLAG_CONT, b"")
        with open(path, "rb") as f:
            tail = len(f.read().rstrip(b"\0"))
        write_at(path, tail, bytes(buf[:end]))
        os.truncate(os.path.join(qdir, "control"), 0)
        env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), max_dbs=16)
        with env.begin(write=True) as t:      # the shutdown was not clean
            t.put(b"clean", b"0", db=env.open_db(b"main", txn=t))
        env.close()
        with logq.open(qdir) as q:
            got = [o for o, _ in q.scan()]
            # a count the records after it cannot meet is a torn batch; a
            # count of 0 or 1 asks for nothing more
            assert got == ([0] if count > 2 else [0, 1, 2]), (count, got)

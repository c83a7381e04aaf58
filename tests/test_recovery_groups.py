"""Recovery that cuts the log back below what a consumer group had
acknowledged clamps the group's watermark (the first u64 of its value in the
index's ``groups`` database), so messages put afterwards are delivered, not
hidden as already acknowledged."""

from __future__ import annotations

import os
import struct

import lmdb

import logq
from helpers import segment_records, segments, write_at

from logq import _format as F


def _groups(qdir: str) -> dict[bytes, bytes]:
    env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), max_dbs=16)
    try:
        with env.begin() as txn:
            return dict(txn.cursor(db=env.open_db(b"groups", txn=txn)))
    finally:
        env.close()


def test_group_watermark_clamped_after_the_tail_is_cut(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir, fsync="never", segment_bytes=1 << 20) as q:
        for i in range(100):
            q.put(b"m%d" % i)
    # A group acknowledged everything below 100; another only below 40.
    env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), max_dbs=16)
    with env.begin(write=True) as txn:
        groups = env.open_db(b"groups", txn=txn)
        txn.put(b"ahead", struct.pack("<Q", 100) + b"group-owned", db=groups)
        txn.put(b"behind", struct.pack("<Q", 40) + b"rest", db=groups)
        main = env.open_db(b"main", txn=txn)
        # a power cut: unclean, the last durable checkpoint at the start
        txn.put(b"clean", b"0", db=main)
        txn.put(b"checkpoint", struct.pack("<QQQ", 0, F.SEGMENT_HEADER_SIZE, 0), db=main)
    env.close()
    base, path = segments(qdir)[-1]
    recs = segment_records(path, base)
    pos, last_end = recs[70][1], recs[-1][2]            # records 70.. never reached the disk
    write_at(path, pos, bytes(last_end - pos))
    with logq.open(qdir) as q:
        assert q.next_offset == 70
        assert q.put(b"new") == 70
    g = _groups(qdir)
    assert g[b"ahead"] == struct.pack("<Q", 70) + b"group-owned"
    assert g[b"behind"] == struct.pack("<Q", 40) + b"rest"


# -- every kind of state a group can hold past the cut --------------------------------
# Each leaves the group in a different place when the queue closes: a scan
# cursor past the tail (fetched, not acked), claims (leased), sparse acks,
# a moved watermark, a delayed redelivery, per-priority cursors.  After the
# cut, the records put at the reused offsets must reach every group.
def _fetch_only(c: logq.Consumer) -> None:
    c.get_many(100, timeout=1)


def _ack_odd(c: logq.Consumer) -> None:
    c.ack_many([m for m in c.get_many(100, timeout=1) if m.offset % 2])
    c.commit()


def _ack_all(c: logq.Consumer) -> None:
    c.ack_many(c.get_many(100, timeout=1))
    c.commit()


def _nack_later(c: logq.Consumer) -> None:
    for m in c.get_many(100, timeout=1):
        c.nack(m, delay=3600)
    c.commit()


def _nothing(c: logq.Consumer) -> None:
    pass


GROUP_STATES = {"fetched": _fetch_only, "acked-odd": _ack_odd, "acked-all": _ack_all,
                "nacked-later": _nack_later, "created": _nothing}


import pytest  # noqa: E402


@pytest.mark.parametrize("priorities", [False, True])
@pytest.mark.parametrize("cut", ["truncate", "zero"])
def test_every_group_receives_the_records_that_reuse_cut_offsets(tmp_path, cut, priorities):
    qdir = str(tmp_path / "q")
    n = 20
    with logq.open(qdir, fsync="batch", segment_bytes=1 << 16) as q:
        for i in range(n):
            q.put(b"old-%d" % i, priority=(i % 3) if priorities else 0)
        for name, act in GROUP_STATES.items():
            act(q.consumer(name))
    base, path = segments(qdir)[-1]
    recs = segment_records(path, base)
    keep = 12                                   # offsets 12.. are lost
    if cut == "truncate":
        os.truncate(path, recs[keep][1] + 3)
    else:
        write_at(path, recs[keep][1], bytes(recs[-1][2] - recs[keep][1]))
    with logq.open(qdir, fsync="batch") as q:
        assert q.next_offset == keep
        # Enough to pass where the old tail was: a stale cursor below the
        # new tail is not caught by anything but the clamp.
        new = [q.put(b"new-%d" % i) for i in range(n - keep + 3)]
        assert new == list(range(keep, n + 3))
        for name in GROUP_STATES:
            c = q.consumer(name)
            got = {}
            while True:
                ms = c.get_many(100, timeout=0.3)
                if not ms:
                    break
                got.update((m.offset, bytes(m.data)) for m in ms)
                c.ack_many(ms)
            for i, off in enumerate(new):
                assert got.get(off) == b"new-%d" % i, (name, sorted(got.items()))
            assert all(v.startswith(b"old-") for o, v in got.items() if o < keep), (name, got)

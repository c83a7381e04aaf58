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

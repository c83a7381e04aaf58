"""Forgetting finished workflows: their graph records and durable records
stay in the index until purged (the tasks' own outcomes expire with their
``result_ttl``)."""

from __future__ import annotations

import json
import time
from typing import Any

from logq.workflows._joins import _U32, _k, _prefix_items


def purge(app: Any, older_than: float = 0.0, limit: int = 10_000) -> int:
    """Delete the records of up to ``limit`` finished workflows created
    (graphs: every task ended) or finished (durable workflows) more than
    ``older_than`` seconds ago, in one index transaction; how many.  Their
    tasks' outcomes are the tasks layer's (``App.purge``, ``result_ttl``).
    A graph purged no longer has a tree to show; a durable workflow's id
    can be started again."""
    from logq.workflows._plugin import flows_of, joins_of
    j, f = joins_of(app), flows_of(app)
    cutoff = time.time() - older_than

    def fn(txn: Any) -> int:
        n = 0
        for key, raw in list(_prefix_items(txn, j.db, b"M")):
            if n >= limit:
                return n
            wid = key[1:].decode()
            meta = json.loads(raw)
            left = txn.get(_k(b"C", wid), db=j.db)
            if meta.get("created", 0) > cutoff or (left is not None and _U32.unpack(left)[0] > 0):
                continue
            for lk, tid in list(_prefix_items(txn, j.db, _k(b"L", wid) + b"\0")):
                t = tid.decode()
                for kind in (b"N", b"W"):
                    txn.delete(_k(kind, t), db=j.db)
                for ik, _v in list(_prefix_items(txn, j.db, _k(b"I", t) + b"\0")):
                    txn.delete(ik, db=j.db)
                txn.delete(lk, db=j.db)
            txn.delete(_k(b"M", wid), db=j.db)
            txn.delete(_k(b"C", wid), db=j.db)
            n += 1
        for key, raw in list(_prefix_items(txn, f.db, b"F")):
            if n >= limit:
                return n
            wid = key[1:].decode()
            rec = json.loads(raw)
            if rec.get("state") not in ("succeeded", "failed", "cancelled") or \
                    (rec.get("finished") or 0) > cutoff:
                continue
            for kind in (b"S", b"E"):
                for k2, _v in list(_prefix_items(txn, f.db, kind + wid.encode() + b"\0")):
                    txn.delete(k2, db=f.db)
            for kind in (b"F", b"A", b"R"):
                txn.delete(kind + wid.encode(), db=f.db)
            n += 1
        return n
    return int(j.idx.write(fn))

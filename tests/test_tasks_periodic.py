"""Periodic tasks end to end (logq.tasks._periodic): competing schedulers
in real processes, SIGKILLed and restarted, fire each slot exactly once;
the catch-up modes after downtime; a claim left pending by a process that
died (before or after its put) is finished exactly once.  The app is
tests/periodic_app.py.  What is counted is the queue's records (a slot is
submitted once; running it is at least once, as for every task)."""

from __future__ import annotations

import struct
import time
from collections import Counter
from datetime import timedelta

import pytest

import helpers
import periodic_app
from logq.tasks import App
from logq.tasks._cron import parse_slot_key, slot_key
from logq.tasks._periodic import Scheduler

CHILD_POOL = ("import sys, periodic_app; periodic_app.app.path = sys.argv[1]; "
              "periodic_app.app.pool('periodic_app:app', workers=1).run()")


@pytest.fixture
def app(tmp_path):
    a = periodic_app.app
    a.close()
    a.path = str(tmp_path / "q")
    yield a
    a.close()


def submitted(app: App) -> list[tuple[str, float]]:
    """(name, slot epoch seconds) of every record put with a slot key."""
    q = app.queue
    out = []
    off, end = q.first_offset, q.next_offset
    from logq import _format as F
    while off < end:
        first, _p, _ts, attrs, metas = q._fetch(off, end - off, False)
        for i, a in enumerate(attrs):
            if a & 0xFFFF and metas and i in metas:
                _due, key = F.decode_meta(a >> 24, metas[i])
                if key and key.startswith(b"periodic:"):
                    name, slot = parse_slot_key(key.decode())
                    out.append((name, slot.timestamp()))
        off = first + len(attrs)
    return out


def test_competing_schedulers_and_a_restart_fire_each_slot_once(app, tmp_path) -> None:
    app.queue       # (the directory exists before the children open it)

    def ticks() -> list[float]:
        return [s for name, s in submitted(app) if name == "tick"]
    with helpers.children() as kids:
        a = helpers.Child(CHILD_POOL, str(tmp_path / "a.log"), app.path)
        b = helpers.Child(CHILD_POOL, str(tmp_path / "b.log"), app.path)
        kids += [a, b]
        try:
            helpers.wait_for(lambda: len(ticks()) >= 5, 60, "two schedulers to fire a few slots")
        except helpers.Hang as e:
            raise helpers.Hang(f"{e}; fired {ticks()}\na:\n{a.output()}\nb:\n{b.output()}") from None
        a.kill()                                    # mid-run: maybe holding a claim
        a.wait(30)
        time.sleep(0.5)
        c = helpers.Child(CHILD_POOL, str(tmp_path / "c.log"), app.path)   # a restart
        kids.append(c)
        n = len(ticks())
        helpers.wait_for(lambda: len(ticks()) >= n + 8, 60, "the schedulers to go on")
        b.kill()
        b.wait(30)
        time.sleep(0.6)                             # c alone for a while
        c.kill()
        c.wait(30)
    fired = ticks()
    counts = Counter(fired)
    assert [s for s, k in counts.items() if k > 1] == []          # no slot twice
    # catch_up="all" and always a scheduler (or a catch-up): no slot skipped
    steps = [round((y - x) / 0.2) for x, y in zip(fired, fired[1:])]
    assert fired == sorted(fired) and set(steps) == {1}, steps
    assert len(fired) >= 13


def test_catch_up_modes(app) -> None:
    t0 = float(int(time.time()) - 100)        # a whole second: a slot of every 1 s schedule
    s = Scheduler(app)
    try:
        s.tick(t0 + 0.05)                     # on time (grace 0.1 s): each fires t0
        s.tick(t0 + 5.5)                      # 0.5 s late: t0+1..t0+5 all missed
        s.tick(t0 + 6.05)                     # on time again
        s.tick(t0 + 6.07)                     # nothing new
    finally:
        s.close()
    s2 = Scheduler(app)                       # a restart: the last slot is durable
    try:
        s2.tick(t0 + 6.09)
    finally:
        s2.close()
    got: dict[str, list[float]] = {}
    for name, slot in submitted(app):
        got.setdefault(name, []).append(slot - t0)
    assert got["c_all"] == [0, 1, 2, 3, 4, 5, 6]
    assert got["c_latest"] == [0, 5, 6]
    assert got["c_none"] == [0, 6]


def _pending(app: App, name: str, slot: float, at: int) -> None:
    """Leave the claim of a process that died before marking it done."""
    idx = app._store().idx
    db = idx.open_db(b"tasks.periodic")
    ns = int(slot * 1e9)
    dead_owner = 0x7FFF_FFFF_FFFF_0001        # no such file in owners/: dead
    idx.write(lambda t: t.put(name.encode(), struct.pack(">qqQQq", ns, ns, dead_owner, at,
                                                         time.time_ns()), db=db))


def test_a_dead_claimers_slot_is_submitted_once(app) -> None:
    now = time.time()
    slot = float(int(now) - 1)
    # Died after claiming, before its put: the slot is submitted now.
    _pending(app, "c_all", slot, app.queue.next_offset)
    # Died after its put, before marking it done: nothing more is submitted.
    periodic_app.c_latest.apply_async(args=(slot,), key=slot_key("c_latest", slot))
    _pending(app, "c_latest", slot, 0)
    s = Scheduler(app)
    try:
        s.tick(slot + 0.05)
        s.tick(slot + 0.06)
    finally:
        s.close()
    got = Counter((n, t) for n, t in submitted(app) if n in ("c_all", "c_latest"))
    assert got == {("c_all", slot): 1, ("c_latest", slot): 1}


def test_periodic_validation(tmp_path) -> None:
    a = App(str(tmp_path / "q"))
    with pytest.raises(ValueError, match="cron"):
        a.periodic("61 * * * *")
    with pytest.raises(ValueError, match="exactly one"):
        a.periodic("* * * * *", every=timedelta(seconds=1))
    with pytest.raises(ValueError, match="catch_up"):
        a.periodic(every=timedelta(seconds=1), catch_up="some")
    with pytest.raises(TypeError, match="at most one"):
        a.periodic(every=timedelta(seconds=1), name="two")(lambda x, y: None)
    with pytest.raises(ValueError, match="@"):
        a.periodic(every=timedelta(seconds=1), name="a@b")(lambda: None)
    assert a._periodic == {} and a._tasks == {}
    a.close()

"""Durable workflows through simulated power cuts (issue 13: "a durable
timer survives restarts and power cuts"; "every workflow finishes with each
step's side effect recorded exactly once per completed step").

The power cut is the queue's model (test_powercut.py), applied to a pool
running durable workflows on a queue with ``fsync="always"``: the pool and
its workers are SIGKILLed at a random moment (every process holding the
queue is gone before anything is touched), then what was not promised
durable is damaged by hand: the bytes of the newest segment after the
durable end (the control block's synced offset, or the index's checkpoint
if further) become zeros, garbage or a torn record; the control block
becomes garbage or empty (so the next open sees a reboot, and drops the
unsynced lease table, which is also cut to nothing at times).  The LMDB
index is fsynced per commit and kept as it is: what it holds is what was
durable.  Several rounds: a new pool, new workflows, another cut; then a
last pool lets every workflow finish.

Each step's side effect is a line "wid tag pid ns" appended to
``<queue>.effects`` (the outside world: no cut touches it).  Asserted:
every workflow whose ``start`` returned finishes with its results; a step
whose record the index held at a cut never runs again after it; a step
ran only after the records of the steps before it (with ``checkpoint="step"``)
or of the sleep before it (``"run"``) were durable; a sleep's record durable at a
cut keeps its wake-up time, and no step after a sleep ran before the sleep's
duration had passed since the step before it.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter, defaultdict

import lmdb

import helpers
from logq import _format as F
from logq.tasks import App
from logq.workflows import workflow
from logq.workflows._flows import _U32, _unpack_step

app = App(os.environ.get("LOGQ_WF_PC_DIR", "/nonexistent"), fsync="always")
SLEEP = 0.3
NAP = 0.02
ROUNDS = 3
TAGS = {"a": 0, "b": 2, "c": 3}     # step number of each effect (1 is the sleep)


def effect(wid: str, tag: str) -> str:
    time.sleep(NAP)
    with open(app.path + ".effects", "a") as f:
        f.write(f"{wid} {tag} {os.getpid()} {time.time_ns()}\n")
    return tag


def _flow(ctx):
    a = ctx.step(effect, ctx.id, "a")
    ctx.sleep(SLEEP)
    return [a, ctx.step(effect, ctx.id, "b"), ctx.step(effect, ctx.id, "c")]


@workflow(app, name="pc_step")
def pc_step(ctx):
    return _flow(ctx)


@workflow(app, name="pc_run", checkpoint="run")
def pc_run(ctx):
    return _flow(ctx)


POOL = ("import sys, test_workflows_powercut as P; P.app.path = sys.argv[1]; "
        "P.app.pool('test_workflows_powercut:app', workers=2, backoff_base=0.02, backoff_max=0.05).run()")


def effects(qdir: str) -> list[tuple[str, str, int, int]]:
    """Whole lines only (a worker killed mid-write leaves a partial one)."""
    try:
        with open(qdir + ".effects") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split("\n")[:-1]
    return [(w, t, int(p), int(ns)) for w, t, p, ns in (ln.split(" ") for ln in lines)]


def holders(qdir: str) -> list[int]:
    """Processes with a file of ``qdir`` open."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(qdir + "/") for fd in fds):
                out.append(int(pid))
        except OSError:
            continue
    return out


def durable_steps(qdir: str) -> dict[str, dict[int, dict]]:
    """wid -> step number -> header, of the step records in the index."""
    env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), readonly=True, lock=False, max_dbs=64, subdir=True)
    out: dict[str, dict[int, dict]] = defaultdict(dict)
    try:
        db = env.open_db(b"wf.flow", create=False)
        with env.begin() as t:
            for k, v in t.cursor(db=db):
                if k[:1] == b"S":
                    out[k[1:-5].decode()][_U32.unpack(k[-4:])[0]] = _unpack_step(bytes(v))[0]
    finally:
        env.close()
    return out


def cut_power(qdir: str, rng: random.Random) -> str:
    """Damage what the queue had not promised durable; what was done."""
    base, path = helpers.segments(qdir)[-1]
    with open(os.path.join(qdir, "control"), "rb") as f:
        ctl = f.read()
    synced = int.from_bytes(ctl[F.CTL_SYNCED_NEXT:F.CTL_SYNCED_NEXT + 8], "little") if len(ctl) >= 96 else 0
    ck = helpers.checkpoint(qdir)
    promised = max(synced, ck[2] if ck else 0, base)
    recs = {o: end for o, _pos, end in helpers.segment_records(path, base)}
    cut = recs[promised - 1] if promised > base else F.SEGMENT_HEADER_SIZE
    assert promised == base or promised - 1 in recs, "a promised record is not on disk"
    size = os.path.getsize(path)
    pattern = rng.choice(["zeros", "garbage", "torn"])
    rest = size - cut
    if pattern == "zeros":
        new = bytes(rest)
    elif pattern == "garbage":
        new = rng.randbytes(min(rest, 1 << 16)) + bytes(max(0, rest - (1 << 16)))
    else:
        nxt = sorted(o for o in recs if o >= promised)
        keep = rng.randrange(8, 64) if nxt else 0
        new = (open(path, "rb").read()[cut:cut + keep] + bytes(rest))[:rest]
    with open(path, "r+b") as f:
        f.seek(cut)
        f.write(new)
    with open(os.path.join(qdir, "control"), "r+b") as f:
        if rng.random() < 0.5:
            f.write(rng.randbytes(len(ctl)))
        else:
            f.truncate(0)
    if rng.random() < 0.5:
        os.truncate(os.path.join(qdir, F.LEASES_DIR, "data.mdb"), 0)
    lost = max(recs, default=promised - 1) + 1 - promised
    return f"{pattern} after offset {promised} ({lost} unsynced records)"


def test_power_cuts_mid_workflows(tmp_path) -> None:
    rng = random.Random(f"{helpers.SEED}-wf-powercut")
    qdir = str(tmp_path / "q")
    app.close()
    app.path = qdir
    started: list = []
    cuts: list[tuple[int, dict, str]] = []     # (effects seen at the cut, durable steps, what)
    try:
        with helpers.children() as kids:
            for round_ in range(ROUNDS):
                started += [pc_step.start(), pc_run.start(), pc_step.start(), pc_run.start()]
                app.close()
                kid = helpers.Child(POOL, str(tmp_path / f"pool{round_}.log"), qdir)
                kids.append(kid)
                seen = len(effects(qdir))
                helpers.wait_for(lambda: len(effects(qdir)) > seen or not kid.alive(), 30, "a step to run")
                assert kid.alive(), kid.output()
                time.sleep(rng.uniform(0.02, 0.3))
                kid.kill()
                kid.wait(30)
                helpers.wait_for(lambda: not holders(qdir), 30, "every process of the pool to die")
                n = len(effects(qdir))
                what = cut_power(qdir, rng)
                cuts.append((n, durable_steps(qdir), what))
            kids.append(helpers.Child(POOL, str(tmp_path / "last.log"), qdir))
            for w in started:
                assert w.result(timeout=60) == ["a", "b", "c"], w.id
            app.close()
            final = durable_steps(qdir)
    finally:
        app.close()
    runs = effects(qdir)
    by_step: dict[tuple[str, int], list[int]] = defaultdict(list)   # (wid, step) -> line numbers
    for i, (wid, tag, _pid, _ns) in enumerate(runs):
        by_step[(wid, TAGS[tag])].append(i)
    for n, durable, what in cuts:
        for w in started:
            rec = durable.get(w.id, {})
            for k in TAGS.values():
                # A step whose record was durable at the cut never ran again.
                if k in rec:
                    again = [i for i in by_step[(w.id, k)] if i >= n]
                    assert not again, f"{w.id}: step {k} ran again after a cut ({what}) that kept its record"
                # A step ran only once what it depends on was durable.
                ran = any(i < n for i in by_step[(w.id, k)])
                # (checkpoint="step": every step before it; "run": the sleep,
                # always recorded in the index; the steps of a run are durable
                # with its settlement, and a run replayed after a cut passes
                # a sleep that ended meanwhile without parking)
                need = range(k) if w.id.startswith("pc_step") else [1] if k > 1 else []
                if ran:
                    missing = [j for j in need if j not in rec]
                    assert not missing, (f"{w.id}: step {k} ran before the cut ({what}) but steps "
                                         f"{missing} were not durable")
            # A durable sleep keeps its wake-up time.
            if 1 in rec:
                assert final[w.id][1]["until"] == rec[1]["until"], (w.id, what)
    for w in started:
        first = {t: min(ns for wid, tg, _p, ns in runs if wid == w.id and tg == t) for t in TAGS}
        assert first["b"] >= first["a"] + SLEEP * 1e9, f"{w.id}: the sleep was shortened"
        assert final[w.id][1]["until"] <= first["b"], f"{w.id}: a step after the sleep ran before its end"
        assert {k for k in final[w.id]} == {0, 1, 2, 3}, w.id
    counts = Counter((wid, tag) for wid, tag, _p, _ns in runs)
    assert all(counts[(w.id, t)] >= 1 for w in started for t in TAGS)
    print(json.dumps({"workflows": len(started), "effects": len(runs), "cuts": [c[2] for c in cuts],
                      "reruns": sum(c - 1 for c in counts.values())}))


def test_journal_torn_tail_and_rotation(tmp_path, monkeypatch) -> None:
    """The step journal of checkpoint="run" after a cut inside a write: the
    records before the torn one are found, the torn one and anything after
    it in that file are not (garbage is never returned as a step); a
    process's older files go when a new one starts, but only once none of
    their runs is current (a run that settles late keeps its records)."""
    from logq.workflows import _journal as J
    current: set[tuple[str, str]] = {("w1", "7-00000001"), ("w", "1-00000001")}

    def any_current(runs: set[tuple[str, str]]) -> bool:
        return bool(runs & current)
    j = J.Journal(str(tmp_path), any_current)
    for k in range(5):
        j.append("w1", "7-00000001", k, b"packed-%d" % k)
    j.append("w2", "8-00000002", 0, b"other")
    assert j.find("w1", "7-00000001") == {k: b"packed-%d" % k for k in range(5)}
    assert j.find("w1", "9-00000003") == {} and j.find("w", "7-00000001") == {}
    path = j.files[-1]
    size = os.path.getsize(path)
    rng = random.Random(helpers.SEED)
    last = 8 + len(b"w2\0" + b"8-00000002\0") + 4 + len(b"other")    # w2's record: head, ids, k, packed
    for cut in (size - 3, size - last - 10):   # inside w2's record, then inside step 4's
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.seek(cut)
            f.write(rng.randbytes(40))        # what the disk held past the cut
        got = j.find("w1", "7-00000001")
        assert all(got[k] == b"packed-%d" % k for k in got) and set(got) <= set(range(5))
        assert j.find("w2", "8-00000002") == {}
    assert set(j.find("w1", "7-00000001")) == {0, 1, 2, 3}
    monkeypatch.setattr(J, "ROTATE", 1)
    j2 = J.Journal(str(tmp_path / "r"), any_current)
    for k in range(4):      # a file per record: the run is current, all four stay
        j2.append("w", "1-00000001", k, b"x")
    assert len(os.listdir(j2.dir)) == 4 and j2.find("w", "1-00000001") == {k: b"x" for k in range(4)}
    current.discard(("w", "1-00000001"))        # its outcome committed
    j2.append("w", "2-00000002", 0, b"y")
    assert len(os.listdir(j2.dir)) == 2 and j2.find("w", "1-00000001") == {3: b"x"}
    # A dead process's file goes once none of its runs is current, not before.
    import subprocess
    gone = subprocess.Popen(["true"])
    gone.wait()
    os.rename(j.files[-1], os.path.join(j.dir, f"{gone.pid}-1.log"))
    j.sweep()
    assert set(j.find("w1", "7-00000001")) == {0, 1, 2, 3}
    current.clear()
    j.sweep()
    assert j.find("w1", "7-00000001") == {} and not os.path.exists(os.path.join(j.dir, f"{gone.pid}-1.log"))

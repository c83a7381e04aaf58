"""Retention killed at every step: deleting segments is the one place where
logq destroys records on purpose, so a death in the middle of it must not
destroy more than it was allowed to, nor leave a log with a hole.

A victim process puts into a queue of small segments, two consumer groups
ack and commit parts of it, and it goes on putting: each new segment lets
retention delete what both groups settled.  (``on_full="drop_oldest"``
is not hunted here: ``max_bytes`` must leave room for the index reserves,
a few MiB, which segments this small never fill.)  It SIGKILLs itself at event ``k``: just
before or after a write transaction of the index, or just before or after
a file deletion, for every ``k``.  A survivor that has the queue open
throughout then checks, and again after a reopen:

* the log is dense from its first offset to its end, with no loss counted,
  and every reported put at or above the first offset is there, intact;
* nothing a group has not settled is gone: the first offset is at most
  the lowest watermark;
* each group then gets every record at or above its watermark and the
  first offset that it did not commit an ack of, and none it did;
* ``verify`` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import logq
from helpers import SEED, Victim, around_writes, child_env, identity, kill_at_event, payload

SEGMENT = 4096
OPTIONS = dict(visibility_timeout=300.0, commit_interval=3600.0, prefetch=16)


def _queue_options(variant: str, base: int = 0) -> dict:
    return dict(segment_bytes=SEGMENT, preallocate_bytes=SEGMENT)


def _victim(qdir: str, variant: str, base: int, kill_at: int, report_fd: int) -> None:
    event = kill_at_event(kill_at)
    unlink = os.unlink

    def counted_unlink(path, *a, **k):
        event()
        out = unlink(path, *a, **k)
        event()
        return out

    def say(line: str) -> None:
        os.write(report_fd, (line + "\n").encode())

    q = logq.open(qdir, **_queue_options(variant, base))
    c1, c2 = q.consumer("g1", **OPTIONS), q.consumer("g2", **OPTIONS)
    around_writes(event)
    os.unlink = counted_unlink
    i = 0
    for r in range(6):
        offs = list(q.put_many([payload("p", i + j) for j in range(12)]))
        say("P " + " ".join(f"{o}:{i + j}" for j, o in enumerate(offs)))
        i += 12
        for c, name, n in ((c1, "g1", 10), (c2, "g2", 4 + 2 * r)):
            ms = c.get_many(n, timeout=0)
            c.ack_many(ms)
            say(f"A {name} " + " ".join(str(m.offset) for m in ms))
            c.commit()
            say(f"C {name}")
    say(f"events {event.count}")
    os._exit(0)


def _round(root: str, variant: str, kill_at: int) -> dict:
    qdir = os.path.join(root, f"q-{variant}-{kill_at}")
    with logq.open(qdir, segment_bytes=SEGMENT) as q:
        for g in ("g1", "g2"):
            q.consumer(g, **OPTIONS).close()
        base = q.stats()["disk_bytes"]
    victim = Victim(_victim, qdir, variant, base, kill_at)
    out: dict = {"k": kill_at}
    with logq.open(qdir, **_queue_options(variant, base)) as q:
        victim.go()
        out["killed"], text = victim.finish()
        puts: dict[int, int] = {}
        committed: dict[str, set[int]] = {"g1": set(), "g2": set()}
        pending: dict[str, set[int]] = {}
        for ln in text.splitlines():
            f = ln.split()
            if f[0] == "P":
                puts.update((int(a), int(b)) for a, b in (x.split(":") for x in f[1:]))
            elif f[0] == "A":
                pending[f[1]] = {int(x) for x in f[2:]}
            elif f[0] == "C":
                committed[f[1]] |= pending.pop(f[1], set())
            elif f[0] == "events":
                out["events"] = int(f[1])
        problems = _check(q, variant, puts, committed, pending)
        st = q.stats()
        out["first"], out["dropped"] = st["first_offset"], sum(g["dropped"] for g in st["groups"].values())
    if not problems:
        rep = logq.verify(qdir)
        if not rep.clean or rep.torn_tail is not None:
            problems.append(f"verify: {rep.as_dict()}")
        with logq.open(qdir, segment_bytes=SEGMENT) as q:
            problems += [f"after a reopen: {p}" for p in _check(q, variant, puts, committed, pending)]
            problems += _drain(q, puts, committed, pending)
    out["problems"] = problems
    return out


def _check(q: logq.Queue, variant: str, puts: dict[int, int], committed: dict[str, set[int]],
           pending: dict[str, set[int]]) -> list[str]:
    problems = []
    st = q.stats()
    first, nxt = st["first_offset"], st["next_offset"]
    seen = dict(q.scan())
    if sorted(seen) != list(range(first, nxt)) or st["lost_records"]:
        problems.append(f"the log [{first}, {nxt}) has holes: {sorted(set(range(first, nxt)) - set(seen))[:10]}, "
                        f"lost_records {st['lost_records']}")
    for o, i in puts.items():
        if o >= first and (o not in seen or identity(seen[o]) != ("p", i)):
            problems.append(f"reported put {i} at offset {o} is not there")
    marks = {g: st["groups"][g]["watermark"] for g in ("g1", "g2")}
    if variant == "settled" and first > min(marks.values()):
        problems.append(f"retention deleted below a watermark: first offset {first}, watermarks {marks}")
    return problems


def _drain(q: logq.Queue, puts: dict[int, int], committed: dict[str, set[int]],
           pending: dict[str, set[int]]) -> list[str]:
    problems = []
    first = q.first_offset
    for g in ("g1", "g2"):
        mark = q.stats()["groups"][g]["watermark"]
        got = set()
        with q.consumer(g, **OPTIONS) as c:
            while True:
                ms = c.get_many(100, timeout=0)
                if not ms:
                    break
                got.update(m.offset for m in ms)
                c.ack_many(ms)
            c.commit()
        again = sorted(got & committed[g])
        if again:
            problems.append(f"group {g} got committed offsets again: {again}")
        want = {o for o in puts if o >= max(first, mark)} - committed[g] - pending.get(g, set())
        if want - got:
            problems.append(f"group {g} never got {sorted(want - got)[:10]} (watermark {mark}, first {first})")
    return problems


ROUNDS = 16        # kill points per variant, at most (spread, from a start the seed picks)


def driver(root: str, variant: str, seed: str) -> None:
    dry = _round(root, variant, 0)
    print(json.dumps(dry), flush=True)
    n = dry.get("events") or 0
    stride = max(1, -(-n // ROUNDS))
    for k in range(1 + int(seed) % stride, n + 1, stride):
        print(json.dumps(_round(root, variant, k)), flush=True)


import pytest  # noqa: E402


@pytest.mark.parametrize("variant", ["settled"])
def test_retention_killed_at_every_step(tmp_path, variant):
    proc = subprocess.run([sys.executable, "-c", "import sys, test_retention_kill_points as t; t.driver(*sys.argv[1:])",
                           str(tmp_path), variant, str(SEED)], env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [json.loads(ln) for ln in proc.stdout.splitlines()]
    dry, kills = rounds[0], rounds[1:]
    assert not dry["problems"] and dry["events"] and dry["first"] > 0, dry
    assert all(r["killed"] for r in kills), [r["k"] for r in kills if not r["killed"]]
    bad = [r for r in kills if r["problems"]]
    assert not bad, "\n".join(f"killed at event {r['k']}: {r['problems']}" for r in bad)

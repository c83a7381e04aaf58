"""A consumer killed at every point where it writes state.

A consumer's state lives in two LMDB environments: the lease table (claims,
given back, reaped) and the index (acks and nacks, committed).  A victim
process runs a fixed script of get, get_many, take, ack, ack_many, nack and
commit, and SIGKILLs itself just before, or just after, its ``k``-th write
transaction, for every ``k``.  A survivor then drains the group.  Nothing may
be lost and nothing settled may come back:

* an offset whose ack the victim saw committed (``commit()`` returned) is
  never delivered to the survivor;
* every other offset is delivered to the survivor, intact, once (it acks
  as it goes), except those the victim was committing when killed, which
  may go either way;
* afterwards the group's backlog is empty.

The survivor opens the queue before the victim does and keeps it open, so
the victim's leases are released by its death while the queue is in use
(the live path), then reopens it.
"""

from __future__ import annotations

import json
import os
import time

import logq
from helpers import Victim, around_writes, identity, kill_at_event, payload

N = 40
OPTIONS = dict(visibility_timeout=300.0, max_attempts=1000, backoff_base=0.001, backoff_max=0.001, commit_interval=3600.0,
               prefetch=4)


def _victim(qdir: str, kill_at: int, report_fd: int) -> None:
    """In a forked child: run the script, reporting ``A offsets`` before a
    commit and ``C`` once it returned; SIGKILL this process at event
    ``kill_at`` (2w - 1: before write transaction w, 2w: after it; never
    if 0).  Reports the number of events at the end."""
    event = kill_at_event(kill_at)

    def say(line: str) -> None:
        os.write(report_fd, (line + "\n").encode())

    q = logq.open(qdir)
    c = q.consumer("g", **OPTIONS)
    around_writes(event)

    def commit(offsets: list[int]) -> None:
        say("A " + " ".join(map(str, offsets)))
        c.commit()
        say("C")

    ms = c.get_many(7, timeout=5)
    c.ack_many(ms[:3])
    commit([m.offset for m in ms[:3]])
    c.nack(ms[3], delay=0)
    m = c.get(timeout=5)
    c.ack(m)
    commit([m.offset])
    ms = c.get_many(5, timeout=5)
    c.ack_many(ms)
    commit([m.offset for m in ms])
    got = [c.get(timeout=5) for _ in range(4)]
    for m in got:
        c.ack(m)
    commit([m.offset for m in got])
    b = c.take(6, timeout=5)
    c.ack(b)
    commit(list(b.offsets))
    c.close()
    q.close()
    say(f"events {event.count}")
    os._exit(0)


def _round(root: str, kill_at: int) -> dict:
    qdir = os.path.join(root, f"q{kill_at}")
    victim = Victim(_victim, qdir, kill_at)
    out: dict = {"k": kill_at}
    problems: list[str] = []
    with logq.open(qdir) as q:
        q.put_many([payload("m", i) for i in range(N)])
        q.consumer("g", **OPTIONS).close()
        victim.go()
        out["killed"], text = victim.finish()
        committed, maybe, pending = set(), set(), None
        for ln in text.splitlines():
            if ln.startswith("A"):
                pending = {int(x) for x in ln.split()[1:]}
            elif ln == "C":
                committed |= pending or set()
                pending = None
            elif ln.startswith("events"):
                out["events"] = int(ln.split()[1])
        maybe = pending or set()
        seen: dict[int, int] = {}
        with q.consumer("g", **OPTIONS) as c:
            until = time.monotonic() + 20
            while q.stats()["groups"]["g"]["backlog"] and time.monotonic() < until:
                ms = c.get_many(50, timeout=0.05)
                for m in ms:
                    seen[m.offset] = seen.get(m.offset, 0) + 1
                    if identity(m.data) != ("m", m.offset):
                        problems.append(f"offset {m.offset} delivered with foreign or damaged data")
                c.ack_many(ms)
                c.commit()
        again = sorted(o for o in seen if o in committed)
        if again:
            problems.append(f"committed offsets delivered again: {again}")
        lost = sorted(set(range(N)) - committed - maybe - set(seen))
        if lost:
            problems.append(f"offsets never delivered to the survivor and never committed: {lost}")
        twice = sorted(o for o, n in seen.items() if n > 1)
        if twice:
            problems.append(f"delivered twice to the survivor, which acked each at once: {twice}")
        backlog = q.stats()["groups"]["g"]["backlog"]
        if backlog:
            problems.append(f"backlog {backlog} after the drain")
    with logq.open(qdir) as q, q.consumer("g", **OPTIONS) as c:
        if c.get_many(10, timeout=0):
            problems.append("messages came back after a reopen")
    out["problems"] = problems
    return out


def driver(root: str) -> None:
    dry = _round(root, 0)
    print(json.dumps(dry), flush=True)
    for k in range(1, 2 * ((dry.get("events") or 0) // 2) + 1):
        print(json.dumps(_round(root, k)), flush=True)


def test_consumer_killed_before_and_after_every_write_transaction(tmp_path):
    import subprocess
    import sys
    from helpers import child_env
    proc = subprocess.run([sys.executable, "-c", "import sys, test_consumer_kill_points as t; t.driver(sys.argv[1])",
                           str(tmp_path)], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [json.loads(ln) for ln in proc.stdout.splitlines()]
    dry, kills = rounds[0], rounds[1:]
    assert not dry["problems"] and dry["events"] and dry["events"] >= 10, dry
    assert all(r["killed"] for r in kills), [r["k"] for r in kills if not r["killed"]]
    bad = [r for r in kills if r["problems"]]
    assert not bad, "\n".join(f"killed at event {r['k']}: {r['problems']}" for r in bad)

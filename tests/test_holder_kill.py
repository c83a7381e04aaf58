"""A producer killed at every store it makes to the control block, and
after every record it writes.

The control block is the shared memory through which the processes that
have a queue open hand the append lock, the published tail (segment base,
position, next offset) and the group commit to one another.  A process can
die between any two of its stores there: a SIGKILL in the middle of
publishing its tail leaves words from before and after side by side.  The
next appender must still find the true end of the log: keep every whole
record, give a reported put's offset to nobody else, and hand out offsets
densely after them.

This test does not wait for a lucky kill.  A victim process (pure codec, so
that its stores go through Python and can be counted; the on-disk format
and the repair are the same for both codecs) counts its stores to the
control block and its record writes (a batch writes its head last), and
SIGKILLs itself at event ``k``, for every ``k`` of a fixed sequence of
puts, batches and a segment roll, under ``"never"`` and ``"always"``.  A
survivor that has the queue open throughout then appends, or (every other
round) only closes, the last process out: no appender repairs what the
victim left, the close must, or the shutdown is not clean.  The log
is checked record by record, ``verify`` must find it clean, and again
after a reopen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import logq
from helpers import SEED, Victim, child_env, identity, kill_at_event, payload

SEGMENT = 4096
FILL = 30          # survivor records before the victim starts: the roll comes during its puts
# The victim's work: put (p) or put_many (m, with its size).
SCRIPT = [("p", 1), ("p", 1), ("m", 3), ("p", 1), ("p", 1), ("m", 4), ("p", 1), ("m", 2), ("p", 1),
          ("p", 1), ("m", 3), ("p", 1)]


def _victim(qdir: str, fsync: str, kill_at: int, report_fd: int) -> None:
    """In a forked child: open the queue, run SCRIPT reporting each returned
    offset, and SIGKILL this process at event ``kill_at`` (a control-block
    store or a record written; never, if 0).  Reports the number of events
    at the end."""
    from logq import _codec_py, _log
    counted = kill_at_event(kill_at)

    write = _codec_py._put

    def write_counted(*args):
        out = write(*args)
        counted()       # after the record's bytes: a kill leaves it whole, the batch perhaps not
        return out

    class Words:
        """The writer's view of the control block, counting its stores."""

        def __init__(self, mv):
            self.mv = mv

        def __getitem__(self, i):
            return self.mv[i]

        def __setitem__(self, i, v):
            counted()
            self.mv[i] = v

        def release(self):
            self.mv.release()

    attach = _codec_py.Writer.attach

    def attach_counted(self, seg, ctl):
        attach(self, seg, ctl)
        if self._words is not None:
            self._words = Words(self._words)

    ctl_set = _log.Log.ctl_set

    def ctl_set_counted(self, at, value):
        counted()
        ctl_set(self, at, value)

    _codec_py.Writer.attach = attach_counted
    _codec_py._put = write_counted
    _log.Log.ctl_set = ctl_set_counted
    q = logq.open(qdir, segment_bytes=SEGMENT, fsync=fsync)
    counted.count = 0   # count from the first put on
    i = 0
    for op, n in SCRIPT:
        items = [payload("v", i + j) for j in range(n)]
        offs = [q.put(items[0])] if op == "p" else list(q.put_many(items))
        os.write(report_fd, "".join(f"{o} v {i + j}\n" for j, o in enumerate(offs)).encode())
        i += n
    os.write(report_fd, f"stores {counted.count}\n".encode())
    os._exit(0)


def _round(root: str, fsync: str, kill_at: int, append: bool = True) -> dict:
    """One victim killed at event ``kill_at``; the survivor's findings (it
    appends after the death, or only closes)."""
    qdir = os.path.join(root, f"q-{fsync}-{kill_at}")
    victim = Victim(_victim, qdir, fsync, kill_at)
    out: dict = {"k": kill_at}
    with logq.open(qdir, segment_bytes=SEGMENT, fsync=fsync) as q:
        mine = {o: payload("s", i) for i, o in enumerate(q.put_many([payload("s", i) for i in range(FILL)]))}
        victim.go()         # the survivor has the queue open
        out["killed"], text = victim.finish()
        lines = [ln.split() for ln in text.splitlines()]
        out["stores"] = next((int(ln[1]) for ln in lines if ln[0] == "stores"), None)
        reported = {int(o): payload(t, int(i)) for o, t, i in (ln for ln in lines if len(ln) == 3)}
        if append:
            for i in range(FILL, FILL + 3):    # the next appender repairs and goes on
                mine[q.put(payload("s", i))] = payload("s", i)
        problems = _check(q, mine, reported)
    if not problems:
        rep = logq.verify(qdir)
        if not rep.clean or rep.torn_tail is not None:
            problems.append(f"verify after a clean close: {rep.as_dict()}")
        with logq.open(qdir, segment_bytes=SEGMENT) as q:
            problems += [f"after reopening: {p}" for p in _check(q, mine, reported)]
    out["problems"] = problems
    return out


def _check(q: logq.Queue, mine: dict[int, bytes], reported: dict[int, bytes]) -> list[str]:
    """Every reported record at its offset, offsets dense, nothing twice, and
    of the victim's unreported puts only whole batches of its sequence."""
    first, nxt = q.first_offset, q.next_offset
    seen = dict(q.scan())
    problems = []
    if sorted(seen) != list(range(first, nxt)):
        problems.append(f"scan is not dense over [{first}, {nxt}): missing "
                        f"{sorted(set(range(first, nxt)) - set(seen))[:10]}")
    for o, p in {**reported, **mine}.items():
        if seen.get(o) != p:
            problems.append(f"reported record {identity(p)} at offset {o} holds "
                            f"{identity(seen[o]) if o in seen else 'nothing'}")
    ids = [identity(p) for p in seen.values()]
    if len(set(ids)) != len(ids):
        problems.append("a record is stored twice")
    victim = sorted(i for t, i in ids if t == "v")
    if victim != list(range(len(victim))):
        problems.append(f"the victim's records are not its first puts in order: {victim}")
    return problems


ROUNDS = 40        # kill points per policy, at most (each round is a fork and two opens)


def driver(root: str, fsync: str, seed: str) -> None:
    """A dry round, then the kill points, until a victim finishes before
    its store: every one, or every ``stride``-th from a seed's start where
    the dry round made more than ROUNDS stores.  One JSON line per round.
    (How many stores the script takes varies: a wait for the append lock
    or for another process's fdatasync stores on each turn.)"""
    dry = _round(root, fsync, 0)
    print(json.dumps(dry), flush=True)
    stride = max(1, -(-(dry["stores"] or 0) // ROUNDS))
    k = 1 + int(seed) % stride
    for i in range(2 * ROUNDS):
        r = _round(root, fsync, k, append=i % 2 == 0)
        print(json.dumps(r), flush=True)
        if not r["killed"]:
            break
        k += stride


@pytest.mark.parametrize("fsync", ["never", "always"])
def test_producer_killed_at_every_store_and_record_write(tmp_path, fsync):
    # The driver runs on the pure codec (its stores are counted in Python),
    # in a process of its own: it forks the victims.
    proc = subprocess.run([sys.executable, "-c", "import sys, test_holder_kill as t; t.driver(*sys.argv[1:])",
                           str(tmp_path), fsync, str(SEED)], env=child_env(LOGQ_PURE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [json.loads(ln) for ln in proc.stdout.splitlines()]
    dry, kills = rounds[0], rounds[1:]
    assert not dry["problems"] and dry["stores"] and dry["stores"] > 2 * len(SCRIPT), dry
    assert all(r["killed"] for r in kills[:-1]) and len(kills) > len(SCRIPT), kills
    last = kills[-1]
    assert last["killed"] or last["stores"] < last["k"], last
    bad = [r for r in kills if r["problems"]]
    assert not bad, "\n".join(f"killed at store {r['k']}: {r['problems']}" for r in bad)

"""Consumer groups across real processes and real SIGKILLs: a consumer
killed at random moments, rounds after rounds, never gets a message it
reported committed again and in the end acks every message; consumers in
several processes compete for one group and no message goes to two of
them while its lease holds; the leases of a dead process are released at
once, those of a live one when they run out (not before, and not while
extended); two groups in two processes each see every message once.

The children run the ``*_main`` functions below (``python -c "import
test_consumer_crash as T; T.crash_consumer_main(...)"``: the tests
directory is on their PYTHONPATH, see helpers.child_env).  They write what
they did to files, one line per event with ``os.write`` (a SIGKILL keeps
the page cache: a line written is a line the parent reads; a last line
without its newline was cut and is ignored).  Times are ``time.monotonic()``,
CLOCK_MONOTONIC, the same clock in every process (and the one lease
deadlines are kept in).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest

import helpers
import logq
from helpers import (PRODUCER, SEED, Child, build_queue, children, count_lines, deadline, identity,
                     read_report, wait_for)

GROUP = "g"
LONG = 300.0        # a visibility timeout no test waits out

CRASH_CONSUMER = "import test_consumer_crash as T, sys; T.crash_consumer_main(sys.argv[1])"
COMPETE = "import test_consumer_crash as T, sys; T.compete_main(sys.argv[1])"
HOLDER = "import test_consumer_crash as T, sys; T.holder_main(sys.argv[1])"
WAITER = "import test_consumer_crash as T, sys; T.waiter_main(sys.argv[1])"


# -- reading the children's files ----------------------------------------------
def lines(path: str) -> list[list[str]]:
    """The finished lines of ``path``, split into fields (a last line
    without its newline was cut by the kill: ignored)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [line.decode().split() for line in data.split(b"\n")[:-1]]


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: dict) -> None:
    """Atomically (the parent waits for the file to exist)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".tmp", path)


def _append(fd: int, text: str, sync: bool = False) -> None:
    os.write(fd, text.encode())
    if sync:
        os.fsync(fd)


def _watermark(q: logq.Queue, group: str) -> int:
    return q.stats()["groups"].get(group, {}).get("watermark", 0)


# -- 1. a consumer SIGKILLed at random moments, round after round -------------------
N_CRASH = 3000
KILL_ROUNDS = 8
IDLE_GIVE_UP = 5.0      # a dead consumer's messages come back at once: nothing for this long is a loss


def crash_consumer_main(config_json: str) -> None:
    """Child entry: consume group "g" of a queue of ``payload("c", i)`` at
    offset i, in batches of random sizes (get() now and then, which
    prefetches), checking every payload, acking every message, and calling
    commit() every few batches.

    Files (one line per event, numbered by ``seq``, one counter for both, so
    the two files order against each other):

    * ``deliveries``: ``seq offset attempt`` for every message delivered,
      written before it is processed;
    * ``commits``: ``seq offset...``: the offsets acked since the previous
      commit, written (and fsynced) only after commit() returned.

    Once a get finds nothing and the group's watermark is at ``total`` (or
    nothing came for IDLE_GIVE_UP seconds: lost messages), it closes and
    writes the ``done`` file.

    config: dir, round, seed, total, deliveries, commits, done,
    commit_interval (small: the commit timer races the explicit commits),
    kill_after_reports (SIGKILL itself right after that many reports)."""
    cfg = json.loads(config_json)
    rng = random.Random(f"{cfg['seed']}-consumer-{cfg['round']}")
    q = logq.open(cfg["dir"], segment_bytes=4096)
    c = q.consumer(GROUP, visibility_timeout=LONG, max_attempts=1000, commit_every=1 << 30,
                   commit_interval=cfg["commit_interval"])
    dfd = os.open(cfg["deliveries"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    cfd = os.open(cfg["commits"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seq = reports = 0
    acked: list[int] = []
    idle_since = None

    def commit() -> None:
        nonlocal seq, reports
        c.commit()
        if acked:
            seq += 1
            _append(cfd, f"{seq} {' '.join(map(str, acked))}\n", sync=True)
            acked.clear()
            reports += 1
            if reports == cfg.get("kill_after_reports"):
                os.kill(os.getpid(), signal.SIGKILL)    # right after a report: the sharpest moment

    while True:
        n = rng.choice([1, 1, 2, 5, 16, 50, 128])
        if n == 1 and rng.random() < 0.5:
            try:
                ms = [c.get(timeout=0.3)]
            except logq.Empty:
                ms = []
        else:
            ms = c.get_many(n, timeout=0.3)
        if not ms:
            commit()
            st = q.stats()["groups"][GROUP]
            if st["watermark"] >= cfg["total"] and st["backlog"] == 0:
                break
            if idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_GIVE_UP:
                break       # messages neither delivered nor acked: the parent reports them
            continue
        idle_since = None
        text = []
        for m in ms:
            seq += 1
            text.append(f"{seq} {m.offset} {m.attempt}\n")
        _append(dfd, "".join(text))
        for m in ms:                                 # "processing"
            assert identity(m.data) == ("c", m.offset), f"offset {m.offset} has another payload"
        time.sleep(rng.random() * 0.003)
        if rng.random() < 0.2:
            for m in ms:
                c.ack(m)
        else:
            c.ack_many(ms)
        acked += [m.offset for m in ms]
        if rng.random() < 0.35:
            commit()
    c.close()
    q.close()
    open(cfg["done"], "w").close()


def test_sigkilled_consumer_never_gets_a_committed_message_again(tmp_path):
    """A child consumes group "g" and reports what commit() made durable;
    it is SIGKILLed eight times, a new child started each time, and the last
    one drains the queue.  Kills: by the parent at a random moment while the
    child consumes, or during its start-up (opening, reaping the previous
    one's leases); or by the child itself right after a report (the moment
    everything reported must already be durable).  In half the rounds the
    commit timer (commit_interval=0.02) races the explicit commits.

    * an offset reported committed (round r, event seq s) is never delivered
      to the group again: not later in round r, not in any later round;
    * within a round (one process, long leases) no offset is delivered twice;
    * each offset's attempts increase from delivery to delivery, and
      redeliveries (attempt > 1) happened: what a killed child had out and
      had not committed came back;
    * every message was delivered with its payload intact (the children
      check identity()), and in the end all are acked: watermark == N,
      nothing in flight, scheduled or dead-lettered, nothing left to get."""
    qdir = str(tmp_path / "q")
    build_queue(qdir, N_CRASH, "c")
    rng = random.Random(f"{SEED}-consumer-crash")
    rounds: list[tuple[str, str]] = []
    done = str(tmp_path / "done")
    killed_with_deliveries = 0
    startup = 0.0           # the longest a child took from its start to its first delivery
    for r in range(KILL_ROUNDS + 1):
        dpath, cpath = str(tmp_path / f"deliveries-{r}"), str(tmp_path / f"commits-{r}")
        rounds.append((dpath, cpath))
        cfg = {"dir": qdir, "round": r, "seed": SEED, "total": N_CRASH, "deliveries": dpath,
               "commits": cpath, "done": done,
               # the commit timer racing the explicit commits, or out of the way
               "commit_interval": 0.02 if r % 4 >= 2 else 3600.0}
        if r % 4 == 3:
            cfg["kill_after_reports"] = rng.randint(2, 8)
        with children() as kids:
            kid = Child(CRASH_CONSUMER, str(tmp_path / f"out-{r}"), json.dumps(cfg))
            kids.append(kid)
            if r == KILL_ROUNDS:                     # the last one drains the queue
                rc = kid.wait(60)
                assert rc == 0, f"the last consumer failed ({rc}):\n{kid.output()}"
                break
            if r % 4 == 1:
                # anywhere from interpreter start-up through opening and reaping to
                # the first deliveries
                time.sleep(rng.uniform(0.0, 1.2 * startup))
            elif r % 4 == 3:
                # it kills itself as soon as commit() returned and it reported
                rc = kid.wait(60)
                if rc == 0 and os.path.exists(done):
                    break                            # it drained the queue first
                assert rc == -signal.SIGKILL, f"consumer {r} exited with {rc}:\n{kid.output()}"
                killed_with_deliveries += 1
                continue
            else:
                target = rng.randint(30, 300)
                t0 = time.monotonic()
                wait_for(lambda: count_lines(dpath) > 0 or not kid.alive(), 30,
                         f"consumer {r} to start")
                startup = max(startup, time.monotonic() - t0)
                wait_for(lambda: count_lines(dpath) >= target or not kid.alive(), 30,
                         f"consumer {r} to get {target} messages")
                time.sleep(rng.uniform(0.0, 0.02))
            if not kid.alive():                      # it drained the queue already
                rc = kid.wait(30)
                assert rc == 0, f"consumer {r} failed ({rc}):\n{kid.output()}"
                break
            kid.kill()
            rc = kid.wait(30)
            assert rc == -signal.SIGKILL, f"consumer {r} exited with {rc}:\n{kid.output()}"
            killed_with_deliveries += count_lines(dpath) > 0
    assert os.path.exists(done), "no consumer finished draining the queue"
    assert killed_with_deliveries >= KILL_ROUNDS // 2, "the kills did not land while consuming"

    # -- the children's reports, in event order: (round, seq)
    deliveries: dict[int, list[tuple[tuple[int, int], int]]] = {}   # offset -> [((r, seq), attempt)]
    committed_at: dict[int, tuple[int, int]] = {}                   # offset -> first (r, seq) reported
    n_commits = 0
    for r, (dpath, cpath) in enumerate(rounds):
        in_round: set[int] = set()
        for seq, off, attempt in lines(dpath):
            off = int(off)
            assert off not in in_round, f"offset {off} delivered twice to consumer {r} (lease held)"
            in_round.add(off)
            deliveries.setdefault(off, []).append(((r, int(seq)), int(attempt)))
        for seq, *offs in lines(cpath):
            n_commits += 1
            for off in map(int, offs):
                committed_at.setdefault(off, (r, int(seq)))
    assert n_commits > KILL_ROUNDS, "too few commits reported: the test lost its point"

    assert sorted(deliveries) == list(range(N_CRASH)), (
        f"offsets never delivered: {sorted(set(range(N_CRASH)) - set(deliveries))[:20]}")
    for off, at in committed_at.items():
        again = [(when, a) for when, a in deliveries[off] if when > at]
        assert not again, (f"offset {off} was reported committed in round {at[0]} (event {at[1]}) "
                           f"and delivered again after that (round, event), attempt: {again}")
    redelivered = 0
    for off, ds in deliveries.items():
        attempts = [a for _, a in ds]
        assert attempts == sorted(set(attempts)) and attempts[0] >= 1, (
            f"offset {off}: attempts do not increase from delivery to delivery: {ds}")
        redelivered += attempts[-1] > 1
    assert redelivered > 0, "no message a killed consumer held came back (attempt > 1)"
    assert any(len(ds) > 1 for ds in deliveries.values()), "no offset was delivered in two rounds"

    with logq.open(qdir, segment_bytes=4096) as q:
        st = q.stats()["groups"][GROUP]
        assert (st["dead_lettered"], st["dead_letters"]) == (0, 0), st
        assert st["watermark"] == N_CRASH and st["backlog"] == 0, (
            f"not every message was acked: {st['backlog']} lost (neither delivered again nor "
            f"acked for {IDLE_GIVE_UP:g}s), the first at or after offset {st['watermark']}: {st}")
        assert (st["in_flight"], st["scheduled"]) == (0, 0), st
        assert st["acked"] >= N_CRASH and st["redelivered"] > 0, st
        c = q.consumer(GROUP, visibility_timeout=LONG)
        assert c.get_many(100, timeout=0.5) == [], "an acked and committed message came back"
        c.close()


# -- 2 and 5. consumers in several processes, one group or several ---------------------
def compete_main(config_json: str) -> None:
    """Child entry: consume ``group`` until its watermark reaches ``total``;
    for every message check the payload, ack it, and log
    ``offset attempt tag i pid t_get t_ack`` (t_get when the get returned,
    t_ack when the ack did); commit every few batches and when idle.

    config: dir, group, log, total, ready, go, seed, mode ("get": single
    gets, with prefetch, or "get_many"), batch."""
    cfg = json.loads(config_json)
    rng = random.Random(f"{cfg['seed']}-compete-{cfg['log']}")
    q = logq.open(cfg["dir"], segment_bytes=4096)
    c = q.consumer(cfg["group"], visibility_timeout=LONG, max_attempts=1000)
    fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pid = os.getpid()
    helpers._wait_go(cfg)
    batches = 0
    while True:
        if cfg["mode"] == "get":
            try:
                ms = [c.get(timeout=0.2)]
            except logq.Empty:
                ms = []
        else:
            ms = c.get_many(rng.randint(1, cfg["batch"]), timeout=0.2)
        t_get = time.monotonic()
        if not ms:
            c.commit()
            if _watermark(q, cfg["group"]) >= cfg["total"]:
                break
            continue
        keys = [identity(m.data) for m in ms]
        c.ack_many(ms)
        t_ack = time.monotonic()
        _append(fd, "".join(f"{m.offset} {m.attempt} {tag} {i} {pid} {t_get:.6f} {t_ack:.6f}\n"
                            for m, (tag, i) in zip(ms, keys)))
        batches += 1
        if batches % 5 == 0:
            c.commit()
    c.close()
    q.close()


def run_consumers(tmp_path, qdir: str, groups: list[str], modes: list[str], total: int,
                  produce: int) -> tuple[list[str], list[tuple[int, str, int]]]:
    """Start one compete_main child per entry of ``groups``/``modes``, then
    (once they are ready) a producer putting ``produce`` payloads ("p", i)
    while they consume; wait for all.  The consumers' logs and the
    producer's report."""
    go = str(tmp_path / "go")
    logs = [str(tmp_path / f"log-{k}") for k in range(len(groups))]
    report = str(tmp_path / "report-p")
    with children() as kids:
        for k, (group, mode) in enumerate(zip(groups, modes)):
            cfg = {"dir": qdir, "group": group, "log": logs[k], "total": total,
                   "ready": str(tmp_path / f"ready-{k}"), "go": go, "seed": SEED, "mode": mode,
                   "batch": [7, 40, 100][k % 3]}
            kids.append(Child(COMPETE, str(tmp_path / f"out-{k}"), json.dumps(cfg)))
        ready = [str(tmp_path / f"ready-{k}") for k in range(len(groups))]
        wait_for(lambda: all(map(os.path.exists, ready)) or not all(k.alive() for k in kids), 60,
                 "the consumers to open the queue")
        producer = Child(PRODUCER, str(tmp_path / "out-p"), json.dumps(
            {"dir": qdir, "tag": "p", "report": report, "fsync": "batch", "max_puts": produce,
             "stop_file": str(tmp_path / "no-stop"), "pause": 0.0003}))
        kids.append(producer)
        open(go, "w").close()
        assert producer.wait(60) == 0, f"the producer failed:\n{producer.output()}"
        for k in kids:
            assert k.wait(60) == 0, f"consumer {k.pid} failed:\n{k.output()}"
    return logs, read_report(report)


def expected_identities(n_pre: int, reported: list[tuple[int, str, int]]) -> dict[int, tuple[str, int]]:
    want = {o: ("pre", o) for o in range(n_pre)}
    want.update({o: (tag, i) for o, tag, i in reported})
    return want


def test_competing_consumers_in_three_processes(tmp_path):
    """Three processes consume one group at once (one with single gets and
    prefetch, two with get_many of different sizes) while a fourth puts:
    every message is processed exactly once, by one of them, with its
    payload; no offset goes to two consumers (the lease is exclusive while
    it holds: visibility_timeout is long, so nothing is redelivered); all
    three had a share; the group ends fully acked."""
    n_pre, produce = 4000, 2000
    total = n_pre + produce
    qdir = str(tmp_path / "q")
    build_queue(qdir, n_pre, "pre")
    logs, reported = run_consumers(tmp_path, qdir, [GROUP] * 3, ["get", "get_many", "get_many"],
                                   total, produce)
    assert len(reported) == produce
    want = expected_identities(n_pre, reported)
    assert sorted(want) == list(range(total))

    got: dict[int, list[tuple]] = {}
    per_consumer = []
    for k, path in enumerate(logs):
        ls = lines(path)
        per_consumer.append(len(ls))
        for off, attempt, tag, i, pid, t_get, t_ack in ls:
            got.setdefault(int(off), []).append((k, int(pid), int(attempt), (tag, int(i)),
                                                 float(t_get), float(t_ack)))
    twice = {off: ds for off, ds in got.items() if len(ds) > 1}
    assert not twice, ("offsets delivered to two consumers (consumer, pid, attempt, identity, "
                       f"t_get, t_ack): {dict(list(twice.items())[:5])}")
    assert sorted(got) == list(range(total)), (
        f"messages never processed: {sorted(set(range(total)) - set(got))[:20]}")
    for off, [(k, pid, attempt, key, t_get, t_ack)] in got.items():
        assert key == want[off], f"offset {off} delivered with payload {key}, put as {want[off]}"
        assert attempt == 1, f"offset {off} redelivered (attempt {attempt}) with a long lease"
        assert t_get <= t_ack
    assert all(per_consumer), f"a consumer got no message at all: {per_consumer}"
    with logq.open(qdir, segment_bytes=4096) as q:
        st = q.stats()["groups"][GROUP]
        assert st["watermark"] == total, st
        assert (st["backlog"], st["in_flight"], st["scheduled"], st["redelivered"]) == (0, 0, 0, 0), st
        assert st["acked"] == total, st


def test_two_groups_in_two_processes_each_see_every_message(tmp_path):
    """Fan-out: groups "a" and "b", each consumed by its own process while a
    producer puts; each sees every message exactly once, at attempt 1, intact."""
    n_pre, produce = 1500, 1000
    total = n_pre + produce
    qdir = str(tmp_path / "q")
    build_queue(qdir, n_pre, "pre")
    logs, reported = run_consumers(tmp_path, qdir, ["a", "b"], ["get_many", "get"], total, produce)
    want = expected_identities(n_pre, reported)
    assert sorted(want) == list(range(total))
    for group, path in zip(["a", "b"], logs):
        ls = lines(path)
        offs = [int(x[0]) for x in ls]
        assert sorted(offs) == list(range(total)), (
            f"group {group}: missing {sorted(set(range(total)) - set(offs))[:20]}, "
            f"{len(offs) - len(set(offs))} delivered twice")
        for off, attempt, tag, i, *_ in ls:
            assert (tag, int(i)) == want[int(off)] and attempt == "1", (group, off, attempt, tag, i)
    with logq.open(qdir, segment_bytes=4096) as q:
        groups = q.stats()["groups"]
        for group in "ab":
            st = groups[group]
            assert st["watermark"] == total and st["acked"] == total, (group, st)
            assert (st["backlog"], st["in_flight"], st["redelivered"]) == (0, 0, 0), (group, st)


# -- 3 and 4. leases: of a dead process, of a live one --------------------------------
def holder_main(config_json: str) -> None:
    """Child entry: get up to ``n`` messages of group "g" with
    ``visibility_timeout`` (and ``extend`` the lease of each by that many
    seconds when given), report, then stay alive, holding them, until
    killed.

    The report (JSON): t0 (monotonic time before the get: every lease
    deadline is after t0 + visibility_timeout), offsets, attempts,
    t_ext0/t_ext1 (before/after the extend calls)."""
    cfg = json.loads(config_json)
    q = logq.open(cfg["dir"], segment_bytes=4096)
    c = q.consumer(GROUP, visibility_timeout=cfg["visibility_timeout"], backoff_base=0.05,
                   backoff_max=0.05, max_attempts=cfg.get("max_attempts", 5))
    t0 = time.monotonic()
    ms = c.get_many(cfg["n"], timeout=None)
    rep = {"t0": t0, "offsets": [m.offset for m in ms], "attempts": [m.attempt for m in ms]}
    for m in ms:
        identity(m.data)
    if cfg.get("extend"):
        rep["t_ext0"] = time.monotonic()
        for m in ms:
            c.extend(m, cfg["extend"])
        rep["t_ext1"] = time.monotonic()
    write_json(cfg["report"], rep)
    while True:
        time.sleep(1)


def waiter_main(config_json: str) -> None:
    """Child entry: take what group "g" has to give right now (ack and
    commit it), report ``ready`` with those offsets, then block in
    get_many(timeout=None) and log ``offset attempt t_get`` for every
    message until ``expect`` more came; ack, commit, close."""
    cfg = json.loads(config_json)
    q = logq.open(cfg["dir"], segment_bytes=4096)
    c = q.consumer(GROUP, visibility_timeout=LONG)
    first = c.get_many(1000, timeout=0)
    c.ack_many(first)
    c.commit()
    assert c.get_many(1000, timeout=0.2) == [], "more messages than the holder left"
    write_json(cfg["ready"], {"offsets": [m.offset for m in first]})
    fd = os.open(cfg["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    n = 0
    while n < cfg["expect"]:
        ms = c.get_many(1000, timeout=None)
        t = time.monotonic()
        for m in ms:
            identity(m.data)
        _append(fd, "".join(f"{m.offset} {m.attempt} {t:.6f}\n" for m in ms))
        c.ack_many(ms)
        n += len(ms)
    c.commit()
    c.close()
    q.close()


# The spec: a dead process's leases are released at once, not at expiry
# (visibility_timeout is LONG).  Typically well under a second; the bound
# is loose so that a loaded machine (CI runs two suites at once) cannot
# fail it, and still ten times shorter than the lease.
RELEASE_WITHIN = LONG / 10


@pytest.mark.parametrize("waiter", ["parent", "process"])
def test_dead_process_leases_are_released_at_once(tmp_path, waiter):
    """Child A takes 25 of 40 messages with visibility_timeout=300 and is
    SIGKILLed without acking.  While A lives, the other consumer (the parent,
    or another process blocked in get_many) gets only the other 15; once A
    is dead it gets A's 25, with attempt 2, at once after the kill
    (not after 300)."""
    qdir = str(tmp_path / "q")
    n = 40
    build_queue(qdir, n, "d")
    report = str(tmp_path / "report")
    with children() as kids:
        holder = Child(HOLDER, str(tmp_path / "out-a"), json.dumps(
            {"dir": qdir, "n": 25, "visibility_timeout": LONG, "report": report}))
        kids.append(holder)
        wait_for(lambda: os.path.exists(report) or not holder.alive(), 30, "A to get its messages")
        assert holder.alive(), holder.output()
        held = read_json(report)["offsets"]
        assert held and read_json(report)["attempts"] == [1] * len(held)
        rest = sorted(set(range(n)) - set(held))

        if waiter == "parent":
            with logq.open(qdir, segment_bytes=4096) as q:
                c = q.consumer(GROUP, visibility_timeout=LONG)
                first = c.get_many(100, timeout=0)
                assert sorted(m.offset for m in first) == rest, "A's leases were not exclusive"
                c.ack_many(first)
                c.commit()
                assert c.get_many(100, timeout=0.3) == [], "A's leases were not exclusive"
                t_kill = time.monotonic()
                holder.kill()
                got = []
                with deadline(30, "getting A's messages back"):
                    while len(got) < len(held):
                        ms = c.get_many(100, timeout=None)
                        t = time.monotonic()
                        got += [(m.offset, m.attempt, t) for m in ms]
                        assert all(identity(m.data) == ("d", m.offset) for m in ms)
                        c.ack_many(ms)
                c.close()
        else:
            ready, log = str(tmp_path / "ready-b"), str(tmp_path / "log-b")
            b = Child(WAITER, str(tmp_path / "out-b"), json.dumps(
                {"dir": qdir, "ready": ready, "log": log, "expect": len(held)}))
            kids.append(b)
            wait_for(lambda: os.path.exists(ready) or not b.alive(), 30, "B to start")
            assert b.alive(), b.output()
            assert sorted(read_json(ready)["offsets"]) == rest, "A's leases were not exclusive"
            time.sleep(0.3)             # B is blocked in get_many now
            assert count_lines(log) == 0, f"B got messages A holds: {lines(log)}"
            t_kill = time.monotonic()
            holder.kill()
            assert b.wait(30) == 0, f"B failed:\n{b.output()}"
            got = [(int(o), int(a), float(t)) for o, a, t in lines(log)]
        assert holder.wait(30) == -signal.SIGKILL

    assert sorted(o for o, _, _ in got) == sorted(held), (got, held)
    assert all(a == 2 for _, a, _ in got), f"attempts of A's messages after its death: {got}"
    slowest = max(t for _, _, t in got) - t_kill
    assert slowest <= RELEASE_WITHIN, (
        f"A's leases came back {slowest:.2f}s after its death (visibility_timeout {LONG:g}s); "
        f"a dead process's leases must be released at once")
    with logq.open(qdir, segment_bytes=4096) as q:
        st = q.stats()["groups"][GROUP]
        assert st["watermark"] == n and st["in_flight"] == 0, st


def start_holder(tmp_path, qdir: str, kids: list, **cfg) -> tuple[Child, dict]:
    report = str(tmp_path / "report")
    holder = Child(HOLDER, str(tmp_path / "out-h"), json.dumps(dict(cfg, dir=qdir, report=report)))
    kids.append(holder)
    wait_for(lambda: os.path.exists(report) or not holder.alive(), 30, "the holder to get a message")
    assert holder.alive(), holder.output()
    rep = read_json(report)
    assert rep["offsets"] == [0] and rep["attempts"] == [1], rep
    return holder, rep


def test_lease_of_a_live_holder_expires(tmp_path):
    """A live child holds a message with visibility_timeout=1 and sleeps;
    the parent (backoff_base=0.05) gets it once the lease ran out, never
    before, with attempt 2, while the holder still lives."""
    qdir = str(tmp_path / "q")
    build_queue(qdir, 1, "e")
    with logq.open(qdir, segment_bytes=4096) as q, children() as kids:
        c = q.consumer(GROUP, visibility_timeout=LONG, backoff_base=0.05, backoff_max=0.05)
        holder, rep = start_holder(tmp_path, qdir, kids, n=1, visibility_timeout=1.0)
        try:
            m = c.get(timeout=15)
        except logq.Empty:
            raise AssertionError("the expired lease of a live holder never came back") from None
        t = time.monotonic()
        assert holder.alive(), holder.output()
        assert (m.offset, m.attempt) == (0, 2)
        assert identity(m.data) == ("e", 0)
        assert t - rep["t0"] >= 1.0, f"delivered again {t - rep['t0']:.3f}s after the get: lease broken"
        assert t - rep["t0"] < 6.0, f"an expired lease took {t - rep['t0']:.1f}s to come back"
        c.ack(m)
        c.commit()
        c.close()
    with logq.open(qdir) as q:
        st = q.stats()["groups"][GROUP]
        assert st["watermark"] == 1 and st["redelivered"] == 1, st


def test_extended_lease_is_kept(tmp_path):
    """The same holder with visibility_timeout=1 calls extend(m, 5): nobody
    else gets the message within 3 s (the 1 s lease would have run out long
    before), and after the 5 s it comes back with attempt 2."""
    qdir = str(tmp_path / "q")
    build_queue(qdir, 1, "e")
    with logq.open(qdir, segment_bytes=4096) as q, children() as kids:
        c = q.consumer(GROUP, visibility_timeout=LONG, backoff_base=0.05, backoff_max=0.05)
        holder, rep = start_holder(tmp_path, qdir, kids, n=1, visibility_timeout=1.0, extend=5.0)
        window_end = rep["t_ext1"] + 3.0
        early = c.get_many(1, timeout=max(0.0, window_end - time.monotonic()))
        assert early == [], (f"message {early[0].offset} (attempt {early[0].attempt}) delivered "
                             f"{time.monotonic() - rep['t_ext0']:.2f}s after its lease was extended by 5s")
        assert time.monotonic() >= window_end
        try:
            m = c.get(timeout=15)
        except logq.Empty:
            raise AssertionError("the extended lease never ran out") from None
        t = time.monotonic()
        assert (m.offset, m.attempt) == (0, 2)
        assert t - rep["t_ext0"] >= 5.0, f"delivered again {t - rep['t_ext0']:.3f}s after extend(5)"
        assert holder.alive()
        c.ack(m)
        c.close()


# -- commit() waits for a commit already in flight -----------------------------------
SLOW_TIMER_COMMIT = r"""
import os, signal, sys, threading, time
import helpers
import logq
q = logq.open(sys.argv[1])
real_write = q._index.write
def slow_write(fn):            # a slow fdatasync, only in the commit timer thread
    if threading.current_thread().name.startswith("logq-commit"):
        time.sleep(1.0)
    return real_write(fn)
q._index.write = slow_write
c = q.consumer("g", commit_interval=0.05)
m = c.get(timeout=5)
c.ack(m)
time.sleep(0.2)                # the timer has taken the ack and is writing it
t = time.monotonic()
c.commit()                     # must not return before that write is durable
print(f"commit returned after {time.monotonic() - t:.3f}s", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_commit_waits_for_the_timers_commit_in_flight(tmp_path):
    qdir = str(tmp_path / "q")
    with logq.open(qdir) as q:
        q.put(b"hello")
    rc, out = helpers.run_child(SLOW_TIMER_COMMIT, str(tmp_path / "out"), qdir, timeout=60)
    assert rc == -signal.SIGKILL, out
    assert float(out.split("after ")[1].split("s")[0]) >= 0.5, out
    with logq.open(qdir) as q:
        assert q.consumer("g").get_many(10, timeout=1) == []   # committed: never again


def test_a_message_whose_holders_all_died_is_dead_lettered_saying_so(tmp_path):
    """A delivery to a process that dies counts as an attempt (the handler
    may have run, or crashed the process): with max_attempts=1 the message
    goes to the dead letters, whose error says its consumer died, not that
    a lease expired; replay gives it back."""
    qdir = str(tmp_path / "q")
    build_queue(qdir, 3, "z")
    report = str(tmp_path / "report")
    with children() as kids:
        holder = Child(HOLDER, str(tmp_path / "out"), json.dumps(
            {"dir": qdir, "n": 3, "visibility_timeout": LONG, "report": report, "max_attempts": 1}))
        kids.append(holder)
        wait_for(lambda: os.path.exists(report) or not holder.alive(), 30, "the holder to get its messages")
        assert read_json(report)["offsets"] == [0, 1, 2], holder.output()
        holder.kill()
        holder.wait(10)
    with logq.open(qdir, segment_bytes=4096) as q:
        c = q.consumer(GROUP, visibility_timeout=LONG, max_attempts=1)
        assert c.get_many(10, timeout=0.5) == []
        dead = c.dead_letters()
        assert [d.offset for d in dead] == [0, 1, 2]
        assert all("died" in d.error and d.attempts == 1 for d in dead), [d.error for d in dead]
        assert len(c.replay()) == 3
        assert [identity(m.data) for m in c.get_many(10, timeout=1)] == [("z", 0), ("z", 1), ("z", 2)]
        c.close()

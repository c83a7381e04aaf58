"""The worker pool (logq.WorkerPool) with real worker processes, real
SIGKILLs and a real queue: a pool SIGKILLed at random moments and workers
SIGKILLed mid-batch lose nothing and redo nothing committed; a handler that
raises is retried with backoff and dead-lettered with its traceback; a
handler that hangs is killed by the timeout and its worker replaced; a
downstream outage opens the circuit breaker instead of burning attempts;
the pool grows under a backlog and shrinks when idle; SIGTERM drains and
commits; a stopped pool leaves no process, thread or file descriptor
behind; batch handlers get lists and fail whole; ``logq work`` runs a pool
from the shell.

The handlers are in pool_handlers.py (the workers import it by name); each
message's data names its behaviour and the control directory where the
handler logs what it did, one line per event (see that module).  Pools run
either in this process (start()/stop(), or run(until_idle=True)) or in a
``python -c`` child (POOL_CHILD) that can be SIGKILLed or sent SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import psutil

import helpers
import logq
import pool_handlers
from helpers import SEED, Child, children, count_lines, deadline, payload, wait_for

GROUP = "g"
HANDLER = "pool_handlers:handle"
LONG = 300.0            # a visibility timeout no test waits out: redelivery is by death, not expiry

POOL_CHILD = "import test_pool as T, sys; T.pool_main(sys.argv[1])"


# -- setting up and reading back --------------------------------------------------
def setup(tmp_path, tags: list[str]) -> tuple[str, str]:
    """A queue ``tmp_path/q`` holding one message per tag (message i is
    ``payload(tag, i)`` for the handler of that tag) and the control
    directory ``tmp_path/ctl``; (qdir, ctl)."""
    qdir, ctl = str(tmp_path / "q"), str(tmp_path / "ctl")
    os.makedirs(ctl, exist_ok=True)
    put(qdir, ctl, tags)
    return qdir, ctl


def put(qdir: str, ctl: str, tags: list[str], first: int = 0) -> list[int]:
    with logq.open(qdir) as q:
        offs = q.put_many([pool_handlers.message_data(ctl, payload(t, first + k))
                           for k, t in enumerate(tags)])
    return list(offs)


def lines(ctl: str) -> list[list[str]]:
    """The handler log's finished lines, split (a last line without its
    newline was cut by a kill: ignored)."""
    try:
        with open(os.path.join(ctl, "log"), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [ln.decode().split() for ln in data.split(b"\n")[:-1]]


EVENTS = ("start", "done", "fail", "kill", "hang")


def events(ctl: str, since: int = 0, until: int | None = None) -> list[tuple[str, int, int, int, float]]:
    """(event, pid, offset, attempt, t) of the per-message lines of the log
    from line ``since`` (to ``until``)."""
    return [(p[0], int(p[1]), int(p[2]), int(p[3]), float(p[4]))
            for p in lines(ctl)[since:until] if p[0] in EVENTS]


def done_offsets(ctl: str, since: int = 0) -> list[int]:
    return [off for ev, _pid, off, _a, _t in events(ctl, since) if ev == "done"]


def group_stats(qdir: str) -> dict:
    with logq.open(qdir) as q:
        return q.stats()["groups"].get(GROUP, {})


def dead_letters(qdir: str) -> list[logq.DeadLetter]:
    with logq.open(qdir) as q:
        c = q.consumer(GROUP, visibility_timeout=LONG)
        try:
            return c.dead_letters()
        finally:
            c.close()


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie does not run)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_mp_helper(p: psutil.Process) -> str | None:
    """"forkserver" or "resource_tracker" for multiprocessing's own helper
    processes (children of this process), else None.  (A worker forked by
    the fork server has the fork server's command line: it is told apart
    by its parent.)"""
    try:
        if p.ppid() != os.getpid():
            return None
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return None
    if "multiprocessing.forkserver" in cmd:
        return "forkserver"
    if "multiprocessing.resource_tracker" in cmd:
        return "resource_tracker"
    return None


class Running:
    """``with Running(pool) as pool``: start() it; at exit stop() it if the
    test did not (without draining when the test failed), so no worker
    outlives a failed test."""

    def __init__(self, pool: logq.WorkerPool) -> None:
        self.pool = pool
        self.final: logq.PoolStats | None = None

    def __enter__(self) -> logq.WorkerPool:
        self.pool.start()
        return self.pool

    def __exit__(self, exc_type, *exc) -> None:
        if self.pool._thread is not None:
            with deadline(60, "stopping the pool"):
                self.final = self.pool.stop(drain=exc_type is None)


def pool(qdir: str, handler: str = HANDLER, **options) -> logq.WorkerPool:
    """A pool on group "g" with long leases, commits every 0.05 s, and no
    circuit breaker unless the test sets one up (tests of failures want
    their retries, not a paused pool)."""
    options.setdefault("visibility_timeout", LONG)
    options.setdefault("breaker_min_calls", 1 << 20)
    options.setdefault("commit_interval", 0.05)
    return logq.WorkerPool(qdir, handler, group=GROUP, **options)


# -- the pool in a child process --------------------------------------------------
def pool_main(config_json: str) -> None:
    """Child entry: run a pool on ``dir`` with ``options``; ``run()``
    (``until_idle`` when asked) and print ``STATS {json}`` when it returns."""
    cfg = json.loads(config_json)
    p = logq.WorkerPool(cfg["dir"], cfg.get("handler", HANDLER), group=GROUP, **cfg["options"])
    st = p.run(until_idle=cfg.get("until_idle", False))
    print("STATS " + json.dumps(st.as_dict()), flush=True)


def child_stats(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("STATS "):
            return json.loads(line[6:])
    raise AssertionError(f"the pool child printed no stats; its output:\n{output}")


# -- 1. SIGKILLs: of workers mid-batch, of the pool at random moments ----------------
N_CRASH = 800
CRASH_ROUNDS = 6


def test_sigkilled_pool_and_workers_lose_nothing_and_redo_nothing_committed(tmp_path):
    """A pool in a child process (2 workers, batches of 8, commits every
    0.1 s) works through 800 messages (2 ms each; every 60th SIGKILLs its
    own worker on its first delivery).  The pool process is SIGKILLed six
    times at random moments (during start-up, or after a random amount of
    progress); in two of those rounds the test first SIGKILLs the worker
    that is running a message, mid-batch.  A new pool is started each time;
    the last one runs until idle.

    * a worker SIGKILLed mid-batch is replaced (a new pid does work in the
      same round); the self-killing messages are done at a later attempt;
    * the pool's death takes its workers with it: every process of the
      round (its tree before the kill, and every pid that logged work) is
      gone within seconds, none logs anything after;
    * the group's watermark, read with the pool dead after each kill, never
      goes back, and no later round processes (or even starts) an offset
      below it: nothing committed is redone;
    * every message is done in the end; nothing dead-lettered, nothing left."""
    tags = ["kill1" if i % 60 == 30 else "slow2" for i in range(N_CRASH)]
    qdir, ctl = setup(tmp_path, tags)
    rng = random.Random(f"{SEED}-pool-crash")
    options = {"workers": 2, "batch_size": 8, "commit_interval": 0.1, "visibility_timeout": LONG,
               "max_attempts": 100, "backoff_base": 0.05, "backoff_max": 0.2}
    marks: list[int] = []                 # the log's line count when each round started
    watermarks: list[int] = []            # the group's watermark after each round's kill
    pids_of_round: list[set[int]] = []
    startup = 1.0
    worker_kills = 0
    progressed = 0
    final_stats = None
    for r in range(CRASH_ROUNDS + 1):
        mark = count_lines(os.path.join(ctl, "log"))
        marks.append(mark)
        final = r == CRASH_ROUNDS
        cfg = {"dir": qdir, "options": options, "until_idle": final}
        with children() as kids:
            t0 = time.monotonic()
            kid = Child(POOL_CHILD, str(tmp_path / f"out-{r}"), json.dumps(cfg))
            kids.append(kid)
            if final:
                rc = kid.wait(90)
                assert rc == 0, f"the last pool failed ({rc}):\n{kid.output()}"
                final_stats = child_stats(kid.output())
                pids_of_round.append({pid for _e, pid, *_ in events(ctl, mark)})
                break

            def round_done() -> int:
                return sum(1 for e in events(ctl, mark) if e[0] == "done")

            def all_done() -> bool:
                return len(set(done_offsets(ctl))) >= N_CRASH
            mode = r % 3
            if mode == 1:
                # anywhere from interpreter start-up to the first batches
                time.sleep(rng.uniform(0.0, 1.3 * startup))
            else:
                wait_for(lambda: round_done() > 0 or all_done() or not kid.alive(), 60,
                         f"pool {r} to start working")
                if r == 0:
                    startup = time.monotonic() - t0
                if mode == 2 and not all_done():
                    # SIGKILL the worker running a message now, once both have worked
                    wait_for(lambda: len({pid for _e, pid, *_ in events(ctl, mark)}) >= 2
                             or all_done() or not kid.alive(), 30, f"both workers of pool {r}")
                    tree = {p.pid for p in descendants(kid.pid)}
                    evs = events(ctl, mark)
                    before = {pid for _e, pid, *_ in evs}
                    victim = next((pid for ev, pid, *_ in reversed(evs) if ev == "start"), None)
                    if victim is not None and victim in tree and not all_done():
                        os.kill(victim, signal.SIGKILL)
                        worker_kills += 1
                        wait_for(lambda: gone(victim), 10, f"worker {victim} to die")
                        wait_for(lambda: any(ev == "done" and pid not in before
                                             for ev, pid, *_ in events(ctl, mark))
                                 or all_done() or not kid.alive(), 30,
                                 f"a replacement worker in pool {r} after SIGKILL of worker {victim}")
                        assert all_done() or kid.alive(), kid.output()
                target = round_done() + rng.randint(10, 120)
                wait_for(lambda: round_done() >= target or all_done() or not kid.alive(), 60,
                         f"pool {r} to make progress")
                time.sleep(rng.uniform(0.0, 0.03))
            assert kid.alive(), f"pool {r} exited on its own ({kid.proc.poll()}):\n{kid.output()}"
            tree = descendants(kid.pid)
            kid.kill()
            assert kid.wait(30) == -signal.SIGKILL
            try:
                wait_for(lambda: all(gone(p.pid) for p in tree), 10, "")
            except helpers.Hang:
                raise AssertionError(f"processes of pool {r} survived its SIGKILL by 10 s: "
                                     f"{[p for p in tree if not gone(p.pid)]}") from None
        round_pids = {pid for _e, pid, *_ in events(ctl, mark)}
        wait_for(lambda: all(gone(pid) for pid in round_pids), 10,
                 f"the workers of pool {r} to die with it")
        time.sleep(0.05)
        pids_of_round.append({pid for _e, pid, *_ in events(ctl, mark)})
        assert pids_of_round[-1] == round_pids, "a worker of a dead pool logged work after its death"
        progressed += any(e[0] == "done" for e in events(ctl, mark))
        watermarks.append(group_stats(qdir).get("watermark", 0))

    assert worker_kills >= 1, "no worker was SIGKILLed mid-batch: the test lost its point"
    assert progressed >= CRASH_ROUNDS // 2, "the kills did not land while the pool was working"
    assert watermarks == sorted(watermarks), f"the watermark went back: {watermarks}"
    for r in range(1, CRASH_ROUNDS + 1):
        end = marks[r + 1] if r + 1 < len(marks) else None
        redone = sorted({off for _e, _pid, off, _a, _t in events(ctl, marks[r], end)
                         if off < watermarks[r - 1]})
        assert not redone, (f"pool {r} worked on offsets below the committed watermark "
                            f"{watermarks[r - 1]} (read with pool {r - 1} dead): {redone[:20]}")
        earlier = set().union(*pids_of_round[:r])
        assert not pids_of_round[r] & earlier, "a worker of an earlier pool worked in a later round"

    evs = events(ctl)
    done = {off for ev, _pid, off, _a, _t in evs if ev == "done"}
    assert done == set(range(N_CRASH)), f"never processed: {sorted(set(range(N_CRASH)) - done)[:20]}"
    rounds_done: dict[int, set[int]] = {}
    for r in range(CRASH_ROUNDS + 1):
        end = marks[r + 1] if r + 1 < len(marks) else None
        for ev, _pid, off, _a, _t in events(ctl, marks[r], end):
            if ev == "done":
                rounds_done.setdefault(off, set()).add(r)
    assert any(len(rs) > 1 for rs in rounds_done.values()), (
        "no message was processed again after a pool's death: the kills never landed inside the "
        "at-least-once window (work done, not yet committed)")
    self_kills = 0
    for off in (i for i, t in enumerate(tags) if t == "kill1"):
        mine = [(ev, a) for ev, _pid, o, a, _t in evs if o == off]
        self_kills += ("kill", 1) in mine
        assert any(ev == "done" and a >= 2 for ev, a in mine), (
            f"offset {off} (kills its worker on attempt 1) never done at a later attempt: {mine}")
    assert self_kills >= 3, "too few workers killed themselves: the test lost its point"
    st = group_stats(qdir)
    assert st["watermark"] == N_CRASH and st["backlog"] == 0, st
    assert (st["in_flight"], st["dead_letters"], st["dead_lettered"]) == (0, 0, 0), st
    assert final_stats["dead_lettered"] == 0, final_stats


# -- 2. a handler that raises ----------------------------------------------------------
def test_raising_handler_retries_with_backoff_then_dead_letters_with_the_traceback(tmp_path):
    """4 messages whose handler always raises among 8 that succeed,
    max_attempts=4, backoff_base=0.2, backoff_max=0.4: each failing message
    is tried exactly at attempts 1, 2, 3, 4 in that order, each retry no
    sooner than the failure and within the backoff ceiling (0.2, 0.4, 0.4 s)
    plus slack, with some real delay among them (full jitter, not zero);
    then it is a dead letter with attempts 4 and the last attempt's
    traceback as its error; the others are processed once; the pool's and
    the group's counts agree."""
    tags = ["raise" if i % 3 == 1 else "ok" for i in range(12)]
    qdir, ctl = setup(tmp_path, tags)
    base, cap, attempts = 0.2, 0.4, 4
    p = pool(qdir, workers=2, batch_size=2, max_attempts=attempts, backoff_base=base, backoff_max=cap)
    with deadline(60, "the pool running until idle"):
        st = p.run(until_idle=True)
    failing = [i for i, t in enumerate(tags) if t == "raise"]
    ok = [i for i, t in enumerate(tags) if t == "ok"]
    evs = events(ctl)
    gaps = []
    for off in failing:
        mine = [(ev, a, t) for ev, _pid, o, a, t in evs if o == off]
        assert [a for ev, a, _t in mine if ev == "start"] == list(range(1, attempts + 1)), (
            f"offset {off}: attempts not 1..{attempts} in order: {mine}")
        assert [a for ev, a, _t in mine if ev == "fail"] == list(range(1, attempts + 1)), mine
        fails = {a: t for ev, a, t in mine if ev == "fail"}
        starts = {a: t for ev, a, t in mine if ev == "start"}
        for a in range(1, attempts):
            gap = starts[a + 1] - fails[a]
            ceiling = min(cap, base * 2 ** (a - 1))
            assert 0 <= gap <= ceiling + 2.0, (
                f"offset {off}: retry {a + 1} came {gap:.3f}s after failure {a} "
                f"(backoff ceiling {ceiling}s)")
            gaps.append((gap, ceiling))
    assert max(g / c for g, c in gaps) >= 0.25, f"no retry was delayed by backoff: {gaps}"
    for off in ok:
        assert [(ev, a) for ev, _pid, o, a, _t in evs if o == off] == [("start", 1), ("done", 1)], off

    letters = dead_letters(qdir)
    assert sorted(d.offset for d in letters) == failing
    for d in letters:
        assert d.attempts == attempts, d
        assert d.data == pool_handlers.message_data(ctl, payload("raise", d.offset))
        assert "Traceback (most recent call last)" in d.error, d.error
        assert f"ValueError: boom {d.offset} attempt {attempts}" in d.error, d.error
        assert "pool_handlers.py" in d.error, d.error
    n = len(failing)
    assert (st.processed, st.failed, st.retried, st.dead_lettered) == (
        len(ok), n * attempts, n * (attempts - 1), n), st
    assert (st.timeouts, st.worker_deaths, st.in_flight, st.waiting) == (0, 0, 0, 0), st
    g = group_stats(qdir)
    assert (g["watermark"], g["backlog"], g["dead_letters"], g["acked"]) == (12, 0, n, len(ok)), g


# -- 3. a handler that hangs -----------------------------------------------------------
def test_hanging_handler_is_killed_by_the_timeout_and_its_worker_replaced(tmp_path):
    """One message hangs for ever among 14 that take 20 ms; timeout=1,
    max_attempts=2, batches of 3: each of its 2 attempts runs in a worker
    that is SIGKILLed no sooner than 1 s after it started (and the pid is
    gone), a new worker takes over (3 or more pids did work), the message is
    then a dead letter whose error says it timed out; every other message is
    done, each at attempt 1 only (the rest of a killed worker's batch is
    given back without counting an attempt); stats count 2 timeouts."""
    timeout = 1.0
    tags = ["hang" if i == 1 else "slow20" for i in range(15)]
    qdir, ctl = setup(tmp_path, tags)
    p = pool(qdir, workers=2, batch_size=3, timeout=timeout, max_attempts=2, backoff_base=0.05,
             backoff_max=0.05)
    with Running(p):
        wait_for(lambda: p.stats().dead_lettered >= 1 and p.stats().processed >= 14, 40,
                 "the hanging message to be dead-lettered and the others processed")
        st = p.stats()
    evs = events(ctl)
    hangs = [(pid, a, t) for ev, pid, o, a, t in evs if ev == "hang"]
    assert [a for _pid, a, _t in hangs] == [1, 2], f"the hanging message's attempts: {hangs}"
    assert hangs[0][0] != hangs[1][0], "the second attempt ran in the killed worker"
    assert hangs[1][2] - hangs[0][2] >= timeout, (
        f"the hung worker was killed {hangs[1][2] - hangs[0][2]:.3f}s after the message started "
        f"(timeout {timeout}s)")
    for pid, _a, _t in hangs:
        assert gone(pid), f"worker {pid} still runs its hung handler"
    pids = {pid for _e, pid, *_ in evs}
    assert len(pids) >= 3, f"no replacement worker did any work: pids {pids}"
    after = {pid for ev, pid, o, a, t in evs if ev == "done" and t > hangs[0][2] + timeout}
    assert after - {hangs[0][0]}, "nothing was processed after the first timeout"
    for off in range(15):
        if off == 1:
            continue
        mine = [(ev, a) for ev, _pid, o, a, _t in evs if o == off]
        assert ("done", 1) in mine, f"offset {off} not processed: {mine}"
        assert all(a == 1 for _ev, a in mine), (
            f"offset {off} (batch-mate of a hung message) lost an attempt: {mine}")
    letters = dead_letters(qdir)
    assert [(d.offset, d.attempts) for d in letters] == [(1, 2)], letters
    assert "timed out" in letters[0].error and "worker killed" in letters[0].error, letters[0].error
    assert (st.timeouts, st.dead_lettered, st.retried) == (2, 1, 1), st
    assert st.worker_deaths >= 2 and st.processed == 14, st
    g = group_stats(qdir)
    assert (g["watermark"], g["backlog"], g["dead_letters"]) == (15, 0, 1), g


# -- 4. the circuit breaker -------------------------------------------------------------
def test_breaker_opens_on_an_outage_spares_attempts_and_closes_after(tmp_path):
    """40 messages (20 ms each) whose handler fails while CTL/outage exists.
    breaker_min_calls=10, threshold 0.5, cooldown 0.5 s, 2 probes, and a
    backoff (0.05 s) that would burn every message's 20 attempts within the
    outage if the pool kept dispatching.

    * the breaker opens (stats: "open", breaker_opened counting the
      reopenings after failed probes);
    * during the outage (held until it opened three times) the handler
      fails at most min_calls + what the workers held when it opened +
      breaker_probes per half-open period; no message is dead-lettered;
    * once the outage ends the breaker closes and all 40 are processed."""
    n = 40
    qdir, ctl = setup(tmp_path, ["out20"] * n)
    outage = os.path.join(ctl, "outage")
    open(outage, "w").close()
    workers, batch_size, min_calls, probes = 2, 5, 10, 2
    p = pool(qdir, workers=workers, batch_size=batch_size, max_attempts=20, backoff_base=0.05,
             backoff_max=0.05, breaker_threshold=0.5, breaker_window=10.0,
             breaker_min_calls=min_calls, breaker_cooldown=0.5, breaker_probes=probes)
    seen_states = set()
    with Running(p):
        def opened(k: int) -> bool:
            s = p.stats()
            seen_states.add(s.breaker)
            return s.breaker_opened >= k
        wait_for(lambda: opened(3), 40, "the breaker to open three times during the outage")
        mark = count_lines(os.path.join(ctl, "log"))
        during = p.stats()
        os.unlink(outage)
        fails_in_outage = sum(1 for e in events(ctl, 0, mark) if e[0] == "fail")
        wait_for(lambda: p.stats().processed >= n, 40, "every message after the outage")
        wait_for(lambda: p.stats().breaker == "closed", 10, "the breaker to close")
        after = p.stats()
    assert "open" in seen_states, f"stats never showed the breaker open: {seen_states}"
    assert during.dead_lettered == 0, during
    # Before it first opens: fewer than min_calls outcomes, then the batch that
    # crossed the line and whatever the workers held (up to _DEPTH batches
    # each); then at most `probes` probes per half-open period (the periods
    # that ended in an opening, and the one under way).
    depth = getattr(logq._pool, "_DEPTH", 2)
    bound = min_calls + workers * depth * batch_size + (during.breaker_opened + 1) * probes
    assert fails_in_outage <= bound, (
        f"the handler failed {fails_in_outage} times during the outage (breaker opened "
        f"{during.breaker_opened} times): messages were dispatched while it was open "
        f"(at most {bound} expected)")
    assert fails_in_outage >= min_calls // 2, "the outage was not felt"
    done = set(done_offsets(ctl))
    assert done == set(range(n)), sorted(set(range(n)) - done)
    assert after.processed == n and after.dead_lettered == 0, after
    assert after.breaker == "closed" and after.breaker_opened >= 3, after
    assert dead_letters(qdir) == []
    g = group_stats(qdir)
    assert (g["watermark"], g["backlog"], g["dead_letters"]) == (n, 0, 0), g


# -- 5. autoscaling -------------------------------------------------------------------
def test_pool_grows_under_a_backlog_and_shrinks_when_idle(tmp_path):
    """min_workers=1, max_workers=3, starting with 1; 80 messages of 50 ms
    in batches of 2 (4 s of work for one worker), scale_interval=0.1,
    idle_timeout=0.5: the worker count (on_stats and stats()) rises to 3
    while the backlog lasts, 3 distinct pids do work, and once everything
    is processed it falls back to 1 (never below), the stopped workers'
    processes gone."""
    n = 80
    qdir, ctl = setup(tmp_path, ["slow50"] * n)
    series: list[tuple[float, int, int]] = []
    p = pool(qdir, workers=1, min_workers=1, max_workers=3, batch_size=2, scale_interval=0.1,
             idle_timeout=0.5, on_stats=lambda s: series.append((time.monotonic(), s.workers,
                                                                  s.processed)))
    with Running(p):
        wait_for(lambda: p.stats().workers >= 3 or p.stats().processed >= n, 30,
                 "the pool to grow under the backlog")
        grew = p.stats()
        wait_for(lambda: p.stats().processed >= n, 30, "the backlog to be processed")
        wait_for(lambda: p.stats().workers == 1, 15, "the pool to shrink when idle")
        time.sleep(0.5)
        shrunk = p.stats()
        workers_left = [q for q in descendants(os.getpid()) if not is_mp_helper(q) and not gone(q.pid)]
    counts = [w for _t, w, _p in series]
    assert grew.workers == 3 and grew.processed < n, (
        f"the pool did not grow to max_workers=3 under a backlog of {n} slow messages "
        f"(workers {grew.workers} with {grew.processed} processed; on_stats workers {counts})")
    assert max(counts) == 3 and min(counts) >= 1, counts
    pids = {pid for ev, pid, *_ in events(ctl) if ev == "done"}
    assert len(pids) == 3, f"pids that did work: {pids}"
    assert shrunk.workers == 1, shrunk
    assert len(workers_left) == 1, f"worker processes when shrunk: {workers_left}"
    assert set(done_offsets(ctl)) == set(range(n))


def test_idle_pool_shrinks_to_min_workers(tmp_path):
    """workers=3, min_workers=1, idle_timeout=0.4: after a few messages the
    pool stops idle workers one by one down to 1 (on_stats never shows
    fewer), and their processes exit; messages put afterwards are still
    processed by the remaining worker."""
    qdir, ctl = setup(tmp_path, ["ok"] * 12)
    series: list[int] = []
    p = pool(qdir, workers=3, min_workers=1, max_workers=3, batch_size=2, scale_interval=0.1,
             idle_timeout=0.4, on_stats=lambda s: series.append(s.workers))
    with Running(p):
        wait_for(lambda: p.stats().processed >= 12, 20, "the first messages")
        wait_for(lambda: p.stats().workers == 1, 15, "the idle pool to shrink to min_workers")
        time.sleep(0.6)
        assert p.stats().workers == 1, p.stats()
        workers = [q for q in descendants(os.getpid()) if not is_mp_helper(q) and not gone(q.pid)]
        assert len(workers) == 1, f"worker processes left: {workers}"
        put(qdir, ctl, ["ok"] * 5, first=12)
        wait_for(lambda: p.stats().processed >= 17, 20, "messages put after the shrink")
    assert series and max(series) == 3 and min(series) == 1, series
    assert series[series.index(1):] == [1] * (len(series) - series.index(1)), series


# -- 6. SIGTERM: drain and commit ----------------------------------------------------------
def test_sigterm_drains_and_commits_what_was_done(tmp_path):
    """A pool child (run(), 2 workers, batches of 3, 60 ms per message) gets
    SIGTERM while messages are in flight: it exits 0 within 10 s, every
    handler it started finished (drained, not killed), and the group's
    acked count equals the number of messages done; a second pool then
    processes exactly the others, each at attempt 1 (what was claimed and
    not sent was given back without counting), none of the first run's
    again."""
    n = 40
    qdir, ctl = setup(tmp_path, ["slow60"] * n)
    cfg = {"dir": qdir, "options": {"workers": 2, "batch_size": 3, "visibility_timeout": LONG,
                                    "commit_interval": 0.5}}
    log = os.path.join(ctl, "log")
    with children() as kids:
        kid = Child(POOL_CHILD, str(tmp_path / "out"), json.dumps(cfg))
        kids.append(kid)
        wait_for(lambda: len(done_offsets(ctl)) >= 6 or not kid.alive(), 60, "the pool to work")
        assert kid.alive(), kid.output()
        evs = events(ctl)
        in_flight = {o for ev, _p, o, _a, _t in evs if ev == "start"} - {
            o for ev, _p, o, _a, _t in evs if ev == "done"}
        t0 = time.monotonic()
        kid.proc.send_signal(signal.SIGTERM)
        rc = kid.wait(30)
        took = time.monotonic() - t0
        out = kid.output()
    assert rc == 0, f"the pool exited with {rc} on SIGTERM:\n{out}"
    assert took <= 10, f"the drain took {took:.1f}s"
    st = child_stats(out)
    mark = count_lines(log)
    evs = events(ctl)
    started = [o for ev, _p, o, _a, _t in evs if ev == "start"]
    done = [o for ev, _p, o, _a, _t in evs if ev == "done"]
    assert in_flight <= set(done), f"in flight at SIGTERM and never finished: {in_flight - set(done)}"
    assert sorted(started) == sorted(done), "a handler was cut off by the drain"
    assert len(done) == len(set(done)), "a message was processed twice in one run"
    assert len(done) < n, "the pool finished everything before the SIGTERM: the test lost its point"
    g = group_stats(qdir)
    assert g["acked"] == len(done) == st["processed"], (g, len(done), st)
    assert (g["in_flight"], g["redelivered"], g["dead_letters"]) == (0, 0, 0), g

    p = pool(qdir, workers=2, batch_size=3)
    with deadline(60, "the second pool"):
        st2 = p.run(until_idle=True)
    evs2 = events(ctl, mark)
    done2 = [o for ev, _p, o, _a, _t in evs2 if ev == "done"]
    assert not set(done2) & set(done), (
        f"acked before the SIGTERM and processed again: {sorted(set(done2) & set(done))[:20]}")
    assert sorted(done + done2) == list(range(n))
    assert all(a == 1 for _ev, _p, _o, a, _t in evs2), [e for e in evs2 if e[3] != 1][:10]
    assert st2.processed == n - len(done), st2
    g = group_stats(qdir)
    assert (g["watermark"], g["acked"], g["backlog"]) == (n, n, 0), g


# -- 7. nothing left behind -----------------------------------------------------------------
def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def test_stopped_pool_leaves_no_processes_threads_or_fds(tmp_path):
    """After start()/stop() of a pool in this process, in three cases (a
    plain run; a run where a worker was SIGKILLed; a run where a handler
    hung and the timeout killed its worker), no process is left: this
    process's descendants are only multiprocessing's fork server and
    resource tracker (started by the first pool, kept for the process's
    life, both running, neither with a child left); the threads are those
    before the pool started; the open file descriptors are those before
    (the baseline is taken after a first pool on the same queue, which
    started those helpers and took this process's owner lock of the queue)."""
    qdir, ctl = setup(tmp_path, ["ok"] * 4)
    first = 4
    with Running(pool(qdir, workers=2)) as p:
        wait_for(lambda: p.stats().processed >= 4, 30, "the warm-up pool")
    time.sleep(0.2)
    base_threads = set(threading.enumerate())
    base_fds, base_num = _fds(), psutil.Process().num_fds()
    cases = {
        "plain": (["ok"] * 10, {}),
        "worker SIGKILLed": (["ok"] * 4 + ["kill1"] + ["ok"] * 5, {}),
        "hung handler": (["ok"] * 3 + ["hang"] + ["ok"] * 3, {"timeout": 0.5, "max_attempts": 1}),
    }
    for case, (tags, opts) in cases.items():
        put(qdir, ctl, tags, first)
        first += len(tags)
        p = pool(qdir, workers=2, batch_size=2, **opts)
        with Running(p):
            wait_for(lambda: p.stats().processed + p.stats().dead_lettered >= len(tags), 30,
                     f"the pool ({case})")
            during = p.stats()
            assert p.stats().workers == 2, (case, p.stats())
        if case == "worker SIGKILLed":
            assert during.worker_deaths == 1, during
        if case == "hung handler":
            assert during.timeouts == 1 and during.dead_lettered == 1, during

        wait_for(lambda: all(is_mp_helper(q) or gone(q.pid) for q in descendants(os.getpid())), 5,
                 f"the pool's workers to exit ({case})")
        procs = descendants(os.getpid())
        left = [(q.pid, q.status(), " ".join(q.cmdline())[:80]) for q in procs if not is_mp_helper(q)]
        assert not left, f"{case}: processes left after stop(): {left}"
        helpers_ = {is_mp_helper(q): q for q in procs}
        assert "forkserver" in helpers_, f"{case}: no fork server among {procs} (start method?)"
        for kind, q in helpers_.items():
            assert q.status() != psutil.STATUS_ZOMBIE, (case, kind, q)
        assert not descendants(helpers_["forkserver"].pid), (
            f"{case}: the fork server still has children: {descendants(helpers_['forkserver'].pid)}")

        wait_for(lambda: set(threading.enumerate()) == base_threads, 5,
                 f"the pool's threads to end ({case})")
        try:
            wait_for(lambda: psutil.Process().num_fds() == base_num, 5,
                     f"fds back to the baseline ({case})")
        except helpers.Hang:
            now = _fds()
            raise AssertionError(f"{case}: open fds {len(now)}, {len(base_fds)} before: new "
                                 f"{sorted(set(now.items()) - set(base_fds.items()))}, closed "
                                 f"{sorted(set(base_fds.items()) - set(now.items()))}") from None
    assert len(set(done_offsets(ctl))) == first - 1     # all but the hung one


# -- 8. batch handlers ---------------------------------------------------------------------
def test_batch_handler_gets_lists_and_fails_whole(tmp_path):
    """batch=True, batch_size=4, max_attempts=2, one worker; offset 5 poisons
    any batch it is in: the handler gets lists of 1..4 messages; every
    message of a batch holding offset 5 fails (is delivered again at the
    next attempt, or, at attempt 2, becomes a dead letter whose error is
    the batch's traceback); every message never in such a batch at attempt
    2 is processed; the counts agree with the batches logged."""
    n, poison = 12, 5
    tags = ["poison" if i == poison else "ok" for i in range(n)]
    qdir, ctl = setup(tmp_path, tags)
    p = pool(qdir, "pool_handlers:handle_batch", workers=1, batch=True, batch_size=4,
             max_attempts=2, backoff_base=0.05, backoff_max=0.05)
    with deadline(60, "the batch pool"):
        st = p.run(until_idle=True)
    raw = lines(ctl)
    assert not [ln for ln in raw if ln[0] == "notalist"], "the batch handler got a non-list"
    batches = [[tuple(map(int, x.split(":"))) for x in ln[3].split(",")] for ln in raw if ln[0] == "batch"]
    assert batches and all(1 <= len(b) <= 4 for b in batches), batches
    assert any(len(b) > 1 for b in batches), f"never more than one message per batch: {batches}"
    failed = [b for b in batches if any(o == poison for o, _a in b)]
    assert [a for b in failed for o, a in b if o == poison] == [1, 2], failed
    should_die = {o for b in failed for o, a in b if a == 2}
    retried = [(o, a) for b in failed for o, a in b if a == 1]
    for o, a in retried:
        assert any((o, 2) in b for b in batches), f"offset {o} failed with the batch and was not retried"
    done = done_offsets(ctl)
    assert set(done) == set(range(n)) - should_die, (sorted(done), should_die)
    letters = dead_letters(qdir)
    assert {d.offset for d in letters} == should_die
    for d in letters:
        assert d.attempts == 2 and "RuntimeError: poison message(s) [5]" in d.error, d
        assert "Traceback (most recent call last)" in d.error
    n_failed = sum(len(b) for b in failed)
    assert (st.failed, st.retried, st.dead_lettered) == (n_failed, len(retried), len(should_die)), st
    assert st.processed == n - len(should_die), st
    g = group_stats(qdir)
    assert (g["watermark"], g["dead_letters"], g["backlog"]) == (n, len(should_die), 0), g


# -- 9. the command line --------------------------------------------------------------------
def test_logq_work_command_runs_a_pool_until_idle(tmp_path):
    """``python -m logq work QDIR pool_handlers:handle --group g --workers 2
    --until-idle --json`` (from the tests directory, so the handler module
    is importable) processes all 30 messages with at most 2 worker pids,
    exits 0 and prints the final stats; the group is fully acked."""
    n = 30
    qdir, ctl = setup(tmp_path, ["slow5"] * n)
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "logq", "work", qdir, HANDLER, "--group", GROUP,
                               "--workers", "2", "--batch-size", "4", "--timeout", "30",
                               "--until-idle", "--json"],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              env=helpers.child_env(), cwd=helpers.TESTS, timeout=90)
    output = (tmp_path / "out").read_text(errors="replace")
    assert proc.returncode == 0, output
    assert set(done_offsets(ctl)) == set(range(n)), output
    pids = {pid for _e, pid, *_ in events(ctl)}
    assert 1 <= len(pids) <= 2, pids
    summary = json.loads(output[output.index("{"):output.rindex("}") + 1])
    assert summary["processed"] == n and summary["failed"] == 0, summary
    g = group_stats(qdir)
    assert (g["watermark"], g["acked"], g["backlog"]) == (n, n, 0), g

"""A model-based test of the promise that matters most: a message the API
accepted is delivered to every consumer group, intact, until the group
settles it, whatever happens in between — except what the damage this test
inflicts itself destroyed.

A hypothesis ``RuleBasedStateMachine`` drives one queue (small segments,
so it rolls and retention deletes) with two or three consumer groups
through puts, put_many, get/get_many, ack, nack (with and without a
delay), commit, close and reopen, real child processes that put or
consume and are SIGKILLed, truncation and overwriting of segment files
while the queue is closed, ``logq.repair`` and the disk budget
(``max_bytes`` with ``on_full="drop_oldest"``).  Beside it runs a model:

* ``records``: offset -> payload of every record the queue must hold (a
  put that returned, a child's put that it reported or that is found in
  the log after its death);
* per group: ``settled`` (acked and committed: never delivered again),
  ``maybe`` (a killed child was committing them: either way is right),
  ``acked`` (acked in this process, not committed), ``held`` (leased to
  this process);
* ``touched``: every (offset, payload) whose bytes the test changed on
  disk.  Only those may go missing; the queue may also drop what retention
  was allowed to drop.

What the group must still receive is derived: every record not settled,
maybe-settled, acked or held.  Checked on the way: every delivery is of an
accepted offset with exactly its payload, never while this process holds
it, never after it was acked or committed; offsets are dense and
``put`` returns the next one; after a reopen the log holds every model
record but touched ones, and nothing else but a dead child's unreported
puts; retention deletes only what every group settled (unless
drop_oldest); after ``repair`` ``verify`` is clean.  At the end each
group is drained: everything it must receive comes, without a commit
in between for nacked messages (``nack(delay=d)`` means after ``d``).

The CI profile is derandomized (the same examples every run) and small;
``LOGQ_MODEL_EXAMPLES=2000`` (and optionally ``LOGQ_MODEL_STEPS``)
explores with fresh random examples.  Both codecs: CI runs the suite
twice, once with ``LOGQ_PURE=1``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import tempfile
import time
import zlib

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import helpers
import logq
from helpers import Child, deadline, identity, payload, segments, scan_bytes
from logq import _format as F

# -- known defects, each being fixed in the same checkout ----------------------------
# While one is unfixed its flag keeps the machine green by tolerating exactly
# that behaviour (and saying so in the flag's comment); once ``git log`` shows
# the fix, the flag goes back to False.  The committed test has every one off.
KNOWN_DEFECT_OFFSET_REUSE = False      # (1) an existing group never receives offsets reused after a cut
KNOWN_DEFECT_NACK_WAITS_FOR_COMMIT = False   # (5) nack(delay=d) redelivers only after the next commit
# Found by this test (see test_sealed_segment_truncated_to_nothing below):
DEFECT_EMPTY_SEALED_SEGMENT = False    # a sealed segment cut below its header: scan/get crash or hang

HDR = F.SEGMENT_HEADER_SIZE
RH = F.RECORD_HEADER_SIZE
LONG = 300.0                       # a visibility timeout no example waits out
GROUP_OPTIONS = dict(visibility_timeout=LONG, max_attempts=1000, backoff_base=0.001,
                     backoff_max=0.005, commit_every=1 << 30, commit_interval=3600.0)
IDLE = 1.5                         # a drain that sees nothing for this long has seen everything

EXAMPLES = int(os.environ.get("LOGQ_MODEL_EXAMPLES", "0"))
STEPS = int(os.environ.get("LOGQ_MODEL_STEPS", "0"))
# Leave rules out while hunting (comma-separated rule names), e.g. the child
# processes, whose timing makes a failing example non-reproducible.
SKIP = set(filter(None, os.environ.get("LOGQ_MODEL_SKIP", "").split(",")))
CHILD_MAIN = "import helpers, sys; helpers.model_child_main(sys.argv[1])"


class Violation(AssertionError):
    """The queue broke one of its promises (the message says which)."""


def _crc(p: bytes) -> int:
    return zlib.crc32(p) & 0xFFFFFFFF


class QueueModel(RuleBasedStateMachine):

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="logq-model-")
        self.dir = os.path.join(self.root, "q")
        self.q: logq.Queue | None = None
        self.cons: dict[str, logq.Consumer] = {}
        self.groups: list[str] = []
        self.records: dict[int, bytes] = {}
        self.next = 0
        self.touched: set[tuple[int, bytes]] = set()
        self.settled: dict[str, set[tuple[int, bytes]]] = {}
        self.maybe: dict[str, set[tuple[int, bytes]]] = {}
        self.acked: dict[str, dict[int, bytes]] = {}
        self.held: dict[str, dict[int, logq.Message]] = {}
        self.counter = 0
        self.children = 0
        self.dead_producers: set[str] = set()   # tags of child producers SIGKILLed so far
        self.damaged = False          # closed with damaged files, not opened since
        self.unrepaired = False       # damage since the last repair (verify will not be clean)
        self.drop_oldest = False
        self.log: list[str] = []      # what happened, for the failure message

    # -- plumbing ----------------------------------------------------------------------
    def note(self, what: str) -> None:
        self.log.append(what)

    def fail(self, what: str) -> None:
        raise Violation(what + "\n  steps so far: " + "; ".join(self.log[-40:]))

    def options(self) -> dict:
        opts = dict(segment_bytes=self.segment_bytes, fsync="batch")
        if self.drop_oldest:
            opts.update(max_bytes=self.max_bytes, on_full="drop_oldest", put_timeout=2.0)
        return opts

    def open(self) -> None:
        assert self.q is None
        with deadline(30, "opening the queue"):
            self.q = logq.open(self.dir, **self.options())
            for g in self.groups:
                self.cons[g] = self.q.consumer(g, **GROUP_OPTIONS)
        self.damaged = False

    def close(self) -> None:
        if self.q is None:
            return
        with deadline(30, "closing the queue"):
            for g, c in self.cons.items():
                c.close()                      # commits: acked becomes settled
                self.settled[g] |= set(self.acked[g].items())
                self.acked[g].clear()
                self.held[g].clear()           # given back
            self.cons.clear()
            self.q.close()
        self.q = None

    def new_payload(self, big: bool) -> bytes:
        self.counter += 1
        return payload("bigm" if big else "m", self.counter)

    def must(self, g: str) -> set[int]:
        s, m, a, h = self.settled[g], self.maybe[g], self.acked[g], self.held[g]
        return {o for o, p in self.records.items()
                if (o, p) not in s and (o, p) not in m and o not in a and o not in h}

    def delivered(self, g: str, off: int, data: bytes, who: str) -> None:
        """Check one delivery to group ``g`` against the model."""
        p = self.records.get(off)
        if p is None:
            self.fail(f"group {g} got offset {off} ({who}), which holds no accepted record "
                      f"(lost, dropped or never put); data {bytes(data)[:40]!r}")
        if bytes(data) != p:
            self.fail(f"group {g} got offset {off} ({who}) with a different payload than was put: "
                      f"{bytes(data)[:40]!r} instead of {p[:40]!r}")
        if off in self.held[g]:
            self.fail(f"group {g} got offset {off} ({who}) while this process still holds its lease "
                      f"(visibility_timeout {LONG}s)")
        if off in self.acked[g]:
            self.fail(f"group {g} got offset {off} ({who}) again after this process acked it")
        if (off, p) in self.settled[g]:
            self.fail(f"group {g} got offset {off} ({who}) again after its ack was committed")

    def take(self, g: str, ms: list[logq.Message], who: str) -> None:
        for m in ms:
            self.delivered(g, m.offset, m.data, who)
            self.held[g][m.offset] = m

    def observe(self, child_tags: tuple[str, ...] = ()) -> None:
        """Reconcile the model with the whole log (the queue is open, no child
        runs): every model record is there with its payload, except touched
        ones and (retention) settled ones below the first offset; records the
        model does not know are a dead child's unreported puts: those of
        ``child_tags`` anywhere, those of an earlier dead producer only past
        the model's end."""
        q = self.q
        assert q is not None
        with deadline(30, "scanning the queue"):
            first, nxt = q.first_offset, q.next_offset
            seen = dict(q.scan())
            lost_stat = q.stats()["lost_records"]
        for o, p in seen.items():
            try:
                tag, _ = identity(p)
            except AssertionError as e:
                self.fail(f"scan returned a corrupt record at offset {o}: {e}")
            if o in self.records and self.records[o] != p and (o, self.records[o]) in self.touched \
                    and tag in child_tags:
                del self.records[o]            # destroyed; a child that recovered the queue reused it
            if o in self.records:
                if self.records[o] != p:
                    self.fail(f"offset {o} holds {p[:30]!r}, but {self.records[o][:30]!r} was put there")
            elif tag in child_tags:
                self.records[o] = p            # a dead child's put that it did not live to report
            elif tag in self.dead_producers and o >= self.next:
                # A dead producer's whole record past the published end: the
                # child died holding the append lock before publishing it, and
                # recovery (a reopen, repair) keeps it (docs/durability.md,
                # "Recovery and damage"), as the next appender does in accept().
                self.records[o] = p
            else:
                self.fail(f"offset {o} holds {p[:30]!r}, a record the model never accepted there "
                          "(a stale or resurrected record?)")
        for o, p in sorted(self.records.items()):
            if o < first:
                self.retired(o, p)
            elif o not in seen:
                if (o, p) in self.touched:
                    del self.records[o]        # the damage destroyed it: legitimately lost
                else:
                    self.fail(f"accepted record at offset {o} ({p[:20]!r}) is gone, and this test "
                              f"never touched its bytes (log now {first}..{nxt}, touched offsets "
                              f"{sorted(x for x, _ in self.touched)[:30]})")
        if self.records and max(self.records) >= nxt:
            self.fail(f"next_offset {nxt} is not past the last record {max(self.records)}")
        missing = [o for o in range(first, nxt) if o not in seen]
        if lost_stat != len(missing):
            self.note(f"(stats lost_records {lost_stat}, holes {len(missing)})")
        self.next = nxt

    def retired(self, o: int, p: bytes) -> None:
        """Record ``o`` is below the first offset: deleted by retention."""
        if not self.drop_oldest:
            for g in self.groups:
                if (o, p) not in self.settled[g] and (o, p) not in self.maybe[g]:
                    self.fail(f"retention deleted offset {o}, which group {g} had not settled "
                              f"(no on_full='drop_oldest')")
        for g in self.groups:
            self.held[g].pop(o, None)
            self.acked[g].pop(o, None)
        del self.records[o]

    # -- set-up ------------------------------------------------------------------------
    @initialize(seg=st.sampled_from([4096, 8192, 16384]), ngroups=st.integers(2, 3),
                drop=st.booleans())
    def setup(self, seg: int, ngroups: int, drop: bool) -> None:
        self.segment_bytes = seg
        self.groups = [f"g{k}" for k in range(ngroups)]
        for g in self.groups:
            self.settled[g], self.maybe[g], self.acked[g], self.held[g] = set(), set(), {}, {}
        with logq.open(self.dir, segment_bytes=seg) as q:
            for g in self.groups:
                q.consumer(g, **GROUP_OPTIONS).close()
            base = q.stats()["disk_bytes"]
        self.drop_oldest = drop
        self.max_bytes = base + 8 * seg + 4 * (1 << 20)
        self.note(f"setup seg={seg} groups={ngroups} drop_oldest={drop}")
        self.open()

    def teardown(self) -> None:
        try:
            if self.log and self.groups:
                self.final_check()
        finally:
            try:
                self.close()
            finally:
                shutil.rmtree(self.root, ignore_errors=True)

    def final_check(self) -> None:
        if self.q is None:
            self.open()
            self.observe()
        for g in self.groups:
            self.drain_group(g)
        self.close()
        if not self.unrepaired:
            rep = logq.verify(self.dir)
            if not rep.clean or rep.torn_tail is not None:
                self.fail(f"verify is not clean after a clean close (no damage since the last "
                          f"repair): {rep.as_dict()}")

    # -- producing -----------------------------------------------------------------------
    def accept(self, got: range | int, items: list[bytes], what: str) -> None:
        offs = list(got) if isinstance(got, range) else [got]
        if offs and offs[0] > self.next and self.dead_producers:
            # A producer killed holding the append lock may have written
            # whole records it never published: the next appender keeps them
            # (docs/durability.md, "Recovery and damage").  They must be intact puts of
            # a dead child, exactly the gap before this put's offsets.
            for o in range(self.next, offs[0]):
                p = self.q.read(o)
                if identity(p)[0] not in self.dead_producers:
                    self.fail(f"{what}: offset {o} before its own holds {p[:30]!r}, not a dead child's put")
                self.records[o] = p
            self.next = offs[0]
        if offs != list(range(self.next, self.next + len(items))):
            self.fail(f"{what} returned offsets {offs[:5]}..., expected from {self.next}")
        for o, p in zip(offs, items):
            self.records[o] = p
        self.next += len(items)

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "put" not in SKIP)
    @rule(big=st.booleans())
    def put(self, big: bool) -> None:
        p = self.new_payload(big)
        try:
            off = self.q.put(p)
        except logq.QueueFullError:
            self.note("put: full")
            assert self.q.next_offset == self.next
            return
        self.note(f"put {off}")
        self.accept(off, [p], "put")

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "put_many" not in SKIP)
    @rule(n=st.integers(1, 40), bigs=st.integers(0, 3))
    def put_many(self, n: int, bigs: int) -> None:
        items = [self.new_payload(k < bigs) for k in range(n)]
        try:
            r = self.q.put_many(items)
        except logq.QueueFullError:
            self.note("put_many: full")
            assert self.q.next_offset == self.next
            return
        self.note(f"put_many {r.start}..{r.stop - 1}")
        self.accept(r, items, "put_many")

    # -- consuming -----------------------------------------------------------------------
    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "get" not in SKIP)
    @rule(k=st.integers(0, 2))
    def get(self, k: int) -> None:
        g = self.groups[k % len(self.groups)]
        try:
            m = self.cons[g].get(timeout=0)
        except logq.Empty:
            self.note(f"get {g}: empty")
            return
        self.note(f"get {g}: {m.offset}")
        self.take(g, [m], "get")

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "get_many" not in SKIP)
    @rule(k=st.integers(0, 2), n=st.integers(1, 50))
    def get_many(self, k: int, n: int) -> None:
        g = self.groups[k % len(self.groups)]
        ms = self.cons[g].get_many(n, timeout=0)
        self.note(f"get_many {g} {n}: {[m.offset for m in ms][:8]}{'...' if len(ms) > 8 else ''}")
        self.take(g, ms, "get_many")

    def pick(self, k: int, i: int) -> tuple[str, logq.Message | None]:
        g = self.groups[k % len(self.groups)]
        held = sorted(self.held[g])
        return g, (self.held[g][held[i % len(held)]] if held else None)

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "ack" not in SKIP)
    @rule(k=st.integers(0, 2), i=st.integers(0, 1 << 16))
    def ack(self, k: int, i: int) -> None:
        g, m = self.pick(k, i)
        if m is None:
            return
        self.cons[g].ack(m)
        self.note(f"ack {g} {m.offset}")
        del self.held[g][m.offset]
        self.acked[g][m.offset] = self.records[m.offset]

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "ack_all" not in SKIP)
    @rule(k=st.integers(0, 2), commit=st.booleans())
    def ack_all(self, k: int, commit: bool) -> None:
        g = self.groups[k % len(self.groups)]
        ms = list(self.held[g].values())
        self.cons[g].ack_many(ms)
        for m in ms:
            self.acked[g][m.offset] = self.records[m.offset]
        self.held[g].clear()
        self.note(f"ack_many {g} {len(ms)}")
        if commit:
            self.commit(k)

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "nack" not in SKIP)
    @rule(k=st.integers(0, 2), i=st.integers(0, 1 << 16), delay=st.sampled_from([None, 0, 0.001]))
    def nack(self, k: int, i: int, delay: float | None) -> None:
        g, m = self.pick(k, i)
        if m is None:
            return
        self.cons[g].nack(m, delay=delay)
        self.note(f"nack {g} {m.offset} delay={delay}")
        del self.held[g][m.offset]             # must come again

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "commit" not in SKIP)
    @rule(k=st.integers(0, 2))
    def commit(self, k: int) -> None:
        g = self.groups[k % len(self.groups)]
        self.cons[g].commit()
        self.note(f"commit {g}")
        self.settled[g] |= set(self.acked[g].items())
        self.acked[g].clear()

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "drain" not in SKIP)
    @rule(k=st.integers(0, 2))
    def drain(self, k: int) -> None:
        self.drain_group(self.groups[k % len(self.groups)])

    def drain_group(self, g: str) -> None:
        """Get, ack and (at the end) commit until nothing comes: everything
        the group must receive came.  Nacked messages must come without a
        commit (known defect 5: unless its flag is on)."""
        c = self.cons[g]
        self.note(f"drain {g} (must {len(self.must(g))})")
        for m in list(self.held[g].values()):    # what we hold counts as received: settle it
            c.ack(m)
            self.acked[g][m.offset] = self.records[m.offset]
        self.held[g].clear()
        with deadline(60, f"draining group {g}"):
            idle_since, committed = time.monotonic(), False
            while True:
                ms = c.get_many(64, timeout=0.05)
                if ms:
                    self.take(g, ms, "drain")
                    c.ack_many(ms)
                    for m in ms:
                        self.acked[g][m.offset] = self.records[m.offset]
                        del self.held[g][m.offset]
                    idle_since = time.monotonic()
                    continue
                left = self.must(g)
                if not left:
                    break
                if time.monotonic() - idle_since < IDLE:
                    continue
                if KNOWN_DEFECT_NACK_WAITS_FOR_COMMIT and not committed:
                    c.commit()
                    self.settled[g] |= set(self.acked[g].items())
                    self.acked[g].clear()
                    committed, idle_since = True, time.monotonic()
                    continue
                self.fail(f"group {g} is not given {len(left)} record(s) it never settled: offsets "
                          f"{sorted(left)[:30]} (log {self.q.first_offset}..{self.q.next_offset}; "
                          f"stats {self.q.stats()['groups'].get(g)})")
        c.commit()
        self.settled[g] |= set(self.acked[g].items())
        self.acked[g].clear()

    # -- processes -----------------------------------------------------------------------
    @precondition(lambda self: "close_reopen" not in SKIP)
    @rule(reopen=st.booleans())
    def close_reopen(self, reopen: bool) -> None:
        was_open = self.q is not None
        self.close()
        self.note("close" + (" + open" if reopen or not was_open else ""))
        if reopen or not was_open:
            self.open()
            self.observe()

    def spawn(self, cfg: dict) -> Child:
        import json
        return Child(CHILD_MAIN, os.path.join(self.root, f"child{self.children}.out"), json.dumps(cfg))

    def run_and_kill(self, cfg: dict, lines_before_kill: int) -> list[list[str]]:
        """Run a child, SIGKILL it once its report has that many lines (or it
        says ``ready``, or it exits), reap it; its finished report lines."""
        self.children += 1
        report = os.path.join(self.root, f"child{self.children}.report")
        cfg.update(dir=self.dir, report=report, segment_bytes=self.segment_bytes,
                   options=GROUP_OPTIONS, queue=self.options())
        kid = self.spawn(cfg)
        try:
            with deadline(30, "the child's work"):
                while kid.alive():
                    n = helpers.count_lines(report)
                    if n >= lines_before_kill:
                        break
                    with open(report, "rb") if os.path.exists(report) else open(os.devnull, "rb") as f:
                        if b"ready\n" in f.read():
                            break
                    time.sleep(0.002)
            kid.kill()
            kid.wait(30)
        finally:
            kid.reap()
        if kid.proc.returncode != -signal.SIGKILL:
            self.fail(f"child exited with {kid.proc.returncode} before the kill: {kid.output()}")
        try:
            with open(report, "rb") as f:
                data = f.read()
        except FileNotFoundError:      # killed before it opened the report
            data = b""
        return [line.decode().split() for line in data.split(b"\n")[:-1]]

    @precondition(lambda self: "child_producer_killed" not in SKIP)
    @rule(n=st.integers(1, 60), mode=st.sampled_from(["put", "put_many"]),
          kill_after=st.integers(0, 40))
    def child_producer_killed(self, n: int, mode: str, kill_after: int) -> None:
        """A child puts payload(tag, i) and reports each offset once put
        returned; SIGKILLed after ``kill_after`` reports (mid-put, likely)."""
        tag = f"k{self.children + 1}"
        lines = self.run_and_kill({"role": "producer", "tag": tag, "n": n, "mode": mode},
                                  kill_after)
        reported = [(int(o), int(i)) for w, o, i in (ln for ln in lines if ln[0] == "O")]
        self.note(f"child producer {tag} killed after {len(reported)} reported puts")
        self.dead_producers.add(tag)
        was_open = self.q is not None
        if not was_open:
            self.open()
        for o, i in reported:
            old = self.records.get(o)
            if old is not None and old != payload(tag, i):
                if (o, old) not in self.touched:
                    self.fail(f"child {tag} was given offset {o}, which holds an undamaged record")
                del self.records[o]            # destroyed by damage; the child's recovery reused it
        for o, i in reported:
            self.records.setdefault(o, payload(tag, i))
        self.observe(child_tags=(tag,))
        for o, i in reported:
            if self.records.get(o) != payload(tag, i):
                self.fail(f"child {tag}'s reported put {i} at offset {o} is not in the log")

    @precondition(lambda self: self.q is not None)
    @precondition(lambda self: "child_consumer_killed" not in SKIP)
    @rule(k=st.integers(0, 2), n=st.integers(1, 40), seed=st.integers(0, 1000),
          kill_after=st.integers(1, 200))
    def child_consumer_killed(self, k: int, n: int, seed: int, kill_after: int) -> None:
        """A child consumes the group in batches, acks some, commits, reports;
        SIGKILLed after ``kill_after`` report lines.  Its committed acks are
        settled; what it was committing when killed may go either way;
        everything else it had must come back."""
        g = self.groups[k % len(self.groups)]
        lines = self.run_and_kill({"role": "consumer", "group": g, "n": n, "seed": seed}, kill_after)
        committing: set[int] = set()
        got = 0
        for ln in lines:
            if ln[0] == "D":
                o, crc = int(ln[1]), int(ln[2])
                p = self.records.get(o)
                self.delivered(g, o, p if p is not None and _crc(p) == crc else b"<crc %d>" % crc,
                               "child consumer")
                got += 1
            elif ln[0] == "P":
                committing |= {int(x) for x in ln[1:]}
            elif ln[0] == "C":
                done = {int(x) for x in ln[1:]}
                self.settled[g] |= {(o, self.records[o]) for o in done}
                committing -= done
        self.maybe[g] |= {(o, self.records[o]) for o in committing}
        self.note(f"child consumer of {g} killed after {got} deliveries "
                  f"({len(committing)} acks in an unfinished commit)")

    # -- damage while closed -------------------------------------------------------------
    def spans(self, path: str, data: bytes) -> dict[int, tuple[int, int]]:
        """offset -> (start, end) of each model record intact in this file."""
        out = {}
        for o, p in self.records.items():
            pos = data.find(p)
            for meta in range(0, 300):      # the record's header is RH + meta_len bytes before
                start = pos - RH - meta
                if start < HDR:
                    break
                length, off = struct.unpack_from("<IQ", data, start + 4)
                (mlen,) = struct.unpack_from("<H", data, start + 24)
                if (length, off, mlen) == (len(p), o, meta):
                    if scan_bytes(data, start, o)[:1] == [(o, start, pos + len(p))]:
                        out[o] = (start, pos + len(p))
                    break
        return out

    def pick_segment(self, which: int) -> tuple[str, bytes, dict[int, tuple[int, int]]]:
        self.close()
        segs = segments(self.dir)
        path = segs[-1][1] if which == 0 or len(segs) < 2 else segs[which % (len(segs) - 1)][1]
        with open(path, "rb") as f:
            data = f.read()
        return path, data, self.spans(path, data)

    def after_damage(self, path: str, before: bytes, sp: dict[int, tuple[int, int]], what: str) -> None:
        with open(path, "rb") as f:
            now = f.read()
        hit = sorted(o for o, (a, b) in sp.items() if now[a:b] != before[a:b])
        # A put_many batch written since the last durable checkpoint belongs
        # to the log only whole (docs/durability.md, "Recovery and damage": its head
        # carries the count, and a damaged member cannot be told from a torn
        # write), so damage to one member may cost the batch.  The model
        # does not know where the checkpoint is: it allows that everywhere.
        batch_of: dict[int, int] = {}
        head = prev = None
        for o in sorted(sp):
            flags = before[sp[o][0] + 27]
            head = o if not flags & F.FLAG_CONT or head is None or o != prev + 1 else head
            batch_of[o], prev = head, o
        heads = {batch_of[o] for o in hit}
        hit = sorted(set(hit) | {o for o, h in batch_of.items() if h in heads})
        self.touched |= {(o, self.records[o]) for o in hit}
        self.damaged = self.unrepaired = True
        self.note(f"{what} of {os.path.basename(path)}: records {hit}")

    @precondition(lambda self: "truncate" not in SKIP)
    @rule(frac=st.floats(0, 1), which=st.integers(0, 3))
    def truncate(self, frac: float, which: int) -> None:
        """Cut the newest segment (which == 0, or it is the only one) or a
        sealed one at a random position near or inside its data."""
        path, data, sp = self.pick_segment(which)
        end = max([b for _, b in sp.values()], default=HDR)
        cut = int(frac * (end + 40))
        if DEFECT_EMPTY_SEALED_SEGMENT and path != segments(self.dir)[-1][1]:
            cut = max(cut, HDR)
        os.truncate(path, cut)
        self.after_damage(path, data, sp, f"truncate to {cut}")

    @precondition(lambda self: "overwrite" not in SKIP)
    @rule(frac=st.floats(0, 1), length=st.sampled_from([1, 4, 8, 30, 200]), zeros=st.booleans(),
          which=st.integers(0, 3), seed=st.integers(0, 1 << 16))
    def overwrite(self, frac: float, length: int, zeros: bool, which: int, seed: int) -> None:
        """Overwrite ``length`` bytes (zeros or garbage) of a segment at a
        random position among its records (the header included)."""
        path, data, sp = self.pick_segment(which)
        end = max([b for _, b in sp.values()], default=HDR)
        at = int(frac * (end + 20))
        blob = bytes(length) if zeros else random.Random(seed).randbytes(length)
        helpers.write_at(path, at, blob)
        self.after_damage(path, data, sp, f"{'zero' if zeros else 'garble'} {at}..{at + length}")

    @precondition(lambda self: "repair" not in SKIP)
    @rule()
    def repair(self) -> None:
        self.close()
        with deadline(60, "repair"):
            logq.repair(self.dir)
            rep = logq.verify(self.dir)
        self.note("repair")
        if not rep.clean or rep.torn_tail is not None:
            self.fail(f"verify after repair is not clean: damage "
                      f"{[d for d in rep.damage if not d.known]}, torn tail {rep.torn_tail}, "
                      f"index {rep.index}, unrepairable {rep.unrepairable}")
        self.unrepaired = False
        self.open()
        self.observe()

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def offsets_agree(self) -> None:
        if self.q is None:
            return
        nxt, first = self.q.next_offset, self.q.first_offset
        if nxt != self.next:
            self.fail(f"next_offset is {nxt}, the model says {self.next}")
        for o in [o for o in self.records if o < first]:
            self.retired(o, self.records[o])


def _settings() -> settings:
    if EXAMPLES:
        return settings(max_examples=EXAMPLES, phases=[p for p in Phase if p != Phase.shrink or not os.environ.get("LOGQ_MODEL_NOSHRINK")], stateful_step_count=STEPS or 50, deadline=None,
                        suppress_health_check=list(HealthCheck), derandomize=False,
                        report_multiple_bugs=False)
    phases = [p for p in Phase if p != Phase.shrink or not os.environ.get("LOGQ_MODEL_NOSHRINK")]
    return settings(max_examples=12, phases=phases, stateful_step_count=STEPS or 30, deadline=None,
                    suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None, report_multiple_bugs=False, print_blob=True)


QueueModel.TestCase.settings = _settings()
test_queue_model = QueueModel.TestCase


# -- regression tests for what the machine found ----------------------------------------
def test_sealed_segment_truncated_to_nothing_loses_only_its_records(tmp_path):
    """Found by the machine (finding F1): a sealed segment cut to 0 bytes
    made scan() and get raise TypeError (native codec) or spin forever
    (pure), and repair left it "unrepairable" with verify never clean.
    Only its records may be lost: the rest is served, and repair makes
    verify clean."""
    d = str(tmp_path / "q")
    with logq.open(d, segment_bytes=4096) as q:
        q.consumer("g").close()
        q.put(payload("m", 0))
        q.put(payload("bigm", 1))            # more than a segment: offset 1 is in a second one
    (_, first), _ = segments(d)[:2]
    os.truncate(first, 0)
    with deadline(20, "reading past an empty sealed segment"):
        with logq.open(d, segment_bytes=4096) as q:
            assert [(o, p) for o, p in q.scan()] == [(1, payload("bigm", 1))]
            assert [m.offset for m in q.consumer("g").get_many(10, timeout=0.5)] == [1]
        logq.repair(d)
        rep = logq.verify(d)
        assert rep.clean, rep.as_dict()
        with logq.open(d, segment_bytes=4096) as q:
            assert [o for o, _ in q.scan()] == [1]


def test_damaged_batch_head_above_the_checkpoint_costs_the_batch(tmp_path):
    """Found by the machine (finding F2): a child put_many's 8 records and is
    SIGKILLed (unclean shutdown, the checkpoint behind the batch); the
    batch's head is then damaged.  A writer killed while copying the head
    (written last) leaves exactly this, and that batch must not come back
    in part: above the durable checkpoint the batch goes whole (docs/durability.md,
    "Recovery and damage"), nothing damaged or partial is returned, and the
    queue is consistent afterwards (verify clean, puts follow)."""
    d = str(tmp_path / "q")
    logq.open(d, segment_bytes=4096).close()
    code = ("import logq, os, sys, helpers\n"
            "q = logq.open(sys.argv[1], segment_bytes=4096, checkpoint_interval=3600)\n"
            "q.put_many([helpers.payload('b', i) for i in range(8)])\n"
            "open(sys.argv[2], 'w').close()\n"
            "import time; time.sleep(100)\n")
    done = str(tmp_path / "done")
    kid = Child(code, str(tmp_path / "child.out"), d, done)
    try:
        helpers.wait_for(lambda: os.path.exists(done), 30, "the child's put_many")
    finally:
        kid.reap()
    _, newest = segments(d)[-1]
    with open(newest, "rb") as f:
        data = f.read()
    at = data.find(payload("b", 0))
    helpers.write_at(newest, at, bytes(len(payload("b", 0))))   # the batch head's payload: CRC fails
    with deadline(20, "recovery"):
        with logq.open(d, segment_bytes=4096) as q:
            assert list(q.scan()) == []
            assert q.next_offset == 0
            assert q.put(b"new") == 0
    assert logq.verify(d).clean

"""Shared machinery of the failure-mode suites (crash, power cut, tamper,
concurrency, bad input): payloads that carry their own identity, child
processes that inherit the environment (so LOGQ_PURE reaches them), a
deadline that turns a hang into a test failure, and a reader of segment
files that works from the bytes on disk, independently of logq's own
bookkeeping.

Child processes import this module too (``python -c "import helpers; ..."``);
``child_env`` puts the repository and this directory on their PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Iterable, Iterator

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import logq  # noqa: E402
from logq import _codec as C  # noqa: E402
from logq import _format as F  # noqa: E402

SEED = int(os.environ.get("LOGQ_TEST_SEED", "20240611"))


# -- payloads with an identity ------------------------------------------------
def payload(tag: str, i: int) -> bytes:
    """A deterministic payload that names itself: ``tag:i:`` then 0..299
    pseudo-random bytes (zeros and colons included) derived from both; 2000
    to 9999 bytes, spanning pages, for a tag that starts with "big"."""
    rng = random.Random(f"{tag}/{i}")
    n = rng.randrange(2000, 10000) if tag.startswith("big") else rng.randrange(300)
    return f"{tag}:{i}:".encode() + rng.randbytes(n)


def identity(p: bytes) -> tuple[str, int]:
    """(tag, i) of a payload made by :func:`payload`; AssertionError if the
    bytes are not exactly that payload (i.e. they are damaged or foreign)."""
    try:
        tag, i, _ = p.split(b":", 2)
        key = (tag.decode(), int(i))
    except (ValueError, UnicodeDecodeError):
        raise AssertionError(f"not a test payload (corrupt data returned?): {p[:60]!r}") from None
    assert p == payload(*key), f"payload {key} returned with damaged bytes: {p[:60]!r}..."
    return key


# -- deadlines ----------------------------------------------------------------
class Hang(AssertionError):
    """An operation did not finish in time (a hang is a failure, not a wait)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str = "the operation") -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than
    ``seconds``.  Nests: an outer deadline is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what} did not finish within {seconds:g}s (hung?)")

    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    if old_left and old_left < seconds:        # the outer deadline is sooner: keep it
        signal.setitimer(signal.ITIMER_REAL, old_left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_left:
            signal.setitimer(signal.ITIMER_REAL, max(old_left - (time.monotonic() - start), 0.001))


def wait_for(cond: Any, timeout: float, what: str, interval: float = 0.005) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise Hang(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# -- child processes ----------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """This process's environment (LOGQ_PURE included) with the repository
    and the tests directory on PYTHONPATH."""
    env = dict(os.environ)
    parts = [ROOT, TESTS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env


class Child:
    """A ``python -c`` child process whose output goes to a file (a pipe
    could fill up and block it).  Always ``reap`` it."""

    def __init__(self, code: str, log_path: str, *args: Any) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                     stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=child_env(), cwd=TESTS)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.reap()
            raise Hang(f"child {self.pid} did not exit within {timeout:g}s; its output:\n{self.output()}")

    def reap(self) -> None:
        self.kill()
        try:
            self.proc.wait(30)
        finally:
            self._log.close()

    def output(self, limit: int | None = 4000) -> str:
        """The child's output so far (its last ``limit`` bytes)."""
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except OSError:
            return "<no output>"
        return (data[-limit:] if limit else data).decode(errors="replace")


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """A list to put children in; every one is killed and reaped at exit."""
    kids: list[Child] = []
    try:
        yield kids
    finally:
        for k in kids:
            k.reap()


def run_child(code: str, log_path: str, *args: Any, timeout: float = 60) -> tuple[int, str]:
    """Run a child to completion; (returncode, all its output)."""
    kid = Child(code, log_path, *args)
    try:
        rc = kid.wait(timeout)
    finally:
        kid.reap()
    return rc, kid.output(None)


# -- the producer run by crash tests ---------------------------------------------
PRODUCER = "import helpers, sys; helpers.producer_main(sys.argv[1])"


def producer_main(config_json: str) -> None:
    """Put ``payload(tag, i)`` for i = 0, 1, ... and append ``off tag i`` to
    the report file only after the call returned (and after flush() when
    asked): every reported record was promised to survive.

    config: dir, tag, report, mode ("put" | "put_many"), fsync, flush (bool),
    segment_bytes, max_puts, batch_max, stop_file (close cleanly and exit 0
    once it exists), pause (seconds between puts), flush_every (flush after
    every that many puts and report ``F offset``: all up to it is durable),
    big (payloads of 2000..9999 bytes), fsync_interval, max_message_bytes."""
    cfg = json.loads(config_json)
    extra = {k: cfg[k] for k in ("fsync_interval", "max_message_bytes") if k in cfg}
    q = logq.open(cfg["dir"], fsync=cfg["fsync"], segment_bytes=cfg.get("segment_bytes", 4096), **extra)
    fd = os.open(cfg["report"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rng = random.Random(cfg["tag"])
    tag, i = ("big" if cfg.get("big") else "") + cfg["tag"], 0
    stop_file = cfg.get("stop_file")
    pause = cfg.get("pause", 0)
    while i < cfg.get("max_puts", 1 << 40):
        if stop_file and os.path.exists(stop_file):
            break
        if cfg.get("mode", "put") == "put_many":
            k = rng.randint(1, cfg.get("batch_max", 8))
            r = q.put_many([payload(tag, i + j) for j in range(k)])
            offs = list(r)
        else:
            k = 1
            offs = [q.put(payload(tag, i))]
        if cfg.get("flush"):
            q.flush()
        os.write(fd, "".join(f"{o} {tag} {i + j}\n" for j, o in enumerate(offs)).encode())
        i += k
        if cfg.get("flush_every") and i % cfg["flush_every"] == 0:
            q.flush()
            os.write(fd, f"F {offs[-1]}\n".encode())
        if pause:
            time.sleep(pause)
    if stop_file:
        q.close()
        os.write(fd, b"closed\n")
        return
    while True:  # wait for the SIGKILL
        time.sleep(1)


def read_report(path: str) -> list[tuple[int, str, int]]:
    """The ``off tag i`` lines of a report (a final line without its newline
    was not finished: ignored)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n")[:-1]:
        parts = line.split()
        if len(parts) == 3:
            out.append((int(parts[0]), parts[1].decode(), int(parts[2])))
    return out


def read_flushes(path: str) -> list[int]:
    """The offsets of the ``F offset`` lines of a report: flush() had
    returned after the put of that offset."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    return [int(line.split()[1]) for line in lines if line.startswith(b"F ")]


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


# -- checking a queue's contents ------------------------------------------------
def verify_contents(q: logq.Queue, reported: Iterable[tuple[int, str, int]], *,
                    max_unreported: int | None = None,
                    tag_order: list[str] | None = None,
                    expect_lost: int | None = 0) -> dict[tuple[str, int], int]:
    """Check a queue written by producers of ``payload(tag, i)``:

    * scan yields dense offsets first..next-1 (when no loss is expected),
      every payload intact and a valid identity, none twice;
    * every reported (off, tag, i) is at exactly that offset (read and scan);
    * per tag, the stored i are 0..k with increasing offsets (no gap, no
      reordering), and at most ``max_unreported`` beyond the last reported;
    * tags in ``tag_order`` occupy consecutive offset ranges in that order.

    Returns identity -> offset."""
    reported = list(reported)
    with deadline(60, "verifying the queue"):
        first, nxt = q.first_offset, q.next_offset
        entries = list(q.scan())
        offs = [o for o, _ in entries]
        if expect_lost == 0:
            assert offs == list(range(first, nxt)), (
                f"scan is not dense over [{first}, {nxt}): {len(offs)} records, "
                f"missing {sorted(set(range(first, nxt)) - set(offs))[:20]}")
            assert q.stats()["lost_records"] == 0
        assert offs == sorted(set(offs)), "scan returned offsets out of order or twice"
        seen: dict[tuple[str, int], int] = {}
        for o, p in entries:
            key = identity(p)
            assert key not in seen, f"{key} stored twice: at offsets {seen[key]} and {o}"
            seen[key] = o
        for off, tag, i in reported:
            assert seen.get((tag, i)) == off, (
                f"reported record {tag}:{i} at offset {off} is "
                + ("missing" if (tag, i) not in seen else f"at offset {seen[(tag, i)]}"))
            assert q.read(off) == payload(tag, i)
        last_reported: dict[str, int] = {}
        for _, tag, i in reported:
            last_reported[tag] = max(last_reported.get(tag, -1), i)
        per_tag: dict[str, list[tuple[int, int]]] = {}
        for (tag, i), o in seen.items():
            per_tag.setdefault(tag, []).append((i, o))
        for tag, items in per_tag.items():
            items.sort()
            assert [i for i, _ in items] == list(range(len(items))), (
                f"producer {tag}: stored records are not a gap-free prefix "
                f"(a record lost in the middle?): {[i for i, _ in items][:50]}")
            assert [o for _, o in items] == sorted(o for _, o in items), (
                f"producer {tag}: records stored out of order")
            if max_unreported is not None:
                extra = len(items) - 1 - last_reported.get(tag, -1)
                assert extra <= max_unreported, (
                    f"producer {tag}: {extra} records beyond the last reported one")
        if tag_order:
            ranges = [(min(o for _, o in per_tag[t]), max(o for _, o in per_tag[t]))
                      for t in tag_order if t in per_tag]
            for (_, a_hi), (b_lo, _) in zip(ranges, ranges[1:]):
                assert a_hi < b_lo, "records of successive producers are interleaved"
    return seen


# -- the bytes on disk -------------------------------------------------------------
def segments(qdir: str) -> list[tuple[int, str]]:
    """(base, path) of every segment file, oldest first."""
    out = []
    for name in os.listdir(qdir):
        base = F.parse_segment_name(name)
        if base is not None:
            out.append((base, os.path.join(qdir, name)))
    return sorted(out)


def scan_bytes(buf: bytes | bytearray, start: int, expected: int) -> list[tuple[int, int, int]]:
    """(offset, position, end) of the consecutive intact records in ``buf``
    from ``start``, the first carrying offset ``expected``."""
    h = C.handle(bytearray(buf))
    try:
        n, stop, status, fields = C.scan(h, start, len(buf), expected, 1 << 40, True)
    finally:
        C.release(h)
    out = []
    fields = fields or []
    for k in range(n):
        pos, ppos, plen = fields[k * F.SCAN_FIELDS:k * F.SCAN_FIELDS + 3]
        out.append((expected + k, pos, ppos + plen))
    return out


def segment_records(path: str, base: int) -> list[tuple[int, int, int]]:
    with open(path, "rb") as f:
        buf = f.read()
    return scan_bytes(buf, F.SEGMENT_HEADER_SIZE, base)


def record_map(qdir: str) -> dict[int, tuple[str, int, int]]:
    """offset -> (segment path, position, end) for every record on disk."""
    out = {}
    for base, path in segments(qdir):
        for off, pos, end in segment_records(path, base):
            out[off] = (path, pos, end)
    return out


def checkpoint(qdir: str) -> tuple[int, int, int] | None:
    """The (segment base, position, next offset) checkpoint in the index,
    read with LMDB directly (read-only, no lock)."""
    import lmdb
    idx = os.path.join(qdir, F.INDEX_DIR)
    if not os.path.exists(os.path.join(idx, "data.mdb")):
        return None
    env = lmdb.open(idx, readonly=True, lock=False, max_dbs=16, subdir=True)
    try:
        db = env.open_db(b"main", create=False)
        with env.begin() as t:
            raw = t.get(b"checkpoint", db=db)
    finally:
        env.close()
    return struct.unpack("<QQQ", raw) if raw else None


def segment_header(base: int, version: int = F.FORMAT_VERSION) -> bytes:
    """A segment header with a correct CRC (for any version)."""
    head = F.SEGMENT_HEADER.pack(F.SEGMENT_MAGIC, version, F.SEGMENT_HEADER_SIZE, 0, base, 0)
    crc = F.mask_crc(C.crc32c(head[:F.SEGMENT_HEADER_CRC_AT]))
    return head[:F.SEGMENT_HEADER_CRC_AT] + struct.pack("<I", crc)


def write_at(path: str, pos: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


def build_queue(qdir: str, n: int, tag: str = "t", *, segment_bytes: int = 4096,
                read_all: bool = False) -> list[bytes]:
    """A closed queue of ``n`` records ``payload(tag, i)`` at offsets 0..n-1.
    With ``read_all`` every record is read before closing, so the sealed
    segments' sparse indexes are stored in the index."""
    items = [payload(tag, i) for i in range(n)]
    with logq.open(qdir, fsync="batch", segment_bytes=segment_bytes) as q:
        for k in range(0, n, 7):
            q.put_many(items[k:k + 7])
        assert q.next_offset == n
        if read_all:
            q.flush()   # the checkpoint vouches for the sealed segments: their indexes may be stored
            assert [p for _, p in q.scan()] == items
    if read_all:
        import lmdb
        env = lmdb.open(os.path.join(qdir, F.INDEX_DIR), max_dbs=16, readonly=True, lock=False)
        try:
            with env.begin() as txn:
                stored = txn.stat(env.open_db(b"segments", txn=txn, create=False))["entries"]
        finally:
            env.close()
        assert stored >= 2, "the sealed segments' sparse indexes were not stored"
    return items


CHECK_QUEUES = "import helpers, sys; helpers.check_queues_main(sys.argv[1:])"


def check_queues_main(args: list[str]) -> None:
    """Child entry: for each ``dir:n:tag`` open the queue, check it holds
    exactly payload(tag, 0..n-1), put one more record, reopen and read it.
    Prints ``ok DIR`` or ``fail DIR: why`` after each (so that a crash, which
    prints neither, names the queue it died on)."""
    for arg in args:
        qdir, n, tag = arg.rsplit(":", 2)
        n = int(n)
        print("checking", qdir, flush=True)
        try:
            with logq.open(qdir, segment_bytes=4096) as q:
                got = list(q.scan())
                assert [o for o, _ in got] == list(range(n)), f"offsets {[o for o, _ in got][:20]}..."
                assert all(p == payload(tag, o) for o, p in got), "damaged payload returned"
                assert q.stats()["lost_records"] == 0
                assert q.put(b"new") == n
            with logq.open(qdir) as q:
                assert q.read(n) == b"new"
                assert q.next_offset == n + 1
        except Exception as e:  # noqa: BLE001 - reported to the parent
            print(f"fail {qdir}: {type(e).__module__}.{type(e).__name__}: {e}", flush=True)
        else:
            print("ok", qdir, flush=True)


# -- the producers and reader run by concurrency tests ------------------------------
CONCURRENT = "import helpers, sys; helpers.concurrent_main(sys.argv[1])"
READER = "import helpers, sys; helpers.reader_main(sys.argv[1])"


def _wait_go(cfg: dict) -> None:
    open(cfg["ready"], "w").close()
    end = time.monotonic() + 60
    while not os.path.exists(cfg["go"]):
        if time.monotonic() > end:
            raise SystemExit("no go signal")
        time.sleep(0.001)


def concurrent_main(config_json: str) -> None:
    """Child entry: ``threads`` threads share one Queue and put ``per_thread``
    payloads each (thread 0 with put_many in threes); every thread's
    (offset, tag, i) list is checked by reading back, then written as JSON.

    config: dir, fsync, tag, threads, per_thread, ready, go, result."""
    cfg = json.loads(config_json)
    q = logq.open(cfg["dir"], fsync=cfg["fsync"], segment_bytes=4096)
    _wait_go(cfg)
    results: list[list[tuple[int, str, int]]] = [[] for _ in range(cfg["threads"])]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        tag, out, i, per = f"{cfg['tag']}t{t}", results[t], 0, cfg["per_thread"]
        try:
            while i < per:
                if t == 0:
                    items = [payload(tag, i + j) for j in range(min(3, per - i))]
                    out += [(o, tag, i + j) for j, o in enumerate(q.put_many(items))]
                    i += len(items)
                else:
                    out.append((q.put(payload(tag, i)), tag, i))
                    i += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(cfg["threads"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    for out in results:
        for o, tag, i in out:
            assert q.read(o) == payload(tag, i), f"read({o}) in the process that put it"
    q.close()
    with open(cfg["result"] + ".tmp", "w") as f:
        json.dump([r for out in results for r in out], f)
    os.rename(cfg["result"] + ".tmp", cfg["result"])


def reader_main(config_json: str) -> None:
    """Child entry: follow the queue from offset 0 while others put, until
    ``n`` records were seen, checking every payload; write [(off, tag, i)].

    config: dir, n, ready, go, result."""
    cfg = json.loads(config_json)
    q = logq.open(cfg["dir"], fsync="never", segment_bytes=4096)
    _wait_go(cfg)
    seen: list[tuple[int, str, int]] = []
    off, end = 0, time.monotonic() + 90
    while off < cfg["n"]:
        if time.monotonic() > end:
            raise SystemExit(f"reader stuck at offset {off} of {cfg['n']}")
        first, payloads = q.read_many(off, 500)
        assert not payloads or first == off, f"records {off}..{first - 1} skipped as lost"
        for k, p in enumerate(payloads):
            tag, i = identity(p)
            seen.append((first + k, tag, i))
        off = first + len(payloads)
        if not payloads:
            time.sleep(0.001)
    q.close()
    with open(cfg["result"] + ".tmp", "w") as f:
        json.dump(seen, f)
    os.rename(cfg["result"] + ".tmp", cfg["result"])


# -- the children of the model-based test (test_model.py) ---------------------------
def model_child_main(config_json: str) -> None:
    """Child entry for test_model: a producer or a consumer that reports
    what it did, one line per event, and waits for its SIGKILL.

    producer (tag, n, mode): puts payload(tag, i), i = 0..n-1, one by one or
    in put_many batches of 1..8; ``O offset i`` after each put returned.

    consumer (group, n, seed, options): get_many batches of 1..n (now and
    then get()), ``D offset crc32`` for each message delivered; acks a random
    part; every other batch commits: ``P offsets`` before commit(), ``C
    offsets`` after it returned.  Stops when two gets in a row find nothing.

    Both write ``ready`` at the end and sleep; the parent kills them
    whenever it likes.  config also: dir, report, queue (open options)."""
    import zlib
    cfg = json.loads(config_json)
    q = logq.open(cfg["dir"], **cfg["queue"])
    fd = os.open(cfg["report"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    rng = random.Random(json.dumps(cfg, sort_keys=True))
    if cfg["role"] == "producer":
        i, n, tag = 0, cfg["n"], cfg["tag"]
        while i < n:
            if cfg["mode"] == "put_many":
                k = min(rng.randint(1, 8), n - i)
                offs = list(q.put_many([payload(tag, i + j) for j in range(k)]))
            else:
                k, offs = 1, [q.put(payload(tag, i))]
            os.write(fd, "".join(f"O {o} {i + j}\n" for j, o in enumerate(offs)).encode())
            i += k
    else:
        c = q.consumer(cfg["group"], **cfg["options"])
        empty, batch, unsaved = 0, 0, []
        while empty < 2:
            if rng.random() < 0.2:
                try:
                    ms = [c.get(timeout=0.05)]
                except logq.Empty:
                    ms = []
            else:
                ms = c.get_many(rng.randint(1, cfg["n"]), timeout=0.05)
            if not ms:
                empty += 1
                continue
            empty = 0
            os.write(fd, "".join(f"D {m.offset} {zlib.crc32(m.data) & 0xFFFFFFFF}\n" for m in ms).encode())
            acks = [m for m in ms if rng.random() < 0.7]
            c.ack_many(acks)
            unsaved += acks                   # commit() makes every ack since the last one durable
            batch += 1
            if batch % 2 == 0 and unsaved:
                offs = " ".join(str(m.offset) for m in unsaved)
                os.write(fd, f"P {offs}\n".encode())
                c.commit()
                os.write(fd, f"C {offs}\n".encode())
                unsaved = []
    os.write(fd, b"ready\n")
    while True:
        time.sleep(1)


class Daemon:
    """A long-running command (a Celery or Dramatiq worker) in its own
    session, so that a SIGKILL of its process group takes its children too,
    logging to ``log_path``; started when its log says ``ready`` (or
    AssertionError with the log's tail after ``timeout`` s)."""

    def __init__(self, argv: list[str], log_path: str, ready: str, *, env: dict[str, str],
                 cwd: str, timeout: float = 60.0) -> None:
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while ready not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{argv[2:4]} did not start:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL to every process of its session."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        """SIGTERM to the main process only (its own warm shutdown); SIGKILL
        after 20 s."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def mark_run(runs_dir: str, token: str) -> int:
    """Record one run of ``token`` under ``runs_dir`` (a line: pid, time),
    from any process; how many runs so far (this one included)."""
    os.makedirs(runs_dir, exist_ok=True)
    path = os.path.join(runs_dir, token)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)
    with open(path) as f:
        return len(f.read().splitlines())


def runs_of(runs_dir: str, token: str) -> list[tuple[int, float]]:
    """The runs ``mark_run`` recorded for ``token``: (pid, time) each."""
    try:
        with open(os.path.join(runs_dir, token)) as f:
            return [(int(p), float(t)) for p, t in (line.split() for line in f if line.strip())]
    except FileNotFoundError:
        return []


# -- kill points: a victim process that SIGKILLs itself at its k-th event -----------
def kill_at_event(kill_at: int) -> Any:
    """An event counter for a kill-point test's victim: each call counts one
    event, and the ``kill_at``-th SIGKILLs this process (never, if 0).
    ``.count`` is the number so far."""
    def event() -> None:
        event.count += 1    # type: ignore[attr-defined]
        if event.count == kill_at:  # type: ignore[attr-defined]
            os.kill(os.getpid(), signal.SIGKILL)
    event.count = 0     # type: ignore[attr-defined]
    return event


def around_writes(event: Any) -> None:
    """Count an event just before and just after each LMDB write
    transaction of this process (the index's and the lease table's)."""
    from logq import _index
    write = _index._Env.write

    def counted(self: Any, fn: Any) -> Any:
        event()
        out = write(self, fn)
        event()
        return out
    _index._Env.write = counted     # type: ignore[method-assign]


class Victim:
    """A forked child for a kill-point test: it waits for ``go()``, then
    runs ``fn(*args, report_fd)`` and exits.  Fork it before this process
    opens a queue or starts a thread (a fork copies neither safely); the
    parent opens the queue, then says ``go``.  ``finish()`` reads the
    report to its end and reaps the child: (SIGKILLed, the report)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._r, w = os.pipe()
        go_r, self._go = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self._r)
                os.close(self._go)
                os.read(go_r, 1)
                fn(*args, w)
            finally:
                os._exit(3)
        os.close(w)
        os.close(go_r)

    def go(self) -> None:
        os.write(self._go, b"g")

    def finish(self) -> tuple[bool, str]:
        data = b""
        while chunk := os.read(self._r, 65536):
            data += chunk
        os.close(self._r)
        os.close(self._go)
        _, status = os.waitpid(self.pid, 0)
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, data.decode()

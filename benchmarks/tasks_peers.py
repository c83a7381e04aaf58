"""The task queues logq's tasks layer is measured against (issue 12): the
same no-op task end to end *with its result stored*, in huey (SqliteHuey),
Celery and RQ on a local ``redis-server``, and Dramatiq on the same Redis.

The workload, for each of them: the peer's own worker command runs with 2
worker processes and is warm (it has run tasks) before the clock starts;
then a producer process submits N tasks ``noop(i)`` (which returns ``i``)
one call at a time and the clock stops when the results of all N are
stored (the producer polls the result store every few ms with one cheap
call: a count where the peer keeps one, else an EXISTS of the next 100
result keys not yet seen).  Figure: N / (last result stored - first submit), tasks/s.  Every
result is then read back through the peer's own API and must be ``i``: a
run with a missing or wrong result posts no figure.

Durability, stated beside each figure (:data:`DURABILITY`): Redis runs
with ``appendonly yes`` and ``appendfsync everysec`` (an fsync of the
append-only file once a second: the closest to logq's default
``fsync="batch"``, which fsyncs every 0.2 s), no RDB snapshots; SqliteHuey
runs in WAL mode with ``synchronous=NORMAL`` (a commit survives the death
of the process, the WAL is fsynced at checkpoints: the mapping
``logq bench --compare`` uses for ``fsync="batch"``).  Each peer keeps its
own delivery default otherwise (named in :data:`DURABILITY`).

``redis-server`` is started by this module on 127.0.0.1, on a free port,
in a scratch directory; it is Debian's package ``redis-server`` (not
installed: the Redis peers are reported as not measured, with the command
that installs it).  The peers are the ``peers`` extra of pyproject.toml.

logq's own row comes from :func:`run_logq` once ``logq.tasks`` has an
``App``.

Run on its own: ``python benchmarks/tasks_peers.py [N]``; under pytest:
``benchmarks/test_tasks_peers.py``.  Worker processes import this module
by name (the peers' worker commands take ``tasks_peers.<attribute>``),
so it keeps every peer's import inside a function or ``__getattr__``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)

#: Tasks per peer at LOGQ_BENCH_SCALE=1, times the peer's share below: all
#: four together take about a minute on a 2-core machine.
N_TASKS = 2000
#: RQ forks a process per job (~25-100 jobs/s here): it runs a fifth of N.
SHARE = {"huey": 1.0, "celery": 1.0, "rq": 0.2, "dramatiq": 1.0, "logq": 1.0}
WORKERS = 2
WARM_TASKS = 20
POLL_SECONDS = 0.005
#: A run whose result count stops moving this long fails (a broken peer).
STALL_SECONDS = 30.0
QUEUE_NAME = "logq_bench"

DURABILITY = {
    "huey": "SqliteHuey, WAL, synchronous=NORMAL (commit survives a crash of the process; "
            "fsync at WAL checkpoints); consumer -k process -w 2, polling delay 1 ms..10 ms; "
            "results in the same SQLite file",
    "celery": "Redis broker and result backend (appendonly yes, appendfsync everysec); "
              "prefork -c 2, acks on receipt (Celery's default), prefetch multiplier 4; "
              "without gossip/mingle/heartbeat",
    "rq": "Redis (appendonly yes, appendfsync everysec); 2 `rq worker` processes, each forking "
          "a work horse per job (RQ's default Worker); results in Redis",
    "dramatiq": "RedisBroker (appendonly yes, appendfsync everysec), acks after the task; "
                "2 processes x 1 thread; Results middleware, RedisBackend",
    "logq": "logq.tasks, fsync=\"batch\" (the default: fsync every 0.2 s), 2 workers",
}


def noop(i: int) -> int:
    """The task every peer runs: returns its argument, so each result can be checked."""
    return i


def n_tasks(peer: str = "logq") -> int:
    """N_TASKS times LOGQ_BENCH_SCALE times the peer's :data:`SHARE` (at least 100)."""
    raw = os.environ.get("LOGQ_BENCH_SCALE", "")
    scale = float(raw) if raw else 1.0
    if not scale > 0:
        raise ValueError(f"LOGQ_BENCH_SCALE must be positive, not {raw!r}")
    return max(100, int(N_TASKS * scale * SHARE[peer]))


# -- redis-server -------------------------------------------------------------------------
REDIS_SETTINGS = ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
REDIS_MISSING = ("redis-server is not installed: the Redis peers (Celery, RQ, Dramatiq) are not "
                 "measured.  Debian/Ubuntu: apt-get install -y redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 at a free port, in ``directory``, with
    :data:`REDIS_SETTINGS`; a context manager.  ``url(db)`` is its URL."""

    def __init__(self, directory: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError(REDIS_MISSING)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", directory,
             "--daemonize", "no", "--protected-mode", "no", "--loglevel", "warning",
             *REDIS_SETTINGS],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                self.close()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {err.strip()}")
            time.sleep(0.02)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- the peers' apps, built from the environment in worker and producer processes ------------
_APPS: dict[str, Any] = {}


def _huey() -> Any:
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class NormalSyncStorage(SqliteStorage):
        def _create_connection(self) -> Any:
            conn = super()._create_connection()
            conn.execute("pragma synchronous=1")          # NORMAL
            return conn

    h = SqliteHuey("logq_bench", filename=os.environ["LOGQ_PEER_SQLITE"], results=True,
                   storage_class=NormalSyncStorage)
    h.bench_noop = h.task(name="noop")(noop)
    return h


def _celery() -> Any:
    from celery import Celery
    url = os.environ["LOGQ_PEER_REDIS"]
    app = Celery("logq_bench", broker=url, backend=url)
    app.conf.update(task_default_queue=QUEUE_NAME, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, task_serializer="json", result_serializer="json",
                    accept_content=["json"])
    app.bench_noop = app.task(name="noop")(noop)
    return app


def _dramatiq() -> Any:
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends.redis import RedisBackend
    url = os.environ["LOGQ_PEER_REDIS"]
    broker = RedisBroker(url=url)
    broker.add_middleware(Results(backend=RedisBackend(url=url)))
    dramatiq.set_broker(broker)
    dramatiq.actor(noop, actor_name="noop", queue_name=QUEUE_NAME, store_results=True, max_retries=0)
    return broker


_BUILDERS: dict[str, Callable[[], Any]] = {"huey_app": _huey, "celery_app": _celery,
                                            "dramatiq_broker": _dramatiq}


def __getattr__(name: str) -> Any:
    """``tasks_peers.huey_app`` etc., built on first use (the worker commands
    look them up by name; building one imports only its peer)."""
    if name in _BUILDERS:
        if name not in _APPS:
            _APPS[name] = _BUILDERS[name]()
        return _APPS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _app(name: str) -> Any:
    return __getattr__(name)


# -- what each peer does --------------------------------------------------------------------
@dataclass
class Peer:
    """How to run one peer: its worker command, how the producer submits a
    task, how it counts the results stored (cheaply, for the clock) and
    reads one back (for the check)."""
    name: str
    modules: tuple[str, ...]
    needs_redis: bool
    db: int = 0

    def available(self) -> str | None:
        """None, or why this peer cannot be measured here."""
        import importlib.util
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed ({', '.join(missing)}): pip install -e '.[peers]'"
        return None

    def worker_commands(self) -> list[list[str]]:
        py = sys.executable
        if self.name == "huey":
            return [[py, "-m", "huey.bin.huey_consumer", "tasks_peers.huey_app", "-w", str(WORKERS),
                     "-k", "process", "-d", "0.001", "-m", "0.01", "-b", "1.1", "-C", "-q"]]
        if self.name == "celery":
            return [[py, "-m", "celery", "-A", "tasks_peers:celery_app", "worker", "-c", str(WORKERS),
                     "-P", "prefork", "-Q", QUEUE_NAME, "--without-gossip", "--without-mingle",
                     "--without-heartbeat", "-l", "warning"]]
        if self.name == "rq":
            cmd = [py, "-c", "import sys; from rq.cli import main; sys.exit(main())", "worker",
                   "--url", os.environ["LOGQ_PEER_REDIS"], "--quiet", QUEUE_NAME]
            return [cmd for _ in range(WORKERS)]
        if self.name == "dramatiq":
            return [[py, "-m", "dramatiq", "tasks_peers:dramatiq_broker", "--processes", str(WORKERS),
                     "--threads", "1", "--path", BENCH_DIR]]
        raise ValueError(self.name)


PEERS = {
    "huey": Peer("huey", ("huey",), False),
    "celery": Peer("celery", ("celery", "redis"), True, 1),
    "rq": Peer("rq", ("rq", "redis"), True, 2),
    "dramatiq": Peer("dramatiq", ("dramatiq", "redis"), True, 3),
}


class _Client:
    """The producer side of one peer: submit(i) -> handle; done(handles) ->
    how many results are stored; value(handle) -> the stored result."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        if peer == "huey":
            self.h = _app("huey_app")
        elif peer == "celery":
            self.app = _app("celery_app")
            self.task = self.app.bench_noop
        elif peer == "rq":
            from redis import Redis
            from rq import Queue
            self.r = Redis.from_url(os.environ["LOGQ_PEER_REDIS"])
            self.q = Queue(QUEUE_NAME, connection=self.r)
            self.finished0 = self.q.finished_job_registry.count
        elif peer == "dramatiq":
            import dramatiq
            self.broker = _app("dramatiq_broker")
            self.actor = self.broker.get_actor("noop")
            self.backend = next(m for m in self.broker.middleware
                                if type(m).__name__ == "Results").backend
            self.dramatiq = dramatiq
        self.seen = 0
        if peer in ("celery", "dramatiq"):
            from redis import Redis
            self.r = Redis.from_url(os.environ["LOGQ_PEER_REDIS"])

    def submit(self, i: int) -> Any:
        if self.peer == "huey":
            return self.h.bench_noop(i)
        if self.peer == "celery":
            return self.task.delay(i)
        if self.peer == "rq":
            # by name: the producer may run as __main__, the worker imports tasks_peers
            return self.q.enqueue("tasks_peers.noop", i, result_ttl=3600)
        return self.actor.send(i)

    def _keys(self, handles: list[Any]) -> list[str]:
        if self.peer == "celery":
            return [self.app.backend.get_key_for_task(h.id).decode() for h in handles]
        return [self.backend.build_message_key(h) for h in handles]

    def done(self, handles: list[Any], keys: list[str] | None) -> int:
        if self.peer == "huey":
            return self.h.storage.result_store_size()
        if self.peer == "rq":
            return self.q.finished_job_registry.count - self.finished0
        # Only the keys past the ones already seen stored, a chunk at a time:
        # asking for all N keys every few ms would load the Redis being measured.
        while self.seen < len(keys):
            chunk = keys[self.seen:self.seen + 100]
            if self.r.exists(*chunk) < len(chunk):
                break
            self.seen += len(chunk)
        return self.seen

    def value(self, handle: Any) -> Any:
        if self.peer == "huey":
            return handle.get(blocking=True, timeout=10)
        if self.peer == "celery":
            return handle.get(timeout=10)
        if self.peer == "rq":
            deadline = time.monotonic() + 10
            while True:
                status = handle.get_status(refresh=True)
                if status in ("finished", "failed") or time.monotonic() > deadline:
                    return handle.return_value()
                time.sleep(POLL_SECONDS)
        return handle.get_result(backend=self.backend, block=True, timeout=10_000)


def produce(peer: str, n: int, warm: int) -> dict[str, Any]:
    """The producer process's part: warm the workers (``warm`` tasks, their
    results awaited), then time ``n`` submissions until all results are
    stored; then check every result.  Returns the measurements."""
    c = _Client(peer)
    for i in range(warm):
        assert c.value(c.submit(-1 - i)) == -1 - i, f"{peer}: warm-up task {i} gave a wrong result"
    if peer == "rq":
        c.finished0 = c.q.finished_job_registry.count
    t0 = time.perf_counter()
    handles = [c.submit(i) for i in range(n)]
    t_submitted = time.perf_counter()
    keys = c._keys(handles) if peer in ("celery", "dramatiq") else None
    last, moved = -1, time.perf_counter()
    while True:
        done = c.done(handles, keys)
        now = time.perf_counter()
        if done >= n:
            break
        if done != last:
            last, moved = done, now
        elif now - moved > STALL_SECONDS:
            raise RuntimeError(f"{peer}: results stopped at {done} of {n} for {STALL_SECONDS:.0f} s")
        time.sleep(POLL_SECONDS)
    t_done = time.perf_counter()
    wrong = [(i, v) for i, v in ((i, c.value(h)) for i, h in enumerate(handles)) if v != i]
    if wrong:
        raise RuntimeError(f"{peer}: {len(wrong)} of {n} results missing or wrong, e.g. {wrong[:3]}")
    return {"peer": peer, "n": n, "submit_s": t_submitted - t0, "total_s": t_done - t0,
            "rate": n / (t_done - t0)}


# -- the parent's part ------------------------------------------------------------------------
@dataclass
class PeerFigure:
    """One row: ``rate`` tasks/s (None: not measured, ``why`` says why)."""
    peer: str
    n: int
    rate: float | None
    submit_rate: float | None
    durability: str
    why: str = ""


def _env(peer: Peer, redis: RedisServer | None, workdir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([BENCH_DIR, ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["LOGQ_PEER_SQLITE"] = os.path.join(workdir, "huey.db")
    if redis is not None:
        env["LOGQ_PEER_REDIS"] = redis.url(peer.db)
    return env


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_peer(name: str, n: int, workdir: str, redis: RedisServer | None) -> PeerFigure:
    """Measure one peer (see the module docstring); a peer that cannot run
    here gives a row with ``rate`` None and the reason.  A run that goes
    wrong (a result missing or wrong, a worker that died) raises."""
    peer = PEERS[name]
    why = peer.available() or (REDIS_MISSING if peer.needs_redis and redis is None else None)
    if why:
        return PeerFigure(name, n, None, None, DURABILITY[name], why)
    d = tempfile.mkdtemp(prefix=f"{name}-", dir=workdir)
    env = _env(peer, redis, d)
    if redis is not None and peer.needs_redis:
        from redis import Redis
        Redis.from_url(env["LOGQ_PEER_REDIS"]).flushdb()
    logs: list[Any] = []
    procs: list[subprocess.Popen] = []
    try:
        for i, cmd in enumerate(_commands(peer, env)):
            log = open(os.path.join(d, f"worker{i}.log"), "wb")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "produce", name, str(n)],
                             env=env, cwd=d, capture_output=True, text=True, timeout=600)
        dead = [p.args for p in procs if p.poll() is not None]
        if out.returncode != 0 or dead:
            tail = ""
            for log in logs:
                log.flush()
                with open(log.name, "rb") as fh:
                    tail += fh.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"{name}: producer exit {out.returncode}, dead workers {dead}\n"
                               f"{out.stderr[-3000:]}\nworker logs:\n{tail}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        return PeerFigure(name, n, res["rate"], n / res["submit_s"], DURABILITY[name])
    finally:
        _stop(procs)
        for log in logs:
            log.close()
        shutil.rmtree(d, ignore_errors=True)


def _commands(peer: Peer, env: dict[str, str]) -> list[list[str]]:
    saved = os.environ.get("LOGQ_PEER_REDIS")
    os.environ["LOGQ_PEER_REDIS"] = env.get("LOGQ_PEER_REDIS", "")
    try:
        return peer.worker_commands()
    finally:
        if saved is None:
            os.environ.pop("LOGQ_PEER_REDIS", None)
        else:
            os.environ["LOGQ_PEER_REDIS"] = saved


_LOGQ_APP = """\
import os
from logq.tasks import App

app = App(os.environ["LOGQ_BENCH_TASKS_Q"])


@app.task
def noop(i):
    return i
"""

_LOGQ_PRODUCER = """\
import json, sys, time
from logq.tasks import TaskHandle
from logq_bench_tasks import app, noop

n, warm = int(sys.argv[1]), int(sys.argv[2])
for i in range(warm):
    assert noop.delay(-1 - i).result(timeout=60) == -1 - i
t0 = time.perf_counter()
hs = [noop.delay(i) for i in range(n)]
t_submitted = time.perf_counter()
values = [h.result(timeout=120) for h in hs]   # in order: the last one returns when all are stored
t_done = time.perf_counter()
wrong = [(i, v) for i, v in enumerate(values) if v != i]
assert not wrong, f"{len(wrong)} results wrong, e.g. {wrong[:3]}"
again = [TaskHandle(app, h.id).result(timeout=1) for h in hs[:: max(1, n // 100)]]
assert again == list(range(0, n, max(1, n // 100))), "results read back by id differ"
print(json.dumps({"submit_s": t_submitted - t0, "total_s": t_done - t0, "rate": n / (t_done - t0)}))
"""


def run_logq(n: int, workers: int = WORKERS) -> float:
    """logq's row: the same no-op task end to end with its result stored,
    through ``logq.tasks.App``: ``logq worker`` with ``workers`` worker
    processes, a producer in another process that warms the workers, then
    times ``n`` submissions until every result is stored and checks them
    all.  In tasks/s; a wrong or missing result raises."""
    d = tempfile.mkdtemp(prefix="logq-tasks-")
    env = dict(os.environ, LOGQ_BENCH_TASKS_Q=os.path.join(d, "q"))
    env["PYTHONPATH"] = os.pathsep.join([d, ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with open(os.path.join(d, "logq_bench_tasks.py"), "w") as f:
        f.write(_LOGQ_APP)
    log = open(os.path.join(d, "worker.log"), "wb")
    worker = subprocess.Popen([sys.executable, "-m", "logq", "worker", "logq_bench_tasks:app",
                               "--workers", str(workers)], env=env, cwd=d, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = subprocess.run([sys.executable, "-c", _LOGQ_PRODUCER, str(n), str(WARM_TASKS)],
                             env=env, cwd=d, capture_output=True, text=True, timeout=600)
        if out.returncode != 0 or worker.poll() is not None:
            log.flush()
            with open(log.name, "rb") as fh:
                tail = fh.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"logq: producer exit {out.returncode}, worker "
                               f"{'exited' if worker.poll() is not None else 'running'}\n"
                               f"{out.stderr[-3000:]}\nworker log:\n{tail}")
        return json.loads(out.stdout.strip().splitlines()[-1])["rate"]
    finally:
        _stop([worker])
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def run_raw_pool(n: int, workers: int = WORKERS) -> float:
    """The raw WorkerPool's no-op rate with the same workers, in msgs/s:
    ``logq bench --workload pool`` (producers in other processes; until the
    last ack is committed).  What logq's tasks are built on."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-m", "logq", "bench", "--workload", "pool", "--messages", str(n),
                          "--workers", str(workers), "--json"], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"logq bench --workload pool failed: {out.stderr[-3000:]}")
    (row,) = json.loads(out.stdout)["results"]
    if row["check"] != "ok":
        raise RuntimeError(f"logq bench --workload pool: {row['check']}")
    return float(row["msgs_per_s"])


def logq_ready() -> bool:
    """Whether logq's tasks layer is there to be measured."""
    try:
        import logq.tasks as T
    except ImportError:
        return False
    return hasattr(T, "App")


def run_all(n: int | None = None, names: tuple[str, ...] = tuple(PEERS)) -> list[PeerFigure]:
    """Every peer in ``names`` on one redis-server (started here if any
    needs it and it is installed), in a scratch directory removed after;
    ``n`` tasks each (None: :func:`n_tasks` of each peer)."""
    workdir = tempfile.mkdtemp(prefix="logq-peers-")
    redis = None
    try:
        if any(PEERS[p].needs_redis for p in names) and shutil.which("redis-server"):
            redis = RedisServer(workdir)
        return [run_peer(p, n if n is not None else n_tasks(p), workdir, redis) for p in names]
    finally:
        if redis is not None:
            redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["produce"]:
        print(json.dumps(produce(argv[1], int(argv[2]), WARM_TASKS)))
        return 0
    n = int(argv[0]) if argv else None
    for f in run_all(n):
        fig = f"{f.rate:,.0f} tasks/s (submit {f.submit_rate:,.0f}/s)" if f.rate else f"not measured: {f.why}"
        print(f"{f.peer:9} n={f.n}: {fig} | {f.durability}")
    return 0


if __name__ == "__main__":
    # Run as the module `tasks_peers`, not as __main__: the peers name their
    # tasks after the module that defined them, and the workers import that one.
    import tasks_peers
    sys.exit(tasks_peers.main(sys.argv[1:]))

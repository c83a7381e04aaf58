"""The peer queues of ``logq bench --compare`` (``bench``): persist-queue,
queuelib, litequeue and diskcache, each opened at the durability setting
closest to a logq ``fsync`` policy (and saying which), run through the same
produce-then-consume workload in a child process; :func:`run_peer` returns
their :class:`PeerResult` rows, or one saying the peer is not installed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
import time
import traceback
import types
from typing import Any

from logq._bench_floors import Floors
from logq._bench_params import PEER_PHASE_SECONDS, STALL_SECONDS, BenchError, Params
from logq._bench_procs import _context, _cpu_seconds, _maxrss_bytes
from logq._bench_report import PeerResult

# SQLite's synchronous level closest to each logq policy.  In WAL mode FULL
# syncs the WAL at every commit; NORMAL only at checkpoints (a commit
# survives the death of the process, a power cut may lose the newest); OFF never.
_SQLITE_SYNC = {"always": "FULL", "batch": "NORMAL", "never": "OFF"}
_RAW = types.SimpleNamespace(dumps=bytes, loads=bytes)     # persist-queue: store the bytes as they are


class _Peer:
    """A peer queue: how to open it at the durability closest to a logq
    policy (and how to say so), put one message, take one (get + ack)."""
    name = ""
    module = ""
    kind = ""

    def durability(self, fsync: str) -> str:
        raise NotImplementedError

    def open(self, path: str, fsync: str) -> Any:
        raise NotImplementedError

    def put(self, h: Any, data: bytes) -> None:
        raise NotImplementedError

    def take(self, h: Any) -> bytes | None:
        """Get and acknowledge one message; None when empty."""
        raise NotImplementedError

    def close(self, h: Any) -> None:
        h.close()


class _PersistQueue(_Peer):
    name, module, kind = "persist-queue", "persistqueue", "SQLiteAckQueue"
    CLEAR_EVERY = 1000     # acked rows stay (and slow get()) until clear_acked_data(): its own remedy

    def durability(self, fsync: str) -> str:
        return (f"SQLiteAckQueue, auto_commit=True (a transaction per put, get and ack), "
                f"sqlite WAL, synchronous={_SQLITE_SYNC[fsync]}; clear_acked_data() every {self.CLEAR_EVERY}")

    def open(self, path: str, fsync: str) -> Any:
        from persistqueue import SQLiteAckQueue
        h = SQLiteAckQueue(path, serializer=_RAW, auto_commit=True, multithreading=False)
        h._conn.execute(f"PRAGMA synchronous={_SQLITE_SYNC[fsync]}")
        h.bench_taken = 0
        return h

    def put(self, h: Any, data: bytes) -> None:
        h.put(data)

    def take(self, h: Any) -> bytes | None:
        import persistqueue
        try:
            item = h.get(block=False)
        except persistqueue.Empty:
            return None
        h.ack(item)
        h.bench_taken += 1
        if h.bench_taken % self.CLEAR_EVERY == 0:
            h.clear_acked_data()
        return item


class _LiteQueue(_Peer):
    name, module, kind = "litequeue", "litequeue", "LiteQueue"

    def durability(self, fsync: str) -> str:
        return (f"LiteQueue, autocommit (a transaction per put, pop and done), "
                f"sqlite WAL, synchronous={_SQLITE_SYNC[fsync]}")

    def open(self, path: str, fsync: str) -> Any:
        from litequeue import LiteQueue
        os.makedirs(path, exist_ok=True)
        h = LiteQueue(os.path.join(path, "queue.sqlite3"))
        h.conn.execute(f"PRAGMA synchronous={_SQLITE_SYNC[fsync]}")
        return h

    def put(self, h: Any, data: bytes) -> None:
        h.put(data)

    def take(self, h: Any) -> bytes | None:
        m = h.pop()
        if m is None:
            return None
        h.done(m.message_id)
        return m.data

    def close(self, h: Any) -> None:
        h.conn.close()


class _DiskCache(_Peer):
    name, module, kind = "diskcache", "diskcache", "Deque"
    _LEVEL = {"FULL": 2, "NORMAL": 1, "OFF": 0}

    def durability(self, fsync: str) -> str:
        return (f"Deque over Cache(sqlite_synchronous={self._LEVEL[_SQLITE_SYNC[fsync]]}: "
                f"{_SQLITE_SYNC[fsync]}), sqlite WAL, a transaction per append and per popleft "
                "(popleft is get+ack; values >= 32 KiB go to files it does not fsync)")

    def open(self, path: str, fsync: str) -> Any:
        from diskcache import Cache, Deque
        cache = Cache(path, eviction_policy="none", sqlite_synchronous=self._LEVEL[_SQLITE_SYNC[fsync]])
        return Deque.fromcache(cache)

    def put(self, h: Any, data: bytes) -> None:
        h.append(data)

    def take(self, h: Any) -> bytes | None:
        try:
            return h.popleft()
        except IndexError:
            return None

    def close(self, h: Any) -> None:
        h.cache.close()


class _Queuelib(_Peer):
    name, module, kind = "queuelib", "queuelib", "FifoSQLiteQueue / FifoDiskQueue"

    def durability(self, fsync: str) -> str:
        if fsync == "always":
            return ("FifoSQLiteQueue, a transaction per push and per pop (pop is get+ack), "
                    "sqlite rollback journal, synchronous=FULL")
        if fsync == "batch":
            return ("FifoSQLiteQueue, a transaction per push and per pop (pop is get+ack), "
                    "sqlite WAL, synchronous=NORMAL")
        return ("FifoDiskQueue: one os.write per push, never fsyncs "
                "(its read and write positions are saved only at close)")

    def open(self, path: str, fsync: str) -> Any:
        from queuelib import queue as qq
        if fsync == "never":
            return qq.FifoDiskQueue(path)
        os.makedirs(path, exist_ok=True)
        h = qq.FifoSQLiteQueue(os.path.join(path, "queue.sqlite3"))
        if fsync == "batch":
            h._db.execute("PRAGMA journal_mode=WAL")
        h._db.execute(f"PRAGMA synchronous={_SQLITE_SYNC[fsync]}")
        return h

    def put(self, h: Any, data: bytes) -> None:
        h.push(data)

    def take(self, h: Any) -> bytes | None:
        return h.pop()


PEERS: dict[str, _Peer] = {pe.name: pe for pe in (_PersistQueue(), _Queuelib(), _LiteQueue(), _DiskCache())}


def parse_peers(text: str) -> list[str]:
    """``a,b,...`` or ``all`` -> peer names; ValueError naming an unknown one."""
    names = list(PEERS) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"no peer named in {text!r}: one or more of {', '.join(PEERS)}, or all")
    for n in names:
        if n not in PEERS:
            raise ValueError(f"unknown peer {n!r}: one of {', '.join(PEERS)}, or all")
    return list(dict.fromkeys(names))


def _peer_main(name: str, p: Params, path: str, conn: Any) -> None:
    """In a child process: put up to ``p.messages`` one by one, then take
    them back one by one, each phase stopping after ``p.duration`` (or
    PEER_PHASE_SECONDS); send the figures."""
    peer = PEERS[name]
    try:
        try:
            importlib.import_module(peer.module)
        except ImportError as e:
            conn.send({"missing": f"{type(e).__name__}: {e}"})
            return
        limit = p.duration or PEER_PHASE_SECONDS
        payload = b"x" * p.payload
        h = peer.open(path, p.fsync)
        try:
            put = peer.put
            c0, t0 = _cpu_seconds(), time.monotonic()
            deadline, n = t0 + limit, 0
            while n < p.messages:
                put(h, payload)
                n += 1
                if n % 64 == 0 and time.monotonic() >= deadline:
                    break
            t1, c1 = time.monotonic(), _cpu_seconds()
            take = peer.take
            got = bad = 0
            deadline = t1 + limit
            while got < n:
                item = take(h)
                if item is None:
                    raise BenchError(f"{name} came back empty after {got} of {n} messages")
                bad += item != payload
                got += 1
                if got % 64 == 0 and time.monotonic() >= deadline:
                    break
            t2, c2 = time.monotonic(), _cpu_seconds()
        finally:
            peer.close(h)
        if bad:
            raise BenchError(f"{name} gave back {bad} wrong payloads")
        try:
            from importlib.metadata import version
            ver = version(name)
        except Exception:  # noqa: BLE001 - only shown beside the figures
            ver = ""
        conn.send({"put": n, "got": got, "produce": (t1 - t0, c1 - c0), "consume": (t2 - t1, c2 - c1),
                   "rss": _maxrss_bytes(), "version": ver})
    except BaseException:   # noqa: BLE001 - the parent reports it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_peer(name: str, p: Params, base: str, floors: Floors, ctx: Any | None = None) -> list[PeerResult]:
    """The peer's produce and consume rows for ``p`` (payload, fsync,
    messages, duration), or one row saying it is not installed."""
    peer = PEERS[name]
    ctx = ctx or _context()
    durability = peer.durability(p.fsync)
    missing = PeerResult(name, peer.kind, "-", p.payload, p.fsync, durability, installed=False)
    if importlib.util.find_spec(peer.module) is None:
        missing.note = f"not installed (pip install {name}, or logq[compare])"
        return [missing]
    path = tempfile.mkdtemp(prefix=f"peer-{name}-", dir=base)
    r, w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peer_main, args=(name, p, os.path.join(path, "q"), w),
                       name=f"logq-bench-peer-{name}", daemon=True)
    try:
        proc.start()
        w.close()
        limit = 2 * (p.duration or PEER_PHASE_SECONDS) + STALL_SECONDS
        if not r.poll(limit):
            raise BenchError(f"peer {name} did not finish within {limit:.0f} s")
        try:
            msg = r.recv()
        except EOFError:
            proc.join()
            raise BenchError(f"peer {name} died (exit code {proc.exitcode}) before it reported") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        r.close()
        shutil.rmtree(path, ignore_errors=True)
    if "missing" in msg:
        missing.note = f"not installed: {msg['missing']}"
        return [missing]
    if "error" in msg:
        raise BenchError(f"peer {name} failed:\n{msg['error']}")
    pf = floors.by_payload[p.payload]
    out = []
    for phase, n in (("produce", msg["put"]), ("consume", msg["got"])):
        secs, cpu = msg[phase]
        secs = max(secs, 1e-9)
        if phase == "consume":
            fname, frate = "mmap slice loop", pf.slices
        elif p.fsync == "always":
            fname, frate = "1 / fdatasync", 1 / floors.fdatasync
        else:
            fname, frate = "os.write per record", pf.write
        rate = n / secs
        out.append(PeerResult(name, peer.kind, phase, p.payload, p.fsync, durability, True, n, secs, rate,
                              rate * p.payload / 1e6, fname, frate, rate / frate if frate else 0.0,
                              cpu_percent=100 * cpu / secs, rss_mb=msg["rss"] / 2**20,
                              version=msg.get("version", "")))
    return out

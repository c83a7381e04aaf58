"""Named queues and key-value tables under one root directory: what the
adapters at the edge (``logq.celery``, ``logq.dramatiq``) share.

Layout of a root directory ``R``:

* ``R/<name>/``: one logq queue per queue name of the framework (Celery's
  kombu queues, Dramatiq's queues), the name percent-encoded
  (:func:`queue_dir`: every character but ASCII letters, digits, ``-``
  and ``_`` is escaped, ``.`` included, so a name can never make ``..``, a
  hidden file or a path separator);
* ``R/<something>.kv/``: a logq queue whose index holds a key-value table
  (:class:`KV`): the result backends.  The dot keeps these apart from
  every queue name.

Queues are opened once per process and shared by every user in it
(:func:`open_queue`); a forked child opens its own on first use (a queue
object must not cross a fork), and the queues a process opened are
closed at its exit, committing its consumers' acks.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any, Callable
from urllib.parse import quote

import logq
from logq._queue import Queue
from logq._settled import _DEAD, _ERROR_MAX, _be

_lock = threading.Lock()
_opened: dict[str, Queue] = {}
_pid = os.getpid()


def queue_dir(root: str, name: str) -> str:
    """The directory of queue ``name`` under ``root``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a queue name must be a non-empty str, not {name!r}")
    return os.path.join(root, quote(name, safe="-_").replace(".", "%2E"))


def open_queue(path: str, **options: Any) -> Queue:
    """The queue at ``path``, opened once in this process (created if
    missing, with ``options``; a queue already open keeps its own)."""
    global _pid
    path = os.path.abspath(path)
    with _lock:
        if _pid != os.getpid():
            # A forked child: the parent's queue objects are unusable here.
            _opened.clear()
            _pid = os.getpid()
        q = _opened.get(path)
        if q is None or q._log is None:
            os.makedirs(path, exist_ok=True)
            q = _opened[path] = logq.open(path, **options)
        return q


def close_under(root: str) -> None:
    """Close the queues this process opened under ``root`` (a broker's
    ``close``; before a test deletes the directory)."""
    root = os.path.join(os.path.abspath(root), "")
    with _lock:
        mine = [p for p in _opened if os.path.join(p, "").startswith(root)] if _pid == os.getpid() else []
        qs = [_opened.pop(p) for p in mine]
    for q in qs:
        q.close()


@atexit.register
def close_all() -> None:
    """Close every queue this process opened here: their consumers commit
    their acks and give back what they held."""
    with _lock:
        mine = list(_opened.values()) if _pid == os.getpid() else []
        _opened.clear()
    for q in mine:
        try:
            q.close()
        except Exception:       # (at exit: one queue's trouble must not skip the others)
            pass


def bury(consumer: Any, m: Any, error: str) -> None:
    """Dead-letter delivery ``m`` of ``consumer`` now, whatever its
    attempts: it is acked, and the ack's own commit writes its dead letter
    (payload, attempt, ``error``) in the group's dead letters, so one is
    never durable without the other.  (What a framework's "reject" means;
    the group's ``dead_lettered`` counter does not count these.)"""
    g = consumer._g
    err = error.encode()[:_ERROR_MAX]
    record = _DEAD.pack(m.attempt, time.time_ns(), m.ts_ns, len(err)) + err + m.data
    key = g.prefix + _be(m.offset)
    dead = g.idx.dead
    consumer.ack(m, write=lambda txn: txn.put(key, record, db=dead))


_NEVER = 0
_PURGE_BATCH = 100
_LOOK = 1.0     # a wait looks again at least this often, woken or not (s)


class KV:
    """A key-value table with expiry, in named databases of the index of
    the queue at ``path`` (the queue itself stays empty).

    Promises: every write (``set``, ``delete``, ``incr``, ``expire``) is
    one LMDB transaction, fsynced before it returns: durable across
    crashes and power cuts, seen at once by every process.  ``incr`` is
    atomic across processes.  A key whose time to live ran out reads as
    missing at once; its entry is deleted by a later write (up to 100
    expired keys per write transaction).  Keys and values are bytes.

    Values are stored behind 8 bytes of expiry (big-endian ns since the
    epoch, 0: never); ``<name>.expiry`` orders keys by expiry;
    ``<name>.members`` holds the members ``incr`` counted."""

    def __init__(self, path: str, name: str) -> None:
        self.path = os.path.abspath(path)
        self.name = name.encode()

    def _dbs(self) -> tuple[Any, Any, Any, Any]:
        idx = open_queue(self.path)._index
        return (idx, idx.open_db(self.name), idx.open_db(self.name + b".expiry"),
                idx.open_db(self.name + b".members"))

    # -- reads ------------------------------------------------------------------
    @staticmethod
    def _live(raw: Any, now: int) -> bytes | None:
        if raw is None:
            return None
        exp = int.from_bytes(raw[:8], "big")
        if exp and exp <= now:
            return None
        return bytes(raw[8:])

    def get(self, key: bytes) -> bytes | None:
        idx, db, _e, _m = self._dbs()
        now = time.time_ns()
        return idx.read(lambda t: self._live(t.get(key, db=db), now))

    def mget(self, keys: list[bytes]) -> list[bytes | None]:
        """The values of ``keys`` (None where missing), read in one transaction."""
        idx, db, _e, _m = self._dbs()
        now = time.time_ns()
        return idx.read(lambda t: [self._live(t.get(k, db=db), now) for k in keys])

    def count(self) -> int:
        """Entries stored (expired ones not purged yet included): cheap."""
        idx, db, _e, _m = self._dbs()
        return idx.read(lambda t: t.stat(db)["entries"])

    def stamp(self) -> int:
        """The table's write count now: read it, look for what you wait
        for, then ``changed(stamp, timeout)``."""
        return open_queue(self.path)._written()

    def changed(self, seen: int, timeout: float) -> bool:
        """Sleep until a write (by any process) moved the count past
        ``seen``, at most ``timeout`` seconds: a futex wait, no polling (on
        the pure codec a missed wake-up costs at most a millisecond)."""
        return open_queue(self.path)._wait_written(seen, timeout)

    def wait(self, key: bytes, timeout: float | None) -> bytes | None:
        """The value of ``key`` once it is set (woken by the write that
        sets it, in any process); None once ``timeout`` seconds passed
        (None: wait for ever)."""
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self.stamp()
            v = self.get(key)
            if v is not None:
                return v
            left = _LOOK if limit is None else min(_LOOK, limit - time.monotonic())
            if left <= 0:
                return None
            self.changed(seen, left)

    # -- writes -----------------------------------------------------------------
    def _write(self, fn: Callable[[Any, Any, Any, Any, int], Any]) -> Any:
        idx, db, exp, mem = self._dbs()
        now = time.time_ns()

        def txn_fn(txn: Any) -> Any:
            out = fn(txn, db, exp, mem, now)
            self._purge(txn, db, exp, mem, now)
            return out
        out = idx.write(txn_fn)
        open_queue(self.path)._bump_written()      # (after the commit: waiters look again)
        return out

    @staticmethod
    def _expires(now: int, ttl: float | None) -> int:
        if ttl is None or ttl <= 0:
            return _NEVER
        return now + int(ttl * 1e9)

    def _put(self, txn: Any, db: Any, exp: Any, key: bytes, value: bytes, expires: int) -> None:
        txn.put(key, _be(expires) + value, db=db)
        if expires:
            txn.put(_be(expires) + key, b"", db=exp)

    def set(self, key: bytes, value: bytes, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (None or 0: for ever)."""
        self._write(lambda txn, db, exp, mem, now: self._put(txn, db, exp, key, value,
                                                             self._expires(now, ttl)))

    def delete(self, key: bytes) -> None:
        """Forget ``key`` (and the members ``incr`` counted under it)."""
        self._write(lambda txn, db, exp, mem, now: self._delete(txn, db, mem, key))

    @staticmethod
    def _delete(txn: Any, db: Any, mem: Any, key: bytes) -> None:
        txn.delete(key, db=db)
        prefix = key + b"\0"
        cur = txn.cursor(db=mem)
        if cur.set_range(prefix):
            while bytes(cur.key()).startswith(prefix):
                if not cur.delete():
                    break

    def expire(self, key: bytes, ttl: float | None) -> None:
        """Keep ``key`` for ``ttl`` seconds from now (None or 0: for ever)."""
        def fn(txn: Any, db: Any, exp: Any, mem: Any, now: int) -> None:
            raw = txn.get(key, db=db)
            if raw is not None and self._live(raw, now) is not None:
                self._put(txn, db, exp, key, bytes(raw[8:]), self._expires(now, ttl))
        self._write(fn)

    def incr(self, key: bytes, member: bytes | None = None, ttl: float | None = None) -> int:
        """Add one to the counter at ``key`` (a missing or expired one is 0)
        and return it, atomically across processes.  With ``member``, only
        the first increment by each member counts: a task that runs twice
        (redelivered after a crash) is counted once.  The counter is
        stored as decimal digits, so ``get`` reads it too."""
        def fn(txn: Any, db: Any, exp: Any, mem: Any, now: int) -> int:
            cur = self._live(txn.get(key, db=db), now)
            n = int(cur) if cur else 0
            if cur is None:
                self._delete(txn, db, mem, key)     # members of an expired counter
            if member is not None:
                if not txn.put(key + b"\0" + member, b"", db=mem, overwrite=False):
                    return n
            n += 1
            raw = txn.get(key, db=db)
            keep = int.from_bytes(raw[:8], "big") if raw is not None and cur is not None else _NEVER
            self._put(txn, db, exp, key, str(n).encode(), keep if ttl is None else self._expires(now, ttl))
            return n
        return self._write(fn)

    def _purge(self, txn: Any, db: Any, exp: Any, mem: Any, now: int) -> None:
        """Delete up to _PURGE_BATCH keys whose time ran out."""
        cur = txn.cursor(db=exp)
        doomed: list[tuple[bytes, int]] = []
        for k, _ in cur.iternext():
            at = int.from_bytes(k[:8], "big")
            if at > now or len(doomed) >= _PURGE_BATCH:
                break
            doomed.append((bytes(k), at))
        for k, at in doomed:
            key = k[8:]
            raw = txn.get(key, db=db)
            if raw is not None and int.from_bytes(raw[:8], "big") == at:
                self._delete(txn, db, mem, key)
            txn.delete(k, db=exp)

"""The LMDB environment beside the log: checkpoint, segment table (sparse
offset indexes of sealed segments), and room for consumer-group state.

What is here is either derived from the log (and rebuilt from it when the
environment is missing or damaged) or group state that the consumer layer
owns.  The rule that keeps it honest, applied by the callers: the log is
fsynced before any commit that refers to it, so the checkpoint never points
past data on stable storage.

A damaged ``data.mdb`` is detected before LMDB maps it (a truncated file
would make LMDB fault with SIGBUS); it is moved to ``quarantine/`` and a new
environment is created.  The map grows by itself: no ``MapFullError``
reaches a caller.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import sys
import threading
from array import array
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from logq import _format as F
from logq._errors import CorruptionError, DiskFullError
from logq._fsutil import fsync_dir, quarantine_path

log = logging.getLogger("logq")
T = TypeVar("T")

_U64x3 = struct.Struct("<QQQ")
_LMDB_MAGIC = 0xBEEFC0DE
_LMDB_META = struct.Struct("<II")    # magic, version at byte 16 of a meta page
_INITIAL_MAP = 8 << 20

# The databases.  ``main``: checkpoint and flags; ``segments``: sparse
# indexes; the rest is consumer-group and producer state (``_groups``):
# every key there ends with the big-endian u64 offset it is about, except
# in ``groups`` (name -> watermark first) and the dedup databases.
DBS = (b"main", b"segments", b"groups", b"acks", b"sched", b"pending", b"dead",
       b"dedup", b"dedup_time")
# Disk kept allocated beyond LMDB's last page, so that acks and deletes can
# still commit when the disk is full (LMDB is copy-on-write: even a delete
# writes new pages).
RESERVE_BYTES = 1 << 20

# A group's value in ``groups``: its watermark (every offset below it is
# settled), then counters kept with the state they count.
GROUP = struct.Struct("<QQQQQQ")   # watermark, delivered, acked, redelivered, dead, dropped
G_WATERMARK, G_DELIVERED, G_ACKED, G_REDELIVERED, G_DEAD, G_DROPPED = range(6)
_DEDUP = struct.Struct("<QQ")      # offset, put time ns

K_CHECKPOINT = b"checkpoint"   # (segment base, position, next offset), durable
K_PRIORITIES = b"priorities"   # present once a record with a priority was put
K_CLEAN = b"clean"             # b"1" after a clean shutdown of the last process


def lmdb_file_problem(path: str) -> str | None:
    """Why the LMDB data file at ``path`` cannot be opened safely, or None.

    Checks the two meta pages and that the file holds every page the newer
    one claims; that is what LMDB would touch first and fault on.  The
    file's size is read after its meta pages: a process committing to it
    meanwhile writes its pages before the meta page that claims them, so a
    live file never looks truncated."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
            psize = struct.unpack_from("<I", head, 40)[0] if len(head) >= 160 else 0
            metas = []
            if psize and not (psize < 512 or psize > 65536 or psize & (psize - 1)):
                for page in (0, 1):
                    at = page * psize
                    if at + 160 <= len(head):
                        metas.append(head[at:at + 160])
                    else:
                        f.seek(at)
                        metas.append(f.read(160))
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return "empty file"
    if len(head) < 160:
        return f"file of {size} bytes is shorter than a meta page"
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        return f"implausible page size {psize}"
    best = None
    for page, meta in enumerate(metas):
        if len(meta) < 160:
            return "second meta page missing"
        magic, version = _LMDB_META.unpack_from(meta, 16)
        if magic != _LMDB_MAGIC:
            return f"bad magic in meta page {page}"
        last_pg, txnid = struct.unpack_from("<QQ", meta, 136)
        if best is None or txnid > best[1]:
            best = (last_pg, txnid)
    assert best is not None
    need = (best[0] + 1) * psize
    if size < need:
        return f"truncated: {size} bytes, the meta page needs {need}"
    return None


def quarantine_index(qdir: str, why: str) -> None:
    """Move the index of ``qdir`` (if any) to quarantine/, durably; the
    next open rebuilds it from the log (consumer-group state is lost).
    Only while no process has the queue open."""
    path = os.path.join(qdir, F.INDEX_DIR)
    if not os.path.exists(path):
        return
    dest = quarantine_path(qdir, "index")
    os.rename(path, dest)
    fsync_dir(os.path.dirname(dest))
    fsync_dir(qdir)
    log.warning("index %s set aside (%s): moved to %s, rebuilding from the log", path, why, dest)


_shared: dict[str, Any] = {}
_shared_lock = threading.Lock()


def open_index(qdir: str, *, may_rebuild: bool) -> "Index":
    """The Index of ``qdir`` for this process.  LMDB forbids opening one
    environment twice in a process, so Queue objects on the same directory
    share one, counted; ``Index.close`` closes it with the last of them."""
    return _open_shared(_dir_key(qdir), lambda: Index(qdir, may_rebuild=may_rebuild))


def _dir_key(qdir: str) -> str:
    """The registry key of a queue directory: its identity, not its path (a
    directory deleted and made again at the same path is another queue, and
    must not be served the old one's environments)."""
    st = os.stat(qdir)
    return f"{os.path.realpath(qdir)}#{st.st_dev}:{st.st_ino}"


def _open_shared(key: str, make: Callable[[], Any]) -> Any:
    """The environment registered under ``key`` for this process (made by
    ``make`` if there is none), with one more user; see ``_close_shared``."""
    with _shared_lock:
        env = _shared.get(key)
        if env is None or env.pid != os.getpid():
            env = _shared[key] = make()
            env.key = key
        env.users += 1
        return env


def _after_fork_in_child() -> None:
    # The child must not use the parent's environments (LMDB forbids it),
    # and py-lmdb refuses to open them again while they look open: close
    # them.  This touches only the child's copies (LMDB clears reader slots
    # of the calling pid only, and fcntl locks are not inherited).
    for idx in list(_shared.values()):
        try:
            idx.env.close()
        except Exception:  # pragma: no cover - nothing more can be done in the child
            pass
    _shared.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Env:
    """What both environments share: transactions that grow the map and
    map LMDB's errors to ours, and the reserve of allocated disk."""

    env: lmdb.Environment
    path: str
    fd = -1
    psize = 4096
    allocated = 0

    def _start_reserve(self) -> None:
        self.psize = self.env.stat()["psize"]
        self.fd = os.open(os.path.join(self.path, "data.mdb"), os.O_RDWR | os.O_CLOEXEC)
        self.allocated = 0
        self._keep_reserve()

    # -- transactions -----------------------------------------------------
    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one durable write transaction, growing the map
        as needed."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    out = fn(txn)
                self._keep_reserve()
                return out
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
            except lmdb.DiskError as e:
                raise DiskFullError(28, f"no space to commit the index in {self.path}: {e}") from e
            except lmdb.Error as e:
                if "No space" in str(e):
                    raise DiskFullError(28, f"no space to commit the index in {self.path}") from e
                raise CorruptionError(f"index {self.path}: {e}; close every process using the "
                                      "queue and open it again to rebuild the index") from e

    def _keep_reserve(self) -> None:
        """Keep RESERVE_BYTES of disk allocated past the used pages (a full
        disk leaves the reserve smaller; commits then write into it)."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.psize
        if used + RESERVE_BYTES // 2 > self.allocated:
            try:
                os.posix_fallocate(self.fd, 0, used + RESERVE_BYTES)
                self.allocated = used + RESERVE_BYTES
            except OSError:
                pass    # a full disk: commits use what is left of the reserve

    def disk_bytes(self) -> int:
        """Bytes the index holds on disk (allocated blocks)."""
        total = 0
        for name in os.listdir(self.path):
            try:
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except FileNotFoundError:
                pass
        return total

    def open_db(self, name: bytes) -> Any:
        """The named database ``name`` of this environment, created on
        first use, for a layer above (the tasks layer keeps its records
        this way; its names start with ``tasks.``, never one of DBS).
        Call it outside any transaction of this thread."""
        with _shared_lock:
            dbs = self.__dict__.setdefault("_named", {})
            db = dbs.get(name)
            if db is None:
                # In a transaction of our own: py-lmdb's open_db without one
                # waits for the write lock holding the GIL, so it deadlocks
                # with another thread of this process in a write transaction
                # (the housekeeper's checkpoint, a commit); begin() waits
                # without the GIL.
                with self.env.begin(write=True) as txn:
                    db = self.env.open_db(name, txn=txn)
                dbs[name] = db
            return db

    def read(self, fn: Callable[[Any], T]) -> T:
        while True:
            try:
                with self.env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

    def get(self, key: bytes, db: Any) -> bytes | None:
        return self.read(lambda t: t.get(key, db=db))


class Index(_Env):
    """One LMDB environment in ``<queue>/index``, shared by every process that
    has the queue open.  Thread-safe; every write is one durable transaction.
    Open it with :func:`open_index`."""

    users = 0
    key = ""
    # The databases, one attribute per name in DBS (set by _open_and_probe);
    # lmdb has no type information, so each is an Any handle.
    main: Any
    segments: Any
    groups: Any
    acks: Any
    sched: Any
    pending: Any
    dead: Any
    dedup: Any
    dedup_time: Any

    def __init__(self, qdir: str, *, may_rebuild: bool = True) -> None:
        """Open (or create) the environment.  With ``may_rebuild`` (no other
        process has the queue open), a damaged one is quarantined and
        replaced; otherwise damage raises CorruptionError."""
        self.path = os.path.join(qdir, F.INDEX_DIR)
        self.qdir = qdir
        self.pid = os.getpid()
        self.rebuilt = False
        problem = lmdb_file_problem(os.path.join(self.path, "data.mdb"))
        if problem is not None:
            if not may_rebuild:
                raise CorruptionError(f"index {self.path} is damaged ({problem}); close every "
                                      "process using the queue and open it again to rebuild it")
            self._quarantine(problem)
        try:
            self._open_and_probe()
        except lmdb.Error as e:
            if not may_rebuild:
                raise CorruptionError(f"index {self.path} is damaged ({e}); close every process "
                                      "using the queue and open it again to rebuild it") from e
            self._quarantine(f"LMDB reports: {e}")
            self._open_and_probe()
        if self.get(K_CHECKPOINT, self.main) is None:
            self.rebuilt = True
        self._start_reserve()

    def _open_and_probe(self) -> None:
        """Open the environment and touch every page of it once, so that
        damage is found now (and repaired) rather than in a later write."""
        self.env = self._open()
        try:
            with self.env.begin(write=True) as txn:     # not open_db's own: see _Env.open_db
                dbs = [self.env.open_db(name, txn=txn) for name in DBS]
            for name, db in zip(DBS, dbs):
                setattr(self, name.decode(), db)
            with self.env.begin(write=True) as txn:
                for db in dbs:
                    for _ in txn.cursor(db=db).iternext(keys=True, values=True):
                        pass
                txn.put(b"probe", b"", db=self.main)
        except BaseException:
            self.env.close()
            raise

    def _open(self) -> lmdb.Environment:
        os.makedirs(self.path, exist_ok=True)
        size = _INITIAL_MAP
        data = os.path.join(self.path, "data.mdb")
        if os.path.exists(data):
            size = max(size, os.path.getsize(data) * 2)
        return lmdb.open(self.path, subdir=True, map_size=size, max_dbs=32,
                         sync=True, metasync=True, readahead=False, meminit=False)

    def _quarantine(self, why: str) -> None:
        quarantine_index(self.qdir, f"damaged: {why}")
        self.rebuilt = True

    # -- the checkpoint: the last point known to be on stable storage -----
    def checkpoint(self) -> tuple[int, int, int] | None:
        raw = self.get(K_CHECKPOINT, self.main)
        return _U64x3.unpack(raw) if raw and len(raw) == _U64x3.size else None

    def set_checkpoint(self, base: int, pos: int, next_offset: int, *,
                       clean: bool | None = None, force: bool = False) -> None:
        """Record a durable point; ignored if older than the stored one (unless
        ``force``: recovery may move it back after truncating a tail)."""
        def fn(txn: Any) -> None:
            old = txn.get(K_CHECKPOINT, db=self.main)
            if force or old is None or _U64x3.unpack(old)[2] <= next_offset:
                txn.put(K_CHECKPOINT, _U64x3.pack(base, pos, next_offset), db=self.main)
            if clean is not None:
                txn.put(K_CLEAN, b"1" if clean else b"0", db=self.main)
        self.write(fn)

    def set_clean(self, clean: bool) -> None:
        """Record whether the queue is closed cleanly (False while open)."""
        self.write(lambda t: t.put(K_CLEAN, b"1" if clean else b"0", db=self.main))

    def was_clean(self) -> bool:
        return self.get(K_CLEAN, self.main) == b"1"

    # -- consumer groups ----------------------------------------------------
    # The ``groups`` database belongs to the consumer layer.  The one rule
    # the storage layer knows: a group's value starts with a u64, the offset
    # below which the group has acknowledged everything (its watermark).

    def clamp_groups(self, next_offset: int) -> list[tuple[bytes, int]]:
        """After recovery cut the log back to ``next_offset``: pull every
        group's watermark down to it and forget group and dedup state about
        offsets at or above it, so that records put from now on (which
        reuse the lost offsets) are delivered, not taken as settled.
        Returns (group, old watermark) for each group whose watermark moved."""
        def fn(txn: Any) -> list[tuple[bytes, int]]:
            changed = []
            for name, value in txn.cursor(db=self.groups):
                if len(value) >= 8:
                    (mark,) = struct.unpack_from("<Q", value, 0)
                    if mark > next_offset:
                        txn.put(name, struct.pack("<Q", next_offset) + value[8:], db=self.groups)
                        changed.append((bytes(name), mark))
            for db in (self.sched, self.pending, self.dead):
                doomed = [bytes(k) for k in txn.cursor(db=db).iternext(values=False)
                          if int.from_bytes(k[-8:], "big") >= next_offset]
                for k in doomed:
                    txn.delete(k, db=db)
            cur = txn.cursor(db=self.acks)
            for k, v in list(cur.iternext()):
                start, (end,) = int.from_bytes(k[-8:], "big"), struct.unpack("<Q", v)
                if start >= next_offset:
                    txn.delete(k, db=self.acks)
                elif end > next_offset:
                    txn.put(k, struct.pack("<Q", next_offset), db=self.acks)
            for k, v in list(txn.cursor(db=self.dedup).iternext()):
                if struct.unpack_from("<Q", v, 0)[0] >= next_offset:
                    txn.delete(k, db=self.dedup)
            return changed
        return self.write(fn)

    def watermarks(self) -> dict[str, int]:
        """Each group's watermark."""
        return self.read(lambda t: {bytes(k).decode(): struct.unpack_from("<Q", v)[0]
                                    for k, v in t.cursor(db=self.groups)})

    def drop_below(self, offset: int) -> dict[str, tuple[int, int]]:
        """Settle everything below ``offset`` for every group (its segments
        are being deleted to make room): watermarks rise to it, state about
        lower offsets goes, and each group counts the unsettled messages it
        lost as dropped.  Returns group -> (its old watermark, messages
        dropped) for each group that was below ``offset``."""
        def fn(txn: Any) -> dict[str, tuple[int, int]]:
            dropped = {}
            for name, value in list(txn.cursor(db=self.groups)):
                g = list(GROUP.unpack(value))
                if g[G_WATERMARK] >= offset:
                    continue
                prefix = bytes(name) + b"\0"
                lost = offset - g[G_WATERMARK]
                cur = txn.cursor(db=self.acks)
                for k, v in list(_prefixed(cur, prefix)):
                    a, (b,) = int.from_bytes(k[-8:], "big"), struct.unpack("<Q", v)
                    if a >= offset:
                        break
                    lost -= min(b, offset) - a
                    txn.delete(k, db=self.acks)
                    if b > offset:
                        txn.put(prefix + offset.to_bytes(8, "big"), v, db=self.acks)
                # (dead letters keep their own copy of the payload: they stay)
                for k, due in list(_prefixed(txn.cursor(db=self.pending), prefix)):
                    if int.from_bytes(k[-8:], "big") >= offset:
                        break
                    txn.delete(prefix + due + k[-8:], db=self.sched)
                    txn.delete(k, db=self.pending)
                dropped[bytes(name).decode()] = (g[G_WATERMARK], lost)
                g[G_WATERMARK] = offset
                g[G_DROPPED] += lost
                txn.put(name, GROUP.pack(*g), db=self.groups)
            return dropped
        return self.write(fn)

    def reset_group(self, name: str, offset: int) -> bool:
        """Move group ``name`` to ``offset``: everything below it counts as
        settled, everything from it on is delivered again; its settled
        ranges and retry schedule go (its counters and dead letters stay).
        Only while no process consumes the group.  Whether it existed."""
        key = name.encode()

        def fn(txn: Any) -> bool:
            value = txn.get(key, db=self.groups)
            if value is None:
                return False
            g = list(GROUP.unpack(value))
            g[G_WATERMARK] = offset
            txn.put(key, GROUP.pack(*g), db=self.groups)
            prefix = key + b"\0"
            for db in (self.acks, self.sched, self.pending):
                for k in [bytes(k) for k, _ in _prefixed(txn.cursor(db=db), prefix)]:
                    txn.delete(k, db=db)
            return True
        return self.write(fn)

    def group_rows(self) -> dict[str, tuple[tuple[int, ...], int, int, int]]:
        """Per group: (its value, offsets settled above the watermark,
        scheduled entries, dead letters)."""
        def fn(txn: Any) -> dict[str, tuple[tuple[int, ...], int, int, int]]:
            out = {}
            for name, value in txn.cursor(db=self.groups):
                p = bytes(name) + b"\0"
                settled = sum(struct.unpack("<Q", v)[0] - int.from_bytes(k[-8:], "big")
                              for k, v in _prefixed(txn.cursor(db=self.acks), p))
                sched = sum(1 for _ in _prefixed(txn.cursor(db=self.pending), p))
                dead = sum(1 for _ in _prefixed(txn.cursor(db=self.dead), p))
                out[bytes(name).decode()] = (GROUP.unpack(value), settled, sched, dead)
            return out
        return self.read(fn)

    # -- idempotent producers -----------------------------------------------
    def dedup_find(self, key: bytes, since_ns: int) -> int | None:
        """The offset first put with ``key`` at or after ``since_ns``, or None."""
        raw = self.get(key, self.dedup)
        if raw is None:
            return None
        offset, ts = _DEDUP.unpack(raw)
        return offset if ts >= since_ns else None

    def dedup_add(self, key: bytes, offset: int, now_ns: int, since_ns: int) -> None:
        """Remember ``key`` -> ``offset``; forget keys older than ``since_ns``."""
        def fn(txn: Any) -> None:
            cur = txn.cursor(db=self.dedup_time)
            expired: list[bytes] = []
            for k in cur.iternext(values=False):
                if int.from_bytes(k[:8], "big") >= since_ns or len(expired) >= 64:
                    break
                expired.append(bytes(k))
            for k in expired:
                txn.delete(k, db=self.dedup_time)
                old = txn.get(k[8:], db=self.dedup)
                if old is not None and _DEDUP.unpack(old)[1] == int.from_bytes(k[:8], "big"):
                    txn.delete(k[8:], db=self.dedup)
            txn.put(key, _DEDUP.pack(offset, now_ns), db=self.dedup)
            txn.put(now_ns.to_bytes(8, "big") + key, b"", db=self.dedup_time)
        self.write(fn)

    # -- segment table ----------------------------------------------------
    def sparse(self, base: int) -> tuple[int, int, array[int]] | None:
        """(end position, record count, sparse positions) stored for a sealed
        segment, or None."""
        raw = self.get(struct.pack(">Q", base), self.segments)
        if raw is None or len(raw) < 16 or (len(raw) - 16) % 8:
            return None
        end, count = struct.unpack_from("<QQ", raw, 0)
        positions = array("Q", raw[16:])
        if sys.byteorder == "big":
            positions.byteswap()
        return end, count, positions

    def set_sparse(self, base: int, end: int, count: int, positions: array[int]) -> None:
        if sys.byteorder == "big":
            positions = array("Q", positions)
            positions.byteswap()
        value = struct.pack("<QQ", end, count) + positions.tobytes()
        self.write(lambda t: t.put(struct.pack(">Q", base), value, db=self.segments))

    def drop_segments(self, bases: list[int]) -> None:
        def fn(txn: Any) -> None:
            for b in bases:
                txn.delete(struct.pack(">Q", b), db=self.segments)
        self.write(fn)

    def close(self) -> None:
        _close_shared(self)



def _prefixed(cur: Any, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every entry whose key starts with ``prefix``."""
    if not cur.set_range(prefix):
        return
    for k, v in cur.iternext():
        if not bytes(k[:len(prefix)]) == prefix:
            return
        yield bytes(k), bytes(v)


class Scratch(_Env):
    """The volatile environment in ``<queue>/leases``: consumer leases,
    cursors that only live processes need.  Commits are not
    fsynced: it survives the death of any process (the page cache keeps
    it), not a machine restart, after which the queue's first opener
    deletes it.  Open it with :func:`open_scratch`."""

    users = 0
    key = ""

    def __init__(self, qdir: str, *, may_reset: bool) -> None:
        self.path = os.path.join(qdir, F.LEASES_DIR)
        self.pid = os.getpid()
        try:
            self._open()
        except lmdb.Error as e:
            if not may_reset:
                raise CorruptionError(f"lease table {self.path} is damaged ({e}); close every "
                                      "process using the queue and open it again") from e
            log.warning("lease table %s is damaged (%s): starting a new one; messages out for "
                        "delivery will be delivered again", self.path, e)
            reset_scratch(qdir)
            self._open()
        self._start_reserve()

    def _open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        # Under a lock: a process that finds the data file while another
        # one's lmdb.open is still writing its first pages would take it
        # for a damaged one.  A POSIX record lock (lockf), not flock: a
        # child forked meanwhile by another thread does not inherit it (a
        # flock would stay held by the child's copy of the descriptor).
        fd = os.open(os.path.join(self.path, "open.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            if lmdb_file_problem(os.path.join(self.path, "data.mdb")) is not None:
                raise lmdb.CorruptedError("the data file is damaged")
            self.env = lmdb.open(self.path, subdir=True, map_size=_INITIAL_MAP, max_dbs=16,
                                 sync=False, metasync=False, readahead=False, meminit=False)
        finally:
            os.close(fd)
        # In a transaction of our own (see _Env.open_db): open_db's own waits
        # for the write lock holding the GIL, and a process whose threads
        # cannot run meanwhile keeps the append lock from other processes.
        with self.env.begin(write=True) as txn:
            self.claims = self.env.open_db(b"claims", txn=txn)     # group\0 kind offset -> Claim
            self.cursors = self.env.open_db(b"cursors", txn=txn)   # group\0 level -> next offset to scan
            # group\0 "D" -> no claim's deadline is earlier (i64); group\0 "O" owner
            # -> "" for each owner that may hold claims: reaping looks only then.
            self.summary = self.env.open_db(b"summary", txn=txn)

    def forget_group(self, name: str) -> None:
        """Drop group ``name``'s leases and cursors (after a reset)."""
        prefix = name.encode() + b"\0"

        def fn(txn: Any) -> None:
            for db in (self.claims, self.cursors, self.summary):
                for k in [bytes(k) for k, _ in _prefixed(txn.cursor(db=db), prefix)]:
                    txn.delete(k, db=db)
        self.write(fn)

    def clamp(self, next_offset: int) -> int:
        """The volatile twin of :meth:`Index.clamp_groups`, for recovery
        (no other process has the queue open): forget what the lease table
        says about offsets at or above ``next_offset``, where the log now
        ends.  Scan cursors past it come back to it and claims on offsets
        beyond it go, so records put from now on, which reuse those offsets,
        are delivered to every group that existed before the cut.  Every
        key of ``claims`` ends with its first offset (big-endian) and every
        value starts with its end offset (u64); every cursor value is the
        next offset to scan.  Returns how many entries changed."""
        cut = struct.pack("<Q", next_offset)

        def fn(txn: Any) -> int:
            changed = 0
            for k, v in list(txn.cursor(db=self.cursors).iternext()):
                if struct.unpack_from("<Q", v)[0] > next_offset:
                    txn.put(k, cut, db=self.cursors)
                    changed += 1
            for k, v in list(txn.cursor(db=self.claims).iternext()):
                start, (end,) = int.from_bytes(k[-8:], "big"), struct.unpack_from("<Q", v)
                if start >= next_offset:
                    txn.delete(k, db=self.claims)
                    changed += 1
                elif end > next_offset:
                    txn.put(k, cut + bytes(v[8:]), db=self.claims)
                    changed += 1
            return changed
        return self.write(fn)

    def close(self) -> None:
        _close_shared(self)


def clamp_scratch(qdir: str, next_offset: int) -> int:
    """:meth:`Scratch.clamp` on ``qdir``'s lease table, if it has one (only
    while no other process has the queue open)."""
    if not os.path.exists(os.path.join(qdir, F.LEASES_DIR, "data.mdb")):
        return 0
    sc = open_scratch(qdir, may_reset=True)
    try:
        return sc.clamp(next_offset)
    finally:
        sc.close()


def reset_scratch(qdir: str) -> None:
    """Delete the lease table (only while no process has the queue open)."""
    path = os.path.join(qdir, F.LEASES_DIR)
    for name in ("data.mdb", "lock.mdb"):
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass


def open_scratch(qdir: str, *, may_reset: bool) -> Scratch:
    """The lease table of ``qdir`` for this process (shared, counted)."""
    return _open_shared(_dir_key(qdir) + "#leases", lambda: Scratch(qdir, may_reset=may_reset))


def _close_shared(env: Any) -> None:
    # Closed under the lock: a thread opening the same environment meanwhile
    # would otherwise find it gone from the registry but still open in
    # LMDB, which refuses a second open in one process.
    with _shared_lock:
        env.users -= 1
        if env.users > 0:
            return
        if _shared.get(env.key) is env:
            del _shared[env.key]  # type: ignore[union-attr]
        env.env.close()
        os.close(env.fd)


def in_flight(qdir: str, groups: Any) -> dict[str, int]:
    """Per group, how many offsets live processes hold leased (claims in
    the lease table; 0 without one).  Ranges may include offsets settled
    but not yet freed: an upper bound between commits."""
    if not os.path.exists(os.path.join(qdir, F.LEASES_DIR, "data.mdb")):
        return {}
    sc = open_scratch(qdir, may_reset=False)
    try:
        def fn(txn: Any) -> dict[str, int]:
            out: dict[str, int] = {}
            for name in groups:
                p = name.encode() + b"\0"
                n = 0
                for k, v in _prefixed(txn.cursor(db=sc.claims), p):
                    n += struct.unpack_from("<Q", v)[0] - int.from_bytes(k[-8:], "big")
                out[name] = n
            return out
        return sc.read(fn)
    finally:
        sc.close()

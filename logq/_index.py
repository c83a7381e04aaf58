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

import logging
import os
import struct
import sys
import threading
from array import array
from typing import Any, Callable, TypeVar

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

K_CHECKPOINT = b"checkpoint"   # (segment base, position, next offset), durable
K_CLEAN = b"clean"             # b"1" after a clean shutdown of the last process


def lmdb_file_problem(path: str) -> str | None:
    """Why the LMDB data file at ``path`` cannot be opened safely, or None.

    Checks the two meta pages and that the file holds every page the newer
    one claims; that is what LMDB would touch first and fault on."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8192)
    except FileNotFoundError:
        return None
    if size == 0:
        return "empty file"
    if len(head) < 160:
        return f"file of {size} bytes is shorter than a meta page"
    psize = struct.unpack_from("<I", head, 40)[0]
    if psize < 512 or psize > 65536 or psize & (psize - 1):
        return f"implausible page size {psize}"
    best = None
    for page in (0, 1):
        at = page * psize
        if at + 160 > size:
            return "second meta page missing"
        if at >= len(head):
            with open(path, "rb") as f:
                f.seek(at)
                meta = f.read(160)
        else:
            meta = head[at:at + 160]
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


_shared: dict[str, "Index"] = {}
_shared_lock = threading.Lock()


def open_index(qdir: str, *, may_rebuild: bool) -> "Index":
    """The Index of ``qdir`` for this process.  LMDB forbids opening one
    environment twice in a process, so Queue objects on the same directory
    share one, counted; ``Index.close`` closes it with the last of them."""
    key = os.path.realpath(qdir)
    with _shared_lock:
        idx = _shared.get(key)
        if idx is None or idx.pid != os.getpid():
            idx = _shared[key] = Index(qdir, may_rebuild=may_rebuild)
            idx.key = key
        idx.users += 1
        return idx


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


class Index:
    """One LMDB environment in ``<queue>/index``, shared by every process that
    has the queue open.  Thread-safe; every write is one durable transaction.
    Open it with :func:`open_index`."""

    users = 0
    key = ""

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
        if self.get(K_CHECKPOINT) is None:
            self.rebuilt = True

    def _open_and_probe(self) -> None:
        """Open the environment and touch every page of it once, so that
        damage is found now (and repaired) rather than in a later write."""
        self.env = self._open()
        try:
            self.main = self.env.open_db(b"main")
            self.segments = self.env.open_db(b"segments")
            self.groups = self.env.open_db(b"groups")
            with self.env.begin(write=True) as txn:
                for db in (self.main, self.segments, self.groups):
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
        return lmdb.open(self.path, subdir=True, map_size=size, max_dbs=16,
                         sync=True, metasync=True, readahead=False, meminit=False)

    def _quarantine(self, why: str) -> None:
        dest = quarantine_path(self.qdir, "index")
        if os.path.exists(self.path):
            os.rename(self.path, dest)
            fsync_dir(os.path.dirname(dest))
            fsync_dir(self.qdir)
            log.warning("index %s is damaged (%s): moved to %s, rebuilding from the log",
                        self.path, why, dest)
        self.rebuilt = True

    # -- transactions -----------------------------------------------------
    def write(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(txn)`` in one durable write transaction, growing the map
        as needed."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
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

    def read(self, fn: Callable[[Any], T]) -> T:
        while True:
            try:
                with self.env.begin() as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)

    def get(self, key: bytes, db: Any = None) -> bytes | None:
        db = self.main if db is None else db
        return self.read(lambda t: t.get(key, db=db))

    # -- the checkpoint: the last point known to be on stable storage -----
    def checkpoint(self) -> tuple[int, int, int] | None:
        raw = self.get(K_CHECKPOINT)
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
        return self.get(K_CLEAN) == b"1"

    # -- consumer groups ----------------------------------------------------
    # The ``groups`` database belongs to the consumer layer.  The one rule
    # the storage layer knows: a group's value starts with a u64, the offset
    # below which the group has acknowledged everything (its watermark).

    def clamp_groups(self, next_offset: int) -> list[tuple[bytes, int]]:
        """After recovery cut the log back to ``next_offset``: pull every
        group's watermark down to it, so that records put from now on (which
        reuse the lost offsets) are delivered, not taken as acknowledged.
        Returns (group, old watermark) for each group changed."""
        def fn(txn: Any) -> list[tuple[bytes, int]]:
            changed = []
            for name, value in txn.cursor(db=self.groups):
                if len(value) >= 8:
                    (mark,) = struct.unpack_from("<Q", value, 0)
                    if mark > next_offset:
                        txn.put(name, struct.pack("<Q", next_offset) + value[8:], db=self.groups)
                        changed.append((bytes(name), mark))
            return changed
        return self.write(fn)

    # -- segment table ----------------------------------------------------
    def sparse(self, base: int) -> tuple[int, int, array] | None:
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

    def set_sparse(self, base: int, end: int, count: int, positions: array) -> None:
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
        with _shared_lock:
            self.users -= 1
            if self.users > 0:
                return
            if _shared.get(self.key) is self:
                del _shared[self.key]
        self.env.close()


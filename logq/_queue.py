"""Queue: put, put_many, flush, read; the durability policy and group commit.

Commit order, in one place (``_sync_to``):
  1. append: records are copied into the mapped active segment (a page-cache
     write: it survives the death of the process as soon as it is done);
  2. fsync the data (``fdatasync`` of every segment written since the last
     sync by any process: rolling to a new segment does not fsync the
     sealed one; one process at a time syncs for all, under ``sync.lock``);
  3. commit the LMDB checkpoint that refers to it (at most once per
     ``checkpoint_interval``: it only bounds how much recovery scans);
     a segment's sparse index is stored the same way, after an fdatasync;
  4. publish what is durable in the control block (SYNCED_NEXT: other
     processes' puts it covers return without an fdatasync of their own),
     update what this process believes durable, and wake the waiters.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
import weakref
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from logq import _codec as C
from logq import _format as F
from logq import _status
from logq._errors import (LogqError, MessageTooLargeError, OffsetError, QueueClosedError,
                          QueueFullError, RecordLostError)
from logq._index import (G_ACKED, G_DEAD, G_DELIVERED, G_DROPPED, G_REDELIVERED, G_WATERMARK,
                         K_PRIORITIES, RESERVE_BYTES, Index, clamp_scratch, in_flight, open_index,
                         reset_scratch)
from logq._fsutil import fsync_dir
from logq._log import Log, Recovery

log = logging.getLogger("logq")

FSYNC_POLICIES = ("always", "batch", "never")
ON_FULL = ("block", "reject", "drop_oldest")
MAX_PRIORITY = 9              # put(priority=0..MAX_PRIORITY); higher is delivered first
MAX_KEY_BYTES = 256
_ROOM_POLL = 0.02             # a put blocked at max_bytes looks for room this often (s)
_RETAIN_EVERY = 1.0           # the housekeeper deletes settled segments this often (s)
_HDR = F.RECORD_HEADER_SIZE
# The attrs (see _fetch) of a record with no meta and no priority: alone,
# continuing a put_many batch, or heading one (its only meta is the count).
_PLAIN = F.RECORD_MARK << 24
_PLAIN_CONT = (F.RECORD_MARK | F.FLAG_CONT) << 24
_PLAIN_HEAD = (F.RECORD_MARK | F.FLAG_BATCH) << 24 | F.BATCH_COUNT_SIZE   # a batch's count: no attribute
_WAIT_SLICE = 1.0             # wait() looks at the clock and for close() this often
_PREFAULT_AHEAD = 32 << 20    # the housekeeper maps this much ahead of the writer
_PREFAULT_CHUNK = 1 << 20
_put = C.put
# Per-process figures of the group commit, published to the status file
# (``logq metrics``): histogram bucket bounds (upper, inclusive).
FSYNC_SECONDS_BOUNDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FSYNC_RECORDS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
_SYNC_WAIT_NS = 2_000_000    # a put waiting for another process's fdatasync tries its lock this often
_STATUS_EVERY = 1.0           # the housekeeper publishes the figures at most this often (s)


@dataclass(frozen=True)
class Options:
    """Every tunable of a queue, with its default."""
    fsync: str = "batch"              # "always" | "batch" | "never"
    fsync_interval: float = 0.2       # batch: longest a put waits to be fsynced (s)
    fsync_bytes: int = 4 << 20        # batch: fsync once this much is unsynced
    segment_bytes: int = 64 << 20     # roll the active segment at this size
    preallocate_bytes: int = 4 << 20  # grow the active segment's file this much at a time, ahead
                                      # of the writer (allocated before use: a full disk is
                                      # DiskFullError at put, never SIGBUS); disk use follows
                                      # the contents within about this much per queue
    max_message_bytes: int = 16 << 20
    checkpoint_interval: float = 1.0  # most often the index checkpoint is committed (s)
    retention: float | None = None    # keep a settled segment at least this long (s)
    max_bytes: int | None = None      # disk budget: log, index and lease table together
    on_full: str = "block"            # at max_bytes: "block" | "reject" | "drop_oldest"
    put_timeout: float | None = None  # "block": longest a put waits for room (None: no limit)
    dedup_window: float = 600.0       # put(key=k) within this long of k's first put stores nothing (s)
    exclusive: bool = False           # maintenance: raise QueueInUseError if another process has
                                      # the queue open; others' opens wait until this one closes

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(map(repr, FSYNC_POLICIES))}, not {self.fsync!r}")
        _check_int("segment_bytes", self.segment_bytes, 4096, 1 << 40)
        _check_int("preallocate_bytes", self.preallocate_bytes, 4096, 1 << 40)
        _check_int("fsync_bytes", self.fsync_bytes, 1, 1 << 40)
        _check_int("max_message_bytes", self.max_message_bytes, 1, F.MAX_PAYLOAD)
        _check_seconds("fsync_interval", self.fsync_interval)
        _check_seconds("checkpoint_interval", self.checkpoint_interval)
        _check_seconds("dedup_window", self.dedup_window)
        if self.retention is not None:
            _check_seconds("retention", self.retention)
        if self.put_timeout is not None:
            _check_seconds("put_timeout", self.put_timeout)
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {', '.join(map(repr, ON_FULL))}, not {self.on_full!r}")
        if self.max_bytes is not None:
            least = 2 * self.segment_bytes + 3 * RESERVE_BYTES
            _check_int("max_bytes", self.max_bytes, 1, 1 << 60)
            if self.max_bytes < least:
                raise ValueError(f"max_bytes={self.max_bytes} leaves no room to work: with "
                                 f"segment_bytes={self.segment_bytes} it must be at least {least} "
                                 "(two segments and the index reserves)")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, not {value}")


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not 0 < value < 1e9:
        raise ValueError(f"{name} must be a positive number of seconds, not {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not 0 <= value < 1e11:
        raise ValueError(f"{name} must be a finite, non-negative number of seconds, not {value!r}")


def _fdatasync_unless_deleted(seg: Any) -> None:
    """fdatasync a segment, unless retention deleted (and closed) it since
    it was listed: its records were all settled, there is nothing to keep."""
    fd = seg.fd
    if fd < 0:
        return
    try:
        os.fdatasync(fd)
    except OSError as e:
        if e.errno == errno.EBADF and seg.fd < 0:
            return
        raise


class _NoRoom(Exception):
    """Internal: the disk budget has no room for a new segment yet."""


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"a message must be bytes, bytearray or memoryview, not {type(data).__name__}")


_open_queues: "weakref.WeakSet[Queue]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child shares the parent's locks and mappings: its copies of
    # open queues must not be used (open the queue again in the child).
    for q in list(_open_queues):
        q._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Queue:
    """A persistent queue in a directory.  Thread-safe; several processes may
    open the same directory and put concurrently.

    Durability of ``put``/``put_many`` when they return, by ``fsync`` policy:
    ``"always"``: on stable storage (concurrent puts share one fdatasync);
    ``"batch"``: in the OS page cache (survives the death of the process),
    fsynced within ``fsync_interval`` seconds or ``fsync_bytes`` bytes;
    ``"never"``: in the page cache, written back when the OS decides.
    ``flush()`` makes everything this process put durable under any policy.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.options = opts = Options(**options)
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._waiters = threading.Condition(threading.Lock())   # threads in wait()
        self._waiting = 0
        self._closing = False
        self._sync_cond = threading.Condition(threading.Lock())
        self._syncing = False
        self._durable_next = 0          # every record this process put below it is durable
        self._failed: BaseException | None = None
        self._fsyncs = 0
        # Group-commit figures (changed only by the thread that fsyncs):
        # histogram counts per bucket (the last one: above every bound).
        self._fsync_seconds = 0.0
        self._fsync_seconds_counts = [0] * (len(FSYNC_SECONDS_BOUNDS) + 1)
        self._fsync_records = 0
        self._fsync_records_counts = [0] * (len(FSYNC_RECORDS_BOUNDS) + 1)
        self._last_checkpoint = 0.0
        self._pending = 0               # batch: bytes put since the last fsync
        self._synced_at = time.monotonic()   # batch: when the last fsync began
        self._always = opts.fsync == "always"
        self._batch = opts.fsync == "batch"
        self._syncs = opts.fsync != "never"     # puts have fsync work to do
        self._max = opts.max_message_bytes
        self._close_hooks: list[Callable[[], None]] = []   # consumer groups commit at close
        self._groups: dict[str, Any] = {}                  # consumer-group state (``_consumer``)
        self._priorities_marked = False
        lg = Log(self.path, segment_bytes=opts.segment_bytes, exclusive=opts.exclusive,
                 preallocate_bytes=opts.preallocate_bytes)
        lg.before_alloc = self._before_alloc
        # None only until open_index returns (the cleanup below checks).
        self._index: Index = None  # type: ignore[assignment]
        try:
            self._index = open_index(self.path, may_rebuild=lg.alone)
            lg.sparse_source = self._index.sparse
            # (a new queue has no segments yet, and nothing to rebuild)
            self._index_rebuilt = self._index.rebuilt and bool(lg.bases)
            if lg.alone:
                if lg.rebooted:
                    # Leases of a previous boot: every holder is gone, and the
                    # unsynced table may be torn.  Deliveries start over from
                    # the durable group state.
                    reset_scratch(self.path)
                checkpoint = self._index.checkpoint()
                rec = self._recovery = lg.recover(checkpoint, self._index.was_clean())
                if checkpoint is None or checkpoint[0] not in lg.bases or checkpoint[2] > lg.next:
                    # No usable checkpoint (a new or rebuilt index, or the log
                    # was cut below it): make one at the tail, once every
                    # segment it vouches for is on disk.
                    lg.sync_segments(checkpoint[0] if checkpoint and checkpoint[0] in lg.bases else 0)
                    self._index.set_checkpoint(lg.active.base, lg.pos, lg.next, clean=False, force=True)
                else:
                    # The old checkpoint still points at durable data; syncing
                    # everything since (a SIGKILLed "never" writer may have
                    # left gigabytes dirty) is not open's job.
                    self._index.set_clean(False)
                if not rec.clean:
                    # Stored indexes of what recovery cut or zeroed are stale.
                    self._index.drop_segments([lg.active.base] + rec.damaged_bases)
                for group, mark in self._index.clamp_groups(lg.next):
                    log.warning("queue %s: group %r had acknowledged up to offset %d, but the log "
                                "now ends at %d; its position is clamped so new messages are "
                                "delivered", self.path, group.decode(errors="replace"), mark, lg.next)
                # The lease table outlives processes, not cuts: its scan
                # cursors and claims past the new tail would hide the records
                # that now reuse those offsets from every existing group.
                # (A clean shutdown leaves nothing past the tail: cheap then.)
                clamp_scratch(self.path, lg.next)
                if rec.truncated_bytes or rec.lost or not rec.clean:
                    log.info("queue %s recovered after an unclean shutdown: tail at offset %d, "
                             "%d torn bytes cut, %d record(s) lost", self.path, lg.next,
                             rec.truncated_bytes, sum(b - a for a, b in rec.lost))
            else:
                lg.attach()
                self._recovery = Recovery()     # another process recovered it
        except BaseException:
            if self._index is not None:
                self._index.close()
            lg.close()      # closing the lock files releases their locks
            raise
        lg.end_open()
        self._log: Log | None = lg
        self._writer = lg.w.handle
        self._durable_next = lg.next
        self._checkpointed = lg.next
        self._last_checkpoint = time.monotonic()
        self._stop = False
        self._kick = threading.Event()
        self._housekeeper = threading.Thread(target=self._housekeep, name=f"logq-{self.path}",
                                             daemon=True)
        self._housekeeper.start()
        _open_queues.add(self)

    # -- producing ------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview, *, key: bytes | str | None = None,
            priority: int = 0, delay: float | None = None,
            deliver_at: float | None = None) -> int:
        """Append one message; its offset.  Durable on return as the fsync
        policy says.

        ``priority`` (0..MAX_PRIORITY, default 0): consumers deliver higher
        first.  ``delay`` (seconds) or ``deliver_at`` (epoch seconds): no
        consumer gets it before then.  ``key``: an idempotency key; if a
        message with this key was put within ``dedup_window`` seconds
        (by any process, across restarts), nothing is stored and that
        message's offset is returned.

        Raises TypeError/ValueError for bad arguments, MessageTooLargeError,
        QueueFullError (at ``max_bytes``; DiskFullError when the disk is
        full: nothing stored, retry later), QueueClosedError."""
        if type(data) is not bytes:
            data = _as_bytes(data)
        n = len(data)
        if n > self._max:
            raise MessageTooLargeError(f"message of {n} bytes exceeds max_message_bytes={self._max}")
        if key is not None or priority or delay is not None or deliver_at is not None:
            return self._put_with(data, key, priority, delay, deliver_at)
        # The fast path: one C call (its own mutex) while this process holds
        # the append lock and the record fits in the active segment.
        off = _put(self._writer, data, n)
        if off < 0:
            # encode, not put: once this process has the append lock, the
            # record is written even if another process asks for it at once.
            off = self._append(_HDR + n, 1, lambda lg, first: C.encode(
                lg.h, lg.pos, lg.end, first, time.time_ns(), data))
        if self._syncs:
            self._after_write(off + 1, n + _HDR)
        return off

    def _put_nowait(self, data: bytes) -> int:
        """``put(data)`` only if it needs no waiting (logq.aio calls it on
        the event loop): this process holds the append lock, the record
        fits the active segment and the policy is not "always"; its offset.
        -1, nothing stored, when it would wait: then call ``put``."""
        n = len(data)
        if self._always or n > self._max or self._log is None:
            return -1
        off = _put(self._writer, data, n)
        if off < 0:
            return -1
        if self._syncs:
            self._after_write(off + 1, n + _HDR)
        return off

    def _put_with(self, data: bytes, key: Any, priority: Any, delay: Any, deliver_at: Any) -> int:
        """put() with attributes: checked, then stored in the record's meta."""
        _check_int("priority", priority, 0, MAX_PRIORITY)
        due_ns = None
        if delay is not None and deliver_at is not None:
            raise ValueError("give delay or deliver_at, not both")
        if delay is not None:
            _check_number("delay", delay)
            due_ns = time.time_ns() + int(delay * 1e9)
        elif deliver_at is not None:
            _check_number("deliver_at", deliver_at)
            due_ns = int(deliver_at * 1e9)
        if due_ns is not None:
            due_ns = max(0, min(due_ns, (1 << 63) - 1))
        if key is not None:
            if isinstance(key, str):
                key = key.encode()
            if not isinstance(key, bytes):
                raise TypeError(f"key must be bytes or str, not {type(key).__name__}")
            if not 0 < len(key) <= MAX_KEY_BYTES:
                raise ValueError(f"key must be 1 to {MAX_KEY_BYTES} bytes, not {len(key)}")
        if priority and not self._priorities_marked:
            # Before the first such record: consumers read this to serve by
            # priority from the start instead of in log order.
            if self._index.get(K_PRIORITIES, self._index.main) is None:
                self._index.write(lambda t: t.put(K_PRIORITIES, b"1", db=self._index.main))
            self._priorities_marked = True
        flags, meta = F.encode_meta(due_ns, key)
        off = self._append(_HDR + len(meta) + len(data), 1, lambda lg, first: C.encode(
            lg.h, lg.pos, lg.end, first, time.time_ns(), data, priority, flags, meta), key=key)
        if self._syncs:
            self._after_write(off + 1, len(data) + _HDR)
        return off

    def _append(self, need: int, count: int, encode: Callable[[Log, int], int],
                key: bytes | None = None) -> int:
        """The slow path of every append: take the append lock if needed,
        make room for ``need`` bytes, write ``count`` records with
        ``encode(log, first_offset) -> new position``, publish the tail.
        Returns the first offset (with ``key``: the offset the key was
        first put at, if within the dedup window, and nothing is written).
        At ``max_bytes`` with on_full="block", waits for room outside the
        locks (consumers need them to make room)."""
        waited_since = None
        while True:
            try:
                with self._lock:
                    lg = self._open_log()
                    self._check_failed()
                    with lg.w:
                        if lg.wanted():
                            lg.yield_turn()
                        if not lg.holding:
                            lg.acquire()
                            self._kick.set()  # the housekeeper hands the lock back when idle
                        if key is not None:
                            # Holding the append lock: no other put of this key can interleave.
                            now = time.time_ns()
                            since = now - int(self.options.dedup_window * 1e9)
                            seen = self._index.dedup_find(key, since)
                            if seen is not None:
                                return seen
                        end = lg.end
                        lg.room(need)
                        if lg.end != end:
                            self._kick.set()    # the writer caught up with the file: grow further ahead
                        elif lg.end - lg.pos - need < lg.ahead // 2:
                            # Here, not only on the housekeeper: a writer of big
                            # batches holds these locks nearly all the time, and
                            # pages allocated late are faulted in by the writer
                            # itself instead of ahead of it.
                            self._grow_to(lg, lg.ahead)
                            self._kick.set()    # fault the new pages in ahead of the writer
                        first = lg.next
                        lg.pos = encode(lg, first)
                        lg.next = first + count
                        lg.publish()
                        if key is not None:
                            # After the record: a key must never name an offset
                            # that holds nothing (recovery forgets keys past a cut tail).
                            self._index.dedup_add(key, first, now, since)
                return first
            except _NoRoom:
                now_s = time.monotonic()
                if waited_since is None:
                    waited_since = now_s
                timeout = self.options.put_timeout
                if timeout is not None and now_s - waited_since >= timeout:
                    raise QueueFullError(
                        f"queue {self.path} is at max_bytes={self.options.max_bytes} and no room "
                        f"was freed within put_timeout={timeout}s (consumers settle messages "
                        "so that their segments can be deleted)") from None
                time.sleep(_ROOM_POLL)

    # -- the disk budget ------------------------------------------------------
    def _before_alloc(self, size: int) -> None:
        """Called (under the locks) before ``size`` more bytes of segment are
        allocated (a new segment, or a growth step of the active one):
        delete what retention allows (on a full disk, that is what makes
        room), and keep the directory within ``max_bytes``, counted in
        blocks really allocated (``_disk_bytes``)."""
        self._retain()
        budget = self.options.max_bytes
        if budget is None:
            return
        while self._disk_bytes() + size > budget:
            if self._retain():
                continue
            if self.options.on_full == "drop_oldest" and self._drop_oldest():
                continue
            if self.options.on_full == "reject":
                raise QueueFullError(f"queue {self.path} is at max_bytes={budget}; nothing was stored")
            raise _NoRoom()

    def _disk_bytes(self) -> int:
        """Bytes allocated on disk for the log, the index and the lease table
        (the quarantine is not counted: it is the operator's to clear)."""
        total = 0
        for d in (self.path, os.path.join(self.path, F.INDEX_DIR), os.path.join(self.path, F.LEASES_DIR)):
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                try:
                    st = os.stat(os.path.join(d, name), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    total += st.st_blocks * 512
        return total

    def _retain(self) -> bool:
        """Delete the sealed segments that every consumer group has settled
        (and, with ``retention``, that are older than it); whether any went.
        Deletes nothing while no group exists.  Call under ``self._lock``."""
        marks = self._index.watermarks()
        if not marks:
            return False
        lowest = min(marks.values())
        lg = self._open_log()
        lg.refresh_bases()
        sealed = lg.bases[:-1]
        doomed = []
        now = time.time()
        for base, after in zip(sealed, lg.bases[1:]):
            if after > lowest:
                break
            if self.options.retention is not None:
                try:
                    age = now - os.stat(os.path.join(self.path, F.segment_name(base))).st_mtime
                except FileNotFoundError:
                    continue
                if age < self.options.retention:
                    break
            doomed.append(base)
        if doomed:
            self._delete_segments(doomed, "settled by every consumer group")
        return bool(doomed)

    def _drop_oldest(self) -> bool:
        """on_full="drop_oldest": delete the oldest sealed segment even if
        groups have not settled it; they count its messages as dropped."""
        lg = self._open_log()
        lg.refresh_bases()
        if len(lg.bases) < 2 or lg.bases[0] == lg.active.base:
            return False
        base, after = lg.bases[0], lg.bases[1]
        dropped = self._index.drop_below(after)
        self._delete_segments([base], "to stay within max_bytes (on_full='drop_oldest')")
        for group, (mark, n) in dropped.items():
            if n:
                log.warning("queue %s: group %r lost %d unsettled message(s) among offsets %d..%d "
                            "to max_bytes (on_full='drop_oldest')", self.path, group, n,
                            max(base, mark), after - 1)
        return True

    def _delete_segments(self, bases: list[int], why: str) -> None:
        lg = self._open_log()
        for base in bases:
            try:
                os.unlink(os.path.join(self.path, F.segment_name(base)))
            except FileNotFoundError:
                pass        # another process deleted it first
        fsync_dir(self.path)
        lg.refresh_bases()
        self._index.drop_segments(bases)
        log.info("queue %s: deleted %d segment(s) from offset %d (%s)", self.path, len(bases),
                 bases[0], why)

    def _after_write(self, end: int, nbytes: int) -> None:
        """The fsync policy's part of a put: wait for the group commit
        ("always"), or count the bytes towards the next fsync ("batch")."""
        if self._always:
            self._sync_to(end)
        else:
            self._pending += nbytes
            if self._pending >= self.options.fsync_bytes:
                self._kick.set()

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise LogqError(f"queue {self.path} failed and must be reopened: {self._failed}")

    def put_many(self, items: Iterable[bytes | bytearray | memoryview]) -> range:
        """Append messages in order; their offsets.  Every item is checked
        before anything is written: one bad item (TypeError,
        MessageTooLargeError) stores none of them."""
        batch = items if type(items) is list or type(items) is tuple else list(items)
        if not batch:
            return range(self.next_offset, self.next_offset)
        try:
            joined = b"".join(batch)    # also the type check, in C
        except TypeError:
            batch = [x if type(x) is bytes else _as_item(x, i) for i, x in enumerate(batch)]
            joined = b"".join(batch)
        lengths = array("I", map(len, batch))
        if len(joined) != sum(lengths):
            # A memoryview whose items are not bytes: len() counts items.
            batch = [x if type(x) is bytes else _as_item(x, i) for i, x in enumerate(batch)]
            lengths = array("I", map(len, batch))
        if max(lengths) > self._max:
            i = max(range(len(batch)), key=lengths.__getitem__)
            raise MessageTooLargeError(
                f"item {i} of put_many is {lengths[i]} bytes, over max_message_bytes={self._max}; nothing was stored")
        need = F.batch_size(len(batch), len(joined))
        first = self._append(need, len(batch), lambda lg, first: C.encode_batch(
            lg.h, lg.pos, lg.end, first, time.time_ns(), joined, lengths))
        if self._syncs:
            self._after_write(first + len(batch), need)
        return range(first, first + len(batch))

    # -- durability -----------------------------------------------------------
    def flush(self) -> None:
        """Return once everything this process put is on stable storage."""
        with self._lock:
            target = self._open_log().next
        self._sync_to(target, checkpoint=True)

    def _sync_to(self, target: int, checkpoint: bool = False) -> None:
        """Group commit: return once every record below ``target`` that this
        process wrote is durable.  One thread (the leader) per process
        looks at a time; the threads that wrote before it looked are
        covered and all wake when it is done.  Across processes the leader
        joins the group commit of the control block (``_format``): it
        returns without an fdatasync of its own when another process's
        completed one covered its records, waits for one in progress that
        will, and otherwise fdatasyncs for every process."""
        if self._durable_next >= target and not checkpoint:
            return
        with self._sync_cond:
            while True:
                self._check_failed()
                if self._durable_next >= target and not checkpoint:
                    return
                if not self._syncing:
                    break
                self._sync_cond.wait()
            self._syncing = True
        done = -1
        try:
            lg = self._open_log()
            if lg.wanted():
                # Another process waits to append: let it while this one
                # syncs (its records may then share the fdatasync).
                with self._lock, lg.w:
                    if self._log is not None and lg.wanted():
                        lg.release()
            # Let threads that are about to append do so first: they join
            # this fsync instead of waiting for the next one.  (sched_yield
            # drops the GIL; time.sleep(0) costs tens of microseconds.)
            seen = -1
            for _ in range(16):
                now_next = lg.ctl_get(F.CTL_TAIL_NEXT)   # published by every put
                if now_next == seen:
                    break
                seen = now_next
                os.sched_yield()
            now = time.monotonic()
            point = None
            if checkpoint or now - self._last_checkpoint >= self.options.checkpoint_interval:
                with self._lock, lg.w:
                    point = (self._open_log().active.base, lg.pos, lg.next)
            self._pending = 0
            self._synced_at = now
            if point is None:
                # Covered by another process's fdatasync, done or in progress?
                # (-1: not covered, and this process holds sync.lock.)
                done = self._join_sync(lg, target)
            else:
                lg.sync_lock()
            if done < 0:
                done = self._sync_for_all(lg, point)
        except OSError as e:
            # After a failed fsync the kernel may have dropped the dirty
            # pages: nothing after the last good sync can be vouched for.
            self._failed = e
            log.error("queue %s: fsync failed (%s); the queue must be reopened", self.path, e)
            raise LogqError(f"fsync of {self.path} failed: {e}; reopen the queue to recover") from e
        finally:
            with self._sync_cond:
                self._syncing = False
                if done > self._durable_next:
                    self._durable_next = done       # 4.
                self._sync_cond.notify_all()

    def _join_sync(self, lg: Log, target: int) -> int:
        """The offset below which every record is durable by some process's
        completed fdatasync, once it reaches ``target``; or -1 with
        ``sync.lock`` held: this process syncs.  While a sync in progress
        (another process's) will cover ``target``, wait for it, trying the
        lock between waits: a syncer that died released it, and never
        published (so nothing returns early)."""
        while True:
            synced = lg.synced()
            if synced >= target:
                return synced
            if lg.try_sync_lock():
                break
            if lg.sync_in_progress() >= target:
                C.wait_synced(lg.ctl_h, target - 1, _SYNC_WAIT_NS)
                continue
            lg.sync_lock()      # the one in progress does not cover these: next turn
            break
        synced = lg.synced()
        if synced >= target:    # the syncer before covered them after all
            lg.sync_end()
            return synced
        return -1

    def _sync_for_all(self, lg: Log, point: tuple[int, int, int] | None) -> int:
        """Holding ``sync.lock``: make every record complete now durable, for
        every process; the offset below which they are.  With ``point``
        (this process's tail), also commit the index checkpoint."""
        try:
            stored = self._index.checkpoint() if point is not None else None
            with self._lock:
                # 2. the data is durable: every segment written since the last
                # published sync (rolls do not fsync); for a checkpoint, every
                # segment since the stored one.
                nxt, segs = lg.sync_begin((stored[0] if stored else 0) if point is not None else None)
            began = time.perf_counter()
            for seg in segs:
                _fdatasync_unless_deleted(seg)
            took = time.perf_counter() - began
            lg.sync_publish(nxt, segs)      # 4. for every process
        finally:
            lg.sync_end()
        self._fsyncs += 1
        self._fsync_seconds += took
        self._fsync_seconds_counts[bisect_left(FSYNC_SECONDS_BOUNDS, took)] += 1
        covered = max(0, nxt - self._durable_next)     # records this fsync made durable
        self._fsync_records += covered
        self._fsync_records_counts[bisect_left(FSYNC_RECORDS_BOUNDS, covered)] += 1
        if point is not None:
            if point[2] > self._checkpointed:
                # 3. ... before the index points at it.
                self._index.set_checkpoint(*point)
                self._checkpointed = point[2]
            self._last_checkpoint = time.monotonic()
        return nxt

    def _housekeep(self) -> None:
        """Background duties: the batch policy's timed fsync, faulting in
        pages ahead of the writer, handing the append lock back when idle
        or asked for by another process, and publishing this process's
        fsync figures to its status file (at most once a second, when they
        changed; never on the put path)."""
        last_next = -1
        prefaulted: tuple[Any, Any, int] = (None, None, 0)   # (segment, mapping, position) mapped ahead
        grown_from = (None, 0)      # (segment, writer position) at the last growth check
        retained = time.monotonic()
        published: tuple[int, bool] | None = None  # what the status file last said
        published_at = 0.0
        while not self._stop:
            lg = self._log
            if lg is None:
                return
            holding = lg.holding
            wait = 0.005 if holding else (self.options.fsync_interval if self._batch else _RETAIN_EVERY)
            self._kick.wait(wait)
            self._kick.clear()
            if self._stop or self._log is None:
                return
            try:
                figures = (self._fsyncs, self._failed is not None)
                if figures != published and time.monotonic() - published_at >= _STATUS_EVERY:
                    published, published_at = figures, time.monotonic()
                    _status.publish(self.path, "queue", str(os.getpid()), self._status_fields())
                # Not waiting for the queue's lock: a put holds it, so this
                # process is not idle, and a put yields the append lock itself
                # when another process wants it.
                if lg.holding and (lg.wanted() or lg.next == last_next):
                    with self._if_free(lg) as free:
                        if free and lg.holding and (lg.wanted() or lg.next == last_next):
                            lg.release()
                last_next = lg.next
                if lg.holding:
                    grown_from = self._grow_ahead(lg, *grown_from)
                    prefaulted = self._prefault(lg, *prefaulted)
                # "batch": fsync once the oldest unsynced put is about
                # fsync_interval old, or fsync_bytes were put (a kick), not
                # at every 5 ms wake while this process holds the lock.
                if (self._batch and self._durable_next < lg.next
                        and (self._pending >= self.options.fsync_bytes
                             or time.monotonic() - self._synced_at >= self.options.fsync_interval)):
                    self._sync_to(lg.next)
                if time.monotonic() - retained >= _RETAIN_EVERY:
                    retained = time.monotonic()
                    with self._lock:
                        if self._log is not None:
                            self._retain()
            except LogqError:
                pass    # already recorded in self._failed; puts report it
            except Exception:  # pragma: no cover - a bug; keep the queue usable
                log.exception("queue %s: housekeeping failed", self.path)

    def _status_fields(self) -> dict[str, Any]:
        """This process's in-memory figures, for its status file: its
        options, what its open recovered (if it was the first to open the
        queue), fsyncs, their latency and the records each made durable
        (histograms: counts per bucket, not cumulative, the last above
        every bound)."""
        lg, rec = self._log, self._recovery
        return {"fsync": self.options.fsync, "max_bytes": self.options.max_bytes,
                "failed": self._failed is not None,
                "opened_first": lg is not None and lg.alone, "last_shutdown_clean": rec.clean,
                "recovery_truncated_bytes": rec.truncated_bytes,
                "recovery_lost_records": sum(b - a for a, b in rec.lost),
                "fsyncs": self._fsyncs, "fsync_seconds_sum": self._fsync_seconds,
                "fsync_seconds_bounds": FSYNC_SECONDS_BOUNDS,
                "fsync_seconds_counts": list(self._fsync_seconds_counts),
                "fsync_records_sum": self._fsync_records,
                "fsync_records_bounds": FSYNC_RECORDS_BOUNDS,
                "fsync_records_counts": list(self._fsync_records_counts)}

    def _grow_ahead(self, lg: Log, seg: Any, pos: int) -> tuple[Any, int]:
        """Allocate the active segment ahead of the writer, off the put
        path: half a growth step ahead when the writer is slow,
        _PREFAULT_AHEAD when it appended half a step or more since the last
        look, so puts seldom stop to allocate and the pages can be faulted
        in before they are written.  A full disk or budget is left for the
        put that needs the room to report.  Skipped while a put holds the
        queue's lock: that put allocates itself when it is less than half
        ``lg.ahead`` ahead (``_append``), and waiting here would hold up
        faulting pages in."""
        # How fast the writer goes is read without the locks (a hint only).
        active, now = lg.active, lg.pos
        appended = now - pos if active is seg and now > pos else 0
        step = self.options.preallocate_bytes
        lg.ahead = step // 2 if appended < step // 2 else max(step, _PREFAULT_AHEAD)
        with self._if_free(lg) as free:
            if free and lg.holding:
                self._grow_to(lg, lg.ahead)
        return active, now

    @contextlib.contextmanager
    def _if_free(self, lg: Log) -> Iterator[bool]:
        """The housekeeper's way in: the queue's lock and the writer's, if
        the queue's is free now and the log still open; yields whether
        they are held.  (A put holds the queue's lock: this process is not
        idle then, and waiting for it would hold up faulting pages in.)"""
        if not self._lock.acquire(blocking=False):
            yield False
            return
        try:
            with lg.w:
                yield self._log is not None
        finally:
            self._lock.release()

    @staticmethod
    def _grow_to(lg: Log, ahead: int) -> None:
        """Allocate the active segment to ``ahead`` bytes after the writer
        (under the locks), best effort: a full disk or budget is left for
        the put that needs the room to report."""
        try:
            lg.grow_ahead(ahead)
        except (LogqError, _NoRoom):
            pass

    def _prefault(self, lg: Log, seg: Any, h: Any, at: int) -> tuple[Any, Any, int]:
        """Fault in the active segment's pages up to _PREFAULT_AHEAD bytes
        ahead of the writer (at most to what is allocated, which grows in
        steps), on this (housekeeping) thread, so that appends run at
        memory speed instead of stopping for each fresh page.  A segment
        mapped anew is faulted in again from the writer on.
        Each chunk under the segment's remap lock (not the queue's: puts
        go on meanwhile), so its mapping is never replaced under it."""
        while True:
            active = lg.active
            if active is None or self._log is None:
                return seg, h, at
            with active.remap_lock:
                if active is not seg or active.h is not h:
                    seg, h, at = active, active.h, lg.pos
                # Never past what is allocated: faulting a hole in for writing
                # would allocate it behind the disk budget's back, or SIGBUS.
                end = seg.allocated
                if h is None or not (at < end and at < lg.pos + _PREFAULT_AHEAD):
                    return seg, h, at
                n = min(_PREFAULT_CHUNK, end - at)
                if C.prefault(h, at, n) < 0:
                    return seg, h, seg.size      # not supported here: stop trying
                at += n

    # -- consumer groups --------------------------------------------------------
    # ``_consumer`` plugs its Consumer class in here: it is the layer above.
    _consumer_class: Any = None

    def consumer(self, group: str, **options: Any) -> Any:
        """A consumer in the durable group ``group`` (created on first use).
        Options (keyword-only): see ``logq.GroupOptions``."""
        self._open_log()
        return self._consumer_class(self, group, **options)

    def _poke(self) -> None:
        """Wake every process waiting for the queue to change (consumers
        look again: something was scheduled or given back)."""
        lg = self._log
        if lg is not None:
            C.wake(lg.ctl_h)

    # -- what settlements wrote (the tasks layer's outcomes) --------------------
    def _written(self) -> int:
        """The control block's count of commits that ran write hooks: read
        it, then look for what you wait for, then ``_wait_written`` on it."""
        return C.written(self._open_log().ctl_h)

    def _wait_written(self, seen: int, timeout: float) -> bool:
        """Sleep until a commit that ran write hooks (in any process) moved
        the count past ``seen``, at most ``timeout`` seconds: whether it
        moved.  A futex natively (no polling); the pure codec looks every
        1 ms."""
        return bool(C.wait_written(self._open_log().ctl_h, seen, int(max(timeout, 0.0) * 1e9)))

    def _bump_written(self) -> None:
        """After a commit that ran write hooks: wake the ``_wait_written``
        sleepers of every process (one atomic add; a futex wake only while
        someone sleeps)."""
        lg = self._log
        if lg is not None:
            C.bump_written(lg.ctl_h)

    def _asleep(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a sleep on the control block, counted as a waiter
        that ``close()`` wakes and waits for before it unmaps the block."""
        with self._waiters:
            self._open_log()
            if self._closing:
                raise self._closed_error()
            self._waiting += 1
        try:
            return fn(*args)
        finally:
            with self._waiters:
                self._waiting -= 1
                self._waiters.notify_all()

    def _wait_once(self, offset: int, timeout: float) -> bool:
        """One sleep of ``wait``: until the tail passes ``offset`` (True), or
        a poke (``_poke``, any process), a spurious wake or ``timeout``
        seconds (False; logq.aio tells a poke by the clock)."""
        return self._asleep(lambda: bool(C.wait(self._open_log().ctl_h, offset, int(timeout * 1e9))))

    # -- reading --------------------------------------------------------------
    def wait(self, offset: int, timeout: float | None = None) -> bool:
        """Block until the record at ``offset`` (or a later one) has been
        put, by this or any other process: True then, False once ``timeout``
        seconds passed.  Sleeps without polling (a futex on the shared tail,
        natively; the pure codec looks every 5 ms)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._waiters:
            lg = self._open_log()
            self._waiting += 1
        try:
            while True:
                if self._closing or self._log is None:
                    raise self._closed_error()
                if lg.tail() > offset:
                    return True
                left = _WAIT_SLICE if deadline is None else min(_WAIT_SLICE, deadline - time.monotonic())
                if left <= 0:
                    return False
                if C.wait(lg.ctl_h, offset, int(left * 1e9)):
                    return True
        finally:
            with self._waiters:
                self._waiting -= 1
                self._waiters.notify_all()

    def read(self, offset: int) -> bytes:
        """The payload at ``offset``.  Raises OffsetError outside
        [first_offset, next_offset), RecordLostError for a record destroyed
        by damage (never its bytes)."""
        with self._lock:
            # The usual case, a record in an indexed region without losses:
            # one codec call through the sparse index.
            if type(offset) is int and self._log is not None:
                found = self._log.find(offset)
                if found is not None:
                    seg, p, n = found
                    return seg.mm[p:p + n]
            at, out = self._read_run(offset, 1)
            if not out and at == offset:
                lg = self._open_log()
                raise OffsetError(f"offset {offset} is not in {self.path} "
                                  f"(it holds [{lg.first()}, {lg.tail()}))")
        if at != offset:
            raise RecordLostError(offset, f"record {offset} of {self.path} was lost to damage")
        return out[0]

    def read_many(self, offset: int, max_records: int = 1000) -> tuple[int, list[bytes]]:
        """Up to ``max_records`` consecutive payloads from the first intact
        record at or after ``offset``: (its offset, payloads).  Records lost
        to damage are skipped (the returned offset says where the run starts);
        an empty list means ``offset`` is at the end."""
        with self._lock:
            return self._read_run(offset, max_records)

    def scan(self, start: int | None = None, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(offset, payload) for every intact record from ``start`` (default
        the first) up to ``stop`` (default the end as of each batch)."""
        off = self.first_offset if start is None else start
        while stop is None or off < stop:
            first, payloads = self.read_many(off, 4096 if stop is None else min(4096, stop - off))
            if not payloads:
                return
            yield from zip(range(first, first + len(payloads)), payloads)
            off = first + len(payloads)

    def _fetch(self, offset: int, max_records: int, payloads: bool = True
               ) -> tuple[int, list[bytes] | None, list[int], list[int], dict[int, bytes] | None]:
        """For consumers: like read_many, plus each record's timestamp and
        attrs (meta_len | priority << 16 | flags << 24), and the meta of the
        records that have one (index in the run -> bytes) — or None when no
        record of the run has a meta or a priority (the common case)."""
        with self._lock:
            at, fields, mm = self._read_fields(offset, max_records)
            if not fields:
                return at, [] if payloads else None, [], [], None
            out = ([mm[p:p + n] for p, n in zip(fields[1::F.SCAN_FIELDS], fields[2::F.SCAN_FIELDS])]
                   if payloads else None)
            attrs = fields[4::F.SCAN_FIELDS]
            metas = None
            if attrs.count(_PLAIN) + attrs.count(_PLAIN_CONT) + attrs.count(_PLAIN_HEAD) != len(attrs):
                metas = {}
                for i, a in enumerate(attrs):
                    if a & 0xFFFF:
                        rec = fields[i * F.SCAN_FIELDS] + _HDR
                        metas[i] = mm[rec:rec + (a & 0xFFFF)]
            return at, out, fields[3::F.SCAN_FIELDS], attrs, metas

    def _read_run(self, offset: int, max_records: int) -> tuple[int, list[bytes]]:
        at, fields, mm = self._read_fields(offset, max_records)
        if not fields:
            return at, []
        return at, [mm[p:p + n] for p, n in zip(fields[1::F.SCAN_FIELDS], fields[2::F.SCAN_FIELDS])]

    def _read_fields(self, offset: int, max_records: int) -> tuple[int, list[int], Any]:
        lg = self._open_log()
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        while True:
            loc = lg.locate(offset)
            if loc is None:
                if offset < lg.first():
                    raise OffsetError(f"offset {offset} is below the first offset "
                                      f"{lg.first()} retained in {self.path}")
                return offset, [], None
            seg, limit = loc
            run = seg.read_run(offset, max_records, limit)
            if run is None:
                offset = limit      # the rest of this segment was lost: go on
                continue
            at, fields = run
            if seg.known_next >= limit > seg.stored_next and seg.base < lg.active.base:
                self._store_sparse(seg)     # a sealed segment, now fully indexed
            return at, fields, seg.mm

    def _store_sparse(self, seg: Any) -> None:
        """Keep a segment's sparse index (derived data, safe to lose), so
        that later opens read it without scanning the segment.  Once per
        segment; the segment is fsynced first (rolling did not), so the index
        never points at data that is not on stable storage."""
        if not seg.lost and seg.known_next > seg.stored_next:
            os.fdatasync(seg.fd)
            self._index.set_sparse(seg.base, seg.known_pos, seg.known_next - seg.base, seg.sparse)
        seg.stored_next = seg.known_next

    # -- state ------------------------------------------------------------------
    @property
    def first_offset(self) -> int:
        with self._lock:
            return self._open_log().first()

    @property
    def next_offset(self) -> int:
        with self._lock:
            return self._open_log().tail()

    def __len__(self) -> int:
        with self._lock:
            lg = self._open_log()
            return lg.tail() - lg.first()

    @property
    def queue_id(self) -> str:
        """A stable identity of this queue directory (a UUID in hex)."""
        return self._open_log().queue_id

    def stats(self) -> dict[str, Any]:
        """A snapshot of the queue's state and counters, with one entry per
        consumer group under ``"groups"``.  Derived from the log and the
        index (and, for what is in flight, the lease table), so it is right
        after a crash too."""
        with self._lock:
            lg = self._open_log()
            first = lg.first()
            tail = lg.tail()
            sizes = 0
            for b in lg.bases:
                try:
                    sizes += os.path.getsize(os.path.join(self.path, F.segment_name(b)))
                except FileNotFoundError:
                    pass        # deleted by retention in another process since listed
            rec = self._recovery
            out = {
                "path": self.path,
                "queue_id": lg.queue_id,
                "first_offset": first,
                "next_offset": tail,
                "messages": tail - first,
                "segments": len(lg.bases),
                "segment_bytes_on_disk": sizes,
                "disk_bytes": self._disk_bytes(),
                "max_bytes": self.options.max_bytes,
                "fsync": self.options.fsync,
                "fsyncs": self._fsyncs,
                "durable_next_offset": self._durable_next,
                "lost_records": sum(s.lost_count() for s in lg.segments.values()),
                "last_shutdown_clean": rec.clean,
                "recovery_truncated_bytes": rec.truncated_bytes,
                "index_rebuilt": self._index_rebuilt,
                "native": C.native_enabled(),
            }
        out["groups"] = self._group_stats(tail)
        return out

    def _group_stats(self, tail: int) -> dict[str, dict[str, Any]]:
        rows = self._index.group_rows()
        if not rows:
            return {}
        flight = in_flight(self.path, rows)
        now = time.time_ns()
        out = {}
        for name, (g, settled, scheduled, dead) in rows.items():
            mark = g[G_WATERMARK]
            backlog = max(0, tail - mark - settled)
            age = 0.0
            if backlog:
                try:
                    at, _p, ts, _a, _m = self._fetch(mark, 1, payloads=False)
                    age = max(0.0, (now - ts[0]) / 1e9) if ts else 0.0
                except OffsetError:
                    pass
            out[name] = {
                "backlog": backlog,
                "in_flight": flight.get(name, 0),
                "scheduled": scheduled,
                "delivered": g[G_DELIVERED],
                "acked": g[G_ACKED],
                "redelivered": g[G_REDELIVERED],
                "dead_lettered": g[G_DEAD],
                "dead_letters": dead,
                "dropped": g[G_DROPPED],
                "oldest_unacked_age": age,
                "watermark": mark,
            }
        return out

    # -- lifecycle --------------------------------------------------------------
    def _open_log(self) -> Log:
        lg = self._log
        if lg is None:
            raise self._closed_error()
        return lg

    def _closed_error(self) -> QueueClosedError:
        if getattr(self, "_in_child", False):
            return QueueClosedError(f"queue {self.path} was opened before this process forked; "
                                    "open it again in this process")
        return QueueClosedError(f"queue {self.path} is closed")

    def _forked(self) -> None:
        self._in_child = True
        self._writer = C.Writer().handle   # end 0: every put takes the slow path
        self._log = None
        self._stop = True

    def close(self) -> None:
        """Flush (unless fsync="never"), close its consumers, release the
        locks, and mark the shutdown clean if no other process has the queue
        open.  Idempotent: a second call does nothing.  After it, every
        other method and property of the queue and of its consumers raises
        QueueClosedError (``path`` and ``options`` stay readable)."""
        with self._lock:
            lg = self._log
            if lg is None:
                return
        for hook in list(self._close_hooks):
            try:
                hook()
            except Exception:
                log.exception("queue %s: closing a consumer group failed", self.path)
        if self._syncs and self._failed is None:
            self._sync_to(lg.next)
        self._stop = True
        self._kick.set()
        if self._housekeeper is not threading.current_thread():
            self._housekeeper.join()
        _status.withdraw(self.path, "queue", str(os.getpid()))
        # Threads in wait() sleep on the control block: wake them and let
        # them leave before it is unmapped.
        self._closing = True
        with self._waiters:
            while self._waiting:
                C.wake(lg.ctl_h)
                self._waiters.wait(0.01)
        with self._lock:
            self._log = None
            with lg.w:
                lg.release()
            try:
                if lg.close_last() and lg.ctl_get(F.CTL_HOLDER) == 0 and self._failed is None:
                    lg.adopt_tail()
                    stored = self._index.checkpoint()
                    lg.sync_segments(stored[0] if stored else 0)
                    # The active segment's index too: the next open reads its
                    # newest records without scanning (and mapping) it all.
                    lg.active.extend(lg.next - 1, lg.next)
                    self._store_sparse(lg.active)
                    self._index.set_checkpoint(lg.active.base, lg.pos, lg.next, clean=True)
            finally:
                self._index.close()
                lg.close()
        _open_queues.discard(self)

    def __enter__(self) -> "Queue":
        self._open_log()        # a closed queue raises, as every call but close does
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._log is None else f"next_offset={self._log.next}"
        return f"<logq.Queue {self.path!r} fsync={self.options.fsync!r} {state}>"


def _as_item(x: Any, i: int) -> bytes:
    try:
        return _as_bytes(x)
    except TypeError:
        raise TypeError(f"item {i} of put_many is a {type(x).__name__}, not bytes, bytearray or "
                        "memoryview; nothing was stored") from None


def open(path: str | os.PathLike[str], **options: Any) -> Queue:  # noqa: A001 - the API name
    """Open the queue in directory ``path``, creating it if needed.  Options
    (keyword-only) are the fields of :class:`Options`."""
    return Queue(path, **options)

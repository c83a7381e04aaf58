"""The durability half of a Queue: the fsync policy and group commit.

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

import errno
import logging
import os
import threading
import time
from bisect import bisect_left
from typing import Any

from logq import _codec as C
from logq import _format as F
from logq._errors import LogqError, QueueClosedError
from logq._index import Index
from logq._log import Log
from logq._recover import Recovery
from logq._options import Options

log = logging.getLogger("logq")

# Per-process figures of the group commit, published to the status file
# (``logq metrics``): histogram bucket bounds (upper, inclusive).
FSYNC_SECONDS_BOUNDS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FSYNC_RECORDS_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)
_SYNC_WAIT_NS = 2_000_000    # a put waiting for another process's fdatasync tries its lock this often


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


class Committer:
    """The Queue's fsync policy and group commit (its base class: the state
    below is the Queue's, set up by ``Queue.__init__``)."""

    path: str
    options: Options
    _lock: threading.Lock
    _log: Log | None
    _index: Index
    _recovery: Recovery
    _kick: threading.Event
    _stop: bool
    _sync_cond: threading.Condition
    _syncing: bool
    _durable_next: int
    _failed: BaseException | None
    _fsyncs: int
    _fsync_seconds: float
    _fsync_seconds_counts: list[int]
    _fsync_records: int
    _fsync_records_counts: list[int]
    _last_checkpoint: float
    _checkpointed: int
    _pending: int
    _synced_at: float
    _always: bool
    _batch: bool
    _syncs: bool

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

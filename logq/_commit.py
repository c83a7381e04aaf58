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
_CONTENDED = 1.0             # "always": hand the append lock over before each sync this long after a wait for it (s)
_SEVERAL_FOR = 1.0           # a sync lets other threads append first this long after two waited (s)
_GATHER_GAP = 100e-6          # a sync waits for more appends while they come this close (s)
_GATHER_SHARE = 0.5           # ... for at most this share of an fdatasync
_GATHER_MOST = 2e-3           # ... and at most this long (s)
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
    _putter = 0                 # the thread that last waited for a sync (its ident)
    _several_at = 0.0           # when another thread than the last one did (monotonic s)
    _sync_took = 0.0            # how long an fdatasync takes here, a moving average (s)
    _cover = 0                  # records the last fdatasync seen here made durable (any process's)

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
        me = threading.get_ident()
        if me != self._putter:
            if self._putter:
                self._several_at = time.monotonic()     # several threads wait for syncs
            self._putter = me
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
            if lg.wanted() or (self._always and lg.holding and lg.contended(_CONTENDED)):
                # Another process waits (or, under "always", waited lately)
                # to append: let it while this one syncs (its records may
                # then share the fdatasync).  Kept until it asks, this lock
                # would wait for the fdatasync and then the housekeeper.
                with self._lock, lg.w:
                    if self._log is not None and lg.holding:
                        lg.release()
            if time.monotonic() - self._several_at < _SEVERAL_FOR:
                # Let threads that are about to append do so first: they
                # join this fsync instead of waiting for the next one.
                # (sched_yield drops the GIL; time.sleep(0) costs tens of
                # microseconds.)  Not for a lone thread: no one is coming,
                # and on a busy machine each sched_yield gives the CPU away
                # for a time slice.
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
        published (so nothing returns early).  Before this process
        syncs for all, other processes that put lately get a moment to
        append (``_gather``)."""
        waited = False
        seen = lg.synced()
        while True:
            synced = lg.synced()
            if synced != seen:
                self._cover, seen = synced - seen, synced
            if synced >= target:
                return synced
            if lg.try_sync_lock():
                break
            # The sync in progress covers these records (then wait for it),
            # or not (wait for it to end, then try to be the next syncer):
            # a sleep on SYNCED_NEXT's futex, which every syncer wakes, not
            # on sync.lock, which would hand the lock to its waiters one
            # after another, each only to find its records synced.
            waited = lg.sync_in_progress() < target
            C.wait_synced(lg.ctl_h, target - 1, _SYNC_WAIT_NS)
        synced = lg.synced()
        if synced >= target:    # the syncer before covered them after all
            lg.sync_end()
            return synced
        if waited or lg.contended(_CONTENDED):
            # Other processes put too: those the last fdatasync made
            # durable are coming back with new records.
            self._gather(lg)
        return -1

    def _gather(self, lg: Log) -> None:
        """Holding ``sync.lock``, before an fdatasync for every process: wait
        while other processes append (each new record, or a wait for the
        append lock, within ``_GATHER_GAP`` of the last), so that the
        fdatasync covers them too, at most a fraction of an fdatasync (the
        most that can pay off: with several processes putting, each
        fdatasync then covers about one record of each), and no longer
        than until as many records wait as the last fdatasync covered
        (those puts are back).  A sleep on the tail's futex: every append
        wakes it."""
        deadline = time.monotonic() + min(_GATHER_MOST, self._sync_took * _GATHER_SHARE)
        enough = lg.synced() + self._cover
        while True:
            seen = lg.ctl_get(F.CTL_TAIL_NEXT)
            left = deadline - time.monotonic()
            if left <= 0 or seen >= enough:
                return
            if not C.wait(lg.ctl_h, seen, int(min(left, _GATHER_GAP) * 1e9)) \
                    and not lg.ctl_get(F.CTL_WANT):
                return

    def _sync_for_all(self, lg: Log, point: tuple[int, int, int] | None) -> int:
        """Holding ``sync.lock``: make every record complete now durable, for
        every process; the offset below which they are.  With ``point``
        (this process's tail), also commit the index checkpoint."""
        try:
            before = lg.synced()
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
            self._sync_took += (took - self._sync_took) / 8
            lg.sync_publish(nxt, segs)      # 4. for every process
            if nxt > before:
                self._cover = nxt - before
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

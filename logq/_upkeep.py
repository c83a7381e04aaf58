"""The housekeeper and the disk budget of a Queue: the background thread
(the batch policy's timed fsync, allocating and faulting in pages ahead of
the writer, handing the append lock back, publishing the status figures)
and what makes room (retention, max_bytes, on_full)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from typing import Any, Iterator

from logq import _codec as C
from logq import _format as F
from logq import _status
from logq._commit import FSYNC_RECORDS_BOUNDS, FSYNC_SECONDS_BOUNDS, Committer
from logq._errors import LogqError, QueueFullError
from logq._fsutil import fsync_dir
from logq._log import Log

log = logging.getLogger("logq")

_RETAIN_EVERY = 1.0           # the housekeeper deletes settled segments this often (s)
_PREFAULT_AHEAD = 32 << 20    # the housekeeper maps this much ahead of the writer
_PREFAULT_CHUNK = 1 << 20
_STATUS_EVERY = 1.0           # the housekeeper publishes the figures at most this often (s)


class _NoRoom(Exception):
    """Internal: the disk budget has no room for a new segment yet."""


class Upkeep(Committer):
    """The Queue's housekeeping and disk budget (a base class of Queue)."""

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

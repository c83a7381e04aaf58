"""Queue: opening (and recovery), reading, state and lifecycle.  Its bases
hold the rest, one module each: producing (``_produce``), the fsync policy
and group commit (``_commit``, where the commit order is), the housekeeper
and the disk budget (``_upkeep``)."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Iterator

from logq import _codec as C
from logq import _format as F
from logq import _status
from logq._errors import LogqError, OffsetError, RecordLostError
from logq._index import (G_ACKED, G_DEAD, G_DELIVERED, G_DROPPED, G_REDELIVERED, G_WATERMARK,
                         Index, clamp_scratch, in_flight, open_index, reset_scratch)
from logq._log import Log
from logq._recover import Recovery, recover
from logq._commit import FSYNC_RECORDS_BOUNDS, FSYNC_SECONDS_BOUNDS
from logq._options import Options
from logq._produce import Producer
from logq._slices import cut

log = logging.getLogger("logq")

_HDR = F.RECORD_HEADER_SIZE
# The attrs (see _fetch) of a record with no meta and no priority: alone,
# continuing a put_many batch, or heading one (its only meta is the count).
_PLAIN = F.RECORD_MARK << 24
_PLAIN_CONT = (F.RECORD_MARK | F.FLAG_CONT) << 24
_PLAIN_HEAD = (F.RECORD_MARK | F.FLAG_BATCH) << 24 | F.BATCH_COUNT_SIZE   # a batch's count: no attribute
_PLAIN_KINDS = frozenset((_PLAIN, _PLAIN_CONT, _PLAIN_HEAD))
_WAIT_SLICE = 1.0             # wait() looks at the clock and for close() this often


_open_queues: "weakref.WeakSet[Queue]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child shares the parent's locks and mappings: its copies of
    # open queues must not be used (open the queue again in the child).
    for q in list(_open_queues):
        q._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Queue(Producer):
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
                rec = self._recovery = recover(lg, checkpoint, self._index.was_clean())
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
        moved.  A futex, no polling (on the pure codec a missed wake-up costs
        at most 1 ms)."""
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
        seconds passed.  Sleeps without polling (a futex on the shared tail;
        on the pure codec a missed wake-up costs at most 5 ms)."""
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
            out = cut(mm, fields[1::F.SCAN_FIELDS], fields[2::F.SCAN_FIELDS]) if payloads else None
            attrs = fields[4::F.SCAN_FIELDS]
            metas = None
            if not _PLAIN_KINDS.issuperset(attrs):      # (one C pass, no list built)
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
        return at, cut(mm, fields[1::F.SCAN_FIELDS], fields[2::F.SCAN_FIELDS])

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
                if lg.close_last() and self._failed is None:
                    self._last_out(lg)
            finally:
                self._index.close()
                lg.close()
        _open_queues.discard(self)

    def _last_out(self, lg: Log) -> None:
        """The last process to close the queue: a clean shutdown (the
        checkpoint, and the active segment's index), unless a writer died
        holding the append lock and its leftovers cannot be repaired now."""
        if lg.ctl_get(F.CTL_HOLDER) != 0:
            # No appender came since to repair what it left (its whole
            # records kept, the torn one zeroed): the last one out does.
            # (Not waiting: a process forked by the dead one may hold its
            # lock still; then the next open recovers.)
            try:
                with lg.w:
                    if lg.acquire(block=False):
                        lg.release()
            except (OSError, LogqError) as e:
                log.warning("queue %s: could not repair after a dead writer at close: %s", self.path, e)
            if lg.ctl_get(F.CTL_HOLDER) != 0:
                return
        lg.adopt_tail()
        stored = self._index.checkpoint()
        lg.sync_segments(stored[0] if stored else 0)
        # The active segment's index too: the next open reads its newest
        # records without scanning (and mapping) it all.
        lg.active.extend(lg.next - 1, lg.next)
        self._store_sparse(lg.active)
        self._index.set_checkpoint(lg.active.base, lg.pos, lg.next, clean=True)

    def __enter__(self) -> "Queue":
        self._open_log()        # a closed queue raises, as every call but close does
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._log is None else f"next_offset={self._log.next}"
        return f"<logq.Queue {self.path!r} fsync={self.options.fsync!r} {state}>"


def open(path: str | os.PathLike[str], **options: Any) -> Queue:  # noqa: A001 - the API name
    """Open the queue in directory ``path``, creating it if needed.  Options
    (keyword-only) are the fields of :class:`Options`."""
    return Queue(path, **options)

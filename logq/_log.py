"""The log: a directory of segments, the append lock shared by every process
that has the queue open, the active segment, rolling (recovery: ``_recover``).

Who may write
-------------
Appends happen only while holding ``append.lock`` (flock).  A process keeps
the lock between puts (so a put costs no system call) until another process
asks for it by setting the WANT word of the control block; the holder sees
that on its next put (``_codec.put`` checks it) or within a few
milliseconds when idle (``Queue``'s housekeeper), publishes the tail and
lets go.  A holder that dies holding the lock leaves its pid in the HOLDER
word: the next holder validates what the dead one wrote past the published
tail, keeps the intact records and zeroes the torn one.
"""

from __future__ import annotations

import bisect
import fcntl
import functools
import logging
import mmap
import os
import time
import uuid
from array import array
from typing import Callable

from logq import _codec as C
from logq import _format as F
from logq._errors import DiskFullError, FormatVersionError, NotAQueueError, QueueInUseError
from logq._fsutil import fsync_dir, losses
from logq._scan import _PAGE, _first_at, _torn_extent, scan_tail
from logq._segment import Segment, encode_header

log = logging.getLogger("logq")



def _round_up(n: int, to: int = _PAGE) -> int:
    return (n + to - 1) // to * to


def _read_meta(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    if not lines or lines[0] != F.META_MAGIC:
        raise NotAQueueError(f"{os.path.dirname(path)} is not a logq queue ({path} is not a logq meta file)")
    version = fields.get("version", "?")
    if version != str(F.META_VERSION):
        raise FormatVersionError(
            f"{os.path.dirname(path)} is a logq queue in format version {version}; this logq "
            f"reads version {F.META_VERSION} only")
    return fields.get("id", "")


def init_dir(qdir: str) -> str:
    """Create the queue directory if needed; its queue id.  Refuses a file,
    and a non-empty directory that is not a queue."""
    if os.path.exists(qdir) and not os.path.isdir(qdir):
        raise NotAQueueError(f"{qdir} exists and is not a directory")
    meta = os.path.join(qdir, F.META_FILE)
    if os.path.exists(meta):
        return _read_meta(meta)
    try:
        os.makedirs(qdir, exist_ok=True)
    except FileExistsError:
        raise NotAQueueError(f"{qdir} exists and is not a directory") from None
    except OSError as e:
        raise type(e)(e.errno, f"cannot create the queue directory {qdir}: {e.strerror}") from e
    # Another process may be creating the queue right now: its temporary
    # meta file does not make the directory foreign.
    if any(not n.startswith((".", F.META_FILE + ".")) for n in os.listdir(qdir)):
        if not os.path.exists(meta):
            raise NotAQueueError(f"{qdir} is not empty and has no {F.META_FILE}: not a logq queue")
    tmp = f"{meta}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{F.META_MAGIC}\nversion {F.META_VERSION}\nid {uuid.uuid4().hex}\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, meta)  # fails if another process created it first
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    fsync_dir(qdir)
    parent = os.path.dirname(os.path.abspath(qdir))
    fsync_dir(parent)
    return _read_meta(meta)


def lock_holders(fd: int) -> tuple[int, ...]:
    """Pids of the other processes holding a flock on fd's file (from
    /proc/locks; empty where there is none)."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    try:
        with open("/proc/locks", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and ident in parts:
                    pid = int(parts[parts.index(ident) - 1])
                    if pid != os.getpid():
                        pids.add(pid)
    except (OSError, ValueError):
        return ()
    return tuple(sorted(pids))


def _flock(fd: int, op: int) -> bool:
    try:
        fcntl.flock(fd, op)
        return True
    except BlockingIOError:
        return False


class Log:
    """The segments of one queue directory, and this process's writer state.

    Not thread-safe: the Queue serialises calls under its lock.  The writer
    ``w`` is what the put fast path (``_codec.put``) appends with; its
    ``end`` is 0 whenever this process does not hold the append lock, so
    that path falls through to the Queue's slow path.  The writer points
    into the active segment's mapping: whoever remaps that segment points
    the writer at the new mapping (``_point_at``) before appending again."""

    def __init__(self, qdir: str, *, segment_bytes: int, exclusive: bool = False,
                 preallocate_bytes: int = 4 << 20) -> None:
        self.dir = qdir
        self.exclusive = exclusive
        self.segment_bytes = segment_bytes      # the roll size
        self.preallocate_bytes = _round_up(preallocate_bytes)   # the growth step
        self.ahead = 0      # bytes the holder keeps allocated after the writer (set by its Queue)
        self.queue_id = init_dir(qdir)
        self.pid = os.getpid()
        self.segments: dict[int, Segment] = {}
        self.bases: list[int] = []
        # The segment appends go to: None only until open() or the first roll,
        # before anything reads it (typed as set, so callers need no checks).
        self.active: Segment = None  # type: ignore[assignment]
        self.w = C.Writer()
        self.holding = False
        # When another process last waited for the append lock (this one's
        # wait for it, or its WANT seen here): monotonic seconds.
        self.contended_at = 0.0
        # Where sealed segments' stored sparse indexes come from (the Queue
        # plugs in its Index): base -> (end, count, positions) or None.
        self.sparse_source: Callable[[int], tuple[int, int, array[int]] | None] | None = None
        # Called with the bytes about to be allocated (a new segment, or a
        # growth step of the active one) before they are (the Queue's disk
        # budget); may delete old segments, or raise to refuse.
        self.before_alloc: Callable[[int], None] | None = None
        self._fds: list[int] = []
        # Ranges of offsets given up earlier (quarantine/manifest), by
        # segment name: meeting them again is no news.
        self.given_up: dict[str, list[tuple[int, int]]] = {}
        for e in losses(qdir):
            self.given_up.setdefault(e.get("segment"), []).append((e.get("first_offset"), e.get("end_offset")))  # type: ignore[arg-type]
        ctl_path = os.path.join(qdir, F.CONTROL_FILE)
        self.ctl_fd = self._open_fd(ctl_path)
        self.open_fd = self._open_fd(os.path.join(qdir, F.OPEN_LOCK_FILE))
        self.append_fd = self._open_fd(os.path.join(qdir, F.APPEND_LOCK_FILE))
        self.sync_fd = self._open_fd(os.path.join(qdir, F.SYNC_LOCK_FILE))
        # The control file's own flock serialises opening and closing.
        fcntl.flock(self.ctl_fd, fcntl.LOCK_EX)
        self.alone = _flock(self.open_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if exclusive and not self.alone:
            pids = lock_holders(self.open_fd)
            for fd in self._fds:      # closing releases the locks
                os.close(fd)
            who = f" (pid {', '.join(map(str, pids))})" if pids else ""
            raise QueueInUseError(f"queue {qdir} is open in another process{who}; this needs it "
                                  "to itself: stop the processes using it first", pids)
        if self.alone and os.fstat(self.ctl_fd).st_size != F.CONTROL_SIZE:
            os.ftruncate(self.ctl_fd, F.CONTROL_SIZE)
        self.ctl = mmap.mmap(self.ctl_fd, F.CONTROL_SIZE)
        # Whether the machine restarted since the block was last set up: if
        # not, the page cache kept every write and only the newest segment
        # can end in a torn record.
        boot = boot_id()
        self.rebooted = (boot is None or bytes(self.ctl[:8]) != F.CONTROL_MAGIC
                         or bytes(self.ctl[F.CTL_BOOT_ID:F.CTL_BOOT_ID + 16]) != boot)
        self.ctl_h = C.handle(self.ctl)
        # Whole native 8-byte words: a struct pack_into writes byte by byte,
        # and another process must never read a torn tail.
        self.ctl_words = memoryview(self.ctl).cast("Q")
        self.refresh_bases()

    def _open_fd(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._fds.append(fd)
        return fd

    def end_open(self) -> None:
        """Finish opening: from now on other processes may open the queue
        (exclusive: only once it is closed; their opens wait till then)."""
        if self.exclusive:
            return
        fcntl.flock(self.open_fd, fcntl.LOCK_SH)
        fcntl.flock(self.ctl_fd, fcntl.LOCK_UN)

    def close_last(self) -> bool:
        """Stop sharing the queue; whether no other process has it open (the
        caller then owns the clean shutdown).  Holds the open/close lock
        until ``close``."""
        fcntl.flock(self.ctl_fd, fcntl.LOCK_EX)
        fcntl.flock(self.open_fd, fcntl.LOCK_UN)
        return _flock(self.open_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    # -- the writer's fields (the C struct, or its pure twin) ----------------
    # Change them only while holding the writer: ``with log.w:``.
    pos = property(lambda self: self.w.pos, lambda self, v: setattr(self.w, "pos", v))
    end = property(lambda self: self.w.end, lambda self, v: setattr(self.w, "end", v))
    next = property(lambda self: self.w.next, lambda self, v: setattr(self.w, "next", v))

    @property
    def h(self) -> object:
        return self.active.h

    def _point_at(self, seg: Segment) -> None:
        """Make ``seg`` (as mapped now) the segment the writer appends to."""
        self.active = seg
        self.w.attach(seg.h, self.ctl_h)

    # -- control block ------------------------------------------------------
    def ctl_get(self, at: int) -> int:
        return self.ctl_words[at >> 3]

    def ctl_set(self, at: int, value: int) -> None:
        self.ctl_words[at >> 3] = value

    def publish(self) -> None:
        """Publish this writer's tail for other processes, and wake the
        readers waiting for it.  The order is the format's (``_format``,
        the control block): next, then position, then base, so that a
        holder killed between two stores leaves a tail that
        ``_repair_after`` can read."""
        self.ctl_set(F.CTL_TAIL_NEXT, self.next)
        self.ctl_set(F.CTL_TAIL_POS, self.pos)
        self.ctl_set(F.CTL_TAIL_BASE, self.active.base)
        C.wake(self.ctl_h)

    # -- segments -----------------------------------------------------------
    def refresh_bases(self) -> None:
        bases = []
        for name in os.listdir(self.dir):
            base = F.parse_segment_name(name)
            if base is not None:
                bases.append(base)
        bases.sort()
        for gone in set(self.segments) - set(bases):
            self.segments.pop(gone).close()
        self.bases = bases

    def segment(self, base: int) -> Segment:
        seg = self.segments.get(base)
        if seg is None:
            seg = self.segments[base] = Segment(os.path.join(self.dir, F.segment_name(base)), base)
            seg.given_up = self.given_up.get(F.segment_name(base), ())
            if self.sparse_source is not None:
                stored = self.sparse_source(base)
                if stored is not None:
                    seg.load_sparse(*stored)
        return seg

    def _first_size(self, need: int) -> int:
        """The bytes a new segment is created with allocated: one growth
        step, or as far as the writer is kept ahead (a fast one: see
        Queue._grow_ahead, so that its pages can be faulted in off the put
        path from the first record on), at most segment_bytes; or room for
        its first record if that is more."""
        ahead = max(self.preallocate_bytes, _round_up(F.SEGMENT_HEADER_SIZE + self.ahead))
        return max(_round_up(F.SEGMENT_HEADER_SIZE + need), min(self.segment_bytes, ahead))

    def new_segment(self, base: int, need: int) -> Segment:
        size = self._first_size(need)
        seg = Segment.create(self.dir, base, size, max(size, self.segment_bytes))
        self.segments[base] = seg
        if not self.bases or self.bases[-1] < base:
            self.bases.append(base)
        return seg

    def set_active(self, seg: Segment, pos: int, nxt: int) -> None:
        self._point_at(seg)
        self.pos = pos
        self.next = nxt
        if self.alone:
            self.ctl[:] = bytes(F.CONTROL_SIZE)
            self.ctl[:8] = F.CONTROL_MAGIC
            self.ctl[F.CTL_BOOT_ID:F.CTL_BOOT_ID + 16] = boot_id() or bytes(16)
            # The group commit starts here: nothing appended since is durable yet.
            self.ctl_set(F.CTL_SYNCED_BASE, seg.base)
            self.ctl_set(F.CTL_SYNCED_NEXT, nxt)
            self.publish()

    def attach(self) -> None:
        """Join a queue that another process has open: adopt its tail."""
        if bytes(self.ctl[:8]) != F.CONTROL_MAGIC:
            raise NotAQueueError(f"{self.dir}: control block not initialised by the process that has it open")
        self.adopt_tail()

    def adopt_tail(self) -> None:
        """Take the published tail as this process's own (mapping all of the
        active segment, which another process may have grown)."""
        base = self.ctl_get(F.CTL_TAIL_BASE)
        if base not in self.segments and base not in self.bases:
            self.refresh_bases()
        seg = self.segment(base)
        seg.refresh_size()
        self._point_at(seg)
        self.pos = self.ctl_get(F.CTL_TAIL_POS)
        self.next = self.ctl_get(F.CTL_TAIL_NEXT)

    # -- the append lock ------------------------------------------------------
    def acquire(self, block: bool = True) -> bool:
        """Take the append lock (waiting for it, unless ``block`` is false)
        and adopt the current tail; whether this process holds it."""
        if self.holding:
            return True
        if not _flock(self.append_fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
            if not block:
                return False
            self.contended_at = time.monotonic()
            pause = 20e-6
            while True:
                self.ctl_set(F.CTL_WANT, 1)
                # A sleep that the holder's release ends (it publishes the
                # tail, which wakes the tail's sleepers), as do its appends.
                C.wait(self.ctl_h, self.ctl_get(F.CTL_TAIL_NEXT), int(pause * 1e9))
                pause = min(pause * 2, 1e-4)
                if _flock(self.append_fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    break
        self.ctl_set(F.CTL_WANT, 0)
        self.adopt_tail()
        dead = self.ctl_get(F.CTL_HOLDER)
        if dead:
            self._repair_after(dead)
        self.ctl_set(F.CTL_HOLDER, self.pid)
        self.ctl_set(F.CTL_GENERATION, self.ctl_get(F.CTL_GENERATION) + 1)
        if self.active.version != F.FORMAT_VERSION:
            # Before ``end`` is set: if the new segment is refused (the disk
            # budget), nothing can be appended to the old-format one.
            try:
                self._upgrade_active()
            except BaseException:
                self.ctl_set(F.CTL_HOLDER, 0)
                fcntl.flock(self.append_fd, fcntl.LOCK_UN)
                raise
        # What another process allocated after the records is not known
        # here: the first append allocates again from the tail (cheap where
        # the blocks are there already).
        self.active.allocated = max(self.active.allocated, self.pos)
        self.end = self.active.allocated
        self.holding = True
        return True

    def _upgrade_active(self) -> None:
        """The active segment is in an older format (a queue written by an
        older logq): records are never appended to it.  One that holds no
        record yet gets a current header; otherwise the writer rolls to a
        new segment."""
        seg = self.active
        if self.pos == F.SEGMENT_HEADER_SIZE:
            os.pwrite(seg.fd, encode_header(seg.base), 0)
            os.fsync(seg.fd)
            seg.version = F.FORMAT_VERSION
        else:
            log.info("segment %s is in format version %d: new records go to a new segment",
                     seg.path, seg.version)
            self.roll(0)

    def release(self) -> None:
        """Publish the tail and let other processes append."""
        if not self.holding:
            return
        self.publish()
        self.ctl_set(F.CTL_HOLDER, 0)
        self.holding = False
        self.end = 0
        fcntl.flock(self.append_fd, fcntl.LOCK_UN)

    def yield_turn(self) -> None:
        """Release because another process asked, and give it a moment to
        take the lock before this process asks again."""
        gen = self.ctl_get(F.CTL_GENERATION)
        self.release()
        deadline = time.monotonic() + 0.005
        while self.ctl_get(F.CTL_GENERATION) == gen and time.monotonic() < deadline:
            time.sleep(50e-6)

    def wanted(self) -> bool:
        if self.holding and self.ctl_get(F.CTL_WANT) != 0:
            self.contended_at = time.monotonic()
            return True
        return False

    def contended(self, within: float) -> bool:
        """Whether another process waited for the append lock in the last
        ``within`` seconds (so it probably waits again)."""
        return time.monotonic() - self.contended_at < within

    def _repair_after(self, pid: int) -> None:
        """The previous holder died holding the lock: keep the records it
        finished past the published tail (following it into any segment it
        rolled to), and zero the one it was writing."""
        self.refresh_bases()
        seg, pos, nxt = self.active, self.pos, self.next
        nxt = _first_at(seg, pos, nxt)
        while True:
            pos, nxt, _ = scan_tail(seg, pos, nxt, resync=False)
            later = [b for b in self.bases if b > seg.base]
            if not later:
                break
            seg, pos, nxt = self.segment(later[0]), F.SEGMENT_HEADER_SIZE, later[0]
            seg.refresh_size()
        cut = _torn_extent(seg, pos, nxt)
        if cut > pos and seg.mm[pos:cut].count(0) != cut - pos:
            seg.mm[pos:cut] = bytes(cut - pos)
            log.warning("segment %s: process %d died while appending at offset %d; zeroed its "
                        "%d torn bytes at position %d (it had not returned: nothing durable is lost)",
                        seg.path, pid, nxt, cut - pos, pos)
        self._point_at(seg)
        self.pos, self.next = pos, nxt
        self.publish()

    # -- appending (holder only) ----------------------------------------------
    def room(self, need: int) -> None:
        """Make sure ``need`` bytes fit in the active segment: grow its file
        (by ``preallocate_bytes`` ahead of the writer, up to segment_bytes;
        any size for a first record), or roll to a new segment when the
        record would pass segment_bytes.  The bytes are allocated before
        the writer may write there (DiskFullError, nothing written, if the
        disk has no room even for this record: a disk with less than a step
        left is used up to the last block)."""
        if self.pos + need <= self.end:
            return
        want = _round_up(self.pos + need)
        if want <= self.segment_bytes or self.pos == F.SEGMENT_HEADER_SIZE:
            step = max(want, min(self.segment_bytes, self.active.allocated + self.preallocate_bytes))
            try:
                self.grow_active(step)
            except DiskFullError:
                if step == want:
                    raise
                self.grow_active(want)
        else:
            self.roll(need)

    def grow_ahead(self, ahead: int) -> bool:
        """Keep at least ``ahead`` bytes allocated after the writer (up to
        segment_bytes): allocate at least one more step of the active
        segment when less is left.  Whether it did.  Holder only, under
        the writer's lock; raises as ``grow_active`` does."""
        seg = self.active
        cap = max(self.segment_bytes, seg.size)
        if seg.allocated >= cap or seg.allocated - self.pos >= min(ahead, cap - self.pos):
            return False
        self.grow_active(min(cap, max(seg.allocated + self.preallocate_bytes, _round_up(self.pos + ahead))))
        return True

    def grow_active(self, size: int) -> None:
        """Allocate the active segment's first ``size`` bytes (the disk
        budget asked first) and let the writer write there.  Holder only,
        under the writer's lock."""
        seg = self.active
        if size <= seg.allocated:
            return
        if self.before_alloc is not None:
            self.before_alloc(size - seg.allocated)
        seg.allocate(size, self.segment_bytes)
        self._point_at(seg)
        self.end = seg.allocated

    def roll(self, need: int) -> None:
        """Seal the active segment and start a new one at the next offset,
        durably created before it is published.  The sealed segment is not
        fsynced here: whoever needs its records durable syncs it
        (``sync_segments``), and recovery after a restart validates every
        segment written since the last checkpoint."""
        if self.before_alloc is not None:
            self.before_alloc(self._first_size(need))
        seg = self.new_segment(self.next, need)
        self._point_at(seg)
        self.pos = F.SEGMENT_HEADER_SIZE
        self.end = seg.allocated
        self.publish()

    def segments_since(self, from_base: int, *, refresh: bool = True) -> list[Segment]:
        """The segments from the one based at ``from_base`` up to the active
        one, oldest first: what to fdatasync so that everything written
        since ``from_base`` is durable (rolling does not fsync).
        ``refresh`` first lists segments other processes may have created."""
        active = self.active
        if refresh:
            self.refresh_bases()
        return [self.segment(b) for b in self.bases if from_base <= b < active.base] + [active]

    # -- group commit across processes (the control block's SYNC words) ----
    def synced(self) -> int:
        """Every record appended since the control block was set up and
        below this offset is on stable storage (another process's
        fdatasync, or this one's)."""
        return self.ctl_get(F.CTL_SYNCED_NEXT)

    def sync_in_progress(self) -> int:
        """The offset an fdatasync in progress in some process will make
        durable (0 if none is announced: advisory, see ``_format``)."""
        return self.ctl_get(F.CTL_SYNCING_NEXT) if self.ctl_get(F.CTL_SYNCING) else 0

    def try_sync_lock(self) -> bool:
        """Take ``sync.lock`` if no process is syncing (held by the syncer;
        the kernel releases it if the syncer dies)."""
        return _flock(self.sync_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def sync_lock(self) -> None:
        """Take ``sync.lock``, waiting (in the kernel, without the GIL) for
        the syncer in progress to finish or die."""
        fcntl.flock(self.sync_fd, fcntl.LOCK_EX)

    def sync_begin(self, from_base: int | None = None) -> tuple[int, list[Segment]]:
        """Under ``sync.lock`` (and the caller's lock: this lists segments):
        announce a sync and say what to fdatasync.  Returns (n, segments):
        once every one of them is fdatasynced, every record below n is
        durable.  From SYNCED_BASE on (and from ``from_base``, when given:
        a checkpoint's).  Then ``sync_publish``; ``sync_end`` in any case."""
        nxt = self.ctl_get(F.CTL_TAIL_NEXT)         # every record below it is complete
        self.ctl_set(F.CTL_SYNCING_NEXT, nxt)
        self.ctl_set(F.CTL_SYNCING, self.pid)
        start = self.ctl_get(F.CTL_SYNCED_BASE)
        if from_base is not None:
            start = min(start, from_base)
        # Read after nxt: if the active segment is still the one SYNCED_NEXT
        # lies in, every record below nxt is in it (a roll publishes the new
        # base before any record goes there).
        if self.ctl_get(F.CTL_TAIL_BASE) == start and start in self.segments:
            return nxt, [self.segments[start]]
        # Rolls since: list what other processes created too (each segment
        # is created durably before a record goes into it).
        self.refresh_bases()
        segs = []
        for b in self.bases:
            if b >= start:
                try:
                    segs.append(self.segment(b))
                except FileNotFoundError:
                    pass    # settled and deleted by retention meanwhile
        return nxt, segs

    def sync_publish(self, nxt: int, segs: list[Segment]) -> None:
        """Every segment ``sync_begin`` named was fdatasynced: publish that
        every record below ``nxt`` is durable (SYNCED_BASE first, so a
        process that reads SYNCED_NEXT never starts from a later base)."""
        lie_in = [s.base for s in segs if s.base <= nxt]
        if lie_in:
            self.ctl_set(F.CTL_SYNCED_BASE, max(lie_in))
        if nxt > self.ctl_get(F.CTL_SYNCED_NEXT):
            self.ctl_set(F.CTL_SYNCED_NEXT, nxt)

    def sync_end(self) -> None:
        """Let the next syncer go, and wake the processes waiting for
        SYNCED_NEXT (published or not: a waiter looks again either way)."""
        self.ctl_set(F.CTL_SYNCING, 0)
        fcntl.flock(self.sync_fd, fcntl.LOCK_UN)
        C.wake_synced(self.ctl_h)

    def sync_segments(self, from_base: int) -> None:
        for seg in self.segments_since(from_base):
            os.fdatasync(seg.fd)

    # -- reading --------------------------------------------------------------
    def first(self) -> int:
        """The first offset still retained (segments are listed afresh:
        another process may have deleted some)."""
        self.refresh_bases()
        return self.bases[0] if self.bases else self.next

    def tail(self) -> int:
        """The offset after the last record visible to this process."""
        if self.holding:
            return self.next
        return max(self.next, self.ctl_get(F.CTL_TAIL_NEXT))

    def find(self, offset: int) -> tuple[Segment, int, int] | None:
        """(segment, payload position, length) of the intact record
        ``offset`` by the quick route (:meth:`Segment.find`: a segment
        already mapped, its region indexed, no losses in it); None sends the
        caller to :meth:`locate` and a full read, which also says why."""
        bases = self.bases
        i = bisect.bisect_right(bases, offset) - 1
        seg = self.segments.get(bases[i]) if i >= 0 else None
        # No tail check: Segment.find answers only below what this process
        # has validated, which was below the tail then, and the tail of an
        # open queue never moves back.
        found = seg.find(offset) if seg is not None else None
        return None if found is None else (seg, found[0], found[1])  # type: ignore[return-value]

    def locate(self, offset: int) -> tuple[Segment, int] | None:
        """The segment holding ``offset`` and the first offset after it."""
        if not self.bases or offset < self.bases[0]:
            self.refresh_bases()
            if not self.bases or offset < self.bases[0]:
                return None
        tail = self.tail()
        if offset >= tail:
            return None
        newest = self.active.base if self.holding else self.ctl_get(F.CTL_TAIL_BASE)
        if self.bases[-1] < newest:
            self.refresh_bases()
        i = bisect.bisect_right(self.bases, offset) - 1
        limit = self.bases[i + 1] if i + 1 < len(self.bases) else tail
        try:
            return self.segment(self.bases[i]), limit
        except FileNotFoundError:
            # Deleted by retention in another process since it was listed.
            self.refresh_bases()
            return self.locate(offset)

    def close(self) -> None:
        with self.w:
            self.w.end = 0
            self.w.attach(None, None)
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        if self.ctl_h is not None:
            C.release(self.ctl_h)
            self.ctl_h = None
        self.ctl_words.release()
        self.ctl.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []


@functools.lru_cache(maxsize=1)
def boot_id() -> bytes | None:
    """The kernel's boot id (16 bytes; it changes at every restart), or None
    where it cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return None

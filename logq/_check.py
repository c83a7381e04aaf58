"""Checking and repairing a queue directory: ``logq verify`` and ``logq repair``.

``verify`` reads every record of every segment and checks its CRC, without
writing anything.  It reports

* **damage**: bytes inside the log that do not hold the records they must
  (the offsets they held are named), a segment header that fails its check,
  records that the index's durable checkpoint vouches for but that are
  gone, an index that cannot be opened;
* **known losses**: ranges that a repair (or recovery after a restart)
  already gave up, recorded in ``quarantine/manifest``: not damage any more;
* a **torn tail**: bytes after the last intact record of the newest
  segment, left by a writer that died mid-write.  Not damage (those records
  were never durable); the next open, or ``repair``, cuts it.

``repair`` needs the queue to itself (``QueueInUseError`` otherwise).  It
keeps every damaged range in ``quarantine/`` and records it in the
manifest, then zeroes it in place so that nothing reads a fragment of it,
moves a torn tail to quarantine the same way, rewrites bad segment headers
(keeping the old ones), drops the index's derived state (sparse offset
indexes; the whole index only if it is damaged or ``rebuild_index``, which
loses group state), and opens the queue once so that recovery rebuilds what
was dropped and moves a checkpoint whose records are gone back to the last
intact record (new puts follow it, reusing the offsets given up after it).
Nothing is deleted: every byte it takes out is kept aside.

What it may give up, exactly: only bytes that are not intact records of
the log, always copied to quarantine first.  A record of the log is one
that passes its CRC, sits where the scan from the segment's start expects
it with the offset expected next (or is where resynchronisation after
damage resumes), and, above the durable checkpoint, belongs to a whole
batch (``_log.scan_tail``).  So repair never zeroes a record below the
checkpoint that passes its CRC; above it, the intact records of a torn
batch are given up with it (they were never promised: the batch is all or
nothing).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import lmdb

from logq import _codec as C
from logq import _format as F
from logq._errors import NotAQueueError
from logq._fsutil import fsync_dir, given_up, keep_aside, losses, record_loss
from logq._index import K_CHECKPOINT, lmdb_file_problem, open_index, quarantine_index
from logq._log import Log, _read_meta
from logq._scan import _data_end, quarantine_bytes, scan_tail
from logq._segment import Segment, encode_header

log = logging.getLogger("logq")

Progress = Callable[[int, int], None]   # (bytes done, bytes in all)


@dataclass
class Damage:
    """One damaged range: segment bytes [start, end) and the offsets
    [first_offset, end_offset) it destroyed (an empty range for a header)."""
    segment: str
    start: int
    end: int
    first_offset: int
    end_offset: int
    kind: str        # "records" | "header" | "short segment" | "durable records missing" | "index"
    reason: str
    known: bool = False      # already given up and recorded in quarantine/manifest

    @property
    def offsets(self) -> int:
        return self.end_offset - self.first_offset


@dataclass
class Report:
    path: str
    queue_id: str = ""
    in_use: bool = False             # another process had it open (tail checked up to the published one)
    segments: int = 0
    records: int = 0
    bytes_scanned: int = 0
    first_offset: int = 0
    next_offset: int = 0
    damage: list[Damage] = field(default_factory=list)    # includes known losses (known=True)
    torn_tail: Damage | None = None
    index: str = "ok"
    actions: list[str] = field(default_factory=list)       # repair: what it did (or would do)
    unrepairable: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No damage but what was already given up, and a usable index."""
        return not any(not d.known for d in self.damage) and self.index == "ok"

    @property
    def lost_offsets(self) -> int:
        return sum(d.offsets for d in self.damage)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["clean"] = self.clean
        out["lost_offsets"] = self.lost_offsets
        return out


def require_queue(path: str) -> str:
    """The queue id of the queue at ``path``; NotAQueueError (saying why) if
    there is none: these tools never create a queue."""
    meta = os.path.join(path, F.META_FILE)
    if not os.path.isdir(path):
        raise NotAQueueError(f"{path}: no such queue directory")
    if not os.path.exists(meta):
        raise NotAQueueError(f"{path} is not a logq queue (it has no {F.META_FILE})")
    return _read_meta(meta)


def _bases(path: str) -> list[int]:
    return sorted(b for b in map(F.parse_segment_name, os.listdir(path)) if b is not None)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0            # deleted by retention in another process since listed


def _examine(path: str, bases: list[int], open_segment: Callable[[int], Segment] | None, rep: Report,
             progress: Progress | None, tail: tuple[int, int, int] | None, durable: int = 0) -> None:
    """Scan every segment into ``rep``: through ``open_segment`` (a Log's,
    kept open), or mapped read-only here and closed after.  ``tail`` (base,
    pos, next) limits the newest segment to what a live writer has
    published.  ``durable``: the index's checkpoint vouches for every record
    below this offset (batches there were written whole: damage loses only
    the records it touches); above it a batch belongs to the log only whole
    (``scan_tail``)."""
    owned = open_segment is None
    known: dict[str, list[tuple[int, int]]] = {}
    for e in losses(path):
        known.setdefault(e.get("segment"), []).append((e.get("first_offset"), e.get("end_offset")))  # type: ignore[arg-type]
    total = sum(_size(os.path.join(path, F.segment_name(b))) for b in bases)
    done = 0
    for i, base in enumerate(bases):
        name = F.segment_name(base)
        last = i == len(bases) - 1
        limit = None if last else bases[i + 1]
        try:
            seg = (Segment(os.path.join(path, name), base, readonly=True) if owned
                   else open_segment(base))  # type: ignore[misc]
        except FileNotFoundError:
            continue        # deleted by retention in another process since listed
        try:
            rep.segments += 1
            problem = seg.header_problem
            if seg.size < F.SEGMENT_HEADER_SIZE:
                rep.damage.append(Damage(name, 0, seg.size, base, base if last else limit,  # type: ignore[arg-type]
                                         "short segment", problem or "short"))
                continue
            if problem:
                rep.damage.append(Damage(name, 0, F.SEGMENT_HEADER_SIZE, base, base, "header", problem))
            pos, nxt = F.SEGMENT_HEADER_SIZE, base
            if last and tail is not None and tail[0] == base:
                seg.size = min(seg.size, tail[1])
            end, nxt, lost = scan_tail(seg, pos, nxt, limit=limit, durable=durable)
            for a, b, at, found in lost:
                stop = found if found >= 0 else _data_end(seg, at)
                zero = not seg.mm[at:stop].strip(b"\0")
                rep.damage.append(Damage(name, at, stop, a, b, "records", _why(seg, at, a),
                                         known=zero and given_up(known.get(name, ()), a, b)))
            rep.records += nxt - base - sum(b - a for a, b, _, _ in lost)
            rep.bytes_scanned += seg.size
            if last:
                rep.next_offset = nxt
                if tail is None:
                    data_end = _data_end(seg, end)
                    if data_end > end:
                        rep.torn_tail = Damage(name, end, data_end, nxt, nxt, "torn tail",
                                               _why(seg, end, nxt))
        finally:
            done += seg.size
            if progress:
                progress(done, total)
            if owned:
                seg.close()
    rep.first_offset = bases[0] if bases else 0


def _why(seg: Segment, at: int, offset: int) -> str:
    """Why the log's record ``offset`` is not at ``at``: the scan's reason,
    or a torn batch when an intact record is there (scan_tail stopped at a
    batch that is not whole)."""
    status = C.scan(seg.h, at, seg.size, offset, 1)[2]
    return F.SCAN_REASONS[F.TORN_BATCH if status == F.SCAN_OK else status]


def _stored_checkpoint(path: str, in_use: bool) -> tuple[str, tuple[int, int, int] | None]:
    """(the index's state for ``Report.index``, its checkpoint (base, pos,
    next) or None).  Opened read-only, without LMDB's reader lock only while
    no process can write."""
    idx = os.path.join(path, F.INDEX_DIR)
    problem = lmdb_file_problem(os.path.join(idx, "data.mdb"))
    if problem is not None:
        return f"damaged: {problem}", None
    if not os.path.exists(os.path.join(idx, "data.mdb")):
        return "missing (the next open rebuilds it from the log)", None
    try:
        env = lmdb.open(idx, subdir=True, readonly=True, lock=in_use, max_dbs=16)
    except lmdb.Error as e:
        return f"damaged: {e}", None
    try:
        with env.begin() as txn:
            main = env.open_db(b"main", txn=txn, create=False)
            raw = txn.get(K_CHECKPOINT, db=main)
    except lmdb.Error as e:
        return f"damaged: {e}", None
    finally:
        env.close()
    return "ok", struct.unpack("<QQQ", raw) if raw and len(raw) == 24 else None


def _durable_next(path: str, in_use: bool) -> int:
    """The offset below which the index's checkpoint vouches that every
    record was durable; 0 if there is none (every batch is then judged by
    its count)."""
    ck = _stored_checkpoint(path, in_use)[1]
    return ck[2] if ck else 0


def _check_index(path: str, rep: Report) -> None:
    """Whether the index opens, and whether its checkpoint vouches for
    records that are gone."""
    rep.index, ck = _stored_checkpoint(path, rep.in_use)
    if ck is not None and not rep.in_use:   # (a live writer's checkpoint moves on)
        base, _pos, durable_next = ck
        if durable_next > rep.next_offset and rep.segments:
            rep.damage.append(Damage(F.segment_name(base), 0, 0, rep.next_offset, durable_next,
                                     "durable records missing",
                                     f"the checkpoint says offsets below {durable_next} were on stable "
                                     f"storage; the log ends at {rep.next_offset}"))


def verify(path: str, *, progress: Progress | None = None) -> Report:
    """Scan every record of the queue at ``path`` and check it; never writes.

    While no other process has the queue open, opens wait until the scan is
    done.  While one has, the newest segment is checked up to the tail it
    has published (``Report.in_use``)."""
    rep = Report(path, queue_id=require_queue(path))
    ctl_path = os.path.join(path, F.CONTROL_FILE)
    fds = []
    try:
        tail = None
        if os.path.exists(ctl_path):
            ctl = os.open(ctl_path, os.O_RDONLY | os.O_CLOEXEC)
            fds.append(ctl)
            fcntl.flock(ctl, fcntl.LOCK_EX)       # opening and closing wait
            opener = os.open(os.path.join(path, F.OPEN_LOCK_FILE), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC)
            fds.append(opener)
            try:
                fcntl.flock(opener, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                rep.in_use = True
                words = os.pread(ctl, 32, 0)
                if words[:8] == F.CONTROL_MAGIC:
                    tail = struct.unpack_from("=QQQ", words, F.CTL_TAIL_BASE)
                fcntl.flock(ctl, fcntl.LOCK_UN)   # in use: do not hold its users up
        bases = _bases(path)
        if tail is not None:
            bases = [b for b in bases if b <= tail[0]]
        _examine(path, bases, None, rep, progress, tail, _durable_next(path, rep.in_use))
        _check_index(path, rep)
    finally:
        for fd in fds:
            os.close(fd)
    return rep


def repair(path: str, *, dry_run: bool = False, rebuild_index: bool = False,
           progress: Progress | None = None) -> Report:
    """Make the queue at ``path`` verify clean, keeping every intact record
    and every byte it takes out (see the module docstring).  Returns what it
    found, with ``actions`` saying what it did (``dry_run``: would do).
    Raises QueueInUseError if another process has the queue open."""
    require_queue(path)
    lg = Log(path, segment_bytes=4096, exclusive=True)   # opens wait while we work
    try:
        rep = Report(path, queue_id=lg.queue_id)
        _examine(path, list(lg.bases), lg.segment, rep, progress, None, _durable_next(path, False))
        _check_index(path, rep)
        act = rep.actions.append
        for d in rep.damage:
            where = f"{d.segment} bytes {d.start}..{d.end}"
            if d.known:
                continue
            if d.kind == "records":
                act(f"quarantine {where} and zero them: offsets {d.first_offset}..{d.end_offset - 1} "
                    f"({d.offsets} record(s), {d.reason}) are given up")
                if not dry_run:
                    quarantine_bytes(path, lg.segment(F.parse_segment_name(d.segment)), d.start, d.end,  # type: ignore[arg-type]
                                     (d.first_offset, d.end_offset), f"{d.reason}; given up by repair")
            elif d.kind == "header":
                act(f"keep the header of {d.segment} in quarantine and write a valid one ({d.reason})")
                if not dry_run:
                    seg = lg.segment(F.parse_segment_name(d.segment))  # type: ignore[arg-type]
                    keep_aside(path, f"{d.segment}.header", bytes(seg.mm[:F.SEGMENT_HEADER_SIZE]))
                    os.pwrite(seg.fd, encode_header(seg.base), 0)
                    os.fsync(seg.fd)
            elif d.kind == "durable records missing":
                act(f"accept that offsets {d.first_offset}..{d.end_offset - 1}, which were durable, "
                    "are gone (the log ends before them); the checkpoint is moved back to the "
                    "last intact record, and new records follow it")
                if not dry_run:
                    # Nothing to keep (the bytes are gone): the manifest
                    # records the loss; the open below moves the checkpoint.
                    quarantine_bytes(path, lg.segment(lg.bases[-1]), 0, 0,
                                     (d.first_offset, d.end_offset), f"{d.reason}; given up by repair")
            elif d.kind == "short segment" and d.segment != F.segment_name(lg.bases[-1]):
                # A sealed segment with no header left: its records are
                # gone.  Offsets are carried by the records, so a gap is how
                # the log says "lost": keep what is left of the file, give
                # the offsets up, and put a header-only segment in its place.
                act(f"keep {d.segment} ({d.end} bytes, too short to be a segment) in quarantine, give "
                    f"up offsets {d.first_offset}..{d.end_offset - 1} and write an empty segment")
                if not dry_run:
                    _replace_short(path, d)
        if rep.torn_tail is not None:
            t = rep.torn_tail
            act(f"quarantine the torn tail of {t.segment} (bytes {t.start}..{t.end}) and cut it")
            if not dry_run:
                seg = lg.segment(F.parse_segment_name(t.segment))  # type: ignore[arg-type]
                keep_aside(path, f"{t.segment}.{t.start}-{t.end}.torn", bytes(seg.mm[t.start:t.end]))
                seg.mm[t.start:t.end] = bytes(t.end - t.start)
                os.fdatasync(seg.fd)
        whole = rebuild_index or rep.index != "ok"
        act("move the index to quarantine and rebuild it from the log (group positions restart at "
            "the oldest message)" if whole else
            "rebuild the index's offset tables and checkpoint from the log (group state kept)")
        if not dry_run:
            if whole:
                quarantine_index(path, "damaged" if rep.index != "ok" else "rebuilt by repair")
            else:
                # Forget the offset tables and mark the shutdown unclean:
                # the open below scans the log for its tail again.
                idx = open_index(path, may_rebuild=False)
                try:
                    idx.drop_segments(lg.bases)
                    idx.set_clean(False)
                finally:
                    idx.close()
    finally:
        lg.close()
    if dry_run:
        return rep
    for a in rep.actions:
        log.warning("repair of %s: %s", path, a)
    # Opening alone runs recovery over what is left: the tail, the
    # checkpoint and the offset tables are found again from the log.
    # Recovery may start the newest segment anew (one too short for its
    # header); repair does not know the size the queue rolls at, so it
    # gives that segment the least span: the next writer extends it to
    # its own segment_bytes.  (The default, 64 MiB, would let a queue of
    # small segments grow one that big, past a max_bytes sized for them.)
    from logq._queue import Queue
    Queue(path, exclusive=True, segment_bytes=4096).close()
    return rep


def _replace_short(qdir: str, d: "Damage") -> None:
    """Repair of a sealed segment shorter than its header, in the order that
    loses nothing on a crash: its bytes kept, the loss recorded, then a
    header-only segment renamed over it (and the directory synced)."""
    path = os.path.join(qdir, d.segment)
    with open(path, "rb") as f:
        dest = keep_aside(qdir, f"{d.segment}.short", f.read())
    record_loss(qdir, {"segment": d.segment, "start": 0, "end": d.end,
                       "first_offset": d.first_offset, "end_offset": d.end_offset,
                       "file": os.path.basename(dest),
                       "reason": "segment too short to hold its header; given up by repair"})
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, encode_header(F.parse_segment_name(d.segment)))  # type: ignore[arg-type]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(qdir)

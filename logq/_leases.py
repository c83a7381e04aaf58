"""Consumer-group bookkeeping as a pure state machine: no I/O, no clock,
no randomness of its own.  ``_groups`` stores what these functions decide;
``_consumer`` drives them.  Everything here is tested exhaustively by
``tests/test_leases.py``.

Vocabulary (per group):

* **watermark** ``W``: every offset below it is settled (acked or
  dead-lettered); above it, settled offsets are kept as disjoint intervals.
* **claim**: offsets leased to one owner (a process) until a deadline.  A
  *range claim* covers a run of offsets first delivered together (fresh
  from the log); a *single claim* covers one offset (a redelivery, or a
  message whose lease was extended on its own).  A single claim overrides
  the range claim around it.
* **schedule**: offsets waiting for a time (a retry after a failure, a
  delayed message), with the number of deliveries made so far.
"""

from __future__ import annotations

import bisect
import struct
from collections import Counter, deque
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Iterable

from logq._errors import NotDeliveredError
from logq._retry import backoff_delay

_OFFSET = attrgetter("offset")
_LEASE = attrgetter("_l")
_CLAIM = struct.Struct("<QQqIq")    # end, owner, deadline ns (monotonic), attempt, due ns (0: none)


@dataclass(slots=True)
class Claim:
    """A lease on ``[start, end)``, by ``owner`` (8 bytes as an int), until
    ``deadline`` (monotonic ns), at delivery ``attempt``.  ``due`` is the
    schedule entry the offset was delivered from (single claims), else 0."""
    start: int
    end: int
    owner: int
    deadline: int
    attempt: int
    due: int = 0

    def pack(self) -> bytes:
        return _CLAIM.pack(self.end, self.owner, self.deadline, self.attempt, self.due)

    @classmethod
    def unpack(cls, start: int, raw: bytes) -> "Claim":
        end, owner, deadline, attempt, due = _CLAIM.unpack(raw)
        return cls(start, end, owner, deadline, attempt, due)


@dataclass(slots=True)
class Retry:
    """A failed delivery of ``offset`` (a nack), posted in the lease table
    the moment it is made, so that every live process of the group sees it
    before the durable record of the nack (written at its owner's next
    commit): the message is due again at ``due`` (wall ns), after
    ``attempts`` deliveries; ``from_due`` is the schedule entry the failed
    delivery came from (0: none).  ``owner`` made it: if that process dies
    before its commit, the retry is reaped like the lease it replaced.  It
    leases nothing: stored as a claim whose span is empty."""
    offset: int
    owner: int
    due: int
    attempts: int
    from_due: int = 0

    def pack(self) -> bytes:
        return _CLAIM.pack(self.offset, self.owner, self.due, self.attempts, self.from_due)

    @classmethod
    def unpack(cls, offset: int, raw: bytes) -> "Retry":
        _end, owner, due, attempts, from_due = _CLAIM.unpack(raw)
        return cls(offset, owner, due, attempts, from_due)


def runs(offsets: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged half-open runs covering ``offsets``."""
    ordered = sorted(offsets)
    if ordered and ordered[-1] - ordered[0] + 1 == len(ordered) == len(set(ordered)):
        return [(ordered[0], ordered[-1] + 1)]     # the usual case: one run
    out: list[list[int]] = []
    for o in ordered:
        if out and o <= out[-1][1]:
            out[-1][1] = max(out[-1][1], o + 1)
        else:
            out.append([o, o + 1])
    return [(a, b) for a, b in out]


def merge_settled(watermark: int, intervals: list[tuple[int, int]],
                  new: list[tuple[int, int]]) -> tuple[int, list[tuple[int, int]]]:
    """Add the runs ``new`` to the settled set (``watermark`` plus the
    disjoint ``intervals`` above it); the new watermark and intervals.  The
    watermark advances over every interval that touches it."""
    merged: list[list[int]] = []
    for a, b in sorted([(a, b) for a, b in intervals if b > watermark] +
                       [(max(a, watermark), b) for a, b in new if b > watermark]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    while merged and merged[0][0] <= watermark:
        watermark = max(watermark, merged.pop(0)[1])
    return watermark, [(a, b) for a, b in merged]


def is_settled(offset: int, watermark: int, intervals: Iterable[tuple[int, int]]) -> bool:
    return offset < watermark or any(a <= offset < b for a, b in intervals)


def after_failure(attempt: int, *, max_attempts: int, backoff_base: float, backoff_max: float,
                  delay: float | None = None,
                  rand: Callable[[], float] | None = None) -> float | None:
    """What happens to a message whose delivery ``attempt`` failed (a nack,
    an expired lease): seconds until it is delivered again, or None when
    it has used its ``max_attempts`` deliveries and goes to the dead-letter
    queue.  An explicit ``delay`` wins over the backoff."""
    if attempt >= max_attempts:
        return None
    if delay is not None:
        return delay
    if rand is None:
        return backoff_delay(attempt, backoff_base, backoff_max)
    return backoff_delay(attempt, backoff_base, backoff_max, rand)


def level_order(heads: dict[int, int], now_ns: int, aging_ns: int) -> list[int]:
    """The order in which to serve priority levels, given each level's
    oldest waiting message timestamp (``heads``: level -> ts ns).  Higher
    levels first, except that a level whose oldest message has waited
    ``aging_ns`` or longer is served before all others (oldest first): no
    message waits behind higher priorities for much longer than that."""
    aged = sorted((ts, -lvl) for lvl, ts in heads.items() if now_ns - ts >= aging_ns)
    first = [-neg for _, neg in aged]
    return first + sorted((lvl for lvl in heads if lvl not in first), reverse=True)


class Lease:
    """What a delivery's bookkeeping needs, shared by the messages
    delivered together: ``attempt`` (1 on the first delivery), lease
    ``deadline`` (monotonic ns), the range claim they were delivered under
    (``range_start``, -1 for none), the schedule entry they came from
    (``due`` ns, 0 for none), whether they hold a single claim of their own
    (``single``: delivered from the schedule, or extended on their own),
    and what the layer above attaches (``group``, ``key``, ``priority``)."""

    __slots__ = ("attempt", "deadline", "range_start", "due", "single", "group", "key", "priority")

    def __init__(self, attempt: int, deadline: int, range_start: int, due: int = 0,
                 single: bool = False, group: Any = None, key: bytes | None = None,
                 priority: int = 0) -> None:
        self.attempt = attempt
        self.deadline = deadline
        self.range_start = range_start
        self.due = due
        self.single = single
        self.group = group
        self.key = key
        self.priority = priority

    def copy(self, **change: Any) -> "Lease":
        new = Lease(self.attempt, self.deadline, self.range_start, self.due, self.single,
                    self.group, self.key, self.priority)
        for k, v in change.items():
            setattr(new, k, v)
        return new


class Delivery:
    """One message out with this process: its ``offset`` and its lease
    (shared with its batch until it is changed on its own: then copied)."""

    __slots__ = ("offset", "_l")

    def __init__(self, offset: int, lease: Lease) -> None:
        self.offset = offset
        self._l = lease

    attempt = property(lambda self: self._l.attempt)
    range_start = property(lambda self: self._l.range_start)
    due = property(lambda self: self._l.due)

    @property
    def deadline(self) -> int:
        return self._l.deadline

    @deadline.setter
    def deadline(self, value: int) -> None:
        self._l = self._l.copy(deadline=value)

    @property
    def single(self) -> bool:
        return self._l.single

    @single.setter
    def single(self, value: bool) -> None:
        self._l = self._l.copy(single=value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} offset={self.offset} attempt={self.attempt}>"


class BatchOut:
    """Deliveries handed out together (``take``) with no object per
    message: ``chunks`` of consecutive offsets ``(start, count, lease)``,
    each sharing one lease, indexed 0..n-1 in order.  ``open[i]`` is 1
    while delivery ``i`` is out and neither settled nor *detached*: turned
    into a Delivery of its own (``detached[i]``, then tracked like any
    other) to be nacked, given back or extended on its own."""

    __slots__ = ("chunks", "firsts", "open", "left", "detached")

    def __init__(self, chunks: list[tuple[int, int, Lease]]) -> None:
        self.chunks = chunks
        self.firsts: list[int] = []         # the index of each chunk's first delivery
        n = 0
        for _start, count, _lease in chunks:
            self.firsts.append(n)
            n += count
        self.open = bytearray(b"\x01") * n
        self.left = n
        self.detached: dict[int, Delivery] = {}

    def __len__(self) -> int:
        return len(self.open)

    def locate(self, i: int) -> tuple[int, Lease]:
        """The offset and the lease of delivery ``i``."""
        k = bisect.bisect_right(self.firsts, i) - 1
        start, _count, lease = self.chunks[k]
        return start + i - self.firsts[k], lease


@dataclass(slots=True)
class Settlement:
    """What one commit writes: acked deliveries, acked runs of batches
    ``(start, end, lease)``, and failed deliveries with when they are due
    again (wall ns, fixed when the nack was made; None: they used their
    attempts and go to the dead letters) and the error text."""
    acks: list[Delivery]
    nacks: list[tuple[Delivery, int | None, str | None]]
    runs: list[tuple[int, int, Lease]]

    def count(self) -> int:
        """How many deliveries were acked."""
        return len(self.acks) + sum(b - a for a, b, _lease in self.runs)


class Ledger:
    """The messages one process has out for one group, and the acks and
    nacks not yet committed.  Not thread-safe: the consumer locks around it.

    An offset is *out* from ``deliver`` until ``ack``/``nack``/``forget``;
    acking or nacking an offset that is not out raises NotDelivered (a
    second ack of one delivery, or a message of another group)."""

    def __init__(self) -> None:
        self.out: dict[int, Delivery] = {}
        self.ranges: dict[int, list[int]] = {}   # range claim start -> [end, offsets still out]
        self.acks: list[Delivery] = []
        self.nacks: list[tuple[Delivery, int | None, str | None]] = []
        self.batches: dict[int, BatchOut] = {}     # id -> batch with deliveries open
        self.runs: list[tuple[int, int, Lease]] = []    # acked runs of batches
        self.in_runs = 0                                # deliveries in them

    def add_range(self, start: int, end: int, count: int) -> None:
        """A range claim over [start, end) holding ``count`` deliveries."""
        self.ranges[start] = [end, count]

    def deliver(self, ds: list[Delivery]) -> None:
        self.out.update(zip(map(_OFFSET, ds), ds))

    def _take(self, d: Delivery) -> Delivery:
        if not isinstance(d, Delivery) or self.out.get(d.offset) is not d:
            raise NotDeliveredError(f"{d!r} is not out for delivery to this group (acked or "
                                    "nacked already, its lease was lost, or it was delivered "
                                    "to another group)")
        del self.out[d.offset]
        return d

    def ack(self, d: Delivery) -> None:
        if self.out.get(d.offset) is not d:
            self._take(d)           # raises
        del self.out[d.offset]
        self.acks.append(d)

    def ack_many(self, ds: Iterable[Delivery]) -> None:
        """Ack all of ``ds``, or (if one is not out) none of them."""
        out = self.out
        ds = list(ds)
        try:
            offsets = list(map(_OFFSET, ds))
        except AttributeError:
            offsets = None
        # (a list compares its items by identity first: this is a C loop)
        if offsets is None or list(map(out.get, offsets)) != ds:
            for d in ds:
                if not isinstance(d, Delivery) or out.get(d.offset) is not d:
                    raise NotDeliveredError(f"{d!r} is not out for delivery to this group (acked "
                                            "or nacked already, its lease was lost, or it was "
                                            "delivered to another group); nothing was acked")
        if len(set(offsets)) != len(ds):  # type: ignore[arg-type]
            raise NotDeliveredError("the same message twice in one ack_many; nothing was acked")
        deque(map(out.pop, offsets), 0)  # type: ignore[arg-type]
        self.acks += ds

    # -- batches (take) ---------------------------------------------------------------
    def deliver_batch(self, b: BatchOut) -> None:
        if b.left:
            self.batches[id(b)] = b

    def _check_batch(self, b: Any, idxs: list[int]) -> None:
        """Raise NotDeliveredError unless every index is out (open, or
        detached and out), once."""
        if not isinstance(b, BatchOut):
            raise NotDeliveredError(f"{type(b).__name__} is not a batch that take() returned")
        known = self.batches.get(id(b)) is b
        n = len(b.open)
        for i in idxs:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise NotDeliveredError(f"no delivery {i!r} in a batch of {n}; nothing was settled")
            if b.open[i] and known:
                continue
            d = b.detached.get(i)
            if d is None or self.out.get(d.offset) is not d:
                raise NotDeliveredError(f"delivery {i} (offset {b.locate(i)[0]}) of the batch is not "
                                        "out (settled already, its lease was lost, or given back); "
                                        "nothing was settled")
        if len(set(idxs)) != len(idxs):
            raise NotDeliveredError("the same delivery twice in one settlement; nothing was settled")

    def ack_batch(self, b: BatchOut, idxs: list[int] | None) -> int:
        """Ack deliveries ``idxs`` of ``b`` (None: every one still out),
        all or (if one is not out) none; how many."""
        if idxs is None:
            if self.batches.get(id(b)) is not b and not b.detached:
                self._check_batch(b, [0] if len(b) else [])     # raises
                return 0                                        # (an empty batch)
            if b.left == len(b.open):
                # The usual case: the whole batch at once, one run per chunk.
                self.runs += [(start, start + count, lease) for start, count, lease in b.chunks]
                b.open = bytearray(len(b.open))
                b.left = 0
                del self.batches[id(b)]
                self.in_runs += len(b.open)
                return len(b.open)
            idxs = [i for i, o in enumerate(b.open) if o] + \
                [i for i, d in b.detached.items() if self.out.get(d.offset) is d]
            if not idxs:
                raise NotDeliveredError("nothing of this batch is out any more (settled or given "
                                        "back already, or its leases were lost)")
        else:
            idxs = list(idxs)
            self._check_batch(b, idxs)
        runs: list[list[Any]] = []
        for i in sorted(idxs):
            if not b.open[i]:
                self.ack(b.detached[i])
                continue
            b.open[i] = 0
            b.left -= 1
            off, lease = b.locate(i)
            if runs and runs[-1][1] == off and runs[-1][2] is lease:
                runs[-1][1] = off + 1
            else:
                runs.append([off, off + 1, lease])
        self.runs += [(a, e, lease) for a, e, lease in runs]
        self.in_runs += sum(e - a for a, e, _lease in runs)
        if not b.left:
            self.batches.pop(id(b), None)
        return len(idxs)

    def detach(self, b: BatchOut, idxs: list[int] | None,
               make: Callable[[int, int, Lease], Delivery]) -> list[Delivery]:
        """The deliveries ``idxs`` of ``b`` (None: every one still out) as
        objects of their own (``make(index, offset, lease)``), out like any
        other from now on; all or (if one is not out) none."""
        if idxs is None:
            if self.batches.get(id(b)) is not b and not b.detached:
                self._check_batch(b, [0] if len(b) else [])     # raises
                return []                                       # (an empty batch)
            idxs = [i for i, o in enumerate(b.open) if o] + \
                [i for i, d in b.detached.items() if self.out.get(d.offset) is d]
            if not idxs:
                raise NotDeliveredError("nothing of this batch is out any more (settled or given "
                                        "back already, or its leases were lost)")
        else:
            idxs = list(idxs)
            self._check_batch(b, idxs)
        out = []
        for i in idxs:
            if b.open[i]:
                b.open[i] = 0
                b.left -= 1
                off, lease = b.locate(i)
                d = b.detached[i] = make(i, off, lease)
                self.out[off] = d
            out.append(b.detached[i])
        if not b.left:
            self.batches.pop(id(b), None)
        return out

    def detach_all(self, make: Callable[[BatchOut, int, int, Lease], Delivery]) -> None:
        """Detach every delivery still open in every batch (before a
        release: from then on each is a Delivery in ``out``)."""
        for b in list(self.batches.values()):
            self.detach(b, None, lambda i, off, lease, b=b: make(b, i, off, lease))  # type: ignore[misc]

    def nack(self, d: Delivery, due: int | None, error: str | None) -> None:
        """``d`` failed: due again at ``due`` (what the caller decided when
        the nack was made), or dead-lettered (None)."""
        self.nacks.append((self._take(d), due, error))

    def extend(self, d: Delivery, deadline: int) -> None:
        """Give ``d`` its own lease until ``deadline`` (never shorter); the
        caller stores the single claim."""
        if self.out.get(d.offset) is not d:
            raise NotDeliveredError(f"offset {d.offset} is not out for delivery to this group")
        d._l = d._l.copy(deadline=max(d.deadline, deadline), single=True)

    def forget(self, d: Delivery) -> int | None:
        """Drop ``d`` without settling it (given back, or its lease ran
        out); the start of its range claim if nothing of that claim is left
        out or unsettled now (the caller may delete the claim: every other
        message of it is settled durably)."""
        if self.out.get(d.offset) is not d:
            return None
        del self.out[d.offset]
        r = self.ranges.get(d.range_start)
        if r is not None:
            r[1] -= 1
            if r[1] <= 0:
                del self.ranges[d.range_start]
                return d.range_start
        return None

    def expire(self, d: Delivery) -> None:
        """Drop ``d`` without settling it and without freeing anything: its
        lease ran out (while buffered), so its offset is left to the reaper,
        which needs the claim over it.  Settling the rest of its range claim
        never frees that claim then (it expires and is reaped; what was
        settled is skipped)."""
        if self.out.get(d.offset) is not d:
            return
        del self.out[d.offset]
        self.ranges.pop(d.range_start, None)

    def pending(self) -> int:
        """Acks and nacks not committed yet (an acked run of a batch counts
        its length)."""
        return len(self.acks) + len(self.nacks) + self.in_runs

    def take(self) -> Settlement:
        """Hand the uncommitted acks and nacks to a commit: ``settled``
        once it is durable, ``restore`` if it failed."""
        s = Settlement(self.acks, self.nacks, self.runs)
        self.acks, self.nacks, self.runs = [], [], []
        self.in_runs = 0
        return s

    def restore(self, s: Settlement) -> None:
        self.acks[:0] = s.acks
        self.nacks[:0] = s.nacks
        self.runs[:0] = s.runs
        self.in_runs += sum(b - a for a, b, _lease in s.runs)

    def settled(self, s: Settlement) -> list[int]:
        """Record that ``s`` is durable; the range claims with nothing left
        out (the caller deletes them)."""
        done = []
        counts = Counter(map(_LEASE, s.acks))       # a batch shares one lease: count per lease
        counts.update(n[0]._l for n in s.nacks)
        for a, b, lease in s.runs:
            counts[lease] += b - a
        for lease, k in counts.items():
            start = lease.range_start
            r = self.ranges.get(start)
            if r is not None:
                r[1] -= k
                if r[1] <= 0:
                    done.append(start)
                    del self.ranges[start]
        return done

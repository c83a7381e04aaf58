"""Handing messages out to the caller of ``get``/``get_many``: the
prefetch buffer of ``get``, the counters of what was handed out, and the
messages of ``get_many`` as views of one batch (``_batch.Batch``) instead
of a delivery each in the ledger.  ``_Group`` (in ``_group``) mixes this
in.

A view is a ``Message`` whose ``_b`` is a weak reference to its batch.  It
stays part of the batch (acked as its runs when ``ack_many`` gets exactly
the views of a batch still wholly out) until a settlement of it alone
(``ack``, ``nack``, ``extend``, ``give_back``, an ``ack_many`` of some)
*attaches* it: the very object becomes a delivery of its own in the
ledger, so every path that settles one message works on it unchanged.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from functools import partial
from itertools import repeat
from operator import attrgetter
from typing import Any, Iterable

from logq._batch import Batch
from logq._leases import Delivery, Lease, Ledger

_ATTEMPT = attrgetter("_l.attempt")


class Message(Delivery):
    """A delivered message: ``offset``, ``data`` (bytes), ``timestamp``
    (when it was put, epoch seconds; ``ts_ns`` in nanoseconds), ``attempt``
    (1 on first delivery), ``key`` and ``priority`` (as put).  Ack or nack
    it through a consumer of the group that delivered it.

    (``_b``: a weak reference to the Batch a message from ``get_many`` is
    a view of, until a settlement of it alone makes it a delivery of its
    own: ``attach``.)"""

    __slots__ = ("data", "ts_ns", "_b")

    def __init__(self, offset: int, data: bytes, ts_ns: int, lease: Lease, b: Any = None) -> None:
        self.offset = offset
        self.data = data
        self.ts_ns = ts_ns
        self._l = lease
        self._b = b

    key = property(lambda self: self._l.key)
    priority = property(lambda self: self._l.priority)
    _group = property(lambda self: self._l.group)

    @property
    def timestamp(self) -> float:
        return self.ts_ns / 1e9


def _same(m: Message, _i: int, _off: int, _lease: Lease) -> Message:
    """``Ledger.detach``'s ``make`` for a view: the view itself."""
    return m


class HandOut:
    """The part of ``_Group`` that hands messages out (see the module's
    docstring).  Needs from its host: ``lock``, ``ledger``, ``buffer``,
    the counters ``delivered``, ``redelivered`` and ``_gets``."""

    lock: threading.Lock
    ledger: Ledger
    buffer: deque[Message]
    delivered: int
    redelivered: int
    _gets: int

    def from_buffer(self, n: int, a_get: bool) -> list[Message]:
        """Up to ``n`` messages this process claimed for get() and has not
        handed out (``a_get``: count the call for get()'s prefetch rate)."""
        out: list[Message] = []
        with self.lock:
            buf = self.buffer
            while buf and len(out) < n:
                m = buf.popleft()
                if m.deadline > time.monotonic_ns():
                    out.append(m)
                else:
                    self.ledger.expire(m)   # expired while buffered: left to the reaper
            if a_get:
                self._gets += 1
            if out:
                self.handed(out)
        return out

    def handed(self, ms: list[Message]) -> None:
        """Count messages handed to the caller (under ``self.lock``): a
        message claimed and given back unseen is not delivered."""
        self.delivered += len(ms)
        if len(ms) == 1:
            self.redelivered += ms[0]._l.attempt > 1
            return
        # (two C loops, no Python step per message)
        self.redelivered += len(ms) - list(map(_ATTEMPT, ms)).count(1)

    def views(self, b: Batch) -> list[Message]:
        """``get_many``: the messages of a batch ``take`` returned (with its
        payloads) as Messages that are views of it: the batch stays what is
        out, acked as runs when ``ack_many`` gets them all (``ack_whole``);
        any other settlement of one attaches it first."""
        out: list[Message] = []
        pl, ts = b.payloads, b._ts
        assert pl is not None
        # (a weak reference: the batch holds its views, and a cycle would
        # leave every batch to the cyclic collector, whose passes over
        # thousands of messages cost more than making them)
        wb = weakref.ref(b)
        for (start, count, lease), first in zip(b.chunks, b.firsts):
            out += map(Message, range(start, start + count), pl[first:first + count],
                       ts[first:first + count], repeat(lease), repeat(wb))
        b._views = out[:]       # (a copy: the caller may change its list)
        return out

    def ack_whole(self, ms: list[Message]) -> bool:
        """Under ``self.lock``: ack ``ms`` as their batch's runs if they are
        exactly the views ``get_many`` returned of a batch still wholly
        out (the usual ``ack_many(get_many(n))``); False (nothing done)
        otherwise."""
        wb = ms[0]._b if ms and type(ms[0]) is Message else None
        b: Any = wb() if wb is not None else None
        if b is None or b.left != len(ms) or len(b) != len(ms) or ms != b._views:
            return False
        known = self.ledger.batches.get(id(b)) is b     # (a bool: b keeps its type)
        if not known:
            return False
        self.ledger.ack_batch(b, None)
        # (the views keep their _b: a later settlement of one finds its
        # delivery settled in the batch, and so not out)
        return True

    def _in_batch(self, m: Any) -> tuple[Any, int] | None:
        """Under ``self.lock``: (batch, index) of a view whose delivery is
        still open in its batch, else None (not a view, or settled, given
        back or released since)."""
        wb = getattr(m, "_b", None) if type(m) is Message else None
        b: Any = wb() if wb is not None else None
        known = b is not None and self.ledger.batches.get(id(b)) is b   # (a bool: b keeps its type)
        if not known:
            return None
        i = b.index_of(m.offset)
        return (b, i) if i is not None and b.open[i] else None

    def attach(self, ms: Iterable[Any]) -> None:
        """Under ``self.lock``: make each view among ``ms`` (a message of
        ``get_many`` still part of its batch) a delivery of its own, out
        like one from ``get`` (the very object), so that every path that
        settles one message works on it.  A view whose delivery was settled
        already is left as it is: then it is not out, as it should."""
        for m in ms:
            at = self._in_batch(m)
            if type(m) is Message:
                m._b = None
            if at is not None:
                self.ledger.detach(at[0], [at[1]], partial(_same, m))

    def attach_locked(self, ms: Iterable[Any]) -> None:
        """``attach`` under the lock (a settlement of single messages)."""
        with self.lock:
            self.attach(ms)

    def holds(self, m: Any) -> bool:
        """Whether ``m`` is out with this process (a view or not)."""
        with self.lock:
            return self.ledger.out.get(getattr(m, "offset", -1)) is m or self._in_batch(m) is not None

    def one_from_buffer(self) -> Message | None:
        """get()'s fast path: the next buffered message if its lease has
        time left (counted as handed out, and the call toward the prefetch
        rate), else None (and nothing changed: ``from_buffer`` deals with
        it)."""
        with self.lock:
            buf = self.buffer
            if buf:
                m = buf[0]
                lease = m._l
                if lease.deadline > time.monotonic_ns():
                    buf.popleft()
                    self._gets += 1
                    self.delivered += 1
                    self.redelivered += lease.attempt > 1
                    return m
        return None

    # -- settling -----------------------------------------------------------------

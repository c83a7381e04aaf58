"""The Consumer API of consumer groups: get, get_many, iteration, ack,
nack, extend, give_back, commit, dead letters; and ``reset_group``.  The
group state it drives (claiming, the ledger, commits) is ``_group``; where
each piece of state lives, and the delivery guarantee, are described
there.

Delivery guarantee: at least once.  A message acked and committed is never
delivered to that group again; one delivered and not committed is
delivered again after a crash.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from logq._batch import Batch
from logq._errors import Empty, NotDeliveredError, OffsetError, QueueClosedError
from logq._group import DeadLetter, GroupOptions, _check_name, _Group
from logq._handout import Message
from logq._index import _prefixed, open_scratch
from logq._options import _check_number
from logq._queue import Queue
from logq._settled import _DEAD, _be

__all__ = ["Batch", "Consumer", "DeadLetter", "GroupOptions", "Message", "reset_group"]

log = logging.getLogger("logq")

_IDLE_LOOK = 0.5        # a waiting get looks for reaped leases and other processes' nacks this often (s)


class Consumer:
    """A consumer in a group: ``get``/``get_many``/iteration, ``ack``,
    ``nack``, ``extend``, ``commit``.  Thread-safe; consumers of one group
    (threads, or processes with the queue open) compete for its messages,
    each message leased to one at a time.  Create with ``Queue.consumer``.

    Closed: after ``close()``, or once its Queue is closed, every method
    raises QueueClosedError (as a closed file raises ValueError), whatever
    its arguments, except ``close()`` (and ``__exit__``), which do nothing
    the second time.  Its attributes (``queue``, ``group``, ``options``)
    stay readable."""

    def __init__(self, q: Queue, group: str, **options: Any) -> None:
        self.queue = q
        self.group = group
        self.options = GroupOptions(**options)
        g = q._groups.get(group)
        if g is None or g.closed:
            g = q._groups[group] = _Group(q, group, self.options)
            q._close_hooks.append(g.close)
        elif g.opts != self.options:
            # One group state per Queue object: its consumers share it.
            raise ValueError(f"group {group!r} is already open on this queue object with other "
                             f"options ({g.opts}); open it with the same options, or use "
                             "another Queue object")
        g.users += 1
        self._g = g
        self._closed = False

    def _check_open(self) -> None:
        """Raise QueueClosedError if this consumer, its group state or its
        queue is closed (the one rule for every method but close)."""
        if self._closed or self._g.closed:
            raise QueueClosedError(f"consumer of group {self.group!r} is closed")
        self.queue._open_log()      # raises if the queue was closed (or this process forked)

    # -- delivery -------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> Message:
        """The next message, leased for ``visibility_timeout``.  Blocks up to
        ``timeout`` seconds (None: until one comes); raises logq.Empty then."""
        if not self._closed:
            m = self._g.one_from_buffer()     # the fast path: claimed already
            if m is not None:
                return m
        msgs = self._get(timeout)
        if not msgs:
            raise Empty(f"no message for group {self.group!r} within {timeout}s")
        return msgs[0]

    def get_many(self, max_messages: int, timeout: float | None = 0.0) -> list[Message]:
        """Up to ``max_messages`` messages (at least one unless ``timeout``
        seconds pass first: then []).  ``timeout=None`` waits for one."""
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be a positive int, not {max_messages!r}")
        self._check_open()
        out = self._g.from_buffer(max_messages, False)     # what get() prefetched comes first
        if out:
            return out
        # One batch, its messages views of it (no ledger entry each;
        # ack_many of them all acks the batch's runs).
        b = self._take(max_messages, timeout, True)
        return self._g.views(b) if len(b) else []

    def take(self, max_messages: int, timeout: float | None = 0.0) -> Batch:
        """Up to ``max_messages`` messages as one Batch: parallel arrays
        (offsets, payloads, attempts, timestamps, keys, priorities), no
        object per message.  At least one unless ``timeout`` seconds pass
        first (then an empty batch); ``timeout=None`` waits for one.  The
        same delivery, leases and order as ``get_many``: settle it with
        ``ack(batch)``, ``ack(batch, [i, ...])``, ``nack(batch, [i, ...])``,
        ``give_back(batch, [i, ...])`` or ``batch.ack(i)``.  (Messages
        ``get`` prefetched stay with ``get``.)"""
        self._check_open()      # (the rule comes before argument checks)
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ValueError(f"max_messages must be a positive int, not {max_messages!r}")
        return self._take(max_messages, timeout, True)

    def _take(self, n: int, timeout: float | None, payloads: bool) -> Batch:
        g = self._g
        self._check_open()
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            tail = self.queue.next_offset
            b = g.take(n, payloads)
            if b is not None:
                b._consumer = self
                return b
            if not self._wait(tail, limit):
                return Batch([])

    def _wait(self, tail: int, limit: float | None) -> bool:
        """Nothing was deliverable: sleep until a put past ``tail``, a due
        time, or a look around; False once ``limit`` passed."""
        now = time.monotonic()
        if limit is not None and now >= limit:
            return False
        sleep = _IDLE_LOOK
        due = self._g.next_due()
        if due is not None:
            sleep = min(sleep, max(0.0, (due - time.time_ns()) / 1e9))
        if limit is not None:
            sleep = min(sleep, limit - now)
        self.queue.wait(tail, sleep)
        return True

    def __iter__(self) -> Iterator[Message]:
        """Messages as ``get()`` returns them, forever (until the consumer
        closes: QueueClosedError, at once if it is closed already)."""
        self._check_open()
        return self._iterate()

    def _iterate(self) -> Iterator[Message]:
        while True:
            yield self.get()

    def _get(self, timeout: float | None) -> list[Message]:
        """get()'s slow path: a message from the buffer, else a claim of as
        many as the prefetch rate says (the rest buffered), or [] once
        ``timeout`` passed."""
        g = self._g
        self._check_open()
        limit = None if timeout is None else time.monotonic() + timeout
        while True:
            out = g.from_buffer(1, True)
            if out:
                return out
            tail = self.queue.next_offset
            now = time.monotonic()
            span = max(now - g._last_claim, 1e-6)
            g.rate = 0.7 * g.rate + 0.3 * (g._gets / span)
            g._gets, g._last_claim = 0, now
            want = max(1, min(self.options.prefetch, int(g.rate * self.options.visibility_timeout / 8)))
            got = g.claim(want)
            if got:
                with g.lock:
                    g.buffer.extend(got[1:])
                    g.handed(got[:1])
                return got[:1]
            # Nothing: sleep until a put, a due time, or a look around.
            if not self._wait(tail, limit):
                return []

    # -- settling -------------------------------------------------------------------
    def _own(self, m: Any) -> Message:
        self._check_open()
        if m is None:
            raise NotDeliveredError("ack/nack/extend of None: pass the Message that get() returned")
        if not isinstance(m, Message):
            raise NotDeliveredError(f"ack/nack/extend needs a logq Message, not {type(m).__name__}")
        if m._group is not self._g:
            raise NotDeliveredError(f"message {m.offset} was not delivered to this consumer's group "
                                    f"{self.group!r} on this queue")
        return m

    def ack(self, m: Message | Batch, indices: list[int] | None = None, *,
            write: Any = None) -> None:
        """Settle ``m``: never delivered to this group again once committed.
        ``m`` is a Message, or a Batch: then the deliveries at ``indices``
        (None: every one of it still out), all or (NotDeliveredError if
        one is not out) none.

        ``write``: a callable run as ``write(txn)`` inside the index
        transaction that makes this ack durable (the commit's ack
        transaction): what it writes is durable exactly when the ack is,
        never one without the other.  It may run more than once (LMDB
        retries a transaction when the map grows), so it must only write
        through ``txn``."""
        g = self._g
        led = g.ledger
        if type(m) is Batch:
            self._check_open()
            with g.lock:
                led.ack_batch(m, indices)
                if write is not None:
                    g.ack_writes.append(write)
                full = led.pending() >= self.options.commit_every
            if full:
                g.commit()
            return
        with g.lock:
            if type(m) is not Message or led.out.get(m.offset) is not m or self._closed or g.closed \
                    or indices is not None:
                self._own(m)            # the precise error
                if indices is not None:
                    raise TypeError("indices go with a Batch, not a Message")
                g.attach((m,))          # (a view of a get_many batch: out on its own now)
                led.ack(m)  # type: ignore[arg-type]  # (raises if it is not out)
            else:
                del led.out[m.offset]   # (Ledger.ack, inlined: found out just above)
                led.acks.append(m)
            if write is not None:
                g.ack_writes.append(write)
            full = len(led.acks) + len(led.nacks) + led.in_runs >= self.options.commit_every
        if full:
            g.commit()

    def ack_many(self, ms: list[Message], *, write: Any = None) -> None:
        """Ack every message in ``ms`` (all or, on an error, none);
        ``write`` as for ``ack``, once for them all."""
        self._check_open()
        ms = list(ms)
        g = self._g
        with g.lock:
            try:
                if not g.ack_whole(ms):     # (the usual: all of one get_many, as runs)
                    g.attach(ms)
                    g.ledger.ack_many(ms)   # the ledger holds the very objects it delivered
            except NotDeliveredError:
                for m in ms:
                    self._own(m)        # a clearer error for a foreign object
                raise
            if write is not None:
                g.ack_writes.append(write)
            full = g.ledger.pending() >= self.options.commit_every
        if full:
            g.commit()

    def nack(self, m: Message | Batch, delay: float | None = None, error: str | None = None, *,
             indices: list[int] | None = None, write: Any = None, bury: bool = False) -> None:
        """Delivery of ``m`` failed: redeliver it ``delay`` seconds from now
        (the time of this call), or after exponential backoff with full
        jitter when None; after ``max_attempts`` deliveries it goes to the
        dead letters with ``error`` (text) as the reason.

        Takes effect at once, for every consumer of the group in this and
        other processes (it is posted in the lease table; no fsync here):
        the message is due again at that time, whenever the group next
        commits.  The nack becomes durable at the next commit, like an ack;
        if this process dies before then, the message is delivered again
        at once, this delivery counted as an attempt.  A dead letter is
        written at the next commit.

        ``m`` may be a Batch: then the deliveries at ``indices`` (None:
        every one of it still out), each as above.

        ``write``: a callable run as ``write(txn)`` inside the index
        transaction that makes this nack durable (its schedule entry or
        dead letter), under the same rules as ``ack``'s.

        ``bury``: to the dead letters now, however many attempts are left
        (a layer above decided it is out of retries: the tasks layer)."""
        if type(m) is Batch:
            self._check_open()
            ms = self._g.detach(m, indices)
        else:
            ms = [self._own(m)]
            if indices is not None:
                raise TypeError("indices go with a Batch, not a Message")
            self._g.attach_locked(ms)
        if delay is not None:
            _check_number("delay", delay)
        if error is not None and not isinstance(error, str):
            error = repr(error)
        for i, one in enumerate(ms):
            self._g.nack(one, delay, error, write if i == 0 else None, bury)

    def give_back(self, ms: list[Message] | Batch, indices: list[int] | None = None) -> None:
        """Return messages unprocessed (say, on shutdown): delivered again
        at once, to any consumer of the group, without counting an attempt.
        ``ms`` may be a Batch: then its deliveries at ``indices`` (None:
        every one still out)."""
        self._check_open()
        if type(ms) is Batch:
            ms = self._g.detach(ms, indices)
            self._g.give_back(ms)
            return
        ms = list(ms)  # type: ignore[arg-type]
        for m in ms:
            self._own(m)
        self._g.attach_locked(ms)
        self._g.give_back(ms)

    def extend(self, m: Message | Batch, seconds: float) -> None:
        """Keep ``m`` leased for at least ``seconds`` from now (never
        shorter than it is), at once for every process.  Raises
        NotDeliveredError if its lease already ran out and was given back
        to the group (it may be out with another consumer; an ack is still
        accepted).  ``m`` may be a Batch: every delivery of it still out
        (each then holds a lease of its own)."""
        if type(m) is Batch:
            self._check_open()
            for one in self._g.detach(m, None):
                self._g.extend(one, seconds)
            return
        self._own(m)
        self._g.attach_locked((m,))
        self._g.extend(m, seconds)  # type: ignore[arg-type]

    def commit(self) -> None:
        """Return once every ack and nack made so far (by any consumer of
        this group on this queue object) is durable."""
        self._check_open()
        self._g.commit()

    # -- dead letters -----------------------------------------------------------------
    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The group's dead letters, oldest offset first."""
        self._check_open()
        g = self._g

        def fn(txn: Any) -> list[DeadLetter]:
            out = []
            for k, v in _prefixed(txn.cursor(db=g.idx.dead), g.prefix):
                attempts, dead_at, ts, elen = _DEAD.unpack_from(v)
                body = v[_DEAD.size:]
                out.append(DeadLetter(int.from_bytes(k[-8:], "big"), bytes(body[elen:]), ts / 1e9,
                                      attempts, bytes(body[:elen]).decode(errors="replace"), dead_at / 1e9))
                if limit is not None and len(out) >= limit:
                    break
            return out
        return g.idx.read(fn)

    def replay(self, offsets: list[int] | None = None) -> list[int]:
        """Put dead letters (all, or those at ``offsets``) back into the queue
        as new messages, with their priority, and remove them from the dead
        letters; their new offsets.  Every group sees the new messages."""
        return self._take_dead(offsets, replay=True)

    def purge(self, offsets: list[int] | None = None) -> int:
        """Delete dead letters (all, or those at ``offsets``); how many."""
        return len(self._take_dead(offsets, replay=False))

    def _take_dead(self, offsets: list[int] | None, replay: bool) -> list[int]:
        self._check_open()
        g = self._g
        letters = self.dead_letters()
        if offsets is not None:
            want = set(offsets)
            letters = [d for d in letters if d.offset in want]
        new: list[int] = []
        for d in letters:
            if replay:
                new.append(self.queue.put(d.data))
            g.idx.write(lambda txn, d=d: txn.delete(g.prefix + _be(d.offset), db=g.idx.dead))  # type: ignore[misc]
        return new if replay else [d.offset for d in letters]

    def stats(self) -> dict[str, Any]:
        """This group's entry of ``Queue.stats()["groups"]``."""
        self._check_open()
        return self.queue.stats()["groups"].get(self.group, {})

    def close(self) -> None:
        """Commit, and give back the messages this consumer's process holds
        for the group once its last consumer on this queue closes (its
        owner file in ``owners/`` goes with the last group of this process
        on the directory).  A second call, or one after the queue closed,
        does nothing."""
        if self._closed:
            return
        self._closed = True
        g = self._g
        g.users -= 1
        if g.users <= 0:
            g.close()
            if self.queue._groups.get(self.group) is g:
                del self.queue._groups[self.group]
            try:
                self.queue._close_hooks.remove(g.close)
            except ValueError:
                pass
        else:
            g.commit()

    def __enter__(self) -> "Consumer":
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def reset_group(queue: Queue, group: str, to: int | str) -> int:
    """Move an existing group to offset ``to`` (an int, ``"earliest"`` or
    ``"latest"``): messages from there on are delivered again, those below
    count as settled.  Its counters and dead letters stay.  The queue must
    be opened with ``exclusive=True`` (no other process may be consuming)
    and no consumer of the group be open in this process.  The offset."""
    name = _check_name(group).decode()
    if not queue.options.exclusive:
        raise ValueError("reset_group needs the queue to itself: open it with exclusive=True")
    if name in queue._groups:
        raise ValueError(f"group {name!r} has an open consumer in this process; close it first")
    first, nxt = queue.first_offset, queue.next_offset
    if to == "earliest":
        to = first
    elif to == "latest":
        to = nxt
    elif isinstance(to, bool) or not isinstance(to, int):
        raise TypeError(f"to must be an offset, 'earliest' or 'latest', not {to!r}")
    if not first <= to <= nxt:
        raise OffsetError(f"offset {to} is outside the queue's [{first}, {nxt}]")
    if not queue._index.reset_group(name, to):
        raise ValueError(f"no consumer group {name!r} in {queue.path}")
    scratch = open_scratch(queue.path, may_reset=True)
    try:
        scratch.forget_group(name)
    finally:
        scratch.close()
    log.warning("queue %s: group %r reset to offset %d", queue.path, name, to)
    return to


Queue._consumer_class = Consumer

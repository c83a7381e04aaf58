"""The producer half of a Queue: put, put_many and the append path (the
append lock, room in the active segment, deduplication by key)."""

from __future__ import annotations

import time
from array import array
from typing import Any, Callable, Iterable

from logq import _codec as C
from logq import _format as F
from logq._errors import MessageTooLargeError, QueueFullError
from logq._index import K_PRIORITIES
from logq._log import Log
from logq._options import MAX_KEY_BYTES, MAX_PRIORITY, _check_int, _check_number
from logq._commit import _CONTENDED
from logq._upkeep import Upkeep, _NoRoom

_ROOM_POLL = 0.02             # a put blocked at max_bytes looks for room this often (s)
_HDR = F.RECORD_HEADER_SIZE
_put = C.put


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"a message must be bytes, bytearray or memoryview, not {type(data).__name__}")


def _as_item(x: Any, i: int) -> bytes:
    try:
        return _as_bytes(x)
    except TypeError:
        raise TypeError(f"item {i} of put_many is a {type(x).__name__}, not bytes, bytearray or "
                        "memoryview; nothing was stored") from None


class Producer(Upkeep):
    """The Queue's producing methods (a base class of Queue)."""

    _writer: Any
    _max: int
    _priorities_marked: bool

    @property
    def next_offset(self) -> int:
        with self._lock:
            return self._open_log().tail()

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
                            if not (self._always and lg.contended(_CONTENDED)):
                                # The housekeeper hands the lock back when idle.
                                # (Not needed where the sync after this put
                                # hands it over: waking it costs the GIL.)
                                self._kick.set()
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

"""A batch of deliveries (``Consumer.take``) held as parallel arrays: no
object per message.

A batch is what one claim leased, in delivery order: runs of consecutive
offsets, each run sharing one lease (a fresh run of the log), or a single
offset with its own (a retry or delayed message from the schedule, a
message with a key or a priority).  The arrays are built on first use
from those runs.  Settling a batch (``Consumer.ack``/``nack``/
``give_back`` with the batch and, optionally, indices into it) records
whole runs at once where it can: an ack of a fresh run is one interval in
the commit, whatever its length.
"""

from __future__ import annotations

from array import array
from itertools import repeat
from typing import Any, Iterator

from logq._leases import BatchOut


class Batch(BatchOut):
    """Messages delivered together by ``Consumer.take``, as parallel
    sequences indexed ``0..len(batch)-1``:

    * ``offsets`` (``array('q')``), ``attempts`` (``array('I')``, 1 on the
      first delivery), ``timestamps`` (``array('q')``, when put, ns),
      ``priorities`` (``array('B')``), ``keys`` (a list; None where a
      message has no key);
    * ``payloads``: a list of ``bytes``, copied out of the log's mapping
      when the batch was taken.  They are ordinary immutable bytes: they
      stay valid, unchanged, after the batch is settled (and after the
      queue closes).  (Views into the mapping are not handed out: a
      segment's mapping may be remapped or closed while the caller still
      holds one.)
    * ``runs``: ``(first offset, count)`` of the consecutive runs it holds.

    Every message of the batch is leased until acked or nacked, like a
    message from ``get``; settle it through the consumer that took it
    (``consumer.ack(batch)``, ``consumer.ack(batch, [i, ...])``,
    ``batch.ack(i)``, ``consumer.nack(batch, indices=[i])``).  A batch taken
    by a pool's parent holds no payloads (``payloads`` is None): its
    workers read them from the log."""

    __slots__ = ("_payloads", "_ts", "_consumer", "_views", "_index", "__weakref__")

    def __init__(self, chunks: list[Any]) -> None:
        super().__init__([(c[0], len(c[2]), c[3]) for c in chunks])
        if len(chunks) == 1:
            self._payloads, self._ts = chunks[0][1], chunks[0][2]
        else:
            self._payloads, self._ts = [], []
            for c in chunks:
                self._payloads += c[1]
                self._ts += c[2]
        if self._payloads and self._payloads[0] is None:
            self._payloads = None
        self._consumer: Any = None
        self._views: Any = None             # get_many: the Messages that are views of it
        self._index: dict[int, int] | None = None

    # -- the arrays ---------------------------------------------------------------
    @property
    def payloads(self) -> list[bytes] | None:
        return self._payloads

    @property
    def offsets(self) -> array[int]:
        out = array("q")
        for start, count, _lease in self.chunks:
            out.extend(range(start, start + count))
        return out

    @property
    def timestamps(self) -> array[int]:
        return array("q", self._ts)

    @property
    def attempts(self) -> array[int]:
        out = array("I")
        for _start, count, lease in self.chunks:
            out.extend(repeat(lease.attempt, count))
        return out

    @property
    def priorities(self) -> array[int]:
        out = array("B")
        for _start, count, lease in self.chunks:
            out.extend(repeat(lease.priority, count))
        return out

    @property
    def keys(self) -> list[bytes | None]:
        out: list[bytes | None] = []
        for _start, count, lease in self.chunks:
            out += repeat(lease.key, count)
        return out

    @property
    def runs(self) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for start, count, _lease in self.chunks:
            if out and out[-1][0] + out[-1][1] == start:
                out[-1][1] += count
            else:
                out.append([start, count])
        return [(a, n) for a, n in out]

    def plain(self) -> bool:
        """Every message on its first attempt, without key or priority."""
        return all(le.attempt == 1 and le.key is None and not le.priority for _s, _c, le in self.chunks)

    def __iter__(self) -> Iterator[int]:
        return iter(self.offsets)

    def __repr__(self) -> str:
        return f"<logq.Batch of {len(self)} ({self.left} open)>"

    # -- settling through the consumer that took it ------------------------------------
    def ack(self, i: int | list[int] | None = None) -> None:
        """Ack delivery ``i`` (an index, a list of them, or None: all still
        out) through the consumer that took the batch."""
        self._consumer.ack(self, None if i is None else [i] if isinstance(i, int) else i)

    def nack(self, i: int | list[int] | None = None, delay: float | None = None,
             error: str | None = None) -> None:
        """Nack delivery ``i`` (an index, a list, or None: all still out)."""
        self._consumer.nack(self, delay, error,
                            indices=None if i is None else [i] if isinstance(i, int) else i)

    def index_of(self, offset: int) -> int | None:
        """The index of the delivery of ``offset`` in this batch, or None."""
        if len(self.chunks) == 1:
            start, count, _lease = self.chunks[0]
            return offset - start if start <= offset < start + count else None
        if self._index is None:
            self._index = {o: i for i, o in enumerate(self.offsets)}
        return self._index.get(offset)

    def payload(self, i: int) -> bytes | None:
        return self._payloads[i] if self._payloads is not None else None

    def timestamp_ns(self, i: int) -> int:
        return self._ts[i]

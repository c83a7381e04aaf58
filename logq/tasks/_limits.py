"""Flow control for tasks: rate limits, concurrency limits, per-key
serialization, and the choice of which waiting tasks may start now.
Pure: no I/O, no clock, no randomness; every time is an argument (seconds,
on whatever clock the caller uses, consistently).

The pieces, each usable alone:

* :func:`parse_rate` -- ``"100/s"``, ``"10/m"``, ``"5/h"``, ``"2/d"`` to a
  :class:`Rate`.
* :class:`TokenBucket` -- a rate limit whose whole state is two numbers
  (``tokens``, ``updated``), so the caller can keep it anywhere (memory,
  the index, shared memory) and rebuild it with :meth:`TokenBucket.from_state`.
  ``take(now)`` returns 0 and spends a token, or returns how many seconds
  until one is there and spends nothing.  Over any window of ``T`` seconds
  at most ``burst + rate * T`` tokens are taken.
* :func:`concurrency_allows` -- a counter against a limit.
* :func:`serialize` -- ``serialize_by``: tasks sharing a key run one at a
  time, in queue order; a key busy or waiting never holds back another key.
* :func:`pick_next` -- all of them together over a list of candidates: which
  start now, which wait and why (and until when, for a rate), such that a
  task name or key at its limit never blocks the candidates behind it.
  :func:`finished` gives back what a task held when it ends.

Times may go backwards (another process's clock, a clock set back): a
bucket then does not refill until time passes its last update.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Hashable, Iterable, Mapping, Sequence

#: Tokens short of a whole one that still count as one: the float error of
#: refilling at ``updated + wait`` exactly (a wait returned by ``take``).
EPSILON = 1e-9

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` tasks per ``per`` seconds, as written in ``text``."""
    count: float
    per: float
    text: str = ""

    @property
    def per_second(self) -> float:
        return self.count / self.per


def parse_rate(text: str | Rate) -> Rate:
    """``"N/s"``, ``"N/m"``, ``"N/h"`` or ``"N/d"`` (also ``sec``, ``min``,
    ``hour``, ``day``; N a positive number, ``"0.5/s"`` allowed) as a
    :class:`Rate`.  Anything else is a ``ValueError`` saying what is accepted."""
    if isinstance(text, Rate):
        return text
    if not isinstance(text, str):
        raise TypeError(f"a rate is a string such as '100/s', not {type(text).__name__}")
    m = _RATE.match(text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"rate {text!r}: expected N/s, N/m, N/h or N/d (e.g. '100/s', '10/m')")
    count = float(m.group(1))
    if not count > 0 or not math.isfinite(count):
        raise ValueError(f"rate {text!r}: the count must be a positive number")
    return Rate(count, _UNITS[m.group(2)], text)


@dataclass
class TokenBucket:
    """A token bucket: ``rate`` tokens per second flow in, up to ``burst``
    held.  Its state is ``(tokens, updated)``: the tokens held at time
    ``updated``.  A new bucket is full (``tokens = burst``).

    Promise: if every take goes through one bucket (its state carried from
    call to call), then over any window ``[t, t + T]`` at most
    ``burst + rate * T`` tokens are taken (a hair more, for float error:
    :data:`EPSILON` plus ``rate`` times four units in the last place of the
    time, per take).  Taking again at ``now + wait`` (the wait ``take``
    returned) succeeds if nothing was taken meanwhile."""
    rate: float
    burst: float = 1.0
    tokens: float = math.nan
    updated: float = -math.inf

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"a bucket's rate is a positive number of tokens per second, not {self.rate!r}")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ValueError(f"a bucket's burst is at least 1 token, not {self.burst!r}")
        if math.isnan(self.tokens):
            self.tokens = self.burst

    @classmethod
    def for_rate(cls, rate: Rate | str, burst: float = 1.0) -> "TokenBucket":
        """A full bucket for a rate such as ``"100/s"``."""
        return cls(parse_rate(rate).per_second, burst)

    @classmethod
    def from_state(cls, rate: float, burst: float, state: tuple[float, float]) -> "TokenBucket":
        tokens, updated = state
        return cls(rate, burst, min(float(tokens), burst), float(updated))

    @property
    def state(self) -> tuple[float, float]:
        """``(tokens, updated)``: plain numbers to store; see :meth:`from_state`."""
        return (self.tokens, self.updated)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            if math.isfinite(self.updated):
                self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            else:
                self.tokens = self.burst
            self.updated = now

    def wait(self, now: float, n: float = 1.0) -> float:
        """Seconds from ``now`` until ``n`` tokens are there (0.0: now).
        Changes nothing."""
        probe = replace(self)
        return probe._check(now, n)

    def _check(self, now: float, n: float) -> float:
        if n > self.burst:
            raise ValueError(f"{n} tokens can never be taken at once from a bucket of burst {self.burst}")
        self._refill(now)
        short = n - self.tokens
        # Refilling at `now + wait` rounds the sum to the float grid of the
        # clock (~2e-7 s near time.time()): tolerate that much, or a caller
        # that waits exactly as told would be told to wait again.
        grain = self.rate * 4 * math.ulp(max(abs(now), abs(self.updated), 1.0))
        if short <= EPSILON + grain:
            return 0.0
        # From `updated` (which is >= now), not from now: a clock that went back waits longer.
        return (self.updated - now) + short / self.rate

    def take(self, now: float, n: float = 1.0) -> float:
        """Spend ``n`` tokens at ``now`` and return 0.0 if they are there;
        otherwise spend nothing and return the seconds until they will be
        (taking again at ``now + wait`` succeeds, if nobody took meanwhile)."""
        w = self._check(now, n)
        if w == 0.0:
            self.tokens = max(0.0, self.tokens - n)
        return w


def concurrency_allows(running: int, limit: int | None) -> bool:
    """Whether one more may start when ``running`` are running under ``limit``
    (None: no limit)."""
    return limit is None or running < limit


def serialize(running_keys: Iterable[Hashable], keys: Sequence[Hashable | None]) -> list[bool]:
    """``serialize_by`` on its own: for candidates with these ``keys``, in
    queue order, whether each one's key lets it start now.  A candidate
    without a key (None) always may; one with a key may only when no task
    with that key is running and no earlier candidate has that key (so
    tasks sharing a key run one at a time, in queue order).  Other keys are
    never held back."""
    busy = set(running_keys)
    out = []
    for k in keys:
        if k is None:
            out.append(True)
        else:
            out.append(k not in busy)
            busy.add(k)
    return out


@dataclass(frozen=True)
class Limits:
    """The flow-control limits of one task name: at most ``concurrency``
    running at once (None: no limit), at most ``rate`` starts (a
    :class:`Rate` or a string for :func:`parse_rate`; None: no limit) with
    bursts of up to ``burst`` starts."""
    concurrency: int | None = None
    rate: Rate | str | None = None
    burst: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency is not None and (not isinstance(self.concurrency, int) or self.concurrency < 1):
            raise ValueError(f"concurrency must be a whole number >= 1 or None, not {self.concurrency!r}")
        if self.rate is not None:
            object.__setattr__(self, "rate", parse_rate(self.rate))
        if not self.burst >= 1:
            raise ValueError(f"burst must be >= 1, not {self.burst!r}")


@dataclass(frozen=True)
class Candidate:
    """A task that could start: its ``id``, task ``name``, ``serialize_by``
    ``key`` (None: none) and ``priority`` (higher first)."""
    id: Hashable
    name: str
    key: Hashable | None = None
    priority: int = 0


@dataclass
class LimitsState:
    """What the limits count, as plain data the caller may store:
    ``running`` tasks per name, the ``running_keys`` of running tasks, and
    each rate-limited name's bucket state ``(tokens, updated)`` (absent:
    a full bucket)."""
    running: dict[str, int] = field(default_factory=dict)
    running_keys: set[Hashable] = field(default_factory=set)
    buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def copy(self) -> "LimitsState":
        return LimitsState(dict(self.running), set(self.running_keys), dict(self.buckets))


#: Why a candidate waits.
KEY, CONCURRENCY, RATE, CAPACITY = "key", "concurrency", "rate", "capacity"
REASONS = (KEY, CONCURRENCY, RATE, CAPACITY)


@dataclass(frozen=True)
class Wait:
    """A candidate that may not start now, and why: ``"key"`` (its key is
    running, or an earlier candidate has it), ``"concurrency"`` (its name
    is at its limit), ``"rate"`` (no token yet: ``until`` is when the
    bucket will have one, if nothing else takes it), ``"capacity"`` (no
    free worker, or no room left for a counted one).  ``until`` is None for the reasons that wait for a task
    to finish."""
    candidate: Candidate
    reason: str
    until: float | None = None


@dataclass(frozen=True)
class Pick:
    """:func:`pick_next`'s decision: the candidates to ``start`` (in the
    order to start them), the ones that ``wait`` (in the order considered),
    the ``state`` once the started ones run, and ``wake_at``: the earliest
    ``until`` of a rate wait (None: nothing to wait for but a finish)."""
    start: tuple[Candidate, ...]
    wait: tuple[Wait, ...]
    state: LimitsState
    wake_at: float | None


def counted(c: Candidate, limits: Mapping[str, Limits]) -> bool:
    """Whether ``c`` is counted while it runs: it has a key, or its name a
    concurrency limit."""
    lim = limits.get(c.name)
    return c.key is not None or (lim is not None and lim.concurrency is not None)


def pick_next(candidates: Sequence[Candidate], limits: Mapping[str, Limits], state: LimitsState,
              now: float, *, capacity: int | None = None,
              counted_capacity: int | None = None) -> Pick:
    """Which of ``candidates`` (in queue order) start at ``now``.

    Candidates are considered by priority, higher first, and in queue order
    among equal priorities; ``serialize_by`` keys follow queue order
    whatever the priorities (only the earliest waiting candidate of a key
    is eligible).  A candidate starts when, in this order, its key is free
    (:func:`serialize`), its name is under its ``concurrency``, a worker is
    free (``capacity``: how many may start now; None: any number; and
    ``counted_capacity``: how many of those :func:`counted` while they run
    may start, so that a dispatcher can spread them over its workers) and its
    name's bucket gives it a token -- a token is only spent by a candidate
    that starts.  A candidate that cannot start is skipped, never blocking
    the ones after it.

    Promises: after the pick no name runs more than its ``concurrency``; no
    two running tasks share a key; within a key, tasks start in queue
    order; at most ``capacity`` start, of them at most ``counted_capacity``
    counted ones; every candidate that waits has a
    reason of its own (its key, its name's limit, or no capacity left).
    ``state`` is not changed: the new one is in the result.  Names absent
    from ``limits`` are unlimited."""
    if capacity is not None and capacity < 0:
        raise ValueError(f"capacity must be >= 0 or None, not {capacity}")
    if counted_capacity is not None and counted_capacity < 0:
        raise ValueError(f"counted_capacity must be >= 0 or None, not {counted_capacity}")
    n_counted = 0
    st = state.copy()
    eligible = serialize(state.running_keys, [c.key for c in candidates])
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i].priority)
    start: list[Candidate] = []
    waits: list[Wait] = []
    wake: float | None = None
    buckets: dict[str, TokenBucket] = {}
    for i in order:
        c = candidates[i]
        lim = limits.get(c.name)
        if not eligible[i] or (c.key is not None and c.key in st.running_keys):
            waits.append(Wait(c, KEY))
            continue
        if lim is not None and not concurrency_allows(st.running.get(c.name, 0), lim.concurrency):
            waits.append(Wait(c, CONCURRENCY))
            continue
        if capacity is not None and len(start) >= capacity:
            waits.append(Wait(c, CAPACITY))
            continue
        is_counted = counted_capacity is not None and counted(c, limits)
        if is_counted and n_counted >= counted_capacity:  # type: ignore[operator]
            waits.append(Wait(c, CAPACITY))
            continue
        if lim is not None and lim.rate is not None:
            b = buckets.get(c.name)
            if b is None:
                saved = st.buckets.get(c.name)
                b = (TokenBucket.from_state(lim.rate.per_second, lim.burst, saved) if saved is not None  # type: ignore[union-attr]  # (a Rate since __post_init__)
                     else TokenBucket(lim.rate.per_second, lim.burst))  # type: ignore[union-attr]
                buckets[c.name] = b
            w = b.take(now)
            if w > 0:
                waits.append(Wait(c, RATE, now + w))
                wake = now + w if wake is None else min(wake, now + w)
                continue
        start.append(c)
        n_counted += is_counted
        st.running[c.name] = st.running.get(c.name, 0) + 1
        if c.key is not None:
            st.running_keys.add(c.key)
    for name, b in buckets.items():
        st.buckets[name] = b.state
    return Pick(tuple(start), tuple(waits), st, wake)


def finished(state: LimitsState, candidate: Candidate) -> LimitsState:
    """The state once ``candidate`` (started by :func:`pick_next`) is no
    longer running, whatever its outcome.  ``state`` is not changed.  A
    candidate that is not counted as running is a ``ValueError`` (a
    finish reported twice would let the limits be exceeded)."""
    n = state.running.get(candidate.name, 0)
    if n < 1 or (candidate.key is not None and candidate.key not in state.running_keys):
        raise ValueError(f"task {candidate.id!r} ({candidate.name}) is not counted as running")
    st = state.copy()
    if n == 1:
        del st.running[candidate.name]
    else:
        st.running[candidate.name] = n - 1
    st.running_keys.discard(candidate.key)
    return st


__all__ = ["REASONS", "EPSILON", "Candidate", "Limits", "LimitsState", "Pick", "Rate",
           "TokenBucket", "Wait", "concurrency_allows", "counted", "finished", "parse_rate", "pick_next",
           "serialize"]

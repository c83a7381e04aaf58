"""Backoff with full jitter, and a circuit breaker.  Pure: no I/O, no
sleeping; callers pass the clock and the random source, so the rules are
tested exactly."""

from __future__ import annotations

import random
from collections import deque
from typing import Callable


def backoff_delay(attempt: int, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before delivery ``attempt + 1`` after ``attempt``
    failed deliveries: uniform in [0, min(cap, base * 2**(attempt-1))]
    ("full jitter": retries of many messages spread out instead of
    arriving together)."""
    if attempt < 1:
        raise ValueError(f"attempt counts deliveries and starts at 1, not {attempt}")
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 1000))
    return rand() * ceiling


class CircuitBreaker:
    """Stops work while failures are frequent.

    ``closed``: calls go through; when at least ``min_calls`` of the last
    ``window`` seconds' outcomes were recorded and the failure fraction
    reaches ``threshold``, it opens.  ``open``: nothing goes through for
    ``cooldown`` seconds, then it is ``half_open``: ``probes`` calls go
    through; if they all succeed it closes, if one fails it opens again.
    """

    def __init__(self, *, threshold: float = 0.5, window: float = 10.0, min_calls: int = 20,
                 cooldown: float = 5.0, probes: int = 3) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], not {threshold!r}")
        if window <= 0 or cooldown < 0 or min_calls < 1 or probes < 1:
            raise ValueError("window > 0, cooldown >= 0, min_calls >= 1 and probes >= 1 are required")
        self.threshold, self.window, self.min_calls = threshold, window, min_calls
        self.cooldown, self.probes = cooldown, probes
        self.state = "closed"
        self.opened = 0
        self._outcomes: deque[tuple[float, int, int]] = deque()   # (time, successes, failures)
        self._calls = 0
        self._failures = 0
        self._opened_at = 0.0
        self._probes_out = 0
        self._probes_ok = 0

    def current(self, now: float) -> str:
        """The state now: an open breaker whose cooldown is over is half-open."""
        if self.state == "open" and now - self._opened_at >= self.cooldown:
            self.state, self._probes_out, self._probes_ok = "half_open", 0, 0
        return self.state

    def allow(self, now: float) -> bool:
        """Whether a call may start now (in half-open: counts a probe)."""
        state = self.current(now)
        if state == "open":
            return False
        if state == "half_open":
            if self._probes_out >= self.probes:
                return False
            self._probes_out += 1
        return True

    def record(self, ok: bool, now: float) -> None:
        """The outcome of a call that ``allow`` let through."""
        self.record_many(int(ok), int(not ok), now)

    def record_many(self, successes: int, failures: int, now: float) -> None:
        """Outcomes of several calls, all at ``now``."""
        if self.state == "half_open":
            if failures:
                self._open(now)
                return
            self._probes_ok += successes
            if self._probes_ok >= self.probes:
                self.state = "closed"
                self._outcomes.clear()
                self._calls = self._failures = 0
            return
        if self.state == "open" or not successes + failures:
            return
        self._outcomes.append((now, successes, failures))
        self._calls += successes + failures
        self._failures += failures
        while self._outcomes and self._outcomes[0][0] < now - self.window:
            _t, s, f = self._outcomes.popleft()
            self._calls -= s + f
            self._failures -= f
        if self._calls >= self.min_calls and self._failures >= self.threshold * self._calls:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = "open"
        self.opened += 1
        self._opened_at = now
        self._outcomes.clear()
        self._calls = self._failures = 0

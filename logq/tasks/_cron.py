"""Periodic schedules: when the slots of a periodic task are, and which of
them are due.  Pure: no I/O and no clock; every time is an argument.

Two kinds of schedule, one interface (:class:`Schedule`):

* :class:`Cron` -- a standard 5-field cron expression, evaluated on the
  wall clock of a time zone (UTC unless an IANA zone is given)::

      minute  hour  day-of-month  month  day-of-week
      0-59    0-23  1-31          1-12   0-7 (0 and 7 are Sunday)

  Each field is ``*`` or a comma-separated list of items; an item is a
  value, a range ``a-b`` (``a <= b``), ``*``, each optionally followed by
  ``/step``.  Months and days of the week may be named by their first
  three letters in English, any case (``jan``, ``mon-fri``).  ``a/step``
  alone is refused (write ``a-59/step``: its meaning differs between
  crons).  ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``,
  ``@daily`` (``@midnight``) and ``@hourly`` stand for the usual
  expressions; ``@reboot`` is refused (it is not periodic).

  Day of month and day of week combine as in Vixie cron: when either field
  starts with ``*`` (``*`` itself or ``*/n``) a day must match both; when
  both are restricted, a day matching either one matches
  (``0 0 1,15 * mon`` fires on the 1st, the 15th and every Monday).

  An expression that can never fire (``0 0 30 2 *``) is refused when
  parsed.  Errors are ``ValueError`` naming the expression, the field and
  what is wrong with it.

* :class:`Every` -- every ``period`` (a ``timedelta``, at least one
  microsecond), at ``origin + k * period`` for every integer ``k``.  The
  origin defaults to the Unix epoch, so every process that builds the same
  schedule agrees on the slots without talking to the others.  It counts
  absolute time: time zones and DST do not affect it.

Time zones and DST (cron only).  A cron schedule in a zone fires at the
local wall-clock minutes it matches:

* a local time that does not exist (skipped when clocks go forward, e.g.
  02:30 on the last Sunday of March in Europe/Berlin) does **not** fire;
* a local time that happens twice (when clocks go back) fires **once**, at
  its first occurrence.

So ``@hourly`` in Europe/Berlin fires 23 times on the spring-forward day
and 24 on the fall-back day (the repeated hour fires once).  For a steady
interval in absolute time use :class:`Every` or a UTC cron.

Times.  Every method takes an aware ``datetime`` or a number of seconds
since the epoch (``time.time()``) and returns aware ``datetime`` objects in
UTC.  A naive ``datetime`` is refused (its meaning would depend on the
machine).  Cron slots fall on whole minutes.

Slots and keys.  :func:`slot_key` names a slot of a named schedule by its
UTC time; the scheduler submits the slot's task with that key as its
idempotency key, so a slot fires exactly once however many processes run
the scheduler, and across restarts.

Catch-up.  :meth:`Schedule.due_slots` says which slots to fire now, given
the last slot fired: see its docstring for ``catch_up="latest"|"all"|"none"``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Iterator, Union

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: How late the latest slot may be seen and still count as on time rather
#: than missed (see :meth:`Schedule.due_slots`).
DEFAULT_GRACE = timedelta(seconds=60)
#: Most slots that one call of ``due_slots(catch_up="all")`` returns by default.
DEFAULT_CATCH_UP_LIMIT = 100
CATCH_UP_MODES = ("latest", "all", "none")

Time = Union[datetime, float, int]

_MINUTE = timedelta(minutes=1)
_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_MONTHS = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_DAYS = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_NAMES = (None, None, None, _MONTHS, _DAYS)
_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DAYS_IN_MONTH_MAX = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def as_utc(t: Time) -> datetime:
    """``t`` (an aware datetime, or seconds since the epoch) as an aware UTC
    datetime.  A naive datetime is a ``ValueError``."""
    if isinstance(t, datetime):
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError(f"naive datetime {t.isoformat()}: give a time zone "
                             f"(e.g. datetime.now(timezone.utc)) or seconds since the epoch")
        return t.astimezone(UTC)
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return datetime.fromtimestamp(t, UTC)
    raise TypeError(f"a time is an aware datetime or seconds since the epoch, not {type(t).__name__}")


def slot_key(name: str, slot: Time) -> str:
    """The idempotency key of the slot at ``slot`` of the schedule named
    ``name``: ``"periodic:<name>@<UTC time>"``, e.g.
    ``periodic:report@2024-03-31T00:05:00Z`` (microseconds appear only when
    the slot has some).  The same (name, instant) gives the same key in
    every process and every version of this module; distinct instants give
    distinct keys.  The name must be a non-empty string without ``@``."""
    if not isinstance(name, str) or not name or "@" in name:
        raise ValueError(f"a schedule name is a non-empty string without '@', not {name!r}")
    t = as_utc(slot)
    stamp = t.strftime("%Y-%m-%dT%H:%M:%S")
    if t.microsecond:
        stamp += f".{t.microsecond:06d}"
    return f"periodic:{name}@{stamp}Z"


def parse_slot_key(key: str) -> tuple[str, datetime]:
    """The (name, UTC slot time) a :func:`slot_key` was made from."""
    prefix, sep, rest = key.partition(":")
    name, at, stamp = rest.rpartition("@")
    if prefix != "periodic" or not sep or not at or not name or not stamp.endswith("Z"):
        raise ValueError(f"not a slot key: {key!r}")
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in stamp else "%Y-%m-%dT%H:%M:%S"
    try:
        return name, datetime.strptime(stamp[:-1], fmt).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"not a slot key: {key!r}") from None


@dataclass(frozen=True)
class Due:
    """What :meth:`Schedule.due_slots` decided.

    ``fire``: the slots to fire now, oldest first (submit each with its
    :func:`slot_key`).  ``skipped_after`` / ``skipped_until``: when slots
    after ``last_fired`` were passed over, they are exactly the slots ``s``
    with ``skipped_after < s < skipped_until`` (both None when none were).
    ``next_slot``: the first slot after ``now``: when to look again."""
    fire: tuple[datetime, ...]
    next_slot: datetime
    skipped_after: datetime | None = None
    skipped_until: datetime | None = None


class Schedule:
    """The slots of a periodic task.  Subclasses define :meth:`next_slot` and
    :meth:`prev_slot`; everything else follows from them."""

    def next_slot(self, after: Time) -> datetime:
        """The first slot strictly after ``after``."""
        raise NotImplementedError

    def prev_slot(self, at: Time) -> datetime | None:
        """The last slot at or before ``at`` (None if there is none, which
        only happens near year 1)."""
        raise NotImplementedError

    def slots_between(self, start: Time, end: Time, *, limit: int | None = None) -> Iterator[datetime]:
        """The slots ``s`` with ``start < s <= end``, oldest first, at most
        ``limit`` of them (all when None).  Lazy: it is bounded by ``end``,
        and costs nothing for the slots not taken."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        end_t = as_utc(end)
        t = as_utc(start)
        count = 0
        while limit is None or count < limit:
            t = self.next_slot(t)
            if t > end_t:
                return
            yield t
            count += 1

    def due_slots(self, last_fired: Time | None, now: Time, *, catch_up: str = "latest",
                  limit: int = DEFAULT_CATCH_UP_LIMIT, grace: timedelta = DEFAULT_GRACE) -> Due:
        """Which slots to fire at ``now``, when ``last_fired`` is the last
        slot fired (None: the schedule never fired).

        The slots after ``last_fired`` up to ``now`` are the candidates.  The
        latest of them is *on time* when it is at most ``grace`` before
        ``now`` (the scheduler woke a little late); the others are *missed*
        (the scheduler was not running).  The on-time slot always fires.
        Of the missed ones:

        * ``"latest"`` (the default): only the most recent candidate fires
          (the on-time slot if there is one, else the most recent missed
          slot); older ones are skipped.
        * ``"all"``: every candidate fires, oldest first -- but at most
          ``limit`` of them (``limit >= 1``): past it the *oldest* are
          skipped and the most recent ``limit`` fire, so a long outage
          costs a bounded burst.
        * ``"none"``: no missed slot fires; only the on-time slot, if any.

        A schedule that never fired (``last_fired`` None) has missed
        nothing: only an on-time slot fires.  A ``last_fired`` after
        ``now`` (a clock set back) makes nothing due.  ``Due.skipped_*``
        delimit what was skipped; ``Due.next_slot`` says when to look again.
        """
        if catch_up not in CATCH_UP_MODES:
            raise ValueError(f"catch_up must be one of {', '.join(map(repr, CATCH_UP_MODES))}, "
                             f"not {catch_up!r}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        if grace < timedelta(0):
            raise ValueError(f"grace must be >= 0, not {grace}")
        now_t = as_utc(now)
        nxt = self.next_slot(now_t)
        latest = self.prev_slot(now_t)
        last = as_utc(last_fired) if last_fired is not None else None
        if latest is None or (last is not None and latest <= last):
            return Due((), nxt)
        on_time = now_t - latest <= grace
        if last is None:
            if on_time:
                return Due((latest,), nxt)
            return Due((), nxt)
        if catch_up == "all":
            fire = [latest]
            while len(fire) < limit:
                before = self.prev_slot(fire[-1] - timedelta(microseconds=1))
                if before is None or before <= last:
                    break
                fire.append(before)
            fire.reverse()
        elif catch_up == "latest" or on_time:
            fire = [latest]
        else:
            fire = []
        first_kept = fire[0] if fire else (now_t + timedelta(microseconds=1))
        skipped = self.next_slot(last) < first_kept
        if skipped:
            return Due(tuple(fire), nxt, last, first_kept)
        return Due(tuple(fire), nxt)


class Every(Schedule):
    """Slots at ``origin + k * period`` for every integer k (see the module
    docstring).  ``period`` is a positive ``timedelta``; ``origin`` an aware
    datetime or seconds since the epoch (default: the epoch)."""

    def __init__(self, period: timedelta, origin: Time = EPOCH) -> None:
        if not isinstance(period, timedelta):
            raise TypeError(f"every= takes a timedelta, not {type(period).__name__}")
        self.period_us = period // timedelta(microseconds=1)
        if self.period_us <= 0:
            raise ValueError(f"every= must be at least one microsecond, not {period}")
        self.period = period
        self.origin = as_utc(origin)

    def __repr__(self) -> str:
        return f"Every({self.period!r}, origin={self.origin.isoformat()})"

    def _k(self, t: datetime) -> tuple[int, int]:
        """(k, remainder in µs) with t = origin + k * period + remainder."""
        return divmod((t - self.origin) // timedelta(microseconds=1), self.period_us)

    def _slot(self, k: int) -> datetime:
        return self.origin + timedelta(microseconds=k * self.period_us)

    def next_slot(self, after: Time) -> datetime:
        k, _ = self._k(as_utc(after))
        return self._slot(k + 1)

    def prev_slot(self, at: Time) -> datetime | None:
        k, _ = self._k(as_utc(at))
        try:
            return self._slot(k)
        except OverflowError:
            return None


def _parse_value(text: str, index: int, expr: str) -> int:
    names = _NAMES[index]
    low = text.lower()
    if names is not None and low in names:
        return names[low]
    if not text.isdigit():
        what = f"a number or a name ({', '.join(names)})" if names else "a number"
        raise ValueError(_field_error(expr, index, text, f"{text!r} is not {what}"))
    value = int(text)
    lo, hi = _BOUNDS[index]
    if not lo <= value <= hi:
        raise ValueError(_field_error(expr, index, text, f"{value} is out of range {lo}-{hi}"))
    return value


def _field_error(expr: str, index: int, part: str, why: str) -> str:
    return f"cron {expr!r}: {_FIELDS[index]} field {part!r}: {why}"


def _parse_field(text: str, index: int, expr: str) -> tuple[frozenset[int], bool]:
    """The values a field matches, and whether it starts with ``*``."""
    lo, hi = _BOUNDS[index]
    if index == 4:
        hi = 6                      # '*' over days of the week: 7 is Sunday again
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(_field_error(expr, index, text, "empty list item"))
        rng, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(_field_error(expr, index, item,
                                              f"step {step_text!r} is not a whole number >= 1"))
            step = int(step_text)
        if rng == "*":
            first, last = lo, hi
        elif "-" in rng:
            a, _, b = rng.partition("-")
            first, last = _parse_value(a, index, expr), _parse_value(b, index, expr)
            if first > last:
                raise ValueError(_field_error(expr, index, item,
                                              f"range {rng!r} goes backwards ({first} > {last})"))
        else:
            first = last = _parse_value(rng, index, expr)
            if slash:
                raise ValueError(_field_error(expr, index, item,
                                              f"a step needs a range: write '{rng}-{_BOUNDS[index][1]}/{step}' "
                                              f"or '*/{step}'"))
        values.update(range(first, last + 1, step))
    if index == 4 and 7 in values:
        values.discard(7)
        values.add(0)
    return frozenset(values), text.startswith("*")


class Cron(Schedule):
    """A 5-field cron expression on the wall clock of ``tz`` (a ``tzinfo``,
    an IANA zone name such as ``"Europe/Berlin"``, or None for UTC).  See
    the module docstring for the syntax, the day rule and DST."""

    def __init__(self, expr: str, tz: tzinfo | str | None = None) -> None:
        if not isinstance(expr, str):
            raise TypeError(f"a cron expression is a string, not {type(expr).__name__}")
        self.expr = expr
        text = expr.strip()
        if text.startswith("@"):
            macro = _MACROS.get(text.lower())
            if macro is None:
                raise ValueError(f"cron {expr!r}: unknown macro; known: {', '.join(_MACROS)}"
                                 + (" (@reboot is not a periodic schedule)" if text.lower() == "@reboot" else ""))
            text = macro
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(f"cron {expr!r}: {len(parts)} fields, expected 5 "
                             f"({' '.join(_FIELDS)})")
        fields = [_parse_field(p, i, expr) for i, p in enumerate(parts)]
        (self.minutes, _), (self.hours, _), (self.days, dom_star), (self.months, _), \
            (self.weekdays, dow_star) = fields
        # Vixie cron: a '*'-led day field defers to the other (AND); two restricted ones OR
        self.days_or = not (dom_star or dow_star)
        self._minutes = sorted(self.minutes)
        self._hours = sorted(self.hours)
        self.tz = _zone(tz)
        if not self.days_or and not any(min(self.days) <= _DAYS_IN_MONTH_MAX[m] for m in self.months):
            raise ValueError(f"cron {expr!r}: never fires: no month among "
                             f"{sorted(self.months)} has a day {min(self.days)}")

    def __repr__(self) -> str:
        return f"Cron({self.expr!r}, tz={self.tz!s})"

    def _day_ok(self, d: datetime) -> bool:
        dom = d.day in self.days
        dow = (d.weekday() + 1) % 7 in self.weekdays      # Monday is 0 in Python, 1 in cron
        return (dom or dow) if self.days_or else (dom and dow)

    def _match_forward(self, t: datetime) -> datetime:
        """The first naive wall-clock minute at or after ``t`` (a naive
        whole minute) that the expression matches."""
        while True:
            if t.month not in self.months:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self._day_ok(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.hour not in self.hours:
                i = bisect.bisect_right(self._hours, t.hour)
                if i < len(self._hours):
                    t = t.replace(hour=self._hours[i], minute=0)
                else:
                    t = t.replace(hour=0, minute=0) + timedelta(days=1)
            elif t.minute not in self.minutes:
                i = bisect.bisect_right(self._minutes, t.minute)
                if i < len(self._minutes):
                    t = t.replace(minute=self._minutes[i])
                else:
                    t = t.replace(minute=0) + timedelta(hours=1)
            else:
                return t

    def _match_backward(self, t: datetime) -> datetime:
        """The last naive wall-clock minute at or before ``t`` (a naive
        whole minute) that the expression matches."""
        while True:
            if t.month not in self.months:
                t = t.replace(day=1, hour=0, minute=0) - _MINUTE
            elif not self._day_ok(t):
                t = t.replace(hour=0, minute=0) - _MINUTE
            elif t.hour not in self.hours:
                i = bisect.bisect_left(self._hours, t.hour)
                if i > 0:
                    t = t.replace(hour=self._hours[i - 1], minute=59)
                else:
                    t = t.replace(hour=0, minute=0) - _MINUTE
            elif t.minute not in self.minutes:
                i = bisect.bisect_left(self._minutes, t.minute)
                if i > 0:
                    t = t.replace(minute=self._minutes[i - 1])
                else:
                    t = t.replace(minute=0) - _MINUTE
            else:
                return t

    def _instant(self, wall: datetime) -> datetime | None:
        """The UTC instant of a naive local wall-clock time: its first
        occurrence, or None if the zone skips it."""
        if self.tz is UTC:
            return wall.replace(tzinfo=UTC)
        aware = wall.replace(tzinfo=self.tz, fold=0)
        utc = aware.astimezone(UTC)
        if utc.astimezone(self.tz).replace(tzinfo=None) != wall:
            return None                                   # in a gap: this local time does not exist
        return utc

    def _wall(self, t: datetime) -> datetime:
        return t.astimezone(self.tz).replace(tzinfo=None, fold=0)

    def next_slot(self, after: Time) -> datetime:
        after_t = as_utc(after)
        # The fold=0 instants of existing wall times rise with the wall time, so
        # no match before the wall minute of `after` can be after it.
        wall = self._wall(after_t).replace(second=0, microsecond=0)
        while True:
            wall = self._match_forward(wall)
            at = self._instant(wall)
            if at is not None and at > after_t:
                return at
            wall += _MINUTE

    def prev_slot(self, at: Time) -> datetime | None:
        at_t = as_utc(at)
        local = at_t.astimezone(self.tz)
        wall = local.replace(tzinfo=None, fold=0, second=0, microsecond=0)
        if local.fold:
            # `at` is in the second pass of a repeated hour: the first pass of
            # the local times after it (up to the repeat's end) came before it
            shift = local.replace(fold=0).utcoffset() - local.utcoffset()  # type: ignore[operator]  # (aware: never None)
            if shift > timedelta(0):
                wall += shift
        try:
            while True:
                wall = self._match_backward(wall)
                inst = self._instant(wall)
                if inst is not None and inst <= at_t:
                    return inst
                wall -= _MINUTE
        except OverflowError:
            return None


def _zone(tz: tzinfo | str | None) -> tzinfo:
    if tz is None:
        return UTC
    if isinstance(tz, str):
        if tz.upper() == "UTC":
            return UTC
        import zoneinfo
        try:
            return zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {tz!r} (an IANA name such as 'Europe/Berlin'; "
                             f"install the tzdata package if the system has no zone database)") from None
    if isinstance(tz, tzinfo):
        return tz
    raise TypeError(f"tz is an IANA zone name or a tzinfo, not {type(tz).__name__}")


def schedule(cron: str | None = None, *, every: timedelta | None = None, origin: Time = EPOCH,
             tz: tzinfo | str | None = None) -> Schedule:
    """The schedule of ``@app.periodic(cron)`` or ``@app.periodic(every=...)``:
    exactly one of them.  ``origin`` applies to ``every`` only, ``tz`` to
    ``cron`` only; giving either with the other kind is a ``ValueError``."""
    if (cron is None) == (every is None):
        raise ValueError("give a cron expression or every=timedelta(...), exactly one of them")
    if cron is not None:
        if origin is not EPOCH:
            raise ValueError("origin= applies to every= schedules, not to cron expressions")
        return Cron(cron, tz)
    if tz is not None:
        raise ValueError("tz= applies to cron expressions; every= counts absolute time")
    return Every(every, origin)  # type: ignore[arg-type]  # (not None: checked above)


__all__ = ["CATCH_UP_MODES", "DEFAULT_CATCH_UP_LIMIT", "DEFAULT_GRACE", "EPOCH", "UTC", "Cron",
           "Due", "Every", "Schedule", "as_utc", "parse_slot_key", "schedule", "slot_key"]

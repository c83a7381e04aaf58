"""logq.tasks._cron: periodic schedules (pure).

Cron expressions are checked against a brute-force reference that walks
every minute of a range and asks whether it matches, computed from the
*structure* hypothesis generated (not from the parser), in UTC and in real
zones around their DST transitions; then parse errors, ``every=``, slot
keys and the catch-up modes of ``due_slots``."""

from __future__ import annotations

import zoneinfo
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from logq.tasks import _cron as C

UTC = timezone.utc
BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


# -- a generated expression and the sets it means -----------------------------------
@st.composite
def field(draw, index: int) -> tuple[str, frozenset[int], bool]:
    """(text, values, starts with '*') for field ``index``."""
    lo, hi = BOUNDS[index]
    star_hi = 6 if index == 4 else hi

    def name(v: int) -> str:
        if index == 3 and draw(st.booleans()):
            return MONTHS[v - 1].upper() if draw(st.booleans()) else MONTHS[v - 1]
        if index == 4 and v < 7 and draw(st.booleans()):
            return DAYS[v].capitalize() if draw(st.booleans()) else DAYS[v]
        return str(v)

    kind = draw(st.sampled_from(["star", "starstep", "list", "list", "list"]))
    if kind == "star":
        return "*", frozenset(range(lo, star_hi + 1)), True
    if kind == "starstep":
        step = draw(st.integers(1, hi - lo + 2))
        return f"*/{step}", frozenset(range(lo, star_hi + 1, step)), True
    parts, values = [], set()
    for _ in range(draw(st.integers(1, 3))):
        a = draw(st.integers(lo, hi))
        shape = draw(st.sampled_from(["value", "range", "rangestep"]))
        if shape == "value":
            parts.append(name(a))
            values.add(a)
            continue
        b = draw(st.integers(a, hi))
        step = draw(st.integers(1, hi - lo + 1)) if shape == "rangestep" else 1
        parts.append(f"{name(a)}-{name(b)}" + (f"/{step}" if shape == "rangestep" else ""))
        values.update(range(a, b + 1, step))
    if index == 4 and 7 in values:
        values = (values - {7}) | {0}
    return ",".join(parts), frozenset(values), False


@st.composite
def cron_expr(draw, fixed_minute_hour: bool = False) -> tuple[str, tuple]:
    fields = [draw(field(i)) for i in range(5)]
    if fixed_minute_hour:
        fields[0] = ("0", frozenset({0}), False)
        fields[1] = ("0", frozenset({0}), False)
    dom_star, dow_star = fields[2][2], fields[4][2]
    expr = " ".join(f[0] for f in fields)
    meaning = tuple(f[1] for f in fields) + (not (dom_star or dow_star),)
    return expr, meaning


def matches(meaning: tuple, local: datetime) -> bool:
    minutes, hours, days, months, weekdays, days_or = meaning
    dom = local.day in days
    dow = local.isoweekday() % 7 in weekdays
    day = (dom or dow) if days_or else (dom and dow)
    return local.minute in minutes and local.hour in hours and local.month in months and day


def reference(meaning: tuple, tz, start: datetime, end: datetime) -> list[datetime]:
    """Every minute u with start < u <= end whose local time matches, the
    second pass of a repeated local time excluded (fold == 1), by brute force."""
    out = []
    u = start.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while u <= end:
        local = u.astimezone(tz)
        if local.fold == 0 and matches(meaning, local):
            out.append(u)
        u += timedelta(minutes=1)
    return out


def never_fires(meaning: tuple) -> bool:
    minutes, hours, days, months, weekdays, days_or = meaning
    return not days_or and not any(min(days) <= C._DAYS_IN_MONTH_MAX[m] for m in months)


def build(expr: str, meaning: tuple, tz=None) -> C.Cron:
    if never_fires(meaning):
        with pytest.raises(ValueError, match="never fires"):
            C.Cron(expr, tz)
        assume(False)
    return C.Cron(expr, tz)


def check_against_reference(sched: C.Cron, meaning: tuple, tz, start: datetime, end: datetime) -> None:
    want = reference(meaning, tz, start, end)
    got = list(sched.slots_between(start, end))
    assert got == want
    nxt = sched.next_slot(start)
    assert nxt == want[0] if want else nxt > end
    prev = sched.prev_slot(end)
    assert prev == want[-1] if want else (prev is None or prev <= start)
    if want:
        # each slot's neighbours, from just before and just after it
        for s in want[:5]:
            assert sched.next_slot(s - timedelta(microseconds=1)) == s
            assert sched.prev_slot(s) == s
            assert sched.prev_slot(s + timedelta(seconds=59)) == s
    assert list(sched.slots_between(start, end, limit=2)) == want[:2]


instants = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2090, 12, 31),
                        timezones=st.just(UTC))


@settings(max_examples=300, deadline=None)
@given(cron_expr(), instants, st.integers(0, 2 * 24 * 60))
@example(("*/5 * * * *", (frozenset(range(0, 60, 5)), frozenset(range(24)), frozenset(range(1, 32)),
                         frozenset(range(1, 13)), frozenset(range(7)), False)),
         datetime(2024, 2, 28, 23, 58, 30, tzinfo=UTC), 2000)
def test_cron_matches_brute_force_utc(ce, start, span_minutes):
    expr, meaning = ce
    sched = build(expr, meaning)
    check_against_reference(sched, meaning, UTC, start, start + timedelta(minutes=span_minutes))


def day_reference(meaning: tuple, start: datetime, days: int) -> list[datetime]:
    out = []
    d = start.replace(hour=0, minute=0, second=0, microsecond=0)
    for i in range(days + 1):
        t = d + timedelta(days=i)
        if start < t <= start + timedelta(days=days) and matches(meaning, t):
            out.append(t)
    return out


@settings(max_examples=200, deadline=None)
@given(cron_expr(fixed_minute_hour=True), instants, st.integers(0, 3 * 366))
def test_cron_days_and_months_over_years(ce, start, days):
    """The day-of-month / month / day-of-week rule over spans of years (at
    00:00 each day, so the reference walks days instead of minutes)."""
    expr, meaning = ce
    sched = build(expr, meaning)
    end = start + timedelta(days=days)
    want = day_reference(meaning, start, days)
    assert list(sched.slots_between(start, end)) == want
    assert sched.next_slot(start) == want[0] if want else sched.next_slot(start) > end


# Transitions of zones with different kinds of DST: an hour forward/back in
# spring/autumn (Berlin, New York), the southern hemisphere (Sydney), half an
# hour (Lord Howe), "negative DST" in the zone data (Dublin).
TRANSITIONS = {
    "Europe/Berlin": ["2024-03-31T01:00Z", "2024-10-27T01:00Z"],
    "America/New_York": ["2024-03-10T07:00Z", "2024-11-03T06:00Z"],
    "Australia/Sydney": ["2024-04-06T16:00Z", "2024-10-05T16:00Z"],
    "Australia/Lord_Howe": ["2024-04-06T15:00Z", "2024-10-05T15:30Z"],
    "Europe/Dublin": ["2024-03-31T01:00Z", "2024-10-27T01:00Z"],
}
ZONE_POINTS = [(z, datetime.fromisoformat(t.replace("Z", "+00:00")))
               for z, ts in TRANSITIONS.items() for t in ts]


@st.composite
def near_transition(draw):
    zone, at = draw(st.sampled_from(ZONE_POINTS))
    start = at + timedelta(seconds=draw(st.integers(-26 * 3600, 2 * 3600)))
    span = timedelta(minutes=draw(st.integers(0, 28 * 60)))
    return zone, start, start + span


@settings(max_examples=200, deadline=None)
@given(cron_expr(), near_transition())
def test_cron_in_zones_across_dst_matches_brute_force(ce, window):
    expr, meaning = ce
    zone, start, end = window
    tz = zoneinfo.ZoneInfo(zone)
    sched = build(expr, meaning, zone)
    check_against_reference(sched, meaning, tz, start, end)


# -- DST, stated cases -------------------------------------------------------------------
def utc(s: str) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=UTC)


def test_skipped_local_time_does_not_fire():
    s = C.Cron("30 2 * * *", "Europe/Berlin")      # 02:30 does not exist on 2024-03-31
    got = list(s.slots_between(utc("2024-03-29T12:00"), utc("2024-04-01T12:00")))
    assert got == [utc("2024-03-30T01:30"), utc("2024-04-01T00:30")]


def test_repeated_local_time_fires_once_at_first_occurrence():
    s = C.Cron("30 2 * * *", "Europe/Berlin")      # 02:30 happens twice on 2024-10-27
    got = list(s.slots_between(utc("2024-10-26T12:00"), utc("2024-10-28T12:00")))
    assert got == [utc("2024-10-27T00:30"), utc("2024-10-28T01:30")]
    # asked from inside the second pass: the first pass is behind, nothing in this hour
    assert s.next_slot(utc("2024-10-27T01:10")) == utc("2024-10-28T01:30")
    assert s.prev_slot(utc("2024-10-27T01:10")) == utc("2024-10-27T00:30")


def test_hourly_in_a_zone_counts_local_hours():
    s = C.Cron("@hourly", "Europe/Berlin")
    spring = list(s.slots_between(utc("2024-03-30T22:59"), utc("2024-03-31T21:59")))
    autumn = list(s.slots_between(utc("2024-10-26T21:59"), utc("2024-10-27T22:59")))
    assert len(spring) == 23 and len(autumn) == 24
    assert C.Cron("@hourly").next_slot(utc("2024-10-27T00:30")) == utc("2024-10-27T01:00")


def test_time_zone_arguments():
    assert C.Cron("* * * * *").tz is UTC
    assert C.Cron("* * * * *", "UTC").tz is UTC
    assert C.Cron("* * * * *", zoneinfo.ZoneInfo("Asia/Tokyo")).next_slot(0) == utc("1970-01-01T00:01")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        C.Cron("* * * * *", "Mars/Olympus")
    with pytest.raises(TypeError):
        C.Cron("* * * * *", 5)


# -- the day rule and named values ------------------------------------------------------
def test_vixie_day_rule():
    start, end = utc("2024-07-01T00:00") - timedelta(minutes=1), utc("2024-07-31T23:59")
    days = lambda e: [t.day for t in C.Cron(e).slots_between(start, end)]  # noqa: E731
    mondays = [1, 8, 15, 22, 29]
    assert days("0 0 1,15 * mon") == sorted({1, 15} | set(mondays))     # both restricted: OR
    assert days("0 0 * * mon") == mondays                               # '*' day of month: AND
    assert days("0 0 1,15 * *") == [1, 15]
    assert days("0 0 */14 * mon") == [1, 15, 29]                        # '*/n' counts as '*': AND
    assert days("0 0 1-7 * 7") == days("0 0 1-7 * 0") == days("0 0 1-7 * SUN")


def test_macros_and_names():
    pairs = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
             "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
             "@hourly": "0 * * * *", "0 9 * JAN-mar mon-FRI": "0 9 * 1-3 1-5"}
    t = utc("2023-05-17T10:11")
    for a, b in pairs.items():
        sa, sb = C.Cron(a), C.Cron(b)
        assert list(sa.slots_between(t, t + timedelta(days=400), limit=50)) == \
            list(sb.slots_between(t, t + timedelta(days=400), limit=50)), a


# -- parse errors name the field ----------------------------------------------------------
@pytest.mark.parametrize("expr, message", [
    ("* * * *", "4 fields, expected 5"),
    ("* * * * * *", "6 fields, expected 5"),
    ("", "0 fields"),
    ("60 * * * *", "minute field '60': 60 is out of range 0-59"),
    ("* 24 * * *", "hour field '24': 24 is out of range 0-23"),
    ("* * 0 * *", "day-of-month field '0': 0 is out of range 1-31"),
    ("* * 32 * *", "day-of-month field '32'"),
    ("* * * 13 *", "month field '13': 13 is out of range 1-12"),
    ("* * * 0 *", "month field '0'"),
    ("* * * * 8", "day-of-week field '8': 8 is out of range 0-7"),
    ("* * * foo *", "month field 'foo': 'foo' is not a number or a name"),
    ("* * * * sunday", "day-of-week field 'sunday'"),
    ("*/0 * * * *", "minute field '\\*/0': step '0'"),
    ("*/x * * * *", "step 'x'"),
    ("1-2/ * * * *", "step ''"),
    ("5/15 * * * *", "a step needs a range: write '5-59/15'"),
    ("10-5 * * * *", "range '10-5' goes backwards"),
    ("1,,2 * * * *", "minute field '1,,2': empty list item"),
    ("-1 * * * *", "minute field"),
    ("1- * * * *", "minute field"),
    ("* * * * mon-", "day-of-week field"),
    ("0 0 30 2 *", "never fires"),
    ("0 0 31 4,6,9,11 *", "never fires"),
    ("@reboot", "@reboot is not a periodic schedule"),
    ("@often", "unknown macro"),
])
def test_parse_errors(expr, message):
    with pytest.raises(ValueError, match=message):
        C.Cron(expr)


def test_rarely_but_possible():
    # a Feb 29 that is also a Sunday: 2032, then 2060
    s = C.Cron("0 0 29 feb */7")
    assert s.next_slot(utc("2024-03-01T00:00")) == utc("2032-02-29T00:00")
    assert s.prev_slot(utc("2059-01-01T00:00")) == utc("2032-02-29T00:00")
    with pytest.raises(TypeError):
        C.Cron(5)


# -- times ----------------------------------------------------------------------------------
def test_times_in_and_out():
    s = C.Cron("*/5 * * * *")
    assert s.next_slot(0) == s.next_slot(0.0) == s.next_slot(C.EPOCH) == utc("1970-01-01T00:05")
    assert s.next_slot(datetime(1970, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=1)))) \
        == utc("1970-01-01T00:05")
    with pytest.raises(ValueError, match="naive datetime"):
        s.next_slot(datetime(2024, 1, 1))
    with pytest.raises(TypeError):
        s.next_slot("2024-01-01")
    with pytest.raises(TypeError):
        s.next_slot(True)
    assert s.next_slot(300).tzinfo is UTC


# -- every= -----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10**12), st.integers(-10**15, 10**15), instants)
def test_every_is_anchored_at_its_origin(period_us, origin_us, t):
    period = timedelta(microseconds=period_us)
    origin = C.EPOCH + timedelta(microseconds=origin_us)
    s = C.Every(period, origin)
    nxt = s.next_slot(t)
    prev = s.prev_slot(t)
    assert prev <= t < nxt and nxt - prev == period
    assert (nxt - origin) % period == timedelta(0)
    assert s.next_slot(prev) == nxt and s.prev_slot(nxt - timedelta(microseconds=1)) == prev
    # another process building the same schedule agrees
    assert C.Every(period, origin.timestamp() if origin_us % 1_000_000 == 0 else origin).next_slot(t) == nxt


def test_every_examples_and_errors():
    s = C.Every(timedelta(minutes=15))
    assert s.next_slot(utc("2024-01-01T10:07")) == utc("2024-01-01T10:15")
    assert s.next_slot(utc("2024-01-01T10:15")) == utc("2024-01-01T10:30")
    assert s.prev_slot(utc("2024-01-01T10:15")) == utc("2024-01-01T10:15")
    assert list(s.slots_between(utc("2024-01-01T10:00"), utc("2024-01-01T11:00"))) == \
        [utc("2024-01-01T10:15"), utc("2024-01-01T10:30"), utc("2024-01-01T10:45"), utc("2024-01-01T11:00")]
    with pytest.raises(ValueError, match="at least one microsecond"):
        C.Every(timedelta(0))
    with pytest.raises(ValueError, match="at least one microsecond"):
        C.Every(timedelta(seconds=-1))
    with pytest.raises(TypeError, match="timedelta"):
        C.Every(60)
    with pytest.raises(ValueError, match="limit"):
        list(s.slots_between(0, 10, limit=-1))


def test_schedule_factory():
    assert isinstance(C.schedule("* * * * *"), C.Cron)
    assert isinstance(C.schedule(every=timedelta(seconds=5)), C.Every)
    assert C.schedule("@daily", tz="Europe/Berlin").tz.key == "Europe/Berlin"
    for kwargs in ({}, {"cron": "* * * * *", "every": timedelta(1)}):
        with pytest.raises(ValueError, match="exactly one"):
            C.schedule(**kwargs)
    with pytest.raises(ValueError, match="origin="):
        C.schedule("* * * * *", origin=5)
    with pytest.raises(ValueError, match="tz="):
        C.schedule(every=timedelta(1), tz="Europe/Berlin")


# -- slot keys --------------------------------------------------------------------------------
def test_slot_keys_are_stable():
    assert C.slot_key("report", utc("2024-03-31T00:05")) == "periodic:report@2024-03-31T00:05:00Z"
    assert C.slot_key("report", 1711843500) == "periodic:report@2024-03-31T00:05:00Z"
    assert C.slot_key("a:b", 1.25) == "periodic:a:b@1970-01-01T00:00:01.250000Z"
    berlin = utc("2024-03-31T00:05").astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
    assert C.slot_key("report", berlin) == "periodic:report@2024-03-31T00:05:00Z"
    for bad in ("", "a@b", None):
        with pytest.raises(ValueError):
            C.slot_key(bad, 0)
    for bad in ("report@2024", "periodic:@2024-01-01T00:00:00Z", "periodic:x@2024-01-01T00:00:00",
                "periodic:x@nonsenseZ"):
        with pytest.raises(ValueError, match="not a slot key"):
            C.parse_slot_key(bad)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1).filter(lambda n: "@" not in n), instants, instants)
def test_slot_keys_round_trip_and_differ(name, a, b):
    ka, kb = C.slot_key(name, a), C.slot_key(name, b)
    assert C.parse_slot_key(ka) == (name, a)
    assert (ka == kb) == (a == b)
    assert C.slot_key(name + "x", a) != ka


# -- catch-up ---------------------------------------------------------------------------------
FIVE = C.Cron("*/5 * * * *")
T0 = utc("2024-01-01T12:00")


def test_due_on_time():
    # woke 2 s after the 12:05 slot, last fired 12:00: it fires in every mode
    for mode in C.CATCH_UP_MODES:
        d = FIVE.due_slots(T0, T0 + timedelta(minutes=5, seconds=2), catch_up=mode)
        assert d.fire == (T0 + timedelta(minutes=5),)
        assert d.next_slot == T0 + timedelta(minutes=10)
        assert d.skipped_after is None and d.skipped_until is None
    # nothing new since the last fired slot
    d = FIVE.due_slots(T0 + timedelta(minutes=5), T0 + timedelta(minutes=7))
    assert d.fire == () and d.next_slot == T0 + timedelta(minutes=10)


def test_due_after_downtime():
    now = T0 + timedelta(minutes=32)         # missed 12:05 .. 12:30; 12:30 is 2 min old (> grace)
    latest = FIVE.due_slots(T0, now, catch_up="latest")
    assert latest.fire == (T0 + timedelta(minutes=30),)
    assert (latest.skipped_after, latest.skipped_until) == (T0, T0 + timedelta(minutes=30))
    every = FIVE.due_slots(T0, now, catch_up="all")
    assert every.fire == tuple(T0 + timedelta(minutes=m) for m in (5, 10, 15, 20, 25, 30))
    assert every.skipped_after is None
    capped = FIVE.due_slots(T0, now, catch_up="all", limit=2)
    assert capped.fire == (T0 + timedelta(minutes=25), T0 + timedelta(minutes=30))
    assert (capped.skipped_after, capped.skipped_until) == (T0, T0 + timedelta(minutes=25))
    none = FIVE.due_slots(T0, now, catch_up="none")
    assert none.fire == () and none.next_slot == T0 + timedelta(minutes=35)
    assert none.skipped_after == T0
    # "none" still fires a slot that is only a little late
    assert FIVE.due_slots(T0, T0 + timedelta(minutes=30, seconds=5), catch_up="none").fire == \
        (T0 + timedelta(minutes=30),)


def test_due_first_run_and_clock_set_back():
    assert FIVE.due_slots(None, T0 + timedelta(seconds=3), catch_up="all").fire == (T0,)
    assert FIVE.due_slots(None, T0 + timedelta(minutes=3), catch_up="all").fire == ()
    assert FIVE.due_slots(T0 + timedelta(hours=1), T0, catch_up="all").fire == ()


def test_due_errors():
    for kwargs in ({"catch_up": "some"}, {"limit": 0}, {"grace": timedelta(seconds=-1)}):
        with pytest.raises(ValueError):
            FIVE.due_slots(T0, T0, **kwargs)


@settings(max_examples=400, deadline=None)
@given(period_min=st.integers(1, 120), last=st.one_of(st.none(), st.integers(-50, 50)),
       now_s=st.integers(-3000, 3 * 24 * 3600), mode=st.sampled_from(C.CATCH_UP_MODES),
       limit=st.integers(1, 20), grace_s=st.integers(0, 600), cron=st.booleans())
def test_due_slots_follow_their_definition(period_min, last, now_s, mode, limit, grace_s, cron):
    s = C.Cron(f"*/{period_min} * * * *") if cron and period_min < 60 else C.Every(timedelta(minutes=period_min))
    base = utc("2024-05-01T00:00")
    now = base + timedelta(seconds=now_s)
    last_fired = None if last is None else base + timedelta(minutes=period_min * last)
    if last_fired is not None and cron and period_min < 60:
        last_fired = s.prev_slot(last_fired)
    grace = timedelta(seconds=grace_s)
    d = s.due_slots(last_fired, now, catch_up=mode, limit=limit, grace=grace)

    # the definition, from the list of candidate slots
    lower = last_fired if last_fired is not None else now - timedelta(days=4)
    candidates = list(s.slots_between(lower, now))
    on_time = bool(candidates) and now - candidates[-1] <= grace
    if last_fired is None:
        want = candidates[-1:] if on_time else []
    elif mode == "all":
        want = candidates[-limit:]
    elif mode == "latest" or on_time:
        want = candidates[-1:]
    else:
        want = []
    assert list(d.fire) == want
    assert d.next_slot == s.next_slot(now)
    skipped = [c for c in candidates if c < (want[0] if want else now + timedelta(microseconds=1))]
    if last_fired is not None and skipped:
        assert d.skipped_after == last_fired and d.skipped_until == (want[0] if want else d.skipped_until)
        assert [c for c in candidates if d.skipped_after < c < d.skipped_until] == skipped
    else:
        assert d.skipped_after is None and d.skipped_until is None

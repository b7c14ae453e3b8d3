"""Crontab expressions → the fields of a cron trigger (pure: strings in, strings out), and the first long wait
between a trigger's fire times (``first_gap``: the fire times come from a function given, the scheduler's).

Accepts the five classic fields (``minute hour day month weekday``) or six with
seconds first (``second minute hour day month weekday``, for tests and fast
schedules). Each field is ``*``, a value, a range ``a-b``, a step ``*/n`` or
``a-b/n``, or a comma list of those; months and weekdays may be names
(``jan``, ``mon-fri``).

Weekday numbers follow crontab: 0 and 7 are Sunday, 1 is Monday. APScheduler 3
counts 0 as *Monday* (its documented historical mistake), so numeric weekdays are
translated here into names, which both read the same way.

When both the day of the month and the weekday are restricted (neither starts
with ``*``), crontab runs on the days that match *either* ("0 9 1 * 1": the
1st and every Monday); one APScheduler trigger would need both. Such an
expression is two triggers (``schedule``), one per field, fired at whichever
comes first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week")
_RANGES = {
    "second": (0, 59),
    "minute": (0, 59),
    "hour": (0, 23),
    "day": (1, 31),
    "month": (1, 12),
    "day_of_week": (0, 7),
}
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class CronFields:
    """Keyword arguments for a cron trigger (APScheduler's ``CronTrigger``)."""

    second: str
    minute: str
    hour: str
    day: str
    month: str
    day_of_week: str

    def as_kwargs(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in FIELDS}


def parse_cron(expr: str) -> CronFields:
    """Validate ``expr`` and return its fields; raise ValueError saying which field is wrong."""
    parts = expr.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    elif len(parts) != 6:
        raise ValueError(
            f"{expr!r} has {len(parts)} fields; give 5 (minute hour day month weekday) or 6 (seconds first)"
        )
    values = dict(zip(FIELDS, parts, strict=True))
    for name, text in values.items():
        _check_field(name, text)
    values["day_of_week"] = _weekday_names(values["day_of_week"])
    return CronFields(**values)


_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
"""The most days each month has (February's 29 in a leap year)."""


def never_runs(expr: str) -> str | None:
    """Why a valid ``expr`` never fires (``0 9 30 2 *``: no month it names has a day 30), or None when it does.
    Not an error: ``0 0 31 2 *`` is a known way to pause a cron job. But APScheduler takes such a trigger and never
    fires it, so what it plans is never planned: the daemon warns and ``kembali check`` notes it. With the weekday
    restricted too, crontab runs on the days either matches, so some day always comes."""
    fields = parse_cron(expr)
    day, weekday = fields.day, expr.split()[-1]
    if not day.startswith("*") and not weekday.startswith("*"):
        return None
    first_day, months = min(_values("day", day)), sorted(_values("month", fields.month))
    if all(first_day > _MONTH_DAYS[m - 1] for m in months):
        return f"no month it names ({', '.join(map(str, months))}) has a day {first_day}"
    return None


def _values(name: str, text: str) -> set[int]:
    """The numbers a checked field of the day or the month names."""
    low, high = _RANGES[name]
    found: set[int] = set()
    for item in text.split(","):
        base, _, step = item.partition("/")
        first, _, last = base.partition("-")
        a = low if base == "*" else _number(name, first)
        b = high if base == "*" else _number(name, last) if last else a
        found.update(range(a, b + 1, int(step) if step else 1))
    return found


def schedule(expr: str) -> tuple[CronFields, ...]:
    """The triggers whose fire times together are ``expr``'s, as crontab reads it: one, or two when both the day
    of the month and the weekday are restricted (crontab runs on the days either matches)."""
    fields = parse_cron(expr)
    parts = expr.split()
    day, weekday = parts[-3], parts[-1]
    if day.startswith("*") or weekday.startswith("*"):
        return (fields,)
    return replace(fields, day_of_week="*"), replace(fields, day="*")


def first_gap(
    next_fire: Callable[[datetime], datetime | None], start: datetime, until: datetime, longer_than: timedelta
) -> tuple[datetime, datetime | None] | None:
    """The first stretch longer than ``longer_than`` with no fire time, of those beginning from ``start`` to before
    ``until``: (the fire time it begins at, or ``start`` when none came before it; the fire time that ends it, or
    None when none ever comes). None when there is none. ``next_fire(at)`` gives the first fire time at or after
    ``at`` (a trigger's, as the scheduler computes them), None when no more come; fire times are whole seconds.

    Each step finds the last fire time within ``longer_than`` of the previous one by halving (no more than 18
    calls for 26 hours), so a schedule firing every second costs no more to look over than a daily one."""
    second = timedelta(seconds=1)
    last, at = start, start
    while last < until:
        nxt = next_fire(at)
        if nxt is None or nxt - last > longer_than:
            return last, nxt
        reach = last + longer_than
        low, high = 0, int((reach - nxt) / second)  # offsets from nxt, in seconds, whose next fire may be <= reach
        while low < high:
            mid = (low + high + 1) // 2
            found = next_fire(nxt + mid * second)
            if found is not None and found <= reach:
                low = mid
            else:
                high = mid - 1
        last = next_fire(nxt + low * second) or nxt
        at = last + second
    return None


def _number(name: str, token: str) -> int:
    low, high = _RANGES[name]
    names = _MONTHS if name == "month" else _DAYS if name == "day_of_week" else ()
    lowered = token.lower()
    if lowered in names:
        return names.index(lowered) + (1 if name == "month" else 0)
    if not token.isdigit():
        raise ValueError(f"{name} {token!r} is not a number" + (f" or a name ({names[0]}…)" if names else ""))
    value = int(token)
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside {low}-{high}")
    return value


def _check_field(name: str, text: str) -> None:
    for item in text.split(","):
        base, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) < 1):
            raise ValueError(f"{name} step {step!r} must be a positive number")
        if base == "*":
            continue
        first, _, last = base.partition("-")
        a = _number(name, first)
        if last:
            b = _number(name, last)
            if b < a and not (name == "day_of_week" and b == 0):
                raise ValueError(f"{name} range {base!r} runs backwards")
        elif step:
            raise ValueError(f"{name} {item!r}: a step needs '*' or a range before it")


def _weekday_names(text: str) -> str:
    """Crontab weekdays (0/7 = Sunday) as explicit names, which APScheduler 3 reads correctly."""
    if text == "*":
        return text
    days: set[int] = set()
    for item in text.split(","):
        base, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            first, last = 0, 6
        else:
            a, _, b = base.partition("-")
            first = _number("day_of_week", a)
            last = _number("day_of_week", b) if b else first
            if b and last == 0:
                last = 7
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_DAYS[d] for d in sorted(days))

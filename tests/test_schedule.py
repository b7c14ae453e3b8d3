"""Cron expressions (crontab weekdays, seconds) and the catch-up rule for runs missed while down."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.config import settings_from_dict
from worker.core.cron import parse_cron
from worker.errors import ConfigError
from worker.scheduler import cron_trigger, missed_run

JKT = "Asia/Jakarta"  # UTC+7


@pytest.mark.parametrize(
    ("expr", "fields"),
    [
        ("0 9 * * *", ("0", "0", "9", "*", "*", "*")),
        ("*/2 * * * * *", ("*/2", "*", "*", "*", "*", "*")),
        ("30 8 1 jan *", ("0", "30", "8", "1", "jan", "*")),
        ("0 9 * * 1-5", ("0", "0", "9", "*", "*", "mon,tue,wed,thu,fri")),
        ("0 9 * * 0", ("0", "0", "9", "*", "*", "sun")),
        ("0 9 * * 7", ("0", "0", "9", "*", "*", "sun")),
        ("0 9 * * 0,6", ("0", "0", "9", "*", "*", "sun,sat")),
        ("0 9 * * 5-0", ("0", "0", "9", "*", "*", "sun,fri,sat")),
        ("0 9 * * */3", ("0", "0", "9", "*", "*", "sun,wed,sat")),
        ("0 9 * * mon-fri", ("0", "0", "9", "*", "*", "mon,tue,wed,thu,fri")),
    ],
)
def test_crontab_fields_with_crontab_weekday_numbers(expr: str, fields: tuple[str, ...]) -> None:
    assert tuple(parse_cron(expr).as_kwargs().values()) == fields


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("0 9 * *", "4 fields"),
        ("0 9 * * * * *", "7 fields"),
        ("61 9 * * *", "minute 61 is outside 0-59"),
        ("0 24 * * *", "hour 24 is outside 0-23"),
        ("0 9 0 * *", "day 0 is outside 1-31"),
        ("0 9 * 13 *", "month 13 is outside 1-12"),
        ("0 9 * * 8", "day_of_week 8 is outside 0-7"),
        ("0 9 * * funday", "not a number"),
        ("0 9-5 * * *", "runs backwards"),
        ("*/0 9 * * *", "step '0'"),
        ("5/2 9 * * *", "a step needs"),
    ],
)
def test_bad_cron_expressions_say_what_is_wrong(expr: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_cron(expr)


def test_monday_in_crontab_is_monday_in_the_trigger() -> None:
    # 2026-11-22 is a Sunday; "1" in crontab is Monday (APScheduler 3's own numbering would say Tuesday)
    fire = cron_trigger("0 9 * * 1", JKT).get_next_fire_time(None, datetime(2026, 11, 22, 12, tzinfo=UTC))
    assert fire is not None and fire.isoformat() == "2026-11-23T09:00:00+07:00"


@pytest.mark.parametrize(
    ("last_run", "now", "missed"),
    [
        (None, "2026-11-22T01:00:00+00:00", "2026-11-22T01:00:00+00:00"),  # never planned: plan now
        ("2026-11-21T02:00:05+00:00", "2026-11-22T01:00:00+00:00", None),  # 09:00 WIB today not reached yet
        ("2026-11-21T02:00:05+00:00", "2026-11-22T02:00:00+00:00", "2026-11-22T09:00:00+07:00"),  # exactly due
        ("2026-11-21T02:00:05+00:00", "2026-11-22T05:00:00+00:00", "2026-11-22T09:00:00+07:00"),  # down over it
        ("2026-11-19T02:00:00+00:00", "2026-11-22T05:00:00+00:00", "2026-11-20T09:00:00+07:00"),  # down for days
        ("2026-11-22T02:00:00+00:00", "2026-11-22T05:00:00+00:00", None),  # the run started on its fire time
    ],
)
def test_a_run_missed_while_down_is_found_once(last_run: str | None, now: str, missed: str | None) -> None:
    got = missed_run("0 9 * * *", JKT, datetime.fromisoformat(last_run) if last_run else None,
                     datetime.fromisoformat(now))
    assert (got.isoformat() if got else None) == missed


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"plan_cron": {"winbak": "0 9 * * *"}}, "schedule.plan_cron.winbak' is not a campaign"),
        ({"plan_cron": {"winback": "0 25 * * *"}}, "schedule.plan_cron.winback' is not a cron expression"),
        ({"plan_cron": {"winback": 9}}, "schedule.plan_cron.winback' must be str"),
        ({"default_plan_cron": "daily"}, "schedule.default_plan_cron"),
        ({"dispatch_poll_seconds": 0}, "schedule.dispatch_poll_seconds' must be positive"),
        ({"attempt_retention_days": -1}, "schedule.attempt_retention_days"),
    ],
)
def test_schedule_config_is_checked_by_key(schedule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_dict({"schedule": schedule})

"""Cron expressions (crontab weekdays, seconds) and the catch-up rule for runs missed while down."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from worker.config import settings_from_dict
from worker.core.cron import first_gap, never_runs, parse_cron
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


@pytest.mark.parametrize("expr", ["0 9 29 2 *", "0 9 31 1-4 *", "0 9 30 2 1", "0 9 */30 2 *"])
def test_a_day_some_month_it_names_has_or_a_weekday_beside_it_runs(expr: str) -> None:
    # 29 February in leap years, the 31st of January and March, Mondays of February (crontab: the day *or* the
    # weekday), the 1st of February (*/30 is days 1 and 31)
    trigger = cron_trigger(expr, JKT)
    assert trigger.get_next_fire_time(None, datetime(2026, 1, 1, tzinfo=UTC)) is not None
    assert never_runs(expr) is None


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ("0 9 30 2 *", "no month it names (2) has a day 30"),
        ("0 0 31 2 *", "no month it names (2) has a day 31"),  # the known way to pause a cron job
        ("0 9 31 4,6,9,11 *", "no month it names (4, 6, 9, 11) has a day 31"),
        ("0 9 30-31 feb */2", "no month it names (2) has a day 30"),
    ],
)
def test_a_cron_no_day_matches_is_valid_and_says_why_it_never_runs(expr: str, why: str) -> None:
    # a valid expression (crontab takes it: a way to pause a job), which APScheduler never fires
    parse_cron(expr)
    assert cron_trigger(expr, JKT).get_next_fire_time(None, datetime(2026, 1, 1, tzinfo=UTC)) is None
    assert never_runs(expr) == why


def test_monday_in_crontab_is_monday_in_the_trigger() -> None:
    # 2026-11-22 is a Sunday; "1" in crontab is Monday (APScheduler 3's own numbering would say Tuesday)
    fire = cron_trigger("0 9 * * 1", JKT).get_next_fire_time(None, datetime(2026, 11, 22, 12, tzinfo=UTC))
    assert fire is not None and fire.isoformat() == "2026-11-23T09:00:00+07:00"


def fire_times(expr: str, zone: str, after: datetime, n: int) -> list[str]:
    """The next ``n`` fire times after ``after``, as local ISO text, walked as the scheduler walks them."""
    trigger = cron_trigger(expr, zone)
    out: list[datetime] = []
    now = after
    while len(out) < n:
        fire = trigger.get_next_fire_time(out[-1] if out else None, now)
        assert fire is not None
        out.append(fire)
        now = fire.astimezone(UTC) + timedelta(seconds=1)
    return [f.isoformat() for f in out]


# (name, expression, zone, after, the next fire times)
FIRE_CASES = [
    ("day of month and weekday both given: crontab runs on either (the 1st, and every Monday)",
     "0 9 1 * 1", JKT, datetime(2026, 1, 1, tzinfo=UTC),
     ["2026-01-01T09:00:00+07:00", "2026-01-05T09:00:00+07:00", "2026-01-12T09:00:00+07:00",
      "2026-01-19T09:00:00+07:00", "2026-01-26T09:00:00+07:00", "2026-02-01T09:00:00+07:00",
      "2026-02-02T09:00:00+07:00"]),
    ("the 15th or a weekend day, a day matching both fires once", "30 8 15 * sat,sun", JKT,
     datetime(2026, 8, 13, tzinfo=UTC),
     ["2026-08-15T08:30:00+07:00", "2026-08-16T08:30:00+07:00", "2026-08-22T08:30:00+07:00"]),
    ("a weekday step starts with '*': both must match, as in crontab (Mondays that are a 1st)",
     "0 9 1 * */1", JKT, datetime(2026, 1, 1, 3, tzinfo=UTC),
     ["2026-02-01T09:00:00+07:00", "2026-03-01T09:00:00+07:00"]),
    ("the 31st: only months that have one", "0 9 31 * *", JKT, datetime(2026, 1, 31, 3, tzinfo=UTC),
     ["2026-03-31T09:00:00+07:00", "2026-05-31T09:00:00+07:00", "2026-07-31T09:00:00+07:00"]),
    ("29 February: leap years only", "0 9 29 2 *", JKT, datetime(2026, 1, 1, tzinfo=UTC),
     ["2028-02-29T09:00:00+07:00", "2032-02-29T09:00:00+07:00"]),
    ("02:30 does not exist in New York on 8 March 2026: that day's run is an hour late, once",
     "30 2 * * *", "America/New_York", datetime(2026, 3, 7, 12, tzinfo=UTC),
     ["2026-03-08T02:30:00-05:00", "2026-03-09T02:30:00-04:00"]),
    ("hourly over the night New York's clocks go back: 01:00 runs twice, an hour apart",
     "0 * * * *", "America/New_York", datetime(2026, 11, 1, 4, 30, tzinfo=UTC),
     ["2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"]),
    ("Lord Howe's half-hour jump forward skips 02:00-02:30: 02:15 runs at 02:45", "15 2 * * *",
     "Australia/Lord_Howe", datetime(2026, 10, 3, tzinfo=UTC),
     ["2026-10-04T02:15:00+10:30", "2026-10-05T02:15:00+11:00"]),
    ("midnight does not exist in Santiago on 6 September 2026 (00:00 to 01:00): that day's run is an hour late, "
     "once, not lost", "0 0 * * *", "America/Santiago", datetime(2026, 9, 4, 12, tzinfo=UTC),
     ["2026-09-05T00:00:00-04:00", "2026-09-06T01:00:00-03:00", "2026-09-07T00:00:00-03:00"]),
    ("00:30 does not exist in Havana on 8 March 2026: 01:30 that day", "30 0 * * *", "America/Havana",
     datetime(2026, 3, 7, 12, tzinfo=UTC),
     ["2026-03-08T01:30:00-04:00", "2026-03-09T00:30:00-04:00"]),
    ("Beirut's clocks skip midnight on 29 March 2026: 01:00 that day", "0 0 * * *", "Asia/Beirut",
     datetime(2026, 3, 28, tzinfo=UTC), ["2026-03-29T01:00:00+03:00", "2026-03-30T00:00:00+03:00"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "expr", "zone", "after", "expected"), FIRE_CASES, ids=[c[0] for c in FIRE_CASES])
def test_fire_times_across_month_ends_and_clock_changes(name: str, expr: str, zone: str, after: datetime,
                                                        expected: list[str]) -> None:
    assert fire_times(expr, zone, after, len(expected)) == expected


def test_a_run_missed_on_a_weekday_is_found_when_the_day_of_month_is_given_too() -> None:
    # down from Friday 2 January 2026 until Tuesday: Monday's run (crontab: the 1st or a Monday) was missed
    got = missed_run("0 9 1 * 1", JKT, datetime(2026, 1, 1, 2, 0, 1, tzinfo=UTC), datetime(2026, 1, 6, 3, tzinfo=UTC))
    assert got is not None and got.isoformat() == "2026-01-05T09:00:00+07:00"


@pytest.mark.parametrize(
    ("last_run", "now", "missed"),
    [
        (None, "2026-11-22T01:00:00+00:00", "2026-11-22T01:00:00+00:00"),  # never planned: plan now
        ("2026-11-21T02:00:05+00:00", "2026-11-22T01:00:00+00:00", None),  # 09:00 WIB today not reached yet
        ("2026-11-21T02:00:05+00:00", "2026-11-22T02:00:00+00:00", "2026-11-22T09:00:00+07:00"),  # exactly due
        ("2026-11-21T02:00:05+00:00", "2026-11-22T05:00:00+00:00", "2026-11-22T09:00:00+07:00"),  # down over it
        ("2026-11-19T02:00:00+00:00", "2026-11-22T05:00:00+00:00", "2026-11-20T09:00:00+07:00"),  # down for days
        ("2026-11-22T02:00:00+00:00", "2026-11-22T05:00:00+00:00", None),  # the run started on its fire time
        ("2026-11-22T02:00:00.900+00:00", "2026-11-22T05:00:00+00:00", None),  # started 0.9 s after its fire time
        # a pass (the catch-up at start) recorded under a second before 09:00: the 09:00 run was still missed
        ("2026-11-22T01:59:59.600+00:00", "2026-11-22T05:00:00+00:00", "2026-11-22T09:00:00+07:00"),
    ],
)
def test_a_run_missed_while_down_is_found_once(last_run: str | None, now: str, missed: str | None) -> None:
    got = missed_run("0 9 * * *", JKT, datetime.fromisoformat(last_run) if last_run else None,
                     datetime.fromisoformat(now))
    assert (got.isoformat() if got else None) == missed


@pytest.mark.parametrize("expr", ["0 0 31 2 *", "0 9 30 2 *", "0 9 31 4,6,9,11 *"])
def test_a_campaign_paused_with_a_cron_no_day_matches_is_not_taken_for_missed_when_never_planned(expr: str) -> None:
    # `0 0 31 2 *` is the README's way to pause a campaign: a daemon started on a database where it never ran (a new
    # install, a campaign just turned on) planned it once at start-up all the same, and sent it
    assert missed_run(expr, JKT, None, datetime(2026, 11, 22, 5, tzinfo=UTC)) is None


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"plan_cron": {"winbak": "0 9 * * *"}}, "schedule.plan_cron.winbak' is not a campaign"),
        ({"plan_cron": {"winback": "0 25 * * *"}}, "schedule.plan_cron.winback' is not a cron expression"),
        ({"plan_cron": {"winback": 9}}, "schedule.plan_cron.winback' must be str"),
        ({"default_plan_cron": "daily"}, "schedule.default_plan_cron"),
        ({"dispatch_poll_seconds": 0}, "schedule.dispatch_poll_seconds' must be at least 0.1 seconds, not 0$"),
        ({"attempt_retention_days": -1}, "schedule.attempt_retention_days"),
    ],
)
def test_schedule_config_is_checked_by_key(schedule: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_dict({"schedule": schedule})


async def _until(condition: Callable[[], object], why: str, timeout_s: float = 10.0) -> None:
    """Wait on the event loop's clock (which no wall-clock step moves) until ``condition()`` holds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, why
        await asyncio.sleep(0.01)


def test_interval_jobs_keep_their_pace_when_the_wall_clock_steps_back_an_hour() -> None:
    """Maintenance, the health line, the template watcher and the systemd watchdog count seconds on the event
    loop's clock: an NTP step back (or a restored VM) must not silence them for the hour (the watchdog's silence
    gets the daemon killed), while a cron job keeps to the wall clock."""
    import asyncio

    import time_machine

    from worker.scheduler import Scheduler

    async def scenario() -> tuple[int, int, list[str]]:
        # Given the daemon's scheduler with a watchdog ping every 0.1 s
        scheduler = Scheduler(JKT)
        pings: list[float] = []

        async def watchdog() -> None:
            pings.append(asyncio.get_running_loop().time())

        scheduler.add_interval("watchdog", 0.1, watchdog)
        scheduler.start()
        try:
            await _until(lambda: len(pings) >= 4, "the watchdog never pinged four times")
            before = len(pings)
            # When the system clock steps back an hour
            with time_machine.travel(datetime.now(UTC) - timedelta(hours=1), tick=True):
                await _until(lambda: len(pings) >= before + 4, f"no pings after the step back: {len(pings)}")
            return before, len(pings) - before, scheduler.job_ids()
        finally:
            scheduler.shutdown()

    before, after, jobs = asyncio.run(scenario())
    # Then it goes on pinging every 0.1 s, as before the step (not once an hour has passed)
    assert jobs == ["watchdog"]
    assert before >= 4 and after >= 4, (before, after)


def test_a_cron_job_due_while_the_machine_slept_runs_soon_after_it_wakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """APScheduler 3 waits for a cron job's next time on the event loop's clock, which stands still while the
    machine is suspended (and does not follow the wall clock stepped forward by NTP): without a look at the wall
    clock now and then, a 09:00 run due during a 10-hour sleep would come 10 hours late."""
    import asyncio

    import time_machine

    from worker.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "WAKE_SECONDS", 0.1)
    runs: list[datetime] = []

    async def scenario() -> None:
        # Given the daemon's scheduler at 23:00 in Jakarta with a planning job on "0 9 * * *"
        with time_machine.travel(datetime(2027, 3, 1, 16, 0, tzinfo=UTC), tick=True) as clock:
            scheduler = Scheduler(JKT)

            async def job() -> None:
                runs.append(datetime.now(UTC))

            scheduler.add_cron("plan:winback", "0 9 * * *", job, now=datetime.now(UTC))
            scheduler.start()
            try:
                await asyncio.sleep(0.2)
                # When the machine sleeps until 09:00:30 (the wall clock jumps; the event loop's clock does not)
                clock.move_to(datetime(2027, 3, 2, 2, 0, 30, tzinfo=UTC))
                await _until(lambda: runs, "the 09:00 run did not come after the wake-up")
                await asyncio.sleep(0.3)  # three looks at the wall clock more: no second run
            finally:
                scheduler.shutdown()

    asyncio.run(scenario())
    # Then the 09:00 run happens once, within moments of the wake-up, not ten hours later
    assert len(runs) == 1, runs


GAP_CASES = [
    # (why, expr, zone, after, the first gap longer than 26 hours: its two fire times, or None)
    ("daily at 09:00: 24 hours apart", "0 9 * * *", JKT, datetime(2026, 1, 1, tzinfo=UTC), None),
    ("daily in New York: 25 hours the night its clock goes back, still within", "0 9 * * *", "America/New_York",
     datetime(2026, 1, 1, tzinfo=UTC), None),
    ("daily at midnight in Santiago, which skips one: 25 hours, still within", "0 0 * * *", "America/Santiago",
     datetime(2026, 1, 1, tzinfo=UTC), None),
    ("every 30 seconds: no gap, and no fire time looked at one by one", "*/30 * * * * *", JKT,
     datetime(2026, 1, 1, tzinfo=UTC), None),
    ("weekdays only: Friday to Monday", "0 9 * * mon-fri", JKT, datetime(2026, 1, 1, tzinfo=UTC),
     ("2026-01-02T09:00:00+07:00", "2026-01-05T09:00:00+07:00")),
    ("every minute of Mondays: from the last to the next Monday", "* * * * 1", JKT,
     datetime(2026, 1, 4, 17, tzinfo=UTC), ("2026-01-05T23:59:00+07:00", "2026-01-12T00:00:00+07:00")),
    ("every minute of Mondays, from a Thursday: until the first", "* * * * 1", JKT, datetime(2026, 1, 1, tzinfo=UTC),
     ("2026-01-01T00:00:00+00:00", "2026-01-05T00:00:00+07:00")),
    ("daily in December only: from the last of December to the first of the next", "0 9 * 12 *", JKT,
     datetime(2026, 12, 1, 2, tzinfo=UTC), ("2026-12-31T09:00:00+07:00", "2027-12-01T09:00:00+07:00")),
    ("29 February only", "0 9 29 2 *", JKT, datetime(2026, 1, 1, tzinfo=UTC),
     ("2026-01-01T00:00:00+00:00", "2028-02-29T09:00:00+07:00")),
]  # fmt: skip


@pytest.mark.parametrize(("why", "expr", "zone", "after", "gap"), GAP_CASES, ids=[c[0] for c in GAP_CASES])
def test_the_first_wait_between_fire_times_longer_than_a_limit(why: str, expr: str, zone: str, after: datetime,
                                                               gap: tuple[str, str] | None) -> None:
    calls = 0
    trigger = cron_trigger(expr, zone)

    def next_fire(at: datetime) -> datetime | None:
        nonlocal calls
        calls += 1
        found: datetime | None = trigger.get_next_fire_time(None, at)
        return found

    found = first_gap(next_fire, after, after + timedelta(days=366), timedelta(hours=26))
    assert (None if found is None else (found[0].isoformat(), found[1].isoformat() if found[1] else "")) == gap
    assert calls < 10_000, calls


@pytest.mark.parametrize(
    ("section", "key"),
    [("schedule", "dispatch_poll_seconds"), ("schedule", "maintenance_interval_seconds"),
     ("daemon", "watch_interval_seconds"), ("daemon", "health_summary_seconds")],
)
def test_a_daemon_interval_too_short_to_be_meant_is_refused_by_its_key(section: str, key: str) -> None:
    # a millisecond between looks (a typo for 1.0, or seconds read as minutes the other way) kept the daemon busy
    # doing nothing else and, for the health line, wrote a thousand log lines a second
    with pytest.raises(ConfigError, match=rf"'{section}\.{key}' must be at least 0\.1 seconds"):
        settings_from_dict({section: {key: 0.001}})
    settings_from_dict({section: {key: 0.1}})

"""Tables of the edges of time in the pure core: quiet hours across midnight and across the nights the clocks
change (a day skipped whole, too), deferrals that land on a local time the clocks skip or show twice, birthdays on
29 February and near midnight UTC at UTC+14 and UTC-11, cap windows rolling over, quiet hours that are none, and
zone names the zone database holds that say where no customer is. Time is always an argument."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from worker import planning
from worker.adapters import shop
from worker.adapters.store import Store
from worker.config import ConfigError, settings_from_dict
from worker.contexts import birthday_to_show
from worker.core import campaigns as cc
from worker.core.policy import (
    CapWindow,
    ContactPolicy,
    DeferUntil,
    Due,
    QuietHours,
    SendNow,
    Skip,
    decide_one,
    next_allowed,
    next_free_slot,
    zone_of,
)
from worker.domain import CustomerRecord, CustomerSnapshot, Locale, SkipReason

NIGHT = QuietHours(time(21, 0), time(8, 0))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


# (name, quiet hours, instant, zone, the instant quiet hours end or the instant itself)
QUIET_EDGES = [
    ("across midnight, 23:59 waits for 08:00 tomorrow", NIGHT, "2027-01-01T23:59+07:00", "Asia/Jakarta",
     "2027-01-02T08:00+07:00"),
    ("across midnight, 00:00 waits for 08:00 today", NIGHT, "2027-01-02T00:00+07:00", "Asia/Jakarta",
     "2027-01-02T08:00+07:00"),
    ("across midnight, 07:59:59.999999 waits a microsecond", NIGHT, "2027-01-02T07:59:59.999999+07:00",
     "Asia/Jakarta", "2027-01-02T08:00+07:00"),
    ("New York, the night 02:00-03:00 does not exist: 01:30 EST waits for 08:00 EDT", NIGHT,
     "2027-03-14T01:30-05:00", "America/New_York", "2027-03-14T08:00-04:00"),
    ("New York, the night 01:00-02:00 repeats: 01:30 EDT (the first) waits for 08:00 EST", NIGHT,
     "2027-11-07T01:30-04:00", "America/New_York", "2027-11-07T08:00-05:00"),
    ("New York, the night 01:00-02:00 repeats: 01:30 EST (the second) waits for 08:00 EST", NIGHT,
     "2027-11-07T01:30-05:00", "America/New_York", "2027-11-07T08:00-05:00"),
    ("London, clocks forward at 01:00: 00:30 GMT waits for 08:00 BST", NIGHT, "2027-03-28T00:30+00:00",
     "Europe/London", "2027-03-28T08:00+01:00"),
    ("Lord Howe, clocks forward half an hour at 02:00: 02:00 +10:30 is 02:30 +11 and waits for 08:00 +11",
     NIGHT, "2027-10-03T02:00+10:30", "Australia/Lord_Howe", "2027-10-03T08:00+11:00"),
    ("Kathmandu (+05:45): 20:59 is allowed", NIGHT, "2027-01-01T20:59+05:45", "Asia/Kathmandu",
     "2027-01-01T20:59+05:45"),
    ("quiet hours ending on a time the clocks skip end at the jump", QuietHours(time(22, 0), time(2, 30)),
     "2027-03-13T23:00-05:00", "America/New_York", "2027-03-14T03:00-04:00"),
    ("quiet hours ending on a time shown twice end the first time", QuietHours(time(22, 0), time(1, 30)),
     "2027-11-07T00:10-04:00", "America/New_York", "2027-11-07T01:30-04:00"),
    ("Apia skipped 30 December 2011: 22:00 on the 29th waits for 08:00 on the 31st, not midnight", NIGHT,
     "2011-12-29T22:00-10:00", "Pacific/Apia", "2011-12-31T08:00+14:00"),
    ("Kiritimati skipped 31 December 1994: 23:00 on the 30th waits for 08:00 on 1 January", NIGHT,
     "1994-12-30T23:00-10:00", "Pacific/Kiritimati", "1995-01-01T08:00+14:00"),
    ("Kwajalein skipped 21 August 1993: 21:00 on the 20th waits for 08:00 on the 22nd", NIGHT,
     "1993-08-20T21:00-12:00", "Pacific/Kwajalein", "1993-08-22T08:00+12:00"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "quiet", "at", "zone", "expected"), QUIET_EDGES, ids=[c[0] for c in QUIET_EDGES])
def test_quiet_hours_end_on_the_customers_clock(
    name: str, quiet: QuietHours, at: str, zone: str, expected: str
) -> None:
    got = next_allowed(utc(at), ZoneInfo(zone), quiet)
    assert got == utc(expected), got.astimezone(ZoneInfo(zone)).isoformat()
    assert not quiet.contains(got.astimezone(ZoneInfo(zone)).time())


@pytest.mark.parametrize("zone", ["Pacific/Apia", "Pacific/Kiritimati", "Pacific/Kanton", "Pacific/Kwajalein"])
def test_quiet_hours_never_end_inside_themselves_on_a_day_the_calendar_skipped(zone: str) -> None:
    tz = ZoneInfo(zone)
    skipped = {"Pacific/Apia": datetime(2011, 12, 30, 10, tzinfo=UTC), "Pacific/Kiritimati": datetime(
        1994, 12, 31, 10, tzinfo=UTC), "Pacific/Kanton": datetime(1994, 12, 31, 11, tzinfo=UTC),
        "Pacific/Kwajalein": datetime(1993, 8, 21, 12, tzinfo=UTC)}[zone]  # fmt: skip
    for quiet in (
        NIGHT,
        QuietHours(time(22), time(2, 30)),
        QuietHours(time(13), time(14)),
        QuietHours(time(23, 30), time(0, 15)),
    ):
        for minutes in range(-36 * 60, 36 * 60, 10):
            at = skipped + timedelta(minutes=minutes)
            got = next_allowed(at, tz, quiet)
            assert got >= at and not quiet.contains(got.astimezone(tz).time()), (quiet, at, got.astimezone(tz))
            assert (got == at) == (not quiet.contains(at.astimezone(tz).time())), (quiet, at)


def test_quiet_hours_that_are_none() -> None:
    at = utc("2027-01-01T23:00+07:00")
    for start, end in (("00:00", "00:00"), ("21:00", "21:00")):
        cfg = settings_from_dict({"policy": {"quiet_hours_start": start, "quiet_hours_end": end}})
        policy = planning.contact_policy(cfg)
        assert policy.quiet is None
        assert next_allowed(at, ZoneInfo("Asia/Jakarta"), policy.quiet) == at
        assert QuietHours(time.fromisoformat(start), time.fromisoformat(end)).contains(time(23)) is False


@pytest.mark.parametrize(
    ("start", "end", "key"),
    [("21:00", "24:00", "policy.quiet_hours_end"), ("9:00", "08:00", "policy.quiet_hours_start")],
)
def test_a_quiet_hour_that_is_no_time_of_day_is_refused_naming_its_key(start: str, end: str, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        settings_from_dict({"policy": {"quiet_hours_start": start, "quiet_hours_end": end}})
    assert key in str(raised.value) and "24-hour time" in str(raised.value)


DAY = timedelta(days=1)


def capped(quiet: tuple[str, str] | None) -> ContactPolicy:
    """One email a day, with quiet hours (start, end) or none."""
    hours = None if quiet is None else QuietHours(time.fromisoformat(quiet[0]), time.fromisoformat(quiet[1]))
    return ContactPolicy(caps=(CapWindow(1, 1),), quiet=hours, default_zone="Asia/Jakarta")


# (name, quiet hours, last sent, now, zone, expected decision)
DEFERRAL_EDGES = [
    ("the cap frees 22:30 EST, in quiet hours ending at 02:30, a time the clocks skip that night: 03:00 EDT",
     ("22:00", "02:30"), "2027-03-12T22:30-05:00", "2027-03-13T12:00-05:00", "America/New_York",
     DeferUntil(utc("2027-03-14T03:00-04:00"), "cap")),
    ("the cap frees 01:10 EDT, the first 01:10 of the night the clocks go back: the first 01:30 ends quiet hours",
     ("22:00", "01:30"), "2027-11-06T01:10-04:00", "2027-11-06T12:00-04:00", "America/New_York",
     DeferUntil(utc("2027-11-07T01:30-04:00"), "cap")),
    ("the cap frees 01:10 EST, the second 01:10: the second 01:30",
     ("22:00", "01:30"), "2027-11-06T02:10-04:00", "2027-11-06T12:00-04:00", "America/New_York",
     DeferUntil(utc("2027-11-07T01:30-05:00"), "cap")),
    ("the cap frees at 02:15 on Lord Howe's clock, a time skipped the night it goes forward half an hour: sent "
     "then, 02:45 (+11)", None, "2027-10-02T02:15+10:30", "2027-10-02T12:00+10:30", "Australia/Lord_Howe",
     DeferUntil(utc("2027-10-03T02:45+11:00"), "cap")),
    ("a cap of one a day is 24 hours, not the same wall time: 21:00 EST the day before the jump is free again at "
     "22:00 EDT", None, "2027-03-13T21:00-05:00", "2027-03-14T22:00-04:00", "America/New_York", SendNow()),
    ("sent exactly a day before now: the window has rolled over", ("21:00", "08:00"), "2027-03-01T12:00+07:00",
     "2027-03-02T12:00+07:00", "Asia/Jakarta", SendNow()),
    ("sent a day minus a microsecond before now: waits that microsecond", ("21:00", "08:00"),
     "2027-03-01T12:00:00.000001+07:00", "2027-03-02T12:00+07:00", "Asia/Jakarta",
     DeferUntil(utc("2027-03-02T12:00:00.000001+07:00"), "cap")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "quiet", "sent", "now", "zone", "expected"), DEFERRAL_EDGES, ids=[c[0] for c in DEFERRAL_EDGES]
)
def test_a_deferral_lands_on_a_time_the_customers_clock_shows(
    name: str, quiet: tuple[str, str] | None, sent: str, now: str, zone: str, expected: object
) -> None:
    message = Due("k", "winback", 10, utc(now) + 7 * DAY)
    assert decide_one(message, [utc(sent)], utc(now), capped(quiet), ZoneInfo(zone)) == expected


def test_a_deferral_past_the_expiry_is_a_skip_even_across_a_clock_change() -> None:
    # 01:30 EST on the night New York skips 02:00-03:00; quiet hours 21:00-08:00 end at 08:00 EDT, 11:00 UTC: a
    # message expiring at the end of the day before on the customer's clock is skipped, not sent at 08:00
    now = utc("2027-03-14T01:30-05:00")
    quiet = ContactPolicy(caps=(), quiet=NIGHT)
    zone = ZoneInfo("America/New_York")
    assert decide_one(Due("k", "birthday", 50, utc("2027-03-14T08:00-04:00")), [], now, quiet, zone) == Skip(
        SkipReason.EXPIRED
    )
    assert decide_one(Due("k", "birthday", 50, utc("2027-03-14T08:00:01-04:00")), [], now, quiet, zone) == DeferUntil(
        utc("2027-03-14T08:00-04:00"), "quiet_hours"
    )


def test_a_cap_window_rolling_over_frees_its_oldest_place_to_the_microsecond() -> None:
    caps = (CapWindow(1, 3), CapWindow(2, 7))
    sent = [utc("2027-01-01T10:00+07:00"), utc("2027-01-05T10:00+07:00")]
    assert next_free_slot(sent, utc("2027-01-06T00:00+07:00"), caps) == utc("2027-01-08T10:00+07:00")
    assert next_free_slot(sent, utc("2027-01-08T10:00+07:00"), caps) == utc("2027-01-08T10:00+07:00")
    assert next_free_slot(sent, utc("2027-01-08T09:59:59.999999+07:00"), caps) == utc("2027-01-08T10:00+07:00")


# (name, birthday, zone, now, days_before, expected (the birthday, when its offer is due) or None)
BIRTHDAY_EDGES = [
    ("29 Feb at +14, 2027: 28 Feb starts there at 10:00 UTC on the 27th; a second before, planned ahead",
     date(1992, 2, 29), "Pacific/Kiritimati", "2027-02-27T09:59:59+00:00", 0,
     (date(2027, 2, 28), "2027-02-27T10:00+00:00")),
    ("29 Feb at +14, 2027: at the start of 28 Feb there, due at once",
     date(1992, 2, 29), "Pacific/Kiritimati", "2027-02-27T10:00+00:00", 0,
     (date(2027, 2, 28), "2027-02-27T10:00+00:00")),
    ("29 Feb at +14, 2027: the last second of 28 Feb there", date(1992, 2, 29), "Pacific/Kiritimati",
     "2027-02-28T09:59:59+00:00", 0, (date(2027, 2, 28), "2027-02-28T09:59:59+00:00")),
    ("29 Feb at +14, 2027: 1 March there, while still 28 Feb in the shop's Jakarta: over",
     date(1992, 2, 29), "Pacific/Kiritimati", "2027-02-28T10:00+00:00", 0, None),
    ("29 Feb at +14, 2028 (leap): celebrated on the 29th", date(1992, 2, 29), "Pacific/Kiritimati",
     "2028-02-28T10:00+00:00", 0, (date(2028, 2, 29), "2028-02-28T10:00+00:00")),
    ("29 Feb at -11, 2027: 28 Feb there all of 28 Feb 11:00 UTC to 1 Mar 11:00 UTC", date(1992, 2, 29),
     "Pacific/Pago_Pago", "2027-03-01T10:59:59+00:00", 0, (date(2027, 2, 28), "2027-03-01T10:59:59+00:00")),
    ("29 Feb at -11, 2027, three days before: 25 Feb there opens the window", date(1992, 2, 29),
     "Pacific/Pago_Pago", "2027-02-25T11:00+00:00", 3, (date(2027, 2, 28), "2027-02-25T11:00+00:00")),
    ("1 Jan at -11: the last second of the year there, planned ahead for the new year's start there",
     date(1990, 1, 1), "Pacific/Pago_Pago", "2028-01-01T10:59:59+00:00", 0,
     (date(2028, 1, 1), "2028-01-01T11:00+00:00")),
    ("31 Dec at +14: already 1 January there at 10:00 UTC on the 31st: over, and next year's is far",
     date(1990, 12, 31), "Pacific/Kiritimati", "2027-12-31T10:00+00:00", 0, None),
    ("1 Jan at +14, three days before: 29 Dec there", date(1990, 1, 1), "Pacific/Kiritimati",
     "2027-12-28T10:00+00:00", 3, (date(2028, 1, 1), "2027-12-28T10:00+00:00")),
    ("Kathmandu (+05:45): a birthday starts at 18:15 UTC the day before", date(1990, 3, 2), "Asia/Kathmandu",
     "2027-03-01T18:15+00:00", 0, (date(2027, 3, 2), "2027-03-01T18:15+00:00")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "birthday", "zone", "now", "days_before", "expected"), BIRTHDAY_EDGES, ids=[c[0] for c in BIRTHDAY_EDGES]
)
def test_a_birthday_is_on_the_customers_calendar(
    name: str, birthday: date, zone: str, now: str, days_before: int, expected: tuple[date, str] | None
) -> None:
    tz = ZoneInfo(zone)
    plan = cc.birthday_plan(birthday, utc(now), tz, days_before)
    assert plan == (None if expected is None else (expected[0], utc(expected[1])))
    if plan is not None:
        # the store's pre-filter asks for that birthday's month and day, and the offer ends with the day there
        assert birthday.month * 100 + birthday.day in cc.birthday_mmdd_candidates(utc(now), days_before)
        ends = cc.birthday_expires(plan[0], tz)
        assert ends.astimezone(tz).date() == plan[0] + timedelta(days=1) and ends.astimezone(tz).time() == time(0)
        assert plan[1] < ends


@pytest.mark.parametrize(
    "name", ["localtime", "Factory", "posixrules", "posix/America/New_York", "Mars/Olympus", "", "../zoneinfo/UTC"]
)
def test_a_zone_name_that_says_where_no_customer_is_reads_as_the_shops(name: str) -> None:
    # the importer refuses these (tests/test_importer.py); a row an older Kembali or another program wrote is
    # planned on the shop's clock, not on the clock of whichever host reads it ("localtime") or on "-00"
    assert zone_of(name, "Asia/Jakarta") == ZoneInfo("Asia/Jakarta")


def test_a_customers_zone_is_taken_as_written() -> None:
    assert zone_of("Pacific/Apia", "Asia/Jakarta") == ZoneInfo("Pacific/Apia")
    assert zone_of("America/New_York", "Asia/Jakarta") == ZoneInfo("America/New_York")


# (name, instant, the customers planned a birthday offer for then, by the year of their birthday key): planned at
# once on the day, or ahead when the day begins within the planning lead (26 hours, cc.BIRTHDAY_LEAD)
LEAP_DAY_PLANS = [
    ("26 Feb 2027, 07:59:59 UTC: +14's 28 February begins in 26 hours and a second: no one yet",
     "2027-02-26T07:59:59+00:00", {}),
    ("26 Feb 2027, 08:00 UTC: +14's 28 February begins in 26 hours: planned ahead", "2027-02-26T08:00:00+00:00",
     {"KIRI": 2027}),
    ("28 Feb 2027, 10:00 UTC: 1 March at +14; 28 February in Jakarta; at -11 it begins in an hour",
     "2027-02-28T10:00:00+00:00", {"JKT": 2027, "PAGO": 2027}),
    ("28 Feb 2027, 17:00 UTC: 1 March in Jakarta too; 28 February at -11 until 11:00 UTC the next day",
     "2027-02-28T17:00:00+00:00", {"PAGO": 2027}),
    ("1 Mar 2027, 11:00 UTC: 1 March everywhere: no one", "2027-03-01T11:00:00+00:00", {}),
    ("28 Feb 2028, 10:00 UTC: a leap year, 29 February begins at +14, and within the lead elsewhere",
     "2028-02-28T10:00:00+00:00", {"KIRI": 2028, "JKT": 2028, "PAGO": 2028}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "now", "planned"), LEAP_DAY_PLANS, ids=[c[0] for c in LEAP_DAY_PLANS])
def test_planning_offers_a_29_february_birthday_on_28_february_of_a_common_year_on_each_customers_calendar(
    db_url: str, name: str, now: str, planned: dict[str, int]
) -> None:
    # Given customers born on 29 February at +14, in the shop's Jakarta, and at -11 (a birthday in a common year is
    # celebrated on 28 February), birthday offers on the day itself
    zones = {"KIRI": "Pacific/Kiritimati", "JKT": "Asia/Jakarta", "PAGO": "Pacific/Pago_Pago"}
    people = [CustomerRecord(ext, f"{ext.lower()}@example.com", ext, Locale.EN, zone, date(1992, 2, 29), True,
                             "opt_in", "checkout") for ext, zone in zones.items()]  # fmt: skip
    cfg = settings_from_dict({"shop": {"time_zone": "Asia/Jakarta"},
                              "campaigns": {"birthday": {"enabled": True, "days_before": 0}}})  # fmt: skip
    store = Store.from_url(db_url)
    try:
        shop.upsert_customers(store.engine, people, utc("2027-01-01T00:00+00:00"))
        # When a planning pass runs then (the store's pre-filter by month and day, then the pure rules)
        keys = {m.dedupe_key for batch in planning.plan_batches(store, cfg, "birthday", utc(now)) for m in batch}
    finally:
        store.close()
    # Then exactly the customers whose 28 February (29th in a leap year) it is, or begins within the lead
    assert keys == {cc.birthday_key(ext, year) for ext, year in planned.items()}


# (birthday, the instant send-test renders at, the customer's zone, the birthday the copy celebrates)
NEXT_BIRTHDAYS = [
    (date(1992, 2, 29), "2027-03-01T10:00+07:00", "Asia/Jakarta", "2028-02-29"),  # 28 Feb passed: next is 366 away
    (date(1992, 2, 29), "2027-02-28T10:00+07:00", "Asia/Jakarta", "2027-02-28"),  # on the day it is celebrated
    (date(1990, 12, 31), "2027-01-01T06:00+07:00", "Asia/Jakarta", "2027-12-31"),  # the day after: a year ahead
    (date(1990, 12, 6), "2026-12-06T12:00+00:00", "Pacific/Kiritimati", "2027-12-06"),  # already the 7th there
    (date(1990, 12, 6), "2026-12-06T10:00+00:00", "Pacific/Pago_Pago", "2026-12-06"),  # still the 5th there
    (None, "2026-12-06T10:00+07:00", "Asia/Jakarta", "2026-12-09"),  # no birthday: days_before (3) ahead
]


@pytest.mark.parametrize(("birthday", "at", "zone", "shown"), NEXT_BIRTHDAYS)
def test_a_rendering_outside_planning_celebrates_the_customers_next_birthday_on_their_clock(
    birthday: date | None, at: str, zone: str, shown: str
) -> None:
    settings = settings_from_dict({"campaigns": {"birthday": {"days_before": 3}}}, source="t.toml")
    customer = CustomerSnapshot(1, "C1", "c1@example.com", "Siti", Locale.ID, zone, birthday, True)
    assert birthday_to_show(settings, customer, datetime.fromisoformat(at)) == shown

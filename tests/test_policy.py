"""The contact policy: tables of cases for caps, quiet hours, holdouts and the decision."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from worker.core.policy import (
    CapWindow,
    ContactPolicy,
    DeferUntil,
    Due,
    QuietHours,
    SendNow,
    Skip,
    arrange,
    decide,
    in_holdout,
    next_allowed,
    next_free_slot,
    priorities_from_order,
    waits_for,
    zone_of,
)
from worker.domain import SkipReason

JKT = ZoneInfo("Asia/Jakarta")
T0 = datetime(2027, 2, 26, 3, 0, tzinfo=UTC)  # 10:00 in Jakarta
CAPS = (CapWindow(1, 3), CapWindow(4, 30))


def d(days: float) -> timedelta:
    return timedelta(days=days)


# (name, sent offsets from T0 in days, expected slot offset from T0 in days)
SLOT_CASES = [
    ("nothing sent: now", (), 0),
    ("one sent 4 days ago: now", (-4,), 0),
    ("one sent exactly 3 days ago: the window has just rolled over", (-3,), 0),
    ("one sent 3 days minus a minute ago: a minute later", (-3 + 1 / 1440,), 1 / 1440),
    ("one sent yesterday: two days from now", (-1,), 2),
    ("one sent today: three days from now", (0,), 3),
    ("four in 30 days, last 5 days ago: when the oldest leaves the 30-day window", (-29, -20, -10, -5), 1),
    ("four in 30 days spread evenly", (-27, -18, -9, -4), 3),
    ("five old ones outside both windows", (-60, -50, -45, -40, -31), 0),
    ("the 3-day wait lands inside a full 30-day window", (-28.5, -20, -10, -1), 2),
]


@pytest.mark.parametrize(("name", "sent", "slot"), SLOT_CASES, ids=[c[0] for c in SLOT_CASES])
def test_next_free_slot(name: str, sent: tuple[float, ...], slot: float) -> None:
    got = next_free_slot([T0 + d(x) for x in sent], T0, CAPS)
    assert got == T0 + d(slot)


def test_cap_counts_the_whole_window_across_a_leap_day() -> None:
    # 4 per 30 days: 2028 has a 29 February, so 30 days after 10 Feb is 11 March, not 12 March
    sent = [datetime(2028, 2, 10, 3, tzinfo=UTC), datetime(2028, 2, 20, 3, tzinfo=UTC),
            datetime(2028, 2, 28, 3, tzinfo=UTC), datetime(2028, 3, 5, 3, tzinfo=UTC)]
    assert next_free_slot(sent, datetime(2028, 3, 8, 3, tzinfo=UTC), CAPS) == datetime(2028, 3, 11, 3, tzinfo=UTC)


QUIET = QuietHours(time(21, 0), time(8, 0))
# (name, instant, zone, expected instant)
QUIET_CASES = [
    ("10:00 in Jakarta: allowed", datetime(2027, 2, 28, 3, 0, tzinfo=UTC), "Asia/Jakarta",
     datetime(2027, 2, 28, 3, 0, tzinfo=UTC)),
    ("20:59 in Jakarta: allowed", datetime(2027, 2, 28, 13, 59, tzinfo=UTC), "Asia/Jakarta",
     datetime(2027, 2, 28, 13, 59, tzinfo=UTC)),
    ("21:00 in Jakarta: waits until 08:00 tomorrow", datetime(2027, 2, 28, 14, 0, tzinfo=UTC), "Asia/Jakarta",
     datetime(2027, 3, 1, 1, 0, tzinfo=UTC)),
    ("02:00 in Jakarta: waits until 08:00 the same day", datetime(2027, 2, 27, 19, 0, tzinfo=UTC),
     "Asia/Jakarta", datetime(2027, 2, 28, 1, 0, tzinfo=UTC)),
    ("08:00 sharp: allowed", datetime(2027, 2, 28, 1, 0, tzinfo=UTC), "Asia/Jakarta",
     datetime(2027, 2, 28, 1, 0, tzinfo=UTC)),
    ("the same instant is 10:00 in Jakarta but 12:00 in Jayapura: allowed there too",
     datetime(2027, 2, 28, 3, 0, tzinfo=UTC), "Asia/Jayapura", datetime(2027, 2, 28, 3, 0, tzinfo=UTC)),
    ("20:30 in Jakarta is 22:30 in Jayapura: waits for Jayapura's morning",
     datetime(2027, 2, 28, 13, 30, tzinfo=UTC), "Asia/Jayapura", datetime(2027, 2, 28, 23, 0, tzinfo=UTC)),
    ("late on 28 Feb in a leap year waits until 29 Feb", datetime(2028, 2, 28, 15, 0, tzinfo=UTC),
     "Asia/Jakarta", datetime(2028, 2, 29, 1, 0, tzinfo=UTC)),
    ("the night before Europe's spring DST change ends at 08:00 summer time",
     datetime(2027, 3, 27, 23, 30, tzinfo=UTC), "Europe/Berlin", datetime(2027, 3, 28, 6, 0, tzinfo=UTC)),
    ("an unknown zone falls back to the shop's", datetime(2027, 2, 28, 14, 0, tzinfo=UTC), "Mars/Olympus",
     datetime(2027, 3, 1, 1, 0, tzinfo=UTC)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "at", "zone", "expected"), QUIET_CASES, ids=[c[0] for c in QUIET_CASES])
def test_quiet_hours(name: str, at: datetime, zone: str, expected: datetime) -> None:
    assert next_allowed(at, zone_of(zone, "Asia/Jakarta"), QUIET) == expected


def hm(text: str) -> time:
    return time.fromisoformat(text)


# (name, quiet hours, instant, zone, expected instant): nights on which the clocks change
DST_QUIET_CASES = [
    ("New York, clocks back at 02:00: 01:10 the second time waits for 01:30 the second time",
     ("22:00", "01:30"), datetime(2026, 11, 1, 6, 10, tzinfo=UTC), "America/New_York",
     datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
    ("New York, clocks back: 01:10 the first time ends at 01:30 the first time",
     ("22:00", "01:30"), datetime(2026, 11, 1, 5, 10, tzinfo=UTC), "America/New_York",
     datetime(2026, 11, 1, 5, 30, tzinfo=UTC)),
    ("Chatham (+12:45), clocks back 03:45 to 02:45: 02:50 the second time waits for 03:00 the second time",
     ("21:00", "03:00"), datetime(2026, 4, 4, 14, 5, tzinfo=UTC), "Pacific/Chatham",
     datetime(2026, 4, 4, 14, 15, tzinfo=UTC)),
    ("Lord Howe, clocks back half an hour at 02:00: 01:35 the second time waits for 01:45 the second time",
     ("21:00", "01:45"), datetime(2027, 4, 3, 15, 5, tzinfo=UTC), "Australia/Lord_Howe",
     datetime(2027, 4, 3, 15, 15, tzinfo=UTC)),
    ("New York, clocks forward 02:00 to 03:00: an end of 02:30 does not exist, quiet hours end at the jump",
     ("22:00", "02:30"), datetime(2026, 3, 8, 4, 0, tzinfo=UTC), "America/New_York",
     datetime(2026, 3, 8, 7, 0, tzinfo=UTC)),
    ("Lord Howe, clocks forward half an hour at 02:00: an end of 02:15 is the jump, 02:30 (+11)",
     ("21:00", "02:15"), datetime(2026, 10, 3, 12, 0, tzinfo=UTC), "Australia/Lord_Howe",
     datetime(2026, 10, 3, 15, 30, tzinfo=UTC)),
    ("Lord Howe, the default night on which the clocks go forward: 08:00 (+11)",
     ("21:00", "08:00"), datetime(2026, 10, 3, 12, 0, tzinfo=UTC), "Australia/Lord_Howe",
     datetime(2026, 10, 3, 21, 0, tzinfo=UTC)),
    ("London, the default night on which the clocks go back: 01:30 the second time waits for 08:00 GMT",
     ("21:00", "08:00"), datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "Europe/London",
     datetime(2026, 10, 25, 8, 0, tzinfo=UTC)),
    ("Kathmandu (+5:45): 07:59 waits a minute", ("21:00", "08:00"), datetime(2027, 1, 1, 2, 14, tzinfo=UTC),
     "Asia/Kathmandu", datetime(2027, 1, 1, 2, 15, tzinfo=UTC)),
    ("Kiritimati (+14): 23:00 on 31 Dec waits for 08:00 on 1 Jan", ("21:00", "08:00"),
     datetime(2027, 12, 31, 9, 0, tzinfo=UTC), "Pacific/Kiritimati", datetime(2027, 12, 31, 18, 0, tzinfo=UTC)),
    ("Pago Pago (-11): 13:30 in a 13:00-14:00 lunch break", ("13:00", "14:00"),
     datetime(2027, 1, 1, 0, 30, tzinfo=UTC), "Pacific/Pago_Pago", datetime(2027, 1, 1, 1, 0, tzinfo=UTC)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "hours", "at", "zone", "expected"), DST_QUIET_CASES,
                         ids=[c[0] for c in DST_QUIET_CASES])
def test_quiet_hours_on_the_nights_the_clocks_change(name: str, hours: tuple[str, str], at: datetime, zone: str,
                                                     expected: datetime) -> None:
    assert next_allowed(at, ZoneInfo(zone), QuietHours(hm(hours[0]), hm(hours[1]))) == expected


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London", "Australia/Lord_Howe", "Pacific/Chatham",
                                  "America/Santiago", "Asia/Beirut", "Africa/Cairo", "America/Havana"])
def test_quiet_hours_never_end_inside_themselves_around_a_clock_change(zone: str) -> None:
    """Every 5 minutes for two days around each of the zone's clock changes in 2026, for windows whose ends fall
    on either side of, inside, and on the changes: ``next_allowed`` is ``at`` outside quiet hours, and otherwise a
    later instant outside them, never more than the window's length plus the change later."""
    tz = ZoneInfo(zone)
    windows = [QuietHours(hm(a), hm(b)) for a, b in (("21:00", "08:00"), ("13:00", "14:00"), ("22:00", "01:30"),
               ("22:00", "02:30"), ("21:00", "03:00"), ("01:30", "02:30"), ("23:30", "00:15"), ("00:00", "01:00"))]
    changes = []
    t = datetime(2026, 1, 1, tzinfo=UTC)
    while t.year == 2026:
        if (t + timedelta(hours=1)).astimezone(tz).utcoffset() != t.astimezone(tz).utcoffset():
            changes.append(t)
        t += timedelta(hours=1)
    assert changes
    for change in changes:
        for quiet in windows:
            for minutes in range(-24 * 60, 24 * 60, 5):
                at = change + timedelta(minutes=minutes)
                got = next_allowed(at, tz, quiet)
                inside = quiet.contains(at.astimezone(tz).time())
                assert (got == at) == (not inside), (quiet, at)
                assert got >= at and not quiet.contains(got.astimezone(tz).time()), (quiet, at, got)
                assert got - at <= timedelta(hours=26), (quiet, at, got)


def test_quiet_hours_within_one_day_and_none() -> None:
    lunch = QuietHours(time(12, 0), time(13, 0))
    assert next_allowed(datetime(2027, 1, 1, 5, 30, tzinfo=UTC), JKT, lunch) == datetime(2027, 1, 1, 6, tzinfo=UTC)
    assert next_allowed(datetime(2027, 1, 1, 6, 0, tzinfo=UTC), JKT, lunch) == datetime(2027, 1, 1, 6, tzinfo=UTC)
    never = QuietHours(time(0, 0), time(0, 0))
    assert next_allowed(T0, JKT, never) == T0
    assert next_allowed(T0, JKT, None) == T0


def test_holdout_is_deterministic_and_close_to_its_share() -> None:
    held = [in_holdout(i, "birthday", 0.1) for i in range(1, 20_001)]
    assert held == [in_holdout(i, "birthday", 0.1) for i in range(1, 20_001)]
    assert 0.099 < sum(held) / len(held) < 0.101
    other = [in_holdout(i, "winback", 0.1) for i in range(1, 20_001)]
    assert held != other, "each campaign has its own holdout group"
    assert not any(in_holdout(i, "birthday", 0.0) for i in range(1000))
    assert all(in_holdout(i, "birthday", 1.0) for i in range(1000))


@pytest.mark.parametrize("share", [0.05, 0.1, 0.5])
def test_holdout_groups_are_their_share_of_any_run_of_ids_and_independent_across_campaigns(share: float) -> None:
    """Customers imported together get consecutive ids: each block of 1,000 has its share held out, and two
    campaigns' groups overlap as independent draws would (share**2), for every pair of shipped campaigns."""
    campaigns = ("birthday", "feedback", "winback", "loyalty", "new_products")
    ids = range(1, 100_001)
    groups = {c: {i for i in ids if in_holdout(i, c, share)} for c in campaigns}
    for campaign, group in groups.items():
        blocks = [sum(1 for i in range(start, start + 1000) if i in group) for start in range(1, 100_001, 1000)]
        assert all(abs(n - share * 1000) <= 8 for n in blocks), (campaign, min(blocks), max(blocks))
    for n, first in enumerate(campaigns):
        for second in campaigns[n + 1:]:
            both = len(groups[first] & groups[second]) / len(ids)
            assert abs(both - share**2) < 0.1 * share**2, (first, second, both)


POLICY = ContactPolicy(caps=CAPS, quiet=QUIET, priorities=priorities_from_order(
    ("birthday", "feedback", "winback", "loyalty", "new_products")))


def due(campaign: str, expires_in_days: float = 14) -> Due:
    return Due(f"{campaign}:C1", campaign, POLICY.priority(campaign), T0 + d(expires_in_days))


# (name, message, sent offsets, competing, expected decision)
DECIDE_CASES = [
    ("nothing sent, nothing competing: send now", due("winback"), (), (), SendNow()),
    ("sent yesterday: defer to the next slot", due("winback"), (-1,), (), DeferUntil(T0 + d(2), "cap")),
    ("sent yesterday, expires tomorrow: expired", due("winback", 1), (-1,), (), Skip(SkipReason.EXPIRED)),
    ("the next slot is exactly the expiry: expired", due("winback", 2), (-1,), (), Skip(SkipReason.EXPIRED)),
    ("already expired", due("winback", 0), (), (), Skip(SkipReason.EXPIRED)),
    ("birthday beats win-back on the same day", due("birthday"), (), (due("winback"),), SendNow()),
    ("win-back loses to birthday on the same day", due("winback"), (), (due("birthday"),),
     DeferUntil(T0 + d(3), "cap")),
    ("feedback loses to birthday too", due("feedback"), (), (due("birthday"), due("winback")),
     DeferUntil(T0 + d(3), "cap")),
    ("new products lose to loyalty", due("new_products"), (), (due("loyalty"),), DeferUntil(T0 + d(3), "cap")),
    ("a competitor that cannot be sent does not take the slot", due("winback"), (-1,) * 0,
     (Due("birthday:C1", "birthday", 50, T0),), SendNow()),
]  # fmt: skip


@pytest.mark.parametrize(("name", "message", "sent", "competing", "expected"), DECIDE_CASES,
                         ids=[c[0] for c in DECIDE_CASES])
def test_decide(name: str, message: Due, sent: tuple[float, ...], competing: tuple[Due, ...],
                expected: object) -> None:
    assert decide(message, [T0 + d(x) for x in sent], competing, T0, POLICY, JKT) == expected


def test_decide_waits_for_quiet_hours_to_end() -> None:
    late = datetime(2027, 2, 26, 15, 0, tzinfo=UTC)  # 22:00 in Jakarta
    assert decide(due("winback"), [], [], late, POLICY, JKT) == DeferUntil(
        datetime(2027, 2, 27, 1, 0, tzinfo=UTC), "quiet_hours")


def test_a_cap_slot_inside_quiet_hours_moves_to_the_morning() -> None:
    sent = [datetime(2027, 2, 23, 15, 0, tzinfo=UTC)]  # 22:00 local (sent before quiet hours existed)
    assert decide(due("winback"), sent, [], T0, POLICY, JKT) == DeferUntil(
        datetime(2027, 2, 27, 1, 0, tzinfo=UTC), "cap")


@pytest.mark.parametrize(("expires_in_hours", "expected"), [
    (23, DeferUntil(T0 + timedelta(hours=22), "cap")),
    (22, Skip(SkipReason.EXPIRED)),  # the morning is exactly the expiry
    (20, Skip(SkipReason.EXPIRED)),  # the free slot (22:00) is before the expiry, the morning after it
])  # fmt: skip
def test_a_cap_slot_in_quiet_hours_waits_for_the_morning_unless_that_is_past_the_expiry(
    expires_in_hours: int, expected: object
) -> None:
    sent = [T0 + timedelta(hours=12) - d(3)]  # frees the slot at 22:00 in Jakarta; quiet hours end 08:00
    message = Due("winback:C1", "winback", POLICY.priority("winback"), T0 + timedelta(hours=expires_in_hours))
    assert decide(message, sent, [], T0, POLICY, JKT) == expected


def test_three_campaigns_on_one_day_go_out_one_slot_apart() -> None:
    """Birthday today, feedback three days later, win-back three days after that."""
    messages = [due("winback", 30), due("birthday", 30), due("feedback", 30)]
    sent: list[datetime] = []
    when: dict[str, datetime] = {}
    now = T0
    while len(when) < 3:
        pending = [m for m in messages if m.campaign not in when]
        for key, decision in arrange(pending, sent, now, POLICY, JKT).items():
            if isinstance(decision, SendNow):
                when[key.split(":")[0]] = now
                sent.append(now)
        now += timedelta(hours=1)
    assert when == {"birthday": T0, "feedback": T0 + d(3), "winback": T0 + d(6)}


def test_holdout_positions_are_the_arithmetic_sql_reproduces() -> None:
    """``(id * multiplier + offset) mod (2**31 - 1)``, factors from SHA-256 of the campaign, below
    ``int(share * modulus)``: integers that SQL computes without overflowing 64 bits."""
    import hashlib

    from worker.core.policy import HOLDOUT_MODULUS, holdout_factors, holdout_position, holdout_threshold

    digest = hashlib.sha256(b"kembali-holdout\0winback").digest()
    multiplier, offset = holdout_factors("winback")
    assert multiplier == 1 + int.from_bytes(digest[:8], "big") % (HOLDOUT_MODULUS - 1)
    assert offset == int.from_bytes(digest[8:16], "big") % HOLDOUT_MODULUS
    assert holdout_position(12345, "winback") == (12345 * multiplier + offset) % HOLDOUT_MODULUS
    assert holdout_position(HOLDOUT_MODULUS + 7, "winback") == holdout_position(7, "winback")
    assert [holdout_threshold(s) for s in (0.0, 0.5, 1.0, 2.0)] == [0, HOLDOUT_MODULUS // 2, HOLDOUT_MODULUS,
                                                                      HOLDOUT_MODULUS]  # fmt: skip
    for i in range(500):
        position = holdout_position(i, "loyalty")
        assert 0 <= position < HOLDOUT_MODULUS
        assert in_holdout(i, "loyalty", 0.05) == (position < holdout_threshold(0.05))


def test_a_message_waits_for_a_birthday_ahead_only_when_it_would_leave_it_no_slot_before_it_expires() -> None:
    now = datetime(2027, 2, 25, 15, 30, tzinfo=UTC)  # 22:30 in Jakarta
    birthday = now + timedelta(minutes=90)  # its window opens at midnight
    on_the_day = (birthday, birthday + d(1))  # days_before = 0: it expires at the end of the birthday
    three_days = (birthday, birthday + d(4))  # days_before = 3
    one_per_3_days = (CapWindow(1, 3),)
    assert waits_for([on_the_day], [], now, one_per_3_days) == birthday
    # pushed three days later it still goes before the birthday: nothing to wait for
    assert waits_for([three_days], [], now, one_per_3_days) is None
    # ... unless that slot falls in the customer's quiet hours, whose end is past its expiry
    quiet = QuietHours(time(21, 0), time(8, 0))
    late = (birthday, now + d(3) + timedelta(hours=1))  # expires at 23:30 local, three days on
    assert waits_for([late], [], now, one_per_3_days) is None
    assert waits_for([late], [], now, one_per_3_days, JKT, quiet) == birthday
    # the birthday cannot go at midnight anyway (something was sent yesterday): nothing to wait for
    assert waits_for([on_the_day], [now - timedelta(days=1)], now, one_per_3_days) is None
    # nor for one that could not go before it expires even without this message (quiet until 08:00, gone at 01:00)
    assert waits_for([(birthday, birthday + timedelta(hours=1))], [], now, one_per_3_days, JKT, quiet) is None
    # a cap with room for both
    assert waits_for([on_the_day], [], now, (CapWindow(2, 1),)) is None
    assert waits_for([], [], now, one_per_3_days) is None

"""The contact policy end to end: real SQLite file, real SMTP server (aiosmtpd), a clock moved by hand.

Given a customer due a birthday offer, a feedback request and a win-back step on the same day,
when Kembali runs a cycle every morning, then the customer gets one email a day at most: the
birthday offer first, the others later, each within the cap; quiet hours and "ordered since"
are honoured right before sending.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.db_fixtures import migrate
from tests.smtp_server import ACCEPT, Behaviour, RecordingServer
from worker.adapters import db, opstore, shop
from worker.adapters.store import Store
from worker.app import Deps
from worker.asyncstore import AsyncStore
from worker.commands import running
from worker.config import Settings, settings_from_dict
from worker.domain import CustomerRecord, Locale, OrderRecord, OrderStatus, ProductRecord
from worker.pipeline import plan
from worker.scheduler import next_fire_time
from worker.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
DAY0 = datetime(2027, 2, 26, 3, 0, tzinfo=UTC)
"""10:00 in Jakarta, on the customer's birthday."""


def settings_for(tmp_path: Path, server: RecordingServer) -> Settings:
    return settings_from_dict({
        "database": {"url": f"sqlite:///{tmp_path / 'kembali.db'}"},
        "smtp": {"host": "127.0.0.1", "port": server.port, "tls": "none", "timeout_seconds": 5.0, "pool_size": 2},
        "templates": {"dir": str(ROOT / "templates" / "email")},
        "campaigns": {
            "winback": {"expires_after_days": 14, "steps": [
                {"days": 45, "template": "winback-reminder"},
                {"days": 75, "template": "winback", "coupon_code": "KEMBALI10", "coupon_percent": 10}]},
            "birthday": {"enabled": True, "days_before": 0},
            "feedback": {"enabled": True, "days_after": 7, "lookback_days": 14, "expires_after_days": 7},
            "new_products": {"enabled": False},
            "loyalty": {"enabled": False},
        },
        "policy": {"frequency_caps": [[1, 3], [4, 30]], "quiet_hours_start": "21:00", "quiet_hours_end": "08:00"},
    })  # fmt: skip


def given_a_shop(settings: Settings, customers: list[tuple[str, date | None]], orders: list[OrderRecord]) -> None:
    migrate(settings.database_url)  # (a new SQLite file: a copy of the session's migrated one)
    engine = db.create_engine(settings.database_url)
    shop.upsert_customers(engine, [
        CustomerRecord(ext, f"{ext.lower()}@example.com", f"Siti {ext}", Locale.EN, "Asia/Jakarta", born, True,
                       "opt_in", "checkout")
        for ext, born in customers
    ], DAY0)  # fmt: skip
    shop.upsert_orders(engine, orders, DAY0)
    engine.dispose()


def subjects(server: RecordingServer) -> list[str]:
    return [str(make_header(decode_header(message_from_bytes(m.data)["Subject"]))) for m in server.messages]


def cycle_at(settings: Settings, clock: FakeClock, when: datetime) -> running.CycleReport:
    clock.set(when)
    deps = Deps.build(settings)
    deps.clock = clock
    try:
        return asyncio.run(running.cycle(deps))
    finally:
        deps.close()


def each_morning(settings: Settings, server: RecordingServer, days: range) -> dict[int, list[str]]:
    """The subjects received on each of ``days`` (counted from DAY0), Kembali running one cycle each morning."""
    clock = FakeClock(DAY0)
    received_on: dict[int, list[str]] = {}
    for day in days:
        before = len(server.messages)
        cycle_at(settings, clock, DAY0 + timedelta(days=day))
        received_on[day] = subjects(server)[before:]
    return received_on


def a_week_from_a_birthday_with_one_order(
    settings: Settings, server: RecordingServer, order_age: timedelta
) -> tuple[dict[int, list[str]], dict[tuple[str, int], tuple[str, str | None]]]:
    """C1, whose birthday is DAY0 and whose only order (delivered) was placed ``order_age`` before it, and Kembali
    running each morning for a week: the subjects received each day, and each (campaign, step)'s status and skip
    reason in the ledger then."""
    given_a_shop(settings, [("C1", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - order_age, None, 1_000_000, "IDR"),
    ])  # fmt: skip
    received_on = each_morning(settings, server, range(7))
    store = Store.from_url(settings.database_url)
    try:
        rows = store.messages(limit=10)
    finally:
        store.close()
    return received_on, {(r["campaign"], r["step"]): (r["status"], r["skip_reason"]) for r in rows}


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "a-test-key-of-enough-length")


def given_a_customer_due_three_campaigns(tmp_path: Path, server: RecordingServer) -> Settings:
    """C1, whose birthday is DAY0, with one order placed 50 days before it (win-back step 1 is due) and delivered
    8 days before it (feedback is due)."""
    settings = settings_for(tmp_path, server)
    given_a_shop(settings, [("C1", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), DAY0 - timedelta(days=8),
                    24_900_000, "IDR"),
    ])  # fmt: skip
    return settings


def test_birthday_first_then_feedback_then_winback_one_slot_apart(tmp_path: Path, smtp_server: RecordingServer) -> None:
    settings = given_a_customer_due_three_campaigns(tmp_path, smtp_server)
    received_on = each_morning(settings, smtp_server, range(8))

    assert received_on[0] == ["Happy birthday, Siti! Enjoy 15% off, on us"]
    assert received_on[1] == received_on[2] == []
    assert received_on[3] == ["How was your order INV-1, Siti?"]
    assert received_on[4] == received_on[5] == []
    assert received_on[6] == ["How are you, Siti?"]  # win-back step 1 (the order has no product lines)
    assert received_on[7] == []
    assert len(smtp_server.messages) == 3, "three emails in total, each planned once"
    store = Store.from_url(settings.database_url)
    try:
        rows = {r["campaign"]: r for r in store.messages(limit=10)}
    finally:
        store.close()
    assert {c: (r["status"], r["sent_at"]) for c, r in rows.items()} == {
        "birthday": ("sent", DAY0),
        "feedback": ("sent", DAY0 + timedelta(days=3)),
        "winback": ("sent", DAY0 + timedelta(days=6)),
    }


def test_a_send_left_uncertain_takes_its_slot_under_the_cap(tmp_path: Path, smtp_server: RecordingServer) -> None:
    # Given the customer of the test above, whose server takes the birthday offer and then drops the connection
    # without replying (so the ledger cannot know whether it arrived: `uncertain`, never resent)
    settings = given_a_customer_due_three_campaigns(tmp_path, smtp_server)
    clock = FakeClock(DAY0)
    smtp_server.on("c1@example.com", Behaviour(drop_after_dot=True))
    cycle_at(settings, clock, DAY0)
    smtp_server.on("c1@example.com", ACCEPT)
    # When Kembali runs every morning after that
    received_on: dict[int, list[str]] = {}
    for day in range(1, 4):
        before = len(smtp_server.messages)
        cycle_at(settings, clock, DAY0 + timedelta(days=day))
        received_on[day] = subjects(smtp_server)[before:]
    # Then the birthday offer, which may well have arrived (the server stored it), counts as an email: the
    # feedback request waits for the next free slot, three days on, as it would after a send that was confirmed
    assert received_on == {1: [], 2: [], 3: ["How was your order INV-1, Siti?"]}
    store = Store.from_url(settings.database_url)
    try:
        statuses = {r["campaign"]: r["status"] for r in store.messages(limit=10)}
    finally:
        store.close()
    assert statuses["birthday"] == "uncertain"


def test_a_message_that_cannot_get_a_slot_before_it_expires_is_skipped_expired(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    base = settings_for(tmp_path, smtp_server)
    # feedback requests expire after one day: the birthday takes today's slot, the next is in 3 days
    settings = dataclasses.replace(base, campaigns=dataclasses.replace(
        base.campaigns, feedback=dataclasses.replace(base.campaigns.feedback, expires_after_days=1),
        winback=dataclasses.replace(base.campaigns.winback, enabled=False)))  # fmt: skip
    given_a_shop(settings, [("C1", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=10), DAY0 - timedelta(days=8),
                    1_000_000, "IDR"),
    ])  # fmt: skip
    report = cycle_at(settings, FakeClock(DAY0), DAY0)
    assert report.dispatched.outcomes == {"sent": 1, "skipped:expired": 1}
    assert subjects(smtp_server) == ["Happy birthday, Siti! Enjoy 15% off, on us"]


def test_quiet_hours_hold_mail_until_morning_in_the_customers_zone(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    settings = settings_for(tmp_path, smtp_server)
    given_a_shop(settings, [("C1", None)], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), None, 1_000_000, "IDR"),
    ])  # fmt: skip
    clock = FakeClock(DAY0)
    night = datetime(2027, 2, 26, 15, 0, tzinfo=UTC)  # 22:00 in Jakarta
    report = cycle_at(settings, clock, night)
    assert report.dispatched.outcomes == {"deferred:quiet_hours": 1}
    assert smtp_server.messages == []
    cycle_at(settings, clock, datetime(2027, 2, 27, 0, 59, tzinfo=UTC))  # 07:59
    assert smtp_server.messages == []
    cycle_at(settings, clock, datetime(2027, 2, 27, 1, 0, tzinfo=UTC))  # 08:00
    assert len(smtp_server.messages) == 1


def test_a_winback_step_is_not_sent_to_a_customer_who_ordered_since_planning(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    settings = settings_for(tmp_path, smtp_server)
    given_a_shop(settings, [("C1", None)], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), None, 1_000_000, "IDR"),
    ])  # fmt: skip
    clock = FakeClock(DAY0)
    night = datetime(2027, 2, 26, 15, 0, tzinfo=UTC)  # planned at night: waits for the morning
    cycle_at(settings, clock, night)
    engine = db.create_engine(settings.database_url)
    shop.upsert_orders(engine, [OrderRecord("INV-2", "C1", OrderStatus.PAID, night + timedelta(hours=1), None,
                                            500_000, "IDR")], night)  # fmt: skip
    engine.dispose()
    report = cycle_at(settings, clock, datetime(2027, 2, 27, 1, 0, tzinfo=UTC))
    assert report.dispatched.outcomes == {"skipped:ordered_since": 1}
    assert smtp_server.messages == []


def test_two_customer_records_with_one_mailbox_share_its_cap(tmp_path: Path, smtp_server: RecordingServer) -> None:
    """Guest checkouts gave one person two customer records, with their address in two cases: each record is a
    one-time buyer due win-back step 1 today, but their inbox gets one email today and the other 3 days later."""
    settings = settings_for(tmp_path, smtp_server)
    given_a_shop(settings, [("C1", None), ("C2", None), ("C3", None)], [
        OrderRecord(f"INV-{n}", f"C{n}", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), None, 1_000_000, "IDR")
        for n in (1, 2, 3)
    ])  # fmt: skip
    engine = db.create_engine(settings.database_url)
    with engine.begin() as conn:  # C2 as the guest checkout typed it; C3 is someone else
        conn.exec_driver_sql("UPDATE customer SET email = 'C1@Example.com' WHERE external_id = 'C2'")
    engine.dispose()
    clock = FakeClock(DAY0)

    received_on: dict[int, list[str]] = {}
    for day in range(4):
        before = len(smtp_server.messages)
        cycle_at(settings, clock, DAY0 + timedelta(days=day))
        received_on[day] = sorted(to for m in smtp_server.messages[before:] for to in m.rcpt_tos)

    first, c3 = received_on[0]
    assert c3 == "c3@example.com" and first in ("c1@example.com", "C1@Example.com")
    assert received_on[1] == received_on[2] == []
    assert received_on[3] == [({"c1@example.com", "C1@Example.com"} - {first}).pop()], "the other record, in turn"


def test_a_birthday_planned_ahead_keeps_its_slot_when_quiet_hours_are_off(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a shop without quiet hours, and C1, whose birthday is DAY0 and whose only order was placed 50 days
    # before it (win-back step 1 is due)
    base = settings_for(tmp_path, smtp_server)
    settings = dataclasses.replace(base, policy=dataclasses.replace(base.policy, quiet_hours_start="00:00",
                                                                    quiet_hours_end="00:00"))  # fmt: skip
    given_a_shop(settings, [("C1", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), DAY0 - timedelta(days=40),
                    1_000_000, "IDR"),
    ])  # fmt: skip
    # When a cycle runs at 22:30 in Jakarta the evening before (the birthday is planned, due at midnight) and
    # another the next morning
    evening = datetime(2027, 2, 25, 15, 30, tzinfo=UTC)
    clock = FakeClock(evening)
    report = cycle_at(settings, clock, evening)
    # Then the win-back, which would take the one slot of three days, waits for the birthday offer
    assert report.dispatched.outcomes == {"deferred:birthday": 1}
    assert smtp_server.messages == []
    cycle_at(settings, clock, DAY0)
    assert subjects(smtp_server) == ["Happy birthday, Siti! Enjoy 15% off, on us"]
    cycle_at(settings, clock, DAY0 + timedelta(days=3))
    assert subjects(smtp_server)[1:] == ["How are you, Siti?"]


def test_a_birthday_planned_ahead_keeps_its_slot_from_two_lower_messages_decided_in_one_run(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a shop without quiet hours whose cap is two emails in three days, and C1, whose birthday is DAY0, due a
    # feedback request and a win-back step the evening before
    base = given_a_customer_due_three_campaigns(tmp_path, smtp_server)
    settings = dataclasses.replace(base, policy=dataclasses.replace(
        base.policy, quiet_hours_start="00:00", quiet_hours_end="00:00", frequency_caps=((2, 3),)))  # fmt: skip
    # When a cycle runs at 22:30 in Jakarta the evening before (the birthday is planned, due at midnight)
    evening = datetime(2027, 2, 25, 15, 30, tzinfo=UTC)
    clock = FakeClock(evening)
    report = cycle_at(settings, clock, evening)
    # Then the feedback request takes one of the two slots, and the win-back, decided after it in the same run
    # (the ledger shows neither yet), waits for the birthday offer rather than take the other
    assert report.dispatched.outcomes == {"sent": 1, "deferred:birthday": 1}, report.dispatched.outcomes
    assert subjects(smtp_server) == ["How was your order INV-1, Siti?"]
    # And at midnight the birthday offer goes out, within the cap
    cycle_at(settings, clock, datetime(2027, 2, 25, 17, 0, 30, tzinfo=UTC))
    assert subjects(smtp_server)[1:] == ["Happy birthday, Siti! Enjoy 15% off, on us"]


def test_a_birthday_no_pass_has_planned_yet_keeps_its_slot_from_an_email_the_evening_before(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given C1, whose birthday is DAY0 (an offer on the day itself, days_before = 0), due a feedback request and a
    # win-back step since the morning before, in a shop whose cap is one email in three days
    settings = given_a_customer_due_three_campaigns(tmp_path, smtp_server)
    # When a cycle runs at 20:00 in Jakarta the evening before (before quiet hours; too early for any pass to plan
    # the birthday offer, whose window opens at midnight)
    evening = datetime(2027, 2, 25, 13, 0, tzinfo=UTC)
    clock = FakeClock(evening)
    report = cycle_at(settings, clock, evening)
    # Then neither takes the birthday offer's slot (sent that evening, either would have left the offer capped
    # until after the birthday, and skipped as expired)
    assert report.dispatched.outcomes == {"deferred:birthday": 2}, report.dispatched.outcomes
    assert smtp_server.messages == []
    # And the next morning the birthday offer goes out, the others later within the cap
    for day in range(7):
        cycle_at(settings, clock, DAY0 + timedelta(days=day))
    assert subjects(smtp_server) == ["Happy birthday, Siti! Enjoy 15% off, on us", "How was your order INV-1, Siti?",
                                     "How are you, Siti?"]  # fmt: skip


@pytest.mark.parametrize("why", ["held out of the birthday campaign", "this year's offer already sent"])
def test_an_email_does_not_wait_for_a_birthday_offer_that_will_not_be_sent(
    tmp_path: Path, smtp_server: RecordingServer, why: str
) -> None:
    # Given C1, whose birthday is DAY0, due a feedback request and a win-back step the evening before, and no
    # birthday offer to come for them
    settings = given_a_customer_due_three_campaigns(tmp_path, smtp_server)
    engine = db.create_engine(settings.database_url)
    if why.startswith("held out"):  # customer 1 sits at 0.72 of the birthday campaign's holdout order
        birthday = dataclasses.replace(settings.campaigns.birthday, holdout_share=0.75)
        settings = dataclasses.replace(settings, campaigns=dataclasses.replace(settings.campaigns, birthday=birthday))
    else:  # sent early in the year by hand (a resend), say: the ledger has this year's key
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO message (dedupe_key, campaign, step, priority, customer_id, email, status, due_at,"
                " expires_at, next_attempt_at, attempts, resent_after_attempts, payload, created_at, updated_at)"
                " VALUES ('birthday:C1:2027', 'birthday', 1, 100, 1, 'c1@example.com', 'skipped', :t, :t, :t, 0, 0,"
                " '{}', :t, :t)"), {"t": datetime(2027, 1, 2, tzinfo=UTC)})  # fmt: skip
    engine.dispose()
    # When a cycle runs at 20:00 in Jakarta the evening before
    evening = datetime(2027, 2, 25, 13, 0, tzinfo=UTC)
    report = cycle_at(settings, FakeClock(evening), evening)
    # Then the feedback request goes out (the win-back is capped behind it)
    assert report.dispatched.outcomes["sent"] == 1, (why, report.dispatched.outcomes)
    assert subjects(smtp_server) == ["How was your order INV-1, Siti?"]


def test_an_email_does_not_wait_for_a_birthday_offer_it_only_moves_later_within_its_window(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given C1, whose birthday is DAY0 (26 February), offered from three days before it (days_before = 3), and
    # whose win-back step is due
    base = given_a_customer_due_three_campaigns(tmp_path, smtp_server)
    birthday = dataclasses.replace(base.campaigns.birthday, days_before=3)
    settings = dataclasses.replace(base, campaigns=dataclasses.replace(base.campaigns, birthday=birthday))
    # When cycles run at 20:00 in Jakarta from the evening before the offer's window opens
    evening = datetime(2027, 2, 22, 13, 0, tzinfo=UTC)
    clock = FakeClock(evening)
    report = cycle_at(settings, clock, evening)
    # Then the win-back goes that evening: the birthday offer, three days later, still comes before the birthday
    assert report.dispatched.outcomes["sent"] == 1, report.dispatched.outcomes
    assert subjects(smtp_server) == ["How are you, Siti?"]
    for day in range(1, 4):
        cycle_at(settings, clock, evening + timedelta(days=day))
    assert subjects(smtp_server)[1:] == ["Happy early birthday, Siti! Enjoy 15% off, on us"]  # before the day
    store = Store.from_url(settings.database_url)
    try:
        sent_at = {r["campaign"]: r["sent_at"] for r in store.messages(limit=10) if r["status"] == "sent"}
    finally:
        store.close()
    assert sent_at == {"winback": evening, "birthday": evening + timedelta(days=3)}


def test_an_email_waits_for_the_birthday_offer_to_come_of_another_record_with_its_mailbox(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given two customer records with one mailbox (a guest checkout typed the address in another case): C1, a
    # one-time buyer due win-back step 1, and C2, whose birthday is DAY0 (an offer on the day itself), in a shop
    # whose cap is one email in three days
    settings = settings_for(tmp_path, smtp_server)
    given_a_shop(settings, [("C1", None), ("C2", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), None, 1_000_000, "IDR"),
    ])  # fmt: skip
    engine = db.create_engine(settings.database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE customer SET email = 'C1@Example.com' WHERE external_id = 'C2'")
    engine.dispose()
    # When a cycle runs two days before the birthday (too early for any pass to plan C2's offer)
    clock = FakeClock(DAY0 - timedelta(days=2))
    report = cycle_at(settings, clock, DAY0 - timedelta(days=2))
    # Then C1's win-back waits, as it would for C1's own birthday offer: sent then, it would leave C2's offer
    # capped until after the birthday
    assert report.dispatched.outcomes == {"deferred:birthday": 1}, report.dispatched.outcomes
    assert smtp_server.messages == []
    # And on the birthday the offer goes out, the win-back three days later
    for day in range(-1, 4):
        cycle_at(settings, clock, DAY0 + timedelta(days=day))
    assert subjects(smtp_server) == ["Happy birthday, Siti! Enjoy 15% off, on us", "How are you, Siti?"]


@pytest.mark.parametrize(("birthday_cron", "waits"), [
    ("0 9 * * fri", True),  # 09:00 on the birthday, a Friday: that pass plans the offer, which keeps its slot
    ("0 9 * * mon", False),  # no pass falls between 26 hours before the birthday and its end: no offer will come
])  # fmt: skip
def test_an_email_waits_for_a_birthday_offer_to_come_only_if_a_planning_pass_will_plan_it(
    tmp_path: Path, smtp_server: RecordingServer, birthday_cron: str, waits: bool
) -> None:
    # Given C1, whose birthday is DAY0 (Friday 26 February; an offer on the day itself) and whose win-back step is
    # due, in a shop that plans birthdays once a week (schedule.plan_cron) and caps one email in three days
    base = settings_for(tmp_path, smtp_server)
    settings = dataclasses.replace(base, schedule=dataclasses.replace(base.schedule,
                                                                      plan_cron={"birthday": birthday_cron}))
    given_a_shop(settings, [("C1", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), None, 1_000_000, "IDR"),
    ])  # fmt: skip
    # When the sender looks two days before the birthday (no pass has planned the offer)
    report = cycle_at(settings, FakeClock(DAY0 - timedelta(days=2)), DAY0 - timedelta(days=2))
    # Then the win-back waits for the offer only if a pass will plan it before it expires; else it goes
    expected = {"deferred:birthday": 1} if waits else {"sent": 1}
    assert report.dispatched.outcomes == expected, report.dispatched.outcomes


def daemon_from(settings: Settings, clock: FakeClock, start: datetime, end: datetime) -> Counter[str]:
    """What a daemon does from ``start`` to ``end`` with the rows planned so far: it plans birthday at its
    ``schedule.plan_cron`` times and sends each row as it falls due (its sender looks every few seconds); the
    outcomes of its sends, counted."""
    cron, zone = settings.schedule.cron_of("birthday"), settings.shop.time_zone
    outcomes: Counter[str] = Counter()
    at: datetime | None = start
    while at is not None and at <= end:
        clock.set(at)
        deps = Deps.build(settings)
        deps.clock = clock
        try:
            if next_fire_time(cron, zone, at) == at:
                plan(deps.store, settings, at, ["birthday"])
            astore = AsyncStore(deps.store)
            try:
                outcomes.update(asyncio.run(running.dispatch(deps, astore)).outcomes)
            finally:
                astore.close()
            due = opstore.waiting(deps.store, at).first
        finally:
            deps.close()
        passes = next_fire_time(cron, zone, at + timedelta(seconds=1))
        at = min((t for t in (due, passes) if t is not None), default=None)
    return outcomes


def test_an_email_waits_for_an_open_birthday_offer_until_the_pass_that_plans_it_not_an_hour_at_a_time(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given C1, whose birthday is DAY0 (Friday 26 February), offered from the day before (days_before = 1), in a
    # shop that plans birthdays on Fridays at 09:00 (schedule.plan_cron) and caps one email in three days; C1's
    # win-back step, planned at 09:00 on Thursday, when the offer's window is open but no pass has planned it
    base = settings_for(tmp_path, smtp_server)
    birthday = dataclasses.replace(base.campaigns.birthday, days_before=1)
    settings = dataclasses.replace(base, campaigns=dataclasses.replace(base.campaigns, birthday=birthday),
                                   schedule=dataclasses.replace(base.schedule, plan_cron={"birthday": "0 9 * * fri"}))
    given_a_shop(settings, [("C1", date(1990, 2, 26))], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, DAY0 - timedelta(days=50), None, 1_000_000, "IDR"),
    ])  # fmt: skip
    thursday = DAY0 - timedelta(days=1, hours=1)  # 09:00 in Jakarta
    store = Store.from_url(settings.database_url)
    try:
        assert plan(store, settings, thursday, ["winback"]).created == {"winback": 1}
    finally:
        store.close()
    # When the daemon runs from then until the birthday is over
    clock = FakeClock(thursday)
    outcomes = daemon_from(settings, clock, thursday, DAY0 + timedelta(hours=14))
    # Then the win-back waits once, until just after Friday's pass plans the offer (not an hour at a time: 24
    # deferrals before), and the offer goes out that morning, the win-back later within the cap
    assert outcomes["deferred:birthday"] == 1, outcomes
    assert subjects(smtp_server) == ["Happy birthday, Siti! Enjoy 15% off, on us"]
    store = Store.from_url(settings.database_url)
    try:
        rows = {r["campaign"]: r for r in store.messages(limit=10)}
    finally:
        store.close()
    assert rows["birthday"]["sent_at"] == DAY0 - timedelta(hours=1), "at Friday's pass (09:00 in Jakarta)"
    assert rows["winback"]["status"] == "planned"


def test_a_winback_step_still_waiting_when_the_next_step_falls_due_gives_way_to_it(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given C1, whose birthday is DAY0 and whose only order was placed 73 days before it: win-back step 1 (day 45) is
    # due, and the birthday offer takes the day's slot, so step 1 waits 3 days for the cap, by when the order is 76
    # days old and step 2 (day 75) is due
    settings = settings_for(tmp_path, smtp_server)
    # When Kembali runs every morning for a week
    received_on, statuses = a_week_from_a_birthday_with_one_order(settings, smtp_server, timedelta(days=73))
    # Then on day 3 C1 gets step 2, the step due by then; the reminder of step 1, whose time has passed, is not sent
    # late beside it (three days before or after step 2's coupon)
    assert received_on[0] == ["Happy birthday, Siti! Enjoy 15% off, on us"]
    assert [len(received_on[d]) for d in range(1, 7)] == [0, 0, 1, 0, 0, 0], received_on
    assert statuses == {
        ("birthday", 1): ("sent", None),
        ("winback", 1): ("skipped", "no_longer_due"),
        ("winback", 2): ("sent", None),
    }


def test_a_winback_step_still_waiting_when_its_order_passes_give_up_after_days_is_not_sent(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a shop that gives up on one-time buyers whose only order is more than 77 days old, and C1, whose birthday
    # is DAY0 and whose only order was placed 76.5 days before it: step 2 (day 75), the last, is due and planned, and
    # the birthday offer takes the day's slot, so step 2 waits 3 days for the cap, by when the order is 79.5 days old
    base = settings_for(tmp_path, smtp_server)
    campaigns = dataclasses.replace(base.campaigns, winback=dataclasses.replace(base.campaigns.winback,
                                                                                give_up_after_days=77))
    settings = dataclasses.replace(base, campaigns=campaigns)
    # When Kembali runs every morning for a week
    received_on, statuses = a_week_from_a_birthday_with_one_order(settings, smtp_server,
                                                                  timedelta(days=76, hours=12))  # fmt: skip
    # Then C1 gets the birthday offer only: no win-back email once the order is older than give_up_after_days, the
    # last step no more than an earlier one (which gives way to a next step that is never planned)
    assert received_on[0] == ["Happy birthday, Siti! Enjoy 15% off, on us"]
    assert [len(received_on[d]) for d in range(1, 7)] == [0, 0, 0, 0, 0, 0], received_on
    assert statuses == {
        ("birthday", 1): ("sent", None),
        ("winback", 2): ("skipped", "no_longer_due"),
    }


def test_an_email_waits_for_a_birthday_offer_whose_planning_pass_is_in_the_hour_the_clocks_repeat(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a shop in Berlin that plans birthdays daily at 02:30 (a time shown twice on 31 October 2027, when its
    # clocks go back from 03:00 to 02:00), and C1, in Jakarta, whose birthday is that day and whose win-back step is
    # due, imported at 02:40 (CEST, between the two 02:30s) after the day before's pass: no pass has planned the
    # offer, whose window opened at midnight in Jakarta; the next pass is at 02:30 CET (01:30 UTC)
    base = settings_for(tmp_path, smtp_server)
    settings = dataclasses.replace(base, shop=dataclasses.replace(base.shop, time_zone="Europe/Berlin"),
                                   schedule=dataclasses.replace(base.schedule, plan_cron={"birthday": "30 2 * * *"}))
    now = datetime(2027, 10, 31, 0, 40, tzinfo=UTC)
    migrate(settings.database_url)
    engine = db.create_engine(settings.database_url)
    shop.upsert_customers(engine, [CustomerRecord("C1", "c1@example.com", "Siti C1", Locale.EN, "Asia/Jakarta",
                                                  date(1990, 10, 31), True, "opt_in", "checkout")], now)  # fmt: skip
    shop.upsert_orders(engine, [OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, now - timedelta(days=50), None,
                                            1_000_000, "IDR")], now)  # fmt: skip
    engine.dispose()
    store = Store.from_url(settings.database_url)
    try:
        assert plan(store, settings, now, ["winback"]).created == {"winback": 1}
    finally:
        store.close()
    # When the daemon runs from then until the birthday is over in Jakarta
    outcomes = daemon_from(settings, FakeClock(now), now, datetime(2027, 10, 31, 17, 0, tzinfo=UTC))
    # Then the win-back waits for that pass (five minutes after it: 01:35 UTC, not 00:35, an hour before it, read on
    # the wall clock of the hour shown first) and the offer goes out at the pass, the win-back later within the cap
    assert subjects(smtp_server) == ["Happy birthday, Siti! Enjoy 15% off, on us"], outcomes
    store = Store.from_url(settings.database_url)
    try:
        rows = {r["campaign"]: r for r in store.messages(limit=10)}
    finally:
        store.close()
    assert rows["birthday"]["sent_at"] == datetime(2027, 10, 31, 1, 30, tzinfo=UTC)
    assert rows["winback"]["status"] == "planned"


def test_two_weeks_news_waiting_for_one_morning_is_one_email_without_a_cap(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    """New products at most one per customer per week, whatever the cap: a shop with no cap (frequency_caps = [])
    launches a product on Sunday and another just after midnight, in the next ISO week. The Sunday evening pass
    plans the first week's news, held by quiet hours until 08:00; the pass after midnight plans the second week's,
    held until 08:00 too. At 08:00 both are due together: the customer gets one news email, not two a moment
    apart (the ledger showed neither sent when the run read it), and the other is skipped as expired."""
    base = settings_for(tmp_path, smtp_server)
    settings = dataclasses.replace(
        base,
        campaigns=dataclasses.replace(
            base.campaigns, birthday=dataclasses.replace(base.campaigns.birthday, enabled=False),
            feedback=dataclasses.replace(base.campaigns.feedback, enabled=False),
            new_products=dataclasses.replace(base.campaigns.new_products, enabled=True)),
        policy=dataclasses.replace(base.policy, frequency_caps=()),
    )  # fmt: skip
    sunday_night = datetime(2027, 3, 7, 15, 0, tzinfo=UTC)  # 22:00 in Jakarta, Sunday of ISO week 9
    given_a_shop(settings, [("C1", None)], [
        OrderRecord("INV-1", "C1", OrderStatus.DELIVERED, sunday_night - timedelta(days=20), None, 1_000_000, "IDR"),
    ])  # fmt: skip
    engine = db.create_engine(settings.database_url)
    shop.upsert_products(engine, [
        ProductRecord(f"P{n}", f"Product {n}", "Batik", 250_000_00, "IDR", f"https://shop.example/p{n}", "",
                      launched, True)
        for n, launched in ((1, sunday_night - timedelta(hours=12)), (2, sunday_night + timedelta(hours=3)))
    ], sunday_night)  # fmt: skip
    engine.dispose()
    clock = FakeClock(sunday_night)
    assert cycle_at(settings, clock, sunday_night).dispatched.outcomes == {"deferred:quiet_hours": 1}
    after_midnight = datetime(2027, 3, 7, 18, 0, tzinfo=UTC)  # 01:00 on Monday in Jakarta, ISO week 10
    assert cycle_at(settings, clock, after_midnight).dispatched.outcomes == {"deferred:quiet_hours": 1}

    report = cycle_at(settings, clock, datetime(2027, 3, 8, 1, 0, tzinfo=UTC))  # 08:00

    assert len(smtp_server.messages) == 1, report.dispatched.outcomes
    # the second week's news would wait a week for the first's, past its expiry (5 days)
    assert report.dispatched.outcomes == {"sent": 1, "skipped:expired": 1}

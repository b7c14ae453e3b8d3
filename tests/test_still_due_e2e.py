"""The send-time re-check of every campaign's rule, end to end: real SQLite and PostgreSQL, a real SMTP server.

Given customers each due one campaign, planned at 22:00 (so quiet hours hold everything until 08:00), when
the shop's data changes overnight (a birthday corrected, a rated order refunded, the order that reached a
milestone refunded, the only order of a one-time buyer refunded, a new order after the news), then the
morning's cycle skips those messages with a reason (``no_longer_due`` or ``ordered_since``) and sends the
others as planned.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from tests.smtp_server import RecordingServer
from worker.adapters import db, shop
from worker.adapters.store import Store
from worker.app import Deps
from worker.commands import running
from worker.config import Settings, settings_from_dict
from worker.domain import CustomerRecord, Locale, OrderLineRecord, OrderRecord, OrderStatus, ProductRecord
from worker.testing import FakeClock

ROOT = Path(__file__).resolve().parent.parent
NIGHT = datetime(2027, 3, 1, 15, 0, tzinfo=UTC)
"""22:00 on 1 March 2027 in Jakarta: everything planned now waits for 08:00."""
MORNING = datetime(2027, 3, 2, 1, 0, tzinfo=UTC)
D, P, R = OrderStatus.DELIVERED, OrderStatus.PAID, OrderStatus.REFUNDED


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "a-test-key-of-enough-length")


def settings_for(db_url: str, server: RecordingServer) -> Settings:
    return settings_from_dict({
        "database": {"url": db_url},
        "smtp": {"host": "127.0.0.1", "port": server.port, "tls": "none", "timeout_seconds": 5.0, "pool_size": 2},
        "templates": {"dir": str(ROOT / "templates" / "email")},
        "campaigns": {
            "winback": {"quiet_days": 45, "holdout_share": 0.0},
            "birthday": {"enabled": True, "days_before": 3},
            "feedback": {"enabled": True, "days_after": 7, "lookback_days": 14},
            "new_products": {"enabled": True, "within_days": 14, "active_within_days": 180},
            "loyalty": {"enabled": True, "order_milestones": [5], "spend_milestones": [], "within_days": 30},
        },
        "policy": {"frequency_caps": [[10, 1]], "quiet_hours_start": "21:00", "quiet_hours_end": "08:00"},
    })  # fmt: skip


def customer(ext: str, born: date | None = None) -> CustomerRecord:
    return CustomerRecord(ext, f"{ext.lower()}@example.com", f"Siti {ext}", Locale.EN, "Asia/Jakarta", born, True,
                          "opt_in", "checkout")  # fmt: skip


def order(ext: str, cust: str, status: OrderStatus, placed_days_ago: float, delivered_days_ago: float | None = None,
          *, at: datetime = NIGHT) -> OrderRecord:  # fmt: skip
    delivered = None if delivered_days_ago is None else at - timedelta(days=delivered_days_ago)
    return OrderRecord(ext, cust, status, at - timedelta(days=placed_days_ago), delivered, 10_000_000, "IDR",
                       (OrderLineRecord("P-OLD", 1, 10_000_000),))  # fmt: skip


def cycle_at(settings: Settings, when: datetime) -> running.CycleReport:
    deps = Deps.build(settings)
    deps.clock = FakeClock(when)
    try:
        return asyncio.run(running.cycle(deps))
    finally:
        deps.close()


def ledger(settings: Settings) -> dict[str, tuple[str, str | None]]:
    store = Store.from_url(settings.database_url)
    try:
        return {r["dedupe_key"]: (r["status"], r["skip_reason"]) for r in store.messages(limit=100)}
    finally:
        store.close()


def test_a_message_whose_campaign_rule_no_longer_holds_at_send_time_is_skipped_with_a_reason(
    db_url: str, smtp_server: RecordingServer
) -> None:
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [
        customer("B1", date(1990, 3, 4)), customer("B2", date(1990, 3, 4)),  # birthdays in 3 days
        customer("F1"), customer("F2"),  # an order delivered 8 days ago: feedback is due
        customer("L1"), customer("L2"),  # their 5th order 2.5 days ago: loyalty orders-5
        customer("W1"), customer("W2"), customer("W3"),  # one order 50 days ago: win-back (and the news)
        customer("N1"), customer("N2"),  # two orders, the last 30 days ago: the news
    ], NIGHT)  # fmt: skip
    shop.upsert_products(engine, [
        ProductRecord("P-OLD", "Kain Lama", "Batik", 10_000_000, "IDR", "", "", datetime(2026, 1, 1, tzinfo=UTC), True),
        ProductRecord("P-NEW", "Kain Baru", "Batik", 20_000_000, "IDR", "", "", NIGHT - timedelta(days=10), True),
    ], NIGHT)  # fmt: skip
    shop.upsert_orders(engine, [
        order("F1-1", "F1", D, 9, 8), order("F2-1", "F2", D, 9, 8),
        *(order(f"L{n}-{i}", f"L{n}", D, 2.5 + i) for n in (1, 2) for i in range(5)),
        *(order(f"W{n}-1", f"W{n}", D, 50) for n in (1, 2, 3)),
        *(order(f"N{n}-{i}", f"N{n}", D, 30 + 10 * i) for n in (1, 2) for i in range(2)),
    ], NIGHT)  # fmt: skip
    engine.dispose()
    night = cycle_at(settings, NIGHT)
    assert night.dispatched.outcomes == {"deferred:quiet_hours": 14} and smtp_server.messages == []
    week = next(k for k in ledger(settings) if k.startswith("new_products:")).rsplit(":", 1)[1]

    # overnight the shop's data changes
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("B1", date(1990, 8, 17))], NIGHT)  # a corrected birthday
    shop.upsert_orders(engine, [
        order("F1-1", "F1", R, 9, 8),  # the order to rate: refunded
        order("L1-0", "L1", R, 2.5),  # the 5th order: refunded, 4 purchases left
        order("W1-1", "W1", R, 50),  # the only order: refunded, no purchase left
        order("W2-1", "W2", R, 50), order("W2-2", "W2", P, -0.05),  # refunded, and a new order in its place
        order("N1-2", "N1", P, -0.05),  # a new order after the news
    ], NIGHT)  # fmt: skip
    engine.dispose()
    morning = cycle_at(settings, MORNING)

    sent = {"birthday:B2:2027", "feedback:F2-1", "loyalty:L2:orders-5", "winback:W3:W3-1:1",
            f"new_products:W3:{week}", f"new_products:N2:{week}"}  # fmt: skip
    no_longer_due = {"birthday:B1:2027", "feedback:F1-1", "loyalty:L1:orders-5", "winback:W1:W1-1:1",
                     f"new_products:W1:{week}"}  # fmt: skip
    ordered_since = {"winback:W2:W2-1:1", f"new_products:W2:{week}", f"new_products:N1:{week}"}
    assert ledger(settings) == {
        **{k: ("sent", None) for k in sent},
        **{k: ("skipped", "no_longer_due") for k in no_longer_due},
        **{k: ("skipped", "ordered_since") for k in ordered_since},
    }
    assert morning.dispatched.outcomes == {"sent": 6, "skipped:no_longer_due": 5, "skipped:ordered_since": 3}
    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == [
        "b2@example.com", "f2@example.com", "l2@example.com", "n2@example.com", "w3@example.com", "w3@example.com"]


def test_new_products_news_reaches_a_mailbox_at_most_once_in_seven_days_across_iso_weeks(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a customer of a month ago, a launch on Sunday evening (ISO week 8) and another on Wednesday (week 9)
    settings = settings_for(db_url, smtp_server)  # the frequency cap allows 10 a day: only the weekly limit holds
    sunday = datetime(2027, 2, 28, 13, 0, tzinfo=UTC)  # 20:00 in Jakarta
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("N1")], sunday)
    shop.upsert_products(engine, [
        ProductRecord("P-OLD", "Kain Lama", "Batik", 10_000_000, "IDR", "", "", datetime(2026, 1, 1, tzinfo=UTC), True),
        ProductRecord("P-SUN", "Kain Minggu", "Batik", 20_000_000, "IDR", "", "", sunday, True),
        ProductRecord("P-WED", "Kain Rabu", "Batik", 20_000_000, "IDR", "", "", sunday + timedelta(days=2, hours=13),
                      True),
    ], sunday)  # fmt: skip
    shop.upsert_orders(engine, [order("N1-1", "N1", D, 40, at=sunday), order("N1-2", "N1", D, 30, at=sunday)], sunday)
    engine.dispose()

    # When Kembali runs on Sunday at 22:00 (quiet hours: the week-8 news waits for Monday 08:00) and then every
    # morning at 10:00 for a week and a day
    received = []
    for when in [sunday + timedelta(hours=2), *(sunday + timedelta(days=d, hours=-10) for d in range(1, 10))]:
        before = len(smtp_server.messages)
        cycle_at(settings, when)
        received += [(when.date(), to) for m in smtp_server.messages[before:] for to in m.rcpt_tos]

    # Then one email arrives (Monday, the Sunday launch); Wednesday's news would have been the second within
    # three days (and in the same ISO week): it waits for a week after Monday's, past its expiry
    assert received == [(date(2027, 3, 1), "n1@example.com")]
    assert ledger(settings) == {"new_products:N1:2027-W08": ("sent", None),
                                "new_products:N1:2027-W09": ("skipped", "expired")}  # fmt: skip


def test_a_loyalty_email_states_the_customers_order_count_when_sent_not_the_milestone(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given customers with 4 orders, to whom an import brings 2 more at once: their 6th order reached the 5th
    # order milestone (planned at night); and one of them orders a 7th overnight
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("L1"), customer("L2")], NIGHT)
    shop.upsert_customers(engine, [CustomerRecord("L3", "l3@example.com", "Budi L3", Locale.ID, "Asia/Jakarta", None,
                                                  True, "opt_in", "checkout")], NIGHT)  # fmt: skip
    shop.upsert_products(engine, [
        ProductRecord("P-OLD", "Kain Lama", "Batik", 10_000_000, "IDR", "", "", datetime(2026, 1, 1, tzinfo=UTC), True),
    ], NIGHT)  # fmt: skip
    shop.upsert_orders(engine, [order(f"{c}-{i}", c, D, 100 + i) for c in ("L1", "L2", "L3") for i in range(4)], NIGHT)
    shop.upsert_orders(engine, [order(f"{c}-{i}", c, D, i / 2) for c in ("L1", "L2", "L3") for i in (4, 5)], NIGHT)
    engine.dispose()
    night = cycle_at(settings, NIGHT)
    assert night.dispatched.outcomes == {"deferred:quiet_hours": 3}
    engine = db.create_engine(db_url)
    shop.upsert_orders(engine, [order("L2-6", "L2", P, -0.05)], NIGHT)
    engine.dispose()
    # When the morning's cycle sends the loyalty emails
    cycle_at(settings, MORNING)
    # Then each says how many times the customer has ordered (it said "5 times", "your order number 5", to
    # customers who had ordered 6 or 7 times: the milestone, not their count)
    said = {}
    for message in smtp_server.messages:
        parsed = BytesParser(policy=policy.default).parsebytes(message.data)
        text = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        said[message.rcpt_tos[0]] = (str(parsed["Subject"]), next(line for line in text.splitlines() if "kali" in line
                                                                  or "times" in line))  # fmt: skip
    assert said == {
        "l1@example.com": ("Thank you, Siti! That's 6 orders with us",
                           "You have now ordered from Toko Kembali 6 times. Thank you for your loyalty!"),
        "l2@example.com": ("Thank you, Siti! That's 7 orders with us",
                           "You have now ordered from Toko Kembali 7 times. Thank you for your loyalty!"),
        "l3@example.com": ("Terima kasih sudah 6 kali berbelanja, Kak Budi!",
                           "Kakak sudah 6 kali berbelanja di Toko Kembali. Terima kasih atas kepercayaan Kakak!"),
    }  # fmt: skip


def test_a_loyalty_milestone_no_longer_reached_by_paid_orders_is_not_rewarded_for_an_unpaid_one(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given L1, whose 5th paid order 2.5 days ago reached the orders-5 milestone (planned at night)
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("L1")], NIGHT)
    shop.upsert_orders(engine, [order(f"L1-{i}", "L1", D, 2.5 + i) for i in range(5)], NIGHT)
    engine.dispose()
    assert cycle_at(settings, NIGHT).dispatched.outcomes == {"deferred:quiet_hours": 1}
    # When overnight the 5th is refunded and a 6th order is placed but not paid
    engine = db.create_engine(db_url)
    shop.upsert_orders(engine, [order("L1-0", "L1", R, 2.5), order("L1-5", "L1", OrderStatus.PLACED, 0.1)], NIGHT)
    engine.dispose()
    morning = cycle_at(settings, MORNING)
    # Then four paid orders are not five: no reward for an order that may never be paid
    assert morning.dispatched.outcomes == {"skipped:no_longer_due": 1}
    assert smtp_server.messages == []


def test_a_feedback_request_whose_order_is_delivered_later_than_planning_knew_waits_days_after_the_delivery(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given orders shipped 9 days ago with no delivery time yet: their feedback requests are planned at night from
    # the placement (days_after 7; the requests expire 7 days after planning)
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("F1"), customer("F2"), customer("F3")], NIGHT)
    shop.upsert_orders(engine, [order(f"{c}-1", c, OrderStatus.SHIPPED, 9) for c in ("F1", "F2", "F3")], NIGHT)
    engine.dispose()
    assert cycle_at(settings, NIGHT).dispatched.outcomes == {"deferred:quiet_hours": 3}
    # When overnight an import says F1's was delivered yesterday, F2's this night (7 days on is past the
    # request's expiry), and F3's 8 days ago
    engine = db.create_engine(db_url)
    shop.upsert_orders(engine, [order("F1-1", "F1", D, 9, 1, at=MORNING), order("F2-1", "F2", D, 9, 0.1, at=MORNING),
                                order("F3-1", "F3", D, 9, 8, at=MORNING)], NIGHT)  # fmt: skip
    engine.dispose()
    morning = cycle_at(settings, MORNING)
    # Then only F3 is asked this morning ("how was your order?" a day after it arrived was too early): F1's
    # request waits until 7 days after the delivery, F2's cannot be sent before it expires
    assert morning.dispatched.outcomes == {"sent": 1, "deferred:after_delivery": 1, "skipped:expired": 1}
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["f3@example.com"]
    cycle_at(settings, MORNING + timedelta(days=5, hours=23))
    assert len(smtp_server.messages) == 1
    cycle_at(settings, MORNING + timedelta(days=6, hours=1))
    assert ledger(settings) == {"feedback:F1-1": ("sent", None), "feedback:F2-1": ("skipped", "expired"),
                                "feedback:F3-1": ("sent", None)}  # fmt: skip


def test_a_feedback_request_whose_order_an_import_gave_another_customer_is_not_sent_to_the_first(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given orders delivered 8 days ago: their feedback requests are planned at night, for the morning
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("F1"), customer("F2"), customer("F3")], NIGHT)
    shop.upsert_orders(engine, [order("F1-1", "F1", D, 9, 8), order("F2-1", "F2", D, 9, 8)], NIGHT)
    engine.dispose()
    assert cycle_at(settings, NIGHT).dispatched.outcomes == {"deferred:quiet_hours": 2}
    # When overnight an import gives F1's order to F3 (the shop merged two accounts, or corrected whose it was)
    engine = db.create_engine(db_url)
    shop.upsert_orders(engine, [order("F1-1", "F3", D, 9, 8)], NIGHT)
    engine.dispose()
    morning = cycle_at(settings, MORNING)
    # Then F1 is not asked to rate an order, and shown its products, that the shop says is no longer theirs
    assert [to for m in smtp_server.messages for to in m.rcpt_tos] == ["f2@example.com"]
    assert morning.dispatched.outcomes == {"sent": 1, "skipped:no_longer_due": 1}
    assert ledger(settings)["feedback:F1-1"] == ("skipped", "no_longer_due")


def test_a_birthday_corrected_after_its_offer_was_planned_gets_the_offer_on_the_corrected_day(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given a customer born on 4 March: their birthday offer is planned at night, 3 days ahead, for the morning
    settings = settings_for(db_url, smtp_server)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("B1", date(1990, 3, 4)), customer("B2", date(1990, 3, 4))], NIGHT)
    engine.dispose()
    assert cycle_at(settings, NIGHT).dispatched.outcomes == {"deferred:quiet_hours": 2}
    # When overnight an import corrects B1's birthday to 5 March (the customer fixed it in their profile)
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("B1", date(1990, 3, 5))], NIGHT)
    engine.dispose()
    cycle_at(settings, MORNING)
    # Then the offer for 4 March is not sent, and one for 5 March is, once: the correction costs them no offer
    offers = {k: v for k, v in ledger(settings).items() if k.startswith("birthday:B1:")}
    assert offers.pop("birthday:B1:2027") == ("skipped", "no_longer_due")
    assert list(offers.values()) == [("sent", None)]
    assert sorted(to for m in smtp_server.messages for to in m.rcpt_tos) == ["b1@example.com", "b2@example.com"]
    cycle_at(settings, MORNING + timedelta(days=1))
    assert len(smtp_server.messages) == 2
    # And when B1 corrects it again, to 20 March, after the offer went: no second offer that year
    engine = db.create_engine(db_url)
    shop.upsert_customers(engine, [customer("B1", date(1990, 3, 20))], MORNING + timedelta(days=2))
    engine.dispose()
    for day in range(15, 19):  # the passes around its window (from 17 March, 3 days before)
        cycle_at(settings, MORNING + timedelta(days=day))
    assert len(smtp_server.messages) == 2
    assert {k for k in ledger(settings) if k.startswith("birthday:B1:")} == set(offers) | {"birthday:B1:2027"}

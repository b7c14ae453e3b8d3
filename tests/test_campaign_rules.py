"""Every campaign's rule: one table of cases per campaign, run through the pure rule and through
the planner (the store's keyset queries plus the rule) on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.db_fixtures import migrate
from tests.shop import stored_orders
from worker import planning
from worker.adapters import shop
from worker.adapters.store import Store
from worker.config import Settings, settings_from_dict
from worker.core import campaigns as cc
from worker.domain import (
    ClaimedMessage,
    CustomerRecord,
    CustomerSnapshot,
    Locale,
    OrderFacts,
    OrderRecord,
    OrderStatus,
    ProductRecord,
    ProductView,
    SendTimeFacts,
    SkipReason,
)

NOW = datetime(2027, 2, 28, 16, 30, tzinfo=UTC)
"""23:30 on 28 February 2027 in Jakarta; already 01:30 on 1 March in Jayapura. 2027 is not a leap year."""
D, S, X, R = OrderStatus.DELIVERED, OrderStatus.SHIPPED, OrderStatus.CANCELLED, OrderStatus.REFUNDED
JKT, JAYA, KIRITIMATI = "Asia/Jakarta", "Asia/Jayapura", "Pacific/Kiritimati"

SETTINGS = settings_from_dict({
    "campaigns": {
        "winback": {"steps": [{"days": 45, "template": "winback-reminder"}, {"days": 75, "template": "winback"},
                              {"days": 120, "template": "winback-last"}], "give_up_after_days": 730},
        "birthday": {"enabled": True, "days_before": 0},
        "feedback": {"enabled": True, "days_after": 7, "lookback_days": 14},
        "new_products": {"enabled": True, "within_days": 14, "active_within_days": 180},
        "loyalty": {"enabled": True, "order_milestones": [5, 10], "spend_milestones": [5_000_000], "within_days": 30},
    },
})  # fmt: skip


def ago(days: float) -> timedelta:
    return timedelta(days=days)


@dataclass(frozen=True)
class Case:
    name: str
    keys: int
    """How many messages the rule plans for this customer (0 = not due)."""
    orders: tuple[tuple[OrderStatus, timedelta, timedelta | None, int, str], ...] = ()
    """(status, placed how long before NOW, delivered how long before NOW, total in major units, currency)"""
    birthday: date | None = None
    zone: str = JKT
    consent: bool = True
    suppressed: bool = False
    planned: bool = False
    """The ledger already has the rows the rule would plan."""


def o(status: OrderStatus, placed: float, delivered: float | None = None, total: int = 100_000,
      currency: str = "IDR", paid: float | None = None) -> Any:  # fmt: skip
    """An order; with ``paid``, one imported unpaid when placed and seen ``status`` by the import ``paid`` days ago."""
    return (status, ago(placed), None if delivered is None else ago(delivered), total, currency,
            None if paid is None else ago(paid))  # fmt: skip


WINBACK = [
    Case("one order 46 days ago: step 1", 1, (o(D, 46),)),
    Case("exactly 45 days ago is not 'more than'", 0, (o(D, 45),)),
    Case("exactly 75 days ago: still step 1", 1, (o(D, 75),)),
    Case("76 days ago: step 2", 1, (o(D, 76),)),
    Case("121 days ago: step 3, the last note", 1, (o(D, 121),)),
    Case("400 days ago: still the last step", 1, (o(D, 400),)),
    Case("exactly 730 days ago is not more than give_up_after_days", 1, (o(D, 730),)),
    Case("731 days ago: given up on (give_up_after_days = 730)", 0, (o(D, 731),)),
    Case("5 years ago: given up on", 0, (o(D, 5 * 365),)),
    Case("a repeat buyer: never", 0, (o(D, 200), o(D, 100))),
    Case("a cancelled second order does not count", 1, (o(D, 80), o(X, 5))),
    Case("the only order was cancelled: never bought", 0, (o(X, 80),)),
    # "we hope you are enjoying your …" to someone who never paid for it: an order placed and never paid is none
    Case("the only order placed 80 days ago and never paid: never bought", 0, (o(OrderStatus.PLACED, 80),)),
    Case("the only order paid 80 days ago, not shipped yet: step 2", 1, (o(OrderStatus.PAID, 80),)),
    Case("an order placed yesterday, not paid yet, after the one purchase: ordered again", 0,
         (o(D, 80), o(OrderStatus.PLACED, 1))),
    Case("the only order was refunded: never bought", 0, (o(R, 80),)),
    Case("a refunded order before the one purchase does not count", 1, (o(R, 100), o(D, 80))),
    Case("ordered again (the sequence stops)", 0, (o(D, 80), o(D, 3))),
    Case("no consent", 0, (o(D, 80),), consent=False),
    Case("suppressed", 0, (o(D, 80),), suppressed=True),
    Case("this step already planned", 0, (o(D, 80),), planned=True),
]

BIRTHDAY = [
    Case("born 28 Feb, in Jakarta where it is still 28 Feb", 1, birthday=date(1990, 2, 28)),
    Case("born 29 Feb: celebrated on 28 Feb in 2027", 1, birthday=date(1992, 2, 29)),
    Case("born 28 Feb, in Jayapura where it is already 1 March", 0, birthday=date(1990, 2, 28), zone=JAYA),
    Case("born 1 March, in Jayapura where it is 1 March", 1, birthday=date(1990, 3, 1), zone=JAYA),
    Case("born 1 March, in Jakarta half an hour before (planned, due at midnight)", 1, birthday=date(1990, 3, 1)),
    Case("born 1 March, in Kabul where it is 21:00 the day before (planned, due at midnight)", 1,
         birthday=date(1990, 3, 1), zone="Asia/Kabul"),
    Case("born 3 March, in Jakarta: more than a day before its window opens", 0, birthday=date(1990, 3, 3)),
    Case("born 29 Feb, in Jayapura: the 28th has passed there", 0, birthday=date(1996, 2, 29), zone=JAYA),
    Case("born 27 Feb: passed", 0, birthday=date(1990, 2, 27)),
    Case("no birthday: never", 0),
    Case("born 1 March, in Kiritimati (+14) where it is 1 March", 1, birthday=date(1990, 3, 1), zone=KIRITIMATI),
    Case("born 28 Feb, in Kiritimati where it has passed", 0, birthday=date(1990, 2, 28), zone=KIRITIMATI),
    Case("born 28 Feb, in Adak (-10) where it is 28 Feb", 1, birthday=date(1990, 2, 28), zone="America/Adak"),
    Case("born 29 Feb, in Adak: 28 Feb", 1, birthday=date(1992, 2, 29), zone="America/Adak"),
    Case("born 27 Feb, in Adak: passed", 0, birthday=date(1990, 2, 27), zone="America/Adak"),
    Case("no consent", 0, birthday=date(1990, 2, 28), consent=False),
    Case("suppressed", 0, birthday=date(1990, 2, 28), suppressed=True),
    Case("this year's already planned", 0, birthday=date(1990, 2, 28), planned=True),
]

FEEDBACK = [
    Case("delivered 8 days ago", 1, (o(D, 12, 8),)),
    Case("delivered exactly 7 days ago", 1, (o(D, 10, 7),)),
    Case("delivered 6 days ago: too early", 0, (o(D, 9, 6),)),
    Case("delivered 20 days ago: still within the lookback", 1, (o(D, 25, 20),)),
    Case("delivered exactly 21 days ago: past the lookback", 0, (o(D, 25, 21),)),
    Case("not delivered, placed 10 days ago: the placement counts", 1, (o(S, 10),)),
    Case("placed 10 days ago and never paid: nothing to rate", 0, (o(OrderStatus.PLACED, 10),)),
    Case("paid 10 days ago, no delivery time", 1, (o(OrderStatus.PAID, 10),)),
    Case("placed long ago, delivered 8 days ago: the delivery counts", 1, (o(D, 40, 8),)),
    Case("a cancelled order is never asked about", 0, (o(X, 10),)),
    Case("delivered (8.2 days ago) before it was placed (8 days ago)", 1, (o(D, 8, 8.2),)),
    Case("delivered (7.1 days ago) before placed (6.9 days ago): the delivery counts", 1, (o(D, 6.9, 7.1),)),
    Case("a refunded order neither", 0, (o(R, 12, 8),)),
    Case("two orders due: one request each", 2, (o(D, 12, 8), o(D, 15, 10))),
    Case("no consent", 0, (o(D, 12, 8),), consent=False),
    Case("suppressed", 0, (o(D, 12, 8),), suppressed=True),
    Case("already asked", 0, (o(D, 12, 8),), planned=True),
]

NEW_PRODUCTS = [
    Case("last order 10 days ago, a product launched 5 days ago", 1, (o(D, 10),)),
    Case("last order 3 days ago: nothing new since (the 2-day-old one is inactive)", 0, (o(D, 3),)),
    Case("last order 100 days ago", 1, (o(D, 100), o(D, 300))),
    Case("last order 181 days ago: not active, win-back's audience", 0, (o(D, 181),)),
    Case("no orders", 0),
    Case("last order exactly when the newest product launched", 0, (o(D, 5),)),
    Case("last order a second before the launch", 1, (o(D, 5 + 1 / 86400),)),
    Case("a cancelled order after the launch, the purchase before", 1, (o(D, 10), o(X, 1))),
    Case("a refunded order after the launch, the purchase before", 1, (o(D, 10), o(R, 1))),
    Case("only a cancelled order", 0, (o(X, 10),)),
    Case("no consent", 0, (o(D, 10),), consent=False),
    Case("already planned this week", 0, (o(D, 10),), planned=True),
]

LOYALTY = [
    Case("5th order 3 days ago", 1, tuple(o(D, 3 + 10 * i) for i in range(5))),
    Case("4 orders: not yet", 0, tuple(o(D, 3 + 10 * i) for i in range(4))),
    Case("10th order yesterday: the highest milestone only", 1, tuple(o(D, 1 + 5 * i) for i in range(10))),
    Case("5 orders, the last 31 days ago: not recent", 0, tuple(o(D, 31 + 10 * i) for i in range(5))),
    Case("5 orders, the last exactly 30 days ago", 1, tuple(o(D, 30 + 10 * i) for i in range(5))),
    Case("one order of Rp6.000.000: the spend milestone", 1, (o(D, 2, total=6_000_000),)),
    Case("5 orders and Rp6.000.000: both milestones", 2, tuple(o(D, 3 + i, total=1_200_000) for i in range(5))),
    Case("5 orders, one cancelled: 4 purchases", 0, (*(o(D, 3 + i) for i in range(4)), o(X, 1))),
    Case("7 orders, the 5th 40 days ago: not reached by a recent order", 0,
         (o(D, 1), o(D, 2), *(o(D, 40 + 10 * i) for i in range(5)))),
    Case("10 orders, 6 of them before the window: the 10th is recent", 1,
         (*(o(D, 1 + i) for i in range(4)), *(o(D, 40 + 10 * i) for i in range(6)))),
    Case("Rp6.000.000 spent 100 days ago, a small order yesterday", 0, (o(D, 100, total=6_000_000), o(D, 1))),
    Case("Rp4.900.000 spent 100 days ago, Rp200.000 yesterday: crossed", 1,
         (o(D, 100, total=4_900_000), o(D, 1, total=200_000))),
    # Kembali converts no currency: an order in another than the shop's (IDR) counts as an order, not as spend
    Case("USD 6.000.000 in an IDR shop: no spend milestone", 0, (o(D, 2, total=6_000_000, currency="USD"),)),
    Case("5 orders, one in USD: the order milestone only", 1,
         (*(o(D, 3 + i, total=1_200_000) for i in range(4)), o(D, 1, total=1_200_000, currency="USD"))),
    Case("Rp4.900.000 spent 100 days ago, USD 200.000 yesterday: not crossed", 0,
         (o(D, 100, total=4_900_000), o(D, 1, total=200_000, currency="USD"))),
    Case("USD 6.000.000 100 days ago, Rp5.000.000 yesterday: crossed by the rupiah", 1,
         (o(D, 100, total=6_000_000, currency="USD"), o(D, 1, total=5_000_000))),
    # an order placed and not yet paid is no purchase to reward (yet): it counts once paid
    Case("5th order placed 3 days ago, not paid: not yet", 0,
         (o(OrderStatus.PLACED, 3), *(o(D, 10 + 10 * i) for i in range(4)))),
    Case("5th order paid 3 days ago, a 6th placed yesterday: the 5th", 1,
         (o(OrderStatus.PLACED, 1), o(OrderStatus.PAID, 3), *(o(D, 10 + 10 * i) for i in range(4)))),
    Case("Rp6.000.000 placed yesterday, not paid: no spend milestone", 0,
         (o(OrderStatus.PLACED, 1, total=6_000_000), o(D, 50))),
    Case("Rp4.900.000 paid 100 days ago, Rp200.000 placed yesterday: not crossed", 0,
         (o(D, 100, total=4_900_000), o(OrderStatus.PLACED, 1, total=200_000))),
    # counted from when it was paid: the import that first said so (migration 0019), not when it was placed
    Case("5th order placed 40 days ago, paid 2 days ago: reached in the window", 1,
         (o(OrderStatus.PAID, 40, paid=2), *(o(D, 50 + 10 * i) for i in range(4)))),
    Case("5th order placed 40 days ago, paid 35 days ago: before the window", 0,
         (o(OrderStatus.PAID, 40, paid=35), *(o(D, 50 + 10 * i) for i in range(4)))),
    Case("Rp4.900.000 paid 100 days ago, Rp200.000 placed 45 days ago and paid yesterday: crossed", 1,
         (o(D, 100, total=4_900_000), o(S, 45, total=200_000, paid=1))),
    Case("no consent", 0, tuple(o(D, 3 + i) for i in range(5)), consent=False),
    Case("already rewarded", 0, tuple(o(D, 3 + i) for i in range(5)), planned=True),
]

LAUNCHES = [  # (product, launched how long ago, active)
    ("P-NEW", ago(5), True), ("P-OLD", ago(20), True), ("P-SOON", -ago(2), True), ("P-GONE", ago(2), False),
]  # fmt: skip


def facts(i: int, case: Case, planned: frozenset[str] = frozenset()) -> cc.Facts:
    return cc.Facts(
        customer_external_id=f"C{i}",
        time_zone=case.zone,
        birthday=case.birthday,
        orders=tuple(
            OrderFacts(f"O{i}-{j}", status, NOW - placed, None if delivered is None else NOW - delivered, total * 100,
                       currency, None if paid is None else NOW - paid)
            for j, (status, placed, delivered, total, currency, paid) in enumerate(case.orders)
        ),
        consent=case.consent,
        suppressed=case.suppressed,
        planned_keys=planned,
    )


def _launches() -> list[cc.Launch]:
    """The active products, as the planner's launch query sees them (the rule drops future ones)."""
    return [
        cc.Launch(ProductView(ext, ext, "Kopi", 100, "IDR", "https://shop.example/p", ""), NOW - when)
        for ext, when, active in LAUNCHES
        if active
    ]


WEEK = cc.news_week([x for x in _launches() if x.launched_at <= NOW], ZoneInfo(JKT))


RULES: dict[str, Callable[[cc.Facts], list[str]]] = {
    "winback": lambda f: cc.winback_due_keys(f, NOW, [45, 75, 120], 730),
    "birthday": lambda f: cc.birthday_due_keys(f, NOW, 0, ZoneInfo(f.time_zone)),
    "feedback": lambda f: cc.feedback_due_keys(f, NOW, 7, 14),
    "new_products": lambda f: cc.new_products_due_keys(f, NOW, _launches(), 14, 180, WEEK),
    "loyalty": lambda f: cc.loyalty_due_keys(f, NOW, planning.loyalty_milestones(SETTINGS)),
}
TABLES = {"winback": WINBACK, "birthday": BIRTHDAY, "feedback": FEEDBACK, "new_products": NEW_PRODUCTS,
          "loyalty": LOYALTY}  # fmt: skip


def rule_keys(campaign: str, i: int, case: Case) -> list[str]:
    unplanned = RULES[campaign](facts(i, case))
    if case.planned:
        return RULES[campaign](facts(i, case, frozenset(unplanned)))
    return unplanned


PURE = [(campaign, case) for campaign, table in TABLES.items() for case in table]


@pytest.mark.parametrize(("campaign", "case"), PURE, ids=[f"{c}: {x.name}" for c, x in PURE])
def test_pure_rule(campaign: str, case: Case) -> None:
    if case.planned:
        assert RULES[campaign](facts(1, case)), "an 'already planned' case must be due without its row"
    assert len(rule_keys(campaign, 1, case)) == case.keys


def load(store: Store, table: list[Case]) -> None:
    people = [
        CustomerRecord(f"C{i}", f"c{i}@example.com", f"Customer {i}", Locale.ID, c.zone, c.birthday, c.consent,
                       "opt_in", "checkout")
        for i, c in enumerate(table)
    ]  # fmt: skip
    shop.upsert_customers(store.engine, people, NOW)
    shop.upsert_products(store.engine, [
        ProductRecord(ext, ext, "Kopi", 100, "IDR", "https://shop.example/p", "", NOW - when, active)
        for ext, when, active in LAUNCHES
    ], NOW)  # fmt: skip
    orders = [
        (OrderRecord(f"O{i}-{j}", f"C{i}", status, NOW - placed, None if delivered is None else NOW - delivered,
                     total * 100, currency), paid)
        for i, c in enumerate(table)
        for j, (status, placed, delivered, total, currency, paid) in enumerate(c.orders)
    ]  # fmt: skip
    # an order paid later than placed: imported unpaid when placed, then paid by the import that says so
    for record, paid in orders:
        if paid is not None:
            shop.upsert_orders(store.engine, [dataclasses.replace(record, status=OrderStatus.PLACED)], record.placed_at)
    for record, paid in orders:
        if paid is not None:
            shop.upsert_orders(store.engine, [record], NOW - paid)
    shop.upsert_orders(store.engine, [record for record, _ in orders], NOW)
    for i, c in enumerate(table):
        if c.suppressed:
            store.suppress(f"c{i}@example.com", reason="manual", source="test", now=NOW)


def planned_keys(store: Store, campaign: str, settings: Settings = SETTINGS) -> dict[str, int]:
    """dedupe key → the table row (case index) of its customer."""
    return {
        m.dedupe_key: int(m.email.split("@")[0][1:])
        for batch in planning.plan_batches(store, settings, campaign, NOW)
        for m in batch
    }


@pytest.mark.parametrize("campaign", list(TABLES))
def test_planner_agrees_with_the_rule(db_url: str, campaign: str) -> None:
    """Every case as one customer in one database: the planner plans exactly what the rule says."""
    table = TABLES[campaign]
    store = Store.from_url(db_url)
    try:
        load(store, table)
        first = planned_keys(store, campaign)
        owners = {i for i, c in enumerate(table) if c.planned}
        store.insert_messages(
            [m for batch in planning.plan_batches(store, SETTINGS, campaign, NOW) for m in batch
             if int(m.email.split("@")[0][1:]) in owners],
            NOW,
        )  # fmt: skip
        assert owners & set(first.values()), "the table must exercise the 'already planned' case"
        got = planned_keys(store, campaign)
        expected = {k: i for i, c in enumerate(table) for k in rule_keys(campaign, i, c)}
        wrong = sorted({table[i].name for k, i in {**got, **expected}.items() if (k in got) != (k in expected)})
        assert set(got) == set(expected), f"planner and rule disagree on: {wrong}"
    finally:
        store.close()


def test_keyset_batches_cover_everyone_once(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 5 over 23 customers sharing one order time (the keyset's tie-break): none lost, none twice."""
    store = Store.from_url(db_url)
    monkeypatch.setattr(planning, "PLAN_BATCH", 5)
    tiny = dataclasses.replace(SETTINGS, sending=dataclasses.replace(SETTINGS.sending, batch_size=1))
    try:
        table = [Case(f"c{i}", 1, (o(D, 80), )) for i in range(23)]
        load(store, table)
        shop.upsert_orders(store.engine, [OrderRecord(f"O{i}-0", f"C{i}", D, NOW - ago(80), None, 1, "IDR")
                                          for i in range(23)], NOW)  # fmt: skip
        batches = list(planning.plan_batches(store, tiny, "winback", NOW))
        assert len(batches) == 5
        keys = [m.dedupe_key for b in batches for m in b]
        assert sorted(keys) == sorted(set(keys)) and len(keys) == 23
    finally:
        store.close()


# --- date-level edges ---------------------------------------------------------------

BIRTHDAY_DATES = [
    # (birthday, customer's local today, days_before, celebrated on)
    (date(1992, 2, 29), date(2027, 2, 28), 0, date(2027, 2, 28)),
    (date(1992, 2, 29), date(2028, 2, 28), 0, None),  # a leap year: wait for the 29th
    (date(1992, 2, 29), date(2028, 2, 29), 0, date(2028, 2, 29)),
    (date(1992, 2, 29), date(2027, 2, 25), 3, date(2027, 2, 28)),
    (date(1992, 2, 29), date(2027, 3, 1), 3, None),
    (date(1992, 2, 29), date(2028, 2, 26), 3, date(2028, 2, 29)),
    (date(1990, 1, 2), date(2026, 12, 30), 3, date(2027, 1, 2)),  # across new year: next year's key
    (date(1990, 1, 2), date(2026, 12, 29), 3, None),
    (date(1990, 12, 31), date(2026, 12, 31), 0, date(2026, 12, 31)),
    (None, date(2027, 2, 28), 7, None),
]


@pytest.mark.parametrize(("born", "today", "days_before", "expected"), BIRTHDAY_DATES)
def test_birthday_dates(born: date | None, today: date, days_before: int, expected: date | None) -> None:
    assert cc.birthday_due(born, today, days_before) == expected


def test_birthday_prefilter_covers_every_zone_and_the_leap_day() -> None:
    mmdd = cc.birthday_mmdd_candidates(NOW, 0)
    assert mmdd == [228, 229, 301, 302]  # 28 Feb (UTC-12) to 2 Mar (UTC+14, a day ahead); 29 Feb rides with 28 Feb
    assert 229 not in cc.birthday_mmdd_candidates(datetime(2028, 3, 10, tzinfo=UTC), 3)
    # the same instant given on another clock (05:30 on 28 February in Pago Pago) asks for the same days
    assert cc.birthday_mmdd_candidates(NOW.astimezone(ZoneInfo("Pacific/Pago_Pago")), 0) == mmdd


def _clock_changes(zone: ZoneInfo, year: int) -> list[date]:
    """The local dates on which ``zone``'s offset changes in ``year``."""
    noon = [datetime(year, 1, 1, 12, tzinfo=zone) + timedelta(days=n) for n in range(365)]
    return [b.date() for a, b in itertools.pairwise(noon) if a.utcoffset() != b.utcoffset()]


@pytest.mark.parametrize("zone_name", ["America/New_York", "America/Miquelon", "Australia/Lord_Howe",
                                       "Europe/London", "America/Santiago", "America/Havana"])  # fmt: skip
@pytest.mark.parametrize("days_before", [0, 1])
def test_a_birthday_next_to_a_clock_change_is_planned_by_one_daily_pass_whatever_its_hour(
    zone_name: str, days_before: int
) -> None:
    """Planning runs once a day; a local day is 23 hours long when the clocks go forward. Whatever the hour of
    the daily pass, every birthday around a clock change is planned, due within its window, never earlier; and
    planned before its window opens, due when it opens: a pass that first saw it on the day, in the evening of
    the customer's clock, would leave it in quiet hours until it expired."""
    zone = ZoneInfo(zone_name)
    changes = _clock_changes(zone, 2026)
    assert len(changes) == 2, changes
    for change in changes:
        for born in (change - timedelta(days=1), change, change + timedelta(days=1)):
            facts = cc.Facts(customer_external_id="C1", time_zone=zone_name, birthday=born.replace(year=1990))
            opens = datetime.combine(born - timedelta(days=days_before), datetime.min.time(), tzinfo=zone)
            for minute in range(0, 24 * 60, 30):  # the pass's time of day, in UTC
                first = datetime.combine(born - timedelta(days=days_before + 3), datetime.min.time(), tzinfo=UTC)
                passes = [first + timedelta(days=d, minutes=minute) for d in range(days_before + 6)]
                planned = [now for now in passes if cc.birthday_due_keys(facts, now, days_before, zone)]
                assert planned, f"born {born}, daily pass at {minute // 60:02}:{minute % 60:02} UTC: never planned"
                first_plan = cc.birthday_plan(facts.birthday, planned[0], zone, days_before)
                assert first_plan is not None and first_plan[1] == opens.astimezone(UTC), (born, minute, first_plan)
                for now in planned:
                    plan = cc.birthday_plan(facts.birthday, now, zone, days_before)
                    assert plan is not None and plan[0] == born
                    assert opens <= plan[1] < cc.birthday_expires(born, zone) and plan[1] >= now, (now, plan)


def test_the_daemons_pass_at_nine_in_jakarta_plans_a_new_york_birthday_the_evening_before() -> None:
    """The daemon plans at 09:00 in Jakarta: 21:00 the evening before in New York (EST). That pass plans a birthday
    offer of the next day (``days_before = 0``), due at midnight, to go at 08:00 when quiet hours end: the next
    pass, at 21:00 on the birthday, is in quiet hours until the offer expires (it was skipped expired)."""
    ny = ZoneInfo("America/New_York")
    now = datetime(2027, 3, 6, 9, 0, tzinfo=ZoneInfo(JKT))  # 5 March, 21:00 in New York
    assert now.astimezone(ny).hour == 21
    assert cc.birthday_plan(date(1990, 3, 6), now, ny, 0) == (
        date(2027, 3, 6), datetime(2027, 3, 6, 0, 0, tzinfo=ny).astimezone(UTC))
    assert 306 in cc.birthday_mmdd_candidates(now, 0)


THREE_DAYS = timedelta(days=3)


@pytest.mark.parametrize(
    ("born", "now", "zone", "days_before", "expected"),
    [
        # the window opens at the customer's midnight, within the horizon: (the birthday, that midnight)
        (date(1990, 2, 26), datetime(2027, 2, 25, 13, 0, tzinfo=UTC), JKT, 0,
         (date(2027, 2, 26), datetime(2027, 2, 25, 17, 0, tzinfo=UTC))),
        # open already (the day itself): the window's opening, in the past
        (date(1990, 2, 26), datetime(2027, 2, 26, 3, 0, tzinfo=UTC), JKT, 0,
         (date(2027, 2, 26), datetime(2027, 2, 25, 17, 0, tzinfo=UTC))),
        # days_before = 3: it opens three days before the birthday
        (date(1990, 3, 1), datetime(2027, 2, 25, 13, 0, tzinfo=UTC), JKT, 3,
         (date(2027, 3, 1), datetime(2027, 2, 25, 17, 0, tzinfo=UTC))),
        # opens later than the horizon: nothing to keep a slot for yet
        (date(1990, 3, 1), datetime(2027, 2, 25, 16, 59, tzinfo=UTC), JKT, 0, None),
        # just within it
        (date(1990, 3, 1), datetime(2027, 2, 25, 17, 0, tzinfo=UTC), JKT, 0,
         (date(2027, 3, 1), datetime(2027, 2, 28, 17, 0, tzinfo=UTC))),
        # 29 February, in a year without one: the 28th
        (date(1992, 2, 29), datetime(2027, 2, 26, 12, 0, tzinfo=UTC), JKT, 0,
         (date(2027, 2, 28), datetime(2027, 2, 27, 17, 0, tzinfo=UTC))),
        # the birthday is over on the customer's clock (New York, 00:30 on the 27th): next year's is a year away
        (date(1990, 2, 26), datetime(2027, 2, 27, 5, 30, tzinfo=UTC), "America/New_York", 0, None),
        # still the birthday in New York at 04:30 UTC on the 27th (23:30 on the 26th there)
        (date(1990, 2, 26), datetime(2027, 2, 27, 4, 30, tzinfo=UTC), "America/New_York", 0,
         (date(2027, 2, 26), datetime(2027, 2, 26, 5, 0, tzinfo=UTC))),
        # across the new year: a 1 January birthday seen on 30 December
        (date(1990, 1, 1), datetime(2027, 12, 30, 12, 0, tzinfo=UTC), JKT, 0,
         (date(2028, 1, 1), datetime(2027, 12, 31, 17, 0, tzinfo=UTC))),
        (None, datetime(2027, 2, 25, 13, 0, tzinfo=UTC), JKT, 0, None),
    ],
)  # fmt: skip
def test_a_birthday_to_come_is_seen_when_its_window_opens_within_the_horizon_or_is_open(
    born: date | None, now: datetime, zone: str, days_before: int, expected: tuple[date, datetime] | None
) -> None:
    assert cc.birthday_to_come(born, now, ZoneInfo(zone), days_before, THREE_DAYS) == expected


OPENS = datetime(2027, 2, 25, 17, 0, tzinfo=UTC)
"""Midnight in Jakarta, when a birthday offer's window opens."""


@pytest.mark.parametrize(
    ("planned_by", "expected", "why"),
    [
        (OPENS - timedelta(hours=8), OPENS, "the pass before the window opens plans it ahead: due when it opens"),
        (OPENS, OPENS + cc.PLANNING_MARGIN, "a pass at the very opening plans it due at once: just after that pass"),
        (OPENS + timedelta(hours=9), OPENS + timedelta(hours=9) + cc.PLANNING_MARGIN,
         "open already, the pass nine hours later: just after it, not an hour from now"),
    ],
)  # fmt: skip
def test_a_birthday_offer_no_pass_has_planned_falls_due_at_its_window_or_just_after_the_pass_that_plans_it(
    planned_by: datetime, expected: datetime, why: str
) -> None:
    assert cc.birthday_offer_due(OPENS, planned_by) == expected, why


def test_birthday_messages_expire_at_the_end_of_the_day_in_their_zone() -> None:
    assert cc.birthday_expires(date(2027, 2, 28), ZoneInfo(JKT)) == datetime(2027, 2, 28, 17, 0, tzinfo=UTC)


def test_rating_links_carry_signed_tokens() -> None:
    from worker.core import tokens

    key = b"k" * 32
    stars = cc.rating_links(42, "stars", "https://shop.example/feedback", key, "shop.example")
    assert [x["score"] for x in stars] == [1, 2, 3, 4, 5]
    nps = cc.rating_links(42, "nps", "https://shop.example/feedback?src=mail", key, "Shop.Example")
    assert [x["score"] for x in nps] == list(range(11))
    url = str(nps[10]["url"])
    assert url.startswith("https://shop.example/feedback?src=mail&t=")
    assert tokens.verify(url.split("t=")[1], [key], shop="shop.example") == ("f", "42:10")  # signed for the shop
    assert tokens.verify(url.split("t=")[1], [key], shop="") is None


def _claimed(campaign: str, payload: dict[str, str], step: int = 1) -> ClaimedMessage:
    return ClaimedMessage(0, f"{campaign}:C1", campaign, step, 1, "c1@example.com", "<m@x>", 0, NOW, NOW + ago(5),
                          payload)  # fmt: skip


TEN_DAYS_AGO = NOW - ago(10)


def _send_time(birthday: date | None = None, orders: int = 1, spent: int = 100_000,
               last: datetime | None = TEN_DAYS_AGO, first: datetime | None = None) -> SendTimeFacts:  # fmt: skip
    snapshot = CustomerSnapshot(1, "C1", "c1@example.com", "Siti", Locale.ID, JKT, birthday, True)
    return SendTimeFacts(snapshot, False, orders, last, first_order_id=7, first_order_at=first,
                         total_spent_minor=spent)  # fmt: skip


def _winback(step: int, age_days: float) -> tuple[str, dict[str, str], int, SendTimeFacts]:
    """A win-back step's message (steps of 45, 75 and 120 days, given up after 730) and its customer's only order,
    ``age_days`` old."""
    placed = NOW - ago(age_days)
    return "winback", {"first_order_id": "7"}, step, _send_time(last=placed, first=placed)


_NEWS = (cc.Launch(ProductView("N", "N", "Batik", 100, "IDR", "", ""), NOW - ago(3)),)
STILL_DUE = [  # (case, campaign, payload, step, facts at send time, launches, reason to skip)
    ("win-back step 1, the order 60 days old", *_winback(1, 60), (), None),
    ("win-back step 1, the order exactly 75 days old: still step 1's time", *_winback(1, 75), (), None),
    ("win-back step 1 waited until the order is 76 days old: step 2's time", *_winback(1, 76), (), "no_longer_due"),
    ("win-back step 2, the order 100 days old", *_winback(2, 100), (), None),
    ("win-back step 2 waited until step 3's time", *_winback(2, 121), (), "no_longer_due"),
    ("win-back step 3, the last, a year on", *_winback(3, 365), (), None),
    ("win-back step 3 waited until the order is exactly 730 days old", *_winback(3, 730), (), None),
    ("win-back step 3 waited past give_up_after_days (730)", *_winback(3, 731), (), "no_longer_due"),
    ("win-back step 2 waited past give_up_after_days (730)", *_winback(2, 731), (), "no_longer_due"),
    ("win-back, the order's time not read", "winback", {"first_order_id": "7"}, 1, _send_time(), (), None),
    # a row planned before a step was inserted before it: its number is not the config's, its day count is
    ("win-back step 1 of day 75 (a step inserted since), the order 100 days old", "winback",
     {"first_order_id": "7", "days": "75"}, 1, _winback(1, 100)[3], (), None),
    ("win-back step 1 of day 75 (a step inserted since) waited until step 3's time", "winback",
     {"first_order_id": "7", "days": "75"}, 1, _winback(1, 121)[3], (), "no_longer_due"),
    ("win-back step 3 of day 45 (steps removed since), the order 60 days old", "winback",
     {"first_order_id": "7", "days": "45"}, 3, _winback(3, 60)[3], (), None),
    ("win-back step 3 of day 45 (steps removed since) waited until step 2's time", "winback",
     {"first_order_id": "7", "days": "45"}, 3, _winback(3, 80)[3], (), "no_longer_due"),
    ("birthday unchanged", "birthday", {"birthday": "2027-03-01"}, 1, _send_time(date(1990, 3, 1)), (), None),
    ("born 29 Feb, planned for the 28th", "birthday", {"birthday": "2027-02-28"}, 1, _send_time(date(1992, 2, 29)),
     (), None),
    ("birthday corrected", "birthday", {"birthday": "2027-03-01"}, 1, _send_time(date(1990, 8, 17)), (),
     "no_longer_due"),
    ("birthday removed", "birthday", {"birthday": "2027-03-01"}, 1, _send_time(None), (), "no_longer_due"),
    ("the rated order still counts", "feedback", {"order_id": "7"}, 1, _send_time(), (), None),
    ("the rated order refunded", "feedback", {"order_id": "8"}, 1, _send_time(), (), "no_longer_due"),
    ("5 orders still", "loyalty", {"milestone": "orders-5"}, 1, _send_time(orders=5), (), None),
    ("one refunded: 4 orders", "loyalty", {"milestone": "orders-5"}, 1, _send_time(orders=4), (), "no_longer_due"),
    ("spend fell below", "loyalty", {"milestone": "spend-500"}, 1, _send_time(spent=499), (), "no_longer_due"),
    ("news still new", "new_products", {}, 1, _send_time(), _NEWS, None),
    ("ordered after the news", "new_products", {}, 1, _send_time(last=NOW - ago(1)), _NEWS, "ordered_since"),
    ("nothing new any more (deactivated)", "new_products", {}, 1, _send_time(), (), "no_longer_due"),
    ("every purchase refunded", "new_products", {}, 1, _send_time(orders=0, last=None), _NEWS, "no_longer_due"),
]


@pytest.mark.parametrize(("campaign", "payload", "step", "facts", "launches", "reason"), [x[1:] for x in STILL_DUE],
                         ids=[x[0] for x in STILL_DUE])  # fmt: skip
def test_the_campaign_rule_is_checked_again_right_before_sending(
    campaign: str, payload: dict[str, str], step: int, facts: SendTimeFacts, launches: tuple[cc.Launch, ...],
    reason: str | None,
) -> None:
    got = cc.still_due(_claimed(campaign, payload, step), facts, NOW, rateable={7}, launches=launches, within_days=14,
                       winback_steps=(45, 75, 120), give_up_after_days=730)  # fmt: skip
    assert got == (None if reason is None else SkipReason(reason))


def test_new_product_picks_prefer_their_categories_then_best_sellers() -> None:
    def p(ext: str, cat: str, sold: int = 0) -> ProductView:
        return ProductView(ext, ext, cat, 100, "IDR", "https://shop.example/" + ext, "", sold=sold)

    new = [cc.Launch(p("N1", "Kopi"), NOW - ago(3)), cc.Launch(p("N2", "Batik"), NOW - ago(1)),
           cc.Launch(p("N3", "Kopi"), NOW - ago(1))]  # fmt: skip
    best = [p("B1", "Tas", 9), p("B2", "Kopi", 5), p("B3", "Batik", 1), p("U1", "Tas"), *(x.product for x in new)]
    assert [x.external_id for x in cc.pick_new_products(new, [p("K", "Kopi")], best, 5)] == ["N3", "N1"]
    assert [x.external_id for x in cc.pick_new_products(new, [p("T", "Hijab")], best, 2)] == ["B1", "B2"]
    # best sellers are products that sold: no unsold one fills the list up
    assert [x.external_id for x in cc.pick_new_products(new, [p("B1", "Hijab")], best, 5)] == ["B2", "B3"]
    # every best seller owned: the news itself, whatever its category, newest first (not unsold products)
    owned = [p("B1", "Hijab"), p("B2", "Hijab"), p("B3", "Hijab")]
    assert [x.external_id for x in cc.pick_new_products(new, owned, best, 5)] == ["N2", "N3", "N1"]


def test_winback_sequence_advances_step_by_step_and_stops_when_they_order_again(db_url: str) -> None:
    store = Store.from_url(db_url)
    first_order = NOW - ago(200)
    try:
        shop.upsert_customers(store.engine, [CustomerRecord("C1", "c1@example.com", "Siti", Locale.ID, JKT, None,
                                                            True, "", "")], NOW)  # fmt: skip
        shop.upsert_orders(store.engine, [OrderRecord("O1", "C1", D, first_order, None, 1, "IDR")], NOW)
        steps = []
        for day in (40, 46, 50, 76, 80):
            at = first_order + ago(day)
            batch = [m for b in planning.plan_batches(store, SETTINGS, "winback", at) for m in b]
            store.insert_messages(batch, at)
            steps += [(day, m.step, m.payload["template"]) for m in batch]
        assert steps == [(46, 1, "winback-reminder"), (76, 2, "winback")]
        shop.upsert_orders(store.engine, [OrderRecord("O2", "C1", D, first_order + ago(100), None, 1, "IDR")], NOW)
        late = first_order + ago(130)
        assert list(planning.plan_batches(store, SETTINGS, "winback", late)) == []
    finally:
        store.close()


RENUMBERED = [((30, 60), (14, 30, 60)), ((14, 30, 60), (30, 60)), ((30, 60, 90), (30, 90)), ((30, 60), (30, 90)),
              ((30, 90), (30, 60, 90)), ((30, 60), (20, 45, 60)), ((14, 30, 60), (30, 60, 90)),
              ((14, 30, 60), (14, 60)),
              (((14, 30, 60), (30, 60)), (35, 60)), (((14, 30, 60), (30, 60)), (30, 90))]  # fmt: skip
"""(steps before, steps now); steps before as a sequence of configs: the first plans 40 days ago, the next 20 days
and 1 day ago (rows under keys of their own, ``…:<step>d<days>``, then the steps changed again)."""
TEMPLATES = {"one template": lambda _d: "winback", "a template per day count": lambda d: f"winback-{d}",
             "a reminder's template apart": lambda d: "winback-reminder" if d == 14 else "winback"}


def winback_steps(days: tuple[int, ...], template: Callable[[int], str] = TEMPLATES["one template"]) -> Settings:
    return settings_from_dict({"campaigns": {"winback": {"holdout_share": 0.0, "steps": [
        {"days": d, "template": template(d)} for d in days]}}})  # fmt: skip


@pytest.mark.parametrize("templates", list(TEMPLATES))
@pytest.mark.parametrize(("was", "now"), RENUMBERED, ids=[f"{a}->{b}" for a, b in RENUMBERED])
def test_steps_renumbered_in_the_config_plan_what_the_rule_says(
    db_url: str, was: tuple[Any, ...], now: tuple[int, ...], templates: str
) -> None:
    """One-time buyers of every age, planned by passes 40, 20 and 1 days ago under the old steps (each pass's rows
    inserted), then planned under the new steps: the planner plans exactly what the rule says for the ledger's rows
    (a step's day count that has a row of it or a later one, whatever the number, is not planned again; a step
    whose number has a row planned as another step gets a key of its own), and no day count twice for an order."""
    template = TEMPLATES[templates]
    store = Store.from_url(db_url)
    try:
        ages = [12, 16, 22, 31, 35, 46, 52, 59, 61, 65, 89, 91, 120]
        load(store, [Case(f"{age} days", 1, (o(D, age),)) for age in ages])
        configs = was if isinstance(was[0], tuple) else (was,)
        for i, days_ago in enumerate((40, 20, 1)):
            steps = configs[min(i, len(configs) - 1)]
            planning.plan_into_ledger(store, winback_steps(steps, template), "winback", NOW - ago(days_ago))
        rows = ledger(store, "winback")
        had: dict[str, int] = {}
        for key, row in rows.items():
            order = key.split(":")[2]
            had[order] = max(had.get(order, 0), int(row[4]["days"]))
        planned = {key: (int(row[4]["days"]), row[4]["template"]) for key, row in rows.items()}
        expected = set()
        for i, age in enumerate(ages):
            f = cc.Facts(f"C{i}", orders=(OrderFacts(f"O{i}-0", D, NOW - ago(age), None, 10_000_000, "IDR"),),
                         planned_keys=frozenset(rows), winback_days=had, winback_rows=planned)  # fmt: skip
            expected |= set(cc.winback_due_keys(f, NOW, now, step_templates=[template(d) for d in now]))
        if (was, now) == ((14, 30, 60), (30, 60)):  # day 60, now step 2, for those who had day 30 as step 2
            assert {k.rsplit(":", 1)[1] for k in expected} >= {"2d60"}
        after = winback_steps(now, template)
        shown = {m.dedupe_key for b in planning.plan_batches(store, after, "winback", NOW) for m in b}
        assert shown == expected
        assert planning.plan_into_ledger(store, after, "winback", NOW) == len(expected)
        days = [(key.split(":")[2], row[4]["days"]) for key, row in ledger(store, "winback").items()]
        assert len(days) == len(set(days)), "a step's day count planned twice for one order"
    finally:
        store.close()


def test_the_skeletons_single_step_config_still_plans_one_step() -> None:
    legacy = settings_from_dict({"campaigns": {"winback": {"quiet_days": 30, "coupon_code": "X5",
                                                           "coupon_percent": 5}}})  # fmt: skip
    (step,) = legacy.campaigns.winback.effective_steps
    assert (step.days, step.template, step.coupon_code, step.coupon_percent) == (30, "winback", "X5", 5)


def test_holdout_rows_are_planned_as_skipped_held_out(sqlite_url: str) -> None:
    migrate(sqlite_url)
    store = Store.from_url(sqlite_url)
    held = dataclasses.replace(SETTINGS, campaigns=dataclasses.replace(
        SETTINGS.campaigns, winback=dataclasses.replace(SETTINGS.campaigns.winback, holdout_share=0.5)))
    try:
        table = [Case(f"c{i}", 1, (o(D, 80),)) for i in range(200)]
        load(store, table)
        batch = [m for b in planning.plan_batches(store, held, "winback", NOW) for m in b]
        store.insert_messages(batch, NOW)
        counts = store.status_counts("winback")
        assert 70 < counts[("winback", "skipped", "held_out")] < 130
        assert counts[("winback", "skipped", "held_out")] + counts[("winback", "planned", None)] == 200
    finally:
        store.close()


# --- the set-based planner: what `run` inserts is what preview shows, and what the pure functions say ----

HELD = dataclasses.replace(SETTINGS, campaigns=dataclasses.replace(SETTINGS.campaigns, **{
    name: dataclasses.replace(getattr(SETTINGS.campaigns, name), holdout_share=0.5) for name in TABLES}))  # fmt: skip


def ledger(store: Store, campaign: str) -> dict[str, tuple[Any, ...]]:
    import json

    import sqlalchemy as sa

    from worker.adapters.store import M

    with store.engine.begin() as conn:
        rows = conn.execute(sa.select(M).where(M.c.campaign == campaign)).all()
    return {
        r.dedupe_key: (r.step, r.customer_id, r.email, r.message_id, json.loads(r.payload), r.expires_at,
                       r.priority, (r.status, r.skip_reason))
        for r in rows
    }  # fmt: skip


@pytest.mark.parametrize("campaign", list(TABLES))
def test_inserted_rows_match_preview_and_the_pure_functions(db_url: str, campaign: str) -> None:
    """`run` inserts with INSERT … SELECT, preview streams the same SELECT: same rows, and every Message-ID
    is the pure function's (SQLite calls it; PostgreSQL computes SHA-256 itself), every holdout too. Inserted rows
    (birthday's excepted, planned in Python) get their Message-ID when first claimed: the one preview showed."""
    from worker.core.audiences import message_id_for
    from worker.core.policy import in_holdout

    table = TABLES[campaign]
    store = Store.from_url(db_url)
    try:
        load(store, table)
        shown = [m for batch in planning.plan_batches(store, HELD, campaign, NOW) for m in batch]
        assert shown, "the table must plan something"
        domain = HELD.shop.domain
        for m in shown:
            assert m.message_id == message_id_for(m.dedupe_key, domain)
            assert m.held_out == in_holdout(m.customer_id, campaign, 0.5), m.dedupe_key
        assert {m.held_out for m in shown} == {True, False} or len(shown) < 4
        expected = {
            m.dedupe_key: (m.step, m.customer_id, m.email, m.message_id, m.payload, m.expires_at, m.priority,
                           ("planned", None) if m.skip_reason is None else ("skipped", m.skip_reason.value))
            for m in shown
        }  # fmt: skip
        assert planning.plan_into_ledger(store, HELD, campaign, NOW) == len(shown)
        if planning.plans(store, HELD, campaign, NOW) is not None:  # set-based: no SHA-256 per inserted row
            expected = {k: (*v[:3], None, *v[4:]) for k, v in expected.items()}
        assert ledger(store, campaign) == expected
        assert planning.plan_into_ledger(store, HELD, campaign, NOW) == 0
        assert list(planning.plan_batches(store, HELD, campaign, NOW)) == []
        due = [m for batch in store.due_messages(now=NOW, campaigns=[campaign], domain=domain) for m in batch]
        assert {m.dedupe_key: m.message_id for m in due} == {
            m.dedupe_key: m.message_id for m in shown if m.skip_reason is None
        }
        claimed = store.claim(worker="w", now=NOW, limit=1000, lease_seconds=60, domain=domain)
        assert {c.dedupe_key: c.message_id for c in claimed} == {
            m.dedupe_key: m.message_id for m in shown if m.skip_reason is None
        }
    finally:
        store.close()


def test_payloads_carry_what_composing_reads(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        load(store, [Case("win-back step 2", 1, (o(D, 80),)), Case("feedback", 1, (o(D, 12, 8),))])
        (win,) = [m for b in planning.plan_batches(store, SETTINGS, "winback", NOW) for m in b]
        assert (win.step, win.payload["template"], win.payload["days"], win.payload["first_order"]) == (
            2, "winback", "75", "O0-0")
        assert int(win.payload["first_order_id"]) > 0
        (fb,) = [m for b in planning.plan_batches(store, SETTINGS, "feedback", NOW) for m in b]
        assert (fb.payload["order"], fb.payload["customer"]) == ("O1-0", "C1") and int(fb.payload["order_id"]) > 0
    finally:
        store.close()


def test_chunked_inserts_cover_everyone_once(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """23 new candidates, streamed and inserted 2 at a time while the read goes on."""
    from worker.adapters import plan_sql

    monkeypatch.setattr(plan_sql, "INSERT_IDS", 2)
    store = Store.from_url(db_url)
    try:
        load(store, [Case(f"c{i}", 1, (o(D, 80),)) for i in range(23)])
        (plan,) = planning.plans(store, SETTINGS, "winback", NOW) or []
        assert plan_sql.insert(store.engine, plan, "shop.example") == 23
        assert plan_sql.insert(store.engine, plan, "shop.example") == 0
        assert len(ledger(store, "winback")) == 23
    finally:
        store.close()


def test_an_sqlite_insert_that_fails_midway_ends_the_read_that_ran_ahead_of_it(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read that finds new candidates runs ahead of the inserts on a thread of its own; an insert that fails
    keeps what committed before it, raises, and leaves no read transaction open (a reader left open would pin
    the WAL: no checkpoint could empty it)."""
    import sqlite3

    import sqlalchemy as sa

    from worker.adapters import plan_sql

    monkeypatch.setattr(plan_sql, "INSERT_IDS", 2)
    migrate(sqlite_url)
    store = Store.from_url(sqlite_url)
    try:
        load(store, [Case(f"c{i}", 1, (o(D, 80),)) for i in range(23)])
        with store.engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_c9 BEFORE INSERT ON message WHEN NEW.email = 'c9@example.com'"
                " BEGIN SELECT RAISE(ABORT, 'c9 refused'); END"
            )
        (plan,) = planning.plans(store, SETTINGS, "winback", NOW) or []
        with pytest.raises(sa.exc.IntegrityError, match="c9 refused"):
            plan_sql.insert(store.engine, plan, "shop.example")
        assert [t.name for t in threading.enumerate() if t.name.endswith("-read")] == []
        planned = {row[2] for row in ledger(store, "winback").values()}
        assert planned and "c9@example.com" not in planned and len(planned) < 23
        other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            other.close()
        assert busy == 0  # no reader left behind
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_c9")
        assert plan_sql.insert(store.engine, plan, "shop.example") == 23 - len(planned)
    finally:
        store.close()


def test_a_pass_that_finds_nothing_new_never_waits_for_the_writer(sqlite_url: str) -> None:
    """The steady state only reads: another connection holding SQLite's write lock (the sender committing,
    another process planning) does not hold it up, while a write in its place would have had to wait."""
    import sqlite3

    import sqlalchemy as sa

    migrate(sqlite_url)
    store = Store.from_url(sqlite_url)
    try:
        load(store, [Case(f"c{i}", 1, (o(D, 80),)) for i in range(7)])
        assert planning.plan_into_ledger(store, SETTINGS, "winback", NOW) == 7
        store.engine.dispose()

        @sa.event.listens_for(store.engine, "connect")
        def _impatient(dbapi_conn: Any, _record: Any) -> None:  # fail at once, not after the busy timeout
            dbapi_conn.execute("PRAGMA busy_timeout = 0")

        writer = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None, timeout=0)
        writer.execute("BEGIN IMMEDIATE")
        try:
            assert planning.plan_into_ledger(store, SETTINGS, "winback", NOW) == 0
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                store.suppress("c0@example.com", reason="test", source="test", now=NOW)
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    finally:
        store.close()


def test_news_is_sent_once_not_again_the_next_week_unless_something_new_launched(db_url: str) -> None:
    """New products' key counts the week of the newest launch. The day after NOW is a Monday, a new ISO week:
    P-NEW (launched last Tuesday) is still "new" but was announced, so nothing is planned; once P-SOON has
    launched, that week, it is."""
    store = Store.from_url(db_url)
    try:
        load(store, [Case("last order 10 days ago", 1, (o(D, 10),))])
        assert planning.plan_into_ledger(store, SETTINGS, "new_products", NOW) == 1
        monday = NOW + timedelta(days=1)
        assert cc.iso_week(monday.astimezone(ZoneInfo(JKT)).date()) != WEEK
        assert planning.plan_into_ledger(store, SETTINGS, "new_products", monday) == 0
        after_launch = NOW + timedelta(days=3)
        assert planning.plan_into_ledger(store, SETTINGS, "new_products", after_launch) == 1
        soon = cc.iso_week((NOW + ago(2)).astimezone(ZoneInfo(JKT)).date())
        assert sorted(ledger(store, "new_products")) == [f"new_products:C0:{WEEK}", f"new_products:C0:{soon}"]
    finally:
        store.close()


def test_a_pass_plans_what_preview_shows_and_a_failing_campaign_stops_no_other(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every campaign's table in one shop, planned as `run` does (two at a time, the largest first): the ledger
    holds exactly what preview showed, the report follows the caller's order, and a campaign that fails leaves
    the others planned and its error raised; the next pass plans it."""
    store = Store.from_url(db_url)
    try:
        load(store, [case for table in TABLES.values() for case in table])
        campaigns = list(TABLES)
        shown = {c: set(planned_keys(store, c)) for c in campaigns}
        assert all(shown.values())
        real = planning.plan_into_ledger

        def broken(store: Store, settings: Settings, campaign: str, now: datetime) -> int:
            if campaign == "winback":
                raise RuntimeError("winback broke")
            return real(store, settings, campaign, now)

        monkeypatch.setattr(planning, "plan_into_ledger", broken)
        with pytest.raises(RuntimeError, match="winback broke"):
            planning.plan_campaigns(store, SETTINGS, campaigns, NOW, threads=2)
        assert not ledger(store, "winback")
        assert all(set(ledger(store, c)) == shown[c] for c in campaigns if c != "winback")

        monkeypatch.setattr(planning, "plan_into_ledger", real)
        report = planning.plan_campaigns(store, SETTINGS, campaigns, NOW, threads=2)
        assert list(report) == campaigns
        assert {c: p.created for c, p in report.items()} == {c: len(shown["winback"]) if c == "winback" else 0
                                                             for c in campaigns}  # fmt: skip
        assert set(ledger(store, "winback")) == shown["winback"]
    finally:
        store.close()


@pytest.mark.parametrize(("statistics_off", "at_once"), [(True, 2), (False, 1)])
def test_sqlite_plans_two_campaigns_at_once_only_with_its_memory_statistics_off(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, statistics_off: bool, at_once: int
) -> None:
    """With SQLite's memory statistics on, every allocation takes one process-wide mutex and two planning
    threads are slower than one: SQLite then plans one campaign at a time, and each reads and inserts in turn
    on its own thread instead of reading ahead on a second one."""
    import threading

    from worker.adapters import db, plan_sql

    monkeypatch.setattr(db, "without_sqlite_memstatus", lambda: statistics_off)
    read_on: set[str] = set()
    real_read = plan_sql._new_idents

    def reading(*args: Any) -> Any:
        read_on.add(threading.current_thread().name)
        return real_read(*args)

    monkeypatch.setattr(plan_sql, "_new_idents", reading)
    real = planning.plan_into_ledger
    running, most, changed = 0, 0, threading.Condition()

    def counted(store: Store, settings: Settings, campaign: str, now: datetime) -> int:
        nonlocal running, most
        with changed:
            running += 1
            most = max(most, running)
            changed.notify_all()
            # the first campaign waits for a second to plan beside it: as long as it takes where two go at once,
            # a moment where one should (long enough for a second thread, were there one, to start meanwhile)
            changed.wait_for(lambda: most >= 2, timeout=10 if at_once == 2 else 0.2)
        try:
            return real(store, settings, campaign, now)
        finally:
            with changed:
                running -= 1

    monkeypatch.setattr(planning, "plan_into_ledger", counted)
    migrate(sqlite_url)
    store = Store.from_url(sqlite_url)
    try:
        load(store, [case for table in TABLES.values() for case in table])
        planning.plan_campaigns(store, SETTINGS, list(TABLES), NOW)
        assert most == at_once
        assert read_on and all(name.endswith("-read") == statistics_off for name in read_on), read_on
    finally:
        store.close()


@pytest.mark.postgres
def test_a_row_of_the_campaign_written_beside_the_planning_lock_is_left_alone(
    pg_migrated_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL plans with a plain INSERT (no ON CONFLICT), relying on the planning lock and NOT EXISTS.
    A row of the same campaign written without the lock, still uncommitted when the plan reads the ledger,
    makes that INSERT fail once it commits; the plan then inserts again, leaving that row alone."""
    import threading
    import time

    import sqlalchemy as sa

    from worker.adapters import plan_sql
    from worker.adapters.store import M

    store = Store.from_url(pg_migrated_url)
    try:
        load(store, [Case(f"c{i}", 1, (o(D, 80),)) for i in range(5)])
        first = next(m for batch in planning.plan_batches(store, SETTINGS, "winback", NOW) for m in batch)
        (plan,) = planning.plans(store, SETTINGS, "winback", NOW) or []
        beside = store.engine.connect()
        unlocked = beside.begin()
        beside.execute(sa.insert(M).values(
            dedupe_key=first.dedupe_key, campaign="winback", step=first.step, priority=0,
            customer_id=first.customer_id, email=first.email, status="skipped", skip_reason="manual",
            due_at=NOW, expires_at=NOW, next_attempt_at=NOW, attempts=0, payload="{}", created_at=NOW,
            updated_at=NOW,
        ))  # fmt: skip
        created: list[int] = []
        planner = threading.Thread(target=lambda: created.append(plan_sql.insert(store.engine, plan, "shop.example")))
        planner.start()
        # the activity a transaction sees is read once, at its first look: each look its own transaction
        waiting = sa.text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND wait_event_type = 'Lock' AND wait_event = 'transactionid'")  # fmt: skip
        deadline = time.monotonic() + 20
        try:
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
                while not watch.execute(waiting).scalar_one() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert watch.execute(waiting).scalar_one() == 1, "the plan's INSERT never waited on the key"
            unlocked.commit()
        finally:
            if unlocked.is_active:  # the wait failed: let the planner go before the test ends
                unlocked.rollback()
            beside.close()
            planner.join(timeout=20)
        assert created == [4]
        rows = ledger(store, "winback")
        assert len(rows) == 5 and rows[first.dedupe_key][-1] == ("skipped", "manual")
        assert [r.getMessage() for r in caplog.records if "plan_insert_conflict" in r.getMessage()]
    finally:
        store.close()


def test_sqlite_planning_writes_without_foreign_key_checks_and_gives_every_connection_back_with_them(
    sqlite_url: str,
) -> None:
    """SQLite's planning insert turns its connection's foreign key checks off (its rows take the customer from
    the customer table, in the same write transaction); every connection in the pool afterwards checks them."""
    import sqlalchemy as sa

    from worker.adapters import db
    from worker.adapters.store import M

    migrate(sqlite_url)
    store = Store.from_url(sqlite_url)
    try:
        load(store, [Case(f"c{i}", 1, (o(D, 80),)) for i in range(5)])
        with db.writing_without_foreign_keys(store.engine) as conn:
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 0
        with pytest.raises(RuntimeError, match="midway"), db.writing_without_foreign_keys(store.engine):
            raise RuntimeError("midway")  # a failure in the body gives the connection back checked too
        assert planning.plan_into_ledger(store, SETTINGS, "winback", NOW) == 5
        # every connection the pool holds, all at once (raw: no transaction, so none waits for another)
        pooled = [store.engine.raw_connection() for _ in range(store.engine.pool.checkedin())]  # type: ignore[attr-defined]
        try:
            checks = [c.cursor().execute("PRAGMA foreign_keys").fetchone()[0] for c in pooled]
            assert checks and checks == [1] * len(checks)
        finally:
            for c in pooled:
                c.close()
        orphan = dict(dedupe_key="x", campaign="winback", step=1, priority=0, customer_id=999, email="x@example.com",
                      status="planned", due_at=NOW, expires_at=NOW, next_attempt_at=NOW, attempts=0, payload="{}",
                      created_at=NOW, updated_at=NOW)  # fmt: skip
        with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"), store.engine.begin() as conn:
            conn.execute(sa.insert(M).values(**orphan))
    finally:
        store.close()


def test_loyalty_spend_follows_a_changed_shop_currency_in_preview_and_in_the_ledger(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Spend totals are counted at import in the shop's currency of the day. The operator imported a shop selling
    in dollars with the default currency (IDR) and then set ``shop.currency = "USD"``: a customer who spent USD
    6,000,000 yesterday is due the USD 5,000,000 milestone. Preview (which writes nothing) plans it from the
    orders, and a pass counts the stored totals again in dollars, once, saying so."""
    spender = Case("USD 6.000.000 spent yesterday", 1, (o(D, 1, total=6_000_000, currency="USD"),))
    table = [spender, Case("USD 100 yesterday", 0, (o(D, 1, total=100, currency="USD"),))]
    store = Store.from_url(db_url)
    try:
        assert shop.settle_spend_currency(store.engine, "IDR", NOW) == shop.SpendRecount(None, 0)
        load(store, table)  # counted in rupiah: USD orders add nothing
        dollars = dataclasses.replace(SETTINGS, shop=dataclasses.replace(SETTINGS.shop, currency="USD"))
        due = "loyalty:C0:spend-500000000"
        assert set(planned_keys(store, "loyalty", dollars)) == {due}
        assert store.send_time_facts([1])[1].total_spent_minor == 0, "preview wrote nothing"
        with caplog.at_level("INFO", logger="kembali"):
            assert planning.plan_into_ledger(store, dollars, "loyalty", NOW) == 1
        assert store.send_time_facts([1])[1].total_spent_minor == 6_000_000_00
        assert shop.spend_currency(store.engine) == "USD"
        counted = [r for r in caplog.records if r.getMessage() == "spend_totals_counted_again"]
        assert [(r.levelname, r.kembali_fields["was"], r.kembali_fields["customers_changed"])  # type: ignore[attr-defined]
                for r in counted] == [("WARNING", "IDR", 2)]  # fmt: skip
        assert planning.plan_into_ledger(store, dollars, "loyalty", NOW) == 0
        assert len([r for r in caplog.records if r.getMessage() == "spend_totals_counted_again"]) == 1, "once"
        # and back: the rupiah totals again (none), nothing planned in rupiah for dollars spent
        assert shop.settle_spend_currency(store.engine, "IDR", NOW) == shop.SpendRecount("USD", 2)
        assert set(planned_keys(store, "loyalty")) == set()
    finally:
        store.close()


def test_stored_orders_past_what_a_total_holds_block_no_loyalty_pass(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A database imported by an older Kembali may hold orders in another currency than the shop's whose sum, for
    one customer, is past 2^63 - 1 minor units (its import bounded the shop's currency alone). Once
    ``shop.currency`` names that currency, preview, a pass (which counts the totals again) and the send-time
    re-check read them without failing (SQLite's "integer overflow", PostgreSQL's "bigint out of range" failed
    every loyalty pass): the milestone is due, the total is the most it holds, and the customer is named."""
    table = [Case("CLF 1.8 * 10^15, stored by an older import", 0),
             Case("CLF 6.000.000 yesterday", 0, (o(D, 1, total=600_000_000, currency="CLF"),))]  # fmt: skip
    store = Store.from_url(db_url)
    try:
        load(store, table)
        stored_orders(store.engine, "C0", [("F-1", "delivered", 9 * 10**18, "CLF", NOW - ago(1)),
                                           ("F-2", "delivered", 9 * 10**18, "CLF", NOW - ago(2))])  # fmt: skip
        with store.engine.begin() as conn:  # counted in the shop's currency of the day (IDR) by that import
            shop.refresh_customer_stats(conn, [1], NOW, "IDR")
        clf = dataclasses.replace(SETTINGS, shop=dataclasses.replace(SETTINGS.shop, currency="CLF"))
        due = {"loyalty:C0:spend-50000000000", "loyalty:C1:spend-50000000000"}  # CLF 5.000.000
        assert set(planned_keys(store, "loyalty", clf)) == due
        with caplog.at_level("INFO", logger="kembali"):
            assert planning.plan_into_ledger(store, clf, "loyalty", NOW) == 2
        assert store.send_time_facts([1])[1].total_spent_minor == 2**63 - 1
        named = [r for r in caplog.records if r.getMessage() == "spend_total_too_large"]
        assert [(r.levelname, r.kembali_fields["customer"], r.kembali_fields["currency"])  # type: ignore[attr-defined]
                for r in named] == [("WARNING", "C0", "CLF")]  # fmt: skip
        assert store.paid_totals([1, 2], "CLF") == {1: (2, 18 * 10**18), 2: (1, 60_000_000_000)}
    finally:
        store.close()


@pytest.mark.postgres
def test_the_winback_insert_probes_earlier_steps_by_the_keys_index_when_the_ledger_looks_empty(
    pg_migrated_url: str,
) -> None:
    """Win-back's probe for a row of the order under another step number is a nested loop, one per candidate. On a
    first pass the ledger's statistics say it is empty, and PostgreSQL then read the ledger with a sequential scan
    per candidate, over the rows the very INSERT was writing (a first pass over 50,000 customers took 70 s instead
    of 1): the INSERT probes the dedupe key's index instead, whatever the statistics say."""
    import sqlalchemy as sa

    from worker.adapters import plan_sql

    store = Store.from_url(pg_migrated_url)
    try:
        load(store, [Case(f"c{i}", 1, (o(D, 80),)) for i in range(5)])
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE message")
        (plan,) = planning.plans(store, SETTINGS, "winback", NOW) or []
        columns = plan_sql._columns(plan, "postgresql", "shop.example", message_id=False)
        labelled = [v.label(k) for k, v in columns.items()]
        select = sa.select(*labelled).select_from(plan.from_).where(*plan_sql._new(plan))
        sql = str(select.compile(store.engine, compile_kwargs={"literal_binds": True}))
        with store.engine.connect() as conn, conn.begin():
            plan_sql._tune(conn, plan)  # as the INSERT's transaction is tuned
            shown = "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql))
        assert "using message_dedupe_key_key on message earlier" in shown, shown
        # (and the probes of the row at the step's key, for the rule and for the key: ``taken`` and ``moved``)
        assert "using message_dedupe_key_key on message taken" in shown, shown
        assert "using message_dedupe_key_key on message moved" in shown, shown
        assert "using message_dedupe_key_key on message own_keys" in shown, shown
        assert "Seq Scan on message" not in shown, shown
    finally:
        store.close()


def test_the_row_at_a_steps_key_is_found_that_steps_by_its_text_as_this_database_writes_it(db_url: str) -> None:
    """The steady state's shortcut (``plan_sql._has_days``): every win-back row a pass plans is recognised as its
    step's by a search of its payload's text, without parsing the JSON. A format that drifted would still plan
    right (the JSON decides then) but slower: this keeps the shortcut taken."""
    import sqlalchemy as sa

    from worker.adapters import plan_sql
    from worker.adapters.store import M

    store = Store.from_url(db_url)
    try:
        load(store, [Case(f"{age} days", 1, (o(D, age),)) for age in (50, 80, 130)])
        assert planning.plan_into_ledger(store, SETTINGS, "winback", NOW) == 3
        days = plan_sql.payload_days(store.dialect, M.c.payload)
        found = plan_sql._has_days(store.dialect, M.c.payload, sa.cast(days, sa.String))
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(days, found).where(M.c.campaign == "winback").order_by(days)).all()
        assert [(d, bool(f)) for d, f in rows] == [(45, True), (75, True), (120, True)]
        # and a row of other days is not
        other = plan_sql._has_days(store.dialect, M.c.payload, sa.literal("4"))
        with store.engine.connect() as conn:
            assert not any(conn.execute(sa.select(other).where(M.c.campaign == "winback")).scalars())
    finally:
        store.close()


def test_two_workers_planning_win_back_at_once_on_sqlite_plan_each_step_once(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a pass reads its candidates, then inserts them under the write lock. Another worker (a `run --once`
    beside the daemon) that plans the same candidates in between has rows at their steps' keys by then: the insert
    plans nothing again for them, under the step's key or under a key of its own (a row at the step's key planned
    as another step would give one), and two passes at once plan each step once."""
    from worker.adapters import plan_sql

    migrate(sqlite_url)
    store, other = Store.from_url(sqlite_url), Store.from_url(sqlite_url)
    real = plan_sql._new_idents
    interleaved = []

    def read_then_the_other_worker_plans(engine: Any, plan: Any) -> Any:
        parts = list(real(engine, plan))
        if not interleaved:  # this pass's read is done: the other worker plans the same now, before its insert
            interleaved.append(None)  # (the other worker's own read is not interleaved)
            interleaved[0] = planning.plan_into_ledger(other, SETTINGS, "winback", NOW)
        yield from parts

    try:
        load(store, [Case(f"{age} days", 1, (o(D, age),)) for age in (50, 80, 130)])
        monkeypatch.setattr(plan_sql, "_new_idents", read_then_the_other_worker_plans)
        assert planning.plan_into_ledger(store, SETTINGS, "winback", NOW) == 0
        assert interleaved == [3]
        assert sorted(k.rsplit(":", 1)[1] for k in ledger(store, "winback")) == ["1", "2", "3"]
    finally:
        store.close()
        other.close()


def test_the_longest_ids_an_import_takes_are_planned_on_both_databases(db_url: str) -> None:
    """Customer and order ids as long as an import takes (``importer.MAX_ID``), of colons, which a dedupe key
    escapes as ``%3A``: their keys are longer than the ledger's 200 characters on PostgreSQL, which refused the
    whole INSERT, and then no one-time buyer of the shop got a win-back email. Every campaign plans them."""
    from worker.adapters.importer import MAX_ID

    store = Store.from_url(db_url)
    try:
        who, order = ":" * MAX_ID, "O" + ":" * (MAX_ID - 1)
        others = [Case("one-time buyer", 1, (o(D, 80),)), Case("five orders", 1, tuple(o(D, 3 + i) for i in range(5)))]
        load(store, others)
        shop.upsert_customers(store.engine, [CustomerRecord(who, "long@example.com", "Long", Locale.ID, JKT,
                                                            NOW.date() - timedelta(days=365 * 30), True, "opt_in",
                                                            "checkout")], NOW)  # fmt: skip
        shop.upsert_orders(store.engine, [OrderRecord(order, who, D, NOW - ago(80), None, 100_000, "IDR")], NOW)
        planned = {campaign: planning.plan_into_ledger(store, SETTINGS, campaign, NOW) for campaign in TABLES}
        assert planned["winback"] == 2  # C0 and the long ids
        keys = [k for k in ledger(store, "winback") if "%3A" in k]
        assert [len(k) for k in keys] == [len("winback:") + 3 * MAX_ID + 1 + 1 + 3 * (MAX_ID - 1) + 2]
    finally:
        store.close()


_MAR_5 = date(2027, 3, 5)
_Y, _C1, _C2, _C3 = cc.birthday_keys("B1", _MAR_5)


@pytest.mark.parametrize(
    ("known", "planned"),
    [
        ({}, _Y),  # the year's first offer
        ({_Y: None}, None),  # sent (or under way, or skipped for good): one a year
        ({_Y: "2027-03-05"}, None),  # waiting to be sent for this very day
        ({_Y: "2027-03-04"}, _C1),  # waiting for the day before the correction: skipped at send time, so again
        ({_Y: ""}, _C1),  # skipped as no_longer_due (the birthday corrected since)
        ({_Y: "", _C1: None}, None),  # the corrected day's offer was sent: no other that year
        ({_Y: "", _C1: ""}, _C2),  # corrected again before it went
        ({_Y: "", _C1: "2027-03-05"}, None),  # the correction's offer waits for this day
        ({_Y: "", _C1: "", _C2: "", _C3: ""}, None),  # corrected more often than BIRTHDAY_CORRECTIONS
    ],
)
def test_a_birthday_offer_is_planned_once_a_year_and_again_only_when_a_correction_left_it_unsent(
    known: dict[str, str | None], planned: str | None
) -> None:
    assert cc.birthday_key_to_plan("B1", _MAR_5, known) == planned


_O5 = cc.loyalty_keys("L1", "orders-5")


@pytest.mark.parametrize(
    ("known", "replannable", "planned"),
    [
        (set(), set(), _O5[0]),  # the milestone's first reward
        ({_O5[0]}, set(), None),  # sent, on its way, held out, merged, skipped otherwise: once per milestone
        ({_O5[0]}, {_O5[0]}, _O5[1]),  # skipped unsent, the milestone no longer reached: reached again
        ({_O5[0], _O5[1]}, {_O5[0]}, None),  # the reward of the milestone reached again went
        ({_O5[0], _O5[1]}, {_O5[0], _O5[1]}, _O5[2]),
        (set(_O5), set(_O5), None),  # reached again more often than LOYALTY_REPLANS
        ({_O5[1]}, set(), None),  # the milestone's first row deleted by hand: its reward at :r1 went all the same
        ({_O5[1]}, {_O5[1]}, _O5[0]),
    ],
)
def test_a_milestones_reward_is_planned_once_and_again_only_when_it_was_skipped_unsent(
    known: set[str], replannable: set[str], planned: str | None
) -> None:
    assert cc.loyalty_key_to_plan("L1", "orders-5", known, replannable) == planned


_FIVE = Case("5th order 3 days ago", 1, tuple(o(D, 3 + 10 * i) for i in range(5)))
_BOTH = Case("5 orders and Rp6.000.000: both milestones", 2, tuple(o(D, 3 + i, total=1_200_000) for i in range(5)))


def _set_rows(store: Store, rows: dict[str, tuple[str, str | None, int]]) -> None:
    import sqlalchemy as sa

    from worker.adapters.store import M

    with store.engine.begin() as conn:
        for key, (status, reason, resent_after) in rows.items():
            conn.execute(sa.update(M).where(M.c.dedupe_key == key).values(
                status=status, skip_reason=reason, resent_after_attempts=resent_after))


@pytest.mark.parametrize(
    ("was", "again"),
    [
        (("skipped", "no_longer_due", 0), True),  # refunded before it went: never arrived
        (("sent", None, 0), False),
        (("planned", None, 0), False),
        (("uncertain", None, 0), False),
        (("failed", None, 0), False),
        (("skipped", "held_out", 0), False),
        (("skipped", "suppressed", 0), False),
        (("skipped", "capped", 0), False),
        (("skipped", "expired", 0), False),
        # uncertain, resent by the operator, then no longer due: the first attempt may have arrived
        (("skipped", "no_longer_due", 1), False),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_a_milestone_reached_again_is_planned_again_only_when_its_reward_was_skipped_unsent(
    db_url: str, was: tuple[str, str | None, int], again: bool
) -> None:
    """The planner (preview's read and the run's insert) and ``loyalty_key_to_plan`` agree on every state the
    milestone's first row may be in: a reward that went, may have gone, or is held out or skipped for good is not
    planned a second time."""
    store = Store.from_url(db_url)
    try:
        load(store, [_FIVE])
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 1
        _set_rows(store, {"loyalty:C0:orders-5": was})
        expected = ["loyalty:C0:orders-5:r1"] if again else []
        assert cc.loyalty_due_keys(dataclasses.replace(
            facts(0, _FIVE), planned_keys=frozenset({"loyalty:C0:orders-5"}),
            replannable=frozenset({"loyalty:C0:orders-5"} if was == ("skipped", "no_longer_due", 0) else ())),
            NOW, planning.loyalty_milestones(SETTINGS)) == expected  # fmt: skip
        assert list(planned_keys(store, "loyalty")) == expected
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == len(expected)
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 0
        assert sorted(ledger(store, "loyalty")) == sorted(["loyalty:C0:orders-5", *expected])
    finally:
        store.close()


def test_two_milestones_reached_again_by_one_order_are_one_email_again(db_url: str) -> None:
    """Both milestones' rewards skipped unsent (the order that reached them refunded, the spend one sent on its own
    and then no longer due either): reached again by one order, they are one email again, the spend one merged into
    the order one's, each under its ``:r1`` key; preview shows what the run inserts."""
    store = Store.from_url(db_url)
    try:
        load(store, [_BOTH])
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 2
        _set_rows(store, {"loyalty:C0:orders-5": ("skipped", "no_longer_due", 0),
                          "loyalty:C0:spend-500000000": ("skipped", "no_longer_due", 0)})  # fmt: skip
        shown = {m.dedupe_key: (m.payload, m.skip_reason)
                 for batch in planning.plan_batches(store, SETTINGS, "loyalty", NOW) for m in batch}  # fmt: skip
        orders, spend = "loyalty:C0:orders-5:r1", "loyalty:C0:spend-500000000:r1"
        assert shown == {
            orders: ({"milestone": "orders-5", "carries": spend}, None),
            spend: ({"milestone": "spend-500000000", "merged_into": orders}, SkipReason.MERGED),
        }
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 2
        rows = ledger(store, "loyalty")
        assert {k: (rows[k][4], rows[k][7]) for k in (orders, spend)} == {
            orders: ({"milestone": "orders-5", "carries": spend}, ("planned", None)),
            spend: ({"milestone": "spend-500000000", "merged_into": orders}, ("skipped", "merged")),
        }
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 0
    finally:
        store.close()


def test_a_milestones_reward_that_went_under_r1_is_not_planned_again_when_its_first_row_is_deleted(
    db_url: str,
) -> None:
    """The first row skipped unsent, the reward of the milestone reached again sent under ``:r1``, then that first
    row deleted by hand: its key is free, the milestone is not (the planner as ``loyalty_key_to_plan``)."""
    import sqlalchemy as sa

    from worker.adapters.store import M

    store = Store.from_url(db_url)
    try:
        load(store, [_FIVE])
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 1
        _set_rows(store, {"loyalty:C0:orders-5": ("skipped", "no_longer_due", 0)})
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 1
        _set_rows(store, {"loyalty:C0:orders-5:r1": ("sent", None, 0)})
        with store.engine.begin() as conn:
            conn.execute(sa.delete(M).where(M.c.dedupe_key == "loyalty:C0:orders-5"))
        assert cc.loyalty_key_to_plan("C0", "orders-5", {"loyalty:C0:orders-5:r1"}, set()) is None
        assert list(planned_keys(store, "loyalty")) == []
        assert planning.plan_into_ledger(store, SETTINGS, "loyalty", NOW) == 0
    finally:
        store.close()


@pytest.mark.parametrize("case", [_FIVE, _BOTH], ids=["the order milestone", "both milestones, one email"])
def test_a_milestone_another_process_plans_between_a_passs_read_and_its_insert_is_planned_once_on_sqlite(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, case: Case
) -> None:
    """SQLite: a pass reads its candidates, then inserts them in write transactions of their own (``plan_sql.insert``).
    Given another process on the same file (a `run --once` beside the daemon) that plans the milestone between the
    two, the insert finds the milestone's key taken: it writes nothing for it, not its reward again under the next key
    (``:r1``), a second email of the one reward."""
    from worker.adapters import plan_sql

    migrate(sqlite_url)
    this, other = Store.from_url(sqlite_url), Store.from_url(sqlite_url)
    read = plan_sql._new_idents
    raced: list[int] = []

    def read_then_the_other_process_plans(engine: Any, plan: Any) -> Any:
        parts = list(read(engine, plan))  # this pass's read, its transaction ended
        if engine is this.engine and parts and not raced:
            raced.append(planning.plan_into_ledger(other, SETTINGS, "loyalty", NOW))
        yield from parts

    monkeypatch.setattr(plan_sql, "_new_idents", read_then_the_other_process_plans)
    try:
        load(this, [case])
        # When this process plans loyalty, the other planning it meanwhile
        created = planning.plan_into_ledger(this, SETTINGS, "loyalty", NOW)
        # Then the ledger holds the rows the other process planned, and nothing more: one reward
        assert raced == [case.keys]
        rows = ledger(this, "loyalty")
        assert created == 0 and len(rows) == case.keys and all(":r" not in key for key in rows), sorted(rows)
    finally:
        this.close()
        other.close()

"""Property-style checks of time: many random customers, zones and instants, the planner's SQL (SQLite and
PostgreSQL) against the pure rules of ``core.campaigns``. Any customer one selects and the other does not is a
bug. The data is fixed (absolute times); the instants include every rule boundary the data has (an order's
45th day to the second, the end of a birthday in each zone), so the comparisons hit the edges."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import pytest

from worker import planning
from worker.adapters import shop
from worker.adapters.store import Store
from worker.config import settings_from_dict
from worker.core import campaigns as cc
from worker.core.policy import zone_of
from worker.domain import CustomerRecord, Locale, OrderFacts, OrderRecord, OrderStatus, ProductRecord, ProductView

ZONES = ("Asia/Jakarta", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Pacific/Kiritimati",
         "Pacific/Pago_Pago", "Asia/Kathmandu", "Pacific/Chatham", "America/St_Johns", "Etc/GMT+12", "")
SHOP_ZONE = "Asia/Jakarta"
STEPS = (45, 75, 120)
DAYS_AFTER, LOOKBACK = 7, 14
STATUSES = (OrderStatus.DELIVERED, OrderStatus.SHIPPED, OrderStatus.CANCELLED, OrderStatus.REFUNDED)
BASE = datetime(2027, 12, 31, 12, 0, tzinfo=UTC)
"""Instants range around the turn of 2027 into leap 2028, and its February."""
BIRTHDAYS = (date(1990, 12, 31), date(1991, 1, 1), date(1992, 2, 29), date(1990, 2, 28), date(1990, 3, 1),
             date(1990, 1, 2), date(1990, 12, 30))  # fmt: skip


def settings(days_before: int) -> object:
    return settings_from_dict({
        "shop": {"time_zone": SHOP_ZONE},
        "campaigns": {
            "winback": {"steps": [{"days": d, "template": f"w{d}"} for d in STEPS]},
            "birthday": {"enabled": True, "days_before": days_before},
            "feedback": {"enabled": True, "days_after": DAYS_AFTER, "lookback_days": LOOKBACK},
        },
    })  # fmt: skip


def customers(rng: random.Random, n: int) -> tuple[list[CustomerRecord], list[OrderRecord]]:
    people, orders = [], []
    for i in range(n):
        birthday = rng.choice(BIRTHDAYS) if rng.random() < 0.6 else date(1980, 1, 1) + timedelta(rng.randrange(366))
        people.append(CustomerRecord(f"C{i}", f"c{i}@example.com", f"C {i}", Locale.ID, rng.choice(ZONES),
                                     birthday if rng.random() < 0.9 else None, True, "", ""))  # fmt: skip
        for j in range(rng.choice((0, 1, 1, 1, 2))):
            placed = BASE - timedelta(days=rng.uniform(-70, 140), seconds=rng.randrange(86400))
            delivered = placed + timedelta(days=rng.uniform(0, 10)) if rng.random() < 0.5 else None
            orders.append(OrderRecord(f"O{i}-{j}", f"C{i}", rng.choice(STATUSES), placed,
                                      delivered, 1000, "IDR"))  # fmt: skip
    return people, orders


def instants(rng: random.Random, people: list[CustomerRecord], orders: list[OrderRecord]) -> list[datetime]:
    out = [BASE + timedelta(hours=rng.uniform(-24 * 70, 24 * 70)) for _ in range(6)]
    for rec in rng.sample(orders, min(6, len(orders))):  # win-back and feedback boundaries, to the second
        settled = rec.delivered_at or rec.placed_at
        for edge in (rec.placed_at + timedelta(days=rng.choice(STEPS)), settled + timedelta(days=DAYS_AFTER),
                     settled + timedelta(days=DAYS_AFTER + LOOKBACK)):  # fmt: skip
            out += [edge - timedelta(microseconds=1), edge, edge + timedelta(microseconds=1)]
    for person in rng.sample(people, 6):  # the start of a birthday (or of its days_before) in the customer's zone
        if person.birthday is None:
            continue
        zone = zone_of(person.time_zone, SHOP_ZONE)
        for year in (2027, 2028):
            day = cc.birthday_in(person.birthday, year)
            start = datetime.combine(day, datetime.min.time(), tzinfo=zone).astimezone(UTC)
            out += [start - timedelta(seconds=1), start, start + timedelta(days=1) - timedelta(seconds=1)]
    return out


def facts(person: CustomerRecord, orders: list[OrderRecord]) -> cc.Facts:
    return cc.Facts(
        customer_external_id=person.external_id,
        time_zone=person.time_zone,
        birthday=person.birthday,
        orders=tuple(OrderFacts(o.external_id, o.status, o.placed_at, o.delivered_at, o.total_minor) for o in orders),
    )


def pure_keys(campaign: str, f: cc.Facts, now: datetime, days_before: int) -> list[str]:
    if campaign == "winback":
        return cc.winback_due_keys(f, now, STEPS)
    if campaign == "feedback":
        return cc.feedback_due_keys(f, now, DAYS_AFTER, LOOKBACK)
    return cc.birthday_due_keys(f, now, days_before, zone_of(f.time_zone, SHOP_ZONE))


@pytest.mark.parametrize("seed", [1, 2])
def test_the_planners_sql_selects_exactly_whom_the_pure_rules_select(db_url: str, seed: int) -> None:
    rng = random.Random(seed)
    people, orders = customers(rng, 120)
    store = Store.from_url(db_url)
    try:
        shop.upsert_customers(store.engine, people, BASE)
        shop.upsert_orders(store.engine, orders, BASE)
        by_customer = {p.external_id: facts(p, [o for o in orders if o.customer_external_id == p.external_id])
                       for p in people}  # fmt: skip
        wrong = []
        selected: Counter[str] = Counter()
        for now in instants(rng, people, orders):
            days_before = rng.choice((0, 1, 3, 7))
            cfg = settings(days_before)
            for campaign in ("winback", "feedback", "birthday"):
                got = {m.dedupe_key for batch in planning.plan_batches(store, cfg, campaign, now)  # type: ignore[arg-type]
                       for m in batch}  # fmt: skip
                expected = {k for f in by_customer.values() for k in pure_keys(campaign, f, now, days_before)}
                selected[campaign] += len(expected)
                if got != expected:
                    wrong.append((campaign, now.isoformat(), days_before, sorted(got ^ expected)))
        assert wrong == []
        # (and the agreement is no empty one: the rules select someone for each campaign at some instant)
        assert set(+selected) == {"winback", "feedback", "birthday"}, selected
    finally:
        store.close()


MILESTONES = {"order_milestones": [2, 3, 5], "spend_milestones": [5000, 10000], "within_days": 30}
NEWS = {"within_days": 14, "active_within_days": 60}


def loyal_customers(rng: random.Random, n: int) -> tuple[list[CustomerRecord], list[OrderRecord], list[ProductRecord]]:
    """Customers with 0-6 orders of every status, some in another currency, and products launched around BASE."""
    people, orders = [], []
    for i in range(n):
        people.append(CustomerRecord(f"C{i}", f"c{i}@example.com", f"C {i}", Locale.ID, SHOP_ZONE, None, True, "", ""))
        for j in range(rng.randrange(7)):
            placed = BASE - timedelta(days=rng.uniform(-20, 90), seconds=rng.randrange(86400))
            status = rng.choice((*STATUSES, OrderStatus.PAID, OrderStatus.PLACED))
            orders.append(OrderRecord(f"O{i}-{j}", f"C{i}", status, placed, None,
                                      rng.choice((0, 100_000, 250_000, 500_000)), rng.choice(("IDR", "IDR", "USD"))))
    products = [ProductRecord(f"P{k}", f"Product {k}", "Kopi", 1000, "IDR", "", "",
                              BASE - timedelta(days=rng.uniform(-20, 40)), rng.random() < 0.8)
                for k in range(8)]  # fmt: skip
    for k, p in enumerate(products):  # a last order placed at a launch's very microsecond: not "since" it
        people.append(CustomerRecord(f"L{k}", f"l{k}@example.com", f"L {k}", Locale.ID, SHOP_ZONE, None, True, "", ""))
        orders.append(OrderRecord(f"OL{k}", f"L{k}", OrderStatus.PAID, p.launched_at or BASE, None, 100_000, "IDR"))
    return people, orders, products


@pytest.mark.parametrize("seed", [3])
def test_loyalty_and_new_products_sql_selects_exactly_whom_the_pure_rules_select(db_url: str, seed: int) -> None:
    rng = random.Random(seed)
    people, orders, products = loyal_customers(rng, 150)
    cfg = settings_from_dict({"shop": {"time_zone": SHOP_ZONE}, "campaigns": {
        "loyalty": {"enabled": True, **MILESTONES}, "new_products": {"enabled": True, **NEWS}}})  # fmt: skip
    store = Store.from_url(db_url)
    try:
        shop.upsert_products(store.engine, products, BASE)
        shop.upsert_customers(store.engine, people, BASE)
        shop.upsert_orders(store.engine, orders, BASE)
        by_customer = {p.external_id: cc.Facts(p.external_id, orders=tuple(
            OrderFacts(o.external_id, o.status, o.placed_at, o.delivered_at, o.total_minor, o.currency)
            for o in orders if o.customer_external_id == p.external_id)) for p in people}  # fmt: skip
        # every rule boundary: a milestone order leaving the 30-day window, a last order leaving the 60 active
        # days, a launch arriving and leaving the 14 new days; each to the microsecond
        edges = [BASE + timedelta(hours=rng.uniform(-24 * 30, 24 * 30)) for _ in range(6)]
        edges += [o.placed_at + timedelta(days=d) for o in rng.sample(orders, 8) for d in (0, 30, 60)]
        edges += [p.launched_at + timedelta(days=d) for p in products for d in (0, 14)]
        instants = [e + timedelta(microseconds=d) for e in edges for d in (-1, 0, 1)]
        milestones = planning.loyalty_milestones(cfg)
        wrong = []
        selected: Counter[str] = Counter()
        for now in instants:
            launches = [cc.Launch(product_view_of(p), p.launched_at) for p in products
                        if p.active and now - timedelta(days=NEWS["within_days"]) < p.launched_at <= now]  # fmt: skip
            week = cc.news_week(launches, zone_of(SHOP_ZONE, "UTC")) if launches else ""
            expected = {
                "loyalty": {k for f in by_customer.values() for k in cc.loyalty_due_keys(f, now, milestones)},
                "new_products": {k for f in by_customer.values() for k in cc.new_products_due_keys(
                    f, now, launches, NEWS["within_days"], NEWS["active_within_days"], week)} if launches else set(),
            }  # fmt: skip
            for campaign, keys in expected.items():
                selected[campaign] += len(keys)
                got = {m.dedupe_key for batch in planning.plan_batches(store, cfg, campaign, now) for m in batch}
                if got != keys:
                    wrong.append((campaign, now.isoformat(), sorted(got ^ keys)))
        assert wrong == []
        assert set(+selected) == {"loyalty", "new_products"}, selected  # (no empty agreement)
    finally:
        store.close()


def product_view_of(p: ProductRecord) -> ProductView:
    return ProductView(p.external_id, p.name, p.category, p.price_minor, p.currency, p.url, p.image_url)


def _planned_rows(url: str, instants: list[datetime], seed: int) -> dict[tuple[datetime, str], tuple[object, ...]]:
    """Every campaign's planned messages (each column) at each instant, for the shop ``seed`` gives, in ``url``."""
    from tests.db_fixtures import migrate

    rng = random.Random(seed)
    people, orders = customers(rng, 150)
    loyal, their_orders, products = loyal_customers(rng, 100)
    migrate(url)
    store = Store.from_url(url)
    try:
        shop.upsert_products(store.engine, products, BASE)
        shop.upsert_customers(store.engine, people + loyal, BASE)
        shop.upsert_orders(store.engine, orders + their_orders, BASE)
        return {
            (now, m.dedupe_key): (m.step, m.email, m.due_at, m.expires_at, m.message_id, m.priority,
                                  sorted(m.payload.items()), m.held_out, m.skip_reason)
            for now in instants for campaign in cc.CAMPAIGNS
            for batch in planning.plan_batches(store, EVERY_CAMPAIGN, campaign, now) for m in batch
        }  # fmt: skip
    finally:
        store.close()


EVERY_CAMPAIGN = settings_from_dict({"shop": {"time_zone": SHOP_ZONE}, "campaigns": {
    "winback": {"steps": [{"days": d, "template": f"w{d}"} for d in STEPS], "holdout_share": 0.3},
    "birthday": {"enabled": True, "days_before": 3, "holdout_share": 0.3},
    "feedback": {"enabled": True, "days_after": DAYS_AFTER, "lookback_days": LOOKBACK, "holdout_share": 0.3},
    "loyalty": {"enabled": True, **MILESTONES, "holdout_share": 0.3},
    "new_products": {"enabled": True, **NEWS, "holdout_share": 0.3}}})  # fmt: skip


@pytest.mark.postgres
def test_sqlite_and_postgresql_plan_one_shop_alike_column_by_column(sqlite_url: str, pg_url: str) -> None:
    """The same shop planned on both databases at the same instants (around the turn of 2027 into leap 2028):
    every campaign's rows alike in every column a preview shows (step, due and expiry times, Message-ID, priority,
    payload: the win-back step's template and days, the loyalty milestone, the birthday's day; holdout)."""
    rng = random.Random(11)
    instants = [BASE + timedelta(hours=rng.uniform(-24 * 60, 24 * 60)) for _ in range(10)]
    on_sqlite, on_postgresql = _planned_rows(sqlite_url, instants, 7), _planned_rows(pg_url, instants, 7)
    assert {campaign for _, key in on_sqlite for campaign in cc.CAMPAIGNS if key.startswith(campaign)} == set(
        cc.CAMPAIGNS), "the shop must plan every campaign"
    assert sum(held for *_, held, _ in on_sqlite.values()) > 10, "and hold some out"  # type: ignore[misc]
    different = {k for k in on_sqlite.keys() | on_postgresql.keys() if on_sqlite.get(k) != on_postgresql.get(k)}
    assert sorted(different)[:10] == []

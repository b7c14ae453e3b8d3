"""The demo shop: deterministic, believable, and in the importer's exact format."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import email_validator
import pytest

from worker.adapters.importer import RowError, read_customers, read_orders, read_products
from worker.demo import HOSTILE_NAMES, ShopData, generate_customers_csv, generate_shop, major, write_csvs
from worker.domain import Locale, OrderStatus

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone(timedelta(hours=7)))


@pytest.fixture(scope="module")
def shop() -> ShopData:
    return generate_shop(seed=7, customers=1000, now=NOW)


def purchases(shop: ShopData) -> Counter[str]:
    return Counter(o.customer_external_id for o in shop.orders if o.status.counts_as_purchase)


def test_same_seed_same_shop_other_seed_other_shop(shop: ShopData) -> None:
    assert generate_shop(seed=7, customers=1000, now=NOW) == shop
    assert generate_shop(seed=8, customers=1000, now=NOW) != shop


def test_about_seventy_percent_are_one_time_buyers(shop: ShopData) -> None:
    counts = purchases(shop)
    one_time = sum(1 for n in counts.values() if n == 1)
    assert 0.64 <= one_time / len(shop.customers) <= 0.76
    assert max(counts.values()) >= 5
    assert len(counts) == len(shop.customers)  # everyone bought something
    cancelled_then_bought = {o.customer_external_id for o in shop.orders if o.status is OrderStatus.CANCELLED}
    assert any(counts[c] == 1 for c in cancelled_then_bought)


def test_shape_of_the_shop(shop: ShopData) -> None:
    customers = shop.customers
    assert 0.10 <= sum(c.locale is Locale.EN for c in customers) / len(customers) <= 0.20
    assert 0.65 <= sum(c.birthday is not None for c in customers) / len(customers) <= 0.78
    assert 0.85 <= sum(c.marketing_consent for c in customers) / len(customers) <= 0.95
    assert sum(1 for c in customers if c.birthday and (c.birthday.month, c.birthday.day) == (2, 29)) >= 2
    assert {c.time_zone for c in customers} == {"Asia/Jakarta", "Asia/Makassar", "Asia/Jayapura"}
    assert len(shop.products) == 30
    assert len({p.category for p in shop.products}) >= 6
    now = NOW.astimezone(UTC)
    assert any(p.launched_at and now - p.launched_at < timedelta(days=14) for p in shop.products)
    assert all(now - timedelta(days=401) <= o.placed_at <= now for o in shop.orders)
    statuses = Counter(o.status for o in shop.orders)
    assert statuses[OrderStatus.DELIVERED] > 0.8 * len(shop.orders)


def test_hostile_names_belong_to_quiet_one_time_buyers(shop: ShopData) -> None:
    counts = purchases(shop)
    hostile = [c for c in shop.customers if c.name in HOSTILE_NAMES]
    assert len(hostile) == 2
    for customer in hostile:
        assert customer.marketing_consent
        assert counts[customer.external_id] == 1
        [order] = [o for o in shop.orders if o.customer_external_id == customer.external_id]
        assert NOW - order.placed_at > timedelta(days=60)


def test_every_address_validates_without_dns(shop: ShopData) -> None:
    for customer in shop.customers:
        assert email_validator.validate_email(customer.email, check_deliverability=False).normalized == customer.email


def test_csv_round_trip_gives_equal_records(shop: ShopData, tmp_path: Path) -> None:
    paths = write_csvs(shop, tmp_path)
    assert sorted(paths) == ["customers", "orders", "products"]
    customers = list(read_customers(paths["customers"]))
    products = list(read_products(paths["products"]))
    orders = list(read_orders(paths["orders"]))
    assert not [r for r in [*customers, *products, *orders] if isinstance(r, RowError)]
    assert customers == shop.customers
    assert products == shop.products
    assert orders == shop.orders


@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [(24900000, "IDR", "249000"), (7450050, "IDR", "74500.50"), (5, "USD", "0.05"), (1500, "JPY", "1500")],
)
def test_major_units_are_plain_decimal_strings(minor: int, currency: str, text: str) -> None:
    assert major(minor, currency) == text


def test_big_customers_csv_imports_cleanly(tmp_path: Path) -> None:
    path = generate_customers_csv(tmp_path / "big.csv", rows=2000, seed=1)
    results = list(read_customers(path))
    assert len(results) == 2000
    assert not [r for r in results if isinstance(r, RowError)]

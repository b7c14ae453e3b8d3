"""Helpers for tests that need a small shop in a real database and settings pointing at it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.db_fixtures import migrate
from tests.smtp_server import closed_port
from worker.adapters import shop
from worker.adapters.store import Store
from worker.config import Settings, settings_from_dict
from worker.domain import CustomerRecord, Locale, OrderLineRecord, OrderRecord, OrderStatus, ProductRecord

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates" / "email"
NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LINK_KEY = "test-link-key-0123456789abcdef"


def edited_templates(folder: Path, part: str, edit: Callable[[str], str]) -> Path:
    """A copy of the shipped templates in ``folder``, with the file ``part`` (e.g. ``winback/en/body.txt``)
    rewritten by ``edit``; returns the copy's root."""
    shutil.copytree(TEMPLATES, folder)
    path = folder / part
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    return folder


def settings_for(db_url: str, *, smtp: dict[str, Any] | None = None, templates: Path = TEMPLATES,
                 **sections: dict[str, Any]) -> Settings:
    raw: dict[str, Any] = {
        "database": {"url": db_url},
        "smtp": {"host": "127.0.0.1", "port": closed_port(), "tls": "none", "timeout_seconds": 5.0, "pool_size": 2,
                 **(smtp or {})},
        "templates": {"dir": str(templates)},
        "sending": {"rate_per_second": 1000.0, "burst": 1000},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return settings_from_dict(raw, source="test-config.toml", base_dir=ROOT)


PRODUCTS = [
    ProductRecord("P-BATIK", "Kemeja Batik Parang", "Batik", 249_000_00, "IDR",
                  "https://toko.example/p/batik", "", NOW - timedelta(days=200), True),
    ProductRecord("P-KOPI", "Kopi Gayo 250g", "Kopi", 89_000_00, "IDR",
                  "https://toko.example/p/kopi", "", NOW - timedelta(days=300), True),
    ProductRecord("P-KOPI2", "Kopi Toraja 250g", "Kopi", 99_000_00, "IDR",
                  "https://toko.example/p/kopi2", "", NOW - timedelta(days=100), True),
]  # fmt: skip


def customer(ext: str, *, name: str | None = None, email: str | None = None, locale: Locale = Locale.ID,
             consent: bool = True) -> CustomerRecord:
    return CustomerRecord(ext, email or f"{ext.lower()}@example.com", name or f"Budi {ext}", locale,
                          "Asia/Jakarta", None, consent, "opt_in", "checkout")


def one_time_order(ext: str, customer_ext: str, *, days_ago: float = 60, product: str = "P-KOPI",
                   status: OrderStatus = OrderStatus.DELIVERED) -> OrderRecord:
    return OrderRecord(ext, customer_ext, status, NOW - timedelta(days=days_ago), None, 89_000_00, "IDR",
                       (OrderLineRecord(product, 1, 89_000_00),))


def make_shop(db_url: str, customers: Sequence[CustomerRecord], orders: Sequence[OrderRecord]) -> Store:
    migrate(db_url)  # (a new SQLite file: a copy of the session's migrated one)
    store = Store.from_url(db_url)
    shop.upsert_products(store.engine, PRODUCTS, NOW)
    shop.upsert_customers(store.engine, list(customers), NOW)
    shop.upsert_orders(store.engine, list(orders), NOW)
    return store


def stored_orders(engine: Any, customer_ext: str, orders: Sequence[tuple[str, str, int, str, datetime]]) -> None:
    """(external id, status, total in minor units, currency, placed at) for ``customer_ext``, written straight into
    the orders table, as an import before the per-currency bound stored them (none refuses them here: a database
    imported by an older Kembali, whose totals in another currency than the shop's add up past what a BIGINT
    holds)."""
    import sqlalchemy as sa

    from worker.adapters.store import C, O

    with engine.begin() as conn:
        cid = conn.execute(sa.select(C.c.id).where(C.c.external_id == customer_ext)).scalar_one()
        conn.execute(sa.insert(O), [
            {"external_id": ext, "customer_id": cid, "status": status, "placed_at": at, "settled_at": at,
             "total_minor": total, "currency": currency, "created_at": at, "updated_at": at}
            for ext, status, total, currency, at in orders
        ])  # fmt: skip

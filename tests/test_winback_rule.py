"""The win-back rule: one table of cases, run through the pure rule and the store's query."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from worker.adapters import shop
from worker.adapters.store import Store
from worker.core.audiences import (
    is_winback_due,
    key_part,
    key_part_value,
    plan_winback,
    winback_cutoff,
    winback_key,
)
from worker.domain import (
    CustomerFacts,
    CustomerRecord,
    CustomerSnapshot,
    Locale,
    OrderFacts,
    OrderRecord,
    OrderStatus,
)

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
QUIET_DAYS = 45
D = OrderStatus.DELIVERED


@dataclass(frozen=True)
class Case:
    name: str
    orders: tuple[tuple[OrderStatus, timedelta], ...]
    """(status, how long before NOW it was placed)"""
    due: bool
    consent: bool = True
    suppressed: bool = False
    already_planned: bool = False


CASES = [
    Case("one order 46 days ago", ((D, timedelta(days=46)),), due=True),
    Case("one order exactly 45 days ago is not 'more than'", ((D, timedelta(days=45)),), due=False),
    Case("one order 45 days and a second ago", ((D, timedelta(days=45, seconds=1)),), due=True),
    Case("one order 44 days ago", ((D, timedelta(days=44)),), due=False),
    Case("one recent unpaid order", ((OrderStatus.PLACED, timedelta(days=3)),), due=False),
    Case("an old paid order counts", ((OrderStatus.PAID, timedelta(days=90)),), due=True),
    Case("two old orders: a repeat buyer", ((D, timedelta(days=200)), (D, timedelta(days=100))), due=False),
    Case("an old order and a recent one", ((D, timedelta(days=200)), (D, timedelta(days=5))), due=False),
    Case("a cancelled second order does not count",
         ((D, timedelta(days=60)), (OrderStatus.CANCELLED, timedelta(days=5))), due=True),
    Case("a refunded second order does not count",
         ((D, timedelta(days=60)), (OrderStatus.REFUNDED, timedelta(days=50))), due=True),
    Case("a cancelled old first order and a recent real one",
         ((OrderStatus.CANCELLED, timedelta(days=90)), (D, timedelta(days=10))), due=False),
    Case("only a cancelled order", ((OrderStatus.CANCELLED, timedelta(days=90)),), due=False),
    Case("no orders at all", (), due=False),
    Case("no marketing consent", ((D, timedelta(days=60)),), due=False, consent=False),
    Case("suppressed address", ((D, timedelta(days=60)),), due=False, suppressed=True),
    Case("already has a ledger row for this occasion", ((D, timedelta(days=60)),), due=False,
         already_planned=True),
]  # fmt: skip


def _customer(i: int, case: Case) -> CustomerRecord:
    return CustomerRecord(
        external_id=f"C{i}",
        email=f"c{i}@example.com",
        name=f"Customer {i}",
        locale=Locale.ID,
        time_zone="Asia/Jakarta",
        birthday=None,
        marketing_consent=case.consent,
        consent_basis="opt_in",
        consent_source="checkout",
    )


def _orders(i: int, case: Case) -> list[OrderRecord]:
    return [
        OrderRecord(f"O{i}-{j}", f"C{i}", status, NOW - ago, None, 10_000_00, "IDR")
        for j, (status, ago) in enumerate(case.orders)
    ]


def _first_purchase(i: int, case: Case) -> str:
    purchases = [(NOW - ago, j) for j, (status, ago) in enumerate(case.orders) if status.counts_as_purchase]
    return f"O{i}-{min(purchases)[1]}" if purchases else f"O{i}-none"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pure_rule(case: Case) -> None:
    i = 1
    facts = CustomerFacts(
        customer=CustomerSnapshot(1, "C1", "c1@example.com", "Customer 1", Locale.ID, "Asia/Jakarta", None,
                                  case.consent),
        orders=tuple(OrderFacts(o.external_id, o.status, o.placed_at) for o in _orders(i, case)),
        suppressed=case.suppressed,
        planned_keys=frozenset({winback_key("C1", _first_purchase(i, case))} if case.already_planned else ()),
    )
    assert is_winback_due(facts, NOW, QUIET_DAYS) is case.due


def test_store_query_agrees_with_the_rule(db_url: str) -> None:
    """Every case as one customer in one database: the query finds exactly the due ones."""
    store = Store.from_url(db_url)
    try:
        records = [(i, case) for i, case in enumerate(CASES)]
        shop.upsert_customers(store.engine, [_customer(i, c) for i, c in records], NOW)
        shop.upsert_orders(store.engine, [o for i, c in records for o in _orders(i, c)], NOW)
        for i, case in records:
            if case.suppressed:
                store.suppress(f"c{i}@example.com", reason="manual", source="test", now=NOW)
        # give the "already planned" customers their ledger row through the real planning path
        cutoff = winback_cutoff(NOW, QUIET_DAYS)
        found = store.winback_candidates(cutoff=cutoff, limit=1000)
        planned_ids = {f"C{i}" for i, c in records if c.already_planned}
        store.insert_messages(
            [plan_winback(c, now=NOW, expires_after_days=14, domain="shop.example")
             for c in found if c.customer.external_id in planned_ids],
            NOW,
        )
        got = {c.customer.external_id for c in store.winback_candidates(cutoff=cutoff, limit=1000)}
        expected = {f"C{i}" for i, case in records if case.due}
        wrong = {CASES[int(x[1:])].name for x in got ^ expected}
        assert got == expected, f"query and rule disagree on: {sorted(wrong)}"
        assert planned_ids, "the table must exercise the 'already planned' case"
    finally:
        store.close()


def test_keyset_batches_cover_everyone_once(db_url: str) -> None:
    store = Store.from_url(db_url)
    try:
        case = CASES[0]
        shop.upsert_customers(store.engine, [_customer(i, case) for i in range(25)], NOW)
        shop.upsert_orders(store.engine, [o for i in range(25) for o in _orders(i, case)], NOW)
        seen: list[str] = []
        after = 0
        while batch := store.winback_candidates(cutoff=winback_cutoff(NOW, QUIET_DAYS), after_id=after, limit=7):
            seen += [c.customer.external_id for c in batch]
            after = batch[-1].customer.id
        assert sorted(seen) == sorted(f"C{i}" for i in range(25))
    finally:
        store.close()


def test_ids_with_colons_cannot_collide(db_url: str) -> None:
    """Customer 'A:B' with order 'C' and customer 'A' with order 'B:C' are two occasions."""
    store = Store.from_url(db_url)
    try:
        people = [CustomerRecord(ext, f"{n}@example.com", ext, Locale.ID, "Asia/Jakarta", None, True, "", "")
                  for n, ext in enumerate(["A:B", "A", "50%"])]
        shop.upsert_customers(store.engine, people, NOW)
        shop.upsert_orders(store.engine, [
            OrderRecord("C", "A:B", D, NOW - timedelta(days=60), None, 1, "IDR"),
            OrderRecord("B:C", "A", D, NOW - timedelta(days=60), None, 1, "IDR"),
            OrderRecord("%3A", "50%", D, NOW - timedelta(days=60), None, 1, "IDR"),
        ], NOW)
        cutoff = winback_cutoff(NOW, QUIET_DAYS)
        found = store.winback_candidates(cutoff=cutoff)
        keys = {plan_winback(c, now=NOW, expires_after_days=1, domain="s.example").dedupe_key for c in found}
        assert len(keys) == 3
        assert store.insert_messages(
            [plan_winback(c, now=NOW, expires_after_days=1, domain="s.example") for c in found], NOW) == 3
        assert store.winback_candidates(cutoff=cutoff) == []  # the SQL key matches the Python key
    finally:
        store.close()


@pytest.mark.parametrize("external_id", ["A:B", "50%", "%3A", "a%25:b", "plain"])
def test_a_key_field_gives_back_the_id_it_was_made_from(external_id: str) -> None:
    assert ":" not in key_part(external_id)
    assert key_part_value(key_part(external_id)) == external_id

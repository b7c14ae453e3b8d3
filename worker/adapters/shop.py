"""Upserting the shop's data by external id, in batches.

Re-importing the same file changes nothing: each batch reads the existing rows
for its ids, inserts the new ones, updates only rows whose values differ, and
counts the three. After orders change, the per-customer purchase columns that
audience queries scan are refreshed for the customers touched. An order that
would take what its customer's orders in its currency add up to past what a
BIGINT holds is rejected (named by id), not the whole batch: in any currency,
since ``shop.currency`` may name it later. The sums of orders a database holds
already (an older import bounded the shop's currency alone) are read without
overflowing (``db.sum_halves``), and a total past a BIGINT is stored as the most
it holds (``db.bigint_sum``).

Two imports of the same ids at once (an operator's import beside a nightly
one) can both read an id as new; on PostgreSQL one insert wins and the other
batch fails on the unique constraint. That batch is done again (``_retried``),
and then reads the id as existing. So is a batch PostgreSQL ended as one side
of a deadlock (two writers updating the same customers in another order).
SQLite's writers take turns (``BEGIN IMMEDIATE``), so there neither happens.

An unsubscribe is the person's wish, not the mailbox's: a customer whose address on
the suppression list is there as their own wish (``store.CUSTOMERS_OWN``: an
unsubscribe, a spam complaint) and whom an import gives a new address has the new one
suppressed too, in the batch's transaction (``Followed``); a bounce stays with its dead
mailbox. Planning and the send-time re-check read the list as ever, by address.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from worker import log, money
from worker.adapters import db
from worker.adapters.store import (
    PURCHASE_EXCLUDED,
    RATEABLE,
    C,
    L,
    O,
    P,
    S,
    _chunks,
    followed_source,
    own_wish_sql,
    suppression_address,
)
from worker.adapters.tables import ShopState
from worker.domain import CustomerRecord, OrderRecord, OrderStatus, ProductRecord

STATE = ShopState.__table__  # type: ignore[attr-defined]
SPEND_CURRENCY = "spend_currency"

MAX_MINOR = db.MAX_BIGINT
"""The most a BIGINT column holds: a customer's ``total_spent_minor``, the sum of their orders' totals."""
MAX_NAMED = 10
"""The customers a recount names whose orders add up to ``MAX_MINOR`` or more (the rest are counted)."""


@dataclass(frozen=True)
class Followed:
    """A customer's unsubscribe (or complaint) an import carried to the address it gave them: ``new`` was put on
    the suppression list with the ``reason`` (and the time) of ``old``'s entry, the address they had before."""

    external_id: str
    old: str
    new: str
    reason: str


@dataclass
class UpsertCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    """(external id, reason) for records the database could not take."""
    followed: list[Followed] = field(default_factory=list)
    """Customers whose new address was suppressed as their old one is (``_follow_own_wish``)."""

    def add(self, other: UpsertCounts) -> None:
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.rejected.extend(other.rejected)
        self.followed.extend(other.followed)


KEPT_CUSTOMER: dict[str, tuple[str, ...]] = {
    "locale": ("locale",), "time_zone": ("time_zone",), "birthday": ("birthday", "birthday_mmdd"),
    "consent_basis": ("consent_basis",), "consent_source": ("consent_source",),
}  # fmt: skip
"""The optional columns of customers.csv whose stored values a file without them leaves as they are (by the
table's columns each fills)."""
KEPT_PRODUCT: dict[str, tuple[str, ...]] = {
    name: (name,) for name in ("category", "url", "image_url", "launched_at", "active")
}
"""The same for products.csv. ``currency`` is not kept: the price is read in the currency the file gives (the shop's
default)."""


def _kept(absent: frozenset[str], kept: dict[str, tuple[str, ...]]) -> frozenset[str]:
    """The table's columns a record whose file lacks ``absent`` leaves as they are stored."""
    return frozenset(column for name in absent for column in kept.get(name, ()))


def _customer_values(r: CustomerRecord) -> dict[str, Any]:
    return {
        "external_id": r.external_id,
        "email": r.email,
        "name": r.name,
        "locale": r.locale.value,
        "time_zone": r.time_zone,
        "birthday": r.birthday,
        "birthday_mmdd": r.birthday.month * 100 + r.birthday.day if r.birthday else None,
        "marketing_consent": r.marketing_consent,
        "consent_basis": r.consent_basis,
        "consent_source": r.consent_source,
    }


def _product_values(r: ProductRecord) -> dict[str, Any]:
    return {
        "external_id": r.external_id,
        "name": r.name,
        "category": r.category,
        "price_minor": r.price_minor,
        "currency": r.currency,
        "url": r.url,
        "image_url": r.image_url,
        "launched_at": r.launched_at,
        "active": r.active,
    }


def _upsert_simple(
    engine: Engine,
    table: sa.Table,
    values: Sequence[dict[str, Any]],
    now: datetime,
    kept: Sequence[frozenset[str]] = (),
    then: Callable[[Connection, Mapping[str, Any], Mapping[str, Mapping[str, Any]]], None] | None = None,
) -> UpsertCounts:
    """Insert or update rows by ``external_id``; an existing row keeps its ``kept`` columns (by ``values``' index:
    the columns its file did not have). ``then(conn, existing, updated)``, in the same transaction, given the rows
    updated as they were read (by external id) and their new values."""
    counts = UpsertCounts()
    if not values:
        return counts
    keys = [k for k in values[0] if k != "external_id"]
    by_id = {v["external_id"]: v for v in values}  # a later duplicate in one batch wins
    keep = {v["external_id"]: k for v, k in zip(values, kept, strict=False)}
    with engine.begin() as conn:
        existing = {
            r.external_id: r
            for r in conn.execute(
                sa.select(table.c.external_id, *[table.c[k] for k in keys]).where(
                    table.c.external_id.in_(list(by_id))
                )
            )
        }
        new = [{**v, "created_at": now, "updated_at": now} for k, v in by_id.items() if k not in existing]
        keepable = [k for k in keys if any(k in columns for columns in keep.values())]
        changed = [
            {**{f"v_{k}": v[k] for k in keys}, **{f"k_{k}": k in keep.get(ext, ()) for k in keepable},
             "b_ext": ext, "v_updated_at": now}
            for ext, v in by_id.items()
            if ext in existing
            and any(getattr(existing[ext], k) != v[k] for k in keys if k not in keep.get(ext, ()))
        ]  # fmt: skip
        if new:
            conn.execute(sa.insert(table), new)
        if changed:
            # a kept column is set to what it holds when the row is written, not to what was read above: on
            # PostgreSQL another writer (a second import, the spend recount) may have changed it since, and committed
            # while this UPDATE waited for its row; writing back the value read would undo that change
            kept_as_is = {
                k: sa.case((sa.bindparam(f"k_{k}", type_=sa.Boolean()), table.c[k]),
                           else_=sa.bindparam(f"v_{k}", type_=table.c[k].type))
                for k in keepable
            }  # fmt: skip
            conn.execute(
                sa.update(table)
                .where(table.c.external_id == sa.bindparam("b_ext"))
                .values({**{k: sa.bindparam(f"v_{k}") for k in [*keys, "updated_at"]}, **kept_as_is}),
                changed,
            )
            if then is not None:
                then(conn, existing, {c["b_ext"]: by_id[c["b_ext"]] for c in changed})
    counts.created = len(new)
    counts.updated = len(changed)
    counts.unchanged = len(by_id) - len(new) - len(changed)
    return counts


_ATTEMPTS = 3
T = TypeVar("T")


_ROLLED_BACK_FOR_ANOTHER = frozenset({"40P01", "40001"})
"""PostgreSQL's deadlock_detected and serialization_failure: the transaction was ended for another's sake, and
the same work done again is expected to succeed."""


def _retried(work: Callable[[], T]) -> T:
    """``work()`` (one transaction), done again when it broke a unique constraint (another import inserted one of
    its ids after it looked, see the module docstring), or when PostgreSQL ended it as one side of a deadlock (two
    writers updating the same customers in another order: a second import, the spend recount of a currency
    change)."""
    for _ in range(_ATTEMPTS - 1):
        try:
            return work()
        except sa.exc.IntegrityError:
            continue
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in _ROLLED_BACK_FOR_ANOTHER:
                raise
            log.event("import_batch_retried", logging.WARNING, why=str(exc.orig).splitlines()[0])
    return work()


def upsert_customers(engine: Engine, records: Sequence[CustomerRecord], now: datetime) -> UpsertCounts:
    """Upsert customers; ``followed`` names those whose new address was suppressed as their old one is (their
    unsubscribe or complaint follows them: ``_follow_own_wish``)."""
    values = [_customer_values(r) for r in records]
    kept = [_kept(r.absent, KEPT_CUSTOMER) for r in records]

    def batch() -> UpsertCounts:  # (a batch done again follows again, from what the database holds then)
        followed: list[Followed] = []
        counts = _upsert_simple(engine, C, values, now, kept,
                                then=lambda conn, was, new: followed.extend(_follow_own_wish(conn, was, new)))
        counts.followed = followed
        return counts

    return _retried(batch)


def _follow_own_wish(
    conn: Connection, was: Mapping[str, Any], updated: Mapping[str, Mapping[str, Any]]
) -> list[Followed]:
    """Suppress the new address of each customer ``updated`` gives another mailbox than the one they had (``was``)
    when that one is on the suppression list as the customer's own wish (``CUSTOMERS_OWN``), with its entry's
    reason and time and a source naming both (``followed_source``: ``stats`` counts the customer's unsubscribe once,
    in the week they gave it, not again for the new address); an address already on the list keeps its entry. One
    read of the list's unique index for the batch's changed addresses, none when no address changed (the common
    import)."""
    moved: dict[str, tuple[str, str]] = {}
    for external_id, values in updated.items():
        old, new = suppression_address(was[external_id].email), suppression_address(values["email"])
        if old != new:
            moved[external_id] = (old, new)
    if not moved:
        return []
    # the reason in any case (``own_wish_sql``), and carried as Kembali writes it
    listed = {row.email: row for row in conn.execute(
        sa.select(S.c.email, sa.func.lower(S.c.reason).label("reason"), S.c.created_at)
        .where(S.c.email.in_(sorted({old for old, _ in moved.values()})), own_wish_sql())
    )}  # fmt: skip
    entries: dict[str, dict[str, Any]] = {}
    carried: dict[str, Followed] = {}
    for external_id, (old, new) in moved.items():
        if old in listed and new not in entries:
            entry = listed[old]
            entries[new] = {"email": new, "reason": entry.reason, "source": followed_source(external_id, old),
                            "created_at": entry.created_at}  # fmt: skip
            carried[new] = Followed(external_id, old, new, entry.reason)
    if not entries:
        return []
    added = set(conn.execute(db.insert_ignore(conn.engine, S).returning(S.c.email), list(entries.values())).scalars())
    return [followed for address, followed in carried.items() if address in added]


def upsert_products(engine: Engine, records: Sequence[ProductRecord], now: datetime) -> UpsertCounts:
    values = [_product_values(r) for r in records]
    kept = [_kept(r.absent, KEPT_PRODUCT) for r in records]
    counts = _retried(lambda: _upsert_simple(engine, P, values, now, kept))
    with engine.begin() as conn:  # link order lines imported before their product
        ids = [r.external_id for r in records]
        for part in _chunks(ids):
            conn.execute(
                sa.update(L)
                .where(L.c.product_id.is_(None), L.c.product_external_id.in_(part))
                .values(
                    product_id=sa.select(P.c.id).where(P.c.external_id == L.c.product_external_id).scalar_subquery()
                )
            )
    return counts


def upsert_orders(
    engine: Engine,
    records: Sequence[OrderRecord],
    now: datetime,
    on_unknown_product: Callable[[str, str], None] | None = None,
    *,
    currency: str = "IDR",
) -> UpsertCounts:
    """Upsert orders with their lines; an order whose customer is unknown is rejected. ``currency`` is the
    shop's: a customer's ``total_spent_minor`` adds up their orders in it (see ``refresh_customer_stats``)."""
    counts, unknown = _retried(lambda: _upsert_orders(engine, records, now, currency))
    if on_unknown_product:
        for order, product in unknown:
            on_unknown_product(order, product)
    return counts


def _upsert_orders(
    engine: Engine, records: Sequence[OrderRecord], now: datetime, currency: str
) -> tuple[UpsertCounts, list[tuple[str, str]]]:
    """``upsert_orders`` in one transaction; also (order, product) for each line whose product is unknown."""
    counts = UpsertCounts()
    unknown: list[tuple[str, str]] = []
    if not records:
        return counts, unknown
    by_id = {r.external_id: r for r in records}
    with engine.begin() as conn:
        customers: dict[str, int] = dict(
            conn.execute(
                sa.select(C.c.external_id, C.c.id).where(
                    C.c.external_id.in_({r.customer_external_id for r in by_id.values()})
                )
            ).all()
        )
        products: dict[str, int] = dict(
            conn.execute(
                sa.select(P.c.external_id, P.c.id).where(
                    P.c.external_id.in_({ln.product_external_id for r in by_id.values() for ln in r.lines})
                )
            ).all()
        )
        existing = {r.external_id: r for r in conn.execute(sa.select(O).where(O.c.external_id.in_(list(by_id))))}
        existing_lines = _lines_of(conn, [r.id for r in existing.values()])
        spent = _spent(conn, {*customers.values(), *(old.customer_id for old in existing.values())})
        touched: set[int] = set()
        new: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        lines_of: dict[str, list[dict[str, Any]]] = {}
        """The lines of each order inserted or changed, by external id."""
        alike = _stored_alike(conn, {r.customer_external_id for r in by_id.values()} - customers.keys())
        for ext, rec in by_id.items():
            customer_id = customers.get(rec.customer_external_id)
            if customer_id is None:
                counts.rejected.append((ext, _unknown_customer(rec.customer_external_id, alike)))
                continue
            old = existing.get(ext)
            sum_key = (customer_id, rec.currency)
            after = spent[sum_key] + _spends(rec.status.value, rec.total_minor)
            if old is not None and (old.customer_id, old.currency) == sum_key:
                after -= _spends(old.status, old.total_minor)
            # what the customer's orders in this currency add up to would not fit a total (their total spent, once
            # shop.currency names it): the whole batch was lost, or a recount failed later; a change that lowers a
            # sum stored past it (by an older import) is taken
            if after > MAX_MINOR and after > spent[sum_key]:
                largest = f"{money.from_minor(MAX_MINOR, rec.currency):f}"
                counts.rejected.append((ext, (
                    f"total {money.from_minor(rec.total_minor, rec.currency):f} {rec.currency} is too large: the "
                    f"orders of customer {rec.customer_external_id!r} would add up to more than {largest} "
                    f"{rec.currency}"
                )))  # fmt: skip
                continue
            if old is not None:
                spent[old.customer_id, old.currency] -= _spends(old.status, old.total_minor)
            spent[sum_key] += _spends(rec.status.value, rec.total_minor)
            delivered_at = old.delivered_at if old is not None and "delivered_at" in rec.absent else rec.delivered_at
            values = {
                "paid_at": _paid_at(old, rec, now),
                "customer_id": customer_id,
                "status": rec.status.value,
                "placed_at": rec.placed_at,
                "delivered_at": delivered_at,  # kept when the file has no such column
                "settled_at": delivered_at or rec.placed_at,
                "total_minor": rec.total_minor,
                "currency": rec.currency,
            }
            lines: list[dict[str, Any]] = [
                {
                    "line_no": i,
                    "product_external_id": ln.product_external_id,
                    "product_id": products.get(ln.product_external_id),
                    "quantity": ln.quantity,
                    "unit_price_minor": ln.unit_price_minor,
                }
                for i, ln in enumerate(rec.lines, start=1)
            ]
            unknown += [(ext, str(line["product_external_id"])) for line in lines if line["product_id"] is None]
            if old is None:
                new.append({"external_id": ext, "created_at": now, "updated_at": now, **values})
                counts.created += 1
            else:
                same_order = all(getattr(old, k) == v for k, v in values.items())
                if same_order and existing_lines.get(old.id, []) == lines:
                    counts.unchanged += 1
                    continue
                changed.append({**{f"v_{k}": v for k, v in values.items()}, "b_id": old.id})
                touched.add(old.customer_id)
                counts.updated += 1
            lines_of[ext] = lines
            touched.add(customer_id)
        _write_orders(conn, new, changed, lines_of, {ext: old.id for ext, old in existing.items()}, now)
        refresh_customer_stats(conn, sorted(touched), now, currency)
    return counts, unknown


_ZEROS = 4
"""How many leading zeros a spreadsheet may have dropped from (or an id have beyond) a customer id looked for."""


def _stored_alike(conn: Connection, unknown: set[str]) -> dict[str, str]:
    """Each unknown customer id → a stored one it may be: of digits, with leading zeros dropped or added (a
    spreadsheet reads 0812345 as the number 812345, in one of the files, not the other); else in capitals or in
    small letters (``CUST-A1`` for ``cust-a1``: another system's export). Looked up by the ids' index."""
    digits = {ext for ext in unknown if ext.isascii() and ext.isdigit()}
    forms = {"0" * k + ext.lstrip("0"): ext for ext in digits for k in range(_ZEROS + 1)}
    forms |= {form: ext for ext in unknown - digits for form in (ext.upper(), ext.lower())}
    forms = {form: ext for form, ext in forms.items() if form and form != ext}
    if not forms:
        return {}
    found = conn.execute(sa.select(C.c.external_id).where(C.c.external_id.in_(list(forms))).order_by(C.c.external_id))
    return {forms[stored]: stored for stored, in found}


def _unknown_customer(external_id: str, alike: dict[str, str]) -> str:
    """Why an order's customer is not found, naming the stored customer its id may be (``_stored_alike``)."""
    stored = alike.get(external_id)
    if stored is None:
        return f"unknown customer id {external_id!r} (import its customer first)"
    if stored.lower() == external_id.lower():
        return (f"unknown customer id {external_id!r} (customer {stored!r} is stored: ids are compared exactly, case "
                "included; write the id as the customers file has it)")  # fmt: skip
    return (f"unknown customer id {external_id!r} (customer {stored!r} is stored: a spreadsheet drops the leading "
            "zeros of an id it reads as a number; format the id column as text and export the file again)")


def _write_orders(
    conn: Connection, new: list[dict[str, Any]], changed: list[dict[str, Any]],
    lines_of: dict[str, list[dict[str, Any]]], ids: dict[str, int], now: datetime,
) -> None:
    """Insert the ``new`` orders and update the ``changed`` ones (``v_`` their values, ``b_id`` the row), each
    statement once for the batch (a statement per order took a round trip each: 800 orders a second on PostgreSQL);
    then their lines (``lines_of``, by external id; ``ids``: the rows of the orders stored before) in place of any
    stored."""
    ids = dict(ids)
    if new:
        inserted = conn.execute(sa.insert(O).returning(O.c.external_id, O.c.id), new)
        ids.update((ext, order_id) for ext, order_id in inserted)
    if changed:
        keys = [k[2:] for k in changed[0] if k.startswith("v_")]
        conn.execute(
            sa.update(O).where(O.c.id == sa.bindparam("b_id"))
            .values({**{k: sa.bindparam(f"v_{k}") for k in keys}, "updated_at": now}),
            changed,
        )  # fmt: skip
        for part in _chunks([row["b_id"] for row in changed]):
            conn.execute(sa.delete(L).where(L.c.order_id.in_(part)))
    rows = [{**line, "order_id": ids[ext]} for ext, lines in lines_of.items() for line in lines]
    if rows:
        conn.execute(sa.insert(L), rows)


def _paid_at(old: Any, rec: OrderRecord, now: datetime) -> datetime | None:
    """When the order was first seen paid (``shop_order.paid_at``): kept once known (one paid when placed follows a
    later file's corrected ``placed_at``, and none is before it); else the file's ``paid_at``
    when it gives one; else ``placed_at`` when the import that brings it says it is paid (nothing tells when: most
    are paid at checkout, and a first import of a shop's history then reaches no milestone "today"); else ``now``
    when this import is the first to say so (it was paid since the last one that said otherwise). A refunded or
    cancelled order keeps it: its status says it no longer counts, and a refund corrected back to paid does not
    make the order newly paid, nor does one first seen refunded (by an import, or before migration 0019): it was
    paid before that import, counted as an order first seen paid."""
    if old is not None and old.paid_at is not None:
        if old.paid_at == old.placed_at:  # paid when placed: when it was placed, as a later file corrects it
            return rec.placed_at
        return max(old.paid_at, rec.placed_at)  # type: ignore[no-any-return]
    if not rec.status.is_paid:
        return None
    if rec.paid_at is not None:
        return rec.paid_at
    return rec.placed_at if old is None or old.status in (*RATEABLE, OrderStatus.REFUNDED.value) else now


def _spends(status: str, total_minor: int) -> int:
    """What an order adds to its customer's sum in its currency (their ``total_spent_minor`` in the shop's)."""
    return 0 if status in PURCHASE_EXCLUDED else total_minor


def _spent(conn: Connection, customer_ids: set[int]) -> defaultdict[tuple[int, str], int]:
    """What each customer's purchases add up to in each currency, from their orders now: in the shop's, their
    total spent as ``refresh_customer_stats`` would have it (exact: past ``MAX_MINOR`` too)."""
    out: defaultdict[tuple[int, str], int] = defaultdict(int)
    for part in _chunks(sorted(customer_ids)):
        query = (
            sa.select(O.c.customer_id, O.c.currency, *db.sum_halves(O.c.total_minor))
            .where(O.c.customer_id.in_(part), O.c.status.not_in(PURCHASE_EXCLUDED))
            .group_by(O.c.customer_id, O.c.currency)
        )
        for customer_id, currency, high, low in conn.execute(query):
            out[customer_id, currency] = db.joined(high, low)
    return out


def _lines_of(conn: Connection, order_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for part in _chunks(order_ids):
        query = (
            sa.select(L.c.order_id, L.c.line_no, L.c.product_external_id, L.c.product_id, L.c.quantity,
                      L.c.unit_price_minor)
            .where(L.c.order_id.in_(part))
            .order_by(L.c.order_id, L.c.line_no)
        )
        for r in conn.execute(query):
            row = dict(r._mapping)
            out.setdefault(row.pop("order_id"), []).append(row)
    return out


@dataclass(frozen=True)
class SpendRecount:
    """The customers' spend totals counted again in the shop's currency: ``was`` the one they counted (None:
    not known, a database from before migration 0015), ``changed`` how many totals that changed.
    ``too_large``: how many customers' purchases add up to ``MAX_MINOR`` or more, their total the most it holds
    (orders an older import stored); ``named`` the external ids of the first ``MAX_NAMED`` of them."""

    was: str | None
    changed: int
    too_large: int = 0
    named: tuple[str, ...] = ()


def spend_currency(engine: Engine) -> str | None:
    """The currency the customers' ``total_spent_minor`` add up (None: not recorded yet)."""
    with db.reading(engine) as conn:
        value: str | None = conn.execute(
            sa.select(STATE.c.value).where(STATE.c.name == SPEND_CURRENCY)
        ).scalar_one_or_none()
    return value


def settle_spend_currency(engine: Engine, currency: str, now: datetime) -> SpendRecount | None:
    """Make every customer's ``total_spent_minor`` add up their purchases in ``currency`` (the shop's), as
    ``refresh_customer_stats`` does for the customers an import touches. Each total counts the currency the
    configuration named at the customer's last import of orders; when the configuration names another since,
    (``shop_state``'s ``spend_currency`` says which), every total is counted again here, once. None when they
    count ``currency`` already: one read by key."""
    was = spend_currency(engine)
    if was == currency:
        return None
    total = _total_spent(engine.dialect.name, currency)
    at_most = C.c.total_spent_minor >= MAX_MINOR
    insert = db.dialect_insert(engine, STATE)
    with engine.begin() as conn:  # another worker doing the same meanwhile: its updates wait for these, then match
        changed = conn.execute(
            sa.update(C).where(C.c.total_spent_minor != total).values(total_spent_minor=total, updated_at=now)
        ).rowcount
        conn.execute(
            insert.values(name=SPEND_CURRENCY, value=currency, updated_at=now).on_conflict_do_update(
                index_elements=[STATE.c.name], set_={"value": currency, "updated_at": now}
            )
        )
        too_large = conn.execute(sa.select(sa.func.count()).select_from(C).where(at_most)).scalar_one()
        named = conn.execute(
            sa.select(C.c.external_id).where(at_most).order_by(C.c.id).limit(MAX_NAMED)
        ).scalars().all() if too_large else []
    return SpendRecount(was, changed, too_large, tuple(named))


def too_large_warnings(recount: SpendRecount, currency: str) -> list[str]:
    """What to tell the operator about the customers whose purchases in ``currency`` add up past what a total
    holds (``SpendRecount.too_large``): one line each, the first ``MAX_NAMED``, then how many more."""
    largest = f"{money.from_minor(MAX_MINOR, currency):f} {currency}"
    lines = [
        f"the orders of customer {ext!r} in {currency} add up to {largest} or more, the most a spend total holds: "
        "counted as that much (an import before this check stored them; correct or cancel them in the orders file)"
        for ext in recount.named
    ]
    if recount.too_large > len(recount.named):
        lines.append(f"and {recount.too_large - len(recount.named)} more customers whose orders in {currency} add "
                     f"up to {largest} or more")  # fmt: skip
    return lines


def _purchases() -> Any:
    """The customer row's purchases (every order but cancelled and refunded ones), correlated to it."""
    return sa.select().select_from(O).where(O.c.customer_id == C.c.id, O.c.status.not_in(PURCHASE_EXCLUDED))


def _paid() -> Any:
    """The customer row's orders paid (paid, shipped, delivered), correlated to it."""
    return sa.select().select_from(O).where(O.c.customer_id == C.c.id, O.c.status.in_(RATEABLE))


def _total_spent(dialect: str, currency: str) -> Any:
    """The customer row's ``total_spent_minor`` as SQL: their purchases in ``currency`` added up, the most a BIGINT
    holds past it (orders an older import stored, ``db.bigint_sum``)."""
    return (
        _purchases().where(O.c.currency == currency)
        .with_only_columns(db.bigint_sum(dialect, O.c.total_minor))
        .scalar_subquery()
    )


def refresh_customer_stats(conn: Connection, customer_ids: Sequence[int], now: datetime, currency: str) -> None:
    """Recompute the denormalised purchase columns from the orders, for these customers. Every purchase
    counts as an order; ``total_spent_minor`` adds up those in ``currency``, the shop's (Kembali converts
    nothing: USD 100.00 added to rupiah would read as Rp100,00)."""
    def first_purchase(column: Any) -> Any:
        return _purchases().with_only_columns(column).order_by(O.c.placed_at, O.c.id).limit(1).scalar_subquery()

    for part in _chunks(list(customer_ids)):
        conn.execute(
            sa.update(C)
            .where(C.c.id.in_(part))
            .values(
                order_count=_purchases().with_only_columns(sa.func.count()).scalar_subquery(),
                first_order_at=_purchases().with_only_columns(sa.func.min(O.c.placed_at)).scalar_subquery(),
                last_order_at=_purchases().with_only_columns(sa.func.max(O.c.placed_at)).scalar_subquery(),
                last_paid_at=_paid().with_only_columns(sa.func.max(O.c.paid_at)).scalar_subquery(),
                first_order_id=first_purchase(O.c.id),
                first_order_external_id=first_purchase(O.c.external_id),
                total_spent_minor=_total_spent(conn.dialect.name, currency),
                updated_at=now,
            )
        )

"""Campaign candidate queries: keyset batches over denormalised, indexed columns, SQLAlchemy Core only.

Each query narrows a campaign's audience down in SQL (consent, suppression, the
indexed time range) and returns plain ``AudienceRow`` values; the pure rules of
``worker.core.campaigns`` make the final call. Keyset order follows the index
each query ranges over, so every batch is an index range scan, never a sort of
the whole audience:

    winback       (order_count, first_order_at)   keyset (first_order_at, id)
    birthday      (birthday_mmdd, id)             keyset id, mmdd IN (…a week of days…)
    feedback      shop_order (settled_at, id)     keyset (settled_at, order id)
    new_products  (last_order_at, id)             keyset (last_order_at, id)
    loyalty       (last_order_at, id)             keyset (last_order_at, id)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters.store import PURCHASE_EXCLUDED, C, L, M, O, P, S, _chunks, _key_part, product_view
from worker.core.campaigns import AudienceRow, Launch
from worker.domain import ProductView

Cursor = tuple[datetime, int] | None
"""Keyset position: (the ranged column's value, id) of the last row of the previous batch."""

_CUSTOMER = (C.c.id, C.c.external_id, C.c.email, C.c.time_zone)


def _reachable() -> list[Any]:
    return [C.c.marketing_consent.is_(True), ~sa.exists().where(S.c.email == C.c.email)]


def _after(column: Any, id_column: Any, cursor: Cursor) -> list[Any]:
    if cursor is None:
        return []
    value, last_id = cursor
    bound = sa.bindparam(None, value, type_=column.type)
    # the plain ``>=`` is what lets the index range start at the cursor instead of the beginning
    return [column >= bound, sa.or_(column > bound, sa.and_(column == bound, id_column > last_id))]


def _rows(engine: Engine, query: Any) -> list[Any]:
    with engine.begin() as conn:
        return list(conn.execute(query).all())


def winback_rows(
    engine: Engine, *, step: int, before: datetime, not_before: datetime | None, cursor: Cursor, limit: int
) -> list[AudienceRow]:
    """One-time buyers whose only order was placed in ``[not_before, before)`` with no row for ``step`` yet."""
    key = (
        sa.literal("winback:") + _key_part(C.c.external_id) + sa.literal(":") + _key_part(O.c.external_id)
        + sa.literal(f":{step}")
    )
    where = [C.c.order_count == 1, C.c.first_order_at < before, *_after(C.c.first_order_at, C.c.id, cursor)]
    if not_before is not None:
        where.append(C.c.first_order_at >= not_before)
    query = (
        sa.select(*_CUSTOMER, C.c.first_order_id, C.c.first_order_at, O.c.external_id.label("order_ext"))
        .join(O, O.c.id == C.c.first_order_id)
        .where(*where, *_reachable(), ~sa.exists().where(M.c.dedupe_key == key))
        .order_by(C.c.first_order_at, C.c.id)
        .limit(limit)
    )
    return [
        AudienceRow(r.id, r.external_id, r.email, r.time_zone, order_count=1, order_id=r.first_order_id,
                    order_external_id=r.order_ext, order_at=r.first_order_at)
        for r in _rows(engine, query)
    ]  # fmt: skip


def birthday_rows(engine: Engine, *, mmdd: Sequence[int], after_id: int, limit: int) -> list[AudienceRow]:
    """Reachable customers whose birthday falls on one of the ``mmdd`` days (the rule decides the rest)."""
    query = (
        sa.select(*_CUSTOMER, C.c.birthday)
        .where(C.c.birthday_mmdd.in_(list(mmdd)), C.c.id > after_id, *_reachable())
        .order_by(C.c.id)
        .limit(limit)
    )
    return [AudienceRow(r.id, r.external_id, r.email, r.time_zone, birthday=r.birthday) for r in _rows(engine, query)]


def feedback_rows(
    engine: Engine, *, after: datetime, not_after: datetime, cursor: Cursor, limit: int
) -> list[AudienceRow]:
    """Purchases settled (delivered, else placed) in ``(after, not_after]`` with no feedback row yet."""
    key = sa.literal("feedback:") + _key_part(O.c.external_id)
    query = (
        sa.select(*_CUSTOMER, O.c.id.label("order_id"), O.c.external_id.label("order_ext"), O.c.settled_at)
        .join(C, C.c.id == O.c.customer_id)
        .where(
            O.c.settled_at > after,
            O.c.settled_at <= not_after,
            *_after(O.c.settled_at, O.c.id, cursor),
            O.c.status.not_in(PURCHASE_EXCLUDED),
            *_reachable(),
            ~sa.exists().where(M.c.dedupe_key == key),
        )
        .order_by(O.c.settled_at, O.c.id)
        .limit(limit)
    )
    return [
        AudienceRow(r.id, r.external_id, r.email, r.time_zone, order_id=r.order_id, order_external_id=r.order_ext,
                    order_at=r.settled_at)
        for r in _rows(engine, query)
    ]  # fmt: skip


def recent_buyer_rows(
    engine: Engine,
    *,
    since: datetime,
    before: datetime | None = None,
    min_orders: int | None = None,
    min_spend_minor: int | None = None,
    week_key: str | None = None,
    cursor: Cursor,
    limit: int,
) -> list[AudienceRow]:
    """Reachable customers whose last purchase is in ``[since, before)``; optionally only those past a
    milestone minimum, and only those without the ``new_products:<cust>:<week_key>`` row."""
    where = [C.c.last_order_at >= since, *_after(C.c.last_order_at, C.c.id, cursor), *_reachable()]
    if before is not None:
        where.append(C.c.last_order_at < before)
    thresholds = []
    if min_orders is not None:
        thresholds.append(C.c.order_count >= min_orders)
    if min_spend_minor is not None:
        thresholds.append(C.c.total_spent_minor >= min_spend_minor)
    if min_orders is not None or min_spend_minor is not None:
        where.append(sa.or_(*thresholds))
    if week_key is not None:
        key = sa.literal("new_products:") + _key_part(C.c.external_id) + sa.literal(f":{week_key}")
        where.append(~sa.exists().where(M.c.dedupe_key == key))
    query = (
        sa.select(*_CUSTOMER, C.c.order_count, C.c.total_spent_minor, C.c.last_order_at)
        .where(*where)
        .order_by(C.c.last_order_at, C.c.id)
        .limit(limit)
    )
    return [
        AudienceRow(r.id, r.external_id, r.email, r.time_zone, order_count=r.order_count,
                    total_spent_minor=r.total_spent_minor, last_order_at=r.last_order_at)
        for r in _rows(engine, query)
    ]  # fmt: skip


def existing_keys(engine: Engine, keys: Iterable[str]) -> set[str]:
    """The dedupe keys among ``keys`` the ledger already has."""
    wanted = sorted(set(keys))
    found: set[str] = set()
    with engine.begin() as conn:
        for part in _chunks(wanted):
            found.update(conn.execute(sa.select(M.c.dedupe_key).where(M.c.dedupe_key.in_(part))).scalars())
    return found


def launches(engine: Engine, *, since: datetime, until: datetime) -> list[Launch]:
    """Active products launched in ``(since, until]``, newest first."""
    query = (
        sa.select(P)
        .where(P.c.active.is_(True), P.c.launched_at > since, P.c.launched_at <= until)
        .order_by(P.c.launched_at.desc(), P.c.id)
    )
    return [Launch(product_view(r), r.launched_at) for r in _rows(engine, query)]


def customer_products(engine: Engine, customer_ids: Iterable[int]) -> dict[int, list[ProductView]]:
    """Every product each customer bought (purchases only), newest order first, without repeats."""
    ids = sorted(set(customer_ids))
    out: dict[int, list[ProductView]] = {i: [] for i in ids}
    seen: set[tuple[int, str]] = set()
    with engine.begin() as conn:
        for part in _chunks(ids):
            query = (
                sa.select(O.c.customer_id, P)
                .select_from(O.join(L, L.c.order_id == O.c.id).join(P, P.c.id == L.c.product_id))
                .where(O.c.customer_id.in_(part), O.c.status.not_in(PURCHASE_EXCLUDED))
                .order_by(O.c.customer_id, O.c.placed_at.desc(), L.c.line_no)
            )
            for r in conn.execute(query):
                if (r.customer_id, r.external_id) not in seen:
                    seen.add((r.customer_id, r.external_id))
                    out[r.customer_id].append(product_view(r))
    return out

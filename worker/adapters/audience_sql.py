"""Row-by-row candidate queries and catalogue reads, SQLAlchemy Core only.

Birthday's candidates come back as plain ``AudienceRow`` values (keyset over
``(birthday_mmdd, id)``, one day at a time) for the pure rules of
``worker.core.campaigns`` to decide in each customer's time zone. The other
campaigns are planned set-based, in SQL: see ``adapters.plan_sql``. Every
query here only reads (``db.reading``: no SQLite write lock).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters import db
from worker.adapters.store import PURCHASE_EXCLUDED, C, L, M, O, P, _chunks, product_view, suppressed_sql
from worker.core.campaigns import AudienceRow, Launch
from worker.domain import MessageStatus, ProductView, SkipReason

_CUSTOMER = (C.c.id, C.c.external_id, C.c.email, C.c.time_zone)


def _reachable() -> list[Any]:
    return [C.c.marketing_consent.is_(True), ~suppressed_sql(C.c.email)]


def _rows(engine: Engine, query: Any) -> list[Any]:
    with db.reading(engine) as conn:
        return list(conn.execute(query).all())


def birthday_rows(engine: Engine, *, mmdd: int, after_id: int, limit: int) -> list[AudienceRow]:
    """Reachable customers whose birthday falls on the ``mmdd`` day (the rule decides the rest): one range of
    the (birthday_mmdd, id) index (with several days in one IN list, PostgreSQL walks the primary key)."""
    query = (
        sa.select(*_CUSTOMER, C.c.birthday)
        .where(C.c.birthday_mmdd == mmdd, C.c.id > after_id, *_reachable())
        .order_by(C.c.id)
        .limit(limit)
    )
    return [AudienceRow(r.id, r.external_id, r.email, r.time_zone, birthday=r.birthday) for r in _rows(engine, query)]


def birthdays_of_mailboxes(engine: Engine, boxes: Iterable[str]) -> list[AudienceRow]:
    """The reachable customers with a birthday whose address reaches one of ``boxes`` (``domain.mailbox``): every
    customer record of those mailboxes the birthday campaign could plan for. One probe of the index
    ``ix_customer_mailbox`` (migration 0018) per mailbox."""
    wanted = sorted(set(boxes))
    out: list[AudienceRow] = []
    for part in _chunks(wanted):
        query = sa.select(*_CUSTOMER, C.c.birthday).where(
            sa.func.lower(C.c.email).in_(part), C.c.birthday.is_not(None), *_reachable()
        )
        out.extend(AudienceRow(r.id, r.external_id, r.email, r.time_zone, birthday=r.birthday)
                   for r in _rows(engine, query))  # fmt: skip
    return out


def birthday_keys_known(engine: Engine, keys: Iterable[str]) -> dict[str, str | None]:
    """The birthday offers' dedupe keys among ``keys`` the ledger has, each with ``""`` for a row skipped as
    ``no_longer_due``, the birthday of a row waiting in the queue unclaimed (its payload's ISO day), else None
    (``campaigns.birthday_key_to_plan``)."""
    wanted = sorted(set(keys))
    found: dict[str, str | None] = {}
    waiting = (MessageStatus.PLANNED.value, MessageStatus.RETRY.value)
    no_longer_due = sa.and_(M.c.status == MessageStatus.SKIPPED.value,
                            M.c.skip_reason == SkipReason.NO_LONGER_DUE.value)  # fmt: skip
    unclaimed = sa.and_(M.c.status.in_(waiting), M.c.claimed_by.is_(None))
    with db.reading(engine) as conn:
        for part in _chunks(wanted):
            query = sa.select(
                M.c.dedupe_key, M.c.payload, no_longer_due.label("no_longer_due"), unclaimed.label("unclaimed")
            ).where(M.c.dedupe_key.in_(part))
            for key, payload, skipped, waits in conn.execute(query):
                day = _payload(payload).get("birthday") if waits else None
                found[key] = "" if skipped else day if _iso_date(day) else None
    return found


def _iso_date(value: object) -> bool:
    """Whether ``value`` is a day as planning writes it: one that is not (a row edited by hand) names no other
    birthday, and plans none again."""
    try:
        return isinstance(value, str) and date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


def _payload(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:  # edited by hand
        return {}
    return value if isinstance(value, dict) else {}


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
    with db.reading(engine) as conn:
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

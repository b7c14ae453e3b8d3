"""Read-only queries behind `kembali stats` and `kembali insights` (SQLAlchemy Core, both dialects)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters.store import PURCHASE_EXCLUDED, M, O, S, _chunks
from worker.domain import MessageStatus, SkipReason

HELD_OUT = SkipReason.HELD_OUT.value
_purchase = O.c.status.not_in(PURCHASE_EXCLUDED)


def ledger_counts(engine: Engine, since: datetime) -> list[tuple[str, int, str, str | None, int]]:
    """(campaign, step, status, skip reason, rows) for rows planned since ``since``."""
    query = (
        sa.select(M.c.campaign, M.c.step, M.c.status, M.c.skip_reason, sa.func.count())
        .where(M.c.created_at >= since)
        .group_by(M.c.campaign, M.c.step, M.c.status, M.c.skip_reason)
    )
    with engine.connect() as conn:
        return [(c, int(s), st, r, int(n)) for c, s, st, r, n in conn.execute(query)]


def hard_bounces(engine: Engine, since: datetime) -> dict[tuple[str, int], int]:
    """Failed rows whose last reply was a 5xx, by (campaign, step)."""
    query = (
        sa.select(M.c.campaign, M.c.step, sa.func.count())
        .where(M.c.created_at >= since, M.c.status == MessageStatus.FAILED.value, M.c.last_code >= 500)
        .group_by(M.c.campaign, M.c.step)
    )
    with engine.connect() as conn:
        return {(c, int(s)): int(n) for c, s, n in conn.execute(query)}


def suppressions(engine: Engine, since: datetime) -> dict[str, int]:
    """Addresses added to the suppression list since ``since``, by reason (unsubscribed, hard_bounce…), in the
    reasons' order (PostgreSQL's GROUP BY returns them in hash order, which ``--json`` would show)."""
    query = sa.select(S.c.reason, sa.func.count()).where(S.c.created_at >= since).group_by(S.c.reason)
    with engine.connect() as conn:
        return {r: int(n) for r, n in sorted(conn.execute(query))}


def exposures(engine: Engine, since: datetime) -> list[tuple[str, int, str, int, datetime]]:
    """(campaign, step, group, customer, moment) for rows planned since ``since``.

    Groups: ``emailed``, the ``sent`` rows at their send time (the conversion of the emails); and, for the
    lift, ``held_out`` (rows skipped with reason ``held_out``) and ``treated`` (every other row, whatever
    became of it), both at the moment the row became due (the later of due and planned), so that both
    groups are counted from the same moment and neither loses the customers who ordered before an email
    went out."""
    query = sa.select(
        M.c.campaign, M.c.step, M.c.status, M.c.skip_reason, M.c.customer_id, M.c.sent_at, M.c.updated_at,
        M.c.due_at, M.c.created_at,
    ).where(M.c.created_at >= since)
    out = []
    with engine.connect() as conn:
        for r in conn.execute(query):
            due = max(r.due_at, r.created_at)
            if r.status == MessageStatus.SKIPPED.value and r.skip_reason == HELD_OUT:
                out.append((r.campaign, int(r.step), "held_out", r.customer_id, due))
                continue
            out.append((r.campaign, int(r.step), "treated", r.customer_id, due))
            if r.status == MessageStatus.SENT.value:
                out.append((r.campaign, int(r.step), "emailed", r.customer_id, r.sent_at or r.updated_at))
    return out


def purchases(engine: Engine, customer_ids: list[int], since: datetime) -> dict[int, list[tuple[datetime, int]]]:
    """Purchases (not cancelled or refunded) placed since ``since``, per customer."""
    out: dict[int, list[tuple[datetime, int]]] = defaultdict(list)
    with engine.connect() as conn:
        for part in _chunks(sorted(set(customer_ids))):
            query = sa.select(O.c.customer_id, O.c.placed_at, O.c.total_minor).where(
                O.c.customer_id.in_(part), O.c.placed_at > since, _purchase
            )
            for cid, placed, total in conn.execute(query):
                out[cid].append((placed, int(total)))
    return dict(out)


def purchases_around(engine: Engine, since: datetime, until: datetime) -> list[tuple[int, int]]:
    """(purchases before ``since``, purchases in [since, until)) for every customer with any purchase."""
    before = sa.func.sum(sa.case((O.c.placed_at < since, 1), else_=0))
    during = sa.func.sum(sa.case((sa.and_(O.c.placed_at >= since, O.c.placed_at < until), 1), else_=0))
    query = sa.select(before, during).where(_purchase).group_by(O.c.customer_id)
    with engine.connect() as conn:
        return [(int(b or 0), int(d or 0)) for b, d in conn.execute(query)]


def first_two_purchases(engine: Engine) -> list[tuple[datetime, datetime | None]]:
    """Per customer with a purchase: (first purchase, second purchase or None)."""
    rank = sa.func.row_number().over(partition_by=O.c.customer_id, order_by=(O.c.placed_at, O.c.id)).label("rank")
    ranked = sa.select(O.c.customer_id, O.c.placed_at, rank).where(_purchase).subquery()
    query = (
        sa.select(ranked.c.customer_id, ranked.c.rank, ranked.c.placed_at)
        .where(ranked.c.rank <= 2)
        .order_by(ranked.c.customer_id, ranked.c.rank)
    )
    pairs: dict[int, list[datetime]] = defaultdict(list)
    with engine.connect() as conn:
        for cid, _rank, placed in conn.execute(query):
            pairs[cid].append(_aware(placed))
    return [(v[0], v[1] if len(v) > 1 else None) for v in pairs.values()]


def feedback_scores(engine: Engine) -> list[float] | None:
    """Every score in a ``feedback`` table, when one exists (None when it does not).

    A placeholder until the daemon records feedback: it reads the first column
    named ``score``, ``rating`` or ``nps``."""
    inspector = sa.inspect(engine)
    if not inspector.has_table("feedback"):
        return None
    columns = {c["name"] for c in inspector.get_columns("feedback")}
    score = next((c for c in ("score", "rating", "nps") if c in columns), None)
    if score is None:
        return None
    table = sa.table("feedback", sa.column(score))
    query = sa.select(table.c[score]).where(table.c[score].is_not(None))
    with engine.connect() as conn:
        return [float(v) for (v,) in conn.execute(query)]


def _aware(value: Any) -> datetime:
    """Window-function results skip the column type on SQLite: make them aware UTC again."""
    from worker.adapters.tables import UTCDateTime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return UTCDateTime().process_result_value(value, sa.engine.default.DefaultDialect())  # type: ignore[return-value]

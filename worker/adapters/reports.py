"""Read-only queries behind `kembali stats` and `kembali insights` (SQLAlchemy Core, both dialects).

The report's queries read in the connection they are given: ``worker.stats`` runs them all in one transaction
that sees one moment of the database (``db.reading(snapshot=True)``), so that a message the daemon sends while
the report is made is not waiting in one figure and sent in the next."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters import db
from worker.adapters.ledger import CLOSED_WITH, closed_as_failed
from worker.adapters.store import KEMBALI_REASONS, PAID, M, O, S, followed_sql, payload_days, payload_text
from worker.adapters.tables import Attempt, Feedback, UTCDateTime
from worker.core import stats
from worker.core.audiences import WINBACK
from worker.domain import MessageStatus, Outcome, SkipReason

HELD_OUT = SkipReason.HELD_OUT.value
_purchase = O.c.status.in_(PAID)
"""A purchase, for conversions, revenue, repeat purchases, churn and insights: an order paid, shipped or delivered
(as loyalty and win-back count them), not one placed and not paid yet, cancelled or refunded."""
F = Feedback.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]


def _in_period(column: sa.Column[Any], since: datetime, until: datetime) -> sa.ColumnElement[bool]:
    """``column`` from ``since`` to ``until``, both included: the report's period, which ends at its moment (``stats
    --now``); a row recorded after it is not counted."""
    return sa.and_(column >= since, column <= until)


Step = tuple[str, int, int | None]
"""A report's campaign and step: (campaign, step number, the step's days: win-back's, None for the others)."""


def _step(dialect: str) -> list[Any]:
    """The columns of a row's ``Step``, labelled. Win-back's steps are told apart by their days as well as by their
    number: steps inserted or removed in the config give a number to another step, and its rows (another email,
    another coupon) are not counted with those planned under it before."""
    days = sa.case((M.c.campaign == WINBACK, payload_days(dialect, M.c.payload)), else_=sa.null())
    return [M.c.campaign, M.c.step, days.label("days")]


def _as_step(campaign: str, step: Any, days: Any) -> Step:
    return campaign, int(step), None if days is None else int(days)


def ledger_counts(conn: sa.Connection, since: datetime, until: datetime) -> list[tuple[Step, str, str | None, int]]:
    """(step, status, skip reason, rows) for rows planned from ``since`` to ``until``."""
    step = _step(conn.dialect.name)
    query = (
        sa.select(*step, M.c.status, M.c.skip_reason, sa.func.count())
        .where(_in_period(M.c.created_at, since, until))
        .group_by(*step, M.c.status, M.c.skip_reason)
    )
    rows: Any = conn.execute(query)  # (a select of a list of columns: its rows' length is not typed)
    return [(_as_step(c, s, d), st, r, int(n)) for c, s, d, st, r, n in rows]


def cancelled(conn: sa.Connection, since: datetime, until: datetime) -> list[tuple[Step, int]]:
    """(step, rows) of the failed rows planned from ``since`` to ``until`` that an operator cancelled:
    closed as failed (``ledger.closed_as_failed``) and never tried, no attempt row but the operator's (no SMTP
    attempt, no template rendered) and no try counted (``attempts``: a send whose worker died left it
    ``uncertain`` without an attempt row): a message closed while it waited in the queue. One tried before (a 4xx
    in ``retry``, a template error, a 5xx, a send cut short) stays a failure, closed or not."""
    step = _step(conn.dialect.name)
    # a loyalty milestone merged into another's email and closed with it went (or waited) in that email: it was
    # cancelled when that email was, a failure when that email was tried
    carrier = M.alias("carrier")
    merged_into = payload_text(conn.dialect.name, M.c.payload, "merged_into")
    went_untried = sa.exists().where(carrier.c.dedupe_key == merged_into, _never_tried(carrier))
    with_carrier = sa.func.coalesce(M.c.last_error, "").startswith(CLOSED_WITH)
    query = (
        sa.select(*step, sa.func.count())
        .where(_in_period(M.c.created_at, since, until), closed_as_failed(), _never_tried(M),
               sa.or_(~with_carrier, went_untried))
        .group_by(*step)
    )  # fmt: skip
    rows: Any = conn.execute(query)
    return [(_as_step(c, s, d), int(n)) for c, s, d, n in rows]


def _never_tried(row: Any) -> sa.ColumnElement[bool]:
    """``row`` (the ledger or an alias of it) was never tried: no try counted, no attempt row but an operator's."""
    tried = sa.exists().where(A.c.message_id == row.c.id, A.c.outcome != Outcome.OPERATOR.value)
    return sa.and_(row.c.attempts == 0, ~tried)


def permanent_failures(conn: sa.Connection, since: datetime, until: datetime) -> list[tuple[Step, int, str, int]]:
    """(step, last code, last reply, rows) of the failed rows planned from ``since`` to ``until`` whose
    last reply was a 5xx: what the reply says (``core.limits.bounce_kind``) tells a hard bounce from a refused
    content or sender. Grouped by the reply: a few rows per reply a server gives everyone, one per address at
    worst (a reply naming the recipient), and only failed rows with a 5xx are read."""
    step = _step(conn.dialect.name)
    query = (
        sa.select(*step, M.c.last_code, M.c.last_reply, sa.func.count())
        .where(_in_period(M.c.created_at, since, until), M.c.status == MessageStatus.FAILED.value,
               M.c.last_code >= 500)
        .group_by(*step, M.c.last_code, M.c.last_reply)
    )
    rows: Any = conn.execute(query)
    return [(_as_step(c, s, d), int(code), reply or "", int(n)) for c, s, d, code, reply, n in rows]


def suppressions(conn: sa.Connection, since: datetime, until: datetime) -> dict[str, int]:
    """Addresses added to the suppression list from ``since`` to ``until``, by reason (unsubscribed,
    hard_bounce…), in the reasons' order (PostgreSQL's GROUP BY returns them in hash order, which ``--json`` would
    show). One an import carried to a customer's new address (``shop.Followed``) is the customer's unsubscribe or
    complaint again, counted once: at the address they gave it at."""
    # a reason Kembali knows as Kembali writes it: an earlier version stored it as typed ('Complaint'), which was
    # counted apart from the 'complaint' entries (and missed by a program reading --json's "complaint")
    folded = sa.func.lower(S.c.reason)
    reason = sa.case((folded.in_(KEMBALI_REASONS), folded), else_=S.c.reason).label("reason")
    query = sa.select(reason, sa.func.count()).where(
        _in_period(S.c.created_at, since, until), ~followed_sql(S.c.source)
    ).group_by(reason)
    return {r: int(n) for r, n in sorted(conn.execute(query))}


def conversions(
    conn: sa.Connection, since: datetime, *, window: timedelta, now: datetime, currency: str
) -> list[tuple[Step, str, stats.Conversion]]:
    """(step, group, conversion) for rows planned from ``since`` to ``now``, counted in the database.

    Groups: ``emailed``, the ``sent`` rows at their send time (the conversion of the emails); and, for the
    lift, ``held_out`` (rows skipped with reason ``held_out``) and ``treated`` (every other row, whatever
    became of it), both at the moment the row became due (the later of due and planned), so that both
    groups are counted from the same moment and neither loses the customers who ordered before an email
    went out. The first moment per customer counts; ``core.stats.conversion`` defines the rest (a purchase
    paid (``_purchase``), placed since ``since``, after the moment and at most ``window`` later;
    pending when the window ends after ``now``), and the tests hold both to the same numbers.

    Nothing per row or per customer reaches Python: on SQLite the timestamps are compared as the text the
    column type stores (``YYYY-MM-DD HH:MM:SS.ffffff``, whose order is the time order)."""
    due = sa.case((M.c.due_at >= M.c.created_at, M.c.due_at), else_=M.c.created_at)
    held = sa.and_(M.c.status == MessageStatus.SKIPPED.value, M.c.skip_reason == HELD_OUT)
    group = sa.case((held, sa.literal("held_out")), else_=sa.literal("treated"))
    step = _step(conn.dialect.name)
    planned = sa.select(*step, group.label("grp"), M.c.customer_id, due.label("at")).where(
        _in_period(M.c.created_at, since, now)
    )
    emailed = sa.select(
        *step, sa.literal("emailed").label("grp"), M.c.customer_id,
        sa.func.coalesce(M.c.sent_at, M.c.updated_at).label("at"),
    ).where(_in_period(M.c.created_at, since, now), M.c.status == MessageStatus.SENT.value)  # fmt: skip
    rows = sa.union_all(planned, emailed).subquery("rows")
    first = (
        sa.select(rows.c.campaign, rows.c.step, rows.c.days, rows.c.grp, rows.c.customer_id,
                  sa.func.min(rows.c.at).label("at"))
        .group_by(rows.c.campaign, rows.c.step, rows.c.days, rows.c.grp, rows.c.customer_id)
        .subquery("first")
    )  # fmt: skip
    at = sa.type_coerce(first.c.at, UTCDateTime())
    # at + window > now, as at > now - window: a bound parameter, exact on both dialects
    cutoff = sa.bindparam("cutoff", now - window, type_=UTCDateTime())
    closed = at <= cutoff
    bought = sa.and_(
        O.c.customer_id == first.c.customer_id, closed, O.c.placed_at > since, _purchase,
        O.c.placed_at > at, O.c.placed_at <= _plus(at, window, conn.dialect.name),
    )  # fmt: skip
    # in two halves, added up in Python: several customers' revenue (or one customer's, from orders an older import
    # stored) can add up past what a BIGINT holds, where SQLite's sum() fails the report (db.sum_halves)
    revenue = db.sum_halves(sa.case((O.c.currency == currency, O.c.total_minor), else_=0))
    per_customer = (
        sa.select(first.c.campaign, first.c.step, first.c.days, first.c.grp, closed.label("closed"),
                  sa.func.count(O.c.id).label("orders"),
                  *(part.label(f"revenue_{half}") for part, half in zip(revenue, ("high", "low"), strict=True)))
        .select_from(first.outerjoin(O, bought))
        .group_by(first.c.campaign, first.c.step, first.c.days, first.c.grp, first.c.customer_id, first.c.at)
        .subquery("per_customer")
    )  # fmt: skip
    c = per_customer.c
    one = sa.literal(1)
    query = sa.select(
        c.campaign, c.step, c.days, c.grp,
        sa.func.sum(sa.case((c.closed, one), else_=0)), sa.func.sum(sa.case((c.orders > 0, one), else_=0)),
        sa.func.sum(c.revenue_high), sa.func.sum(c.revenue_low), sa.func.sum(sa.case((c.closed, 0), else_=one)),
    ).group_by(c.campaign, c.step, c.days, c.grp)  # fmt: skip
    return [
        (_as_step(campaign, number, days), grp,
         stats.Conversion(int(n), int(k), db.joined(high, low), int(pending)))
        for campaign, number, days, grp, n, k, high, low, pending in conn.execute(query)
    ]  # fmt: skip


def _plus(at: sa.ColumnElement[datetime], window: timedelta, dialect: str) -> sa.ColumnElement[datetime]:
    """``at + window`` to the microsecond: whole seconds added to the text SQLite stores (its date functions
    keep milliseconds, so the fraction is cut off first and put back), an interval of seconds alone on
    PostgreSQL (an interval of days would follow the session's time zone across a DST change)."""
    seconds = int(window.total_seconds())
    if seconds != window.total_seconds():
        raise ValueError(f"the attribution window {window} is not a whole number of seconds")
    if dialect == "sqlite":
        text = sa.func.strftime("%Y-%m-%d %H:%M:%S", sa.func.substr(at, 1, 19), f"+{seconds} seconds").op("||")(
            sa.func.substr(at, 20)
        )
        return sa.type_coerce(text, UTCDateTime())
    return sa.type_coerce(at + sa.literal_column(f"interval '{seconds} seconds'"), UTCDateTime())


def purchases_around(conn: sa.Connection, since: datetime, until: datetime) -> list[tuple[int, int, int]]:
    """(purchases before ``since``, purchases in [since, until), customers) over the customers with any purchase:
    how many customers bought so many times before and during the period, counted in the database (a few
    rows where a row per customer would be a million)."""
    before = sa.func.sum(sa.case((O.c.placed_at < since, 1), else_=0))
    during = sa.func.sum(sa.case((sa.and_(O.c.placed_at >= since, O.c.placed_at < until), 1), else_=0))
    per_customer = (
        sa.select(sa.func.coalesce(before, 0).label("before"), sa.func.coalesce(during, 0).label("during"))
        .where(_purchase)
        .group_by(O.c.customer_id)
        .subquery("per_customer")
    )
    c = per_customer.c
    query = sa.select(c.before, c.during, sa.func.count()).group_by(c.before, c.during)
    return [(int(b), int(d), int(n)) for b, d, n in conn.execute(query)]


_DAY_US = 86_400_000_000


def second_purchase_days(engine: Engine) -> list[tuple[int | None, int | None, bool, int]]:
    """(whole days passed, whole days within, after a win-back email, customers) from the first purchase to the
    second, over the customers with a purchase (``None, None, False`` for those who bought once), as
    ``core.stats.days_between`` and ``days_within`` count them (to the microsecond), in the database: a few hundred
    rows where a row per purchase would be millions. After a win-back email: one was sent to the customer between
    the first purchase and the second (the email may have brought it on)."""
    in_order = {"partition_by": O.c.customer_id, "order_by": (O.c.placed_at, O.c.id)}
    ranked = sa.select(
        O.c.customer_id, O.c.placed_at.label("first_at"),
        sa.func.lead(O.c.placed_at).over(**in_order).label("second_at"),
        sa.func.row_number().over(**in_order).label("rank"),
    ).where(_purchase).subquery("ranked")  # fmt: skip
    first, second = ranked.c.first_at, ranked.c.second_at
    if engine.dialect.name == "sqlite":  # the text stored, 'YYYY-MM-DD HH:MM:SS.ffffff', to microseconds

        def micros(at: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
            whole = sa.cast(sa.func.strftime("%s", sa.func.substr(at, 1, 19)), sa.BigInteger)
            return whole * 1_000_000 + sa.cast(sa.func.substr(at, 21, 6), sa.BigInteger)

        gap = micros(second) - micros(first)
    else:  # an interval's epoch is an exact numeric (PostgreSQL 14 and later)
        gap = sa.cast(sa.extract("epoch", second.op("-")(first)) * 1_000_000, sa.BigInteger)
    # each customer's first win-back email sent (win-back emails only go after the one purchase, so the first is
    # the one to compare): a GROUP BY of the ledger, joined by customer (no index on the ledger leads with it)
    emailed = (
        sa.select(M.c.customer_id, sa.func.min(M.c.sent_at).label("sent_at"))
        .where(M.c.campaign == "winback", M.c.status == MessageStatus.SENT.value, M.c.sent_at.is_not(None))
        .group_by(M.c.customer_id)
        .subquery("emailed")
    )
    prompted = sa.case((sa.and_(emailed.c.sent_at > first, emailed.c.sent_at < second), True), else_=False)
    gaps = (
        sa.select(gap.label("gap"), prompted.label("prompted"))
        .select_from(ranked.outerjoin(emailed, emailed.c.customer_id == ranked.c.customer_id))
        .where(ranked.c.rank == 1)
        .subquery("gaps")
    )
    day = sa.literal(_DAY_US, sa.BigInteger)
    passed = (gaps.c.gap // day).label("passed")  # of whole numbers: the floor, as the gaps are not negative
    within = ((gaps.c.gap + (_DAY_US - 1)) // day).label("within")
    query = sa.select(passed, within, gaps.c.prompted, sa.func.count()).group_by(passed, within, gaps.c.prompted)
    with db.reading(engine) as conn:
        rows = conn.execute(query).all()
    return [(None if p is None else int(p), None if w is None else int(w), bool(e), int(n)) for p, w, e, n in rows]


def feedback_scores(conn: sa.Connection, since: datetime, until: datetime) -> list[float] | None:
    """The ratings given from ``since`` to ``until`` (the ``feedback`` table's scores; None when the table does not
    exist)."""
    if not sa.inspect(conn).has_table("feedback"):
        return None
    query = sa.select(F.c.score).where(_in_period(F.c.created_at, since, until), F.c.score.is_not(None))
    return [float(v) for (v,) in conn.execute(query)]


"""Set-based planning: a campaign's new ledger rows as one SELECT, every column computed in SQL.

Theory of operation
-------------------
A ``Plan`` is one campaign (or one win-back step) as SQL: the FROM, the WHERE
(the rule and consent, then NOT EXISTS the row's dedupe key in the ledger,
then the suppression list: in the steady state nearly every candidate is
already planned, so the ledger probe decides first), and the per-row columns
of the ``message`` row, including the dedupe key (``_key_part``, the SQL twin
of ``core.audiences.key_part``) and the holdout (``core.policy.in_holdout``).
The same SELECT serves two callers:

* ``insert`` writes the new rows with no row travelling through Python. On
  PostgreSQL it is one ``INSERT INTO message (…) SELECT …`` under a lock per
  campaign. On SQLite, whose one write lock the sender needs too, it finds
  the new candidates' ids in a read that takes no write lock, then runs the
  same INSERT ``… WHERE id IN (…)`` for each 20,000 of them while the read
  streams on, on a thread of its own (``read_ahead``; a pass that finds
  nothing new writes nothing, and never waits for the lock). The Message-ID
  is left NULL: the first claim gives it
  (``core.audiences.message_id_for`` of the key, migration 0008), so the first
  pass over a shop writes no random-order unique index entries;
* ``stream`` reads it in keyset batches as ``PlannedMessage`` values, with
  the Message-ID the claim will give, for preview, which must not write.

Campaigns that visit most customers (win-back, new products, loyalty) scan
the customer table in id order with no join: win-back's key reads the first
order's number from the customer row (migration 0009), and the ledger probes,
whose keys start with the customer's id, stay local. Feedback and loyalty on
PostgreSQL probe the ledger per candidate (``Plan.probe``); JIT is off.

The holdout position is integer arithmetic on the customer's id, the same SQL on
both databases (``holdout_position_sql``). The Message-ID preview shows is a
SHA-256: PostgreSQL computes it itself (``sha256()``); on SQLite the engine
registers the pure function as a deterministic SQL function
(``kembali_message_id``, see ``adapters.db``). The campaign-rule tests run
every case through ``stream`` and ``insert`` on both databases and compare
keys, Message-IDs and holdouts with the pure functions.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from queue import Full, Queue
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from worker import log
from worker.adapters import db
from worker.adapters.store import RATEABLE, C, M, O, _key_part, payload_days, payload_text, suppressed_sql
from worker.adapters.tables import UTCDateTime
from worker.core.campaigns import LOYALTY_REPLANS
from worker.core.policy import HOLDOUT_MODULUS, holdout_factors, holdout_threshold
from worker.domain import MessageStatus, PlannedMessage, SkipReason

PLAN_LOCKS = 1265462378
"""PostgreSQL advisory locks (this number, hash of the campaign) that let one worker at a time plan a campaign."""
INSERT_IDS = 20_000
"""New rows per write transaction: the SQLite write lock is held for one such insert at a time."""
SQLITE_CACHE_KIB = 16_384
"""SQLite page cache of a planning connection (the default 2 MB re-reads the ledger's index pages; 64 MB was no
faster and, with two campaigns at once, doubled the peak RSS)."""


T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """One campaign's (or win-back step's) new ledger rows, as SQL."""

    campaign: str
    step: Any
    """The step, an SQL expression (win-back's depends on the order's age)."""
    priority: int
    due_at: datetime
    expires_at: datetime
    key: Any
    """The dedupe key, an SQL expression."""
    payload: Any
    """The payload as JSON text, an SQL expression."""
    from_: Any
    where: list[Any]
    order: tuple[Any, ...]
    """Keyset columns: an index's columns, the first ranged by ``where``, the last unique within the first."""
    ident: Any
    """The primary key that names a candidate (one row per candidate): what ``insert`` inserts by."""
    holdout_share: float = 0.0
    probe: bool = False
    """Few candidates, found by an index range: probe the ledger's dedupe key once per candidate.
    PostgreSQL's planner would otherwise hash the whole ledger for them (2-3 times slower here)."""
    checked_last: tuple[Any, ...] = ()
    """Conditions of the rule that probe another table per candidate: checked after the ledger probe, which in the
    steady state leaves out nearly every candidate first (win-back's "the only order was paid")."""
    merged: Any = None
    """When true for a row (an SQL condition), the row is stored as skipped, ``merged`` (``SkipReason.MERGED``):
    another row of this pass carries it (loyalty's milestones reached by one order). None: never."""
    key_free: Any = None
    """The condition that the ledger has no row that stands for the candidate's (None: no row with its key, the
    plan's ledger probe). Win-back's: no row with its key that was planned as this step (``winback_step_moved``);
    loyalty's: no row of the milestone but rewards skipped unsent as ``no_longer_due`` (``_loyalty_key``)."""
    rechecks_key: bool = False
    """The key is the first of several the ledger leaves free, chosen as the row is written (loyalty's ``…:r<n>``):
    SQLite's insert, which re-checks the rule but not the probes, re-checks ``key_free`` too. A row another process
    planned between the pass's read and its insert would else move the key on to the next one free, a second row for
    the occasion, where a fixed key meets ON CONFLICT DO NOTHING."""
    probes_ledger_last: bool = False
    """A condition of ``checked_last`` probes the ledger per candidate by an index range (win-back's rows of the
    order under another step number). PostgreSQL's INSERT then plans no sequential scan: on a first pass the
    ledger's statistics say it is empty, and it would scan the ledger once per candidate, over the rows the very
    statement is inserting (a first pass over 50,000 customers took 70 s instead of 1)."""


# --- the SQL of the pure functions -------------------------------------------------------


def holdout_position_sql(campaign: str, customer_id: Any) -> Any:
    """``core.policy.holdout_position(customer_id, campaign)`` in SQL: the same 64-bit integer arithmetic on
    both databases (every intermediate stays below 2**62)."""
    multiplier, offset = holdout_factors(campaign)
    modulus = sa.literal(HOLDOUT_MODULUS, sa.BigInteger)
    return ((sa.cast(customer_id, sa.BigInteger) % modulus) * sa.literal(multiplier, sa.BigInteger)
            + sa.literal(offset, sa.BigInteger)) % modulus  # fmt: skip


def json_object_sql(dialect: str, pairs: Sequence[tuple[str, Any]]) -> Any:
    """A JSON object of string values, as text (the payload column)."""
    if not pairs:
        return sa.literal("{}")
    args: list[Any] = []
    for name, value in pairs:
        args += [sa.literal(name), sa.cast(value, sa.String)]
    if dialect == "postgresql":
        return sa.cast(sa.func.json_build_object(*args), sa.String)
    return sa.func.json_object(*args, type_=sa.String)


def _consenting() -> list[Any]:
    return [C.c.marketing_consent.is_(True)]


def _unsuppressed() -> Any:
    return ~suppressed_sql(C.c.email)


def _scanned(dialect: str, column: Any) -> Any:
    """``column`` in a form SQLite's planner will not pick an index range for (``likely(x)`` is ``x``):
    the plans that visit most customers scan them in id order instead (sequential reads, local probes)."""
    return sa.func.likely(column, type_=column.type) if dialect == "sqlite" else column


def _lit(value: str) -> Any:
    return sa.literal(value, sa.String)


# --- the campaigns (the rules of core.campaigns, in SQL) -----------------------------------


@dataclass(frozen=True)
class Common:
    """What every plan of one pass shares."""

    dialect: str
    now: datetime
    expires_at: datetime
    priority: int
    holdout_share: float


def winback(
    c: Common, *, steps: Sequence[tuple[datetime, str, int]], given_up_before: datetime | None = None
) -> Plan:
    """One-time buyers whose only order, paid, was placed before the first step's cut-off (and not before
    ``given_up_before``), each at the last step whose cut-off has passed; ``steps``: (before, template, days) per
    step, in order.

    Driven by customer id, not by the (order_count, first_order_at) index: most customers are candidates,
    and visiting them in id order keeps the ledger probes (keys start with the customer's id) local."""
    def by_step(value: Callable[[int, str, int], Any]) -> Any:
        """The value of the step due (the last whose cut-off has passed), as SQL."""
        first = value(1, steps[0][1], steps[0][2])
        if len(steps) == 1:
            return first
        later = list(enumerate(steps, start=1))[:0:-1]  # the last step first
        return sa.case(*((C.c.first_order_at < b, value(n, t, d)) for n, (b, t, d) in later), else_=first)

    step = by_step(lambda n, _t, _d: sa.literal(n))
    template = by_step(lambda _n, t, _d: _lit(t))
    days = by_step(lambda _n, _t, d: _lit(str(d)))
    step_days = by_step(lambda _n, _t, d: sa.literal(d, sa.Integer))
    prefix = (
        _lit("winback:") + _key_part(C.c.external_id) + _lit(":") + _key_part(C.c.first_order_external_id)
        + _lit(":")
    )  # fmt: skip
    numbered = prefix + sa.cast(step, sa.String)
    # the step's key, unless the order has a row of that key planned as another step (one removed or inserted before
    # it since): then a key of its own, with its days (``core.campaigns.winback_step_moved``, as SQL)
    taken = M.alias("taken")

    def _this_step(row: Any) -> Any:
        """The ledger row ``row`` was planned as this step (``not core.campaigns.winback_step_moved``)."""
        row_days, row_template = payload_days(c.dialect, row.c.payload), payload_template(c.dialect, row.c.payload)
        return sa.or_(
            _has_days(c.dialect, row.c.payload, days), row_days.is_(None), row_days == step_days,
            sa.and_(row_days.not_in([d for _b, _t, d in steps]),
                    sa.func.coalesce(row_template, template) == template),
        )  # fmt: skip

    this_step = _this_step(taken)
    # the rows of the step's number: at its key, then at keys of their own (``…:<step>d<days>``, one range of the
    # unique index, ``_winback_row`` on the collation), one of which may be this step's, its days edited since. In
    # two probes: in a pass's steady state the first, one key, decides (one range of every candidate's took 0.45 s
    # more of a win-back read of 556k candidates on SQLite, each bound of it built again from the customer's ids)
    own = numbered + _lit("d")
    own_keys = M.alias("own_keys")
    key_free = sa.and_(
        ~sa.exists().where(taken.c.dedupe_key == numbered, this_step),
        ~sa.exists().where(
            own_keys.c.dedupe_key >= own, own_keys.c.dedupe_key < numbered + _lit("e"),
            sa.func.substr(own_keys.c.dedupe_key, 1, sa.func.length(own)) == own, _this_step(own_keys),
        ),
    )  # fmt: skip
    moved = M.alias("moved")
    key = sa.case((sa.exists().where(moved.c.dedupe_key == numbered), own + days), else_=numbered)
    where = [
        _scanned(c.dialect, C.c.order_count) == 1, C.c.first_order_at < steps[0][0],
        C.c.first_order_external_id.is_not(None), *_consenting(),
    ]  # fmt: skip
    if given_up_before is not None:
        where.append(C.c.first_order_at >= given_up_before)
    payload = json_object_sql(c.dialect, [
        ("days", days), ("first_order", C.c.first_order_external_id), ("first_order_id", C.c.first_order_id),
        ("template", template),
    ])  # fmt: skip
    # the one purchase was paid: "we hope you are enjoying your …" is not for an order placed and never paid (the
    # customer row's order_count counts it, so that an unpaid order after the purchase stops the sequence)
    paid = sa.exists().where(O.c.id == C.c.first_order_id, O.c.status.in_(RATEABLE))
    # a step renumbered in the config (one inserted or removed before it) has a new key: not planned again for an
    # order that has a win-back row of its day count or a later one, whatever that row's number
    again = _winback_row(c.dialect, prefix, step_days)
    return Plan("winback", step, c.priority, c.now, c.expires_at, key, payload,
                C, where, (C.c.id,), C.c.id, c.holdout_share, checked_last=(~again, paid), key_free=key_free,
                probes_ledger_last=True)  # fmt: skip


def _winback_row(dialect: str, prefix: Any, days: Any) -> Any:
    """EXISTS a ledger row whose key starts with ``prefix`` (``winback:<customer>:<order>:``) and whose payload's
    ``days`` is at least ``days``: one range of the dedupe key's unique index per candidate, as the key probe.

    The range's end is the prefix and a letter, not ``;`` (``:`` + 1): PostgreSQL compares the keys by the
    database's collation, in which punctuation may weigh nothing (en_US), but digits come before letters in every
    one; the ``substr`` keeps to the keys that do start with the prefix. The payload's ``days`` is read without
    failing on a payload edited by hand (``payload_days``): SQLite's ``json_extract`` only where ``json_valid``,
    PostgreSQL's by a regular expression (the text of a row planned in SQL or in Python: ``"days" : "30"``,
    ``"days": "30"``)."""
    earlier = M.alias("earlier")
    return sa.exists().where(
        earlier.c.dedupe_key >= prefix, earlier.c.dedupe_key < prefix + _lit("A"),
        sa.func.substr(earlier.c.dedupe_key, 1, sa.func.length(prefix)) == prefix,
        payload_days(dialect, earlier.c.payload) >= days,
    )  # fmt: skip


def _has_days(dialect: str, payload: Any, days: Any) -> Any:
    """Whether ``payload`` holds ``"days": "<days>"`` as this database's JSON function writes it (SQLite ``"days":"…"``,
    PostgreSQL ``"days" : "…"``): a search of the text, which in a pass's steady state finds the row at a step's key
    to be that step's without parsing the JSON (0.6 µs a candidate). False leaves it to ``payload_days``. (An id in
    the payload holding those characters has its quotes escaped: it cannot match.)"""
    if dialect == "postgresql":
        return sa.func.strpos(payload, _lit('"days" : "') + days + _lit('"')) > 0
    return sa.func.instr(payload, _lit('"days":"') + days + _lit('"')) > 0


def payload_template(dialect: str, payload: Any) -> Any:
    """A win-back row's ``template`` (its payload's), as ``payload_days`` reads ``days``; NULL where there is none
    (template folder names are a-z, 0-9, - and _: nothing JSON escapes)."""
    return payload_text(dialect, payload, "template")


def winback_rows_by_step(engine: Engine) -> dict[tuple[int, int | None], int]:
    """(step number, the payload's ``days``) → the win-back ledger rows planned so: one scan of the ledger, for
    preview's note on steps renumbered since (``core.campaigns.winback_renumbered``)."""
    days = payload_days(engine.dialect.name, M.c.payload)
    query = sa.select(M.c.step, days, sa.func.count()).where(M.c.campaign == "winback").group_by(M.c.step, days)
    with db.reading(engine) as conn:
        return {(int(step), None if d is None else int(d)): int(n) for step, d, n in conn.execute(query)}


def feedback(c: Common, *, after: datetime, not_after: datetime) -> Plan:
    """Orders paid, shipped or delivered, settled (delivered, else placed) in ``(after, not_after]``."""
    key = _lit("feedback:") + _key_part(O.c.external_id)
    payload = json_object_sql(c.dialect, [
        ("customer", _key_part(C.c.external_id)), ("order", O.c.external_id), ("order_id", O.c.id),
    ])  # fmt: skip
    ranged = [O.c.settled_at > after, O.c.settled_at <= not_after]
    where = [*ranged, O.c.status.in_(RATEABLE), *_consenting()]
    return Plan("feedback", sa.literal(1), c.priority, c.now, c.expires_at, key, payload,
                O.join(C, C.c.id == O.c.customer_id), where, (O.c.settled_at, O.c.id), O.c.id,
                c.holdout_share, probe=True)  # fmt: skip


def new_products(c: Common, *, since: datetime, before: datetime, week: str) -> Plan:
    """Customers whose last purchase is in ``[since, before)`` (``before``: the newest launch)."""
    key = _lit("new_products:") + _key_part(C.c.external_id) + _lit(f":{week}")
    last = _scanned(c.dialect, C.c.last_order_at)
    where = [last >= since, last < before, *_consenting()]
    # by customer id, as win-back: most customers are candidates
    return Plan("new_products", sa.literal(1), c.priority, c.now, c.expires_at, key,
                json_object_sql(c.dialect, []), C, where, (C.c.id,), C.c.id, c.holdout_share)  # fmt: skip


def loyalty(
    c: Common, *, since: datetime, orders: Sequence[int], spend_minor: Sequence[int], currency: str,
    totals_in_currency: bool = True,
) -> list[Plan]:
    """Customers with a purchase paid at or after ``since``: one plan for the highest order-count milestone
    reached, one for the highest spend milestone, each when the purchases paid before ``since`` had not reached it
    (an order paid since did). Only orders paid (paid, shipped, delivered: ``RATEABLE``) count, not one placed and
    not paid yet, each from its ``paid_at`` (migration 0019; ``placed_at`` where it has none); spend counts those in
    ``currency`` (the shop's).

    Once per milestone (``_loyalty_key``): a milestone whose reward was skipped as ``no_longer_due`` (its order
    refunded before it went) is planned again, under ``…:r1`` and on, when reached again; no other.

    One email per occasion: a spend milestone due for a customer whose order-count milestone is due and new in the
    same pass (one order reached both) is stored as skipped, ``merged``, its payload's ``merged_into`` naming the
    order milestone's key: that email is the reward, and the milestone is not planned again. The spend plan comes
    first, so that it still sees the order milestone's key missing from the ledger, in ``insert`` as in ``stream``.

    The customer row's ``last_order_at`` (or a ``last_paid_at`` after it: an order paid later than the last was
    placed, ``ix_customer_paid_late``), ``order_count`` and ``total_spent_minor`` (every purchase, unpaid ones too)
    narrow the candidates down; the paid counts and sums are read from each candidate's orders. Not
    ``total_spent_minor`` unless ``totals_in_currency``: it adds up another currency (``shop.spend_currency``)."""
    # correlated to the customer row explicitly: the key's copy is inside the ledger probe's EXISTS, where it would
    # otherwise correlate to nothing and count every customer's orders
    bought = sa.select().select_from(O).where(O.c.customer_id == C.c.id, O.c.status.in_(RATEABLE)).correlate(C)
    earlier = sa.func.coalesce(O.c.paid_at, O.c.placed_at) < since
    labels: dict[str, Any] = {}
    for prefix, thresholds, paid, amount in (
        ("orders", orders, bought, sa.literal(1, sa.BigInteger)),
        ("spend", spend_minor, bought.where(O.c.currency == currency), O.c.total_minor),
    ):
        if not thresholds:
            continue
        # SQLite's sum() fails the pass with "integer overflow" past what a BIGINT holds, where orders an older import
        # stored may add up (PostgreSQL's is numeric): its total(), the same visit, adds up in a float, exact below
        # 2^53 minor units and a few parts in 10^16 off above, where no milestone is that near
        add = sa.func.total if c.dialect == "sqlite" and prefix == "spend" else sa.func.sum
        reached = sa.func.coalesce(add(amount), 0)
        before = sa.func.coalesce(add(sa.case((earlier, amount), else_=0)), 0)
        # one visit of the customer's paid orders gives the highest milestone reached, or NULL when none is or the
        # orders before ``since`` had reached it already
        due = paid.with_only_columns(sa.case(
            *((reached >= t, sa.case((before < t, sa.literal(t, sa.BigInteger)), else_=sa.null()))
              for t in sorted(thresholds, reverse=True)),
            else_=sa.null(),
        )).scalar_subquery()  # fmt: skip
        labels[prefix] = (due, _lit(f"{prefix}-") + sa.cast(due, sa.String))

    def base_of(label: Any) -> Any:
        return _lit("loyalty:") + _key_part(C.c.external_id) + _lit(":") + label

    # a purchase paid since ``since``: one placed since (paid when placed, or later), or one paid later than the
    # last was placed (a few customers: ``ix_customer_paid_late``'s); SQLite visits every customer in id order
    paid_late = sa.and_(_scanned(c.dialect, C.c.last_paid_at) >= since, C.c.last_paid_at > C.c.last_order_at)
    recent = sa.or_(_scanned(c.dialect, C.c.last_order_at) >= since, paid_late)
    keys = {prefix: _loyalty_key(base_of(label)) for prefix, (_due, label) in labels.items()}
    plans = []
    for prefix, column, thresholds in (("spend", C.c.total_spent_minor, spend_minor),
                                       ("orders", C.c.order_count, orders)):  # fmt: skip
        if prefix not in labels:
            continue
        due, label = labels[prefix]
        key, key_free = keys[prefix]
        payload = json_object_sql(c.dialect, [("milestone", label)])
        merged = None
        if prefix == "spend" and "orders" in labels:
            # the order milestone is due too, and this pass plans it (the ledger has no row that stands for it yet):
            # one email
            due_orders, _ = labels["orders"]
            orders_key, orders_free = keys["orders"]
            merged = sa.and_(due_orders.is_not(None), orders_free)
            payload = sa.case((merged, json_object_sql(c.dialect, [("milestone", label), ("merged_into", orders_key)])),
                              else_=payload)  # fmt: skip
        if prefix == "orders" and "spend" in labels:
            # the spend milestone this pass merged into this email (planned just before): named, so that if this one
            # is found no longer due when it is sent (an earlier order refunded), that one is sent on its own
            # (preview, which writes nothing, finds no spend row yet: the one this pass would merge, at the key the
            # spend plan would give it)
            spend_due, spend_label = labels["spend"]
            spend_key, spend_free = keys["spend"]
            into = M.alias("into_this")
            merged_here = sa.select(into.c.dedupe_key).where(
                into.c.dedupe_key.in_(_loyalty_keys(base_of(spend_label))),
                sa.func.coalesce(into.c.skip_reason, "") == SkipReason.MERGED.value,
                # merged into this one, not an earlier one (the closing quote: not 'orders-50' nor 'orders-5:r1')
                into.c.payload.contains(key + _lit('"')),
            ).correlate(C).limit(1).scalar_subquery()  # fmt: skip
            carried = sa.func.coalesce(merged_here, sa.case((spend_free, spend_key), else_=sa.null()))
            carries = sa.and_(spend_due.is_not(None), carried.is_not(None))
            payload = sa.case((carries, json_object_sql(c.dialect, [("milestone", label), ("carries", carried)])),
                              else_=payload)  # fmt: skip
        narrowed = [column >= min(thresholds)] if prefix == "orders" or totals_in_currency else []
        where = [recent, *narrowed, *_consenting(), due.is_not(None)]
        plans.append(Plan("loyalty", sa.literal(1), c.priority, c.now, c.expires_at, key, payload, C, where,
                          (C.c.id,), C.c.id, c.holdout_share, probe=True, merged=merged,
                          key_free=key_free, rechecks_key=True))  # fmt: skip
    return plans


def _loyalty_keys(base: Any) -> list[Any]:
    """``core.campaigns.loyalty_keys`` in SQL: the milestone's key, then ``…:r1`` … ``…:r<LOYALTY_REPLANS>``."""
    return [base, *(base + _lit(f":r{n}") for n in range(1, LOYALTY_REPLANS + 1))]


def _loyalty_key(base: Any) -> tuple[Any, Any]:
    """(the key, the condition that the ledger has no row that stands for the milestone): ``core.campaigns.
    loyalty_key_to_plan`` in SQL. A row stands for it unless it was skipped as ``no_longer_due`` with nothing of it
    tried before an operator's resend (``resent_after_attempts`` 0: it cannot have arrived); the key is then the first
    of the milestone's keys free. In the steady state the first probe decides: the milestone's key, its reward
    sent (one index probe and the row's status, per candidate whose milestone an order paid in the window reached)."""
    keys = _loyalty_keys(base)
    stands = M.alias("stands")
    replannable = sa.and_(stands.c.status == MessageStatus.SKIPPED.value,
                          sa.func.coalesce(stands.c.skip_reason, "") == SkipReason.NO_LONGER_DUE.value,
                          stands.c.resent_after_attempts == 0)  # fmt: skip
    taken = M.alias("taken")
    # each correlated to the customer row explicitly: the key's copy inside another subquery (the spend milestone
    # merged into the order one's key) would otherwise correlate to nothing, and read every customer
    free = sa.and_(
        ~sa.exists().where(stands.c.dedupe_key == keys[0], ~replannable).correlate(C),
        ~sa.exists().where(stands.c.dedupe_key.in_(keys[1:]), ~replannable).correlate(C),
        ~sa.exists().where(taken.c.dedupe_key == keys[-1]).correlate(C),  # reached again more often than the bound
    )
    first = M.alias("first_free")
    key = sa.case(*((~sa.exists().where(first.c.dedupe_key == k).correlate(C), k) for k in keys[:-1]),
                  else_=keys[-1])  # fmt: skip
    return key, free


# --- running a plan ----------------------------------------------------------------------


def _columns(plan: Plan, dialect: str, domain: str, *, message_id: bool) -> dict[str, Any]:
    """The ``message`` row, column by column, as labelled SQL; without ``message_id`` the Message-ID is
    left NULL for the first claim to give (migration 0008)."""
    held = holdout_position_sql(plan.campaign, C.c.id) < holdout_threshold(plan.holdout_share)
    skips = [(held, SkipReason.HELD_OUT)] if plan.holdout_share > 0 else []  # held out first: no email at all
    if plan.merged is not None:
        skips.append((plan.merged, SkipReason.MERGED))
    if skips:
        status: Any = sa.case(*((when, MessageStatus.SKIPPED.value) for when, _ in skips),
                              else_=MessageStatus.PLANNED.value)  # fmt: skip
        reason: Any = sa.case(*((when, why.value) for when, why in skips), else_=sa.null())
    else:
        status, reason = sa.literal(MessageStatus.PLANNED.value), sa.null()
    due = sa.literal(plan.due_at, UTCDateTime())
    return {
        "dedupe_key": plan.key,
        "campaign": sa.literal(plan.campaign),
        "step": plan.step,
        "priority": sa.literal(plan.priority),
        "customer_id": C.c.id,
        "email": C.c.email,
        "status": status,
        "skip_reason": reason,
        "due_at": due,
        "expires_at": sa.literal(plan.expires_at, UTCDateTime()),
        "next_attempt_at": due,
        "attempts": sa.literal(0),
        "message_id": db.message_id_sql(dialect, plan.key, domain) if message_id else sa.null(),
        "payload": plan.payload,
        "created_at": sa.literal(plan.due_at, UTCDateTime()),
        "updated_at": sa.literal(plan.due_at, UTCDateTime()),
    }


def _new(plan: Plan) -> list[Any]:
    """The plan's rule, then the ledger probe, then the suppression list: in the steady state nearly every
    candidate is already in the ledger, so its probe comes first and the suppression probe rarely runs."""
    free = ~sa.exists().where(M.c.dedupe_key == plan.key) if plan.key_free is None else plan.key_free
    return [*plan.where, free, *plan.checked_last, _unsuppressed()]


def _after(order: Sequence[Any], cursor: Sequence[Any] | None) -> list[Any]:
    if cursor is None:
        return []
    bounds = [sa.bindparam(None, v, type_=c.type) for c, v in zip(order, cursor, strict=True)]
    # the plain ``>=`` on the first column is what lets the index range start at the cursor
    return [order[0] >= bounds[0], sa.tuple_(*order) > sa.tuple_(*bounds)]


def insert(engine: Engine, plan: Plan, domain: str) -> int:
    """Insert the plan's new rows, leaving every dedupe key the ledger has alone; returns the rows created.

    PostgreSQL: one INSERT … SELECT, under the campaign's planning lock and without ON CONFLICT
    (``_insert_locked``). Its readers and writers do not block each other, and the rows are found and written
    in one visit (the two steps below took twice as long there: 15 s instead of 8 for 530k rows).

    SQLite: two steps. A read-only transaction finds the new candidates (``plan.ident`` of each): the whole rule,
    ledger probe and suppression probe, streamed from the database. It takes no write lock (SQLite's
    other readers and its one writer go on beside it), and in the steady state it is all a pass does.
    Every ``INSERT_IDS`` new candidates are inserted by ident in a write transaction of their own, without
    foreign key checks (``db.writing_without_foreign_keys``), while the read goes on on a thread of its own
    (``read_ahead``): memory stays flat however many are new. The insert re-checks the rule (a customer who
    ordered again in between is not planned) but not the probes: a row planned meanwhile by another worker is
    what ON CONFLICT DO NOTHING is for, and an address suppressed meanwhile is skipped at send time. (Win-back's
    key depends on the row at its step's key, which such a row would be: its ``checked_last``, re-checked here,
    finds that row by its days instead; loyalty's, the first of a milestone's keys free, re-checks that none of them
    stands for the milestone now: ``Plan.rechecks_key``.)"""
    dialect = engine.dialect.name
    columns = _columns(plan, dialect, domain, message_id=False)
    names = list(columns)

    def rows_where(*where: Any, into: Any = None) -> Any:
        # in the plan's order, which ``stream`` (preview) reads: the rows' ids follow it, and a claim takes rows due
        # at one time by id, so of two rows for one mailbox (a customer's two orders to rate) the run sends the one
        # preview names
        select = sa.select(*(columns[n].label(n) for n in names)).select_from(plan.from_).where(*where)
        select = select.order_by(*plan.order)
        return (db.insert_ignore(engine, M) if into is None else into).from_select(names, select)

    if dialect == "postgresql":
        try:
            return _insert_locked(engine, plan, rows_where(*_new(plan), into=sa.insert(M)))
        except sa.exc.IntegrityError as exc:
            diag = getattr(exc.orig, "diag", None)
            if getattr(diag, "constraint_name", None) != DEDUPE_KEY_CONSTRAINT:
                raise
            log.event("plan_insert_conflict", logging.WARNING, campaign=plan.campaign,
                      error=str(exc.orig).splitlines()[0])  # fmt: skip
            again = postgresql.insert(M).on_conflict_do_nothing(index_elements=[M.c.dedupe_key])
            return _insert_locked(engine, plan, rows_where(*_new(plan), into=again))
    created = 0
    rechecked = (plan.key_free,) if plan.rechecks_key else ()
    # with SQLite's memory statistics on, threads contend on their mutex (see planning.PLAN_THREADS): no read-ahead
    ahead = read_ahead if db.without_sqlite_memstatus() else _in_turn
    with closing(ahead(lambda: _new_idents(engine, plan))) as parts:
        for part in parts:
            stmt = rows_where(_among(plan.ident, part), *plan.where, *plan.checked_last, *rechecked)
            # each row's customer_id comes from the customer row the statement selects, in a write transaction no
            # other writer can enter: the foreign key check could only confirm it (0.3 s of 2.25 s for 526k rows)
            with _one_writer(engine), db.writing_without_foreign_keys(engine) as conn:
                created += conn.execution_options(preserve_rowcount=True).execute(stmt).rowcount
    return created


def _new_idents(engine: Engine, plan: Plan) -> Generator[list[int], None, None]:
    """SQLite: the plan's new candidates (``plan.ident``), ``INSERT_IDS`` at a time in ascending order, streamed
    by one read-only transaction."""
    with db.reading(engine) as reader:
        # the ledger's index pages, read again and again: a cache that holds them saves re-reads
        reader.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        found = reader.execution_options(stream_results=True, yield_per=INSERT_IDS).execute(
            sa.select(plan.ident).select_from(plan.from_).where(*_new(plan))
        )
        for part in found.scalars().partitions(INSERT_IDS):
            yield sorted(part)


READ_AHEAD = 2
"""Parts a planning read may hold ready for its inserts (each ``INSERT_IDS`` ids), besides the one it is reading."""


def read_ahead(parts: Callable[[], Generator[T, None, None]], depth: int = READ_AHEAD) -> Generator[T, None, None]:
    """The items of ``parts()``, produced on a thread of their own: ``depth`` items wait for the caller while the
    thread produces the next.

    SQLite's planning read goes on while the rows it found are inserted: a campaign's read and its inserts overlap
    instead of taking turns (a launch day on SQLite, 526k new rows: 6.3 → 5.9 s, medians of six runs each way,
    alternated). The iterator is created, run and closed on that thread, so a reading transaction it opens is begun
    and ended there. Closing this generator (``insert`` does, with ``contextlib.closing``, whether its loop ends or
    fails) stops the thread and waits for it, which takes until the thread's current item is produced (an insert's
    failure surfaces after the read's current 20,000 ids: at most one scan of the customers when few are new).
    The thread's failure is raised in the caller."""
    queue: Queue[tuple[str, Any]] = Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                queue.put((kind, value), timeout=0.05)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            with closing(parts()) as items:
                for item in items:
                    if not put("item", item):
                        return
        except BaseException as exc:  # raised again in the caller's thread
            if not put("error", exc):  # the caller has stopped: it has its own failure to raise, or none
                log.event("plan_read_failed_after_stop", logging.DEBUG, error=log.error_line(exc))
        else:
            put("done", None)

    producer = threading.Thread(target=produce, name=f"{threading.current_thread().name}-read", daemon=True)
    producer.start()
    try:
        while True:
            kind, value = queue.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        producer.join()


def _in_turn(parts: Callable[[], Generator[T, None, None]]) -> Generator[T, None, None]:
    """``read_ahead``'s items without its thread: the read and the inserts take turns on the caller's."""
    return parts()


DEDUPE_KEY_CONSTRAINT = "message_dedupe_key_key"
"""PostgreSQL's name of the ledger's unique dedupe key (migration 0001): the only conflict the planning INSERT
retries past; any other (a primary key clash, say) is an error."""


def _insert_locked(engine: Engine, plan: Plan, stmt: Any) -> int:
    """PostgreSQL: run the plan's INSERT … SELECT holding the campaign's planning lock; returns the rows created.

    The lock puts the workers that plan one campaign at the same moment in turn, and each statement sees
    what the one before it committed: the SELECT's NOT EXISTS then leaves out every key already in the ledger,
    so ``insert`` runs a plain INSERT first. ON CONFLICT DO NOTHING would make each row a speculative insertion,
    checked against the dedupe key's index and confirmed by one more WAL record (1.4 s of a 5.6 s insert of
    526k rows). A row of the campaign written without the lock, which nothing in Kembali does, makes the plain
    INSERT fail as a whole on the dedupe key; ``insert`` then runs it again with ON CONFLICT (dedupe_key) DO
    NOTHING. READ COMMITTED whatever the database's default: the INSERT must see what committed while it
    waited for the lock, not what was there when the transaction began."""
    with engine.connect().execution_options(isolation_level="READ COMMITTED") as conn, conn.begin():
        # waited for past database.lock_timeout_seconds: its holder is another worker's pass at work (a large shop's
        # takes minutes), or one ended by the server once idle in its transaction; given up, every other worker's
        # pass of the campaign failed (a run --once sent nothing) while one took longer than the lock timeout
        limit = conn.execute(sa.text("SELECT current_setting('lock_timeout')")).scalar_one()
        conn.execute(sa.text("SET LOCAL lock_timeout = 0"))
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:space, hashtext(:campaign))"),
                     {"space": PLAN_LOCKS, "campaign": plan.campaign})  # fmt: skip
        conn.execute(sa.text("SELECT set_config('lock_timeout', :limit, true)"), {"limit": limit})
        _tune(conn, plan)
        return int(conn.execution_options(preserve_rowcount=True).execute(stmt).rowcount)


def _among(ident: Any, ids: list[int]) -> Any:
    """``ident IN ids`` with the ids as one parameter, a JSON array (SQLite): SQLAlchemy renders an expanding IN
    one bound parameter per id, which cost more than the insert."""
    listed = sa.select(sa.column("value", sa.BigInteger)).select_from(
        sa.func.json_each(sa.bindparam("ids", json.dumps(ids), type_=sa.String))
    )
    return ident.in_(listed)


_WRITERS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_WRITERS_LOCK = threading.Lock()


@contextmanager
def _one_writer(engine: Engine) -> Iterator[None]:
    """SQLite: this process's planning inserts take the database's write lock in turn, queued here. Two
    threads that met at SQLite's lock would each sleep in its busy handler (1, 2, 5 … 100 ms) instead."""
    with _WRITERS_LOCK:
        lock = _WRITERS.setdefault(engine, threading.Lock())
    with lock:
        yield


def _tune(conn: Connection, plan: Plan, *, joins: bool = True) -> None:
    """PostgreSQL, for this transaction: no JIT (compiling the expressions cost ~0.3 s per statement, more
    than it saved), plans for every row of a cursor, and the join that suits the plan whatever the ledger's
    statistics say."""
    if conn.dialect.name != "postgresql":
        return
    conn.exec_driver_sql("SET LOCAL jit = off")
    if not joins:
        return
    # a streamed read (preview) is a cursor, which PostgreSQL plans for its first 10 % by default; every row is read
    conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
    # The ledger grows while a pass goes on (this pass's inserts, another campaign's), and on a first
    # pass its statistics say it is empty: a nested loop that scans it per candidate would read every new
    # row again and again. So: index probes (``probe``), or one hash of it, never a scan per candidate.
    if plan.probe:
        for setting in ("enable_hashjoin", "enable_mergejoin", "enable_seqscan"):
            conn.exec_driver_sql(f"SET LOCAL {setting} = off")
    else:
        conn.exec_driver_sql("SET LOCAL enable_nestloop = off")
        if plan.probes_ledger_last:
            conn.exec_driver_sql("SET LOCAL enable_seqscan = off")


def analyze_ledger(engine: Engine) -> None:
    """Refresh PostgreSQL's statistics on the ledger after a large insert, so the next pass's anti-join
    is planned for its real size (autovacuum would get there, later)."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE message")


def stream(engine: Engine, plan: Plan, domain: str, *, limit: int) -> Iterator[list[PlannedMessage]]:
    """The plan's rows as ``PlannedMessage`` values, ``limit`` candidates per keyset batch; writes nothing."""
    dialect = engine.dialect.name
    columns = _columns(plan, dialect, domain, message_id=True)
    wanted = ("dedupe_key", "step", "customer_id", "email", "status", "skip_reason", "message_id", "payload")
    keys = [f"_k{i}" for i in range(len(plan.order))]
    cursor: Sequence[Any] | None = None
    while True:
        query = (
            sa.select(
                *(columns[n].label(n) for n in wanted), *(c.label(k) for c, k in zip(plan.order, keys, strict=True))
            )
            .select_from(plan.from_)
            .where(*_new(plan), *_after(plan.order, cursor))
            .order_by(*plan.order)
            .limit(limit)
        )
        with db.reading(engine) as conn:
            _tune(conn, plan, joins=False)  # keyset batches of ``limit``: the planner's choice suits them
            rows = conn.execute(query).all()
        if not rows:
            return
        cursor = tuple(getattr(rows[-1], k) for k in keys)
        yield [
            PlannedMessage(
                dedupe_key=r.dedupe_key,
                campaign=plan.campaign,
                step=r.step,
                customer_id=r.customer_id,
                email=r.email,
                due_at=plan.due_at,
                expires_at=plan.expires_at,
                message_id=r.message_id,
                priority=plan.priority,
                payload=json.loads(r.payload),
                held_out=r.skip_reason == SkipReason.HELD_OUT.value,
            )
            for r in rows
        ]
        if len(rows) < limit:
            return

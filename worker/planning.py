"""Planning every campaign: stream candidates in keyset batches, apply the pure rules, hold some out.

Theory of operation
-------------------
``plan_batches(store, settings, campaign, now)`` yields lists of
``PlannedMessage`` for one campaign, one keyset batch of candidates at a time
(never the whole audience in memory). The SQL narrows (``adapters.audience_sql``),
the pure rules decide (``core.campaigns``), and ``core.policy.in_holdout``
marks the campaign's holdout share: those rows are stored as skipped
(``held_out``) so the campaign's lift can be measured later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, time, timedelta

from worker import money
from worker.adapters import audience_sql
from worker.adapters.store import Store
from worker.config import Settings
from worker.core import campaigns as cc
from worker.core.audiences import WINBACK, key_part, winback_key
from worker.core.policy import CapWindow, ContactPolicy, QuietHours, in_holdout, priorities_from_order, zone_of
from worker.domain import PlannedMessage

ALL_CAMPAIGNS = cc.CAMPAIGNS


def contact_policy(settings: Settings) -> ContactPolicy:
    p = settings.policy
    start, end = (time.fromisoformat(p.quiet_hours_start), time.fromisoformat(p.quiet_hours_end))
    return ContactPolicy(
        caps=tuple(CapWindow(pair[0], pair[1]) for pair in p.frequency_caps),
        quiet=QuietHours(start, end) if start != end else None,
        default_zone=settings.shop.time_zone,
        priorities=priorities_from_order(p.priorities),
    )


def enabled(settings: Settings) -> list[str]:
    """Enabled campaigns, highest priority first."""
    order = {name: i for i, name in enumerate(settings.policy.priorities)}
    names = [name for name in ALL_CAMPAIGNS if getattr(settings.campaigns, name).enabled]
    return sorted(names, key=lambda n: order.get(n, len(order)))


def loyalty_milestones(settings: Settings) -> cc.Milestones:
    cfg = settings.campaigns.loyalty
    currency = settings.shop.currency
    return cc.Milestones(
        orders=cfg.order_milestones,
        spend_minor=tuple(money.to_minor(str(amount), currency) for amount in cfg.spend_milestones),
        within_days=cfg.within_days,
    )


def plan_batches(store: Store, settings: Settings, campaign: str, now: datetime) -> Iterator[list[PlannedMessage]]:
    """The campaign's planned messages at ``now``, one keyset batch at a time (nothing written)."""
    planners = {
        WINBACK: _winback,
        cc.BIRTHDAY: _birthday,
        cc.FEEDBACK: _feedback,
        cc.NEW_PRODUCTS: _new_products,
        cc.LOYALTY: _loyalty,
    }
    if campaign not in planners:
        raise ValueError(f"unknown campaign {campaign!r}")
    priority = contact_policy(settings).priority(campaign)
    share = getattr(settings.campaigns, campaign).holdout_share
    for batch in planners[campaign](store, settings, now, priority):
        if share > 0:
            batch = [_hold(m, share) for m in batch]
        if batch:
            yield batch


def _hold(m: PlannedMessage, share: float) -> PlannedMessage:
    # by customer, not by occasion: the customer's id is the second field of every dedupe key
    # except feedback's (the order's), which carries it in the payload
    customer = m.payload.get("customer") or m.dedupe_key.split(":")[1]
    if not in_holdout(customer, m.campaign, share):
        return m
    return dataclasses.replace(m, held_out=True)


PLAN_BATCH = 5000
"""Candidates per keyset query: large enough that per-query overhead vanishes, small enough to stay light."""


def _batch_size(settings: Settings) -> int:
    return max(PLAN_BATCH, settings.sending.batch_size)


def _winback(store: Store, settings: Settings, now: datetime, priority: int) -> Iterator[list[PlannedMessage]]:
    cfg = settings.campaigns.winback
    steps = cfg.effective_steps
    days = [s.days for s in steps]
    expires = now + timedelta(days=cfg.expires_after_days)
    for number, step in enumerate(steps, start=1):
        not_before, before = cc.winback_step_window(now, days, number)
        cursor: audience_sql.Cursor = None
        while rows := audience_sql.winback_rows(
            store.engine, step=number, before=before, not_before=not_before, cursor=cursor, limit=_batch_size(settings)
        ):
            assert rows[-1].order_at is not None
            cursor = (rows[-1].order_at, rows[-1].customer_id)
            yield [
                cc.planned(
                    r,
                    key=winback_key(r.customer_external_id, r.order_external_id, number),
                    campaign=WINBACK,
                    step=number,
                    now=now,
                    expires_at=expires,
                    domain=settings.shop.domain,
                    priority=priority,
                    payload={"first_order_id": str(r.order_id), "first_order": r.order_external_id,
                             "template": step.template, "days": str(step.days)},
                )
                for r in rows
            ]  # fmt: skip


def _birthday(store: Store, settings: Settings, now: datetime, priority: int) -> Iterator[list[PlannedMessage]]:
    cfg = settings.campaigns.birthday
    mmdd = cc.birthday_mmdd_candidates(now, cfg.days_before)
    after = 0
    while rows := audience_sql.birthday_rows(store.engine, mmdd=mmdd, after_id=after, limit=_batch_size(settings)):
        after = rows[-1].customer_id
        batch = []
        for r in rows:
            zone = zone_of(r.time_zone, settings.shop.time_zone)
            day = cc.birthday_due(r.birthday, cc.local_today(now, zone), cfg.days_before)
            if day is None:
                continue
            batch.append(cc.planned(
                r, key=cc.birthday_key(r.customer_external_id, day.year), campaign=cc.BIRTHDAY, now=now,
                expires_at=cc.birthday_expires(day, zone), domain=settings.shop.domain, priority=priority,
                payload={"birthday": day.isoformat()},
            ))  # fmt: skip
        yield _new_only(store, batch)


def _feedback(store: Store, settings: Settings, now: datetime, priority: int) -> Iterator[list[PlannedMessage]]:
    cfg = settings.campaigns.feedback
    after, not_after = cc.feedback_window(now, cfg.days_after, cfg.lookback_days)
    expires = now + timedelta(days=cfg.expires_after_days)
    cursor: audience_sql.Cursor = None
    while rows := audience_sql.feedback_rows(
        store.engine, after=after, not_after=not_after, cursor=cursor, limit=_batch_size(settings)
    ):
        assert rows[-1].order_at is not None
        cursor = (rows[-1].order_at, rows[-1].order_id)
        yield [
            cc.planned(
                r, key=cc.feedback_key(r.order_external_id), campaign=cc.FEEDBACK, now=now, expires_at=expires,
                domain=settings.shop.domain, priority=priority,
                payload={"order_id": str(r.order_id), "order": r.order_external_id,
                         "customer": key_part(r.customer_external_id)},
            )
            for r in rows
        ]  # fmt: skip


def _new_products(store: Store, settings: Settings, now: datetime, priority: int) -> Iterator[list[PlannedMessage]]:
    cfg = settings.campaigns.new_products
    launches = audience_sql.launches(store.engine, since=now - timedelta(days=cfg.within_days), until=now)
    if not launches:
        return
    latest = max(x.launched_at for x in launches)
    week = cc.iso_week(cc.local_today(now, zone_of(settings.shop.time_zone, "UTC")))
    expires = now + timedelta(days=cfg.expires_after_days)
    cursor: audience_sql.Cursor = None
    while rows := audience_sql.recent_buyer_rows(
        store.engine, since=now - timedelta(days=cfg.active_within_days), before=latest, week_key=week,
        cursor=cursor, limit=_batch_size(settings),
    ):  # fmt: skip
        assert rows[-1].last_order_at is not None
        cursor = (rows[-1].last_order_at, rows[-1].customer_id)
        yield [
            cc.planned(
                r, key=cc.new_products_key_for_week(r.customer_external_id, week), campaign=cc.NEW_PRODUCTS,
                now=now, expires_at=expires, domain=settings.shop.domain, priority=priority,
            )
            for r in rows
            if cc.new_since(r.last_order_at, launches, now, cfg.within_days)
        ]  # fmt: skip


def _loyalty(store: Store, settings: Settings, now: datetime, priority: int) -> Iterator[list[PlannedMessage]]:
    cfg = settings.campaigns.loyalty
    milestones = loyalty_milestones(settings)
    min_orders, min_spend = milestones.minimums()
    if min_orders is None and min_spend is None:
        return
    expires = now + timedelta(days=cfg.expires_after_days)
    cursor: audience_sql.Cursor = None
    while rows := audience_sql.recent_buyer_rows(
        store.engine, since=now - timedelta(days=cfg.within_days), min_orders=min_orders, min_spend_minor=min_spend,
        cursor=cursor, limit=_batch_size(settings),
    ):  # fmt: skip
        assert rows[-1].last_order_at is not None
        cursor = (rows[-1].last_order_at, rows[-1].customer_id)
        batch = [
            cc.planned(
                r, key=cc.loyalty_key(r.customer_external_id, label), campaign=cc.LOYALTY, now=now,
                expires_at=expires, domain=settings.shop.domain, priority=priority, payload={"milestone": label},
            )
            for r in rows
            for label in cc.loyalty_due(r.order_count, r.total_spent_minor, r.last_order_at, now, milestones)
        ]  # fmt: skip
        yield _new_only(store, batch)


def _new_only(store: Store, batch: list[PlannedMessage]) -> list[PlannedMessage]:
    """Drop messages whose dedupe key the ledger already has (keys SQL cannot compute)."""
    if not batch:
        return batch
    known = audience_sql.existing_keys(store.engine, (m.dedupe_key for m in batch))
    return [m for m in batch if m.dedupe_key not in known]

"""Planning every campaign: set-based SQL where the rule allows, row by row where it needs Python.

Theory of operation
-------------------
``plans(store, settings, campaign, now)`` turns a campaign into SQL ``Plan`` s
(``adapters.plan_sql``): win-back (every step in one statement), feedback, new
products and loyalty. ``plan_into_ledger`` inserts them with INSERT … SELECT,
leaving every dedupe key the ledger has alone (no candidate travels through Python), and
``plan_batches`` streams the very same SELECT as ``PlannedMessage`` values in
keyset batches for preview, which writes nothing. Birthday is planned row by
row (its day depends on each customer's time zone; a few thousand a day):
``audience_sql`` narrows, ``core.campaigns`` decides. Holdouts
(``core.policy.in_holdout``, by customer) are stored as skipped (``held_out``)
so a campaign's lift can be measured later.
"""

from __future__ import annotations

import dataclasses
import logging
import time as clock
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

from worker import log, money
from worker.adapters import audience_sql, db, plan_sql, shop
from worker.adapters.store import Store
from worker.config import Settings
from worker.core import campaigns as cc
from worker.core.audiences import WINBACK
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


def priorities(settings: Settings, campaigns: Iterable[str] = ALL_CAMPAIGNS) -> dict[str, int]:
    """Each of ``campaigns``' priority under ``policy.priorities`` (``ContactPolicy.priority``)."""
    policy = contact_policy(settings)
    return {name: policy.priority(name) for name in campaigns}


def held_priorities(settings: Settings) -> frozenset[int]:
    """The priorities of campaigns turned off that no enabled campaign shares: a claim skips them (their rows wait
    until the campaign is on again, or expire) instead of reading through the rows only to leave each one."""
    every, on = priorities(settings), enabled(settings)
    return frozenset({p for name, p in every.items() if name not in on} - {every[name] for name in on})


def loyalty_milestones(settings: Settings) -> cc.Milestones:
    cfg = settings.campaigns.loyalty
    currency = settings.shop.currency
    return cc.Milestones(
        orders=cfg.order_milestones,
        spend_minor=tuple(money.to_minor(str(amount), currency) for amount in cfg.spend_milestones),
        within_days=cfg.within_days,
        currency=currency,
    )


def plans(store: Store, settings: Settings, campaign: str, now: datetime) -> list[plan_sql.Plan] | None:
    """The campaign as set-based SQL plans (win-back: one per step), or None for a campaign planned row by
    row in Python (birthday: the day depends on each customer's time zone, and its audience is small)."""
    if campaign not in ALL_CAMPAIGNS:
        raise ValueError(f"unknown campaign {campaign!r}")
    if campaign == cc.BIRTHDAY:
        return None
    cfg = getattr(settings.campaigns, campaign)
    common = plan_sql.Common(
        dialect=store.dialect,
        now=now,
        expires_at=now + timedelta(days=cfg.expires_after_days),
        priority=contact_policy(settings).priority(campaign),
        holdout_share=cfg.holdout_share,
    )
    if campaign == WINBACK:
        steps = settings.campaigns.winback.effective_steps
        days = [s.days for s in steps]
        windows = [cc.winback_step_window(now, days, n)[1] for n in range(1, len(steps) + 1)]
        return [plan_sql.winback(common, steps=[(b, s.template, s.days) for b, s in zip(windows, steps, strict=True)],
                                 given_up_before=cc.winback_given_up_before(now, cfg.give_up_after_days))]
    if campaign == cc.FEEDBACK:
        after, not_after = cc.feedback_window(now, cfg.days_after, cfg.lookback_days)
        return [plan_sql.feedback(common, after=after, not_after=not_after)]
    if campaign == cc.NEW_PRODUCTS:
        launches = audience_sql.launches(store.engine, since=now - timedelta(days=cfg.within_days), until=now)
        if not launches:
            return []
        # new_since: a launch after the last order and within within_days exists iff the last order is before
        # the newest launch (every launch returned is within the window)
        week = cc.news_week(launches, zone_of(settings.shop.time_zone, "UTC"))
        latest = max(x.launched_at for x in launches)
        return [plan_sql.new_products(common, since=now - timedelta(days=cfg.active_within_days), before=latest,
                                      week=week)]  # fmt: skip
    milestones = loyalty_milestones(settings)
    # totals that count another currency (shop.currency changed since) cannot narrow the spend candidates down
    totals = not milestones.spend_minor or shop.spend_currency(store.engine) == milestones.currency
    return plan_sql.loyalty(common, since=now - timedelta(days=milestones.within_days), orders=milestones.orders,
                            spend_minor=milestones.spend_minor, currency=milestones.currency,
                            totals_in_currency=totals)  # fmt: skip


PLAN_THREADS = {"postgresql": 2, "sqlite": 2}
"""Campaigns planned at once, by database: two, on two backends or two SQLite connections. On SQLite the reads
run side by side and the inserts take the write lock in turn (1M customers: a pass that finds nothing new
2.8 → 1.4 s, a launch day 6.8 → 5.2 s, a first pass 14 → 10 s). That needs SQLite's memory statistics off
(``adapters.db.without_sqlite_memstatus``): with them on, every allocation took one process-wide mutex and two
threads were slower than one (a first pass 19.5 s instead of 15), so where they stay on SQLite plans one at a
time."""

HEAVIEST_FIRST = (cc.NEW_PRODUCTS, WINBACK, cc.LOYALTY, cc.FEEDBACK, cc.BIRTHDAY)
"""The order a pass starts campaigns in: those that visit every customer first, so the small ones fill in beside
them rather than leave one thread planning the largest alone at the end (a launch day on SQLite 5.2 → 4.2 s).
The order changes nothing planned: ``run`` sends only once the whole pass is planned, and priority is a column
of each row, which every claim orders by."""


@dataclass(frozen=True)
class Planned:
    """One campaign's part of a pass."""

    created: int
    seconds: float


def plan_campaigns(store: Store, settings: Settings, campaigns: Sequence[str], now: datetime, *,
                   threads: int | None = None) -> dict[str, Planned]:  # fmt: skip
    """Plan each campaign into the ledger at ``now``, ``threads`` at a time (default: ``PLAN_THREADS`` of the
    database); every campaign is planned even when another fails, and then the first failure is raised."""
    if threads is None:
        threads = PLAN_THREADS.get(store.dialect, 1)
        if store.dialect == "sqlite" and not db.without_sqlite_memstatus():
            threads = 1

    def one(campaign: str) -> Planned:
        started = clock.perf_counter()
        created = plan_into_ledger(store, settings, campaign, now)
        return Planned(created, clock.perf_counter() - started)

    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="kembali-plan") as pool:
        futures = {c: pool.submit(one, c) for c in sorted(campaigns, key=lambda c: rank.get(c, len(rank)))}
    for campaign in campaigns:
        error = futures[campaign].exception()
        if error is not None:
            raise error
    return {campaign: futures[campaign].result() for campaign in campaigns}


def plan_batches(store: Store, settings: Settings, campaign: str, now: datetime) -> Iterator[list[PlannedMessage]]:
    """The campaign's planned messages at ``now``, one keyset batch at a time (nothing written)."""
    sql = plans(store, settings, campaign, now)
    if sql is not None:
        for plan in sql:
            yield from plan_sql.stream(store.engine, plan, settings.shop.domain, limit=_batch_size(settings))
        return
    priority = contact_policy(settings).priority(campaign)
    share = getattr(settings.campaigns, campaign).holdout_share
    for batch in _birthday(store, settings, now, priority):
        if share > 0:
            batch = [_hold(m, share) for m in batch]
        if batch:
            yield batch


def plan_into_ledger(store: Store, settings: Settings, campaign: str, now: datetime) -> int:
    """Plan the campaign at ``now`` into the ledger, once per dedupe key; returns the rows created.
    Set-based where the campaign has SQL plans: no candidate travels through Python."""
    if campaign == cc.LOYALTY and settings.campaigns.loyalty.spend_milestones:
        settle_spend_totals(store, settings.shop.currency)
    sql = plans(store, settings, campaign, now)
    if sql is None:
        return sum(store.insert_messages(batch, now) for batch in plan_batches(store, settings, campaign, now))
    created = sum(plan_sql.insert(store.engine, plan, settings.shop.domain) for plan in sql)
    if created >= ANALYZE_AFTER:
        plan_sql.analyze_ledger(store.engine)
    return created


def settle_spend_totals(store: Store, currency: str) -> shop.SpendRecount | None:
    """Have the customers' spend totals count ``currency`` (``shop.settle_spend_currency``), logging it when they
    were counted again: once after ``shop.currency`` changed, or on a database from before migration 0015."""
    recount = shop.settle_spend_currency(store.engine, currency, datetime.now(UTC))
    if recount is not None and (recount.was is not None or recount.changed):
        log.event(
            "spend_totals_counted_again", logging.WARNING if recount.was is not None else logging.INFO,
            currency=currency, was=recount.was or "not recorded", customers_changed=recount.changed,
            why=f"shop.currency is {currency}: loyalty's spend milestones count orders in it",
        )  # fmt: skip
    if recount is not None:
        for customer in recount.named:
            log.event(
                "spend_total_too_large", logging.WARNING, customer=customer, currency=currency,
                why=f"their orders in {currency} add up to the most a spend total holds or more (stored by an "
                    "import before it checked every currency): counted as that much",
            )  # fmt: skip
        if recount.too_large > len(recount.named):
            log.event("spend_total_too_large", logging.WARNING, customer=None, currency=currency,
                      more=recount.too_large - len(recount.named))  # fmt: skip
    return recount


ANALYZE_AFTER = 10_000
"""Rows created by one campaign's pass after which PostgreSQL's ledger statistics are refreshed."""


def _hold(m: PlannedMessage, share: float) -> PlannedMessage:
    # by customer, not by occasion: every birthday of a held-out customer is held out
    if not in_holdout(m.customer_id, m.campaign, share):
        return m
    return dataclasses.replace(m, held_out=True)


PLAN_BATCH = 5000
"""Candidates per keyset query: large enough that per-query overhead vanishes, small enough to stay light."""


def _batch_size(settings: Settings) -> int:
    return max(PLAN_BATCH, settings.sending.batch_size)


def _birthday(store: Store, settings: Settings, now: datetime, priority: int) -> Iterator[list[PlannedMessage]]:
    cfg = settings.campaigns.birthday
    for day in cc.birthday_mmdd_candidates(now, cfg.days_before):
        yield from _birthday_on(store, settings, now, priority, day)


def _birthday_on(store: Store, settings: Settings, now: datetime, priority: int,
                 mmdd: int) -> Iterator[list[PlannedMessage]]:  # fmt: skip
    """The customers born on one month and day, in id order, a keyset batch at a time."""
    cfg = settings.campaigns.birthday
    after = 0
    while rows := audience_sql.birthday_rows(store.engine, mmdd=mmdd, after_id=after, limit=_batch_size(settings)):
        after = rows[-1].customer_id
        plans = []
        for r in rows:
            zone = zone_of(r.time_zone, settings.shop.time_zone)
            plan = cc.birthday_plan(r.birthday, now, zone, cfg.days_before)
            if plan is not None:
                plans.append((r, zone, *plan))
        # one offer a year; a customer whose offer was skipped for a birthday corrected since gets one on the day
        keys = [key for r, _, day, _ in plans for key in cc.birthday_keys(r.customer_external_id, day)]
        known = audience_sql.birthday_keys_known(store.engine, keys)
        batch = []
        for r, zone, day, due_at in plans:
            key = cc.birthday_key_to_plan(r.customer_external_id, day, known)
            if key is not None:
                batch.append(cc.planned(
                    r, key=key, campaign=cc.BIRTHDAY, now=now, expires_at=cc.birthday_expires(day, zone),
                    domain=settings.shop.domain, priority=priority, payload={"birthday": day.isoformat()},
                    due_at=due_at,
                ))  # fmt: skip
        yield batch

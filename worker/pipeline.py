"""Plan and compose: the stages before sending, shared by `run` and `preview`.

Theory of operation
-------------------
* ``plan(now)`` streams each enabled campaign's candidates from the store in
  keyset batches, turns each into a ``PlannedMessage`` with the pure rules of
  ``core.audiences`` and inserts the batch (ON CONFLICT DO NOTHING): planning
  twice, or in two processes at once, creates each row once.
* ``Composer.compose`` takes one claimed message and the facts read right
  before sending: re-check (expired? suppressed? consent? ordered since?), then
  render (a template error fails this message only), then the MIME bytes.
* ``preview(now)`` is the same two stages with no writes and no sends: it plans
  without inserting, adds the rows already due in the ledger, and composes each.
  So what preview shows at T is what ``run --once`` at T would send.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from worker import planning
from worker.adapters.store import Store
from worker.config import Settings
from worker.core import audiences, tokens
from worker.core.recommend import recommend
from worker.core.render import ShopInfo, TemplateRenderer, build_context, build_message, product_dict
from worker.domain import (
    ClaimedMessage,
    CustomerSnapshot,
    PlannedMessage,
    ProductView,
    RenderedEmail,
    SendTimeFacts,
    SkipReason,
)
from worker.errors import TemplateError


def enabled_campaigns(settings: Settings) -> list[str]:
    """Enabled campaigns, highest priority first."""
    return planning.enabled(settings)


# --- planning ----------------------------------------------------------------


def plan_batches(store: Store, settings: Settings, campaign: str, now: datetime) -> Iterator[list[PlannedMessage]]:
    """The campaign's planned messages at ``now``, one keyset batch at a time (nothing written)."""
    return planning.plan_batches(store, settings, campaign, now)


@dataclass
class PlanReport:
    considered: dict[str, int] = field(default_factory=dict)
    created: dict[str, int] = field(default_factory=dict)


def plan(store: Store, settings: Settings, now: datetime, campaigns: Sequence[str] | None = None) -> PlanReport:
    report = PlanReport()
    for campaign in campaigns or enabled_campaigns(settings):
        report.considered[campaign] = report.created[campaign] = 0
        for batch in plan_batches(store, settings, campaign, now):
            report.considered[campaign] += len(batch)
            report.created[campaign] += store.insert_messages(batch, now)
    return report


# --- composing ---------------------------------------------------------------


@dataclass(frozen=True)
class BatchFacts:
    """What composing a batch needs from the store, read in one go right before sending."""

    customers: dict[int, SendTimeFacts]
    order_products: dict[int, list[ProductView]]
    catalogue: list[ProductView]


def load_batch_facts(store: Store, messages: Sequence[ClaimedMessage], catalogue: list[ProductView]) -> BatchFacts:
    order_ids = [int(m.payload["first_order_id"]) for m in messages if "first_order_id" in m.payload]
    return BatchFacts(
        customers=store.send_time_facts(m.customer_id for m in messages),
        order_products=store.order_products(order_ids),
        catalogue=catalogue,
    )


def load_catalogue(store: Store) -> list[ProductView]:
    return [product for product, _units in store.catalogue()]


@dataclass(frozen=True)
class Composed:
    message: ClaimedMessage
    rendered: RenderedEmail
    data: bytes
    customer: CustomerSnapshot


@dataclass(frozen=True)
class Skipped:
    message: ClaimedMessage
    reason: SkipReason


@dataclass(frozen=True)
class RenderFailed:
    message: ClaimedMessage
    error: TemplateError


class Composer:
    def __init__(self, settings: Settings, renderer: TemplateRenderer, link_key: bytes) -> None:
        self.settings = settings
        self.renderer = renderer
        self.link_key = link_key
        self.shop = ShopInfo.from_settings(settings.shop)

    def unsubscribe_url(self, customer: CustomerSnapshot) -> str:
        token = tokens.sign("u", str(customer.id), self.link_key)
        base = self.settings.unsubscribe.url
        return f"{base}{'&' if '?' in base else '?'}t={token}"

    def extra_context(self, message: ClaimedMessage, facts: BatchFacts) -> dict[str, object]:
        cfg = self.settings.campaigns.winback
        bought = facts.order_products.get(int(message.payload.get("first_order_id", 0)), [])
        picks = recommend(bought, facts.catalogue, cfg.recommendations)
        return {
            "bought": [product_dict(p) for p in bought],
            "recommendations": [product_dict(p) for p in picks],
            "coupon_code": cfg.coupon_code,
            "coupon_percent": cfg.coupon_percent,
        }

    def compose(self, message: ClaimedMessage, facts: BatchFacts, now: datetime) -> Composed | Skipped | RenderFailed:
        customer_facts = facts.customers[message.customer_id]
        reason = audiences.recheck(message, customer_facts, now)
        if reason is not None:
            return Skipped(message, reason)
        customer = customer_facts.customer
        assert customer is not None  # recheck skips CUSTOMER_GONE
        unsubscribe = self.unsubscribe_url(customer)
        try:
            context = build_context(
                message.campaign,
                customer,
                shop=self.shop,
                unsubscribe_url=unsubscribe,
                extra=self.extra_context(message, facts),
            )
            rendered = self.renderer.render(message.campaign, customer.locale, context)
        except TemplateError as exc:
            return RenderFailed(message, exc)
        try:
            data = build_message(
                rendered,
                to_name=customer.name,
                to_address=message.email,
                shop=self.shop,
                message_id=message.message_id,
                date=now,
                list_unsubscribe_https=unsubscribe,
                list_unsubscribe_mailto=self.settings.unsubscribe.mailto,
                extra_headers=(("X-Kembali-Campaign", message.campaign),),
            )
        except ValueError as exc:  # an address or header that cannot be written safely
            return RenderFailed(message, TemplateError(f"cannot build the message: {exc}"))
        return Composed(message, rendered, data, customer)


# --- preview -----------------------------------------------------------------


def as_claimed(m: PlannedMessage) -> ClaimedMessage:
    """A planned (not yet stored) message, seen as the sender would see it."""
    return ClaimedMessage(
        id=0,
        dedupe_key=m.dedupe_key,
        campaign=m.campaign,
        step=m.step,
        customer_id=m.customer_id,
        email=m.email,
        message_id=m.message_id,
        attempts=0,
        due_at=m.due_at,
        expires_at=m.expires_at,
        payload=m.payload,
    )


def preview(
    store: Store,
    settings: Settings,
    composer: Composer,
    now: datetime,
    *,
    campaigns: Sequence[str] | None = None,
    customer_external_id: str | None = None,
    limit: int | None = None,
) -> Iterator[Composed | Skipped | RenderFailed]:
    """What ``run --once`` at ``now`` would do, message by message; writes and sends nothing."""
    catalogue = load_catalogue(store)
    wanted = list(campaigns or enabled_campaigns(settings))

    def batches() -> Iterator[list[ClaimedMessage]]:
        yield from (b for b in store.due_messages(now=now, campaigns=wanted) if b)
        for campaign in wanted:
            for batch in plan_batches(store, settings, campaign, now):
                yield [as_claimed(m) for m in batch]

    shown = 0
    for batch in batches():
        facts = load_batch_facts(store, batch, catalogue)
        for message in batch:
            if customer_external_id is not None:
                snapshot = facts.customers[message.customer_id].customer
                if snapshot is None or snapshot.external_id != customer_external_id:
                    continue
            yield composer.compose(message, facts, now)
            shown += 1
            if limit is not None and shown >= limit:
                return

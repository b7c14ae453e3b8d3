"""Each campaign's template variables (beyond the ones every template gets), as plain data.

See templates/email/README.md for what each campaign's templates receive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from worker.config import Settings
from worker.core import campaigns as cc
from worker.core.audiences import WINBACK
from worker.core.policy import zone_of
from worker.core.recommend import recommend
from worker.core.render import clean_text, product_dict
from worker.domain import ClaimedMessage, CustomerSnapshot, ProductView, SendTimeFacts

BIRTHDAY_SUGGESTIONS = 3
"""The products a birthday offer suggests (its templates show three)."""


@dataclass(frozen=True)
class CampaignFacts:
    """What the campaigns' templates need from the store, read once per batch."""

    order_products: Mapping[int, list[ProductView]]
    catalogue: Sequence[ProductView]
    customer_products: Mapping[int, list[ProductView]] = field(default_factory=dict)
    launches: Sequence[cc.Launch] = ()


def campaign_of(settings: Settings, name: str) -> str:
    """A campaign, or the campaign a template folder belongs to (``winback-last`` → ``winback`` when a
    ``[[campaigns.winback.steps]]`` names it), so `kembali check` can render every folder with the right variables.
    Any other folder is its own name, no campaign's: ``winback-last-old``, an operator's backup, is not win-back's
    for its name (``checks.unused_folders``)."""
    if name in cc.CAMPAIGNS:
        return name
    if name in step_folders(settings):
        return WINBACK
    return name


def step_folders(settings: Settings) -> set[str]:
    """The template folders win-back's steps send from (``winback`` alone without ``[[campaigns.winback.steps]]``)."""
    return {step.template for step in settings.campaigns.winback.effective_steps}


def sent_as(settings: Settings, folder: str) -> tuple[str, int]:
    """The campaign and step number a template folder's messages go out as: a win-back step's folder is
    win-back's, with that step's number (and so its coupon), so that `kembali check`, the live preview and
    `kembali send-test` render it as its customers get it; any other folder is its campaign's, step 1."""
    campaign = campaign_of(settings, folder)
    if campaign == WINBACK:
        for number, step in enumerate(settings.campaigns.winback.effective_steps, start=1):
            if step.template == folder:
                return WINBACK, number
    return campaign, 1


def template_for(message: ClaimedMessage) -> str:
    """The template folder: the win-back step's own (fixed at planning), else the campaign's."""
    return message.payload.get("template", message.campaign)


def extra_context(
    settings: Settings,
    message: ClaimedMessage,
    customer: SendTimeFacts,
    facts: CampaignFacts,
    *,
    link_key: bytes,
    now: datetime,
) -> dict[str, object]:
    c = settings.campaigns
    shop_url = settings.shop.base_url
    campaign = campaign_of(settings, message.campaign)
    if campaign == WINBACK:
        steps = c.winback.effective_steps
        # the step of the row's day count: a row planned before a step was inserted or removed before it has
        # another number now (its template is its own, in the payload); by number when no step has its days
        days = message.payload_id("days")
        step = next((s for s in steps if s.days == days), steps[min(message.step, len(steps)) - 1])
        bought = facts.order_products.get(message.payload_id("first_order_id") or 0, [])
        picks = recommend(bought, facts.catalogue, c.winback.recommendations)
        return {
            "bought": [product_dict(p, shop_url) for p in bought],
            "recommendations": [product_dict(p, shop_url) for p in picks],
            "coupon_code": step.coupon_code,
            "coupon_percent": step.coupon_percent,
            "step": message.step,
        }
    if campaign == cc.BIRTHDAY:
        birthday = message.payload.get("birthday", "")
        return {
            "birthday": birthday,
            "days_to_birthday": _days_to(birthday, customer, settings, now),
            "coupon_code": c.birthday.coupon_code,
            "coupon_percent": c.birthday.coupon_percent,
            # best sellers they do not have, from the categories they bought from first
            "recommendations": [product_dict(p, shop_url) for p in recommend(
                facts.customer_products.get(message.customer_id, []), facts.catalogue, BIRTHDAY_SUGGESTIONS)],
        }
    if campaign == cc.FEEDBACK:
        order_id = message.payload_id("order_id") or 0
        return {
            "order": {"id": clean_text(message.payload.get("order", ""))},
            "bought": [product_dict(p, shop_url) for p in facts.order_products.get(order_id, [])],
            "scale": c.feedback.scale,
            "ratings": cc.rating_links(order_id, c.feedback.scale, c.feedback.link_url, link_key,
                                      settings.shop.domain),
        }
    if campaign == cc.NEW_PRODUCTS:
        cfg = c.new_products
        bought = facts.customer_products.get(message.customer_id, [])
        new = cc.new_since(customer.last_order_at, facts.launches, now, cfg.within_days)
        picks = cc.pick_new_products(new, bought, facts.catalogue, cfg.max_products)
        in_their_categories = bool(cc.new_in_their_categories(new, bought))
        return {
            "products": [product_dict(p, shop_url) for p in picks],
            # the picks are new ones from their categories exactly when some are (else best sellers, which need not
            # be new, or, for one who owns every best seller, the news of other categories: ``news``)
            "new": in_their_categories,
            "news": not in_their_categories and bool(picks) and all(
                p.external_id in {x.product.external_id for x in new} for p in picks),
        }
    if campaign == cc.LOYALTY:
        kind, amount = cc.milestone_of(message.payload) or ("orders", 0)
        return {
            "milestone_kind": kind,
            "milestone": amount,
            # what the customer has ordered by now: an import that brings several orders at once, or an order
            # placed since planning, takes it past the milestone (a 6th order reaching the 5th order milestone)
            "order_count": customer.order_count if customer.paid_order_count is None else customer.paid_order_count,
            "coupon_code": c.loyalty.coupon_code,
            "coupon_percent": c.loyalty.coupon_percent,
        }
    raise ValueError(f"unknown campaign {message.campaign!r}")


def _days_to(birthday: str, customer: SendTimeFacts, settings: Settings, now: datetime) -> int:
    """Whole days from the customer's today (in their time zone) to ``birthday`` (ISO), 0 on the day: an offer
    sent ``days_before`` it says when the day is, where it wished a happy birthday three days early."""
    day = cc.iso_day(birthday)
    if day is None:  # none planned (or one edited by hand): the copy for the day itself
        return 0
    zone = customer.customer.time_zone if customer.customer is not None else ""
    return max(0, (day - cc.local_today(now, zone_of(zone, settings.shop.time_zone))).days)


def birthday_to_show(settings: Settings, customer: CustomerSnapshot, now: datetime) -> str:
    """The birthday (ISO) a rendering outside planning celebrates (`kembali send-test`, `check`, the live preview):
    the customer's next one, from their today, when they have one; else the day an offer sent now would be for
    (``days_before`` ahead), so the copy reads as the campaign's customers get it."""
    today = cc.local_today(now, zone_of(customer.time_zone, settings.shop.time_zone))
    next_one = cc.birthday_due(customer.birthday, today, 366)  # (a year and a day: 29 February's next is 366 away)
    return (next_one or today + timedelta(days=settings.campaigns.birthday.days_before)).isoformat()

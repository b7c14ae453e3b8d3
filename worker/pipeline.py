"""Plan and compose: the stages before sending, shared by `run` and `preview`.

Theory of operation
-------------------
* ``plan(now)`` inserts each enabled campaign's new ledger rows with one
  ``INSERT … SELECT`` per plan (PostgreSQL; loyalty has two) or per 20,000 rows (SQLite), the rules,
  dedupe keys and holdouts computed in SQL (``adapters.plan_sql``; the Message-ID is given at a row's
  first claim); birthday is planned row by row (time zones).
  Planning twice, or in two processes at once, creates each row once.
* ``Composer.compose`` takes one claimed message and the facts read when its
  batch is prepared: re-check (expired? suppressed? consent? ordered since? is the campaign's rule still
  met: the birthday, the order to rate, the milestone, the news?; the ``sending`` mark checks suppression,
  consent and win-back's "ordered since" once more, see ``worker.sending``), then
  render (a template error fails this message only), then the MIME bytes.
* ``preview(now)`` is the same two stages with no writes and no sends: it plans
  without inserting, adds the rows already due in the ledger, and composes each.
  So what preview shows at T is what ``run --once`` at T would send.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta

from worker import contexts, log, planning
from worker.adapters import audience_sql
from worker.adapters.importer import ascii_address
from worker.adapters.store import Store, suppression_address
from worker.config import Settings
from worker.contact import Arbiter, judge
from worker.core import audiences, tokens
from worker.core import campaigns as cc
from worker.core.campaigns import Launch
from worker.core.limits import quota_day, quota_day_end
from worker.core.policy import Decision, DeferUntil, Skip, deferred, in_holdout, zone_of
from worker.core.render import ShopInfo, TemplateRenderer, build_context, build_message
from worker.domain import (
    ClaimedMessage,
    CustomerSnapshot,
    PlannedMessage,
    ProductView,
    RenderedEmail,
    SendTimeFacts,
    SkipReason,
    mailbox,
)
from worker.errors import LedgerRowError, TemplateError
from worker.scheduler import next_fire_time


def enabled_campaigns(settings: Settings) -> list[str]:
    """Enabled campaigns, highest priority first."""
    return planning.enabled(settings)


def held_priorities(settings: Settings) -> frozenset[int]:
    """Priorities whose waiting rows belong only to campaigns turned off (``planning.held_priorities``)."""
    return planning.held_priorities(settings)


# --- planning ----------------------------------------------------------------


def plan_batches(store: Store, settings: Settings, campaign: str, now: datetime) -> Iterator[list[PlannedMessage]]:
    """The campaign's planned messages at ``now``, one keyset batch at a time (nothing written)."""
    return planning.plan_batches(store, settings, campaign, now)


@dataclass
class PlanReport:
    considered: dict[str, int] = field(default_factory=dict)
    created: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    """Each campaign's own time (two campaigns are planned at a time, ``planning.PLAN_THREADS``)."""


def plan(store: Store, settings: Settings, now: datetime, campaigns: Sequence[str] | None = None) -> PlanReport:
    report = PlanReport()
    done = planning.plan_campaigns(store, settings, list(campaigns or enabled_campaigns(settings)), now)
    for campaign, part in done.items():
        # set-based (INSERT … SELECT) where the campaign allows: the rows planned are the rows created
        report.considered[campaign] = report.created[campaign] = part.created
        report.seconds[campaign] = part.seconds
    return report


# --- composing ---------------------------------------------------------------


@dataclass(frozen=True)
class BatchFacts:
    """What composing a batch needs from the store, read in one go right before sending."""

    customers: dict[int, SendTimeFacts]
    order_products: dict[int, list[ProductView]]
    catalogue: list[ProductView]
    sent: dict[str, list[datetime]] = field(default_factory=dict)
    """When each mailbox (``domain.mailbox``) was actually sent email, within the longest cap window."""
    customer_products: dict[int, list[ProductView]] = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)
    rateable: Mapping[int, datetime] = field(default_factory=dict)
    """The feedback messages' orders that can still be rated (not cancelled or refunded since, nor given to another
    customer than the message's), each with when it
    settled (delivered, else placed) as the shop's data says now."""
    news_sent: dict[str, list[datetime]] = field(default_factory=dict)
    """When each new-products message's mailbox was sent new-products news, within ``cc.NEWS_SPACING``."""
    birthdays_ahead: dict[str, list[tuple[datetime, datetime]]] = field(default_factory=dict)
    """When the birthday offers to come for these mailboxes fall due and expire: those planned ahead of their window
    (within ``cc.BIRTHDAY_LEAD``) and those no pass has planned yet (``_birthdays_to_come``). A message of lower
    priority waits rather than leave one no slot before it expires (``policy.waits_for``)."""
    suppressed: frozenset[str] = frozenset()
    """The messages' own addresses (as ``suppression_address`` gives them) that are on the suppression list: a
    message goes to the address it was planned to, which is not the customer's any more if an import changed it."""


def load_batch_facts(
    store: Store,
    messages: Sequence[ClaimedMessage],
    catalogue: list[ProductView],
    *,
    settings: Settings | None = None,
    now: datetime | None = None,
    planned_birthdays: Mapping[str, tuple[str, datetime, datetime] | None] | None = None,
) -> BatchFacts:
    """``planned_birthdays``: the birthday offers a preview planned, which ``run`` would have inserted into the
    ledger before its claims (dedupe key → mailbox, due, expires; None: stored skipped, held out): none is one
    to come (``_birthdays_to_come``), and those planned ahead of their window are due ahead (``due_ahead``)."""
    order_ids = [i for m in messages for k in ("first_order_id", "order_id") if (i := m.payload_id(k)) is not None]
    customer_ids = [m.customer_id for m in messages]
    sent: dict[str, list[datetime]] = {}
    products: dict[int, list[ProductView]] = {}
    launches: list[Launch] = []
    news_sent: dict[str, list[datetime]] = {}
    ahead: dict[str, list[tuple[datetime, datetime]]] = {}
    customers = store.send_time_facts(customer_ids)
    if settings is not None and now is not None:
        policy = planning.contact_policy(settings)
        sent = store.sent_times([m.email for m in messages], since=now - policy.lookback)
        below = [m for m in messages if policy.priority(m.campaign) < policy.priority(cc.BIRTHDAY)]
        if below and settings.campaigns.birthday.enabled:
            ahead = store.due_ahead([m.email for m in below], campaign=cc.BIRTHDAY,
                                    priority=policy.priority(cc.BIRTHDAY), after=now,
                                    until=now + cc.BIRTHDAY_LEAD)  # fmt: skip
            boxes = {mailbox(m.email) for m in below}
            planned = planned_birthdays or {}
            for box, due, expires in filter(None, planned.values()):
                if box in boxes and now < due <= now + cc.BIRTHDAY_LEAD:
                    ahead.setdefault(box, []).append((due, expires))
            coming = _birthdays_to_come(store, settings, below, now, policy.lookback, known=planned)
            for box, to_come in coming.items():
                ahead.setdefault(box, []).extend(to_come)
        news = [m for m in messages if m.campaign == cc.NEW_PRODUCTS]
        if news:
            news_sent = store.sent_times([m.email for m in news], since=now - cc.NEWS_SPACING,
                                         campaign=cc.NEW_PRODUCTS)  # fmt: skip
            within = timedelta(days=settings.campaigns.new_products.within_days)
            launches = audience_sql.launches(store.engine, since=now - within, until=now)
    # what each has bought: the news picks from it, and a birthday offer suggests what they do not have yet (send-test,
    # with no settings, as well: its test reads as the customer's email would)
    wanting = [m.customer_id for m in messages if m.campaign in (cc.NEW_PRODUCTS, cc.BIRTHDAY)]
    if wanting:
        products = audience_sql.customer_products(store.engine, wanting)
    rated = [(i, m.customer_id) for m in messages
             if m.campaign == cc.FEEDBACK and (i := m.payload_id("order_id")) is not None]  # fmt: skip
    rewarded = [m.customer_id for m in messages if m.campaign == cc.LOYALTY]
    if rewarded and settings is not None:  # a milestone counts the orders paid, not one placed and not paid yet
        totals = store.paid_totals(rewarded, settings.shop.currency)
        for customer_id in set(rewarded):
            count, spent = totals.get(customer_id, (0, 0))
            customers[customer_id] = replace(customers[customer_id], paid_order_count=count, paid_spent_minor=spent)
    return BatchFacts(
        customers=customers,
        order_products=store.order_products(order_ids),
        catalogue=catalogue,
        sent=sent,
        customer_products=products,
        launches=launches,
        rateable=store.rateable_among(rated) if rated else {},
        news_sent=news_sent,
        birthdays_ahead=ahead,
        suppressed=frozenset(store.suppressed_among(m.email for m in messages)),
    )


def _birthdays_to_come(
    store: Store, settings: Settings, messages: Sequence[ClaimedMessage], now: datetime, horizon: timedelta,
    known: Collection[str] = (),
) -> dict[str, list[tuple[datetime, datetime]]]:
    """For these messages' mailboxes, when the birthday offers that no pass has planned yet fall due and expire, for
    those a message sent now could take the slot of (their window opens within ``horizon``, the longest cap window,
    or is open): a daily pass plans a birthday offer only hours ahead of its window, or hours into it, and a message
    of lower priority sent meanwhile would leave it capped until it expired. One counts as due when its window
    opens, or, when the pass that plans it comes later (its window is open already, say), just after that pass
    (``cc.birthday_offer_due``): the message waits that long at once, not a little at a time. Only for
    customers the birthday campaign would plan (reachable, with a birthday, not held out of it) and whose offer for
    that birthday the ledger has no row of: any customer record with the message's mailbox, as the cap counts per
    mailbox (a shop's guest checkouts can give one person several records), not only the message's own. And only
    for offers a planning pass will plan before they expire (the daemon's ``schedule.plan_cron`` for birthday):
    with passes rarer than daily, a birthday that none falls near gets no offer, and nothing waits for it.
    ``known``: dedupe keys to count as in the ledger (those a preview planned, which ``run`` would have inserted)."""
    cfg = settings.campaigns.birthday
    cron = settings.schedule.cron_of(cc.BIRTHDAY)
    found: dict[tuple[str, date], tuple[str, datetime, datetime]] = {}
    for row in audience_sql.birthdays_of_mailboxes(store.engine, {mailbox(m.email) for m in messages}):
        if in_holdout(row.customer_id, cc.BIRTHDAY, cfg.holdout_share):
            continue  # its row would say held_out: no email to keep a slot for
        zone = zone_of(row.time_zone, settings.shop.time_zone)
        window = cc.birthday_to_come(row.birthday, now, zone, cfg.days_before, horizon)
        if window is not None:
            day, opens = window
            expires = cc.birthday_expires(day, zone)
            # a pass plans the offer from BIRTHDAY_LEAD before its window opens until it expires (cc.birthday_plan)
            planned_by = next_fire_time(cron, settings.shop.time_zone, max(now, opens - cc.BIRTHDAY_LEAD))
            if planned_by is None or planned_by >= expires:
                continue  # no planning pass falls there (schedule.plan_cron): no offer will come to keep a slot for
            at = cc.birthday_offer_due(opens, planned_by)  # (at or after expires: nothing waits, policy.waits_for)
            found[row.customer_external_id, day] = (mailbox(row.email), at, expires)
    if not found:
        return {}
    # planned (due_ahead sees it), sent, or skipped; or one for another day, which a pass plans again for this one
    in_ledger = audience_sql.birthday_keys_known(store.engine,
                                                 (k for c, day in found for k in cc.birthday_keys(c, day)))
    out: dict[str, list[tuple[datetime, datetime]]] = {}
    for (customer, day), (box, at, expires) in found.items():
        key = cc.birthday_key_to_plan(customer, day, in_ledger)
        if key is not None and key not in known:
            out.setdefault(box, []).append((at, expires))
    return out


def load_catalogue(store: Store, now: datetime) -> list[ProductView]:
    """The products emails may show at ``now`` (recommendations, best sellers), best sellers first."""
    return [product for product, _units in store.catalogue(now)]


@dataclass(frozen=True)
class Composed:
    message: ClaimedMessage
    rendered: RenderedEmail
    data: bytes
    customer: CustomerSnapshot
    sent: tuple[datetime, ...] = ()
    """When the message's mailbox was sent email, as the batch's facts read it from the ledger (what the
    dispatcher's arbiter decides with)."""
    birthdays_ahead: tuple[tuple[datetime, datetime], ...] = ()
    """When birthday offers to come for the mailbox fall due and expire (``BatchFacts.birthdays_ahead``): the arbiter
    holds this message back for them, counting what its run has sent too."""


@dataclass(frozen=True)
class Skipped:
    message: ClaimedMessage
    reason: SkipReason
    customer: str = ""
    """The customer's id in the shop (``C-0001``) for the log line; "" when the customer is gone."""


@dataclass(frozen=True)
class RenderFailed:
    message: ClaimedMessage
    error: TemplateError | LedgerRowError
    """``LedgerRowError``: the ledger row could not be read (``Composer.unreadable``), nothing was rendered."""
    customer: str = ""
    """The customer's id in the shop (``C-0001``), for the log line."""


@dataclass(frozen=True)
class Deferred:
    """The contact policy says "not yet": the row goes back to the queue until ``until``."""

    message: ClaimedMessage
    until: datetime
    why: str
    """``cap``, ``quiet_hours``, ``news_week`` (new-products news sent less than a week ago), ``after_delivery`` (a
    feedback request's order delivered later than planning knew: it waits ``days_after`` days from the delivery)
    or ``birthday`` (a birthday offer planned ahead for the mailbox would lose its slot); in preview also
    ``planned_ahead`` (``PLANNED_AHEAD``: planned due later, a birthday offer ahead of its window)."""
    time_zone: str = "UTC"
    """The customer's zone, in which ``until`` reads best (quiet hours end at 08:00 on their clock)."""
    customer: str = ""
    """The customer's id in the shop (``C-0001``), for the log line that says whose email waits."""


class LocaleWarnings:
    """Says once per customer (per run, or per daemon's dispatcher) that the language stored for them has no
    templates and their email is written in the shop's (``CustomerSnapshot.stored_locale``)."""

    def __init__(self) -> None:
        self._warned: set[int] = set()

    def note(self, customer: CustomerSnapshot) -> None:
        if customer.stored_locale is None or customer.id in self._warned:
            return
        self._warned.add(customer.id)
        log.event("customer_locale_unknown", logging.WARNING, customer=customer.external_id, customer_id=customer.id,
                  locale=customer.stored_locale, using=customer.locale.value)  # fmt: skip


class Composer:
    def __init__(self, settings: Settings, renderer: TemplateRenderer, link_key: bytes) -> None:
        self.settings = settings
        self.renderer = renderer
        self.link_key = link_key
        self.shop = ShopInfo.from_settings(settings.shop)
        self.policy = planning.contact_policy(settings)

    def unsubscribe_url(self, customer: CustomerSnapshot, message_id: str = "") -> str:
        """The link that unsubscribes the customer, and with ``message_id`` (the Message-ID of the email that
        carries it, fixed by its dedupe key: preview shows the link run --once sends) the address that email went
        to: the token names the Message-ID's part before the shop's domain (``links.UnsubscribeToken``)."""
        local = message_id.removeprefix("<").partition("@")[0]
        value = f"{customer.id}:{local}" if local else str(customer.id)
        token = tokens.sign("u", value, self.link_key, shop=tokens.shop_scope(self.settings.shop.domain))
        base = self.settings.unsubscribe.url
        return f"{base}{'&' if '?' in base else '?'}t={token}"

    def extra_context(
        self, message: ClaimedMessage, facts: BatchFacts, now: datetime | None = None
    ) -> dict[str, object]:
        """The campaign's template variables; ``now`` defaults to the message's due time."""
        campaign_facts = contexts.CampaignFacts(
            order_products=facts.order_products,
            catalogue=facts.catalogue,
            customer_products=facts.customer_products,
            launches=facts.launches,
        )
        return contexts.extra_context(
            self.settings, message, facts.customers[message.customer_id], campaign_facts,
            link_key=self.link_key, now=now or message.due_at,
        )  # fmt: skip

    def new_arbiter(self) -> Arbiter:
        """One per dispatch run or preview: it remembers what this run decided to send."""
        return Arbiter(self.policy)

    def compose(
        self, message: ClaimedMessage, facts: BatchFacts, now: datetime, arbiter: Arbiter | None = None
    ) -> Composed | Skipped | RenderFailed | Deferred:
        """Re-check, apply the contact policy, render. ``arbiter`` carries the run's earlier decisions
        (a fresh one judges this message against the ledger alone)."""
        if (unreadable := self.unreadable(message, facts)) is not None:
            return unreadable
        decision = self.decide(message, facts, now, arbiter)
        return decision if decision is not None else self.render_message(message, facts, now)

    @staticmethod
    def unreadable(message: ClaimedMessage, facts: BatchFacts) -> RenderFailed | None:
        """A message whose ledger row could not be read as Kembali writes it (``ClaimedMessage.unreadable``): it
        fails, naming its row and what to do, before anything judges it on a payload or times it does not have."""
        if not message.unreadable:
            return None
        found = facts.customers.get(message.customer_id)
        customer = found.customer.external_id if found is not None and found.customer is not None else ""
        whose = f"customer {customer}" if customer else f"customer row {message.customer_id}"
        error = LedgerRowError(
            f"ledger row {message.id} ({message.campaign}, {whose}) cannot be read: {message.unreadable} (edited by "
            f"hand?); correct it in the database and `kembali ledger resend {message.id}`, or `kembali ledger close "
            f"{message.id}`")
        return RenderFailed(message, error, customer)

    def decide(
        self, message: ClaimedMessage, facts: BatchFacts, now: datetime, arbiter: Arbiter | None = None
    ) -> Skipped | Deferred | None:
        """The first half of ``compose``: re-check and the contact policy; None means "send it now"."""
        customer_facts = facts.customers[message.customer_id]
        reason = audiences.recheck(message, customer_facts, now) or cc.still_due(
            message, customer_facts, now, rateable=facts.rateable, launches=facts.launches,
            within_days=self.settings.campaigns.new_products.within_days,
            winback_steps=[step.days for step in self.settings.campaigns.winback.effective_steps],
            give_up_after_days=self.settings.campaigns.winback.give_up_after_days,
            winback_templates=[step.template for step in self.settings.campaigns.winback.effective_steps],
        )  # fmt: skip
        if reason is None and suppression_address(message.email) in facts.suppressed:
            reason = SkipReason.SUPPRESSED  # the customer's address now is another: the one it goes to is suppressed
        customer = customer_facts.customer
        if reason is not None:
            return Skipped(message, reason, customer.external_id if customer is not None else "")  # "": gone
        assert customer is not None  # recheck skips CUSTOMER_GONE
        box = mailbox(message.email)
        news_at = cc.next_news_at(facts.news_sent.get(box, ()))
        sent = facts.sent.get(box, ())
        ahead = facts.birthdays_ahead.get(box, ())
        decision: Decision
        ready_at = self._feedback_ready_at(message, facts)
        if message.campaign == cc.NEW_PRODUCTS and news_at is not None and news_at > now:
            decision = deferred(news_at, message.expires_at, "news_week")
        elif ready_at is not None and ready_at > now:  # delivered later than planning knew
            decision = deferred(ready_at, message.expires_at, "after_delivery")
        elif arbiter is not None:  # with what this run decided to send, which the ledger cannot show yet
            decision = arbiter.decide(message, customer, sent, now, ahead=ahead)
        else:
            decision = judge(self.policy, message, customer, sent, now, ahead)  # the ledger alone
        if isinstance(decision, Skip):
            return Skipped(message, decision.reason, customer.external_id)
        if isinstance(decision, DeferUntil):
            return Deferred(message, decision.at, decision.why, customer.time_zone, customer.external_id)
        return None

    def _feedback_ready_at(self, message: ClaimedMessage, facts: BatchFacts) -> datetime | None:
        """A feedback request's earliest send time by its order as it is now (``cc.feedback_ready_at``)."""
        order_id = message.payload_id("order_id") if message.campaign == cc.FEEDBACK else None
        settled = facts.rateable.get(order_id) if order_id is not None else None
        return None if settled is None else cc.feedback_ready_at(settled, self.settings.campaigns.feedback.days_after)

    def prepare(
        self, message: ClaimedMessage, facts: BatchFacts, now: datetime
    ) -> Composed | Skipped | RenderFailed | Deferred:
        """Re-check and judge the message against the ledger alone, and render it if that says "send now".
        It keeps no state, so a helper process can do it (``worker.composing``); the dispatcher then
        decides each ``Composed`` again with what its run has sent meanwhile (``Composed.sent``)."""
        if (unreadable := self.unreadable(message, facts)) is not None:
            return unreadable
        decision = self.decide(message, facts, now)
        return decision if decision is not None else self.render_message(message, facts, now)

    def render_message(self, message: ClaimedMessage, facts: BatchFacts, now: datetime) -> Composed | RenderFailed:
        """The second half of ``compose``, for a message ``decide`` let through: render and build the
        MIME. It keeps no state, so a helper process can do it (``worker.composing``)."""
        customer = facts.customers[message.customer_id].customer
        assert customer is not None
        if not message.email.isascii():  # planned before imports stored domains in their IDNA form (0012)
            address = ascii_address(message.email)
            if not address.isascii():
                return RenderFailed(message, TemplateError(
                    f"cannot send to {message.email!r}: letters beyond ASCII before the @ need SMTPUTF8, which "
                    "Kembali does not use"), customer.external_id)  # fmt: skip
            message = replace(message, email=address)  # sent to, and written in To, as SMTP takes it
        unsubscribe = self.unsubscribe_url(customer, message.message_id)
        try:
            context = build_context(
                message.campaign,
                customer,
                shop=self.shop,
                unsubscribe_url=unsubscribe,
                extra=self.extra_context(message, facts, now),
            )
            rendered = self.renderer.render(contexts.template_for(message), customer.locale, context)
        except TemplateError as exc:
            return RenderFailed(message, exc, customer.external_id)
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
            return RenderFailed(message, TemplateError(f"cannot build the message: {exc}"), customer.external_id)
        box = mailbox(message.email)
        return Composed(message, rendered, data, customer, tuple(facts.sent.get(box, ())),
                        tuple(facts.birthdays_ahead.get(box, ())))  # fmt: skip


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
    quota_left: int | None = None,
) -> Iterator[Composed | Skipped | RenderFailed | Deferred]:
    """What ``run --once`` at ``now`` would do, message by message; writes and sends nothing.
    ``quota_left``: the slots ``sending.daily_quota`` has left today (None: no quota); the messages sent past them
    wait for the next day's, from the shop's midnight.
    Campaign by campaign in priority order (its rows already in the ledger, then its new ones); one
    arbiter sees them all, so a customer due three emails today is shown one send and two defers.

    ``campaigns`` and ``customer_external_id`` choose what is shown, not what is decided: a message of a campaign
    not shown that a claim would take first (a higher priority) still takes its mailbox's slot (it is judged, not
    rendered), as does one to the shown customer's mailbox from another customer record; and with a daily quota, every
    message sent before it takes one of its slots."""
    catalogue = load_catalogue(store, now)
    enabled = enabled_campaigns(settings)  # highest priority first, as a claim would take them
    shown_campaigns = set(campaigns or enabled)
    last = max((i for i, c in enumerate(enabled) if c in shown_campaigns), default=len(enabled) - 1)
    considered = [*enabled[: last + 1], *(c for c in shown_campaigns if c not in enabled)]
    one: tuple[int, str] | None = None
    """With ``customer_external_id``: that customer's row id and mailbox."""
    if customer_external_id is not None:
        found = store.customer_by_external_id(customer_external_id)
        one = (found[0].id, mailbox(found[0].email)) if found is not None else (0, "")
    arbiter = composer.new_arbiter()
    locales = LocaleWarnings()
    birthdays: dict[str, tuple[str, datetime, datetime] | None] = {}
    """The birthday offers planned here, which ``run`` inserts before it claims (``load_batch_facts``): one due now is
    judged as any, one ahead of its window (``cc.birthday_plan``) is due when it opens and claimed then, the messages
    of lower priority to its mailbox waiting for it (``due_ahead``)."""

    def batches() -> Iterator[list[tuple[ClaimedMessage, SkipReason | None]]]:
        for campaign in considered:
            for due in store.due_messages(now=now, campaigns=[campaign], domain=settings.shop.domain):
                yield [(m, None) for m in due]
            for batch in plan_batches(store, settings, campaign, now):  # held out, or merged: stored as skipped
                yield [(as_claimed(m), m.skip_reason) for m in batch]

    shown = 0
    if not campaigns:  # run --once first skips the rows of campaigns turned off whose expiry passed (``expire_off``)
        for gone in _expired_off(store, settings, enabled, now):
            if one is None or gone.message.customer_id == one[0]:
                yield gone
                shown += 1
                if limit is not None and shown >= limit:
                    return
    for batch in batches():
        if one is not None and quota_left is None:  # one customer: their messages, and others to their mailbox
            batch = [(m, skipped) for m, skipped in batch if m.customer_id == one[0] or mailbox(m.email) == one[1]]
        if not batch:
            continue
        facts = load_batch_facts(store, [m for m, _ in batch], catalogue, settings=settings, now=now,
                                 planned_birthdays=birthdays)  # fmt: skip
        for message, skipped in batch:
            show = message.campaign in shown_campaigns and (one is None or message.customer_id == one[0])
            ahead = skipped is None and message.id == 0 and message.due_at > now  # planned, not claimable yet
            if message.id == 0 and message.campaign == cc.BIRTHDAY:
                birthdays[message.dedupe_key] = None if skipped else (mailbox(message.email), message.due_at,
                                                                      message.expires_at)  # fmt: skip
            if not show:
                if skipped is None and not message.unreadable and not ahead:  # judged as the run would: it takes
                    sends = composer.decide(message, facts, now, arbiter) is None  # its mailbox's slot, and the quota's
                    if sends and quota_left is not None:
                        quota_left -= 1
                continue
            if skipped is not None:
                yield Skipped(message, skipped)
            elif ahead:  # neither sent nor judged now: a run at ``now`` leaves it in the queue until it is due
                yield _planned_ahead(message, facts)
            else:
                result = composer.compose(message, facts, now, arbiter)
                if isinstance(result, Composed):
                    locales.note(result.customer)
                    if quota_left is not None:
                        quota_left -= 1
                        if quota_left < 0:  # the quota's slots are taken: back to the queue until the next day's
                            day_ends = quota_day_end(quota_day(now, settings.shop.time_zone), settings.shop.time_zone)
                            result = Deferred(message, day_ends, DAILY_QUOTA, result.customer.time_zone,
                                              result.customer.external_id)  # fmt: skip
                yield result
            shown += 1
            if limit is not None and shown >= limit:
                return


def _expired_off(store: Store, settings: Settings, enabled: Sequence[str], now: datetime) -> Iterator[Skipped]:
    """The waiting rows of campaigns turned off whose expiry has passed: ``run --once`` skips them as expired before
    it claims (``app.campaigns_not_sent``, ``opstore.expire_messages``)."""
    off = [name for name in cc.CAMPAIGNS if name not in enabled]
    if not off:
        return
    for due in store.due_messages(now=now, campaigns=off, domain=settings.shop.domain):
        yield from (Skipped(m, SkipReason.EXPIRED) for m in due if not m.unreadable and m.expires_at < now)


def _planned_ahead(message: ClaimedMessage, facts: BatchFacts) -> Deferred:
    """A message planned due later than now (a birthday offer ahead of its window): it waits until then."""
    customer = facts.customers[message.customer_id].customer
    zone, who = (customer.time_zone, customer.external_id) if customer is not None else ("UTC", "")
    return Deferred(message, message.due_at, PLANNED_AHEAD, zone, who)


DAILY_QUOTA = "daily_quota"
"""A ``Deferred``'s ``why`` in preview for a message the day's ``sending.daily_quota`` has no slot left for."""
PLANNED_AHEAD = "planned_ahead"
"""A ``Deferred``'s ``why`` in preview for a message planned due later (``_planned_ahead``)."""

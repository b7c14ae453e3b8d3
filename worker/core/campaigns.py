"""Who is due which campaign (beyond the one-step win-back of ``audiences``): pure rules, time as an argument.

Each campaign has a rule (is this customer or order due at ``now``?), a dedupe
key (what makes "once" once) and a way to plan the message. The store's
candidate queries narrow the customers down in SQL; these rules decide, and the
tests run one table of cases through both.

    campaign      due when                                                 dedupe key
    winback       only one purchase, the last step whose day count passed  winback:<cust>:<order>:<step>
    birthday      0..days_before days before the birthday, their zone      birthday:<cust>:<year>
    feedback      days_after days after delivery (else placement)          feedback:<order>
    new_products  products launched since their last order                 new_products:<cust>:<news week>
    loyalty       the highest order-count / spend milestone reached        loyalty:<cust>:<milestone>[:r<n>]

Loyalty's two milestones reached by one order (both new in one pass) are one email: the spend milestone's row is
stored as skipped, ``merged`` into the order milestone's (``adapters.plan_sql.loyalty``), so it is never planned
again nor sent on its own, unless that email is found no longer due when it is to go (its payload's ``carries``
names the merged row, which then goes back to the queue: ``Store.record``). An operator who closes that email
closes the merged row with it, or, closing it as sent, leaves it merged (``adapters.ledger.Carried``).

Loyalty is once per milestone, with one exception: a reward skipped as ``no_longer_due`` (the order that reached the
milestone refunded before it went) is planned again when the milestone is reached again, under ``…:r1``, ``…:r2``…
(``loyalty_key_to_plan``; birthday's corrections are the same idea: ``birthday_key_to_plan``). The payload's
``milestone`` stays the label, so what reads it (``milestone_of``: composing, preview, stats by campaign) needs no
parse of the key.
"""

from __future__ import annotations

import calendar
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from worker.core import tokens
from worker.core.audiences import WINBACK, key_part, message_id_for, winback_key
from worker.domain import ClaimedMessage, OrderFacts, PlannedMessage, ProductView, SendTimeFacts, SkipReason

BIRTHDAY = "birthday"
FEEDBACK = "feedback"
NEW_PRODUCTS = "new_products"
LOYALTY = "loyalty"
CAMPAIGNS = (WINBACK, BIRTHDAY, FEEDBACK, NEW_PRODUCTS, LOYALTY)


@dataclass(frozen=True, slots=True)
class AudienceRow:
    """One candidate as the store's audience queries return it: plain values, no ORM."""

    customer_id: int
    customer_external_id: str
    email: str
    time_zone: str = ""
    birthday: date | None = None
    order_count: int = 0
    total_spent_minor: int = 0
    last_order_at: datetime | None = None
    order_id: int = 0
    """The order the message is about (win-back: the only one; feedback: the one to rate)."""
    order_external_id: str = ""
    order_at: datetime | None = None
    """Win-back: when the only order was placed; feedback: delivered (else placed)."""


def planned(
    row: AudienceRow,
    *,
    key: str,
    campaign: str,
    now: datetime,
    expires_at: datetime,
    domain: str,
    priority: int,
    step: int = 1,
    payload: dict[str, str] | None = None,
    held_out: bool = False,
    due_at: datetime | None = None,
) -> PlannedMessage:
    return PlannedMessage(
        dedupe_key=key,
        campaign=campaign,
        step=step,
        customer_id=row.customer_id,
        email=row.email,
        due_at=now if due_at is None else due_at,
        expires_at=expires_at,
        message_id=message_id_for(key, domain),
        priority=priority,
        payload=payload or {},
        held_out=held_out,
    )


# --- win-back in steps ---------------------------------------------------------


def winback_step_due(
    first_order_at: datetime, now: datetime, step_days: Sequence[int], give_up_after_days: int = 0
) -> int | None:
    """The 1-based step due for a one-time buyer: the last whose day count has passed (strictly
    more than ``days`` since the order). Earlier steps a customer never got are not sent late.
    None as well once more than ``give_up_after_days`` (if not 0) have passed (``winback_given_up``)."""
    if winback_given_up(first_order_at, now, give_up_after_days):
        return None
    due = None
    for i, days in enumerate(step_days, start=1):
        if first_order_at < now - timedelta(days=days):
            due = i
    return due


def winback_given_up_before(now: datetime, give_up_after_days: int) -> datetime | None:
    """An only order placed strictly before this instant is given up on (None: never)."""
    return now - timedelta(days=give_up_after_days) if give_up_after_days else None


def winback_given_up(first_order_at: datetime, now: datetime, give_up_after_days: int) -> bool:
    """Whether win-back has given up on a one-time buyer whose order was placed at ``first_order_at``: more than
    ``give_up_after_days`` (if not 0) have passed (``winback_given_up_before``)."""
    given_up = winback_given_up_before(now, give_up_after_days)
    return given_up is not None and first_order_at < given_up


def winback_step_window(now: datetime, step_days: Sequence[int], step: int) -> tuple[datetime | None, datetime]:
    """(not_before, before): step ``step`` is due for an order placed in ``[not_before, before)``."""
    before = now - timedelta(days=step_days[step - 1])
    not_before = now - timedelta(days=step_days[step]) if step < len(step_days) else None
    return not_before, before


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def winback_step_moved(
    row_days: int | None, row_template: str | None, step: int, step_days: Sequence[int], step_templates: Sequence[str]
) -> bool:
    """Whether the ledger row that has the key of step ``step`` (of fewer days: a row of as many or more leaves the
    step unplanned by its days) was planned as another step, one removed or inserted before it since: its days
    are those of another step now, or its template is not this step's (``step_templates`` empty: not compared).
    The step is then planned under a key of its own (``winback_key`` with its days), unless a row at such a key of
    its number is this step's. Otherwise (the step's days edited, its template kept, or a row whose days cannot be
    read) the row is this step's, and it is not planned again."""
    if row_days is None or row_days == step_days[step - 1]:
        return False
    if row_days in step_days:
        return True
    return bool(step_templates) and row_template is not None and row_template != step_templates[step - 1]


@dataclass(frozen=True, slots=True)
class Renumbered:
    """Win-back ledger rows of one day count planned under a step number the config now gives another step."""

    days: int
    was: int
    now: int | None
    """The number of the step of ``days`` now; None when no step has those days."""
    rows: int


def winback_renumbered(rows: Mapping[tuple[int, int | None], int], step_days: Sequence[int]) -> list[Renumbered]:
    """The day counts whose ledger rows (``rows``: (step, days) → count) have a number that no longer names a step
    of those days in ``step_days`` (a step inserted or removed before them), fewest days first."""
    number = {days: n for n, days in enumerate(step_days, start=1)}
    return sorted(
        (Renumbered(days, step, number.get(days), n) for (step, days), n in rows.items()
         if days is not None and number.get(days) != step),
        key=lambda r: (r.days, r.was),
    )  # fmt: skip


def purchases(orders: Sequence[OrderFacts]) -> list[OrderFacts]:
    return sorted((o for o in orders if o.status.counts_as_purchase), key=lambda o: o.placed_at)


def paid(orders: Sequence[OrderFacts]) -> list[OrderFacts]:
    """The purchases paid for (paid, shipped, delivered), the first paid first: what loyalty counts and sums. An
    order placed and not paid yet counts once it is paid (a reward is not given for an order that may never be),
    from when it was (``paid_time``)."""
    return sorted((o for o in orders if o.status.is_paid), key=paid_time)


def paid_time(order: OrderFacts) -> datetime:
    """When a paid order was paid: ``paid_at``, or ``placed_at`` where none is known."""
    return order.paid_at or order.placed_at


# --- birthday --------------------------------------------------------------------


def iso_day(text: object) -> date | None:
    """A birthday offer's planned day (``payload["birthday"]``, ISO as planning writes it); None when it is not one
    (a row edited by hand), where ``date.fromisoformat``'s ValueError stopped every cycle at that row."""
    try:
        return date.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        return None


def birthday_in(birthday: date, year: int) -> date:
    """The day a birthday is celebrated in ``year``: 29 February becomes 28 February in other years."""
    if birthday.month == 2 and birthday.day == 29 and not calendar.isleap(year):
        return date(year, 2, 28)
    return birthday.replace(year=year)


def birthday_due(birthday: date | None, today: date, days_before: int) -> date | None:
    """The birthday being celebrated when ``today`` (the customer's local date) is 0..days_before
    days before it; None otherwise (and always None without a birthday)."""
    if birthday is None:
        return None
    for year in (today.year, today.year + 1):
        day = birthday_in(birthday, year)
        if 0 <= (day - today).days <= days_before:
            return day
    return None


BIRTHDAY_LEAD = timedelta(hours=26)
"""How far ahead a pass plans a birthday whose window is about to open (due when it opens). Planning runs once a
day (the daemon's default ``schedule``, on the shop's clock, 25 hours apart when that clock goes back): a pass that
first saw the window open would plan the offer due at once, which on the customer's clock may be the evening of the
birthday (09:00 in Jakarta is 21:00 in New York), quiet hours until it expired. So the pass before the window
opens plans it: more than a day ahead. A birthday schedule whose passes are further apart plans some offers late,
or never (``kembali check`` notes it)."""


def birthday_plan(
    birthday: date | None, now: datetime, zone: ZoneInfo, days_before: int
) -> tuple[date, datetime] | None:
    """(the birthday being celebrated, when its email is due) for a pass at ``now``: at once when the customer's
    local date is 0..days_before days before it; at the start of that window when it opens within
    ``BIRTHDAY_LEAD``; None otherwise (and always None without a birthday)."""
    day = birthday_due(birthday, local_today(now, zone), days_before)
    if day is not None:
        return day, now
    window = birthday_to_come(birthday, now, zone, days_before, BIRTHDAY_LEAD)
    return None if window is None else (window[0], max(window[1], now))


PLANNING_MARGIN = timedelta(minutes=5)
"""How long after a planning pass's time a message of lower priority waits, for a birthday offer that pass will plan
due at once: time for the pass to run (the daemon holds its sender while a pass is under way, up to two minutes)."""


def birthday_offer_due(opens: datetime, planned_by: datetime) -> datetime:
    """When a birthday offer no pass has planned yet falls due, as a message of lower priority waits for it:
    ``opens``, when its window opens, if the pass that will plan it (at ``planned_by``, the first after
    ``BIRTHDAY_LEAD`` before ``opens`` or now) comes before that (it plans the offer ahead, due then); else just
    after that pass (``PLANNING_MARGIN``), which plans it due at once. Not sooner: waiting an hour at a time for a
    pass a day away, the message would only be claimed, deferred and given back again and again."""
    return opens if planned_by < opens else planned_by + PLANNING_MARGIN


def birthday_to_come(
    birthday: date | None, now: datetime, zone: ZoneInfo, days_before: int, horizon: timedelta
) -> tuple[date, datetime] | None:
    """(the birthday, when its offer's window opens) for the customer's next birthday whose window has not
    closed and opens within ``horizon`` of ``now`` (it may be open already): the birthday offer a message of lower
    priority sent at ``now`` could take the slot of, before any pass has planned it. None without a birthday, or
    when the next window opens later than that."""
    if birthday is None:
        return None
    today = local_today(now, zone)
    for year in (today.year, today.year + 1):
        day = birthday_in(birthday, year)
        if birthday_expires(day, zone) <= now:
            continue
        opens = datetime.combine(day - timedelta(days=days_before), time(0, 0), tzinfo=zone).astimezone(UTC)
        return (day, opens) if opens - now <= horizon else None
    return None


def birthday_key(customer_external_id: str, year: int) -> str:
    return f"{BIRTHDAY}:{key_part(customer_external_id)}:{year}"


BIRTHDAY_CORRECTIONS = 3
"""How many times a year a birthday corrected after its offer was planned gets an offer planned again."""


def birthday_keys(customer_external_id: str, day: date) -> tuple[str, ...]:
    """The keys a year's birthday offer may be planned under, in turn (``birthday_key_to_plan``): the year's, then
    one per correction (``…:<year>:c1``…)."""
    key = birthday_key(customer_external_id, day.year)
    return key, *(f"{key}:c{n}" for n in range(1, BIRTHDAY_CORRECTIONS + 1))


def birthday_key_to_plan(customer_external_id: str, day: date, known: Mapping[str, str | None]) -> str | None:
    """The key a birthday offer for ``day`` is planned under, None when none is to be: one offer a year, under the
    first of ``birthday_keys`` the ledger does not have, as long as each it has sends nothing. ``known``: each key
    the ledger has, with ``""`` for a row skipped as ``no_longer_due`` (the birthday was corrected after it was
    planned), the birthday of a row waiting unclaimed (for another day than ``day``, the send-time check skips it
    so: ``still_due``), else None (sent, under way, or skipped for good). A customer who got the offer gets no
    other that year, however often the birthday is corrected after."""
    for key in birthday_keys(customer_external_id, day):
        if key not in known:
            return key
        planned_for = known[key]
        if planned_for is None or planned_for == day.isoformat():
            return None  # sent, under way, skipped for good, or waiting to be sent for this very day
    return None  # corrected more often than BIRTHDAY_CORRECTIONS this year


def local_today(now: datetime, zone: ZoneInfo) -> date:
    return now.astimezone(zone).date()


def birthday_expires(day: date, zone: ZoneInfo) -> datetime:
    """The end of the birthday on the customer's clock."""
    return datetime.combine(day + timedelta(days=1), time(0, 0), tzinfo=zone)


def birthday_mmdd_candidates(now: datetime, days_before: int) -> list[int]:
    """Every ``month*100+day`` a birthday due at ``now`` could have, in any time zone (UTC-12 to
    UTC+14): what the store's indexed pre-filter asks for. 229 joins 228 in non-leap years. ``now`` may be in
    any zone: the span is reckoned from UTC."""
    utc = now.astimezone(UTC)
    first = (utc - timedelta(hours=12)).date()
    last = (utc + timedelta(hours=14) + BIRTHDAY_LEAD).date() + timedelta(days=days_before)
    out: set[int] = set()
    day = first
    while day <= last:
        out.add(day.month * 100 + day.day)
        if day.month == 2 and day.day == 28 and not calendar.isleap(day.year):
            out.add(229)
        day += timedelta(days=1)
    return sorted(out)


# --- feedback ----------------------------------------------------------------------


def feedback_window(now: datetime, days_after: int, lookback_days: int) -> tuple[datetime, datetime]:
    """(after, not_after): an order settled (delivered, else placed) in ``(after, not_after]`` is due."""
    not_after = now - timedelta(days=days_after)
    return not_after - timedelta(days=lookback_days), not_after


def feedback_due(order: OrderFacts, now: datetime, days_after: int, lookback_days: int) -> bool:
    """At least ``days_after`` days after delivery (or placement), and not more than
    ``lookback_days`` later than that; only orders paid, shipped or delivered are asked about (never one
    placed and not paid, cancelled or refunded)."""
    if not order.status.can_be_rated:
        return False
    settled = order.delivered_at or order.placed_at
    after, not_after = feedback_window(now, days_after, lookback_days)
    return after < settled <= not_after


def feedback_ready_at(settled: datetime, days_after: int) -> datetime:
    """When a feedback request for an order settled (delivered, else placed) at ``settled`` may go: ``days_after``
    days on. Right before sending it is reckoned again from the order as it is then, since an import may have
    given it a delivery time after the request was planned from its placement (or a later one): the request
    waits for that, as it would have been planned."""
    return settled + timedelta(days=days_after)


def feedback_key(order_external_id: str) -> str:
    return f"{FEEDBACK}:{key_part(order_external_id)}"


def rating_scores(scale: str) -> range:
    """``stars``: 1-5; ``nps``: 0-10 (how likely to recommend us)."""
    return range(0, 11) if scale == "nps" else range(1, 6)


def rating_links(order_id: int, scale: str, base_url: str, key: bytes, shop: str) -> list[dict[str, object]]:
    """One link per score, each carrying a token ``f:<order id>:<score>`` signed for ``shop`` (its domain)."""
    sep = "&" if "?" in base_url else "?"
    scope = tokens.shop_scope(shop)
    return [
        {"score": score, "url": f"{base_url}{sep}t={tokens.sign('f', f'{order_id}:{score}', key, shop=scope)}"}
        for score in rating_scores(scale)
    ]


# --- new products ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Launch:
    product: ProductView
    launched_at: datetime


def iso_week(day: date) -> str:
    year, week, _ = day.isocalendar()
    return f"{year}-W{week:02d}"


def news_week(launches: Sequence[Launch], zone: ZoneInfo) -> str:
    """The ISO week (on the shop's clock) of the newest launch: what new-products' dedupe key counts in.
    One email per customer per week in which something was launched, so news a customer was already sent
    is not sent again the next week while it is still "new" (``within_days`` can span two weeks). A launch
    in the current week keeps the key the current week gave before this rule."""
    return iso_week(local_today(max(x.launched_at for x in launches), zone))


NEWS_SPACING = timedelta(days=7)
"""At most one new-products email per customer (per mailbox) in any 7 days, whatever the ISO weeks of the
launches: a week's news planned while the last week's email waited for a free slot (the cap, quiet hours)
waits too, and is skipped as expired when that is past its expiry."""


def next_news_at(sent: Sequence[datetime]) -> datetime | None:
    """When the mailbox may be sent new-products news again, given when it was sent news (None: at once)."""
    return max(sent) + NEWS_SPACING if sent else None


def new_products_key_for_week(customer_external_id: str, week: str) -> str:
    return f"{NEW_PRODUCTS}:{key_part(customer_external_id)}:{week}"


def new_since(
    last_order_at: datetime | None, launches: Sequence[Launch], now: datetime, within_days: int
) -> list[Launch]:
    """Launches after the customer's last order, in the last ``within_days`` days, not in the future."""
    if last_order_at is None:
        return []
    floor = max(last_order_at, now - timedelta(days=within_days))
    return [x for x in launches if floor < x.launched_at <= now]


def new_in_their_categories(new: Sequence[Launch], bought: Sequence[ProductView]) -> list[ProductView]:
    """The new products in the categories the customer bought from (a product without a category is in none),
    that they do not own, newest first: what the email may call new."""
    owned = {p.external_id for p in bought}
    categories = {p.category for p in bought if p.category}
    return [
        x.product
        for x in sorted(new, key=lambda x: x.launched_at, reverse=True)
        if x.product.category in categories and x.product.external_id not in owned
    ]


def pick_new_products(
    new: Sequence[Launch], bought: Sequence[ProductView], best_sellers: Sequence[ProductView], n: int
) -> list[ProductView]:
    """New products in the categories the customer bought from (``new_in_their_categories``); when none
    match, the shop's best sellers (products that sold: ``ProductView.sold``) they do not own; when they own every
    one, the news itself, whatever its category, newest first (``news_elsewhere``); with no news either (a
    rendering outside planning: ``check``, ``send-test``), the catalogue's products they do not own. At most ``n``.

    (An unsold product filled the best sellers up: one who had bought every best seller was shown products no one
    bought, the news among them, as "what our customers love most".)"""
    matching = new_in_their_categories(new, bought)
    if matching:
        return matching[:n]
    owned = {p.external_id for p in bought}
    favourites = [p for p in best_sellers if p.sold > 0 and p.external_id not in owned]
    rest = [p for p in best_sellers if p.external_id not in owned]
    return (favourites or news_elsewhere(new, bought) or rest)[:n]


def news_elsewhere(new: Sequence[Launch], bought: Sequence[ProductView]) -> list[ProductView]:
    """The new products the customer does not own, whatever their category, newest first: what new-products shows
    one who owns every best seller and for whom nothing new matches their categories."""
    owned = {p.external_id for p in bought}
    return [x.product for x in sorted(new, key=lambda x: x.launched_at, reverse=True)
            if x.product.external_id not in owned]  # fmt: skip


# --- loyalty -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Milestones:
    orders: tuple[int, ...] = ()
    spend_minor: tuple[int, ...] = ()
    within_days: int = 30
    currency: str = "IDR"
    """The shop's currency: spend counts the orders placed in it; an order in another counts as an order only
    (its amount is not the shop's money, and Kembali converts nothing)."""


def loyalty_milestones(order_count: int, total_spent_minor: int, m: Milestones) -> list[str]:
    """The highest order-count milestone and the highest spend milestone reached (labels such as
    ``orders-5`` and ``spend-500000000``)."""
    out: list[str] = []
    reached = [n for n in m.orders if order_count >= n]
    if reached:
        out.append(f"orders-{max(reached)}")
    spent = [t for t in m.spend_minor if total_spent_minor >= t]
    if spent:
        out.append(f"spend-{max(spent)}")
    return out


def loyalty_due(
    order_count: int,
    total_spent_minor: int,
    last_paid_at: datetime | None,
    now: datetime,
    m: Milestones,
    *,
    count_before: int,
    spent_before: int,
) -> list[str]:
    """The highest milestones reached (``loyalty_milestones``), each only when an order paid within
    ``within_days`` reached it (``last_paid_at``: when the last was paid): the purchases paid before that window
    (``count_before`` of them, ``spent_before`` in all) had not. So a customer whose 5th order was months ago is not
    thanked for it now because they ordered again (nor a shop's whole history on the day the campaign is turned
    on); one whose 5th order, placed before the window, was paid in it is."""
    if last_paid_at is None or last_paid_at < loyalty_since(now, m):
        return []
    out = []
    for label in loyalty_milestones(order_count, total_spent_minor, m):
        kind, _, amount = label.partition("-")
        if (count_before if kind == "orders" else spent_before) < int(amount):
            out.append(label)
    return out


def loyalty_since(now: datetime, m: Milestones) -> datetime:
    """The start of the window in which the order that reached a milestone must have been paid."""
    return now - timedelta(days=m.within_days)


def milestone_of(payload: Mapping[str, object]) -> tuple[str, int] | None:
    """A loyalty message's milestone (``payload["milestone"]``, a label ``loyalty_milestones`` writes) as its kind
    and amount; None when it is missing or not such a label (a row edited by hand: 'orders-five')."""
    label = payload.get("milestone")
    if not isinstance(label, str):
        return None
    kind, _, amount = label.partition("-")
    if kind not in ("orders", "spend") or not amount.isascii() or not amount.isdigit():
        return None
    return kind, int(amount)


def loyalty_key(customer_external_id: str, milestone: str) -> str:
    return f"{LOYALTY}:{key_part(customer_external_id)}:{milestone}"


LOYALTY_REPLANS = 3
"""How many times a milestone whose reward was skipped unsent because it was no longer reached (the order that
reached it refunded before the email went) gets its reward planned again once reached again."""


def loyalty_keys(customer_external_id: str, milestone: str) -> tuple[str, ...]:
    """The keys a milestone's reward may be planned under, in turn (``loyalty_key_to_plan``): the milestone's,
    then one per time it is reached again after its reward was skipped unsent (``…:<milestone>:r1``…)."""
    key = loyalty_key(customer_external_id, milestone)
    return key, *(f"{key}:r{n}" for n in range(1, LOYALTY_REPLANS + 1))


def loyalty_key_to_plan(
    customer_external_id: str, milestone: str, planned_keys: Collection[str], replannable: Collection[str]
) -> str | None:
    """The key a milestone's reward is planned under, None when none is to be: once per milestone, under the first of
    ``loyalty_keys`` the ledger does not have, as long as each it has is ``replannable`` (skipped as
    ``no_longer_due``, nothing of it tried before an operator's resend: it cannot have arrived). A reward sent, on
    its way, held out, merged, or skipped for any other reason is the milestone's for good, whichever of its keys
    it has (a row deleted by hand before it leaves that key free, not the milestone)."""
    keys = loyalty_keys(customer_external_id, milestone)
    if keys[-1] in planned_keys or any(k in planned_keys and k not in replannable for k in keys):
        return None  # rewarded, or reached again more often than LOYALTY_REPLANS
    return next(k for k in keys if k not in planned_keys)


# --- right before sending ------------------------------------------------------------


def still_due(
    message: ClaimedMessage,
    facts: SendTimeFacts,
    now: datetime,
    *,
    rateable: Collection[int],
    launches: Sequence[Launch],
    within_days: int,
    winback_steps: Sequence[int] = (),
    give_up_after_days: int = 0,
    winback_templates: Sequence[str] = (),
) -> SkipReason | None:
    """Right before sending (after ``audiences.recheck``): does the rule that planned the message still hold
    for what the shop's data says now? None means yes. ``rateable``: the ids of the feedback orders that can
    still be rated (``OrderStatus.can_be_rated``) and are still the message's customer's; ``launches``: the active
    products launched in the new-products window before ``now``; ``winback_steps``: the win-back steps' day
    counts, in order, and ``winback_templates`` their templates; ``give_up_after_days``: win-back's (0: no limit).

    A birthday changed or removed, the order to rate cancelled or refunded (or given to another customer), a
    milestone no longer reached (the order that reached it refunded), news the customer ordered after (or that is
    no longer new), a win-back step still waiting (the cap, quiet hours) when the only order's age reaches the
    next step's day count (the next step goes instead: an earlier step is not sent late, ``winback_step_due``), or
    when it reaches ``give_up_after_days`` (the last step too: no win-back email past it): the message is skipped,
    not sent as planned."""
    customer = facts.customer
    if customer is None:
        return None  # audiences.recheck skips it as customer_gone
    if message.campaign == WINBACK:
        placed = facts.first_order_at
        if placed is not None and winback_given_up(placed, now, give_up_after_days):
            return SkipReason.NO_LONGER_DUE
        # (without give_up_after_days: None from it here is no step passed yet, which leaves the message due)
        step = None if placed is None else winback_step_due(placed, now, winback_steps)
        # a later step is due: by day counts where the row has its own (the step numbers of a row planned before
        # steps were inserted or removed are not the config's), else by number; not the row's own step, its days
        # edited since (a step of its number the row was planned as: ``winback_step_moved``), which no pass plans
        # again for the order
        days = message.payload_id("days")
        if step is not None and (step > message.step if days is None else winback_steps[step - 1] > days and not (
                step == message.step and not winback_step_moved(days, _text(message.payload.get("template")), step,
                                                                winback_steps, winback_templates))):
            return SkipReason.NO_LONGER_DUE
    elif message.campaign == BIRTHDAY:
        planned_day = message.payload.get("birthday")
        if planned_day is None:
            return None
        day = iso_day(planned_day)
        if day is None or customer.birthday is None or birthday_in(customer.birthday, day.year) != day:
            return SkipReason.NO_LONGER_DUE  # a day that cannot be read (edited by hand) cannot be confirmed either
    elif message.campaign == FEEDBACK:
        # the rating links name the order by its id: a row without one (edited by hand) had links for order 0, one
        # rating for every such customer, each shown the first one's comment
        order_id = message.payload_id("order_id")
        if order_id is None or order_id not in rateable:
            return SkipReason.NO_LONGER_DUE
    elif message.campaign == LOYALTY:
        if "milestone" in message.payload:
            milestone = milestone_of(message.payload)
            if milestone is None:  # one that cannot be read (edited by hand) cannot be confirmed
                return SkipReason.NO_LONGER_DUE
            kind, amount = milestone
            paid_count, paid_spent = facts.paid_order_count, facts.paid_spent_minor
            reached = {
                "orders": facts.order_count if paid_count is None else paid_count,
                "spend": facts.total_spent_minor if paid_spent is None else paid_spent,
            }[kind]
            if reached < amount:
                return SkipReason.NO_LONGER_DUE
    elif message.campaign == NEW_PRODUCTS:
        if new_since(facts.last_order_at, launches, now, within_days):
            return None
        if launches and facts.last_order_at is not None:  # (``launches`` are those of the window already)
            return SkipReason.ORDERED_SINCE  # everything new was launched before their latest order
        return SkipReason.NO_LONGER_DUE
    return None


@dataclass(frozen=True, slots=True)
class Facts:
    """What the pure rules look at for one customer (tests build these; the store returns rows)."""

    customer_external_id: str
    time_zone: str = "Asia/Jakarta"
    birthday: date | None = None
    orders: tuple[OrderFacts, ...] = ()
    consent: bool = True
    suppressed: bool = False
    planned_keys: frozenset[str] = field(default_factory=frozenset)
    winback_days: Mapping[str, int] = field(default_factory=dict)
    """Per order (external id), the most days of a win-back step the ledger has a row of for it (the payload's
    ``days``), whatever that row's step number."""
    winback_rows: Mapping[str, tuple[int | None, str | None]] = field(default_factory=dict)
    """Per win-back ledger row (its dedupe key), the payload's ``days`` and ``template`` (None: not there)."""
    replannable: frozenset[str] = field(default_factory=frozenset)
    """Of ``planned_keys``, loyalty's rows skipped as ``no_longer_due`` that cannot have arrived
    (``loyalty_key_to_plan``)."""

    @property
    def reachable(self) -> bool:
        return self.consent and not self.suppressed


# --- whole-customer rules (what the store's queries plus the rules above must agree with) ---


def _last_purchase(facts: Facts) -> OrderFacts | None:
    bought = purchases(facts.orders)
    return bought[-1] if bought else None


def winback_due_keys(
    facts: Facts,
    now: datetime,
    step_days: Sequence[int],
    give_up_after_days: int = 0,
    step_templates: Sequence[str] = (),
) -> list[str]:
    bought = purchases(facts.orders)
    # one purchase, paid (an order placed and never paid is no purchase to follow up; one after it is a new order)
    if not facts.reachable or len(bought) != 1 or not bought[0].status.is_paid:
        return []
    step = winback_step_due(bought[0].placed_at, now, step_days, give_up_after_days)
    if step is None:
        return []
    # a step renumbered in the config (one inserted or removed before it) is not planned again under its new number
    had = facts.winback_days.get(bought[0].external_id)
    if had is not None and had >= step_days[step - 1]:
        return []
    key = winback_key(facts.customer_external_id, bought[0].external_id, step)
    if key in facts.planned_keys:
        # the rows of the step's number: at its key, and at keys of their own (``…:<step>d<days>``), one of which
        # may be this step's, planned before its days were edited
        rows = (k for k in facts.planned_keys if k == key or k.startswith(key + "d"))
        if any(not winback_step_moved(*facts.winback_rows.get(k, (None, None)), step, step_days, step_templates)
               for k in rows):  # fmt: skip
            return []
        key = winback_key(facts.customer_external_id, bought[0].external_id, step, step_days[step - 1])
    return [] if key in facts.planned_keys else [key]


def birthday_due_keys(facts: Facts, now: datetime, days_before: int, zone: ZoneInfo) -> list[str]:
    if not facts.reachable:
        return []
    plan = birthday_plan(facts.birthday, now, zone, days_before)
    if plan is None:
        return []
    key = birthday_key(facts.customer_external_id, plan[0].year)
    return [] if key in facts.planned_keys else [key]


def feedback_due_keys(facts: Facts, now: datetime, days_after: int, lookback_days: int) -> list[str]:
    if not facts.reachable:
        return []
    keys = [feedback_key(o.external_id) for o in facts.orders if feedback_due(o, now, days_after, lookback_days)]
    return [k for k in keys if k not in facts.planned_keys]


def new_products_due_keys(
    facts: Facts, now: datetime, launches: Sequence[Launch], within_days: int, active_within_days: int, week: str
) -> list[str]:
    last = _last_purchase(facts)
    if not facts.reachable or last is None or last.placed_at < now - timedelta(days=active_within_days):
        return []
    if not new_since(last.placed_at, launches, now, within_days):
        return []
    key = new_products_key_for_week(facts.customer_external_id, week)
    return [] if key in facts.planned_keys else [key]


def loyalty_due_keys(facts: Facts, now: datetime, milestones: Milestones) -> list[str]:
    bought = paid(facts.orders)
    if not facts.reachable or not bought:
        return []
    earlier = [o for o in bought if paid_time(o) < loyalty_since(now, milestones)]

    def spent(orders: Sequence[OrderFacts]) -> int:
        return sum(o.total_minor for o in orders if o.currency == milestones.currency)

    labels = loyalty_due(len(bought), spent(bought), paid_time(bought[-1]), now, milestones,
                         count_before=len(earlier), spent_before=spent(earlier))  # fmt: skip
    keys = [loyalty_key_to_plan(facts.customer_external_id, label, facts.planned_keys, facts.replannable)
            for label in labels]  # fmt: skip
    return [k for k in keys if k is not None]

"""Who is due which email: pure rules over plain values, with ``now`` as an argument.

Each campaign has a rule (is this customer due?), a dedupe key (what makes
"once" once), and a send-time re-check (is it still right to send?). The store's
candidate queries implement the same rules in SQL for speed; the tests run one
table of cases through both so they cannot drift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.domain import (
    ClaimedMessage,
    CustomerFacts,
    CustomerSnapshot,
    PlannedMessage,
    SendTimeFacts,
    SkipReason,
)

WINBACK = "winback"


def message_id_for(dedupe_key: str, domain: str) -> str:
    """A Message-ID fixed by the dedupe key, so a resend of the same message keeps it."""
    digest = hashlib.sha256(dedupe_key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}.kembali@{domain}>"


def key_part(external_id: str) -> str:
    """An id as one dedupe-key field: ``:`` and ``%`` escaped, so ids with colons cannot collide."""
    return external_id.replace("%", "%25").replace(":", "%3A")


def key_part_value(part: str) -> str:
    """The id one dedupe-key field stands for: ``key_part`` undone."""
    return part.replace("%3A", ":").replace("%25", "%")


def winback_key(customer_external_id: str, first_order_external_id: str, step: int = 1, days: int | None = None) -> str:
    """``winback:<customer>:<order>:<step>``; with ``days``, ``…:<step>d<days>``: the key of a step whose number an
    order has a row of planned as another step (``campaigns.winback_step_moved``)."""
    tail = str(step) if days is None else f"{step}d{days}"
    return f"{WINBACK}:{key_part(customer_external_id)}:{key_part(first_order_external_id)}:{tail}"


def winback_cutoff(now: datetime, quiet_days: int) -> datetime:
    """An order placed strictly before this instant is 'more than quiet_days ago'."""
    return now - timedelta(days=quiet_days)


def is_winback_due(facts: CustomerFacts, now: datetime, quiet_days: int) -> bool:
    """Exactly one purchase, placed more than ``quiet_days`` ago, with consent, not
    suppressed, and no ledger row for this occasion yet."""
    purchases = [o for o in facts.orders if o.status.counts_as_purchase]
    if len(purchases) != 1:
        return False
    (first,) = purchases
    return (
        first.placed_at < winback_cutoff(now, quiet_days)
        and facts.customer.marketing_consent
        and not facts.suppressed
        and winback_key(facts.customer.external_id, first.external_id) not in facts.planned_keys
    )


@dataclass(frozen=True, slots=True)
class WinbackCandidate:
    """A customer the store's query found due, with their single order."""

    customer: CustomerSnapshot
    first_order_id: int
    first_order_external_id: str
    first_order_at: datetime


def plan_winback(
    candidate: WinbackCandidate, *, now: datetime, expires_after_days: int, domain: str, priority: int = 0
) -> PlannedMessage:
    key = winback_key(candidate.customer.external_id, candidate.first_order_external_id)
    return PlannedMessage(
        dedupe_key=key,
        campaign=WINBACK,
        step=1,
        customer_id=candidate.customer.id,
        email=candidate.customer.email,
        due_at=now,
        expires_at=now + timedelta(days=expires_after_days),
        message_id=message_id_for(key, domain),
        priority=priority,
        payload={
            "first_order_id": str(candidate.first_order_id),
            "first_order": candidate.first_order_external_id,
        },
    )


def recheck(message: ClaimedMessage, facts: SendTimeFacts, now: datetime) -> SkipReason | None:
    """Right before sending: is it still right to send this message? None means yes. (The other campaigns'
    rules are checked again by ``campaigns.still_due``.)"""
    if now >= message.expires_at:
        return SkipReason.EXPIRED
    if facts.customer is None:
        return SkipReason.CUSTOMER_GONE
    if facts.suppressed:
        return SkipReason.SUPPRESSED
    if not facts.customer.marketing_consent:
        return SkipReason.NO_CONSENT
    if message.campaign == WINBACK:
        if facts.order_count == 0:  # the only order was cancelled or refunded: no longer a buyer at all
            return SkipReason.NO_LONGER_DUE
        planned_order = message.payload_id("first_order_id")
        if planned_order is None and "first_order_id" in message.payload:
            return SkipReason.NO_LONGER_DUE  # an order that cannot be read (edited by hand) cannot be confirmed
        if facts.order_count != 1 or (planned_order is not None and facts.first_order_id != planned_order):
            return SkipReason.ORDERED_SINCE  # a second order, or a new one in place of a refunded one
    return None

"""The Store: the ledger and the shop's data behind one small, synchronous API.

All access is SQLAlchemy Core over the SQLModel tables (ORM objects cost ~7x more
per row and never leave this module anyway). Every method is one short
transaction. The async pipeline calls these methods through a single database
thread (``worker.app.AsyncStore``), so the event loop never waits on a commit.

"Once" is the database's job: the dedupe key is UNIQUE, and planning inserts
with ON CONFLICT DO NOTHING (on PostgreSQL a plain INSERT under a lock per
campaign first, ``adapters.plan_sql``); claiming is one UPDATE … WHERE id IN (SELECT … FOR UPDATE
SKIP LOCKED) RETURNING on PostgreSQL, and the same statement inside BEGIN
IMMEDIATE on SQLite; ``mark_sending`` commits the ``sending`` state before the
first SMTP byte, after a last re-check of suppression, consent and win-back's
"ordered since" in the same transaction (``_RECHECK``).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import json
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters import db
from worker.adapters.importer import ascii_address
from worker.adapters.tables import (
    Attempt,
    Customer,
    Message,
    OrderLine,
    Product,
    RateLimit,
    ShopOrder,
    Suppression,
    UTCDateTime,
)  # fmt: skip
from worker.config import Settings
from worker.core.audiences import WINBACK, WinbackCandidate
from worker.core.campaigns import NEW_PRODUCTS
from worker.domain import (
    ClaimedMessage,
    CustomerSnapshot,
    Disposition,
    Locale,
    MessageStatus,
    Outcome,
    PlannedMessage,
    ProductView,
    SendTimeFacts,
    SkipReason,
    mailbox,
)

C = Customer.__table__  # type: ignore[attr-defined]
P = Product.__table__  # type: ignore[attr-defined]
O = ShopOrder.__table__  # type: ignore[attr-defined]  # noqa: E741
L = OrderLine.__table__  # type: ignore[attr-defined]
M = Message.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
S = Suppression.__table__  # type: ignore[attr-defined]

PURCHASE_EXCLUDED = ("cancelled", "refunded")
RATEABLE = ("paid", "shipped", "delivered")
"""The orders a feedback request may ask about (``OrderStatus.can_be_rated``)."""
PAID = RATEABLE
"""The orders paid (``OrderStatus.is_paid``): what loyalty's milestones, win-back's one purchase and the reports
count as a purchase (an order placed and not paid yet counts once it is)."""
CLAIMABLE = (MessageStatus.PLANNED.value, MessageStatus.RETRY.value)
# Literal SQL, not bound parameters: a partial index is used only when the query repeats its WHERE as is.
WAITING = sa.text("message.status IN ('planned', 'retry')")
"""The rows of the partial indexes ``ix_message_queue`` and ``ix_message_expiry``."""
IN_FLIGHT = sa.text("message.status IN ('claimed', 'sending')")
"""The rows of the partial index ``ix_message_inflight``."""
UNCERTAIN = sa.text("message.status = 'uncertain'")
"""The rows of the partial index ``ix_message_uncertain``."""
CLAIMED = sa.text("message.status = 'claimed'")
"""The rows of the partial index ``ix_message_claimed_mailbox``: claimed, not yet being sent."""
_WAITING_PRIORITIES = sa.text(
    # the distinct priorities of waiting rows, highest first: one index seek each (a loose index scan)
    "WITH RECURSIVE p(v) AS ("
    " SELECT max(priority) FROM message WHERE message.status IN ('planned', 'retry')"
    " UNION ALL SELECT (SELECT max(priority) FROM message WHERE message.status IN ('planned', 'retry')"
    " AND priority < p.v) FROM p WHERE p.v IS NOT NULL"
    ") SELECT v FROM p WHERE v IS NOT NULL"
)
_CHUNK = 500  # ids per IN (…) list


def _placeholders(prefix: str, count: int) -> str:
    """``:i0, :i1, …``: the named parameters of an ``IN (…)`` list of ``count`` values (``prefix`` ``i``)."""
    return ", ".join(f":{prefix}{n}" for n in range(count))


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def customer_snapshot(row: Any, default_locale: Locale) -> CustomerSnapshot:
    """A customer row as the core sees it; a language stored that has no templates reads as ``default_locale``
    (the shop's), the value stored kept in ``stored_locale`` for a warning."""
    known = row.locale in _LOCALES
    return CustomerSnapshot(
        id=row.id,
        external_id=row.external_id,
        email=row.email,
        name=row.name,
        locale=Locale(row.locale) if known else default_locale,
        time_zone=row.time_zone,
        birthday=row.birthday,
        marketing_consent=bool(row.marketing_consent),
        stored_locale=None if known else str(row.locale),
    )


_LOCALES = frozenset(locale.value for locale in Locale)


def product_view(row: Any) -> ProductView:
    return ProductView(
        external_id=row.external_id,
        name=row.name,
        category=row.category,
        price_minor=row.price_minor,
        currency=row.currency,
        url=row.url,
        image_url=row.image_url,
    )


def _key_part(column: Any) -> Any:
    """SQL twin of ``core.audiences.key_part``."""
    return sa.func.replace(sa.func.replace(column, "%", "%25"), ":", "%3A")


def ids_in_other_case(engine: Engine, external_id: str, *, limit: int = 3) -> list[str]:
    """The shop's customer ids that differ from ``external_id`` only in case (``C-0001`` for ``c-0001``: what an
    operator surely meant), at most ``limit``, in order; [] when there is none. The database lowers both sides
    (ASCII letters only, in SQLite)."""
    query = (
        sa.select(C.c.external_id)
        .where(sa.func.lower(C.c.external_id) == sa.func.lower(external_id), C.c.external_id != external_id)
        .order_by(C.c.external_id)
        .limit(limit)
    )
    with db.reading(engine) as conn:
        return list(conn.execute(query).scalars())


def suppression_address(email: str) -> str:
    """An address as the suppression list holds it: an internationalised domain in its IDNA form, as imports
    store addresses, and ASCII letters in lower case, so that ``Budi@Example.com`` and ``budi@example.com``
    (one mailbox at every real provider) are one entry (migration 0012)."""
    return mailbox(ascii_address(email))


CUSTOMERS_OWN = ("unsubscribed", "complaint")
"""Suppression reasons that are the customer's own wish (an unsubscribe link, a spam complaint): they follow the
customer to the address a later import gives them (``shop.upsert_customers``), where a bounce stays with its dead
mailbox; a resend refused for one advises closing the message, not clearing the entry as for a bounce or an
operator's own."""



def own_wish_sql() -> Any:
    """A suppression entry's reason is the customer's own wish (``CUSTOMERS_OWN``), in any case: an earlier version
    stored it as typed ('Complaint'), their wish all the same."""
    return sa.func.lower(S.c.reason).in_(CUSTOMERS_OWN)


KEMBALI_REASONS = ("manual", "hard_bounce", *CUSTOMERS_OWN)
"""The reasons Kembali knows (stats, a resend's advice): one given in another case is stored, and listed, as
Kembali writes it (an earlier version stored it as typed, 'Complaint': ``stats`` counts it as Kembali writes it)."""

MOVED_FROM = " moved from "
"""What the source of a suppression an import carried to a customer's new address says between the customer and
the address on the list it followed (``followed_source``)."""


def followed_source(external_id: str, address: str) -> str:
    """The source of a suppression an import carried from a customer's address on the list (as the customer's own
    wish, ``CUSTOMERS_OWN``) to the address it gave them: ``customer C1 moved from budi@example.com``, cut to the
    column's 100 characters."""
    return f"customer {external_id}{MOVED_FROM}{address}"[:100]


def followed_sql(source: Any) -> Any:
    """SQL: a suppression's ``source`` says an import carried it to a customer's new address (``followed_source``)."""
    source = sa.func.coalesce(source, "")
    return sa.and_(source.startswith("customer "), source.contains(MOVED_FROM))


def payload_text(dialect: str, payload: Any, key: str) -> Any:
    """A row's payload's string at ``key`` (``template``, ``merged_into``), as ``payload_days`` reads ``days``; NULL
    where there is none or the payload is not JSON (on PostgreSQL, a search of the text: a value with a quote or a
    backslash, which JSON escapes, is not found)."""
    if dialect == "postgresql":
        return sa.func.substring(payload, rf'"{key}"\s*:\s*"([^"\\]*)"')
    return sa.case((sa.func.json_valid(payload), sa.func.json_extract(payload, f"$.{key}")), else_=sa.null())


def payload_days(dialect: str, payload: Any) -> Any:
    """A win-back row's ``days`` (its payload's), an integer; NULL where the payload has none or is not JSON."""
    if dialect == "postgresql":
        found: Any = sa.func.substring(payload, r'"days"\s*:\s*"?([0-9]{1,9})[",} ]')
    else:
        found = sa.case((sa.func.json_valid(payload), sa.func.json_extract(payload, "$.days")))
    return sa.cast(found, sa.Integer)


def suppressed_sql(email: Any) -> Any:
    """``suppression_address(email)`` is on the suppression list, in SQL (``lower`` of an ASCII address, as the
    importer stores them, is the same on both databases); the list's unique index answers it."""
    return sa.exists().where(S.c.email == sa.func.lower(email))


LAPSED_WHY = "lease lapsed while sending (worker died?)"
"""What ``release_expired_leases`` does to a ``sending`` row; its note (``last_error``) names the worker too:
``lease of WORKER lapsed while sending (worker died?)`` (``lapsed_note``), the host to look at among several."""
LAPSED_LIKE = "lease of % lapsed while sending (worker died?)"
"""``lapsed_note`` as a LIKE pattern (``opstore.left_uncertain``)."""


def lapsed_note() -> Any:
    """The ``last_error`` of a row ``release_expired_leases`` makes ``uncertain``, naming the worker that held it."""
    return "lease of " + sa.func.coalesce(M.c.claimed_by, "?") + " lapsed while sending (worker died?)"


def requeued_sql(attempts: Any) -> Any:
    """``core.lifecycle.requeued`` in SQL: the status of a claimed row given back to the queue unsent."""
    return sa.case((attempts > 0, MessageStatus.RETRY.value), else_=MessageStatus.PLANNED.value)


_CLAIM_RETURNING = (
    "id, dedupe_key, campaign, step, customer_id, email, message_id, attempts, due_at, expires_at, payload,"
    " next_attempt_at, resent_after_attempts"
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _claimed(r: Sequence[Any], dt: Callable[[Any], datetime]) -> ClaimedMessage:
    """A claimed row as the driver returns it (``_CLAIM_RETURNING``'s columns, datetimes as ``dt`` reads them). A
    value that cannot be read as Kembali writes it (a row edited by hand) is named in ``unreadable``, for that
    message alone to fail: an exception here stopped every claim, each run, with the whole batch left claimed."""
    problems: list[str] = []
    times = []
    for name, value in (("due_at", r[8]), ("expires_at", r[9])):
        try:
            times.append(dt(value))
        except (TypeError, ValueError, OverflowError):
            problems.append(f"its {name} {str(value)[:40]!r} is not a date and time as Kembali writes it")
            times.append(_EPOCH)
    payload = _payload(r[10], problems)
    return ClaimedMessage(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], times[0], times[1], payload,
                          resent_after_attempts=r[12], unreadable="; ".join(problems))


def _payload(text: Any, problems: list[str]) -> dict[str, str]:
    """A row's payload: the JSON object of texts (or numbers) planning writes; {} with the reason in ``problems``
    when it is not one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        problems.append(f"its payload {str(text)[:40]!r} is not valid JSON ({exc})")
        return {}
    if not isinstance(value, dict):
        problems.append(f"its payload {str(text)[:40]!r} is not a JSON object")
        return {}
    payload: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, str):
            payload[key] = item
        elif isinstance(item, int | float) and not isinstance(item, bool):
            payload[key] = str(item)
        else:
            problems.append(f"its payload's {key!r} is {json.dumps(item)[:40]}, not a text")
            return {}
    return payload


# The group commit's statements as driver SQL (``exec_driver_sql``): per commit, SQLAlchemy's
# statement compilation and per-value type processing cost several times what SQLite does.
# Datetimes are converted by the UTCDateTime columns' own bind processor, so rows are
# stored exactly as through SQLAlchemy (tests/test_store_contract.py reads them back).
_CLAIMED, _SENDING = MessageStatus.CLAIMED.value, MessageStatus.SENDING.value
_MARK_HEAD = f"UPDATE message SET status = '{_SENDING}', attempts = attempts + 1, updated_at = :now WHERE id IN ("
# Several workers judge the frequency cap against the ledger, which shows another worker's message only once it
# is marked or recorded: so a row becomes `sending` only if no other worker is sending to its mailbox (partial
# index ix_message_sending_mailbox) or holds a live claim of a higher priority for it (ix_message_claimed_mailbox,
# migration 0014: of two workers that took one day's queue side by side, the one with the birthday offer keeps
# the slot, whichever renders first), and nobody else sent that mailbox anything, or may have, from HELD_SECONDS
# before the row was claimed on (its updated_at is the claim's time; ix_message_mailbox: a row with a sent_at is
# sent or uncertain, then the attempt that gave it: one of another worker, or none, as when a dead worker's lease
# lapsed). The cap counts per mailbox (``domain.mailbox``, lower(email) in SQL), so several customer records with
# one address share it. The minute before the claim covers a send whose record was committed only after this
# row's facts were read, and clocks of different hosts that disagree by less than that; a row whose sent_at is
# older but which was written since (its updated_at: a dead worker's `sending` row that maintenance made
# uncertain, its sent_at the mark's time minutes before) holds it back too, as the facts saw no send then. This
# worker's own sends are its arbiter's business. On PostgreSQL the mailboxes are locked first (_LOCK_MAILBOXES),
# so of two marks for one mailbox the second sees the first. {since_claim} is the claim's time less HELD_SECONDS,
# in the dialect's SQL.
_MARK_TAIL = (
    f") AND claimed_by = :worker AND status = '{_CLAIMED}'"
    " AND NOT EXISTS (SELECT 1 FROM message other WHERE lower(other.email) = lower(message.email)"
    f" AND other.status = '{_SENDING}' AND other.claimed_by <> :worker)"
    " AND NOT EXISTS (SELECT 1 FROM message other WHERE lower(other.email) = lower(message.email)"
    f" AND other.status = '{_CLAIMED}' AND other.claimed_by <> :worker AND other.priority > message.priority"
    " AND other.lease_until > :now)"
    " AND NOT EXISTS (SELECT 1 FROM message other WHERE lower(other.email) = lower(message.email)"
    " AND other.sent_at IS NOT NULL AND (other.sent_at >= {since_claim} OR other.updated_at >= {since_claim})"
    " AND other.id <> message.id"
    " AND NOT EXISTS (SELECT 1 FROM attempt mine WHERE mine.message_id = other.id"
    " AND mine.attempt_no = other.attempts AND mine.worker = :worker))"
    " RETURNING id"
)
# With no frequency cap (``policy.frequency_caps = []``) there is no slot to keep across workers: the mark holds a
# row back only for the news week, a new-products email for another worker's new-products email to its mailbox (a
# second run a minute after one that sent win-back emails held back every news email to those mailboxes, with no
# other worker and nothing to hold them for).
_SAME_MAILBOX = "WHERE lower(other.email) = lower(message.email)"
_MARK_TAIL_UNCAPPED = _MARK_TAIL.replace(
    _SAME_MAILBOX, f"{_SAME_MAILBOX} AND message.campaign = '{NEW_PRODUCTS}' AND other.campaign = '{NEW_PRODUCTS}'"
)
HELD_SECONDS = 60
"""How long a message held back at the mark waits before it is claimed and judged again; also how long before
its claim another worker's send still holds it back."""
_SINCE_CLAIM = {
    "sqlite": f"strftime('%Y-%m-%d %H:%M:%f', message.updated_at, '-{HELD_SECONDS} seconds')",
    "postgresql": f"message.updated_at - interval '{HELD_SECONDS} seconds'",
}
# The last re-check, in the mark's own transaction (before the mark, so a row it skips is not marked): the
# message was re-checked when its batch was prepared (``audiences.recheck`` and the suppression of the address it
# goes to, ``pipeline.Composer.decide``), and has waited for its sender since. What may have changed meanwhile and
# must stop it is read again here, on the customer's row by id and the suppression list's unique index: its expiry
# passed meanwhile (a birthday offer prepared just before the end of its day), the customer's address or the
# message's own suppressed (an unsubscribe, ``kembali suppress``, a bounce), consent withdrawn (an import), a
# win-back customer who ordered again (an import: ``customer.order_count`` and ``first_order_id`` as the
# prepare-time re-check reads them; its first order, refunded with no other, is no_longer_due). The reason is the
# one the prepare-time re-check gives, in its order: expiry, the customer's row, then the message's address. A
# customer gone (no row) is left to the prepare-time re-check. {planned_order} is the win-back row's
# first_order_id (its payload), as text, in the dialect's SQL.
_RECHECK = (
    f"CASE WHEN message.expires_at <= :now THEN '{SkipReason.EXPIRED}' ELSE "
    "COALESCE((SELECT CASE"
    f" WHEN EXISTS (SELECT 1 FROM suppression WHERE suppression.email = lower(c.email)) THEN '{SkipReason.SUPPRESSED}'"
    f" WHEN NOT c.marketing_consent THEN '{SkipReason.NO_CONSENT}'"
    f" WHEN message.campaign = '{WINBACK}' AND c.order_count = 0 THEN '{SkipReason.NO_LONGER_DUE}'"
    f" WHEN message.campaign = '{WINBACK}' AND (c.order_count <> 1 OR {{planned_order}} IS NOT NULL"
    " AND (c.first_order_id IS NULL OR CAST(c.first_order_id AS TEXT) <> {planned_order}))"
    f" THEN '{SkipReason.ORDERED_SINCE}'"
    " END FROM customer c WHERE c.id = message.customer_id),"
    " CASE WHEN EXISTS (SELECT 1 FROM suppression WHERE suppression.email = lower(message.email))"
    f" THEN '{SkipReason.SUPPRESSED}' END) END"
)
_MARK_SKIPS = (SkipReason.EXPIRED, SkipReason.SUPPRESSED, SkipReason.NO_CONSENT, SkipReason.NO_LONGER_DUE,
               SkipReason.ORDERED_SINCE)  # fmt: skip
"""The reasons the mark skips a row for (``_RECHECK``)."""
_MARK_SKIPS_SQL = ", ".join(f"'{reason}'" for reason in _MARK_SKIPS)
_PLANNED_ORDER = {
    "sqlite": "CAST(json_extract(message.payload, '$.first_order_id') AS TEXT)",
    "postgresql": "(CAST(message.payload AS json) ->> 'first_order_id')",  # (no ::, read as a parameter)
}
_SKIPPED = MessageStatus.SKIPPED.value
# a skip made at the mark is written as a prepare-time skip is (``_RECORD_SQL``): no attempt, the due time kept
_SKIP_HEAD = (
    f"UPDATE message SET status = '{_SKIPPED}', skip_reason = {_RECHECK}, claimed_by = NULL, lease_until = NULL,"
    " next_attempt_at = due_at, updated_at = :now WHERE id IN ("
)
_SKIP_TAIL = (
    f") AND claimed_by = :worker AND status = '{_CLAIMED}' AND {_RECHECK} IS NOT NULL RETURNING id, skip_reason"
)
_REQUEUED = str(requeued_sql(sa.column("attempts", sa.Integer)).compile(compile_kwargs={"literal_binds": True}))
# ... and a claimed row the mark held back goes back to the queue, to be judged again against the ledger
_HOLD_HEAD = (
    f"UPDATE message SET status = {_REQUEUED}, claimed_by = NULL,"
    " lease_until = NULL, next_attempt_at = :later, updated_at = :now WHERE id IN ("
)
_HOLD_TAIL = f") AND claimed_by = :worker AND status = '{_CLAIMED}' RETURNING id"
_MADE_HEAD = "SELECT id, status, skip_reason FROM message WHERE id IN ("
# a group commit tried again (same ``now``) after one whose reply was lost finds what that commit made of its
# rows: marked by this worker, held back (back in the queue until ``later``), or skipped by the re-check
_MADE_TAIL = (
    f") AND updated_at = :now AND (claimed_by = :worker AND status = '{_SENDING}'"
    " OR claimed_by IS NULL AND status IN ('planned', 'retry') AND next_attempt_at = :later"
    f" OR claimed_by IS NULL AND status = '{_SKIPPED}' AND skip_reason IN ({_MARK_SKIPS_SQL}))"
)
MAILBOX_LOCKS = 1265462377
"""PostgreSQL advisory locks (this number, a hash of the mailbox) that serialise marks per mailbox across workers
(two mailboxes with one hash merely wait for each other)."""
_LOCK_MAILBOXES = (
    f"SELECT pg_advisory_xact_lock({MAILBOX_LOCKS}, h) FROM (SELECT DISTINCT hashtext(lower(email)) AS h"
    " FROM message WHERE id = ANY(%(ids)s) ORDER BY h) AS mailboxes"
)
_RECORD_SET = (
    "UPDATE message SET status = :status, skip_reason = :skip_reason, next_attempt_at = :next_attempt_at,"
    " claimed_by = NULL, lease_until = NULL, attempts = attempts - :given_back,"
    # a decision without an attempt (skip, release) keeps the last attempt's reply
    " last_code = COALESCE(:last_code, last_code), last_reply = COALESCE(:last_reply, last_reply),"
    " last_error = COALESCE(:last_error, last_error), sent_at = :sent_at,"
    " template_version = COALESCE(:template_version, template_version), subject = COALESCE(:subject, subject),"
    " updated_at = :updated_at"
)
_RECORD_SQL = _RECORD_SET + f" WHERE id = :id AND claimed_by = :worker AND status IN ('{_CLAIMED}', '{_SENDING}')"
# A row marked `sending` given back to the queue without an attempt (its sender stopped, or cancelled, before the
# first SMTP byte), or whose attempt ended before the message reached the server (``_slot_back``): written alone,
# so the day's quota gets its slot back only if the row was still this worker's and `sending`, and its mark (its
# updated_at before this write: RETURNING gives the new one, the give-back's time) was made on the quota's day.
_MARKED_AT_SQL = f"SELECT updated_at FROM message WHERE id = :id AND claimed_by = :worker AND status = '{_SENDING}'"
_GIVE_BACK_SQL = _RECORD_SET + f" WHERE id = :id AND claimed_by = :worker AND status = '{_SENDING}' RETURNING id"
# The day's quota (``DayQuota``) counted in its rate_limit row, in the group commit's own transaction: locked
# (PostgreSQL; SQLite's write lock is the transaction's) while the marks are made, so workers side by side never mark
# more between them than the day allows.
_QUOTA_ROW_SQL = (
    "INSERT INTO rate_limit (key, tat, day, day_count) VALUES (:key, 0.0, NULL, 0) ON CONFLICT (key) DO NOTHING"
)
_QUOTA_READ_SQL = "SELECT day, day_count FROM rate_limit WHERE key = :key"
_QUOTA_SET_SQL = "UPDATE rate_limit SET day = :day, day_count = :count WHERE key = :key"
# A day the quota's row has not counted yet (its first commit, or the first since a quota was set: with none, marks
# count nothing) starts from the day's marks the ledger shows: its attempts (not a render failure's nor an operator's
# decision's, which no mark preceded), and the rows being sent, marked since the day began (ix_attempt_finished_at;
# ix_message_sending_mailbox, whose condition is this one's). A quota set in the afternoon holds the day's sends to
# it, not that many more. (An attempt that began after midnight from a mark made before counts in both days: a slot
# or two of the new one, on the safe side of the provider's limit.)
_QUOTA_SINCE_SQL = (
    "SELECT (SELECT count(*) FROM attempt WHERE finished_at >= :since AND started_at >= :since"
    f" AND outcome NOT IN ('{Outcome.RENDER_ERROR.value}', '{Outcome.OPERATOR.value}'))"
    f" + (SELECT count(*) FROM message WHERE status = '{_SENDING}' AND updated_at >= :since)"
)
_QUOTA_GIVE_BACK_SQL = (
    "UPDATE rate_limit SET day_count = CASE WHEN day_count > :count THEN day_count - :count ELSE 0 END"
    " WHERE key = :key AND day = :day"
)
_REQUEUED_STATUSES = frozenset({MessageStatus.PLANNED, MessageStatus.RETRY})
_SENT_LATE_OVER = ("planned", "retry", _CLAIMED, MessageStatus.UNCERTAIN.value)
# What the record finds of its rows first: a row this worker no longer holds (its lease lapsed and maintenance, or
# another worker, took it) keeps what happened to it since; only a send, or a refusal of the attempt that left the
# row uncertain, is still written, below.
_STATE_HEAD = "SELECT id, claimed_by, status, attempts FROM message WHERE id IN ("
# A message sent after its lease lapsed: the row says so unless another worker is sending it right now (then
# nothing can help) or it already ended. A row claimed again by another worker stops at that worker's mark.
_LATE_SENT_SQL = (
    f"UPDATE message SET status = '{MessageStatus.SENT.value}', skip_reason = NULL, claimed_by = NULL,"
    " lease_until = NULL, last_code = :last_code, last_reply = :last_reply, last_error = :last_error,"
    " sent_at = :sent_at, template_version = COALESCE(:template_version, template_version),"
    " subject = COALESCE(:subject, subject), updated_at = :updated_at"
    f" WHERE id = :id AND status IN ({', '.join(repr(s) for s in _SENT_LATE_OVER)})"
)
# A refusal heard after the lease lapsed, of the very attempt maintenance then left uncertain (the row's attempts
# still count that mark, so no operator decision or later mark came in between): the mail did not leave, so the
# row takes the outcome as if the worker still held it, instead of waiting for an operator to decide.
_LATE_REFUSED_SQL = _RECORD_SET + (
    f" WHERE id = :id AND status = '{MessageStatus.UNCERTAIN.value}' AND attempts = :attempt_no"
)
_REFUSALS = frozenset({Outcome.TRANSIENT, Outcome.PERMANENT, Outcome.THROTTLED, Outcome.RENDER_ERROR})
"""Outcomes of an attempt that tell the mail did not leave (not ``sent``, not ``ambiguous``)."""
_ATTEMPT_SQL = (
    "INSERT INTO attempt (message_id, attempt_no, worker, started_at, finished_at, outcome, code, reply, error_type)"
    " VALUES (:message_id, :attempt_no, :worker, :started_at, :finished_at, :outcome, :code, :reply, :error_type)"
)
# The claim, one priority at a time: an ordered range of the partial index ix_message_queue (the literal
# status list is what lets SQLite use a partial index). {lock} is PostgreSQL's row lock, {message_id}
# the SQL of core.audiences.message_id_for for rows planned without one. The row takes the customer's address as
# it is now: a customers import that changed it since planning sends the email there, and the ledger says so (the
# address left may be abandoned, or another person's by now).
_CLAIM_SQL = (
    f"UPDATE message SET status = '{_CLAIMED}', claimed_by = :worker, lease_until = :lease_until,"
    " updated_at = :now, message_id = COALESCE(message_id, {message_id}),"
    " email = COALESCE((SELECT customer.email FROM customer WHERE customer.id = message.customer_id), email)"
    " WHERE id IN (SELECT id FROM message WHERE message.status IN ('planned', 'retry') AND priority = :priority"
    " AND next_attempt_at <= :now{{only}} ORDER BY next_attempt_at, id LIMIT :limit{lock})"
    f" AND message.status IN ('planned', 'retry') RETURNING {_CLAIM_RETURNING}"
)
_MESSAGE_ID_SQL = {
    "sqlite": "kembali_message_id(dedupe_key, :domain)",
    "postgresql": "'<' || substr(encode(sha256(convert_to(dedupe_key, 'UTF8')), 'hex'), 1, 32) || '.kembali@'"
    " || :domain || '>'",
}
_SUPPRESS_SQL = (
    "INSERT INTO suppression (email, reason, source, created_at) VALUES (:email, :reason, :source, :created_at)"
    " ON CONFLICT DO NOTHING"
)
# A loyalty spend milestone stored as skipped ``merged`` into an order milestone's email (``plan_sql.loyalty``) that
# was found no longer due when it was to be sent (an earlier order refunded: 4 paid orders, the spend still reached):
# that email is not sent, so the spend milestone goes back to the queue, to be sent on its own (re-checked as any);
# not when an earlier attempt of that email may have arrived (uncertain, then resent by the operator): the spend
# milestone went with it, and would be a second email (maintenance keeps those attempts: ``opstore.merge_guard``).
_UNMERGE_SQL = (
    f"UPDATE message SET status = '{MessageStatus.PLANNED.value}', skip_reason = NULL, next_attempt_at = :now,"
    f" updated_at = :now WHERE dedupe_key = :key AND status = '{MessageStatus.SKIPPED.value}'"
    f" AND skip_reason = '{SkipReason.MERGED.value}' AND NOT EXISTS (SELECT 1 FROM attempt WHERE"
    f" attempt.message_id = :order_id AND attempt.outcome IN ('{Outcome.AMBIGUOUS.value}', '{Outcome.SENT.value}'))"
)
_NAMED = re.compile(r":(\w+)")


def _sqlite_dt(value: datetime | None) -> str | None:
    """An aware datetime as SQLAlchemy's SQLite DATETIME stores it (UTC, ``YYYY-MM-DD HH:MM:SS.ffffff``)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r} given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _as_is(value: datetime) -> datetime:
    return value


def _sqlite_read_dt(value: str) -> datetime:
    """A time as SQLite holds it: Kembali's UTC text; one written by hand with an offset is read at that offset."""
    read = datetime.fromisoformat(value)
    return read.replace(tzinfo=UTC) if read.tzinfo is None else read.astimezone(UTC)


def _pg_read_dt(value: datetime) -> datetime:
    return value.astimezone(UTC)


class _LedgerSql:
    """The statements above in the driver's parameter style, and its datetime conversion."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        # sqlite3 takes :name as is; psycopg takes %(name)s
        self.style: Callable[[str], str] = (
            (lambda sql: sql) if dialect.name == "sqlite" else (lambda sql: _NAMED.sub(r"%(\1)s", sql))
        )
        processor = M.c.updated_at.type.bind_processor(dialect)
        self.dt: Callable[[datetime | None], Any] = (
            _sqlite_dt if dialect.name == "sqlite" else processor if processor is not None else (lambda v: v)
        )
        self.read_dt: Callable[[Any], datetime] = _sqlite_read_dt if dialect.name == "sqlite" else _pg_read_dt
        self.record = self.style(_RECORD_SQL)
        self.late_sent = self.style(_LATE_SENT_SQL)
        self.late_refused = self.style(_LATE_REFUSED_SQL)
        self.attempt = self.style(_ATTEMPT_SQL)
        self.suppress = self.style(_SUPPRESS_SQL)
        self.unmerge = self.style(_UNMERGE_SQL)
        self.marked_at = self.style(_MARKED_AT_SQL)
        self.give_back = self.style(_GIVE_BACK_SQL)
        self.quota_row = self.style(_QUOTA_ROW_SQL)
        self.quota_read = self.style(_QUOTA_READ_SQL + (" FOR UPDATE" if dialect.name == "postgresql" else ""))
        self.quota_set = self.style(_QUOTA_SET_SQL)
        self.quota_since = self.style(_QUOTA_SINCE_SQL)
        self.quota_give_back = self.style(_QUOTA_GIVE_BACK_SQL)
        lock = " FOR UPDATE SKIP LOCKED" if dialect.name == "postgresql" else ""
        self._claim = _CLAIM_SQL.format(message_id=_MESSAGE_ID_SQL[dialect.name], lock=lock)
        self._claim_known_ids = _CLAIM_SQL.format(message_id="NULL", lock=lock)
        self._claims: dict[tuple[bool, int | None], str] = {}
        self.mark_tail = _MARK_TAIL.replace("{since_claim}", _SINCE_CLAIM[dialect.name])
        self.mark_tail_uncapped = _MARK_TAIL_UNCAPPED.replace("{since_claim}", _SINCE_CLAIM[dialect.name])
        planned_order = _PLANNED_ORDER[dialect.name]
        self.skip_head = _SKIP_HEAD.replace("{planned_order}", planned_order)
        self.skip_tail = _SKIP_TAIL.replace("{planned_order}", planned_order)

    def claim(self, *, known_ids: bool, campaigns: int | None) -> str:
        """The claim, for ``campaigns`` campaigns named ``:c0``… (None: of any campaign)."""
        key = (known_ids, campaigns)
        if key not in self._claims:
            only = "" if campaigns is None else f" AND campaign IN ({_placeholders('c', campaigns)})"
            template = self._claim_known_ids if known_ids else self._claim
            self._claims[key] = self.style(template.replace("{only}", only))
        return self._claims[key]

    def _in(self, head: str, count: int, tail: str) -> str:
        return self.style(head + _placeholders("i", count) + tail)

    def mark(self, count: int, *, capped: bool = True) -> str:
        return self._in(_MARK_HEAD, count, self.mark_tail if capped else self.mark_tail_uncapped)

    def skip(self, count: int) -> str:
        return self._in(self.skip_head, count, self.skip_tail)

    def hold(self, count: int) -> str:
        return self._in(_HOLD_HEAD, count, _HOLD_TAIL)

    def made(self, count: int) -> str:
        return self._in(_MADE_HEAD, count, _MADE_TAIL)

    def state(self, count: int) -> str:
        return self._in(_STATE_HEAD, count, ")")

    def attempts_of(self, count: int) -> str:
        return self._in("SELECT message_id, attempt_no, worker, started_at FROM attempt WHERE message_id IN (", count,
                        ")")


@dataclass(frozen=True)
class Marks:
    """What the mark made of the rows it was given; a row in none of ``sending``, ``held`` and ``skipped`` lost its
    lease."""

    sending: frozenset[int] = frozenset()
    """Committed as ``sending``: send them."""
    held: frozenset[int] = frozenset()
    """Held back and put back in the queue (due in ``HELD_SECONDS``): another worker is sending to the
    customer, or sent them something from ``HELD_SECONDS`` before the row was claimed on. The contact policy
    judges them again."""
    skipped: Mapping[int, SkipReason] = field(default_factory=dict)
    """Skipped by the re-check made with the mark (``_RECHECK``), each with its reason: not to be sent, ever."""
    stale: tuple[Stale, ...] = ()
    """Outcomes given for rows the worker no longer held (their lease had lapsed): see ``Stale``."""
    over_quota: frozenset[int] = frozenset()
    """Not marked: the day's quota (``DayQuota``) was spent. Still claimed by the worker, which gives them back to the
    queue until the day after ``quota_day``."""
    quota_day: str | None = None
    """With ``over_quota``: the shop-local day (ISO) whose quota refused them, the one the commit counted its marks
    in (``DayQuota.day``, or a later day the quota's row counted already), whatever the time when they are given
    back."""


def _unsent_release(d: Disposition) -> bool:
    """A row given back to the queue without an attempt: if its mark made it ``sending``, the slot of the day's
    quota that mark took comes back (``Store._record_rows``)."""
    return d.result is None and d.status in _REQUEUED_STATUSES


def _slot_back(d: Disposition) -> bool:
    """An outcome whose message never reached the server: given back unsent (``_unsent_release``), or an attempt that
    ended before it (a connection refused, a greeting, login or MAIL FROM that failed) or was refused as every
    message would be (the sender, this client, the account's limit: ``Disposition.reached_server``). If its
    mark made the row ``sending``, the slot of the day's quota that mark took comes back: a host that cannot reach
    its SMTP server does not spend the day's quota of the workers that can."""
    return _unsent_release(d) or (d.result is not None and not d.reached_server)


@dataclass(frozen=True)
class DayQuota:
    """The day's sending quota, as the group commit counts it: a row marked ``sending`` takes a slot in the same
    transaction as its mark (none is marked once ``limit`` are), and one given back to the queue without an attempt,
    or whose attempt ended before the message reached the server (``_slot_back``), gives its slot back. So the count
    is the day's marks, whatever becomes of a worker (one killed with a batch claimed and not marked took nothing for
    it)."""

    key: str
    """The ``rate_limit`` row that counts it."""
    day: str
    """The shop-local day (ISO) of the commit's ``now``."""
    since: datetime
    """When that day began: a row marked before took a slot of an earlier day, and gives none back to this one."""
    limit: int


@dataclass(frozen=True)
class Stale:
    """An outcome recorded for a row its worker no longer held. The attempt row is written all the same (it
    happened); the message row keeps what was made of it since (``found``), except that a send is written over a
    row that waits, was claimed again or became uncertain (``sent_late``), so it is never sent a second time."""

    message_id: int
    found: str
    """The row's status when the outcome came."""
    sent_late: bool
    refused_late: bool = False
    """The attempt was refused, or its row given back before its first SMTP byte (the mail did not leave), and the row
    was still ``uncertain`` from its mark, as maintenance leaves a row whose lease lapsed while sending: the outcome is
    written over it (``_LATE_REFUSED_SQL``)."""


TOLD_SLACK = timedelta(seconds=2)
"""How far a waiting row's time may be from the one its worker told it (``still_waiting``): the worker told a monotonic
time and wrote the wall clock's."""


class Store:
    def __init__(self, engine: Engine, default_locale: Locale = Locale.ID) -> None:
        self.engine = engine
        self.default_locale = default_locale
        """The shop's language (``shop.default_locale``; a daemon's reload sets it again): a customer's stored
        language with no templates reads as this one."""
        self._sql = _LedgerSql(engine)
        self._local = threading.local()
        self._ledger_connections: list[Any] = []
        """The driver connections the group commit holds (one per thread that commits), closed by ``close``."""

    @classmethod
    def from_url(cls, url: str, default_locale: Locale = Locale.ID) -> Store:
        return cls(db.create_engine(url), default_locale)

    @classmethod
    def for_settings(cls, settings: Settings) -> Store:
        """The Store of the config's database, with its ``[database]`` settings and the shop's language."""
        return cls(db.engine_for(settings), Locale(settings.shop.default_locale))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        for raw in self._ledger_connections:
            with contextlib.suppress(Exception):
                raw.close()  # back to the pool, which dispose() then closes
        self._ledger_connections.clear()
        self.engine.dispose()

    # --- planning -----------------------------------------------------------

    def winback_candidates(
        self, *, cutoff: datetime, after_id: int = 0, limit: int = 1000
    ) -> list[WinbackCandidate]:
        """One keyset batch of customers due a win-back (see core.audiences.is_winback_due):
        exactly one purchase placed before ``cutoff``, consent, not suppressed, no row yet."""
        key = (
            sa.literal("winback:") + _key_part(C.c.external_id) + sa.literal(":") + _key_part(O.c.external_id)
            + sa.literal(":1")
        )
        query = (
            sa.select(C, O.c.external_id.label("order_external_id"))
            .join(O, O.c.id == C.c.first_order_id)
            .where(
                C.c.id > after_id,
                C.c.order_count == 1,
                C.c.first_order_at < cutoff,
                C.c.marketing_consent.is_(True),
                ~suppressed_sql(C.c.email),
                ~sa.exists().where(M.c.dedupe_key == key),
            )
            .order_by(C.c.id)
            .limit(limit)
        )
        with db.reading(self.engine) as conn:
            rows = conn.execute(query).all()
        return [
            WinbackCandidate(
                customer=customer_snapshot(r, self.default_locale),
                first_order_id=r.first_order_id,
                first_order_external_id=r.order_external_id,
                first_order_at=r.first_order_at,
            )
            for r in rows
        ]

    def insert_messages(self, messages: Sequence[PlannedMessage], now: datetime) -> int:
        """Insert planned rows; rows whose dedupe key exists are left alone. Returns rows created."""
        if not messages:
            return 0
        rows = [
            {
                "dedupe_key": m.dedupe_key,
                "campaign": m.campaign,
                "step": m.step,
                "priority": m.priority,
                "customer_id": m.customer_id,
                "email": m.email,
                "status": (MessageStatus.PLANNED if m.skip_reason is None else MessageStatus.SKIPPED).value,
                "skip_reason": None if m.skip_reason is None else m.skip_reason.value,
                "due_at": m.due_at,
                "expires_at": m.expires_at,
                "next_attempt_at": m.due_at,
                "attempts": 0,
                "message_id": m.message_id,
                "payload": json.dumps(m.payload, sort_keys=True),
                "created_at": now,
                "updated_at": now,
            }
            for m in messages
        ]
        created = 0
        stmt = db.insert_ignore(self.engine, M).returning(M.c.id)
        with self.engine.begin() as conn:
            for part in _chunks(rows):
                created += len(conn.execute(stmt, list(part)).all())
        return created

    # --- claiming and sending -----------------------------------------------

    def claim(
        self,
        *,
        worker: str,
        now: datetime,
        limit: int,
        lease_seconds: int,
        domain: str | None = None,
        campaigns: Sequence[str] | None = None,
        held_priorities: Collection[int] = (),
    ) -> list[ClaimedMessage]:
        """Take up to ``limit`` due rows for ``worker`` with a lease, highest priority first, then the oldest
        due; no two workers get the same row. ``domain``: rows planned without a Message-ID get theirs
        (``core.audiences.message_id_for``) as they are claimed. ``campaigns``: only rows of these (the enabled
        ones: a campaign turned off keeps its rows waiting, until it is on again or they expire); None: any.
        ``held_priorities``: priorities not to look at, those of campaigns turned off alone (whose rows the
        campaign filter would otherwise read through, one by one, at every claim).

        One priority at a time (a handful of distinct values), each an ordered range of the partial
        ``ix_message_queue`` index: no claim ever sorts the whole queue, however long it is."""
        sql = self._sql
        params: dict[str, Any] = {
            "worker": worker, "now": sql.dt(now), "lease_until": sql.dt(now + timedelta(seconds=lease_seconds)),
            "domain": domain,
        }  # fmt: skip
        if campaigns is not None:
            if not campaigns:
                return []
            params.update({f"c{n}": name for n, name in enumerate(campaigns)})
        statement = sql.claim(known_ids=domain is None, campaigns=None if campaigns is None else len(campaigns))
        rows: list[Any] = []
        with self.engine.begin() as conn:
            for priority in conn.execute(_WAITING_PRIORITIES).scalars():
                if priority in held_priorities:
                    continue
                params.update(priority=priority, limit=limit - len(rows))
                got = list(conn.exec_driver_sql(statement, params).all())
                got.sort(key=lambda r: (r[11], r[0]))  # RETURNING keeps no order: next_attempt_at, id
                rows += got
                if len(rows) >= limit:
                    break
        read = sql.read_dt
        return [_claimed(r, read) for r in rows]

    def any_due(self, now: datetime, *, campaigns: Sequence[str] | None = None) -> bool:
        """Whether a claim at ``now`` would find a row (of ``campaigns``; None: any): one index seek per priority."""
        due = sa.select(M.c.id).where(WAITING, M.c.next_attempt_at <= now).limit(1)
        if campaigns is not None:
            due = due.where(M.c.campaign.in_(list(campaigns)))
        with db.reading(self.engine) as conn:
            return any(conn.execute(due.where(M.c.priority == priority)).first() is not None
                       for priority in conn.execute(_WAITING_PRIORITIES).scalars())  # fmt: skip

    def due_messages(
        self, *, now: datetime, campaigns: Sequence[str], domain: str, batch_size: int = 1000
    ) -> Iterator[list[ClaimedMessage]]:
        """Rows a claim at ``now`` could take, in keyset batches, without claiming them (preview); a row
        planned without a Message-ID shows the one its claim will give (``message_id_for`` on ``domain``). In the
        order a claim takes them (the one due first first, then by id): of two for one mailbox, the contact policy
        sends the first. With them, the rows a claim finds once ``release_expired_leases`` gave them back (as a
        ``run --once`` does first): those claimed by a worker whose lease lapsed (it died)."""
        given = sa.func.coalesce(M.c.message_id, db.message_id_sql(self.dialect, M.c.dedupe_key, domain))
        # the address the claim will give the row: the customer's as it is now
        to = sa.func.coalesce(sa.select(C.c.email).where(C.c.id == M.c.customer_id).scalar_subquery(), M.c.email)
        computed = {"message_id": given.label("message_id"), "email": to.label("email")}
        read: Callable[[Any], datetime] = _as_is
        if self.dialect == "sqlite":  # read as the claim reads them: a row edited by hand is named, not a traceback
            computed |= {name: sa.type_coerce(M.c[name], sa.Text).label(name) for name in ("due_at", "expires_at")}
            read = self._sql.read_dt
        columns = [computed.get(name, M.c[name]) for name in (n.strip() for n in _CLAIM_RETURNING.split(","))]
        # A claim takes the waiting rows highest priority first, each priority's by due time, then id, along the
        # partial ix_message_queue index: read them so, a keyset range of that index per batch (ordering the queue
        # by due time alone sorted every waiting row at each batch: a minute per 200,000 rows of a big ledger). The
        # rows a dead worker's lapsed lease still holds are few: read once and merged in where a claim finds them.
        def key(row: Any) -> tuple[Any, ...]:
            return -row._k_priority, row._k_next_attempt_at, row._k_id

        lapsed_where = [IN_FLIGHT, M.c.status == _CLAIMED, M.c.lease_until < now, M.c.next_attempt_at <= now]
        lapsed = sorted(self._due_rows(columns, lapsed_where, campaigns=campaigns), key=key)
        rows = heapq.merge(self._waiting_rows(columns, now=now, campaigns=campaigns, batch_size=batch_size), lapsed,
                           key=key)  # fmt: skip
        while batch := list(itertools.islice(rows, batch_size)):
            yield [_claimed(r, read) for r in batch]

    def _waiting_rows(self, columns: Sequence[Any], *, now: datetime, campaigns: Sequence[str],
                      batch_size: int) -> Iterator[Any]:  # fmt: skip
        """The waiting rows of ``campaigns`` due at ``now``, in a claim's order, read ``batch_size`` at a time."""
        with db.reading(self.engine) as conn:
            priorities = list(conn.execute(_WAITING_PRIORITIES).scalars())
        for priority in priorities:
            where = [WAITING, M.c.priority == priority]
            rows = self._due_rows(columns, [*where, M.c.next_attempt_at <= now], campaigns=campaigns, limit=batch_size)
            while rows:
                yield from rows
                last = rows[-1]
                at = sa.bindparam(None, last._k_next_attempt_at, type_=M.c.next_attempt_at.type)
                # after the last row: those due at its time with a greater id, then those due later. Two ranges of
                # the index, not one row-value comparison, which SQLite ranges by the time alone (most rows of a
                # pass share one due time: each batch read them all again from the first); and no bound beside the
                # time's equality, or SQLite ranges by that bound and sorts
                rows = self._due_rows(columns, [*where, M.c.next_attempt_at == at, M.c.id > last._k_id],
                                      campaigns=campaigns, limit=batch_size)  # fmt: skip
                if len(rows) < batch_size:
                    later = [*where, M.c.next_attempt_at > at, M.c.next_attempt_at <= now]
                    rows += self._due_rows(columns, later, campaigns=campaigns, limit=batch_size - len(rows))

    def _due_rows(self, columns: Sequence[Any], where: Sequence[Any], *, campaigns: Sequence[str],
                  limit: int | None = None) -> list[Any]:  # fmt: skip
        """The rows of ``campaigns`` that ``where`` picks, by due time then id (at most ``limit``), each with its
        claim order's columns (``_k_priority``, ``_k_next_attempt_at``, ``_k_id``)."""
        order = (M.c.next_attempt_at, M.c.id)
        query = (
            sa.select(*columns, *(c.label(f"_k_{c.name}") for c in (M.c.priority, *order)))
            .where(*where, M.c.campaign.in_(list(campaigns)))
            .order_by(*order)
            .limit(limit)
        )
        with db.reading(self.engine) as conn:
            return list(conn.execute(query).all())

    def record_and_mark(
        self,
        dispositions: Sequence[Disposition],
        ids: Sequence[int],
        *,
        worker: str,
        now: datetime,
        quota: DayQuota | None = None,
        capped: bool = True,
    ) -> Marks:
        """``record`` and ``mark_sending`` in ONE transaction (one commit for the group commit).

        On a driver connection this thread keeps for it, with the statements as driver SQL: the group
        commit runs hundreds of times a second, and SQLAlchemy's per-transaction and per-statement
        machinery cost more than SQLite's own work. A failure rolls back and drops that connection, so the
        caller may try again, with the same ``now``: outcomes it finds already written (the commit went
        through, its reply was lost) are left alone, and rows it finds marked or held back by this worker at
        ``now`` are given as such. The marks come back with the outcomes given for rows the worker no longer held
        (``Marks.stale``).

        With ``quota``, the day's quota is counted in the same transaction: each row marked takes a slot, those the
        quota leaves no slot for are not marked (``Marks.over_quota``), and a ``sending`` row given back to the
        queue without an attempt, or whose attempt never reached the server, gives its slot back (``_slot_back``).

        ``capped``: whether the contact policy has a frequency cap; without one the mark holds a row back only for
        the news week (``_MARK_TAIL_UNCAPPED``)."""
        raw = self._ledger_connection()
        cursor = raw.cursor()
        try:
            if self.dialect == "sqlite":
                cursor.execute("BEGIN IMMEDIATE")  # the one write lock: every check below sees the others' marks
            elif ids:
                # every mailbox of the marks, before anything else and in one ascending order, so two
                # workers' group commits cannot wait on each other in a circle
                cursor.execute(_LOCK_MAILBOXES, {"ids": sorted(set(ids))})
                cursor.fetchall()
            if self.dialect != "sqlite" and quota is not None and (ids or any(map(_slot_back, dispositions))):
                # the quota's row next, before any message row: a commit that writes a row another worker has
                # claimed since (a late outcome) and then waits for the quota would otherwise deadlock with
                # that worker's commit, holding the quota and marking the same row
                self._quota_used(cursor, quota, 0)
            stale, given_back = self._record_rows(cursor, dispositions, now, quota) if dispositions else ((), 0)
            marked = Marks()
            if ids:
                marked = self._mark_rows(cursor, ids, worker=worker, now=now, quota=quota, given_back=given_back,
                                         capped=capped)  # fmt: skip
            elif given_back and quota is not None:
                cursor.execute(self._sql.quota_give_back, {"key": quota.key, "day": quota.day, "count": given_back})
            if stale:
                marked = replace(marked, stale=stale)
            raw.commit()
        except BaseException as exc:
            db.note_failure(self.engine, exc, "(the group commit: outcomes and sending marks)")
            self._drop_ledger_connection(raw)
            raise
        finally:
            cursor.close()
        return marked

    def _ledger_connection(self) -> Any:
        raw = getattr(self._local, "ledger", None)
        if raw is None:
            raw = self._local.ledger = self.engine.raw_connection()
            self._ledger_connections.append(raw)
        return raw

    def _drop_ledger_connection(self, raw: Any) -> None:
        self._local.ledger = None
        with contextlib.suppress(Exception):
            raw.rollback()
        with contextlib.suppress(Exception):
            raw.invalidate()  # it may be broken: the next group opens a fresh one
        with contextlib.suppress(ValueError):
            self._ledger_connections.remove(raw)

    def _mark_rows(
        self,
        cursor: Any,
        ids: Sequence[int],
        *,
        worker: str,
        now: datetime,
        quota: DayQuota | None = None,
        given_back: int = 0,
        capped: bool = True,
    ) -> Marks:
        sql = self._sql
        mark = functools.partial(sql.mark, capped=capped)
        common = {"now": sql.dt(now), "worker": worker, "later": sql.dt(now + timedelta(seconds=HELD_SECONDS))}
        skipped = {row[0]: SkipReason(row[1]) for row in self._select_in(cursor, sql.skip, ids, common)}
        rest = set(ids) - skipped.keys()
        over: set[int] = set()
        day: str | None = None
        if quota is None:
            sending = {row[0] for row in self._select_in(cursor, mark, rest, common)}
        else:
            day, used = self._quota_used(cursor, quota, given_back)
            # in the order the senders asked, as many as the day has slots left; a row the mark leaves (held back,
            # lease lost) takes none, so the next ones are tried in its place
            waiting = [i for i in dict.fromkeys(ids) if i in rest]
            sending = set()
            while waiting and used < quota.limit:
                part, waiting = waiting[: quota.limit - used], waiting[quota.limit - used :]
                marked_now = {row[0] for row in self._select_in(cursor, mark, part, common)}
                sending |= marked_now
                used += len(marked_now)
            over = set(waiting)
            cursor.execute(sql.quota_set, {"key": quota.key, "day": day, "count": used})
        rest -= sending | over
        held = {row[0] for row in self._select_in(cursor, sql.hold, rest, common)}
        # none of these: the lease was lost, or this is a retry and the lost commit marked, held or skipped them
        # (its marks counted in the day's quota by that commit)
        for message_id, status, reason in self._select_in(cursor, sql.made, (rest | over) - held, common):
            over.discard(message_id)
            if status == _SKIPPED:
                skipped[message_id] = SkipReason(reason)
            else:
                (sending if status == _SENDING else held).add(message_id)
        return Marks(frozenset(sending), frozenset(held), skipped, over_quota=frozenset(over),
                     quota_day=day if over else None)  # fmt: skip

    def throttled_in_row(self, message_id: int, most: int = 32) -> int:
        """How many of the message's latest attempts in a row were throttled (a "slow down": not counted against
        ``sending.max_attempts``), at most ``most``: what spaces out its next try (``lifecycle.after_attempt``)."""
        with db.reading(self.engine) as conn:
            outcomes = conn.execute(
                sa.select(A.c.outcome).where(A.c.message_id == message_id).order_by(A.c.id.desc()).limit(most)
            ).scalars()
            return sum(1 for _ in itertools.takewhile(lambda outcome: outcome == Outcome.THROTTLED, outcomes))

    def quota_spent(self, key: str, day: str, since: datetime) -> int:
        """The slots of the shop-local ``day``'s quota (beginning at ``since``) its commits have taken, read only: the
        quota row's count of that day, or, before a commit of it counted any (a quota set during the day), what the
        first will count, the day's sends so far in the ledger (``_quota_used``)."""
        with db.reading(self.engine) as conn:
            limits = RateLimit.__table__  # type: ignore[attr-defined]
            row = conn.execute(sa.select(limits.c.day, limits.c.day_count).where(limits.c.key == key)).first()
            if row is not None and row.day is not None and row.day >= day:
                return int(row.day_count) if row.day == day else 0
            return int(conn.exec_driver_sql(self._sql.quota_since, {"since": self._sql.dt(since)}).scalar_one())

    def _quota_used(self, cursor: Any, quota: DayQuota, given_back: int) -> tuple[str, int]:
        """(the day the commit's marks count in, the slots of it taken so far, less ``given_back``); the quota's row
        locked until the commit. That day is ``quota``'s, or a later one the row counts already: a commit whose
        ``now`` was taken before local midnight (it waited for the lock, was tried again, or its host's clock is
        behind another worker's) counts its marks in the new day rather than start that day's count again (ISO
        days sort as strings)."""
        cursor.execute(self._sql.quota_row, {"key": quota.key})
        cursor.execute(self._sql.quota_read, {"key": quota.key})
        day, count = cursor.fetchone()
        if day is not None and day > quota.day:
            return day, count  # (what this commit gives back was counted by the earlier day, if at all)
        if day != quota.day:  # not counted yet: the ledger's (the rows given back in this commit are no marks there)
            cursor.execute(self._sql.quota_since, {"since": self._sql.dt(quota.since)})
            return quota.day, int(cursor.fetchone()[0])
        return quota.day, max(0, count - given_back)

    def mark_sending(self, ids: Sequence[int], *, worker: str, now: datetime) -> set[int]:
        """Commit ``sending`` for rows this worker still holds; returns the ids marked.
        A row not returned must not be sent: its lease was lost, it was held back or skipped by the re-check
        (``record_and_mark``'s ``Marks.held`` and ``Marks.skipped``)."""
        return set(self.record_and_mark([], ids, worker=worker, now=now).sending) if ids else set()

    def record(self, dispositions: Sequence[Disposition]) -> None:
        """Write outcomes and attempt rows, in one transaction."""
        if dispositions:
            self.record_and_mark(dispositions, [], worker="", now=min(d.finished_at for d in dispositions))

    def _select_in(
        self, cursor: Any, statement: Callable[[int], str], ids: Iterable[int], params: Mapping[str, Any] | None = None
    ) -> list[Any]:
        """The rows ``statement`` (an ``_LedgerSql`` … IN (…) statement, a query or an UPDATE … RETURNING)
        returns for ``ids``, _CHUNK ids a statement, with ``params`` besides."""
        rows: list[Any] = []
        for part in _chunks(sorted(set(ids))):
            cursor.execute(statement(len(part)), {**{f"i{n}": i for n, i in enumerate(part)}, **(params or {})})
            rows += cursor.fetchall()
        return rows

    def _record_rows(
        self, cursor: Any, dispositions: Sequence[Disposition], now: datetime, quota: DayQuota | None = None
    ) -> tuple[tuple[Stale, ...], int]:
        """Write the outcomes; returns those for rows no longer held (``Stale``) and the slots of ``quota``'s day
        that ``sending`` rows whose message never reached the server give back (``_slot_back``). A row's
        ``updated_at`` is when its outcome is written (``now``, the commit's), not when the attempt ended: an outcome
        written minutes late (the database away, kept for the next run) holds back another worker's mark to the
        mailbox, whose facts could not see it (``_MARK_TAIL``)."""
        dt = self._sql.dt
        # each row's (claimed_by, status): an outcome is written as usual only over a row its worker still holds
        ids = [d.message.id for d in dispositions]
        rows_now = self._select_in(cursor, self._sql.state, ids)
        state = {r[0]: (r[1], r[2]) for r in rows_now}
        marks = {r[0]: r[3] for r in rows_now}  # each row's attempts: the marks it has had
        found = [state.get(i, (None, "gone")) for i in ids]
        in_flight = (_CLAIMED, _SENDING)
        held = [by == d.worker and status in in_flight for d, (by, status) in zip(dispositions, found, strict=True)]
        # a group commit retried after a commit whose reply was lost finds its own outcomes written: skip those (each
        # known by when it began too: an attempt not counted, before RCPT TO, gave the next one its number): as
        # written, SQLite's text; PostgreSQL's read as UTC, as it gives it in the session's time zone, where Python
        # finds no time of a repeated hour equal to its UTC twin
        lost = [i for i, mine in zip(ids, held, strict=True) if not mine]
        began = self._sql.read_dt if self.dialect == "postgresql" else _as_is
        written = {(r[0], r[1], r[2], began(r[3])) for r in self._select_in(cursor, self._sql.attempts_of, lost)}
        stale: list[Stale] = []
        late_sent: list[dict[str, Any]] = []
        late_refused: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        give_back: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        suppressions: list[dict[str, Any]] = []
        unmerge: list[dict[str, Any]] = []
        for d, (claimed_by, status), mine in zip(dispositions, found, held, strict=True):
            res = d.result
            finished = dt(d.finished_at)
            attempt_no = d.message.attempts + 1  # this attempt's: the row's attempts count its mark
            if d.suppress_reason is not None:
                source = f"smtp:{d.message.dedupe_key}"[:100]
                suppressions.append(
                    {"email": suppression_address(d.message.email), "reason": d.suppress_reason, "source": source,
                     "created_at": finished}
                )
            row = {
                "id": d.message.id,
                "worker": d.worker,
                "given_back": 0 if d.counts_as_attempt else 1,
                "status": d.status.value,
                "skip_reason": d.skip_reason.value if d.skip_reason else None,
                "next_attempt_at": dt(d.next_attempt_at or d.message.due_at),
                "last_code": res.code if res else None,
                "last_reply": (res.reply[:500] if res else None),
                "last_error": (res.error_type[:500] or None) if res else None,
                # an uncertain send may have arrived: the frequency cap counts it (sent_times) as a send
                "sent_at": finished if d.status in (MessageStatus.SENT, MessageStatus.UNCERTAIN) else None,
                "template_version": d.template_version,
                "subject": d.subject[:400] if d.subject else None,
                "updated_at": dt(max(d.finished_at, now)),
            }
            if mine and quota is not None and status == _SENDING and _slot_back(d):
                give_back.append(row)  # marked, never reached the server: its slot of the day's quota comes back
            elif mine:
                updates.append(row)
                carried = d.message.payload.get("carries")
                if d.skip_reason is SkipReason.NO_LONGER_DUE and isinstance(carried, str):
                    unmerge.append({"key": carried, "now": dt(now), "order_id": d.message.id})
            elif (
                (d.message.id, attempt_no, d.worker, dt(d.started_at)) in written
                if res is not None
                else claimed_by is None and status == d.status.value
            ):
                continue
            else:
                late = d.status is MessageStatus.SENT and status in _SENT_LATE_OVER
                # a row its mark made `sending` given back before its first SMTP byte (waiting for its rate slot when
                # the run stopped or failed): the mail did not leave either
                unsent = _unsent_release(d) and not d.counts_as_attempt
                # this worker's attempt was refused (or never begun), and the row is still uncertain from its mark
                refused = ((unsent or (res is not None and res.outcome in _REFUSALS))
                           and status == MessageStatus.UNCERTAIN.value
                           and marks.get(d.message.id) == attempt_no)  # fmt: skip
                stale.append(Stale(d.message.id, status, sent_late=late, refused_late=refused))
                if late:
                    late_sent.append(row)
                elif refused:
                    note = ("never sent: given back after its lease lapsed" if unsent
                            else "refused; heard after the lease lapsed")  # fmt: skip
                    late_refused.append({**row, "attempt_no": attempt_no, "last_error": row["last_error"] or note})
            if res is not None:
                attempts.append(
                    {
                        "message_id": d.message.id,
                        "attempt_no": attempt_no,
                        "worker": d.worker,
                        "started_at": dt(d.started_at),
                        "finished_at": finished,
                        "outcome": res.outcome.value,
                        "code": res.code,
                        "reply": res.reply[:500],
                        "error_type": res.error_type[:100],
                    }
                )
        if updates:
            cursor.executemany(self._sql.record, updates)
        if unmerge:
            cursor.executemany(self._sql.unmerge, unmerge)
        given_back = 0
        for row in give_back:  # seldom (a stop, a cancelled run): one by one, counting the rows still `sending`
            assert quota is not None
            cursor.execute(self._sql.marked_at, {"id": row["id"], "worker": row["worker"]})
            marked = [self._sql.read_dt(at) for (at,) in cursor.fetchall()]
            cursor.execute(self._sql.give_back, row)
            if cursor.fetchall() and marked and marked[0] >= quota.since:
                given_back += 1  # marked on the quota's day: a row marked the day before took none of its slots
        if late_sent:
            cursor.executemany(self._sql.late_sent, late_sent)
        if late_refused:
            cursor.executemany(self._sql.late_refused, late_refused)
        if attempts:
            cursor.executemany(self._sql.attempt, attempts)
        if suppressions:
            cursor.executemany(self._sql.suppress, suppressions)
        return tuple(stale), given_back

    def database_now(self) -> datetime | None:
        """The database server's clock (PostgreSQL's ``clock_timestamp()``), to compare a worker's with: None on
        SQLite, whose file, and so every process writing it, is on this host and reads its clock."""
        if self.dialect == "sqlite":
            return None
        with self.engine.connect() as conn:
            now: datetime = conn.execute(sa.text("SELECT clock_timestamp()")).scalar_one()
        return now

    def waiting_for_domain(self, domain: str, now: datetime, limit: int = 100_000) -> list[datetime]:
        """When the messages to ``domain`` that wait in the queue to fall due after ``now`` (nobody holds them) fall
        due, soonest first, at most ``limit``: those sent back to wait for its rate slots, by any worker, and those
        the contact policy deferred. No index serves the domain: SQLite scans every waiting row, PostgreSQL the
        whole table (1.2M rows waiting after a first planning pass, 200k of them due later: 0.5-1.9 s on SQLite,
        0.3-0.7 s on PostgreSQL, on the one database thread), so a process asks once per slow domain. Read one
        priority at a time as ordered ranges of ``ix_message_queue`` (December 2026, 1.33M rows, 177k due later): no
        faster on SQLite, whose plan already skip-scans that index after ``ANALYZE`` (1.6-2.4 s against 1.6-2.0 s under
        load, the row lookups for ``email`` dominate), 2-3.6 times slower on PostgreSQL (0.75-0.8 s against 1.5-2.9 s):
        only an index of the waiting rows by recipient domain would serve it (a migration)."""
        pattern = "%@" + domain.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = (
            sa.select(M.c.next_attempt_at)
            .where(WAITING, M.c.claimed_by.is_(None), M.c.next_attempt_at > now,
                   sa.func.lower(M.c.email).like(pattern, escape="\\"))
            .order_by(M.c.next_attempt_at)
            .limit(limit)
        )  # fmt: skip
        with db.reading(self.engine) as conn:
            return [at if at.tzinfo else at.replace(tzinfo=UTC) for at in conn.execute(query).scalars()]

    def still_waiting(self, told: Mapping[int, datetime], *, now: datetime, worker: str) -> set[int]:
        """Of ``told`` (the messages ``worker`` told to wait for their domain's slot, and the time each was told),
        those that still wait in the queue to fall due after ``now`` at that time (within ``TOLD_SLACK`` of it; nobody
        holds them), or that ``worker`` holds (the release that sends one back to wait may not be written yet): not
        one an operator cancelled, nor one come due, claimed, sent or deferred to another time (the contact policy)
        since. A read by primary key."""
        found: set[int] = set()
        query = sa.select(M.c.id, M.c.status, M.c.claimed_by, M.c.next_attempt_at)
        with db.reading(self.engine) as conn:
            for part in _chunks(sorted(told)):
                for row in conn.execute(query.where(M.c.id.in_(part))):
                    at = row.next_attempt_at if row.next_attempt_at.tzinfo else row.next_attempt_at.replace(tzinfo=UTC)
                    expected = told[row.id]
                    slack = TOLD_SLACK + abs(expected - now) / 1000  # the host's clocks drift apart (NTP slews them)
                    if row.claimed_by == worker or (row.status in ("planned", "retry") and row.claimed_by is None
                                                    and at > now and abs(at - expected) <= slack):  # fmt: skip
                        found.add(row.id)
        return found

    def bring_forward(self, moves: Mapping[int, datetime]) -> int:
        """Make each row of ``moves`` due at its new time, if it still waits in the queue (nobody holds it) to fall due
        later than that: the messages a worker told to wait for their domain's slot, whose rate a reload raised.
        Never later: a row an operator, another worker or the contact policy made due later keeps that. Returns the rows
        moved."""
        if not moves:
            return 0
        dt = sa.bindparam("at", type_=M.c.next_attempt_at.type)
        query = (
            sa.update(M)
            .where(M.c.id == sa.bindparam("row"), WAITING, M.c.claimed_by.is_(None), M.c.next_attempt_at > dt)
            .values(next_attempt_at=dt)
        )
        with self.engine.begin() as conn:
            params = [{"row": row, "at": at} for row, at in moves.items()]
            return int(conn.execute(query, params).rowcount)

    def renew_leases(
        self, *, worker: str, now: datetime, lease_seconds: int, ids: Iterable[int] | None = None
    ) -> int:
        """Push the lease of every row ``worker`` holds (claimed or sending), or of those of ``ids`` it holds, to
        ``lease_seconds`` from ``now``: a run that holds rows longer than one lease (a slow rate, a long queue, a
        slow server) keeps them as long as it is alive, while a dead worker's rows still lapse, and so do the rows
        an earlier run of a live worker left behind when it failed (the run names its own). Returns the rows
        renewed."""
        until = now + timedelta(seconds=lease_seconds)
        mine = sa.and_(IN_FLIGHT, M.c.claimed_by == worker)
        with self.engine.begin() as conn:
            if ids is None:
                return int(conn.execute(sa.update(M).where(mine).values(lease_until=until)).rowcount)
            return sum(
                int(conn.execute(sa.update(M).where(mine, M.c.id.in_(part)).values(lease_until=until)).rowcount)
                for part in _chunks(sorted(set(ids)))
            )

    def release_expired_leases(self, now: datetime, *, keep: Collection[int] = ()) -> tuple[int, int]:
        """Claimed rows whose lease lapsed go back to the queue; sending rows become uncertain; but not the rows
        of ``keep`` (those the calling process still works on: it is alive, whatever their leases say).
        Returns (requeued, uncertain)."""
        lapsed = sa.and_(IN_FLIGHT, M.c.lease_until < now)
        why = lapsed_note()
        if not keep:
            return self.release(lapsed, now=now, why=why)
        # the kept rows are left out here, not by a NOT IN (…) of them: a run of a large sending.batch_size holds
        # more rows than PostgreSQL takes parameters in one statement (65,535), and maintenance failed while it ran
        with db.reading(self.engine) as conn:
            ids = sorted(set(conn.execute(sa.select(M.c.id).where(lapsed)).scalars()) - set(keep))
        requeued = uncertain = 0
        for part in _chunks(ids):
            more = self.release(sa.and_(lapsed, M.c.id.in_(part)), now=now, why=why)
            requeued, uncertain = requeued + more[0], uncertain + more[1]
        return requeued, uncertain

    def release(self, where: Any, *, now: datetime, why: Any) -> tuple[int, int]:
        """Of the rows matching ``where``: claimed ones go back to the queue (no SMTP byte was sent),
        ``sending`` ones become uncertain (the mail may have left), noted ``why`` (a text, or an SQL expression of
        the row). Returns (requeued, uncertain)."""
        with self.engine.begin() as conn:
            requeued = conn.execute(
                sa.update(M)
                .where(where, M.c.status == MessageStatus.CLAIMED.value)
                .values(
                    status=requeued_sql(M.c.attempts),
                    claimed_by=None,
                    lease_until=None,
                    updated_at=now,
                )
            ).rowcount
            uncertain = conn.execute(
                sa.update(M)
                .where(where, M.c.status == MessageStatus.SENDING.value)
                .values(
                    status=MessageStatus.UNCERTAIN.value,
                    sent_at=M.c.updated_at,  # its mark's time, right before its send: the cap counts it from then
                    last_error=why[:500] if isinstance(why, str) else why,
                    claimed_by=None,
                    lease_until=None,
                    updated_at=now,
                )
            ).rowcount
        return int(requeued), int(uncertain)

    def sent_times(
        self, addresses: Iterable[str], *, since: datetime, campaign: str | None = None
    ) -> dict[str, list[datetime]]:
        """When each address's mailbox (``domain.mailbox``) was sent email (any campaign, or ``campaign``'s
        only; any customer record) since ``since``: what caps count. Keyed by mailbox. An ``uncertain`` message
        counts (its ``sent_at`` is when it may have left): it may have arrived, and an operator who closes it as
        failed, or resends it, clears that time."""
        boxes = sorted({mailbox(a) for a in addresses})
        out: dict[str, list[datetime]] = {box: [] for box in boxes}
        lowered = sa.func.lower(M.c.email)
        with db.reading(self.engine) as conn:
            for part in _chunks(boxes):
                query = sa.select(lowered, M.c.sent_at).where(
                    lowered.in_(part), M.c.sent_at.is_not(None), M.c.sent_at >= since
                )
                if campaign is not None:
                    query = query.where(M.c.campaign == campaign)
                for box, sent_at in conn.execute(query):
                    out[box].append(sent_at)
        return out

    def due_ahead(
        self, addresses: Iterable[str], *, campaign: str, priority: int, after: datetime, until: datetime
    ) -> dict[str, list[tuple[datetime, datetime]]]:
        """When ``campaign``'s messages waiting for these addresses' mailboxes fall due and expire, for those due
        in ``(after, until]`` (a birthday planned ahead of its window): keyed by mailbox. Read through the queue
        index (the campaign's priority and a short span of due times), so it costs a handful of rows."""
        boxes = {mailbox(a) for a in addresses}
        out: dict[str, list[tuple[datetime, datetime]]] = {}
        query = sa.select(sa.func.lower(M.c.email), M.c.next_attempt_at, M.c.expires_at).where(
            WAITING, M.c.priority == priority, M.c.next_attempt_at > after, M.c.next_attempt_at <= until,
            M.c.campaign == campaign,
        )  # fmt: skip
        with db.reading(self.engine) as conn:
            for box, due, expires in conn.execute(query):
                if box in boxes:
                    out.setdefault(box, []).append((due, expires))
        return out

    # --- facts for the send-time re-check and for rendering -----------------

    def send_time_facts(self, customer_ids: Iterable[int]) -> dict[int, SendTimeFacts]:
        ids = sorted(set(customer_ids))
        facts: dict[int, SendTimeFacts] = {}
        with db.reading(self.engine) as conn:
            for part in _chunks(ids):
                query = sa.select(
                    C, suppressed_sql(C.c.email).label("suppressed")
                ).where(C.c.id.in_(part))
                for r in conn.execute(query):
                    facts[r.id] = SendTimeFacts(
                        customer=customer_snapshot(r, self.default_locale),
                        suppressed=bool(r.suppressed),
                        order_count=r.order_count,
                        last_order_at=r.last_order_at,
                        first_order_id=r.first_order_id,
                        first_order_at=r.first_order_at,
                        total_spent_minor=r.total_spent_minor,
                    )
        for missing in set(ids) - facts.keys():
            facts[missing] = SendTimeFacts(customer=None, suppressed=False, order_count=0, last_order_at=None)
        return facts

    def paid_totals(self, customer_ids: Iterable[int], currency: str) -> dict[int, tuple[int, int]]:
        """Each customer's orders paid (paid, shipped, delivered) and what those in ``currency`` add up to: what a
        loyalty milestone counts (customers without one are left out)."""
        ids = sorted(set(customer_ids))
        out: dict[int, tuple[int, int]] = {}
        # exact past what a BIGINT holds: orders an older import stored may add up that far (db.sum_halves)
        spent = db.sum_halves(sa.case((O.c.currency == currency, O.c.total_minor), else_=0))
        with db.reading(self.engine) as conn:
            for part in _chunks(ids):
                query = (
                    sa.select(O.c.customer_id, sa.func.count(), *spent)
                    .where(O.c.customer_id.in_(part), O.c.status.in_(RATEABLE))
                    .group_by(O.c.customer_id)
                )
                for customer_id, count, high, low in conn.execute(query):
                    out[customer_id] = (int(count), db.joined(high, low))
        return out

    def order_products(self, order_ids: Iterable[int]) -> dict[int, list[ProductView]]:
        """The products on each order, in line order."""
        ids = sorted(set(order_ids))
        out: dict[int, list[ProductView]] = {i: [] for i in ids}
        with db.reading(self.engine) as conn:
            for part in _chunks(ids):
                query = (
                    sa.select(L.c.order_id, P)
                    .join(P, P.c.id == L.c.product_id)
                    .where(L.c.order_id.in_(part))
                    .order_by(L.c.order_id, L.c.line_no)
                )
                for r in conn.execute(query):
                    out[r.order_id].append(product_view(r))
        return out

    def suppressed_among(self, emails: Iterable[str]) -> set[str]:
        """Those of these addresses on the suppression list, as ``suppression_address`` gives them."""
        boxes = sorted({suppression_address(e) for e in emails})
        out: set[str] = set()
        with db.reading(self.engine) as conn:
            for part in _chunks(boxes):
                out.update(conn.execute(sa.select(S.c.email).where(S.c.email.in_(part))).scalars())
        return out

    def rateable_among(self, orders: Iterable[tuple[int, int]]) -> dict[int, datetime]:
        """Those of these orders (each with the customer a feedback request asks about it) the request may still
        ask about: paid, shipped or delivered, and still that customer's (an import may have given it to another
        since: accounts merged, a correction), each with when it settled (delivered, else placed) as the shop's
        data says now: an import may have given a delivery time since the request was planned."""
        asked = set(orders)
        out: dict[int, datetime] = {}
        settled = sa.func.coalesce(O.c.settled_at, O.c.placed_at, type_=UTCDateTime())
        with db.reading(self.engine) as conn:
            for part in _chunks(sorted({order_id for order_id, _ in asked})):
                query = sa.select(O.c.id, O.c.customer_id, settled).where(O.c.id.in_(part), O.c.status.in_(RATEABLE))
                out.update((order_id, at) for order_id, customer_id, at in conn.execute(query)
                           if (order_id, customer_id) in asked)  # fmt: skip
        return out

    def catalogue(self, launched_by: datetime) -> list[tuple[ProductView, int]]:
        """Active products launched by ``launched_by`` (or with no launch time), with their units sold, best sellers
        first. A product products.csv gives a later launch time (announced ahead, its page not live yet) is in no
        email's recommendations or best sellers before then."""
        sold = (
            sa.select(L.c.product_id, sa.func.sum(L.c.quantity).label("units"))
            .join(O, O.c.id == L.c.order_id)
            .where(O.c.status.not_in(PURCHASE_EXCLUDED))
            .group_by(L.c.product_id)
            .subquery()
        )
        query = (
            sa.select(P, sa.func.coalesce(sold.c.units, 0).label("units"))
            .outerjoin(sold, sold.c.product_id == P.c.id)
            .where(P.c.active.is_(True), sa.or_(P.c.launched_at.is_(None), P.c.launched_at <= launched_by))
            .order_by(sa.desc("units"), P.c.id)
        )
        with db.reading(self.engine) as conn:
            return [(replace(product_view(r), sold=int(r.units)), int(r.units)) for r in conn.execute(query)]

    def customer_by_external_id(self, external_id: str) -> tuple[CustomerSnapshot, int | None, str | None] | None:
        """A customer with their first order's id and shop id (for test sends), or None."""
        query = (
            sa.select(C, O.c.external_id.label("order_external_id"))
            .outerjoin(O, O.c.id == C.c.first_order_id)
            .where(C.c.external_id == external_id)
        )
        with db.reading(self.engine) as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return customer_snapshot(row, self.default_locale), row.first_order_id, row.order_external_id

    # --- suppressions --------------------------------------------------------

    def suppress(self, email: str, *, reason: str, source: str, now: datetime) -> bool:
        """Add an address to the suppression list; False if it was already there."""
        stmt = (
            db.insert_ignore(self.engine, S)
            .values(email=suppression_address(email), reason=reason, source=source, created_at=now)
            .returning(S.c.id)
        )
        with self.engine.begin() as conn:
            return conn.execute(stmt).first() is not None

    # --- reports -------------------------------------------------------------

    def status_counts(self, campaign: str | None = None) -> dict[tuple[str, str, str | None], int]:
        """(campaign, status, skip reason) → rows."""
        query = sa.select(M.c.campaign, M.c.status, M.c.skip_reason, sa.func.count()).group_by(
            M.c.campaign, M.c.status, M.c.skip_reason
        )
        if campaign:
            query = query.where(M.c.campaign == campaign)
        with db.reading(self.engine) as conn:  # a count of the whole ledger: no SQLite write lock while it runs
            return {(c, s, r): n for c, s, r, n in conn.execute(query)}

    def messages(self, *, statuses: Sequence[str] = (), limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(M).order_by(M.c.id).limit(limit)
        if statuses:
            query = query.where(M.c.status.in_(statuses))
        with db.reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def attempts_for(self, message_row_id: int) -> list[dict[str, Any]]:
        query = sa.select(A).where(A.c.message_id == message_row_id).order_by(A.c.id)
        with db.reading(self.engine) as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

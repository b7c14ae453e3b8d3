"""SQLModel tables: the shop's data, the message ledger, attempts, suppressions.

Datetimes are stored as UTC and come back aware (``UTCDateTime``); money is an
integer in the currency's minor unit. ORM objects never leave the adapters:
the store turns rows into the plain values of ``worker.domain``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from worker.errors import LedgerRowError


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on SQLite and PostgreSQL alike."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True
    where = ""
    """``table.column`` of the column it types (set below, for every table), for the error naming a value there."""

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        """On SQLite, where a date and time is text anyone can write: one Kembali never writes (a row edited by
        hand) is said as such, with its value, not Python's traceback of ``Invalid isoformat string``."""
        read = super().result_processor(dialect, coltype)
        if read is None or dialect.name != "sqlite":
            return read

        def process(value: Any) -> datetime | None:
            try:
                result: datetime | None = read(value)
            except (TypeError, ValueError, OverflowError) as exc:
                place = f"{where} holds" if (where := self.where) else "the database holds"
                raise LedgerRowError(
                    f"{place} {str(value)[:40]!r} where a date and time belongs (a row edited by hand?): "
                    "Kembali writes them as '2026-11-22 03:00:00.000000', in UTC; correct it, then try again"
                ) from exc
            return result

        return process


_PAID_LATE = sa.text("last_paid_at > last_order_at")


def _dt(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime(), **kw)


class Customer(SQLModel, table=True):
    __tablename__ = "customer"
    __table_args__ = (
        sa.Index("ix_customer_winback", "order_count", "first_order_at"),
        sa.Index("ix_customer_birthday", "birthday_mmdd", "id"),
        sa.Index("ix_customer_last_order", "last_order_at", "id"),
        # migration 0018: the records of a mailbox (lower(email)), whose birthday offers to come the send path holds
        # a lesser message back for (in place of an index on email as typed, which no query used)
        sa.Index("ix_customer_mailbox", sa.text("lower(email)")),
        # migration 0019: the customers whose last payment came after their last order was placed (an order paid
        # in a later import than the one that brought it): loyalty's candidates beside ix_customer_last_order
        sa.Index("ix_customer_paid_late", "last_paid_at", sqlite_where=_PAID_LATE, postgresql_where=_PAID_LATE),
    )

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=100, unique=True)
    email: str = Field(max_length=320)
    name: str = Field(max_length=200)
    locale: str = Field(max_length=5, default="id")
    time_zone: str = Field(max_length=64, default="Asia/Jakarta")
    birthday: date | None = None
    birthday_mmdd: int | None = None
    """month * 100 + day of ``birthday`` (229 for 29 February), indexed for the birthday query."""
    marketing_consent: bool = False
    consent_basis: str = Field(default="", max_length=64)
    consent_source: str = Field(default="", max_length=64)
    # Denormalised from orders (refreshed by the store after every order import),
    # so audience queries are keyset scans over one table.
    order_count: int = 0
    """Orders that count as purchases (not cancelled, not refunded)."""
    first_order_id: int | None = None
    first_order_external_id: str | None = Field(default=None, max_length=100)
    """The first purchase's order number (win-back's dedupe key names it; migration 0009)."""
    first_order_at: datetime | None = _dt(default=None)
    last_order_at: datetime | None = _dt(default=None)
    last_paid_at: datetime | None = _dt(default=None)
    """When the last of the orders paid (paid, shipped, delivered) was paid: the latest ``shop_order.paid_at``
    (migration 0019), the loyalty window's candidates."""
    total_spent_minor: int = Field(default=0, sa_type=sa.BigInteger())
    created_at: datetime = _dt()
    updated_at: datetime = _dt()


class Product(SQLModel, table=True):
    __tablename__ = "product"

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=100, unique=True)
    name: str = Field(max_length=300)
    category: str = Field(max_length=100, default="", index=True)
    price_minor: int = Field(sa_type=sa.BigInteger())
    currency: str = Field(max_length=3, default="IDR")
    url: str = Field(default="", max_length=1000)
    image_url: str = Field(default="", max_length=1000)
    launched_at: datetime | None = _dt(default=None)
    active: bool = True
    created_at: datetime = _dt()
    updated_at: datetime = _dt()


class ShopOrder(SQLModel, table=True):
    __tablename__ = "shop_order"
    __table_args__ = (sa.Index("ix_shop_order_settled", "settled_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    external_id: str = Field(max_length=100, unique=True)
    customer_id: int = Field(foreign_key="customer.id", index=True)
    status: str = Field(max_length=20)
    placed_at: datetime = _dt()
    delivered_at: datetime | None = _dt(default=None)
    settled_at: datetime | None = _dt(default=None)
    """``delivered_at``, or ``placed_at`` when no delivery time is known (the feedback clock)."""
    paid_at: datetime | None = _dt(default=None)
    """When the order was first seen paid (paid, shipped or delivered; migration 0019): ``placed_at`` when the import
    that brought it said so already (or first said it refunded), else the time of the import that first did (or the
    file's ``paid_at``); kept after (a refund does not clear it; the status says the order no longer counts), but
    never before ``placed_at``, and one paid when placed follows a corrected ``placed_at``. None: never seen paid."""
    total_minor: int = Field(sa_type=sa.BigInteger())
    currency: str = Field(max_length=3, default="IDR")
    created_at: datetime = _dt()
    updated_at: datetime = _dt()


class OrderLine(SQLModel, table=True):
    __tablename__ = "order_line"
    __table_args__ = (sa.UniqueConstraint("order_id", "line_no"),)

    id: int | None = Field(default=None, primary_key=True)
    order_id: int = Field(foreign_key="shop_order.id", index=True)
    line_no: int
    product_external_id: str = Field(max_length=100)
    product_id: int | None = Field(default=None, foreign_key="product.id", index=True)
    quantity: int
    unit_price_minor: int = Field(sa_type=sa.BigInteger())


_WAITING = sa.text("status IN ('planned', 'retry')")
_IN_FLIGHT = sa.text("status IN ('claimed', 'sending')")
_SENT = sa.text("sent_at IS NOT NULL")
_SENDING = sa.text("status = 'sending'")
_CLAIMED = sa.text("status = 'claimed'")
_UNCERTAIN = sa.text("status = 'uncertain'")
_MAILBOX = sa.text("lower(email)")
DEDUPE_KEY = sa.String(1000).with_variant(sa.String(200), "sqlite")
"""A dedupe key: two ids of up to ``importer.MAX_ID`` characters each, a ``:`` in them written ``%3A``
(``core.audiences.key_part``), and the rest: 622 characters at most, 1000 on PostgreSQL (migration 0020; 200
before, and a longer key failed a campaign's whole planning INSERT there). SQLite does not hold a text to its
declared length: its table keeps the 200 it was built with (declaring more would rebuild the ledger)."""


class Message(SQLModel, table=True):
    """The ledger: one row per planned message, whatever becomes of it."""

    __tablename__ = "message"
    __table_args__ = (
        # partial indexes (migration 0007): each holds only the rows its queries look for
        sa.Index("ix_message_queue", "priority", "next_attempt_at", "id", sqlite_where=_WAITING,
                 postgresql_where=_WAITING),
        sa.Index("ix_message_expiry", "expires_at", sqlite_where=_WAITING, postgresql_where=_WAITING),
        sa.Index("ix_message_inflight", "lease_until", sqlite_where=_IN_FLIGHT, postgresql_where=_IN_FLIGHT),
        # migration 0013: what the frequency cap counts, per mailbox (lower(email)), and the mark's "is another
        # worker sending to this mailbox?"
        sa.Index("ix_message_mailbox", _MAILBOX, "sent_at", sqlite_where=_SENT, postgresql_where=_SENT),
        sa.Index("ix_message_sending_mailbox", _MAILBOX, sqlite_where=_SENDING, postgresql_where=_SENDING),
        # migration 0014: the mark's "does another worker hold a claim of a higher priority for this mailbox?"
        sa.Index("ix_message_claimed_mailbox", _MAILBOX, sqlite_where=_CLAIMED, postgresql_where=_CLAIMED),
        # migration 0017: the health line's count of the ledger's uncertain rows, and the rows a release made so
        sa.Index("ix_message_uncertain", "updated_at", sqlite_where=_UNCERTAIN, postgresql_where=_UNCERTAIN),
    )

    id: int | None = Field(default=None, primary_key=True)
    dedupe_key: str = Field(unique=True, sa_type=DEDUPE_KEY)
    campaign: str = Field(max_length=50)
    step: int = 1
    priority: int = 0
    customer_id: int = Field(foreign_key="customer.id")
    """A foreign key on SQLite. On PostgreSQL a trigger on ``customer`` guards it instead (migration 0011: the
    key's check per inserted row was 40 % of a launch day's insert)."""
    email: str = Field(max_length=320)
    status: str = Field(max_length=20)
    skip_reason: str | None = Field(default=None, max_length=30)
    due_at: datetime = _dt()
    expires_at: datetime = _dt()
    next_attempt_at: datetime = _dt()
    attempts: int = 0
    resent_after_attempts: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    """The attempts made before an operator's last resend (migration 0016): ``sending.max_attempts`` and the
    backoff count the attempts after it, so a message failed because its attempts ran out gets them again."""
    claimed_by: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = _dt(default=None)
    message_id: str | None = Field(default=None, max_length=250, unique=True)
    """Given when the row is first claimed (``core.audiences.message_id_for`` of the dedupe key, migration 0008).
    Unique; on PostgreSQL by a partial index of the given ones (migration 0011)."""
    template_version: str | None = Field(default=None, max_length=64)
    subject: str | None = Field(default=None, max_length=400)
    payload: str = Field(default="{}", max_length=4000)
    last_code: int | None = None
    last_reply: str | None = Field(default=None, max_length=500)
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = _dt()
    updated_at: datetime = _dt()
    sent_at: datetime | None = _dt(default=None)


class Attempt(SQLModel, table=True):
    """Append-only: one row per SMTP attempt (or render failure)."""

    __tablename__ = "attempt"
    __table_args__ = (sa.Index("ix_attempt_finished_at", "finished_at"),)

    id: int | None = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    attempt_no: int
    worker: str = Field(max_length=100)
    started_at: datetime = _dt()
    finished_at: datetime = _dt()
    outcome: str = Field(max_length=20)
    code: int | None = None
    reply: str = Field(default="", max_length=500)
    error_type: str = Field(default="", max_length=100)


class Suppression(SQLModel, table=True):
    __tablename__ = "suppression"

    id: int | None = Field(default=None, primary_key=True)
    email: str = Field(max_length=320, unique=True)
    reason: str = Field(max_length=30)
    """``unsubscribed``, ``hard_bounce``, ``complaint``, ``manual``."""
    source: str = Field(default="", max_length=100)
    created_at: datetime = _dt()


class Feedback(SQLModel, table=True):
    """A customer's rating of an order, from a signed feedback link: first click wins."""

    __tablename__ = "feedback"

    id: int | None = Field(default=None, primary_key=True)
    order_ref: str = Field(max_length=100, unique=True)
    """The order as the link's token names it."""
    score: int
    comment: str | None = Field(default=None, max_length=2000)
    created_at: datetime = _dt()
    commented_at: datetime | None = _dt(default=None)


class JobRun(SQLModel, table=True):
    """When each scheduled job (e.g. ``plan:winback``) last ran, so a daemon that was down catches up."""

    __tablename__ = "job_run"

    name: str = Field(max_length=100, primary_key=True)
    last_run_at: datetime = _dt()
    worker: str = Field(default="", max_length=100)

class RateLimit(SQLModel, table=True):
    """Shared limiter state: one row per limit (``global``, ``domain:gmail.com``, ``quota:daily``)."""

    __tablename__ = "rate_limit"

    key: str = Field(max_length=200, primary_key=True)
    tat: float = 0.0
    """GCRA theoretical arrival time, in seconds since the Unix epoch."""
    day: str | None = Field(default=None, max_length=10)
    """For quota rows: the shop-local day (ISO) ``day_count`` counts."""
    day_count: int = 0


class ShopState(SQLModel, table=True):
    """What the stored data was last made to agree with, by name: ``spend_currency``, the currency each customer's
    ``total_spent_minor`` adds up (``adapters.shop.settle_spend_currency``)."""

    __tablename__ = "shop_state"

    name: str = Field(max_length=100, primary_key=True)
    value: str = Field(max_length=200)
    updated_at: datetime = _dt()


metadata = SQLModel.metadata

for _table in metadata.tables.values():
    for _column in _table.columns:
        if isinstance(_column.type, UTCDateTime):
            _column.type.where = f"{_table.name}.{_column.name}"

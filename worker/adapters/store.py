"""The Store: the ledger and the shop's data behind one small, synchronous API.

All access is SQLAlchemy Core over the SQLModel tables (ORM objects cost ~7x more
per row and never leave this module anyway). Every method is one short
transaction. The async pipeline calls these methods through a single database
thread (``worker.app.AsyncStore``), so the event loop never waits on a commit.

"Once" is the database's job: planning inserts with ON CONFLICT DO NOTHING on
the UNIQUE dedupe key; claiming is one UPDATE … WHERE id IN (SELECT … FOR UPDATE
SKIP LOCKED) RETURNING on PostgreSQL, and the same statement inside BEGIN
IMMEDIATE on SQLite; ``mark_sending`` commits the ``sending`` state before the
first SMTP byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from worker.adapters import db
from worker.adapters.tables import Attempt, Customer, Message, OrderLine, Product, ShopOrder, Suppression
from worker.core.audiences import WinbackCandidate
from worker.domain import (
    ClaimedMessage,
    CustomerSnapshot,
    Disposition,
    Locale,
    MessageStatus,
    PlannedMessage,
    ProductView,
    SendTimeFacts,
    SkipReason,
)

C = Customer.__table__  # type: ignore[attr-defined]
P = Product.__table__  # type: ignore[attr-defined]
O = ShopOrder.__table__  # type: ignore[attr-defined]  # noqa: E741
L = OrderLine.__table__  # type: ignore[attr-defined]
M = Message.__table__  # type: ignore[attr-defined]
A = Attempt.__table__  # type: ignore[attr-defined]
S = Suppression.__table__  # type: ignore[attr-defined]

PURCHASE_EXCLUDED = ("cancelled", "refunded")
CLAIMABLE = (MessageStatus.PLANNED.value, MessageStatus.RETRY.value)
_CHUNK = 500  # ids per IN (…) list


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def customer_snapshot(row: Any) -> CustomerSnapshot:
    return CustomerSnapshot(
        id=row.id,
        external_id=row.external_id,
        email=row.email,
        name=row.name,
        locale=Locale(row.locale),
        time_zone=row.time_zone,
        birthday=row.birthday,
        marketing_consent=bool(row.marketing_consent),
    )


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


def _claimed(r: Any) -> ClaimedMessage:
    return ClaimedMessage(
        id=r.id,
        dedupe_key=r.dedupe_key,
        campaign=r.campaign,
        step=r.step,
        customer_id=r.customer_id,
        email=r.email,
        message_id=r.message_id,
        attempts=r.attempts,
        due_at=r.due_at,
        expires_at=r.expires_at,
        payload=json.loads(r.payload),
    )


# The group commit's statements, built once: constructing them costs more than executing them.
_MARK_SENDING = (
    sa.update(M)
    .where(
        M.c.id.in_(sa.bindparam("ids", expanding=True)),
        M.c.claimed_by == sa.bindparam("b_worker"),
        M.c.status == MessageStatus.CLAIMED.value,
    )
    .values(status=MessageStatus.SENDING.value, attempts=M.c.attempts + 1, updated_at=sa.bindparam("b_now"))
    .returning(M.c.id)
)
_RECORD = (
    sa.update(M)
    .where(
        M.c.id == sa.bindparam("b_id"),
        M.c.claimed_by == sa.bindparam("b_worker"),
        sa.or_(M.c.status == MessageStatus.CLAIMED.value, M.c.status == MessageStatus.SENDING.value),
    )
    .values(
        status=sa.bindparam("status"),
        skip_reason=sa.bindparam("skip_reason"),
        next_attempt_at=sa.bindparam("next_attempt_at"),
        claimed_by=sa.bindparam("claimed_by"),
        lease_until=sa.bindparam("lease_until"),
        attempts=M.c.attempts - sa.bindparam("b_given_back"),
        # a decision without an attempt (skip, release) keeps the last attempt's reply
        last_code=sa.func.coalesce(sa.bindparam("last_code"), M.c.last_code),
        last_reply=sa.func.coalesce(sa.bindparam("last_reply"), M.c.last_reply),
        last_error=sa.func.coalesce(sa.bindparam("last_error"), M.c.last_error),
        sent_at=sa.bindparam("sent_at"),
        template_version=sa.func.coalesce(sa.bindparam("template_version"), M.c.template_version),
        subject=sa.func.coalesce(sa.bindparam("subject"), M.c.subject),
        updated_at=sa.bindparam("updated_at"),
    )
)
_INSERT_ATTEMPT = sa.insert(A)


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Store:
        return cls(db.create_engine(url))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
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
                ~sa.exists().where(S.c.email == C.c.email),
                ~sa.exists().where(M.c.dedupe_key == key),
            )
            .order_by(C.c.id)
            .limit(limit)
        )
        with self.engine.begin() as conn:
            rows = conn.execute(query).all()
        return [
            WinbackCandidate(
                customer=customer_snapshot(r),
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
                "status": (MessageStatus.SKIPPED if m.held_out else MessageStatus.PLANNED).value,
                "skip_reason": SkipReason.HELD_OUT.value if m.held_out else None,
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

    def claim(self, *, worker: str, now: datetime, limit: int, lease_seconds: int) -> list[ClaimedMessage]:
        """Take up to ``limit`` due rows for ``worker`` with a lease; no two workers get the same row."""
        due = (
            sa.select(M.c.id)
            .where(M.c.status.in_(CLAIMABLE), M.c.next_attempt_at <= now)
            .order_by(M.c.priority.desc(), M.c.next_attempt_at, M.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        stmt = (
            sa.update(M)
            .where(M.c.id.in_(due.scalar_subquery()), M.c.status.in_(CLAIMABLE))
            .values(
                status=MessageStatus.CLAIMED.value,
                claimed_by=worker,
                lease_until=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
            .returning(
                M.c.id,
                M.c.dedupe_key,
                M.c.campaign,
                M.c.step,
                M.c.customer_id,
                M.c.email,
                M.c.message_id,
                M.c.attempts,
                M.c.due_at,
                M.c.expires_at,
                M.c.payload,
                M.c.priority,
            )
        )
        with self.engine.begin() as conn:
            rows = list(conn.execute(stmt).all())
        rows.sort(key=lambda r: (-r.priority, r.id))
        return [_claimed(r) for r in rows]

    def due_messages(
        self, *, now: datetime, campaigns: Sequence[str], batch_size: int = 1000
    ) -> Iterator[list[ClaimedMessage]]:
        """Rows a claim at ``now`` could take, in keyset batches, without claiming them (preview)."""
        after = 0
        while True:
            query = (
                sa.select(M)
                .where(
                    M.c.id > after,
                    M.c.status.in_(CLAIMABLE),
                    M.c.next_attempt_at <= now,
                    M.c.campaign.in_(list(campaigns)),
                )
                .order_by(M.c.id)
                .limit(batch_size)
            )
            with self.engine.begin() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            after = rows[-1].id
            yield [_claimed(r) for r in rows]

    def mark_sending(self, ids: Sequence[int], *, worker: str, now: datetime) -> set[int]:
        """Commit ``sending`` for rows this worker still holds; returns the ids marked.
        A row not returned (lease lost) must not be sent."""
        if not ids:
            return set()
        with self.engine.begin() as conn:
            return self._mark_sending(conn, ids, worker=worker, now=now)

    def record_and_mark(
        self, dispositions: Sequence[Disposition], ids: Sequence[int], *, worker: str, now: datetime
    ) -> set[int]:
        """``record`` and ``mark_sending`` in ONE transaction (one commit for the group commit)."""
        with self.engine.begin() as conn:
            if dispositions:
                self._record(conn, dispositions)
            return self._mark_sending(conn, ids, worker=worker, now=now) if ids else set()

    def _mark_sending(self, conn: sa.Connection, ids: Sequence[int], *, worker: str, now: datetime) -> set[int]:
        marked: set[int] = set()
        for part in _chunks(list(ids)):
            rows = conn.execute(_MARK_SENDING, {"ids": list(part), "b_worker": worker, "b_now": now})
            marked.update(rows.scalars())
        return marked

    def record(self, dispositions: Sequence[Disposition]) -> None:
        """Write outcomes and attempt rows, in one transaction."""
        if not dispositions:
            return
        with self.engine.begin() as conn:
            self._record(conn, dispositions)

    def _record(self, conn: sa.Connection, dispositions: Sequence[Disposition]) -> None:
        updates: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        suppressions: list[dict[str, Any]] = []
        for d in dispositions:
            res = d.result
            if d.suppress_reason is not None:
                source = f"smtp:{d.message.dedupe_key}"[:100]
                suppressions.append(
                    {"email": d.message.email, "reason": d.suppress_reason, "source": source,
                     "created_at": d.finished_at}
                )  # fmt: skip
            updates.append(
                {
                    "b_id": d.message.id,
                    "b_worker": d.worker,
                    "b_given_back": 0 if d.counts_as_attempt else 1,
                    "status": d.status.value,
                    "skip_reason": d.skip_reason.value if d.skip_reason else None,
                    "next_attempt_at": d.next_attempt_at or d.message.due_at,
                    "claimed_by": None,
                    "lease_until": None,
                    "last_code": res.code if res else None,
                    "last_reply": (res.reply[:500] if res else None),
                    "last_error": (res.error_type[:500] or None) if res else None,
                    "sent_at": d.finished_at if d.status is MessageStatus.SENT else None,
                    "template_version": d.template_version,
                    "subject": d.subject[:400] if d.subject else None,
                    "updated_at": d.finished_at,
                }
            )
            if res is not None:
                attempts.append(
                    {
                        "message_id": d.message.id,
                        "attempt_no": d.message.attempts + 1,
                        "worker": d.worker,
                        "started_at": d.started_at,
                        "finished_at": d.finished_at,
                        "outcome": res.outcome.value,
                        "code": res.code,
                        "reply": res.reply[:500],
                        "error_type": res.error_type[:100],
                    }
                )
        conn.execute(_RECORD, updates)
        if attempts:
            conn.execute(_INSERT_ATTEMPT, attempts)
        if suppressions:
            conn.execute(db.insert_ignore(self.engine, S), suppressions)

    def release_expired_leases(self, now: datetime) -> tuple[int, int]:
        """Claimed rows whose lease lapsed go back to the queue; sending rows become uncertain.
        Returns (requeued, uncertain)."""
        lapsed = sa.and_(M.c.lease_until.is_not(None), M.c.lease_until < now)
        with self.engine.begin() as conn:
            requeued = conn.execute(
                sa.update(M)
                .where(lapsed, M.c.status == MessageStatus.CLAIMED.value)
                .values(
                    status=sa.case((M.c.attempts > 0, MessageStatus.RETRY.value), else_=MessageStatus.PLANNED.value),
                    claimed_by=None,
                    lease_until=None,
                    updated_at=now,
                )
            ).rowcount
            uncertain = conn.execute(
                sa.update(M)
                .where(lapsed, M.c.status == MessageStatus.SENDING.value)
                .values(
                    status=MessageStatus.UNCERTAIN.value,
                    last_error="lease lapsed while sending (worker died?)",
                    claimed_by=None,
                    lease_until=None,
                    updated_at=now,
                )
            ).rowcount
        return requeued, uncertain

    def sent_times(self, customer_ids: Iterable[int], *, since: datetime) -> dict[int, list[datetime]]:
        """When each customer was actually sent email (any campaign) since ``since``: what caps count."""
        ids = sorted(set(customer_ids))
        out: dict[int, list[datetime]] = {i: [] for i in ids}
        with self.engine.begin() as conn:
            for part in _chunks(ids):
                query = sa.select(M.c.customer_id, M.c.sent_at).where(
                    M.c.customer_id.in_(part), M.c.sent_at.is_not(None), M.c.sent_at >= since
                )
                for customer_id, sent_at in conn.execute(query):
                    out[customer_id].append(sent_at)
        return out

    # --- facts for the send-time re-check and for rendering -----------------

    def send_time_facts(self, customer_ids: Iterable[int]) -> dict[int, SendTimeFacts]:
        ids = sorted(set(customer_ids))
        facts: dict[int, SendTimeFacts] = {}
        with self.engine.begin() as conn:
            for part in _chunks(ids):
                query = sa.select(
                    C, sa.exists().where(S.c.email == C.c.email).label("suppressed")
                ).where(C.c.id.in_(part))
                for r in conn.execute(query):
                    facts[r.id] = SendTimeFacts(
                        customer=customer_snapshot(r),
                        suppressed=bool(r.suppressed),
                        order_count=r.order_count,
                        last_order_at=r.last_order_at,
                    )
        for missing in set(ids) - facts.keys():
            facts[missing] = SendTimeFacts(customer=None, suppressed=False, order_count=0, last_order_at=None)
        return facts

    def order_products(self, order_ids: Iterable[int]) -> dict[int, list[ProductView]]:
        """The products on each order, in line order."""
        ids = sorted(set(order_ids))
        out: dict[int, list[ProductView]] = {i: [] for i in ids}
        with self.engine.begin() as conn:
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

    def catalogue(self) -> list[tuple[ProductView, int]]:
        """Active products with their units sold, best sellers first."""
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
            .where(P.c.active.is_(True))
            .order_by(sa.desc("units"), P.c.id)
        )
        with self.engine.begin() as conn:
            return [(product_view(r), int(r.units)) for r in conn.execute(query)]

    def customer_by_external_id(self, external_id: str) -> tuple[CustomerSnapshot, int | None, str | None] | None:
        """A customer with their first order's id and shop id (for test sends), or None."""
        query = (
            sa.select(C, O.c.external_id.label("order_external_id"))
            .outerjoin(O, O.c.id == C.c.first_order_id)
            .where(C.c.external_id == external_id)
        )
        with self.engine.begin() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        return customer_snapshot(row), row.first_order_id, row.order_external_id

    # --- suppressions --------------------------------------------------------

    def suppress(self, email: str, *, reason: str, source: str, now: datetime) -> bool:
        """Add an address to the suppression list; False if it was already there."""
        stmt = (
            db.insert_ignore(self.engine, S)
            .values(email=email, reason=reason, source=source, created_at=now)
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
        with self.engine.begin() as conn:
            return {(c, s, r): n for c, s, r, n in conn.execute(query)}

    def messages(self, *, statuses: Sequence[str] = (), limit: int = 100) -> list[dict[str, Any]]:
        query = sa.select(M).order_by(M.c.id).limit(limit)
        if statuses:
            query = query.where(M.c.status.in_(statuses))
        with self.engine.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def attempts_for(self, message_row_id: int) -> list[dict[str, Any]]:
        query = sa.select(A).where(A.c.message_id == message_row_id).order_by(A.c.id)
        with self.engine.begin() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

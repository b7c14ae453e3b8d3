"""ledger indexes that stay small: the queue, the rows in flight, the sent rows

The claim takes the highest priority first and, within it, the oldest due row.
``ix_message_due (status, next_attempt_at)`` made every claim gather and sort
every due row (8-10 s per claim with a million rows waiting). The new indexes
are partial: each holds only the rows its queries look for, so a status change
touches at most two small indexes instead of rewriting entries in big ones.

* ``ix_message_queue``: waiting rows (planned, retry) by (priority, next_attempt_at,
  id), which the claim reads one priority at a time, already in order;
* ``ix_message_expiry``: waiting rows by expiry, for the maintenance that skips
  the expired ones;
* ``ix_message_inflight``: claimed and sending rows by lease, for the lease release;
* ``ix_message_customer``: only rows that were sent (what the frequency caps count).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

WAITING = sa.text("status IN ('planned', 'retry')")
IN_FLIGHT = sa.text("status IN ('claimed', 'sending')")
SENT = sa.text("sent_at IS NOT NULL")


def _partial(name: str, columns: list[str], where: sa.TextClause) -> None:
    op.create_index(name, "message", columns, unique=False, sqlite_where=where, postgresql_where=where)


def upgrade() -> None:
    op.drop_index("ix_message_due", table_name="message")
    op.drop_index("ix_message_customer", table_name="message")
    _partial("ix_message_queue", ["priority", "next_attempt_at", "id"], WAITING)
    _partial("ix_message_expiry", ["expires_at"], WAITING)
    _partial("ix_message_inflight", ["lease_until"], IN_FLIGHT)
    _partial("ix_message_customer", ["customer_id", "sent_at"], SENT)


def downgrade() -> None:
    for name in ("ix_message_customer", "ix_message_inflight", "ix_message_expiry", "ix_message_queue"):
        op.drop_index(name, table_name="message")
    op.create_index("ix_message_customer", "message", ["customer_id", "sent_at"], unique=False)
    op.create_index("ix_message_due", "message", ["status", "next_attempt_at"], unique=False)

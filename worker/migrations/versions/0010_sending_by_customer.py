"""the rows being sent, by customer: what the mark asks before a message goes out

Several workers on one database each judge the frequency cap against the
ledger, which does not show another worker's message until it is recorded.
So the mark that makes a row ``sending`` checks, for its customer, that no
other worker is sending to them and that nothing was sent to them since the
row was claimed (``Store._mark_rows``). ``ix_message_customer`` answers the
second; this index the first. It holds only the rows in flight.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

SENDING = sa.text("status = 'sending'")


def upgrade() -> None:
    op.create_index("ix_message_sending_customer", "message", ["customer_id"], unique=False, sqlite_where=SENDING,
                    postgresql_where=SENDING)  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_message_sending_customer", table_name="message")

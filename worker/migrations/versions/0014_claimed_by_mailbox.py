"""the mark sees another worker's claim of a higher priority for the mailbox

Two workers that take one day's queue side by side may each claim a message
for one mailbox: one the birthday offer, the other the win-back step due the
same day. Each judged the frequency cap against a ledger that shows neither,
and the mark (``Store._mark_rows``) let the first to get there take the slot,
whatever its priority. The mark now also holds a row back while another worker
holds a live claim of a higher priority for its mailbox. This partial index,
by mailbox (``lower(email)``), holds only the claimed rows it looks for (a
batch's worth per worker), so planning writes nothing more.

Building it reads ``message`` and locks it against writes: stop the workers
before ``kembali db upgrade``.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

CLAIMED = sa.text("status = 'claimed'")
MAILBOX = sa.text("lower(email)")


def upgrade() -> None:
    op.create_index("ix_message_claimed_mailbox", "message", [MAILBOX], unique=False, sqlite_where=CLAIMED,
                    postgresql_where=CLAIMED)  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_message_claimed_mailbox", table_name="message")

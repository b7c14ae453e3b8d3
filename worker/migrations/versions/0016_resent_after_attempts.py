"""message.resent_after_attempts: an operator's resend gives a message its attempts again

``kembali ledger resend`` put a failed or uncertain message back in the queue
with its ``attempts`` as they were. A message failed because its attempts ran
out (``sending.max_attempts`` temporary failures, as during a relay's outage)
then failed again at the first temporary refusal after the resend, without a
retry or backoff. The resend now records how many attempts came before it;
``max_attempts`` and the backoff count those after it. ``attempts`` itself
keeps counting them all (the attempt rows' numbers follow it). Existing rows
start at 0: as before.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


# Plain ALTER TABLE on both databases (SQLite adds and drops a column in place): a batch operation would copy the
# ledger's table on SQLite, and lose its partial indexes on the way down.


def upgrade() -> None:
    op.add_column("message", sa.Column("resent_after_attempts", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("message", "resent_after_attempts")

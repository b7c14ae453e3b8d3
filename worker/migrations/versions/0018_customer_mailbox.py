"""the customer records of a mailbox, for the birthday offers to come

The frequency cap counts per mailbox, and a message of lower priority waits
rather than leave a birthday offer no slot before it expires. For an offer no
pass has planned yet, the sender looked only at the message's own customer
record, not at the other records with its mailbox (a shop's guest checkouts).
It now asks for every record of the batch's mailboxes that has a birthday:
this partial index on ``lower(email)`` (``domain.mailbox``) holds only the
customers with a birthday, so the question costs one probe per mailbox.

Building it reads ``customer`` and locks it against writes: stop the workers
(and imports) before ``kembali db upgrade``.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

BORN = sa.text("birthday IS NOT NULL")
MAILBOX = sa.text("lower(email)")


def upgrade() -> None:
    op.create_index("ix_customer_mailbox", "customer", [MAILBOX], unique=False, sqlite_where=BORN,
                    postgresql_where=BORN)  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_customer_mailbox", table_name="customer")

"""the customer records of a mailbox, for the birthday offers to come

The frequency cap counts per mailbox, and a message of lower priority waits
rather than leave a birthday offer no slot before it expires. For an offer no
pass has planned yet, the sender looked only at the message's own customer
record, not at the other records with its mailbox (a shop's guest checkouts).
It now asks for every record of the batch's mailboxes that has a birthday: an
index on ``lower(email)`` (``domain.mailbox``) answers it with one probe per
mailbox. It takes the place of ``ix_customer_email`` on ``email`` as typed,
which no query used: an import writes one customer index as before (a second
one, partial on the customers with a birthday, cost 7-20 % of an import's
speed).

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

MAILBOX = sa.text("lower(email)")


def upgrade() -> None:
    op.drop_index("ix_customer_email", table_name="customer")
    op.create_index("ix_customer_mailbox", "customer", [MAILBOX], unique=False)


def downgrade() -> None:
    op.drop_index("ix_customer_mailbox", table_name="customer")
    op.create_index("ix_customer_email", "customer", ["email"], unique=False)

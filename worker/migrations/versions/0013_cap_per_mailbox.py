"""the frequency cap counts per mailbox, not per customer record

A shop's guest checkouts can give one person several customer records with one
address. The cap counted each record's sends alone, so such a mailbox could get
one email per record on the same day. It now counts the sends to the mailbox,
``lower(email)`` of the ledger's rows (``domain.mailbox``), whichever record they
were planned for: the two partial indexes that answered "what was sent to this
customer, and is another worker sending to them?" are now keyed by the mailbox.
Both hold only sent or in-flight rows, so planning writes nothing more.

Building the indexes locks ``message`` against writes: stop the workers before
``kembali db upgrade``.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SENT = sa.text("sent_at IS NOT NULL")
SENDING = sa.text("status = 'sending'")
MAILBOX = sa.text("lower(email)")


def upgrade() -> None:
    op.create_index("ix_message_mailbox", "message", [MAILBOX, "sent_at"], unique=False, sqlite_where=SENT,
                    postgresql_where=SENT)  # fmt: skip
    op.create_index("ix_message_sending_mailbox", "message", [MAILBOX], unique=False, sqlite_where=SENDING,
                    postgresql_where=SENDING)  # fmt: skip
    op.drop_index("ix_message_customer", table_name="message")
    op.drop_index("ix_message_sending_customer", table_name="message")


def downgrade() -> None:
    op.create_index("ix_message_customer", "message", ["customer_id", "sent_at"], unique=False, sqlite_where=SENT,
                    postgresql_where=SENT)  # fmt: skip
    op.create_index("ix_message_sending_customer", "message", ["customer_id"], unique=False, sqlite_where=SENDING,
                    postgresql_where=SENDING)  # fmt: skip
    op.drop_index("ix_message_sending_mailbox", table_name="message")
    op.drop_index("ix_message_mailbox", table_name="message")

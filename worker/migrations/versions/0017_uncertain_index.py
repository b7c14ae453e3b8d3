"""the ledger's uncertain rows, counted for every health line

The daemon's health line counted only the messages this worker made
``uncertain`` since the previous line; the rows another worker's crash left
``uncertain`` (the mail may have left: an operator decides with ``kembali
ledger``) were in no line. It now also gives the ledger's count of them,
``uncertain_in_ledger``, every ``daemon.health_summary_seconds``. This partial
index holds only those rows (a handful), so the count reads them alone, not the
whole ledger; by ``updated_at``, it also finds the rows a lease release has
just made uncertain (``opstore.left_uncertain``).

Building it reads ``message`` and locks it against writes: stop the workers
before ``kembali db upgrade``.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

UNCERTAIN = sa.text("status = 'uncertain'")


def upgrade() -> None:
    op.create_index("ix_message_uncertain", "message", ["updated_at"], unique=False, sqlite_where=UNCERTAIN,
                    postgresql_where=UNCERTAIN)  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_message_uncertain", table_name="message")

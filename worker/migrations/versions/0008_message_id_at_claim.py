"""the ledger's Message-ID is given when a row is first claimed, not when it is planned

Planning a shop's first pass inserts a million rows or more. Their Message-IDs
(SHA-256 of the dedupe key, ``core.audiences.message_id_for``) cost one hash
per row and, worse, entries in a unique index in random order, which is what
the first pass spent most of its time on. The claim already fills a missing
Message-ID with the very same function (``COALESCE(message_id, …)``), so a row
gets the identical Message-ID, only later; rows that are never claimed
(held out, skipped) do not need one. NULLs do not collide in a unique index.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.alter_column("message_id", existing_type=sa.String(length=250), nullable=True)


def downgrade() -> None:
    # the domain of the Message-IDs is the shop's setting, which a migration does not know: refuse rather
    # than invent one or drop rows
    missing = op.get_bind().execute(sa.text("SELECT count(*) FROM message WHERE message_id IS NULL")).scalar_one()
    if missing:
        raise RuntimeError(
            f"{missing} ledger rows were planned without a Message-ID (they get one when first claimed); "
            "schema 0007 cannot hold them: send or skip them first, or stay on 0008"
        )
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.alter_column("message_id", existing_type=sa.String(length=250), nullable=False)

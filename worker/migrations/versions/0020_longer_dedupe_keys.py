"""message.dedupe_key up to 1000 characters on PostgreSQL

A dedupe key holds a customer's and an order's ids (win-back's), each up to
100 characters as an import takes them, a ``:`` in them written ``%3A``: up to
622 characters. PostgreSQL's column held 200, and one key longer than that
failed the campaign's whole planning INSERT (``value too long for type
character varying(200)``): no one-time buyer of the shop got a win-back email.

PostgreSQL: a wider VARCHAR changes the catalog only (no rewrite of the table
or its index), at once. SQLite does not hold a text to its declared length:
nothing to do there (``tables.DEDUPE_KEY``).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("message", "dedupe_key", type_=sa.String(1000), existing_type=sa.String(200),
                        existing_nullable=False)  # fmt: skip


def downgrade() -> None:
    # (a key longer than 200 characters, planned since, makes this fail: shorten or delete its row first)
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("message", "dedupe_key", type_=sa.String(200), existing_type=sa.String(1000),
                        existing_nullable=False)  # fmt: skip

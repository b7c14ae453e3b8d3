"""shop_state: the currency the customers' spend totals were counted in

Each customer's ``total_spent_minor`` adds up their paid orders in the shop's
currency (``shop.currency``) as it was at their last import. Changed in the
config afterwards, the totals kept counting the old currency: loyalty's spend
milestones, whose candidates they narrow down, missed or over-read every
customer not imported again. This table remembers which currency the totals
count (``spend_currency``); planning and imports count them again, once, when
it is not the configured one (``adapters.shop.settle_spend_currency``). A
database upgraded to this revision does not know it yet: its totals are
counted once, at the next import of orders or loyalty planning.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shop_state",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("shop_state")

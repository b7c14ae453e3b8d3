"""shop_order.paid_at and customer.last_paid_at: loyalty counts an order from when it was paid

Loyalty rewards a milestone reached by an order within ``within_days``. It
counted each order from when it was placed: the 5th order, placed 35 days ago
and paid (a bank transfer) in today's import, counted as "before the window",
and its milestone was never rewarded, then or after. ``shop_order.paid_at``
holds when an order was first seen paid: its ``placed_at`` when the import that
brought it said so already, else the time of the import that first did
(``adapters.shop``). ``customer.last_paid_at`` is the latest of its paid
orders', refreshed with the other purchase columns; a partial index holds the
customers whose last payment came after their last order was placed (a few),
whom loyalty visits beside those who ordered within the window.

The orders paid already are taken as paid when placed (nothing tells more), so
this changes no milestone due today.

Building it rewrites every paid order and every customer: stop the workers
(and imports) before ``kembali db upgrade``.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

PAID_LATE = sa.text("last_paid_at > last_order_at")


def upgrade() -> None:
    op.add_column("shop_order", sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("customer", sa.Column("last_paid_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE shop_order SET paid_at = placed_at WHERE status IN ('paid', 'shipped', 'delivered')")
    op.execute(
        "UPDATE customer SET last_paid_at = (SELECT max(paid_at) FROM shop_order"
        " WHERE shop_order.customer_id = customer.id AND status IN ('paid', 'shipped', 'delivered'))"
        " WHERE order_count > 0"
    )
    op.create_index("ix_customer_paid_late", "customer", ["last_paid_at"], unique=False, sqlite_where=PAID_LATE,
                    postgresql_where=PAID_LATE)  # fmt: skip


def downgrade() -> None:
    op.drop_index("ix_customer_paid_late", table_name="customer")
    # ALTER TABLE … DROP COLUMN on SQLite too (3.35 and later): a batch copy of ``customer`` would lose its index on
    # an expression (0018's ix_customer_mailbox)
    op.drop_column("customer", "last_paid_at")
    op.drop_column("shop_order", "paid_at")

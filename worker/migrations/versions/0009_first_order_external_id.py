"""customer.first_order_external_id: the first purchase's order number beside its id

Win-back's dedupe key names the customer's only order by its external id. With
it on the customer row, win-back is planned from the customer table alone: no
join to the orders (2.5 million rows in the benchmark's shop) for every one of
its half a million candidates. Refreshed with the other purchase columns after
every order import (``adapters.shop.refresh_customer_stats``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customer", schema=None) as batch_op:
        batch_op.add_column(sa.Column("first_order_external_id", sa.String(length=100), nullable=True))
    op.execute(
        "UPDATE customer SET first_order_external_id ="
        " (SELECT external_id FROM shop_order WHERE shop_order.id = customer.first_order_id)"
        " WHERE first_order_id IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("customer", schema=None) as batch_op:
        batch_op.drop_column("first_order_external_id")

"""campaigns: birthday and feedback columns, audience indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("customer", schema=None) as batch_op:
        batch_op.add_column(sa.Column("birthday_mmdd", sa.Integer(), nullable=True))
        batch_op.create_index("ix_customer_birthday", ["birthday_mmdd", "id"], unique=False)
        batch_op.create_index("ix_customer_last_order", ["last_order_at", "id"], unique=False)
    with op.batch_alter_table("shop_order", schema=None) as batch_op:
        batch_op.add_column(sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_shop_order_settled", ["settled_at", "id"], unique=False)
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        mmdd = "CAST(to_char(birthday, 'MMDD') AS INTEGER)"
    else:
        mmdd = "CAST(strftime('%m%d', birthday) AS INTEGER)"
    op.execute(f"UPDATE customer SET birthday_mmdd = {mmdd} WHERE birthday IS NOT NULL")
    op.execute("UPDATE shop_order SET settled_at = COALESCE(delivered_at, placed_at)")


def downgrade() -> None:
    with op.batch_alter_table("shop_order", schema=None) as batch_op:
        batch_op.drop_index("ix_shop_order_settled")
        batch_op.drop_column("settled_at")
    with op.batch_alter_table("customer", schema=None) as batch_op:
        batch_op.drop_index("ix_customer_last_order")
        batch_op.drop_index("ix_customer_birthday")
        batch_op.drop_column("birthday_mmdd")

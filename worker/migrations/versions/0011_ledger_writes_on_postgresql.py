"""PostgreSQL: the ledger's customer reference guarded from the customer's side; Message-IDs indexed when given

A launch day plans half a million ledger rows in one INSERT … SELECT. On
PostgreSQL two per-row costs of that insert had nothing to do with its rows:

* the foreign key ``message.customer_id → customer.id``: PostgreSQL checks it
  with a trigger per inserted row, which runs a query that locks the
  customer's row (4 s of a 9.7 s insert of 526k rows). Every insert already
  takes the customer from the customer table (planning's INSERT … SELECT
  joins it; birthday reads it in the same pass), and Kembali never deletes
  a customer. What the key still protected is the other direction: a hand
  deleting customers the ledger names. A trigger on ``customer`` keeps that:
  a customer the committed ledger refers to cannot be deleted, truncated
  away or renumbered (the same SQLSTATE, 23503, as the key gave). Unlike the
  key it does not wait for a planning insert still in flight: a customer
  deleted by hand during a pass may leave a row of that pass naming no one,
  which the sender then skips as ``customer_gone``;
* the unique index on ``message_id`` held an entry for every row, NULL ones
  included, though a row gets its Message-ID only when first claimed
  (migration 0008): now it holds only the given ones, which are all that
  uniqueness is about (0.35 s of the same insert).

SQLite keeps both as they are: its foreign key check is a lookup by primary
key (0.3 s of 3.5 s for the same rows), and changing either there would
rebuild the ledger table.

Building the index locks ``message`` against writes, and the triggers need a
lock on ``customer``: stop the workers before ``kembali db upgrade``.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

GUARD = """
CREATE FUNCTION kembali_customer_in_ledger() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        IF EXISTS (SELECT 1 FROM message) THEN
            RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
                MESSAGE = 'cannot truncate customer: the ledger (message) refers to its rows';
        END IF;
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM message WHERE customer_id = OLD.id) THEN
        RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
            MESSAGE = 'customer ' || OLD.external_id || ' (id ' || OLD.id || ') has rows in the ledger (message): '
                      || 'it cannot be ' || lower(TG_OP) || 'd';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$
"""
"""No ``%`` in it: Alembic's offline mode (``--sql``) would write it doubled."""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(GUARD)
    op.execute("CREATE TRIGGER customer_in_ledger_delete BEFORE DELETE ON customer"
               " FOR EACH ROW EXECUTE FUNCTION kembali_customer_in_ledger()")  # fmt: skip
    # only when the id changes: the importer updates customers all the time, never their id
    op.execute("CREATE TRIGGER customer_in_ledger_update BEFORE UPDATE OF id ON customer FOR EACH ROW"
               " WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION kembali_customer_in_ledger()")  # fmt: skip
    op.execute("CREATE TRIGGER customer_in_ledger_truncate BEFORE TRUNCATE ON customer"
               " FOR EACH STATEMENT EXECUTE FUNCTION kembali_customer_in_ledger()")  # fmt: skip
    op.drop_constraint("message_customer_id_fkey", "message", type_="foreignkey")
    op.create_index("ix_message_message_id", "message", ["message_id"], unique=True,
                    postgresql_where=sa.text("message_id IS NOT NULL"))  # fmt: skip
    op.drop_constraint("message_message_id_key", "message", type_="unique")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # the foreign key checks every row as it is added: name the rows it would refuse instead of failing on one
    orphans = bind.execute(sa.text(
        "SELECT id FROM message WHERE NOT EXISTS (SELECT 1 FROM customer WHERE customer.id = message.customer_id)"
        " ORDER BY id LIMIT 5"
    )).scalars().all()  # fmt: skip
    if orphans:
        raise RuntimeError(
            f"ledger rows {', '.join(map(str, orphans))}… name customers that no longer exist; schema 0010's "
            "foreign key cannot hold them: delete those rows first, or stay on 0011"
        )
    op.create_unique_constraint("message_message_id_key", "message", ["message_id"])
    op.drop_index("ix_message_message_id", table_name="message")
    op.create_foreign_key("message_customer_id_fkey", "message", "customer", ["customer_id"], ["id"])
    for name in ("delete", "update", "truncate"):
        op.execute(f"DROP TRIGGER customer_in_ledger_{name} ON customer")
    op.execute("DROP FUNCTION kembali_customer_in_ledger()")

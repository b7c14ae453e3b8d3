"""the suppression list holds addresses in lower case

``Budi.Santoso@Example.com`` and ``budi.santoso@example.com`` are one mailbox at
every real provider, but the list compared them as two strings: an address
suppressed in one case went on getting mail in another. Entries are now kept
with ASCII letters in lower case (``store.suppression_address``) and compared
with the customer's address in lower case (``store.suppressed_sql``). This
revision brings the entries already there into that form: of those that become
one, the earliest (its reason and source) stays.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DELETE FROM suppression WHERE id NOT IN (SELECT min(id) FROM suppression GROUP BY lower(email))")
    op.execute("UPDATE suppression SET email = lower(email) WHERE email <> lower(email)")


def downgrade() -> None:
    """Nothing to undo: lower-case entries are valid entries for the code before this revision too."""

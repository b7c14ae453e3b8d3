"""the suppression list holds addresses in lower case, with domains in their IDNA form

``Budi.Santoso@Example.com`` and ``budi.santoso@example.com`` are one mailbox at
every real provider, but the list compared them as two strings: an address
suppressed in one case went on getting mail in another. Entries are now kept
with ASCII letters in lower case (``store.suppression_address``) and compared
with the customer's address in lower case (``store.suppressed_sql``).

Imports now also store an internationalised domain in its IDNA form
(``budi@xn--bcher-kva.de``), the form SMTP takes. Addresses stored before in
the Unicode form (``budi@bücher.de``, which could not be sent) are brought into
it here, customers and suppression entries alike, so an entry made before still
matches its customer after the next import.

Of the suppression entries that become one, the earliest of those that are the
customer's own wish (an unsubscribe, a complaint: ``store.CUSTOMERS_OWN``)
stays, as ``suppress import`` keeps of an address listed twice; else the
earliest (its reason, source and time). An unsubscribe beside an earlier bounce
in another case was dropped: gone from ``stats``, and no longer following the
customer to a new address.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from worker.adapters.importer import ascii_address
from worker.adapters.store import CUSTOMERS_OWN, suppression_address

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, email, reason FROM suppression ORDER BY id")).all()
    kept: dict[str, tuple[int, str, bool]] = {}  # the folded address → the entry kept: its id, email, own wish
    for row_id, email, reason in rows:
        folded, own = suppression_address(email), (reason or "").lower() in CUSTOMERS_OWN
        if folded not in kept or (own and not kept[folded][2]):
            kept[folded] = (row_id, email, own)
    staying = {row_id for row_id, _, _ in kept.values()}
    dropped = [row_id for row_id, _, _ in rows if row_id not in staying]
    changed = [{"id": row_id, "email": folded} for folded, (row_id, email, _) in kept.items() if folded != email]
    if dropped:  # the duplicates first: an update must not meet an entry that is going away
        conn.execute(sa.text("DELETE FROM suppression WHERE id = :id"), [{"id": row_id} for row_id in dropped])
    if changed:
        conn.execute(sa.text("UPDATE suppression SET email = :email WHERE id = :id"), changed)
    customers = []
    for row_id, email in conn.execute(sa.text("SELECT id, email FROM customer")):
        # a non-ASCII part before the @ cannot be converted: that address stays as it was
        if not email.isascii() and (ascii := ascii_address(email)).isascii():
            customers.append({"id": row_id, "email": ascii})
    if customers:
        conn.execute(sa.text("UPDATE customer SET email = :email WHERE id = :id"), customers)


def downgrade() -> None:
    """Nothing to undo: lower-case entries and IDNA domains are valid for the code before this revision too."""

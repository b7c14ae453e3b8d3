"""Kembali's Alembic migrations (``versions/``), run by ``adapters.db.upgrade`` through ``env.py``.

``comparison(dialect)`` holds the options ``env.py`` gives Alembic's comparison of the declared tables with a
database (what ``alembic revision --autogenerate`` proposes), so that the schema test compares the same way."""

from __future__ import annotations

from typing import Any

EXPRESSION_INDEXES = frozenset({"ix_message_mailbox", "ix_message_sending_mailbox", "ix_message_claimed_mailbox",
                                "ix_customer_mailbox"})
"""The ledger's and the customers' indexes on ``lower(email)`` (migrations 0013, 0014 and 0018). SQLAlchemy
cannot reflect an index on an expression from SQLite, so Alembic cannot compare them there: they are left out of
SQLite's comparison, and the schema test reads their SQL from ``sqlite_master`` instead."""
UNREFLECTABLE = "Skipped unsupported reflection of expression-based index"
"""The start of SQLAlchemy's warning for each of them when it reflects SQLite's indexes."""


def comparison(dialect: str) -> dict[str, Any]:
    """Alembic's comparison options for a database of ``dialect``: column types compared, and on PostgreSQL
    migration 0011's deliberate differences from the declared tables left out, so that autogenerate never
    proposes to undo them (the ledger's foreign key to ``customer``, replaced there by a trigger on
    ``customer``; its unique Message-ID constraint, replaced by a unique index of the given Message-IDs), and on
    SQLite the ``EXPRESSION_INDEXES`` it cannot reflect."""

    def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if dialect == "sqlite":
            return not (type_ == "index" and name in EXPRESSION_INDEXES)
        if dialect != "postgresql":
            return True
        table = getattr(getattr(obj, "table", None), "name", None)
        columns = [c.name for c in getattr(obj, "columns", ())]
        if type_ == "foreign_key_constraint" and table == "message" and columns == ["customer_id"]:
            return False
        if type_ == "unique_constraint" and table == "message" and columns == ["message_id"]:
            return False
        return not (type_ == "index" and name == "ix_message_message_id")

    return {"compare_type": True, "include_object": include_object}

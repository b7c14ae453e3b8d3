"""Alembic environment: runs against the connection or URL Kembali passes in."""

from __future__ import annotations

import warnings

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.exc import SAWarning

from worker.adapters.tables import metadata
from worker.migrations import UNREFLECTABLE, comparison

# SQLite's indexes on lower(email), which autogenerate leaves out (``comparison``), still warn when reflected
warnings.filterwarnings("ignore", message=UNREFLECTABLE, category=SAWarning)

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        render_as_batch=True,  # SQLite needs table rebuilds for ALTERs
        **comparison(connection.dialect.name),  # type: ignore[attr-defined]
        on_version_apply=config.attributes.get("on_version_apply", ()),  # db.upgrade's progress
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()

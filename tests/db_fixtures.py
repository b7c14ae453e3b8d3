"""Database fixtures: a fresh SQLite file per test, and a fresh PostgreSQL database per test.

PostgreSQL tests skip when no server answers, unless KEMBALI_REQUIRE_PG=1 (set by
.ci/run), in which case a missing server fails them. The server is found at
KEMBALI_TEST_PG_URL (default: postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from worker.adapters import db

PG_ADMIN_URL = os.environ.get("KEMBALI_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("KEMBALI_REQUIRE_PG") == "1"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        message = f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc.orig}"
        if REQUIRE_PG:
            pytest.fail(message + " (KEMBALI_REQUIRE_PG=1 makes PostgreSQL tests required)")
        pytest.skip(message)
    yield engine
    engine.dispose()


def fresh_pg_database(admin: sa.Engine) -> tuple[str, str]:
    name = f"kembali_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    return name, url


def drop_pg_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped after the test."""
    name, url = fresh_pg_database(pg_admin)
    try:
        yield url
    finally:
        drop_pg_database(pg_admin, name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new, empty SQLite file."""
    return f"sqlite:///{tmp_path / 'kembali.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind, migrated to the newest schema: run the test once per kind."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
    engine = db.create_engine(url)
    db.upgrade(engine)
    engine.dispose()
    return url

"""Database fixtures: a fresh SQLite file per test, and a fresh PostgreSQL database per test.

A migrated one is a copy of one ``db.upgrade`` migrated once per session (``migrated_sqlite``, the PostgreSQL
template of ``pg_template``): running the 18 migrations took 0.4 s per SQLite file and 0.6-0.9 s per PostgreSQL
database, for every test that needed the schema; a copy takes milliseconds (a template copy 0.3 s). The tests of
migrating itself (test_upgrading.py) start from empty or old databases and run ``db.upgrade``.

PostgreSQL tests skip when no server answers, unless KEMBALI_REQUIRE_PG=1 (set by
.ci/run), in which case a missing server fails them. The server is found at
KEMBALI_TEST_PG_URL (default: postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import tempfile
import threading
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
    dropper = _Dropper(engine)
    _droppers.append(dropper)
    try:
        yield engine
    finally:
        _droppers.remove(dropper)
        dropper.finish()
        engine.dispose()


class _Dropper:
    """Drops the databases of tests that are over in a thread of its own: a DROP DATABASE took 0.1-2 s on a busy
    machine (its files unlinked, a checkpoint's worth of I/O), which the next test waited for; now it runs beside
    that test. ``finish`` waits for every drop and fails on one that failed."""

    def __init__(self, admin: sa.Engine) -> None:
        self.admin = admin
        self.names: queue.Queue[str | None] = queue.Queue()
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="drop-test-databases", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (name := self.names.get()) is not None:
            try:
                drop_pg_database(self.admin, name)
            except Exception as exc:  # (reported by finish)
                self.failures.append(f"{name}: {exc}")

    def finish(self) -> None:
        self.names.put(None)
        self.thread.join()
        assert not self.failures, f"test databases not dropped: {self.failures}"


_droppers: list[_Dropper] = []


def drop_later(admin: sa.Engine, name: str) -> None:
    """Drop the database ``name`` soon, in the background (at once when no session dropper runs)."""
    if _droppers:
        _droppers[-1].names.put(name)
    else:
        drop_pg_database(admin, name)


def fresh_pg_database(admin: sa.Engine, template: str | None = None) -> tuple[str, str]:
    """A new database: empty, or a copy of ``template``."""
    name = f"kembali_t_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"{copy}'))
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
        drop_later(pg_admin, name)


@pytest.fixture(scope="session")
def pg_template(pg_admin: sa.Engine) -> Iterator[str]:
    """The name of a PostgreSQL database ``db.upgrade`` migrated to the newest schema, for ``pg_migrated_url`` to
    copy (nothing stays connected to it: PostgreSQL copies only a template nobody uses)."""
    name, url = fresh_pg_database(pg_admin)
    try:
        engine = db.create_engine(url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        yield name
    finally:
        drop_pg_database(pg_admin, name)


@pytest.fixture
def pg_migrated_url(pg_admin: sa.Engine, pg_template: str) -> Iterator[str]:
    """A new PostgreSQL database with the newest schema (a copy of ``pg_template``), dropped after the test."""
    name, url = fresh_pg_database(pg_admin, pg_template)
    try:
        yield url
    finally:
        drop_later(pg_admin, name)


_migrated_file: list[Path] = []


def migrated_sqlite(path: Path) -> None:
    """A new SQLite file at ``path`` with the newest schema: a copy of one ``db.upgrade`` migrated in this session.
    ``path`` must not exist yet (or be empty): anything else is migrated where it is."""
    if path.exists() and path.stat().st_size > 0:
        engine = db.create_engine(f"sqlite:///{path}")
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()
        return
    if not _migrated_file:
        folder = Path(tempfile.mkdtemp(prefix="kembali-schema-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        engine = db.create_engine(f"sqlite:///{folder / 'migrated.db'}")
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()  # (the last connection's close folds the WAL into the file)
        _migrated_file.append(folder / "migrated.db")
    shutil.copyfile(_migrated_file[0], path)


def migrate(url: str) -> None:
    """The database at ``url`` brought to the newest schema: a new SQLite file by a copy (``migrated_sqlite``),
    anything else by ``db.upgrade``."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and "?" not in url and Path(url[len(prefix):]).is_absolute():
        migrated_sqlite(Path(url[len(prefix):]))
        return
    engine = db.create_engine(url)
    try:
        db.upgrade(engine)
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A new, empty SQLite file."""
    return f"sqlite:///{tmp_path / 'kembali.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind, migrated to the newest schema: run the test once per kind."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("pg_migrated_url")
        return url
    url = request.getfixturevalue("sqlite_url")
    migrated_sqlite(tmp_path / "kembali.db")
    return url

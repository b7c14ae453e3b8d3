"""The read-only commands beside a long SQLite writer (an import, a planning pass, the daemon's commits): a real
second connection holds the write lock while each command runs in this process."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.clikit import migrated_config, run_cli
from tests.smtp_server import closed_port
from worker.adapters import db


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """The config's database with another process's write transaction open on it (``BEGIN IMMEDIATE``)."""
    migrated_config(tmp_path)
    conn = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO suppression (email, reason, source, created_at) "
                 "VALUES ('held@example.com', 'manual', 'test', '2026-01-01 00:00:00')")
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize("argv", [["stats"], ["insights"], ["suppress", "list"], ["ledger", "list"], ["db", "status"]])
def test_a_read_only_command_reads_beside_a_long_writer_rather_than_wait_for_its_lock(
    tmp_path: Path, writer: sqlite3.Connection, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    # Given a writer holding the SQLite write lock (and SQLite's wait for a lock cut to 0.2 s, from 30)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    # When a command that only reads runs
    code, out = run_cli(capsys, "--config", str(tmp_path / "config.toml"), *argv)
    # Then it reads what was committed (WAL: readers beside the writer) rather than take the write lock itself,
    # wait for the writer and fail with "database is locked"
    assert code == 0, out
    assert "locked" not in out and "held@example.com" not in out


def test_preview_reads_beside_a_long_writer_rather_than_wait_for_its_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.daemon_harness import make_shop

    # Given a shop with customers due an email, and a writer holding the SQLite write lock
    shop = make_shop(tmp_path, smtp_port=closed_port(), plan_cron="0 9 * * *")
    shop.add([1, 2], days_ago=60)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "k" * 40)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    conn = sqlite3.connect(tmp_path / "kembali.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # When the dry run runs
        code, out = run_cli(capsys, "--config", str(shop.config), "preview")
    finally:
        conn.rollback()
        conn.close()
    # Then it shows what would be sent without waiting for the writer (it writes nothing, so needs no lock)
    assert code == 0, out
    assert "2 would be sent" in out, out


@pytest.mark.parametrize("argv", [["run", "--once"], ["suppress", "add", "a@example.com"]])
def test_a_command_that_writes_behind_a_long_writer_ends_with_a_message_naming_the_database_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    from tests.daemon_harness import make_shop

    # Given a shop whose SQLite file a writer holds longer than SQLite waits for it (0.2 s here, 30 s as shipped)
    shop = make_shop(tmp_path, smtp_port=closed_port(), plan_cron="0 9 * * *")
    shop.add([1], days_ago=60)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "k" * 40)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    conn = sqlite3.connect(tmp_path / "kembali.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # When a command that writes runs
        code, out = run_cli(capsys, "--config", str(shop.config), *argv)
    finally:
        conn.rollback()
        conn.close()
    # Then it ends with one line naming the database and why, and exit code 3 (the database cannot be used), not
    # a traceback and exit 1 (which says the command did its work and something needs a look)
    assert code == 3, out
    assert f"the database {tmp_path / 'kembali.db'} could not be used: database is locked" in out, out
    assert "Traceback" not in out and "[SQL:" not in out


def test_a_write_behind_a_long_writer_waits_in_slices_then_gives_up_as_sqlite_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a writer holding the SQLite write lock longer than SQLite waits for it (five of the slices the main
    # thread waits in, here; 30 s as shipped)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 5 * db.SQLITE_BUSY_SLICE_MS)
    migrated_config(tmp_path)
    engine = db.create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    holder = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    try:
        with engine.connect() as conn:
            ours = conn.connection.driver_connection
        holder.execute("BEGIN IMMEDIATE")
        # When this process begins a write in its main thread
        with pytest.raises(sa.exc.OperationalError, match="database is locked"), engine.begin():
            pass
        holder.rollback()
        # Then it gives up as SQLite did, and its connection keeps the whole busy timeout for its next user (a
        # thread, which waits in SQLite)
        with engine.begin() as conn:
            assert conn.connection.driver_connection is ours
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
    finally:
        holder.close()
        engine.dispose()


def test_healthz_says_the_database_is_ok_while_another_program_writes_to_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tests.daemon_harness import make_shop
    from worker.adapters.clock import SystemClock
    from worker.adapters.web import Request
    from worker.asyncstore import AsyncStore
    from worker.config import load_settings
    from worker.links import Site
    from worker.metrics import Metrics

    # Given the daemon's site on an SQLite file that another program (an import) holds the write lock of
    shop = make_shop(tmp_path, smtp_port=closed_port())
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    store = shop.store()
    astore = AsyncStore(store)
    settings = load_settings(shop.config)
    site = Site(store=astore, keys=[b"k" * 32], settings=lambda: settings, clock=SystemClock(), metrics=Metrics(),
                paused=lambda: False)
    conn = sqlite3.connect(tmp_path / "kembali.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        # When a load balancer probes /healthz
        response = asyncio.run(site.handle(Request("GET", "/healthz", {}, {})))
    finally:
        conn.rollback()
        conn.close()
        astore.close()
        store.close()
    # Then the database is reachable (its ping reads; it does not wait for the write lock and time out)
    assert (response.status, response.body) == (200, b'{"status": "ok", "database": "ok", "dispatcher": "running"}\n')


def test_a_customers_unsubscribe_and_rating_pages_open_while_another_program_writes_to_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tests.daemon_harness import make_shop
    from worker.adapters.clock import SystemClock
    from worker.adapters.web import Request
    from worker.asyncstore import AsyncStore
    from worker.config import load_settings
    from worker.core import tokens
    from worker.links import Site
    from worker.metrics import Metrics

    # Given the daemon's site on an SQLite file that another program (an import) holds the write lock of
    shop = make_shop(tmp_path, smtp_port=closed_port())
    shop.add([1], days_ago=60)
    customer = shop.customer_id("C1")
    order = shop.scalar("SELECT min(id) FROM shop_order")
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    store = shop.store()
    astore = AsyncStore(store)
    settings = load_settings(shop.config)
    key = b"k" * 32
    site = Site(store=astore, keys=[key], settings=lambda: settings, clock=SystemClock(), metrics=Metrics(),
                paused=lambda: False)
    unsubscribe = {"t": [tokens.sign("u", str(customer), key, shop="shop.example")]}
    rating = {"t": [tokens.sign("f", f"{order}:9", key, shop="shop.example")]}
    conn = sqlite3.connect(tmp_path / "kembali.db", isolation_level=None)

    async def clicks() -> list[int]:
        return [(await site.handle(Request("GET", path, query, {}))).status
                for path, query in (("/unsubscribe", unsubscribe), ("/feedback", rating))]

    try:
        conn.execute("BEGIN IMMEDIATE")
        # When a customer opens their unsubscribe link and their rating link (GETs: they change nothing)
        statuses = asyncio.run(clicks())
    finally:
        conn.rollback()
        conn.close()
        astore.close()
        store.close()
    # Then the pages come (the GETs only read), rather than an error once SQLite gives up waiting for the lock
    assert statuses == [200, 200]


def test_a_daemon_stopped_while_another_program_holds_the_write_lock_stops_at_once_when_nothing_is_in_flight(
    tmp_path: Path,
) -> None:
    import signal

    from tests.daemon_harness import Daemon, make_shop

    # Given a daemon with nothing to send, whose dispatcher's claims (every 0.5 s) wait for the SQLite write lock
    # that another program holds (an operator's sqlite3 shell left in a transaction), as SQLite does, up to 30 s
    shop = make_shop(tmp_path, smtp_port=closed_port(), plan_cron="0 9 * * *")
    daemon = Daemon.start(shop)
    daemon.wait_event("daemon_started", timeout=60)
    holder = sqlite3.connect(tmp_path / "kembali.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        time.sleep(1.5)
        # When it is told to stop
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(60)
    finally:
        holder.rollback()
        holder.close()
    # Then it stops as asked, exit 0, without waiting out its grace period for a claim that holds nothing, then
    # failing to mark rows in flight it has none of ("rows in flight become uncertain", exit 1, the grace period
    # and 10 s more after the signal)
    names = [e.get("event") for e in daemon.events]
    assert code == 0, daemon.log()
    assert "shutdown_grace_expired" not in names and "shutdown_abandon_failed" not in names, daemon.log()
    (left,) = daemon.named("shutdown_left_claim")
    assert left["database"] == str(tmp_path / "kembali.db") and "held no message" in left["note"], left
    assert daemon.named("daemon_stopped")[0]["exit_code"] == 0

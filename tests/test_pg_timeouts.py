"""PostgreSQL's lock_timeout and idle_in_transaction_session_timeout on every connection a worker opens.

A worker stuck in a transaction (SIGSTOPped, its host suspended, cut off after BEGIN) held its row locks for
ever, and every worker that needed those rows waited for ever, saying nothing. With the two settings the
server ends the stuck session (its transaction rolled back, its locks released), and a waiter gives up its
statement with a logged ``db_lock_timeout`` and tries again, so nothing hangs, nothing is lost and nothing is
sent twice. The tests hold real locks from a second, raw connection to the real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from tests.clikit import run_cli
from tests.db_fixtures import PG_ADMIN_URL
from tests.sendkit import LINK_SECRET, Shop, message_ids, settings_dict
from tests.smtp_server import RecordingServer, closed_port
from worker.adapters import db
from worker.adapters.plan_sql import PLAN_LOCKS
from worker.adapters.ratestore import RateStore
from worker.adapters.store import MAILBOX_LOCKS, Store
from worker.asyncstore import AsyncStore
from worker.config import Settings, settings_from_dict
from worker.errors import ConfigError
from worker.limiter import DbBooker
from worker.sending import LedgerWriter

REPO = Path(__file__).resolve().parent.parent
QUICK = (0.01, 0.01, 0.01, 0.01, 0.01)


def _settings(url: str, smtp_port: int | None = None, **database: Any) -> Settings:
    port = closed_port() if smtp_port is None else smtp_port
    raw = settings_dict(url, port, batch_size=10, compose_processes=0, lease_seconds=120,
                        shared_limits="database")  # fmt: skip
    raw["database"].update(database)
    return settings_from_dict(raw, base_dir=REPO)


def _driver_url(url: str) -> str:
    """The libpq form of a SQLAlchemy URL, for a raw psycopg connection of the test's own."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _quick_to_give_up(folder: Path, url: str) -> Path:
    """A config.toml in ``folder`` for the database at ``url``, whose lock waits give up after a fifth of a second."""
    config = folder / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\nlock_timeout_seconds = 0.2\n', encoding="utf-8")
    return config


def _shown(engine: sa.Engine, setting: str) -> str:
    with engine.connect() as conn:
        return str(conn.exec_driver_sql(f"SHOW {setting}").scalar_one())


class _OnEvent(logging.Handler):
    """Calls ``action`` (once) when the event ``name`` is logged, on the thread that logs it."""

    def __init__(self, name: str, action: Callable[[], None]) -> None:
        super().__init__()
        self.name_ = name
        self.action: Callable[[], None] | None = action
        self.fields: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == self.name_:
            self.fields.append(dict(getattr(record, "kembali_fields", {})))
            action, self.action = self.action, None
            if action is not None:
                action()


@pytest.fixture
def on_event() -> Iterator[Callable[[str, Callable[[], None]], _OnEvent]]:
    logger = logging.getLogger("kembali")
    added: list[_OnEvent] = []
    level = logger.level
    logger.setLevel(logging.DEBUG)

    def add(name: str, action: Callable[[], None]) -> _OnEvent:
        handler = _OnEvent(name, action)
        logger.addHandler(handler)
        added.append(handler)
        return handler

    yield add
    for handler in added:
        logger.removeHandler(handler)
    logger.setLevel(level)


# --- the settings ------------------------------------------------------------------------------------------------


def test_the_defaults_give_up_a_lock_wait_after_30_s_and_end_a_session_idle_in_a_transaction_after_60_s() -> None:
    settings = Settings()
    assert settings.database.lock_timeout_seconds == 30
    assert settings.database.idle_in_transaction_timeout_seconds == 60


@pytest.mark.parametrize("key", ["lock_timeout_seconds", "idle_in_transaction_timeout_seconds"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must be 0 (no limit) or from 0.001 to 86400 seconds (a day), not -1"),
        (0.0001, "must be 0 (no limit) or from 0.001 to 86400 seconds (a day), not 0.0001"),
        (86401, "must be 0 (no limit) or from 0.001 to 86400 seconds (a day), not 86401"),
        ("30s", "must be float, not str ('30s')"),
    ],
)
def test_a_timeout_out_of_range_or_not_a_number_is_refused_by_name(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_dict({"database": {key: value}})
    assert f"'database.{key}' {message}" in str(caught.value)


@pytest.mark.parametrize("value", [0, 0.001, 1.5, 86400])
def test_zero_turns_a_timeout_off_and_fractions_of_a_second_are_taken(value: float) -> None:
    settings = settings_from_dict({"database": {"lock_timeout_seconds": value,
                                                "idle_in_transaction_timeout_seconds": value}})  # fmt: skip
    assert settings.database.lock_timeout_seconds == value == settings.database.idle_in_transaction_timeout_seconds


# --- on PostgreSQL -----------------------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("lock", "idle", "shown_lock", "shown_idle"),
    [(30, 60, "30s", "1min"), (1.5, 0.25, "1500ms", "250ms"), (0, 0, "0", "0")],
)
def test_every_connection_of_the_worker_has_the_configured_timeouts(
    pg_url: str, lock: float, idle: float, shown_lock: str, shown_idle: str
) -> None:
    settings = _settings(pg_url, lock_timeout_seconds=lock, idle_in_transaction_timeout_seconds=idle)
    store = Store.for_settings(settings)
    try:
        assert _shown(store.engine, "lock_timeout") == shown_lock
        assert _shown(store.engine, "idle_in_transaction_session_timeout") == shown_idle
        raw = store.engine.raw_connection()  # the group commit's own driver connection
        try:
            cursor = raw.cursor()
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone() == (shown_lock,)
        finally:
            raw.close()
    finally:
        store.close()
    engine = db.engine_for(settings)  # the commands' engine (db upgrade, ledger, reports)
    try:
        assert _shown(engine, "lock_timeout") == shown_lock
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_options_written_in_the_url_win_over_the_config(pg_url: str) -> None:
    url = sa.make_url(pg_url).update_query_dict({"options": "-c lock_timeout=5s -c application_name=mine"})
    settings = _settings(url.render_as_string(hide_password=False), lock_timeout_seconds=1)
    engine = db.engine_for(settings)
    try:
        assert _shown(engine, "lock_timeout") == "5s"
        assert _shown(engine, "application_name") == "mine"
        assert _shown(engine, "idle_in_transaction_session_timeout") == "1min"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_options_in_pgoptions_still_reach_the_server_and_win_over_the_config(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given settings libpq takes from $PGOPTIONS (as deploy/README's PGPASSWORD=… from its environment): a
    # statement timeout of the operator's, and a lock timeout of their own
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=12345 -c lock_timeout=7s")
    engine = db.engine_for(_settings(pg_url, lock_timeout_seconds=1))
    try:
        # Then the sessions have them (the options Kembali gives libpq replaced the variable, which went unused),
        # over the config as the URL's own are, with the config's other timeout beside them
        assert _shown(engine, "statement_timeout") == "12345ms"
        assert _shown(engine, "lock_timeout") == "7s"
        assert _shown(engine, "idle_in_transaction_session_timeout") == "1min"
    finally:
        engine.dispose()
    # And options in the URL win over $PGOPTIONS whole, as libpq has it
    url = sa.make_url(pg_url).update_query_dict({"options": "-c lock_timeout=5s"})
    engine = db.engine_for(_settings(url.render_as_string(hide_password=False), lock_timeout_seconds=1))
    try:
        assert _shown(engine, "lock_timeout") == "5s" and _shown(engine, "statement_timeout") == "0"
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_a_booking_behind_a_stuck_workers_rate_row_gives_up_says_why_and_goes_through_once_it_is_released(
    pg_migrated_url: str, on_event: Callable[[str, Callable[[], None]], _OnEvent]
) -> None:
    # Given the shared rate's row, locked by another worker's transaction that does not end (a stuck worker), and a
    # worker whose lock waits give up after a fifth of a second
    settings = _settings(pg_migrated_url, lock_timeout_seconds=0.2)
    store = Store.for_settings(settings)
    rates = RateStore(store.engine)
    rates.book([("global", 0.01, 10)])
    stuck = psycopg.connect(_driver_url(pg_migrated_url))
    stuck.execute("SELECT tat FROM rate_limit WHERE key = 'global' FOR UPDATE")
    # (the stuck transaction ends once the worker has said why it waits)
    said = on_event("db_lock_timeout", stuck.rollback)
    retried = on_event("rate_booking_retried", lambda: None)
    astore = AsyncStore(store)
    astore.RETRY_SECONDS = QUICK
    try:
        # When the worker books a send, Then it does not hang: the wait is given up, logged by name with the table
        # and the setting, tried again, and booked once the lock is released
        wait, booked = asyncio.run(asyncio.wait_for(DbBooker(astore, rates).book([("global", 0.01, 10)]), timeout=60))
    finally:
        astore.close()
        stuck.close()
        store.close()
    assert booked and wait >= 0
    [first, *_] = said.fields
    assert 'relation "rate_limit"' in first["waiting_for"]
    assert first["setting"] == "database.lock_timeout_seconds" and first["lock_timeout_seconds"] == 0.2
    assert "INSERT INTO rate_limit" in first["statement"]
    assert "canceling statement due to lock timeout" in retried.fields[0]["error"]


@pytest.mark.postgres
def test_a_session_left_idle_in_a_transaction_is_ended_by_the_server_and_its_locks_released(
    pg_migrated_url: str, on_event: Callable[[str, Callable[[], None]], _OnEvent]
) -> None:
    # Given a worker whose sessions may stay idle in a transaction a fifth of a second, which takes a rate row's
    # lock and then stops (its process stopped, say) before ending the transaction
    settings = _settings(pg_migrated_url, idle_in_transaction_timeout_seconds=0.2, lock_timeout_seconds=30)
    store = Store.for_settings(settings)
    RateStore(store.engine).book([("global", 0.01, 10)])
    said = on_event("db_idle_in_transaction_timeout", lambda: None)
    stuck = store.engine.connect()
    stuck.begin()
    pid = stuck.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    stuck.exec_driver_sql("SELECT tat FROM rate_limit WHERE key = 'global' FOR UPDATE").all()
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        # When it stays stopped, Then the server ends its session (its transaction rolled back, its lock released)
        with admin.connect() as conn:
            for _ in range(600):  # at most a minute, on a loaded machine: a bound, not a measure
                if not conn.execute(sa.text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).first():
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the server did not end the session idle in a transaction")
        # And another worker takes the row at once (a lock wait would give up after 30 s and fail this test)
        other = psycopg.connect(_driver_url(pg_migrated_url), options="-c lock_timeout=30s")
        with other:
            other.execute("UPDATE rate_limit SET tat = tat WHERE key = 'global'")
        # And the stopped worker, once it runs again, learns its session was ended, with the setting named
        with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction timeout") as caught:
            stuck.exec_driver_sql("SELECT 1")
        assert caught.value.connection_invalidated
        assert said.fields and said.fields[0]["setting"] == "database.idle_in_transaction_timeout_seconds"
        stuck.close()
        # And its next work runs on a new connection
        assert RateStore(store.engine).used_today("quota:x", day="2026-01-01") == 0
    finally:
        admin.dispose()
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("held", ["the shared rate's row", "a recipient's mailbox lock"])
def test_a_run_behind_a_stuck_workers_lock_sends_every_message_once(
    pg_migrated_url: str, held: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch,
    on_event: Callable[[str, Callable[[], None]], _OnEvent],
) -> None:  # fmt: skip
    # Given 12 customers due a win-back on PostgreSQL, the shared rate in the database, lock waits given up
    # after a fifth of a second, and a stuck worker holding the rate's row or the lock the group commit takes
    # on a recipient's mailbox
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_SECRET)
    monkeypatch.setattr(LedgerWriter, "RETRY_SECONDS", QUICK)
    monkeypatch.setattr(AsyncStore, "RETRY_SECONDS", QUICK)
    emails = [f"c{i}@test.example" for i in range(12)]
    settings = _settings(pg_migrated_url, smtp_server.port, lock_timeout_seconds=0.2)
    shop = Shop(pg_migrated_url, settings, emails)
    RateStore(shop.store.engine).book([("global", 0.01, 10)])
    stuck = psycopg.connect(_driver_url(pg_migrated_url))
    if held == "the shared rate's row":
        stuck.execute("SELECT tat FROM rate_limit WHERE key = 'global' FOR UPDATE")
    else:
        stuck.execute("SELECT pg_advisory_xact_lock(%s, hashtext(lower(%s)))", (MAILBOX_LOCKS, emails[5]))
    said = on_event("db_lock_timeout", stuck.rollback)
    try:
        # When a run sends what is due
        report = shop.cycle()
    finally:
        stuck.close()
        shop.close()
    # Then the wait was given up and said so, and every message went out exactly once, each row sent
    assert said.fields, "no lock wait was given up"
    assert report.dispatched.outcomes["sent"] == 12
    assert sorted(message_ids(smtp_server.messages).values()) == [1] * 12
    engine = db.create_engine(pg_migrated_url)
    try:
        with engine.connect() as conn:
            statuses = Counter(conn.exec_driver_sql("SELECT status FROM message").scalars())
            attempts = conn.exec_driver_sql("SELECT count(*) FROM attempt").scalar_one()
    finally:
        engine.dispose()
    assert statuses == {"sent": 12} and attempts == 12


@pytest.mark.postgres
def test_a_migration_behind_a_long_transaction_gives_up_changes_nothing_and_says_why(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a database one schema behind, a transaction that has read the ledger and not ended (a long report,
    # a stuck worker), and lock waits given up after a fifth of a second
    engine = db.create_engine(pg_url)
    cfg = db._alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0015")
    engine.dispose()
    config = _quick_to_give_up(tmp_path, pg_url)
    reader = psycopg.connect(_driver_url(pg_url))
    reader.execute("SELECT count(*) FROM message")
    try:
        # When the schema is upgraded, Then the migration (which must alter the ledger's table) does not wait
        # for ever, queueing every worker's statements on that table behind it: it gives up, changes nothing,
        # and says why, exiting 3 (try again later)
        code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
        assert code == 3, printed
        assert "waited 0.2 s (database.lock_timeout_seconds) for a lock another session holds" in printed
        assert "nothing was changed" in printed
        assert run_cli(capsys, "--config", str(config), "db", "status")[1].startswith("current: 0015")
    finally:
        reader.close()
    # And once that transaction has ended, the same command upgrades
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0 and "schema upgraded: 0015 -> 0020" in printed, printed


@pytest.mark.postgres
def test_a_command_behind_a_held_lock_stops_with_exit_3_and_says_why(
    pg_migrated_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the suppression list locked against writes by a transaction that does not end, and lock waits given up
    # after a fifth of a second
    config = _quick_to_give_up(tmp_path, pg_migrated_url)
    holder = psycopg.connect(_driver_url(pg_migrated_url))
    holder.execute("LOCK TABLE suppression IN SHARE MODE")
    try:
        # When an address is suppressed, Then the command does not hang: it stops with exit 3 (try again later),
        # naming the lock wait it gave up
        code, printed = run_cli(capsys, "--config", str(config), "suppress", "add", "budi@example.com")
        assert code == 3, printed
        assert 'db_lock_timeout statement="INSERT INTO suppression' in printed
        assert "could not be used: canceling statement due to lock timeout" in printed
    finally:
        holder.close()
    # And once the lock is gone, the same command works
    code, printed = run_cli(capsys, "--config", str(config), "suppress", "add", "budi@example.com")
    assert code == 0, printed


@pytest.mark.postgres
def test_an_import_behind_a_held_row_lock_stops_saying_how_far_it_got_and_finishes_when_run_again(
    pg_migrated_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 1,500 customers imported, one of them locked by a transaction that does not end (a stuck worker),
    # lock waits given up after a fifth of a second, and the file again with every name changed
    engine = db.create_engine(pg_migrated_url)
    config = _quick_to_give_up(tmp_path, pg_migrated_url)
    csv = tmp_path / "customers.csv"
    rows = [f"c{i},Budi,c{i}@example.com,yes" for i in range(1500)]
    csv.write_text("\n".join(["id,name,email,marketing_consent", *rows]) + "\n", encoding="utf-8")
    assert run_cli(capsys, "--config", str(config), "import", "customers", str(csv))[0] == 0
    csv.write_text("\n".join(["id,name,email,marketing_consent", *(r.replace(",Budi,", ",Sari,") for r in rows)])
                   + "\n", encoding="utf-8")  # fmt: skip
    holder = psycopg.connect(_driver_url(pg_migrated_url))
    holder.execute("SELECT 1 FROM customer WHERE external_id = 'c1200' FOR UPDATE")
    try:
        # When it is imported: the first 1,000 rows go in, the batch with the locked customer gives up
        code, printed = run_cli(capsys, "--config", str(config), "import", "customers", str(csv))
    finally:
        holder.close()

    # Then the import stops with exit 3 (try again later) and says what is in, as an interrupted one does: the
    # rows up to line 1001 are, and importing the file again finishes it
    with engine.connect() as conn:
        renamed = conn.exec_driver_sql("SELECT count(*) FROM customer WHERE name = 'Sari'").scalar_one()
    assert code == 3 and renamed == 1000, printed
    assert "customers.csv is imported up to line 1001, the rows after it are not (0 created, 1,000 updated" in printed
    assert "Import the file again to finish" in printed
    code, printed = run_cli(capsys, "--config", str(config), "import", "customers", str(csv))
    assert code == 0 and "0 created, 500 updated, 1,000 unchanged" in printed, printed
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("ended", ["idle in a transaction too long", "by pg_terminate_backend"])
def test_an_import_whose_session_the_server_ends_stops_saying_how_far_it_got_and_finishes_when_run_again(
    pg_migrated_url: str, ended: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given 1,500 customers, sessions that may stay idle in a transaction a second, and 1,500 orders of theirs
    engine = db.create_engine(pg_migrated_url)
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{pg_migrated_url}"\nidle_in_transaction_timeout_seconds = 1\n',
                      encoding="utf-8")  # fmt: skip
    customers, orders = tmp_path / "customers.csv", tmp_path / "orders.csv"
    customers.write_text("\n".join(["id,name,email,marketing_consent",
                                    *(f"c{i},Budi,c{i}@example.com,yes" for i in range(1500))]) + "\n", "utf-8")
    orders.write_text("\n".join(["order_id,customer_id,status,placed_at,total",
                                 *(f"o{i},c{i},paid,2026-01-01T10:00:00,100000" for i in range(1500))]) + "\n", "utf-8")
    assert run_cli(capsys, "--config", str(config), "import", "customers", str(customers))[0] == 0
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    reads = 0

    def stall_the_second_batch(conn: sa.Connection, _cursor: Any, statement: str, *_: Any) -> None:
        # the import's second batch, in its transaction (its customers read), stops before it reads the products
        # (its process stopped, say) until the server has ended its session: of its own accord when idle in a
        # transaction too long, or at an operator's pg_terminate_backend
        nonlocal reads
        if not statement.startswith("SELECT product.external_id"):
            return
        reads += 1
        if reads != 2:
            return
        pid = conn.connection.dbapi_connection.info.backend_pid  # type: ignore[union-attr]
        with admin.connect() as other:
            if ended == "by pg_terminate_backend":
                other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            for _ in range(600):  # at most a minute, on a loaded machine: a bound, not a measure
                if not other.execute(sa.text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).first():
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the server did not end the import's session")

    sa.event.listen(sa.Engine, "before_cursor_execute", stall_the_second_batch)
    try:
        # When the orders are imported: the first 1,000 go in, the server ends the session in the second batch
        code, printed = run_cli(capsys, "--config", str(config), "import", "orders", str(orders))
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", stall_the_second_batch)
        admin.dispose()

    # Then the import stops with exit 3 (try again later) and says what is in, in the words it has for a batch that
    # gave up a lock wait: the orders up to line 1001 are, and importing the file again finishes it
    with engine.connect() as conn:
        imported = conn.exec_driver_sql("SELECT count(*) FROM shop_order").scalar_one()
    assert reads == 2 and code == 3 and imported == 1000, printed
    said = {"idle in a transaction too long": "the database server ended the session, idle in a transaction longer "
                                              "than database.idle_in_transaction_timeout_seconds (1 s) (PostgreSQL "
                                              "25P03: terminating connection due to idle-in-transaction timeout)",
            "by pg_terminate_backend": "the connection to the database was lost (PostgreSQL 57P01: terminating "
                                       "connection due to administrator command)"}[ended]  # fmt: skip
    assert (f"kembali import: stopped: {said}: orders.csv is imported up to line 1001, the rows after it "
            "are not (1,000 created, 0 updated, 0 unchanged, 0 rejected).") in printed, printed
    assert "Import the file again to finish" in printed, printed
    assert "could not be used: " in printed and "Traceback" not in printed, printed
    code, printed = run_cli(capsys, "--config", str(config), "import", "orders", str(orders))
    assert code == 0 and "500 created, 0 updated, 1,000 unchanged" in printed, printed
    engine.dispose()


@pytest.mark.postgres
def test_a_run_while_another_worker_plans_the_campaign_longer_than_the_lock_timeout_waits_for_it_and_sends(
    pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 3 customers due a win-back on PostgreSQL, lock waits given up after a fifth of a second, and another
    # worker planning win-back (it holds the campaign's planning lock: a large shop's pass takes its time)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_SECRET)
    emails = [f"c{i}@test.example" for i in range(3)]
    settings = _settings(pg_migrated_url, smtp_server.port, lock_timeout_seconds=0.2)
    shop = Shop(pg_migrated_url, settings, emails)
    planner = psycopg.connect(_driver_url(pg_migrated_url), autocommit=True)
    planner.execute("SELECT pg_advisory_lock(%s, hashtext('winback'))", (PLAN_LOCKS,))
    done = threading.Event()

    def finish_planning() -> None:  # once the run waits on the lock, longer than the lock timeout
        with psycopg.connect(_driver_url(pg_migrated_url), autocommit=True) as watcher:
            while not done.is_set():
                waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                                          "AND datname = current_database()").fetchone()  # fmt: skip
                if waiting and waiting[0]:
                    time.sleep(1.0)
                    break
                time.sleep(0.02)
        planner.execute("SELECT pg_advisory_unlock(%s, hashtext('winback'))", (PLAN_LOCKS,))

    other = threading.Thread(target=finish_planning)
    other.start()
    try:
        # When a run plans and sends
        report = shop.cycle()
    finally:
        done.set()
        other.join()
        planner.close()
        shop.close()
    # Then it waited for the other worker's pass (the planning lock is not given up at the lock timeout: its holder
    # is a pass at work, or ended by the server when idle) and sent every message once
    assert report.dispatched.outcomes["sent"] == 3
    assert sorted(message_ids(smtp_server.messages).values()) == [1] * 3

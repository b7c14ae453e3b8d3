"""Upgrading: the schema and the code of several hosts at different versions, and migrations run at once."""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from tests.clikit import cpu_seconds, run_cli, run_on_a_terminal
from tests.daemon_harness import Daemon, make_shop
from tests.shop import LINK_KEY, ROOT
from tests.smtp_server import RecordingServer
from worker.adapters import db, shop
from worker.adapters.store import Store
from worker.domain import CustomerRecord, Locale

AHEAD = "0099_from_a_newer_kembali"
"""A revision this code does not have: what a newer Kembali on another host left in ``alembic_version``."""
NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def _schema_at(url: str, revision: str) -> None:
    """The schema as the Kembali of ``revision`` left it."""
    engine = db.create_engine(url)
    try:
        cfg = db._alembic_config(engine)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = db.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_a_kembali_older_than_the_database_refuses_to_start_says_so_and_changes_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a database another host's newer Kembali has upgraded past the newest schema this one has, with a
    # customer due a win-back in it
    url = request.getfixturevalue(f"{kind}_url")
    _schema_at(url, "head")
    engine = db.create_engine(url)
    shop.upsert_customers(engine, [CustomerRecord("C1", "c1@example.com", "C 1", Locale.ID, "Asia/Jakarta", None,
                                                  True, "", "")], NOW)  # fmt: skip
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": AHEAD})
    engine.dispose()
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    head = db.newest_revision()
    # When this (older) Kembali is started, or asked to migrate
    for argv in (["run", "--once"], ["preview"], ["db", "upgrade"]):
        code, printed = run_cli(capsys, "--config", str(config), *argv)
        # Then it refuses with exit 3, naming both revisions and what to do: not "run `kembali db upgrade`",
        # which this version cannot do (it was a traceback), and which would send the operator round in circles
        assert code == 3, (argv, printed)
        assert f"is at schema {AHEAD}, newer than this kembali (its newest is {head})" in printed, (argv, printed)
        assert "install the newer kembali on this host" in printed, printed
        assert "Traceback" not in printed and "db upgrade`" not in printed, printed
    # And `db status` says which is newer
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 3 and printed.startswith(f"current: {AHEAD} (newer than this kembali)  newest: {head}"), printed
    # And nothing was changed: no message planned, the revision as the newer Kembali left it
    assert _query(url, "SELECT count(*) FROM message") == [(0,)]
    assert _query(url, "SELECT version_num FROM alembic_version") == [(AHEAD,)]


def _kembali(config: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


@pytest.mark.postgres
def test_two_hosts_upgrading_postgresql_at_once_one_waits_for_the_other_and_neither_fails(
    pg_url: str, tmp_path: Path
) -> None:
    # Given a database one schema behind, whose migration cannot finish yet (a session holds the table it changes),
    # and lock waits not given up
    _schema_at(pg_url, "0017")
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{pg_url}"\nlock_timeout_seconds = 0\n', encoding="utf-8")
    holder = psycopg.connect(sa.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False))
    holder.execute("LOCK TABLE customer IN ACCESS EXCLUSIVE MODE")
    name = sa.make_url(pg_url).database
    # When two hosts run `kembali db upgrade` at the same moment
    upgrades = [_kembali(config, "db", "upgrade") for _ in range(2)]
    try:
        watcher = psycopg.connect(sa.make_url(pg_url).set(drivername="postgresql", database="postgres")
                                  .render_as_string(hide_password=False), autocommit=True)  # fmt: skip
        with watcher:
            for _ in range(6000):  # both are under way, each waiting for a lock (a bound on a hung test only)
                waiting = watcher.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                                          "wait_event_type = 'Lock'", (name,)).fetchone()  # fmt: skip
                if waiting == (2,) or any(p.poll() is not None for p in upgrades):
                    break
                watcher.execute("SELECT pg_sleep(0.01)")
    finally:
        holder.rollback()
        holder.close()
    results = [(p.wait(timeout=120), p.communicate()[0]) for p in upgrades]
    # Then both succeed: one migrates, the other waits for it and finds nothing left to do
    assert [code for code, _ in results] == [0, 0], results
    said = sorted(out.strip().splitlines()[-1] for _, out in results)
    assert said[0].startswith("schema already at 0020 (postgresql+psycopg://"), results
    waited = next(out for _, out in results if "schema already at 0020" in out)
    assert "another `kembali db upgrade` is migrating" in waited and "waiting for it to finish" in waited, waited
    assert said[1].startswith("schema upgraded: 0017 -> 0020"), results
    assert _query(pg_url, "SELECT version_num FROM alembic_version") == [("0020",)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_an_sqlite_migration_stopped_while_it_copies_a_table_says_so_and_leaves_the_schema_as_it_was(
    tmp_path: Path, sig: signal.Signals
) -> None:
    # Given an SQLite database at 0007, whose next migration copies the ledger into a rebuilt table, and a ledger
    # that copy never gets to the end of (a view repeating its one row without end, as a copy of many millions
    # keeps SQLite busy, in C, for minutes)
    path = tmp_path / "k.db"
    _schema_at(f"sqlite:///{path}", "0007")
    with sqlite3.connect(path) as conn:
        conn.executescript("""
            INSERT INTO customer (id, external_id, email, name, locale, time_zone, marketing_consent, consent_basis,
                consent_source, order_count, total_spent_minor, created_at, updated_at)
                VALUES (1, 'C1', 'c1@example.com', 'C 1', 'id', 'Asia/Jakarta', 1, '', '', 1, 0, '2026-01-01',
                '2026-01-01');
            ALTER TABLE message RENAME TO message_rows;
            INSERT INTO message_rows (dedupe_key, campaign, step, priority, customer_id, email, status, due_at,
                expires_at, next_attempt_at, attempts, message_id, payload, created_at, updated_at)
                VALUES ('k', 'winback', 1, 0, 1, 'c1@example.com', 'sent', '2026-01-01', '2026-01-01', '2026-01-01',
                1, '<1@x>', '{}', '2026-01-01', '2026-01-01');
            CREATE VIEW message AS
                WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)
                SELECT message_rows.* FROM n CROSS JOIN message_rows;
        """)
    conn.close()
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///k.db"\n', encoding="utf-8")
    # and the processor time `db status` takes (the start of every db command: Python, SQLAlchemy, Alembic)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    status = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "db", "status"], cwd=ROOT,
                            capture_output=True, text=True, check=False)  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert status.stdout.startswith("current: 0007"), status
    baseline = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    # When `db upgrade` has spent well more than that, so it is copying, and the signal comes (to its process group,
    # as Ctrl-C and `timeout` send it)
    child = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config), "db", "upgrade"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for _ in range(3000):  # (a bound on a hung test only)
            if cpu_seconds(child.pid) > 2 * baseline + 1 or child.poll() is not None:
                break
            time.sleep(0.02)
        os.killpg(child.pid, sig)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    # Then it says it stopped, by which signal, as the other commands do, with the shell's exit code (it said it
    # could not open the database, exit 2: the failure of Alembic's clean-up after SQLite had rolled back)
    assert child.returncode == 128 + sig.value, stderr
    assert stderr.strip().splitlines() == [f"kembali db: stopped by {sig.name}"], stderr
    # And the database is as it was: at 0007, whole, its ledger in place; the next `db status` says so
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0007",)]
        assert conn.execute("SELECT count(*) FROM message_rows").fetchone() == (1,)
    conn.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_a_shop_from_the_first_schema_upgrades_to_the_newest_with_its_data_and_the_facts_derived_from_it(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Given a database as the first Kembali left it (0001), holding a shop (customers, a product, an order and its
    # line), a suppression and a ledger that has sent (a message, its attempt)
    url = request.getfixturevalue(f"{kind}_url")
    _schema_at(url, "0001")
    placed, delivered = NOW - timedelta(days=60), NOW - timedelta(days=57)
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            for cid, email, birthday in ((1, "budi@example.com", date(1990, 3, 7)), (2, "siti@BÜCHER.de", None)):
                conn.execute(sa.text(
                    "INSERT INTO customer (id, external_id, email, name, locale, time_zone, birthday,"
                    " marketing_consent, consent_basis, consent_source, order_count, first_order_id, first_order_at,"
                    " last_order_at, total_spent_minor, created_at, updated_at) VALUES (:id, :ext, :email, 'N', 'id',"
                    " 'Asia/Jakarta', :birthday, true, 'opt_in', 'checkout', :orders, :first, :placed, :placed,"
                    " :spent, :t, :t)"
                ), {"id": cid, "ext": f"C{cid}", "email": email, "birthday": birthday, "orders": 1 if cid == 1 else 0,
                    "first": 1 if cid == 1 else None, "placed": placed if cid == 1 else None,
                    "spent": 150_000 if cid == 1 else 0, "t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO product (id, external_id, name, category, price_minor, currency, url, image_url, active,"
                " created_at, updated_at) VALUES (1, 'P1', 'Batik', 'kain', 75000, 'IDR', '', '', true, :t, :t)"
            ), {"t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO shop_order (id, external_id, customer_id, status, placed_at, delivered_at, total_minor,"
                " currency, created_at, updated_at) VALUES (1, 'O-1', 1, 'delivered', :p, :d, 150000, 'IDR', :t, :t)"
            ), {"p": placed, "d": delivered, "t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO order_line (id, order_id, line_no, product_external_id, product_id, quantity,"
                " unit_price_minor) VALUES (1, 1, 1, 'P1', 1, 2, 75000)"
            ))  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO suppression (id, email, reason, source, created_at) VALUES (1, 'Ani@Example.COM',"
                " 'complaint', 'import', :t)"
            ), {"t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO message (id, dedupe_key, campaign, step, priority, customer_id, email, status, due_at,"
                " expires_at, next_attempt_at, attempts, message_id, payload, created_at, updated_at, sent_at)"
                " VALUES (1, 'winback:C1:O-1:1', 'winback', 1, 0, 1, 'budi@example.com', 'sent', :t, :t, :t, 1,"
                " '<a@shop.example>', '{}', :t, :t, :t)"
            ), {"t": NOW})  # fmt: skip
            conn.execute(sa.text(
                "INSERT INTO attempt (id, message_id, attempt_no, worker, started_at, finished_at, outcome, code,"
                " reply, error_type) VALUES (1, 1, 1, 'w', :t, :t, 'sent', 250, '2.0.0 Ok', '')"
            ), {"t": NOW})  # fmt: skip
        # When it is upgraded to the newest schema
        assert db.upgrade(engine) == ("0001", db.newest_revision())
        db.check_schema(engine)
        # Then every row is there, and what later revisions derive from the data was filled in for the old rows
        with engine.connect() as conn:
            def rows(sql: str) -> list[tuple[object, ...]]:
                return [tuple(r) for r in conn.execute(sa.text(sql))]

            assert rows("SELECT external_id, email, birthday_mmdd, first_order_external_id, order_count,"
                        " total_spent_minor FROM customer ORDER BY id") == [
                ("C1", "budi@example.com", 307, "O-1", 1, 150_000),
                ("C2", "siti@xn--bcher-kva.de", None, None, 0, 0),  # the domain in the form imports store (0012)
            ]  # fmt: skip
            assert rows("SELECT external_id, name, price_minor FROM product") == [("P1", "Batik", 75000)]
            assert rows("SELECT external_id, customer_id, total_minor FROM shop_order") == [("O-1", 1, 150000)]
            settled = conn.execute(sa.text("SELECT settled_at FROM shop_order")).scalar_one()
            assert rows("SELECT order_id, product_id, quantity FROM order_line") == [(1, 1, 2)]
            assert rows("SELECT email, reason FROM suppression") == [("ani@example.com", "complaint")]
            assert rows("SELECT message_id, outcome, code FROM attempt") == [(1, "sent", 250)]
        assert _as_utc(settled) == delivered  # 0006: an order settles when it is delivered
        # And the code reads the ledger as it was: the message sent, its Message-ID and attempt kept
        store = Store.from_url(url)
        try:
            [message] = store.messages()
            assert (message["dedupe_key"], message["status"], message["message_id"], message["attempts"]) == (
                "winback:C1:O-1:1", "sent", "<a@shop.example>", 1)
            assert message["resent_after_attempts"] == 0
            assert len(store.attempts_for(message["id"])) == 1
        finally:
            store.close()
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_an_unsubscribe_listed_beside_an_earlier_bounce_in_another_case_stays_the_customers_own_wish_once_upgraded(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # Given a suppression list from before entries were one per mailbox (schema 0011): an operator's hard bounce for
    # Ani@Example.COM, then Ani's own unsubscribe, from the link, as ani@example.com
    url = request.getfixturevalue(f"{kind}_url")
    _schema_at(url, "0011")
    bounced, unsubscribed = NOW - timedelta(days=40), NOW - timedelta(days=3)
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO suppression (id, email, reason, source, created_at) VALUES"
                " (1, 'Ani@Example.COM', 'hard_bounce', 'manual', :b),"
                " (2, 'ani@example.com', 'unsubscribed', 'link', :u)"
            ), {"b": bounced, "u": unsubscribed})  # fmt: skip
        # When the database is upgraded, which folds the two into one entry
        assert db.upgrade(engine)[1] == db.newest_revision()
        # Then the entry kept is the customer's own unsubscribe, as `suppress import` keeps of an address listed
        # twice: the earliest was kept, so the unsubscribe was gone from the list and from `stats`
        [(email, reason, source, created)] = _query(url, "SELECT email, reason, source, created_at FROM suppression")
        assert (email, reason, source, _as_utc(created)) == ("ani@example.com", "unsubscribed", "link", unsubscribed)
        # And it follows Ani to the address the next import gives her, as an unsubscribe does (a bounce stays with
        # its dead mailbox: she was mailed at the new one)
        shop.upsert_customers(engine, [CustomerRecord("C1", "ani@example.com", "Ani", Locale.ID, "Asia/Jakarta", None,
                                                      True, "opt_in", "checkout")], NOW)  # fmt: skip
        shop.upsert_customers(engine, [CustomerRecord("C1", "ani.baru@example.com", "Ani", Locale.ID, "Asia/Jakarta",
                                                      None, True, "opt_in", "checkout")], NOW)  # fmt: skip
        assert ("ani.baru@example.com", "unsubscribed") in _query(url, "SELECT email, reason FROM suppression")
    finally:
        engine.dispose()


def _as_utc(value: object) -> datetime:
    """A timestamp as either database returns it (SQLite: text or a naive datetime in UTC)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_a_running_daemon_stops_when_another_host_upgrades_the_database_past_it(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon up on a database at this Kembali's newest schema
    shop_ = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop_)
    try:
        daemon.wait_event("daemon_started")
        # When another host's newer Kembali upgrades the database under it
        engine = db.create_engine(shop_.db_url)
        head = db.newest_revision()
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": AHEAD})
        engine.dispose()
        # Then at its next maintenance it says so, naming both revisions, and stops as on SIGTERM, exiting 3 (it
        # went on claiming and writing rows in a schema it does not know)
        changed = daemon.wait_event("schema_changed", timeout=60)
        code = daemon.wait(60)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 3, daemon.log()
    assert (changed["schema"], changed["newest_known"]) == (AHEAD, head), changed
    assert "install the newer kembali on this host" in changed["what_to_do"], changed
    assert daemon.named("daemon_stopped")[-1]["exit_code"] == 3, daemon.log()


def test_a_daemon_whose_database_is_put_back_to_an_older_schema_names_its_config_by_its_full_path(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon up, started in its folder with a relative --config (as `kembali --config config.toml run`)
    shop_ = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    daemon = Daemon.start(shop_, cwd=tmp_path, config="config.toml")
    try:
        daemon.wait_event("daemon_started")
        # When its database is put back to the previous schema (restored from an older copy)
        engine = db.create_engine(shop_.db_url)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0017'"))
        engine.dispose()
        # Then it stops saying which command migrates it: with the config by its full path, which the operator can
        # run from any folder (`--config config.toml` works only where the daemon was started)
        changed = daemon.wait_event("schema_changed", timeout=60)
        code = daemon.wait(60)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 3, daemon.log()
    assert changed["schema"] == "0017", changed
    assert f"run `kembali --config {shop_.config.resolve()} db upgrade`" in changed["what_to_do"], changed


NEWER_MIGRATION = '''"""a revision a newer kembali brings"""

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
'''


def test_a_daemon_running_when_its_host_installs_a_newer_kembali_and_upgrades_does_not_advise_a_restore(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a daemon up, run from its installed package (a copy of it, to be replaced by a newer one)
    shop_ = make_shop(tmp_path / "shop", smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    installed = tmp_path / "site-packages"
    shutil.copytree(ROOT / "worker", installed / "worker", ignore=shutil.ignore_patterns("__pycache__"))
    daemon = Daemon.start(shop_, cwd=installed)
    try:
        daemon.wait_event("daemon_started")
        head = db.newest_revision()
        # When a newer kembali, one revision ahead, is installed on this host over it (pip install -U) and its
        # `db upgrade` migrates the database, the daemon not stopped first
        (installed / "worker" / "migrations" / "versions" / "9999_newer.py").write_text(
            NEWER_MIGRATION.format(head=head), encoding="utf-8")
        upgrade = subprocess.run([sys.executable, "-m", "worker", "--config", str(shop_.config), "db", "upgrade"],
                                 cwd=installed, capture_output=True, text=True, check=False)  # fmt: skip
        assert upgrade.returncode == 0 and f"{head} -> 9999" in upgrade.stdout, upgrade
        # Then the daemon stops (exit 3) saying the database is newer than it: a newer kembali to run, not "run `db
        # upgrade`, or restore the database at schema 0018", which would throw away what was written since (it read
        # the migrations installed now, not those it runs with, and found the newer one among them)
        changed = daemon.wait_event("schema_changed", timeout=60)
        code = daemon.wait(60)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    assert code == 3, daemon.log()
    assert (changed["schema"], changed["newest_known"]) == ("9999", head), changed
    assert "install the newer kembali on this host" in changed["what_to_do"], changed
    assert "restore" not in changed["what_to_do"], changed


def test_a_kembali_newer_than_the_database_does_not_migrate_it_but_gives_the_exact_command_that_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a database as the previous Kembali left it (one schema behind), and its config in a folder of its own
    url = f"sqlite:///{tmp_path / 'k.db'}"
    _schema_at(url, "0017")
    config = tmp_path / "etc kembali" / "config.toml"
    config.parent.mkdir()
    config.write_text(f'[database]\nurl = "{url}"\n[templates]\ndir = "{ROOT / "templates" / "email"}"\n',
                      encoding="utf-8")
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    # When this Kembali is run on it with that config
    code, printed = run_cli(capsys, "--config", str(config), "run", "--once")
    # Then it refuses (exit 3), naming both revisions and the command to run, with the config it was given (the bare
    # `kembali db upgrade` would look for ./config.toml wherever the operator stands)
    assert code == 3, printed
    assert (f"is at schema 0017, the code needs 0020: run `kembali --config '{config}' db upgrade`") in printed, printed
    # and has not migrated it by itself
    assert _query(url, "SELECT version_num FROM alembic_version") == [("0017",)]
    # And that command, as given, upgrades it, after which the run starts
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0 and printed.startswith("schema upgraded: 0017 -> 0020"), printed
    code, printed = run_cli(capsys, "--config", str(config), "run", "--once")
    assert code == 0, printed


def test_check_on_a_database_an_older_kembali_left_names_the_upgrade_with_the_config_it_was_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a service's config outside the operator's folder, whose database an older kembali left at schema 0016
    path = tmp_path / "srv" / "k.db"
    path.parent.mkdir()
    _schema_at(f"sqlite:///{path}", "0016")
    config = path.parent / "config.toml"
    templates = (ROOT / "templates" / "email").as_posix()
    config.write_text(f'[database]\nurl = "sqlite:///k.db"\n\n[templates]\ndir = "{templates}"\n', encoding="utf-8")
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    monkeypatch.chdir(tmp_path)
    # When the new kembali's config is checked before the upgrade, as a deploy does
    code, printed = run_cli(capsys, "--config", str(config), "check")
    # Then its note that the ledger was not read gives the command that upgrades this database, with its --config,
    # as every other command's refusal does: the bare `kembali db upgrade` reads ./config.toml, not this one
    assert code == 0, printed
    assert (f"the database {path} is at schema 0016, the code needs {db.newest_revision()}: run "
            f"`kembali --config {config} db upgrade`") in printed, printed


def test_an_sqlite_upgrade_behind_a_long_writer_gives_up_says_why_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an SQLite database one schema behind, whose write lock another program holds longer than SQLite waits
    # for it (0.2 s here, 30 s as shipped): a daemon not stopped, an import, another `db upgrade` still migrating
    path = tmp_path / "k.db"
    _schema_at(f"sqlite:///{path}", "0017")
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///k.db"\n', encoding="utf-8")
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        # When the schema is upgraded
        code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    finally:
        writer.rollback()
        writer.close()
    # Then it gives up, saying so and that nothing was changed, exit 3 (try again), as on PostgreSQL: it said it could
    # not open the database, exit 2 (a bad config), of a database it had just read
    assert code == 3, printed
    assert (f"kembali: the migration waited 0.2 s for the write lock another program holds on {path} (a kembali "
            "run or import, another `db upgrade`): nothing was changed; try again, or stop the workers first"
            ) in printed, printed  # fmt: skip
    assert "cannot open" not in printed and "Traceback" not in printed
    assert _query(f"sqlite:///{path}", "SELECT version_num FROM alembic_version") == [("0017",)]
    # And once the writer is done, the same command upgrades
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0 and printed.startswith("schema upgraded: 0017 -> 0020"), printed


@pytest.mark.parametrize("case", ["full", "read-only"])
def test_an_sqlite_upgrade_the_file_cannot_take_says_what_to_do_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    # Given an SQLite database two schemas behind that cannot take the migration's writes: full (its size capped
    # where it stands, as a full disk stops it), or read-only (as a file the user cannot write; chmod does not stop
    # root, PRAGMA query_only does)
    path = tmp_path / "k.db"
    _schema_at(f"sqlite:///{path}", "0016")
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///k.db"\n', encoding="utf-8")
    pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
    statement = f"PRAGMA max_page_count = {pages}" if case == "full" else "PRAGMA query_only = ON"

    def limit(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.execute(statement)

    sa.event.listen(sa.Engine, "connect", limit)
    try:
        # When the schema is upgraded
        code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    finally:
        sa.event.remove(sa.Engine, "connect", limit)
    # Then it stops with exit 3, as an import does, saying what happened, that the database is at its old schema and
    # what to do: it said it could not open the database it had just read, exit 2 (a bad config)
    said, remedy = {
        "full": ("the database is full (SQLite: database or disk is full)",
                 f"Free space on the disk that holds {path}."),
        "read-only": ("the database cannot be written (SQLite: attempt to write a readonly database)",
                      f"Let the user running kembali write {path} and its folder"),
    }[case]  # fmt: skip
    assert code == 3, printed
    assert (f"kembali: the migration of {path} stopped: {said}: nothing was changed, it is at schema 0016. "
            f"{remedy}") in printed, printed
    assert "cannot open" not in printed and "Traceback" not in printed, printed
    assert _query(f"sqlite:///{path}", "SELECT version_num FROM alembic_version") == [("0016",)]
    # And once the file can take it, the same command upgrades
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0 and printed.startswith("schema upgraded: 0016 -> 0020"), printed


@contextmanager
def _unwritable(folder: Path) -> Iterator[None]:
    """``folder`` as a user who may not write it sees it: no file can be made in it (as root, whom no mode stops, by
    the immutable attribute); the test is skipped where neither can be set."""
    as_root = os.geteuid() == 0
    if as_root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not allowed here")
    else:
        folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("the folder stays writable")
        yield
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


def test_an_sqlite_database_whose_folder_cannot_be_written_is_said_to_be_so_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a ledger an older kembali left, copied or restored into a folder the user running kembali may not write
    # (the service's file chowned to it, its folder still root's): SQLite makes its -wal and -shm files beside the
    # database, so it cannot open a database in WAL mode there, though the file itself can be read and written
    folder = tmp_path / "srv"
    folder.mkdir()
    path = folder / "k.db"
    _schema_at(f"sqlite:///{path}", "0016")
    assert not path.with_name("k.db-wal").exists() and not path.with_name("k.db-shm").exists()
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{path}"\n', encoding="utf-8")
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    with _unwritable(folder):
        # When it is upgraded, or any other command is run on it
        for argv, exit_code in ((["db", "upgrade"], 2), (["db", "status"], 2), (["stats"], 3), (["run", "--once"], 3)):
            code, printed = run_cli(capsys, "--config", str(config), *argv)
            # Then each says which folder it cannot write and why that stops it, with its exit code as before: it
            # said only "unable to open database file", of a file that is there and that this user can write
            assert code == exit_code, (argv, printed)
            assert (f"kembali: cannot open the database {path}: unable to open database file: SQLite makes its -wal "
                    f"and -shm files beside the database, and this user cannot write the folder {folder}: let the "
                    "user that runs kembali write it") in printed, (argv, printed)  # fmt: skip
    # And once the folder can be written, the same command upgrades
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0 and printed.startswith("schema upgraded: 0016 -> 0020"), printed


@pytest.mark.postgres
def test_a_postgresql_upgrade_on_a_database_that_takes_no_writes_says_what_to_do_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    # Given a PostgreSQL database one schema behind that takes no writes (a standby, default_transaction_read_only)
    _schema_at(pg_url, "0017")
    name = sa.make_url(pg_url).database
    engine = db.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    finally:
        engine.dispose()
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{pg_url}"\n', encoding="utf-8")
    # When the schema is upgraded
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    # Then it stops with exit 3, saying what happened and what to do, and that nothing was changed
    assert code == 3, printed
    assert ("stopped: the database takes no writes (PostgreSQL 25006: cannot execute DROP INDEX in a read-only "
            "transaction): nothing was changed, it is at schema 0017. Point [database] url at the primary server"
            ) in printed, printed  # fmt: skip
    assert "Traceback" not in printed, printed
    assert _query(pg_url, "SELECT version_num FROM alembic_version") == [("0017",)]


def test_an_upgrade_on_a_terminal_names_each_revision_as_it_runs_it(tmp_path: Path) -> None:
    # Given a database four schemas behind: on a big ledger a revision takes minutes (0008 rebuilds the ledger's
    # table on SQLite: 8 s for a million rows), and the terminal stayed silent all that time, as if it had hung
    path = tmp_path / "k.db"
    _schema_at(f"sqlite:///{path}", "0015")
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///k.db"\n', encoding="utf-8")
    # When it is upgraded on a terminal
    code, seen = run_on_a_terminal(["--config", str(config), "db", "upgrade"], stdout_too=True, cwd=ROOT)
    # Then a progress line names each revision before it runs, with how many there are, and is gone before the result
    assert code == 0, seen
    text = seen.decode()
    lines = re.findall(r"\r(migrating: [^\r]*)\x1b\[K", text)
    assert lines == ["migrating: 1 of 5: 0016 message.resent_after_attempts: an operator's…",
                     "migrating: 2 of 5: 0017 the ledger's uncertain rows, counted for every…",
                     "migrating: 3 of 5: 0018 the customer records of a mailbox, for the…",
                     "migrating: 4 of 5: 0019 shop_order.paid_at and customer.last_paid_at:…",
                     "migrating: 5 of 5: 0020 message.dedupe_key up to 1000 characters on…"], text
    assert all(len(line) < 80 for line in lines), lines  # a line that wraps is not erased by the next
    assert "\r\x1b[Kschema upgraded: 0015 -> 0020" in text, text


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_an_upgrade_of_a_database_holding_another_programs_tables_of_kembalis_names_refuses_by_name(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given database.url pointing at a database with no Kembali schema that holds another program's tables, two of
    # them named as Kembali's are (the shop's own database: its products and orders)
    url = request.getfixturevalue(f"{kind}_url")
    where, config = _another_programs_database(
        url, tmp_path, "CREATE TABLE product (id INTEGER PRIMARY KEY, sku VARCHAR(20))",
        "CREATE TABLE shop_order (id INTEGER PRIMARY KEY)", "CREATE TABLE cart (id INTEGER PRIMARY KEY)",
        "INSERT INTO product VALUES (1, 'BATIK-1')",
    )  # fmt: skip
    # When the schema is created there
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    # Then it refuses, naming the database and the tables in the way, and changes nothing: on PostgreSQL it was a
    # traceback (exit 1), on SQLite "cannot open the database …: table product already exists" (exit 2)
    assert code == 3, printed
    assert (f"kembali: the database {where} has no Kembali schema but holds tables of the names Kembali's take: "
            "product, shop_order (another program's?): nothing was changed; point database.url at a database of "
            "Kembali's own") in printed, printed  # fmt: skip
    assert "Traceback" not in printed and "cannot open" not in printed, printed
    assert _query(url, "SELECT id, sku FROM product") == [(1, "BATIK-1")]
    engine = db.create_engine(url)
    try:
        with db.reading(engine) as conn:
            assert sorted(sa.inspect(conn).get_table_names()) == ["cart", "product", "shop_order"]
    finally:
        engine.dispose()
    # And `db status` says so too, where it called such a database empty
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 3 and printed.startswith(
        "current: (no Kembali schema; other tables, of Kembali's names: product, shop_order)  newest: 0020"), printed


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_the_other_commands_on_another_programs_tables_of_kembalis_names_do_not_send_the_operator_to_db_upgrade(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given database.url pointing at the shop's own database, whose product and shop_order tables take Kembali's names
    url = request.getfixturevalue(f"{kind}_url")
    where, config = _another_programs_database(
        url, tmp_path, "CREATE TABLE product (id INTEGER PRIMARY KEY, sku VARCHAR(20))",
        "CREATE TABLE shop_order (id INTEGER PRIMARY KEY)",
    )  # fmt: skip
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    # When the commands that need the schema are run on it
    for argv in (["stats"], ["preview"], ["suppress", "list"], ["run", "--once"]):
        code, printed = run_cli(capsys, "--config", str(config), *argv)
        # Then they refuse with exit 3 naming the tables in the way, as `db upgrade` and `db status` do; they said
        # the database "has no schema: run `kembali db upgrade`", which then refused: the operator went round in a
        # circle
        assert code == 3, (argv, printed)
        assert (f"kembali: the database {where} has no Kembali schema but holds tables of the names Kembali's take: "
                "product, shop_order (another program's?): nothing was changed; point database.url at a database "
                "of Kembali's own") in printed, (argv, printed)  # fmt: skip
        assert "db upgrade" not in printed, (argv, printed)
    assert _query(url, "SELECT count(*) FROM product") == [(0,)]


@pytest.mark.postgres
def test_a_postgresql_upgrade_by_a_user_who_may_not_create_tables_says_what_to_grant_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pg_url: str
) -> None:
    # Given a PostgreSQL database owned by another user, and Kembali's own user, who may connect but, as PostgreSQL
    # 15 and later have it, not create tables in its public schema
    role = f"kembali_upgrade_{os.getpid()}"
    admin = db.create_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
    url = sa.make_url(pg_url).set(username=role, password=None).render_as_string(hide_password=False)
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    try:
        # When that user creates the schema
        code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()
    # Then it stops with exit 3, saying what the server refused and what to grant, where it was a traceback (exit 1)
    assert code == 3, printed
    assert ("stopped: the database user may not do this (PostgreSQL 42501: permission denied for schema public): "
            "nothing was changed, it is at schema (empty). Grant the user of [database] url what it needs") \
        in printed, printed  # fmt: skip
    assert "GRANT CREATE ON SCHEMA public TO" in printed, printed
    assert "Traceback" not in printed, printed
    assert _query(pg_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == [(0,)]


def test_an_sqlite_ledger_whose_customer_was_deleted_by_hand_still_upgrades_and_the_upgrade_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an SQLite database one schema behind whose customer C1, named by a sent message and an order, was deleted
    # in the sqlite3 shell, which checks no foreign keys unless told to
    path = tmp_path / "k.db"
    url = f"sqlite:///{path}"
    _schema_at(url, "0017")
    shell = sqlite3.connect(path, isolation_level=None)
    try:
        shell.execute("INSERT INTO customer (id, external_id, email, name, locale, time_zone, marketing_consent,"
                          " consent_basis, consent_source, order_count, total_spent_minor, created_at, updated_at)"
                      " VALUES (1, 'C1', 'budi@example.com', 'Budi', 'id', 'Asia/Jakarta', 1, 'opt_in', 'x', 1,"
                      " 0, '2026-11-01 00:00:00', '2026-11-01 00:00:00')")  # fmt: skip
        shell.execute("INSERT INTO message (id, dedupe_key, campaign, step, priority, customer_id, email, status,"
                      " due_at, expires_at, next_attempt_at, attempts, message_id, payload, created_at, updated_at,"
                      " sent_at, resent_after_attempts) VALUES (7, 'winback:C1:O-1:1', 'winback', 1, 0, 1,"
                      " 'budi@example.com', 'sent', '2026-11-01', '2026-11-02', '2026-11-01', 1, '<a@shop.example>',"
                      " '{}', '2026-11-01', '2026-11-01', '2026-11-01', 0)")  # fmt: skip
        shell.execute("DELETE FROM customer WHERE id = 1")
    finally:
        shell.close()
    config = tmp_path / "config.toml"
    config.write_text('[database]\nurl = "sqlite:///k.db"\n', encoding="utf-8")
    # When it is upgraded
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    # Then it upgrades, the ledger row kept, and says what it found and that the migration left it as it was: it
    # refused for ever ('after the migration 1 references are broken … nothing was changed'), blaming the migration
    assert code == 0, printed
    assert printed.startswith(f"schema upgraded: 0017 -> 0020 ({path})"), printed
    assert (f"note: {path} had 1 broken reference before the migration (first: message row 7 names a missing "
            "customer, deleted with foreign key checks off, as the sqlite3 shell has them); the migration left it "
            "as it was") in printed, printed
    assert _query(url, "SELECT id, status FROM message") == [(7, "sent")]


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_a_database_another_program_migrates_with_alembic_is_not_taken_for_a_newer_kembalis(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given database.url pointing at the shop's own database, which its own application migrates with Alembic too:
    # an alembic_version table with that application's revision, and none of Kembali's tables
    url = request.getfixturevalue(f"{kind}_url")
    where, config = _another_programs_database(
        url, tmp_path, "CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)",
        "INSERT INTO alembic_version VALUES ('3f2a9c1d7e4b')", "CREATE TABLE orders (id INTEGER PRIMARY KEY)",
    )  # fmt: skip
    # When kembali's commands are run on it
    for argv in (["db", "upgrade"], ["stats"]):
        code, printed = run_cli(capsys, "--config", str(config), *argv)
        # Then they refuse, saying the database is another program's, where they said a newer kembali had upgraded
        # it and to install that on this host
        assert code == 3, (argv, printed)
        assert (f"kembali: the database {where} is another program's: its alembic_version holds 3f2a9c1d7e4b, "
                "not a revision of Kembali's, and none of Kembali's tables are there; point database.url at a "
                "database of Kembali's own (nothing was changed)") in printed, (argv, printed)
        assert "newer" not in printed, (argv, printed)
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 3 and printed.startswith("current: 3f2a9c1d7e4b (another program's)  newest: 0020"), printed
    assert _query(url, "SELECT version_num FROM alembic_version") == [("3f2a9c1d7e4b",)]


def _another_programs_database(url: str, tmp_path: Path, *statements: str) -> tuple[str, Path]:
    """The database at ``url`` as another program left it (``statements``), and a config pointing at it."""
    engine = db.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
        where = db.describe(engine)
    finally:
        engine.dispose()
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    return where, config


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_db_status_exits_1_while_an_upgrade_is_needed_and_0_once_the_schema_is_current(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an empty database (on SQLite: no file yet), and a deploy script that asks `db status` whether to upgrade
    url = request.getfixturevalue(f"{kind}_url")
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{url}"\n', encoding="utf-8")
    head = db.newest_revision()
    # When it asks, then it is told an upgrade is needed, by exit 1 as well as by the line it prints (it exited 0
    # whatever the schema, so a script could not tell)
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 1, printed
    assert printed.startswith("current: (no database file at" if kind == "sqlite" else "current: (empty)"), printed
    # And so for a schema an older kembali left
    _schema_at(url, "0007")
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 1 and printed.startswith(f"current: 0007  newest: {head}"), printed
    # And once upgraded, exit 0
    assert run_cli(capsys, "--config", str(config), "db", "upgrade")[0] == 0
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    assert code == 0 and printed.startswith(f"current: {head}  newest: {head}"), printed


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("pg", marks=pytest.mark.postgres)])
def test_db_status_of_a_database_holding_only_another_programs_tables_names_them_rather_than_call_it_empty(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given database.url pointing at another program's database (the shop's own, by mistake), none of whose tables
    # take a name of Kembali's
    url = request.getfixturevalue(f"{kind}_url")
    where, config = _another_programs_database(
        url, tmp_path, "CREATE TABLE products (id INTEGER PRIMARY KEY)", "CREATE TABLE orders (id INTEGER PRIMARY KEY)",
    )  # fmt: skip
    # When a deploy script asks `db status` whether to upgrade
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    # Then it names the tables there, where it called the database "(empty)", so that the operator can tell it for
    # another program's before `db upgrade` adds Kembali's tables beside them; exit 1 as before: the upgrade would run
    assert code == 1, printed
    assert printed.startswith(f"current: (no Kembali schema; other tables: orders, products)  newest: "
                              f"{db.newest_revision()}  ({where})"), printed
    assert "(empty)" not in printed, printed


def test_db_status_of_another_programs_database_of_many_tables_names_the_first_and_counts_them(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given database.url pointing at the shop's own database by mistake, of 300 tables (a shop platform's has as many)
    tables = [f"catalog_{i:03d}" for i in range(300)]
    where, config = _another_programs_database(
        sqlite_url, tmp_path, *(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY)" for name in tables))
    # When a deploy script asks `db status` whether to upgrade
    code, printed = run_cli(capsys, "--config", str(config), "db", "status")
    # Then its line names the first tables and how many there are, not all 300 on one line
    assert code == 1, printed
    assert printed.startswith(f"current: (no Kembali schema; other tables: {', '.join(tables[:20])}, … (300 in all))"
                              f"  newest: {db.newest_revision()}  ({where})"), printed
    assert "catalog_299" not in printed, printed


def test_an_sqlite_upgrade_that_must_wait_for_the_write_lock_says_so_then_migrates(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an SQLite file one schema behind, whose write lock another program holds for a second and a half
    # (another `kembali db upgrade` migrating it, a worker not stopped)
    import threading

    _schema_at(sqlite_url, "0017")
    path = tmp_path / "kembali.db"
    config = tmp_path / "config.toml"
    config.write_text(f'[database]\nurl = "{sqlite_url}"\n', encoding="utf-8")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(1.5, holder.rollback)
    release.start()
    try:
        # When `kembali db upgrade` runs
        code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    # Then it says, before it waits, what it waits for (it waited silently, as on PostgreSQL it did not), and once
    # the lock is free it migrates
    assert code == 0, printed
    assert (f"kembali: another program holds the write lock on {path} (another `kembali db upgrade` migrating it, "
            "a kembali run or import): waiting up to 30 s for it to finish") in printed, printed
    assert f"schema upgraded: 0017 -> 0020 ({path})" in printed, printed
    # And an upgrade that need not wait says nothing of waiting
    code, printed = run_cli(capsys, "--config", str(config), "db", "upgrade")
    assert code == 0 and printed.strip() == f"schema already at 0020 ({path})", printed


@pytest.mark.postgres
def test_a_postgres_url_as_libpq_and_hosting_providers_write_it_is_taken(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a config whose database.url says postgres:// (psql's, libpq's and a DATABASE_URL's scheme)
    config = tmp_path / "config.toml"
    written = sa.make_url(pg_url).set(drivername="postgres").render_as_string(hide_password=False)
    assert written.startswith("postgres://")
    config.write_text(f'[database]\nurl = "{written}"\n', encoding="utf-8")
    # When the operator creates the schema and asks for its revision
    upgraded, out = run_cli(capsys, "--config", str(config), "db", "upgrade")
    # Then both work on that database, as with postgresql://, rather than refusing the URL as a configuration error
    assert upgraded == 0, out
    status, out = run_cli(capsys, "--config", str(config), "db", "status")
    assert status == 0, out
    head = db.newest_revision()
    assert f"current: {head}  newest: {head}" in out

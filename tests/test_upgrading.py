"""Upgrading: the schema and the code of several hosts at different versions, and migrations run at once."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command

from tests.clikit import run_cli
from tests.shop import LINK_KEY, ROOT
from worker.adapters import db, shop
from worker.domain import CustomerRecord, Locale

AHEAD = "0019_from_a_newer_kembali"
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
    head = db.head_revision(db.create_engine(url))
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
    assert code == 0 and printed.startswith(f"current: {AHEAD} (newer than this kembali)  newest: {head}"), printed
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
    assert said[0] == "schema already at 0018", results
    waited = next(out for _, out in results if out.strip().endswith("schema already at 0018"))
    assert "another `kembali db upgrade` is migrating" in waited and "waiting for it to finish" in waited, waited
    assert said[1].startswith("schema upgraded: 0017 -> 0018"), results
    assert _query(pg_url, "SELECT version_num FROM alembic_version") == [("0018",)]


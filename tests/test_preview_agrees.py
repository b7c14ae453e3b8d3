"""`kembali preview --at T` tells what `run --once` at T does, message by message, on both databases.

Each test builds a small shop, previews it (``--json``, in this process), then runs the real cycle at the same
clock against the test SMTP server, and compares every row the run touched with what the preview said of it:
sent, skipped and why, or left waiting until when.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.clikit import run_cli
from tests.shop import TEMPLATES, make_shop
from tests.shop_fixtures import LINK_SECRET
from tests.smtp_server import RecordingServer
from worker.adapters.store import M, Store
from worker.adapters.tables import RateLimit
from worker.app import Deps
from worker.commands import running
from worker.config import load_settings
from worker.domain import CustomerRecord, Locale, OrderRecord, OrderStatus
from worker.limiter import QUOTA_KEY
from worker.pipeline import plan
from worker.testing import FakeClock

T = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
"""10:00 in Jakarta."""


@pytest.fixture(autouse=True)
def _link_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_SECRET)


def _config(folder: Path, db_url: str, server: RecordingServer, extra_toml: str = "") -> Path:
    path = folder / "config.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {server.port}\ntls = "none"\ntimeout_seconds = 5.0\npool_size = 2\n\n'
        f'[templates]\ndir = "{TEMPLATES.as_posix()}"\n\n[logging]\nlevel = "warning"\n\n{extra_toml}',
        encoding="utf-8",
    )
    return path


def _shop(db_url: str, customers: Sequence[CustomerRecord], orders: Sequence[OrderRecord]) -> None:
    make_shop(db_url, customers, orders).close()


def _person(ext: str, *, birthday: date | None = None, zone: str = "Asia/Jakarta", email: str = "") -> CustomerRecord:
    return CustomerRecord(ext, email or f"{ext.lower()}@example.com", f"Ani {ext}", Locale.EN, zone, birthday, True,
                          "opt_in", "checkout")  # fmt: skip


def _order(ext: str, customer: str, *, days_ago: float, delivered_days_ago: float | None = None) -> OrderRecord:
    delivered = None if delivered_days_ago is None else T - timedelta(days=delivered_days_ago)
    return OrderRecord(ext, customer, OrderStatus.DELIVERED, T - timedelta(days=days_ago), delivered, 100_000, "IDR")


def _planned(config: Path, at: datetime) -> Store:
    """A planning pass at ``at`` (as the daemon's, or a run's, then), nothing sent; the store, to close."""
    settings = load_settings(config)
    store = Store.for_settings(settings)
    plan(store, settings, at)
    return store


def _ledger(db_url: str) -> dict[str, tuple[object, ...]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(M.c.dedupe_key, M.c.status, M.c.skip_reason, M.c.next_attempt_at))
            return {r.dedupe_key: tuple(r)[1:] for r in rows}
    finally:
        engine.dispose()


def _said(row: dict[str, object]) -> tuple[object, ...]:
    """A preview line as the ledger row the run leaves: sent, skipped and why, or waiting until when (UTC)."""
    if row["action"] == "send":
        return ("sent",)
    if row["action"] == "skip":
        return ("skipped", row["reason"])
    if row["action"] == "defer":
        return ("waits", datetime.fromisoformat(str(row["until"])).astimezone(UTC))
    return ("failed",)


def _done(status: object, reason: object, next_attempt_at: datetime) -> tuple[object, ...]:
    if status in ("planned", "retry"):
        at = next_attempt_at if next_attempt_at.tzinfo else next_attempt_at.replace(tzinfo=UTC)
        return ("waits", at.astimezone(UTC))
    return ("skipped", reason) if status == "skipped" else (str(status),)


def preview_then_run(
    capsys: pytest.CaptureFixture[str], config: Path, at: datetime, *args: str
) -> tuple[dict[str, tuple[object, ...]], dict[str, tuple[object, ...]]]:
    """What ``preview --at at ARGS --json`` said of each message, and what ``run --once`` at ``at`` then did to
    each ledger row it planned or changed."""
    code, out = run_cli(capsys, "--config", str(config), "preview", "--at", at.isoformat(), "--json", *args)
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    said = {str(row["dedupe_key"]): _said(row) for row in lines if row["action"] != "summary"}
    settings = load_settings(config)
    before = _ledger(settings.database_url)
    deps = Deps.build(settings)
    deps.clock = FakeClock(at)
    try:
        asyncio.run(running.cycle(deps))
    finally:
        deps.close()
    after = _ledger(settings.database_url)
    done = {key: _done(*row) for key, row in after.items() if before.get(key) != row}
    return said, done


def test_a_birthday_offer_planned_ahead_of_its_window_is_not_sent_now_and_keeps_its_slot(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given Ani, whose birthday is tomorrow (its offer's window opens at midnight in Jakarta, in 14 hours: a pass
    # now plans it ahead, due then), and who is due a win-back step today
    config = _config(tmp_path, db_url, smtp_server, "[campaigns.birthday]\nenabled = true\ndays_before = 0\n")
    _shop(db_url, [_person("C1", birthday=date(1990, 11, 23))], [_order("O1", "C1", days_ago=50)])

    # When the operator previews at T, win-back alone first, and then `run --once` runs at T
    code, out = run_cli(capsys, "--config", str(config), "preview", "--at", T.isoformat(), "--json",
                        "--campaign", "winback")  # fmt: skip
    assert code == 0, out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    said_of_winback = {row["dedupe_key"]: _said(row) for row in rows if row["action"] != "summary"}
    said, done = preview_then_run(capsys, config, T)

    # Then the run sent nothing: the offer waits for its window, the win-back for the offer (its slot is the
    # birthday's); and the preview said just that, with the same times, the offer listed or not
    midnight = datetime(2026, 11, 22, 17, 0, tzinfo=UTC)
    assert done == {"birthday:C1:2026": ("waits", midnight), "winback:C1:O1:1": ("waits", midnight)}
    assert said == done
    assert said_of_winback == {"winback:C1:O1:1": ("waits", midnight)}
    assert smtp_server.messages == []


def test_rows_waiting_in_the_ledger_are_judged_in_the_order_a_claim_takes_them(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given one person with two customer records (a guest checkout: one mailbox), each due a win-back step, planned
    # yesterday; the second record's row has waited longer (given back to the queue earlier: a retry, say)
    config = _config(tmp_path, db_url, smtp_server)
    _shop(db_url, [_person("C1"), _person("C2", email="C1@Example.com")],
          [_order("O1", "C1", days_ago=50), _order("O2", "C2", days_ago=50)])  # fmt: skip
    _planned(config, T - timedelta(days=1)).close()
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        for key, waited in (("winback:C1:O1:1", 1), ("winback:C2:O2:1", 3)):
            conn.execute(sa.update(M).where(M.c.dedupe_key == key).values(next_attempt_at=T - timedelta(hours=waited)))
    engine.dispose()

    # When the operator previews at T, and then `run --once` runs at T
    said, done = preview_then_run(capsys, config, T)

    # Then the claim took the row due first and sent it, the other waits for the cap; and the preview said so
    assert done == {"winback:C2:O2:1": ("sent",), "winback:C1:O1:1": ("waits", T + timedelta(days=3))}
    assert said == done


def test_of_two_feedback_requests_planned_for_one_customer_preview_names_the_one_the_run_sends(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given Ani, three of whose orders were delivered a week or so ago (the shop's data gives them in another order
    # than they were delivered): three feedback requests for one mailbox, one a day at most
    config = _config(tmp_path, db_url, smtp_server, "[campaigns.feedback]\nenabled = true\n")
    _shop(db_url, [_person("C1")], [_order("O2", "C1", days_ago=20, delivered_days_ago=9),
                                    _order("O1", "C1", days_ago=21, delivered_days_ago=8),
                                    _order("O3", "C1", days_ago=22, delivered_days_ago=10)])  # fmt: skip

    # When the operator previews at T, and then `run --once` runs at T
    said, done = preview_then_run(capsys, config, T)

    # Then the preview named the request the run sent, and the two left waiting
    assert sorted(status for status, *_ in done.values()) == ["sent", "waits", "waits"]
    assert said == done


def test_a_birthday_offer_due_tonight_in_quiet_hours_is_not_taken_for_one_no_pass_has_planned(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given Ani, whose birthday offer's window opened this morning, due a win-back step too; and it is 22:00 in
    # Jakarta, in the quiet hours
    config = _config(tmp_path, db_url, smtp_server, "[policy]\nquiet_hours_start = \"21:00\"\nquiet_hours_end = "
                     "\"08:00\"\n\n[campaigns.birthday]\nenabled = true\ndays_before = 1\n")  # fmt: skip
    _shop(db_url, [_person("C1", birthday=date(1990, 11, 23))], [_order("O1", "C1", days_ago=50)])
    at = datetime(2026, 11, 22, 15, 0, tzinfo=UTC)

    # When the operator previews then, and then `run --once` runs then
    said, done = preview_then_run(capsys, config, at)

    # Then both wait for the morning (the run planned the offer: no later pass is to plan it), and the preview said
    # so, not that the win-back waits for the next planning pass
    morning = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)
    assert done == {"birthday:C1:2026": ("waits", morning), "winback:C1:O1:1": ("waits", morning)}
    assert said == done



def test_what_the_daily_quota_leaves_for_tomorrow_is_not_said_to_be_sent(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a daily quota of 3 emails, one of them sent earlier today, and three customers due a win-back step
    config = _config(tmp_path, db_url, smtp_server, "[sending]\ndaily_quota = 3\n")
    _shop(db_url, [_person(f"C{n}") for n in range(1, 4)], [_order(f"O{n}", f"C{n}", days_ago=50) for n in range(1, 4)])
    engine = sa.create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(RateLimit.__table__).values(key=QUOTA_KEY, tat=0.0, day="2026-11-22", day_count=1))
    engine.dispose()

    # When the operator previews at T, each customer alone first, and then `run --once` runs at T
    alone = {}
    for who in ("C1", "C2", "C3"):
        code, out = run_cli(capsys, "--config", str(config), "preview", "--at", T.isoformat(), "--json",
                            "--customer", who)  # fmt: skip
        assert code == 0, out
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        alone.update({row["dedupe_key"]: _said(row) for row in rows if row["action"] != "summary"})
    said, done = preview_then_run(capsys, config, T)

    # Then the run sent two, and the third waits for the next day's quota, from midnight in Jakarta; and the preview
    # said so, of everyone or of each alone
    assert sorted(status for status, *_ in done.values()) == ["sent", "sent", "waits"]
    assert ("waits", datetime(2026, 11, 22, 17, 0, tzinfo=UTC)) in done.values()
    assert said == done == alone
    assert len(smtp_server.messages) == 2


def test_a_daily_quota_set_during_the_day_counts_the_days_sends_before_it_in_the_preview_as_in_the_run(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a shop that sent C0 a win-back step two hours ago, with no daily quota set then
    config = _config(tmp_path, db_url, smtp_server)
    _shop(db_url, [_person("C0")], [_order("O0", "C0", days_ago=50)])
    preview_then_run(capsys, config, T - timedelta(hours=2))
    assert len(smtp_server.messages) == 1
    # When the operator sets a quota of 3 a day (the provider said so), and three more customers are due
    config.write_text(config.read_text() + "\n[sending]\ndaily_quota = 3\n")
    _shop(db_url, [_person(f"C{n}") for n in range(1, 4)], [_order(f"O{n}", f"C{n}", days_ago=50) for n in range(1, 4)])
    said, done = preview_then_run(capsys, config, T)

    # Then the run counted this morning's send: two more went, the third waits for tomorrow; the preview said so
    assert sorted(status for status, *_ in done.values()) == ["sent", "sent", "waits"]
    assert said == done
    assert len(smtp_server.messages) == 3


def test_rows_a_worker_killed_while_it_held_them_are_previewed_as_the_run_sends_them(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given two win-back steps planned and claimed an hour ago by a worker that was killed then (their leases have
    # lapsed: the next run gives them back to the queue first, and sends them)
    config = _config(tmp_path, db_url, smtp_server)
    _shop(db_url, [_person("C1"), _person("C2")], [_order("O1", "C1", days_ago=50), _order("O2", "C2", days_ago=50)])
    store = _planned(config, T - timedelta(hours=1))
    try:
        claimed = store.claim(worker="killed:1:abc", now=T - timedelta(hours=1), limit=10, lease_seconds=300,
                              domain=load_settings(config).shop.domain)  # fmt: skip
    finally:
        store.close()
    assert len(claimed) == 2

    # When the operator previews at T, and then `run --once` runs at T
    said, done = preview_then_run(capsys, config, T)

    # Then the run sent both, and the preview said so
    assert done == {"winback:C1:O1:1": ("sent",), "winback:C2:O2:1": ("sent",)}
    assert said == done


def test_rows_of_a_campaign_turned_off_past_their_expiry_are_previewed_as_the_run_skips_them(
    db_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given win-back steps planned three weeks ago and never sent, two weeks their expiry; and win-back turned off
    # since (its rows wait, not sent, until it is on again or they expire)
    config = _config(tmp_path, db_url, smtp_server)
    _shop(db_url, [_person("C1"), _person("C2")], [_order("O1", "C1", days_ago=70), _order("O2", "C2", days_ago=70)])
    _planned(config, T - timedelta(days=21)).close()
    config.write_text(config.read_text(encoding="utf-8") + "[campaigns.winback]\nenabled = false\n\n"
                      "[campaigns.feedback]\nenabled = true\n", encoding="utf-8")  # fmt: skip

    # When the operator previews at T, and then `run --once` runs at T
    said, done = preview_then_run(capsys, config, T)

    # Then the run skipped both as expired, and the preview said so
    assert done == {"winback:C1:O1:1": ("skipped", "expired"), "winback:C2:O2:1": ("skipped", "expired")}
    assert said == done


@pytest.mark.postgres
def test_preview_on_postgresql_writes_nothing(
    pg_migrated_url: str, smtp_server: RecordingServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a PostgreSQL ledger with rows waiting, a daily quota, and customers due every kind of decision
    config = _config(tmp_path, pg_migrated_url, smtp_server, "[sending]\ndaily_quota = 2\n\n[campaigns.birthday]\n"
                     "enabled = true\ndays_before = 0\n\n[campaigns.feedback]\nenabled = true\n")  # fmt: skip
    _shop(pg_migrated_url, [_person("C1", birthday=date(1990, 11, 23)), _person("C2", birthday=date(1990, 11, 22)),
                            _person("C3")],
          [_order("O1", "C1", days_ago=50), _order("O2", "C2", days_ago=20, delivered_days_ago=8),
           _order("O3", "C3", days_ago=70)])  # fmt: skip
    _planned(config, T - timedelta(days=1)).close()

    def everything() -> dict[str, list[tuple[object, ...]]]:
        engine = sa.create_engine(pg_migrated_url)
        try:
            tables = sa.MetaData()
            tables.reflect(engine)
            with engine.connect() as conn:
                return {name: sorted(map(tuple, conn.execute(sa.select(table))), key=repr)
                        for name, table in tables.tables.items()}  # fmt: skip
        finally:
            engine.dispose()

    before = everything()
    assert before["message"]

    # When the operator previews now, then at T, into a folder
    for at in ((), ("--at", T.isoformat())):
        code, out = run_cli(capsys, "--config", str(config), "preview", *at, "--out", str(tmp_path / "out"))
        assert code == 0, out

    # Then not one row of any table changed
    assert everything() == before
    assert list((tmp_path / "out").glob("*.eml"))

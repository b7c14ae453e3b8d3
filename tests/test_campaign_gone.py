"""Ledger rows of a campaign the worker does not send: one it does not know at all (a row edited by hand, a name from
another program) fails, named, and never blocks the others; one turned off waits, said so, and expires."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.daemon_harness import Daemon, make_shop
from tests.sendkit import NOW, REPO, Shop, make_settings, settings_dict
from tests.smtp_server import RecordingServer, closed_port
from worker import pipeline
from worker.adapters.store import A, M
from worker.commands import running
from worker.config import settings_from_dict

GOOD, ODD, ALSO_GOOD = "a@test.example", "b@test.example", "c@test.example"


@pytest.fixture
def shop(db_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shop]:
    """Three win-back emails planned, not sent."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    shop = Shop(db_url, make_settings(db_url, smtp_server.port), [GOOD, ODD, ALSO_GOOD])
    pipeline.plan(shop.store, shop.settings, NOW)
    try:
        yield shop
    finally:
        shop.close()


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [r.kembali_fields for r in caplog.records if r.getMessage() == name]  # type: ignore[attr-defined]


def test_a_row_of_a_campaign_kembali_does_not_know_fails_named_and_the_others_are_sent(
    shop: Shop, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a row an operator renamed by hand to a campaign no Kembali sends
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == ODD).values(campaign="xmas_2025"))
    row_id = shop.row(ODD).id
    caplog.set_level(logging.INFO)

    # When a run goes (it waited in the queue, `planned`, for ever, counted in every health line's queue)
    report = shop.cycle()

    # Then the others are sent, and the row is failed, saying which row, which campaign and what to do
    assert sorted(r for m in smtp_server.messages for r in m.rcpt_tos) == [GOOD, ALSO_GOOD]
    assert report.dispatched.outcomes["sent"] == 2
    row = shop.row(ODD)
    assert row.status == "failed", row
    assert f"ledger row {row_id}" in row.last_reply and "'xmas_2025'" in row.last_reply, row.last_reply
    assert "no campaign" in row.last_reply and f"kembali ledger close {row_id}" in row.last_reply, row.last_reply
    assert row.last_error == "LedgerRowError"
    with shop.store.engine.connect() as conn:
        (attempt,) = conn.execute(sa.select(A).where(A.c.message_id == row_id)).all()
    assert attempt.error_type == "LedgerRowError" and attempt.outcome == "render_error"
    (logged,) = _events(caplog, "unknown_campaign_failed")
    assert logged["count"] == 1 and logged["campaigns"] == "xmas_2025" and str(row_id) in str(logged["ids"]), logged
    assert ("1 message of a campaign Kembali does not know ('xmas_2025'; edited by hand?) failed, not sent: see "
            "`kembali ledger list`") in running.summary(report)  # fmt: skip

    # and a second run finds nothing more to do with it
    caplog.clear()
    shop.cycle()
    assert shop.row(ODD).status == "failed" and not _events(caplog, "unknown_campaign_failed")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_campaign_turned_off_keeps_its_rows_waiting_says_so_and_they_expire_in_run_once(
    shop: Shop, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given win-back turned off after it planned three emails
    raw = settings_dict(shop.settings.database_url, smtp_server.port)
    raw["campaigns"] = {"winback": {"enabled": False}}
    off = settings_from_dict(raw, base_dir=REPO)
    shop.deps = dataclasses.replace(shop.deps, settings=off)
    caplog.set_level(logging.INFO)

    # When a run --once goes: nothing is sent, and the operator is told what waits and how to close it
    report = shop.cycle()
    assert smtp_server.messages == []
    assert {shop.row(a).status for a in (GOOD, ODD, ALSO_GOOD)} == {"planned"}
    (logged,) = _events(caplog, "campaign_off_messages_waiting")
    assert logged["campaign"] == "winback" and logged["count"] == 3, logged
    assert "kembali ledger close --status planned --status retry --campaign winback" in str(logged["what_to_do"])
    lines = running.summary(report)
    assert any("3 winback" in line or ("3" in line and "turned off" in line) for line in lines), lines

    # When a run --once goes after their expiry (a cron user runs no daemon, whose maintenance expires them)
    shop.clock.advance(timedelta(days=15).total_seconds())
    report = shop.cycle()

    # Then they are skipped as expired, as the README says, not left planned for ever
    assert {(shop.row(a).status, shop.row(a).skip_reason) for a in (GOOD, ODD, ALSO_GOOD)} == {("skipped", "expired")}
    assert smtp_server.messages == []
    # and the run's summary says so (it said nothing of them: the three messages it waited on were gone, unsaid)
    assert ("3 messages of campaigns turned off expired, not sent (skipped: expired; `kembali ledger list --status "
            "skipped`)") in running.summary(report), running.summary(report)  # fmt: skip


def test_the_daemon_fails_an_unknown_campaigns_row_and_reads_a_hand_written_time_at_its_start(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a ledger where an operator renamed one sent row's campaign and put it back in the queue, and wrote
    # another's due time by hand in another ISO form, an hour ago
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="*/1 * * * * *")
    shop.add([1, 2, 3], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 3, timeout=60, why="three win-back emails")
    finally:
        assert daemon.stop() == 0
    # written with Jakarta's offset: as text it sorts after every time Kembali writes for now ('…T…' after '… …', and
    # Jakarta's date is never behind UTC's), so no claim takes it before it is read right; in UTC ('…Z'), in the
    # hour after midnight UTC the day before's date sorted first and the row was claimed before the maintenance
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).astimezone(timezone(timedelta(hours=7))).strftime(
        "%Y-%m-%dT%H:%M:%S+07:00")
    store = shop.store()
    try:
        with store.engine.begin() as conn:
            ids = list(conn.execute(sa.select(M.c.id).order_by(M.c.id)).scalars())
            conn.execute(sa.text("UPDATE message SET status = 'planned', campaign = 'xmas_2025' WHERE id = :i"),
                         {"i": ids[0]})
            conn.execute(sa.text("UPDATE message SET status = 'retry', sent_at = NULL, next_attempt_at = :at"
                                 " WHERE id = :i"), {"i": ids[1], "at": an_hour_ago})  # fmt: skip
    finally:
        store.close()

    # When the daemon starts again
    daemon = Daemon.start(shop)
    try:
        # Then its start fails the unknown campaign's row, naming it, and reads the time written by hand
        failed = daemon.wait_event("unknown_campaign_failed", timeout=60)
        assert failed["campaigns"] == "xmas_2025" and failed["ids"] == str(ids[0]), failed
        normalised = daemon.wait_event("ledger_time_normalised", timeout=60)
        assert normalised["id"] == ids[1] and normalised["value"] == an_hour_ago, normalised
        # (and it is sent again now, not at midnight UTC: the claim compared '…T…' as text)
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 1, timeout=60, why="the resent row")
    finally:
        assert daemon.stop() == 0
    assert shop.scalar("SELECT status FROM message WHERE id = :i", i=ids[0]) == "failed"
    assert "'xmas_2025'" in shop.scalar("SELECT last_reply FROM message WHERE id = :i", i=ids[0])


def test_failing_many_rows_of_an_unknown_campaign_holds_neither_the_database_nor_the_workers_database_thread(
    shop: Shop,
) -> None:
    import asyncio
    import threading
    import time

    from worker.app import campaigns_not_sent
    from worker.asyncstore import AsyncStore

    # Given 20,000 waiting rows an operator renamed by hand to a campaign no Kembali sends (a bulk UPDATE)
    many = 20_000
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == ODD).values(campaign="xmas_2025"))
        odd = conn.execute(sa.select(M).where(M.c.email == ODD)).one()._asdict()
        rows = [{**odd, "id": None, "dedupe_key": f"xmas_2025:{n}", "message_id": None} for n in range(many)]
        conn.execute(sa.insert(M), [{k: v for k, v in r.items() if k != "id"} for r in rows])
    astore = AsyncStore(shop.store)
    waits: list[float] = []
    others: list[float] = []
    done = threading.Event()

    def another_worker_writing() -> None:  # another process's short writes (a claim, an outcome) meanwhile
        engine = sa.create_engine(shop.store.engine.url, connect_args={"timeout": 120} if shop.store.dialect ==
                                  "sqlite" else {})  # fmt: skip
        try:
            while not done.is_set():
                started = time.monotonic()
                with engine.begin() as conn:
                    conn.execute(sa.update(M).where(M.c.email == GOOD).values(priority=M.c.priority))
                waits.append(time.monotonic() - started)
                time.sleep(0.02)
        finally:
            engine.dispose()

    took: list[float] = []

    async def start() -> int:
        began = time.monotonic()
        task = asyncio.ensure_future(campaigns_not_sent(shop.store, astore, shop.settings, NOW))
        task.add_done_callback(lambda _t: took.append(time.monotonic() - began))
        await asyncio.sleep(0.5)
        while not task.done():  # this worker's own database calls (a claim, a health line) meanwhile
            started = time.monotonic()
            await astore.call(shop.store.messages, limit=1)
            others.append(time.monotonic() - started)
            await asyncio.sleep(0.05)
        return len((await task).failed)

    writer = threading.Thread(target=another_worker_writing)
    writer.start()
    try:
        # When a worker starts
        failed = asyncio.run(start())
    finally:
        done.set()
        writer.join(timeout=300)
        astore.close()

    # Then every one of them is failed, in short transactions and short calls of the worker's database thread: no
    # other worker waits seconds for the database, nor this worker's own claims and health line (on a machine so
    # loaded that failing them all takes longer, no wait is more than half of it: one transaction for them all
    # made a writer wait as long as the whole)
    assert failed == many + 1
    bound = max(2.0, took[0] / 2)
    assert max(waits) < bound, f"another worker waited {max(waits):.1f} s to write, of {took[0]:.1f} s"
    assert not others or max(others) < bound, f"this worker's own database calls waited {max(others):.1f} s"


def test_check_names_the_rows_the_worker_will_not_send_before_a_config_that_turns_their_campaign_off(
    tmp_path: Path,
) -> None:
    import json
    import os
    import subprocess
    import sys

    from tests.daemon_harness import LINK_KEY
    from tests.daemon_harness import NOW as HARNESS_NOW
    from worker.config import load_settings

    # Given a ledger with five win-back emails planned, two of them renamed by hand to a campaign no Kembali sends
    shop = make_shop(tmp_path, smtp_port=closed_port())
    shop.add(range(1, 6), days_ago=60)
    store = shop.store()
    try:
        assert pipeline.plan(store, load_settings(shop.config), HARNESS_NOW, ["winback"]).created == {"winback": 5}
        with store.engine.begin() as conn:
            two = sa.select(M.c.id).order_by(M.c.id).limit(2).scalar_subquery()
            conn.execute(sa.update(M).where(M.c.id.in_(two)).values(campaign="xmas_2025"))
    finally:
        store.close()

    def check(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "worker", "--config", str(shop.config), "check", *flags],
                              cwd=REPO, env={**os.environ, "KEMBALI_LINK_SECRET": LINK_KEY}, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    before = check().stdout  # win-back on: its three rows go out, nothing to say of them
    assert "winback messages wait" not in before and "note: 2 messages of campaign 'xmas_2025'" in before, before
    # When the operator checks a config that turns win-back off, before deploying it
    shop.config.write_text(shop.config.read_text() + "\n[campaigns.winback]\nenabled = false\n")
    done = check()
    # Then check names the rows no worker will send, with their count and the command that closes them, as notes
    # (the config itself is fine: the exit code stays 0)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("note: 3 winback messages wait in the ledger (planned or retry) and will not be sent while winback is "
            "turned off") in done.stdout, done.stdout
    assert "kembali ledger close --status planned --status retry --campaign winback" in done.stdout, done.stdout
    assert "note: 2 messages of campaign 'xmas_2025' wait in the ledger" in done.stdout, done.stdout
    assert "kembali ledger close --status planned --status retry --campaign xmas_2025" in done.stdout, done.stdout
    rows = [json.loads(line) for line in check("--json").stdout.splitlines()]
    notes = {row["kind"]: row for row in rows if row["type"] == "note"}
    assert notes["campaign_off_waiting"]["count"] == 3 and notes["campaign_off_waiting"]["campaign"] == "winback"
    assert notes["unknown_campaign_waiting"]["count"] == 2, notes
    assert rows[-1]["type"] == "summary" and rows[-1]["problems"] == 0


def test_a_start_stopped_by_a_busy_database_still_names_the_rows_it_already_failed(
    shop: Shop, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from worker.adapters.opstore import CHUNK
    from worker.app import campaigns_not_sent
    from worker.asyncstore import AsyncStore

    # Given 1,200 waiting rows renamed by hand to a campaign no Kembali sends (three chunks of 500 at a start)
    with shop.store.engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.email == ODD).values(campaign="xmas_2025"))
        odd = conn.execute(sa.select(M).where(M.c.email == ODD)).one()._asdict()
        conn.execute(sa.insert(M), [{**{k: v for k, v in odd.items() if k != "id"}, "dedupe_key": f"xmas_2025:{n}",
                                     "message_id": None} for n in range(1_199)])  # fmt: skip
    # and a database that says "busy" when the start reads the second chunk (another program's long write)
    reads: list[str] = []

    @sa.event.listens_for(shop.store.engine, "before_cursor_execute")
    def _busy(conn: object, cursor: object, statement: str, *args: object) -> None:
        text = statement.lstrip().upper()
        if text.startswith("SELECT") and "MESSAGE.ATTEMPTS" in text and "NOT IN" in text:  # a chunk's read
            reads.append(statement)
            if len(reads) == 2:
                raise sa.exc.OperationalError(statement, {}, Exception("database is locked"))

    caplog.set_level(logging.INFO)
    astore = AsyncStore(shop.store)
    try:
        # When a worker starts, and the second chunk fails
        with pytest.raises(sa.exc.OperationalError):
            asyncio.run(campaigns_not_sent(shop.store, astore, shop.settings, NOW))
    finally:
        sa.event.remove(shop.store.engine, "before_cursor_execute", _busy)
        astore.close()
    # Then the first chunk's rows stay failed (committed), and the log names them and says the rest was not done
    with shop.store.engine.connect() as conn:
        failed = conn.execute(sa.select(sa.func.count()).where(M.c.status == "failed")).scalar()
    assert failed == CHUNK
    (logged,) = _events(caplog, "unknown_campaign_failed")
    assert logged["count"] == CHUNK and logged["campaigns"] == "xmas_2025", logged
    assert "database is locked" in str(logged["stopped_by"]) and logged["not_done"] == 1_200 - CHUNK, logged


def test_a_daemon_start_reads_a_hand_written_time_before_it_claims_so_a_later_time_is_not_sent_early(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given two sent win-back rows put back in the queue by hand: one due now, written as Kembali writes times; one due
    # in two hours, written in New York's offset with a space, which as text sorts before now whatever the hour (its
    # clock reads three hours earlier than UTC's, on today's date or the day before)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port)
    shop.add([1, 2], days_ago=60)
    daemon = Daemon.start(shop)
    try:
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 2, timeout=60, why="two win-back emails")
    finally:
        assert daemon.stop() == 0
    later = (datetime.now(UTC) + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-5)))
    written = later.strftime("%Y-%m-%d %H:%M:%S-05:00")
    store = shop.store()
    try:
        with store.engine.begin() as conn:
            (now_id, now_key), (later_id, _) = conn.execute(sa.select(M.c.id, M.c.dedupe_key).order_by(M.c.id)).all()
            conn.execute(sa.text("UPDATE message SET status = 'retry', sent_at = NULL, next_attempt_at = created_at"
                                 " WHERE id = :i"), {"i": now_id})  # fmt: skip
            conn.execute(sa.text("UPDATE message SET status = 'retry', sent_at = NULL, next_attempt_at = :at"
                                 " WHERE id = :i"), {"i": later_id, "at": written})  # fmt: skip
    finally:
        store.close()

    # When the daemon starts again and sends what is due
    daemon = Daemon.start(shop)
    try:
        normalised = daemon.wait_event("ledger_time_normalised", timeout=60)
        daemon.wait_for(lambda: len(daemon.named("email_sent")) == 1, timeout=60, why="the row due now")
        daemon.wait_for(lambda: len(daemon.named("health")) >= 2, timeout=60, why="two health lines after it")
    finally:
        assert daemon.stop() == 0

    # Then the row due in two hours was read as that time before any claim, and waits for it: not sent early
    assert normalised["id"] == later_id and normalised["value"] == written, normalised
    assert [e["dedupe_key"] for e in daemon.named("email_sent")] == [now_key], daemon.named("email_sent")
    assert shop.scalar("SELECT status FROM message WHERE id = :i", i=later_id) == "retry"
    assert shop.scalar("SELECT sent_at FROM message WHERE id = :i", i=later_id) is None


def test_a_reload_while_the_waiting_rows_are_read_has_its_own_read_at_the_next_maintenance(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tests.daemon_harness import LINK_KEY
    from worker import daemon as daemon_module
    from worker.config import load_settings

    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    real = daemon_module.campaigns_not_sent
    reads: list[str] = []

    async def scenario() -> None:
        reading, release = asyncio.Event(), asyncio.Event()

        async def held(*args: object, **kwargs: object) -> object:  # the start's read, slow (a big ledger)
            reads.append("read")
            if len(reads) == 1:
                reading.set()
                await release.wait()
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(daemon_module, "campaigns_not_sent", held)
        daemon = daemon_module.Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            # Given the start's read of the waiting rows under way
            first = asyncio.ensure_future(daemon._read_waiting_rows())
            await asyncio.wait_for(reading.wait(), 30)
            # When a reload (a campaign turned off, say) comes and goes meanwhile, and the read then ends
            assert await daemon.reload("test: SIGHUP")
            release.set()
            await first
            # Then the next maintenance reads them again, for the reload's settings; the one after, not
            await daemon.maintenance()
            await daemon.maintenance()
        finally:
            await daemon._close()
            daemon.store.close()

    asyncio.run(scenario())
    assert reads == ["read", "read"]


BIRTHDAY_PRIORITY = 50
"""``policy.priorities``' first, by default."""


def test_the_sending_progress_total_counts_no_row_of_a_campaign_turned_off(shop: Shop) -> None:
    # Given three win-back emails due, and one of the birthday campaign, turned off, due as well (planned while it
    # was on: it waits until it is on again)
    with shop.store.engine.begin() as conn:
        row = dict(conn.execute(sa.select(M).where(M.c.email == ODD)).one()._mapping)
        del row["id"]
        conn.execute(sa.insert(M).values(**{**row, "campaign": "birthday", "dedupe_key": "birthday:odd:2026",
                                            "message_id": None, "priority": BIRTHDAY_PRIORITY}))

    # When a run --once reads what is still to do now, as its progress line does for its total, and sends
    still = running.due_now(shop.deps)()
    report = shop.cycle()

    # Then that is what the run sends: the line said "1 of 4 (25.0%)" and ended at 3 of 4, its time left counting a
    # message no run sends while its campaign is off
    assert report.dispatched.outcomes["sent"] == 3
    with shop.store.engine.connect() as conn:
        waiting = conn.execute(sa.select(M.c.status).where(M.c.dedupe_key == "birthday:odd:2026")).scalar_one()
    assert waiting == "planned"
    assert still == 3


def test_rows_planned_before_policy_priorities_were_reordered_are_still_sent(
    shop: Shop, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given three win-back emails planned under the default order (win-back third: priority 30), and then win-back
    # put first in policy.priorities, which gives 30 to feedback, turned off
    raw = settings_dict(shop.settings.database_url, smtp_server.port)
    raw["policy"] = {**raw.get("policy", {}), "priorities": ["winback", "birthday", "feedback", "loyalty",
                                                             "new_products"]}
    shop.deps = dataclasses.replace(shop.deps, settings=settings_from_dict(raw, base_dir=REPO))
    caplog.set_level(logging.INFO)

    # When a run --once goes
    report = shop.cycle()

    # Then they are sent (every claim skipped priority 30 as held by a campaign turned off alone: they waited,
    # planned, until they expired), the start having given them win-back's priority now
    assert sorted(r for m in smtp_server.messages for r in m.rcpt_tos) == [GOOD, ODD, ALSO_GOOD]
    assert report.dispatched.outcomes["sent"] == 3
    (logged,) = _events(caplog, "ledger_priorities_updated")
    assert logged["count"] == 3, logged


def test_a_reload_that_comes_while_a_maintenance_begins_has_that_maintenance_read_for_its_settings(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from tests.daemon_harness import LINK_KEY
    from worker import daemon as daemon_module
    from worker.config import load_settings

    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *")
    shop.add([1, 2, 3], days_ago=60)
    store = shop.store()
    try:  # three win-back emails planned under the default order (win-back third: priority 30)
        pipeline.plan(store, load_settings(shop.config), datetime.now(UTC))
    finally:
        store.close()
    real = daemon_module.release_lapsed_leases

    async def scenario() -> None:
        begun, release = asyncio.Event(), asyncio.Event()

        async def held(*args: object, **kwargs: object) -> object:  # the maintenance's first step, slow for once
            begun.set()
            await release.wait()
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        daemon = daemon_module.Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            await daemon._read_waiting_rows()  # the start's read
            monkeypatch.setattr(daemon_module, "release_lapsed_leases", held)
            # Given a maintenance begun, when a reload that puts win-back first in policy.priorities (30 is now
            # feedback's, turned off) is done before it reads the waiting rows
            maintenance = asyncio.ensure_future(daemon.maintenance())
            await asyncio.wait_for(begun.wait(), 30)
            shop.config.write_text(shop.config.read_text() + '\n[policy]\npriorities = ["winback", "birthday", '
                                   '"feedback", "loyalty", "new_products"]\n')
            assert await daemon.reload("test: SIGHUP")
            release.set()
            await maintenance
            # (the reload's catch-up planning, when today's 09:00 has passed, holds claims back while it runs: on a
            # loaded machine run_once came while it still ran and claimed nothing)
            if daemon._reload_catch_up is not None:
                await daemon._reload_catch_up
            if daemon._planning:
                await asyncio.wait(list(daemon._planning))
            # Then the new dispatcher sends the three: that maintenance read them for the reload's settings, not for
            # the ones it began with (which left them at 30, which every claim now skips, until the next restart)
            await daemon.gen.dispatcher.run_once()
        finally:
            await daemon._close()
            daemon.store.close()

    asyncio.run(scenario())
    assert sorted(r for m in smtp_server.messages for r in m.rcpt_tos) == [f"c{i}@example.com" for i in (1, 2, 3)]

"""Workers on hosts whose clocks disagree, sharing one PostgreSQL database.

Each worker stamps leases, claims and its sends with its own clock. The first tests show what a skew does to two
workers at the Store (worker ``a`` on the right time, ``b`` some seconds ahead), the figures the README gives; the
last ones show the guard: a worker whose clock is too far from the database's sends nothing and takes no lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.daemon_harness import LINK_KEY, make_shop
from tests.sendkit import Shop, make_settings
from tests.smtp_server import Behaviour, RecordingServer
from worker.adapters import db, shop
from worker.adapters.clock import SystemClock
from worker.adapters.store import Marks, Store
from worker.app import Deps
from worker.commands import running
from worker.config import load_settings
from worker.core.audiences import message_id_for
from worker.daemon import Daemon
from worker.domain import CustomerRecord, Disposition, Locale, MessageStatus, Outcome, PlannedMessage, SendResult
from worker.pipeline import plan

pytestmark = pytest.mark.postgres

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
LEASE = 300  # sending.lease_seconds as shipped


@pytest.fixture
def store(pg_migrated_url: str) -> Iterator[Store]:
    s = Store.from_url(pg_migrated_url)
    shop.upsert_customers(
        s.engine, [CustomerRecord("C0", "c0@example.com", "C 0", Locale.ID, "Asia/Jakarta", None, True, "", "")], NOW
    )
    yield s
    s.close()


def _planned(key: str, priority: int = 30) -> PlannedMessage:
    return PlannedMessage(dedupe_key=key, campaign="feedback", step=1, customer_id=1, email="c0@example.com",
                          due_at=NOW, expires_at=NOW + timedelta(days=14), priority=priority,
                          message_id=message_id_for(key, "shop.example"))  # fmt: skip


def _sent(store: Store, message: Any, worker: str, at: datetime) -> None:
    store.record([Disposition(message=message, status=MessageStatus.SENT, worker=worker, started_at=at,
                              finished_at=at, result=SendResult(Outcome.SENT, 250, "ok"))])  # fmt: skip


@pytest.mark.parametrize(("ahead", "taken"), [(30, False), (150, False), (300, True)])
def test_a_host_ahead_by_more_than_two_thirds_of_a_lease_takes_a_live_workers_rows(
    store: Store, ahead: int, taken: bool
) -> None:
    # Given a (right time) holding two rows, sending one of them, its leases renewed a third of a lease ago
    store.insert_messages([_planned("k:0"), _planned("k:1")], NOW)
    rows = store.claim(worker="a", now=NOW, limit=2, lease_seconds=LEASE)
    assert store.mark_sending([rows[0].id], worker="a", now=NOW) == {rows[0].id}
    renewed = NOW + timedelta(seconds=LEASE / 3)
    store.renew_leases(worker="a", now=renewed, lease_seconds=LEASE)

    # When b's maintenance runs just before a's next renewal, on b's clock
    b_now = renewed + timedelta(seconds=LEASE / 3 - 1 + ahead)
    released = store.release_expired_leases(b_now)

    # Then up to a skew of two thirds of a lease (200 s) nothing happens; past it, a's claimed row goes back to the
    # queue (b claims it, a's mark is refused: still one email) and the one a is sending becomes uncertain, for an
    # operator to decide about though a is alive and sends it
    assert released == ((1, 1) if taken else (0, 0))
    if taken:
        (again,) = store.claim(worker="b", now=b_now, limit=1, lease_seconds=LEASE)
        assert again.id == rows[1].id
        assert store.mark_sending([rows[1].id], worker="a", now=b_now - timedelta(seconds=ahead)) == set()
        statuses = {r["dedupe_key"]: r["status"] for r in store.messages()}
        assert statuses == {"k:0": "uncertain", "k:1": "claimed"}


@pytest.mark.parametrize(("ahead", "held"), [(0, True), (30, True), (59, True), (75, False), (300, False)])
def test_a_host_ahead_by_more_than_a_minute_misses_another_workers_send_to_the_mailbox(
    store: Store, ahead: int, held: bool
) -> None:
    # Given b (ahead) claimed one of customer 0's two messages and judged the frequency cap on a ledger showing
    # nothing; a claimed the other
    store.insert_messages([_planned("fb:0"), _planned("fb:1")], NOW)
    (b_row,) = store.claim(worker="b", now=NOW + timedelta(seconds=ahead), limit=1, lease_seconds=LEASE)
    (a_row,) = store.claim(worker="a", now=NOW, limit=1, lease_seconds=LEASE)
    assert (b_row.dedupe_key, a_row.dedupe_key) == ("fb:0", "fb:1")
    # When a sends its message to that mailbox and records it, a second later, then b marks its own
    assert store.mark_sending([a_row.id], worker="a", now=NOW + timedelta(seconds=1)) == {a_row.id}
    _sent(store, a_row, "a", NOW + timedelta(seconds=1))
    marks = store.record_and_mark([], [b_row.id], worker="b", now=NOW + timedelta(seconds=2 + ahead))
    # Then the mark holds b's message back only while b is less than HELD_SECONDS (60 s) ahead: past that, the
    # customer gets two emails within seconds, whatever the frequency cap says
    assert marks == (Marks(held={b_row.id}) if held else Marks(sending={b_row.id}))


def test_a_host_ahead_claims_a_message_before_it_is_due(store: Store) -> None:
    # a message due in five minutes (a retry's backoff, the end of quiet hours, a held-back row's minute)
    later = dataclasses.replace(_planned("k:0"), due_at=NOW + timedelta(minutes=5))
    store.insert_messages([later], NOW)
    assert store.claim(worker="a", now=NOW, limit=1, lease_seconds=LEASE) == []
    assert len(store.claim(worker="b", now=NOW + timedelta(minutes=5), limit=1, lease_seconds=LEASE)) == 1


class SkewedClock(SystemClock):
    """This host's clock, ``seconds`` off the right time (the database's: it runs on this host too)."""

    def __init__(self, seconds: float) -> None:
        self.skew = timedelta(seconds=seconds)

    def now(self) -> datetime:
        return super().now() + self.skew


def _other_worker_busy(store: Store) -> list[int]:
    """Another worker, on the right time, holding two rows with live leases, sending one of them."""
    now = datetime.now(UTC)
    store.insert_messages([dataclasses.replace(_planned(f"other:{i}"), due_at=now, expires_at=now + timedelta(days=1))
                           for i in range(2)], now)
    held = [m.id for m in store.claim(worker="other", now=now, limit=2, lease_seconds=LEASE)]
    assert store.mark_sending(held[:1], worker="other", now=now) == set(held[:1])
    return held


@pytest.mark.parametrize("skew", [300, -300, 30])
def test_a_run_whose_clock_is_off_the_databases_refuses_to_send_and_takes_no_lease(
    pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, skew: int
) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    settings = make_settings(pg_migrated_url, smtp_server.port)
    shop_ = Shop(pg_migrated_url, settings, ["c0@example.com", "c1@example.com"], clock=SkewedClock(skew))  # type: ignore[arg-type]
    try:
        held = _other_worker_busy(shop_.store)
        report = shop_.cycle()
        lines = running.summary(report)
        rows = {r["id"]: r for r in shop_.store.messages()}
    finally:
        shop_.close()

    # Then nothing is planned, sent or released, and the run says why, with the offset, and exits 3
    assert smtp_server.messages == []
    assert (rows[held[0]]["status"], rows[held[1]]["status"]) == ("sending", "claimed")
    assert {r["claimed_by"] for r in rows.values()} == {"other"}
    side = "ahead of" if skew > 0 else "behind"
    (line,) = [line for line in lines if "clock" in line]
    assert f"this host's clock is {abs(skew)}" in line and side in line, lines
    assert running.exit_code(report) == 3


def test_a_run_whose_clock_is_seconds_off_the_databases_sends(
    pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    settings = make_settings(pg_migrated_url, smtp_server.port)
    shop_ = Shop(pg_migrated_url, settings, ["c0@example.com", "c1@example.com"], clock=SkewedClock(3))  # type: ignore[arg-type]
    try:
        report = shop_.cycle()
    finally:
        shop_.close()
    assert len(smtp_server.messages) == 2 and running.exit_code(report) == 0


def test_a_daemon_whose_clock_goes_off_pauses_sending_and_maintenance_and_says_so_in_the_health_line(
    tmp_path: Path, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a daemon on PostgreSQL with two win-backs due, and another worker holding two rows with live leases
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    s = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    s.add([1, 2], days_ago=60)
    other = s.store()
    held = _other_worker_busy(other)
    other.close()
    settings = load_settings(s.config)
    deps = Deps.build(settings)
    deps.clock = clock = SkewedClock(0)

    async def scenario() -> tuple[Any, ...]:
        daemon = Daemon(settings, config_path=s.config, deps=deps)
        try:
            plan(daemon.store, settings, clock.now())
            # When its host's clock jumps five minutes ahead: its maintenance, a dispatch run, a health line
            clock.skew = timedelta(minutes=5)
            await daemon.maintenance()
            off = await daemon.gen.dispatcher.run_once()
            await daemon.health()
            paused = daemon.paused()
            # and once it is set right, the daemon's retry after the pause
            clock.skew = timedelta(0)
            daemon.gen.dispatcher.resume("retrying")
            await daemon.maintenance()
            back = await daemon.gen.dispatcher.run_once()
        finally:
            await daemon._close()
            daemon.store.close()
        return off, paused, back

    off, paused, back = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    # Then nothing was sent and the other worker's rows were left alone while the clock was off, the log says why
    # (and the health line the offset); set right, the daemon sends (but not to the mailbox the other is sending to)
    assert off.clock_off is not None and "300.0 s ahead of the database's" in off.clock_off and paused
    [health] = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "health"]
    assert health["paused"] is True and 299 < health["clock_offset_seconds"] < 301, health
    [offset] = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "clock_off"]
    assert offset["allowed_seconds"] == 15.0
    assert back.clock_off is None and back.outcomes["sent"] == 1
    assert [m.rcpt_tos for m in smtp_server.messages] == [("c2@example.com",)]
    assert s.rows("SELECT id, status, claimed_by FROM message WHERE id IN (:a, :b) ORDER BY id", a=held[0],
                  b=held[1]) == [(held[0], "sending", "other"), (held[1], "claimed", "other")]  # fmt: skip


def _one_connection_shop(pg_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, *,
                         delay_seconds: float, lease_seconds: int) -> tuple[Shop, SkewedClock, list[str]]:  # fmt: skip
    """8 win-backs due on a worker whose clock can be set off (``SkewedClock``), one connection, one message at a
    time, a server that takes ``delay_seconds`` over each, a lease of ``lease_seconds``."""
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    emails = [f"c{i}@example.com" for i in range(8)]
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=delay_seconds))
    settings = make_settings(pg_url, smtp_server.port, smtp={"pool_size": 1}, in_flight_per_connection=1,
                             compose_processes=0, lease_seconds=lease_seconds)  # fmt: skip
    clock = SkewedClock(0)
    return Shop(pg_url, settings, emails, clock=clock), clock, emails  # type: ignore[arg-type]


def test_a_run_whose_clock_jumps_off_the_databases_while_it_sends_stops_claiming(
    pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 8 win-backs due, one connection, a server that takes half a second over each message, a lease of 3 s
    # (renewed, and the clock compared, every second; 0.5 s allowed)
    shop_, clock, emails = _one_connection_shop(pg_migrated_url, smtp_server, monkeypatch, delay_seconds=0.5,
                                                lease_seconds=3)  # fmt: skip

    def jump() -> None:  # When the host's clock jumps 5 minutes ahead once the first message arrived
        while not smtp_server.messages:
            time.sleep(0.01)
        clock.skew = timedelta(minutes=5)

    jumper = threading.Thread(target=jump)
    jumper.start()
    try:
        report = shop_.cycle()
        statuses = Counter(r["status"] for r in shop_.store.messages())
    finally:
        jumper.join()
        shop_.close()
    # Then the run stops claiming at the next lease renewal, says why and exits 3; what it sent is recorded, what it
    # held goes back to the queue, no row is left claimed, sending or uncertain
    assert report.dispatched.clock_off is not None and "ahead of the database's" in report.dispatched.clock_off
    assert running.exit_code(report) == 3
    sent = len(smtp_server.messages)
    assert 1 <= sent < len(emails) and statuses == Counter(sent=sent, planned=len(emails) - sent), statuses


def test_a_run_whose_clock_jumps_behind_the_databases_while_it_sends_leaves_its_leases_live(
    pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 8 win-backs due, one connection, a server that takes a second over each message, a lease of 6 s (renewed,
    # and the clock compared, every 2 s; 1 s allowed)
    shop_, clock, _ = _one_connection_shop(pg_migrated_url, smtp_server, monkeypatch, delay_seconds=1, lease_seconds=6)
    lapsed_seen: list[int] = []
    done = threading.Event()
    watcher_engine = db.create_engine(pg_migrated_url)

    def jump_and_watch() -> None:
        # When the host's clock jumps 5 minutes behind once the first message arrived, while another worker (on the
        # database's clock) watches for this live worker's rows whose leases it would take for lapsed
        while not smtp_server.messages and not done.is_set():
            time.sleep(0.01)
        clock.skew = timedelta(minutes=-5)
        while not done.is_set():
            with watcher_engine.connect() as conn:
                lapsed_seen.append(conn.execute(sa.text(
                    "SELECT count(*) FROM message WHERE status IN ('claimed', 'sending')"
                    " AND lease_until < clock_timestamp()")).scalar_one())  # fmt: skip
            time.sleep(0.01)

    watcher = threading.Thread(target=jump_and_watch)
    watcher.start()
    try:
        report = shop_.cycle()
    finally:
        done.set()
        watcher.join()
        watcher_engine.dispose()
        shop_.close()
    # Then the run stops at the next lease renewal, and until it has given its rows back their leases stay live: it
    # does not renew them on its clock (5 minutes behind: leases that lapsed 5 minutes ago, for another worker's
    # maintenance to take, its `sending` row made uncertain though it is alive and sending it)
    assert report.dispatched.clock_off is not None and "behind the database's" in report.dispatched.clock_off
    assert max(lapsed_seen, default=0) == 0, Counter(lapsed_seen)


def test_a_daemon_paused_for_its_clock_sends_again_once_the_clock_is_right_without_a_sighup(
    tmp_path: Path, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a daemon on PostgreSQL told to stay paused until SIGHUP after a pause (an SMTP server's trouble is for an
    # operator to look at), with a win-back due
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    s = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url,
                  extra="[sending]\npause_retry_seconds = 0\n")  # fmt: skip
    s.add([1], days_ago=60)
    settings = load_settings(s.config)
    deps = Deps.build(settings)
    deps.clock = clock = SkewedClock(0)

    async def scenario() -> tuple[bool, bool, int]:
        daemon = Daemon(settings, config_path=s.config, deps=deps)
        try:
            plan(daemon.store, settings, clock.now())
            # When its host's clock is five minutes ahead: the dispatcher pauses, the daemon waits for the retry
            clock.skew = timedelta(minutes=5)
            await daemon.gen.dispatcher.run_once()
            waiting = asyncio.ensure_future(daemon._wait_out_pause(daemon.gen))
            await asyncio.sleep(0)
            paused_while_off = daemon.paused()
            # and NTP sets it right: the daemon's next maintenance sees it
            clock.skew = timedelta(0)
            await daemon.maintenance()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiting), 5)
            resumed = waiting.done() and not daemon.paused()
            waiting.cancel()
            sent = (await daemon.gen.dispatcher.run_once()).outcomes["sent"]
        finally:
            await daemon._close()
            daemon.store.close()
        return paused_while_off, resumed, sent

    paused_while_off, resumed, sent = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    # Then the pause ends with the clock's problem (not at a SIGHUP nobody sends: the clock was never an operator's
    # decision), and the daemon sends
    assert paused_while_off and resumed and sent == 1


def test_a_daemon_whose_clock_is_off_plans_nothing_and_plans_once_the_clock_is_right(
    tmp_path: Path, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a daemon on PostgreSQL that never planned its win-backs (its start-up catches them up), two customers due
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)
    s = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_migrated_url)
    s.add([1, 2], days_ago=60)
    settings = load_settings(s.config)
    deps = Deps.build(settings)
    deps.clock = clock = SkewedClock(0)

    async def scenario() -> tuple[list[Any], list[Any], bool, list[Any]]:
        daemon = Daemon(settings, config_path=s.config, deps=deps)
        try:
            # When it starts on a host whose clock is two days ahead: the catch-up, then the cron job
            clock.skew = timedelta(days=2)
            await daemon._catch_up(settings)
            await daemon._planner("winback")()
            while_off = s.rows("SELECT dedupe_key FROM message")
            runs_while_off = s.rows("SELECT * FROM job_run")
            paused = daemon.paused()
            # and NTP sets it right: its next maintenance sees it
            clock.skew = timedelta(0)
            await daemon.maintenance()
            while daemon._planning or daemon._tasks:
                await asyncio.sleep(0.05)
            planned = s.rows("SELECT dedupe_key FROM message")
        finally:
            await daemon._close()
            daemon.store.close()
        return while_off, runs_while_off, paused, planned

    while_off, runs_while_off, paused, planned = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    # Then nothing was planned (nor recorded as planned) on the wrong clock, the log says why, sending is paused
    assert while_off == [] and runs_while_off == [] and paused
    skipped = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "plan_skipped"]
    assert skipped and all(f["campaign"] == "winback" and "ahead of the database's" in f["reason"] for f in skipped)
    # and once the clock is right, the daemon plans at once, not at the next day's cron
    assert len(planned) == 2

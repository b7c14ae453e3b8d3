"""The dispatcher's run as a whole: a failing ledger stops it instead of hanging it, and its memory does not
grow with the campaign."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.daemon_harness import Shop as DaemonShop
from tests.daemon_harness import make_shop
from tests.sendkit import NOW, REPO, Shop, TimedSink, make_settings, message_ids, settings_dict
from tests.smtp_server import Behaviour, RecordingServer, RelayRate, closed_port
from worker.adapters.store import Store
from worker.app import make_limiter
from worker.asyncstore import AsyncStore
from worker.commands import running
from worker.config import load_settings, settings_from_dict
from worker.core.limits import quota_day, quota_day_end
from worker.daemon import Daemon
from worker.domain import Outcome, SendResult
from worker.limiter import DailyQuota
from worker.pipeline import plan
from worker.sending import ClockGuard, Dispatcher, DispatchReport, LedgerWriter
from worker.testing import FakeClock, RecordingTransport


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


def _dispatcher(shop: Shop, astore: AsyncStore, transport: RecordingTransport) -> Dispatcher:
    return Dispatcher(settings=shop.settings, store=astore, composer=shop.deps.composer(), transport=transport,
                      clock=shop.clock, worker="w1")  # fmt: skip


def _statuses(shop: Shop) -> Counter[str]:
    with shop.store.engine.connect() as conn:
        return Counter(conn.execute(sa.text("SELECT status FROM message")).scalars())


def test_a_ledger_that_fails_mid_run_stops_the_run_with_its_error_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 300 customers due a win-back, batches of 50 (several in flight at once), and a database
    # that fails on the writer's fourth commit and every one after it (a full disk, say), tried again twice
    monkeypatch.setattr(LedgerWriter, "RETRY_SECONDS", (0.01, 0.01))
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = make_settings(url, closed_port(), batch_size=50, compose_processes=0, lease_seconds=60)
    shop = Shop(url, settings, [f"c{i}@test.example" for i in range(300)])
    plan(shop.store, settings, NOW)
    commits = 0
    record_and_mark = shop.store.record_and_mark

    def failing(*args: object, **kwargs: object) -> set[int]:
        nonlocal commits
        commits += 1
        if commits >= 4:
            raise sa.exc.OperationalError("UPDATE message", {}, OSError("database or disk is full"))
        return record_and_mark(*args, **kwargs)  # type: ignore[arg-type]

    shop.store.record_and_mark = failing  # type: ignore[method-assign]
    astore = AsyncStore(shop.store)
    transport = RecordingTransport()
    try:
        # When the dispatcher runs, Then the run ends with the database's error once the retries are spent (it
        # does not hang on a queue nobody empties), after trying that commit three times in all
        with pytest.raises(sa.exc.OperationalError, match="disk is full"):
            asyncio.run(asyncio.wait_for(_dispatcher(shop, astore, transport).run_once(), timeout=60))
    finally:
        astore.close()
        shop.store.record_and_mark = record_and_mark  # type: ignore[method-assign]
    assert commits == 6
    # And once the leases lapse, no row is lost: each is sent, back in the queue, or uncertain (it was on the
    # wire when the ledger broke), and only those could have reached the server
    shop.store.release_expired_leases(NOW + timedelta(seconds=61))
    statuses = _statuses(shop)
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"sent", "planned", "uncertain"}, statuses
    assert statuses["sent"] <= len(transport.sent) <= statuses["sent"] + statuses["uncertain"]
    shop.close()


def test_marks_whose_commit_reply_was_lost_are_sent_once_when_the_commit_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 60 customers due a win-back, a clock that moves, and a database connection that drops after the
    # first commit of marks went through, before the worker heard so (it tries that commit again, later)
    monkeypatch.setattr(LedgerWriter, "RETRY_SECONDS", (0.05,))
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = make_settings(url, closed_port(), batch_size=20, compose_processes=0, lease_seconds=60)
    shop = Shop(url, settings, [f"c{i}@test.example" for i in range(60)])
    plan(shop.store, settings, NOW)
    record_and_mark = shop.store.record_and_mark
    lost: list[int] = []

    def losing_a_reply(records: Any, ids: Any, **kwargs: Any) -> Any:
        marks = record_and_mark(records, ids, **kwargs)
        if ids and not lost:
            lost.extend(ids)
            raise sa.exc.OperationalError("COMMIT", {}, OSError("server closed the connection unexpectedly"))
        return marks

    shop.store.record_and_mark = losing_a_reply  # type: ignore[method-assign]
    astore = AsyncStore(shop.store)
    transport = RecordingTransport()
    try:
        dispatcher = Dispatcher(settings=shop.settings, store=astore, composer=shop.deps.composer(),
                                transport=transport, clock=_FlowingClock(NOW), worker="w1")  # fmt: skip
        report = asyncio.run(asyncio.wait_for(dispatcher.run_once(), timeout=60))
    finally:
        astore.close()
        shop.store.record_and_mark = record_and_mark  # type: ignore[method-assign]
    # Then the marks the lost reply made are taken as made: everyone gets one email in this run, none twice,
    # and each row counts one attempt
    assert lost
    assert report.outcomes == {"sent": 60}
    assert sorted(r for _, r, _ in transport.sent) == sorted(f"c{i}@test.example" for i in range(60))
    with shop.store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, attempts FROM message")).all()
    assert Counter(map(tuple, rows)) == {("sent", 1): 60}
    shop.close()


def test_a_pause_on_the_implicit_tls_port_without_tls_says_what_to_check(tmp_path: Path) -> None:
    # Given smtp.port 465 with STARTTLS: the server waits for TLS, the client for a greeting, and each try times out
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = make_settings(url, 465, smtp={"tls": "starttls"}, pause_after_failures=3)
    shop = Shop(url, settings, [])
    astore = AsyncStore(shop.store)
    try:
        dispatcher = _dispatcher(shop, astore, RecordingTransport())
        timeout = SendResult(Outcome.TRANSIENT, None, "Timed out waiting for server response", stage="connect",
                             error_type="SMTPConnectTimeoutError")  # fmt: skip
        for _ in range(3):
            dispatcher._observe_failures(timeout, "test.example")
    finally:
        astore.close()
        shop.close()
    # Then the pause after three in a row says so, besides the failures
    assert dispatcher.paused is not None and dispatcher.paused.startswith("3 connection failures in a row")
    assert "smtp.port 465 is the implicit-TLS port (SMTPS), where smtp.tls is usually 'tls'" in dispatcher.paused


@pytest.mark.parametrize("customers", [200, 800])
def test_the_runs_memory_of_its_sends_stays_near_what_is_in_flight(tmp_path: Path, customers: int) -> None:
    # Given a campaign of 200 or 800 customers, sent in batches of 40
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = make_settings(url, closed_port(), batch_size=40, compose_processes=0)
    shop = Shop(url, settings, [f"c{i}@test.example" for i in range(customers)])
    plan(shop.store, settings, NOW)
    astore = AsyncStore(shop.store)
    transport = RecordingTransport()
    try:
        report = asyncio.run(_dispatcher(shop, astore, transport).run_once())
    finally:
        astore.close()
    # Then everyone got one email, and the arbiter never remembered more than a few batches' worth of sends,
    # whatever the campaign's size (it forgets each send once the ledger shows it)
    assert report.outcomes == {"sent": customers} and len(transport.sent) == customers
    assert 0 < report.remembered_peak <= 4 * 40, report.remembered_peak
    shop.close()


class _FlowingClock:
    """Real time, from a fixed instant (10:00 in Jakarta, so no rule of the day's time gets in the way)."""

    def __init__(self, start: datetime) -> None:
        self.start, self.t0 = start, time.monotonic()

    def now(self) -> datetime:
        return self.start + timedelta(seconds=time.monotonic() - self.t0)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _one_domain_over_one_connection(
    url: str, smtp_server: RecordingServer, emails: list[str], *, slow: list[str], slow_seconds: float, rate: float,
    senders: int,
) -> tuple[Shop, RelayRate]:  # fmt: skip
    """A shop whose customers ``emails`` are sent to at one domain at ``rate`` a second (burst 1), over one connection
    shared by ``senders``, to ``smtp_server``, which takes ``slow_seconds`` over each message to ``slow``; and what
    notes each MAIL FROM the server saw (``RelayRate``, at a limit never reached)."""
    for address in slow:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=slow_seconds))
    seen = smtp_server.relay_rate = RelayRate(10_000, at="mail")
    settings = make_settings(url, smtp_server.port, smtp={"pool_size": 1}, in_flight_per_connection=senders,
                             compose_processes=0, batch_size=len(emails), rate_per_second=10_000.0, burst=1000,
                             domain_rate_per_second=rate, domain_burst=1)  # fmt: skip
    shop = Shop(url, settings, emails)
    plan(shop.store, settings, NOW)
    return shop, seen


def test_messages_whose_rate_slots_passed_while_a_slow_message_held_the_connection_go_out_at_the_rate(
    db_url: str, smtp_server: RecordingServer
) -> None:
    # Given 12 customers at one domain sent at most 2 a second (burst 1; on PostgreSQL the slots booked in the
    # database, as every worker shares them), over one connection shared by eight senders, to a server that takes 2 s
    # over the third and the eleventh message (the others at once). A slot 0.5 s apart is further off than a sender
    # waits for one on the connection (WIRE_HOLD_SECONDS): each sender books its slot without the connection, then
    # waits for the connection
    emails = [f"c{i}@test.example" for i in range(12)]
    shop, seen = _one_domain_over_one_connection(db_url, smtp_server, emails, slow=emails[2::8], slow_seconds=2.0,
                                                 senders=8, rate=2.0)  # fmt: skip
    # When one run sends them (while a slow message holds the connection, the slots the other senders booked
    # pass)
    report = _run_with_the_rate_in_the_database(shop)
    # Then the server saw them come no faster than the domain's rate: the messages whose slots passed while they
    # waited for the connection do not all go out the moment it is free, on top of those whose slots are now (6
    # in one second when a passed slot is spent late; at a rate of 10/s, whose slots a sender waits for on the
    # connection, this scenario never books a slot before the connection). One more than rate + burst for the moment
    # between a slot and its MAIL FROM
    assert report.outcomes == {"sent": 12}
    assert seen.fastest_second() <= 2 + 1 + 1, sorted(round(t - seen.accepted[0], 3) for t in seen.accepted)
    shop.close()


def test_messages_waiting_for_the_only_connection_book_their_rate_slot_once(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 30 customers at one domain sent at most 5 a second (burst 1; on PostgreSQL the slots booked in the
    # database, shared with every worker), over one connection shared by four senders, to a server that takes 0.3 s
    # over each message: the connection, not the rate, holds them back
    emails = [f"c{i}@test.example" for i in range(30)]
    shop, seen = _one_domain_over_one_connection(db_url, smtp_server, emails, slow=emails, slow_seconds=0.3,
                                                 senders=4, rate=5.0)  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="kembali")
    # When one run sends them
    began = time.monotonic()
    report = _run_with_the_rate_in_the_database(shop)
    elapsed = time.monotonic() - began
    # Then each message booked one slot of the domain's rate: none waited for the connection with a slot booked that
    # passed meanwhile, to book another (29 of 30 did, the lost slots halving the domain's rate for every worker
    # that shares it). One for a wake-up the machine's load made late. And none went faster than the rate
    assert report.outcomes == {"sent": 30}
    missed = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "rate_slot_missed"]
    assert len(missed) <= 1, (missed, f"{elapsed:.1f} s")
    assert seen.fastest_second() <= 5 + 1 + 1, sorted(round(t - seen.accepted[0], 3) for t in seen.accepted)
    print(f"30 messages in {elapsed:.1f} s, {len(missed)} slots booked again")
    shop.close()


def _run_beside_maintenance(
    url: str, shop: Shop, clock: _FlowingClock, dispatcher: Callable[[AsyncStore, Any], Dispatcher]
) -> tuple[DispatchReport, list[tuple[int, int]]]:
    """One dispatch run while another worker's maintenance releases lapsed leases every 0.1 s; the run's report
    and what each release released."""
    other = Store.from_url(url)
    released: list[tuple[int, int]] = []
    done = threading.Event()

    def maintenance() -> None:
        while not done.wait(0.1):
            released.append(other.release_expired_leases(clock.now()))

    keeper = threading.Thread(target=maintenance)
    keeper.start()
    astore = AsyncStore(shop.store)

    async def run() -> DispatchReport:
        transport = shop.deps.transport()
        try:
            return await dispatcher(astore, transport).run_once()
        finally:
            await transport.close()

    try:
        return asyncio.run(asyncio.wait_for(run(), timeout=60)), released
    finally:
        done.set()
        keeper.join()
        astore.close()
        other.close()


@pytest.mark.parametrize("renewals", ["work", "fail"])
def test_a_run_holding_rows_longer_than_a_lease_never_sends_one_twice(tmp_path: Path, renewals: str) -> None:
    # Given 10 customers due a win-back, a lease of 1 s and a rate of 4 a second (the run holds its batch
    # for 2.5 s), and another worker's maintenance releasing lapsed leases every 0.1 s meanwhile
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    emails = [f"c{i}@test.example" for i in range(10)]
    with TimedSink() as sink:
        settings = make_settings(url, sink.port, compose_processes=0, lease_seconds=1, rate_per_second=4.0, burst=1)
        shop = Shop(url, settings, emails)
        plan(shop.store, settings, NOW)
        if renewals == "fail":  # the worker cannot renew (a stalled database, say): its leases lapse under it

            def refused(**_kwargs: object) -> int:
                raise sa.exc.OperationalError("UPDATE message", {}, OSError("database is locked"))

            shop.store.renew_leases = refused  # type: ignore[method-assign,assignment]
        clock = _FlowingClock(NOW)
        deps = replace(shop.deps, clock=clock)
        report, released = _run_beside_maintenance(url, shop, clock, lambda astore, transport: deps.dispatcher(
            astore, transport))
        lapsed = [r for r in released if r != (0, 0)]
        statuses = _statuses(shop)
        received = Counter(m.rcpt_tos[0] for m in sink.messages)
        if renewals == "work":
            # Then the run kept its leases: nothing was released, each customer got one email, every row is sent
            assert lapsed == [] and report.outcomes == {"sent": 10}
            assert statuses == {"sent": 10} and received == {e: 1 for e in emails}
        else:
            # Then its leases lapsed, and yet no one got two emails: a row taken back while its message was on the
            # wire is recorded as sent after all (not left uncertain), and a row put back in the queue before its
            # turn is either sent once or waits in the queue for the next run
            assert lapsed, "the leases were expected to lapse"
            assert set(received.values()) == {1}
            assert set(statuses) <= {"sent", "planned"}, statuses
            assert statuses["sent"] == len(received) and report.outcomes["sent"] == len(received)
        assert set(message_ids(sink.messages).values()) == {1}
        assert all(len(shop.attempts(e)) == received[e] for e in emails)
        shop.close()


def test_rows_an_earlier_failed_run_left_claimed_lapse_while_a_later_run_of_the_worker_goes_on(tmp_path: Path) -> None:
    # Given 10 customers due a win-back, a lease of 1 s, and two rows a failed run of this same worker left claimed
    # (it never came to send them): one whose lease of 1 s lapses during the next run, one claimed for 60 s, alive
    # through it; and another worker's maintenance releasing lapsed leases every 0.1 s
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    emails = [f"c{i}@test.example" for i in range(10)]
    with TimedSink() as sink:
        settings = make_settings(url, sink.port, compose_processes=0, lease_seconds=1, batch_size=3,
                                 rate_per_second=4.0, burst=1)  # fmt: skip
        shop = Shop(url, settings, emails)
        plan(shop.store, settings, NOW)
        clock = _FlowingClock(NOW)
        deps = replace(shop.deps, clock=clock)
        [left] = shop.store.claim(worker="w1", now=clock.now(), limit=1, lease_seconds=1, domain="shop.example")
        [alive] = shop.store.claim(worker="w1", now=clock.now(), limit=1, lease_seconds=60, domain="shop.example")
        alive_until = shop.row(alive.email).lease_until
        # When a later run of the worker sends the rest, holding its rows for 2 s and more
        report, _ = _run_beside_maintenance(url, shop, clock, lambda astore, transport: Dispatcher(
            settings=settings, store=astore, composer=deps.composer(), transport=transport, clock=clock, worker="w1"))
        # Then the run renews only its own leases: the row claimed for 60 s keeps the lease it was claimed with
        # (renewed, it would be pushed on as long as runs go on, never to lapse); it sends the others once each, and
        # the row left for 1 s has lapsed back to the queue: waiting for the next run, or, on a machine slow enough
        # that this run claimed again after it lapsed (before its first renewal: that row cannot tell), sent by
        # this one, once
        assert (shop.row(alive.email).status, shop.row(alive.email).lease_until) == ("claimed", alive_until)
        others = [e for e in emails if e not in (left.email, alive.email)]
        received = Counter(m.rcpt_tos[0] for m in sink.messages)
        assert {e: received[e] for e in [*others, alive.email]} == {**{e: 1 for e in others}, alive.email: 0}
        left_now = shop.row(left.email).status
        assert left_now in ("planned", "sent"), left_now
        assert received[left.email] == (1 if left_now == "sent" else 0)
        assert report.outcomes == {"sent": 8 + received[left.email]}
        sent = 8 + received[left.email]
        assert _statuses(shop) == {"sent": sent, "claimed": 1, **({"planned": 1} if left_now == "planned" else {})}
        shop.close()


@pytest.mark.postgres
def test_a_database_connection_lost_mid_run_is_reopened_and_nothing_is_lost(
    pg_migrated_url: str, smtp_server: RecordingServer
) -> None:
    # Given 20 customers due a win-back and a slow SMTP server
    emails = [f"c{i}@test.example" for i in range(20)]
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=0.1))
    settings = make_settings(pg_migrated_url, smtp_server.port, compose_processes=0)
    shop = Shop(pg_migrated_url, settings, emails)
    plan(shop.store, settings, NOW)
    deps = replace(shop.deps, clock=_FlowingClock(NOW))
    astore = AsyncStore(shop.store)
    admin = sa.create_engine(pg_migrated_url)

    async def run() -> DispatchReport:
        transport = deps.transport()
        dispatch = asyncio.ensure_future(deps.dispatcher(astore, transport).run_once())
        try:
            while len(smtp_server.messages) < 5 and not dispatch.done():
                await asyncio.sleep(0.02)
            # When the database drops every connection of the worker (a restart, a failover) mid-run
            with admin.connect() as conn:
                dropped = conn.execute(sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )).scalar_one()  # fmt: skip
            assert dropped >= 1
            return await dispatch
        finally:
            await transport.close()

    try:
        report = asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        astore.close()
        admin.dispose()
    # Then the run reconnects and goes on: everyone got one email, every row says sent, none is left in flight
    assert report.outcomes == {"sent": 20}
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((e,) for e in emails)
    assert _statuses(shop) == {"sent": 20}
    assert all(len(shop.attempts(e)) == 1 for e in emails)
    shop.close()


@pytest.mark.postgres
def test_a_database_that_refuses_connections_for_a_moment_mid_run_sends_everyone_once_and_leaves_nothing_uncertain(
    pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer
) -> None:
    # Given 120 customers due a win-back, claimed 10 at a time and sent at 40 a second (each slot booked in the
    # database, which every worker shares)
    emails = [f"c{i}@test.example" for i in range(120)]
    settings = make_settings(pg_migrated_url, smtp_server.port, compose_processes=0, batch_size=10,
                             rate_per_second=40.0, burst=1, domain_rate_per_second=40.0, domain_burst=1)  # fmt: skip
    shop = Shop(pg_migrated_url, settings, emails)
    plan(shop.store, settings, NOW)
    deps = replace(shop.deps, clock=_FlowingClock(NOW))
    astore = AsyncStore(shop.store)
    name = sa.make_url(pg_migrated_url).database

    async def run() -> DispatchReport:
        transport = deps.transport()
        dispatch = asyncio.ensure_future(deps.dispatcher(astore, transport).run_once())
        try:
            while len(smtp_server.messages) < 10 and not dispatch.done():
                await asyncio.sleep(0.02)
            # When the database restarts mid-run: every connection dropped, new ones refused for 2 s
            with pg_admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
                conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                             {"d": name})  # fmt: skip
            await asyncio.sleep(2)
            with pg_admin.connect() as conn:
                conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
            return await dispatch
        finally:
            await transport.close()

    try:
        report = asyncio.run(asyncio.wait_for(run(), timeout=90))
    finally:
        astore.close()
        with pg_admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
    # Then the run waits for it and goes on: everyone got one email, every row says sent (none is left in flight
    # to become `uncertain` when its lease lapses, though it never left), one attempt each
    assert report.outcomes == {"sent": 120}
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((e,) for e in emails)
    assert _statuses(shop) == {"sent": 120}
    assert all(len(shop.attempts(e)) == 1 for e in emails)
    shop.close()


@pytest.mark.postgres
def test_sends_whose_outcomes_a_database_outage_kept_from_the_ledger_are_recorded_by_the_next_run(
    pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given 6 customers due a win-back, a server that takes a second over each message, and a database that stays
    # away longer than the ledger writer tries again (here 0.4 s; 15.5 s as shipped: a failover takes longer)
    shop, emails = _slow_shop(pg_migrated_url, smtp_server, monkeypatch, delay_seconds=1.0, in_flight_per_connection=1)
    settings = shop.settings
    astore = AsyncStore(shop.store)

    async def run() -> tuple[BaseException | None, DispatchReport]:
        transport = shop.deps.transport()
        dispatcher = Dispatcher(settings=settings, store=astore, composer=shop.deps.composer(), transport=transport,
                                clock=_FlowingClock(NOW), worker="w1")  # fmt: skip
        try:
            # When the database goes away while two messages are on the wire (the server takes them), for longer
            # than the run waits for it: the run stops with the database's error
            failure = await _fails_in_an_outage(dispatcher.run_once(), shop.store.engine, pg_admin, pg_migrated_url)
            # And once it is back, the next run goes on
            return failure, await dispatcher.run_once()
        finally:
            await transport.close()

    try:
        failure, report = asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
        astore.close()
    assert failure is not None and type(failure).__name__ == "OperationalError", failure
    # Then the two sends the server took are recorded as sent by the next run, not left `sending` to become
    # `uncertain` (an operator's decision) when their leases lapse; the others are sent by it; each once
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((e,) for e in emails)
    assert _statuses(shop) == {"sent": 6}
    assert report.outcomes == {"sent": 4}
    assert all(len(shop.attempts(e)) == 1 for e in emails)
    # And meanwhile the log named the rows whose sends it held, for `ledger close --as sent` should the process end
    [kept] = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "outcomes_not_written"]
    with shop.store.engine.connect() as conn:
        first_two = conn.execute(sa.text("SELECT m.id FROM message m JOIN attempt a ON a.message_id = m.id"
                                         " ORDER BY a.finished_at, m.id LIMIT 2")).scalars().all()  # fmt: skip
    assert sorted(int(i) for i in kept["sent_ids"].split(",")) == sorted(first_two)
    assert "kembali ledger close --as sent" in kept["note"]
    shop.close()


@pytest.mark.postgres
def test_sends_a_database_outage_kept_from_the_ledger_are_recorded_though_the_clock_is_then_off(
    pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a run that the database left, as above, with two sends the server took and could not record
    shop, _ = _slow_shop(pg_migrated_url, smtp_server, monkeypatch, delay_seconds=1.0, in_flight_per_connection=1)
    settings = shop.settings
    astore = AsyncStore(shop.store)

    async def run() -> tuple[BaseException | None, DispatchReport]:
        transport = shop.deps.transport()
        clock = _FlowingClock(NOW)
        dispatcher = Dispatcher(settings=settings, store=astore, composer=shop.deps.composer(), transport=transport,
                                clock=clock, worker="w1")  # fmt: skip
        try:
            failure = await _fails_in_an_outage(dispatcher.run_once(), shop.store.engine, pg_admin, pg_migrated_url)
            # When the database is back but this host's clock is now far off the database's (NOW: days ago), as
            # after a host's suspend and resume, before NTP sets it right
            dispatcher.clock_guard = ClockGuard(astore, clock, settings.sending.lease_seconds)
            return failure, await dispatcher.run_once()
        finally:
            await transport.close()

    try:
        failure, report = asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
        astore.close()
    # Then the run sends nothing, but records the two sends it knows the server took: left `sending`, their leases
    # would lapse meanwhile and another worker's maintenance make them `uncertain`, an operator's decision
    assert failure is not None and report.clock_off is not None
    assert len(smtp_server.messages) == 2
    assert _statuses(shop)["sent"] == 2, _statuses(shop)
    shop.close()


@pytest.mark.postgres
def test_sends_on_the_wire_when_the_database_goes_away_are_finished_and_recorded_by_the_next_run(
    pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 6 customers due a win-back, a server that takes 2 s over each message, and a database that goes away
    # for longer than the ledger writer tries again (0.4 s here) while two messages are on the wire
    shop, emails = _slow_shop(pg_migrated_url, smtp_server, monkeypatch, delay_seconds=2.0)
    astore = AsyncStore(shop.store)

    async def run() -> BaseException | None:
        transport = shop.deps.transport()
        dispatcher = _rate_in_the_database(shop, astore, transport)
        try:
            failure = await _fails_in_an_outage(dispatcher.run_once(), shop.store.engine, pg_admin, pg_migrated_url)
            await dispatcher.run_once()
            return failure
        finally:
            await transport.close()

    try:
        failure = asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
        astore.close()
    # Then the run stops with the database's error, but only once the two messages on the wire are through: they
    # arrive and are recorded as sent by the next run (before, they were cut off mid-DATA: not delivered, and left
    # `sending` to become `uncertain` when their leases lapsed); the next run sends the others; each once
    assert failure is not None and type(failure).__name__ == "OperationalError", failure
    assert _statuses(shop) == {"sent": 6}
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((e,) for e in emails)
    assert all(len(shop.attempts(e)) == 1 for e in emails)
    shop.close()


@pytest.mark.postgres
def test_a_failing_run_cancelled_while_it_waits_for_the_sends_on_the_wire_cuts_them_off_and_ends(
    pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a run that fails (the database gone) while messages take 20 s each on the wire (long enough that a run
    # which waited for them could not pass for one cut off, however loaded the machine): three connections and six
    # senders for eight messages; the first three go on the wire (claimed, marked, booked and connected in turn), the
    # third takes 3 s, and its sender then marks the seventh while the database is away: the run fails there, with
    # the others on the wire
    shop, emails = _slow_shop(pg_migrated_url, smtp_server, monkeypatch, delay_seconds=20.0, smtp_timeout=30.0,
                              pool_size=3, customers=8)  # fmt: skip
    smtp_server.on(emails[2], Behaviour(delay_at="data", delay_seconds=3.0))
    astore = AsyncStore(shop.store)

    async def run() -> tuple[bool, set[tuple[str, ...]], list[str]]:
        transport = shop.deps.transport()
        dispatcher = _rate_in_the_database(shop, astore, transport)
        try:
            task = asyncio.ensure_future(dispatcher.run_once())
            while smtp_server.data_taken < 3:
                await asyncio.sleep(0.02)
            _allow_connections(pg_admin, pg_migrated_url, False)
            failed_by = time.monotonic() + 30
            while not (dispatcher._failing and dispatcher._on_wire):  # failed, and waits for the sends on the wire
                assert time.monotonic() < failed_by, "the run did not fail with sends on the wire"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            # When it is cancelled meanwhile (a daemon's shutdown past its grace period)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            # (what the server had taken in whole by the time the run ended: a run that waited for the sends on the
            # wire ended after their 20 s at DATA, once the server had them)
            arrived = {m.rcpt_tos for m in smtp_server.messages}
            left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("kembali-sender")]
            return task.cancelled(), arrived, left
        finally:
            _allow_connections(pg_admin, pg_migrated_url, True)
            await transport.close()

    try:
        cancelled, arrived, left = asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
        astore.close()
    # Then it ends at once, cancelled, before any send held 20 s at DATA is through (the server may or may not have
    # the third's yet, as the load decides which database call fails first), and leaves no sender running on its own
    assert cancelled and left == [], (cancelled, left)
    assert arrived <= {(emails[2],)}, arrived
    shop.close()


@pytest.mark.postgres
def test_outcomes_a_database_outage_kept_from_the_ledger_are_written_after_a_reload_between_runs(
    tmp_path: Path, pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a daemon on PostgreSQL, 6 customers due a win-back, a server that takes a second over each message,
    # and a database that stays away longer than the ledger writer tries again (here 0.4 s)
    shop, emails = _daemon_shop(tmp_path, pg_migrated_url, smtp_server, monkeypatch, customers=6)

    async def scenario() -> BaseException | None:
        daemon = Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            plan(daemon.store, daemon.gen.settings, daemon.clock.now())
            # When the database goes away while messages are on the wire: the run stops with its error
            failure = await _fails_in_an_outage(daemon.gen.dispatcher.run_once(), daemon.store.engine, pg_admin,
                                                pg_migrated_url)  # fmt: skip
            # And a reload (SIGHUP, a saved template) comes between that run and the next (its catch-up planning,
            # due as no daemon pass has planned win-back yet, done first: the dispatcher claims nothing meanwhile)
            assert await daemon.reload("SIGHUP")
            if daemon._reload_catch_up is not None:
                await daemon._reload_catch_up
            await daemon.gen.dispatcher.run_once()
            return failure
        finally:
            await daemon._close()
            daemon.store.close()

    try:
        failure = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
    assert failure is not None and type(failure).__name__ == "OperationalError", failure
    # Then the sends the server took before the outage are recorded as sent by the new configuration's run, not
    # left `sending` to become `uncertain` when their leases lapse; everyone gets one email
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((e,) for e in emails)
    assert shop.rows("SELECT status, count(*) FROM message GROUP BY status") == [("sent", 6)]


@pytest.mark.postgres
def test_the_daemons_own_maintenance_leaves_the_rows_whose_outcomes_an_outage_kept_to_it(
    tmp_path: Path, pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a daemon on PostgreSQL with one SMTP connection and four senders, 6 win-backs due, a server that takes
    # a second over each message, and a database that goes away once four rows are `sending` (one on the wire,
    # three waiting for the connection), for longer than the ledger writer tries again: the run fails and keeps
    # the outcomes it could not write (the send the server took; the three it never began, back to the queue)
    shop, emails = _daemon_shop(tmp_path, pg_migrated_url, smtp_server, monkeypatch, customers=6)
    shop.config.write_text(shop.config.read_text().replace("pool_size = 2", "pool_size = 1"))

    async def scenario() -> None:
        daemon = Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            plan(daemon.store, daemon.gen.settings, daemon.clock.now())
            running = asyncio.ensure_future(daemon.gen.dispatcher.run_once())
            while shop.scalar("SELECT count(*) FROM message WHERE status = 'sending'") < 4:
                await asyncio.sleep(0.02)
            _allow_connections(pg_admin, pg_migrated_url, False)
            failure: BaseException | None = None
            try:
                await running
            except Exception as exc:  # (the run stops with the database's error: a run that went on is a failure)
                failure = exc
            _allow_connections(pg_admin, pg_migrated_url, True)
            assert failure is not None and type(failure).__name__ == "OperationalError", failure
            assert daemon.gen.dispatcher.unwritten
            # When the outage outlasted the rows' leases, and the daemon's maintenance runs once the database is
            # back, before its next dispatch run writes what it kept
            with daemon.store.engine.begin() as conn:
                conn.execute(sa.text("UPDATE message SET lease_until = :t WHERE lease_until IS NOT NULL"),
                             {"t": daemon.clock.now() - timedelta(minutes=1)})  # fmt: skip
            await daemon.maintenance()
            await daemon.gen.dispatcher.run_once()
        finally:
            await daemon._close()
            daemon.store.close()

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
    # Then the daemon does not take its own rows for a dead worker's: the send ends `sent`, the rows it never sent
    # are sent now, nothing is left `uncertain` for the operator to decide about, and everyone gets one email
    assert shop.rows("SELECT status, count(*) FROM message GROUP BY status") == [("sent", 6)]
    assert sorted(m.rcpt_tos for m in smtp_server.messages) == sorted((e,) for e in emails)


def _daemon_shop(tmp_path: Path, pg_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, *,
                 customers: int) -> tuple[DaemonShop, list[str]]:  # fmt: skip
    """A daemon's shop on PostgreSQL with ``customers`` due a win-back (their addresses), a server that takes a
    second at DATA over each message, and the ledger writer's and the store's retries cut to 0.4 s."""
    monkeypatch.setattr(LedgerWriter, "RETRY_SECONDS", (0.2, 0.2))
    monkeypatch.setattr(AsyncStore, "RETRY_SECONDS", (0.2, 0.2))
    shop = make_shop(tmp_path, smtp_port=smtp_server.port, plan_cron="0 9 * * *", db_url=pg_url)
    ids = range(1, customers + 1)
    shop.add(ids, days_ago=60)
    emails = [f"c{i}@example.com" for i in ids]
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=1.0))
    return shop, emails


async def _failing_in_an_outage(daemon: Daemon, smtp_server: RecordingServer, pg_admin: sa.Engine, pg_url: str
                                ) -> asyncio.Future[int]:  # fmt: skip
    """Run ``daemon``; once two messages are past their final dot, take the database away (and leave it away) until
    the dispatcher's run has failed and kept their outcomes. The daemon's run, under way."""
    running = asyncio.ensure_future(daemon.run())
    while smtp_server.data_taken < 2:
        await asyncio.sleep(0.02)
    _allow_connections(pg_admin, pg_url, False)
    while not daemon.gen.dispatcher.unwritten:
        await asyncio.sleep(0.02)
    return running


def _allow_connections(pg_admin: sa.Engine, pg_url: str, allow: bool) -> None:
    """Let clients connect to the test database again, or refuse them and drop those connected."""
    name = sa.make_url(pg_url).database
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}'))
        if not allow:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"),
                         {"d": name})  # fmt: skip


async def _fails_in_an_outage(run: Awaitable[object], engine: sa.Engine, pg_admin: sa.Engine, pg_url: str
                              ) -> BaseException | None:  # fmt: skip
    """Start ``run``; once two rows are ``sending``, take the database away until the run ends, then bring it back.
    What the run raised, if anything."""
    running = asyncio.ensure_future(run)
    with engine.connect() as conn:
        while conn.execute(sa.text("SELECT count(*) FROM message WHERE status = 'sending'")).scalar_one() < 2:
            await asyncio.sleep(0.02)
    _allow_connections(pg_admin, pg_url, False)
    try:
        await running
    except Exception as exc:
        return exc
    finally:
        _allow_connections(pg_admin, pg_url, True)
    return None


def _slow_shop(pg_url: str, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, *, delay_seconds: float,
               smtp_timeout: float = 5.0, pool_size: int = 2, customers: int = 6, in_flight_per_connection: int = 2
               ) -> tuple[Shop, list[str]]:  # fmt: skip
    """``customers`` due a win-back, a server that takes ``delay_seconds`` at DATA over each message, ``pool_size``
    connections and ``in_flight_per_connection`` senders each (``smtp.timeout_seconds``: ``smtp_timeout``), and the
    ledger writer's and the store's retries cut to 0.4 s."""
    monkeypatch.setattr(LedgerWriter, "RETRY_SECONDS", (0.2, 0.2))
    monkeypatch.setattr(AsyncStore, "RETRY_SECONDS", (0.2, 0.2))
    emails = [f"c{i}@test.example" for i in range(customers)]
    for address in emails:
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=delay_seconds))
    settings = make_settings(pg_url, smtp_server.port, smtp={"pool_size": pool_size, "timeout_seconds": smtp_timeout},
                             in_flight_per_connection=in_flight_per_connection, compose_processes=0,
                             lease_seconds=60)  # fmt: skip
    shop = Shop(pg_url, settings, emails)
    plan(shop.store, settings, NOW)
    return shop, emails


def _run_with_the_rate_in_the_database(shop: Shop) -> DispatchReport:
    """One run of a dispatcher whose rate is booked in the database (``_rate_in_the_database``); its report."""
    astore = AsyncStore(shop.store)

    async def run() -> DispatchReport:
        transport = shop.deps.transport()
        try:
            return await _rate_in_the_database(shop, astore, transport).run_once()
        finally:
            await transport.close()

    try:
        return asyncio.run(asyncio.wait_for(run(), timeout=60))
    finally:
        astore.close()


def _rate_in_the_database(shop: Shop, astore: AsyncStore, transport: Any) -> Dispatcher:
    """A dispatcher whose rate is booked in the database, as a daemon's on PostgreSQL is."""
    clock = _FlowingClock(NOW)
    return Dispatcher(settings=shop.settings, store=astore, composer=shop.deps.composer(), transport=transport,
                      clock=clock, worker="w1", limiter=make_limiter(shop.settings, astore, clock))  # fmt: skip


@pytest.mark.postgres
def test_a_daemon_stopped_during_a_database_outage_records_the_sends_it_kept_once_the_database_is_back(
    tmp_path: Path, pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a daemon on PostgreSQL sending 6 win-backs to a server that takes a second over each message, and a
    # database that goes away once messages are on the wire, for longer than the ledger writer tries again (0.4 s)
    shop, _ = _daemon_shop(tmp_path, pg_migrated_url, smtp_server, monkeypatch, customers=6)

    async def scenario() -> int:
        daemon = Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            running = await _failing_in_an_outage(daemon, smtp_server, pg_admin, pg_migrated_url)
            # When it is told to stop while the database is still away, and the database comes back within the
            # grace period (5 s)
            daemon._on_stop_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            _allow_connections(pg_admin, pg_migrated_url, True)
            return await running
        finally:
            daemon.store.close()

    try:
        code = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
    # Then before it exits it records the sends the server took as sent, rather than leave them `sending` to
    # become `uncertain` (an operator's decision) when their leases lapse; the others wait for the next start
    taken = len(smtp_server.messages)
    assert code == 0 and taken >= 2
    expected = [("planned", 6 - taken), ("sent", taken)] if taken < 6 else [("sent", 6)]
    assert shop.rows("SELECT status, count(*) FROM message GROUP BY status ORDER BY status") == expected, taken


@pytest.mark.postgres
def test_a_daemon_stopped_while_its_ledger_writer_still_retries_through_an_outage_exits_1_naming_the_sends(
    tmp_path: Path, pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a daemon on PostgreSQL with a grace period of 1 s, sending two messages side by side (its pool of two)
    # to a server that takes two seconds over each, whose ledger writer tries a failed commit again for longer than
    # that (a database restart). Two messages only: a third begun later could still be at DATA when the grace
    # period ends, recorded by the server but never answered, which no log names (it becomes `uncertain`)
    shop, emails = _daemon_shop(tmp_path, pg_migrated_url, smtp_server, monkeypatch, customers=2)
    for address in emails:  # a second more than the helper's: the first reply cannot come before the second DATA
        smtp_server.on(address, Behaviour(delay_at="data", delay_seconds=2.0))
    monkeypatch.setattr(LedgerWriter, "RETRY_SECONDS", (30.0,))
    config = shop.config.read_text()
    shop.config.write_text(config.replace("shutdown_grace_seconds = 5.0", "shutdown_grace_seconds = 1.0"))

    async def scenario() -> int:
        daemon = Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            running = asyncio.ensure_future(daemon.run())
            while smtp_server.data_taken < 2:
                await asyncio.sleep(0.02)
            # When the database goes away with two messages past their final dot, and the daemon is told to stop
            # while its writer waits to try their outcomes again
            _allow_connections(pg_admin, pg_migrated_url, False)
            await asyncio.sleep(2.5)
            daemon._on_stop_signal(signal.SIGTERM)
            return await running
        finally:
            daemon.store.close()

    try:
        code = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
    # Then it exits 1, and the log names the sends the server took (for `kembali ledger close --as sent`), rather
    # than leave them to become `uncertain` with nothing saying they arrived
    assert code == 1
    kept = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "outcomes_not_written"]
    assert kept, [r.getMessage() for r in caplog.records]
    assert len(kept[-1]["sent_ids"].split(",")) == len(smtp_server.messages) == 2


@pytest.mark.postgres
def test_a_daemon_stopped_during_a_database_outage_that_outlasts_its_grace_period_exits_1_naming_the_sends_it_kept(
    tmp_path: Path, pg_admin: sa.Engine, pg_migrated_url: str, smtp_server: RecordingServer,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a daemon on PostgreSQL whose run failed when the database went away with messages on the wire
    shop, _ = _daemon_shop(tmp_path, pg_migrated_url, smtp_server, monkeypatch, customers=3)

    async def scenario() -> tuple[int, float]:
        daemon = Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            running = await _failing_in_an_outage(daemon, smtp_server, pg_admin, pg_migrated_url)
            # When it is told to stop and the database stays away past the grace period (5 s)
            began = time.monotonic()
            daemon._on_stop_signal(signal.SIGTERM)
            return await running, time.monotonic() - began
        finally:
            daemon.store.close()

    try:
        code, took = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        _allow_connections(pg_admin, pg_migrated_url, True)
    # Then it gives up at the end of the grace period and exits 1, not 0: the log names the sends the server took,
    # for `kembali ledger close --as sent`
    assert code == 1 and took < 9, (code, took)
    assert "shutdown_outcomes_not_written" in [r.getMessage() for r in caplog.records]
    kept = [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == "outcomes_not_written"]
    assert len(kept[-1]["sent_ids"].split(",")) == len(smtp_server.messages) >= 2


def test_rows_the_days_quota_left_unmarked_for_senders_cut_off_go_back_to_the_queue(tmp_path: Path) -> None:
    # Given three customers due a win-back, claimed by w1, and a daily quota of one
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = make_settings(url, closed_port(), batch_size=10, compose_processes=0, lease_seconds=600)
    shop = Shop(url, settings, [f"c{i}@test.example" for i in range(3)])
    plan(shop.store, settings, NOW)
    batch = shop.store.claim(worker="w1", now=NOW, limit=3, lease_seconds=600)
    assert len(batch) == 3
    zone = settings.shop.time_zone
    astore = AsyncStore(shop.store)
    quota = DailyQuota(astore, shop.clock, quota=1, zone=zone)

    async def cut_off() -> None:
        writer = LedgerWriter(astore, worker="w1", clock=shop.clock, group=10, quota=quota)
        writer.start()
        senders = [asyncio.create_task(writer.mark_sending(message)) for message in batch]
        await asyncio.sleep(0)  # each sender waits for its mark
        # When the run is cut off (stopped, or a sender failed) while they wait, and the writer commits the marks
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        await writer.close()

    try:
        asyncio.run(asyncio.wait_for(cut_off(), timeout=60))
    finally:
        astore.close()
    # Then no row is left claimed until its lease lapses: the one marked and the two the quota left unmarked are
    # back in the queue, none of them attempted
    with shop.store.engine.connect() as conn:
        rows = {r.id: (r.status, r.claimed_by, r.attempts)
                for r in conn.execute(sa.text("SELECT id, status, claimed_by, attempts FROM message"))}  # fmt: skip
    assert sorted(rows.values()) == [("planned", None, 0)] * 3
    shop.close()


def test_the_room_a_daily_quota_set_during_the_day_tells_counts_the_days_sends_before_it(tmp_path: Path) -> None:
    # Given a shop that has sent one email today with no daily quota set then (no commit has counted a quota slot)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = make_settings(url, closed_port(), batch_size=10, compose_processes=0, lease_seconds=600)
    shop = Shop(url, settings, [f"c{i}@test.example" for i in range(4)])
    plan(shop.store, settings, NOW)
    [first] = shop.store.claim(worker="w1", now=NOW, limit=1, lease_seconds=600)
    assert shop.store.record_and_mark([], [first.id], worker="w1", now=NOW).sending == {first.id}
    # When the operator sets a quota of 3 a day, and the sender asks how many of its next 3 the day has room for
    astore = AsyncStore(shop.store)
    quota = DailyQuota(astore, shop.clock, quota=3, zone=settings.shop.time_zone)
    try:
        granted, day = asyncio.run(quota.room(3))
    finally:
        astore.close()
    # Then the room counts the email sent before the quota was set: two more today, not three
    assert (granted, day) == (2, quota_day(shop.clock.now(), settings.shop.time_zone))
    shop.close()


@pytest.mark.parametrize(
    ("zone", "last_second", "next_day"),
    [
        # 23:59:59 in Jakarta (no DST): the 23rd begins at 17:00 UTC
        ("Asia/Jakarta", datetime(2026, 11, 22, 16, 59, 59, tzinfo=UTC), datetime(2026, 11, 22, 17, 0, tzinfo=UTC)),
        # 23:59:59 CET on the 25th of October, Berlin's 25-hour day (the clocks went back at 03:00 CEST)
        ("Europe/Berlin", datetime(2026, 10, 25, 22, 59, 59, tzinfo=UTC), datetime(2026, 10, 25, 23, 0, tzinfo=UTC)),
        # 23:59:59 EDT on the 8th of March, New York's 23-hour day (the clocks went forward at 02:00 EST)
        ("America/New_York", datetime(2026, 3, 9, 3, 59, 59, tzinfo=UTC), datetime(2026, 3, 9, 4, 0, tzinfo=UTC)),
    ],
)
def test_a_mark_the_days_quota_refused_and_handled_after_local_midnight_waits_only_for_the_next_day(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture, zone: str, last_second: datetime,
    next_day: datetime,
) -> None:
    # Given a shop in `zone` with a daily quota of one, at the last second of its day, and two customers due a
    # win-back: w2 has claimed one, the dispatcher (w1) claims the other and sees the day's one slot free
    raw = settings_dict(db_url, smtp_server.port, batch_size=10, compose_processes=0, daily_quota=1)
    raw["shop"] = {"time_zone": zone}
    settings = settings_from_dict(raw, base_dir=REPO)
    emails = ["c0@test.example", "c1@test.example"]
    shop = Shop(db_url, settings, emails, clock=FakeClock(last_second))
    plan(shop.store, settings, shop.clock.now())
    [w2_row] = shop.store.claim(worker="w2", now=shop.clock.now(), limit=1, lease_seconds=600)
    quota = DailyQuota(AsyncStore(shop.store), shop.clock, quota=1, zone=zone)
    record_and_mark = shop.store.record_and_mark
    raced = False

    def w2_marks_first(dispositions: Any, ids: Any, **kwargs: Any) -> Any:
        # When w2's mark takes the day's slot just before w1's group commit (made at 23:59:59), which refuses w1's
        # mark, and w1's sender hears so after local midnight
        nonlocal raced
        if ids and not raced:
            raced = True
            assert record_and_mark([], [w2_row.id], worker="w2", now=kwargs["now"], quota=quota.at(kwargs["now"]))
            marked = record_and_mark(dispositions, ids, **kwargs)
            assert marked.over_quota == set(ids), marked
            shop.clock.advance(2)
            return marked
        return record_and_mark(dispositions, ids, **kwargs)

    shop.store.record_and_mark = w2_marks_first  # type: ignore[method-assign]
    astore = AsyncStore(shop.store)

    async def runs() -> tuple[DispatchReport, datetime, DispatchReport]:
        transport = shop.deps.transport()
        dispatcher = shop.deps.dispatcher(astore, transport)
        try:
            first = await dispatcher.run_once()
            waits = shop.due_time(w1_email)
            return first, waits, await dispatcher.run_once()
        finally:
            await transport.close()

    w1_email = next(e for e in emails if e != w2_row.email)
    try:
        first, waits, second = asyncio.run(asyncio.wait_for(runs(), timeout=60))
        # Then the refused row went back to the queue until the day after the one whose quota refused it (the day
        # that has begun: due at once), not until the midnight after that
        assert raced and first.quota_reached and first.outcomes.get("sent", 0) == 0
        assert shop.clock.now() - timedelta(seconds=1) <= waits <= shop.clock.now()
        assert waits >= next_day
        events = [r for r in caplog.records if r.getMessage() == "daily_quota_reached"]
        assert [datetime.fromisoformat(getattr(r, "kembali_fields", {})["resumes_at"]) for r in events] == [next_day]
        # and the next run, a second into the new day, sends it: that day's quota has its slot
        assert second.outcomes == {"sent": 1} and not second.quota_reached, second
        assert len(smtp_server.messages) == 1 and shop.row(w1_email).status == "sent"
    finally:
        astore.close()
        shop.close()


def test_a_batch_claimed_before_local_midnight_and_refused_by_the_new_days_full_quota_waits_for_its_end_at_once(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a shop in Jakarta with a daily quota of one, at the last second of the 22nd, and two customers due a
    # win-back: w2 (whose clock is a little ahead) has already sent one of them on the 23rd, taking its one slot
    zone = "Asia/Jakarta"
    last_second = datetime(2026, 11, 22, 16, 59, 59, tzinfo=UTC)
    day_after = datetime(2026, 11, 23, 17, 0, tzinfo=UTC)  # the 24th begins
    raw = settings_dict(db_url, smtp_server.port, batch_size=10, compose_processes=0, daily_quota=1)
    raw["shop"] = {"time_zone": zone}
    settings = settings_from_dict(raw, base_dir=REPO)
    emails = ["c0@test.example", "c1@test.example"]
    shop = Shop(db_url, settings, emails, clock=FakeClock(last_second))
    plan(shop.store, settings, shop.clock.now())
    [w2_row] = shop.store.claim(worker="w2", now=shop.clock.now(), limit=1, lease_seconds=600)
    quota = DailyQuota(AsyncStore(shop.store), shop.clock, quota=1, zone=zone)
    w2_now = last_second + timedelta(seconds=2)
    assert shop.store.record_and_mark([], [w2_row.id], worker="w2", now=w2_now, quota=quota.at(w2_now)).sending
    w1_email = next(e for e in emails if e != w2_row.email)
    claim = shop.store.claim
    rounds = 0

    def claimed_across_midnight(**kwargs: Any) -> Any:
        # When w1 claims the other one at 23:59:59 and has it ready a moment after local midnight, when the 23rd's
        # quota (full) is the one that tells whether it may go
        nonlocal rounds
        batch = claim(**kwargs)
        if any(message.email == w1_email for message in batch):
            rounds += 1
            if rounds == 1:
                shop.clock.advance(2)
        return batch

    shop.store.claim = claimed_across_midnight  # type: ignore[method-assign]
    astore = AsyncStore(shop.store)

    async def runs() -> tuple[DispatchReport, datetime, DispatchReport]:
        transport = shop.deps.transport()
        dispatcher = shop.deps.dispatcher(astore, transport)
        try:
            first = await dispatcher.run_once()
            waits = shop.due_time(w1_email)
            return first, waits, await dispatcher.run_once()
        finally:
            await transport.close()

    try:
        first, waits, second = asyncio.run(asyncio.wait_for(runs(), timeout=60))
        # Then the first refusal puts the row off until the 23rd's end (the 24th's start), not the 22nd's (due at
        # once): the next run (a restart, the daemon's next cycle) a moment later does not claim it only to be
        # refused again
        assert first.quota_reached and first.outcomes.get("sent", 0) == 0, first
        assert waits == day_after, waits
        assert shop.due_time(w1_email) == day_after
        assert rounds == 1 and not second.quota_reached, (rounds, second)
        events = [r for r in caplog.records if r.getMessage() == "daily_quota_reached"]
        assert [datetime.fromisoformat(getattr(r, "kembali_fields", {})["resumes_at"]) for r in events] == [day_after]
        assert smtp_server.messages == []
    finally:
        astore.close()
        shop.close()


def test_rows_the_days_quota_refused_for_senders_cut_off_wait_until_the_day_ends(db_url: str) -> None:
    # Given three customers due a win-back, claimed by w1, and a daily quota of one
    settings = make_settings(db_url, closed_port(), batch_size=10, compose_processes=0, lease_seconds=600)
    emails = [f"c{i}@test.example" for i in range(3)]
    shop = Shop(db_url, settings, emails)
    plan(shop.store, settings, NOW)
    batch = shop.store.claim(worker="w1", now=NOW, limit=3, lease_seconds=600)
    assert len(batch) == 3
    zone = settings.shop.time_zone
    astore = AsyncStore(shop.store)
    quota = DailyQuota(astore, shop.clock, quota=1, zone=zone)

    async def cut_off() -> None:
        writer = LedgerWriter(astore, worker="w1", clock=shop.clock, group=10, quota=quota)
        writer.start()
        senders = [asyncio.create_task(writer.mark_sending(message)) for message in batch]
        await asyncio.sleep(0)  # each sender waits for its mark
        # When the run is stopped (or shut down) while they wait, and the writer commits the marks: the day's one
        # slot goes to the first, the quota refuses the other two
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        await writer.close()

    try:
        asyncio.run(asyncio.wait_for(cut_off(), timeout=60))
    finally:
        astore.close()
    # Then the two the quota refused wait until the day ends, as they would had their senders heard the refusal;
    # the one marked (and never sent) is due again at once
    day_ends = quota_day_end(quota_day(NOW, zone), zone)
    due = sorted(shop.due_time(email) for email in emails)
    assert due == [NOW, day_ends, day_ends], due
    assert sorted(shop.row(email).status for email in emails) == ["planned"] * 3
    # so a restart a moment later claims the one marked alone, not the two only for the day's quota to refuse them
    again = shop.store.claim(worker="w1b", now=NOW + timedelta(seconds=1), limit=3, lease_seconds=600)
    assert [message.email for message in again] == [e for e in emails if shop.due_time(e) == NOW] == [again[0].email]
    shop.close()


def test_a_sender_cut_off_as_its_mark_comes_gives_its_row_back(db_url: str) -> None:
    # Given two customers due a win-back, claimed by w1
    settings = make_settings(db_url, closed_port(), batch_size=10, compose_processes=0, lease_seconds=600)
    emails = ["first@test.example", "second@test.example"]
    shop = Shop(db_url, settings, emails)
    plan(shop.store, settings, NOW)
    batch = shop.store.claim(worker="w1", now=NOW, limit=2, lease_seconds=600)
    assert [message.email for message in batch] == emails
    astore = AsyncStore(shop.store)
    outcomes: list[object] = []

    async def cut_off() -> None:
        writer = LedgerWriter(astore, worker="w1", clock=shop.clock, group=10)
        writer.start()
        first, second = (asyncio.create_task(writer.mark_sending(message)) for message in batch)
        await asyncio.sleep(0)  # each sender waits for its mark
        marks = [future for _, future in writer._marks]
        assert len(marks) == 2
        # When the run stops (a shutdown cancels its senders) just as both rows are marked `sending`: the second
        # sender is cancelled once its mark is in, before it has run again to hear it (asyncio runs the first's
        # wake-up, then this, then the second's)
        marks[0].add_done_callback(lambda _: second.cancel())
        outcomes.extend(await asyncio.gather(first, second, return_exceptions=True))
        await writer.close()

    try:
        asyncio.run(asyncio.wait_for(cut_off(), timeout=60))
    finally:
        astore.close()
    # Then the first sender heard its mark (it would send now); the second, cut off, sends nothing, and its row is
    # back in the queue due at once, not left `sending` to turn `uncertain` when its lease lapses
    assert outcomes[0] == "sending"
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert shop.row(emails[1]).status == "planned"
    assert shop.due_time(emails[1]) == NOW
    shop.close()


def test_once_the_days_quota_is_spent_runs_claim_nothing_and_a_reload_that_raises_it_sends_the_rest_that_day(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a daily quota of one and six customers due a win-back, claimed one at a time
    raw = settings_dict(db_url, smtp_server.port, batch_size=1, compose_processes=0, daily_quota=1)
    settings = settings_from_dict(raw, base_dir=REPO)
    emails = [f"c{i}@test.example" for i in range(6)]
    shop = Shop(db_url, settings, emails)
    plan(shop.store, settings, shop.clock.now())
    astore = AsyncStore(shop.store)

    async def runs(deps: Any, times: int) -> list[DispatchReport]:
        transport = deps.transport()
        dispatcher = deps.dispatcher(astore, transport)
        try:
            return [await dispatcher.run_once() for _ in range(times)]
        finally:
            await transport.close()

    try:
        # When a daemon's dispatcher runs again and again once the quota is spent (its poll)
        first, *again = asyncio.run(asyncio.wait_for(runs(shop.deps, 4), timeout=60))
        # Then the first run sends one, and says the quota is spent; so do the next runs, which claim nothing, nor
        # send the queue's messages to wait for the next day batch by batch (nor log the quota's end each time)
        assert first.outcomes == {"sent": 1} and first.quota_reached
        assert all(r.quota_reached and not r.outcomes for r in again), again
        assert shop.store.any_due(shop.clock.now())
        waiting_a_day = [e for e in emails if shop.due_time(e) > shop.clock.now() + timedelta(hours=1)]
        assert len(waiting_a_day) <= 1, waiting_a_day  # (at most the one claimed beside the message sent)
        assert len([r for r in caplog.records if r.getMessage() == "daily_quota_reached"]) == 1
        # and a `run --once` meanwhile says the quota is spent, not that nothing was due
        lines = running.summary(shop.cycle())
        assert "nothing was due to send" not in lines and any("daily quota is used up" in x for x in lines), lines
        # When the operator raises the quota (a reload: a new dispatcher) the same day
        raised = replace(shop.deps, settings=replace(settings, sending=replace(settings.sending, daily_quota=10)))
        (after,) = asyncio.run(asyncio.wait_for(runs(raised, 1), timeout=60))
        # Then the messages still due go that day
        assert after.outcomes.get("sent", 0) >= 4, after.outcomes
    finally:
        astore.close()
        shop.close()


def test_a_throttled_send_cut_off_while_its_earlier_throttles_are_read_is_recorded_all_the_same(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given a customer whose message the server answers at the final dot, half a second on, with a "slow down"; and
    # the ledger's one thread busy (a slow commit, a database in trouble) when the sender reads how many of the
    # message's tries in a row were throttled, to space out the next
    email = "slowed@test.example"
    smtp_server.on(email, Behaviour(data_reply="421 4.7.0 Try again later, closing connection", delay_at="data",
                                    delay_seconds=0.5))  # fmt: skip
    settings = make_settings(sqlite_url, smtp_server.port, batch_size=1, compose_processes=0, lease_seconds=600)
    shop = Shop(sqlite_url, settings, [email])
    plan(shop.store, settings, NOW)
    astore = AsyncStore(shop.store)
    gate = threading.Event()

    async def cut_off() -> bool:
        transport = shop.deps.transport()
        dispatcher = _dispatcher(shop, astore, transport)  # type: ignore[arg-type]
        try:
            task = asyncio.ensure_future(dispatcher.run_once())
            while smtp_server.data_taken < 1:  # marked, and the body read: the reply comes in 0.5 s
                await asyncio.sleep(0.02)
            busy = asyncio.ensure_future(astore.call(gate.wait, 10))
            await asyncio.sleep(1.0)  # the reply came: the sender waits for the ledger's thread
            # When the run is cut off then (a daemon's shutdown past its grace period), and the ledger frees up
            task.cancel()
            asyncio.get_running_loop().call_later(0.1, gate.set)
            with contextlib.suppress(BaseException):
                await task
            await busy
            return task.cancelled()
        finally:
            gate.set()
            await transport.close()

    try:
        cancelled = asyncio.run(asyncio.wait_for(cut_off(), timeout=60))
    finally:
        gate.set()
        astore.close()
    # Then the outcome the server gave is written, the message back in the queue (not left `sending`, to turn
    # `uncertain` when its lease lapses: an operator's decision over a message that never arrived)
    assert cancelled
    row = shop.row(email)
    assert (row.status, row.attempts, row.last_code) == ("retry", 0, 421)
    assert [a.outcome for a in shop.attempts(email)] == ["throttled"]
    assert smtp_server.messages == []
    shop.close()

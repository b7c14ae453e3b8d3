"""The dispatcher's run as a whole: a failing ledger stops it instead of hanging it, and its memory does not
grow with the campaign."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.sendkit import NOW, Shop, make_settings
from tests.smtp_server import closed_port
from worker.asyncstore import AsyncStore
from worker.pipeline import plan
from worker.sending import Dispatcher
from worker.testing import RecordingTransport


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


def _dispatcher(shop: Shop, astore: AsyncStore, transport: RecordingTransport) -> Dispatcher:
    return Dispatcher(settings=shop.settings, store=astore, composer=shop.deps.composer(), transport=transport,
                      clock=shop.clock, worker="w1")  # fmt: skip


def _statuses(shop: Shop) -> Counter[str]:
    with shop.store.engine.connect() as conn:
        return Counter(conn.execute(sa.text("SELECT status FROM message")).scalars())


def test_a_ledger_that_fails_mid_run_stops_the_run_with_its_error_and_loses_nothing(tmp_path: Path) -> None:
    # Given 300 customers due a win-back, batches of 50 (several in flight at once), and a database
    # that fails on the writer's fourth commit (a full disk, say)
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
        # When the dispatcher runs, Then the run ends with the database's error (it does not hang on a queue
        # nobody empties any more)
        with pytest.raises(sa.exc.OperationalError, match="disk is full"):
            asyncio.run(asyncio.wait_for(_dispatcher(shop, astore, transport).run_once(), timeout=60))
    finally:
        astore.close()
        shop.store.record_and_mark = record_and_mark  # type: ignore[method-assign]
    # And once the leases lapse, no row is lost: each is sent, back in the queue, or uncertain (it was on the
    # wire when the ledger broke), and only those could have reached the server
    shop.store.release_expired_leases(NOW + timedelta(seconds=61))
    statuses = _statuses(shop)
    assert sum(statuses.values()) == 300
    assert set(statuses) <= {"sent", "planned", "uncertain"}, statuses
    assert statuses["sent"] <= len(transport.sent) <= statuses["sent"] + statuses["uncertain"]
    shop.close()


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

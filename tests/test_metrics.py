"""The Prometheus text the daemon serves and the health line's arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from worker.metrics import Metrics


def test_prometheus_text() -> None:
    m = Metrics()
    m.observe_planned("winback", 3)
    m.observe_result("winback", "sent", "sent", 0.2, at=100.0)
    m.observe_result("winback", "retry", "transient", 3.0, at=101.0)
    m.observe_result("winback", "skipped:suppressed", None, None, at=101.0)
    text = m.render(ledger={("winback", "sent"): 1, ("winback", "planned"): 2}, queue_depth=2,
                    rate_limit_per_second=50.0, rate_burst=50, paused=False, now=110.0)
    lines = text.splitlines()
    for expected in [
        "# TYPE kembali_messages gauge",
        'kembali_messages{campaign="winback",state="planned"} 2',
        "kembali_queue_depth 2",
        'kembali_planned_total{campaign="winback"} 3',
        'kembali_results_total{campaign="winback",result="skipped:suppressed"} 1',
        'kembali_attempts_total{outcome="transient"} 1',
        "# TYPE kembali_send_seconds histogram",
        'kembali_send_seconds_bucket{le="0.1"} 0',
        'kembali_send_seconds_bucket{le="0.25"} 1',
        'kembali_send_seconds_bucket{le="2.5"} 1',
        'kembali_send_seconds_bucket{le="5"} 2',
        'kembali_send_seconds_bucket{le="+Inf"} 2',
        "kembali_send_seconds_sum 3.2",
        "kembali_send_seconds_count 2",
        "kembali_rate_limit_per_second 50",
        "kembali_dispatcher_paused 0",
    ]:
        assert expected in lines, expected
    assert text.endswith("\n")


def test_health_counts_what_happened_since_the_last_line() -> None:
    m = Metrics()
    m.observe_planned("winback", 2)
    for i in range(2):
        m.observe_result("winback", "sent", "sent", 0.1, at=10.0 + i)
    first = m.health(now=30.0)
    assert (first.planned, first.sent, first.failed, first.rate_per_minute) == (2, 2, 0, 2.0)
    m.observe_result("winback", "failed", "permanent", 0.1, at=40.0)
    second = m.health(now=80.0)  # the first two sends left the one-minute window
    assert (second.planned, second.sent, second.failed, second.rate_per_minute) == (0, 0, 1, 1.0)


def test_a_daemon_nobody_asks_for_its_rate_does_not_keep_every_send_it_ever_made() -> None:
    # Given a daemon with the health line off and no Prometheus scraping it (nothing reads the rate)
    m = Metrics()
    # When it sends one email a second for a day
    for i in range(86_400):
        m.observe_result("winback", "sent", "sent", 0.1, at=float(i))
    # Then it holds only the last minute's sends (not 86 400 of them), and the rate still reads right
    assert len(m._sends) <= 61
    assert m.rate_per_second(now=86_400.0) == 1.0
    assert m.health(now=86_400.0).sent == 86_400


def test_scrapes_of_a_big_ledger_do_not_hold_up_the_senders_database_thread(tmp_path: Path) -> None:
    """/metrics counts the whole ledger (message rows are never pruned): on the thread that serves the
    dispatcher's claims and commits, every scrape would stall sending for as long as the count takes."""
    import asyncio
    import threading
    from typing import Any

    import sqlalchemy as sa

    from tests.daemon_harness import make_shop
    from tests.smtp_server import closed_port
    from worker.adapters import opstore
    from worker.adapters.clock import SystemClock
    from worker.adapters.web import Request
    from worker.asyncstore import AsyncStore
    from worker.config import load_settings
    from worker.links import Site

    # Given a daemon's ledger whose count by campaign and state (a big ledger's slow one) takes until the test
    # lets it end
    shop = make_shop(tmp_path, smtp_port=closed_port())
    shop.add([1], days_ago=60)
    store = shop.store()
    counting, release, counted = threading.Event(), threading.Event(), threading.Event()
    counts: list[str] = []

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def _held_count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "GROUP BY" in statement.upper():
            counts.append(threading.current_thread().name)
            counting.set()
            release.wait(60)
            counted.set()

    astore = AsyncStore(store)
    settings = load_settings(shop.config)
    site = Site(store=astore, keys=[b"k" * 32], settings=lambda: settings, clock=SystemClock(), metrics=Metrics(),
                paused=lambda: False)

    async def scenario() -> tuple[bool, list[int]]:
        # When Prometheus (and a colleague's curl, and another scraper) ask for /metrics at once, and the sender
        # calls the database while their count runs
        scrapes = [asyncio.create_task(site.handle(Request("GET", "/metrics", {}, {}))) for _ in range(4)]
        try:
            assert await asyncio.to_thread(counting.wait, 30), "/metrics never counted the ledger"
            await asyncio.wait_for(astore.call(opstore.queue_depth, store, datetime.now(UTC)), 20)
            answered_during_the_count = not counted.is_set()
        finally:
            release.set()
        return answered_during_the_count, [r.status for r in await asyncio.gather(*scrapes)]

    try:
        answered_during_the_count, statuses = asyncio.run(scenario())
    finally:
        release.set()
        astore.close()
        store.close()
    # Then the sender's call is answered while the count still runs, and the four scrapes share that one count
    assert answered_during_the_count
    assert statuses == [200] * 4
    assert len(counts) == 1, counts


def test_metrics_show_the_relays_pace_and_whether_its_throttling_slowed_it(tmp_path: Path) -> None:
    import asyncio
    import dataclasses

    from tests.daemon_harness import make_shop
    from tests.smtp_server import closed_port
    from worker.adapters.web import Request
    from worker.asyncstore import AsyncStore
    from worker.config import load_settings
    from worker.domain import Outcome, SendResult
    from worker.limiter import Limiter, LocalBooker
    from worker.links import Site
    from worker.testing import FakeClock

    # Given a daemon's /metrics, and its limiter sending at 40/s
    shop = make_shop(tmp_path, smtp_port=closed_port())
    store = shop.store()
    astore = AsyncStore(store)
    settings = load_settings(shop.config)
    clock = FakeClock()
    limiter = Limiter(dataclasses.replace(settings.sending, rate_per_second=40.0), clock, LocalBooker(clock))
    site = Site(store=astore, keys=[b"k" * 32], settings=lambda: settings, clock=clock, metrics=Metrics(),
                paused=lambda: False, relay_pace=lambda: limiter.pace)

    def scrape() -> list[str]:
        response = asyncio.run(site.handle(Request("GET", "/metrics", {}, {})))
        assert response.status == 200
        return response.body.decode().splitlines()

    try:
        before = scrape()
        # When the relay says "421 … slow down"
        limiter.observe("a.example", SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down",
                                                stage="rcpt"), began=clock.monotonic())  # fmt: skip
        during = scrape()
        # and mail goes through again long enough for the pace to come back
        for _ in range(4):
            clock.advance(5.0)
            limiter.observe("b.example", SendResult(Outcome.SENT, 250, "250 ok"))
        after = scrape()
    finally:
        astore.close()
        store.close()
    # Then the gauges show the pace at each moment, and whether the relay's throttling slowed it
    assert "# TYPE kembali_relay_pace_per_second gauge" in before
    assert {"kembali_relay_pace_per_second 40", "kembali_relay_pace_slowed 0"} <= set(before)
    assert {"kembali_relay_pace_per_second 20", "kembali_relay_pace_slowed 1"} <= set(during)
    assert {"kembali_relay_pace_per_second 40", "kembali_relay_pace_slowed 0"} <= set(after)


def test_every_line_is_prometheus_text_even_with_a_hostile_label_value() -> None:
    import re

    m = Metrics()
    hostile = 'win"back\\x\ny} 1\nkembali_fake 9'
    m.observe_planned(hostile, 1)
    m.observe_result(hostile, "sent", "sent", 0.2, at=100.0)
    text = m.render(ledger={(hostile, "sent"): 1}, queue_depth=None, rate_limit_per_second=0.5, rate_burst=1,
                    paused=True, now=110.0)
    value = r'"(?:[^"\\\n]|\\[\\"n])*"'
    sample = re.compile(rf"([a-z_]+)(\{{[a-z_]+={value}(?:,[a-z_]+={value})*\}})? (-?[0-9.e+-]+|\+Inf|NaN)")
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
            continue
        found = sample.fullmatch(line)
        assert found is not None, line
        name = re.sub(r"_(bucket|sum|count)$", "", found.group(1)) if found.group(1) not in typed else found.group(1)
        assert name in typed, line  # every sample under its family's TYPE
    assert 'kembali_planned_total{campaign="win\\"back\\\\x\\ny} 1\\nkembali_fake 9"} 1' in text.splitlines()
    assert "kembali_fake" not in typed and not any(line.startswith("kembali_fake") for line in text.splitlines())
    assert "kembali_dispatcher_paused 1" in text.splitlines()
    assert not any(line.startswith("kembali_queue_depth ") for line in text.splitlines())  # unread: no sample


def test_metrics_say_when_each_campaign_last_finished_a_planning_pass() -> None:
    # A planning pass stuck on a lock, or a scheduler that stopped firing, showed nowhere: /healthz stayed 200 (the
    # dispatcher is let go after PLANNING_HOLD_SECONDS), the counters only stopped growing, which a quiet shop's
    # passes (0 created) do too. The time of each campaign's last finished pass lets a monitor alert on its age.
    m = Metrics()
    m.observe_planned("winback", 0, at=1_800_000_000.0)
    m.observe_planned("birthday", 2, at=1_800_000_060.5)
    m.observe_planned("winback", 0, at=1_800_000_120.0)
    lines = m.render(ledger={}, queue_depth=0, rate_limit_per_second=50.0, rate_burst=50, paused=False,
                     now=0.0).splitlines()
    assert "# TYPE kembali_last_planned_timestamp_seconds gauge" in lines
    assert 'kembali_last_planned_timestamp_seconds{campaign="birthday"} 1800000060.5' in lines
    assert 'kembali_last_planned_timestamp_seconds{campaign="winback"} 1800000120' in lines

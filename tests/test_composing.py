"""Composing in a helper process gives what composing in-process gives, and survives the helper dying."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
from pathlib import Path

import pytest

from tests.shop import LINK_KEY, NOW, TEMPLATES, customer, make_shop, one_time_order, settings_for
from tests.smtp_server import RecordingServer
from worker import log
from worker.adapters.store import Store
from worker.adapters.templates import JinjaTemplates
from worker.app import Deps, compose_pool
from worker.commands.running import cycle
from worker.composing import ComposerPool, Item
from worker.config import Settings
from worker.domain import Locale
from worker.pipeline import Composed, Composer, RenderFailed, load_batch_facts, load_catalogue, plan
from worker.testing import FakeClock


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def _claimed_batch(sqlite_url: str, settings: Settings) -> tuple[Store, list[object], object]:
    # five quiet one-time buyers (one English), one of them suppressed since planning
    customers = [customer(f"C{i}", locale=Locale.EN if i == 3 else Locale.ID) for i in range(1, 6)]
    store = make_shop(sqlite_url, customers, [one_time_order(f"O{i}", f"C{i}") for i in range(1, 6)])
    plan(store, settings, NOW)
    store.suppress("c5@example.com", reason="complaint", source="test", now=NOW)
    batch = store.claim(worker="w", now=NOW, limit=100, lease_seconds=60)
    return store, list(batch), load_batch_facts(store, batch, load_catalogue(store), settings=settings, now=NOW)


def _pool(settings: Settings, templates: Path) -> ComposerPool:
    renderer = JinjaTemplates(templates, recheck_seconds=1.0)
    pool = compose_pool(settings, renderer, Composer(settings, renderer, LINK_KEY.encode()))
    assert pool is not None
    pool.min_batch = 1  # these batches are small: use the helper anyway
    return pool


def _to_render(pool: ComposerPool, batch: list[object], facts: object) -> list[object]:
    """What the dispatcher hands the helper: the messages ``decide`` lets through."""
    return [m for m in batch if pool.local.decide(m, facts, NOW) is None]  # type: ignore[arg-type]


def _same(in_helper: list[Item], in_process: list[Item]) -> None:
    assert [type(i) for i in in_helper] == [type(i) for i in in_process]
    for a, b in zip(in_helper, in_process, strict=True):
        assert a.message == b.message
        if isinstance(a, Composed):
            assert isinstance(b, Composed)
            assert a.data == b.data  # byte for byte: same Date, Message-ID and MIME boundary
            assert a.rendered.subject == b.rendered.subject
            assert a.rendered.template_version == b.rendered.template_version
            assert a.customer == b.customer
        else:
            assert isinstance(a, RenderFailed) and isinstance(b, RenderFailed)
            assert (str(a.error), a.error.template, a.error.line) == (str(b.error), b.error.template, b.error.line)


def test_the_helper_composes_exactly_what_this_process_would(sqlite_url: str, tmp_path: Path) -> None:
    # Given templates whose English body is broken, and a batch with a suppressed customer
    templates = tmp_path / "email"
    shutil.copytree(TEMPLATES, templates)
    body = templates / "winback" / "en" / "body.txt"
    body.write_text(body.read_text().replace("{{ customer.first_name or", "{{ customer.nickname or"))
    settings = settings_for(sqlite_url, templates=templates)
    store, batch, facts = _claimed_batch(sqlite_url, settings)
    pool = _pool(settings, templates)
    try:
        # When the messages to send are rendered in the helper process and in this one
        to_render = _to_render(pool, batch, facts)
        in_helper = asyncio.run(pool.render(to_render, facts, NOW))  # type: ignore[arg-type]
        in_process = [pool.local.render_message(m, facts, NOW) for m in to_render]  # type: ignore[arg-type]
    finally:
        pool.close()
        store.close()
    # Then the suppressed customer was skipped before rendering, and the rest is the same either way:
    # bytes, and render failures with their file and line
    assert len(to_render) == len(batch) - 1
    _same(in_helper, in_process)
    kinds = sorted(type(i).__name__ for i in in_helper)
    assert kinds == ["Composed", "Composed", "Composed", "RenderFailed"]
    (failed,) = [i for i in in_helper if isinstance(i, RenderFailed)]
    assert failed.error.template == "winback/en/body.txt" and failed.error.line == 3


def test_a_dead_helper_costs_nothing_but_a_log_line(sqlite_url: str) -> None:
    settings = settings_for(sqlite_url)
    store, batch, facts = _claimed_batch(sqlite_url, settings)
    pool = _pool(settings, TEMPLATES)
    logger = logging.getLogger("kembali")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    log.configure("info", stream=stream)
    try:
        batch = _to_render(pool, batch, facts)
        asyncio.run(pool.render(batch, facts, NOW))  # type: ignore[arg-type]  # starts the helper
        # When the helper is killed (out of memory, say)
        executor = pool._executor
        assert executor is not None
        for process in list(executor._processes.values()):  # type: ignore[union-attr]
            process.kill()
            process.join()
        items = asyncio.run(pool.render(batch, facts, NOW))  # type: ignore[arg-type]
        # Then the batch is still rendered, in this process, and the failure is logged
        _same(items, [pool.local.render_message(m, facts, NOW) for m in batch])  # type: ignore[arg-type]
        assert "compose_process_failed" in stream.getvalue()
        # And the next batch gets a fresh helper
        again = asyncio.run(pool.render(batch, facts, NOW))  # type: ignore[arg-type]
        _same(again, items)
        assert pool.failures == 0 and pool._executor is not None
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        pool.close()
        store.close()


def test_a_run_big_enough_for_the_helper_sends_each_message_once(sqlite_url: str, smtp_server: RecordingServer) -> None:
    # Given 70 quiet one-time buyers (more than a helper's minimum batch)
    n = 70
    store = make_shop(sqlite_url, [customer(f"C{i}") for i in range(n)],
                      [one_time_order(f"O{i}", f"C{i}") for i in range(n)])  # fmt: skip
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port}, sending={"batch_size": 100})
    assert settings.sending.compose_processes == 1
    deps = Deps(settings=settings, store=store, templates=JinjaTemplates(TEMPLATES, recheck_seconds=1.0),
                clock=FakeClock(NOW))  # fmt: skip
    # When a cycle runs
    report = asyncio.run(cycle(deps))
    # Then each got exactly one message, and the ledger says sent with the template version
    assert report.dispatched.outcomes == {"sent": n}
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == sorted(f"c{i}@example.com" for i in range(n))
    rows = store.messages(limit=1000)
    assert {r["status"] for r in rows} == {"sent"} and all(r["template_version"] for r in rows)
    store.close()


def test_a_batch_claimed_ahead_goes_back_to_the_queue_when_the_quota_runs_out(
    sqlite_url: str, smtp_server: RecordingServer
) -> None:
    # Given 200 due customers, full batches of 64 (so the next batch is claimed and composed
    # ahead while one is sent) and a daily quota of 100
    n = 200
    store = make_shop(sqlite_url, [customer(f"C{i}") for i in range(n)],
                      [one_time_order(f"O{i}", f"C{i}") for i in range(n)])  # fmt: skip
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port},
                            sending={"batch_size": 64, "daily_quota": 100})  # fmt: skip
    deps = Deps(settings=settings, store=store, templates=JinjaTemplates(TEMPLATES, recheck_seconds=1.0),
                clock=FakeClock(NOW))  # fmt: skip
    # When a cycle runs
    report = asyncio.run(cycle(deps))
    # Then 100 were sent and none is left claimed: the rest of batch 2 and all of batch 3 (claimed ahead)
    # wait for the next local day; batch 4 (8 rows) was never claimed and keeps its due time
    assert report.dispatched.outcomes == {"sent": 100} and report.dispatched.quota_reached
    assert len(smtp_server.messages) == 100
    rows = store.messages(limit=1000)
    assert sorted({r["status"] for r in rows}) == ["planned", "sent"]
    waiting = [r for r in rows if r["status"] == "planned"]
    assert len(waiting) == n - 100
    assert all(r["claimed_by"] is None and r["attempts"] == 0 for r in waiting)
    assert sum(r["next_attempt_at"] > NOW for r in waiting) == (64 - 36) + 64
    store.close()

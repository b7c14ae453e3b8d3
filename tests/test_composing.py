"""Composing in a helper process gives what composing in-process gives, and survives the helper dying."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shop import LINK_KEY, NOW, TEMPLATES, customer, edited_templates, make_shop, one_time_order, settings_for
from tests.smtp_server import RecordingServer
from worker import log
from worker.adapters.smtp import SmtpTransport
from worker.adapters.store import Store
from worker.adapters.templates import JinjaTemplates
from worker.app import Deps, compose_pool
from worker.asyncstore import AsyncStore
from worker.commands.running import cycle
from worker.composing import ComposerPool, Item, prepare_batch
from worker.config import Settings
from worker.domain import ClaimedMessage, Locale, SkipReason
from worker.pipeline import Composed, Composer, RenderFailed, Skipped, load_catalogue, plan
from worker.sending import Dispatcher, DispatchReport
from worker.testing import FakeClock


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def _claimed_batch(sqlite_url: str, settings: Settings) -> tuple[Store, list[ClaimedMessage]]:
    # five quiet one-time buyers (one English), one of them suppressed since planning
    customers = [customer(f"C{i}", locale=Locale.EN if i == 3 else Locale.ID) for i in range(1, 6)]
    store = make_shop(sqlite_url, customers, [one_time_order(f"O{i}", f"C{i}") for i in range(1, 6)])
    plan(store, settings, NOW)
    store.suppress("c5@example.com", reason="complaint", source="test", now=NOW)
    batch = store.claim(worker="w", now=NOW, limit=100, lease_seconds=60, domain=settings.shop.domain)
    return store, list(batch)


def _pool(settings: Settings, templates: Path) -> tuple[ComposerPool, Composer]:
    renderer = JinjaTemplates(templates, recheck_seconds=1.0)
    composer = Composer(settings, renderer, LINK_KEY.encode())
    pool = compose_pool(settings, renderer, composer)
    assert pool is not None
    pool.min_batch = 1  # these batches are small: use the helper anyway
    return pool, composer


def _in_process(composer: Composer, store: Store, batch: list[ClaimedMessage]) -> list[Item]:
    return prepare_batch(composer, store, batch, load_catalogue(store, NOW), NOW)


def _same(in_helper: list[Item], in_process: list[Item]) -> None:
    assert [type(i) for i in in_helper] == [type(i) for i in in_process]
    for a, b in zip(in_helper, in_process, strict=True):
        assert a.message == b.message
        if isinstance(a, Composed):
            assert isinstance(b, Composed)
            assert a.data == b.data  # byte for byte: same Date, Message-ID and MIME boundary
            assert a.rendered.subject == b.rendered.subject
            assert a.rendered.template_version == b.rendered.template_version
            assert (a.customer, a.sent) == (b.customer, b.sent)
        elif isinstance(a, RenderFailed):
            assert isinstance(b, RenderFailed)
            assert (str(a.error), a.error.template, a.error.line) == (str(b.error), b.error.template, b.error.line)
        else:
            assert a == b


def test_the_helper_prepares_exactly_what_this_process_would(sqlite_url: str, tmp_path: Path) -> None:
    # Given templates whose English body is broken, and a batch with a suppressed customer
    templates = edited_templates(tmp_path / "email", "winback/en/body.txt",
                                 lambda t: t.replace("{{ customer.first_name or", "{{ customer.nickname or"))
    settings = settings_for(sqlite_url, templates=templates)
    store, batch = _claimed_batch(sqlite_url, settings)
    pool, composer = _pool(settings, templates)
    try:
        # When the batch is prepared in the helper process (which reads the facts itself) and in this one
        in_helper = asyncio.run(pool.prepare(batch, NOW, run=1))
        in_process = _in_process(composer, store, batch)
    finally:
        pool.close()
        store.close()
    # Then the suppressed customer was skipped before rendering, and the rest is the same either way:
    # bytes, and render failures with their file and line
    assert in_helper is not None
    _same(in_helper, in_process)
    kinds = sorted(type(i).__name__ for i in in_helper)
    assert kinds == ["Composed", "Composed", "Composed", "RenderFailed", "Skipped"]
    (skipped,) = [i for i in in_helper if isinstance(i, Skipped)]
    assert skipped.message.email == "c5@example.com" and skipped.reason is SkipReason.SUPPRESSED
    (failed,) = [i for i in in_helper if isinstance(i, RenderFailed)]
    assert failed.error.template == "winback/en/body.txt" and failed.error.line == 3


def test_a_dead_helper_costs_nothing_but_a_log_line(sqlite_url: str) -> None:
    settings = settings_for(sqlite_url)
    store, batch = _claimed_batch(sqlite_url, settings)
    pool, composer = _pool(settings, TEMPLATES)
    logger = logging.getLogger("kembali")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()
    log.configure("info", stream=stream)
    try:
        first = asyncio.run(pool.prepare(batch, NOW, run=1))  # starts the helper
        assert first is not None
        # When the helper is killed (out of memory, say)
        executor = pool._executor
        assert executor is not None
        for process in list(executor._processes.values()):  # type: ignore[union-attr]
            process.kill()
            process.join()
        # Then the pool says so (the dispatcher prepares that batch in-process) and logs the failure
        assert asyncio.run(pool.prepare(batch, NOW, run=1)) is None
        assert "compose_process_failed" in stream.getvalue()
        assert pool.failures == 1
        # the dispatcher prepares in-process until a fresh helper is up
        assert not pool.wanted(len(batch))
        pool.wait_started(timeout=60)
        assert pool.wanted(len(batch))
        # And the next batch gets a fresh helper that prepares what this process would
        again = asyncio.run(pool.prepare(batch, NOW, run=1))
        assert again is not None
        _same(again, _in_process(composer, store, batch))
        assert pool.failures == 0 and pool._executor is not None
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        pool.close()
        store.close()


def test_a_run_big_enough_for_the_helper_sends_each_message_once(sqlite_url: str, smtp_server: RecordingServer) -> None:
    # Given 300 quiet one-time buyers, full batches of 64, and the compose helper up
    n = 300
    store = make_shop(sqlite_url, [customer(f"C{i}") for i in range(n)],
                      [one_time_order(f"O{i}", f"C{i}") for i in range(n)])  # fmt: skip
    settings = settings_for(sqlite_url, smtp={"port": smtp_server.port}, sending={"batch_size": 64})
    assert settings.sending.compose_processes == 1
    deps = Deps(settings=settings, store=store, templates=JinjaTemplates(TEMPLATES, recheck_seconds=1.0),
                clock=FakeClock(NOW))  # fmt: skip
    plan(store, settings, NOW)
    astore = AsyncStore(store)
    transport = deps.transport()
    dispatcher = deps.dispatcher(astore, transport)
    assert dispatcher.compose_pool is not None
    dispatcher.compose_pool.wait_started(timeout=60)
    try:
        # When the dispatcher runs
        report = asyncio.run(_run_and_close(dispatcher, transport))
    finally:
        dispatcher.close()
        astore.close()
    # Then the helper prepared the batches, each customer got exactly one message, and the ledger says
    # sent with the template version
    assert dispatcher.compose_pool.prepared == 4 * 64  # the last 44 are fewer than a helper's minimum batch
    assert report.outcomes == {"sent": n}
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == sorted(f"c{i}@example.com" for i in range(n))
    rows = store.messages(limit=1000)
    assert {r["status"] for r in rows} == {"sent"} and all(r["template_version"] for r in rows)
    store.close()


async def _run_and_close(dispatcher: Dispatcher, transport: SmtpTransport) -> DispatchReport:
    try:
        return await dispatcher.run_once()
    finally:
        await transport.close()


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


HELPER_PARENT = """
import sys, time
from pathlib import Path
from tests.shop import TEMPLATES, settings_for
from worker.adapters.templates import JinjaTemplates
from worker.app import compose_pool
from worker.pipeline import Composer

if __name__ == "__main__":
    settings = settings_for(sys.argv[1])
    renderer = JinjaTemplates(TEMPLATES)
    pool = compose_pool(settings, renderer, Composer(settings, renderer, b"k" * 32))
    pool.wait_started(timeout=60)
    print(*pool._executor._processes, flush=True)
    time.sleep(600)
"""


def test_a_helper_whose_process_is_killed_does_not_outlive_it(sqlite_url: str, tmp_path: Path) -> None:
    # Given a process with a compose helper up
    script = tmp_path / "parent.py"
    script.write_text(HELPER_PARENT)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    parent = subprocess.Popen([sys.executable, str(script), sqlite_url], stdout=subprocess.PIPE, text=True,
                              cwd=repo, env=env)  # fmt: skip
    try:
        assert parent.stdout is not None
        helpers = [int(pid) for pid in parent.stdout.readline().split()]
        assert helpers and all(_alive(pid) for pid in helpers)
        # When that process is killed outright (no chance to stop its helpers)
        parent.kill()
        parent.wait(10)
        # Then its helpers end too, within a few seconds, instead of living on as orphans
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in helpers)
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


def test_the_helper_stops_a_render_that_runs_past_the_configured_limit(sqlite_url: str, tmp_path: Path) -> None:
    # Given an English body that never ends and a limit of half a second
    endless = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}\n"
    templates = edited_templates(tmp_path / "email", "winback/en/body.txt", lambda t: endless + t)
    settings = settings_for(sqlite_url, templates=templates, checks={"render_timeout_seconds": 0.5})
    store, batch = _claimed_batch(sqlite_url, settings)
    pool, _ = _pool(settings, templates)
    try:
        in_helper = asyncio.run(pool.prepare(batch, NOW, run=1))
    finally:
        pool.close()
        store.close()
    # Then the helper fails that message alone, with the file and line, and prepares the others
    assert in_helper is not None
    assert sorted(type(i).__name__ for i in in_helper) == ["Composed", "Composed", "Composed", "RenderFailed",
                                                            "Skipped"]  # fmt: skip
    (failed,) = [i for i in in_helper if isinstance(i, RenderFailed)]
    assert (failed.error.template, failed.error.line) == ("winback/en/body.txt", 1)
    assert "took more than 0.5 s" in str(failed.error)


HELPER_STARTING = """
import os, signal, sys
from tests.shop import TEMPLATES, settings_for
from worker.adapters.templates import JinjaTemplates
from worker.app import compose_pool
from worker.pipeline import Composer

if __name__ == "__main__":
    settings = settings_for(sys.argv[1])
    renderer = JinjaTemplates(TEMPLATES)
    pool = compose_pool(settings, renderer, Composer(settings, renderer, b"k" * 32))
    pool.start()  # the helpers' Python still importing, as a Ctrl-C reaches the process group
    assert not pool._started.done()
    for pid in pool._executor._processes:
        os.kill(pid, signal.SIGINT)
    pool.wait_started(timeout=60)
    print("alive:", all(p.is_alive() for p in pool._executor._processes.values()), flush=True)
    pool.close()
"""


def test_a_ctrl_c_while_the_helper_is_still_starting_leaves_it_running_without_a_traceback(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Ctrl-C at the terminal reaches the whole process group: the helper too, which ignores it once its start
    (``_start``) sets it so; a Ctrl-C during its second of imports before that printed a KeyboardInterrupt
    traceback on the daemon's terminal and killed the helper. (In a process of its own, as the daemon's: the first
    helper it starts also starts multiprocessing's resource tracker.)"""
    # Given a process starting its compose helper, when a Ctrl-C reaches the helper during its imports
    script = tmp_path / "parent.py"
    script.write_text(HELPER_STARTING)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, str(script), sqlite_url], capture_output=True, text=True, cwd=repo,
                          env=env, timeout=120)  # fmt: skip
    # Then the helper starts all the same, and says nothing
    assert done.returncode == 0, done.stderr
    assert done.stdout == "alive: True\n"
    assert "KeyboardInterrupt" not in done.stderr and "Traceback" not in done.stderr, done.stderr

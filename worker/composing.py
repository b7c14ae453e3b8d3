"""Preparing batches in a helper process, beside the event loop.

Theory of operation
-------------------
Everything between a claim and the first SMTP byte that is not the ledger's
business is pure CPU: reading the batch's facts, re-checking each message,
judging it against the contact policy, rendering it and building its MIME
(~0.3 ms a message). Done in the event loop's process it competes for the GIL
(and the core) with everything that keeps the SMTP connections busy.

So the dispatcher claims a batch (its own process holds the claim and the
lease) and hands it to ``ComposerPool.prepare``, which sends the claimed rows
(plain frozen dataclasses, pickled field by field) to a
``concurrent.futures.ProcessPoolExecutor`` whose processes each hold a
``Composer`` over their own ``JinjaTemplates`` and their own ``Store``, built
once when the process starts. The helper reads the batch's facts from the
database itself (customers, suppressions, order products, what each customer
was sent; the product catalogue once per dispatch run, and a minute into a long one) and runs
``Composer.prepare`` on each message: re-check, the contact policy against the
ledger alone, and rendering for what that lets through. The event loop awaits
the result while the senders keep sending the previous batch, so on a machine
with a second core preparing and sending overlap.

The helper decides nothing for good: the dispatcher judges each composed
message again with its run's ``Arbiter`` (what this run sent that the
helper's facts could not show yet), and only the event loop's process marks,
sends and records. ``Composed.rendered`` comes back without its html/text
bodies (the MIME bytes hold them), which halves what crosses the pipe.

Small batches are prepared in-process (starting the helper takes ~0.5-1 s of a
core; sending 20 messages does not need it), and so are the first big ones of a
run while the helper starts (``ComposerPool.start``): a run never waits for it. If the helper dies (killed, out of
memory) the batch is prepared in-process, a ``compose_process_failed`` event is
logged, and the next batch starts a fresh helper; after ``MAX_FAILURES`` in a row
the pool gives up and everything is prepared in-process. Helpers are started with
``spawn``, which imports the main module again: a program that embeds Kembali
needs the usual ``if __name__ == "__main__":`` guard (``kembali`` and
``python -m worker`` have it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import datetime
from multiprocessing import resource_tracker
from pathlib import Path

from worker import log
from worker.adapters.store import Store
from worker.config import Settings
from worker.domain import ClaimedMessage, ProductView
from worker.pipeline import Composed, Composer, Deferred, RenderFailed, Skipped, load_batch_facts, load_catalogue

MIN_BATCH = 64
"""Batches smaller than this are prepared in the event loop's process."""

MAX_FAILURES = 3
"""Helper deaths in a row after which the pool stops trying and prepares in-process."""

Item = Composed | Skipped | RenderFailed | Deferred


@dataclass(frozen=True)
class ComposerSpec:
    """What a helper process needs to build its own ``Composer`` and ``Store`` (picklable)."""

    settings: Settings
    templates_root: Path
    link_key: bytes
    recheck_seconds: float | None
    parent_pid: int = dataclasses.field(default_factory=os.getpid)
    """The process that starts the helpers (they end when it does)."""


@dataclass
class _Helper:
    composer: Composer
    store: Store
    run: int = -1
    catalogue: list[ProductView] | None = None


_helper: _Helper | None = None
"""The helper process's composer and store, built once by ``_start``."""


def _start(spec: ComposerSpec) -> None:
    global _helper
    from worker.adapters.templates import JinjaTemplates  # the helper's own templates, loaded once

    _exit_with_parent(spec.parent_pid)
    # Ctrl-C reaches the terminal's whole process group: the process that started this helper decides when to stop.
    # The helper began with SIGINT blocked (``_sigint_held``): one that came while it started waits, and is dropped
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    renderer = JinjaTemplates(spec.templates_root, recheck_seconds=spec.recheck_seconds,
                              time_limit=spec.settings.checks.render_timeout_seconds)
    store = Store.for_settings(spec.settings)
    _helper = _Helper(Composer(spec.settings, renderer, spec.link_key), store)


PARENT_CHECK_SECONDS = 1.0


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Inside: SIGINT blocked in this thread, and so in the helper processes it starts (a process starts with the
    signals its parent's thread blocked): a Ctrl-C at the terminal, which reaches the whole process group, waits
    in a helper until its ``_start`` ignores it, where during its second of imports it printed a KeyboardInterrupt
    traceback and killed the helper. This process takes the Ctrl-C all the same, on another thread or after.
    multiprocessing's resource tracker is started first, if it is not up: starting it (with the first helper) ends
    by unblocking SIGINT in this thread, before the helper is started."""
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exit_with_parent(parent: int) -> None:
    """End this helper when ``parent``, the process that started it, is gone (SIGKILLed, say, even before
    this helper got this far): a helper blocked on its work queue would otherwise live on, orphaned,
    holding its memory and the parent's stderr."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, name="kembali-parent-watch", daemon=True).start()


def _ready() -> None:
    """A no-op, run once to know the helpers are up."""


def prepare_batch(
    composer: Composer, store: Store, batch: Sequence[ClaimedMessage], catalogue: list[ProductView], now: datetime
) -> list[Item]:
    """The batch's facts, then ``Composer.prepare`` for each message, in order."""
    facts = load_batch_facts(store, batch, catalogue, settings=composer.settings, now=now)
    return [composer.prepare(message, facts, now) for message in batch]


def _prepare_in_helper(batch: Sequence[ClaimedMessage], now: datetime, run: int) -> list[Item]:
    helper = _helper
    assert helper is not None, "helper process not started"
    if helper.run != run or helper.catalogue is None:  # once per dispatch run, as in-process
        helper.catalogue, helper.run = load_catalogue(helper.store, now), run
    return [_slim(item) for item in prepare_batch(helper.composer, helper.store, batch, helper.catalogue, now)]


def _slim(item: Item) -> Item:
    if isinstance(item, Composed):
        return replace(item, rendered=replace(item.rendered, html="", text=""))
    return item


class ComposerPool:
    """Prepares batches of at least ``min_batch`` messages in ``processes`` helper processes."""

    def __init__(self, spec: ComposerSpec, *, processes: int = 1, min_batch: int = MIN_BATCH) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.spec = spec
        self.processes = processes
        self.min_batch = min_batch
        self._executor: ProcessPoolExecutor | None = None
        self._started: Future[None] | None = None
        self.failures = 0
        self.prepared = 0
        """Messages the helpers prepared so far."""

    def start(self) -> None:
        """Start the helpers in the background (~0.5-1 s of importing): batches are prepared in-process
        until they are up, so a run never waits for them."""
        if self.failures < MAX_FAILURES and (self._started is None or self._executor is None):
            with _sigint_held():  # (the executor starts its processes as work is submitted)
                self._started = self._pool().submit(_ready)

    def wanted(self, size: int) -> bool:
        """Whether a batch of ``size`` messages goes to the helpers (else: prepare it in-process): big
        enough, and the helpers, once started, are up."""
        if size < self.min_batch or self.failures >= MAX_FAILURES:
            return False
        return self._started is not None and self._executor is not None and self._started.done()

    def wait_started(self, timeout: float | None = None) -> None:
        """Start the helpers and wait until they are up (tests, and a daemon that wants them warm)."""
        self.start()
        if self._started is not None:
            self._started.result(timeout)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes,
                # spawn: never fork a process that runs a database thread and an event loop
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start,
                initargs=(self.spec,),
            )
        return self._executor

    async def prepare(self, batch: Sequence[ClaimedMessage], now: datetime, *, run: int) -> list[Item] | None:
        """``prepare_batch`` in the helpers, in order; None when a helper died (the caller prepares the batch
        in-process; the failure is logged and the next batch gets a fresh helper). ``run`` names the dispatch
        run (``Dispatcher._runs``): the catalogue is read once per run."""
        parts = _split(list(batch), self.processes)
        loop = asyncio.get_running_loop()
        try:
            pool = self._pool()
            with _sigint_held():  # (the executor starts its processes as work is submitted)
                submitted = [asyncio.wrap_future(pool.submit(_prepare_in_helper, part, now, run), loop=loop)
                             for part in parts]
            results = await asyncio.gather(*submitted)
        except BrokenProcessPool as exc:
            self.failures += 1
            log.event(
                "compose_process_failed", logging.ERROR, error=repr(exc), messages=len(batch),
                composing_in_process=self.failures >= MAX_FAILURES,
            )  # fmt: skip
            self._discard()
            return None
        self.failures = 0
        self.prepared += len(batch)
        return [item for part in results for item in part]

    def _discard(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._started = None

    def close(self) -> None:
        """Stop the helper processes (waits for a batch under way)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._started = None


def _split(batch: list[ClaimedMessage], parts: int) -> list[list[ClaimedMessage]]:
    size = -(-len(batch) // parts)
    return [batch[i : i + size] for i in range(0, len(batch), size)]

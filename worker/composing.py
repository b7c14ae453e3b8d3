"""Composing batches in a helper process, beside the event loop.

Theory of operation
-------------------
Rendering and building MIME is pure CPU (~0.3-0.5 ms a message) and, done in
the event loop's thread, it competes for the GIL with everything that keeps
the SMTP connections busy: while a batch of 500 is composed, no reply is read.
The dispatcher decides each message in its own process (``Composer.decide``:
the re-check and the contact policy, whose ``Arbiter`` remembers the whole
run) and hands the messages to send to ``ComposerPool.render``, which sends
them with the facts read for the batch (plain frozen dataclasses, so they
pickle) to a ``concurrent.futures.ProcessPoolExecutor`` whose processes each
hold a ``Composer`` over their own ``JinjaTemplates``, built once when the
process starts, and run ``Composer.render_message`` (no state). The event loop
awaits the result while the senders keep sending the previous batch, so on a
machine with a second core composing and sending overlap.

Nothing about the ledger changes: the helper only turns rows into bytes, the
event loop process still decides, marks, sends and records. The result is the
same ``Composed``/``RenderFailed`` list ``render_message`` gives in-process,
except that ``Composed.rendered`` carries no html/text bodies (the MIME bytes
in ``Composed.data`` hold them; the sender needs only the subject and the
template version), which halves what crosses the pipe.

Small batches are composed in-process (starting the helper takes ~0.5 s of a
core; sending 20 messages does not need it). If the helper dies (killed, out of
memory) the batch is composed in-process, a ``compose_process_failed`` event is
logged, and the next batch starts a fresh helper; after ``MAX_FAILURES`` in a row
the pool gives up and everything is composed in-process. Helpers are started with
``spawn``, which imports the main module again: a program that embeds Kembali
needs the usual ``if __name__ == "__main__":`` guard (``kembali`` and
``python -m worker`` have it).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from worker import log
from worker.config import Settings
from worker.domain import ClaimedMessage
from worker.pipeline import BatchFacts, Composed, Composer, RenderFailed

MIN_BATCH = 64
"""Batches smaller than this are composed in the event loop's process."""

MAX_FAILURES = 3
"""Helper deaths in a row after which the pool stops trying and composes in-process."""

Item = Composed | RenderFailed


@dataclass(frozen=True)
class ComposerSpec:
    """What a helper process needs to build its own ``Composer`` (picklable)."""

    settings: Settings
    templates_root: Path
    link_key: bytes
    recheck_seconds: float | None


_composer: Composer | None = None
"""The helper process's composer, built once by ``_start``."""


def _start(spec: ComposerSpec) -> None:
    global _composer
    from worker.adapters.templates import JinjaTemplates  # the helper's own templates, loaded once

    renderer = JinjaTemplates(spec.templates_root, recheck_seconds=spec.recheck_seconds)
    _composer = Composer(spec.settings, renderer, spec.link_key)


def _render_batch(batch: Sequence[ClaimedMessage], facts: BatchFacts, now: datetime) -> list[Item]:
    assert _composer is not None, "helper process not started"
    return [_slim(_composer.render_message(message, facts, now)) for message in batch]


def _slim(item: Item) -> Item:
    if isinstance(item, Composed):
        return replace(item, rendered=replace(item.rendered, html="", text=""))
    return item


class ComposerPool:
    """Renders batches of at least ``min_batch`` messages in ``processes`` helper processes."""

    def __init__(self, spec: ComposerSpec, local: Composer, *, processes: int = 1, min_batch: int = MIN_BATCH) -> None:
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.spec = spec
        self.local = local
        """Renders small batches, and batches whose helper died."""
        self.processes = processes
        self.min_batch = min_batch
        self._executor: ProcessPoolExecutor | None = None
        self.failures = 0

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

    async def render(self, batch: Sequence[ClaimedMessage], facts: BatchFacts, now: datetime) -> list[Item]:
        """``Composer.render_message`` for each message (ones ``Composer.decide`` let through), in order."""
        if len(batch) < self.min_batch or self.failures >= MAX_FAILURES:
            return [self.local.render_message(message, facts, now) for message in batch]
        parts = _split(list(batch), self.processes)
        loop = asyncio.get_running_loop()
        try:
            pool = self._pool()
            results = await asyncio.gather(
                *(loop.run_in_executor(pool, _render_batch, part, facts, now) for part in parts)
            )
        except BrokenProcessPool as exc:
            self.failures += 1
            log.event(
                "compose_process_failed", logging.ERROR, error=repr(exc), messages=len(batch),
                composing_in_process=self.failures >= MAX_FAILURES,
            )  # fmt: skip
            self._discard()
            return [self.local.render_message(message, facts, now) for message in batch]
        self.failures = 0
        return [item for part in results for item in part]

    def _discard(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        """Stop the helper processes (waits for a batch under way)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def _split(batch: list[ClaimedMessage], parts: int) -> list[list[ClaimedMessage]]:
    size = -(-len(batch) // parts)
    return [batch[i : i + size] for i in range(0, len(batch), size)]

"""Run the synchronous Store on one dedicated thread, so the event loop never blocks on the database.

One thread (not a pool) keeps a process's database work in order and gives
SQLite a single writer per process; batching (see ``sending.LedgerWriter``)
keeps that one thread far from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from worker import log
from worker.adapters.store import Store

P = ParamSpec("P")
T = TypeVar("T")


class AsyncStore:
    RETRY_SECONDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    """The waits before ``call_retrying`` tries a failed call again (15.5 s in all: a database restart or
    failover), as the ledger writer does its commits."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kembali-db")

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def call_retrying(self, event: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``call``, tried again after each of ``RETRY_SECONDS`` when it fails (logged as ``event``), then
        given up with the last failure. For the sender's reads and bookings, which a retry cannot harm (a claim
        whose reply was lost leaves its rows to lapse back to the queue)."""
        for delay in self.RETRY_SECONDS:
            try:
                return await self.call(fn, *args, **kwargs)
            except Exception as exc:
                log.event(event, logging.WARNING, error=log.error_line(exc), retry_in_seconds=delay)
                await asyncio.sleep(delay)
        return await self.call(fn, *args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

"""Run the synchronous Store on one dedicated thread, so the event loop never blocks on the database.

One thread (not a pool) keeps a process's database work in order and gives
SQLite a single writer per process; batching (see ``sending.LedgerWriter``)
keeps that one thread far from being the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from worker import log
from worker.adapters.store import Store
from worker.errors import LedgerRowError

UNREADABLE = (LedgerRowError, ValueError, TypeError)
"""What a call that read a value it cannot make sense of raises (a row edited by hand: a birthday 'someday' on
SQLite): reading it again gives the same, so ``retrying`` does not (a database away raises SQLAlchemy's errors)."""

P = ParamSpec("P")
T = TypeVar("T")


RETRY_SECONDS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
"""The waits before a failed database call is tried again (15.5 s in all: a database restart or failover)."""
STOP_PATIENCE_SECONDS = 1.0
"""Once a stop is asked, how long ``call_retrying_until`` still waits for its call under way: a claim takes
milliseconds, but one waiting for another program's SQLite write lock waits up to the busy timeout (30 s), and
nothing cuts SQLite's wait short."""


class CallLeft(Exception):
    """A call ``call_retrying_until`` stopped waiting for once a stop was asked: its thread goes on with it."""


async def retrying(
    event: str, attempt: Callable[[], Awaitable[T]], delays: Sequence[float] = RETRY_SECONDS, *,
    stop: asyncio.Event | None = None, **fields: object,
) -> T:
    """``attempt()``, tried again after each of ``delays`` when it fails (each failure logged as ``event`` with
    its first line, the wait and ``fields``), then given up with the last failure; at once when it is ``UNREADABLE``,
    or once ``stop`` is set (a stopping daemon waits for no retry of a call that nothing waits for)."""
    for delay in delays:
        try:
            return await attempt()
        except UNREADABLE:
            raise
        except Exception as exc:
            if stop is not None and stop.is_set():
                raise
            log.event(event, logging.WARNING, error=log.error_line(exc)[:300], retry_in_seconds=delay, **fields)
            if stop is None:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    raise
    return await attempt()


class AsyncStore:
    RETRY_SECONDS = RETRY_SECONDS
    """The waits of ``call_retrying``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kembali-db")
        self._left: list[Future[Any]] = []
        """The calls ``call_retrying_until`` stopped waiting for (``left_running``)."""

    @property
    def left_running(self) -> bool:
        """Whether a call ``call_retrying_until`` stopped waiting for is still running on the thread: a closing that
        waits for the thread waits for the database (another program's SQLite write lock: up to the busy timeout)."""
        return any(not call.done() for call in self._left)

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def call_retrying(self, event: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``call``, tried again after each of ``RETRY_SECONDS`` when it fails (logged as ``event``), then
        given up with the last failure. For the sender's reads and bookings, which a retry cannot harm (a claim
        whose reply was lost leaves its rows to lapse back to the queue)."""
        return await retrying(event, lambda: self.call(fn, *args, **kwargs), self.RETRY_SECONDS)

    async def call_retrying_until(self, stop: asyncio.Event, event: str, fn: Callable[P, T], /, *args: P.args,
                                  **kwargs: P.kwargs) -> T:
        """``call_retrying``, whose retries end once ``stop`` is set (``retrying``'s ``stop``: a stopping daemon
        waits for no retry of a call nothing waits for), and whose call under way is waited for
        ``STOP_PATIENCE_SECONDS`` more at most, then left to its thread (``CallLeft``, ``left_running``). For the
        claim, whose rows, should it take some after all, lapse back to the queue with its lease."""
        return await retrying(event, lambda: self._call_until(stop, fn, *args, **kwargs), self.RETRY_SECONDS,
                              stop=stop)

    async def _call_until(self, stop: asyncio.Event, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        running = self._executor.submit(functools.partial(fn, *args, **kwargs))
        call = asyncio.wrap_future(running)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({call, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not call.done():
                await asyncio.wait({call}, timeout=STOP_PATIENCE_SECONDS)
        finally:
            stopped.cancel()
            left = not call.done()
            if left:  # (cancelled: as an await of the call itself would be; begun, its thread goes on with it)
                call.cancel()
                self._left = [c for c in self._left if not c.done()] + [running]
        if left:
            raise CallLeft(f"stopped waiting for the database's answer to {fn.__name__}")
        return call.result()

    def close(self, *, wait: bool = True) -> None:
        """Stop the thread, once its calls are done (``wait``); without ``wait``, calls not yet begun are
        dropped and one that is stuck (on a database that does not answer) is left to the process's exit."""
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

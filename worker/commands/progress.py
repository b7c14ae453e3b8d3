"""A progress line on a terminal (stderr), silent elsewhere. While it is shown, a log record erases it before it
is written (the line is drawn again at the next update), so a warning never runs on after the line's text."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import TextIO


class Progress:
    def __init__(self, label: str, *, stream: TextIO | None = None, every_seconds: float = 0.5) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.every = every_seconds
        self._last = 0.0
        self._shown = False
        self._hooked: list[logging.Handler] = []

    def _before_a_record(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def update(self, done: int, detail: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        self.stream.write(f"\r{self.label}: {done:,} {detail}\x1b[K")
        self.stream.flush()
        self._shown = True
        if not self._hooked:  # Kembali's log and the other libraries' warnings (``log.configure``'s handlers)
            self._hooked = [*logging.getLogger("kembali").handlers, *logging.getLogger().handlers]
            for handler in self._hooked:
                handler.addFilter(self._before_a_record)

    def clear(self) -> None:
        """Erase the progress line, so that a message written now starts a line of its own; the next ``update``
        draws it again below."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
            self._last = 0.0
        for handler in self._hooked:
            handler.removeFilter(self._before_a_record)
        self._hooked = []

    def done(self) -> None:
        self.clear()


class SendProgress:
    """The progress line while a run sends (on a terminal; a ``SendObserver``): a day's queue sends for many
    minutes at ``sending.rate_per_second``, and a log quiet below warnings (the demo's, ``--log-level warning``)
    says nothing meanwhile. No total: what the run will send is not known ahead (the frequency cap, quiet hours and
    the domains' rates defer some of what is due, retries come due meanwhile), and a total never reached would
    mislead. It shows the rate so far, and ``due_now`` (the rows due by now, claimed and being sent ones included:
    what is still to do now, less what was deferred meanwhile), read again every ``COUNT_EVERY_SECONDS`` off the
    loop (or ``COUNT_SHARE`` times as long as the last read took: 0.4-0.7 s on SQLite with 1.7M rows due), less the
    results observed since that read began."""

    COUNT_EVERY_SECONDS = 1.0
    COUNT_SHARE = 10
    """A read of the count takes at most a tenth of the time: on a large ledger it would otherwise take half a core
    from the run it reports on."""

    def __init__(self, due_now: Callable[[], int] | None = None) -> None:
        self.progress = Progress("sending")
        self.done = 0
        self.sent = 0
        self.due_now = due_now
        self.left: int | None = None
        self._left_at_done = 0
        """``done`` when the read that gave ``left`` began."""
        self._first_at: float | None = None
        self._counted_at = -math.inf
        self._count_every = self.COUNT_EVERY_SECONDS
        self._counting = False

    def observe_result(self, campaign: str, result: str, outcome: str | None, seconds: float | None, at: float) -> None:
        self.done += 1
        self.sent += result == "sent"
        if not self.progress.enabled:
            return
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
        self._count(now)
        detail = f"messages done ({self.sent:,} sent)"
        if now - self._first_at >= 1.0:  # the rate after the first result, once there is a second to measure
            detail += f", {(self.done - 1) / (now - self._first_at):,.1f}/s"
        if self.left is not None:
            detail += f", {max(0, self.left - (self.done - self._left_at_done)):,} more due now"
        self.progress.update(self.done, detail)

    def _count(self, now: float) -> None:
        """Read ``due_now`` again in a thread, when the last count is done and older than ``COUNT_EVERY_SECONDS``
        (or ``COUNT_SHARE`` times what it took); a count that fails (the database busy) leaves the last one shown."""
        if self.due_now is None or self._counting or now - self._counted_at < self._count_every:
            return
        self._counting, self._counted_at = True, now
        counting = asyncio.get_running_loop().run_in_executor(None, self.due_now)
        done = self.done

        def counted(future: asyncio.Future[int]) -> None:
            self._counting = False
            self._count_every = max(self.COUNT_EVERY_SECONDS, self.COUNT_SHARE * (time.monotonic() - now))
            if not future.cancelled() and future.exception() is None:
                self.left, self._left_at_done = future.result(), done

        counting.add_done_callback(counted)

"""A progress line on a terminal (stderr), silent elsewhere. While it is shown, a log record erases it before it
is written (the line is drawn again at the next update), so a warning never runs on after the line's text."""

from __future__ import annotations

import logging
import sys
import time
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
    says nothing meanwhile."""

    def __init__(self) -> None:
        self.progress = Progress("sending")
        self.done = 0
        self.sent = 0

    def observe_result(self, campaign: str, result: str, outcome: str | None, seconds: float | None, at: float) -> None:
        self.done += 1
        self.sent += result == "sent"
        self.progress.update(self.done, f"messages done ({self.sent:,} sent)")

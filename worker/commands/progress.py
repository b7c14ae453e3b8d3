"""A progress line on a terminal (stderr), silent elsewhere. While it is shown, a log record erases it before it
is written (the line is drawn again at the next update), so a warning never runs on after the line's text."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
import time
import unicodedata
from collections.abc import Callable
from typing import TextIO

from worker.log import printable


class Progress:
    """``label: N detail`` on the terminal, drawn again at most every ``every_seconds``, with how far along the work
    is when its size is known: ``N of TOTAL (P%)`` for a count (``total``), or ``P% of SIZE`` for a file read
    (``bytes_of``: the bytes read and the file's size, asked only when the line is drawn); then the rate (``rate``:
    items a second, from the first update of this pass on) and about how long is left. ``clock`` is monotonic
    seconds."""

    def __init__(
        self, label: str, *, stream: TextIO | None = None, every_seconds: float = 0.5, rate: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.label = printable(label)  # (a file's name: an escape in it is shown, not obeyed)
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.every = every_seconds
        self.rate = rate
        self.clock = clock
        self._last = -math.inf
        self._shown = False
        self._hooked: list[logging.Handler] = []
        self._began: tuple[float, int] | None = None
        """When this pass's first update came, and its count then."""
        self._read_from: tuple[float, int] | None = None
        """When the first known position in the file was asked, and it."""

    def _before_a_record(self, record: logging.LogRecord) -> bool:
        self.clear()
        return True

    def restart(self) -> None:
        """A new pass over the work (an orders import's second read of its file): rates are measured from here."""
        self._began = self._read_from = None

    def update(
        self, done: int, detail: str = "", *, total: int | None = None,
        bytes_of: Callable[[], tuple[int, int] | None] | None = None,
    ) -> None:  # fmt: skip
        if not self.enabled:
            return
        now = self.clock()
        if self._began is None:
            self._began = (now, done)
        if now - self._last < self.every:
            return
        self._last = now
        pieces = self._pieces(now, done, detail, total, bytes_of)
        self.stream.write(f"\r{_fitted(pieces, _width(self.stream))}\x1b[K")
        self.stream.flush()
        self._shown = True
        if not self._hooked:  # Kembali's log and the other libraries' warnings (``log.configure``'s handlers)
            self._hooked = [*logging.getLogger("kembali").handlers, *logging.getLogger().handlers]
            for handler in self._hooked:
                handler.addFilter(self._before_a_record)

    def _pieces(
        self, now: float, done: int, detail: str, total: int | None,
        bytes_of: Callable[[], tuple[int, int] | None] | None,
    ) -> list[tuple[str, int]]:
        """The line's text in pieces, each with its rank: on a narrow terminal the lowest are left out first (the
        size of the file, the detail past its first words, the rate, those words), 0 never."""
        assert self._began is not None
        began, done_then = self._began
        head = f"{self.label}: {done:,}"
        if total:
            head += f" of {total:,} ({min(100.0, 100 * done / total):.1f}%)"
        pieces = [(head, 0)]
        for n, words in enumerate(detail.split(", ") if detail else ()):
            pieces.append((f", {words}" if n else f" {words}", 2 if n else WORDS))
        per_second = (done - done_then) / (now - began) if now - began >= 1.0 else None
        left: float | None = None
        if total and per_second:
            left = max(0, total - done) / per_second
        position = bytes_of() if bytes_of is not None else None
        if position is not None:
            read, size = min(position[0], position[1]), position[1]
            pieces += [(f", {100 * read / size if size else 100.0:.1f}%", 5), (f" of {_bytes(size)}", 1)]
            if self._read_from is None:
                self._read_from = (now, read)
            since, read_then = self._read_from
            if now - since >= 1.0 and read > read_then:
                left = (size - read) * (now - since) / (read - read_then)
        if self.rate and per_second is not None:
            pieces.append((f", {per_second:,.0f}/s" if per_second >= 100 else f", {per_second:,.1f}/s", 3))
        if left is not None:
            pieces.append((f", about {_duration(left)} left", 5))
        return pieces

    def clear(self) -> None:
        """Erase the progress line, so that a message written now starts a line of its own; the next ``update``
        draws it again below."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
            self._last = -math.inf
        for handler in self._hooked:
            handler.removeFilter(self._before_a_record)
        self._hooked = []

    def done(self) -> None:
        """Erase the line for good: what the command says next (its summary, the shell's prompt) starts a line."""
        self.clear()


NARROWEST = 80
"""The width a terminal is taken to have when nothing says."""


def _width(stream: TextIO) -> int:
    """The terminal's width as it says, else ``COLUMNS`` (a terminal nobody sized), else ``NARROWEST``."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is an OSError and a ValueError
        columns = 0
    if columns <= 0 and (given := os.environ.get("COLUMNS", "")).isdigit():
        columns = int(given)
    return columns if columns > 0 else NARROWEST


WORDS = 4
"""The rank of the detail's first words (what the count counts): cut short rather than left out, while
``SHORTEST_WORDS`` characters of them are left."""
SHORTEST_WORDS = 12


def _fitted(pieces: list[tuple[str, int]], width: int) -> str:
    """The pieces' text in less than ``width`` columns, as a line that wraps is not erased by the next one's ``\\r``:
    the pieces of the lowest rank left out first (the last of them first), then the end cut."""
    kept = list(pieces)
    while (over := sum(_columns(text) for text, _ in kept) - width + 1) > 0 and any(rank for _, rank in kept):
        lowest = min(rank for _, rank in kept if rank)
        at = max(i for i, (_, rank) in enumerate(kept) if rank == lowest)
        text = kept[at][0]
        if lowest == WORDS and _columns(text) - over - 1 >= SHORTEST_WORDS:
            kept[at] = (_cut(text, _columns(text) - over - 1) + "…", 0)
        else:
            del kept[at]
    text = "".join(text for text, _ in kept)
    if _columns(text) < width:
        return text
    return _cut(text, width - 2) + "…" if width > 1 else ""


def _columns(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide character (CJK, most emoji), none for a combining
    mark, one for the others."""
    if text.isascii():
        return len(text)
    return sum(_column(ch) for ch in text)


def _column(ch: str) -> int:
    return 0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _cut(text: str, columns: int) -> str:
    """The longest start of ``text`` that takes at most ``columns`` columns."""
    if text.isascii():
        return text[: max(0, columns)]
    used = 0
    for i, ch in enumerate(text):
        used += _column(ch)
        if used > columns:
            return text[:i]
    return text


def _bytes(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}" if size < 100 * scale else f"{size / scale:,.0f} {unit}"
    return f"{size} B"


def _duration(seconds: float) -> str:
    if round(seconds) < 60:
        return f"{max(1, round(seconds))} s"
    if round(seconds / 60) < 60:
        return f"{round(seconds / 60)} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


class SendProgress:
    """The progress line while a run sends (on a terminal; a ``SendObserver``): a day's queue sends for many
    minutes at ``sending.rate_per_second``, and a log quiet below warnings (the demo's, ``--log-level warning``)
    says nothing meanwhile. What the run will send is not known ahead (the frequency cap, quiet hours and the
    domains' rates defer some of what is due, retries come due meanwhile): its total is what was done when
    ``due_now`` was last read and what that read found (the rows due by now, claimed and being sent ones included:
    what is still to do now, less what was deferred meanwhile), read again every ``COUNT_EVERY_SECONDS`` off the
    loop (or ``COUNT_SHARE`` times as long as the last read took: 0.4-0.7 s on SQLite with 1.7M rows due); the time
    left is what is still due at the rate so far. A result observed and not yet written when the count was read is
    counted twice: the total may be a few over what is sent."""

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
        self._counted_at = -math.inf
        self._count_every = self.COUNT_EVERY_SECONDS
        self._counting = False

    def observe_result(self, campaign: str, result: str, outcome: str | None, seconds: float | None, at: float) -> None:
        self.done += 1
        self.sent += result == "sent"
        if not self.progress.enabled:
            return
        self._count(self.progress.clock())
        # of what was done when the count was read and what was due then: a total that the deferred leave
        total = None if self.left is None else max(self.done, self._left_at_done + self.left)
        # "1 of 40 messages done", but "1 message done" with no total to be one of
        noun = "message" if self.done == 1 and total is None else "messages"
        self.progress.update(self.done, f"{noun} done ({self.sent:,} sent)", total=total)

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
            self._count_every = max(self.COUNT_EVERY_SECONDS, self.COUNT_SHARE * (self.progress.clock() - now))
            if not future.cancelled() and future.exception() is None:
                self.left, self._left_at_done = future.result(), done

        counting.add_done_callback(counted)

"""The sending progress line's count of what is still due: read off the loop, and never so often that the reads
take a large share of the run they report on."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
import unicodedata

import pytest

from worker.commands.progress import Progress, SendProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report_results(progress: SendProgress, *, seconds: float) -> None:
    """A run that sends a message every 20 ms for ``seconds``, as the dispatcher reports its results."""

    async def sending() -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            progress.observe_result("winback", "sent", "sent", 0.01, time.monotonic())
            await asyncio.sleep(0.02)

    asyncio.run(sending())


def test_a_slow_count_of_what_is_due_is_read_at_most_a_tenth_of_the_time() -> None:
    # Given a count of the messages due that takes 0.3 s (a large ledger: 0.4-0.7 s on SQLite with 1.7M rows due)
    reads: list[float] = []
    lock = threading.Lock()

    def due_now() -> int:
        with lock:
            reads.append(time.monotonic())
        time.sleep(0.3)
        return 1000

    progress = SendProgress(due_now)
    terminal = _Terminal()
    progress.progress = Progress("sending", stream=terminal, every_seconds=0.0)

    # When a run reports a result every 20 ms for 2.5 s
    _report_results(progress, seconds=2.5)

    # Then the count was read once: the next read waits ten times what the last took (3 s), not the 1 s of a quick
    # one, which would have read it three times, the ledger busy with it 0.9 s of the 2.5
    assert len(reads) == 1, [round(t - reads[0], 2) for t in reads]
    # and the line shows what it read as the total, with the one result done when the read began
    assert re.search(r"\rsending: [0-9,]+ of 1,001 \([0-9.]+%\) messages done", terminal.getvalue())
    assert progress.left == 1000


def test_a_quick_count_of_what_is_due_is_read_again_every_second() -> None:
    # Given a count that answers at once
    reads: list[float] = []
    progress = SendProgress(lambda: reads.append(time.monotonic()) or 7)
    progress.progress = Progress("sending", stream=_Terminal(), every_seconds=0.0)

    # When a run reports a result every 20 ms for 2.5 s
    _report_results(progress, seconds=2.5)

    # Then it is read about once a second (at 0, 1 and 2 s), not at every result
    assert 2 <= len(reads) <= 3, [round(t - reads[0], 2) for t in reads]


class _Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drawn(terminal: io.StringIO) -> list[str]:
    """Each progress line drawn, in order (a line is drawn as "\\r" TEXT "\\x1b[K")."""
    return [part.lstrip("\r") for part in terminal.getvalue().split("\x1b[K") if part.strip("\r")]


def test_with_a_total_the_line_shows_how_far_along_how_fast_and_how_long_is_left() -> None:
    # Given a progress line on a terminal over work whose total is known (a run's queue)
    terminal, clock = _Terminal(), _Clock()
    progress = Progress("sending", stream=terminal, clock=clock)

    # When 12,345 of 2,000,000 are done 3 s after the first, at a steady pace
    progress.update(1, "messages done", total=2_000_000)
    clock.now = 3.0
    progress.update(12_345, "messages done", total=2_000_000)

    # Then the line says how many of how many, the share, the rate and about how long is left
    assert _drawn(terminal)[-1] == "sending: 12,345 of 2,000,000 (0.6%) messages done, 4,115/s, about 8 min left"


def test_a_file_read_shows_its_share_of_the_bytes_and_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a CSV of 290 MB read on a terminal 120 columns wide, its lines counted (their number is not known ahead)
    monkeypatch.setenv("COLUMNS", "120")
    terminal, clock = _Terminal(), _Clock()
    progress = Progress("importing customers from c.csv", stream=terminal, clock=clock)
    read = [1_000_000]

    def bytes_of() -> tuple[int, int]:
        return read[0], 290_000_000

    # When 100 MB more are read in 20 s
    progress.update(10_000, "lines read, 0 rejected", bytes_of=bytes_of)
    clock.now, read[0] = 20.0, 101_000_000
    progress.update(500_000, "lines read, 0 rejected", bytes_of=bytes_of)

    # Then the line says the lines read, how much of the file that is, the rate and about how long is left
    assert _drawn(terminal)[-1] == ("importing customers from c.csv: 500,000 lines read, 0 rejected, 34.8% of 290 MB, "
                                    "24,500/s, about 38 s left")  # fmt: skip


def test_without_a_total_the_line_shows_the_count_and_the_rate() -> None:
    terminal, clock = _Terminal(), _Clock()
    progress = Progress("previewing", stream=terminal, clock=clock)
    progress.update(1, "considered")
    assert _drawn(terminal) == ["previewing: 1 considered"]  # no rate before there is a second to measure it
    clock.now = 2.0
    progress.update(51, "considered")
    assert _drawn(terminal)[-1] == "previewing: 51 considered, 25.0/s"


def test_a_new_pass_measures_its_rate_afresh() -> None:
    # an orders import reads its file twice: the second read starts again at the top
    terminal, clock = _Terminal(), _Clock()
    progress = Progress("importing orders from o.csv", stream=terminal, clock=clock)
    progress.update(1, "lines checked")
    clock.now = 10.0
    progress.update(100_001, "lines checked")
    progress.restart()
    progress.update(1, "lines read")
    clock.now = 12.0
    progress.update(201, "lines read")
    assert _drawn(terminal)[-1] == "importing orders from o.csv: 201 lines read, 100/s"


def test_the_line_fits_the_terminal_so_that_the_next_one_erases_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # a line longer than the terminal is wide wraps, and "\r\x1b[K" erases only its last row: each update would
    # leave a row behind
    monkeypatch.setenv("COLUMNS", "100")
    terminal, clock = _Terminal(), _Clock()
    progress = Progress("importing customers from c.csv", stream=terminal, clock=clock)
    progress.update(1, "lines read, 12 rejected (3 with an unclear consent)", bytes_of=lambda: (1, 300))
    clock.now = 2.0
    progress.update(12_345, "lines read, 12 rejected (3 with an unclear consent)", bytes_of=lambda: (100, 300))

    # Then the file's size and the detail past its first words are left out, not the count, how far along, the rate
    # and the time left
    line = _drawn(terminal)[-1]
    assert line == "importing customers from c.csv: 12,345 lines read, 33.3%, 6,172/s, about 4 s left"
    # and at 80 columns the rate and those words too
    monkeypatch.setenv("COLUMNS", "80")
    progress = Progress("importing customers from customers-2026.csv", stream=terminal, clock=clock)
    clock.now = 0.0
    progress.update(1, "lines read, 0 rejected", bytes_of=lambda: (1, 3_000_000))
    clock.now = 2.0
    progress.update(12_345, "lines read, 0 rejected", bytes_of=lambda: (1_000_000, 3_000_000))
    assert _drawn(terminal)[-1] == "importing customers from customers-2026.csv: 12,345, 33.3%, about 4 s left"
    # and a label too long for any of it is cut at the end, in a terminal that does not say its width taken as 80
    # columns wide
    monkeypatch.delenv("COLUMNS")
    Progress("x" * 100, stream=terminal, clock=clock).update(5)
    assert _drawn(terminal)[-1] == "x" * 78 + "…"


def test_off_a_terminal_nothing_is_written() -> None:
    stream = io.StringIO()  # a log file, cron's mail
    progress = Progress("sending", stream=stream, clock=_Clock())
    progress.update(5, "messages done", total=10)
    progress.done()
    assert stream.getvalue() == ""


def test_done_erases_the_line_so_the_prompt_starts_a_line_of_its_own() -> None:
    terminal = _Terminal()
    progress = Progress("sending", stream=terminal, clock=_Clock())
    progress.update(5, "messages done", total=10)
    progress.done()
    assert terminal.getvalue().endswith("\r\x1b[K")
    assert _drawn(terminal) == ["sending: 5 of 10 (50.0%) messages done"]


def test_the_sending_line_counts_what_was_done_and_what_is_still_due_as_its_total() -> None:
    # Given a run whose queue holds 99 messages still to send when the count is read, at the first result
    terminal, clock = _Terminal(), _Clock()
    sending = SendProgress(lambda: 99)
    sending.progress = Progress("sending", stream=terminal, every_seconds=0.0, clock=clock)

    async def run() -> None:
        for n in range(1, 11):
            clock.now = n * 0.1
            sending.observe_result("winback", "sent", "sent", 0.01, clock.now)
        await asyncio.sleep(0.2)  # the count, read off the loop, is in
        for n in range(11, 41):
            clock.now = n * 0.1
            sending.observe_result("winback", "sent", "sent", 0.01, clock.now)

    asyncio.run(run())

    # Then the line says how many of the 100 (the one done when it was read and the 99 due then), the rate (10 a
    # second) and about how long the 60 still due take at it
    assert _drawn(terminal)[-1] == "sending: 40 of 100 (40.0%) messages done (40 sent), 10.0/s, about 6 s left"


def _columns_on_screen(text: str) -> int:
    """The columns ``text`` takes on a terminal: two for a wide character (CJK, most emoji), none for a combining
    mark, one for the others."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)  # fmt: skip


def test_a_file_name_of_wide_characters_fits_the_terminal_by_the_columns_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an import of a file named in Japanese (each character two columns wide) on a terminal 60 columns wide
    monkeypatch.setenv("COLUMNS", "60")
    terminal, clock = _Terminal(), _Clock()
    progress = Progress("importing customers from 顧客リスト二〇二六.csv", stream=terminal, clock=clock)

    # When the line is drawn with its detail, the share of the file, the rate and the time left
    progress.update(1, "lines read, 0 rejected", bytes_of=lambda: (1, 3_000_000))
    clock.now = 2.0
    progress.update(12_345, "lines read, 0 rejected", bytes_of=lambda: (1_000_000, 3_000_000))

    # Then it takes fewer columns than the terminal has (one that wraps leaves a row behind at each update), the
    # label and count kept whole
    line = _drawn(terminal)[-1]
    assert _columns_on_screen(line) < 60, (line, _columns_on_screen(line))
    assert line.startswith("importing customers from 顧客リスト二〇二六.csv: 12,345")
    # and a label too wide for any of it is cut at the columns, not at the characters
    Progress("顧客" * 50, stream=terminal, clock=clock).update(5)
    assert _columns_on_screen(_drawn(terminal)[-1]) < 60, _drawn(terminal)[-1]


def test_a_terminal_one_column_wide_gets_no_line_that_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1")
    terminal = _Terminal()
    Progress("sending", stream=terminal, clock=_Clock()).update(5, "messages done", total=10)
    assert all(len(line) < 1 for line in _drawn(terminal)) and terminal.getvalue().startswith("\r"), terminal.getvalue()


def test_a_file_name_with_a_terminal_escape_is_shown_escaped() -> None:
    # Given a file whose name holds a terminal escape (clear the screen), imported on a terminal
    terminal = _Terminal()
    Progress("importing customers from a\x1b[2Jb.csv", stream=terminal, clock=_Clock()).update(5, "lines read")

    # Then the escape reaches the terminal as text, not as a command (and the line's fitting counts its columns)
    assert "\x1b[2J" not in terminal.getvalue()
    assert _drawn(terminal) == ["importing customers from a\\u001b[2Jb.csv: 5 lines read"]


def test_the_first_message_done_is_counted_in_the_singular() -> None:
    # the line is drawn at the first result: it read "sending: 1 messages done (1 sent)" at the start of every run
    progress = SendProgress()
    terminal = _Terminal()
    progress.progress = Progress("sending", stream=terminal, every_seconds=0.0)

    async def two_results() -> None:
        progress.observe_result("winback", "sent", "sent", 0.01, time.monotonic())
        progress.observe_result("winback", "skipped", "capped", None, time.monotonic())

    asyncio.run(two_results())

    drawn = terminal.getvalue()
    assert "\rsending: 1 message done (1 sent)" in drawn, drawn
    assert "\rsending: 2 messages done (1 sent)" in drawn, drawn

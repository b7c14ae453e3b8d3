"""The sending progress line's count of what is still due: read off the loop, and never so often that the reads
take a large share of the run they report on."""

from __future__ import annotations

import asyncio
import io
import threading
import time

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
    # and the line shows what it read, less the results since
    assert "more due now" in terminal.getvalue()
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

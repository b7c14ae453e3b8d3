"""Fakes that ship with the package: a clock you move by hand and a transport that records.

The store has no fake: SQLite files are fast and real, so tests use them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from worker.domain import Outcome, SendResult, SendStage


class FakeClock:
    """Implements ``worker.ports.Clock``; ``sleep`` advances time instead of waiting."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
        self._mono = 1000.0
        self.slept = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def set(self, when: datetime) -> None:
        if when < self._now:
            raise ValueError("a clock does not go backwards")
        self.advance((when - self._now).total_seconds())

    async def sleep(self, seconds: float) -> None:
        self.slept += max(0.0, seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


class RecordingTransport:
    """Implements ``worker.ports.Transport``: keeps every message and answers 250 (or a scripted result)."""

    def __init__(self, results: dict[str, SendResult] | None = None) -> None:
        self.sent: list[tuple[str, str, bytes]] = []
        self.results = results or {}

    async def send(self, sender: str, recipient: str, message: bytes, where: SendStage | None = None) -> SendResult:
        result = self.results.get(recipient, SendResult(Outcome.SENT, 250, "2.0.0 Ok: recorded"))
        if result.outcome is Outcome.SENT:
            self.sent.append((sender, recipient, message))
        return result

    async def close(self) -> None:
        return None

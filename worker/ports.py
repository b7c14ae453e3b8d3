"""The I/O boundaries the pipeline depends on; adapters and ``worker.testing`` implement them."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from worker.domain import SendResult, SendStage


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, aware, UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (for rate limits)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait (a fake clock just advances)."""
        ...


class Transport(Protocol):
    async def send(self, sender: str, recipient: str, message: bytes, where: SendStage | None = None) -> SendResult:
        """One SMTP attempt; never raises for delivery problems, it classifies them. Should it raise all the same
        (cancelled), ``where`` (if given) holds the stage it had reached."""
        ...

    async def close(self) -> None:
        ...

"""Rate arithmetic with ``now`` as an argument: no clock reads, no sleeping.

``Gcra`` is the generic cell rate algorithm (a token bucket kept as one number,
the theoretical arrival time): ``rate`` events per second on average, up to
``burst`` at once. ``reserve(now)`` books the next slot and says how long to
wait for it, so the caller sleeps outside and tests need no sleeping at all.
"""

from __future__ import annotations

from dataclasses import dataclass

_EPSILON = 1e-9
"""Waits shorter than this are float noise from summing intervals, not a real wait."""


@dataclass
class Gcra:
    rate: float
    """Events per second, on average."""
    burst: int = 1
    """Events allowed back to back before spacing starts."""
    tat: float = 0.0
    """Theoretical arrival time of the next event, in the caller's seconds."""

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.burst < 1:
            raise ValueError("burst must be at least 1")

    @property
    def interval(self) -> float:
        return 1.0 / self.rate

    def reserve(self, now: float) -> float:
        """Book one event; return the seconds to wait before it may happen (0 if now)."""
        tolerance = self.interval * (self.burst - 1)
        start = max(self.tat, now)
        at = max(now, start - tolerance)
        self.tat = start + self.interval
        wait = at - now
        return wait if wait > _EPSILON else 0.0

    def allows(self, now: float) -> bool:
        """Would an event now go through without waiting? (Books nothing.)"""
        tolerance = self.interval * (self.burst - 1)
        return max(self.tat, now) - tolerance <= now

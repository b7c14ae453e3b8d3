"""How a process takes its stop signals: the first stops it gracefully, a second one at once.

A SIGTERM that repeats the first within ``ECHO_SECONDS`` is the same request, not a second one: coreutils'
``timeout`` (cron's usual guard) and some supervisors signal the process and then its whole process group, so
it gets two SIGTERMs microseconds apart, and treating the echo as "now, at once" left rows in flight. A SIGINT
is a person's Ctrl-C: pressed again, however quickly, it forces.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Literal

ECHO_SECONDS = 1.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Verdict = Literal["stop", "echo", "force"]


class StopSignals:
    """What each stop signal means, given the ones before it."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self.first: signal.Signals | None = None
        self._first_at = 0.0

    def take(self, sig: signal.Signals) -> Verdict:
        """``stop`` (the first: stop gracefully), ``echo`` (the first SIGTERM again, from a process-group kill:
        ignore it) or ``force`` (a real second request: exit at once)."""
        now = self._monotonic()
        if self.first is None:
            self.first, self._first_at = sig, now
            return "stop"
        if sig is signal.SIGTERM and self.first is signal.SIGTERM and now - self._first_at < ECHO_SECONDS:
            return "echo"
        return "force"

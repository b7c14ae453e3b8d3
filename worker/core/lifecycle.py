"""The ledger's state rules in one place: what an attempt's outcome makes of a message.

    planned ─claim→ claimed ─mark→ sending ─→ sent
                       │              ├─ transient, attempts left → retry ─claim→ claimed …
                       │              ├─ throttled ("slow down") → retry, the attempt not counted (waits
                       │              │    twice as long after each throttled try in a row)
                       │              ├─ stopped before RCPT TO (connection, setup, login) → retry, not counted
                       │              ├─ the server's trouble (retry.TroubleStreak) → retry, not counted
                       │              ├─ transient, none left / permanent / render error → failed
                       │              └─ ambiguous (after the final dot) → uncertain
                       └─ re-check says no → skipped (with a reason)
    lease lapsed: claimed → back to planned/retry; sending → uncertain (never resent automatically)
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from worker.core.retry import connection_failure
from worker.domain import MessageStatus, Outcome, SendResult


def requeued(attempts: int) -> MessageStatus:
    """The status of a claimed row given back to the queue unsent (stopped, paused, out of quota, held back at the
    mark, its lease lapsed): ``retry`` once an attempt was made, else ``planned``. ``adapters.store.requeued_sql``
    is its SQL twin."""
    return MessageStatus.RETRY if attempts > 0 else MessageStatus.PLANNED


def max_clock_offset(lease_seconds: int) -> float:
    """How far (seconds) a worker's clock may be from the database's before it sends nothing. Leases, claims, sends
    and the mark's look back for another worker's send are stamped on each worker's clock, so two workers each that
    far off, on either side, are twice as far apart, and that must stay within what these rules allow: a live
    worker's lease has two thirds of ``lease_seconds`` left at worst (it renews every third), so a sixth of a lease
    each; the mark looks a minute back for another worker's send to the mailbox (``adapters.store.HELD_SECONDS``),
    so at most 15 s each."""
    return min(15.0, lease_seconds / 6)


def shown_offset(offset: float) -> float:
    """A clock offset as the log shows it: to a tenth of a second, and a few milliseconds behind as 0.0, not -0.0."""
    return round(offset, 1) + 0.0


def clock_offset_problem(offset: float, uncertainty: float, lease_seconds: int) -> str | None:
    """What is wrong when this host's clock is ``offset`` seconds ahead of the database's (behind when negative),
    measured within ``uncertainty`` seconds (half the query's round trip); None within ``max_clock_offset``."""
    bound = max_clock_offset(lease_seconds)
    if abs(offset) - uncertainty <= bound:
        return None
    side = "ahead of" if offset > 0 else "behind"
    return (f"this host's clock is {abs(offset):.1f} s {side} the database's, more than the {bound:g} s allowed (a "
            "sixth of sending.lease_seconds, at most 15 s): workers that far apart take each other's live leases and "
            "miss each other's sends at the frequency cap; nothing is sent until the clock is set right (NTP)")


THROTTLED_CAP_SECONDS = 3600.0
"""The longest a message "slowed down" time after time waits before its next try (``after_attempt``; less when
``sending.retry_max_seconds`` is): once the relay's limit is lifted, it goes within the hour."""


def counts_as_attempt(result: SendResult, *, server_trouble: bool = False) -> bool:
    """Whether the attempt counts against ``max_attempts``: not when the server said "slow down", nor when it
    stopped before RCPT TO (connection, greeting, login, MAIL FROM: not the message's fault), nor when its
    temporary failure is the server's own trouble (``server_trouble``: ``retry.TroubleStreak`` said so)."""
    if server_trouble and result.outcome is Outcome.TRANSIENT:
        return False
    return result.outcome is not Outcome.THROTTLED and connection_failure(result) is None


def backoff_seconds(
    attempt: int, *, base: float, cap: float, hint: float | None = None, rng: random.Random | None = None
) -> float:
    """Delay before attempt ``attempt + 1``: exponential with full jitter in its upper half,
    never less than the server's own "try again in N seconds" hint."""
    ceiling: float = min(cap, base * 2.0 ** min(max(0, attempt - 1), 64))  # 2.0 ** 1024 overflows; 2**64 caps any
    jitter = (rng or random.Random()).uniform(0.5, 1.0)
    delay = ceiling * jitter
    if hint is not None:
        delay = max(delay, min(hint, cap))
    return delay


def after_attempt(
    result: SendResult,
    *,
    attempt: int,
    max_attempts: int,
    now: datetime,
    base_seconds: float,
    cap_seconds: float,
    rng: random.Random | None = None,
    server_trouble: bool = False,
    throttled_before: int = 0,
) -> tuple[MessageStatus, datetime | None]:
    """(new status, next attempt time) after attempt number ``attempt`` (1-based); ``server_trouble``: see
    ``counts_as_attempt``; ``throttled_before``: the message's attempts just before this one that were throttled, in
    a row (``Store.throttled_in_row``)."""
    match result.outcome:
        case Outcome.SENT:
            return MessageStatus.SENT, None
        case Outcome.AMBIGUOUS:
            return MessageStatus.UNCERTAIN, None
        case Outcome.PERMANENT | Outcome.RENDER_ERROR:
            return MessageStatus.FAILED, None
        case Outcome.THROTTLED | Outcome.TRANSIENT if not counts_as_attempt(result, server_trouble=server_trouble):
            # "slow down", the server refused us before RCPT TO or is in trouble: not the message's fault, so retry
            # soon, whatever the attempt count (the dispatcher's pause keeps a broken server from looping); a message
            # "slowed down" time after time waits twice as long each time, up to ``cap_seconds`` or
            # ``THROTTLED_CAP_SECONDS`` (it may be that message's own deferral, Gmail's "421 4.7.0 … suspicious", which
            # no pace lifts): not a try every minute until it expires, nor hours after a relay's limit for everyone
            # was lifted
            again = 1 + (throttled_before if result.outcome is Outcome.THROTTLED else 0)
            delay = backoff_seconds(again, base=base_seconds, cap=min(cap_seconds, THROTTLED_CAP_SECONDS), rng=rng)
            if result.retry_after_seconds is not None:  # the server's own "in N seconds", up to ``cap_seconds``
                delay = max(delay, min(result.retry_after_seconds, cap_seconds))
            return MessageStatus.RETRY, now + timedelta(seconds=delay)
        case Outcome.OPERATOR:
            raise ValueError("an operator action is not an SMTP attempt")
        case Outcome.TRANSIENT:
            if attempt >= max_attempts:
                return MessageStatus.FAILED, None
            delay = backoff_seconds(
                attempt, base=base_seconds, cap=cap_seconds, hint=result.retry_after_seconds, rng=rng
            )
            return MessageStatus.RETRY, now + timedelta(seconds=delay)
    raise AssertionError(f"unhandled outcome {result.outcome!r}")  # pragma: no cover

"""SMTP replies → outcomes, and "try again in N seconds" hints. Pure: no I/O.

An SMTP attempt moves through stages; where it stopped decides what a reply
code (or the lack of one) means:

    connect   TCP connect, greeting, EHLO, STARTTLS, AUTH
    mail      MAIL FROM
    rcpt      RCPT TO
    data      the DATA command (354 expected)
    message   the message body, before the final "." was handed over
    reply     waiting for the reply to the final "."

Rules, in order:

- No reply at all (connection lost, timeout): ``AMBIGUOUS`` at ``reply``
  (the server may have queued the mail), ``TRANSIENT`` anywhere else.
- 2xx at ``reply``: ``SENT``.
- 4xx: ``TRANSIENT``.
- 5xx at ``connect``: ``TRANSIENT``. A refused greeting or login says nothing
  about this message; failing it for good would burn through the queue, so it
  waits and the dispatcher's consecutive-failure pause takes over.
- 552 at ``rcpt``: ``TRANSIENT`` (RFC 5321 §4.5.3.1.10: treat as 452).
- Other 5xx: ``PERMANENT``.
- Anything else (a 2xx/3xx where none belongs, a garbled code): ``AMBIGUOUS``
  at ``reply``, ``TRANSIENT`` before it.
"""

from __future__ import annotations

import re

from worker.domain import Outcome

STAGES = frozenset({"connect", "mail", "rcpt", "data", "message", "reply"})
"""Where an SMTP attempt can stop; see the module docstring."""


def classify_reply(code: int | None, stage: str) -> Outcome:
    """What a reply ``code`` (None: no reply) at ``stage`` means for the message."""
    if stage not in STAGES:
        raise ValueError(f"unknown SMTP stage {stage!r}; expected one of {sorted(STAGES)}")
    final = stage == "reply"
    if code is None:
        return Outcome.AMBIGUOUS if final else Outcome.TRANSIENT
    if 200 <= code < 300 and final:
        return Outcome.SENT
    if 400 <= code < 500:
        return Outcome.TRANSIENT
    if 500 <= code < 600:
        if stage == "connect" or (stage == "rcpt" and code == 552):
            return Outcome.TRANSIENT
        return Outcome.PERMANENT
    return Outcome.AMBIGUOUS if final else Outcome.TRANSIENT


_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}

_RETRY_AFTER = re.compile(
    r"""
    \b(?:in|after)\s+
    (?P<amount>\d+(?:\.\d+)?)\s*
    (?P<unit>seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)
    (?![a-z])
    """,
    re.IGNORECASE | re.VERBOSE,
)


def parse_retry_after(text: str) -> float | None:
    """Seconds from a hint such as "try again in 300 seconds" or "retry after 5 min".

    Recognises ``in N <unit>`` and ``after N <unit>`` with units s/sec/seconds,
    m/min/minutes and h/hours. Returns the first hint found, or None.
    """
    match = _RETRY_AFTER.search(text)
    if match is None:
        return None
    unit = match["unit"].lower()[0]
    return float(match["amount"]) * _UNIT_SECONDS[unit]

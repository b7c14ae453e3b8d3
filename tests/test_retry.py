"""SMTP reply classification and retry hints: tables of cases."""

from __future__ import annotations

import pytest

from worker.core.retry import classify_reply, parse_retry_after
from worker.domain import Outcome

T, P, A, S = Outcome.TRANSIENT, Outcome.PERMANENT, Outcome.AMBIGUOUS, Outcome.SENT


@pytest.mark.parametrize(
    ("code", "stage", "expected"),
    [
        # the final reply decides delivery
        (250, "reply", S),
        (251, "reply", S),
        (451, "reply", T),
        (452, "reply", T),
        (552, "reply", P),
        (554, "reply", P),
        (None, "reply", A),  # dropped or timed out after the final dot
        (354, "reply", A),  # nonsense after the dot: may have been queued
        # refused before the message was accepted
        (450, "rcpt", T),
        (451, "rcpt", T),
        (421, "rcpt", T),
        (550, "rcpt", P),
        (553, "rcpt", P),
        (552, "rcpt", T),  # RFC 5321 §4.5.3.1.10: treat as 452
        (451, "mail", T),
        (550, "mail", P),
        (452, "data", T),
        (554, "data", P),
        (250, "data", T),  # DATA answered with 250 instead of 354: protocol confusion
        # the connection: never the message's fault
        (421, "connect", T),
        (554, "connect", T),
        (535, "connect", T),
        # no reply before the final dot: nothing can have been delivered
        (None, "connect", T),
        (None, "mail", T),
        (None, "rcpt", T),
        (None, "data", T),
        (None, "message", T),
    ],
)
def test_classify_reply(code: int | None, stage: str, expected: Outcome) -> None:
    assert classify_reply(code, stage) is expected


def test_classify_reply_rejects_an_unknown_stage() -> None:
    with pytest.raises(ValueError, match="unknown SMTP stage 'body'"):
        classify_reply(250, "body")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("4.7.1 Greylisted, please try again in 300 seconds", 300.0),
        ("4.7.0 Rate limited, retry in 30 s", 30.0),
        ("4.7.0 Too many connections, retry in 30s", 30.0),
        ("4.2.0 Mailbox busy; try again after 90 seconds", 90.0),
        ("4.7.1 Please retry after 5 minutes", 300.0),
        ("4.7.1 try again in 2 min", 120.0),
        ("4.7.1 Retry in 1h", 3600.0),
        ("4.3.0 try again in 2.5 seconds", 2.5),
        ("4.7.0 TRY AGAIN IN 10 SECONDS", 10.0),
        ("4.7.0 Try again later, closing connection.", None),
        ("4.2.2 Mailbox full", None),
        ("4.7.1 retry in 3 ms", None),
        ("", None),
    ],
)
def test_parse_retry_after(text: str, seconds: float | None) -> None:
    assert parse_retry_after(text) == seconds

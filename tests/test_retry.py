"""SMTP reply classification and retry hints: tables of cases."""

from __future__ import annotations

import pytest

from worker.core import lifecycle
from worker.core.retry import (
    ACCOUNT_LIMIT_RETRY_SECONDS,
    TroubleStreak,
    account_limit,
    classify_reply,
    connection_failure,
    needs_login,
    parse_retry_after,
    pause_retry_seconds,
    refuses_the_client,
    refuses_the_sender,
    server_trouble,
)
from worker.domain import Outcome, SendResult

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
        (550, "mail", T),  # MAIL FROM names the sender alone, the same for every message: never the message's
        (452, "data", T),
        (554, "data", P),
        (250, "data", T),  # DATA answered with 250 instead of 354: protocol confusion
        # the connection: never the message's fault
        (421, "connect", T),
        (554, "connect", T),
        (535, "connect", T),
        (535, "auth", T),
        (454, "auth", T),
        (None, "auth", T),
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


@pytest.mark.parametrize(
    ("result", "trouble"),
    [
        # before MAIL FROM: the server's or the configuration's trouble, never the message's
        (SendResult(T, 535, "535 5.7.8 Authentication credentials invalid", stage="auth"), "auth"),
        (SendResult(T, 454, "454 4.7.0 Temporary authentication failure", stage="auth"), "auth"),
        (SendResult(T, None, "Connection lost", stage="auth"), "connection"),
        (SendResult(T, 554, "554 5.7.1 No SMTP service here", stage="connect"), "connection"),
        (SendResult(T, 421, "421 4.3.2 Service not available", stage="connect"), "connection"),
        (SendResult(T, None, "Connection refused", stage="connect"), "connection"),
        # MAIL FROM names the sender alone: nothing about this message or its recipient has been said yet
        (SendResult(T, None, "Connection lost", stage="mail"), "connection"),
        (SendResult(T, 451, "451 4.1.8 Domain of sender address does not resolve", stage="mail"), "connection"),
        # Postfix's sender and client rules answer at RCPT TO: about the sender or this client, not the recipient
        (SendResult(T, 450, "450 4.1.8 <s@x.example>: Sender address rejected: Domain not found", stage="rcpt"),
         "connection"),
        (SendResult(T, 450, "450 4.7.25 Client host rejected: cannot find your hostname", stage="rcpt"), "connection"),
        (SendResult(T, 450, "450 4.2.0 <a@b.example>: Recipient address rejected: Greylisted", stage="rcpt"), None),
        (SendResult(T, 451, "451 Could not complete sender verify callout", stage="rcpt"), "connection"),
        # a setup every message would meet alike (the transport names what to fix): pauses at once
        (SendResult(T, None, "does not offer STARTTLS", stage="connect", setup="smtp.tls"), "setup"),
        (SendResult(T, None, "certificate verify failed", stage="connect", setup="certificates"), "setup"),
        (SendResult(T, None, "offers no AUTH", stage="auth", setup="smtp.username"), "setup"),
        (SendResult(T, 530, "530 5.7.0 Authentication required", stage="mail", setup="smtp.username"), "setup"),
        (SendResult(T, 554, "554 5.7.1 Relay access denied", stage="rcpt", setup="smtp.username"), "setup"),
        # about this message or its recipient
        (SendResult(T, 451, "451 4.3.0 Local error", stage="rcpt"), None),
        (SendResult(P, 550, "550 5.1.1 No such user", stage="rcpt"), None),
        (SendResult(T, None, "Connection lost", stage="rcpt"), None),
        (SendResult(S, 250, "250 ok", stage="reply"), None),
        (SendResult(T, None, "no stage known"), None),
    ],
)
def test_connection_failures_are_told_from_the_messages_own(result: SendResult, trouble: str | None) -> None:
    assert connection_failure(result) == trouble
    assert lifecycle.counts_as_attempt(result) is (trouble is None)


@pytest.mark.parametrize(
    ("code", "reply", "expected"),
    [
        (530, "5.7.0 Authentication required", True),
        (530, "5.7.0 Must issue a STARTTLS command first", True),
        (554, "5.7.1 <a@b.example>: Relay access denied", True),
        (550, "5.7.1 <a@b.example>... Relaying denied", True),
        (550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain", True),
        (550, "relay not permitted", True),
        (550, "5.7.1 Invalid credentials for relay [192.0.2.1]. The IP address you've registered in your", True),
        (553, "sorry, that domain isn't in my list of allowed rcpthosts; we do not relay", True),
        (550, "5.1.1 <a@b.example>: Recipient address rejected: User unknown in relay recipient table", False),
        (554, "5.7.1 Message rejected as spam", False),
        (550, "5.7.26 Unauthenticated email is not accepted", False),
        (454, "4.7.1 <a@b.example>: Relay access denied", True),
        (451, "4.3.0 Local error in processing", False),
        (None, "Relay access denied", False),
    ],
)
def test_a_reply_that_wants_a_login_is_told_from_one_about_the_recipient_or_the_message(
    code: int | None, reply: str, expected: bool
) -> None:
    assert needs_login(code, reply) is expected


@pytest.mark.parametrize(
    ("code", "stage", "reply", "expected"),
    [
        (550, "mail", "5.1.0 <shop@x.example>: Sender address rejected: User unknown", True),
        (550, "mail", "5.4.5 Daily user sending quota exceeded.", True),
        (553, "rcpt", "5.7.1 <shop@x.example>: Sender address rejected: not owned by user shop", True),
        (450, "mail", "4.1.8 <shop@x.example>: Sender address rejected: Domain not found", False),
        # "exceeded storage allocation" at MAIL FROM: the server's room (no SIZE declared, so no message's size)
        (552, "mail", "5.3.4 Message size exceeds fixed limit", False),
        (550, "rcpt", "5.1.1 <a@b.example>: Recipient address rejected: User unknown", False),
        (554, "reply", "5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied", True),
        (550, "reply", "5.7.60 SMTP; Client does not have permissions to send as this sender", True),
        # given while the body was still arriving
        (550, "message", "5.7.60 SMTP; Client does not have permissions to send as this sender", True),
        (554, "reply", "5.7.1 Message rejected as spam", False),
        (554, "data", "5.7.1 Sender address rejected", False),
        (None, "mail", "Connection lost", False),
        # Exim's sender verification: a "no such user" (or a 5.1.1 quoted from its callout) about the sender
        (550, "rcpt", "Verification failed for <shop@x.example>\nNo Such User Here\nSender verify failed", True),
        (550, "rcpt", "Verification failed for <shop@x.example>\nResponse: 550 5.1.1 <shop@x.example>: Recipient "
                      "address rejected: User unknown\nSender verify failed", True),
        # Amazon SES's sandbox names the identities it has not verified: the sender's, or the recipient's alone
        (554, "reply", "Message rejected: Email address is not verified. The following identities failed the check "
                       "in region US-EAST-1: Shop@X.example", True),
        (554, "reply", "Message rejected: Email address is not verified. The following identities failed the check "
                       "in region US-EAST-1: a@b.example, shop@x.example", True),
        (554, "reply", "Message rejected: Email address is not verified. The following identities failed the check "
                       "in region US-EAST-1: x.example", True),
        (554, "reply", "Message rejected: Email address is not verified. The following identities failed the check "
                       "in region US-EAST-1: a@b.example", False),
        (554, "reply", "Message rejected: Email address is not verified. The following identities failed the check "
                       "in region US-EAST-1: myshop@x.example", False),
    ],
)  # fmt: skip
def test_a_refusal_of_the_sender_is_told_from_one_of_the_recipient(
    code: int | None, stage: str, reply: str, expected: bool
) -> None:
    assert refuses_the_sender(code, stage, reply, "shop@x.example") is expected


@pytest.mark.parametrize(
    ("code", "stage", "reply", "expected"),
    [
        (504, "rcpt", "5.5.2 <3f2a9c1b7d4e>: Helo command rejected: need fully-qualified hostname", "hostname"),
        (550, "mail", "5.7.1 <host>: Helo command rejected: Host not found", "hostname"),
        (554, "rcpt", "5.7.1 <unknown[10.0.0.5]>: Client host rejected: Access denied", "smtp.host"),
        (450, "rcpt", "4.7.25 Client host rejected: cannot find your hostname", None),
        (550, "rcpt", "5.1.1 <a@b.example>: Recipient address rejected: User unknown", None),
        (554, "reply", "5.7.1 Client host rejected", None),
    ],
)
def test_a_refusal_of_this_client_names_what_to_fix(code: int, stage: str, reply: str, expected: str | None) -> None:
    assert refuses_the_client(code, stage, reply) == expected


Q, U = "sending.daily_quota", "smtp.username"


@pytest.mark.parametrize(
    ("code", "stage", "reply", "expected"),
    [
        (454, "mail", "Throttling failure: Daily message quota exceeded.", Q),
        (454, "reply", "Throttling failure: Daily message quota exceeded.", Q),
        (550, "rcpt", "5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits", Q),
        (550, "mail", "5.4.5 Daily SMTP relay limit exceeded for user. To learn more about SMTP relay sending", Q),
        (550, "rcpt", "5.4.5 Daily SMTP relay limit exceeded for customer. For more information on SMTP relay", Q),
        (550, "reply", "5.4.5 Daily user sending quota exceeded. d2-20020a05600c0d8200b0040e3 - gsmtp", Q),
        (554, "reply", "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process", Q),
        # Gmail's reply in full, several lines as aiosmtplib joins them
        (550, "rcpt", "5.4.5 Daily user sending limit exceeded. For more information on Gmail\n5.4.5 sending limits go "
                      "to\n5.4.5  https://support.google.com/a/answer/166852 a1-20020a170906 - gsmtp", Q),
        (550, "mail", "5.7.1 Daily SMTP relay limit exceeded for IP. For more information on SMTP relay sending", Q),
        # Microsoft's daily recipient limits of the sending mailbox or tenant (they name recipients: still the sender's)
        (550, "reply", "5.1.90 Your message can't be sent because you've reached your daily limit for message "
                       "recipients", Q),
        (550, "reply", "5.7.232 Your message can't be sent because your trial tenant has exceeded its daily limit for "
                       "sending email to external recipients (tenant external recipient rate limit)", Q),
        (550, "reply", "5.7.233 Your message can't be sent because your tenant exceeded its daily limit for sending "
                       "email to external recipients (tenant external recipient rate limit)", Q),
        (554, "reply", "Message rejected: Sending paused for this account. For more information, please check", U),
        (554, "mail", "Access denied: Sending suspended for this account. For more information, please check", U),
        (550, "message", "5.4.5 Daily user sending quota exceeded.", Q),  # given before the final dot
        # a per-second rate is the recipient domain's "slow down", not the day's limit
        (454, "reply", "Throttling failure: Maximum sending rate exceeded.", None),
        # a recipient's limits are that message's
        (552, "reply", "5.2.2 Mailbox quota exceeded", None),
        # an IP address is not a mailbox status: 10.5.2.1's "5.2.1" is not one
        (550, "reply", "Daily sending quota exceeded for 10.5.2.1", Q),
        (452, "rcpt", "4.2.2 The email account that you tried to reach is over quota", None),
        (450, "rcpt", "4.2.1 The recipient's daily incoming limit exceeded", None),
        (550, "rcpt", "5.2.1 The email account that you tried to reach is disabled", None),
        (550, "rcpt", "5.1.1 <a@b.example>: Recipient address rejected: User unknown", None),
        # a reply before MAIL FROM is the connection's (counted toward the pause)
        (421, "connect", "Daily message quota exceeded", None),
        (None, "reply", "Daily message quota exceeded", None),
    ],
)  # fmt: skip
def test_a_providers_limit_on_the_whole_account_is_told_from_a_recipients(
    code: int | None, stage: str, reply: str, expected: str | None
) -> None:
    assert account_limit(code, stage, reply) == expected


def test_a_failure_before_mail_from_retries_even_after_the_last_attempt() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 11, 22, tzinfo=UTC)
    refused = SendResult(T, 535, "535 5.7.8 Authentication credentials invalid", stage="auth")
    status, at = lifecycle.after_attempt(refused, attempt=5, max_attempts=5, now=now, base_seconds=60, cap_seconds=3600)
    assert status.value == "retry" and at is not None and at > now
    at_rcpt = SendResult(T, 451, "451 4.3.0 Local error", stage="rcpt")
    status, _ = lifecycle.after_attempt(at_rcpt, attempt=5, max_attempts=5, now=now, base_seconds=60, cap_seconds=3600)
    assert status.value == "failed"
    # the same reply, found the server's own trouble (a streak over several domains): not the message's
    status, at = lifecycle.after_attempt(at_rcpt, attempt=5, max_attempts=5, now=now, base_seconds=60,
                                         cap_seconds=3600, server_trouble=True)  # fmt: skip
    assert status.value == "retry" and at is not None and now < at <= now + timedelta(seconds=60)
    assert not lifecycle.counts_as_attempt(at_rcpt, server_trouble=True) and lifecycle.counts_as_attempt(at_rcpt)
    # a permanent refusal stays permanent whatever the streak
    refused_rcpt = SendResult(P, 550, "550 5.1.1 User unknown", stage="rcpt")
    assert lifecycle.counts_as_attempt(refused_rcpt, server_trouble=True)


@pytest.mark.parametrize(
    ("first", "pauses", "seconds"),
    [
        (60, 1, 60),
        (60, 2, 120),
        (60, 3, 240),
        (60, 4, 480),
        (60, 5, 900),  # the cap: 15 minutes
        (60, 500, 900),
        (0.5, 3, 2.0),
        (1800, 1, 1800),  # a first wait longer than the cap is kept, never doubled
        (1800, 4, 1800),
    ],
)
def test_a_paused_daemon_waits_longer_after_each_pause_in_a_row(first: float, pauses: int, seconds: float) -> None:
    assert pause_retry_seconds(first, pauses) == seconds


@pytest.mark.parametrize(
    ("first", "pauses", "seconds"),
    [(60, 1, 3600), (60, 5, 3600), (0.5, 1, 3600), (7200, 1, 7200), (7200, 3, 7200)],
)
def test_a_pause_at_the_accounts_daily_limit_waits_an_hour_at_least(first: float, pauses: int, seconds: float) -> None:
    # a provider's daily limit is not lifted in a minute: each try before costs a refused message (never hammering)
    assert pause_retry_seconds(first, pauses, at_least=ACCOUNT_LIMIT_RETRY_SECONDS) == seconds


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


def _rcpt(reply: str, stage: str = "rcpt") -> SendResult:
    return SendResult(T, int(reply[:3]), reply, stage=stage)


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        (_rcpt("452 4.3.1 Insufficient system storage"), "452 4.3.1"),
        (_rcpt("451 4.3.0 <a@b.example>: Temporary lookup failure"), "451 4.3.0"),
        (_rcpt("451 Local error in processing", "reply"), "451"),
        (_rcpt("452 4.3.1 Insufficient system storage", "message"), "452 4.3.1"),  # given before the final dot
        (_rcpt("452 4.2.2 Mailbox full"), None),  # the recipient's mailbox
        # an IP address the reply names is not an enhanced code: 10.4.2.17 holds no 4.2.x mailbox status
        (_rcpt("451 Temporary local problem at 10.4.2.17, please try later"), "451"),
        (_rcpt("451 4.3.0 Temporary lookup failure at 10.4.2.17"), "451 4.3.0"),
        (_rcpt("450 4.1.2 <a@b.example>: Recipient address rejected: Domain not found"), None),
        (_rcpt("451 4.7.1 Greylisted, try again in 5 minutes"), None),
        (_rcpt("450 4.1.8 <s@shop.example>: Sender address rejected: Domain not found"), None),  # the sender's
        (_rcpt("451 4.3.0 Shutting down", "mail"), None),  # before RCPT TO: a connection failure
        (SendResult(Outcome.THROTTLED, 452, "452 4.5.3 Too many recipients", stage="rcpt"), None),
        # a 421 closes the channel: the server's state, not a domain's rate, whatever it says
        (SendResult(Outcome.THROTTLED, 421, "421 4.3.2 System not accepting network messages", stage="rcpt"),
         "421 4.3.2"),
        (SendResult(Outcome.TRANSIENT, 421, "421 4.3.2 Shutting down", stage="mail"), None),
        (SendResult(P, 554, "554 5.3.0 no", stage="rcpt"), None),
    ],
)
def test_server_trouble_names_the_class_of_a_4xx_that_is_not_about_the_recipient(
    result: SendResult, kind: str | None
) -> None:
    assert server_trouble(result) == kind


def test_a_trouble_streak_is_the_servers_once_three_domains_met_the_same_class_in_a_row() -> None:
    full = _rcpt("452 4.3.1 Insufficient system storage")
    streak = TroubleStreak()
    # the same domain again and again: that domain's trouble, however long
    assert [streak.observe(full, "a.example") for _ in range(5)] == [False] * 5
    assert [streak.observe(full, d) for d in ("b.example", "c.example", "a.example")] == [False, True, True]
    assert streak.count == 8
    # a connection failure or no reply at all does not end it; a success does
    assert not streak.observe(SendResult(T, None, "timed out", stage="connect"), "d.example")
    assert not streak.observe(SendResult(T, None, "timed out", stage="rcpt"), "d.example")
    assert streak.observe(full, "d.example")
    assert not streak.observe(SendResult(S, 250, "250 ok", stage="reply"), "d.example")
    assert [streak.observe(full, d) for d in ("a.example", "b.example", "c.example")] == [False, False, True]
    # another class starts over
    assert not streak.observe(_rcpt("451 4.3.0 Temporary lookup failure"), "e.example")
    assert streak.count == 1


def test_the_dispatchers_wait_after_failures_in_a_row_stays_at_its_cap_however_long_the_database_is_away() -> None:
    from worker.daemon import DISPATCH_RETRY_MAX_SECONDS, dispatch_retry_seconds

    # the poll's wait, doubled with each failure after the first, up to the cap: a day of a database away (1,440
    # failures a minute apart) raised OverflowError from 2.0 ** 1439 inside the dispatch loop's error handler
    assert [dispatch_retry_seconds(5.0, n) for n in (1, 2, 3, 4, 5)] == [5.0, 10.0, 20.0, 40.0, 60.0]
    assert dispatch_retry_seconds(5.0, 1440) == DISPATCH_RETRY_MAX_SECONDS
    assert dispatch_retry_seconds(90.0, 1440) == 90.0  # never less than the poll

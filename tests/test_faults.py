"""The real Dispatcher, a real SQLite ledger and the fault-injecting aiosmtpd server.

Each case: a customer whose address has a fault, and a customer whose address
is fine. Given the fault, when a cycle runs (and, where the message should come
back, another cycle after the retry time on a fake clock), then the ledger
row, its attempt rows and what the server stored are as the case says, the
fine customer got their mail, and no message arrived twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import itertools
import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.sendkit import NOW, M, Shop, make_settings, message_ids
from tests.smtp_server import CLIENT_LIMIT_REPLY, GREYLIST_REPLY, Behaviour, RecordingServer
from tests.test_smtp_transport import _self_signed, _tls_server
from worker.adapters.shop import upsert_products
from worker.asyncstore import AsyncStore
from worker.commands import running
from worker.core.lifecycle import THROTTLED_CAP_SECONDS
from worker.domain import ProductRecord
from worker.pipeline import plan
from worker.testing import FakeClock

BAD, OK = "bad@test.example", "ok@test.example"


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


@dataclass(frozen=True)
class Case:
    name: str
    behaviour: Behaviour
    status: str
    """The bad row's status after the first cycle."""
    attempts: int
    """The row's ``attempts`` after the first cycle (throttled attempts are not counted)."""
    outcome: str
    """The first attempt row's outcome."""
    code: int | None
    stored: int
    """Messages the server stored for the bad address."""
    suppressed: str | None = None
    label: str | None = None
    """A summary label other than the status (e.g. ``failed:content_rejected``)."""


CASES = [
    Case("421 at RCPT", Behaviour(rcpt_reply="421 4.7.0 Too many connections, try later"),
         "retry", 0, "throttled", 421, 0, label="retry:throttled"),
    Case("450 at RCPT", Behaviour(rcpt_reply="450 4.2.1 Mailbox busy"), "retry", 1, "transient", 450, 0),
    Case("451 at RCPT", Behaviour(rcpt_reply="451 4.3.0 Local error in processing"), "retry", 1, "transient", 451, 0),
    Case("451 rate at RCPT", Behaviour(rcpt_reply="451 4.7.1 Rate limit exceeded for this sender"),
         "retry", 0, "throttled", 451, 0, label="retry:throttled"),
    Case("452 at RCPT", Behaviour(rcpt_reply="452 4.2.2 Mailbox full"), "retry", 1, "transient", 452, 0),
    Case("451 try again later at RCPT", Behaviour(rcpt_reply="451 4.3.0 try again later"),
         "retry", 1, "transient", 451, 0),
    Case("450 greylisted at RCPT", Behaviour(rcpt_reply="450 4.2.0 greylisted"), "retry", 1, "transient", 450, 0),
    Case("452 too many recipients at RCPT", Behaviour(rcpt_reply="452 4.5.3 Too many recipients"),
         "retry", 0, "throttled", 452, 0, label="retry:throttled"),
    Case("550 no such user at RCPT", Behaviour(rcpt_reply="550 5.1.1 <bad@test.example>: User unknown"),
         "failed", 1, "permanent", 550, 0, suppressed="hard_bounce", label="failed:hard_bounce"),
    Case("550 user unknown without an enhanced code", Behaviour(rcpt_reply="550 User unknown in local recipient table"),
         "failed", 1, "permanent", 550, 0, suppressed="hard_bounce", label="failed:hard_bounce"),
    Case("552 at RCPT (treated as 452)", Behaviour(rcpt_reply="552 5.2.2 Mailbox full"),
         "retry", 1, "transient", 552, 0),
    Case("421 after DATA", Behaviour(data_reply="421 4.7.0 Too much mail, closing"),
         "retry", 0, "throttled", 421, 0, label="retry:throttled"),
    Case("450 after DATA", Behaviour(data_reply="450 4.7.1 Message deferred"), "retry", 1, "transient", 450, 0),
    Case("451 after DATA", Behaviour(data_reply="451 4.3.0 Queue file write error"), "retry", 1, "transient", 451, 0),
    Case("452 after DATA", Behaviour(data_reply="452 4.3.1 Insufficient system storage"),
         "retry", 1, "transient", 452, 0),
    Case("550 content after DATA", Behaviour(data_reply="550 5.7.1 Message rejected as spam"),
         "failed", 1, "permanent", 550, 0, label="failed:content_rejected"),
    # a policy refusal of the recipient (Postfix's check_recipient_access), given before any of the content was
    # sent: that message fails, but it is not "refused for its content: check the templates"
    Case("554 5.7.1 recipient access denied at RCPT",
         Behaviour(rcpt_reply="554 5.7.1 <bad@test.example>: Recipient address rejected: Access denied"),
         "failed", 1, "permanent", 554, 0),
    # about the sender (its authentication, its IP), not this message: tried again later, counted, domain slowed
    Case("550 sender unauthenticated after DATA",
         Behaviour(data_reply="550 5.7.26 This mail has been blocked because the sender is unauthenticated"),
         "retry", 1, "transient", 550, 0, label="retry:sender_refused"),
    Case("553 block list at RCPT", Behaviour(rcpt_reply="553 5.7.1 [BL21] the ip is in Spamhaus's list"),
         "retry", 1, "transient", 553, 0, label="retry:sender_refused"),
    # a 5.1.x about the sender (Exchange's sender filter, an unknown sender domain) is no "no such user": the
    # customer is not suppressed
    Case("554 5.1.0 Sender Denied at RCPT", Behaviour(rcpt_reply="554 5.1.0 Sender Denied"),
         "retry", 1, "transient", 554, 0, label="retry:sender_refused"),
    Case("550 5.1.0 sender rejected after DATA",
         Behaviour(data_reply="550 5.1.0 <shop@test.example> sender rejected : invalid sender domain"),
         "retry", 1, "transient", 550, 0, label="retry:sender_refused"),
    Case("552 after DATA", Behaviour(data_reply="552 5.3.4 Message size exceeds fixed limit"),
         "failed", 1, "permanent", 552, 0),
    # a reply to the DATA command itself, nothing of the message sent yet
    Case("421 to DATA", Behaviour(data_command_reply="421 4.3.2 Service shutting down, closing channel"),
         "retry", 0, "throttled", 421, 0, label="retry:throttled"),
    Case("451 to DATA", Behaviour(data_command_reply="451 4.3.0 Temporary lookup failure"),
         "retry", 1, "transient", 451, 0),
    Case("452 to DATA", Behaviour(data_command_reply="452 4.3.1 Insufficient system storage"),
         "retry", 1, "transient", 452, 0),
    Case("554 to DATA", Behaviour(data_command_reply="554 5.7.1 Message refused by policy"),
         "failed", 1, "permanent", 554, 0, label="failed:content_rejected"),
    Case("421 before the final dot, then a hang-up",
         Behaviour(reply_mid_data="421 4.4.2 mx.test.example Error: timeout exceeded"),
         "retry", 0, "throttled", 421, 0, label="retry:throttled"),
    # a refusal while the body is still arriving (past the server's size limit) is its answer about the message,
    # whether it then hangs up or reads on to the dot in silence
    Case("552 before the final dot, then a hang-up",
         Behaviour(reply_mid_data="552 5.3.4 Message size exceeds fixed limit"), "failed", 1, "permanent", 552, 0),
    Case("552 before the final dot, then silence",
         Behaviour(reply_mid_data="552 5.3.4 Message size exceeds fixed limit", read_on_after_reply=True),
         "failed", 1, "permanent", 552, 0),
    # the body fits the socket buffers, so the dot is written before the server hangs up:
    # the client cannot tell this from a drop after the dot, and stays on the safe side
    Case("drop mid-DATA", Behaviour(drop_mid_data=True), "uncertain", 1, "ambiguous", None, 0),
    Case("drop after the final dot (stored)", Behaviour(drop_after_dot=True), "uncertain", 1, "ambiguous", None, 1),
    Case("slow RCPT reply past the timeout", Behaviour(delay_at="rcpt", delay_seconds=1.0),
         "retry", 1, "transient", None, 0),
    # the server was still thinking when the client gave up (aiosmtpd then drops it): the
    # client cannot know that, so uncertain
    Case("slow reply to the dot past the timeout", Behaviour(delay_at="data", delay_seconds=1.0),
         "uncertain", 1, "ambiguous", None, 0),
]  # fmt: skip


@pytest.fixture
def server() -> Iterator[RecordingServer]:
    server = RecordingServer()
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()


def shop_for(url: str, server: RecordingServer, emails: list[str], **sending: Any) -> Shop:
    settings = make_settings(url, server.port, smtp={"timeout_seconds": 0.3, "final_reply_timeout_seconds": 0.3},
                             **sending)
    return Shop(url, settings, emails)


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    """The fields of each log event ``name`` (``worker.log.event``) the test captured."""
    return [getattr(r, "kembali_fields", {}) for r in caplog.records if r.getMessage() == name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_fault_ends_in_its_state(url: str, server: RecordingServer, case: Case) -> None:
    server.on(BAD, case.behaviour)
    shop = shop_for(url, server, [BAD, OK])
    try:
        report = shop.cycle()
        if case.behaviour.delay_at:
            time.sleep(case.behaviour.delay_seconds + 0.3)  # let the slow server finish what it does

        bad = shop.row(BAD)
        (attempt,) = shop.attempts(BAD)
        assert (bad.status, bad.attempts) == (case.status, case.attempts)
        assert (attempt.outcome, attempt.code) == (case.outcome, case.code)
        assert bad.last_code == case.code
        if case.code is not None:
            assert attempt.reply.startswith(str(case.code))
        assert shop.row(OK).status == "sent"
        received = [m.rcpt_tos for m in server.messages]
        assert received.count((BAD,)) == case.stored
        assert received.count((OK,)) == 1
        assert shop.suppressed() == ({BAD: case.suppressed} if case.suppressed else {})
        assert report.dispatched.outcomes[case.label or case.status] == 1
        assert report.dispatched.unreachable is None  # the fine customer's message reached the server
        if case.status == "retry":
            assert bad.next_attempt_at > shop.clock.now()

        # later: a retry is sent once the server behaves; nothing terminal is touched again
        server.on(BAD, Behaviour())
        shop.clock.advance(7 * 3600)
        shop.cycle()
        expected = "sent" if case.status == "retry" else case.status
        assert shop.row(BAD).status == expected
        assert len(shop.attempts(BAD)) == (2 if case.status == "retry" else 1)
        assert [m.rcpt_tos for m in server.messages].count((BAD,)) == case.stored + (case.status == "retry")
        assert all(n == 1 for n in message_ids(server.messages).values()), "a message arrived twice"
    finally:
        shop.close()


@pytest.mark.parametrize("reply", [
    "421 4.7.0 [192.0.2.1] This message is suspicious due to the very low reputation of the sending domain",
    "451 4.7.0 Temporary server error, rate limited",
])  # fmt: skip
def test_a_message_the_server_keeps_throttling_is_tried_less_and_less_often(
    url: str, server: RecordingServer, reply: str
) -> None:
    # Given a server that answers one customer's message with a "slow down" at the final dot every time (Gmail's
    # 421 4.7.0 deferral of one message, a 4.7.0 rate limit), retries 60 s apart at first, at most 6 hours (a
    # message throttled, at most an hour: THROTTLED_CAP_SECONDS)
    server.on(BAD, Behaviour(data_reply=reply))
    shop = shop_for(url, server, [BAD, OK], retry_base_seconds=60.0, retry_max_seconds=21600.0)
    try:
        waits = []
        for _ in range(9):  # When cycles run each time its retry is due
            shop.cycle()
            row = shop.row(BAD)
            assert (row.status, row.attempts) == ("retry", 0)  # never failed for it, never counted
            waits.append((row.next_attempt_at - shop.clock.now()).total_seconds())
            shop.clock.advance(waits[-1] + 1)

        # Then each wait is about twice the one before (jittered in its upper half), up to an hour: not a try every
        # minute for the two weeks until the message expires (20,000 uploads of it), every one of them a "slow down",
        # nor one every 6 hours once the server takes mail again
        for k, wait in enumerate(waits):
            ceiling = min(THROTTLED_CAP_SECONDS, 60.0 * 2**k)
            assert ceiling / 2 <= wait <= ceiling, (k, waits)
        assert [a.outcome for a in shop.attempts(BAD)] == ["throttled"] * 9
        assert shop.row(OK).status == "sent"

        # and once the server takes it, it is sent, once
        server.on(BAD, Behaviour())
        shop.cycle()
        assert shop.row(BAD).status == "sent"
        assert all(n == 1 for n in message_ids(server.messages).values())
    finally:
        shop.close()


def test_greylisting_is_sent_on_a_later_cycle_with_two_attempt_rows(url: str, server: RecordingServer) -> None:
    server.on(BAD, Behaviour(greylist=True))
    shop = shop_for(url, server, [BAD, OK])
    try:
        shop.cycle()
        first = shop.row(BAD)
        assert (first.status, first.attempts, first.last_reply) == ("retry", 1, GREYLIST_REPLY)
        # the server's "try again in 60 seconds" is honoured: not before
        wait = (first.next_attempt_at - shop.clock.now()).total_seconds()
        assert 60 <= wait <= 61

        shop.clock.advance(30)
        shop.cycle()
        assert shop.row(BAD).status == "retry"  # not due yet: nothing tried

        shop.clock.set(first.next_attempt_at)
        shop.cycle()
        assert shop.row(BAD).status == "sent"
        assert [(a.outcome, a.code) for a in shop.attempts(BAD)] == [("transient", 450), ("sent", 250)]
        assert [a.attempt_no for a in shop.attempts(BAD)] == [1, 2]
        assert sorted(m.rcpt_tos for m in server.messages) == [(BAD,), (OK,)]
    finally:
        shop.close()


def test_a_451_try_again_later_is_the_messages_own_temporary_failure_not_throttling(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # greylisting and other temporary refusals of one recipient say "try again later" too; it is not "slow down"
    server.on(BAD, Behaviour(rcpt_reply="451 4.3.0 try again later"))
    shop = shop_for(url, server, [BAD, OK], max_attempts=2)
    try:
        report = shop.cycle()
        row = shop.row(BAD)
        assert (row.status, row.attempts, row.last_code) == ("retry", 1, 451)
        assert [(a.outcome, a.code) for a in shop.attempts(BAD)] == [("transient", 451)]
        assert report.dispatched.outcomes == {"sent": 1, "retry": 1}
        assert _events(caplog, "domain_throttled") == []  # the domain's rate is left alone
        assert running.exit_code(report) == running.EXIT_OK

        # the attempts run out like any other temporary failure's, instead of retrying until it expires
        shop.clock.set(row.next_attempt_at)
        report = shop.cycle()
        row = shop.row(BAD)
        assert (row.status, row.attempts) == ("failed", 2)
        assert report.dispatched.outcomes == {"failed": 1}
        assert running.exit_code(report) == running.EXIT_ATTENTION
        assert [m.rcpt_tos for m in server.messages] == [(OK,)]
    finally:
        shop.close()


def test_a_per_client_rate_limit_slows_down_without_failing_anyone(url: str, server: RecordingServer) -> None:
    emails = [f"c{i}@test.example" for i in range(10)]
    server.client_limit = 4
    shop = shop_for(url, server, emails, max_attempts=1)
    try:
        report = shop.cycle()
        assert report.dispatched.outcomes["sent"] == 4
        assert report.dispatched.outcomes["retry:throttled"] == 6
        throttled = [e for e in emails if shop.row(e).status == "retry"]
        for address in throttled:
            row = shop.row(address)
            assert row.attempts == 0  # not counted: even max_attempts = 1 does not fail them
            assert [(a.outcome, a.last) for a in [_Attempt(shop.attempts(address))]] == [("throttled", 451)]
            assert row.last_reply == CLIENT_LIMIT_REPLY

        server.reset_client_limit()
        server.client_limit = None
        shop.clock.advance(7 * 3600)
        shop.cycle()
        assert {shop.row(e).status for e in emails} == {"sent"}
        assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(emails)
        assert all(n == 1 for n in message_ids(server.messages).values())
        assert {shop.row(e).attempts for e in throttled} == {1}
    finally:
        shop.close()


class _Attempt:
    """The single attempt row of a message, as (outcome, code)."""

    def __init__(self, rows: list[Any]) -> None:
        (row,) = rows
        self.outcome, self.last = row.outcome, row.code


def test_a_refusal_about_the_sender_is_tried_again_later_and_says_what_to_fix(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a receiving domain that refuses mail from this sender (unauthenticated), whatever the message
    gmail = "budi@gmail.test"
    server.on(gmail, Behaviour(rcpt_reply="550 5.7.26 This mail has been blocked because the sender is "
                                          "unauthenticated"))  # fmt: skip
    shop = shop_for(url, server, [gmail, OK], max_attempts=2)
    try:
        # When a cycle runs, Then the message is not failed but waits for a later try, the domain is slowed down,
        # and the log and the summary say it is the sending setup to fix, not the template or the customer
        report = shop.cycle()
        row = shop.row(gmail)
        assert (row.status, row.attempts, row.last_code) == ("retry", 1, 550)
        assert report.dispatched.outcomes["retry:sender_refused"] == 1
        (event,) = _events(caplog, "sender_refused")
        assert event["domain"] == "gmail.test" and "SPF, DKIM and DMARC" in event["hint"]
        assert [e["domain"] for e in _events(caplog, "domain_throttled")] == ["gmail.test"]
        assert _events(caplog, "content_rejected") == []
        assert any(line.startswith("1 message was refused for who sent it") for line in running.summary(report))
        assert shop.row(OK).status == "sent"
        # the refusal goes on: max_attempts ends it, failed with the server's reply, never suppressed
        shop.clock.advance(7 * 3600)
        report = shop.cycle()
        row = shop.row(gmail)
        assert (row.status, row.attempts) == ("failed", 2) and "unauthenticated" in row.last_reply
        assert report.dispatched.outcomes["failed:sender_refused"] == 1
        assert shop.suppressed() == {}
    finally:
        shop.close()


def test_a_421_greeting_retries_without_counting_the_attempt_and_pauses(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.greeting = "421 4.3.2 Service not available, closing transmission channel"
    emails = [f"c{i}@test.example" for i in range(4)]
    shop = shop_for(url, server, emails, pause_after_failures=2, max_attempts=1)
    try:
        report = shop.cycle()
        tried = [e for e in emails if shop.attempts(e)]
        assert len(tried) >= 2  # the two that paused it, and any already on the wire
        for address in tried:
            row = shop.row(address)
            assert (row.status, row.attempts, row.last_code) == ("retry", 0, 421)
            assert [(a.outcome, a.code) for a in shop.attempts(address)] == [("transient", 421)]
        assert {shop.row(e).status for e in emails if e not in tried} <= {"planned"}
        assert server.messages == []
        # the whole server said "not now": that pauses sending, it does not slow down one recipient domain
        paused = report.dispatched.paused
        assert paused is not None and "421 4.3.2 Service not available" in paused
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE
        assert _events(caplog, "domain_throttled") == []

        server.greeting = None
        shop.clock.advance(7 * 3600)
        shop.cycle()
        assert {shop.row(e).status for e in emails} == {"sent"}
        assert len(server.messages) == 4
    finally:
        shop.close()


def test_a_drop_after_the_dot_is_never_resent(url: str, server: RecordingServer) -> None:
    server.on(BAD, Behaviour(drop_after_dot=True))
    shop = shop_for(url, server, [BAD])
    try:
        shop.cycle()
        server.on(BAD, Behaviour())
        for _ in range(3):
            shop.clock.advance(24 * 3600)
            shop.cycle()
        assert shop.row(BAD).status == "uncertain"
        assert len(shop.attempts(BAD)) == 1
        assert len(server.messages) == 1
    finally:
        shop.close()


def test_attempts_run_out_then_failed(url: str, server: RecordingServer) -> None:
    server.on(BAD, Behaviour(rcpt_reply="450 4.2.1 Mailbox busy, try again in 90 seconds"))
    shop = shop_for(url, server, [BAD], max_attempts=3)
    try:
        for n in (1, 2):
            shop.cycle()
            row = shop.row(BAD)
            assert (row.status, row.attempts) == ("retry", n)
            assert (row.next_attempt_at - shop.clock.now()).total_seconds() >= 90
            shop.clock.set(row.next_attempt_at)
        shop.cycle()
        row = shop.row(BAD)
        assert (row.status, row.attempts) == ("failed", 3)
        assert [a.attempt_no for a in shop.attempts(BAD)] == [1, 2, 3]
        assert server.messages == []
    finally:
        shop.close()


def test_connection_failures_in_a_row_pause_the_dispatcher(url: str, server: RecordingServer) -> None:
    emails = [f"c{i}@test.example" for i in range(12)]
    port = server.port
    server.stop_in_thread()  # nobody listens any more: every connection is refused
    settings = make_settings(url, port, smtp={"pool_size": 1}, pause_after_failures=3, in_flight_per_connection=1)
    shop = Shop(url, settings, emails)
    try:
        report = shop.cycle()

        assert report.dispatched.paused is not None
        assert "3 connection failures in a row" in report.dispatched.paused
        statuses = [shop.row(e).status for e in emails]
        assert statuses.count("retry") == 3  # the three that were tried: retried later, not failed
        assert statuses.count("planned") == 9  # the rest was given back untouched
        assert sum(len(shop.attempts(e)) for e in emails) == 3
        assert any("PAUSED" in line for line in running.summary(report))
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE
    finally:
        shop.close()
        server.start_in_thread()  # the fixture stops it again


def test_a_run_whose_every_attempt_met_no_server_says_so_and_exits_3(url: str, server: RecordingServer) -> None:
    # Given a small shop (fewer messages due than sending.pause_after_failures, 20) and an SMTP server nobody
    # listens on: too few failures in a row to pause, so `run --once` from cron said "sent 0, 3 retry" and exit 0
    emails = [f"c{i}@test.example" for i in range(3)]
    port = server.port
    server.stop_in_thread()
    settings = make_settings(url, port, smtp={"pool_size": 1}, in_flight_per_connection=1)
    shop = Shop(url, settings, emails)
    try:
        report = shop.cycle()

        # Then nothing is lost or counted against the messages, the run is not a pause, but it says that not one
        # attempt reached the server, naming it, and exits 3 (the SMTP server cannot be used), as a pause does
        assert report.dispatched.paused is None
        assert {(shop.row(e).status, shop.row(e).attempts) for e in emails} == {("retry", 0)}
        (line,) = [line for line in running.summary(report) if line.startswith("NOT SENT")]
        assert f"127.0.0.1:{port}" in line and "3 attempts got through" in line and "wait in the queue" in line
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE

        # and once the server is back, the next run sends them and exits 0
        server.start_in_thread()
        shop.deps = dataclasses.replace(shop.deps, settings=make_settings(url, server.port, smtp={"pool_size": 1}))
        shop.clock.advance(7 * 3600)
        report = shop.cycle()
        assert {shop.row(e).status for e in emails} == {"sent"}
        assert report.dispatched.unreachable is None
        assert running.exit_code(report) == running.EXIT_OK
    finally:
        shop.close()


def _six_one_at_a_time(url: str, port: int, smtp: dict[str, Any]) -> tuple[list[str], Shop]:
    """Six customers due a win-back, sent over one connection one message at a time, a single attempt allowed
    each: what stops after the first attempt shows."""
    emails = [f"c{i}@test.example" for i in range(6)]
    settings = make_settings(url, port, smtp={"pool_size": 1, **smtp}, in_flight_per_connection=1, max_attempts=1)
    return emails, Shop(url, settings, emails)


def test_a_wrong_smtp_password_pauses_at_once_and_fails_no_one(
    url: str, server: RecordingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server.login = ("shop", "right-password")
    monkeypatch.setenv("KEMBALI_SMTP_PASSWORD", "wrong-password-hunter2")
    caplog.set_level("DEBUG", logger="kembali")  # every event, for the password check (WARNING and up alone, else)
    emails, shop = _six_one_at_a_time(url, server.port, {"username": "shop"})
    try:
        report = shop.cycle()

        # the first refused login pauses the run: the rest is given back untouched, and no one failed,
        # even with a single attempt allowed
        paused = report.dispatched.paused
        assert paused is not None
        assert "535 5.7.8 Authentication credentials invalid" in paused
        assert "smtp.username" in paused and "KEMBALI_SMTP_PASSWORD" in paused
        rows = [shop.row(e) for e in emails]
        tried = [r for r in rows if shop.attempts(r.email)]
        assert [(r.status, r.attempts, r.last_code) for r in tried] == [("retry", 0, 535)]
        assert [r.status for r in rows if r not in tried] == ["planned"] * 5
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE
        assert any(line.startswith("PAUSED") and "535" in line for line in running.summary(report))
        (event,) = _events(caplog, "dispatcher_paused")
        assert "535" in event["reason"]
        assert "wrong-password-hunter2" not in caplog.text + paused

        # the operator fixes the login: everything goes out, once
        server.login = ("shop", "wrong-password-hunter2")
        shop.clock.advance(7 * 3600)
        report = shop.cycle()
        assert report.dispatched.paused is None
        assert {shop.row(e).status for e in emails} == {"sent"}
        assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(emails)
    finally:
        shop.close()


def test_the_log_of_a_hard_bounce_says_the_address_was_suppressed(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a server that says one customer's mailbox does not exist and refuses another's message as too big
    big = "big@test.example"
    server.on(BAD, Behaviour(rcpt_reply="550 5.1.1 <bad@test.example>: User unknown"))
    server.on(big, Behaviour(data_reply="552 5.3.4 Message size exceeds fixed limit"))
    shop = shop_for(url, server, [BAD, big, OK])
    try:
        shop.cycle()
    finally:
        shop.close()

    # Then the log line of the failure says the address went on the suppression list, and the other's does not
    failed = {event["customer"]: event for event in _events(caplog, "email_failed")}
    assert len(failed) == 2
    bounced, refused = (next(e for e in failed.values() if e["code"] == code) for code in (550, 552))
    assert bounced["suppressed"] == "hard_bounce"
    assert "suppressed" not in refused


def test_the_log_of_each_outcome_says_where_the_attempt_stopped_and_when_a_retry_comes(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a server that defers one customer at RCPT TO, refuses another's message at the final dot, and hangs up
    # on a third's right after taking it
    later, refused, gone = "later@test.example", "refused@test.example", "gone@test.example"
    server.on(later, Behaviour(rcpt_reply="451 4.3.0 Temporary lookup failure"))
    server.on(refused, Behaviour(data_reply="552 5.3.4 Message size exceeds fixed limit"))
    server.on(gone, Behaviour(drop_after_dot=True))
    shop = shop_for(url, server, [later, refused, gone, OK])
    try:
        with caplog.at_level("INFO", logger="kembali"):
            shop.cycle()
        due = shop.row(later).next_attempt_at
    finally:
        shop.close()

    # Then each line says at which step of the SMTP exchange it stopped (the uncertain one: waiting for the reply to
    # the final dot, so the server may have it), and the deferred one when it is tried again, as the ledger has it
    (deferred,) = _events(caplog, "email_deferred")
    (failed,) = _events(caplog, "email_failed")
    (uncertain,) = _events(caplog, "email_uncertain")
    assert (deferred["stage"], deferred["code"]) == ("rcpt", 451)
    assert datetime.fromisoformat(deferred["retry_at"]) == due
    assert (failed["stage"], failed["code"], uncertain["stage"]) == ("reply", 552, "reply")
    assert "retry_at" not in failed and "retry_at" not in uncertain


def test_a_limit_of_messages_per_connection_costs_no_message_an_attempt(url: str, server: RecordingServer) -> None:
    # Given a server that takes two messages a connection, then answers MAIL FROM with a 421 and hangs up (Exim's
    # smtp_accept_max_per_connection), and six customers due over one connection
    server.messages_per_connection = 2
    emails, shop = _six_one_at_a_time(url, server.port, {})
    try:
        report = shop.cycle()

        # Then each is sent on the first try, its one attempt row a send: the 421s were the connection's, not theirs
        assert report.dispatched.outcomes == {"sent": 6}
        for email in emails:
            assert (shop.row(email).status, shop.row(email).attempts) == ("sent", 1)
            assert [(a.outcome, a.code) for a in shop.attempts(email)] == [("sent", 250)]
        assert server.connections == 3
    finally:
        shop.close()


def test_a_temporary_refusal_of_the_login_pauses_without_blaming_the_password(
    url: str, server: RecordingServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a relay whose login service is down for now (or that saw too many logins): every login gets a 454
    server.login = ("shop", "another-password")
    server.login_refusal = "454 4.7.0 Temporary authentication failure"
    monkeypatch.setenv("KEMBALI_SMTP_PASSWORD", "right-password")
    emails, shop = _six_one_at_a_time(url, server.port, {"username": "shop"})
    try:
        report = shop.cycle()

        # Then the run pauses at once (each login would meet it), fails no one, and says it is the server's for now,
        # not a password to check
        paused = report.dispatched.paused
        assert paused is not None and "454 4.7.0 Temporary authentication failure" in paused
        assert "temporary" in paused and "not a wrong password" in paused
        assert "check smtp.username" not in paused
        rows = [shop.row(e) for e in emails]
        assert sorted(r.status for r in rows) == ["planned"] * 5 + ["retry"]
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE
        (event,) = _events(caplog, "dispatcher_paused")
        assert event["reason"] == paused
    finally:
        shop.close()


def test_pauses_in_a_row_are_counted_until_a_send_gets_past_the_connection(
    url: str, server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what the daemon's wait after a pause doubles with (see worker.daemon), over one dispatcher's runs
    server.login = ("shop", "right-password")
    monkeypatch.setenv("KEMBALI_SMTP_PASSWORD", "wrong-password")
    emails = [f"c{i}@test.example" for i in range(3)]
    settings = make_settings(url, server.port, smtp={"pool_size": 1, "username": "shop"}, in_flight_per_connection=1)
    shop = Shop(url, settings, emails)

    async def runs() -> list[tuple[int, str | None]]:
        plan(shop.store, settings, shop.clock.now())
        astore = AsyncStore(shop.store)
        transport = shop.deps.transport()
        dispatcher = shop.deps.dispatcher(astore, transport)
        seen = []
        try:
            for login_fixed in (False, False, True):
                if login_fixed:
                    server.login = ("shop", "wrong-password")
                report = await dispatcher.run_once()
                seen.append((dispatcher.pauses_in_row, report.paused))
                dispatcher.resume("the test tries again")
                shop.clock.advance(3600)
        finally:
            dispatcher.close()
            await transport.close()
            astore.close()
        return seen

    try:
        (one, two, fixed) = asyncio.run(runs())
        assert one[0] == 1 and one[1] is not None and "535" in one[1]
        assert two[0] == 2 and two[1] is not None
        assert fixed == (0, None)
        assert {shop.row(e).status for e in emails} == {"sent"}
    finally:
        shop.close()


def test_a_554_greeting_pauses_after_the_failures_in_a_row_and_fails_no_one(url: str, server: RecordingServer) -> None:
    server.greeting = "554 5.7.1 No SMTP service here"
    emails = [f"c{i}@test.example" for i in range(6)]
    settings = make_settings(url, server.port, smtp={"pool_size": 1}, pause_after_failures=3,
                             in_flight_per_connection=1, max_attempts=1)  # fmt: skip
    shop = Shop(url, settings, emails)
    try:
        report = shop.cycle()

        paused = report.dispatched.paused
        assert paused is not None
        assert "3 connection failures in a row" in paused and "554 5.7.1 No SMTP service here" in paused
        rows = [shop.row(e) for e in emails]
        tried = [("retry", 0, 554)] * 3  # refused at the greeting: back to the queue, the attempt not counted
        assert sorted((r.status, r.attempts, r.last_code) for r in rows) == [("planned", 0, None)] * 3 + tried
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE

        server.greeting = None
        shop.clock.advance(7 * 3600)
        shop.cycle()
        assert {shop.row(e).status for e in emails} == {"sent"}
        assert all(n == 1 for n in message_ids(server.messages).values())
    finally:
        shop.close()


def test_a_run_that_finds_a_dead_workers_sends_uncertain_says_so_and_exits_1(url: str, server: RecordingServer) -> None:
    emails = [f"c{i}@test.example" for i in range(3)]
    shop = shop_for(url, server, emails)
    try:
        # a worker claimed one row, marked it sending, and died
        plan(shop.store, shop.deps.settings, shop.clock.now())
        (row,) = shop.store.claim(worker="dead", now=shop.clock.now(), limit=1, lease_seconds=60)
        shop.store.mark_sending([row.id], worker="dead", now=shop.clock.now())
        shop.clock.advance(seconds=61)
        report = shop.cycle()
        assert report.uncertain == 1 and report.dispatched.outcomes == {"sent": 2}
        assert any("1 message became uncertain" in line for line in running.summary(report))
        assert running.exit_code(report) == running.EXIT_ATTENTION  # done, but something needs the operator
    finally:
        shop.close()


def test_the_daily_quota_leaves_the_rest_for_tomorrow(url: str, server: RecordingServer) -> None:
    emails = [f"c{i}@test.example" for i in range(7)]
    shop = shop_for(url, server, emails, daily_quota=3)
    try:
        report = shop.cycle()
        assert report.dispatched.outcomes["sent"] == 3
        assert report.dispatched.quota_reached
        waiting = [shop.row(e) for e in emails if shop.row(e).status == "planned"]
        assert len(waiting) == 4
        # NOW is 10:00 in Jakarta: the quota resets at the next local midnight (17:00 UTC)
        assert {w.next_attempt_at.isoformat() for w in waiting} == {"2026-11-22T17:00:00+00:00"}
        assert all(shop.attempts(w.email) == [] for w in waiting)

        shop.cycle()  # same day: nothing more
        assert len(server.messages) == 3

        shop.clock.advance(24 * 3600)
        shop.cycle()
        assert len(server.messages) == 6  # three more the next day
        assert all(n == 1 for n in message_ids(server.messages).values())
    finally:
        shop.close()


def test_a_daemons_dispatcher_sends_its_full_quota_on_the_day_after_the_quota_ran_out(
    url: str, server: RecordingServer
) -> None:
    # Given 8 customers due a win-back, a daily quota of 3, batches of 2, and one dispatcher kept from day to day
    # (as `kembali run` keeps it)
    emails = [f"c{i}@test.example" for i in range(8)]
    shop = shop_for(url, server, emails, daily_quota=3, batch_size=2, compose_processes=0)
    plan(shop.store, shop.deps.settings, shop.clock.now())
    astore = AsyncStore(shop.store)

    async def two_days() -> tuple[Any, Any]:
        transport = shop.deps.transport()
        dispatcher = shop.deps.dispatcher(astore, transport)
        try:
            first = await dispatcher.run_once()
            # When the next local day comes
            shop.clock.advance(24 * 3600)
            return first, await dispatcher.run_once()
        finally:
            await transport.close()

    try:
        first, second = asyncio.run(asyncio.wait_for(two_days(), timeout=60))
        # Then the first day sends 3 and leaves the rest for the next, and the next day's run sends its 3 too (not
        # one batch, taking yesterday's quota for today's); the other two wait
        assert (first.outcomes["sent"], first.quota_reached) == (3, True)
        assert (second.outcomes["sent"], second.quota_reached) == (3, True)
        assert len(server.messages) == 6
        assert sorted(shop.row(e).status for e in emails) == ["planned"] * 2 + ["sent"] * 6
    finally:
        astore.close()
        shop.close()


def test_starttls_required_but_not_offered_sends_nothing(url: str, server: RecordingServer) -> None:
    settings = make_settings(url, server.port, smtp={"tls": "starttls"})
    shop = Shop(url, settings, [OK])
    try:
        shop.cycle()
        row = shop.row(OK)
        assert (row.status, row.last_error) == ("retry", "StartTLSNotOffered")
        assert "does not offer STARTTLS" in row.last_reply
        assert server.messages == []
    finally:
        shop.close()


def test_an_untrusted_certificate_fails_the_connection_clearly(url: str, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tls_server = RecordingServer(tls_context=context)
    tls_server.start_in_thread()
    try:
        shop = Shop(url, make_settings(url, tls_server.port, smtp={"tls": "starttls"}), [OK])
        try:
            shop.cycle()
            row = shop.row(OK)
        finally:
            shop.close()
    finally:
        tls_server.stop_in_thread()
    assert row.status == "retry"
    assert "CERTIFICATE_VERIFY_FAILED" in row.last_reply
    assert "self-signed certificate" in row.last_reply
    assert tls_server.messages == []


@dataclass(frozen=True)
class SetupCase:
    """An SMTP setup that fails every message alike."""

    name: str
    smtp: dict[str, Any]
    server: str
    """``plain`` (the fixture), ``starttls`` or ``tls`` (implicit): a server with a self-signed certificate."""
    setting: str
    """What the pause reason names to fix."""
    says: str
    cert_for: str = "localhost"
    trusted: bool = False
    """The certificate is in SSL_CERT_FILE (so only its host name can fail)."""


SETUP_CASES = [
    SetupCase("STARTTLS not offered", {"tls": "starttls"}, "plain", "smtp.tls", "does not offer STARTTLS"),
    SetupCase("a username but no AUTH offered", {"username": "shop"}, "plain", "smtp.username", "offers no AUTH"),
    SetupCase("implicit TLS against a plaintext port", {"tls": "tls"}, "plain", "smtp.tls", "answered in plain text"),
    SetupCase("a self-signed certificate after STARTTLS", {"tls": "starttls"}, "starttls", "certificates",
              "self-signed certificate"),
    SetupCase("a self-signed certificate over implicit TLS", {"tls": "tls"}, "tls", "certificates",
              "self-signed certificate"),
    SetupCase("a certificate for another host", {"tls": "tls"}, "tls", "smtp.host",
              "is not valid for smtp.host '127.0.0.1'", cert_for="mail.elsewhere.invalid", trusted=True),
]  # fmt: skip


@pytest.mark.parametrize("case", SETUP_CASES, ids=lambda c: c.name)
def test_a_setup_that_cannot_work_pauses_at_once_naming_what_to_fix(
    url: str,
    server: RecordingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    case: SetupCase,
) -> None:
    monkeypatch.setenv("KEMBALI_SMTP_PASSWORD", "hunter2-secret")
    caplog.set_level("DEBUG", logger="kembali")  # every event, for the password check (WARNING and up alone, else)
    target = server
    if case.server != "plain":
        cert, key = _self_signed(tmp_path, case.cert_for)
        if case.trusted:
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        target = _tls_server(cert, key, implicit=case.server == "tls")
    # the default sending.pause_after_failures (20)
    emails, shop = _six_one_at_a_time(url, target.port, case.smtp)
    try:
        report = shop.cycle()

        # one attempt paused the run, and the reason says what to fix, where
        paused = report.dispatched.paused
        assert paused is not None
        assert f"an SMTP setup problem ({case.setting})" in paused
        assert f"127.0.0.1:{target.port}" in paused and case.says in paused
        assert sum(len(shop.attempts(e)) for e in emails) == 1
        # nothing lost, no one failed: the tried row waits for a retry with its attempt not counted, the rest
        # went back to the queue untouched
        rows = sorted((shop.row(e).status, shop.row(e).attempts) for e in emails)
        assert rows == [("planned", 0)] * 5 + [("retry", 0)]
        assert target.messages == []
        # what the operator sees: the log event, `run --once`'s summary and exit code; never the password
        (event,) = _events(caplog, "dispatcher_paused")
        assert (event["reason"], event["setting"]) == (paused, case.setting)
        assert any(line.startswith("PAUSED") and case.setting in line for line in running.summary(report))
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE
        assert "hunter2" not in caplog.text + paused
    finally:
        shop.close()
        if target is not server:
            target.stop_in_thread()


def test_a_slow_domain_does_not_hold_every_sender_while_other_domains_wait(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 12 customers at a domain allowed one message every 10 s (a slow provider's own limit, or one a
    # throttling reply halved down to it), claimed ahead of 4 customers at another domain, and 8 senders
    slow = [f"s{i}@slow.example" for i in range(12)]
    others = [f"o{i}@other.example" for i in range(4)]
    shop = shop_for(url, server, slow + others, compose_processes=0,
                    domains={"slow.example": {"rate_per_second": 0.1, "burst": 1}})  # fmt: skip
    try:
        # When the run sends what is due (on a fake clock: every wait is a jump of its time)
        with caplog.at_level("INFO", logger="kembali"):
            report = shop.cycle()

        # Then the other domain's customers go out at once, not after the slow domain's backlog
        for address in others:
            row = shop.row(address)
            assert row.status == "sent"
            assert (row.sent_at.replace(tzinfo=UTC) - NOW).total_seconds() < 5, address
        # and the slow domain's messages that would have waited longer for its slot waited for it in the ledger (no
        # attempt counted), the run claiming them again as they came due: all sent in this run, 10 s apart
        rows = [shop.row(a) for a in slow]
        assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}
        times = sorted(r.sent_at.replace(tzinfo=UTC) for r in rows)
        assert all((b - a).total_seconds() >= 10 - 1e-3 for a, b in itertools.pairwise(times))
        deferred = report.dispatched.rate_waits["slow.example"]
        assert deferred >= len(slow) - 2 and report.dispatched.outcomes == {"sent": len(slow) + len(others)}
        told = _events(caplog, "email_waits_for_domain_rate")
        assert len(told) == deferred and {e["domain"] for e in told} == {"slow.example"}
    finally:
        shop.close()


def test_a_message_that_waited_for_its_domains_rate_then_went_is_counted_once_in_the_runs_summary(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 5 customers at a domain allowed one message every 20 s, and one at another domain whose server greylists
    # the first try (due again a minute later)
    slow = [f"s{i}@slow.example" for i in range(5)]
    other = "o0@other.example"
    server.on(other, Behaviour(greylist=True))
    shop = shop_for(url, server, [*slow, other], compose_processes=0,
                    domains={"slow.example": {"rate_per_second": 0.05, "burst": 1}})  # fmt: skip
    try:
        # When the run sends what is due, 4 of the slow domain's messages waiting in the ledger for their slot and
        # the greylisted one for its retry, each claimed again and sent in this run
        with caplog.at_level("INFO", logger="kembali"):
            report = shop.cycle()
        assert {shop.row(a).status for a in [*slow, other]} == {"sent"}
        assert len(_events(caplog, "email_waits_for_domain_rate")) == 4

        # Then the summary tells what became of each of the 6 messages once: sent, not also "deferred" or "retry"
        assert report.dispatched.outcomes == {"sent": 6}
        lines = running.summary(report)
        assert "sent 6 win-back emails" in lines
        # and the waits for the slow domain's rate are told as such, naming the domain
        assert any(line.startswith("4 messages waited in the queue for a slot of their recipient domain's rate")
                   and "slow.example" in line for line in lines), lines
    finally:
        shop.close()


def test_a_run_fits_what_waits_for_a_slow_domain_between_what_an_earlier_run_left_waiting_for_it(
    url: str, server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Given 15 customers at a domain allowed one message every 10 s: 10 of their messages left waiting in the ledger
    # for its slots by an earlier run (a process since ended: a daemon restarted, a cron's run --once), 10 s apart,
    # and 5 due now
    slow = [f"s{i}@slow.example" for i in range(15)]
    shop = shop_for(url, server, slow, compose_processes=0,
                    domains={"slow.example": {"rate_per_second": 0.1, "burst": 1}})  # fmt: skip
    plan(shop.store, shop.settings, NOW)
    with shop.store.engine.begin() as conn:
        for n, address in enumerate(slow[:10]):
            later = NOW + timedelta(seconds=10 * (n + 1))
            conn.execute(sa.update(M).where(M.c.email == address).values(next_attempt_at=later))
    try:
        # When a new run sends what is due (on a fake clock: every wait is a jump of its time)
        with caplog.at_level("INFO", logger="kembali"):
            shop.cycle()

        # Then all go, 10 s apart, and each of the 4 new ones that must wait is told a slot none of the others has:
        # it waits once, where it was told the slots of those already waiting and sent back again and again
        assert {shop.row(a).status for a in slow} == {"sent"}
        times = sorted(shop.row(a).sent_at for a in slow)
        assert all((b - a).total_seconds() >= 10 - 1e-3 for a, b in itertools.pairwise(times))
        waits = Counter(e["dedupe_key"] for e in _events(caplog, "email_waits_for_domain_rate"))
        assert sorted(waits.values()) == [1] * 4, waits
    finally:
        shop.close()


def test_a_message_to_another_domain_coming_due_while_the_run_waits_for_a_slow_domain_goes_at_the_next_poll(
    url: str, server: RecordingServer
) -> None:
    # Given two customers at a domain allowed one message every 500 s, and one at another domain whose server
    # greylists the first try (due again a minute later)
    slow = ["s0@slow.example", "s1@slow.example"]
    other = "o0@other.example"
    server.on(other, Behaviour(greylist=True))
    shop = shop_for(url, server, [*slow, other], compose_processes=0,
                    domains={"slow.example": {"rate_per_second": 0.002, "burst": 1}})  # fmt: skip
    try:
        # When the run sends what is due, the second slow message waiting 500 s in the ledger for its slot (on a
        # fake clock: every wait is a jump of its time)
        shop.cycle()

        # Then the greylisted message went again once due (within a poll of the daemon's), not when the slow
        # domain's next slot came: the run's wait for that slot does not hold back the other domains' due messages
        row = shop.row(other)
        assert (row.status, row.attempts) == ("sent", 2)
        retried = shop.attempts(other)[0].finished_at.replace(tzinfo=UTC)
        assert (row.sent_at.replace(tzinfo=UTC) - retried).total_seconds() < 100
        assert {shop.row(a).status for a in slow} == {"sent"}
    finally:
        shop.close()


def test_a_run_waiting_for_a_slow_domain_reads_the_catalogue_again_for_what_it_claims_later(
    url: str, server: RecordingServer
) -> None:
    # Given two customers at a domain allowed one message every 500 s, and a product announced to launch 100 s
    # after the run begins
    slow = ["s0@slow.example", "s1@slow.example"]
    shop = shop_for(url, server, slow, compose_processes=0,
                    domains={"slow.example": {"rate_per_second": 0.002, "burst": 1}})  # fmt: skip
    launched = NOW + timedelta(seconds=100)
    new = ProductRecord("P-2", "Kopi Baru Toraja", "kopi", 95_000_00, "IDR", "https://shop.example/p/2", "", launched,
                        True)  # fmt: skip
    upsert_products(shop.store.engine, [new], NOW)
    try:
        # When the run sends both, the second 500 s later (on a fake clock: every wait is a jump of its time)
        shop.cycle()

        # Then the first email could not show the product, and the second, sent after its launch, may: the run read
        # the catalogue again for what it claimed after its wait, as a new run would (not the one of its start)
        bodies = {m.rcpt_tos: _text(m.data) for m in server.messages}
        first, second = sorted(slow, key=lambda a: shop.row(a).sent_at)
        assert shop.row(second).sent_at.replace(tzinfo=UTC) >= launched
        assert "Kopi Baru Toraja" not in bodies[(first,)]
        assert "Kopi Baru Toraja" in bodies[(second,)]
    finally:
        shop.close()


class _ShopChangesAt(FakeClock):
    """A fake clock on which ``change`` runs once, when a wait takes the time past ``at`` (an import landing while
    the run waits for its rate)."""

    def __init__(self, at: datetime, change: Callable[[], None]) -> None:
        super().__init__(NOW)
        self.at, self.change = at, change

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds)
        if self.change is not None and self.now() >= self.at:
            change, self.change = self.change, None
            change()


def test_a_product_unpublished_while_a_long_run_sends_is_in_no_email_it_claims_minutes_later(
    url: str, server: RecordingServer
) -> None:
    # Given customers due a win-back, a second coffee on sale that their emails recommend, and a global rate of one
    # message every 100 s (a long run: a backlog of a day's mail at the relay's pace)
    emails = [f"c{i}@test.example" for i in range(8)]
    settings = make_settings(url, server.port, compose_processes=0, rate_per_second=0.01, burst=1, batch_size=1,
                             in_flight_per_connection=1, smtp={"pool_size": 1})  # fmt: skip
    toraja = ProductRecord("P-2", "Kopi Toraja Sapan", "kopi", 95_000_00, "IDR", "https://shop.example/p/2", "", None,
                           True)  # fmt: skip
    shop = None

    def unpublish() -> None:  # a products import marks it no longer sold, 150 s into the run
        assert shop is not None
        upsert_products(shop.store.engine, [dataclasses.replace(toraja, active=False)], NOW)

    clock = _ShopChangesAt(NOW + timedelta(seconds=150), unpublish)
    shop = Shop(url, settings, emails, clock=clock)
    upsert_products(shop.store.engine, [toraja], NOW)
    try:
        # When one run sends them all, the last some 700 s after it began (each wait a jump of the fake clock)
        shop.cycle()

        # Then the first email recommended it, and the emails claimed well after the import show it no more
        order = sorted(emails, key=lambda a: shop.row(a).sent_at)
        bodies = {m.rcpt_tos[0]: _text(m.data) for m in server.messages}
        assert len(bodies) == len(emails)
        assert "Kopi Toraja Sapan" in bodies[order[0]]
        assert [a for a in order[-3:] if "Kopi Toraja Sapan" in bodies[a]] == []
    finally:
        shop.close()


def _text(data: bytes) -> str:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    return "\n".join(str(part.get_content()) for part in parsed.walk() if part.get_content_maintype() == "text")

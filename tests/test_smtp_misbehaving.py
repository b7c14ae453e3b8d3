"""Servers that misbehave in ways the recording server's behaviours do not cover (replies with bytes that are
not UTF-8 or a NUL, a refused EHLO, a hang-up after the banner), against the real Dispatcher and a real ledger."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from tests.sendkit import (
    REPO,
    Shop,
    ledger,
    make_settings,
    message_ids,
    prepare_database,
    settings_dict,
    subprocess_env,
    write_config,
)
from tests.smtp_server import Behaviour, RecordingServer, _FaultySMTP, _hang_up, closed_port, make_message
from worker.adapters.smtp import SmtpTransport
from worker.commands import running
from worker.domain import Outcome, SendResult

BAD, OK = "bad@test.example", "ok@test.example"


class _RawSMTP(_FaultySMTP):
    """Answers RCPT TO or the final dot for ``BAD`` with the owner's raw bytes, as they are; refuses HELO as
    told; hangs up after the greeting when told."""

    _owner: OddServer

    async def _handle_client(self) -> None:
        if not self._owner.hang_up_after_greeting:
            await super()._handle_client()
            return
        await self.push("220 mx.test.example ESMTP")
        _hang_up(self)

    def _dropped(self) -> bool:
        """Whether the flow was dropped on the way while idle: a command never reaches the server."""
        idle = self._owner.dropped_after_idle
        done = getattr(self, "_done_at", None)
        return idle is not None and done is not None and time.monotonic() - done > idle

    async def smtp_MAIL(self, arg: str) -> None:
        if self._owner.mail_reply is not None:
            await self.push(self._owner.mail_reply)
        elif not self._dropped():
            await super().smtp_MAIL(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        if not self._dropped():
            await super().smtp_QUIT(arg)
        else:
            self._owner.quits_dropped += 1

    async def smtp_HELO(self, hostname: str) -> None:
        if self._owner.helo_reply is None:
            await super().smtp_HELO(hostname)
            return
        await self.push(self._owner.helo_reply)

    async def smtp_RCPT(self, arg: str) -> None:  # aiosmtpd's command hook names
        raw = self._owner.raw_rcpt
        if raw is None or BAD not in arg:
            await super().smtp_RCPT(arg)
            return
        self._writer.write(raw)
        await self._writer.drain()

    async def smtp_DATA(self, arg: str) -> None:
        raw = self._owner.raw_dot
        if raw is None or self.envelope is None or BAD not in self.envelope.rcpt_tos:
            await super().smtp_DATA(arg)
            self._done_at = time.monotonic()
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        while await self._reader.readuntil(b"\r\n") != b".\r\n":
            pass
        self._writer.write(raw)
        await self._writer.drain()
        self.envelope = self._create_envelope()


class OddServer(RecordingServer):
    """A recording server that can answer ``BAD``'s RCPT TO (``raw_rcpt``) or final dot (``raw_dot``) with
    raw bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_rcpt: bytes | None = None
        self.raw_dot: bytes | None = None
        self.helo_reply: str | None = None
        """When set, every HELO gets this reply (with ``ehlo_reply``: a server that will not be greeted)."""
        self.hang_up_after_greeting = False
        self.mail_reply: str | None = None
        """When set, every MAIL FROM gets this reply."""
        self.dropped_after_idle: float | None = None
        """When set, a connection idle this many seconds after a message answers nothing more, as one a NAT or
        firewall dropped while it sat idle (without a reset): new connections work."""
        self.quits_dropped = 0
        """QUITs that came on such a dropped connection (a real one would never get them, nor answer)."""

    def _smtp(self, handler: Any, **kwargs: Any) -> SMTP:
        return _RawSMTP(self, handler, tls_context=self._tls_context, **kwargs)


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")


@pytest.fixture
def server() -> Iterator[OddServer]:
    server = OddServer()
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()


@pytest.mark.parametrize(
    ("stage", "raw", "status", "code", "words"),
    [
        ("rcpt", b"550 5.1.1 Benutzer \xfcnbekannt\r\n", "failed", 550, "Benutzer \ufffdnbekannt"),
        ("dot", b"554 5.7.1 Inhalt abgelehnt \xff\xfe\r\n", "failed", 554, "Inhalt abgelehnt \ufffd\ufffd"),
        ("dot", b"250 2.0.0 queued as \xe9\x00X1\r\n", "sent", 250, "queued as \ufffd\ufffdX1"),
        ("rcpt", b"452-4.2.2 \xc0ber\r\n452 4.2.2 \x00voll\r\n", "retry", 452, "\ufffdber\n4.2.2 \ufffdvoll"),
    ],
    ids=["550 latin-1 at RCPT", "554 bad bytes after the dot", "250 with a NUL after the dot", "452 multi-line"],
)
def test_a_reply_that_is_not_utf8_or_holds_a_nul_is_recorded_and_the_run_goes_on(
    db_url: str, server: OddServer, stage: str, raw: bytes, status: str, code: int, words: str
) -> None:
    setattr(server, f"raw_{stage}", raw)
    shop = Shop(db_url, make_settings(db_url, server.port, smtp={"timeout_seconds": 1.0}), [BAD, OK])
    try:
        report = shop.cycle()

        bad = shop.row(BAD)
        (attempt,) = shop.attempts(BAD)
        assert (bad.status, bad.last_code, attempt.code) == (status, code, code)
        assert words in attempt.reply
        assert shop.row(OK).status == "sent"
        assert report.dispatched.outcomes["sent"] == 1 + (status == "sent")
        assert all(n == 1 for n in message_ids(server.messages).values())
    finally:
        shop.close()


@pytest.mark.parametrize("refusal", ["ehlo", "hang up"], ids=["EHLO and HELO refused", "hang-up after the greeting"])
def test_a_server_that_will_not_be_greeted_pauses_after_the_failures_in_a_row_and_fails_no_one(
    sqlite_url: str, server: OddServer, refusal: str
) -> None:
    # a relay that refuses this host at EHLO (its name, its IP on a list), or drops every connection after
    # its banner: nothing about any message has been said, as with a refused greeting
    if refusal == "ehlo":
        server.ehlo_reply = server.helo_reply = "554 5.7.1 <kembali.test>: Helo command rejected: Access denied"
    else:
        server.hang_up_after_greeting = True
    emails = [f"c{i}@test.example" for i in range(6)]
    settings = make_settings(sqlite_url, server.port, smtp={"pool_size": 1, "timeout_seconds": 1.0},
                             pause_after_failures=3, in_flight_per_connection=1, max_attempts=1)  # fmt: skip
    shop = Shop(sqlite_url, settings, emails)
    try:
        report = shop.cycle()

        paused = report.dispatched.paused
        assert paused is not None and "3 connection failures in a row" in paused
        rows = sorted((shop.row(e).status, shop.row(e).attempts) for e in emails)
        assert rows == [("planned", 0)] * 3 + [("retry", 0)] * 3  # back to the queue, the attempt not counted
        assert shop.suppressed() == {}
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE

        server.ehlo_reply = server.helo_reply = None
        server.hang_up_after_greeting = False
        shop.clock.advance(7 * 3600)
        shop.cycle()
        assert {shop.row(e).status for e in emails} == {"sent"}
        assert all(n == 1 for n in message_ids(server.messages).values())
    finally:
        shop.close()


def test_a_connection_idle_longer_than_the_reuse_limit_is_replaced_not_trusted(server: OddServer) -> None:
    # a NAT or firewall between the worker and its relay (Azure's load balancer after 4 minutes) forgets an idle
    # flow without a word: a command on it gets no reply, ever
    server.dropped_after_idle = 0.25

    async def main() -> list[SendResult]:
        async with SmtpTransport(server.settings(pool_size=1, timeout_seconds=1.0)) as transport:
            transport.IDLE_REUSE_SECONDS = 0.2
            first = await transport.send("shop@test.example", "a@test.example", make_message(1))
            await asyncio.sleep(0.35)  # idle past the limit between two runs of the daemon
            second = await transport.send("shop@test.example", "b@test.example", make_message(2))
            third = await transport.send("shop@test.example", "c@test.example", make_message(3))  # right after
            return [first, second, third]

    results = asyncio.run(main())

    # the second message went out on a new connection, at once, instead of timing out at MAIL FROM (an attempt
    # counted against it, and a retry); the third, right after it, on the same connection
    assert [(r.outcome, r.stage) for r in results] == [(Outcome.SENT, "reply")] * 3
    assert [m.rcpt_tos for m in server.messages] == [(f"{x}@test.example",) for x in "abc"]
    assert server.connections == 2


def test_closing_a_pool_of_connections_dropped_while_idle_does_not_wait_for_their_replies(server: OddServer) -> None:
    # the daemon's shutdown or reload after a quiet spell behind such a NAT: a QUIT on each dead connection, one
    # after the other, each waiting timeout_seconds for a reply that never comes, would hold the stop for the
    # whole pool (4 x 30 s by default, past systemd's 90 s)
    server.dropped_after_idle = 0.2

    async def main() -> None:
        # a minute's timeout: a close that waited for a reply to QUIT could not pass for one that did not
        transport = SmtpTransport(server.settings(pool_size=3, timeout_seconds=60.0))
        transport.IDLE_REUSE_SECONDS = 0.2
        results = await asyncio.gather(
            *(transport.send("shop@test.example", f"{x}@test.example", make_message(i)) for i, x in enumerate("abc"))
        )
        assert [r.outcome for r in results] == [Outcome.SENT] * 3
        await asyncio.sleep(0.3)  # idle past IDLE_REUSE_SECONDS and the server's drop
        await asyncio.wait_for(transport.close(), 20)

    asyncio.run(main())
    # Then the three connections were closed without a QUIT (which would wait for a reply that never comes)
    assert server.connections == 3
    assert server.quits_dropped == 0


def test_run_once_prints_a_servers_reply_with_its_control_characters_escaped(tmp_path: Path, server: OddServer) -> None:
    # Given a server whose refusal holds terminal escapes (retitle the window, clear the screen)
    server.greeting = "554 5.7.1 \x1b]0;owned\x07\x1b[2J go away"
    url = f"sqlite:///{tmp_path / 'kembali.db'}"
    prepare_database(url, 3)
    config = write_config(tmp_path / "config.toml", settings_dict(url, server.port, pause_after_failures=2))

    done = subprocess.run([sys.executable, "-m", "worker", "--config", str(config), "run", "--once"], cwd=REPO,
                          env=subprocess_env(), capture_output=True, timeout=60, check=False)  # fmt: skip

    # Then the summary that quotes it (the pause's reason) shows them escaped, as the logs do
    assert done.returncode == 3, done.stdout + done.stderr
    assert b"PAUSED" in done.stdout and b"go away" in done.stdout
    assert b"\x1b" not in done.stdout + done.stderr and b"\x07" not in done.stdout + done.stderr
    assert b"\\u001b]0;owned\\u0007\\u001b[2J go away" in done.stdout


def test_run_once_from_cron_says_when_no_attempt_got_through_to_the_smtp_server(tmp_path: Path) -> None:
    # Given a shop with two customers due, and an smtp.port nobody listens on (a typo, the relay down)
    url = f"sqlite:///{tmp_path / 'kembali.db'}"
    prepare_database(url, 2)
    port = closed_port()
    raw = settings_dict(url, port)
    raw["policy"] = {"quiet_hours_start": "00:00", "quiet_hours_end": "00:00"}  # any hour the test runs at
    config = write_config(tmp_path / "config.toml", raw)

    # When cron runs it, asking for warnings only
    argv = [sys.executable, "-m", "worker", "--config", str(config), "run", "--once", "--log-level", "warning"]
    done = subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, timeout=60, check=False)

    # Then it does not end 0 in silence: exit 3, the summary and an error event name the server; nothing is lost
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"NOT SENT: not one of this run's 2 attempts got through to the SMTP server 127.0.0.1:{port}".encode() in (
        done.stdout
    )
    assert b"smtp_unreachable" in done.stderr and f"127.0.0.1:{port}".encode() in done.stderr
    assert {row.status for row in ledger(url).values()} == {"retry"}


def _one_at_a_time(url: str, server: OddServer, emails: list[str], **sending: Any) -> Shop:
    """A shop whose customers ``emails`` are due a win-back, sending one message at a time through ``server``."""
    settings = make_settings(url, server.port, smtp={"pool_size": 1, "timeout_seconds": 1.0},
                             in_flight_per_connection=1, **sending)  # fmt: skip
    return Shop(url, settings, emails)


def _refusing(server: OddServer, emails: list[str], stage: str, reply: str) -> None:
    """Have ``server`` answer ``reply`` (``{to}``: the recipient) at ``stage``: MAIL FROM (``mail``), RCPT TO
    (``rcpt``) or the final dot (``reply``)."""
    if stage == "mail":
        server.mail_reply = reply
    for email in emails:
        answer = reply.format(to=email)
        server.on(email, Behaviour(rcpt_reply=answer if stage == "rcpt" else None,
                                   data_reply=answer if stage == "reply" else None))  # fmt: skip


def _each_sent_once_when_the_server_takes_mail_again(shop: Shop, server: OddServer, emails: list[str]) -> None:
    server.mail_reply = None
    server.behaviours.clear()
    shop.clock.advance(7 * 3600)
    shop.cycle()
    assert {shop.row(e).status for e in emails} == {"sent"}
    assert all(n == 1 for n in message_ids(server.messages).values())


def _paused_at_once_failing_no_one(shop: Shop, server: OddServer, emails: list[str], *words: str) -> None:
    """One cycle against a server that refuses every message alike: the first refusal pauses the run, its reason
    holding each of ``words``; that message goes back to the queue with its attempt not counted, the rest are
    untouched, no one is suppressed, ``run --once`` would exit 3; and once the server takes mail, each is sent
    once."""
    report = shop.cycle()
    paused = report.dispatched.paused
    assert paused is not None and all(word in paused for word in words), paused
    rows = sorted((shop.row(e).status, shop.row(e).attempts) for e in emails)
    assert rows == [("planned", 0)] * 5 + [("retry", 0)]
    assert shop.suppressed() == {}
    assert running.exit_code(report) == running.EXIT_UNAVAILABLE
    _each_sent_once_when_the_server_takes_mail_again(shop, server, emails)


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("mail", "530 5.7.0 Authentication required"),
        ("rcpt", "554 5.7.1 <{to}>: Relay access denied"),
        ("rcpt", "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"),
        ("rcpt", "550 5.7.1 <{to}>... Relaying denied. Proper authentication required."),
    ],
    ids=["530 at MAIL", "Postfix relay access denied", "Exchange unable to relay", "sendmail relaying denied"],
)
def test_a_relay_that_wants_a_login_pauses_at_once_naming_smtp_username_and_fails_no_one(
    sqlite_url: str, server: OddServer, stage: str, reply: str
) -> None:
    # Given the shop's relay, which takes mail only from clients that log in, and smtp.username left empty
    emails = [f"c{i}@test.example" for i in range(6)]
    _refusing(server, emails, stage, reply)
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        # Then the first refusal pauses the run, naming what to fix, and fails no one (before: every message failed
        # for good, as "content_rejected"); once the relay takes the mail, everyone gets theirs, once
        _paused_at_once_failing_no_one(shop, server, emails, "smtp.username", reply.split()[0])
    finally:
        shop.close()


def test_a_relay_that_takes_mail_only_over_tls_pauses_at_once_naming_smtp_tls_not_a_login(
    sqlite_url: str, server: OddServer
) -> None:
    # Given the shop's relay, which takes mail only after STARTTLS (Postfix's smtpd_tls_security_level = encrypt,
    # Gmail on 587), and smtp.tls = "none"
    emails = [f"c{i}@test.example" for i in range(6)]
    _refusing(server, emails, "mail", "530 5.7.0 Must issue a STARTTLS command first")
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        # Then the pause names smtp.tls, where it said "set smtp.username", a login the relay never asked for
        report_words = ("smtp.tls", "530 5.7.0 Must issue a STARTTLS command first", "'starttls'")
        _paused_at_once_failing_no_one(shop, server, emails, *report_words)
    finally:
        shop.close()


SENDER_UNKNOWN = "550 5.1.0 <halo@toko-kembali.example>: Sender address rejected: User unknown in local recipient table"


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("mail", SENDER_UNKNOWN),
        ("mail", "553 5.7.1 <halo@toko-kembali.example>: Sender address rejected: not owned by user shop"),
        # Postfix answers its sender restrictions at RCPT TO (smtpd_delay_reject = yes, the default)
        ("rcpt", SENDER_UNKNOWN),
        ("rcpt", "553 5.7.1 <halo@toko-kembali.example>: Sender address rejected: not owned by user shop"),
        # Microsoft 365 (smtp.office365.com) answers the final dot so when the login may not send as the sender
        ("reply", "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed "
                  "to process message due to a permanent exception with message Cannot submit message."),
        ("reply", "550 5.7.60 SMTP; Client does not have permissions to send as this sender"),
        # Exim's sender verification at RCPT TO: the sender (a noreply@ that takes no mail) does not exist, in the
        # words of a "no such user", or of the sender's own server quoted from its callout
        ("rcpt", "550-Verification failed for <halo@toko-kembali.example>\r\n550-No Such User Here\r\n"
                 "550 Sender verify failed"),
        ("rcpt", "550-Verification failed for <halo@toko-kembali.example>\r\n550-Called:   192.0.2.25\r\n"
                 "550-Sent:     RCPT TO:<halo@toko-kembali.example>\r\n550-Response: 550 5.1.1 "
                 "<halo@toko-kembali.example>: Recipient address rejected: User unknown in local recipient table\r\n"
                 "550 Sender verify failed"),
    ],
    ids=["5.1.0 sender unknown", "sender not owned by the login", "5.1.0 sender unknown at RCPT",
         "sender not owned by the login at RCPT", "Microsoft 365 SendAsDenied", "Microsoft 365 5.7.60",
         "Exim sender verify", "Exim sender verify callout"],
)  # fmt: skip
def test_a_refused_sender_pauses_at_once_naming_shop_from_address_and_suppresses_no_one(
    sqlite_url: str, server: OddServer, stage: str, reply: str
) -> None:
    # Given a relay that refuses the envelope sender, shop.from_address: the same for every message
    emails = [f"c{i}@test.example" for i in range(6)]
    _refusing(server, emails, stage, reply)
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        # Then the first refusal pauses the run naming the setting; no customer is failed or suppressed (before:
        # every message failed, and a 5.1.x about the sender put every customer on the suppression list)
        # (a multi-line reply as it is kept: its code once, then a space)
        _paused_at_once_failing_no_one(shop, server, emails, "shop.from_address", f"{reply[:3]} {reply[4:40]}")
    finally:
        shop.close()


SES_QUOTA = "454 Throttling failure: Daily message quota exceeded."
SES_PAUSED = ("554 Message rejected: Sending paused for this account. For more information, please check the AWS "
              "Management Console.")  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "reply", "setting", "words"),
    [
        ("mail", SES_QUOTA, "sending.daily_quota", "daily sending limit"),
        ("reply", SES_QUOTA, "sending.daily_quota", "daily sending limit"),
        ("mail", "550 5.4.5 Daily user sending quota exceeded.", "sending.daily_quota", "daily sending limit"),
        ("rcpt", "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to "
                 "https://support.google.com/a/answer/166852", "sending.daily_quota", "daily sending limit"),
        ("reply", "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process "
                  "message due to a permanent exception", "sending.daily_quota", "daily sending limit"),
        ("reply", SES_PAUSED, "smtp.username", "paused or suspended"),
        ("mail", "554 Access denied: Sending suspended for this account. For more information, please check the "
                 "inbox of the email address associated with your AWS account.", "smtp.username",
         "paused or suspended"),
    ],
    ids=["SES daily quota at MAIL", "SES daily quota after the dot", "Gmail daily quota at MAIL",
         "Gmail daily quota at RCPT", "Microsoft 365 submission quota", "SES account paused",
         "SES account suspended"],
)  # fmt: skip
def test_the_providers_limit_on_the_whole_account_pauses_at_once_and_fails_no_one(
    sqlite_url: str, server: OddServer, stage: str, reply: str, setting: str, words: str
) -> None:
    # Given a provider that has stopped the account as a whole: its daily sending limit is reached (Amazon SES,
    # Google Workspace, Microsoft 365) or it has paused the account's sending (SES, after too many bounces)
    emails = [f"c{i}@test{i}.example" for i in range(6)]
    _refusing(server, emails, stage, reply)
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        # Then the first refusal pauses the run, saying what happened and naming the setting, and fails no one
        # (before: SES's 454 slowed each recipient domain in turn and was retried every few minutes all day,
        # Gmail's 5.4.5 at RCPT and SES's paused account failed every message of the queue for good)
        _paused_at_once_failing_no_one(shop, server, emails, setting, words, reply[:40])
    finally:
        shop.close()


@pytest.mark.parametrize(
    ("reply", "setting"),
    [
        ("504 5.5.2 <3f2a9c1b7d4e>: Helo command rejected: need fully-qualified hostname", "hostname"),
        ("554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied", "smtp.host"),
    ],
    ids=["non-FQDN EHLO name (a container's)", "client host rejected"],
)
def test_postfixs_refusals_of_this_client_at_rcpt_to_pause_at_once_and_fail_no_one(
    sqlite_url: str, server: OddServer, reply: str, setting: str
) -> None:
    # Given a Postfix relay whose client and HELO rules (answered at RCPT TO, smtpd_delay_reject = yes, the
    # default) refuse this host, e.g. a container whose host name is its id
    emails = [f"c{i}@test.example" for i in range(6)]
    _refusing(server, emails, "rcpt", reply)
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        report = shop.cycle()

        # Then a 5xx pauses the run at once naming what to fix, and no one is failed (before: every message
        # failed for good, as content_rejected or a plain failure)
        rows = sorted((shop.row(e).status, shop.row(e).attempts) for e in emails)
        paused = report.dispatched.paused
        assert paused is not None and setting in paused and reply[:30] in paused, paused
        assert rows == [("planned", 0)] * 5 + [("retry", 0)]
        assert shop.suppressed() == {}
    finally:
        shop.close()


@pytest.mark.parametrize(
    ("stage", "reply"),
    [
        ("mail", "451 4.1.8 Domain of sender address halo@toko-kembali.example does not resolve"),
        ("mail", "421 4.3.2 Shutting down"),
        # Postfix answers its sender and client rules at RCPT TO (smtpd_delay_reject)
        ("rcpt", "450 4.1.8 <halo@toko-kembali.example>: Sender address rejected: Domain not found"),
        ("rcpt", "450 4.7.25 Client host rejected: cannot find your hostname, [127.0.0.1]"),
        # "exceeded storage allocation": Kembali declares no SIZE at MAIL FROM, so no message's size, nor the
        # sender's fault, but the server's room (it paused at once, telling the operator to check shop.from_address)
        ("mail", "552 5.3.4 Message size exceeds fixed limit"),
        ("mail", "552 Requested mail action aborted: exceeded storage allocation"),
    ],
    ids=["4xx at MAIL FROM", "421 at MAIL FROM", "4xx sender rejected at RCPT", "4xx client rejected at RCPT",
         "552 size at MAIL FROM", "552 storage at MAIL FROM"],
)
def test_a_temporary_refusal_of_the_sender_or_client_is_no_messages_failure_and_pauses_after_the_failures_in_a_row(
    sqlite_url: str, server: OddServer, stage: str, reply: str
) -> None:
    # Given a relay that refuses the sender (the same for every message) or this client with a 4xx for a while:
    # the sender domain's DNS down, the relay restarting, this host's reverse DNS not resolving
    emails = [f"c{i}@test.example" for i in range(6)]
    _refusing(server, emails, stage, reply)
    shop = _one_at_a_time(sqlite_url, server, emails, pause_after_failures=3, max_attempts=1)
    try:
        report = shop.cycle()

        # Then no message has an attempt counted (before: with the retries' short first waits, a blip of a few
        # minutes used up every message's attempts and failed the whole queue), and the run pauses after the
        # failures in a row, as for a refused greeting
        paused = report.dispatched.paused
        assert paused is not None and "3 connection failures in a row" in paused and reply[:20] in paused
        assert "shop.from_address" not in paused
        rows = sorted((shop.row(e).status, shop.row(e).attempts) for e in emails)
        assert rows == [("planned", 0)] * 3 + [("retry", 0)] * 3

        _each_sent_once_when_the_server_takes_mail_again(shop, server, emails)
    finally:
        shop.close()


@pytest.mark.parametrize(
    ("stage", "reply", "counted"),
    [
        ("rcpt", "452 4.3.1 Insufficient system storage", 2),
        ("rcpt", "451 4.3.0 <{to}>: Temporary lookup failure", 2),
        ("reply", "451 4.3.0 Error: queue file write error", 2),
        # a 421 ("closing the channel") is never counted, but kept the run going at every message, forever
        ("rcpt", "421 4.3.2 System not accepting network messages", 0),
    ],
    ids=["452 4.3.1 storage at RCPT", "451 4.3.0 lookup failure at RCPT", "451 4.3.0 queue file after the dot",
         "421 at RCPT"],
)  # fmt: skip
def test_the_same_temporary_failure_for_recipients_at_different_domains_is_the_servers_and_pauses(
    sqlite_url: str, server: OddServer, stage: str, reply: str, counted: int
) -> None:
    # Given the shop's relay in trouble (its disk full, its lookup tables down): it answers every message alike
    # with a 4xx once the message is under way, whatever the recipient
    emails = [f"c{i}@d{i}.example" for i in range(8)]
    _refusing(server, emails, stage, reply)
    shop = _one_at_a_time(sqlite_url, server, emails, pause_after_failures=4, max_attempts=3)
    try:
        report = shop.cycle()

        # Then once recipients at three different domains met it in a row it is the server's: the attempt is not
        # counted against the message, and the run pauses after the failures in a row (before: every message's
        # attempt was counted and no pause came, so a relay in trouble for ~15 minutes failed the whole queue)
        paused = report.dispatched.paused
        assert paused is not None and "4 failures in a row, the server's" in paused and reply[:9] in paused, paused
        rows = sorted((shop.row(e).status, shop.row(e).attempts) for e in emails)
        assert rows == [("planned", 0)] * 4 + [("retry", 0)] * (4 - counted) + [("retry", 1)] * counted
        assert shop.suppressed() == {}
        assert running.exit_code(report) == running.EXIT_UNAVAILABLE

        _each_sent_once_when_the_server_takes_mail_again(shop, server, emails)
    finally:
        shop.close()


@pytest.mark.parametrize(
    ("reply", "domains"),
    [
        ("452 4.3.1 Insufficient system storage", 1),
        ("452 4.2.2 <{to}>: Recipient address rejected: Mailbox full", 6),
        ("450 4.7.1 <{to}>: Recipient address rejected: Greylisted, see https://postgrey.schweikert.ch/", 6),
        ("451 4.7.1 Greylisting in action, please come back later", 6),
        ("450 4.1.2 <{to}>: Recipient address rejected: Domain not found", 6),
    ],
    ids=["one domain", "mailbox full", "postgrey", "greylisting", "recipient domain not found"],
)
def test_a_temporary_failure_of_each_recipient_stays_that_messages_and_does_not_pause(
    sqlite_url: str, server: OddServer, reply: str, domains: int
) -> None:
    # Given 4xx replies at RCPT TO that are about each recipient (their mailbox, their domain, greylisting), or
    # all for recipients at one domain
    emails = [f"c{i}@d{i % domains}.example" for i in range(6)]
    _refusing(server, emails, "rcpt", reply)
    shop = _one_at_a_time(sqlite_url, server, emails, pause_after_failures=3, max_attempts=3)
    try:
        report = shop.cycle()

        # Then each message keeps its own temporary failure: the attempt counted, no pause
        assert report.dispatched.paused is None
        assert sorted((shop.row(e).status, shop.row(e).attempts) for e in emails) == [("retry", 1)] * 6
    finally:
        shop.close()


SES_UNVERIFIED = ("554 Message rejected: Email address is not verified. The following identities failed the check "
                  "in region EU-WEST-1: {who}")  # fmt: skip


@pytest.mark.parametrize(
    "who",
    ["Halo@Toko-Kembali.example", "{to}, halo@toko-kembali.example"],
    ids=["the sender", "the sender and the recipient"],
)
def test_amazon_ses_sandbox_refusing_the_unverified_sender_pauses_at_once_and_suppresses_no_one(
    sqlite_url: str, server: OddServer, who: str
) -> None:
    # Given Amazon SES, whose sandbox refuses mail from a sender identity that is not verified (shop.from_address,
    # the same for every message): it answers the final dot
    emails = [f"c{i}@test.example" for i in range(6)]
    _refusing(server, emails, "reply", SES_UNVERIFIED.format(who=who))
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        # Then the first refusal pauses the run naming shop.from_address, and no one is failed (before: every
        # message of the queue failed for good)
        _paused_at_once_failing_no_one(shop, server, emails, "shop.from_address", "not verified")
    finally:
        shop.close()


def test_amazon_ses_sandbox_refusing_an_unverified_recipient_fails_that_message_alone_and_suppresses_no_one(
    sqlite_url: str, server: OddServer
) -> None:
    # Given SES's sandbox, which takes mail only to verified recipients: this customer's address is not verified
    # (an address that holds the sender's, "mahalo@…", is still the recipient's)
    unverified = ["mahalo@toko-kembali.example", "c1@test.example"]
    emails = [*unverified, "c2@test.example", "c3@test.example"]
    _refusing(server, unverified, "reply", SES_UNVERIFIED.format(who="{to}"))
    shop = _one_at_a_time(sqlite_url, server, emails)
    try:
        report = shop.cycle()

        # Then that message fails, the others go out, nothing pauses, and the customer is not put on the
        # suppression list as a hard bounce (the address exists: it is the sandbox's rule)
        assert report.dispatched.paused is None
        assert {e: shop.row(e).status for e in emails} == {
            "mahalo@toko-kembali.example": "failed", "c1@test.example": "failed",
            "c2@test.example": "sent", "c3@test.example": "sent",
        }  # fmt: skip
        assert shop.suppressed() == {}
    finally:
        shop.close()

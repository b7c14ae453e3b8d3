"""SmtpTransport against a real aiosmtpd server on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import subprocess
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.smtp_server import Behaviour, RecordingServer, RelayRate, closed_port, make_message
from worker import eventloop
from worker.adapters.smtp import SmtpTransport, _dot_stuffed, message_size
from worker.config import SmtpSettings
from worker.domain import Outcome, SendResult

R = TypeVar("R")
SENDER = "shop@test.example"
BIG = 16 * 1024 * 1024
"""Bigger than the kernel's socket buffers, so a drop is seen before the dot."""


def run(coro: Coroutine[Any, Any, R]) -> R:
    return asyncio.run(coro)


async def send_one(settings: SmtpSettings, recipient: str, message: bytes | None = None) -> SendResult:
    async with SmtpTransport(settings) as transport:
        return await transport.send(SENDER, recipient, message or make_message())


def test_twenty_messages_over_a_pool_of_two_use_at_most_two_connections(smtp_server: RecordingServer) -> None:
    async def main() -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=2)) as transport:
            return await asyncio.gather(
                *(transport.send(SENDER, f"c{i}@test.example", make_message(i)) for i in range(20))
            )

    results = run(main())

    assert [r.outcome for r in results] == [Outcome.SENT] * 20
    assert all(r.code == 250 and r.reply.startswith("250 2.0.0 Ok: queued as") for r in results)
    assert len(smtp_server.messages) == 20
    assert smtp_server.connections <= 2
    assert {m.rcpt_tos for m in smtp_server.messages} == {(f"c{i}@test.example",) for i in range(20)}


def test_the_message_arrives_intact_with_leading_dots_unstuffed(smtp_server: RecordingServer) -> None:
    message = make_message(7, size=5000)

    result = run(send_one(smtp_server.settings(), "a@test.example", message))

    assert result.outcome is Outcome.SENT
    (received,) = smtp_server.messages
    assert received.mail_from == SENDER
    assert received.data == message


@pytest.mark.parametrize(
    ("message", "received"),
    [
        (
            b".starts with a dot\n.\nbare LF\rbare CR\r\n..two dots",
            b".starts with a dot\r\n.\r\nbare LF\r\nbare CR\r\n..two dots\r\n",
        ),
        (b"Subject: x\r\n\r\nplain CRLF, no final line end", b"Subject: x\r\n\r\nplain CRLF, no final line end\r\n"),
    ],
    ids=["dots and bare line ends", "clean CRLF"],
)
def test_line_ends_are_normalised_and_dots_survive(
    smtp_server: RecordingServer, message: bytes, received: bytes
) -> None:
    result = run(send_one(smtp_server.settings(), "a@test.example", message))

    assert result.outcome is Outcome.SENT
    assert [m.data for m in smtp_server.messages] == [received]


@pytest.mark.parametrize("wait_for_the_client_to_notice", [True, False])
def test_reconnects_after_the_server_closes_the_connection(
    smtp_server: RecordingServer, wait_for_the_client_to_notice: bool
) -> None:
    async def main() -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=1)) as transport:
            first = await transport.send(SENDER, "a@test.example", make_message(1))
            smtp_server.close_connections()
            if wait_for_the_client_to_notice:
                await asyncio.sleep(0.1)
            second = await transport.send(SENDER, "b@test.example", make_message(2))
            return [first, second]

    results = run(main())

    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    assert len(smtp_server.messages) == 2
    assert smtp_server.connections == 2


def test_a_421_to_mail_from_on_a_reused_connection_opens_a_new_one_for_that_message(
    smtp_server: RecordingServer,
) -> None:
    # Given a server that takes two messages a connection, then answers MAIL FROM with a 421 and hangs up (Exim's
    # smtp_accept_max_per_connection)
    smtp_server.messages_per_connection = 2

    async def main() -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=1)) as transport:
            return [await transport.send(SENDER, f"c{i}@test.example", make_message(i)) for i in range(5)]

    results = run(main())

    # Then nothing of the third message had been said: it goes out on a new connection, as every one does
    assert [(r.outcome, r.code) for r in results] == [(Outcome.SENT, 250)] * 5
    assert [m.rcpt_tos for m in smtp_server.messages] == [(f"c{i}@test.example",) for i in range(5)]
    assert smtp_server.connections == 3


def test_a_421_to_mail_from_on_a_new_connection_is_the_servers_trouble(smtp_server: RecordingServer) -> None:
    smtp_server.messages_per_connection = 0

    result = run(send_one(smtp_server.settings(), "x@test.example"))

    assert (result.outcome, result.code, result.stage) == (Outcome.TRANSIENT, 421, "mail")
    assert smtp_server.connections == 1


SLOW = 1.0
"""Server delay for the slow cases; the client's timeout is 0.3 s."""

CASES: list[tuple[str, Behaviour, Outcome, int | None, int, str]] = [
    # id, behaviour, outcome, code, messages stored, error_type
    ("accepted", Behaviour(), Outcome.SENT, 250, 1, ""),
    (
        "450 at RCPT",
        Behaviour(rcpt_reply="450 4.2.1 Mailbox busy, try again in 60 seconds"),
        Outcome.TRANSIENT,
        450,
        0,
        "SMTPRecipientRefused",
    ),
    ("451 at RCPT", Behaviour(rcpt_reply="451 4.3.0 Local error"), Outcome.TRANSIENT, 451, 0, "SMTPRecipientRefused"),
    (
        "421 at RCPT",
        Behaviour(rcpt_reply="421 4.7.0 Too many messages"),
        Outcome.TRANSIENT,
        421,
        0,
        "SMTPRecipientRefused",
    ),
    ("550 at RCPT", Behaviour(rcpt_reply="550 5.1.1 No such user"), Outcome.PERMANENT, 550, 0, "SMTPRecipientRefused"),
    ("552 at RCPT", Behaviour(rcpt_reply="552 5.2.2 Mailbox full"), Outcome.TRANSIENT, 552, 0, "SMTPRecipientRefused"),
    ("552 after DATA", Behaviour(data_reply="552 5.3.4 Message too big"), Outcome.PERMANENT, 552, 0, "SMTPDataError"),
    ("451 after DATA", Behaviour(data_reply="451 4.3.0 Try again later"), Outcome.TRANSIENT, 451, 0, "SMTPDataError"),
    ("554 after DATA", Behaviour(data_reply="554 5.7.1 Spam"), Outcome.PERMANENT, 554, 0, "SMTPDataError"),
    ("drop mid-DATA", Behaviour(drop_mid_data=True), Outcome.TRANSIENT, None, 0, "SMTPServerDisconnected"),
    ("drop after dot", Behaviour(drop_after_dot=True), Outcome.AMBIGUOUS, None, 1, "SMTPServerDisconnected"),
    (
        "slow RCPT reply",
        Behaviour(delay_at="rcpt", delay_seconds=SLOW),
        Outcome.TRANSIENT,
        None,
        0,
        "SMTPReadTimeoutError",
    ),
    (
        "slow reply to the dot",
        Behaviour(delay_at="data", delay_seconds=SLOW),
        Outcome.AMBIGUOUS,
        None,
        0,
        "SMTPReadTimeoutError",
    ),
]


@pytest.mark.parametrize(
    ("behaviour", "outcome", "code", "stored", "error_type"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_each_server_behaviour_gives_its_outcome(
    smtp_server: RecordingServer, behaviour: Behaviour, outcome: Outcome, code: int | None, stored: int, error_type: str
) -> None:
    smtp_server.on("x@test.example", behaviour)
    message = make_message(size=BIG) if behaviour.drop_mid_data else make_message(size=5000)

    settings = smtp_server.settings(timeout_seconds=0.3, final_reply_timeout_seconds=0.3)
    result = run(send_one(settings, "x@test.example", message))

    assert (result.outcome, result.code, result.error_type) == (outcome, code, error_type)
    assert len(smtp_server.messages) == stored
    if code is not None:
        assert result.reply.startswith(str(code))


def test_a_relay_slower_to_answer_the_final_dot_than_other_commands_is_waited_for_not_left_uncertain(
    smtp_server: RecordingServer,
) -> None:
    # Given a relay that scans each message before it answers the final dot (a content filter under load), taking
    # longer than smtp.timeout_seconds, which bounds the other commands
    smtp_server.on("x@test.example", Behaviour(delay_at="data", delay_seconds=SLOW))

    result = run(send_one(smtp_server.settings(timeout_seconds=0.3), "x@test.example"))

    # Then its answer is waited for (RFC 5321 4.5.3.2.6: ten minutes), and the message is sent, as the relay says:
    # not `uncertain` (given up on after 0.3 s, a delivered message an operator must look into by hand)
    assert (result.outcome, result.code, result.stage) == (Outcome.SENT, 250, "reply")
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_body_timed_out_before_the_dot_is_never_finished_behind_the_clients_back(
    smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    # Given a server that reads nothing of a big body for longer than smtp.timeout_seconds, then reads on; and the
    # event loop the commands run on (uvloop's transports flush on close as asyncio's do)
    pytest.importorskip(loop)
    monkeypatch.setenv(eventloop.ENV, loop)
    smtp_server.on("x@test.example", Behaviour(stall_mid_data=1.0))

    async def main() -> SendResult:
        async with SmtpTransport(smtp_server.settings(timeout_seconds=0.3)) as transport:
            result = await transport.send(SENDER, "x@test.example", make_message(size=BIG))
            await asyncio.sleep(3.0)  # the worker lives on (sends other messages) while the server reads on
            return result

    result = eventloop.run(main())

    # Then the send is called not sent (to be tried again), and so the server must not get the message: the rest of
    # the body and the final dot, held back when the client gave up, are dropped, not written out afterwards
    assert (result.outcome, result.stage) == (Outcome.TRANSIENT, "message")
    assert result.reply.startswith("Timed out sending the message body")
    assert smtp_server.messages == []


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_body_whose_final_dot_left_as_the_timeout_came_is_not_called_unsent(
    smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, loop: str
) -> None:
    # Given a server that reads nothing of a body (bigger than the kernel's buffers, smaller than twice them) for a
    # little longer than smtp.timeout_seconds, then reads on; and the worker's event loop busy for a moment across
    # that deadline (a batch composed, a garbage collection): in the turn of the loop after it, the rest of the body
    # and the final dot are handed to the kernel and the timeout fires, both at once
    pytest.importorskip(loop)
    monkeypatch.setenv(eventloop.ENV, loop)
    smtp_server.on("x@test.example", Behaviour(stall_mid_data=1.3))

    async def main() -> SendResult:
        async with SmtpTransport(smtp_server.settings(timeout_seconds=1.0)) as transport:
            asyncio.get_running_loop().call_later(0.5, time.sleep, 1.5)
            result = await transport.send(SENDER, "x@test.example", make_message(size=6 * 1024 * 1024))
            await asyncio.sleep(1.5)  # the worker lives on while the server reads on
            return result

    result = eventloop.run(main())

    # Then the server has the message, and the send is not called unsent (to be tried again: a second copy)
    assert len(smtp_server.messages) == 1
    assert result.outcome is Outcome.SENT


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("read_on", [False, True], ids=["then hangs up", "then reads the body to the dot"])
def test_a_refusal_given_while_the_body_is_still_arriving_is_the_messages_answer(
    smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch, read_on: bool, loop: str
) -> None:
    # Given a server that refuses a big message as soon as its body starts arriving, before the final dot (past its
    # size limit), then hangs up, or reads on to the dot and says nothing more; and the event loop the commands run on
    pytest.importorskip(loop)
    monkeypatch.setenv(eventloop.ENV, loop)
    smtp_server.on("x@test.example", Behaviour(reply_mid_data="552 5.3.4 Message size exceeds fixed limit",
                                               read_on_after_reply=read_on))  # fmt: skip

    async def main() -> tuple[SendResult, SendResult]:
        async with SmtpTransport(smtp_server.settings(timeout_seconds=2.0, pool_size=1)) as transport:
            refused = await transport.send(SENDER, "x@test.example", make_message(size=BIG))
            return refused, await transport.send(SENDER, "next@test.example", make_message(1))

    started = time.monotonic()
    refused, after = eventloop.run(main())

    # Then the send is the server's refusal of this message (failed for good: the same bytes are too big every
    # time), found at once: not a drop to try again (uploading the message each time), nor, once smtp.timeout_seconds
    # passed with no reply to the dot, "it may have arrived"; and the next message goes out
    assert (refused.outcome, refused.code) == (Outcome.PERMANENT, 552)
    assert refused.reply == "552 5.3.4 Message size exceeds fixed limit"
    assert time.monotonic() - started < 2.0
    assert after.outcome is Outcome.SENT
    assert [m.rcpt_tos for m in smtp_server.messages] == [("next@test.example",)]


def test_a_message_bigger_than_the_size_the_server_offers_fails_without_being_sent(
    smtp_server: RecordingServer,
) -> None:
    # Given a server that says in its EHLO reply it takes messages of at most 20,000 bytes (RFC 1870 SIZE)
    smtp_server.size_limit = 20_000

    async def main() -> tuple[SendResult, SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=1)) as transport:
            big = await transport.send(SENDER, "x@test.example", make_message(size=50_000))
            return big, await transport.send(SENDER, "next@test.example", make_message(1, size=5_000))

    big, small = run(main())

    # Then the bigger message fails for good, saying why, with nothing of it sent (not uploaded to be refused after
    # the final dot, or cut off by a server that hangs up on it, then tried again); the next goes on the same
    # connection
    assert (big.outcome, big.code, big.stage) == (Outcome.PERMANENT, None, "mail")
    assert re.search(r"the message is \d\d,\d{3} bytes, more than the 20,000 .* SIZE", big.reply), big.reply
    assert small.outcome is Outcome.SENT
    assert (smtp_server.mail_commands, smtp_server.connections) == (1, 1)
    assert [m.rcpt_tos for m in smtp_server.messages] == [("next@test.example",)]


@pytest.mark.parametrize(
    ("message", "size"),
    [
        (b"Subject: x\r\n\r\nhello\r\n", 21),
        # the dots a line starting with one gets doubled (RFC 5321 4.5.2) are not counted (RFC 1870 4): 26, not 28
        (b"Subject: x\r\n\r\n.hello\r\n..\r\n", 26),
        (b".first line\nbare LF\n", 22),  # CRLF as sent: each LF counts as two octets (the first line's dot: 23)
    ],
)
def test_the_size_held_against_the_servers_size_is_the_message_not_its_doubled_dots(message: bytes, size: int) -> None:
    assert message_size(_dot_stuffed(message)) == size


@pytest.mark.parametrize(("stage", "setting"), [("rcpt", "timeout_seconds"), ("data", "final_reply_timeout_seconds")])
def test_a_timeout_names_the_setting_that_set_it(smtp_server: RecordingServer, stage: str, setting: str) -> None:
    # a server slower than smtp.timeout_seconds at RCPT TO, or than smtp.final_reply_timeout_seconds at the reply to
    # the final dot (uncertain): the reply kept in the ledger and shown by `ledger list`, send-test and the logs says
    # which setting gave up, and when
    smtp_server.on("x@test.example", Behaviour(delay_at=stage, delay_seconds=SLOW))

    result = run(send_one(smtp_server.settings(**{setting: 0.3}), "x@test.example"))

    assert result.reply == f"Timed out waiting for server response (after smtp.{setting}, 0.3 s)"


def test_a_4xx_hint_becomes_retry_after(smtp_server: RecordingServer) -> None:
    smtp_server.on("x@test.example", Behaviour(rcpt_reply="450 4.7.1 Greylisted, try again in 300 seconds"))

    result = run(send_one(smtp_server.settings(), "x@test.example"))

    assert result.retry_after_seconds == 300.0
    assert result.reply == "450 4.7.1 Greylisted, try again in 300 seconds"


def test_the_connection_survives_a_refused_recipient(smtp_server: RecordingServer) -> None:
    smtp_server.on("gone@test.example", Behaviour(rcpt_reply="550 5.1.1 No such user"))

    async def main() -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=1)) as transport:
            return [
                await transport.send(SENDER, "gone@test.example", make_message(1)),
                await transport.send(SENDER, "ok@test.example", make_message(2)),
            ]

    results = run(main())

    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.SENT]
    assert smtp_server.connections == 1
    assert [m.rcpt_tos for m in smtp_server.messages] == [("ok@test.example",)]


def test_a_dropped_connection_is_replaced_for_the_next_message(smtp_server: RecordingServer) -> None:
    smtp_server.on("drop@test.example", Behaviour(drop_after_dot=True))

    async def main() -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=1)) as transport:
            return [
                await transport.send(SENDER, "drop@test.example", make_message(1)),
                await transport.send(SENDER, "ok@test.example", make_message(2)),
            ]

    results = run(main())

    assert [r.outcome for r in results] == [Outcome.AMBIGUOUS, Outcome.SENT]
    assert smtp_server.connections == 2


def test_a_421_greeting_is_transient_with_its_code(smtp_server: RecordingServer) -> None:
    smtp_server.greeting = "421 4.3.2 Service not available, closing channel"

    result = run(send_one(smtp_server.settings(), "x@test.example"))

    assert (result.outcome, result.code) == (Outcome.TRANSIENT, 421)
    assert result.reply == "421 4.3.2 Service not available, closing channel"
    assert smtp_server.messages == []


def test_a_refused_login_is_transient_at_the_auth_stage(smtp_server: RecordingServer) -> None:
    smtp_server.login = ("shop", "right-password")

    async def main() -> list[SendResult]:
        results = []
        for password in ("wrong-password", "right-password"):
            async with SmtpTransport(smtp_server.settings(username="shop"), password=password) as transport:
                results.append(await transport.send(SENDER, "x@test.example", make_message()))
        return results

    refused, accepted = run(main())

    assert (refused.outcome, refused.code, refused.stage) == (Outcome.TRANSIENT, 535, "auth")
    assert refused.reply == "535 5.7.8 Authentication credentials invalid"
    assert refused.error_type == "SMTPAuthenticationError"
    assert (accepted.outcome, accepted.stage) == (Outcome.SENT, "reply")
    assert len(smtp_server.messages) == 1


@pytest.mark.parametrize(
    "refusal",
    ["538 5.7.11 Encryption required for requested authentication mechanism",
     "530 5.7.0 Must issue a STARTTLS command first"],
    ids=["538 encryption required", "530 STARTTLS first"],
)  # fmt: skip
def test_a_login_refused_for_want_of_tls_names_smtp_tls_not_the_password(
    smtp_server: RecordingServer, refusal: str
) -> None:
    # Given a relay that offers AUTH on a plaintext connection but takes a login only over TLS (RFC 4954's 538, or a
    # 530 asking for STARTTLS), and smtp.tls = "none" with the right password
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_refusal = refusal

    result = run(send_one(smtp_server.settings(username="shop"), "x@test.example"))

    # Then the attempt says the setup cannot work and what to fix, smtp.tls, where the dispatcher's pause said
    # "check smtp.username and the password", which are right; nothing is sent
    assert (result.outcome, result.stage, result.setup) == (Outcome.TRANSIENT, "auth", "smtp.tls")
    assert result.reply.startswith(refusal) and "smtp.tls = 'starttls'" in result.reply, result.reply
    assert smtp_server.messages == []
    # and the password went over the plaintext connection once: after PLAIN's 538 it was sent again with LOGIN,
    # which needs encryption as much (only a mechanism that keeps the password off the wire is worth a try)
    assert smtp_server.logins_tried == 1


@pytest.mark.parametrize("refusal", [None, "454 4.7.0 Temporary authentication failure"])
def test_a_refused_login_is_tried_once_not_once_per_connection_and_mechanism(
    smtp_server: RecordingServer, refusal: str | None
) -> None:
    # Given a relay that offers LOGIN and PLAIN, refuses the password given, and may lock out (fail2ban, a
    # provider) whoever fails a few logins in a row
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_refusal = refusal

    async def main(password: str) -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(username="shop", pool_size=4), password=password) as transport:
            return await asyncio.gather(
                *(transport.send(SENDER, f"c{i}@test.example", make_message(i)) for i in range(4))
            )

    refused = run(main("wrong-password"))

    # Then the four connections opened at once make one login between them, and all four report its refusal
    assert smtp_server.logins_tried == 1
    code = 454 if refusal else 535
    assert [(r.outcome, r.code, r.stage) for r in refused] == [(Outcome.TRANSIENT, code, "auth")] * 4
    assert len({r.reply for r in refused}) == 1
    # And with the right password every connection logs in and sends
    accepted = run(main("right-password"))
    assert [r.outcome for r in accepted] == [Outcome.SENT] * 4
    assert len(smtp_server.messages) == 4


def test_gmails_534_refusing_the_account_is_not_tried_again_with_the_next_mechanism(
    smtp_server: RecordingServer,
) -> None:
    # Given a relay that answers a login with Gmail's 534s, which refuse the account (an app password needed, a login
    # in the browser first), not the mechanism: LOGIN would meet the same, and each refusal counts toward a lockout
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_refusal = (
        "534 5.7.9 Application-specific password required. Learn more at "
        "https://support.google.com/mail/?p=InvalidSecondFactor"
    )

    async def main() -> SendResult:
        async with SmtpTransport(smtp_server.settings(username="shop"), password="wrong-password") as transport:
            return await transport.send(SENDER, "x@test.example", make_message())

    result = run(main())

    # Then one login was tried, not one per mechanism offered (PLAIN, then LOGIN)
    assert smtp_server.logins_tried == 1
    assert (result.outcome, result.code, result.stage) == (Outcome.TRANSIENT, 534, "auth")


def test_a_cram_md5_the_server_cannot_verify_is_followed_by_plain_on_a_plaintext_connection(
    smtp_server: RecordingServer,
) -> None:
    # Given a relay without TLS that offers CRAM-MD5 but refuses every CRAM-MD5 login (its passwords stored hashed),
    # and PLAIN and LOGIN, which take the right password: aiosmtplib's own login went on to PLAIN, and sent
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_mechanisms = ("CRAM-MD5", "PLAIN", "LOGIN")

    async def main(password: str) -> SendResult:
        async with SmtpTransport(smtp_server.settings(username="shop"), password=password) as transport:
            return await transport.send(SENDER, "x@test.example", make_message())

    # Then the right password logs in with PLAIN after CRAM-MD5 was refused, and the message goes
    sent = run(main("right-password"))
    assert (sent.outcome, sent.code) == (Outcome.SENT, 250)
    assert smtp_server.logins_tried == 2
    # And a wrong one costs those two refusals, not a third with LOGIN
    refused = run(main("wrong-password"))
    assert (refused.outcome, refused.code, refused.stage) == (Outcome.TRANSIENT, 535, "auth")
    assert smtp_server.logins_tried == 4


def test_a_login_server_that_asks_for_the_user_name_gets_the_name_not_the_password(
    smtp_server: RecordingServer,
) -> None:
    # Given a relay offering LOGIN alone that asks for the user name even when AUTH LOGIN gave it (the draft's form:
    # SubEthaSMTP, OpenSMTPD before 5.4): aiosmtplib answered "Username:" with the password, which the server then
    # logged as a user name, and the login failed on the 334 asking for the password
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_mechanisms = ("LOGIN",)
    smtp_server.login_asks_the_name = True

    async def main() -> SendResult:
        async with SmtpTransport(smtp_server.settings(username="shop"), password="right-password") as transport:
            return await transport.send(SENDER, "x@test.example", make_message())

    result = run(main())

    # Then it logs in and the message goes, and the server was told the user name alone
    assert (result.outcome, result.code) == (Outcome.SENT, 250), result
    assert smtp_server.login_names == ["shop"]


WRONG = "wr0ng-Passw0rd"
_QUOTED = base64.b64encode(f"\0shop\0{WRONG}".encode()).decode()


@pytest.mark.parametrize("refusal", [f"535 5.7.8 Authentication failed: AUTH PLAIN {_QUOTED}",
                                     f"535 5.7.8 Authentication failed for shop with password {WRONG}"],
                         ids=["the command quoted", "the password quoted"])  # fmt: skip
def test_a_refused_login_whose_reply_quotes_the_password_keeps_it_out_of_the_reply(
    smtp_server: RecordingServer, refusal: str
) -> None:
    # Given a relay whose refusal of a login quotes what it was given: the AUTH command, whose base64 holds the
    # password, or the password itself
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_refusal = refusal

    async def main() -> SendResult:
        async with SmtpTransport(smtp_server.settings(username="shop"), password=WRONG) as transport:
            return await transport.send(SENDER, "x@test.example", make_message())

    result = run(main())

    # Then the reply kept (the ledger's, the logs', the dispatcher's pause, send-test's words) has *** in its place
    assert (result.outcome, result.code, result.stage) == (Outcome.TRANSIENT, 535, "auth")
    assert WRONG not in result.reply and _QUOTED not in result.reply, result.reply
    assert result.reply.startswith("535 5.7.8 Authentication failed") and "***" in result.reply


def test_a_login_cut_off_is_that_connections_alone(smtp_server: RecordingServer) -> None:
    # Given a relay that drops the first connection during its login (a network blip), and four sends at once
    smtp_server.login = ("shop", "right-password")
    smtp_server.logins_dropped = 1

    async def main() -> list[SendResult]:
        settings = smtp_server.settings(username="shop", pool_size=4)
        async with SmtpTransport(settings, password="right-password") as transport:
            return await asyncio.gather(
                *(transport.send(SENDER, f"c{i}@test.example", make_message(i)) for i in range(4))
            )

    results = run(main())

    # Then the connections that waited their turn log in themselves: one send is cut off, three go out
    assert sorted((r.outcome, r.stage) for r in results) == [(Outcome.SENT, "reply")] * 3 + [
        (Outcome.TRANSIENT, "auth")
    ]
    assert len(smtp_server.messages) == 3


def test_a_5xx_greeting_is_transient_at_the_connect_stage(smtp_server: RecordingServer) -> None:
    smtp_server.greeting = "554 5.7.1 No SMTP service here"

    result = run(send_one(smtp_server.settings(), "x@test.example"))

    assert (result.outcome, result.code, result.stage) == (Outcome.TRANSIENT, 554, "connect")
    assert result.error_type == "SMTPConnectResponseError"


def test_a_refused_connection_is_transient() -> None:
    settings = SmtpSettings(host="127.0.0.1", port=closed_port(), tls="none", timeout_seconds=2.0)

    result = run(send_one(settings, "x@test.example"))

    assert (result.outcome, result.code, result.error_type) == (Outcome.TRANSIENT, None, "SMTPConnectError")
    assert result.stage == "connect"


@pytest.mark.parametrize(
    "address",
    [
        "x@test.example\r\nRCPT TO:<y@test.example>",
        "bad address@test.example",
        "Name <n@test.example>",
        "é@test.example",
    ],
)
def test_an_address_smtp_would_rewrite_is_permanent(smtp_server: RecordingServer, address: str) -> None:
    async def main() -> list[SendResult]:
        async with SmtpTransport(smtp_server.settings(pool_size=1)) as transport:
            return [
                await transport.send(SENDER, address, make_message(1)),
                await transport.send(SENDER, "ok@test.example", make_message(2)),
            ]

    results = run(main())

    assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.SENT]
    assert results[0].error_type == "ValueError"
    assert results[0].stage == "rcpt"  # about this message: not a connection failure, never a pause
    assert [m.rcpt_tos for m in smtp_server.messages] == [("ok@test.example",)]
    assert smtp_server.connections == 1


def test_starttls_required_but_not_offered_fails_without_sending_in_plaintext(smtp_server: RecordingServer) -> None:
    smtp_server.relay_rate = mail_from = RelayRate(1000, at="mail")  # (never reached: it notes each MAIL FROM)
    result = run(send_one(smtp_server.settings(tls="starttls"), "x@test.example"))

    assert (result.outcome, result.code, result.error_type) == (Outcome.TRANSIENT, None, "StartTLSNotOffered")
    assert "does not offer STARTTLS" in result.reply
    # nothing of the message went out in plaintext: not its body, nor its envelope (MAIL FROM names the shop)
    assert smtp_server.messages == []
    assert (mail_from.accepted, mail_from.refused) == ([], [])


def test_the_password_is_not_in_the_repr() -> None:
    transport = SmtpTransport(SmtpSettings(username="shop"), password="hunter2-secret")

    assert "hunter2" not in repr(transport)
    assert "shop" in repr(transport)


def _self_signed(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate and its key for ``name`` (for "localhost": and for 127.0.0.1)."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    names = "IP:127.0.0.1,DNS:localhost" if name == "localhost" else f"DNS:{name}"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _tls_server(cert: Path, key: Path, *, implicit: bool = False) -> RecordingServer:
    """A started server offering STARTTLS (or, ``implicit``, TLS from the first byte) with this certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = RecordingServer(implicit_tls=context) if implicit else RecordingServer(tls_context=context)
    server.start_in_thread()
    return server


def test_starttls_upgrades_and_verifies_the_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = RecordingServer(tls_context=server_context)
    server.start_in_thread()
    try:
        trusting = ssl.create_default_context(cafile=str(cert))

        async def main() -> tuple[list[SendResult], SendResult]:
            settings = server.settings(tls="starttls", pool_size=1)
            async with SmtpTransport(settings, tls_context=trusting) as transport:
                sent = [
                    await transport.send(SENDER, "a@test.example", make_message(1, size=5000)),
                    await transport.send(SENDER, "b@test.example", make_message(2, size=300_000)),
                ]
            async with SmtpTransport(settings) as untrusting:  # default context: the self-signed cert fails
                refused = await untrusting.send(SENDER, "c@test.example", make_message(3))
            return sent, refused

        sent, refused = run(main())
    finally:
        server.stop_in_thread()

    assert [r.outcome for r in sent] == [Outcome.SENT, Outcome.SENT]
    assert [len(m.data) for m in server.messages] == [
        len(make_message(1, size=5000)),
        len(make_message(2, size=300_000)),
    ]
    assert refused.outcome is Outcome.TRANSIENT
    assert refused.code is None
    assert len(server.messages) == 2


# --- a setup that cannot work: ``SendResult.setup`` names what to fix (the dispatcher pauses at once) ---------


def test_starttls_not_offered_is_a_setup_problem_naming_smtp_tls(smtp_server: RecordingServer) -> None:
    result = run(send_one(smtp_server.settings(tls="starttls"), "x@test.example"))

    assert (result.outcome, result.stage, result.setup) == (Outcome.TRANSIENT, "connect", "smtp.tls")
    assert f"127.0.0.1:{smtp_server.port} does not offer STARTTLS" in result.reply
    assert "check smtp.tls" in result.reply


def test_a_username_for_a_server_without_auth_is_a_setup_problem(smtp_server: RecordingServer) -> None:
    # no login configured on the server: its EHLO offers no AUTH at all
    settings = smtp_server.settings(username="shop")

    result = run(_send_with_password(settings, "hunter2-secret"))

    assert (result.outcome, result.code, result.stage) == (Outcome.TRANSIENT, None, "auth")
    assert result.setup == "smtp.username"
    assert result.error_type == "AuthNotOffered"
    assert f"127.0.0.1:{smtp_server.port} offers no AUTH on a plaintext connection" in result.reply
    assert "check smtp.tls" in result.reply  # over plaintext, the usual cause: AUTH only after TLS
    assert "hunter2" not in result.reply
    assert smtp_server.messages == []


def test_a_refused_ehlo_greeted_by_helo_is_not_taken_for_a_server_without_auth(smtp_server: RecordingServer) -> None:
    # a busy server refuses EHLO for now and takes HELO: HELO lists nothing, so no AUTH is known, which may pass
    smtp_server.ehlo_reply = "451 4.3.2 System busy, try again later"
    smtp_server.login = ("shop", "right-password")

    result = run(_send_with_password(smtp_server.settings(username="shop"), "right-password"))

    assert (result.outcome, result.code, result.stage, result.setup) == (Outcome.TRANSIENT, None, "auth", "")
    assert "refused EHLO (HELO was taken)" in result.reply
    assert smtp_server.messages == []


def test_a_server_offering_only_mechanisms_the_client_cannot_speak_is_a_setup_problem(
    smtp_server: RecordingServer,
) -> None:
    smtp_server.login = ("shop", "right-password")
    smtp_server.login_mechanisms = ("GSSAPI",)

    result = run(_send_with_password(smtp_server.settings(username="shop"), "right-password"))

    assert (result.outcome, result.stage, result.setup) == (Outcome.TRANSIENT, "auth", "smtp.username")
    assert "offers AUTH GSSAPI, none of which Kembali speaks (CRAM-MD5, PLAIN, LOGIN)" in result.reply
    assert smtp_server.messages == []


def test_implicit_tls_against_a_plaintext_port_is_a_setup_problem_naming_smtp_tls(
    smtp_server: RecordingServer,
) -> None:
    result = run(send_one(smtp_server.settings(tls="tls"), "x@test.example"))

    assert (result.outcome, result.code, result.stage, result.setup) == (Outcome.TRANSIENT, None, "connect", "smtp.tls")
    assert result.error_type == "SSLError"
    assert f"127.0.0.1:{smtp_server.port} answered in plain text and smtp.tls is 'tls'" in result.reply
    assert "WRONG_VERSION_NUMBER" in result.reply
    assert smtp_server.messages == []


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "tls"])
def test_an_untrusted_certificate_is_a_setup_problem_naming_the_certificates(tmp_path: Path, implicit: bool) -> None:
    server = _tls_server(*_self_signed(tmp_path), implicit=implicit)
    try:
        result = run(send_one(server.settings(tls="tls" if implicit else "starttls"), "x@test.example"))
    finally:
        server.stop_in_thread()

    assert (result.outcome, result.code, result.stage, result.setup) == (Outcome.TRANSIENT, None, "connect",
                                                                         "certificates")  # fmt: skip
    assert result.error_type == "SSLCertVerificationError"
    assert f"the TLS certificate of 127.0.0.1:{server.port} fails verification" in result.reply
    assert "self-signed certificate" in result.reply
    assert server.messages == []


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "tls"])
def test_a_certificate_for_another_host_is_a_setup_problem_naming_smtp_host(tmp_path: Path, implicit: bool) -> None:
    cert, key = _self_signed(tmp_path, "mail.elsewhere.invalid")
    server = _tls_server(cert, key, implicit=implicit)
    try:
        trusting = ssl.create_default_context(cafile=str(cert))  # trusted, but not for 127.0.0.1

        async def main() -> SendResult:
            settings = server.settings(tls="tls" if implicit else "starttls")
            async with SmtpTransport(settings, tls_context=trusting) as transport:
                return await transport.send(SENDER, "x@test.example", make_message())

        result = run(main())
    finally:
        server.stop_in_thread()

    assert (result.outcome, result.stage, result.setup) == (Outcome.TRANSIENT, "connect", "smtp.host")
    assert f"the TLS certificate of 127.0.0.1:{server.port} is not valid for smtp.host '127.0.0.1'" in result.reply
    assert server.messages == []


def test_a_refused_connection_or_a_handshake_cut_short_is_not_a_setup_problem() -> None:
    # what may pass (a server restarting, a network hiccup) keeps counting toward the pause instead
    async def main() -> list[SendResult]:
        async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        closing = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = closing.sockets[0].getsockname()[1]
        try:
            results = []
            for tls, to in (("none", closed_port()), ("tls", port), ("none", port)):
                settings = SmtpSettings(host="127.0.0.1", port=to, tls=tls, timeout_seconds=2.0)
                results.append(await send_one(settings, "x@test.example"))
            return results
        finally:
            closing.close()
            await closing.wait_closed()

    results = run(main())

    assert [(r.outcome, r.stage, r.setup) for r in results] == [(Outcome.TRANSIENT, "connect", "")] * 3


async def _send_with_password(settings: SmtpSettings, password: str) -> SendResult:
    async with SmtpTransport(settings, password=password) as transport:
        return await transport.send(SENDER, "x@test.example", make_message())

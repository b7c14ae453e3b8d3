"""A recording SMTP server for tests, with failures chosen per recipient.

Wraps ``worker.adapters.sink.SmtpSink`` (aiosmtpd on 127.0.0.1, port 0). Each
recipient address may be given a ``Behaviour``; anything else is accepted::

    server.on("full@test", Behaviour(rcpt_reply="452 4.2.2 Mailbox full"))
    server.on("gone@test", Behaviour(drop_after_dot=True))
    server.on("big@test", Behaviour(reply_mid_data="552 5.3.4 Too big"))  # before the final dot, then a hang-up
    server.greeting = "421 4.3.2 Service not available"   # every new connection
    server.greeting_delay = 3.0                          # every new connection waits this long for its greeting
    server.on("new@test", Behaviour(greylist=True))      # 450 the first time, then accepted
    server.client_limit = 4                              # then "451 … too many messages" per client IP
    server.relay_rate = RelayRate(5, at="rcpt")          # more than 5 messages a second: "451 … slow down" at RCPT
    server.relay_rate = RelayRate(5, at="mail")          # …or "421 … slow down" at MAIL FROM, and a hang-up
    server.account_quota = (5, "550 5.4.5 Daily user sending quota exceeded.", "rcpt")  # after 5 messages
    server.messages_per_connection = 2                   # then MAIL gets "421 … too many messages" and a hang-up
    server.login = ("shop", "right-password")            # offer AUTH (plaintext); other credentials get 535
    server.login_mechanisms = ("GSSAPI",)                # …with these mechanisms only (default LOGIN, PLAIN;
                                                         # also CRAM-MD5, which it refuses whatever the password)
    server.login_asks_the_name = True                    # LOGIN asks for the name given with AUTH LOGIN again
    RecordingServer(tls_context=ctx)                     # offer STARTTLS with this server-side context
    RecordingServer(implicit_tls=ctx)                    # TLS from the first byte (as on port 465)

Handler hooks (``handle_RCPT``/``handle_DATA``) do replies, delays and the drop
after the final dot; an ``SMTP`` subclass does the 421 greeting and the drop
in the middle of DATA. Runs on its own loop in a thread (``start_in_thread``),
so a test's ``asyncio.run`` talks to it over real TCP; or ``await start()``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword

from worker.adapters.sink import ReceivedMessage, SinkHandler, SmtpSink
from worker.config import SmtpSettings


@dataclass(frozen=True)
class Behaviour:
    """What the server does for one recipient."""

    rcpt_reply: str | None = None
    """Reply to RCPT TO instead of accepting (e.g. ``"550 5.1.1 No such user"``)."""
    data_reply: str | None = None
    """Reply to the final dot instead of accepting; the message is not stored."""
    drop_mid_data: bool = False
    """Close the connection once the body starts arriving (nothing stored)."""
    drop_after_dot: bool = False
    """Store the message, then close the connection without replying."""
    data_command_reply: str | None = None
    """Reply to the DATA command itself instead of its 354 (nothing of the body is read); a 421 then hangs up."""
    reply_mid_data: str | None = None
    """Give this reply once the body starts arriving, before the final dot (a server refusing a message as it passes
    its size limit: "552 5.3.4 Message size exceeds fixed limit"); then hang up, or with ``read_on_after_reply`` read
    the rest of the body up to the dot, discarding it, and say nothing more (nothing stored either way)."""
    read_on_after_reply: bool = False
    stall_mid_data: float = 0.0
    """Read nothing of the body for this many seconds after the 354, then read on as usual (a server or a network
    path that stalls): a client with a shorter timeout gives up before the final dot."""
    delay_at: str | None = None
    """``"rcpt"`` or ``"data"``: wait ``delay_seconds`` before that reply."""
    delay_seconds: float = 0.0
    greylist: bool = False
    """Refuse the first RCPT for this address with ``GREYLIST_REPLY``, accept later ones."""


ACCEPT = Behaviour()
GREYLIST_REPLY = "450 4.7.1 Greylisted, please try again in 60 seconds"
CLIENT_LIMIT_REPLY = "451 4.7.1 Too many messages from your IP, slow down"
CONNECTION_LIMIT_REPLY = "421 4.7.0 mx.test.example Too many messages in this connection"
"""Exim's answer to MAIL FROM past ``smtp_accept_max_per_connection``, before it closes the connection."""


RELAY_RATE_REPLY = "451 4.7.1 Too many messages, slow down"
RELAY_RATE_HANG_UP = "421 4.7.0 relay.test.example Too many messages, slow down; closing connection"


@dataclass
class RelayRate:
    """A relay's own limit, whoever the mail is for: at most ``per_second`` messages in any second (a sliding
    window, across every client and connection); past it, RCPT TO gets ``RELAY_RATE_REPLY`` (``at="rcpt"``), or
    MAIL FROM gets ``RELAY_RATE_HANG_UP`` and the connection is closed (``at="mail"``). ``accepted`` and
    ``refused`` note when (``time.monotonic``) each message was taken or turned away."""

    per_second: int
    at: str = "rcpt"
    reply: str = RELAY_RATE_REPLY
    """What RCPT TO gets past the limit (``at="rcpt"``)."""
    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)

    def take(self) -> bool:
        """Whether one more message fits in the last second (noted as accepted or refused)."""
        now = time.monotonic()
        recent = sum(1 for t in self.accepted if t > now - 1.0)
        (self.accepted if recent < self.per_second else self.refused).append(now)
        return recent < self.per_second

    def fastest_second(self) -> int:
        """The most messages accepted within any one second."""
        times = self.accepted
        return max((sum(1 for u in times if t <= u < t + 1.0) for t in times), default=0)


class _FaultyHandler(SinkHandler):
    owner: RecordingServer

    async def handle_RCPT(  # aiosmtpd's hook names
        self, server: SMTP, session: Any, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        behaviour = self.owner.behaviour(address)
        if behaviour.delay_at == "rcpt":
            await asyncio.sleep(behaviour.delay_seconds)
        if behaviour.greylist and address not in self.owner.greylisted:
            self.owner.greylisted.add(address)
            return GREYLIST_REPLY
        relay = self.owner.relay_rate
        if relay is not None and relay.at == "rcpt" and not relay.take():
            return relay.reply
        quota = self.owner.account_quota
        if quota is not None and quota[2] == "rcpt":
            if self.owner.quota_taken >= quota[0]:
                self.owner.quota_refused += 1
                return quota[1]
            self.owner.quota_taken += 1
        limit = self.owner.client_limit
        client = str(session.peer[0]) if session.peer else ""
        if limit is not None and self.owner.accepted_from[client] >= limit:
            return CLIENT_LIMIT_REPLY
        reply = await super().handle_RCPT(server, session, envelope, address, rcpt_options)
        if limit is not None and reply.startswith("250"):
            self.owner.accepted_from[client] += 1
        return reply

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Envelope) -> str:
        self.owner.data_taken += 1
        behaviours = [self.owner.behaviour(r) for r in envelope.rcpt_tos]
        for behaviour in behaviours:
            if behaviour.delay_at == "data":
                await asyncio.sleep(behaviour.delay_seconds)
        quota = self.owner.account_quota
        if quota is not None and quota[2] == "data":
            if self.owner.quota_taken >= quota[0]:
                self.owner.quota_refused += 1
                return quota[1]
            self.owner.quota_taken += 1
        if any(b.drop_after_dot for b in behaviours):
            self.sink.record(envelope)
            _hang_up(server)
            return "250 never sent: the transport is closed"
        return await super().handle_DATA(server, session, envelope)


class _FaultySMTP(SMTP):
    def __init__(self, owner: RecordingServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    async def _handle_client(self) -> None:
        if self._owner.greeting_delay:
            await asyncio.sleep(self._owner.greeting_delay)
        greeting = self._owner.greeting
        if greeting is None:
            await super()._handle_client()
            return
        await self.push(greeting)
        _hang_up(self)

    async def smtp_AUTH(self, arg: str) -> None:
        self._owner.logins_tried += 1
        if self._owner.logins_tried <= self._owner.logins_dropped:
            _hang_up(self)
            return
        await super().smtp_AUTH(arg)

    async def auth_LOGIN(self, server: Any, args: list[str]) -> AuthResult:  # aiosmtpd's mechanism hook name
        if self._owner.login_asks_the_name:  # the user name given with AUTH LOGIN is not read: asked for again
            args = args[:1]
        return await super().auth_LOGIN(server, args)

    async def auth_GSSAPI(self, _: Any, args: list[str]) -> AuthResult:  # aiosmtpd's mechanism hook name
        """A mechanism aiosmtplib does not speak (only offered when in ``login_mechanisms``)."""
        return AuthResult(success=False, handled=False)

    async def auth_CRAM__MD5(self, _: Any, args: list[str]) -> AuthResult:  # aiosmtpd's hook name for CRAM-MD5
        """Offered (only when in ``login_mechanisms``) but never verified, as by a server whose passwords are stored
        hashed (Dovecot's cram-md5 over a passdb of hashes): every CRAM-MD5 login is refused, right password or not."""
        await self.challenge_auth("<1.2@test.example>")
        return AuthResult(success=False, handled=False)

    async def smtp_EHLO(self, hostname: str) -> None:
        if self._owner.ehlo_reply is None:
            await super().smtp_EHLO(hostname)
            return
        await self.push(self._owner.ehlo_reply)  # the client falls back to HELO, which aiosmtpd takes

    async def smtp_MAIL(self, arg: str) -> None:
        self._owner.mail_commands += 1
        limit = self._owner.messages_per_connection
        self._mails = getattr(self, "_mails", 0) + 1
        if limit is not None and self._mails > limit:
            await self.push(CONNECTION_LIMIT_REPLY)
            _hang_up(self)
            return
        relay = self._owner.relay_rate
        if relay is not None and relay.at == "mail" and not relay.take():
            await self.push(RELAY_RATE_HANG_UP)
            _hang_up(self)
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg: str) -> None:
        rcpts = list(self.envelope.rcpt_tos) if self.envelope is not None else []
        stall = max((self._owner.behaviour(r).stall_mid_data for r in rcpts), default=0.0)
        if stall and self.transport is not None:
            self.transport.pause_reading()  # the 354 still goes out; the body waits in the kernel's buffers
            asyncio.get_running_loop().call_later(stall, self.transport.resume_reading)
        refusal = next((b.data_command_reply for b in map(self._owner.behaviour, rcpts) if b.data_command_reply), None)
        if refusal is not None:
            await self.push(refusal)
            if refusal.startswith("421"):
                _hang_up(self)
            return
        early = next((b for b in map(self._owner.behaviour, rcpts) if b.reply_mid_data), None)
        if not (early or any(self._owner.behaviour(r).drop_mid_data for r in rcpts)):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.readuntil(b"\r\n")  # the body has started arriving
        if early is not None and early.reply_mid_data:
            await self.push(early.reply_mid_data)
            if early.read_on_after_reply:
                while await self._reader.readuntil(b"\r\n") != b".\r\n":
                    pass
                self._set_post_data_state()
                return
        _hang_up(self)


class RecordingServer:
    """An ``SmtpSink`` with per-recipient failures (see the module docstring)."""

    def __init__(self, *, folder: Path | None = None, tls_context: Any = None, implicit_tls: Any = None) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.default = ACCEPT
        """The behaviour of every recipient ``behaviours`` does not name."""
        self.greeting: str | None = None
        """When set, every new connection gets this greeting and is closed."""
        self.greeting_delay = 0.0
        """Seconds every new connection waits for its greeting (a server slow to answer, or overloaded)."""
        self.greylisted: set[str] = set()
        """Addresses already refused once by greylisting."""
        self.client_limit: int | None = None
        """Recipients accepted per client IP before every further RCPT gets ``CLIENT_LIMIT_REPLY``."""
        self.accepted_from: Counter[str] = Counter()
        self.relay_rate: RelayRate | None = None
        self.account_quota: tuple[int, str, str] | None = None
        """When set, (N, reply, "rcpt" or "data"): past N messages, every RCPT TO (or final dot) gets the reply (a
        provider's daily limit)."""
        self.quota_taken = 0
        """Messages ``account_quota`` let through (counted at RCPT TO, or at the final dot)."""
        self.quota_refused = 0
        """RCPT TOs refused by ``account_quota``."""
        """When set, the relay's own rate limit for every message (see ``RelayRate``)."""
        self.messages_per_connection: int | None = None
        """MAIL FROMs taken on one connection; the next gets ``CONNECTION_LIMIT_REPLY`` and the connection is closed."""
        self.mail_commands = 0
        """MAIL FROM commands received, on every connection."""
        self.size_limit: int | None = None
        """When set, the SIZE offered in the EHLO reply, and what aiosmtpd takes: a longer body is read to the dot and
        answered "552 Error: Too much mail data" (for connections opened after it is set)."""
        self.data_taken = 0
        """Messages whose whole DATA the server has read (before any delay at "data" and its reply)."""
        self.ehlo_reply: str | None = None
        """When set, every EHLO gets this reply (e.g. a 451): the client has to greet with HELO."""
        self.login: tuple[str, str] | None = None
        """When set, AUTH is offered (without TLS: loopback tests) and only this (username, password) is
        accepted; aiosmtpd answers anything else with "535 5.7.8 Authentication credentials invalid"."""
        self.login_mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN")
        self.logins_tried = 0
        """AUTH commands received: each refused one counts toward a lockout (fail2ban, a provider's)."""
        self.logins_dropped = 0
        """The first AUTH commands that get no reply: the connection is closed instead."""
        self.login_asks_the_name = False
        """LOGIN asks for the user name (334 "Username:") even after ``AUTH LOGIN <name>``, as the draft's form has
        it: SubEthaSMTP, OpenSMTPD before 5.4."""
        self.login_names: list[str] = []
        """The user name of every login tried (the password never belongs here)."""
        self.login_refusal: str | None = None
        """When set, the reply to a refused login instead of aiosmtpd's 535 (e.g. a 454 temporary failure)."""
        """The AUTH mechanisms offered when ``login`` is set (of LOGIN, PLAIN, GSSAPI and CRAM-MD5)."""
        self._tls_context = tls_context

        def handler_factory(sink: SmtpSink) -> SinkHandler:
            handler = _FaultyHandler(sink)
            handler.owner = self
            return handler

        self.sink = SmtpSink(
            folder=folder, reply_for=self._reply_for, handler_factory=handler_factory, smtp_class=self._smtp,
            implicit_tls=implicit_tls,
        )  # fmt: skip

    def _smtp(self, handler: Any, **kwargs: Any) -> SMTP:
        if self.login is not None:
            excluded = [m for m in ("LOGIN", "PLAIN", "GSSAPI", "CRAM-MD5") if m not in self.login_mechanisms]
            kwargs |= {"authenticator": self._authenticate, "auth_require_tls": False,
                       "auth_exclude_mechanism": excluded}  # fmt: skip
        if self.size_limit is not None:
            kwargs["data_size_limit"] = self.size_limit
        return _FaultySMTP(self, handler, tls_context=self._tls_context, **kwargs)

    def _authenticate(self, server: SMTP, session: Any, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            self.login_names.append(data.login.decode(errors="replace"))
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == self.login
        # aiosmtpd answers a failure with its 535 unless told another reply
        return AuthResult(success=ok, handled=False, message=None if ok else self.login_refusal)

    def on(self, recipient: str, behaviour: Behaviour) -> None:
        self.behaviours[recipient] = behaviour

    def behaviour(self, recipient: str) -> Behaviour:
        return self.behaviours.get(recipient, self.default)

    def _reply_for(self, stage: str, recipient: str) -> str | None:
        behaviour = self.behaviour(recipient)
        return behaviour.rcpt_reply if stage == "rcpt" else behaviour.data_reply

    @property
    def port(self) -> int:
        return self.sink.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        return self.sink.messages

    @property
    def connections(self) -> int:
        return self.sink.connections

    def close_connections(self) -> None:
        """Drop every open connection, from any thread."""
        loop = self.sink._thread_loop
        if loop is None:
            self.sink.close_connections()
        else:
            asyncio.run_coroutine_threadsafe(_call(self.sink.close_connections), loop).result(5)

    def reset_client_limit(self) -> None:
        """A new rate window: every client may send ``client_limit`` more."""
        self.accepted_from.clear()

    def settings(self, **overrides: Any) -> SmtpSettings:
        """Transport settings pointing at this server (plaintext on loopback)."""
        base = SmtpSettings(host="127.0.0.1", port=self.port, tls="none", timeout_seconds=5.0, pool_size=2)
        return replace(base, **overrides)

    async def start(self) -> None:
        await self.sink.start()

    async def stop(self) -> None:
        await self.sink.stop()

    def start_in_thread(self) -> int:
        return self.sink.start_in_thread()

    def stop_in_thread(self) -> None:
        self.sink.stop_in_thread()


def _hang_up(server: SMTP) -> None:
    """Close the connection without a reply."""
    if server.transport is not None:
        server.transport.close()


async def _call(fn: Any) -> None:
    fn()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def make_message(index: int = 0, *, size: int = 0, message_id: str | None = None) -> bytes:
    """A small RFC 5322 message, padded with 76-character lines to about ``size`` bytes."""
    mid = message_id or f"<msg-{index}@test.example>"
    head = (
        f"From: shop@test.example\r\nTo: someone@test.example\r\nSubject: Hello {index}\r\nMessage-ID: {mid}\r\n\r\n"
    ).encode()
    body = b"Hi there.\r\n.a line that starts with a dot\r\n"
    line = b"x" * 76 + b"\r\n"
    missing = max(0, size - len(head) - len(body))
    return head + body + line * (missing // len(line))

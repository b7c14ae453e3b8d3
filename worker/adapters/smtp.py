"""The SMTP transport: a small pool of long-lived aiosmtplib connections.

The only module that imports aiosmtplib. ``SmtpTransport.send`` never raises
for delivery problems: it runs one transaction in explicit steps and reports a
``SendResult`` whose outcome ``worker.core.retry.classify_reply`` decides from
the reply code (or its absence) and the stage the attempt reached:

    connect  TCP, greeting, EHLO, STARTTLS           (any failure → transient, not the message's fault)
    auth     AUTH, one mechanism (a refusal → transient; the dispatcher pauses);
             until a login succeeded the pool's connections take turns
    mail     MAIL FROM                               (4xx, a 552 transient, other 5xx a setup problem: never
                                                      the message's; before it, a message bigger than the
                                                      SIZE the server offers is permanent, nothing sent)
    rcpt     RCPT TO                                 (4xx transient, 5xx permanent)
    data     DATA, 354 expected                      (4xx transient, 5xx permanent)
    message  the body, before the final "." is handed over  (a drop → transient; a reply the
                                                      server gives meanwhile, "552 5.3.4" past its size
                                                      limit, is its answer: 4xx/5xx as usual)
    reply    waiting for the reply to the final "."  (2xx sent; 4xx/5xx as usual;
                                                      a drop or timeout → ambiguous; waited for
                                                      ``final_reply_timeout_seconds``, ten minutes,
                                                      every other step ``timeout_seconds``)

The ``SendResult`` carries the stage, so the dispatcher can tell a server or
login problem (``connect``, ``auth``) from one with this message.

A failure before MAIL FROM that every message would meet alike, because the
setup cannot work, is reported with ``SendResult.setup`` naming what to fix and
a ``reply`` that says how (the dispatcher pauses at once on it, see
``worker.core.retry``):

    smtp.tls       "starttls" but STARTTLS not offered; "tls" but the server
                   answered in plain text (an SSL WRONG_VERSION_NUMBER); "none"
                   but AUTH, MAIL FROM or RCPT TO is told to STARTTLS first
                   (530), or AUTH that it needs encryption (538)
    smtp.username  set, but the server offers no AUTH, or no mechanism
                   aiosmtplib speaks (CRAM-MD5, PLAIN, LOGIN); or, at MAIL
                   FROM or RCPT TO, the server wants a login (530) or will
                   not relay (``retry.needs_login``)
    shop.from_address  any other 5xx but a 552 at MAIL FROM (it names the sender alone,
                   the same for every message: a 5.1.x there is no bounce),
                   "Sender address rejected" or Exim's "Sender verify failed" at RCPT TO, a login that may not
                   send as the sender, Amazon SES's sandbox naming the
                   sender not verified (``retry.refuses_the_sender``)
    sending.daily_quota  the provider's daily sending limit reached, at any
                   step past the login (``retry.account_limit``)
    smtp.username  (also) the provider paused or suspended the account
    hostname, smtp.host  "Helo command rejected" or "Client host rejected"
                   at MAIL FROM or RCPT TO (``retry.refuses_the_client``)
    smtp.host      the certificate is valid but not for this host name
    certificates   the certificate fails verification otherwise (self-signed,
                   expired, an unknown CA)

A refused connection, a timeout, a reset during the TLS handshake or any other
TLS error is never ``setup``: it may pass, and counts toward the pause.

Pool: ``pool_size`` slots in a LIFO queue, one message in flight per slot,
each holding a connection opened lazily and reused (unless it sat idle longer
than ``SmtpTransport.IDLE_REUSE_SECONDS``: then it is opened anew). After a reply error at
MAIL/RCPT/DATA the connection is RSET and kept; after an error reply to the
final dot it is kept as is; after anything else (drop, timeout, garbled reply,
any 421) it is closed and the slot reconnects next time. A pooled connection that
turns out dead at MAIL, or is closed there with a 421 (Exim's limit of messages
per connection), nothing of the message sent yet, is reopened once.

TLS is explicit: ``tls`` is implicit TLS, ``starttls`` REQUIRES the STARTTLS
upgrade (never a silent plaintext fallback, and AUTH only after it), ``none``
is plaintext. Certificates are verified. The password is never logged or
shown in ``repr``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import functools
import re
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import cast

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.auth import auth_login_encode
from aiosmtplib.protocol import SMTPProtocol

from worker.config import SmtpSettings
from worker.core.retry import (
    account_limit,
    classify_reply,
    needs_login,
    parse_retry_after,
    refuses_the_client,
    refuses_the_sender,
    unverified_identities,
    verifies_the_sender,
    wants_tls,
)
from worker.domain import SMTP_ADDRESS, Outcome, SendResult, SendStage

REPLY_LIMIT = 500
"""Characters of server text kept in a ``SendResult``."""
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""What no ledger takes: lone surrogates (aiosmtplib keeps a reply's bytes that are not UTF-8 as such, and neither
SQLite nor PostgreSQL stores them) and NUL (PostgreSQL refuses it)."""


class SetupError(SMTPException):
    """The SMTP setup cannot work: every message would fail the same way until ``setting`` is fixed."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class StartTLSNotOffered(SetupError):
    """``smtp.tls = "starttls"`` but the server did not offer STARTTLS: nothing is sent in plaintext."""


class AuthNotOffered(SetupError):
    """``smtp.username`` is set but the server offers no AUTH, or no mechanism the client speaks."""


_NAME_MISMATCH = frozenset({62, 64})
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""


@dataclass
class _Slot:
    client: SMTP | None = None
    idle_since: float = 0.0
    """When its last transaction ended (the event loop's clock)."""

    def discard(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


@dataclass
class _Attempt:
    stage: str = "connect"
    login_failures: int = 0
    """The transport's failed logins when the send began (``SmtpTransport._login``)."""


class SmtpTransport:
    """Sends one message per call over a pool of SMTP connections."""

    IDLE_REUSE_SECONDS = 60.0
    """A connection idle longer than this is closed and opened anew before its next message, not reused: a NAT
    or firewall on the way may have forgotten it without a word (Azure's load balancers after 4 minutes), and a
    command on it would get no reply until ``timeout_seconds``, the attempt counted against the message; and
    servers close idle sessions after some minutes (Postfix: 300 s), with a 421 that could cross our MAIL FROM."""

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        local_hostname: str | None = None,
    ) -> None:
        """``password``: read by the caller from the variable ``settings.password_env``.

        ``tls_context`` replaces the default verifying context (e.g. a private CA);
        ``local_hostname`` is the EHLO name (default: this host's FQDN).
        """
        if settings.tls not in ("tls", "starttls", "none"):
            raise ValueError(f"smtp.tls must be 'tls', 'starttls' or 'none', not {settings.tls!r}")
        self._settings = settings
        self._password = password
        self._secrets = _secret_forms(settings.username, password or "")
        """What ``_without_the_password`` stars in a reply, found once: every send's reply goes through it."""
        self._tls_context = tls_context
        self._local_hostname = local_hostname
        self._idle: asyncio.LifoQueue[_Slot] = asyncio.LifoQueue()
        for _ in range(settings.pool_size):
            self._idle.put_nowait(_Slot())
        self._closed = False
        self._login_lock = asyncio.Lock()
        self._logged_in = False
        """Whether a login has succeeded: until then the pool's connections log in one at a time."""
        self._login_failures = 0
        self._login_failure: BaseException | None = None
        """The last login that failed while the pool's connections took turns (``_login``)."""

    def __repr__(self) -> str:
        s = self._settings
        return (
            f"SmtpTransport(host={s.host!r}, port={s.port}, tls={s.tls!r}, "
            f"username={s.username!r}, pool_size={s.pool_size})"
        )

    async def __aenter__(self) -> SmtpTransport:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def send(self, sender: str, recipient: str, message: bytes, where: SendStage | None = None) -> SendResult:
        """Send ``message`` (RFC 5322 bytes) from ``sender`` to ``recipient``; classify what happened. Cancelled
        midway, it tells ``where`` (if given) the stage it had reached."""
        attempt = _Attempt(login_failures=self._login_failures)  # before it waits for a connection of the pool
        if where is not None:
            where.stage = attempt.stage  # (nothing said yet while it waits)
        slot = await self._idle.get()
        try:
            if self._closed:
                raise RuntimeError("SmtpTransport is closed")
            return self._without_the_password(await self._transaction(slot, attempt, sender, recipient, message))
        except BaseException:
            slot.discard()  # cancelled mid-transaction: the connection state is unknown
            if where is not None:
                where.stage = attempt.stage
            raise
        finally:
            slot.idle_since = asyncio.get_running_loop().time()
            self._idle.put_nowait(slot)

    def _without_the_password(self, result: SendResult) -> SendResult:
        """``result`` with the password, and the base64 forms AUTH sent it in, as *** in its reply: a server's
        refusal may quote what it was given ("535 … AUTH PLAIN AHNob3AA…"), and the reply is kept in the ledger,
        logged, and said by the dispatcher's pause and by send-test."""
        if not self._secrets or not result.reply:
            return result
        reply = result.reply
        for secret in self._secrets:
            reply = reply.replace(secret, "***")
        return result if reply == result.reply else dataclasses.replace(result, reply=reply)

    async def close(self) -> None:
        """Wait for in-flight sends, then QUIT and close every connection: all at once, so a server that does not
        answer holds the close for one ``timeout_seconds``, not one per connection; one idle too long to be trusted
        (``IDLE_REUSE_SECONDS``) is closed without a QUIT that would wait for a reply which may never come."""
        if self._closed:
            return
        self._closed = True
        slots = [await self._idle.get() for _ in range(self._settings.pool_size)]
        now = asyncio.get_running_loop().time()
        await asyncio.gather(*(self._quit(slot) for slot in slots if now - slot.idle_since <= self.IDLE_REUSE_SECONDS))
        for slot in slots:
            slot.discard()
            self._idle.put_nowait(slot)

    @staticmethod
    async def _quit(slot: _Slot) -> None:
        client = slot.client
        if client is not None and client.is_connected:
            with contextlib.suppress(SMTPException, OSError):
                await client.quit()

    # --- one transaction -----------------------------------------------------

    async def _transaction(
        self, slot: _Slot, attempt: _Attempt, sender: str, recipient: str, message: bytes
    ) -> SendResult:
        for stage, address in (("mail", sender), ("rcpt", recipient)):
            try:
                _check_address(address)
            except ValueError as exc:
                return _result(Outcome.PERMANENT, None, str(exc), exc, stage)
        body = _dot_stuffed(message)
        try:
            client, reused = await self._ready_client(slot, attempt)
            attempt.stage = "mail"
            limit = _size_offered(client)
            if 0 < limit < (size := message_size(body)):
                s = self._settings
                return _result(Outcome.PERMANENT, None, (
                    f"the message is {size:,} bytes, more than the {limit:,} {s.host}:{s.port} takes (the SIZE "
                    "it offers): nothing of it sent, as the server would refuse it (552): make the message smaller "
                    "(its template: images, includes)"), None, "mail")  # fmt: skip
            try:
                await _mail(client, sender)
            except (SMTPServerDisconnected, SMTPSenderRefused) as exc:
                if not reused or (isinstance(exc, SMTPSenderRefused) and exc.code != 421):
                    raise
                # the server closed the pooled connection while it sat idle and we had not noticed yet, or closes
                # it now with a 421 (a limit of messages per connection, an idle timeout): nothing of this
                # message was said yet, reopen once
                slot.discard()
                attempt.stage = "connect"
                client, _ = await self._ready_client(slot, attempt)
                attempt.stage = "mail"
                await _mail(client, sender)
            attempt.stage = "rcpt"
            await _rcpt(client, recipient)
            response = await self._data(client, body, attempt)
        except SMTPResponseException as exc:
            return await self._reply_error(slot, attempt.stage, exc, sender)
        except (SMTPException, OSError) as exc:  # drops, timeouts, refused connections, TLS and certificate errors
            slot.discard()
            setup = _setup_problem(exc, self._settings) if attempt.stage in ("connect", "auth") else None
            if setup is not None:
                cause, setting, text = setup
                return _result(classify_reply(None, attempt.stage), None, text, cause, attempt.stage, setup=setting)
            text = _text(exc)
            if isinstance(exc, SMTPTimeoutError):  # which setting gave up, and when: the fix may be to raise it
                key = "final_reply_timeout_seconds" if attempt.stage == "reply" else "timeout_seconds"
                text = f"{text} (after smtp.{key}, {getattr(self._settings, key):g} s)"
            return _result(classify_reply(None, attempt.stage), None, text, exc, attempt.stage)
        except (ValueError, UnicodeError) as exc:
            if attempt.stage not in ("mail", "rcpt"):
                raise
            # aiosmtplib refused an address before writing it: this message can
            # never go out as is, and the connection is untouched.
            await self._reset_or_discard(slot)
            return _result(Outcome.PERMANENT, None, str(exc), exc, attempt.stage)
        return _result(classify_reply(response.code, "reply"), response.code, _reply_text(response), None, "reply")

    async def _ready_client(self, slot: _Slot, attempt: _Attempt) -> tuple[SMTP, bool]:
        """The slot's connection and whether it was reused; opened if missing, closed or idle too long."""
        idle = asyncio.get_running_loop().time() - slot.idle_since
        if slot.client is not None and slot.client.is_connected and idle <= self.IDLE_REUSE_SECONDS:
            return slot.client, True
        slot.discard()
        slot.client = await self._connect(attempt)
        return slot.client, False

    async def _connect(self, attempt: _Attempt) -> SMTP:
        s = self._settings
        client = SMTP(
            hostname=s.host,
            port=s.port,
            use_tls=s.tls == "tls",
            start_tls=False,  # STARTTLS is done below, where "not offered" is an error
            validate_certs=True,
            tls_context=self._tls_context,
            timeout=s.timeout_seconds,
            local_hostname=self._local_hostname,
        )
        await client.connect()  # closes itself on failure
        try:
            if s.tls == "starttls":
                await client.ehlo()
                if not client.supports_extension("starttls"):
                    raise StartTLSNotOffered(
                        f"{s.host}:{s.port} does not offer STARTTLS and smtp.tls is 'starttls'; "
                        "refusing to send in plaintext: check smtp.tls and smtp.port "
                        "('tls' for an implicit-TLS port such as 465)",
                        "smtp.tls",
                    )
                await client.starttls()
            # here, not at MAIL FROM: a refused EHLO and HELO, or a hang-up after the banner, says nothing
            # of a message (again after STARTTLS: what the server offers may have changed)
            await _greet(client)
            if s.username:
                attempt.stage = "auth"
                _check_auth_offered(client, s)
                await self._login(client, attempt)
                attempt.stage = "connect"
        except BaseException:
            client.close()
            raise
        return client

    async def _login(self, client: SMTP, attempt: _Attempt) -> None:
        """Log in, with one mechanism (``_log_in``). Until a login has succeeded, the pool's connections, opened
        at once, take turns, and a login that fails is the answer for the sends begun before it: a wrong password
        costs one refused login, not one per connection and mechanism (eight with four connections), which a
        relay's fail2ban or a provider's lockout counts toward blocking this host or the account."""
        s = self._settings
        log_in = functools.partial(_log_in, client, s.username, self._password or "", tls=s.tls != "none")
        if not self._logged_in:
            async with self._login_lock:
                if not self._logged_in:  # (else another connection's login succeeded while this one waited its turn)
                    if self._login_failures != attempt.login_failures and self._login_failure is not None:
                        raise copy.copy(self._login_failure)  # failed after this send began (it waited its turn)
                    try:
                        await log_in()
                    except (SMTPResponseException, SMTPTimeoutError) as exc:  # refused, or no answer in time (the
                        self._login_failures += 1  # waits would add up); a connection dropped during it is its own
                        self._login_failure = exc
                        raise
                    self._logged_in = True
                    return
        try:
            await log_in()
        except SMTPAuthenticationError:
            self._logged_in = False  # the password changed under us: take turns again
            raise

    async def _data(self, client: SMTP, body: bytes, attempt: _Attempt) -> SMTPResponse:
        """DATA done by hand, so we know whether the final dot was handed over.

        aiosmtplib's ``SMTP.data()`` writes body and dot and then waits, so a
        drop during the body and a drop after the dot look the same. Here body
        and dot go out in one write (one system call for a usual message) with
        write buffer limits 1/0, so the transport holds back whatever the
        kernel did not take at once and the protocol is paused until it has.
        The dot is the last bytes: while anything is held back, the dot is. So
        a drop or timeout before the buffer empties is stage ``message``
        (transient: the server cannot have accepted the mail, as the held-back
        rest is dropped, never written after we gave up); once it is empty
        it is stage ``reply`` (ambiguous), a timeout that came in the same
        turn of the loop as the last bytes left included. Limit: bytes in the kernel are not
        bytes received by the server, so a drop in the last moments before the
        dot reached the server is still called ambiguous: the safe side, never
        a duplicate.
        """
        attempt.stage = "data"
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            raise SMTPDataError(start.code, start.message)
        protocol = client.protocol
        # uvloop's transports write but are not asyncio.WriteTransport subclasses: check for what is used
        transport = cast(asyncio.WriteTransport | None, client.transport)
        if protocol is None or transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost before the message body")
        attempt.stage = "message"
        protocol._response_pending = True  # a reply before the dot is kept, not dropped (``_answered_early``)
        try:
            transport.set_write_buffer_limits(high=1, low=0)
            protocol.write(body + b".\r\n")
            if transport.get_write_buffer_size():  # the kernel took part of it: wait until it took all
                async with asyncio.timeout(self._settings.timeout_seconds):
                    await protocol._drain_helper()
        except TimeoutError as exc:
            if transport.get_write_buffer_size():
                transport.abort()  # (as below)
                raise _answered_early(protocol) or SMTPTimeoutError("Timed out sending the message body") from exc
            # nothing held back: the rest of the body and the final dot went to the kernel in the very turn of the
            # loop the time ran out in (the loop busy past the deadline), and the server may take the message: its
            # reply says whether it did, as after any dot handed over
        except BaseException as exc:
            # what the kernel did not take yet, the final dot with it, is dropped: a ``close`` would write it out
            # after we gave up, and the server could take the message this attempt reports as not sent
            transport.abort()
            if isinstance(exc, SMTPServerDisconnected | ConnectionError) and (early := _answered_early(protocol)):
                raise early from exc  # it answered, then hung up
            if isinstance(exc, SMTPServerDisconnected):
                raise
            if isinstance(exc, ConnectionError):
                raise SMTPServerDisconnected("Connection lost while sending the message body") from exc
            raise
        if early := _answered_early(protocol):  # and read on to the dot
            transport.abort()  # it may answer the dot too, later: a reply the next command would take for its own
            raise early
        attempt.stage = "reply"
        # a relay answers the dot once it has scanned the message: RFC 5321 4.5.3.2.6's ten minutes, not a command's
        response = await protocol.read_response(timeout=self._settings.final_reply_timeout_seconds)
        if not 200 <= response.code < 300:
            raise SMTPDataError(response.code, response.message)
        return response

    async def _reply_error(self, slot: _Slot, stage: str, exc: SMTPResponseException, sender: str) -> SendResult:
        code: int | None = exc.code if 100 <= exc.code < 600 else None  # -1: garbled reply
        if code is None or code == 421:  # 421: the server is closing the channel
            slot.discard()
        elif stage in ("mail", "rcpt", "data"):
            await self._reset_or_discard(slot)
        elif stage != "reply":
            slot.discard()
        outcome = classify_reply(code, stage)
        reply = f"{code} {exc.message}" if code is not None else exc.message
        limited = account_limit(code, stage, exc.message)
        if limited is not None:
            s = self._settings
            hint = (
                f"{s.host}:{s.port} says the account's daily sending limit is reached, as it would for every "
                "message: sending waits until the provider's window lets it go on (the daemon tries again later); "
                "set sending.daily_quota at or below the provider's limit so Kembali stops before it"
                if limited == "sending.daily_quota"
                else f"{s.host}:{s.port} says the provider has paused or suspended sending for the account "
                f"{s.username or '(no smtp.username)'!r}, as it would for every message: see the provider's console "
                "for why, and resume sending there"
            )
            return _result(Outcome.TRANSIENT, code, f"{reply[:200]}: {hint}", exc, stage, setup=limited)
        client_setting = refuses_the_client(code, stage, exc.message)
        if client_setting is not None:
            s = self._settings
            ehlo = slot.client.local_hostname if slot.client is not None else None
            hint = (
                f"{s.host}:{s.port} refuses the name this host greets with (EHLO {ehlo}): give this host a "
                "fully-qualified name that resolves, or have the relay accept it"
                if client_setting == "hostname"
                else f"{s.host}:{s.port} refuses this client host (its address or name): have the relay accept "
                "this host, or log in (smtp.username) if it lets clients that do"
            )
            return _result(Outcome.TRANSIENT, code, f"{reply[:200]}: {hint}", exc, stage, setup=client_setting)
        if stage in ("auth", "mail", "rcpt") and wants_tls(code, exc.message) and self._settings.tls == "none":
            s = self._settings
            what = "a login" if stage == "auth" else "mail"  # (at AUTH: the password was never the trouble)
            hint = (f"{s.host}:{s.port} takes {what} only over TLS and smtp.tls is 'none': set smtp.tls = 'starttls' "
                    "(or 'tls' for an implicit-TLS port such as 465)")  # fmt: skip
            return _result(Outcome.TRANSIENT, code, f"{reply[:200]}: {hint}", exc, stage, setup="smtp.tls")
        if stage in ("mail", "rcpt") and needs_login(code, exc.message):
            return _result(Outcome.TRANSIENT, code, f"{reply[:200]}: {self._login_hint()}", exc, stage,
                           setup="smtp.username")  # fmt: skip
        if refuses_the_sender(code, stage, exc.message, sender):
            # the sender is the same for every message: never this message's or its recipient's fault (a 5.1.x
            # here is not "no such user"), and every message would meet it
            s = self._settings
            hint = (f"{s.host}:{s.port} refuses the envelope sender {sender!r}, as it would for every message: "
                    + ("verify shop.from_address (or its domain) in Amazon SES, in the region the reply names"
                       if unverified_identities(exc.message) else
                       "make shop.from_address an address that takes mail: the server checked that it exists, "
                       "and found it does not" if verifies_the_sender(exc.message) else
                       "check shop.from_address (an address this relay lets the client send as, on a domain that "
                       "exists) and the relay's own limits"))  # fmt: skip
            return _result(Outcome.TRANSIENT, code, f"{reply[:200]}: {hint}", exc, stage, setup="shop.from_address")
        return _result(outcome, code, reply, exc, stage)

    def _login_hint(self) -> str:
        s = self._settings
        if not s.username:
            return (f"{s.host}:{s.port} takes mail only from a client that logs in: set smtp.username, and the "
                    f"password in ${s.password_env}")  # fmt: skip
        return (f"{s.host}:{s.port} refuses mail after the login as {s.username!r}: check smtp.username and "
                "smtp.host (the shop's relay, not a recipient's mail server)")  # fmt: skip

    async def _reset_or_discard(self, slot: _Slot) -> None:
        """After a refused step the connection is fine: RSET it for the next message."""
        client = slot.client
        if client is None or not client.is_connected:
            slot.discard()
            return
        try:
            await client.rset()
        except (SMTPException, OSError):
            slot.discard()


def _answered_early(protocol: SMTPProtocol) -> SMTPDataError | None:
    """The reply the server gave while the body was still on its way, before the final dot was handed over (raised at
    stage ``message``), or None. A server may refuse a message as it passes a size limit ("552 5.3.4 Message size
    exceeds fixed limit"), or give up on it with a 421 or a 554, then hang up or read on to the dot and say nothing
    more: either way that reply is its answer about the message, not a drop (to try again, uploading it again) nor a
    silence after the dot (``uncertain``). aiosmtplib drops what comes while no command waits for a reply, so
    ``_data`` marks one awaited before it writes the body. Only a refusal (4xx, 5xx; a reply aiosmtplib cannot parse
    is an exception there, never one): a 2xx is read as the reply to the dot, as always (a server takes no message
    before its dot; were it one that did arrive with the last bytes, taking it for a refusal would send the message
    twice)."""
    waiter = protocol._response_waiter
    if waiter is None or not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
        return None
    response = waiter.result()
    return SMTPDataError(response.code, response.message) if not 200 <= response.code < 400 else None


async def _greet(client: SMTP) -> None:
    """EHLO (or HELO, if EHLO is refused) unless this connection already did."""
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except SMTPHeloError:
            if not client.is_connected:
                raise
            await client.helo()


_NEXT_MECHANISM = frozenset({504, 534, 538})
"""Replies to AUTH that refuse the mechanism, not the password (RFC 4954: not supported, too weak, needs
encryption): the next mechanism offered is tried; after a 534 or a 538 only a stronger one (``_STRONGER``)."""
_STRONGER = frozenset({"cram-md5"})
"""The mechanism a 534 ("too weak") or a 538 ("encryption required") may be worth another try with: PLAIN and LOGIN
send the same password alike (after a 538, LOGIN would send it over the plaintext connection a second time), and
Gmail's 534s refuse the account ("5.7.9 Application-specific password required", "5.7.14 Please log in via your web
browser"), which every mechanism would meet, each refusal counting toward a lockout."""


async def _log_in(client: SMTP, username: str, password: str, *, tls: bool) -> None:
    """Log in with the first mechanism offered of PLAIN, LOGIN and CRAM-MD5 (CRAM-MD5 first on a plaintext
    connection, where it keeps the password off the wire), trying the next one only when the server refuses the
    mechanism (``_NEXT_MECHANISM``), or refuses CRAM-MD5 (which it may offer and not verify). aiosmtplib's
    ``login`` tries every mechanism offered whatever the refusal: a wrong password was refused two or three times a
    connection."""
    offered = client.supported_auth_methods  # aiosmtplib's order: cram-md5, plain, login
    if tls:
        offered = sorted(offered, key=lambda name: name == "cram-md5")
    while offered:
        name, *offered = offered
        method = (functools.partial(_auth_login, client) if name == "login"
                  else getattr(client, f"auth_{name.replace('-', '')}"))  # fmt: skip
        try:
            await method(username, password)
            return
        except SMTPAuthenticationError as exc:
            if exc.code in (534, 538):
                offered = [m for m in offered if m in _STRONGER]
            # a server may offer CRAM-MD5 it cannot verify (its passwords stored hashed): refused, PLAIN may take
            # the same password (aiosmtplib's own login went on, and sent); a refusal of PLAIN then ends it
            cannot_verify = name == "cram-md5" and exc.code == 535
            if (exc.code not in _NEXT_MECHANISM and not cannot_verify) or not offered:
                raise


def _secret_forms(username: str, password: str) -> tuple[str, ...]:
    """The password and the base64 forms AUTH sends it in (PLAIN with and without an authorization identity, LOGIN's
    answer), longest first (a longer form holding a shorter one is starred whole); none without a password."""
    if not password:
        return ()
    secrets = {base64.b64encode(f"{authz}\0{username}\0{password}".encode()).decode() for authz in ("", username)}
    secrets.add(base64.b64encode(password.encode()).decode())
    if len(password) >= 4:  # (one shorter would star letters of any reply)
        secrets.add(password)
    return tuple(sorted(secrets, key=len, reverse=True))


async def _auth_login(client: SMTP, username: str, password: str) -> SMTPResponse:
    """LOGIN as its draft has it: ``AUTH LOGIN``, then the user name and the password, each the answer to one of the
    server's 334s. aiosmtplib's ``auth_login`` sends the name with the command and answers the next 334 with the
    password, whatever it asks for: a server that asks for the name (SubEthaSMTP, OpenSMTPD before 5.4) was sent the
    password as a user name, which it logs, and the login failed on its "334 Password:"."""
    answers = auth_login_encode(username, password)
    response = await client.execute_command(b"AUTH", b"LOGIN")
    for answer in answers:
        if response.code != 334:
            raise SMTPAuthenticationError(response.code, response.message)
        response = await client.execute_command(answer)
    if response.code != 235:
        raise SMTPAuthenticationError(response.code, response.message)
    return response


def _check_auth_offered(client: SMTP, s: SmtpSettings) -> None:
    """Before a login: the server offers AUTH, with a mechanism aiosmtplib speaks (else its ``login`` would
    fail with a bare "not supported" the same way for every message)."""
    if client.supported_auth_methods:
        return
    where = f"{s.host}:{s.port}"
    if client.last_ehlo_response is None:  # EHLO refused, HELO taken: that says nothing of what it offers
        raise SMTPException(f"{where} refused EHLO (HELO was taken), so it named no AUTH to log in with")
    if not client.supports_extension("auth"):
        if s.tls == "none":
            raise AuthNotOffered(
                f"{where} offers no AUTH on a plaintext connection and smtp.username is set: check smtp.tls "
                "(servers often offer AUTH only over TLS), or leave smtp.username empty if it needs no login",
                "smtp.username",
            )
        raise AuthNotOffered(
            f"{where} offers no AUTH and smtp.username is set: leave smtp.username empty if it needs no login, "
            "or check smtp.host and smtp.port",
            "smtp.username",
        )
    offered = " ".join(method.upper() for method in client.server_auth_methods) or "nothing"
    speaks = ", ".join(method.upper() for method in client.AUTH_METHODS)
    raise AuthNotOffered(
        f"{where} offers AUTH {offered}, none of which Kembali speaks ({speaks}), and smtp.username is set: "
        "check smtp.host and smtp.port, or leave smtp.username empty if it needs no login",
        "smtp.username",
    )


def _setup_problem(exc: BaseException, s: SmtpSettings) -> tuple[BaseException, str, str] | None:
    """(the cause, what to fix, why) when ``exc``, raised before MAIL FROM, means the setup cannot work;
    None for what may pass (refused, reset, timed out, any other TLS error)."""
    where = f"{s.host}:{s.port}"
    for cause in _causes(exc):
        if isinstance(cause, SetupError):
            return cause, cause.setting, _text(cause)
        if isinstance(cause, ssl.SSLCertVerificationError):
            if cause.verify_code in _NAME_MISMATCH:
                return cause, "smtp.host", (
                    f"the TLS certificate of {where} is not valid for smtp.host {s.host!r}: check smtp.host "
                    f"(it must be a name the certificate holds): {_text(cause)}"
                )  # fmt: skip
            return cause, "certificates", (
                f"the TLS certificate of {where} fails verification: check the server's certificates (they "
                f"must be valid and signed by a CA this machine trusts): {_text(cause)}"
            )  # fmt: skip
        if isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER" and s.tls == "tls":
            # the first bytes back were not TLS: a plaintext SMTP greeting, never a network hiccup
            return cause, "smtp.tls", (
                f"{where} answered in plain text and smtp.tls is 'tls' (implicit TLS, as on port 465): check "
                f"smtp.tls ('starttls' for a port such as 587 or 25) and smtp.port: {_text(cause)}"
            )  # fmt: skip
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from or while handling, innermost last."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return seen


async def _mail(client: SMTP, sender: str) -> None:
    """``client.mail(sender)`` without its per-call address parsing (``_check_address`` did it):
    the same command, the same errors (``_connect`` greeted)."""
    response = await client.execute_command(b"MAIL", b"FROM:<" + sender.encode("ascii") + b">")
    if response.code != 250:
        raise SMTPSenderRefused(response.code, response.message, sender)


async def _rcpt(client: SMTP, recipient: str) -> None:
    """``client.rcpt(recipient)``, likewise."""
    response = await client.execute_command(b"RCPT", b"TO:<" + recipient.encode("ascii") + b">")
    if response.code not in (250, 251):
        raise SMTPRecipientRefused(response.code, response.message, recipient)


def _size_offered(client: SMTP) -> int:
    """The largest message the server takes, as its EHLO reply's SIZE says (RFC 1870); 0 when it says none."""
    offered = client.esmtp_extensions.get("size", "").strip()
    return int(offered) if offered.isascii() and offered.isdigit() else 0


def _check_address(address: str) -> None:
    """Refuse what aiosmtplib would silently rewrite ("a b@x" → "<a>", line breaks dropped)."""
    if not SMTP_ADDRESS.fullmatch(address):
        raise ValueError(f"not a plain ASCII SMTP address: {address[:100]!r}")


def message_size(body: bytes) -> int:
    """The size of a dot-stuffed ``body`` as RFC 1870 counts it against the server's SIZE: its octets, CRLFs
    included, but not the dots doubled at the start of a line (nor the terminating dot, not in ``body``)."""
    return len(body) - body.count(b"\r\n..") - body.startswith(b"..")


def _dot_stuffed(message: bytes) -> bytes:
    """CRLF line endings, a final CRLF, and leading dots doubled (RFC 5321 §4.5.2).

    Counting first skips both regex passes for the usual already-CRLF message.
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _LINE_ENDINGS.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b".") or b"\n." in message:
        message = _LEADING_DOT.sub(b"..", message)
    return message


def _reply_text(response: SMTPResponse) -> str:
    return f"{response.code} {response.message}"


def _text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _result(
    outcome: Outcome, code: int | None, reply: str, exc: BaseException | None, stage: str, *, setup: str = ""
) -> SendResult:
    reply = _UNSTORABLE.sub("\ufffd", reply.strip()[:REPLY_LIMIT])
    hint = parse_retry_after(reply) if code is not None and 400 <= code < 500 else None
    return SendResult(
        outcome=outcome,
        code=code,
        reply=reply,
        error_type=type(exc).__name__ if exc is not None else "",
        retry_after_seconds=hint,
        stage=stage,
        setup=setup,
    )

"""SMTP replies → outcomes, and "try again in N seconds" hints. Pure: no I/O.

An SMTP attempt moves through stages; where it stopped decides what a reply
code (or the lack of one) means:

    connect   TCP connect, greeting, EHLO, STARTTLS
    auth      AUTH (the login)
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
- 5xx at ``connect``, ``auth`` or ``mail``: ``TRANSIENT``. A refused greeting,
  login or sender (MAIL FROM names the sender alone, the same for every message)
  says nothing about this message; failing it for good would burn through the
  queue, so it waits and the dispatcher's pause takes over.
- 552 at ``rcpt``: ``TRANSIENT`` (RFC 5321 §4.5.3.1.10: treat as 452).
- Other 5xx: ``PERMANENT``.
- Anything else (a 2xx/3xx where none belongs, a garbled code): ``AMBIGUOUS``
  at ``reply``, ``TRANSIENT`` before it.

Whatever stops an attempt at ``connect``, ``auth`` or ``mail``
(``connection_failure``) is the server's trouble or the configuration's, not the
message's (nothing about it or its recipient has been said yet): the message
goes back to the queue without the attempt counted against it (it never becomes
``failed`` for it), and the failure counts toward the dispatcher's pause. Most
such failures may pass (a refused or dropped connection, a timeout, a 421
greeting, a 4xx to MAIL FROM): the dispatcher pauses only after ``sending.pause_after_failures`` in
a row. So do temporary failures at RCPT TO or after that are the server's own trouble: the same class of 4xx
(``server_trouble``) for recipients at ``SERVER_TROUBLE_DOMAINS`` different domains in a row
(``TroubleStreak``); from then on the attempt is not counted against the message either. Two kinds pause it
at once (``PAUSES_AT_ONCE``), since every later
message would fail the same way until someone changes something:

- ``auth``: the server refused the login (a reply at ``auth``);
- ``setup``: the SMTP transport found the setup cannot work (``SendResult.setup``
  names what to fix; at MAIL FROM or RCPT TO too: a relay that wants a login,
  ``needs_login``; a refused sender or client, ``refuses_the_sender``,
  ``refuses_the_client``): ``smtp.tls = "starttls"`` but no STARTTLS offered;
  ``smtp.username`` set but no AUTH, or no login method the client speaks;
  the server's TLS certificate fails verification (self-signed, expired, not
  for ``smtp.host``); implicit TLS (``smtp.tls = "tls"``) answered in plain
  text. A plain refused connection or a timeout is never ``setup``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from worker.domain import Outcome, SendResult

STAGES = frozenset({"connect", "auth", "mail", "rcpt", "data", "message", "reply"})
"""Where an SMTP attempt can stop; see the module docstring."""
CONNECTION_STAGES = frozenset({"connect", "auth", "mail"})
"""Stages before RCPT TO: nothing about this message or its recipient has been said yet (MAIL FROM names the
sender alone, the same for every message)."""
MESSAGE_STAGES = frozenset({"rcpt", "data", "message", "reply"})
"""Stages whose reply is about the message: RCPT TO, DATA, and the message's own, at the final dot or given while
its body was still arriving (``message``: a server that refuses it as it passes a size limit)."""
BEFORE_DATA = CONNECTION_STAGES | {"rcpt"}
"""Stages before the DATA command was sent: nothing of the message has left, an attempt cut off there can be made
again with no risk of a second copy."""


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
        if stage in CONNECTION_STAGES or (stage == "rcpt" and code == 552):
            return Outcome.TRANSIENT
        return Outcome.PERMANENT
    return Outcome.AMBIGUOUS if final else Outcome.TRANSIENT


ConnectionFailure = Literal["setup", "auth", "connection"]
PAUSES_AT_ONCE: frozenset[ConnectionFailure] = frozenset({"setup", "auth"})
"""Connection failures every later message would meet alike: one pauses the dispatcher."""


def connection_failure(result: SendResult) -> ConnectionFailure | None:
    """``"setup"`` when the SMTP setup cannot work (``result.setup`` says what to fix: STARTTLS or AUTH not
    offered, a certificate that fails verification, implicit TLS against plain text), ``"auth"`` when the
    server refused the login (a reply at ``auth``), ``"connection"`` for any other failure before RCPT TO
    (refused or dropped connection, a timeout, a 421 or 554 greeting, EHLO, a login that got no reply, a 4xx
    or no reply to MAIL FROM; a 4xx at RCPT TO refusing the sender or this client), else None (the attempt
    reached the message). ``PAUSES_AT_ONCE``: the kinds every message would meet alike."""
    if result.outcome not in (Outcome.TRANSIENT, Outcome.AMBIGUOUS):
        return None
    if result.setup:  # before MAIL FROM, or a refusal at MAIL FROM or RCPT TO that every message would meet
        return "setup"
    if result.stage == "rcpt" and result.code is not None and 400 <= result.code < 500:
        # Postfix's sender and client rules answer at RCPT TO (``smtpd_delay_reject``): not the recipient's
        return "connection" if _NOT_THE_RECIPIENT.search(result.reply) else None
    if result.stage not in CONNECTION_STAGES:
        return None
    return "auth" if result.stage == "auth" and result.code is not None else "connection"


def enhanced_code(kind: str = "[245]", subject: str = r"\d{1,3}") -> str:
    """The pattern of an enhanced status code (RFC 3463) of class ``kind`` and subject ``subject`` (regex pieces),
    with groups ``kind``, ``subject`` and ``detail``, and not three parts of a longer dotted number: ``5.1.1.9``
    and ``10.4.2.17`` are IP addresses a reply names (read as codes, the sending IP's block listing would be a
    missing user's 5.1.1 and a relay's lookup failure a mailbox's 4.2.17)."""
    return rf"(?<![\w.])(?P<kind>{kind})\.(?P<subject>{subject})\.(?P<detail>\d{{1,3}})(?![\w]|\.\d)"


SERVER_TROUBLE_DOMAINS = 3
"""How many different recipient domains must meet the same temporary failure in a row before it is the server's."""
_ENHANCED_4XX = re.compile(enhanced_code("4"))
_ABOUT_THE_RECIPIENT = re.compile(r"recipient address|mailbox|gr[ae]y-?list|user unknown|unknown user|no such user",
                                  re.IGNORECASE)  # fmt: skip
"""What a 4xx says when it is about the recipient: Postfix's recipient rules, a full or disabled mailbox,
greylisting."""


def server_trouble(result: SendResult) -> str | None:
    """The class (``"452 4.3.1"``; the code alone when no enhanced code) of a temporary failure that may be the
    server's own trouble rather than the recipient's: a 4xx at RCPT TO, DATA or the final dot (or given before it)
    that is not throttling (``THROTTLED`` by then: per recipient domain), not about the sender or this client
    (``connection_failure``) and not about the recipient (a 4.1.x address or 4.2.x mailbox status, "Recipient
    address rejected", greylisting). A 421 ("closing the channel", ``THROTTLED`` by then, so never counted) is the
    server's state too, whatever it says. Only the same class for recipients at ``SERVER_TROUBLE_DOMAINS`` different
    domains in a row makes it the server's (``TroubleStreak``): one customer's failure stays that message's. Else
    None."""
    code = result.code
    if code is None or not 400 <= code < 500:
        return None
    if not (result.outcome is Outcome.TRANSIENT or (result.outcome is Outcome.THROTTLED and code == 421)):
        return None
    if result.stage not in MESSAGE_STAGES or connection_failure(result) is not None:
        return None
    enhanced = _ENHANCED_4XX.search(result.reply)
    if (enhanced is not None and enhanced["subject"] in ("1", "2")) or _ABOUT_THE_RECIPIENT.search(result.reply):
        return None
    return f"{code} {enhanced[0]}" if enhanced is not None else str(code)


@dataclass
class TroubleStreak:
    """The run of temporary failures of one class (``server_trouble``) in a row, and the recipient domains they
    came from. A relay in trouble (its disk full: "452 4.3.1 Insufficient system storage"; its lookup tables
    down: "451 4.3.0 Temporary lookup failure") answers every message alike: once recipients at
    ``SERVER_TROUBLE_DOMAINS`` different domains met the same class in a row, it is the server's, not the
    messages'. Any other reply past the connection ends the streak; a connection failure or no reply at all
    does not (the server's trouble too)."""

    kind: str | None = None
    domains: set[str] = field(default_factory=set)
    count: int = 0
    """The failures in the streak so far."""

    def observe(self, result: SendResult, domain: str) -> bool:
        """Take one attempt's result (its recipient at ``domain``); whether it is the server's trouble."""
        kind = server_trouble(result)
        if kind is None:
            if result.code is not None and connection_failure(result) is None:  # a reply past the connection
                self.kind, self.domains, self.count = None, set(), 0
            return False
        if kind != self.kind:
            self.kind, self.domains, self.count = kind, set(), 0
        self.count += 1
        if len(self.domains) < SERVER_TROUBLE_DOMAINS:
            self.domains.add(domain)
        return self.confirmed

    @property
    def confirmed(self) -> bool:
        return len(self.domains) >= SERVER_TROUBLE_DOMAINS


_RELAY_DENIED = re.compile(
    r"unable to relay|(?:not|n't) relay\b|relay(?:ing)?(?: access)? (?:is )?(?:denied|not (?:permitted|allowed)|"
    r"prohibited|refused)|credentials for relay",
    re.IGNORECASE,
)
"""Postfix's "Relay access denied", sendmail's "Relaying denied", Exchange's "Unable to relay", Exim's "relay not
permitted", "we do not relay", Google's SMTP relay's "Invalid credentials for relay"."""


def needs_login(code: int | None, reply: str) -> bool:
    """Whether a reply to MAIL FROM or RCPT TO says the server takes mail only from a client that logs in (or one it
    knows): 530 ("authentication required", RFC 4954), or a refusal to relay (5xx, or Postfix's 454 when it defers
    what it would refuse). Every message would meet it alike: it is the SMTP setup's (``smtp.username``,
    ``smtp.host``), not the message's or the recipient's."""
    if code == 530:
        return True
    return code is not None and 400 <= code < 600 and _RELAY_DENIED.search(reply) is not None


_WANTS_TLS = re.compile(r"\bstarttls\b", re.IGNORECASE)


def wants_tls(code: int | None, reply: str) -> bool:
    """Whether a reply to AUTH, MAIL FROM or RCPT TO says the server takes mail (or a login) only over TLS: "530 5.7.0
    Must issue a STARTTLS command first" (Postfix's ``smtpd_tls_security_level = encrypt``, Gmail on 587), or, to
    AUTH, RFC 4954's "538 5.7.11 Encryption required for requested authentication mechanism". Not a login it wants
    (``needs_login``), nor a wrong password: ``smtp.tls``."""
    return code == 538 or (code == 530 and _WANTS_TLS.search(reply) is not None)


_SENDER_VERIFY = r"sender verif(?:y|ication)"
"""Exim's sender verification: "550-Verification failed for <noreply@shop.example>\n550-No Such User Here\n550 Sender
verify failed", or with the sender's own server quoted from its callout ("550-Response: 550 5.1.1 <noreply@…>:
Recipient address rejected: User unknown …\n550 Sender verify failed"), and "451 Could not complete sender verify
callout": words of a "no such user" and a 5.1.1 that are about the sender, not the recipient."""
_SENDER_REJECTED = re.compile(rf"sender address rejected|sendasdenied|send as this sender|{_SENDER_VERIFY}",
                              re.IGNORECASE)  # fmt: skip
"""Postfix's sender rules, Microsoft 365's refusals of a login that may not send as the sender, Exim's sender
verification."""
_NOT_THE_RECIPIENT = re.compile(rf"(?:sender address|client host|helo command) rejected|{_SENDER_VERIFY}",
                                re.IGNORECASE)  # fmt: skip
"""Postfix's words for a refusal at RCPT TO that is about the sender or this client, not the recipient; Exim's
sender verification."""


_UNVERIFIED = re.compile(r"address is not verified.*?identities failed the check[^:]*:(?P<who>.*)",
                         re.IGNORECASE | re.DOTALL)  # fmt: skip
"""Amazon SES's sandbox: "554 Message rejected: Email address is not verified. The following identities failed the
check in region EU-WEST-1: a@b.example, c@d.example"."""


def unverified_identities(reply: str) -> frozenset[str]:
    """The identities (addresses or domains, lower-cased) an Amazon SES refusal names as not verified; empty when
    the reply is no such refusal."""
    found = _UNVERIFIED.search(reply)
    if found is None:
        return frozenset()
    return frozenset(word.strip("<>.;\"'").lower() for word in re.split(r"[,\s]+", found["who"])) - {""}


def verifies_the_sender(reply: str) -> bool:
    """Whether a refusal says the server checked that the sender exists and found it does not (Exim's sender
    verification): ``shop.from_address`` must be an address that takes mail."""
    return re.search(_SENDER_VERIFY, reply, re.IGNORECASE) is not None


def refuses_the_sender(code: int | None, stage: str, reply: str, sender: str = "") -> bool:
    """Whether a 5xx refuses the envelope sender (``shop.from_address``, the same for every message) rather than the
    message or its recipient: any 5xx at MAIL FROM but a 552, which names the sender alone (a 5.1.x there is no
    bounce), and at RCPT TO or the final dot one saying "Sender address rejected" (Postfix answers its sender
    restrictions at RCPT TO by default, ``smtpd_delay_reject``), that the login may not send as the sender
    (Microsoft 365's "SendAsDenied" and "5.7.60 … send as this sender", at the final dot), or Amazon SES's sandbox
    naming ``sender`` (or its domain) among the identities not verified (``unverified_identities``; one naming only
    the recipient is that message's: the sandbox takes mail only to verified recipients)."""
    if code is None or not 500 <= code < 600:
        return False
    if stage == "mail":
        # but a 552, "exceeded storage allocation": the server's room (a message's size only with a SIZE declared,
        # and the transport declares none), which may pass; the failures in a row pause it as for a 452 4.3.1
        return code != 552
    if stage not in MESSAGE_STAGES:
        return False
    if stage != "data" and _SENDER_REJECTED.search(reply) is not None:
        return True
    sender = sender.lower()
    return bool(sender) and not unverified_identities(reply).isdisjoint({sender, sender.rpartition("@")[2]})


_DAILY_LIMIT = re.compile(r"\bdaily\b[\w ]{0,40}?\b(?:quota|limit)\b[\w ]{0,20}?\bexceeded", re.IGNORECASE)
"""Amazon SES's "454 Throttling failure: Daily message quota exceeded", Google's "550 5.4.5 Daily user sending
quota (or limit) exceeded" and "Daily SMTP relay limit exceeded"."""
_SUBMISSION_QUOTA = re.compile(r"submissionquotaexceeded", re.IGNORECASE)
"""Microsoft 365's "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException" (the mailbox's
sending limits: its 5.2.0 is the store driver's, not a recipient's mailbox)."""
_DAILY_RECIPIENTS = re.compile(r"you'?ve reached your daily limit for message recipients|"
                               r"tenant (?:has )?exceeded its daily limit|tenant external recipient rate limit",
                               re.IGNORECASE)  # fmt: skip
"""Microsoft's daily recipient limits of the sending mailbox ("550 5.1.90 Your message can't be sent because you've
reached your daily limit for message recipients") or tenant ("550 5.7.232/5.7.233 … your (trial) tenant has exceeded
its daily limit for sending email to external recipients (tenant external recipient rate limit)"): they name
recipients, but the limit is the sender's."""
_ACCOUNT_PAUSED = re.compile(r"\bsending (?:paused|suspended) for this account", re.IGNORECASE)
"""Amazon SES's "Sending paused for this account" (its review of the account's bounces or complaints) and
"Sending suspended for this account"."""
_ABOUT_A_MAILBOX = re.compile(rf"recipient|mailbox|{enhanced_code('[45]', '[12]')}", re.IGNORECASE)
"""What a reply about the recipient's own limits says (a full mailbox: "552 5.2.2 Mailbox quota exceeded")."""

AccountLimit = Literal["sending.daily_quota", "smtp.username"]


def account_limit(code: int | None, stage: str, reply: str) -> AccountLimit | None:
    """Whether a reply past the connection (at MAIL FROM, RCPT TO, DATA or the final dot) says the provider has
    stopped the whole account, so every message would meet it alike until the provider lets it send again:
    ``"sending.daily_quota"`` when its daily sending limit is reached (``_DAILY_LIMIT``, ``_SUBMISSION_QUOTA``,
    ``_DAILY_RECIPIENTS``: the setting that keeps Kembali under it), ``"smtp.username"`` when it has paused or
    suspended the account's sending (``_ACCOUNT_PAUSED``: the account the login names); else None. A reply about a
    recipient's mailbox is never one (a 4.2.x/5.2.x mailbox status, "recipient", "mailbox": "552 5.2.2 Mailbox quota
    exceeded")."""
    if code is None or not 400 <= code < 600 or stage not in MESSAGE_STAGES | {"mail"}:
        return None
    if _ACCOUNT_PAUSED.search(reply) is not None:
        return "smtp.username"
    if _SUBMISSION_QUOTA.search(reply) is not None or _DAILY_RECIPIENTS.search(reply) is not None:
        return "sending.daily_quota"
    if _DAILY_LIMIT.search(reply) is not None and _ABOUT_A_MAILBOX.search(reply) is None:
        return "sending.daily_quota"
    return None


_CLIENT_REJECTED = re.compile(r"(?P<helo>helo command rejected)|client host rejected", re.IGNORECASE)


def refuses_the_client(code: int | None, stage: str, reply: str) -> str | None:
    """What to fix when a 5xx at MAIL FROM or RCPT TO refuses this client, the same for every message (Postfix
    answers its HELO and client rules there by default, ``smtpd_delay_reject``): ``"hostname"`` for "Helo
    command rejected" (the name this host greets with: a container's id is no fully-qualified name),
    ``"smtp.host"`` for "Client host rejected" (the relay's rules for this host); else None."""
    if code is None or not 500 <= code < 600 or stage not in ("mail", "rcpt"):
        return None
    found = _CLIENT_REJECTED.search(reply)
    if found is None:
        return None
    return "hostname" if found["helo"] else "smtp.host"


PAUSE_RETRY_CAP_SECONDS = 900.0
"""The longest a paused daemon waits before it tries the server again (unless the first wait is longer)."""


ACCOUNT_LIMIT_RETRY_SECONDS = 3600.0
"""The least a daemon paused by the provider's daily sending limit (``account_limit``: ``sending.daily_quota``)
waits before it tries again: such a limit is lifted in hours (Gmail's and Microsoft 365's over a rolling 24 hours),
and each try before costs a refused message."""


def doubled_wait(first: float, in_row: int, cap: float) -> float:
    """``first`` after the first failure in a row, doubled with each after it, at most ``cap`` (or ``first``, if that
    is longer): the exponent bounded, so that a failure that goes on for days (a ``float`` power past 2**1023
    overflows) keeps its wait at the cap."""
    return min(max(first, cap), first * 2.0 ** min(in_row - 1, 30))


def pause_retry_seconds(first: float, pauses_in_row: int, *, at_least: float = 0.0) -> float:
    """How long a paused daemon waits before it tries again: ``first`` after the first pause, doubling with each
    pause in a row, at most ``PAUSE_RETRY_CAP_SECONDS`` (or ``first``, if that is longer); never less than
    ``at_least`` (``ACCOUNT_LIMIT_RETRY_SECONDS`` for a pause at the account's daily limit)."""
    if first <= 0 or pauses_in_row < 1:
        raise ValueError("needs a positive first delay and at least one pause")
    return max(at_least, doubled_wait(first, pauses_in_row, PAUSE_RETRY_CAP_SECONDS))


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

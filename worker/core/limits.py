"""Sending limits as pure rules: domains, throttling replies, adaptive rates, daily quotas.

Nothing here reads a clock: every function takes ``now`` (seconds, or an aware
datetime) as an argument.

* ``book(tat, now, interval, burst, n)`` is GCRA for ``n`` events at once: the
  same arithmetic as ``ratelimit.Gcra``, in the form the shared (database)
  limiter needs, since the database keeps only ``tat``.
* ``is_throttling(code, reply)`` tells a "slow down" reply (421; 432/450/451/452/454
  that say rate, too many, too much mail, throttled, slow down or server busy)
  from other failures. A bare "try again later" or a greylisting reply is not
  one: it is that message's ordinary temporary failure (the attempt counts).
  ``as_throttled`` applies it only once the session is open: a 421 greeting
  is the server's state and counts toward the dispatcher's pause.
* ``AdaptiveRate`` is additive-increase / multiplicative-decrease per domain:
  a throttling reply halves the rate (never below a floor); each good reply
  adds back a twentieth of the configured rate.
* ``quota_day``, ``quota_day_start`` and ``quota_day_end`` cut days in the shop's time zone.
* ``bounce_kind`` reads a permanent reply: ``hard_bounce`` (5.1.x, no such
  user, unless it says the sender was denied or rejected) suppresses the address; ``sender`` (5.7.x about the
  sender, or such a 5.1.x, not the
  message: SPF, DKIM, DMARC, reverse DNS, a block list, the sending IP's
  reputation) refuses every message to that domain alike until the operator
  fixes the sending setup, so it is retried later, never failed on the first
  reply; any other 5.7.x is ``content``, a template problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from worker.core.retry import connection_failure, enhanced_code
from worker.domain import Outcome, SendResult


def domain_of(address: str) -> str:
    """The recipient's domain, lower-cased (the key of per-domain limits)."""
    return address.rpartition("@")[2].lower()


def book(tat: float, now: float, *, interval: float, burst: int, n: int = 1) -> tuple[float, float]:
    """Book ``n`` events; returns (new tat, seconds from ``now`` until the FIRST may happen).

    Event ``k`` (0-based) of the booking may happen ``k * interval`` after the first.
    """
    start = max(tat, now)
    first_at = max(now, start - interval * (burst - 1))
    return start + n * interval, first_at - now


# --- throttling and adaptive rates ------------------------------------------

_THROTTLE_TEXT = re.compile(
    r"\brate\b|ratelimit|too many|too much mail|throttl|slow down|server busy"
    r"|unexpected volume|\[TSS?0[1-4]\]"  # Yahoo's deferrals for volume: [TS01]…[TSS04]
    r"|relay limit exceeded|sender thread limit",  # Google Workspace's SMTP relay, Microsoft 365's submission
    re.IGNORECASE,
)
"""What a 4xx reply says when it is about our rate: "rate limited", "at a rate that prevents…" (Gmail), "too
many messages/recipients/connections", "throttled", Outlook's "4.7.500 Server busy", Google Workspace's "450 4.2.1
Peak SMTP relay limit exceeded for customer", Microsoft 365's "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit
exceeded" (more messages at once than the mailbox may submit). Not "try again later": greylisting and every other
temporary failure say that too."""


def is_throttling(code: int | None, reply: str) -> bool:
    """Does this reply ask us to slow down (rather than say this message failed for now)? A 421 once the session
    is open ("closing connection") always does; a 432, 450, 451, 452 or 454 when its text is about rate or volume."""
    if code == 421:
        return True
    if code in (432, 450, 451, 452, 454):
        return asks_to_slow_down(reply)
    return False


def asks_to_slow_down(reply: str) -> bool:
    """Whether a reply's text is about our rate or volume (``is_throttling``, whatever its code)."""
    return _THROTTLE_TEXT.search(reply) is not None


def as_throttled(result: SendResult) -> SendResult:
    """A transient result that is really "slow down" becomes ``THROTTLED``; others unchanged. Not before RCPT TO:
    a 421 greeting ("service not available, closing channel") is the whole server's state, not a recipient
    domain's rate, so it counts toward the dispatcher's pause instead (``retry.connection_failure``)."""
    if (
        result.outcome is Outcome.TRANSIENT
        and connection_failure(result) is None
        and is_throttling(result.code, result.reply)
    ):
        return replace(result, outcome=Outcome.THROTTLED)
    return result


@dataclass
class BoundedRate:
    """A rate that moves between a floor and the configured ceiling, starting at the ceiling (``AdaptiveRate``,
    ``pace.RelayPace``)."""

    ceiling: float
    """The configured rate (events per second); never exceeded."""
    floor: float
    """Never slower than this."""
    current: float = 0.0

    def __post_init__(self) -> None:
        if self.ceiling <= 0 or self.floor <= 0:
            raise ValueError("rates must be positive")
        self.floor = min(self.floor, self.ceiling)
        if self.current <= 0:
            self.current = self.ceiling


@dataclass
class AdaptiveRate(BoundedRate):
    """AIMD rate for one domain: halve on throttling, recover step by step on good replies."""

    @property
    def step(self) -> float:
        return self.ceiling / 20.0

    def throttled(self) -> float:
        self.current = max(self.floor, self.current / 2.0)
        return self.current

    def succeeded(self) -> float:
        self.current = min(self.ceiling, self.current + self.step)
        return self.current


# --- daily quota ------------------------------------------------------------


def quota_day(now: datetime, zone: str) -> date:
    """The shop-local day ``now`` falls in (the daily quota resets at local midnight)."""
    return now.astimezone(ZoneInfo(zone)).date()


def quota_day_start(now: datetime, zone: str) -> datetime:
    """The local midnight that began the day ``now`` falls in, as an aware datetime."""
    return _day_begins(quota_day(now, zone), zone)


def quota_day_end(day: date, zone: str) -> datetime:
    """The local midnight that ends the shop-local ``day`` (and begins the next), as an aware datetime: when what
    ``day``'s quota refused is due again. 23 or 25 hours after the day began, on a day the clocks change."""
    return _day_begins(day + timedelta(days=1), zone)


def _day_begins(day: date, zone: str) -> datetime:
    """The first instant of ``day`` in ``zone``: its midnight, the first one where the clocks go back to 00:00, and
    the instant they skip to 01:00 where they go forward at midnight (fold 0 takes the offset before a change).
    In ``zone``'s time, as logs show it; compare it by order or in UTC (Python's ``==`` across zones takes a local
    time the clocks skip or repeat for unequal to every instant)."""
    return datetime.combine(day, time(0, 0), tzinfo=ZoneInfo(zone))


def quota_grant(used: int, quota: int, wanted: int) -> int:
    """How many of ``wanted`` sends today's quota still allows (``quota`` 0: unlimited)."""
    if quota <= 0:
        return wanted
    return max(0, min(wanted, quota - used))


# --- what a permanent failure says about the address ------------------------

_ENHANCED = re.compile(enhanced_code())
_NO_SUCH_USER = re.compile(
    r"user unknown|unknown user|no such user|no such (?:mailbox|recipient)|unknown recipient|"
    r"recipient (?:address )?(?:rejected: )?(?:does not exist|not found|unknown)|does not exist|"
    r"mailbox (?:not found|does not exist)|invalid recipient|address rejected",
    re.IGNORECASE,
)


_SENDER_TEXT = re.compile(
    r"\b(?:spf|dkim|dmarc|rdns|ptr|rbl|dnsbl)\b|unauthenticated|not authenticated|authentication (?:check|fail)|"
    r"reverse (?:dns|hostname)|cannot find your hostname|blocked using|spamhaus|spamcop|on our block ?list|"
    r"(?:client host|sender|sending|your) (?:ip|domain|host)\b.{0,40}(?:block|list|reputation)|"
    r"ip address .{0,60}(?:block|list|reputation)|\[(?:ts0[1-3]|tss(?:0[7-9]|1\d)|bl2[1-3])\]|banned sending ip|"
    r"(?:from|originating from) your ip|ip you.re using to send|ipcheck\.proofpoint|not accepted from this ip",
    re.IGNORECASE,
)
"""What a refusal says when it is about the sender (its authentication, its IP's standing), not the message: Gmail's
"unauthenticated", "unsolicited mail originating from your IP" and "the IP you're using to send", Yahoo's
[TS01]-[TS03], [TSS07]-[TSS19] and [BL21]-[BL23], Microsoft's "on our block list" (S3150), Proofpoint's ipcheck
link, a block list by name."""
_CONTENT_TEXT = re.compile(r"\b(?:url|uri|links?|content|attachments?|virus|malware|phishing)\b", re.IGNORECASE)
"""What the message holds: a refusal that names it is about the message, whatever else it says (a link to a domain
on a block list is the template's, not the sender's)."""


_SENDER_REFUSED = re.compile(r"\bsender (?:address )?(?:denied|rejected)\b", re.IGNORECASE)
"""A 5.1.x, or a "no such user", that is about the sender, not the recipient: Exchange's sender filter ("554 5.1.0
Sender Denied"), "5.1.0 <shop@…> sender rejected : invalid sender domain", Postfix's "Sender address rejected: User
unknown in local recipient table"."""


def _about_the_sender(detail: int) -> bool:
    """5.7.``detail`` codes that name the sender's setup: RFC 7372's 5.7.20-5.7.26 (DKIM, SPF, reverse DNS, several
    checks), Gmail's 5.7.27-5.7.28, Microsoft's 5.7.509-5.7.515 (DMARC, authentication level), 5.7.606-5.7.649
    (a banned sending IP) and 5.7.700-5.7.750 (a tenant or domain not allowed to send)."""
    return 20 <= detail <= 28 or 509 <= detail <= 515 or 606 <= detail <= 649 or 700 <= detail <= 750


def bounce_kind(code: int | None, reply: str) -> str | None:
    """For a 5xx reply: ``"hard_bounce"`` (the address does not exist: suppress it), ``"sender"`` (the domain
    refuses mail from this sender: its authentication or reputation, the same for every message), ``"content"``
    (the message was refused for what it says: a template problem) or None."""
    if code is None or not 500 <= code < 600:
        return None
    enhanced = _ENHANCED.search(reply)
    if enhanced is not None and enhanced["kind"] == "5":
        subject = enhanced["subject"]
        if subject == "1" and enhanced["detail"] in ("1", "0", "2", "3", "6", "10"):
            return "sender" if _SENDER_REFUSED.search(reply) else "hard_bounce"
        if subject == "7":
            return "sender" if _about_the_sender(int(enhanced["detail"])) or _names_the_sender(reply) else "content"
        return None
    if code in (550, 551, 553) and _NO_SUCH_USER.search(reply):
        return "sender" if _SENDER_REFUSED.search(reply) else "hard_bounce"
    if code in (550, 553, 554) and _names_the_sender(reply):
        return "sender"
    return None


def _names_the_sender(reply: str) -> bool:
    return _SENDER_TEXT.search(reply) is not None and _CONTENT_TEXT.search(reply) is None


SENDER_REFUSAL_RETRY_SECONDS = 3600.0
"""The least wait before a message refused for its sender is tried again: SPF, DKIM or a block list is not fixed in
minutes, and each refused try costs the sender's standing with that provider more."""


def slows_domain(result: SendResult) -> bool:
    """Whether the attempt's reply should slow its recipient domain down: a "slow down" (``THROTTLED``), or a
    permanent refusal of the sender (``bounce_kind`` ``"sender"``), which every message to the domain would meet
    alike until the sending setup is fixed."""
    if result.outcome is Outcome.THROTTLED:
        return True
    return result.outcome is Outcome.PERMANENT and bounce_kind(result.code, result.reply) == "sender"


def as_sender_refusal(result: SendResult) -> SendResult:
    """A permanent refusal about the sender (``bounce_kind`` ``"sender"``) becomes a transient failure: the
    message is fine and is tried again, not before ``SENDER_REFUSAL_RETRY_SECONDS`` (the attempt counts, so
    ``max_attempts`` still ends it); others unchanged."""
    if result.outcome is Outcome.PERMANENT and bounce_kind(result.code, result.reply) == "sender":
        wait = max(result.retry_after_seconds or 0.0, SENDER_REFUSAL_RETRY_SECONDS)
        return replace(result, outcome=Outcome.TRANSIENT, retry_after_seconds=wait)
    return result

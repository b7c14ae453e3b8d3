"""Sending limits: GCRA booking, throttling replies, adaptive rates, quotas, and the shared store."""

from __future__ import annotations

import asyncio
import bisect
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.daemon_harness import make_shop
from tests.db_fixtures import migrated_sqlite
from tests.smtp_server import RecordingServer, RelayRate, closed_port, make_message
from worker.adapters import db
from worker.adapters.clock import SystemClock
from worker.adapters.ratestore import RateStore
from worker.adapters.smtp import SmtpTransport
from worker.adapters.store import Store
from worker.asyncstore import AsyncStore
from worker.config import DomainRate, SendingSettings, load_settings, settings_from_dict
from worker.core import lifecycle
from worker.core.limits import (
    AdaptiveRate,
    as_sender_refusal,
    as_throttled,
    book,
    bounce_kind,
    domain_of,
    is_throttling,
    quota_day,
    quota_day_end,
    quota_day_start,
    quota_grant,
    slows_domain,
)
from worker.core.pace import SharedCut
from worker.core.ratelimit import Gcra
from worker.daemon import Daemon
from worker.domain import MessageStatus, Outcome, SendResult
from worker.errors import ConfigError
from worker.limiter import HOLD_SECONDS, Booking, DbBooker, Later, Limit, Limiter, LocalBooker
from worker.testing import FakeClock

# --- GCRA booking ---------------------------------------------------------------


def test_booking_one_at_a_time_matches_the_in_process_gcra() -> None:
    gcra = Gcra(rate=4.0, burst=3)
    tat = 0.0
    for now in [0.0, 0.0, 0.0, 0.0, 0.1, 0.9, 2.0, 2.0, 5.0, 5.01]:
        tat, wait = book(tat, now, interval=0.25, burst=3)
        assert wait == pytest.approx(gcra.reserve(now))


def test_booking_n_at_once_spaces_them_by_the_interval() -> None:
    tat, wait = book(0.0, 10.0, interval=0.5, burst=1, n=4)
    assert (tat, wait) == (12.0, 0.0)
    tat, wait = book(tat, 10.0, interval=0.5, burst=1)
    assert wait == pytest.approx(2.0)


def _simulate(limiter: Limiter, clock: FakeClock, domains: list[str], seconds: float) -> list[tuple[float, str]]:
    """One sender sending as fast as the limits allow, round robin over ``domains``, for ``seconds``."""
    events: list[tuple[float, str]] = []
    start = clock.monotonic()

    async def main() -> None:
        i = 0
        while clock.monotonic() - start < seconds:
            domain = domains[i % len(domains)]
            await limiter.acquire(domain)
            if clock.monotonic() - start < seconds:
                events.append((clock.monotonic() - start, domain))
            i += 1

    asyncio.run(main())
    return events


@pytest.mark.parametrize(("rate", "burst"), [(1.0, 1), (10.0, 5), (50.0, 50), (0.5, 3), (200.0, 20)])
def test_a_simulated_minute_matches_the_global_rate_plus_burst(rate: float, burst: int) -> None:
    clock = FakeClock()
    settings = SendingSettings(rate_per_second=rate, burst=burst, domain_rate_per_second=10_000, domain_burst=10_000)
    events = _simulate(Limiter(settings, clock, LocalBooker(clock)), clock, ["a.example"], 60.0)

    assert rate * 60 + burst - 1 <= len(events) <= rate * 60 + burst
    assert sum(1 for t, _ in events if t < 1e-9) == burst  # the burst goes at once
    assert all(n <= rate + burst for n in Counter(int(t) for t, _ in events).values())


def test_each_domain_keeps_its_own_rate_inside_the_global_one() -> None:
    clock = FakeClock()
    settings = SendingSettings(
        rate_per_second=10.0, burst=1, domain_rate_per_second=3.0, domain_burst=1,
        domains={"gmail.com": DomainRate(rate_per_second=2.0, burst=1)},
    )  # fmt: skip
    limiter = Limiter(settings, clock, LocalBooker(clock))
    events = _simulate(limiter, clock, ["gmail.com", "yahoo.com", "x.example", "y.example", "z.example"], 60.0)
    per_domain = Counter(d for _, d in events)

    assert per_domain["gmail.com"] <= 2 * 60 + 1
    assert per_domain["yahoo.com"] <= 3 * 60 + 1
    assert len(events) <= 10 * 60 + 1


def test_a_throttled_domain_halves_and_then_recovers() -> None:
    clock = FakeClock()
    settings = SendingSettings(domain_rate_per_second=8.0, domain_burst=1, throttle_floor_per_second=1.0)
    limiter = Limiter(settings, clock, LocalBooker(clock))
    # a "slow down" about the domain's mailboxes (a 421, or one for several domains, is the relay's: test_pace)
    throttled = SendResult(Outcome.THROTTLED, 450, "450 4.2.1 The user is receiving mail at a rate that prevents "
                                                   "additional messages from being delivered")  # fmt: skip
    sent = SendResult(Outcome.SENT, 250, "250 ok")

    rates = []
    for _ in range(4):
        limiter.observe("gmail.com", throttled)
        rates.append(limiter.rates["gmail.com"].current)
    assert rates == [4.0, 2.0, 1.0, 1.0]  # never below the floor
    limiter.observe("gmail.com", sent)
    assert limiter.rates["gmail.com"].current == pytest.approx(1.4)  # + ceiling / 20 per good reply
    for _ in range(100):
        limiter.observe("gmail.com", sent)
    assert limiter.rates["gmail.com"].current == 8.0
    assert "yahoo.com" not in limiter.rates or limiter.rates["yahoo.com"].current == 8.0


def test_a_throttled_domain_sends_at_its_reduced_rate_in_a_simulated_minute() -> None:
    clock = FakeClock()
    settings = SendingSettings(rate_per_second=100.0, burst=1, domain_rate_per_second=8.0, domain_burst=8)
    limiter = Limiter(settings, clock, LocalBooker(clock))
    limiter.observe("gmail.com", SendResult(Outcome.THROTTLED, 450, "450 4.2.1 mailbox receiving at a high rate"))

    events = _simulate(limiter, clock, ["gmail.com"], 60.0)

    assert 4 * 60 <= len(events) <= 4 * 60 + 1  # half of 8/s, and no burst while throttled


class StallingClock(FakeClock):
    """A fake clock whose sleeps overrun by the given seconds, in turn (a starved process)."""

    def __init__(self, overruns: list[float]) -> None:
        super().__init__()
        self.overruns = overruns

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + (self.overruns.pop(0) if self.overruns else 0.0))


class BusyBooker:
    """A shared limit other workers keep busy: every booking waits 0.1 s."""

    def __init__(self) -> None:
        self.bookings = 0

    async def book(self, limits: Sequence[Limit], longest: Mapping[str, float] | None = None) -> Booking:
        self.bookings += 1
        return Booking(0.1)


@pytest.mark.parametrize(
    ("overruns", "bookings", "sent_at"),
    [
        ([], 1, 0.1),
        ([0.015], 1, 0.115),  # woke a little late: the slot is used
        ([0.3], 2, 0.5),  # woke 0.3 s late: that slot is given up and a new one booked
        ([0.3, 0.3], 3, 0.9),
        ([0.3] * 6, 4, 1.6),  # late every time: after three new bookings it goes anyway
    ],
)
def test_a_sender_that_wakes_long_after_its_slot_books_a_new_one(
    overruns: list[float], bookings: int, sent_at: float
) -> None:
    clock = StallingClock(overruns)
    booker = BusyBooker()
    limiter = Limiter(SendingSettings(), clock, booker)
    start = clock.monotonic()

    asyncio.run(limiter.acquire("a.example"))

    assert booker.bookings == bookings
    assert limiter.late_rebookings == bookings - 1
    assert clock.monotonic() - start == pytest.approx(sent_at)


def test_adaptive_rate_validates() -> None:
    with pytest.raises(ValueError, match="positive"):
        AdaptiveRate(ceiling=0, floor=1)
    assert AdaptiveRate(ceiling=1.0, floor=5.0).floor == 1.0


# --- replies -------------------------------------------------------------------------

GMAIL = "https://support.google.com/a/answer/3726730 (Gmail SMTP errors and codes)"
YAHOO = "https://senders.yahooinc.com/smtp-error-codes/"
MICROSOFT = "Outlook.com / Exchange Online: 4.7.500-4.7.699 are its throttling codes"

THROTTLING = [
    # (code, reply, throttling): only a reply that says rate, too many, too much, throttle, slow down, busy
    # is "slow down" (the domain's rate halves, the attempt is not counted); once the session is open a 421 is.
    (421, "421-4.7.0 Try again later, closing connection.", True),  # GMAIL
    (421, "421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP", True),  # GMAIL
    (421, "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume", True),  # YAHOO
    (450, "450-4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
          "messages from being delivered.", True),  # GMAIL
    (451, "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77714)", True),  # MICROSOFT
    (451, "451 4.7.650 The mail server [192.0.2.1] has been temporarily rate limited due to IP reputation.",
     True),  # MICROSOFT
    (451, "451 4.7.1 Too many messages from your IP, slow down", True),
    (450, "450 4.7.1 Too much mail from this sender", True),
    (452, "452 4.5.3 Too many recipients", True),  # RFC 5321 §4.5.3.1.10
    (452, "452 4.3.1 Too many messages in this connection", True),
    (451, "451 4.7.1 Ratelimit exceeded for sender", True),
    (450, "450 4.7.1 Client host throttled", True),
    (454, "454 4.7.1 Rate-limited: try again in 300 seconds", True),
    # the relay's (the sending account's) own limits on concurrency or its peak rate: Microsoft 365's sender thread
    # limit (at the final dot), Google Workspace's SMTP relay peak limit (its 4.2.1 is the relay's, not a mailbox's)
    (432, "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=AM0PR01MB1234.eurprd01.prod."
          "exchangelabs.com]", True),
    (450, "450 4.2.1 Peak SMTP relay limit exceeded for customer. This is a temporary error. For more information "
          "on SMTP relay limits, please contact your administrator or visit https://support.google.com/a/answer/"
          "6140680", True),
    (432, "432 4.3.2 System not accepting network messages", False),
    # a temporary failure for this message (greylisting, a local problem): counted, retried with backoff
    (451, "451 4.3.0 try again later", False),
    (451, "451 4.3.0 Please try later", False),
    (451, "451 Temporary local problem - please try later", False),  # Exim
    (450, "450 4.2.0 greylisted", False),
    (450, "450 4.2.0 <x@example.com>: Recipient address rejected: Greylisted, see "
          "http://postgrey.schweikert.ch/help/example.com.html", False),  # Postfix + postgrey
    (451, "451 4.7.1 Greylisting in action, please come back later", False),
    (450, "450 4.2.0 Greylisted, please come back in 300 seconds", False),
    (451, "451-4.3.0 Mail server temporarily rejected message.", False),  # GMAIL
    (451, "451 4.3.0 Local error in processing", False),
    (451, "451 4.3.0 Temporary failure to generate the delivery report", False),  # "rate" inside a word
    (450, "450 4.7.1 Message temporarily deferred", False),
    (452, "452-4.2.2 The recipient's inbox is out of storage space.", False),  # GMAIL
    (452, "452 4.2.2 Mailbox full", False),
    (454, "454 4.7.1 <x@example.com>: Relay access denied", False),
    (454, "454 4.7.0 TLS not available due to temporary reason", False),
    # permanent refusals are never throttling, whatever they say
    (550, "550 5.7.1 Rate limit exceeded", False),
    (553, "553 5.7.1 [TS03] All messages from 192.0.2.1 will be permanently deferred", False),  # YAHOO
    (None, "Connection lost", False),
]  # fmt: skip


@pytest.mark.parametrize(("code", "reply", "throttling"), THROTTLING)
def test_throttling_replies(code: int | None, reply: str, throttling: bool) -> None:
    assert is_throttling(code, reply) is throttling


def test_only_transient_results_become_throttled() -> None:
    assert as_throttled(SendResult(Outcome.TRANSIENT, 421, "421 busy")).outcome is Outcome.THROTTLED
    assert as_throttled(SendResult(Outcome.TRANSIENT, 421, "421 busy", retry_after_seconds=9)).retry_after_seconds == 9
    assert as_throttled(SendResult(Outcome.PERMANENT, 550, "550 rate")).outcome is Outcome.PERMANENT
    assert as_throttled(SendResult(Outcome.SENT, 250, "250 ok")).outcome is Outcome.SENT
    at_rcpt = SendResult(Outcome.TRANSIENT, 421, "421 4.7.0 Try again later, closing connection", stage="rcpt")
    assert as_throttled(at_rcpt) == SendResult(Outcome.THROTTLED, 421, at_rcpt.reply, stage="rcpt")


def test_a_421_greeting_is_the_servers_state_not_throttling() -> None:
    greeting = SendResult(Outcome.TRANSIENT, 421, "421 4.3.2 Service not available, closing channel", stage="connect")
    assert as_throttled(greeting) is greeting  # it counts toward the pause instead


BOUNCES = [
    (550, "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown", "hard_bounce"),
    (550, "550 5.1.1 The email account that you tried to reach does not exist", "hard_bounce"),
    (553, "553 5.1.3 Bad recipient address syntax", "hard_bounce"),
    (550, "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", "hard_bounce"),
    (550, "550 User unknown", "hard_bounce"),
    (550, "550 No such user here", "hard_bounce"),
    (554, "554 5.7.1 Message rejected as spam by Content Filtering", "content"),
    (550, "550 5.7.1 Our system has detected that this message is likely unsolicited mail", "content"),
    # about the sender, not the message: every message to the domain is refused alike until the setup is fixed
    (550, "550-5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all senders"
          " to authenticate with either SPF or DKIM.", "sender"),
    (550, "550 5.7.23 The message was rejected because of Sender Policy Framework violation", "sender"),
    (550, "550-5.7.25 The IP address sending this message does not have a PTR record setup", "sender"),
    (550, "550-5.7.1 [192.0.2.7] Our system has detected an unusual rate of unsolicited mail originating from your IP"
          " address.", "sender"),
    (553, "553 5.7.1 [TS03] All messages from 192.0.2.7 will be permanently deferred; Retrying will NOT succeed.",
     "sender"),
    (553, "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.7, because the ip is in Spamhaus's list",
     "sender"),
    (550, "550 5.7.1 Unfortunately, messages from [192.0.2.7] weren't sent. Please contact your Internet service"
          " provider since part of their network is on our block list (S3150).", "sender"),
    (550, "550 5.7.606 Access denied, banned sending IP [192.0.2.7]", "sender"),
    (550, "550 5.7.509 Access denied, sending domain toko.example does not pass DMARC verification", "sender"),
    (554, "554 Service unavailable; Client host [192.0.2.7] blocked using zen.spamhaus.org", "sender"),
    (554, "554 5.7.1 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.7", "sender"),
    (553, "553 5.7.2 [TSS09] All messages from 192.0.2.7 will be permanently deferred", "sender"),
    (550, "550-5.7.1 [192.0.2.7] The IP you're using to send mail is not authorized to send email directly to our"
          " servers.", "sender"),
    (550, "550 5.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.7]", "sender"),
    (550, "550-5.7.1 This message has been blocked because it contains content that presents a potential security"
          " issue.", "content"),
    # a link or the content on a block list is the template's problem, not the sender's
    (550, "550 5.7.1 Message rejected: contains a link to a blacklisted domain", "content"),
    (550, "550 5.7.1 Message rejected: the URL in the message body is listed on the Spamhaus DBL", "content"),
    (554, "554 5.7.1 Message rejected: URL reputation (Cisco Talos) is poor", "content"),
    (554, "554 5.7.1 Message blocked by Barracuda Email Security Service: Spam content", "content"),
    # a 5.1.x that names the sender, not the recipient: Exchange's sender filter, an unknown sender domain
    (554, "554 5.1.0 Sender Denied", "sender"),
    (550, "550 5.1.0 <shop@x.example> sender rejected : invalid sender domain", "sender"),
    (550, "550 <shop@x.example>: Sender address rejected: User unknown in local recipient table", "sender"),
    # an address with no enhanced code whose text has a number of four parts (an IP) is not a 5.1.1: it was read as
    # one, and the customer suppressed for the sending IP's block listing
    (550, "550 Mail from 5.1.1.9 refused: the sending IP is on our block list", "sender"),
    (550, "550 Connection from 10.5.1.1 refused, see http://example.net/why", None),
    (550, "550 #5.1.0 Address rejected.", "hard_bounce"),  # Exchange's older form, after a '#'
    (550, "550 Requested action not taken: mailbox unavailable (5.1.1)", "hard_bounce"),
    (552, "552 5.3.4 Message size exceeds fixed limit", None),
    (550, "550 5.2.1 Mailbox disabled", None),
    (550, "550 Requested action not taken", None),
    (450, "450 4.1.1 User unknown (temporarily)", None),
    (None, "", None),
]


@pytest.mark.parametrize(("code", "reply", "kind"), BOUNCES)
def test_what_a_permanent_reply_says_about_the_address(code: int | None, reply: str, kind: str | None) -> None:
    assert bounce_kind(code, reply) == kind


def test_only_a_permanent_refusal_about_the_sender_is_tried_again() -> None:
    blocked = SendResult(Outcome.PERMANENT, 550, "550 5.7.26 unauthenticated sender", stage="data")
    # tried again, not before an hour: SPF, DKIM or a block list is not fixed in minutes
    assert as_sender_refusal(blocked) == replace(blocked, outcome=Outcome.TRANSIENT, retry_after_seconds=3600.0)
    now = datetime(2026, 11, 22, tzinfo=UTC)
    status, next_at = lifecycle.after_attempt(as_sender_refusal(blocked), attempt=1, max_attempts=5, now=now,
                                              base_seconds=60, cap_seconds=6 * 3600)  # fmt: skip
    assert status is MessageStatus.RETRY and next_at is not None and next_at >= now + timedelta(hours=1)
    spam = SendResult(Outcome.PERMANENT, 550, "550 5.7.1 Message rejected as spam")
    assert as_sender_refusal(spam) is spam
    unknown = SendResult(Outcome.PERMANENT, 550, "550 5.1.1 User unknown")
    assert as_sender_refusal(unknown) is unknown
    later = SendResult(Outcome.TRANSIENT, 451, "451 4.7.26 unauthenticated, try later")
    assert as_sender_refusal(later) is later
    # the domain is slowed down by the refusal as the server gave it, as by a "slow down"
    assert slows_domain(blocked) and slows_domain(SendResult(Outcome.THROTTLED, 421, "421 slow down"))
    assert not (slows_domain(spam) or slows_domain(unknown) or slows_domain(later))


def test_a_throttled_attempt_retries_soon_even_after_the_last_attempt() -> None:
    now = datetime(2026, 11, 22, tzinfo=UTC)
    result = SendResult(Outcome.THROTTLED, 421, "421 slow down", retry_after_seconds=120)
    status, at = lifecycle.after_attempt(result, attempt=5, max_attempts=5, now=now, base_seconds=60, cap_seconds=3600)
    assert status is MessageStatus.RETRY
    assert at is not None and now + timedelta(seconds=120) <= at <= now + timedelta(seconds=120.001)


# --- quota days ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "day", "next_start"),
    [
        (datetime(2026, 11, 22, 16, 59, tzinfo=UTC), "2026-11-22", datetime(2026, 11, 22, 17, 0, tzinfo=UTC)),
        (datetime(2026, 11, 22, 17, 0, tzinfo=UTC), "2026-11-23", datetime(2026, 11, 23, 17, 0, tzinfo=UTC)),
    ],
)
def test_quota_days_are_shop_local(now: datetime, day: str, next_start: datetime) -> None:
    assert quota_day(now, "Asia/Jakarta").isoformat() == day
    assert quota_day_end(quota_day(now, "Asia/Jakarta"), "Asia/Jakarta") == next_start


def _utc(year: int, month: int, day: int, hour: int) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("zone", "day", "begins", "ends", "hours"),
    [
        ("Asia/Jakarta", date(2026, 11, 22), _utc(2026, 11, 21, 17), _utc(2026, 11, 22, 17), 24),
        # the day before the clocks go forward at 02:00: its end keeps the winter offset
        ("Europe/Berlin", date(2026, 3, 28), _utc(2026, 3, 27, 23), _utc(2026, 3, 28, 23), 24),
        ("Europe/Berlin", date(2026, 3, 29), _utc(2026, 3, 28, 23), _utc(2026, 3, 29, 22), 23),
        ("Europe/Berlin", date(2026, 10, 25), _utc(2026, 10, 24, 22), _utc(2026, 10, 25, 23), 25),
        ("America/New_York", date(2026, 3, 8), _utc(2026, 3, 8, 5), _utc(2026, 3, 9, 4), 23),
        ("America/New_York", date(2026, 11, 1), _utc(2026, 11, 1, 4), _utc(2026, 11, 2, 5), 25),
        # clocks that skip midnight (00:00 → 01:00): the 6th begins at its 01:00
        ("America/Santiago", date(2026, 9, 5), _utc(2026, 9, 5, 4), _utc(2026, 9, 6, 4), 24),
        ("America/Santiago", date(2026, 9, 6), _utc(2026, 9, 6, 4), _utc(2026, 9, 7, 3), 23),
        # clocks that go back from 01:00 to 00:00: the 1st begins at the first of its two midnights
        ("America/Havana", date(2026, 10, 31), _utc(2026, 10, 31, 4), _utc(2026, 11, 1, 4), 24),
        ("America/Havana", date(2026, 11, 1), _utc(2026, 11, 1, 4), _utc(2026, 11, 2, 5), 25),
    ],
)
def test_a_quota_day_ends_at_the_next_local_midnight_however_long_the_day(
    zone: str, day: date, begins: datetime, ends: datetime, hours: int
) -> None:
    # What ``day``'s quota refused is due again when the next local day begins: the first instant whose quota day
    # is the next one, whenever the refusal is heard (its last instant, or the next day already)
    last = ends - timedelta(microseconds=1)
    assert quota_day(begins, zone) == quota_day(last, zone) == day
    assert quota_day(begins - timedelta(microseconds=1), zone) == day - timedelta(days=1)
    assert quota_day(ends, zone) == day + timedelta(days=1)
    # (in UTC: Python's == across zones calls a local time the clocks skip or repeat unequal to every instant)
    assert quota_day_start(last, zone).astimezone(UTC) == begins and quota_day_end(day, zone).astimezone(UTC) == ends
    assert ends - begins == timedelta(hours=hours)


@pytest.mark.parametrize(
    ("used", "quota", "wanted", "granted"),
    [(0, 0, 50, 50), (0, 10, 5, 5), (8, 10, 5, 2), (10, 10, 5, 0), (12, 10, 1, 0)],
)
def test_quota_grant(used: int, quota: int, wanted: int, granted: int) -> None:
    assert quota_grant(used, quota, wanted) == granted


# --- config --------------------------------------------------------------------------


def test_domains_are_read_from_a_table() -> None:
    s = settings_from_dict({"sending": {"domains": {"gmail.com": {"rate_per_second": 3, "burst": 2}}}})
    assert s.sending.domains == {"gmail.com": DomainRate(rate_per_second=3.0, burst=2)}


@pytest.mark.parametrize(
    ("sending", "message"),
    [
        ({"domains": {"gmail.com": {"rate": 3}}}, "unknown key 'sending.domains.gmail.com.rate'"),
        ({"domains": {"Gmail.com": {}}}, "'sending.domains.Gmail.com' must be a lower-case domain"),
        # addresses are stored and sent with an internationalised domain in its IDNA form: a limit for the
        # Unicode form, or with a dot at the end, would never be met
        ({"domains": {"bücher.de": {}}}, "'sending.domains.bücher.de' must be .* in its IDNA form: 'xn--bcher-kva.de'"),
        # one that has no IDNA form is not told it has one (its own text, as it was)
        ({"domains": {"bü..de": {}}}, "'sending.domains.bü..de' must be a lower-case domain such as gmail.com$"),
        ({"domains": {"gmail.com.": {}}}, "'sending.domains.gmail.com.' must be a lower-case domain"),
        ({"domains": {" gmail.com": {}}}, "'sending.domains. gmail.com' must be a lower-case domain"),
        ({"domains": {"gmail.com": {"burst": 0}}}, "'sending.domains.gmail.com.burst' must be at least 1"),
        ({"domains": {"gmail.com": 5}}, "[sending.domains.gmail.com] must be a table"),
        ({"daily_quota": -1}, "'sending.daily_quota' must be 0"),
        ({"shared_limits": "redis"}, "'sending.shared_limits' must be"),
        ({"throttle_floor_per_second": 0}, "'sending.throttle_floor_per_second' must be positive"),
        ({"pause_retry_seconds": -1}, "'sending.pause_retry_seconds' must be between 0 .stay paused until SIGHUP."),
        ({"pause_retry_seconds": 86401}, "'sending.pause_retry_seconds' must be between 0"),
    ],
)
def test_bad_limit_settings_are_named(sending: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings_from_dict({"sending": sending})


def test_domain_of() -> None:
    assert domain_of("Budi@Gmail.COM") == "gmail.com"


# --- the shared store, on SQLite and PostgreSQL --------------------------------------


def test_the_database_books_like_the_pure_rule(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        rates = RateStore(engine)
        tat = 0.0
        for now in [100.0, 100.0, 100.0, 100.5, 103.0, 103.0]:
            got = rates.book([("global", 0.5, 2)], now)
            tat, expected = book(tat, now, interval=0.5, burst=2)
            assert got == pytest.approx(expected)
        # two limits at once: the longer wait wins
        wait = rates.book([("global", 0.5, 2), ("domain:gmail.com", 10.0, 1)], 103.0)
        assert wait == pytest.approx(book(tat, 103.0, interval=0.5, burst=2)[1])
        assert rates.book([("domain:gmail.com", 10.0, 1)], 103.0) == pytest.approx(10.0)
    finally:
        engine.dispose()


def test_a_booking_one_limit_would_wait_too_long_for_books_nothing(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        rates = RateStore(engine)
        limits = [("global", 0.5, 1), ("domain:slow.example", 10.0, 1)]
        patience = {"domain:slow.example": 5.0}
        assert rates.try_book(limits, patience, 100.0) == (0.0, True)
        # the domain's next slot is 10 s off: neither limit is booked
        assert rates.try_book(limits, patience, 100.0) == (pytest.approx(10.0), False)
        assert rates.try_book(limits, patience, 100.0) == (pytest.approx(10.0), False)
        assert rates.book([("global", 0.5, 1)], 100.0) == pytest.approx(0.5)  # the one slot booked above
        # once the domain's slot is near enough, both are booked
        assert rates.try_book(limits, patience, 106.0) == (pytest.approx(4.0), True)
        assert rates.book([("domain:slow.example", 10.0, 1)], 106.0) == pytest.approx(14.0)
    finally:
        engine.dispose()


def test_the_limiter_tells_messages_to_a_slow_domain_to_come_back_one_interval_apart() -> None:
    clock = FakeClock()
    settings = SendingSettings(rate_per_second=50.0, burst=1, domains={"slow.example": DomainRate(0.1, 1)})
    limiter = Limiter(settings, clock, LocalBooker(clock))

    async def main() -> list[float | Later]:
        return [await limiter.acquire("slow.example", hold=5.0) for _ in range(4)]

    assert asyncio.run(main()) == [0.0, Later(10.0), Later(20.0), Later(30.0)]
    assert clock.slept == 0.0  # nothing waited for in the sender
    clock.advance(10.0)
    assert asyncio.run(limiter.acquire("slow.example", hold=5.0)) == 0.0  # its slot was left free
    assert asyncio.run(limiter.acquire("other.example", hold=5.0)) == pytest.approx(0.02)  # the global rate's


def test_a_sender_that_waits_for_a_slow_domains_slot_itself_is_told_when_and_nothing_is_kept() -> None:
    # Given a domain sent one message every 10 s, its slot just taken
    clock = FakeClock()
    settings = SendingSettings(rate_per_second=50.0, burst=1, domains={"slow.example": DomainRate(0.1, 1)})
    limiter = Limiter(settings, clock, LocalBooker(clock))
    assert asyncio.run(limiter.acquire("slow.example", hold=5.0)) == 0.0

    # When a sender holding a connection asks for a slot within 0.25 s, to wait for a later one itself
    later = asyncio.run(limiter.acquire("slow.example", hold=0.25, message=7, tell=False))

    # Then it learns how far off the next slot is, and no message is counted as told to wait in the ledger, nor
    # does the next one told so come an interval after it
    assert later == Later(10.0)
    assert limiter.waiting() == 0 and limiter.told_times() == {}
    assert asyncio.run(limiter.acquire("slow.example", hold=5.0, message=8)) == Later(10.0)


def test_without_a_given_time_the_database_books_on_its_own_clock(db_url: str) -> None:
    engine = db.create_engine(db_url)
    try:
        rates = RateStore(engine)
        before = time.time()
        assert rates.book([("domain:a.example", 10.0, 1)]) == 0.0
        wait = rates.book([("domain:a.example", 10.0, 1)])
        after = time.time()
        with engine.connect() as conn:
            tat = conn.execute(sa.text("SELECT tat FROM rate_limit WHERE key = 'domain:a.example'")).scalar_one()
        # two slots booked from the database's "now", which is this machine's clock here
        assert before + 20.0 - 0.01 <= tat <= after + 20.0 + 0.01
        assert 10.0 - (after - before) - 0.01 <= wait <= 10.0 + 0.01
    finally:
        engine.dispose()


def test_the_booking_clock_is_the_databases_not_this_process(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose clock is 1,000 s ahead books on the database's clock, like every other worker."""
    engine = db.create_engine(db_url)
    try:
        rates = RateStore(engine)
        real = time.time()
        monkeypatch.setattr(time, "time", lambda: real + 1000.0)
        rates.book([("domain:b.example", 10.0, 1)])
        with engine.connect() as conn:
            tat = conn.execute(sa.text("SELECT tat FROM rate_limit WHERE key = 'domain:b.example'")).scalar_one()
        assert real + 10.0 - 1.0 <= tat <= real + 10.0 + 5.0
    finally:
        engine.dispose()


def test_bookings_queued_behind_a_stalled_worker_still_go_out_one_interval_apart(db_url: str) -> None:
    """Another worker holds the ``global`` row for half a second (stalled mid-transaction);
    the bookings that queue behind it must not come back with slots in the past, or they
    all go out at once when it lets go."""
    interval = 0.05
    engine = db.create_engine(db_url)
    try:
        rates = RateStore(engine)
        rates.book([("global", interval, 1)])
        holding = threading.Event()
        go_at: list[float] = []
        lock = threading.Lock()

        def stalled_worker() -> None:
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE rate_limit SET tat = tat WHERE key = 'global'"))
                holding.set()
                time.sleep(0.5)

        def sender() -> None:
            holding.wait()
            for _ in range(3):
                wait = rates.book([("global", interval, 1)])
                with lock:
                    go_at.append(time.time() + wait)

        threads = [threading.Thread(target=stalled_worker)] + [threading.Thread(target=sender) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.dispose()

    go_at.sort()
    busiest = max(bisect.bisect_left(go_at, t + 2 * interval) - i for i, t in enumerate(go_at))
    assert busiest <= 3, f"{busiest} messages within {2 * interval} s: {[round(t - go_at[0], 3) for t in go_at]}"
    assert go_at[-1] - go_at[0] >= 17 * interval * 0.9


@pytest.mark.postgres
def test_concurrent_bookings_on_postgresql_never_share_a_slot(pg_migrated_url: str) -> None:
    engine = db.create_engine(pg_migrated_url)
    rates = [RateStore(engine) for _ in range(4)]
    waits: list[float] = []
    lock = threading.Lock()

    def worker(r: RateStore) -> None:
        for _ in range(50):
            w = r.book([("global", 0.01, 1)], 1000.0)
            with lock:
                waits.append(w)

    threads = [threading.Thread(target=worker, args=(r,)) for r in rates]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()

    assert sorted(round(w, 6) for w in waits) == [round(i * 0.01, 6) for i in range(200)]


def test_the_rate_settings_round_trip_through_replace() -> None:
    s = replace(SendingSettings(), daily_quota=5)
    assert s.daily_quota == 5


# --- a reload -------------------------------------------------------------------------


def test_a_reload_keeps_the_slots_booked_and_the_throttled_domains_slowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a daemon on SQLite (its limits in the process) allowed one message every 100 s, whose one slot was just
    # taken, and a domain a throttling reply halved
    monkeypatch.setenv("KEMBALI_LINK_SECRET", "test-link-secret-0123456789abcdef")
    shop = make_shop(tmp_path, smtp_port=closed_port(),
                     extra="[sending]\nrate_per_second = 0.01\nburst = 1\ndomain_rate_per_second = 8.0\n")  # fmt: skip

    async def scenario() -> tuple[float, float]:
        daemon = Daemon(load_settings(shop.config), config_path=shop.config)
        try:
            limiter = daemon.gen.dispatcher.limiter
            assert await limiter.acquire("a.example", hold=HOLD_SECONDS) == 0.0
            slow_down = SendResult(Outcome.THROTTLED, 450, "450 4.2.1 mailbox receiving at a high rate")
            limiter.observe("yahoo.com", slow_down)
            # When the operator sends SIGHUP (to load a template, say)
            assert await daemon.reload("SIGHUP")
            limiter = daemon.gen.dispatcher.limiter
            # Then the next message still waits for the next slot, not a fresh burst, and yahoo.com stays slowed
            wait, booked = await limiter.booker.book(limiter.limits("b.example"))
            assert booked
            return wait, limiter.rates["yahoo.com"].current
        finally:
            await daemon._close()
            daemon.store.close()

    seconds, yahoo = asyncio.run(scenario())
    assert 90.0 < seconds <= 100.0
    assert yahoo == 4.0


def test_a_reload_that_raises_a_domains_rate_gives_the_messages_waiting_for_it_the_new_rates_slots() -> None:
    # Given a limiter that sent one message to a domain allowed one every 1000 s and told four to wait for it
    clock = FakeClock()
    slow = SendingSettings(rate_per_second=50.0, burst=1, domains={"slow.example": DomainRate(0.001, 1)})
    old = Limiter(slow, clock, LocalBooker(clock))

    async def told(limiter: Limiter, ids: range) -> list[float | Later]:
        return [await limiter.acquire("slow.example", hold=5.0, message=i) for i in ids]

    assert asyncio.run(told(old, range(5))) == [0.0, Later(1000.0), Later(2000.0), Later(3000.0), Later(4000.0)]
    assert old.waiting() == 4
    clock.advance(100.0)
    # When a reload raises the rate to 2 a second, the messages keep their places, 0.5 s apart from now on
    faster = Limiter(replace(slow, domains={"slow.example": DomainRate(2.0, 1)}), clock, LocalBooker(clock))
    sooner = faster.take_over(old)
    start = clock.monotonic()
    assert sooner == {"slow.example": {1: start, 2: start + 0.5, 3: start + 1.0, 4: start + 1.5}}
    assert faster.waiting() == 3  # the first is due now
    # and a message told to wait next is told to come after them, at the new rate
    assert faster.later["slow.example"] == start + 1.5
    # A reload that lowers the rate leaves them where they are: the ledger's slots are further apart already
    slower = Limiter(replace(slow, domains={"slow.example": DomainRate(0.0005, 1)}), clock, LocalBooker(clock))
    assert slower.take_over(faster) == {"slow.example": {}}


def test_a_reload_keeps_the_relays_throttling_of_the_global_rate() -> None:
    # Given a limiter whose global rate a relay's 421 halved
    clock = FakeClock()
    old = Limiter(SendingSettings(rate_per_second=40.0), clock, LocalBooker(clock))
    old.observe("a.example", SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down", stage="rcpt"),
                began=clock.monotonic())  # fmt: skip
    assert old.pace.current == 20.0 and old.relay_cuts == 1
    # When a reload brings a configuration with another global rate
    new = Limiter(SendingSettings(rate_per_second=30.0), clock, LocalBooker(clock))
    new.take_over(old)
    # Then the global rate stays slowed (within the new configured rate), with no burst, and the run's note says so
    assert new.pace.current == 20.0 and new.limits("b.example")[0] == ("global", 0.05, 1)
    note = new.relay_note(0)
    assert note is not None and "went down to 20/s of sending.rate_per_second 30/s, now 20/s" in note


def test_the_relays_throttling_slows_the_global_rate_and_sends_bring_it_back(caplog: pytest.LogCaptureFixture) -> None:
    # Given a limiter sending to several domains, whose relay says "slow down" for two of them, then takes mail again
    caplog.set_level(logging.INFO, logger="kembali")
    clock = FakeClock()
    limiter = Limiter(SendingSettings(rate_per_second=40.0, burst=40), clock, LocalBooker(clock))
    slow_down = SendResult(Outcome.THROTTLED, 451, "451 4.7.1 Too many messages, slow down", stage="rcpt")
    limiter.observe("a.example", slow_down, began=clock.monotonic())
    assert limiter.pace.current == 40.0 and limiter.rates["a.example"].current == 10.0  # one domain: its own
    clock.advance(0.5)
    limiter.observe("b.example", slow_down, began=clock.monotonic())
    # Then the global rate is halved, without its burst, the second domain is not blamed, and the log says why
    assert limiter.pace.current == 20.0 and limiter.limits("c.example")[0] == ("global", 0.05, 1)
    assert limiter.rates["b.example"].current == 20.0
    (event,) = [r for r in caplog.records if r.getMessage() == "relay_throttled"]
    assert event.kembali_fields["rate_now"] == 20.0
    # and no send begins for a second (the relay's window moves on)
    assert asyncio.run(limiter.acquire("c.example")) == pytest.approx(1.0)
    # When mail goes through again, each 5 s of it brings the rate a quarter back, up to the configured one
    sent = SendResult(Outcome.SENT, 250, "250 ok")
    rates = []
    for _ in range(6):
        clock.advance(5.0)
        limiter.observe("c.example", sent)
        rates.append(limiter.pace.current)
    assert rates == [25.0, 31.25, 39.0625, 40.0, 40.0, 40.0]
    assert limiter.limits("c.example")[0] == ("global", 0.025, 40)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("relay_pace")] == \
        ["relay_pace_raised"] * 3 + ["relay_pace_restored"]


def _send_for(
    limiter: Limiter, clock: FakeClock, seconds: float, fail_every: float, failure: SendResult
) -> list[float]:
    """One sender sending as fast as the limits allow for ``seconds``, over many domains; every ``fail_every``
    seconds one attempt meets ``failure``, every other one is sent. When each send went (seconds from the start)."""
    sent: list[float] = []
    start = clock.monotonic()
    ok = SendResult(Outcome.SENT, 250, "250 2.0.0 Ok: queued", stage="reply")

    async def main() -> None:
        i, next_failure = 0, fail_every
        while clock.monotonic() - start < seconds:
            domain = f"d{i % 50}.example"
            await limiter.acquire(domain)
            began = clock.monotonic()
            if began - start >= next_failure:
                next_failure += fail_every
                limiter.observe(domain, failure, began=began)
            else:
                limiter.observe(domain, ok, began=began)
                sent.append(began - start)
            i += 1

    asyncio.run(main())
    return sent


@pytest.mark.parametrize(
    "failure",
    [
        # a flaky network: the connection drops mid-message now and then (the server said nothing)
        SendResult(Outcome.TRANSIENT, None, "Connection lost while sending the message body", "SMTPServerDisconnected",
                   stage="message"),
        SendResult(Outcome.AMBIGUOUS, None, "Connection lost", "SMTPServerDisconnected", stage="reply"),
        # a relay restarted now and then: one greeting says it is not available
        SendResult(Outcome.TRANSIENT, 421, "421 4.3.2 Service not available, closing transmission channel",
                   stage="connect"),
    ],
)
def test_a_failure_now_and_then_that_asks_nothing_of_the_rate_keeps_the_configured_global_rate(
    failure: SendResult,
) -> None:
    # Given a worker at 20 messages/s whose connection to the relay fails once every 10 s (no "slow down" said)
    clock = FakeClock()
    limiter = Limiter(SendingSettings(rate_per_second=20.0, burst=1, domain_rate_per_second=20.0), clock,
                      LocalBooker(clock))  # fmt: skip
    # When it sends for two minutes
    sent = _send_for(limiter, clock, 120.0, 10.0, failure)
    # Then it sent at the configured rate the whole time: such failures are the dispatcher's pause's, not the pace's
    last_minute = [t for t in sent if t >= 60.0]
    assert len(last_minute) >= 20 * 60 - 10, f"{len(last_minute)} sent in the last minute at 20/s"
    assert limiter.pace.current == 20.0 and limiter.relay_cuts == 0


@pytest.mark.parametrize(
    "reply",
    [
        "452 4.5.3 Too many recipients ([AS:RecipientRateLimit])",  # Microsoft's recipients per sender and minute
        "451 4.7.0 [TSS04] Messages from 203.0.113.5 temporarily deferred due to unexpected volume or user complaints",
    ],
)
def test_a_relays_limit_on_the_sender_that_names_recipients_or_users_slows_the_global_rate(reply: str) -> None:
    # Given a relay that counts the sender's recipients (or its volume) and says so for messages to two domains
    clock = FakeClock()
    limiter = Limiter(SendingSettings(rate_per_second=40.0, burst=40), clock, LocalBooker(clock))
    slow_down = as_throttled(SendResult(Outcome.TRANSIENT, int(reply[:3]), reply, stage="rcpt"))
    for domain in ("a.example", "b.example"):
        limiter.observe(domain, slow_down, began=clock.monotonic())
        clock.advance(0.5)
    # Then it is the relay's limit, not each domain's: the global rate is halved, the second domain not blamed
    assert limiter.pace.current == 20.0 and limiter.relay_cuts == 1
    assert limiter.rates["b.example"].current == 20.0


def test_a_daemon_idle_for_an_hour_after_the_relays_throttling_sends_its_next_batch_at_the_configured_rate() -> None:
    # Given a daemon's limiter whose relay throttled it down to the floor at the end of the morning's batch
    clock = FakeClock()
    limiter = Limiter(SendingSettings(rate_per_second=20.0, burst=1, domain_rate_per_second=20.0,
                                      throttle_floor_per_second=0.2), clock, LocalBooker(clock))  # fmt: skip
    relay_421 = SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down", stage="rcpt")
    for _ in range(8):
        limiter.observe("a.example", relay_421, began=clock.monotonic())
        clock.advance(0.1)
    assert limiter.pace.current == 0.2
    # When the next batch comes an hour later (nothing said "slow down" in between)
    clock.advance(3600.0)
    sent = _send_for(limiter, clock, 10.0, 1e9, relay_421)
    # Then it goes at the configured rate after its first send (booked at the old pace: one interval, 5 s), not at
    # 0.2/s climbing a quarter every 5 s of sends (4 sent in those 10 s)
    assert len(sent) >= 20 * 5 - 5, f"{len(sent)} sent in the batch's first 10 s at 20/s"
    assert limiter.pace.current == 20.0


def test_the_health_lines_relay_fields_clear_once_the_pace_is_back() -> None:
    # Given a limiter whose relay said "421 … slow down" once
    clock = FakeClock()
    limiter = Limiter(SendingSettings(rate_per_second=40.0, burst=40), clock, LocalBooker(clock))
    limiter.observe("a.example", SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down",
                                            stage="rcpt"), began=clock.monotonic())  # fmt: skip
    # Then the health line says the pace and why it is slowed
    status = limiter.relay_status()
    assert status["relay_pace_per_second"] == 20.0 and "slow down" in str(status["relay_throttled"])
    # When mail goes through for long enough that the pace is back at the configured rate
    for _ in range(4):
        clock.advance(5.0)
        limiter.observe("c.example", SendResult(Outcome.SENT, 250, "250 ok"))
    assert not limiter.pace.slowed
    # Then the health line no longer shows the old throttling reply as if it were current, and says when it was
    status = limiter.relay_status()
    assert status["relay_pace_per_second"] == 40.0 and status["relay_throttled"] == ""
    assert status["relay_throttled_seconds_ago"] == 20.0
    # while the run's summary still tells what happened
    note = limiter.relay_note(0)
    assert note is not None and "slow down" in note and "back at the configured rate" in note


def test_workers_sharing_the_database_share_the_relays_pace(db_url: str) -> None:
    """Three workers' limiters on one database: the relay's "slow down" met by one slows the others' global rate and
    shows on their health line; one met by another for an attempt of the same round cuts nothing more."""
    stores = [AsyncStore(Store.from_url(db_url)) for _ in range(3)]
    clock = SystemClock()
    a, b, c = (Limiter(SendingSettings(rate_per_second=50.0, burst=50), clock,
                       DbBooker(s, RateStore(s.store.engine))) for s in stores)  # fmt: skip
    hang_up = SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down", stage="mail")

    async def scenario() -> None:
        before = clock.monotonic()
        for limiter in (a, b, c):
            await limiter.acquire("a.example")
        # Given worker A told "slow down" by the relay: its pace is halved, and its next booking shares the cut
        a.observe("a.example", hang_up, began=clock.monotonic())
        assert a.pace.current == 25.0
        await a.acquire("a.example")  # (after the second's rest)
        # Then worker B, which met no "slow down", books at the halved pace without its burst, and says so
        await b.refresh_pace()
        assert b.limits("b.example")[0] == ("global", 1 / 25.0, 1)
        assert b.relay_status()["relay_pace_per_second"] == 25.0
        assert b.relay_note(0) is not None and "another worker" in b.relay_note(0)  # type: ignore[operator]
        # When worker C is told "slow down" for an attempt that began before A's cut (the same round)
        c.observe("c.example", hang_up, began=before)
        await c.acquire("c.example")
        # Then the shared pace is not cut again: C follows A's cut
        assert c.pace.current == 25.0
        await b.refresh_pace()
        assert b.pace.current == 25.0

    try:
        asyncio.run(scenario())
    finally:
        for s in stores:
            s.close()
            s.store.close()


def test_workers_told_to_slow_down_in_one_round_log_one_cut_and_the_others_join_it(
    db_url: str, smtp_server: RecordingServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers' limiters on one database, each with its own connection to a real relay that hangs up on every
    MAIL FROM with "421 … slow down": the database makes one cut of the round, and the log says one cut, not two."""
    smtp_server.relay_rate = RelayRate(0, at="mail")
    (a, store_a), (b, store_b) = (_shared_limiter(db_url, SendingSettings(rate_per_second=50.0, burst=50))
                                  for _ in range(2))  # fmt: skip

    async def scenario() -> list[SendResult]:
        for limiter in (a, b):
            await limiter.acquire("a.example")
        # Given both workers' attempts under way at once, and both told "421 … slow down" by the relay
        began = a.clock.monotonic()
        async with SmtpTransport(smtp_server.settings()) as ta, SmtpTransport(smtp_server.settings()) as tb:
            results = list(await asyncio.gather(ta.send("shop@toko.example", "x@a.example", make_message(0)),
                                                tb.send("shop@toko.example", "y@b.example", make_message(1))))
        a.observe("a.example", results[0], began=began)
        b.observe("b.example", results[1], began=began)
        # When each books its next slot (where its cut is written to the shared pace)
        await a.acquire("a.example")
        await b.acquire("b.example")
        return results

    try:
        with caplog.at_level(logging.INFO):
            results = asyncio.run(scenario())
    finally:
        _close(store_a, store_b)
    assert [r.code for r in results] == [421, 421], results
    # Then one cut is logged (a WARNING, with the rate it left), by the worker whose cut the database took
    cuts = [r for r in caplog.records if r.getMessage() == "relay_throttled"]
    assert [(r.levelno, r.kembali_fields["rate_now"]) for r in cuts] == [(logging.WARNING, 25.0)]  # type: ignore[attr-defined]
    # And the other says at INFO that it follows that shared pace, no cut of its own
    (joined,) = [r for r in caplog.records if r.getMessage() == "relay_throttled_joined"]
    assert joined.levelno == logging.INFO and joined.kembali_fields["shared_rate"] == 25.0  # type: ignore[attr-defined]
    assert (a.relay_cuts, b.relay_cuts) == (1, 0) and a.pace.current == b.pace.current == 25.0
    # And each run's summary says the same
    assert "(1 time, last: 421" in str(a.relay_note(0))
    assert "another worker sharing the database had already cut" in str(b.relay_note(0))


def _shared_limiter(url: str, settings: SendingSettings) -> tuple[Limiter, AsyncStore]:
    store = AsyncStore(Store.from_url(url))
    return Limiter(settings, SystemClock(), DbBooker(store, RateStore(store.store.engine))), store


def _close(*stores: AsyncStore) -> None:
    for s in stores:
        s.close()
        s.store.close()


def test_a_worker_started_long_after_a_shared_cut_books_its_first_slot_once(db_url: str) -> None:
    # Given the relay's pace, shared through the database, cut an hour ago (long back at the configured rate), and a
    # domain that takes a message every 2 s
    settings = SendingSettings(rate_per_second=50.0, burst=50, domains={"slow.example": DomainRate(0.5, 1)})
    limiter, store = _shared_limiter(db_url, settings)
    RateStore(store.store.engine).cut_pace(lambda last, now: SharedCut(now - 3600.0, 25.0))
    try:
        # When a worker that just started sends its first message to that domain
        waited = asyncio.run(limiter.acquire("slow.example", hold=HOLD_SECONDS))
    finally:
        _close(store)
    # Then it goes at once: the slot it booked is not given up for another one interval later (the pace it read is
    # the configured one it booked at; 2.0 s, its domain's second slot, before)
    assert not limiter.pace.slowed
    assert waited == 0.0


def test_a_reload_that_raises_the_rate_follows_the_shared_pace_the_old_rate_was_under(db_url: str) -> None:
    # Given another worker's shared cut to 20/s, and this worker configured at 10/s: under it, nothing to slow
    old, store = _shared_limiter(db_url, SendingSettings(rate_per_second=10.0, burst=10))
    RateStore(store.store.engine).cut_pace(lambda last, now: SharedCut(now, 20.0))

    async def scenario() -> Limiter:
        await old.acquire("a.example")
        assert not old.pace.slowed
        # When a reload raises sending.rate_per_second to 50/s (burst 50)
        new = Limiter(SendingSettings(rate_per_second=50.0, burst=50), old.clock, old.booker)
        new.take_over(old)
        await new.acquire("a.example")
        return new

    try:
        new = asyncio.run(scenario())
    finally:
        _close(store)
    # Then it books at the shared pace, as every other worker does (20/s, no burst), not at 50/s with a burst of 50
    assert new.limits("b.example")[0] == ("global", 1 / 20.0, 1)
    assert new.relay_status()["relay_pace_per_second"] == 20.0


def test_the_health_lines_read_of_the_shared_pace_does_not_wait_for_sqlites_write_lock(tmp_path: Path) -> None:
    # Given workers sharing their limits through a SQLite file, whose pace another worker cut
    migrated_sqlite(tmp_path / "kembali.db")
    settings = SendingSettings(rate_per_second=50.0, burst=50, shared_limits="database")
    limiter, store = _shared_limiter(f"sqlite:///{tmp_path / 'kembali.db'}", settings)
    RateStore(store.store.engine).cut_pace(lambda last, now: SharedCut(now, 25.0))
    # When another process holds the database's write lock (a planning pass, an operator's command) as the daemon
    # writes its health line
    writer = sqlite3.connect(tmp_path / "kembali.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        # Then the health line reads the shared pace beside it, as it reads the queue (WAL: readers do not wait for
        # the writer), instead of waiting up to the 30 s busy timeout for a write lock it does not need
        asyncio.run(asyncio.wait_for(limiter.refresh_pace(), 5.0))
    finally:
        writer.rollback()
        writer.close()
        _close(store)
    assert limiter.relay_status()["relay_pace_per_second"] == 25.0


def test_a_cut_the_database_could_not_take_is_still_logged_and_counted_by_this_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a worker sharing its limits through a SQLite file, told "421 … slow down" by the relay (its own pace cut,
    # the cut to be written to the shared pace)
    migrated_sqlite(tmp_path / "kembali.db")
    limiter, store = _shared_limiter(f"sqlite:///{tmp_path / 'kembali.db'}", SendingSettings(rate_per_second=50.0,
                                                                                               burst=50))
    store.RETRY_SECONDS = ()  # given up at the first failure (the retries are another test's)
    hang_up = SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down", stage="mail")
    limiter.observe("a.example", hang_up, began=limiter.clock.monotonic())
    # When the database fails as the cut is written (its table gone: a real failure, not a stand-in)
    with sqlite3.connect(tmp_path / "kembali.db") as conn:
        conn.execute("DROP TABLE rate_limit")
    try:
        with caplog.at_level(logging.INFO), pytest.raises(sa.exc.OperationalError):
            asyncio.run(limiter.share_cut())
    finally:
        _close(store)
    # Then the cut this worker made is still logged (once) and counted, and the run's summary says one, not none
    cuts = [r for r in caplog.records if r.getMessage() == "relay_throttled"]
    assert [r.kembali_fields["rate_now"] for r in cuts] == [25.0]  # type: ignore[attr-defined]
    assert limiter.relay_cuts == 1 and limiter.pace.current == 25.0
    assert "(1 time, last: 421" in str(limiter.relay_note(0))


def test_a_round_of_slow_downs_met_by_one_worker_before_it_shares_the_cut_logs_the_cut_from_the_configured_rate(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Attempts already under way when the relay first said "slow down" (booked before it, begun after it) are told
    so too, each before this worker books again and writes its cut: the database takes one cut of the round."""
    limiter, store = _shared_limiter(db_url, SendingSettings(rate_per_second=50.0, burst=50))
    hang_up = SendResult(Outcome.THROTTLED, 421, "421 4.7.0 Too many messages, slow down", stage="mail")

    async def scenario() -> None:
        await limiter.acquire("a.example")
        # Given the relay's "slow down" to one attempt, and then to two more that began after it
        for domain in ("a.example", "b.example", "c.example"):
            limiter.observe(domain, hang_up, began=limiter.clock.monotonic())
        # When this worker books its next slot (its cut written to the shared pace)
        await limiter.acquire("a.example")

    try:
        with caplog.at_level(logging.INFO):
            asyncio.run(scenario())
    finally:
        _close(store)
    # Then the log says one cut, from the configured 50/s to the 25/s the shared pace now holds (not from 12.5/s up to
    # 25/s, the last attempt's rate before it), and the pace is that one
    cuts = [r.kembali_fields for r in caplog.records if r.getMessage() == "relay_throttled"]  # type: ignore[attr-defined]
    assert [(c["rate_before"], c["rate_now"]) for c in cuts] == [(50.0, 25.0)], cuts
    assert limiter.relay_cuts == 1 and limiter.pace.current == 25.0


def test_a_run_the_relay_asked_nothing_of_says_the_rate_is_still_slowed_not_that_it_asked_0_times() -> None:
    # Given a daemon whose run met the relay's "slow down" (the global rate halved to 20/s)
    clock = FakeClock()
    limiter = Limiter(SendingSettings(rate_per_second=40.0, burst=40), clock, LocalBooker(clock))
    limiter.observe("a.example", SendResult(Outcome.THROTTLED, 421, "421 4.7.0 slow down", stage="mail"),
                    began=clock.monotonic())  # fmt: skip
    # When its next run, a second later, meets none (the rate still slowed)
    cuts, joined = limiter.relay_cuts, limiter.relay_joined
    clock.advance(1.0)
    note = str(limiter.relay_note(cuts, joined))
    # Then its summary says the rate is still slowed, and by what, not that the relay asked "0 times"
    assert "0 times" not in note, note
    assert "did not ask this worker to slow down in this run" in note and "now 20/s" in note
    assert "421 4.7.0 slow down" in note


def test_a_recipient_domain_as_long_as_an_address_may_have_is_booked_on_a_shared_database(db_url: str) -> None:
    """A domain of 253 characters (the most DNS allows, which an address may carry): its rate row's key is longer
    than the 200 characters the shared ``rate_limit`` table holds on PostgreSQL, and every booking for it failed
    there and was tried again and again. It is booked, apart from every other domain."""
    long_domain = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 58, "id"])
    assert len(long_domain) == 253
    other = long_domain[:-2] + "my"
    limiter, store = _shared_limiter(db_url, SendingSettings(rate_per_second=50.0, burst=50,
                                                             domains={long_domain: DomainRate(0.5, 1)}))  # fmt: skip

    async def scenario() -> tuple[float, float, float]:
        first = await asyncio.wait_for(limiter.acquire(long_domain), 10)
        # the domain's slots are its own: the next one is 2 s off, and another long domain's is not
        other_wait = await asyncio.wait_for(limiter.acquire(other), 10)
        before = time.monotonic()
        await asyncio.wait_for(limiter.acquire(long_domain), 10)
        return first, other_wait, time.monotonic() - before

    try:
        first, other_wait, second = asyncio.run(scenario())
    finally:
        _close(store)
    assert first == 0.0 and other_wait == 0.0
    assert second > 1.0


def test_a_reload_that_raises_a_domains_rate_on_a_shared_database_sends_its_waiting_messages_at_the_new_rate(
    db_url: str,
) -> None:
    # Given a worker sharing its limits through the database that sent one message to a domain allowed one every
    # 1000 s and told two more to wait for it
    slow = SendingSettings(rate_per_second=50.0, burst=1, domains={"slow.example": DomainRate(0.001, 1)})
    old, store = _shared_limiter(db_url, slow)
    faster, new_store = _shared_limiter(db_url, replace(slow, domains={"slow.example": DomainRate(2.0, 1)}))

    async def scenario() -> list[float | Later]:
        told = [await old.acquire("slow.example", hold=5.0, message=i) for i in range(3)]
        assert told[0] == 0.0 and all(isinstance(t, Later) and t.seconds > 900 for t in told[1:])
        # When a reload raises the domain's rate to 2 a second: the messages waiting are brought forward
        sooner = faster.take_over(old)
        assert set(sooner["slow.example"]) == {1, 2}
        # Then, come due, they book slots at the new rate, not one 1000 s after the last message sent
        return [await faster.acquire("slow.example", hold=5.0, message=i) for i in (1, 2)]

    try:
        slots = asyncio.run(scenario())
    finally:
        _close(store, new_store)
    assert all(isinstance(s, float) and s <= 0.6 for s in slots), slots

"""The contact policy: frequency caps, priorities, quiet hours and holdouts, with time as an argument.

Theory of operation
-------------------
* A **cap** is a list of windows ("at most 1 email per 3 days, 4 per 30 days").
  An email sent at ``e`` counts against a window of length ``w`` at time ``t``
  while ``t - w < e <= t``; so one email per 3 days sent on Monday 10:00 frees
  the next slot on Thursday 10:00 exactly. ``next_free_slot`` is the earliest
  instant at or after ``at`` where every window has room.
* **Quiet hours** are read on the customer's wall clock (their IANA zone, the
  shop's by default): ``next_allowed`` moves an instant inside them to the
  moment they end.
* **Priorities** decide between competing messages for one customer: the
  higher one takes the free slot, the others wait for the next (``arrange``).
* A message whose next possible instant is past its expiry is dropped
  (``expired``); one held out of its campaign (``in_holdout``, a deterministic
  function of customer and campaign) is never sent at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worker.domain import SkipReason, place_zones

DEFAULT_PRIORITY_ORDER = ("birthday", "feedback", "winback", "loyalty", "new_products")


@dataclass(frozen=True, slots=True)
class CapWindow:
    """At most ``max_messages`` emails in any ``days``-day window."""

    max_messages: int
    days: float

    @property
    def length(self) -> timedelta:
        return timedelta(days=self.days)


@dataclass(frozen=True, slots=True)
class QuietHours:
    """Local wall-clock hours in which nothing is sent; ``start == end`` means none."""

    start: time
    end: time

    def contains(self, local: time) -> bool:
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end  # across midnight


@dataclass(frozen=True, slots=True)
class ContactPolicy:
    caps: tuple[CapWindow, ...] = (CapWindow(1, 3), CapWindow(4, 30))
    quiet: QuietHours | None = QuietHours(time(21, 0), time(8, 0))
    default_zone: str = "Asia/Jakarta"
    priorities: Mapping[str, int] = field(default_factory=lambda: priorities_from_order(DEFAULT_PRIORITY_ORDER))

    @property
    def lookback(self) -> timedelta:
        """How far back sent emails can still count against a cap."""
        return max((w.length for w in self.caps), default=timedelta(0))

    def priority(self, campaign: str) -> int:
        return self.priorities.get(campaign, 0)


def priorities_from_order(order: Sequence[str]) -> dict[str, int]:
    """``("birthday", "feedback", …)`` → ``{"birthday": 50, "feedback": 40, …}`` (first is highest)."""
    return {name: 10 * (len(order) - i) for i, name in enumerate(order)}


def zone_of(name: str, default: str) -> ZoneInfo:
    """The customer's zone, or the default when the name is empty, unknown, or a name the zone database holds that
    says where no one is (``domain.place_zones``, which the importer and the config check too): ``localtime`` is
    the zone of whichever host reads it, ``Factory`` reads every time as "-00"."""
    for candidate in (name, default):
        if candidate and candidate in place_zones():
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


# --- caps --------------------------------------------------------------------


def next_free_slot(sent: Sequence[datetime], at: datetime, caps: Sequence[CapWindow]) -> datetime:
    """The earliest instant ``>= at`` at which one more email keeps every window within its limit."""
    events = sorted(sent)
    t = at
    moved = True
    while moved:
        moved = False
        for window in caps:
            inside = [e for e in events if t - window.length < e <= t]
            if len(inside) >= window.max_messages:
                # wait until enough of the oldest ones leave this window
                leaving = inside[len(inside) - window.max_messages]
                t = leaving + window.length
                moved = True
    return t


def waits_for(
    ahead: Sequence[tuple[datetime, datetime]],
    sent: Sequence[datetime],
    now: datetime,
    caps: Sequence[CapWindow],
    zone: ZoneInfo | None = None,
    quiet: QuietHours | None = None,
) -> datetime | None:
    """When a message due ``now`` must wait until, so that sending it does not cost a higher-priority message for
    the same mailbox, due at one of ``ahead``'s times and expiring at its other (a birthday offer ahead of its
    window), its one chance: the earliest of those that could go before they expire (the cap's next free slot,
    out of the customer's quiet hours in ``zone``) but not after this message. One only pushed later within its
    window (a birthday offer three days before the birthday goes one day before) does not hold it back. None: it
    need not wait (the cap may still hold it back). Waiting until then, the two compete for one slot, and priority
    decides."""
    if next_free_slot(sent, now, caps) > now:
        return None  # the cap holds it back anyway
    def goes(at: datetime) -> datetime:
        return at if zone is None else next_allowed(at, zone, quiet)

    for at, expires in sorted(a for a in ahead if a[0] > now):
        alone, after = goes(next_free_slot(sent, at, caps)), goes(next_free_slot([*sent, now], at, caps))
        if alone < expires <= after:
            return at
    return None


# --- quiet hours -------------------------------------------------------------


def next_allowed(at: datetime, zone: ZoneInfo, quiet: QuietHours | None) -> datetime:
    """``at`` itself when outside quiet hours on the customer's clock, else the instant they end (UTC). On a day
    the calendar skipped whole (Apia's 30 December 2011) the clock jumps from the night before to the midnight
    after, past the end: quiet hours then end on the day after, as they would have that night."""
    if quiet is None:
        return at
    while quiet.contains((local := at.astimezone(zone)).time().replace(tzinfo=None)):
        end_day: date = local.date()
        if quiet.start > quiet.end and local.time().replace(tzinfo=None) >= quiet.start:
            end_day += timedelta(days=1)
        at = _clock_reaches(datetime.combine(end_day, quiet.end), zone, at)
    return at


def _clock_reaches(wall: datetime, zone: ZoneInfo, at: datetime) -> datetime:
    """The first instant at or after ``at`` at which ``zone``'s clock shows the naive ``wall`` time, ``at`` being
    earlier on that clock. A wall time shown twice (the clocks went back) is reached at the occurrence after ``at``;
    one skipped (the clocks went forward over it) is reached at the moment of the jump."""
    first, second = (wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
    if first <= second:  # shown once (equal) or twice
        return first if first >= at else second
    # skipped: fold 0 reads it with the offset before the jump (later), fold 1 with the one after (earlier); the
    # jump, on a whole second, is between them: the first second whose clock shows ``wall`` or later
    low, high = int(second.timestamp()), int(first.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= wall:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


# --- holdout -----------------------------------------------------------------


HOLDOUT_MODULUS = 2**31 - 1
"""Holdout positions are integers modulo this prime (small enough that SQL computes them in 64-bit integers)."""


def holdout_factors(campaign: str) -> tuple[int, int]:
    """The campaign's multiplier (never 0) and offset, from SHA-256 of its name: each campaign orders customers
    its own way, so one campaign's holdout group is not another's."""
    digest = hashlib.sha256(f"kembali-holdout\0{campaign}".encode()).digest()
    multiplier = 1 + int.from_bytes(digest[:8], "big") % (HOLDOUT_MODULUS - 1)
    return multiplier, int.from_bytes(digest[8:16], "big") % HOLDOUT_MODULUS


def holdout_position(customer_id: int, campaign: str) -> int:
    """A customer's position in a campaign: ``(id * multiplier + offset) mod (2**31 - 1)``.

    The customer's row id, not a hash of its external id, so SQL computes the same number in one expression
    (``adapters.plan_sql.holdout_position_sql``; SQLite has no hash function, and a Python function it calls
    per row cost a quarter of planning's writes). Consecutive ids step through the positions by the
    multiplier, so the group is ``share`` of any run of ids, to within a few per thousand, and two campaigns'
    groups overlap by the product of their shares (tests/test_policy.py measures both)."""
    multiplier, offset = holdout_factors(campaign)
    return ((customer_id % HOLDOUT_MODULUS) * multiplier + offset) % HOLDOUT_MODULUS


def holdout_threshold(share: float) -> int:
    """Positions below this are held out: ``share`` of the modulus, as an integer, so SQL and Python compare the
    same integers."""
    if share <= 0:
        return 0
    return min(int(share * HOLDOUT_MODULUS), HOLDOUT_MODULUS)


def in_holdout(customer_id: int, campaign: str, share: float) -> bool:
    """Deterministic: the same customer is always in (or out of) a campaign's holdout group."""
    if share <= 0:
        return False
    return holdout_position(customer_id, campaign) < holdout_threshold(share)


# --- deciding ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Due:
    """A message competing for a customer's slot."""

    key: str
    campaign: str
    priority: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class SendNow:
    pass


@dataclass(frozen=True, slots=True)
class DeferUntil:
    at: datetime
    why: str
    """``cap`` or ``quiet_hours`` (for logs and preview); the send-time re-check adds ``news_week``,
    ``after_delivery`` and ``birthday`` (``worker.pipeline.Composer.decide``)."""


@dataclass(frozen=True, slots=True)
class Skip:
    reason: SkipReason


Decision = SendNow | DeferUntil | Skip


def deferred(until: datetime, expires_at: datetime, why: str) -> DeferUntil | Skip:
    """Wait until ``until``, or skip as ``expired`` when that is not before the message's expiry."""
    return Skip(SkipReason.EXPIRED) if until >= expires_at else DeferUntil(until, why)


def decide_one(
    message: Due, sent: Sequence[datetime], now: datetime, policy: ContactPolicy, zone: ZoneInfo
) -> Decision:
    """The decision for one message given the customer's sent timestamps (nothing else competing)."""
    if now >= message.expires_at:
        return Skip(SkipReason.EXPIRED)
    slot = next_free_slot(sent, now, policy.caps)
    allowed = next_allowed(slot, zone, policy.quiet)
    # cap windows only empty out as time passes, so a later instant is still free
    if allowed == now:
        return SendNow()
    return deferred(allowed, message.expires_at, "cap" if slot > now else "quiet_hours")


def arrange(
    messages: Sequence[Due], sent: Sequence[datetime], now: datetime, policy: ContactPolicy, zone: ZoneInfo
) -> dict[str, Decision]:
    """Decisions for one customer's competing messages: by priority (then key), each one sent now
    takes its slot from those after it."""
    taken = list(sent)
    out: dict[str, Decision] = {}
    for m in sorted(messages, key=lambda m: (-m.priority, m.key)):
        decision = decide_one(m, taken, now, policy, zone)
        if isinstance(decision, SendNow):
            taken.append(now)
        out[m.key] = decision
    return out


def decide(
    message: Due,
    sent: Sequence[datetime],
    competing: Sequence[Due],
    now: datetime,
    policy: ContactPolicy,
    zone: ZoneInfo,
) -> Decision:
    """Send now, defer until a time, or skip: ``message`` against the customer's actually-sent
    timestamps and the other messages due for them at ``now``."""
    others = [c for c in competing if c.key != message.key]
    return arrange([message, *others], sent, now, policy, zone)[message.key]

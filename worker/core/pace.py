"""The relay's pace: the global rate, slowed when the SMTP relay itself says "slow down". Pure: ``now`` is an
argument (seconds on the caller's monotonic clock).

Kembali hands every message to one relay (``smtp.host``), so a throttling reply may be that relay's own limit
(every message alike, whoever it is for) or a limit it keeps for one recipient domain. ``throttle_scope`` tells
them apart:

* ``"relay"``: the relay said "slow down" for everyone: a 421 once the session is open (it closes the channel), a
  refusal at MAIL FROM that asks to slow down, or a 4xx greeting that does ("too many connections", "rate", "a limit":
  nothing about a recipient was said yet), a reply that names the relay's own limit (``_RELAYS_OWN``: Google's "Peak
  SMTP relay limit exceeded", Microsoft 365's "sender thread limit exceeded"), or a "slow down" that is not about a
  mailbox met for recipients at ``RELAY_DOMAINS`` different domains within ``RELAY_WINDOW_SECONDS``. Not a connection
  dropped without a reply (a flaky network drops them too) nor a greeting that says nothing of rate ("421 Service not
  available": an outage, a restart): those say nothing about the pace, and the dispatcher's pause
  (``sending.pause_after_failures``) takes a relay that keeps failing;
* ``"domain"``: a "slow down" about a mailbox (a 4.2.x status, "mailbox", "recipient", "user": Gmail's
  ``450 4.2.1 The user you are trying to contact is receiving mail at a rate…``), or one met for one domain alone
  so far: that domain's adaptive rate (``limits.AdaptiveRate``) takes it;
* None: not throttling.

``RelayPace`` slows the global rate down fast and brings it back gradually: a relay-wide signal halves it (never
below a floor) and holds every send back ``REST_SECONDS`` (or one new interval), once per round (a signal from an
attempt that began before the last cut was booked at the old pace and says nothing new); after ``RECOVER_SECONDS``
without a signal, a send raises it by a quarter (a step for each such spell: all the way back after a quiet hour),
up to the configured rate.

Workers that share their limits through a database share the pace too (``SharedCut``): a cut one of them makes is
the last cut for all of them (``shared_cut`` decides it once, against the last cut any of them made), and each
follows it (``RelayPace.follow``): the same rate, the same rest, and the same steps back up, counted from the cut's
time alone, so that every worker is back at the same rate at the same moment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from worker.core.limits import BoundedRate, asks_to_slow_down, is_throttling
from worker.core.retry import connection_failure, enhanced_code
from worker.domain import Outcome, SendResult

Scope = Literal["relay", "domain"]

RELAY_DOMAINS = 2
"""Recipient domains that must meet a "slow down" (not about a mailbox) within ``RELAY_WINDOW_SECONDS`` before it is
the relay's own limit."""
RELAY_WINDOW_SECONDS = 10.0
REST_SECONDS = 1.0
"""After a cut no send begins for this long (or one new interval, if longer): a relay counts its limits over a second
or more, and what is sent before its window has moved on is refused too (and would cut the rate again)."""
RECOVER_SECONDS = 5.0
"""Seconds without a relay-wide signal before each step back up."""
RECOVER_FACTOR = 1.25

_LIMIT = re.compile(r"\blimit|try again later, closing connection", re.IGNORECASE)
"""What a greeting says of a limit besides ``asks_to_slow_down``: Microsoft's "421 4.3.2 The maximum number of
concurrent server connections has exceeded a limit", Gmail's "421 4.7.0 Try again later, closing connection" (its
SMTP relay's limit at HELO); not "Service not available" nor Gmail's "Temporary System Problem"."""
_ABOUT_A_MAILBOX = re.compile(rf"{enhanced_code('4', '2')}|mailbox|\brecipients?\b|\buser\b", re.IGNORECASE)
_ABOUT_THE_SENDER = re.compile(r"too many recipients|\buser complaints|\[TSS?0[1-4]\]", re.IGNORECASE)
"""What names recipients or users but is about the sender: its recipients per session or hour (Gmail's and
Microsoft's ``452 4.5.3 … too many recipients``; Kembali sends one recipient a message), Yahoo's deferrals of the
sending IP (``[TSS04] Messages from … unexpected volume or user complaints``)."""

_RELAYS_OWN = re.compile(r"\brelay limit exceeded|sender thread limit", re.IGNORECASE)
"""What names the relay's (the sending account's) own limit, whoever the recipient: Google Workspace's "450 4.2.1 Peak
SMTP relay limit exceeded for customer" (its 4.2.1 is not a mailbox's), Microsoft 365's "432 4.3.2
STOREDRV.ClientSubmit; sender thread limit exceeded"."""


def throttle_scope(result: SendResult) -> Scope | Literal["maybe_relay"] | None:
    """Where a result's "slow down" belongs, from the reply alone: ``"relay"``, ``"domain"``, ``"maybe_relay"`` (a
    "slow down" not about a mailbox: the relay's when other domains meet it too, ``RelayPace.scope``), or None (not
    throttling)."""
    kind = connection_failure(result)
    if kind is not None:  # before RCPT TO: nothing about a recipient was said yet
        if kind != "connection" or result.code is None or result.code >= 500:
            # setup, login, a refused or dropped connection, a 5xx greeting refusing this client (a block list,
            # "too many complaints"): the dispatcher's pause, not a pace
            return None
        if result.stage == "connect":  # a greeting or EHLO: an outage says 421 too, only a "slow down" counts
            return "relay" if asks_to_slow_down(result.reply) or _LIMIT.search(result.reply) else None
        return "relay" if is_throttling(result.code, result.reply) else None
    if result.outcome is not Outcome.THROTTLED:
        return None
    if _RELAYS_OWN.search(result.reply):
        return "relay"
    reply = _ABOUT_THE_SENDER.sub("", result.reply)
    if _ABOUT_A_MAILBOX.search(reply):
        return "domain"
    return "relay" if result.code == 421 else "maybe_relay"


@dataclass
class RelayPace(BoundedRate):
    """The global rate, adaptive to the relay's throttling (see the module docstring): ``ceiling`` is
    ``sending.rate_per_second``, ``floor`` ``sending.throttle_floor_per_second``."""

    cut_at: float | None = None
    """When the last cut was made."""
    stepped_at: float | None = None
    """When the last step back up was made."""
    quiet_until: float = 0.0
    """No send begins before this (``REST_SECONDS`` or one new interval after a cut: the relay just hung up or said
    "slow down")."""
    seen: dict[str, float] = field(default_factory=dict)
    """Per recipient domain, when it last met a "slow down" not about a mailbox."""

    @property
    def slowed(self) -> bool:
        return self.current < self.ceiling

    def scope(self, result: SendResult, domain: str, now: float) -> Scope | None:
        """``throttle_scope``, with a "maybe" settled by what other domains met within ``RELAY_WINDOW_SECONDS``."""
        scope = throttle_scope(result)
        if scope != "maybe_relay":
            return scope
        self.seen = {d: t for d, t in self.seen.items() if now - t <= RELAY_WINDOW_SECONDS}
        self.seen[domain] = now
        return "relay" if len(self.seen) >= RELAY_DOMAINS else "domain"

    def throttled(self, now: float, *, began: float) -> bool:
        """A relay-wide signal at ``now`` from an attempt that began at ``began``: halve the rate and hold the next
        send back one new interval, unless the attempt began before the last cut (it went at the old pace). Whether
        it cut."""
        if self.cut_at is not None and began < self.cut_at:
            return False
        self.current = max(self.floor, self.current / 2.0)
        self.cut_at = now
        self.quiet_until = max(self.quiet_until, now + max(REST_SECONDS, 1.0 / self.current))
        return True

    def succeeded(self, now: float) -> bool:
        """A send went through at ``now``: one step back up for each ``RECOVER_SECONDS`` passed since the last cut
        or step (a daemon idle for an hour after a cut is back at the configured rate at its next send, not a
        quarter up every 5 s of sends from the floor). Whether it stepped."""
        if not self.slowed:
            return False
        last = max(t for t in (self.cut_at, self.stepped_at, -1e18) if t is not None)
        steps = int(min(now - last, 1e6) // RECOVER_SECONDS)
        if steps < 1:
            return False
        self.current = min(self.ceiling, self.current * RECOVER_FACTOR ** min(steps, 100))
        self.stepped_at = last + steps * RECOVER_SECONDS
        return True

    def follow(self, cut: SharedCut, now: float) -> None:
        """Take ``cut`` (made by this worker or another sharing the pace; ``cut.at`` on this pace's clock) as the last
        cut: its rate, its rest, and the steps back up made since (``succeeded``: from the cut's time alone)."""
        self.current = max(self.floor, min(self.ceiling, cut.rate))
        self.cut_at, self.stepped_at = cut.at, None
        self.quiet_until = max(self.quiet_until, cut.at + max(REST_SECONDS, 1.0 / self.current))
        self.succeeded(now)

    def wait(self, now: float) -> float:
        """Seconds before a send may begin (after a cut), 0 if now."""
        return max(0.0, self.quiet_until - now)


@dataclass(frozen=True)
class SharedCut:
    """The last cut of a pace several workers share: when it was made (on the clock they share) and the rate it
    left."""

    at: float
    rate: float


def shared_cut(last: SharedCut | None, *, ceiling: float, floor: float, now: float, began: float) -> SharedCut | None:
    """A relay-wide signal at ``now`` from an attempt that began at ``began``, given the shared pace's ``last`` cut
    (any worker's; None: never cut): the cut to share, or None when the attempt began before the rest after ``last``
    was over: it went at the old pace, or from a worker that did not know of the cut yet (one that knew would have
    rested). One cut per round, however many workers met the signal."""
    pace = RelayPace(ceiling=ceiling, floor=floor)
    if last is not None:
        pace.follow(last, now)
        if began < pace.quiet_until:
            return None
    return SharedCut(now, pace.current) if pace.throttled(now, began=began) else None

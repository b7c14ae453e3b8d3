"""The contact policy at send time: one ``Arbiter`` per dispatch run (or preview).

The ledger knows what was actually sent; the arbiter adds what this run has
decided to send and the ledger cannot show yet, so two messages for one
mailbox in one batch, or in two batches of one run, cannot both take the same
free slot. The cap counts per mailbox (``domain.mailbox``), not per customer
record: a shop's guest checkouts can give one person several records with one
address, and that person's inbox is what the cap protects. Messages arrive in
claim order (priority first), so the highest priority message takes the slot
and the others are deferred to the next one.

Its memory stays small however long the run: a send it decided is remembered
until the ledger shows it. Each batch's facts are read after a known number of
the ledger writer's commits (``facts_seq``); a send whose outcome was committed
by then is in those facts and is not counted twice, and once every batch still
to be decided was read after that commit, it is forgotten. A decided send that
ended in no email (failed, retried, released) is forgotten when that outcome is
committed. Preview commits nothing and passes no ``facts_seq``: its arbiter
remembers everything it decided.

Several workers sharing one database each keep their own arbiter, and two of
them may claim two messages for one mailbox at the same moment, each judging
against a ledger that shows neither. The mark that makes a row ``sending``
settles it (``Store.record_and_mark``): a row whose mailbox another worker is
sending to, or was sent something by another worker from a minute before the
row was claimed on, is held back and goes back to the queue, to be judged again
against the ledger a minute later. (The minute covers a send recorded only after
this batch's facts were read, and hosts whose clocks disagree by less.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from worker.core.campaigns import NEW_PRODUCTS, next_news_at
from worker.core.policy import ContactPolicy, Decision, Due, SendNow, decide_one, deferred, waits_for, zone_of
from worker.domain import ClaimedMessage, CustomerSnapshot, mailbox


@dataclass(slots=True, eq=False)
class _Decided:
    """A send this run decided on, not yet visible to every batch still to come."""

    mailbox: str
    at: datetime
    campaign: str
    committed_seq: int | None = None
    """The ledger writer's commit that recorded it as sent; None while in flight."""


def judge(
    policy: ContactPolicy,
    message: ClaimedMessage,
    customer: CustomerSnapshot,
    sent: Sequence[datetime],
    now: datetime,
    ahead: Sequence[tuple[datetime, datetime]] = (),
) -> Decision:
    """The contact policy for one message against its mailbox's sends ``sent`` alone. ``ahead``: when the
    birthday offers to come for its mailbox fall due and expire (a message of lower priority waits rather than
    leave one no slot before it expires, ``policy.waits_for``)."""
    # a birthday offer planned ahead (due when its window opens) is not yet claimable: without quiet hours to
    # hold this one back until then, it would take the birthday's slot and the birthday would expire waiting
    zone = zone_of(customer.time_zone, policy.default_zone)
    if (until := waits_for(ahead, sent, now, policy.caps, zone, policy.quiet)) is not None:
        return deferred(until, message.expires_at, "birthday")
    due = Due(message.dedupe_key, message.campaign, policy.priority(message.campaign), message.expires_at)
    return decide_one(due, sent, now, policy, zone)


class Arbiter:
    def __init__(self, policy: ContactPolicy) -> None:
        self.policy = policy
        self._by_mailbox: dict[str, list[_Decided]] = {}
        self._by_message: dict[int, _Decided] = {}
        self._remembered = 0
        self.peak = 0
        """The most sends it remembered at once (its memory's high-water mark)."""

    def decide(
        self,
        message: ClaimedMessage,
        customer: CustomerSnapshot,
        sent: Sequence[datetime],
        now: datetime,
        facts_seq: int | None = None,
        ahead: Sequence[tuple[datetime, datetime]] = (),
    ) -> Decision:
        """Send now, defer, or skip (expired); a "send now" takes the mailbox's slot. ``sent``: the
        mailbox's sends in the ledger as read after ``facts_seq`` commits (None: nothing this run
        decided is in them). ``ahead``: the birthday offers planned ahead for the mailbox (``judge``), which
        must keep their slot from this run's sends too, not only the ledger's. New-products news this run decided
        to send the mailbox holds more news back a week, as the ledger's does (``cc.NEWS_SPACING``), cap or none."""
        box = mailbox(message.email)
        unseen = [d for d in self._by_mailbox.get(box, ()) if not _visible(d, facts_seq)]
        news_at = next_news_at([d.at for d in unseen if d.campaign == NEW_PRODUCTS])
        if message.campaign == NEW_PRODUCTS and news_at is not None and news_at > now:
            return deferred(news_at, message.expires_at, "news_week")
        decision = judge(self.policy, message, customer, [*sent, *(d.at for d in unseen)], now, ahead)
        if isinstance(decision, SendNow):
            entry = _Decided(box, now, message.campaign)
            self._by_mailbox.setdefault(box, []).append(entry)
            self._by_message[message.id] = entry
            self._remembered += 1
            self.peak = max(self.peak, self._remembered)
        return decision

    def settled(self, message_id: int, *, sent: bool, seq: int) -> None:
        """The ledger writer committed this message's outcome in its commit number ``seq``."""
        entry = self._by_message.pop(message_id, None)
        if entry is None:
            return
        if sent:
            entry.committed_seq = seq
        else:  # no email left: it takes no slot
            self._drop(entry)

    def forget_visible(self, facts_seq: int) -> None:
        """Every batch still to be decided was read after commit ``facts_seq``: what that commit and the
        ones before it recorded is in their facts."""
        for box in [b for b, entries in self._by_mailbox.items() if any(_visible(e, facts_seq) for e in entries)]:
            kept = [e for e in self._by_mailbox[box] if not _visible(e, facts_seq)]
            self._remembered -= len(self._by_mailbox[box]) - len(kept)
            if kept:
                self._by_mailbox[box] = kept
            else:
                del self._by_mailbox[box]

    def remembered(self) -> int:
        """Sends this arbiter still counts beside the ledger (its memory)."""
        return self._remembered

    def _drop(self, entry: _Decided) -> None:
        entries = self._by_mailbox.get(entry.mailbox, [])
        if entry in entries:
            entries.remove(entry)
            self._remembered -= 1
        if not entries:
            self._by_mailbox.pop(entry.mailbox, None)


def _visible(entry: _Decided, facts_seq: int | None) -> bool:
    return entry.committed_seq is not None and facts_seq is not None and entry.committed_seq <= facts_seq

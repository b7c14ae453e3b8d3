"""The contact policy at send time: one ``Arbiter`` per dispatch run (or preview).

The arbiter remembers, per customer, when they were actually sent email (read
from the ledger the first time the customer comes up in this run) plus every
message this run has decided to send, so two messages for one customer in one
batch, or in two batches of one run, cannot both take the same free slot.
Messages arrive in claim order (priority first), so the highest-priority
message takes the slot and the others are deferred to the next one.

Several workers sharing one PostgreSQL database each keep their own arbiter:
two workers that claim two messages for the same customer at the same moment
could both send (the window is one batch); the next run sees both in the
ledger and defers everything else accordingly.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from worker.core.policy import ContactPolicy, Decision, Due, SendNow, decide_one, zone_of
from worker.domain import ClaimedMessage, CustomerSnapshot


class Arbiter:
    def __init__(self, policy: ContactPolicy) -> None:
        self.policy = policy
        self._taken: dict[int, list[datetime]] = {}

    def decide(
        self, message: ClaimedMessage, customer: CustomerSnapshot, sent: Sequence[datetime], now: datetime
    ) -> Decision:
        """Send now, defer, or skip (expired); a "send now" takes the customer's slot."""
        taken = self._taken.setdefault(customer.id, list(sent))
        due = Due(message.dedupe_key, message.campaign, self.policy.priority(message.campaign), message.expires_at)
        decision = decide_one(due, taken, now, self.policy, zone_of(customer.time_zone, self.policy.default_zone))
        if isinstance(decision, SendNow):
            taken.append(now)
        return decision

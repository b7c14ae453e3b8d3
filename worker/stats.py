"""Reports from the ledger and the orders: `kembali stats` and `kembali insights`.

Queries live in ``adapters.reports``; the arithmetic in ``core.stats``. This
module joins them into plain report values with a ``as_json`` each. Conversions
are counted in the database (``reports.conversions``: a million ledger rows never
reach Python), to the definition of ``core.stats.conversion``.

Definitions (also in the README):
* emailed: ``sent`` rows planned since ``since``; the moment is ``sent_at``.
* held out: rows skipped with reason ``held_out``; the moment is when the row
  became due (the later of due and planned), i.e. when the email would have gone.
* treated (the other side of the lift): every row that is not held out, sent
  or not (a win-back skipped because the customer ordered before it went out, a
  capped or bounced one…), at the same moment as the held-out rows: comparing
  the emailed customers from their send time would leave out of one group only
  the customers who bought before the send (intention to treat).
* a purchase: an order paid, shipped or delivered (as loyalty and win-back count them; not one placed and
  not paid yet, which counts once it is paid, nor a cancelled or refunded one), here and in every figure below.
* converted: bought after the moment and within the
  attribution window; revenue is the sum of those purchases (shop currency).
  Exposures whose window has not ended yet are counted as pending, not as
  non-conversions. A customer counts once per campaign and step (first moment).
* hard bounces: failed rows whose last reply says the address does not exist (``core.limits.bounce_kind``,
  as the sender judged it when it put the address on the suppression list); not a refused content or sender,
  nor a full mailbox.
* cancelled: failed rows an operator closed as failed (``kembali ledger close``) that were never tried (no
  attempt row but the operator's, no try counted): cancelled while they waited in the queue; not counted as failed.
  A loyalty milestone merged into another's email and closed with it is as that email: cancelled with it, or a
  failure when it was tried.
* repeat purchase rate: of the customers who bought during the period, the
  share with two or more purchases in all; churn: of the customers who had
  bought before the period, the share who did not buy during it.
* feedback: the ratings given in the period (when the customer clicked), average and NPS.
* the period: from the start of its first day to its moment (``now``), days on the shop's clock
  (``shop.time_zone``): what an operator in Jakarta means by "since 1 December".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain, repeat

from sqlalchemy.engine import Connection, Engine

from worker.adapters import db, reports
from worker.core import limits, stats
from worker.core.policy import zone_of
from worker.domain import MessageStatus


@dataclass
class StepStats:
    campaign: str
    step: int
    days: int | None = None
    """Win-back's: the step's days (rows of one number planned as steps of other days, before the steps were
    renumbered in the config, are counted apart); None for the other campaigns."""
    planned: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    hard_bounces: int = 0
    cancelled: int = 0
    """Of the ``failed`` rows, those an operator cancelled (``reports.cancelled``): not counted as failed."""
    emailed: stats.Conversion | None = None
    held_out: stats.Conversion | None = None
    treated: stats.Conversion | None = None
    """Every customer not held out, from when the email was due: the lift's other group."""
    lift: stats.Lift | None = None

    def as_json(self) -> dict[str, object]:
        def conv(c: stats.Conversion | None) -> dict[str, object] | None:
            if c is None:
                return None
            return {"customers": c.customers, "converted": c.converted, "rate": c.rate,
                    "revenue_minor": c.revenue_minor, "pending": c.pending}  # fmt: skip

        return {
            "campaign": self.campaign, "step": self.step, "days": self.days, "planned": self.planned,
            "sent": self.statuses[MessageStatus.SENT],
            "failed": self.statuses[MessageStatus.FAILED] - self.cancelled, "cancelled": self.cancelled,
            "uncertain": self.statuses[MessageStatus.UNCERTAIN],
            "waiting": sum(self.statuses[s] for s in ("planned", "claimed", "sending", "retry")),
            "skipped": dict(sorted(self.skipped.items())), "hard_bounces": self.hard_bounces,
            "conversion": conv(self.emailed), "holdout": conv(self.held_out),
            "lift": self.lift.as_json() if self.lift else None,
        }  # fmt: skip


@dataclass
class StatsReport:
    since: datetime
    now: datetime
    window_days: int
    currency: str
    """The shop's: the revenue is its purchases in it, in its minor unit."""
    steps: list[StepStats]
    suppressions: dict[str, int]
    retention: stats.Retention
    feedback: stats.Feedback | None
    """None: no feedback table yet."""
    time_zone: str = "UTC"
    """The shop's (``shop.time_zone``): the zone whose days the period starts and ends on, and ``since`` and
    ``until`` are shown in."""

    def local(self, moment: datetime) -> datetime:
        """``moment`` on the shop's clock (in UTC where that is before year 1 or after 9999: ``--since 0001-01-01``)."""
        try:
            return moment.astimezone(zone_of(self.time_zone, "UTC"))
        except OverflowError:
            return moment

    def as_json(self) -> dict[str, object]:
        r = self.retention
        fb = self.feedback
        return {
            "since": self.local(self.since).isoformat(), "until": self.local(self.now).isoformat(),
            "time_zone": self.time_zone, "attribution_window_days": self.window_days,
            "currency": self.currency,
            "campaigns": [s.as_json() for s in self.steps],
            "suppressions": self.suppressions,
            "repeat_purchase": {"customers_active": r.active, "repeat": r.repeat, "rate": r.repeat_rate},
            "churn": {"customers_before": r.earlier, "churned": r.churned, "rate": r.churn_rate},
            "feedback": None if fb is None else {"responses": fb.responses, "average": fb.average, "nps": fb.nps,
                                                 "other_scale": fb.other_scale},
        }  # fmt: skip


def build_stats(
    engine: Engine,
    *,
    since: datetime,
    now: datetime,
    window_days: int = 7,
    feedback_scale: str = "stars",
    currency: str = "IDR",
    time_zone: str = "UTC",
) -> StatsReport:
    """The report of the period from ``since`` to ``now`` (what was recorded after ``now`` is left out), counted in
    the database; revenue adds up the purchases in ``currency`` (the shop's)."""
    with db.reading(engine, snapshot=True) as conn:  # one moment of the ledger: a message sent meanwhile is not
        # waiting in one figure and sent in the next
        return _stats(conn, since=since, now=now, window_days=window_days, feedback_scale=feedback_scale,
                      currency=currency, time_zone=time_zone)  # fmt: skip


def _stats(
    conn: Connection, *, since: datetime, now: datetime, window_days: int, feedback_scale: str, currency: str,
    time_zone: str,
) -> StatsReport:
    steps: dict[reports.Step, StepStats] = {}

    def step(key: reports.Step) -> StepStats:
        return steps.setdefault(key, StepStats(*key))

    for key, status, reason, n in reports.ledger_counts(conn, since, now):
        s = step(key)
        s.planned += n
        s.statuses[status] += n
        if status == MessageStatus.SKIPPED:
            s.skipped[reason or "unknown"] += n
    for key, code, reply, n in reports.permanent_failures(conn, since, now):
        if limits.bounce_kind(code, reply) == "hard_bounce":  # as the sender judged it, suppressing the address
            step(key).hard_bounces += n
    for key, n in reports.cancelled(conn, since, now):
        step(key).cancelled += n

    found = {(key, group): c for key, group, c in
             reports.conversions(conn, since, window=timedelta(days=window_days), now=now,
                                 currency=currency)}  # fmt: skip
    nobody = stats.Conversion(0, 0, 0, 0)
    for key, s in steps.items():
        s.emailed = found.get((key, "emailed"), nobody)
        s.held_out = found.get((key, "held_out"))
        s.treated = found.get((key, "treated"), nobody)
        control = s.held_out or stats.Conversion(0, 0, 0, 0)
        s.lift = stats.lift(s.treated.converted, s.treated.customers, control.converted, control.customers,
                            held_out=control.customers + control.pending,
                            treated=s.treated.customers + s.treated.pending)  # fmt: skip

    scores = reports.feedback_scores(conn, since, now)
    return StatsReport(
        since=since, now=now, window_days=window_days, currency=currency, time_zone=time_zone,
        steps=[steps[key] for key in sorted(steps, key=lambda k: (k[0], k[1], k[2] or 0))],
        suppressions=reports.suppressions(conn, since, now),
        retention=stats.retention(
            chain.from_iterable(repeat((b, d), n) for b, d, n in reports.purchases_around(conn, since, now))
        ),
        feedback=None if scores is None else stats.feedback(scores, scale=feedback_scale),
    )  # fmt: skip


@dataclass
class Insights:
    customers: int
    """Customers with at least one purchase."""
    gaps_days: list[int]
    """Days from the first to the second purchase, one per customer who bought twice."""
    share: float
    recommended_quiet_days: int | None
    """The least whole days within which ``share`` of the second purchases came (the first win-back day), at least 1
    (the least win-back's days can be)."""
    histogram: list[tuple[int, int, int]]
    after_winback: int = 0
    """Second purchases that came after a win-back email to the customer, which may have brought them on."""

    def as_json(self) -> dict[str, object]:
        return {"customers": self.customers, "second_purchases": len(self.gaps_days), "share": self.share,
                "second_purchases_after_a_winback_email": self.after_winback,
                "recommended_quiet_days": self.recommended_quiet_days,
                "median_days": stats.quantile_day(self.gaps_days, 0.5),
                "histogram": [{"from_day": a, "to_day": b, "customers": n} for a, b, n in self.histogram]}  # fmt: skip


def build_insights(engine: Engine, *, share: float = 0.8, bin_days: int = 7) -> Insights:
    customers = after_winback = 0
    passed: list[int] = []
    within: list[int] = []
    for days, days_within, after_email, n in reports.second_purchase_days(engine):  # counted in the database
        customers += n
        if days is not None and days_within is not None:
            passed += repeat(days, n)
            within += repeat(days_within, n)
            after_winback += n if after_email else 0
    # the recommendation is a win-back `days`: an email once the first order is more than that many days old, so
    # the day by which the second purchases came is the ceiling of their gaps (10 days and an hour: 11), where the
    # histogram's days are whole days passed (day 10: from 10 days to just under 11); at least 1, the least days
    # the config takes (0: second orders placed at the moment of the first, a checkout split in two)
    day = stats.quantile_day(within, share)
    return Insights(
        customers=customers, gaps_days=sorted(passed), share=share,
        recommended_quiet_days=None if day is None else max(1, day), histogram=stats.histogram(passed, bin_days),
        after_winback=after_winback,
    )  # fmt: skip

"""The statistics behind `kembali stats` and `kembali insights`: pure functions of plain values.

Intervals for proportions are Wilson score intervals; the interval for a
difference of two proportions (the lift of a campaign over its holdout group)
is Newcombe's hybrid score interval (Newcombe 1998, method 10), built from the
two Wilson intervals. Unlike the Wald interval it stays inside [-1, 1] and keeps
close to its nominal coverage with small groups and rates near 0, which is
where shop campaigns live (a few percent converting).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.core.campaigns import rating_scores

Z95 = 1.959963984540054
MIN_GROUP = 30
"""Fewer customers than this in either group: no verdict on lift."""
MIN_EVENTS = 5
"""Fewer conversions (or non-conversions) than this in either group: no verdict on lift."""


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float, float]:
    """(p1 - p2, lower, upper): Newcombe's hybrid score interval for a difference of proportions."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    lower = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    upper = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lower, upper


@dataclass(frozen=True)
class Lift:
    treated: tuple[int, int]
    """(converted, customers) among those emailed."""
    control: tuple[int, int]
    """(converted, customers) in the holdout group."""
    difference: float | None
    lower: float | None
    upper: float | None
    verdict: str

    def as_json(self) -> dict[str, object]:
        return {"treated": {"converted": self.treated[0], "customers": self.treated[1]},
                "holdout": {"converted": self.control[0], "customers": self.control[1]},
                "difference": self.difference, "ci95": [self.lower, self.upper], "verdict": self.verdict}  # fmt: skip


def _still_open(n: int, who: str) -> str:
    """The verdict while the attribution windows of ``n`` customers (``who``: "held-out {}") are open."""
    if n == 1:
        what = f"the attribution window of the 1 {who.format('customer')} has"
    else:
        what = f"the attribution windows of the {n} {who.format('customers')} have"
    return what + " not closed yet: lift cannot be measured yet"


def lift(kt: int, nt: int, kc: int, nc: int, *, held_out: int = 0, treated: int = 0) -> Lift:
    """The conversion lift of the emailed group over the holdout group, with a 95 % interval and a plain verdict.
    ``held_out``, ``treated``: customers in each group in all, counted or not (their attribution window may
    still be open)."""
    if nc == 0:
        if held_out:
            return Lift((kt, nt), (kc, nc), None, None, None, _still_open(held_out, "held-out {}"))
        return Lift((kt, nt), (kc, nc), None, None, None, "no holdout group: lift cannot be measured")
    if nt == 0:
        if treated:
            return Lift((kt, nt), (kc, nc), None, None, None, _still_open(treated, "{} not held out"))
        return Lift((kt, nt), (kc, nc), None, None, None, "nobody emailed yet")
    d, lo, hi = newcombe(kt, nt, kc, nc)
    small = min(nt, nc) < MIN_GROUP or min(kt, nt - kt, kc, nc - kc) < MIN_EVENTS
    if small:
        verdict = (f"sample too small to tell (needs {MIN_GROUP}+ customers and {MIN_EVENTS}+ conversions and "
                   "non-conversions in each group)")  # fmt: skip
    elif lo > 0:
        verdict = "the campaign brought more customers back than the holdout group (95 % interval above zero)"
    elif hi < 0:
        verdict = "the holdout group did better (95 % interval below zero)"
    else:
        verdict = "no difference shown: the 95 % interval includes zero"
    return Lift((kt, nt), (kc, nc), d, lo, hi, verdict)


@dataclass(frozen=True)
class Conversion:
    customers: int
    """Exposures whose attribution window is over (the denominator)."""
    converted: int
    revenue_minor: int
    pending: int
    """Exposures whose window is not over yet (left out)."""

    @property
    def rate(self) -> float | None:
        return self.converted / self.customers if self.customers else None


def conversion(
    exposures: Iterable[tuple[int, datetime]],
    purchases: Mapping[int, Sequence[tuple[datetime, int]]],
    *,
    window: timedelta,
    now: datetime,
) -> Conversion:
    """Of the customers exposed at a moment (emailed, or held out), how many bought within ``window`` after it.

    ``exposures``: (customer, moment), the first per customer counts; ``purchases``:
    customer → (placed at, amount in minor units; 0 for a purchase in another currency than the shop's, which
    converts the customer but adds no revenue: nothing is converted). A purchase counts when it is
    placed after the moment and at most ``window`` later; the revenue is the sum
    of those purchases. Exposures less than ``window`` before ``now`` are pending.
    """
    first: dict[int, datetime] = {}
    for customer, at in exposures:
        if customer not in first or at < first[customer]:
            first[customer] = at
    customers = converted = revenue = pending = 0
    for customer, at in first.items():
        if at + window > now:
            pending += 1
            continue
        customers += 1
        amounts = [amount for placed, amount in purchases.get(customer, ()) if at < placed <= at + window]
        if amounts:
            converted += 1
            revenue += sum(amounts)
    return Conversion(customers, converted, revenue, pending)


@dataclass(frozen=True)
class Retention:
    active: int
    """Customers who bought in the period."""
    repeat: int
    """Of those, customers with two or more purchases up to the period's end."""
    earlier: int
    """Customers who had bought before the period."""
    churned: int
    """Of those, customers who did not buy during the period."""

    @property
    def repeat_rate(self) -> float | None:
        return self.repeat / self.active if self.active else None

    @property
    def churn_rate(self) -> float | None:
        return self.churned / self.earlier if self.earlier else None


def retention(customers: Iterable[tuple[int, int]]) -> Retention:
    """From (purchases before the period, purchases during it) per customer."""
    active = repeat = earlier = churned = 0
    for before, during in customers:
        if during:
            active += 1
            repeat += before + during >= 2
        if before:
            earlier += 1
            churned += not during
    return Retention(active, repeat, earlier, churned)


@dataclass(frozen=True)
class Feedback:
    responses: int
    average: float | None
    nps: float | None
    """Net Promoter Score (-100..100) when the scores are on the 0-10 scale."""
    other_scale: int = 0
    """Scores out of 10 left out of a star average (0, 6-10: links of requests sent before the scale changed)."""


def feedback(scores: Sequence[float], *, scale: str) -> Feedback:
    """``scale``: the feedback campaign's, ``stars`` (1-5) or ``nps`` (0-10). On the star scale a score outside
    1-5 is out of 10, as the feedback page says it (``links``): not averaged with the stars. (A star rating among
    scores out of 10 cannot be told apart: the table records no scale.)"""
    other = 0
    if scale != "nps":
        stars = [s for s in scores if s in rating_scores("stars")]
        other, scores = len(scores) - len(stars), stars
    if not scores:
        return Feedback(0, None, None, other)
    average = sum(scores) / len(scores)
    nps = None
    if scale == "nps":
        promoters = sum(1 for s in scores if s >= 9)
        detractors = sum(1 for s in scores if s <= 6)
        nps = 100 * (promoters - detractors) / len(scores)
    return Feedback(len(scores), average, nps, other)


# --- insights: the time between a first and a second purchase --------------------------


def days_between(first: datetime, second: datetime) -> int:
    """Whole days from the first to the second purchase (0: the same day's 24 hours)."""
    return int((second - first) / timedelta(days=1))


def days_within(first: datetime, second: datetime) -> int:
    """Whole days within which the second purchase came (10 days and an hour: 11): the least win-back
    ``days`` whose email (once the first order was placed more than that many days ago) comes after it."""
    return -((first - second) // timedelta(days=1))  # the ceiling, in whole microseconds


def quantile_day(days: Sequence[int], share: float) -> int | None:
    """The smallest day d such that at least ``share`` of the gaps are at most d."""
    if not days:
        return None
    ordered = sorted(days)
    # rounded first: 0.55 * 100 is 55.00000000000001 in binary floating point, and its ceiling 56
    index = max(0, math.ceil(round(share * len(ordered), 9)) - 1)
    return ordered[index]


def histogram(days: Sequence[int], bin_days: int, max_bins: int = 20) -> list[tuple[int, int, int]]:
    """(from day, to day inclusive, count) bins of ``bin_days``; the last bin takes the rest."""
    if not days:
        return []
    top = max(days)
    covered = quantile_day(days, 0.95) or 0  # widen the bins until 95 % of the values fit before the last
    while covered // bin_days + 1 > max_bins - 1:
        bin_days *= 2
    bins = min(max_bins, top // bin_days + 1)
    counts = [0] * bins
    for d in days:
        counts[min(d // bin_days, bins - 1)] += 1
    out = [(i * bin_days, (i + 1) * bin_days - 1, c) for i, c in enumerate(counts)]
    last_from = out[-1][0]
    out[-1] = (last_from, max(top, last_from + bin_days - 1), out[-1][2])
    return out


def bar(count: int, most: int, width: int = 40) -> str:
    return "█" * (round(width * count / most) if most else 0)

"""The pure statistics: tables of cases, with published values where there are some."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.core import stats

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


# Newcombe (1998), Statistics in Medicine 17:857-872, tables I and II (method 10 for differences).
@pytest.mark.parametrize(("k", "n", "lower", "upper"), [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])  # fmt: skip
def test_wilson_matches_newcombe_table_i(k: int, n: int, lower: float, upper: float) -> None:
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(lower, abs=6e-5) and hi == pytest.approx(upper, abs=6e-5)


@pytest.mark.parametrize(("k1", "n1", "k2", "n2", "lower", "upper"), [
    (56, 70, 48, 80, 0.0524, 0.3339),
    (9, 10, 3, 10, 0.1705, 0.8090),
    (5, 56, 0, 29, -0.0381, 0.1926),
])  # fmt: skip
def test_newcombe_matches_newcombe_table_ii(k1: int, n1: int, k2: int, n2: int, lower: float, upper: float) -> None:
    d, lo, hi = stats.newcombe(k1, n1, k2, n2)
    assert d == pytest.approx(k1 / n1 - k2 / n2)
    assert lo == pytest.approx(lower, abs=6e-5) and hi == pytest.approx(upper, abs=6e-5)


@pytest.mark.parametrize(("kt", "nt", "kc", "nc", "verdict"), [
    (30, 200, 0, 0, "no holdout group"),
    (0, 0, 3, 50, "nobody emailed"),
    (3, 20, 1, 20, "sample too small"),
    (40, 1000, 2, 100, "sample too small"),  # 2 conversions in the holdout: too few events
    (150, 1000, 60, 1000, "brought more customers back"),
    (60, 1000, 150, 1000, "holdout group did better"),
    (100, 1000, 95, 1000, "includes zero"),
])  # fmt: skip
def test_lift_verdicts(kt: int, nt: int, kc: int, nc: int, verdict: str) -> None:
    result = stats.lift(kt, nt, kc, nc)
    assert verdict in result.verdict
    if nc and nt:
        assert result.lower is not None and result.upper is not None and result.lower < result.upper


def test_a_holdout_group_whose_windows_are_still_open_is_not_called_missing() -> None:
    result = stats.lift(30, 200, 0, 0, held_out=4)
    assert result.verdict == ("the attribution windows of the 4 held-out customers have not closed yet: lift cannot "
                              "be measured yet")  # fmt: skip
    assert result.difference is None


@pytest.mark.parametrize(("purchases", "converted", "revenue"), [
    ([], 0, 0),
    ([(T0 + 3 * DAY, 100)], 1, 100),
    ([(T0 + 7 * DAY, 100)], 1, 100),  # the window's last instant counts
    ([(T0 + 7 * DAY + timedelta(seconds=1), 100)], 0, 0),
    ([(T0, 100)], 0, 0),  # bought at the very moment of the email: not after it
    ([(T0 - DAY, 100)], 0, 0),
    ([(T0 + DAY, 100), (T0 + 2 * DAY, 50), (T0 + 9 * DAY, 999)], 1, 150),
])  # fmt: skip
def test_conversion_window(purchases: list[tuple[datetime, int]], converted: int, revenue: int) -> None:
    c = stats.conversion([(1, T0)], {1: purchases}, window=7 * DAY, now=T0 + 30 * DAY)
    assert (c.customers, c.converted, c.revenue_minor, c.pending) == (1, converted, revenue, 0)


def test_conversion_counts_a_customer_once_and_leaves_open_windows_pending() -> None:
    exposures = [(1, T0 + 5 * DAY), (1, T0), (2, T0 + 25 * DAY)]
    c = stats.conversion(exposures, {1: [(T0 + 6 * DAY, 10)]}, window=7 * DAY, now=T0 + 30 * DAY)
    assert (c.customers, c.converted, c.revenue_minor, c.pending) == (1, 1, 10, 1)


@pytest.mark.parametrize(("rows", "active", "repeat", "earlier", "churned"), [
    ([], 0, 0, 0, 0),
    ([(0, 1)], 1, 0, 0, 0),  # a new customer, once
    ([(0, 2)], 1, 1, 0, 0),  # a new customer, twice in the period
    ([(1, 1)], 1, 1, 1, 0),  # came back
    ([(3, 0)], 0, 0, 1, 1),  # gone
    ([(0, 1), (1, 1), (2, 0), (1, 0)], 2, 1, 3, 2),
])  # fmt: skip
def test_retention(rows: list[tuple[int, int]], active: int, repeat: int, earlier: int, churned: int) -> None:
    r = stats.retention(rows)
    assert (r.active, r.repeat, r.earlier, r.churned) == (active, repeat, earlier, churned)


@pytest.mark.parametrize(("days", "share", "expected"), [
    ([], 0.8, None),
    ([10], 0.8, 10),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.8, 8),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.81, 9),
    ([5, 1, 3], 0.5, 3),
])  # fmt: skip
def test_quantile_day(days: list[int], share: float, expected: int | None) -> None:
    assert stats.quantile_day(days, share) == expected


def test_histogram_bins_cover_every_value() -> None:
    days = [0, 6, 7, 13, 14] * 4 + [300]
    bins = stats.histogram(days, 7)
    assert sum(n for _, _, n in bins) == len(days)
    assert bins[0] == (0, 6, 8) and bins[1] == (7, 13, 8)
    assert bins[-1][1] >= 300


@pytest.mark.parametrize(("scores", "scale", "average", "nps"), [
    ([], "nps", None, None),
    ([4, 5, 3], "stars", 4.0, None),  # a 1-5 scale: no NPS
    ([10, 9, 8, 7, 6, 0], "nps", 40 / 6, 0.0),  # 2 promoters, 2 detractors
    ([10, 10, 9, 3], "nps", 8.0, 50.0),
    ([5, 3, 0], "nps", 8 / 3, -100.0),  # all detractors on the 0-10 scale: not a 1-5 scale
    ([5, 5, 4, 1], "stars", 3.75, None),
])  # fmt: skip
def test_feedback(scores: list[float], scale: str, average: float | None, nps: float | None) -> None:
    fb = stats.feedback(scores, scale=scale)
    assert fb.responses == len(scores)
    assert fb.average == (pytest.approx(average) if average is not None else None)
    assert fb.nps == (pytest.approx(nps) if nps is not None else None)


def test_an_emailed_group_whose_windows_are_still_open_is_not_called_nobody_emailed() -> None:
    result = stats.lift(0, 0, 3, 50, held_out=50, treated=7)
    assert result.verdict == ("the attribution windows of the 7 customers not held out have not closed yet: lift "
                              "cannot be measured yet")  # fmt: skip
    assert stats.lift(0, 0, 3, 50).verdict == "nobody emailed yet"


@pytest.mark.parametrize(("n", "share"), [(100, 0.55), (100, 0.07), (50, 0.14), (25, 0.28), (10, 0.7), (10, 0.8)])
def test_quantile_day_is_not_thrown_off_by_binary_fractions(n: int, share: float) -> None:
    # 0.55 * 100 is 55.00000000000001 in floating point: the 55th smallest gap is enough, not the 56th
    days = list(range(1, n + 1))
    assert stats.quantile_day(days, share) == round(share * n)

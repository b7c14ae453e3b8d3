"""`kembali stats` and `kembali insights` on shops whose true numbers are known by construction."""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.shop import stored_orders
from tests.shop_fixtures import Site, load_shop, make_site
from worker.adapters import db, opstore, shop
from worker.adapters.store import M, Store
from worker.core import stats
from worker.core.audiences import message_id_for
from worker.demo import ShopData, generate_shop
from worker.domain import CustomerRecord, Locale, MessageStatus, OrderRecord, OrderStatus, PlannedMessage

NOW = datetime.now(UTC).replace(microsecond=0)
EXPOSED = NOW - timedelta(days=20)
FIRST_ORDER = NOW - timedelta(days=100)
SINCE = (NOW - timedelta(days=60)).date()

# The truth, by construction
EMAILED, EMAILED_BUY, EMAILED_LATE, EMAILED_CANCELLED = 200, 30, 10, 5
HELD, HELD_BUY = 100, 6
FAILED_5XX, UNCERTAIN, PENDING, SUPPRESSED = 3, 2, 5, 4
PRICE = 150_000_00


def _customer(cid: str) -> CustomerRecord:
    return CustomerRecord(cid, f"{cid.lower()}@example.com", f"Pelanggan {cid}", Locale.ID, "Asia/Jakarta", None,
                          True, "opt_in", "checkout")  # fmt: skip


def _order(cid: str, n: int, at: datetime, total: int, status: OrderStatus = OrderStatus.DELIVERED,
           currency: str = "IDR") -> OrderRecord:  # fmt: skip
    return OrderRecord(f"O-{cid}-{n}", cid, status, at, None, total, currency)


def _build(site: Site) -> None:
    groups = {"T": EMAILED, "H": HELD, "F": FAILED_5XX, "U": UNCERTAIN, "P": PENDING, "S": SUPPRESSED}
    ids = {g: [f"C-{g}{i:03d}" for i in range(n)] for g, n in groups.items()}
    everyone = [c for g in groups for c in ids[g]]
    orders = [_order(c, 1, FIRST_ORDER, 100_000_00) for c in everyone]
    for i, c in enumerate(ids["T"]):
        if i < EMAILED_BUY:
            orders.append(_order(c, 2, EXPOSED + timedelta(days=3), PRICE))
        elif i < EMAILED_BUY + EMAILED_LATE:
            orders.append(_order(c, 2, EXPOSED + timedelta(days=9), PRICE))  # after the window
        elif i < EMAILED_BUY + EMAILED_LATE + EMAILED_CANCELLED:
            orders.append(_order(c, 2, EXPOSED + timedelta(days=2), PRICE, OrderStatus.CANCELLED))
    for c in ids["H"][:HELD_BUY]:
        orders.append(_order(c, 2, EXPOSED + timedelta(days=2), 120_000_00))
    engine = db.create_engine(site.settings.database_url)
    pk = _load(engine, everyone, orders)
    planned = [
        PlannedMessage(f"winback:{c}:O-{c}-1:1", "winback", 1, pk[c], f"{c.lower()}@example.com", EXPOSED,
                       EXPOSED + timedelta(days=14), message_id_for(c, "shop.example"))
        for c in everyone
    ]  # fmt: skip
    store = Store(engine)
    assert store.insert_messages(planned, EXPOSED - timedelta(days=1)) == len(everyone)
    outcome = {
        "T": {"status": "sent", "sent_at": EXPOSED, "last_code": 250},
        "P": {"status": "sent", "sent_at": NOW - timedelta(days=2), "last_code": 250},
        "H": {"status": "skipped", "skip_reason": "held_out"},
        "F": {"status": "failed", "last_code": 550, "last_reply": "5.1.1 <x@example.com>: Recipient address rejected: "
              "User unknown"},
        "U": {"status": "uncertain"},
        "S": {"status": "skipped", "skip_reason": "suppressed"},
    }
    with engine.begin() as conn:
        for g, values in outcome.items():
            keys = [f"winback:{c}:O-{c}-1:1" for c in ids[g]]
            conn.execute(sa.update(M).where(M.c.dedupe_key.in_(keys)).values(updated_at=EXPOSED, **values))
    for i in range(5):
        store.suppress(f"gone{i}@example.com", reason="unsubscribed", source="link", now=EXPOSED)
    for i in range(3):
        store.suppress(f"bounced{i}@example.com", reason="hard_bounce", source="smtp", now=EXPOSED)
    store.suppress("old@example.com", reason="unsubscribed", source="link", now=NOW - timedelta(days=200))
    engine.dispose()


def test_stats_reports_the_constructed_truth(tmp_path: Path) -> None:
    # Given a shop where 30 of 200 emailed customers and 6 of 100 held-out customers bought within 7 days
    site = make_site(tmp_path / "site")
    _build(site)

    # When the operator asks for the numbers
    done = site.cli("stats", "--since", SINCE.isoformat(), "--json", "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    # Then every figure is the constructed one, revenue in the minor unit of the currency named
    assert report["currency"] == "IDR"
    (winback,) = report["campaigns"]
    total = EMAILED + HELD + FAILED_5XX + UNCERTAIN + PENDING + SUPPRESSED
    assert (winback["campaign"], winback["step"], winback["planned"]) == ("winback", 1, total)
    assert (winback["sent"], winback["failed"], winback["uncertain"]) == (EMAILED + PENDING, FAILED_5XX, UNCERTAIN)
    assert winback["skipped"] == {"held_out": HELD, "suppressed": SUPPRESSED}
    assert winback["hard_bounces"] == FAILED_5XX
    conversion = winback["conversion"]
    assert conversion == {"customers": EMAILED, "converted": EMAILED_BUY, "rate": EMAILED_BUY / EMAILED,
                          "revenue_minor": EMAILED_BUY * PRICE, "pending": PENDING}  # fmt: skip
    assert winback["holdout"]["customers"] == HELD and winback["holdout"]["converted"] == HELD_BUY
    # the lift compares every customer not held out (sent or not, all due at the same moment) with the holdout
    lift = winback["lift"]
    treated = total - HELD
    assert lift["treated"] == {"converted": EMAILED_BUY, "customers": treated}
    _d, lo, hi = stats.newcombe(EMAILED_BUY, treated, HELD_BUY, HELD)
    assert lift["difference"] == pytest.approx(EMAILED_BUY / treated - 0.06)
    assert lift["ci95"] == [pytest.approx(lo), pytest.approx(hi)]
    assert 0 < lo < 0.08 < hi
    assert "brought more customers back" in lift["verdict"]
    assert report["suppressions"] == {"unsubscribed": 5, "hard_bounce": 3}
    active = EMAILED_BUY + EMAILED_LATE + HELD_BUY
    assert report["repeat_purchase"] == {"customers_active": active, "repeat": active, "rate": 1.0}
    assert report["churn"] == {"customers_before": total, "churned": total - active, "rate": (total - active) / total}
    assert report["feedback"] == {"responses": 0, "average": None, "nps": None,
                                  "other_scale": 0}  # the daemon's (empty) table

    # And the text report says the same in words
    text = site.cli("stats", "--since", SINCE.isoformat(), "--now", NOW.isoformat()).stdout
    assert "conversion: 30 of 200 emailed customers ordered (15.0%)" in text
    assert "holdout: 6 of 100 held-out customers ordered (6.0%)" in text
    assert "30 of 214 customers not held out ordered (14.0%)" in text
    assert "lift: +8.0 points" in text and "5 still inside the window" in text


def test_stats_without_a_holdout_and_with_a_feedback_table(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site", extra_toml='[campaigns.feedback]\nscale = "nps"\n')
    _build(site)
    engine = sa.create_engine(site.settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.skip_reason == "held_out").values(skip_reason="capped"))
    for order, score in [("O1", 10), ("O2", 9), ("O3", 7), ("O4", 3)]:
        opstore.record_feedback(Store(engine), order, score, NOW - timedelta(days=1))
    engine.dispose()
    report = json.loads(site.cli("stats", "--since", SINCE.isoformat(), "--json", "--now", NOW.isoformat()).stdout)
    (winback,) = report["campaigns"]
    assert winback["holdout"] is None
    assert "no holdout group" in winback["lift"]["verdict"] and winback["lift"]["difference"] is None
    assert report["feedback"] == {"responses": 4, "average": 7.25, "nps": 25.0, "other_scale": 0}


@pytest.mark.parametrize(("scale", "scores", "nps"), [
    ("nps", [5, 3, 0, 4], -100.0),  # every customer a detractor: the worst score there is, not "no NPS"
    ("stars", [5, 4, 4, 3], None),
])  # fmt: skip
def test_the_nps_follows_the_feedback_scale(tmp_path: Path, scale: str, scores: list[int], nps: float | None) -> None:
    site = make_site(tmp_path / "site", extra_toml=f'[campaigns.feedback]\nscale = "{scale}"\n')
    engine = sa.create_engine(site.settings.database_url)
    for i, score in enumerate(scores):
        opstore.record_feedback(Store(engine), f"O{i}", score, NOW - timedelta(days=1))
    engine.dispose()
    done = site.cli("stats", "--json", "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["feedback"] == {"responses": 4, "average": sum(scores) / 4, "nps": nps,
                                                   "other_scale": 0}
    assert ("NPS -100" in site.cli("stats", "--now", NOW.isoformat()).stdout) is (nps is not None)


def _expected_gaps(data: ShopData, *, within: bool = False) -> list[int]:
    """Whole days from each customer's first purchase to the second; ``within``: the days within which it came
    (rounded up: what a win-back ``days`` is compared with)."""
    bought: dict[str, list[datetime]] = defaultdict(list)
    for o in data.orders:
        if o.status.is_paid:
            bought[o.customer_external_id].append(o.placed_at)
    days = stats.days_within if within else stats.days_between
    return sorted(days(*sorted(v)[:2]) for v in bought.values() if len(v) >= 2)


def test_insights_on_the_demo_shop(tmp_path: Path) -> None:
    # Given the demo shop
    site = make_site(tmp_path / "site")
    data = generate_shop(seed=7, customers=400, now=NOW)
    load_shop(site.settings, data, NOW)
    gaps = _expected_gaps(data, within=True)
    expected_day = gaps[-(-len(gaps) * 8 // 10) - 1]  # the ceil(0.8 n)-th smallest gap, in days rounded up

    # When the operator asks when customers buy again
    plot = tmp_path / "gaps.png"
    done = site.cli("insights", "--json", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)

    # Then the recommendation is the day by which 80 % of second purchases happened, with its sample size
    assert found["customers"] == len(data.customers)
    assert found["second_purchases"] == len(gaps) > 30
    assert found["recommended_quiet_days"] == expected_day
    assert sum(b["customers"] for b in found["histogram"]) == len(gaps)
    assert sum(1 for g in gaps if g <= expected_day) >= 0.8 * len(gaps) > sum(1 for g in gaps if g < expected_day)
    # And the chart is a PNG
    head = plot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (720, 360)

    text = site.cli("insights").stdout
    assert f"recommended campaigns.winback.quiet_days = {expected_day}, resting on {len(gaps)} second" in text


def test_a_plot_that_cannot_be_written_is_named_with_exit_2(tmp_path: Path) -> None:
    # Given a shop with second purchases, and a --plot in a folder that does not exist
    site = make_site(tmp_path / "site")
    load_shop(site.settings, generate_shop(seed=7, customers=100, now=NOW), NOW)
    plot = tmp_path / "charts" / "gaps.png"
    # When insights writes its chart there (whole or not at all: under a temporary name, then renamed)
    done = site.cli("insights", "--plot", str(plot))
    # Then the file asked for is named (not the temporary one), with why and exit code 2
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"kembali insights: {plot}: no such folder: {plot.parent}\n"


def test_a_plot_written_through_a_link_or_into_a_pipe_keeps_the_link_and_the_pipe(tmp_path: Path) -> None:
    # Given a shop with second purchases, a --plot that is a symbolic link to the shop's shared chart, and one that is
    # a named pipe an image viewer reads (as /dev/stdout is, in `kembali insights --plot /dev/stdout | display`):
    # the chart, written under a temporary name and renamed over the path, replaced the link and the pipe themselves
    # with a file (run as root, `--plot /dev/stdout` replaced the system's /dev/stdout)
    site = make_site(tmp_path / "site")
    load_shop(site.settings, generate_shop(seed=7, customers=100, now=NOW), NOW)
    shared = tmp_path / "shared" / "gaps.png"
    shared.parent.mkdir()
    link = tmp_path / "gaps.png"
    link.symlink_to(shared)
    pipe = tmp_path / "viewer.fifo"
    os.mkfifo(pipe)
    viewer = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)  # the reader, there before the chart (and never blocking)
    try:
        # When insights writes its chart to each
        through_link = site.cli("insights", "--plot", str(link))
        into_pipe = site.cli("insights", "--plot", str(pipe))
        try:
            received = os.read(viewer, 2**20)  # a chart is a few kB: the pipe holds it whole
        except BlockingIOError:  # nothing was written into the pipe
            received = b""
    finally:
        os.close(viewer)
    # Then the link still points where it did, and the chart is in the file it points to
    assert through_link.returncode == 0, through_link.stderr
    assert link.is_symlink() and link.readlink() == shared
    assert shared.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # And the pipe is still a pipe, its reader given the whole chart
    assert into_pipe.returncode == 0, into_pipe.stderr
    assert stat.S_ISFIFO(pipe.lstat().st_mode)
    assert received == shared.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gaps.png", "shared", "site", "viewer.fifo"]


def test_insights_recommends_the_first_step_when_win_back_has_steps(tmp_path: Path) -> None:
    # Given win-back in steps, as config.toml ships it: quiet_days then applies to nothing (the first step's days
    # decide when the first email goes), yet insights said "recommended campaigns.winback.quiet_days = N
    # (currently 45)", and an operator who set it saw no change at all
    site = make_site(tmp_path / "site", extra_toml=(
        '[campaigns.winback]\nquiet_days = 45\n'
        '[[campaigns.winback.steps]]\ndays = 30\ntemplate = "winback-reminder"\n'
        '[[campaigns.winback.steps]]\ndays = 400\ntemplate = "winback"\n'))
    data = generate_shop(seed=7, customers=200, now=NOW)
    load_shop(site.settings, data, NOW)
    gaps = _expected_gaps(data, within=True)
    expected_day = gaps[-(-len(gaps) * 8 // 10) - 1]

    # When the operator asks when customers buy again
    text = site.cli("insights").stdout

    # Then the recommendation names the setting that decides it, with its current value
    assert f"recommended campaigns.winback.steps[0].days = {expected_day} (the first step)" in text, text
    assert "(currently 30;" in text and "quiet_days" not in text


def test_report_queries_on_each_database(db_url: str) -> None:
    from worker.stats import build_insights, build_stats

    data = generate_shop(seed=3, customers=60, now=NOW)
    engine = db.create_engine(db_url)
    try:
        shop.upsert_customers(engine, data.customers, NOW)
        shop.upsert_products(engine, data.products, NOW)
        shop.upsert_orders(engine, data.orders, NOW)
        insights = build_insights(engine)
        report = build_stats(engine, since=NOW - timedelta(days=90), now=NOW)
    finally:
        engine.dispose()
    assert insights.gaps_days == _expected_gaps(data)
    assert report.steps == [] and report.retention.earlier > 0


def _load(engine: sa.Engine, customers: list[str], orders: list[OrderRecord] | None = None) -> dict[str, int]:
    """The customers (and their orders) in the shop: external id → database id."""
    shop.upsert_customers(engine, [_customer(c) for c in customers], FIRST_ORDER)
    if orders:
        shop.upsert_orders(engine, orders, FIRST_ORDER)
    with engine.begin() as conn:
        return dict(conn.execute(sa.text("select external_id, id from customer")).all())


def _ledger_row(engine: sa.Engine, pk: dict[str, int], c: str, planned_at: datetime, *, campaign: str = "winback",
                key: str | None = None, **values: object) -> None:
    """One ledger row for customer ``c``, planned and due at ``planned_at``, then given ``values``."""
    key = key or f"winback:{c}:O-{c}-0:1"
    planned = PlannedMessage(key, campaign, 1, pk[c], f"{c.lower()}@example.com", planned_at,
                             planned_at + timedelta(days=14), message_id_for(key, "shop.example"))  # fmt: skip
    assert Store(engine).insert_messages([planned], planned_at) == 1
    with engine.begin() as conn:
        conn.execute(sa.update(M).where(M.c.dedupe_key == key).values(**values))


def test_lift_compares_both_groups_from_when_the_email_was_due(db_url: str) -> None:
    # Given a win-back step planned 30 days ago for 60 customers and held out for 60 more, whose emails went out
    # two days late (the frequency cap); in each group 15 customers ordered the day after planning (so the
    # treated ones were skipped as ordered_since, never emailed) and 10 more ordered two days after the send:
    # the email changed nothing, both groups behaved alike
    planned_at = NOW - timedelta(days=30)
    sent_at = planned_at + timedelta(days=2)
    ids = {g: [f"C-{g}{i:02d}" for i in range(60)] for g in ("T", "H")}
    everyone = ids["T"] + ids["H"]
    orders = [_order(c, 0, FIRST_ORDER, 100_000_00) for c in everyone]
    for g in ids.values():
        orders += [_order(c, 1, planned_at + timedelta(days=1), 1_000_00) for c in g[:15]]
        orders += [_order(c, 1, sent_at + timedelta(days=2), 1_000_00) for c in g[15:25]]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, everyone, orders)
        for c in ids["T"][:15]:
            _ledger_row(engine, pk, c, planned_at, status="skipped", skip_reason="ordered_since",
                        updated_at=sent_at)  # fmt: skip
        for c in ids["T"][15:]:
            _ledger_row(engine, pk, c, planned_at, status="sent", sent_at=sent_at, updated_at=sent_at, last_code=250)
        for c in ids["H"]:
            _ledger_row(engine, pk, c, planned_at, status="skipped", skip_reason="held_out")
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW)
    finally:
        engine.dispose()

    (winback,) = report.steps
    # Then the conversion of the emails is counted from the send: 10 of the 45 emailed bought within 7 days
    assert winback.emailed is not None and (winback.emailed.customers, winback.emailed.converted) == (45, 10)
    # And the lift compares like with like: every customer not held out with every held-out one, both from when
    # the email was due: 25 of 60 in each group, no difference (not "the holdout group did better")
    assert winback.lift is not None
    assert (winback.lift.treated, winback.lift.control) == ((25, 60), (25, 60))
    assert winback.lift.difference == 0.0 and "includes zero" in winback.lift.verdict


def test_revenue_adds_up_the_purchases_in_the_shops_currency(db_url: str) -> None:
    # Given three customers emailed 20 days ago who bought within the week: one in rupiah, one in US dollars and
    # one in both
    sent = NOW - timedelta(days=20)
    cs = ["C-1", "C-2", "C-3"]
    orders = [_order(c, 0, FIRST_ORDER, 100_000_00) for c in cs]
    orders += [_order("C-1", 1, sent + timedelta(days=2), 250_000_00),
               _order("C-2", 1, sent + timedelta(days=2), 49_99, currency="USD"),
               _order("C-3", 1, sent + timedelta(days=3), 80_000_00),
               _order("C-3", 2, sent + timedelta(days=4), 10_00, currency="USD")]  # fmt: skip
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs, orders)
        for c in cs:
            _ledger_row(engine, pk, c, sent, status="sent", sent_at=sent, updated_at=sent, last_code=250)
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW, currency="IDR")
    finally:
        engine.dispose()
    (winback,) = report.steps
    # Then all three converted, and the revenue is the rupiah alone (USD 59.99 is not Rp59,99: nothing is converted)
    assert winback.emailed is not None
    assert (winback.emailed.converted, winback.emailed.revenue_minor) == (3, 330_000_00)


def test_lift_says_whose_attribution_windows_are_still_open(db_url: str) -> None:
    # Given a feedback step whose one held-out customer was held out for two orders in the last two days (the
    # emailed ones were emailed ten days ago), and a loyalty step whose one emailed customer was emailed yesterday
    # (its held-out customer was held out ten days ago)
    cs = ["C-H1", "C-T1", "C-T2", "C-H2", "C-T3"]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs)

        def row(c: str, campaign: str, key: str, at: datetime, **values: object) -> None:
            _ledger_row(engine, pk, c, at, campaign=campaign, key=key, **values)

        held = {"status": "skipped", "skip_reason": "held_out"}
        row("C-H1", "feedback", "feedback:O1", NOW - timedelta(days=2), **held)
        row("C-H1", "feedback", "feedback:O2", NOW - timedelta(days=1), **held)
        for c in ("C-T1", "C-T2"):
            row(c, "feedback", f"feedback:{c}", NOW - timedelta(days=10), status="sent", sent_at=NOW - timedelta(10))
        row("C-H2", "loyalty", "loyalty:H2", NOW - timedelta(days=10), **held)
        row("C-T3", "loyalty", "loyalty:T3", NOW - timedelta(days=1), status="sent", sent_at=NOW - timedelta(days=1))
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW)
    finally:
        engine.dispose()

    feedback, loyalty = report.steps
    # Then the verdicts count customers, not ledger rows, and do not say nobody was emailed
    assert feedback.lift is not None and loyalty.lift is not None
    assert feedback.lift.verdict == ("the attribution window of the 1 held-out customer has not closed yet: "
                                     "lift cannot be measured yet")  # fmt: skip
    assert loyalty.lift.verdict == ("the attribution window of the 1 customer not held out has not closed yet: "
                                    "lift cannot be measured yet")  # fmt: skip


def _came_back(tmp_path: Path, days: range, extra_toml: str = "") -> Site:
    """A site whose customers bought again ``days`` (and an hour) after their first purchase, one customer each."""
    site = make_site(tmp_path / "site", extra_toml=extra_toml)
    cs = [f"C{i:03d}" for i in range(len(days))]
    orders = [_order(c, 1, FIRST_ORDER, 1_000_00) for c in cs]
    orders += [_order(c, 2, FIRST_ORDER + timedelta(days=d, hours=1), 1_000_00) for d, c in zip(days, cs, strict=True)]
    engine = db.create_engine(site.settings.database_url)
    _load(engine, cs, orders)
    engine.dispose()
    return site


def test_insights_recommends_the_day_the_share_was_reached(tmp_path: Path) -> None:
    # Given 100 customers whose second purchase came 1, 2, … 100 days after their first
    site = _came_back(tmp_path, range(1, 101))
    # When the operator asks by when 55 % of second purchases happened
    done = site.cli("insights", "--share", "0.55", "--json")
    assert done.returncode == 0, done.stderr
    # Then it is day 56: 55 of the 100 came within 56 days (the 55th after 55 days and an hour, after a first email
    # 55 days after the first order)
    assert json.loads(done.stdout)["recommended_quiet_days"] == 56


def test_the_recommended_day_comes_after_the_second_purchases_it_counts(tmp_path: Path) -> None:
    # Given 10 customers who all bought again 10 days and 6 hours after their first purchase
    site = make_site(tmp_path / "site")
    cs = [f"C{i:02d}" for i in range(10)]
    orders = [_order(c, 1, FIRST_ORDER, 1_000_00) for c in cs]
    orders += [_order(c, 2, FIRST_ORDER + timedelta(days=10, hours=6), 1_000_00) for c in cs]
    engine = db.create_engine(site.settings.database_url)
    _load(engine, cs, orders)
    engine.dispose()
    # When the operator asks for the first win-back day
    done = site.cli("insights", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # Then it is 11 days: a win-back email goes once the order was placed more than that many days ago, and one
    # after 10 days would reach every one of them six hours before they came back on their own
    assert found["recommended_quiet_days"] == 11
    # while the histogram still puts them on day 10 (from 10 days to just under 11)
    assert found["histogram"][-1] == {"from_day": 7, "to_day": 13, "customers": 10}
    text = site.cli("insights").stdout
    assert "80% of second purchases happened within 11 days" in text, text
    assert "recommended campaigns.winback.quiet_days = 11, resting on 10 second purchases" in text, text


def test_insights_and_repeat_purchases_count_paid_orders_only_on_each_database(db_url: str) -> None:
    # Given customers whose second order came 10 days after the first: two paid, one placed and never paid, and
    # one whose first order was placed and never paid, then paid ones 30 and 40 days later
    from worker.stats import build_insights, build_stats

    orders = [_order("C-1", 1, FIRST_ORDER, 1_000_00), _order("C-1", 2, FIRST_ORDER + timedelta(days=10), 1_000_00),
              _order("C-2", 1, FIRST_ORDER, 1_000_00, OrderStatus.PAID),
              _order("C-2", 2, FIRST_ORDER + timedelta(days=10), 1_000_00, OrderStatus.SHIPPED),
              _order("C-3", 1, FIRST_ORDER, 1_000_00),
              _order("C-3", 2, FIRST_ORDER + timedelta(days=10), 1_000_00, OrderStatus.PLACED),
              _order("C-4", 1, FIRST_ORDER, 1_000_00, OrderStatus.PLACED),
              _order("C-4", 2, FIRST_ORDER + timedelta(days=30), 1_000_00),
              _order("C-4", 3, FIRST_ORDER + timedelta(days=70), 1_000_00)]  # fmt: skip
    engine = db.create_engine(db_url)
    try:
        _load(engine, ["C-1", "C-2", "C-3", "C-4"], orders)
        insights = build_insights(engine)
        report = build_stats(engine, since=FIRST_ORDER - timedelta(days=1), now=NOW)
    finally:
        engine.dispose()
    # Then the gaps are those between paid orders: 10, 10 and 40 days (C-3 bought once; C-4's first purchase
    # is the paid one: the unpaid order made it a 10-day and a 30-day gap, and C-3 a second purchase)
    assert (insights.customers, insights.gaps_days) == (4, [10, 10, 40])
    # and the repeat purchase rate counts the same purchases: 3 of 4 buyers bought twice
    assert (report.retention.active, report.retention.repeat) == (4, 3)


def test_insights_counts_days_to_the_microsecond_on_each_database(db_url: str) -> None:
    # Given second purchases on each side of a whole number of days, to the microsecond (across a second's change
    # too), one on the moment of the first, and a customer who bought once
    from worker.stats import build_insights

    at = FIRST_ORDER.replace(microsecond=999_999)
    us, ten = timedelta(microseconds=1), timedelta(days=10)
    seconds = {"A": (at, at + ten), "B": (at, at + ten - us), "C": (at, at + ten + us), "D": (at, at),
               "F": (at, at + ten + 2 * us), "G": (at + us, at + us + ten - us)}  # fmt: skip
    orders = [_order(c, n, placed, 1_000_00) for c, pair in seconds.items() for n, placed in enumerate(pair)]
    orders.append(_order("E", 0, at, 1_000_00))
    engine = db.create_engine(db_url)
    try:
        _load(engine, [*seconds, "E"], orders)
        found = {share: build_insights(engine, share=share) for share in (0.5, 0.7)}
    finally:
        engine.dispose()
    # Then the days passed are those core.stats counts, and the recommendation rounds each gap up
    insights = found[0.5]
    assert insights.customers == 7
    assert insights.gaps_days == sorted(stats.days_between(*pair) for pair in seconds.values()) == [0, 9, 9, 10, 10, 10]
    assert [stats.days_within(*pair) for pair in seconds.values()] == [10, 10, 11, 0, 11, 10]
    assert (found[0.5].recommended_quiet_days, found[0.7].recommended_quiet_days) == (10, 11)
    assert insights.histogram == [(0, 6, 1), (7, 13, 5)]


def test_insights_says_how_many_second_purchases_came_after_a_win_back_email_on_each_database(db_url: str) -> None:
    # Given 10 customers who bought again 10 days and 6 hours after their first purchase: 3 of them had been sent a
    # win-back email the day before, 1 was sent one after it, 1 was held out, and 1 had a birthday offer before it
    from worker.stats import build_insights

    cs = [f"C-{i:02d}" for i in range(10)]
    back = FIRST_ORDER + timedelta(days=10, hours=6)
    orders = [_order(c, 1, FIRST_ORDER, 1_000_00) for c in cs] + [_order(c, 2, back, 1_000_00) for c in cs]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs, orders)
        day_before, day_after = back - timedelta(days=1), back + timedelta(days=1)
        for c in cs[:3]:
            _ledger_row(engine, pk, c, day_before, status="sent", sent_at=day_before, last_code=250)
        _ledger_row(engine, pk, cs[3], day_after, status="sent", sent_at=day_after, last_code=250)
        _ledger_row(engine, pk, cs[4], day_before, status="skipped", skip_reason="held_out")
        _ledger_row(engine, pk, cs[5], day_before, campaign="birthday", key="birthday:C-05", status="sent",
                    sent_at=day_before, last_code=250)  # fmt: skip
        insights = build_insights(engine)
    finally:
        engine.dispose()
    # Then 3 of the 10 second purchases are said to have come after a win-back email, which may have brought them
    assert (len(insights.gaps_days), insights.after_winback) == (10, 3)
    assert insights.as_json()["second_purchases_after_a_winback_email"] == 3


def test_insights_warns_that_win_back_emails_may_have_brought_the_second_purchases(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    cs = [f"C-{i:02d}" for i in range(4)]
    back = FIRST_ORDER + timedelta(days=10, hours=6)
    engine = db.create_engine(site.settings.database_url)
    orders = [_order(c, 1, FIRST_ORDER, 1_000_00) for c in cs] + [_order(c, 2, back, 1_000_00) for c in cs]
    pk = _load(engine, cs, orders)
    _ledger_row(engine, pk, "C-00", back - timedelta(days=1), status="sent", sent_at=back - timedelta(days=1))
    engine.dispose()
    text = site.cli("insights").stdout
    assert ("1 of the 4 second purchases came after a win-back email, which may have brought it on: the days set "
            "now pull this figure towards themselves") in " ".join(text.split()), text


def test_json_lists_suppression_reasons_in_one_order_on_each_database(db_url: str) -> None:
    from worker.stats import build_stats

    engine = db.create_engine(db_url)
    try:
        store = Store(engine)
        for i, reason in enumerate(["unsubscribed", "hard_bounce", "complaint", "manual"] * 3):
            store.suppress(f"s{i}@example.com", reason=reason, source="test", now=NOW - timedelta(days=1))
        report = build_stats(engine, since=NOW - timedelta(days=90), now=NOW)
    finally:
        engine.dispose()
    text = json.dumps(report.as_json()["suppressions"])
    assert text == '{"complaint": 3, "hard_bounce": 3, "manual": 3, "unsubscribed": 3}'


def test_a_reason_an_earlier_version_stored_as_typed_is_counted_with_kembalis_on_each_database(db_url: str) -> None:
    from worker.stats import build_stats

    # Given complaints and bounces an earlier kembali stored as typed (`suppress add --reason Complaint`, `suppress
    # import --reason HARD_BOUNCE`), beside ones stored as Kembali writes them now, and a reason of the shop's own
    engine = db.create_engine(db_url)
    try:
        store = Store(engine)
        reasons = ["Complaint", "complaint", "COMPLAINT", "HARD_BOUNCE", "hard_bounce", "Unsubscribed", "Spamtrap"]
        for i, reason in enumerate(reasons):
            store.suppress(f"s{i}@example.com", reason=reason, source="cli", now=NOW - timedelta(days=1))
        # When the stats are made
        report = build_stats(engine, since=NOW - timedelta(days=90), now=NOW)
    finally:
        engine.dispose()
    # Then each reason Kembali knows is counted once, as Kembali writes it, not a 'Complaint' apart from the
    # 'complaint' (a program reading --json's "complaint" missed them); the shop's own reason is left as it is
    assert report.as_json()["suppressions"] == {"Spamtrap": 1, "complaint": 3, "hard_bounce": 2, "unsubscribed": 1}


def test_a_lift_that_rounds_to_zero_reads_plus_zero_not_minus_zero() -> None:
    from worker.commands.reporting import stats_lines
    from worker.stats import StatsReport, StepStats

    # Given a step whose emailed group ordered at 10.00 % and whose holdout group at 10.01 %
    step = StepStats("winback", 1, planned=2000, emailed=stats.Conversion(1000, 100, 0, 0),
                     held_out=stats.Conversion(999, 100, 0, 0), lift=stats.lift(100, 1000, 100, 999))  # fmt: skip
    report = StatsReport(since=NOW - timedelta(days=60), now=NOW, window_days=7, currency="IDR", steps=[step],
                         suppressions={}, retention=stats.Retention(0, 0, 0, 0), feedback=None)  # fmt: skip
    # When the report is written
    lines = [line for line in stats_lines(report) if line.startswith("  lift:")]
    # Then the difference reads +0.0 points, not -0.0
    assert len(lines) == 1 and lines[0].startswith("  lift: +0.0 points, 95% CI -"), lines



def test_the_report_writes_its_counts_with_thousands_separators() -> None:
    from collections import Counter

    from worker.commands.reporting import stats_lines
    from worker.stats import StatsReport, StepStats

    # a shop's report of thousands read "planned 10338: sent 4608, …, waiting 5199" under an import that said
    # "40,732 created": figures this size are written with separators, as the import and the run write them
    step = StepStats("new_products", 1, planned=10_338, statuses=Counter({"sent": 4_608, "planned": 5_199}),
                     skipped=Counter({"held_out": 1_531}), emailed=stats.Conversion(4_608, 1_200, 0, 0),
                     held_out=stats.Conversion(1_531, 300, 0, 2_000), treated=stats.Conversion(9_807, 2_500, 0, 0))
    report = StatsReport(since=NOW - timedelta(days=60), now=NOW, window_days=7, currency="IDR", steps=[step],
                         suppressions={"hard_bounce": 1_024}, retention=stats.Retention(12_000, 3_000, 20_000, 15_000),
                         feedback=None)  # fmt: skip
    text = "\n".join(stats_lines(report))
    assert "  planned 10,338: sent 4,608, failed 0 (0 hard bounces), uncertain 0, waiting 5,199" in text, text
    assert "  skipped: held_out 1,531" in text, text
    assert "  conversion: 1,200 of 4,608 emailed customers ordered" in text, text
    assert "  holdout: 300 of 1,531 held-out customers ordered (19.6%); 2,000 still inside the window" in text, text
    assert "  against: 2,500 of 9,807 customers not held out ordered" in text, text
    assert "hard_bounce 1,024" in text and "(3,000 of 12,000 customers who bought" in text, text
    assert "(15,000 of 20,000 earlier customers did not buy" in text, text

def test_conversion_boundaries_to_the_microsecond_on_each_database(db_url: str) -> None:
    # Given exposures and purchases on each side of every boundary, to the microsecond (a moment just before a
    # whole second too, which a database rounding to milliseconds would carry into the next second)
    window = timedelta(days=7)
    now = NOW.replace(microsecond=500_000)
    at = NOW - timedelta(days=20, microseconds=-123_457)
    late = NOW.replace(microsecond=999_999) - timedelta(days=15, seconds=1)
    us = timedelta(microseconds=1)
    cs = [f"C-B{i:02d}" for i in range(14)]
    orders = [
        _order(cs[0], 1, at, 1_00),  # at the moment: not after it
        _order(cs[1], 1, at + us, 2_00),
        _order(cs[2], 1, at + window, 4_00),  # at the end of the window: counts
        _order(cs[3], 1, at + window + us, 8_00),
        _order(cs[4], 1, at + timedelta(days=8), 16_00),  # inside the second row's window, not the first's
        _order(cs[5], 1, at - timedelta(days=1), 32_00),  # after the due time, before the row was planned
        _order(cs[6], 1, late + window, 64_00),
        _order(cs[7], 1, late + window + us, 128_00),
        _order(cs[8], 1, at + timedelta(days=1), 256_00, OrderStatus.CANCELLED),
        _order(cs[9], 1, at + timedelta(days=2), 512_00),  # emailed without a sent_at: from updated_at
        _order(cs[12], 1, at + timedelta(days=1), 1024_00),
        _order(cs[12], 2, at + timedelta(days=3), 2048_00),
    ]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs, orders)
        skipped = {"status": "skipped", "skip_reason": "ordered_since"}
        rows: list[tuple[str, str, datetime, dict[str, object]]] = [
            (cs[0], "a", at, skipped), (cs[1], "a", at, skipped), (cs[2], "a", at, skipped),
            (cs[3], "a", at, skipped), (cs[4], "a", at, skipped), (cs[4], "b", at + timedelta(days=2), skipped),
            (cs[5], "a", at - timedelta(days=3), {**skipped, "created_at": at}),
            (cs[6], "a", late, skipped), (cs[7], "a", late, skipped), (cs[8], "a", at, skipped),
            (cs[9], "a", at - timedelta(days=1), {"status": "sent", "sent_at": None, "updated_at": at}),
            (cs[10], "a", now - window, skipped),  # the window ends at now: counted
            (cs[11], "a", now - window + us, skipped),  # the window ends after now: pending
            (cs[12], "a", at, {"status": "sent", "sent_at": at + timedelta(days=2), "updated_at": at}),
        ]  # fmt: skip
        for c, key, due, values in rows:
            _ledger_row(engine, pk, c, due, key=f"{c}:{key}", **values)
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=now)
    finally:
        engine.dispose()

    # Then each boundary falls where core.stats.conversion puts it
    (winback,) = report.steps
    assert winback.treated == stats.Conversion(customers=12, converted=5, revenue_minor=2_00 + 4_00 + 64_00 + 512_00
                                               + 1024_00 + 2048_00, pending=1)  # fmt: skip
    assert winback.emailed == stats.Conversion(customers=2, converted=2, revenue_minor=512_00 + 2048_00, pending=0)
    assert winback.held_out is None



def test_a_now_after_the_current_time_says_its_open_windows_are_counted_as_closed(tmp_path: Path) -> None:
    # Given a customer emailed yesterday who has not ordered (yet)
    site = make_site(tmp_path / "site")
    sent = datetime.now(UTC) - timedelta(days=1)
    engine = db.create_engine(site.settings.database_url)
    pk = _load(engine, ["C-1"], [_order("C-1", 0, FIRST_ORDER, 1_000_00)])
    _ledger_row(engine, pk, "C-1", sent, status="sent", sent_at=sent, updated_at=sent, last_code=250)
    engine.dispose()
    # When the operator gives a --now a month ahead (2027 for 2026, say)
    ahead = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    done = site.cli("stats", "--now", ahead)
    # Then the report is made, but it says that its week still open is counted as a week without an order
    assert done.returncode == 0, done.stderr
    assert "conversion: 0 of 1 emailed customers ordered (0.0%)" in done.stdout
    assert done.stderr.startswith(f"kembali stats: note: --now {ahead} is after the current time: "), done.stderr
    assert "attribution window still open now counts as closed, with the orders imported so far" in done.stderr
    # And a --now already past says nothing of it
    assert site.cli("stats", "--now", NOW.isoformat()).stderr == ""


@pytest.mark.parametrize(("command", "figures"), [
    ("stats", ["planned", "sent", "failed", "hard bounces", "cancelled", "uncertain", "waiting", "skipped",
               "conversion", "revenue", "holdout", "against", "still inside the window", "lift", "verdict",
               "deliverability", "repeat purchase rate", "churn", "feedback"]),
    ("insights", ["customers have bought", "days from the first to the second purchase", "median", "recommended",
                  "after a win-back email"]),
])  # fmt: skip
def test_the_help_says_what_each_figure_of_the_report_is(tmp_path: Path, command: str, figures: list[str]) -> None:
    # the help listed the figures' names alone: what "waiting", "against" or "churn" count, or whether an order
    # before the email converts, was in the README only
    site = make_site(tmp_path / "site")
    help_text = site.cli(command, "--help").stdout
    assert "\nfigures: " in help_text, help_text
    defined = help_text.split("\nfigures: ", 1)[1].split("\nexamples:\n", 1)[0]
    for figure in figures:  # each the start of a definition: "  waiting  …"
        assert re.search(rf"^  {re.escape(figure)}(?=[ :\n])", defined, re.M), (figure, defined)
    assert max(len(line) for line in defined.splitlines()) <= 80


def test_the_default_period_starts_at_midnight_in_the_shops_zone_of_the_day_its_header_names(tmp_path: Path) -> None:
    # Given a Jakarta shop (shop.time_zone's default), an address suppressed in the first moment of the day 90 days
    # before 2026-11-20 in Jakarta (17:00 UTC the day before), and one a second before it
    site = make_site(tmp_path / "shop")
    start = datetime(2026, 8, 21, 17, 0, tzinfo=UTC)
    engine = db.create_engine(site.settings.database_url)
    Store(engine).suppress("early@example.com", reason="unsubscribed", source="link", now=start)
    Store(engine).suppress("before@example.com", reason="unsubscribed", source="link", now=start - timedelta(seconds=1))
    engine.dispose()

    # When the stats are asked for at 00:00:05 on 2026-11-20 in Jakarta without --since, and with --since that day
    at = "2026-11-20T00:00:05+07:00"
    default = site.cli("stats", "--now", at)
    report = json.loads(site.cli("stats", "--json", "--now", at).stdout)
    named = json.loads(site.cli("stats", "--json", "--since", "2026-08-22", "--now", at).stdout)

    # Then the period starts when its header says, on the shop's clock, and is the one --since that day gives
    assert default.returncode == 0, default.stderr
    assert default.stdout.startswith("Kembali stats from 2026-08-22 to 2026-11-20 (Asia/Jakarta)"), default.stdout
    assert report["since"] == "2026-08-22T00:00:00+07:00" == named["since"]
    assert report["time_zone"] == "Asia/Jakarta"
    assert report["suppressions"] == {"unsubscribed": 1} == named["suppressions"]


def test_since_is_a_day_on_the_shops_clock(tmp_path: Path) -> None:
    # Given a Jakarta shop where one customer unsubscribed at 23:30 on 30 November and one at 00:30 on 1 December,
    # Jakarta time (16:30 and 17:30 UTC on 30 November), and one rating at 06:00 on 1 December in Jakarta
    site = make_site(tmp_path / "shop")
    engine = db.create_engine(site.settings.database_url)
    store = Store(engine)
    store.suppress("november@example.com", reason="unsubscribed", source="link",
                   now=datetime(2026, 11, 30, 16, 30, tzinfo=UTC))  # fmt: skip
    store.suppress("december@example.com", reason="unsubscribed", source="link",
                   now=datetime(2026, 11, 30, 17, 30, tzinfo=UTC))  # fmt: skip
    opstore.record_feedback(store, "O1", 5, datetime(2026, 11, 30, 23, 0, tzinfo=UTC))
    engine.dispose()

    # When the operator in Jakarta asks for the stats since 1 December, as of 10:00 on 2 December there
    done = site.cli("stats", "--since", "2026-12-01", "--now", "2026-12-02T10:00+07:00")
    report = json.loads(site.cli("stats", "--json", "--since", "2026-12-01", "--now", "2026-12-02T10:00+07:00").stdout)

    # Then December's first hours in Jakarta are in it and November's last are not
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Kembali stats from 2026-12-01 to 2026-12-02 (Asia/Jakarta)"), done.stdout
    assert report["suppressions"] == {"unsubscribed": 1}
    assert report["feedback"]["responses"] == 1
    assert (report["since"], report["until"]) == ("2026-12-01T00:00:00+07:00", "2026-12-02T10:00:00+07:00")
    # and the help says the days are the shop's
    assert "shop.time_zone" in site.cli("stats", "--help").stdout


def test_since_the_first_day_there_is_every_day_in_a_zone_east_of_utc(tmp_path: Path) -> None:
    # Given a Jakarta shop: 00:00 on 1 January of year 1 there is before the first moment Python's datetime holds
    site = make_site(tmp_path / "shop")
    # When the operator asks for everything there is
    done = site.cli("stats", "--since", "0001-01-01", "--now", "2026-11-20T06:00+07:00")
    # Then the report starts at the first day, with no traceback
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Kembali stats from 0001-01-01 to 2026-11-20 (Asia/Jakarta)"), done.stdout


def test_now_names_the_day_in_the_shops_zone_the_period_ends_on(tmp_path: Path) -> None:
    # Given an address suppressed a minute before 06:00 on 2026-11-20 in Jakarta (23:00 UTC the day before), and one
    # a minute after
    site = make_site(tmp_path / "shop")
    end = datetime(2026, 11, 19, 23, 0, tzinfo=UTC)
    engine = db.create_engine(site.settings.database_url)
    for email, minutes in [("before@example.com", -1), ("after@example.com", 1)]:
        Store(engine).suppress(email, reason="unsubscribed", source="link", now=end + timedelta(minutes=minutes))
    engine.dispose()

    # When the stats are asked for as of 06:00 on 2026-11-20 in Jakarta
    done = site.cli("stats", "--now", "2026-11-20T06:00+07:00")
    report = json.loads(site.cli("stats", "--json", "--now", "2026-11-20T06:00+07:00").stdout)

    # Then the period is the 90 days up to that day in Jakarta, and ends at that moment
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Kembali stats from 2026-08-22 to 2026-11-20 (Asia/Jakarta)"), done.stdout
    assert (report["since"], report["until"]) == ("2026-08-22T00:00:00+07:00", "2026-11-20T06:00:00+07:00")
    assert report["suppressions"] == {"unsubscribed": 1}


def test_the_period_ends_at_now_on_each_database(db_url: str) -> None:
    from worker.stats import build_stats

    # Given a win-back email sent a minute before the moment of the report, and what came a minute after it: a
    # second one planned (that failed: the address does not exist), an unsubscribe and a rating
    end = NOW - timedelta(days=10)
    before, after = end - timedelta(minutes=1), end + timedelta(minutes=1)
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, ["C-1", "C-2"])
        _ledger_row(engine, pk, "C-1", before, status="sent", sent_at=before, last_code=250)
        _ledger_row(engine, pk, "C-2", after, status="failed", last_code=550,
                    last_reply="5.1.1 <c-2@example.com>: Recipient address rejected: User unknown")  # fmt: skip
        store = Store(engine)
        store.suppress("before@example.com", reason="unsubscribed", source="link", now=before)
        store.suppress("after@example.com", reason="hard_bounce", source="smtp", now=after)
        opstore.record_feedback(store, "O1", 5, before)
        opstore.record_feedback(store, "O2", 1, after)
        # When the report is made as of that moment
        report = build_stats(engine, since=end - timedelta(days=30), now=end)
    finally:
        engine.dispose()
    # Then what came after it is not in it, and the email sent before it is still inside its window
    (winback,) = report.as_json()["campaigns"]
    assert (winback["planned"], winback["sent"], winback["failed"], winback["hard_bounces"]) == (1, 1, 0, 0)
    assert winback["conversion"]["pending"] == 1
    assert report.as_json()["suppressions"] == {"unsubscribed": 1}
    assert report.as_json()["feedback"] == {"responses": 1, "average": 5.0, "nps": None, "other_scale": 0}


def test_hard_bounces_are_the_failures_the_sender_suppresses_on_each_database(db_url: str) -> None:
    # Given one win-back step whose failed messages met these last replies: one address that does not exist, a
    # template refused for its content, a sender refused (SPF/DKIM) until its attempts ran out, a full mailbox,
    # and a greylisting 4xx until its attempts ran out
    replies = [
        (550, "5.1.1 <gone@example.com>: Recipient address rejected: User unknown in virtual mailbox table"),
        (550, "5.7.1 Message rejected: the content looks like spam (URL on a block list)"),
        (550, "5.7.26 This mail is unauthenticated, which poses a security risk to the sender and Gmail users"),
        (552, "5.2.2 The email account that you tried to reach is over quota"),
        (451, "4.7.1 Greylisted, please try again later"),
    ]
    cs = [f"C-F{i}" for i in range(len(replies))]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs)
        for c, (code, reply) in zip(cs, replies, strict=True):
            _ledger_row(engine, pk, c, NOW - timedelta(days=3), status="failed", attempts=5, last_code=code,
                        last_reply=reply, updated_at=NOW - timedelta(days=2))  # fmt: skip
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW)
    finally:
        engine.dispose()

    # Then five failed, and one of them is a hard bounce: the address that does not exist, the one failure that
    # puts an address on the suppression list (the content, the sender's setup and a full mailbox say nothing
    # about the address)
    (winback,) = report.steps
    assert winback.as_json()["failed"] == 5
    assert winback.hard_bounces == 1
    from worker.commands.reporting import stats_lines

    assert "  planned 5: sent 0, failed 5 (1 hard bounce)," in "\n".join(stats_lines(report))


def test_messages_an_operator_cancelled_are_counted_apart_from_failures_on_each_database(db_url: str) -> None:
    from worker.adapters.ledger import LedgerAdmin
    from worker.adapters.store import A
    from worker.commands.reporting import stats_lines
    from worker.stats import build_stats

    # Given a win-back step of five messages: two still planned and one in retry after a 451 (tried once), a
    # failed one whose address does not exist, and one failed on its template (nothing handed to a server)
    planned_at = NOW - timedelta(days=3)
    tried_at = planned_at + timedelta(hours=1)
    cs = [f"C-{i}" for i in range(5)]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs)
        _ledger_row(engine, pk, "C-0", planned_at, status="planned")
        _ledger_row(engine, pk, "C-1", planned_at, status="planned")
        _ledger_row(engine, pk, "C-2", planned_at, status="retry", attempts=1, last_code=451,
                    last_reply="4.7.1 Greylisted, please try again later")  # fmt: skip
        _ledger_row(engine, pk, "C-3", planned_at, status="failed", attempts=1, last_code=550,
                    last_reply="5.1.1 <c-3@example.com>: Recipient address rejected: User unknown")  # fmt: skip
        _ledger_row(engine, pk, "C-4", planned_at, status="failed", last_error="UndefinedError")
        with engine.begin() as conn:
            ids = dict(conn.execute(sa.select(M.c.email, M.c.id)).all())
            conn.execute(sa.insert(A), [
                {"message_id": ids[email], "attempt_no": 1, "worker": "w1", "started_at": tried_at,
                 "finished_at": tried_at, "outcome": outcome, "code": code, "reply": "", "error_type": ""}
                for email, outcome, code in [("c-2@example.com", "transient", 451),
                                             ("c-3@example.com", "permanent", 550),
                                             ("c-4@example.com", "render_error", None)]
            ])  # fmt: skip
        # When the operator cancels the campaign's waiting messages (`ledger close --status planned,retry`), and
        # closes the template's failure as failed after looking at it
        result = LedgerAdmin(engine).close([ids[f"c-{i}@example.com"] for i in (0, 1, 2, 4)],
                                           now=NOW - timedelta(days=1), operator="ops", status=MessageStatus.FAILED)
        assert len(result.changed) == 4, result
        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW)
    finally:
        engine.dispose()

    # Then the two never tried are counted as cancelled, not failed; the one tried before its cancel, the hard
    # bounce and the template's failure stay failed, and planned is still the sum of all
    (winback,) = report.as_json()["campaigns"]
    assert (winback["planned"], winback["failed"], winback["cancelled"], winback["hard_bounces"]) == (5, 3, 2, 1)
    assert "  planned 5: sent 0, failed 3 (1 hard bounce), cancelled 2, uncertain 0, waiting 0" in stats_lines(report)


def test_feedback_counts_the_ratings_given_in_the_period_on_each_database(db_url: str) -> None:
    from worker.stats import build_stats

    # Given ratings of 1 and 2 stars given before the period, and of 4 and 5 stars given in it (the first on the
    # first day of the period, at midnight UTC)
    since = datetime.combine((NOW - timedelta(days=30)).date(), datetime.min.time(), tzinfo=UTC)
    engine = db.create_engine(db_url)
    try:
        store = Store(engine)
        for order, score, at in [("O1", 1, since - timedelta(days=40)), ("O2", 2, since - timedelta(microseconds=1)),
                                 ("O3", 4, since), ("O4", 5, NOW - timedelta(days=1))]:  # fmt: skip
            opstore.record_feedback(store, order, score, at)
        report = build_stats(engine, since=since, now=NOW)
    finally:
        engine.dispose()
    # Then the report's feedback is the period's, as every other figure in it: 2 responses, 4.5 on average
    assert report.as_json()["feedback"] == {"responses": 2, "average": 4.5, "nps": None, "other_scale": 0}


def test_the_text_says_which_windows_are_still_open_in_every_group() -> None:
    from worker.commands.reporting import stats_lines
    from worker.stats import StatsReport, StepStats

    # Given a step whose 50 emailed customers were all emailed inside the last 7 days, and whose held-out and
    # not-held-out customers are partly still inside their windows
    step = StepStats("winback", 2, planned=114, emailed=stats.Conversion(0, 0, 0, 50),
                     held_out=stats.Conversion(10, 1, 0, 4), treated=stats.Conversion(40, 8, 0, 60),
                     lift=stats.lift(8, 40, 1, 10, held_out=14, treated=100))  # fmt: skip
    # and a step whose one row was skipped
    none = StepStats("winback", 3, planned=1, emailed=stats.Conversion(0, 0, 0, 0), lift=stats.lift(0, 0, 0, 0))
    report = StatsReport(since=NOW - timedelta(days=60), now=NOW, window_days=7, currency="IDR", steps=[step, none],
                         suppressions={}, retention=stats.Retention(0, 0, 0, 0), feedback=None)  # fmt: skip
    text = "\n".join(stats_lines(report))
    # Then the conversion is not given as "0 of 0 (n/a)" but as not measured yet, and each group says how many of
    # its customers are still inside their window
    assert "  conversion: not measured yet: the 7-day windows of the 50 emailed customers are still open\n" in text
    assert "  holdout: 1 of 10 held-out customers ordered (10.0%); 4 still inside the window\n" in text
    assert ("  against: 8 of 40 customers not held out ordered (20.0%), emailed or not, both counted from when the "
            "email was due; 60 still inside the window\n") in text  # fmt: skip
    # And a step that emailed nobody says so
    assert ("winback step 3\n  planned 1: sent 0, failed 0 (0 hard bounces), uncertain 0, waiting 0\n"
            "  conversion: nobody was emailed\n") in text  # fmt: skip


def test_refunds_placed_orders_and_a_second_email_on_each_database(db_url: str) -> None:
    # Given four customers emailed 20 days ago: one whose order within the week was refunded, one whose order was
    # placed (not yet paid), one emailed again 10 days ago who ordered 2 days after the second email (outside the
    # first email's window), and one who ordered twice within the week
    sent = NOW - timedelta(days=20)
    cs = ["C-R", "C-P", "C-2", "C-T"]
    orders = [_order("C-R", 1, sent + timedelta(days=1), 7_00, OrderStatus.REFUNDED),
              _order("C-P", 1, sent + timedelta(days=6), 11_00, OrderStatus.PLACED),
              _order("C-2", 1, sent + timedelta(days=12), 13_00),
              _order("C-T", 1, sent + timedelta(hours=1), 17_00), _order("C-T", 2, sent + timedelta(days=7), 19_00)]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs, orders)
        for c in cs:
            _ledger_row(engine, pk, c, sent, key=f"feedback:{c}:1", status="sent", sent_at=sent, updated_at=sent)
        _ledger_row(engine, pk, "C-2", sent + timedelta(days=10), key="feedback:C-2:2", status="sent",
                    sent_at=sent + timedelta(days=10), updated_at=sent + timedelta(days=10))  # fmt: skip
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW)
    finally:
        engine.dispose()
    # Then 1 of the 4 customers converted (the two orders, Rp17 + Rp19): the refund is no purchase, nor an order
    # placed and not paid (as for loyalty's milestones and win-back's one purchase: it counted, Rp11 of revenue
    # never received), and a customer emailed twice in a step counts once, from the first email
    (winback,) = report.steps
    assert winback.planned == 5 and winback.as_json()["sent"] == 5
    assert winback.emailed == stats.Conversion(customers=4, converted=1, revenue_minor=17_00 + 19_00, pending=0)


def test_revenue_past_what_a_bigint_holds_is_counted_exactly(db_url: str) -> None:
    # Given three customers emailed 20 days ago who bought within the week: two for 5 * 10^18 minor units each (an
    # absurd amount, each one within what a customer's total holds), and one whose two orders an older import
    # stored though together they are past 2^63 - 1
    sent = NOW - timedelta(days=20)
    cs = ["C-1", "C-2", "C-3"]
    orders = [_order(c, 1, sent + timedelta(days=2), 5 * 10**18) for c in ("C-1", "C-2")]
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, cs, orders)
        stored_orders(engine, "C-3", [("O-C-3-1", "paid", 9 * 10**18, "IDR", sent + timedelta(days=1)),
                                      ("O-C-3-2", "paid", 9 * 10**18, "IDR", sent + timedelta(days=2))])  # fmt: skip
        for c in cs:
            _ledger_row(engine, pk, c, sent, status="sent", sent_at=sent, updated_at=sent, last_code=250)
        from worker.stats import build_stats

        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW, currency="IDR")
    finally:
        engine.dispose()
    # Then the report is made (SQLite's sum() failed with "integer overflow") and its revenue is exact
    (winback,) = report.steps
    assert winback.emailed is not None
    assert (winback.emailed.converted, winback.emailed.revenue_minor) == (3, 28 * 10**18)


def test_a_message_whose_worker_died_while_sending_closed_as_failed_is_a_failure_not_a_cancel(db_url: str) -> None:
    from worker.adapters.ledger import LedgerAdmin
    from worker.commands.reporting import stats_lines
    from worker.stats import build_stats

    # Given a win-back message marked sending (handed to the SMTP server: its try counted) whose worker died: the
    # lease lapsed and it became uncertain, with no attempt row (none was written for the send cut short)
    planned_at = NOW - timedelta(days=3)
    engine = db.create_engine(db_url)
    try:
        pk = _load(engine, ["C-0"])
        _ledger_row(engine, pk, "C-0", planned_at, status="sending", attempts=1, claimed_by="w1",
                    lease_until=planned_at + timedelta(minutes=5), updated_at=planned_at + timedelta(minutes=1))
        assert Store(engine).release(M.c.dedupe_key == "winback:C-0:O-C-0-0:1", now=planned_at + timedelta(hours=1),
                                     why="worker died") == (0, 1)
        # When the operator decides it did not arrive: `ledger close ID` (as failed)
        with engine.begin() as conn:
            (message_id,) = conn.execute(sa.select(M.c.id)).scalars().all()
        result = LedgerAdmin(engine).close([message_id], now=NOW - timedelta(days=1), operator="ops",
                                           status=MessageStatus.FAILED)
        assert len(result.changed) == 1, result
        report = build_stats(engine, since=NOW - timedelta(days=60), now=NOW)
    finally:
        engine.dispose()

    # Then it is a failure (it was tried: it may even have left), not a message cancelled before any try
    (winback,) = report.as_json()["campaigns"]
    assert (winback["planned"], winback["failed"], winback["cancelled"]) == (1, 1, 0), winback
    assert "  planned 1: sent 0, failed 1 (0 hard bounces), uncertain 0, waiting 0" in stats_lines(report)


def test_insights_on_a_shop_whose_orders_are_none_paid_says_nobody_has_bought(tmp_path: Path) -> None:
    # Given a shop whose orders were all placed and none paid yet (cash on delivery, a bank transfer awaited)
    site = make_site(tmp_path / "site")
    cs = ["C-00", "C-01"]
    engine = db.create_engine(site.settings.database_url)
    _load(engine, cs, [_order(c, n, FIRST_ORDER + timedelta(days=n), 1_000_00, OrderStatus.PLACED)
                       for c in cs for n in (1, 2)])  # fmt: skip
    engine.dispose()
    # When the operator asks for insights
    done = site.cli("insights")
    # Then it says that nobody has bought and what a purchase is, not "0 customers have bought; 0 of them bought a
    # second time." over a shop of four orders
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == ("no customer has bought yet (a purchase is an order paid, shipped or "
                                           "delivered)"), done.stdout  # fmt: skip
    assert "nothing to recommend" in done.stdout


def test_insights_on_a_single_second_purchase_says_it_in_the_singular(tmp_path: Path) -> None:
    # Given a shop where one customer has bought again, 20 days (and an hour) after the first purchase, the day
    # after a win-back email
    site = make_site(tmp_path / "site")
    back = FIRST_ORDER + timedelta(days=20, hours=1)
    engine = db.create_engine(site.settings.database_url)
    pk = _load(engine, ["C-00"], [_order("C-00", 1, FIRST_ORDER, 1_000_00), _order("C-00", 2, back, 1_000_00)])
    _ledger_row(engine, pk, "C-00", back - timedelta(days=1), status="sent", sent_at=back - timedelta(days=1))
    engine.dispose()
    # When the operator asks for the first win-back day
    text = " ".join(site.cli("insights").stdout.split())
    # Then the sample is one second purchase, not "resting on 1 second purchases (only 1 second purchases: …)"
    assert "1 customer has bought; 1 of them bought a second time." in text, text
    assert ("recommended campaigns.winback.quiet_days = 21, resting on 1 second purchase (only 1 second purchase: "
            "treat it as a rough guess)") in text, text
    # and not "1 of the 1 second purchases came after a win-back email"
    assert "the one second purchase came after a win-back email, which may have brought it on" in text, text


def test_insights_says_when_the_recommended_day_is_past_give_up_after_days(tmp_path: Path) -> None:
    # Given a one-step win-back that gives up on orders older than 40 days, and 10 customers who came back 50 to 59
    # days (and an hour) after their first purchase
    site = _came_back(tmp_path, range(50, 60), "[campaigns.winback]\nquiet_days = 30\ngive_up_after_days = 40\n")
    # When the operator asks for the first win-back day
    text = " ".join(site.cli("insights").stdout.split())
    # Then the day recommended (58) is said to need give_up_after_days raised past it: set alone, the config would
    # not load ("must be 0 (no limit) or more than the last step's days")
    assert "recommended campaigns.winback.quiet_days = 58" in text, text
    assert "campaigns.winback.give_up_after_days must stay greater (it is 40)" in text, text


def test_insights_recommends_a_day_the_config_takes_when_second_purchases_came_at_once(db_url: str) -> None:
    # Given 10 customers whose two orders were placed at the same moment (a checkout split in two orders)
    from worker.stats import build_insights

    cs = [f"C{i:02d}" for i in range(10)]
    orders = [_order(c, n, FIRST_ORDER, 1_000_00) for c in cs for n in (1, 2)]
    engine = db.create_engine(db_url)
    try:
        _load(engine, cs, orders)
        insights = build_insights(engine)
    finally:
        engine.dispose()
    # Then the recommendation is 1 day, the least win-back's days (and quiet_days) can be, not 0
    assert insights.gaps_days == [0] * 10
    assert insights.recommended_quiet_days == 1


@pytest.mark.parametrize(("share", "said"), [("0.995", "99.5%"), ("0.125", "12.5%"), ("0.8", "80%")])
def test_insights_names_the_share_it_was_asked_for(tmp_path: Path, share: str, said: str) -> None:
    # Given 200 customers whose second purchase came 1, 2, … 200 days (and an hour) after their first
    site = _came_back(tmp_path, range(1, 201))
    # When the operator asks by when 99.5 % of them came (not all: 199 of 200 by day 200)
    text = site.cli("insights", "--share", share).stdout
    # Then the text names that share, not "100% of second purchases happened within 200 days"
    assert f"{said} of second purchases happened within" in text, text


def test_revenue_counts_the_shops_currency_whatever_case_config_writes_it_in(tmp_path: Path) -> None:
    # Given the constructed shop (orders in IDR, as every import stores a code) whose config writes the currency
    # in lower case, which it takes (shop.currency = "idr")
    site = make_site(tmp_path / "site", extra_toml='[shop]\ncurrency = "idr"\n')
    _build(site)
    # When the operator asks for the numbers
    done = site.cli("stats", "--since", SINCE.isoformat(), "--json", "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # Then the revenue is the 30 purchases in rupiah, not nothing: "idr" is IDR
    assert report["currency"] == "IDR"
    assert report["campaigns"][0]["conversion"]["revenue_minor"] == EMAILED_BUY * PRICE


def test_a_message_sent_while_the_report_is_made_is_counted_alike_in_every_figure_on_each_database(
    db_url: str,
) -> None:
    from worker.stats import build_stats

    # Given a win-back message waiting in the queue, and a daemon that sends it while the report is being made:
    # just after the report's first query
    engine = db.create_engine(db_url)
    daemon = db.create_engine(db_url)
    try:
        pk = _load(engine, ["C-1"])
        _ledger_row(engine, pk, "C-1", NOW - timedelta(days=1), status="planned")
        queries = []

        def send_after_the_first_query(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            if not statement.lstrip().upper().startswith("SELECT"):
                return  # BEGIN, the session's settings
            queries.append(statement)
            if len(queries) == 1:
                with daemon.begin() as conn:
                    conn.execute(sa.update(M).values(status="sent", sent_at=datetime.now(UTC), last_code=250))

        sa.event.listen(engine, "after_cursor_execute", send_after_the_first_query)
        report = build_stats(engine, since=NOW - timedelta(days=30), now=datetime.now(UTC))
    finally:
        engine.dispose()
        daemon.dispose()
    # Then the report is of one moment of the ledger: the message is waiting in every figure (it read "sent 0,
    # waiting 1" and, two lines down, "the 7-day window of the 1 emailed customer is still open")
    assert len(queries) > 1
    (winback,) = report.as_json()["campaigns"]
    assert (winback["sent"], winback["waiting"]) == (0, 1)
    assert winback["conversion"] == {"customers": 0, "converted": 0, "rate": None, "revenue_minor": 0, "pending": 0}


def test_a_group_whose_windows_are_all_open_says_so_not_0_of_0() -> None:
    from worker.commands.reporting import stats_lines
    from worker.stats import StatsReport, StepStats

    # Given a step planned yesterday: 60 customers not held out (28 of them emailed) and 4 held out, every
    # attribution window still open (the demo's report, run right after it)
    step = StepStats("new_products", 1, planned=64, emailed=stats.Conversion(0, 0, 0, 28),
                     held_out=stats.Conversion(0, 0, 0, 4), treated=stats.Conversion(0, 0, 0, 60),
                     lift=stats.lift(0, 0, 0, 0, held_out=4, treated=60))  # fmt: skip
    report = StatsReport(since=NOW - timedelta(days=60), now=NOW, window_days=7, currency="IDR", steps=[step],
                         suppressions={}, retention=stats.Retention(0, 0, 0, 0), feedback=None)  # fmt: skip
    text = "\n".join(stats_lines(report))
    # Then no group reads "0 of 0 … ordered (n/a)": each says its windows are still open, as the emailed one does
    steps = text.split("deliverability")[0]
    assert "0 of 0" not in steps and "n/a" not in steps, text
    assert "  conversion: not measured yet: the 7-day windows of the 28 emailed customers are still open\n" in text
    assert "  holdout: not measured yet: the 7-day windows of the 4 held-out customers are still open\n" in text
    assert ("  against: not measured yet: the 7-day windows of the 60 customers not held out are still open\n"
            in text), text


def test_star_ratings_are_not_averaged_with_scores_out_of_10(tmp_path: Path) -> None:
    # Given a shop that asks for stars now, whose ratings in the period are 5, 4 and 3 stars, and a 10 and a 0 out of
    # 10 clicked in feedback requests sent before the scale changed (the page says "10 out of 10": a score outside
    # 1-5 is out of 10 whatever the config says now)
    site = make_site(tmp_path / "site", extra_toml='[campaigns.feedback]\nscale = "stars"\n')
    engine = sa.create_engine(site.settings.database_url)
    for i, score in enumerate([5, 4, 3, 10, 0]):
        opstore.record_feedback(Store(engine), f"O{i}", score, NOW - timedelta(days=1))
    engine.dispose()
    # When the operator asks for the stats
    report = json.loads(site.cli("stats", "--json", "--now", NOW.isoformat()).stdout)
    text = site.cli("stats", "--now", NOW.isoformat()).stdout
    # Then the average is of the 3 star ratings, 4.00 (not 4.40 "stars" out of 5, or 6 with two tens), and the 2
    # scores out of 10 are said to be left out
    assert report["feedback"] == {"responses": 3, "average": 4.0, "nps": None, "other_scale": 2}
    assert ("feedback: 3 responses in the period, average 4.00 (2 scores out of 10, from requests sent before the "
            "scale changed, left out)") in text, text


def test_a_period_ending_at_midnight_names_the_day_before_as_its_last(tmp_path: Path) -> None:
    # Given a Jakarta shop
    site = make_site(tmp_path / "shop")
    # When the operator asks for November, as README's example does: up to 00:00 on 1 December there
    done = site.cli("stats", "--since", "2026-11-01", "--now", "2026-12-01T00:00+07:00")
    report = json.loads(site.cli("stats", "--json", "--since", "2026-11-01", "--now", "2026-12-01T00:00+07:00").stdout)
    # Then the header's last day is 30 November (nothing of 1 December is in it), and --json keeps the moment
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Kembali stats from 2026-11-01 to 2026-11-30 (Asia/Jakarta)"), done.stdout
    assert report["until"] == "2026-12-01T00:00:00+07:00"
    # while a period that ends a second into a day names that day
    later = site.cli("stats", "--since", "2026-11-01", "--now", "2026-12-01T00:00:01+07:00").stdout
    assert later.startswith("Kembali stats from 2026-11-01 to 2026-12-01 (Asia/Jakarta)"), later


def test_since_the_day_a_period_ending_at_its_midnight_leaves_out_is_refused(tmp_path: Path) -> None:
    # Given a Jakarta shop
    site = make_site(tmp_path / "shop")
    # When the operator asks for the stats since 1 December, up to 00:00 on 1 December there: a period of no time,
    # whose last day is 30 November
    done = site.cli("stats", "--since", "2026-12-01", "--now", "2026-12-01T00:00+07:00")
    # Then it is refused as a --since after the report's last day, not a report "from 2026-12-01 to 2026-12-01" of
    # nothing, as if 1 December had been counted and found empty
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    assert ("kembali stats: --since 2026-12-01 is after the last day of the report (2026-11-30, Asia/Jakarta: --now "
            "at 00:00 there ends it with the day before): give a day before it") in done.stderr, done.stderr
    # while since the day before, it is that day's report
    day = site.cli("stats", "--since", "2026-11-30", "--now", "2026-12-01T00:00+07:00")
    assert day.returncode == 0, day.stderr
    assert day.stdout.startswith("Kembali stats from 2026-11-30 to 2026-11-30 (Asia/Jakarta)"), day.stdout


def test_an_unsubscribe_an_import_carried_to_a_customers_new_address_is_counted_once(db_url: str) -> None:
    from worker.stats import build_stats

    # Given a customer who unsubscribed, then moved: a customers import gave them another address, and the
    # unsubscribe followed them there (the same person's wish, on the list with the same reason and time)
    engine = db.create_engine(db_url)
    try:
        shop.upsert_customers(engine, [_customer("C-1")], NOW - timedelta(days=20))
        Store(engine).suppress("c-1@example.com", reason="unsubscribed", source="link", now=NOW - timedelta(days=10))
        moved = CustomerRecord("C-1", "c-1.baru@example.org", "Pelanggan C-1", Locale.ID, "Asia/Jakarta", None, True,
                               "opt_in", "checkout")  # fmt: skip
        assert [f.new for f in shop.upsert_customers(engine, [moved], NOW - timedelta(days=5)).followed] == [
            "c-1.baru@example.org"]
        # When the stats of the period are made
        report = build_stats(engine, since=NOW - timedelta(days=30), now=NOW)
    finally:
        engine.dispose()
    # Then the one unsubscribe counts once, not once for each address it followed the customer to (a report of a
    # period already past grew by one at every move)
    assert report.as_json()["suppressions"] == {"unsubscribed": 1}


@pytest.mark.skipif(os.geteuid() != 0, reason="a link another user owns is made as root")
def test_a_plot_through_a_link_another_user_planted_in_a_shared_folder_is_refused(tmp_path: Path) -> None:
    # Given a shared folder such as /tmp (sticky, anyone may write) where another user made a link gaps.png to a file
    # of the operator's: `> /tmp/gaps.png` is refused there (Linux's protected_symlinks, on by default), yet the chart
    # was written through it, the operator's own file replaced by a chart
    from worker.commands.files import write_whole

    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    precious = tmp_path / "home" / "notes.txt"
    precious.parent.mkdir()
    precious.write_bytes(b"the operator's notes\n")
    planted = shared / "gaps.png"
    planted.symlink_to(precious)
    os.lchown(planted, 65534, 65534)  # nobody's
    mine = shared / "mine.png"
    mine.symlink_to(tmp_path / "home" / "chart.png")
    # When the operator writes a chart to each
    with pytest.raises(PermissionError) as refused:
        write_whole(planted, b"\x89PNG chart")
    write_whole(mine, b"\x89PNG chart")
    # Then the planted link is not followed: refused as `>` refuses it, naming the path given, the file untouched
    assert refused.value.filename == str(planted)
    assert precious.read_bytes() == b"the operator's notes\n"
    assert planted.is_symlink() and sorted(p.name for p in precious.parent.iterdir()) == ["chart.png", "notes.txt"]
    # And a link of the operator's own is followed as before
    assert (tmp_path / "home" / "chart.png").read_bytes() == b"\x89PNG chart" and mine.is_symlink()


def test_a_plot_whose_temporary_name_another_user_planted_as_a_link_writes_through_no_link(tmp_path: Path) -> None:
    # Given a shared folder such as /tmp where another user made a link under the chart's temporary name
    # (.gaps.png.partial, a name anyone can tell) to a file of the operator's: the chart was written into that file
    # (open() followed the link), and the link then renamed to gaps.png
    from worker.commands.files import write_whole

    shared = tmp_path / "tmp"
    shared.mkdir()
    precious = tmp_path / "home" / "notes.txt"
    precious.parent.mkdir()
    precious.write_bytes(b"the operator's notes\n")
    (shared / ".gaps.png.partial").symlink_to(precious)
    # When the operator writes a chart there
    write_whole(shared / "gaps.png", b"\x89PNG chart")
    # Then the chart is a file of its own, and the file the link pointed to is untouched
    assert precious.read_bytes() == b"the operator's notes\n"
    assert not (shared / "gaps.png").is_symlink() and (shared / "gaps.png").read_bytes() == b"\x89PNG chart"
    assert sorted(p.name for p in shared.iterdir()) == ["gaps.png"]


def test_a_step_whose_every_customer_was_held_out_does_not_read_0_of_0(tmp_path: Path) -> None:
    # Given a feedback step planned 20 days ago whose one row was held out (the customer bought 2 days later), and
    # nobody else planned in that step
    site = make_site(tmp_path / "site")
    engine = db.create_engine(site.settings.database_url)
    pk = _load(engine, ["C-1"], [_order("C-1", 0, FIRST_ORDER, 100_00), _order("C-1", 1, EXPOSED + timedelta(2), 5_00)])
    _ledger_row(engine, pk, "C-1", EXPOSED, campaign="feedback", key="feedback:O-C-1-0", status="skipped",
                skip_reason="held_out")  # fmt: skip
    engine.dispose()

    # When the operator reads the report
    done = site.cli("stats", "--since", SINCE.isoformat(), "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr

    # Then the group the holdout is compared with is said to be empty, not "0 of 0 … ordered (n/a)"
    step = done.stdout.split("deliverability")[0]
    assert "  holdout: 1 of 1 held-out customers ordered (100.0%)\n" in step
    assert "0 of 0" not in step and "n/a" not in step, step
    assert "  against: nobody: every customer planned in this step was held out\n" in step, step


def test_one_rating_and_one_customer_are_said_in_the_singular(tmp_path: Path) -> None:
    # Given a shop whose one customer bought once, and one rating given in the period
    site = make_site(tmp_path / "site")
    engine = sa.create_engine(site.settings.database_url)
    _load(engine, ["C-1"], [_order("C-1", 0, FIRST_ORDER, 100_00)])
    opstore.record_feedback(Store(engine), "O-C-1-0", 4, NOW - timedelta(days=1))
    engine.dispose()

    # When the operator reads the stats and the insights
    stats_text = site.cli("stats", "--now", NOW.isoformat()).stdout
    insights_text = site.cli("insights").stdout

    # Then neither says "1 responses" or "1 customers have bought"
    assert "feedback: 1 response in the period, average 4.00\n" in stats_text, stats_text
    assert insights_text.startswith("1 customer has bought; 0 of them bought a second time.\n"), insights_text


def test_a_shop_with_no_purchases_is_not_read_as_0_of_0(tmp_path: Path) -> None:
    # Given a shop just set up: no orders, no messages
    site = make_site(tmp_path / "site")

    # When the operator reads the stats
    done = site.cli("stats", "--now", NOW.isoformat())
    assert done.returncode == 0, done.stderr

    # Then the repeat purchase rate and the churn say there is nobody to count, not "0 of 0 customers"
    assert "0 of 0" not in done.stdout, done.stdout
    assert "repeat purchase rate: n/a (no customer bought in the period)\n" in done.stdout
    assert "churn: n/a (no customer had bought before the period)\n" in done.stdout


def test_a_window_or_a_gap_of_one_day_is_said_in_the_singular(tmp_path: Path) -> None:
    # Given a shop with a one-day attribution window asked for, and customers who bought again an hour, or a day and
    # an hour, after their first purchase
    site = make_site(tmp_path / "site")
    same_day = _came_back(tmp_path / "same day", range(0, 1))
    next_day = _came_back(tmp_path / "next day", range(1, 2))

    # When the operator reads the stats and the insights
    stats_text = site.cli("stats", "--now", NOW.isoformat(), "--window-days", "1").stdout
    same_day_text = same_day.cli("insights").stdout
    next_day_text = next_day.cli("insights").stdout

    # Then none says "1 days"
    assert "; conversion = bought within 1 day of the email\n" in stats_text, stats_text
    assert "\nmedian: 0 days; 80% of second purchases happened within 1 day\n" in same_day_text, same_day_text
    assert "\nmedian: 1 day; 80% of second purchases happened within 2 days\n" in next_day_text, next_day_text

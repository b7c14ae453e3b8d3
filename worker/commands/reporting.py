"""`kembali stats` and `kembali insights`: print the reports of ``worker.stats``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, time, timedelta

from worker.adapters import db
from worker.commands import files
from worker.config import Settings
from worker.core import png
from worker.core import stats as core_stats
from worker.core.policy import zone_of
from worker.core.render import format_money
from worker.log import printable
from worker.stats import StatsReport, build_insights, build_stats

EXIT_OK, EXIT_USAGE = 0, 2
MIN_SECOND_ORDERS = 30


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _points(share: float) -> str:
    """A difference of shares in percentage points, signed: ``+8.0``; ``+0.0``, not ``-0.0``, when it rounds to zero."""
    return f"{round(100 * share, 1) + 0.0:+.1f}"


def _open(c: core_stats.Conversion) -> str:
    return f"; {c.pending:,} still inside the window" if c.pending else ""


def _not_yet(window_days: int, pending: int, who: str) -> str:
    """A group none of whose attribution windows has closed: not "0 of 0 ordered (n/a)", since nothing is known yet.
    ``who``: "emailed {}", "{} not held out"…"""
    if pending == 1:
        return f"not measured yet: the {window_days}-day window of the 1 {who.format('customer')} is still open"
    return (f"not measured yet: the {window_days}-day windows of the {pending:,} {who.format('customers')} are still "
            "open")


def _days(n: int | None) -> str:
    """``n`` days, one in the singular: "within 1 day", not "1 days"."""
    return f"{n} day" if n == 1 else f"{n} days"


def _money(minor: int, currency: str) -> str:
    return format_money(minor, currency, "en")


def stats_command(settings: Settings, args: argparse.Namespace) -> int:
    now: datetime = args.now or datetime.now(UTC)  # --now: in UTC (cli._datetime_arg)
    # the report's days are the shop's (shop.time_zone): "since 2026-12-01" in Jakarta starts at 00:00 there (17:00
    # UTC the day before), and the default period starts at the start of the day 90 days ago, the day its header names
    zone_name = settings.shop.time_zone
    zone = zone_of(zone_name, "UTC")
    local_now = now.astimezone(zone)
    first_day = args.since or (local_now - timedelta(days=90)).date()
    try:
        since = datetime.combine(first_day, time(), tzinfo=zone).astimezone(UTC)
    except OverflowError:  # 0001-01-01 east of UTC starts before the first moment a datetime holds: from that moment
        since = datetime.min.replace(tzinfo=UTC)
    if since > now:  # the period would end before it starts
        today = "the day of --now" if args.now else "today"
        print(f"kembali stats: --since {args.since} is after {today} ({local_now:%Y-%m-%d}, {zone_name}): give a day "
              f"{'before it' if args.now else 'in the past'}", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if since == now and args.now:  # --now at 00:00 of the --since day: a period of no time, whose last day is the
        # day before (stats_lines), not a report "from 2026-12-01 to 2026-12-01" of nothing, as if that day were empty
        print(f"kembali stats: --since {args.since} is after the last day of the report "
              f"({(local_now - timedelta(days=1)):%Y-%m-%d}, {zone_name}: --now at 00:00 there ends it with the day "
              "before): give a day before it", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if args.now and args.now > datetime.now(UTC):  # a year mistyped, or a demo's simulated clock
        print(f"kembali stats: note: --now {args.now.isoformat()} is after the current time: an attribution window "
              "still open now counts as closed, with the orders imported so far", file=sys.stderr)  # fmt: skip
    engine = db.command_engine(settings)
    try:
        db.check_schema(engine)
        report = build_stats(engine, since=since, now=now, window_days=args.window_days,
                             feedback_scale=settings.campaigns.feedback.scale,
                             currency=settings.shop.currency, time_zone=zone_name)  # fmt: skip
    finally:
        engine.dispose()
    # a campaign's name and a skip reason come from the ledger, which a hand edit or another program may have
    # written: a terminal escape in them is shown, not obeyed (as `kembali ledger list` shows them)
    if args.json:
        print(_printable_json(report.as_json()))
    else:
        for line in stats_lines(report):
            print(_printable_lines(line))
    return EXIT_OK


def _printable_lines(text: str) -> str:
    """``text``, whose line breaks are the report's own, with every other character that is not printable escaped
    (a C0 or C1 control, a bidi override, U+2028)."""
    return "\n".join(map(printable, text.split("\n")))


def _printable_json(value: object) -> str:
    """``value`` as indented JSON, escaped as ``_printable_lines`` escapes (``json.dumps`` leaves C1 controls, bidi
    overrides and U+2028 raw); its line breaks are the indent's, never a string's."""
    return _printable_lines(json.dumps(value, ensure_ascii=False, indent=2))


def stats_lines(report: StatsReport) -> list[str]:
    last = report.local(report.now)
    if last.time() == time() and report.now > report.since:  # it ends at 00:00: nothing of that day is in it
        last -= timedelta(days=1)
    out = [f"Kembali stats from {report.local(report.since).date()} to {last.date()} "
           f"({report.time_zone}); "
           f"conversion = bought within {_days(report.window_days)} of the email"]  # fmt: skip
    if not report.steps:
        out.append("\nno messages were planned in this period")
    for s in report.steps:
        j = s.as_json()
        out.append(f"\n{s.campaign} step {s.step}" + ("" if s.days is None else f" (day {s.days})"))
        out.append(f"  planned {s.planned:,}: sent {j['sent']:,}, failed {j['failed']:,} ({s.hard_bounces:,} hard "
                   f"bounce{'' if s.hard_bounces == 1 else 's'}), "
                   + (f"cancelled {s.cancelled:,}, " if s.cancelled else "")
                   + f"uncertain {j['uncertain']:,}, waiting {j['waiting']:,}")  # fmt: skip
        if s.skipped:
            out.append("  skipped: " + ", ".join(f"{r} {n:,}" for r, n in sorted(s.skipped.items())))
        if s.emailed is not None:
            e = s.emailed
            if e.customers == 0 and e.pending:
                out.append("  conversion: " + _not_yet(report.window_days, e.pending, "emailed {}"))
            elif e.customers == 0:
                out.append("  conversion: nobody was emailed")
            else:
                out.append(f"  conversion: {e.converted:,} of {e.customers:,} emailed customers ordered "
                           f"({_pct(e.rate)}), revenue {_money(e.revenue_minor, report.currency)}"
                           + _open(e))  # fmt: skip
        if s.held_out is not None:
            h = s.held_out
            if h.customers == 0 and h.pending:
                out.append("  holdout: " + _not_yet(report.window_days, h.pending, "held-out {}"))
            else:
                out.append(f"  holdout: {h.converted:,} of {h.customers:,} held-out customers ordered ({_pct(h.rate)})"
                           + _open(h))
            if s.treated is not None:
                t = s.treated
                if t.customers == 0 and t.pending:
                    out.append("  against: " + _not_yet(report.window_days, t.pending, "{} not held out"))
                elif t.customers == 0:  # no row of the step but held-out ones: not "0 of 0 … ordered (n/a)"
                    out.append("  against: nobody: every customer planned in this step was held out")
                else:
                    out.append(f"  against: {t.converted:,} of {t.customers:,} customers not held out ordered "
                               f"({_pct(t.rate)}), emailed or not, both counted from when the email was due"
                               + _open(t))  # fmt: skip
        if s.lift is not None:
            lift = s.lift
            if lift.difference is not None and lift.lower is not None and lift.upper is not None:
                out.append(f"  lift: {_points(lift.difference)} points, 95% CI {_points(lift.lower)} to "
                           f"{_points(lift.upper)} (Newcombe)")  # fmt: skip
            out.append(f"  verdict: {lift.verdict}")
    out.append("\ndeliverability (suppression list, added in the period): "
               + (", ".join(f"{r} {n:,}" for r, n in sorted(report.suppressions.items())) or "nothing added"))
    r = report.retention
    # nobody to count: said so, not "0 of 0 customers" (a shop just set up, or a period before its first order)
    out.append(f"repeat purchase rate: {_pct(r.repeat_rate)} " + (
        f"({r.repeat:,} of {r.active:,} customers who bought in the period have bought twice or more)" if r.active
        else "(no customer bought in the period)"))  # fmt: skip
    out.append(f"churn: {_pct(r.churn_rate)} " + (
        f"({r.churned:,} of {r.earlier:,} earlier customers did not buy in the period)" if r.earlier
        else "(no customer had bought before the period)"))  # fmt: skip
    fb = report.feedback
    if fb is None:
        out.append("feedback: not recorded yet")
    else:
        avg = "n/a" if fb.average is None else f"{fb.average:.2f}"
        nps = "" if fb.nps is None else f", NPS {fb.nps:+.0f}"
        other = ("" if not fb.other_scale else f" ({fb.other_scale:,} score{'' if fb.other_scale == 1 else 's'} out of "
                 "10, from requests sent before the scale changed, left out)")  # fmt: skip
        out.append(f"feedback: {fb.responses:,} response{'' if fb.responses == 1 else 's'} in the period, average "
                   f"{avg}{nps}{other}")
    return out


def insights_command(settings: Settings, args: argparse.Namespace) -> int:
    engine = db.command_engine(settings)
    try:
        db.check_schema(engine)
        found = build_insights(engine, share=args.share, bin_days=args.bin_days)
    finally:
        engine.dispose()
    if args.plot:
        files.write_whole(args.plot, png.bar_chart(found.histogram, found.recommended_quiet_days))  # or none
    if args.json:
        print(_printable_json(found.as_json()))
        return EXIT_OK
    n = len(found.gaps_days)
    if not found.customers:  # not "0 customers have bought; 0 of them…" over a shop of orders none of them paid yet
        print("no customer has bought yet (a purchase is an order paid, shipped or delivered)")
    else:
        who = "1 customer has" if found.customers == 1 else f"{found.customers:,} customers have"
        print(f"{who} bought; {n:,} of them bought a second time.")
    if not n:
        print("no second purchases yet: nothing to recommend")
        if args.plot:  # an empty chart, written all the same: said as the full report says it
            print(f"chart written to {args.plot}")
        return EXIT_OK
    print("\ndays from the first to the second purchase:")
    most = max(c for _, _, c in found.histogram)
    for start, end, count in found.histogram:
        print(f"  {start:>4}-{end:<4} {count:>6}  {core_stats.bar(count, most)}")
    median = core_stats.quantile_day(found.gaps_days, 0.5)
    print(f"\nmedian: {_days(median)}; {100 * found.share:g}% of second purchases happened within "
          f"{_days(found.recommended_quiet_days)}")  # fmt: skip
    purchases = f"{n:,} second purchase{'' if n == 1 else 's'}"
    caveat = "" if n >= MIN_SECOND_ORDERS else f" (only {purchases}: treat it as a rough guess)"
    winback = settings.campaigns.winback
    day = found.recommended_quiet_days
    if winback.steps:  # quiet_days applies only without steps: the first step's days decide the first email
        key, value, current = "campaigns.winback.steps[0].days", f"{day} (the first step)", winback.steps[0].days
        if len(winback.steps) > 1 and day is not None and day >= winback.steps[1].days:
            value += f"; the later steps' days must stay greater (steps[1] is {winback.steps[1].days})"
    else:
        key, value, current = "campaigns.winback.quiet_days", str(day), winback.quiet_days
    if winback.give_up_after_days and day is not None and day >= winback.give_up_after_days:
        # set alone, the config would not load: give_up_after_days must be more than the last step's days
        value += f"; campaigns.winback.give_up_after_days must stay greater (it is {winback.give_up_after_days})"
    print(f"recommended {key} = {value}, resting on {purchases}{caveat}")
    print(f"(currently {current}; customers who have not come back yet are not in this sample, so the true gaps run "
          "somewhat longer)")
    if found.after_winback:
        k = found.after_winback
        print(f"{'the one second purchase' if n == 1 else f'{k:,} of the {n:,} second purchases'} came after a "
              "win-back email, which may have brought "
              f"{'it' if k == 1 else 'them'} on: the days set now pull this figure towards themselves")
    if args.plot:
        print(f"chart written to {args.plot}")
    return EXIT_OK

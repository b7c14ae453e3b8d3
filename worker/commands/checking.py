"""`kembali check`: the config, then every template in every language against the sample customers.

The report (or, with --json, one object a line: each problem, each note, a summary) is the result: all of it goes
to stdout."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import threading
from collections.abc import Callable
from datetime import UTC, datetime, time
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from worker import eventloop, log
from worker.adapters import db, opstore
from worker.adapters.render_worker import TimeLimitedRenderer
from worker.adapters.store import Store
from worker.adapters.templates import StrayText
from worker.app import CLOSE_OFF, link_keys, smtp_password
from worker.checks import Kind, Problem, check_templates, unused_folders
from worker.config import Settings, ShopSettings, naming_the_line, tls_port_hint
from worker.core import campaigns as cc
from worker.core import samples
from worker.core.cron import never_runs
from worker.core.policy import QuietHours
from worker.domain import Locale
from worker.errors import ConfigError, SchemaError
from worker.log import json_line, printable
from worker.pipeline import enabled_campaigns
from worker.scheduler import first_long_wait

EXIT_OK, EXIT_PROBLEMS = 0, 1


def check_config(settings: Settings, environ: dict[str, str] | None = None) -> list[Problem]:
    """Settings that load fine but fail when used: secrets missing from the environment, an event loop that cannot
    be used, no templates folder."""
    problems: list[Problem] = []
    for probe in (link_keys, smtp_password):
        try:
            probe(settings, environ)
        except ConfigError as exc:
            problems.append(Problem(Kind.CONFIG, naming_the_line(str(exc), settings)))
    try:  # `run` and the daemon refuse a KEMBALI_EVENT_LOOP they cannot use
        eventloop.choice(environ)
    except ConfigError as exc:
        problems.append(Problem(Kind.CONFIG, str(exc)))
    if (hint := tls_port_hint(settings.smtp)) is not None:  # named as the others: the file, smtp.port's line
        named = f"{settings.source}: 'smtp.port' {hint.removeprefix('smtp.port ')}"
        problems.append(Problem(Kind.CONFIG, naming_the_line(named, settings)))
    folder = settings.resolve(settings.templates.dir)
    if not folder.is_dir():  # named as `run` names it: the file, the key's line
        missing = f"{settings.source}: 'templates.dir' {str(folder)!r} is not a folder"
        problems.append(Problem(Kind.CONFIG, naming_the_line(missing, settings)))
    return problems


RESERVED_TLDS = ("example", "test", "invalid", "localhost")
"""Top-level names reserved for examples and tests (RFC 2606, RFC 6761): no mail goes to or from them."""


def _reserved(host: str) -> bool:
    labels = host.lower().rstrip(".").split(".")
    return labels[-1] in RESERVED_TLDS or labels[-2:] in (["example", "com"], ["example", "net"], ["example", "org"])


def example_shop(settings: Settings) -> list[str]:
    """The keys that still hold the example shop's values (the shipped config.toml's, or the defaults of a config that
    leaves [shop] out), each with its value: a reserved domain, the placeholder postal address. Sending with them
    works against a local sink, so they are no problem for the demo, but real mail would claim a shop that is not
    yours, from a domain no provider delivers for."""
    shop, unsubscribe = settings.shop, settings.unsubscribe
    found = [(key, value) for key, value, host in (
        ("shop.domain", shop.domain, shop.domain),
        ("shop.from_address", shop.from_address, shop.from_address.rpartition("@")[2]),
        ("shop.base_url", shop.base_url, urlsplit(shop.base_url).hostname or ""),
        ("unsubscribe.url", unsubscribe.url, urlsplit(unsubscribe.url).hostname or ""),
        ("unsubscribe.mailto", unsubscribe.mailto, unsubscribe.mailto.rpartition("@")[2]),
        ("campaigns.feedback.link_url", settings.campaigns.feedback.link_url,
         urlsplit(settings.campaigns.feedback.link_url).hostname or ""),
    ) if host and _reserved(host)]  # fmt: skip
    if shop.postal_address == ShopSettings.postal_address:
        found.append(("shop.postal_address", f"{shop.postal_address} (the placeholder)"))
    return [f"{key} {value!r}" for key, value in found]


def birthday_planning_gap(settings: Settings, now: datetime) -> str | None:
    """With birthdays on, what the daemon's birthday schedule leaves too long between two passes: a pass plans an
    offer from ``cc.BIRTHDAY_LEAD`` before its window opens, so a longer wait plans some offers late in their
    window (the customer's evening, quiet hours until they expire) or, when no pass falls in the window, never."""
    if not settings.campaigns.birthday.enabled:
        return None
    expr = settings.schedule.cron_of(cc.BIRTHDAY)
    if never_runs(expr):
        return None  # never_planned says so
    gap = first_long_wait(expr, settings.shop.time_zone, now, cc.BIRTHDAY_LEAD)
    if gap is None:
        return None
    key = settings.schedule.cron_key(cc.BIRTHDAY)
    zone = ZoneInfo(settings.shop.time_zone)
    start, end = gap
    if end is None:
        wait = f"no planning pass after {start.astimezone(zone):%Y-%m-%d %H:%M} ({settings.shop.time_zone})"
    else:
        hours = (end - start).total_seconds() / 3600
        wait = (f"{hours:.0f} hours between planning passes ({start.astimezone(zone):%Y-%m-%d %H:%M} to "
                f"{end.astimezone(zone):%Y-%m-%d %H:%M}, {settings.shop.time_zone})")
    lead = cc.BIRTHDAY_LEAD.total_seconds() / 3600
    return (f"{key} {expr!r} leaves {wait}: a pass plans a birthday offer from {lead:.0f} hours before its window "
            "opens, so over a longer wait some offers are planned late in their window, or never (then nothing waits "
            "for them); plan birthday at least daily")


def quiet_by_day(settings: Settings) -> str | None:
    """A note when quiet hours are the day (half of it or more, midday in it: ``08:00``-``21:00``), likely written as
    the hours to send in: every email would wait for the customer's night."""
    start, end = settings.policy.quiet_hours_start, settings.policy.quiet_hours_end
    quiet = QuietHours(time.fromisoformat(start), time.fromisoformat(end))
    minutes = (_minutes(end) - _minutes(start)) % (24 * 60)
    if start == end or minutes < 12 * 60 or not quiet.contains(time(12, 0)):
        return None
    return (f"policy.quiet_hours_start {start!r} and quiet_hours_end {end!r} hold every email from {start} until {end} "
            f"on the customer's clock: emails go out only from {end} to {start}, at night (quiet hours are when "
            f"nothing is sent; for the night, start {end!r} and end {start!r})")


def no_frequency_cap(settings: Settings) -> str | None:
    """A note when ``policy.frequency_caps`` is empty: valid (a test shop may mean it), but the contact policy then
    never holds an email back for the ones sent before."""
    if settings.policy.frequency_caps:
        return None
    return ("policy.frequency_caps is [] (no cap): a customer due several campaigns gets each one as soon as it is "
            "due, several the same day (the shipped caps, [[1, 3], [4, 30]]: at most 1 email per 3 days and 4 per "
            "30 days)")


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def never_planned(settings: Settings) -> list[str]:
    """The enabled campaigns whose planning cron never fires (``0 0 31 2 *``), each as a note naming the key."""
    notes = []
    for campaign in enabled_campaigns(settings):
        expr = settings.schedule.cron_of(campaign)
        if why := never_runs(expr):
            notes.append(f"{settings.schedule.cron_key(campaign)} {expr!r} never runs ({why}): {campaign} is enabled "
                         "but never planned")
    return notes


@dataclasses.dataclass(frozen=True)
class Note:
    """A ``note:`` line of the report: no problem (the exit code stays as it is), but something to know."""

    kind: str
    """``example_shop``, ``never_planned``, ``quiet_by_day``, ``no_frequency_cap``, ``birthday_planning_gap``,
    ``unused_folder``, ``stray_text``, ``campaign_off_waiting``, ``unknown_campaign_waiting``,
    ``ledger_not_read``."""
    message: str
    """The line's text after ``note: ``."""
    template: str = ""
    """The template folder or file it is about (``unused_folder``, ``stray_text``)."""
    line: int | None = None
    campaign: str = ""
    """The campaign whose waiting rows it counts (``campaign_off_waiting``, ``unknown_campaign_waiting``)."""
    count: int | None = None
    """How many rows (the same notes)."""

    def as_json(self) -> dict[str, object]:
        found: dict[str, object] = {"type": "note", "kind": self.kind, "message": self.message,
                                    "template": self.template, "line": self.line}  # fmt: skip
        if self.count is not None:
            found |= {"campaign": self.campaign, "count": self.count}
        return found


def waiting_notes(settings: Settings, config: str | os.PathLike[str] | None = None) -> list[Note]:
    """The ledger's waiting rows (``planned``, ``retry``) no worker with this config will send, by campaign: those of a
    campaign it turns off (they wait until it is on again, or expire) and those of a campaign Kembali does not know
    (a row edited by hand: a worker's start fails them), each with the command that closes them. One count of the
    waiting rows; nothing is written (an SQLite file that does not exist is not created: nothing waits in it). A
    ledger that cannot be read is a note too: the config may be checked away from its database; one at an older
    schema names the upgrade with ``config``, the ``--config`` the command was given, as the other commands do."""
    engine = db.command_engine(settings)
    try:
        path = db.sqlite_path(engine)
        if path is not None and not path.exists():
            return []
        try:
            db.check_schema(engine)
            waiting = opstore.waiting_by_campaign(Store(engine))
        except Exception as exc:  # unreachable, not migrated: what the config says is checked all the same
            said = f"SchemaError: {exc.telling(config)}" if isinstance(exc, SchemaError) else log.error_line(exc)
            return [Note("ledger_not_read", f"the ledger was not read, so rows waiting for a campaign this config "
                                            f"does not send are not counted: {said}")]  # fmt: skip
    finally:
        engine.dispose()
    on = set(enabled_campaigns(settings))
    found = []
    for campaign, n in sorted(waiting.items()):
        close = CLOSE_OFF.format(campaign=shlex.quote(campaign))
        if campaign in on:
            continue
        if campaign in cc.CAMPAIGNS:
            found.append(Note("campaign_off_waiting", (
                f"{n} {campaign} message{'s' if n != 1 else ''} wait in the ledger (planned or retry) and will not "
                f"be sent while {campaign} is turned off (campaigns.{campaign}.enabled = false): they wait until it "
                f"is on again, or are skipped as expired; to cancel them: {close}"), campaign=campaign, count=n))
        else:
            found.append(Note("unknown_campaign_waiting", (
                f"{n} message{'s' if n != 1 else ''} of campaign {printable(campaign)!r} wait in the ledger (planned "
                f"or retry): no campaign Kembali knows by that name (edited by hand?), never sent; a worker's start "
                f"fails them (unknown_campaign_failed); to close them now: {close}"),
                campaign=campaign, count=n))  # fmt: skip
    return found


def notes(settings: Settings, unused: list[str], stray: list[StrayText]) -> list[Note]:
    """The report's notes, in its order: the text report and --json say the same ones."""
    found: list[Note] = []
    if example := example_shop(settings):
        found.append(Note("example_shop", "still the example shop's (fine for the demo; set your own before sending "
                                          f"real mail): {', '.join(example)}"))  # fmt: skip
    found += [Note("never_planned", note) for note in never_planned(settings)]
    if by_day := quiet_by_day(settings):
        found.append(Note("quiet_by_day", by_day))
    if uncapped := no_frequency_cap(settings):
        found.append(Note("no_frequency_cap", uncapped))
    if gap := birthday_planning_gap(settings, datetime.now(UTC)):
        found.append(Note("birthday_planning_gap", gap))
    found += [Note("unused_folder", f"{name}/ is no campaign's folder, not checked and never sent (a campaign sends "
                                    "from the folder named for it; win-back's steps, from the folders "
                                    "[[campaigns.winback.steps]] names)", template=name) for name in unused]
    found += [Note("stray_text", f"{text.template}:{text.line}: text outside any {{% block %}} ({text.excerpt!r}) "
                   + ("comes before the layout's first line" if text.before_layout else
                      "is never sent: a template that extends a layout sends only its blocks"),
                   template=text.template, line=text.line) for text in stray]  # fmt: skip
    return found


class _InThread:
    """``work`` run in a daemon thread: ``result`` waits for it (a signal interrupts the wait) and returns what it
    returned, or raises what it raised."""

    def __init__(self, work: Callable[[], list[Note]]) -> None:
        self._work = work
        self._value: list[list[Note]] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="check-ledger", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value.append(self._work())
        except BaseException as exc:  # handed to the caller of result
            self._error.append(exc)

    def result(self) -> list[Note]:
        self._thread.join()
        if self._error:
            raise self._error[0]
        return self._value[0]


def check(settings: Settings, args: argparse.Namespace) -> int:
    problems = check_config(settings)
    folder = settings.resolve(settings.templates.dir)
    renders = 0
    unused: list[str] = []
    stray: list[StrayText] = []
    present = folder.is_dir()  # check_config reports it when not
    # the ledger read while the templates render: a database host that does not answer costs its connect timeout
    # once, beside the renders (2-5 s), not after them. In a daemon thread, joined where Ctrl-C reaches it: a
    # pool's thread is waited for on the way out, for as long as the host's connect_timeout (the URL's may be long)
    waiting = _InThread(lambda: waiting_notes(settings, args.config if args.config_given else None))
    if present:
        with TimeLimitedRenderer(folder, timeout_seconds=settings.checks.render_timeout_seconds) as renderer:
            problems += check_templates(settings, renderer)
            unused = unused_folders(settings, renderer)
            stray = renderer.stray_text(unused)
            campaigns = sorted(set(renderer.campaigns()) - set(unused))
            renders = len(campaigns) * len(Locale) * len(samples.samples(Locale.ID))
    said = notes(settings, unused, stray) + waiting.result()
    if args.json:
        for p in problems:
            print(json_line({"type": "problem", **p.as_json()}))
        for note in said:
            print(json_line(note.as_json()))
        print(json_line({"type": "summary", "config": str(settings.source), "templates": str(folder),
                         "templates_checked": present, "renders": renders, "problems": len(problems),
                         "notes": len(said)}))  # fmt: skip
        return EXIT_PROBLEMS if problems else EXIT_OK
    print(f"config: {settings.source}")
    if present:
        print(f"templates: {folder} (about {renders} sample renders: every campaign x language x sample customer)")
    else:
        print(f"templates: {folder} (not checked: no such folder)")
    for note in said:
        print(f"note: {note.message}")
    if not problems:
        print("no problems found")
        return EXIT_OK
    report = _one_line_per_mistake(problems)
    for line in report:
        print(line)
    print(f"\n{len(report)} problem{'s' if len(report) != 1 else ''} found")
    return EXIT_PROBLEMS


def _one_line_per_mistake(problems: list[Problem]) -> list[str]:
    """The text report: a problem a shared file (the layout, a partial) gives every campaign folder and language
    that uses it is one line naming them, not a line each (``--json`` keeps one object each)."""
    groups: dict[tuple[object, ...], list[Problem]] = {}
    for p in problems:
        groups.setdefault((p.kind, p.where, p.message), []).append(p)
    lines = []
    for same in groups.values():
        first = same[0]
        if len(same) > 1:
            scopes = [s for p in same if (s := "/".join(x for x in (p.campaign, p.locale) if x))]
            shown = ", ".join(scopes[:4]) + (f" +{len(scopes) - 4}" if len(scopes) > 4 else "")
            seen = [s for p in same for s in p.samples]
            first = dataclasses.replace(first, campaign=shown, locale="", samples=tuple(dict.fromkeys(seen)))
        lines.append(f"{first.kind.value}: {first}")
    return lines

"""`kembali run`: one cycle (maintenance, plan, dispatch) with --once, else the daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from worker import checks, eventloop, log
from worker.adapters import opstore
from worker.adapters.templates import PARTS
from worker.app import (
    CLOSE_OFF,
    Deps,
    NotSent,
    campaigns_not_sent,
    link_keys,
    release_lapsed_leases,
    smtp_password,
    worker_id,
)
from worker.asyncstore import AsyncStore
from worker.commands.progress import SendProgress
from worker.config import Settings
from worker.core.policy import zone_of
from worker.domain import Locale
from worker.errors import ConfigError, TemplateError
from worker.pipeline import PlanReport, enabled_campaigns, held_priorities, plan
from worker.planning import priorities
from worker.sending import DispatchReport, SendObserver
from worker.stopping import STOP_SIGNALS, StartupSignals, StopSignals

EXIT_OK, EXIT_ATTENTION, EXIT_UNAVAILABLE = 0, 1, 3

CAMPAIGN_LABELS = {"winback": "win-back", "new_products": "new-product", "feedback": "feedback-request"}


@dataclass
class CycleReport:
    planned: PlanReport
    dispatched: DispatchReport
    requeued: int = 0
    uncertain: int = 0
    stopped_by: str | None = None
    """The signal that stopped the run early (``run --once``), if one did."""
    not_sent: NotSent = field(default_factory=NotSent)
    """Rows of an unknown campaign failed at the start, and the rows campaigns turned off leave waiting."""
    expired: int = 0
    """Waiting rows skipped as ``expired`` at the start (a campaign turned off leaves its rows to no claim)."""
    holdout: dict[str, float] = field(default_factory=dict)
    """Each planned campaign's holdout share: that part of what it planned gets no email."""


async def cycle(
    deps: Deps,
    *,
    async_store: AsyncStore | None = None,
    stop: asyncio.Event | None = None,
    observer: SendObserver | None = None,
) -> CycleReport:
    """Release lapsed leases, plan every enabled campaign, send everything due.

    ``stop`` set (a signal, see ``once``) ends the run early: the sends under way finish and are recorded, what
    was claimed and not begun goes back to the queue; set while planning, nothing is sent. ``observer`` is told
    about each message finished (the demo's progress line)."""
    own_store = async_store is None
    astore = async_store or AsyncStore(deps.store)
    try:
        # a clock too far off the database's would take live workers' leases and miss their sends: nothing at all
        guard = deps.clock_guard(astore)
        if guard is not None and (problem := await guard.check()):
            return CycleReport(PlanReport(), DispatchReport(paused=problem, clock_off=problem))
        now = deps.clock.now()
        requeued, uncertain = await release_lapsed_leases(deps.store, astore, now)
        # what no claim takes or judges right: a campaign's unknown or turned off (whose rows' expiry the daemon's
        # maintenance judges: here, once their times are read right), a time written by hand
        not_sent = await campaigns_not_sent(deps.store, astore, deps.settings, now, expire_off=True)
        expired = not_sent.expired
        planned = await astore.call(plan, deps.store, deps.settings, now)
        holdout = {c: getattr(deps.settings.campaigns, c).holdout_share for c in planned.created}
        for campaign, created in planned.created.items():
            await astore.call(opstore.record_run, deps.store, f"plan:{campaign}", at=now, worker=worker_id())
            log.event("campaign_planned", campaign=campaign, created=created, considered=planned.considered[campaign])
        if stop is not None and stop.is_set():
            return CycleReport(planned, DispatchReport(), requeued, uncertain, holdout=holdout, not_sent=not_sent,
                               expired=expired)
        dispatched = await dispatch(deps, astore, stop=stop, observer=observer)
        return CycleReport(planned, dispatched, requeued, uncertain, holdout=holdout, not_sent=not_sent,
                           expired=expired)
    finally:
        if own_store:
            astore.close()


async def dispatch(
    deps: Deps, astore: AsyncStore, *, stop: asyncio.Event | None = None, observer: SendObserver | None = None
) -> DispatchReport:
    """Send everything due, planning nothing: ``cycle``'s sending half, as the daemon sends between its planning
    passes (``Dispatcher.run_once`` over a transport of the run's own)."""
    transport = deps.transport()
    try:
        dispatcher = deps.dispatcher(astore, transport)
        dispatcher.observer = observer
        stopper = None if stop is None else asyncio.create_task(stop.wait())
        if stopper is not None:
            stopper.add_done_callback(lambda t: None if t.cancelled() else dispatcher.stop())
        try:
            dispatched = await dispatcher.run_once()
        finally:
            if stopper is not None:
                stopper.cancel()
            dispatcher.close()
    finally:
        await transport.close()
    if dispatched.unreachable:  # too few failures to pause: said all the same, for cron and log collectors
        log.event("smtp_unreachable", logging.ERROR, reason=dispatched.unreachable)
    return dispatched


def summary(
    report: CycleReport, waiting: opstore.Waiting | None = None, time_zone: str = "UTC", templates: Path | None = None
) -> list[str]:
    """The run's lines for its operator; with ``waiting`` (``opstore.waiting`` after the run), what it left in the
    queue and when the first of it falls due, on the clock of ``time_zone`` (the shop's). ``templates``: the folder
    the render errors' files are named in (else by their names under it)."""
    lines = []
    for campaign, created in report.planned.created.items():
        share = report.holdout.get(campaign, 0.0)
        held = f" ({share:.0%} of the audience held out: no email, to measure the lift)" if created and share else ""
        noun = "email" if created == 1 else "emails"
        lines.append(f"planned {created:,} new {CAMPAIGN_LABELS.get(campaign, campaign)} {noun}{held}")
    by_campaign: dict[str, Counter[str]] = {}
    for (campaign, what), n in report.dispatched.by_campaign.items():
        by_campaign.setdefault(campaign, Counter())[what] += n
    for campaign, counts in sorted(by_campaign.items()):
        label = CAMPAIGN_LABELS.get(campaign, campaign)
        sent = counts.pop("sent", 0)
        parts = [f"sent {sent:,} {label} {'email' if sent == 1 else 'emails'}"]
        parts += [f"{n:,} {what}" for what, n in sorted(counts.items())]
        lines.append(", ".join(parts))
    if not by_campaign and not report.dispatched.clock_off and not report.dispatched.quota_reached:
        lines.append("nothing was due to send")  # (clock off, quota spent: nothing was even looked at; they say why)
    waits = report.dispatched.rate_waits
    if waits:
        waited = sum(waits.values())
        domains = ", ".join(f"{domain} {n:,}" for domain, n in waits.most_common(5))
        its = "message waited in the queue for a slot of its" if waited == 1 else (
            "messages waited in the queue for a slot of their")
        lines.append(f"{waited:,} {its} recipient domain's rate ({domains}{', …' if len(waits) > 5 else ''}): "
                     "sending.domains and a throttling reply set how fast a domain is sent to")
    if report.dispatched.relay_slowed:
        lines.append(f"{log.printable(report.dispatched.relay_slowed)}; the throttled messages wait in the queue, "
                     "their attempts not counted")
    lines += _render_error_lines(report.dispatched, templates)
    content = sum(n for what, n in report.dispatched.outcomes.items() if what == "failed:content_rejected")
    if content:
        were = "message was refused for its" if content == 1 else "messages were refused for their"
        lines.append(f"{content} {were} content (5.7.x): check the templates, not the customers")
    retried = report.dispatched.outcomes.get("retry:sender_refused", 0)
    failed = report.dispatched.outcomes.get("failed:sender_refused", 0)
    if retried or failed:
        fates = [f"{retried} will be tried again in an hour or more"] if retried else []
        fates += [f"{failed} used {'its' if failed == 1 else 'their'} last attempt and failed"] if failed else []
        were = "message was refused for who sent it, not what it says" if retried + failed == 1 else (
            "messages were refused for who sent them, not what they say")
        lines.append(f"{retried + failed} {were} (SPF, DKIM, DMARC, a block list, the sending IP's standing): fix the "
                     f"sending setup; {' and '.join(fates)}")
    if report.dispatched.quota_reached:
        lines.append("the daily quota is used up: the rest waits for the next day's, from midnight on the shop's clock")
    if report.dispatched.clock_off:
        lines.append(f"NOT SENT: {report.dispatched.clock_off}")
    elif report.dispatched.paused:
        # the reason quotes the server's reply: its control characters escaped, as the logs show them
        lines.append(f"PAUSED: sending stopped after {log.printable(report.dispatched.paused)}; check the SMTP server")
    if report.dispatched.unreachable:
        lines.append(f"NOT SENT: {log.printable(report.dispatched.unreachable)}: the messages wait in the queue for "
                     "the next run; check the SMTP server, and smtp.host, smtp.port and smtp.tls")
    if report.uncertain:
        lines.append(f"{report.uncertain} {'message' if report.uncertain == 1 else 'messages'} became uncertain (a "
                     "worker died while sending): see `kembali ledger`")
    if failed_rows := report.not_sent.failed:
        names = ", ".join(repr(c) for c in sorted({r.campaign for r in failed_rows}))
        lines.append(f"{len(failed_rows)} {'message' if len(failed_rows) == 1 else 'messages'} of a campaign Kembali "
                     f"does not know ({names}; edited by hand?) failed, not sent: see `kembali ledger list`")
    if report.expired:
        lines.append(f"{report.expired} {'message' if report.expired == 1 else 'messages'} of campaigns turned off "
                     "expired, not sent (skipped: expired; `kembali ledger list --status skipped`)")
    for campaign, n in report.not_sent.off.items():
        label = CAMPAIGN_LABELS.get(campaign, campaign)
        lines.append(f"{n} {label} {'message waits' if n == 1 else 'messages wait'}, not sent: the campaign is turned "
                     f"off (enabled = false); turn it on again, or cancel them: {CLOSE_OFF.format(campaign=campaign)}")
    dropped = report.dispatched.outcomes.get("uncertain", 0)
    if dropped:
        one = dropped == 1
        lines.append(f"{dropped} {'message is' if one else 'messages are'} uncertain (the connection died after "
                     f"{'it was' if one else 'they were'} handed over: {'it' if one else 'they'} may have arrived) "
                     f"and {'is' if one else 'are'} never resent by {'itself' if one else 'themselves'}: decide with "
                     "`kembali ledger list`")
    if waiting is not None and waiting.messages:
        lines.append(_waiting_line(waiting, time_zone))
    if waiting is not None and waiting.held:
        lines.append(_held_line(waiting.held, time_zone))
    if report.stopped_by:
        lines.append(f"stopped early by {report.stopped_by}: the sends under way finished, the rest waits in "
                     "the queue for the next run")
    return lines


RENDER_ERRORS_SHOWN = 3
"""The commonest render errors the summary names, one line each; one more line counts the others."""


def _render_error_lines(dispatched: DispatchReport, templates: Path | None) -> list[str]:
    """``3 messages failed to render: templates/email/winback/id/body.html line 12: UndefinedError: 'coupon' is
    undefined (see …)``: the commonest errors, each with its file, line and count, and a line counting the rest (the
    log names each message's)."""
    lines = []
    errors = dispatched.render_errors.most_common()
    for (template, line, error), n in errors[:RENDER_ERRORS_SHOWN]:
        where = str(templates / template if templates is not None and template else template)
        where += f" line {line}" if where and line else ""
        what = log.printable(log.mask_addresses(error))
        lines.append(f"{n} {'message' if n == 1 else 'messages'} failed to render: {where + ': ' if where else ''}"
                     f"{what} (see `kembali ledger list --status failed`)")
    more = sum(n for _, n in errors[RENDER_ERRORS_SHOWN:]) + dispatched.render_errors_other
    if more:
        others = len(errors[RENDER_ERRORS_SHOWN:])
        count = f"more than {others}" if dispatched.render_errors_other else str(others)
        lines.append(f"and {more} more {'message' if more == 1 else 'messages'} failed to render, with {count} other "
                     f"{'error' if others == 1 and not dispatched.render_errors_other else 'errors'} (the log names "
                     "each)")
    return lines


def _waiting_line(waiting: opstore.Waiting, time_zone: str) -> str:
    """``planned 2 new birthday emails`` and ``sent 1 birthday email`` leave the other one to be found: planned ahead
    of its day, held back by the frequency cap or quiet hours, it waits; this line says how many and until when."""
    noun = "message waits" if waiting.messages == 1 else "messages wait"
    first = None if waiting.first is None else waiting.first.astimezone(zone_of(time_zone, "UTC"))
    at = "" if first is None else f"{first:%Y-%m-%d %H:%M %Z}"
    if not waiting.due:
        when = f"the first falls due {at}"
    elif first is None:
        when = "due already"  # the run stopped early, paused, or used up the day's quota: its line says which
    else:
        when = f"{waiting.due:,} due already; the first of the others falls due {at}"
    return f"{waiting.messages:,} {noun} in the queue for a later run ({when})"


def _held_line(held: tuple[tuple[str, int, datetime], ...], time_zone: str) -> str:
    """What other workers hold when the run ends: under way there, or a dead worker's until its lease ends (the run
    said nothing of them, and a cron's operator after a crash could not tell they were not lost)."""
    zone = zone_of(time_zone, "UTC")
    total = sum(n for _, n, _ in held)
    noun = "message is" if total == 1 else "messages are"
    if len(held) == 1:
        [(worker, _, until)] = held
        return (f"{total} {noun} held by another worker, {log.printable(worker)}, until "
                f"{until.astimezone(zone):%Y-%m-%d %H:%M %Z}: under way there or, should it have stopped, taken by a "
                "run after then")
    each = "; ".join(f"{log.printable(worker)} {n} until {until.astimezone(zone):%Y-%m-%d %H:%M %Z}"
                     for worker, n, until in held)
    return (f"{total} {noun} held by other workers ({each}): under way there or, should one have stopped, taken by "
            "a run after its lease ends")


def stopped_code(report: CycleReport) -> int | None:
    """128 + the signal that stopped the run early, as a shell reports a process a signal ended; None if none did."""
    return 128 + signal.Signals[report.stopped_by].value if report.stopped_by else None


def exit_code(report: CycleReport) -> int:
    if (code := stopped_code(report)) is not None:
        return code
    if report.dispatched.paused or report.dispatched.unreachable:
        return EXIT_UNAVAILABLE
    bad = sum(n for what, n in report.dispatched.outcomes.items() if what.startswith("failed") or what == "uncertain")
    return EXIT_ATTENTION if bad or report.uncertain else EXIT_OK


async def stoppable(deps: Deps, *, observer: SendObserver | None = None) -> CycleReport:
    """``cycle``, stopped gracefully by the first SIGINT or SIGTERM (Ctrl-C, cron's ``timeout``), at once by a
    second: as the daemon stops (``run --once``, the demo). ``report.stopped_by`` names the signal."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = StopSignals()

    def on_signal(sig: signal.Signals) -> None:
        verdict = signals.take(sig)
        if verdict == "echo":
            return
        if verdict == "force":
            log.event("stop_forced", logging.WARNING, signal=sig.name,
                      note="rows in flight become uncertain when their lease lapses")  # fmt: skip
            logging.shutdown()
            deps.remove_snapshot()  # (the one thing that would outlive the process)
            os._exit(128 + sig.value)
        # a warning, shown however quiet the log (the demo's, --log-level warning): whoever pressed Ctrl-C waits for
        # the sends under way, as long as a slow server holds them, and was told nothing meanwhile, so took the run
        # for hung and pressed it again, leaving those messages uncertain
        log.event("stop_requested", logging.WARNING, signal=sig.name,
                  note="sends under way finish; the rest goes back to the queue; a second signal stops at once, "
                  "leaving the sends under way uncertain")  # fmt: skip
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        report = await cycle(deps, stop=stop, observer=observer)
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)  # (it leaves SIGTERM's default action: killed without a word)
            if (handler := previous[sig]) is not None:  # (None: one set outside Python, which cannot be put back)
                signal.signal(sig, handler)
    if signals.first is not None:
        report.stopped_by = signals.first.name
    return report


def once(settings: Settings) -> int:
    # the secrets sending needs, before anything is planned: a missing one stops the run with nothing done
    link_keys(settings)
    smtp_password(settings)
    # the run renders a copy of the templates taken now, the set checked below: one saved while it runs (a
    # mistake halfway through an edit) changes nothing before the next run, as the daemon's copy before a reload
    deps = Deps.build(settings, private_templates=True)
    # with the log at info, its line per email shows the run going on; quieter, a progress line does (on a terminal)
    sending = None if log.LOGGER.isEnabledFor(logging.INFO) else SendProgress(due_now(deps))
    try:
        check_template_folders(deps)
        report = eventloop.run(stoppable(deps, observer=sending))
        left = opstore.waiting(deps.store, deps.clock.now())
    finally:
        if sending is not None:
            sending.progress.done()
        deps.close()
    for line in summary(report, left, settings.shop.time_zone, settings.resolve(settings.templates.dir)):
        print(line)
    return exit_code(report)


def due_now(deps: Deps) -> Callable[[], int]:
    """The rows due by now, claimed or being sent ones included (``SendProgress``'s total: what was done and this), of
    the campaigns turned on (the run sends none of the others'), told by their priority where it is theirs alone."""
    settings = deps.settings
    on, held = enabled_campaigns(settings), held_priorities(settings)
    shared = any(p not in held for name, p in priorities(settings).items() if name not in on)
    campaigns = on if shared else None
    return lambda: opstore.still_to_send(deps.store, deps.clock.now(), held=held, campaigns=campaigns)


def check_template_folders(deps: Deps) -> None:
    """Every template folder sending will use has its files in every language, or the run stops here with nothing
    done. A folder with none at all is the config's mistake (templates.dir one level off, a step's template
    misspelt), one without a language's files (English deleted from an Indonesian-only shop) the templates', not
    one customer's: rendering would fail every due message of it (of that language), each left ``failed`` for the
    operator to resend. So would a file those folders use that cannot be parsed (a syntax error, an include whose
    file is not there, a file not saved as UTF-8): the run stops too, naming its file and line. The daemon refuses
    to start on these as on any template problem; ``kembali check`` lists them all."""
    settings = deps.settings
    root = settings.resolve(settings.templates.dir).resolve()  # named, not the private copy ``deps`` may render
    folders = checks.required_folders(settings)
    for folder in folders:
        if deps.templates.locales(folder):
            continue
        key = checks.folder_setting(settings, folder)  # (the message gets that key's line of the file)
        meant = checks.folder_meant(settings, folder) if key == "templates.dir" else ""
        meant = f";{meant}" if meant else ""  # (the folder next to it that holds the campaigns')
        raise ConfigError(f"{settings.source}: '{key}': there are no templates for {folder!r} in "
                          f"{root} (no {folder}/id/subject.txt or {folder}/en/subject.txt{meant}); "
                          "nothing was planned or sent (`kembali check` lists what it finds)")
    missing = [name for folder in folders for name in deps.templates.missing_parts(folder)]
    if missing:  # a language's: every customer in it would get a failed message, every run
        raise ConfigError(f"{settings.source}: 'templates.dir': {', '.join(missing)} missing in "
                          f"{root} (each language needs {', '.join(PARTS)}: a customer in one "
                          "without them would get a failed message); nothing was planned or sent "
                          "(`kembali check` lists what it finds)")
    broken: list[str] = []  # a file that cannot be parsed (a syntax error, an include not found, not UTF-8)
    for folder in folders:
        for locale in Locale:
            try:
                deps.templates.template_version(folder, locale)  # parses every file the folder's parts use
            except TemplateError as exc:
                if str(exc) not in broken:  # a partial's, once for every folder that includes it
                    broken.append(str(exc))
    if broken:  # every due message of that folder and language would fail, each left failed, every run
        raise ConfigError(f"{settings.source}: 'templates.dir': {'; '.join(broken)} (in {root}); "
                          "nothing was planned or sent (`kembali check` lists what it finds)")


def forever(settings: Settings, *, config_path: Path, starting: StartupSignals | None = None) -> int:
    """The daemon (see ``worker.daemon``)."""
    from worker import daemon

    return daemon.run(settings, config_path=config_path, starting=starting)

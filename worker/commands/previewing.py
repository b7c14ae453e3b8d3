"""`kembali preview`: the real planning, re-check and rendering, with no sends and no writes.

The table lists what would go out (customer, campaign/step, when in the
customer's local time, subject); the summary counts everyone considered by what
would happen to them; render errors are grouped by template file and line and
make the exit code 1. ``--out DIR`` writes each message as the exact ``.eml``
bytes the sender would hand to SMTP, and its HTML part as ``.html``: each file
whole or not at all (written beside under a temporary name, then renamed), so a
preview stopped part-way (a full disk, Ctrl-C, a kill) leaves no file cut short;
a file that cannot be written stops the preview with exit code 2, naming it. The
files an earlier preview wrote there are removed first (others are left), so the
folder holds this preview's messages only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import secrets
import stat
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

from worker import contexts, money, stopping
from worker.adapters import plan_sql
from worker.app import Deps, link_key_missing, link_keys
from worker.commands import arguments, files
from worker.commands.progress import Progress
from worker.commands.running import check_template_folders
from worker.config import NAME_NOT_SHOWN, Settings, naming_the_line, shown_env_name
from worker.core.audiences import WINBACK, key_part_value
from worker.core.campaigns import CAMPAIGNS, LOYALTY, milestone_of, winback_renumbered
from worker.core.limits import quota_day, quota_day_start
from worker.core.policy import zone_of
from worker.core.render import sanitize_header_text
from worker.domain import ClaimedMessage
from worker.errors import ConfigError
from worker.limiter import QUOTA_KEY
from worker.log import json_line, printable
from worker.pipeline import DAILY_QUOTA, PLANNED_AHEAD, Composed, Deferred, RenderFailed, Skipped, enabled_campaigns
from worker.pipeline import preview as run_preview

EXIT_OK, EXIT_RENDER_ERRORS, EXIT_USAGE = 0, 1, 2
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class OutWriteError(Exception):
    """A file of ``--out`` could not be written (a full disk, a file size limit…)."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")


def write_whole(path: Path, data: bytes) -> None:
    """``files.write_whole``: a preview stopped part-way (Ctrl-C, SIGTERM, a full disk) leaves no message cut short;
    killed (SIGKILL), at most the hidden ``.partial`` file, removed by the next preview into that folder
    (``_clear_earlier``)."""
    try:
        files.write_whole(path, data)
    except OSError as exc:
        raise OutWriteError(path, exc) from None


_WRITTEN = re.compile(rf"\.?[0-9]{{4,}}-(?:{'|'.join(CAMPAIGNS)})_[A-Za-z0-9._-]*\.(?:eml|html)(?:\.partial)?")
"""The names of the files a preview writes into ``--out`` (``file_stem``: a number, then the dedupe key, which starts
with its campaign), whole or ``.partial``. Not an operator's own file named by date (``2026-11-plan.html``), which
a preview into that folder removed."""


def _clear_earlier(out_dir: Path) -> int:
    """Remove what an earlier preview wrote into ``out_dir`` (its messages' files, and the ``.partial`` files of
    one killed while writing), so that the folder holds this preview's messages only: the summary's count, none
    that would not be sent now. Other files stay. Returns how many messages' files were removed."""
    removed = 0
    for path in out_dir.iterdir():
        if _WRITTEN.fullmatch(path.name) and path.is_file():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += not path.name.startswith(".")
    return removed


def _local(at: datetime, zone: str, shop_zone: str) -> str:
    """``at`` on the clock of ``zone`` (a customer's), or of the shop when ``zone`` is unknown here: the clock the
    contact policy read (``core.policy.zone_of``)."""
    return at.astimezone(zone_of(zone, shop_zone)).strftime("%Y-%m-%d %H:%M %Z")


def file_stem(index: int, dedupe_key: str) -> str:
    """``0001-winback_C-0001_INV-1_1``: sortable, and safe on every file system."""
    return f"{index:04d}-{_UNSAFE.sub('_', dedupe_key)[:150]}"


@dataclass
class PreviewSummary:
    would_send: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    """Skip reasons, plus ``render_error``."""
    errors: dict[str, list[str]] = field(default_factory=dict)
    """Render error text (``file:line: message``) → the dedupe keys it hit."""
    deferred: Counter[str] = field(default_factory=Counter)
    """Waiting for later, not sent now: held back by the contact policy (``cap``, ``quiet_hours``…), planned ahead of
    their window (``planned_ahead``), or past the day's quota (``daily_quota``)."""
    stopped_at: int | None = None
    """``--limit``, when the preview stopped there: more messages may be due than were considered."""

    @property
    def considered(self) -> int:
        return self.would_send + sum(self.by_reason.values()) + sum(self.deferred.values())

    def as_json(self) -> dict[str, object]:
        return {
            "action": "summary",
            "considered": self.considered,
            "stopped_at_limit": self.stopped_at is not None,
            "would_send": self.would_send,
            "skipped": dict(sorted(self.by_reason.items())),
            "deferred": dict(sorted(self.deferred.items())),
            "render_errors": [
                {"error": e, "count": len(keys), "examples": keys[:3]} for e, keys in self.errors.items()
            ],
        }


LABEL_WIDTH = 22
"""The campaign/step column's width: ``winback/3 d120``, and a loyalty milestone such as ``loyalty/spend-5000000``."""


def _per(count: int, unit: str) -> str:
    return f"{count} {unit}{'' if count == 1 else 's'}"


def deferral_reasons(settings: Settings) -> dict[str, str]:
    """What a deferral's ``why`` means, in the preview's words, with this config's figures (the caps as set, where it
    said "one email at a time" whatever they were)."""
    caps = ", ".join(f"{_per(n, 'email')} per {_per(days, 'day')}" for n, days in settings.policy.frequency_caps)
    return {
        "cap": f"cap: {caps}",
        "news_week": "new products: one email a week",
        "after_delivery": f"feedback: {_per(settings.campaigns.feedback.days_after, 'day')} after the delivery",
        "birthday": "a birthday offer due then",
        PLANNED_AHEAD: "planned ahead: due when its window opens",
        DAILY_QUOTA: f"daily quota: {_per(settings.sending.daily_quota, 'email')} a day, used up",
    }


def _label(message: ClaimedMessage, currency: str) -> str:
    """``birthday``, ``winback/2 d75`` for a win-back step (its number and day count), or ``loyalty/orders-5`` and
    ``loyalty/spend-5000000`` for a loyalty reward (its milestone as config.toml writes it, the amount in whole units
    of ``currency``, the shop's): a customer whose order reached both is listed twice."""
    if message.campaign == WINBACK:
        return f"winback/{message.step}" + (f" d{message.payload['days']}" if "days" in message.payload else "")
    if message.campaign == LOYALTY:
        milestone = milestone_of(message.payload)
        if milestone is None:  # a row edited by hand
            return LOYALTY
        kind, amount = milestone
        shown = f"{money.from_minor(amount, currency).normalize():f}" if kind == "spend" else str(amount)  # 1234.56
        return f"loyalty/{kind}-{shown}"
    return message.campaign


def _customer(message: ClaimedMessage) -> str:
    """The customer's id: the dedupe key's second field, or for feedback (whose key names the order) the
    payload's ``customer``; both escaped as ``core.audiences.key_part`` does."""
    kind, _, rest = message.dedupe_key.partition(":")
    return key_part_value(str(message.payload.get("customer", "-")) if kind == "feedback" else rest.split(":")[0])


def preview(settings: Settings, args: argparse.Namespace) -> int:
    known = enabled_campaigns(settings)
    unknown = [c for c in args.campaign or [] if c not in known]
    if unknown:
        campaign, step = contexts.sent_as(settings, unknown[0])  # a step's folder, as `send-test --campaign` takes
        what = (f"is the template folder of win-back's step {step}: preview --campaign {campaign}"
                if campaign in known and campaign != unknown[0] else "is not an enabled campaign")
        print(f"kembali: --campaign {unknown[0]!r} {what} (enabled: {', '.join(known)})", file=sys.stderr)
        return EXIT_USAGE
    deps = Deps.build(settings)
    if args.customer and deps.store.customer_by_external_id(args.customer) is None:
        meant = arguments.customer_meant(deps.store.engine, args.customer)
        deps.close()
        print(f"kembali: no customer with id {printable(args.customer)!r}{meant}", file=sys.stderr)
        return EXIT_USAGE
    at: datetime = args.at or deps.clock.now()
    # planning reads the tables as they are: no run then saw later (not said of this very minute, its seconds cut off)
    if args.at is not None and at < deps.clock.now() - timedelta(minutes=1):
        print("note: --at is before now: the preview plans on the shop's data and the ledger as they are now (orders "
              "placed and messages sent since then count), not as they were then", file=sys.stderr)
    try:
        keys = link_keys(settings)
    except ConfigError as exc:  # a preview's links are never clicked: a throwaway key will do
        name = settings.unsubscribe.secret_env
        shown = shown_env_name(name) or f"the variable unsubscribe.secret_env names ({NAME_NOT_SHOWN})"
        why = f"{shown} {missing}" if (missing := link_key_missing(name)) else str(exc)
        print(f"note: {why}; preview links use a throwaway key", file=sys.stderr)
        keys = [secrets.token_bytes(32)]
    refused = False  # the run would refuse these templates: exit code 1, even when no message previewed uses them
    try:
        check_template_folders(deps)
    except ConfigError as exc:  # the preview goes on: it lists what each message would get, errors included
        refused = True
        why = naming_the_line(str(exc), settings).split("; nothing was planned")[0]  # (the run's words, and line)
        print(f"note: with these templates `kembali run --once` would stop before planning, and the daemon not "
              f"start: {why}", file=sys.stderr)  # fmt: skip
    if WINBACK in known and (not args.campaign or WINBACK in args.campaign):
        _note_winback_renumbered(deps, settings)
    composer = deps.composer(keys)
    summary = PreviewSummary()
    out_dir: Path | None = args.out
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if removed := _clear_earlier(out_dir):
            print(f"note: removed {removed:,} files an earlier preview wrote to {out_dir}", file=sys.stderr)
    progress = Progress("previewing")
    out = sys.stdout
    if out.isatty() or _a_pipe(out):  # each message is a line there already, or likely is (`| jq .`, `| less`): a
        progress.enabled = False        # progress line would be drawn among them; shown for `> plan.txt`
    try:
        if not args.json:
            out.write(f"Preview as of {_local(at, settings.shop.time_zone, 'UTC')} (nothing is sent or written)\n\n")
            out.write(f"{'customer':<14} {'campaign/step':<{LABEL_WIDTH}} {'when (their time)':<22} subject\n")
        items = run_preview(
            deps.store, settings, composer, at,
            campaigns=args.campaign, customer_external_id=args.customer, limit=args.limit,
            quota_left=_quota_left(deps, settings, at),
        )  # fmt: skip
        seen = 0
        why_deferred = deferral_reasons(settings)
        try:
            for seen, item in enumerate(items, start=1):
                progress.update(seen, f"considered, {summary.would_send:,} would be sent")
                _show(item, at, summary, out, json_lines=args.json, out_dir=out_dir, shop_zone=settings.shop.time_zone,
                      currency=settings.shop.currency, why_deferred=why_deferred)  # fmt: skip
        except OutWriteError as exc:
            out.flush()
            print(f"kembali preview: {exc}; the preview stopped there ({summary.would_send - 1:,} messages written "
                  f"to {out_dir} before it, each whole)", file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        if args.limit is not None and seen == args.limit:
            summary.stopped_at = args.limit
    finally:
        progress.done()
        deps.close()
    if args.json:
        out.write(json_line(summary.as_json()) + "\n")
    else:
        _print_summary(summary, out, out_dir)
    return EXIT_RENDER_ERRORS if summary.errors or refused else EXIT_OK


def _a_pipe(out: TextIO) -> bool:
    """Whether ``out`` is a pipe or a socket: a program reads it, which may well show it on the terminal the progress
    line is drawn on (``kembali preview --json | jq .``, ``| less``); not a file, nor a capture without a descriptor."""
    try:
        mode = os.fstat(out.fileno()).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _quota_left(deps: Deps, settings: Settings, at: datetime) -> int | None:
    """The slots ``sending.daily_quota`` has left on the shop's day of ``at``, as the run's marks will count them
    (None: no quota): those of a quota set during the day count the day's sends before it."""
    quota = settings.sending.daily_quota
    if quota <= 0:
        return None
    zone = settings.shop.time_zone
    spent = deps.store.quota_spent(QUOTA_KEY, quota_day(at, zone).isoformat(), quota_day_start(at, zone))
    return max(0, quota - spent)


def _note_winback_renumbered(deps: Deps, settings: Settings) -> None:
    """A note when the ledger has win-back rows whose step number no longer names a step of their days: what a
    pass plans for those orders (README, "Win-back's steps are numbered")."""
    steps = [step.days for step in settings.campaigns.winback.effective_steps]
    moved = winback_renumbered(plan_sql.winback_rows_by_step(deps.store.engine), steps)
    if not moved:
        return
    each = "; ".join(f"{r.rows:,} of {r.days} days planned as step {r.was}, "
                     + (f"now step {r.now}" if r.now is not None else "no step now") for r in moved)  # fmt: skip
    print(f"note: win-back's steps are numbered otherwise than when some of its ledger rows were planned ({each}): "
          "an order is not planned a step of as many days as a row it has, or fewer, whatever the numbers; a step "
          "whose number it has a row of is planned under a key with its days when that row was another step's (its "
          "days another step's now, or its template not this step's), and not at all when it was this step's, its "
          "days edited", file=sys.stderr)  # fmt: skip


def _show(
    item: Composed | Skipped | RenderFailed | Deferred,
    at: datetime,
    summary: PreviewSummary,
    out: TextIO,
    *,
    json_lines: bool,
    out_dir: Path | None,
    shop_zone: str,
    currency: str,
    why_deferred: dict[str, str],
) -> None:
    message = item.message
    if isinstance(item, Composed):
        summary.would_send += 1
        goes = max(at, message.due_at).astimezone(zone_of(item.customer.time_zone, shop_zone))
        when = _local(goes, item.customer.time_zone, shop_zone)
        files: dict[str, str] = {}
        if out_dir is not None:
            stem = file_stem(summary.would_send, message.dedupe_key)
            # a message's two files, or neither: Ctrl-C or SIGTERM stops the preview once both are written (a stop
            # raised between the two left an .eml without its .html, when it came as the first write returned)
            with stopping.stops_held():
                write_whole(out_dir / f"{stem}.eml", item.data)
                try:
                    write_whole(out_dir / f"{stem}.html", item.rendered.html.encode("utf-8"))
                except BaseException:  # a full disk, say
                    with contextlib.suppress(OSError):
                        (out_dir / f"{stem}.eml").unlink()
                    raise
            files = {"eml": str(out_dir / f"{stem}.eml"), "html": str(out_dir / f"{stem}.html")}
        subject = sanitize_header_text(item.rendered.subject)  # as its Subject header goes out, not the template's
        if json_lines:
            row = {"action": "send", "customer": item.customer.external_id, "campaign": message.campaign,
                   # ISO 8601 on the customer's clock (the table's text, "01:30 EST", no program reads)
                   "step": message.step, "when": goes.isoformat(), "subject": subject,
                   "dedupe_key": message.dedupe_key, "template_version": item.rendered.template_version, **files}
            out.write(json_line(row) + "\n")
        else:
            # customer data reaches the operator's terminal: escape what is not printable (a terminal escape, say)
            out.write(f"{printable(item.customer.external_id):<14} {_label(message, currency):<{LABEL_WIDTH}} "
                      f"{when:<22} {printable(subject)}\n")
    elif isinstance(item, Skipped):
        summary.by_reason[item.reason.value] += 1
        if json_lines:
            out.write(json_line({"action": "skip", "customer": _customer(message), "campaign": message.campaign,
                                 "step": message.step, "dedupe_key": message.dedupe_key,
                                 "reason": item.reason.value}) + "\n")
        else:
            out.write(f"{printable(_customer(message)):<14} {_label(message, currency):<{LABEL_WIDTH}} {'-':<22} "
                      f"skip: {item.reason.value}  [{printable(message.dedupe_key)}]\n")
    elif isinstance(item, Deferred):
        summary.deferred[item.why] += 1
        if json_lines:
            out.write(json_line({"action": "defer", "customer": _customer(message), "campaign": message.campaign,
                                 "step": message.step, "dedupe_key": message.dedupe_key,
                                 "until": item.until.isoformat(), "why": item.why}) + "\n")
        else:
            why = why_deferred.get(item.why, "quiet hours")
            until = _local(item.until, item.time_zone, shop_zone)  # on the customer's clock, as the send times are
            out.write(f"{printable(_customer(message)):<14} {_label(message, currency):<{LABEL_WIDTH}} {'-':<22} "
                      f"defer until {until} ({why})\n")
    else:
        summary.by_reason["render_error"] += 1
        summary.errors.setdefault(str(item.error), []).append(message.dedupe_key)
        if json_lines:
            out.write(json_line({"action": "render_error", "customer": _customer(message),
                                 "campaign": message.campaign, "step": message.step,
                                 "dedupe_key": message.dedupe_key, "template": getattr(item.error, "template", ""),
                                 "line": getattr(item.error, "line", None), "error": str(item.error)}) + "\n")
        else:  # named by its file and line: the error itself is said once, below the table
            template, line = getattr(item.error, "template", ""), getattr(item.error, "line", None)
            where = f"{template}:{line}" if template and line else template or "see below"
            out.write(f"{printable(_customer(message)):<14} {_label(message, currency):<{LABEL_WIDTH}} {'-':<22} "
                      f"render error: {printable(where)}  [{printable(message.dedupe_key)}]\n")


def _print_summary(summary: PreviewSummary, out: TextIO, out_dir: Path | None) -> None:
    out.write(f"\n{summary.considered} considered")
    if summary.stopped_at is not None:
        out.write(f" (the first {summary.stopped_at}, as --limit asked; more may be due)")
    out.write(f": {summary.would_send} would be sent")
    if summary.by_reason:
        out.write(", " + ", ".join(f"{n} {reason}" for reason, n in sorted(summary.by_reason.items())))
    if summary.deferred:
        out.write("; waiting for later: "
                  + ", ".join(f"{n} {why}" for why, n in sorted(summary.deferred.items())))
    out.write("\n")
    if summary.by_reason:
        out.write("\nNot sent, by reason:\n")
        for reason, n in summary.by_reason.most_common():
            out.write(f"  {reason:<16} {n:>7}\n")
    if out_dir is not None and summary.would_send:
        if summary.would_send == 1:
            out.write(f"\n1 message written to {out_dir} (.eml and .html)\n")
        else:
            out.write(f"\n{summary.would_send} messages written to {out_dir} (.eml and .html each)\n")
    for error, keys in summary.errors.items():
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        out.write(f"\nrender error ({len(keys)} message{'' if len(keys) == 1 else 's'}): {printable(error)}\n  e.g. "
                  f"{printable(', '.join(keys[:3]))}{more}\n")

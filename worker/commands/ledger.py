"""`kembali ledger`: see uncertain and failed messages, and decide what becomes of them.

    kembali ledger list [FILTERS] [--all] [--limit 50] [--after ID] [--json]
    kembali ledger resend (ID... | FILTERS) [--dry-run] [--reason TEXT]     back to retry, due now, same Message-ID
    kembali ledger close (ID... | FILTERS) [--dry-run] [--as failed|sent] [--reason TEXT]

FILTERS: --status, --campaign, --since, --until (when the row last changed), --code (the last SMTP reply's),
--email (one address, any case), --customer (the shop's customer ID): what support asks about one customer.

Kembali never resends an ``uncertain`` message by itself (it may have arrived);
these commands are how an operator decides. Each decision is recorded as an
attempt row with outcome ``operator``.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import os
import shlex
import socket
import sys
from datetime import UTC, datetime

from worker.adapters import db
from worker.adapters.clock import SystemClock
from worker.adapters.ledger import DECIDABLE, MAX_ID, ActionResult, LedgerAdmin, LedgerRow, Selection
from worker.commands import arguments
from worker.config import Settings
from worker.domain import MessageStatus
from worker.log import json_line, printable

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE = 0, 1, 2
WAITING = frozenset({MessageStatus.PLANNED.value, MessageStatus.RETRY.value})


def moment(text: str) -> datetime:
    """``--since``/``--until``: a day (``2026-12-01``, its 00:00 UTC) or a moment (``2026-12-01T14:30``, UTC
    unless it names its offset: ``2026-12-01T21:30+07:00``)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a day or a moment: {text!r} (e.g. 2026-12-01, 2026-12-01T14:30 in UTC, 2026-12-01T21:30+07:00)"
        ) from None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # its offset takes it before year 1 or past 9999 (argparse would print a traceback)
        raise argparse.ArgumentTypeError(f"not a moment in years 1 to 9999 in UTC: {text!r}") from None


def row_limit(text: str) -> int:
    """``list --limit``: a LIMIT both databases take (a larger one raised a traceback from the driver)."""
    return arguments.whole_number(text, 1, MAX_ID)


def page_after(text: str) -> tuple[int, datetime | None]:
    """``list --after``: ``ID``, or ``ID@WHEN`` as a list's next page says it (the row's change as that page listed
    it: the next page begins there even when the row changed since)."""
    number, at, when = text.partition("@")
    return row_limit(number), moment(when) if at else None


def smtp_code(text: str) -> int:
    return arguments.whole_number(text, 200, 599, meaning=" (an SMTP reply code)")


def _add_filters(p: argparse.ArgumentParser, statuses: list[str], default: str) -> None:
    p.add_argument("--status", action="append", choices=statuses,
                   help=f"only this status (repeatable; default: {default})")  # fmt: skip
    p.add_argument("--campaign", type=arguments.named, help="only this campaign")
    p.add_argument("--since", type=moment, metavar="WHEN",
                   help="only rows last changed (failed, left uncertain, decided) at or after WHEN: a day "
                        "(2026-12-01, from 00:00 UTC) or a moment (2026-12-01T14:30, UTC unless it has an offset)")
    p.add_argument("--until", type=moment, metavar="WHEN", help="only rows last changed before WHEN (as --since)")
    p.add_argument("--code", type=smtp_code, action="append", dest="codes", metavar="CODE",
                   help="only rows whose last SMTP reply had this code, e.g. 421 or 550 (repeatable)")
    p.add_argument("--email", type=arguments.address, metavar="ADDRESS",
                   help="only messages to this address (in any case)")
    p.add_argument("--customer", type=arguments.named, metavar="ID",
                   help="only messages to this customer, by the shop's customer ID (the id column of customers.csv)")


def _selection(args: argparse.Namespace, default: tuple[str, ...]) -> Selection:
    return Selection(statuses=tuple(args.status or default), campaign=args.campaign, since=args.since,
                     until=args.until, codes=tuple(args.codes or ()), email=args.email,
                     customer=args.customer)  # fmt: skip


def _filtered(args: argparse.Namespace) -> bool:
    return bool(args.status or args.campaign or args.since or args.until or args.codes or args.email
                or args.customer)  # fmt: skip


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ledger",
        help="list uncertain/failed messages; resend or close them",
        description="The ledger holds one row per planned message. `list` shows rows (by default the ones "
        "that need a decision: uncertain and failed, not those closed already) with their attempts and the "
        "server's last reply. "
        "`resend` puts uncertain or failed rows back in the queue (same Message-ID; not one whose address is "
        "on the suppression list: `kembali suppress remove` it first); `close` marks them "
        "final as you decide. A message already as asked (back in the queue, sent, or closed as failed with the "
        "same --reason) is left as it is, so running a command twice is safe. Kembali never resends an uncertain "
        "message by itself: it may have arrived. `resend` and `close` take message IDs or filters (every "
        "uncertain or failed row they match: "
        "after an outage, `resend --campaign winback --since 2026-12-01T02:00 --code 421 --dry-run` counts and "
        "lists what a resend would take, without it changing anything). Exit code 1 when a message is left alone "
        "(no such message, another state, or for a resend: past its expiry or to a suppressed address); 2 for "
        "neither IDs nor a filter, or both, or a --customer the shop's data does not have, or a list's --after ID "
        "the ledger does not have, or a --since not before --until; 3 when the database cannot be used. What "
        "one customer was sent: `list --all --email ADDRESS` or `list --all --customer ID`. To cancel a message not "
        "sent yet: `close ID` (planned or retry), or `kembali suppress add ADDRESS` for every message to an address.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser(
        "list", help="list messages with their last reply",
        description="Newest change first. --json prints one object a line with the keys id, status, campaign, "
        "dedupe_key, email, message_id, attempts, last_code, last_reply, last_error, skip_reason, updated_at, "
        "next_attempt_at, claimed_by, lease_until (these stay; new ones may be added). Exit code 2 for a "
        "--customer the shop's data does not have, an --after ID the ledger does not have or a --since not before "
        "--until; 3 when the database cannot be used.",
    )  # fmt: skip
    _add_filters(ls, [s.value for s in MessageStatus], "uncertain and failed, not those an operator closed")
    ls.add_argument("--all", action="store_true", help="every status (with --status: the ones it names)")
    ls.add_argument("--limit", type=row_limit, default=50, metavar="N",
                    help="at most N rows, newest first (default 50)")
    ls.add_argument("--after", type=page_after, metavar="ID",
                    help="the next page: the rows listed after message ID (the last row of the page before; "
                         "ID@WHEN: as it changed then); a list cut short by --limit ends with the command for its "
                         "next page")  # fmt: skip
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    rs = actions.add_parser(
        "resend", help="send uncertain/failed messages again (same Message-ID)",
        description="Puts uncertain or failed messages back in the queue, due now, with the same Message-ID. By "
        "filters it leaves out the messages an operator closed as failed (a decision a filter does not undo; it "
        "says which, and their IDs resend them). A loyalty spend milestone merged into an email and that email are "
        "never both sent: resent together, the email takes it along; either is left alone while the other is in "
        "the queue, sent or may have arrived. Exit code 1 when a message is left alone (no such message, "
        "another state, past its expiry or to a suppressed address); 2 for neither IDs nor a filter, or both, or a "
        "--customer the shop's data does not have; 3 when the database cannot be used.",
    )  # fmt: skip
    rs.add_argument("ids", type=int, nargs="*", metavar="ID", help="a message's ID, as `ledger list` shows it")
    _add_filters(rs, list(DECIDABLE), "uncertain and failed")
    rs.add_argument("--dry-run", action="store_true",
                    help="say what would be resent and what left alone; change nothing")
    rs.add_argument("--reason", type=arguments.one_line, default="", help="a note kept with the message")
    cl = actions.add_parser(
        "close", help="mark uncertain/failed messages final; cancel planned ones",
        description="Marks uncertain or failed messages final: --as failed (the default) frees their place under the "
        "frequency cap, and a resend by filters leaves them out (their IDs still resend them); --as sent, for "
        "messages you know arrived, counts them as sent (for the cap and `stats`) from when they were last tried. A "
        "message waiting in the queue (planned or retry, e.g. `close --status planned --campaign new_products`) is "
        "cancelled by closing it as failed: it is never sent (one a worker has taken is being sent and is left "
        "alone). A loyalty email that carries a spend milestone merged into it takes it along: closed as failed with "
        "it (its ID resends it on its own until its expiry; resending that email merges it again), or, closed as "
        "sent, left merged; "
        "the output names it. Each decision is recorded as an attempt with outcome 'operator'. Exit code 1 when a "
        "message is left alone (no such message, another state, or a planned one closed --as sent); 2 for neither IDs "
        "nor a filter, or both, or a --customer the shop's data does not have; 3 when the database cannot be used.",
    )  # fmt: skip
    cl.add_argument("ids", type=int, nargs="*", metavar="ID", help="a message's ID, as `ledger list` shows it")
    _add_filters(cl, [*DECIDABLE, *sorted(WAITING)], "uncertain and failed; planned or retry to cancel them")
    cl.add_argument("--dry-run", action="store_true", help="say what would be closed; change nothing")
    cl.add_argument(
        "--as",
        dest="as_status",
        choices=["failed", "sent"],
        default="failed",
        help="the final status (default failed; sent if you know it arrived)",
    )
    cl.add_argument("--reason", type=arguments.one_line, default="", help="a note kept with the message")


def operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"operator:{user}@{socket.gethostname()}"


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.since is not None and args.until is not None and args.since >= args.until:  # else nothing matches:
        # "nothing to resend" after an outage whose two days were swapped
        print(f"kembali ledger {args.action}: --since {args.since.isoformat()} is not before --until "
              f"{args.until.isoformat()}: no message can match (--since is when the period starts, --until when it "
              "ends)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    engine = db.command_engine(settings)
    try:
        db.check_schema(engine)
        admin = LedgerAdmin(engine)
        if args.customer and not admin.has_customer(args.customer):  # else it lists nothing, as if never emailed
            meant = arguments.customer_meant(engine, args.customer) or (
                " (give the customer's ID as in customers.csv, e.g. C-0001)")  # fmt: skip
            print(f"kembali ledger {args.action}: no customer {printable(args.customer)!r} in the shop{meant}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        if args.action == "list":
            return _list(admin, args)
        if bool(args.ids) == _filtered(args):
            print(f"kembali ledger {args.action}: give message IDs or filters (--status, --campaign, --since, "
                  "--until, --code, --email, --customer), not " + ("both" if args.ids else "neither"), file=sys.stderr)
            return EXIT_USAGE
        selection = _selection(args, DECIDABLE)
        closed: list[int] = []
        if args.action == "resend" and not args.ids:  # a decision made by ID is not undone by a filter
            closed = admin.ids(dataclasses.replace(selection, closed=True))
            selection = dataclasses.replace(selection, closed=False)
        ids = args.ids or admin.ids(selection)
        if closed:
            print(f"{len(closed)} message(s) an operator closed left out (resend them by ID to send them after all): "
                  + " ".join(map(str, closed)))  # fmt: skip
        if not ids:
            print(f"no {' or '.join(args.status or DECIDABLE)} messages match: nothing to {args.action}")
            return EXIT_OK
        now = SystemClock().now()
        would = "would be " if args.dry_run else ""
        if args.action == "resend":
            result = admin.resend(ids, now=now, operator=operator(), note=args.reason, dry_run=args.dry_run)
            return _report(result, f"{would}back in the queue (sent at the next run)", now, args)
        result = admin.close(ids, now=now, operator=operator(), status=MessageStatus(args.as_status),
                             note=args.reason, dry_run=args.dry_run)  # fmt: skip
        return _report(result, f"{would}closed as {args.as_status}", now, args)
    finally:
        engine.dispose()


def _list(admin: LedgerAdmin, args: argparse.Namespace) -> int:
    after, after_changed = args.after or (None, None)
    selection = dataclasses.replace(_selection(args, DECIDABLE), after=after, after_changed=after_changed)
    if args.all and not args.status:  # every status, unless --status names some (it was ignored)
        selection = dataclasses.replace(selection, statuses=())
    elif not args.status:  # what needs a decision: not a message an operator closed (decided, or cancelled)
        selection = dataclasses.replace(selection, closed=False)
    if after is not None and not admin.has_message(after):  # else it lists nothing, as if none were left
        print(f"kembali ledger list: --after {after}: no message {after} in the ledger (give an ID a list "
              "showed)", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    rows = admin.rows(selection, limit=args.limit)
    more = ""
    if len(rows) == args.limit and (matching := admin.matching(selection)) > len(rows):
        of = (f"{matching} messages shown (the newest)" if after is None
              else f"the {matching} messages after message {after} shown")  # fmt: skip
        more = f"{len(rows)} of {of}; the next: {_next_page(args, rows[-1])}"
    if args.json:
        for row in rows:
            print(json_line(row.as_dict()))
        if more:  # not among the JSON lines
            print(f"kembali ledger list: {more}", file=sys.stderr)
        return EXIT_OK
    if not rows:
        found = "no messages" + (f" to {args.email}" if args.email else "")
        found += f" to customer {printable(args.customer)!r}" if args.customer else ""
        found += f" with status {', '.join(selection.statuses)}" if selection.statuses else ""
        if args.codes:
            found += f" with last reply code {', '.join(map(str, args.codes))}"
        if args.since or args.until:
            found += " changed" + (f" from {args.since:%Y-%m-%d %H:%M}" if args.since else "") + (
                f" before {args.until:%Y-%m-%d %H:%M}" if args.until else "") + " UTC"
        found += f" after message {after}" if after is not None else ""  # (a page past the last: some before it)
        if args.campaign:
            found += f" in campaign {args.campaign!r}"
            known = admin.campaigns()
            if args.campaign not in known:  # a misspelt name finds nothing, which is no news about the campaign
                found += (f" (the ledger has no campaign {args.campaign!r}; "
                          f"its campaigns: {', '.join(known) or 'none yet'})")  # fmt: skip
        if selection.closed is False and (hidden := admin.matching(dataclasses.replace(selection, closed=True))):
            found += f" ({hidden} closed by an operator not shown: --status failed lists them)"
        print(found)
        return EXIT_OK
    for line in _table(rows):
        print(line)
    if more:
        print(f"\n{more}")
    counts = admin.counts()
    # the counts are every row's: under a list of one address or campaign, say so, or they read as that list's
    narrowed = args.email or args.customer or args.campaign or args.since or args.until or args.codes
    label = "the whole ledger (not only the rows above)" if narrowed else "ledger"
    print(f"\n{label}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return EXIT_OK


def _kembali(args: argparse.Namespace) -> list[str]:
    """How a command this one prints begins: ``kembali``, with the ``--config`` this one was given (so that it runs
    on the same ledger)."""
    return ["kembali", *(["--config", str(args.config)] if getattr(args, "config_given", False) else [])]


def _next_page(args: argparse.Namespace, last: LedgerRow) -> str:
    """The command that lists the next page: this one's filters and options, ``--after`` the page's last row and
    when it changed (a row changed since moves to the top; its new time would list this page again)."""
    words = [*_kembali(args), "ledger", "list"]
    words += [w for status in args.status or () for w in ("--status", status)]
    words += ["--campaign", args.campaign] if args.campaign else []
    words += ["--since", args.since.isoformat()] if args.since else []
    words += ["--until", args.until.isoformat()] if args.until else []
    words += [w for code in args.codes or () for w in ("--code", str(code))]
    words += ["--email", args.email] if args.email else []
    words += ["--customer", args.customer] if args.customer else []
    words += ["--all"] if args.all else []
    words += ["--limit", str(args.limit), *(["--json"] if args.json else []), "--after",
              f"{last.id}@{last.updated_at.isoformat()}"]
    return shlex.join(words)


_HEADER = ("ID", "CHANGED (UTC)", "STATUS", "CAMPAIGN", "TRIES", "CODE", "EMAIL", "LAST REPLY / NOTE")
_RIGHT = frozenset({"ID", "TRIES", "CODE"})


def _table(rows: list[LedgerRow]) -> list[str]:
    """The header and one line per row, each column as wide as its widest cell (``new_products`` is 12)."""
    cells = [_HEADER, *(_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_HEADER) - 1)]  # the last column runs on
    return ["  ".join([*map(_pad, _HEADER, line, widths), line[-1]]) for line in cells]


def _pad(name: str, cell: str, width: int) -> str:
    return cell.rjust(width) if name in _RIGHT else cell.ljust(width)


def _cells(row: LedgerRow) -> tuple[str, ...]:
    reply = row.last_error if row.last_error and row.last_error.startswith("operator") else row.last_reply
    if row.status == "skipped" and row.skip_reason:  # why it was not sent, not the reply or note before that
        reply = f"skipped: {row.skip_reason}"
    reply = (reply or row.last_error or row.skip_reason or "").replace("\n", " ")
    if row.status in WAITING:  # deferred by the cap or quiet hours, or a retry's backoff: when it goes next
        reply = f"next try {row.next_attempt_at:%Y-%m-%d %H:%M} UTC" + (f"; {reply}" if reply else "")
    if (held := row.held()) is not None:  # a worker's, under way or (its worker dead) until its lease lapses
        reply = held
    code = "" if row.last_code is None else str(row.last_code)
    # a reply is the recipient's server's text, an error may quote a customer's name: neither may reach the
    # operator's terminal as control characters
    return (str(row.id), f"{row.updated_at:%Y-%m-%d %H:%M}", row.status, printable(row.campaign), str(row.attempts),
            code, printable(_within(row.email, 32)), printable(_within(reply, 110)))


def _within(text: str, most: int) -> str:
    """``text`` in at most ``most`` characters, one cut short ending in "…": an address cut to the column's width
    (``…@posel.exampl``) read as a whole address that is not the customer's."""
    return text if len(text) <= most else text[: most - 1] + "…"


def _report(result: ActionResult, what: str, now: datetime, args: argparse.Namespace) -> int:
    dry_run = args.dry_run
    if dry_run:
        print(f"dry run: nothing changed; {len(result.changed)} message(s) {what}, {len(result.refused)} left alone")
    if result.changed:
        print(f"{len(result.changed)} message(s) {what}: {' '.join(map(str, result.changed))}")
    alike: dict[str, list[int]] = {}  # the same command run twice: nothing needs you
    for message_id, state in result.already.items():
        alike.setdefault(state, []).append(message_id)
    for state, ids in alike.items():  # one line for a filter's many (a campaign's rows closed again)
        print(f"message {ids[0]} is already {state}: nothing changed" if len(ids) == 1 else
              f"{len(ids)} message(s) already {state}: nothing changed: {' '.join(map(str, ids))}")  # fmt: skip
    would = "would be " if dry_run else ""
    for c in result.carried:  # a loyalty milestone merged into a message closed or resent: what became of it
        merged = f"message {c.id} ({printable(c.dedupe_key)}, merged into message {c.carrier})"
        expiry = f"{c.expires_at:%Y-%m-%d %H:%M} UTC"
        if c.fate == "closed" and c.expires_at <= now:  # a resend would be refused: no hint that cannot work
            print(f"{merged} {would}closed as failed with it: it expired at {expiry}, so it cannot be sent on its own")
        elif c.fate == "closed":
            resend = shlex.join([*_kembali(args), "ledger", "resend", str(c.id)])
            print(f"{merged} {would}closed as failed with it: `{resend}` sends it on its own "
                  f"until {expiry} (its expiry)")  # fmt: skip
        elif c.fate == "went":
            print(f"{merged} went with it: it stays skipped (merged)")
        else:
            print(f"{merged} {would}merged into it again: it goes with it (on its own should that one no longer be "
                  "due)")  # fmt: skip
    for message_id, why in result.refused.items():
        print(f"kembali: message {message_id} left alone: {printable(why)}", file=sys.stderr)
    return EXIT_ATTENTION if result.refused else EXIT_OK

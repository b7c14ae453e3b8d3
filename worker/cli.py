"""The `kembali` command: parse, call, print, exit code. The work happens elsewhere.

Exit codes: 0 done; 1 done, but something needs the operator (rejected rows,
render errors, output cut short by a full disk); 2 bad usage or configuration (nothing was done); 3 the
database or SMTP server could not be used; 141 the output's reader went away
(``| head``); 130/143 stopped by SIGINT/SIGTERM (``run --once``, ``import`` and ``demo`` first finish what
is under way; the daemon and ``preview --serve`` exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn

from worker import log, stopping
from worker.commands import arguments
from worker.config import DEFAULT_CONFIG, LOG_LEVELS, Settings, load_settings, naming_the_line
from worker.errors import ConfigError, KembaliError, SchemaError

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13
"""As a shell reports a process that SIGPIPE ended (``set -o pipefail``): its output's reader went away."""


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose help, cut short by a full disk or a reader gone, is said as any other output is:
    argparse drops a write's error, and exited 0 with nothing written."""

    def print_help(self, file: Any = None) -> None:
        (file or sys.stdout).write(self.format_help())

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """As argparse's, but an option the command does not take is refused by the command's own parser (``kembali
        run: error: unrecognized arguments: --dry-run`` under ``kembali run``'s usage): argparse left it to the top
        level, whose usage names none of the command's options."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            _chosen(self, parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        """As argparse's, but a command line that lacks only the command (``kembali`` alone, ``kembali ledger``) is
        shown the whole help, whose list says what each command does, not the one-line usage ("COMMAND ...")."""
        commands = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if commands and message == f"the following arguments are required: {commands[0].metavar}":
            sys.stderr.write(self.format_help())
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message + _meant(message))


def _meant(message: str) -> str:
    """`` (did you mean 'send-test'?)`` for argparse's ``invalid choice: 'sendtest' (choose from …)`` when one of
    the choices is close to what was written (as a misspelt config key is told the key meant), else nothing."""
    import difflib
    import re

    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
    if found is None:
        return ""
    choices = re.findall(r"'([^']*)'", found.group(2))
    close = difflib.get_close_matches(found.group(1).lower(), choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _chosen(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost command's parser the command line chose (``ledger list``'s, ``run``'s), else ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
            return _chosen(action.choices[getattr(parsed, action.dest)], parsed)
    return parser


def _parser() -> argparse.ArgumentParser:
    top: argparse.ArgumentParser = _Parser(
        prog="kembali",
        description="Kembali brings one-time buyers back: it plans re-engagement emails from your shop's "
        "data, renders them from templates/email/, sends them over SMTP with rate limits, and records "
        "every message and attempt in a ledger so nothing is sent twice or lost.",
        epilog="Run `kembali COMMAND --help` for each command. Start with `kembali demo`. Exit codes: 0 done; 1 done, "
        "but something needs you (rejected rows, failed or uncertain messages, template problems, output cut short by "
        "a full disk); 2 bad usage or "
        "configuration, nothing done; 3 the database or the SMTP server cannot be used; 130/143 stopped by "
        "SIGINT/SIGTERM (Ctrl-C, `timeout`; the daemon and `preview --serve` exit 0); 141 the output's reader "
        "went away (`| head`).",
    )
    top.add_argument("--config", type=arguments.path, default=None, metavar="FILE", help=_CONFIG_HELP)
    top.add_argument("--log-level", choices=LOG_LEVELS, default=None, metavar="LEVEL", help=_LOG_LEVEL_HELP)
    top.add_argument("--version", action=_Version, help="print kembali's version and newest schema revision, and exit")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="try Kembali on a demo shop with a local SMTP sink",
                       description="Create a demo database of an Indonesian shop, start a local SMTP sink on a "
                       "free loopback port, run one full cycle (plan, render, send, record) against it, save what "
                       "the sink received as .eml files, and print what was sent. Touches nothing outside --out. Reads "
                       "--config (default ./config.toml, else the config.toml and templates/email/ of the project's "
                       "folder it is installed from). Exit code 1 if a message failed (a template that fails for a "
                       "customer, say) or became uncertain, as for `run --once`; 2 for a bad config, templates `run "
                       "--once` refuses (a file missing or that cannot be parsed: nothing is built), or an --out that "
                       "is a file or a folder of other files (the shop's); "
                       "130/143 when stopped by Ctrl-C/SIGTERM (sends under way finish; it says what was sent and "
                       "how many planned messages were not).")
    p.add_argument("--out", type=arguments.path, default=Path("demo-out"), metavar="DIR",
                   help="folder for the demo: a new or empty one, or one an earlier demo made, whose config.toml, "
                   "data/ and sent/ it replaces (default: demo-out)")
    p.add_argument("--customers", type=arguments.positive_int, default=120,
                   help="customers in the demo shop (default: 120)")
    p.add_argument("--seed", type=int, default=7, help="random seed for the demo data (default: 7)")
    p.add_argument("--now", type=_datetime_arg, default=None,
                   help="pretend it is this moment (ISO 8601 with offset): the shop's history ends here and "
                   "the cycle runs at it, e.g. 2027-02-20T10:00+07:00 (default: the real time)")

    p = sub.add_parser("db", help="create or migrate the database schema",
                       description="Database maintenance. `kembali db upgrade` creates the schema in an empty "
                       "database or migrates an older one to this version (SQLite or PostgreSQL, from "
                       "database.url). On PostgreSQL a second `db upgrade` run meanwhile waits for the first, then "
                       "finds nothing to do; on SQLite it waits up to 30 s for the file's write lock, saying so. "
                       "Exit code 2 for a bad config or an SQLite file that cannot be opened "
                       "(its folder missing, say), 3 when the PostgreSQL server cannot be used (try again later), "
                       "another program held an SQLite file's write lock longer than 30 s (nothing is changed), or "
                       "the database's schema is newer than this kembali (a newer one upgraded it: install that "
                       "version here; nothing is changed). `kembali db status` exits 0 when the schema is the "
                       "newest, 1 when `db upgrade` is needed (an older schema, an empty database or none yet), 3 "
                       "when the database cannot be used: a newer kembali's or another program's schema, or another "
                       "program's tables where Kembali's go.")
    p.add_argument("action", choices=["upgrade", "status"], help="upgrade: migrate to the newest schema; "
                   "status: show the current and newest revision (exit 0: current; 1: an upgrade is needed; 3: the "
                   "database cannot be used)")

    p = sub.add_parser("import", help="import customers, products or orders from CSV",
                       description="Import a CSV file (columns in the README). Rows are upserted by their id, so "
                       "importing the same file twice changes nothing, and nothing is deleted: a row a later file "
                       "leaves out stays as stored (take an order back as cancelled). A bad row is reported with its "
                       "line number and skipped; the rest is imported. Import customers before their orders (an order "
                       "of an unknown customer is rejected). Exit code 1 if any row was rejected, or imported with a "
                       "warning (an unclear marketing_consent, a birthday, time_zone or locale left out, one address "
                       "whose customers' consents disagree); 2 if the file is missing or cannot be read as CSV of that "
                       "kind (nothing imported); 3 when the database cannot be used; 130/143 when stopped by "
                       "Ctrl-C/SIGTERM (it says up to which line the file is imported).")
    p.add_argument("kind", choices=["customers", "products", "orders"], help="what the file holds")
    p.add_argument("file", help="the CSV file (UTF-8, a header row); a pipe is read too: "
                   "<(gunzip -c orders.csv.gz), or '-' for standard input")
    p.add_argument("--check-dns", action="store_true",
                   help="also check that each address's domain accepts mail (needs network; off by default)")

    p = sub.add_parser("run", help="run the daemon (or one cycle with --once)",
                       description="Without --once: the daemon. It plans each enabled campaign on its cron "
                       "([schedule]), sends what is due, tidies up (lapsed leases, expired messages, old attempts), "
                       "and serves the unsubscribe and feedback links, /healthz, /readyz and /metrics ([web]). SIGHUP "
                       "reloads config and templates after checking them; SIGTERM/SIGINT stops claiming, lets sends "
                       "under way finish ([daemon] shutdown_grace_seconds) and exits 0; a second signal exits at "
                       "once. With --once: one full cycle (plan, send, record), a summary, and exit (for cron and "
                       "tests); a signal stops it the same way, with exit code 130 (SIGINT) or 143 (SIGTERM). "
                       "With --once, exit code 0 when all went out; 1 when messages failed or became uncertain "
                       "(`kembali ledger list`); 2 for a bad config, or a template folder missing files or using one "
                       "that cannot be parsed (nothing done); 3 when the database cannot be used, sending paused (the "
                       "SMTP connection, login or setup) or not one attempt got through to the SMTP server. The daemon "
                       "exits 0 when stopped, "
                       "1 when forced by a second signal, when outcomes could not be written, or when the grace "
                       "period ran out and the database could not mark the sends cut short, 2 when its config "
                       "or templates fail the start-up check, 3 when the database cannot be used at start, or when its "
                       "schema changes while it runs (another host's `db upgrade`: it stops as on SIGTERM).")
    p.add_argument("--once", action="store_true", help="run one cycle and exit")

    p = sub.add_parser("suppress", help="manage the suppression list (addresses that never get email)",
                       description="Addresses on the suppression list are never sent to (checked right before "
                       "every send). Unsubscribe links add to it with reason 'unsubscribed'. Exit code 1 when `import` "
                       "rejected lines or reasons (named on stderr; the rest is imported), 2 for a missing or "
                       "invalid address, a --reason given to remove, "
                       "or an `import` file that is missing, not UTF-8 text, a CSV separated by ';' or a tab "
                       "or one without an 'email' column (nothing imported), 3 when the database cannot be used.")
    p.add_argument("action", choices=["add", "remove", "list", "import"])
    p.add_argument("target", nargs="?", help="add/remove: an email address (or 'Name <address>' as a mail client "
                   "copies it); list: only this address (optional); "
                   "import: a file with one address a line, or a CSV with an 'email' column and perhaps the "
                   "'reason', 'source' and 'created_at' ones `list` writes ('-' for standard input)")
    p.add_argument("--reason", type=arguments.suppression_reason, default=None,
                   help="add/import: the reason stored (default: a CSV's "
                   f"'reason' column, else manual; one line, at most {arguments.MAX_REASON_CHARS} characters); "
                   "list: only this reason")

    p = sub.add_parser("preview", help="dry run: who would get what, without sending or writing",
                       description="Run the real planning, re-check and rendering as of --at, with no sends and "
                       "no writes, and list the messages that would go out and the ones that would be skipped. "
                       "Exit code 1 when messages would fail to render (named with template file and line) or "
                       "`run --once` would refuse the templates (a file missing or that cannot be parsed), 2 for "
                       "an unknown --campaign or --customer, a file --out cannot write (or --serve's port in use), an "
                       "option of the other mode (--port without --serve; --serve with --at, --campaign, --customer, "
                       "--limit, --json or --out), 3 "
                       "when the database cannot be used.")
    p.add_argument("--at", type=_datetime_arg, default=None,
                   help="the moment to plan for, ISO 8601 with offset (default: now), e.g. 2027-02-28T10:00+07:00")
    p.add_argument("--campaign", action="append", help="only this campaign (repeatable)")
    p.add_argument("--customer", type=arguments.named, help="only this customer (the shop's id)")
    p.add_argument("--limit", type=arguments.positive_int, default=None, metavar="N",
                   help="show at most N messages (default: no limit)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table (a summary line last)")
    p.add_argument("--out", type=arguments.path, default=None, metavar="DIR",
                   help="also write each message to DIR as .eml (the exact bytes that would be sent) and .html")
    p.add_argument("--serve", action="store_true",
                   help="instead: serve a live page of every campaign x language x sample customer on 127.0.0.1, "
                   "reloading when a template changes (no database needed)")
    p.add_argument("--port", type=arguments.port, default=None,
                   help="port for --serve (default: the one after the daemon's web.port, 8026 with the shipped "
                   "config; 0 picks a free one)")

    p = sub.add_parser("check", help="check the config and every template against sample customers",
                       description="Validate the config, then render every campaign's templates in every language "
                       "for sample customers (hostile and long names, both locales, with and without products) and "
                       "report syntax errors and undefined variables with file and line, missing files, an empty "
                       "text part, HTML over checks.html_max_bytes, renders slower than "
                       "checks.render_timeout_seconds, empty or too long subjects, unescaped data and a missing "
                       "unsubscribe link or postal address, all on stdout. Exit code 1 on any problem; 2 when the "
                       "config file cannot be read or is invalid (nothing else is checked).")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object a line: each problem, each note, then a summary")

    p = sub.add_parser("send-test", help="send one rendered message to yourself, marked as a test",
                       description="Render one message of a campaign for a customer (--customer, the shop's id) or "
                       "a sample customer, and send it through the configured SMTP server to --to, with '[TEST] ' "
                       "before the subject. The ledger is not touched; the unsubscribe link in a test message "
                       "does not work (it cannot unsubscribe the customer). What was sent, and the server's reply, "
                       "is printed on stdout; why nothing was sent, on stderr. Exit code 1 if the server refuses the "
                       "message (or does not confirm it) or the template does not render, 2 for an unknown "
                       "--campaign or --customer, 3 when the database cannot be used (it reads the customer and the "
                       "products from it) or the server cannot be used (connection, login, TLS setup).")
    p.add_argument("--campaign", required=True,
                   help="the campaign, e.g. winback, or a win-back step's template folder, e.g. winback-reminder")
    p.add_argument("--customer", type=arguments.named,
                   help="render for this customer (default: a sample customer)")
    p.add_argument("--to", required=True, type=_address_arg, help="your address")

    p = sub.add_parser("stats", help="what the campaigns did: sends, skips, bounces, conversion, lift",
                       description="Per campaign and step: planned, sent, failed, cancelled, uncertain, waiting, "
                       "skipped by reason, hard bounces; conversion (emailed customers who ordered within "
                       "--window-days) and revenue; lift over the holdout group with a 95% Newcombe interval; "
                       "unsubscribes and bounces from the suppression list; the shop's repeat purchase rate and "
                       "churn over the period; feedback ratings given in it. Days are the shop's (shop.time_zone, "
                       "default Asia/Jakarta): --since 2026-12-01 starts at 00:00 there. --json prints one "
                       "object (its keys: README, 'Did it work'). Exit code 2 for a bad --since or --now, 3 when "
                       "the database cannot be used.")
    p.add_argument("--since", type=_date_arg, default=None, metavar="YYYY-MM-DD",
                   help="start of the period: a day on the shop's clock (shop.time_zone), as the report's days "
                   "are, from its 00:00 there; the report's last day (that of --now, the one before when --now is "
                   "00:00 there; today without it) or earlier (default: the day 90 days before it, from its start)")
    p.add_argument("--now", type=_datetime_arg, default=None, metavar="MOMENT",
                   help="end the period at this moment instead of now, ISO 8601 with offset, e.g. "
                   "2027-03-01T00:00+07:00: its day in shop.time_zone is the report's last (the day before at 00:00 "
                   "there), what was recorded "
                   "after it is left out, and an attribution window still open at it is pending (the messages' "
                   "statuses are today's; after the current time, a window still open today counts as closed, "
                   "as stderr notes)")
    p.add_argument("--window-days", type=arguments.window_days, default=7, metavar="DAYS",
                   help=f"attribution window in days, 1 to {arguments.MAX_WINDOW_DAYS} (default 7)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("insights", help="when do customers buy again? a data-driven first win-back day",
                       description="From the order history: the distribution of days between a customer's first "
                       "and second purchase, and the day by which --share of second purchases happened, as the "
                       "recommended day of the first win-back email (campaigns.winback.steps[0].days, or "
                       "campaigns.winback.quiet_days without steps), with the sample size it rests on. Exit code 2 "
                       "when --plot's file cannot be written, 3 when the database cannot be used.")
    p.add_argument("--plot", type=arguments.path, default=None, metavar="FILE",
                   help="also write a PNG bar chart to FILE")
    p.add_argument("--share", type=_share_arg, default=0.8,
                   help="the share of second purchases, more than 0 and less than 1 (default 0.8)")
    p.add_argument("--bin-days", type=arguments.positive_int, default=7,
                   help="histogram bin width in days (default 7; doubled until 95%% of the gaps fit in 20 bars)")
    p.add_argument("--json", action="store_true", help="print JSON")

    from worker.commands import ledger

    ledger.add_parser(sub)
    _config_after_the_command(sub)
    for command, lines in EXAMPLES.items():
        parser = sub.choices[command]
        parser.formatter_class = _KeepExamples
        parser.epilog = FIGURES.get(command, "") + "\n".join(["examples:", *(f"  {line}" for line in lines)])
    return top


FIGURES = {
    "stats": """\
figures: per campaign and step; a purchase is an order paid, shipped or
delivered (not placed and unpaid, cancelled or refunded)
  planned        ledger rows planned in the period: one per message, however
                 often it was tried or resent
  sent           the server accepted it
  failed         refused for good, out of attempts, a template error, or
                 closed as failed by an operator after a try
  hard bounces   of the failed, those whose reply says the address does not
                 exist (the address is now suppressed)
  cancelled      closed as failed by an operator (`kembali ledger close`)
                 before any try: cancelled while it waited in the queue;
                 not counted as failed (shown when there are any)
  uncertain      the connection died after the message was handed over: it
                 may have arrived (`kembali ledger` decides)
  waiting        planned, claimed, sending or retry: not settled yet
  skipped        not sent, by reason (held_out: the holdout group)
  conversion     of the customers emailed (each once per campaign and step,
                 from the first email), those who bought after the email and
                 within --window-days; an order before it does not count
  revenue        those purchases, in the shop's currency only
  holdout        the same for the held-out customers (never emailed), from
                 when their email was due
  against        every customer not held out, emailed or not, from when the
                 email was due: what the holdout is compared with
  still inside the window
                 customers whose window had not closed at the period's end:
                 left out of the counts above, not counted as no order
  lift           against's rate minus the holdout's, in percentage points,
                 with its 95% interval
  verdict        "sample too small to tell" under 30 customers, or 5
                 conversions or non-conversions, in a group; else whether
                 the 95% interval is above, below or across zero
  deliverability
                 addresses added to the suppression list in the period, by
                 reason (unsubscribed, hard_bounce…)
  repeat purchase rate
                 of the customers who bought in the period, those with two
                 purchases or more in all
  churn          of the customers who had bought before the period, those
                 who did not buy in it
  feedback       ratings given in the period: average, and NPS (0-10 scale);
                 on the star scale, scores out of 10 (requests sent before
                 the scale changed) are left out of the average, and counted

""",
    "insights": """\
figures: a purchase is an order paid, shipped or delivered
  customers have bought
                 customers with a purchase, and those with a second one
  days from the first to the second purchase
                 per customer who bought again, the whole days passed (day
                 10: from 10 days to just under 11)
  median         half the second purchases came by then
  recommended    the least whole days within which --share of the second
                 purchases came: a first win-back email that late follows
                 them (customers yet to come back are not in the sample)
  after a win-back email
                 second purchases that came after a win-back email to the
                 customer: it may have brought them on

""",
}
"""What each figure of the command's report counts, before its examples in its --help."""


EXAMPLES: dict[str, tuple[str, ...]] = {
    "demo": ("kembali demo", "kembali demo --out /tmp/demo --customers 1000 --now 2027-02-20T10:00+07:00"),
    "db": ("kembali db upgrade", "kembali --config /etc/kembali/config.toml db status"),
    "import": ("kembali import customers customers.csv", "kembali import products products.csv",
               "kembali import orders <(gunzip -c orders.csv.gz)"),
    "run": ("kembali run --once        # from cron", "kembali run               # the daemon (systemd: deploy/)"),
    "suppress": ("kembali suppress add budi@example.com --reason complaint", "kembali suppress remove budi@example.com",
                 "kembali suppress list --reason unsubscribed > unsubscribed.csv",
                 "kembali suppress import bounces.txt --reason hard_bounce"),
    "preview": ("kembali preview", "kembali preview --at 2027-02-28T10:00+07:00 --campaign winback --limit 20",
                "kembali preview --customer C-1042 --out /tmp/preview", "kembali preview --json | jq .",
                "kembali preview --serve", "kembali preview --serve --port 0"),
    "check": ("kembali check", "kembali check --json"),
    "send-test": ("kembali send-test --campaign winback --to you@shop.example",
                  "kembali send-test --campaign feedback --customer C-1042 --to you@shop.example"),
    "stats": ("kembali stats", "kembali stats --since 2027-01-01 --window-days 14 --json",
              "kembali stats --since 2027-01-01 --now 2027-02-01T00:00+07:00"),
    "insights": ("kembali insights", "kembali insights --share 0.9 --plot gaps.png"),
    "ledger": ("kembali ledger list", "kembali ledger list --status failed --campaign winback --json",
               "kembali ledger resend 42 43 --reason 'server fixed'", "kembali ledger close 44 --as sent"),
}
"""Each command's examples, at the end of its --help (a test parses each)."""


class _KeepExamples(argparse.HelpFormatter):
    """Wraps the description as argparse does, but keeps the examples' lines as they are."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(("examples:\n", "figures:")):
            return text
        return super()._fill_text(text, width, indent)


class _Version(argparse.Action):
    """``--version``: ``kembali 0.1.0 (schema 0020)``, read when asked (the migrations, not a database)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        from importlib.metadata import version

        from worker.adapters import db

        print(f"kembali {version('kembali')} (schema {db.newest_revision()})")
        parser.exit()


_CONFIG_HELP = "the config file (default: $KEMBALI_CONFIG or ./config.toml)"
_LOG_LEVEL_HELP = ("the log level of this command, one of debug, info, warning, error (default: the config's "
                   "[logging] level; the demo's: warning); logs go to stderr, results to stdout")


def _config_after_the_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``--config`` and ``--log-level`` are taken after a command too (``kembali preview --config
    demo-out/config.toml``, as operators type it), in every command and action; given there, they win over the
    same option given before the command."""
    for parser in set(sub.choices.values()):
        parser.add_argument("--config", type=arguments.path, default=argparse.SUPPRESS, metavar="FILE",
                            help=_CONFIG_HELP)
        parser.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, metavar="LEVEL",
                            help=_LOG_LEVEL_HELP)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _config_after_the_command(action)


def _date_arg(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}{_out_of_range(exc)}") from None


def _out_of_range(exc: ValueError) -> str:
    """`` (day is out of range for month)``: what is wrong with a date written in the right form (30 February, hour
    24); nothing for a text of another form (Python's own words for it only repeat the text). An offset of a day or
    more (``+25:00``), which Python says with timedelta reprs, in the operator's words."""
    if "offset must be a timedelta" in str(exc):
        return " (an offset is less than 24 hours, e.g. +07:00)"
    return "" if "isoformat" in str(exc) else f" ({exc})"


def _datetime_arg(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date-time: {text!r}{_out_of_range(exc)}") from None
    if value.tzinfo is None:
        example = text if "T" in text else f"{text}T10:00"  # a date alone takes no offset: give it a time
        raise argparse.ArgumentTypeError(f"give an offset, e.g. {example}+07:00")
    try:
        utc: datetime | None = value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+14:00 is before year 1 in UTC
        utc = None
    if utc is None or not _EARLIEST <= utc < _LATEST:  # planning and local times reach a year or so around it
        raise argparse.ArgumentTypeError(f"out of range: {text!r} (give a moment from {_EARLIEST:%Y-%m-%d %H:%M} UTC "
                                         f"to the end of {_LATEST.year - 1})")  # UTC: 1900-01-01T00:00+14:00 is before
    return utc


_EARLIEST, _LATEST = datetime(1900, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)


def _share_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0 and less than 1, not {text}")
    return value


def _address_arg(text: str) -> str:
    try:
        return arguments.mail_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit: a reader gone by then is caught below, not printed as a traceback
        return code
    except KeyboardInterrupt as exc:  # before or after the command's own work (``_command`` says which it was)
        sig = stopping.stop_signal(exc)
        print(f"kembali: stopped by {sig.name}", file=sys.stderr)
        return 128 + sig.value
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe or socket broke: not the operator's `| head`
            raise
        # what kembali printed had no reader left (`kembali preview | head`): stop quietly, as cat or grep do
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        # `kembali suppress list > backup.csv` on a full disk: the output is cut short, which the operator must know
        # (a write error names no file: the output, or a file the command writes, such as preview's --out)
        why = os.strerror(exc.errno)
        print(f"kembali: could not write: {why[:1].lower() + why[1:]} (what it printed, or a file it wrote, is cut "
              "short)", file=sys.stderr)  # fmt: skip
        with contextlib.suppress(OSError):
            sys.stdout.flush()  # what it holds, if it can
        _discard_stdout()
        return EXIT_ATTENTION


_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})
"""Why a write can fail where it goes: a full disk or quota, a file too big, a device's error."""


def _discard_stdout() -> None:
    """Standard output to /dev/null from here on: the unwritten rest, flushed at exit, goes nowhere (not to a
    traceback of its own)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe or socket whose reader has closed it."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is no file (a test's capture)
        return False


def _main(argv: Sequence[str] | None) -> int:
    """Commands stop where they stand, by Ctrl-C's KeyboardInterrupt or SIGTERM's ``stopping.Terminated`` raised
    there, and say which signal stopped them (SIGTERM killed them without a word). ``run --once``, ``import`` and
    ``demo`` take both signals themselves while they send or read the file, to stop gracefully and say how far they
    got; before that (the demo building its shop, an orders import counting spend totals again) they stop as the
    others do. The daemon takes them from its first steps (``StartupSignals``), to exit 0."""
    args = _parser().parse_args(argv)
    if args.command == "run" and not args.once:
        return _command(args)
    with stopping.sigterm_raises():
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    # named by the operator (the option or $KEMBALI_CONFIG), or the default: only the demo tells them apart
    args.config_named = args.config is not None or "KEMBALI_CONFIG" in os.environ
    args.config_given = args.config is not None  # on the command line, not by $KEMBALI_CONFIG
    settings: Settings | None = None
    if args.config is None:
        named = os.environ.get("KEMBALI_CONFIG")
        if named == "":  # Path("") is the current folder: an unexpanded variable would read as "is a folder"
            print("kembali: configuration error: $KEMBALI_CONFIG is set but empty: name the config file in it, or "
                  f"unset it to read ./{DEFAULT_CONFIG}", file=sys.stderr)
            return EXIT_USAGE
        args.config = Path(named or DEFAULT_CONFIG)
    log.choose_level(args.log_level)  # over [logging] level for the whole command (a daemon's reloads too)
    try:
        if args.command == "demo":
            from worker.commands import demo

            return demo.run(args)
        if not args.config.exists() and not args.config_named:  # a first try in a new folder: say how to begin
            raise ConfigError(f"{args.config}: config file not found in {Path.cwd()}; copy the project's config.toml "
                              "(every key explained) and templates/ here, or give --config FILE")
        settings = load_settings(args.config)
        from worker.adapters import db

        db.check_url(settings)
        log.configure(settings.logging.level, settings.logging.format)
        handler = _COMMANDS[args.command]
        code: int = handler(settings, args)
        return code
    except ConfigError as exc:
        # one found after the file was read (the database URL, a templates folder that is not there, a web port
        # taken) is named with its key's line, as the loader's own are (which, naming their line already, it leaves)
        message = naming_the_line(str(exc), settings) if settings is not None else str(exc)
        return _failed(args, settings, f"configuration error: {_naming_the_variable(message, args)}", EXIT_USAGE,
                       log_format=exc.log_format)
    except SchemaError as exc:
        # the upgrade it advises with this command's --config, when it had one: the bare command, run where the
        # operator stands, looks for ./config.toml there (and a service's config is rarely in the operator's folder)
        return _failed(args, settings, exc.telling(args.config if args.config_given else None), EXIT_UNAVAILABLE)
    except KembaliError as exc:
        return _failed(args, settings, str(exc), EXIT_ATTENTION)
    except KeyboardInterrupt as exc:  # unwound: a transaction under way rolled back, a helper process stopped
        sig = stopping.stop_signal(exc)
        if _json_log(args, settings):  # `run --once` stopped in its start-up: one line the log collector reads
            print(log.json_event_line("command_stopped", logging.WARNING, signal=sig.name, exit_code=128 + sig.value),
                  file=sys.stderr)  # fmt: skip
        else:
            print(f"kembali {args.command}: stopped by {sig.name}", file=sys.stderr)
        return 128 + sig.value
    except OSError as exc:
        if exc.errno not in _USAGE_ERRNOS:
            raise
        # a file or folder given on the command line or in the config, or a port already taken: say which
        said = _os_error_text(exc, args)
        return _failed(args, settings, said.lstrip().removeprefix(": "), EXIT_USAGE, plain=f"kembali{said}")
    except Exception as exc:
        reason = _database_failure(exc)
        if reason is None:
            if not _json_log(args, settings):
                raise
            # a service's unforeseen error: one JSON line, its traceback in it, not a dozen lines no collector parses
            print(log.json_event_line("command_failed", message=f"unexpected error: {log.error_line(exc)}",
                                      exit_code=EXIT_ATTENTION, exc=exc), file=sys.stderr)  # fmt: skip
            return EXIT_ATTENTION
        from worker.adapters import db

        # the schema was there when the command began: the database went away, or another writer held it longer
        # than SQLite waits (30 s), or a PostgreSQL host stopped answering (a connect timeout)
        where = f" {db.describe_url(settings.database_url)}" if settings is not None else ""  # (demo: its own)
        return _failed(args, settings, f"the database{where} could not be used: {reason}", EXIT_UNAVAILABLE)


def _json_log(args: argparse.Namespace, settings: Settings | None) -> bool:
    """Whether what the command says on stderr is JSON lines: ``run``'s once its config, read, asks for JSON logs
    (``_failed``)."""
    return args.command == "run" and settings is not None and settings.logging.format == "json"


def _failed(args: argparse.Namespace, settings: Settings | None, message: str, code: int,
            plain: str | None = None, log_format: str | None = None) -> int:
    """Say on stderr why the command failed (``kembali: message``, or ``plain``) and return ``code``. ``run``'s (a
    service's, whose stderr a log collector reads) is the event ``command_failed`` when its config, read, asks for
    JSON logs: one JSON line, a reason of several lines (libpq's hint) whole in it; or when a config refused asked
    for them (``log_format``). Before the config is read the format is not known: plain text."""
    if log_format is None and settings is not None:
        log_format = settings.logging.format
    if args.command == "run" and log_format == "json":
        print(log.json_event_line("command_failed", message=message, exit_code=code), file=sys.stderr)
    else:
        print(plain or f"kembali: {message}", file=sys.stderr)
    return code


def _os_error_text(exc: OSError, args: argparse.Namespace) -> str:
    """What is wrong with which path, in words (``kembali insights: charts/gaps.png: no such folder: charts``), not
    Python's ``[Errno 2] No such file or directory: '…'``; a port's error as it is."""
    if exc.filename is None or not exc.strerror:
        return f": {exc}"
    path = Path(os.fsdecode(exc.filename))
    if exc.errno == errno.ENOENT and not path.parent.is_dir():
        why = f"no such folder: {path.parent}"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR) and path.is_file():
        why = "is a file, not a folder"
    elif exc.errno == errno.EISDIR:
        why = "is a folder, not a file"
    else:
        why = exc.strerror[:1].lower() + exc.strerror[1:]
    command = f" {args.command}" if getattr(args, "command", None) else ""
    return f"{command}: {path}: {why}"




def _naming_the_variable(message: str, args: argparse.Namespace) -> str:
    """``message`` saying that the config file came from $KEMBALI_CONFIG, when it did: set in a shell profile and
    forgotten, it would read as the operator's own mistake."""
    if args.config_named is not True or args.config_given or "KEMBALI_CONFIG" in message:
        return message
    path = f"{args.config}: "
    if message.startswith(path):
        return f"{args.config} (named by $KEMBALI_CONFIG): {message[len(path):]}"
    return f"{message} (config file {args.config}, named by $KEMBALI_CONFIG)"


def _database_failure(exc: BaseException) -> str | None:
    """The first line of the driver's reason when ``exc`` is the database failing (not a bug): else None. A
    connection the server ended is one whatever the driver's class for it (PostgreSQL's idle-in-transaction timeout,
    25P03, is psycopg's InternalError)."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is None:
        return None
    ended = isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    # a write to a standby, or with default_transaction_read_only on (25006: psycopg's InternalError), was a traceback
    read_only = isinstance(exc, sa_exc.DBAPIError) and getattr(exc.orig, "sqlstate", None) == "25006"
    if not (ended or read_only or isinstance(exc, sa_exc.OperationalError | sa_exc.TimeoutError)):
        return None
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:300]


_USAGE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                           errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EEXIST})  # fmt: skip


def _cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import exc as sa_exc

    from worker.adapters import db

    # `db upgrade` is a deploy's step before the daemon: it waits for the host as long as the daemon does
    engine = db.engine_for(settings) if args.action == "upgrade" else db.command_engine(settings)
    path = db.sqlite_path(engine)
    try:
        if args.action == "status" and path is not None and not path.parent.is_dir():  # `db upgrade` stops there
            return _cannot_open(engine, path, None)
        if args.action == "status" and path is not None and not path.exists():  # look, but do not create it
            print(f"current: (no database file at {path})  newest: {db.newest_revision()}")
            return EXIT_ATTENTION  # `db upgrade` creates it: a deploy script tells by the exit code
        try:
            current = db.current_revision(engine)
        except sa_exc.DatabaseError as exc:  # also a file that is no SQLite database ("file is not a database")
            return _cannot_open(engine, path, exc)
        if args.action == "status":
            newer = "" if not db.is_newer_than_this(engine, current) else (
                " (another program's)" if db.is_another_programs(engine) else " (newer than this kembali)")
            in_the_way = db.tables_in_the_way(engine) if current is None else []
            others = db.other_tables(engine) if current is None and not in_the_way else []
            empty = (f"(no Kembali schema; other tables, of Kembali's names: {', '.join(in_the_way)})" if in_the_way
                     else f"(no Kembali schema; other tables: {', '.join(others[:20])}"
                     f"{f', … ({len(others)} in all)' if len(others) > 20 else ''})" if others
                     else "(empty)")  # fmt: skip
            head = db.newest_revision()
            print(f"current: {current or empty}{newer}  newest: {head}  ({db.describe(engine)})")  # which, too
            # for a deploy script: 1 when `db upgrade` would migrate, 3 when it would refuse (a newer kembali's or
            # another program's schema, tables in the way), 0 when there is nothing to do
            if newer or in_the_way:
                return EXIT_UNAVAILABLE
            return EXIT_OK if current == head else EXIT_ATTENTION
        from worker.commands.progress import Progress

        # on a terminal, each revision named before it runs (on a big table one may take minutes), in a line
        # shorter than 80 columns: one that wraps is not erased by the next
        progress = Progress("migrating", every_seconds=0, rate=False)

        def migrating(n: int, total: int, revision: str, title: str) -> None:
            progress.update(n, f"of {total}: {revision} {textwrap.shorten(title, 48, placeholder='…')}")

        def waiting() -> None:
            progress.clear()
            if path is not None:  # SQLite's write lock: whose, the file does not say
                print(f"kembali: another program holds the write lock on {path} (another `kembali db upgrade` "
                      f"migrating it, a kembali run or import): waiting up to {db.SQLITE_BUSY_TIMEOUT_MS / 1000:g} s "
                      "for it to finish", file=sys.stderr, flush=True)  # fmt: skip
                return
            print(f"kembali: another `kembali db upgrade` is migrating {db.describe(engine)}: waiting for it to "
                  "finish", file=sys.stderr, flush=True)

        notes: list[str] = []
        try:
            before, after = db.upgrade(engine, waiting=waiting, migrating=migrating, noting=notes.append)
        except sa_exc.DBAPIError as exc:
            progress.done()
            refused = db.write_refused(exc, engine)
            if refused is None:
                raise
            # the migration is one transaction: rolled back whole, the database at the revision read above
            print(f"kembali: the migration of {db.describe(engine)} stopped: {refused.what}: nothing was changed, "
                  f"it is at schema {current or '(empty)'}. {refused.remedy}", file=sys.stderr)  # fmt: skip
            return EXIT_UNAVAILABLE
        finally:
            progress.done()
        if before == after:
            print(f"schema already at {after} ({db.describe(engine)})")
        else:
            print(f"schema upgraded: {before or '(empty)'} -> {after} ({db.describe(engine)})")
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return EXIT_OK
    except sa_exc.OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == db.LOCK_NOT_AVAILABLE:  # not waited for ever: workers queue behind
            print(f"kembali: the {'migration' if args.action == 'upgrade' else 'schema check'} waited "
                  f"{settings.database.lock_timeout_seconds:g} s (database.lock_timeout_seconds) for a lock another "
                  f"session holds on {db.describe(engine)} (a long report, a worker stuck in a transaction): nothing "
                  "was changed; try again, or stop the workers first", file=sys.stderr)  # fmt: skip
            return EXIT_UNAVAILABLE
        if path is not None and args.action == "upgrade" and db.sqlite_busy(exc):  # the file opened: it was read
            print(f"kembali: the migration waited {db.SQLITE_BUSY_TIMEOUT_MS / 1000:g} s for the write lock another "
                  f"program holds on {path} (a kembali run or import, another `db upgrade`): nothing was changed; "
                  "try again, or stop the workers first", file=sys.stderr)  # fmt: skip
            return EXIT_UNAVAILABLE
        return _cannot_open(engine, path, exc)
    finally:
        engine.dispose()


def _cannot_open(engine: Any, path: Path | None, exc: Any) -> int:
    from worker.adapters import db

    if path is not None and not path.parent.is_dir():
        print(f"kembali: cannot open the database {db.describe(engine)}: its folder {path.parent} does not exist: "
              "create it, or correct database.url", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    print(f"kembali: cannot open the database {db.describe(engine)}: {db.connect_failure(engine, exc) or exc.orig}",
          file=sys.stderr)  # fmt: skip
    # a SQLite path is the config's to fix; a server that does not answer (not up yet) may later, as for every command
    return EXIT_USAGE if path is not None else EXIT_UNAVAILABLE


def _cmd_import(settings: Settings, args: argparse.Namespace) -> int:
    from worker.commands.importing import STDIN, import_file

    # '-' as written: a Path reads './-' (a file of that name) as '-' too
    path = STDIN if args.file == "-" else Path(args.file)
    return import_file(settings, args.kind, path, check_dns=args.check_dns)


def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    if args.once:
        from worker.commands import running

        return running.once(settings)
    from worker.stopping import StartupSignals

    # before the second of imports below: a SIGTERM or SIGHUP would otherwise kill the daemon where it stands
    starting = StartupSignals().install()
    from worker.commands import running

    return running.forever(settings, config_path=args.config, starting=starting)


def _cmd_suppress(settings: Settings, args: argparse.Namespace) -> int:
    from worker.commands.suppressing import suppress

    return suppress(settings, args)


def _cmd_preview(settings: Settings, args: argparse.Namespace) -> int:
    # each mode's options refused in the other, not ignored (`--serve --campaign winback` served every campaign,
    # `--port 0` without --serve ran the dry run)
    dry_run_only = {"--at": args.at, "--campaign": args.campaign, "--customer": args.customer,
                    "--limit": args.limit, "--json": args.json, "--out": args.out}  # fmt: skip
    given = [name for name, value in dry_run_only.items() if value not in (None, False)]
    if args.serve and given:
        print(f"kembali preview: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} for the dry run, not "
              "--serve (its page shows every campaign x language x sample customer): leave one or the other out",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    if args.port is not None and not args.serve:
        print("kembali preview: --port is the live page's port: add --serve for the page, or leave --port out for "
              "the dry run", file=sys.stderr)
        return EXIT_USAGE
    if args.serve:
        from worker.commands.serving import serve

        return serve(settings, args.port)
    from worker.commands.previewing import preview

    return preview(settings, args)


def _cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from worker.commands.checking import check

    return check(settings, args)


def _cmd_send_test(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import Deps
    from worker.commands.sendtest import send_test

    deps = Deps.build(settings)
    try:
        return send_test(deps, args)
    finally:
        deps.close()


def _cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from worker.commands.reporting import stats_command

    return stats_command(settings, args)


def _cmd_insights(settings: Settings, args: argparse.Namespace) -> int:
    from worker.commands.reporting import insights_command

    return insights_command(settings, args)


def _cmd_ledger(settings: Settings, args: argparse.Namespace) -> int:
    from worker.commands import ledger

    return ledger.run(settings, args)


_COMMANDS: dict[str, Any] = {
    "stats": _cmd_stats,
    "insights": _cmd_insights,
    "send-test": _cmd_send_test,
    "check": _cmd_check,
    "ledger": _cmd_ledger,
    "db": _cmd_db,
    "import": _cmd_import,
    "run": _cmd_run,
    "preview": _cmd_preview,
    "suppress": _cmd_suppress,
}

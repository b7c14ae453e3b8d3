"""`kembali demo`: a whole cycle on a generated shop, against a local SMTP sink, inside one folder."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import secrets
import shlex
import shutil
import sys
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser
from pathlib import Path

from worker import log
from worker.adapters import db, opstore
from worker.adapters.sink import SmtpSink
from worker.app import Deps, link_key_missing, link_keys
from worker.commands import running
from worker.commands.importing import EXIT_INTERRUPTED, EXIT_TERMINATED, import_file
from worker.commands.progress import SendProgress
from worker.config import DEFAULT_CONFIG, NAME_NOT_SHOWN, Settings, load_settings, shown_env_name
from worker.demo import generate_shop, write_csvs
from worker.errors import ConfigError
from worker.testing import FakeClock

EXIT_USAGE = 2

PROJECT = Path(__file__).resolve().parent.parent.parent
"""The project's folder, with the shipped config.toml and templates/email/ (a source checkout or editable install)."""


def config_path(given: Path, *, named: bool) -> Path:
    """The config the demo reads: the one ``named`` (by --config or $KEMBALI_CONFIG), or ./config.toml, or, when
    that is missing too, the project's shipped one."""
    if named or given.exists():
        return given
    shipped = PROJECT / DEFAULT_CONFIG
    if shipped.is_file() and (PROJECT / "templates" / "email").is_dir():
        print(f"(demo) no {given} in this folder: using the project's, {shipped}")
        return shipped
    raise ConfigError(f"{given}: config file not found; kembali demo needs a config.toml and its templates "
                      "(templates/email/): run it in the project's folder or give --config FILE")


MARK = ".kembali-demo"
"""The file that says a folder is the demo's: written first, so a demo stopped halfway may start over there."""


LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", "lost+found"})
"""What a folder that looks empty holds: a file manager's notes (macOS Finder's, Windows Explorer's), a mounted
volume's lost+found; the demo writes none of them, and leaves them be."""


def not_the_demos(out: Path) -> list[str]:
    """What a folder holds when it is not one the demo made (its mark, or the database of a demo before the mark),
    sorted; nothing for a new or empty folder (``LITTER`` aside), which the demo may take."""
    if not out.is_dir() or (out / MARK).is_file() or (out / "kembali-demo.db").is_file():
        return []
    return sorted(path.name for path in out.iterdir() if path.name not in LITTER)


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        print(f"kembali demo: --out {args.out}: is a file, not a folder", file=sys.stderr)
        return EXIT_USAGE
    if held := not_the_demos(args.out):  # the shop's folder (`--out .`), a home folder: its config.toml, its sent/
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        print(f"kembali demo: --out {args.out}: holds files the demo did not write ({shown}); it would replace "
              "config.toml, data/ and sent/ there with its own: give a new or empty folder (default: demo-out)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    args.config = config_path(args.config, named=args.config_named)
    base = load_settings(args.config)
    name = base.unsubscribe.secret_env
    if missing := link_key_missing(name):
        os.environ[name] = secrets.token_urlsafe(32)
        print(f"(demo) {shown_env_name(name) or f'the variable unsubscribe.secret_env names ({NAME_NOT_SHOWN})'} "
              f"{missing}: signing links with a throwaway key")
    link_keys(base)  # a key too short stops the demo here, before it builds anything
    out = args.out.resolve()
    settings = dataclasses.replace(
        base,
        database=dataclasses.replace(base.database, url=f"sqlite:///{out / 'kembali-demo.db'}"),
        smtp=dataclasses.replace(base.smtp, host="127.0.0.1", tls="none", username=""),
        # the demo runs whenever you try it: quiet hours would hold everything until morning
        policy=dataclasses.replace(base.policy, quiet_hours_start="00:00", quiet_hours_end="00:00"),
    )
    # templates `run --once` refuses (a file missing, one that cannot be parsed) stop the demo as they stop it: here,
    # before it builds anything (they failed every message of theirs, each left failed:render_error)
    checked = Deps.build(settings, check_schema=False)  # (its engine connects to nothing: the demo's file is not made)
    try:
        running.check_template_folders(checked)
    finally:
        checked.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("a folder kembali demo made: it replaces what it wrote here each time it runs\n",
                            encoding="utf-8")
    for stale in ("kembali-demo.db", "kembali-demo.db-wal", "kembali-demo.db-shm"):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "sent", ignore_errors=True)
    log.configure("warning", base.logging.format)  # (--log-level chooses another)

    now = args.now or datetime.now(UTC)
    shop = generate_shop(seed=args.seed, customers=args.customers, now=now)
    files = write_csvs(shop, out / "data", shop_tz=settings.shop.time_zone)
    print(f"demo shop: {len(shop.customers)} customers, {len(shop.products)} products, "
          f"{len(shop.orders)} orders, written to {out / 'data'}")

    engine = db.engine_for(settings)
    db.upgrade(engine)
    engine.dispose()
    for kind in ("customers", "products", "orders"):
        code = import_file(settings, kind, files[kind], now=now, again="kembali demo: stopped before sending "
                           "anything; run it again to start over.")
        if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):  # Ctrl-C or SIGTERM: the operator's, not only the import's
            return code

    sink = SmtpSink(folder=out / "sent")
    report, received, left = asyncio.run(_cycle_with_sink(settings, sink, FakeClock(now) if args.now else None))
    print()
    for line in running.summary(report, left, settings.shop.time_zone, settings.resolve(settings.templates.dir)):
        print(line)
    print(f"the local SMTP sink received {len(received):,} messages, saved as .eml files in {out / 'sent'}")
    parser = BytesParser(policy=policy.default)
    for message in received[:5]:
        parsed = parser.parsebytes(message.data, headersonly=True)
        print(f"  to {parsed['To']}: {parsed['Subject']}")
    if len(received) > 5:
        print(f"  … and {len(received) - 5:,} more")
    stopped = running.stopped_code(report)
    if stopped is not None:  # Ctrl-C or SIGTERM while it planned or sent: what it did, and what it left
        print(f"kembali demo: stopped by {report.stopped_by}: {left.messages} planned "
              f"message{'s' if left.messages != 1 else ''} not sent; run it again to start over")
    demo_config = _write_demo_config(args.config, settings, out)
    print(f"\ndatabase: {out / 'kembali-demo.db'}")
    if demo_config:
        look = f"{_command()} --config {shlex.quote(str(demo_config))} preview"
        print(f"look around: {look}   (the demo's settings, its database)")
    if stopped is not None:
        return stopped
    if report.dispatched.outcomes.get("sent", 0) != len(received):  # the sink and the ledger disagree
        return running.EXIT_ATTENTION
    return running.exit_code(report)  # as run --once: 1 for a message failed or uncertain, 3 when none got through


def _command() -> str:
    """How to call kembali from here: ``kembali`` when that name finds this installation, else its script's path
    (README's first command is ``.venv/bin/kembali demo``, the venv not activated: ``kembali`` alone is not found)."""
    script = Path(sys.executable).parent / "kembali"
    found = shutil.which("kembali")
    if not script.is_file() or (found is not None and Path(found).resolve() == script.resolve()):
        return "kembali"
    return shlex.quote(str(script))


def _write_demo_config(source: Path, settings: Settings, out: Path) -> Path | None:
    """The operator's config with the demo database and absolute template folder, for follow-up commands."""
    text = source.read_text(encoding="utf-8")
    text, n_db = re.subn(r'(?m)^(\[database\][^\[]*?^url\s*=\s*)"[^"]*"', rf'\g<1>"{settings.database_url}"', text)
    templates = settings.resolve(settings.templates.dir).resolve()
    text, n_tpl = re.subn(r'(?m)^(\[templates\][^\[]*?^dir\s*=\s*)"[^"]*"', rf'\g<1>"{templates}"', text)
    if not (n_db and n_tpl):
        return None
    path = out / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


async def _cycle_with_sink(
    settings: Settings, sink: SmtpSink, clock: FakeClock | None = None
) -> tuple[running.CycleReport, list, opstore.Waiting]:  # type: ignore[type-arg]
    """The cycle's report, what the sink received, and how many planned messages are left unsent. A first SIGINT
    or SIGTERM stops it as it stops ``run --once``: the sends under way finish, the rest is left planned."""
    await sink.start()
    try:
        live = dataclasses.replace(settings, smtp=dataclasses.replace(settings.smtp, port=sink.port))
        print(f"local SMTP sink listening on 127.0.0.1:{sink.port}", file=sys.stdout)
        deps = Deps.build(live)
        if clock is not None:
            deps.clock = clock
        sending = SendProgress(running.due_now(deps))
        try:
            report = await running.stoppable(deps, observer=sending)
            left = opstore.waiting(deps.store, deps.clock.now())  # due now or later
        finally:
            sending.progress.done()
            deps.close()
    finally:
        await sink.stop()
    return report, list(sink.messages), left

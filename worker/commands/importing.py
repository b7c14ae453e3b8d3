"""`kembali import`: stream a CSV through the validator into the store, batch by batch."""

from __future__ import annotations

import signal
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import sqlalchemy as sa

from worker import stopping
from worker.adapters import db, shop
from worker.adapters.importer import (
    BIRTHDAY_LEFT_OUT,
    LOCALE_LEFT_OUT,
    SHARED_ADDRESS,
    ZONE_LEFT_OUT,
    NoRoomForCopy,
    ReadPosition,
    RowError,
    file_name,
    numbered_customers,
    numbered_orders,
    numbered_products,
)
from worker.adapters.store import Store
from worker.commands.progress import Progress
from worker.config import Settings
from worker.domain import OrderRecord
from worker.errors import ImportRowError
from worker.log import mask_emails, printable
from worker.stopping import Terminated

BATCH = 1000
EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM
MAX_UNKNOWN_WARNINGS = 20
"""Order lines naming an unknown product that are each shown; the rest are counted in one line at the end."""
MAX_FOLLOWED_NOTES = 20
"""Customers whose new address was suppressed as their old one is (``shop.Followed``) that are each named; the
summary counts them all."""
_WISH = {"unsubscribed": "unsubscribed as {old}", "complaint": "reported an email to {old} as spam"}
"""What a customer did at the address a suppression followed them from, by its reason (``store.CUSTOMERS_OWN``)."""


def _reader(
    kind: str, path: Path, settings: Settings, check_dns: bool, warn: Callable[[str], None], now: datetime,
    on_first_read: Callable[[int], None], position: ReadPosition,
) -> Iterator[tuple[int, int, Any]]:
    if kind == "customers":
        return numbered_customers(path, check_dns=check_dns, on_warning=warn, shop_tz=settings.shop.time_zone,
                                  shop_locale=settings.shop.default_locale, now=now, position=position)
    if kind == "products":
        return numbered_products(path, on_warning=warn, shop_tz=settings.shop.time_zone,
                                 shop_currency=settings.shop.currency, position=position)
    return numbered_orders(path, on_warning=warn, shop_tz=settings.shop.time_zone,
                           shop_currency=settings.shop.currency, now=now, on_first_read=on_first_read,
                           position=position)


def _stop_now(stop: type[KeyboardInterrupt]) -> Callable[[int, FrameType | None], None]:
    """A handler that stops the import at once (``KeyboardInterrupt``, ``Terminated``), but not while a batch is
    being written (``stopping.stops_held``): one arriving then waits until the batch is committed and counted, so
    that the import says exactly what is in. Raised at once, it could land after the commit and before the count,
    and the import would say the batch is not in when it is. A second one while a batch is written stops at once."""

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.raise_stop(stop)

    return on_signal


AGAIN = "Import the file again to finish: the rows already imported are left unchanged."


STDIN = Path("/dev/stdin")
"""The file ``kembali import KIND -`` reads."""


def import_file(
    settings: Settings, kind: str, path: Path, *, check_dns: bool = False, now: datetime | None = None,
    again: str = AGAIN,
) -> int:
    """Import ``path``: the exit code (``EXIT_INTERRUPTED``/``EXIT_TERMINATED`` when a signal stopped it, after saying
    how far it got and then ``again``, what to do about it). ``now`` (default: the clock) is when it happens: an
    order placed after it, or a customer born after its day, is rejected."""
    # standard input (`kembali import KIND -`, as `suppress import -` reads it): its rows are named 'stdin:LINE'
    shown = "standard input" if path == STDIN else str(path)
    if path == STDIN and not path.exists():  # closed (`<&-`) or not given to the process
        print("kembali import: -: standard input ('-') is closed: pipe or redirect the CSV into the command",
              file=sys.stderr)
        return EXIT_USAGE
    if path.is_dir() or not path.exists():  # a pipe is read as a file: <(gunzip -c customers.csv.gz), /dev/stdin
        print(f"kembali import: {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}", file=sys.stderr)
        return EXIT_USAGE
    store = Store(db.engine_for(settings))
    db.check_schema(store.engine)
    if path == STDIN and sys.stdin.isatty():  # typed by hand, or a pipe forgotten: say what it waits for
        print(f"kembali import: reading {kind} CSV from standard input (end with Ctrl-D)", file=sys.stderr)
    now = now or datetime.now(UTC)
    if kind == "orders":  # the totals this import adds to must count the shop's currency first
        recount = shop.settle_spend_currency(store.engine, settings.shop.currency, now)
        if recount is not None and recount.was is not None:
            print(f"note: shop.currency is {settings.shop.currency}, the customers' spend totals counted "
                  f"{recount.was}: counted again in {settings.shop.currency} ({recount.changed} changed)",
                  file=sys.stderr)  # fmt: skip
        if recount is not None:
            for warning in shop.too_large_warnings(recount, settings.shop.currency):
                print(f"warning: {printable(warning)}", file=sys.stderr)
    lines: dict[str, int] = {}
    """The line each record of the batch starts on, by external id (the batch's messages name it)."""

    unknown: set[str] = set()
    unknown_lines = 0
    name = file_name(path)  # as the rows are named: customers.csv, stdin, /dev/fd/63
    progress = Progress(f"importing {kind} from {name}")
    position = ReadPosition()
    """How much of the file is read, of its size (a line's length varies, their number is not known ahead)."""

    def say(text: str) -> None:  # on stderr, on a line of its own (not after the progress line)
        progress.clear()
        print(text, file=sys.stderr)

    def note_unknown(order: str, product: str) -> None:
        nonlocal unknown_lines
        unknown_lines += 1
        unknown.add(product)
        if unknown_lines <= MAX_UNKNOWN_WARNINGS:  # orders imported before products: one line each would flood
            say(f"warning: {name}:{lines.get(order, 0)}: order {order!r}: unknown product {product!r} (kept; "
                "linked when the product is imported)")  # fmt: skip

    followed = 0

    def note_followed(moved: shop.Followed) -> None:
        nonlocal followed
        followed += 1
        if followed <= MAX_FOLLOWED_NOTES:  # addresses masked, as logs show them
            old, new = mask_emails([moved.old, moved.new])  # told apart when they mask alike (budi@, budi.santoso@)
            wish = _WISH.get(moved.reason, _WISH["unsubscribed"]).format(old=old)
            say(f"note: {name}:{lines.get(moved.external_id, 0)}: customer {printable(moved.external_id)!r}: "
                f"their new address {new} is suppressed too, as they {wish}")

    upsert: Callable[[Sequence[Any]], shop.UpsertCounts] = {
        "customers": lambda rs: shop.upsert_customers(store.engine, rs, now),
        "products": lambda rs: shop.upsert_products(store.engine, rs, now),
        "orders": lambda rs: shop.upsert_orders(store.engine, rs, now, on_unknown_product=note_unknown,
                                                currency=settings.shop.currency),
    }[kind]
    total = shop.UpsertCounts()
    errors = 0
    replaced: Counter[str] = Counter()
    """Rows imported with a value replaced by the safe one (``RowError.saved``), by what was replaced
    (``_saved_as``): an unclear consent saved as none; a customer beside one of the same address whose consent says
    the other; a birthday, time zone or locale that could not be one, left out."""
    foreign: Counter[str] = Counter()
    """Orders in another currency than the shop's, by currency; ``first_foreign``: the line of the first."""
    first_foreign = 0

    def warn(text: str) -> None:
        say(f"warning: {printable(text)}")  # the text names the file and line, and quotes the file

    batch: list[Any] = []
    last = saved = 0
    """The line the batch's last record ends on (an order's last row); the last line of the last batch committed."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = previous_int = None
    if on_main_thread:
        previous = signal.signal(signal.SIGTERM, _stop_now(Terminated))
        previous_int = signal.getsignal(signal.SIGINT)
        if previous_int is signal.default_int_handler:  # not when SIGINT is ignored (a shell's background job)
            signal.signal(signal.SIGINT, _stop_now(KeyboardInterrupt))
    try:
        first_read = True
        """Until the first row is yielded: an orders import reads the file once before (``numbered_orders``)."""
        rejected_line = -1
        """The line of the last rejected row: each of its faults is said, the row counted once."""

        def checked(end: int) -> None:  # that first read's progress, on the import's line
            progress.update(end, "lines checked for orders whose rows are apart", bytes_of=position)

        for line, end, item in _reader(kind, path, settings, check_dns, warn, now, checked, position):
            if first_read:  # the import's progress is drawn at once, in place of the first read's
                first_read = False
                progress.clear()
                progress.restart()
            if isinstance(item, RowError) and item.saved:
                replaced[_saved_as(item.reason)] += 1
                say(f"warning: {printable(str(item))}")
                continue
            if isinstance(item, RowError):
                errors += item.line != rejected_line  # a row of two faults (an order's) is one rejected row
                rejected_line = item.line
                say(f"rejected {printable(str(item))}")
                continue
            batch.append(item)
            lines[item.external_id] = line
            if isinstance(item, OrderRecord) and item.currency != settings.shop.currency:
                foreign[item.currency] += 1
                first_foreign = first_foreign or line
            last = end
            if len(batch) >= BATCH:
                with stopping.stops_held():
                    errors += _flush(upsert, batch, lines, total, path, say, note_followed)
                    saved = last
            progress.update(end, f"lines read, {errors} rejected", bytes_of=position)
        with stopping.stops_held():
            errors += _flush(upsert, batch, lines, total, path, say, note_followed)
            saved = last
    except ImportRowError as exc:
        progress.done()
        print(f"kembali import: {printable(name)}: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except NoRoomForCopy as exc:  # before any row is read: nothing is imported
        progress.done()
        print(f"kembali import: {printable(shown)}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, sa.exc.DBAPIError) as exc:  # each batch is one transaction, and a stop waits for
        # the one being written; a batch the database failed (a lock wait past database.lock_timeout_seconds, the
        # session ended by the server: idle in a transaction too long, pg_terminate_backend; the server gone) is
        # rolled back whole, the batches before it are in
        progress.done()
        done = f"{name} is imported up to line {saved}, the rows after it are not" if saved else (
            f"none of {name} is imported")
        failure = None if isinstance(exc, KeyboardInterrupt) else db.write_failure(exc, store.engine,
                                                                                   settings.database)
        why = f"stopped by {stopping.stop_signal(exc).name}" if isinstance(exc, KeyboardInterrupt) else (
            f"stopped: {failure.what}" if failure else "stopped: the database failed")
        remedy = f" {failure.remedy}" if failure else ""
        print(
            f"kembali import: {why}: {done} ({total.created:,} created, {total.updated:,} updated, "
            f"{total.unchanged:,} unchanged, {errors:,} rejected{_unclear(replaced)}{_followed(followed)})."
            f"{remedy} {again}",
            file=sys.stderr,
        )
        if not isinstance(exc, KeyboardInterrupt):
            raise  # said as for any command: which database, why, exit 3 (try again later)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
            if previous_int is signal.default_int_handler:
                signal.signal(signal.SIGINT, previous_int)
        progress.done()
        store.close()
        if unknown_lines > MAX_UNKNOWN_WARNINGS:
            print(f"warning: {name}: {unknown_lines} order lines in all name {len(unknown)} products not "
                  f"imported (the first {MAX_UNKNOWN_WARNINGS} are shown above); they are kept and linked when "
                  "the products are imported: import products.csv", file=sys.stderr)  # fmt: skip
        if followed > MAX_FOLLOWED_NOTES:
            print(f"note: {name}: {followed} customers in all have a new address suppressed as their old one "
                  f"is (the first {MAX_FOLLOWED_NOTES} are named above): `kembali suppress list` shows each, its "
                  "source naming the customer and the address they moved from", file=sys.stderr)  # fmt: skip
        if foreign:
            print(f"warning: {name}: {foreign.total()} orders are in another currency than the shop's "
                  f"{settings.shop.currency} ({', '.join(f'{c} {n}' for c, n in sorted(foreign.items()))}; the first "
                  f"on line {first_foreign}): they count as orders, but not toward spend milestones nor the revenue "
                  "stats shows (Kembali converts no currency)", file=sys.stderr)  # fmt: skip
    print(
        f"{kind}: {total.created:,} created, {total.updated:,} updated, {total.unchanged:,} unchanged, "
        f"{errors:,} rejected{_unclear(replaced)}{_followed(followed)} (from {shown})"
    )
    return EXIT_REJECTED if errors or replaced.total() else EXIT_OK


_SAVED = (
    ("unclear", "with an unclear marketing_consent"),
    ("shared", "sharing an address with another marketing_consent"),
    ("birthday", "imported without their birthday"),
    ("time_zone", "imported without their time_zone"),
    ("locale", "imported without their locale"),
)
"""What a saved row's value replaced is counted as (``_saved_as``), and the summary's words for it, in its order."""


def _saved_as(reason: str) -> str:
    if SHARED_ADDRESS in reason:
        return "shared"
    for left_out, column in ((BIRTHDAY_LEFT_OUT, "birthday"), (ZONE_LEFT_OUT, "time_zone"),
                             (LOCALE_LEFT_OUT, "locale")):  # fmt: skip
        if reason.endswith(left_out):
            return column
    return "unclear"


def _unclear(replaced: Counter[str]) -> str:
    return "".join(f", {replaced[kind]:,} {words}" for kind, words in _SAVED if replaced[kind])


def _followed(count: int) -> str:
    """The summary's words for the customers whose new address was suppressed as their old one is."""
    if not count:
        return ""
    return f", {count:,} new address{'es' if count > 1 else ''} suppressed (following an unsubscribe at the old one)"


def _flush(
    upsert: Callable[[Sequence[Any]], shop.UpsertCounts],
    batch: list[Any],
    lines: dict[str, int],
    total: shop.UpsertCounts,
    path: Path,
    say: Callable[[str], None],
    note_followed: Callable[[shop.Followed], None],
) -> int:
    """Upsert a batch; report what the database refused, by line, and the customers an unsubscribe followed to
    their new address. Empties the batch."""
    if not batch:
        return 0
    counts = upsert(batch)
    for external_id, reason in counts.rejected:
        say(f"rejected {printable(str(RowError(file_name(path), lines.get(external_id, 0), external_id, reason)))}")
    for moved in counts.followed:
        note_followed(moved)
    rejected = len(counts.rejected)
    counts.rejected.clear()
    counts.followed.clear()
    total.add(counts)
    batch.clear()
    lines.clear()
    return rejected


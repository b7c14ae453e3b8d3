"""CSV files → validated records, streamed one row at a time, with line numbers.

Each reader opens the file (UTF-8, a leading BOM tolerated), checks the header (after Excel's 'sep=,' line),
then yields a record or a ``RowError`` per row. Only the current row (and, for
orders, the current order's rows) is held in memory, plus a duplicate-id
detector of about 25 bytes per id (see ``_SeenIds``). Line numbers are the
physical line where a row starts (the header is line 1), so a quoted field
spanning lines does not shift the numbers after it. Blank lines are skipped, and so is the header's line again
(two exports joined), with a warning.
A missing required column raises ``ImportRowError`` (line 1) from the first
``next()``, before any row;
unknown columns (also given twice), and columns without a name (trailing commas), are ignored and
reported through ``on_warning``; a known column given twice raises ``ImportRowError``. A row with more
or fewer fields than the header is an error (a stray comma shifts columns), unless its fields past the header's
are all empty (a spreadsheet's trailing empty columns: they are dropped), or unless the fields it lacks are all
of columns without a name at the header's end (Excel may leave their empty fields out after the first rows), and
so is one with a field past the CSV
field limit (``unreadable``: named by its column; the reader goes on after the line it stopped on), one with a line
longer than ``MAX_LINE`` (read a piece at a time, never held whole: a JSON file is one line), and one with
bytes that are not UTF-8 or with UTF-8 text decoded in another encoding (``_not_utf8``, ``_mojibake``) in a column
that is read: an ignored column's text is not checked.
Records carry the optional columns the file lacks (``absent``): the upsert
leaves those stored values alone (see ``worker.adapters.shop``: customers'
and products' optional columns, orders' ``delivered_at``).
Column names are matched case-insensitively; values are stripped of
surrounding whitespace except ``name``, which is kept exactly as given.
Ids, ``category`` and the consent texts may hold no control character (C0,
C1), line separator or bidi control (``render.CONTROL_CHARACTERS``), nor an invisible character or a space
other than ' ' (``_no_invisible``): the row's error names its code point.
An id a spreadsheet wrote in scientific notation (``6.28123E+11``: ``_SCIENTIFIC``) is a bad row.

customers.csv
    ``id`` (required), ``email`` (required; validated and normalised by
    email-validator, the domain lowercased), ``name`` (required, not blank nor only blank letters or
    control, bidi or invisible characters, at most 200 characters, no NUL; anything else is kept: names are cleaned
    when rendered, see ``worker.core.render.clean_text``), ``locale`` (``id`` or ``en``, or a tag of either with
    its region: ``en-US``, ``id_ID``, Java's ``in_ID``; default the shop's, ``shop_locale``), ``time_zone`` (IANA;
    default the shop's, ``shop_tz``; either, when it cannot be read, is the shop's, keeping one stored before, and
    reported by a ``saved`` ``RowError`` after the record), ``birthday`` (YYYY-MM-DD, also at midnight:
    ``1990-05-01 00:00:00``,
    or empty; 29 February allowed in leap years; from 1900, and with ``now`` not after its day in the customer's
    time zone nor an age over ``MAX_AGE``: any other is left out, the customer imported without it and keeping
    one stored before, and reported by a ``saved`` ``RowError`` after the record), ``marketing_consent``
    (required: true/false, yes/no, 1/0, ya/tidak, benar/salah; anything else, empty included, is saved as False and
    reported by a ``saved`` ``RowError`` after the record; so is a customer whose address, case aside, an earlier
    one of the file has with the other answer: ``_consents_agree``), ``consent_basis`` and
    ``consent_source`` (optional text, at most 64 characters).

products.csv
    ``id`` (required), ``name`` (required), ``price`` (required, major units as
    a decimal string: ``249000`` or ``249000.50``, never parsed as float;
    ``249.000`` is refused in a currency with fewer than 3 decimals: its '.'
    is surely a thousands separator),
    ``category`` (at most 100 characters), ``currency`` (an ISO 4217 code;
    default the shop's, ``shop_currency``), ``url`` and ``image_url`` (http(s), at most 1000
    characters, no space, control, bidi or invisible character; or empty), ``launched_at`` (date or ISO 8601
    date-time, empty allowed), ``active`` (boolean; default true).

orders.csv: one row per order line, the order's columns repeated on each
    ``order_id``, ``customer_id``, ``status`` (placed, paid, shipped, delivered,
    cancelled, refunded) and ``placed_at`` (required); ``delivered_at`` (not on a
    day before ``placed_at``), ``paid_at`` (when it was paid, as the shop knows it; not on a day before
    ``placed_at``; read only when the status says paid, shipped or delivered),
    ``currency`` (default the shop's), ``total`` (major units; default the sum of the
    lines); the line: ``product_id``, ``quantity`` (integer ≥ 1),
    ``unit_price`` (major units). An order with no lines is one row with an
    empty ``product_id`` and a ``total``. Consecutive rows with the same
    ``order_id`` form one order; all of them must repeat the same order
    columns or leave them empty (then they are the first row's), and an
    order's rows must be kept together: one whose rows come back after
    another order's is skipped whole (found by a first read of the file,
    ``_scattered``), and so is one of more than ``MAX_ORDER_ROWS`` rows. Any bad row drops its whole order.

Date-times: ``2026-11-22T10:00:00+07:00``, ``2026-11-22T03:00:00Z``,
``2026-11-22 10:00`` or ``2026-11-22``. A time written ``10.30`` (as
Indonesian writes it) is refused: Python's ISO reader takes it as 10:00:00.3. Values without an offset are in the
shop's time zone (``shop_tz``); every result is aware and in UTC.

Speed: about 24,000 customer rows a second on one core, nine tenths of it in
email-validator; products and orders are faster.
"""

from __future__ import annotations

import csv
import difflib
import errno
import hashlib
import io
import os
import re
import shutil
import stat
import tempfile
import unicodedata
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TextIO, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import email_validator

from worker import money
from worker.core.render import CONTROL_CHARACTERS, INVISIBLE_CHARACTERS, clean_text
from worker.domain import (
    CustomerRecord,
    Locale,
    OrderLineRecord,
    OrderRecord,
    OrderStatus,
    ProductRecord,
    place_zones,
    zone_meant,
)
from worker.errors import ImportRowError

if TYPE_CHECKING:
    from dns.resolver import Resolver

Warn = Callable[[str], None]
"""Receives a human-readable warning (e.g. an ignored unknown column)."""

CUSTOMER_COLUMNS = (
    "id", "email", "name", "locale", "time_zone", "birthday",
    "marketing_consent", "consent_basis", "consent_source",
)  # fmt: skip
CUSTOMER_REQUIRED = ("id", "email", "name", "marketing_consent")
PRODUCT_COLUMNS = ("id", "name", "category", "price", "currency", "url", "image_url", "launched_at", "active")
PRODUCT_REQUIRED = ("id", "name", "price")
ORDER_COLUMNS = (
    "order_id", "customer_id", "status", "placed_at", "delivered_at", "paid_at", "currency", "total",
    "product_id", "quantity", "unit_price",
)  # fmt: skip
ORDER_REQUIRED = ("order_id", "customer_id", "status", "placed_at")
_REQUIRED_OF = {"customers": (CUSTOMER_REQUIRED, CUSTOMER_COLUMNS), "products": (PRODUCT_REQUIRED, PRODUCT_COLUMNS),
                "orders": (ORDER_REQUIRED, ORDER_COLUMNS)}
"""The columns each kind of file needs, and those it reads: a file with all of another kind's is that kind's (a slip
of the command); with all of two kinds', that of the kind most of its columns are."""
_ORDER_HEAD = ("customer_id", "status", "placed_at", "delivered_at", "paid_at", "currency", "total")

_PIPES = (Path("/dev/fd"), Path("/proc/self/fd"))


def file_name(path: Path) -> str:
    """How messages name the file ``path``: by its name (``customers.csv``; standard input's is ``stdin``), and a pipe
    bash gives as ``<(gunzip -c customers.csv.gz)`` by its whole path (``/dev/fd/63``): its name, ``63``, names no
    file."""
    return str(path) if path.parent in _PIPES else path.name


# the widths of the columns these values are stored in (worker/adapters/tables.py): PostgreSQL refuses a longer
# value, and with it the whole batch, so a longer value is a rejected row here (tests check they agree)
MAX_NAME = 200
MAX_ID = 100
MAX_TEXT = {"consent_basis": 64, "consent_source": 64, "category": 100}
MAX_URL = 1000
MAX_MINOR = 2**63 - 1
"""The largest amount in minor units a BIGINT column holds: a price, a total, a line's quantity times unit price."""
_TRUE = frozenset({"true", "yes", "1", "ya", "benar"})
_FALSE = frozenset({"false", "no", "0", "tidak", "salah"})
"""A boolean's words; ``benar`` and ``salah`` are TRUE and FALSE as Excel in Indonesian writes them into a CSV."""
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_AMOUNT = re.compile(r"[0-9]{1,15}(\.[0-9]{1,6})?")
_THOUSANDS = re.compile(r"[1-9][0-9]{0,2}\.[0-9]{3}")
"""An amount as a spreadsheet in an Indonesian (or German…) locale shows it, '.' separating thousands: Rp249.000."""
_CURRENCY = re.compile(r"[A-Za-z]{3}")
_SIGNED = re.compile(r"(?P<sign>Rp\.?|[A-Za-z]{3}|[$€£¥])\s*(?P<amount>[0-9][0-9,.]*)", re.IGNORECASE)
"""An amount after its currency's sign or code, as a spreadsheet's currency format shows it: Rp 1.250.000,00."""
_SEPARATORS = "without thousands separators and with '.' before decimals, such as 249000 or 249000.50"
@dataclass(frozen=True)
class RowError:
    """One rejected row: where it is, whose it is, and why."""

    file: str
    line: int
    key: str
    """The row's id, or "" when it is unknown."""
    reason: str
    saved: bool = False
    """The row was imported all the same, with the value the reason names replaced by the safe one (an unclear
    ``marketing_consent`` saved as no consent), or as given beside a customer whose consent for the same address
    says the other (``SHARED_ADDRESS``): a warning, not a rejected row."""

    def __str__(self) -> str:
        who = f" id {_show(self.key, MAX_ID)}:" if self.key else ""  # an id longer than one may be, cut short
        return f"{self.file}:{self.line}:{who} {self.reason}"


class _Invalid(Exception):
    """A value failed validation; the message names the column and the value."""


# --- public readers ------------------------------------------------------------


def read_customers(
    path: Path, *, check_dns: bool = False, shop_tz: str = "Asia/Jakarta", shop_locale: str = "id",
    on_warning: Warn | None = None, now: datetime | None = None,
) -> Iterator[CustomerRecord | RowError]:
    """Yield a ``CustomerRecord`` or a ``RowError`` per row of a customers CSV; a customer without a time zone
    gets the shop's (``shop_tz``), one without a language the shop's (``shop_locale``). With ``now``, a birthday
    after its day in the customer's time zone is a bad row."""
    return (item for _, _, item in numbered_customers(path, check_dns=check_dns, shop_tz=shop_tz,
                                                      shop_locale=shop_locale, on_warning=on_warning,
                                                      now=now))  # fmt: skip


def numbered_customers(
    path: Path, *, check_dns: bool = False, shop_tz: str = "Asia/Jakarta", shop_locale: str = "id",
    on_warning: Warn | None = None, now: datetime | None = None, position: ReadPosition | None = None,
) -> Iterator[tuple[int, int, CustomerRecord | RowError]]:
    """``read_customers`` with the lines each record starts and ends on; ``position`` follows the read."""
    resolver = email_validator.caching_resolver(timeout=10) if check_dns else None
    return _consents_agree(file_name(path), _numbered_by_id(
        path, CUSTOMER_COLUMNS, CUSTOMER_REQUIRED, on_warning,
        lambda row, key, absent: _customer(row, key, absent, check_dns, resolver, shop_tz, shop_locale, now),
        position,
    ))  # fmt: skip


SHARED_ADDRESS = "for the same address"
"""In the warning of a customer whose address another customer of the file has with the other consent."""


def _consents_agree(
    file: str, items: Iterator[tuple[int, int, CustomerRecord | RowError]]
) -> Iterator[tuple[int, int, CustomerRecord | RowError]]:
    """``items``, with a ``saved`` ``RowError`` after a customer whose address (case aside) an earlier customer of
    the file has with the other ``marketing_consent``: both are imported as given, and the mailbox of someone who
    said no gets the other one's marketing mail (or the reverse), which the shop should settle."""
    said = {True: _SeenIds(), False: _SeenIds()}
    for line, end, item in items:
        yield line, end, item
        if isinstance(item, CustomerRecord):
            address = item.email.casefold()
            said[item.marketing_consent].add(address, line)
            other = said[not item.marketing_consent].find(address)
            if other is not None:
                here, there = ("yes", "no") if item.marketing_consent else ("no", "yes")
                yield line, end, RowError(file, line, item.external_id, (
                    f"marketing_consent {here} here, {there} at line {other} {SHARED_ADDRESS} {_show(address)}: both "
                    "are imported as given, so that mailbox is one customer's who agreed and one's who did not; "
                    "make them agree and import the file again"), saved=True)  # fmt: skip


def read_products(
    path: Path, *, shop_tz: str = "Asia/Jakarta", shop_currency: str = "IDR", on_warning: Warn | None = None
) -> Iterator[ProductRecord | RowError]:
    """Yield a ``ProductRecord`` or a ``RowError`` per row of a products CSV; a price without a currency is in the
    shop's (``shop_currency``)."""
    return (item for _, _, item in numbered_products(path, shop_tz=shop_tz, shop_currency=shop_currency,
                                                     on_warning=on_warning))  # fmt: skip


def numbered_products(
    path: Path, *, shop_tz: str = "Asia/Jakarta", shop_currency: str = "IDR", on_warning: Warn | None = None,
    position: ReadPosition | None = None,
) -> Iterator[tuple[int, int, ProductRecord | RowError]]:
    """``read_products`` with the lines each record starts and ends on; ``position`` follows the read."""
    zone = ZoneInfo(shop_tz)
    return _numbered_by_id(
        path, PRODUCT_COLUMNS, PRODUCT_REQUIRED, on_warning,
        lambda row, key, absent: _product(row, key, absent, zone, shop_currency),
        position,
    )  # fmt: skip


R = TypeVar("R")


def _numbered_by_id(
    path: Path,
    columns: tuple[str, ...],
    required: tuple[str, ...],
    on_warning: Warn | None,
    build: Callable[[dict[str, str], str, frozenset[str]], tuple[R, tuple[str, ...]]],
    position: ReadPosition | None = None,
) -> Iterator[tuple[int, int, R | RowError]]:
    """One record or ``RowError`` per row of a file keyed by a unique ``id`` column. ``build`` makes the record
    from the row, its id and the optional columns the file lacks, with why it replaced or left out a value (none
    or more reasons): each is yielded after the record, as a ``RowError`` that is ``saved``."""
    seen = _SeenIds()
    with _open(path, position) as rows:
        _header(rows, path, columns, required, on_warning)
        absent = frozenset(name for name in columns if name not in rows.columns)
        for line, end, row in rows:
            if isinstance(row, _Broken):
                yield line, end, RowError(file_name(path), line, row.key, row.reason)
                continue
            key = row.get("id", "").strip()
            try:
                key = _ident(row, "id")
                _not_seen(seen, key, line, "id")
                record, replaced = build(row, key, absent)
                yield line, end, record
                for reason in replaced:
                    yield line, end, RowError(file_name(path), line, key, reason, saved=True)
            except _Invalid as exc:
                yield line, end, RowError(file_name(path), line, key, str(exc))


def read_orders(
    path: Path, *, shop_tz: str = "Asia/Jakarta", shop_currency: str = "IDR", on_warning: Warn | None = None,
    now: datetime | None = None,
) -> Iterator[OrderRecord | RowError]:
    """Yield an ``OrderRecord`` per order (its consecutive rows) or a ``RowError`` per bad row; with ``now``, an
    order placed or delivered more than a day after it is a bad row. Amounts without a currency are in the shop's
    (``shop_currency``)."""
    return (item for _, _, item in numbered_orders(path, shop_tz=shop_tz, shop_currency=shop_currency,
                                                   on_warning=on_warning, now=now))  # fmt: skip


MAX_ORDER_ROWS = 10_000
"""The most rows (lines) an order may have: its rows are held until the order is read, and an order of more is an
order_id column that holds no order's number (every row one "order"), skipped, not held whole."""
ORDER_SKIPPED = "; the whole order is skipped"
"""Said after why a row of an order could not be read (``_Broken``): none of the order's rows is imported."""


_ABOVE_SKIPPED = ("; the order above it, {current!r} from line {line}, is skipped: this row may be one of its lines (a "
                  "spreadsheet's merged cells leave them empty); write the order's columns on each of its rows")
"""Said after why a row without an ``order_id`` (empty, or a broken row's empty) right after an order's rows is
rejected."""


def numbered_orders(
    path: Path, *, shop_tz: str = "Asia/Jakarta", shop_currency: str = "IDR", on_warning: Warn | None = None,
    now: datetime | None = None, on_first_read: Callable[[int], None] | None = None,
    position: ReadPosition | None = None,
) -> Iterator[tuple[int, int, OrderRecord | RowError]]:
    """``read_orders`` with the lines each order (or bad row) starts and ends on; a rejected row of an order ends
    where the order does (none of its rows is imported).

    The file is read twice: first for the orders whose rows are not kept together (``_scattered``), which are
    skipped whole, never stored from their first rows alone; a pipe or standard input is copied to a temporary
    file for that (``_rereadable``). ``on_first_read`` is told the line each row of that first read ends on;
    ``position`` follows each read (the copy's, of a pipe)."""
    zone = ZoneInfo(shop_tz)
    group: list[tuple[int, dict[str, str]]] = []
    group_end = 0
    current = ""
    with _rereadable(path) as source:
        scattered = _scattered(source, path, on_first_read, position)
        with _open(source, position) as rows:
            _header(rows, path, ORDER_COLUMNS, ORDER_REQUIRED, on_warning)
            absent = frozenset(name for name in ORDER_COLUMNS if name not in rows.columns)
            for line, end, row in rows:
                if isinstance(row, _Broken):
                    reason = row.reason
                    if row.blank and group:  # as a row without an order_id is (below): perhaps a line of that order
                        reason += _ABOVE_SKIPPED.format(current=current, line=group[0][0])
                        group = []
                    elif row.key and row.key == current:  # a row of the order being read: none of its rows is in
                        reason += ORDER_SKIPPED if group else ""
                        group = []
                    elif row.key:  # the first row of an order: its next rows are skipped, as a dropped order's are
                        if group:
                            yield from _numbered(_order(group, file_name(path), zone, now, absent, shop_currency),
                                                 group[0][0], group_end)  # fmt: skip
                        current, group = row.key, []
                        parts = scattered.get(row.key)
                        reason += ORDER_SKIPPED if parts is None else f"; {_apart(row.key, parts)}"
                    yield line, end, RowError(file_name(path), line, row.key, reason)
                    continue
                key = row.get("order_id", "").strip()
                if not key:
                    reason = "missing order_id (required)"
                    if group:  # right after an order's rows: perhaps one of its lines, stored without it otherwise
                        reason += _ABOVE_SKIPPED.format(current=current, line=group[0][0])
                        group = []
                    yield line, end, RowError(file_name(path), line, "", reason)
                    continue
                if key == current:
                    if len(group) >= MAX_ORDER_ROWS:  # held no further: the order is skipped, its next rows unsaid
                        yield line, end, RowError(file_name(path), line, key, (
                            f"order {key!r} has more than {MAX_ORDER_ROWS:,} rows (from line {group[0][0]}), more "
                            "lines than an order has: is its order_id column the order's number? the whole order "
                            "is skipped"))  # fmt: skip
                        group = []
                    elif group:
                        group.append((line, row))
                        group_end = end
                    continue  # rows of a dropped, re-appearing order: reported once
                if group:
                    yield from _numbered(_order(group, file_name(path), zone, now, absent, shop_currency), group[0][0],
                                         group_end)  # fmt: skip
                current, group, group_end = key, [(line, row)], end
                parts = scattered.get(key)
                if parts is not None:  # said at its first rows; the rows that come back are skipped unsaid
                    group = []
                    if parts[0] == line:
                        yield line, end, RowError(file_name(path), line, key, _apart(key, parts))
            if group:
                yield from _numbered(_order(group, file_name(path), zone, now, absent, shop_currency), group[0][0],
                                     group_end)  # fmt: skip


def _apart(key: str, parts: tuple[int, int]) -> str:
    """Why the order ``key``, whose rows start at line ``parts[0]`` and come back at ``parts[1]``, is skipped."""
    return (f"order {key!r} has rows at line {parts[0]} and again at line {parts[1]}, other orders' rows between "
            f"them: keep an order's rows together (sort the file by order_id){ORDER_SKIPPED}")  # fmt: skip


class _Scattered:
    """Orders whose rows are not all consecutive: order id → the line its rows start at and the first line they come
    back at, in two ``_SeenIds`` (about 25 bytes an order each, however many there are: a file sorted by product
    has every order of two lines among them)."""

    def __init__(self) -> None:
        self._first, self._again = _SeenIds(), _SeenIds()

    def add(self, key: str, first: int, again: int) -> None:
        if self._again.add(key, again) is None:
            self._first.add(key, first)

    def get(self, key: str) -> tuple[int, int] | None:
        if not self._first:
            return None
        first = self._first.find(key)
        again = self._again.find(key)
        return None if first is None or again is None else (first, again)


def _scattered(
    source: Path, path: Path, on_line: Callable[[int], None] | None = None, position: ReadPosition | None = None
) -> _Scattered:
    """The orders of the orders file ``source`` (named ``path``) whose rows are not all consecutive (rows without an
    ``order_id`` aside), telling ``on_line`` the line each row ends on (a progress line). Held: an 8-byte digest and
    a line per order (``_SeenIds``), freed when it returns."""
    seen = _SeenIds()
    scattered = _Scattered()
    current = ""
    with _open(source, position) as rows:
        _header(rows, path, ORDER_COLUMNS, ORDER_REQUIRED, None)
        for line, end, row in rows:
            if on_line is not None:
                on_line(end)
            key = row.key if isinstance(row, _Broken) else row.get("order_id", "").strip()
            if not key or key == current:
                continue
            current = key
            first = seen.add(key, line)
            if first is not None:
                scattered.add(key, first, line)
    return scattered


@contextmanager
def _rereadable(path: Path) -> Iterator[Path]:
    """``path``, or when it is no regular file (a pipe, standard input from one) a temporary copy of what it gives,
    which can be read again; removed afterwards."""
    if path.is_file():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kembali-import-") as folder:
        copy = Path(folder) / "orders.csv"
        with path.open("rb") as given, copy.open("wb") as kept:
            try:
                shutil.copyfileobj(given, kept, 1 << 20)
                kept.flush()
            except OSError as exc:
                if exc.errno not in _NO_ROOM:  # the pipe's own error: said as such
                    raise
                raise NoRoomForCopy(f"could not be copied to a temporary file ({exc.strerror}), which orders read "
                                    "from a pipe need: set TMPDIR to a folder with room for the file, or give the "
                                    "file's path") from None  # fmt: skip
        yield copy


_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class NoRoomForCopy(Exception):
    """The temporary copy of orders read from a pipe (``_rereadable``) could not be written: why, and what to do."""


# --- rows → records --------------------------------------------------------------


def _customer(
    row: dict[str, str], key: str, absent: frozenset[str], check_dns: bool, resolver: Resolver | None,
    shop_tz: str, shop_locale: str, now: datetime | None,
) -> tuple[CustomerRecord, tuple[str, ...]]:
    """The customer, and why its consent was saved as none or its locale, time zone or birthday left out (none
    when all was read as given). A birthday that cannot be one (unreadable, impossible, a placeholder, in the
    future) rejects no customer: it is left out as if the file had no ``birthday`` column (``absent``), so a
    customer who has one stored keeps it, and a new one has none (and is never chosen for a birthday offer). So is
    a locale or a time zone that cannot be read: a new customer has the shop's, as with an empty cell."""
    consent, unclear = _consent(row)
    email, name = _email(_required(row, "email"), check_dns, resolver), _name(row)  # in this order: the first is said
    locale, locale_left_out = _or_left_out(lambda: _locale(row, shop_locale), Locale(shop_locale), LOCALE_LEFT_OUT)
    zone, zone_left_out = _or_left_out(lambda: _zone(row, shop_tz), shop_tz, ZONE_LEFT_OUT)
    today = now.astimezone(ZoneInfo(zone)).date() if now is not None else None
    birthday, left_out = _or_left_out(lambda: _birthday(row, today, zone), None, BIRTHDAY_LEFT_OUT)
    absent |= {column for column, why in (("locale", locale_left_out), ("time_zone", zone_left_out),
                                          ("birthday", left_out)) if why}  # fmt: skip
    record = CustomerRecord(
        external_id=key,
        email=email,
        name=name,
        locale=locale,
        time_zone=zone,
        birthday=birthday,
        marketing_consent=consent,
        consent_basis=_text(row, "consent_basis"),
        consent_source=_text(row, "consent_source"),
        absent=absent,
    )
    return record, tuple(reason for reason in (unclear, locale_left_out, zone_left_out, left_out) if reason)


def _or_left_out(read: Callable[[], R], instead: R, said_after: str) -> tuple[R, str]:
    """A column's value as ``read`` gives it, or ``instead`` and why it was left out when it cannot be read."""
    try:
        return read(), ""
    except _Invalid as exc:
        return instead, f"{exc}{said_after}"


BIRTHDAY_LEFT_OUT = ("; the customer is imported without it (a birthday stored before is kept), and a customer "
                     "without a birthday gets no birthday offer: correct it and import the file again")
"""Said after why a birthday could not be read: the customer's other columns are imported (a ``saved`` warning)."""
LOCALE_LEFT_OUT = ("; the customer is imported with the shop's (a locale stored before is kept): correct it and "
                   "import the file again")
ZONE_LEFT_OUT = ("; the customer is imported with the shop's (a time_zone stored before is kept), its clock the one "
                 "quiet hours and birthdays are read on: correct it and import the file again")
"""Said after why a locale or a time zone could not be read: the customer is imported with the shop's, as with an
empty cell, or keeps the one stored before (a ``saved`` warning)."""


def _product(
    row: dict[str, str], key: str, absent: frozenset[str], zone: ZoneInfo, shop_currency: str
) -> tuple[ProductRecord, tuple[str, ...]]:
    currency = _currency(row, shop_currency)
    return ProductRecord(
        external_id=key,
        name=_name(row),
        category=_text(row, "category"),
        price_minor=_money(row, "price", currency),
        currency=currency,
        url=_url(row, "url"),
        image_url=_url(row, "image_url"),
        launched_at=_optional_datetime(row, "launched_at", zone),
        active=_bool(row, "active", True),
        absent=absent,
    ), ()


def _numbered(
    items: Iterator[OrderRecord | RowError], first_line: int, last_line: int
) -> Iterator[tuple[int, int, OrderRecord | RowError]]:
    for item in items:
        yield (item.line if isinstance(item, RowError) else first_line), last_line, item


def _order(
    group: list[tuple[int, dict[str, str]]], file: str, zone: ZoneInfo, now: datetime | None, absent: frozenset[str],
    shop_currency: str,
) -> Iterator[OrderRecord | RowError]:
    """One order from its rows, or one ``RowError`` per bad row (the order is then dropped)."""
    first_line, head = group[0]
    key = head.get("order_id", "").strip()
    errors: list[RowError] = []
    lines: list[OrderLineRecord] = []
    head_ok = True
    try:
        key = _ident(head, "order_id")
        customer = _ident(head, "customer_id")
        status = _status(head)
        currency = _currency(head, shop_currency)
        placed_at = _not_ahead(head, "placed_at", _datetime(head, "placed_at", zone), now)
        delivered_at = _optional_datetime(head, "delivered_at", zone)
        if delivered_at is not None:
            _not_ahead(head, "delivered_at", delivered_at, now)
        if delivered_at is not None and delivered_at.astimezone(zone).date() < placed_at.astimezone(zone).date():
            # the feedback request would count its days from before the purchase (a day earlier on the same
            # date is a date-only delivered_at beside a placed_at with its time: fine)
            raise _Invalid(f"delivered_at {_show(head['delivered_at'].strip())} is before placed_at "
                           f"{_show(head['placed_at'].strip())}")  # fmt: skip
        paid_at = _optional_datetime(head, "paid_at", zone)
        if paid_at is not None:
            _not_ahead(head, "paid_at", paid_at, now)
            if paid_at.astimezone(zone).date() < placed_at.astimezone(zone).date():
                # loyalty would count the order from before it was placed
                raise _Invalid(f"paid_at {_show(head['paid_at'].strip())} is before placed_at "
                               f"{_show(head['placed_at'].strip())}")  # fmt: skip
            # a date without a time on the day it was placed (its midnight): paid when placed, not before it
            paid_at = max(paid_at, placed_at)
        total = _optional_money(head, "total", currency)
    except _Invalid as exc:
        errors.append(RowError(file, first_line, key, str(exc)))
        currency, total, head_ok = shop_currency, None, False
    for line, row in group:
        if line != first_line:
            for column in _ORDER_HEAD:  # an empty cell is the first row's (Shopify gives them on the first alone)
                here, there = row.get(column, "").strip(), head.get(column, "").strip()
                if here and here != there:
                    errors.append(RowError(file, line, key, (
                        f"order columns disagree with line {first_line}: {column} {_show(here)} here, "
                        f"{_show(there)} there; the whole order is skipped"
                    )))  # fmt: skip
                    break
        try:
            item = _line(row, currency)
        except _Invalid as exc:
            errors.append(RowError(file, line, key, str(exc)))
            continue
        if item is None and len(group) > 1:
            errors.append(RowError(file, line, key, "missing product_id (only a one-row order may have no lines)"))
        elif item is None and total is None and head_ok:
            errors.append(RowError(file, line, key, "missing total (an order without lines needs one)"))
        elif item is not None:
            lines.append(item)
    if errors:
        yield from errors
        return
    if total is None:
        total = sum(item.quantity * item.unit_price_minor for item in lines)
        if total > MAX_MINOR:
            yield RowError(file, first_line, key, f"the lines' amounts add up to more than {_largest(currency)} "
                           f"{currency}: give the order's total")  # fmt: skip
            return
    yield OrderRecord(
        external_id=key,
        customer_external_id=customer,
        status=status,
        placed_at=placed_at,
        delivered_at=delivered_at,
        total_minor=total,
        currency=currency,
        lines=tuple(lines),
        paid_at=paid_at if status.is_paid else None,
        absent=absent,
    )


def _line(row: dict[str, str], currency: str) -> OrderLineRecord | None:
    product = row.get("product_id", "").strip()
    if not product:
        for column in ("quantity", "unit_price"):
            if row.get(column, "").strip():
                raise _Invalid(f"{column} given without a product_id")
        return None
    product = _ident(row, "product_id")
    raw = _required(row, "quantity")
    if not re.fullmatch(r"[0-9]{1,7}", raw) or int(raw) < 1:
        raise _Invalid(f"invalid quantity {_show(raw)} (expected a whole number from 1 to 9999999)")
    price = _money(row, "unit_price", currency)
    if int(raw) * price > MAX_MINOR:
        raise _Invalid(f"quantity {raw} times unit_price {_show(row.get('unit_price', '').strip())} is too large "
                       f"(at most {_largest(currency)} {currency})")  # fmt: skip
    return OrderLineRecord(product_external_id=product, quantity=int(raw), unit_price_minor=price)


# --- values --------------------------------------------------------------------------


def _show(value: str, limit: int = 60) -> str:
    """repr() of a value, so control characters show, cut short when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}…({len(value)} chars)"


def _required(row: dict[str, str], column: str) -> str:
    value = row.get(column, "").strip()
    if not value:
        raise _Invalid(f"missing {column} (required)")
    return value


_SCIENTIFIC = re.compile(r"[0-9][.,][0-9]+E\+[0-9]+", re.IGNORECASE)
"""A long number as a spreadsheet shows it (628123456789 as 6.28123E+11, or 6,28123E+11 in an Indonesian locale) and
writes it into a CSV: its last digits are lost, and many ids become one."""


def _ident(row: dict[str, str], column: str) -> str:
    value = _required(row, column)
    _no_control(value, column, MAX_ID)
    _no_invisible(value, column, in_text=False)
    if _SCIENTIFIC.fullmatch(value):  # stored, it would be one customer's, every order of the others' given to them
        raise _Invalid(f"invalid {column} {_show(value)} (a number a spreadsheet wrote in scientific notation, its "
                       "last digits lost: format the column as text and export it again)")  # fmt: skip
    return value


def _text(row: dict[str, str], column: str) -> str:
    value = row.get(column, "").strip()
    _no_control(value, column, MAX_TEXT[column])
    _no_invisible(value, column, in_text=True)
    return value


def _no_control(value: str, column: str, limit: int) -> None:
    """Refuse a value longer than ``limit`` or holding a control character (naming its code point and place)."""
    found = CONTROL_CHARACTERS.search(value)
    if len(value) > limit or found is not None:
        what = f": U+{ord(found.group()):04X} at character {found.start() + 1}" if found is not None else ""
        raise _Invalid(f"invalid {column} {_show(value)} (at most {limit} characters, no control characters{what})")


_IGNORABLE = INVISIBLE_CHARACTERS
"""Invisible characters Unicode does not class as format characters (Cf): the combining grapheme joiner, Hangul
fillers, Khmer inherent vowels, variation selectors (the same ones a stored link is not printed with)."""
_SHOWS_NOTHING = INVISIBLE_CHARACTERS | {"\u2800"}
"""Characters that show nothing, a name of which (and spaces) is no name: the invisible characters above and the
braille blank, printable to Python (the Hangul fillers even letters): the blank names forms are fed."""
_AFTER_A_LETTER = frozenset("\u200c\u200d" + "".join(map(chr, range(0xFE00, 0xFE10))))
"""What a text (a category, a consent note) may hold right after a character that is not ASCII: the joiners of
emoji sequences and Persian or Indic words, and the selectors of emoji (☕️)."""


def _no_invisible(value: str, column: str, *, in_text: bool) -> None:
    """Refuse a value holding an invisible character (a zero-width space, a BOM, a soft hyphen, a word joiner…) or a
    space other than ' ' (a no-break space…): "C-1" and "C-1\u200b" look the same and would be two customers.
    ``in_text``: joiners and selectors right after a character that is not ASCII (emoji, Persian) are kept."""
    if value.isascii():
        return
    for i, char in enumerate(value):
        if char.isascii():
            continue
        if unicodedata.category(char) not in ("Cf", "Zs") and char not in _IGNORABLE:
            continue
        if in_text and char in _AFTER_A_LETTER and i and not value[i - 1].isascii():
            continue
        raise _Invalid(f"invalid {column} {_show(value)} (no invisible characters nor spaces other than ' ': "
                       f"U+{ord(char):04X} {unicodedata.name(char, '')} at character {i + 1})".replace("  at", " at"))


def _name(row: dict[str, str]) -> str:
    value = row.get("name", "")
    if not value.strip():
        raise _Invalid("missing name (required)")
    if "\x00" in value or len(value) > MAX_NAME:
        raise _Invalid(f"invalid name {_show(value)} (at most {MAX_NAME} characters, no NUL)")
    shown = clean_text(value)  # what an email would show of it
    if not shown or all(ch.isspace() or ch in _SHOWS_NOTHING for ch in shown):
        raise _Invalid(f"invalid name {_show(value)} (nothing readable: only control, bidi, blank or invisible "
                       "characters)")
    return value


def _email(value: str, check_dns: bool, resolver: Resolver | None) -> str:
    """The address as it is sent to: ASCII, an internationalised domain in its IDNA form (``xn--…``), which every
    SMTP server takes. A non-ASCII part before the @ would need SMTPUTF8, which Kembali does not send: refused
    here, with the row, rather than failing every message to it later."""
    try:
        if check_dns:
            result = email_validator.validate_email(value, check_deliverability=True, dns_resolver=resolver,
                                                    allow_smtputf8=False)  # fmt: skip
        else:
            result = email_validator.validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except email_validator.EmailNotValidError as exc:
        raise _Invalid(f"invalid email address {_show(value)} ({exc})") from None
    local, _, domain = (result.ascii_email or result.normalized).rpartition("@")
    return f"{local}@{domain.lower()}"


_LANGUAGE_TAG = re.compile(r"(?P<language>[a-z]{2})(?:[-_][a-z0-9]{2,8})*(?:\.[a-z0-9-]+)?(?:@[a-z0-9]+)?",
                           re.IGNORECASE)  # fmt: skip
"""A language tag with its region (BCP 47's en-US, POSIX's id_ID and en_US.UTF-8): the language is what is read."""
_LANGUAGE_ALIASES = {"in": "id"}
"""Indonesian's code before 1989, which Java's locales (in_ID) still give."""


def _locale(row: dict[str, str], shop_locale: str) -> Locale:
    given = row.get("locale", "").strip()
    if not given:
        return Locale(shop_locale)
    tag = _LANGUAGE_TAG.fullmatch(given)
    language = tag["language"].lower() if tag is not None else ""
    try:
        return Locale(_LANGUAGE_ALIASES.get(language, language))
    except ValueError:
        raise _Invalid(f"invalid locale {_show(given)} (expected id or en, or a tag of either with its region: "
                       "id-ID, en_US)") from None


def _zone(row: dict[str, str], shop_tz: str) -> str:
    value = row.get("time_zone", "").strip() or shop_tz
    if value not in place_zones():
        meant = zone_meant(value)
        raise _Invalid(f"invalid time_zone {_show(value)} (expected an IANA name such as 'Asia/Jakarta'"
                       + (f"; did you mean {meant!r}?)" if meant else ")"))
    return value


_MIDNIGHT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ]00:00(:00(\.0+)?)?")
"""A date written as a date-time at midnight, without an offset, as a database exports a date kept as one."""
MAX_AGE = 120
"""The oldest a customer's birthday may make them: an older one is a placeholder (``1900-01-01``), not a birthday."""


def _birthday(row: dict[str, str], today: date | None, zone: str) -> date | None:
    """The birthday, refused before 1900, after ``today`` (the customer's, in ``zone``: a mistyped year) or more
    than ``MAX_AGE`` years before it (a placeholder)."""
    value = row.get("birthday", "").strip()
    if not value:
        return None
    if _MIDNIGHT.fullmatch(value):  # a database's DATETIME of a date (MySQL's '1990-05-01 00:00:00'): that day
        value = value[:10]
    if not _DATE.fullmatch(value):
        if (year_first := _year_first(value, "birthday")) is not None:  # 1990/05/01, 1990-5-1: no puzzle
            raise year_first
        if _LOCAL_DATE.fullmatch(value):
            raise _Invalid(f"invalid birthday {_show(value)} (a date as a spreadsheet shows it: is it month/day or "
                           "day/month? write it as YYYY-MM-DD)")  # fmt: skip
        raise _Invalid(f"invalid birthday {_show(value)} (expected YYYY-MM-DD)")
    _not_zero(value, "birthday", False)
    try:
        born = date(int(value[:4]), int(value[5:7]), int(value[8:]))
    except ValueError as exc:
        raise _Invalid(f"invalid birthday {_show(value)} ({exc})") from None
    if born.year < 1900:
        raise _Invalid(f"invalid birthday {_show(value)} (year before 1900)")
    age = today.year - born.year - ((today.month, today.day) < (born.month, born.day)) if today is not None else 0
    if age > MAX_AGE:  # 1900-01-01, a shop's "not known": a birthday offer every 1 January to no one's birthday
        raise _Invalid(f"invalid birthday {_show(value)} (an age of {age}, over {MAX_AGE}: a placeholder for a "
                       "birthday not known? leave the cell empty)")  # fmt: skip
    if today is not None and born > today:
        raise _Invalid(f"invalid birthday {_show(value)} (in the future: after today, {today} in {zone}; check the "
                       "year)")  # fmt: skip
    return born


def _bool(row: dict[str, str], column: str, default: bool | None) -> bool:
    value = row.get(column, "").strip().lower()
    if not value and default is not None:
        return default
    if not value:
        raise _Invalid(f"missing {column} (required: true or false)")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _Invalid(f"invalid {column} {_show(value)} (expected true/false, yes/no, 1/0, ya/tidak or benar/salah)")


def _consent(row: dict[str, str]) -> tuple[bool, str]:
    """``marketing_consent`` read, and "" or, when it says neither yes nor no (empty, ``y``, a shop's own word such
    as ``unsubscribed``), False and why: mail to someone who did not clearly agree is never sent, and a customer
    who had agreed is not left agreeing because the shop's new answer could not be read."""
    try:
        return _bool(row, "marketing_consent", None), ""
    except _Invalid:  # empty, or neither yes nor no
        value = row.get("marketing_consent", "").strip()
        return False, (f"unclear marketing_consent {_show(value)} (expected true/false, yes/no, 1/0, ya/tidak or "
                       "benar/salah): saved as no consent; correct it and import the file again")  # fmt: skip


def _currency(row: dict[str, str], shop_currency: str) -> str:
    """The row's currency, the shop's when the file has none (no column, or an empty cell)."""
    value = row.get("currency", "").strip() or shop_currency
    if not _CURRENCY.fullmatch(value):
        raise _Invalid(f"invalid currency {_show(value)} (expected a 3-letter code such as IDR)")
    if not money.known(value):  # its minor units are unknown: an amount could not be read right
        raise _Invalid(f"unknown currency {_show(value)} (expected an ISO 4217 code such as IDR)")
    return value.upper()


def _optional_money(row: dict[str, str], column: str, currency: str) -> int | None:
    return _money(row, column, currency) if row.get(column, "").strip() else None


def _money(row: dict[str, str], column: str, currency: str) -> int:
    value = _required(row, column)
    if not _AMOUNT.fullmatch(value):
        signed = _SIGNED.fullmatch(value)
        if signed is not None and (not signed["sign"].isalpha() or signed["sign"][:2].lower() == "rp"
                                   or money.known(signed["sign"])):  # fmt: skip
            rest = signed["amount"]
            plain = _AMOUNT.fullmatch(rest) and not (money.exponent(currency) < 3 and _THOUSANDS.fullmatch(rest))
            raise _Invalid(f"invalid {column} {_show(value)} (write the amount alone, without "
                           f"{signed['sign']!r}: the currency goes in the currency column"
                           + (")" if plain else f"; and {_SEPARATORS})"))  # fmt: skip
        if re.fullmatch(r"[1-9][0-9]{0,2}(\.[0-9]{3}){2,}", value):  # 1.250.000: surely thousands
            raise _Invalid(f"invalid {column} {_show(value)} ('.' separates thousands, as Indonesian writes them: "
                           f"write {value.replace('.', '')} for that amount)")  # fmt: skip
        if re.fullmatch(r"[0-9][0-9,.]*[0-9]", value) and "," in value:  # 1,234.50 or 249,50: not guessed
            raise _Invalid(f"invalid {column} {_show(value)} (write amounts {_SEPARATORS})")
        if re.fullmatch(r"[0-9]{16,}(\.[0-9]+)?", value.lstrip("0") or "0"):  # a number, of more digits than taken
            largest = _largest_written(currency)
            raise _Invalid(f"invalid {column} {_show(value)} (too large: at most {largest} {currency})")
        raise _Invalid(f"invalid {column} {_show(value)} (expected an amount such as 249000 or 249000.50)")
    decimals = money.exponent(currency)
    if decimals < 3 and _THOUSANDS.fullmatch(value):  # read as decimals, Rp249.000 would be Rp249
        raise _Invalid(f"invalid {column} {_show(value)} ({currency} has {decimals or 'no'} decimal places: is '.' a "
                       f"thousands separator? write {value.replace('.', '')} for that amount)")  # fmt: skip
    try:
        minor = money.to_minor(Decimal(value), currency)
    except ValueError:  # the form is checked above: only its decimals can be too many
        raise _Invalid(f"invalid {column} {_show(value)} (too many decimal places for {currency}, which has "
                       f"{decimals or 'none'})") from None
    if minor > MAX_MINOR:
        raise _Invalid(f"invalid {column} {_show(value)} (too large: at most {_largest(currency)} {currency})")
    return minor


def _largest(currency: str) -> str:
    return f"{money.from_minor(MAX_MINOR, currency):f}"


def _largest_written(currency: str) -> str:
    """The largest amount a cell may hold: ``_AMOUNT``'s 15 digits before the point, or less where the currency's
    minor units fill a BIGINT first (CLF's 4 decimals)."""
    digits = Decimal(10**15) - Decimal(1).scaleb(-money.exponent(currency))
    return f"{min(money.from_minor(MAX_MINOR, currency), digits):f}"


def _url(row: dict[str, str], column: str) -> str:
    value = row.get(column, "").strip()
    if not value:
        return ""
    if len(value) > MAX_URL:
        raise _Invalid(f"invalid {column} {_show(value)} (at most {MAX_URL} characters)")
    # every email naming the product prints its link as it is in the text part: a bidi override there makes it
    # read as another address ("https://toko.example/p/\u202emoc.live"), a C1 control is a terminal's escape
    hidden = next((i for i, char in enumerate(value) if not char.isprintable() or char.isspace()
                   or char in _IGNORABLE), None)  # fmt: skip
    if hidden is not None:
        char = value[hidden]
        raise _Invalid(f"invalid {column} {_show(value)} (expected an http(s) URL: U+{ord(char):04X} "
                       f"{unicodedata.name(char, '')} at character {hidden + 1})".replace("  at", " at"))
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (a port out of range or not a number raises here, as it would in a mail client)
    except ValueError as exc:  # a bad bracketed host ("http://[bad": "Invalid IPv6 URL")
        raise _Invalid(f"invalid {column} {_show(value)} (expected an http(s) URL: {exc})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise _Invalid(f"invalid {column} {_show(value)} (expected an http(s) URL)")
    return value


def _status(row: dict[str, str]) -> OrderStatus:
    value = _required(row, "status").lower()
    try:
        return OrderStatus(value)
    except ValueError:
        allowed = ", ".join(s.value for s in OrderStatus)
        raise _Invalid(f"invalid status {_show(value)} (expected one of {allowed})") from None


def _optional_datetime(row: dict[str, str], column: str, zone: ZoneInfo) -> datetime | None:
    return _datetime(row, column, zone, required=False) if row.get(column, "").strip() else None


def _not_zero(value: str, column: str, required: bool) -> None:
    """Refuse MySQL's zero date (``0000-00-00``, a date that is not known), saying what it is."""
    if value.startswith("0000-00-00"):
        raise _Invalid(f"invalid {column} {_show(value)} (a zero date, as MySQL writes one that is not known: "
                       + (f"{column} is required)" if required else "leave the cell empty)"))


_LOCAL_DATE = re.compile(r"[0-9]{1,4}[/.-][0-9]{1,2}[/.-][0-9]{1,4}\b")
"""A date as a spreadsheet shows it in its locale: 12/31/2026, 31.12.2026, 31-12-26."""
_YEAR_FIRST = re.compile(r"([0-9]{4})[/.-]([0-9]{1,2})[/.-]([0-9]{1,2})\b")
"""A date year first, but not as YYYY-MM-DD: 2026/11/22, 2026.11.22, 2026-11-2 (no month/day puzzle)."""


def _year_first(value: str, column: str) -> _Invalid | None:
    """Why ``value``, a date year first but not as YYYY-MM-DD, is not read, with the form to write; else None."""
    found = _YEAR_FIRST.match(value)
    if found is None or _DATE.match(value):  # its date is as written (what follows it is what is wrong)
        return None
    return _Invalid(f"invalid {column} {_show(value)} (write the date as YYYY-MM-DD, with '-' and two digits for the "
                    f"month and the day: {found[1]}-{int(found[2]):02d}-{int(found[3]):02d})")


_NAMED_OFFSET = re.compile(r"(?:GMT|UTC)\s*[+-]", re.IGNORECASE)
_ISO = "expected ISO 8601, e.g. 2026-11-22T10:00:00+07:00"
_DOTTED_TIME = re.compile(r"[T ]([0-9]{2})(:?[0-9]{2})?[.,]([0-9]+)")
"""A time with a fraction of its hour or minute: 10.30 as Indonesian writes half past ten (a fraction is read only
after the seconds: 10:30:15.250)."""
_ZONE_NAME = re.compile(r"[0-9]\s*([A-Za-z][A-Za-z_]+(?:/[A-Za-z_+-]+)*)$")
"""A time followed by a zone's name or abbreviation: ``10:00:00 UTC`` (Ruby's Time#to_s), ``10:00 WIB``."""


def _datetime(row: dict[str, str], column: str, zone: ZoneInfo, *, required: bool = True) -> datetime:
    """Refused, not guessed: a spreadsheet's local date (01/02/2026 is 1 February or 2 January) and an offset
    written GMT+7 (UTC+7 to most, UTC-7 to POSIX and the Etc/GMT+7 zone)."""
    value = _required(row, column)
    _not_zero(value, column, required)
    if not _DATE.match(value):
        if (year_first := _year_first(value, column)) is not None:
            raise year_first
        if _LOCAL_DATE.match(value):
            raise _Invalid(f"invalid {column} {_show(value)} (a date as a spreadsheet shows it: is it month/day or "
                           "day/month? write it as YYYY-MM-DD, e.g. 2026-11-22 or 2026-11-22T10:00:00+07:00)")
        raise _Invalid(f"invalid {column} {_show(value)} ({_ISO})")
    if _NAMED_OFFSET.search(value):
        raise _Invalid(f"invalid {column} {_show(value)} (write the offset as +07:00 or -07:00 after the time, or none "
                       "for the shop's time zone; 'GMT+7' is read either way round)")  # fmt: skip
    dotted = _DOTTED_TIME.search(value)
    if dotted is not None:  # Python reads 10.30 as 10:00:00.3, and 10:30.5 as 10:30:00.5
        said = f"write {dotted[1]}:{dotted[3]}" if dotted[2] is None and len(dotted[3]) == 2 else "write HH:MM:SS"
        raise _Invalid(f"invalid {column} {_show(value)} (a time written with '.' between its hours and minutes, as "
                       f"in Indonesian, is not read: {said})")  # fmt: skip
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        named = _ZONE_NAME.search(value)
        if named is not None and named[1].upper() not in ("AM", "PM"):
            raise _Invalid(f"invalid {column} {_show(value)} (a time zone written by its name, {named[1]!r}, is not "
                           f"read: write its offset after the time, {_with_offset(value, named)}, or none for the "
                           "shop's time zone)") from None  # fmt: skip
        if str(exc).startswith("Invalid isoformat string"):  # Python's words, naming the value again
            raise _Invalid(f"invalid {column} {_show(value)} ({_ISO})") from None
        raise _Invalid(f"invalid {column} {_show(value)} ({exc})") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01 east of UTC, 9999-12-31 west of it: before year 1 or after 9999 in UTC
        raise _Invalid(f"invalid {column} {_show(value)} (out of range: before year 1 or after 9999 in UTC)") from None


def _with_offset(value: str, named: re.Match[str]) -> str:
    """``value``, a time followed by a zone's name (``_ZONE_NAME``), with the offset of that zone (``WITA`` is
    Asia/Makassar's +08:00) in place of the name; an example when the zone is not known."""
    zone = named[1] if named[1] in place_zones() else zone_meant(named[1])
    try:
        local = datetime.fromisoformat(value[: named.start(1)].strip())
    except ValueError:
        local = None
    if zone is None or local is None or local.tzinfo is not None:
        return "as in 2026-11-22T10:00:00+07:00"
    return f"{local.replace(tzinfo=ZoneInfo(zone)).isoformat()} for {zone}"


AHEAD = timedelta(days=1)
"""How far after the import's clock an order's date may be (a date of today in a zone east of the shop's)."""
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
"""No order of a web shop is older: one dated before is a placeholder (the Unix epoch) or a mistyped year."""


def _not_ahead(row: dict[str, str], column: str, value: datetime, now: datetime | None) -> datetime:
    """``value``, refused when it is more than ``AHEAD`` after ``now``: a mistyped year (2062 for 2026) would make
    the order its customer's last for decades, and no win-back would ever reach them. Refused too before
    ``EARLIEST`` (1970-01-01, an export's date not known; 0026 for 2026): the order would be its customer's first
    purchase of decades ago, a one-time buyer's due a win-back's last step at once."""
    if now is not None and value > now + AHEAD:
        raise _Invalid(f"invalid {column} {_show(row[column].strip())} (in the future: after {now:%Y-%m-%d %H:%M} "
                       "UTC; check the year and the time zone)")  # fmt: skip
    if value < EARLIEST - AHEAD:  # (a day's margin: 1990-01-01 in any zone)
        raise _Invalid(f"invalid {column} {_show(row[column].strip())} (before {EARLIEST.year}: no web shop took "
                       "orders then; a placeholder for a date not known, such as the Unix epoch 1970-01-01? check "
                       "the year)")  # fmt: skip
    return value


def _not_seen(seen: _SeenIds, key: str, line: int, column: str) -> None:
    first = seen.add(key, line)
    if first is not None:
        raise _Invalid(f"duplicate {column} {_show(key)}, first seen at line {first}")


# --- file plumbing ----------------------------------------------------------------


class _SeenIds:
    """Ids seen so far → the line each was first seen on, in 12 bytes a slot.

    Keys are 8-byte BLAKE2b digests of the ids, never the ids, in an
    open-addressing table of two flat arrays kept at most 70 % full. Measured
    for a million ids: 25 MB (38 MB at the peak while the table doubles) and
    about 4 µs an id; a ``dict[int, int]`` of the same digests takes 110 MB.
    Two different ids share a digest with probability about n²/2⁶⁵ (3·10⁻⁸ for
    a million ids); the later one would then be wrongly reported as a duplicate.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._keys = array("Q", [0]) * capacity
        self._lines = array("I", [0]) * capacity
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, key: str, line: int) -> int | None:
        """Remember ``key`` at ``line``; return the first line if it was seen before."""
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1
        first = self._find_or_put(digest, line)
        if first is None:
            self._size += 1
            if self._size * 10 > len(self._keys) * 7:
                self._grow()
        return first

    def find(self, key: str) -> int | None:
        """The line ``key`` was first seen on, or None (it is not remembered)."""
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1
        keys = self._keys
        mask = len(keys) - 1
        slot = digest & mask
        while keys[slot] != 0:
            if keys[slot] == digest:
                return self._lines[slot]
            slot = (slot + 1) & mask
        return None

    def _find_or_put(self, digest: int, line: int) -> int | None:
        keys = self._keys
        mask = len(keys) - 1
        slot = digest & mask
        while True:
            held = keys[slot]
            if held == 0:
                keys[slot] = digest
                self._lines[slot] = line
                return None
            if held == digest:
                return self._lines[slot]
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        old_keys, old_lines = self._keys, self._lines
        self._keys = array("Q", [0]) * (2 * len(old_keys))
        self._lines = array("I", [0]) * (2 * len(old_keys))
        for digest, line in zip(old_keys, old_lines, strict=True):
            if digest:
                self._find_or_put(digest, line)


MAX_LINE = 4 * 2**20
"""The most characters a line of a file may hold (a row of a wide shop export is some thousands; a field, the CSV
field limit's 131072): a longer one, a JSON file given by mistake (the whole file on one line), is read a piece at a
time and rejected, never held whole."""
_OVERLONG_KEPT = 4096
"""The characters of a line longer than ``MAX_LINE`` kept to name its row by its id."""


@dataclass(frozen=True)
class _Broken:
    key: str
    """The row's id if it could be found, else ""."""
    reason: str
    blank: bool = False
    """The row's id column is there and empty (not an id that could not be read): a later line of the order above
    it, perhaps, as a row without an ``order_id`` may be."""


class _Rows:
    """``(first line, last line, row)`` from a CSV file, blank lines skipped (a quoted field may span lines).

    A row is a dict of column → raw value, or a ``_Broken`` saying why the row
    could not be split into the header's columns.
    """

    def __init__(self, handle: TextIO, path: Path) -> None:
        self._handle = handle
        self._path = path
        self._taken: list[str] = []
        """The lines the reader has taken for the row being read (to say which field is too long)."""
        self._reader = csv.reader(self._lines(handle))
        self._line = 0
        """The file's line (as an editor, ``grep -n`` or ``sed`` number them) of the last text the reader took."""
        self._line_ended = True
        """Whether that text ended its line: the next text the reader takes is on the next line."""
        self._cr_ends_lines: bool | None = None
        """Whether a carriage return alone ends a line: only in a file whose first line so ends (an old Mac's);
        in one of LF or CRLF lines it is a line break inside a quoted field, within its line."""
        self._overlong = ""
        """The start of a line longer than ``MAX_LINE`` the reader was just given in its place (``_lines``), until
        the reader's error for it is said; else ""."""
        self.columns: list[str] = []
        self.key_column = 0
        self.ignored: frozenset[int] = frozenset()
        """The indexes of the columns that are not read (unknown, or without a name): their text is not checked."""
        self.warn: Warn | None = None
        """Told of a row skipped as the header again (files joined)."""

    def peek(self, size: int) -> bytes:
        """The file's first bytes (some of them), before anything is read; b"" when they cannot be looked at."""
        buffer = getattr(self._handle, "buffer", None)
        return bytes(buffer.peek(size)[:size]) if isinstance(buffer, io.BufferedReader) else b""

    def _lines(self, handle: TextIO) -> Iterator[str]:
        # read with newline="", the file's text comes in pieces that end at LF, CRLF or a CR alone: the csv
        # reader's line_num counts each, and a name holding a CR moved every row after it one line on
        # a line is read at most MAX_LINE characters at a time: a file of no line breaks (a JSON export) is not held
        # whole, split at its every comma (1.5 GB for a file of 150 MB)
        taken = self._taken
        while line := handle.readline(MAX_LINE):
            if self._cr_ends_lines is None:
                self._cr_ends_lines = line.endswith("\r")
            if self._line_ended:
                self._line += 1
            self._line_ended = self._ends_line(line)
            if len(line) >= MAX_LINE and not self._line_ended:
                # the rest of the line skipped, and in its place a field the reader refuses (whether or not it is
                # in a quoted field): its error names the line (``_unreadable``), and the next line is read
                self._overlong = line[:_OVERLONG_KEPT]
                while (line := handle.readline(MAX_LINE)) and not self._ends_line(line):
                    pass
                self._line_ended = True
                yield "x" * (csv.field_size_limit() + 1)
                continue
            taken.append(line)
            yield line

    def _ends_line(self, text: str) -> bool:
        """Whether ``text``, as the file gives it (``newline=""``), ends the file's line."""
        return text.endswith("\n") or bool(self._cr_ends_lines and text.endswith("\r"))

    def __enter__(self) -> _Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def raw(self) -> Iterator[tuple[int, int, list[str] | _Broken]]:
        """(first line, last line, fields or why the row is unreadable) per non-blank row."""
        reader = self._reader
        while True:
            start = self._line + 1 if self._line_ended else self._line
            self._taken.clear()
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                overlong = bool(self._overlong)  # (a line's length, not a quote, made it unreadable)
                why = self._unreadable(exc)
                yield start, self._line, _Broken(why.key, why.reason + _swallowed(start, self._line, not overlong),
                                                 why.blank)  # fmt: skip
                continue
            if any(field.strip() for field in fields):
                columns, key, ignored = self.columns, self.key_column, self.ignored
                # bytes that are not UTF-8 in a column that is not read (an address, a note) reject no row
                read = [("" if i in ignored else field) for i, field in enumerate(fields)] if ignored else fields
                broken = _not_utf8(read, columns, key) or _mojibake(read, columns, key)
                yield start, self._line, broken or fields

    def _header_again(self, fields: list[str], width: int) -> bool:
        """The row is the header's line again (case, spaces, a BOM and empty fields past its end aside)."""
        key = self.key_column
        if len(fields) < width or _column_name(fields[key]) != self.columns[key]:  # most rows: one field looked at
            return False
        return ([_column_name(field) for field in fields[:width]] == self.columns
                and not any(field.strip() for field in fields[width:]))  # fmt: skip

    def _unreadable(self, exc: csv.Error) -> _Broken:
        if self._overlong:  # the row's fields before the line's last one read are named (its id, found there)
            start, self._overlong = "".join(self._taken) + self._overlong, ""
            self._taken.clear()
            hint = "" if self.columns else " (a CSV file has one row a line: is it one?)"
            try:
                before = next(csv.reader([start]), [])[:-1]  # (its last field is cut short)
            except csv.Error:
                before = []
            return self._broken(before, (
                f"unreadable CSV: line {self._line} holds more than {MAX_LINE:,} characters, the most a line may "
                f"hold{hint}"))  # fmt: skip
        reason, before = unreadable(exc, "".join(self._taken), self.columns)
        self._taken.clear()
        return self._broken(before, reason)

    def _broken(self, fields: list[str], reason: str) -> _Broken:
        """A row not read, for ``reason``, named by its id where ``fields`` reach the id's column (the id missing
        where they do and it is empty)."""
        there = bool(self.columns) and self.key_column < len(fields)
        key = fields[self.key_column].strip() if there else ""
        return _Broken(key, reason, there and not key)

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, str] | _Broken]]:
        """(first line, last line, the row) per non-blank row."""
        width = len(self.columns)
        for line, end, fields in self.raw():
            if isinstance(fields, _Broken):
                yield line, end, fields
            elif self._header_again(fields, width):
                # two exports joined (cat october.csv november.csv): the second one's header, BOM and all
                if self.warn is not None:
                    self.warn(f"{file_name(self._path)}:{line}: the header again (files joined?): skipped")
            elif len(fields) > width and not any(field.strip() for field in fields[width:]):
                # empty cells past the header's last column (a spreadsheet's export of a sheet once wider, or a
                # trailing comma): nothing is shifted, nothing lost
                yield line, end, self._whole(line, end, fields, dict(zip(self.columns, fields[:width], strict=True)))
            elif len(fields) < width and not any(self.columns[len(fields):]):
                # the header's columns without a name (a sheet's used range wider than its columns), whose empty
                # fields Excel may leave out after the first rows: nothing of a column that is read is missing
                padded = fields + [""] * (width - len(fields))
                yield line, end, self._whole(line, end, fields, dict(zip(self.columns, padded, strict=True)))
            elif len(fields) != width:
                extra = next((i for i in range(width, len(fields)) if fields[i].strip()), None)
                holds = f": field {extra + 1} holds {_show(fields[extra].strip())}" if extra is not None else ""
                reason = (f"row has {len(fields)} fields, the header has {width}{holds} (a stray comma or quote?)"
                          + _swallowed(line, end))  # fmt: skip
                yield line, end, self._broken(fields, reason)
            else:
                yield line, end, self._whole(line, end, fields, dict(zip(self.columns, fields, strict=True)))

    def _whole(self, line: int, end: int, fields: list[str], row: dict[str, str]) -> dict[str, str] | _Broken:
        """``row``, unless it was read from several lines with an odd number of quotes in them: a quote opened and
        never closed in its last column, which took the rows after it in and left it the header's number of fields
        (it was imported, and those rows were in no count)."""
        if end > line and "".join(self._taken).count('"') % 2:
            return self._broken(fields, left_open(fields, self.columns, line, end))
        return row


def unreadable(exc: csv.Error, text: str, columns: list[str]) -> tuple[str, list[str]]:
    """Why the row ``text`` (from its first line to the one the reader stopped on) is unreadable, and the values of
    its fields before the bad one when they could be found. A field past the CSV field limit (the reader drops the
    rest of its line and goes on after it) is named by its column, with ``columns``' name for it."""
    limit = csv.field_size_limit()
    if not str(exc).startswith("field larger than field limit"):
        return f"unreadable CSV ({exc})", []
    found = _long_field(text, limit)
    where, before = "a field", list[str]()
    if found is not None:
        index, before = found
        name = f" {columns[index]!r}" if index < len(columns) and columns[index] else ""
        where = f"column {index + 1}{name}"
    return f"unreadable CSV: {where} holds more than {limit} characters, the most one field may hold", before


_FIELD = re.compile(r'"([^"]*(?:""[^"]*)*)"?([^,\r\n]*)|([^,\r\n]*)')
"""A field as the CSV reader reads it: quoted (a doubled quote is one; text after the closing quote is kept), or
not (up to a comma or a line break)."""


def _long_field(text: str, limit: int) -> tuple[int, list[str]] | None:
    """The index of the first field of the row ``text`` starts with that is longer than ``limit``, and the values of
    the fields before it; None when there is none."""
    before: list[str] = []
    at = 0
    while True:
        field = _FIELD.match(text, at)
        assert field is not None  # the unquoted form matches the empty string
        quoted, after, plain = field.groups()
        length = len(plain) if plain is not None else len(quoted) - quoted.count('""') + len(after)
        if length > limit:
            return len(before), before
        before.append(plain if plain is not None else quoted.replace('""', '"') + after)
        at = field.end()
        if not text.startswith(",", at):
            return None
        at += 1


def _swallowed(start: int, end: int, quote: bool = True) -> str:
    """For a bad row read from more than one line: which lines went into it (none of them is imported), and with
    ``quote`` the likely cause."""
    if end <= start:
        return ""
    cause = " (a quote opened and never closed makes the lines after it one field)" if quote else ""
    return f"; it takes in lines {start} to {end}, none of which is imported{cause}"


def _open(path: Path, position: ReadPosition | None = None) -> _Rows:
    # bytes that are not UTF-8 are kept as lone surrogates (``_not_utf8`` finds them): the row that has them is
    # reported at its line, and the rest of the file is read
    handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    if position is not None:
        position.follow(handle)
    return _Rows(handle, path)


class ReadPosition:
    """How far the read of an import's file is, for a progress line: called, the bytes read so far and the file's
    size; None when it cannot tell (no file open yet, or one whose size is not known ahead: a pipe). Asked only
    when the line is drawn (a seek of the file's position, a system call); the text layer reads ahead of the row
    by at most its chunk (8 kB)."""

    def __init__(self) -> None:
        self._buffer: io.BufferedReader | None = None
        self._size = 0

    def follow(self, handle: TextIO) -> None:
        """Follow the read of ``handle``, just opened (a file read again is followed from its start)."""
        buffer = getattr(handle, "buffer", None)
        found = os.fstat(buffer.fileno()) if isinstance(buffer, io.BufferedReader) else None
        regular = found is not None and stat.S_ISREG(found.st_mode)
        self._buffer = buffer if regular else None
        self._size = found.st_size if found is not None and regular else 0

    def __call__(self) -> tuple[int, int] | None:
        if self._buffer is None:
            return None
        try:
            read = self._buffer.tell()
        except (ValueError, OSError):  # closed: the read is over
            read = self._size
        return min(read, self._size), self._size


_UNDECODED = re.compile("[\udc80-\udcff]")


def left_open(fields: list[str], columns: list[str], start: int, end: int) -> str:
    """Why a row read from lines ``start`` to ``end`` with an odd number of quotes in them is not read: the column
    whose field holds the first line break, where the quote left open begins, and the lines it took in."""
    i = next((i for i, field in enumerate(fields, 1) if "\n" in field or "\r" in field), len(fields))
    name = f" {columns[i - 1]!r}" if i <= len(columns) and columns[i - 1] else ""
    return f"column {i}{name} holds a quote left open" + _swallowed(start, end)


def _not_utf8(fields: list[str], columns: list[str], key_column: int) -> _Broken | None:
    """Why a row read with ``surrogateescape`` is not UTF-8 text (its first such byte and column, by name once the
    header is read), with the row's id when that is readable; None when it is text."""
    for i, field in enumerate(fields, 1):
        if not field.isascii():
            found = _UNDECODED.search(field)
            if found is not None:
                byte = ord(found.group()) - 0xDC00
                name = f" {columns[i - 1]!r}" if i <= len(columns) and columns[i - 1] else ""
                key = fields[key_column].strip() if columns and key_column < len(fields) else ""
                return _Broken("" if _UNDECODED.search(key) else key, (
                    f"not UTF-8 text: byte 0x{byte:02x} in column {i}{name} (save the file as UTF-8; a spreadsheet "
                    "calls it 'CSV UTF-8')"), bool(columns) and key_column < len(fields) and not key)  # fmt: skip
    return None


_LEAD = re.compile("[\u00c2-\u00f4]")
"""A first byte of a multi-byte UTF-8 character (C2-F4) read as Windows-1252 or Latin-1: 'Ã' of 'Ã©' (é)."""


def _mojibake(fields: list[str], columns: list[str], key_column: int) -> _Broken | None:
    """Why a row holds text that was UTF-8 read as Windows-1252 (or Latin-1) and saved again as UTF-8, 'BÃ©ni'
    for 'Béni' (what a spreadsheet does to a UTF-8 file it opened as its own encoding), naming the column and
    what the text reads; None when no field is such. Real text almost never is: a letter from Â to ô followed
    by characters that all make UTF-8 with it."""
    for i, field in enumerate(fields, 1):
        if field.isascii() or _LEAD.search(field) is None:
            continue
        raw = bytearray()
        for char in field:
            try:
                raw += char.encode("cp1252")
            except UnicodeEncodeError:
                if ord(char) > 0xFF:  # no byte of either encoding: real text
                    break
                raw.append(ord(char))  # a byte Windows-1252 leaves undefined (0x81, 0x8d…), kept as Latin-1 does
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text != field:
                name = f" {columns[i - 1]!r}" if i <= len(columns) and columns[i - 1] else ""
                key = fields[key_column].strip() if columns and key_column < len(fields) else ""
                return _Broken(key if key.isascii() else "", (
                    f"column {i}{name} {_show(field)} reads {_show(text)} in UTF-8: the file was opened in another "
                    "encoding and saved again (export it again, or open it in the spreadsheet as UTF-8)"),
                    bool(columns) and key_column < len(fields) and not key)  # fmt: skip
    return None


_PACKED = {b"\x1f\x8b": "compressed with gzip: decompress it first (gunzip)",
           b"PK\x03\x04": "a zip file (an .xlsx workbook?): save the sheet as 'CSV UTF-8'"}  # fmt: skip
"""The first bytes of files that are no CSV text, and what to do."""


def no_text(start: bytes) -> str | None:
    """What a file whose first bytes are ``start`` (four will do) is, when it is no UTF-8 text, and what to do
    (``is compressed with gzip: decompress it first (gunzip)``); None for text."""
    for magic, what in _PACKED.items():
        if start.startswith(magic):
            return f"is {what}"
    if b"\x00\x00" in start[:4]:  # no UTF-16 text's first characters (/dev/zero, a disk image)
        return "is binary data (zero bytes), not text"
    if start[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in start[:4]:  # a BOM, or the zero byte of 'i' (0069)
        return "is UTF-16 text (Excel's 'Unicode Text'): save the sheet as 'CSV UTF-8'"
    return None


def _header(rows: _Rows, path: Path, known: tuple[str, ...], required: tuple[str, ...], warn: Warn | None) -> None:
    if (what := no_text(rows.peek(4))) is not None:
        raise ImportRowError(1, f"{file_name(path)} {what}")
    first = next(rows.raw(), None)
    if first is None:
        raise ImportRowError(1, f"{file_name(path)} is empty (expected a header row: {', '.join(known)})")
    line, _end, fields = first
    if isinstance(fields, list) and _SEPARATOR_HINT.fullmatch(",".join(fields)):  # Excel's 'sep=,' before the header
        hint = ",".join(fields)
        if hint[4] != ",":
            raise ImportRowError(line, f"{hint!r} says {comma_separated(hint[4])}")
        first = next(rows.raw(), None)
        if first is None:
            raise ImportRowError(line, f"{file_name(path)} has no header after {hint!r} (expected: {', '.join(known)})")
        line, _end, fields = first
    if isinstance(fields, _Broken):
        raise ImportRowError(line, f"{file_name(path)}: header: {fields.reason}")
    columns = [_column_name(name) for name in fields]
    for name in known:  # one not read (a shop's two 'Note' columns), or without a name (trailing commas), is ignored
        if columns.count(name) > 1:
            places = [str(i) for i, column in enumerate(columns, 1) if column == name]
            raise ImportRowError(line, f"duplicate column {name!r} (columns {', '.join(places[:-1])} and "
                                       f"{places[-1]}): keep one of them")  # fmt: skip
    unknown = list(dict.fromkeys(name for name in columns if name and name not in known))
    if missing := [name for name in required if name not in columns]:
        # every one at once (one a run took a run per column of an export whose columns have other names), with a
        # rename for each close to a column found; or, when the file has another separator, the first and that
        if (separator := other_separator(columns)) is not None:
            missing, hints = missing[:1], [comma_separated(separator)]
        else:
            hints = [f"rename {close!r} to {name!r}" for name in missing if (close := _close(name, unknown))]
            if (kind := _kind_of(columns, required)) is not None:
                hints.append(f"its columns are those of {'an' if kind == 'orders' else 'a'} {kind} file: import it "
                             f"with `kembali import {kind}`")
        named = ", ".join(map(repr, missing[:-1])) + (" and " if len(missing) > 1 else "") + repr(missing[-1])
        raise ImportRowError(line, f"missing column{'s' if len(missing) > 1 else ''} {named} "
                                   f"(found: {listed_columns(columns)})" + "".join(f"; {h}" for h in hints))
    if unknown and warn is not None:
        # a near miss of a column the file lacks ('timezone') is surely meant as it: its values would be lost
        absent = [name for name in known if name not in columns]
        names = _listed([
            _show(name, _SHOWN) + (f" (did you mean {close!r}?)" if (close := _close(name, absent)) is not None else "")
            for name in unknown[:_LISTED]
        ], len(unknown))  # fmt: skip
        warn(f"{file_name(path)}:{line}: unknown column(s) {names} ignored (known: {', '.join(known)})")
    unnamed = columns.count("")
    if unnamed and warn is not None:
        warn(f"{file_name(path)}:{line}: {unnamed} column(s) without a name ignored")
    rows.columns = columns
    rows.warn = warn
    rows.key_column = columns.index(required[0])
    rows.ignored = frozenset(i for i, name in enumerate(columns) if name not in known)


_SHOWN = 60
"""The characters of a column's name a message shows (a hostile export's header may name one of 10,000)."""
_LISTED = 10
"""The columns a message names (an export may have thousands): the others are counted."""


def listed_columns(columns: list[str]) -> str:
    """A header's columns as a message names them: the first ``_LISTED``, each cut to ``_SHOWN`` characters."""
    return _listed([column if len(column) <= _SHOWN else f"{column[:_SHOWN]}…({len(column)} chars)"
                    for column in columns[:_LISTED]], len(columns))  # fmt: skip


def _listed(names: list[str], count: int | None = None) -> str:
    """The first ``_LISTED`` of ``names`` (of ``count``, when only those were given), and how many more there are."""
    count = len(names) if count is None else count
    more = f", and {count - _LISTED} more" if count > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


_SEPARATOR_HINT = re.compile(r"sep=[^\w\s\"']", re.IGNORECASE)
"""The line Excel writes (and reads) before the header to say which separator the file uses: 'sep=,', 'sep=;'."""


def _column_name(text: str) -> str:
    """A header's field as a column's name: case and surrounding spaces aside (and a BOM, on a header again)."""
    return text.strip().lstrip("\ufeff").lower()


def other_separator(header: list[str]) -> str | None:
    """The separator a header row read as CSV holds when it is one column with another separator in it: a
    spreadsheet in a comma-decimal locale (id-ID) saves ';', its "Unicode text" is tab-separated; None otherwise."""
    return next((s for s in (";", "\t", "|") if len(header) == 1 and s in header[0]), None)


def comma_separated(separator: str) -> str:
    """What to say of a file whose columns are separated by ``separator`` (``other_separator``)."""
    return f"the columns are separated by {separator!r}: save the file comma-separated"


def _kind_of(columns: list[str], required: tuple[str, ...]) -> str | None:
    """The other kind of file whose every needed column is among ``columns``; of two, the one that reads more of them
    (an orders file whose lines carry their product's id, name and price is no products file); None for none or a
    tie."""
    fits = sorted(((len(set(columns) & set(reads)), kind) for kind, (needs, reads) in _REQUIRED_OF.items()
                   if needs != required and set(needs) <= set(columns)), reverse=True)  # fmt: skip
    return fits[0][1] if fits and (len(fits) == 1 or fits[0][0] > fits[1][0]) else None


def _close(name: str, candidates: list[str]) -> str | None:
    """The candidate ``name`` is most likely a misspelling of (or the reverse), if any is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.7)
    return close[0] if close else None


def ascii_address(value: str) -> str:
    """``value`` with an internationalised domain in its IDNA form (``xn--…``), as imports store addresses;
    unchanged when the domain is ASCII already or is no valid domain."""
    local, at, domain = value.strip().rpartition("@")
    if not at or domain.isascii():
        return value.strip()
    try:
        result = email_validator.validate_email(f"a@{domain}", check_deliverability=False)
    except email_validator.EmailNotValidError:
        return value.strip()
    return f"{local}@{result.ascii_domain}"


def normalize_email(value: str) -> str:
    """An address normalised as customer imports store it; ValueError saying why when it is invalid."""
    try:
        return _email(value.strip(), False, None)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None

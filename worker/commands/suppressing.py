"""`kembali suppress add|remove|list|import`: the operator's hands on the suppression list."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import csv
import io
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.adapters import db, opstore
from worker.adapters.importer import (
    comma_separated,
    left_open,
    listed_columns,
    no_text,
    other_separator,
    unreadable,
)
from worker.adapters.store import CUSTOMERS_OWN, KEMBALI_REASONS, Store, suppression_address
from worker.commands import arguments
from worker.commands.progress import Progress
from worker.config import Settings
from worker.errors import not_utf8
from worker.log import printable

EXIT_OK, EXIT_ATTENTION, EXIT_USAGE = 0, 1, 2
MAX_SOURCE_CHARS = 100
"""The width of the suppression list's source column."""
MAX_LIST_BYTES = 512 * 2**20
"""The largest file ``suppress import`` reads (it holds the list in memory): some 15 million addresses."""


def suppress(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(db.command_engine(settings))
    try:
        db.check_schema(store.engine)
        action = args.action
        if action == "remove" and args.reason is not None:  # else ignored: it removed the address whatever its reason
            print("kembali suppress remove: --reason is for add, import and list; remove takes the address alone",
                  file=sys.stderr)
            return EXIT_USAGE
        if action == "list" and not args.target:
            return _list(store, args.reason)
        if not args.target:
            what = "a file of addresses (or - for standard input)" if action == "import" else "an address"
            print(f"kembali suppress {action}: give {what}", file=sys.stderr)
            return EXIT_USAGE
        if action == "import":
            return _import(store, args.target, args.reason)
        try:
            email = arguments.mail_address(args.target)
        except ValueError as exc:
            print(f"kembali suppress {action}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if action == "list":
            return _list(store, args.reason, email)
        if action == "add":
            from worker.adapters.clock import SystemClock

            reason = args.reason or "manual"
            new = store.suppress(email, reason=reason, source="cli", now=SystemClock().now())
            kept = next(iter(opstore.suppressions(store, email=email)), None) if not new else None
            # (a reason Kembali knows is that reason as an earlier version stored it, as typed: 'Complaint')
            known = reason in KEMBALI_REASONS
            if kept is not None and (kept["reason"].lower() if known else kept["reason"]) != reason:
                # not "already suppressed" alone: read as now this reason
                print(f"{suppression_address(email)}: already suppressed as {printable(kept['reason'])!r} (from "
                      f"{printable(kept['source'])}, since {kept['created_at'].astimezone(UTC):%Y-%m-%d %H:%M} UTC): "
                      "its reason stays; `kembali suppress remove` it first to change it")  # fmt: skip
                return EXIT_OK
            print(f"{suppression_address(email)}: {'suppressed' if new else 'already suppressed'}")  # as listed
            return EXIT_OK
        removed = opstore.unsuppress(store, email)
        if removed is None:
            print(f"{suppression_address(email)}: was not suppressed")
            return EXIT_OK
        # what was undone: a customer's own unsubscribe is not a bounce to clear
        print(f"{suppression_address(email)}: removed from the suppression list (it was there as "
              f"{printable(removed['reason'])!r}, from {printable(removed['source'])}, since "
              f"{removed['created_at'].astimezone(UTC):%Y-%m-%d %H:%M} UTC)")  # fmt: skip
        # an unsubscribe an import carried to the customer's new address stays there: the customer may have asked
        # for email again (then the operator removes those too), or the old mailbox be another person's now
        for entry in opstore.followed_from(store, email):
            address = printable(entry["email"])
            print(f"note: {address} stays suppressed ({printable(entry['source'])}, and their "
                  f"{'complaint' if entry['reason'] == 'complaint' else 'unsubscribe'} followed them): "
                  f"`kembali suppress remove {address}` too if the customer asked for email again")
        return EXIT_OK
    finally:
        store.close()


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""A cell a spreadsheet would read as a formula (``=HYPERLINK(…)`` in an address is a valid local part)."""


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a leading apostrophe
    (``read_addresses`` takes it off again, so the list imports back as it was, each address with its reason).
    A character that is not printable (a row written by hand or another program: ``suppress`` stores none) is
    written out as a JSON escape: a terminal escape is shown, not obeyed, and a line break splits no row."""
    value = printable(value)
    return f"'{value}" if value.startswith(FORMULA_START) else value


def _uncell(value: str) -> str:
    """``value`` without the apostrophe ``_cell`` put before it."""
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_START) else value


def _list(store: Store, reason: str | None, email: str | None = None) -> int:
    # written to a temporary file as read (a list of millions is not held in memory), and out once the read is over:
    # written out as read, its transaction stayed open while a pager (`| less`) waited for the operator, and the
    # server ended it after database.idle_in_transaction_timeout_seconds, the list cut short at the first screens
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as spool:
        out = csv.writer(spool, lineterminator="\n")
        out.writerow(["email", "reason", "source", "created_at"])
        listed = 0
        # a reason Kembali knows in any case: earlier versions stored `--reason Complaint` as typed
        known_reason = reason is not None and reason in KEMBALI_REASONS
        for r in opstore.each_suppression(store, reason=reason, email=email, any_case=known_reason):
            out.writerow([_cell(r["email"]), _cell(r["reason"]), _cell(r["source"]), r["created_at"].isoformat()])
            listed += 1
        spool.seek(0)
        shutil.copyfileobj(spool, sys.stdout)
    print(f"{listed} suppressed address(es)", file=sys.stderr)
    if not listed and reason and reason not in (known := opstore.suppression_reasons(store, most=21)):
        # a reason misspelt ('unsubscribe'), or another tool's in another case, finds nothing: no news about the list
        shown = ", ".join(map(printable, known[:20])) + (", …" if len(known) > 20 else "")
        print(f"(no entry has the reason {printable(reason)!r}; the list's reasons: {shown or 'none yet'})",
              file=sys.stderr)
    return EXIT_OK


_LINE_BREAK = re.compile(r"\r\n|[\r\n]")


class Refused(ValueError):
    """A file of addresses read as none: "line N: why" (its columns separated by ';'…), nothing imported."""


def read_addresses(
    text: str, reading: Callable[[int, int], None] | None = None
) -> tuple[dict[str, tuple[int, dict[str, str]]], list[str]]:
    """Addresses from a file: one a line (``#`` comments and blank lines skipped), or a CSV with an
    ``email`` column (its header the first line that is neither) and perhaps ``reason``, ``source`` and ``created_at``
    columns (as ``suppress list`` writes them). Returns ({normalised address: (its line, {column: its cell} for those
    of ``ENTRY_COLUMNS`` the row has)}, "line N: why" for each rejected one); ``Refused`` for a CSV whose header has
    an ``email`` column separated by another separator than ',' (as ``kembali import`` refuses it: every line would
    be rejected as an address), or whose first line, without a header, is columns so separated, one of them an
    address; and for a CSV whose header has no ``email`` column (none of its lines would be read). ``reading(line,
    lines)`` is told of each line read (a progress line)."""
    lines = _LINE_BREAK.split(text)  # not splitlines(): NEL, U+2028, a form feed… in a comment are no line break
    # the pieces are read, and the CSV reader counts them, at every CR; the file's lines, the numbers said, are
    # pieces of them when a CR alone is no line break (``_file_lines``)
    line_of = _file_lines(text)
    piece, first = next(((i, line) for i, line in enumerate(lines, 1)
                         if line.strip() and not line.lstrip().startswith("#")), (0, ""))  # fmt: skip
    number = line_of(piece)
    separator = other_separator([first]) if "," not in first else None
    if separator is not None and "email" in (name.strip().lower() for name in first.split(separator)):
        raise Refused(f"line {number}: {comma_separated(separator)}")
    if separator is not None and _columns_of_addresses(first, separator):
        raise Refused(f"line {number}: {comma_separated(separator)}, with a first line naming its 'email' column")
    good: dict[str, tuple[int, dict[str, str]]] = {}
    bad: list[str] = []
    cells: dict[int, dict[str, str]] = {}  # the reason, source and created_at cells of a CSV's row, by its line
    # a first line that is one address is no CSV header, even with a comma in its name ('"Santoso, Budi" <…>')
    if ("," in first and not _is_address(first)) or first.strip().lower() == "email":
        # read from the header: the comment and blank lines before it are no CSV (it looked for the header on line 1)
        before = piece - 1
        offset = next((m.end() for i, m in enumerate(_LINE_BREAK.finditer(text), 1) if i == before), 0)
        reader = csv.reader(io.StringIO(text[offset:], newline=""))
        fields: list[str] | None = None
        values: list[tuple[int, str | csv.Error]] = []
        while True:  # a row quoted across lines is named by its first line, as imports name theirs
            start = before + reader.line_num + 1  # line_num is the last line read (of those from the header on)
            try:
                row = next(reader, None)
            except csv.Error as exc:  # a field past the CSV field limit: the reader goes on after its line
                why, _ = unreadable(exc, "\n".join(lines[start - 1 : before + reader.line_num]), fields or [])
                if fields is None:
                    return {}, [f"line {line_of(start)}: {why}"]
                values.append((start, csv.Error(why)))
                continue
            if fields is None:  # the header
                fields = [f.strip().lower() for f in row or []]
                if "email" not in fields:
                    raise Refused(f"line {number}: {_no_email_column(fields)}")
                column = fields.index("email")
                entry = {name: fields.index(name) for name in ENTRY_COLUMNS if name in fields}
                continue
            if row is None:
                break
            end = before + reader.line_num
            if end > start and "\n".join(lines[start - 1 : end]).count('"') % 2:  # its last column's quote left open
                values.append((start, csv.Error(left_open(row, fields, line_of(start), line_of(end)))))
                continue
            values.append((start, row[column] if column < len(row) else ""))
            cells[start] = {name: _uncell(row[i].strip()) for name, i in entry.items() if i < len(row)}
    else:
        values = [(i, line) for i, line in enumerate(lines, 1)]
    for line_no, value in values:
        if reading is not None:
            reading(line_of(line_no), line_of(len(lines)))
        if isinstance(value, csv.Error):
            bad.append(f"line {line_of(line_no)}: {value}")
            continue
        value = value.strip()
        if not value or value.startswith("#"):
            continue
        try:
            _keep(good, arguments.mail_address(_uncell(value)), (line_of(line_no), cells.get(line_no, {})))
        except ValueError as exc:
            bad.append(f"line {line_of(line_no)}: {exc}")
    return good, bad


def _file_lines(text: str) -> Callable[[int], int]:
    """The file's line of each piece of ``text`` between two line breaks (``_LINE_BREAK``), by the piece's number
    (from 1; 0 stays 0, no line): as ``kembali import`` numbers them, and an editor or ``grep -n``, a CR alone ends a
    line only in a file whose first line break it is (an old Mac's); in one of LF or CRLF lines it is text within its
    line (a stray one, or one in a quoted cell), where every line after it was named one on."""
    breaks = _LINE_BREAK.finditer(text)
    first = next(breaks, None)
    if first is None or first.group() == "\r":
        return lambda piece: piece
    # the pieces that go on the line of the piece before them (kept alone: a list of millions of lines has none)
    within = [n for n, found in enumerate(breaks, 3) if found.group() == "\r"]
    return lambda piece: piece - bisect.bisect_right(within, piece)


ENTRY_COLUMNS = ("reason", "source", "created_at")
"""The columns of ``suppress list`` an import keeps besides the address: its list imports back as it was (an
unsubscribe of last year stays one of last year in ``stats``, from its link, not one of the import)."""


def _keep(rows: dict[str, tuple[int, dict[str, str]]], address: str, row: tuple[int, dict[str, str]]) -> None:
    """``row`` as ``address``'s in ``rows`` unless one is there already: the first line of an address listed twice,
    or the first whose reason is the customer's own wish (lists of two shops joined: an unsubscribe in the second is
    no operator's 'manual' of the first)."""
    if address not in rows or (row[1].get("reason", "").lower() in CUSTOMERS_OWN
                               and rows[address][1].get("reason", "").lower() not in CUSTOMERS_OWN):  # fmt: skip
        rows[address] = row


def _no_email_column(fields: list[str]) -> str:
    """Why a CSV header without an ``email`` column is refused, and what to change: a first line that is an address
    and a reason (a file without a header), or a column named otherwise (Mailchimp's ``Email Address``)."""
    why = f"a CSV needs an 'email' column (found: {printable(listed_columns(fields))})"
    if any(_is_address(field) for field in fields):
        return f"{why}: give it a first line naming its 'email' column"
    named = next((field for field in fields if "email" in field.replace("-", "")), None)
    return f"{why}: rename {printable(named)!r} to 'email'" if named is not None else why


def _columns_of_addresses(line: str, separator: str) -> bool:
    """Whether ``line`` is a row of columns, one an address (``x@example.com;bounce``), not one address: a file
    without a header line whose every line would be rejected as an address."""
    fields = [field.strip() for field in line.split(separator) if field.strip()]
    if len(fields) < 2 or _is_address(line):
        return False
    return any(_is_address(field) for field in fields)


def _is_address(value: str) -> bool:
    try:
        arguments.mail_address(value)
    except ValueError:
        return False
    return True


def _import(store: Store, target: str, given: str | None) -> int:
    """``given``: the --reason for every address; without it, each address's reason cell, else 'manual'."""
    from worker.adapters.clock import SystemClock

    with contextlib.nullcontext(sys.stdin.buffer) if target == "-" else Path(target).open("rb") as stream:
        data = stream.read(4)  # what it is, before it is read further: /dev/zero is read no further
        if (what := no_text(data)) is not None:  # as `kembali import` says it: each line is no address
            print(f"kembali suppress import: {target}: the file {what}: nothing was imported", file=sys.stderr)
            return EXIT_USAGE
        data += stream.read(MAX_LIST_BYTES + 1 - len(data))
    if len(data) > MAX_LIST_BYTES:
        print(f"kembali suppress import: {target}: larger than {_size(MAX_LIST_BYTES)}, the most a list may be: "
              "split it: nothing was imported", file=sys.stderr)
        return EXIT_USAGE
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, what = not_utf8(exc)
        print(f"kembali suppress import: {target}: line {line}: {what}; save the file as UTF-8: nothing was imported",
              file=sys.stderr)
        return EXIT_USAGE
    if not text.strip() and target != "-":
        # a file with nothing in it is the wrong file or an export that failed, refused as an empty customers file
        # is; standard input with nothing (a pipe whose search found no address) is imported as nothing
        print(f"kembali suppress import: {target}: the file is empty (expected one address a line, or a CSV with an "
              "email column): nothing was imported", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    # on a terminal, how far along it is (a bounce export of a million addresses takes a while to check and save)
    progress = Progress(f"suppressing addresses from {'standard input' if target == '-' else Path(target).name}")
    try:
        good, bad = read_addresses(text, lambda line, lines: progress.update(line, "lines read", total=lines))
    except Refused as exc:
        progress.done()
        print(f"kembali suppress import: {target}: {exc}: nothing was imported", file=sys.stderr)
        return EXIT_USAGE
    except BaseException:  # Ctrl-C too: the shell's prompt starts a line of its own
        progress.done()
        raise
    progress.clear()
    now = SystemClock().now()
    source = f"import:{printable(Path(target).name)}"[:100]
    rows: dict[str, tuple[int, dict[str, str]]] = {}
    for address, row in good.items():  # one mailbox in several cases is one address
        _keep(rows, suppression_address(address), row)
    kept: list[str] = []  # cells not kept: their address is imported all the same, not one rejected
    entries = {address: _entry(cell, given, source, now, f"line {line}", kept)
               for address, (line, cell) in rows.items()}
    for problem in sorted(bad + kept, key=_line_number):  # as the file has them: a bad cell before a bad line after it
        print(f"{target}: {problem}", file=sys.stderr)
    # the list shows the source on a line of its own, as it shows the reason (which may hold no control character)
    progress.restart()
    try:
        new = opstore.suppress_entries(store, entries, saved=lambda done, total: progress.update(done, "saved",
                                                                                               total=total))
    finally:
        progress.done()
    print(f"imported {len(entries)} address(es): {new} newly suppressed, {len(entries) - new} already suppressed"
          + (f", {len(bad)} rejected" if bad else "")
          + (f", {len(kept)} cell{'s' if len(kept) > 1 else ''} the list cannot hold taken as "
             f"{'their' if len(kept) > 1 else 'its'} default" if kept else ""))
    return EXIT_ATTENTION if bad or kept else EXIT_OK


def _line_number(problem: str) -> int:
    """The line a "line N: why" names."""
    return int(problem.split(":", 1)[0].removeprefix("line "))


def _entry(cells: dict[str, str], given: str | None, source: str, now: datetime, where: str,
           problems: list[str]) -> dict[str, Any]:
    """An imported address's entry: its reason ``given`` (--reason), else its reason cell, else 'manual'; its source
    and created_at cells, else ``source`` and ``now``. A cell the list cannot hold is named in ``problems`` and the
    default taken (the address is suppressed all the same: a bad note keeps no mail going)."""
    entry: dict[str, Any] = {"reason": given or "manual", "source": source, "created_at": now}
    if given is None and cells.get("reason"):
        try:
            entry["reason"] = arguments.suppression_reason(cells["reason"])  # 'Unsubscribed' is an unsubscribe
        except argparse.ArgumentTypeError as exc:
            problems.append(f"{where}: reason {exc}: suppressed as 'manual'")
    if cells.get("source"):
        try:
            entry["source"] = arguments.one_line(cells["source"])
            if len(entry["source"]) > MAX_SOURCE_CHARS:
                raise argparse.ArgumentTypeError(f"must be at most {MAX_SOURCE_CHARS} characters, not "
                                                 f"{len(cells['source'])}: {cells['source']!r}")
        except argparse.ArgumentTypeError as exc:
            entry["source"] = source
            problems.append(f"{where}: source {exc}: suppressed from {source}")
    if cells.get("created_at"):
        try:
            at = datetime.fromisoformat(cells["created_at"])
            # a naive one as the list writes it, in UTC; one before year 1 in UTC cannot be stored
            at = (at if at.tzinfo is not None else at.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):
            problems.append(f"{where}: created_at {cells['created_at']!r} is no ISO 8601 time "
                            f"(as `suppress list` writes it): suppressed as of now")
        else:
            if at > now:  # counted by `stats` in a week to come
                problems.append(f"{where}: created_at {cells['created_at']!r} is later than now: suppressed as of now")
            else:
                entry["created_at"] = at
    return entry


def _size(octets: int) -> str:
    """``512 MiB``, ``1 KiB``: a bound in the largest binary unit it is a whole number of."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if octets % size == 0:
            return f"{octets // size} {unit}"
    return f"{octets:,} bytes"

"""argparse types the commands share: each refuses a bad value with a message naming it (argparse adds the
option's name and exits 2); and what the commands add when a value names nothing (``customer_meant``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sqlalchemy.engine import Engine

from worker.adapters.store import KEMBALI_REASONS, ids_in_other_case
from worker.log import printable


def customer_meant(engine: Engine, given: str) -> str:
    """``; did you mean 'C-0001'?`` after "no customer 'c-0001'" when the shop has ids that differ from ``given``
    only in case (ids are compared exactly); "" when it has none."""
    meant = ids_in_other_case(engine, given)
    return f"; did you mean {' or '.join(repr(printable(m)) for m in meant)}?" if meant else ""


def whole_number(text: str, low: int, high: int | None = None, *, meaning: str = "") -> int:
    """``text`` as an int from ``low`` to ``high`` (no upper bound when None); ``meaning`` explains ``high``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}{meaning}"
        raise argparse.ArgumentTypeError(f"must be {bounds}, not {value}")
    return value


def positive_int(text: str) -> int:
    """A count or a limit: 1 or more (0 would list nothing and say so as if nothing were there)."""
    return whole_number(text, 1)


MAX_WINDOW_DAYS = 3650
"""Ten years: longer says nothing about an email, and adding it to a moment can pass year 9999."""


def window_days(text: str) -> int:
    return whole_number(text, 1, MAX_WINDOW_DAYS, meaning=" (ten years)")


def port(text: str) -> int:
    return whole_number(text, 0, 65535, meaning=" (0: a free one)")


def named(text: str) -> str:
    """A campaign or a customer ID to choose by: not empty nor spaces alone (a script's variable left empty, as in
    ``ledger close --customer "$ID"``, chose every row, as if the option were not given)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty: {text!r}")
    return text


def path(text: str) -> Path:
    """A file or folder an option names: not empty. ``Path("")`` is the current folder, so a script's variable left
    empty was read as "." (``--config``: "is a folder, not a config file"; ``preview --out``: its files written
    where kembali ran)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: name the file or folder, or leave the option out")
    return Path(text)


def one_line(text: str) -> str:
    """Text kept in the ledger or the suppression list: a line break or another control character would break the
    lines they are listed in."""
    if not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be one line of text without control characters, not {text!r}")
    return text


NAMED = re.compile(r'(?:\s*"[^"]*"\s*|[^"<>]*)<([^<>]*)>\s*')
"""An address as a mail client copies a sender: ``Budi Santoso <budi@example.com>``, ``"Santoso, Budi" <…>``; the
address is the group (one with two addresses does not match). No two of its repeats can take the same spaces (an
unquoted name takes those around it): a long line of spaces is read in one pass, where spaces matched on both
sides of such a name backtracked quadratically (minutes for a line of a CSV's size)."""


def unnamed(text: str) -> str:
    """``text`` without the display name and angle brackets a mail client gives an address (``NAMED``)."""
    named = NAMED.fullmatch(text)
    return text if named is None else named.group(1)


def mail_address(value: str) -> str:
    """``value`` normalised as customer imports store addresses (``suppress add``, ``send-test --to``); ValueError
    saying why when it is invalid. An address with a display name (an unsubscribe request's sender, an address
    copied from a mail client) is the address in its angle brackets; one with two addresses is no address."""
    from worker.adapters.importer import normalize_email  # email-validator: only when an address is given

    inner = unnamed(value)
    try:
        return normalize_email(inner)
    except ValueError as exc:
        if inner is value:
            raise
        # said of what was given, not of the part of it read
        raise ValueError(str(exc).replace(repr(inner.strip()), repr(value.strip()), 1)) from None


def address(text: str) -> str:
    """An address to look up (``ledger --email``): one line with a local part and a domain. Not validated
    further: the ledger may hold an address an earlier version let through, and the lookup must still find it.
    A Unicode domain (``sari@tokó.id``, as customers.csv wrote it) is looked up in the IDNA form imports store;
    ``Name <address>`` as its address."""
    from worker.adapters.importer import ascii_address  # email-validator: only when an address is given

    text = unnamed(text)
    local, at, domain = text.strip().rpartition("@")
    if not (at and local and domain) or not text.isprintable() or any(c.isspace() for c in text.strip()):
        raise argparse.ArgumentTypeError(f"not an email address: {text!r}")
    return ascii_address(text.strip())


MAX_REASON_CHARS = 30
"""The suppression list's reason column (PostgreSQL refuses a longer one)."""


def suppression_reason(text: str) -> str:
    """A reason without the spaces around it (``list --reason complaint`` finds it; one of spaces alone is none),
    one of ``KEMBALI_REASONS`` in its case ('Unsubscribed' from another tool, or typed so, is an unsubscribe)."""
    if len(one_line(text).strip()) > MAX_REASON_CHARS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_REASON_CHARS} characters, not {len(text.strip())}: {text!r}")  # fmt: skip
    reason = text.strip()
    return reason.lower() if reason.lower() in KEMBALI_REASONS else reason

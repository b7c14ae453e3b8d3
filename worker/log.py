"""Structured events: one line each, a stable name and fields.

``event("email_sent", campaign="winback", dedupe_key=..., code=250)`` logs
``email_sent campaign=winback dedupe_key=… code=250`` on a terminal and a JSON
object when ``logging.format = "json"``. Never pass bodies, tokens or passwords.

A value is cut to its first ``MAX_VALUE_CHARS`` characters, marked with its full length (an error's text can quote
a template's data: a render error once made a 46,000-character line); the line stays one line, and valid JSON.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

LOGGER = logging.getLogger("kembali")
MAX_VALUE_CHARS = 1000
"""The characters of a field's value a log line keeps (the ledger keeps 500 of an error's)."""


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    LOGGER.log(level, name, extra={"kembali_fields": fields})


def mask_email(address: str) -> str:
    """``budi.santoso@gmail.com`` → ``b***@gmail.com``: enough to recognise, not to harvest."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def mask_emails(addresses: Sequence[str]) -> list[str]:
    """``mask_email`` of each, those that mask alike (``budi@gmail.com`` and ``budi.santoso@gmail.com``: both
    ``b***@gmail.com``) with their local part's last character too (``b***i@gmail.com``, ``b***o@gmail.com``): a
    page naming the two named one address twice, to the customer's eyes. Those still alike (``siti@`` and
    ``siti.rahmawati@``: both ``s***i@``) with a star for each character hidden (``s**i@``, ``s************i@``)."""
    masked = [mask_email(a) for a in addresses]
    for counted in (False, True):
        apart = []
        for address, mask in zip(addresses, masked, strict=True):
            local, _, domain = address.partition("@")
            alike = masked.count(mask) > 1 and domain and len(local) > 1
            stars = "*" * max(len(local) - 2, 1) if counted else "***"  # never the whole local part
            apart.append(f"{local[:1]}{stars}{local[-1]}@{domain}" if alike else mask)
        masked = apart
    return masked


_ADDRESS = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")


def mask_addresses(text: str, keep: Iterable[str] = ()) -> str:
    """``text`` (a server's reply: ``550 5.1.1 <budi@gmail.com>: Recipient address rejected``) with each
    address in it masked as ``mask_email`` masks one (``<b***@gmail.com>``): replies often quote the recipient.
    ``keep``: the shop's own addresses (``shop.from_address``, the SMTP login), left whole: a reply refusing the
    sender names it, and the operator is to check that very setting."""
    kept = {address.lower() for address in keep if address}

    def masked(m: re.Match[str]) -> str:
        found = m.group()
        bare = found.lstrip("'")  # a hint's repr quotes it: 'shop@toko.id'
        if bare.lower() in kept:
            return found
        return found[: len(found) - len(bare)] + mask_email(bare)

    return _ADDRESS.sub(masked, text)


def error_line(exc: BaseException) -> str:
    """``Type: first line`` of an error, as logs give it: a database error's next lines carry the statement and
    what it was about (PostgreSQL's ``DETAIL: Key (email)=(…)``, a comment, an address)."""
    return f"{type(exc).__name__}: {str(exc).partition(chr(10))[0]}"


def _capped(text: str) -> str:
    """``text`` cut to ``MAX_VALUE_CHARS`` characters, with ``…(N chars)`` saying how long it was."""
    if len(text) <= MAX_VALUE_CHARS:
        return text
    return f"{text[:MAX_VALUE_CHARS]}…({len(text):,} chars)"


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """The record's traceback (another library's: asyncio's "Task exception was never retrieved"), as a field: its
    last ``MAX_VALUE_CHARS`` characters, where the error is said, after ``…(N chars)`` when it was longer. Its
    exception's text may quote a server's reply or a customer's data: written raw after the line, a line break in
    it started what read as a line of the log, and a terminal escape reached the operator's terminal."""
    text = formatter.formatException(record.exc_info)  # type: ignore[arg-type]
    if len(text) <= MAX_VALUE_CHARS:
        return text
    said = f"…({len(text):,} chars) "
    return said + text[len(text) - MAX_VALUE_CHARS + len(said):]


def _fmt_value(value: Any) -> str:
    """A value as text logs show it: bare when it is one printable word, else a JSON string in which every
    character that is not printable is escaped (a customer's name with a line separator, NEL or a terminal
    escape must not start a line of its own or reach the operator's terminal); cut as ``_capped`` does."""
    text = _capped(str(value))
    if text == "" or any(ch in text for ch in ' ="') or not text.isprintable():
        return printable(json.dumps(text, ensure_ascii=False))
    return text


def printable(text: str) -> str:
    """``text`` with each character that is not printable (C0 and C1 controls, U+2028, ESC…) as a JSON escape."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else json.dumps(ch)[1:-1] for ch in text)


def json_line(value: Any) -> str:
    """``value`` as one line of JSON for a terminal: UTF-8 text as it is, but every character that is not
    printable escaped (``json.dumps`` leaves C1 controls, bidi overrides and U+2028 raw), still valid JSON."""
    return printable(json.dumps(value, ensure_ascii=False))


def _named(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """The event's name and fields: another library's record (psycopg, asyncio, aiosmtpd…) is the event
    ``library_<level>`` naming its logger, its text a field like any other (cut, escaped, on one line)."""
    if record.name == LOGGER.name or record.name.startswith(LOGGER.name + "."):
        return record.getMessage(), getattr(record, "kembali_fields", {})
    return f"library_{record.levelname.lower()}", {"logger": record.name, "message": record.getMessage()}


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name, fields = _named(record)
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        parts = [when, record.levelname.lower().ljust(7), name]
        parts += [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"exception={_fmt_value(_traceback(self, record))}")  # on the line, as the JSON log has it
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name, fields = _named(record)
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "event": name,
        }
        body.update({k: v if isinstance(v, int | float | bool) or v is None else _capped(str(v))
                     for k, v in fields.items()})
        if record.exc_info:
            body["exception"] = _traceback(self, record)
        return json_line(body)


def json_event_line(name: str, level: int = logging.ERROR, *, exc: BaseException | None = None, **fields: Any) -> str:
    """The JSON line ``event(name, level, **fields)`` logs with ``logging.format = "json"``, made without the
    logger: for a command's failure said before (or whatever) ``configure`` set it up. ``exc``: its traceback,
    in the line's ``exception`` (its end, where the error is said, when it is long: ``_traceback``)."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = LOGGER.makeRecord(LOGGER.name, level, __file__, 0, name, (), exc_info,
                               extra={"kembali_fields": fields})  # fmt: skip
    return JsonFormatter().format(record)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when it writes (a test's capture of it may have ended since)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


_libraries: logging.Handler | None = None
"""The root logger's handler ``configure`` added: other libraries' warnings, in the same format."""


_chosen_level: str | None = None
"""The level the command line chose (``--log-level``): ``configure`` uses it over the one it is given."""


def choose_level(level: str | None) -> None:
    """Log at ``level`` whatever ``configure`` is given (the config's ``[logging] level``, a reload's); None: as
    given."""
    global _chosen_level
    _chosen_level = level


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    global _libraries
    level = _chosen_level or level
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
    # psycopg, asyncio, aiosmtpd… log on loggers of their own, which reach the root: without a handler there,
    # Python's last resort printed their warnings as bare text (no time, no level; a line of no JSON in a JSON log)
    root = logging.getLogger()
    if _libraries is not None:
        root.removeHandler(_libraries)
    _libraries = logging.StreamHandler(stream) if stream is not None else _Stderr()
    _libraries.setLevel(logging.WARNING)
    _libraries.setFormatter(formatter)
    root.addHandler(_libraries)

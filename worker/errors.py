"""Kembali's error tree. Library errors are translated at the adapter edge.

    KembaliError
    ├── ConfigError            config.toml is missing, malformed or has a bad key
    ├── SchemaError            the database schema is missing or behind
    ├── ImportRowError         one input row is invalid (file, line, reason)
    ├── TemplateError          a template failed to load or render
    ├── LedgerRowError         a ledger row cannot be read as written (edited by hand, cut short)
    └── DeliveryError          one SMTP attempt failed
        ├── TransientDeliveryError    worth retrying (4xx, drop before DATA ended)
        ├── PermanentDeliveryError    not worth retrying (5xx)
        └── AmbiguousDeliveryError    the mail may have arrived
"""

from __future__ import annotations

import os
import shlex


class KembaliError(Exception):
    """Something Kembali knows how to explain went wrong."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(KembaliError):
    """The configuration is invalid."""

    log_format: str | None = None
    """A config file that was read but refused: its ``[logging] format``, as written (None if not there)."""


class SchemaError(KembaliError):
    """The database schema is missing or out of date: run `kembali db upgrade`."""

    def __init__(self, message: str | None = None, *, upgrade: str = "") -> None:
        """``upgrade``: the advice that ends with the command upgrading the schema (``run``, ``check database.url, or
        create it with``), when an upgrade is what to do; ``telling`` completes it with the command for the config
        the operator named."""
        self.problem = message or (self.__doc__ or "").strip()
        self.upgrade = upgrade
        super().__init__(self.telling())

    def telling(self, config: str | os.PathLike[str] | None = None) -> str:
        """The message, its advice naming ``db_upgrade_command(config)``."""
        if not self.upgrade:
            return self.problem
        return f"{self.problem}: {self.upgrade} `{db_upgrade_command(config)}`"


def db_upgrade_command(config: str | os.PathLike[str] | None = None) -> str:
    """The command that upgrades the schema: ``kembali db upgrade``, reading ./config.toml or $KEMBALI_CONFIG; with
    ``config``, ``kembali --config FILE db upgrade`` (quoted for a shell)."""
    if config is None:
        return "kembali db upgrade"
    return f"kembali --config {shlex.quote(os.fspath(config))} db upgrade"


class ImportRowError(KembaliError):
    """An input row is invalid."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}")


class TemplateError(KembaliError):
    """A template failed to load or render."""

    MAX_MESSAGE_CHARS = 400
    """The characters of the message kept: Jinja2's errors quote data (``'dict object' has no attribute '…'`` with
    a key a template built from a name, 2000 times over), which the ledger, the log and the preview repeat."""

    def __init__(self, message: str, *, template: str = "", line: int | None = None) -> None:
        self.template = template
        self.line = line
        if len(message) > self.MAX_MESSAGE_CHARS:
            message = f"{message[: self.MAX_MESSAGE_CHARS]}…({len(message):,} chars)"
        self.reason = message  # what went wrong, without the file and line the message begins with
        where = template + (f":{line}" if line else "")
        super().__init__(f"{where}: {message}" if where else message)


class LedgerRowError(KembaliError):
    """A ledger row cannot be read as Kembali writes it (an operator's edit, a copy cut short): its message fails
    alone, the row named."""


class DeliveryError(KembaliError):
    """An SMTP attempt failed."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class TransientDeliveryError(DeliveryError):
    """The attempt failed in a way worth retrying."""


class PermanentDeliveryError(DeliveryError):
    """The attempt failed in a way retrying will not fix."""


class AmbiguousDeliveryError(DeliveryError):
    """The message may have been delivered."""


def not_utf8(exc: UnicodeDecodeError) -> tuple[int, str]:
    """Where a file's bytes are not UTF-8, from ``bytes.decode``'s error: the line (1-based) and ``not UTF-8 text
    (byte 0x…)``. Counted in the bytes the error names (``exc.object``: with ``utf-8-sig``, those after a byte-order
    mark, as ``exc.start`` is), not the file's, which named the byte three before and sometimes its line."""
    return exc.object[: exc.start].count(b"\n") + 1, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x})"

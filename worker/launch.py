"""A SIGTERM before the command has its own handler: noted, for the handler to take when it is set.

Python takes about half a second to import kembali's modules (SQLAlchemy, Alembic, pydantic…) before the command
parses its arguments and sets its stop handlers (``worker.stopping``). A SIGTERM then (``timeout``, a service
manager stopping a unit just started, ``kill``) met the default action: the process was killed without a word
(exit -15), where every later one says ``stopped by SIGTERM`` and exits 143 (the daemon 0). So the entry point
(``worker.__main__.main``: the ``kembali`` console script, ``python -m worker``) sets ``note_sigterm`` first,
before it imports anything else; the command's own handler takes the note when it is set
(``stopping.sigterm_raises``, ``stopping.StartupSignals``), and the command stops before it begins, as it would
have a moment later. This module imports nothing of kembali's, so it can come first and ``stopping`` can read it.
Only the interpreter's own start (a few tens of milliseconds, before any code of this package runs) is left to
the default action."""

from __future__ import annotations

import signal
from types import FrameType

_noted = False
_answered = False
"""A command's own handler has taken over (``early_sigterm`` was called as it was set)."""


def _note(_signum: int, _frame: FrameType | None) -> None:
    global _noted
    _noted = True


def note_sigterm() -> None:
    """From now on a SIGTERM is noted (``early_sigterm``) until a handler of the command's replaces this one."""
    global _noted, _answered
    _noted = _answered = False
    signal.signal(signal.SIGTERM, _note)


def early_sigterm() -> bool:
    """Whether a SIGTERM was noted (then forgotten: it is the caller's to act on now); the caller, a command's
    handler as it is set, answers for SIGTERM from now on."""
    global _noted, _answered
    noted, _noted, _answered = _noted, False, True
    return noted


def unanswered() -> bool:
    """Whether a SIGTERM was noted before any command's handler was set (``--help``, a usage error: none is), for
    the entry point to tell. One noted after the command gave its handler back, as it ended, is no stop of a
    command that has not begun: the command has had its say (a stop of its own, or its work done)."""
    return _noted and not _answered

"""Which event loop runs Kembali: uvloop when it is installed (the ``fast`` extra), else asyncio's.

uvloop cuts the event loop's own CPU per message (transports, timers, callbacks)
by roughly a tenth of the whole sender's; nothing in Kembali depends on it.
``KEMBALI_EVENT_LOOP=asyncio`` forces the standard loop (to rule uvloop out when
debugging); ``=uvloop`` requires uvloop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from worker.errors import ConfigError

T = TypeVar("T")
ENV = "KEMBALI_EVENT_LOOP"


def choice(environ: dict[str, str] | None = None) -> str:
    """``uvloop`` or ``asyncio``: what ``run`` will use."""
    wanted = (os.environ if environ is None else environ).get(ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "asyncio", "uvloop"):
        raise ConfigError(f"{ENV} must be 'auto', 'asyncio' or 'uvloop', not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import_module("uvloop")
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError(f"{ENV}=uvloop but uvloop is not installed (pip install 'kembali[fast]')") from None
        return "asyncio"
    return "uvloop"


def describe() -> str:
    """``uvloop 0.21.0`` or ``asyncio``, for logs and benchmarks."""
    name = choice()
    if name == "uvloop":
        try:
            return f"uvloop {version('uvloop')}"
        except PackageNotFoundError:  # pragma: no cover - imported but not installed as a distribution
            return "uvloop"
    return "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        chosen = choice()
    except ConfigError:
        main.close()  # never started: else Python warns on stderr that it was never awaited
        raise
    if chosen == "uvloop":
        uvloop: Any = import_module("uvloop")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result: T = runner.run(main)
            return result
    return asyncio.run(main)

"""Files a command writes for the operator (``preview --out``'s messages, ``insights --plot``'s chart): each whole
or not at all."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PARTIAL = ".partial"
"""What a file is called while it is written: ``.gaps.png.partial`` beside ``gaps.png``, renamed when whole."""


def write_whole(path: Path, data: bytes) -> None:
    """``data`` in ``path``, whole or not at all: written under a hidden temporary name beside it, then renamed
    over it. A write that fails, or that Ctrl-C or SIGTERM stops (``stopping.Terminated``), removes the temporary
    file; only a kill (SIGKILL) leaves it, and never a file cut short under its own name. An ``OSError`` names
    ``path``, not the temporary file."""
    partial = path.with_name(f".{path.name}{PARTIAL}")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)
    except BaseException as exc:  # KeyboardInterrupt too: the command stops, leaving whole files only
        with contextlib.suppress(OSError):
            partial.unlink()
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, exc.strerror, str(path)) from None
        raise

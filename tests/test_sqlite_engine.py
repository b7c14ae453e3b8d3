"""SQLite's memory statistics are turned off before the process's first connection (``adapters.db``): every
allocation took a process-wide mutex with them on. Each case runs in a fresh interpreter, as a process starts."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _reachable() -> bool:
    import _sqlite3

    try:
        return hasattr(ctypes.CDLL(_sqlite3.__file__), "sqlite3_config")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _reachable(), reason="this Python's SQLite library cannot be reached by ctypes")

PROBE = """
import ctypes, sqlite3, sys, _sqlite3
from worker.adapters import db
lib = ctypes.CDLL(_sqlite3.__file__)
lib.sqlite3_memory_used.restype = ctypes.c_int64
early = sqlite3.connect(sys.argv[2]) if sys.argv[1] == "open-first" else None
engine = db.create_engine("sqlite:///" + sys.argv[2])
with engine.connect() as conn:
    answer = conn.exec_driver_sql("SELECT 6 * 7").scalar()
    print(db.without_sqlite_memstatus(), lib.sqlite3_memory_used() > 0, answer)
"""


def _probe(mode: str, path: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(path)], capture_output=True, text=True,
                          check=True, cwd=ROOT)  # fmt: skip
    return done.stdout.split()


def test_statistics_are_off_when_the_engine_opens_the_first_connection(tmp_path: Path) -> None:
    # with statistics off, SQLite no longer counts the memory an open connection holds
    assert _probe("engine-first", tmp_path / "a.db") == ["True", "False", "42"]


def test_with_a_connection_already_open_sqlite_is_left_as_it_is_and_works(tmp_path: Path) -> None:
    # shutting SQLite down under an open connection is undefined behaviour: it is not done
    assert _probe("open-first", tmp_path / "b.db") == ["False", "True", "42"]

"""The CLI run in this process, on a fresh migrated SQLite database (what several CLI test files share)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from tests.db_fixtures import migrated_sqlite
from worker.cli import main


def migrated_config(folder: Path) -> Path:
    """A config.toml in ``folder`` for a fresh SQLite database (``k.db``) with the schema."""
    path = folder / "config.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{folder / "k.db"}"\n', encoding="utf-8")
    migrated_sqlite(folder / "k.db")
    return path


def run_on_a_terminal(
    argv: Sequence[str], *, stdout_too: bool, env: Mapping[str, str] | None = None, cwd: Path | None = None,
    timeout: float = 120, columns: int = 0, piped_to: str = "",
) -> tuple[int, bytes]:
    """``python -m worker ARGV`` with its stderr on a terminal (a pty) ``columns`` wide (0: one that does not say),
    and its stdout too with ``stdout_too`` (else discarded): the exit code and every byte the terminal received,
    read as they come (a full terminal would block the command). A command silent for ``timeout`` seconds, or not
    done that long after its last output, fails. ``piped_to``: its stdout is a pipe to this shell command instead,
    whose own output is on the terminal (``kembali preview --json | jq .``); the exit code is the pipeline's."""
    leader, follower = pty.openpty()
    if columns:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    command = [sys.executable, "-m", "worker", *argv]
    if piped_to:
        command = ["sh", "-c", f'"$@" | {piped_to}', "sh", *command]
    try:
        with subprocess.Popen(command, cwd=cwd, env=env,
                              stdout=follower if stdout_too else subprocess.DEVNULL, stderr=follower) as child:
            os.close(follower)
            seen = b""
            while True:
                ready, _, _ = select.select([leader], [], [], timeout)
                assert ready, f"kembali {' '.join(argv)} wrote nothing for {timeout} s"
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the command closed its side of the terminal (Linux)
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
            return child.wait(timeout=timeout), seen
    finally:
        os.close(leader)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``kembali ARGV`` in this process: the exit code and what it printed (both streams)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refusing the command line
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def waiting_for_a_lock(pid: int) -> bool:
    """Whether process ``pid``'s main thread sleeps in nanosleep (Linux), as SQLite does between its tries for a
    lock another connection holds (the commands sleep nowhere else)."""
    return Path(f"/proc/{pid}/wchan").read_text() in ("hrtimer_nanosleep", "do_nanosleep")


def cpu_seconds(pid: int) -> float:
    """The processor time ``pid`` has used so far (Linux): user and system."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

"""The CLI run in this process, on a fresh migrated SQLite database (what several CLI test files share)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.adapters import db
from worker.cli import main


def migrated_config(folder: Path) -> Path:
    """A config.toml in ``folder`` for a fresh SQLite database (``k.db``) with the schema."""
    path = folder / "config.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{folder / "k.db"}"\n', encoding="utf-8")
    engine = db.create_engine(f"sqlite:///{folder / 'k.db'}")
    db.upgrade(engine)
    engine.dispose()
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``kembali ARGV`` in this process: the exit code and what it printed (both streams)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refusing the command line
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err

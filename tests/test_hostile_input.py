"""What an operator types and feeds Kembali that is wrong: each is named, with no traceback and no silent loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.adapters import db
from worker.cli import main

CUSTOMERS = "id,email,name,marketing_consent\n"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config for a fresh SQLite database with the schema."""
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "k.db"}"\n', encoding="utf-8")
    engine = db.create_engine(f"sqlite:///{tmp_path / 'k.db'}")
    db.upgrade(engine)
    engine.dispose()
    return path


def kembali(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """``kembali ARGV`` in this process: the exit code and what it printed (both streams)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refusing the command line
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_quote_left_open_names_every_line_it_swallowed(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a name with an opening quote and no closing one: the CSV reader reads on to the end of the file as one field
    rows = ['C-1,c1@example.com,"Budi,true'] + [f"C-{i},c{i}@example.com,Name {i},true" for i in range(2, 7)]
    (tmp_path / "customers.csv").write_text(CUSTOMERS + "\n".join(rows) + "\n", encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    assert code == 1
    assert "customers.csv:2: id 'C-1': row has 3 fields" in out
    assert "it takes in lines 2 to 7, none of which is imported" in out, out


def test_a_quote_left_open_in_a_big_file_names_the_lines_it_swallowed(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # past the CSV field limit the reader gives up on the field and goes on after it: the lines in between are lost
    rows = ['C-1,c1@example.com,"Budi,true'] + [f"C-{i},c{i}@example.com,Name {i},true" for i in range(2, 5000)]
    (tmp_path / "customers.csv").write_text(CUSTOMERS + "\n".join(rows) + "\n", encoding="utf-8")
    code, out = kembali(capsys, "--config", str(config), "import", "customers", str(tmp_path / "customers.csv"))
    assert code == 1
    [rejected] = [line for line in out.splitlines() if line.startswith("rejected")]
    assert rejected.startswith("rejected customers.csv:2: unreadable CSV (field larger than field limit")
    assert "it takes in lines 2 to " in rejected and "none of which is imported" in rejected
    last = int(rejected.split("it takes in lines 2 to ")[1].split(",")[0])
    created = int(out.split("customers: ")[1].split(" created")[0])
    assert created == 5000 - last  # every other line of the file is either imported or named as lost

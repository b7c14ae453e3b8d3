"""Acceptance: `kembali preview --at 2027-02-28T10:00+07:00` on the demo shop lists every campaign."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from tests.clikit import run_on_a_terminal
from tests.db_fixtures import migrate
from worker.commands.importing import import_file
from worker.config import load_settings
from worker.demo import generate_shop, write_csvs

ROOT = Path(__file__).resolve().parent.parent
DEMO_NOW = datetime(2027, 2, 20, 3, 0, tzinfo=UTC)
"""The demo shop's history ends a week before the preview (as `kembali demo --now …` would make it)."""


def _demo_shop(tmp_path: Path) -> Path:
    """The demo shop (shipped config.toml) imported into a fresh SQLite file; its config file."""
    text = (ROOT / "config.toml").read_text(encoding="utf-8")
    text = text.replace('url = "sqlite:///kembali.db"', f'url = "sqlite:///{tmp_path / "demo.db"}"')
    text = text.replace('dir = "templates/email"', f'dir = "{ROOT / "templates" / "email"}"')
    config = tmp_path / "config.toml"
    config.write_text(text, encoding="utf-8")
    settings = load_settings(config)
    migrate(settings.database_url)  # (a new SQLite file: a copy of the session's migrated one)
    files = write_csvs(generate_shop(seed=7, customers=120, now=DEMO_NOW), tmp_path / "data")
    for kind in ("customers", "products", "orders"):
        import_file(settings, kind, files[kind], now=DEMO_NOW)
    return config


def test_preview_on_the_29_february_eve(tmp_path: Path) -> None:
    # Given the demo shop (shipped config.toml) imported into a fresh SQLite file
    config = _demo_shop(tmp_path)

    # When previewing 28 February 2027, 10:00 in Jakarta
    env = {**os.environ, "KEMBALI_LINK_SECRET": "a-test-key-of-enough-length"}
    done = subprocess.run(
        [sys.executable, "-m", "worker", "--config", str(config), "preview", "--at", "2027-02-28T10:00+07:00"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]

    # Then the two 29 February customers get their birthday offer on the 28th (2027 is not a leap year)
    birthdays = {r[0] for r in rows if r[1:2] == ["birthday"]}
    assert {"C-0004", "C-0009"} <= birthdays
    # and win-back steps are listed by their number and day count
    steps = {" ".join(r[1:3]) for r in rows if r and r[1].startswith("winback/")}
    assert {"winback/1 d45", "winback/2 d75", "winback/3 d120"} <= steps
    # and every other campaign shows up, with skips and deferrals and their reasons
    campaigns = {r[1].partition("/")[0] for r in rows if len(r) > 1}
    assert {"feedback", "new_products", "loyalty"} <= campaigns
    # and a loyalty reward says which milestone, as config.toml writes it (one customer may reach two at once)
    milestones = {r[1] for r in rows if r[1:2] and r[1].startswith("loyalty")}
    assert milestones, done.stdout
    assert all(re.fullmatch(r"loyalty/(orders-(5|10|25)|spend-5000000)", m) for m in milestones), milestones
    # in the column the header gives, whatever the label's length: each row's third column begins under "when"
    lines = done.stdout.splitlines()
    column = next(line for line in lines if line.startswith("customer")).index("when (their time)")
    listed = [line for line in lines if line.startswith("C-")]
    assert all(line[column - 1] == " " and line[column] != " " for line in listed), [
        line for line in listed if line[column - 1] != " " or line[column] == " "][:3]
    assert any("skip: held_out" in line for line in done.stdout.splitlines())
    deferred = [line for line in done.stdout.splitlines() if "defer until" in line and "(cap" in line]
    assert deferred
    # on the customer's clock, as the send times beside them (the demo's customers live in Indonesia's zones)
    assert all(re.search(r"defer until \d{4}-\d\d-\d\d \d\d:\d\d (WIB|WITA|WIT) \(cap", line) for line in deferred)
    assert "would be sent" in done.stdout and "waiting for later:" in done.stdout
    # and every row names its customer, feedback's too (its key names the order)
    assert all(r[0].startswith("C-") for r in rows if len(r) > 1 and r[1].partition("/")[0] in (
        "feedback", "birthday", "loyalty", "new_products"))  # fmt: skip
    assert any(r[1] == "feedback" for r in rows if len(r) > 1)


def test_piped_to_a_program_that_shows_it_on_the_terminal_no_progress_line_is_drawn_among_the_rows(
    tmp_path: Path,
) -> None:
    # Given the demo shop, previewed as the help shows (`kembali preview --json | jq .`): its output a pipe to a
    # program that writes it to the terminal its progress line would be drawn on
    config = _demo_shop(tmp_path)
    env = {**os.environ, "KEMBALI_LINK_SECRET": "a-test-key-of-enough-length"}
    code, raw = run_on_a_terminal(["--config", str(config), "preview", "--at", "2027-02-28T10:00+07:00", "--json"],
                                  stdout_too=True, env=env, cwd=ROOT, piped_to="cat")  # fmt: skip
    assert code == 0
    # Then each JSON line is a line of its own on the terminal, none after a progress line ("previewing: 1
    # considered, 0 would be sent{"action": …"), and no progress line is drawn there
    text = raw.decode()
    assert "previewing:" not in text, text[:500]
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line.strip()]
    assert len(lines) > 10 and all(line.startswith('{"action": ') for line in lines), lines[:3]


def test_on_a_terminal_the_rows_are_not_written_after_a_progress_line(tmp_path: Path) -> None:
    # Given the demo shop, previewed with its output on a terminal
    config = _demo_shop(tmp_path)
    env = {**os.environ, "KEMBALI_LINK_SECRET": "a-test-key-of-enough-length"}
    code, raw = run_on_a_terminal(["--config", str(config), "preview", "--at", "2027-02-28T10:00+07:00"],
                                  stdout_too=True, env=env, cwd=ROOT)  # fmt: skip
    assert code == 0
    # Then each row is a line of its own (the first row was written after the progress line drawn before it:
    # "previewing: 1 considered, 0 would be sentC-0004  birthday …"), and no progress line is left
    text = raw.decode()
    assert "previewing:" not in text, text[:500]
    rows = [line for line in text.replace("\r\n", "\n").split("\n") if line.startswith("C-")]
    assert len(rows) > 10
